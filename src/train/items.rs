//! Dataset rows → training items: tokenized once, in the shape the objective's data need asks
//! for (single sequences, packed rows, preference pairs with their extras, or chain-of-hindsight
//! sequences). Every error names the file and line.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candor_alignment::objectives::hindsight::{self, Feedback, PieceKind};
use candor_alignment::objectives::spo;
use candor_alignment::{DataNeed, Objective};
use rand::SeedableRng;
use serde_json::Value;

use super::config::TrainConfig;
use crate::data::{
    pack_best_fit, read_jsonl, Example, Piece, Row, SequenceTokenizer, Text, TokenizedSequence, Truncation,
};
use crate::load::LoadedModel;

/// One training example after tokenization.
#[derive(Debug, Clone)]
pub enum Item {
    /// A single sequence (SFT, chain of hindsight).
    Sequence(TokenizedSequence),
    /// Several sequences packed into one row (SFT with packing).
    Packed(Vec<TokenizedSequence>),
    /// A preference pair.
    Pair(PairItem),
    /// One of the policy's own samples, labelled (NFT).
    Rollout(RolloutItem),
    /// One of the policy's own samples with token advantages (PPO).
    Ppo(PpoItem),
    /// A sequence a distillation objective reads the teacher's distributions on.
    Distill(DistillItem),
}

/// A distillation sequence, with the teacher's cached final hidden states at its completion
/// positions when `distill.teacher_logits_cache` is on.
#[derive(Debug, Clone)]
pub struct DistillItem {
    /// Prompt + completion.
    pub sequence: TokenizedSequence,
    /// `[completion tokens, hidden]` of the teacher, if cached.
    pub teacher_states: Option<candle::Tensor>,
}

/// A sampled answer with what a PPO update needs of it, one value per answer token.
#[derive(Debug, Clone)]
pub struct PpoItem {
    /// Prompt + sampled answer (the answer is the completion).
    pub sequence: TokenizedSequence,
    /// log π_old at the rollout.
    pub old_logps: Vec<f32>,
    /// The value head's predictions at the rollout.
    pub old_values: Vec<f32>,
    /// Whitened advantages.
    pub advantages: Vec<f32>,
    /// Returns.
    pub returns: Vec<f32>,
}

/// A sampled answer with what NFT needs of it.
#[derive(Debug, Clone)]
pub struct RolloutItem {
    /// Prompt + sampled answer (the answer is the completion).
    pub sequence: TokenizedSequence,
    /// log π_old of each answer token, from the policy the round sampled with.
    pub old_logps: Vec<f32>,
    /// The clipped accuracy of the answer's question over its samples.
    pub accuracy: f32,
    /// Whether the verifier accepted the answer.
    pub correct: bool,
    /// KDRL: the answer's group-normalised advantage.
    pub advantage: f32,
    /// KDRL: the teacher's log-prob of each answer token (empty for NFT).
    pub teacher_logps: Vec<f32>,
    /// KDRL: whether the KD term applies to the answer (reward-guided masking).
    pub kd: bool,
}

/// A preference pair and what objectives may need beyond its two sequences.
#[derive(Debug, Clone)]
pub struct PairItem {
    /// Prompt + chosen completion.
    pub chosen: TokenizedSequence,
    /// Prompt + rejected completion.
    pub rejected: TokenizedSequence,
    /// The reference's summed log-probs (chosen, rejected), when precomputed.
    pub reference: Option<(f32, f32)>,
    /// The previous iterate's summed log-probs (chosen, rejected) (INPO).
    pub previous: Option<(f32, f32)>,
    /// The row's `reward_chosen` / `reward_rejected` (CoPG).
    pub rewards: Option<(f32, f32)>,
    /// The row's `margin` (reward models).
    pub margin: Option<f32>,
    /// SPO: prompt + key-content-removed completion, its degree, and its head (0 chosen,
    /// 1 rejected).
    pub variants: Vec<(TokenizedSequence, u32, u32)>,
}

impl PairItem {
    /// A pair with nothing beyond its two sequences.
    pub fn new(chosen: TokenizedSequence, rejected: TokenizedSequence) -> Self {
        Self { chosen, rejected, reference: None, previous: None, rewards: None, margin: None, variants: Vec::new() }
    }
}

impl Item {
    /// Completion tokens that count for token-mean losses (chosen only, for pairs).
    pub fn loss_tokens(&self) -> usize {
        match self {
            Item::Sequence(s) => s.completion_tokens(),
            Item::Packed(seqs) => seqs.iter().map(|s| s.completion_tokens()).sum(),
            Item::Pair(p) => p.chosen.completion_tokens(),
            Item::Rollout(r) => r.sequence.completion_tokens(),
            Item::Ppo(p) => p.sequence.completion_tokens(),
            Item::Distill(d) => d.sequence.completion_tokens(),
        }
    }

    /// All tokens the policy reads.
    pub fn tokens(&self) -> usize {
        match self {
            Item::Sequence(s) => s.ids.len(),
            Item::Packed(seqs) => seqs.iter().map(|s| s.ids.len()).sum(),
            Item::Pair(p) => {
                p.chosen.ids.len() + p.rejected.ids.len() + p.variants.iter().map(|v| v.0.ids.len()).sum::<usize>()
            }
            Item::Rollout(r) => r.sequence.ids.len(),
            Item::Ppo(p) => p.sequence.ids.len(),
            Item::Distill(d) => d.sequence.ids.len(),
        }
    }
}

/// Read and tokenize a dataset for the run's objective. With `reward_judge`, pairs without
/// `reward_chosen` / `reward_rejected` get the judge's scores of their two completions.
pub fn load_items(
    path: &Path,
    cfg: &TrainConfig,
    model: &LoadedModel,
    reward_judge: Option<&dyn crate::judge::Judge>,
) -> Result<Vec<Item>> {
    let data = read_jsonl(path, cfg.data.skip_bad_rows)?;
    crate::data::report_skipped(&data.skipped);
    let tok = SequenceTokenizer {
        tokenizer: &model.tokenizer,
        chat_template: model.chat_template.as_ref(),
        truncation: Truncation {
            max_length: cfg.data.max_length,
            max_prompt_length: cfg.data.max_prompt_length,
            mode: cfg.data.truncation_mode,
        },
    };
    let objective = &cfg.objective;
    let mut items = Vec::with_capacity(data.rows.len());
    for row in &data.rows {
        let at = || format!("{}:{}", path.display(), row.line);
        let item = item_of_row(&tok, objective, cfg.run.seed, row, reward_judge.is_some()).with_context(at)?;
        if item.loss_tokens() == 0 {
            bail!("{}: no completion tokens left after truncation (raise `data.max_length`)", at());
        }
        items.push(item);
    }
    if let Some(judge) = reward_judge {
        judge_missing_rewards(judge, &data.rows, &mut items)
            .with_context(|| format!("scoring `{}` with `{}`", path.display(), judge.name()))?;
    }
    if cfg.run.packing {
        let capacity = cfg.data.max_length.unwrap_or(1024);
        let lengths: Vec<usize> = items.iter().map(Item::tokens).collect();
        let mut seqs: Vec<Option<TokenizedSequence>> =
            items.into_iter().map(|i| if let Item::Sequence(s) = i { Some(s) } else { None }).collect();
        return Ok(pack_best_fit(&lengths, capacity)
            .into_iter()
            .map(|bin| Item::Packed(bin.into_iter().filter_map(|i| seqs[i].take()).collect()))
            .collect());
    }
    Ok(items)
}

/// The objectives that accept unpaired (`label`) rows, for error messages.
const UNPAIRED_OBJECTIVES: &str = "hindsight";

/// Fill the rewards of pairs whose rows have none with `judge`'s pointwise scores.
fn judge_missing_rewards(judge: &dyn crate::judge::Judge, rows: &[Row], items: &mut [Item]) -> Result<()> {
    let mut texts = Vec::new();
    let mut owners = Vec::new();
    for (i, (row, item)) in rows.iter().zip(items.iter()).enumerate() {
        if let (Example::Preference { prompt, chosen, rejected }, Item::Pair(p)) = (&row.example, item) {
            if p.rewards.is_none() {
                texts.push((prompt, &row.fields, plain(chosen), plain(rejected)));
                owners.push(i);
            }
        }
    }
    if texts.is_empty() {
        return Ok(());
    }
    let outputs: Vec<(&Text, &serde_json::Map<String, Value>, &str)> =
        texts.iter().flat_map(|(p, f, c, r)| [(*p, *f, c.as_str()), (*p, *f, r.as_str())]).collect();
    let Some(scores) = judge.score(&outputs)? else {
        bail!("`{}` compares two outputs; rewards need a pointwise judge (rm:, verifier:)", judge.name());
    };
    for (i, s) in owners.into_iter().zip(scores.chunks(2)) {
        if let Item::Pair(p) = &mut items[i] {
            p.rewards = Some((s[0] as f32, s[1] as f32));
        }
    }
    Ok(())
}

fn item_of_row(tok: &SequenceTokenizer, objective: &Objective, seed: u64, row: &Row, judged: bool) -> Result<Item> {
    let name = objective.name();
    let need = objective.data_need();
    Ok(match (need, &row.example) {
        (DataNeed::Rollouts | DataNeed::TokenRewards | DataNeed::TeacherRollouts, _) => bail!(
            "objective `{name}` learns from its own samples, not from dataset rows: give prompts with `--prompts`"
        ),
        (DataNeed::Pairs | DataNeed::ScoredPairs, Example::Preference { prompt, chosen, rejected }) => {
            let mut pair =
                PairItem::new(tok.prompt_completion(prompt, chosen)?, tok.prompt_completion(prompt, rejected)?);
            // Columns the objective does not read are ignored, as TRL ignores them.
            let needs_rewards = objective.needs_pair_rewards();
            pair.rewards = if needs_rewards || judged { pair_rewards(row, needs_rewards && !judged)? } else { None };
            pair.margin = if need == DataNeed::ScoredPairs { number_field(row, "margin")? } else { None };
            if let Some(degrees) = objective.degree_heads().map(|h| h.classes) {
                for (head, completion) in [chosen, rejected].into_iter().enumerate() {
                    for k in 0..degrees {
                        let variant = map_text(completion, |t| spo::remove_key_content(t, k, degrees));
                        pair.variants.push((tok.prompt_completion(prompt, &variant)?, k as u32, head as u32));
                    }
                }
            }
            Item::Pair(pair)
        }
        (DataNeed::Hindsight, Example::Preference { prompt, chosen, rejected }) => Item::Sequence(hindsight_sequence(
            tok,
            objective,
            seed,
            row,
            prompt,
            Feedback::Pair { pos: &plain(chosen), neg: &plain(rejected) },
        )?),
        (DataNeed::Hindsight, Example::Unpaired { prompt, completion, label }) => Item::Sequence(hindsight_sequence(
            tok,
            objective,
            seed,
            row,
            prompt,
            Feedback::Single { answer: &plain(completion), desirable: *label },
        )?),
        (_, Example::Unpaired { .. }) => {
            bail!("field `label`: objective `{name}` cannot learn from unpaired rows (a single completion with a label); objectives that can: {UNPAIRED_OBJECTIVES}")
        }
        (DataNeed::Pairs | DataNeed::ScoredPairs | DataNeed::Hindsight, other) => {
            bail!("objective `{name}` needs preference rows (`prompt`/`chosen`/`rejected`), got a {} row", other.kind())
        }
        (DataNeed::Sequences | DataNeed::Distill, Example::Preference { .. } | Example::Prompt { .. }) => {
            bail!(
                "objective `{name}` needs prompt-completion, `messages` or `text` rows, got a {} row",
                row.example.kind()
            )
        }
        (DataNeed::Sequences, _) => Item::Sequence(crate::scoring::row_sequences(tok, &row.example)?.remove(0).1),
        (DataNeed::Distill, _) => Item::Distill(DistillItem {
            sequence: crate::scoring::row_sequences(tok, &row.example)?.remove(0).1,
            teacher_states: None,
        }),
    })
}

/// A chain-of-hindsight sequence: the prompt, then a template drawn for this row (seeded by the
/// run seed and the line) with its pieces tokenized one by one; answer tokens carry classes 1
/// (positive) / 2 (negative), and a fraction of an answer that another answer follows is hidden
/// from later positions.
fn hindsight_sequence(
    tok: &SequenceTokenizer,
    objective: &Objective,
    seed: u64,
    row: &Row,
    prompt: &Text,
    feedback: Feedback,
) -> Result<TokenizedSequence> {
    let Objective::Hindsight(cfg) = objective else { unreachable!("only chain of hindsight has this data need") };
    let row_seed = seed ^ (row.line as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let rendered = hindsight::render(cfg, feedback, row_seed)?;
    let is_answer = |k: PieceKind| matches!(k, PieceKind::Positive | PieceKind::Negative);
    let pieces: Vec<Piece> = rendered
        .pieces
        .iter()
        .enumerate()
        .map(|(i, (text, kind))| {
            let followed_by_answer = rendered.pieces[i + 1..].iter().any(|p| is_answer(p.1));
            let hide = if is_answer(*kind) && followed_by_answer { rendered.mask_past_fraction } else { 0.0 };
            Piece { text, class: kind.loss_class(), hide }
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(row_seed.rotate_left(17));
    tok.prompt_pieces(prompt, &pieces, &mut rng)
}

/// A completion's text: the string, or its messages' contents one per line.
fn plain(t: &Text) -> String {
    match t {
        Text::Plain(s) => s.clone(),
        Text::Chat(messages) => messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
    }
}

/// The same completion with `f` applied to its text (to every message's content).
fn map_text(t: &Text, f: impl Fn(&str) -> String) -> Text {
    match t {
        Text::Plain(s) => Text::Plain(f(s)),
        Text::Chat(messages) => Text::Chat(
            messages.iter().map(|m| crate::load::Message { role: m.role.clone(), content: f(&m.content) }).collect(),
        ),
    }
}

/// A numeric column, `None` when absent.
fn number_field(row: &Row, field: &str) -> Result<Option<f32>> {
    match row.fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64().map(|v| v as f32)),
        Some(other) => Err(anyhow!("field `{field}`: expected a number, got {other}")),
    }
}

/// `reward_chosen` / `reward_rejected`: both or neither; required when the objective needs them.
fn pair_rewards(row: &Row, required: bool) -> Result<Option<(f32, f32)>> {
    match (number_field(row, "reward_chosen")?, number_field(row, "reward_rejected")?) {
        (Some(c), Some(r)) => Ok(Some((c, r))),
        (None, None) if !required => Ok(None),
        (c, _) => {
            let missing = if c.is_none() { "reward_chosen" } else { "reward_rejected" };
            bail!("field `{missing}`: missing (the objective needs a scalar reward for both completions; or set `objective.reward_judge`)")
        }
    }
}

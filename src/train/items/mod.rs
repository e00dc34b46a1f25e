//! Dataset rows → training items: tokenized once, in the shape the objective's data need asks
//! for (single sequences, packed rows, preference pairs with their extras, or chain-of-hindsight
//! sequences). Every error names the file and line.

use std::path::Path;

mod hindsight;
mod labelled;
mod pairs;
mod samples;

use anyhow::{bail, Context, Result};
use candor_alignment::objectives::hindsight::Feedback;
use candor_alignment::{DataNeed, Objective};

pub use labelled::LabelledItem;
pub use pairs::PairItem;
pub use samples::{DistillItem, PpoItem, RolloutItem};

use super::config::TrainConfig;
use crate::data::{pack_best_fit, read_jsonl, Example, Row, SequenceTokenizer, Text, TokenizedSequence, Truncation};
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
    /// A completion labelled desirable or not (KTO).
    Labelled(LabelledItem),
    /// One of the policy's own samples, labelled (NFT).
    Rollout(RolloutItem),
    /// One of the policy's own samples with token advantages (PPO).
    Ppo(PpoItem),
    /// A sequence a distillation objective reads the teacher's distributions on.
    Distill(DistillItem),
}

impl Item {
    /// Completion tokens that count for token-mean losses (chosen only, for pairs).
    pub fn loss_tokens(&self) -> usize {
        match self {
            Item::Sequence(s) => s.completion_tokens(),
            Item::Packed(seqs) => seqs.iter().map(|s| s.completion_tokens()).sum(),
            Item::Pair(p) => p.chosen.completion_tokens(),
            Item::Labelled(l) => l.sequence.completion_tokens(),
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
            Item::Labelled(l) => l.sequence.ids.len(),
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
    // Preference rows split for an unpaired objective, laid out after the other rows.
    let mut split = Vec::new();
    for row in &data.rows {
        let at = || format!("{}:{}", path.display(), row.line);
        let (item, second) =
            items_of_row(&tok, objective, cfg.run.seed, row, reward_judge.is_some()).with_context(at)?;
        for item in std::iter::once(&item).chain(second.as_ref()) {
            if item.loss_tokens() == 0 {
                bail!("{}: no completion tokens left after truncation (raise `data.max_length`)", at());
            }
        }
        match second {
            Some(undesirable) => split.push((item, undesirable)),
            None => items.push(item),
        }
    }
    items.extend(labelled::interleave(split));
    if let Some(judge) = reward_judge {
        pairs::judge_missing_rewards(judge, &data.rows, &mut items)
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

/// The item of a row, and a second one when an unpaired objective splits a preference row.
fn items_of_row(
    tok: &SequenceTokenizer,
    objective: &Objective,
    seed: u64,
    row: &Row,
    judged: bool,
) -> Result<(Item, Option<Item>)> {
    let name = objective.name();
    let need = objective.data_need();
    let item = match (need, &row.example) {
        (DataNeed::Unpaired, _) => return labelled::items_of_row(tok, name, row),
        (DataNeed::Rollouts | DataNeed::TokenRewards | DataNeed::TeacherRollouts | DataNeed::GroupRollouts, _) => {
            bail!(
                "objective `{name}` learns from its own samples, not from dataset rows: give prompts with `--prompts`"
            )
        }
        (DataNeed::Pairs | DataNeed::ScoredPairs, Example::Preference { prompt, chosen, rejected }) => {
            Item::Pair(pairs::pair_of_row(tok, objective, row, [prompt, chosen, rejected], judged)?)
        }
        (DataNeed::Hindsight, Example::Preference { prompt, chosen, rejected }) => {
            let feedback = Feedback::Pair { pos: &plain(chosen), neg: &plain(rejected) };
            Item::Sequence(hindsight::sequence(tok, objective, seed, row, prompt, feedback)?)
        }
        (DataNeed::Hindsight, Example::Unpaired { prompt, completion, label }) => {
            let feedback = Feedback::Single { answer: &plain(completion), desirable: *label };
            Item::Sequence(hindsight::sequence(tok, objective, seed, row, prompt, feedback)?)
        }
        (_, Example::Unpaired { .. }) => {
            bail!("field `label`: objective `{name}` cannot learn from unpaired rows (a single completion with a label); objectives that can: {}", unpaired_objectives())
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
    };
    Ok((item, None))
}

/// The objectives that accept unpaired (`label`) rows, from the registry, for error messages.
fn unpaired_objectives() -> String {
    let unpaired = |name: &str| {
        Objective::default_for(name).is_ok_and(|o| matches!(o.data_need(), DataNeed::Hindsight | DataNeed::Unpaired))
    };
    Objective::NAMES.iter().map(|(name, _)| *name).filter(|n| unpaired(n)).collect::<Vec<_>>().join(", ")
}

/// A completion's text: the string, or its messages' contents one per line.
pub(super) fn plain(t: &Text) -> String {
    match t {
        Text::Plain(s) => s.clone(),
        Text::Chat(messages) => messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n"),
    }
}

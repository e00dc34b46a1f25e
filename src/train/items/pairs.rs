//! Preference-pair items: both completions tokenized, with the columns the objective reads
//! (`reward_chosen`/`reward_rejected`, `margin`) and SPO's key-content-removed variants.

use anyhow::{anyhow, bail, Result};
use candor_alignment::objectives::spo;
use candor_alignment::{DataNeed, Objective};
use serde_json::Value;

use super::{plain, Item};
use crate::data::{Example, Row, SequenceTokenizer, Text, TokenizedSequence};

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
    /// Whether the chosen sequence's prompt tokens are scored too (ORPO's NLL).
    pub score_prompt: bool,
}

impl PairItem {
    /// A pair with nothing beyond its two sequences.
    pub fn new(chosen: TokenizedSequence, rejected: TokenizedSequence) -> Self {
        Self {
            chosen,
            rejected,
            reference: None,
            previous: None,
            rewards: None,
            margin: None,
            variants: Vec::new(),
            score_prompt: false,
        }
    }
}

/// The pair of a preference row (`[prompt, chosen, rejected]`); `judged`: the rewards the row
/// lacks come from a judge afterwards.
pub(super) fn pair_of_row(
    tok: &SequenceTokenizer,
    objective: &Objective,
    row: &Row,
    [prompt, chosen, rejected]: [&Text; 3],
    judged: bool,
) -> Result<PairItem> {
    let mut pair = PairItem::new(tok.prompt_completion(prompt, chosen)?, tok.prompt_completion(prompt, rejected)?);
    // Columns the objective does not read are ignored, as TRL ignores them.
    let needs_rewards = objective.needs_pair_rewards();
    pair.rewards = if needs_rewards || judged { pair_rewards(row, needs_rewards && !judged)? } else { None };
    pair.score_prompt = objective.spec().prompt_nll;
    let scored = objective.data_need() == DataNeed::ScoredPairs;
    pair.margin = if scored { number_field(row, "margin")? } else { None };
    if let Some(degrees) = objective.degree_heads().map(|h| h.classes) {
        for (head, completion) in [chosen, rejected].into_iter().enumerate() {
            for k in 0..degrees {
                let variant = map_text(completion, |t| spo::remove_key_content(t, k, degrees));
                pair.variants.push((tok.prompt_completion(prompt, &variant)?, k as u32, head as u32));
            }
        }
    }
    Ok(pair)
}

/// Fill the rewards of pairs whose rows have none with `judge`'s pointwise scores.
pub(super) fn judge_missing_rewards(judge: &dyn crate::judge::Judge, rows: &[Row], items: &mut [Item]) -> Result<()> {
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

//! Judged rollouts, as NFT, KDRL and GRPO record them: each sample with π_old's per-token
//! log-probs and its label, for KDRL and GRPO the group advantage, and the teacher's (KDRL) or
//! the reference's (GRPO) log-probs.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::RoundData;
use crate::train::items::{Item, RolloutItem};

/// A labelled sample with π_old's per-token log-probs.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RoundRollout {
    /// The round's prompt (index into the round's prompts).
    pub prompt: usize,
    /// The sample (index into the prompt's pool).
    pub sample: usize,
    /// π_old's log-prob of each answer token.
    pub old_logps: Vec<f32>,
    /// The share of the prompt's samples the verifier accepted.
    pub accuracy: f32,
    /// Whether the verifier accepted this one.
    pub correct: bool,
    /// KDRL: the group-normalised advantage.
    #[serde(default)]
    pub advantage: f32,
    /// KDRL: the teacher's log-prob of each answer token.
    #[serde(default)]
    pub teacher_logps: Vec<f32>,
    /// KDRL: whether the KD term applies (reward-guided masking).
    #[serde(default)]
    pub kd: bool,
    /// GRPO: the reference's log-prob of each answer token (empty without a KL term).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reference_logps: Vec<f32>,
    /// GRPO: the sampler's token budget (`online.max_new_tokens`).
    #[serde(default)]
    pub max_tokens: usize,
}

/// The records' key in the round data.
pub const KEY: &str = "rollouts";

/// The training items of a round's rollouts.
pub fn items(data: &RoundData, prompt_ids: &[Vec<u32>]) -> Result<Vec<Item>> {
    let rollouts: Vec<RoundRollout> = data.record(KEY)?;
    Ok(rollouts
        .into_iter()
        .map(|r| {
            Item::Rollout(RolloutItem {
                sequence: data.sequence(prompt_ids, r.prompt, r.sample),
                old_logps: r.old_logps,
                accuracy: r.accuracy,
                correct: r.correct,
                advantage: r.advantage,
                teacher_logps: r.teacher_logps,
                kd: r.kd,
                reference_logps: r.reference_logps,
                max_tokens: r.max_tokens,
            })
        })
        .collect())
}

/// `questions_kept`: the prompts whose samples carry a signal.
pub fn summarize(data: &RoundData, line: &mut Map<String, Value>) -> Result<()> {
    let rollouts: Vec<RoundRollout> = data.record(KEY)?;
    let kept: std::collections::BTreeSet<usize> = rollouts.iter().map(|r| r.prompt).collect();
    line.insert("questions_kept".into(), kept.len().into());
    Ok(())
}

//! Items of sampled or distilled sequences: the policy's own samples with what NFT, KDRL, GRPO
//! and PPO need of them, and distillation sequences.

use crate::data::TokenizedSequence;

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
    /// GRPO: the reference's log-prob of each answer token (empty without a KL term).
    pub reference_logps: Vec<f32>,
    /// GRPO: the sampler's token budget (Dr. GRPO's normaliser).
    pub max_tokens: usize,
}

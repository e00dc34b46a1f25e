//! One file per objective; the shared input and output types live here.

pub mod dpo;

use candle::Tensor;

/// Per-sequence summed completion log-probs of a batch of preference pairs, all `[B]`.
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// log π(y_w | x) of the policy (carries the gradient).
    pub policy_chosen: Tensor,
    /// log π(y_l | x) of the policy.
    pub policy_rejected: Tensor,
    /// log π_ref(y_w | x), detached; zeros for reference-free objectives.
    pub reference_chosen: Tensor,
    /// log π_ref(y_l | x), detached.
    pub reference_rejected: Tensor,
    /// Completion tokens of each chosen sequence (f32).
    pub chosen_tokens: Tensor,
    /// Completion tokens of each rejected sequence (f32).
    pub rejected_tokens: Tensor,
}

/// What an objective returns: per-example losses (the caller reduces) and implicit rewards.
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    /// `[B]` loss of each example.
    pub per_example: Tensor,
    /// `[B]` implicit reward of each chosen completion (detached).
    pub chosen_rewards: Tensor,
    /// `[B]` implicit reward of each rejected completion (detached).
    pub rejected_rewards: Tensor,
}

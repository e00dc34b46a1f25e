//! One file per objective; the shared input and output types live here.
//!
//! Every loss is returned already divided by the size of the whole optimizer step
//! ([`StepScale`]), and every metric likewise, so the training loop only *adds* the
//! contributions of its micro-batches: gradient accumulation then gives exactly the loss of
//! the full batch (TRL's `num_items_in_batch` for token means).

pub mod copg;
pub mod dac_kl;
pub mod dno;
pub mod dpo;
pub mod grpo;
pub mod hindsight;
pub mod inpo;
pub mod kd;
pub mod kdrl;
pub mod kto;
pub mod nft;
pub mod orpo;
pub mod rdpo;
pub mod reward;
pub mod rpo;
pub mod sft;
pub mod simpo;
pub mod sinkd;
pub mod spo;
pub mod text2grad;

use candle::{Tensor, D};

use crate::Result;

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
    /// Scalar rewards `([B], [B])` of the chosen and rejected completions, from the rows'
    /// `reward_chosen` / `reward_rejected` (CoPG); `None` when the data has none.
    pub rewards: Option<(Tensor, Tensor)>,
    /// SPO's corrupted variants and classification heads; `None` for other objectives.
    pub degrees: Option<spo::DegreeBatch>,
    /// The previous iterate's log-probs (INPO); `None` for other objectives.
    pub previous: Option<inpo::PreviousIterate>,
    /// Summed log-probs `[B]` of the chosen rows' prompt tokens (with gradient) and their counts
    /// `[B]`, for an NLL over whole chosen sequences (ORPO, as TRL); `None` for other objectives.
    pub chosen_prompt: Option<(Tensor, Tensor)>,
}

/// Scalar scores of a reward model on preference pairs, `[B]` each (with gradient).
#[derive(Debug, Clone)]
pub struct PairScores {
    /// r(x, y_w).
    pub chosen: Tensor,
    /// r(x, y_l).
    pub rejected: Tensor,
    /// The rows' `margin` values (Llama 2's margin loss), when the data has them.
    pub margins: Option<Tensor>,
}

/// Per-sequence summed completion log-probs of single sequences (SFT), `[B]`.
#[derive(Debug, Clone)]
pub struct SequenceLogps {
    /// log π(y | x) of the policy (carries the gradient).
    pub policy: Tensor,
    /// Completion tokens of each sequence (f32).
    pub tokens: Tensor,
    /// Sums and token counts per token class (chain of hindsight); `None` otherwise.
    pub classes: Option<hindsight::ClassLogps>,
}

/// Totals over the whole optimizer step (all micro-batches), by which losses and metrics are
/// divided.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepScale {
    /// Examples (pairs or sequences) in the step.
    pub examples: f64,
    /// Completion tokens in the step (chosen completions only, for pairs).
    pub tokens: f64,
}

impl StepScale {
    /// The scale of a step made of exactly one micro-batch.
    pub fn single(examples: usize, tokens: f64) -> Self {
        Self { examples: examples as f64, tokens }
    }
}

/// What an objective returns for one micro-batch.
#[derive(Debug, Clone)]
pub struct ObjectiveOutput {
    /// Scalar loss contribution (already divided by the step's size).
    pub loss: Tensor,
    /// Named metric contributions (TRL's names), each already divided by the step's size.
    pub metrics: Vec<(String, f64)>,
}

/// Per-pair losses and implicit rewards of the DPO family, before reduction.
#[derive(Debug, Clone)]
pub struct PairLosses {
    /// `[B]` loss of each pair.
    pub per_pair: Tensor,
    /// `[B]` implicit reward of each chosen completion (detached).
    pub chosen_rewards: Tensor,
    /// `[B]` implicit reward of each rejected completion (detached).
    pub rejected_rewards: Tensor,
}

/// An [`AlignError::InvalidConfig`] for `objective`'s `field`.
pub(crate) fn invalid(objective: &'static str, field: &'static str, reason: &str) -> crate::AlignError {
    crate::AlignError::InvalidConfig { objective, field, reason: reason.into() }
}

/// β (every DPO-family objective has one) must be a positive, finite number.
pub(crate) fn check_beta(objective: &'static str, beta: f64) -> Result<()> {
    if beta > 0.0 && beta.is_finite() {
        Ok(())
    } else {
        Err(invalid(objective, "beta", "must be a positive number"))
    }
}

/// The policy's log-ratios to the reference, `(ρ_w, ρ_l)`.
pub(crate) fn log_ratios(x: &PairLogps) -> Result<(Tensor, Tensor)> {
    Ok(((&x.policy_chosen - &x.reference_chosen)?, (&x.policy_rejected - &x.reference_rejected)?))
}

/// Reduce per-pair losses over the step and add TRL's preference metrics.
pub(crate) fn reduce_pairs(x: &PairLogps, pairs: &PairLosses, scale: &StepScale) -> Result<ObjectiveOutput> {
    reduce_pairs_logging(pairs, [&x.policy_chosen, &x.policy_rejected], scale)
}

/// The policy's length-normalised (per-token mean) log-probs `(log π(y_w|x)/|y_w|, log π(y_l|x)/|y_l|)`,
/// SimPO's and ORPO's (TRL's `average_log_prob=True`).
pub(crate) fn mean_token_logps(x: &PairLogps) -> Result<(Tensor, Tensor)> {
    Ok(((&x.policy_chosen / &x.chosen_tokens)?, (&x.policy_rejected / &x.rejected_tokens)?))
}

/// TRL's token-mean NLL of the chosen completions over the step (`nll_loss`), `−Σ log π(y_w|x) / Σ|y_w|`.
pub(crate) fn chosen_nll(x: &PairLogps, scale: &StepScale) -> Result<Tensor> {
    Ok((x.policy_chosen.sum(D::Minus1)?.neg()? / scale.tokens.max(1.0))?)
}

/// The sample standard deviation (Bessel's correction, torch's default); 0 for one value.
pub(crate) fn sample_std(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

/// A detached scalar tensor as `f64` (metrics).
pub(crate) fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.detach().to_dtype(candle::DType::F64)?.sum_all()?.to_scalar::<f64>()?)
}

/// [`reduce_pairs`] with the `logps/chosen` and `logps/rejected` metrics taken from `logps`
/// (length-normalised for SimPO and ORPO, as TRL logs them).
pub(crate) fn reduce_pairs_logging(
    pairs: &PairLosses,
    logps: [&Tensor; 2],
    scale: &StepScale,
) -> Result<ObjectiveOutput> {
    let n = scale.examples;
    let sum = scalar;
    let margins = (&pairs.chosen_rewards - &pairs.rejected_rewards)?;
    let accuracy = margins.gt(0.0)?.to_dtype(candle::DType::F64)?;
    let metrics = vec![
        ("rewards/chosen".to_string(), sum(&pairs.chosen_rewards)? / n),
        ("rewards/rejected".to_string(), sum(&pairs.rejected_rewards)? / n),
        ("rewards/margins".to_string(), sum(&margins)? / n),
        ("rewards/accuracies".to_string(), sum(&accuracy)? / n),
        ("logps/chosen".to_string(), sum(logps[0])? / n),
        ("logps/rejected".to_string(), sum(logps[1])? / n),
    ];
    Ok(ObjectiveOutput { loss: (pairs.per_pair.sum(D::Minus1)? / n)?, metrics })
}

/// A metric of an output by name (NaN when absent), for the objectives' unit tests.
#[cfg(test)]
pub(crate) fn metric(out: &ObjectiveOutput, key: &str) -> f64 {
    out.metrics.iter().find(|(k, _)| k == key).map_or(f64::NAN, |m| m.1)
}

/// One preference pair of scalar log-probs, for the objectives' unit tests:
/// policy chosen/rejected, reference chosen/rejected, and token counts.
#[cfg(test)]
pub(crate) fn one_pair(logps: [f32; 4], tokens: [f32; 2]) -> PairLogps {
    let t = |v: f32| Tensor::new(&[v], &candle::Device::Cpu).expect("scalar tensor");
    PairLogps {
        policy_chosen: t(logps[0]),
        policy_rejected: t(logps[1]),
        reference_chosen: t(logps[2]),
        reference_rejected: t(logps[3]),
        chosen_tokens: t(tokens[0]),
        rejected_tokens: t(tokens[1]),
        rewards: None,
        degrees: None,
        previous: None,
        chosen_prompt: None,
    }
}

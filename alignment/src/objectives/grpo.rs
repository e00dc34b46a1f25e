//! GRPO: group-relative policy optimization on the policy's own judged samples, with TRL's loss
//! types (DAPO, the default; GRPO; Dr. GRPO; BNPO).
//!
//! Shao et al., "DeepSeekMath", arXiv 2402.03300 §4.1; DAPO: Yu et al., arXiv 2503.14476
//! (token-level normalisation, clip-higher); Dr. GRPO: Liu et al., arXiv 2503.20783 (no length or
//! std normalisation); TRL's `GRPOTrainer` (`_compute_loss` and the advantages of
//! `_generate_and_score_completions`, `multi_objective_aggregation="sum_then_normalize"`):
//!
//! ```text
//! r_i = Σ_k w_k r_ik                      (several judges, TRL's reward_weights)
//! A_i = r_i − mean_group(r)               scale_rewards: group → / (std_group(r) + 1e-4)
//!                                                        batch → / (std_all(r) + 1e-4), none → as is
//! ρ_t = π(o_t) / π_old(o_t)
//! ℓ_t = −min(min(ρ_t, δ) A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) + β · ρ_t · k3_t
//! k3_t = e^{ref_t − logπ_t} − (ref_t − logπ_t) − 1    (the ρ_t factor: `use_bias_correction_kl`)
//! grpo:    mean over sequences of each sequence's token mean
//! bnpo:    token mean over the micro-batch
//! dr_grpo: Σ ℓ / (sequences · max_completion_length)
//! dapo:    Σ ℓ / (completion tokens of the whole step)
//! ```
//! std is the sample standard deviation (Bessel), as torch's. Metrics are TRL's: `kl` (mean of
//! the per-token term, ρ-corrected like the loss), `clip_ratio/low_mean`, `high_mean`,
//! `region_mean` (token means), `clip_ratio/low_min` and `high_max` (extremes of the per-sequence
//! means). Under gradient accumulation every per-micro-batch value is weighted by the
//! micro-batch's share of the step, as TRL averages its micro-batches.

use candle::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{invalid, sample_std, scalar, ObjectiveOutput, StepScale};
use crate::Result;

/// How the summed per-token loss is normalised (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoLossType {
    /// Token mean over the whole step (TRL's default).
    #[default]
    Dapo,
    /// Mean over sequences of per-sequence token means (the original GRPO).
    Grpo,
    /// Divided by sequences × `max_completion_length`.
    DrGrpo,
    /// Token mean over each micro-batch.
    Bnpo,
}

/// How advantages are scaled (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// By each group's standard deviation.
    #[default]
    Group,
    /// By the standard deviation of all the round's rewards.
    Batch,
    /// Not scaled (Dr. GRPO).
    None,
}

/// GRPO hyper-parameters (TRL's `GRPOConfig` defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// How the loss is normalised.
    pub loss_type: GrpoLossType,
    /// Weight β of the k3 KL to the reference; 0 loads no reference.
    pub beta: f64,
    /// Lower clip ε_low (and upper, unless `epsilon_high` is set).
    pub epsilon: f64,
    /// Upper clip ε_high (DAPO's clip-higher recommends 0.28).
    pub epsilon_high: Option<f64>,
    /// Two-sided GRPO's cap δ > 1 on the unclipped ratio.
    pub delta: Option<f64>,
    /// How advantages are scaled.
    pub scale_rewards: ScaleRewards,
    /// Multiply the KL term by the ratio ρ (TRL's `use_bias_correction_kl`).
    pub use_bias_correction_kl: bool,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            loss_type: GrpoLossType::Dapo,
            beta: 0.0,
            epsilon: 0.2,
            epsilon_high: None,
            delta: None,
            scale_rewards: ScaleRewards::Group,
            use_bias_correction_kl: true,
        }
    }
}

impl GrpoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta >= 0.0 && self.beta.is_finite()) {
            return Err(invalid("grpo", "beta", "must be a number ≥ 0"));
        }
        if !(0.0..1.0).contains(&self.epsilon) {
            return Err(invalid("grpo", "epsilon", "must lie in [0, 1)"));
        }
        if self.epsilon_high.is_some_and(|e| !(e >= 0.0 && e.is_finite())) {
            return Err(invalid("grpo", "epsilon_high", "must be a number ≥ 0"));
        }
        if self.delta.is_some_and(|d| !(d > 1.0 && d.is_finite())) {
            return Err(invalid("grpo", "delta", "must be a number > 1"));
        }
        Ok(())
    }

    /// The upper clip ε_high.
    pub fn epsilon_high(&self) -> f64 {
        self.epsilon_high.unwrap_or(self.epsilon)
    }
}

/// A round's advantages and TRL's reward metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One per sample, in the rewards' order.
    pub values: Vec<f64>,
    /// `reward`, `reward_std`, `frac_reward_zero_std`.
    pub metrics: Vec<(String, f64)>,
}

/// TRL's advantages of consecutive groups of `group` rewards, with its logged reward metrics.
pub fn advantages(rewards: &[f64], group: usize, scale: ScaleRewards) -> Result<Advantages> {
    if group == 0 || !rewards.len().is_multiple_of(group) {
        return Err(invalid("grpo", "num_generations", "the rewards do not split into groups of that size"));
    }
    let all_std = sample_std(rewards);
    let mut values = Vec::with_capacity(rewards.len());
    let mut zero_std = 0usize;
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let std = if scale == ScaleRewards::Batch { all_std } else { sample_std(g) };
        zero_std += if std.abs() <= 1e-8 { g.len() } else { 0 };
        let divisor = if scale == ScaleRewards::None { 1.0 } else { std + 1e-4 };
        values.extend(g.iter().map(|r| (r - mean) / divisor));
    }
    let n = rewards.len() as f64;
    let metrics = vec![
        ("reward".to_string(), rewards.iter().sum::<f64>() / n),
        ("reward_std".to_string(), all_std),
        ("frac_reward_zero_std".to_string(), zero_std as f64 / n),
    ];
    Ok(Advantages { values, metrics })
}

/// `rewards/<name>/mean` and `rewards/<name>/std` of each judge's raw scores (`parts[i][k]`:
/// sample i, judge k), and the weighted sums `Σ_k w_k parts[i][k]` (TRL's `reward_weights`).
pub fn weighted_rewards(parts: &[Vec<f64>], names: &[String], weights: &[f64]) -> (Vec<f64>, Vec<(String, f64)>) {
    let sums = parts.iter().map(|p| p.iter().zip(weights).map(|(r, w)| r * w).sum()).collect();
    let mut metrics = Vec::new();
    for (k, name) in names.iter().enumerate() {
        let column: Vec<f64> = parts.iter().map(|p| p[k]).collect();
        metrics.push((format!("rewards/{name}/mean"), column.iter().sum::<f64>() / column.len().max(1) as f64));
        metrics.push((format!("rewards/{name}/std"), sample_std(&column)));
    }
    (sums, metrics)
}

/// The completion tokens of a micro-batch of samples, flattened, all `[T]`.
#[derive(Debug, Clone)]
pub struct GrpoTokens {
    /// log π of each sampled token (with gradient).
    pub policy: Tensor,
    /// log π_old, recorded when the sample was scored at the round's start.
    pub old: Tensor,
    /// log π_ref, when β > 0.
    pub reference: Option<Tensor>,
    /// The sample's advantage, repeated over its tokens.
    pub advantages: Tensor,
    /// Completion tokens of each sample, in order (they sum to T).
    pub lengths: Vec<usize>,
    /// The sampler's `max_new_tokens` (Dr. GRPO's constant normaliser).
    pub max_completion_length: usize,
}

/// The GRPO loss of a micro-batch with TRL's metrics.
pub fn loss(t: &GrpoTokens, cfg: &GrpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let (low, high) = (1.0 - cfg.epsilon, 1.0 + cfg.epsilon_high());
    let ratio = (&t.policy - &t.old)?.exp()?;
    let capped = match cfg.delta {
        Some(delta) => ratio.minimum(delta)?,
        None => ratio.clone(),
    };
    let a = &t.advantages;
    let surrogate = (&capped * a)?.minimum(&(ratio.clamp(low, high)? * a)?)?.neg()?;
    let (per_token, kl) = match (&t.reference, cfg.beta > 0.0) {
        (Some(reference), true) => {
            let d = (reference - &t.policy)?;
            let mut k3 = ((d.exp()? - &d)? - 1.0)?;
            if cfg.use_bias_correction_kl {
                k3 = (k3 * &ratio)?;
            }
            ((&surrogate + (&k3 * cfg.beta)?)?, Some(k3))
        }
        (None, true) => return Err(invalid("grpo", "beta", "β > 0 needs the reference's log-probs")),
        _ => (surrogate, None),
    };
    let rows = t.lengths.len() as f64;
    let tokens = t.policy.dim(0)? as f64;
    let share = rows / scale.examples;
    let loss = match cfg.loss_type {
        GrpoLossType::Dapo => (per_token.sum_all()? / scale.tokens.max(1.0))?,
        GrpoLossType::Grpo => (per_sequence(&per_token, &t.lengths, true)?.sum_all()? / scale.examples)?,
        GrpoLossType::Bnpo => (per_token.sum_all()? * (share / tokens.max(1.0)))?,
        GrpoLossType::DrGrpo => (per_token.sum_all()? / (scale.examples * t.max_completion_length.max(1) as f64))?,
    };
    let mut metrics = Vec::new();
    if let Some(kl) = kl {
        metrics.push(("kl".to_string(), scalar(&kl)? / tokens.max(1.0) * share));
    }
    metrics.extend(clip_metrics(&ratio, a, (low, high), &t.lengths, share)?);
    Ok(ObjectiveOutput { loss, metrics })
}

/// Sums `[rows]` of a flat per-token tensor over each sequence's tokens (divided by the length
/// with `mean`).
fn per_sequence(x: &Tensor, lengths: &[usize], mean: bool) -> Result<Tensor> {
    let mut at = 0;
    let mut rows = Vec::with_capacity(lengths.len());
    for &n in lengths {
        let s = x.narrow(0, at, n)?.sum_all()?;
        rows.push(if mean { (s / n.max(1) as f64)? } else { s });
        at += n;
    }
    Ok(Tensor::stack(&rows, 0)?)
}

/// TRL's clip ratios: low (ρ < 1 − ε_low with A < 0), high (ρ > 1 + ε_high with A > 0), either.
fn clip_metrics(
    ratio: &Tensor,
    a: &Tensor,
    (low, high): (f64, f64),
    lengths: &[usize],
    share: f64,
) -> Result<Vec<(String, f64)>> {
    let ratio = ratio.detach();
    let is_low = ratio.lt(low)?.mul(&a.lt(0.0)?)?.to_dtype(DType::F32)?;
    let is_high = ratio.gt(high)?.mul(&a.gt(0.0)?)?.to_dtype(DType::F32)?;
    let region = (&is_low + &is_high)?;
    let tokens = ratio.dim(0)?.max(1) as f64;
    let seq_means = |x: &Tensor| -> Result<Vec<f32>> { Ok(per_sequence(x, lengths, true)?.to_vec1()?) };
    let low_min = seq_means(&is_low)?.into_iter().fold(f32::INFINITY, f32::min);
    let high_max = seq_means(&is_high)?.into_iter().fold(f32::NEG_INFINITY, f32::max);
    Ok(vec![
        ("clip_ratio/low_mean".to_string(), scalar(&is_low)? / tokens * share),
        ("clip_ratio/high_mean".to_string(), scalar(&is_high)? / tokens * share),
        ("clip_ratio/region_mean".to_string(), scalar(&region)? / tokens * share),
        ("clip_ratio/low_min".to_string(), f64::from(low_min) * share),
        ("clip_ratio/high_max".to_string(), f64::from(high_max) * share),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    fn tokens(policy: &[f32], old: &[f32], reference: Option<&[f32]>, adv: &[f32], lengths: &[usize]) -> GrpoTokens {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        GrpoTokens {
            policy: t(policy),
            old: t(old),
            reference: reference.map(t),
            advantages: t(adv),
            lengths: lengths.to_vec(),
            max_completion_length: 4,
        }
    }

    fn value(cfg: &GrpoConfig, x: &GrpoTokens) -> f64 {
        let tokens = x.policy.dim(0).unwrap() as f64;
        loss(x, cfg, &StepScale::single(x.lengths.len(), tokens)).unwrap().loss.to_scalar::<f32>().unwrap() as f64
    }

    #[test]
    fn advantages_follow_trl_for_every_scaling() {
        // Groups (1, 0) and (0.5, 0.5): group std √0.5, batch std of (1, 0, .5, .5) = √(1/6).
        let r = [1.0, 0.0, 0.5, 0.5];
        let g = advantages(&r, 2, ScaleRewards::Group).unwrap();
        let s = 0.5f64.sqrt() + 1e-4;
        assert_eq!(g.values, vec![0.5 / s, -0.5 / s, 0.0, 0.0]);
        assert_eq!(g.metrics[2], ("frac_reward_zero_std".to_string(), 0.5));
        let b = advantages(&r, 2, ScaleRewards::Batch).unwrap();
        let s = (1.0f64 / 6.0).sqrt() + 1e-4;
        assert!((b.values[0] - 0.5 / s).abs() < 1e-12 && b.metrics[2].1 == 0.0);
        assert_eq!(advantages(&r, 2, ScaleRewards::None).unwrap().values, vec![0.5, -0.5, 0.0, 0.0]);
        assert!((g.metrics[1].1 - (1.0f64 / 6.0).sqrt()).abs() < 1e-12);
        assert!(advantages(&r, 3, ScaleRewards::Group).is_err());
    }

    #[test]
    fn weighted_rewards_sum_the_judges() {
        let (sums, m) = weighted_rewards(&[vec![1.0, 0.0], vec![0.0, 1.0]], &["a".into(), "b".into()], &[1.0, 0.5]);
        assert_eq!(sums, vec![1.0, 0.5]);
        assert_eq!(m[0], ("rewards/a/mean".to_string(), 0.5));
        assert!((m[1].1 - 0.5f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn loss_types_normalise_as_trl() {
        // Two sequences of 1 and 3 tokens, ratio 1, advantages +1 and −1: per-token loss −1, +1 ×3.
        let x = tokens(&[-1.0; 4], &[-1.0; 4], None, &[1.0, -1.0, -1.0, -1.0], &[1, 3]);
        let with = |loss_type| GrpoConfig { loss_type, ..Default::default() };
        assert!((value(&with(GrpoLossType::Dapo), &x) - 0.5).abs() < 1e-6); // (−1 + 3) / 4
        assert!((value(&with(GrpoLossType::Grpo), &x) - 0.0).abs() < 1e-6); // (−1 + 1) / 2
        assert!((value(&with(GrpoLossType::Bnpo), &x) - 0.5).abs() < 1e-6);
        assert!((value(&with(GrpoLossType::DrGrpo), &x) - 0.25).abs() < 1e-6); // 2 / (2 · 4)
    }

    #[test]
    fn clipping_kl_and_their_metrics() {
        // ratio 1.5 with A = 1: clipped at 1.2 (high); ratio 0.5 with A = −1: floored at 0.8 (low).
        let x = tokens(&[1.5f32.ln(), 0.5f32.ln()], &[0.0, 0.0], Some(&[0.0, 0.0]), &[1.0, -1.0], &[1, 1]);
        let cfg = GrpoConfig { loss_type: GrpoLossType::Grpo, beta: 0.1, ..Default::default() };
        let out = loss(&x, &cfg, &StepScale::single(2, 2.0)).unwrap();
        // k3 at log π = ln 1.5: e^{−ln 1.5} + ln 1.5 − 1 = 0.072132, times ρ = 1.5 → 0.108198;
        // at ln 0.5: 2 + ln 0.5 − 1 = 0.306853, times 0.5 → 0.153426.
        let (k_a, k_b) = (0.108_198, 0.153_426);
        let want = (-1.2 + 0.1 * k_a + 0.8 + 0.1 * k_b) / 2.0;
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        let m: std::collections::HashMap<_, _> = out.metrics.into_iter().collect();
        assert!((m["kl"] - (k_a + k_b) / 2.0).abs() < 1e-6);
        assert_eq!((m["clip_ratio/low_mean"], m["clip_ratio/high_mean"], m["clip_ratio/region_mean"]), (0.5, 0.5, 1.0));
        assert_eq!((m["clip_ratio/low_min"], m["clip_ratio/high_max"]), (0.0, 1.0));
        // ε_high = 0.6 leaves ratio 1.5 unclipped.
        let wide = GrpoConfig { epsilon_high: Some(0.6), ..cfg.clone() };
        let out = loss(&x, &wide, &StepScale::single(2, 2.0)).unwrap();
        assert!(
            (out.loss.to_scalar::<f32>().unwrap() as f64 - (-1.5 + 0.1 * k_a + 0.8 + 0.1 * k_b) / 2.0).abs() < 1e-6
        );
        assert!(GrpoConfig { delta: Some(1.0), ..Default::default() }.validate().is_err());
    }
}

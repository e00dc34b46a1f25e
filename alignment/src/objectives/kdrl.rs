//! KDRL: GRPO on verifier rewards plus a reverse-KL pull towards a teacher, on the student's own
//! samples, spec §13d.
//!
//! Xu et al., "KDRL: Post-Training Reasoning LLMs via Unified Knowledge Distillation and
//! Reinforcement Learning", arXiv 2506.02208 (no official code):
//!
//! ```text
//! ρ_t = π(o_t) / π_old(o_t),   A_i = (r_i − mean_g r) / (std_g r + 1e-4)   (per group of G)
//! L = Σ_t −min(ρ_t A, clip(ρ_t, 1 − ε_low, 1 + ε_high) A) / N
//!   + β(progress) · Σ_t m_t k(u_t) / N,      u_t = log π_T(o_t) − log π(o_t)
//! k1 = −u,  k2 = u² / 2 (the paper's choice: its gradient is the reverse KL's),
//! k3 = eᵘ − 1 − u (GRPO's estimator: unbiased value, biased gradient)
//! m_t = 0 on every token of a response the verifier rewards (reward-guided masking)
//! ```
//! N is the step's response tokens (token-level mean over the group). Teacher, π_old, advantages
//! and masks are detached; the student's log-prob inside `k` carries the gradient.

use candle::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{invalid, sample_std, ObjectiveOutput, StepScale};
use crate::Result;

/// The KL estimator applied to the sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `−u`.
    K1,
    /// `u² / 2`: the gradient of the reverse KL, unbiased.
    K2,
    /// `eᵘ − 1 − u` (Schulman): unbiased value, biased gradient.
    K3,
}

/// How β moves over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `beta_start` throughout.
    Constant,
    /// Linear from `beta_start` at the first step to `beta_end` at the last.
    Linear,
}

/// Which responses the KD term skips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KdMasking {
    /// KD on every token.
    None,
    /// No KD on responses the verifier rewards (the paper's reward-guided masking).
    CorrectResponses,
}

/// KDRL hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdrlConfig {
    /// Lower clip ε_low of the ratio.
    #[serde(default = "default_clip")]
    pub clip_low: f64,
    /// Upper clip ε_high of the ratio (DAPO's clip-higher raises it).
    #[serde(default = "default_clip")]
    pub clip_high: f64,
    /// The KL estimator.
    #[serde(default = "default_estimator")]
    pub estimator: KlEstimator,
    /// β at the first step.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// β at the last step (linear schedule).
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// How β moves.
    #[serde(default = "default_schedule")]
    pub beta_schedule: BetaSchedule,
    /// Which responses the KD term skips.
    #[serde(default = "default_masking")]
    pub kd_masking: KdMasking,
}

fn default_clip() -> f64 {
    0.2
}
fn default_estimator() -> KlEstimator {
    KlEstimator::K2
}
fn default_beta_start() -> f64 {
    5e-3
}
fn default_beta_end() -> f64 {
    1e-3
}
fn default_schedule() -> BetaSchedule {
    BetaSchedule::Linear
}
fn default_masking() -> KdMasking {
    KdMasking::CorrectResponses
}

impl Default for KdrlConfig {
    fn default() -> Self {
        Self {
            clip_low: default_clip(),
            clip_high: default_clip(),
            estimator: default_estimator(),
            beta_start: default_beta_start(),
            beta_end: default_beta_end(),
            beta_schedule: default_schedule(),
            kd_masking: default_masking(),
        }
    }
}

impl KdrlConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [("clip_low", self.clip_low), ("clip_high", self.clip_high)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid("kdrl", field, "must lie in [0, 1)"));
            }
        }
        for (field, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if v.is_nan() || v < 0.0 {
                return Err(invalid("kdrl", field, "must be a non-negative number"));
            }
        }
        Ok(())
    }

    /// β at `progress` ∈ [0, 1] of training.
    pub fn beta_at(&self, progress: f64) -> f64 {
        match self.beta_schedule {
            BetaSchedule::Constant => self.beta_start,
            BetaSchedule::Linear => self.beta_start + (self.beta_end - self.beta_start) * progress.clamp(0.0, 1.0),
        }
    }

    /// Whether a response's tokens get the KD term.
    pub fn applies_kd(&self, correct: bool) -> bool {
        match self.kd_masking {
            KdMasking::None => true,
            KdMasking::CorrectResponses => !correct,
        }
    }
}

/// GRPO's group-normalized advantages `(r − mean) / (std + 1e-4)`, std with Bessel's correction
/// (TRL's `GRPOTrainer`); a group whose rewards are all equal gets zeros.
pub fn group_advantages(rewards: &[f64]) -> Vec<f64> {
    let n = rewards.len() as f64;
    let mean = rewards.iter().sum::<f64>() / n;
    let std = sample_std(rewards);
    rewards.iter().map(|r| (r - mean) / (std + 1e-4)).collect()
}

/// The response tokens of a micro-batch, flattened over its responses, all `[T]`.
#[derive(Debug, Clone)]
pub struct KdrlTokens {
    /// log π of each sampled token (with gradient).
    pub policy: Tensor,
    /// log π_old recorded when the response was sampled.
    pub old: Tensor,
    /// log π_T of the token under the teacher.
    pub teacher: Tensor,
    /// The response's advantage, repeated over its tokens.
    pub advantages: Tensor,
    /// 1.0 where the KD term applies.
    pub kd_mask: Tensor,
    /// How far training has gone, `step / total` ∈ [0, 1] (β's schedule).
    pub progress: f64,
}

/// The per-token KL estimate `k(u)`, `u = log π_T − log π`.
pub fn kl_estimate(u: &Tensor, estimator: KlEstimator) -> candle::Result<Tensor> {
    match estimator {
        KlEstimator::K1 => u.neg(),
        KlEstimator::K2 => u.sqr()? * 0.5,
        KlEstimator::K3 => (u.exp()? - 1.0)? - u,
    }
}

/// The KDRL loss of a micro-batch with `kdrl/kl` (mean k over all tokens), `kdrl/beta`,
/// `kdrl/kd_fraction` (tokens given the KD term) and `kdrl/clip_fraction`.
pub fn loss(t: &KdrlTokens, cfg: &KdrlConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let n = scale.tokens.max(1.0);
    let ratio = (&t.policy - &t.old)?.exp()?;
    let unclipped = (&ratio * &t.advantages)?;
    let clipped = (ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)? * &t.advantages)?;
    let surrogate = unclipped.minimum(&clipped)?.neg()?;
    let beta = cfg.beta_at(t.progress);
    let k = kl_estimate(&(&t.teacher - &t.policy)?, cfg.estimator)?;
    let kd = (&k * &t.kd_mask)?;
    let loss = ((surrogate.sum_all()? + (kd.sum_all()? * beta)?)? / n)?;
    let sum = |x: &Tensor| -> Result<f64> { Ok(x.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    let clip_hit = unclipped.ne(&clipped)?.to_dtype(DType::F32)?;
    // The scalar metrics are per-token means over the step; β is the same in every micro-batch.
    let share = t.policy.dim(0)? as f64 / n;
    Ok(ObjectiveOutput {
        loss,
        metrics: vec![
            ("kdrl/kl".into(), sum(&k)? / n),
            ("kdrl/beta".into(), beta * share),
            ("kdrl/kd_fraction".into(), sum(&t.kd_mask)? / n),
            ("kdrl/clip_fraction".into(), sum(&clip_hit)? / n),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    fn one(policy: f32, old: f32, teacher: f32, advantage: f32, mask: f32, progress: f64) -> (Var, KdrlTokens) {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&t(policy)).unwrap();
        let x = KdrlTokens {
            policy: var.as_tensor().clone(),
            old: t(old),
            teacher: t(teacher),
            advantages: t(advantage),
            kd_mask: t(mask),
            progress,
        };
        (var, x)
    }

    #[test]
    fn spec_estimators_for_one_token() {
        // log π = −1, log π_T = −1.5: u = −0.5.
        let u = Tensor::new(&[-0.5f32], &Device::Cpu).unwrap();
        let k = |e| kl_estimate(&u, e).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
        assert!((k(KlEstimator::K1) - 0.5).abs() < 1e-7);
        assert!((k(KlEstimator::K2) - 0.125).abs() < 1e-7);
        assert!((k(KlEstimator::K3) - 0.106_531).abs() < 1e-6);
        // With β = 5e-3 the token's k2 contribution is 6.25e-4 (zero advantage, ratio 1).
        let cfg = KdrlConfig { beta_schedule: BetaSchedule::Constant, ..Default::default() };
        let (_, x) = one(-1.0, -1.0, -1.5, 0.0, 1.0, 0.0);
        let l = loss(&x, &cfg, &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap() as f64;
        assert!((l - 6.25e-4).abs() < 1e-9, "{l}");
    }

    #[test]
    fn k2_gradient_is_the_reverse_kl_policy_gradient_and_the_mask_removes_it() {
        // d(β u²/2)/d log π = −β u = 5e-3 · 0.5.
        let cfg = KdrlConfig { beta_schedule: BetaSchedule::Constant, ..Default::default() };
        let grad = |mask: f32| {
            let (v, x) = one(-1.0, -1.0, -1.5, 0.0, mask, 0.0);
            let g = loss(&x, &cfg, &StepScale::single(1, 1.0)).unwrap().loss.backward().unwrap();
            g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0] as f64
        };
        assert!((grad(1.0) - 2.5e-3).abs() < 1e-8);
        assert_eq!(grad(0.0), 0.0);
        assert!(cfg.applies_kd(false) && !cfg.applies_kd(true));
    }

    #[test]
    fn grpo_surrogate_clips_the_ratio_on_the_side_of_the_advantage() {
        let cfg = KdrlConfig { beta_start: 0.0, beta_end: 0.0, ..Default::default() };
        let surrogate = |ratio: f32, a: f32| {
            let (_, x) = one(ratio.ln(), 0.0, 0.0, a, 0.0, 0.0);
            loss(&x, &cfg, &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap()
        };
        assert!((surrogate(1.5, 1.0) - (-1.2)).abs() < 1e-6); // capped at 1 + ε
        assert!((surrogate(0.5, 1.0) - (-0.5)).abs() < 1e-6); // min keeps the smaller gain
        assert!((surrogate(0.5, -1.0) - 0.8).abs() < 1e-6); // negative advantage: floor at 1 − ε
        assert!((surrogate(1.5, -1.0) - 1.5).abs() < 1e-6);
    }

    #[test]
    fn beta_schedule_and_group_advantages() {
        let cfg = KdrlConfig::default();
        assert!((cfg.beta_at(0.0) - 5e-3).abs() < 1e-12 && (cfg.beta_at(1.0) - 1e-3).abs() < 1e-12);
        assert!((cfg.beta_at(0.5) - 3e-3).abs() < 1e-12);
        // Rewards (1, 0, 0, 0): mean 0.25, sample std 0.5.
        let a = group_advantages(&[1.0, 0.0, 0.0, 0.0]);
        assert!((a[0] - 0.75 / 0.5001).abs() < 1e-9 && (a[1] + 0.25 / 0.5001).abs() < 1e-9);
        assert_eq!(group_advantages(&[1.0, 1.0]), vec![0.0, 0.0]);
        assert!(KdrlConfig { clip_low: 1.0, ..Default::default() }.validate().is_err());
    }
}

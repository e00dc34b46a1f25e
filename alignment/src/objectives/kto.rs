//! KTO: Kahneman-Tversky optimization on unpaired desirable and undesirable completions, against a
//! batch-level KL reference point.
//!
//! Ethayarajh et al., "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv
//! 2402.01306, eq. 7-8; TRL's `KTOTrainer` (`loss_type="kto"`):
//!
//! ```text
//! ρ = log π(y|x) − log π_ref(y|x)
//! z₀ = max(0, mean_batch[ log π(y'|x) − log π_ref(y'|x) ])   (detached; y' = mismatched completions)
//! desirable:    λ_D · (1 − σ(β(ρ − z₀)))
//! undesirable:  λ_U · (1 − σ(β(z₀ − ρ)))
//! L = mean over the micro-batch's rows
//! ```
//! The mismatched pairs are TRL's: each row's prompt with the previous row's completion in the
//! same micro-batch, `(x_1, y_n), (x_2, y_1), …, (x_n, y_{n−1})`. Metrics are TRL's: `kl` (z₀),
//! `rewards/chosen` and `logps/chosen` (means over the desirable rows: βρ and the summed
//! log-prob), the same `/rejected`, and `rewards/margins`. Under gradient accumulation each
//! micro-batch's values are weighted by its share of the step, as TRL averages them.

use candle::Tensor;
use serde::{Deserialize, Serialize};

use super::{check_beta, invalid, scalar, ObjectiveOutput, StepScale};
use crate::tensor_ops::sigmoid;
use crate::Result;

/// KTO hyper-parameters (TRL's defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KtoConfig {
    /// Inverse temperature β.
    pub beta: f64,
    /// Weight λ_D of the desirable rows.
    pub desirable_weight: f64,
    /// Weight λ_U of the undesirable rows. The paper keeps λ_D·n_D / (λ_U·n_U) in [1, 4/3].
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0 }
    }
}

impl KtoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_beta("kto", self.beta)?;
        for (field, w) in [("desirable_weight", self.desirable_weight), ("undesirable_weight", self.undesirable_weight)]
        {
            if !(w >= 0.0 && w.is_finite()) {
                return Err(invalid("kto", field, "must be ≥ 0"));
            }
        }
        Ok(())
    }
}

/// Summed completion log-probs of a micro-batch of labelled rows and of their mismatched
/// (KL) sequences, all `[B]`.
#[derive(Debug, Clone)]
pub struct UnpairedLogps {
    /// log π(y|x) of each row (carries the gradient).
    pub policy: Tensor,
    /// log π_ref(y|x), detached.
    pub reference: Tensor,
    /// 1.0 for a desirable row, 0.0 for an undesirable one.
    pub desirable: Tensor,
    /// log π(y'|x) of each row's mismatched sequence (detached).
    pub policy_kl: Tensor,
    /// log π_ref(y'|x).
    pub reference_kl: Tensor,
}

/// The KTO loss of a micro-batch with TRL's metrics.
pub fn loss(x: &UnpairedLogps, cfg: &KtoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let rows = x.policy.dim(0)? as f64;
    let kl = (scalar(&(&x.policy_kl - &x.reference_kl)?)? / rows).max(0.0);
    let rho = (&x.policy - &x.reference)?;
    let desirable = &x.desirable;
    let undesirable = (desirable.ones_like()? - desirable)?;
    // β(ρ − z₀) for desirable rows, β(z₀ − ρ) for undesirable ones: sign = 2d − 1.
    let sign = ((desirable * 2.0)? - 1.0)?;
    let value = sigmoid(&(((&rho - kl)? * &sign)? * cfg.beta)?)?;
    let weight = ((desirable * cfg.desirable_weight)? + (&undesirable * cfg.undesirable_weight)?)?;
    let per_row = ((value.neg()? + 1.0)? * weight)?;
    let share = rows / scale.examples;
    let rewards = (rho.detach() * cfg.beta)?;
    let logps = x.policy.detach();
    let mean_over = |v: &Tensor, mask: &Tensor| -> Result<Option<f64>> {
        let count = scalar(mask)?;
        (count > 0.0).then(|| Ok(scalar(&(v * mask)?)? / count)).transpose()
    };
    let mut metrics = vec![("kl".to_string(), kl * share)];
    let (chosen, rejected) = (mean_over(&rewards, desirable)?, mean_over(&rewards, &undesirable)?);
    for (side, mask, reward) in [("chosen", desirable, chosen), ("rejected", &undesirable, rejected)] {
        if let (Some(r), Some(l)) = (reward, mean_over(&logps, mask)?) {
            metrics.push((format!("rewards/{side}"), r * share));
            metrics.push((format!("logps/{side}"), l * share));
        }
    }
    if let (Some(c), Some(r)) = (chosen, rejected) {
        metrics.push(("rewards/margins".to_string(), (c - r) * share));
    }
    Ok(ObjectiveOutput { loss: (per_row.sum_all()? / scale.examples)?, metrics })
}

#[cfg(test)]
mod tests {
    use super::super::metric;
    use super::*;
    use candle::Device;

    fn rows(policy: &[f32], reference: &[f32], desirable: &[f32], kl: (&[f32], &[f32])) -> UnpairedLogps {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        UnpairedLogps {
            policy: t(policy),
            reference: t(reference),
            desirable: t(desirable),
            policy_kl: t(kl.0),
            reference_kl: t(kl.1),
        }
    }

    #[test]
    fn worked_example_against_the_kl_reference_point() {
        // ρ = (2, −1); the KL rows' log-ratios (1, 0) give z₀ = 0.5.
        let x = rows(&[-8.0, -9.0], &[-10.0, -8.0], &[1.0, 0.0], (&[-4.0, -5.0], &[-5.0, -5.0]));
        let out = loss(&x, &KtoConfig::default(), &StepScale::single(2, 0.0)).unwrap();
        // desirable: 1 − σ(0.1·(2 − 0.5)) = 1 − σ(0.15) = 0.462570;
        // undesirable: 1 − σ(0.1·(0.5 + 1)) = 0.462570; mean = 0.462570.
        assert!((out.loss.to_scalar::<f32>().unwrap() - 0.462_570).abs() < 1e-6);
        assert!((metric(&out, "kl") - 0.5).abs() < 1e-7);
        assert!((metric(&out, "rewards/chosen") - 0.2).abs() < 1e-6);
        assert!((metric(&out, "rewards/rejected") + 0.1).abs() < 1e-6);
        assert!((metric(&out, "rewards/margins") - 0.3).abs() < 1e-6);
        assert!((metric(&out, "logps/rejected") + 9.0).abs() < 1e-6);
    }

    #[test]
    fn negative_kl_is_clamped_and_weights_scale_each_side() {
        let x = rows(&[-8.0, -9.0], &[-10.0, -8.0], &[1.0, 0.0], (&[-6.0, -6.0], &[-5.0, -5.0]));
        let cfg = KtoConfig { desirable_weight: 1.33, undesirable_weight: 0.75, ..Default::default() };
        let out = loss(&x, &cfg, &StepScale::single(2, 0.0)).unwrap();
        assert_eq!(metric(&out, "kl"), 0.0);
        // 1.33·(1 − σ(0.2)) + 0.75·(1 − σ(0.1)), halved.
        let s = |z: f64| 1.0 / (1.0 + (-z).exp());
        let want = (1.33 * (1.0 - s(0.2)) + 0.75 * (1.0 - s(0.1))) / 2.0;
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
    }

    #[test]
    fn a_batch_of_one_side_logs_only_that_side() {
        let x = rows(&[-8.0], &[-10.0], &[0.0], (&[-8.0], &[-10.0]));
        let out = loss(&x, &KtoConfig::default(), &StepScale::single(1, 0.0)).unwrap();
        assert!(metric(&out, "rewards/chosen").is_nan() && metric(&out, "rewards/margins").is_nan());
        assert!((metric(&out, "rewards/rejected") - 0.2).abs() < 1e-6);
        assert!(KtoConfig { undesirable_weight: -1.0, ..Default::default() }.validate().is_err());
    }
}

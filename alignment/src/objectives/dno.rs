//! DNO: Direct Nash Optimization — contrastive learning against the previous iterate π_t.
//!
//! Rosset et al., arXiv 2404.03715 (2024). No official code was found; spec §7.
//!
//! ```text
//! d = β [ log π(y₁)/π_t(y₁) − log π(y₂)/π_t(y₂) ]
//! DNO-Prct (y₁ = y+, y₂ = y−):   L = −log σ(d)
//! soft DNO (q = σ(r_t(y₁) − r_t(y₂))):   L = −[ q log σ(d) + (1 − q) log σ(−d) ]
//! ```
//! The pair's "reference" log-probs are π_t's (refreshed every iteration); `r_t` are the
//! responses' win-rates against π_t's samples, carried as the pair's rewards.

use serde::{Deserialize, Serialize};

use super::{check_beta, invalid, log_ratios, reduce_pairs, ObjectiveOutput, PairLogps, PairLosses, StepScale};
use crate::tensor_ops::log_sigmoid;
use crate::Result;

/// DNO hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnoConfig {
    /// Inverse temperature β.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Soft targets from the pair's win-rates (the theoretical DNO) instead of DNO-Prct's hard
    /// preference.
    #[serde(default)]
    pub soft: bool,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DnoConfig {
    fn default() -> Self {
        Self { beta: default_beta(), soft: false }
    }
}

impl DnoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_beta("dno", self.beta)
    }
}

/// The DNO loss of a micro-batch (`reference_*` hold π_t's log-probs) with TRL's metrics.
pub fn loss(x: &PairLogps, cfg: &DnoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let (rho_1, rho_2) = log_ratios(x)?;
    let d = ((&rho_1 - &rho_2)? * cfg.beta)?;
    let per_pair = if cfg.soft {
        let (r1, r2) = x
            .rewards
            .as_ref()
            .ok_or_else(|| invalid("dno", "soft", "soft targets need the pair's win-rates as rewards"))?;
        let q = crate::tensor_ops::sigmoid(&(r1 - r2)?)?.detach();
        let agree = (log_sigmoid(&d)? * &q)?;
        let disagree = (log_sigmoid(&d.neg()?)? * (q.neg()? + 1.0)?)?;
        (agree + disagree)?.neg()?
    } else {
        log_sigmoid(&d)?.neg()?
    };
    let pairs = PairLosses {
        per_pair,
        chosen_rewards: (rho_1 * cfg.beta)?.detach(),
        rejected_rewards: (rho_2 * cfg.beta)?.detach(),
    };
    reduce_pairs(x, &pairs, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::one_pair;
    use candle::{Device, Tensor};

    fn value(soft: bool) -> f32 {
        let mut x = one_pair([-20.0, -25.0, -20.5, -24.0], [1.0, 1.0]);
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        x.rewards = Some((t(0.8), t(0.3)));
        loss(&x, &DnoConfig { beta: 0.1, soft }, &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn spec_examples() {
        // d = 0.1 · (0.5 + 1.0) = 0.15: −log σ(0.15) = 0.620957.
        assert!((value(false) - 0.620_957).abs() < 1e-5);
        // q = σ(0.5) = 0.622459: −[q log σ(0.15) + (1 − q) log σ(−0.15)] = 0.677588.
        assert!((value(true) - 0.677_588).abs() < 1e-5);
    }
}

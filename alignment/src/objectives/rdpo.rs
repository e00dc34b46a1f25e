//! rDPO: Provably Robust DPO under random preference flips.
//!
//! Chowdhury, Kini, Natarajan, "Provably Robust DPO: Aligning Language Models with Noisy
//! Feedback", arXiv 2403.00409 (ICML 2024), eq. 8; TRL's `loss_type = "robust"`.
//!
//! ```text
//! L = [ −(1−ε)·log σ(β h) + ε·log σ(−β h) ] / (1 − 2ε)
//! ```
//! An unbiased estimate of the clean-label DPO loss when labels flip with probability ε. Unlike
//! cDPO it *subtracts* the flipped term, so a pair's loss can be negative: expected, not clamped.

use serde::{Deserialize, Serialize};

use super::{check_beta, invalid, log_ratios, reduce_pairs, ObjectiveOutput, PairLogps, PairLosses, StepScale};
use crate::tensor_ops::log_sigmoid;
use crate::Result;

/// rDPO hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RdpoConfig {
    /// Inverse temperature β.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Assumed label-flip rate ε ∈ [0, 0.5).
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
}

fn default_beta() -> f64 {
    0.1
}

fn default_epsilon() -> f64 {
    0.1
}

impl Default for RdpoConfig {
    fn default() -> Self {
        Self { beta: default_beta(), epsilon: default_epsilon() }
    }
}

impl RdpoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_beta("rdpo", self.beta)?;
        if !(0.0..0.5).contains(&self.epsilon) {
            return Err(invalid("rdpo", "epsilon", "must be in [0, 0.5) (0.5 divides by zero)"));
        }
        Ok(())
    }
}

/// Per-pair rDPO loss and implicit rewards.
pub fn per_pair(x: &PairLogps, cfg: &RdpoConfig) -> Result<PairLosses> {
    cfg.validate()?;
    let (rho_w, rho_l) = log_ratios(x)?;
    let beta_h = ((&rho_w - &rho_l)? * cfg.beta)?;
    let e = cfg.epsilon;
    let agree = (log_sigmoid(&beta_h)? * -(1.0 - e))?;
    let flipped = (log_sigmoid(&beta_h.neg()?)? * e)?;
    let per_pair = ((agree + flipped)? / (1.0 - 2.0 * e))?;
    Ok(PairLosses {
        per_pair,
        chosen_rewards: (rho_w * cfg.beta)?.detach(),
        rejected_rewards: (rho_l * cfg.beta)?.detach(),
    })
}

/// The rDPO loss of a micro-batch with TRL's metrics.
pub fn loss(x: &PairLogps, cfg: &RdpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    reduce_pairs(x, &per_pair(x, cfg)?, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(pc: f32, pr: f32, rc: f32, rr: f32) -> PairLogps {
        super::super::one_pair([pc, pr, rc, rr], [1.0, 1.0])
    }

    fn first(x: &PairLogps, epsilon: f64) -> f32 {
        per_pair(x, &RdpoConfig { beta: 0.1, epsilon }).unwrap().per_pair.to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn spec_examples() {
        // h = 2, ε = 0.1: (0.9·0.598139 − 0.1·0.798139)/0.8
        assert!((first(&pair(-10.0, -12.0, -11.0, -11.0), 0.1) - 0.573_139).abs() < 1e-5);
        // h = −0.7, ε = 0.2: (0.8·0.728760 − 0.2·0.658760)/0.6
        assert!((first(&pair(-15.0, -14.0, -14.5, -14.2), 0.2) - 0.752_093).abs() < 1e-5);
        // ε = 0 is DPO.
        assert!((first(&pair(-10.0, -12.0, -11.0, -11.0), 0.0) - 0.598_139).abs() < 1e-5);
    }

    #[test]
    fn large_margins_give_negative_losses_unclamped() {
        assert!(first(&pair(0.0, -200.0, 0.0, 0.0), 0.2) < 0.0);
    }

    #[test]
    fn epsilon_one_half_is_rejected() {
        let err = RdpoConfig { beta: 0.1, epsilon: 0.5 }.validate().unwrap_err().to_string();
        assert!(err.contains("`epsilon`"), "{err}");
    }
}

//! CoPG: Contrastive Policy Gradient for pairs of completions with arbitrary scalar rewards.
//!
//! Flet-Berliac et al., "Contrastive Policy Gradient: Aligning LLMs on sequence-level scores in
//! a supervised-friendly fashion", arXiv 2406.19185 (2024). No official code was found; this is
//! the paper's squared form (spec §9):
//!
//! ```text
//! ρ(y) = log π(y|x) − log π_ref(y|x)
//! L = mean_pairs[ ( R(y) − R(y') − β (ρ(y) − ρ(y')) )² ]
//! ```
//! Its gradient is (up to the constant 4β) minus CoPG's update direction, so the minimiser
//! satisfies β(ρ(y) − ρ(y')) = R(y) − R(y') for every pair: the KL-regularised optimum
//! π* ∝ π_ref exp(R/β), off-policy. With R(y_w) − R(y_l) = 1/2 it is β² × IPO (unit test).
//! Pairs with equal rewards are kept: they pull the two log-ratios together.

use candle::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{check_beta, invalid, log_ratios, reduce_pairs, ObjectiveOutput, PairLogps, PairLosses, StepScale};
use crate::Result;

/// CoPG hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopgConfig {
    /// KL-regularisation strength β (in the units of the rewards; the paper sweeps it).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// A pointwise judge (`rm:MODEL`, `verifier:NAME`) that scores both completions of rows
    /// without `reward_chosen` / `reward_rejected`; the loop fills them in before training.
    #[serde(default)]
    pub reward_judge: Option<String>,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for CopgConfig {
    fn default() -> Self {
        Self { beta: default_beta(), reward_judge: None }
    }
}

impl CopgConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_beta("copg", self.beta)
    }
}

/// The CoPG loss of a micro-batch: TRL's preference metrics (implicit rewards β ρ) plus
/// `copg/reward_difference` (mean R(y) − R(y')) and `copg/logratio_difference`
/// (mean β (ρ(y) − ρ(y'))).
pub fn loss(x: &PairLogps, cfg: &CopgConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let (r_first, r_second) = x.rewards.as_ref().ok_or_else(|| {
        invalid("copg", "data", "every row needs `reward_chosen` and `reward_rejected` (or set `reward_judge`)")
    })?;
    let (rho_w, rho_l) = log_ratios(x)?;
    let reward_difference = (r_first - r_second)?;
    let logratio_difference = ((&rho_w - &rho_l)? * cfg.beta)?;
    let per_pair = (&reward_difference - &logratio_difference)?.sqr()?;
    let pairs = PairLosses {
        per_pair,
        chosen_rewards: (rho_w * cfg.beta)?.detach(),
        rejected_rewards: (rho_l * cfg.beta)?.detach(),
    };
    let mut out = reduce_pairs(x, &pairs, scale)?;
    let mean = |t: &Tensor| -> Result<f64> {
        Ok(t.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? / scale.examples)
    };
    out.metrics.push(("copg/reward_difference".into(), mean(&reward_difference)?));
    out.metrics.push(("copg/logratio_difference".into(), mean(&logratio_difference)?));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::dpo::{self, DpoConfig, DpoLossType};
    use crate::objectives::one_pair;
    use candle::Device;

    fn with_rewards(mut x: PairLogps, chosen: f32, rejected: f32) -> PairLogps {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        x.rewards = Some((t(chosen), t(rejected)));
        x
    }

    fn value(x: &PairLogps, beta: f64) -> f32 {
        loss(x, &CopgConfig { beta, reward_judge: None }, &StepScale::single(1, 2.0))
            .unwrap()
            .loss
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn spec_example() {
        // R = 1.0 / 0.2, ρ = 1.0 / −1.0, β = 0.1: (0.8 − 0.2)² = 0.36.
        let x = with_rewards(one_pair([1.0, -1.0, 0.0, 0.0], [1.0, 1.0]), 1.0, 0.2);
        assert!((value(&x, 0.1) - 0.36).abs() < 1e-6);
        // The pair order does not matter.
        let swapped = with_rewards(one_pair([-1.0, 1.0, 0.0, 0.0], [1.0, 1.0]), 0.2, 1.0);
        assert!((value(&swapped, 0.1) - 0.36).abs() < 1e-6);
    }

    #[test]
    fn reduces_to_beta_squared_ipo_when_rewards_differ_by_a_half() {
        // IPO with sequence sums (|y| = 1 so TRL's length normalisation is the identity).
        let logps = [-2.0, -4.0, -3.0, -3.0];
        let x = with_rewards(one_pair(logps, [1.0, 1.0]), 0.5, 0.0);
        let beta = 0.1;
        let ipo_cfg = DpoConfig { beta, loss_type: DpoLossType::Ipo, ..Default::default() };
        let ipo = dpo::loss(&x, &ipo_cfg, &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap();
        assert!((value(&x, beta) - (beta * beta) as f32 * ipo).abs() < 1e-6, "{} vs {}", value(&x, beta), ipo);
        assert!((value(&x, beta) - 0.09).abs() < 1e-6); // (0.5 − 0.1·2)²
    }

    #[test]
    fn rows_without_rewards_are_a_clear_error() {
        let err =
            loss(&one_pair([0.0; 4], [1.0, 1.0]), &CopgConfig::default(), &StepScale::single(1, 1.0)).unwrap_err();
        assert!(err.to_string().contains("reward_chosen"), "{err}");
    }
}

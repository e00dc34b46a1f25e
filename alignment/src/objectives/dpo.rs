//! DPO and its usual loss variants.
//!
//! Rafailov et al., "Direct Preference Optimization", arXiv 2305.18290, eq. 7; IPO: Azar et al.,
//! arXiv 2310.12036; hinge: SLiC, arXiv 2305.10425; cDPO: Mitchell (2023).
//!
//! ```text
//! ρ_w = log π(y_w|x) − log π_ref(y_w|x),  ρ_l likewise,  h = ρ_w − ρ_l
//! sigmoid: −(1−ε)·log σ(β h) − ε·log σ(−β h)        (ε = label smoothing; ε = 0 is DPO)
//! hinge:   max(0, 1 − β h)
//! ipo:     (h' − 1/(2β))²,  h' = ρ_w/|y_w| − ρ_l/|y_l|  (length-normalised, as TRL does)
//! rewards: r_w = β ρ_w, r_l = β ρ_l (detached)
//! ```
//! Deliberate choice: label smoothing applies to `sigmoid` (classic cDPO, TRL ≤ 0.25); TRL 1.x
//! ignores it there. IPO's rewards use the length-normalised log-ratios, as TRL logs them.

use serde::{Deserialize, Serialize};

use super::{check_beta, invalid, log_ratios, reduce_pairs, ObjectiveOutput, PairLogps, PairLosses, StepScale};
use crate::tensor_ops::log_sigmoid;
use crate::Result;

/// Which DPO loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// −log σ(β h), with optional label smoothing (cDPO).
    #[default]
    Sigmoid,
    /// IPO's squared loss on length-normalised log-ratios.
    Ipo,
    /// SLiC's hinge loss.
    Hinge,
}

/// DPO hyper-parameters (TRL's defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Inverse temperature β (IPO's τ).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Which loss.
    #[serde(default)]
    pub loss_type: DpoLossType,
    /// Conservative DPO's assumed label-flip probability ε ∈ [0, 0.5).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Compare against a uniform reference (π_ref terms are zero).
    #[serde(default)]
    pub reference_free: bool,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self { beta: default_beta(), loss_type: DpoLossType::default(), label_smoothing: 0.0, reference_free: false }
    }
}

impl DpoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_beta("dpo", self.beta)?;
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(invalid("dpo", "label_smoothing", "must be in [0, 0.5)"));
        }
        if self.label_smoothing > 0.0 && self.loss_type != DpoLossType::Sigmoid {
            return Err(invalid("dpo", "label_smoothing", "only applies to loss_type = \"sigmoid\""));
        }
        Ok(())
    }
}

/// The DPO loss of a micro-batch with TRL's metrics.
pub fn loss(x: &PairLogps, cfg: &DpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    reduce_pairs(x, &per_pair(x, cfg)?, scale)
}

/// Per-pair DPO loss and implicit rewards.
pub fn per_pair(x: &PairLogps, cfg: &DpoConfig) -> Result<PairLosses> {
    cfg.validate()?;
    let (mut rho_w, mut rho_l) =
        if cfg.reference_free { (x.policy_chosen.clone(), x.policy_rejected.clone()) } else { log_ratios(x)? };
    if cfg.loss_type == DpoLossType::Ipo {
        rho_w = (rho_w / &x.chosen_tokens)?;
        rho_l = (rho_l / &x.rejected_tokens)?;
    }
    let h = (&rho_w - &rho_l)?;
    let beta_h = (&h * cfg.beta)?;
    let per_example = match cfg.loss_type {
        DpoLossType::Sigmoid => {
            let e = cfg.label_smoothing;
            let agree = (log_sigmoid(&beta_h)? * -(1.0 - e))?;
            if e > 0.0 {
                (agree - (log_sigmoid(&beta_h.neg()?)? * e)?)?
            } else {
                agree
            }
        }
        DpoLossType::Hinge => (beta_h.neg()? + 1.0)?.relu()?,
        DpoLossType::Ipo => (h - 1.0 / (2.0 * cfg.beta))?.sqr()?,
    };
    Ok(PairLosses {
        per_pair: per_example,
        chosen_rewards: (rho_w * cfg.beta)?.detach(),
        rejected_rewards: (rho_l * cfg.beta)?.detach(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Tensor};

    fn pair(pc: f32, pr: f32, rc: f32, rr: f32, nc: f32, nr: f32) -> PairLogps {
        super::super::one_pair([pc, pr, rc, rr], [nc, nr])
    }

    fn first(cfg: DpoConfig, x: &PairLogps) -> f32 {
        per_pair(x, &cfg).unwrap().per_pair.to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn spec_example_1_every_variant() {
        // ρ_w = 1, ρ_l = −1, h = 2, β = 0.1 (spec §2, example 1).
        let x = pair(-10.0, -12.0, -11.0, -11.0, 4.0, 5.0);
        let close = |a: f32, b: f32| assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        close(first(DpoConfig::default(), &x), 0.598_139);
        close(first(DpoConfig { loss_type: DpoLossType::Hinge, ..Default::default() }, &x), 0.8);
        // IPO, length-normalised: h' = 1/4 + 1/5 = 0.45; (0.45 − 5)² = 20.7025
        close(first(DpoConfig { loss_type: DpoLossType::Ipo, ..Default::default() }, &x), 20.7025);
        // cDPO ε = 0.1: 0.9·0.598139 + 0.1·0.798139
        close(first(DpoConfig { label_smoothing: 0.1, ..Default::default() }, &x), 0.618_139);
        let out = per_pair(&x, &DpoConfig::default()).unwrap();
        close(out.chosen_rewards.to_vec1::<f32>().unwrap()[0], 0.1);
        close(out.rejected_rewards.to_vec1::<f32>().unwrap()[0], -0.1);
    }

    #[test]
    fn spec_example_2_negative_margin_and_identity() {
        let x = pair(-15.0, -14.0, -14.5, -14.2, 1.0, 1.0);
        assert!((first(DpoConfig::default(), &x) - 0.728_760).abs() < 1e-5);
        // Policy == reference: h = 0 and the loss is ln 2.
        let same = pair(-3.0, -4.0, -3.0, -4.0, 1.0, 1.0);
        assert!((first(DpoConfig::default(), &same) - std::f32::consts::LN_2).abs() < 1e-6);
    }

    #[test]
    fn loss_is_divided_by_the_step_and_metrics_use_trl_names() {
        // Two pairs in a step of four: the contribution is half the mean.
        let t = |v: [f32; 2]| Tensor::new(&v, &Device::Cpu).unwrap();
        let x = PairLogps {
            policy_chosen: t([-10.0, -15.0]),
            policy_rejected: t([-12.0, -14.0]),
            reference_chosen: t([-11.0, -14.5]),
            reference_rejected: t([-11.0, -14.2]),
            chosen_tokens: t([1.0, 1.0]),
            rejected_tokens: t([1.0, 1.0]),
            rewards: None,
            degrees: None,
            previous: None,
            chosen_prompt: None,
        };
        let out = loss(&x, &DpoConfig::default(), &StepScale { examples: 4.0, tokens: 2.0 }).unwrap();
        let l = out.loss.to_scalar::<f32>().unwrap();
        assert!((l - (0.598_139 + 0.728_760) / 4.0).abs() < 1e-5, "{l}");
        let m: std::collections::HashMap<_, _> = out.metrics.into_iter().collect();
        // margins: 0.2 and -0.07; one of two pairs is ranked right.
        assert!((m["rewards/margins"] - (0.2 - 0.07) / 4.0).abs() < 1e-6);
        assert!((m["rewards/accuracies"] - 0.25).abs() < 1e-12);
        assert!((m["logps/chosen"] - (-25.0 / 4.0)).abs() < 1e-6);
    }

    #[test]
    fn invalid_hyper_parameters_are_named() {
        let err = DpoConfig { beta: 0.0, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("`beta`"), "{err}");
        let err = DpoConfig { label_smoothing: 0.1, loss_type: DpoLossType::Hinge, ..Default::default() }
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("label_smoothing"), "{err}");
    }
}

//! SimPO: reference-free preference optimization on length-normalised log-probs with a target
//! reward margin.
//!
//! Meng, Xia and Chen, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
//! arXiv 2405.14734, eq. 6; TRL's `CPOTrainer` with `loss_type="simpo"`:
//!
//! ```text
//! r_w = β/|y_w| · log π(y_w|x),   r_l = β/|y_l| · log π(y_l|x)
//! L = −(1−ε)·log σ(r_w − r_l − γ) − ε·log σ(−(r_w − r_l − γ))  +  α · NLL(y_w)
//! ```
//! γ is TRL's `simpo_gamma` (a margin in reward units, so the logit is `β(Δ − γ/β)` exactly as
//! TRL writes it); ε is TRL's label smoothing; α is TRL's `cpo_alpha` (CPO's behaviour-cloning
//! term, the token-mean NLL of the chosen completions). Defaults: β = 2.0 and α = 0 from the
//! paper (pure SimPO; TRL's `CPOConfig` defaults are β = 0.1 and `cpo_alpha` = 1.0, and TRL's
//! docs set `cpo_alpha = 0` for SimPO), γ = 0.5 (TRL's `simpo_gamma`). As in TRL, `nll_loss` is
//! logged as 0 when α = 0, and `logps/*` are the length-normalised log-probs.

use serde::{Deserialize, Serialize};

use super::{
    check_beta, chosen_nll, invalid, mean_token_logps, reduce_pairs_logging, scalar, ObjectiveOutput, PairLogps,
    PairLosses, StepScale,
};
use crate::tensor_ops::log_sigmoid;
use crate::Result;

/// SimPO hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimpoConfig {
    /// Reward scale β (the paper's 2.0; its grid is 2 to 10).
    pub beta: f64,
    /// Target reward margin γ, in reward units (TRL's `simpo_gamma`).
    pub gamma: f64,
    /// Weight α of the NLL on the chosen completions (TRL's `cpo_alpha`; 0 is pure SimPO).
    pub cpo_alpha: f64,
    /// Label smoothing ε ∈ [0, 0.5) (TRL's `label_smoothing`).
    pub label_smoothing: f64,
}

impl Default for SimpoConfig {
    fn default() -> Self {
        Self { beta: 2.0, gamma: 0.5, cpo_alpha: 0.0, label_smoothing: 0.0 }
    }
}

impl SimpoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_beta("simpo", self.beta)?;
        if !self.gamma.is_finite() {
            return Err(invalid("simpo", "gamma", "must be a finite number"));
        }
        if !(self.cpo_alpha >= 0.0 && self.cpo_alpha.is_finite()) {
            return Err(invalid("simpo", "cpo_alpha", "must be ≥ 0"));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(invalid("simpo", "label_smoothing", "must be in [0, 0.5)"));
        }
        Ok(())
    }
}

/// The SimPO loss of a micro-batch with TRL's CPO metrics (`rewards/*`, `logps/*`, `nll_loss`).
pub fn loss(x: &PairLogps, cfg: &SimpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let (mean_w, mean_l) = mean_token_logps(x)?;
    let logits = (((&mean_w - &mean_l)? * cfg.beta)? - cfg.gamma)?;
    let e = cfg.label_smoothing;
    let mut per_pair = (log_sigmoid(&logits)? * -(1.0 - e))?;
    if e > 0.0 {
        per_pair = (per_pair - (log_sigmoid(&logits.neg()?)? * e)?)?;
    }
    let pairs = PairLosses {
        per_pair,
        chosen_rewards: (mean_w.detach() * cfg.beta)?,
        rejected_rewards: (mean_l.detach() * cfg.beta)?,
    };
    let mut out = reduce_pairs_logging(&pairs, [&mean_w, &mean_l], scale)?;
    let nll = if cfg.cpo_alpha > 0.0 { Some(chosen_nll(x, scale)?) } else { None };
    let logged = match &nll {
        Some(nll) => scalar(nll)?,
        None => 0.0,
    };
    out.metrics.push(("nll_loss".into(), logged));
    if let Some(nll) = nll {
        out.loss = (out.loss + (nll * cfg.cpo_alpha)?)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::metric;
    use super::*;

    #[test]
    fn worked_example_length_normalised_margin() {
        // log π(y_w) = −4 over 4 tokens (mean −1), log π(y_l) = −9 over 3 tokens (mean −3);
        // β = 2, γ = 0.5: logit = 2·(−1 + 3) − 0.5 = 3.5, loss = softplus(−3.5) = 0.029750.
        let x = super::super::one_pair([-4.0, -9.0, 0.0, 0.0], [4.0, 3.0]);
        let out = loss(&x, &SimpoConfig::default(), &StepScale::single(1, 4.0)).unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() - 0.029_750).abs() < 1e-6);
        assert!((metric(&out, "rewards/chosen") + 2.0).abs() < 1e-6);
        assert!((metric(&out, "rewards/margins") - 4.0).abs() < 1e-6);
        assert!((metric(&out, "logps/rejected") + 3.0).abs() < 1e-6);
        assert_eq!(metric(&out, "nll_loss"), 0.0, "TRL logs 0 without the NLL term");
        // The reference's log-probs are never read.
        let moved = super::super::one_pair([-4.0, -9.0, -50.0, 7.0], [4.0, 3.0]);
        let same = loss(&moved, &SimpoConfig::default(), &StepScale::single(1, 4.0)).unwrap();
        assert_eq!(same.loss.to_scalar::<f32>().unwrap(), out.loss.to_scalar::<f32>().unwrap());
    }

    #[test]
    fn cpo_alpha_adds_the_token_mean_nll_and_smoothing_mixes_both_sides() {
        let x = super::super::one_pair([-4.0, -9.0, 0.0, 0.0], [4.0, 3.0]);
        let cfg = SimpoConfig { cpo_alpha: 1.0, label_smoothing: 0.1, ..Default::default() };
        let out = loss(&x, &cfg, &StepScale::single(1, 4.0)).unwrap();
        // 0.9·softplus(−3.5) + 0.1·softplus(3.5) + 4/4 = 0.9·0.029750 + 0.1·3.529750 + 1.
        let want = 0.9 * 0.029_750 + 0.1 * 3.529_750 + 1.0;
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        assert!((metric(&out, "nll_loss") - 1.0).abs() < 1e-6);
    }

    #[test]
    fn invalid_hyper_parameters_are_named() {
        let err = SimpoConfig { gamma: f64::NAN, ..Default::default() }.validate().unwrap_err().to_string();
        assert!(err.contains("`gamma`"), "{err}");
        assert!(SimpoConfig { beta: 0.0, ..Default::default() }.validate().is_err());
        assert!(SimpoConfig { cpo_alpha: -1.0, ..Default::default() }.validate().is_err());
    }
}

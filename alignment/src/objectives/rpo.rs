//! RPO: DPO plus a negative log-likelihood term on the chosen completions.
//!
//! Liu et al., "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly an
//! Adversarial Regularizer", arXiv 2405.16436 (NeurIPS 2024); TRL's `rpo_alpha`.
//!
//! ```text
//! L = mean_pairs[ DPO sigmoid loss ] + α · NLL,   NLL = −Σ_b log π(y_w,b|x_b) / Σ_b |y_w,b|
//! ```
//! The NLL is TRL's: a token-level mean over *all* chosen completion tokens of the batch (of the
//! whole optimizer step under gradient accumulation), not a mean of per-sequence means.

use serde::{Deserialize, Serialize};

use super::dpo::{self, DpoConfig};
use super::{chosen_nll, invalid, reduce_pairs, scalar, ObjectiveOutput, PairLogps, StepScale};
use crate::Result;

/// RPO hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RpoConfig {
    /// Inverse temperature β of the DPO term.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Weight α of the NLL term (TRL recommends 1.0).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
}

fn default_beta() -> f64 {
    0.1
}

fn default_alpha() -> f64 {
    1.0
}

impl Default for RpoConfig {
    fn default() -> Self {
        Self { beta: default_beta(), alpha: default_alpha() }
    }
}

impl RpoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if !(self.alpha >= 0.0 && self.alpha.is_finite()) {
            return Err(invalid("rpo", "alpha", "must be ≥ 0"));
        }
        self.dpo().validate()
    }

    fn dpo(&self) -> DpoConfig {
        DpoConfig { beta: self.beta, ..Default::default() }
    }
}

/// The RPO loss of a micro-batch with TRL's metrics plus `nll_loss`.
pub fn loss(x: &PairLogps, cfg: &RpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let mut out = reduce_pairs(x, &dpo::per_pair(x, &cfg.dpo())?, scale)?;
    let nll = chosen_nll(x, scale)?;
    out.metrics.push(("nll_loss".into(), scalar(&nll)?));
    out.loss = (out.loss + (nll * cfg.alpha)?)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_dpo_plus_token_mean_nll() {
        // DPO example 1 (0.598139); chosen token log-probs [−0.5, −1.2, −0.3]: NLL = 2/3.
        let x = super::super::one_pair([-2.0, -4.0, -3.0, -3.0], [3.0, 3.0]);
        let out = loss(&x, &RpoConfig::default(), &StepScale { examples: 1.0, tokens: 3.0 }).unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() - 1.264_81).abs() < 1e-5);
        let nll = out.metrics.iter().find(|(k, _)| k == "nll_loss").unwrap().1;
        assert!((nll - 2.0 / 3.0).abs() < 1e-6);
    }
}

//! INPO: Iterative Nash Policy Optimization — an IPO-style regression toward the online mirror
//! descent step between the previous iterate π_t and the reference.
//!
//! Zhang et al., arXiv 2407.00617 (ICLR 2025). No official code was found; spec §6:
//!
//! ```text
//! h = [log π(y_w) − log π(y_l)] − ητ [log π_ref(y_w) − log π_ref(y_l)] − (1 − ητ) [log π_t(y_w) − log π_t(y_l)]
//! L = mean_pairs (h − η/2)²
//! ```
//! η and τ are kept apart (no silent rescaling to `(h/η − 1/2)²`); the reference and previous
//! iterate coefficients sum to one.

use candle::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{invalid, reduce_pairs, ObjectiveOutput, PairLogps, PairLosses, StepScale};
use crate::Result;

/// INPO hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InpoConfig {
    /// Mirror-descent step size η (the regression target is η/2).
    #[serde(default = "default_eta")]
    pub eta: f64,
    /// KL-to-reference strength τ (0 removes the reference).
    #[serde(default = "default_tau")]
    pub tau: f64,
    /// Whether each completion's log-prob is summed over its tokens or averaged (the scale of
    /// MNPO's code and re-implementations, with η ≈ 7.5e-3 and τ = η/3).
    #[serde(default)]
    pub logps: LogpsReduction,
}

/// How a completion's token log-probs become the one number the loss reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogpsReduction {
    /// Summed over the completion's tokens (TRL's DPO convention).
    #[default]
    Sum,
    /// Averaged over the completion's tokens.
    Mean,
}

fn default_eta() -> f64 {
    1.0
}
fn default_tau() -> f64 {
    0.1
}

impl Default for InpoConfig {
    fn default() -> Self {
        Self { eta: default_eta(), tau: default_tau(), logps: LogpsReduction::Sum }
    }
}

impl InpoConfig {
    /// Reject out-of-range hyper-parameters (ητ must lie in [0, 1]).
    pub fn validate(&self) -> Result<()> {
        if !(self.eta > 0.0 && self.eta.is_finite()) {
            return Err(invalid("inpo", "eta", "must be a positive number"));
        }
        if !(self.tau >= 0.0 && self.eta * self.tau <= 1.0) {
            return Err(invalid("inpo", "tau", "needs 0 ≤ eta·tau ≤ 1"));
        }
        Ok(())
    }
}

/// The previous iterate's log-probs of a pair batch, `([B], [B])`, detached.
#[derive(Debug, Clone)]
pub struct PreviousIterate {
    /// log π_t(y_w | x).
    pub chosen: Tensor,
    /// log π_t(y_l | x).
    pub rejected: Tensor,
}

/// The INPO loss of a micro-batch: TRL's preference metrics (implicit rewards are the policy's
/// log-ratios to the mixed anchor) plus `inpo/h` (mean h) and `inpo/h_positive` (fraction h > 0).
pub fn loss(x: &PairLogps, cfg: &InpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let previous = x
        .previous
        .as_ref()
        .ok_or_else(|| invalid("inpo", "data", "needs the previous iterate's log-probs of every pair"))?;
    let mix = cfg.eta * cfg.tau;
    // Per completion: log π − ητ log π_ref − (1 − ητ) log π_t.
    let anchored = |policy: &Tensor, reference: &Tensor, prev: &Tensor| -> Result<Tensor> {
        Ok(((policy - (reference * mix)?)? - (prev * (1.0 - mix))?)?)
    };
    let mut a_w = anchored(&x.policy_chosen, &x.reference_chosen, &previous.chosen)?;
    let mut a_l = anchored(&x.policy_rejected, &x.reference_rejected, &previous.rejected)?;
    if cfg.logps == LogpsReduction::Mean {
        // The anchor is linear in the three log-probs, so averaging it averages each of them.
        a_w = (a_w / &x.chosen_tokens)?;
        a_l = (a_l / &x.rejected_tokens)?;
    }
    let h = (&a_w - &a_l)?;
    let per_pair = (&h - cfg.eta / 2.0)?.sqr()?;
    let mut out =
        reduce_pairs(x, &PairLosses { per_pair, chosen_rewards: a_w.detach(), rejected_rewards: a_l.detach() }, scale)?;
    let sum = |t: &Tensor| -> Result<f64> { Ok(t.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    out.metrics.push(("inpo/h".into(), sum(&h)? / scale.examples));
    out.metrics.push(("inpo/h_positive".into(), sum(&h.gt(0.0)?)? / scale.examples));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::one_pair;
    use candle::Device;

    fn value_with(reference: [f32; 2], tokens: [f32; 2], cfg: InpoConfig) -> f32 {
        let mut x = one_pair([-10.0, -12.0, reference[0], reference[1]], tokens);
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        x.previous = Some(PreviousIterate { chosen: t(-10.2), rejected: t(-11.6) });
        loss(&x, &cfg, &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap()
    }

    fn value(reference: [f32; 2], eta: f64, tau: f64) -> f32 {
        value_with(reference, [1.0, 1.0], InpoConfig { eta, tau, logps: LogpsReduction::Sum })
    }

    #[test]
    fn spec_examples() {
        // h = 2 − 0.1·0 − 0.9·1.4 = 0.74 → (0.74 − 0.5)² = 0.0576.
        assert!((value([-11.0, -11.0], 1.0, 0.1) - 0.0576).abs() < 1e-5);
        // ητ = 0.1 again, η = 0.2: h = 2 − 0.1·0.7 − 0.9·1.4 = 0.67 → (0.67 − 0.1)² = 0.3249.
        assert!((value([-10.8, -11.5], 0.2, 0.5) - 0.3249).abs() < 1e-5);
    }

    #[test]
    fn mean_logps_divide_each_completion_by_its_tokens() {
        // η = 0.0075, τ = 0.0025 (ητ = 1.875e-5), 4 chosen and 2 rejected tokens:
        // a_w = (0.2 + 0.8·ητ) / 4 = 0.05000375, a_l = (−0.4 − 0.6·ητ) / 2 = −0.200005625,
        // h = 0.250009375 → (h − η/2)² = 0.246259375² = 0.0606437.
        let cfg = InpoConfig { eta: 0.0075, tau: 0.0025, logps: LogpsReduction::Mean };
        let got = value_with([-11.0, -11.0], [4.0, 2.0], cfg) as f64;
        let (mix, prev_w, prev_l) = (0.0075 * 0.0025, -10.2, -11.6);
        let a_w = (-10.0 - mix * -11.0 - (1.0 - mix) * prev_w) / 4.0;
        let a_l = (-12.0 - mix * -11.0 - (1.0 - mix) * prev_l) / 2.0;
        let want = (a_w - a_l - 0.00375f64).powi(2);
        assert!((want - 0.060_643_7).abs() < 1e-6, "{want}");
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }

    #[test]
    fn eta_tau_above_one_is_rejected() {
        assert!(InpoConfig { eta: 2.0, tau: 0.6, logps: LogpsReduction::Sum }
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`tau`"));
    }
}

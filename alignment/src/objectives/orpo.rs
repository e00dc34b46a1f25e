//! ORPO: monolithic preference optimization without a reference model, the NLL of the chosen
//! completions plus λ times a log-odds-ratio term.
//!
//! Hong, Lee and Thorne, "ORPO: Monolithic Preference Optimization without Reference Model",
//! arXiv 2403.07691, eq. 6-7; TRL's `ORPOTrainer.odds_ratio_loss`:
//!
//! ```text
//! p_w = log π(y_w|x) / |y_w|,  p_l likewise            (length-normalised log-probs)
//! log_odds = (p_w − p_l) − (log(1 − e^{p_w}) − log(1 − e^{p_l}))
//! L = NLL(y_w) − λ · mean_pairs[ log σ(log_odds) ]
//! ```
//! NLL is TRL's: the token mean over the whole chosen sequences, prompt tokens included (TRL's
//! ORPO labels every attended token), per micro-batch, each weighted by its share of the step;
//! without the prompts' log-probs (`PairLogps::chosen_prompt`), over the chosen completions. λ is TRL's `beta` (0.1,
//! the paper's value for its 7B models). Metrics are TRL's: `rewards/*` = λ·p (detached),
//! `logps/*` the length-normalised log-probs, `nll_loss`, `log_odds_ratio` = mean log σ(log_odds),
//! `log_odds_chosen` = mean log_odds.

use candle::Tensor;
use serde::{Deserialize, Serialize};

use super::{
    check_beta, chosen_nll, mean_token_logps, reduce_pairs_logging, scalar, ObjectiveOutput, PairLogps, PairLosses,
    StepScale,
};
use crate::tensor_ops::{log1mexp, log_sigmoid};
use crate::Result;

/// ORPO hyper-parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrpoConfig {
    /// Weight λ of the odds-ratio term (TRL's `beta`).
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

impl OrpoConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_beta("orpo", self.beta)
    }
}

/// The ORPO loss of a micro-batch with TRL's metrics.
pub fn loss(x: &PairLogps, cfg: &OrpoConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let (mean_w, mean_l) = mean_token_logps(x)?;
    let log_odds = ((&mean_w - &mean_l)? - (log1mexp(&mean_w)? - log1mexp(&mean_l)?)?)?;
    let ratio = log_sigmoid(&log_odds)?;
    let pairs = PairLosses {
        per_pair: (&ratio * -cfg.beta)?,
        chosen_rewards: (mean_w.detach() * cfg.beta)?,
        rejected_rewards: (mean_l.detach() * cfg.beta)?,
    };
    let mut out = reduce_pairs_logging(&pairs, [&mean_w, &mean_l], scale)?;
    let nll = match &x.chosen_prompt {
        Some(prompt) => sequence_nll(x, prompt, scale)?,
        None => chosen_nll(x, scale)?,
    };
    out.metrics.extend([
        ("nll_loss".to_string(), scalar(&nll)?),
        ("log_odds_ratio".to_string(), scalar(&ratio)? / scale.examples),
        ("log_odds_chosen".to_string(), scalar(&log_odds)? / scale.examples),
    ]);
    out.loss = (out.loss + nll)?;
    Ok(out)
}

/// TRL's ORPO NLL: the token mean over whole chosen sequences (prompt and completion tokens) of
/// the micro-batch, weighted by the micro-batch's share of the step (TRL averages micro-batches).
fn sequence_nll(x: &PairLogps, (prompt_logps, prompt_tokens): &(Tensor, Tensor), scale: &StepScale) -> Result<Tensor> {
    let logps = (x.policy_chosen.sum_all()? + prompt_logps.sum_all()?)?;
    let tokens = scalar(&x.chosen_tokens)? + scalar(prompt_tokens)?;
    let share = x.policy_chosen.dim(0)? as f64 / scale.examples;
    Ok((logps.neg()? * (share / tokens.max(1.0)))?)
}

#[cfg(test)]
mod tests {
    use super::super::metric;
    use super::*;

    #[test]
    fn worked_example_odds_ratio_and_nll() {
        // Means p_w = ln 0.5 (−2.772589 over 4 tokens), p_l = ln 0.2 (−4.828314 over 3 tokens):
        // odds_w = 0.5/0.5 = 1, odds_l = 0.2/0.8 = 0.25, log_odds = ln 4 = 1.386294,
        // log σ(ln 4) = ln 0.8 = −0.223144; NLL = 2.772589/4; L = 0.693147 + 0.1·0.223144.
        let (w, l) = (4.0 * 0.5f32.ln(), 3.0 * 0.2f32.ln());
        let x = super::super::one_pair([w, l, 0.0, 0.0], [4.0, 3.0]);
        let out = loss(&x, &OrpoConfig::default(), &StepScale::single(1, 4.0)).unwrap();
        let want = -0.5f64.ln() + 0.1 * 0.223_144;
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-5);
        assert!((metric(&out, "log_odds_chosen") - 4f64.ln()).abs() < 1e-5);
        assert!((metric(&out, "log_odds_ratio") - 0.8f64.ln()).abs() < 1e-5);
        assert!((metric(&out, "nll_loss") + 0.5f64.ln()).abs() < 1e-6);
        assert!((metric(&out, "rewards/chosen") - 0.1 * 0.5f64.ln()).abs() < 1e-6);
        assert!((metric(&out, "logps/rejected") - 0.2f64.ln()).abs() < 1e-6);
    }

    #[test]
    fn odds_term_gradient_is_finite_for_near_certain_answers() {
        // A mean log-prob of −1e-5 (probability 0.99999) must not produce NaN.
        let v = candle::Var::new(&[-4e-5f32], &candle::Device::Cpu).unwrap();
        let mut x = super::super::one_pair([0.0, -9.0, 0.0, 0.0], [4.0, 3.0]);
        x.policy_chosen = v.as_tensor().clone();
        let out = loss(&x, &OrpoConfig::default(), &StepScale::single(1, 4.0)).unwrap();
        let g = out.loss.backward().unwrap().get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(g.is_finite() && out.loss.to_scalar::<f32>().unwrap().is_finite(), "{g}");
        assert!(OrpoConfig { beta: -1.0 }.validate().is_err());
    }
}

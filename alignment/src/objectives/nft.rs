//! NFT: Negative-aware Fine-Tuning — likelihood on correct answers, and on wrong answers the
//! likelihood of an implicit negative policy built from the trained one.
//!
//! Chen et al., arXiv 2505.18116 (2025); official code NVlabs/NFT (`dp_actor.py`), spec §8:
//!
//! ```text
//! R_t = exp(min(log π − log π_old, 10))                        per token
//! correct answer:  l_t = −log R_t
//! wrong answer:    l_t = −log clampST((1 − r_q R_t) / (1 − r_q), min = ε)
//! weight w(q) = 1 − r_q;  L = Σ_tokens w l_t / C   (the official reduction, C = 1000)
//! ```
//! `r_q` is the question's accuracy over its G samples, clipped to [0.02, 0.98]; questions whose
//! samples are all right or all wrong are dropped ([`question_accuracy`] returns `None`).
//! `clampST` clamps the value but passes the gradient through unclamped.

use candle::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{invalid, ObjectiveOutput, StepScale};
use crate::Result;

/// How token losses are reduced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum NftReduction {
    /// The official code: the token sum divided by a constant.
    TokenSumOverConstant {
        /// The constant (1000 officially).
        constant: f64,
    },
    /// The mean over the step's completion tokens (the paper's description).
    TokenMean,
}

/// NFT hyper-parameters (the official defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftConfig {
    /// Lower clamp ε of the negative ratio (`clamp_negative`, 1.0 officially).
    #[serde(default = "default_eps")]
    pub clamp_negative: f64,
    /// Weight of the negative-answer loss (0 gives rejection-sampling fine-tuning).
    #[serde(default = "default_one")]
    pub neg_weight: f64,
    /// How token losses are reduced.
    #[serde(default = "default_reduction")]
    pub reduction: NftReduction,
}

fn default_eps() -> f64 {
    1.0
}
fn default_one() -> f64 {
    1.0
}
fn default_reduction() -> NftReduction {
    NftReduction::TokenSumOverConstant { constant: 1000.0 }
}

impl Default for NftConfig {
    fn default() -> Self {
        Self { clamp_negative: default_eps(), neg_weight: default_one(), reduction: default_reduction() }
    }
}

impl NftConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if self.clamp_negative.is_nan() || self.clamp_negative <= 0.0 {
            return Err(invalid("nft", "clamp_negative", "must be positive (it keeps the log finite)"));
        }
        if let NftReduction::TokenSumOverConstant { constant } = self.reduction {
            if constant.is_nan() || constant <= 0.0 {
                return Err(invalid("nft", "reduction", "the constant must be positive"));
            }
        }
        Ok(())
    }
}

/// The completion tokens of a micro-batch, flattened over its answers, all `[T]`.
#[derive(Debug, Clone)]
pub struct NftTokens {
    /// log π of each token (with gradient).
    pub policy: Tensor,
    /// log π_old recorded when the answer was sampled.
    pub old: Tensor,
    /// The clipped accuracy r_q of the token's question.
    pub accuracy: Tensor,
    /// 1.0 where the token's answer is correct, 0.0 where it is wrong.
    pub correct: Tensor,
}

/// A question's accuracy over its samples, clipped to [0.02, 0.98]; `None` when every sample
/// is right or every one is wrong (the question carries no signal and is dropped).
pub fn question_accuracy(correct: &[bool]) -> Option<f64> {
    let right = correct.iter().filter(|&&c| c).count();
    (right > 0 && right < correct.len()).then(|| (right as f64 / correct.len() as f64).clamp(0.02, 0.98))
}

/// `x + (max(x, lo) − x).detach()`: the clamped value with the unclamped gradient.
fn clamp_straight_through(x: &Tensor, lo: f64) -> candle::Result<Tensor> {
    x + (x.maximum(lo)? - x)?.detach()
}

/// Per-token weighted losses `w(q) · l_t`, `[T]`.
pub fn token_losses(t: &NftTokens, cfg: &NftConfig) -> Result<Tensor> {
    Ok(token_terms(t, cfg)?.weighted)
}

/// The per-token quantities of NFT, each `[T]`.
struct TokenTerms {
    /// `w(q) · l_t`.
    weighted: Tensor,
    /// R_t.
    ratio: Tensor,
    /// The negative policy's ratio `(1 − r_q R_t) / (1 − r_q)` before the clamp.
    negative_ratio: Tensor,
    /// 1.0 on wrong-answer tokens.
    wrong: Tensor,
}

fn token_terms(t: &NftTokens, cfg: &NftConfig) -> Result<TokenTerms> {
    cfg.validate()?;
    let log_ratio = (&t.policy - &t.old)?.minimum(10.0)?;
    let ratio = log_ratio.exp()?;
    let r = &t.accuracy;
    let negative_ratio = ((r * &ratio)?.neg()? + 1.0)?.broadcast_div(&(r.neg()? + 1.0)?)?;
    let negative = (clamp_straight_through(&negative_ratio, cfg.clamp_negative)?.log()?.neg()? * cfg.neg_weight)?;
    let wrong = (t.correct.neg()? + 1.0)?;
    let per_token = ((log_ratio.neg()? * &t.correct)? + (negative * &wrong)?)?;
    Ok(TokenTerms { weighted: (per_token * (r.neg()? + 1.0)?)?, ratio, negative_ratio, wrong })
}

/// The NFT loss of a micro-batch with `nft/ratio` (mean R over the step's tokens) and
/// `nft/clamped` (wrong-answer tokens at the clamp, as a fraction of the step's tokens).
pub fn loss(t: &NftTokens, cfg: &NftConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    let terms = token_terms(t, cfg)?;
    let divisor = match cfg.reduction {
        NftReduction::TokenSumOverConstant { constant } => constant,
        NftReduction::TokenMean => scale.tokens,
    };
    let loss = (terms.weighted.sum_all()? / divisor)?;
    let sum = |x: &Tensor| -> Result<f64> { Ok(x.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    let clamped = (terms.negative_ratio.lt(cfg.clamp_negative)?.to_dtype(DType::F32)? * &terms.wrong)?;
    let tokens = scale.tokens.max(1.0);
    Ok(ObjectiveOutput {
        loss,
        metrics: vec![
            ("nft/ratio".into(), sum(&terms.ratio)? / tokens),
            ("nft/clamped".into(), sum(&clamped)? / tokens),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Var};

    fn tokens(log_ratio: f32, r: f32, correct: f32) -> (Var, NftTokens) {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let policy = Var::from_tensor(&t(log_ratio)).unwrap();
        let x = NftTokens { policy: policy.as_tensor().clone(), old: t(0.0), accuracy: t(r), correct: t(correct) };
        (policy, x)
    }

    fn one(log_ratio: f32, r: f32, correct: f32, eps: f64) -> f32 {
        let cfg = NftConfig { clamp_negative: eps, ..Default::default() };
        token_losses(&tokens(log_ratio, r, correct).1, &cfg).unwrap().to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn spec_token_examples() {
        let ln = f32::ln;
        // Positive token, R = 1.1, r_q = 0.25: −log 1.1 weighted by 0.75.
        assert!((one(ln(1.1), 0.25, 1.0, 1.0) - (-0.071_482_6)).abs() < 1e-6);
        // Negative token, R = 0.9: z = 1.03333, weighted −0.0245923.
        assert!((one(ln(0.9), 0.25, 0.0, 0.05) - (-0.024_592_3)).abs() < 1e-6);
        // Negative token, R = 1.2: z = 0.93333 < ε = 1 → value 0; with ε = 0.05, 0.0689929 · 0.75.
        assert_eq!(one(ln(1.2), 0.25, 0.0, 1.0), 0.0);
        assert!((one(ln(1.2), 0.25, 0.0, 0.05) - 0.75 * 0.068_992_9).abs() < 1e-6);
    }

    #[test]
    fn negative_gradient_flows_through_the_clamp() {
        // d l / d log R = r R / (1 − r R) = 0.290323 at R = 0.9 (unweighted); times w = 0.75.
        let (v, x) = tokens(0.9f32.ln(), 0.25, 0.0);
        let g = token_losses(&x, &NftConfig { clamp_negative: 0.05, ..Default::default() })
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((d - 0.75 * 0.290_323).abs() < 1e-5, "{d}");
        // Clamped (R = 1.2, ε = 1): the value is 0 but the gradient is the unclamped one, 1/z·dz.
        let (v, x) = tokens(1.2f32.ln(), 0.25, 0.0);
        let g = token_losses(&x, &NftConfig::default()).unwrap().sum_all().unwrap().backward().unwrap();
        let d = g.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        let want = 0.75 * (0.25 * 1.2) / 0.75; // −d/dlogR log(max(z,1)) passes dz/dlogR · 1/1
        assert!((d - want).abs() < 1e-5, "{d} vs {want}");
    }

    #[test]
    fn questions_all_right_or_all_wrong_are_dropped_and_accuracy_is_clipped() {
        assert_eq!(question_accuracy(&[true, true]), None);
        assert_eq!(question_accuracy(&[false, false, false]), None);
        assert_eq!(question_accuracy(&[true, false, false, false]), Some(0.25));
        let mostly: Vec<bool> = (0..100).map(|i| i != 0).collect();
        assert_eq!(question_accuracy(&mostly), Some(0.98));
    }

    #[test]
    fn the_official_reduction_divides_the_token_sum_by_a_constant() {
        let (_, x) = tokens(1.1f32.ln(), 0.25, 1.0);
        let l = loss(&x, &NftConfig::default(), &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap();
        assert!((l - (-0.071_482_6 / 1000.0)).abs() < 1e-9);
        let mean = NftConfig { reduction: NftReduction::TokenMean, ..Default::default() };
        let l = loss(&x, &mean, &StepScale { examples: 1.0, tokens: 2.0 }).unwrap().loss.to_scalar::<f32>().unwrap();
        assert!((l - (-0.071_482_6 / 2.0)).abs() < 1e-7);
    }
}

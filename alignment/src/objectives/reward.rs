//! Reward model: Bradley-Terry loss on the scalar scores of a chosen and a rejected completion.
//!
//! InstructGPT (Ouyang et al., arXiv 2203.02155); margin from Llama 2 (arXiv 2307.09288);
//! centering from Eisenstein et al. 2023 ("Helping or Herding"). Code: TRL `RewardTrainer`.
//!
//! ```text
//! L = mean_pairs[ −log σ(r_w − r_l − m) ] + c · mean_pairs[ (r_w + r_l)² ]
//! ```
//! `m` is the row's `margin` (0 when the data has none); the model must beat it.

use candle::{DType, D};
use serde::{Deserialize, Serialize};

use super::{invalid, ObjectiveOutput, PairScores, StepScale};
use crate::tensor_ops::log_sigmoid;
use crate::Result;

/// Reward-model hyper-parameters (TRL's `RewardConfig`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    /// Weight `c` of the centering term `(r_w + r_l)²` (TRL's `center_rewards_coefficient`;
    /// 0.01 is the usual value when used).
    #[serde(default)]
    pub center_rewards_coefficient: Option<f64>,
}

impl RewardConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        match self.center_rewards_coefficient {
            Some(c) if !(c >= 0.0 && c.is_finite()) => {
                Err(invalid("reward", "center_rewards_coefficient", "must be ≥ 0"))
            }
            _ => Ok(()),
        }
    }
}

/// The Bradley-Terry loss of a micro-batch with TRL's metrics `accuracy` and `margin` and the
/// mean rewards.
pub fn loss(x: &PairScores, cfg: &RewardConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let n = scale.examples;
    let diff = (&x.chosen - &x.rejected)?;
    let shifted = match &x.margins {
        Some(m) => (&diff - m)?,
        None => diff.clone(),
    };
    let mut loss = (log_sigmoid(&shifted)?.neg()?.sum(D::Minus1)? / n)?;
    if let Some(c) = cfg.center_rewards_coefficient.filter(|&c| c > 0.0) {
        let centering = ((&x.chosen + &x.rejected)?.sqr()?.sum(D::Minus1)? * (c / n))?;
        loss = (loss + centering)?;
    }
    let sum =
        |t: &candle::Tensor| -> Result<f64> { Ok(t.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?) };
    let metrics = vec![
        ("accuracy".to_string(), sum(&diff.gt(0.0)?)? / n),
        ("margin".to_string(), sum(&diff)? / n),
        ("rewards/chosen".to_string(), sum(&x.chosen)? / n),
        ("rewards/rejected".to_string(), sum(&x.rejected)? / n),
    ];
    Ok(ObjectiveOutput { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::{Device, Tensor};

    fn scores(w: &[f32], l: &[f32], m: Option<&[f32]>) -> PairScores {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        PairScores { chosen: t(w), rejected: t(l), margins: m.map(t) }
    }

    fn value(x: &PairScores, cfg: &RewardConfig) -> (f32, Vec<(String, f64)>) {
        let out = loss(x, cfg, &StepScale::single(x.chosen.dim(0).unwrap(), 0.0)).unwrap();
        (out.loss.to_scalar::<f32>().unwrap(), out.metrics)
    }

    #[test]
    fn spec_examples_margin_and_centering() {
        let plain = value(&scores(&[1.5], &[0.3], None), &RewardConfig::default()).0;
        assert!((plain - 0.263_282).abs() < 1e-6, "{plain}");
        let margin = value(&scores(&[1.5], &[0.3], Some(&[0.5])), &RewardConfig::default()).0;
        assert!((margin - 0.403_186).abs() < 1e-6, "{margin}");
        let centered = value(&scores(&[1.5], &[0.3], None), &RewardConfig { center_rewards_coefficient: Some(0.01) }).0;
        assert!((centered - (0.263_282 + 0.0324)).abs() < 1e-6, "{centered}");
    }

    #[test]
    fn fixture_scores_give_transformers_bradley_terry_loss() {
        // tests/fixtures/llama-tiny/expected.json, `reward_model` (TRL RewardTrainer's loss).
        let x = scores(&[0.275_725_63, -0.288_600_9, 1.103_740_9], &[-0.008_547_515, 0.002_596_14, 0.516_116_1], None);
        let (l, metrics) = value(&x, &RewardConfig::default());
        assert!((l - 0.617_425_5).abs() < 1e-6, "{l}");
        let get = |k: &str| metrics.iter().find(|(n, _)| n == k).unwrap().1;
        assert!((get("accuracy") - 2.0 / 3.0).abs() < 1e-9);
        let margin = (0.275_725_63 + 0.008_547_515 + (-0.288_600_9 - 0.002_596_14) + (1.103_740_9 - 0.516_116_1)) / 3.0;
        assert!((get("margin") - margin).abs() < 1e-6);
    }
}

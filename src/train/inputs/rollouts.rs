//! The policy's own samples, token by token: NFT's labelled rollouts, KDRL's rollouts with the
//! teacher's log-probs and GRPO's with group advantages.

use anyhow::Result;
use candle::Tensor;
use candor_alignment::objectives::grpo::GrpoTokens;
use candor_alignment::objectives::kdrl::KdrlTokens;
use candor_alignment::objectives::nft::NftTokens;

use super::{of_kind, StepModels};
use crate::data::collate;
use crate::model::CausalLm;
use crate::scoring::completion_token_logps;
use crate::train::items::{Item, RolloutItem};

/// The micro-batch's samples.
pub(super) fn samples<'a>(items: &[&'a Item]) -> Vec<&'a RolloutItem> {
    of_kind(items, |i| if let Item::Rollout(x) = i { Some(x) } else { None })
}

/// A micro-batch of samples, token by token: the policy's log-prob of each answer token (with
/// gradient), π_old's recorded one, and per-answer values repeated over the answer's tokens.
struct SampledTokens<'a> {
    samples: Vec<&'a RolloutItem>,
    policy: Tensor,
    old: Tensor,
}

impl<'a> SampledTokens<'a> {
    /// The samples of `items` under `policy`.
    fn of(policy: &CausalLm, items: &[&'a Item], pad: u32) -> Result<Self> {
        let device = policy.device();
        let samples = samples(items);
        let batch = collate(&samples.iter().map(|r| &r.sequence).collect::<Vec<_>>(), pad, device)?;
        let policy_logps = completion_token_logps(policy, &batch)?;
        let old: Vec<f32> = samples.iter().flat_map(|r| r.old_logps.iter().copied()).collect();
        if old.len() != policy_logps.dim(0)? {
            anyhow::bail!("{} sampling log-probs for {} answer tokens", old.len(), policy_logps.dim(0)?);
        }
        Ok(Self { old: Tensor::new(old, device)?, policy: policy_logps, samples })
    }

    /// `f` of each answer, repeated over its tokens `[T]`.
    fn repeated(&self, f: impl Fn(&RolloutItem) -> f32) -> Result<Tensor> {
        let values: Vec<f32> = self.samples.iter().flat_map(|r| std::iter::repeat_n(f(r), r.old_logps.len())).collect();
        Ok(Tensor::new(values, self.policy.device())?)
    }
}

/// NFT's per-token inputs of a micro-batch of labelled samples.
pub(super) fn labelled_tokens(models: StepModels, items: &[&Item]) -> Result<NftTokens> {
    let t = SampledTokens::of(models.policy, items, models.pad)?;
    Ok(NftTokens {
        accuracy: t.repeated(|r| r.accuracy)?,
        correct: t.repeated(|r| f32::from(u8::from(r.correct)))?,
        policy: t.policy,
        old: t.old,
    })
}

/// KDRL's per-token inputs of a micro-batch of samples scored by the teacher.
pub(super) fn teacher_tokens(models: StepModels, items: &[&Item]) -> Result<KdrlTokens> {
    let t = SampledTokens::of(models.policy, items, models.pad)?;
    let teacher: Vec<f32> = t.samples.iter().flat_map(|r| r.teacher_logps.iter().copied()).collect();
    if teacher.len() != t.policy.dim(0)? {
        anyhow::bail!("{} teacher log-probs for {} answer tokens", teacher.len(), t.policy.dim(0)?);
    }
    Ok(KdrlTokens {
        teacher: Tensor::new(teacher, t.policy.device())?,
        advantages: t.repeated(|r| r.advantage)?,
        kd_mask: t.repeated(|r| f32::from(u8::from(r.kd)))?,
        progress: models.progress,
        policy: t.policy,
        old: t.old,
    })
}

/// GRPO's per-token inputs of a micro-batch of judged samples: advantages, the sampled tokens'
/// old log-probs and, when recorded, the reference's.
pub(super) fn group_tokens(models: StepModels, items: &[&Item]) -> Result<GrpoTokens> {
    let t = SampledTokens::of(models.policy, items, models.pad)?;
    let reference: Vec<f32> = t.samples.iter().flat_map(|r| r.reference_logps.iter().copied()).collect();
    let reference = match reference.len() {
        0 => None,
        n if n == t.policy.dim(0)? => Some(Tensor::new(reference, t.policy.device())?),
        n => anyhow::bail!("{n} reference log-probs for {} answer tokens", t.policy.dim(0)?),
    };
    Ok(GrpoTokens {
        advantages: t.repeated(|r| r.advantage)?,
        lengths: t.samples.iter().map(|r| r.old_logps.len()).collect(),
        max_completion_length: t.samples.iter().map(|r| r.max_tokens).max().unwrap_or(0),
        reference,
        policy: t.policy,
        old: t.old,
    })
}

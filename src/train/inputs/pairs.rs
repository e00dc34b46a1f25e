//! Preference pairs: policy and reference log-probs (the DPO family, CoPG, INPO, DNO), with
//! SPO's pooled variant states, or a reward model's scalar scores of both completions.

use anyhow::Result;
use candle::{Device, Tensor};
use candor_alignment::objectives::inpo::PreviousIterate;
use candor_alignment::objectives::spo::DegreeBatch;
use candor_alignment::{PairLogps, PairScores};

use super::{forward_logps, of_kind, StepModels};
use crate::data::{collate, Batch, TokenizedSequence};
use crate::model::CausalLm;
use crate::train::heads::DEGREE_HEADS;
use crate::train::items::{Item, PairItem};

/// The micro-batch's pairs.
fn pairs<'a>(items: &[&'a Item]) -> Vec<&'a PairItem> {
    of_kind(items, |i| if let Item::Pair(x) = i { Some(x) } else { None })
}

/// TRL's pair layout: chosen rows first, then rejected rows, in one batch.
pub(super) fn pair_batch(items: &[&Item], pad: u32, device: &Device) -> Result<Batch> {
    let (chosen, rejected): (Vec<&TokenizedSequence>, Vec<&TokenizedSequence>) =
        pairs(items).into_iter().map(|p| (&p.chosen, &p.rejected)).unzip();
    Ok(collate(&[chosen, rejected].concat(), pad, device)?)
}

/// A reward model's scores of both completions, with the rows' margins when any has one.
pub(super) fn pair_scores(models: StepModels, items: &[&Item]) -> Result<PairScores> {
    let StepModels { policy, pad, .. } = models;
    let device = policy.device();
    let ps = pairs(items);
    let batch = pair_batch(items, pad, device)?;
    let scores = policy.sequence_scores(&batch.input_ids, Some(&batch.attention_mask))?.squeeze(1)?;
    let b = items.len();
    let margins = match ps.iter().any(|p| p.margin.is_some()) {
        true => Some(Tensor::new(ps.iter().map(|p| p.margin.unwrap_or(0.0)).collect::<Vec<f32>>(), device)?),
        false => None,
    };
    Ok(PairScores { chosen: scores.narrow(0, 0, b)?, rejected: scores.narrow(0, b, b)?, margins })
}

/// Summed policy log-probs of both completions (with gradient), the reference's (precomputed,
/// computed here without gradient, or zeros without a reference) and every extra the pairs
/// carry (rewards, the previous iterate's log-probs, SPO's variants).
pub(super) fn pair_logps(models: StepModels, items: &[&Item]) -> Result<PairLogps> {
    let StepModels { policy, pad, .. } = models;
    let device = policy.device();
    let f32s = |v: Vec<f32>| Tensor::new(v, device);
    let ps = pairs(items);
    let pi = forward_logps(policy, items, pad)?;
    // Per-pair (chosen, rejected) values every pair of the batch has, as two `[B]` tensors.
    let both = |get: &dyn Fn(&PairItem) -> Option<(f32, f32)>| -> Result<Option<(Tensor, Tensor)>> {
        match ps.iter().map(|p| get(p)).collect::<Option<Vec<_>>>() {
            Some(v) => {
                let (c, r): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
                Ok(Some((f32s(c)?, f32s(r)?)))
            }
            None => Ok(None),
        }
    };
    let (reference_chosen, reference_rejected) = match (both(&|p| p.reference)?, models.reference) {
        (Some(cached), _) => cached,
        (None, Some(r)) => {
            let logps = forward_logps(r, items, pad)?;
            (logps[0].detach(), logps[1].detach())
        }
        (None, None) => (pi[0].zeros_like()?, pi[1].zeros_like()?),
    };
    let degrees = match models.head(DEGREE_HEADS) {
        Some(w) => Some(degree_batch(policy, &ps, w, pad)?),
        None => None,
    };
    Ok(PairLogps {
        policy_chosen: pi[0].clone(),
        policy_rejected: pi[1].clone(),
        reference_chosen,
        reference_rejected,
        chosen_tokens: f32s(ps.iter().map(|p| p.chosen.completion_tokens() as f32).collect())?,
        rejected_tokens: f32s(ps.iter().map(|p| p.rejected.completion_tokens() as f32).collect())?,
        rewards: both(&|p| p.rewards)?,
        degrees,
        previous: both(&|p| p.previous)?.map(|(chosen, rejected)| PreviousIterate { chosen, rejected }),
    })
}

/// SPO's variants of the micro-batch, encoded by the policy and pooled at each one's last token.
fn degree_batch(policy: &CausalLm, ps: &[&PairItem], weights: &Tensor, pad: u32) -> Result<DegreeBatch> {
    let device = policy.device();
    let variants: Vec<&(TokenizedSequence, u32, u32)> = ps.iter().flat_map(|p| &p.variants).collect();
    let seqs: Vec<&TokenizedSequence> = variants.iter().map(|v| &v.0).collect();
    let batch = collate(&seqs, pad, device)?;
    let last: Vec<u32> = seqs.iter().map(|s| s.ids.len() as u32 - 1).collect();
    let features = policy.pooled_hidden(&batch.input_ids, Some(&batch.attention_mask), &last)?;
    Ok(DegreeBatch {
        features,
        labels: Tensor::new(variants.iter().map(|v| v.1).collect::<Vec<u32>>(), device)?,
        heads: Tensor::new(variants.iter().map(|v| v.2).collect::<Vec<u32>>(), device)?,
        weights: weights.clone(),
    })
}

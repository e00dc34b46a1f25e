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
use crate::scoring::completion_logps_by_class;
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
    let (pi, chosen_prompt) = match ps.iter().any(|p| p.score_prompt) {
        true => with_chosen_prompts(policy, &ps, pad)?,
        false => (forward_logps(policy, items, pad)?, None),
    };
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
        chosen_prompt,
    })
}

/// Summed log-probs `[B]` of the chosen rows' prompt tokens and their counts `[B]`.
type PromptLogps = (Tensor, Tensor);

/// The policy's summed completion log-probs `[chosen, rejected]` and, from the same forward
/// pass, the summed log-probs of the chosen rows' prompt tokens with their counts.
fn with_chosen_prompts(policy: &CausalLm, ps: &[&PairItem], pad: u32) -> Result<(Vec<Tensor>, Option<PromptLogps>)> {
    // Prompt tokens of the chosen rows become class 2; completions stay class 1.
    let chosen: Vec<TokenizedSequence> = ps
        .iter()
        .map(|p| {
            let mask = p.chosen.completion_mask.iter().map(|&m| if m == 0 { 2 } else { m }).collect();
            TokenizedSequence::new(p.chosen.ids.clone(), mask)
        })
        .collect();
    let rows: Vec<&TokenizedSequence> = chosen.iter().chain(ps.iter().map(|p| &p.rejected)).collect();
    let by_class = completion_logps_by_class(policy, &collate(&rows, pad, policy.device())?, 2)?;
    let b = ps.len();
    let completions = by_class.narrow(1, 0, 1)?.squeeze(1)?;
    let counts: Vec<f32> =
        chosen.iter().map(|s| s.completion_mask.iter().skip(1).filter(|&&m| m == 2).count() as f32).collect();
    let prompts = (by_class.narrow(0, 0, b)?.narrow(1, 1, 1)?.squeeze(1)?, Tensor::new(counts, policy.device())?);
    Ok((vec![completions.narrow(0, 0, b)?, completions.narrow(0, b, b)?], Some(prompts)))
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

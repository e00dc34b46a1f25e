//! Single sequences (SFT, packed rows) and chain of hindsight's class-split sequences.

use anyhow::Result;
use candle::Tensor;
use candor_alignment::objectives::hindsight::ClassLogps;
use candor_alignment::SequenceLogps;

use super::{forward_logps, of_kind, StepModels};
use crate::data::{collate, TokenizedSequence};
use crate::scoring::completion_logps_by_class;
use crate::train::items::Item;

/// The micro-batch's sequences.
pub(super) fn sequences<'a>(items: &[&'a Item]) -> Vec<&'a TokenizedSequence> {
    of_kind(items, |i| if let Item::Sequence(x) = i { Some(x) } else { None })
}

/// Summed completion log-probs of sequences or packed rows, with their token counts.
pub(super) fn sequence_logps(models: StepModels, items: &[&Item]) -> Result<SequenceLogps> {
    let StepModels { policy, pad, .. } = models;
    Ok(SequenceLogps {
        policy: forward_logps(policy, items, pad)?.remove(0),
        tokens: Tensor::new(items.iter().map(|i| i.loss_tokens() as f32).collect::<Vec<f32>>(), policy.device())?,
        classes: None,
    })
}

/// Chain of hindsight: summed log-probs of the positive (class 1) and negative (class 2) answer
/// tokens of each sequence, and their counts.
pub(super) fn class_logps(models: StepModels, items: &[&Item]) -> Result<SequenceLogps> {
    let StepModels { policy, pad, .. } = models;
    let device = policy.device();
    let seqs = sequences(items);
    let by_class = completion_logps_by_class(policy, &collate(&seqs, pad, device)?, 2)?;
    let tokens: Vec<f32> = seqs
        .iter()
        .flat_map(|s| [1u8, 2].map(|c| s.completion_mask.iter().skip(1).filter(|&&m| m == c).count() as f32))
        .collect();
    Ok(SequenceLogps {
        policy: by_class.sum(1)?,
        tokens: Tensor::new(items.iter().map(|i| i.loss_tokens() as f32).collect::<Vec<f32>>(), device)?,
        classes: Some(ClassLogps { sums: by_class, tokens: Tensor::from_vec(tokens, (items.len(), 2), device)? }),
    })
}

//! Labelled completions (KTO): the policy's and the reference's summed log-probs of each row and
//! of its mismatched sequence, the row's prompt with the previous row's completion in the
//! micro-batch (TRL's rotation `(x_1, y_n), (x_2, y_1), …`).

use anyhow::{Context, Result};
use candle::Tensor;
use candor_alignment::objectives::kto::UnpairedLogps;

use super::{forward_logps, of_kind, StepModels};
use crate::data::TokenizedSequence;
use crate::train::items::{Item, LabelledItem};

/// The micro-batch's labelled rows.
pub(super) fn labelled<'a>(items: &[&'a Item]) -> Vec<&'a LabelledItem> {
    of_kind(items, |i| if let Item::Labelled(x) = i { Some(x) } else { None })
}

/// Row i's prompt followed by row i−1's completion (the last row's for the first).
fn mismatched(rows: &[&LabelledItem]) -> Vec<Item> {
    (0..rows.len())
        .map(|i| {
            let (prompt, partner) = (&rows[i].sequence, &rows[(i + rows.len() - 1) % rows.len()].sequence);
            let answer = &partner.ids[partner.prompt_len()..];
            let sequence = TokenizedSequence::prompt_and_answer(&prompt.ids[..prompt.prompt_len()], answer);
            Item::Labelled(LabelledItem { sequence, desirable: rows[i].desirable })
        })
        .collect()
}

/// KTO's inputs: summed log-probs of the rows (the policy's with gradient) and of their
/// mismatched sequences (without), under the policy and the frozen reference.
pub(super) fn unpaired_logps(models: StepModels, items: &[&Item]) -> Result<UnpairedLogps> {
    let StepModels { policy, pad, .. } = models;
    let reference = models.reference.context("kto scores its rows against the frozen reference")?;
    let rows = labelled(items);
    let kl_items = mismatched(&rows);
    let kl_refs: Vec<&Item> = kl_items.iter().collect();
    let frozen = policy.frozen_view();
    let desirable: Vec<f32> = rows.iter().map(|r| f32::from(u8::from(r.desirable))).collect();
    Ok(UnpairedLogps {
        policy: forward_logps(policy, items, pad)?.remove(0),
        reference: forward_logps(reference, items, pad)?.remove(0).detach(),
        desirable: Tensor::new(desirable, policy.device())?,
        policy_kl: forward_logps(&frozen, &kl_refs, pad)?.remove(0).detach(),
        reference_kl: forward_logps(reference, &kl_refs, pad)?.remove(0).detach(),
    })
}

//! Padding tokenized sequences into batch tensors.

use candle::{Device, Result, Tensor};

use super::tokenize::TokenizedSequence;

/// A right-padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[B, T]` token ids (u32), padded with the pad id.
    pub input_ids: Tensor,
    /// `[B, T]` 1 for real tokens, 0 for padding (u32).
    pub attention_mask: Tensor,
    /// `[B, T-1]` f32: `loss_mask[b, t]` weights `log p(ids[b, t+1] | ids[b, ..=t])`; 1 where
    /// token `t+1` is a completion token.
    pub loss_mask: Tensor,
}

/// Right-pad `seqs` with `pad_id` into a [`Batch`] on `device`.
pub fn collate(seqs: &[&TokenizedSequence], pad_id: u32, device: &Device) -> Result<Batch> {
    let b = seqs.len();
    let t = seqs.iter().map(|s| s.ids.len()).max().unwrap_or(0).max(2);
    let mut ids = vec![pad_id; b * t];
    let mut attn = vec![0u32; b * t];
    let mut loss = vec![0f32; b * (t - 1)];
    for (row, s) in seqs.iter().enumerate() {
        ids[row * t..row * t + s.ids.len()].copy_from_slice(&s.ids);
        attn[row * t..row * t + s.ids.len()].fill(1);
        for (i, &m) in s.completion_mask.iter().enumerate().skip(1) {
            loss[row * (t - 1) + i - 1] = f32::from(m);
        }
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(attn, (b, t), device)?,
        loss_mask: Tensor::from_vec(loss, (b, t - 1), device)?,
    })
}

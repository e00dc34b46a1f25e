//! Sequence log-probabilities: the scoring primitive every objective and judge reuses.

use anyhow::{bail, Result};
use candle::{DType, Device, Tensor, D};

use crate::data::{collate, Batch, Example, SequenceTokenizer, TokenizedSequence};
use crate::model::{CausalLm, ForwardOptions};

/// Summed completion log-probs `[B]` of a batch, differentiable with respect to the model's
/// trainable weights.
///
/// Only completion positions reach the LM head: the hidden states of the scored positions are
/// gathered first, so the vocabulary-wide logits, log-softmax and their backward exist for
/// those tokens alone (prompts and padding are most of a preference batch).
pub fn completion_logps(model: &CausalLm, batch: &Batch) -> candle::Result<Tensor> {
    summed_logps(model, batch, None)?.squeeze(1)
}

/// Summed completion log-probs per token class `[B, classes]`: column `c` sums the tokens whose
/// loss-mask value is `c + 1` (chain of hindsight's positive and negative answers).
pub fn completion_logps_by_class(model: &CausalLm, batch: &Batch, classes: usize) -> candle::Result<Tensor> {
    summed_logps(model, batch, Some(classes))
}

/// Log-probs `[N]` of every completion token of a batch, rows in order and positions in order
/// within a row, differentiable (NFT's per-token ratios).
pub fn completion_token_logps(model: &CausalLm, batch: &Batch) -> candle::Result<Tensor> {
    Ok(ScoredTokens::of(batch, None)?.logps_and_hidden(model, batch)?.0)
}

/// [`completion_token_logps`] with the final hidden state `[N, hidden]` at each predicting
/// position (where a value head reads), from the same forward pass.
pub fn completion_token_logps_and_hidden(model: &CausalLm, batch: &Batch) -> candle::Result<(Tensor, Tensor)> {
    ScoredTokens::of(batch, None)?.logps_and_hidden(model, batch)
}

/// Per-token KL(π ‖ π_ref) over the whole vocabulary at every completion position `[N]`
/// (TRL's `kl_penalty = "full"`), without gradient, 256 positions at a time; `p_hidden` are the
/// policy's states from [`completion_token_logps_and_hidden`] on the same batch.
pub fn completion_token_kl(
    policy: &CausalLm,
    p_hidden: &Tensor,
    reference: &CausalLm,
    batch: &Batch,
) -> candle::Result<Tensor> {
    let q_hidden = ScoredTokens::of(batch, None)?.hidden(reference, batch)?;
    let n = p_hidden.dim(0)?;
    let mut parts = Vec::new();
    for start in (0..n).step_by(256) {
        let len = 256.min(n - start);
        let logp =
            candor_alignment::tensor_ops::log_softmax(&policy.lm_logits(&p_hidden.narrow(0, start, len)?.detach())?)?;
        let logq = candor_alignment::tensor_ops::log_softmax(
            &reference.lm_logits(&q_hidden.narrow(0, start, len)?.detach())?,
        )?;
        parts.push((logp.exp()? * (&logp - logq)?)?.sum(D::Minus1)?);
    }
    if parts.is_empty() {
        return Tensor::zeros(0, DType::F32, batch.input_ids.device());
    }
    Tensor::cat(&parts, 0)
}

/// Every completion position of a batch, in [`completion_token_logps`]'s order.
pub struct CompletionStates {
    /// The final hidden state predicting each completion token `[N, H]` (differentiable).
    pub hidden: Tensor,
    /// The token predicted there.
    pub targets: Vec<u32>,
    /// The batch row each position belongs to.
    pub rows: Vec<u32>,
}

/// The final hidden states at every completion position of a batch: one forward pass, the
/// vocabulary-wide head left to the caller (distillation reads whole distributions).
pub fn completion_states(model: &CausalLm, batch: &Batch) -> candle::Result<CompletionStates> {
    let tokens = ScoredTokens::of(batch, None)?;
    let t = batch.input_ids.dim(1)? as u32;
    Ok(CompletionStates {
        hidden: tokens.hidden(model, batch)?,
        rows: tokens.positions.iter().map(|p| p / t).collect(),
        targets: tokens.targets,
    })
}

/// Log-probs `[N, V]` of `model`'s LM head over hidden states `[N, H]`, without gradient,
/// `chunk` rows at a time written into one buffer: the batch's full-vocabulary distribution
/// exists once, plus one chunk's logits.
pub fn chunked_vocab_logps(model: &CausalLm, states: &Tensor, chunk: usize) -> candle::Result<Tensor> {
    let (n, _) = states.dims2()?;
    let v = model.config().vocab_size;
    let mut buffer: Vec<f32> = Vec::with_capacity(n * v);
    for start in (0..n).step_by(chunk.max(1)) {
        let len = chunk.min(n - start);
        let part =
            candor_alignment::tensor_ops::log_softmax(&model.lm_logits(&states.narrow(0, start, len)?.detach())?)?;
        buffer.extend(part.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Tensor::from_vec(buffer, (n, v), states.device())
}

/// The completion tokens of a batch: where each is predicted and what it is.
struct ScoredTokens {
    /// Flat `row * T + position` of the hidden state predicting each token.
    positions: Vec<u32>,
    /// The token predicted there.
    targets: Vec<u32>,
    /// `row * classes + class` the token is summed into.
    owner: Vec<usize>,
}

impl ScoredTokens {
    fn of(batch: &Batch, classes: Option<usize>) -> candle::Result<Self> {
        let (b, t) = batch.input_ids.dims2()?;
        let columns = classes.unwrap_or(1);
        let mask: Vec<f32> = batch.loss_mask.flatten_all()?.to_vec1()?;
        let ids: Vec<u32> = batch.input_ids.flatten_all()?.to_vec1()?;
        let mut out = ScoredTokens { positions: Vec::new(), targets: Vec::new(), owner: Vec::new() };
        for row in 0..b {
            for pos in 0..t - 1 {
                let class = mask[row * (t - 1) + pos] as usize;
                if class != 0 {
                    let column = if classes.is_some() { class - 1 } else { 0 };
                    if column >= columns {
                        candle::bail!("token class {class} in a batch scored with {columns} classes");
                    }
                    out.positions.push((row * t + pos) as u32);
                    out.targets.push(ids[row * t + pos + 1]);
                    out.owner.push(row * columns + column);
                }
            }
        }
        Ok(out)
    }

    /// The hidden states `[N, H]` predicting the tokens.
    fn hidden(&self, model: &CausalLm, batch: &Batch) -> candle::Result<Tensor> {
        let (b, t) = batch.input_ids.dims2()?;
        let device = batch.input_ids.device();
        let h = model.config().hidden_size;
        if self.positions.is_empty() {
            return Tensor::zeros((0, h), DType::F32, device);
        }
        let opts = ForwardOptions { attention_mask: Some(&batch.attention_mask), positions: batch.positions.as_ref() };
        let hidden = model.forward_hidden(&batch.input_ids, opts, None)?;
        hidden.reshape((b * t, h))?.index_select(&Tensor::new(self.positions.as_slice(), device)?, 0)
    }

    /// The tokens' log-probs `[N]` and the hidden states `[N, H]` predicting them: only those
    /// hidden states reach the LM head.
    fn logps_and_hidden(&self, model: &CausalLm, batch: &Batch) -> candle::Result<(Tensor, Tensor)> {
        let scored = self.hidden(model, batch)?;
        if self.positions.is_empty() {
            return Ok((Tensor::zeros(0, DType::F32, scored.device())?, scored));
        }
        Ok((model.target_logps(&scored, &self.targets)?, scored))
    }
}

fn summed_logps(model: &CausalLm, batch: &Batch, classes: Option<usize>) -> candle::Result<Tensor> {
    let (b, _) = batch.input_ids.dims2()?;
    let columns = classes.unwrap_or(1);
    let device = batch.input_ids.device();
    let tokens = ScoredTokens::of(batch, classes)?;
    let n = tokens.positions.len();
    if n == 0 {
        return Tensor::zeros((b, columns), DType::F32, device);
    }
    let logps = tokens.logps_and_hidden(model, batch)?.0; // [N]
    let owner = tokens.owner;
    // Sum each (sequence, class)'s tokens: [B * C, N] membership matrix times the N log-probs.
    let mut membership = vec![0f32; b * columns * n];
    for (i, &cell) in owner.iter().enumerate() {
        membership[cell * n + i] = 1.0;
    }
    let membership = Tensor::from_vec(membership, (b * columns, n), device)?;
    membership.matmul(&logps.reshape((n, 1))?)?.reshape((b, columns))
}

/// The sequences one row is scored on, with the output names TRL uses for them.
pub fn row_sequences(tok: &SequenceTokenizer, example: &Example) -> Result<Vec<(&'static str, TokenizedSequence)>> {
    Ok(match example {
        Example::Preference { prompt, chosen, rejected } => vec![
            ("chosen", tok.prompt_completion(prompt, chosen)?),
            ("rejected", tok.prompt_completion(prompt, rejected)?),
        ],
        Example::PromptCompletion { prompt, completion } | Example::Unpaired { prompt, completion, .. } => {
            vec![("completion", tok.prompt_completion(prompt, completion)?)]
        }
        Example::Conversation { messages } => {
            vec![("completion", tok.conversation(messages, true)?)]
        }
        Example::LanguageModeling { text } => vec![("completion", tok.text(text)?)],
        Example::Prompt { .. } => bail!("a prompt-only row has no completion to score"),
    })
}

/// Summed log-prob and token count of each sequence, in order, `batch_size` sequences per
/// forward pass (no gradient).
pub fn score_sequences(
    model: &CausalLm,
    seqs: &[TokenizedSequence],
    pad_id: u32,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<(f64, usize)>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedSequence> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, device)?;
        let sums = completion_logps(model, &batch)?;
        let sums: Vec<f32> = sums.to_vec1()?;
        out.extend(sums.iter().zip(chunk).map(|(&s, seq)| (s as f64, seq.completion_tokens())));
    }
    Ok(out)
}

/// The reward (one-label score head at the last non-pad token) of each sequence, in order,
/// `batch_size` sequences per forward pass (no gradient).
pub fn score_rewards(model: &CausalLm, seqs: &[TokenizedSequence], pad_id: u32, batch_size: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedSequence> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, model.device())?;
        let scores: Vec<f32> =
            model.sequence_scores(&batch.input_ids, Some(&batch.attention_mask))?.squeeze(1)?.to_vec1()?;
        out.extend(scores.into_iter().map(f64::from));
    }
    Ok(out)
}

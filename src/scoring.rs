//! Sequence log-probabilities: the scoring primitive every objective and judge reuses.

use anyhow::{bail, Result};
use candle::{Device, Tensor, D};

use crate::data::{collate, Batch, Example, SequenceTokenizer, TokenizedSequence};
use crate::model::CausalLm;

/// Summed completion log-probs `[B]` and per-token log-probs `[B, T-1]` (zero off-completion)
/// of a batch. Differentiable with respect to the model's trainable weights.
pub fn completion_logps(model: &CausalLm, batch: &Batch) -> candle::Result<(Tensor, Tensor)> {
    let token = model.token_logps(&batch.input_ids, Some(&batch.attention_mask))?;
    let masked = (token * &batch.loss_mask)?;
    Ok((masked.sum(D::Minus1)?, masked))
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
        Example::Conversation { messages } => vec![("completion", tok.conversation(messages, true)?)],
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
        let (sums, _) = completion_logps(model, &batch)?;
        let sums: Vec<f32> = sums.to_vec1()?;
        out.extend(sums.iter().zip(chunk).map(|(&s, seq)| (s as f64, seq.completion_tokens())));
    }
    Ok(out)
}

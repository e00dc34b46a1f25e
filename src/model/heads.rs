//! The sequence-classification head: a `*ForSequenceClassification` model's score over the
//! hidden state of each row's last token.

use candle::{DType, Result, Tensor};

use super::ops;
use super::transformer::{CausalLm, ForwardOptions};

impl CausalLm {
    /// Sequence-classification scores `[B, num_labels]`, pooled at the last non-pad token of
    /// each row (transformers' rule: the rightmost position whose id is not `pad_token_id`,
    /// or the last position when the model has no pad token).
    pub fn sequence_scores(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let score = self.score.as_ref().ok_or_else(|| {
            candle::Error::Msg("this model has no sequence-classification head (`score.weight`)".into())
        })?;
        let t = ids.dim(1)?;
        let last: Vec<u32> = ids
            .to_vec2::<u32>()?
            .iter()
            .map(|r| match self.config.pad_token_id {
                Some(pad) => r.iter().rposition(|&id| id != pad).unwrap_or(0) as u32,
                None => (t - 1) as u32,
            })
            .collect();
        let pooled = self.pooled_hidden(ids, attention_mask, &last)?;
        ops::linear(&pooled, score, None)?.to_dtype(DType::F32)
    }

    /// Final hidden states `[B, hidden]` at position `last[b]` of each row.
    pub fn pooled_hidden(&self, ids: &Tensor, attention_mask: Option<&Tensor>, last: &[u32]) -> Result<Tensor> {
        let b = ids.dim(0)?;
        let hidden = self.forward_hidden(ids, ForwardOptions { attention_mask, positions: None }, None)?;
        let idx =
            Tensor::from_slice(last, (b, 1, 1), ids.device())?.broadcast_as((b, 1, hidden.dim(2)?))?.contiguous()?;
        hidden.gather(&idx, 1)?.squeeze(1)
    }

    /// Make this causal LM a `*ForSequenceClassification` model: a fresh `[num_labels, hidden]`
    /// score head drawn from N(0, 0.02²) (transformers' `initializer_range`) with `seed`, the
    /// LM head dropped, and `pad_token_id` set where the config has none (pooling needs it).
    pub fn add_score_head(&mut self, num_labels: usize, pad_token_id: u32, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let hidden = self.config.hidden_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid normal");
        let values: Vec<f32> = (0..num_labels * hidden).map(|_| normal.sample(&mut rng)).collect();
        self.score = Some(Tensor::from_vec(values, (num_labels, hidden), self.device())?.to_dtype(self.dtype())?);
        self.lm_head = None;
        self.config.num_labels = Some(num_labels);
        self.config.pad_token_id.get_or_insert(pad_token_id);
        Ok(())
    }
}

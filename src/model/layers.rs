//! Layer cutting: a smaller model of the same family and tokenizer from some of a model's
//! decoder layers (a distillation student).

use super::transformer::{Block, CausalLm};

impl CausalLm {
    /// Keep only the decoder layers `keep` (strictly increasing indices), in order: a smaller
    /// model of the same family and tokenizer (a distillation student). Qwen2's sliding-window
    /// boundary moves with the layers below it, and Gemma 3's global layers keep their type.
    pub fn keep_layers(&mut self, keep: &[usize]) -> anyhow::Result<()> {
        let n = self.layers.len();
        if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep[keep.len() - 1] >= n {
            anyhow::bail!("layers to keep must be strictly increasing indices below {n}, at least one; got {keep:?}");
        }
        self.config.first_sliding_layer = keep.iter().filter(|&&i| i < self.config.first_sliding_layer).count();
        let full = &self.config.full_attention_layers;
        self.config.full_attention_layers =
            keep.iter().enumerate().filter(|(_, i)| full.contains(i)).map(|(j, _)| j).collect();
        let mut all: Vec<Option<Block>> = std::mem::take(&mut self.layers).into_iter().map(Some).collect();
        self.layers = keep.iter().map(|&i| all[i].take().expect("indices are unique")).collect();
        self.config.num_hidden_layers = keep.len();
        Ok(())
    }

    /// `n` evenly spaced layer indices out of `total`, the first and the last included
    /// (`round(i (total − 1) / (n − 1))`).
    pub fn evenly_spaced_layers(total: usize, n: usize) -> anyhow::Result<Vec<usize>> {
        if n == 0 || n > total {
            anyhow::bail!("cannot keep {n} of {total} layers (1 to {total})");
        }
        if n == 1 {
            return Ok(vec![0]);
        }
        Ok((0..n).map(|i| ((i * (total - 1)) as f64 / (n - 1) as f64).round() as usize).collect())
    }
}

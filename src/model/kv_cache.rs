//! Key/value cache for incremental decoding, kept outside the model (one convention
//! everywhere: the caller owns the cache and passes it to each forward).

use candle::{Result, Tensor};

/// Cached keys and values `[B, KV, S, D]` per layer, and how many positions they hold.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], len: 0 }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append the new keys/values of `layer` and return all of them. The position count is
    /// advanced once per forward pass by [`KvCache::advance`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let entry = match self.layers[layer].take() {
            None => (k.contiguous()?, v.contiguous()?),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        };
        self.layers[layer] = Some(entry.clone());
        Ok(entry)
    }

    /// Record that a forward pass added `n` positions.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Keep only the rows in `keep` (finished sequences leave a batched generation).
    pub fn select_rows(&mut self, keep: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(keep, 0)?;
            *v = v.index_select(keep, 0)?;
        }
        Ok(())
    }
}

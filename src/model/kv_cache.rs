//! Key/value cache for incremental decoding, kept outside the model (one convention
//! everywhere: the caller owns the cache and passes it to each forward).

use candle::{Result, Tensor};

/// Cached keys and values per layer, in buffers `[B, KV, capacity, D]` that grow by doubling,
/// and how many positions they hold. Appending writes in place; nothing already cached is
/// copied on a decode step.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    len: usize,
}

/// Room for this many positions is reserved at first use.
const INITIAL_CAPACITY: usize = 256;

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

    /// Append the new keys/values `[B, KV, T, D]` of `layer` and return views of all of them.
    /// The position count is advanced once per forward pass by [`KvCache::advance`].
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new_len = self.len + k.dim(2)?;
        let grow = |old: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
            let (b, kv, _, d) = like.dims4()?;
            let capacity = new_len.max(INITIAL_CAPACITY).next_power_of_two();
            let buf = Tensor::zeros((b, kv, capacity, d), like.dtype(), like.device())?;
            if let Some(old) = old {
                buf.slice_set(&old.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            Ok(buf)
        };
        let (kb, vb) = match self.layers[layer].take() {
            Some((kb, vb)) if kb.dim(2)? >= new_len => (kb, vb),
            old => (grow(old.as_ref().map(|o| &o.0), k)?, grow(old.as_ref().map(|o| &o.1), v)?),
        };
        kb.slice_set(&k.contiguous()?, 2, self.len)?;
        vb.slice_set(&v.contiguous()?, 2, self.len)?;
        let views = (kb.narrow(2, 0, new_len)?, vb.narrow(2, 0, new_len)?);
        self.layers[layer] = Some((kb, vb));
        Ok(views)
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

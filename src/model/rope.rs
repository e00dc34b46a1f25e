//! Rotary position embeddings as a configuration asks for them: the inverse frequencies
//! (default, llama3 scaling, Phi-3's LongRoPE), the cos/sin tables of one forward pass, and
//! rotation of only the first `rotary_dim` channels of each head (`partial_rotary_factor`).

use candle::{DType, Result, Tensor, D};
use serde::{Deserialize, Serialize};

use super::config::ModelConfig;
use super::{fused, ops};

/// Phi-3's LongRoPE (`rope_type = "longrope"`): each frequency divided by a factor, the short
/// ones while the sequence fits the pretraining context, the long ones past it; cos and sin are
/// scaled by `attention_factor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LongRope {
    /// Factors within `original_max_position_embeddings`, one per rotated channel pair.
    pub short_factor: Vec<f64>,
    /// Factors past it.
    pub long_factor: Vec<f64>,
    /// The pretraining context: longer sequences take the long factors.
    pub original_max_position_embeddings: usize,
    /// The scale of cos and sin: √(1 + ln(max / original) / ln(original)) unless given.
    pub attention_factor: f64,
}

/// The rotary embedding of a model: frequency tables and how much of each head they rotate.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// LongRoPE's long-context frequencies and the length past which they apply.
    long: Option<(Vec<f32>, usize)>,
    scale: f32,
    rotary_dim: usize,
}

impl Rope {
    /// The rotary embedding `config` describes.
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.rotary_dim();
        let base = ops::rope_inv_freq(dim, config.rope_theta, config.rope_scaling.as_ref());
        let divided = |factors: &[f64]| base.iter().zip(factors).map(|(f, s)| f / *s as f32).collect::<Vec<f32>>();
        match &config.longrope {
            Some(l) => Self {
                inv_freq: divided(&l.short_factor),
                long: Some((divided(&l.long_factor), l.original_max_position_embeddings)),
                scale: l.attention_factor as f32,
                rotary_dim: dim,
            },
            None => Self { inv_freq: base, long: None, scale: 1.0, rotary_dim: dim },
        }
    }

    /// The sliding-window layers' own RoPE when the configuration gives them another base
    /// (Gemma 3's local base: unscaled, over the whole head).
    pub fn local(config: &ModelConfig) -> Option<Self> {
        let theta = config.local_rope_theta?;
        let dim = config.rotary_dim();
        Some(Self { inv_freq: ops::rope_inv_freq(dim, theta, None), long: None, scale: 1.0, rotary_dim: dim })
    }

    /// cos and sin `[B, 1, T, rotary_dim]` for positions `[B, T]`. LongRoPE takes its long
    /// factors when the largest position + 1 passes the original context (transformers' rule,
    /// decided per forward pass).
    pub fn tables(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let inv_freq = match &self.long {
            Some((long, original)) => {
                let last = positions.flatten_all()?.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
                if last as usize + 1 > *original {
                    long
                } else {
                    &self.inv_freq
                }
            }
            None => &self.inv_freq,
        };
        let (cos, sin) = ops::rope_tables(inv_freq, positions, DType::F32)?;
        if self.scale == 1.0 {
            return Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?));
        }
        let scale = f64::from(self.scale);
        Ok(((cos * scale)?.to_dtype(dtype)?, (sin * scale)?.to_dtype(dtype)?))
    }

    /// Rotate the first `rotary_dim` channels of every head of `x` (`[B, H, T, D]` for the
    /// plain kernels, `[B, T, H, D]` for the fused ones) and pass the rest through.
    pub fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor, fused_kernels: bool) -> Result<Tensor> {
        let apply =
            |x: &Tensor| if fused_kernels { fused::apply_rope(x, cos, sin) } else { ops::apply_rope(x, cos, sin) };
        let d = x.dim(D::Minus1)?;
        if self.rotary_dim == d {
            return apply(x);
        }
        let rotated = apply(&x.narrow(D::Minus1, 0, self.rotary_dim)?.contiguous()?)?;
        Tensor::cat(&[&rotated, &x.narrow(D::Minus1, self.rotary_dim, d - self.rotary_dim)?], D::Minus1)
    }
}

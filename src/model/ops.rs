//! Differentiable building blocks of the transformer, composed from candle ops that all have a
//! backward pass (candle-nn's fused `rms_norm`, `rope` and `softmax_last_dim` kernels have none,
//! so a gradient through them silently stops).
//!
//! Shapes: B = batch, T = query positions, S = key positions, H = heads, D = head width.

use candle::{DType, Device, Result, Tensor, D};

use super::config::Llama3RopeScaling;

/// `x @ w^T (+ b)` for `x` of shape `[..., in]` and `w` of shape `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let (rows, inner) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-scalar input") = w.dim(0)?;
    y.reshape(out_dims)
}

/// RMSNorm as transformers computes it: normalise in f32, cast back, then scale.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// Softmax over the last dimension; the max is detached (softmax is shift-invariant, so this
/// changes no value and no gradient, and saves a backward through `max`).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last dimension (max detached as in [`softmax_last_dim`]).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_z = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_z)
}

/// RoPE inverse frequencies `[D/2]`, with llama3 scaling applied when configured
/// (transformers' `_compute_llama3_parameters`).
pub fn rope_inv_freq(head_dim: usize, theta: f64, scaling: Option<&Llama3RopeScaling>) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            // Computed as transformers does: in f32, base ** (arange(0, dim, 2) / dim).
            let exponent = (2 * i) as f32 / head_dim as f32;
            let inv = 1.0 / (theta as f32).powf(exponent);
            match scaling {
                None => inv,
                Some(s) => llama3_scale(inv, s),
            }
        })
        .collect()
}

fn llama3_scale(inv_freq: f32, s: &Llama3RopeScaling) -> f32 {
    let old_len = s.original_max_position_embeddings as f32;
    let low_freq_wavelen = old_len / s.low_freq_factor as f32;
    let high_freq_wavelen = old_len / s.high_freq_factor as f32;
    let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
    if wavelen > low_freq_wavelen {
        inv_freq / s.factor as f32
    } else if wavelen < high_freq_wavelen {
        inv_freq
    } else {
        let smooth = (old_len / wavelen - s.low_freq_factor as f32)
            / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
        (1.0 - smooth) * inv_freq / s.factor as f32 + smooth * inv_freq
    }
}

/// cos and sin tables `[B, 1, T, D]` for integer positions `[B, T]` (HF layout: the `D/2`
/// frequencies repeated twice).
pub fn rope_tables(inv_freq: &[f32], positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
    let (b, t) = positions.dims2()?;
    let half = inv_freq.len();
    let inv = Tensor::from_slice(inv_freq, (1, 1, half), positions.device())?;
    let pos = positions.to_dtype(DType::F32)?.reshape((b, t, 1))?;
    let freqs = pos.broadcast_mul(&inv)?; // [B, T, D/2]
    let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?; // [B, 1, T, D]
    Ok((emb.cos()?.to_dtype(dtype)?, emb.sin()?.to_dtype(dtype)?))
}

/// Apply rotary embeddings to `x` `[B, H, T, D]`: `x * cos + rotate_half(x) * sin`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Additive attention mask `[B, 1, T, S]` (0 = visible, a large negative number = hidden) for
/// `T` new queries after `past` cached positions, so `S = past + T`.
///
/// A query at absolute position `i` sees key `j` when `j <= i`, the key is not padding
/// (`key_padding[b, j] == 1`), and, with a sliding window `w`, `i - j < w`.
pub fn attention_mask(
    key_padding: Option<&Tensor>,
    batch: usize,
    queries: usize,
    past: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let keys = past + queries;
    let keep: Vec<u8> = (0..queries)
        .flat_map(|q| {
            let i = past + q;
            (0..keys).map(move |j| u8::from(j <= i && sliding_window.is_none_or(|w| i - j < w)))
        })
        .collect();
    let mut keep = Tensor::from_vec(keep, (1, 1, queries, keys), device)?;
    if let Some(pad) = key_padding {
        let pad = pad.to_dtype(DType::U8)?.reshape((batch, 1, 1, keys))?;
        keep = keep.broadcast_mul(&pad)?;
    } else {
        keep = keep.broadcast_as((batch, 1, queries, keys))?.contiguous()?;
    }
    let zeros = Tensor::zeros(keep.shape(), DType::F32, device)?;
    let hidden = Tensor::full(f32::MIN, keep.shape(), device)?;
    keep.where_cond(&zeros, &hidden)
}

/// Repeat key/value heads `[B, KV, S, D]` to `[B, KV * groups, S, D]` for grouped-query attention.
pub fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, groups, s, d))?.reshape((b, kv * groups, s, d))
}

/// Scaled dot-product attention with an additive mask; scores and softmax in f32 as
/// transformers' eager attention does. q `[B, H, T, D]`, k/v `[B, H, S, D]` → `[B, H, T, D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    probs.matmul(&v.contiguous()?)
}

/// Log-probability of each next token: `out[b, t] = log_softmax(logits[b, t])[targets[b, t]]`.
/// logits `[B, T, V]`, targets `[B, T]` (u32) → `[B, T]` in f32.
pub fn gather_token_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logps = log_softmax_last_dim(&logits.to_dtype(DType::F32)?)?;
    logps.gather(&targets.unsqueeze(D::Minus1)?.contiguous()?, D::Minus1)?.squeeze(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vec2(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn softmax_and_log_softmax_agree_with_hand_values() {
        let x = Tensor::new(&[[1f32, 2., 3.], [0., 0., 0.]], &Device::Cpu).unwrap();
        let p = vec2(&softmax_last_dim(&x).unwrap());
        // e^1, e^2, e^3 normalised: 0.09003057, 0.24472847, 0.66524096
        assert!((p[0][0] - 0.090_030_57).abs() < 1e-6 && (p[0][2] - 0.665_240_96).abs() < 1e-6);
        assert!((p[1][1] - 1.0 / 3.0).abs() < 1e-6);
        let lp = vec2(&log_softmax_last_dim(&x).unwrap());
        assert!((lp[0][2] - 0.665_240_96f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn mask_combines_causal_padding_and_window() {
        let pad = Tensor::new(&[[0u32, 1, 1, 1]], &Device::Cpu).unwrap();
        let m = attention_mask(Some(&pad), 1, 4, 0, Some(2), &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let visible: Vec<Vec<u8>> =
            m.iter().map(|r| r.iter().map(|&v| u8::from(v == 0.0)).collect()).collect();
        assert_eq!(visible, vec![vec![0, 0, 0, 0], vec![0, 1, 0, 0], vec![0, 1, 1, 0], vec![0, 0, 1, 1]]);
    }

    #[test]
    fn rope_rotates_pairs_half_apart() {
        // One head of width 4, position 1, theta 1: frequencies 1 and 1 (1/1^0, 1/1^0.5).
        let inv = rope_inv_freq(4, 1.0, None);
        assert_eq!(inv, vec![1.0, 1.0]);
        let pos = Tensor::new(&[[1u32]], &Device::Cpu).unwrap();
        let (cos, sin) = rope_tables(&inv, &pos, DType::F32).unwrap();
        let x = Tensor::new(&[1f32, 0., 0., 0.], &Device::Cpu).unwrap().reshape((1, 1, 1, 4)).unwrap();
        let y: Vec<f32> = apply_rope(&x, &cos, &sin).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        // x1 = (1, 0), x2 = (0, 0): y = (cos1, 0, sin1, 0)
        let (c, s) = (1f32.cos(), 1f32.sin());
        assert!((y[0] - c).abs() < 1e-6 && y[1].abs() < 1e-6 && (y[2] - s).abs() < 1e-6);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let s = Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8,
        };
        // wavelength 2π < 8/4 = 2? no (6.28 > 2); > 8/1 = 8? no: smooth zone.
        let smooth = (8.0 / (2.0 * std::f32::consts::PI) - 1.0) / 3.0;
        let expect = (1.0 - smooth) / 8.0 + smooth;
        assert!((llama3_scale(1.0, &s) - expect).abs() < 1e-6);
        assert_eq!(llama3_scale(0.01, &s), 0.01 / 8.0); // wavelength 628 > 8
        assert_eq!(llama3_scale(10.0, &s), 10.0); // wavelength 0.63 < 2
    }
}

//! Differentiable building blocks of the transformer, composed from candle ops that all have a
//! backward pass (candle-nn's fused `rms_norm`, `rope` and `softmax_last_dim` kernels have none,
//! so a gradient through them silently stops).
//!
//! Shapes: B = batch, T = query positions, S = key positions, H = heads, D = head width.

use candle::{DType, Device, Result, Tensor, D};

use super::config::Llama3RopeScaling;
use super::fused::with_values;

/// At most this many rows take the matrix-vector path of [`linear`] (decoding).
const FEW_ROWS: usize = 16;

/// `x @ w^T (+ b)` for `x` of shape `[..., in]` and `w` of shape `[out, in]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    Ok(linear_group(x, &[(w, b)])?.pop().expect("one projection in, one out"))
}

/// Several projections of the same input (q/k/v, gate/up), each `x @ w^T (+ b)`.
///
/// A few rows without gradient (token-by-token decoding) go through [`matvec_group`], which
/// streams every `w` once in a single parallel pass; a general GEMM would repack all of `w`
/// on every call, and one pass per matrix would pay the thread hand-off once per matrix.
pub fn linear_group(x: &Tensor, projections: &[(&Tensor, Option<&Tensor>)]) -> Result<Vec<Tensor>> {
    let dims = x.dims();
    let (rows, inner) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
    let x2 = x.reshape((rows, inner))?;
    let fast = rows <= FEW_ROWS && plain_cpu_f32(x) && projections.iter().all(|(w, _)| plain_cpu_f32(w));
    let ys = if fast {
        let ws: Vec<&Tensor> = projections.iter().map(|(w, _)| *w).collect();
        matvec_group(&x2, &ws)?
    } else {
        projections.iter().map(|(w, _)| matmul(&x2, &w.t()?)).collect::<Result<Vec<_>>>()?
    };
    ys.into_iter()
        .zip(projections)
        .map(|(y, (w, b))| {
            let y = match b {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            };
            let mut out_dims = dims.to_vec();
            *out_dims.last_mut().expect("non-scalar input") = w.dim(0)?;
            y.reshape(out_dims)
        })
        .collect()
}

/// Whether `t` can take a CPU fast path: f32, on the CPU, and outside any autograd graph.
fn plain_cpu_f32(t: &Tensor) -> bool {
    !t.track_op() && t.dtype() == DType::F32 && t.device().is_cpu()
}

/// `x [R, in] @ w_i[out_i, in]^T` for every `w_i`, on the CPU, for small R. The rows of all
/// the matrices are split into one contiguous range per thread; each thread computes their
/// dot products with every row of `x`, so each weight is read once.
fn matvec_group(x: &Tensor, ws: &[&Tensor]) -> Result<Vec<Tensor>> {
    let (rows, inner) = x.dims2()?;
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let outs: Vec<usize> = ws.iter().map(|w| w.dim(0)).collect::<Result<_>>()?;
    let total: usize = outs.iter().sum();
    let parts = super::spin_pool::parts();
    // One contiguous range of rows per thread, rounded to the kernel's 4 rows.
    let block = total.div_ceil(parts).div_ceil(4) * 4;
    let y = with_values(ws, |slices| {
        let mut y = vec![0f32; rows * total];
        let chunks: Vec<std::sync::Mutex<&mut [f32]>> = y.chunks_mut(block * rows).map(std::sync::Mutex::new).collect();
        super::spin_pool::run(&|part| {
            let Some(chunk) = chunks.get(part) else {
                return;
            };
            let mut chunk = chunk.lock().expect("each part locks its own chunk once");
            let (first, last) = (part * block, part * block + chunk.len() / rows);
            let mut base = 0;
            let mut written = 0;
            for (m, &n) in outs.iter().enumerate() {
                let (lo, hi) = (first.max(base), last.min(base + n));
                if lo < hi {
                    let out = &mut chunk[written..written + (hi - lo) * rows];
                    dot_block(&slices[m][(lo - base) * inner..(hi - base) * inner], inner, &xs, rows, out);
                    written += (hi - lo) * rows;
                }
                base += n;
            }
        });
        drop(chunks);
        y
    })?;
    // y is output-major (y[o * rows + r]); transpose to [rows, total] and split.
    let y = Tensor::from_vec(y, (total, rows), x.device())?.t()?;
    let mut offset = 0;
    outs.iter()
        .map(|&n| {
            let part = y.narrow(1, offset, n)?.contiguous();
            offset += n;
            part
        })
        .collect()
}

/// `out[o * rows + r] = w[o] · x[r]` for the `out.len() / rows` rows of `w` given.
pub(crate) fn dot_block(w: &[f32], inner: usize, x: &[f32], rows: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { dot_block_avx2(w, inner, x, rows, out) };
        }
    }
    for (o, ys) in out.chunks_mut(rows).enumerate() {
        let wrow = &w[o * inner..(o + 1) * inner];
        for (r, y) in ys.iter_mut().enumerate() {
            *y = wrow.iter().zip(&x[r * inner..(r + 1) * inner]).map(|(a, b)| a * b).sum();
        }
    }
}

/// AVX2 kernel of [`dot_block`]: a block of four rows of `w` against up to three rows of `x`
/// at a time (twelve accumulators), so each load of `w` serves up to three FMAs and each load
/// of `x` four, and `w` streams through once.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_block_avx2(w: &[f32], inner: usize, x: &[f32], rows: usize, out: &mut [f32]) {
    let n_out = out.len() / rows;
    if (5..=8).contains(&rows) {
        // Batched decoding's 5 to 8 activation rows: one weight row against all of them in one
        // pass, so each weight is loaded once per step and every load of it feeds up to eight
        // FMAs (measured: batch 8 80 → 98 tokens/s). Past 8 rows the activations leave L1 and
        // the four-weight-row blocks below are faster again (batch 32: 115 vs 88).
        let xrow = |r: usize| &x[r * inner..(r + 1) * inner];
        for o in 0..n_out {
            let wrow = &w[o * inner..(o + 1) * inner];
            let mut r = 0;
            while r < rows {
                let n = (rows - r).min(8);
                let out = &mut out[o * rows + r..o * rows + r + n];
                let x = |i: usize| xrow(r + i);
                match n {
                    8 => dot_1_by::<8>(wrow, std::array::from_fn(x), inner, out),
                    7 => dot_1_by::<7>(wrow, std::array::from_fn(x), inner, out),
                    6 => dot_1_by::<6>(wrow, std::array::from_fn(x), inner, out),
                    5 => dot_1_by::<5>(wrow, std::array::from_fn(x), inner, out),
                    4 => dot_1_by::<4>(wrow, std::array::from_fn(x), inner, out),
                    3 => dot_1_by::<3>(wrow, std::array::from_fn(x), inner, out),
                    2 => dot_1_by::<2>(wrow, std::array::from_fn(x), inner, out),
                    _ => dot_1_by::<1>(wrow, [x(0)], inner, out),
                }
                r += n;
            }
        }
        return;
    }
    let row = |o: usize| &w[o.min(n_out - 1) * inner..(o.min(n_out - 1) + 1) * inner];
    let xrow = |r: usize| &x[r * inner..(r + 1) * inner];
    for o in (0..n_out).step_by(4) {
        let ws = [row(o), row(o + 1), row(o + 2), row(o + 3)];
        let mut put = |r: usize, sums: &[[f32; 4]]| {
            for (i, s) in sums.iter().enumerate() {
                for (j, &v) in s.iter().enumerate().take(n_out - o) {
                    out[(o + j) * rows + r + i] = v;
                }
            }
        };
        let mut r = 0;
        while r < rows {
            match rows - r {
                1 => put(r, &dot_4_by::<1>(ws, [xrow(r)], inner)),
                2 => put(r, &dot_4_by::<2>(ws, [xrow(r), xrow(r + 1)], inner)),
                _ => put(r, &dot_4_by::<3>(ws, [xrow(r), xrow(r + 1), xrow(r + 2)], inner)),
            }
            r += (rows - r).min(3);
        }
    }
}

/// The sum of a vector's eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Dot products of one `w` row with `R` `x` rows, into `out[..R]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_1_by<const R: usize>(w: &[f32], xs: [&[f32]; R], inner: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); R];
    let body = inner / 8 * 8;
    for k in (0..body).step_by(8) {
        let wv = _mm256_loadu_ps(w.as_ptr().add(k));
        for (a, x) in acc.iter_mut().zip(xs) {
            *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x.as_ptr().add(k)), *a);
        }
    }
    for ((o, a), x) in out.iter_mut().zip(acc).zip(xs) {
        *o = hsum(a) + w[body..].iter().zip(&x[body..]).map(|(a, b)| a * b).sum::<f32>();
    }
}

/// Dot products of four `w` rows with `R` `x` rows (`[r][j] = x_r · w_j`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_4_by<const R: usize>(ws: [&[f32]; 4], xs: [&[f32]; R], inner: usize) -> [[f32; 4]; R] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 4]; R];
    let body = inner / 8 * 8;
    for k in (0..body).step_by(8) {
        let wv = ws.map(|w| _mm256_loadu_ps(w.as_ptr().add(k)));
        for (acc_r, x) in acc.iter_mut().zip(xs) {
            let xv = _mm256_loadu_ps(x.as_ptr().add(k));
            for (a, &wj) in acc_r.iter_mut().zip(&wv) {
                *a = _mm256_fmadd_ps(wj, xv, *a);
            }
        }
    }
    let mut out = [[0f32; 4]; R];
    for ((o, acc_r), x) in out.iter_mut().zip(&acc).zip(xs) {
        for ((v, &a), w) in o.iter_mut().zip(acc_r).zip(ws) {
            *v = hsum(a) + w[body..].iter().zip(&x[body..]).map(|(a, b)| a * b).sum::<f32>();
        }
    }
    out
}

/// RMSNorm as transformers computes it: normalise in f32, cast back, then scale.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if plain_cpu_f32(x) && plain_cpu_f32(weight) {
        let h = weight.dim(0)?;
        let out = with_values(&[x, weight], |s| {
            let (xs, ws) = (s[0], s[1]);
            let mut out = vec![0f32; xs.len()];
            for (row, o) in xs.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
                let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let inv = 1.0 / (mean_sq + eps as f32).sqrt();
                for ((o, &v), &w) in o.iter_mut().zip(row).zip(ws) {
                    *o = v * inv * w;
                }
            }
            out
        })?;
        return Tensor::from_vec(out, x.shape(), x.device());
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean_sq = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_div(&(mean_sq + eps)?.sqrt()?)?;
    normed.to_dtype(dtype)?.broadcast_mul(weight)
}

/// SwiGLU's `silu(gate) * up`.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if plain_cpu_f32(gate) && plain_cpu_f32(up) {
        let out = with_values(&[gate, up], |s| {
            s[0].iter().zip(s[1]).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect::<Vec<f32>>()
        })?;
        return Tensor::from_vec(out, gate.shape(), gate.device());
    }
    gate.silu()? * up
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
        let smooth =
            (old_len / wavelen - s.low_freq_factor as f32) / (s.high_freq_factor as f32 - s.low_freq_factor as f32);
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
    if plain_cpu_f32(x) && plain_cpu_f32(cos) && plain_cpu_f32(sin) {
        let (b, h, t, _) = x.dims4()?;
        let out = with_values(&[x, cos, sin], |s| {
            let (xs, cs, ss) = (s[0], s[1], s[2]);
            let half = d / 2;
            let mut out = vec![0f32; xs.len()];
            for (row, (xr, o)) in xs.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
                // row = ((bi * h) + hi) * t + ti; the tables are [B, 1, T, D].
                let (bi, ti) = (row / (h * t), row % t);
                let (c, sn) = (&cs[(bi * t + ti) * d..][..d], &ss[(bi * t + ti) * d..][..d]);
                for i in 0..half {
                    o[i] = xr[i] * c[i] - xr[i + half] * sn[i];
                    o[i + half] = xr[i + half] * c[i + half] + xr[i] * sn[i + half];
                }
            }
            out
        })?;
        return Tensor::from_vec(out, (b, h, t, d), x.device());
    }
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Additive attention mask `[B, 1, T, S]` (0 = visible, a large negative number = hidden) for
/// `T` new queries after `past` cached positions, so `S = past + T`.
///
/// `key_padding[b, j]` is 0 for padding and otherwise a segment id (1 for ordinary batches;
/// 1, 2, 3, ... for sequences packed into one row). A query at absolute position `i` sees key
/// `j` when `j <= i`, the key is not padding, the key is in the query's segment (a padding
/// query sees every real key, as in transformers), and, with a sliding window `w`, `i - j < w`.
pub fn attention_mask(
    key_padding: Option<&Tensor>,
    batch: usize,
    queries: usize,
    past: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let keys = past + queries;
    let segments: Option<Vec<u32>> =
        key_padding.map(|p| p.to_dtype(DType::U32)?.flatten_all()?.to_vec1()).transpose()?;
    let rows = if segments.is_some() { batch } else { 1 };
    let mut mask = vec![f32::MIN; rows * queries * keys];
    for b in 0..rows {
        for q in 0..queries {
            let i = past + q;
            let row = &mut mask[(b * queries + q) * keys..][..keys];
            for (j, m) in row.iter_mut().enumerate().take(i + 1) {
                let in_window = sliding_window.is_none_or(|w| i - j < w);
                let same_segment = match &segments {
                    None => true,
                    Some(seg) => {
                        let (qs, ks) = (seg[b * keys + i], seg[b * keys + j]);
                        ks != 0 && (qs == 0 || qs == ks)
                    }
                };
                if in_window && same_segment {
                    *m = 0.0;
                }
            }
        }
    }
    let mask = Tensor::from_vec(mask, (rows, 1, queries, keys), device)?;
    if rows == batch {
        Ok(mask)
    } else {
        mask.broadcast_as((batch, 1, queries, keys))?.contiguous()
    }
}

/// Repeat key/value heads `[B, KV, S, D]` to `[B, KV * groups, S, D]` for grouped-query attention.
pub fn repeat_kv(x: &Tensor, groups: usize) -> Result<Tensor> {
    if groups == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, kv, groups, s, d))?.reshape((b, kv * groups, s, d))
}

/// Scaled dot-product attention with an additive mask and grouped-query heads; scores and
/// softmax in f32 as transformers' eager attention does.
/// q `[B, H, T, D]`, k/v `[B, H / groups, S, D]`, mask `[B, 1, T, S]` → `[B, H, T, D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, groups: usize) -> Result<Tensor> {
    if q.dim(2)? <= FEW_ROWS && [q, k, v].iter().all(|t| plain_cpu_f32(t)) {
        return attention_few_queries(q, k, v, mask, groups);
    }
    attention_matmul(q, &repeat_kv(k, groups)?, &repeat_kv(v, groups)?, mask)
}

/// The general (differentiable) path of [`attention`], with as many k/v heads as q heads.
fn attention_matmul(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let dtype = q.dtype();
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (matmul(&q.contiguous()?, &k.t()?.contiguous()?)? * scale)?;
    let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
    let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
    matmul(&probs, &v.contiguous()?)
}

/// `a @ b`. candle's CPU backend has no bf16 matmul, so bf16 on the CPU multiplies in f32 and
/// rounds the product back to bf16 (differentiable through the casts).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == DType::BF16 && a.device().is_cpu() {
        return a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?.to_dtype(DType::BF16);
    }
    a.matmul(b)
}

/// [`attention`] for a few queries outside autograd (decoding): plain loops over each
/// (batch, head, query) with the key/value head found by index, no copies of k and v.
fn attention_few_queries(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, groups: usize) -> Result<Tensor> {
    use rayon::prelude::*;
    let (b, h, t, d) = q.dims4()?;
    let s = k.dim(2)?;
    let scale = 1.0 / (d as f32).sqrt();
    let mask = mask.broadcast_as((b, 1, t, s))?.contiguous()?;
    let q = q.contiguous()?;
    // k and v may be views into a larger KV-cache buffer: rows of one (batch, head) are
    // contiguous, heads are `head_stride` apart.
    let (k, v) = (rows_contiguous(k)?, rows_contiguous(v)?);
    let (k_batch, k_head) = (k.stride()[0], k.stride()[1]);
    let (v_batch, v_head) = (v.stride()[0], v.stride()[1]);
    let out = with_values(&[&q, &mask], |qm| {
        with_storage_f32(&k, |ks| {
            with_storage_f32(&v, |vs| {
                let (qs, ms) = (qm[0], qm[1]);
                let mut out = vec![0f32; b * h * t * d];
                let work = |(idx, o): (usize, &mut [f32])| {
                    let (bi, hi) = (idx / h, idx % h);
                    let kb = bi * k_batch + (hi / groups) * k_head;
                    let vb = bi * v_batch + (hi / groups) * v_head;
                    let qrows = &qs[(bi * h + hi) * t * d..][..t * d];
                    // scores[si * t + ti] = k[si] · q[ti]
                    let mut scores = vec![0f32; s * t];
                    dot_block(&ks[kb..kb + s * d], d, qrows, t, &mut scores);
                    for ti in 0..t {
                        let mrow = &ms[(bi * t + ti) * s..][..s];
                        let mut p: Vec<f32> = (0..s).map(|si| scores[si * t + ti] * scale + mrow[si]).collect();
                        let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let mut total = 0f32;
                        for ps in p.iter_mut() {
                            *ps = (*ps - max).exp();
                            total += *ps;
                        }
                        let orow = &mut o[ti * d..(ti + 1) * d];
                        for (si, &ps) in p.iter().enumerate() {
                            let w = ps / total;
                            for (acc, &x) in orow.iter_mut().zip(&vs[vb + si * d..][..d]) {
                                *acc += w * x;
                            }
                        }
                    }
                };
                // Threads pay off only once there is enough work to split.
                if b * h * t * s * d >= 1 << 18 {
                    out.par_chunks_mut(t * d).enumerate().for_each(work);
                } else {
                    out.chunks_mut(t * d).enumerate().for_each(work);
                }
                out
            })
        })
    })???;
    Tensor::from_vec(out, (b, h, t, d), q.device())
}

/// `t` `[B, H, S, D]` as a layout whose last two dims are packed (`[S, D]` contiguous per
/// head), copying only when they are not; returns the tensor and its storage offset strides.
fn rows_contiguous(t: &Tensor) -> Result<StridedF32> {
    let (_, _, s, d) = t.dims4()?;
    let st = t.stride();
    let t = if st[3] == 1 && (st[2] == d || s == 1) { t.clone() } else { t.contiguous()? };
    let st = t.stride();
    Ok(StridedF32 { offset: t.layout().start_offset(), strides: [st[0], st[1]], tensor: t })
}

/// A CPU f32 tensor read through its storage with a start offset and batch/head strides.
struct StridedF32 {
    tensor: Tensor,
    offset: usize,
    strides: [usize; 2],
}

impl StridedF32 {
    fn stride(&self) -> [usize; 2] {
        self.strides
    }
}

/// Run `f` over the storage of a strided tensor, starting at its offset.
fn with_storage_f32<R>(t: &StridedF32, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, _) = t.tensor.storage_and_layout();
    let candle::Storage::Cpu(cpu) = &*storage else { candle::bail!("CPU fast path called with a non-CPU tensor") };
    Ok(f(&cpu.as_slice::<f32>()?[t.offset..]))
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
    fn few_query_attention_equals_matmul_attention_with_gqa_and_mask() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1., (2, 4, 3, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1., (2, 2, 5, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1., (2, 2, 5, 8), &dev).unwrap();
        let pad = Tensor::new(&[[0u32, 1, 1, 1, 1], [1, 1, 1, 1, 1]], &dev).unwrap();
        let mask = attention_mask(Some(&pad), 2, 3, 2, Some(3), &dev).unwrap();
        let fast = attention_few_queries(&q, &k, &v, &mask, 2).unwrap();
        let slow = attention_matmul(&q, &repeat_kv(&k, 2).unwrap(), &repeat_kv(&v, 2).unwrap(), &mask).unwrap();
        let diff = (fast - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn fused_cpu_paths_equal_the_differentiable_ones() {
        let dev = Device::Cpu;
        let close = |a: &Tensor, b: &Tensor| {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "{d}");
        };
        // A Var input takes the composed (autograd) path; a plain tensor the fused one.
        let x = Tensor::randn(0f32, 1., (2, 3, 4, 8), &dev).unwrap();
        let xv = candle::Var::from_tensor(&x).unwrap();
        let w = Tensor::randn(1f32, 0.1, 8, &dev).unwrap();
        close(&rms_norm(&x, &w, 1e-5).unwrap(), &rms_norm(xv.as_tensor(), &w, 1e-5).unwrap());
        let pos = Tensor::new(&[[3u32, 4, 5], [0, 1, 2]], &dev).unwrap();
        let (cos, sin) = rope_tables(&rope_inv_freq(8, 10000.0, None), &pos, DType::F32).unwrap();
        let xt = x.transpose(1, 2).unwrap(); // non-contiguous, as after the head split
        let xvt = xv.as_tensor().transpose(1, 2).unwrap();
        close(&apply_rope(&xt, &cos, &sin).unwrap(), &apply_rope(&xvt, &cos, &sin).unwrap());
        close(
            &silu_mul(&x, &w.broadcast_as(x.shape()).unwrap()).unwrap(),
            &silu_mul(xv.as_tensor(), &w.broadcast_as(x.shape()).unwrap()).unwrap(),
        );
    }

    #[test]
    fn matvec_path_equals_matmul() {
        // Row counts covering the kernel's blocks of 1, 2 and 3 rows of x (up to 4 rows) and
        // its one-weight-row passes over up to 8 rows (more than 4).
        for rows in [1, 2, 3, 4, 5, 7, 8, 13, 16] {
            let x = Tensor::randn(0f32, 1., (rows, 37), &Device::Cpu).unwrap();
            let w = Tensor::randn(0f32, 1., (130, 37), &Device::Cpu).unwrap();
            let w2 = Tensor::randn(0f32, 1., (7, 37), &Device::Cpu).unwrap();
            let fast = matvec_group(&x, &[&w, &w2]).unwrap();
            for (got, w) in fast.iter().zip([&w, &w2]) {
                let slow = x.matmul(&w.t().unwrap()).unwrap();
                let diff = (got - slow).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-4, "{rows} rows: {diff}");
            }
        }
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
        let visible: Vec<Vec<u8>> = m.iter().map(|r| r.iter().map(|&v| u8::from(v == 0.0)).collect()).collect();
        assert_eq!(visible, vec![vec![0, 0, 0, 0], vec![0, 1, 0, 0], vec![0, 1, 1, 0], vec![0, 0, 1, 1]]);
    }

    #[test]
    fn packed_segments_do_not_see_each_other() {
        let seg = Tensor::new(&[[1u32, 1, 2, 2, 0]], &Device::Cpu).unwrap();
        let m = attention_mask(Some(&seg), 1, 5, 0, None, &Device::Cpu).unwrap();
        let m: Vec<Vec<f32>> = m.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        let visible: Vec<Vec<u8>> = m.iter().map(|r| r.iter().map(|&v| u8::from(v == 0.0)).collect()).collect();
        assert_eq!(
            visible,
            vec![
                vec![1, 0, 0, 0, 0],
                vec![1, 1, 0, 0, 0],
                vec![0, 0, 1, 0, 0],
                vec![0, 0, 1, 1, 0],
                vec![1, 1, 1, 1, 0]
            ]
        );
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

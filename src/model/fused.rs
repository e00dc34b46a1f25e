//! Fused CPU kernels with their own backward pass, as candle custom ops.
//!
//! Each op computes in one pass what [`super::ops`] composes from many candle ops (each of
//! which allocates its output and walks memory once), and its backward is written by hand.
//! The plain composed path stays selectable ([`Kernels::Plain`]); the tests check every fused
//! op's values and gradients against its plain twin.
//!
//! The fused ops take f32 CPU tensors; [`Kernels::Fused`] falls back to the plain ops for
//! other dtypes and devices.
//!
//! Layouts: the attention and RoPE kernels work on `[B, T, heads, D]`, the layout the q/k/v
//! projections produce, so no transpose is ever copied.

use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::packed::PackedWeight;
use rayon::prelude::*;

/// Which implementation the transformer's building blocks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    /// Compositions of candle ops, each with candle's own backward.
    Plain,
    /// The fused kernels of this module (CPU f32; other dtypes and devices use the plain ops).
    #[default]
    Fused,
}

impl std::str::FromStr for Kernels {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "plain" => Ok(Self::Plain),
            "fused" => Ok(Self::Fused),
            other => Err(format!("unknown kernels `{other}`: expected `plain` or `fused`")),
        }
    }
}

impl std::fmt::Display for Kernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Plain => "plain",
            Self::Fused => "fused",
        })
    }
}

/// Whether the fused kernels can take these tensors: f32 on the CPU.
pub fn supports(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu())
}

/// The contiguous f32 values a custom op's forward receives.
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&s.as_slice::<f32>()?[start..end]),
        None => candle::bail!("fused kernel given a non-contiguous input"),
    }
}

/// Run `f` on the contiguous f32 values of several CPU tensors (copying only non-contiguous
/// ones).
pub(crate) fn with_values<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Result<R> {
    let ts: Vec<Tensor> = ts.iter().map(|t| t.contiguous()).collect::<Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let candle::Storage::Cpu(cpu) = &**storage else { candle::bail!("fused kernel given a non-CPU tensor") };
        slices.push(slice(cpu, layout)?);
    }
    Ok(f(&slices))
}

/// A fresh f32 tensor from values.
fn tensor(values: Vec<f32>, shape: &Shape) -> Result<Tensor> {
    Tensor::from_vec(values, shape.clone(), &candle::Device::Cpu)
}

/// A raw pointer that may cross threads: each thread writes a region no other thread touches.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: used only for disjoint writes, synchronised by rayon's join at the end of the loop.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// `c = a · b (+ c when accumulate)` on `threads` threads, with explicit row/column strides:
/// `a` is m×k, `b` is k×n, `c` is m×n.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: (*const f32, isize, isize),
    b: (*const f32, isize, isize),
    c: (*mut f32, isize, isize),
    accumulate: bool,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: callers pass pointers to buffers of at least the strided extents given.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0,
            c.2,
            c.1,
            accumulate,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x ← exp(x − shift)` over a slice: eight lanes at a time with AVX2/FMA where the CPU has
/// them (the kernels' softmaxes and SiLUs spend a fifth of their time in scalar `expf`),
/// `f32::exp` elsewhere. Within 2 ulp of `f32::exp`; −∞ gives 0.
fn shifted_exp(x: &mut [f32], shift: f32) {
    exp_in_place::<false>(x, shift);
}

/// [`shifted_exp`], returning the sum of the results accumulated in f64. The f64 sum matters:
/// a softmax over a 49,152-token vocabulary summed in one f32 accumulator drops the tail's
/// small terms (each below half an ulp of the running sum), which made log-probs too high by
/// ~1e-4 per token on SmolLM2.
fn shifted_exp_sum(x: &mut [f32], shift: f32) -> f64 {
    exp_in_place::<true>(x, shift)
}

/// The body of [`shifted_exp`] and [`shifted_exp_sum`]; the sum is 0 unless `SUM`.
fn exp_in_place<const SUM: bool>(x: &mut [f32], shift: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { shifted_exp_avx2::<SUM>(x, shift) };
        }
    }
    x.iter_mut().for_each(|v| *v = (*v - shift).exp());
    if SUM {
        sum_f64(x, |v| v as f64)
    } else {
        0.0
    }
}

/// `Σ f(x)` accumulated in eight f64 lanes (vectorisable, and exact enough that the order of
/// a softmax's or a mean's terms no longer matters at f32 precision).
fn sum_f64(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for chunk in chunks {
        lanes.iter_mut().zip(chunk).for_each(|(acc, &v)| *acc += f(v));
    }
    lanes.iter().sum::<f64>() + tail
}

/// AVX2 body of [`exp_in_place`]: Cephes' `expf` (range reduction by ln 2 in two parts, a
/// degree-5 polynomial, the exponent built in the float's bits), summed in two f64×4 lanes when
/// `SUM`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn shifted_exp_avx2<const SUM: bool>(x: &mut [f32], shift: f32) -> f64 {
    use std::arch::x86_64::*;
    let (head, tail) = x.split_at_mut(x.len() / 8 * 8);
    let shift_v = _mm256_set1_ps(shift);
    let hi = _mm256_set1_ps(88.376_26);
    let lo = _mm256_set1_ps(-87.336_54);
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let c1 = _mm256_set1_ps(0.693_359_4);
    let c2 = _mm256_set1_ps(-2.121_944_4e-4);
    let p = [1.987_569_1e-4f32, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5]
        .map(|c| _mm256_set1_ps(c));
    let one = _mm256_set1_ps(1.0);
    let (mut acc_lo, mut acc_hi) = (_mm256_setzero_pd(), _mm256_setzero_pd());
    for chunk in head.chunks_exact_mut(8) {
        let v = _mm256_sub_ps(_mm256_loadu_ps(chunk.as_ptr()), shift_v);
        // Below the smallest normal result the answer is 0 (−∞ included).
        let underflow = _mm256_cmp_ps(v, lo, _CMP_LT_OQ);
        let v = _mm256_max_ps(_mm256_min_ps(v, hi), lo);
        let n = _mm256_round_ps(_mm256_mul_ps(v, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        let r = _mm256_fnmadd_ps(n, c2, _mm256_fnmadd_ps(n, c1, v));
        let r2 = _mm256_mul_ps(r, r);
        let mut y = p[0];
        for &c in &p[1..] {
            y = _mm256_fmadd_ps(y, r, c);
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, r2, r), one);
        let pow2n =
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
        let out = _mm256_andnot_ps(underflow, _mm256_mul_ps(y, pow2n));
        _mm256_storeu_ps(chunk.as_mut_ptr(), out);
        if SUM {
            acc_lo = _mm256_add_pd(acc_lo, _mm256_cvtps_pd(_mm256_castps256_ps128(out)));
            acc_hi = _mm256_add_pd(acc_hi, _mm256_cvtps_pd(_mm256_extractf128_ps(out, 1)));
        }
    }
    let mut lanes = [0f64; 4];
    _mm256_storeu_pd(lanes.as_mut_ptr(), _mm256_add_pd(acc_lo, acc_hi));
    tail.iter_mut().for_each(|v| *v = (*v - shift).exp());
    if SUM {
        lanes.iter().sum::<f64>() + sum_f64(tail, |v| v as f64)
    } else {
        0.0
    }
}

// ---------------------------------------------------------------------------------------
// RMSNorm

/// `y = x / sqrt(mean(x²) + eps) * w` over the last dimension.
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let h = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(h).zip(x.par_chunks(h)).for_each(|(y, x)| {
            let inv = inv_rms(x, self.eps);
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = x * inv * w;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let (dx, dw) = with_values(&[x, w, grad], |s| {
            let (x, w, g) = (s[0], s[1], s[2]);
            let mut dx = vec![0f32; x.len()];
            // Partial sums of dw over fixed blocks of rows, added in order: the same result
            // whatever the thread schedule (a resumed run must repeat the original exactly).
            let block = 64 * h;
            let partials: Vec<Vec<f32>> = dx
                .par_chunks_mut(block)
                .zip(x.par_chunks(block).zip(g.par_chunks(block)))
                .map(|(dx, (x, g))| {
                    let mut dw = vec![0f32; h];
                    for (dx, (x, g)) in dx.chunks_mut(h).zip(x.chunks(h).zip(g.chunks(h))) {
                        let inv = inv_rms(x, self.eps);
                        // dx = inv · (g∘w − x̂ · mean(g∘w∘x̂)), x̂ = x · inv
                        let dot: f32 =
                            x.iter().zip(g).zip(w).map(|((&x, &g), &w)| g * w * x * inv).sum::<f32>() / h as f32;
                        for i in 0..h {
                            let xhat = x[i] * inv;
                            dw[i] += g[i] * xhat;
                            dx[i] = inv * (g[i] * w[i] - xhat * dot);
                        }
                    }
                    dw
                })
                .collect();
            let mut dw = vec![0f32; h];
            for part in &partials {
                dw.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
            (dx, dw)
        })?;
        Ok((Some(tensor(dx, x.shape())?), Some(tensor(dw, w.shape())?)))
    }
}

/// `1 / sqrt(mean(x²) + eps)`, the mean accumulated in f64.
fn inv_rms(x: &[f32], eps: f32) -> f32 {
    let mean_sq = sum_f64(x, |v| (v as f64) * (v as f64)) / x.len() as f64;
    (1.0 / (mean_sq + eps as f64).sqrt()) as f32
}

/// Fused RMSNorm (f32 CPU tensors).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------
// SiLU-gated product

/// `silu(gate) * up`.
struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "fused-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1)?, slice(s2, l2)?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(4096).zip(g.par_chunks(4096).zip(u.par_chunks(4096))).for_each(|(y, (g, u))| {
            // y ← exp(−g), then silu(g)·u = g / (1 + exp(−g)) · u
            y.iter_mut().zip(g).for_each(|(y, &g)| *y = -g);
            shifted_exp(y, 0.0);
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g / (1.0 + *y) * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_values(&[gate, up, grad], |s| {
            let (g, u, dy) = (s[0], s[1], s[2]);
            let mut dg = vec![0f32; g.len()];
            let mut du = vec![0f32; g.len()];
            dg.par_chunks_mut(4096)
                .zip(du.par_chunks_mut(4096))
                .zip(g.par_chunks(4096).zip(u.par_chunks(4096)).zip(dy.par_chunks(4096)))
                .for_each(|((dg, du), ((g, u), dy))| {
                    // dg ← exp(−g) first
                    dg.iter_mut().zip(g).for_each(|(e, &g)| *e = -g);
                    shifted_exp(dg, 0.0);
                    for i in 0..g.len() {
                        let sig = 1.0 / (1.0 + dg[i]);
                        // d silu(g)/dg = σ(g) (1 + g (1 − σ(g)))
                        dg[i] = dy[i] * u[i] * sig * (1.0 + g[i] * (1.0 - sig));
                        du[i] = dy[i] * g[i] * sig;
                    }
                });
            (dg, du)
        })?;
        Ok((Some(tensor(dg, gate.shape())?), Some(tensor(du, up.shape())?)))
    }
}

/// Fused `silu(gate) * up` (f32 CPU tensors).
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul)
}

// ---------------------------------------------------------------------------------------
// RoPE

/// Rotary embedding of `x` `[B, T, heads, D]` with tables cos/sin `[B, T, D]` (HF layout:
/// `x * cos + rotate_half(x) * sin`).
struct Rope;

/// Rotate every `[D]` row of `x` (`[B, T, heads, D]`) by its position's angles; `sign` = −1
/// rotates backwards (the transpose of the rotation: its backward).
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, d: usize, sign: f32) -> Vec<f32> {
    let half = d / 2;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * d).zip(x.par_chunks(heads * d)).enumerate().for_each(|(bt, (o, x))| {
        let (c, s) = (&cos[bt * d..][..d], &sin[bt * d..][..d]);
        for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
            for i in 0..half {
                o[i] = x[i] * c[i] - sign * x[i + half] * s[i];
                o[i + half] = x[i + half] * c[i + half] + sign * x[i] * s[i + half];
            }
        }
    });
    out
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, _, heads, d) = l1.shape().dims4()?;
        let out = rotate(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, heads, d, 1.0);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, _, heads, d) = x.dims4()?;
        let dx = with_values(&[grad, cos, sin], |s| rotate(s[0], s[1], s[2], heads, d, -1.0))?;
        Ok((Some(tensor(dx, x.shape())?), None, None))
    }
}

/// Fused RoPE on `x` `[B, T, heads, D]` with cos/sin tables `[B, 1, T, D]` (from
/// [`super::ops::rope_tables`]); returns `[B, T, heads, D]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (b, _, t, d) = cos.dims4()?;
    let cos = cos.reshape((b, t, d))?.contiguous()?;
    let sin = sin.reshape((b, t, d))?.contiguous()?;
    x.contiguous()?.apply_op3(&cos, &sin, Rope)
}

// ---------------------------------------------------------------------------------------
// Causal attention

/// Who may attend to whom, resolved once per forward pass: the keys each query `(b, i)` sees,
/// as a range `lo..hi` (empty = sees nothing).
#[derive(Debug, Clone)]
pub struct AttentionPattern {
    ranges: Arc<Vec<(usize, usize)>>,
    holes: Option<Arc<Vec<bool>>>,
}

impl AttentionPattern {
    /// The rule of [`super::ops::attention_mask`] for `b` rows of `t` positions, no cache:
    /// causal, within `sliding_window` if given, and within a segment (`key_padding` `[B, T]`:
    /// 0 for padding, otherwise a segment id). Padding and packing give contiguous ranges; a
    /// key marked 0 inside a query's range (a token hidden from later positions) is a hole the
    /// kernel skips; anything else is refused.
    pub fn new(key_padding: Option<&Tensor>, b: usize, t: usize, sliding_window: Option<usize>) -> Result<Self> {
        let segments: Option<Vec<u32>> =
            key_padding.map(|p| p.to_dtype(DType::U32)?.flatten_all()?.to_vec1()).transpose()?;
        let visible = |bi: usize, i: usize, j: usize| {
            if j > i || sliding_window.is_some_and(|w| i - j >= w) {
                return false;
            }
            match &segments {
                None => true,
                Some(seg) => {
                    let (qs, ks) = (seg[bi * t + i], seg[bi * t + j]);
                    ks != 0 && (qs == 0 || qs == ks)
                }
            }
        };
        let is_hole = |bi: usize, j: usize| segments.as_ref().is_some_and(|seg| seg[bi * t + j] == 0);
        let mut ranges = Vec::with_capacity(b * t);
        let mut any_hole = false;
        for bi in 0..b {
            for i in 0..t {
                let Some(lo) = (0..=i).find(|&j| visible(bi, i, j)) else {
                    ranges.push((0, 0));
                    continue;
                };
                let hi = (lo..=i).rev().find(|&j| visible(bi, i, j)).map_or(lo, |j| j + 1);
                for j in (lo..hi).filter(|&j| !visible(bi, i, j)) {
                    if !is_hole(bi, j) {
                        candle::bail!("the fused attention kernel needs each query's visible keys to be one range (row {bi}, position {i}); use the plain kernels");
                    }
                    any_hole = true;
                }
                ranges.push((lo, hi));
            }
        }
        let holes = any_hole.then(|| Arc::new((0..b * t).map(|k| is_hole(k / t, k % t)).collect()));
        Ok(Self { ranges: Arc::new(ranges), holes })
    }
}

/// Queries per tile: one tile's scores (`QUERY_TILE x S`) are the only score memory a thread
/// holds, in the forward and the backward alike.
const QUERY_TILE: usize = 64;

/// Scaled dot-product attention over q `[B, T, H, D]`, k/v `[B, T, KV, D]` → `[B, T, H, D]`,
/// with grouped-query heads. The forward keeps only each query's log-sum-exp; the backward
/// recomputes the probabilities tile by tile (FlashAttention's scheme, with one query tile
/// against all its keys at a time).
struct Attention {
    /// Visible keys `lo..hi` of each query `(b, i)`, `[B * T]`.
    ranges: Arc<Vec<(usize, usize)>>,
    /// Keys inside those ranges that no query sees, `[B * T]` (`None` = no holes).
    holes: Option<Arc<Vec<bool>>>,
    groups: usize,
    /// Log-sum-exp of each query's scaled scores `[B, H, T]`, saved by the forward.
    lse: Mutex<Vec<f32>>,
}

/// Shapes of one attention call.
#[derive(Clone, Copy)]
struct AttnDims {
    t: usize,
    h: usize,
    kv: usize,
    d: usize,
}

impl AttnDims {
    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

impl Attention {
    /// Scaled scores of queries `q0..q1` of (b, head) against keys `0..keys`, turned into
    /// probabilities with the visibility rule. Fully hidden rows attend uniformly to all keys
    /// (what an additive mask of the most negative float gives, as in transformers). With
    /// `known_lse` the probabilities are `exp(score − lse)`; otherwise each row's log-sum-exp
    /// is computed and written to `lse`.
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        dims: AttnDims,
        q: &[f32],
        k: &[f32],
        bi: usize,
        hi: usize,
        q0: usize,
        q1: usize,
        keys: usize,
        lse: &mut [f32],
        known_lse: bool,
        p: &mut [f32],
    ) {
        let AttnDims { t, h, kv, d, .. } = dims;
        let kvh = hi / self.groups;
        let rows = q1 - q0;
        let q_ptr = q[(bi * t + q0) * h * d + hi * d..].as_ptr();
        let k_ptr = k[bi * t * kv * d + kvh * d..].as_ptr();
        // p[r, j] = q[q0 + r] · k[j]
        gemm(
            rows,
            keys,
            d,
            (q_ptr, (h * d) as isize, 1),
            (k_ptr, 1, (kv * d) as isize),
            (p.as_mut_ptr(), keys as isize, 1),
            false,
            1,
        );
        let scale = dims.scale();
        for (r, row) in p.chunks_exact_mut(keys).take(rows).enumerate() {
            let (lo, hi) = self.ranges[bi * t + q0 + r];
            if lo >= hi {
                row.fill(1.0 / t as f32);
                continue;
            }
            let visible = &mut row[lo..hi];
            visible.iter_mut().for_each(|v| *v *= scale);
            if let Some(holes) = &self.holes {
                let holes = &holes[bi * t + lo..bi * t + hi];
                visible.iter_mut().zip(holes).filter(|(_, &h)| h).for_each(|(v, _)| *v = f32::NEG_INFINITY);
            }
            if known_lse {
                shifted_exp(visible, lse[r]);
            } else {
                let max = visible.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let sum = shifted_exp_sum(visible, max);
                lse[r] = (max as f64 + sum.ln()) as f32;
                let sum = sum as f32;
                visible.iter_mut().for_each(|v| *v /= sum);
            }
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
        }
    }

    /// Keys a query tile needs: up to its last query (causal), or all of them when a row in
    /// the tile sees nothing (uniform attention over every key).
    fn keys_for_tile(&self, dims: AttnDims, bi: usize, q0: usize, q1: usize) -> usize {
        let rows = &self.ranges[bi * dims.t + q0..bi * dims.t + q1];
        if rows.iter().any(|(lo, hi)| lo >= hi) {
            dims.t
        } else {
            rows.iter().map(|&(_, hi)| hi).max().unwrap_or(q1)
        }
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, t, h, d) = l1.shape().dims4()?;
        let kv = l2.shape().dims4()?.2;
        let dims = AttnDims { t, h, kv, d };
        let (q, k, v) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; b * h * t];
        let out_ptr = SharedMut(out.as_mut_ptr());
        lse.par_chunks_mut(t).enumerate().for_each(|(bh, lse)| {
            // The whole pointer wrapper (Sync), not its raw field, is what the closure captures.
            let out_ptr = &out_ptr;
            let (bi, hi) = (bh / h, bh % h);
            let kvh = hi / self.groups;
            let mut p = vec![0f32; QUERY_TILE * t];
            for q0 in (0..t).step_by(QUERY_TILE) {
                let q1 = (q0 + QUERY_TILE).min(t);
                let keys = self.keys_for_tile(dims, bi, q0, q1);
                let p = &mut p[..(q1 - q0) * keys];
                self.probabilities(dims, q, k, bi, hi, q0, q1, keys, &mut lse[q0..q1], false, p);
                // out[q0..q1, head] = p · v[0..keys]
                let v_ptr = v[bi * t * kv * d + kvh * d..].as_ptr();
                // SAFETY: rows q0..q1 of head hi in row bi belong to this task alone.
                let o_ptr = unsafe { out_ptr.0.add((bi * t + q0) * h * d + hi * d) };
                gemm(
                    q1 - q0,
                    d,
                    keys,
                    (p.as_ptr(), keys as isize, 1),
                    (v_ptr, (kv * d) as isize, 1),
                    (o_ptr, (h * d) as isize, 1),
                    false,
                    1,
                );
            }
        });
        *self.lse.lock().expect("lse lock") = lse;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, t, h, d) = q.dims4()?;
        let kv = k.dim(2)?;
        let dims = AttnDims { t, h, kv, d };
        let mut lse = self.lse.lock().expect("lse lock").clone();
        let (dq, dk, dv) = with_values(&[q, k, v, out, grad], |s| {
            let (q, k, v, o, dout) = (s[0], s[1], s[2], s[3], s[4]);
            let mut dq = vec![0f32; q.len()];
            let mut dk = vec![0f32; k.len()];
            let mut dv = vec![0f32; v.len()];
            let (dq_ptr, dk_ptr, dv_ptr) =
                (SharedMut(dq.as_mut_ptr()), SharedMut(dk.as_mut_ptr()), SharedMut(dv.as_mut_ptr()));
            let scale = dims.scale();
            // One task per (row, kv head): its query heads' dk/dv contributions add up locally.
            let lse_ptr = SharedMut(lse.as_mut_ptr());
            (0..b * kv).into_par_iter().for_each(|bk| {
                let (dq_ptr, dk_ptr, dv_ptr, lse_ptr) = (dq_ptr, dk_ptr, dv_ptr, lse_ptr);
                let (bi, kvh) = (bk / kv, bk % kv);
                let mut p = vec![0f32; QUERY_TILE * t];
                let mut dp = vec![0f32; QUERY_TILE * t];
                let kv_off = bi * t * kv * d + kvh * d;
                let kv_rs = (kv * d) as isize;
                for hi in kvh * self.groups..(kvh + 1) * self.groups {
                    // SAFETY: the lse rows of (bi, hi) are read by this task alone.
                    let lse = unsafe { std::slice::from_raw_parts_mut(lse_ptr.0.add((bi * h + hi) * t), t) };
                    for q0 in (0..t).step_by(QUERY_TILE) {
                        let q1 = (q0 + QUERY_TILE).min(t);
                        let rows = q1 - q0;
                        let keys = self.keys_for_tile(dims, bi, q0, q1);
                        let p = &mut p[..rows * keys];
                        let dp = &mut dp[..rows * keys];
                        self.probabilities(dims, q, k, bi, hi, q0, q1, keys, &mut lse[q0..q1], true, p);
                        let q_off = (bi * t + q0) * h * d + hi * d;
                        let q_rs = (h * d) as isize;
                        // dv[0..keys] += pᵀ · dout[q0..q1]
                        // SAFETY: dk/dv of (bi, kvh) and dq of (bi, hi) belong to this task.
                        unsafe {
                            gemm(
                                keys,
                                d,
                                rows,
                                (p.as_ptr(), 1, keys as isize),
                                (dout[q_off..].as_ptr(), q_rs, 1),
                                (dv_ptr.0.add(kv_off), kv_rs, 1),
                                true,
                                1,
                            );
                        }
                        // dp = dout · vᵀ
                        gemm(
                            rows,
                            keys,
                            d,
                            (dout[q_off..].as_ptr(), q_rs, 1),
                            (v[kv_off..].as_ptr(), 1, kv_rs),
                            (dp.as_mut_ptr(), keys as isize, 1),
                            false,
                            1,
                        );
                        // ds = p ∘ (dp − rowsum(dout ∘ out)) · scale
                        for r in 0..rows {
                            let off = q_off + r * h * d;
                            let delta: f32 = dout[off..off + d].iter().zip(&o[off..off + d]).map(|(a, b)| a * b).sum();
                            let (pr, dpr) = (&p[r * keys..(r + 1) * keys], &mut dp[r * keys..(r + 1) * keys]);
                            for (ds, &pv) in dpr.iter_mut().zip(pr) {
                                *ds = pv * (*ds - delta) * scale;
                            }
                        }
                        unsafe {
                            // dq[q0..q1] = ds · k[0..keys]
                            gemm(
                                rows,
                                d,
                                keys,
                                (dp.as_ptr(), keys as isize, 1),
                                (k[kv_off..].as_ptr(), kv_rs, 1),
                                (dq_ptr.0.add(q_off), q_rs, 1),
                                false,
                                1,
                            );
                            // dk[0..keys] += dsᵀ · q[q0..q1]
                            gemm(
                                keys,
                                d,
                                rows,
                                (dp.as_ptr(), 1, keys as isize),
                                (q[q_off..].as_ptr(), q_rs, 1),
                                (dk_ptr.0.add(kv_off), kv_rs, 1),
                                true,
                                1,
                            );
                        }
                    }
                }
            });
            (dq, dk, dv)
        })?;
        Ok((Some(tensor(dq, q.shape())?), Some(tensor(dk, k.shape())?), Some(tensor(dv, v.shape())?)))
    }
}

/// Fused causal attention: q `[B, T, H, D]`, k/v `[B, T, H / groups, D]` (no KV cache) →
/// `[B, T, H, D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pattern: AttentionPattern, groups: usize) -> Result<Tensor> {
    let op = Attention { ranges: pattern.ranges, holes: pattern.holes, groups, lse: Mutex::new(Vec::new()) };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

// ---------------------------------------------------------------------------------------
// LM head + log-softmax + gather

/// Rows of logits one chunk holds; `LOGIT_CHUNK x V` floats is all the logit memory used
/// when the probabilities are not kept.
const LOGIT_CHUNK: usize = 128;

/// The forward keeps the softmax of every row for the backward while it needs at most this
/// many bytes (one LM-head GEMM and a vocabulary of exponentials fewer per row); beyond it the
/// backward recomputes them chunk by chunk.
const KEEP_PROBABILITIES_BYTES: usize = 512 << 20;

/// `logp[n] = log_softmax(hidden[n] · Wᵀ)[target[n]]` without materialising the `[N, V]`
/// logits: chunks of rows are projected, reduced and dropped (or kept as probabilities when
/// small enough, see [`KEEP_PROBABILITIES_BYTES`]). The backward turns each chunk's
/// probabilities into `onehot − softmax` in place.
struct LmHeadLogps {
    targets: Vec<u32>,
    /// Whether a backward will follow and the probabilities fit the budget.
    keep: bool,
    /// Log-sum-exp of each row's logits, saved by the forward.
    lse: Mutex<Vec<f32>>,
    /// Softmax of every row `[N, V]`, saved by the forward when `keep`.
    probabilities: Mutex<Option<Vec<f32>>>,
}

/// The LM head's `[V, H]` weight as the kernel reads it: f32 values, or packed blocks
/// dequantized a tile at a time.
#[derive(Clone, Copy)]
enum HeadWeight<'a> {
    Dense(&'a [f32]),
    Packed(&'a PackedWeight),
}

impl HeadWeight<'_> {
    /// The vocabulary size V.
    fn vocab(&self, hsize: usize) -> usize {
        match self {
            Self::Dense(w) => w.len() / hsize,
            Self::Packed(p) => p.dims().0,
        }
    }

    /// Logits of rows `r0..r0 + rows` of `hidden` `[N, H]` into `out` `[rows, V]`.
    fn logits(&self, hidden: &[f32], hsize: usize, r0: usize, rows: usize, out: &mut [f32]) {
        let x = &hidden[r0 * hsize..(r0 + rows) * hsize];
        match self {
            Self::Dense(w) => {
                let v = w.len() / hsize;
                gemm(
                    rows,
                    v,
                    hsize,
                    (x.as_ptr(), hsize as isize, 1),
                    (w.as_ptr(), 1, hsize as isize),
                    (out.as_mut_ptr(), v as isize, 1),
                    false,
                    rayon::current_num_threads(),
                );
            }
            Self::Packed(p) => p.times_transposed_into(x, rows, out, p.dims().0),
        }
    }

    /// `dh = dlogits · W` for `rows` rows of `dlogits` `[rows, V]`, into `dh` `[rows, H]`.
    fn backprop(&self, dlogits: &[f32], rows: usize, hsize: usize, dh: &mut [f32]) {
        match self {
            Self::Dense(w) => {
                let vocab = w.len() / hsize;
                gemm(
                    rows,
                    hsize,
                    vocab,
                    (dlogits.as_ptr(), vocab as isize, 1),
                    (w.as_ptr(), hsize as isize, 1),
                    (dh.as_mut_ptr(), hsize as isize, 1),
                    false,
                    rayon::current_num_threads(),
                );
            }
            Self::Packed(p) => p.times_into(dlogits, rows, p.dims().0, dh),
        }
    }
}

impl LmHeadLogps {
    fn new(targets: &[u32], keep: bool) -> Self {
        Self { targets: targets.to_vec(), keep, lse: Mutex::new(Vec::new()), probabilities: Mutex::new(None) }
    }

    /// The log-probabilities of the targets for `hidden` `[N, H]`; keeps what the backward needs.
    fn forward(&self, hidden: &[f32], hsize: usize, head: HeadWeight) -> Vec<f32> {
        let n = hidden.len() / hsize;
        let vocab = head.vocab(hsize);
        let mut buffer = vec![0f32; if self.keep { n } else { LOGIT_CHUNK.min(n) } * vocab];
        let mut out = vec![0f32; n];
        let mut lse = vec![0f32; n];
        for r0 in (0..n).step_by(LOGIT_CHUNK) {
            let rows = LOGIT_CHUNK.min(n - r0);
            let logits =
                if self.keep { &mut buffer[r0 * vocab..(r0 + rows) * vocab] } else { &mut buffer[..rows * vocab] };
            head.logits(hidden, hsize, r0, rows, logits);
            logits
                .par_chunks_mut(vocab)
                .zip(out[r0..r0 + rows].par_iter_mut().zip(lse[r0..r0 + rows].par_iter_mut()))
                .enumerate()
                .for_each(|(r, (row, (o, l)))| {
                    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let target_logit = row[self.targets[r0 + r] as usize];
                    // The row's exponentials (its softmax once divided by the sum, kept for the
                    // backward when `keep`; otherwise the chunk is scratch).
                    let sum = shifted_exp_sum(row, max);
                    if self.keep {
                        let inv = (1.0 / sum) as f32;
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
                    let lse_row = max as f64 + sum.ln();
                    *l = lse_row as f32;
                    *o = (target_logit as f64 - lse_row) as f32;
                });
        }
        *self.lse.lock().expect("lse lock") = lse;
        if self.keep {
            *self.probabilities.lock().expect("probabilities lock") = Some(buffer);
        }
        out
    }

    /// The hidden states' gradient for the output gradient `g` `[N]`, and the weight's
    /// gradient added into `dw` `[V, H]` when given.
    fn backward(&self, hid: &[f32], g: &[f32], hsize: usize, head: HeadWeight, mut dw: Option<&mut [f32]>) -> Vec<f32> {
        let n = hid.len() / hsize;
        let vocab = head.vocab(hsize);
        let lse = self.lse.lock().expect("lse lock").clone();
        let mut kept = self.probabilities.lock().expect("probabilities lock").take();
        let threads = rayon::current_num_threads();
        let mut scratch = if kept.is_some() { Vec::new() } else { vec![0f32; LOGIT_CHUNK.min(n) * vocab] };
        let mut dh = vec![0f32; n * hsize];
        for r0 in (0..n).step_by(LOGIT_CHUNK) {
            let rows = LOGIT_CHUNK.min(n - r0);
            let chunk = match kept.as_mut() {
                Some(p) => &mut p[r0 * vocab..(r0 + rows) * vocab],
                None => {
                    head.logits(hid, hsize, r0, rows, &mut scratch);
                    let chunk = &mut scratch[..rows * vocab];
                    chunk.par_chunks_mut(vocab).enumerate().for_each(|(r, row)| shifted_exp(row, lse[r0 + r]));
                    chunk
                }
            };
            // dlogits = g · (onehot − softmax)
            chunk.par_chunks_mut(vocab).enumerate().for_each(|(r, row)| {
                let gr = g[r0 + r];
                row.iter_mut().for_each(|x| *x *= -gr);
                row[self.targets[r0 + r] as usize] += gr;
            });
            head.backprop(chunk, rows, hsize, &mut dh[r0 * hsize..(r0 + rows) * hsize]);
            if let Some(dw) = dw.as_deref_mut() {
                // dW += dlogitsᵀ · hidden[chunk]
                gemm(
                    vocab,
                    hsize,
                    rows,
                    (chunk.as_ptr(), 1, vocab as isize),
                    (hid[r0 * hsize..].as_ptr(), hsize as isize, 1),
                    (dw.as_mut_ptr(), hsize as isize, 1),
                    true,
                    threads,
                );
            }
        }
        dh
    }
}

impl CustomOp2 for LmHeadLogps {
    fn name(&self) -> &'static str {
        "fused-lm-head-logps"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, hsize) = l1.shape().dims2()?;
        let out = self.forward(slice(s1, l1)?, hsize, HeadWeight::Dense(slice(s2, l2)?));
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, hidden: &Tensor, w: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let hsize = hidden.dim(1)?;
        let track_w = w.track_op();
        let (dh, dw) = with_values(&[hidden, w, grad], |s| {
            let mut dw = if track_w { vec![0f32; s[1].len()] } else { Vec::new() };
            let dh = self.backward(s[0], s[2], hsize, HeadWeight::Dense(s[1]), track_w.then_some(&mut dw[..]));
            (dh, dw)
        })?;
        let dw = if track_w { Some(tensor(dw, w.shape())?) } else { None };
        Ok((Some(tensor(dh, hidden.shape())?), dw))
    }
}

/// [`LmHeadLogps`] over a packed, frozen head: only the hidden states get a gradient.
struct PackedLmHeadLogps {
    op: LmHeadLogps,
    head: Arc<PackedWeight>,
}

impl CustomOp1 for PackedLmHeadLogps {
    fn name(&self) -> &'static str {
        "fused-packed-lm-head-logps"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, hsize) = l.shape().dims2()?;
        let out = self.op.forward(slice(s, l)?, hsize, HeadWeight::Packed(&self.head));
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, hidden: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let hsize = hidden.dim(1)?;
        let dh = with_values(&[hidden, grad], |s| {
            self.op.backward(s[0], s[1], hsize, HeadWeight::Packed(&self.head), None)
        })?;
        Ok(Some(tensor(dh, hidden.shape())?))
    }
}

/// [`lm_head_logps`] over a packed, frozen output projection `[V, H]`.
pub fn packed_lm_head_logps(hidden: &Tensor, head: &Arc<PackedWeight>, targets: &[u32]) -> Result<Tensor> {
    let bytes = targets.len() * head.dims().0 * 4;
    let op = LmHeadLogps::new(targets, hidden.track_op() && bytes <= KEEP_PROBABILITIES_BYTES);
    hidden.contiguous()?.apply_op1(PackedLmHeadLogps { op, head: head.clone() })
}

/// Log-probability of `targets[n]` under `log_softmax(hidden[n] · weightᵀ)`, for hidden
/// `[N, H]` and an output projection `[V, H]`, chunked over rows (f32 CPU tensors).
pub fn lm_head_logps(hidden: &Tensor, weight: &Tensor, targets: &[u32]) -> Result<Tensor> {
    lm_head_logps_within(hidden, weight, targets, KEEP_PROBABILITIES_BYTES)
}

/// [`lm_head_logps`] keeping the probabilities for the backward only within `budget` bytes.
fn lm_head_logps_within(hidden: &Tensor, weight: &Tensor, targets: &[u32], budget: usize) -> Result<Tensor> {
    let bytes = targets.len() * weight.dim(0)? * 4;
    let keep = (hidden.track_op() || weight.track_op()) && bytes <= budget;
    hidden.contiguous()?.apply_op2(&weight.contiguous()?, LmHeadLogps::new(targets, keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops;
    use crate::model::testing::{max_abs_diff, randn};
    use candle::{Device, Var};

    /// Values and gradients (of `Σ out ∘ probe`) of a fused op and its plain twin agree.
    fn check_op(inputs: &[Tensor], fused: impl Fn(&[Tensor]) -> Tensor, plain: impl Fn(&[Tensor]) -> Tensor, tol: f32) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, yp) = (fused(&ts), plain(&ts));
        assert_eq!(yf.dims(), yp.dims());
        let diff = max_abs_diff(&yf, &yp);
        assert!(diff < tol, "forward differs by {diff}");
        let probe = randn(99, yf.dims());
        let gf = (yf * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (yp * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap());
            let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1.0);
            let diff = max_abs_diff(a, b);
            assert!(diff < tol * scale, "gradient of input {i} differs by {diff} (scale {scale})");
        }
    }

    #[test]
    fn vector_exp_is_within_two_ulp_of_expf() {
        let mut xs: Vec<f32> = (-2000..1960).map(|i| i as f32 * 0.045).collect();
        xs.extend([f32::NEG_INFINITY, -200.0, 0.0, 88.0]);
        let want: Vec<f32> = xs.iter().map(|&x| (x - 0.5).exp()).collect();
        let mut got = xs.clone();
        shifted_exp(&mut got, 0.5);
        // The summing variant writes the same values and returns their f64 sum.
        let mut summed = xs.clone();
        let sum = shifted_exp_sum(&mut summed, 0.5);
        assert_eq!(summed, got);
        let want_sum: f64 = got.iter().map(|&v| v as f64).sum();
        assert!((sum - want_sum).abs() <= 1e-12 * want_sum, "{sum} vs {want_sum}");
        for ((&x, &g), &w) in xs.iter().zip(&got).zip(&want) {
            let ulp = (w.to_bits() as i64 - g.to_bits() as i64).abs();
            assert!(
                ulp <= 2 || (w < f32::MIN_POSITIVE && g < f32::MIN_POSITIVE),
                "exp({x} - 0.5): {g} vs {w} ({ulp} ulp)"
            );
        }
    }

    #[test]
    fn rms_norm_matches_plain_values_and_gradients() {
        let (x, w) = (randn(1, &[3, 5, 16]), randn(2, &[16]));
        check_op(
            &[x, w],
            |t| rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            1e-5,
        );
    }

    #[test]
    fn silu_mul_matches_plain_values_and_gradients() {
        let (g, u) = (randn(3, &[4, 37]), randn(4, &[4, 37]));
        check_op(&[g, u], |t| silu_mul(&t[0], &t[1]).unwrap(), |t| (t[0].silu().unwrap() * &t[1]).unwrap(), 1e-5);
    }

    #[test]
    fn rope_matches_plain_values_and_gradients() {
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = randn(5, &[b, t, h, d]);
        let positions = Tensor::from_vec(vec![0u32, 1, 2, 3, 4, 3, 4, 5, 6, 7], (b, t), &Device::Cpu).unwrap();
        let (cos, sin) = ops::rope_tables(&ops::rope_inv_freq(d, 10000.0, None), &positions, DType::F32).unwrap();
        check_op(
            &[x],
            |x| apply_rope(&x[0], &cos, &sin).unwrap(),
            |x| ops::apply_rope(&x[0].transpose(1, 2).unwrap(), &cos, &sin).unwrap().transpose(1, 2).unwrap(),
            1e-5,
        );
    }

    /// Attention with padding, holes, packed segments, GQA and a sliding window, against the plain
    /// masked-softmax path, values and gradients of q, k and v.
    #[test]
    fn attention_matches_plain_values_and_gradients() {
        let (b, t, h, kv, d) = (2, 70, 4, 2, 8); // 70 > one query tile
                                                 // Row 0: two left-padding positions, then one sequence; row 1: three packed segments.
        let mut seg = vec![0u32, 0];
        seg.extend(std::iter::repeat_n(1u32, t - 2));
        seg.extend(std::iter::repeat_n(1u32, 20));
        seg.extend(std::iter::repeat_n(2u32, 30));
        seg.extend(std::iter::repeat_n(3u32, t - 50));
        // Row 0 also hides three tokens from every later position (chain of hindsight's holes).
        for p in [10, 11, 40] {
            seg[p] = 0;
        }
        let seg_t = Tensor::from_vec(seg.clone(), (b, t), &Device::Cpu).unwrap();
        for window in [None, Some(9)] {
            let mask = ops::attention_mask(Some(&seg_t), b, t, 0, window, &Device::Cpu).unwrap();
            let pattern = AttentionPattern::new(Some(&seg_t), b, t, window).unwrap();
            let inputs = [randn(6, &[b, t, h, d]), randn(7, &[b, t, kv, d]), randn(8, &[b, t, kv, d])];
            check_op(
                &inputs,
                |x| attention(&x[0], &x[1], &x[2], pattern.clone(), h / kv).unwrap(),
                |x| {
                    let tr = |y: &Tensor| y.transpose(1, 2).unwrap();
                    ops::attention(&tr(&x[0]), &tr(&x[1]), &tr(&x[2]), &mask, h / kv).unwrap().transpose(1, 2).unwrap()
                },
                2e-5,
            );
        }
    }

    /// The fused ops against their plain twins at SmolLM2-135M's sizes (width 576, 9 heads of
    /// 64 over 3 KV heads, MLP 1536, vocabulary 49,152) over 260 tokens, where precision lost
    /// to long reductions shows and the tiny shapes above hide it.
    #[test]
    fn fused_ops_match_plain_at_smollm2_sizes() {
        let (t, width, h, kv, d, mlp, vocab) = (260, 576, 9, 3, 64, 1536, 49_152);
        let (x, w) = (randn(31, &[1, t, width]), randn(32, &[width]));
        check_op(
            &[x, w],
            |a| rms_norm(&a[0], &a[1], 1e-5).unwrap(),
            |a| ops::rms_norm(&a[0], &a[1], 1e-5).unwrap(),
            1e-5,
        );
        let (g, u) = ((randn(33, &[t, mlp]) * 4.0).unwrap(), randn(34, &[t, mlp]));
        check_op(&[g, u], |a| silu_mul(&a[0], &a[1]).unwrap(), |a| (a[0].silu().unwrap() * &a[1]).unwrap(), 1e-5);
        let mask = ops::attention_mask(None, 1, t, 0, None, &Device::Cpu).unwrap();
        let pattern = AttentionPattern::new(None, 1, t, None).unwrap();
        let qkv = [
            (randn(35, &[1, t, h, d]) * 2.0).unwrap(),
            (randn(36, &[1, t, kv, d]) * 2.0).unwrap(),
            randn(37, &[1, t, kv, d]),
        ];
        check_op(
            &qkv,
            |a| attention(&a[0], &a[1], &a[2], pattern.clone(), h / kv).unwrap(),
            |a| {
                let tr = |y: &Tensor| y.transpose(1, 2).unwrap();
                ops::attention(&tr(&a[0]), &tr(&a[1]), &tr(&a[2]), &mask, h / kv).unwrap().transpose(1, 2).unwrap()
            },
            2e-5,
        );
        let targets: Vec<u32> = (0..t as u32).map(|i| (i * 7919) % vocab as u32).collect();
        let tt = Tensor::from_vec(targets.clone(), (1, t), &Device::Cpu).unwrap();
        check_op(
            &[randn(38, &[t, width]), (randn(39, &[vocab, width]) * 0.3).unwrap()],
            |a| lm_head_logps(&a[0], &a[1], &targets).unwrap(),
            |a| {
                let logits = a[0].matmul(&a[1].t().unwrap()).unwrap().unsqueeze(0).unwrap();
                ops::gather_token_logps(&logits, &tt).unwrap().squeeze(0).unwrap()
            },
            2e-5,
        );
    }

    #[test]
    fn lm_head_logps_at_smollm2_size_match_f64_log_softmax() {
        // SmolLM2's vocabulary and width, logits spread like a real model's (std ~4): a
        // single f32 accumulator over 49,152 exponentials is off by ~1e-5 here.
        let (n, hs, v) = (3, 576, 49_152);
        let hidden = randn(21, &[n, hs]);
        let weight = (randn(22, &[v, hs]) * 0.3).unwrap();
        let targets = [0u32, 17, 49_151];
        let (h, w) = (hidden.to_vec2::<f32>().unwrap(), weight.to_vec2::<f32>().unwrap());
        for budget in [KEEP_PROBABILITIES_BYTES, 0] {
            let got = lm_head_logps_within(&hidden, &weight, &targets, budget).unwrap().to_vec1::<f32>().unwrap();
            for (r, (&t, &g)) in targets.iter().zip(&got).enumerate() {
                let logits: Vec<f64> =
                    w.iter().map(|wr| wr.iter().zip(&h[r]).map(|(&a, &b)| a as f64 * b as f64).sum()).collect();
                let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
                let want = logits[t as usize] - lse;
                assert!((g as f64 - want).abs() < 2e-6 * want.abs().max(1.0), "row {r}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn lm_head_logps_matches_plain_values_and_gradients() {
        // 300 rows: more than two chunks.
        let (n, hs, v) = (300, 16, 50);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let tt = Tensor::from_vec(targets.clone(), (1, n), &Device::Cpu).unwrap();
        // Probabilities kept by the forward, and recomputed chunk by chunk in the backward.
        for budget in [KEEP_PROBABILITIES_BYTES, 0] {
            check_op(
                &[randn(9, &[n, hs]), randn(10, &[v, hs])],
                |x| lm_head_logps_within(&x[0], &x[1], &targets, budget).unwrap(),
                |x| {
                    let logits = x[0].matmul(&x[1].t().unwrap()).unwrap().unsqueeze(0).unwrap();
                    ops::gather_token_logps(&logits, &tt).unwrap().squeeze(0).unwrap()
                },
                2e-5,
            );
        }
    }
}

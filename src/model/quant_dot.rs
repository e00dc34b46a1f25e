//! Dot products of quantized weight rows with f32 activations, without writing the dequantized
//! rows to memory: each 32-value block's integers become f32 in registers and meet every
//! activation row there (token-by-token decoding reads a Q8_0 weight in a quarter of the f32
//! bytes, so it must not spend the saving on a dequantization pass). The activations stay f32:
//! the result is the dot product with the dequantized row, up to the order of the sums.

use candle::quantized::GgmlDType;

/// `out[o * n + r] = w[o] · x[r]` for the rows of `kind` in `bytes` (`inp` values each) and the
/// `n` rows of `x`. `false` (nothing written) when no kernel serves `kind` on this CPU.
pub(crate) fn dot_rows(kind: GgmlDType, bytes: &[u8], inp: usize, x: &[f32], n: usize, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        if !matches!(kind, GgmlDType::Q8_0 | GgmlDType::Q4_1) {
            return false;
        }
        let fma_f16c = std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c");
        if fma_f16c && std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, FMA and F16C (checked above); `bytes` holds whole
            // rows of `kind` blocks, `x` `n` rows of `inp` values, `out` `n` values per row.
            unsafe { x86::dot_rows_avx512(kind, bytes, inp, x, n, out) };
            return true;
        }
        if fma_f16c && std::is_x86_feature_detected!("avx2") {
            // SAFETY: as above, with AVX2.
            unsafe { x86::dot_rows(kind, bytes, inp, x, n, out) };
            return true;
        }
    }
    let _ = (kind, bytes, inp, x, n, out);
    false
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use candle::quantized::GgmlDType;

    /// Bytes of one 32-value block: Q8_0 = f16 scale + 32 × i8; Q4_1 = f16 scale, f16 minimum
    /// and 32 nibbles (value j in the low nibble of byte j, value 16 + j in its high nibble).
    fn block_bytes(kind: GgmlDType) -> usize {
        match kind {
            GgmlDType::Q8_0 => 34,
            _ => 20,
        }
    }

    /// Call `f(row, r, g, out)` for every weight row of `bytes` and every group of up to `max`
    /// activation rows starting at `r`, with `out` the row's results from `r` on.
    fn each_group(
        kind: GgmlDType,
        bytes: &[u8],
        inp: usize,
        n: usize,
        max: usize,
        out: &mut [f32],
        mut f: impl FnMut(&[u8], usize, usize, &mut [f32]),
    ) {
        let row_bytes = inp / 32 * block_bytes(kind);
        for (o, row) in bytes.chunks_exact(row_bytes).enumerate() {
            let mut r = 0;
            while r < n {
                let g = (n - r).min(max);
                f(row, r, g, &mut out[o * n + r..]);
                r += g;
            }
        }
    }

    /// See [`super::dot_rows`]; rows of `x` are taken up to four at a time.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_rows(kind: GgmlDType, bytes: &[u8], inp: usize, x: &[f32], n: usize, out: &mut [f32]) {
        each_group(kind, bytes, inp, n, 4, out, |row, r, g, out| {
            let xs = |i: usize| x.as_ptr().add((r + i) * inp);
            match g {
                1 => out[..1].copy_from_slice(&row_dots(kind, [xs(0)], row)),
                2 => out[..2].copy_from_slice(&row_dots(kind, [xs(0), xs(1)], row)),
                3 => out[..3].copy_from_slice(&row_dots(kind, [xs(0), xs(1), xs(2)], row)),
                _ => out[..4].copy_from_slice(&row_dots(kind, [xs(0), xs(1), xs(2), xs(3)], row)),
            }
        });
    }

    /// One row's dot products with `G` activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn row_dots<const G: usize>(kind: GgmlDType, x: [*const f32; G], row: &[u8]) -> [f32; G] {
        match kind {
            GgmlDType::Q8_0 => q8_0_row(x, row),
            _ => q4_1_row(x, row),
        }
    }

    /// [`dot_rows`] with 16-lane AVX-512 registers, rows of `x` taken up to eight at a time
    /// (each block's values converted once for all of them).
    #[target_feature(enable = "avx512f,fma,f16c")]
    pub(super) unsafe fn dot_rows_avx512(
        kind: GgmlDType,
        bytes: &[u8],
        inp: usize,
        x: &[f32],
        n: usize,
        out: &mut [f32],
    ) {
        each_group(kind, bytes, inp, n, 8, out, |row, r, g, out| {
            let xs = |i: usize| x.as_ptr().add((r + i) * inp);
            match g {
                1 => out[..1].copy_from_slice(&row_dots_512(kind, [xs(0)], row)),
                2 => out[..2].copy_from_slice(&row_dots_512(kind, std::array::from_fn::<_, 2, _>(xs), row)),
                3 => out[..3].copy_from_slice(&row_dots_512(kind, std::array::from_fn::<_, 3, _>(xs), row)),
                4 => out[..4].copy_from_slice(&row_dots_512(kind, std::array::from_fn::<_, 4, _>(xs), row)),
                5 => out[..5].copy_from_slice(&row_dots_512(kind, std::array::from_fn::<_, 5, _>(xs), row)),
                6 => out[..6].copy_from_slice(&row_dots_512(kind, std::array::from_fn::<_, 6, _>(xs), row)),
                7 => out[..7].copy_from_slice(&row_dots_512(kind, std::array::from_fn::<_, 7, _>(xs), row)),
                _ => out[..8].copy_from_slice(&row_dots_512(kind, std::array::from_fn::<_, 8, _>(xs), row)),
            }
        });
    }

    /// One row's dot products with `G` activation rows, 16 lanes at a time: each block's 32
    /// values as two vectors, `Σ_blocks d · Σ q·x` (+ `m · Σ x` for Q4_1).
    #[target_feature(enable = "avx512f,fma,f16c")]
    unsafe fn row_dots_512<const G: usize>(kind: GgmlDType, x: [*const f32; G], row: &[u8]) -> [f32; G] {
        let mut acc = [_mm512_setzero_ps(); G];
        let q8 = kind == GgmlDType::Q8_0;
        let low = _mm_set1_epi8(0x0F);
        for (b, block) in row.chunks_exact(block_bytes(kind)).enumerate() {
            let p = block.as_ptr();
            let d = _mm512_set1_ps(half_at(p, 0));
            let (q0, q1, m) = if q8 {
                let q0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(2).cast()));
                let q1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(18).cast()));
                (q0, q1, None)
            } else {
                let packed = _mm_loadu_si128(p.add(4).cast());
                let q0 = _mm512_cvtepu8_epi32(_mm_and_si128(packed, low));
                let q1 = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(packed, 4), low));
                (q0, q1, Some(_mm512_set1_ps(half_at(p, 2))))
            };
            let (q0, q1) = (_mm512_cvtepi32_ps(q0), _mm512_cvtepi32_ps(q1));
            for (a, xp) in acc.iter_mut().zip(x) {
                let (x0, x1) = (_mm512_loadu_ps(xp.add(b * 32)), _mm512_loadu_ps(xp.add(b * 32 + 16)));
                let t = _mm512_fmadd_ps(q1, x1, _mm512_mul_ps(q0, x0));
                *a = _mm512_fmadd_ps(t, d, *a);
                if let Some(m) = m {
                    *a = _mm512_fmadd_ps(_mm512_add_ps(x0, x1), m, *a);
                }
            }
        }
        acc.map(|a| _mm512_reduce_add_ps(a))
    }

    /// The block's f16 at byte `at`, as f32.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn half_at(block: *const u8, at: usize) -> f32 {
        let bits = u16::from_le_bytes([*block.add(at), *block.add(at + 1)]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(bits))))
    }

    /// Eight bytes at `p` as eight f32 (signed or unsigned).
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn eight(p: *const u8, signed: bool) -> __m256 {
        let v = _mm_loadl_epi64(p.cast());
        _mm256_cvtepi32_ps(if signed { _mm256_cvtepi8_epi32(v) } else { _mm256_cvtepu8_epi32(v) })
    }

    /// `Σ q · x` over one block for `G` activation rows at `x` (block offset applied), the
    /// block's values given as four vectors of eight.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_dots<const G: usize>(q: [__m256; 4], x: [*const f32; G]) -> [__m256; G] {
        x.map(|p| {
            let t = _mm256_mul_ps(q[0], _mm256_loadu_ps(p));
            let t = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(p.add(8)), t);
            let t = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(p.add(16)), t);
            _mm256_fmadd_ps(q[3], _mm256_loadu_ps(p.add(24)), t)
        })
    }

    /// A Q8_0 row's dot products with `G` activation rows: `Σ_blocks d · Σ q·x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_row<const G: usize>(x: [*const f32; G], row: &[u8]) -> [f32; G] {
        let mut acc = [_mm256_setzero_ps(); G];
        for (b, block) in row.chunks_exact(34).enumerate() {
            let p = block.as_ptr();
            let d = _mm256_set1_ps(half_at(p, 0));
            let q = [eight(p.add(2), true), eight(p.add(10), true), eight(p.add(18), true), eight(p.add(26), true)];
            let dots = block_dots(q, x.map(|x| x.add(b * 32)));
            for (a, t) in acc.iter_mut().zip(dots) {
                *a = _mm256_fmadd_ps(t, d, *a);
            }
        }
        acc.map(|a| hsum(a))
    }

    /// A Q4_1 row's dot products with `G` activation rows: `Σ_blocks d · Σ q·x + m · Σ x`.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_row<const G: usize>(x: [*const f32; G], row: &[u8]) -> [f32; G] {
        let mut acc = [_mm256_setzero_ps(); G];
        let low = _mm_set1_epi8(0x0F);
        for (b, block) in row.chunks_exact(20).enumerate() {
            let p = block.as_ptr();
            let (d, m) = (_mm256_set1_ps(half_at(p, 0)), _mm256_set1_ps(half_at(p, 2)));
            let packed = _mm_loadu_si128(p.add(4).cast());
            let nibbles: [u8; 32] =
                std::mem::transmute([_mm_and_si128(packed, low), _mm_and_si128(_mm_srli_epi16(packed, 4), low)]);
            let n = nibbles.as_ptr();
            let q = [eight(n, false), eight(n.add(8), false), eight(n.add(16), false), eight(n.add(24), false)];
            let xb = x.map(|x| x.add(b * 32));
            let dots = block_dots(q, xb);
            let one = _mm256_set1_ps(1.0);
            let sums = block_dots([one; 4], xb);
            for ((a, t), s) in acc.iter_mut().zip(dots).zip(sums) {
                *a = _mm256_fmadd_ps(s, m, _mm256_fmadd_ps(t, d, *a));
            }
        }
        acc.map(|a| hsum(a))
    }

    /// The sum of a vector's eight lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle::Device;

    use super::*;
    use crate::model::packed::PackedWeight;
    use crate::model::testing::randn;

    /// What each kernel this CPU can run computes: the dispatched one, and on x86 each
    /// instruction-set variant the CPU supports (so an AVX-512 machine checks the AVX2 kernel too).
    fn kernel_variants(
        kind: GgmlDType,
        bytes: &[u8],
        inp: usize,
        x: &[f32],
        n: usize,
    ) -> Vec<(&'static str, Vec<f32>)> {
        let out = bytes.len() / (inp / 32 * if kind == GgmlDType::Q8_0 { 34 } else { 20 });
        let mut runs = Vec::new();
        let mut got = vec![0f32; out * n];
        if dot_rows(kind, bytes, inp, x, n, &mut got) {
            runs.push(("dispatched", got));
        }
        #[cfg(target_arch = "x86_64")]
        {
            let f16c_fma = std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("fma");
            if f16c_fma && std::is_x86_feature_detected!("avx2") {
                let mut got = vec![0f32; out * n];
                // SAFETY: features checked just above.
                unsafe { x86::dot_rows(kind, bytes, inp, x, n, &mut got) };
                runs.push(("avx2", got));
            }
            if f16c_fma && std::is_x86_feature_detected!("avx512f") {
                let mut got = vec![0f32; out * n];
                // SAFETY: features checked just above.
                unsafe { x86::dot_rows_avx512(kind, bytes, inp, x, n, &mut got) };
                runs.push(("avx512", got));
            }
        }
        runs
    }

    /// The kernels' dot products equal those of the dequantized rows, for 1 to 9 activation
    /// rows (full groups and the remainders), for every variant the CPU can run.
    #[test]
    fn fused_dots_equal_dequantized_dots() {
        let (out, inp) = (5, 96);
        let w = (randn(8, &[out, inp]) * 0.1).unwrap();
        for kind in [GgmlDType::Q8_0, GgmlDType::Q4_1] {
            let packed = Arc::new(PackedWeight::quantize(&w, kind).unwrap());
            let dense = packed.dequantize(&Device::Cpu).unwrap();
            for n in 1..=9 {
                let x = randn(9 + n as u64, &[n, inp]);
                let want = dense.matmul(&x.t().unwrap()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let bytes = packed.row_bytes(0, out);
                for (variant, got) in kernel_variants(kind, bytes, inp, &xs, n) {
                    for (g, e) in got.iter().zip(&want) {
                        assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{variant} {kind:?} n={n}: {g} vs {e}");
                    }
                }
            }
        }
    }
}

//! Frozen projection weights kept small, QLoRA's idea on the CPU: GGUF's quantized blocks
//! (Q4_0 … Q8_0, Q2_K … Q6_K), bf16 or f16, as a file stores them or quantized at load
//! (`--base-quant`, like `load_in_4bit`).
//!
//! A product dequantizes a tile of rows at a time into a reused per-thread scratch buffer and
//! multiplies in f32: the result is the product with the dequantized f32 weight up to the order
//! of the sums, and no f32 copy of a whole weight ever exists. Only the input gets a gradient
//! (`dY · W`, tiled the same way): these weights are never trained.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0,
    BlockQ8_1, GgmlType,
};
use candle::quantized::{GgmlDType, QStorage, QTensor};
use candle::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Values of one dequantized tile (4 MiB of f32): large enough that the GEMM over it runs at
/// full speed, small enough to stay in the last-level cache.
const TILE_VALUES: usize = 1 << 20;

/// At most this many input rows take the matrix-vector path (token-by-token decoding), which
/// streams the packed weight once across all threads.
const FEW_ROWS: usize = 16;

/// Weight rows dequantized at a time by one thread of the matrix-vector path.
const MATVEC_ROWS: usize = 8;

thread_local! {
    /// Each thread's dequantization scratch, kept between products.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `$body` with `$T` the block type that stores values of GGUF type `$kind`.
macro_rules! with_block_type {
    ($kind:expr, $T:ident => $body:expr) => {
        match $kind {
            GgmlDType::F32 => {
                type $T = f32;
                $body
            }
            GgmlDType::F16 => {
                type $T = f16;
                $body
            }
            GgmlDType::BF16 => {
                type $T = bf16;
                $body
            }
            GgmlDType::Q4_0 => {
                type $T = BlockQ4_0;
                $body
            }
            GgmlDType::Q4_1 => {
                type $T = BlockQ4_1;
                $body
            }
            GgmlDType::Q5_0 => {
                type $T = BlockQ5_0;
                $body
            }
            GgmlDType::Q5_1 => {
                type $T = BlockQ5_1;
                $body
            }
            GgmlDType::Q8_0 => {
                type $T = BlockQ8_0;
                $body
            }
            GgmlDType::Q8_1 => {
                type $T = BlockQ8_1;
                $body
            }
            GgmlDType::Q2K => {
                type $T = BlockQ2K;
                $body
            }
            GgmlDType::Q3K => {
                type $T = BlockQ3K;
                $body
            }
            GgmlDType::Q4K => {
                type $T = BlockQ4K;
                $body
            }
            GgmlDType::Q5K => {
                type $T = BlockQ5K;
                $body
            }
            GgmlDType::Q6K => {
                type $T = BlockQ6K;
                $body
            }
            GgmlDType::Q8K => {
                type $T = BlockQ8K;
                $body
            }
        }
    };
}

/// The blocks of type `T` that `bytes` hold. Panics unless `bytes` is a whole number of
/// aligned blocks (true of every row range of a CPU `QTensor`, which stores a `Vec<T>`).
fn blocks_of<T>(bytes: &[u8]) -> &[T] {
    assert!(
        bytes.as_ptr().align_offset(std::mem::align_of::<T>()) == 0
            && bytes.len().is_multiple_of(std::mem::size_of::<T>()),
        "packed rows must be whole, aligned blocks"
    );
    // SAFETY: aligned and of whole length (checked above); every block type is plain data
    // (integers and floats), valid for any bit pattern.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / std::mem::size_of::<T>()) }
}

/// The name `--base-quant` and the README use for a GGUF type.
pub fn kind_name(kind: GgmlDType) -> &'static str {
    match kind {
        GgmlDType::F32 => "f32",
        GgmlDType::F16 => "f16",
        GgmlDType::BF16 => "bf16",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q4_1 => "q4_1",
        GgmlDType::Q5_0 => "q5_0",
        GgmlDType::Q5_1 => "q5_1",
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q8_1 => "q8_1",
        GgmlDType::Q2K => "q2_k",
        GgmlDType::Q3K => "q3_k",
        GgmlDType::Q4K => "q4_k",
        GgmlDType::Q5K => "q5_k",
        GgmlDType::Q6K => "q6_k",
        GgmlDType::Q8K => "q8_k",
    }
}

/// The types `--base-quant` accepts, in the order help lists them (`f32`: every weight dense,
/// dequantized at load).
pub const BASE_QUANT_KINDS: [GgmlDType; 10] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
    GgmlDType::BF16,
    GgmlDType::F16,
    GgmlDType::F32,
];

/// A `--base-quant` value (`q8_0`, `q4_k`, `bf16`, …), or an error listing the accepted names.
pub fn parse_base_quant(name: &str) -> std::result::Result<GgmlDType, String> {
    let wanted = name.trim().to_ascii_lowercase().replace("q4k", "q4_k").replace("q5k", "q5_k").replace("q6k", "q6_k");
    BASE_QUANT_KINDS.into_iter().find(|k| kind_name(*k) == wanted).ok_or_else(|| {
        let names: Vec<&str> = BASE_QUANT_KINDS.iter().map(|k| kind_name(*k)).collect();
        format!("unknown base quantization `{name}`: expected one of {}", names.join(", "))
    })
}

/// The type a row of `inp` values is quantized to when `kind` is asked for: `kind` itself when
/// `inp` is a multiple of its block, otherwise the 32-value type of about the same size that
/// llama.cpp falls back to (`Q4_K` → `Q5_0`, `Q5_K` → `Q5_1`, `Q6_K` → `Q8_0`).
pub fn fitting_kind(kind: GgmlDType, inp: usize) -> GgmlDType {
    if inp.is_multiple_of(kind.block_size()) {
        return kind;
    }
    match kind {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        _ => GgmlDType::Q8_0,
    }
}

/// A new `[rows.len(), in]` CPU tensor of the given rows of the 2-D `q`, in that order,
/// copied block for block (exact; GGUF's q/k row permutation is undone this way).
pub fn gather_rows(q: &QTensor, rows: &[usize]) -> Result<QTensor> {
    let (out, inp) = q.shape().dims2()?;
    if let Some(&r) = rows.iter().find(|&&r| r >= out) {
        candle::bail!("row {r} of a tensor with {out} rows");
    }
    let data = q.data()?;
    let storage = with_block_type!(q.dtype(), T => {
        let all = blocks_of::<T>(&data);
        let per_row = inp / T::BLCK_SIZE;
        let picked: Vec<T> = rows.iter().flat_map(|&r| all[r * per_row..(r + 1) * per_row].iter().cloned()).collect();
        QStorage::Cpu(Box::new(picked))
    });
    QTensor::new(storage, (rows.len(), inp))
}

/// A frozen `[out, in]` weight in packed blocks on the CPU. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct PackedWeight {
    q: QTensor,
    out: usize,
    inp: usize,
    row_bytes: usize,
}

impl PackedWeight {
    /// Wrap a 2-D CPU `QTensor` (`[out, in]`, as GGUF stores projections).
    pub fn new(q: QTensor) -> Result<Self> {
        if !q.device().is_cpu() {
            candle::bail!("packed weights live on the CPU");
        }
        let (out, inp) = q.shape().dims2()?;
        let kind = q.dtype();
        if !inp.is_multiple_of(kind.block_size()) {
            candle::bail!("a {} row must be a multiple of {} values, got {inp}", kind_name(kind), kind.block_size());
        }
        let row_bytes = inp / kind.block_size() * kind.type_size();
        Ok(Self { q, out, inp, row_bytes })
    }

    /// Quantize a dense `[out, in]` weight to `kind` (rows in parallel).
    pub fn quantize(w: &Tensor, kind: GgmlDType) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        let values = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Self::from_rows(out, inp, kind, |r, row| row.copy_from_slice(&values[r * inp..(r + 1) * inp]))
    }

    /// An `[out, in]` weight of `kind` whose row `r` is what `fill(r, row)` writes, quantized
    /// row by row in parallel: no f32 copy of the whole weight is made.
    pub fn from_rows(out: usize, inp: usize, kind: GgmlDType, fill: impl Fn(usize, &mut [f32]) + Sync) -> Result<Self> {
        if !inp.is_multiple_of(kind.block_size()) {
            candle::bail!(
                "cannot quantize rows of {inp} values to {}: not a multiple of {}",
                kind_name(kind),
                kind.block_size()
            );
        }
        let storage = with_block_type!(kind, T => {
            let per_row = inp / T::BLCK_SIZE;
            let mut blocks = vec![T::zeros(); out * per_row];
            blocks.par_chunks_mut(per_row.max(1)).enumerate().for_each_init(
                || vec![0f32; inp],
                |row, (r, b)| {
                    fill(r, row);
                    T::from_float(row, b)
                },
            );
            QStorage::Cpu(Box::new(blocks))
        });
        Self::new(QTensor::new(storage, (out, inp))?)
    }

    /// The GGUF type of the blocks.
    pub fn kind(&self) -> GgmlDType {
        self.q.dtype()
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Bytes of the packed blocks.
    pub fn storage_bytes(&self) -> usize {
        self.out * self.row_bytes
    }

    /// The whole weight dequantized to f32 on `device` (export and merging only: a full-size
    /// copy).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut values = vec![0f32; self.out * self.inp];
        self.dequantize_rows_parallel(0, &mut values);
        Tensor::from_vec(values, (self.out, self.inp), device)
    }

    /// A new packed weight of the given rows, in that order, copied block for block (exact:
    /// Phi-3's fused projections split).
    pub fn gather_rows(&self, rows: &[usize]) -> Result<Self> {
        Self::new(gather_rows(&self.q, rows)?)
    }

    /// The packed bytes of rows `first..first + rows`.
    pub(crate) fn row_bytes(&self, first: usize, rows: usize) -> &[u8] {
        let all = match self.q.data() {
            Ok(std::borrow::Cow::Borrowed(bytes)) => bytes,
            _ => unreachable!("a CPU QTensor lends its bytes (checked in PackedWeight::new)"),
        };
        &all[first * self.row_bytes..(first + rows) * self.row_bytes]
    }

    /// Rows `first..first + out.len() / in` dequantized into `out`.
    fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let bytes = self.row_bytes(first, out.len() / self.inp);
        with_block_type!(self.kind(), T => T::to_float(blocks_of::<T>(bytes), out))
    }

    /// [`Self::dequantize_rows`] with the rows spread over rayon's threads.
    fn dequantize_rows_parallel(&self, first: usize, out: &mut [f32]) {
        out.par_chunks_mut(self.inp * MATVEC_ROWS)
            .enumerate()
            .for_each(|(i, chunk)| self.dequantize_rows(first + i * MATVEC_ROWS, chunk));
    }

    /// Call `f(first_row, tile)` for consecutive tiles of dequantized rows (`tile` holds
    /// `tile.len() / in` rows), reusing this thread's scratch.
    fn for_each_tile(&self, mut f: impl FnMut(usize, &[f32])) {
        let tile_rows = (TILE_VALUES / self.inp).clamp(1, self.out.max(1));
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(tile_rows * self.inp, 0.0);
            for first in (0..self.out).step_by(tile_rows) {
                let tile = &mut scratch[..tile_rows.min(self.out - first) * self.inp];
                self.dequantize_rows_parallel(first, tile);
                f(first, tile);
            }
        });
    }

    /// `x · Wᵀ` for `x` of `n` rows of `in` values: `n` rows of `out`.
    fn times_transposed(&self, x: &[f32], n: usize) -> Vec<f32> {
        if n <= FEW_ROWS {
            return self.matvec(x, n);
        }
        let mut y = vec![0f32; n * self.out];
        self.times_transposed_into(x, n, &mut y, self.out);
        y
    }

    /// `y = x · Wᵀ` for `x` of `n` rows of `in` values, into `y` of `n` rows with a stride of
    /// `y_stride` values (the LM head's logits go into a wider buffer this way).
    pub(crate) fn times_transposed_into(&self, x: &[f32], n: usize, y: &mut [f32], y_stride: usize) {
        let inp = self.inp;
        let threads = rayon::current_num_threads();
        self.for_each_tile(|first, tile| {
            super::fused::gemm(
                n,
                tile.len() / inp,
                inp,
                (x.as_ptr(), inp as isize, 1),
                (tile.as_ptr(), 1, inp as isize),
                (y[first..].as_mut_ptr(), y_stride as isize, 1),
                false,
                threads,
            );
        });
    }

    /// `g · W` for `g` of `n` rows of `out` values: `n` rows of `in` (the input's gradient).
    fn times(&self, g: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; n * self.inp];
        self.times_into(g, n, self.out, &mut y);
        y
    }

    /// `y = g · W` for `g` of `n` rows of `out` values with a stride of `g_stride`, into `y` of
    /// `n` rows of `in`.
    pub(crate) fn times_into(&self, g: &[f32], n: usize, g_stride: usize, y: &mut [f32]) {
        let inp = self.inp;
        let threads = rayon::current_num_threads();
        self.for_each_tile(|first, tile| {
            super::fused::gemm(
                n,
                inp,
                tile.len() / inp,
                (g[first..].as_ptr(), g_stride as isize, 1),
                (tile.as_ptr(), inp as isize, 1),
                (y.as_mut_ptr(), inp as isize, 1),
                first > 0,
                threads,
            );
        });
    }

    /// Rows `ids` of the weight (an embedding lookup), dequantized: `[ids.len(), in]`.
    pub fn embedding(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.out) {
            candle::bail!("token id {id} is outside the embedding table of {} rows", self.out);
        }
        let mut values = vec![0f32; ids.len() * self.inp];
        values
            .par_chunks_mut(self.inp)
            .zip(ids.par_iter())
            .for_each(|(row, &id)| self.dequantize_rows(id as usize, row));
        Tensor::from_vec(values, (ids.len(), self.inp), device)
    }

    /// [`Self::times_transposed`] for a few rows: the weight's rows are split into one range per
    /// thread of the decode pool, and each thread takes a few rows at a time, with the fused
    /// kernels of [`super::quant_dot`] where they serve the type, else dequantizing them into
    /// its scratch first, so the packed bytes stream through once.
    fn matvec(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (inp, out) = (self.inp, self.out);
        let block = out.div_ceil(super::spin_pool::parts()).div_ceil(MATVEC_ROWS) * MATVEC_ROWS;
        // Output-major: yt[o * n + r].
        let mut yt = vec![0f32; out * n];
        let chunks: Vec<Mutex<&mut [f32]>> = yt.chunks_mut(block * n).map(Mutex::new).collect();
        super::spin_pool::run(&|part| {
            let Some(chunk) = chunks.get(part) else {
                return;
            };
            let mut chunk = chunk.lock().expect("each part locks its own chunk once");
            SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                scratch.resize(MATVEC_ROWS * inp, 0.0);
                for (i, ys) in chunk.chunks_mut(MATVEC_ROWS * n).enumerate() {
                    let (first, rows) = (part * block + i * MATVEC_ROWS, ys.len() / n);
                    if super::quant_dot::dot_rows(self.kind(), self.row_bytes(first, rows), inp, x, n, ys) {
                        continue;
                    }
                    let rows = &mut scratch[..rows * inp];
                    self.dequantize_rows(first, rows);
                    super::ops::dot_block(rows, inp, x, n, ys);
                }
            });
        });
        drop(chunks);
        if n == 1 {
            return yt;
        }
        let mut y = vec![0f32; n * out];
        for (o, col) in yt.chunks(n).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * out + o] = v;
            }
        }
        y
    }

    /// `x · Wᵀ` for `x` `[..., in]`, differentiable in `x`. On the CPU in f32 the product is
    /// tiled as described above; elsewhere (another device or dtype) the weight is
    /// dequantized for the call and multiplied by candle's matmul.
    pub fn linear(self: &Arc<Self>, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            return x.contiguous()?.apply_op1(PackedProduct { w: self.clone(), transposed: false });
        }
        let w = self.dequantize(x.device())?.to_dtype(x.dtype())?;
        super::ops::linear(x, &w, None)
    }
}

/// `y = x · Wᵀ` (or, `transposed`, `y = x · W`) for a packed `W [out, in]` over the last
/// dimension of `x`; each direction is the other's backward.
struct PackedProduct {
    w: Arc<PackedWeight>,
    transposed: bool,
}

impl CustomOp1 for PackedProduct {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::fused::slice(s, l)?;
        let (out, inp) = self.w.dims();
        let (from, to) = if self.transposed { (out, inp) } else { (inp, out) };
        let mut dims = l.shape().dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == from => *last = to,
            _ => candle::bail!("packed product: input {:?} does not end in {from}", l.shape()),
        }
        let n = x.len() / from;
        let y = if self.transposed { self.w.times(x, n) } else { self.w.times_transposed(x, n) };
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = PackedProduct { w: self.w.clone(), transposed: !self.transposed };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

#[cfg(test)]
mod tests {
    use candle::Var;

    use super::*;
    use crate::model::testing::randn;

    /// Max |a − b| / max(1, |b|) over two equal-shaped tensors.
    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0.0, f32::max)
    }

    /// Products and input gradients equal those of the dequantized weight, for every kind
    /// `--base-quant` takes, at decode (few rows) and training (many rows, several tiles) sizes.
    #[test]
    fn products_and_gradients_match_the_dequantized_weight() {
        let (out, inp) = (1100, 1024); // 1,100 rows: two tiles of 1,024 rows, the last partial
        let w = (randn(1, &[out, inp]) * 0.05).unwrap();
        for kind in BASE_QUANT_KINDS {
            let packed = Arc::new(PackedWeight::quantize(&w, kind).unwrap());
            let dense = packed.dequantize(&Device::Cpu).unwrap();
            for n in [1, 3, 8, 40] {
                let x = Var::from_tensor(&randn(2, &[n, inp])).unwrap();
                let y = packed.linear(x.as_tensor()).unwrap();
                let reference = x.as_tensor().matmul(&dense.t().unwrap()).unwrap();
                assert!(max_rel(&y, &reference) < 1e-5, "{kind:?} n={n}: {}", max_rel(&y, &reference));
                let g = randn(3, &[n, out]);
                let dx = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dx = dx.get(x.as_tensor()).unwrap();
                let expected = g.matmul(&dense).unwrap();
                assert!(max_rel(dx, &expected) < 1e-5, "{kind:?} n={n} grad: {}", max_rel(dx, &expected));
            }
        }
    }

    /// Quantization error is what each type promises: bf16 and f16 within half an ulp, Q8_0
    /// within half a step of its per-block scale (plus the scale's own f16 rounding), and the 4-bit types coarser but bounded.
    #[test]
    fn quantization_error_is_bounded_by_the_type() {
        let w = (randn(4, &[64, 512]) * 0.05).unwrap();
        let max_abs = w.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for (kind, bound) in [
            (GgmlDType::BF16, max_abs / 256.0),
            (GgmlDType::F16, max_abs / 2048.0),
            (GgmlDType::Q8_0, 0.6 * max_abs / 127.0),
            (GgmlDType::Q4K, max_abs / 7.0),
        ] {
            let back = PackedWeight::quantize(&w, kind).unwrap().dequantize(&Device::Cpu).unwrap();
            let err = (back - &w).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err <= bound && err > 0.0, "{kind:?}: error {err} against bound {bound}");
        }
    }

    /// Gathering rows copies blocks exactly: the gathered weight dequantizes to the same rows.
    #[test]
    fn gathered_rows_are_exact_copies() {
        let w = (randn(5, &[6, 256]) * 0.05).unwrap();
        let packed = PackedWeight::quantize(&w, GgmlDType::Q4K).unwrap();
        let all = packed.dequantize(&Device::Cpu).unwrap();
        let picked = packed.gather_rows(&[5, 0, 3]).unwrap().dequantize(&Device::Cpu).unwrap();
        let expected = all.index_select(&Tensor::new(&[5u32, 0, 3], &Device::Cpu).unwrap(), 0).unwrap();
        assert_eq!(picked.to_vec2::<f32>().unwrap(), expected.to_vec2::<f32>().unwrap());
        assert!(packed.gather_rows(&[6]).is_err());
    }

    /// Rows that do not fill a K-quant block fall back as llama.cpp does; names parse both ways.
    #[test]
    fn kinds_parse_and_fall_back() {
        assert_eq!(parse_base_quant("Q4_K"), Ok(GgmlDType::Q4K));
        assert_eq!(parse_base_quant("q8_0"), Ok(GgmlDType::Q8_0));
        assert_eq!(parse_base_quant("bf16"), Ok(GgmlDType::BF16));
        assert!(parse_base_quant("q3").unwrap_err().contains("q4_0, q4_1"));
        assert_eq!(fitting_kind(GgmlDType::Q4K, 576), GgmlDType::Q5_0);
        assert_eq!(fitting_kind(GgmlDType::Q4K, 1536), GgmlDType::Q4K);
        assert_eq!(fitting_kind(GgmlDType::Q6K, 576), GgmlDType::Q8_0);
        assert_eq!(fitting_kind(GgmlDType::Q8_0, 576), GgmlDType::Q8_0);
    }
}

//! The optimizer's fused CPU kernels: the AdamW update, gradient accumulation and the squared
//! norm, each in place or in one pass over f32 memory instead of a chain of allocating tensor ops.

use candle::{CpuStorage, Layout, Result, Tensor};
use rayon::prelude::*;

use crate::model::fused::{slice, with_values};

/// The scalars of one AdamW update (PyTorch's `torch.optim.AdamW`, decoupled weight decay),
/// each computed in f64 as PyTorch does in Python before the kernel sees it.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// β₁.
    pub beta1: f32,
    /// `1 − β₁`.
    pub one_minus_beta1: f32,
    /// β₂.
    pub beta2: f32,
    /// `1 − β₂`.
    pub one_minus_beta2: f32,
    /// ε.
    pub eps: f32,
    /// `lr / (1 − β₁ᵗ)`.
    pub step_size: f32,
    /// `√(1 − β₂ᵗ)`.
    pub sqrt_bias_correction2: f32,
    /// `1 − lr · weight_decay` (1 for tensors without decay).
    pub decay: f32,
}

/// An in-place update of a contiguous f32 tensor from another one's values.
struct InPlace<F: Fn(&mut [f32], &[f32])> {
    name: &'static str,
    update: F,
}

impl<F: Fn(&mut [f32], &[f32])> candle::InplaceOp2 for InPlace<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dst_l: &Layout, src: &CpuStorage, src_l: &Layout) -> Result<()> {
        let Some((start, end)) = dst_l.contiguous_offsets() else {
            candle::bail!("{}: the target must be contiguous", self.name)
        };
        let src = slice(src, src_l)?;
        let CpuStorage::F32(dst) = dst else { candle::bail!("{}: the target must be f32", self.name) };
        (self.update)(&mut dst[start..end], src);
        Ok(())
    }
}

/// One AdamW update in place: `moments` (`[2, ...]`, m then v) and `param` are overwritten;
/// two passes over memory instead of a dozen allocating tensor ops.
pub fn adamw_update(param: &Tensor, grad: &Tensor, moments: &Tensor, step: AdamWStep) -> Result<()> {
    let s = step;
    // m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²
    let moments_update = |mv: &mut [f32], g: &[f32]| {
        let (m, v) = mv.split_at_mut(g.len());
        m.par_chunks_mut(4096).zip(v.par_chunks_mut(4096)).zip(g.par_chunks(4096)).for_each(|((m, v), g)| {
            for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
                *m = s.beta1 * *m + s.one_minus_beta1 * g;
                *v = s.beta2 * *v + s.one_minus_beta2 * (g * g);
            }
        });
    };
    // p ← p·decay − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)
    let param_update = |p: &mut [f32], mv: &[f32]| {
        let (m, v) = mv.split_at(p.len());
        p.par_chunks_mut(4096).zip(m.par_chunks(4096).zip(v.par_chunks(4096))).for_each(|(p, (m, v))| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = *p * s.decay - (m / (v.sqrt() / s.sqrt_bias_correction2 + s.eps)) * s.step_size;
            }
        });
    };
    moments.inplace_op2(&grad.contiguous()?, &InPlace { name: "fused-adamw-moments", update: moments_update })?;
    param.inplace_op2(moments, &InPlace { name: "fused-adamw-update", update: param_update })
}

/// `dst += src` in place (f32 CPU tensors of one shape): gradient accumulation without a new
/// tensor per micro-batch. `dst` must not share storage with anything that should not change.
pub fn add_in_place(dst: &Tensor, src: &Tensor) -> Result<()> {
    let add = |d: &mut [f32], s: &[f32]| {
        d.par_chunks_mut(4096)
            .zip(s.par_chunks(4096))
            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, s)| *d += s));
    };
    dst.inplace_op2(&src.contiguous()?, &InPlace { name: "fused-add-in-place", update: add })
}

/// `Σ t²` accumulated in f64 (f32 CPU tensors), without a converted copy; blocks are summed
/// in order, so the result does not depend on the thread schedule.
pub fn sum_squares(t: &Tensor) -> Result<f64> {
    with_values(&[t], |s| {
        let blocks: Vec<f64> =
            s[0].par_chunks(1 << 14).map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>()).collect();
        blocks.iter().sum()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{max_abs_diff, randn};

    #[test]
    fn add_in_place_adds_into_the_first_tensor_only() {
        let a = randn(11, &[3, 5000]);
        let b = randn(12, &[3, 5000]);
        let want = (&a + &b).unwrap();
        let b_before = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        add_in_place(&a, &b).unwrap();
        assert_eq!(max_abs_diff(&a, &want), 0.0);
        assert_eq!(b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b_before);
    }
}

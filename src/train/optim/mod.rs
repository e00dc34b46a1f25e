//! AdamW with PyTorch's semantics, learning-rate schedules with transformers' semantics, and
//! global-norm gradient clipping; the fused in-place kernels they run on live in [`kernels`].

pub mod kernels;

use std::collections::HashMap;

use candle::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use self::kernels::AdamWStep;
use crate::model::fused;
use crate::model::Kernels;

/// AdamW hyper-parameters (PyTorch's defaults except the learning rate).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms and biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-5, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// One trainable tensor and its moment estimates.
struct Slot {
    name: String,
    var: Var,
    /// `[2, ...var shape]`: the first moment, then the second, in f32.
    moments: Tensor,
    decay: bool,
    /// This variable's learning rate as a multiple of the schedule's.
    lr_scale: f64,
}

/// AdamW over named variables, `torch.optim.AdamW` step for step:
/// `p ← p − lr·wd·p; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
///  p ← p − (lr / (1−β₁ᵗ)) · m / (√v / √(1−β₂ᵗ) + ε)`.
pub struct AdamW {
    slots: Vec<Slot>,
    step: u64,
    cfg: AdamWConfig,
    kernels: Kernels,
}

impl AdamW {
    /// An optimizer for `vars`; weight decay applies to tensors of rank ≥ 2 (transformers'
    /// rule: no decay on biases and norm weights).
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let mut shape = vec![2];
                shape.extend_from_slice(var.dims());
                let moments = Tensor::zeros(shape, DType::F32, var.device())?;
                let decay = var.as_tensor().rank() >= 2;
                Ok(Slot { name, moments, decay, var, lr_scale: 1.0 })
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, step: 0, cfg, kernels: Kernels::default() })
    }

    /// Update with the fused in-place kernel (f32 CPU) or with plain tensor ops.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Train the variable `name` at `scale` times the scheduled learning rate (a fresh head
    /// next to a pretrained body).
    pub fn set_lr_scale(&mut self, name: &str, scale: f64) {
        for slot in self.slots.iter_mut().filter(|s| s.name == name) {
            slot.lr_scale = scale;
        }
    }

    /// Names of the optimized variables, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// The variables, in order.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.slots.iter().map(|s| &s.var)
    }

    /// Optimizer steps taken.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Apply one update with learning rate `lr`; `grads[i]` belongs to the i-th variable
    /// (`None` = no gradient reached it: the variable is left alone, as PyTorch does).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let scheduled = lr;
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let Some(g) = grad else { continue };
            let lr = scheduled * slot.lr_scale;
            let decay = if slot.decay && c.weight_decay > 0.0 { 1.0 - lr * c.weight_decay } else { 1.0 };
            let p = slot.var.as_tensor();
            if self.kernels == Kernels::Fused && fused::supports(&[p, g]) {
                let step = AdamWStep {
                    beta1: c.beta1 as f32,
                    one_minus_beta1: (1.0 - c.beta1) as f32,
                    beta2: c.beta2 as f32,
                    one_minus_beta2: (1.0 - c.beta2) as f32,
                    eps: c.eps as f32,
                    step_size: (lr / bc1) as f32,
                    sqrt_bias_correction2: bc2.sqrt() as f32,
                    decay: decay as f32,
                };
                kernels::adamw_update(p, g, &slot.moments, step)?;
                continue;
            }
            let g = g.to_dtype(DType::F32)?;
            let p = (p.detach().to_dtype(DType::F32)? * decay)?;
            let m = ((slot.moments.get(0)? * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((slot.moments.get(1)? * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = ((&m / denom)? * (lr / bc1))?;
            slot.var.set(&(p - update)?.to_dtype(slot.var.dtype())?)?;
            slot.moments = Tensor::stack(&[m, v], 0)?;
        }
        Ok(())
    }

    /// Moment estimates and step count, for a checkpoint.
    pub fn state(&self) -> (u64, HashMap<String, Tensor>) {
        let mut tensors = HashMap::new();
        for s in &self.slots {
            // Copies: the fused update overwrites the moments in place.
            tensors.insert(
                format!("{}.exp_avg", s.name),
                s.moments.get(0).and_then(|t| t.copy()).expect("moments have two halves"),
            );
            tensors.insert(
                format!("{}.exp_avg_sq", s.name),
                s.moments.get(1).and_then(|t| t.copy()).expect("moments have two halves"),
            );
        }
        (self.step, tensors)
    }

    /// Restore what [`AdamW::state`] saved.
    pub fn load_state(&mut self, step: u64, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for s in &mut self.slots {
            let get = |k: String| {
                tensors.get(&k).cloned().ok_or_else(|| candle::Error::Msg(format!("optimizer state lacks `{k}`")))
            };
            let m = get(format!("{}.exp_avg", s.name))?.to_device(s.var.device())?.to_dtype(DType::F32)?;
            let v = get(format!("{}.exp_avg_sq", s.name))?.to_device(s.var.device())?.to_dtype(DType::F32)?;
            s.moments = Tensor::stack(&[m, v], 0)?;
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of all gradients (f64 accumulation).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += if fused::supports(&[g]) {
            kernels::sum_squares(g)?
        } else {
            g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?
        };
    }
    Ok(total.sqrt())
}

/// Scale gradients so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)`, only when below 1). Returns the norm
/// before clipping. `max_norm <= 0` disables clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Constant after warm-up.
    Constant,
    /// Linear decay to 0 at the last step.
    #[default]
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

impl std::str::FromStr for Scheduler {
    type Err = String;
    /// The names TOML recipes use (`constant`, `linear`, `cosine`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        crate::data::variant_named(s)
    }
}

/// Learning rate for the update with 0-based index `step` (transformers' `get_*_schedule_with_warmup`:
/// during warm-up `lr · step / warmup`, so the very first update uses 0 when there is warm-up).
pub fn lr_at(step: u64, peak: f64, warmup: u64, total: u64, schedule: Scheduler) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match schedule {
        Scheduler::Constant => peak,
        Scheduler::Linear => peak * (1.0 - progress).max(0.0),
        Scheduler::Cosine => peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn schedules_follow_transformers() {
        // warm-up 2 of 10 steps, peak 1.0
        let lrs: Vec<f64> = (0..10).map(|s| lr_at(s, 1.0, 2, 10, Scheduler::Linear)).collect();
        assert_eq!(&lrs[..3], &[0.0, 0.5, 1.0]);
        assert!((lrs[6] - 0.5).abs() < 1e-12, "{lrs:?}"); // (10 - 6) / 8
        assert!((lr_at(6, 1.0, 2, 10, Scheduler::Cosine) - 0.5).abs() < 1e-12);
        assert_eq!(lr_at(9, 1.0, 2, 10, Scheduler::Constant), 1.0);
        assert_eq!(lr_at(0, 1.0, 0, 10, Scheduler::Constant), 1.0);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let mut grads = vec![Some(g), None];
        assert_eq!(clip_grad_norm(&mut grads, 1.0).unwrap(), 5.0);
        let clipped = grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap();
        assert!((clipped[0] - 0.6).abs() < 1e-6 && (clipped[1] - 0.8).abs() < 1e-6);
        // max_norm 0 reports the norm and leaves the gradients alone.
        assert!((clip_grad_norm(&mut grads, 0.0).unwrap() - 1.0).abs() < 1e-6);
        assert!((grads[0].as_ref().unwrap().to_vec1::<f32>().unwrap()[0] - 0.6).abs() < 1e-6);
    }

    #[test]
    fn adamw_first_step_moves_by_lr_and_decays_matrices_only() {
        // First step: m̂ = g, v̂ = g², so the update is lr · g / (|g| + ε) ≈ lr · sign(g).
        let w = Var::from_tensor(&Tensor::new(&[[1f32, -1.0]], &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap();
        let cfg = AdamWConfig { lr: 0.1, weight_decay: 0.5, ..Default::default() };
        let mut opt = AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        let gw = Tensor::new(&[[2f32, -3.0]], &Device::Cpu).unwrap();
        let gb = Tensor::new(&[5f32], &Device::Cpu).unwrap();
        opt.step(&[Some(gw), Some(gb)], 0.1).unwrap();
        let w: Vec<Vec<f32>> = w.as_tensor().to_vec2().unwrap();
        // decay: 1 · (1 − 0.1·0.5) = 0.95, then − 0.1 → 0.85; −1 → −0.95 + 0.1 = −0.85
        assert!((w[0][0] - 0.85).abs() < 1e-6 && (w[0][1] + 0.85).abs() < 1e-6, "{w:?}");
        assert!((b.as_tensor().to_vec1::<f32>().unwrap()[0] - 0.9).abs() < 1e-6, "biases are not decayed");
    }

    #[test]
    fn a_scaled_variable_moves_by_its_own_learning_rate_on_both_kernel_paths() {
        for kernels in [Kernels::Plain, Kernels::Fused] {
            let head = Var::from_tensor(&Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap()).unwrap();
            let body = Var::from_tensor(&Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap()).unwrap();
            let mut opt =
                AdamW::new(vec![("head".into(), head.clone()), ("body".into(), body.clone())], AdamWConfig::default())
                    .unwrap();
            opt.set_kernels(kernels);
            opt.set_lr_scale("head", 100.0);
            let g = Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap();
            opt.step(&[Some(g.clone()), Some(g)], 1e-3).unwrap();
            // First step ≈ lr · sign(g): 0.1 for the head, 0.001 for the body.
            let (h, b) = (head.as_tensor().to_vec1::<f32>().unwrap(), body.as_tensor().to_vec1::<f32>().unwrap());
            assert!((h[0] + 0.1).abs() < 1e-6 && (h[1] - 0.1).abs() < 1e-6, "{kernels}: {h:?}");
            assert!((b[0] + 0.001).abs() < 1e-8 && (b[1] - 0.001).abs() < 1e-8, "{kernels}: {b:?}");
        }
    }

    /// The fused in-place update equals the plain tensor-op update over several steps, with
    /// weight decay, and leaves the same moments.
    #[test]
    fn fused_adamw_equals_plain_adamw() {
        let run = |kernels: Kernels| {
            let w = Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0, 2.0], [0.1, 0.0, -0.3]], &Device::Cpu).unwrap())
                .unwrap();
            let cfg = AdamWConfig { lr: 0.01, weight_decay: 0.1, ..Default::default() };
            let mut opt = AdamW::new(vec![("w".into(), w.clone())], cfg).unwrap();
            opt.set_kernels(kernels);
            for step in 0..3 {
                let g = (Tensor::new(&[[1f32, -2.0, 0.5], [3.0, 0.0, -1.0]], &Device::Cpu).unwrap()
                    * (step as f64 + 1.0))
                    .unwrap();
                opt.step(&[Some(g)], 0.01).unwrap();
            }
            let v = opt.state().1["w.exp_avg_sq"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (w.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(), v)
        };
        let (plain, fused) = (run(Kernels::Plain), run(Kernels::Fused));
        for (a, b) in plain.0.iter().zip(&fused.0).chain(plain.1.iter().zip(&fused.1)) {
            assert!((a - b).abs() < 1e-6, "{plain:?} vs {fused:?}");
        }
        assert!((plain.0[0] - 0.5).abs() > 0.01, "the weights moved");
    }
}

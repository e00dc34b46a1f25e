//! SinKD: the Sinkhorn distance between teacher and student distributions, spec §13b.
//!
//! Cui et al., "Sinkhorn Distance Minimization for Knowledge Distillation", arXiv 2402.17110;
//! official code 2018cx/SinKD (`loss.py`, `sinkhorn_loss`). The official code treats the
//! *samples* of a batch as the points of the transport problem:
//!
//! ```text
//! p_S[i] = softmax(z_S[i] / T),  p_T[j] = softmax(z_T[j] / T)           T = 2
//! W[i, j] = ‖p_S[i] − p_T[j]‖₁                       (cdist, p = 1; B × B over samples)
//! P = exp(−W / ε)                                    ε = 0.1
//! repeat 20 × { P ← P / rowsum(P);  P ← P / colsum(P) }   (no ε-guard, gradient through all)
//! L_sinkhorn = λ Σᵢⱼ Pᵢⱼ Wᵢⱼ                        λ = 0.001 (official loss.py since 2023-10)
//! total = kd_weight · KD_T + ce_weight · CE + sinkhorn_weight · L_sinkhorn   (0.8, 0.2, 0.8)
//! ```
//!
//! For a causal LM the samples are completion tokens (the spec's adaptation, `mode = "tokens"`:
//! the micro-batch's tokens, at most `max_samples` of them, evenly spaced), or, as in the same
//! authors' Multi-Level-OT `Sinkhorn_seq`, one transport problem per sequence over its token
//! positions (`mode = "sequence"`). Distributions are coarse-grained to the group's `top_k`
//! most likely teacher tokens plus one bin for the rest of the vocabulary, so every row stays a
//! distribution and W is `O(N² (k + 1))` instead of `O(N² V)`. The micro-batch's Sinkhorn sum is
//! weighted by its share of the step's tokens, so with one micro-batch per step the value is
//! the official batch sum.

use candle::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::kd::{check_temperature, forward_kl_metric, kl_per_token, tempered_logps, DistillTokens};
use super::{invalid, ObjectiveOutput, StepScale};
use crate::Result;

/// Which completion tokens form one transport problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SinkhornGroups {
    /// All tokens of the micro-batch (the spec's token-level adaptation).
    Tokens,
    /// Each sequence's tokens on their own (Multi-Level-OT's `Sinkhorn_seq`).
    Sequence,
}

/// SinKD hyper-parameters (the official GLUE scripts' values).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkdConfig {
    /// Softmax temperature of both models (fixed at 2 in the official code).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Entropic regularisation ε of the Gibbs kernel `exp(−W / ε)`.
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// Sinkhorn iterations (row then column normalisation each).
    #[serde(default = "default_iterations")]
    pub iterations: usize,
    /// λ multiplying `Σ P ⊙ W`.
    #[serde(default = "default_scale")]
    pub scale: f64,
    /// Weight of the Sinkhorn term in the total.
    #[serde(default = "default_sinkhorn_weight")]
    pub sinkhorn_weight: f64,
    /// Weight of the forward-KL KD term at the same temperature (0 = none).
    #[serde(default = "default_kd_weight")]
    pub kd_weight: f64,
    /// Weight of the cross-entropy on the sequence's own tokens (0 = none).
    #[serde(default = "default_ce_weight")]
    pub ce_weight: f64,
    /// Which tokens form one transport problem.
    #[serde(default = "default_groups")]
    pub mode: SinkhornGroups,
    /// Vocabulary bins kept per group: its most likely teacher tokens (plus one bin for the rest).
    #[serde(default = "default_top_k")]
    pub top_k: usize,
    /// At most this many tokens per transport problem (evenly spaced when there are more).
    #[serde(default = "default_max_samples")]
    pub max_samples: usize,
}

fn default_temperature() -> f64 {
    2.0
}
fn default_epsilon() -> f64 {
    0.1
}
fn default_iterations() -> usize {
    20
}
/// λ of the official `loss.py` since 2023-10 (its first commit used 0.002).
fn default_scale() -> f64 {
    0.001
}
fn default_sinkhorn_weight() -> f64 {
    0.8
}
fn default_kd_weight() -> f64 {
    0.8
}
fn default_ce_weight() -> f64 {
    0.2
}
fn default_groups() -> SinkhornGroups {
    SinkhornGroups::Tokens
}
fn default_top_k() -> usize {
    64
}
fn default_max_samples() -> usize {
    256
}

impl Default for SinkdConfig {
    fn default() -> Self {
        Self {
            temperature: default_temperature(),
            epsilon: default_epsilon(),
            iterations: default_iterations(),
            scale: default_scale(),
            sinkhorn_weight: default_sinkhorn_weight(),
            kd_weight: default_kd_weight(),
            ce_weight: default_ce_weight(),
            mode: default_groups(),
            top_k: default_top_k(),
            max_samples: default_max_samples(),
        }
    }
}

impl SinkdConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        check_temperature("sinkd", self.temperature)?;
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return Err(invalid("sinkd", "epsilon", "must be a positive number"));
        }
        if self.iterations == 0 {
            return Err(invalid("sinkd", "iterations", "must be at least 1"));
        }
        for (field, v) in [
            ("scale", self.scale),
            ("sinkhorn_weight", self.sinkhorn_weight),
            ("kd_weight", self.kd_weight),
            ("ce_weight", self.ce_weight),
        ] {
            if v.is_nan() || v < 0.0 {
                return Err(invalid("sinkd", field, "must be a non-negative number"));
            }
        }
        if self.top_k == 0 || self.max_samples < 2 {
            return Err(invalid(
                "sinkd",
                if self.top_k == 0 { "top_k" } else { "max_samples" },
                "too small (top_k ≥ 1, max_samples ≥ 2)",
            ));
        }
        Ok(())
    }
}

/// Pairwise L1 distances `W[i, j] = ‖a[i] − b[j]‖₁` of two `[N, K]` sets of rows (`torch.cdist`
/// with p = 1).
pub fn l1_cdist(a: &Tensor, b: &Tensor) -> candle::Result<Tensor> {
    a.unsqueeze(1)?.broadcast_sub(&b.unsqueeze(0)?)?.abs()?.sum(D::Minus1)
}

/// The official `sinkhorn_loss` without λ: `Σ P ⊙ W` for student rows `p_s` and teacher rows
/// `p_t` (`[N, K]` distributions), differentiable through every iteration.
pub fn sinkhorn_cost(p_s: &Tensor, p_t: &Tensor, epsilon: f64, iterations: usize) -> candle::Result<Tensor> {
    let w = l1_cdist(p_s, p_t)?;
    let mut p = (&w / -epsilon)?.exp()?;
    for _ in 0..iterations {
        p = p.broadcast_div(&p.sum_keepdim(1)?)?;
        p = p.broadcast_div(&p.sum_keepdim(0)?)?;
    }
    (p * w)?.sum_all()
}

/// Indices `0..n` thinned to at most `max` evenly spaced ones (first and last kept).
fn spaced(n: usize, max: usize) -> Vec<u32> {
    if n <= max {
        return (0..n as u32).collect();
    }
    (0..max).map(|i| ((i * (n - 1)) as f64 / (max - 1) as f64).round() as u32).collect()
}

/// One group's rows coarse-grained to the `top_k` ids of the group's summed teacher mass plus a
/// "rest of the vocabulary" bin: `[n, k + 1]` for student and teacher.
fn coarse_grained(p_s: &Tensor, p_t: &Tensor, top_k: usize) -> candle::Result<(Tensor, Tensor)> {
    let v = p_t.dim(1)?;
    let k = top_k.min(v);
    let mass: Vec<f32> = p_t.sum(0)?.to_vec1()?;
    let mut ids: Vec<u32> = (0..v as u32).collect();
    ids.select_nth_unstable_by(k - 1, |&a, &b| mass[b as usize].total_cmp(&mass[a as usize]));
    ids.truncate(k);
    ids.sort_unstable();
    let ids = Tensor::new(ids, p_t.device())?;
    let bins = |p: &Tensor| -> candle::Result<Tensor> {
        let kept = p.index_select(&ids, 1)?;
        let rest = (1.0 - kept.sum_keepdim(1)?)?.relu()?;
        Tensor::cat(&[kept, rest], 1)
    };
    Ok((bins(p_s)?, bins(p_t)?))
}

/// The token groups of a micro-batch: all tokens, or each sequence's (`rows`), thinned.
fn groups(rows: &Tensor, mode: SinkhornGroups, max_samples: usize) -> candle::Result<Vec<Vec<u32>>> {
    let rows: Vec<u32> = rows.to_vec1()?;
    let whole: Vec<Vec<u32>> = match mode {
        SinkhornGroups::Tokens => vec![(0..rows.len() as u32).collect()],
        SinkhornGroups::Sequence => {
            let mut by_row: Vec<Vec<u32>> = Vec::new();
            for (i, &r) in rows.iter().enumerate() {
                match by_row.last_mut() {
                    Some(g) if rows[g[0] as usize] == r => g.push(i as u32),
                    _ => by_row.push(vec![i as u32]),
                }
            }
            by_row
        }
    };
    Ok(whole
        .into_iter()
        .filter(|g| g.len() >= 2)
        .map(|g| spaced(g.len(), max_samples).into_iter().map(|i| g[i as usize]).collect())
        .collect())
}

/// The SinKD loss of a micro-batch, with `sinkd/sinkhorn` (Σ P ⊙ W per token), `sinkd/kd`,
/// `sinkd/ce` and `distill/forward_kl`.
pub fn loss(t: &DistillTokens, cfg: &SinkdConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let n = t.student_logits.dim(0)?;
    let tokens = scale.tokens.max(1.0);
    let student = tempered_logps(&t.student_logits, cfg.temperature)?;
    let teacher = tempered_logps(&t.teacher_logps, cfg.temperature)?;
    let (p_s, p_t) = (student.exp()?, teacher.exp()?);
    let mut sinkhorn = Tensor::zeros((), DType::F32, p_s.device())?;
    for group in groups(&t.rows, cfg.mode, cfg.max_samples)? {
        let idx = Tensor::new(group, p_s.device())?;
        let (s, te) = coarse_grained(&p_s.index_select(&idx, 0)?, &p_t.index_select(&idx, 0)?, cfg.top_k)?;
        sinkhorn = (sinkhorn + sinkhorn_cost(&s, &te, cfg.epsilon, cfg.iterations)?)?;
    }
    // The official value is a batch sum: each micro-batch contributes its share of the step.
    let share = n as f64 / tokens;
    let kd = (kl_per_token(&teacher, &student)?.sum_all()? / tokens)?;
    let ce = if cfg.ce_weight > 0.0 {
        (log_softmax_at(&t.student_logits, &t.targets)?.sum_all()? * (-1.0 / tokens))?
    } else {
        kd.zeros_like()?
    };
    let loss =
        ((&sinkhorn * (cfg.scale * cfg.sinkhorn_weight * share))? + (&kd * cfg.kd_weight)? + (&ce * cfg.ce_weight)?)?;
    let value = |x: &Tensor| -> Result<f64> { Ok(x.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    Ok(ObjectiveOutput {
        loss,
        metrics: vec![
            ("sinkd/sinkhorn".into(), value(&sinkhorn)? / tokens),
            ("sinkd/kd".into(), value(&kd)?),
            ("sinkd/ce".into(), value(&ce)?),
            forward_kl_metric(t, scale)?,
        ],
    })
}

/// `log softmax(z)[target]` per row `[N]`.
pub(crate) fn log_softmax_at(logits: &Tensor, targets: &Tensor) -> candle::Result<Tensor> {
    crate::tensor_ops::log_softmax(logits)?.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::kd::rows_of;
    use candle::Device;

    fn probs(rows: &[[f32; 3]], temperature: f64) -> Tensor {
        let t = Tensor::from_vec(rows.concat(), (rows.len(), 3), &Device::Cpu).unwrap();
        tempered_logps(&t, temperature).unwrap().exp().unwrap()
    }

    #[test]
    fn spec_example_two_samples() {
        // Student rows (1,1,0), (0,2,0); teacher (2,1,0), (0,3,1); T = 2 (spec §13b).
        let s = probs(&[[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]], 2.0);
        let t = probs(&[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]], 2.0);
        let w: Vec<Vec<f32>> = l1_cdist(&s, &t).unwrap().to_vec2().unwrap();
        let want = [[0.245_657, 0.489_760], [0.589_078, 0.143_394]];
        for (a, b) in w.iter().flatten().zip(want.iter().flatten()) {
            assert!((*a as f64 - b).abs() < 1e-5, "{w:?}");
        }
        let cost = sinkhorn_cost(&s, &t, 0.1, 20).unwrap().to_scalar::<f32>().unwrap() as f64;
        assert!((cost - 0.410_363).abs() < 1e-5, "{cost}");
        assert!((cost * SinkdConfig::default().scale - 0.000_410_363).abs() < 1e-8);
    }

    #[test]
    fn gradient_through_the_iterations_matches_finite_differences() {
        let dev = Device::Cpu;
        let z = [1.0f32, 1.0, 0.0, 0.0, 2.0, 0.0, 0.5, -1.0, 1.5];
        let t = probs(&[[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]], 2.0);
        let cost = |z: &[f32]| -> candle::Result<Tensor> {
            let logits = candle::Var::from_vec(z.to_vec(), (3, 3), &dev)?;
            let s = tempered_logps(logits.as_tensor(), 2.0)?.exp()?;
            let c = sinkhorn_cost(&s, &t, 0.1, 20)?;
            let g = c.backward()?;
            g.get(logits.as_tensor()).unwrap().flatten_all()
        };
        let analytic: Vec<f32> = cost(&z).unwrap().to_vec1().unwrap();
        let value = |z: &[f32]| -> f64 {
            let logits = Tensor::from_vec(z.to_vec(), (3, 3), &dev).unwrap().to_dtype(DType::F64).unwrap();
            let s = tempered_logps(&logits, 2.0).unwrap().exp().unwrap();
            sinkhorn_cost(&s, &t.to_dtype(DType::F64).unwrap(), 0.1, 20).unwrap().to_scalar::<f64>().unwrap()
        };
        let h = 1e-5;
        for i in 0..z.len() {
            let (mut up, mut down) = (z.to_vec(), z.to_vec());
            up[i] += h as f32;
            down[i] -= h as f32;
            let (zu, zd) = (up[i] as f64, down[i] as f64);
            let numeric = (value(&up) - value(&down)) / (zu - zd);
            assert!((numeric - analytic[i] as f64).abs() < 2e-3, "d/dz{i}: {numeric} vs {}", analytic[i]);
        }
        assert!(analytic.iter().any(|g| g.abs() > 1e-2), "the gradient must not vanish: {analytic:?}");
    }

    #[test]
    fn loss_groups_coarse_grain_and_weights() {
        // Two sequences of two tokens each; with k = V the rest bin is empty and the groups'
        // costs are the plain Sinkhorn costs.
        let st: [&[f32]; 4] = [&[1.0, 1.0, 0.0], &[0.0, 2.0, 0.0], &[1.0, 1.0, 0.0], &[0.0, 2.0, 0.0]];
        let te: [&[f32]; 4] = [&[2.0, 1.0, 0.0], &[0.0, 3.0, 1.0], &[2.0, 1.0, 0.0], &[0.0, 3.0, 1.0]];
        let (_, mut x) = rows_of(&st, &te);
        x.rows = Tensor::new(&[0u32, 0, 1, 1], &Device::Cpu).unwrap();
        let only_sinkhorn = SinkdConfig {
            kd_weight: 0.0,
            ce_weight: 0.0,
            sinkhorn_weight: 1.0,
            mode: SinkhornGroups::Sequence,
            ..Default::default()
        };
        let out = loss(&x, &only_sinkhorn, &StepScale::single(2, 4.0)).unwrap();
        let l = out.loss.to_scalar::<f32>().unwrap() as f64;
        assert!((l - 2.0 * 0.000_410_363).abs() < 1e-7, "{l}");
        assert_eq!(out.metrics[0].0, "sinkd/sinkhorn");
        // KD term alone at T = 2: the spec's forward KL for each row pair of §13a.
        let (_, x) = rows_of(&[&[1.0, 1.0, 0.0]], &[&[2.0, 1.0, 0.0]]);
        let kd_only = SinkdConfig { kd_weight: 1.0, ce_weight: 0.0, sinkhorn_weight: 0.0, ..Default::default() };
        let l = loss(&x, &kd_only, &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap() as f64;
        assert!((l - 0.030_990_6).abs() < 1e-6, "{l}");
        assert_eq!(spaced(10, 4), vec![0, 3, 6, 9]);
        assert!(SinkdConfig { epsilon: 0.0, ..Default::default() }.validate().is_err());
    }

    #[test]
    fn coarse_graining_keeps_the_top_teacher_ids_and_the_rest() {
        let p_t = Tensor::new(&[[0.5f32, 0.1, 0.4], [0.6, 0.3, 0.1]], &Device::Cpu).unwrap();
        let (s, t) = coarse_grained(&p_t, &p_t, 2).unwrap();
        // Summed mass: id 0 (1.1) and id 2 (0.5) are kept; id 1 goes to the rest bin.
        let t: Vec<Vec<f32>> = t.to_vec2().unwrap();
        assert_eq!(t.len(), 2);
        for (a, b) in t.iter().flatten().zip([0.5, 0.4, 0.1, 0.6, 0.1, 0.3]) {
            assert!((*a - b).abs() < 1e-6, "{t:?}");
        }
        assert_eq!(s.dims(), &[2, 3]);
    }
}

//! Knowledge distillation baselines: forward KL, reverse KL and GKD's generalized JSD between
//! the teacher's and the student's next-token distributions, spec §13a.
//!
//! Agarwal et al., "On-Policy Distillation of Language Models", arXiv 2306.13649; TRL's
//! `GKDTrainer.generalized_jsd_loss`:
//!
//! ```text
//! p_T = softmax(z_T / τ), p_S = softmax(z_S / τ)           at every completion position
//! β = 0:  KL(p_T ‖ p_S)   (forward, Hinton's KD)
//! β = 1:  KL(p_S ‖ p_T)   (reverse, MiniLLM)
//! else:   M = β p_T + (1 − β) p_S;  JSD_β = β KL(p_T ‖ M) + (1 − β) KL(p_S ‖ M)
//! L = Σ_tokens JSD_β / (completion tokens of the step)   (TRL's "batchmean" over tokens)
//! ```
//! `log M` is a two-term log-sum-exp of log-probs, never a log of summed probabilities.

use candle::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use super::{invalid, ObjectiveOutput, StepScale};
use crate::tensor_ops::{log_softmax, softplus};
use crate::Result;

/// What every distillation objective reads at the completion positions of a micro-batch.
#[derive(Debug, Clone)]
pub struct DistillTokens {
    /// The student's logits `[N, V]` (with gradient), before any temperature.
    pub student_logits: Tensor,
    /// The teacher's log-probs `[N, V]` at temperature 1 (detached). A temperature τ is applied
    /// by the objective as `log_softmax(log p_T / τ)`, which equals `log_softmax(z_T / τ)`.
    pub teacher_logps: Tensor,
    /// The sequence's own next token at each position `[N]` (u32).
    pub targets: Tensor,
    /// Which sequence of the micro-batch each position belongs to `[N]` (u32).
    pub rows: Tensor,
    /// DAC-KL's clipping network `(w1 [hidden, k], b1 [hidden], w2 [2, hidden], b2 [2])`.
    pub clip_net: Option<[Tensor; 4]>,
}

/// KD hyper-parameters (TRL's `GKDConfig` defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KdConfig {
    /// Interpolation β of the generalized JSD: 0 = forward KL(T‖S), 1 = reverse KL(S‖T).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Softmax temperature τ of both distributions.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Multiply the loss by τ² (Hinton et al.: gradients independent of τ). TRL does not.
    #[serde(default)]
    pub scale_by_temperature_squared: bool,
}

fn default_beta() -> f64 {
    0.5
}
/// TRL's `generalized_jsd_loss` runs at τ = 1 (`GKDConfig.temperature` is the sampling
/// temperature, not the loss's).
fn default_temperature() -> f64 {
    1.0
}

impl Default for KdConfig {
    fn default() -> Self {
        Self { beta: default_beta(), temperature: default_temperature(), scale_by_temperature_squared: false }
    }
}

impl KdConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.beta) {
            return Err(invalid("kd", "beta", "must lie in [0, 1] (0 = forward KL, 1 = reverse KL)"));
        }
        check_temperature("kd", self.temperature)
    }
}

/// τ must be a positive, finite number.
pub(crate) fn check_temperature(objective: &'static str, temperature: f64) -> Result<()> {
    if temperature > 0.0 && temperature.is_finite() {
        Ok(())
    } else {
        Err(invalid(objective, "temperature", "must be a positive number"))
    }
}

/// `log_softmax(x / τ)` over the vocabulary (`x` logits or log-probs).
pub fn tempered_logps(x: &Tensor, temperature: f64) -> candle::Result<Tensor> {
    if temperature == 1.0 {
        log_softmax(x)
    } else {
        log_softmax(&(x / temperature)?)
    }
}

/// `KL(p ‖ q) = Σ_v p (log p − log q)` per row `[N]`, from log-probs.
pub fn kl_per_token(log_p: &Tensor, log_q: &Tensor) -> candle::Result<Tensor> {
    (log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)
}

/// GKD's generalized JSD per row `[N]` (β = 0 forward KL, β = 1 reverse KL).
pub fn generalized_jsd(teacher: &Tensor, student: &Tensor, beta: f64) -> candle::Result<Tensor> {
    if beta == 0.0 {
        return kl_per_token(teacher, student);
    }
    if beta == 1.0 {
        return kl_per_token(student, teacher);
    }
    // log M = logsumexp(log p_S + ln(1 − β), log p_T + ln β), elementwise and stable.
    let a = (student + (1.0 - beta).ln())?;
    let b = (teacher + beta.ln())?;
    let log_m = (a.maximum(&b)? + softplus(&(&a - &b)?.abs()?.neg()?)?)?;
    (kl_per_token(teacher, &log_m)? * beta)? + (kl_per_token(student, &log_m)? * (1.0 - beta))?
}

/// The mean forward KL(p_T ‖ p_S) at τ = 1 over the step's tokens (no gradient): the one
/// divergence every distillation objective reports (`distill/forward_kl`), comparable across
/// methods and temperatures.
pub fn forward_kl_metric(t: &DistillTokens, scale: &StepScale) -> Result<(String, f64)> {
    let student = log_softmax(&t.student_logits.detach())?;
    let sum = kl_per_token(&t.teacher_logps, &student)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
    Ok(("distill/forward_kl".into(), sum / scale.tokens.max(1.0)))
}

/// The KD loss of a micro-batch, with `distill/forward_kl`.
pub fn loss(t: &DistillTokens, cfg: &KdConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let tau = cfg.temperature;
    let student = tempered_logps(&t.student_logits, tau)?;
    let teacher = tempered_logps(&t.teacher_logps, tau)?;
    let per_token = generalized_jsd(&teacher, &student, cfg.beta)?;
    let factor = if cfg.scale_by_temperature_squared { tau * tau } else { 1.0 };
    let loss = (per_token.sum_all()? * (factor / scale.tokens.max(1.0)))?;
    Ok(ObjectiveOutput { loss, metrics: vec![forward_kl_metric(t, scale)?] })
}

/// One-row [`DistillTokens`] from plain logits, for the distillation objectives' unit tests.
#[cfg(test)]
pub(crate) fn rows_of(student: &[&[f32]], teacher: &[&[f32]]) -> (candle::Var, DistillTokens) {
    let dev = candle::Device::Cpu;
    let v = student[0].len();
    let s = Tensor::from_vec(student.concat(), (student.len(), v), &dev).unwrap();
    let t = Tensor::from_vec(teacher.concat(), (teacher.len(), v), &dev).unwrap();
    let var = candle::Var::from_tensor(&s).unwrap();
    let n = student.len();
    let x = DistillTokens {
        student_logits: var.as_tensor().clone(),
        teacher_logps: log_softmax(&t).unwrap(),
        targets: Tensor::zeros(n, DType::U32, &dev).unwrap(),
        rows: Tensor::zeros(n, DType::U32, &dev).unwrap(),
        clip_net: None,
    };
    (var, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kd(beta: f64, temperature: f64, squared: bool) -> f32 {
        let (_, x) = rows_of(&[&[1.0, 1.0, 0.0]], &[&[2.0, 1.0, 0.0]]);
        let cfg = KdConfig { beta, temperature, scale_by_temperature_squared: squared };
        loss(&x, &cfg, &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn spec_numbers_at_temperature_one_and_two() {
        // Teacher logits (2, 1, 0), student (1, 1, 0): spec §13a.
        for (beta, want) in [(0.0, 0.119_630), (1.0, 0.123_292), (0.5, 0.030_045_3), (0.9, 0.011_019_4)] {
            let got = kd(beta, 1.0, false);
            assert!((got as f64 - want).abs() < 1e-6, "β = {beta}: {got} vs {want}");
        }
        assert!((kd(0.0, 2.0, false) as f64 - 0.030_990_6).abs() < 1e-6);
        assert!((kd(0.0, 2.0, true) as f64 - 0.123_962).abs() < 1e-6);
        assert!((kd(1.0, 2.0, false) as f64 - 0.030_423_7).abs() < 1e-6);
        assert!((kd(0.5, 2.0, false) as f64 - 0.007_656_13).abs() < 1e-7);
    }

    #[test]
    fn forward_kl_gradient_is_student_minus_teacher_probabilities() {
        // d KL(p_T ‖ softmax(z)) / dz = p_S − p_T.
        let (var, x) = rows_of(&[&[1.0, 1.0, 0.0]], &[&[2.0, 1.0, 0.0]]);
        let cfg = KdConfig { beta: 0.0, temperature: 1.0, scale_by_temperature_squared: false };
        let g = loss(&x, &cfg, &StepScale::single(1, 1.0)).unwrap().loss.backward().unwrap();
        let d: Vec<f32> = g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = [0.422_319 - 0.665_241, 0.422_319 - 0.244_728, 0.155_362 - 0.090_030_6];
        for (a, b) in d.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-5, "{d:?}");
        }
    }

    #[test]
    fn loss_is_a_token_mean_over_the_step_and_reports_forward_kl() {
        let (_, x) = rows_of(&[&[1.0, 1.0, 0.0], &[1.0, 1.0, 0.0]], &[&[2.0, 1.0, 0.0], &[2.0, 1.0, 0.0]]);
        let cfg = KdConfig { beta: 1.0, temperature: 1.0, scale_by_temperature_squared: false };
        let out = loss(&x, &cfg, &StepScale { examples: 1.0, tokens: 4.0 }).unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - 2.0 * 0.123_292 / 4.0).abs() < 1e-6);
        assert_eq!(out.metrics[0].0, "distill/forward_kl");
        assert!((out.metrics[0].1 - 2.0 * 0.119_630 / 4.0).abs() < 1e-6);
        assert!(KdConfig { beta: 1.5, ..Default::default() }.validate().is_err());
        assert!(KdConfig { temperature: 0.0, ..Default::default() }.validate().is_err());
    }
}

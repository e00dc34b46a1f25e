//! Text2Grad: reinforcement learning from natural-language critiques turned into span-level,
//! token-level rewards, optimised with token-level PPO.
//!
//! Wang et al., arXiv 2505.22338 (2025); official code microsoft/Text2Grad
//! (`nl_gradiant_policy_optimization/*/text2grad_trainer.py`, built on TRL's PPOTrainer);
//! spec §10:
//!
//! ```text
//! lwp_k = 1 / (1 + exp(clip(α (k − L_s) − 6, −10, 6)))            k = 1, 2, … from the first scored token
//! r_t   = s_t · lwp_t − β_kl · kl_t                                 s_t ∈ {−1, 0, 1} from the critique's spans
//! δ_t   = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  returns = A + V;  A whitened
//! ratio = exp(clamp(log π − log π_old, −20, 20))
//! pg    = mean_t max(−A ratio, −A clip(ratio, 1 − c, 1 + c))
//! vf    = ½ mean_t max((V − ret)², (clip(V, V_old − c_v, V_old + c_v) − ret)²)
//! L     = pg + vf_coef · vf
//! ```
//! The rollout-side pieces (length weights, token rewards, GAE, whitening, the adaptive KL
//! coefficient) are plain functions over `f64` slices; [`loss`] is the minibatch loss.
//!
//! Where the official code and the spec differ, the code is followed: the length weight counts
//! from the first token with a non-zero span score (`text2grad_trainer.py`, the length-penalty
//! call), not from the start of the answer (earlier tokens keep weight 1). Not reproduced: the
//! official mask that drops the token *after* each `, . ? !` (an off-by-one of its log-prob
//! shift) and the value head's dropout (inactive there: TRL runs the forward in eval mode).

use candle::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{invalid, ObjectiveOutput, StepScale};
use crate::Result;

/// How the per-token KL to the reference is estimated (TRL's `kl_penalty`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlPenalty {
    /// `log π − log π_ref` of the sampled token.
    Kl,
    /// `|log π − log π_ref|`.
    Abs,
    /// `½ (log π − log π_ref)²`.
    Mse,
    /// The full-vocabulary KL(π ‖ π_ref) at the position (the official scripts' choice).
    #[default]
    Full,
}

/// Text2Grad hyper-parameters (the SLF5K script's and TRL PPOConfig's defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Text2GradConfig {
    /// Who writes the critiques: `rule` (candor's verifier critic), `llm:MODEL`,
    /// `openai:BASE_URL`, or `nlrm:DIR` (a critique model trained with `candor critic train`).
    #[serde(default = "default_critic")]
    pub critic: String,
    /// PPO's clip range c of the probability ratio.
    #[serde(default = "default_clip")]
    pub cliprange: f64,
    /// Clip range c_v of the value prediction.
    #[serde(default = "default_clip")]
    pub cliprange_value: f64,
    /// Weight of the value loss.
    #[serde(default = "default_vf_coef")]
    pub vf_coef: f64,
    /// Discount γ.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// GAE λ.
    #[serde(default = "default_lam")]
    pub lam: f64,
    /// Starting KL coefficient β_kl.
    #[serde(default = "default_init_kl")]
    pub init_kl_coef: f64,
    /// Adapt β_kl toward `target_kl` (TRL's AdaptiveKLController); false keeps it fixed.
    #[serde(default = "default_true")]
    pub adaptive_kl: bool,
    /// The adaptive controller's target KL.
    #[serde(default = "default_target_kl")]
    pub target_kl: f64,
    /// The adaptive controller's horizon (in samples).
    #[serde(default = "default_horizon")]
    pub kl_horizon: f64,
    /// The per-token KL estimate.
    #[serde(default)]
    pub kl_penalty: KlPenalty,
    /// A minibatch whose mean ratio exceeds this is skipped (no update).
    #[serde(default = "default_ratio_threshold")]
    pub ratio_threshold: f64,
    /// Slope α of the length weight.
    #[serde(default = "default_one")]
    pub length_alpha: f64,
    /// Answer position L_s around which span scores fade out (48 officially; scale it to
    /// the answers' length).
    #[serde(default = "default_length_start")]
    pub length_start: f64,
    /// Whiten advantages over the rollout batch.
    #[serde(default = "default_true")]
    pub whiten_advantages: bool,
    /// Answers per rollout batch, TRL's PPO `batch_size` (12 in the official scripts; 0 = the
    /// whole round): each batch's advantages are whitened on their own, and the KL coefficient
    /// adapts after every batch, as each `PPOTrainer.step` call does.
    #[serde(default = "default_rollout_batch")]
    pub rollout_batch: usize,
    /// How the step's token losses are averaged.
    #[serde(default)]
    pub loss_reduction: PpoReduction,
}

/// How a step's per-token PPO losses become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PpoReduction {
    /// The mean over answers of each answer's token mean: the official trainer's (mini-batch
    /// of one answer, gradients accumulated over the batch).
    #[default]
    SequenceMean,
    /// One token mean over every answer token of the step.
    TokenMean,
}

fn default_critic() -> String {
    "rule".into()
}
fn default_clip() -> f64 {
    0.2
}
fn default_vf_coef() -> f64 {
    0.1
}
fn default_gamma() -> f64 {
    1.0
}
fn default_lam() -> f64 {
    0.95
}
fn default_init_kl() -> f64 {
    0.2
}
fn default_true() -> bool {
    true
}
fn default_target_kl() -> f64 {
    6.0
}
fn default_horizon() -> f64 {
    10000.0
}
fn default_ratio_threshold() -> f64 {
    10.0
}
fn default_one() -> f64 {
    1.0
}
fn default_length_start() -> f64 {
    48.0
}
fn default_rollout_batch() -> usize {
    12
}

impl Default for Text2GradConfig {
    fn default() -> Self {
        Self {
            critic: default_critic(),
            cliprange: default_clip(),
            cliprange_value: default_clip(),
            vf_coef: default_vf_coef(),
            gamma: default_gamma(),
            lam: default_lam(),
            init_kl_coef: default_init_kl(),
            adaptive_kl: true,
            target_kl: default_target_kl(),
            kl_horizon: default_horizon(),
            kl_penalty: KlPenalty::default(),
            ratio_threshold: default_ratio_threshold(),
            length_alpha: default_one(),
            length_start: default_length_start(),
            whiten_advantages: true,
            rollout_batch: default_rollout_batch(),
            loss_reduction: PpoReduction::default(),
        }
    }
}

impl Text2GradConfig {
    /// Reject out-of-range hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("cliprange", self.cliprange),
            ("cliprange_value", self.cliprange_value),
            ("init_kl_coef", self.init_kl_coef),
            ("vf_coef", self.vf_coef),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid("text2grad", field, "must be a number ≥ 0"));
            }
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lam) {
            return Err(invalid("text2grad", "gamma", "gamma and lam must lie in [0, 1]"));
        }
        if !(self.target_kl > 0.0 && self.kl_horizon > 0.0 && self.ratio_threshold > 0.0) {
            return Err(invalid(
                "text2grad",
                "target_kl",
                "target_kl, kl_horizon and ratio_threshold must be positive",
            ));
        }
        Ok(())
    }
}

/// The length weight of the `i`-th answer token (`i` from 1): ≈1 early, fading around
/// `start + 6/α`.
pub fn length_weight(i: usize, alpha: f64, start: f64) -> f64 {
    1.0 / (1.0 + (alpha * (i as f64 - start) - 6.0).clamp(-10.0, 6.0).exp())
}

/// Token rewards `r_t = s_t · lwp_t − β_kl · kl_t` of one answer; the length weight's count
/// starts at the first token with a non-zero score.
pub fn token_rewards(span_scores: &[f64], kl: &[f64], kl_coef: f64, cfg: &Text2GradConfig) -> Vec<f64> {
    let first = span_scores.iter().position(|&s| s != 0.0).unwrap_or(span_scores.len());
    span_scores
        .iter()
        .zip(kl)
        .enumerate()
        .map(|(t, (&s, &k))| {
            let weight = if t < first { 1.0 } else { length_weight(t - first + 1, cfg.length_alpha, cfg.length_start) };
            s * weight - kl_coef * k
        })
        .collect()
}

/// Generalised advantage estimation over one answer (the value after its last token is 0):
/// `(advantages, returns)`.
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut advantages = vec![0.0; n];
    let mut next_advantage = 0.0;
    for t in (0..n).rev() {
        let next_value = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next_value - values[t];
        next_advantage = delta + gamma * lam * next_advantage;
        advantages[t] = next_advantage;
    }
    let returns = advantages.iter().zip(values).map(|(a, v)| a + v).collect();
    (advantages, returns)
}

/// Whiten in place over all tokens of a batch: zero mean, unit variance (TRL's `whiten`, with
/// the unbiased variance and ε = 1e-8).
pub fn whiten(values: &mut [f64]) {
    let n = values.len();
    if n < 2 {
        return;
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1) as f64;
    let scale = 1.0 / (var + 1e-8).sqrt();
    for v in values {
        *v = (*v - mean) * scale;
    }
}

/// The KL coefficient after a rollout batch of `samples` answers whose mean summed KL was
/// `kl` (TRL's AdaptiveKLController: a proportional step toward `target_kl`, clipped to ±20%).
pub fn adapt_kl_coef(coef: f64, kl: f64, samples: usize, cfg: &Text2GradConfig) -> f64 {
    if !cfg.adaptive_kl {
        return coef;
    }
    let error = (kl / cfg.target_kl - 1.0).clamp(-0.2, 0.2);
    coef * (1.0 + error * samples as f64 / cfg.kl_horizon)
}

/// One answer's rollout records, per token.
#[derive(Debug, Clone, Copy)]
pub struct RolloutRecords<'a> {
    /// The critique's span score of each token.
    pub span_scores: &'a [f64],
    /// The KL estimate to the reference of each token.
    pub kl: &'a [f64],
    /// The value head's prediction at each token.
    pub values: &'a [f64],
}

/// Advantages and returns of a round's answers.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutAdvantages {
    /// `(advantages, returns)` of each answer, in order.
    pub answers: Vec<(Vec<f64>, Vec<f64>)>,
    /// The KL coefficient each rollout batch's rewards used.
    pub kl_coefs: Vec<f64>,
    /// The coefficient after the last batch's adaptation (the next round starts there).
    pub next_kl_coef: f64,
}

/// Advantages of `answers` taken `cfg.rollout_batch` at a time, as successive
/// `PPOTrainer.step` calls take them: a batch's rewards use the KL coefficient then in force,
/// its advantages are whitened over the batch, and the coefficient adapts to the batch's mean
/// summed KL before the next batch.
pub fn rollout_advantages(answers: &[RolloutRecords], kl_coef: f64, cfg: &Text2GradConfig) -> RolloutAdvantages {
    let size = if cfg.rollout_batch == 0 { answers.len().max(1) } else { cfg.rollout_batch };
    let mut out =
        RolloutAdvantages { answers: Vec::with_capacity(answers.len()), kl_coefs: Vec::new(), next_kl_coef: kl_coef };
    for batch in answers.chunks(size) {
        let coef = out.next_kl_coef;
        let mut done: Vec<(Vec<f64>, Vec<f64>)> = batch
            .iter()
            .map(|a| gae(&token_rewards(a.span_scores, a.kl, coef, cfg), a.values, cfg.gamma, cfg.lam))
            .collect();
        if cfg.whiten_advantages {
            let mut all: Vec<f64> = done.iter().flat_map(|(adv, _)| adv.iter().copied()).collect();
            whiten(&mut all);
            let mut it = all.into_iter();
            done.iter_mut().flat_map(|(adv, _)| adv.iter_mut()).for_each(|a| *a = it.next().expect("one per token"));
        }
        let mean_kl = batch.iter().map(|a| a.kl.iter().sum::<f64>()).sum::<f64>() / batch.len() as f64;
        out.next_kl_coef = adapt_kl_coef(coef, mean_kl, batch.len(), cfg);
        out.kl_coefs.push(coef);
        out.answers.extend(done);
    }
    out
}

/// The answer tokens of a PPO minibatch, flattened, all `[T]`.
#[derive(Debug, Clone)]
pub struct PpoTokens {
    /// log π of each token (with gradient).
    pub policy: Tensor,
    /// The value head's prediction at each token (with gradient).
    pub values: Tensor,
    /// log π_old recorded at the rollout.
    pub old_logps: Tensor,
    /// Values predicted at the rollout.
    pub old_values: Tensor,
    /// Whitened advantages.
    pub advantages: Tensor,
    /// Returns (advantages before whitening + old values).
    pub returns: Tensor,
    /// 1 / (answer tokens) of each token's answer, for [`PpoReduction::SequenceMean`].
    pub token_weights: Tensor,
}

/// The PPO loss of a minibatch: `pg + vf_coef · vf` averaged over the step's answers' token
/// means (or over its tokens, `loss_reduction`), with `ppo/policy_loss`, `ppo/value_loss`,
/// `ppo/clipfrac`, `ppo/approxkl`, `ppo/ratio` and `ppo/skipped` (1 when the mean ratio passed
/// `ratio_threshold` and the minibatch was dropped), averaged the same way.
pub fn loss(x: &PpoTokens, cfg: &Text2GradConfig, scale: &StepScale) -> Result<ObjectiveOutput> {
    cfg.validate()?;
    let (weights, tokens) = match cfg.loss_reduction {
        PpoReduction::SequenceMean => (x.token_weights.clone(), scale.examples.max(1.0)),
        PpoReduction::TokenMean => (x.token_weights.ones_like()?, scale.tokens.max(1.0)),
    };
    let sum = |t: &Tensor| -> Result<f64> {
        Ok((t.detach().to_dtype(DType::F32)? * &weights)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?)
    };
    let log_ratio = (&x.policy - &x.old_logps)?;
    let ratio = log_ratio.clamp(-20.0, 20.0)?.exp()?;
    let a = &x.advantages;
    let unclipped = (a.neg()? * &ratio)?;
    let clipped = (a.neg()? * ratio.clamp(1.0 - cfg.cliprange, 1.0 + cfg.cliprange)?)?;
    let pg = unclipped.maximum(&clipped)?;
    let v_clipped =
        x.values.maximum(&(&x.old_values - cfg.cliprange_value)?)?.minimum(&(&x.old_values + cfg.cliprange_value)?)?;
    let vf = (&x.values - &x.returns)?.sqr()?.maximum(&(v_clipped - &x.returns)?.sqr()?)?;
    let n = x.policy.dim(0)? as f64;
    let skip = ratio.detach().to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? / n.max(1.0) > cfg.ratio_threshold;
    let ratio_sum = sum(&ratio)?;
    let per_token = (&pg + (&vf * (0.5 * cfg.vf_coef))?)?;
    let loss = ((per_token * &weights)?.sum_all()? * if skip { 0.0 } else { 1.0 / tokens })?;
    let metrics = vec![
        ("ppo/policy_loss".to_string(), sum(&pg)? / tokens),
        ("ppo/value_loss".to_string(), 0.5 * sum(&vf)? / tokens),
        ("ppo/clipfrac".to_string(), sum(&clipped.gt(&unclipped)?.to_dtype(DType::F32)?)? / tokens),
        ("ppo/approxkl".to_string(), 0.5 * sum(&log_ratio.sqr()?)? / tokens),
        ("ppo/ratio".to_string(), ratio_sum / tokens),
        ("ppo/skipped".to_string(), if skip { sum(&x.token_weights.ones_like()?)? / tokens } else { 0.0 }),
    ];
    Ok(ObjectiveOutput { loss, metrics })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() < tol, "{a} vs {b}");
    }

    #[test]
    fn spec_length_weights() {
        close(length_weight(1, 1.0, 48.0), 0.999_955, 1e-6);
        close(length_weight(48, 1.0, 48.0), 0.997_527, 1e-6);
        close(length_weight(54, 1.0, 48.0), 0.5, 1e-9);
        close(length_weight(60, 1.0, 48.0), 0.002_472_62, 1e-8);
    }

    #[test]
    fn spec_gae_example() {
        // s = (1, 0, −1), lwp ≈ 1 (its floor is 1/(1 + e⁻¹⁰)), kl = (0.05, −0.02, 0.1), β = 0.2
        // → r = (0.99, 0.004, −1.02).
        let cfg = Text2GradConfig { length_start: 1e6, ..Default::default() };
        let r = token_rewards(&[1.0, 0.0, -1.0], &[0.05, -0.02, 0.1], 0.2, &cfg);
        for (got, want) in r.iter().zip([0.99, 0.004, -1.02]) {
            close(*got, want, 1e-4);
        }
        let (a, ret) = gae(&[0.99, 0.004, -1.02], &[0.2, 0.1, -0.3], 1.0, 0.95);
        for (got, want) in a.iter().zip([-0.136, -1.08, -0.72]) {
            close(*got, want, 1e-9);
        }
        for (got, want) in ret.iter().zip([0.064, -0.98, -1.02]) {
            close(*got, want, 1e-9);
        }
    }

    fn ppo(advantage: f32, ratio: f32) -> f32 {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let x = PpoTokens {
            policy: t(ratio.ln()),
            values: t(0.0),
            old_logps: t(0.0),
            old_values: t(0.0),
            advantages: t(advantage),
            returns: t(0.0),
            token_weights: t(1.0),
        };
        loss(&x, &Text2GradConfig::default(), &StepScale::single(1, 1.0)).unwrap().loss.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn the_length_weight_counts_from_the_first_scored_token() {
        let cfg = Text2GradConfig { length_start: 2.0, ..Default::default() };
        let r = token_rewards(&[0.0, 0.0, 1.0, 1.0], &[0.0; 4], 0.2, &cfg);
        assert_eq!(r[0], 0.0);
        close(r[2], length_weight(1, 1.0, 2.0), 1e-12);
        close(r[3], length_weight(2, 1.0, 2.0), 1e-12);
    }

    #[test]
    fn spec_ppo_terms() {
        // A = 0.8, ratio 1.3: max(−1.04, −0.96) = −0.96; A = −0.5, ratio 0.7: max(0.35, 0.40) = 0.40.
        assert!((ppo(0.8, 1.3) - (-0.96)).abs() < 1e-6);
        assert!((ppo(-0.5, 0.7) - 0.40).abs() < 1e-6);
    }

    #[test]
    fn value_loss_is_clipped_and_a_runaway_ratio_skips_the_minibatch() {
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        // V = 1, V_old = 0, return 0.5: unclipped (0.5)², clipped V = 0.2 → (−0.3)²; max 0.25,
        // times ½ · vf_coef 0.1.
        let x = PpoTokens {
            policy: t(0.0),
            values: t(1.0),
            old_logps: t(0.0),
            old_values: t(0.0),
            advantages: t(0.0),
            returns: t(0.5),
            token_weights: t(1.0),
        };
        let out = loss(&x, &Text2GradConfig::default(), &StepScale::single(1, 1.0)).unwrap();
        assert!((out.loss.to_scalar::<f32>().unwrap() - 0.0125).abs() < 1e-7);
        let runaway = PpoTokens { policy: t(3.0), ..x };
        let out = loss(&runaway, &Text2GradConfig::default(), &StepScale::single(1, 1.0)).unwrap();
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(out.metrics.iter().find(|m| m.0 == "ppo/skipped").unwrap().1, 1.0);
    }

    #[test]
    fn the_loss_averages_answer_token_means_unless_asked_for_one_token_mean() {
        // Two answers, of 1 and 3 tokens; ratio 1, advantages −1 (answer 1) and −2 (answer 2's
        // tokens): per-token pg = −A = 1 and 2, 2, 2. Sequence mean: (1 + 2) / 2 = 1.5;
        // token mean: 7 / 4 = 1.75.
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu).unwrap();
        let zeros = t(&[0.0; 4]);
        let x = PpoTokens {
            policy: zeros.clone(),
            values: zeros.clone(),
            old_logps: zeros.clone(),
            old_values: zeros.clone(),
            advantages: t(&[-1.0, -2.0, -2.0, -2.0]),
            returns: zeros,
            token_weights: t(&[1.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]),
        };
        let scale = StepScale { examples: 2.0, tokens: 4.0 };
        let value = |loss_reduction| {
            let out = loss(&x, &Text2GradConfig { loss_reduction, ..Default::default() }, &scale).unwrap();
            (out.loss.to_scalar::<f32>().unwrap(), out.metrics.iter().find(|m| m.0 == "ppo/policy_loss").unwrap().1)
        };
        let (seq, seq_metric) = value(PpoReduction::SequenceMean);
        assert!((seq - 1.5).abs() < 1e-6 && (seq_metric - 1.5).abs() < 1e-6, "{seq} {seq_metric}");
        let (tok, tok_metric) = value(PpoReduction::TokenMean);
        assert!((tok - 1.75).abs() < 1e-6 && (tok_metric - 1.75).abs() < 1e-6, "{tok} {tok_metric}");
    }

    #[test]
    fn rollout_batches_whiten_on_their_own_and_adapt_the_kl_coefficient_between_them() {
        // Four one-token answers, span scores 1, 3, 0, 2, KL 12 each (twice the target),
        // values 0, γ = 1: rewards s − β·12, advantages = rewards.
        let (scores, kl, values) = ([[1.0], [3.0], [0.0], [2.0]], [12.0], [0.0]);
        let answers: Vec<RolloutRecords> =
            scores.iter().map(|s| RolloutRecords { span_scores: s, kl: &kl, values: &values }).collect();
        let cfg = Text2GradConfig { rollout_batch: 2, ..Default::default() };
        let out = rollout_advantages(&answers, 0.2, &cfg);
        // Error clipped to +0.2, two samples of a 10000 horizon: × (1 + 0.2·2/10000) per batch.
        let second = 0.2 * (1.0 + 0.4 / 10_000.0);
        assert_eq!(out.kl_coefs.len(), 2);
        close(out.kl_coefs[0], 0.2, 1e-15);
        close(out.kl_coefs[1], second, 1e-15);
        close(out.next_kl_coef, second * (1.0 + 0.4 / 10_000.0), 1e-15);
        // Whitened within each batch of two: ∓1/√2 each (unbiased variance of two values).
        let adv: Vec<f64> = out.answers.iter().map(|(a, _)| a[0]).collect();
        let h = std::f64::consts::FRAC_1_SQRT_2;
        for (got, want) in adv.iter().zip([-h, h, -h, h]) {
            close(*got, want, 1e-6);
        }
        // Returns are the raw advantages + values: s · lwp₁ − β·12 with each batch's β.
        close(out.answers[3].1[0], 2.0 * length_weight(1, 1.0, 48.0) - second * 12.0, 1e-12);
        // One batch over the round whitens all four together.
        let whole = rollout_advantages(&answers, 0.2, &Text2GradConfig { rollout_batch: 0, ..Default::default() });
        assert_eq!(whole.kl_coefs, [0.2]);
        assert!(whole.answers[1].0[0] > 1.0, "3 is the largest of four: {:?}", whole.answers);
    }

    #[test]
    fn whitening_and_the_adaptive_kl_controller() {
        let mut a = vec![1.0, 2.0, 3.0];
        whiten(&mut a);
        close(a[0], -1.0, 1e-7);
        close(a[2], 1.0, 1e-7);
        let cfg = Text2GradConfig::default();
        // KL 12 vs target 6: error clipped to +0.2; 100 samples of a 10000 horizon: × 1.002.
        close(adapt_kl_coef(0.2, 12.0, 100, &cfg), 0.2 * 1.002, 1e-12);
        close(adapt_kl_coef(0.2, 3.0, 100, &cfg), 0.2 * 0.998, 1e-12);
    }
}

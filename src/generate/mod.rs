//! Batched sampling from a causal LM with a KV cache: left padding, temperature / top-k /
//! top-p, stop tokens, per-sample log-probs, and per-row seeds so results do not depend on
//! how prompts were batched.

use anyhow::Result;
use candle::{DType, IndexOp, Tensor};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::model::{CausalLm, ForwardOptions};

/// How to pick each next token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingConfig {
    /// Most tokens to generate per prompt.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy (argmax).
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens with this much probability (1 = off).
    pub top_p: f64,
    /// Keep only the `k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Seed of row `i`'s random stream is derived from this and `i`.
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { max_new_tokens: 256, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop token was produced (it is included in `tokens`).
    Eos,
    /// `max_new_tokens` was reached.
    Length,
}

/// One prompt's generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated token ids (with the stop token, if one ended it).
    pub tokens: Vec<u32>,
    /// `log p(token)` of each generated token under the model (temperature 1, unfiltered).
    pub logps: Vec<f32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

/// The seed of random stream `index` under run seed `seed`.
fn stream_seed(seed: u64, index: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index
}

/// Generate continuations of `prompts` (token ids) in one batch. `on_token(row, id)` is called
/// for every new token, e.g. to stream text.
pub fn generate(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    stop_ids: &[u32],
    pad_id: u32,
    cfg: &SamplingConfig,
    on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    let seeds: Vec<u64> = (0..prompts.len() as u64).map(|i| stream_seed(cfg.seed, i)).collect();
    generate_seeded(model, prompts, &seeds, stop_ids, pad_id, cfg, on_token)
}

/// The on-policy sampler: `k` samples of every prompt from `model` (pass the live policy's
/// frozen view: no copy, no reload), `batch_size` rows per batch. Sample `j` of prompt `i`
/// draws from a stream seeded by `cfg.seed`, `i` and `j` alone, so a round is reproducible
/// however it is batched. `prompts` may be a share of a larger set starting at its prompt
/// `first_prompt` (a rank's share): each prompt draws the streams of its place in the whole
/// set. `done(rows)` is called after each batch. Returns `[prompt][sample]`.
#[allow(clippy::too_many_arguments)]
pub fn sample_groups(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    first_prompt: usize,
    k: usize,
    stop_ids: &[u32],
    pad_id: u32,
    cfg: &SamplingConfig,
    batch_size: usize,
    mut done: impl FnMut(usize),
) -> Result<Vec<Vec<Generation>>> {
    let rows: Vec<(usize, usize)> = (0..prompts.len()).flat_map(|i| (0..k).map(move |j| (i, j))).collect();
    let mut out: Vec<Vec<Generation>> = vec![Vec::with_capacity(k); prompts.len()];
    for chunk in rows.chunks(batch_size.max(1)) {
        let ids: Vec<Vec<u32>> = chunk.iter().map(|&(i, _)| prompts[i].clone()).collect();
        let seeds: Vec<u64> =
            chunk.iter().map(|&(i, j)| stream_seed(cfg.seed, (((first_prompt + i) as u64) << 20) | j as u64)).collect();
        for (&(i, _), g) in chunk.iter().zip(generate_seeded(model, &ids, &seeds, stop_ids, pad_id, cfg, |_, _| {})?) {
            out[i].push(g);
        }
        done(chunk.len());
    }
    Ok(out)
}

/// [`generate`] with an explicit random-stream seed per row.
fn generate_seeded(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    seeds: &[u64],
    stop_ids: &[u32],
    pad_id: u32,
    cfg: &SamplingConfig,
    mut on_token: impl FnMut(usize, u32),
) -> Result<Vec<Generation>> {
    let device = model.device().clone();
    let n = prompts.len();
    let mut out: Vec<Generation> = (0..n)
        .map(|_| Generation { tokens: Vec::new(), logps: Vec::new(), finish_reason: FinishReason::Length })
        .collect();
    if n == 0 || cfg.max_new_tokens == 0 {
        return Ok(out);
    }
    let mut rngs: Vec<rand::rngs::StdRng> = seeds.iter().map(|&s| rand::rngs::StdRng::seed_from_u64(s)).collect();
    // Left-pad the prompts; positions count real tokens only (transformers' generate).
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![pad_id; n * longest];
    let mut mask = vec![0u32; n * longest];
    let mut positions = vec![1u32; n * longest];
    for (row, p) in prompts.iter().enumerate() {
        let offset = longest - p.len();
        ids[row * longest + offset..(row + 1) * longest].copy_from_slice(p);
        mask[row * longest + offset..(row + 1) * longest].fill(1);
        for (j, pos) in positions[row * longest + offset..(row + 1) * longest].iter_mut().enumerate() {
            *pos = j as u32;
        }
    }
    let mut next_pos: Vec<u32> = prompts.iter().map(|p| p.len() as u32).collect();
    let mut attention = Tensor::from_vec(mask, (n, longest), &device)?;
    let ids = Tensor::from_vec(ids, (n, longest), &device)?;
    let pos = Tensor::from_vec(positions, (n, longest), &device)?;
    let mut cache = model.new_cache();
    let opts = ForwardOptions { attention_mask: Some(&attention), positions: Some(&pos) };
    let hidden = model.forward_hidden(&ids, opts, Some(&mut cache))?;
    let mut logits = model.lm_logits(&hidden.i((.., longest - 1..longest, ..))?)?.squeeze(1)?;
    // `active[k]` = original row of the k-th row still generating.
    let mut active: Vec<usize> = (0..n).collect();
    for step in 0..cfg.max_new_tokens {
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(active.len());
        let mut still = Vec::with_capacity(active.len());
        for (k, &row) in active.iter().enumerate() {
            let (token, logp) = pick(&rows[k], cfg, &mut rngs[row]);
            out[row].tokens.push(token);
            out[row].logps.push(logp);
            on_token(row, token);
            if stop_ids.contains(&token) {
                out[row].finish_reason = FinishReason::Eos;
            } else {
                still.push(k);
            }
            next.push(token);
        }
        if still.is_empty() || step + 1 == cfg.max_new_tokens {
            break;
        }
        if still.len() < active.len() {
            // Finished rows leave the batch: less work for every later step.
            let keep = Tensor::from_vec(still.iter().map(|&k| k as u32).collect::<Vec<_>>(), still.len(), &device)?;
            cache.select_rows(&keep)?;
            attention = attention.index_select(&keep, 0)?;
            next = still.iter().map(|&k| next[k]).collect();
            active = still.iter().map(|&k| active[k]).collect();
        }
        let b = active.len();
        attention = Tensor::cat(&[&attention, &Tensor::ones((b, 1), DType::U32, &device)?], 1)?;
        let step_pos: Vec<u32> = active.iter().map(|&r| next_pos[r]).collect();
        for &r in &active {
            next_pos[r] += 1;
        }
        let step_ids = Tensor::from_vec(next, (b, 1), &device)?;
        let step_pos = Tensor::from_vec(step_pos, (b, 1), &device)?;
        let opts = ForwardOptions { attention_mask: Some(&attention), positions: Some(&step_pos) };
        logits = model.forward(&step_ids, opts, Some(&mut cache))?.squeeze(1)?;
    }
    Ok(out)
}

/// Choose one token from a row of logits; returns it with its unfiltered log-prob.
fn pick(logits: &[f32], cfg: &SamplingConfig, rng: &mut impl Rng) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_z = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let logp = |i: usize| logits[i] - log_z;
    if cfg.temperature <= 0.0 {
        let best = argmax(logits);
        return (best as u32, logp(best));
    }
    // transformers' order: temperature, then top-k, then top-p.
    let t = cfg.temperature as f32;
    let mut order: Vec<usize> = (0..logits.len()).collect();
    let descending = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]);
    if cfg.top_k > 0 && cfg.top_k < order.len() {
        order.select_nth_unstable_by(cfg.top_k - 1, descending);
        order.truncate(cfg.top_k);
    }
    if cfg.top_p < 1.0 {
        // Only the nucleus needs an order; without top-p the vocabulary is sampled as it is.
        order.sort_unstable_by(descending);
    }
    let top = order.iter().map(|&i| logits[i]).fold(f32::NEG_INFINITY, f32::max) / t;
    let mut probs: Vec<f32> = order.iter().map(|&i| (logits[i] / t - top).exp()).collect();
    let total: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        // Keep tokens until the kept mass reaches top_p (the token crossing it is kept).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p;
            if mass as f64 >= cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f32 = probs.iter().sum();
    let mut u = rng.random::<f32>() * total;
    for (i, p) in probs.iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return (order[i] as u32, logp(order[i]));
        }
    }
    let last = *order.last().expect("at least one candidate");
    (last as u32, logp(last))
}

fn argmax(xs: &[f32]) -> usize {
    xs.iter().enumerate().fold((0, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0
}

/// Decode tokens to text, dropping a trailing stop token.
pub fn completion_text(tok: &crate::load::TextTokenizer, g: &Generation) -> Result<String> {
    let ids = match g.finish_reason {
        FinishReason::Eos => &g.tokens[..g.tokens.len() - 1],
        FinishReason::Length => &g.tokens[..],
    };
    tok.decode(ids, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_with_its_log_prob() {
        let cfg = SamplingConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        let (t, lp) = pick(&[0.0, 2.0, 1.0], &cfg, &mut rng);
        assert_eq!(t, 1);
        let expect = 2.0 - (1f32 + 2f32.exp() + 1f32.exp()).ln();
        assert!((lp - expect).abs() < 1e-6);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_nucleus() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let cfg = SamplingConfig { temperature: 1.0, top_k: 1, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(pick(&[0.0, 5.0, 4.9], &cfg, &mut rng).0, 1);
        }
        // p = softmax([0, 5, 4.9]) ≈ (0.0035, 0.5243, 0.4723): top_p 0.5 keeps only token 1.
        let cfg = SamplingConfig { temperature: 1.0, top_p: 0.5, ..Default::default() };
        for _ in 0..20 {
            assert_eq!(pick(&[0.0, 5.0, 4.9], &cfg, &mut rng).0, 1);
        }
        // top_p 0.9 keeps tokens 1 and 2 and never the unlikely 0.
        let cfg = SamplingConfig { temperature: 1.0, top_p: 0.9, ..Default::default() };
        let seen: std::collections::HashSet<u32> = (0..200).map(|_| pick(&[0.0, 5.0, 4.9], &cfg, &mut rng).0).collect();
        assert_eq!(seen, [1, 2].into_iter().collect());
    }
}

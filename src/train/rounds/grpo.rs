//! GRPO: every sample of a round with its group-relative advantage (TRL's rule, the pools being
//! the groups), π_old's token log-probs and, with a KL term, the reference's; the round's line
//! gets TRL's reward and completion-length metrics.

use anyhow::{Context, Result};
use candor_alignment::objectives::grpo::{advantages, weighted_rewards, GrpoConfig};
use serde_json::{Map, Value};

use super::rollouts::{self, RoundRollout};
use super::{per_token, record, RoundBuilder, RoundContext, RoundData, Sample};
use crate::data::TokenizedSequence;
use crate::scoring::completion_token_logps;
use crate::train::items::Item;

/// GRPO's rounds.
pub struct GrpoRounds {
    /// The objective's configuration (advantage scaling, β).
    pub config: GrpoConfig,
    /// The sampler's `max_new_tokens`.
    pub max_tokens: usize,
    /// The judge's terms `(weight, spec)` (one for a single judge).
    pub judges: Vec<(f64, String)>,
}

impl RoundBuilder for GrpoRounds {
    fn items_per_prompt(&self, samples: usize) -> usize {
        samples
    }

    fn build(
        &self,
        ctx: &RoundContext,
        pools: &[Vec<Sample>],
        say: &mut dyn FnMut(String),
    ) -> Result<Map<String, Value>> {
        let group = pools.first().map_or(0, Vec::len);
        if pools.iter().any(|p| p.len() != group) {
            anyhow::bail!("GRPO's groups must be equal: every prompt needs `online.samples_per_prompt` samples");
        }
        let scores: Vec<f64> = pools.iter().flatten().map(|s| s.score).collect();
        let advantage = advantages(&scores, group, self.config.scale_rewards)?.values;
        let mut rollouts = Vec::with_capacity(scores.len());
        for (i, pool) in pools.iter().enumerate() {
            let accuracy = pool.iter().filter(|s| s.score > 0.5).count() as f32 / group as f32;
            for (j, s) in pool.iter().enumerate() {
                rollouts.push(RoundRollout {
                    prompt: i,
                    sample: j,
                    accuracy,
                    correct: s.score > 0.5,
                    advantage: advantage[i * group + j] as f32,
                    max_tokens: self.max_tokens,
                    ..Default::default()
                });
            }
        }
        let (frozen, trainer) = (ctx.frozen, ctx.trainer);
        let reference = match self.config.beta > 0.0 {
            true => Some(trainer.reference.as_ref().context("grpo with beta > 0 needs the reference")?),
            false => None,
        };
        say("scoring the samples under the old policy".into());
        let seqs: Vec<TokenizedSequence> = rollouts.iter().map(|r| ctx.sequence(pools, r.prompt, r.sample)).collect();
        let (batch, pad, device) = (trainer.cfg.run.batch_size, trainer.pad, frozen.device());
        let logps_under = |model| per_token(&seqs, batch, pad, device, |b| Ok([completion_token_logps(model, b)?]));
        for (r, [old]) in rollouts.iter_mut().zip(logps_under(frozen)?) {
            r.old_logps = old;
        }
        if let Some(reference) = reference {
            for (r, [by_reference]) in rollouts.iter_mut().zip(logps_under(reference)?) {
                r.reference_logps = by_reference;
            }
        }
        Ok(Map::from_iter([record(rollouts::KEY, rollouts)?]))
    }

    fn items(&self, data: &RoundData, prompt_ids: &[Vec<u32>]) -> Result<Vec<Item>> {
        rollouts::items(data, prompt_ids)
    }

    fn summarize(&self, data: &RoundData, line: &mut Map<String, Value>) -> Result<()> {
        let samples: Vec<&Sample> = data.samples.iter().flatten().filter(|s| !s.teacher).collect();
        let scores: Vec<f64> = samples.iter().map(|s| s.score).collect();
        let group = data.samples.first().map_or(1, Vec::len).max(1);
        for (key, value) in advantages(&scores, group, self.config.scale_rewards)?.metrics {
            line.insert(key, value.into());
        }
        if self.judges.len() > 1 {
            let parts: Vec<Vec<f64>> = samples.iter().map(|s| s.parts.clone()).collect();
            let names: Vec<String> = self.judges.iter().map(|(_, spec)| spec.clone()).collect();
            let weights: Vec<f64> = self.judges.iter().map(|(w, _)| *w).collect();
            if parts.iter().all(|p| p.len() == names.len()) {
                line.extend(weighted_rewards(&parts, &names, &weights).1.into_iter().map(|(k, v)| (k, v.into())));
            }
        }
        let lengths: Vec<f64> = samples.iter().map(|s| s.tokens.len() as f64).collect();
        let n = lengths.len().max(1) as f64;
        line.insert("completions/mean_length".into(), (lengths.iter().sum::<f64>() / n).into());
        line.insert("completions/min_length".into(), lengths.iter().copied().fold(f64::INFINITY, f64::min).into());
        line.insert("completions/max_length".into(), lengths.iter().copied().fold(0.0, f64::max).into());
        let clipped = lengths.iter().filter(|&&l| l >= self.max_tokens as f64).count() as f64;
        line.insert("completions/clipped_ratio".into(), (clipped / n).into());
        rollouts::summarize(data, line)
    }
}

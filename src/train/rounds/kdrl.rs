//! KDRL: GRPO's group advantages from the verifier, and the teacher's log-probs of the
//! student's own tokens (KD on the sampled path); answers the verifier accepts may skip the
//! KD term.

use anyhow::{Context, Result};
use candor_alignment::objectives::kdrl::{group_advantages, KdrlConfig};
use serde_json::{Map, Value};

use super::rollouts::{self, RoundRollout};
use super::{per_token, record, RoundBuilder, RoundContext, RoundData, Sample};
use crate::data::TokenizedSequence;
use crate::scoring::completion_token_logps;
use crate::train::items::Item;

/// KDRL's rounds.
pub struct KdrlRounds {
    /// The objective's configuration (reward-guided KD masking).
    pub config: KdrlConfig,
}

impl RoundBuilder for KdrlRounds {
    fn items_per_prompt(&self, samples: usize) -> usize {
        samples
    }

    fn build(
        &self,
        ctx: &RoundContext,
        pools: &[Vec<Sample>],
        say: &mut dyn FnMut(String),
    ) -> Result<Map<String, Value>> {
        let mut rollouts = Vec::new();
        for (i, pool) in pools.iter().enumerate() {
            let scores: Vec<f64> = pool.iter().map(|s| s.score).collect();
            let accuracy = scores.iter().filter(|&&s| s > 0.5).count() as f32 / scores.len() as f32;
            for (j, a) in group_advantages(&scores).into_iter().enumerate() {
                let correct = scores[j] > 0.5;
                let kd = self.config.applies_kd(correct);
                let advantage = a as f32;
                rollouts.push(RoundRollout {
                    prompt: i,
                    sample: j,
                    accuracy,
                    correct,
                    advantage,
                    kd,
                    ..Default::default()
                });
            }
        }
        say("scoring the samples under the old policy and the teacher".into());
        let (frozen, trainer) = (ctx.frozen, ctx.trainer);
        let teacher = trainer.teacher.as_ref().context("kdrl needs the teacher (`[distill] teacher`)")?;
        let seqs: Vec<TokenizedSequence> = rollouts.iter().map(|r| ctx.sequence(pools, r.prompt, r.sample)).collect();
        let records = per_token(&seqs, trainer.cfg.run.batch_size, trainer.pad, frozen.device(), |b| {
            Ok([completion_token_logps(frozen, b)?, completion_token_logps(teacher, b)?])
        })?;
        for (r, [old, by_teacher]) in rollouts.iter_mut().zip(records) {
            r.old_logps = old;
            r.teacher_logps = by_teacher;
        }
        Ok(Map::from_iter([record(rollouts::KEY, rollouts)?]))
    }

    fn items(&self, data: &RoundData, prompt_ids: &[Vec<u32>]) -> Result<Vec<Item>> {
        rollouts::items(data, prompt_ids)
    }

    fn summarize(&self, data: &RoundData, line: &mut Map<String, Value>) -> Result<()> {
        rollouts::summarize(data, line)
    }
}

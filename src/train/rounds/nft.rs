//! NFT: every sample of a question the verifier neither always accepts nor always rejects,
//! labelled, with π_old's per-token log-probs.

use anyhow::Result;
use candor_alignment::objectives::nft::question_accuracy;
use serde_json::{Map, Value};

use super::rollouts::{self, RoundRollout};
use super::{per_token, record, RoundBuilder, RoundContext, RoundData, Sample};
use crate::data::TokenizedSequence;
use crate::scoring::completion_token_logps;
use crate::train::items::Item;

/// NFT's rounds.
pub struct NftRounds;

impl RoundBuilder for NftRounds {
    fn items_per_prompt(&self, samples: usize) -> usize {
        samples
    }

    fn build(
        &self,
        ctx: &RoundContext,
        pools: &[Vec<Sample>],
        _: &mut dyn FnMut(String),
    ) -> Result<Map<String, Value>> {
        let mut rollouts = Vec::new();
        for (i, pool) in pools.iter().enumerate() {
            let correct: Vec<bool> = pool.iter().map(|s| s.score > 0.5).collect();
            if let Some(accuracy) = question_accuracy(&correct) {
                for (j, &c) in correct.iter().enumerate() {
                    let accuracy = accuracy as f32;
                    rollouts.push(RoundRollout { prompt: i, sample: j, accuracy, correct: c, ..Default::default() });
                }
            }
        }
        let seqs: Vec<TokenizedSequence> = rollouts.iter().map(|r| ctx.sequence(pools, r.prompt, r.sample)).collect();
        let (frozen, trainer) = (ctx.frozen, ctx.trainer);
        let records = per_token(&seqs, trainer.cfg.run.batch_size, trainer.pad, frozen.device(), |b| {
            Ok([completion_token_logps(frozen, b)?])
        })?;
        for (r, [logps]) in rollouts.iter_mut().zip(records) {
            r.old_logps = logps;
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

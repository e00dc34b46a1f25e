//! INPO and DNO: each prompt's best- and worst-judged answers as a pair, with the frozen
//! previous iterate's summed log-probs (and the reference's, when the run has one).

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{record, RoundBuilder, RoundContext, RoundData, Sample};
use crate::train::inputs::summed_pair_logps;
use crate::train::items::{Item, PairItem};

/// A pair of one prompt's pool, with the frozen log-probs the loss needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundPair {
    prompt: usize,
    chosen: usize,
    rejected: usize,
    /// π_t's summed log-probs (chosen, rejected).
    previous: (f32, f32),
    /// π_ref's (INPO with τ > 0).
    reference: Option<(f32, f32)>,
}

/// Best-vs-worst pairs whose scores differ by more than `min_margin`.
pub struct PairRounds {
    /// `online.min_margin`.
    pub min_margin: f64,
}

impl RoundBuilder for PairRounds {
    fn items_per_prompt(&self, _samples: usize) -> usize {
        1
    }

    fn build(
        &self,
        ctx: &RoundContext,
        pools: &[Vec<Sample>],
        _: &mut dyn FnMut(String),
    ) -> Result<Map<String, Value>> {
        let mut pairs = Vec::new();
        for (i, pool) in pools.iter().enumerate() {
            if let Some((chosen, rejected)) = best_and_worst(pool, self.min_margin) {
                pairs.push(RoundPair { prompt: i, chosen, rejected, previous: (0.0, 0.0), reference: None });
            }
        }
        let items: Vec<Item> = pairs
            .iter()
            .map(|p| {
                let seq = |j| ctx.sequence(pools, p.prompt, j);
                Item::Pair(PairItem::new(seq(p.chosen), seq(p.rejected)))
            })
            .collect();
        let (trainer, batch_size) = (ctx.trainer, ctx.trainer.cfg.run.batch_size);
        for (p, v) in pairs.iter_mut().zip(summed_pair_logps(ctx.frozen, &items, batch_size, trainer.pad)?) {
            p.previous = v;
        }
        if let Some(reference) = &trainer.reference {
            for (p, v) in pairs.iter_mut().zip(summed_pair_logps(reference, &items, batch_size, trainer.pad)?) {
                p.reference = Some(v);
            }
        }
        Ok(Map::from_iter([record("pairs", pairs)?]))
    }

    fn items(&self, data: &RoundData, prompt_ids: &[Vec<u32>]) -> Result<Vec<Item>> {
        let pairs: Vec<RoundPair> = data.record("pairs")?;
        Ok(pairs
            .iter()
            .map(|p| {
                let seq = |j| data.sequence(prompt_ids, p.prompt, j);
                let mut pair = PairItem::new(seq(p.chosen), seq(p.rejected));
                // The judge's scores of the two answers (soft DNO's win-rates).
                let score = |j: usize| data.samples[p.prompt][j].score as f32;
                pair.rewards = Some((score(p.chosen), score(p.rejected)));
                // INPO: π_ref is the reference and π_t the previous iterate; DNO (and INPO with
                // τ = 0): π_t is the pair's reference.
                pair.reference = Some(p.reference.unwrap_or(p.previous));
                pair.previous = Some(p.previous);
                Item::Pair(pair)
            })
            .collect())
    }

    fn summarize(&self, data: &RoundData, line: &mut Map<String, Value>) -> Result<()> {
        let pairs: Vec<RoundPair> = data.record("pairs")?;
        line.insert("pairs".into(), pairs.len().into());
        let score = |p: &RoundPair, j: usize| data.samples[p.prompt][j].score;
        if !pairs.is_empty() {
            let margin = pairs.iter().map(|p| score(p, p.chosen) - score(p, p.rejected)).sum::<f64>();
            line.insert("pair_margin".into(), (margin / pairs.len() as f64).into());
        }
        Ok(())
    }
}

/// The highest- and lowest-scored answers of a pool (first of equals), when their scores
/// differ by more than `min_margin`.
fn best_and_worst(pool: &[Sample], min_margin: f64) -> Option<(usize, usize)> {
    let mut best = 0;
    let mut worst = 0;
    for (i, s) in pool.iter().enumerate() {
        if s.score > pool[best].score {
            best = i;
        }
        if s.score < pool[worst].score {
            worst = i;
        }
    }
    (pool[best].score - pool[worst].score > min_margin).then_some((best, worst))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(scores: &[f64]) -> Vec<Sample> {
        scores
            .iter()
            .map(|&score| Sample { tokens: vec![1], text: String::new(), score, parts: Vec::new(), teacher: false })
            .collect()
    }

    #[test]
    fn best_and_worst_need_a_margin() {
        assert_eq!(best_and_worst(&pool(&[0.2, 0.9, 0.1, 0.9]), 0.0), Some((1, 2)));
        assert_eq!(best_and_worst(&pool(&[1.0, 1.0, 1.0]), 0.0), None, "all equal: no signal");
        assert_eq!(best_and_worst(&pool(&[0.4, 0.6]), 0.3), None, "below the margin");
        assert_eq!(best_and_worst(&pool(&[0.4, 0.6]), 0.1), Some((1, 0)));
    }
}

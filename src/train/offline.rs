//! The offline training loop (SFT, the DPO family): read top to bottom.
//!
//! setup (config → data → models → optimizer) → for each step: micro-batches → policy (and
//! reference) log-probs → objective → backward → accumulate → clip → AdamW → log → maybe
//! evaluate / checkpoint → final export.

use std::path::Path;

use anyhow::{Context, Result};

use super::config::TrainConfig;
use super::inputs::summed_pair_logps;
use super::items::{load_items, Item};
use super::trainer::{RunOptions, RunSummary, Trainer};
use crate::model::CausalLm;

/// Run (or resume) an offline objective over `data.train`.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let mut trainer = Trainer::start(cfg, opts)?;
    let objective = &cfg.objective;
    let train_path =
        cfg.data.train.as_ref().with_context(|| format!("objective `{}` needs `data.train`", objective.name()))?;
    // CoPG rows without rewards are scored once, up front, by the configured judge.
    let reward_judge = match objective.reward_judge() {
        Some(spec) => Some(crate::judge::from_spec(spec, &Default::default(), &cfg.model.load_options()?)?),
        None => None,
    };
    let mut items = load_items(train_path, cfg, &trainer.policy, reward_judge.as_deref())?;
    let mut eval_items = match &cfg.data.eval {
        Some(p) => Some(load_items(p, cfg, &trainer.policy, reward_judge.as_deref())?),
        None => None,
    };
    drop(reward_judge); // its model is not needed once the rows are scored
    if cfg.model.precompute_ref_logps {
        if let Some(reference) = trainer.reference.take() {
            // Score the data once, cache it next to the run, and free the reference.
            let run_dir = &cfg.run.output;
            let phase = trainer.phase("precomputing the reference's log-probs");
            let cache = |name: &str| run_dir.join(name);
            precompute_reference(&trainer, &reference, &mut items, &cache("ref_logps_train.json"))?;
            if let Some(eval) = eval_items.as_mut() {
                precompute_reference(&trainer, &reference, eval, &cache("ref_logps_eval.json"))?;
            }
            phase.done();
        }
    }

    trainer.train_on(&items, eval_items.as_deref())?;
    trainer.finish()
}

/// Fill every pair's reference log-probs, from `cache` when it holds one value per pair,
/// else by scoring with `reference` (each rank its share of the batches, gathered) and
/// writing `cache` (rank 0).
fn precompute_reference(trainer: &Trainer, reference: &CausalLm, items: &mut [Item], cache: &Path) -> Result<()> {
    let (batch_size, pad, dist) = (trainer.cfg.run.batch_size, trainer.pad, trainer.dist());
    let cached: Option<Vec<(f32, f32)>> = std::fs::read_to_string(cache)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|v: &Vec<(f32, f32)>| v.len() == items.len());
    let values = match cached {
        Some(v) => v,
        None => {
            let part_values = summed_pair_logps(reference, dist.share_of_batches(items, batch_size), batch_size, pad)?;
            let what = format!("gathering the reference's log-probs for `{}`", cache.display());
            let values: Vec<(f32, f32)> = dist.all_gather(&part_values, &what)?.into_iter().flatten().collect();
            if dist.is_main() {
                super::checkpoint::write_atomically(cache, serde_json::to_string(&values)?.as_bytes())?;
            }
            values
        }
    };
    for (item, v) in items.iter_mut().zip(values) {
        if let Item::Pair(pair) = item {
            pair.reference = Some(v);
        }
    }
    Ok(())
}

//! The offline training loop (SFT, the DPO family): read top to bottom.
//!
//! setup (config → data → models → optimizer) → for each step: micro-batches → policy (and
//! reference) log-probs → objective → backward → accumulate → clip → AdamW → log → maybe
//! evaluate / checkpoint → final export.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{Map, Value};

use super::config::{RunSection, TrainConfig};
use super::inputs::summed_pair_logps;
use super::items::{load_items, Item};
use super::trainer::Trainer;
use crate::model::CausalLm;

/// Options that do not change the result.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// No progress bar.
    pub quiet: bool,
    /// Continue from the newest checkpoint of the run directory.
    pub resume: bool,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps taken in total.
    pub steps: u64,
    /// The exported final model.
    pub final_dir: PathBuf,
}

/// The order of examples in `epoch`: a permutation seeded by the run seed and the epoch, so a
/// resumed run sees exactly the same batches. With `lengths`, transformers'
/// `LengthGroupedSampler`: the permutation is cut into mega-batches of 50 batches, each sorted
/// by length (longest first), so a batch holds similar lengths and pads little.
pub(super) fn epoch_order(n: usize, seed: u64, epoch: u64, batch_size: usize, lengths: Option<&[usize]>) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    if let Some(lengths) = lengths {
        for mega in order.chunks_mut(50 * batch_size.max(1)) {
            mega.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    order
}

/// The data order of each epoch, made on first use.
pub(super) struct BatchOrders {
    seed: u64,
    batch_size: usize,
    lengths: Option<Vec<usize>>,
    orders: std::collections::HashMap<u64, Vec<usize>>,
}

impl BatchOrders {
    /// Orders seeded by `seed`; with `lengths`, grouped by length.
    pub(super) fn new(seed: u64, batch_size: usize, lengths: Option<Vec<usize>>) -> Self {
        Self { seed, batch_size, lengths, orders: Default::default() }
    }
}

/// The micro-batches of optimizer step `step` over `items` (steps counted from their first) and
/// the epoch reached at its end. An epoch boundary ends a step early, as transformers' Trainer
/// does.
pub(super) fn micro_batches<'a>(
    items: &'a [Item],
    step: u64,
    r: &RunSection,
    orders: &mut BatchOrders,
) -> (Vec<Vec<&'a Item>>, f64) {
    let micro_per_epoch = items.len().div_ceil(r.batch_size) as u64;
    let mut micro: Vec<Vec<&Item>> = Vec::new();
    let mut epoch_of_step = 0f64;
    for j in 0..r.grad_accum as u64 {
        let m = step * r.grad_accum as u64 + j;
        let epoch = m / micro_per_epoch;
        let within = (m % micro_per_epoch) as usize;
        if j > 0 && within == 0 {
            break;
        }
        let BatchOrders { seed, batch_size, lengths, orders } = orders;
        let order = orders
            .entry(epoch)
            .or_insert_with(|| epoch_order(items.len(), *seed, epoch, *batch_size, lengths.as_deref()));
        let idx = &order[within * r.batch_size..((within + 1) * r.batch_size).min(items.len())];
        micro.push(idx.iter().map(|&i| &items[i]).collect());
        epoch_of_step = (m + 1) as f64 / micro_per_epoch as f64;
    }
    (micro, epoch_of_step)
}

/// Run (or resume) the training described by `cfg`: online objectives go to the online loop.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    if cfg.objective.is_online() {
        return super::online::train(cfg, opts);
    }
    if cfg.objective.data_need() == candor_alignment::DataNeed::Distill {
        return super::distill::train(cfg, opts);
    }
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
            precompute_reference(
                &reference,
                &mut items,
                &run_dir.join("ref_logps_train.json"),
                cfg.run.batch_size,
                trainer.pad,
            )?;
            if let Some(eval) = eval_items.as_mut() {
                precompute_reference(
                    &reference,
                    eval,
                    &run_dir.join("ref_logps_eval.json"),
                    cfg.run.batch_size,
                    trainer.pad,
                )?;
            }
            phase.done();
        }
    }

    train_on(&mut trainer, &items, eval_items.as_deref())?;
    trainer.finish()
}

/// Optimizer steps of a run over `n` examples: `run.max_steps`, else `run.epochs` passes.
pub(super) fn planned_steps(n: usize, r: &RunSection) -> u64 {
    let micro_per_epoch = n.div_ceil(r.batch_size) as u64;
    r.max_steps.unwrap_or(micro_per_epoch.div_ceil(r.grad_accum as u64) * r.epochs as u64)
}

/// The steps over a fixed set of items: epochs of seeded shuffles (or `run.max_steps`),
/// evaluating on `eval` as configured.
pub(super) fn train_on(trainer: &mut Trainer, items: &[Item], eval: Option<&[Item]>) -> Result<()> {
    let r = &trainer.cfg.run;
    let total = planned_steps(items.len(), r);
    trainer.set_total(total);
    trainer.evaluate_on_start(eval)?;
    let lengths: Option<Vec<usize>> = r.group_by_length.then(|| items.iter().map(Item::tokens).collect());
    let mut orders = BatchOrders::new(r.seed, r.batch_size, lengths);
    while trainer.step < total {
        let (micro, epoch) = micro_batches(items, trainer.step, r, &mut orders);
        let extra = Map::from_iter([("epoch".to_string(), Value::from(epoch))]);
        trainer.step(&micro, extra, eval, false)?;
    }
    Ok(())
}

/// Fill every pair's reference log-probs, from `cache` when it holds one value per pair,
/// else by scoring with `reference` and writing `cache`.
fn precompute_reference(
    reference: &CausalLm,
    items: &mut [Item],
    cache: &Path,
    batch_size: usize,
    pad: u32,
) -> Result<()> {
    let cached: Option<Vec<(f32, f32)>> = std::fs::read_to_string(cache)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .filter(|v: &Vec<(f32, f32)>| v.len() == items.len());
    let values = match cached {
        Some(v) => v,
        None => {
            let values = summed_pair_logps(reference, items, batch_size, pad)?;
            super::checkpoint::write_atomically(cache, serde_json::to_string(&values)?.as_bytes())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_order_is_a_seeded_permutation_and_groups_by_length() {
        let a = epoch_order(10, 1, 0, 2, None);
        assert_eq!(a, epoch_order(10, 1, 0, 2, None));
        assert_ne!(a, epoch_order(10, 1, 1, 2, None), "each epoch reshuffles");
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let lengths: Vec<usize> = (0..120).map(|i| (i * 37) % 101).collect();
        let grouped = epoch_order(120, 1, 0, 1, Some(&lengths));
        // Mega-batches of 50: each sorted longest first.
        for mega in grouped.chunks(50) {
            assert!(mega.windows(2).all(|w| lengths[w[0]] >= lengths[w[1]]));
        }
        let mut all = grouped.clone();
        all.sort();
        assert_eq!(all, (0..120).collect::<Vec<_>>());
    }
}

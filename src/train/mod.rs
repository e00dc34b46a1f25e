//! Training: the configuration, the shared trainer (models, optimizer, steps, checkpoints), and
//! three loops: offline over a dataset, distillation against a frozen teacher, online over the
//! policy's own judged samples. The loops know nothing method-specific: objectives come from
//! `candor-alignment`'s table, what a method needs of its data from `items/` and `inputs/` (one
//! file per data family) and of its rounds from `rounds/` (one file per online method).

pub mod batching;
pub mod checkpoint;
pub mod config;
pub mod distill;
pub mod heads;
pub mod inputs;
pub mod items;
pub mod models;
pub mod offline;
pub mod online;
pub mod optim;
pub mod progress;
pub mod rounds;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{RunOptions, RunSummary};

use anyhow::Result;
use candor_alignment::LoopKind;

/// Run (or resume) the training `cfg` describes, in the loop the registry gives its objective:
/// a fixed dataset, a frozen teacher's distributions, or rounds of the policy's own judged
/// samples.
///
/// Over several ranks (`opts.dist`), each step's micro-batches are split among them: N ranks
/// with `run.grad_accum` k take the steps one process takes with k·N.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let mut cfg = cfg.clone();
    cfg.run.ranks = opts.dist.world_size();
    if cfg.run.ranks > 1 && cfg.model.device.starts_with("cuda") {
        // One GPU per rank, picked by the rank's place on its machine.
        cfg.model.device = format!("cuda:{}", crate::distributed::local_rank());
    }
    match cfg.objective.loop_kind() {
        LoopKind::Offline => offline::train(&cfg, opts),
        LoopKind::Distill => distill::train(&cfg, opts),
        LoopKind::Online => online::train(&cfg, opts),
    }
}

//! Training: the configuration, the shared trainer (models, optimizer, steps, checkpoints), the
//! offline loop over a dataset, the distillation loop against a frozen teacher and the online
//! loop over the policy's own judged samples. The
//! loops know nothing method-specific; objectives come from `candor-alignment`.

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
use candor_alignment::DataNeed;

/// Run (or resume) the training `cfg` describes, in the loop its objective runs in: rounds of
/// the policy's own judged samples, a frozen teacher's distributions, or a fixed dataset.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    if cfg.objective.is_online() {
        online::train(cfg, opts)
    } else if cfg.objective.data_need() == DataNeed::Distill {
        distill::train(cfg, opts)
    } else {
        offline::train(cfg, opts)
    }
}

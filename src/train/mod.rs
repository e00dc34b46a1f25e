//! Training: the configuration, the shared trainer (models, optimizer, steps, checkpoints), the
//! offline loop over a dataset, the distillation loop against a frozen teacher and the online
//! loop over the policy's own judged samples. The
//! loops know nothing method-specific; objectives come from `candor-alignment`.

pub mod checkpoint;
pub mod config;
pub mod distill;
pub mod inputs;
pub mod items;
pub mod offline;
pub mod online;
pub mod optim;
pub mod progress;
pub mod trainer;

pub use config::TrainConfig;
pub use offline::{train, RunOptions, RunSummary};

//! The differentiable causal LM: configuration, ops with a backward, transformer, KV cache.

pub mod config;
pub mod fused;
pub mod kv_cache;
pub mod lora;
pub mod ops;
mod spin_pool;
pub mod transformer;

pub use config::{Architecture, ModelConfig};
pub use fused::Kernels;
pub use kv_cache::KvCache;
pub use transformer::{CausalLm, ForwardOptions, Linear, WeightSource};

//! The differentiable causal LM: configuration, ops with a backward, transformer, KV cache, and
//! what a model does besides its forward pass (LoRA, mixed precision, activation checkpointing,
//! the score head, layer cutting), each in its own file.

mod checkpointing;
pub mod config;
pub mod fused;
mod heads;
pub mod kv_cache;
mod layers;
pub mod lora;
pub mod ops;
pub mod packed;
mod precision;
mod quant_dot;
pub mod rope;
mod spin_pool;
#[cfg(test)]
pub(crate) mod testing;
pub mod transformer;

pub use config::{Architecture, ModelConfig};
pub use fused::Kernels;
pub use kv_cache::KvCache;
pub use transformer::{CausalLm, ForwardOptions, Linear, Packing, ProjectionWeight, WeightSource};

//! candor: align causal language models with human preferences, in one binary.
//!
//! The library holds everything the `candor` binary does, so tests reach it without a shell:
//! [`model`] (the differentiable causal LM), [`load`] (directories, Hub ids, GGUF, tokenizers,
//! chat templates), [`data`] (TRL's dataset formats), [`generate`] (sampling with a KV cache),
//! [`scoring`] (sequence log-probs), [`train`], [`judge`] and [`eval`] (win-rates), and the
//! command-line layer in [`cli`] and [`commands`].

pub mod cli;
pub mod commands;
pub mod data;
pub mod distributed;
pub mod eval;
pub mod export;
pub mod generate;
pub mod judge;
pub mod load;
pub mod model;
pub mod scoring;
pub mod train;

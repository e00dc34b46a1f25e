//! Pure alignment objectives over candle tensors: log-probs in, loss and named metrics out.
//! No files, models or tokenizers here (see `README.md` for one line per module).

pub mod error;
pub mod objectives;
pub mod registry;
pub mod tensor_ops;

pub use error::{AlignError, Result};
pub use objectives::{ObjectiveOutput, PairLogps, PairScores, SequenceLogps, StepScale};
pub use registry::{DataNeed, HeadSpec, JudgeNeed, LoopKind, Objective, ObjectiveInput, ObjectiveSpec};

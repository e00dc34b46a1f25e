//! Errors of the objectives: invalid configurations and shape mismatches, named.

/// An objective could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum AlignError {
    /// A hyper-parameter is out of range.
    #[error("objective `{objective}`: invalid `{field}`: {reason}")]
    InvalidConfig {
        /// The objective's registry name.
        objective: &'static str,
        /// The configuration field.
        field: &'static str,
        /// Why the value is rejected.
        reason: String,
    },
    /// Inputs do not have the shapes the objective needs.
    #[error("objective `{objective}`: `{what}` has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The objective's registry name.
        objective: &'static str,
        /// Which input.
        what: &'static str,
        /// The expected shape.
        expected: Vec<usize>,
        /// The actual shape.
        got: Vec<usize>,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle::Error),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, AlignError>;

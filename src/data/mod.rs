//! Datasets: TRL's JSONL formats, tokenization and batching.

pub mod collate;
pub mod formats;
pub mod output;
pub mod tokenize;

pub use collate::{collate, collate_packed, pack_best_fit, Batch};
pub use formats::{read_jsonl, DataError, Dataset, Example, Row, Text};
pub use output::{report_skipped, JsonLines};
pub use tokenize::{tokenize_prompts, Piece, SequenceTokenizer, TokenizedSequence, Truncation, TruncationMode};

/// A unit enum's variant from the name its TOML uses (serde's own spelling, so a flag and a
/// recipe accept the same names); the error lists the names.
pub fn variant_named<T: serde::de::DeserializeOwned>(name: &str) -> Result<T, String> {
    use serde::de::IntoDeserializer;
    T::deserialize(name.into_deserializer()).map_err(|e: serde::de::value::Error| e.to_string())
}

//! Datasets: TRL's JSONL formats, tokenization and batching.

pub mod collate;
pub mod formats;
pub mod output;
pub mod tokenize;

pub use collate::{collate, collate_packed, pack_best_fit, Batch};
pub use formats::{read_jsonl, DataError, Dataset, Example, Row, Text};
pub use output::{report_skipped, JsonLines};
pub use tokenize::{tokenize_prompts, Piece, SequenceTokenizer, TokenizedSequence, Truncation, TruncationMode};

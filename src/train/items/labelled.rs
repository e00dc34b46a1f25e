//! Labelled single completions (KTO): `label` rows as they are, preference rows split in two as
//! TRL's `unpair_preference_dataset` does (the chosen completion desirable, the rejected one not).

use anyhow::Result;

use super::Item;
use crate::data::{Example, Row, SequenceTokenizer, TokenizedSequence};

/// A completion labelled desirable or undesirable.
#[derive(Debug, Clone)]
pub struct LabelledItem {
    /// Prompt + completion.
    pub sequence: TokenizedSequence,
    /// Whether the completion is desirable.
    pub desirable: bool,
}

/// The labelled items of a row: one for a `label` row, `(desirable, undesirable)` for a
/// preference row. Other rows are an error naming what the objective reads.
pub(super) fn items_of_row(tok: &SequenceTokenizer, name: &str, row: &Row) -> Result<(Item, Option<Item>)> {
    let item = |sequence, desirable| Item::Labelled(LabelledItem { sequence, desirable });
    Ok(match &row.example {
        Example::Unpaired { prompt, completion, label } => {
            (item(tok.prompt_completion(prompt, completion)?, *label), None)
        }
        Example::Preference { prompt, chosen, rejected } => (
            item(tok.prompt_completion(prompt, chosen)?, true),
            Some(item(tok.prompt_completion(prompt, rejected)?, false)),
        ),
        other => anyhow::bail!(
            "objective `{name}` needs `prompt`/`completion`/`label` or `prompt`/`chosen`/`rejected` rows, got a {} row",
            other.kind()
        ),
    })
}

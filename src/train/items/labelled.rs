//! Labelled single completions (KTO): `label` rows as they are, preference rows split in two as
//! TRL's `unpair_preference_dataset` does (the chosen completion desirable, the rejected one not).
//! TRL then puts every desirable half before every undesirable one; candor interleaves them so
//! that an unshuffled pass (evaluation) also sees both labels in each micro-batch, and every
//! row's neighbour (its KL partner) answers another prompt.

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

/// The halves of split preference rows in the order `d_0, u_{n/2}, d_1, u_{n/2+1}, …` (indices
/// mod n): both labels alternate, and each row's predecessor comes from another row.
pub(super) fn interleave(split: Vec<(Item, Item)>) -> Vec<Item> {
    let n = split.len();
    let (desirable, mut undesirable): (Vec<Item>, Vec<Item>) = split.into_iter().unzip();
    undesirable.rotate_left(n / 2);
    desirable.into_iter().zip(undesirable).flat_map(|(d, u)| [d, u]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves_alternate_and_neighbours_answer_other_prompts() {
        // Row j's halves carry j in their single token: desirable 0..5, undesirable 100..105.
        let half = |id: u32, desirable: bool| {
            Item::Labelled(LabelledItem { sequence: TokenizedSequence::new(vec![id], vec![1]), desirable })
        };
        let split: Vec<(Item, Item)> = (0..6).map(|j| (half(j, true), half(100 + j, false))).collect();
        let order: Vec<(u32, bool)> = interleave(split)
            .iter()
            .map(|i| match i {
                Item::Labelled(l) => (l.sequence.ids[0], l.desirable),
                _ => unreachable!("labelled items only"),
            })
            .collect();
        let ids: Vec<u32> = order.iter().map(|o| o.0).collect();
        assert_eq!(ids, [0, 103, 1, 104, 2, 105, 3, 100, 4, 101, 5, 102]);
        assert!(order.iter().enumerate().all(|(i, o)| o.1 == (i % 2 == 0)));
        for i in 0..ids.len() {
            let previous = ids[(i + ids.len() - 1) % ids.len()];
            assert_ne!(previous % 100, ids[i] % 100, "row {i}'s KL partner answers the same prompt");
        }
    }
}

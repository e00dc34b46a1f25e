//! Chain-of-hindsight items: a preference or labelled row rendered into one
//! feedback-conditioned sequence.

use anyhow::Result;
use candor_alignment::objectives::hindsight::{self, Feedback, PieceKind};
use candor_alignment::Objective;
use rand::SeedableRng;

use crate::data::{Piece, Row, SequenceTokenizer, Text, TokenizedSequence};

/// A chain-of-hindsight sequence: the prompt, then a template drawn for this row (seeded by the
/// run seed and the line) with its pieces tokenized one by one; answer tokens carry classes 1
/// (positive) / 2 (negative), and a fraction of an answer that another answer follows is hidden
/// from later positions.
pub(super) fn sequence(
    tok: &SequenceTokenizer,
    objective: &Objective,
    seed: u64,
    row: &Row,
    prompt: &Text,
    feedback: Feedback,
) -> Result<TokenizedSequence> {
    let Objective::Hindsight(cfg) = objective else { unreachable!("only chain of hindsight has this data need") };
    let row_seed = seed ^ (row.line as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let rendered = hindsight::render(cfg, feedback, row_seed)?;
    let is_answer = |k: PieceKind| matches!(k, PieceKind::Positive | PieceKind::Negative);
    let pieces: Vec<Piece> = rendered
        .pieces
        .iter()
        .enumerate()
        .map(|(i, (text, kind))| {
            let followed_by_answer = rendered.pieces[i + 1..].iter().any(|p| is_answer(p.1));
            let hide = if is_answer(*kind) && followed_by_answer { rendered.mask_past_fraction } else { 0.0 };
            Piece { text, class: kind.loss_class(), hide }
        })
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(row_seed.rotate_left(17));
    tok.prompt_pieces(prompt, &pieces, &mut rng)
}

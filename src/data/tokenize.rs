//! Tokenization exactly as TRL does it.
//!
//! - Standard form: the sequence is `tok(prompt + completion)` followed by EOS (unless it
//!   already ends with EOS); the prompt length is the common prefix of `tok(prompt)` and
//!   `tok(prompt + completion)`; the completion is everything after it.
//! - Conversational form: prompt and prompt + completion are rendered with the chat template
//!   (`add_generation_prompt` for the prompt) and tokenized without special tokens; no EOS is
//!   appended (the template ends the turn).
//! - Conversations (`messages`): the whole chat; assistant turns are found by rendering each
//!   prefix of the conversation.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};

use super::formats::Text;
use crate::load::{ChatTemplate, Message, TextTokenizer};

/// The longest text (in bytes) tokenized whole; a longer text is tokenized only where a length
/// limit bounds the work to the part that is kept, and refused elsewhere. Tokenizers hold a few
/// hundred bytes per input byte while they work (a 50 MB text peaks at about 12 GB).
pub const MAX_WHOLE_TEXT_BYTES: usize = 4 << 20;

/// Which end of a too-long sequence to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TruncationMode {
    /// Drop tokens from the end (TRL's `keep_start`).
    #[default]
    KeepStart,
    /// Drop tokens from the beginning (TRL's `keep_end`).
    KeepEnd,
}

impl std::str::FromStr for TruncationMode {
    type Err = String;
    /// The names TOML recipes use (`keep-start`, `keep-end`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        super::variant_named(s)
    }
}

/// Length limits applied after tokenization.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Truncation {
    /// Longest prompt + completion, in tokens.
    pub max_length: Option<usize>,
    /// Longest prompt, in tokens; longer prompts keep their end (the part next to the answer).
    pub max_prompt_length: Option<usize>,
    /// Which end `max_length` keeps.
    pub mode: TruncationMode,
}

/// A tokenized sequence and which of its tokens are scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedSequence {
    /// All token ids.
    pub ids: Vec<u32>,
    /// Non-zero where the token belongs to the completion (is predicted and scored), else 0.
    /// The value is the token's class (1 for ordinary completions; chain of hindsight marks
    /// positive answers 1 and negative answers 2).
    pub completion_mask: Vec<u8>,
    /// Positions hidden from the attention of every later token (chain of hindsight's random
    /// past-token masking); they are still predicted themselves.
    pub hidden_from_later: Vec<usize>,
}

impl TokenizedSequence {
    /// Prompt ids followed by an answer's (sampled or generated) ids, the answer being the
    /// completion.
    pub fn prompt_and_answer(prompt: &[u32], answer: &[u32]) -> Self {
        let mut mask = vec![0u8; prompt.len()];
        mask.resize(prompt.len() + answer.len(), 1);
        Self::new([prompt, answer].concat(), mask)
    }

    /// A sequence with its completion mask and nothing hidden.
    pub fn new(ids: Vec<u32>, completion_mask: Vec<u8>) -> Self {
        Self { ids, completion_mask, hidden_from_later: Vec::new() }
    }

    /// Tokens before the first completion token (the prompt).
    pub fn prompt_len(&self) -> usize {
        self.completion_mask.iter().take_while(|&&m| m == 0).count()
    }

    /// Number of completion tokens that are scored: position 0 is never predicted (nothing
    /// precedes it), so a `text` row whose mask starts there scores one token fewer than it has.
    pub fn completion_tokens(&self) -> usize {
        self.completion_mask.iter().skip(1).filter(|&&m| m != 0).count()
    }
}

/// Text tokenized on its own and appended after a prompt (chain of hindsight's pieces).
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// The text.
    pub text: &'a str,
    /// Loss class of its tokens (0 = not scored).
    pub class: u8,
    /// Fraction of its tokens hidden from later positions (chosen with the caller's generator).
    pub hide: f64,
}

/// Turns dataset text into token ids with one tokenizer and chat template.
pub struct SequenceTokenizer<'a> {
    /// The tokenizer.
    pub tokenizer: &'a TextTokenizer,
    /// The chat template, needed for conversational rows.
    pub chat_template: Option<&'a ChatTemplate>,
    /// Length limits.
    pub truncation: Truncation,
}

impl SequenceTokenizer<'_> {
    fn template(&self) -> Result<&ChatTemplate> {
        self.chat_template.ok_or_else(|| anyhow!("conversational data needs a chat template, and this model has none"))
    }

    /// Token ids of a prompt as the model sees it before generating (chat prompts get the
    /// assistant header).
    pub fn prompt_ids(&self, prompt: &Text) -> Result<Vec<u32>> {
        match prompt {
            Text::Plain(p) => self.encode_whole(p, true, "prompt"),
            Text::Chat(m) => self.encode_whole(&self.template()?.render(m, true)?, false, "prompt"),
        }
    }

    /// Tokenize `prompt` followed by `completion`.
    pub fn prompt_completion(&self, prompt: &Text, completion: &Text) -> Result<TokenizedSequence> {
        // Only the start is kept when nothing is cut from the prompt first: tokenize no more
        // than that start needs.
        let bound = match self.truncation {
            Truncation { max_length: Some(max), max_prompt_length: None, mode: TruncationMode::KeepStart } => Some(max),
            _ => None,
        };
        let encode = |text: &str, special: bool, what: &str| match bound {
            Some(max) => self.encode_bounded(text, special, max, TruncationMode::KeepStart, what),
            None => self.encode_whole(text, special, what),
        };
        let (prompt_ids, mut full) = match (prompt, completion) {
            (Text::Plain(p), Text::Plain(c)) => {
                let mut full = encode(&format!("{p}{c}"), true, "prompt + completion")?;
                if let Some((_, eos)) = &self.tokenizer.eos {
                    if full.last() != Some(eos) {
                        full.push(*eos);
                    }
                }
                (encode(p, true, "prompt")?, full)
            }
            (Text::Chat(p), Text::Chat(c)) => {
                let template = self.template()?;
                let all: Vec<Message> = p.iter().chain(c).cloned().collect();
                let prompt_text = template.render(p, true)?;
                let full_text = template.render(&all, false)?;
                (encode(&prompt_text, false, "prompt")?, encode(&full_text, false, "prompt + completion")?)
            }
            _ => bail!("prompt and completion must both be strings or both be message lists"),
        };
        let mut prompt_len = prompt_ids.iter().zip(&full).take_while(|(a, b)| a == b).count();
        if let Some(max_prompt) = self.truncation.max_prompt_length {
            if prompt_len > max_prompt {
                full.drain(..prompt_len - max_prompt);
                prompt_len = max_prompt;
            }
        }
        let completion_mask: Vec<u8> = (0..full.len()).map(|i| u8::from(i >= prompt_len)).collect();
        Ok(self.truncate(TokenizedSequence::new(full, completion_mask)))
    }

    /// Tokenize a prompt (as before generation) followed by pieces tokenized one by one, as the
    /// chain-of-hindsight code does (no merges across piece boundaries), then EOS (class 1).
    pub fn prompt_pieces(
        &self,
        prompt: &Text,
        pieces: &[Piece],
        rng: &mut impl rand::Rng,
    ) -> Result<TokenizedSequence> {
        let mut ids = self.prompt_ids(prompt)?;
        if let Some(max_prompt) = self.truncation.max_prompt_length {
            ids.drain(..ids.len().saturating_sub(max_prompt));
        }
        let mut completion_mask = vec![0u8; ids.len()];
        let mut hidden_from_later = Vec::new();
        for piece in pieces {
            let start = ids.len();
            ids.extend(self.encode_whole(piece.text, false, "completion")?);
            completion_mask.resize(ids.len(), piece.class);
            let n = ids.len() - start;
            let hide = ((piece.hide * n as f64).round() as usize).min(n);
            hidden_from_later.extend(rand::seq::index::sample(rng, n, hide).into_iter().map(|i| start + i));
        }
        if let Some((_, eos)) = &self.tokenizer.eos {
            ids.push(*eos);
            completion_mask.push(1);
        }
        hidden_from_later.sort_unstable();
        Ok(self.truncate(TokenizedSequence { ids, completion_mask, hidden_from_later }))
    }

    /// Tokenize a whole conversation; with `assistant_only`, only assistant turns are marked.
    pub fn conversation(&self, messages: &[Message], assistant_only: bool) -> Result<TokenizedSequence> {
        let template = self.template()?;
        // Only the start is kept: tokenize no more of each rendering than that start needs
        // (lengths at or past the limit then read as "past the limit", which is all they decide).
        let bound = match self.truncation {
            Truncation { max_length: Some(max), mode: TruncationMode::KeepStart, .. } => Some(max),
            _ => None,
        };
        let encode = |text: &str| match bound {
            Some(max) => self.encode_bounded(text, false, max, TruncationMode::KeepStart, "messages"),
            None => self.encode_whole(text, false, "messages"),
        };
        let ids = encode(&template.render(messages, false)?)?;
        let mut completion_mask = vec![u8::from(!assistant_only); ids.len()];
        if assistant_only {
            for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
                let start = encode(&template.render(&messages[..i], true)?)?.len();
                if bound.is_some_and(|max| start > max) {
                    break; // this turn and every later one start past the kept tokens
                }
                let end = encode(&template.render(&messages[..=i], false)?)?.len();
                for flag in completion_mask.iter_mut().take(end.min(ids.len())).skip(start) {
                    *flag = 1;
                }
            }
        }
        Ok(self.truncate(TokenizedSequence::new(ids, completion_mask)))
    }

    /// Tokenize plain text for language modeling (every token scored, EOS appended).
    pub fn text(&self, text: &str) -> Result<TokenizedSequence> {
        // Whichever end is kept, only that end needs tokenizing.
        let mut ids = match self.truncation.max_length {
            Some(max) => self.encode_bounded(text, true, max, self.truncation.mode, "text")?,
            None => self.encode_whole(text, true, "text")?,
        };
        // TRL's `add_eos`: the EOS ends the text unless the text already ends with it.
        if let Some((_, eos)) = &self.tokenizer.eos {
            if ids.last() != Some(eos) {
                ids.push(*eos);
            }
        }
        let completion_mask = vec![1; ids.len()];
        Ok(self.truncate(TokenizedSequence::new(ids, completion_mask)))
    }

    /// `text` tokenized whole, unless it is longer than [`MAX_WHOLE_TEXT_BYTES`].
    fn encode_whole(&self, text: &str, add_special_tokens: bool, what: &str) -> Result<Vec<u32>> {
        if text.len() > MAX_WHOLE_TEXT_BYTES {
            bail!(
                "the {what} is {} bytes, over the {} bytes (4 MiB) candor tokenizes whole; a longer text is \
                 tokenized only as far as `max_length` keeps it (`keep_start` without `max_prompt_length`, or \
                 either end on `text` rows), cut at a space between words: shorten the row",
                text.len(),
                MAX_WHOLE_TEXT_BYTES
            );
        }
        self.tokenizer.encode(text, add_special_tokens)
    }

    /// The tokens of `text` a limit of `need` tokens at the `keep` end can keep, tokenizing
    /// only a window of the text at that end: either the whole tokenization, or more than
    /// `need` tokens whose `need` at the kept end are those of the whole tokenization.
    ///
    /// A window ends (`keep_start`) or starts (`keep_end`) at a single space between a letter or
    /// digit and a non-space character. Tokenizers split their input into pieces (words with their leading
    /// space, runs of digits, punctuation, whitespace) before the model's merges, and every
    /// pre-tokenizer in use (GPT-2 and Llama 3 style byte-level regexes, SentencePiece's
    /// metaspace) starts a new piece at such a space, so the pieces on the kept side of the cut
    /// and their tokens are those of the whole text. The window grows (doubling) until it holds
    /// enough tokens; memory and time then grow with `need`, not with the text. A text with no
    /// such space is tokenized whole, unless it is longer than [`MAX_WHOLE_TEXT_BYTES`].
    fn encode_bounded(
        &self,
        text: &str,
        add_special_tokens: bool,
        need: usize,
        keep: TruncationMode,
        what: &str,
    ) -> Result<Vec<u32>> {
        let mut bytes = need.saturating_mul(12).max(256);
        loop {
            if bytes >= text.len() {
                return self.encode_whole(text, add_special_tokens, what);
            }
            let window = match keep {
                TruncationMode::KeepStart => safe_cut_at_or_after(text, bytes).map(|cut| &text[..cut]),
                TruncationMode::KeepEnd => safe_cut_at_or_before(text, text.len() - bytes).map(|cut| &text[cut..]),
            };
            let Some(window) = window.filter(|w| w.len() <= MAX_WHOLE_TEXT_BYTES) else {
                return self.encode_whole(text, add_special_tokens, what);
            };
            let ids = self.tokenizer.encode(window, add_special_tokens)?;
            // A few more than needed: tokens a post-processor adds at the window's far end
            // (or start) never reach the kept ones.
            if ids.len() >= need + 4 {
                return Ok(match keep {
                    TruncationMode::KeepStart => ids[..need + 1].to_vec(),
                    TruncationMode::KeepEnd => ids[ids.len() - (need + 1)..].to_vec(),
                });
            }
            bytes = window.len().saturating_mul(2);
        }
    }

    fn truncate(&self, mut s: TokenizedSequence) -> TokenizedSequence {
        let Some(max) = self.truncation.max_length else {
            return s;
        };
        if s.ids.len() <= max {
            return s;
        }
        let cut = match self.truncation.mode {
            TruncationMode::KeepStart => {
                s.ids.truncate(max);
                s.completion_mask.truncate(max);
                0
            }
            TruncationMode::KeepEnd => {
                let cut = s.ids.len() - max;
                s.ids.drain(..cut);
                s.completion_mask.drain(..cut);
                cut
            }
        };
        s.hidden_from_later =
            s.hidden_from_later.iter().filter(|&&p| p >= cut && p - cut < max).map(|p| p - cut).collect();
        s
    }
}

/// Whether byte `i` of `text` is a single space after a letter or digit and before a
/// non-whitespace character: where a text can be cut without changing the tokens on either
/// side (see `encode_bounded`). After a letter or digit, not after any character: special
/// tokens (`<|im_end|>`, `[SEP]`) may be set to swallow the whitespace that follows them.
fn safe_cut(text: &str, i: usize) -> bool {
    text.as_bytes().get(i) == Some(&b' ')
        && text[..i].chars().next_back().is_some_and(char::is_alphanumeric)
        && text[i + 1..].chars().next().is_some_and(|c| !c.is_whitespace())
}

/// The first safe cut at or after byte `from`.
fn safe_cut_at_or_after(text: &str, from: usize) -> Option<usize> {
    let from = (from..=text.len()).find(|&i| text.is_char_boundary(i))?;
    text[from..].match_indices(' ').map(|(i, _)| from + i).find(|&i| safe_cut(text, i))
}

/// The last safe cut at or before byte `to`.
fn safe_cut_at_or_before(text: &str, to: usize) -> Option<usize> {
    let end = (to + 1..=text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    text[..end].rmatch_indices(' ').map(|(i, _)| i).find(|&i| safe_cut(text, i))
}

/// Each prompt's ids as `model` is asked it (its chat template applied to message lists), keeping
/// the last `max_prompt_length` tokens: the ids online rounds and distillation sample from.
pub fn tokenize_prompts<'a>(
    model: &crate::load::LoadedModel,
    prompts: impl IntoIterator<Item = &'a Text>,
    max_prompt_length: Option<usize>,
) -> Result<Vec<Vec<u32>>> {
    let tok = SequenceTokenizer {
        tokenizer: &model.tokenizer,
        chat_template: model.chat_template.as_ref(),
        truncation: Default::default(),
    };
    prompts
        .into_iter()
        .map(|prompt| {
            let ids = tok.prompt_ids(prompt)?;
            let keep = max_prompt_length.unwrap_or(ids.len()).min(ids.len());
            Ok(ids[ids.len() - keep..].to_vec())
        })
        .collect()
}

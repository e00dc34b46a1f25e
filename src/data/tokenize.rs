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

/// Which end of a too-long sequence to keep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TruncationMode {
    /// Drop tokens from the end (TRL's `keep_start`).
    #[default]
    KeepStart,
    /// Drop tokens from the beginning (TRL's `keep_end`).
    KeepEnd,
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
    /// A sequence with its completion mask and nothing hidden.
    pub fn new(ids: Vec<u32>, completion_mask: Vec<u8>) -> Self {
        Self { ids, completion_mask, hidden_from_later: Vec::new() }
    }

    /// Number of completion tokens.
    pub fn completion_tokens(&self) -> usize {
        self.completion_mask.iter().filter(|&&m| m != 0).count()
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
            Text::Plain(p) => self.tokenizer.encode(p, true),
            Text::Chat(m) => self.tokenizer.encode(&self.template()?.render(m, true)?, false),
        }
    }

    /// Tokenize `prompt` followed by `completion`.
    pub fn prompt_completion(&self, prompt: &Text, completion: &Text) -> Result<TokenizedSequence> {
        let (prompt_ids, mut full) = match (prompt, completion) {
            (Text::Plain(p), Text::Plain(c)) => {
                let mut full = self.tokenizer.encode(&format!("{p}{c}"), true)?;
                if let Some((_, eos)) = &self.tokenizer.eos {
                    if full.last() != Some(eos) {
                        full.push(*eos);
                    }
                }
                (self.tokenizer.encode(p, true)?, full)
            }
            (Text::Chat(p), Text::Chat(c)) => {
                let template = self.template()?;
                let all: Vec<Message> = p.iter().chain(c).cloned().collect();
                let prompt_text = template.render(p, true)?;
                let full_text = template.render(&all, false)?;
                (self.tokenizer.encode(&prompt_text, false)?, self.tokenizer.encode(&full_text, false)?)
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
            ids.extend(self.tokenizer.encode(piece.text, false)?);
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
        let ids = self.tokenizer.encode(&template.render(messages, false)?, false)?;
        let mut completion_mask = vec![u8::from(!assistant_only); ids.len()];
        if assistant_only {
            for (i, _) in messages.iter().enumerate().filter(|(_, m)| m.role == "assistant") {
                let start = self.tokenizer.encode(&template.render(&messages[..i], true)?, false)?.len();
                let end = self.tokenizer.encode(&template.render(&messages[..=i], false)?, false)?.len();
                for flag in completion_mask.iter_mut().take(end.min(ids.len())).skip(start) {
                    *flag = 1;
                }
            }
        }
        Ok(self.truncate(TokenizedSequence::new(ids, completion_mask)))
    }

    /// Tokenize plain text for language modeling (every token scored, EOS appended).
    pub fn text(&self, text: &str) -> Result<TokenizedSequence> {
        let mut ids = self.tokenizer.encode(text, true)?;
        if let Some((_, eos)) = &self.tokenizer.eos {
            ids.push(*eos);
        }
        let completion_mask = vec![1; ids.len()];
        Ok(self.truncate(TokenizedSequence::new(ids, completion_mask)))
    }

    fn truncate(&self, mut s: TokenizedSequence) -> TokenizedSequence {
        let Some(max) = self.truncation.max_length else { return s };
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

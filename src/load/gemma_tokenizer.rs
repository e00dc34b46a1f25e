//! Gemma's SentencePiece-style tokenizer from GGUF metadata, built as transformers builds it
//! (`integrations/gguf/gguf_tokenizer_mapping.py::gemma_tokenizer`; the derivation and every
//! pitfall are in `docs/dev/gemma3-tokenizer.md`):
//! - a BPE with byte fallback over the stored tokens, the runs of real spaces respelled as `▁`;
//! - merges derived from the vocabulary (a file without `tokenizer.ggml.merges`): a pair merges
//!   earlier when its merged token has a lower id, and within one token a longer left piece
//!   first; the stored scores are not used;
//! - spaces become `▁` (no prefix); control tokens are special, user-defined ones are matched
//!   whole but stay in decoded text; `<bos>` is prepended when `add_bos_token` says so.

use std::path::Path;

use anyhow::{anyhow, Result};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::split::Split;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, Tokenizer};

use super::tokenizer::TextTokenizer;

/// SentencePiece's token types (`tokenizer.ggml.token_type`): a control token (`<bos>`,
/// `<start_of_turn>`) and a user-defined one (`\n`, `<table>`).
pub(super) const CONTROL: i64 = 3;
/// See [`CONTROL`].
pub(super) const USER_DEFINED: i64 = 4;

/// The tokenizer part of a GGUF's metadata (`tokenizer.ggml.*`).
#[derive(Debug, Clone, Default)]
pub struct GgufVocab {
    /// `tokens`, by id.
    pub tokens: Vec<String>,
    /// `token_type`, by id (1 normal where the file has none).
    pub token_types: Vec<i64>,
    /// `merges` as pairs, when the file has them.
    pub merges: Option<Vec<(String, String)>>,
    /// `bos_token_id`, `eos_token_id`, `unknown_token_id`, `padding_token_id`.
    pub bos: Option<usize>,
    /// See `bos`.
    pub eos: Option<usize>,
    /// See `bos`.
    pub unk: Option<usize>,
    /// See `bos`.
    pub pad: Option<usize>,
    /// `add_bos_token` (SentencePiece models default to true).
    pub add_bos: bool,
    /// `add_eos_token`.
    pub add_eos: bool,
}

impl GgufVocab {
    /// The text of token `id`, if the vocabulary has it.
    fn token(&self, id: Option<usize>) -> Option<&str> {
        self.tokens.get(id?).map(String::as_str)
    }

    /// `tok` with this vocabulary's BOS, EOS and padding tokens.
    pub(super) fn text_tokenizer(&self, tok: Tokenizer) -> TextTokenizer {
        let text = |id: Option<usize>| self.token(id).map(str::to_string);
        TextTokenizer::new(tok, text(self.bos), text(self.eos), text(self.pad))
    }
}

/// Python's `str.isspace` (which also counts the separators U+001C..U+001F).
fn python_isspace(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// A token made of whitespace with at least one real space is spelled with `▁` instead, one per
/// character (transformers' Gemma rule; in Gemma 3 these are ids 138..167).
fn respell(token: &str) -> String {
    if token.contains(' ') && token.chars().all(python_isspace) {
        "▁".repeat(token.chars().count())
    } else {
        token.to_string()
    }
}

/// The merges transformers' `generate_merges` derives from the vocabulary, in rank order:
/// tokens in id order, and within a token its splits into two vocabulary entries from the
/// longest left piece down.
fn derive_merges(tokens: &[String], vocab: &Vocab) -> Vec<(String, String)> {
    let mut merges = Vec::new();
    for token in tokens {
        for (at, _) in token.char_indices().skip(1).collect::<Vec<_>>().into_iter().rev() {
            let (left, right) = token.split_at(at);
            if vocab.contains_key(left) && vocab.contains_key(right) {
                merges.push((left.to_string(), right.to_string()));
            }
        }
    }
    merges
}

/// The `<bos>`/`<eos>` template transformers' `update_post_processor` builds from
/// `add_bos_token` and `add_eos_token`; `None` when neither is added.
fn special_token_template(v: &GgufVocab, path: &Path) -> Result<Option<TemplateProcessing>> {
    let added = |id: Option<usize>, add: bool| {
        let id = id.filter(|_| add)?;
        Some((v.tokens.get(id)?.clone(), id as u32))
    };
    let (bos, eos) = (added(v.bos, v.add_bos), added(v.eos, v.add_eos));
    if bos.is_none() && eos.is_none() {
        return Ok(None);
    }
    let around = |seq: &str, type_id: u8| {
        let mut parts: Vec<String> = Vec::new();
        parts.extend(bos.iter().map(|(t, _)| format!("{t}:{type_id}")));
        parts.push(format!("{seq}:{type_id}"));
        parts.extend(eos.iter().map(|(t, _)| format!("{t}:{type_id}")));
        parts.join(" ")
    };
    let single = around("$A", 0);
    let pair = format!("{single} {}", around("$B", 1));
    let specials: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
    let fail = |e: String| anyhow!("{}: cannot build the tokenizer's BOS/EOS template: {e}", path.display());
    let processor = TemplateProcessing::builder()
        .try_single(single.as_str())
        .map_err(fail)?
        .try_pair(pair.as_str())
        .map_err(fail)?
        .special_tokens(specials)
        .build()
        .map_err(|e| fail(e.to_string()))?;
    Ok(Some(processor))
}

/// Gemma's tokenizer from the GGUF vocabulary of the file at `path` (named in errors).
pub fn from_gguf(mut v: GgufVocab, path: &Path) -> Result<TextTokenizer> {
    let build_err = |what: &str, e: &dyn std::fmt::Display| anyhow!("{}: cannot build {what}: {e}", path.display());
    let tokens: Vec<String> = v.tokens.iter().map(|t| respell(t)).collect();
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    if vocab.len() != tokens.len() {
        anyhow::bail!("{}: metadata `tokenizer.ggml.tokens` repeats a token", path.display());
    }
    let merges = match v.merges.take() {
        Some(m) => m,
        None => derive_merges(&tokens, &vocab),
    };
    let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if let Some(unk) = v.token(v.unk) {
        bpe = bpe.unk_token(unk.to_string());
    }
    let bpe = bpe.build().map_err(|e| build_err("the BPE model", &e))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(Replace::new(" ", "▁").map_err(|e| build_err("the normalizer", &e))?))
        .map_err(|e| build_err("the normalizer", &e))?;
    let split = Split::new(" ", SplitDelimiterBehavior::MergedWithPrevious, false)
        .map_err(|e| build_err("the pre-tokenizer", &e))?;
    tok.with_pre_tokenizer(Some(split));
    let space = Replace::new("▁", " ").map_err(|e| build_err("the decoder", &e))?;
    tok.with_decoder(Some(Sequence::new(vec![
        DecoderWrapper::Replace(space),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ])));
    let of_type = |ty: i64| v.tokens.iter().zip(&v.token_types).filter(move |(_, t)| **t == ty).map(|(s, _)| s);
    let control: Vec<AddedToken> = of_type(CONTROL).map(|t| AddedToken::from(t.clone(), true)).collect();
    tok.add_special_tokens(control).map_err(|e| build_err("the control tokens", &e))?;
    // Only those still in the (respelled) vocabulary: others would get new ids.
    let user: Vec<AddedToken> = of_type(USER_DEFINED)
        .filter(|t| tok.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t.clone(), false).normalized(false))
        .collect();
    tok.add_tokens(user).map_err(|e| build_err("the user-defined tokens", &e))?;
    tok.with_post_processor(special_token_template(&v, path)?);
    Ok(v.text_tokenizer(tok))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> (Vec<String>, Vocab) {
        let tokens: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        let vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        (tokens, vocab)
    }

    #[test]
    fn merges_follow_ids_then_longer_left_pieces() {
        // "abc" splits as ab+c and a+bc; the longer left piece ranks first. "ab" (id 3) comes
        // before "abc" (id 5), and "bc" (id 4) between them.
        let (tokens, v) = vocab(&["a", "b", "c", "ab", "bc", "abc", "é", "éa"]);
        let merges = derive_merges(&tokens, &v);
        let pairs: Vec<(&str, &str)> = merges.iter().map(|(l, r)| (l.as_str(), r.as_str())).collect();
        assert_eq!(pairs, [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc"), ("é", "a")]);
    }

    #[test]
    fn only_space_runs_are_respelled() {
        assert_eq!(respell("  "), "▁▁");
        assert_eq!(respell(" \t"), "▁▁");
        assert_eq!(respell("\t\t"), "\t\t");
        assert_eq!(respell("\u{1f}"), "\u{1f}");
        assert_eq!(respell(" a"), " a");
    }
}

//! The tokenizer a model was trained with, plus the special tokens transformers attaches to it.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use tokenizers::Tokenizer;

/// A `tokenizers` tokenizer with the special tokens from `tokenizer_config.json` (or GGUF).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// Beginning-of-sequence token text and id.
    pub bos: Option<(String, u32)>,
    /// End-of-sequence token text and id.
    pub eos: Option<(String, u32)>,
    /// Padding token id.
    pub pad: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("bos", &self.bos).field("eos", &self.eos).field("pad", &self.pad).finish()
    }
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object.
fn special_token_text(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Wrap a built tokenizer, resolving special-token texts to ids.
    pub fn new(inner: Tokenizer, bos: Option<String>, eos: Option<String>, pad: Option<String>) -> Self {
        let resolve = |t: Option<String>| t.and_then(|t| inner.token_to_id(&t).map(|id| (t, id)));
        let bos = resolve(bos);
        let eos = resolve(eos);
        let pad = resolve(pad).map(|(_, id)| id);
        Self { inner, bos, eos, pad }
    }

    /// Load `tokenizer.json` and the special tokens of `tokenizer_config.json` (if present).
    pub fn from_hf_files(tokenizer_json: &Path, tokenizer_config: Option<&Path>) -> Result<Self> {
        let inner = Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow!("failed to read tokenizer `{}`: {e}", tokenizer_json.display()))?;
        let config = match tokenizer_config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("failed to read `{}`", p.display()))?;
                serde_json::from_str(&text).with_context(|| format!("invalid JSON in `{}`", p.display()))?
            }
            None => serde_json::Value::Null,
        };
        Ok(Self::new(
            inner,
            special_token_text(&config, "bos_token"),
            special_token_text(&config, "eos_token"),
            special_token_text(&config, "pad_token"),
        ))
    }

    /// The underlying `tokenizers` object.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor
    /// (e.g. a BOS token), as transformers' `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, optionally without special tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id to pad batches with: the pad token, else EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad.or(self.eos.as_ref().map(|e| e.1)).unwrap_or(0)
    }
}

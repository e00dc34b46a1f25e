//! GGUF files (llama.cpp's format): weights dequantized to f32 in transformers' layout, the
//! model config, the tokenizer and the chat template, all from the file's metadata.
//!
//! What transformers' GGUF loader does, and so what this reproduces:
//! - tensor names map from llama.cpp's (`blk.0.attn_q.weight`) to transformers'
//!   (`model.layers.0.self_attn.q_proj.weight`);
//! - for Llama and Mistral, llama.cpp's converter interleaved the two RoPE halves of every
//!   q/k head (`permute` in `convert_hf_to_gguf.py`); this undoes it;
//! - the tokenizer is a byte-level BPE built from `tokenizer.ggml.tokens` and `.merges`.

use std::collections::HashMap;
use std::io::Cursor;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle::quantized::gguf_file::{Content, Value};
use candle::{Device, Tensor};
use rayon::prelude::*;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use super::tokenizer::TextTokenizer;
use crate::model::config::{Architecture, ModelConfig};

/// Everything a GGUF file holds, ready to build a model from.
pub struct GgufModel {
    /// The model configuration from the `{arch}.*` metadata.
    pub config: ModelConfig,
    /// Dequantized f32 weights under transformers' names.
    pub weights: HashMap<String, Tensor>,
    /// The tokenizer from the `tokenizer.ggml.*` metadata.
    pub tokenizer: TextTokenizer,
    /// `tokenizer.chat_template`, if present.
    pub chat_template: Option<String>,
}

struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
    path: &'a Path,
}

impl Metadata<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.map.get(key).ok_or_else(|| anyhow!("`{}`: GGUF metadata has no `{key}`", self.path.display()))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        Ok(match v {
            Value::U64(x) => *x as usize,
            Value::I64(x) => *x as usize,
            Value::U32(x) => *x as usize,
            Value::I32(x) => *x as usize,
            Value::U16(x) => *x as usize,
            Value::U8(x) => *x as usize,
            other => bail!("`{}`: GGUF metadata `{key}` is not an integer: {other:?}", self.path.display()),
        })
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.map.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn opt_f64(&self, key: &str) -> Option<f64> {
        match self.map.get(key)? {
            Value::F32(x) => Some(*x as f64),
            Value::F64(x) => Some(*x),
            _ => None,
        }
    }

    fn opt_str(&self, key: &str) -> Option<&str> {
        self.map.get(key)?.to_string().ok().map(String::as_str)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|e| anyhow!("`{}`: `{key}`: {e}", self.path.display()))?
            .iter()
            .map(|v| v.to_string().cloned().map_err(|e| anyhow!("`{}`: `{key}`: {e}", self.path.display())))
            .collect()
    }
}

/// transformers' name of a llama.cpp tensor name, or `None` for tensors candor does not use.
fn hf_tensor_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let module = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// Undo llama.cpp's q/k permutation: raw rows are `[heads, D/2, 2]`, transformers' rows are
/// `[heads, 2, D/2]` (transformers' `_reverse_permute_weights`).
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle::Result<Tensor> {
    let shape = w.shape().clone();
    let rows = shape.dims()[0];
    let rest: usize = shape.elem_count() / rows;
    w.reshape((heads, rows / heads / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(shape)
}

/// Read and dequantize a GGUF file.
pub fn load_gguf(path: &Path) -> Result<GgufModel> {
    let bytes = std::fs::read(path).with_context(|| format!("failed to read `{}`", path.display()))?;
    let content = Content::read(&mut Cursor::new(&bytes))
        .map_err(|e| anyhow!("`{}` is not a valid GGUF file: {e}", path.display()))?;
    let meta = Metadata { map: &content.metadata, path };
    let arch_name = meta.opt_str("general.architecture").unwrap_or("llama").to_string();
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        other => {
            bail!("`{}`: unsupported GGUF architecture `{other}` (supported: llama, mistral, qwen2)", path.display())
        }
    };
    let tokenizer = gguf_tokenizer(&meta)?;
    let key = |k: &str| format!("{arch_name}.{k}");
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let hidden = meta.usize(&key("embedding_length"))?;
    let head_dim = meta.opt_usize(&key("attention.key_length"))?.unwrap_or(hidden / heads);
    let has_output = content.tensor_infos.contains_key("output.weight");
    let vocab_size = match content.tensor_infos.get("token_embd.weight") {
        Some(info) => info.shape.dims()[0],
        None => bail!("`{}`: GGUF file has no `token_embd.weight`", path.display()),
    };
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta.opt_f64(&key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        rope_theta: meta.opt_f64(&key("rope.freq_base")).unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: meta.opt_usize(&key("context_length"))?.unwrap_or(2048),
        sliding_window: meta.opt_usize(&key("attention.sliding_window"))?,
        first_sliding_layer: 0,
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        tie_word_embeddings: !has_output,
        pad_token_id: tokenizer.pad,
        bos_token_id: tokenizer.bos.as_ref().map(|b| b.1),
        eos_token_ids: tokenizer.eos.iter().map(|e| e.1).collect(),
        num_labels: None,
    };
    let permuted = matches!(architecture, Architecture::Llama | Architecture::Mistral);
    let names: Vec<(&String, String)> =
        content.tensor_infos.keys().filter_map(|n| hf_tensor_name(n).map(|hf| (n, hf))).collect();
    let weights = names
        .par_iter()
        .map(|(gguf_name, hf_name)| -> Result<(String, Tensor)> {
            let q = content
                .tensor(&mut Cursor::new(&bytes), gguf_name, &Device::Cpu)
                .with_context(|| format!("`{}`: failed to read tensor `{gguf_name}`", path.display()))?;
            let mut w = q.dequantize(&Device::Cpu)?;
            if permuted && gguf_name.contains("attn_q.") {
                w = unpermute_rope_rows(&w, heads)?;
            } else if permuted && gguf_name.contains("attn_k.") {
                w = unpermute_rope_rows(&w, kv_heads)?;
            }
            Ok((hf_name.clone(), w))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    let chat_template = meta.opt_str("tokenizer.chat_template").map(str::to_string);
    Ok(GgufModel { config, weights, tokenizer, chat_template })
}

/// Build the tokenizer from `tokenizer.ggml.*`, as transformers' `GGUFGPTConverter` does:
/// byte-level BPE over the stored vocabulary and merges; control and user-defined tokens
/// (types 3 and 4) become special added tokens so they are matched whole.
fn gguf_tokenizer(meta: &Metadata) -> Result<TextTokenizer> {
    let path = meta.path.display();
    let model = meta.opt_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        bail!("`{path}`: unsupported GGUF tokenizer `{model}` (supported: gpt2-style byte-level BPE)");
    }
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let merges: Vec<(String, String)> = meta
        .strings("tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("`{path}`: malformed merge `{m}` in `tokenizer.ggml.merges`"))
        })
        .collect::<Result<_>>()?;
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("`{path}`: cannot build BPE tokenizer: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    // llama.cpp names the pre-tokenizer; SmolLM's splits every digit before the byte-level
    // regex, as its original `tokenizer.json` does.
    let pre: PreTokenizerWrapper = match meta.opt_str("tokenizer.ggml.pre") {
        Some("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        _ => byte_level.into(),
    };
    tok.with_pre_tokenizer(Some(pre));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
    let types: Vec<i64> = match meta.map.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| anyhow!("`{path}`: `tokenizer.ggml.token_type`: {e}"))?
            .iter()
            .map(|t| match t {
                Value::I32(x) => *x as i64,
                Value::U32(x) => *x as i64,
                _ => 1,
            })
            .collect(),
        None => Vec::new(),
    };
    let special: Vec<AddedToken> = types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(i, _)| AddedToken::from(tokens[i].clone(), true))
        .collect();
    tok.add_special_tokens(special).map_err(|e| anyhow!("`{path}`: cannot add special tokens: {e}"))?;
    let token_at =
        |key: &str| -> Result<Option<String>> { Ok(meta.opt_usize(key)?.and_then(|id| tokens.get(id).cloned())) };
    Ok(TextTokenizer::new(
        tok,
        token_at("tokenizer.ggml.bos_token_id")?,
        token_at("tokenizer.ggml.eos_token_id")?,
        token_at("tokenizer.ggml.padding_token_id")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_cpp_names_to_transformers_names() {
        assert_eq!(hf_tensor_name("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(hf_tensor_name("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(hf_tensor_name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(hf_tensor_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_tensor_name("rope_freqs.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // One head of width 4 over 1 input: llama.cpp stores rows [0, 2, 1, 3] of HF's order.
        let raw = Tensor::new(&[[0f32], [2.], [1.], [3.]], &Device::Cpu).unwrap();
        let hf: Vec<Vec<f32>> = unpermute_rope_rows(&raw, 1).unwrap().to_vec2().unwrap();
        assert_eq!(hf, vec![vec![0.], vec![1.], vec![2.], vec![3.]]);
    }
}

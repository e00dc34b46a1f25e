//! GGUF files (llama.cpp's format): weights in transformers' layout, kept in their stored blocks
//! until the model asks for them dequantized to f32 or packed (see [`GgufWeights`]), the model
//! config, the tokenizer and the chat template, all from the file's metadata.
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
use candle::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle::quantized::{GgmlDType, QTensor};
use candle::{Device, Tensor};
use rayon::prelude::*;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use super::gemma_tokenizer::{GgufVocab, CONTROL, USER_DEFINED};
use super::tokenizer::TextTokenizer;
use super::{check_weights, TensorHeader, WeightCheck};
use crate::model::config::{Activation, Architecture, LongRope, ModelConfig};
use crate::model::packed::PackedWeight;

/// Everything a GGUF file holds, ready to build a model from.
pub struct GgufModel {
    /// The model configuration from the `{arch}.*` metadata.
    pub config: ModelConfig,
    /// The weights as stored, under transformers' names.
    pub weights: GgufWeights,
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
        self.map.get(key).ok_or_else(|| anyhow!("{}: GGUF metadata has no `{key}`", self.path.display()))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n: Option<usize> = match v {
            Value::U64(x) => usize::try_from(*x).ok(),
            Value::I64(x) => usize::try_from(*x).ok(),
            Value::U32(x) => usize::try_from(*x).ok(),
            Value::I32(x) => usize::try_from(*x).ok(),
            Value::U16(x) => Some(*x as usize),
            Value::I16(x) => usize::try_from(*x).ok(),
            Value::U8(x) => Some(*x as usize),
            Value::I8(x) => usize::try_from(*x).ok(),
            other => {
                bail!("{}: metadata `{key}` must be an integer (got {})", self.path.display(), describe_value(other))
            }
        };
        n.ok_or_else(|| {
            anyhow!(
                "{}: metadata `{key}` must be a non-negative integer (got {})",
                self.path.display(),
                describe_value(v)
            )
        })
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.map.contains_key(key) {
            self.usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        Ok(match self.map.get(key) {
            None => None,
            Some(Value::F32(x)) => Some(*x as f64),
            Some(Value::F64(x)) => Some(*x),
            Some(other) => {
                bail!("{}: metadata `{key}` must be a float (got {})", self.path.display(), describe_value(other))
            }
        })
    }

    fn opt_str(&self, key: &str) -> Option<&str> {
        self.map.get(key)?.to_string().ok().map(String::as_str)
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.get(key)?
            .to_vec()
            .map_err(|_| anyhow!("{}: metadata `{key}` must be an array of strings", self.path.display()))?
            .iter()
            .map(|v| {
                v.to_string().cloned().map_err(|_| {
                    anyhow!(
                        "{}: metadata `{key}` must be an array of strings (holds {})",
                        self.path.display(),
                        describe_value(v)
                    )
                })
            })
            .collect()
    }
}

/// The tensors outside the blocks: llama.cpp's names and transformers'.
const OUTER_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's names of a block's modules and transformers' names of the same modules in
/// `architecture`: Phi-3's `ffn_up` holds gate and up fused, and Gemma 3's `ffn_norm` is the
/// norm before the MLP, with two more norms after the sublayers.
fn block_module_names(architecture: Architecture) -> Vec<(&'static str, &'static str)> {
    let mut names = vec![
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("attn_q_norm", "self_attn.q_norm"),
        ("attn_k_norm", "self_attn.k_norm"),
        ("attn_qkv", "self_attn.qkv_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_down", "mlp.down_proj"),
        ("attn_norm", "input_layernorm"),
    ];
    names.push(match architecture {
        Architecture::Phi3 => ("ffn_up", "mlp.gate_up_proj"),
        _ => ("ffn_up", "mlp.up_proj"),
    });
    match architecture {
        Architecture::Gemma3 => names.extend([
            ("ffn_norm", "pre_feedforward_layernorm"),
            ("post_attention_norm", "post_attention_layernorm"),
            ("post_ffw_norm", "post_feedforward_layernorm"),
        ]),
        _ => names.push(("ffn_norm", "post_attention_layernorm")),
    }
    names
}

/// transformers' name of a llama.cpp tensor name in `architecture`, or `None` for tensors
/// candor does not use.
fn hf_tensor_name(gguf: &str, architecture: Architecture) -> Option<String> {
    if let Some((_, hf)) = OUTER_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some(hf.to_string());
    }
    let (layer, rest) = gguf.strip_prefix("blk.")?.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let (_, module) = block_module_names(architecture).into_iter().find(|(g, _)| *g == part)?;
    Some(format!("model.layers.{layer}.{module}.{kind}"))
}

/// llama.cpp's name of a transformers tensor name (the inverse of [`hf_tensor_name`]), for
/// errors about a tensor the file lacks.
fn gguf_tensor_name(hf: &str, architecture: Architecture) -> String {
    if let Some((gguf, _)) = OUTER_NAMES.iter().find(|(_, h)| *h == hf) {
        return gguf.to_string();
    }
    let Some((layer, rest)) = hf.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) else {
        return hf.to_string();
    };
    let Some((module, kind)) = rest.rsplit_once('.') else {
        return hf.to_string();
    };
    match block_module_names(architecture).into_iter().find(|(_, h)| *h == module) {
        Some((part, _)) => format!("blk.{layer}.{part}.{kind}"),
        None => hf.to_string(),
    }
}

/// Phi-3's LongRoPE from `{arch}.rope.scaling.*` and the `rope_factors_short/long` tensors;
/// `None` when the file has no factors.
fn longrope(content: &Content, bytes: &[u8], meta: &Metadata, arch: &str, path: &Path) -> Result<Option<LongRope>> {
    let factors = |name: &str| -> Result<Option<Vec<f64>>> {
        if !content.tensor_infos.contains_key(name) {
            return Ok(None);
        }
        let q = content
            .tensor(&mut Cursor::new(bytes), name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", path.display()))?;
        Ok(Some(q.into_iter().map(f64::from).collect()))
    };
    let (Some(short_factor), Some(long_factor)) =
        (factors("rope_factors_short.weight")?, factors("rope_factors_long.weight")?)
    else {
        return Ok(None);
    };
    let key = |k: &str| format!("{arch}.{k}");
    let original = meta.usize(&key("rope.scaling.original_context_length"))?;
    let max = meta.opt_usize(&key("context_length"))?.unwrap_or(original) as f64;
    let attention_factor = match meta.opt_f64(&key("rope.scaling.attn_factor"))? {
        Some(a) => a,
        None if max <= original as f64 => 1.0,
        None => (1.0 + (max / original as f64).ln() / (original as f64).ln()).sqrt(),
    };
    Ok(Some(LongRope { short_factor, long_factor, original_max_position_embeddings: original, attention_factor }))
}

/// Where a [`ModelConfig`] field comes from in a GGUF file of architecture `arch`.
fn gguf_field(arch: &str, field: &str) -> String {
    let key = match field {
        "vocab_size" => return "the rows of tensor `token_embd.weight`".into(),
        "hidden_size" => "embedding_length",
        "intermediate_size" => "feed_forward_length",
        "num_hidden_layers" => "block_count",
        "num_attention_heads" => "attention.head_count",
        "num_key_value_heads" => "attention.head_count_kv",
        "head_dim" => "attention.key_length",
        "rms_norm_eps" => "attention.layer_norm_rms_epsilon",
        "rope_theta" => "rope.freq_base",
        "max_position_embeddings" => "context_length",
        "sliding_window" => "attention.sliding_window",
        other => return format!("`{other}`"),
    };
    format!("`{arch}.{key}`")
}

/// Undo llama.cpp's q/k permutation: raw rows are `[heads, D/2, 2]`, transformers' rows are
/// `[heads, 2, D/2]` (transformers' `_reverse_permute_weights`).
pub fn unpermute_rope_rows(w: &Tensor, heads: usize) -> candle::Result<Tensor> {
    let shape = w.shape().clone();
    let rows = shape.dims()[0];
    let rest: usize = shape.elem_count() / rows;
    w.reshape((heads, rows / heads / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(shape)
}

/// The tensors of a GGUF file as stored (quantized blocks stay quantized) under transformers'
/// names, with llama.cpp's q/k row permutation already undone: a model takes each either
/// dequantized to f32 ([`WeightSource::get`]) or packed ([`WeightSource::packed`]).
pub struct GgufWeights {
    tensors: HashMap<String, QTensor>,
    /// What llama.cpp added to every norm weight (Gemma's 1), taken off when dequantized.
    norm_offset: f64,
}

impl GgufWeights {
    /// Tensor `name` (a transformers name) dequantized to f32.
    pub fn dequantized(&self, name: &str) -> candle::Result<Tensor> {
        let q = self.tensors.get(name).ok_or_else(|| candle::Error::Msg(format!("missing weight `{name}`")))?;
        let w = q.dequantize(&Device::Cpu)?;
        match self.norm_offset != 0.0 && name.ends_with("norm.weight") {
            true => w - self.norm_offset,
            false => Ok(w),
        }
    }

    /// The GGUF type tensor `name` is stored in.
    pub fn stored_kind(&self, name: &str) -> Option<GgmlDType> {
        self.tensors.get(name).map(|q| q.dtype())
    }

    /// Whether tensor `name` is there.
    pub fn contains_key(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

impl crate::model::WeightSource for GgufWeights {
    fn get(&mut self, name: &str) -> candle::Result<Tensor> {
        let w = self.dequantized(name)?;
        self.tensors.remove(name);
        Ok(w)
    }

    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn packed(&mut self, name: &str, kind: Option<GgmlDType>) -> candle::Result<Option<PackedWeight>> {
        let stored = self.stored_kind(name);
        let wanted = match (stored, kind) {
            (None | Some(GgmlDType::F32), _) => false,
            (Some(s), Some(k)) => s == k,
            (Some(_), None) => true,
        };
        match wanted {
            true => PackedWeight::new(self.tensors.remove(name).expect("checked above")).map(Some),
            false => Ok(None),
        }
    }
}

/// Read a GGUF file (memory-mapped: each tensor is copied out once, in its stored blocks).
pub fn load_gguf(path: &Path) -> Result<GgufModel> {
    let file = std::fs::File::open(path).with_context(|| format!("failed to read `{}`", path.display()))?;
    // SAFETY: the file is only read; like every mmap-based loader, this relies on nobody
    // truncating it while the model loads.
    let mapped = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("failed to map `{}`", path.display()))?;
    load_gguf_bytes(&mapped, path)
}

/// The row order that undoes llama.cpp's q/k permutation for `heads` heads of `rows / heads`
/// rows each: transformers' row `(h, half, i)` is the file's row `(h, i, half)`.
fn unpermuted_row_order(rows: usize, heads: usize) -> Vec<usize> {
    let d = rows / heads;
    (0..heads).flat_map(|h| (0..2).flat_map(move |half| (0..d / 2).map(move |i| h * d + 2 * i + half))).collect()
}

/// [`load_gguf`] on the bytes of a file already read; `path` names it in errors. The header
/// is read with every count and size checked against the bytes left, the configuration is
/// validated and every tensor's shape checked against it before any tensor is read.
pub fn load_gguf_bytes(bytes: &[u8], path: &Path) -> Result<GgufModel> {
    let content = read_header(bytes, path)?;
    let meta = Metadata { map: &content.metadata, path };
    let arch_name = meta.opt_str("general.architecture").unwrap_or("llama").to_string();
    let architecture = match arch_name.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "phi3" => Architecture::Phi3,
        "gemma3" => Architecture::Gemma3,
        other => {
            bail!(
                "{}: unsupported GGUF architecture `{other}` (supported: llama, mistral, qwen2, qwen3, phi3, gemma3)",
                path.display()
            )
        }
    };
    let tokenizer = match architecture {
        Architecture::Gemma3 => super::gemma_tokenizer::from_gguf(GgufVocab::read(&meta)?, path)?,
        _ => gguf_tokenizer(&meta)?,
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let heads = meta.usize(&key("attention.head_count"))?;
    let kv_heads = meta.opt_usize(&key("attention.head_count_kv"))?.unwrap_or(heads);
    let hidden = meta.usize(&key("embedding_length"))?;
    let head_dim = match meta.opt_usize(&key("attention.key_length"))? {
        Some(d) => d,
        None if heads == 0 => {
            bail!("{}: metadata `{}` must be positive (got 0)", path.display(), key("attention.head_count"))
        }
        None if !hidden.is_multiple_of(heads) => bail!(
            "{}: metadata `{}` must divide `{}` = {hidden} (got {heads}) when `{}` is not given",
            path.display(),
            key("attention.head_count"),
            key("embedding_length"),
            key("attention.key_length")
        ),
        None => hidden / heads,
    };
    let has_output = content.tensor_infos.contains_key("output.weight");
    let vocab_size = match content.tensor_infos.get("token_embd.weight").map(|i| i.shape.dims()) {
        Some(&[rows, _]) => rows,
        Some(dims) => {
            bail!("{}: tensor `token_embd.weight` has shape {dims:?}; expected [vocab, hidden]", path.display())
        }
        None => bail!("{}: GGUF file has no `token_embd.weight`", path.display()),
    };
    let mut config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: meta.usize(&key("feed_forward_length"))?,
        num_hidden_layers: meta.usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: meta.opt_f64(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        rope_theta: meta.opt_f64(&key("rope.freq_base"))?.unwrap_or(10_000.0),
        rope_scaling: None,
        max_position_embeddings: meta.opt_usize(&key("context_length"))?.unwrap_or(2048),
        sliding_window: meta.opt_usize(&key("attention.sliding_window"))?.filter(|&w| w > 0),
        first_sliding_layer: 0,
        qkv_bias: content.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: content.tensor_infos.contains_key("blk.0.attn_output.bias"),
        mlp_bias: content.tensor_infos.contains_key("blk.0.ffn_up.bias"),
        qk_norm: content.tensor_infos.contains_key("blk.0.attn_q_norm.weight"),
        longrope: longrope(&content, bytes, &meta, &arch_name, path)?,
        partial_rotary_factor: match meta.opt_usize(&key("rope.dimension_count"))? {
            Some(d) if head_dim > 0 => d as f64 / head_dim as f64,
            _ => 1.0,
        },
        fused_projections: architecture == Architecture::Phi3,
        tie_word_embeddings: !has_output,
        pad_token_id: tokenizer.pad,
        bos_token_id: tokenizer.bos.as_ref().map(|b| b.1),
        eos_token_ids: tokenizer.eos.iter().map(|e| e.1).collect(),
        num_labels: None,
        norm_weight_offset: 0.0,
        sandwich_norms: false,
        hidden_act: Activation::Silu,
        scale_embeddings: false,
        query_pre_attn_scalar: None,
        local_rope_theta: None,
        full_attention_layers: Vec::new(),
    };
    if architecture == Architecture::Gemma3 {
        gemma3_switches(&mut config, &tokenizer);
    }
    config.validate().map_err(|e| match &e {
        crate::model::config::ConfigError::Invalid { field, reason } => {
            anyhow!("{}: {} (`{field}`) {reason}", path.display(), gguf_field(&arch_name, field))
        }
        _ => anyhow!("{}: {e}", path.display()),
    })?;
    // Check every tensor the model reads against the configuration, on the header alone.
    let headers: HashMap<String, TensorHeader> = content
        .tensor_infos
        .iter()
        .filter_map(|(name, info)| {
            let header = TensorHeader {
                shape: info.shape.dims().to_vec(),
                dtype: format!("{:?}", info.ggml_dtype),
                float: true,
                file: path.to_path_buf(),
                display_name: name.clone(),
            };
            hf_tensor_name(name, architecture).map(|hf| (hf, header))
        })
        .collect();
    let holder = path.display().to_string();
    let names = WeightCheck {
        config_name: "the GGUF metadata",
        holder: &holder,
        field: &|f| gguf_field(&arch_name, f),
        tensor: &|hf| gguf_tensor_name(hf, architecture),
    };
    check_weights(&config, &headers, has_output, &names)?;
    let used: std::collections::HashSet<String> = (0..config.num_hidden_layers)
        .flat_map(|i| config.expected_layer_tensors(i))
        .chain(config.expected_outer_tensors(has_output))
        .map(|t| t.name)
        .collect();
    let permuted = matches!(architecture, Architecture::Llama | Architecture::Mistral);
    let names: Vec<(&String, String)> = content
        .tensor_infos
        .keys()
        .filter_map(|n| hf_tensor_name(n, architecture).filter(|hf| used.contains(hf)).map(|hf| (n, hf)))
        .collect();
    let tensors = names
        .par_iter()
        .map(|(gguf_name, hf_name)| -> Result<(String, QTensor)> {
            let tensor_err = |e: candle::Error| anyhow!("{}: tensor `{gguf_name}`: {e}", path.display());
            let q = content.tensor(&mut Cursor::new(bytes), gguf_name, &Device::Cpu).map_err(tensor_err)?;
            let heads = match (permuted, gguf_name.contains("attn_q."), gguf_name.contains("attn_k.")) {
                (true, true, _) => heads,
                (true, _, true) => kv_heads,
                _ => return Ok((hf_name.clone(), q)),
            };
            let q = match q.shape().rank() {
                2 => crate::model::packed::gather_rows(&q, &unpermuted_row_order(q.shape().dims()[0], heads)),
                _ => q
                    .dequantize(&Device::Cpu)
                    .and_then(|w| unpermute_rope_rows(&w, heads))
                    .and_then(|w| QTensor::quantize(&w, GgmlDType::F32)),
            }
            .map_err(tensor_err)?;
            Ok((hf_name.clone(), q))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    // llama.cpp stores Gemma's norms as offset + w; transformers subtracts it.
    let weights = GgufWeights { tensors, norm_offset: config.norm_weight_offset };
    let chat_template = meta.opt_str("tokenizer.chat_template").map(str::to_string);
    Ok(GgufModel { config, weights, tokenizer, chat_template })
}

/// Gemma 3's structure, and what its GGUF does not state, taken as transformers and llama.cpp
/// take it (Gemma3TextConfig's defaults): GeGLU, the pattern of global layers, the local RoPE
/// base, the attention scale; and generation also stops at `<end_of_turn>`, as every Gemma 3
/// `generation_config.json` says.
fn gemma3_switches(config: &mut ModelConfig, tokenizer: &TextTokenizer) {
    use crate::model::config::gemma3_defaults as default;
    config.set_gemma3_structure();
    config.hidden_act = Activation::GeluPytorchTanh;
    config.query_pre_attn_scalar = Some(default::QUERY_PRE_ATTN_SCALAR);
    config.local_rope_theta = Some(default::LOCAL_ROPE_THETA);
    config.sliding_window = Some(config.sliding_window.unwrap_or(default::SLIDING_WINDOW));
    config.full_attention_layers =
        default::full_attention_layers(config.num_hidden_layers, default::SLIDING_WINDOW_PATTERN);
    if let Some(id) = tokenizer.inner().token_to_id("<end_of_turn>") {
        config.eos_token_ids.push(id);
    }
}

/// A short description of a metadata value for errors (arrays by length only).
fn describe_value(v: &Value) -> String {
    match v {
        Value::Array(a) => format!("an array of {} values", a.len()),
        Value::String(s) if s.len() > 40 => format!("a string of {} bytes", s.len()),
        other => format!("{other:?}"),
    }
}

/// Longest metadata array accepted: far above any vocabulary or merge list, and with the
/// check against the bytes left in the file, bounds the memory a header can ask for.
const MAX_ARRAY_LEN: u64 = 1 << 26;
/// Deepest nesting of metadata arrays accepted.
const MAX_DEPTH: usize = 8;

/// Reads a GGUF header from bytes, checking every count and length against the bytes left.
struct HeaderReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Version 2 and 3 store lengths and counts in 64 bits, version 1 in 32.
    wide: bool,
}

impl<'a> HeaderReader<'a> {
    fn fail(&self, what: impl std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: not a valid GGUF file: {what} (at byte {})", self.path.display(), self.pos)
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let left = self.left();
        if n > left {
            return Err(self.fail(format_args!("{what} needs {n} bytes, the file has {left} left")));
        }
        let out = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        Ok(self.take(N as u64, what)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length: 64 bits from version 2 on, 32 in version 1.
    fn len(&mut self, what: &str) -> Result<u64> {
        if self.wide {
            self.u64(what)
        } else {
            self.u32(what).map(u64::from)
        }
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let mut b = self.take(n, what)?;
        // Strings are not NUL-terminated by the spec, but some writers add one.
        while let [rest @ .., 0] = b {
            b = rest;
        }
        Ok(String::from_utf8_lossy(b).into_owned())
    }

    /// The fewest bytes a value of type `ty` can take.
    fn min_size(&self, ty: u32) -> u64 {
        let prefix = if self.wide { 8 } else { 4 };
        match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => prefix,
            9 => 4 + prefix,
            _ => 1,
        }
    }

    fn value(&mut self, ty: u32, depth: usize, key: &str) -> Result<Value> {
        let what = format!("the value of `{key}`");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what)?[0]),
            1 => Value::I8(self.array::<1>(&what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(&what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(&what)?)),
            4 => Value::U32(u32::from_le_bytes(self.array(&what)?)),
            5 => Value::I32(i32::from_le_bytes(self.array(&what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(&what)?)),
            7 => match self.array::<1>(&what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.fail(format_args!("`{key}`: a bool must be 0 or 1 (got {b})"))),
            },
            8 => Value::String(self.string(&what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(self.fail(format_args!("`{key}`: arrays nested deeper than {MAX_DEPTH}")));
                }
                let elem = self.u32(&what)?;
                let n = self.len(&what)?;
                let min = self.min_size(elem);
                if n > MAX_ARRAY_LEN || n.saturating_mul(min) > self.left() {
                    return Err(self.fail(format_args!(
                        "`{key}`: an array of {n} values of type {elem} does not fit in the {} bytes left",
                        self.left()
                    )));
                }
                let mut out = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    out.push(self.value(elem, depth + 1, key)?);
                }
                Value::Array(out)
            }
            10 => Value::U64(self.u64(&what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(&what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(&what)?)),
            other => return Err(self.fail(format_args!("`{key}`: unknown value type {other}"))),
        })
    }
}

/// ggml's tensor type ids that candle reads.
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Read a GGUF header (metadata and tensor infos) from the file's bytes. Unlike candle's
/// reader, which this replaces, every count, length, shape and offset is checked against the
/// file before anything is allocated or read, and an alignment of 0 is an error, not a panic.
fn read_header(bytes: &[u8], path: &Path) -> Result<Content> {
    let mut r = HeaderReader { bytes, pos: 0, path, wide: true };
    if r.take(4, "the magic number")? != b"GGUF" {
        return Err(r.fail("the file does not start with `GGUF`"));
    }
    let magic = match r.u32("the version")? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(r.fail(format_args!("unsupported version {v} (supported: 1, 2, 3)"))),
    };
    r.wide = magic != VersionedMagic::GgufV1;
    let tensor_count = r.len("the tensor count")?;
    let kv_count = r.len("the metadata count")?;
    // The smallest metadata entry and tensor info, to refuse counts the file cannot hold.
    let prefix = if r.wide { 8 } else { 4 };
    let needed =
        kv_count.saturating_mul(prefix + 4 + 1).saturating_add(tensor_count.saturating_mul(prefix + 4 + 4 + 8));
    if needed > r.left() {
        return Err(r.fail(format_args!(
            "the header declares {tensor_count} tensors and {kv_count} metadata entries, which need at least {needed} bytes; the file has {} left",
            r.left()
        )));
    }
    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string("a metadata key")?;
        let ty = r.u32(&format!("the type of `{key}`"))?;
        let value = r.value(ty, 0, &key)?;
        metadata.insert(key, value);
    }
    let mut infos: Vec<(String, Vec<u64>, u32, u64)> = Vec::with_capacity(tensor_count as usize);
    for _ in 0..tensor_count {
        let name = r.string("a tensor name")?;
        let what = format!("the info of tensor `{name}`");
        let n_dims = r.u32(&what)?;
        if n_dims > 4 {
            return Err(r.fail(format_args!("tensor `{name}` has {n_dims} dimensions (at most 4)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(r.len(&what)?);
        }
        let dtype = r.u32(&what)?;
        let offset = r.u64(&what)?;
        infos.push((name, dims, dtype, offset));
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(v) => match v {
            Value::U8(a) => u64::from(*a),
            Value::U16(a) => u64::from(*a),
            Value::U32(a) => u64::from(*a),
            Value::U64(a) => *a,
            Value::I8(a) => u64::try_from(*a).unwrap_or(0),
            Value::I16(a) => u64::try_from(*a).unwrap_or(0),
            Value::I32(a) => u64::try_from(*a).unwrap_or(0),
            Value::I64(a) => u64::try_from(*a).unwrap_or(0),
            other => bail!(
                "{}: metadata `general.alignment` must be an integer (got {})",
                path.display(),
                describe_value(other)
            ),
        },
    };
    if alignment == 0 {
        bail!("{}: metadata `general.alignment` must be positive (got 0)", path.display());
    }
    let file_len = bytes.len() as u64;
    let data_offset = (r.pos as u64).div_ceil(alignment).saturating_mul(alignment);
    let mut tensor_infos = HashMap::with_capacity(infos.len());
    for (name, mut dims, dtype_id, offset) in infos {
        let bad = |why: String| anyhow!("{}: tensor `{name}` {why}", path.display());
        let Some(ggml_dtype) = ggml_dtype(dtype_id) else {
            return Err(bad(format!("has tensor type {dtype_id}, which candor cannot read")));
        };
        dims.reverse(); // ggml lists the fastest-varying dimension first
        let elems = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        let (block, type_size) = (ggml_dtype.block_size() as u64, ggml_dtype.type_size() as u64);
        let bytes_needed = match elems {
            Some(e) if e.is_multiple_of(block) => (e / block).checked_mul(type_size),
            Some(e) => {
                return Err(bad(format!("has {e} elements, not a multiple of the {ggml_dtype:?} block of {block}")))
            }
            None => None,
        };
        let end = bytes_needed.and_then(|b| data_offset.checked_add(offset)?.checked_add(b));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(bad(format!(
                    "of shape {dims:?} ({ggml_dtype:?}) at data offset {offset} does not fit in the file ({file_len} bytes)"
                )))
            }
        }
        let dims: Vec<usize> = dims.into_iter().map(|d| d as usize).collect();
        if tensor_infos.contains_key(&name) {
            return Err(bad("appears twice in the header".into()));
        }
        tensor_infos.insert(name, TensorInfo { ggml_dtype, shape: candle::Shape::from(dims), offset });
    }
    Ok(Content { magic, metadata, tensor_infos, tensor_data_offset: data_offset })
}

impl GgufVocab {
    /// The `tokenizer.ggml.*` vocabulary, types, merges and special-token ids.
    fn read(meta: &Metadata) -> Result<Self> {
        let path = meta.path.display();
        let tokens = meta.strings("tokenizer.ggml.tokens")?;
        let merges = match meta.map.contains_key("tokenizer.ggml.merges") {
            false => None,
            true => Some(
                meta.strings("tokenizer.ggml.merges")?
                    .into_iter()
                    .map(|m| {
                        m.split_once(' ')
                            .map(|(a, b)| (a.to_string(), b.to_string()))
                            .ok_or_else(|| anyhow!("`{path}`: malformed merge `{m}` in `tokenizer.ggml.merges`"))
                    })
                    .collect::<Result<_>>()?,
            ),
        };
        let token_types: Vec<i64> = match meta.map.get("tokenizer.ggml.token_type") {
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
        if token_types.len() > tokens.len() {
            bail!(
                "{path}: metadata `tokenizer.ggml.token_type` has {} entries but `tokenizer.ggml.tokens` has {}",
                token_types.len(),
                tokens.len()
            );
        }
        let flag = |key: &str, default: bool| match meta.map.get(key) {
            Some(Value::Bool(b)) => *b,
            _ => default,
        };
        let sentencepiece = meta.opt_str("tokenizer.ggml.model") == Some("llama");
        Ok(Self {
            tokens,
            token_types,
            merges,
            bos: meta.opt_usize("tokenizer.ggml.bos_token_id")?,
            eos: meta.opt_usize("tokenizer.ggml.eos_token_id")?,
            unk: meta.opt_usize("tokenizer.ggml.unknown_token_id")?,
            pad: meta.opt_usize("tokenizer.ggml.padding_token_id")?,
            add_bos: flag("tokenizer.ggml.add_bos_token", sentencepiece),
            add_eos: flag("tokenizer.ggml.add_eos_token", false),
        })
    }
}

/// Build the tokenizer from `tokenizer.ggml.*`, as transformers' `GGUFGPTConverter` does:
/// byte-level BPE over the stored vocabulary and merges; control and user-defined tokens
/// (types 3 and 4) become special added tokens so they are matched whole.
fn gguf_tokenizer(meta: &Metadata) -> Result<TextTokenizer> {
    let path = meta.path.display();
    let model = meta.opt_str("tokenizer.ggml.model").unwrap_or("");
    if model != "gpt2" {
        bail!("`{path}`: unsupported GGUF tokenizer `{model}` (supported: gpt2-style byte-level BPE, and Gemma's)");
    }
    let mut v = GgufVocab::read(meta)?;
    let Some(merges) = v.merges.take() else {
        bail!("{path}: GGUF metadata has no `tokenizer.ggml.merges`");
    };
    let vocab: Vocab = v.tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
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
    let special: Vec<AddedToken> = v
        .token_types
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(i, _)| AddedToken::from(v.tokens[i].clone(), true))
        .collect();
    tok.add_special_tokens(special).map_err(|e| anyhow!("`{path}`: cannot add special tokens: {e}"))?;
    Ok(v.text_tokenizer(tok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_cpp_names_to_transformers_names() {
        let llama = |n| hf_tensor_name(n, Architecture::Llama);
        assert_eq!(llama("blk.3.attn_q.weight").unwrap(), "model.layers.3.self_attn.q_proj.weight");
        assert_eq!(llama("blk.0.ffn_norm.weight").unwrap(), "model.layers.0.post_attention_layernorm.weight");
        assert_eq!(llama("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(llama("output.weight").unwrap(), "lm_head.weight");
        assert!(llama("rope_freqs.weight").is_none());
        assert!(llama("blk.0.post_ffw_norm.weight").is_none());
        let gemma = |n| hf_tensor_name(n, Architecture::Gemma3).unwrap();
        assert_eq!(gemma("blk.2.ffn_norm.weight"), "model.layers.2.pre_feedforward_layernorm.weight");
        assert_eq!(gemma("blk.2.post_attention_norm.weight"), "model.layers.2.post_attention_layernorm.weight");
        assert_eq!(gemma("blk.2.post_ffw_norm.weight"), "model.layers.2.post_feedforward_layernorm.weight");
        assert_eq!(
            hf_tensor_name("blk.1.ffn_up.weight", Architecture::Phi3).unwrap(),
            "model.layers.1.mlp.gate_up_proj.weight"
        );
        for arch in [Architecture::Llama, Architecture::Phi3, Architecture::Gemma3] {
            for (gguf, _) in block_module_names(arch) {
                let name = format!("blk.7.{gguf}.weight");
                assert_eq!(gguf_tensor_name(&hf_tensor_name(&name, arch).unwrap(), arch), name);
            }
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // One head of width 4 over 1 input: llama.cpp stores rows [0, 2, 1, 3] of HF's order.
        let raw = Tensor::new(&[[0f32], [2.], [1.], [3.]], &Device::Cpu).unwrap();
        let hf: Vec<Vec<f32>> = unpermute_rope_rows(&raw, 1).unwrap().to_vec2().unwrap();
        assert_eq!(hf, vec![vec![0.], vec![1.], vec![2.], vec![3.]]);
    }
}

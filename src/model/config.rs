//! Model configuration: transformers' `config.json` keys in, one resolved [`ModelConfig`] out.
//!
//! Llama (SmolLM2 included), Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3 differ only in switches of
//! this struct: q/k/v biases (Qwen2), per-head q/k norms (Qwen3), a sliding attention window
//! (Mistral), fused projections and LongRoPE (Phi-3), norms around both sublayers, GeGLU and
//! interleaved local and global layers (Gemma 3), llama3 RoPE scaling, tied embeddings.

use serde::{Deserialize, Serialize};

pub use super::rope::LongRope;

fn full_rotation() -> f64 {
    1.0
}

/// The decoder-only architectures candor implements; `model_type` in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// `LlamaForCausalLM` (also SmolLM2).
    Llama,
    /// `MistralForCausalLM`: Llama with sliding-window attention.
    Mistral,
    /// `Qwen2ForCausalLM`: Llama with biases on q, k and v.
    Qwen2,
    /// `Qwen3ForCausalLM`: Llama with an RMSNorm on each query and key head (no biases), and a
    /// head width independent of the hidden size.
    Qwen3,
    /// `Phi3ForCausalLM`: q/k/v and gate/up stored fused (`qkv_proj`, `gate_up_proj`), RoPE on
    /// part of each head, LongRoPE scaling.
    Phi3,
    /// `Gemma3ForCausalLM` (`gemma3_text`): RMSNorms scaled by 1 + w, norms before and after
    /// both sublayers, per-head q/k norms, GeGLU, scaled embeddings, sliding-window layers with
    /// their own RoPE base between global ones.
    #[serde(rename = "gemma3_text")]
    Gemma3,
}

/// The activation of the MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU's SiLU (Llama and most others).
    #[default]
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    GeluPytorchTanh,
}

impl Activation {
    /// transformers' name (`hidden_act` / `hidden_activation`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::Silu => "silu",
            Self::GeluPytorchTanh => "gelu_pytorch_tanh",
        }
    }
}

/// Gemma3TextConfig's defaults, for what a `config.json` or a GGUF file (which states none of
/// them) leaves out.
pub mod gemma3_defaults {
    /// `query_pre_attn_scalar`: attention scores scaled by 1/√256.
    pub const QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
    /// `rope_local_base_freq`: the sliding layers' RoPE base.
    pub const LOCAL_ROPE_THETA: f64 = 10_000.0;
    /// `sliding_window`.
    pub const SLIDING_WINDOW: usize = 4096;
    /// `sliding_window_pattern`: every sixth layer attends globally.
    pub const SLIDING_WINDOW_PATTERN: usize = 6;

    /// The global layers of `layers` under `pattern` (transformers' `layer_types`: layer i is
    /// global when i + 1 is a multiple of the pattern).
    pub fn full_attention_layers(layers: usize, pattern: usize) -> Vec<usize> {
        (0..layers).filter(|i| (i + 1) % pattern == 0).collect()
    }
}

/// transformers' names of one decoder block's norms, without `model.layers.{i}.` and `.weight`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockNormNames {
    /// Before attention.
    pub attention_input: &'static str,
    /// Before the MLP.
    pub mlp_input: &'static str,
    /// After attention and after the MLP, before each joins the residual (Gemma's sandwich).
    pub outputs: Option<(&'static str, &'static str)>,
}

/// Llama 3's frequency-dependent RoPE scaling (`rope_type = "llama3"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    /// Divides the lowest frequencies.
    pub factor: f64,
    /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are fully scaled.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// Context length the model was pretrained with.
    pub original_max_position_embeddings: usize,
}

/// A fully resolved model configuration (no optional fields left to interpret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Which family of model this is.
    pub architecture: Architecture,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention when smaller than the query heads).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Optional llama3 RoPE scaling.
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// Phi-3's LongRoPE scaling.
    #[serde(default)]
    pub longrope: Option<LongRope>,
    /// The share of each head's width that RoPE rotates (Phi-3's `partial_rotary_factor`).
    #[serde(default = "full_rotation")]
    pub partial_rotary_factor: f64,
    /// q/k/v and gate/up are stored as one `qkv_proj` and one `gate_up_proj` (Phi-3).
    #[serde(default)]
    pub fused_projections: bool,
    /// Maximum context length.
    pub max_position_embeddings: usize,
    /// Keys further back than this many positions are invisible (Mistral, Qwen2 with
    /// `use_sliding_window`); `None` = full causal attention everywhere.
    pub sliding_window: Option<usize>,
    /// Index of the first layer that uses the sliding window (Qwen2's `max_window_layers`;
    /// 0 for Mistral). Layers before it attend to the full causal context.
    pub first_sliding_layer: usize,
    /// Biases on q/k/v projections (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Biases on the MLP projections (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    /// An RMSNorm over each query and key head before RoPE (Qwen3's `q_norm`, `k_norm`).
    #[serde(default)]
    pub qk_norm: bool,
    /// The output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Every RMSNorm scales by `norm_weight_offset + weight` (Gemma: 1; 0 elsewhere).
    #[serde(default)]
    pub norm_weight_offset: f64,
    /// Norms on the attention and MLP outputs before they join the residual (Gemma 3).
    #[serde(default)]
    pub sandwich_norms: bool,
    /// The MLP's gate activation.
    #[serde(default)]
    pub hidden_act: Activation,
    /// Token embeddings are multiplied by √hidden_size, in their dtype (Gemma).
    #[serde(default)]
    pub scale_embeddings: bool,
    /// Attention scores are scaled by 1/√this instead of 1/√head_dim (Gemma's
    /// `query_pre_attn_scalar`).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// The RoPE base of the sliding-window layers, when it is not `rope_theta` (Gemma 3's local
    /// base; no scaling applies to it).
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    /// Layers at or past `first_sliding_layer` that still attend to the whole context (Gemma 3's
    /// `full_attention` entries of `layer_types`).
    #[serde(default)]
    pub full_attention_layers: Vec<usize>,
    /// Padding token, used to pool the sequence-classification head.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (a model may have several).
    pub eos_token_ids: Vec<u32>,
    /// Labels of a `*ForSequenceClassification` head (`None` for a causal LM).
    pub num_labels: Option<usize>,
}

/// `config.json` as transformers writes it; only the keys candor reads. Every key is optional
/// here so that a key of the wrong type can be found by deserializing it alone; required keys
/// are checked in [`RawConfig::resolve`].
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    model_type: Option<String>,
    architectures: Vec<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
    partial_rotary_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    max_position_embeddings: Option<usize>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    pad_token_id: Option<u32>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<serde_json::Value>,
    id2label: Option<serde_json::Map<String, serde_json::Value>>,
    num_labels: Option<usize>,
    hidden_act: Option<String>,
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    rope_local_base_freq: Option<f64>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    #[serde(rename = "_sliding_window_pattern")]
    private_sliding_window_pattern: Option<usize>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    use_bidirectional_attention: Option<bool>,
}

/// Errors while interpreting a `config.json` (or the configuration read from GGUF metadata).
/// None names the file: the loader that read it adds the path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not JSON, or not a JSON object.
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field has a value candor does not support.
    #[error("unsupported `{field}` in config: {value}")]
    Unsupported {
        /// The `config.json` key.
        field: &'static str,
        /// What was found there.
        value: String,
    },
    /// A field is missing, of the wrong type, or out of range.
    #[error("field `{field}` {reason}")]
    Invalid {
        /// The `config.json` key (transformers' name).
        field: String,
        /// What is wrong with it, e.g. `must be positive (got 0)`.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(field: &str, reason: impl Into<String>) -> Self {
        Self::Invalid { field: field.to_string(), reason: reason.into() }
    }

    /// The `config.json` key this error is about, if it is about one.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Json(_) => None,
            Self::Unsupported { field, .. } => Some(field),
            Self::Invalid { field, .. } => Some(field),
        }
    }
}

/// One dimension of an expected tensor shape and the configuration fields it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dim {
    /// The size.
    pub size: usize,
    /// The fields that determine it, e.g. `hidden_size` or `num_attention_heads × head_dim`.
    pub from: &'static str,
}

/// A tensor the model reads, under its transformers name, with the shape the configuration
/// implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTensor {
    /// transformers' name, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Its shape.
    pub dims: Vec<Dim>,
}

impl ExpectedTensor {
    /// The bare sizes.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().map(|d| d.size).collect()
    }
}

impl ModelConfig {
    /// Parse and validate the text of a transformers `config.json`. Errors name the field
    /// (not the file: the caller knows the path).
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        // Some editors write a UTF-8 BOM; it carries no meaning, so skip it rather than report
        // line 1 as broken JSON.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let value: serde_json::Value = serde_json::from_str(text)?;
        let Some(obj) = value.as_object() else {
            return Err(ConfigError::invalid(
                "(top level)",
                format!("must be a JSON object (got {})", json_kind(&value)),
            ));
        };
        let raw: RawConfig = match serde_json::from_value(value.clone()) {
            Ok(raw) => raw,
            Err(e) => {
                // Find the key: deserialize each one alone (every field is optional).
                for (k, v) in obj {
                    let one = serde_json::Value::Object(std::iter::once((k.clone(), v.clone())).collect());
                    if let Err(e) = serde_json::from_value::<RawConfig>(one) {
                        return Err(ConfigError::invalid(k, format!("has a wrong type or value: {e}")));
                    }
                }
                return Err(ConfigError::Json(e));
            }
        };
        raw.resolve()
    }

    /// Check that every size is positive and the sizes agree with each other, that the norm
    /// epsilon and RoPE settings are positive finite numbers: everything that can be checked
    /// without the weights. Errors name the `config.json` field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(ConfigError::invalid(field, "must be positive (got 0)"));
            }
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(ConfigError::invalid(
                "num_key_value_heads",
                format!(
                    "must divide `num_attention_heads` = {} (got {})",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(ConfigError::invalid(
                "head_dim",
                format!("must be even for rotary embeddings (got {})", self.head_dim),
            ));
        }
        for (field, n) in
            [("num_attention_heads", self.num_attention_heads), ("num_key_value_heads", self.num_key_value_heads)]
        {
            if n.checked_mul(self.head_dim).is_none() {
                return Err(ConfigError::invalid(field, format!("× `head_dim` = {n} × {} overflows", self.head_dim)));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(ConfigError::invalid(
                "rms_norm_eps",
                format!("must be a positive finite number (got {})", self.rms_norm_eps),
            ));
        }
        check_rope_theta(self.rope_theta, "rope_theta")?;
        if let Some(s) = &self.rope_scaling {
            for (key, v) in
                [("factor", s.factor), ("low_freq_factor", s.low_freq_factor), ("high_freq_factor", s.high_freq_factor)]
            {
                if !(v.is_finite() && v > 0.0) {
                    return Err(ConfigError::invalid(
                        "rope_scaling",
                        format!("`{key}` must be a positive finite number (got {v})"),
                    ));
                }
            }
            if s.high_freq_factor <= s.low_freq_factor {
                return Err(ConfigError::invalid(
                    "rope_scaling",
                    format!(
                        "`high_freq_factor` ({}) must be greater than `low_freq_factor` ({})",
                        s.high_freq_factor, s.low_freq_factor
                    ),
                ));
            }
            if s.original_max_position_embeddings == 0 {
                return Err(ConfigError::invalid(
                    "rope_scaling",
                    "`original_max_position_embeddings` must be positive (got 0)",
                ));
            }
        }
        self.validate_partial_rope()?;
        if self.sliding_window == Some(0) {
            return Err(ConfigError::invalid("sliding_window", "must be positive (got 0)"));
        }
        if let Some(&i) = self.full_attention_layers.iter().find(|&&i| i >= self.num_hidden_layers) {
            return Err(ConfigError::invalid(
                "layer_types",
                format!("names layer {i} as full attention, past the {} layers", self.num_hidden_layers),
            ));
        }
        if let Some(theta) = self.local_rope_theta {
            check_rope_theta(theta, "rope_local_base_freq")?;
        }
        if let Some(s) = self.query_pre_attn_scalar.filter(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(ConfigError::invalid(
                "query_pre_attn_scalar",
                format!("must be a positive finite number (got {s})"),
            ));
        }
        if self.num_labels == Some(0) {
            return Err(ConfigError::invalid("num_labels", "must be positive (got 0)"));
        }
        Ok(())
    }

    /// The rotated share of each head and LongRoPE's factors: one factor per rotated pair, each
    /// a positive number.
    fn validate_partial_rope(&self) -> Result<(), ConfigError> {
        let dim = self.rotary_dim();
        if !(self.partial_rotary_factor > 0.0 && self.partial_rotary_factor <= 1.0)
            || dim == 0
            || !dim.is_multiple_of(2)
        {
            return Err(ConfigError::invalid(
                "partial_rotary_factor",
                format!(
                    "must leave an even, positive number of rotated channels of `head_dim` = {} (got {})",
                    self.head_dim, self.partial_rotary_factor
                ),
            ));
        }
        if let Some(l) = &self.longrope {
            for (key, f) in [("short_factor", &l.short_factor), ("long_factor", &l.long_factor)] {
                if f.len() != dim / 2 || f.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
                    return Err(ConfigError::invalid(
                        "rope_scaling",
                        format!("`{key}` must hold {} positive numbers, one per rotated pair (got {f:?})", dim / 2),
                    ));
                }
            }
            if !(l.attention_factor.is_finite() && l.attention_factor > 0.0) || l.original_max_position_embeddings == 0
            {
                return Err(ConfigError::invalid(
                    "rope_scaling",
                    "longrope needs a positive `attention_factor` and `original_max_position_embeddings`",
                ));
            }
        }
        Ok(())
    }

    /// What every Gemma 3 is, whatever its sizes: RMSNorms scaled by 1 + w, on each q and k
    /// head too, norms around both sublayers, embeddings scaled by √hidden.
    pub fn set_gemma3_structure(&mut self) {
        self.norm_weight_offset = 1.0;
        self.sandwich_norms = true;
        self.qk_norm = true;
        self.scale_embeddings = true;
    }

    /// Whether decoder layer `i` attends through the sliding window.
    pub fn is_sliding(&self, i: usize) -> bool {
        self.sliding_window.is_some() && i >= self.first_sliding_layer && !self.full_attention_layers.contains(&i)
    }

    /// transformers' names of each block's norms: Llama's two, or Gemma 3's four, whose norm
    /// before the MLP is `pre_feedforward_layernorm` and whose `post_attention_layernorm`
    /// follows attention.
    pub fn block_norm_names(&self) -> BlockNormNames {
        match self.sandwich_norms {
            false => BlockNormNames {
                attention_input: "input_layernorm",
                mlp_input: "post_attention_layernorm",
                outputs: None,
            },
            true => BlockNormNames {
                attention_input: "input_layernorm",
                mlp_input: "pre_feedforward_layernorm",
                outputs: Some(("post_attention_layernorm", "post_feedforward_layernorm")),
            },
        }
    }

    /// The decoder layer a weight's transformers name belongs to (`model.layers.{i}.…`).
    pub fn layer_of(name: &str) -> Option<usize> {
        name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
    }

    /// The tensors of decoder layer `i` with the shapes this configuration implies, in the order
    /// [`crate::model::CausalLm::new`] reads them. Call [`ModelConfig::validate`] first.
    pub fn expected_layer_tensors(&self, i: usize) -> Vec<ExpectedTensor> {
        let hidden = Dim { size: self.hidden_size, from: "hidden_size" };
        let q = Dim { size: self.num_attention_heads * self.head_dim, from: "num_attention_heads × head_dim" };
        let kv = Dim { size: self.num_key_value_heads * self.head_dim, from: "num_key_value_heads × head_dim" };
        let inter = Dim { size: self.intermediate_size, from: "intermediate_size" };
        let p = format!("model.layers.{i}");
        let norms = self.block_norm_names();
        let mut out =
            vec![ExpectedTensor { name: format!("{p}.{}.weight", norms.attention_input), dims: vec![hidden] }];
        let mut linear = |name: String, o: Dim, i: Dim, bias: bool| {
            if bias {
                out.push(ExpectedTensor { name: format!("{name}.bias"), dims: vec![o] });
            }
            out.push(ExpectedTensor { name: format!("{name}.weight"), dims: vec![o, i] });
        };
        if self.fused_projections {
            let qkv = Dim {
                size: q.size + 2 * kv.size,
                from: "(num_attention_heads + 2 × num_key_value_heads) × head_dim",
            };
            let gate_up = Dim { size: 2 * inter.size, from: "2 × intermediate_size" };
            linear(format!("{p}.self_attn.qkv_proj"), qkv, hidden, self.qkv_bias);
            linear(format!("{p}.self_attn.o_proj"), hidden, q, self.o_bias);
            linear(format!("{p}.mlp.gate_up_proj"), gate_up, hidden, self.mlp_bias);
        } else {
            linear(format!("{p}.self_attn.q_proj"), q, hidden, self.qkv_bias);
            linear(format!("{p}.self_attn.k_proj"), kv, hidden, self.qkv_bias);
            linear(format!("{p}.self_attn.v_proj"), kv, hidden, self.qkv_bias);
            linear(format!("{p}.self_attn.o_proj"), hidden, q, self.o_bias);
            linear(format!("{p}.mlp.gate_proj"), inter, hidden, self.mlp_bias);
            linear(format!("{p}.mlp.up_proj"), inter, hidden, self.mlp_bias);
        }
        linear(format!("{p}.mlp.down_proj"), hidden, inter, self.mlp_bias);
        out.push(ExpectedTensor { name: format!("{p}.{}.weight", norms.mlp_input), dims: vec![hidden] });
        for name in norms.outputs.into_iter().flat_map(|(a, m)| [a, m]) {
            out.push(ExpectedTensor { name: format!("{p}.{name}.weight"), dims: vec![hidden] });
        }
        if self.qk_norm {
            let head = Dim { size: self.head_dim, from: "head_dim" };
            for norm in ["q_norm", "k_norm"] {
                out.push(ExpectedTensor { name: format!("{p}.self_attn.{norm}.weight"), dims: vec![head] });
            }
        }
        out
    }

    /// The tensors outside the decoder layers: embedding, final norm, the untied LM head when
    /// `has_lm_head`, the classification head when `num_labels` is set.
    pub fn expected_outer_tensors(&self, has_lm_head: bool) -> Vec<ExpectedTensor> {
        let hidden = Dim { size: self.hidden_size, from: "hidden_size" };
        let vocab = Dim { size: self.vocab_size, from: "vocab_size" };
        let mut out = vec![
            ExpectedTensor { name: "model.embed_tokens.weight".into(), dims: vec![vocab, hidden] },
            ExpectedTensor { name: "model.norm.weight".into(), dims: vec![hidden] },
        ];
        match self.num_labels {
            Some(n) => out.push(ExpectedTensor {
                name: "score.weight".into(),
                dims: vec![Dim { size: n, from: "num_labels" }, hidden],
            }),
            None if has_lm_head && !self.tie_word_embeddings => {
                out.push(ExpectedTensor { name: "lm_head.weight".into(), dims: vec![vocab, hidden] })
            }
            None => {}
        }
        out
    }

    /// Channels of each head that RoPE rotates (transformers' `int(head_dim × factor)`).
    pub fn rotary_dim(&self) -> usize {
        (self.head_dim as f64 * self.partial_rotary_factor) as usize
    }

    /// Number of query heads sharing one key/value head.
    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// transformers' `config.json` for this configuration, for export.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (model_type, class) = match self.architecture {
            Architecture::Llama => ("llama", "Llama"),
            Architecture::Mistral => ("mistral", "Mistral"),
            Architecture::Qwen2 => ("qwen2", "Qwen2"),
            Architecture::Qwen3 => ("qwen3", "Qwen3"),
            Architecture::Phi3 => ("phi3", "Phi3"),
            Architecture::Gemma3 => ("gemma3_text", "Gemma3"),
        };
        let head = if self.num_labels.is_some() { "ForSequenceClassification" } else { "ForCausalLM" };
        let mut rope = serde_json::json!({"rope_theta": self.rope_theta, "rope_type": "default",
            "partial_rotary_factor": self.partial_rotary_factor});
        if let Some(l) = &self.longrope {
            rope = serde_json::json!({
                "rope_theta": self.rope_theta, "rope_type": "longrope", "short_factor": l.short_factor,
                "long_factor": l.long_factor, "original_max_position_embeddings": l.original_max_position_embeddings,
                "attention_factor": l.attention_factor, "partial_rotary_factor": self.partial_rotary_factor,
            });
        }
        if let Some(s) = &self.rope_scaling {
            rope = serde_json::json!({
                "rope_theta": self.rope_theta, "rope_type": "llama3", "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        let eos = match self.eos_token_ids.as_slice() {
            [one] => serde_json::json!(one),
            many => serde_json::json!(many),
        };
        let mut out = serde_json::json!({
            "architectures": [format!("{class}{head}")],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act.hf_name(),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope.clone(),
            "rope_scaling": if self.rope_scaling.is_some() || self.longrope.is_some() { rope.clone() } else { serde_json::Value::Null },
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": "float32",
        });
        let obj = out.as_object_mut().expect("json object");
        match self.architecture {
            Architecture::Llama => {
                obj.insert("attention_bias".into(), self.o_bias.into());
                obj.insert("mlp_bias".into(), self.mlp_bias.into());
            }
            Architecture::Mistral | Architecture::Phi3 => {
                obj.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
                if let Some(l) = self.longrope.as_ref().filter(|_| self.architecture == Architecture::Phi3) {
                    obj.insert("original_max_position_embeddings".into(), l.original_max_position_embeddings.into());
                }
            }
            Architecture::Qwen2 | Architecture::Qwen3 => {
                if self.architecture == Architecture::Qwen3 {
                    obj.insert("attention_bias".into(), self.qkv_bias.into());
                }
                obj.insert("use_sliding_window".into(), self.sliding_window.is_some().into());
                obj.insert("max_window_layers".into(), self.first_sliding_layer.into());
                obj.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
            }
            Architecture::Gemma3 => self.insert_gemma3_keys(obj, rope),
        }
        if let Some(n) = self.num_labels {
            let id2label: serde_json::Map<_, _> =
                (0..n).map(|i| (i.to_string(), format!("LABEL_{i}").into())).collect();
            obj.insert("id2label".into(), id2label.clone().into());
            let label2id: serde_json::Map<_, _> = (0..n).map(|i| (format!("LABEL_{i}"), i.into())).collect();
            obj.insert("label2id".into(), label2id.into());
        }
        out
    }
}

impl ModelConfig {
    /// Gemma 3's own `config.json` keys: per-layer-type attention and RoPE, the GeGLU
    /// activation, the attention scale, and no soft-capping.
    fn insert_gemma3_keys(&self, obj: &mut serde_json::Map<String, serde_json::Value>, global_rope: serde_json::Value) {
        let local_theta = self.local_rope_theta.unwrap_or(self.rope_theta);
        let layer_types: Vec<&str> = (0..self.num_hidden_layers)
            .map(|i| if self.is_sliding(i) { "sliding_attention" } else { "full_attention" })
            .collect();
        let rope = serde_json::json!({
            "full_attention": global_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        });
        for (key, value) in [
            ("hidden_activation", serde_json::json!(self.hidden_act.hf_name())),
            ("query_pre_attn_scalar", whole_number(self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64))),
            ("sliding_window", serde_json::json!(self.sliding_window)),
            ("layer_types", serde_json::json!(layer_types)),
            ("rope_parameters", rope),
            ("rope_local_base_freq", serde_json::json!(local_theta)),
            ("attention_bias", serde_json::json!(self.qkv_bias)),
            ("final_logit_softcapping", serde_json::Value::Null),
            ("attn_logit_softcapping", serde_json::Value::Null),
        ] {
            obj.insert(key.into(), value);
        }
    }
}

/// `v` as a JSON integer when it is one (transformers' typed configs refuse `256.0` for an int).
fn whole_number(v: f64) -> serde_json::Value {
    match v.fract() == 0.0 && v.abs() < 9e15 {
        true => serde_json::json!(v as i64),
        false => serde_json::json!(v),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// RoPE runs in f32: a base that is 0, negative or infinite there gives NaN angles.
fn check_rope_theta(theta: f64, field: &str) -> Result<(), ConfigError> {
    if !(theta.is_finite() && theta > 0.0 && (theta as f32).is_normal()) {
        return Err(ConfigError::invalid(
            field,
            format!("must be a positive finite number within f32 range (got {theta})"),
        ));
    }
    Ok(())
}

fn required<T>(v: Option<T>, field: &str) -> Result<T, ConfigError> {
    v.ok_or_else(|| ConfigError::invalid(field, "is missing"))
}

impl RawConfig {
    fn resolve(self) -> Result<ModelConfig, ConfigError> {
        let vocab_size = required(self.vocab_size, "vocab_size")?;
        let hidden_size = required(self.hidden_size, "hidden_size")?;
        let intermediate_size = required(self.intermediate_size, "intermediate_size")?;
        let num_hidden_layers = required(self.num_hidden_layers, "num_hidden_layers")?;
        let num_attention_heads = required(self.num_attention_heads, "num_attention_heads")?;
        if hidden_size == 0 {
            return Err(ConfigError::invalid("hidden_size", "must be positive (got 0)"));
        }
        if num_attention_heads == 0 {
            return Err(ConfigError::invalid("num_attention_heads", "must be positive (got 0)"));
        }
        let gemma = self.model_type.as_deref() == Some("gemma3_text");
        let head_dim = match self.head_dim {
            Some(d) => d,
            None if gemma => 256,
            None if !hidden_size.is_multiple_of(num_attention_heads) => {
                return Err(ConfigError::invalid(
                    "num_attention_heads",
                    format!(
                        "must divide `hidden_size` = {hidden_size} (got {num_attention_heads}) when `head_dim` is not given"
                    ),
                ))
            }
            None => hidden_size / num_attention_heads,
        };
        let architecture = match self.model_type.as_deref() {
            Some("llama") | None => Architecture::Llama,
            Some("mistral") => Architecture::Mistral,
            Some("qwen2") => Architecture::Qwen2,
            Some("qwen3") => Architecture::Qwen3,
            Some("phi3") => Architecture::Phi3,
            Some("gemma3_text") => Architecture::Gemma3,
            Some("gemma3") => {
                return Err(ConfigError::Unsupported {
                    field: "model_type",
                    value: "gemma3 (the multimodal model; candor loads the text-only `gemma3_text`)".into(),
                })
            }
            Some(other) => return Err(ConfigError::Unsupported { field: "model_type", value: other.into() }),
        };
        let hidden_act = self.activation(gemma)?;
        self.refuse_unsupported_gemma_keys()?;
        // transformers 5 moved rope settings into `rope_parameters`; 4.x used `rope_theta` plus
        // an optional `rope_scaling` dict. Accept both, the newer one first. Gemma 3 keeps one
        // dict per layer type there.
        let rope = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let local_rope = rope.and_then(|r| r.get("sliding_attention")).filter(|v| v.is_object());
        let rope = rope.map(|r| r.get("full_attention").filter(|v| v.is_object()).unwrap_or(r));
        let (rope_theta, theta_field) = match rope.and_then(|r| r.get("rope_theta")) {
            None | Some(serde_json::Value::Null) => (self.rope_theta.unwrap_or(10_000.0), "rope_theta"),
            Some(v) => (
                v.as_f64().ok_or_else(|| {
                    ConfigError::invalid(
                        "rope_parameters.rope_theta",
                        format!("must be a number (got {})", json_kind(v)),
                    )
                })?,
                "rope_parameters.rope_theta",
            ),
        };
        check_rope_theta(rope_theta, theta_field)?;
        let scaling = rope
            .filter(|r| r.get("rope_type").and_then(|t| t.as_str()).is_some_and(|t| t != "default"))
            .or(self.rope_scaling.as_ref().filter(|v| v.is_object()));
        let rope_scaling = scaling.map(parse_rope_scaling).transpose()?.flatten();
        let longrope = scaling.map(|s| parse_longrope(s, &self)).transpose()?.flatten();
        let partial_rotary_factor = rope
            .and_then(|r| r.get("partial_rotary_factor"))
            .and_then(|v| v.as_f64())
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        let local_rope_theta = match gemma {
            true => Some(local_rope_theta(local_rope, self.rope_local_base_freq)?),
            false => None,
        };
        let sliding_window = match architecture {
            Architecture::Mistral | Architecture::Phi3 => self.sliding_window,
            Architecture::Gemma3 => Some(self.sliding_window.unwrap_or(gemma3_defaults::SLIDING_WINDOW)),
            Architecture::Qwen2 | Architecture::Qwen3 if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        };
        // Qwen2 slides only from layer `max_window_layers` on (transformers' `layer_types`).
        let first_sliding_layer = match architecture {
            Architecture::Qwen2 | Architecture::Qwen3 => self.max_window_layers.unwrap_or(0),
            _ => 0,
        };
        let attention_bias = self.attention_bias.unwrap_or(false);
        let eos_token_ids = match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            _ => Vec::new(),
        };
        let is_classifier = self.architectures.iter().any(|a| a.ends_with("ForSequenceClassification"));
        let num_labels =
            is_classifier.then(|| self.num_labels.or(self.id2label.as_ref().map(|m| m.len())).unwrap_or(2));
        let mut config = ModelConfig {
            architecture,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            longrope,
            partial_rotary_factor,
            fused_projections: architecture == Architecture::Phi3,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            sliding_window,
            first_sliding_layer,
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture == Architecture::Llama && attention_bias,
            mlp_bias: architecture == Architecture::Llama && self.mlp_bias.unwrap_or(false),
            qk_norm: architecture == Architecture::Qwen3,
            tie_word_embeddings: self
                .tie_word_embeddings
                .unwrap_or(matches!(architecture, Architecture::Llama | Architecture::Gemma3)),
            norm_weight_offset: 0.0,
            sandwich_norms: false,
            hidden_act,
            scale_embeddings: false,
            query_pre_attn_scalar: gemma
                .then(|| self.query_pre_attn_scalar.unwrap_or(gemma3_defaults::QUERY_PRE_ATTN_SCALAR)),
            local_rope_theta,
            full_attention_layers: match gemma {
                true => self.full_attention_layers(num_hidden_layers)?,
                false => Vec::new(),
            },
            pad_token_id: self.pad_token_id,
            bos_token_id: self.bos_token_id,
            eos_token_ids,
            num_labels,
        };
        if gemma {
            config.set_gemma3_structure();
        }
        config.validate()?;
        Ok(config)
    }
}

impl RawConfig {
    /// The MLP's activation: `hidden_activation` (Gemma's key) or `hidden_act`; Gemma defaults
    /// to GELU (tanh), everything else to SiLU.
    fn activation(&self, gemma: bool) -> Result<Activation, ConfigError> {
        let (field, name) = match (&self.hidden_activation, &self.hidden_act) {
            (Some(a), _) => ("hidden_activation", a.as_str()),
            (None, Some(a)) => ("hidden_act", a.as_str()),
            (None, None) if gemma => return Ok(Activation::GeluPytorchTanh),
            (None, None) => return Ok(Activation::Silu),
        };
        match name {
            "silu" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluPytorchTanh),
            other => Err(ConfigError::Unsupported { field, value: other.into() }),
        }
    }

    /// Gemma 2's soft-capping and Gemma 3's bidirectional variant are not implemented: refuse
    /// them rather than compute something else.
    fn refuse_unsupported_gemma_keys(&self) -> Result<(), ConfigError> {
        for (field, value) in [
            ("final_logit_softcapping", self.final_logit_softcapping),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
        ] {
            if let Some(v) = value {
                return Err(ConfigError::Unsupported { field, value: format!("{v} (only null is supported)") });
            }
        }
        if self.use_bidirectional_attention == Some(true) {
            return Err(ConfigError::Unsupported { field: "use_bidirectional_attention", value: "true".into() });
        }
        Ok(())
    }

    /// Gemma 3's global layers: the `full_attention` entries of `layer_types`, else every
    /// `sliding_window_pattern`-th layer (default 6), as transformers derives them.
    fn full_attention_layers(&self, layers: usize) -> Result<Vec<usize>, ConfigError> {
        let Some(types) = &self.layer_types else {
            let pattern = self
                .sliding_window_pattern
                .or(self.private_sliding_window_pattern)
                .unwrap_or(gemma3_defaults::SLIDING_WINDOW_PATTERN);
            if pattern == 0 {
                return Err(ConfigError::invalid("sliding_window_pattern", "must be positive (got 0)"));
            }
            return Ok(gemma3_defaults::full_attention_layers(layers, pattern));
        };
        if types.len() != layers {
            return Err(ConfigError::invalid(
                "layer_types",
                format!("must name one type per layer ({layers}; got {})", types.len()),
            ));
        }
        let mut full = Vec::new();
        for (i, t) in types.iter().enumerate() {
            match t.as_str() {
                "full_attention" => full.push(i),
                "sliding_attention" => {}
                other => {
                    return Err(ConfigError::invalid(
                        "layer_types",
                        format!("entry {i} must be `full_attention` or `sliding_attention` (got `{other}`)"),
                    ))
                }
            }
        }
        Ok(full)
    }
}

/// Gemma 3's local RoPE base: `rope_parameters.sliding_attention.rope_theta` (transformers 5),
/// else `rope_local_base_freq` (4.x), else 10 000; scaled local RoPE is refused.
fn local_rope_theta(local: Option<&serde_json::Value>, legacy: Option<f64>) -> Result<f64, ConfigError> {
    let field = "rope_parameters.sliding_attention";
    if let Some(kind) = local.and_then(|l| l.get("rope_type")).and_then(|t| t.as_str()).filter(|t| *t != "default") {
        return Err(ConfigError::Unsupported {
            field: "rope_parameters",
            value: format!("sliding_attention rope_type `{kind}`"),
        });
    }
    let theta = match local.and_then(|l| l.get("rope_theta")) {
        None | Some(serde_json::Value::Null) => legacy.unwrap_or(gemma3_defaults::LOCAL_ROPE_THETA),
        Some(v) => v.as_f64().ok_or_else(|| {
            ConfigError::invalid(&format!("{field}.rope_theta"), format!("must be a number (got {})", json_kind(v)))
        })?,
    };
    check_rope_theta(theta, &format!("{field}.rope_theta"))?;
    Ok(theta)
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Option<Llama3RopeScaling>, ConfigError> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    match kind {
        "default" | "longrope" => Ok(None),
        "llama3" => {
            let num = |k: &'static str| {
                v.get(k).and_then(|x| x.as_f64()).ok_or(ConfigError::Unsupported {
                    field: "rope_scaling",
                    value: format!("llama3 scaling without `{k}`"),
                })
            };
            Ok(Some(Llama3RopeScaling {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(ConfigError::Unsupported { field: "rope_scaling", value: format!("rope_type `{other}`") }),
    }
}

/// Phi-3's LongRoPE from a `longrope` rope dict (`None` for other kinds); the original context
/// may sit at the top level, as Phi-3's configs keep it, and the attention factor is derived
/// from `max / original` as transformers does when the dict has none.
fn parse_longrope(v: &serde_json::Value, raw: &RawConfig) -> Result<Option<LongRope>, ConfigError> {
    if v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()) != Some("longrope") {
        return Ok(None);
    }
    let factors = |k: &'static str| -> Result<Vec<f64>, ConfigError> {
        v.get(k)
            .and_then(|x| x.as_array())
            .and_then(|a| a.iter().map(|x| x.as_f64()).collect::<Option<Vec<f64>>>())
            .ok_or_else(|| ConfigError::invalid("rope_scaling", format!("longrope needs `{k}`, a list of numbers")))
    };
    let original = v
        .get("original_max_position_embeddings")
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .or(raw.original_max_position_embeddings)
        .ok_or_else(|| ConfigError::invalid("original_max_position_embeddings", "is missing (longrope needs it)"))?;
    let max = raw.max_position_embeddings.unwrap_or(original) as f64;
    let factor = v.get("factor").and_then(|x| x.as_f64()).filter(|_| raw.original_max_position_embeddings.is_none());
    let factor = factor.unwrap_or(max / original as f64);
    let attention_factor = match v.get("attention_factor").and_then(|x| x.as_f64()) {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    let l = LongRope {
        short_factor: factors("short_factor")?,
        long_factor: factors("long_factor")?,
        original_max_position_embeddings: original,
        attention_factor,
    };
    Ok(Some(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rope_theta_from_rope_parameters_first() {
        let cfg = ModelConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":10.0,
            "rope_parameters":{"rope_theta":500000.0,"rope_type":"default"}}"#,
        )
        .unwrap();
        assert_eq!(cfg.rope_theta, 500000.0);
        assert_eq!(cfg.head_dim, 4);
        assert_eq!(cfg.num_key_value_heads, 2);
        assert!(cfg.tie_word_embeddings);
        assert!(cfg.rope_scaling.is_none());
    }

    #[test]
    fn reads_llama3_scaling_from_legacy_rope_scaling() {
        let cfg = ModelConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2,"rope_theta":500000.0,
            "rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,
            "high_freq_factor":4.0,"original_max_position_embeddings":8192}}"#,
        )
        .unwrap();
        let s = cfg.rope_scaling.unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 8192));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_window_only_when_enabled() {
        let base = r#""vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,
            "num_attention_heads":2,"sliding_window":4"#;
        let q = ModelConfig::from_hf_json(&format!(r#"{{"model_type":"qwen2",{base}}}"#)).unwrap();
        assert!(q.qkv_bias && !q.o_bias && q.sliding_window.is_none());
        let q = ModelConfig::from_hf_json(&format!(
            r#"{{"model_type":"qwen2","use_sliding_window":true,"max_window_layers":1,{base}}}"#
        ))
        .unwrap();
        assert_eq!((q.sliding_window, q.first_sliding_layer), (Some(4), 1));
        let m = ModelConfig::from_hf_json(&format!(r#"{{"model_type":"mistral",{base}}}"#)).unwrap();
        assert!(!m.qkv_bias && m.sliding_window == Some(4));
    }

    #[test]
    fn rejects_unknown_architecture_by_name() {
        let err = ModelConfig::from_hf_json(
            r#"{"model_type":"gpt2","vocab_size":10,"hidden_size":8,"intermediate_size":16,
            "num_hidden_layers":1,"num_attention_heads":2}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("gpt2"), "{err}");
    }
    /// A valid Llama config with `edit` applied to its JSON object.
    fn with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Result<ModelConfig, ConfigError> {
        let mut v = serde_json::json!({"model_type":"llama","vocab_size":10,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":2,"num_attention_heads":2,"num_key_value_heads":1,
            "rms_norm_eps":1e-5,"rope_theta":10000.0,"max_position_embeddings":64});
        edit(v.as_object_mut().unwrap());
        ModelConfig::from_hf_json(&v.to_string())
    }

    fn set(
        key: &'static str,
        value: serde_json::Value,
    ) -> impl FnOnce(&mut serde_json::Map<String, serde_json::Value>) {
        move |m| {
            m.insert(key.into(), value);
        }
    }

    /// The error names `field` and contains `text`.
    fn rejects(r: Result<ModelConfig, ConfigError>, field: &str, text: &str) {
        let err = r.expect_err("config must be refused");
        let msg = err.to_string();
        assert_eq!(err.field(), Some(field), "{msg}");
        assert!(msg.contains(&format!("`{field}`")) && msg.contains(text), "{msg}");
    }

    #[test]
    fn zero_heads_is_an_error_not_a_division_by_zero() {
        rejects(with(set("num_attention_heads", 0.into())), "num_attention_heads", "must be positive (got 0)");
        // Also with head_dim given (no division on that path).
        rejects(
            with(|m| {
                m.insert("num_attention_heads".into(), 0.into());
                m.insert("head_dim".into(), 4.into());
            }),
            "num_attention_heads",
            "got 0",
        );
    }

    #[test]
    fn heads_must_divide_the_width_unless_head_dim_is_given() {
        rejects(
            with(set("num_attention_heads", 3.into())),
            "num_attention_heads",
            "must divide `hidden_size` = 8 (got 3)",
        );
        // An explicit head_dim may differ from hidden / heads (checked against the weights).
        let cfg = with(|m| {
            m.insert("num_attention_heads".into(), 3.into());
            m.insert("num_key_value_heads".into(), 3.into());
            m.insert("head_dim".into(), 4.into());
        })
        .unwrap();
        assert_eq!((cfg.num_attention_heads, cfg.head_dim), (3, 4));
        rejects(with(set("head_dim", 0.into())), "head_dim", "must be positive (got 0)");
        rejects(with(set("head_dim", 3.into())), "head_dim", "must be even");
    }

    #[test]
    fn kv_heads_must_be_positive_and_divide_the_heads() {
        rejects(with(set("num_key_value_heads", 0.into())), "num_key_value_heads", "must be positive (got 0)");
        rejects(
            with(set("num_key_value_heads", 3.into())),
            "num_key_value_heads",
            "must divide `num_attention_heads` = 2 (got 3)",
        );
    }

    #[test]
    fn every_size_must_be_positive() {
        for field in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings"]
        {
            rejects(with(set(field, 0.into())), field, "must be positive (got 0)");
        }
        rejects(
            with(|m| {
                m.insert("model_type".into(), "mistral".into());
                m.insert("sliding_window".into(), 0.into());
            }),
            "sliding_window",
            "must be positive (got 0)",
        );
        rejects(
            with(|m| {
                m.insert("architectures".into(), serde_json::json!(["LlamaForSequenceClassification"]));
                m.insert("num_labels".into(), 0.into());
            }),
            "num_labels",
            "must be positive (got 0)",
        );
    }

    #[test]
    fn norm_epsilon_and_rope_base_must_be_positive_finite() {
        rejects(with(set("rms_norm_eps", (-1.0).into())), "rms_norm_eps", "got -1");
        rejects(with(set("rms_norm_eps", 0.0.into())), "rms_norm_eps", "positive finite");
        rejects(with(set("rope_theta", 0.0.into())), "rope_theta", "got 0");
        rejects(with(set("rope_theta", (-5.0).into())), "rope_theta", "got -5");
        rejects(with(set("rope_theta", 1e300.into())), "rope_theta", "f32 range");
        // transformers 5 keeps the base in `rope_parameters`: that is the field named.
        rejects(
            with(set("rope_parameters", serde_json::json!({"rope_type": "default", "rope_theta": 0.0}))),
            "rope_parameters.rope_theta",
            "got 0",
        );
        rejects(
            with(set(
                "rope_scaling",
                serde_json::json!({"rope_type":"llama3","factor":0.0,"low_freq_factor":1.0,
                "high_freq_factor":4.0,"original_max_position_embeddings":8}),
            )),
            "rope_scaling",
            "`factor` must be a positive finite number",
        );
    }

    #[test]
    fn wrong_types_and_missing_fields_are_named() {
        rejects(with(set("num_attention_heads", "4".into())), "num_attention_heads", "wrong type");
        rejects(with(set("vocab_size", (-1).into())), "vocab_size", "wrong type or value");
        rejects(with(set("vocab_size", 1e12.into())), "vocab_size", "floating point");
        rejects(with(set("pad_token_id", serde_json::json!(1u64 << 40))), "pad_token_id", "wrong type or value");
        rejects(
            with(|m| {
                m.remove("hidden_size");
            }),
            "hidden_size",
            "is missing",
        );
        let err = ModelConfig::from_hf_json("[1, 2]").unwrap_err();
        assert!(err.to_string().contains("must be a JSON object (got an array)"), "{err}");
        assert!(matches!(ModelConfig::from_hf_json("{\"vocab_size\": "), Err(ConfigError::Json(_))));
        // A byte-order mark is skipped.
        let text = format!(
            "\u{feff}{}",
            serde_json::json!({"vocab_size":10,"hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2})
        );
        assert_eq!(ModelConfig::from_hf_json(&text).unwrap().head_dim, 4);
    }

    /// Gemma 3 270M's `config.json` keys as transformers 5 writes them.
    fn gemma3(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Result<ModelConfig, ConfigError> {
        let mut v = serde_json::json!({"model_type":"gemma3_text","vocab_size":262144,"hidden_size":640,
            "intermediate_size":2048,"num_hidden_layers":18,"num_attention_heads":4,"num_key_value_heads":1,
            "head_dim":256,"hidden_activation":"gelu_pytorch_tanh","rms_norm_eps":1e-6,"sliding_window":512,
            "query_pre_attn_scalar":256,"final_logit_softcapping":null,"attn_logit_softcapping":null,
            "rope_parameters":{"sliding_attention":{"rope_type":"default","rope_theta":10000.0},
                               "full_attention":{"rope_type":"default","rope_theta":1000000.0}},
            "layer_types":["sliding_attention","sliding_attention","sliding_attention","sliding_attention",
                "sliding_attention","full_attention","sliding_attention","sliding_attention","sliding_attention",
                "sliding_attention","sliding_attention","full_attention","sliding_attention","sliding_attention",
                "sliding_attention","sliding_attention","sliding_attention","full_attention"]});
        edit(v.as_object_mut().unwrap());
        ModelConfig::from_hf_json(&v.to_string())
    }

    #[test]
    fn gemma3_reads_layer_types_and_both_rope_bases() {
        let c = gemma3(|_| {}).unwrap();
        assert_eq!((c.architecture, c.hidden_act), (Architecture::Gemma3, Activation::GeluPytorchTanh));
        assert_eq!((c.rope_theta, c.local_rope_theta, c.query_pre_attn_scalar), (1e6, Some(1e4), Some(256.0)));
        assert_eq!(c.full_attention_layers, [5, 11, 17]);
        assert!(c.is_sliding(4) && !c.is_sliding(5) && c.is_sliding(6));
        assert!(c.tie_word_embeddings && c.qk_norm && c.sandwich_norms && c.scale_embeddings);
        assert_eq!(c.norm_weight_offset, 1.0);
        let names: Vec<String> = c.expected_layer_tensors(0).into_iter().map(|t| t.name).collect();
        for norm in
            ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        {
            assert!(names.contains(&format!("model.layers.0.{norm}.weight")), "{norm}");
        }
        // transformers 4.x: one rope_theta, the local base apart, the pattern instead of the list.
        let old = gemma3(|m| {
            m.remove("rope_parameters");
            m.remove("layer_types");
            m.insert("rope_theta".into(), 1e6.into());
            m.insert("rope_local_base_freq".into(), 1e4.into());
            m.insert("sliding_window_pattern".into(), 6.into());
        })
        .unwrap();
        assert_eq!(
            (old.rope_theta, old.local_rope_theta, old.full_attention_layers.clone()),
            (1e6, Some(1e4), c.full_attention_layers.clone())
        );
        // Export writes what it read.
        let back = ModelConfig::from_hf_json(&c.to_hf_json().to_string()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn gemma3_refuses_what_it_does_not_compute() {
        rejects(gemma3(set("final_logit_softcapping", 30.0.into())), "final_logit_softcapping", "only null");
        rejects(gemma3(set("attn_logit_softcapping", 50.0.into())), "attn_logit_softcapping", "only null");
        rejects(gemma3(set("hidden_activation", "relu".into())), "hidden_activation", "relu");
        rejects(
            gemma3(set("layer_types", serde_json::json!(["full_attention"]))),
            "layer_types",
            "one type per layer (18; got 1)",
        );
        rejects(
            gemma3(set(
                "rope_parameters",
                serde_json::json!({"sliding_attention": {"rope_type": "default", "rope_theta": -1.0}}),
            )),
            "rope_parameters.sliding_attention.rope_theta",
            "got -1",
        );
        let err = gemma3(set("model_type", "gemma3".into())).unwrap_err();
        assert!(err.to_string().contains("gemma3_text"), "{err}");
    }

    #[test]
    fn expected_tensors_follow_the_config() {
        let mut cfg = with(set("head_dim", 6.into())).unwrap();
        cfg.qkv_bias = true;
        let layer = cfg.expected_layer_tensors(1);
        let shape = |n: &str| layer.iter().find(|t| t.name == format!("model.layers.1.{n}")).unwrap().shape();
        assert_eq!(shape("self_attn.q_proj.weight"), [12, 8]);
        assert_eq!(shape("self_attn.q_proj.bias"), [12]);
        assert_eq!(shape("self_attn.k_proj.weight"), [6, 8]);
        assert_eq!(shape("self_attn.o_proj.weight"), [8, 12]);
        assert!(layer.iter().all(|t| t.name != "model.layers.1.self_attn.o_proj.bias"));
        assert_eq!(shape("mlp.up_proj.weight"), [16, 8]);
        assert_eq!(shape("mlp.down_proj.weight"), [8, 16]);
        assert_eq!(shape("input_layernorm.weight"), [8]);
        assert_eq!(layer.len(), 12);
        let outer: Vec<String> = cfg.expected_outer_tensors(true).into_iter().map(|t| t.name).collect();
        assert_eq!(outer, ["model.embed_tokens.weight", "model.norm.weight"], "tied: no lm_head");
        assert_eq!(ModelConfig::layer_of("model.layers.12.mlp.up_proj.weight"), Some(12));
        assert_eq!(ModelConfig::layer_of("model.norm.weight"), None);
    }
}

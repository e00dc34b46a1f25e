//! Model configuration: transformers' `config.json` keys in, one resolved [`ModelConfig`] out.
//!
//! Llama (SmolLM2 included), Mistral and Qwen2 differ only in switches of this struct: q/k/v
//! biases (Qwen2), a sliding attention window (Mistral), llama3 RoPE scaling, tied embeddings.

use serde::{Deserialize, Serialize};

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
    /// The output projection shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Padding token, used to pool the sequence-classification head.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (a model may have several).
    pub eos_token_ids: Vec<u32>,
    /// Labels of a `*ForSequenceClassification` head (`None` for a causal LM).
    pub num_labels: Option<usize>,
}

/// `config.json` as transformers writes it; only the keys candor reads.
#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_parameters: Option<serde_json::Value>,
    rope_scaling: Option<serde_json::Value>,
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
}

/// Errors while interpreting a `config.json`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON did not have the expected fields or types.
    #[error("invalid config: {0}")]
    Json(#[from] serde_json::Error),
    /// A field has a value candor does not support.
    #[error("unsupported `{field}` in config: {value}")]
    Unsupported {
        /// The `config.json` key.
        field: &'static str,
        /// What was found there.
        value: String,
    },
}

impl ModelConfig {
    /// Parse the text of a transformers `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = serde_json::from_str(text)?;
        raw.resolve()
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
        };
        let head = if self.num_labels.is_some() { "ForSequenceClassification" } else { "ForCausalLM" };
        let mut rope = serde_json::json!({"rope_theta": self.rope_theta, "rope_type": "default"});
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
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope.clone(),
            "rope_scaling": if self.rope_scaling.is_some() { rope } else { serde_json::Value::Null },
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
            Architecture::Mistral => {
                obj.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
            }
            Architecture::Qwen2 => {
                obj.insert("use_sliding_window".into(), self.sliding_window.is_some().into());
                obj.insert("max_window_layers".into(), self.first_sliding_layer.into());
                obj.insert("sliding_window".into(), serde_json::json!(self.sliding_window));
            }
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

impl RawConfig {
    fn resolve(self) -> Result<ModelConfig, ConfigError> {
        let architecture = match self.model_type.as_deref() {
            Some("llama") | None => Architecture::Llama,
            Some("mistral") => Architecture::Mistral,
            Some("qwen2") => Architecture::Qwen2,
            Some(other) => return Err(ConfigError::Unsupported { field: "model_type", value: other.into() }),
        };
        if let Some(act) = self.hidden_act.as_deref() {
            if act != "silu" {
                return Err(ConfigError::Unsupported { field: "hidden_act", value: act.into() });
            }
        }
        // transformers 5 moved rope settings into `rope_parameters`; 4.x used `rope_theta` plus
        // an optional `rope_scaling` dict. Accept both, the newer one first.
        let rope = self.rope_parameters.as_ref().filter(|v| v.is_object());
        let rope_theta =
            rope.and_then(|r| r.get("rope_theta")).and_then(|v| v.as_f64()).or(self.rope_theta).unwrap_or(10_000.0);
        let scaling = rope
            .filter(|r| r.get("rope_type").and_then(|t| t.as_str()).is_some_and(|t| t != "default"))
            .or(self.rope_scaling.as_ref().filter(|v| v.is_object()));
        let rope_scaling = scaling.map(parse_rope_scaling).transpose()?.flatten();
        let sliding_window = match architecture {
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        };
        // Qwen2 slides only from layer `max_window_layers` on (transformers' `layer_types`).
        let first_sliding_layer = match architecture {
            Architecture::Qwen2 => self.max_window_layers.unwrap_or(0),
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
        Ok(ModelConfig {
            architecture,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings.unwrap_or(2048),
            sliding_window,
            first_sliding_layer,
            qkv_bias: architecture == Architecture::Qwen2 || attention_bias,
            o_bias: architecture == Architecture::Llama && attention_bias,
            mlp_bias: architecture == Architecture::Llama && self.mlp_bias.unwrap_or(false),
            tie_word_embeddings: self.tie_word_embeddings.unwrap_or(architecture == Architecture::Llama),
            pad_token_id: self.pad_token_id,
            bos_token_id: self.bos_token_id,
            eos_token_ids,
            num_labels,
        })
    }
}

fn parse_rope_scaling(v: &serde_json::Value) -> Result<Option<Llama3RopeScaling>, ConfigError> {
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
    match kind {
        "default" => Ok(None),
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
}

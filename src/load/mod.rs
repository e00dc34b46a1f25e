//! Getting a model in: a local transformers directory, a Hub id, a GGUF file, or the default
//! model; each yields the same [`LoadedModel`].

pub mod chat_template;
pub mod default_model;
pub mod gguf;
pub mod hf_dir;
pub mod hub;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle::{DType, Device};

pub use chat_template::{ChatTemplate, Message};
pub use tokenizer::TextTokenizer;

use crate::model::{CausalLm, ModelConfig};

/// Where `--model` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// `default`: the first preset of [`default_model::PRESETS`], fetched on first use.
    Default,
    /// A local transformers directory.
    Dir(PathBuf),
    /// A local `.gguf` file.
    Gguf(PathBuf),
    /// A Hub id with optional `@revision`.
    Hub(String),
}

impl ModelSource {
    /// Interpret a `--model` value.
    pub fn parse(spec: &str) -> Result<Self> {
        if spec == "default" {
            return Ok(Self::Default);
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Dir(path.to_path_buf()));
        }
        if path.is_file() {
            if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
                return Ok(Self::Gguf(path.to_path_buf()));
            }
            bail!("`{spec}` is a file but not a `.gguf`; pass a model directory, a `.gguf` file or a hub id");
        }
        let (id, _) = hub::parse_hub_id(spec);
        let looks_like_hub_id = id.split('/').count() == 2
            && id
                .split('/')
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)))
            && !spec.ends_with(".gguf")
            && !spec.starts_with('.');
        if looks_like_hub_id {
            return Ok(Self::Hub(spec.to_string()));
        }
        bail!("model `{spec}` not found: no such directory or `.gguf` file, and not a hub id like `org/name`")
    }
}

/// A model ready to use: weights, tokenizer, chat template and stop tokens. Cloning shares
/// the weights' storage.
#[derive(Clone)]
pub struct LoadedModel {
    /// The network.
    pub model: CausalLm,
    /// Its tokenizer.
    pub tokenizer: TextTokenizer,
    /// Its chat template, when it has one.
    pub chat_template: Option<ChatTemplate>,
    /// Token ids that end generation (config, generation config and tokenizer EOS).
    pub eos_token_ids: Vec<u32>,
    /// Human-readable origin (path or hub id).
    pub origin: String,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel").field("origin", &self.origin).finish_non_exhaustive()
    }
}

/// Load `--model` onto `device` in `dtype`.
pub fn load_model(spec: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    match ModelSource::parse(spec)? {
        ModelSource::Default => {
            let preset = &default_model::PRESETS[0];
            let path = default_model::fetch(preset)?;
            load_gguf_model(&path, dtype, device)
        }
        ModelSource::Dir(dir) if dir.join("adapter_config.json").exists() && !dir.join("config.json").exists() => {
            load_with_adapter(&dir, dtype, device)
        }
        ModelSource::Dir(dir) => load_hf_dir(&dir, dtype, device),
        ModelSource::Gguf(path) => load_gguf_model(&path, dtype, device),
        ModelSource::Hub(id) => {
            let dir = hub::snapshot_dir(&id)?;
            let mut loaded = load_hf_dir(&dir, dtype, device)?;
            loaded.origin = id;
            Ok(loaded)
        }
    }
}

/// Load a PEFT LoRA adapter directory: its base model (`base_model_name_or_path`) with the
/// adapter attached.
pub fn load_with_adapter(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let saved = crate::model::lora::load_adapter(dir)?;
    let mut base = load_model(&saved.base_model, dtype, device)
        .with_context(|| format!("cannot load the base model `{}` of adapter `{}`", saved.base_model, dir.display()))?;
    base.model.attach_lora(&saved).with_context(|| format!("adapter `{}`", dir.display()))?;
    base.origin = dir.display().to_string();
    Ok(base)
}

/// Load a GGUF file.
pub fn load_gguf_model(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let mut g = gguf::load_gguf(path)?;
    let model = CausalLm::new(g.config.clone(), &mut g.weights, dtype, device)
        .with_context(|| format!("failed to build the model from `{}`", path.display()))?;
    let chat_template = g.chat_template.as_deref().map(|src| compile_template(src, &g.tokenizer)).transpose()?;
    let eos_token_ids = merge_eos(&g.config, None, &g.tokenizer);
    Ok(LoadedModel { model, tokenizer: g.tokenizer, chat_template, eos_token_ids, origin: path.display().to_string() })
}

/// Load a transformers model directory.
pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("`{}` is not a model directory: cannot read `config.json`", dir.display()))?;
    let config = ModelConfig::from_hf_json(&text).with_context(|| format!("in `{}`", config_path.display()))?;
    let mut weights = hf_dir::SafetensorsWeights::open_dir(dir)?;
    let model = CausalLm::new(config.clone(), &mut weights, dtype, device)
        .with_context(|| format!("failed to build the model from `{}`", dir.display()))?;
    let tok_config = dir.join("tokenizer_config.json");
    let tok_config = tok_config.exists().then_some(tok_config);
    let tokenizer = TextTokenizer::from_hf_files(&dir.join("tokenizer.json"), tok_config.as_deref())?;
    let chat_template =
        read_chat_template(dir, tok_config.as_deref())?.map(|src| compile_template(&src, &tokenizer)).transpose()?;
    let gen_eos = read_generation_eos(dir)?;
    let eos_token_ids = merge_eos(&config, gen_eos, &tokenizer);
    Ok(LoadedModel { model, tokenizer, chat_template, eos_token_ids, origin: dir.display().to_string() })
}

/// Compile a chat template with the tokenizer's BOS and EOS texts.
fn compile_template(src: &str, tok: &TextTokenizer) -> Result<ChatTemplate> {
    ChatTemplate::new(src, tok.bos.as_ref().map(|b| b.0.as_str()), tok.eos.as_ref().map(|e| e.0.as_str()))
}

/// `chat_template.jinja`, else `chat_template` in `tokenizer_config.json` (a string, or a list
/// of named templates of which `default` is used).
fn read_chat_template(dir: &Path, tok_config: Option<&Path>) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return Ok(Some(
            std::fs::read_to_string(&jinja).with_context(|| format!("cannot read `{}`", jinja.display()))?,
        ));
    }
    let Some(p) = tok_config else { return Ok(None) };
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p)?)
        .with_context(|| format!("invalid JSON in `{}`", p.display()))?;
    Ok(match json.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    })
}

/// `eos_token_id` of `generation_config.json` (an id or a list), if the file exists.
fn read_generation_eos(dir: &Path) -> Result<Option<Vec<u32>>> {
    let p = dir.join("generation_config.json");
    if !p.exists() {
        return Ok(None);
    }
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p)?)
        .with_context(|| format!("invalid JSON in `{}`", p.display()))?;
    Ok(match json.get("eos_token_id") {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]),
        Some(serde_json::Value::Array(a)) => Some(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect()),
        _ => None,
    })
}

fn merge_eos(config: &ModelConfig, generation: Option<Vec<u32>>, tok: &TextTokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = generation.unwrap_or_default();
    ids.extend(&config.eos_token_ids);
    ids.extend(tok.eos.as_ref().map(|e| e.1));
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(*id));
    ids
}

/// Parse `--device`: `cpu`, `cuda[:N]`, `metal`, or `auto` (CUDA, then Metal, then CPU).
pub fn parse_device(spec: &str) -> Result<Device> {
    Ok(match spec {
        "cpu" => Device::Cpu,
        "auto" => {
            if candle::utils::cuda_is_available() {
                Device::new_cuda(0)?
            } else if candle::utils::metal_is_available() {
                Device::new_metal(0)?
            } else {
                Device::Cpu
            }
        }
        "metal" => Device::new_metal(0).context("Metal device unavailable (build with `--features metal`)")?,
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").map(str::parse).transpose().context("bad CUDA ordinal")?.unwrap_or(0);
            Device::new_cuda(ordinal).context("CUDA device unavailable (build with `--features cuda`)")?
        }
        other => bail!("unknown device `{other}` (expected cpu, cuda, cuda:N, metal or auto)"),
    })
}

/// Parse `--dtype`: `f32`, `bf16` or `f16`.
pub fn parse_dtype(spec: &str) -> Result<DType> {
    Ok(match spec {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

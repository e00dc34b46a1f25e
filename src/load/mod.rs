//! Getting a model in: a local transformers directory, a Hub id, a GGUF file, or the default
//! model; each yields the same [`LoadedModel`].

pub mod chat_template;
pub mod default_model;
pub mod gemma_tokenizer;
pub mod gguf;
pub mod hf_dir;
pub mod hub;
pub mod shapes;
pub mod tokenizer;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle::{DType, Device};

pub use chat_template::{ChatTemplate, Message};
pub use tokenizer::TextTokenizer;

use crate::model::{CausalLm, ModelConfig, Packing};

/// Where `--model` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A preset by name (`default` is the first of [`default_model::PRESETS`]), fetched on
    /// first use.
    Preset(&'static default_model::Preset),
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
        if let Some(preset) = default_model::find_preset(spec) {
            return Ok(Self::Preset(preset));
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

/// Where and how models are loaded: the device, the weights' floating-point type and the
/// kernels of the forward and backward pass. Built once from the global flags (or a recipe's
/// `[model]`) and handed to everything that loads a model, judges included.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The device the weights go to.
    pub device: Device,
    /// The weights' floating-point type.
    pub dtype: DType,
    /// Fused or plain kernels.
    pub kernels: crate::model::Kernels,
    /// How the projections are kept: dense (trainable), or packed as stored or quantized at
    /// load (frozen models; the base of a LoRA run).
    pub packing: Packing,
}

impl LoadOptions {
    /// Options from the names `--device` and `--dtype` accept.
    pub fn parse(device: &str, dtype: &str, kernels: crate::model::Kernels) -> Result<Self> {
        Ok(Self { device: parse_device(device)?, dtype: parse_dtype(dtype)?, kernels, packing: Packing::Dense })
    }

    /// The same options with projections kept as `packing` says.
    pub fn with_packing(&self, packing: Packing) -> Self {
        Self { packing, ..self.clone() }
    }

    /// Load `spec` (see [`load_model`]) with these options; the error names the model.
    pub fn load(&self, spec: &str) -> Result<LoadedModel> {
        let mut loaded = load_model_packed(spec, self.dtype, &self.device, self.packing)
            .with_context(|| format!("failed to load model `{spec}`"))?;
        loaded.model.set_kernels(self.kernels);
        Ok(loaded)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, dtype: DType::F32, kernels: Default::default(), packing: Packing::Dense }
    }
}

/// A device name as `--device` and `model.device` accept it (`cpu`, `cuda`, `cuda:N`, `metal`,
/// `auto`), returned unchanged; otherwise an error listing the accepted names. Whether the
/// device is there is found out when it is opened.
pub fn check_device(spec: &str) -> Result<String, String> {
    let ordinal = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<usize>().is_ok();
    if matches!(spec, "cpu" | "cuda" | "metal" | "auto") || spec.strip_prefix("cuda:").is_some_and(ordinal) {
        Ok(spec.to_string())
    } else {
        Err(format!("unknown device `{spec}`: expected cpu, cuda, cuda:N (N = 0, 1, ...), metal or auto"))
    }
}

/// A floating-point type as `--dtype` and `model.dtype` accept it (`f32`, `bf16`, `f16`, or
/// `float32`, `bfloat16`, `float16`), returned unchanged; otherwise an error listing them.
pub fn check_dtype(spec: &str) -> Result<String, String> {
    if matches!(spec, "f32" | "float32" | "bf16" | "bfloat16" | "f16" | "float16") {
        Ok(spec.to_string())
    } else {
        Err(format!("unknown dtype `{spec}`: expected f32, bf16 or f16 (or float32, bfloat16, float16)"))
    }
}

/// Load `--model` onto `device` in `dtype`, every weight dense.
pub fn load_model(spec: &str, dtype: DType, device: &Device) -> Result<LoadedModel> {
    load_model_packed(spec, dtype, device, Packing::Dense)
}

/// [`load_model`] with the projections kept as `packing` says.
pub fn load_model_packed(spec: &str, dtype: DType, device: &Device, packing: Packing) -> Result<LoadedModel> {
    match ModelSource::parse(spec)? {
        ModelSource::Preset(preset) => gguf_model(&default_model::fetch(preset)?, dtype, device, packing),
        ModelSource::Dir(dir) if dir.join("adapter_config.json").exists() && !dir.join("config.json").exists() => {
            adapter_model(&dir, dtype, device, packing)
        }
        ModelSource::Dir(dir) => hf_dir_model(&dir, dtype, device, packing),
        ModelSource::Gguf(path) => gguf_model(&path, dtype, device, packing),
        ModelSource::Hub(id) => {
            let dir = hub::snapshot_dir(&id)?;
            let mut loaded = hf_dir_model(&dir, dtype, device, packing)?;
            loaded.origin = id;
            Ok(loaded)
        }
    }
}

/// Load a PEFT LoRA adapter directory: its base model (`base_model_name_or_path`) with the
/// adapter attached.
pub fn load_with_adapter(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    adapter_model(dir, dtype, device, Packing::Dense)
}

/// [`load_with_adapter`] with the base's projections kept as `packing` says.
/// An adapter trained over a base quantized at load ([`ADAPTER_BASE_QUANT`]) gets that same base
/// back: packed when `packing` packs, else dequantized from those blocks, so that it adapts the
/// weights it was trained on.
fn adapter_model(dir: &Path, dtype: DType, device: &Device, packing: Packing) -> Result<LoadedModel> {
    let saved = crate::model::lora::load_adapter(dir)?;
    let trained_on = read_adapter_base_quant(dir)?;
    let base_packing = match (trained_on, packing) {
        (Some(kind), _) => Packing::Quantize(kind),
        (None, packing) => packing,
    };
    let mut base = load_model_packed(&saved.base_model, dtype, device, base_packing)
        .with_context(|| format!("cannot load the base model `{}` of adapter `{}`", saved.base_model, dir.display()))?;
    if trained_on.is_some() && packing == Packing::Dense {
        base.model.unpack()?;
    }
    saved.check_against(&base.model, dir)?;
    base.model.attach_lora(&saved).with_context(|| format!("adapter `{}`", dir.display()))?;
    let template = dir.join(ADAPTER_CHAT_TEMPLATE);
    if template.exists() {
        set_chat_template(&mut base, &template)?;
    }
    base.origin = dir.display().to_string();
    Ok(base)
}

/// The file beside a LoRA adapter that holds the chat template it was trained with, when the
/// run chose one (`model.chat_template`): loading the adapter brings it back.
pub const ADAPTER_CHAT_TEMPLATE: &str = "chat_template.jinja";

/// The file beside a LoRA adapter that names the quantization its base was trained in
/// (`model.base_quant`, `--base-quant`): `{"base_quant": "q8_0"}`.
pub const ADAPTER_BASE_QUANT: &str = "candor_base.json";

/// Record beside an adapter saved in `dir` that its base was quantized to `kind` (nothing when
/// the base was kept as stored).
pub fn save_adapter_base_quant(dir: &Path, kind: Option<candle::quantized::GgmlDType>) -> Result<()> {
    let Some(kind) = kind.filter(|k| *k != candle::quantized::GgmlDType::F32) else {
        return Ok(());
    };
    let path = dir.join(ADAPTER_BASE_QUANT);
    let text = serde_json::json!({ "base_quant": crate::model::packed::kind_name(kind) }).to_string();
    std::fs::write(&path, text).with_context(|| format!("cannot write `{}`", path.display()))
}

/// The base quantization an adapter directory records, if any; errors name the file and field.
fn read_adapter_base_quant(dir: &Path) -> Result<Option<candle::quantized::GgmlDType>> {
    let path = dir.join(ADAPTER_BASE_QUANT);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let name = value["base_quant"]
        .as_str()
        .ok_or_else(|| anyhow!("{}: field `base_quant` must be a string such as \"q8_0\"", path.display()))?;
    let kind = crate::model::packed::parse_base_quant(name)
        .map_err(|e| anyhow!("{}: field `base_quant`: {e}", path.display()))?;
    Ok(Some(kind))
}

/// Keep `template` beside an adapter saved in `dir` (see [`ADAPTER_CHAT_TEMPLATE`]).
pub fn save_adapter_chat_template(dir: &Path, template: Option<&ChatTemplate>) -> Result<()> {
    if let Some(t) = template {
        let path = dir.join(ADAPTER_CHAT_TEMPLATE);
        std::fs::write(&path, t.source()).with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    Ok(())
}

/// Give `loaded` the chat template in the Jinja file at `path`, in place of its own
/// (`--chat-template`, a recipe's `model.chat_template`).
pub fn set_chat_template(loaded: &mut LoadedModel, path: &Path) -> Result<()> {
    let src =
        std::fs::read_to_string(path).with_context(|| format!("cannot read chat template `{}`", path.display()))?;
    let template =
        compile_template(&src, &loaded.tokenizer).with_context(|| format!("chat template `{}`", path.display()))?;
    loaded.chat_template = Some(template);
    Ok(())
}

/// Load a GGUF file, every weight dequantized.
pub fn load_gguf_model(path: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    gguf_model(path, dtype, device, Packing::Dense)
}

/// [`load_gguf_model`] with the projections kept as `packing` says.
fn gguf_model(path: &Path, dtype: DType, device: &Device, packing: Packing) -> Result<LoadedModel> {
    let mut g = gguf::load_gguf(path)?;
    let model = CausalLm::new_packed(g.config.clone(), &mut g.weights, dtype, device, packing)
        .with_context(|| format!("failed to build the model from `{}`", path.display()))?;
    let chat_template = g
        .chat_template
        .as_deref()
        .map(|src| compile_template(src, &g.tokenizer))
        .transpose()
        .with_context(|| format!("{}: metadata `tokenizer.chat_template`", path.display()))?;
    let eos_token_ids = merge_eos(&g.config, None, &g.tokenizer);
    Ok(LoadedModel { model, tokenizer: g.tokenizer, chat_template, eos_token_ids, origin: path.display().to_string() })
}

/// Load a transformers model directory, every weight dense.
pub fn load_hf_dir(dir: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    hf_dir_model(dir, dtype, device, Packing::Dense)
}

/// [`load_hf_dir`] with the projections kept as `packing` says.
fn hf_dir_model(dir: &Path, dtype: DType, device: &Device, packing: Packing) -> Result<LoadedModel> {
    let (config, mut weights) = open_hf_weights(dir)?;
    let model = CausalLm::new_packed(config.clone(), &mut weights, dtype, device, packing)
        .with_context(|| format!("failed to build the model from `{}`", dir.display()))?;
    let tok_config = dir.join("tokenizer_config.json");
    let tok_config = tok_config.exists().then_some(tok_config);
    let tokenizer = TextTokenizer::from_hf_files(&dir.join("tokenizer.json"), tok_config.as_deref())?;
    let jinja = dir.join("chat_template.jinja");
    let template_file = if jinja.exists() { jinja } else { dir.join("tokenizer_config.json") };
    let chat_template = read_chat_template(dir, tok_config.as_deref())?
        .map(|src| compile_template(&src, &tokenizer))
        .transpose()
        .with_context(|| format!("{}: chat template", template_file.display()))?;
    let gen_eos = read_generation_eos(dir)?;
    let eos_token_ids = merge_eos(&config, gen_eos, &tokenizer);
    Ok(LoadedModel { model, tokenizer, chat_template, eos_token_ids, origin: dir.display().to_string() })
}

/// Read and validate `config.json` of a transformers directory, map its safetensors files and
/// check every tensor the model will read against the configuration, all before any tensor
/// data is read or anything sized by the configuration is allocated. Errors name the file and
/// the field (or tensor).
pub fn open_hf_weights(dir: &Path) -> Result<(ModelConfig, hf_dir::SafetensorsWeights)> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        bail!("`{}` is not a model directory: it has no `config.json`", dir.display());
    }
    let bytes = std::fs::read(&config_path).with_context(|| format!("cannot read `{}`", config_path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 text: {e}", config_path.display()))?;
    let config = ModelConfig::from_hf_json(&text).map_err(|e| anyhow!("{}: {e}", config_path.display()))?;
    let weights = hf_dir::SafetensorsWeights::open_dir(dir)?;
    let headers = weights.headers();
    let has_lm_head = !config.tie_word_embeddings && headers.contains_key("lm_head.weight");
    let files = hf_dir::weight_files(dir)?;
    let holder = match files.as_slice() {
        [one] => one.display().to_string(),
        _ => dir.join("model.safetensors.index.json").display().to_string(),
    };
    let names = WeightCheck {
        config_name: "config.json",
        holder: &holder,
        field: &|f| format!("`{f}`"),
        tensor: &|t| t.to_string(),
    };
    check_weights(&config, &headers, has_lm_head, &names)?;
    Ok((config, weights))
}

/// A tensor as a weight file's header describes it (nothing loaded).
#[derive(Debug, Clone)]
pub struct TensorHeader {
    /// Its shape in transformers' `[out, in]` order.
    pub shape: Vec<usize>,
    /// Its stored dtype, as a name.
    pub dtype: String,
    /// Whether candor can load the dtype as weights (floating point or GGUF quantized).
    pub float: bool,
    /// The file that holds it.
    pub file: PathBuf,
    /// Its name in that file (a GGUF file names tensors differently from transformers).
    pub display_name: String,
}

/// How [`check_weights`] names things in its errors.
pub struct WeightCheck<'a> {
    /// What states the configuration: `config.json`, or the GGUF metadata.
    pub config_name: &'a str,
    /// The file (or index) named when a tensor is missing.
    pub holder: &'a str,
    /// How a configuration field (transformers' name) is written in an error.
    pub field: &'a dyn Fn(&str) -> String,
    /// The file's name of a tensor, from its transformers name.
    pub tensor: &'a dyn Fn(&str) -> String,
}

/// Check the tensors of a weight file (`headers`, by transformers name) against a validated
/// configuration: the decoder layers present are exactly `0..num_hidden_layers`, and every
/// tensor the model reads exists, has a loadable dtype, and has the shape the configuration
/// implies. Runs on headers only, so a wrong size is refused before anything sized by it is
/// allocated.
pub fn check_weights(
    config: &ModelConfig,
    headers: &std::collections::HashMap<String, TensorHeader>,
    has_lm_head: bool,
    names: &WeightCheck,
) -> Result<()> {
    let WeightCheck { config_name, holder, field, tensor } = names;
    let n = config.num_hidden_layers;
    let mut present = std::collections::BTreeSet::new();
    for (name, h) in headers {
        if let Some(i) = ModelConfig::layer_of(name) {
            if i >= n {
                bail!(
                    "{}: tensor `{}` belongs to layer {i} but {config_name} says {} = {n} (layers 0 to {})",
                    h.file.display(),
                    h.display_name,
                    field("num_hidden_layers"),
                    n.saturating_sub(1)
                );
            }
            present.insert(i);
        }
    }
    if present.len() < n {
        // `present` holds fewer than `n` indices below `n`: one of the first `present.len() + 1`
        // is missing, so this search is bounded by the file, not by the configuration.
        let missing = (0..=present.len()).find(|i| !present.contains(i)).unwrap_or(present.len());
        bail!(
            "{holder}: holds {} decoder layers but {config_name} says {} = {n} (no tensor of layer {missing})",
            present.len(),
            field("num_hidden_layers"),
        );
    }
    let describe = |t: &crate::model::config::ExpectedTensor| {
        let parts: Vec<String> = t
            .dims
            .iter()
            .map(|d| format!("{} ({})", d.size, d.from.split(" × ").map(field).collect::<Vec<_>>().join(" × ")))
            .collect();
        format!("[{}]", parts.join(", "))
    };
    let outer = config.expected_outer_tensors(has_lm_head);
    for t in (0..n).flat_map(|i| config.expected_layer_tensors(i)).chain(outer) {
        let Some(h) = headers.get(&t.name) else {
            bail!(
                "{holder}: has no tensor `{}`, which {config_name} requires (shape {})",
                tensor(&t.name),
                describe(&t)
            );
        };
        if h.shape != t.shape() {
            bail!(
                "{}: tensor `{}` has shape {:?} but {config_name} says {}",
                h.file.display(),
                h.display_name,
                h.shape,
                describe(&t)
            );
        }
        if !h.float {
            bail!(
                "{}: tensor `{}` has dtype {}; weights must be F32, F16, BF16 or F64",
                h.file.display(),
                h.display_name,
                h.dtype
            );
        }
    }
    Ok(())
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

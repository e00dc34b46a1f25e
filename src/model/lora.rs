//! LoRA adapters (Hu et al., arXiv 2106.09685) with PEFT's conventions: `y = W x + (α/r)·B A x`,
//! A initialised Kaiming-uniform (bound 1/√in, PEFT's `kaiming_uniform_(a=√5)`), B zeros, dropout
//! on the adapter's input only; saved as `adapter_config.json` + `adapter_model.safetensors`
//! with PEFT's tensor names (`base_model.model.<module>.lora_A.weight`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// LoRA hyper-parameters (the `adapter_config.json` fields candor reads and writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank r.
    #[serde(default = "default_r")]
    pub r: usize,
    /// Scale numerator α (the update is scaled by α / r).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter input during training.
    #[serde(default)]
    pub dropout: f64,
    /// Module names that get adapters (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`,
    /// `up_proj`, `down_proj`).
    #[serde(default = "default_targets")]
    pub targets: Vec<String>,
}

fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

impl Default for LoraConfig {
    fn default() -> Self {
        toml::from_str("").expect("every LoRA field has a default")
    }
}

impl LoraConfig {
    /// Reject impossible settings.
    pub fn validate(&self) -> Result<()> {
        const KNOWN: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        if self.r == 0 {
            bail!("`lora.r` must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("`lora.dropout` must be in [0, 1)");
        }
        if let Some(t) = self.targets.iter().find(|t| !KNOWN.contains(&t.as_str())) {
            bail!("unknown LoRA target `{t}` (known: {})", KNOWN.join(", "));
        }
        Ok(())
    }

    /// α / r.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }
}

/// One adapter: `A [r, in]`, `B [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// Down-projection.
    pub a: Tensor,
    /// Up-projection.
    pub b: Tensor,
    /// α / r.
    pub scale: f64,
    /// Dropout probability on the input (training only).
    pub dropout: f64,
    /// Seed of this adapter's dropout masks for the current step (`None` = no dropout).
    pub dropout_seed: Option<u64>,
}

impl LoraAdapter {
    /// A fresh adapter for a `[out, in]` weight: A Kaiming-uniform from `rng`, B zeros.
    pub fn init(
        out: usize,
        inp: usize,
        cfg: &LoraConfig,
        rng: &mut impl Rng,
        dtype: DType,
        device: &candle::Device,
    ) -> Result<Self> {
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * inp).map(|_| rng.random_range(-bound..bound) as f32).collect();
        Ok(Self {
            a: Tensor::from_vec(a, (cfg.r, inp), device)?.to_dtype(dtype)?,
            b: Tensor::zeros((out, cfg.r), dtype, device)?,
            scale: cfg.scale(),
            dropout: cfg.dropout,
            dropout_seed: None,
        })
    }

    /// The adapter's contribution `scale · B A dropout(x)` for `x [..., in]`.
    pub fn delta(&self, x: &Tensor) -> candle::Result<Tensor> {
        let x = match self.dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let keep = 1.0 - self.dropout;
                let mask: Vec<f32> = (0..x.elem_count())
                    .map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 })
                    .collect();
                (x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?
            }
            _ => x.clone(),
        };
        let down = super::ops::linear(&x, &self.a, None)?;
        super::ops::linear(&down, &self.b, None)? * self.scale
    }

    /// Turn A and B into trainable variables, named as PEFT names them for `module`.
    pub fn make_trainable(&mut self, module: &str) -> candle::Result<[(String, Var); 2]> {
        let a = Var::from_tensor(&self.a)?;
        let b = Var::from_tensor(&self.b)?;
        self.a = a.as_tensor().clone();
        self.b = b.as_tensor().clone();
        Ok([
            (format!("{}.lora_A.weight", peft_prefix(module)), a),
            (format!("{}.lora_B.weight", peft_prefix(module)), b),
        ])
    }

    /// `W + scale · B A`, the merged weight.
    pub fn merge_into(&self, w: &Tensor) -> candle::Result<Tensor> {
        let delta = (super::ops::matmul(&self.b.to_dtype(DType::F32)?, &self.a.to_dtype(DType::F32)?)? * self.scale)?;
        (w.to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())
    }
}

/// PEFT's key prefix for a transformers module name.
pub fn peft_prefix(module: &str) -> String {
    format!("base_model.model.{module}")
}

/// Write `adapter_config.json` and `adapter_model.safetensors`.
pub fn save_adapter(dir: &Path, cfg: &LoraConfig, base_model: &str, adapters: &[(String, LoraAdapter)]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": cfg.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "modules_to_save": null,
    });
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_string_pretty(&config)?)?;
    let mut tensors = HashMap::new();
    for (module, ad) in adapters {
        tensors.insert(format!("{}.lora_A.weight", peft_prefix(module)), ad.a.detach().to_dtype(DType::F32)?);
        tensors.insert(format!("{}.lora_B.weight", peft_prefix(module)), ad.b.detach().to_dtype(DType::F32)?);
    }
    candle::safetensors::save(&tensors, dir.join("adapter_model.safetensors"))?;
    Ok(())
}

/// A saved adapter: its configuration, base model and tensors by module name.
pub struct SavedAdapter {
    /// r, α, dropout, targets.
    pub config: LoraConfig,
    /// `base_model_name_or_path`.
    pub base_model: String,
    /// `(A, B)` per transformers module name.
    pub tensors: HashMap<String, (Tensor, Tensor)>,
}

/// Read a PEFT adapter directory.
pub fn load_adapter(dir: &Path) -> Result<SavedAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read `{}`", cfg_path.display()))?,
    )
    .with_context(|| format!("invalid JSON in `{}`", cfg_path.display()))?;
    let field = |k: &str| json.get(k).ok_or_else(|| anyhow::anyhow!("`{}`: missing field `{k}`", cfg_path.display()));
    let targets = match field("target_modules")? {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => bail!("`{}`: `target_modules` must be a list", cfg_path.display()),
    };
    let config = LoraConfig {
        r: field("r")?.as_u64().unwrap_or(8) as usize,
        alpha: field("lora_alpha")?.as_f64().unwrap_or(8.0),
        dropout: json.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0),
        targets,
    };
    let base_model = json.get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or("default").to_string();
    let raw = candle::safetensors::load(dir.join("adapter_model.safetensors"), &candle::Device::Cpu)
        .with_context(|| format!("cannot read `{}`", dir.join("adapter_model.safetensors").display()))?;
    let mut tensors = HashMap::new();
    for (name, a) in &raw {
        let Some(module) = name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(".lora_A.weight")) else {
            continue;
        };
        let b_name = format!("base_model.model.{module}.lora_B.weight");
        let b = raw.get(&b_name).with_context(|| format!("adapter lacks `{b_name}`"))?;
        tensors.insert(module.to_string(), (a.clone(), b.clone()));
    }
    Ok(SavedAdapter { config, base_model, tensors })
}

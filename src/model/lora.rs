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

use super::transformer::{CausalLm, ProjectionWeight};

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
    /// Reject impossible settings; errors name the recipe key and the flag.
    pub fn validate(&self) -> Result<()> {
        const KNOWN: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
        if let Err((field, reason)) = self.check() {
            let flag = match field {
                "r" => "--lora-r",
                "lora_alpha" => "--lora-alpha",
                _ => "--lora-dropout",
            };
            let key = match field {
                "lora_alpha" => "alpha",
                "lora_dropout" => "dropout",
                k => k,
            };
            bail!("`lora.{key}` (`{flag}`) {reason}");
        }
        if let Some(t) = self.targets.iter().find(|t| !KNOWN.contains(&t.as_str())) {
            bail!("unknown LoRA target `{t}` in `lora.targets` (known: {})", KNOWN.join(", "));
        }
        Ok(())
    }

    /// The first out-of-range value as (PEFT's `adapter_config.json` key, reason).
    fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.r == 0 {
            return Err(("r", "must be at least 1 (got 0)".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(("lora_alpha", format!("must be a positive finite number (got {})", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(("lora_dropout", format!("must be in [0, 1) (got {})", self.dropout)));
        }
        Ok(())
    }

    /// The rank must not exceed the smaller side of an adapted `[out, in]` layer: `B A` has rank
    /// at most `min(in, out)`, so a larger r only adds parameters (and memory) that cannot
    /// change the update. Checked before anything of size r is allocated.
    pub fn check_rank(&self, out: usize, inp: usize) -> Result<()> {
        let bound = out.min(inp);
        if self.r > bound {
            bail!(
                "`lora.r` (`--lora-r`) is {} but an adapted layer of shape [out, in] = [{out}, {inp}] allows at most \
                 min(in, out) = {bound}: LoRA's update B·A cannot have a higher rank than the layer",
                self.r
            );
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
    /// Refuses a rank above `min(in, out)` (see [`LoraConfig::check_rank`]) before allocating.
    pub fn init(
        out: usize,
        inp: usize,
        cfg: &LoraConfig,
        rng: &mut impl Rng,
        dtype: DType,
        device: &candle::Device,
    ) -> Result<Self> {
        cfg.validate()?;
        cfg.check_rank(out, inp)?;
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

/// Read a PEFT adapter directory. `adapter_config.json` is validated (errors name the file
/// and the field), and every adapter's A must be `[r, in]` and its B `[out, r]`.
pub fn load_adapter(dir: &Path) -> Result<SavedAdapter> {
    let cfg_path = dir.join("adapter_config.json");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read `{}`", cfg_path.display()))?,
    )
    .with_context(|| format!("invalid JSON in `{}`", cfg_path.display()))?;
    let p = cfg_path.display();
    let field = |k: &str| json.get(k).ok_or_else(|| anyhow::anyhow!("{p}: missing field `{k}`"));
    let targets = match field("target_modules")? {
        serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => bail!("{p}: field `target_modules` must be a list"),
    };
    let r = field("r")?;
    let r = r
        .as_u64()
        .and_then(|r| usize::try_from(r).ok())
        .ok_or_else(|| anyhow::anyhow!("{p}: field `r` must be a positive integer (got {r})"))?;
    let alpha = field("lora_alpha")?;
    let alpha =
        alpha.as_f64().ok_or_else(|| anyhow::anyhow!("{p}: field `lora_alpha` must be a number (got {alpha})"))?;
    let dropout = match json.get("lora_dropout") {
        None | Some(serde_json::Value::Null) => 0.0,
        Some(v) => v.as_f64().ok_or_else(|| anyhow::anyhow!("{p}: field `lora_dropout` must be a number (got {v})"))?,
    };
    let config = LoraConfig { r, alpha, dropout, targets };
    if let Err((key, reason)) = config.check() {
        bail!("{p}: field `{key}` {reason}");
    }
    let base_model = json.get("base_model_name_or_path").and_then(|v| v.as_str()).unwrap_or("default").to_string();
    let weights_path = dir.join("adapter_model.safetensors");
    let raw = candle::safetensors::load(&weights_path, &candle::Device::Cpu)
        .with_context(|| format!("cannot read `{}`", weights_path.display()))?;
    let mut tensors = HashMap::new();
    for (name, a) in &raw {
        let Some(module) = name.strip_prefix("base_model.model.").and_then(|n| n.strip_suffix(".lora_A.weight")) else {
            continue;
        };
        let b_name = format!("base_model.model.{module}.lora_B.weight");
        let b = raw.get(&b_name).with_context(|| format!("{}: adapter lacks `{b_name}`", weights_path.display()))?;
        match (a.dims(), b.dims()) {
            (&[ra, _], &[_, rb]) if ra == r && rb == r => {}
            (da, db) => bail!(
                "{}: `{name}` has shape {da:?} and `{b_name}` {db:?}, but {p} says `r` = {r} (A must be [r, in], B [out, r])",
                weights_path.display()
            ),
        }
        tensors.insert(module.to_string(), (a.clone(), b.clone()));
    }
    Ok(SavedAdapter { config, base_model, tensors })
}

impl SavedAdapter {
    /// Check that every adapted module exists in `model` and that its A is `[r, in]` and its
    /// B `[out, r]` for that module's `[out, in]` weight; `dir` is named in errors.
    pub fn check_against(&self, model: &CausalLm, dir: &Path) -> Result<()> {
        let shapes: HashMap<String, Vec<usize>> = model
            .tensor_weights()
            .into_iter()
            .filter_map(|(n, w)| Some((n.strip_suffix(".weight")?.to_string(), w.dims().to_vec())))
            .chain(model.projection_shapes())
            .collect();
        let file = dir.join("adapter_model.safetensors");
        for (module, (a, b)) in &self.tensors {
            let Some(w) = shapes.get(module) else {
                bail!("{}: adapts `{module}`, which the base model does not have", file.display());
            };
            let (out, inp) = match w.as_slice() {
                &[o, i] => (o, i),
                _ => bail!("{}: adapts `{module}`, which is not a linear layer", file.display()),
            };
            if a.dims() != [self.config.r, inp] || b.dims() != [out, self.config.r] {
                bail!(
                    "{}: the adapter of `{module}` has A {:?} and B {:?}, but the base layer is [out, in] = [{out}, {inp}] \
                     (A must be [r, in], B [out, r])",
                    file.display(),
                    a.dims(),
                    b.dims()
                );
            }
        }
        Ok(())
    }
}

/// LoRA on a model: adapters attached to, read from, trained on and folded into its linear
/// projections.
impl CausalLm {
    /// Attach fresh LoRA adapters to the configured target modules (seeded initialisation).
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> anyhow::Result<()> {
        if self.config().fused_projections {
            let split = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"];
            if let Some(t) = cfg.targets.iter().find(|t| split.contains(&t.as_str())) {
                anyhow::bail!("LoRA target `{t}`: this model stores q/k/v and gate/up fused (`qkv_proj`, `gate_up_proj`, as Phi-3), and adapters on the fused projections are not supported yet; target `o_proj` and `down_proj`");
            }
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (dtype, device) = (self.dtype(), self.device().clone());
        let mut err = None;
        self.visit_linears_mut(&mut |_, short, lin| {
            if cfg.targets.iter().any(|t| t == short) {
                let (out, inp) = lin.weight.dims2()?;
                match LoraAdapter::init(out, inp, cfg, &mut rng, dtype, &device) {
                    Ok(ad) => lin.lora = Some(ad),
                    Err(e) => err = Some(e),
                }
            }
            Ok(())
        })?;
        err.map_or(Ok(()), Err)
    }

    /// Attach a saved adapter (every module it names must exist).
    pub fn attach_lora(&mut self, saved: &SavedAdapter) -> anyhow::Result<()> {
        let (dtype, device) = (self.dtype(), self.device().clone());
        let mut attached = 0;
        self.visit_linears_mut(&mut |module, _, lin| {
            if let Some((a, b)) = saved.tensors.get(module) {
                lin.lora = Some(LoraAdapter {
                    a: a.to_device(&device)?.to_dtype(dtype)?,
                    b: b.to_device(&device)?.to_dtype(dtype)?,
                    scale: saved.config.scale(),
                    dropout: saved.config.dropout,
                    dropout_seed: None,
                });
                attached += 1;
            }
            Ok(())
        })?;
        if attached != saved.tensors.len() {
            anyhow::bail!("the adapter names {} modules but only {attached} exist in this model", saved.tensors.len());
        }
        Ok(())
    }

    /// The adapters, by transformers module name.
    pub fn lora_adapters(&self) -> Vec<(String, LoraAdapter)> {
        let mut out = Vec::new();
        let mut copy = self.clone();
        copy.visit_linears_mut(&mut |module, _, lin| {
            if let Some(ad) = &lin.lora {
                out.push((module.to_string(), ad.clone()));
            }
            Ok(())
        })
        .expect("collecting adapters cannot fail");
        out
    }

    /// Make only the adapters trainable; returns their variables under PEFT's names.
    pub fn make_lora_trainable(&mut self) -> candle::Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        self.visit_linears_mut(&mut |module, _, lin| {
            if let Some(ad) = lin.lora.as_mut() {
                vars.extend(ad.make_trainable(module)?);
            }
            Ok(())
        })?;
        Ok(vars)
    }

    /// The same weights without adapters (the reference of a LoRA run: no second copy of the
    /// base weights).
    pub fn without_adapters(&self) -> Self {
        let mut base = self.clone();
        base.visit_linears_mut(&mut |_, _, lin| {
            lin.lora = None;
            Ok(())
        })
        .expect("dropping adapters cannot fail");
        base
    }

    /// Fold every adapter into its weight (`W + α/r · B A`) and drop the adapters.
    /// A packed weight is dequantized first, so it comes out dense in the model's dtype.
    pub fn merge_lora(&mut self) -> candle::Result<()> {
        let (dtype, device) = (self.dtype(), self.device().clone());
        self.visit_linears_mut(&mut |_, _, lin| {
            if let Some(ad) = lin.lora.take() {
                let base = lin.weight.to_dense(dtype, &device)?.detach();
                lin.weight = ProjectionWeight::Dense(ad.merge_into(&base)?);
            }
            Ok(())
        })
    }

    /// Dropout masks of the adapters for one optimizer step derive from `seed` and `step`
    /// (reproducible on resume); `None` turns adapter dropout off (evaluation, sampling).
    pub fn set_lora_dropout_step(&mut self, seed_and_step: Option<(u64, u64)>) {
        let mut index = 0u64;
        self.visit_linears_mut(&mut |_, _, lin| {
            if let Some(ad) = lin.lora.as_mut() {
                index += 1;
                ad.dropout_seed = seed_and_step.map(|(seed, step)| {
                    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                });
            }
            Ok(())
        })
        .expect("setting seeds cannot fail");
    }
}

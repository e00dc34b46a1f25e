//! The models of a run: the policy (from `model.model`, a checkpoint when resuming, with LoRA
//! adapters or a new score head when the objective asks), the frozen reference and the frozen
//! teacher, all on the recipe's device and precision.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle::{DType, Device};
use candor_alignment::DataNeed;

use super::config::TrainConfig;
use crate::load::{self, LoadedModel};
use crate::model::{CausalLm, Packing};

/// The policy and the frozen models beside it.
pub struct RunModels {
    /// The model being trained (its weights are not yet variables).
    pub policy: LoadedModel,
    /// The frozen reference, when the objective needs one.
    pub reference: Option<CausalLm>,
    /// The frozen teacher of distillation objectives.
    pub teacher: Option<CausalLm>,
}

/// Where and in what precision a run's models live.
struct Placement {
    device: Device,
    /// The weights' dtype (f32 master weights when training in bf16).
    dtype: DType,
    /// bf16 matmuls over f32 master weights (mixed precision), if asked.
    matmul_precision: Option<DType>,
    kernels: crate::model::Kernels,
    /// `model.chat_template`, for every model the run generates or scores with.
    chat_template: Option<std::path::PathBuf>,
    /// How frozen models (and a LoRA run's base) keep their projections.
    frozen: Packing,
}

impl Placement {
    fn of(cfg: &TrainConfig) -> Result<Self> {
        let device = load::parse_device(&cfg.model.device)?;
        // bf16 trains in mixed precision: f32 master weights and optimizer state, bf16 matmuls.
        let (dtype, matmul_precision) = match load::parse_dtype(&cfg.model.dtype)? {
            DType::BF16 => (DType::F32, Some(DType::BF16)),
            other => (other, None),
        };
        Ok(Self {
            device,
            dtype,
            matmul_precision,
            kernels: cfg.model.kernels,
            chat_template: cfg.model.chat_template.clone(),
            frozen: cfg.model.frozen_packing()?,
        })
    }

    fn load(&self, spec: &str, what: &str, packing: Packing) -> Result<LoadedModel> {
        let mut loaded = load::load_model_packed(spec, self.dtype, &self.device, packing)
            .with_context(|| format!("failed to load {what} `{spec}`"))?;
        if let Some(path) = &self.chat_template {
            load::set_chat_template(&mut loaded, path).context("`model.chat_template`")?;
        }
        Ok(loaded)
    }

    /// A frozen model on the run's kernels and precision.
    fn frozen(&self, mut model: CausalLm) -> CausalLm {
        model.set_kernels(self.kernels);
        model.set_matmul_precision(self.matmul_precision);
        model
    }
}

impl RunModels {
    /// Load the run's models; `resume` is the checkpoint the policy continues from.
    pub fn load(cfg: &TrainConfig, resume: Option<&Path>) -> Result<Self> {
        let place = Placement::of(cfg)?;
        let objective = &cfg.objective;
        // A LoRA run's base is frozen: kept packed like every frozen model.
        let start_packing = if cfg.lora.is_some() { place.frozen } else { Packing::Dense };
        let mut start = place.load(&cfg.model.model, "model", start_packing)?;
        let distill = cfg.distill.clone().unwrap_or_default();
        // Distillation: the frozen teacher (the same load when it is the same model), then the
        // student cut out of `model.model` when asked (a checkpoint already holds the student).
        let teacher = match objective.needs_teacher() {
            true if distill.teacher == cfg.model.model => Some(place.frozen(start.model.frozen_view())),
            true => {
                let teacher = place.load(&distill.teacher, "the teacher", place.frozen)?;
                check_same_tokenizer(&start, &teacher)?;
                Some(place.frozen(teacher.model))
            }
            false => None,
        };
        let mut cut = false;
        if objective.needs_teacher() {
            let total_layers = start.model.config().num_hidden_layers;
            let keep = match (&distill.student_layers, distill.student_num_layers) {
                (Some(layers), _) => Some(layers.clone()),
                (None, Some(n)) => Some(CausalLm::evenly_spaced_layers(total_layers, n)?),
                (None, None) => None,
            };
            if let Some(keep) = keep {
                start.model.keep_layers(&keep).context("`distill.student_layers`")?;
                cut = true;
            }
        }
        let mut policy = policy_of(cfg, &start, &place, resume)?;
        let reference = match (objective.needs_reference(), &cfg.model.ref_model) {
            (false, _) => None,
            (true, Some(spec)) => Some(place.frozen(place.load(spec, "the reference", place.frozen)?.model)),
            // With LoRA the reference is the same base weights with the adapters off: no copy.
            (true, None) if cfg.lora.is_some() || cut => Some(place.frozen(start.model.without_adapters())),
            // Every weight trains: the reference is the starting model loaded again, frozen
            // (packed as stored or quantized), not a second dense copy of it.
            (true, None) => Some(place.frozen(place.load(&cfg.model.model, "the reference", place.frozen)?.model)),
        };
        if place.matmul_precision.is_some() {
            policy.model.anchor_rounding(&start.model);
        }
        policy.model.set_kernels(cfg.model.kernels);
        policy.model.set_gradient_checkpointing(cfg.run.gradient_checkpointing);
        policy.model.set_matmul_precision(place.matmul_precision);
        Ok(Self { policy, reference, teacher })
    }
}

/// The policy: `start` (with fresh LoRA adapters), or the checkpoint in `resume`; reward models
/// get a score head.
fn policy_of(cfg: &TrainConfig, start: &LoadedModel, place: &Placement, resume: Option<&Path>) -> Result<LoadedModel> {
    let objective = &cfg.objective;
    let mut policy = match (resume, &cfg.lora) {
        (Some(dir), None) => load::load_hf_dir(dir, place.dtype, &place.device)?,
        (Some(dir), Some(_)) => {
            let mut p = start.clone();
            p.model.attach_lora(&crate::model::lora::load_adapter(dir)?)?;
            p
        }
        (None, Some(lora)) => {
            let mut p = start.clone();
            p.model.add_lora(lora, cfg.run.seed)?;
            p
        }
        (None, None) => start.clone(),
    };
    if objective.data_need() == DataNeed::ScoredPairs {
        if cfg.lora.is_some() {
            bail!("objective `{}` trains every weight and the new score head; remove `[lora]` (LoRA reward models are not supported yet)", objective.name());
        }
        if policy.model.config().num_labels.is_none() {
            let pad = policy.tokenizer.pad_id();
            policy.model.add_score_head(1, pad, cfg.run.seed)?;
        }
    }
    Ok(policy)
}

/// A teacher and student must read and write the same token ids.
fn check_same_tokenizer(student: &LoadedModel, teacher: &LoadedModel) -> Result<()> {
    let (s, t) = (&student.tokenizer, &teacher.tokenizer);
    let probe = "Distillation needs one tokenizer: 12 + 30 = 42, ünïcödé, \n\tcode();";
    let (vs, vt) = (student.model.config().vocab_size, teacher.model.config().vocab_size);
    if s.vocab_size() != t.vocab_size() || vs != vt || s.encode(probe, false)? != t.encode(probe, false)? {
        bail!(
            "the teacher `{}` and the student `{}` do not share a tokenizer (vocabularies {} and {}, model vocab sizes {vt} and {vs}); distillation compares next-token distributions id by id, so both must use the same one",
            teacher.origin,
            student.origin,
            t.vocab_size(),
            s.vocab_size()
        );
    }
    Ok(())
}

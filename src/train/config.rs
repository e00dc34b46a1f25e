//! A training run's configuration: typed, strict (unknown keys are errors), resolved in one
//! place with the precedence command line > `--set` > recipe file > defaults.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candor_alignment::{DataNeed, JudgeNeed, LoopKind, Objective, ObjectiveSpec};
use serde::{Deserialize, Serialize};

use super::optim::Scheduler;
use crate::data::TruncationMode;

/// A setting whose value is out of range, named by its dotted key (`optim.max_grad_norm`).
/// [`TrainConfig::resolve`] adds where the value came from: the recipe's file and line, or the
/// command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("setting `{key}`: {message}")]
pub struct SettingError {
    /// The dotted key.
    pub key: String,
    /// What is wrong with its value.
    pub message: String,
}

fn setting(key: &str, message: impl Into<String>) -> anyhow::Error {
    SettingError { key: key.to_string(), message: message.into() }.into()
}

/// Everything a run needs; written to the run directory as `config.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Which models take part.
    #[serde(default)]
    pub model: ModelSection,
    /// The data.
    #[serde(default)]
    pub data: DataSection,
    /// The loss and its hyper-parameters.
    pub objective: Objective,
    /// Optimizer and schedule.
    #[serde(default)]
    pub optim: OptimSection,
    /// Batching, length of the run, logging and checkpoints.
    pub run: RunSection,
    /// Train LoRA adapters instead of every weight (`[lora]`; absent = full fine-tuning).
    #[serde(default)]
    pub lora: Option<crate::model::lora::LoraConfig>,
    /// Rounds of sampling, judging and training for online objectives (`[online]`).
    #[serde(default)]
    pub online: Option<OnlineSection>,
    /// Distillation: the teacher, where the training sequences come from, the student's size.
    #[serde(default)]
    pub distill: Option<DistillSection>,
}

/// Where a distillation run's training sequences come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DistillSource {
    /// The dataset's own completions (`prompt`/`completion`, `messages`, `text`): off-policy.
    #[default]
    Dataset,
    /// The teacher's answers to the dataset's prompts, generated once (sequence-level KD,
    /// TRL's `seq_kd`), cached as `teacher_outputs.jsonl` in the run directory.
    Teacher,
    /// The student's own answers, sampled afresh every step (on-policy, GKD's `lmbda = 1`).
    Student,
}

/// `[distill]`: the teacher and the data of knowledge-distillation objectives (and KDRL's
/// teacher).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillSection {
    /// The teacher model (a spec like `model.model`; `default` = SmolLM2-135M-Instruct). When it
    /// names the same model as `model.model`, the one load serves both.
    #[serde(default = "default_model")]
    pub teacher: String,
    /// Where the training sequences come from.
    #[serde(default)]
    pub source: DistillSource,
    /// Build the student from `model.model` by keeping these decoder layers (strictly
    /// increasing indices), unless resuming.
    #[serde(default)]
    pub student_layers: Option<Vec<usize>>,
    /// Build the student by keeping this many evenly spaced layers (first and last included).
    #[serde(default)]
    pub student_num_layers: Option<usize>,
    /// Score the fixed training and eval sequences with the teacher once and keep its final
    /// hidden states (exact logits, one LM-head matmul away) in `teacher_cache/` of the run.
    #[serde(default)]
    pub teacher_logits_cache: bool,
    /// Tokens to generate per answer (`source = teacher | student`).
    #[serde(default = "default_online_new_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature of generated answers.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling threshold of generated answers.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Answers generated per forward pass.
    #[serde(default = "default_sampling_batch")]
    pub sampling_batch_size: usize,
    /// MGSR's sequence-level correction (SCRG) of student answers: at the position where the
    /// student's token differs from the teacher's choice and the two distributions differ
    /// most (KL), put the teacher's token and let the student write the rest again.
    #[serde(default)]
    pub scrg: bool,
}

impl Default for DistillSection {
    fn default() -> Self {
        toml::from_str("").expect("every field has a default")
    }
}

/// `[online]`: the online loop's rounds (INPO, DNO, NFT).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineSection {
    /// Prompts JSONL (a `prompt` per row, plus what the judge needs: `answer`, `constraint`).
    pub prompts: PathBuf,
    /// Rounds of sample → judge → train.
    #[serde(default = "default_rounds")]
    pub rounds: u64,
    /// Samples per prompt and round (K).
    #[serde(default = "default_samples")]
    pub samples_per_prompt: usize,
    /// Prompts per round, taken in turn from a seeded shuffle of the file (0 = all, every round).
    #[serde(default)]
    pub prompts_per_round: usize,
    /// The judge of the samples (`verifier:auto`, `rm:DIR`, `llm:MODEL`, `openai:URL`), or a
    /// weighted sum of pointwise ones (`verifier:numeric + 0.5*rm:DIR`, TRL's `reward_weights`).
    #[serde(default = "default_online_judge")]
    pub judge: String,
    /// `openai:` judges: the model name sent to the server.
    #[serde(default)]
    pub judge_model: Option<String>,
    /// Passes over each round's training set (E).
    #[serde(default = "default_one")]
    pub epochs_per_round: usize,
    /// Most new tokens per sample.
    #[serde(default = "default_online_new_tokens")]
    pub max_new_tokens: usize,
    /// Sampling temperature.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Nucleus sampling (1 = off).
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Top-k sampling (0 = off).
    #[serde(default)]
    pub top_k: usize,
    /// Rows generated together.
    #[serde(default = "default_sampling_batch")]
    pub sampling_batch_size: usize,
    /// Pairs (INPO, DNO) are kept only when the best and worst scores differ by more than this
    /// (DNO's large-margin filter).
    #[serde(default)]
    pub min_margin: f64,
    /// DNO: a teacher's answers (`candor generate` output: one `completion` per line, one line
    /// per prompt, in prompt order) join every prompt's pool of samples.
    #[serde(default)]
    pub teacher_outputs: Option<PathBuf>,
    /// DNO: a teacher model that writes one more (greedy) answer per prompt each round.
    #[serde(default)]
    pub teacher_model: Option<String>,
}

fn default_rounds() -> u64 {
    3
}
fn default_samples() -> usize {
    4
}
fn default_online_judge() -> String {
    "verifier:auto".into()
}
fn default_online_new_tokens() -> usize {
    128
}
fn default_temperature() -> f64 {
    1.0
}
fn default_top_p() -> f64 {
    1.0
}
fn default_sampling_batch() -> usize {
    32
}

/// `[model]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// The policy to train: directory, `.gguf`, hub id or `default`.
    #[serde(default = "default_model")]
    pub model: String,
    /// The frozen reference; default: a frozen copy of the starting policy.
    #[serde(default)]
    pub ref_model: Option<String>,
    /// Score the data with the reference once before training, cache the log-probs next to
    /// the run (`ref_logps_*.json`) and free the reference model.
    #[serde(default)]
    pub precompute_ref_logps: bool,
    /// `f32`, `bf16` or `f16`.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// `cpu`, `cuda`, `cuda:N`, `metal` or `auto`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `fused` or `plain` kernels (see `candor --help`).
    #[serde(default)]
    pub kernels: crate::model::Kernels,
    /// A Jinja chat template file for the policy, reference and teacher in place of their own
    /// (e.g. `templates/gemma3.jinja` for the Gemma 3 base model, which ships none).
    #[serde(default)]
    pub chat_template: Option<PathBuf>,
    /// Keep the frozen models (reference, teacher, judges) and a LoRA run's base quantized to
    /// this type at load (`q8_0`, `q4_k`, `bf16`, …; see `candor --help`), like `load_in_4bit`.
    /// Unset: frozen models keep the blocks their file stores.
    #[serde(default)]
    pub base_quant: Option<String>,
}

impl Default for ModelSection {
    fn default() -> Self {
        toml::from_str("").expect("every model field has a default")
    }
}

impl ModelSection {
    /// The run's device, dtype and kernels, for the models a run loads beside the policy
    /// (judges, critics, teachers): they run in the run's precision.
    pub fn load_options(&self) -> Result<crate::load::LoadOptions> {
        let options = crate::load::LoadOptions::parse(&self.device, &self.dtype, self.kernels)?;
        Ok(options.with_packing(self.frozen_packing()?))
    }

    /// How frozen models keep their projections: quantized to `base_quant`, or as stored.
    pub fn frozen_packing(&self) -> Result<crate::model::Packing> {
        let kind = match &self.base_quant {
            Some(name) => {
                Some(crate::model::packed::parse_base_quant(name).map_err(|m| setting("model.base_quant", m))?)
            }
            None => None,
        };
        Ok(crate::model::Packing::frozen(kind))
    }
}

/// `[data]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// Training JSONL (offline objectives; online ones read `online.prompts`).
    #[serde(default)]
    pub train: Option<PathBuf>,
    /// Held-out JSONL evaluated every `run.eval_every` steps and at the end.
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// Longest prompt + completion in tokens.
    #[serde(default = "default_max_length")]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens (keeps the end).
    #[serde(default)]
    pub max_prompt_length: Option<usize>,
    /// Which end `max_length` keeps.
    #[serde(default)]
    pub truncation_mode: TruncationMode,
    /// Skip malformed rows instead of failing.
    #[serde(default)]
    pub skip_bad_rows: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        toml::from_str("").expect("every data field has a default")
    }
}

/// `[optim]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    /// Peak learning rate.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Decoupled weight decay (matrices only).
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables.
    #[serde(default = "default_max_grad_norm")]
    pub max_grad_norm: f64,
    /// Schedule after warm-up.
    #[serde(default)]
    pub scheduler: Scheduler,
    /// Linear warm-up steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// AdamW β₁.
    #[serde(default = "default_beta1")]
    pub adam_beta1: f64,
    /// AdamW β₂.
    #[serde(default = "default_beta2")]
    pub adam_beta2: f64,
    /// AdamW ε.
    #[serde(default = "default_eps")]
    pub adam_epsilon: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        toml::from_str("").expect("every optim field has a default")
    }
}

/// `[run]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSection {
    /// The run directory.
    pub output: PathBuf,
    /// Rows per micro-batch (a preference row is one pair).
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Passes over the data (ignored when `max_steps` is set).
    #[serde(default = "default_one")]
    pub epochs: usize,
    /// Optimizer steps to take; overrides `epochs`.
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Seed of the data order.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Batch examples of similar length (transformers' `group_by_length`).
    #[serde(default)]
    pub group_by_length: bool,
    /// Recompute each decoder block in the backward instead of keeping its activations
    /// (transformers' `gradient_checkpointing`): less memory, one more forward per step.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// SFT: pack several sequences into each row of `data.max_length` tokens (best-fit
    /// decreasing; sequences never attend to each other, positions restart per sequence).
    #[serde(default)]
    pub packing: bool,
    /// Write a checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub save_every: u64,
    /// Keep only the last K checkpoints (0 = keep all).
    #[serde(default)]
    pub keep_last: usize,
    /// Checkpoints hold the model only, without the optimizer state (transformers'
    /// `save_only_model`): a third of the disk, but such a checkpoint cannot be resumed from.
    #[serde(default)]
    pub save_only_model: bool,
    /// Evaluate on `data.eval` every N steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Also evaluate before the first step (transformers' `eval_on_start`), logged as step 0.
    #[serde(default)]
    pub eval_on_start: bool,
    /// Start afresh in an `output` directory that already holds a run, clearing its
    /// checkpoints, metrics and final model first (transformers' `overwrite_output_dir`;
    /// `--overwrite`). Without it (or `--resume`) such a directory is refused.
    #[serde(default)]
    pub overwrite: bool,
    /// Data parallelism: every N steps the ranks compare a checksum of their parameters and
    /// stop on a difference (0 = never; a single process skips it).
    #[serde(default = "default_sync_check_every")]
    pub sync_check_every: u64,
    /// Data parallelism: seconds a collective waits for the other ranks before the run stops,
    /// naming the ranks that did not answer (torch.distributed's default, 10 minutes).
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout: f64,
    /// Ranks of this launch (set by the trainer from the launcher, never read from a recipe):
    /// an optimizer step takes `grad_accum` micro-batches on each of them.
    #[serde(skip, default = "default_one")]
    pub ranks: usize,
}

impl RunSection {
    /// Micro-batches of one optimizer step over all ranks: N ranks with accumulation k take
    /// the step one process takes with accumulation N·k.
    pub fn micro_per_step(&self) -> usize {
        self.grad_accum * self.ranks
    }
}

fn default_sync_check_every() -> u64 {
    10
}
fn default_collective_timeout() -> f64 {
    600.0
}

fn default_model() -> String {
    "default".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_device() -> String {
    "cpu".into()
}
fn default_max_length() -> Option<usize> {
    Some(1024)
}
fn default_lr() -> f64 {
    1e-5
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_beta1() -> f64 {
    0.9
}
fn default_beta2() -> f64 {
    0.999
}
fn default_eps() -> f64 {
    1e-8
}
fn default_batch_size() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_seed() -> u64 {
    42
}

impl TrainConfig {
    /// Build the configuration: the recipe file (if any), then `overrides` (`key.path`, TOML
    /// value) in order. Unknown keys and wrong types are errors naming the key.
    pub fn resolve(recipe: Option<&Path>, overrides: &[(String, toml::Value)]) -> Result<Self> {
        let text = match recipe {
            Some(p) => {
                Some(std::fs::read_to_string(p).with_context(|| format!("cannot read recipe `{}`", p.display()))?)
            }
            None => None,
        };
        let mut doc = match (recipe, &text) {
            (Some(p), Some(text)) => text.trim_start_matches('\u{feff}').parse::<toml::Table>().map_err(|e| {
                let line = e.span().map(|s| format!(":{}", line_of(text, s.start))).unwrap_or_default();
                anyhow!("{}{line}: invalid TOML: {}", p.display(), e.message().trim_end())
            })?,
            _ => toml::Table::new(),
        };
        // Switching objective by name starts from that objective's own defaults.
        if let Some((_, toml::Value::String(name))) = overrides.iter().rev().find(|(k, _)| k == "objective.name") {
            let current = doc.get("objective").and_then(|o| o.get("name")).and_then(|n| n.as_str());
            if current != Some(name.as_str()) {
                doc.insert("objective".into(), toml::Value::Table(toml::Table::new()));
            }
        }
        for (key, value) in overrides {
            set_path(&mut doc, key, value.clone()).with_context(|| {
                recipe.map(|p| format!("applying command-line settings to `{}`", p.display())).unwrap_or_default()
            })?;
        }
        // Where a setting's value came from, for errors: the command line, or the recipe's line.
        let locate = |key: &str| -> String {
            let from_command_line = overrides.iter().any(|(k, _)| k == key || key.starts_with(&format!("{k}.")));
            match (recipe, &text) {
                _ if from_command_line => "command line".to_string(),
                (Some(p), Some(text)) => match key_line(text, key) {
                    Some(line) => format!("{}:{line}", p.display()),
                    None => format!("{} (default value)", p.display()),
                },
                _ => "default value".to_string(),
            }
        };
        let cfg = Self::deserialize_table(doc).map_err(|(key, message)| match key {
            Some(key) => anyhow!("invalid training configuration: {}: setting `{key}`: {message}", locate(&key)),
            None => match recipe {
                Some(p) => anyhow!("invalid training configuration in `{}`: {message}", p.display()),
                None => anyhow!("invalid training configuration: {message}"),
            },
        })?;
        cfg.validate().map_err(|e| match e.downcast_ref::<SettingError>() {
            Some(s) => anyhow!("invalid training configuration: {}: {s}", locate(&s.key)),
            None => match recipe {
                Some(p) => e.context(format!(
                    "invalid training configuration in `{}` (with the command-line settings)",
                    p.display()
                )),
                None => e,
            },
        })?;
        Ok(cfg)
    }

    /// The configuration a TOML table holds (already merged with any overrides); `origin` is
    /// named in errors.
    pub fn from_table(doc: toml::Table, origin: &str) -> Result<Self> {
        let cfg = Self::deserialize_table(doc).map_err(|(key, message)| {
            let key = key.map(|k| format!("setting `{k}`: ")).unwrap_or_default();
            anyhow!("invalid training configuration{origin}: {key}{message}")
        })?;
        cfg.validate().map_err(|e| match e.downcast_ref::<SettingError>() {
            Some(s) => anyhow!("invalid training configuration{origin}: {s}"),
            None => e,
        })?;
        Ok(cfg)
    }

    /// Deserialize a merged table; an error comes with the dotted key it is about, when known.
    fn deserialize_table(doc: toml::Table) -> std::result::Result<Self, (Option<String>, String)> {
        let text = toml::to_string(&doc).map_err(|e| (None, e.to_string()))?;
        toml::from_str(&text).map_err(|e: toml::de::Error| {
            let key = e.span().and_then(|span| key_at(&text, span.start));
            (key, e.message().trim_end().to_string())
        })
    }

    /// Check every rule before anything is loaded.
    pub fn validate(&self) -> Result<()> {
        self.objective.validate()?;
        if let Some(lora) = &self.lora {
            lora.validate()?;
        }
        crate::load::check_device(&self.model.device).map_err(|m| setting("model.device", m))?;
        crate::load::check_dtype(&self.model.dtype).map_err(|m| setting("model.dtype", m))?;
        self.model.frozen_packing()?;
        let r = &self.run;
        if r.output.as_os_str().is_empty() || r.output.to_str().is_some_and(|s| s.trim().is_empty()) {
            return Err(setting(
                "run.output",
                "empty: name the run directory (an empty path would write the run into the working directory)",
            ));
        }
        if r.batch_size == 0 {
            return Err(setting("run.batch_size", "must be at least 1"));
        }
        if r.grad_accum == 0 {
            return Err(setting("run.grad_accum", "must be at least 1"));
        }
        self.validate_numbers()?;
        let need = self.objective.data_need();
        if need == DataNeed::Unpaired && r.batch_size < 2 {
            return Err(setting(
                "run.batch_size",
                format!(
                    "`{}` estimates its KL reference point from the other rows of a micro-batch: use at least 2",
                    self.objective.name()
                ),
            ));
        }
        let offline = self.objective.loop_kind() == LoopKind::Offline;
        if self.model.precompute_ref_logps && offline && self.objective.needs_reference() && need != DataNeed::Pairs {
            return Err(setting(
                "model.precompute_ref_logps",
                format!(
                    "applies to preference-pair objectives; `{}` scores its reference on the fly",
                    self.objective.name()
                ),
            ));
        }
        if r.packing && self.objective.data_need() != DataNeed::Sequences {
            let names = Objective::names_where(|s| s.data_need == DataNeed::Sequences);
            bail!(
                "`run.packing` applies to single-sequence objectives ({}), not `{}`",
                names.join(", "),
                self.objective.name()
            );
        }
        if r.max_steps == Some(0) || (r.max_steps.is_none() && r.epochs == 0) {
            bail!("nothing to train: set `run.max_steps` or `run.epochs` above 0");
        }
        match (&self.online, self.objective.is_online()) {
            (None, true) => bail!(
                "objective `{}` learns from its own samples: set `online.prompts` (`--prompts FILE`)",
                self.objective.name()
            ),
            (Some(_), false) => bail!(
                "`[online]` applies to online objectives ({}), not `{}`",
                Objective::names_where(|s| s.loop_kind == LoopKind::Online).join(", "),
                self.objective.name()
            ),
            (Some(o), true) => {
                let spec = self.objective.spec();
                let fewest_samples = spec.fewest_samples_per_prompt;
                if o.rounds == 0
                    || o.samples_per_prompt < fewest_samples
                    || o.epochs_per_round == 0
                    || o.sampling_batch_size == 0
                {
                    bail!("`online.rounds` and `online.epochs_per_round` must be at least 1 and `online.samples_per_prompt` at least {fewest_samples} for `{}`", self.objective.name());
                }
                if (o.teacher_outputs.is_some() || o.teacher_model.is_some()) && !spec.teacher_pool {
                    let names = Objective::names_where(|s| s.teacher_pool);
                    bail!("`online.teacher_outputs` / `online.teacher_model` apply to `{}` only", names.join("`, `"));
                }
                if self.data.train.is_some() || self.data.eval.is_some() {
                    bail!("`{}` learns from its own samples of `online.prompts`; `data.train` / `data.eval` are not read (measure the result with `candor eval winrate`)", self.objective.name());
                }
                if spec.judge == JudgeNeed::Verifier && !o.judge.starts_with("verifier:") {
                    bail!(
                        "`{}` learns from right and wrong answers: its judge must be a `verifier:` (got `{}`)",
                        self.objective.name(),
                        o.judge
                    );
                }
            }
            (None, false) => {
                if self.data.train.is_none() {
                    bail!("set `data.train` (`--data FILE`)");
                }
            }
        }
        match (&self.distill, self.objective.needs_teacher()) {
            (Some(_), false) => bail!(
                "`[distill]` applies to distillation objectives ({}), not `{}`",
                Objective::names_where(ObjectiveSpec::needs_teacher).join(", "),
                self.objective.name()
            ),
            (Some(d), true) => {
                let cuts_student = d.student_layers.is_some() || d.student_num_layers.is_some();
                if d.student_layers.is_some() && d.student_num_layers.is_some() {
                    bail!("set one of `distill.student_layers` and `distill.student_num_layers`, not both");
                }
                if cuts_student && self.lora.is_some() {
                    bail!("a LoRA adapter belongs to the model it was trained on, and a student cut by `distill.student_*` exists only inside this run: cut it first (`candor student init --from {} --num-layers N --output DIR`), then train LoRA on `--model DIR`", self.model.model);
                }
                if self.objective.is_online()
                    && (d.source != DistillSource::Dataset || d.teacher_logits_cache || d.scrg)
                {
                    bail!("`{}` samples from the student every round; `distill.source`, `distill.teacher_logits_cache` and `distill.scrg` do not apply", self.objective.name());
                }
                if d.scrg && d.source != DistillSource::Student {
                    bail!("`distill.scrg` corrects the student's own answers: set `distill.source = \"student\"`");
                }
                if d.teacher_logits_cache && d.source == DistillSource::Student {
                    bail!("`distill.teacher_logits_cache` scores a fixed set of sequences once; the student's answers change every step (`distill.source = \"student\"`)");
                }
            }
            (None, _) => {}
        }
        Ok(())
    }

    /// Every float setting outside the objective: finite and in its range (NaN compares false
    /// with everything, so an unchecked `nan` would silently act as "off").
    fn validate_numbers(&self) -> Result<()> {
        fn check(key: &str, v: f64, ok: bool, range: &str) -> Result<()> {
            if v.is_finite() && ok {
                Ok(())
            } else {
                Err(setting(key, format!("must be a finite number {range}, got {v}")))
            }
        }
        let o = &self.optim;
        check("optim.lr", o.lr, o.lr > 0.0, "above 0")?;
        check("optim.weight_decay", o.weight_decay, o.weight_decay >= 0.0, "≥ 0 (0 = off)")?;
        check("optim.max_grad_norm", o.max_grad_norm, o.max_grad_norm >= 0.0, "≥ 0 (0 = no clipping)")?;
        check("optim.adam_beta1", o.adam_beta1, (0.0..1.0).contains(&o.adam_beta1), "in [0, 1)")?;
        check("optim.adam_beta2", o.adam_beta2, (0.0..1.0).contains(&o.adam_beta2), "in [0, 1)")?;
        check("optim.adam_epsilon", o.adam_epsilon, o.adam_epsilon >= 0.0, "≥ 0")?;
        let timeout = self.run.collective_timeout;
        check("run.collective_timeout", timeout, timeout > 0.0 && timeout <= 1e9, "in (0, 1e9] seconds")?;
        if let Some(on) = &self.online {
            check("online.temperature", on.temperature, on.temperature >= 0.0, "≥ 0 (0 = greedy)")?;
            check("online.top_p", on.top_p, on.top_p > 0.0 && on.top_p <= 1.0, "in (0, 1]")?;
            check("online.min_margin", on.min_margin, on.min_margin >= 0.0, "≥ 0")?;
        }
        if let Some(d) = &self.distill {
            check("distill.temperature", d.temperature, d.temperature >= 0.0, "≥ 0 (0 = greedy)")?;
            check("distill.top_p", d.top_p, d.top_p > 0.0 && d.top_p <= 1.0, "in (0, 1]")?;
        }
        Ok(())
    }

    /// The configuration as TOML text (what `config.toml` holds).
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// 1-based line of byte offset `pos` in `text`.
fn line_of(text: &str, pos: usize) -> usize {
    text.as_bytes()[..pos.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The line of a recipe that sets the dotted `key` (its innermost key), if the recipe sets it.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let doc = toml::de::DeTable::parse(text.trim_start_matches('\u{feff}')).ok()?;
    let offset = text.len() - text.trim_start_matches('\u{feff}').len();
    let mut table = doc.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        if parts.peek().is_none() {
            return Some(line_of(text, offset + k.span().start));
        }
        match v.get_ref() {
            toml::de::DeValue::Table(t) => table = t,
            _ => return Some(line_of(text, offset + k.span().start)),
        }
    }
    None
}

/// The dotted key of TOML `text` whose key or value holds byte offset `pos`.
fn key_at(text: &str, pos: usize) -> Option<String> {
    fn walk(table: &toml::de::DeTable, pos: usize, path: &mut Vec<String>) -> bool {
        for (k, v) in table.iter() {
            path.push(k.get_ref().to_string());
            if let toml::de::DeValue::Table(inner) = v.get_ref() {
                if walk(inner, pos, path) {
                    return true;
                }
            }
            if k.span().contains(&pos) || v.span().contains(&pos) {
                return true;
            }
            path.pop();
        }
        false
    }
    let doc = toml::de::DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    walk(doc.get_ref(), pos, &mut path).then(|| path.join("."))
}

/// Parse `--set key.path=value`: the value as TOML if it parses, else as a string.
pub fn parse_set(arg: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = arg.split_once('=').ok_or_else(|| anyhow!("`--set {arg}`: expected KEY=VALUE"))?;
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key.trim().to_string(), value))
}

/// Set the dotted `key` of `doc` (creating tables on the way).
pub fn set_path(doc: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|l| !l.is_empty()).ok_or_else(|| anyhow!("empty setting name `{key}`"))?;
    let mut table = doc;
    for part in parts {
        let entry = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| anyhow!("cannot set `{key}`: `{part}` is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(k: &str, v: &str) -> (String, toml::Value) {
        parse_set(&format!("{k}={v}")).unwrap()
    }

    #[test]
    fn overrides_win_and_objective_defaults_apply() {
        let cfg = TrainConfig::resolve(
            None,
            &[
                set("data.train", "t.jsonl"),
                set("run.output", "out"),
                set("objective.name", "dpo"),
                set("objective.beta", "0.5"),
            ],
        )
        .unwrap();
        let Objective::Dpo(d) = &cfg.objective else { panic!() };
        assert_eq!(d.beta, 0.5);
        assert_eq!(cfg.optim.max_grad_norm, 1.0);
        assert_eq!(cfg.run.batch_size, 4);
        let again: TrainConfig = toml::from_str(&cfg.to_toml().unwrap()).unwrap();
        assert_eq!(again.to_toml().unwrap(), cfg.to_toml().unwrap());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let base = [set("data.train", "t.jsonl"), set("run.output", "o"), set("objective.name", "sft")];
        let err = TrainConfig::resolve(None, &[&base[..], &[set("optim.learning_rate", "1")]].concat()).unwrap_err();
        assert!(err.to_string().contains("learning_rate"), "{err}");
        let err = TrainConfig::resolve(None, &[&base[..], &[set("run.batch_size", "0")]].concat()).unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
        let err = TrainConfig::resolve(
            None,
            &[&base[..], &[set("objective.name", "rdpo"), set("objective.epsilon", "0.7")]].concat(),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("epsilon"), "{err:#}");
    }
}

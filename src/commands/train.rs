//! `candor train`: resolve the configuration (recipe < `--set` < flags), then run the loop.

use anyhow::{Context, Result};

use crate::cli::{GlobalArgs, TrainArgs};
use crate::train::config::parse_set;
use crate::train::{train, RunOptions, TrainConfig};

/// Run `candor train`.
pub fn run(args: &TrainArgs, global: &GlobalArgs) -> Result<()> {
    let cfg = resolve(args, global)?;
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    let summary = train(&cfg, &RunOptions { quiet: args.quiet, resume: args.resume.is_some() })?;
    println!("trained {} steps; final model: {}", summary.steps, summary.final_dir.display());
    Ok(())
}

/// The configuration a command line asks for.
pub fn resolve(args: &TrainArgs, global: &GlobalArgs) -> Result<TrainConfig> {
    let recipe = match &args.resume {
        Some(run) => Some(run.join("config.toml")),
        None => args.config.clone(),
    };
    // `--set` first, so that flags, pushed after, win over it.
    let mut overrides: Vec<(String, toml::Value)> = args.set.iter().map(|a| parse_set(a)).collect::<Result<_>>()?;
    let mut put = |key: &str, value: toml::Value| overrides.push((key.to_string(), value));
    let s = |v: &str| toml::Value::String(v.to_string());
    let path = |p: &std::path::Path| toml::Value::String(p.display().to_string());
    let int = |v: u64| toml::Value::Integer(v as i64);
    let float = toml::Value::Float;
    if args.resume.is_none() {
        // Global device/dtype apply unless a recipe says otherwise (a resumed run keeps its own).
        if args.config.is_none() || global.device != "cpu" {
            put("model.device", s(&global.device));
        }
        if args.config.is_none() || global.dtype != "f32" {
            put("model.dtype", s(&global.dtype));
        }
        if args.config.is_none() || global.kernels != crate::model::Kernels::default() {
            put("model.kernels", s(&global.kernels.to_string()));
        }
    }
    if let Some(v) = &args.objective {
        put("objective.name", s(v));
    }
    if let Some(v) = &args.model {
        put("model.model", s(v));
    }
    if let Some(v) = &args.ref_model {
        put("model.ref_model", s(v));
    }
    if let Some(v) = &args.data {
        put("data.train", path(v));
    }
    if let Some(v) = &args.eval_data {
        put("data.eval", path(v));
    }
    if let Some(v) = args.max_length {
        put("data.max_length", int(v as u64));
    }
    if let Some(v) = args.max_prompt_length {
        put("data.max_prompt_length", int(v as u64));
    }
    if let Some(v) = &args.output {
        put("run.output", path(v));
    }
    if let Some(v) = args.lr {
        put("optim.lr", float(v));
    }
    if let Some(v) = args.weight_decay {
        put("optim.weight_decay", float(v));
    }
    if let Some(v) = args.max_grad_norm {
        put("optim.max_grad_norm", float(v));
    }
    if let Some(v) = args.warmup_steps {
        put("optim.warmup_steps", int(v));
    }
    if let Some(v) = args.scheduler {
        put("optim.scheduler", toml::Value::try_from(v)?);
    }
    for (key, v) in [
        ("run.batch_size", args.batch_size),
        ("run.grad_accum", args.grad_accum),
        ("run.epochs", args.epochs),
        ("run.keep_last", args.keep_last),
    ] {
        if let Some(v) = v {
            put(key, int(v as u64));
        }
    }
    for (key, v) in [
        ("run.max_steps", args.max_steps),
        ("run.seed", args.seed),
        ("run.save_every", args.save_every),
        ("run.eval_every", args.eval_every),
    ] {
        if let Some(v) = v {
            put(key, int(v));
        }
    }
    for (key, v) in [
        ("objective.beta", args.beta),
        ("objective.label_smoothing", args.label_smoothing),
        ("objective.epsilon", args.epsilon),
        ("objective.alpha", args.alpha),
        ("objective.spo_weight", args.spo_weight),
        ("objective.center_rewards_coefficient", args.center_rewards_coefficient),
        ("objective.eta", args.eta),
        ("objective.tau", args.tau),
    ] {
        if let Some(v) = v {
            put(key, float(v));
        }
    }
    if let Some(v) = &args.loss_type {
        put("objective.loss_type", s(v));
    }
    if let Some(v) = &args.prompts {
        put("online.prompts", path(v));
    }
    if let Some(v) = args.rounds {
        put("online.rounds", int(v));
    }
    if let Some(v) = args.samples_per_prompt {
        put("online.samples_per_prompt", int(v as u64));
    }
    for (key, v) in [
        ("online.judge", &args.judge),
        ("online.judge_model", &args.judge_model),
        ("online.teacher_model", &args.teacher_model),
    ] {
        if let Some(v) = v {
            put(key, s(v));
        }
    }
    if let Some(v) = &args.teacher_outputs {
        put("online.teacher_outputs", path(v));
    }
    if let Some(v) = &args.teacher {
        put("distill.teacher", s(v));
    }
    if let Some(v) = &args.distill_source {
        put("distill.source", s(v));
    }
    if args.teacher_logits_cache {
        put("distill.teacher_logits_cache", toml::Value::Boolean(true));
    }
    if let Some(v) = args.student_num_layers {
        put("distill.student_num_layers", int(v as u64));
    }
    if let Some(v) = args.temperature {
        put("objective.temperature", float(v));
    }
    if let Some(v) = &args.base_objective {
        put("objective.base_objective", s(v));
    }
    if args.packing {
        put("run.packing", toml::Value::Boolean(true));
    }
    if args.overwrite {
        put("run.overwrite", toml::Value::Boolean(true));
    }
    if args.gradient_checkpointing {
        put("run.gradient_checkpointing", toml::Value::Boolean(true));
    }
    if args.save_only_model {
        put("run.save_only_model", toml::Value::Boolean(true));
    }
    if args.group_by_length {
        put("run.group_by_length", toml::Value::Boolean(true));
    }
    if args.precompute_ref_logps {
        put("model.precompute_ref_logps", toml::Value::Boolean(true));
    }
    if args.reference_free {
        put("objective.reference_free", toml::Value::Boolean(true));
    }
    if let Some(v) = args.lora_r {
        put("lora.r", int(v as u64));
    }
    if let Some(v) = args.lora_alpha {
        put("lora.alpha", float(v));
    }
    if let Some(v) = args.lora_dropout {
        put("lora.dropout", float(v));
    }
    if let Some(v) = &args.lora_targets {
        put("lora.targets", toml::Value::Array(v.iter().map(|t| s(t)).collect()));
    }
    TrainConfig::resolve(recipe.as_deref(), &overrides).with_context(|| match &recipe {
        Some(p) => format!("cannot build the training configuration from `{}`", p.display()),
        None => "cannot build the training configuration".to_string(),
    })
}

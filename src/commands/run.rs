//! `candor run RECIPE`: the whole loop a user wants in one command — fetch the model, fine-tune
//! it, measure its win-rate against the model it started from on held-out prompts, draw the
//! training curves, export the result, and say where everything is.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::cli::{EvalGenerationArgs, ExportArgs, GlobalArgs, JudgeArgs, PlotArgs, RunArgs, WinrateArgs};
use crate::train::config::{parse_set, set_path};
use crate::train::{train, RunOptions, TrainConfig};

/// `[eval]` of a pipeline recipe.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalSection {
    /// Held-out prompts (rows with `prompt` and what the judge needs).
    prompts: PathBuf,
    /// The judge (`verifier:auto`, `rm:...`, ...).
    #[serde(default = "default_judge")]
    judge: String,
    /// Most new tokens per output.
    #[serde(default = "default_max_new_tokens")]
    max_new_tokens: usize,
    /// Prompts generated together.
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    /// Seed of the bootstrap.
    #[serde(default)]
    seed: u64,
}

/// `[export]` of a pipeline recipe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportSection {
    /// Where the fine-tuned model is written (default `<run>/model`).
    #[serde(default)]
    output: Option<PathBuf>,
}

fn default_judge() -> String {
    "verifier:auto".into()
}
fn default_max_new_tokens() -> usize {
    48
}
fn default_batch_size() -> usize {
    16
}

/// Run `candor run`.
pub fn run(args: &RunArgs, global: &GlobalArgs) -> Result<()> {
    let started = Instant::now();
    if let Some((rank, world, launcher)) = crate::distributed::launched_rank().filter(|&(_, w, _)| w > 1) {
        anyhow::bail!(
            "`candor run` is one process, but this is rank {rank} of {world} (started by {launcher}): launch `candor train` over several ranks, then evaluate and export with one process"
        );
    }
    let text = std::fs::read_to_string(&args.recipe)
        .with_context(|| format!("cannot read recipe `{}`", args.recipe.display()))?;
    let mut doc: toml::Table = text.parse().with_context(|| format!("invalid TOML in `{}`", args.recipe.display()))?;
    for s in &args.set {
        let (key, value) = parse_set(s)?;
        set_path(&mut doc, &key, value)?;
    }
    let origin = format!(" in `{}`", args.recipe.display());
    let mut section =
        |name: &str| doc.remove(name).ok_or_else(|| anyhow!("`{}` has no [{name}] section", args.recipe.display()));
    let train_doc = match section("train")? {
        toml::Value::Table(t) => t,
        _ => return Err(anyhow!("[train] must be a table")),
    };
    let eval: EvalSection =
        section("eval")?.try_into().map_err(|e: toml::de::Error| anyhow!("[eval]{origin}: {}", e.message()))?;
    let export: ExportSection = match doc.remove("export") {
        Some(v) => v.try_into().map_err(|e: toml::de::Error| anyhow!("[export]{origin}: {}", e.message()))?,
        None => ExportSection::default(),
    };
    if let Some(extra) = doc.keys().next() {
        return Err(anyhow!("unknown section [{extra}]{origin} (known: train, eval, export)"));
    }
    let mut cfg = TrainConfig::from_table(train_doc, &format!(" ([train]{origin})"))?;
    cfg.run.overwrite |= args.overwrite;
    let run_dir = cfg.run.output.clone();
    if cfg.run.overwrite && !args.resume && export.output.is_none() {
        // The pipeline's own export of the run it replaces (the training clears the rest).
        let model_dir = run_dir.join("model");
        if model_dir.is_dir() {
            std::fs::remove_dir_all(&model_dir)
                .with_context(|| format!("--overwrite: cannot remove `{}`", model_dir.display()))?;
        }
    }

    println!("[1/4] model: {} (fetched into candor's cache if needed)", cfg.model.model);
    println!("[2/4] fine-tuning with `{}` into {}", cfg.objective.name(), run_dir.display());
    let trained = train(&cfg, &RunOptions { quiet: args.quiet, resume: args.resume, ..Default::default() })?;
    let curves = run_dir.join("curves.svg");
    super::plot::run(&PlotArgs { run_dir: run_dir.clone(), output: Some(curves.clone()) })?;

    println!(
        "[3/4] win-rate of the fine-tuned model against {} on {} ({})",
        cfg.model.model,
        eval.prompts.display(),
        crate::judge::redact_url_credentials(&eval.judge)
    );
    let eval_dir = run_dir.join("eval");
    let summary = super::eval::winrate(
        &WinrateArgs {
            model: trained.final_dir.display().to_string(),
            baseline: cfg.model.model.clone(),
            prompts: eval.prompts.clone(),
            outputs: None,
            baseline_outputs: None,
            output: eval_dir.clone(),
            judge: JudgeArgs::with_defaults(&eval.judge),
            generation: EvalGenerationArgs {
                max_new_tokens: eval.max_new_tokens,
                samples_per_prompt: 1,
                temperature: 0.0,
                top_p: 1.0,
                seed: eval.seed,
                batch_size: eval.batch_size,
            },
        },
        global,
        args.quiet,
    )?;

    let model_dir = export.output.unwrap_or_else(|| run_dir.join("model"));
    println!("[4/4] exporting the fine-tuned model");
    super::export::run(
        &ExportArgs {
            checkpoint: trained.final_dir.display().to_string(),
            output: model_dir.clone(),
            max_shard_size_mb: 5000,
            merge_lora: false,
        },
        global,
    )?;

    let r = &summary.overall.rate;
    println!();
    println!("done in {:.1} min", started.elapsed().as_secs_f64() / 60.0);
    println!(
        "  win-rate   {:.1}% (95% CI {:.1}%–{:.1}%; {} wins, {} ties, {} losses)",
        100.0 * r.win_rate,
        100.0 * r.ci95.0,
        100.0 * r.ci95.1,
        r.wins,
        r.ties,
        r.losses
    );
    println!("  metrics    {}", run_dir.join("metrics.jsonl").display());
    println!("  curves     {}", curves.display());
    println!("  evaluation {} (summary.json, annotations.jsonl, winrate.svg)", eval_dir.display());
    println!("  model      {} (transformers layout)", model_dir.display());
    Ok(())
}

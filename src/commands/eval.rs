//! `candor eval` (one model under a judge) and `candor eval winrate` (against a baseline).

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::cli::{EvalArgs, EvalCommand, EvalGenerationArgs, GlobalArgs, WinrateArgs};
use crate::eval::winrate::{
    generate_outputs, ifeval_results, judge_and_summarise, read_outputs, read_prompts, reports_ifeval, table,
    EvalPrompt, Summary,
};
use crate::generate::SamplingConfig;
use crate::judge::ifeval::Report;

/// Run `candor eval ...`.
pub fn run(args: &EvalArgs, global: &GlobalArgs) -> Result<()> {
    match &args.command {
        Some(EvalCommand::Winrate(w)) => winrate(w, global, false).map(|_| ()),
        None => single(args, global),
    }
}

fn sampling(g: &EvalGenerationArgs) -> Result<SamplingConfig> {
    if g.samples_per_prompt > 1 && g.temperature <= 0.0 {
        bail!(
            "`--samples-per-prompt {}` with greedy decoding gives identical samples; set `--temperature` > 0",
            g.samples_per_prompt
        );
    }
    Ok(SamplingConfig {
        max_new_tokens: g.max_new_tokens,
        temperature: g.temperature,
        top_p: g.top_p,
        top_k: 0,
        seed: g.seed,
    })
}

fn bar(len: u64, quiet: bool, what: &str) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {msg} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .expect("valid template"),
    );
    bar.set_message(what.to_string());
    bar
}

/// Outputs of `spec` for every prompt: read from `file`, or generated.
fn outputs_of(
    spec: &str,
    file: Option<&std::path::Path>,
    prompts: &[EvalPrompt],
    g: &EvalGenerationArgs,
    global: &GlobalArgs,
    quiet: bool,
) -> Result<Vec<Vec<String>>> {
    if let Some(f) = file {
        return read_outputs(f, prompts.len(), g.samples_per_prompt);
    }
    let model = super::load_model(spec, global)?;
    let progress = bar((prompts.len() * g.samples_per_prompt) as u64, quiet, &format!("generating with {spec}"));
    let out = generate_outputs(&model, prompts, g.samples_per_prompt, &sampling(g)?, g.batch_size, &progress)?;
    progress.finish_and_clear();
    Ok(out)
}

/// `candor eval winrate`; also the evaluation step of `candor run`.
pub fn winrate(args: &WinrateArgs, global: &GlobalArgs, quiet: bool) -> Result<Summary> {
    let started = Instant::now();
    sampling(&args.generation)?;
    let prompts = read_prompts(&args.prompts)?;
    if prompts.is_empty() {
        bail!("`{}` holds no prompts", args.prompts.display());
    }
    // Build the judge first: a bad `--judge` fails before any generation.
    let judge = crate::judge::from_spec(&args.judge.judge, &args.judge.options(), &super::load_options(global)?)?;
    let model_outputs = outputs_of(&args.model, args.outputs.as_deref(), &prompts, &args.generation, global, quiet)?;
    let baseline_outputs =
        outputs_of(&args.baseline, args.baseline_outputs.as_deref(), &prompts, &args.generation, global, quiet)?;
    let progress = bar(
        (prompts.len() * args.generation.samples_per_prompt) as u64,
        quiet,
        &format!("judging with {}", judge.name()),
    );
    let summary = judge_and_summarise(
        judge.as_ref(),
        &prompts,
        &model_outputs,
        &baseline_outputs,
        (&args.model, &args.baseline),
        args.generation.seed,
        &args.output,
        &progress,
    )?;
    progress.finish_and_clear();
    if let Some(failure) = judge.failure() {
        eprintln!(
            "candor: warning: {} of {} comparisons had no verdict (left out of the rates): {failure}",
            summary.unparsed,
            summary.unparsed + summary.overall.comparisons
        );
    }
    print!("{}", table(&summary));
    println!(
        "wrote {}/{{annotations.jsonl, summary.json, winrate.svg}} in {:.0} s",
        args.output.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(summary)
}

/// `candor eval`: accuracy (verifier) or mean reward (reward model) of one model's outputs.
fn single(args: &EvalArgs, global: &GlobalArgs) -> Result<()> {
    let (Some(model), Some(prompts_path), Some(judge_args)) = (&args.model, &args.prompts, &args.judge) else {
        bail!("`candor eval` needs --model, --prompts and --judge (or use `candor eval winrate`)");
    };
    sampling(&args.generation)?;
    let prompts = read_prompts(prompts_path)?;
    if prompts.is_empty() {
        bail!("`{}` holds no prompts", prompts_path.display());
    }
    let judge = crate::judge::from_spec(&judge_args.judge, &judge_args.options(), &super::load_options(global)?)?;
    let outputs = outputs_of(model, args.outputs.as_deref(), &prompts, &args.generation, global, false)?;
    // Every output with the prompt it answers, in order.
    let answered: Vec<(&EvalPrompt, &str)> =
        prompts.iter().zip(&outputs).flat_map(|(p, outs)| outs.iter().map(move |o| (p, o.as_str()))).collect();
    let items: Vec<(&crate::data::Text, &serde_json::Map<String, serde_json::Value>, &str)> =
        answered.iter().map(|(p, o)| (&p.prompt, &p.row, *o)).collect();
    // IFEval rows are read before scoring, so that a bad one is named with its line.
    let ifeval: Vec<_> = if reports_ifeval(judge.as_ref()) {
        ifeval_results(&prompts, &outputs)?.into_iter().flatten().collect()
    } else {
        vec![None; answered.len()]
    };
    let ifeval_report = Report::new(ifeval.iter().flatten());
    let Some(scores) = judge.score(&items)? else {
        bail!("`{}` compares two outputs; scoring one model needs a verifier: or rm: judge (or use `candor eval winrate`)", judge.name());
    };
    let metric = if judge_args.judge.starts_with("verifier:") { "accuracy" } else { "mean_reward" };
    let mut per_task: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for ((p, _), s) in answered.iter().zip(&scores) {
        let e = per_task.entry(p.task()).or_default();
        e.0 += s;
        e.1 += 1;
    }
    let mean = scores.iter().fold(0.0, |a, b| a + b) / scores.len().max(1) as f64;
    for (task, (sum, n)) in &per_task {
        println!("{task:<18} {metric} {:.3} ({n} outputs)", sum / *n as f64);
    }
    println!("{:<18} {metric} {mean:.3} ({} outputs, judge {})", "overall", scores.len(), judge.name());
    if let Some(report) = &ifeval_report {
        print!("{}", report.table(model));
    }
    if let Some(dir) = &args.output {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
        let mut lines = crate::data::JsonLines::create(Some(&dir.join("scores.jsonl")))?;
        for (((p, out), s), result) in answered.iter().zip(&scores).zip(&ifeval) {
            let mut line = json!({"line": p.line, "task": p.task(), "output": out, "score": s});
            if let Some(result) = result {
                line["ifeval"] = serde_json::to_value(result)?;
            }
            lines.write(&line)?;
        }
        lines.finish()?;
        let mut summary = json!({
            "model": model, "judge": judge.name(), metric: mean, "outputs": scores.len(),
            "per_task": per_task.iter().map(|(t, (sum, n))| (t.clone(), json!({metric: sum / *n as f64, "outputs": n}))).collect::<serde_json::Map<_, _>>(),
        });
        if let Some(report) = &ifeval_report {
            summary["ifeval"] = serde_json::to_value(report)?;
        }
        std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    }
    Ok(())
}

//! `candor eval winrate`: generate with both models (or read their outputs), judge every pair,
//! and summarise: wins/ties/losses, win-rate with a bootstrap interval, length-controlled
//! win-rate, average lengths, per-task breakdown, and IFEval's accuracies of each side on IFEval
//! rows under a verifier judge; `annotations.jsonl`, `summary.json` and a plot in the output
//! directory.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::stats::{length_controlled_win_rate, win_rate, WinRate};
use crate::data::{read_jsonl, Example, SequenceTokenizer, Text, Truncation};
use crate::generate::{completion_text, generate, SamplingConfig};
use crate::judge::ifeval::{IfevalRow, Report, RowResult};
use crate::judge::Outcome;
use crate::judge::{Case, Judge, Judgment};
use crate::load::LoadedModel;

/// One evaluation prompt and its row.
#[derive(Debug, Clone)]
pub struct EvalPrompt {
    /// Line in the prompts file.
    pub line: usize,
    /// The prompt.
    pub prompt: Text,
    /// All columns (`answer`, `constraint`, `task`, ...).
    pub row: Map<String, Value>,
}

impl EvalPrompt {
    /// The row's `task`, or `all`.
    pub fn task(&self) -> String {
        self.row.get("task").and_then(Value::as_str).unwrap_or("all").to_string()
    }
}

/// The prompts of a JSONL file: any row with a `prompt` (prompt-only, preference,
/// prompt-completion, unpaired).
pub fn read_prompts(path: &Path) -> Result<Vec<EvalPrompt>> {
    let data = read_jsonl(path, false)?;
    data.rows
        .into_iter()
        .map(|r| {
            let prompt = match r.example {
                Example::Prompt { prompt }
                | Example::Preference { prompt, .. }
                | Example::PromptCompletion { prompt, .. }
                | Example::Unpaired { prompt, .. } => prompt,
                other => {
                    bail!("{}:{}: expected a row with a `prompt`, got a {} row", path.display(), r.line, other.kind())
                }
            };
            Ok(EvalPrompt { line: r.line, prompt, row: r.fields })
        })
        .collect()
}

/// `samples` outputs per prompt from `model`, `batch_size` prompts per batch.
pub fn generate_outputs(
    model: &LoadedModel,
    prompts: &[EvalPrompt],
    samples: usize,
    cfg: &SamplingConfig,
    batch_size: usize,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<Vec<String>>> {
    let tok = SequenceTokenizer {
        tokenizer: &model.tokenizer,
        chat_template: model.chat_template.as_ref(),
        truncation: Truncation::default(),
    };
    let ids = prompts.iter().map(|p| tok.prompt_ids(&p.prompt)).collect::<Result<Vec<_>>>()?;
    let mut out = vec![Vec::with_capacity(samples); prompts.len()];
    for s in 0..samples {
        let cfg = SamplingConfig { seed: cfg.seed.wrapping_add(s as u64), ..*cfg };
        for (chunk_index, chunk) in ids.chunks(batch_size.max(1)).enumerate() {
            let gens = generate(&model.model, chunk, &model.eos_token_ids, model.tokenizer.pad_id(), &cfg, |_, _| {})?;
            for (i, g) in gens.iter().enumerate() {
                out[chunk_index * batch_size.max(1) + i].push(completion_text(&model.tokenizer, g)?);
            }
            progress.inc(chunk.len() as u64);
        }
    }
    Ok(out)
}

/// Outputs written by `candor generate --prompts` (a `completion` per line), `samples` lines per
/// prompt in prompt order.
pub fn read_outputs(path: &Path, prompts: usize, samples: usize) -> Result<Vec<Vec<String>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read outputs `{}`", path.display()))?;
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    if lines.len() != prompts * samples {
        bail!(
            "`{}` has {} outputs; expected {} ({} prompts x {} samples)",
            path.display(),
            lines.len(),
            prompts * samples,
            prompts,
            samples
        );
    }
    let outputs = lines
        .iter()
        .map(|(i, l)| {
            let v: Value =
                serde_json::from_str(l).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
            v.get("completion")
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("{}:{}: field `completion`: missing or not a string", path.display(), i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(outputs.chunks(samples).map(<[String]>::to_vec).collect())
}

/// IFEval's results of each output (per prompt, per sample), `None` where the prompt's row is not
/// an IFEval row; an error names the prompt's line and the bad field.
pub fn ifeval_results(prompts: &[EvalPrompt], outputs: &[Vec<String>]) -> Result<Vec<Vec<Option<RowResult>>>> {
    prompts
        .iter()
        .zip(outputs)
        .map(|(p, outs)| {
            let row = IfevalRow::from_row(&p.row).with_context(|| format!("prompts line {}", p.line))?;
            Ok(outs.iter().map(|o| row.as_ref().map(|r| r.evaluate(o))).collect())
        })
        .collect()
}

/// Whether a judge is a verifier, whose evaluations also report IFEval's accuracies.
pub fn reports_ifeval(judge: &dyn Judge) -> bool {
    judge.name().starts_with("verifier:")
}

/// A win-rate over some comparisons.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    /// Comparisons with a readable verdict.
    pub comparisons: usize,
    /// Wins, ties, losses, win-rate and its interval.
    #[serde(flatten)]
    pub rate: WinRate,
}

/// What `summary.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The evaluated model.
    pub model: String,
    /// The baseline.
    pub baseline: String,
    /// The judge.
    pub judge: String,
    /// Prompts evaluated.
    pub prompts: usize,
    /// Outputs per prompt and model.
    pub samples_per_prompt: usize,
    /// Judgments with no readable verdict (left out of the rates).
    pub unparsed: usize,
    /// All comparisons.
    #[serde(flatten)]
    pub overall: Breakdown,
    /// The win-rate at equal output lengths (logistic fit on the length difference).
    pub length_controlled_win_rate: f64,
    /// Mean output length in characters: `{model, baseline}`.
    pub avg_length: BTreeMap<String, f64>,
    /// Per `task` of the rows.
    pub per_task: BTreeMap<String, Breakdown>,
    /// IFEval's accuracies of each side (`model`, `baseline`) on the IFEval rows, under a
    /// verifier judge; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifeval: Option<BTreeMap<String, Report>>,
}

/// Judge every (prompt, sample) pair and summarise; writes `annotations.jsonl`,
/// `summary.json` and `winrate.svg` into `out_dir`. When no comparison got a verdict (a judge
/// server that refuses or fails every request) only the annotations are written and the error
/// says why (the HTTP status and the server's message); a summary never holds a number that is
/// not finite.
#[allow(clippy::too_many_arguments)]
pub fn judge_and_summarise(
    judge: &dyn Judge,
    prompts: &[EvalPrompt],
    model_outputs: &[Vec<String>],
    baseline_outputs: &[Vec<String>],
    names: (&str, &str),
    seed: u64,
    out_dir: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<Summary> {
    let mut cases = Vec::new();
    let mut owners = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for (s, (m, b)) in model_outputs[i].iter().zip(&baseline_outputs[i]).enumerate() {
            cases.push(Case { prompt: &p.prompt, row: &p.row, model: m, baseline: b });
            owners.push((i, s));
        }
    }
    if cases.is_empty() {
        bail!("nothing to judge: no prompts with outputs of both models");
    }
    // IFEval rows are read before judging, so that a bad one is named with its line.
    let ifeval = if reports_ifeval(judge) {
        Some([ifeval_results(prompts, model_outputs)?, ifeval_results(prompts, baseline_outputs)?])
    } else {
        None
    };
    let mut judgments: Vec<Judgment> = Vec::with_capacity(cases.len());
    for chunk in cases.chunks(16) {
        judgments.extend(judge.judge(chunk)?);
        progress.inc(chunk.len() as u64);
    }
    std::fs::create_dir_all(out_dir).with_context(|| format!("cannot create `{}`", out_dir.display()))?;
    let mut annotations = crate::data::JsonLines::create(Some(&out_dir.join("annotations.jsonl")))?;
    let mut readable: Vec<(Outcome, f64, String)> = Vec::new();
    for ((case, (i, s)), j) in cases.iter().zip(&owners).zip(&judgments) {
        let p = &prompts[*i];
        let mut line = json!({
            "line": p.line, "task": p.task(), "sample": s,
            "prompt": crate::judge::llm::prompt_text(&p.prompt),
            "model_output": case.model, "baseline_output": case.baseline,
            "outcome": j.outcome, "scores": j.scores, "asked": j.asked,
        });
        if let Some([Some(m), Some(b)]) = ifeval.as_ref().map(|[m, b]| [&m[*i][*s], &b[*i][*s]]) {
            line["ifeval"] = json!({"model": m, "baseline": b});
        }
        annotations.write(&line)?;
        if let Some(o) = j.outcome {
            readable.push((o, case.model.chars().count() as f64 - case.baseline.chars().count() as f64, p.task()));
        }
    }
    annotations.finish()?;
    if readable.is_empty() {
        // No stale summary of an earlier evaluation may stand beside these annotations.
        for stale in ["summary.json", "winrate.svg"] {
            let _ = std::fs::remove_file(out_dir.join(stale));
        }
        let why = match judge.failure() {
            Some(failure) => failure,
            None => {
                let example = judgments
                    .iter()
                    .flat_map(|j| &j.asked)
                    .map(|a| a.raw.as_str())
                    .find(|r| !r.is_empty())
                    .unwrap_or("");
                let example: String = example.chars().take(crate::judge::openai::MESSAGE_CHARS).collect();
                format!("none of its replies named an answer (one of them: {example:?})")
            }
        };
        bail!(
            "the judge `{}` gave no verdict on any of the {} comparisons, so there is no win-rate: {why} (what it answered is in `{}`)",
            judge.name(),
            judgments.len(),
            out_dir.join("annotations.jsonl").display()
        );
    }
    let breakdown = |items: &[&(Outcome, f64, String)]| {
        let outcomes: Vec<Outcome> = items.iter().map(|x| x.0).collect();
        Breakdown { comparisons: outcomes.len(), rate: win_rate(&outcomes, seed) }
    };
    let all: Vec<&(Outcome, f64, String)> = readable.iter().collect();
    let mut per_task = BTreeMap::new();
    for task in readable.iter().map(|x| x.2.clone()).collect::<std::collections::BTreeSet<_>>() {
        let items: Vec<&(Outcome, f64, String)> = readable.iter().filter(|x| x.2 == task).collect();
        per_task.insert(task, breakdown(&items));
    }
    let mean_len = |outs: &[Vec<String>]| {
        let lens: Vec<f64> = outs.iter().flatten().map(|o| o.chars().count() as f64).collect();
        lens.iter().fold(0.0, |a, b| a + b) / lens.len().max(1) as f64
    };
    let summary = Summary {
        model: names.0.to_string(),
        baseline: names.1.to_string(),
        judge: judge.name(),
        prompts: prompts.len(),
        samples_per_prompt: model_outputs.first().map_or(0, Vec::len),
        unparsed: judgments.len() - readable.len(),
        overall: breakdown(&all),
        length_controlled_win_rate: length_controlled_win_rate(
            &readable.iter().map(|x| x.0).collect::<Vec<_>>(),
            &readable.iter().map(|x| x.1).collect::<Vec<_>>(),
        ),
        avg_length: BTreeMap::from([
            ("model".to_string(), mean_len(model_outputs)),
            ("baseline".to_string(), mean_len(baseline_outputs)),
        ]),
        per_task,
        ifeval: ifeval.and_then(|[m, b]| {
            let report = |r: &[Vec<Option<RowResult>>]| Report::new(r.iter().flatten().flatten());
            Some(BTreeMap::from([("model".to_string(), report(&m)?), ("baseline".to_string(), report(&b)?)]))
        }),
    };
    let value = serde_json::to_value(&summary)?;
    // serde_json writes a NaN or an infinity as `null`: none may reach the summary.
    if has_null(&value) {
        bail!("internal error: a summary number is not finite: {value}");
    }
    let text = serde_json::to_string_pretty(&value)?;
    let tmp = out_dir.join("summary.json.partial");
    std::fs::write(&tmp, text).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    std::fs::rename(&tmp, out_dir.join("summary.json"))
        .with_context(|| format!("cannot write `{}`", out_dir.join("summary.json").display()))?;
    super::plot::win_tie_loss(&summary, &out_dir.join("winrate.svg"))?;
    Ok(summary)
}

fn has_null(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.iter().any(has_null),
        Value::Object(o) => o.values().any(has_null),
        _ => false,
    }
}

/// The compact table printed after an evaluation.
pub fn table(s: &Summary) -> String {
    let mut out =
        format!("{:<18} {:>5} {:>5} {:>5} {:>9}  {}\n", "task", "wins", "ties", "losses", "win-rate", "95% CI");
    let row = |name: &str, b: &Breakdown| {
        format!(
            "{:<18} {:>5} {:>5} {:>5} {:>8.1}%  [{:.1}%, {:.1}%]\n",
            name,
            b.rate.wins,
            b.rate.ties,
            b.rate.losses,
            100.0 * b.rate.win_rate,
            100.0 * b.rate.ci95.0,
            100.0 * b.rate.ci95.1
        )
    };
    for (task, b) in &s.per_task {
        out.push_str(&row(task, b));
    }
    out.push_str(&row("overall", &s.overall));
    out.push_str(&format!(
        "length-controlled win-rate {:.1}% | mean length {:.0} vs {:.0} chars | {} unparsed | judge {}\n",
        100.0 * s.length_controlled_win_rate,
        s.avg_length["model"],
        s.avg_length["baseline"],
        s.unparsed,
        s.judge
    ));
    // The model's IFEval table first, then the baseline's.
    for (side, name) in [("model", &s.model), ("baseline", &s.baseline)] {
        if let Some(report) = s.ifeval.as_ref().and_then(|r| r.get(side)) {
            out.push_str(&report.table(&format!("{side} {name}")));
        }
    }
    out
}

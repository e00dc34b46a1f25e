//! `candor plot RUN_DIR`: training curves from `metrics.jsonl`.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::cli::PlotArgs;
use crate::eval::plot::{training_curves, Panel};

/// The metrics drawn when a run logged them, in this order.
const CURVES: &[&str] = &["loss", "rewards/margins", "rewards/accuracies", "accuracy", "margin", "nll/positive"];

/// Run `candor plot`.
pub fn run(args: &PlotArgs) -> Result<()> {
    let path = args.run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1)))
        .collect::<Result<_>>()?;
    let points = |key: &str| -> Vec<(f64, f64)> {
        lines.iter().filter_map(|l| Some((l.get("step")?.as_f64()?, l.get(key)?.as_f64()?))).collect()
    };
    let panels: Vec<Panel> = CURVES
        .iter()
        .map(|m| Panel { metric: m.to_string(), train: points(m), eval: points(&format!("eval_{m}")) })
        .filter(|p| !p.train.is_empty() || !p.eval.is_empty())
        .collect();
    if panels.is_empty() {
        bail!("`{}` has none of the plotted metrics ({})", path.display(), CURVES.join(", "));
    }
    let out = args.output.clone().unwrap_or_else(|| args.run_dir.join("curves.svg"));
    training_curves(&panels, &args.run_dir.display().to_string(), &out)?;
    println!("{}", out.display());
    Ok(())
}

//! `candor score`: rewards of every dataset row under a reward model.

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

use crate::cli::{GlobalArgs, ScoreArgs};
use crate::scoring::score_rewards;

/// Run `candor score`.
pub fn run(args: &ScoreArgs, global: &GlobalArgs) -> Result<()> {
    let rows = super::scored_rows(&args.rows, &args.model, global)?;
    match rows.loaded.model.config().num_labels {
        Some(1) => {}
        Some(n) => bail!("`{}` is a classifier with {n} labels; a reward model has exactly one", args.model),
        None => bail!(
            "`{}` is a causal LM, not a reward model (train one with `candor train --objective reward`)",
            args.model
        ),
    }
    let rewards = score_rewards(&rows.loaded.model, &rows.seqs, rows.loaded.tokenizer.pad_id(), args.rows.batch_size)?;
    let mut rewards = rewards.into_iter();
    let mut out = crate::data::JsonLines::create(args.rows.output.as_deref())?;
    for (row, row_names) in rows.data.rows.iter().zip(&rows.names) {
        let mut obj = Map::new();
        obj.insert("line".into(), json!(row.line));
        for name in row_names {
            let key = if *name == "completion" { "reward".to_string() } else { format!("{name}_reward") };
            obj.insert(key, json!(rewards.next().expect("one reward per sequence")));
        }
        out.write(&Value::Object(obj))?;
    }
    out.finish()
}

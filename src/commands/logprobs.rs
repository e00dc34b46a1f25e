//! `candor logprobs`: summed completion log-probs of every dataset row.

use anyhow::Result;
use serde_json::{json, Map, Value};

use crate::cli::{GlobalArgs, LogprobsArgs};
use crate::scoring::score_sequences;

/// Run `candor logprobs`.
pub fn run(args: &LogprobsArgs, global: &GlobalArgs) -> Result<()> {
    let rows = super::scored_rows(&args.rows, &args.model.model, global)?;
    let device = rows.loaded.model.device().clone();
    let scores =
        score_sequences(&rows.loaded.model, &rows.seqs, rows.loaded.tokenizer.pad_id(), args.rows.batch_size, &device)?;
    let mut scores = scores.into_iter();
    let mut out = crate::data::JsonLines::create(args.rows.output.as_deref())?;
    for (row, row_names) in rows.data.rows.iter().zip(&rows.names) {
        let mut obj = Map::new();
        obj.insert("line".into(), json!(row.line));
        for name in row_names {
            let (logp, count) = scores.next().expect("one score per sequence");
            obj.insert(format!("{name}_logps"), json!(logp));
            obj.insert(format!("{name}_tokens"), json!(count));
        }
        out.write(&Value::Object(obj))?;
    }
    out.finish()
}

//! One module per subcommand: parse arguments into library calls, print results.

pub mod bench;
pub mod critique;
pub mod eval;
pub mod export;
pub mod fetch;
pub mod generate;
pub mod logprobs;
pub mod plot;
pub mod run;
pub mod score;
pub mod student;
pub mod train;

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use candle::{DType, Device};

use crate::cli::{Cli, Command, GlobalArgs};
use crate::load::{self, LoadedModel};

/// Run the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fetch(args) => fetch::run(&args),
        Command::Generate(args) => generate::run(&args, &cli.global),
        Command::Logprobs(args) => logprobs::run(&args, &cli.global),
        Command::Score(args) => score::run(&args, &cli.global),
        Command::Critique(args) => critique::run(&args, &cli.global),
        Command::Train(args) => train::run(&args, &cli.global),
        Command::Export(args) => export::run(&args, &cli.global),
        Command::Eval(args) => eval::run(&args, &cli.global),
        Command::Plot(args) => plot::run(&args),
        Command::Run(args) => run::run(&args, &cli.global),
        Command::Bench(cmd) => bench::run(&cmd, &cli.global),
        Command::Student(cmd) => student::run(&cmd, &cli.global),
    }
}

/// Device and dtype from the global flags.
pub fn device_and_dtype(global: &GlobalArgs) -> Result<(Device, DType)> {
    Ok((load::parse_device(&global.device)?, load::parse_dtype(&global.dtype)?))
}

/// Load `--model` with the global device and dtype.
pub fn load_model(spec: &str, global: &GlobalArgs) -> Result<LoadedModel> {
    let (device, dtype) = device_and_dtype(global)?;
    let mut loaded =
        load::load_model(spec, dtype, &device).with_context(|| format!("failed to load model `{spec}`"))?;
    loaded.model.set_kernels(global.kernels);
    Ok(loaded)
}

/// Where JSON lines go: a file (written whole, then renamed into place) or stdout.
pub struct JsonLines {
    out: Box<dyn Write>,
    finish: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl JsonLines {
    /// Open `path`, or stdout when `None`.
    pub fn create(path: Option<&Path>) -> Result<Self> {
        Ok(match path {
            Some(p) => {
                let partial = p.with_extension("jsonl.partial");
                let f = std::fs::File::create(&partial)
                    .with_context(|| format!("cannot create `{}`", partial.display()))?;
                Self { out: Box::new(std::io::BufWriter::new(f)), finish: Some((partial, p.to_path_buf())) }
            }
            None => Self { out: Box::new(std::io::stdout().lock()), finish: None },
        })
    }

    /// Write one JSON value as a line.
    pub fn write(&mut self, value: &serde_json::Value) -> Result<()> {
        serde_json::to_writer(&mut self.out, value)?;
        self.out.write_all(b"\n")?;
        Ok(())
    }

    /// Flush, and move a file output into place.
    pub fn finish(mut self) -> Result<()> {
        self.out.flush()?;
        drop(self.out);
        if let Some((partial, dest)) = self.finish.take() {
            std::fs::rename(&partial, &dest).with_context(|| format!("cannot write `{}`", dest.display()))?;
        }
        Ok(())
    }
}

/// A dataset tokenized for row-by-row scoring, with the model that scores it.
pub struct ScoredRows {
    /// The rows, in file order.
    pub data: crate::data::Dataset,
    /// The model.
    pub loaded: LoadedModel,
    /// The names of each row's sequences (TRL's `chosen`/`rejected`, or `completion`).
    pub names: Vec<Vec<&'static str>>,
    /// Every row's sequences, flattened in order.
    pub seqs: Vec<crate::data::TokenizedSequence>,
}

/// Read `rows.data` (failing fast, before the model loads), load `model`, and tokenize the
/// sequences every row is scored on; errors name the file and line.
pub fn scored_rows(rows: &crate::cli::RowsArgs, model: &str, global: &GlobalArgs) -> Result<ScoredRows> {
    let data = crate::data::read_jsonl(&rows.data, rows.skip_bad_rows)?;
    report_skipped(&data.skipped);
    let loaded = load_model(model, global)?;
    let t = &rows.truncation;
    let tok = crate::data::SequenceTokenizer {
        tokenizer: &loaded.tokenizer,
        chat_template: loaded.chat_template.as_ref(),
        truncation: crate::data::Truncation {
            max_length: t.max_length,
            max_prompt_length: t.max_prompt_length,
            mode: t.truncation_mode,
        },
    };
    let mut names = Vec::with_capacity(data.rows.len());
    let mut seqs = Vec::new();
    for row in &data.rows {
        let per_row = crate::scoring::row_sequences(&tok, &row.example)
            .with_context(|| format!("{}:{}", rows.data.display(), row.line))?;
        names.push(per_row.iter().map(|(n, _)| *n).collect());
        seqs.extend(per_row.into_iter().map(|(_, s)| s));
    }
    Ok(ScoredRows { data, loaded, names, seqs })
}

/// Report skipped rows on stderr.
pub fn report_skipped(skipped: &[crate::data::DataError]) {
    if skipped.is_empty() {
        return;
    }
    eprintln!("candor: skipped {} bad row(s):", skipped.len());
    for e in skipped.iter().take(10) {
        eprintln!("  {e}");
    }
    if skipped.len() > 10 {
        eprintln!("  ... and {} more", skipped.len() - 10);
    }
}

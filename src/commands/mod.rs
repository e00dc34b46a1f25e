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

use anyhow::{Context, Result};
use candle::{DType, Device};

use crate::cli::{Cli, Command, GlobalArgs};
use crate::data::report_skipped;
use crate::load::{self, LoadOptions, LoadedModel};

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

/// The global flags' device, dtype, kernels and frozen weights' packing, for everything a
/// command loads (the models a command runs are frozen).
pub fn load_options(global: &GlobalArgs) -> Result<LoadOptions> {
    let options = LoadOptions::parse(&global.device, &global.dtype, global.kernels)?;
    Ok(options.with_packing(crate::model::Packing::frozen(global.base_quant)))
}

/// Load `--model` with the global device and dtype, and `--chat-template` when given.
pub fn load_model(spec: &str, global: &GlobalArgs) -> Result<LoadedModel> {
    let mut loaded = load_options(global)?.load(spec)?;
    if let Some(path) = &global.chat_template {
        load::set_chat_template(&mut loaded, path)?;
    }
    Ok(loaded)
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

//! `candor student init`: a distillation student cut from its teacher by keeping a subset of
//! the decoder layers (same embeddings, norm, head and tokenizer), in transformers layout.

use anyhow::{Context, Result};

use crate::cli::{GlobalArgs, StudentCommand, StudentInitArgs};
use crate::model::CausalLm;

/// Run `candor student ...`.
pub fn run(cmd: &StudentCommand, global: &GlobalArgs) -> Result<()> {
    match cmd {
        StudentCommand::Init(args) => init(args, global),
    }
}

fn init(args: &StudentInitArgs, global: &GlobalArgs) -> Result<()> {
    let mut m = super::load_model(&args.from, global)?;
    let total = m.model.config().num_hidden_layers;
    let keep = match (&args.keep_layers, args.num_layers) {
        (Some(layers), _) => layers.clone(),
        (None, Some(n)) => CausalLm::evenly_spaced_layers(total, n)?,
        (None, None) => unreachable!("clap requires one of them"),
    };
    m.model.keep_layers(&keep).context("`--keep-layers`")?;
    let tmp = args.output.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let dtype = m.model.dtype();
    crate::export::write_hf_dir(
        &tmp,
        &m.model,
        &m.tokenizer,
        m.chat_template.as_ref(),
        &m.eos_token_ids,
        dtype,
        crate::export::DEFAULT_MAX_SHARD_BYTES,
    )?;
    if args.output.exists() {
        std::fs::remove_dir_all(&args.output).with_context(|| format!("cannot replace `{}`", args.output.display()))?;
    }
    std::fs::rename(&tmp, &args.output)?;
    let params = m.model.parameter_count();
    eprintln!("candor: kept layers {keep:?} of {total} ({:.1}M parameters)", params as f64 / 1e6);
    println!("{}", args.output.display());
    Ok(())
}

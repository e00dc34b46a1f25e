//! `candor export`: any model candor can load, written as a transformers directory.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::cli::{ExportArgs, GlobalArgs};
use crate::load;
use crate::train::checkpoint;

/// Run `candor export`.
pub fn run(args: &ExportArgs, global: &GlobalArgs) -> Result<()> {
    // A run directory means its newest checkpoint.
    let run_dir = Path::new(&args.checkpoint);
    let spec = match checkpoint::latest(run_dir)? {
        Some((_, dir)) if !run_dir.join("config.json").exists() => dir.display().to_string(),
        _ => args.checkpoint.clone(),
    };
    let dtype = load::parse_dtype(&global.dtype)?;
    let device = load::parse_device(&global.device)?;
    let mut m =
        load::load_model(&spec, candle::DType::F32, &device).with_context(|| format!("failed to load `{spec}`"))?;
    if let Some(path) = &global.chat_template {
        load::set_chat_template(&mut m, path)?;
    }
    let adapters = m.model.lora_adapters();
    let tmp = args.output.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    if args.merge_lora && adapters.is_empty() {
        bail!("`{spec}` has no LoRA adapter to merge");
    }
    if !adapters.is_empty() && !args.merge_lora {
        // An adapter stays an adapter (PEFT's files), unless asked to merge.
        let saved = crate::model::lora::load_adapter(Path::new(&spec))?;
        crate::model::lora::save_adapter(&tmp, &saved.config, &saved.base_model, &adapters)?;
        let base = Path::new(&spec).join(load::ADAPTER_BASE_QUANT);
        if base.exists() {
            std::fs::copy(&base, tmp.join(load::ADAPTER_BASE_QUANT))?;
        }
        load::save_adapter_chat_template(&tmp, m.chat_template.as_ref())?;
    } else {
        if Path::new(&spec).join(load::ADAPTER_BASE_QUANT).exists() {
            eprintln!(
                "candor: the adapter was trained over a quantized base (`{}`): merged into that base dequantized, written in {}; merging back into quantized weights would round the update away (PEFT warns the same)",
                load::ADAPTER_BASE_QUANT,
                global.dtype
            );
        }
        m.model.merge_lora()?;
        crate::export::write_hf_dir(
            &tmp,
            &m.model,
            &m.tokenizer,
            m.chat_template.as_ref(),
            &m.eos_token_ids,
            dtype,
            args.max_shard_size_mb * 1_000_000,
        )?;
    }
    if args.output.exists() {
        std::fs::remove_dir_all(&args.output).with_context(|| format!("cannot replace `{}`", args.output.display()))?;
    }
    std::fs::rename(&tmp, &args.output)?;
    println!("{}", args.output.display());
    Ok(())
}

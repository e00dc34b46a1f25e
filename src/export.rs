//! Writing a model as a transformers directory that transformers and candle load unchanged:
//! `config.json`, `model.safetensors`, tokenizer files, `generation_config.json`, chat template.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle::{DType, Tensor};
use serde_json::json;

use crate::load::{ChatTemplate, TextTokenizer};
use crate::model::CausalLm;

/// Write `model` (weights converted to `dtype`) and its tokenizer files into `dir`.
pub fn write_hf_dir(
    dir: &Path,
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    chat_template: Option<&ChatTemplate>,
    eos_token_ids: &[u32],
    dtype: DType,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let mut config = model.config().clone();
    config.eos_token_ids = eos_token_ids.to_vec();
    let mut hf_config = config.to_hf_json();
    hf_config["torch_dtype"] = json!(dtype_name(dtype));
    write_json(&dir.join("config.json"), &hf_config)?;
    let weights: HashMap<String, Tensor> = model
        .named_weights()
        .into_iter()
        .map(|(n, t)| Ok((n, t.detach().to_dtype(dtype)?.to_device(&candle::Device::Cpu)?)))
        .collect::<Result<_>>()?;
    candle::safetensors::save(&weights, dir.join("model.safetensors"))
        .with_context(|| format!("cannot write `{}`", dir.join("model.safetensors").display()))?;
    tokenizer
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    let mut tok_config = json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings});
    if let Some((text, _)) = &tokenizer.bos {
        tok_config["bos_token"] = json!(text);
    }
    if let Some((text, _)) = &tokenizer.eos {
        tok_config["eos_token"] = json!(text);
    }
    if let Some(pad) = tokenizer.pad.and_then(|id| tokenizer.inner().id_to_token(id)) {
        tok_config["pad_token"] = json!(pad);
    }
    if let Some(t) = chat_template {
        tok_config["chat_template"] = json!(t.source());
        std::fs::write(dir.join("chat_template.jinja"), t.source())?;
    }
    write_json(&dir.join("tokenizer_config.json"), &tok_config)?;
    let eos = match eos_token_ids {
        [one] => json!(one),
        many => json!(many),
    };
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}),
    )?;
    Ok(())
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?).with_context(|| format!("cannot write `{}`", path.display()))
}

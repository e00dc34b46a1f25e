//! Writing a model as a transformers directory that transformers and candle load unchanged:
//! `config.json`, `model.safetensors`, tokenizer files, `generation_config.json`, chat template.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle::{DType, Tensor};
use serde_json::json;

use crate::load::{ChatTemplate, TextTokenizer};
use crate::model::CausalLm;

/// transformers' default `max_shard_size` for `save_pretrained`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Write `model` (weights converted to `dtype`) and its tokenizer files into `dir`; weights
/// past `max_shard_bytes` are split into `model-0000K-of-0000N.safetensors` shards with a
/// `model.safetensors.index.json`, as transformers does.
pub fn write_hf_dir(
    dir: &Path,
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    chat_template: Option<&ChatTemplate>,
    eos_token_ids: &[u32],
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create `{}`", dir.display()))?;
    let mut config = model.config().clone();
    config.eos_token_ids = eos_token_ids.to_vec();
    let mut hf_config = config.to_hf_json();
    hf_config["torch_dtype"] = json!(dtype_name(dtype));
    write_json(&dir.join("config.json"), &hf_config)?;
    let weights: Vec<(String, Tensor)> = model
        .named_weights()?
        .into_iter()
        .map(|(n, t)| Ok((n, t.detach().to_dtype(dtype)?.to_device(&candle::Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let weights = if config.fused_projections { fuse_projections(weights)? } else { weights };
    write_weights(dir, weights, max_shard_bytes)?;
    tokenizer
        .inner()
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("cannot write tokenizer.json: {e}"))?;
    let mut tok_config =
        json!({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_position_embeddings});
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

/// Phi-3's layout: each layer's q/k/v projections saved as one `qkv_proj` and gate/up as one
/// `gate_up_proj` (rows concatenated in that order), as transformers reads them.
fn fuse_projections(weights: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
    const GROUPS: [(&str, &[&str]); 2] = [
        ("self_attn.qkv_proj", &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
        ("mlp.gate_up_proj", &["mlp.gate_proj", "mlp.up_proj"]),
    ];
    let mut by_name: HashMap<String, Tensor> = weights.iter().cloned().collect();
    let mut out = Vec::with_capacity(weights.len());
    for (name, tensor) in weights {
        let fused = GROUPS.iter().find_map(|(fused, parts)| {
            let (layer, rest) = name.rsplit_once(parts[0]).filter(|(_, rest)| !rest.is_empty())?;
            Some((layer.to_string(), rest.to_string(), *fused, *parts))
        });
        match fused {
            Some((layer, kind, fused, parts)) => {
                let pieces: Vec<Tensor> = parts
                    .iter()
                    .map(|p| by_name.remove(&format!("{layer}{p}{kind}")).context("a fused projection lacks a part"))
                    .collect::<Result<_>>()?;
                out.push((format!("{layer}{fused}{kind}"), Tensor::cat(&pieces, 0)?));
            }
            None if GROUPS.iter().any(|(_, parts)| parts.iter().any(|p| name.contains(&format!(".{p}.")))) => {}
            None => out.push((name, tensor)),
        }
    }
    Ok(out)
}

/// Save weights as one file, or as shards of at most `max_shard_bytes` plus an index.
fn write_weights(dir: &Path, weights: Vec<(String, Tensor)>, max_shard_bytes: usize) -> Result<()> {
    let bytes = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let total: usize = weights.iter().map(|(_, t)| bytes(t)).sum();
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0;
    for (name, t) in weights {
        if current > 0 && current + bytes(&t) > max_shard_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += bytes(&t);
        shards.last_mut().expect("one shard").push((name, t));
    }
    let save = |file: &str, shard: Vec<(String, Tensor)>| -> Result<()> {
        let map: HashMap<String, Tensor> = shard.into_iter().collect();
        candle::safetensors::save(&map, dir.join(file))
            .with_context(|| format!("cannot write `{}`", dir.join(file).display()))
    };
    if shards.len() == 1 {
        return save("model.safetensors", shards.pop().expect("one shard"));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.into_iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for (name, _) in &shard {
            weight_map.insert(name.clone(), json!(file));
        }
        save(&file, shard)?;
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)?)
        .with_context(|| format!("cannot write `{}`", path.display()))
}

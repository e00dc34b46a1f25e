//! Hugging Face Hub ids (`org/name[@revision]`) resolved through hf-hub into the standard cache
//! (`HF_HOME`), so a model downloaded once by transformers or candor is found offline.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// Files a model directory may have; only `config.json` and weights are required.
const OPTIONAL_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"];

/// Split `org/name@revision` into id and revision (default `main`).
pub fn parse_hub_id(spec: &str) -> (String, String) {
    match spec.split_once('@') {
        Some((id, rev)) => (id.to_string(), rev.to_string()),
        None => (spec.to_string(), "main".to_string()),
    }
}

/// Download (or find in the cache) every file of a hub model and return the snapshot
/// directory that holds them.
pub fn snapshot_dir(spec: &str) -> Result<PathBuf> {
    let (id, revision) = parse_hub_id(spec);
    let repo = Repo::with_revision(id.clone(), RepoType::Model, revision.clone());
    let offline_hint = |what: &str, e: &dyn std::fmt::Display| {
        anyhow!(
            "cannot fetch `{what}` of hub model `{id}` (revision `{revision}`): {e}\n\
             The Hugging Face Hub may be unreachable from this machine. Download the model elsewhere \
             and pass its local directory instead: `--model /path/to/model-dir` (a directory with \
             config.json, model.safetensors and tokenizer.json), or a `.gguf` file."
        )
    };
    let cache = Cache::from_env().repo(repo.clone());
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let fetch = |file: &str| -> Result<PathBuf> {
        if let Some(p) = cache.get(file) {
            return Ok(p);
        }
        if offline {
            return Err(offline_hint(file, &"not in the local cache and HF_HUB_OFFLINE is set"));
        }
        let api = ApiBuilder::from_env().with_progress(false).build().map_err(|e| offline_hint(file, &e))?;
        api.repo(repo.clone()).get(file).map_err(|e| offline_hint(file, &e))
    };
    let config = fetch("config.json")?;
    let dir = config.parent().expect("cached file has a parent").to_path_buf();
    match fetch("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            let json: serde_json::Value = serde_json::from_str(&text)?;
            let mut shards: Vec<&str> = json["weight_map"]
                .as_object()
                .map(|m| m.values().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                fetch(shard)?;
            }
        }
        Err(_) => {
            fetch("model.safetensors")?;
        }
    }
    for file in OPTIONAL_FILES {
        let _ = fetch(file);
    }
    Ok(dir)
}

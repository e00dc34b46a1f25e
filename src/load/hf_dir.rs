//! A transformers model directory: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja` and `generation_config.json`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle::safetensors::MmapedSafetensors;
use candle::{Device, Tensor};

use crate::model::WeightSource;

/// Memory-mapped safetensors files, read by tensor name.
pub struct SafetensorsWeights {
    files: MmapedSafetensors,
    names: std::collections::HashSet<String>,
}

impl SafetensorsWeights {
    /// Map the weight files of the model directory `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let files = weight_files(dir)?;
        // SAFETY: the files are only read; like every mmap-based loader (transformers included),
        // we rely on nobody truncating them while the model is loading.
        let files_mapped = unsafe { MmapedSafetensors::multi(&files) }
            .with_context(|| format!("failed to read safetensors in `{}`", dir.display()))?;
        let names = files_mapped.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self { files: files_mapped, names })
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&mut self, name: &str) -> candle::Result<Tensor> {
        self.files.load(name, &Device::Cpu)
    }

    fn contains(&self, name: &str) -> bool {
        self.names.contains(name)
    }
}

/// The safetensors files of a model directory: the shards named by
/// `model.safetensors.index.json`, else `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("failed to read `{}`", index.display()))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("invalid JSON in `{}`", index.display()))?;
        let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
            bail!("`{}`: missing field `weight_map`", index.display());
        };
        let mut files: Vec<PathBuf> = Vec::new();
        for v in map.values() {
            let Some(name) = v.as_str() else { bail!("`{}`: `weight_map` values must be file names", index.display()) };
            let p = dir.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "`{}` has neither `model.safetensors` nor `model.safetensors.index.json` (only safetensors weights are supported)",
        dir.display()
    )
}

/// A named weight source over tensors already in memory (GGUF, tests, conversions).
impl WeightSource for std::collections::HashMap<String, Tensor> {
    fn get(&mut self, name: &str) -> candle::Result<Tensor> {
        self.remove(name).ok_or_else(|| candle::Error::Msg(format!("missing weight `{name}`")))
    }

    fn contains(&self, name: &str) -> bool {
        self.contains_key(name)
    }
}

//! A transformers model directory: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja` and `generation_config.json`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle::quantized::GgmlDType;
use candle::safetensors::MmapedSafetensors;
use candle::{Device, Tensor};

use super::TensorHeader;
use crate::model::packed::PackedWeight;
use crate::model::WeightSource;

/// Memory-mapped safetensors files, read by tensor name.
pub struct SafetensorsWeights {
    /// Each file with its mapping.
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// Tensor name -> index into `files`.
    index: HashMap<String, usize>,
}

impl SafetensorsWeights {
    /// Map the weight files of the model directory `dir` and read their headers (no tensor
    /// data is touched). A file that is not valid safetensors (bad header length, bad JSON,
    /// offsets outside the file or inconsistent with a shape) is an error naming that file.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let paths = weight_files(dir)?;
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            // SAFETY: the files are only read; like every mmap-based loader (transformers
            // included), we rely on nobody truncating them while the model is loading.
            let mapped = unsafe { MmapedSafetensors::new(&path) }
                .map_err(|e| anyhow!("{}: not a valid safetensors file: {}", path.display(), without_path(e)))?;
            for (name, _) in mapped.tensors() {
                index.insert(name, files.len());
            }
            files.push((path, mapped));
        }
        Ok(Self { files, index })
    }

    /// Every tensor's shape and dtype as the file headers state them.
    pub fn headers(&self) -> HashMap<String, TensorHeader> {
        let mut out = HashMap::with_capacity(self.index.len());
        for (path, mapped) in &self.files {
            for (name, view) in mapped.tensors() {
                use safetensors::Dtype;
                let float = matches!(view.dtype(), Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64);
                if self.index.get(&name).is_some_and(|&i| self.files[i].0 == *path) {
                    let header = TensorHeader {
                        shape: view.shape().to_vec(),
                        dtype: format!("{:?}", view.dtype()),
                        float,
                        file: path.clone(),
                        display_name: name.clone(),
                    };
                    out.insert(name, header);
                }
            }
        }
        out
    }

    /// The file holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.index.get(name).map(|&i| self.files[i].0.as_path())
    }
}

/// candle's error without its `path: "…"` prefix (the caller names the file itself).
fn without_path(e: candle::Error) -> candle::Error {
    match e {
        candle::Error::WithPath { inner, .. } => *inner,
        e => e,
    }
}

impl WeightSource for SafetensorsWeights {
    fn get(&mut self, name: &str) -> candle::Result<Tensor> {
        let Some(&i) = self.index.get(name) else {
            return Err(candle::Error::Msg(format!("no tensor `{name}` in the weight files")));
        };
        let (path, mapped) = &self.files[i];
        mapped
            .load(name, &Device::Cpu)
            .map_err(|e| candle::Error::Msg(format!("{}: tensor `{name}`: {}", path.display(), without_path(e))))
    }

    fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// bf16 and f16 weights as stored, when that is what `kind` asks (or any kind).
    fn packed(&mut self, name: &str, kind: Option<GgmlDType>) -> candle::Result<Option<PackedWeight>> {
        let Some(&i) = self.index.get(name) else {
            return Ok(None);
        };
        let stored = match self.files[i].1.get(name).map(|view| view.dtype()) {
            Ok(safetensors::Dtype::BF16) => GgmlDType::BF16,
            Ok(safetensors::Dtype::F16) => GgmlDType::F16,
            _ => return Ok(None),
        };
        if kind.is_some_and(|k| k != stored) {
            return Ok(None);
        }
        PackedWeight::quantize(&self.get(name)?, stored).map(Some)
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

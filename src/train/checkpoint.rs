//! Checkpoints: a transformers directory of the policy plus optimizer state and trainer state,
//! written atomically (temporary directory, fsync, rename), so an interrupted run never
//! leaves a half-written checkpoint under a real name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle::Tensor;
use serde::{Deserialize, Serialize};

/// Where a run stands at a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    /// AdamW's step counter (bias correction).
    pub optimizer_steps: u64,
}

/// `checkpoints/step-N` of a run directory.
pub fn checkpoint_dir(run: &Path, step: u64) -> PathBuf {
    run.join("checkpoints").join(format!("step-{step}"))
}

/// The optimizer state's file in a checkpoint.
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The trainer state's file in a checkpoint.
const TRAINER_STATE_FILE: &str = "trainer_state.json";

/// Write a checkpoint: `fill` writes the model files into a temporary directory, which then
/// receives the optimizer state (unless `None`: a model-only checkpoint) and the trainer
/// state, is synced, and is renamed into place.
pub fn save(
    run: &Path,
    state: &TrainerState,
    optimizer: Option<&HashMap<String, Tensor>>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dest = checkpoint_dir(run, state.step);
    let parent = dest.parent().expect("checkpoint has a parent");
    std::fs::create_dir_all(parent)?;
    let tmp = parent.join(format!(".tmp-step-{}", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    fill(&tmp)?;
    if let Some(optimizer) = optimizer {
        candle::safetensors::save(optimizer, tmp.join(OPTIMIZER_FILE))?;
    }
    std::fs::write(tmp.join(TRAINER_STATE_FILE), serde_json::to_string_pretty(state)?)?;
    for entry in std::fs::read_dir(&tmp)? {
        std::fs::File::open(entry?.path())?.sync_all()?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(&dest)?;
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("cannot move checkpoint into `{}`", dest.display()))?;
    std::fs::File::open(parent)?.sync_all()?;
    Ok(dest)
}

/// Write `bytes` to `path` atomically: a temporary file beside it, synced, then renamed, so a
/// reader never sees half a file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move `{}` into place", path.display()))?;
    Ok(())
}

/// The complete checkpoints of a run (`checkpoints/step-N`), oldest first. Temporary
/// directories of an interrupted save are not among them.
fn checkpoints(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = run.join("checkpoints");
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&dir)?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let step = path.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?;
            Some((step, path))
        })
        .collect();
    steps.sort();
    Ok(steps)
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(checkpoints(run)?.pop())
}

/// Read a checkpoint's trainer and optimizer state.
pub fn load_state(dir: &Path) -> Result<(TrainerState, HashMap<String, Tensor>)> {
    let state_path = dir.join(TRAINER_STATE_FILE);
    let text =
        std::fs::read_to_string(&state_path).with_context(|| format!("cannot read `{}`", state_path.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("invalid `{}`", state_path.display()))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    if !opt_path.exists() {
        bail!(
            "checkpoint `{}` holds no optimizer state (the run saved with `save_only_model`), so it cannot be resumed; \
             start a new run from its weights with `--model {}`",
            dir.display(),
            dir.display()
        );
    }
    let opt = candle::safetensors::load(&opt_path, &candle::Device::Cpu)
        .with_context(|| format!("cannot read optimizer state in `{}`", dir.display()))?;
    Ok((state, opt))
}

/// Give `dest` the model files of checkpoint `src` (everything but the optimizer and trainer
/// state and `extra_state` files) as hard links, so a run's `final/` costs no second copy of
/// the weights; files are never rewritten in place, so the links stay valid after the
/// checkpoint is pruned. Copies where the filesystem cannot link.
pub fn link_model_files(src: &Path, dest: &Path, extra_state: &[&str]) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if name_str == OPTIMIZER_FILE
            || name_str == TRAINER_STATE_FILE
            || extra_state.contains(&name_str.as_ref())
            || !entry.file_type()?.is_file()
        {
            continue;
        }
        let target = dest.join(&name);
        if std::fs::hard_link(entry.path(), &target).is_err() {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("cannot copy `{}` to `{}`", entry.path().display(), target.display()))?;
        }
    }
    Ok(())
}

/// Delete all but the newest `keep` checkpoints (`keep == 0` keeps all).
pub fn prune(run: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let steps = checkpoints(run)?;
    let excess = steps.len().saturating_sub(keep);
    for (_, path) in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&path)?;
    }
    Ok(())
}

/// Cut `metrics.jsonl` back to the lines of steps `<= step` (a resumed run rewrites the rest).
pub fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path)?;
    let mut kept = String::new();
    for line in text.lines() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => continue, // a line cut off by the kill
        };
        match v.get("step").and_then(|s| s.as_u64()) {
            Some(s) if s <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            Some(_) => {}
            None => bail!("`{}`: a line without `step`", path.display()),
        }
    }
    std::fs::write(path, kept)?;
    Ok(())
}

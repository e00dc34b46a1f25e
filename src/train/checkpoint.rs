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
    /// Ranks of the run that wrote it (a step's batch is split over them).
    #[serde(default = "one_rank")]
    pub ranks: usize,
}

fn one_rank() -> usize {
    1
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
/// state, is synced, and is renamed into place. Every error names the step and the file (or,
/// for the model files `fill` writes, the directory); a failed save removes its temporary
/// directory, so a full disk is not left fuller and earlier checkpoints stay as they were.
pub fn save(
    run: &Path,
    state: &TrainerState,
    optimizer: Option<&HashMap<String, Tensor>>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dest = checkpoint_dir(run, state.step);
    let parent = dest.parent().expect("checkpoint has a parent");
    let tmp = parent.join(format!(".tmp-step-{}", state.step));
    let result = save_into(&tmp, &dest, parent, state, optimizer, fill);
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result.with_context(|| format!("step {}: cannot save the checkpoint `{}`", state.step, dest.display()))?;
    Ok(dest)
}

fn save_into(
    tmp: &Path,
    dest: &Path,
    parent: &Path,
    state: &TrainerState,
    optimizer: Option<&HashMap<String, Tensor>>,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    std::fs::create_dir_all(parent).with_context(|| format!("cannot create `{}`", parent.display()))?;
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).with_context(|| format!("cannot remove the leftover `{}`", tmp.display()))?;
    }
    std::fs::create_dir_all(tmp).with_context(|| format!("cannot create `{}`", tmp.display()))?;
    fill(tmp).with_context(|| format!("cannot write the model files into `{}`", tmp.display()))?;
    if let Some(optimizer) = optimizer {
        let path = tmp.join(OPTIMIZER_FILE);
        candle::safetensors::save(optimizer, &path).with_context(|| format!("cannot write `{}`", path.display()))?;
    }
    let path = tmp.join(TRAINER_STATE_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(state)?)
        .with_context(|| format!("cannot write `{}`", path.display()))?;
    for entry in std::fs::read_dir(tmp).with_context(|| format!("cannot list `{}`", tmp.display()))? {
        let path = entry?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("cannot sync `{}`", path.display()))?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("cannot replace `{}`", dest.display()))?;
    }
    std::fs::rename(tmp, dest).with_context(|| format!("cannot move checkpoint into `{}`", dest.display()))?;
    std::fs::File::open(parent)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync `{}`", parent.display()))?;
    Ok(())
}

/// Write `bytes` to `path` atomically: a temporary file beside it, synced, then renamed, so a
/// reader never sees half a file (and a failed write, a full disk say, leaves the old file
/// whole). Errors name the file.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("partial");
    let written = std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("cannot write `{}`", path.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("cannot move `{}` into place", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Append `bytes` (one or more whole lines) to `file`, opened for appending, with a single
/// `write_all`: on failure (a full disk) the file is cut back to its previous length, so a
/// reader never keeps a partial line.
pub fn append_whole(file: &mut std::fs::File, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let before = file.metadata()?.len();
    if let Err(e) = file.write_all(bytes) {
        // O_APPEND: the next write goes to the (restored) end.
        let _ = file.set_len(before);
        return Err(e);
    }
    Ok(())
}

/// What a run writes into its directory and `--overwrite` clears: results and state, not the
/// caches that are checked against the data before reuse (`teacher_cache/`, `ref_logps_*.json`,
/// `teacher_outputs.jsonl`, `judge-cache/`).
pub const RUN_FILES: [&str; 11] = [
    "checkpoints",
    "metrics.jsonl",
    "metrics.partial",
    "final",
    ".tmp-final",
    "config.toml",
    "config.partial",
    "rounds",
    "rounds.jsonl",
    "curves.svg",
    "eval",
];

/// Check that `run` may take a new run: it must not exist, be empty, or hold only what a run
/// that failed before its first step leaves (`config.toml`, an empty `metrics.jsonl`). Unless
/// `resume`, a directory holding anything else is refused, or with `overwrite`, cleared of the
/// old run's files ([`RUN_FILES`]).
pub fn prepare_run_dir(run: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if resume {
        return Ok(());
    }
    let entries = match std::fs::read_dir(run) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(_) if run.is_file() => bail!("run directory `{}` is a file", run.display()),
        Err(e) => return Err(e).with_context(|| format!("cannot read the run directory `{}`", run.display())),
    };
    let mut held: Vec<String> = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read the run directory `{}`", run.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let leftover =
            name == "config.toml" || (name == "metrics.jsonl" && entry.metadata().is_ok_and(|m| m.len() == 0));
        if !leftover {
            held.push(name);
        }
    }
    if held.is_empty() {
        return Ok(());
    }
    held.sort();
    if !overwrite {
        let shown = held.iter().take(6).map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let more = if held.len() > 6 { format!(" and {} more", held.len() - 6) } else { String::new() };
        bail!(
            "run directory `{}` is not empty (it holds {shown}{more}); continue the run in it with `--resume`, \
             replace it with `--overwrite` (`run.overwrite = true`), or choose another output directory",
            run.display()
        );
    }
    for name in RUN_FILES {
        let path = run.join(name);
        let removed = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
            Err(_) => continue,
        };
        removed.with_context(|| format!("--overwrite: cannot remove `{}`", path.display()))?;
    }
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
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create `{}`", dest.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("cannot list `{}`", src.display()))? {
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
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
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
    write_atomically(path, kept.as_bytes())
}

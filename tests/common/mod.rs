//! Helpers shared by the integration tests: fixture paths, JSON access, tolerances.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle::{DType, Device};
use candor::load::{load_hf_dir, LoadedModel};
use candor::model::Kernels;
use serde_json::Value;

/// A fresh temporary directory under cargo's per-target scratch space (`CARGO_TARGET_TMPDIR`),
/// on the disk that already holds the build, not on a possibly small `/tmp`: the SmolLM2 runs
/// write checkpoints of hundreds of megabytes.
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("cannot create a scratch directory")
}

/// `tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Parse a JSON fixture.
pub fn json(rel: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(rel)).unwrap()).unwrap()
}

/// A JSON array of numbers as f64.
pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|x| x.as_f64().unwrap()).collect()
}

/// A JSON array of integers as u32.
pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Load a fixture model directory in f32 on the CPU.
pub fn load(rel: &str) -> LoadedModel {
    load_hf_dir(&fixture(rel), DType::F32, &Device::Cpu).unwrap()
}

/// Both kernel paths: every golden test runs on each.
pub const KERNELS: [Kernels; 2] = [Kernels::Plain, Kernels::Fused];

/// [`load`] with the given kernels.
pub fn load_kernels(rel: &str, kernels: Kernels) -> LoadedModel {
    let mut m = load(rel);
    m.model.set_kernels(kernels);
    m
}

/// Assert `|a - b| <= tol` elementwise, naming what differs.
pub fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, want {w} (tolerance {tol})");
    }
}

/// Assert `|a - b| <= tol * max(|b|, 1e-12)` elementwise.
pub fn assert_rel(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * w.abs().max(1e-12), "{what}[{i}]: got {g}, want {w} (relative tolerance {tol})");
    }
}

/// The lines of a run's `metrics.jsonl`.
pub fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The first `n` lines of a repository file `src`, written to `dest`.
pub fn head_lines(src: &str, n: usize, dest: &Path) {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(src)).unwrap();
    std::fs::write(dest, text.lines().take(n).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

/// `candor train --quiet` from the repository root with `args`; panics with its stderr on
/// failure.
pub fn candor_train(args: &[&str]) {
    let o = candor(&[&["train", "--quiet"], args].concat());
    assert!(o.status.success(), "candor train {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Run the `candor` binary from the repository root.
pub fn candor(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_candor"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .unwrap()
}

/// A metric of every line that has it.
pub fn series(lines: &[Value], key: &str) -> Vec<f64> {
    lines.iter().filter_map(|l| l.get(key)?.as_f64()).collect()
}

/// The tiny Llama fixture's three preference pairs (`expected.json`'s `examples`) as JSONL.
pub fn write_examples(path: &Path) {
    let exp = json("llama-tiny/expected.json");
    let rows: String = exp["examples"].as_array().unwrap().iter().map(|ex| format!("{ex}\n")).collect();
    std::fs::write(path, rows).unwrap();
}

//! Data parallelism over MPI (`--features mpi`, Open MPI's `mpirun`) on the tiny Llama: two
//! ranks with gradient accumulation k compute the steps one process computes with 2k (DPO with
//! evaluation, SFT, and NFT's online rounds: metrics and final weights within 1e-6); a killed
//! rank stops the run with its rank named, and the run resumes to the same weights; a stopped
//! rank makes the others' collectives time out naming it; a resume over a different number of
//! ranks is refused.
#![cfg(feature = "mpi")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// `mpirun -np 2 candor train --quiet <args>` (as root where CI runs as root; ranks may share
/// cores).
fn mpirun_train(args: &[String]) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "RAYON_NUM_THREADS=1"])
        .arg(env!("CARGO_BIN_EXE_candor"))
        .args(["train", "--quiet"])
        .args(args);
    cmd
}

/// `candor train --quiet <args>` in one process.
fn one_process(args: &[String]) -> Output {
    candor(&[&["train", "--quiet"], &args.iter().map(String::as_str).collect::<Vec<_>>()[..]].concat())
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn ok(what: &str, o: &Output) {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// DPO with a held-out set on 8 shipped pairs (4 steps of 4 pairs over 2 epochs).
fn dpo_args(dir: &Path, out: &Path) -> Vec<String> {
    dpo_steps(dir, out, 4)
}

/// DPO with a held-out set on 8 shipped pairs, `steps` steps of 4 pairs.
fn dpo_steps(dir: &Path, out: &Path, steps: u64) -> Vec<String> {
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    head_lines("tests/fixtures/shipped-v1/preference/train.jsonl", 8, &train);
    head_lines("tests/fixtures/shipped-v1/preference/test.jsonl", 3, &eval);
    let mut args = strings(&["--objective", "dpo", "--batch-size", "2", "--lr", "1e-3"]);
    args.extend(["--max-steps".to_string(), steps.to_string()]);
    args.extend(strings(&["--seed", "5", "--eval-every", "2", "--sync-check-every", "1"]));
    for (flag, path) in [
        ("--model", fixture("llama-tiny/policy")),
        ("--ref-model", fixture("llama-tiny/reference")),
        ("--data", train),
        ("--eval-data", eval),
        ("--output", out.to_path_buf()),
    ] {
        args.extend([flag.to_string(), path.display().to_string()]);
    }
    args
}

/// SFT on 6 shipped prompt-completion rows (3 steps).
fn sft_args(dir: &Path, out: &Path) -> Vec<String> {
    let train = dir.join("sft.jsonl");
    head_lines("tests/fixtures/shipped-v1/sft/train.jsonl", 6, &train);
    let mut args = strings(&["--objective", "sft", "--batch-size", "1", "--max-steps", "3", "--lr", "1e-3"]);
    args.extend(strings(&["--seed", "2"]));
    args.extend(["--model".into(), fixture("llama-tiny/policy").display().to_string()]);
    args.extend(["--data".into(), train.display().to_string(), "--output".into(), out.display().to_string()]);
    args
}

/// NFT's online rounds: 2 rounds of 6 prompts x 4 samples, one prompt per sampling batch.
fn nft_args(dir: &Path, out: &Path) -> Vec<String> {
    let prompts = tiny_prompts(dir);
    let mut args = strings(&["--objective", "nft", "--batch-size", "2", "--lr", "1e-3", "--seed", "3"]);
    for set in ["online.rounds=2", "online.samples_per_prompt=4", "online.max_new_tokens=6"] {
        args.extend(["--set".into(), set.into()]);
    }
    args.extend(strings(&["--set", "online.sampling_batch_size=4", "--sync-check-every", "1"]));
    args.extend(["--model".into(), fixture("llama-tiny/policy").display().to_string()]);
    args.extend(["--prompts".into(), prompts.display().to_string(), "--output".into(), out.display().to_string()]);
    args
}

fn with_accum(mut args: Vec<String>, k: usize) -> Vec<String> {
    args.extend(["--grad-accum".into(), k.to_string()]);
    args
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-6 * a.abs().max(1.0)
}

/// Every metric of the one-process run (but its speed) equals the two ranks' within 1e-6.
fn assert_same_metrics(what: &str, one: &[Value], two: &[Value]) {
    assert_eq!(one.len(), two.len(), "{what}: metrics lines");
    for (a, b) in one.iter().zip(two) {
        for (key, va) in a.as_object().unwrap() {
            if key == "tokens_per_second" {
                continue;
            }
            let vb = &b[key];
            match (va.as_f64(), vb.as_f64()) {
                (Some(x), Some(y)) => assert!(close(x, y), "{what} step {}: `{key}` {x} vs {y}", a["step"]),
                _ => assert_eq!(va, vb, "{what} step {}: `{key}`", a["step"]),
            }
        }
        assert!(b["allreduce_bytes"].as_u64().unwrap() > 0, "{what}: the ranks' line has the all-reduce cost");
    }
}

/// The largest difference between the final weights of two runs.
fn weight_gap(a: &Path, b: &Path) -> f64 {
    let load =
        |run: &Path| candle::safetensors::load(run.join("final/model.safetensors"), &candle::Device::Cpu).unwrap();
    let (ta, tb) = (load(a), load(b));
    assert_eq!(ta.len(), tb.len());
    let mut gap = 0f64;
    for (name, x) in &ta {
        let diff = (x - &tb[name]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        gap = gap.max(diff.to_dtype(candle::DType::F64).unwrap().to_scalar::<f64>().unwrap());
    }
    gap
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn two_ranks_train_as_one_process_with_twice_the_accumulation() {
    let dir = scratch();
    type Args = fn(&Path, &Path) -> Vec<String>;
    let cases: [(&str, Args); 3] = [("dpo", dpo_args), ("sft", sft_args), ("nft", nft_args)];
    for (name, args) in cases {
        let (one, two) = (dir.path().join(format!("{name}-one")), dir.path().join(format!("{name}-two")));
        ok(name, &one_process(&with_accum(args(dir.path(), &one), 2)));
        let o = mpirun_train(&with_accum(args(dir.path(), &two), 1)).output().unwrap();
        ok(&format!("{name} over 2 ranks"), &o);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert_eq!(stdout.matches("trained ").count(), 1, "{name}: rank 0 alone reports: {stdout}");
        assert_same_metrics(name, &metrics(&one), &metrics(&two));
        let gap = weight_gap(&one, &two);
        assert!(gap <= 1e-6, "{name}: final weights differ by {gap}");
        if name == "dpo" {
            let evals = metrics(&two).iter().filter(|l| l.get("eval_loss").is_some()).count();
            assert_eq!(evals, 2, "evaluated at steps 2 and 4");
        }
        if name == "nft" {
            assert_eq!(lines(&one.join("rounds.jsonl")), lines(&two.join("rounds.jsonl")));
        }
    }
}

/// The pid of rank `rank` of the launch writing into `run` (from /proc).
fn rank_pid(run: &Path, rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let is_rank = environ.split(|&b| b == 0).any(|v| v == want.as_bytes());
        let ours = String::from_utf8_lossy(&cmdline).contains(run.to_str()?);
        (is_rank && ours && String::from_utf8_lossy(&cmdline).contains("candor")).then_some(pid)
    })
}

/// Wait for `path` to exist (panics after 5 minutes).
fn wait_for(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(300), "never reached {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait for `child` to end (panics, killing it, after `limit`); its output.
fn finish_within(mut child: std::process::Child, limit: Duration) -> Output {
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            panic!("the launch did not end within {limit:?} of the fault");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap();
    assert!(status.success(), "kill {sig} {pid}");
}

#[test]
fn a_killed_rank_stops_the_run_naming_it_and_the_run_resumes_to_the_same_weights() {
    let dir = scratch();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let save = strings(&["--save-every", "1"]);
    ok("one process", &one_process(&[with_accum(dpo_steps(dir.path(), &one, 40), 2), save.clone()].concat()));
    let args = [with_accum(dpo_steps(dir.path(), &two, 40), 1), save].concat();
    let child =
        mpirun_train(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for(&two.join("checkpoints/step-2"));
    signal(rank_pid(&two, 1).expect("rank 1 runs"), "-KILL");
    let o = finish_within(child, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && stderr.contains("rank 1"), "the launch should fail naming rank 1: {stderr}");
    assert!(metrics(&two).len() < 40, "the run finished before the kill");

    // One process cannot resume what two ranks started.
    let o = one_process(&strings(&["--resume", two.to_str().unwrap()]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("2 rank(s)") && err.contains("same number of ranks"), "{err}");

    ok("resumed over 2 ranks", &mpirun_train(&strings(&["--resume", two.to_str().unwrap()])).output().unwrap());
    assert_same_metrics("resumed", &metrics(&one), &metrics(&two));
    let gap = weight_gap(&one, &two);
    assert!(gap <= 1e-6, "resumed final weights differ by {gap}");
}

#[test]
fn a_stopped_rank_makes_the_collectives_time_out_naming_it() {
    let dir = scratch();
    let run: PathBuf = dir.path().join("run");
    let args =
        [dpo_steps(dir.path(), &run, 200), strings(&["--save-every", "1", "--collective-timeout", "3"])].concat();
    let child =
        mpirun_train(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    wait_for(&run.join("checkpoints/step-1"));
    let pid = rank_pid(&run, 1).expect("rank 1 runs");
    signal(pid, "-STOP");
    let o = finish_within(child, Duration::from_secs(90));
    let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(stderr.contains("rank 0:") && stderr.contains("did not complete within 3 s"), "{stderr}");
    assert!(stderr.contains("rank 1 did not answer"), "{stderr}");
}

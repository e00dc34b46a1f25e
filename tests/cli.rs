//! The `candor` binary end to end: help texts, the quick-start answer on the real model,
//! JSONL in and out, and the errors a user sees.

mod common;

use std::io::Write;
use std::process::{Command, Output};

use common::*;

fn candor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_candor")).args(args).output().expect("run candor")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn jsonl(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn every_subcommand_has_help_with_examples() {
    for cmd in [&["fetch"][..], &["generate"], &["logprobs"]] {
        let o = candor(&[cmd, &["--help"]].concat());
        assert!(o.status.success());
        assert!(stdout(&o).contains("Examples:"), "{cmd:?}: {}", stdout(&o));
    }
    let o = candor(&["bench", "--help"]);
    assert!(stdout(&o).contains("load") && stdout(&o).contains("generate"));
}

#[test]
fn quick_start_answer_matches_the_fixture() {
    let fetched = candor(&["fetch"]);
    assert!(fetched.status.success(), "{}", stderr(&fetched));
    assert!(stdout(&fetched).trim().ends_with(".gguf"));
    let again = candor(&["fetch"]);
    assert_eq!(stdout(&again), stdout(&fetched), "fetch is idempotent");
    let o = candor(&[
        "generate",
        "--model",
        "default",
        "--chat",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = json("smollm2/reference.json")["greedy_40_text"].as_str().unwrap().to_string();
    assert_eq!(stdout(&o).trim(), want);
}

#[test]
fn generate_from_a_prompts_file_carries_fields_through() {
    let dir = common::scratch();
    let prompts = dir.path().join("prompts.jsonl");
    let mut f = std::fs::File::create(&prompts).unwrap();
    writeln!(f, r#"{{"prompt": "What is the capital of France? Answer in one sentence.", "id": "a"}}"#).unwrap();
    writeln!(f, r#"{{"prompt": [{{"role": "user", "content": "Count from one to twenty."}}], "id": "b"}}"#).unwrap();
    let out = dir.path().join("out.jsonl");
    let o = candor(&[
        "generate",
        "--model",
        "default",
        "--chat",
        "--prompts",
        prompts.to_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = jsonl(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0]["id"].as_str(), rows[1]["id"].as_str()), (Some("a"), Some("b")));
    assert_eq!(rows[0]["completion"], "The capital of France is Paris.");
    assert_eq!(rows[0]["finish_reason"], "eos");
    assert_eq!(rows[0]["completion_tokens"], 8);
    assert_eq!(rows[1]["finish_reason"], "length");
    assert_eq!(rows[1]["completion_tokens"], 12);
    // Same seed, same samples; a different seed changes them.
    let sample = |seed: &str| {
        let o = candor(&[
            "generate",
            "--model",
            "default",
            "--prompt",
            "Once upon a time",
            "--temperature",
            "1.0",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--max-new-tokens",
            "16",
        ]);
        stdout(&o)
    };
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
}

#[test]
fn logprobs_on_a_model_directory_match_transformers() {
    let exp = json("llama-tiny/expected.json");
    let dir = common::scratch();
    let data = dir.path().join("pairs.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    for ex in exp["examples"].as_array().unwrap() {
        writeln!(f, "{ex}").unwrap();
    }
    writeln!(f, r#"{{"prompt": "Question: hi\nAnswer:", "completion": " yes"}}"#).unwrap();
    let model = fixture("llama-tiny/policy");
    let o = candor(&[
        "logprobs",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--batch-size",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = jsonl(&stdout(&o));
    assert_eq!(rows.len(), 4);
    let chosen: Vec<f64> = rows[..3].iter().map(|r| r["chosen_logps"].as_f64().unwrap()).collect();
    let rejected: Vec<f64> = rows[..3].iter().map(|r| r["rejected_logps"].as_f64().unwrap()).collect();
    assert_rel("chosen_logps", &chosen, &f64s(&exp["policy_logps"]["chosen_sum"]), 1e-5);
    assert_rel("rejected_logps", &rejected, &f64s(&exp["policy_logps"]["rejected_sum"]), 1e-5);
    let tokens: Vec<u32> = rows[..3].iter().map(|r| r["chosen_tokens"].as_u64().unwrap() as u32).collect();
    assert_eq!(tokens, u32s(&exp["num_completion_tokens"]["chosen"]));
    assert!(rows[3]["completion_logps"].as_f64().unwrap() < 0.0);
    assert!(rows[3].get("chosen_logps").is_none());
}

#[test]
fn logprobs_on_gguf_agree_across_batch_sizes() {
    let dir = common::scratch();
    let data = dir.path().join("d.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": [{"role": "assistant", "content": "Paris."}], "rejected": [{"role": "assistant", "content": "Berlin."}]}"#,
            "\n",
            r#"{"prompt": "The capital of France is", "completion": " Paris."}"#,
            "\n"
        ),
    )
    .unwrap();
    let run = |bs: &str| {
        jsonl(&stdout(&candor(&[
            "logprobs",
            "--model",
            "default",
            "--data",
            data.to_str().unwrap(),
            "--batch-size",
            bs,
        ])))
    };
    let (one, many) = (run("1"), run("8"));
    let a = one[0]["chosen_logps"].as_f64().unwrap();
    let b = many[0]["chosen_logps"].as_f64().unwrap();
    assert!((a - b).abs() < 1e-3 * a.abs(), "{a} vs {b}");
    assert!(a > one[0]["rejected_logps"].as_f64().unwrap(), "SmolLM2 prefers Paris");
    assert_eq!(one[1]["completion_tokens"], many[1]["completion_tokens"]);
}

#[test]
fn bad_inputs_give_clear_errors_and_exit_code_2() {
    let dir = common::scratch();
    let data = dir.path().join("bad.jsonl");
    std::fs::write(&data, "{\"prompt\": \"q\", \"completion\": \"a\"}\n{\"prompt\": \"q\", \"chosen\": \"a\"}\n")
        .unwrap();
    let model = fixture("llama-tiny/policy");
    let o = candor(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("bad.jsonl:2:") && err.contains("field `rejected`"), "{err}");
    // --skip-bad-rows reports and goes on.
    let o =
        candor(&["logprobs", "--model", model.to_str().unwrap(), "--data", data.to_str().unwrap(), "--skip-bad-rows"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("skipped 1 bad row"));
    assert_eq!(jsonl(&stdout(&o)).len(), 1);

    let o = candor(&["generate", "--model", "/no/such/dir", "--prompt", "hi"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not found"), "{}", stderr(&o));
}

#[test]
fn hub_ids_fail_offline_with_a_way_forward() {
    let home = common::scratch();
    let o = Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(["generate", "--model", "HuggingFaceTB/SmolLM2-135M-Instruct@main", "--prompt", "hi"])
        .env("HF_HOME", home.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("HuggingFaceTB/SmolLM2-135M-Instruct") && err.contains("--model /path/to/model-dir"), "{err}");
}

#[test]
fn bench_prints_one_json_object() {
    let o = candor(&["bench", "load", "--repeats", "1", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["parameters"], 134_515_008);
    assert!(v["load_seconds"].as_f64().unwrap() > 0.0);
    let o = candor(&["bench", "generate", "--batch-size", "2", "--max-new-tokens", "4", "--json"]);
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.iter().map(|r| r["new_tokens"].as_u64().unwrap()).collect::<Vec<_>>(), [4, 8]);
    assert!(results.iter().all(|r| r["decode_tokens_per_second"].as_f64().unwrap() > 0.0));
}

#[test]
fn fetch_without_pip_says_what_is_missing() {
    let home = common::scratch();
    let o = Command::new(env!("CARGO_BIN_EXE_candor"))
        .arg("fetch")
        .env("CANDOR_HOME", home.path())
        .env("PATH", home.path())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert!(err.contains("needs pip") && err.contains("--model PATH"), "{err}");
    let o = candor(&["fetch", "no-such-model"]);
    assert!(stderr(&o).contains("unknown model preset `no-such-model`"), "{}", stderr(&o));
}

/// A wheel at `path` holding `member` with `bytes`.
fn wheel(path: &std::path::Path, member: &str, bytes: &[u8]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    zip.start_file(member, zip::write::SimpleFileOptions::default()).unwrap();
    std::io::Write::write_all(&mut zip, bytes).unwrap();
    zip.finish().unwrap();
}

/// A preset in chunks (Gemma 3's shape) is the chunks in order, or nothing when the hash
/// differs; a missing chunk is named.
#[test]
fn chunked_presets_are_concatenated_in_order_and_hash_checked() {
    use candor::load::default_model::{assemble, Preset, WheelPart};
    const PARTS: &[WheelPart] = &[
        WheelPart { pypi_requirement: "demo-part1", wheel_member: "demo_part1/data/m.gguf.part00" },
        WheelPart { pypi_requirement: "demo-part2", wheel_member: "demo_part2/data/m.gguf.part01" },
    ];
    let dir = common::scratch();
    // Listed out of order, as a directory listing may give them.
    let (w2, w1) = (dir.path().join("demo_part2.whl"), dir.path().join("demo_part1.whl"));
    wheel(&w1, PARTS[0].wheel_member, b"GGUF first half, ");
    wheel(&w2, PARTS[1].wheel_member, b"second half");
    // sha256 of "GGUF first half, second half".
    let sha = "e4c66bf9315b425a1c291a077c28b439365a1917c888000828cddaf3020138df";
    let good = Preset { name: "demo", parts: PARTS, file_name: "m.gguf", sha256: sha };
    let dest = dir.path().join("m.gguf");
    let wheels = [w2.clone(), w1.clone()];
    let err = assemble(&Preset { sha256: "00", ..good }, &wheels, &dest, dir.path()).unwrap_err().to_string();
    assert!(err.contains(&format!("has sha256 {sha}, expected 00; nothing was cached")), "{err}");
    assert!(!dest.exists() && !dir.path().join("m.gguf.partial").exists());
    assemble(&good, &wheels, &dest, dir.path()).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), b"GGUF first half, second half");
    let err = assemble(&good, &[w1], &dir.path().join("n.gguf"), dir.path()).unwrap_err().to_string();
    assert!(err.contains("no downloaded wheel of `demo-part2` has `demo_part2/data/m.gguf.part01`"), "{err}");
}

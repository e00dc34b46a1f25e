//! Distillation: every objective end to end on the tiny Llama (the reference fixture as
//! teacher), the teacher-logits cache, the teacher- and student-generated sources with SCRG,
//! KDRL's rounds, students cut by `candor student init`, and CI-sized SmolLM2 runs in which a
//! 15-layer student's held-out divergence to its 30-layer teacher falls.

mod common;

use std::path::{Path, PathBuf};

use candle::{Device, Tensor};
use candor::model::{CausalLm, ForwardOptions};
use common::*;
use serde_json::Value;

/// Prompt-completion rows for the tiny model.
fn tiny_sequences(dir: &Path, name: &str, words: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let rows: Vec<String> =
        words.iter().map(|w| format!("{{\"prompt\": \"Say {w}\", \"completion\": \" {w} {w} and {w}\"}}")).collect();
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

fn distill_run(objective: &str, dir: &Path, run: &str, extra: &[&str]) -> Vec<Value> {
    let train = tiny_sequences(dir, "train.jsonl", &["apple", "river", "stone", "cloud", "green", "light"]);
    let eval = tiny_sequences(dir, "eval.jsonl", &["water", "tiger"]);
    let out = dir.join(run);
    let paths = [fixture("llama-tiny/policy"), fixture("llama-tiny/reference"), train, eval, out.clone()]
        .map(|p| p.display().to_string());
    let mut args = vec![
        "--objective",
        objective,
        "--model",
        &paths[0],
        "--teacher",
        &paths[1],
        "--data",
        &paths[2],
        "--eval-data",
        &paths[3],
        "--output",
        &paths[4],
    ];
    args.extend(["--batch-size", "3", "--max-steps", "6", "--lr", "1e-2", "--seed", "5"]);
    args.extend(["--eval-every", "6", "--set", "run.eval_on_start=true", "--save-only-model"]);
    args.extend(extra);
    candor_train(&args);
    metrics(&out)
}

/// Held-out KL(teacher ‖ student) before training and at the end.
fn held_out_kl(lines: &[Value]) -> (f64, f64) {
    let kl = series(lines, "eval_distill/forward_kl");
    assert_eq!(lines[0]["step"], 0, "eval_on_start logs step 0 first");
    (kl[0], *kl.last().unwrap())
}

#[test]
fn every_distillation_objective_closes_the_gap_on_the_tiny_llama() {
    let dir = common::scratch();
    // The tiny dataset's completions are not the teacher's: without their NLL terms the runs
    // measure the distillation terms alone.
    let runs = [
        ("kd", "distill/forward_kl", "objective.beta=0"),
        ("sinkd", "sinkd/sinkhorn", "objective.ce_weight=0"),
        ("dac_kl", "dac_kl/kept_mass", "objective.sft_weight=0"),
    ];
    for (objective, own_metric, setting) in runs {
        let lines = distill_run(objective, dir.path(), objective, &["--set", setting]);
        assert_eq!(lines.len(), 7, "{objective}: step 0 and six steps");
        assert!(
            lines[1..].iter().all(|l| l[own_metric].as_f64().is_some_and(f64::is_finite)),
            "{objective}: {}",
            lines[1]
        );
        let (before, after) = held_out_kl(&lines);
        assert!(before > 0.05, "{objective}: policy and reference differ: {before}");
        assert!(after < 0.8 * before, "{objective}: held-out KL should fall: {before} -> {after}");
    }
    // DAC-KL's clipping network trains with the student and is checkpointed beside it, not
    // exported with the model.
    let run = dir.path().join("dac_kl");
    let step = std::fs::read_dir(run.join("checkpoints")).unwrap().next().unwrap().unwrap().path();
    let heads = candle::safetensors::load(step.join("heads.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(heads["dac_kl.clip_net.w1"].dims(), &[32, 64]);
    assert!(!run.join("final/heads.safetensors").exists());
    let lower = series(&metrics(&run), "dac_kl/lower");
    assert!(lower.first() != lower.last(), "the lower bound should move: {lower:?}");
    // A LoRA student: only its adapters learn, and the teacher stays what it was.
    let lines =
        distill_run("kd", dir.path(), "lora", &["--lora-r", "4", "--lora-targets", "q_proj,v_proj,up_proj,down_proj"]);
    let (before, after) = held_out_kl(&lines);
    assert!(after < before, "LoRA: {before} -> {after}");
    assert!(dir.path().join("lora/final/adapter/adapter_model.safetensors").exists());
}

#[test]
fn the_teacher_cache_gives_the_same_run_and_is_reused() {
    let dir = common::scratch();
    let plain = distill_run("kd", dir.path(), "plain", &["--beta", "0.5"]);
    let cached = distill_run("kd", dir.path(), "cached", &["--beta", "0.5", "--teacher-logits-cache"]);
    for key in ["loss", "eval_loss", "distill/forward_kl"] {
        let (a, b) = (series(&plain, key), series(&cached, key));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5 * x.abs().max(1.0), "{key}: {a:?} vs {b:?}");
        }
    }
    let cache = dir.path().join("cached/teacher_cache/train.safetensors");
    let saved = candle::safetensors::load(&cache, &Device::Cpu).unwrap();
    assert_eq!(saved.len(), 12, "ids and states of six sequences");
    // A second run over the same data reads the cache instead of writing it again.
    let written = std::fs::metadata(&cache).unwrap().modified().unwrap();
    // A second run into the same directory must say so (`--overwrite`); the cache stays.
    let again = distill_run("kd", dir.path(), "cached", &["--beta", "0.5", "--teacher-logits-cache", "--overwrite"]);
    assert_eq!(std::fs::metadata(&cache).unwrap().modified().unwrap(), written);
    assert_eq!(series(&again, "loss"), series(&cached, "loss"));
}

#[test]
fn teacher_and_student_generated_sources() {
    let dir = common::scratch();
    let extra = ["--set", "distill.max_new_tokens=5"];
    let lines = distill_run("kd", dir.path(), "seqkd", &[&extra[..], &["--distill-source", "teacher"]].concat());
    assert_eq!(lines.len(), 7);
    let outputs: Vec<Value> = std::fs::read_to_string(dir.path().join("seqkd/teacher_outputs.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outputs.len(), 6);
    assert!(outputs
        .iter()
        .all(|o| o["completion_ids"].as_array().is_some_and(|a| !a.is_empty() && a.len() <= 5)
            && o["prompt"].is_string()));
    for scrg in ["false", "true"] {
        let run = format!("onpolicy-{scrg}");
        let lines = distill_run(
            "kd",
            dir.path(),
            &run,
            &[&extra[..], &["--distill-source", "student", "--set", &format!("distill.scrg={scrg}")]].concat(),
        );
        assert_eq!(lines.len(), 7, "{run}");
        assert!(series(&lines, "loss").iter().all(|l| l.is_finite() && *l >= 0.0));
    }
}

#[test]
fn distillation_settings_and_tokenizers_are_checked() {
    let dir = common::scratch();
    let data = tiny_sequences(dir.path(), "d.jsonl", &["apple"]);
    let run = dir.path().join("r").display().to_string();
    let base = ["train", "--quiet", "--objective", "kd", "--data", data.to_str().unwrap(), "--output", &run];
    let model = fixture("llama-tiny/policy");
    let other = fixture("qwen2-tiny");
    let o = candor(&[&base[..], &["--model", model.to_str().unwrap(), "--teacher", other.to_str().unwrap()]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("do not share a tokenizer"), "{err}");
    let o = candor(&[&base[..], &["--model", model.to_str().unwrap(), "--set", "distill.scrg=true"]].concat());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("distill.source = \"student\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = candor(&[
        "train",
        "--objective",
        "dpo",
        "--data",
        data.to_str().unwrap(),
        "--output",
        "x",
        "--teacher",
        "default",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("`[distill]` applies to distillation objectives"));
}

#[test]
fn kdrl_rounds_score_samples_with_the_teacher() {
    let dir = common::scratch();
    let path = dir.path().join("prompts.jsonl");
    let rows: Vec<String> = ["apple", "river", "stone", "cloud"]
        .iter()
        .map(|w| format!("{{\"prompt\": \"Say {w}\", \"constraint\": {{\"type\": \"regex\", \"value\": \"[ae]\"}}}}"))
        .collect();
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    let run = dir.path().join("kdrl");
    candor_train(&[
        "--objective",
        "kdrl",
        "--model",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--teacher",
        fixture("llama-tiny/reference").to_str().unwrap(),
        "--prompts",
        path.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--judge",
        "verifier:auto",
        "--rounds",
        "2",
        "--samples-per-prompt",
        "4",
        "--set",
        "online.max_new_tokens=6",
        "--batch-size",
        "4",
        "--lr",
        "1e-3",
        "--seed",
        "3",
        "--save-only-model",
    ]);
    let rounds: Vec<Value> = std::fs::read_to_string(run.join("rounds.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rounds.len(), 2);
    let saved: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("rounds/round-0.json")).unwrap()).unwrap();
    let rollouts = saved["rollouts"].as_array().unwrap();
    assert_eq!(rollouts.len(), 16, "every sample is kept: the KD term teaches on all-wrong groups too");
    for r in rollouts {
        assert_eq!(r["teacher_logps"].as_array().unwrap().len(), r["old_logps"].as_array().unwrap().len());
        // Reward-guided masking: no KD on answers the verifier accepts.
        assert_eq!(r["kd"].as_bool().unwrap(), !r["correct"].as_bool().unwrap());
    }
    let lines = metrics(&run);
    let beta = series(&lines, "kdrl/beta");
    assert!(
        (beta[0] - 5e-3).abs() < 1e-9 && beta.windows(2).all(|w| w[1] < w[0]),
        "β anneals linearly from 5e-3: {beta:?}"
    );
    assert!(series(&lines, "kdrl/kl").iter().all(|k| *k > 0.0));
}

#[test]
fn student_init_keeps_the_chosen_layers_in_hf_layout() {
    let dir = common::scratch();
    let out = dir.path().join("student");
    let o = candor(&[
        "student",
        "init",
        "--from",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--keep-layers",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 1);
    let names = candle::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(
        names.contains_key("model.layers.0.self_attn.q_proj.weight")
            && !names.contains_key("model.layers.1.self_attn.q_proj.weight")
    );
    // The exported student computes what the teacher's layer 1 alone computes.
    let mut teacher = load("llama-tiny/policy");
    let layer1 = names["model.layers.0.mlp.down_proj.weight"].to_vec2::<f32>().unwrap();
    let original = candle::safetensors::load(fixture("llama-tiny/policy/model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(layer1, original["model.layers.1.mlp.down_proj.weight"].to_vec2::<f32>().unwrap());
    teacher.model.keep_layers(&[1]).unwrap();
    let student = candor::load::load_model(out.to_str().unwrap(), candle::DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[5u32, 17, 42, 7]], &Device::Cpu).unwrap();
    let a: Vec<f32> =
        teacher.model.forward(&ids, ForwardOptions::default(), None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> =
        student.model.forward(&ids, ForwardOptions::default(), None).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a, b);
    let o = candor(&[
        "student",
        "init",
        "--from",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--keep-layers",
        "1,0",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("strictly increasing"));
    assert_eq!(
        CausalLm::evenly_spaced_layers(30, 15).unwrap(),
        vec![0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    );
    assert_eq!(CausalLm::evenly_spaced_layers(30, 2).unwrap(), vec![0, 29]);
    assert!(CausalLm::evenly_spaced_layers(2, 3).is_err());
}

/// A CI-sized distillation of SmolLM2-135M into a 15-layer student with `recipe`: the student's
/// held-out KL to the teacher must fall by at least half of its starting value.
fn smollm2_student(recipe: &str) {
    let dir = common::scratch();
    let (train, eval) = (dir.path().join("train.jsonl"), dir.path().join("eval.jsonl"));
    head_lines("tests/fixtures/shipped-v1/sft/train.jsonl", 96, &train);
    head_lines("tests/fixtures/shipped-v1/sft/test.jsonl", 24, &eval);
    let run = dir.path().join("run");
    candor_train(&[
        "--config",
        recipe,
        "--data",
        train.to_str().unwrap(),
        "--eval-data",
        eval.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--max-steps",
        "12",
        "--eval-every",
        "12",
        "--warmup-steps",
        "2",
        "--save-only-model",
    ]);
    let (before, after) = held_out_kl(&metrics(&run));
    assert!(before > 5.0, "{recipe}: a 15-layer cut starts far from its teacher: {before}");
    assert!(after < 0.5 * before, "{recipe}: held-out KL should fall by half: {before} -> {after}");
}

#[test]
fn kd_on_smollm2_halves_a_15_layer_students_held_out_kl() {
    smollm2_student("configs/kd.toml");
}

#[test]
fn sinkd_on_smollm2_halves_a_15_layer_students_held_out_kl() {
    smollm2_student("configs/sinkd.toml");
}

#[test]
fn dac_kl_on_smollm2_halves_a_15_layer_students_held_out_kl() {
    smollm2_student("configs/dac_kl.toml");
}

/// A CI-sized KDRL run on SmolLM2 with a 15-layer student and a strong, constant KD weight: the
/// reverse-KL estimate on the student's own samples falls from round to round.
#[test]
fn kdrl_on_smollm2_pulls_a_15_layer_student_toward_its_teacher() {
    let dir = common::scratch();
    let prompts = dir.path().join("prompts.jsonl");
    head_lines("tests/fixtures/shipped-v1/preference/train.jsonl", 8, &prompts);
    let run = dir.path().join("run");
    candor_train(&[
        "--config",
        "configs/kdrl.toml",
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--save-only-model",
        "--student-num-layers",
        "15",
        "--rounds",
        "3",
        "--lr",
        "1e-4",
        "--set",
        "online.prompts_per_round=0",
        "--set",
        "online.max_new_tokens=24",
        "--set",
        "objective.beta_start=1.0",
        "--set",
        "objective.beta_schedule=\"constant\"",
        "--set",
        "objective.kd_masking=\"none\"",
    ]);
    let lines = metrics(&run);
    let by_round = |r: u64| -> f64 {
        let kl: Vec<f64> = lines.iter().filter(|l| l["round"] == r).map(|l| l["kdrl/kl"].as_f64().unwrap()).collect();
        kl.iter().sum::<f64>() / kl.len() as f64
    };
    let (first, last) = (by_round(1), by_round(3));
    assert!(last < 0.8 * first, "k2 to the teacher on the student's samples should fall: {first} -> {last}");
}

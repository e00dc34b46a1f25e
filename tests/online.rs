//! The online loop (INPO, DNO, NFT): rounds of sampling, judging and training on the tiny
//! Llama, a run killed inside a round that resumes to the same result, and CI-sized runs on
//! SmolLM2 in which each method's own signal moves the right way.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

fn online_command(objective: &str, prompts: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_candor"));
    cmd.args(["train", "--quiet", "--objective", objective, "--model", fixture("llama-tiny/policy").to_str().unwrap()]);
    cmd.args(["--prompts", prompts.to_str().unwrap(), "--output", out.to_str().unwrap()]);
    cmd.args([
        "--set",
        "online.rounds=3",
        "--set",
        "online.samples_per_prompt=4",
        "--set",
        "online.max_new_tokens=6",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--seed",
        "3",
    ]);
    cmd.args(extra);
    cmd
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn every_online_objective_runs_rounds_and_logs_them() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    for objective in ["inpo", "dno", "nft", "grpo"] {
        let run = dir.path().join(objective);
        let o = online_command(objective, &prompts, &run, &["--save-only-model"]).output().unwrap();
        assert!(o.status.success(), "{objective}: {}", String::from_utf8_lossy(&o.stderr));
        let rounds = lines(&run.join("rounds.jsonl"));
        assert_eq!(rounds.len(), 3, "{objective}");
        for (i, r) in rounds.iter().enumerate() {
            assert_eq!(r["round"], i as u64 + 1);
            assert_eq!(r["samples"], 24, "6 prompts x 4 samples");
            let accuracy = r["accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&accuracy));
            assert_eq!(r.get("win_rate_vs_previous").is_some(), i > 0, "{objective} round {i}");
        }
        let steps = lines(&run.join("metrics.jsonl"));
        assert!(!steps.is_empty() && steps.iter().all(|s| s["round"].as_u64().is_some()), "{objective}");
        // The first step of a round sees the policy the round sampled with: the previous
        // iterate's log-probs equal the policy's, so the loss has its starting value.
        let first = &steps[0];
        match objective {
            "nft" => assert!((first["nft/ratio"].as_f64().unwrap() - 1.0).abs() < 1e-5, "{first}"),
            "dno" => assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "{first}"),
            // Ratio 1 everywhere: nothing clipped.
            "grpo" => assert_eq!(first["clip_ratio/region_mean"].as_f64(), Some(0.0), "{first}"),
            // h = 0 at the start: (0 − η/2)² with η = 1.
            _ => assert!((first["loss"].as_f64().unwrap() - 0.25).abs() < 1e-4, "{first}"),
        }
        assert!(run.join("rounds/round-2.json").exists() && run.join("final/model.safetensors").exists());
    }
}

#[test]
fn grpo_sums_weighted_judges_and_logs_trls_round_metrics() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let run = dir.path().join("grpo");
    let judge = "verifier:auto + 0.5*verifier:regex";
    let extra = ["--judge", judge, "--beta", "0.04", "--loss-type", "grpo", "--save-only-model"];
    let o = online_command("grpo", &prompts, &run, &extra).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rounds = lines(&run.join("rounds.jsonl"));
    let data: Value = serde_json::from_str(&std::fs::read_to_string(run.join("rounds/round-0.json")).unwrap()).unwrap();
    let samples: Vec<&Value> = data["samples"].as_array().unwrap().iter().flat_map(|p| p.as_array().unwrap()).collect();
    // Each sample's score is 1 x the first judge's + 0.5 x the second's, and both judge the
    // same constraint here.
    for s in &samples {
        let parts = f64s(&s["parts"]);
        assert_eq!(parts.len(), 2);
        assert_eq!(s["score"].as_f64().unwrap(), parts[0] + 0.5 * parts[1]);
    }
    let scores: Vec<f64> = samples.iter().map(|s| s["score"].as_f64().unwrap()).collect();
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    assert!((rounds[0]["reward"].as_f64().unwrap() - mean).abs() < 1e-12, "{} vs {mean}: {scores:?}", rounds[0]);
    for key in ["reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio"] {
        assert!(rounds[0][key].as_f64().is_some(), "no `{key}` in {}", rounds[0]);
    }
    assert!(rounds[0]["rewards/verifier:auto/mean"].as_f64().is_some(), "{}", rounds[0]);
    // Advantages are normalised within each prompt's 4 samples: they sum to 0 per group.
    let rollouts = data["rollouts"].as_array().unwrap();
    for group in rollouts.chunks(4) {
        let sum: f64 = group.iter().map(|r| r["advantage"].as_f64().unwrap()).sum();
        assert!(sum.abs() < 1e-5, "{sum}");
        assert!(group.iter().all(|r| !r["reference_logps"].as_array().unwrap().is_empty()), "β > 0 records π_ref");
    }
    // At the round's first step the policy is the reference: the KL term is exactly 0.
    let steps = lines(&run.join("metrics.jsonl"));
    assert_eq!(steps[0]["kl"].as_f64(), Some(0.0), "{}", steps[0]);
}

#[test]
fn soft_dno_learns_from_the_judges_scores_of_each_pair() {
    // The verifier scores answers 1 or 0, so every pair's score gap is 1 and its soft target is
    // q = σ(1). At a round's first step the policy is π_t (d = 0), so dL/dd is −(q − ½) for soft
    // DNO and −½ for DNO-Prct: the first step's gradient norm shrinks by exactly 2σ(1) − 1.
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let first_step = |soft: bool| -> Value {
        let run = dir.path().join(format!("dno-soft-{soft}"));
        let o = online_command(
            "dno",
            &prompts,
            &run,
            &["--save-only-model", "--set", "online.rounds=1", "--set", &format!("objective.soft={soft}")],
        )
        .output()
        .unwrap();
        assert!(o.status.success(), "soft={soft}: {}", String::from_utf8_lossy(&o.stderr));
        lines(&run.join("metrics.jsonl")).remove(0)
    };
    let (hard, soft) = (first_step(false), first_step(true));
    assert!((soft["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "{soft}");
    let want = 2.0 / (1.0 + (-1.0f64).exp()) - 1.0;
    let ratio = soft["grad_norm"].as_f64().unwrap() / hard["grad_norm"].as_f64().unwrap();
    assert!((ratio - want).abs() < 1e-4, "gradient norm ratio {ratio}, want {want}");
}

#[test]
fn an_online_run_killed_inside_a_round_resumes_identically() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let full = dir.path().join("full");
    let o = online_command("nft", &prompts, &full, &["--save-every", "1"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = lines(&full.join("metrics.jsonl"));
    let first_round_steps = want.iter().filter(|l| l["round"] == 1).count();

    // Kill once the second round has taken a step, wherever the run then is.
    let part = dir.path().join("part");
    let mut child = online_command("nft", &prompts, &part, &["--save-every", "1"]).spawn().unwrap();
    let target = part.join(format!("checkpoints/step-{}", first_round_steps + 1));
    let started = std::time::Instant::now();
    while !target.exists() {
        assert!(started.elapsed().as_secs() < 120, "the run never reached {}", target.display());
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let stopped_at = lines(&part.join("metrics.jsonl")).len();
    assert!(stopped_at < want.len(), "the run finished before it was killed");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_candor"))
        .args(["train", "--quiet", "--resume", part.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = lines(&part.join("metrics.jsonl"));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        for key in ["step", "round", "lr", "loss", "grad_norm", "nft/ratio"] {
            assert_eq!(g[key], w[key], "step {}: `{key}` (killed after {stopped_at} lines)", w["step"]);
        }
    }
    assert_eq!(lines(&part.join("rounds.jsonl")), lines(&full.join("rounds.jsonl")));
    let a = std::fs::read(full.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(part.join("final/model.safetensors")).unwrap();
    assert!(a == b, "final weights differ");
}

#[test]
fn online_settings_are_checked_before_anything_loads() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let err = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_candor")).args(args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let out = dir.path().join("x");
    let (p, o) = (prompts.to_str().unwrap(), out.to_str().unwrap());
    assert!(err(&["train", "--objective", "nft", "--output", o]).contains("online.prompts"));
    assert!(err(&["train", "--objective", "nft", "--prompts", p, "--output", o, "--judge", "rm:somewhere"])
        .contains("must be a `verifier:`"));
    assert!(err(&["train", "--objective", "inpo", "--prompts", p, "--output", o, "--teacher-outputs", p])
        .contains("`dno` only"));
    assert!(err(&["train", "--objective", "dpo", "--prompts", p, "--output", o]).contains("online objectives"));
    assert!(err(&["train", "--objective", "dno", "--prompts", p, "--output", o, "--data", p]).contains("not read"));
    assert!(err(&["train", "--objective", "dno", "--prompts", p, "--output", o, "--samples-per-prompt", "1"])
        .contains("at least 2"));
}

#[test]
fn text2grad_runs_token_level_ppo_on_critiqued_samples() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let run = dir.path().join("t2g");
    let o = online_command(
        "text2grad",
        &prompts,
        &run,
        &[
            "--samples-per-prompt",
            "2",
            "--rounds",
            "2",
            "--set",
            "online.epochs_per_round=2",
            "--set",
            "objective.kl_penalty=\"full\"",
        ],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rounds = lines(&run.join("rounds.jsonl"));
    assert_eq!(rounds.len(), 2);
    assert_eq!(rounds[0]["kl_coef"], 0.2, "the first round uses init_kl_coef");
    let adapted = rounds[1]["kl_coef"].as_f64().unwrap();
    assert!(
        adapted != 0.2 && (adapted - 0.2).abs() < 0.2 * 0.2 * 12.0 / 10000.0 + 1e-12,
        "one bounded adaptive step: {adapted}"
    );
    assert_eq!(rounds[0]["critiqued"], 1.0, "the rule critic always answers");
    assert!(rounds[0]["scored_token_fraction"].as_f64().unwrap() > 0.0);
    // A full-vocabulary KL of the policy against itself is 0 before the first update.
    assert!(rounds[0]["kl"].as_f64().unwrap().abs() < 1e-4, "{}", rounds[0]);
    let steps = lines(&run.join("metrics.jsonl"));
    assert!((steps[0]["ppo/ratio"].as_f64().unwrap() - 1.0).abs() < 1e-5, "{}", steps[0]);
    assert_eq!(steps[0]["ppo/clipfrac"], 0.0);
    // approxkl = ½ mean (log π − log π_rollout)²: 0 at each round's first step (the policy
    // is the rollout policy; rounding alone gives under 1e-12), and at every step of the second
    // PPO epoch over a round's samples, after 6 updates at lr 1e-3, more than 1e-3 (measured
    // 0.02 to 0.8): the policy has moved off the rollout policy by a log-ratio of about 0.05 or
    // more, far beyond rounding.
    let kl = |s: &Value| s["ppo/approxkl"].as_f64().unwrap();
    for round in [1, 2] {
        let of_round: Vec<&Value> = steps.iter().filter(|s| s["round"] == round).collect();
        assert!(kl(of_round[0]) < 1e-12, "round {round}'s first step: {}", of_round[0]);
        let second_epoch: Vec<&&Value> = of_round.iter().filter(|s| s["epoch"].as_f64().unwrap() > 1.0).collect();
        assert!(
            !second_epoch.is_empty() && second_epoch.iter().all(|s| kl(s) > 1e-3),
            "round {round}'s second PPO epoch: {second_epoch:?}"
        );
    }
    let heads = candle::safetensors::load(
        run.join(format!("checkpoints/step-{}/heads.safetensors", steps.len())),
        &candle::Device::Cpu,
    )
    .unwrap();
    assert_eq!(heads["v_head.summary.weight"].dims(), &[1, 64]);
    assert!(!run.join("final/heads.safetensors").exists(), "the value head is not part of the exported model");
}

#[test]
fn critique_writes_sft_rows_in_the_reward_models_format() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let out = dir.path().join("critiques.jsonl");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_candor"))
        .args([
            "critique",
            "--model",
            fixture("llama-tiny/policy").to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--max-new-tokens",
            "6",
            "--output",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rows = lines(&out);
    assert_eq!(rows.len(), 12, "6 prompts x 2 answers");
    for r in &rows {
        let request = r["prompt"][0]["content"].as_str().unwrap();
        assert!(request.contains("word_score_list") && request.contains("\"request\":\"Say "), "{request}");
        let critique: Value = serde_json::from_str(r["completion"][0]["content"].as_str().unwrap()).unwrap();
        assert!(critique["textual_feedback"].is_string());
        assert!(critique["word_score_list"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| [-1, 0, 1].contains(&p[1].as_i64().unwrap())));
    }
}

// CI-sized runs on the default model (SmolLM2-135M-Instruct): eight JSON-format prompts of the
// shipped training set, the same prompts every round, so the verifier accuracy of the samples
// is comparable across rounds. The base model mostly answers in prose (about 16% valid JSON at
// temperature 1); one round of each method lifts that.

fn json_prompts(dir: &Path) -> PathBuf {
    let path = dir.join("json.jsonl");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/shipped-v1/preference/train.jsonl"),
    )
    .unwrap();
    let rows: Vec<&str> = text.lines().filter(|l| l.contains("\"task\": \"json\"")).take(8).collect();
    std::fs::write(&path, rows.join("\n") + "\n").unwrap();
    path
}

fn smollm2_rounds(recipe: &str, extra: &[&str]) -> Vec<Value> {
    let dir = common::scratch();
    let prompts = json_prompts(dir.path());
    let run = dir.path().join("run");
    let mut args = vec![
        "--config",
        recipe,
        "--prompts",
        prompts.to_str().unwrap(),
        "--output",
        run.to_str().unwrap(),
        "--save-only-model",
    ];
    args.extend([
        "--rounds",
        "2",
        "--samples-per-prompt",
        "4",
        "--lr",
        "3e-5",
        "--set",
        "online.prompts_per_round=0",
        "--set",
        "online.max_new_tokens=40",
    ]);
    args.extend(extra);
    candor_train(&args);
    let rounds = lines(&run.join("rounds.jsonl"));
    assert_eq!(rounds.len(), 2);
    let accuracy: Vec<f64> = rounds.iter().map(|r| r["accuracy"].as_f64().unwrap()).collect();
    assert!(accuracy[1] > accuracy[0] + 0.2, "{recipe}: sample accuracy should rise across rounds: {accuracy:?}");
    assert!(rounds[1]["win_rate_vs_previous"].as_f64().unwrap() > 0.5, "{recipe}: {}", rounds[1]);
    rounds
}

#[test]
fn nft_on_smollm2_raises_the_verifier_accuracy_of_its_samples() {
    let rounds = smollm2_rounds("configs/nft.toml", &[]);
    assert!(rounds[0]["questions_kept"].as_u64().unwrap() > 0);
}

#[test]
fn dno_on_smollm2_raises_the_verifier_accuracy_of_its_samples() {
    let rounds = smollm2_rounds("configs/dno.toml", &[]);
    assert!(rounds[0]["pairs"].as_u64().unwrap() > 0 && rounds[0]["pair_margin"].as_f64().unwrap() > 0.0);
}

#[test]
fn inpo_on_smollm2_raises_the_verifier_accuracy_of_its_samples() {
    let rounds = smollm2_rounds("configs/inpo.toml", &[]);
    assert!(rounds[0]["pairs"].as_u64().unwrap() > 0);
}

#[test]
fn text2grad_on_smollm2_raises_span_scores_and_accuracy() {
    let rounds = smollm2_rounds("configs/text2grad.toml", &["--set", "online.epochs_per_round=2"]);
    let span: Vec<f64> = rounds.iter().map(|r| r["mean_span_score"].as_f64().unwrap()).collect();
    // A round's mean span score over its 32 samples varies by sampling alone with a standard
    // error of about 0.055 (bootstrap over the samples of a run), so between two rounds of an
    // unchanged policy by about 0.08: a rise of 0.2 is 2.5 of those (one-sided chance ~0.6%).
    // Measured: -0.343 -> 0.082.
    assert!(span[1] > span[0] + 0.2, "the critic's span scores should rise: {span:?}");
}

#[test]
fn dno_pools_take_a_teachers_answers() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let teacher = dir.path().join("teacher.jsonl");
    std::fs::write(&teacher, "{\"completion\": \"a fine answer\"}\n".repeat(6)).unwrap();
    let run = dir.path().join("dno");
    let tiny = fixture("llama-tiny/reference");
    let o = online_command(
        "dno",
        &prompts,
        &run,
        &["--rounds", "1", "--teacher-outputs", teacher.to_str().unwrap(), "--teacher-model", tiny.to_str().unwrap()],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let round: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("rounds/round-0.json")).unwrap()).unwrap();
    for pool in round["samples"].as_array().unwrap() {
        let pool = pool.as_array().unwrap();
        assert_eq!(pool.len(), 6, "4 samples + the file's answer + the teacher model's");
        assert_eq!(pool[4]["text"], "a fine answer");
        assert!(pool[4]["teacher"].as_bool().unwrap() && pool[5]["teacher"].as_bool().unwrap());
        assert_eq!(pool[4]["score"], 1.0, "the verifier accepts the teacher's answer");
    }
    // The file's answer has the top score, so it is never a pair's rejected side, and every pool
    // with a failing answer forms a pair.
    let pairs = round["pairs"].as_array().unwrap();
    assert!(!pairs.is_empty() && pairs.iter().all(|p| p["rejected"] != 4), "{pairs:?}");
    assert_eq!(lines(&run.join("rounds.jsonl"))[0]["samples"], 24, "teacher answers are not counted as the policy's");
}

#[test]
fn text2grad_takes_a_local_model_as_critic_and_never_guesses_its_unreadable_replies() {
    let dir = common::scratch();
    let prompts = tiny_prompts(dir.path());
    let run = dir.path().join("t2g-llm");
    let critic = format!("objective.critic=\"llm:{}\"", fixture("llama-tiny/reference").display());
    let o = online_command(
        "text2grad",
        &prompts,
        &run,
        &["--rounds", "1", "--samples-per-prompt", "1", "--set", &critic, "--set", "objective.kl_penalty=\"kl\""],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let round = &lines(&run.join("rounds.jsonl"))[0];
    // The untrained tiny model writes no word scores: every answer is unscored, and PPO then
    // learns from the KL penalty alone.
    assert_eq!(round["critiqued"], 0.0, "{round}");
    assert_eq!(round["scored_token_fraction"], 0.0);
    assert!(run.join("final/model.safetensors").exists());
}

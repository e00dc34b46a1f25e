//! SPO, CoPG, chain of hindsight and the reward-model trainer through the real CLI: golden
//! values on the tiny Llama fixtures, data handling (unpaired rows, missing rewards), resume,
//! and CI-sized runs on SmolLM2 in which each objective's own signal moves the right way.

mod common;

use std::io::Write;
use std::path::Path;

use candle::Device;
use candor::data::collate;
use candor::train::config::parse_set;
use candor::train::items::{load_items, Item};
use candor::train::TrainConfig;
use common::*;

fn tiny(model: &str) -> String {
    fixture(&format!("llama-tiny/{model}")).display().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn reward_trainer_reproduces_the_fixture_bradley_terry_loss_and_score_its_rewards() {
    let dir = common::scratch();
    let data = dir.path().join("pairs.jsonl");
    write_examples(&data);
    // The fixture's reward model scores its three pairs as transformers does...
    let o = candor(&["score", "--model", &tiny("reward"), "--data", s(&data), "--batch-size", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let exp = json("llama-tiny/expected.json");
    let want = &exp["reward_model"];
    assert_close("chosen_reward", &series(&lines, "chosen_reward"), &f64s(&want["chosen_scores"]), 1e-5);
    assert_close("rejected_reward", &series(&lines, "rejected_reward"), &f64s(&want["rejected_scores"]), 1e-5);
    assert_eq!(lines.iter().map(|l| l["line"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3]);

    // ... and the trainer's first step is TRL RewardTrainer's loss on them.
    let run = dir.path().join("run");
    candor_train(&[
        "--objective",
        "reward",
        "--model",
        &tiny("reward"),
        "--data",
        s(&data),
        "--output",
        s(&run),
        "--batch-size",
        "3",
        "--max-steps",
        "1",
        "--lr",
        "1e-4",
    ]);
    let m = metrics(&run);
    assert_close("loss", &[m[0]["loss"].as_f64().unwrap()], &[want["bradley_terry_loss"].as_f64().unwrap()], 1e-5);
    assert!((m[0]["accuracy"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-9);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForSequenceClassification");
}

#[test]
fn a_causal_lm_gets_a_fresh_score_head_and_is_saved_as_a_classifier() {
    let dir = common::scratch();
    let data = dir.path().join("pairs.jsonl");
    write_examples(&data);
    let run = dir.path().join("run");
    candor_train(&[
        "--objective",
        "reward",
        "--model",
        &tiny("policy"),
        "--data",
        s(&data),
        "--output",
        s(&run),
        "--max-steps",
        "2",
        "--center-rewards-coefficient",
        "0.01",
    ]);
    let weights = candle::safetensors::load(run.join("final/model.safetensors"), &Device::Cpu).unwrap();
    let score = &weights["score.weight"];
    assert_eq!(score.dims(), [1, 64], "one label over the hidden size");
    assert!(!weights.contains_key("lm_head.weight"));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final/config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"], serde_json::json!({"0": "LABEL_0"}));
    // Prompt-completion rows get one `reward` each, in order.
    let rows = dir.path().join("answers.jsonl");
    std::fs::write(
        &rows,
        "{\"prompt\": \"Question: 2 + 2?\\nAnswer:\", \"completion\": \" 4\"}\n{\"text\": \"hello\"}\n",
    )
    .unwrap();
    let o = candor(&["score", "--model", s(&run.join("final")), "--data", s(&rows)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["reward"].as_f64().is_some_and(f64::is_finite)), "{out}");
    // A causal LM is not a reward model.
    let o = candor(&["score", "--model", &tiny("policy"), "--data", s(&rows)]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not a reward model"));
}

/// Unpaired rows of each label, as TRL writes them.
fn write_unpaired(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    for (prompt, completion, label) in [
        ("Question: What color is the sky?\nAnswer:", " Blue.", true),
        ("Question: What color is the sky?\nAnswer:", " Green cheese.", false),
        ("Translate: good morning\nFrench:", " bonjour", true),
    ] {
        writeln!(f, "{}", serde_json::json!({"prompt": prompt, "completion": completion, "label": label})).unwrap();
    }
}

#[test]
fn unpaired_rows_train_chain_of_hindsight_and_are_refused_clearly_elsewhere() {
    let dir = common::scratch();
    let data = dir.path().join("unpaired.jsonl");
    write_unpaired(&data);
    let run = dir.path().join("coh");
    candor_train(&[
        "--objective",
        "hindsight",
        "--model",
        &tiny("policy"),
        "--data",
        s(&data),
        "--output",
        s(&run),
        "--max-steps",
        "2",
        "--batch-size",
        "3",
    ]);
    let m = metrics(&run);
    // Two positive rows and one negative: both classes are scored.
    assert!(m[0]["nll/positive"].as_f64().unwrap() > 0.0 && m[0]["nll/negative"].as_f64().unwrap() > 0.0, "{:?}", m[0]);
    for objective in ["dpo", "sft", "reward"] {
        let o = candor(&[
            "train",
            "--quiet",
            "--objective",
            objective,
            "--model",
            &tiny("policy"),
            "--data",
            s(&data),
            "--output",
            s(&dir.path().join(objective)),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{objective} accepted unpaired rows");
        assert!(
            err.contains("unpaired.jsonl:1") && err.contains("`label`") && err.contains("hindsight"),
            "{objective}: {err}"
        );
    }
}

#[test]
fn copg_needs_rewards_on_every_row_and_names_the_missing_field() {
    let dir = common::scratch();
    let data = dir.path().join("pairs.jsonl");
    write_examples(&data); // no reward columns
    let o = candor(&[
        "train",
        "--quiet",
        "--objective",
        "copg",
        "--model",
        &tiny("policy"),
        "--data",
        s(&data),
        "--output",
        s(&dir.path().join("run")),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pairs.jsonl:1") && err.contains("reward_chosen"), "{err}");
    // With a reward judge the rows are scored before training: the fixture reward model's
    // scores become the rewards.
    let run = dir.path().join("judged");
    let judge = format!("objective.reward_judge=\"rm:{}\"", tiny("reward"));
    candor_train(&[
        "--objective",
        "copg",
        "--model",
        &tiny("policy"),
        "--ref-model",
        &tiny("reference"),
        "--data",
        s(&data),
        "--output",
        s(&run),
        "--batch-size",
        "3",
        "--max-steps",
        "1",
        "--set",
        &judge,
    ]);
    let exp = json("llama-tiny/expected.json");
    let (c, r) = (f64s(&exp["reward_model"]["chosen_scores"]), f64s(&exp["reward_model"]["rejected_scores"]));
    let want = c.iter().zip(&r).map(|(c, r)| c - r).sum::<f64>() / 3.0;
    assert_close(
        "copg/reward_difference",
        &[metrics(&run)[0]["copg/reward_difference"].as_f64().unwrap()],
        &[want],
        1e-5,
    );
}

fn config(extra: &[String]) -> TrainConfig {
    let overrides: Vec<_> = extra.iter().map(|s| parse_set(s).unwrap()).collect();
    TrainConfig::resolve(None, &overrides).unwrap()
}

#[test]
fn hindsight_sequences_mask_feedback_words_and_hide_part_of_the_earlier_answer() {
    let dir = common::scratch();
    let data = dir.path().join("pairs.jsonl");
    write_examples(&data);
    let model = load("llama-tiny/policy");
    let sets = |templates: &str, mask: f64| {
        config(&[
            format!("data.train=\"{}\"", data.display()),
            "run.output=\"unused\"".into(),
            "objective.name=\"hindsight\"".into(),
            format!("objective.templates={templates}"),
            format!("objective.mask_past_max={mask}"),
        ])
    };
    let cfg = sets("[\"good: {pos} bad: {neg}\"]", 1.0);
    let items = load_items(&data, &cfg, &model, None).unwrap();
    let tok = &model.tokenizer;
    let exp = json("llama-tiny/expected.json");
    let mut hid_any = false;
    for (item, ex) in items.iter().zip(exp["examples"].as_array().unwrap()) {
        let Item::Sequence(seq) = item else { panic!("hindsight gives single sequences") };
        let text_of = |class: u8| {
            let ids: Vec<u32> =
                seq.ids.iter().zip(&seq.completion_mask).filter(|(_, &m)| m == class).map(|(&i, _)| i).collect();
            tok.decode(&ids, false).unwrap()
        };
        // Prompt and feedback words carry no loss; the answers carry their class; EOS class 1.
        let prompt = ex["prompt"].as_str().unwrap();
        let unscored = text_of(0);
        assert!(
            unscored.contains(prompt.trim()) && unscored.contains("good:") && unscored.contains("bad:"),
            "{unscored:?}"
        );
        assert_eq!(text_of(2).trim(), ex["rejected"].as_str().unwrap().trim());
        assert!(text_of(1).trim_start().starts_with(ex["chosen"].as_str().unwrap().trim()), "{:?}", text_of(1));
        // Hidden positions lie inside the positive answer (the one another answer follows).
        assert!(seq
            .hidden_from_later
            .iter()
            .all(|&p| seq.completion_mask[p] == 1 && p < seq.completion_mask.iter().position(|&m| m == 2).unwrap()));
        hid_any |= !seq.hidden_from_later.is_empty();
        let batch = collate(&[seq], 0, &Device::Cpu).unwrap();
        let attn: Vec<u32> = batch.attention_mask.flatten_all().unwrap().to_vec1().unwrap();
        for (p, &a) in attn.iter().enumerate() {
            assert_eq!(a == 0, seq.hidden_from_later.contains(&p), "position {p}");
        }
        // The loss mask carries the classes, shifted by one.
        let loss: Vec<f32> = batch.loss_mask.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(loss, seq.completion_mask[1..].iter().map(|&m| f32::from(m)).collect::<Vec<_>>());
    }
    assert!(hid_any, "mask_past_max = 1 should hide some earlier-answer tokens");
    let none = load_items(&data, &sets("[\"good: {pos} bad: {neg}\"]", 0.0), &model, None).unwrap();
    assert!(none.iter().all(|i| matches!(i, Item::Sequence(s) if s.hidden_from_later.is_empty())));
}

/// Token ids and loss masks as the official chain-of-hindsight code builds them
/// (`tests/fixtures/gen_hindsight_golden.py`), for six templates over the fixture's pairs.
#[test]
fn hindsight_sequences_match_the_official_construction() {
    let dir = common::scratch();
    let data = dir.path().join("pairs.jsonl");
    write_examples(&data);
    let model = load("llama-tiny/policy");
    let golden = json("hindsight/expected.json");
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 18);
    for case in cases {
        let template = case["template"].as_str().unwrap();
        let cfg = config(&[
            format!("data.train=\"{}\"", data.display()),
            "run.output=\"unused\"".into(),
            "objective.name=\"hindsight\"".into(),
            format!("objective.templates=[{}]", serde_json::to_string(template).unwrap()),
            "objective.mask_past_max=0.0".into(),
        ]);
        let items = load_items(&data, &cfg, &model, None).unwrap();
        let Item::Sequence(seq) = &items[case["example"].as_u64().unwrap() as usize] else { panic!("a sequence") };
        assert_eq!(seq.ids, u32s(&case["input_ids"]), "ids: {template}");
        let mask: Vec<u32> = seq.completion_mask.iter().map(|&m| u32::from(m != 0)).collect();
        assert_eq!(mask, u32s(&case["loss_mask"]), "loss mask: {template}");
    }
}

#[test]
fn an_interrupted_spo_run_resumes_with_its_degree_heads() {
    let dir = common::scratch();
    let data = dir.path().join("pairs.jsonl");
    write_examples(&data);
    let full = dir.path().join("full");
    let args = [
        "--objective",
        "spo",
        "--model",
        &tiny("policy"),
        "--ref-model",
        &tiny("reference"),
        "--data",
        s(&data),
        "--batch-size",
        "1",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--lr",
        "1e-3",
        "--scheduler",
        "constant",
        "--spo-weight",
        "1.0",
    ];
    // Evaluated on the three pairs before the first step and after the fourth.
    let args = [&args[..], &["--eval-data", s(&data), "--eval-every", "4", "--set", "run.eval_on_start=true"]].concat();
    candor_train(&[&args[..], &["--output", s(&full)]].concat());
    let want = metrics(&full);
    assert!(full.join("checkpoints/step-2/heads.safetensors").exists());
    // The same run stopped after its step-2 checkpoint, then resumed.
    let part = dir.path().join("part");
    candor_train(&[&args[..], &["--output", s(&part)]].concat());
    std::fs::remove_dir_all(part.join("checkpoints/step-4")).unwrap();
    std::fs::remove_dir_all(part.join("final")).unwrap();
    let o = candor(&["train", "--quiet", "--resume", s(&part)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = metrics(&part);
    assert_eq!(got.len(), 5, "step 0 (evaluation only), steps 1 to 4");
    for (g, w) in got.iter().zip(&want) {
        for key in ["loss", "spo/ssl_loss", "spo/ssl_accuracy", "rewards/margins", "eval_spo/ssl_loss"] {
            assert_eq!(g[key], w[key], "step {}: `{key}`", w["step"]);
        }
    }
    // The degree classifier learns: on the same pairs and variants, its loss before the first
    // step and after the fourth.
    let ssl = series(&want, "eval_spo/ssl_loss");
    assert!(ssl.len() == 2 && ssl[1] < ssl[0] - TINY_SSL_DROP, "held-out ssl loss {ssl:?}");
}

/// How much 4 SPO steps at lr 1e-3 must lower the tiny model's degree loss on its pairs
/// (measured: 1.0999, about ln 3 for fresh heads, to 1.0579). Deterministic, on the same
/// variants both times: heads that never learn leave it where it starts.
const TINY_SSL_DROP: f64 = 0.02;

// ---------------------------------------------------------------------------------------------
// CI-sized runs on the default model (SmolLM2-135M-Instruct)

/// 16 training and 16 held-out preference rows of candor's shipped data.
fn shipped_pairs(dir: &Path) -> (String, String) {
    let (train, eval) = (dir.join("train.jsonl"), dir.join("eval.jsonl"));
    head_lines("tests/fixtures/shipped-v1/preference/train.jsonl", 16, &train);
    head_lines("tests/fixtures/shipped-v1/preference/test.jsonl", 16, &eval);
    (train.display().to_string(), eval.display().to_string())
}

/// A recipe with 4 steps, evaluation at steps 2 and 4, short sequences.
fn real_run(recipe: &str, dir: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let (train, eval) = shipped_pairs(dir);
    let run = dir.join("run");
    let base = [
        "--config",
        recipe,
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "0",
        "--save-only-model",
        "--data",
        &train,
        "--eval-data",
        &eval,
        "--output",
        s(&run),
    ];
    candor_train(&[&base[..], extra].concat());
    metrics(&run)
}

/// The given lines (0-based) of a repository file, written to `dest`.
fn pick_lines(src: &str, lines: &[usize], dest: &Path) {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(src)).unwrap();
    let all: Vec<&str> = text.lines().collect();
    std::fs::write(dest, lines.iter().map(|&i| format!("{}\n", all[i])).collect::<String>()).unwrap();
}

/// Length-balanced preference rows (0-based lines). In the first 8 of each list the chosen
/// answer has fewer SmolLM2 tokens than the rejected one (word limits: a short sentence against
/// a long one; `2` against `-8`), in the last 8 more (uppercase, unit conversions, JSON, keywords).
/// A scorer that prefers the longer answer, or the shorter one, ranks exactly 8 of 16 right.
const REWARD_TRAIN_LINES: [usize; 16] = [30, 41, 49, 59, 65, 69, 71, 73, 0, 1, 2, 3, 5, 7, 8, 9];
const REWARD_EVAL_LINES: [usize; 16] = [17, 21, 29, 30, 33, 35, 40, 41, 0, 1, 2, 4, 5, 7, 9, 12];

#[test]
fn reward_model_on_smollm2_ranks_held_out_pairs_better_than_chance() {
    let dir = common::scratch();
    let (train, eval) = (dir.path().join("train.jsonl"), dir.path().join("eval.jsonl"));
    pick_lines("tests/fixtures/shipped-v1/preference/train.jsonl", &REWARD_TRAIN_LINES, &train);
    pick_lines("tests/fixtures/shipped-v1/preference/test.jsonl", &REWARD_EVAL_LINES, &eval);
    let run = dir.path().join("run");
    candor_train(&[
        "--config",
        "configs/reward.toml",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--save-every",
        "0",
        "--save-only-model",
        "--max-length",
        "96",
        "--data",
        s(&train),
        "--eval-data",
        s(&eval),
        "--output",
        s(&run),
    ]);
    let m = metrics(&run);
    let eval_loss = series(&m, "eval_loss");
    assert!(eval_loss[1] < eval_loss[0] && eval_loss[0] < std::f64::consts::LN_2 + 0.1, "eval loss {eval_loss:?}");
    let o = candor(&["score", "--model", s(&run.join("final")), "--data", s(&eval)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 16);
    let right: Vec<bool> =
        lines.iter().map(|l| l["chosen_reward"].as_f64().unwrap() > l["rejected_reward"].as_f64().unwrap()).collect();
    let (shorter, longer) = (right[..8].iter().filter(|&&r| r).count(), right[8..].iter().filter(|&&r| r).count());
    // A scorer that goes by length ranks 8 + 0 or 0 + 8 right; 12 of 16 needs at least 4 in
    // each half. A coin ranks 12 or more right with probability 3.8%. Measured: 8 + 5 (the
    // misses: an uppercase pair, a keyword pair and a unit conversion, at 4 and at 8 steps).
    assert!(shorter + longer >= 12, "the reward model ranks {shorter}/8 pairs with the shorter answer chosen and {longer}/8 with the longer one right: {right:?}");
}

#[test]
fn copg_on_smollm2_moves_log_ratio_gaps_toward_reward_gaps() {
    let dir = common::scratch();
    let m = real_run("configs/copg.toml", dir.path(), &["--max-length", "96", "--lr", "1e-5"]);
    let eval_loss = series(&m, "eval_loss");
    let gap = series(&m, "eval_copg/logratio_difference");
    let target = series(&m, "eval_copg/reward_difference");
    assert!(eval_loss[1] < eval_loss[0], "eval loss {eval_loss:?}");
    assert!(gap[1] > gap[0] && gap[0] > 0.0 && gap[1] < target[1], "log-ratio gap {gap:?} toward {target:?}");
}

#[test]
fn spo_on_smollm2_raises_margins_and_learns_the_degrees() {
    let dir = common::scratch();
    let m = real_run(
        "configs/spo.toml",
        dir.path(),
        &["--max-length", "96", "--lr", "1e-5", "--spo-weight", "1.0", "--set", "run.eval_on_start=true"],
    );
    // Held-out margins: exactly 0 before the first step (the policy is the reference), then
    // rising at steps 2 and 4.
    let margins = series(&m, "eval_rewards/margins");
    assert!(
        margins.len() == 3 && margins[0] == 0.0 && margins[1] > 0.0 && margins[2] > margins[1],
        "held-out margins {margins:?}"
    );
    // The degree heads learn: their loss on the same held-out variants at steps 0, 2 and 4.
    let ssl = series(&m, "eval_spo/ssl_loss");
    assert!(
        ssl[1] < ssl[0] && ssl[2] < ssl[1] && ssl[2] < ssl[0] - SMOLLM2_SSL_DROP,
        "held-out self-supervised loss {ssl:?}"
    );
}

#[test]
fn simpo_orpo_and_kto_on_smollm2_raise_held_out_margins() {
    for recipe in ["simpo", "orpo", "kto"] {
        let dir = common::scratch();
        let extra =
            ["--max-length", "96", "--lr", "1e-5", "--set", "optim.warmup_steps=0", "--set", "run.eval_on_start=true"];
        let m = real_run(&format!("configs/{recipe}.toml"), dir.path(), &extra);
        // The same 16 held-out pairs (KTO: their 32 halves) at steps 0, 2 and 4.
        let margins = series(&m, "eval_rewards/margins");
        assert!(
            margins.len() == 3 && margins[1] > margins[0] && margins[2] > margins[1],
            "{recipe}: held-out margins {margins:?}"
        );
        if recipe == "kto" {
            // The policy starts as the reference: every log-ratio, and so every reward, is 0.
            assert_eq!(margins[0], 0.0);
            assert!(series(&m, "kl").iter().all(|k| k.is_finite() && *k >= 0.0));
        }
    }
}

/// How much the held-out degree loss must fall in 4 SPO steps on SmolLM2 (measured 1.366 ->
/// 1.201 -> 1.154 at steps 0, 2, 4; the same 16 pairs and variants each time, so only
/// learning moves it).
const SMOLLM2_SSL_DROP: f64 = 0.1;

#[test]
fn chain_of_hindsight_on_smollm2_lowers_held_out_nll_and_generates_with_its_prefix() {
    let dir = common::scratch();
    let m = real_run("configs/hindsight.toml", dir.path(), &["--max-length", "160", "--grad-accum", "1"]);
    let eval_loss = series(&m, "eval_loss");
    assert!(eval_loss[1] < eval_loss[0], "eval loss {eval_loss:?}");
    let positive = series(&m, "eval_nll/positive");
    assert!(positive[1] < positive[0], "held-out NLL of the good answers {positive:?}");
    // `generate --hindsight-prefix` decodes greedily from the trained model with the feedback
    // phrase after the prompt: its answer is the argmax continuation recomputed here by full
    // forward passes over that prompt (it would differ without the prefix, or from the base model).
    let (final_dir, question, prefix) =
        (dir.path().join("run/final"), "What is 12 * 7? Answer with just the number.", "a good answer is ");
    let out = dir.path().join("answer.jsonl");
    let o = candor(&[
        "generate",
        "--model",
        s(&final_dir),
        "--chat",
        "--hindsight-prefix",
        prefix,
        "--prompt",
        question,
        "--max-new-tokens",
        "8",
        "--output",
        s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    let (tokens, text) = greedy_by_full_forward(&final_dir, question, Some(prefix), 8);
    assert!(!tokens.is_empty());
    assert_eq!(got["completion"].as_str().unwrap(), text, "{got}");
    let (_, without_prefix) = greedy_by_full_forward(&final_dir, question, None, 8);
    assert_ne!(without_prefix, text, "the feedback prefix should change the greedy answer");
}

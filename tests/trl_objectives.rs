//! SimPO, ORPO, KTO and GRPO against TRL 1.16 on the tiny Llama (`tests/fixtures/llama-tiny/
//! trl_objectives.json`, made by `gen_trl_objective_goldens.py` with TRL's own trainers): the
//! same token sequences go through candor's real input path (`train::inputs`) and the registry's
//! loss, on both kernel paths; the loss and every metric candor logs must equal TRL's.

mod common;

use std::collections::HashMap;

use candor::data::TokenizedSequence;
use candor::model::Kernels;
use candor::train::inputs::{objective_input, StepModels};
use candor::train::items::{Item, LabelledItem, PairItem, RolloutItem};
use candor_alignment::objectives::grpo::{advantages, weighted_rewards, ScaleRewards};
use candor_alignment::{Objective, ObjectiveOutput, StepScale};
use common::*;
use serde_json::{json, Value};

/// TRL metrics candor does not compute: the mean raw logit over (padded) positions, the
/// next-token entropy over the vocabulary, and the trainer's running token count.
const NOT_LOGGED: [&str; 4] = ["logits/chosen", "logits/rejected", "entropy", "num_tokens"];

fn cases() -> Value {
    json("llama-tiny/trl_objectives.json")["cases"].clone()
}

fn sequence(v: &Value) -> TokenizedSequence {
    let mask = u32s(&v["completion_mask"]).into_iter().map(|m| m as u8).collect();
    TokenizedSequence::new(u32s(&v["input_ids"]), mask)
}

fn objective(config: Value) -> Objective {
    let o: Objective = serde_json::from_value(config).unwrap();
    o.validate().unwrap();
    o
}

/// The objective's loss and metrics on `items` under the fixture's policy (and reference).
fn run(o: &Objective, items: &[Item], kernels: Kernels, scale: StepScale, reference: bool) -> ObjectiveOutput {
    let policy = load_kernels("llama-tiny/policy", kernels);
    let refm = reference.then(|| load_kernels("llama-tiny/reference", kernels));
    let models = StepModels {
        policy: &policy.model,
        reference: refm.as_ref().map(|r| &r.model),
        teacher: None,
        heads: &[],
        pad: 0,
        progress: 0.0,
    };
    let refs: Vec<&Item> = items.iter().collect();
    let input = objective_input(models, o.data_need(), &refs).unwrap();
    o.compute(&input, &scale).unwrap()
}

/// Loss within 1e-5 and every metric TRL logs (but [`NOT_LOGGED`]) present and within 1e-5.
fn assert_matches(what: &str, out: &ObjectiveOutput, loss: f64, metrics: &Value) {
    let got_loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got_loss - loss).abs() <= 1e-5, "{what}: loss {got_loss}, TRL {loss}");
    let got: HashMap<&str, f64> = out.metrics.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    for (key, want) in metrics.as_object().unwrap() {
        if NOT_LOGGED.contains(&key.as_str()) {
            continue;
        }
        let g = *got.get(key.as_str()).unwrap_or_else(|| panic!("{what}: no `{key}` (candor logs {got:?})"));
        let w = want.as_f64().unwrap();
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{what}: `{key}` {g}, TRL {w}");
    }
    for key in got.keys() {
        assert!(metrics.get(*key).is_some(), "{what}: candor logs `{key}`, TRL does not");
    }
}

/// The case's pairs: rows `chosen_rows[i]` and `rejected_rows[i]`.
fn pairs(case: &Value, score_prompt: bool) -> (Vec<Item>, f64) {
    let seqs: Vec<TokenizedSequence> = case["sequences"].as_array().unwrap().iter().map(sequence).collect();
    let rows = |k: &str| u32s(&case[k]).into_iter().map(|i| seqs[i as usize].clone()).collect::<Vec<_>>();
    let items: Vec<Item> = rows("chosen_rows")
        .into_iter()
        .zip(rows("rejected_rows"))
        .map(|(c, r)| Item::Pair(PairItem { score_prompt, ..PairItem::new(c, r) }))
        .collect();
    let tokens = items.iter().map(|i| i.loss_tokens() as f64).sum();
    (items, tokens)
}

#[test]
fn simpo_and_orpo_match_trl_cpo_and_orpo_trainers() {
    let all = cases();
    for kernels in KERNELS {
        for (case, name) in [("simpo", "simpo"), ("simpo_cpo_alpha1", "simpo"), ("orpo", "orpo")] {
            let c = &all[case];
            let cfg = &c["config"];
            let o = match name {
                "simpo" => objective(json!({"name": "simpo", "beta": cfg["beta"], "gamma": cfg["simpo_gamma"],
                    "cpo_alpha": cfg["cpo_alpha"], "label_smoothing": cfg["label_smoothing"]})),
                _ => objective(json!({"name": "orpo", "beta": cfg["beta"]})),
            };
            assert!(!o.needs_reference(), "{name} is reference-free");
            let (items, tokens) = pairs(c, o.spec().prompt_nll);
            let out = run(&o, &items, kernels, StepScale::single(items.len(), tokens), false);
            assert_matches(&format!("{case} ({kernels})"), &out, c["loss"].as_f64().unwrap(), &c["metrics"]);
        }
    }
}

#[test]
fn kto_matches_trl_kto_trainer_including_the_kl_rows() {
    let all = cases();
    for kernels in KERNELS {
        for (case, weights) in [("kto", (1.0, 1.0)), ("kto_weighted", (1.33, 0.75)), ("kto_batch3", (1.0, 1.0))] {
            let o = objective(json!({"name": "kto", "beta": 0.1, "desirable_weight": weights.0,
                "undesirable_weight": weights.1}));
            for (b, batch) in all[case]["batches"].as_array().unwrap().iter().enumerate() {
                let items: Vec<Item> = batch["sequences"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(batch["labels"].as_array().unwrap())
                    .map(|(s, l)| {
                        Item::Labelled(LabelledItem { sequence: sequence(s), desirable: l.as_bool().unwrap() })
                    })
                    .collect();
                let out = run(&o, &items, kernels, StepScale::single(items.len(), 0.0), true);
                let what = format!("{case} batch {b} ({kernels})");
                assert_matches(&what, &out, batch["loss"].as_f64().unwrap(), &batch["metrics"]);
            }
        }
    }
}

#[test]
fn kto_splits_preference_rows_and_rotates_completions_as_trl() {
    // The KL rows candor builds are TRL's: row i's prompt with row i−1's completion.
    let batch = &cases()["kto"]["batches"][0];
    let seqs: Vec<TokenizedSequence> = batch["sequences"].as_array().unwrap().iter().map(sequence).collect();
    let want: Vec<TokenizedSequence> = batch["kl_sequences"].as_array().unwrap().iter().map(sequence).collect();
    for (i, (s, w)) in seqs.iter().zip(&want).enumerate() {
        let partner = &seqs[(i + seqs.len() - 1) % seqs.len()];
        let built =
            TokenizedSequence::prompt_and_answer(&s.ids[..s.prompt_len()], &partner.ids[partner.prompt_len()..]);
        assert_eq!((&built.ids, &built.completion_mask), (&w.ids, &w.completion_mask), "KL row {i}");
    }
    assert_eq!(u32s(&batch["kl_completion_from_dataset_row"]), [5, 0, 1, 2, 3, 4]);
}

#[test]
fn grpo_advantages_and_reward_metrics_match_trl() {
    let c = &cases()["grpo_advantages"];
    let names: Vec<String> = ["reward_a", "reward_b"].map(String::from).to_vec();
    let columns: Vec<Vec<f64>> = names.iter().map(|n| f64s(&c["rewards_per_func"][n])).collect();
    let parts: Vec<Vec<f64>> = (0..6).map(|i| columns.iter().map(|col| col[i]).collect()).collect();
    let (rewards, per_judge) = weighted_rewards(&parts, &names, &f64s(&c["reward_weights"]));
    for (scale, key) in [(ScaleRewards::Group, "group"), (ScaleRewards::Batch, "batch"), (ScaleRewards::None, "none")] {
        let a = advantages(&rewards, 2, scale).unwrap();
        assert_close(&format!("{key} advantages"), &a.values, &f64s(&c[key]["advantages"]), 1e-6);
        for (k, v) in a.metrics.iter().chain(&per_judge) {
            let want = c[key]["metrics"][k].as_f64().unwrap_or_else(|| panic!("TRL logs no `{k}`"));
            assert!((v - want).abs() < 1e-6, "{key}: `{k}` {v}, TRL {want}");
        }
    }
}

/// A GRPO case's rollouts with TRL's old and reference log-probs and advantages.
fn rollouts(c: &Value) -> Vec<Item> {
    let rows = |k: &str| -> Option<Vec<Vec<f32>>> {
        Some(c.get(k)?.as_array()?.iter().map(|r| f64s(r).into_iter().map(|v| v as f32).collect()).collect())
    };
    let old = rows("old_per_token_logps").unwrap();
    let reference = rows("ref_per_token_logps"); // none without a KL term
    let advantages = f64s(&c["advantages"]);
    let max_tokens = c["config"]["max_completion_length"].as_u64().unwrap() as usize;
    c["sequences"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let sequence = sequence(s);
            let n = sequence.completion_tokens();
            Item::Rollout(RolloutItem {
                sequence,
                old_logps: old[i][..n].to_vec(),
                accuracy: 0.0,
                correct: false,
                advantage: advantages[i] as f32,
                teacher_logps: Vec::new(),
                kd: false,
                reference_logps: reference.as_ref().map_or(Vec::new(), |r| r[i][..n].to_vec()),
                max_tokens,
            })
        })
        .collect()
}

#[test]
fn grpo_loss_types_match_trl_grpo_trainer() {
    let all = cases();
    let names = ["grpo_dapo_beta0", "grpo_grpo_beta0.04", "grpo_grpo_beta0.04_no_kl_correction"];
    let more = ["grpo_bnpo_beta0.04", "grpo_dr_grpo_beta0.04", "grpo_dapo_eps_high0.28"];
    for kernels in KERNELS {
        for case in names.iter().chain(&more) {
            let c = &all[*case];
            let cfg = &c["config"];
            let o = objective(json!({"name": "grpo", "loss_type": cfg["loss_type"], "beta": cfg["beta"],
                "epsilon": cfg["epsilon_low"], "epsilon_high": cfg["epsilon_high"],
                "scale_rewards": cfg["scale_rewards"], "use_bias_correction_kl": cfg["use_bias_correction_kl"]}));
            let items = rollouts(c);
            let scale = StepScale::single(items.len(), c["num_items_in_batch"].as_f64().unwrap());
            let out = run(&o, &items, kernels, scale, false);
            assert_matches(&format!("{case} ({kernels})"), &out, c["loss"].as_f64().unwrap(), &c["metrics"]);
        }
    }
}

#[test]
fn grpo_reference_token_logps_match_trl() {
    // The round builder scores the samples under the reference with candor's forward pass.
    let c = &cases()["grpo_grpo_beta0.04"];
    let reference = load("llama-tiny/reference");
    let seqs: Vec<TokenizedSequence> = c["sequences"].as_array().unwrap().iter().map(sequence).collect();
    let batch = candor::data::collate(&seqs.iter().collect::<Vec<_>>(), 0, &candle::Device::Cpu).unwrap();
    let got: Vec<f64> = candor::scoring::completion_token_logps(&reference.model, &batch)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let want: Vec<f64> = c["ref_per_token_logps"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&seqs)
        .flat_map(|(r, s)| f64s(r)[..s.completion_tokens()].to_vec())
        .collect();
    assert_close("reference token log-probs", &got, &want, 1e-4);
}

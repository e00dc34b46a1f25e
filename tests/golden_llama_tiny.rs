//! The tiny Llama against PyTorch + transformers + TRL (`tests/fixtures/llama-tiny`): logits,
//! log-probs, DPO losses, the gradient of the DPO loss, and the reward model.

mod common;

use candle::Tensor;
use candor::data::{collate, SequenceTokenizer, Text, TokenizedSequence, Truncation};
use candor::model::Kernels;
use candor::scoring::completion_logps;
use candor_alignment::objectives::dpo::{self, DpoConfig, DpoLossType};
use candor_alignment::objectives::{rdpo, rpo};
use candor_alignment::{PairLogps, StepScale};
use common::*;
use serde_json::Value;

fn expected() -> Value {
    json("llama-tiny/expected.json")
}

/// The fixture's 2B-row preference batch, tokenized by candor from the raw examples.
fn batch_sequences(model: &candor::load::LoadedModel, exp: &Value) -> Vec<TokenizedSequence> {
    let tok = SequenceTokenizer { tokenizer: &model.tokenizer, chat_template: None, truncation: Truncation::default() };
    let examples = exp["examples"].as_array().unwrap();
    let mut rows = Vec::new();
    for key in ["chosen", "rejected"] {
        for ex in examples {
            let prompt = Text::Plain(ex["prompt"].as_str().unwrap().into());
            let completion = Text::Plain(ex[key].as_str().unwrap().into());
            rows.push(tok.prompt_completion(&prompt, &completion).unwrap());
        }
    }
    rows
}

#[test]
fn tokenization_and_batch_match_trl() {
    let exp = expected();
    let policy = load("llama-tiny/policy");
    let seqs = batch_sequences(&policy, &exp);
    let batch_ids = exp["batch"]["input_ids"].as_array().unwrap();
    let completion_masks = exp["batch"]["completion_mask"].as_array().unwrap();
    for (row, seq) in seqs.iter().enumerate() {
        let want = u32s(&batch_ids[row]);
        let mask = u32s(&completion_masks[row]);
        assert_eq!(seq.ids, want[..seq.ids.len()], "row {row} ids");
        let got_mask: Vec<u32> = seq.completion_mask.iter().map(|&m| m as u32).collect();
        assert_eq!(got_mask, mask[..seq.ids.len()], "row {row} completion mask");
    }
    let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
    let batch = collate(&refs, 0, &test_device()).unwrap();
    let label_mask: Vec<Vec<f32>> = batch.loss_mask.to_vec2().unwrap();
    for (row, want) in exp["batch"]["label_mask"].as_array().unwrap().iter().enumerate() {
        let want: Vec<f32> = u32s(want).iter().map(|&m| m as f32).collect();
        assert_eq!(label_mask[row], want[..label_mask[row].len()], "row {row} label mask");
    }
}

fn fixture_batch(exp: &Value) -> (Tensor, Tensor, Tensor) {
    let rows = |k: &str| -> Vec<Vec<u32>> { exp["batch"][k].as_array().unwrap().iter().map(u32s).collect() };
    let ids = Tensor::new(rows("input_ids"), &test_device()).unwrap();
    let attn = Tensor::new(rows("attention_mask"), &test_device()).unwrap();
    let label_mask: Vec<Vec<f32>> = rows("label_mask").iter().map(|r| r.iter().map(|&v| v as f32).collect()).collect();
    // label_mask is already shifted: [B, T-1], like candor's loss mask.
    (ids, attn, Tensor::new(label_mask, &test_device()).unwrap())
}

fn logits_match_transformers_on(kernels: Kernels) {
    let exp = expected();
    let policy = load_kernels("llama-tiny/policy", kernels);
    let (ids, attn, _) = fixture_batch(&exp);
    let opts = candor::model::ForwardOptions { attention_mask: Some(&attn), positions: None };
    let logits = policy.model.forward(&ids, opts, None).unwrap();
    let len = exp["logits_example0"]["length"].as_u64().unwrap() as usize;
    let row0: Vec<Vec<f32>> = logits.get(0).unwrap().narrow(0, 0, len).unwrap().to_vec2().unwrap();
    for (t, want) in exp["logits_example0"]["values"].as_array().unwrap().iter().enumerate() {
        let got: Vec<f64> = row0[t].iter().map(|&v| v as f64).collect();
        assert_close(&format!("logits[0, {t}]"), &got, &f64s(want), 1e-4);
    }
    // Every row: first 20 logits per valid position, and the per-row sum.
    let attn_rows: Vec<Vec<u32>> = attn.to_vec2().unwrap();
    let all: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    let sums = f64s(&exp["logits_checksums_all_rows"]["sum"]);
    for (b, per_pos) in exp["logits_checksums_all_rows"]["first20_per_position"].as_array().unwrap().iter().enumerate()
    {
        for (t, want) in per_pos.as_array().unwrap().iter().enumerate() {
            let got: Vec<f64> = all[b][t][..20].iter().map(|&v| v as f64).collect();
            assert_close(&format!("logits[{b}, {t}, :20]"), &got, &f64s(want), 1e-4);
        }
        let sum: f64 =
            (0..all[b].len()).filter(|&t| attn_rows[b][t] == 1).flat_map(|t| all[b][t].iter()).map(|&v| v as f64).sum();
        assert!((sum - sums[b]).abs() < 1e-3, "row {b} logit sum {sum} vs {}", sums[b]);
    }
    let reference = load_kernels("llama-tiny/reference", kernels);
    let ref_logits: Vec<Vec<Vec<f32>>> = reference.model.forward(&ids, opts, None).unwrap().to_vec3().unwrap();
    for (b, want) in f64s(&exp["logits_checksums_all_rows"]["reference_sum"]).iter().enumerate() {
        let sum: f64 = (0..ref_logits[b].len())
            .filter(|&t| attn_rows[b][t] == 1)
            .flat_map(|t| ref_logits[b][t].iter())
            .map(|&v| v as f64)
            .sum();
        // ~13k logits summed: allow 1e-3 absolute for accumulated rounding.
        assert!((sum - want).abs() < 1e-3, "reference row {b}: {sum} vs {want}");
    }
}

#[test]
fn logits_match_transformers() {
    KERNELS.into_iter().for_each(logits_match_transformers_on);
}

fn log_probs_match_transformers_on(kernels: Kernels) {
    let exp = expected();
    for (dir, key) in [("llama-tiny/policy", "policy_logps"), ("llama-tiny/reference", "reference_logps")] {
        let m = load_kernels(dir, kernels);
        let seqs = batch_sequences(&m, &exp);
        let refs: Vec<&TokenizedSequence> = seqs.iter().collect();
        let batch = collate(&refs, 0, &test_device()).unwrap();
        let sums = completion_logps(&m.model, &batch).unwrap();
        let per_token =
            (m.model.token_logps(&batch.input_ids, Some(&batch.attention_mask)).unwrap() * &batch.loss_mask).unwrap();
        let sums: Vec<f64> = values(&sums);
        let want: Vec<f64> = [f64s(&exp[key]["chosen_sum"]), f64s(&exp[key]["rejected_sum"])].concat();
        assert_rel(&format!("{key} sums"), &sums, &want, 1e-5);
        let per_token: Vec<Vec<f32>> = per_token.to_vec2().unwrap();
        for (b, want) in exp[key]["per_token"].as_array().unwrap().iter().enumerate() {
            let want = f64s(want);
            let got: Vec<f64> = per_token[b].iter().map(|&v| v as f64).collect();
            assert_close(&format!("{key} per-token row {b}"), &got, &want[..got.len()], 1e-4);
        }
        let counts: Vec<usize> = seqs.iter().map(|s| s.completion_tokens()).collect();
        let want_counts: Vec<usize> = ["chosen", "rejected"]
            .iter()
            .flat_map(|k| u32s(&exp["num_completion_tokens"][*k]))
            .map(|c| c as usize)
            .collect();
        assert_eq!(counts, want_counts);
    }
}

#[test]
fn log_probs_match_transformers() {
    KERNELS.into_iter().for_each(log_probs_match_transformers_on);
}

fn pair_logps(exp: &Value) -> PairLogps {
    let t = |v: Vec<f64>| Tensor::new(v.iter().map(|&x| x as f32).collect::<Vec<_>>(), &test_device()).unwrap();
    let n = |k: &str| t(u32s(&exp["num_completion_tokens"][k]).iter().map(|&c| c as f64).collect());
    PairLogps {
        policy_chosen: t(f64s(&exp["policy_logps"]["chosen_sum"])),
        policy_rejected: t(f64s(&exp["policy_logps"]["rejected_sum"])),
        reference_chosen: t(f64s(&exp["reference_logps"]["chosen_sum"])),
        reference_rejected: t(f64s(&exp["reference_logps"]["rejected_sum"])),
        chosen_tokens: n("chosen"),
        rejected_tokens: n("rejected"),
        rewards: None,
        degrees: None,
        previous: None,
        chosen_prompt: None,
    }
}

#[test]
fn dpo_losses_match_trl() {
    let exp = expected();
    let x = pair_logps(&exp);
    let cases = [
        ("sigmoid", DpoConfig::default()),
        ("ipo", DpoConfig { loss_type: DpoLossType::Ipo, ..Default::default() }),
        ("hinge", DpoConfig { loss_type: DpoLossType::Hinge, ..Default::default() }),
        ("cdpo_sigmoid_ls0.1", DpoConfig { label_smoothing: 0.1, ..Default::default() }),
    ];
    for (name, cfg) in cases {
        let want = &exp["dpo_losses"][name];
        let out = dpo::per_pair(&x, &cfg).unwrap();
        let per: Vec<f64> = values(&out.per_pair);
        assert_close(&format!("{name} per pair"), &per, &f64s(&want["per_pair"]), 1e-5);
        let mean = per.iter().sum::<f64>() / per.len() as f64;
        assert!((mean - want["loss"].as_f64().unwrap()).abs() < 1e-5, "{name} loss {mean}");
        let rc: Vec<f64> = values(&out.chosen_rewards);
        assert_close(&format!("{name} chosen rewards"), &rc, &f64s(&want["chosen_rewards"]), 1e-5);
        let full = dpo::loss(&x, &cfg, &StepScale::single(3, 0.0)).unwrap().loss.to_scalar::<f32>().unwrap() as f64;
        assert!((full - want["loss"].as_f64().unwrap()).abs() < 1e-5, "{name} reduced loss {full}");
    }
}

#[test]
fn rdpo_and_rpo_match_trl() {
    let exp = expected();
    let x = pair_logps(&exp);
    let want = &exp["dpo_losses"]["robust_ls0.1"];
    let out = rdpo::per_pair(&x, &rdpo::RdpoConfig { beta: 0.1, epsilon: 0.1 }).unwrap();
    let per: Vec<f64> = values(&out.per_pair);
    assert_close("rdpo per pair", &per, &f64s(&want["per_pair"]), 1e-5);
    let scale = StepScale::single(3, 0.0);
    let loss =
        rdpo::loss(&x, &rdpo::RdpoConfig { beta: 0.1, epsilon: 0.1 }, &scale).unwrap().loss.to_scalar::<f32>().unwrap();
    assert!((loss as f64 - want["loss"].as_f64().unwrap()).abs() < 1e-5);

    let want = &exp["dpo_losses"]["rpo_alpha1.0"];
    let chosen_tokens: f64 = u32s(&exp["num_completion_tokens"]["chosen"]).iter().map(|&c| c as f64).sum();
    let out = rpo::loss(&x, &rpo::RpoConfig { beta: 0.1, alpha: 1.0 }, &StepScale::single(3, chosen_tokens)).unwrap();
    assert!((out.loss.to_scalar::<f32>().unwrap() as f64 - want["loss"].as_f64().unwrap()).abs() < 1e-5);
    let nll = out.metrics.iter().find(|(k, _)| k == "nll_loss").unwrap().1;
    assert!((nll - want["nll_chosen_token_mean"].as_f64().unwrap()).abs() < 1e-5);
    let m: std::collections::HashMap<_, _> = out.metrics.into_iter().collect();
    let rc = f64s(want.get("chosen_rewards").unwrap_or(&exp["dpo_losses"]["sigmoid"]["chosen_rewards"]));
    assert!((m["rewards/chosen"] - rc.iter().sum::<f64>() / 3.0).abs() < 1e-5);
}

fn dpo_gradients_match_pytorch_including_tied_embeddings_on(kernels: Kernels) {
    let exp = expected();
    let mut policy = load_kernels("llama-tiny/policy", kernels);
    let reference = load_kernels("llama-tiny/reference", kernels);
    let vars = policy.model.make_trainable().unwrap();
    let (ids, attn, label_mask) = fixture_batch(&exp);
    let batch = candor::data::Batch { input_ids: ids, attention_mask: attn, loss_mask: label_mask, positions: None };
    let pi = completion_logps(&policy.model, &batch).unwrap();
    let rf = completion_logps(&reference.model, &batch).unwrap();
    let b = 3;
    let ones = Tensor::ones(b, candle::DType::F32, &test_device()).unwrap();
    let x = PairLogps {
        policy_chosen: pi.narrow(0, 0, b).unwrap(),
        policy_rejected: pi.narrow(0, b, b).unwrap(),
        reference_chosen: rf.narrow(0, 0, b).unwrap().detach(),
        reference_rejected: rf.narrow(0, b, b).unwrap().detach(),
        chosen_tokens: ones.clone(),
        rejected_tokens: ones,
        rewards: None,
        degrees: None,
        previous: None,
        chosen_prompt: None,
    };
    let loss = dpo::loss(&x, &DpoConfig::default(), &StepScale::single(3, 0.0)).unwrap().loss;
    let want_loss = exp["gradients_dpo_sigmoid"]["loss"].as_f64().unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() as f64 - want_loss).abs() < 1e-5);
    let grads = loss.backward().unwrap();
    let norms = exp["gradients_dpo_sigmoid"]["l2_norm_per_parameter"].as_object().unwrap();
    assert_eq!(norms.len(), vars.len(), "every parameter of the fixture has a gradient norm");
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient reached `{name}`"));
        let got = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        let want = norms[name].as_f64().unwrap();
        assert!((got - want).abs() <= 1e-3 * want, "`{name}` gradient L2 {got} vs {want}");
    }
    let grad_of = |name: &str| {
        let var = &vars.iter().find(|(n, _)| n == name).unwrap().1;
        grads.get(var.as_tensor()).unwrap().clone()
    };
    let first8 = &exp["gradients_dpo_sigmoid"]["first8"];
    let row = |t: Tensor, r: usize| -> Vec<f64> { values(&t.get(r).unwrap().narrow(0, 0, 8).unwrap()) };
    let check = |what: &str, got: Vec<f64>| {
        let want = f64s(&first8[what]);
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert_close(what, &got, &want, 1e-3 * scale);
    };
    check(
        "model.layers.0.self_attn.q_proj.weight[:8] (row 0)",
        row(grad_of("model.layers.0.self_attn.q_proj.weight"), 0),
    );
    check("model.embed_tokens.weight[0,:8] (pad row)", row(grad_of("model.embed_tokens.weight"), 0));
    check(
        "model.embed_tokens.weight[296,:8] (first completion token of row 0)",
        row(grad_of("model.embed_tokens.weight"), 296),
    );
    check("model.norm.weight[:8]", first_values(&grad_of("model.norm.weight"), 8));
}

#[test]
fn dpo_gradients_match_pytorch_including_tied_embeddings() {
    KERNELS.into_iter().for_each(dpo_gradients_match_pytorch_including_tied_embeddings_on);
}

fn reward_model_scores_match_transformers_on(kernels: Kernels) {
    let exp = expected();
    let rm = load_kernels("llama-tiny/reward", kernels);
    let (ids, attn, _) = fixture_batch(&exp);
    let scores = rm.model.sequence_scores(&ids, Some(&attn)).unwrap();
    let scores: Vec<f64> = values(&scores.squeeze(1).unwrap());
    let want = &exp["reward_model"];
    assert_close("chosen scores", &scores[..3], &f64s(&want["chosen_scores"]), 1e-5);
    assert_close("rejected scores", &scores[3..], &f64s(&want["rejected_scores"]), 1e-5);
}

#[test]
fn reward_model_scores_match_transformers() {
    KERNELS.into_iter().for_each(reward_model_scores_match_transformers_on);
}

#[test]
fn bf16_forward_and_backward_stay_close_to_f32() {
    let exp = expected();
    let (ids, attn, label_mask) = fixture_batch(&exp);
    let path = fixture("llama-tiny/policy");
    let mut m = candor::load::load_hf_dir(&path, candle::DType::BF16, &test_device()).unwrap();
    let vars = m.model.make_trainable().unwrap();
    let batch = candor::data::Batch { input_ids: ids, attention_mask: attn, loss_mask: label_mask, positions: None };
    let sums = completion_logps(&m.model, &batch).unwrap();
    let got: Vec<f64> = values(&sums);
    let want: Vec<f64> =
        [f64s(&exp["policy_logps"]["chosen_sum"]), f64s(&exp["policy_logps"]["rejected_sum"])].concat();
    // bf16 keeps 8 bits of mantissa: sequence log-probs within 2%.
    assert_rel("bf16 summed logps", &got, &want, 2e-2);
    let grads = sums.sum_all().unwrap().backward().unwrap();
    for (name, var) in &vars {
        assert!(grads.get(var.as_tensor()).is_some(), "bf16: no gradient reached `{name}`");
    }
}

/// Recomputing every block in the backward gives the gradients of the ordinary backward, on
/// both kernel paths; the block weights' gradients arrive through the checkpoint sink.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    let exp = expected();
    let (ids, attn, label_mask) = fixture_batch(&exp);
    let batch = candor::data::Batch { input_ids: ids, attention_mask: attn, loss_mask: label_mask, positions: None };
    for kernels in KERNELS {
        let grads = |checkpointing: bool| {
            let mut policy = load_kernels("llama-tiny/policy", kernels);
            policy.model.set_gradient_checkpointing(checkpointing);
            let vars = policy.model.make_trainable().unwrap();
            let loss = completion_logps(&policy.model, &batch).unwrap().sqr().unwrap().sum_all().unwrap();
            let store = loss.backward().unwrap();
            let mut sink = policy.model.take_checkpoint_grads();
            let from_sink = sink.len();
            let grads: Vec<(String, Vec<f32>)> = vars
                .iter()
                .map(|(name, v)| {
                    let g = store.get(v.as_tensor()).cloned().or_else(|| sink.remove(&v.as_tensor().id()));
                    (
                        name.clone(),
                        g.unwrap_or_else(|| panic!("no gradient for {name}")).flatten_all().unwrap().to_vec1().unwrap(),
                    )
                })
                .collect();
            (grads, from_sink)
        };
        let ((plain, none_from_sink), (checkpointed, from_sink)) = (grads(false), grads(true));
        assert_eq!(none_from_sink, 0);
        assert_eq!(from_sink, 2 * 9, "two blocks of 9 tensors each recomputed ({kernels})");
        for ((name, a), (_, b)) in plain.iter().zip(&checkpointed) {
            let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5 * scale, "{kernels}: `{name}` differs by {diff} (scale {scale})");
        }
    }
}

/// bf16 mixed precision anchored to the starting weights: after an update far below half a
/// bf16 step the policy's rounded weights equal the reference's, so their log-probs agree
/// exactly; rounding the current weights instead flips weights near a rounding boundary.
#[test]
fn anchored_bf16_rounding_ignores_updates_below_half_a_bf16_step() {
    let exp = expected();
    let (ids, attn, label_mask) = fixture_batch(&exp);
    let batch = candor::data::Batch { input_ids: ids, attention_mask: attn, loss_mask: label_mask, positions: None };
    let start = load("llama-tiny/policy");
    let mut reference = start.model.clone();
    reference.set_matmul_precision(Some(candle::DType::BF16));
    let logps = |m: &candor::model::CausalLm| completion_logps(m, &batch).unwrap().to_vec1::<f32>().unwrap();
    let want = logps(&reference);
    for anchored in [true, false] {
        let mut policy = start.model.clone();
        policy
            .visit_linears_mut(&mut |_, _, lin| {
                // A 1e-6 relative nudge of the projections: far below bf16's 2^-8 spacing, yet
                // it crosses some rounding boundaries.
                let w = lin.weight.dense().expect("a checkpoint's projections are dense");
                lin.weight = candor::model::ProjectionWeight::Dense((w * (1.0 + 1e-6))?);
                Ok(())
            })
            .unwrap();
        policy.set_matmul_precision(Some(candle::DType::BF16));
        if anchored {
            policy.anchor_rounding(&start.model);
        }
        let got = logps(&policy);
        if anchored {
            assert_eq!(got, want, "anchored rounding moved the policy");
        } else {
            assert_ne!(got, want, "plain rounding was expected to flip some weights");
        }
    }
}

/// Distillation inputs of the fixture batch (or its first `rows` rows): the policy as student,
/// the reference as teacher, the teacher's log-probs chunked as in training.
fn distill_tokens(rows: usize) -> candor_alignment::objectives::kd::DistillTokens {
    use candor::scoring::{chunked_vocab_logps, completion_states};
    let exp = expected();
    let (student, teacher) = (load("llama-tiny/policy"), load("llama-tiny/reference"));
    let seqs = batch_sequences(&student, &exp);
    let refs: Vec<&TokenizedSequence> = seqs.iter().take(rows).collect();
    let batch = collate(&refs, 0, &test_device()).unwrap();
    let s = completion_states(&student.model, &batch).unwrap();
    let t = completion_states(&teacher.model, &batch).unwrap();
    candor_alignment::objectives::kd::DistillTokens {
        student_logits: student.model.lm_logits(&s.hidden).unwrap(),
        // A chunk of 3 positions: the buffer is filled across several chunks.
        teacher_logps: chunked_vocab_logps(&teacher.model, &t.hidden, 3).unwrap(),
        targets: Tensor::new(s.targets, &test_device()).unwrap(),
        rows: Tensor::new(s.rows, &test_device()).unwrap(),
        clip_net: None,
    }
}

#[test]
fn kd_divergences_match_pytorch() {
    use candor_alignment::objectives::kd::{self, KdConfig};
    let exp = &expected()["kd"];
    let b = exp_rows();
    for (rows, want) in [(2 * b, exp.clone()), (b, exp["chosen_rows_only"].clone())] {
        let x = distill_tokens(rows);
        let n = x.targets.dim(0).unwrap();
        for (beta, key) in [(0.0, "forward_kl"), (1.0, "reverse_kl"), (0.5, "js")] {
            let cfg = KdConfig { beta, temperature: 1.0, scale_by_temperature_squared: false };
            let got =
                kd::loss(&x, &cfg, &StepScale::single(rows, n as f64)).unwrap().loss.to_scalar::<f32>().unwrap() as f64;
            let want = want[key].as_f64().unwrap();
            assert!((got - want).abs() < 1e-5, "{rows} rows, {key}: {got} vs {want}");
        }
    }
    // Row 0's per-token forward KL, position by position.
    let x = distill_tokens(1);
    let student = candor_alignment::tensor_ops::log_softmax(&x.student_logits).unwrap();
    let per_token: Vec<f32> = kd::kl_per_token(&x.teacher_logps, &student).unwrap().to_vec1().unwrap();
    let want = f64s(&exp["per_token_row0_forward_kl"]);
    assert_eq!(per_token.len(), want.len());
    for (g, w) in per_token.iter().zip(&want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{per_token:?} vs {want:?}");
    }
}

/// Pairs in the fixture batch.
fn exp_rows() -> usize {
    expected()["examples"].as_array().unwrap().len()
}

//! Qwen2 (q/k/v biases, untied head), Mistral (sliding window 6), Llama with llama3 RoPE
//! scaling and Qwen3 (per-head q/k norms, head width apart from the hidden size; its DPO
//! gradients and its llama.cpp-named GGUF too) against transformers. Reference values:
//! `tests/fixtures/gen_arch_goldens.py` and `gen_arch_goldens_2.py`.

mod common;

use candle::Tensor;
use candor::generate::{generate, SamplingConfig};
use candor::model::{ForwardOptions, Kernels};
use common::*;

fn check_architecture(dir: &str) {
    KERNELS.into_iter().for_each(|kernels| check_architecture_on(dir, kernels));
}

fn check_architecture_on(dir: &str, kernels: Kernels) {
    let exp = json(&format!("{dir}/expected.json"));
    let mut loaded = load_kernels(dir, kernels);
    let rows: Vec<Vec<u32>> = exp["input_ids"].as_array().unwrap().iter().map(u32s).collect();
    let mask: Vec<Vec<u32>> = exp["attention_mask"].as_array().unwrap().iter().map(u32s).collect();
    let ids = Tensor::new(rows.clone(), &test_device()).unwrap();
    let attn = Tensor::new(mask.clone(), &test_device()).unwrap();

    // Logits at every position of both rows (pad positions included, as transformers computes them).
    let logits: Vec<Vec<Vec<f32>>> = loaded
        .model
        .forward(&ids, ForwardOptions { attention_mask: Some(&attn), positions: None }, None)
        .unwrap()
        .to_vec3()
        .unwrap();
    for (b, per_pos) in exp["logits"].as_array().unwrap().iter().enumerate() {
        for (t, want) in per_pos.as_array().unwrap().iter().enumerate() {
            let got: Vec<f64> = logits[b][t].iter().map(|&v| v as f64).collect();
            assert_close(&format!("{dir} ({kernels}) logits[{b}, {t}]"), &got, &f64s(want), 1e-4);
        }
    }

    // Per-token and summed log-probs, then the gradient of their negative sum.
    let vars = loaded.model.make_trainable().unwrap();
    let token = loaded.model.token_logps(&ids, Some(&attn)).unwrap();
    let valid = attn.narrow(1, 1, 15).unwrap().to_dtype(candle::DType::F32).unwrap();
    let masked = (token * &valid).unwrap();
    let per_token: Vec<Vec<f32>> = masked.to_vec2().unwrap();
    for (b, want) in exp["token_logps"].as_array().unwrap().iter().enumerate() {
        let got: Vec<f64> = per_token[b].iter().map(|&v| v as f64).collect();
        assert_close(&format!("{dir} token logps row {b}"), &got, &f64s(want), 1e-4);
    }
    let sums: Vec<f64> = values(&masked.sum(1).unwrap());
    assert_rel(&format!("{dir} summed logps"), &sums, &f64s(&exp["sum_logps"]), 1e-5);
    let loss = masked.sum_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    let want = exp["grad_l2"].as_object().unwrap();
    let named = transformers_gradients(&vars, &grads, dir);
    assert_eq!(want.len(), named.len(), "{dir}: parameter count");
    for (name, flat) in &named {
        let got = flat.iter().map(|v| v * v).sum::<f64>().sqrt();
        let w = want[name].as_f64().unwrap_or_else(|| panic!("{dir}: fixture lacks `{name}`"));
        assert!((got - w).abs() <= GRAD_RTOL * w, "{dir} ({kernels}): `{name}` gradient L2 {got} vs {w}");
        check_gradient_elements(&format!("{dir} ({kernels}): `{name}`"), name, flat, &exp);
    }

    // Greedy continuation of the first 5 tokens of row 0 (KV-cached decoding).
    let gens = generate(
        &loaded.model,
        &[rows[0][..5].to_vec()],
        &[],
        0,
        &SamplingConfig { max_new_tokens: 10, ..Default::default() },
        |_, _| {},
    )
    .unwrap();
    assert_eq!(gens[0].tokens, u32s(&exp["greedy"]), "{dir}: greedy tokens");
}

/// Per-element gradient tolerance: `|got - want| <= GRAD_RTOL * |want| + GRAD_ATOL`. The
/// elements are mostly of order 0.01 to 3 (norms 2 to 80 over 64 to 8,192 elements); float32
/// rounding moves them by at most 3e-6 absolute here (both kernel paths, all three models), a
/// sixth of this bound at its tightest.
const GRAD_RTOL: f64 = 1e-4;
const GRAD_ATOL: f64 = 1e-5;

/// Tolerance of the fixed random projection `sum v_i g_i`, relative to `sum |v_i g_i|`. The
/// per-element roundings are independent, so it errs far less than the sum of the per-element
/// bounds: at most 1e-6 here. At 2e-5, one element wrong by a few percent of a typical
/// element, or any systematic error (a scaled or misplaced row, a missing term), fails it.
const PROJ_RTOL: f64 = 2e-5;

/// `n` standard normal draws, the same as `projection_vector` in `gen_arch_goldens.py`:
/// splitmix64 seeded with the FNV-1a hash of the parameter name, two words per draw, Box-Muller.
fn projection_vector(name: &str, n: usize) -> Vec<f64> {
    let mut state =
        name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3));
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let w = z ^ (z >> 31);
        ((w >> 11) + 1) as f64 * 2f64.powi(-53)
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next(), next());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

/// The recorded elements of one parameter's gradient (the first 8 and 8 at random indices),
/// each within its own bound, and the fixed random projection `sum v_i g_i` over all elements
/// within `PROJ_RTOL * sum |v_i g_i|` (the reference's `grad_proj_abs`). A projection vector
/// that differed from the script's would miss by the projection's own size.
fn check_gradient_elements(what: &str, name: &str, flat: &[f64], exp: &serde_json::Value) {
    let elements =
        exp["grad_elements"][name].as_array().unwrap_or_else(|| panic!("{what}: fixture lacks grad_elements"));
    assert_eq!(elements.len(), 16, "{what}: recorded elements");
    for e in elements {
        let (i, w) = (e[0].as_u64().unwrap() as usize, e[1].as_f64().unwrap());
        let g = flat[i];
        assert!((g - w).abs() <= GRAD_RTOL * w.abs() + GRAD_ATOL, "{what}: gradient element {i} is {g}, want {w}");
    }
    let v = projection_vector(name, flat.len());
    let got: f64 = v.iter().zip(flat).map(|(v, g)| v * g).sum();
    let want = exp["grad_proj"][name].as_f64().unwrap();
    let bound = PROJ_RTOL * exp["grad_proj_abs"][name].as_f64().unwrap();
    assert!((got - want).abs() <= bound, "{what}: gradient projection {got}, want {want} (bound {bound})");
}

#[test]
fn qwen2_matches_transformers() {
    check_architecture("qwen2-tiny");
}

#[test]
fn mistral_with_sliding_window_matches_transformers() {
    check_architecture("mistral-tiny");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_architecture("llama3rope-tiny");
}

#[test]
fn qwen3_with_qk_norms_matches_transformers() {
    check_architecture("qwen3-tiny");
    KERNELS.into_iter().for_each(|kernels| check_dpo_gradients("qwen3-tiny", kernels));
}

#[test]
fn qwen3_gguf_with_llama_cpp_names_loads_to_the_same_model() {
    check_gguf_logits("qwen3-tiny");
}

/// The fixture's `model.gguf` (llama.cpp's names and metadata) gives transformers' logits.
fn check_gguf_logits(dir: &str) {
    let exp = json(&format!("{dir}/expected.json"));
    let loaded =
        candor::load::load_gguf_model(&fixture(&format!("{dir}/model.gguf")), candle::DType::F32, &test_device())
            .unwrap();
    let rows: Vec<Vec<u32>> = exp["input_ids"].as_array().unwrap().iter().map(u32s).collect();
    let mask: Vec<Vec<u32>> = exp["attention_mask"].as_array().unwrap().iter().map(u32s).collect();
    let (ids, attn) = (Tensor::new(rows, &test_device()).unwrap(), Tensor::new(mask, &test_device()).unwrap());
    let opts = ForwardOptions { attention_mask: Some(&attn), positions: None };
    let logits: Vec<Vec<Vec<f32>>> = loaded.model.forward(&ids, opts, None).unwrap().to_vec3().unwrap();
    for (b, per_pos) in exp["logits"].as_array().unwrap().iter().enumerate() {
        for (t, want) in per_pos.as_array().unwrap().iter().enumerate() {
            let got: Vec<f64> = logits[b][t].iter().map(|&v| v as f64).collect();
            assert_close(&format!("{dir} GGUF logits[{b}, {t}]"), &got, &f64s(want), 1e-4);
        }
    }
}

/// The gradient of the fixture's DPO loss (sigmoid, β from the fixture, constant reference
/// log-probs) for every parameter: L2 norm, recorded elements and the random projection.
fn check_dpo_gradients(dir: &str, kernels: Kernels) {
    use candor_alignment::objectives::dpo::{self, DpoConfig};
    let exp = json(&format!("{dir}/expected.json"));
    let d = &exp["dpo"];
    let mut loaded = load_kernels(dir, kernels);
    let vars = loaded.model.make_trainable().unwrap();
    let rows: Vec<Vec<u32>> = d["input_ids"].as_array().unwrap().iter().map(u32s).collect();
    let mask: Vec<Vec<u32>> = d["attention_mask"].as_array().unwrap().iter().map(u32s).collect();
    let label: Vec<Vec<f32>> =
        d["label_mask"].as_array().unwrap().iter().map(|r| u32s(r).iter().map(|&v| v as f32).collect()).collect();
    let (ids, attn) = (Tensor::new(rows, &test_device()).unwrap(), Tensor::new(mask, &test_device()).unwrap());
    let token = loaded.model.token_logps(&ids, Some(&attn)).unwrap();
    let sums = (token * Tensor::new(label, &test_device()).unwrap()).unwrap().sum(1).unwrap();
    let f32s =
        |k: &str| Tensor::new(f64s(&d[k]).iter().map(|&v| v as f32).collect::<Vec<_>>(), &test_device()).unwrap();
    let x = candor_alignment::PairLogps {
        policy_chosen: sums.narrow(0, 0, 2).unwrap(),
        policy_rejected: sums.narrow(0, 2, 2).unwrap(),
        reference_chosen: f32s("reference_chosen_logps"),
        reference_rejected: f32s("reference_rejected_logps"),
        chosen_tokens: Tensor::new(&[1f32, 1.0], &test_device()).unwrap(),
        rejected_tokens: Tensor::new(&[1f32, 1.0], &test_device()).unwrap(),
        rewards: None,
        degrees: None,
        previous: None,
        chosen_prompt: None,
    };
    let cfg = DpoConfig { beta: d["beta"].as_f64().unwrap(), ..Default::default() };
    let out = dpo::loss(&x, &cfg, &candor_alignment::StepScale::single(2, 0.0)).unwrap();
    let loss = out.loss.to_scalar::<f32>().unwrap() as f64;
    assert!((loss - d["loss"].as_f64().unwrap()).abs() < 1e-5, "{dir} ({kernels}): DPO loss {loss}");
    let grads = out.loss.backward().unwrap();
    for (name, flat) in &transformers_gradients(&vars, &grads, dir) {
        let l2 = flat.iter().map(|v| v * v).sum::<f64>().sqrt();
        let w = d["grad_l2"][name].as_f64().unwrap_or_else(|| panic!("{dir}: fixture lacks DPO `{name}`"));
        assert!((l2 - w).abs() <= GRAD_RTOL * w + GRAD_ATOL, "{dir} ({kernels}): DPO `{name}` gradient L2 {l2} vs {w}");
        check_gradient_elements(&format!("{dir} ({kernels}) DPO: `{name}`"), name, flat, d);
    }
}

#[test]
fn phi3_with_fused_projections_partial_rope_and_longrope_matches_transformers() {
    // The fixture's sequences pass the original context (4), so every forward takes the long
    // factors; the rows' 4-token prefixes take the short ones.
    check_architecture("phi3-tiny");
    KERNELS.into_iter().for_each(|kernels| check_dpo_gradients("phi3-tiny", kernels));
    let exp = json("phi3-tiny/expected.json");
    let n = exp["rope"]["short_prefix_len"].as_u64().unwrap() as usize;
    let prefixes: Vec<Vec<u32>> = exp["input_ids"].as_array().unwrap().iter().map(|r| u32s(r)[..n].to_vec()).collect();
    for kernels in KERNELS {
        let loaded = load_kernels("phi3-tiny", kernels);
        let ids = Tensor::new(prefixes.clone(), &test_device()).unwrap();
        let logits: Vec<Vec<Vec<f32>>> =
            loaded.model.forward(&ids, ForwardOptions::default(), None).unwrap().to_vec3().unwrap();
        for (b, row) in exp["rope"]["short_prefix_logits"].as_array().unwrap().iter().enumerate() {
            for (t, want) in row.as_array().unwrap().iter().enumerate() {
                let got: Vec<f64> = logits[b][t].iter().map(|&v| v as f64).collect();
                assert_close(&format!("phi3 short prefix ({kernels}) logits[{b}, {t}]"), &got, &f64s(want), 1e-4);
            }
        }
    }
}

#[test]
fn phi3_gguf_with_fused_tensors_and_rope_factors_loads_to_the_same_model() {
    check_gguf_logits("phi3-tiny");
}

/// Every parameter's gradient, flattened, under transformers' names: Phi-3's separate q/k/v
/// and gate/up projections concatenated back into `qkv_proj` and `gate_up_proj` rows.
fn transformers_gradients(
    vars: &[(String, candle::Var)],
    grads: &candle::backprop::GradStore,
    dir: &str,
) -> Vec<(String, Vec<f64>)> {
    let grad = |name: &str| -> Tensor {
        let var = &vars.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{dir}: no `{name}`")).1;
        grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{dir}: no gradient reached `{name}`")).clone()
    };
    let fused = [
        ("self_attn.q_proj", "self_attn.qkv_proj", &["q_proj", "k_proj", "v_proj"][..]),
        ("mlp.gate_proj", "mlp.gate_up_proj", &["gate_proj", "up_proj"][..]),
    ];
    let phi3 = dir.starts_with("phi3");
    let mut out = Vec::new();
    for (name, _) in vars {
        let flat = |t: Tensor| -> Vec<f64> { values(&t) };
        match fused.iter().find(|(first, _, _)| phi3 && name.contains(first)) {
            Some((first, whole, parts)) => {
                let pieces: Vec<Tensor> =
                    parts.iter().map(|p| grad(&name.replace(first.rsplit('.').next().unwrap(), p))).collect();
                out.push((name.replace(first, whole), flat(Tensor::cat(&pieces, 0).unwrap())));
            }
            None if phi3 && ["k_proj", "v_proj", "up_proj"].iter().any(|p| name.contains(&format!(".{p}."))) => {}
            None => out.push((name.clone(), flat(grad(name)))),
        }
    }
    out
}

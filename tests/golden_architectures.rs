//! Qwen2 (q/k/v biases, untied head), Mistral (sliding window 6) and Llama with llama3 RoPE
//! scaling against transformers. Reference values: `tests/fixtures/gen_arch_goldens.py`.

mod common;

use candle::{Device, Tensor};
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
    let ids = Tensor::new(rows.clone(), &Device::Cpu).unwrap();
    let attn = Tensor::new(mask.clone(), &Device::Cpu).unwrap();

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
    let sums: Vec<f64> = masked.sum(1).unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
    assert_rel(&format!("{dir} summed logps"), &sums, &f64s(&exp["sum_logps"]), 1e-5);
    let loss = masked.sum_all().unwrap().neg().unwrap();
    let grads = loss.backward().unwrap();
    let want = exp["grad_l2"].as_object().unwrap();
    assert_eq!(want.len(), vars.len(), "{dir}: parameter count");
    for (name, var) in &vars {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{dir}: no gradient reached `{name}`"));
        let got = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt() as f64;
        let w = want[name].as_f64().unwrap_or_else(|| panic!("{dir}: fixture lacks `{name}`"));
        assert!((got - w).abs() <= 1e-3 * w, "{dir}: `{name}` gradient L2 {got} vs {w}");
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

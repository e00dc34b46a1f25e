//! Bad model files give a clear error that names the file and the field (or tensor), never a
//! panic, an abort or silent nonsense (issue 16, sections 2 and 6): `config.json` and the
//! safetensors headers of a transformers directory, the metadata and tensor infos of a GGUF
//! file, LoRA settings and saved adapters; and randomized mutations of both model formats.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle::quantized::gguf_file::Value;
use candle::{DType, Device, Tensor};
use candor::load::{load_gguf_model, load_hf_dir, load_model, LoadedModel};
use candor::model::lora::{save_adapter, LoraAdapter, LoraConfig};
use candor::model::Kernels;
use common::{fixture, scratch};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A copy of the tiny Llama fixture (hidden 64, 4 heads, 2 KV heads, head_dim 16, MLP 128,
/// 2 layers, vocabulary 384) under `root/m`.
fn tiny_copy(root: &Path) -> PathBuf {
    let dir = root.join("m");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture("llama-tiny/policy")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

/// Apply `edit` to the directory's `config.json`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Set one `config.json` field.
fn set_field(dir: &Path, key: &str, value: serde_json::Value) {
    edit_config(dir, |m| {
        m.insert(key.into(), value);
    });
}

/// Apply `edit` to the tensors of the directory's `model.safetensors`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle::safetensors::save(&t, &path).unwrap();
}

/// The full error chain of loading `dir` (it must fail).
fn hf_error(dir: &Path) -> String {
    match load_hf_dir(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading `{}` must fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

/// `msg` contains every one of `parts`.
fn assert_says(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "the error should contain {p:?}:\n{msg}");
    }
}

/// Summed log-probability of a short sequence through both kernel paths, which must agree and
/// be finite for a model that loaded.
fn forward_finite(m: &mut LoadedModel) -> f64 {
    let ids = Tensor::new(&[[1u32, 2, 3, 1]], &Device::Cpu).unwrap();
    let mut sums = Vec::new();
    for k in [Kernels::Plain, Kernels::Fused] {
        m.model.set_kernels(k);
        let lp = m.model.token_logps(&ids, None).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
        sums.push(lp);
    }
    assert!(sums.iter().all(|s| s.is_finite()), "log-probs {sums:?}");
    sums[0]
}

// ---------------------------------------------------------------------------------------------
// config.json: each field of the review, with the file and the field named

#[test]
fn unchanged_fixture_loads() {
    let root = scratch();
    let dir = tiny_copy(root.path());
    let mut m = load_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    forward_finite(&mut m);
}

#[test]
fn config_fields_out_of_range_name_the_file_and_the_field() {
    let root = scratch();
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("num_attention_heads", json!(0), "field `num_attention_heads` must be positive (got 0)"),
        ("num_key_value_heads", json!(0), "field `num_key_value_heads` must be positive (got 0)"),
        ("num_key_value_heads", json!(3), "field `num_key_value_heads` must divide `num_attention_heads` = 4 (got 3)"),
        ("hidden_size", json!(0), "field `hidden_size` must be positive (got 0)"),
        ("vocab_size", json!(0), "field `vocab_size` must be positive (got 0)"),
        ("intermediate_size", json!(0), "field `intermediate_size` must be positive (got 0)"),
        ("max_position_embeddings", json!(0), "field `max_position_embeddings` must be positive (got 0)"),
        ("num_hidden_layers", json!(0), "field `num_hidden_layers` must be positive (got 0)"),
        ("head_dim", json!(0), "field `head_dim` must be positive (got 0)"),
        ("rms_norm_eps", json!(-1.0), "field `rms_norm_eps` must be a positive finite number (got -1)"),
        ("num_attention_heads", json!("4"), "field `num_attention_heads` has a wrong type or value"),
        ("vocab_size", json!(-1), "field `vocab_size` has a wrong type or value"),
    ];
    for (i, (field, value, want)) in cases.iter().enumerate() {
        let dir = tiny_copy(&root.path().join(i.to_string()));
        set_field(&dir, field, value.clone());
        let msg = hf_error(&dir);
        assert_says(&msg, &[&format!("{}: {want}", dir.join("config.json").display())]);
    }
}

#[test]
fn heads_that_do_not_divide_the_width_are_named() {
    let root = scratch();
    // Without head_dim, the heads must divide hidden_size.
    let dir = tiny_copy(&root.path().join("a"));
    edit_config(&dir, |m| {
        m.remove("head_dim");
        m.insert("num_attention_heads".into(), json!(3));
        m.insert("num_key_value_heads".into(), json!(1));
    });
    let msg = hf_error(&dir);
    assert_says(
        &msg,
        &[
            &dir.join("config.json").display().to_string(),
            "field `num_attention_heads` must divide `hidden_size` = 64 (got 3)",
        ],
    );
    // With an explicit head_dim the heads need not divide the width, but q/k/v/o must match.
    let dir = tiny_copy(&root.path().join("b"));
    edit_config(&dir, |m| {
        m.insert("num_attention_heads".into(), json!(3));
        m.insert("num_key_value_heads".into(), json!(1));
    });
    let msg = hf_error(&dir);
    assert_says(
        &msg,
        &[
            &dir.join("model.safetensors").display().to_string(),
            "tensor `model.layers.0.self_attn.q_proj.weight` has shape [64, 64] but config.json says [48 (`num_attention_heads` × `head_dim`), 64 (`hidden_size`)]",
        ],
    );
}

#[test]
fn rope_base_of_zero_is_refused_wherever_it_is_stated() {
    let root = scratch();
    // The fixture states the base twice: transformers 5's `rope_parameters` wins.
    let dir = tiny_copy(&root.path().join("a"));
    edit_config(&dir, |m| {
        m["rope_parameters"]["rope_theta"] = json!(0.0);
    });
    assert_says(
        &hf_error(&dir),
        &[&format!(
            "{}: field `rope_parameters.rope_theta` must be a positive finite number",
            dir.join("config.json").display()
        )],
    );
    let dir = tiny_copy(&root.path().join("b"));
    edit_config(&dir, |m| {
        m.remove("rope_parameters");
        m.insert("rope_theta".into(), json!(0.0));
    });
    assert_says(
        &hf_error(&dir),
        &[&format!(
            "{}: field `rope_theta` must be a positive finite number within f32 range (got 0)",
            dir.join("config.json").display()
        )],
    );
}

#[test]
fn sizes_that_disagree_with_the_weights_name_the_tensor_and_the_field() {
    let root = scratch();
    let cases: &[(&str, serde_json::Value, &str)] = &[
        ("vocab_size", json!(10), "tensor `model.embed_tokens.weight` has shape [384, 64] but config.json says [10 (`vocab_size`), 64 (`hidden_size`)]"),
        (
            "vocab_size",
            json!(1_000_000_000_000u64),
            "tensor `model.embed_tokens.weight` has shape [384, 64] but config.json says [1000000000000 (`vocab_size`), 64 (`hidden_size`)]",
        ),
        (
            "intermediate_size",
            json!(1_000_000_000_000u64),
            "tensor `model.layers.0.mlp.gate_proj.weight` has shape [128, 64] but config.json says [1000000000000 (`intermediate_size`), 64 (`hidden_size`)]",
        ),
        ("hidden_size", json!(32), "tensor `model.layers.0.input_layernorm.weight` has shape [64] but config.json says [32 (`hidden_size`)]"),
        ("head_dim", json!(8), "tensor `model.layers.0.self_attn.q_proj.weight` has shape [64, 64] but config.json says [32 (`num_attention_heads` × `head_dim`), 64 (`hidden_size`)]"),
    ];
    for (i, (field, value, want)) in cases.iter().enumerate() {
        let dir = tiny_copy(&root.path().join(i.to_string()));
        set_field(&dir, field, value.clone());
        let msg = hf_error(&dir);
        assert_says(&msg, &[&format!("{}: {want}", dir.join("model.safetensors").display())]);
    }
}

#[test]
fn layer_count_must_match_the_file() {
    let root = scratch();
    // Fewer layers than the file holds: refused, not silently dropped.
    let dir = tiny_copy(&root.path().join("a"));
    set_field(&dir, "num_hidden_layers", json!(1));
    let msg = hf_error(&dir);
    assert_says(
        &msg,
        &[
            &dir.join("model.safetensors").display().to_string(),
            "belongs to layer 1 but config.json says `num_hidden_layers` = 1",
        ],
    );
    // More layers than the file holds, up to an absurd count: refused before any allocation.
    for (i, n) in [3u64, 1_000_000_000, u64::MAX].into_iter().enumerate() {
        let dir = tiny_copy(&root.path().join(format!("b{i}")));
        set_field(&dir, "num_hidden_layers", json!(n));
        let msg = hf_error(&dir);
        assert_says(
            &msg,
            &[&format!(
                "{}: holds 2 decoder layers but config.json says `num_hidden_layers` = {n} (no tensor of layer 2)",
                dir.join("model.safetensors").display()
            )],
        );
    }
}

#[test]
fn a_missing_or_misshapen_tensor_is_named_before_loading() {
    let root = scratch();
    let dir = tiny_copy(&root.path().join("a"));
    edit_weights(&dir, |t| {
        t.remove("model.layers.1.mlp.up_proj.weight");
    });
    assert_says(
        &hf_error(&dir),
        &[&format!(
            "{}: has no tensor `model.layers.1.mlp.up_proj.weight`, which config.json requires (shape [128 (`intermediate_size`), 64 (`hidden_size`)])",
            dir.join("model.safetensors").display()
        )],
    );
    // A whole layer missing in the middle.
    let dir = tiny_copy(&root.path().join("b"));
    edit_weights(&dir, |t| t.retain(|name, _| !name.starts_with("model.layers.0.")));
    assert_says(
        &hf_error(&dir),
        &["holds 1 decoder layers but config.json says `num_hidden_layers` = 2 (no tensor of layer 0)"],
    );
    // One tensor with the wrong shape.
    let dir = tiny_copy(&root.path().join("c"));
    edit_weights(&dir, |t| {
        t.insert(
            "model.layers.0.mlp.up_proj.weight".into(),
            Tensor::zeros((100, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    assert_says(
        &hf_error(&dir),
        &[&format!(
            "{}: tensor `model.layers.0.mlp.up_proj.weight` has shape [100, 64] but config.json says [128 (`intermediate_size`), 64 (`hidden_size`)]",
            dir.join("model.safetensors").display()
        )],
    );
    // An integer tensor where a weight belongs.
    let dir = tiny_copy(&root.path().join("d"));
    edit_weights(&dir, |t| {
        t.insert("model.norm.weight".into(), Tensor::zeros(64, DType::I64, &Device::Cpu).unwrap());
    });
    assert_says(
        &hf_error(&dir),
        &[&format!("{}: tensor `model.norm.weight` has dtype I64", dir.join("model.safetensors").display())],
    );
    // Not a safetensors file at all.
    let dir = tiny_copy(&root.path().join("e"));
    std::fs::write(dir.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    assert_says(
        &hf_error(&dir),
        &[&format!("{}: not a valid safetensors file", dir.join("model.safetensors").display())],
    );
}

#[test]
fn logprobs_command_refuses_a_bad_config_with_exit_2() {
    let root = scratch();
    let dir = tiny_copy(root.path());
    set_field(&dir, "rms_norm_eps", json!(-1.0));
    let data = root.path().join("d.jsonl");
    std::fs::write(&data, "{\"prompt\":\"a\",\"completion\":\"b\"}\n").unwrap();
    let o = common::candor(&["logprobs", "--model", dir.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert_says(&stderr, &[&format!("{}: field `rms_norm_eps`", dir.join("config.json").display())]);
}

// ---------------------------------------------------------------------------------------------
// LoRA: rank, alpha and dropout bounded, saved adapters checked

#[test]
fn lora_rank_above_the_layer_is_refused_before_allocating() {
    let mut m = common::load("llama-tiny/policy");
    // q_proj is [64, 64], v_proj [32, 64]: r may be at most 32 with both adapted.
    for r in [usize::MAX, i64::MAX as usize, 1 << 32, 1_000_000, 33] {
        let cfg = LoraConfig { r, ..Default::default() };
        let err = m.model.add_lora(&cfg, 0).unwrap_err().to_string();
        assert_says(
            &err,
            &[
                "`lora.r` (`--lora-r`)",
                &format!("is {r} but an adapted layer of shape [out, in]"),
                "allows at most min(in, out) = ",
            ],
        );
    }
    let cfg = LoraConfig { r: 32, targets: vec!["v_proj".into()], ..Default::default() };
    m.model.add_lora(&cfg, 0).unwrap();
    forward_finite(&mut m);
}

#[test]
fn lora_settings_name_the_key_and_the_flag() {
    let cases: &[(LoraConfig, &str)] = &[
        (LoraConfig { r: 0, ..Default::default() }, "`lora.r` (`--lora-r`) must be at least 1 (got 0)"),
        (
            LoraConfig { alpha: 0.0, ..Default::default() },
            "`lora.alpha` (`--lora-alpha`) must be a positive finite number (got 0)",
        ),
        (
            LoraConfig { alpha: f64::NAN, ..Default::default() },
            "`lora.alpha` (`--lora-alpha`) must be a positive finite number (got NaN)",
        ),
        (
            LoraConfig { alpha: f64::INFINITY, ..Default::default() },
            "`lora.alpha` (`--lora-alpha`) must be a positive finite number (got inf)",
        ),
        (
            LoraConfig { dropout: 1.0, ..Default::default() },
            "`lora.dropout` (`--lora-dropout`) must be in [0, 1) (got 1)",
        ),
        (
            LoraConfig { dropout: f64::NAN, ..Default::default() },
            "`lora.dropout` (`--lora-dropout`) must be in [0, 1) (got NaN)",
        ),
        (
            LoraConfig { dropout: -0.1, ..Default::default() },
            "`lora.dropout` (`--lora-dropout`) must be in [0, 1) (got -0.1)",
        ),
    ];
    for (cfg, want) in cases {
        let err = cfg.validate().unwrap_err().to_string();
        assert_says(&err, &[want]);
    }
    LoraConfig::default().validate().unwrap();
}

#[test]
fn train_with_a_huge_lora_rank_exits_2_naming_the_flag() {
    let root = scratch();
    let data = root.path().join("d.jsonl");
    std::fs::write(&data, "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\":\"c\",\"completion\":\"d\"}\n")
        .unwrap();
    let out = root.path().join("run");
    let o = common::candor(&[
        "train",
        "--quiet",
        "--objective",
        "sft",
        "--model",
        fixture("llama-tiny/policy").to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--max-steps",
        "1",
        "--lora-r",
        "9223372036854775807",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert_says(&stderr, &["`lora.r` (`--lora-r`) is 9223372036854775807", "min(in, out)"]);
}

#[test]
fn saved_adapters_are_checked_against_their_config_and_base() {
    let root = scratch();
    let m = common::load("llama-tiny/policy");
    let base = fixture("llama-tiny/policy").display().to_string();
    let cfg = LoraConfig { r: 4, ..Default::default() };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
    let ad = |out, inp, rng: &mut rand::rngs::StdRng| {
        LoraAdapter::init(out, inp, &cfg, rng, DType::F32, &Device::Cpu).unwrap()
    };
    let good = vec![("model.layers.0.self_attn.q_proj".to_string(), ad(64, 64, &mut rng))];
    // A valid adapter loads onto its base.
    let dir = root.path().join("ok");
    save_adapter(&dir, &cfg, &base, &good).unwrap();
    load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    // r out of range in adapter_config.json.
    for (key, value, want) in [
        ("r", json!(0), "field `r` must be at least 1 (got 0)"),
        ("r", json!(-3), "field `r` must be a positive integer (got -3)"),
        ("lora_alpha", json!("x"), "field `lora_alpha` must be a number"),
        ("lora_alpha", json!(-1.0), "field `lora_alpha` must be a positive finite number (got -1)"),
        ("lora_dropout", json!(2.0), "field `lora_dropout` must be in [0, 1) (got 2)"),
    ] {
        let dir = root.path().join(format!("{key}{value}"));
        save_adapter(&dir, &cfg, &base, &good).unwrap();
        let p = dir.join("adapter_config.json");
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v[key] = value;
        std::fs::write(&p, v.to_string()).unwrap();
        let err = format!("{:#}", load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap_err());
        assert_says(&err, &[&format!("{}: {want}", p.display())]);
    }
    // Tensors whose rank disagrees with `r`.
    let dir = root.path().join("rank");
    save_adapter(&dir, &LoraConfig { r: 2, ..cfg.clone() }, &base, &good).unwrap();
    let err = format!("{:#}", load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap_err());
    assert_says(&err, &[&dir.join("adapter_model.safetensors").display().to_string(), "says `r` = 2"]);
    // Tensors that do not fit the base layer: q_proj's adapter on v_proj ([32, 64]).
    let dir = root.path().join("base");
    save_adapter(&dir, &cfg, &base, &[("model.layers.0.self_attn.v_proj".to_string(), ad(64, 64, &mut rng))]).unwrap();
    let err = format!("{:#}", load_model(dir.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap_err());
    assert_says(
        &err,
        &[&dir.join("adapter_model.safetensors").display().to_string(), "the base layer is [out, in] = [32, 64]"],
    );
    drop(m);
}

// ---------------------------------------------------------------------------------------------
// GGUF: a tiny file written here, then broken one field at a time

/// One tensor of a GGUF file under construction: transformers-order shape, ggml type id and
/// raw data.
#[derive(Clone)]
struct GgufTensor {
    name: String,
    dims: Vec<u64>,
    dtype: u32,
    data: Vec<u8>,
}

/// The tiny GGUF model: Llama, width 8, 2 heads of 4, 1 KV head, MLP 16, 2 layers, a
/// byte-level BPE vocabulary of 8 tokens; f32 weights from a fixed LCG.
fn tiny_gguf_parts() -> (Vec<(String, Value)>, Vec<GgufTensor>) {
    let s = |v: &str| Value::String(v.into());
    let tokens = ["<|endoftext|>", "a", "b", "c", "Ġ", "ab", "ba", "bc"];
    let meta = vec![
        ("general.architecture".to_string(), s("llama")),
        ("llama.attention.head_count".into(), Value::U32(2)),
        ("llama.attention.head_count_kv".into(), Value::U32(1)),
        ("llama.embedding_length".into(), Value::U32(8)),
        ("llama.feed_forward_length".into(), Value::U32(16)),
        ("llama.block_count".into(), Value::U32(2)),
        ("llama.context_length".into(), Value::U32(64)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|t| s(t)).collect())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array([3, 1, 1, 1, 1, 1, 1, 1].iter().map(|&t| Value::I32(t)).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(["a b", "b a", "b c"].iter().map(|m| s(m)).collect())),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
        ("tokenizer.chat_template".into(), s("{% for m in messages %}{{ m['content'] }}{% endfor %}")),
    ];
    let mut state = 12345u64;
    let mut t = |name: &str, dims: &[u64]| {
        let n: u64 = dims.iter().product();
        let data: Vec<u8> = (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5;
                let x = if name.contains("norm") { 1.0 + x * 0.1 } else { x };
                x.to_le_bytes()
            })
            .collect();
        GgufTensor { name: name.into(), dims: dims.to_vec(), dtype: 0, data }
    };
    let mut tensors = vec![t("token_embd.weight", &[8, 8]), t("output_norm.weight", &[8])];
    for i in 0..2 {
        for (part, dims) in [
            ("attn_norm", vec![8]),
            ("attn_q", vec![8, 8]),
            ("attn_k", vec![4, 8]),
            ("attn_v", vec![4, 8]),
            ("attn_output", vec![8, 8]),
            ("ffn_norm", vec![8]),
            ("ffn_gate", vec![16, 8]),
            ("ffn_up", vec![16, 8]),
            ("ffn_down", vec![8, 16]),
        ] {
            tensors.push(t(&format!("blk.{i}.{part}.weight"), &dims));
        }
    }
    (meta, tensors)
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.push(*x as u8),
        Value::U16(x) => out.extend(x.to_le_bytes()),
        Value::I16(x) => out.extend(x.to_le_bytes()),
        Value::U32(x) => out.extend(x.to_le_bytes()),
        Value::I32(x) => out.extend(x.to_le_bytes()),
        Value::F32(x) => out.extend(x.to_le_bytes()),
        Value::Bool(x) => out.push(*x as u8),
        Value::String(s) => put_string(out, s),
        Value::Array(a) => {
            out.extend(a.first().map_or(4, value_type).to_le_bytes());
            out.extend((a.len() as u64).to_le_bytes());
            a.iter().for_each(|x| put_value(out, x));
        }
        Value::U64(x) => out.extend(x.to_le_bytes()),
        Value::I64(x) => out.extend(x.to_le_bytes()),
        Value::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// A GGUF v3 file; returns its bytes and the length of the header (metadata and tensor infos).
fn write_gguf(meta: &[(String, Value)], tensors: &[GgufTensor]) -> (Vec<u8>, usize) {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_string(&mut out, k);
        out.extend(value_type(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().rev().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(t.dtype.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    let header_len = out.len();
    out.resize(out.len().div_ceil(32) * 32, 0);
    for t in tensors {
        out.extend(&t.data);
        out.resize(out.len().div_ceil(32) * 32, 0);
    }
    (out, header_len)
}

/// Write the tiny GGUF with `edit` applied to its parts, under `root/name.gguf`.
fn gguf_file(root: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<GgufTensor>)) -> PathBuf {
    let (mut meta, mut tensors) = tiny_gguf_parts();
    edit(&mut meta, &mut tensors);
    let path = root.join(format!("{name}.gguf"));
    std::fs::write(&path, write_gguf(&meta, &tensors).0).unwrap();
    path
}

fn set_meta(meta: &mut [(String, Value)], key: &str, v: Value) {
    meta.iter_mut().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no `{key}`")).1 = v;
}

fn gguf_error(path: &Path) -> String {
    match load_gguf_model(path, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("loading `{}` must fail", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn tiny_gguf_loads_and_runs() {
    let root = scratch();
    let path = gguf_file(root.path(), "ok", |_, _| {});
    let mut m = load_gguf_model(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.model.config().num_hidden_layers, 2);
    assert_eq!(m.tokenizer.encode("ab", false).unwrap(), [5]);
    forward_finite(&mut m);
}

#[test]
fn gguf_metadata_out_of_range_names_the_file_and_the_key() {
    let root = scratch();
    let cases: Vec<(&str, Value, &str)> = vec![
        // Was a division by zero in src/load/gguf.rs.
        ("llama.attention.head_count", Value::U32(0), "metadata `llama.attention.head_count` must be positive (got 0)"),
        (
            "llama.attention.head_count",
            Value::U32(3),
            "metadata `llama.attention.head_count` must divide `llama.embedding_length` = 8 (got 3)",
        ),
        (
            "llama.attention.head_count",
            Value::I32(-2),
            "metadata `llama.attention.head_count` must be a non-negative integer (got I32(-2))",
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(0),
            "`llama.attention.head_count_kv` (`num_key_value_heads`) must be positive (got 0)",
        ),
        (
            "llama.attention.head_count_kv",
            Value::U32(3),
            "`llama.attention.head_count_kv` (`num_key_value_heads`) must divide `num_attention_heads` = 2 (got 3)",
        ),
        ("llama.embedding_length", Value::U32(0), "`llama.embedding_length` (`hidden_size`) must be positive (got 0)"),
        (
            "llama.feed_forward_length",
            Value::U32(0),
            "`llama.feed_forward_length` (`intermediate_size`) must be positive (got 0)",
        ),
        (
            "llama.context_length",
            Value::U32(0),
            "`llama.context_length` (`max_position_embeddings`) must be positive (got 0)",
        ),
        ("llama.block_count", Value::U32(0), "`llama.block_count` (`num_hidden_layers`) must be positive (got 0)"),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(-1.0),
            "`llama.attention.layer_norm_rms_epsilon` (`rms_norm_eps`) must be a positive finite number (got -1)",
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::String("x".into()),
            "metadata `llama.attention.layer_norm_rms_epsilon` must be a float",
        ),
        (
            "llama.rope.freq_base",
            Value::F32(0.0),
            "`llama.rope.freq_base` (`rope_theta`) must be a positive finite number",
        ),
        (
            "llama.rope.freq_base",
            Value::F32(f32::NAN),
            "`llama.rope.freq_base` (`rope_theta`) must be a positive finite number",
        ),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        let path = gguf_file(root.path(), &i.to_string(), |m, _| set_meta(m, key, value));
        assert_says(&gguf_error(&path), &[&format!("{}: ", path.display()), want]);
    }
}

#[test]
fn gguf_shapes_and_layers_must_match_the_metadata() {
    let root = scratch();
    let path = gguf_file(root.path(), "ffn", |m, _| set_meta(m, "llama.feed_forward_length", Value::U32(17)));
    assert_says(
        &gguf_error(&path),
        &[&format!(
            "{}: tensor `blk.0.ffn_gate.weight` has shape [16, 8] but the GGUF metadata says [17 (`llama.feed_forward_length`), 8 (`llama.embedding_length`)]",
            path.display()
        )],
    );
    // 10^9 layers used to abort on allocation.
    for n in [3u64, 1_000_000_000] {
        let path =
            gguf_file(root.path(), &format!("layers{n}"), |m, _| set_meta(m, "llama.block_count", Value::U64(n)));
        assert_says(
            &gguf_error(&path),
            &[&format!(
                "{}: holds 2 decoder layers but the GGUF metadata says `llama.block_count` = {n}",
                path.display()
            )],
        );
    }
    let path = gguf_file(root.path(), "fewer", |m, _| set_meta(m, "llama.block_count", Value::U32(1)));
    assert_says(&gguf_error(&path), &["belongs to layer 1 but the GGUF metadata says `llama.block_count` = 1"]);
    let path = gguf_file(root.path(), "missing", |_, t| t.retain(|t| t.name != "blk.1.ffn_down.weight"));
    assert_says(&gguf_error(&path), &[&format!("{}: has no tensor `blk.1.ffn_down.weight`", path.display())]);
    let path = gguf_file(root.path(), "embd", |_, t| t[0].dims = vec![64]);
    assert_says(
        &gguf_error(&path),
        &[&format!("{}: tensor `token_embd.weight` has shape [64]; expected [vocab, hidden]", path.display())],
    );
}

#[test]
fn gguf_header_that_used_to_panic_is_an_error() {
    let root = scratch();
    // An alignment of 0: a division by zero inside candle's reader.
    let path = gguf_file(root.path(), "align", |m, _| m.push(("general.alignment".into(), Value::U32(0))));
    assert_says(
        &gguf_error(&path),
        &[&format!("{}: metadata `general.alignment` must be positive (got 0)", path.display())],
    );
    // A shape whose element count overflows: an overflow panic when the tensor was read.
    let path = gguf_file(root.path(), "overflow", |_, t| t[2].dims = vec![1 << 40, 1 << 40]);
    assert_says(
        &gguf_error(&path),
        &[
            &format!("{}: tensor `blk.0.attn_norm.weight` of shape [1099511627776, 1099511627776]", path.display()),
            "does not fit in the file",
        ],
    );
    // More token types than tokens: an index out of bounds.
    let path = gguf_file(root.path(), "types", |m, _| {
        set_meta(m, "tokenizer.ggml.token_type", Value::Array((0..20).map(|_| Value::I32(3)).collect()));
    });
    assert_says(
        &gguf_error(&path),
        &["`tokenizer.ggml.token_type` has 20 entries but `tokenizer.ggml.tokens` has 8", &path.display().to_string()],
    );
    // Counts far beyond the file.
    let (mut bytes, _) = {
        let (m, t) = tiny_gguf_parts();
        write_gguf(&m, &t)
    };
    bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    let path = root.path().join("count.gguf");
    std::fs::write(&path, &bytes).unwrap();
    assert_says(&gguf_error(&path), &[&format!("{}: not a valid GGUF file: the header declares", path.display())]);
}

// ---------------------------------------------------------------------------------------------
// Randomized: mutated and truncated files, 2,000 each

/// One byte-level mutation: `(kind, position seed, value seed)`.
type Mutation = (u8, u64, u64);

/// Numbers that break readers: zeros, ones, powers of two near type limits, the file length.
fn interesting(seed: u64, file_len: usize) -> u64 {
    const V: [u64; 12] =
        [0, 1, 2, 3, 255, 65535, 1 << 31, u32::MAX as u64, 1 << 32, 1 << 62, i64::MAX as u64, u64::MAX];
    match seed % 14 {
        12 => file_len as u64,
        13 => seed >> 8,
        i => V[i as usize],
    }
}

/// Apply mutations to `bytes`, aimed at `bytes[..hot]` three times in four.
fn mutate(bytes: &mut Vec<u8>, hot: usize, muts: &[Mutation]) {
    for &(kind, p, v) in muts {
        if bytes.is_empty() {
            return;
        }
        let span = if p % 4 != 0 { hot.clamp(1, bytes.len()) } else { bytes.len() };
        let pos = ((p >> 2) % span as u64) as usize;
        match kind % 6 {
            0 => bytes[pos] ^= 1 << (v % 8),
            1 => bytes[pos] = v as u8,
            2 => {
                // An integer field overwritten with a value readers choke on.
                let w = if v % 2 == 0 { 8 } else { 4 };
                let x = interesting(v >> 1, bytes.len()).to_le_bytes();
                let end = (pos + w).min(bytes.len());
                bytes[pos..end].copy_from_slice(&x[..end - pos]);
            }
            3 => bytes.truncate(pos),
            4 => {
                bytes.insert(pos, v as u8);
            }
            _ => {
                bytes.remove(pos);
            }
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    (any::<u8>(), any::<u64>(), any::<u64>())
}

/// Runs `cases` random cases of `test` (no regression files written).
fn run_cases<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let config = Config { cases, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

#[test]
fn mutated_gguf_files_never_panic_and_errors_name_the_file() {
    let root = scratch();
    let (meta, tensors) = tiny_gguf_parts();
    let (base, header_len) = write_gguf(&meta, &tensors);
    let path = root.path().join("fuzz.gguf");
    let errors = std::cell::Cell::new(0);
    run_cases(2000, prop::collection::vec(mutation(), 1..5), |muts| {
        let mut bytes = base.clone();
        mutate(&mut bytes, header_len, &muts);
        std::fs::write(&path, &bytes).unwrap();
        match load_gguf_model(&path, DType::F32, &Device::Cpu) {
            Err(e) => {
                let msg = format!("{e:#}");
                prop_assert!(msg.contains(&path.display().to_string()), "the error does not name the file: {msg}");
                errors.set(errors.get() + 1);
            }
            Ok(mut m) => {
                // Whatever loads must run (weights may be any bytes, so no finiteness check).
                let ids = Tensor::new(&[[0u32, 1, 2]], &Device::Cpu).unwrap();
                for k in [Kernels::Plain, Kernels::Fused] {
                    m.model.set_kernels(k);
                    m.model.token_logps(&ids, None).unwrap();
                }
            }
        }
        Ok(())
    });
    eprintln!("{} of 2000 mutated GGUF files refused", errors.get());
    assert!(
        errors.get() > 1000,
        "only {} of 2000 mutated files were refused: the mutations miss the header",
        errors.get()
    );
}

/// A tiny transformers directory made for the fuzzer (width 8, 2 layers, the fixture's
/// 384-token tokenizer): small files make 2,000 cases quick.
fn tiny_hf_dir(root: &Path) -> PathBuf {
    let dir = root.join("hf");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama-tiny/policy").join(f), dir.join(f)).unwrap();
    }
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384, "hidden_size": 8,
        "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "eos_token_id": 1, "pad_token_id": 0, "attention_bias": false, "mlp_bias": false
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let mut shapes: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![384, 8]), ("model.norm.weight".into(), vec![8])];
    for i in 0..2 {
        for (module, dims) in [
            ("input_layernorm", vec![8]),
            ("self_attn.q_proj", vec![8, 8]),
            ("self_attn.k_proj", vec![4, 8]),
            ("self_attn.v_proj", vec![4, 8]),
            ("self_attn.o_proj", vec![8, 8]),
            ("post_attention_layernorm", vec![8]),
            ("mlp.gate_proj", vec![16, 8]),
            ("mlp.up_proj", vec![16, 8]),
            ("mlp.down_proj", vec![8, 16]),
        ] {
            shapes.push((format!("model.layers.{i}.{module}.weight"), dims));
        }
    }
    let mut state = 99u64;
    let tensors: HashMap<String, Tensor> = shapes
        .into_iter()
        .map(|(name, dims)| {
            let n: usize = dims.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let x = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5;
                    if name.contains("norm") {
                        1.0 + x * 0.1
                    } else {
                        x
                    }
                })
                .collect();
            let t = Tensor::from_vec(values, dims, &Device::Cpu).unwrap();
            (name, t)
        })
        .collect();
    candle::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    dir
}

/// Mutate one `config.json` field to a value from a list of troublemakers, or drop it.
fn mutate_config(text: &str, field_seed: u64, value_seed: u64) -> String {
    const FIELDS: [&str; 22] = [
        "model_type",
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "rope_parameters",
        "rope_scaling",
        "max_position_embeddings",
        "sliding_window",
        "tie_word_embeddings",
        "eos_token_id",
        "pad_token_id",
        "attention_bias",
        "mlp_bias",
        "hidden_act",
        "num_labels",
    ];
    let values = [
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(4),
        json!(8),
        json!(16),
        json!(384),
        json!(-1),
        json!(1e-30),
        json!(1e300),
        json!(0.5),
        json!(1_000_000_000_000u64),
        json!(u64::MAX),
        json!("x"),
        json!("qwen2"),
        json!("mistral"),
        json!(null),
        json!(true),
        json!([]),
        json!({}),
        json!(["LlamaForSequenceClassification"]),
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
        json!({"rope_type": "llama3", "factor": 0.0}),
        json!({"rope_type": "yarn"}),
        json!({"rope_theta": 0.0}),
        json!({"rope_theta": "x"}),
    ];
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    let obj = v.as_object_mut().unwrap();
    let field = FIELDS[(field_seed % FIELDS.len() as u64) as usize];
    if value_seed.is_multiple_of(10) {
        obj.remove(field);
    } else {
        obj.insert(field.into(), values[(value_seed / 10 % values.len() as u64) as usize].clone());
    }
    v.to_string()
}

#[test]
fn mutated_transformers_dirs_never_panic_and_errors_name_the_file() {
    let root = scratch();
    let dir = tiny_hf_dir(root.path());
    let config0 = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let weights0 = std::fs::read(dir.join("model.safetensors")).unwrap();
    let header_len = 8 + u64::from_le_bytes(weights0[..8].try_into().unwrap()) as usize;
    let errors = std::cell::Cell::new(0);
    // (which file, structured config edits, byte mutations)
    let strategy =
        (0u8..4, prop::collection::vec((any::<u64>(), any::<u64>()), 0..3), prop::collection::vec(mutation(), 1..4));
    run_cases(2000, strategy, |(target, edits, muts)| {
        let mut config = config0.clone();
        let mut weights = weights0.clone();
        // 0: config fields, 1: config bytes, 2 and 3: safetensors header bytes.
        let file = match target {
            0 => {
                for &(f, v) in &edits {
                    config = mutate_config(&config, f, v);
                }
                if edits.is_empty() {
                    config = mutate_config(&config, muts[0].1, muts[0].2);
                }
                "config.json"
            }
            1 => {
                let mut b = config.into_bytes();
                mutate(&mut b, usize::MAX, &muts);
                config = String::from_utf8_lossy(&b).into_owned();
                "config.json"
            }
            _ => {
                mutate(&mut weights, header_len, &muts);
                "model.safetensors"
            }
        };
        std::fs::write(dir.join("config.json"), &config).unwrap();
        std::fs::write(dir.join("model.safetensors"), &weights).unwrap();
        match load_hf_dir(&dir, DType::F32, &Device::Cpu) {
            Err(e) => {
                let msg = format!("{e:#}");
                prop_assert!(
                    msg.contains(&dir.display().to_string()) && msg.contains(file),
                    "the error does not name `{file}`: {msg}"
                );
                errors.set(errors.get() + 1);
            }
            Ok(mut m) => {
                let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
                for k in [Kernels::Plain, Kernels::Fused] {
                    m.model.set_kernels(k);
                    m.model.token_logps(&ids, None).unwrap();
                }
            }
        }
        Ok(())
    });
    eprintln!("{} of 2000 mutated directories refused", errors.get());
    assert!(errors.get() > 1000, "only {} of 2000 mutated directories were refused", errors.get());
}

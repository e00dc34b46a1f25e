//! The GGUF loader on files written here: the tiny Llama converted the way llama.cpp converts
//! (q/k rows permuted, tokenizer and chat template as metadata) must give transformers' logits
//! (the values recorded in `llama-tiny/expected.json`) and token ids, and every ggml type candor promises must dequantize to the original weights
//! within that type's precision.

mod common;

use candle::quantized::gguf_file::{self, Value};
use candle::quantized::{GgmlDType, QTensor};
use candle::{DType, Device, Tensor};
use candor::load::{gguf::load_gguf, load_gguf_model, load_hf_dir};
use candor::model::ForwardOptions;
use common::*;

/// llama.cpp's `permute` of q/k rows (the inverse of what the loader undoes).
fn permute(w: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// llama.cpp's tensor name for a transformers name.
fn gguf_name(hf: &str) -> String {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    let rest = hf.strip_prefix("model.layers.").unwrap();
    let (layer, rest) = rest.split_once('.').unwrap();
    let (module, kind) = rest.rsplit_once('.').unwrap();
    let part = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        other => panic!("unexpected module {other}"),
    };
    format!("blk.{layer}.{part}.{kind}")
}

struct Shape {
    layers: usize,
    hidden: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
}

/// Tokenizer metadata from the tiny tokenizer's `tokenizer.json`, as llama.cpp writes it.
fn tokenizer_metadata() -> Vec<(String, Value)> {
    let tok = json("tokenizer/tokenizer.json");
    let mut tokens: Vec<(u32, String)> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(t, id)| (id.as_u64().unwrap() as u32, t.clone()))
        .collect();
    tokens.sort();
    let special: Vec<u32> =
        tok["added_tokens"].as_array().unwrap().iter().map(|a| a["id"].as_u64().unwrap() as u32).collect();
    let merges: Vec<Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Value::String(format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())))
        .collect();
    let chat = std::fs::read_to_string(fixture("tokenizer/chat_template.jinja")).unwrap();
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens.iter().map(|(_, t)| Value::String(t.clone())).collect())),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(tokens.iter().map(|(id, _)| Value::I32(if special.contains(id) { 3 } else { 1 })).collect()),
        ),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
        ("tokenizer.chat_template".into(), Value::String(chat)),
    ]
}

/// Write `weights` (transformers names) as a llama GGUF, 2-D weights in `dtype`.
fn write_gguf(path: &std::path::Path, shape: &Shape, weights: &[(String, Tensor)], dtype: GgmlDType) {
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), Value::U32(shape.layers as u32)),
        ("llama.embedding_length".into(), Value::U32(shape.hidden as u32)),
        ("llama.feed_forward_length".into(), Value::U32(shape.ffn as u32)),
        ("llama.attention.head_count".into(), Value::U32(shape.heads as u32)),
        ("llama.attention.head_count_kv".into(), Value::U32(shape.kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon".into(), Value::F32(1e-5)),
        ("llama.rope.freq_base".into(), Value::F32(10000.0)),
        ("llama.context_length".into(), Value::U32(256)),
    ];
    meta.extend(tokenizer_metadata());
    let tensors: Vec<(String, QTensor)> = weights
        .iter()
        .map(|(name, w)| {
            let w = if name.contains("q_proj") {
                permute(w, shape.heads)
            } else if name.contains("k_proj") {
                permute(w, shape.kv_heads)
            } else {
                w.clone()
            };
            let ty = if w.rank() == 2 { dtype } else { GgmlDType::F32 };
            (gguf_name(name), QTensor::quantize(&w, ty).unwrap())
        })
        .collect();
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

#[test]
fn tiny_llama_from_gguf_equals_the_transformers_checkpoint() {
    let hf = load("llama-tiny/policy");
    let dir = common::scratch();
    let path = dir.path().join("tiny.gguf");
    let shape = Shape { layers: 2, hidden: 64, ffn: 128, heads: 4, kv_heads: 2 };
    write_gguf(&path, &shape, &hf.model.named_weights().unwrap(), GgmlDType::F32);
    let g = load_gguf_model(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(g.model.config().head_dim, 16);
    let exp = json("llama-tiny/expected.json");
    let ids: Vec<Vec<u32>> = exp["batch"]["input_ids"].as_array().unwrap().iter().map(u32s).collect();
    let attn: Vec<Vec<u32>> = exp["batch"]["attention_mask"].as_array().unwrap().iter().map(u32s).collect();
    let (ids, attn) = (Tensor::new(ids, &Device::Cpu).unwrap(), Tensor::new(attn, &Device::Cpu).unwrap());
    let opts = ForwardOptions { attention_mask: Some(&attn), positions: None };
    let a = hf.model.forward(&ids, opts, None).unwrap();
    let b = g.model.forward(&ids, opts, None).unwrap();
    // The GGUF model's logits are transformers' (`expected.json`, from the transformers
    // checkpoint in float32): every logit of row 0's valid positions, and the first 20 at every
    // valid position of all six rows.
    let len = exp["logits_example0"]["length"].as_u64().unwrap() as usize;
    let all: Vec<Vec<Vec<f32>>> = b.to_vec3().unwrap();
    for (t, want) in exp["logits_example0"]["values"].as_array().unwrap().iter().enumerate().take(len) {
        let got: Vec<f64> = all[0][t].iter().map(|&v| v as f64).collect();
        assert_close(&format!("gguf logits[0, {t}] vs transformers"), &got, &f64s(want), 1e-4);
    }
    for (r, per_pos) in exp["logits_checksums_all_rows"]["first20_per_position"].as_array().unwrap().iter().enumerate()
    {
        for (t, want) in per_pos.as_array().unwrap().iter().enumerate() {
            let got: Vec<f64> = all[r][t][..20].iter().map(|&v| v as f64).collect();
            assert_close(&format!("gguf logits[{r}, {t}, :20] vs transformers"), &got, &f64s(want), 1e-4);
        }
    }
    // ... and equal to candor's own load of the safetensors checkpoint to float32 rounding.
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "logits differ by {diff}");
    // The tokenizer gives transformers' token ids; the chat template is the one in the files.
    for (ex, want) in
        exp["examples"].as_array().unwrap().iter().zip(exp["tokenization"]["per_example"].as_array().unwrap())
    {
        let text = ex["prompt"].as_str().unwrap();
        assert_eq!(g.tokenizer.encode(text, true).unwrap(), u32s(&want["tok(prompt)"]), "{text:?}");
    }
    assert_eq!(g.tokenizer.encode("<|im_start|>user", false).unwrap()[0], 2);
    assert_eq!(g.eos_token_ids, vec![1]);
    let msgs = [candor::load::Message { role: "user".into(), content: "hi".into() }];
    assert_eq!(
        g.chat_template.unwrap().render(&msgs, true).unwrap(),
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    );
}

/// Deterministic pseudo-random weights (no RNG dependency).
fn synthetic(rows: usize, cols: usize, seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap()
}

#[test]
fn every_promised_ggml_type_dequantizes_to_the_original_weights() {
    // Widths are multiples of 256 so the k-quants (256-value super-blocks) apply.
    let shape = Shape { layers: 1, hidden: 256, ffn: 512, heads: 4, kv_heads: 2 };
    let hd = 64;
    let mut weights: Vec<(String, Tensor)> = vec![("model.embed_tokens.weight".into(), synthetic(384, 256, 1))];
    let p = "model.layers.0";
    for (i, (name, rows, cols)) in [
        ("self_attn.q_proj", 4 * hd, 256),
        ("self_attn.k_proj", 2 * hd, 256),
        ("self_attn.v_proj", 2 * hd, 256),
        ("self_attn.o_proj", 256, 256),
        ("mlp.gate_proj", 512, 256),
        ("mlp.up_proj", 512, 256),
        ("mlp.down_proj", 256, 512),
    ]
    .into_iter()
    .enumerate()
    {
        weights.push((format!("{p}.{name}.weight"), synthetic(rows, cols, 10 + i as u64)));
    }
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        weights.push((format!("{p}.{norm}.weight"), Tensor::ones(256, DType::F32, &Device::Cpu).unwrap()));
    }
    weights.push(("model.norm.weight".into(), Tensor::ones(256, DType::F32, &Device::Cpu).unwrap()));
    // Relative L2 error each type may have (values uniform in ±0.1).
    let types = [
        (GgmlDType::F32, 0.0),
        (GgmlDType::F16, 1e-3),
        (GgmlDType::BF16, 1e-2),
        (GgmlDType::Q8_0, 1e-2),
        (GgmlDType::Q6K, 3e-2),
        (GgmlDType::Q5K, 5e-2),
        (GgmlDType::Q4K, 0.1),
        (GgmlDType::Q4_1, 0.1),
        (GgmlDType::Q4_0, 0.15),
    ];
    let dir = common::scratch();
    for (ty, tolerance) in types {
        let path = dir.path().join(format!("{ty:?}.gguf"));
        write_gguf(&path, &shape, &weights, ty);
        let g = load_gguf(&path).unwrap_or_else(|e| panic!("{ty:?}: {e:#}"));
        assert!(g.config.tie_word_embeddings);
        for (name, original) in &weights {
            let loaded = g.weights.dequantized(name).unwrap();
            let err =
                (&loaded - original).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            let norm = original.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap().sqrt();
            assert!(err <= tolerance * norm + 1e-7, "{ty:?} `{name}`: relative error {}", err / norm);
        }
    }
}

#[test]
fn bad_gguf_files_are_named_in_the_error() {
    let dir = common::scratch();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"not a gguf file at all").unwrap();
    let err = format!("{:#}", load_gguf(&path).err().unwrap());
    assert!(err.contains("broken.gguf") && err.contains("not a valid GGUF"), "{err}");
    let err = format!("{:#}", load_hf_dir(dir.path(), DType::F32, &Device::Cpu).err().unwrap());
    assert!(err.contains("config.json"), "{err}");
}

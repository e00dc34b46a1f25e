//! LoRA over a packed, frozen base (QLoRA on the CPU). On SmolLM2's GGUF, kept in its stored
//! Q4_1/Q8_0 blocks or quantized again at load (`--base-quant`), summed log-probs and every
//! LoRA gradient equal those of the same model with its weights dequantized to f32 (log-probs
//! within 1e-5 relative, gradients within 1e-4 of their largest entry), on both kernel paths,
//! with prompts the fixtures never use. The CLI trains and generates on such a base.

mod common;

use std::sync::OnceLock;

use candle::quantized::GgmlDType;
use candle::{DType, Device, Tensor};
use candor::data::{collate, Batch, SequenceTokenizer, Text};
use candor::generate::{generate, SamplingConfig};
use candor::load::{default_model, load_model_packed, LoadedModel};
use candor::model::lora::LoraConfig;
use candor::model::{CausalLm, Kernels, Packing};
use candor::scoring::completion_logps;
use common::*;

fn smollm2(packing: Packing) -> LoadedModel {
    static PATH: OnceLock<String> = OnceLock::new();
    let path = PATH
        .get_or_init(|| default_model::fetch(&default_model::PRESETS[0]).expect("fetch SmolLM2").display().to_string());
    load_model_packed(path, DType::F32, &Device::Cpu, packing).unwrap()
}

/// Three prompt/completion rows of unequal lengths (code, digits, accents), right-padded.
fn batch(m: &LoadedModel) -> Batch {
    let tok = SequenceTokenizer {
        tokenizer: &m.tokenizer,
        chat_template: m.chat_template.as_ref(),
        truncation: Default::default(),
    };
    let rows = [
        (
            "Name three rivers that cross Prague.",
            "The Vltava crosses Prague; the Berounka and the Botič join it nearby.",
        ),
        ("fn add(a: i32, b: i32) -> i32 {", " a + b }"),
        ("What is 17 × 23?", "17 × 23 = 391, since 17 × 20 = 340 and 17 × 3 = 51."),
    ];
    let seqs: Vec<_> = rows
        .iter()
        .map(|(p, c)| tok.prompt_completion(&Text::Plain(p.to_string()), &Text::Plain(c.to_string())).unwrap())
        .collect();
    collate(&seqs.iter().collect::<Vec<_>>(), m.tokenizer.pad_id(), &Device::Cpu).unwrap()
}

/// Summed log-probs of `batch` under `model` with rank-4 adapters on every projection (B set
/// to a fixed nonzero pattern so that both factors get a gradient), and the gradient of their
/// sum for every adapter factor, by PEFT name.
fn logps_and_lora_grads(model: &CausalLm, batch: &Batch) -> (Vec<f64>, Vec<(String, Tensor)>) {
    let mut m = model.clone();
    let targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    let cfg = LoraConfig { r: 4, alpha: 8.0, targets: targets.map(String::from).to_vec(), ..Default::default() };
    m.add_lora(&cfg, 11).unwrap();
    m.visit_linears_mut(&mut |_, _, lin| {
        let ad = lin.lora.as_mut().unwrap();
        let n = ad.b.elem_count() as u32;
        ad.b = (Tensor::arange(0u32, n, &Device::Cpu)?.to_dtype(DType::F32)?.sin()? * 0.01)?.reshape(ad.b.shape())?;
        Ok(())
    })
    .unwrap();
    let vars = m.make_lora_trainable().unwrap();
    let logps = completion_logps(&m, batch).unwrap();
    let grads = logps.sum_all().unwrap().backward().unwrap();
    // Checkpointed blocks hand their weights' gradients over through the model's sink.
    let checkpointed = m.take_checkpoint_grads();
    let grad = |v: &candle::Var| checkpointed.get(&v.as_tensor().id()).or(grads.get(v.as_tensor())).unwrap().clone();
    (values(&logps), vars.iter().map(|(name, v)| (name.clone(), grad(v))).collect())
}

/// `packed` and `dense` (the same weights, dequantized) give the same log-probs and LoRA
/// gradients on both kernel paths.
fn assert_same_as_dequantized(what: &str, packed: &LoadedModel, dense: &CausalLm) {
    let batch = batch(packed);
    for kernels in [Kernels::Fused, Kernels::Plain] {
        let (mut p, mut d) = (packed.model.clone(), dense.clone());
        p.set_kernels(kernels);
        d.set_kernels(kernels);
        let (lp, gp) = logps_and_lora_grads(&p, &batch);
        let (ld, gd) = logps_and_lora_grads(&d, &batch);
        assert_rel(&format!("{what} {kernels}: summed log-probs"), &lp, &ld, 1e-5);
        assert_eq!(gp.len(), 30 * 7 * 2);
        for ((name, a), (_, b)) in gp.iter().zip(&gd) {
            let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let err = max_abs_diff(a, b);
            assert!(
                scale > 0.0 && err <= 1e-4 * scale,
                "{what} {kernels}: `{name}` gradient off by {err} (largest {scale})"
            );
        }
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn dequantized(m: &LoadedModel) -> CausalLm {
    let mut dense = m.model.clone();
    dense.unpack().unwrap();
    dense
}

/// As stored, SmolLM2's GGUF keeps its projections in Q4_1 (20 bytes per 32 values) and the tied
/// embedding in Q8_0 (34 per 32): 96 MB instead of 538 MB of f32, computing what the
/// dequantized f32 model computes.
#[test]
fn stored_gguf_blocks_compute_what_their_dequantized_weights_do() {
    let packed = smollm2(Packing::AsStored);
    let dense = smollm2(Packing::Dense);
    let f32_bytes = dense.model.parameter_count() * 4;
    assert_eq!(packed.model.parameter_count(), dense.model.parameter_count());
    let packed_bytes = packed.model.packed_bytes();
    let projections: usize = 30 * (3 * 576 * 1536 + 2 * 576 * 576 + 2 * 576 * 192);
    let embedding = 49_152 * 576;
    assert_eq!(packed_bytes, projections / 32 * 20 + embedding / 32 * 34, "{packed_bytes} of {f32_bytes} bytes");
    // Dequantizing the stored blocks gives exactly the weights the dense load holds.
    let unpacked = dequantized(&packed);
    for ((name, a), (_, b)) in unpacked.named_weights().unwrap().iter().zip(&dense.model.named_weights().unwrap()) {
        assert_eq!(max_abs_diff(a, b), 0.0, "{name}");
    }
    assert_same_as_dequantized("as stored", &packed, &dense.model);
}

/// `--base-quant` re-quantizes at load: Q8_0, Q4_K (576-wide rows fall back to Q5_0 as in
/// llama.cpp; the 1,536-wide `down_proj` rows take Q4_K) and bf16 (the embedding stays in its
/// stored Q8_0 throughout).
#[test]
fn requantized_bases_compute_what_their_dequantized_weights_do() {
    for kind in [GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::BF16] {
        let packed = smollm2(Packing::Quantize(kind));
        let bytes_per_value = packed.model.packed_bytes() as f64 / packed.model.parameter_count() as f64;
        let expected = match kind {
            GgmlDType::Q8_0 => 34.0 / 32.0,
            GgmlDType::BF16 => 2.0,
            _ => 0.6, // Q5_0 (22/32) and Q4_K (144/256) with the Q8_0 embedding
        };
        assert!((bytes_per_value - expected).abs() < 0.2, "{kind:?}: {bytes_per_value} bytes per value");
        assert_same_as_dequantized(&format!("{kind:?}"), &packed, &dequantized(&packed));
    }
}

/// Greedy decoding from the packed base (the matrix-vector path) picks the tokens the
/// dequantized model picks.
#[test]
fn greedy_decoding_from_packed_weights_matches_dense() {
    let packed = smollm2(Packing::Quantize(GgmlDType::Q8_0));
    let dense = dequantized(&packed);
    let prompt = packed.tokenizer.encode("The three primary colours of light are", false).unwrap();
    let cfg = SamplingConfig { max_new_tokens: 24, temperature: 0.0, ..Default::default() };
    let eos = packed.eos_token_ids.clone();
    let tokens = |m: &CausalLm| {
        let out = generate(m, std::slice::from_ref(&prompt), &eos, packed.tokenizer.pad_id(), &cfg, |_, _| {}).unwrap();
        out[0].tokens.clone()
    };
    let (a, b) = (tokens(&packed.model), tokens(&dense));
    assert!(a.len() >= 8, "{a:?}");
    assert_eq!(a, b);
}

/// A full-weight model cannot train packed projections: the error says what to do.
#[test]
fn packed_projections_refuse_full_weight_training() {
    let mut packed = smollm2(Packing::AsStored).model;
    let err = packed.make_trainable().unwrap_err().to_string();
    assert!(err.contains("LoRA") && err.contains("--base-quant"), "{err}");
}

/// `candor train` with LoRA over a Q8_0 base: the run starts at DPO's ln 2 (the reference is the
/// same packed base with the adapters off), trains and saves a PEFT adapter that records its
/// base; `--merge-lora` merges into that base; `candor generate --base-quant q8_0` decodes.
#[test]
fn cli_trains_lora_over_a_quantized_base_and_generates() {
    let dir = scratch();
    let out = dir.path().join("run");
    let data = dir.path().join("pairs.jsonl");
    head_lines("data/preference/train.jsonl", 8, &data);
    candor_train(&[
        "--objective",
        "dpo",
        "--model",
        "default",
        "--base-quant",
        "q8_0",
        "--data",
        data.to_str().unwrap(),
        "--lora-r",
        "8",
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
        "--output",
        out.to_str().unwrap(),
    ]);
    let adapter = out.join("final/adapter");
    assert!(adapter.join("adapter_model.safetensors").exists());
    assert_eq!(std::fs::read_to_string(adapter.join("candor_base.json")).unwrap(), r#"{"base_quant":"q8_0"}"#);
    // Merged export: into the Q8_0 base dequantized (what the adapter was trained over), said
    // on stderr; the merged model computes what base + adapter compute.
    let merged = dir.path().join("merged");
    let o = candor(&[
        "export",
        "--checkpoint",
        adapter.to_str().unwrap(),
        "--merge-lora",
        "--output",
        merged.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("trained over a quantized base"));
    let with_adapter =
        load_model_packed(adapter.to_str().unwrap(), DType::F32, &Device::Cpu, Packing::AsStored).unwrap();
    let exported = load_model_packed(merged.to_str().unwrap(), DType::F32, &Device::Cpu, Packing::Dense).unwrap();
    let b = batch(&with_adapter);
    let want = values(&completion_logps(&with_adapter.model, &b).unwrap());
    let got = values(&completion_logps(&exported.model, &b).unwrap());
    assert_rel("merged export vs base + adapter", &got, &want, 1e-5);
    let losses = series(&metrics(&out), "loss");
    assert_eq!(losses.len(), 3);
    assert!((losses[0] - std::f64::consts::LN_2).abs() < 1e-4, "first DPO loss {}", losses[0]);
    let o = candor(&[
        "generate",
        "--base-quant",
        "q8_0",
        "--model",
        "default",
        "--prompt",
        "Say hello.",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!String::from_utf8_lossy(&o.stdout).trim().is_empty());
}

/// Gradient checkpointing with LoRA over a frozen, packed base: the embeddings build no graph,
/// so the blocks' input is made a variable (PEFT's `enable_input_require_grads`) and every block
/// really is recomputed in the backward (its adapters' gradients arrive through the checkpoint
/// sink), with the gradients of the run without checkpointing. It once silently skipped
/// checkpointing when the embeddings were frozen.
#[test]
fn lora_over_a_packed_base_checkpoints_every_block() {
    let packed = smollm2(Packing::AsStored);
    let batch = batch(&packed);
    let (plain_logps, plain) = logps_and_lora_grads(&packed.model, &batch);
    let mut checkpointed = packed.model.clone();
    checkpointed.set_gradient_checkpointing(true);
    let (logps, grads) = logps_and_lora_grads(&checkpointed, &batch);
    assert_rel("checkpointed log-probs", &logps, &plain_logps, 1e-6);
    for ((name, a), (_, b)) in grads.iter().zip(&plain) {
        let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max_abs_diff(a, b) <= 1e-5 * scale, "`{name}`: {} (largest {scale})", max_abs_diff(a, b));
    }
    // Every adapter's gradient came through the sink: the blocks were recomputed.
    let mut m = checkpointed.clone();
    let cfg = LoraConfig { r: 2, ..Default::default() };
    m.add_lora(&cfg, 1).unwrap();
    let vars = m.make_lora_trainable().unwrap();
    completion_logps(&m, &batch).unwrap().sum_all().unwrap().backward().unwrap();
    let sink = m.take_checkpoint_grads();
    assert!(
        vars.iter().all(|(_, v)| sink.contains_key(&v.as_tensor().id())),
        "{} of {} in the sink",
        sink.len(),
        vars.len()
    );
}

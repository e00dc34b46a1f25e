//! `candor bench`: the speed figures the README records (load time, generation throughput).

use std::time::Instant;

use anyhow::{bail, Result};
use candor_alignment::{DataNeed, Objective};
use serde_json::json;

use crate::cli::{BenchCommand, BenchGenerateArgs, BenchLoadArgs, BenchTrainArgs, GlobalArgs};
use crate::data::TokenizedSequence;
use crate::generate::{generate, SamplingConfig};
use crate::load::{self, LoadedModel, ModelSource};
use crate::model::CausalLm;
use crate::train::inputs::StepModels;
use crate::train::items::{DistillItem, Item, LabelledItem, PairItem, RolloutItem};
use crate::train::optim::{clip_grad_norm, AdamW, AdamWConfig};
use crate::train::trainer::{accumulate, step_scale};

/// Run `candor bench load|generate`.
pub fn run(cmd: &BenchCommand, global: &GlobalArgs) -> Result<()> {
    match cmd {
        BenchCommand::Load(args) => load_bench(args, global),
        BenchCommand::Generate(args) => generate_bench(args, global),
        BenchCommand::Train(args) => train_bench(args, global),
    }
}

/// Whether `bench train` can time the objective on synthetic token ids: no per-row data (pair
/// rewards) and no extra heads or networks.
fn benchable(objective: &Objective) -> bool {
    objective.degree_heads().is_none()
        && !objective.needs_pair_rewards()
        && !objective.needs_value_head()
        && objective.clip_net().is_none()
}

fn train_bench(args: &BenchTrainArgs, global: &GlobalArgs) -> Result<()> {
    let objective = Objective::default_for(&args.objective)?;
    if !benchable(&objective) {
        let names = Objective::names_where(|spec| Objective::default_for(spec.name).is_ok_and(|o| benchable(&o)));
        bail!("`bench train` measures objectives that need nothing beyond token ids ({}); `{}` needs per-row data or extra heads", names.join(", "), objective.name());
    }
    let mut run = BenchRun::load(args, global, &objective)?;
    let items = synthetic_items(&objective, args, run.policy.config().vocab_size as u64);
    let micro = vec![items.iter().collect::<Vec<_>>()];
    let mut times = Vec::new();
    for step in 0..=args.steps {
        let start = Instant::now();
        run.step(&objective, &micro)?;
        if step > 0 {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let rows = match objective.data_need() {
        DataNeed::Pairs | DataNeed::ScoredPairs => 2 * args.batch_size,
        _ => args.batch_size,
    };
    let tokens = (rows * args.seq_len) as f64;
    // 6·N·T for the policy's forward + backward (4·N·T with LoRA: no weight gradients),
    // 2·N·T for a reference or teacher forward.
    let policy_flops = if args.lora_r.is_some() { 4.0 } else { 6.0 };
    let frozen_forwards = [run.reference.is_some(), run.teacher.is_some()].iter().filter(|&&f| f).count() as f64;
    let flops = tokens * run.params as f64 * (policy_flops + 2.0 * frozen_forwards);
    let report = json!({
        "bench": "train",
        "model": run.origin,
        "objective": objective.name(),
        "device": global.device,
        "dtype": global.dtype,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lora_r": args.lora_r,
        "lora_targets": args.lora_r.map(|_| args.lora_targets.clone()),
        "base_quant": global.base_quant.map(crate::model::packed::kind_name),
        "packed_weight_bytes": run.policy.packed_bytes(),
        "kernels": global.kernels.to_string(),
        "gradient_checkpointing": args.gradient_checkpointing,
        "steps_timed": times.len(),
        "seconds_per_step": median,
        "tokens_per_second": tokens / median,
        "gflops_per_second": flops / median / 1e9,
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "train {} {} x {} tokens ({}): {median:.2} s/step (median of {}), {:.0} tokens/s, {:.1} GFLOP/s, peak RSS {:.2} GB",
            objective.name(),
            args.batch_size,
            args.seq_len,
            global.dtype,
            times.len(),
            tokens / median,
            flops / median / 1e9,
            peak_rss_bytes() as f64 / 1e9
        );
    }
    Ok(())
}

/// The models and optimizer `bench train` steps.
struct BenchRun {
    policy: CausalLm,
    reference: Option<CausalLm>,
    teacher: Option<CausalLm>,
    opt: AdamW,
    /// The policy's parameter count (for the FLOP estimate).
    params: usize,
    origin: String,
}

impl BenchRun {
    /// Load `--model` as `candor train` would for `objective`: bf16 as f32 master weights with
    /// bf16 matmul operands, a frozen reference and teacher (the model teaching a copy of
    /// itself, the same cost as any teacher of its size), LoRA when asked.
    fn load(args: &BenchTrainArgs, global: &GlobalArgs, objective: &Objective) -> Result<Self> {
        let mixed = global.dtype == "bf16";
        let mut load = super::load_options(global)?;
        if mixed {
            load.dtype = candle::DType::F32;
        }
        // Adapters train over a frozen base, packed as `--base-quant` says; every weight
        // trains dense.
        let packing = match args.lora_r {
            Some(_) => crate::model::Packing::frozen(global.base_quant),
            None => crate::model::Packing::Dense,
        };
        let (mut base, origin) = match &args.shape {
            Some(name) => (load::shapes::random_model(name, packing, 0)?, format!("{name} (random weights)")),
            None => {
                let loaded = load.with_packing(packing).load(&args.model.model)?;
                (loaded.model, loaded.origin)
            }
        };
        base.set_matmul_precision(mixed.then_some(candle::DType::BF16));
        let reference = objective.needs_reference().then(|| base.clone());
        let teacher = objective.needs_teacher().then(|| base.frozen_view());
        let mut policy = base;
        if objective.data_need() == DataNeed::ScoredPairs {
            policy.add_score_head(1, 0, 0)?;
        }
        policy.set_gradient_checkpointing(args.gradient_checkpointing);
        let params = policy.parameter_count();
        let vars = match args.lora_r {
            Some(r) => {
                let lora = crate::model::lora::LoraConfig {
                    r,
                    alpha: 2.0 * r as f64,
                    targets: args.lora_targets.clone(),
                    ..Default::default()
                };
                lora.validate()?;
                policy.add_lora(&lora, 0)?;
                policy.make_lora_trainable()?
            }
            None => policy.make_trainable()?,
        };
        let mut opt = AdamW::new(vars, AdamWConfig::default())?;
        opt.set_kernels(global.kernels);
        Ok(Self { policy, reference, teacher, opt, params, origin })
    }

    /// One optimizer step on `micro`.
    fn step(&mut self, objective: &Objective, micro: &[Vec<&Item>]) -> Result<()> {
        let models = StepModels {
            policy: &self.policy,
            reference: self.reference.as_ref(),
            teacher: self.teacher.as_ref(),
            heads: &[],
            pad: 0,
            progress: 0.0,
        };
        let scale = step_scale(micro.iter().flatten().copied());
        let mut acc = accumulate(objective, models, micro, &scale, &self.opt)?;
        clip_grad_norm(&mut acc.grads, 1.0)?;
        self.opt.step(&acc.grads, 1e-6)?;
        Ok(())
    }
}

/// `--batch-size` synthetic rows of exactly `--seq-len` random tokens (first half prompt, second
/// half completion) in the shape `objective` trains on.
fn synthetic_items(objective: &Objective, args: &BenchTrainArgs, vocab: u64) -> Vec<Item> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut sequence = || {
        let ids = (0..args.seq_len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % vocab) as u32
            })
            .collect();
        let completion_mask = (0..args.seq_len).map(|i| u8::from(i >= args.seq_len / 2)).collect();
        TokenizedSequence::new(ids, completion_mask)
    };
    (0..args.batch_size)
        .map(|row| match objective.data_need() {
            DataNeed::Sequences | DataNeed::Hindsight => Item::Sequence(sequence()),
            DataNeed::Pairs | DataNeed::ScoredPairs => {
                let mut pair = PairItem::new(sequence(), sequence());
                pair.previous = objective.needs_previous_iterate().then_some((0.0, 0.0));
                Item::Pair(pair)
            }
            DataNeed::Unpaired => Item::Labelled(LabelledItem { sequence: sequence(), desirable: row % 2 == 0 }),
            DataNeed::Rollouts | DataNeed::TokenRewards | DataNeed::TeacherRollouts | DataNeed::GroupRollouts => {
                let sequence = sequence();
                let old_logps = vec![-1.0; sequence.completion_tokens()];
                let teacher_logps = vec![-1.5; sequence.completion_tokens()];
                let correct = row % 2 == 0;
                let advantage = if correct { 1.0 } else { -1.0 };
                let (accuracy, kd) = (0.5, !correct);
                let reference_logps = teacher_logps.clone();
                let max_tokens = args.seq_len / 2;
                Item::Rollout(RolloutItem {
                    sequence,
                    old_logps,
                    accuracy,
                    correct,
                    advantage,
                    teacher_logps,
                    kd,
                    reference_logps,
                    max_tokens,
                })
            }
            DataNeed::Distill => Item::Distill(DistillItem { sequence: sequence(), teacher_states: None }),
        })
        .collect()
}

/// The prompt ids of row `i`: `prompt_tokens` tokens of a fixed text, or one of eight short
/// questions in the model's chat format.
fn bench_prompts(
    loaded: &LoadedModel,
    prompt_tokens: Option<usize>,
) -> Result<impl Fn(usize) -> Result<Vec<u32>> + '_> {
    const PROMPTS: [&str; 8] = [
        "What is the capital of France? Answer in one sentence.",
        "Write a haiku about the sea.",
        "Explain why the sky is blue.",
        "List three uses of a paperclip.",
        "What is 12 times 7?",
        "Describe a cat to someone who has never seen one.",
        "Give me a tip for learning a language.",
        "Summarize the plot of Cinderella.",
    ];
    let fixed = match prompt_tokens {
        Some(n) => {
            let ids = loaded.tokenizer.encode(&FIXED_TEXT.repeat(n / 40 + 1), false)?;
            Some(ids[..n.min(ids.len())].to_vec())
        }
        None => None,
    };
    Ok(move |i: usize| -> Result<Vec<u32>> {
        if let Some(ids) = &fixed {
            return Ok(ids.clone());
        }
        let text = PROMPTS[i % PROMPTS.len()];
        match loaded.chat_template.as_ref() {
            Some(t) => {
                let msgs = [crate::load::Message { role: "user".into(), content: text.into() }];
                loaded.tokenizer.encode(&t.render(&msgs, true)?, false)
            }
            None => loaded.tokenizer.encode(text, true),
        }
    })
}

/// Generate for `prompts` at once and time it: throughput with the prefill, and decode alone.
fn time_generation(
    model: &CausalLm,
    pad: u32,
    prompts: &[Vec<u32>],
    cfg: &SamplingConfig,
) -> Result<serde_json::Value> {
    let batch = prompts.len();
    let start = Instant::now();
    // The first token of every row comes from the prefill; the rest are decode steps.
    let mut first_token_at: Option<Instant> = None;
    let mut calls = 0usize;
    // No stop tokens: every row generates exactly `max_new_tokens`.
    let gens = generate(model, prompts, &[], pad, cfg, |_, _| {
        calls += 1;
        if calls == batch {
            first_token_at = Some(Instant::now());
        }
    })?;
    let secs = start.elapsed().as_secs_f64();
    let tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
    let decode_secs = first_token_at.map_or(secs, |t| t.elapsed().as_secs_f64());
    let decode_tokens = tokens.saturating_sub(batch);
    Ok(json!({
        "batch_size": batch,
        "new_tokens": tokens,
        "seconds": secs,
        "tokens_per_second": tokens as f64 / secs,
        "tokens_per_second_per_sequence": tokens as f64 / secs / batch as f64,
        "decode_tokens_per_second": decode_tokens as f64 / decode_secs,
    }))
}

/// Peak resident memory of this process (`VmHWM`), 0 where unknown.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn load_bench(args: &BenchLoadArgs, global: &GlobalArgs) -> Result<()> {
    // Resolve `default` (fetching it if needed) outside the timed region.
    let spec = match ModelSource::parse(&args.model.model)? {
        ModelSource::Preset(preset) => load::default_model::fetch(preset)?.display().to_string(),
        _ => args.model.model.clone(),
    };
    let mut best = f64::INFINITY;
    let mut params = 0usize;
    for _ in 0..args.repeats.max(1) {
        let start = Instant::now();
        let loaded = super::load_model(&spec, global)?;
        best = best.min(start.elapsed().as_secs_f64());
        params = loaded.model.parameter_count();
    }
    let report = json!({
        "bench": "load",
        "model": spec,
        "device": global.device,
        "dtype": global.dtype,
        "parameters": params,
        "load_seconds": best,
        "threads": rayon::current_num_threads(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!("load {spec}: {best:.3} s (best of {}), {params} parameters", args.repeats.max(1));
    }
    Ok(())
}

/// The text `--prompt-tokens` prompts are cut from (also in `scripts/bench_transformers_generate.py`).
const FIXED_TEXT: &str = "The river runs past the old mill, under the stone bridge and through the quiet town, where the baker opens his shop before dawn and the children walk to school along the water. ";

fn generate_bench(args: &BenchGenerateArgs, global: &GlobalArgs) -> Result<()> {
    let rows = args.batch_size.max(1);
    let (model, origin, pad, prompts) = match &args.shape {
        Some(name) => {
            let model = load::shapes::random_model(name, crate::model::Packing::frozen(global.base_quant), 0)?;
            let vocab = model.config().vocab_size as u32;
            let n = args.prompt_tokens.unwrap_or(32);
            let prompts =
                (0..rows).map(|r| (0..n).map(|i| (r as u32 * 7919 + i as u32 * 104_729) % vocab).collect()).collect();
            (model, format!("{name} (random weights)"), 0, prompts)
        }
        None => {
            let loaded = super::load_model(&args.model.model, global)?;
            let ids = bench_prompts(&loaded, args.prompt_tokens)?;
            let prompts: Vec<Vec<u32>> = (0..rows).map(ids).collect::<Result<_>>()?;
            let pad = loaded.tokenizer.pad_id();
            (loaded.model, loaded.origin, pad, prompts)
        }
    };
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        seed: 1,
        ..Default::default()
    };
    let decoding = if args.temperature > 0.0 {
        format!("sampled at temperature {}", args.temperature)
    } else {
        "greedy".to_string()
    };
    // Warm-up (page in weights, size allocator pools).
    generate(&model, &prompts[..1], &[], pad, &SamplingConfig { max_new_tokens: 4, ..cfg }, |_, _| {})?;
    let mut results = Vec::new();
    let mut sizes = vec![1];
    if args.batch_size > 1 {
        sizes.push(args.batch_size);
    }
    for &batch in &sizes {
        results.push(time_generation(&model, pad, &prompts[..batch], &cfg)?);
    }
    let report = json!({
        "bench": "generate",
        "model": origin,
        "base_quant": global.base_quant.map(crate::model::packed::kind_name),
        "packed_weight_bytes": model.packed_bytes(),
        "device": global.device,
        "dtype": global.dtype,
        "max_new_tokens": args.max_new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "decoding": format!("{decoding}; tokens_per_second includes the prompt prefill, decode_tokens_per_second counts the steps after the first token"),
        "results": results,
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "generate {} ({}, {}), {decoding}, {} new tokens per prompt:",
            origin, global.device, global.dtype, args.max_new_tokens
        );
        for r in &results {
            println!(
                "  batch {:>3}: {:>8.1} tokens/s in aggregate ({:.1} per sequence) with prefill; decode alone {:.1} tokens/s",
                r["batch_size"],
                r["tokens_per_second"].as_f64().unwrap_or(0.0),
                r["tokens_per_second_per_sequence"].as_f64().unwrap_or(0.0),
                r["decode_tokens_per_second"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

//! `candor bench`: the speed figures the README records (load time, generation throughput).

use std::time::Instant;

use anyhow::Result;
use serde_json::json;

use crate::cli::{BenchCommand, BenchGenerateArgs, BenchLoadArgs, GlobalArgs};
use crate::generate::{generate, SamplingConfig};
use crate::load::{self, ModelSource};

/// Run `candor bench load|generate`.
pub fn run(cmd: &BenchCommand, global: &GlobalArgs) -> Result<()> {
    match cmd {
        BenchCommand::Load(args) => load_bench(args, global),
        BenchCommand::Generate(args) => generate_bench(args, global),
    }
}

fn load_bench(args: &BenchLoadArgs, global: &GlobalArgs) -> Result<()> {
    // Resolve `default` (fetching it if needed) outside the timed region.
    let spec = match ModelSource::parse(&args.model.model)? {
        ModelSource::Default => load::default_model::fetch(&load::default_model::PRESETS[0])?.display().to_string(),
        _ => args.model.model.clone(),
    };
    let mut best = f64::INFINITY;
    let mut params = 0usize;
    for _ in 0..args.repeats.max(1) {
        let start = Instant::now();
        let loaded = super::load_model(&spec, global)?;
        best = best.min(start.elapsed().as_secs_f64());
        params = loaded.model.named_weights().iter().map(|(_, t)| t.elem_count()).sum();
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

fn generate_bench(args: &BenchGenerateArgs, global: &GlobalArgs) -> Result<()> {
    let loaded = super::load_model(&args.model.model, global)?;
    let prompts = [
        "What is the capital of France? Answer in one sentence.",
        "Write a haiku about the sea.",
        "Explain why the sky is blue.",
        "List three uses of a paperclip.",
        "What is 12 times 7?",
        "Describe a cat to someone who has never seen one.",
        "Give me a tip for learning a language.",
        "Summarize the plot of Cinderella.",
    ];
    let template = loaded.chat_template.as_ref();
    let ids = |i: usize| -> Result<Vec<u32>> {
        let text = prompts[i % prompts.len()];
        match template {
            Some(t) => {
                let msgs = [crate::load::Message { role: "user".into(), content: text.into() }];
                loaded.tokenizer.encode(&t.render(&msgs, true)?, false)
            }
            None => loaded.tokenizer.encode(text, true),
        }
    };
    let cfg = SamplingConfig { max_new_tokens: args.max_new_tokens, ..Default::default() };
    let pad = loaded.tokenizer.pad_id();
    // Warm-up (page in weights, size allocator pools).
    generate(&loaded.model, &[ids(0)?], &[], pad, &SamplingConfig { max_new_tokens: 4, ..cfg }, |_, _| {})?;
    let mut results = Vec::new();
    let mut sizes = vec![1];
    if args.batch_size > 1 {
        sizes.push(args.batch_size);
    }
    for &batch in &sizes {
        let batch_prompts: Vec<Vec<u32>> = (0..batch).map(ids).collect::<Result<_>>()?;
        let start = Instant::now();
        // No stop tokens: every row generates exactly `max_new_tokens`.
        let gens = generate(&loaded.model, &batch_prompts, &[], pad, &cfg, |_, _| {})?;
        let secs = start.elapsed().as_secs_f64();
        let tokens: usize = gens.iter().map(|g| g.tokens.len()).sum();
        results.push(json!({
            "batch_size": batch,
            "new_tokens": tokens,
            "seconds": secs,
            "tokens_per_second": tokens as f64 / secs,
            "tokens_per_second_per_sequence": tokens as f64 / secs / batch as f64,
        }));
    }
    let report = json!({
        "bench": "generate",
        "model": loaded.origin,
        "device": global.device,
        "dtype": global.dtype,
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy, prompt prefill included",
        "results": results,
    });
    if args.json {
        println!("{report}");
    } else {
        println!("generate {} ({}, {}), greedy, {} new tokens per prompt:", loaded.origin, global.device, global.dtype, args.max_new_tokens);
        for r in &results {
            println!(
                "  batch {:>3}: {:>8.1} tokens/s in aggregate ({:.1} per sequence)",
                r["batch_size"], r["tokens_per_second"].as_f64().unwrap_or(0.0), r["tokens_per_second_per_sequence"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

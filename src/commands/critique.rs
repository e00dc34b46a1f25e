//! `candor critique`: the training data of Text2Grad's natural-language reward model. A model
//! answers each prompt, a critic (the rule-based one by default, standing in for the paper's
//! GPT-4o annotator) critiques every answer word by word, and each pair becomes an SFT row whose
//! prompt is the critique request and whose completion is the critique in the official format.
//! `candor train --config configs/critic.toml` then teaches a model to write them.

use anyhow::{Context, Result};
use serde_json::json;

use crate::cli::{CritiqueArgs, GlobalArgs};
use crate::data::{SequenceTokenizer, Truncation};
use crate::eval::winrate::read_prompts;
use crate::generate::{completion_text, sample_groups, SamplingConfig};
use crate::judge::critic::{critique_request, from_spec};
use crate::judge::llm::prompt_text;

/// Run `candor critique`.
pub fn run(args: &CritiqueArgs, global: &GlobalArgs) -> Result<()> {
    let prompts = read_prompts(&args.prompts)?;
    let model = super::load_model(&args.model, global)?;
    let critic = from_spec(&args.critic, args.judge_model.as_deref(), &super::load_options(global)?)?;
    let tok = SequenceTokenizer {
        tokenizer: &model.tokenizer,
        chat_template: model.chat_template.as_ref(),
        truncation: Truncation::default(),
    };
    let ids = prompts.iter().map(|p| tok.prompt_ids(&p.prompt)).collect::<Result<Vec<_>>>()?;
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: 1.0,
        top_k: 0,
        seed: args.seed,
    };
    let groups = sample_groups(
        &model.model,
        &ids,
        0,
        args.samples_per_prompt,
        &model.eos_token_ids,
        model.tokenizer.pad_id(),
        &cfg,
        args.batch_size,
        |_| {},
    )?;
    let mut answers = Vec::new();
    for (p, gens) in prompts.iter().zip(&groups) {
        for g in gens {
            answers.push((p, completion_text(&model.tokenizer, g)?));
        }
    }
    let asked: Vec<_> = answers.iter().map(|(p, a)| (&p.prompt, &p.row, a.as_str())).collect();
    let critiques = critic.critique(&asked)?;
    let mut out = crate::data::JsonLines::create(Some(&args.output))
        .with_context(|| format!("cannot write `{}`", args.output.display()))?;
    let mut written = 0;
    for ((p, answer), critique) in answers.iter().zip(critiques) {
        let Some(critique) = critique else { continue };
        let request = critique_request(&prompt_text(&p.prompt), answer);
        out.write(&json!({
            "prompt": [{"role": "user", "content": request}],
            "completion": [{"role": "assistant", "content": critique.to_json()}],
        }))?;
        written += 1;
    }
    out.finish()?;
    eprintln!(
        "candor: {written} critiques of {} answers by `{}` in {}",
        answers.len(),
        critic.name(),
        args.output.display()
    );
    Ok(())
}

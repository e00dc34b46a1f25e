//! `candor generate`: complete one prompt (streamed) or a JSONL file of prompts (batched).

use std::io::Write;

use anyhow::{bail, Result};
use serde_json::json;

use crate::cli::{GenerateArgs, GlobalArgs};
use crate::data::{read_jsonl, Example, SequenceTokenizer, Text, Truncation};
use crate::generate::{completion_text, generate, SamplingConfig};
use crate::load::{LoadedModel, Message};

/// Run `candor generate`.
pub fn run(args: &GenerateArgs, global: &GlobalArgs) -> Result<()> {
    let loaded = super::load_model(&args.model.model, global)?;
    let cfg = SamplingConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
    };
    if let Some(prompt) = &args.prompt {
        let ids = prompt_ids(&loaded, &Text::Plain(prompt.clone()), args)?;
        return stream_one(&loaded, ids, &cfg, args.output.as_deref(), prompt);
    }
    let path = args.prompts.as_ref().expect("clap requires --prompt or --prompts");
    let data = read_jsonl(path, args.skip_bad_rows)?;
    crate::data::report_skipped(&data.skipped);
    let mut prompts = Vec::with_capacity(data.rows.len());
    for row in &data.rows {
        let Example::Prompt { prompt } = &row.example else {
            bail!(
                "{}:{}: expected a prompt-only row `{{\"prompt\": ...}}`, got a {} row",
                path.display(),
                row.line,
                row.example.kind()
            );
        };
        prompts.push(prompt_ids(&loaded, prompt, args)?);
    }
    let mut out = crate::data::JsonLines::create(args.output.as_deref())?;
    for (chunk_rows, chunk_prompts) in
        data.rows.chunks(args.batch_size.max(1)).zip(prompts.chunks(args.batch_size.max(1)))
    {
        let gens =
            generate(&loaded.model, chunk_prompts, &loaded.eos_token_ids, loaded.tokenizer.pad_id(), &cfg, |_, _| {})?;
        for (row, g) in chunk_rows.iter().zip(&gens) {
            let mut fields = row.fields.clone();
            fields.insert("completion".into(), completion_text(&loaded.tokenizer, g)?.into());
            fields.insert("completion_tokens".into(), g.tokens.len().into());
            fields.insert("finish_reason".into(), serde_json::to_value(g.finish_reason)?);
            out.write(&fields.into())?;
        }
    }
    out.finish()
}

/// Token ids of a prompt: chat prompts (or any prompt with `--chat`) go through the template;
/// `--hindsight-prefix` follows, tokenized on its own as chain-of-hindsight training does.
fn prompt_ids(loaded: &LoadedModel, prompt: &Text, args: &GenerateArgs) -> Result<Vec<u32>> {
    let text = match prompt {
        Text::Plain(p) if args.chat => Text::Chat(vec![Message { role: "user".into(), content: p.clone() }]),
        other => other.clone(),
    };
    let tok = SequenceTokenizer {
        tokenizer: &loaded.tokenizer,
        chat_template: loaded.chat_template.as_ref(),
        truncation: Truncation::default(),
    };
    let mut ids = tok.prompt_ids(&text)?;
    if let Some(prefix) = &args.hindsight_prefix {
        ids.extend(loaded.tokenizer.encode(prefix, false)?);
    }
    Ok(ids)
}

/// Generate for one prompt, printing text as it is produced.
fn stream_one(
    loaded: &LoadedModel,
    ids: Vec<u32>,
    cfg: &SamplingConfig,
    output: Option<&std::path::Path>,
    prompt: &str,
) -> Result<()> {
    let mut tokens: Vec<u32> = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    let eos = &loaded.eos_token_ids;
    let stream = output.is_none();
    let gens = generate(&loaded.model, &[ids], eos, loaded.tokenizer.pad_id(), cfg, |_, token| {
        if !stream || eos.contains(&token) {
            return;
        }
        tokens.push(token);
        // Decode everything so far and print the new suffix: multi-byte characters split
        // across tokens only appear once complete.
        if let Ok(text) = loaded.tokenizer.decode(&tokens, true) {
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{FFFD}') {
                let _ = write!(stdout, "{}", &text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        }
    })?;
    let g = &gens[0];
    let text = completion_text(&loaded.tokenizer, g)?;
    if stream {
        if text.len() > printed {
            write!(stdout, "{}", &text[printed.min(text.len())..])?;
        }
        writeln!(stdout)?;
        return Ok(());
    }
    let mut out = crate::data::JsonLines::create(output)?;
    out.write(&json!({
        "prompt": prompt,
        "completion": text,
        "completion_tokens": g.tokens.len(),
        "finish_reason": g.finish_reason,
    }))?;
    out.finish()
}

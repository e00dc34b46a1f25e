//! The distillation loop (KD, SinKD, DAC-KL), read top to bottom:
//!
//! setup (the student, cut from `model.model` when asked; the frozen teacher) → the training
//! sequences by `distill.source`: the dataset's completions, the teacher's answers to its
//! prompts (generated once, kept in `teacher_outputs.jsonl`), or the student's own answers
//! sampled afresh at every step (optionally corrected by SCRG) → optionally the teacher's final
//! hidden states cached once (`teacher_cache/`) → the shared [`Trainer`]'s steps, whose inputs
//! score every completion position with both models → final export.
//!
//! The teacher never holds a variable: it is a frozen view, its log-probs are computed without
//! a graph, chunk by chunk into one buffer.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle::Tensor;
use serde_json::{Map, Value};

use super::batching::{micro_batches, planned_steps, BatchOrders};
use super::config::{DistillSection, DistillSource, TrainConfig};
use super::items::{load_items, DistillItem, Item};
use super::trainer::{RunOptions, RunSummary, Trainer};
use crate::data::{collate, tokenize_prompts, TokenizedSequence};
use crate::eval::winrate::read_prompts;
use crate::generate::{sample_groups, SamplingConfig};
use crate::model::CausalLm;
use crate::scoring::{chunked_vocab_logps, completion_states};

/// Run (or resume) a distillation objective.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let distill = cfg.distill.clone().unwrap_or_default();
    let mut trainer = Trainer::start(cfg, opts)?;
    let run_dir = &cfg.run.output;
    let train_path = cfg.data.train.as_ref().context("distillation needs `data.train`")?;
    let mut eval_items = match &cfg.data.eval {
        Some(path) => Some(load_items(path, cfg, &trainer.policy, None)?),
        None => None,
    };
    let mut items = match distill.source {
        DistillSource::Dataset => load_items(train_path, cfg, &trainer.policy, None)?,
        DistillSource::Teacher => {
            teacher_answers(&trainer, &distill, train_path, &run_dir.join("teacher_outputs.jsonl"))?
        }
        DistillSource::Student => {
            let prompts = read_prompts(train_path)?;
            tokenize_prompts(&trainer.policy, prompts.iter().map(|p| &p.prompt), cfg.data.max_prompt_length)?
                .into_iter()
                .map(|ids| distill_item(TokenizedSequence::prompt_and_answer(&ids, &[])))
                .collect()
        }
    };
    if items.is_empty() {
        bail!("`{}` holds no rows", train_path.display());
    }
    if distill.teacher_logits_cache {
        let teacher = trainer.teacher.as_ref().context("distillation needs the teacher")?;
        let phase = trainer.phase("caching the teacher's states");
        cache_teacher_states(
            teacher,
            &mut items,
            &run_dir.join("teacher_cache").join("train.safetensors"),
            cfg.run.batch_size,
            trainer.pad,
            trainer.dist().is_main(),
        )?;
        if let Some(eval) = eval_items.as_mut() {
            cache_teacher_states(
                teacher,
                eval,
                &run_dir.join("teacher_cache").join("eval.safetensors"),
                cfg.run.batch_size,
                trainer.pad,
                trainer.dist().is_main(),
            )?;
        }
        phase.done();
    }
    if distill.source == DistillSource::Student {
        train_on_policy(&mut trainer, &distill, &items, eval_items.as_deref())?;
    } else {
        trainer.train_on(&items, eval_items.as_deref())?;
    }
    trainer.finish()
}

fn distill_item(sequence: TokenizedSequence) -> Item {
    Item::Distill(DistillItem { sequence, teacher_states: None })
}

/// Prompt + answer items of the non-empty answers.
fn answer_items(prompts: &[Vec<u32>], answers: &[Vec<u32>]) -> Vec<Item> {
    prompts
        .iter()
        .zip(answers)
        .filter(|(_, a)| !a.is_empty())
        .map(|(p, a)| distill_item(TokenizedSequence::prompt_and_answer(p, a)))
        .collect()
}

/// One sampled answer's tokens per prompt.
fn answer_each(
    model: &CausalLm,
    prompts: &[Vec<u32>],
    stop: &[u32],
    pad: u32,
    cfg: &SamplingConfig,
    batch_size: usize,
) -> Result<Vec<Vec<u32>>> {
    Ok(sample_groups(model, prompts, 0, 1, stop, pad, cfg, batch_size, |_| {})?
        .into_iter()
        .map(|mut g| g.remove(0).tokens)
        .collect())
}

fn sampling(distill: &DistillSection, seed: u64) -> SamplingConfig {
    SamplingConfig {
        max_new_tokens: distill.max_new_tokens,
        temperature: distill.temperature,
        top_p: distill.top_p,
        top_k: 0,
        seed,
    }
}

/// Sequence-level KD's data: the teacher's answer to every prompt of `path`, generated once and
/// kept in `cache` (a `prompt`/`completion` dataset, one row per prompt, with the token ids).
fn teacher_answers(trainer: &Trainer, distill: &DistillSection, path: &Path, cache: &Path) -> Result<Vec<Item>> {
    let cfg = trainer.cfg;
    let prompts = read_prompts(path)?;
    let ids = tokenize_prompts(&trainer.policy, prompts.iter().map(|p| &p.prompt), cfg.data.max_prompt_length)?;
    let cached: Option<Vec<Vec<u32>>> = std::fs::read_to_string(cache).ok().and_then(|text| {
        let rows: Vec<Value> = text.lines().map(serde_json::from_str).collect::<Result<_, _>>().ok()?;
        let answers: Option<Vec<Vec<u32>>> =
            rows.iter().map(|r| serde_json::from_value(r.get("completion_ids")?.clone()).ok()).collect();
        answers.filter(|a| a.len() == ids.len())
    });
    let answers = match cached {
        Some(a) => a,
        None => {
            let teacher = trainer.teacher.as_ref().context("distillation needs the teacher")?;
            let phase = trainer.phase(format!("the teacher answers {} prompts", ids.len()));
            let answers = answer_each(
                teacher,
                &ids,
                &trainer.policy.eos_token_ids,
                trainer.pad,
                &sampling(distill, cfg.run.seed),
                distill.sampling_batch_size,
            )?;
            phase.done();
            if !trainer.dist().is_main() {
                return Ok(answer_items(&ids, &answers)); // rank 0 writes the cache
            }
            let mut lines = String::new();
            for (p, a) in prompts.iter().zip(&answers) {
                let completion = trainer.policy.tokenizer.decode(a, true)?;
                lines.push_str(&serde_json::json!({ "prompt": p.row.get("prompt"), "completion": completion, "completion_ids": a }).to_string());
                lines.push('\n');
            }
            super::checkpoint::write_atomically(cache, lines.as_bytes())?;
            answers
        }
    };
    Ok(answer_items(&ids, &answers))
}

/// Fill every item's teacher states from `cache` when it holds exactly these sequences, else by
/// running the teacher once and writing `cache` (per item: its token ids and its
/// `[completion tokens, hidden]` states). Every rank of a data-parallel run computes them all
/// (any item may fall to it); rank 0 alone (`write`) writes the cache.
fn cache_teacher_states(
    teacher: &CausalLm,
    items: &mut [Item],
    cache: &Path,
    batch_size: usize,
    pad: u32,
    write: bool,
) -> Result<()> {
    let seqs: Vec<&TokenizedSequence> = items.iter().map(distill_sequence).collect::<Result<_>>()?;
    let device = teacher.device();
    let saved = candle::safetensors::load(cache, device).ok().filter(|t| {
        seqs.iter().enumerate().all(|(i, s)| {
            t.get(&format!("ids.{i}")).and_then(|ids| ids.to_vec1::<u32>().ok()).is_some_and(|ids| ids == s.ids)
        }) && t.len() == 2 * seqs.len()
    });
    let states: Vec<Tensor> = match saved {
        Some(mut t) => {
            (0..seqs.len()).map(|i| t.remove(&format!("states.{i}")).context("cached states")).collect::<Result<_>>()?
        }
        None => {
            let mut states = Vec::with_capacity(seqs.len());
            for chunk in seqs.chunks(batch_size.max(1)) {
                let hidden = completion_states(teacher, &collate(chunk, pad, device)?)?.hidden;
                let mut at = 0;
                for s in chunk {
                    let n = s.completion_tokens();
                    states.push(hidden.narrow(0, at, n)?.contiguous()?);
                    at += n;
                }
            }
            if !write {
                set_teacher_states(items, states);
                return Ok(());
            }
            let mut tensors = std::collections::HashMap::new();
            for (i, (s, h)) in seqs.iter().zip(&states).enumerate() {
                tensors.insert(format!("ids.{i}"), Tensor::new(s.ids.as_slice(), device)?);
                tensors.insert(format!("states.{i}"), h.clone());
            }
            std::fs::create_dir_all(cache.parent().expect("a file in the run directory"))?;
            let tmp = cache.with_extension("tmp");
            candle::safetensors::save(&tensors, &tmp)?;
            std::fs::rename(&tmp, cache)?;
            states
        }
    };
    set_teacher_states(items, states);
    Ok(())
}

fn set_teacher_states(items: &mut [Item], states: Vec<Tensor>) {
    for (item, h) in items.iter_mut().zip(states) {
        if let Item::Distill(d) = item {
            d.teacher_states = Some(h);
        }
    }
}

fn distill_sequence(item: &Item) -> Result<&TokenizedSequence> {
    match item {
        Item::Distill(d) => Ok(&d.sequence),
        _ => bail!("distillation items only"),
    }
}

/// On-policy distillation (GKD with λ = 1): every step the student answers the step's prompts
/// (seeded by the run seed and the micro-batch, so a resumed run samples the same answers), SCRG
/// corrects them when asked, and the step trains on the answers.
fn train_on_policy(
    trainer: &mut Trainer,
    distill: &DistillSection,
    prompts: &[Item],
    eval: Option<&[Item]>,
) -> Result<()> {
    let cfg = trainer.cfg;
    let r = &cfg.run;
    let total = planned_steps(prompts.len(), r);
    trainer.set_total(total);
    trainer.evaluate_on_start(eval)?;
    let mut orders = BatchOrders::new(r.seed, r.batch_size, None);
    while trainer.step < total {
        let (micro, epoch) = micro_batches(prompts, trainer.step, r, &mut orders);
        let student = trainer.policy.model.frozen_view();
        // This rank answers its share of the step's micro-batches (seeded by their place in
        // the whole step).
        let mine = trainer.dist().share(micro.len());
        let mut answered: Vec<Vec<Item>> = Vec::with_capacity(mine.len());
        for (j, batch) in micro.iter().enumerate().skip(mine.start).take(mine.len()) {
            let seed =
                r.seed ^ (trainer.step * r.micro_per_step() as u64 + j as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
            let ids: Vec<Vec<u32>> =
                batch.iter().map(|i| distill_sequence(i).map(|s| s.ids.clone())).collect::<Result<_>>()?;
            let mut answers = answer_each(
                &student,
                &ids,
                &trainer.policy.eos_token_ids,
                trainer.pad,
                &sampling(distill, seed),
                distill.sampling_batch_size,
            )?;
            if distill.scrg {
                let teacher = trainer.teacher.as_ref().context("SCRG needs the teacher")?;
                answers =
                    scrg(&student, teacher, &ids, answers, distill, seed, trainer.pad, &trainer.policy.eos_token_ids)?;
            }
            answered.push(answer_items(&ids, &answers));
        }
        let refs: Vec<Vec<&Item>> =
            answered.iter().map(|b| b.iter().collect()).filter(|b: &Vec<&Item>| !b.is_empty()).collect();
        let extra = Map::from_iter([("epoch".to_string(), Value::from(epoch))]);
        trainer.step_share(&refs, extra, eval, false)?;
    }
    Ok(())
}

/// MGSR's sequence-level correction (SCRG) of one batch of student answers: at each answer's
/// position where the student's token is not the teacher's most likely one and the two
/// next-token distributions differ most (forward KL), put the teacher's token, and let the
/// student write the rest again (within the same token budget).
#[allow(clippy::too_many_arguments)]
fn scrg(
    student: &CausalLm,
    teacher: &CausalLm,
    prompts: &[Vec<u32>],
    answers: Vec<Vec<u32>>,
    distill: &DistillSection,
    seed: u64,
    pad: u32,
    stop: &[u32],
) -> Result<Vec<Vec<u32>>> {
    let seqs: Vec<TokenizedSequence> =
        prompts.iter().zip(&answers).map(|(p, a)| TokenizedSequence::prompt_and_answer(p, a)).collect();
    let batch = collate(&seqs.iter().collect::<Vec<_>>(), pad, student.device())?;
    let s = completion_states(student, &batch)?;
    let t = completion_states(teacher, &batch)?;
    let log_s = chunked_vocab_logps(student, &s.hidden, 256)?;
    let log_t = chunked_vocab_logps(teacher, &t.hidden, 256)?;
    let kl: Vec<f32> = candor_alignment::objectives::kd::kl_per_token(&log_t, &log_s)?.to_vec1()?;
    let teacher_choice: Vec<u32> = log_t.argmax(candle::D::Minus1)?.to_vec1()?;
    // The corrected prefix of each answer that has a position to correct.
    let mut at = 0;
    let mut prefixes: Vec<(usize, Vec<u32>)> = Vec::new();
    for (i, a) in answers.iter().enumerate() {
        let worst =
            (0..a.len()).filter(|&j| a[j] != teacher_choice[at + j]).max_by(|&x, &y| kl[at + x].total_cmp(&kl[at + y]));
        if let Some(j) = worst {
            let mut prefix = a[..j].to_vec();
            prefix.push(teacher_choice[at + j]);
            prefixes.push((i, prefix));
        }
        at += a.len();
    }
    let mut out = answers;
    let open: Vec<&(usize, Vec<u32>)> = prefixes
        .iter()
        .filter(|(_, p)| !stop.contains(p.last().expect("non-empty")) && p.len() < distill.max_new_tokens)
        .collect();
    for (i, p) in prefixes
        .iter()
        .filter(|(_, p)| stop.contains(p.last().expect("non-empty")) || p.len() >= distill.max_new_tokens)
    {
        out[*i] = p.clone();
    }
    if open.is_empty() {
        return Ok(out);
    }
    let budget = distill.max_new_tokens - open.iter().map(|(_, p)| p.len()).min().expect("non-empty");
    let ids: Vec<Vec<u32>> = open.iter().map(|(i, p)| [prompts[*i].as_slice(), p].concat()).collect();
    let cfg = SamplingConfig { max_new_tokens: budget, ..sampling(distill, seed.rotate_left(7)) };
    let rest = answer_each(student, &ids, stop, pad, &cfg, distill.sampling_batch_size)?;
    for ((i, p), tokens) in open.into_iter().zip(rest) {
        let mut answer = p.clone();
        answer.extend(tokens);
        answer.truncate(distill.max_new_tokens);
        out[*i] = answer;
    }
    Ok(out)
}

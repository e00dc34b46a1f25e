//! The online loop, read top to bottom:
//!
//! for each round: sample K answers per prompt from the live policy (plus any teacher's
//! answers) → judge them → the objective's [`RoundBuilder`] turns the judged pools into its
//! training records, with the frozen previous iterate's log-probs computed once, up front →
//! train E epochs on them with the shared [`Trainer`] → log the round → checkpoint.
//!
//! The previous iterate π_t is the policy at the start of the round; every method only needs
//! its log-probs on the round's own samples, so those are computed before the round's first
//! update and no copy of the weights is kept or reloaded. Each round's samples, scores and
//! records are written to `rounds/round-N.json` before training on them, so a run killed inside
//! a round resumes on the same data from its newest checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::batching::{micro_batches, steps_for_epochs, BatchOrders};
use super::config::{OnlineSection, TrainConfig};
use super::items::Item;
use super::rounds::{self, RoundBuilder, RoundContext, RoundData, Sample};
use super::trainer::{RunOptions, RunSummary, Trainer};
use crate::data::tokenize_prompts;
use crate::eval::winrate::{read_outputs, read_prompts, EvalPrompt};
use crate::generate::{completion_text, sample_groups, SamplingConfig};
use crate::judge::{compare_scores, Case, Judge, Outcome};
use crate::load::LoadedModel;
use crate::model::CausalLm;

/// Run (or resume) an online objective's rounds.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let online = cfg.online.as_ref().context("online objectives need `[online]`")?;
    let mut trainer = Trainer::start(cfg, opts)?;
    let run_dir = &cfg.run.output;
    let prompts = read_prompts(&online.prompts)?;
    if prompts.is_empty() {
        bail!("`{}` holds no prompts", online.prompts.display());
    }
    let prompt_ids = tokenize_prompts(&trainer.policy, prompts.iter().map(|p| &p.prompt), cfg.data.max_prompt_length)?;
    let load = cfg.model.load_options()?;
    let judge_opts = crate::judge::JudgeOptions {
        judge_model: online.judge_model.clone(),
        cache_dir: Some(run_dir.join("judge-cache")),
        concurrency: 4,
        ..Default::default()
    };
    let judge = crate::judge::from_spec(&online.judge, &judge_opts, &load)?;
    let teacher = Teacher::load(online, prompts.len(), &load)?;
    let builder = rounds::builder_for(cfg, &load)?;
    let sources = RoundSources {
        prompts: &prompts,
        prompt_ids: &prompt_ids,
        judge: judge.as_ref(),
        teacher: &teacher,
        builder: builder.as_ref(),
    };

    // The schedule's horizon: the most steps the rounds can take (pairs and questions that
    // carry no signal are dropped, so a round may take fewer).
    let per_round =
        if online.prompts_per_round == 0 { prompts.len() } else { online.prompts_per_round.min(prompts.len()) };
    let most_items = per_round * builder.items_per_prompt(online.samples_per_prompt);
    trainer.set_total(online.rounds * steps_for_epochs(most_items, &cfg.run, online.epochs_per_round as u64));

    let mut previous: Option<RoundData> = None;
    let mut summaries: Vec<Value> = Vec::new();
    for round in 0..online.rounds {
        let path = round_path(run_dir, round);
        let (data, items) = match read_round(&path)? {
            Some(data) if trainer.step >= data.start_step => {
                let items = builder.items(&data, &prompt_ids)?;
                (data, items)
            }
            _ => {
                let (mut data, items) = build_round(&trainer, round, &sources, previous.as_ref())?;
                // Rank 0 alone summarizes the round (its win-rate asks the judge) and writes it.
                let written = if trainer.dist().is_main() {
                    round_summary(&data, previous.as_ref(), &sources).and_then(|summary| {
                        data.summary = summary;
                        write_round(&path, &data)
                    })
                } else {
                    Ok(())
                };
                trainer.dist().agree(written, &format!("writing round {}", round + 1))?;
                (data, items)
            }
        };
        // Rewritten whole each round, so a resumed run never repeats a line.
        summaries.push(Value::Object(data.summary.clone()));
        if trainer.dist().is_main() {
            let lines: String = summaries.iter().map(|s| format!("{s}\n")).collect();
            super::checkpoint::write_atomically(&run_dir.join("rounds.jsonl"), lines.as_bytes())?;
        }
        if trainer.step < data.start_step + data.steps {
            train_round(&mut trainer, &data, &items)?;
        }
        previous = Some(data);
    }
    trainer.finish()
}

/// Where round `round`'s data lives.
fn round_path(run_dir: &Path, round: u64) -> PathBuf {
    run_dir.join("rounds").join(format!("round-{round}.json"))
}

fn read_round(path: &Path) -> Result<Option<RoundData>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok(Some(serde_json::from_str(&text).with_context(|| format!("invalid round data `{}`", path.display()))?))
}

fn write_round(path: &Path, data: &RoundData) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("rounds/ parent"))?;
    super::checkpoint::write_atomically(path, &serde_json::to_vec(data)?)
}

/// A teacher's answer: token ids in the policy's vocabulary, and the text.
type TeacherAnswer = (Vec<u32>, String);

/// DNO's teacher answers: from a file (fixed) or a model (greedy, each round).
struct Teacher {
    outputs: Option<Vec<String>>,
    model: Option<LoadedModel>,
}

impl Teacher {
    fn load(online: &OnlineSection, prompts: usize, load: &crate::load::LoadOptions) -> Result<Self> {
        let outputs = match &online.teacher_outputs {
            Some(path) => Some(read_outputs(path, prompts, 1)?.into_iter().map(|mut o| o.remove(0)).collect()),
            None => None,
        };
        let model = match &online.teacher_model {
            Some(spec) => Some(load.load(spec).with_context(|| format!("failed to load teacher `{spec}`"))?),
            None => None,
        };
        Ok(Self { outputs, model })
    }

    /// The teacher's answers to `chosen` prompts, per prompt.
    fn answers(
        &self,
        policy: &LoadedModel,
        chosen: &[usize],
        prompts: &[EvalPrompt],
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<TeacherAnswer>>> {
        let mut out = vec![Vec::new(); chosen.len()];
        let end = policy.eos_token_ids.first().copied();
        let as_policy_tokens = |text: &str| -> Result<Vec<u32>> {
            let mut ids = policy.tokenizer.encode(text, false)?;
            ids.extend(end);
            Ok(ids)
        };
        if let Some(outputs) = &self.outputs {
            for (slot, &p) in out.iter_mut().zip(chosen) {
                slot.push((as_policy_tokens(&outputs[p])?, outputs[p].clone()));
            }
        }
        if let Some(teacher) = &self.model {
            let ids = tokenize_prompts(teacher, chosen.iter().map(|&p| &prompts[p].prompt), None)?;
            let cfg = SamplingConfig { max_new_tokens, ..Default::default() };
            let gens = crate::generate::generate(
                &teacher.model,
                &ids,
                &teacher.eos_token_ids,
                teacher.tokenizer.pad_id(),
                &cfg,
                |_, _| {},
            )?;
            for (slot, g) in out.iter_mut().zip(&gens) {
                let text = completion_text(&teacher.tokenizer, g)?;
                slot.push((as_policy_tokens(&text)?, text));
            }
        }
        Ok(out)
    }
}

/// What every round draws on.
struct RoundSources<'a> {
    prompts: &'a [EvalPrompt],
    prompt_ids: &'a [Vec<u32>],
    judge: &'a dyn Judge,
    teacher: &'a Teacher,
    builder: &'a dyn RoundBuilder,
}

/// Sample, judge and build round `round`'s training set from the policy as it stands, with
/// the items it trains on. Each rank samples and judges its share of the prompts; the pools
/// are gathered so that every rank builds the same training set.
fn build_round(
    trainer: &Trainer,
    round: u64,
    sources: &RoundSources,
    previous: Option<&RoundData>,
) -> Result<(RoundData, Vec<Item>)> {
    let RoundSources { prompts, prompt_ids, judge, teacher, builder } = *sources;
    let cfg = trainer.cfg;
    let online = cfg.online.as_ref().expect("validated");
    let chosen = round_prompts(prompts.len(), online.prompts_per_round, cfg.run.seed, round);
    let ids: Vec<Vec<u32>> = chosen.iter().map(|&p| prompt_ids[p].clone()).collect();
    let mut phases = trainer.phases();
    let mut say = |msg: String| phases.next(format!("round {}: {msg}", round + 1));
    say(format!("sampling {} x {}", ids.len(), online.samples_per_prompt));
    // Sample from the live weights (a view: no copy, no graph).
    let frozen = trainer.policy.model.frozen_view();
    let seed = cfg.run.seed ^ (round + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let dist = trainer.dist();
    let mine = dist.share(ids.len());
    let mut pools = sample_pools(trainer, &frozen, &ids[mine.clone()], mine.start, seed)?;
    let answers = teacher.answers(&trainer.policy, &chosen[mine.clone()], prompts, online.max_new_tokens)?;
    for (pool, answers) in pools.iter_mut().zip(answers) {
        pool.extend(answers.into_iter().map(|(tokens, text)| Sample {
            tokens,
            text,
            score: 0.0,
            parts: Vec::new(),
            teacher: true,
        }));
    }
    say(format!("judging with {}", judge.name()));
    let pointwise = score_pools(judge, &chosen[mine].iter().map(|&p| &prompts[p]).collect::<Vec<_>>(), &mut pools)?;
    let what = format!("gathering round {}'s samples", round + 1);
    let shares = dist.all_gather(&(pointwise, pools), &what)?;
    let pointwise = shares.first().is_some_and(|(p, _)| *p);
    let pools: Vec<Vec<Sample>> = shares.into_iter().flat_map(|(_, pools)| pools).collect();

    say("scoring the samples under the previous iterate".into());
    let ctx = RoundContext { trainer, frozen: &frozen, prompts, chosen: &chosen, ids: &ids, previous };
    let records = builder.build(&ctx, &pools, &mut say)?;
    let (start_step, summary) = (trainer.step, Map::new());
    let mut data =
        RoundData { round, start_step, steps: 0, prompts: chosen, pointwise, samples: pools, records, summary };
    let items = builder.items(&data, prompt_ids)?;
    data.steps = steps_for_epochs(items.len(), &cfg.run, online.epochs_per_round as u64);
    phases.done();
    Ok((data, items))
}

/// `online.samples_per_prompt` answers to each prompt of `ids` (the round's prompts from
/// `first` on), sampled from `frozen`.
fn sample_pools(
    trainer: &Trainer,
    frozen: &CausalLm,
    ids: &[Vec<u32>],
    first: usize,
    seed: u64,
) -> Result<Vec<Vec<Sample>>> {
    let online = trainer.cfg.online.as_ref().expect("validated");
    let sampling = SamplingConfig {
        max_new_tokens: online.max_new_tokens,
        temperature: online.temperature,
        top_p: online.top_p,
        top_k: online.top_k,
        seed,
    };
    let policy = &trainer.policy;
    let (stop, pad, k) = (&policy.eos_token_ids, trainer.pad, online.samples_per_prompt);
    let groups = sample_groups(frozen, ids, first, k, stop, pad, &sampling, online.sampling_batch_size, |_| {})?;
    groups
        .iter()
        .map(|gens| {
            gens.iter()
                .map(|g| {
                    let text = completion_text(&policy.tokenizer, g)?;
                    Ok(Sample { tokens: g.tokens.clone(), text, score: 0.0, parts: Vec::new(), teacher: false })
                })
                .collect()
        })
        .collect()
}

/// The prompts of round `round`: all of them, or the round's slice of a seeded shuffle.
fn round_prompts(n: usize, per_round: usize, seed: u64, round: u64) -> Vec<usize> {
    if per_round == 0 || per_round >= n {
        return (0..n).collect();
    }
    let order = super::batching::epoch_order(n, seed, 0, 1, None);
    let start = (round as usize * per_round) % n;
    (0..per_round).map(|k| order[(start + k) % n]).collect()
}

/// Score every answer: pointwise judges score each on its own; pairwise judges compare every
/// two answers of a prompt (both orders) and score each by its average win-rate against the
/// others (DNO's rule; unreadable verdicts left out). Returns whether scores are pointwise.
fn score_pools(judge: &dyn Judge, prompts: &[&EvalPrompt], pools: &mut [Vec<Sample>]) -> Result<bool> {
    let outputs: Vec<(&crate::data::Text, &Map<String, Value>, &str)> = prompts
        .iter()
        .zip(pools.iter())
        .flat_map(|(p, pool)| pool.iter().map(move |s| (&p.prompt, &p.row, s.text.as_str())))
        .collect();
    if let Some(scores) = judge.score_parts(&outputs)? {
        let mut scores = scores.into_iter();
        for s in pools.iter_mut().flatten() {
            (s.score, s.parts) = scores.next().context("the judge returned too few scores")?;
        }
        return Ok(true);
    }
    let mut index = Vec::new();
    let mut cases = Vec::new();
    for (i, (p, pool)) in prompts.iter().zip(pools.iter()).enumerate() {
        for a in 0..pool.len() {
            for b in a + 1..pool.len() {
                index.push((i, a, b));
                cases.push(Case { prompt: &p.prompt, row: &p.row, model: &pool[a].text, baseline: &pool[b].text });
            }
        }
    }
    let verdicts = judge.judge(&cases)?;
    let mut wins: Vec<Vec<(f64, f64)>> = pools.iter().map(|pool| vec![(0.0, 0.0); pool.len()]).collect();
    for (&(i, a, b), v) in index.iter().zip(&verdicts) {
        let Some(outcome) = v.outcome else { continue };
        let for_a = outcome.score();
        for (k, w) in [(a, for_a), (b, 1.0 - for_a)] {
            wins[i][k].0 += w;
            wins[i][k].1 += 1.0;
        }
    }
    for (pool, w) in pools.iter_mut().zip(wins) {
        for (s, (won, asked)) in pool.iter_mut().zip(w) {
            s.score = if asked > 0.0 { won / asked } else { 0.5 };
        }
    }
    Ok(false)
}

/// Train on a round's items from wherever the trainer stands within it; checkpoint at its end.
fn train_round(trainer: &mut Trainer, data: &RoundData, items: &[Item]) -> Result<()> {
    let cfg = trainer.cfg;
    let mut orders =
        BatchOrders::new(cfg.run.seed ^ (data.round + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15), cfg.run.batch_size, None);
    let end = data.start_step + data.steps;
    while trainer.step < end {
        let (micro, epoch) = micro_batches(items, trainer.step - data.start_step, &cfg.run, &mut orders);
        let extra = Map::from_iter([
            ("round".to_string(), Value::from(data.round + 1)),
            ("epoch".to_string(), Value::from(epoch)),
        ]);
        trainer.step(&micro, extra, None, trainer.step + 1 == end)?;
    }
    Ok(())
}

/// The round's line of `rounds.jsonl`: what the judge thought of the samples, how many pairs
/// or questions carried a signal (the builder's fields), and the win-rate of this round's
/// samples against the previous round's on the prompts both answered.
fn round_summary(data: &RoundData, previous: Option<&RoundData>, sources: &RoundSources) -> Result<Map<String, Value>> {
    let policy_samples: Vec<&Sample> = data.samples.iter().flatten().filter(|s| !s.teacher).collect();
    let n = policy_samples.len().max(1) as f64;
    let mut line = Map::new();
    line.insert("round".into(), (data.round + 1).into());
    line.insert("step".into(), data.start_step.into());
    line.insert("samples".into(), policy_samples.len().into());
    line.insert("mean_score".into(), (policy_samples.iter().map(|s| s.score).sum::<f64>() / n).into());
    line.insert("mean_length".into(), (policy_samples.iter().map(|s| s.tokens.len()).sum::<usize>() as f64 / n).into());
    if policy_samples.iter().all(|s| s.score == 0.0 || s.score == 1.0) {
        // A verifier's pass/fail: the share of answers it accepted.
        line.insert("accuracy".into(), (policy_samples.iter().filter(|s| s.score == 1.0).count() as f64 / n).into());
    }
    sources.builder.summarize(data, &mut line)?;
    if let Some(prev) = previous {
        if let Some(rate) = win_rate_against(data, prev, sources.judge, sources.prompts)? {
            line.insert("win_rate_vs_previous".into(), rate.into());
        }
    }
    Ok(line)
}

/// Sample `j` of each prompt in `now` against sample `j` of the same prompt in `before` (ties
/// half); `None` when the rounds share no prompt.
fn win_rate_against(
    now: &RoundData,
    before: &RoundData,
    judge: &dyn Judge,
    prompts: &[EvalPrompt],
) -> Result<Option<f64>> {
    let mut matched: Vec<(usize, &Sample, &Sample)> = Vec::new();
    for (i, &p) in now.prompts.iter().enumerate() {
        if let Some(k) = before.prompts.iter().position(|&q| q == p) {
            let pairs =
                now.samples[i].iter().filter(|s| !s.teacher).zip(before.samples[k].iter().filter(|s| !s.teacher));
            matched.extend(pairs.map(|(a, b)| (p, a, b)));
        }
    }
    if matched.is_empty() {
        return Ok(None);
    }
    let outcomes: Vec<Option<Outcome>> = if now.pointwise {
        matched.iter().map(|(_, a, b)| Some(compare_scores(a.score, b.score, 0.0))).collect()
    } else {
        let cases: Vec<Case> = matched
            .iter()
            .map(|&(p, a, b)| Case {
                prompt: &prompts[p].prompt,
                row: &prompts[p].row,
                model: &a.text,
                baseline: &b.text,
            })
            .collect();
        judge.judge(&cases)?.into_iter().map(|j| j.outcome).collect()
    };
    let read: Vec<f64> = outcomes.into_iter().flatten().map(Outcome::score).collect();
    Ok((!read.is_empty()).then(|| read.iter().sum::<f64>() / read.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_prompts_cycle_through_a_seeded_shuffle() {
        assert_eq!(round_prompts(5, 0, 1, 3), vec![0, 1, 2, 3, 4]);
        let a = round_prompts(10, 4, 7, 0);
        let b = round_prompts(10, 4, 7, 1);
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|p| !b.contains(p)), "consecutive rounds take the next slice: {a:?} {b:?}");
    }
}

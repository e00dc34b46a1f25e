//! The online loop (INPO, DNO, NFT), read top to bottom:
//!
//! for each round: sample K answers per prompt from the live policy → judge them → build the
//! training set the objective asks for (best-vs-worst pairs, or labelled samples) with the
//! frozen previous iterate's log-probs computed once, up front → train E epochs on it with the
//! shared [`Trainer`] → log the round → checkpoint.
//!
//! The previous iterate π_t is the policy at the start of the round; every method here only
//! needs its log-probs on the round's own samples, so those are computed before the round's
//! first update and no copy of the weights is kept or reloaded. Each round's samples, scores
//! and training set are written to `rounds/round-N.json` before training on them, so a run
//! killed inside a round resumes on the same data from its newest checkpoint.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle::Tensor;
use candor_alignment::objectives::kdrl::group_advantages;
use candor_alignment::objectives::nft::question_accuracy;
use candor_alignment::objectives::text2grad::{rollout_advantages, KlPenalty, RolloutRecords, Text2GradConfig};
use candor_alignment::{DataNeed, Objective};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::batching::{micro_batches, steps_for_epochs, BatchOrders};
use super::config::{OnlineSection, TrainConfig};
use super::heads::values_of;
use super::inputs::summed_pair_logps;
use super::items::{Item, PairItem, PpoItem, RolloutItem};
use super::trainer::{RunOptions, RunSummary, Trainer};
use crate::data::{collate, tokenize_prompts, Batch, TokenizedSequence};
use crate::eval::winrate::{read_outputs, read_prompts, EvalPrompt};
use crate::generate::{completion_text, sample_groups, SamplingConfig};
use crate::judge::critic::{decoded_tokens, token_scores, Critic};
use crate::judge::Outcome;
use crate::judge::{compare_scores, Case, Judge};
use crate::load::LoadedModel;
use crate::scoring::{completion_token_kl, completion_token_logps, completion_token_logps_and_hidden};

/// One answer in a round's pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sample {
    /// Generated token ids (with the stop token, if one ended it).
    tokens: Vec<u32>,
    /// The answer's text, as the judge saw it.
    text: String,
    /// The judge's score: the verifier's 1/0, the reward model's reward, or a pairwise
    /// judge's average win-rate against the prompt's other answers.
    score: f64,
    /// Written by the teacher (DNO), not sampled from the policy.
    #[serde(default)]
    teacher: bool,
}

/// A pair of one prompt's pool, with the frozen log-probs the loss needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundPair {
    prompt: usize,
    chosen: usize,
    rejected: usize,
    /// π_t's summed log-probs (chosen, rejected).
    previous: (f32, f32),
    /// π_ref's (INPO with τ > 0).
    reference: Option<(f32, f32)>,
}

/// A labelled sample for NFT, with π_old's per-token log-probs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundRollout {
    prompt: usize,
    sample: usize,
    old_logps: Vec<f32>,
    accuracy: f32,
    correct: bool,
    /// KDRL: the group-normalised advantage.
    #[serde(default)]
    advantage: f32,
    /// KDRL: the teacher's log-prob of each answer token.
    #[serde(default)]
    teacher_logps: Vec<f32>,
    /// KDRL: whether the KD term applies (reward-guided masking).
    #[serde(default)]
    kd: bool,
}

/// A critiqued sample for PPO: per answer token, the rollout's records and the advantages.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundPpo {
    prompt: usize,
    sample: usize,
    old_logps: Vec<f32>,
    old_values: Vec<f32>,
    advantages: Vec<f64>,
    returns: Vec<f64>,
    /// The critique's span score of each token.
    span_scores: Vec<f64>,
    /// The per-token KL to the reference.
    kl: Vec<f64>,
    /// Whether the critic's reply could be read.
    critiqued: bool,
}

/// Everything a round trains on, as written to `rounds/round-N.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RoundData {
    round: u64,
    /// The optimizer step the round started at.
    start_step: u64,
    /// Optimizer steps the round takes.
    steps: u64,
    /// Indices (into the prompts file) of the round's prompts.
    prompts: Vec<usize>,
    /// Whether scores are pointwise (comparable across rounds without asking the judge again).
    pointwise: bool,
    /// `samples[i]`: the pool of the round's i-th prompt.
    samples: Vec<Vec<Sample>>,
    pairs: Vec<RoundPair>,
    rollouts: Vec<RoundRollout>,
    #[serde(default)]
    ppo: Vec<RoundPpo>,
    /// PPO: the KL coefficient the round's first rollout batch used.
    #[serde(default)]
    kl_coef: Option<f64>,
    /// PPO: the coefficient after the round's last rollout batch (the next round's start).
    #[serde(default)]
    next_kl_coef: Option<f64>,
    /// The round's line of `rounds.jsonl`.
    summary: Map<String, Value>,
}

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
    let critic = match &cfg.objective {
        Objective::Text2grad(t) => {
            Some(crate::judge::critic::from_spec(&t.critic, online.judge_model.as_deref(), &load)?)
        }
        _ => None,
    };

    let per_round =
        if online.prompts_per_round == 0 { prompts.len() } else { online.prompts_per_round.min(prompts.len()) };
    let most_items = match cfg.objective.data_need() {
        DataNeed::Rollouts | DataNeed::TokenRewards | DataNeed::TeacherRollouts => {
            per_round * online.samples_per_prompt
        }
        _ => per_round,
    };
    // The schedule's horizon: the most steps the rounds can take (pairs and questions that
    // carry no signal are dropped, so a round may take fewer).
    trainer.set_total(online.rounds * steps_for_epochs(most_items, &cfg.run, online.epochs_per_round as u64));

    let mut previous: Option<RoundData> = None;
    let mut summaries: Vec<Value> = Vec::new();
    for round in 0..online.rounds {
        let path = round_path(run_dir, round);
        let data = match read_round(&path)? {
            Some(data) if trainer.step >= data.start_step => data,
            _ => {
                let sources = RoundSources {
                    prompts: &prompts,
                    prompt_ids: &prompt_ids,
                    judge: judge.as_ref(),
                    teacher: &teacher,
                    critic: critic.as_deref(),
                };
                let mut data = build_round(&mut trainer, round, &sources, previous.as_ref())?;
                data.summary = round_summary(&data, previous.as_ref(), judge.as_ref(), &prompts)?;
                write_round(&path, &data)?;
                data
            }
        };
        // Rewritten whole each round, so a resumed run never repeats a line.
        summaries.push(Value::Object(data.summary.clone()));
        let lines: String = summaries.iter().map(|s| format!("{s}\n")).collect();
        super::checkpoint::write_atomically(&run_dir.join("rounds.jsonl"), lines.as_bytes())?;
        if trainer.step < data.start_step + data.steps {
            train_round(&mut trainer, &data, &prompt_ids)?;
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
    critic: Option<&'a dyn Critic>,
}

/// The KL coefficient of a round: the configured start, then TRL's adaptive step from the
/// previous round's mean summed KL per sample.
fn kl_coef_for(previous: Option<&RoundData>, cfg: &Text2GradConfig) -> f64 {
    previous.and_then(|p| p.next_kl_coef).unwrap_or(cfg.init_kl_coef)
}

/// Sample, judge and build round `round`'s training set from the policy as it stands.
fn build_round(
    trainer: &mut Trainer,
    round: u64,
    sources: &RoundSources,
    previous: Option<&RoundData>,
) -> Result<RoundData> {
    let RoundSources { prompts, prompt_ids, judge, teacher, critic } = *sources;
    let cfg = trainer.cfg;
    let online = cfg.online.as_ref().expect("validated");
    let seed = cfg.run.seed ^ (round + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let chosen = round_prompts(prompts.len(), online.prompts_per_round, cfg.run.seed, round);
    let ids: Vec<Vec<u32>> = chosen.iter().map(|&p| prompt_ids[p].clone()).collect();
    let policy = &trainer.policy;
    let mut phases = trainer.phases();
    let mut say = |msg: String| phases.next(msg);
    // Sample from the live weights (a view: no copy, no graph).
    say(format!("round {}: sampling {} x {}", round + 1, ids.len(), online.samples_per_prompt));
    let frozen = policy.model.frozen_view();
    let sampling = SamplingConfig {
        max_new_tokens: online.max_new_tokens,
        temperature: online.temperature,
        top_p: online.top_p,
        top_k: online.top_k,
        seed,
    };
    let groups = sample_groups(
        &frozen,
        &ids,
        online.samples_per_prompt,
        &policy.eos_token_ids,
        trainer.pad,
        &sampling,
        online.sampling_batch_size,
        |_| {},
    )?;
    let mut pools: Vec<Vec<Sample>> = groups
        .iter()
        .map(|gens| {
            gens.iter()
                .map(|g| {
                    Ok(Sample {
                        tokens: g.tokens.clone(),
                        text: completion_text(&policy.tokenizer, g)?,
                        score: 0.0,
                        teacher: false,
                    })
                })
                .collect::<Result<Vec<_>>>()
        })
        .collect::<Result<_>>()?;
    for (pool, answers) in pools.iter_mut().zip(teacher.answers(policy, &chosen, prompts, online.max_new_tokens)?) {
        pool.extend(answers.into_iter().map(|(tokens, text)| Sample { tokens, text, score: 0.0, teacher: true }));
    }
    say(format!("round {}: judging with {}", round + 1, judge.name()));
    let pointwise = score_pools(judge, &chosen.iter().map(|&p| &prompts[p]).collect::<Vec<_>>(), &mut pools)?;

    say(format!("round {}: scoring the samples under the previous iterate", round + 1));
    let sequence = |i: usize, s: &Sample| TokenizedSequence::prompt_and_answer(&ids[i], &s.tokens);
    let (mut pairs, mut rollouts, mut ppo) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ppo_kl_coef, mut next_kl_coef) = (None, None);
    match &cfg.objective {
        Objective::Nft(_) => {
            for (i, pool) in pools.iter().enumerate() {
                let correct: Vec<bool> = pool.iter().map(|s| s.score > 0.5).collect();
                if let Some(accuracy) = question_accuracy(&correct) {
                    for (j, &c) in correct.iter().enumerate() {
                        rollouts.push(RoundRollout {
                            prompt: i,
                            sample: j,
                            old_logps: Vec::new(),
                            accuracy: accuracy as f32,
                            correct: c,
                            advantage: 0.0,
                            teacher_logps: Vec::new(),
                            kd: false,
                        });
                    }
                }
            }
            let seqs: Vec<TokenizedSequence> =
                rollouts.iter().map(|r| sequence(r.prompt, &pools[r.prompt][r.sample])).collect();
            let records = per_token(&seqs, cfg.run.batch_size, trainer.pad, frozen.device(), |b| {
                Ok([completion_token_logps(&frozen, b)?])
            })?;
            for (r, [logps]) in rollouts.iter_mut().zip(records) {
                r.old_logps = logps;
            }
        }
        Objective::Kdrl(kdrl) => {
            // GRPO's group advantages from the verifier; the teacher scores the student's own
            // tokens (KD on the sampled path); answers the verifier accepts may skip the KD term.
            for (i, pool) in pools.iter().enumerate() {
                let scores: Vec<f64> = pool.iter().map(|s| s.score).collect();
                let accuracy = scores.iter().filter(|&&s| s > 0.5).count() as f32 / scores.len() as f32;
                for (j, a) in group_advantages(&scores).into_iter().enumerate() {
                    let correct = scores[j] > 0.5;
                    rollouts.push(RoundRollout {
                        prompt: i,
                        sample: j,
                        old_logps: Vec::new(),
                        accuracy,
                        correct,
                        advantage: a as f32,
                        teacher_logps: Vec::new(),
                        kd: kdrl.applies_kd(correct),
                    });
                }
            }
            say(format!("round {}: scoring the samples under the old policy and the teacher", round + 1));
            let teacher = trainer.teacher.as_ref().context("kdrl needs the teacher (`[distill] teacher`)")?;
            let seqs: Vec<TokenizedSequence> =
                rollouts.iter().map(|r| sequence(r.prompt, &pools[r.prompt][r.sample])).collect();
            let records = per_token(&seqs, cfg.run.batch_size, trainer.pad, frozen.device(), |b| {
                Ok([completion_token_logps(&frozen, b)?, completion_token_logps(teacher, b)?])
            })?;
            for (r, [old, by_teacher]) in rollouts.iter_mut().zip(records) {
                r.old_logps = old;
                r.teacher_logps = by_teacher;
            }
        }
        Objective::Text2grad(t2g) => {
            say(format!("round {}: critiquing with {}", round + 1, critic.map_or("?".into(), |c| c.name())));
            let critic = critic.context("text2grad needs a critic")?;
            let cases: Vec<(usize, usize)> =
                pools.iter().enumerate().flat_map(|(i, pool)| (0..pool.len()).map(move |j| (i, j))).collect();
            let asked: Vec<(&crate::data::Text, &Map<String, Value>, &str)> = cases
                .iter()
                .map(|&(i, j)| (&prompts[chosen[i]].prompt, &prompts[chosen[i]].row, pools[i][j].text.as_str()))
                .collect();
            let critiques = critic.critique(&asked)?;
            let seqs: Vec<TokenizedSequence> = cases.iter().map(|&(i, j)| sequence(i, &pools[i][j])).collect();
            let reference = trainer.reference.as_ref().context("text2grad needs the reference model")?;
            let models = trainer.models();
            let [w, b] = super::heads::VALUE_HEAD.map(|n| models.head(n).map(Tensor::detach));
            let (w, b) = (w.context("value head")?, b.context("value head")?);
            let records = per_token(&seqs, cfg.run.batch_size, trainer.pad, frozen.device(), |batch| {
                let (logps, hidden) = completion_token_logps_and_hidden(&frozen, batch)?;
                let values = values_of(&hidden, &w, &b)?;
                let kl = match t2g.kl_penalty {
                    KlPenalty::Full => completion_token_kl(&frozen, &hidden, reference, batch)?,
                    other => {
                        let diff = (&logps - completion_token_logps(reference, batch)?)?;
                        match other {
                            KlPenalty::Kl => diff,
                            KlPenalty::Abs => diff.abs()?,
                            _ => (diff.sqr()? * 0.5)?,
                        }
                    }
                };
                Ok([logps, values, kl])
            })?;
            let mut round_ppo = Vec::with_capacity(cases.len());
            for (k, (&(i, j), [old_logps, old_values, kl])) in cases.iter().zip(records).enumerate() {
                let words = critiques[k].as_ref().map(|c| c.word_scores.clone()).unwrap_or_default();
                let span_scores = token_scores(&decoded_tokens(&policy.tokenizer, &pools[i][j].tokens)?, &words);
                let kl64: Vec<f64> = kl.iter().map(|&x| x as f64).collect();
                let values: Vec<f64> = old_values.iter().map(|&v| v as f64).collect();
                round_ppo.push((
                    RoundPpo {
                        prompt: i,
                        sample: j,
                        old_logps,
                        old_values,
                        advantages: Vec::new(),
                        returns: Vec::new(),
                        span_scores,
                        kl: kl64,
                        critiqued: critiques[k].is_some(),
                    },
                    values,
                ));
            }
            let records: Vec<RolloutRecords> = round_ppo
                .iter()
                .map(|(p, values)| RolloutRecords { span_scores: &p.span_scores, kl: &p.kl, values })
                .collect();
            let done = rollout_advantages(&records, kl_coef_for(previous, t2g), t2g);
            for ((mut p, _), (advantages, returns)) in round_ppo.into_iter().zip(done.answers) {
                (p.advantages, p.returns) = (advantages, returns);
                ppo.push(p);
            }
            ppo_kl_coef = done.kl_coefs.first().copied();
            next_kl_coef = Some(done.next_kl_coef);
        }
        Objective::Inpo(_) | Objective::Dno(_) => {
            for (i, pool) in pools.iter().enumerate() {
                if let Some((best, worst)) = best_and_worst(pool, online.min_margin) {
                    pairs.push(RoundPair {
                        prompt: i,
                        chosen: best,
                        rejected: worst,
                        previous: (0.0, 0.0),
                        reference: None,
                    });
                }
            }
            let items: Vec<Item> = pairs
                .iter()
                .map(|p| {
                    Item::Pair(PairItem::new(
                        sequence(p.prompt, &pools[p.prompt][p.chosen]),
                        sequence(p.prompt, &pools[p.prompt][p.rejected]),
                    ))
                })
                .collect();
            for (p, v) in pairs.iter_mut().zip(summed_pair_logps(&frozen, &items, cfg.run.batch_size, trainer.pad)?) {
                p.previous = v;
            }
            if let Some(reference) = &trainer.reference {
                for (p, v) in
                    pairs.iter_mut().zip(summed_pair_logps(reference, &items, cfg.run.batch_size, trainer.pad)?)
                {
                    p.reference = Some(v);
                }
            }
        }
        other => bail!("objective `{}` is not an online objective", other.name()),
    }
    let items = pairs.len() + rollouts.len() + ppo.len();
    let data = RoundData {
        round,
        start_step: trainer.step,
        steps: steps_for_epochs(items, &cfg.run, online.epochs_per_round as u64),
        prompts: chosen,
        pointwise,
        samples: pools,
        pairs,
        rollouts,
        ppo,
        kl_coef: ppo_kl_coef,
        next_kl_coef,
        summary: Map::new(),
    };
    phases.done();
    Ok(data)
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
    if let Some(scores) = judge.score(&outputs)? {
        let mut scores = scores.into_iter();
        for s in pools.iter_mut().flatten() {
            s.score = scores.next().context("the judge returned too few scores")?;
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

/// The highest- and lowest-scored answers of a pool (first of equals), when their scores
/// differ by more than `min_margin`.
fn best_and_worst(pool: &[Sample], min_margin: f64) -> Option<(usize, usize)> {
    let mut best = 0;
    let mut worst = 0;
    for (i, s) in pool.iter().enumerate() {
        if s.score > pool[best].score {
            best = i;
        }
        if s.score < pool[worst].score {
            worst = i;
        }
    }
    (pool[best].score - pool[worst].score > min_margin).then_some((best, worst))
}

/// Per-token quantities of every sequence's completion, `batch_size` sequences at a time:
/// `measure(batch)` gives `Q` flat `[N]` tensors over the batch's completion tokens, split here
/// by sequence.
fn per_token<const Q: usize>(
    seqs: &[TokenizedSequence],
    batch_size: usize,
    pad: u32,
    device: &candle::Device,
    measure: impl Fn(&Batch) -> Result<[Tensor; Q]>,
) -> Result<Vec<[Vec<f32>; Q]>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size.max(1)) {
        let batch = collate(&chunk.iter().collect::<Vec<_>>(), pad, device)?;
        let flat: Vec<Vec<f32>> = measure(&batch)?.iter().map(|t| t.to_vec1()).collect::<candle::Result<_>>()?;
        let mut at = 0;
        for s in chunk {
            let n = s.completion_tokens();
            out.push(std::array::from_fn(|q| flat[q][at..at + n].to_vec()));
            at += n;
        }
    }
    Ok(out)
}

/// The round's training items, rebuilt from its data.
fn round_items(data: &RoundData, prompt_ids: &[Vec<u32>]) -> Vec<Item> {
    let sequence = |i: usize, j: usize| {
        TokenizedSequence::prompt_and_answer(&prompt_ids[data.prompts[i]], &data.samples[i][j].tokens)
    };
    if !data.ppo.is_empty() {
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        return data
            .ppo
            .iter()
            .map(|p| {
                Item::Ppo(PpoItem {
                    sequence: sequence(p.prompt, p.sample),
                    old_logps: p.old_logps.clone(),
                    old_values: p.old_values.clone(),
                    advantages: f32s(&p.advantages),
                    returns: f32s(&p.returns),
                })
            })
            .collect();
    }
    if !data.rollouts.is_empty() {
        return data
            .rollouts
            .iter()
            .map(|r| {
                Item::Rollout(RolloutItem {
                    sequence: sequence(r.prompt, r.sample),
                    old_logps: r.old_logps.clone(),
                    accuracy: r.accuracy,
                    correct: r.correct,
                    advantage: r.advantage,
                    teacher_logps: r.teacher_logps.clone(),
                    kd: r.kd,
                })
            })
            .collect();
    }
    data.pairs
        .iter()
        .map(|p| {
            let mut pair = PairItem::new(sequence(p.prompt, p.chosen), sequence(p.prompt, p.rejected));
            // The judge's scores of the two answers (soft DNO's win-rates).
            let score = |j: usize| data.samples[p.prompt][j].score as f32;
            pair.rewards = Some((score(p.chosen), score(p.rejected)));
            match p.reference {
                // INPO: π_ref is the reference, π_t the previous iterate.
                Some(reference) => {
                    pair.reference = Some(reference);
                    pair.previous = Some(p.previous);
                }
                // DNO (and INPO with τ = 0): π_t is the pair's reference.
                None => {
                    pair.reference = Some(p.previous);
                    pair.previous = Some(p.previous);
                }
            }
            Item::Pair(pair)
        })
        .collect()
}

/// Train on a round's items from wherever the trainer stands within it; checkpoint at its end.
fn train_round(trainer: &mut Trainer, data: &RoundData, prompt_ids: &[Vec<u32>]) -> Result<()> {
    let cfg = trainer.cfg;
    let items = round_items(data, prompt_ids);
    let mut orders =
        BatchOrders::new(cfg.run.seed ^ (data.round + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15), cfg.run.batch_size, None);
    let end = data.start_step + data.steps;
    while trainer.step < end {
        let (micro, epoch) = micro_batches(&items, trainer.step - data.start_step, &cfg.run, &mut orders);
        let extra = Map::from_iter([
            ("round".to_string(), Value::from(data.round + 1)),
            ("epoch".to_string(), Value::from(epoch)),
        ]);
        trainer.step(&micro, extra, None, trainer.step + 1 == end)?;
    }
    Ok(())
}

/// The round's line of `rounds.jsonl`: what the judge thought of the samples, how many pairs
/// or questions carried a signal, and the win-rate of this round's samples against the
/// previous round's on the prompts both answered.
fn round_summary(
    data: &RoundData,
    previous: Option<&RoundData>,
    judge: &dyn Judge,
    prompts: &[EvalPrompt],
) -> Result<Map<String, Value>> {
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
    if !data.ppo.is_empty() {
        let tokens = data.ppo.iter().map(|p| p.span_scores.len()).sum::<usize>().max(1) as f64;
        let scored = data.ppo.iter().flat_map(|p| &p.span_scores).filter(|&&s| s != 0.0).count() as f64;
        line.insert(
            "mean_span_score".into(),
            (data.ppo.iter().flat_map(|p| &p.span_scores).sum::<f64>() / tokens).into(),
        );
        line.insert("scored_token_fraction".into(), (scored / tokens).into());
        line.insert(
            "critiqued".into(),
            (data.ppo.iter().filter(|p| p.critiqued).count() as f64 / data.ppo.len() as f64).into(),
        );
        line.insert(
            "kl".into(),
            (data.ppo.iter().map(|p| p.kl.iter().sum::<f64>()).sum::<f64>() / data.ppo.len() as f64).into(),
        );
        line.insert("kl_coef".into(), data.kl_coef.into());
    } else if data.pairs.is_empty() {
        line.insert(
            "questions_kept".into(),
            data.rollouts.iter().map(|r| r.prompt).collect::<std::collections::BTreeSet<_>>().len().into(),
        );
    } else {
        line.insert("pairs".into(), data.pairs.len().into());
        let margin = data
            .pairs
            .iter()
            .map(|p| data.samples[p.prompt][p.chosen].score - data.samples[p.prompt][p.rejected].score)
            .sum::<f64>()
            / data.pairs.len() as f64;
        line.insert("pair_margin".into(), margin.into());
    }
    if let Some(prev) = previous {
        if let Some(rate) = win_rate_against(data, prev, judge, prompts)? {
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

    fn pool(scores: &[f64]) -> Vec<Sample> {
        scores.iter().map(|&score| Sample { tokens: vec![1], text: String::new(), score, teacher: false }).collect()
    }

    #[test]
    fn best_and_worst_need_a_margin() {
        assert_eq!(best_and_worst(&pool(&[0.2, 0.9, 0.1, 0.9]), 0.0), Some((1, 2)));
        assert_eq!(best_and_worst(&pool(&[1.0, 1.0, 1.0]), 0.0), None, "all equal: no signal");
        assert_eq!(best_and_worst(&pool(&[0.4, 0.6]), 0.3), None, "below the margin");
        assert_eq!(best_and_worst(&pool(&[0.4, 0.6]), 0.1), Some((1, 0)));
    }

    #[test]
    fn round_prompts_cycle_through_a_seeded_shuffle() {
        assert_eq!(round_prompts(5, 0, 1, 3), vec![0, 1, 2, 3, 4]);
        let a = round_prompts(10, 4, 7, 0);
        let b = round_prompts(10, 4, 7, 1);
        assert_eq!(a.len(), 4);
        assert!(a.iter().all(|p| !b.contains(p)), "consecutive rounds take the next slice: {a:?} {b:?}");
    }
}

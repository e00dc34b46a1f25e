//! What every training run shares, offline or online: the models (policy, frozen reference,
//! extra heads), the optimizer, the step counter, the metrics log, checkpoints and the final
//! export. A loop only decides which micro-batches make each step.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle::{DType, Tensor, Var};
use candor_alignment::StepScale;
use serde_json::{Map, Value};

use super::batching::{micro_batches, planned_steps, BatchOrders};
use super::checkpoint::{self, TrainerState};
use super::config::TrainConfig;
use super::heads;
use super::inputs::{objective_input, StepModels};
use super::items::Item;
use super::models::RunModels;
use super::optim::{self, clip_grad_norm, lr_at, AdamW, AdamWConfig};
use super::progress::{eval_line, Phase, Phases, Progress};
use crate::distributed::Dist;
use crate::load::LoadedModel;
use crate::model::{fused, CausalLm};

/// Options that do not change the result.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// No progress bar.
    pub quiet: bool,
    /// Continue from the newest checkpoint of the run directory.
    pub resume: bool,
    /// The ranks of a data-parallel launch (a single process by default).
    pub dist: Dist,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// Steps taken in total.
    pub steps: u64,
    /// The exported final model.
    pub final_dir: PathBuf,
}

/// A run in progress.
pub struct Trainer<'c> {
    /// The run's configuration.
    pub cfg: &'c TrainConfig,
    /// The policy being trained (its weights are the optimizer's variables).
    pub policy: LoadedModel,
    /// The frozen reference, when the objective needs one (taken out once its log-probs are
    /// precomputed).
    pub reference: Option<CausalLm>,
    /// The frozen teacher of distillation objectives (never a variable of the optimizer).
    pub teacher: Option<CausalLm>,
    /// Tensors trained beside the policy and checkpointed in [`heads::HEADS_FILE`]: SPO's degree heads,
    /// PPO's value head.
    heads: Vec<(String, Var)>,
    opt: AdamW,
    /// Optimizer steps taken so far (restored on resume).
    pub step: u64,
    /// Steps the run will take (the learning-rate schedule's length).
    total: u64,
    /// `metrics.jsonl`, open on rank 0 only.
    metrics_file: Option<std::fs::File>,
    metrics_path: PathBuf,
    /// The ranks this run is split over.
    dist: Dist,
    progress: Progress,
    /// The padding id.
    pub pad: u32,
    last_checkpoint: Option<PathBuf>,
}

impl<'c> Trainer<'c> {
    /// Load the models and build the optimizer; with `opts.resume`, restore the newest
    /// checkpoint of the run directory (weights, optimizer, step) and cut `metrics.jsonl` back
    /// to it.
    pub fn start(cfg: &'c TrainConfig, opts: &RunOptions) -> Result<Self> {
        let run_dir = &cfg.run.output;
        let objective = &cfg.objective;
        let dist = opts.dist.clone();
        // Rank 0 alone writes the run directory; the others go on once it has.
        let prepared = if dist.is_main() { prepare(cfg, opts.resume) } else { Ok(()) };
        dist.agree(prepared, "preparing the run directory")?;
        let resume_from = if opts.resume { checkpoint::latest(run_dir)? } else { None };
        if opts.resume && resume_from.is_none() && dist.is_main() {
            eprintln!("candor: no checkpoint in `{}`; starting from step 0", run_dir.display());
        }
        if dist.world_size() > 1 && dist.is_main() {
            let r = &cfg.run;
            eprintln!(
                "candor: data parallel over {} ranks ({}): each step takes {} micro-batches of {} on each rank, as one process with `grad_accum` {}",
                dist.world_size(),
                dist.backend(),
                r.grad_accum,
                r.batch_size,
                r.micro_per_step()
            );
        }

        let resume_dir = resume_from.as_ref().map(|(_, dir)| dir.as_path());
        let RunModels { mut policy, reference, teacher } = RunModels::load(cfg, resume_dir)?;
        let device = policy.model.device().clone();

        let mut vars =
            if cfg.lora.is_some() { policy.model.make_lora_trainable()? } else { policy.model.make_trainable()? };
        // Extra heads train with the policy and live in its checkpoints.
        let hidden = policy.model.config().hidden_size;
        let heads = heads::start(objective, hidden, cfg.run.seed, &device, resume_dir)?;
        vars.extend(heads.iter().cloned());
        let adam = AdamWConfig {
            lr: cfg.optim.lr,
            beta1: cfg.optim.adam_beta1,
            beta2: cfg.optim.adam_beta2,
            eps: cfg.optim.adam_epsilon,
            weight_decay: cfg.optim.weight_decay,
        };
        let mut opt = AdamW::new(vars, adam)?;
        opt.set_kernels(cfg.model.kernels);
        for (name, scale) in heads::lr_scales(objective) {
            opt.set_lr_scale(name, scale);
        }
        let mut step = 0u64;
        let metrics_path = run_dir.join("metrics.jsonl");
        if let Some((_, dir)) = &resume_from {
            let (state, tensors) = checkpoint::load_state(dir)?;
            if state.ranks != dist.world_size() {
                bail!(
                    "`{}` was written by a run over {} rank(s) and this one has {}: resume it with the same number of ranks (the ranks make up each step's batch)",
                    dir.display(),
                    state.ranks,
                    dist.world_size()
                );
            }
            opt.load_state(state.optimizer_steps, &tensors)?;
            step = state.step;
        }
        let opened =
            if dist.is_main() { open_metrics(&metrics_path, resume_from.as_ref().map(|_| step)) } else { Ok(None) };
        let metrics_file = dist.agree(opened, "opening metrics.jsonl")?;
        let pad = policy.tokenizer.pad_id();
        Ok(Self {
            cfg,
            policy,
            reference,
            teacher,
            heads,
            opt,
            step,
            total: 0,
            metrics_file,
            metrics_path,
            progress: Progress::new(opts.quiet || !dist.is_main()),
            dist,
            pad,
            last_checkpoint: None,
        })
    }

    /// The ranks this run is split over.
    pub fn dist(&self) -> &Dist {
        &self.dist
    }

    /// A step's size over every rank, from this rank's part.
    fn sum_scales(&self, mine: StepScale, what: &str) -> Result<StepScale> {
        if self.dist.world_size() == 1 {
            return Ok(mine);
        }
        let all = self.dist.all_gather(&(mine.examples, mine.tokens), &format!("the batch size of {what}"))?;
        let (examples, tokens) = all.iter().fold((0.0, 0.0), |(e, t), (de, dt)| (e + de, t + dt));
        Ok(StepScale { examples, tokens })
    }

    /// Loss, metrics and tokens summed over the ranks, in rank order.
    fn sum_over_ranks(&self, mine: Sums, what: &str) -> Result<Sums> {
        if self.dist.world_size() == 1 {
            return Ok(mine);
        }
        let mut total = Sums { loss: 0.0, metrics: Vec::new(), tokens: 0 };
        for part in self.dist.all_gather(&mine, &format!("the metrics of {what}"))? {
            total.loss += part.loss;
            total.tokens += part.tokens;
            add_metrics(&mut total.metrics, part.metrics);
        }
        Ok(total)
    }

    /// The models of a step.
    pub fn models(&self) -> StepModels<'_> {
        let progress = if self.total == 0 { 0.0 } else { self.step as f64 / self.total as f64 };
        StepModels {
            policy: &self.policy.model,
            reference: self.reference.as_ref(),
            teacher: self.teacher.as_ref(),
            heads: &self.heads,
            pad: self.pad,
            progress,
        }
    }

    /// Set the run's length in steps (the schedule's horizon) and show the progress bar.
    pub fn set_total(&mut self, total: u64) {
        self.total = total;
        self.progress.steps(self.step, total);
    }

    /// With `run.eval_on_start`, evaluate on `eval` before the first step and log it as step 0
    /// (the untrained model's numbers, for the before/after comparison).
    pub fn evaluate_on_start(&mut self, eval: Option<&[Item]>) -> Result<()> {
        let Some(eval) = eval.filter(|_| self.cfg.run.eval_on_start && self.step == 0) else {
            return Ok(());
        };
        let mut line = Map::from_iter([("step".to_string(), Value::from(0))]);
        line.extend(self.evaluation(eval)?);
        self.log(line)
    }

    /// `eval_loss` and the `eval_`-prefixed metrics of the held-out set.
    /// Shown as a phase of its own, its metrics printed when computed.
    fn evaluation(&self, eval: &[Item]) -> Result<Map<String, Value>> {
        let phase = self.progress.phase(format!("evaluating {} held-out examples", eval.len()));
        // Each rank evaluates its share of the batches (the same batches one process makes).
        let batch = self.cfg.run.batch_size;
        let part = self.dist.share_of_batches(eval, batch);
        let (loss, metrics) = evaluate_part(&self.cfg.objective, self.models(), part, &step_scale(eval.iter()), batch)?;
        let what = format!("the evaluation at step {}", self.step);
        let sums = self.sum_over_ranks(Sums { loss, metrics, tokens: 0 }, &what)?;
        let (eval_loss, eval_metrics) = (sums.loss, sums.metrics);
        drop(phase); // the metrics line printed below takes its place
        let mut fields = Map::from_iter([("eval_loss".to_string(), Value::from(eval_loss))]);
        fields.extend(eval_metrics.into_iter().map(|(k, v)| (format!("eval_{k}"), Value::from(v))));
        self.progress.println(&eval_line(self.step, &fields));
        Ok(fields)
    }

    /// Append one line to `metrics.jsonl`, whole: formatted in memory and written with one
    /// `write_all`, cut back on failure, so a full disk never leaves a partial line. The error
    /// names the file and the step.
    fn log(&mut self, line: Map<String, Value>) -> Result<()> {
        let Some(file) = self.metrics_file.as_mut() else {
            return Ok(()); // not rank 0
        };
        let step = line.get("step").cloned().unwrap_or(Value::Null);
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        checkpoint::append_whole(file, text.as_bytes()).with_context(|| {
            format!("step {step}: cannot append the metrics line to `{}`", self.metrics_path.display())
        })
    }

    /// Start a phase of work shown on its own progress line (sampling, judging, caching).
    pub fn phase(&self, what: impl Into<String>) -> Phase {
        self.progress.phase(what)
    }

    /// Phases shown one after another (a round's sampling, judging, scoring).
    pub fn phases(&self) -> Phases<'_> {
        Phases::new(&self.progress)
    }

    /// One optimizer step over `micro` (all its micro-batches, over every rank): see
    /// [`Trainer::step_share`], given this rank's share.
    pub fn step(
        &mut self,
        micro: &[Vec<&Item>],
        extra: Map<String, Value>,
        eval: Option<&[Item]>,
        checkpoint_now: bool,
    ) -> Result<()> {
        let mine = &micro[self.dist.share(micro.len())];
        self.step_share(mine, extra, eval, checkpoint_now)
    }

    /// One optimizer step of which this rank computes the micro-batches `mine`: forward,
    /// backward, the ranks' gradients summed, clip, AdamW, one `metrics.jsonl` line (with
    /// `extra` fields such as the epoch or round), evaluation on `eval` when due, and a
    /// checkpoint when due or when `checkpoint_now`.
    pub fn step_share(
        &mut self,
        mine: &[Vec<&Item>],
        extra: Map<String, Value>,
        eval: Option<&[Item]>,
        checkpoint_now: bool,
    ) -> Result<()> {
        let started = Instant::now();
        let (cfg, r) = (self.cfg, &self.cfg.run);
        let objective = &cfg.objective;
        self.policy.model.set_lora_dropout_step(Some((r.seed, self.step)));
        let what = format!("step {}", self.step + 1);
        let scale = self.sum_scales(step_scale(mine.iter().flatten().copied()), &what)?;
        let acc = accumulate(objective, self.models(), mine, &scale, &self.opt)?;
        let mut grads = acc.grads;
        // Gathering the metrics waits for the slowest rank; the gradient sum after it is the
        // all-reduce's own time.
        let wait_started = Instant::now();
        let sums = self.sum_over_ranks(Sums { loss: acc.loss, metrics: acc.metrics, tokens: acc.tokens }, &what)?;
        let (loss, metrics, tokens) = (sums.loss, sums.metrics, sums.tokens);
        let reduce_started = Instant::now();
        let shapes: Vec<Tensor> = self.opt.vars().map(|v| v.as_tensor().clone()).collect();
        self.dist.all_reduce_grads(&mut grads, &shapes, &format!("the gradient all-reduce of {what}"))?;
        let reduce_seconds = reduce_started.elapsed().as_secs_f64();
        let wait_seconds = (reduce_started - wait_started).as_secs_f64();
        let grad_norm = clip_grad_norm(&mut grads, cfg.optim.max_grad_norm)?;
        if !loss.is_finite() || !grad_norm.is_finite() {
            let last = checkpoint::latest(&r.output)?.map(|(s, p)| format!("step {s} at `{}`", p.display()));
            bail!(
                "the {} became {} at step {}; stopping before the update. Last good checkpoint: {}",
                if loss.is_finite() { "gradient norm" } else { "loss" },
                if loss.is_finite() { grad_norm } else { loss },
                self.step + 1,
                last.unwrap_or_else(|| "none (the run had not saved one yet)".into())
            );
        }
        let lr = lr_at(self.step, cfg.optim.lr, cfg.optim.warmup_steps, self.total, cfg.optim.scheduler);
        self.opt.step(&grads, lr)?;
        self.step += 1;
        let is_last = self.step == self.total;
        if r.sync_check_every > 0 && (is_last || self.step.is_multiple_of(r.sync_check_every)) {
            self.dist.check_in_sync(self.opt.vars(), self.step)?;
        }
        let secs = started.elapsed().as_secs_f64();
        let mut line = Map::new();
        line.insert("step".into(), self.step.into());
        line.extend(extra);
        line.insert("lr".into(), lr.into());
        line.insert("loss".into(), loss.into());
        line.insert("grad_norm".into(), grad_norm.into());
        line.insert("tokens_per_second".into(), (tokens as f64 / secs).into());
        for (k, v) in metrics {
            line.insert(k, v.into());
        }
        if self.dist.world_size() > 1 {
            // What data parallelism cost this step: waiting for the slowest rank, summing the
            // gradients, and the gradient bytes each rank put into the all-reduce.
            let bytes: usize = grads.iter().flatten().map(|g| g.elem_count() * 4).sum();
            line.insert("rank_wait_seconds".into(), wait_seconds.into());
            line.insert("allreduce_seconds".into(), reduce_seconds.into());
            line.insert("allreduce_bytes".into(), bytes.into());
        }
        if let Some(eval) = eval {
            if is_last || (r.eval_every > 0 && self.step.is_multiple_of(r.eval_every)) {
                line.extend(self.evaluation(eval)?);
            }
        }
        self.progress.step_done(self.step, format!("loss {loss:.4} | {:.0} tok/s", tokens as f64 / secs));
        self.log(line)?;
        if checkpoint_now || is_last || (r.save_every > 0 && self.step.is_multiple_of(r.save_every)) {
            self.save_checkpoint()?;
        }
        Ok(())
    }

    /// Write `checkpoints/step-N` now (rank 0, once every rank has reached it) and prune old
    /// ones.
    pub fn save_checkpoint(&mut self) -> Result<()> {
        let what = format!("the checkpoint of step {}", self.step);
        self.dist.barrier(&what)?;
        let saved = if self.dist.is_main() {
            self.write_checkpoint()
        } else {
            Ok(checkpoint::checkpoint_dir(&self.cfg.run.output, self.step))
        };
        self.last_checkpoint = Some(self.dist.agree(saved, &what)?);
        Ok(())
    }

    /// `checkpoints/step-N`'s files, and old checkpoints pruned.
    fn write_checkpoint(&self) -> Result<PathBuf> {
        let r = &self.cfg.run;
        let (opt_steps, opt_state) = self.opt.state();
        let state = TrainerState { step: self.step, optimizer_steps: opt_steps, ranks: self.dist.world_size() };
        let (cfg, policy, heads) = (self.cfg, &self.policy, &self.heads);
        let saved = checkpoint::save(&r.output, &state, (!r.save_only_model).then_some(&opt_state), |dir| {
            write_trainable(dir, cfg, policy)?;
            if !heads.is_empty() {
                let tensors: std::collections::HashMap<String, Tensor> =
                    heads.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
                candle::safetensors::save(&tensors, dir.join(heads::HEADS_FILE))?;
            }
            Ok(())
        })?;
        checkpoint::prune(&r.output, r.keep_last).with_context(|| {
            format!("step {}: cannot remove old checkpoints of `{}`", self.step, r.output.display())
        })?;
        Ok(saved)
    }

    /// End the run: `final/` gets the trained model (merged, plus the adapter, for LoRA runs;
    /// hard links to the last checkpoint's files when it holds the final weights).
    pub fn finish(self) -> Result<RunSummary> {
        self.progress.finish();
        let final_dir = self.cfg.run.output.join("final");
        self.dist.barrier("writing final/")?;
        let written = if self.dist.is_main() { self.write_final_dir(&final_dir) } else { Ok(()) };
        self.dist.agree(written, "writing final/")?;
        Ok(RunSummary { steps: self.step, final_dir })
    }

    /// `final/`, through a temporary directory that a failure removes.
    fn write_final_dir(&self, final_dir: &Path) -> Result<()> {
        let tmp = self.cfg.run.output.join(".tmp-final");
        let _ = std::fs::remove_dir_all(&tmp);
        let written = self.write_final(&tmp, final_dir);
        if written.is_err() {
            // Free what a full disk let through; the checkpoints stay as they were.
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written.with_context(|| {
            format!(
                "step {}: cannot write the final model `{}` (the last checkpoint is intact)",
                self.step,
                final_dir.display()
            )
        })
    }

    /// A LoRA run's `final/`: the PEFT adapter in `final/adapter/` and the merged model beside
    /// it, or, when merging in f32 would not fit in memory, the adapter itself.
    fn write_final_lora(&self, tmp: &Path, final_dir: &Path) -> Result<()> {
        // final/ is a complete transformers model (adapters merged) plus the PEFT adapter.
        write_trainable(&tmp.join("adapter"), self.cfg, &self.policy)
            .with_context(|| format!("cannot write `{}`", tmp.join("adapter").display()))?;
        let merged_bytes = self.policy.model.parameter_count() * 4;
        if let Some(available) = available_memory().filter(|&a| merged_bytes > a) {
            // Too large to merge in f32 here (a packed 8B base): final/ is the adapter itself
            // (`--model final/` loads base + adapter).
            eprintln!(
                "candor: final/ holds the LoRA adapter, not a merged model: merging needs {:.1} GB of f32 weights and {:.1} GB are available (merge elsewhere with `candor export --checkpoint {} --merge-lora`)",
                merged_bytes as f64 / 1e9,
                available as f64 / 1e9,
                final_dir.join("adapter").display()
            );
            write_trainable(tmp, self.cfg, &self.policy)
                .with_context(|| format!("cannot write `{}`", tmp.display()))?;
        } else {
            let mut merged = self.policy.clone();
            merged.model = self.policy.model.frozen_view();
            merged.model.merge_lora()?;
            write_policy(tmp, &merged)
                .with_context(|| format!("cannot write the model files into `{}`", tmp.display()))?;
        }
        Ok(())
    }

    /// `final/`'s files into `tmp`, then renamed into place.
    fn write_final(&self, tmp: &Path, final_dir: &Path) -> Result<()> {
        let at_last_step = self.last_checkpoint.as_ref().filter(|dir| dir.ends_with(format!("step-{}", self.step)));
        if self.cfg.lora.is_some() {
            self.write_final_lora(tmp, final_dir)?;
        } else if let Some(saved) = at_last_step {
            // The last checkpoint already holds exactly these weights.
            checkpoint::link_model_files(saved, tmp, &[heads::HEADS_FILE])?;
        } else {
            write_policy(tmp, &self.policy)
                .with_context(|| format!("cannot write the model files into `{}`", tmp.display()))?;
        }
        let _ = std::fs::remove_dir_all(final_dir);
        std::fs::rename(tmp, final_dir)
            .with_context(|| format!("cannot move `{}` to `{}`", tmp.display(), final_dir.display()))?;
        Ok(())
    }
}

impl Trainer<'_> {
    /// The steps over a fixed set of items: epochs of seeded shuffles (or `run.max_steps`),
    /// evaluating on `eval` as configured.
    pub fn train_on(&mut self, items: &[Item], eval: Option<&[Item]>) -> Result<()> {
        let r = &self.cfg.run;
        let total = planned_steps(items.len(), r);
        self.set_total(total);
        self.evaluate_on_start(eval)?;
        let lengths: Option<Vec<usize>> = r.group_by_length.then(|| items.iter().map(Item::tokens).collect());
        let mut orders = BatchOrders::new(r.seed, r.batch_size, lengths);
        while self.step < total {
            let (micro, epoch) = micro_batches(items, self.step, r, &mut orders);
            let extra = Map::from_iter([("epoch".to_string(), Value::from(epoch))]);
            self.step(&micro, extra, eval, false)?;
        }
        Ok(())
    }
}

/// What the micro-batches of one optimizer step add up to.
pub struct Accumulated {
    /// The step's loss (sum of the micro-batch contributions).
    pub loss: f64,
    /// The step's metrics.
    pub metrics: Vec<(String, f64)>,
    /// Tokens the policy read.
    pub tokens: usize,
    /// Summed gradients, one per optimizer variable.
    pub grads: Vec<Option<Tensor>>,
}

/// The size of a step made of `items`: its examples and loss tokens.
pub fn step_scale<'a>(items: impl Iterator<Item = &'a Item>) -> StepScale {
    let mut scale = StepScale { examples: 0.0, tokens: 0.0 };
    for item in items {
        scale.examples += 1.0;
        scale.tokens += item.loss_tokens() as f64;
    }
    scale
}

/// Forward and backward every micro-batch of `micro`, summing gradients. Losses come back
/// divided by the whole step's size `scale` (over every rank), so the sum over the step's
/// micro-batches is the full-batch loss.
pub fn accumulate(
    objective: &candor_alignment::Objective,
    models: StepModels,
    micro: &[Vec<&Item>],
    scale: &StepScale,
    opt: &AdamW,
) -> Result<Accumulated> {
    let policy = models.policy;
    let mut acc = Accumulated { loss: 0.0, metrics: Vec::new(), tokens: 0, grads: vec![None; opt.vars().count()] };
    let in_place = policy.kernels() == crate::model::Kernels::Fused;
    for batch in micro {
        let input = objective_input(models, objective.data_need(), batch)?;
        let out = objective.compute(&input, scale)?;
        acc.loss += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        add_metrics(&mut acc.metrics, out.metrics);
        acc.tokens += batch.iter().map(|i| i.tokens()).sum::<usize>();
        let g = out.loss.backward()?;
        // Checkpointed blocks hand their weights' gradients over separately.
        let mut checkpointed = policy.take_checkpoint_grads();
        for (sum, var) in acc.grads.iter_mut().zip(opt.vars()) {
            for gv in
                [g.get(var.as_tensor()).cloned(), checkpointed.remove(&var.as_tensor().id())].into_iter().flatten()
            {
                *sum = Some(match sum.take() {
                    // Every gradient candle's backward returns is a fresh sum that nothing
                    // else holds, so the first micro-batch's can take the others in place.
                    Some(prev) if in_place && fused::supports(&[&prev, &gv]) && prev.is_contiguous() => {
                        optim::kernels::add_in_place(&prev, &gv)?;
                        prev
                    }
                    Some(prev) => (prev + gv)?,
                    None => gv,
                });
            }
        }
    }
    Ok(acc)
}

/// A rank's part of a step or an evaluation, summed over the ranks.
#[derive(serde::Serialize, serde::Deserialize)]
struct Sums {
    loss: f64,
    metrics: Vec<(String, f64)>,
    tokens: usize,
}

/// Refuse a run directory that holds another run (or clear it with `run.overwrite`) before
/// anything loads, create it, and save the recipe.
fn prepare(cfg: &TrainConfig, resume: bool) -> Result<()> {
    let run_dir = &cfg.run.output;
    checkpoint::prepare_run_dir(run_dir, resume, cfg.run.overwrite)?;
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create run directory `{}`", run_dir.display()))?;
    // The saved recipe never carries `overwrite`: reusing it must not clear another run.
    let mut saved_cfg = cfg.clone();
    saved_cfg.run.overwrite = false;
    checkpoint::write_atomically(&run_dir.join("config.toml"), saved_cfg.to_toml()?.as_bytes())
}

/// `metrics.jsonl` opened for appending: cut back to `resumed_at`'s step, or started afresh.
fn open_metrics(path: &Path, resumed_at: Option<u64>) -> Result<Option<std::fs::File>> {
    match resumed_at {
        Some(step) => checkpoint::truncate_metrics(path, step)?,
        None => {
            let _ = std::fs::remove_file(path);
        }
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open `{}`", path.display()))?;
    Ok(Some(file))
}

/// Memory the kernel says is available (`MemAvailable`), in bytes; `None` where unknown.
fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: usize = info.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What a checkpoint holds of the model: the PEFT adapter of a LoRA run, else the full model.
fn write_trainable(dir: &Path, cfg: &TrainConfig, m: &LoadedModel) -> Result<()> {
    match &cfg.lora {
        Some(lora) => {
            crate::model::lora::save_adapter(dir, lora, &cfg.model.model, &m.model.lora_adapters())?;
            let base_quant = match cfg.model.frozen_packing()? {
                crate::model::Packing::Quantize(kind) => Some(kind),
                _ => None,
            };
            crate::load::save_adapter_base_quant(dir, base_quant)?;
            crate::load::save_adapter_chat_template(dir, m.chat_template.as_ref())
        }
        None => write_policy(dir, m),
    }
}

fn write_policy(dir: &Path, m: &LoadedModel) -> Result<()> {
    let max_shard = crate::export::DEFAULT_MAX_SHARD_BYTES;
    crate::export::write_hf_dir(
        dir,
        &m.model,
        &m.tokenizer,
        m.chat_template.as_ref(),
        &m.eos_token_ids,
        m.model.dtype(),
        max_shard,
    )
}

fn add_metrics(into: &mut Vec<(String, f64)>, new: Vec<(String, f64)>) {
    for (k, v) in new {
        match into.iter_mut().find(|(name, _)| *name == k) {
            Some((_, acc)) => *acc += v,
            None => into.push((k, v)),
        }
    }
}

/// Loss and metrics of the whole held-out set (no gradient).
pub fn evaluate(
    objective: &candor_alignment::Objective,
    models: StepModels,
    items: &[Item],
    batch_size: usize,
) -> Result<(f64, Vec<(String, f64)>)> {
    evaluate_part(objective, models, items, &step_scale(items.iter()), batch_size)
}

/// Loss and metrics of `items`, part of a held-out set whose size is `scale` (no gradient).
fn evaluate_part(
    objective: &candor_alignment::Objective,
    models: StepModels,
    items: &[Item],
    scale: &StepScale,
    batch_size: usize,
) -> Result<(f64, Vec<(String, f64)>)> {
    let frozen = models.policy.frozen_view();
    let models = models.with_policy(&frozen);
    let mut loss = 0f64;
    let mut metrics = Vec::new();
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Item> = chunk.iter().collect();
        let input = objective_input(models, objective.data_need(), &refs)?;
        let out = objective.compute(&input, scale)?;
        loss += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        add_metrics(&mut metrics, out.metrics);
    }
    Ok((loss, metrics))
}

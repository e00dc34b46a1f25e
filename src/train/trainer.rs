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
use crate::load::LoadedModel;
use crate::model::{fused, CausalLm};

/// Options that do not change the result.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// No progress bar.
    pub quiet: bool,
    /// Continue from the newest checkpoint of the run directory.
    pub resume: bool,
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
    metrics_file: std::fs::File,
    metrics_path: PathBuf,
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
        // A directory holding another run is refused (or cleared with `run.overwrite`) before
        // anything loads: its checkpoints and metrics must never mix with this run's.
        checkpoint::prepare_run_dir(run_dir, opts.resume, cfg.run.overwrite)?;
        let resume_from = if opts.resume { checkpoint::latest(run_dir)? } else { None };
        if opts.resume && resume_from.is_none() {
            eprintln!("candor: no checkpoint in `{}`; starting from step 0", run_dir.display());
        }
        std::fs::create_dir_all(run_dir)
            .with_context(|| format!("cannot create run directory `{}`", run_dir.display()))?;
        // The saved recipe never carries `overwrite`: reusing it must not clear another run.
        let mut saved_cfg = cfg.clone();
        saved_cfg.run.overwrite = false;
        checkpoint::write_atomically(&run_dir.join("config.toml"), saved_cfg.to_toml()?.as_bytes())?;

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
        if let Some((_, dir)) = &resume_from {
            let (state, tensors) = checkpoint::load_state(dir)?;
            opt.load_state(state.optimizer_steps, &tensors)?;
            step = state.step;
            checkpoint::truncate_metrics(&run_dir.join("metrics.jsonl"), step)?;
        } else {
            let _ = std::fs::remove_file(run_dir.join("metrics.jsonl"));
        }
        let metrics_path = run_dir.join("metrics.jsonl");
        let metrics_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .with_context(|| format!("cannot open `{}`", metrics_path.display()))?;
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
            progress: Progress::new(opts.quiet),
            pad,
            last_checkpoint: None,
        })
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
        let (eval_loss, eval_metrics) = evaluate(&self.cfg.objective, self.models(), eval, self.cfg.run.batch_size)?;
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
        let step = line.get("step").cloned().unwrap_or(Value::Null);
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        checkpoint::append_whole(&mut self.metrics_file, text.as_bytes()).with_context(|| {
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

    /// One optimizer step over `micro` (its micro-batches): forward, backward, clip, AdamW,
    /// one `metrics.jsonl` line (with `extra` fields such as the epoch or round), evaluation on
    /// `eval` when due, and a checkpoint when due or when `checkpoint_now`.
    pub fn step(
        &mut self,
        micro: &[Vec<&Item>],
        extra: Map<String, Value>,
        eval: Option<&[Item]>,
        checkpoint_now: bool,
    ) -> Result<()> {
        let started = Instant::now();
        let (cfg, r) = (self.cfg, &self.cfg.run);
        let objective = &cfg.objective;
        self.policy.model.set_lora_dropout_step(Some((r.seed, self.step)));
        let acc = accumulate(objective, self.models(), micro, &self.opt)?;
        let (loss, metrics, tokens, mut grads) = (acc.loss, acc.metrics, acc.tokens, acc.grads);
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
        let is_last = self.step == self.total;
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

    /// Write `checkpoints/step-N` now and prune old ones.
    pub fn save_checkpoint(&mut self) -> Result<()> {
        let r = &self.cfg.run;
        let (opt_steps, opt_state) = self.opt.state();
        let state = TrainerState { step: self.step, optimizer_steps: opt_steps };
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
        self.last_checkpoint = Some(saved);
        checkpoint::prune(&r.output, r.keep_last).with_context(|| {
            format!("step {}: cannot remove old checkpoints of `{}`", self.step, r.output.display())
        })?;
        Ok(())
    }

    /// End the run: `final/` gets the trained model (merged, plus the adapter, for LoRA runs;
    /// hard links to the last checkpoint's files when it holds the final weights).
    pub fn finish(self) -> Result<RunSummary> {
        self.progress.finish();
        let run_dir = &self.cfg.run.output;
        let final_dir = run_dir.join("final");
        let tmp = run_dir.join(".tmp-final");
        let _ = std::fs::remove_dir_all(&tmp);
        let written = self.write_final(&tmp, &final_dir);
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
        })?;
        Ok(RunSummary { steps: self.step, final_dir })
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

/// Forward and backward every micro-batch of a step, summing gradients. Losses come back
/// divided by the whole step's size, so the sum is the full-batch loss.
pub fn accumulate(
    objective: &candor_alignment::Objective,
    models: StepModels,
    micro: &[Vec<&Item>],
    opt: &AdamW,
) -> Result<Accumulated> {
    let policy = models.policy;
    let scale = StepScale {
        examples: micro.iter().map(Vec::len).sum::<usize>() as f64,
        tokens: micro.iter().flatten().map(|i| i.loss_tokens()).sum::<usize>() as f64,
    };
    let mut acc = Accumulated { loss: 0.0, metrics: Vec::new(), tokens: 0, grads: vec![None; opt.vars().count()] };
    let in_place = policy.kernels() == crate::model::Kernels::Fused;
    for batch in micro {
        let input = objective_input(models, objective.data_need(), batch)?;
        let out = objective.compute(&input, &scale)?;
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
    let frozen = models.policy.frozen_view();
    let models = models.with_policy(&frozen);
    let scale =
        StepScale { examples: items.len() as f64, tokens: items.iter().map(|i| i.loss_tokens()).sum::<usize>() as f64 };
    let mut loss = 0f64;
    let mut metrics = Vec::new();
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Item> = chunk.iter().collect();
        let input = objective_input(models, objective.data_need(), &refs)?;
        let out = objective.compute(&input, &scale)?;
        loss += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        add_metrics(&mut metrics, out.metrics);
    }
    Ok((loss, metrics))
}

//! Command-line definitions (clap derive). `commands/` implements each subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use crate::data::TruncationMode;

/// Align causal language models with human preferences.
#[derive(Debug, Parser)]
#[command(name = "candor", version, about, propagate_version = true)]
pub struct Cli {
    /// The subcommand to run.
    #[command(subcommand)]
    pub command: Command,
    /// Options every subcommand takes.
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Device to run on: cpu, cuda, cuda:N, metal or auto.
    #[arg(long, global = true, default_value = "cpu", env = "CANDOR_DEVICE", value_parser = crate::load::check_device, help_heading = "Global options")]
    pub device: String,
    /// Floating-point type of the weights and activations: f32, bf16 or f16.
    #[arg(long, global = true, default_value = "f32", env = "CANDOR_DTYPE", value_parser = crate::load::check_dtype, help_heading = "Global options")]
    pub dtype: String,
    /// Kernels of the forward and backward pass: `fused` (one-pass CPU kernels with their own
    /// backward) or `plain` (compositions of candle ops).
    #[arg(long, global = true, default_value = "fused", env = "CANDOR_KERNELS", help_heading = "Global options")]
    pub kernels: crate::model::Kernels,
    /// A Jinja chat template (transformers' semantics) for the models the command runs, in
    /// place of their own: e.g. `templates/gemma3.jinja` for the Gemma 3 base model, which
    /// ships none. Judges keep theirs.
    #[arg(long, global = true, value_name = "FILE", help_heading = "Global options")]
    pub chat_template: Option<PathBuf>,
    /// Keep frozen models (generation, scoring, judges, a run's reference and teacher) and a
    /// LoRA run's base quantized to this type at load, like `load_in_4bit`: q4_0, q4_1, q5_0,
    /// q8_0, q4_k, q5_k, q6_k, bf16 or f16 (f32: every weight dense, dequantized). Products
    /// dequantize a tile at a time; nothing trained is quantized. Without it, frozen models keep
    /// the blocks their file stores (a GGUF's quantization, bf16 safetensors).
    #[arg(long, global = true, value_name = "KIND", value_parser = crate::model::packed::parse_base_quant, help_heading = "Global options")]
    pub base_quant: Option<candle::quantized::GgmlDType>,
    /// Log more (repeat for more detail); `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global options")]
    pub verbose: u8,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Put a known model into candor's cache and print its path.
    #[command(after_help = "Examples:\n  candor fetch\n  candor fetch gemma3-270m")]
    Fetch(FetchArgs),
    /// Generate completions for one prompt or a JSONL file of prompts.
    #[command(
        after_help = "Examples:\n  candor generate --model default --chat --prompt \"What is the capital of France?\" --temperature 0\n  candor generate --model ./my-model --prompts prompts.jsonl --output out.jsonl --temperature 0.7 --top-p 0.9 --seed 1\n  candor generate --model HuggingFaceTB/SmolLM2-135M-Instruct --prompt \"Once upon a time\""
    )]
    Generate(GenerateArgs),
    /// Summed completion log-probs of every row of a dataset (TRL's convention).
    #[command(
        after_help = "Examples:\n  candor logprobs --model default --data pairs.jsonl\n  candor logprobs --model ./my-model --data pairs.jsonl --output logps.jsonl --batch-size 4"
    )]
    Logprobs(LogprobsArgs),
    /// Fine-tune a model with an objective from the registry (`--help-objective` lists them).
    #[command(
        after_help = "Examples:\n  candor train --help-objective\n  candor train --objective dpo --help-objective\n  candor train --config configs/dpo.toml\n  candor train --objective sft --model default --data data/sft/train.jsonl --output runs/sft --max-steps 50\n  candor train --config configs/dpo.toml --set objective.beta=0.2 --lr 1e-6\n  candor train --resume runs/dpo"
    )]
    Train(Box<TrainArgs>),
    /// Rewards of every row of a dataset under a reward model, one JSON line per row, in order.
    #[command(
        after_help = "Examples:\n  candor score --model runs/reward/final --data data/preference/test.jsonl\n  candor score --model runs/reward/final --data answers.jsonl --output rewards.jsonl"
    )]
    Score(ScoreArgs),
    /// Answers of a model critiqued word by word, written as SFT rows that teach a model to write
    /// such critiques (Text2Grad's natural-language reward model).
    #[command(
        after_help = "Examples:\n  candor critique --model default --prompts data/preference/train.jsonl --output runs/critiques.jsonl\n  candor train --config configs/critic.toml   # SFT of a critique model on them\n  candor train --config configs/text2grad.toml --set objective.critic=\"llm:runs/critic/final\""
    )]
    Critique(CritiqueArgs),
    /// Write a checkpoint, run directory or any model as a transformers directory.
    #[command(
        after_help = "Examples:\n  candor export --checkpoint runs/dpo/final --output my-model --dtype bf16\n  candor export --checkpoint runs/dpo --output my-model   # newest checkpoint of a run\n  candor export --checkpoint default --output smollm2-hf  # GGUF to transformers layout"
    )]
    Export(ExportArgs),
    /// Score a model under a judge (verifier accuracy, mean reward), or its win-rate against a
    /// baseline (`candor eval winrate`).
    #[command(
        after_help = "Examples:\n  candor eval --model runs/dpo/final --prompts data/preference/test.jsonl --judge verifier:auto\n  candor eval winrate --model runs/dpo/final --baseline default --prompts data/preference/test.jsonl --judge verifier:auto\n  candor eval winrate --model A --baseline B --prompts p.jsonl --judge openai:http://localhost:8080/v1 --judge-model qwen2.5-7b-instruct"
    )]
    Eval(Box<EvalArgs>),
    /// Draw a run's training curves (loss, reward margins, accuracy) from its `metrics.jsonl`.
    #[command(after_help = "Examples:\n  candor plot runs/dpo\n  candor plot runs/dpo --output dpo.svg")]
    Plot(PlotArgs),
    /// Run a pipeline recipe: fetch, fine-tune, evaluate against the starting model, export.
    #[command(after_help = "Examples:\n  candor run configs/quickstart.toml")]
    Run(RunArgs),
    /// Measure load time and generation throughput.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Build a distillation student from a teacher.
    #[command(subcommand)]
    Student(StudentCommand),
}

/// `candor student ...`.
#[derive(Debug, Subcommand)]
pub enum StudentCommand {
    /// A smaller model with the teacher's tokenizer: a subset of its decoder layers, exported in
    /// transformers layout.
    #[command(
        after_help = "Examples:\n  candor student init --from default --num-layers 15 --output students/smollm2-15l\n  candor student init --from ./teacher --keep-layers 0,2,4,6,8,10 --output students/six"
    )]
    Init(StudentInitArgs),
}

/// `candor student init`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("layers").required(true).args(["keep_layers", "num_layers"])))]
pub struct StudentInitArgs {
    /// The teacher: directory, `.gguf`, hub id or `default`.
    #[arg(long)]
    pub from: String,
    /// Decoder layers to keep, comma-separated, strictly increasing (0-based).
    #[arg(long, value_delimiter = ',')]
    pub keep_layers: Option<Vec<usize>>,
    /// Keep this many evenly spaced layers, the first and last included.
    #[arg(long)]
    pub num_layers: Option<usize>,
    /// Where to write the transformers directory.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

/// `candor fetch`.
#[derive(Debug, Args)]
pub struct FetchArgs {
    /// Which model: a preset name (smollm2-135m-instruct, the default, or gemma3-270m).
    #[arg(default_value = "smollm2-135m-instruct")]
    pub name: String,
}

/// Where the model comes from (shared by every command that loads one).
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A model directory, a `.gguf` file, a hub id `org/name[@revision]`, or `default`.
    #[arg(long, short = 'm', default_value = "default")]
    pub model: String,
}

/// `candor generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// One prompt; the answer streams to the terminal.
    #[arg(long, conflicts_with = "prompts", required_unless_present = "prompts")]
    pub prompt: Option<String>,
    /// A JSONL file of `{"prompt": ...}` rows (string or list of messages; other fields are
    /// carried to the output).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Wrap string prompts as a user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most new tokens per prompt.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling threshold (1 disables it).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Sample only among the K most likely tokens (0 disables it).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Random seed for sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts generated together in one batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Write one JSON line per prompt here instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Skip malformed rows of `--prompts` (reporting how many) instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
    /// Chain of hindsight: condition on this feedback phrase after the prompt (tokenized on its
    /// own, as in training), e.g. "a good answer is ".
    #[arg(long, value_name = "TEXT")]
    pub hindsight_prefix: Option<String>,
}

/// `candor score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// The reward model: a `*ForSequenceClassification` directory with one label (candor's
    /// `--objective reward` output or transformers'), or a hub id.
    #[arg(long, short = 'm')]
    pub model: String,
    #[command(flatten)]
    pub rows: RowsArgs,
}

/// `candor critique`.
#[derive(Debug, Args)]
pub struct CritiqueArgs {
    /// The model whose answers are critiqued.
    #[arg(long, short = 'm', default_value = "default")]
    pub model: String,
    /// Prompts JSONL (with what the critic needs: `answer` / `constraint` for `rule`).
    #[arg(long)]
    pub prompts: PathBuf,
    /// Who critiques: `rule`, `llm:MODEL` or `openai:BASE_URL`.
    #[arg(long, default_value = "rule")]
    pub critic: String,
    /// The model name sent to an `openai:` critic.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Answers per prompt.
    #[arg(long, default_value_t = 2)]
    pub samples_per_prompt: usize,
    /// Sampling temperature of the answers.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Most new tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Seed of the answers.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Answers generated together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Where the SFT rows go (`prompt`: the critique request, `completion`: the critique).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
}

/// A dataset scored row by row (`candor logprobs`, `candor score`).
#[derive(Debug, Args)]
pub struct RowsArgs {
    /// JSONL rows: preference (`prompt`/`chosen`/`rejected`), prompt-completion, `messages` or `text`.
    #[arg(long)]
    pub data: PathBuf,
    /// Write the JSON lines here instead of stdout.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[command(flatten)]
    pub truncation: TruncationArgs,
    /// Skip malformed rows (reporting them) instead of failing.
    #[arg(long)]
    pub skip_bad_rows: bool,
}

/// Tokenization limits (TRL's `max_length`, `max_prompt_length`, `truncation_mode`).
#[derive(Debug, Args)]
pub struct TruncationArgs {
    /// Longest prompt + completion in tokens.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens (longer prompts keep their end).
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
    /// Which end of a sequence longer than `--max-length` is kept.
    #[arg(long, default_value = "keep-start")]
    pub truncation_mode: TruncationMode,
}

/// `candor logprobs`.
#[derive(Debug, Args)]
pub struct LogprobsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub rows: RowsArgs,
}

/// `candor bench ...`.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time loading the model (for GGUF: read + dequantize + build).
    Load(BenchLoadArgs),
    /// Greedy generation throughput at batch 1 and at `--batch-size`.
    Generate(BenchGenerateArgs),
    /// Training step time on synthetic data of exactly the given shape.
    Train(BenchTrainArgs),
}

/// `candor bench load`.
#[derive(Debug, Args)]
pub struct BenchLoadArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Timed repetitions (the best is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `candor bench generate`.
#[derive(Debug, Args)]
pub struct BenchGenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Batch size of the batched measurement (batch 1 is always measured).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Tokens generated per prompt (generation never stops early in the benchmark).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Prompts of exactly this many tokens (the start of a fixed English text, no chat
    /// template) instead of the eight chat prompts.
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Sample at this temperature (the on-policy sampler's regime) instead of greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// A published model's shape with random weights instead of `--model` (see
    /// `configs/shapes/`: qwen2.5-0.5b, qwen2.5-1.5b, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b);
    /// prompts are `--prompt-tokens` random ids (default 32).
    #[arg(long, value_name = "NAME")]
    pub shape: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `candor train`. Every flag overrides the recipe (`--config`); `--set key.path=value` sets
/// any configuration key. The flags are grouped by the recipe's section they set; each one's
/// key is in [`TRAIN_FLAGS`].
#[derive(Debug, Args, Serialize)]
pub struct TrainArgs {
    /// A TOML recipe (see `configs/`).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Set any configuration key, e.g. `--set objective.beta=0.2` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    #[serde(skip)]
    pub set: Vec<String>,
    /// Continue the run in this directory from its newest checkpoint (uses its `config.toml`).
    #[arg(long, value_name = "RUN_DIR")]
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Describe `--objective NAME` and exit: its loop, the data it needs, and every
    /// `objective.KEY` with its default and flag (method-specific flags are listed only there);
    /// without `--objective`, list the objectives.
    #[arg(long)]
    #[serde(skip)]
    pub help_objective: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    #[serde(skip)]
    pub quiet: bool,
    /// `--objective` and its hyper-parameters.
    #[command(flatten)]
    #[serde(flatten)]
    pub objective: TrainObjectiveArgs,
    /// The policy and reference.
    #[command(flatten)]
    #[serde(flatten)]
    pub model: TrainModelArgs,
    /// Training and held-out data.
    #[command(flatten)]
    #[serde(flatten)]
    pub data: TrainDataArgs,
    /// Optimizer and schedule.
    #[command(flatten)]
    #[serde(flatten)]
    pub optim: TrainOptimArgs,
    /// Batching, length and checkpoints.
    #[command(flatten)]
    #[serde(flatten)]
    pub run: TrainRunArgs,
    /// The online loop.
    #[command(flatten)]
    #[serde(flatten)]
    pub online: TrainOnlineArgs,
    /// Distillation.
    #[command(flatten)]
    #[serde(flatten)]
    pub distill: TrainDistillArgs,
    /// LoRA adapters.
    #[command(flatten)]
    #[serde(flatten)]
    pub lora: TrainLoraArgs,
}

/// Every `candor train` flag that sets a configuration key: (field of [`TrainArgs`], key). A
/// flag left out, or a switch left off, sets nothing.
pub const TRAIN_FLAGS: &[(&str, &str)] = &[
    ("objective", "objective.name"),
    ("beta", "objective.beta"),
    ("loss_type", "objective.loss_type"),
    ("label_smoothing", "objective.label_smoothing"),
    ("reference_free", "objective.reference_free"),
    ("epsilon", "objective.epsilon"),
    ("alpha", "objective.alpha"),
    ("base_objective", "objective.base_objective"),
    ("spo_weight", "objective.spo_weight"),
    ("center_rewards_coefficient", "objective.center_rewards_coefficient"),
    ("eta", "objective.eta"),
    ("tau", "objective.tau"),
    ("temperature", "objective.temperature"),
    ("model", "model.model"),
    ("ref_model", "model.ref_model"),
    ("precompute_ref_logps", "model.precompute_ref_logps"),
    ("data", "data.train"),
    ("eval_data", "data.eval"),
    ("max_length", "data.max_length"),
    ("max_prompt_length", "data.max_prompt_length"),
    ("lr", "optim.lr"),
    ("warmup_steps", "optim.warmup_steps"),
    ("scheduler", "optim.scheduler"),
    ("weight_decay", "optim.weight_decay"),
    ("max_grad_norm", "optim.max_grad_norm"),
    ("output", "run.output"),
    ("overwrite", "run.overwrite"),
    ("batch_size", "run.batch_size"),
    ("grad_accum", "run.grad_accum"),
    ("max_steps", "run.max_steps"),
    ("epochs", "run.epochs"),
    ("seed", "run.seed"),
    ("group_by_length", "run.group_by_length"),
    ("gradient_checkpointing", "run.gradient_checkpointing"),
    ("packing", "run.packing"),
    ("save_every", "run.save_every"),
    ("keep_last", "run.keep_last"),
    ("save_only_model", "run.save_only_model"),
    ("eval_every", "run.eval_every"),
    ("sync_check_every", "run.sync_check_every"),
    ("collective_timeout", "run.collective_timeout"),
    ("prompts", "online.prompts"),
    ("rounds", "online.rounds"),
    ("samples_per_prompt", "online.samples_per_prompt"),
    ("judge", "online.judge"),
    ("judge_model", "online.judge_model"),
    ("teacher_outputs", "online.teacher_outputs"),
    ("teacher_model", "online.teacher_model"),
    ("teacher", "distill.teacher"),
    ("teacher_logits_cache", "distill.teacher_logits_cache"),
    ("distill_source", "distill.source"),
    ("student_num_layers", "distill.student_num_layers"),
    ("lora_r", "lora.r"),
    ("lora_alpha", "lora.alpha"),
    ("lora_dropout", "lora.dropout"),
    ("lora_targets", "lora.targets"),
];

/// `--objective` and its hyper-parameters (`objective.*`). Method-specific flags are hidden
/// from `--help`; `--help-objective` lists each objective's.
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Objective")]
pub struct TrainObjectiveArgs {
    /// The objective (`candor-alignment`'s registry); `--help-objective` describes it.
    #[arg(long, value_name = "NAME", value_parser = objective_names())]
    pub objective: Option<String>,
    /// DPO family: inverse temperature β (KD: the JSD interpolation, 0 = forward KL).
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO: sigmoid, ipo or hinge.
    #[arg(long)]
    pub loss_type: Option<String>,
    /// DPO: label smoothing (conservative DPO).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// DPO: no reference model (uniform reference).
    #[arg(long, hide = true)]
    pub reference_free: bool,
    /// rDPO: assumed label-flip rate (SinKD: entropic regularisation ε).
    #[arg(long, hide = true)]
    pub epsilon: Option<f64>,
    /// RPO: weight of the NLL term.
    #[arg(long, hide = true)]
    pub alpha: Option<f64>,
    /// SPO: the base preference loss (dpo, ipo or hinge).
    #[arg(long, hide = true)]
    pub base_objective: Option<String>,
    /// SPO: weight λ of the self-supervised degree-classification term.
    #[arg(long, hide = true)]
    pub spo_weight: Option<f64>,
    /// Reward model: weight of the centering term (r_w + r_l)² (TRL's; 0.01 is usual).
    #[arg(long, hide = true)]
    pub center_rewards_coefficient: Option<f64>,
    /// INPO: mirror-descent step size η.
    #[arg(long, hide = true)]
    pub eta: Option<f64>,
    /// INPO: KL-to-reference strength τ.
    #[arg(long, hide = true)]
    pub tau: Option<f64>,
    /// Distillation: softmax temperature of teacher and student.
    #[arg(long, hide = true)]
    pub temperature: Option<f64>,
}

/// The objectives `--objective` accepts, each with its loop and line of help, from the registry.
fn objective_names() -> clap::builder::PossibleValuesParser {
    let values = candor_alignment::Objective::SPECS
        .iter()
        .map(|s| clap::builder::PossibleValue::new(s.name).help(format!("[{}] {}", s.loop_kind.name(), s.help)));
    clap::builder::PossibleValuesParser::new(values)
}

/// The models of a training run (`model.*`).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Models")]
pub struct TrainModelArgs {
    /// The policy to train: directory, `.gguf`, hub id or `default`.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// The frozen reference model (default: a frozen copy of the starting policy).
    #[arg(long)]
    pub ref_model: Option<String>,
    /// Score the data with the reference once, cache it next to the run, free the reference.
    #[arg(long)]
    pub precompute_ref_logps: bool,
}

/// The data of a training run (`data.*`).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Data")]
pub struct TrainDataArgs {
    /// Training data (JSONL).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Held-out data evaluated every `--eval-every` steps and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Longest prompt + completion in tokens.
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Longest prompt in tokens.
    #[arg(long)]
    pub max_prompt_length: Option<usize>,
}

/// Optimizer and schedule (`optim.*`).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Optimizer")]
pub struct TrainOptimArgs {
    /// Peak learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Schedule after warm-up: constant, linear or cosine.
    #[arg(long)]
    pub scheduler: Option<crate::train::optim::Scheduler>,
    /// Decoupled weight decay (matrices only).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Global gradient-norm clip (0 turns it off).
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
}

/// Batching, length of the run and checkpoints (`run.*`).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Run")]
pub struct TrainRunArgs {
    /// The run directory.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Train into an output directory that already holds a run, clearing its checkpoints,
    /// metrics and final model first (`run.overwrite`; transformers' `overwrite_output_dir`).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Rows per micro-batch (a preference row is one pair).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Optimizer steps (overrides `--epochs`).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Passes over the data.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Seed of the data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Batch examples of similar length together (less padding).
    #[arg(long)]
    pub group_by_length: bool,
    /// Recompute each decoder block in the backward instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// SFT: pack several sequences into each `--max-length` row.
    #[arg(long)]
    pub packing: bool,
    /// Checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<u64>,
    /// Keep only the newest K checkpoints.
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Checkpoints without optimizer state: less disk, but they cannot be resumed from.
    #[arg(long)]
    pub save_only_model: bool,
    /// Evaluate every N steps.
    #[arg(long)]
    pub eval_every: Option<u64>,
    /// Data parallelism: compare the ranks' parameter checksums every N steps (0 = never).
    #[arg(long)]
    pub sync_check_every: Option<u64>,
    /// Data parallelism: seconds a collective waits for the other ranks.
    #[arg(long, value_name = "SECONDS")]
    pub collective_timeout: Option<f64>,
}

/// The online loop's rounds (`online.*`).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Online objectives")]
pub struct TrainOnlineArgs {
    /// The prompts the policy answers each round (JSONL).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Rounds of sample → judge → train.
    #[arg(long)]
    pub rounds: Option<u64>,
    /// Samples per prompt and round.
    #[arg(long)]
    pub samples_per_prompt: Option<usize>,
    /// The judge of the samples (verifier:auto, rm:DIR, llm:MODEL, openai:URL).
    #[arg(long)]
    pub judge: Option<String>,
    /// The model name sent to an `openai:` judge.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// DNO: a teacher's answers (one `completion` per line, one per prompt) joining each pool.
    #[arg(long, value_name = "FILE")]
    pub teacher_outputs: Option<PathBuf>,
    /// DNO: a teacher model adding one greedy answer per prompt each round.
    #[arg(long)]
    pub teacher_model: Option<String>,
}

/// The teacher and data of distillation (`distill.*`).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "Distillation")]
pub struct TrainDistillArgs {
    /// The frozen teacher (default: `default`).
    #[arg(long)]
    pub teacher: Option<String>,
    /// Score the fixed training and eval sequences with the teacher once and cache its final
    /// hidden states in the run directory.
    #[arg(long)]
    pub teacher_logits_cache: bool,
    /// Where the sequences come from (dataset, teacher, student).
    #[arg(long)]
    pub distill_source: Option<String>,
    /// Cut the student from `--model` keeping this many evenly spaced layers.
    #[arg(long)]
    pub student_num_layers: Option<usize>,
}

/// LoRA adapters instead of full fine-tuning (`lora.*`).
#[derive(Debug, Args, Serialize)]
#[command(next_help_heading = "LoRA")]
pub struct TrainLoraArgs {
    /// Train LoRA adapters of this rank instead of every weight.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA scale numerator α (update scaled by α / r).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Dropout on the LoRA adapters' input.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// Modules that get adapters, comma-separated (default q_proj,v_proj).
    #[arg(long, value_delimiter = ',')]
    pub lora_targets: Option<Vec<String>>,
}

/// `candor export`. The global `--dtype` (f32, bf16, f16) is the dtype of the written weights.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// A checkpoint directory, a run directory (its newest checkpoint), or any `--model` value.
    #[arg(long)]
    pub checkpoint: String,
    /// Where to write the transformers directory.
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Largest weight file in MB before sharding (transformers' `max_shard_size`).
    #[arg(long, default_value_t = 5000)]
    pub max_shard_size_mb: usize,
    /// Fold a LoRA adapter into the base weights (without it, an adapter is exported in
    /// PEFT's format).
    #[arg(long)]
    pub merge_lora: bool,
}

/// `candor bench train`.
#[derive(Debug, Args)]
pub struct BenchTrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// `sft` or a pairwise objective such as `dpo` (reference forward included).
    #[arg(long, default_value = "dpo", value_parser = objective_names())]
    pub objective: String,
    /// Rows per step (pairs for pairwise objectives).
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens per sequence (half prompt, half completion).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Timed steps after one warm-up step (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Train LoRA adapters of this rank instead of every weight; the base is frozen and kept as
    /// `--base-quant` says (as stored when not given).
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// Modules that get adapters, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "q_proj,v_proj")]
    pub lora_targets: Vec<String>,
    /// A published model's shape with random weights instead of `--model` (see
    /// `configs/shapes/`: qwen2.5-0.5b, qwen2.5-1.5b, llama-3.2-1b, llama-3.2-3b, llama-3.1-8b).
    #[arg(long, value_name = "NAME")]
    pub shape: Option<String>,
    /// Recompute each decoder block in the backward instead of keeping its activations.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Which judge decides, and its options (`candor eval`, `candor eval winrate`).
#[derive(Debug, Clone, Args)]
pub struct JudgeArgs {
    /// `verifier:NAME` (auto, numeric, exact, regex, max_words, ...), `rm:MODEL`, `llm:MODEL` or
    /// `openai:BASE_URL`.
    #[arg(long)]
    pub judge: String,
    /// Reward-model judges: rewards closer than this are a tie.
    #[arg(long, default_value_t = 0.0)]
    pub tie_margin: f64,
    /// LLM judges: prompt template file (minijinja: `{{ prompt }}`, `{{ first }}`, `{{ second }}`).
    #[arg(long)]
    pub judge_template: Option<PathBuf>,
    /// `openai:` judges: the model name sent to the server.
    #[arg(long)]
    pub judge_model: Option<String>,
    /// `openai:` judges: requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub judge_concurrency: usize,
    /// `openai:` judges: reply cache directory (default: candor's cache, `judgments/`).
    #[arg(long)]
    pub judge_cache: Option<PathBuf>,
    /// `openai:` judges: seconds before one request times out.
    #[arg(long, default_value_t = 120.0)]
    pub judge_timeout: f64,
}

impl JudgeArgs {
    /// `--judge spec` with every other judge flag at its command-line default.
    pub fn with_defaults(spec: &str) -> Self {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            judge: JudgeArgs,
        }
        Only::try_parse_from(["candor".to_string(), format!("--judge={spec}")])
            .expect("the judge flags parse with their defaults")
            .judge
    }

    /// The judge options these flags give.
    pub fn options(&self) -> crate::judge::JudgeOptions {
        crate::judge::JudgeOptions {
            tie_margin: self.tie_margin,
            template: self.judge_template.clone(),
            judge_model: self.judge_model.clone(),
            cache_dir: self.judge_cache.clone(),
            concurrency: self.judge_concurrency,
            timeout: Some(std::time::Duration::from_secs_f64(self.judge_timeout)),
        }
    }
}

/// How evaluated models generate.
#[derive(Debug, Clone, Args)]
pub struct EvalGenerationArgs {
    /// Most new tokens per output.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Outputs per prompt and model (more than one needs `--temperature` > 0).
    #[arg(long, default_value_t = 1)]
    pub samples_per_prompt: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of sampling and of the bootstrap.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Prompts generated together.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

/// `candor eval`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct EvalArgs {
    /// `winrate`: against a baseline.
    #[command(subcommand)]
    pub command: Option<EvalCommand>,
    /// The model to score.
    #[arg(long, short = 'm', required = true)]
    pub model: Option<String>,
    /// JSONL rows with a `prompt` (and `answer` / `constraint` / `task` for verifiers).
    #[arg(long, required = true)]
    pub prompts: Option<PathBuf>,
    /// Judge the outputs in this file (`completion` per line, as `candor generate` writes)
    /// instead of generating.
    #[arg(long)]
    pub outputs: Option<PathBuf>,
    /// Write `scores.jsonl` and `summary.json` here.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub judge: Option<JudgeArgs>,
    #[command(flatten)]
    pub generation: EvalGenerationArgs,
}

/// `candor eval` subcommands.
#[derive(Debug, Subcommand)]
pub enum EvalCommand {
    /// Win-rate of `--model` against `--baseline` on `--prompts` under `--judge`.
    Winrate(WinrateArgs),
}

/// `candor eval winrate`.
#[derive(Debug, Args)]
pub struct WinrateArgs {
    /// The evaluated model.
    #[arg(long, short = 'm')]
    pub model: String,
    /// The model it is compared against.
    #[arg(long)]
    pub baseline: String,
    /// JSONL rows with a `prompt` (preference and prompt-completion rows work too).
    #[arg(long)]
    pub prompts: PathBuf,
    /// The model's outputs from a file instead of generating (`completion` per line).
    #[arg(long)]
    pub outputs: Option<PathBuf>,
    /// The baseline's outputs from a file instead of generating.
    #[arg(long)]
    pub baseline_outputs: Option<PathBuf>,
    /// Where `annotations.jsonl`, `summary.json` and `winrate.svg` go.
    #[arg(long, short = 'o', default_value = "eval-winrate")]
    pub output: PathBuf,
    #[command(flatten)]
    pub judge: JudgeArgs,
    #[command(flatten)]
    pub generation: EvalGenerationArgs,
}

/// `candor plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A run directory (with `metrics.jsonl`).
    pub run_dir: PathBuf,
    /// The image to write (SVG); default `RUN_DIR/curves.svg`.
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
}

/// `candor run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline recipe, e.g. `configs/quickstart.toml`.
    pub recipe: PathBuf,
    /// No progress bars.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Continue an interrupted pipeline: training resumes from the run's newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Run into a directory that already holds a run, clearing its checkpoints, metrics, final
    /// model and evaluation first (`train.run.overwrite`).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
    /// Set any key of the recipe, e.g. `--set train.run.max_steps=10` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_train_flag_has_one_key_in_the_table() {
        let command = TrainArgs::augment_args(clap::Command::new("train"));
        let options = ["config", "set", "resume", "print_config", "help_objective", "quiet"];
        let mut flags: Vec<&str> =
            command.get_arguments().map(|a| a.get_id().as_str()).filter(|id| !options.contains(id)).collect();
        let mut fields: Vec<&str> = TRAIN_FLAGS.iter().map(|(field, _)| *field).collect();
        flags.sort_unstable();
        fields.sort_unstable();
        assert_eq!(flags, fields);
        let mut keys: Vec<&str> = TRAIN_FLAGS.iter().map(|(_, key)| *key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), TRAIN_FLAGS.len(), "one flag per key");
    }

    #[test]
    fn hidden_flags_are_objective_settings_that_help_objective_lists() {
        let command = TrainArgs::augment_args(clap::Command::new("train"));
        for arg in command.get_arguments().filter(|a| a.is_hide_set()) {
            let (_, key) = TRAIN_FLAGS.iter().find(|(field, _)| *field == arg.get_id().as_str()).unwrap();
            let setting = key.strip_prefix("objective.").unwrap();
            let listed = candor_alignment::Objective::NAMES.iter().any(|(name, _)| {
                let defaults = serde_json::to_value(candor_alignment::Objective::default_for(name).unwrap()).unwrap();
                defaults.get(setting).is_some()
            });
            assert!(listed, "--{} is hidden but no objective has `{key}`", arg.get_id());
        }
    }

    #[test]
    fn objective_names_come_from_the_registry() {
        let err = Cli::try_parse_from(["candor", "train", "--objective", "dpoo"]).unwrap_err().to_string();
        assert!(err.contains("dpoo") && err.contains("rdpo") && err.contains("dac_kl"), "{err}");
        let cli = Cli::try_parse_from(["candor", "train", "--objective", "dac_kl"]).unwrap();
        let Command::Train(args) = cli.command else { panic!("not train") };
        assert_eq!(args.objective.objective.as_deref(), Some("dac_kl"));
    }
}

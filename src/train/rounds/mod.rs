//! What each online method makes of a round's judged samples, one file per method behind
//! [`RoundBuilder`]: best-vs-worst pairs against the previous iterate ([`pairs`]), verifier-
//! labelled rollouts ([`nft`], [`kdrl`], [`grpo`], sharing [`rollouts`]) and critiqued PPO rollouts
//! ([`text2grad`]). The online loop samples and judges; a builder turns the pools into records
//! (written to `rounds/round-N.json`), rebuilds the training items from them and adds its
//! fields to the round's line of `rounds.jsonl`.

mod grpo;
mod kdrl;
mod nft;
mod pairs;
mod rollouts;
mod text2grad;

use anyhow::{bail, Context, Result};
use candle::Tensor;
use candor_alignment::Objective;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};

use super::config::TrainConfig;
use super::items::Item;
use super::trainer::Trainer;
use crate::data::{collate, Batch, TokenizedSequence};
use crate::eval::winrate::EvalPrompt;
use crate::load::LoadOptions;
use crate::model::CausalLm;

/// One answer in a round's pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Generated token ids (with the stop token, if one ended it).
    pub tokens: Vec<u32>,
    /// The answer's text, as the judge saw it.
    pub text: String,
    /// The judge's score: the verifier's 1/0, the reward model's reward, or a pairwise
    /// judge's average win-rate against the prompt's other answers.
    pub score: f64,
    /// A weighted sum of judges: each judge's own score (in `online.judge`'s order).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<f64>,
    /// Written by a teacher (`online.teacher_outputs` / `teacher_model`), not sampled.
    #[serde(default)]
    pub teacher: bool,
}

/// Everything a round trains on, as written to `rounds/round-N.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoundData {
    /// The round's index, from 0.
    pub round: u64,
    /// The optimizer step the round started at.
    pub start_step: u64,
    /// Optimizer steps the round takes.
    pub steps: u64,
    /// Indices (into the prompts file) of the round's prompts.
    pub prompts: Vec<usize>,
    /// Whether scores are pointwise (comparable across rounds without asking the judge again).
    pub pointwise: bool,
    /// `samples[i]`: the pool of the round's i-th prompt.
    pub samples: Vec<Vec<Sample>>,
    /// The builder's records, by name (`pairs`, `rollouts`, `ppo`, ...).
    #[serde(flatten)]
    pub records: Map<String, Value>,
    /// The round's line of `rounds.jsonl`.
    pub summary: Map<String, Value>,
}

impl RoundData {
    /// The builder's record `key`, read back (absent or null: the type's default).
    pub fn record<T: DeserializeOwned + Default>(&self, key: &str) -> Result<T> {
        match self.records.get(key) {
            None | Some(Value::Null) => Ok(T::default()),
            Some(v) => serde_json::from_value(v.clone())
                .with_context(|| format!("round {}: invalid `{key}` in the round data", self.round + 1)),
        }
    }

    /// Prompt + sample `j` of the round's i-th prompt, the sample being the completion.
    pub fn sequence(&self, prompt_ids: &[Vec<u32>], i: usize, j: usize) -> TokenizedSequence {
        TokenizedSequence::prompt_and_answer(&prompt_ids[self.prompts[i]], &self.samples[i][j].tokens)
    }
}

/// What a builder sees of a round: the trainer (models, configuration), the policy's frozen
/// view the samples came from, the round's prompts and the previous round.
pub struct RoundContext<'a> {
    /// The run's trainer.
    pub trainer: &'a Trainer<'a>,
    /// The policy as it stands at the round's start, without a graph (π_t / π_old).
    pub frozen: &'a CausalLm,
    /// Every prompt of the prompts file.
    pub prompts: &'a [EvalPrompt],
    /// The round's prompts (indices into `prompts`).
    pub chosen: &'a [usize],
    /// The round's prompt ids, in `chosen` order.
    pub ids: &'a [Vec<u32>],
    /// The previous round, if any.
    pub previous: Option<&'a RoundData>,
}

impl RoundContext<'_> {
    /// Prompt + sample `j` of the round's i-th prompt.
    pub fn sequence(&self, pools: &[Vec<Sample>], i: usize, j: usize) -> TokenizedSequence {
        TokenizedSequence::prompt_and_answer(&self.ids[i], &pools[i][j].tokens)
    }
}

/// One online method's part of a round.
pub trait RoundBuilder {
    /// Training items a round makes at most from one prompt's `samples` answers (the learning
    /// rate schedule's horizon).
    fn items_per_prompt(&self, samples: usize) -> usize;

    /// The round's records from the judged pools (scored under the frozen policy and whatever
    /// else the method needs); `say` reports a phase.
    fn build(
        &self,
        ctx: &RoundContext,
        pools: &[Vec<Sample>],
        say: &mut dyn FnMut(String),
    ) -> Result<Map<String, Value>>;

    /// The round's training items, rebuilt from its records.
    fn items(&self, data: &RoundData, prompt_ids: &[Vec<u32>]) -> Result<Vec<Item>>;

    /// The method's fields of the round's `rounds.jsonl` line.
    fn summarize(&self, data: &RoundData, line: &mut Map<String, Value>) -> Result<()>;
}

/// The round builder of an online objective; a Text2Grad critic is loaded with `load`.
pub fn builder_for(cfg: &TrainConfig, load: &LoadOptions) -> Result<Box<dyn RoundBuilder>> {
    let online = cfg.online.as_ref().context("online objectives need `[online]`")?;
    Ok(match &cfg.objective {
        Objective::Inpo(_) | Objective::Dno(_) => Box::new(pairs::PairRounds { min_margin: online.min_margin }),
        Objective::Nft(_) => Box::new(nft::NftRounds),
        Objective::Kdrl(k) => Box::new(kdrl::KdrlRounds { config: k.clone() }),
        Objective::Grpo(g) => Box::new(grpo::GrpoRounds {
            config: g.clone(),
            max_tokens: online.max_new_tokens,
            judges: crate::judge::weighted::terms(&online.judge)?,
        }),
        Objective::Text2grad(t) => Box::new(text2grad::Text2GradRounds::load(t, online.judge_model.as_deref(), load)?),
        other => bail!("objective `{}` is not an online objective", other.name()),
    })
}

/// Records as one named field of a round's data.
fn record(key: &str, value: impl Serialize) -> Result<(String, Value)> {
    Ok((key.to_string(), serde_json::to_value(value)?))
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

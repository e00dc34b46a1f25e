//! Text2Grad: every sample critiqued in natural language, the critique's span scores spread
//! over the answer's tokens, and PPO's rollout records (π_old's log-probs, the value head's
//! values, the KL to the reference) turned into advantages and returns, with TRL's adaptive KL
//! coefficient carried from round to round.

use anyhow::{Context, Result};
use candle::Tensor;
use candor_alignment::objectives::text2grad::{rollout_advantages, KlPenalty, RolloutRecords, Text2GradConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{per_token, record, RoundBuilder, RoundContext, RoundData, Sample};
use crate::data::{Batch, TokenizedSequence};
use crate::judge::critic::{decoded_tokens, token_scores, Critic};
use crate::load::LoadOptions;
use crate::model::CausalLm;
use crate::scoring::{completion_token_kl, completion_token_logps, completion_token_logps_and_hidden};
use crate::train::heads::{values_of, VALUE_HEAD};
use crate::train::items::{Item, PpoItem};

/// A critiqued sample: per answer token, the rollout's records and the advantages.
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

/// Text2Grad's rounds, with the critic that reads the samples.
pub struct Text2GradRounds {
    config: Text2GradConfig,
    critic: Box<dyn Critic>,
}

impl Text2GradRounds {
    /// Load the objective's critic (`objective.critic`) with `load`.
    pub fn load(config: &Text2GradConfig, judge_model: Option<&str>, load: &LoadOptions) -> Result<Self> {
        let critic = crate::judge::critic::from_spec(&config.critic, judge_model, load)?;
        Ok(Self { config: config.clone(), critic })
    }

    /// The round's per-token log-probs, values and KL to the reference under the frozen policy.
    fn rollout_records(&self, ctx: &RoundContext, seqs: &[TokenizedSequence]) -> Result<Vec<[Vec<f32>; 3]>> {
        let (frozen, trainer) = (ctx.frozen, ctx.trainer);
        let reference = trainer.reference.as_ref().context("text2grad needs the reference model")?;
        let models = trainer.models();
        let [w, b] = VALUE_HEAD.map(|n| models.head(n).map(Tensor::detach));
        let (w, b) = (w.context("value head")?, b.context("value head")?);
        per_token(seqs, trainer.cfg.run.batch_size, trainer.pad, frozen.device(), |batch| {
            let (logps, hidden) = completion_token_logps_and_hidden(frozen, batch)?;
            let values = values_of(&hidden, &w, &b)?;
            let kl = self.token_kl(frozen, reference, &logps, &hidden, batch)?;
            Ok([logps, values, kl])
        })
    }

    /// The per-token KL penalty's estimate of `kl_penalty`.
    fn token_kl(
        &self,
        frozen: &CausalLm,
        reference: &CausalLm,
        logps: &Tensor,
        hidden: &Tensor,
        batch: &Batch,
    ) -> Result<Tensor> {
        if self.config.kl_penalty == KlPenalty::Full {
            return Ok(completion_token_kl(frozen, hidden, reference, batch)?);
        }
        let diff = (logps - completion_token_logps(reference, batch)?)?;
        Ok(match self.config.kl_penalty {
            KlPenalty::Kl => diff,
            KlPenalty::Abs => diff.abs()?,
            _ => (diff.sqr()? * 0.5)?,
        })
    }
}

impl RoundBuilder for Text2GradRounds {
    fn items_per_prompt(&self, samples: usize) -> usize {
        samples
    }

    fn build(
        &self,
        ctx: &RoundContext,
        pools: &[Vec<Sample>],
        say: &mut dyn FnMut(String),
    ) -> Result<Map<String, Value>> {
        say(format!("critiquing with {}", self.critic.name()));
        let cases: Vec<(usize, usize)> =
            pools.iter().enumerate().flat_map(|(i, pool)| (0..pool.len()).map(move |j| (i, j))).collect();
        let asked: Vec<(&crate::data::Text, &Map<String, Value>, &str)> = cases
            .iter()
            .map(|&(i, j)| {
                let prompt = &ctx.prompts[ctx.chosen[i]];
                (&prompt.prompt, &prompt.row, pools[i][j].text.as_str())
            })
            .collect();
        let critiques = self.critic.critique(&asked)?;
        let seqs: Vec<TokenizedSequence> = cases.iter().map(|&(i, j)| ctx.sequence(pools, i, j)).collect();
        let tokenizer = &ctx.trainer.policy.tokenizer;
        let mut ppo = Vec::with_capacity(cases.len());
        let mut values = Vec::with_capacity(cases.len());
        for ((&(i, j), [old_logps, old_values, kl]), critique) in
            cases.iter().zip(self.rollout_records(ctx, &seqs)?).zip(&critiques)
        {
            let words = critique.as_ref().map(|c| c.word_scores.clone()).unwrap_or_default();
            let span_scores = token_scores(&decoded_tokens(tokenizer, &pools[i][j].tokens)?, &words);
            values.push(old_values.iter().map(|&v| v as f64).collect::<Vec<f64>>());
            let kl = kl.iter().map(|&x| x as f64).collect();
            let (advantages, returns, critiqued) = (Vec::new(), Vec::new(), critique.is_some());
            ppo.push(RoundPpo {
                prompt: i,
                sample: j,
                old_logps,
                old_values,
                advantages,
                returns,
                span_scores,
                kl,
                critiqued,
            });
        }
        let records: Vec<RolloutRecords> = ppo
            .iter()
            .zip(&values)
            .map(|(p, values)| RolloutRecords { span_scores: &p.span_scores, kl: &p.kl, values })
            .collect();
        let start_coef = match ctx.previous {
            Some(previous) => previous.record::<Option<f64>>("next_kl_coef")?,
            None => None,
        };
        let done = rollout_advantages(&records, start_coef.unwrap_or(self.config.init_kl_coef), &self.config);
        for (p, (advantages, returns)) in ppo.iter_mut().zip(done.answers) {
            (p.advantages, p.returns) = (advantages, returns);
        }
        Ok(Map::from_iter([
            record("ppo", ppo)?,
            // The coefficient the round's first rollout batch used, and the next round's start.
            record("kl_coef", done.kl_coefs.first().copied())?,
            record("next_kl_coef", Some(done.next_kl_coef))?,
        ]))
    }

    fn items(&self, data: &RoundData, prompt_ids: &[Vec<u32>]) -> Result<Vec<Item>> {
        let ppo: Vec<RoundPpo> = data.record("ppo")?;
        let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        Ok(ppo
            .into_iter()
            .map(|p| {
                Item::Ppo(PpoItem {
                    sequence: data.sequence(prompt_ids, p.prompt, p.sample),
                    advantages: f32s(&p.advantages),
                    returns: f32s(&p.returns),
                    old_logps: p.old_logps,
                    old_values: p.old_values,
                })
            })
            .collect())
    }

    fn summarize(&self, data: &RoundData, line: &mut Map<String, Value>) -> Result<()> {
        let ppo: Vec<RoundPpo> = data.record("ppo")?;
        if ppo.is_empty() {
            return Ok(());
        }
        let spans = || ppo.iter().flat_map(|p| &p.span_scores);
        let tokens = spans().count().max(1) as f64;
        let answers = ppo.len() as f64;
        line.insert("mean_span_score".into(), (spans().sum::<f64>() / tokens).into());
        line.insert("scored_token_fraction".into(), (spans().filter(|&&s| s != 0.0).count() as f64 / tokens).into());
        line.insert("critiqued".into(), (ppo.iter().filter(|p| p.critiqued).count() as f64 / answers).into());
        line.insert("kl".into(), (ppo.iter().map(|p| p.kl.iter().sum::<f64>()).sum::<f64>() / answers).into());
        line.insert("kl_coef".into(), data.record::<Option<f64>>("kl_coef")?.into());
        Ok(())
    }
}

//! Micro-batch → objective inputs: the forward passes an objective's data need asks for
//! (policy log-probs with gradient, the frozen reference's without, reward-head scores, SPO's
//! pooled variant states), gathered into `candor-alignment`'s input types.

use anyhow::{Context, Result};
use candle::{Device, Tensor};
use candor_alignment::objectives::dac_kl::CLIP_NET;
use candor_alignment::objectives::hindsight::ClassLogps;
use candor_alignment::objectives::inpo::PreviousIterate;
use candor_alignment::objectives::kd::DistillTokens;
use candor_alignment::objectives::kdrl::KdrlTokens;
use candor_alignment::objectives::nft::NftTokens;
use candor_alignment::objectives::spo::DegreeBatch;
use candor_alignment::objectives::text2grad::PpoTokens;
use candor_alignment::{DataNeed, ObjectiveInput, PairLogps, PairScores, SequenceLogps};

use super::items::{DistillItem, Item, PairItem, PpoItem, RolloutItem};
use crate::data::{collate, collate_packed, Batch, TokenizedSequence};
use crate::model::CausalLm;
use crate::scoring::{
    chunked_vocab_logps, completion_logps, completion_logps_by_class, completion_states, completion_token_logps,
    completion_token_logps_and_hidden,
};

/// The models (and extra trainable tensors) of one step.
#[derive(Clone, Copy)]
pub struct StepModels<'a> {
    /// The policy being trained.
    pub policy: &'a CausalLm,
    /// The frozen reference, when the objective needs one and it is not precomputed.
    pub reference: Option<&'a CausalLm>,
    /// The frozen teacher of distillation objectives.
    pub teacher: Option<&'a CausalLm>,
    /// Tensors trained beside the policy, by name (SPO's degree heads, PPO's value head,
    /// DAC-KL's clipping network).
    pub heads: &'a [(String, candle::Var)],
    /// The padding id.
    pub pad: u32,
    /// How far training has gone, `step / total` (KDRL's β schedule).
    pub progress: f64,
}

impl<'a> StepModels<'a> {
    /// The same models with the policy replaced (a frozen view for evaluation).
    pub fn with_policy<'b>(&self, policy: &'b CausalLm) -> StepModels<'b>
    where
        Self: 'b,
    {
        StepModels { policy, ..*self }
    }

    /// The extra head `name`, if the objective trains one.
    pub fn head(&self, name: &str) -> Option<&'a Tensor> {
        self.heads.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_tensor())
    }
}

/// A micro-batch's items as the one kind its dataset holds (`pick` unwraps that kind).
fn of_kind<'a, T>(items: &[&'a Item], pick: impl Fn(&'a Item) -> Option<&'a T>) -> Vec<&'a T> {
    items.iter().map(|&i| pick(i).expect("one kind per dataset")).collect()
}

fn pairs<'a>(items: &[&'a Item]) -> Vec<&'a PairItem> {
    of_kind(items, |i| if let Item::Pair(x) = i { Some(x) } else { None })
}

/// TRL's pair layout: chosen rows first, then rejected rows, in one batch.
fn pair_batch(items: &[&Item], pad: u32, device: &Device) -> Result<Batch> {
    let (chosen, rejected): (Vec<&TokenizedSequence>, Vec<&TokenizedSequence>) =
        pairs(items).into_iter().map(|p| (&p.chosen, &p.rejected)).unzip();
    Ok(collate(&[chosen, rejected].concat(), pad, device)?)
}

/// Summed completion log-probs of a micro-batch: `[B]` sequences (or packed rows), or
/// `([B], [B])` for pairs.
pub fn forward_logps(model: &CausalLm, items: &[&Item], pad: u32) -> Result<Vec<Tensor>> {
    let device = model.device();
    let batch = match items[0] {
        Item::Packed(_) => {
            let rows: Vec<Vec<&TokenizedSequence>> = items
                .iter()
                .map(|i| match i {
                    Item::Packed(seqs) => seqs.iter().collect(),
                    _ => unreachable!("one kind per dataset"),
                })
                .collect();
            collate_packed(&rows, pad, device)?
        }
        Item::Sequence(_) => collate(&sequences(items), pad, device)?,
        Item::Pair(_) => pair_batch(items, pad, device)?,
        Item::Rollout(_) => collate(&rollouts(items).iter().map(|r| &r.sequence).collect::<Vec<_>>(), pad, device)?,
        Item::Ppo(_) => collate(&ppo_items(items).iter().map(|p| &p.sequence).collect::<Vec<_>>(), pad, device)?,
        Item::Distill(_) => {
            collate(&distill_items(items).iter().map(|d| &d.sequence).collect::<Vec<_>>(), pad, device)?
        }
    };
    let sums = completion_logps(model, &batch)?;
    Ok(match items[0] {
        Item::Pair(_) => {
            let b = items.len();
            vec![sums.narrow(0, 0, b)?, sums.narrow(0, b, b)?]
        }
        _ => vec![sums],
    })
}

/// Summed (chosen, rejected) completion log-probs of every pair under `model`, without
/// gradient, `batch_size` pairs at a time.
pub fn summed_pair_logps(model: &CausalLm, items: &[Item], batch_size: usize, pad: u32) -> Result<Vec<(f32, f32)>> {
    let frozen = model.frozen_view();
    let mut values = Vec::with_capacity(items.len());
    for chunk in items.chunks(batch_size.max(1)) {
        let refs: Vec<&Item> = chunk.iter().collect();
        let logps = forward_logps(&frozen, &refs, pad)?;
        let (c, r): (Vec<f32>, Vec<f32>) = (logps[0].to_vec1()?, logps[1].to_vec1()?);
        values.extend(c.into_iter().zip(r));
    }
    Ok(values)
}

fn rollouts<'a>(items: &[&'a Item]) -> Vec<&'a RolloutItem> {
    of_kind(items, |i| if let Item::Rollout(x) = i { Some(x) } else { None })
}

/// A micro-batch of samples, token by token: the policy's log-prob of each answer token (with
/// gradient), π_old's recorded one, and per-answer values repeated over the answer's tokens.
struct SampledTokens<'a> {
    samples: Vec<&'a RolloutItem>,
    policy: Tensor,
    old: Tensor,
}

impl<'a> SampledTokens<'a> {
    fn of(policy: &CausalLm, items: &[&'a Item], pad: u32) -> Result<Self> {
        let device = policy.device();
        let samples = rollouts(items);
        let batch = collate(&samples.iter().map(|r| &r.sequence).collect::<Vec<_>>(), pad, device)?;
        let policy_logps = completion_token_logps(policy, &batch)?;
        let old: Vec<f32> = samples.iter().flat_map(|r| r.old_logps.iter().copied()).collect();
        if old.len() != policy_logps.dim(0)? {
            anyhow::bail!("{} sampling log-probs for {} answer tokens", old.len(), policy_logps.dim(0)?);
        }
        Ok(Self { old: Tensor::new(old, device)?, policy: policy_logps, samples })
    }

    /// `f` of each answer, repeated over its tokens `[T]`.
    fn repeated(&self, f: impl Fn(&RolloutItem) -> f32) -> Result<Tensor> {
        let values: Vec<f32> = self.samples.iter().flat_map(|r| std::iter::repeat_n(f(r), r.old_logps.len())).collect();
        Ok(Tensor::new(values, self.policy.device())?)
    }
}

/// NFT's per-token inputs of a micro-batch of samples.
fn rollout_tokens(policy: &CausalLm, items: &[&Item], pad: u32) -> Result<NftTokens> {
    let t = SampledTokens::of(policy, items, pad)?;
    Ok(NftTokens {
        accuracy: t.repeated(|r| r.accuracy)?,
        correct: t.repeated(|r| f32::from(u8::from(r.correct)))?,
        policy: t.policy,
        old: t.old,
    })
}

fn ppo_items<'a>(items: &[&'a Item]) -> Vec<&'a PpoItem> {
    of_kind(items, |i| if let Item::Ppo(x) = i { Some(x) } else { None })
}

/// PPO's per-token inputs of a micro-batch: log-probs and values with gradient (one forward),
/// and the rollout's records.
fn ppo_tokens(models: StepModels, items: &[&Item]) -> Result<PpoTokens> {
    let policy = models.policy;
    let device = policy.device();
    let ps = ppo_items(items);
    let batch = collate(&ps.iter().map(|p| &p.sequence).collect::<Vec<_>>(), models.pad, device)?;
    let (logps, hidden) = completion_token_logps_and_hidden(policy, &batch)?;
    let [w, b] = super::heads::VALUE_HEAD.map(|n| models.head(n));
    let (Some(w), Some(b)) = (w, b) else { anyhow::bail!("PPO needs the value head") };
    let flat = |f: &dyn Fn(&PpoItem) -> &Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::new(ps.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<f32>>(), device)?)
    };
    Ok(PpoTokens {
        values: super::heads::values_of(&hidden, w, b)?,
        policy: logps,
        old_logps: flat(&|p| &p.old_logps)?,
        old_values: flat(&|p| &p.old_values)?,
        advantages: flat(&|p| &p.advantages)?,
        returns: flat(&|p| &p.returns)?,
        token_weights: Tensor::new(
            ps.iter()
                .flat_map(|p| vec![1.0 / p.old_logps.len().max(1) as f32; p.old_logps.len()])
                .collect::<Vec<f32>>(),
            device,
        )?,
    })
}

fn distill_items<'a>(items: &[&'a Item]) -> Vec<&'a DistillItem> {
    of_kind(items, |i| if let Item::Distill(x) = i { Some(x) } else { None })
}

/// Positions the teacher's head scores at once: one chunk of full-vocabulary logits beside the
/// micro-batch's log-prob buffer.
const TEACHER_CHUNK: usize = 256;

/// The distillation inputs of a micro-batch: the student's logits at every completion position
/// (with gradient) and the teacher's log-probs there (chunked, from its cached states when
/// the items carry them).
fn distill_tokens(models: StepModels, items: &[&Item]) -> Result<DistillTokens> {
    let StepModels { policy, pad, .. } = models;
    let teacher = models.teacher.context("distillation needs the teacher model")?;
    let device = policy.device();
    let ds = distill_items(items);
    let batch = collate(&ds.iter().map(|d| &d.sequence).collect::<Vec<_>>(), pad, device)?;
    let student = completion_states(policy, &batch)?;
    let teacher_states = match ds.iter().map(|d| d.teacher_states.clone()).collect::<Option<Vec<Tensor>>>() {
        Some(cached) => Tensor::cat(&cached, 0)?,
        None => completion_states(teacher, &batch)?.hidden,
    };
    if teacher_states.dim(0)? != student.targets.len() {
        anyhow::bail!(
            "the teacher's cached states cover {} positions, the batch has {}",
            teacher_states.dim(0)?,
            student.targets.len()
        );
    }
    let clip_net = models
        .head(CLIP_NET[0])
        .map(|_| CLIP_NET.map(|n| models.head(n).expect("the clipping network is whole").clone()));
    Ok(DistillTokens {
        student_logits: policy.lm_logits(&student.hidden)?,
        teacher_logps: chunked_vocab_logps(teacher, &teacher_states, TEACHER_CHUNK)?,
        targets: Tensor::new(student.targets, device)?,
        rows: Tensor::new(student.rows, device)?,
        clip_net,
    })
}

/// KDRL's per-token inputs of a micro-batch of samples.
fn kdrl_tokens(models: StepModels, items: &[&Item]) -> Result<KdrlTokens> {
    let t = SampledTokens::of(models.policy, items, models.pad)?;
    let teacher: Vec<f32> = t.samples.iter().flat_map(|r| r.teacher_logps.iter().copied()).collect();
    if teacher.len() != t.policy.dim(0)? {
        anyhow::bail!("{} teacher log-probs for {} answer tokens", teacher.len(), t.policy.dim(0)?);
    }
    Ok(KdrlTokens {
        teacher: Tensor::new(teacher, t.policy.device())?,
        advantages: t.repeated(|r| r.advantage)?,
        kd_mask: t.repeated(|r| f32::from(u8::from(r.kd)))?,
        progress: models.progress,
        policy: t.policy,
        old: t.old,
    })
}

fn sequences<'a>(items: &[&'a Item]) -> Vec<&'a TokenizedSequence> {
    of_kind(items, |i| if let Item::Sequence(x) = i { Some(x) } else { None })
}

/// Objective inputs of a micro-batch for the objective's data need.
pub fn objective_input(models: StepModels, need: DataNeed, items: &[&Item]) -> Result<ObjectiveInput> {
    let StepModels { policy, pad, .. } = models;
    let device = policy.device();
    let f32s = |v: Vec<f32>| Tensor::new(v, device);
    if need == DataNeed::Hindsight {
        let seqs = sequences(items);
        let by_class = completion_logps_by_class(policy, &collate(&seqs, pad, device)?, 2)?;
        let tokens: Vec<f32> = seqs
            .iter()
            .flat_map(|s| [1u8, 2].map(|c| s.completion_mask.iter().skip(1).filter(|&&m| m == c).count() as f32))
            .collect();
        return Ok(ObjectiveInput::Sequences(SequenceLogps {
            policy: by_class.sum(1)?,
            tokens: f32s(items.iter().map(|i| i.loss_tokens() as f32).collect())?,
            classes: Some(ClassLogps { sums: by_class, tokens: Tensor::from_vec(tokens, (items.len(), 2), device)? }),
        }));
    }
    if need == DataNeed::Rollouts {
        return Ok(ObjectiveInput::Tokens(rollout_tokens(policy, items, pad)?));
    }
    if need == DataNeed::TokenRewards {
        return Ok(ObjectiveInput::Ppo(ppo_tokens(models, items)?));
    }
    if need == DataNeed::Distill {
        return Ok(ObjectiveInput::Distill(distill_tokens(models, items)?));
    }
    if need == DataNeed::TeacherRollouts {
        return Ok(ObjectiveInput::Kdrl(kdrl_tokens(models, items)?));
    }
    if let Item::Sequence(_) | Item::Packed(_) = items[0] {
        let policy_logps = forward_logps(policy, items, pad)?.remove(0);
        return Ok(ObjectiveInput::Sequences(SequenceLogps {
            policy: policy_logps,
            tokens: f32s(items.iter().map(|i| i.loss_tokens() as f32).collect())?,
            classes: None,
        }));
    }
    let ps = pairs(items);
    if need == DataNeed::ScoredPairs {
        let batch = pair_batch(items, pad, device)?;
        let scores = policy.sequence_scores(&batch.input_ids, Some(&batch.attention_mask))?.squeeze(1)?;
        let b = items.len();
        let margins = ps
            .iter()
            .any(|p| p.margin.is_some())
            .then(|| f32s(ps.iter().map(|p| p.margin.unwrap_or(0.0)).collect()))
            .transpose()?;
        return Ok(ObjectiveInput::Scores(PairScores {
            chosen: scores.narrow(0, 0, b)?,
            rejected: scores.narrow(0, b, b)?,
            margins,
        }));
    }
    let pi = forward_logps(policy, items, pad)?;
    // Per-pair (chosen, rejected) values every pair of the batch has, as two `[B]` tensors.
    let both = |get: &dyn Fn(&PairItem) -> Option<(f32, f32)>| -> Result<Option<(Tensor, Tensor)>> {
        match ps.iter().map(|p| get(p)).collect::<Option<Vec<_>>>() {
            Some(v) => {
                let (c, r): (Vec<f32>, Vec<f32>) = v.into_iter().unzip();
                Ok(Some((f32s(c)?, f32s(r)?)))
            }
            None => Ok(None),
        }
    };
    let (reference_chosen, reference_rejected) = match (both(&|p| p.reference)?, models.reference) {
        (Some(cached), _) => cached,
        (None, Some(r)) => {
            let logps = forward_logps(r, items, pad)?;
            (logps[0].detach(), logps[1].detach())
        }
        (None, None) => (pi[0].zeros_like()?, pi[1].zeros_like()?),
    };
    let rewards = both(&|p| p.rewards)?;
    Ok(ObjectiveInput::Pairs(PairLogps {
        policy_chosen: pi[0].clone(),
        policy_rejected: pi[1].clone(),
        reference_chosen,
        reference_rejected,
        chosen_tokens: f32s(ps.iter().map(|p| p.chosen.completion_tokens() as f32).collect())?,
        rejected_tokens: f32s(ps.iter().map(|p| p.rejected.completion_tokens() as f32).collect())?,
        rewards,
        degrees: models.head(super::heads::DEGREE_HEADS).map(|w| degree_batch(policy, &ps, w, pad)).transpose()?,
        previous: both(&|p| p.previous)?.map(|(chosen, rejected)| PreviousIterate { chosen, rejected }),
    }))
}

/// SPO's variants of the micro-batch, encoded by the policy and pooled at each one's last token.
fn degree_batch(policy: &CausalLm, ps: &[&PairItem], weights: &Tensor, pad: u32) -> Result<DegreeBatch> {
    let device = policy.device();
    let variants: Vec<&(TokenizedSequence, u32, u32)> = ps.iter().flat_map(|p| &p.variants).collect();
    let seqs: Vec<&TokenizedSequence> = variants.iter().map(|v| &v.0).collect();
    let batch = collate(&seqs, pad, device)?;
    let last: Vec<u32> = seqs.iter().map(|s| s.ids.len() as u32 - 1).collect();
    let features = policy.pooled_hidden(&batch.input_ids, Some(&batch.attention_mask), &last)?;
    Ok(DegreeBatch {
        features,
        labels: Tensor::new(variants.iter().map(|v| v.1).collect::<Vec<u32>>(), device)?,
        heads: Tensor::new(variants.iter().map(|v| v.2).collect::<Vec<u32>>(), device)?,
        weights: weights.clone(),
    })
}

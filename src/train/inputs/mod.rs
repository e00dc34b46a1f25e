//! Micro-batch → objective inputs: the forward passes an objective's data need asks for
//! (policy log-probs with gradient, the frozen reference's without, reward-head scores, SPO's
//! pooled variant states), gathered into `candor-alignment`'s input types; one file per data
//! family.

mod distill;
mod labelled;
mod pairs;
mod ppo;
mod rollouts;
mod sequences;

use anyhow::Result;
use candle::Tensor;
use candor_alignment::{DataNeed, ObjectiveInput};

use super::items::Item;
use crate::data::{collate, collate_packed, TokenizedSequence};
use crate::model::CausalLm;
use crate::scoring::completion_logps;

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

/// Objective inputs of a micro-batch for the objective's data need.
pub fn objective_input(models: StepModels, need: DataNeed, items: &[&Item]) -> Result<ObjectiveInput> {
    Ok(match need {
        DataNeed::Sequences => ObjectiveInput::Sequences(sequences::sequence_logps(models, items)?),
        DataNeed::Hindsight => ObjectiveInput::Sequences(sequences::class_logps(models, items)?),
        DataNeed::Pairs => ObjectiveInput::Pairs(pairs::pair_logps(models, items)?),
        DataNeed::ScoredPairs => ObjectiveInput::Scores(pairs::pair_scores(models, items)?),
        DataNeed::Unpaired => ObjectiveInput::Unpaired(labelled::unpaired_logps(models, items)?),
        DataNeed::Rollouts => ObjectiveInput::Tokens(rollouts::labelled_tokens(models, items)?),
        DataNeed::TeacherRollouts => ObjectiveInput::Kdrl(rollouts::teacher_tokens(models, items)?),
        DataNeed::GroupRollouts => ObjectiveInput::Grpo(rollouts::group_tokens(models, items)?),
        DataNeed::TokenRewards => ObjectiveInput::Ppo(ppo::ppo_tokens(models, items)?),
        DataNeed::Distill => ObjectiveInput::Distill(distill::distill_tokens(models, items)?),
    })
}

/// A micro-batch's items as the one kind its dataset holds (`pick` unwraps that kind).
pub(super) fn of_kind<'a, T>(items: &[&'a Item], pick: impl Fn(&'a Item) -> Option<&'a T>) -> Vec<&'a T> {
    items.iter().map(|&i| pick(i).expect("one kind per dataset")).collect()
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
        Item::Sequence(_) => collate(&sequences::sequences(items), pad, device)?,
        Item::Pair(_) => pairs::pair_batch(items, pad, device)?,
        Item::Labelled(_) => {
            collate(&labelled::labelled(items).iter().map(|l| &l.sequence).collect::<Vec<_>>(), pad, device)?
        }
        Item::Rollout(_) => {
            collate(&rollouts::samples(items).iter().map(|r| &r.sequence).collect::<Vec<_>>(), pad, device)?
        }
        Item::Ppo(_) => collate(&ppo::ppo_items(items).iter().map(|p| &p.sequence).collect::<Vec<_>>(), pad, device)?,
        Item::Distill(_) => {
            collate(&distill::distill_items(items).iter().map(|d| &d.sequence).collect::<Vec<_>>(), pad, device)?
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

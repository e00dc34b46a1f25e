//! PPO rollouts (Text2Grad): per-token log-probs and values with gradient, and the rollout's
//! records.

use anyhow::Result;
use candle::Tensor;
use candor_alignment::objectives::text2grad::PpoTokens;

use super::{of_kind, StepModels};
use crate::data::collate;
use crate::scoring::completion_token_logps_and_hidden;
use crate::train::heads::{values_of, VALUE_HEAD};
use crate::train::items::{Item, PpoItem};

/// The micro-batch's PPO rollouts.
pub(super) fn ppo_items<'a>(items: &[&'a Item]) -> Vec<&'a PpoItem> {
    of_kind(items, |i| if let Item::Ppo(x) = i { Some(x) } else { None })
}

/// PPO's per-token inputs of a micro-batch: log-probs and values with gradient (one forward),
/// and the rollout's records.
pub(super) fn ppo_tokens(models: StepModels, items: &[&Item]) -> Result<PpoTokens> {
    let policy = models.policy;
    let device = policy.device();
    let ps = ppo_items(items);
    let batch = collate(&ps.iter().map(|p| &p.sequence).collect::<Vec<_>>(), models.pad, device)?;
    let (logps, hidden) = completion_token_logps_and_hidden(policy, &batch)?;
    let [w, b] = VALUE_HEAD.map(|n| models.head(n));
    let (Some(w), Some(b)) = (w, b) else { anyhow::bail!("PPO needs the value head") };
    let flat = |f: &dyn Fn(&PpoItem) -> &Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::new(ps.iter().flat_map(|p| f(p).iter().copied()).collect::<Vec<f32>>(), device)?)
    };
    Ok(PpoTokens {
        values: values_of(&hidden, w, b)?,
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

//! Distillation (KD, SinKD, DAC-KL): the student's logits and the frozen teacher's log-probs at
//! every completion position, with DAC-KL's clipping network when the run trains one.

use anyhow::{Context, Result};
use candle::Tensor;
use candor_alignment::objectives::dac_kl::CLIP_NET;
use candor_alignment::objectives::kd::DistillTokens;

use super::{of_kind, StepModels};
use crate::data::collate;
use crate::scoring::{chunked_vocab_logps, completion_states};
use crate::train::items::{DistillItem, Item};

/// The micro-batch's distillation sequences.
pub(super) fn distill_items<'a>(items: &[&'a Item]) -> Vec<&'a DistillItem> {
    of_kind(items, |i| if let Item::Distill(x) = i { Some(x) } else { None })
}

/// Positions the teacher's head scores at once: one chunk of full-vocabulary logits beside the
/// micro-batch's log-prob buffer.
const TEACHER_CHUNK: usize = 256;

/// The distillation inputs of a micro-batch: the student's logits at every completion position
/// (with gradient) and the teacher's log-probs there (chunked, from its cached states when
/// the items carry them).
pub(super) fn distill_tokens(models: StepModels, items: &[&Item]) -> Result<DistillTokens> {
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

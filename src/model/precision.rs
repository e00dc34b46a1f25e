//! Mixed precision: bf16 matmul operands over f32 master weights, with the weights' rounding
//! anchored to where training started.

use std::sync::Arc;

use candle::{DType, Result, Tensor};

use super::transformer::{CausalLm, ProjectionWeight};

impl CausalLm {
    /// Mixed precision (`Some(BF16)`): with f32 weights, round every projection's input and
    /// weight to bf16 before the product, as bf16 hardware units (AMX, tensor cores) and
    /// PyTorch's autocast see them, while the weights, their gradients' accumulation, norms,
    /// softmaxes and the log-softmax of the loss stay in f32. Gradients flow back through the
    /// rounding to the f32 weights.
    pub fn set_matmul_precision(&mut self, precision: Option<DType>) {
        self.matmul_precision = precision;
    }

    /// Anchor mixed-precision rounding to `start`'s weights (the reference of a DPO run): a
    /// weight is rounded as `round(round(W₀) + (W − W₀))`, so it moves to a neighbouring bf16
    /// value only once its f32 update amounts to half a bf16 step. Plain rounding of `W` would
    /// flip every weight near a rounding boundary at the first tiny update, and the policy's
    /// log-ratio against the reference (rounded from `W₀`) would pick up that noise.
    pub fn anchor_rounding(&mut self, start: &CausalLm) {
        let anchors = start.tensor_weights().into_iter().map(|(name, t)| (name, t.detach())).collect();
        self.rounding_anchors = Some(Arc::new(anchors));
    }

    /// Weight `name` as a mixed-precision product sees it: rounded to `dtype`, anchored to its
    /// starting value when [`CausalLm::anchor_rounding`] recorded one (differentiable).
    fn rounded_weight(&self, name: &str, w: &Tensor, dtype: DType) -> Result<Tensor> {
        match self.rounding_anchors.as_ref().and_then(|a| a.get(name)) {
            Some(w0) => round_to(&(round_to(w0, dtype)? + (w - w0)?)?, dtype),
            None => round_to(w, dtype),
        }
    }

    /// The model as one mixed-precision forward of the blocks sees it: projection weights
    /// rounded and their inputs marked for rounding. `None` without mixed precision.
    pub(super) fn rounded_view(&self) -> Result<Option<Self>> {
        let Some(dtype) = self.matmul_precision else {
            return Ok(None);
        };
        if self.checkpoint_grads.is_some() {
            candle::bail!("gradient checkpointing with bf16 mixed precision is not supported; use one or the other");
        }
        let mut view = self.clone();
        view.matmul_precision = None;
        view.visit_linears_mut(&mut |module, _, lin| {
            // Packed weights are frozen blocks, multiplied as they are.
            if let ProjectionWeight::Dense(w) = &lin.weight {
                lin.weight = ProjectionWeight::Dense(self.rounded_weight(&format!("{module}.weight"), w, dtype)?);
            }
            lin.round_input = Some(dtype);
            Ok(())
        })?;
        Ok(Some(view))
    }

    /// The LM head's operands for `hidden`: under mixed precision both rounded, a dense head
    /// anchored like every other weight (a packed one is multiplied as it is); unchanged
    /// otherwise.
    pub(super) fn lm_head_operands(&self, hidden: &Tensor) -> Result<(Tensor, ProjectionWeight)> {
        let (head_name, head) = match &self.lm_head {
            Some(w) => ("lm_head.weight", w),
            None => ("model.embed_tokens.weight", &self.embed_tokens),
        };
        Ok(match (self.matmul_precision, head) {
            (Some(dtype), ProjectionWeight::Dense(w)) => {
                (round_to(hidden, dtype)?, ProjectionWeight::Dense(self.rounded_weight(head_name, w, dtype)?))
            }
            (Some(dtype), packed) => (round_to(hidden, dtype)?, packed.clone()),
            (None, head) => (hidden.clone(), head.clone()),
        })
    }
}

/// `t` rounded to `dtype` and back (differentiable: the gradient is rounded the same way).
pub(super) fn round_to(t: &Tensor, dtype: DType) -> Result<Tensor> {
    t.to_dtype(dtype)?.to_dtype(t.dtype())
}

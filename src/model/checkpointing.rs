//! Activation checkpointing: a training forward keeps only each decoder block's input and
//! recomputes the block during the backward.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, TensorId, Var};

use super::transformer::{Block, BlockContext, CausalLm};

/// Where checkpointed blocks' backward passes deposit weight gradients, by tensor id.
pub(super) type GradSink = Arc<Mutex<HashMap<TensorId, Tensor>>>;

impl CausalLm {
    /// Turn per-layer activation checkpointing on or off: a training forward keeps only each
    /// block's input and recomputes the block during the backward (less memory, one more
    /// forward of every block). Weight gradients of the blocks then arrive through
    /// [`CausalLm::take_checkpoint_grads`], not through the `GradStore`.
    pub fn set_gradient_checkpointing(&mut self, on: bool) {
        self.checkpoint_grads = on.then(|| Arc::new(Mutex::new(HashMap::new())));
    }

    /// Gradients the checkpointed blocks' backward passes computed since the last call, by
    /// tensor id (empty without checkpointing).
    pub fn take_checkpoint_grads(&self) -> HashMap<TensorId, Tensor> {
        self.checkpoint_grads
            .as_ref()
            .map(|g| std::mem::take(&mut *g.lock().expect("gradient sink lock")))
            .unwrap_or_default()
    }

    /// The embeddings a training forward starts from. When the blocks are checkpointed and
    /// have trainable tensors (LoRA adapters) but the embeddings build no graph (a frozen
    /// table), a variable copy of them: the checkpointed blocks then enter the graph and their
    /// backward runs (PEFT's `enable_input_require_grads` does the same). Otherwise `x` itself.
    pub(super) fn checkpoint_input(&self, x: Tensor) -> Result<Tensor> {
        if self.checkpoint_grads.is_none() || x.track_op() || !self.blocks_train()? {
            return Ok(x);
        }
        Ok(Var::from_tensor(&x)?.as_tensor().clone())
    }

    /// Whether any decoder block has a trainable tensor.
    fn blocks_train(&self) -> Result<bool> {
        let mut any = false;
        for layer in &self.layers {
            layer.visit_trainable(&mut |t| {
                any |= t.track_op();
                Ok(())
            })?;
        }
        Ok(any)
    }

    /// How the blocks of a forward whose embeddings are `x` are checkpointed: `None` when
    /// checkpointing is off or `x` builds no graph.
    pub(super) fn checkpointer(&self, x: &Tensor) -> Option<Checkpointer<'_>> {
        match &self.checkpoint_grads {
            Some(sink) if x.track_op() => Some(Checkpointer { model: self, frozen: self.detached(), sink }),
            _ => None,
        }
    }
}

/// The blocks of one checkpointed forward: each runs outside autograd and enters the graph as
/// a [`CheckpointedBlock`].
pub(super) struct Checkpointer<'a> {
    model: &'a CausalLm,
    /// The same weights outside autograd, shared by every block's forward.
    frozen: CausalLm,
    sink: &'a GradSink,
}

impl Checkpointer<'_> {
    /// Decoder block `i` on `x`, computed without a graph; its backward recomputes it.
    pub(super) fn block(&self, i: usize, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let output = self.frozen.block(i, &x.detach(), ctx)?;
        let op = CheckpointedBlock {
            model: self.model.clone(),
            layer: i,
            ctx: ctx.clone(),
            output: Mutex::new(Some(output)),
            sink: Arc::clone(self.sink),
        };
        x.apply_op1(op)
    }
}

/// A decoder block whose forward ran outside autograd: the graph holds only its input. Its
/// backward recomputes the block with gradients, passes the input's gradient on and deposits
/// the weights' gradients in the model's sink.
struct CheckpointedBlock {
    model: CausalLm,
    layer: usize,
    ctx: BlockContext,
    /// The block's output, handed over once by the forward.
    output: Mutex<Option<Tensor>>,
    sink: GradSink,
}

impl CustomOp1 for CheckpointedBlock {
    fn name(&self) -> &'static str {
        "checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let output = self
            .output
            .lock()
            .expect("output lock")
            .take()
            .ok_or_else(|| candle::Error::Msg("checkpointed block applied twice".into()))?;
        let (storage, layout) = output.storage_and_layout();
        let candle::Storage::Cpu(cpu) = &*storage else { candle::bail!("gradient checkpointing runs on the CPU") };
        // The output is a fresh tensor (a residual sum) that owns its whole storage.
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle::bail!("checkpointed block output is not a whole contiguous tensor");
        }
        Ok((cpu.clone(), output.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let input = Var::from_tensor(&x.detach())?;
        let y = self.model.block(self.layer, input.as_tensor(), &self.ctx)?;
        let grads = (y * grad)?.sum_all()?.backward()?;
        let mut sink = self.sink.lock().expect("gradient sink lock");
        self.model.layers[self.layer].visit_trainable(&mut |t| {
            if let Some(g) = grads.get(t) {
                let total = match sink.remove(&t.id()) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                sink.insert(t.id(), total);
            }
            Ok(())
        })?;
        Ok(grads.get(input.as_tensor()).cloned())
    }
}

impl Block {
    /// Visit every tensor of the block that may be trainable (weights, biases, norms, adapters).
    fn visit_trainable(&self, f: &mut dyn FnMut(&Tensor) -> Result<()>) -> Result<()> {
        f(&self.input_layernorm)?;
        f(&self.mlp_layernorm)?;
        if let Some((after_attention, after_mlp)) = &self.output_norms {
            f(after_attention)?;
            f(after_mlp)?;
        }
        let a = &self.self_attn;
        if let Some((q, k)) = &a.qk_norm {
            f(q)?;
            f(k)?;
        }
        let m = &self.mlp;
        for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
            if let Some(w) = lin.weight.dense() {
                f(w)?;
            }
            if let Some(b) = &lin.bias {
                f(b)?;
            }
            if let Some(ad) = &lin.lora {
                f(&ad.a)?;
                f(&ad.b)?;
            }
        }
        Ok(())
    }
}

//! The decoder-only transformer (Llama, Mistral, Qwen2 as switches of one config), built only
//! from the differentiable ops in [`super::ops`].
//!
//! Weights are plain `Tensor`s named as in transformers' checkpoints. A model is frozen until
//! [`CausalLm::make_trainable`] turns its weights into `Var`s; a frozen forward builds no graph.
//!
//! Shapes: B = batch, T = new positions, S = cached + new positions, V = vocabulary.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, TensorId, Var, D};

use super::config::ModelConfig;
use super::fused::{self, AttentionPattern, Kernels};
use super::kv_cache::KvCache;
use super::lora::{LoraAdapter, LoraConfig, SavedAdapter};
use super::ops;

/// Anything that can hand out weights by their transformers name.
pub trait WeightSource {
    /// The tensor called `name`, or an error naming it.
    fn get(&mut self, name: &str) -> Result<Tensor>;
    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;
}

/// Reads weights from a source, converting each to one dtype and device.
struct Loader<'a> {
    source: &'a mut dyn WeightSource,
    dtype: DType,
    device: &'a Device,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        self.source.get(name)?.to_device(self.device)?.to_dtype(self.dtype)
    }

    fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: self.tensor(&format!("{prefix}.weight"))?,
            bias: if bias { Some(self.tensor(&format!("{prefix}.bias"))?) } else { None },
            lora: None,
            round_input: None,
        })
    }
}

/// A linear projection `y = x W^T + b` with HF's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`, if the layer has a bias.
    pub bias: Option<Tensor>,
    /// A LoRA adapter added to the output, if any.
    pub lora: Option<LoraAdapter>,
    /// Mixed precision: round the input to this dtype (and back) before the product.
    round_input: Option<DType>,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let [y] = Self::forward_group(x, [self])?;
        Ok(y)
    }

    /// Apply several projections to the same input in one pass (adapters added after).
    fn forward_group<const N: usize>(x: &Tensor, layers: [&Linear; N]) -> Result<[Tensor; N]> {
        let rounded;
        let x = match layers[0].round_input {
            Some(dtype) => {
                rounded = round_to(x, dtype)?;
                &rounded
            }
            None => x,
        };
        let projections: Vec<(&Tensor, Option<&Tensor>)> =
            layers.iter().map(|l| (&l.weight, l.bias.as_ref())).collect();
        let mut ys = ops::linear_group(x, &projections)?;
        for (y, layer) in ys.iter_mut().zip(layers) {
            if let Some(lora) = &layer.lora {
                *y = (&*y + lora.delta(x)?)?;
            }
        }
        Ok(ys.try_into().expect("one output per projection"))
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct Block {
    input_layernorm: Tensor,
    self_attn: Attention,
    post_attention_layernorm: Tensor,
    mlp: Mlp,
}

/// What a forward pass needs besides the token ids.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForwardOptions<'a> {
    /// `[B, S]`: 1 for real tokens, 0 for padding, over every cached and new position;
    /// `None` = no padding anywhere.
    pub attention_mask: Option<&'a Tensor>,
    /// `[B, T]` position ids (u32); `None` = `past..past+T` in every row.
    pub positions: Option<&'a Tensor>,
}

/// A causal language model, optionally with a sequence-classification head.
#[derive(Debug, Clone)]
pub struct CausalLm {
    config: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    lm_head: Option<Tensor>,
    /// `[num_labels, hidden]` of a `*ForSequenceClassification` model.
    score: Option<Tensor>,
    inv_freq: Vec<f32>,
    kernels: Kernels,
    /// Mixed precision: the dtype the matmuls' operands are rounded to (f32 master weights).
    matmul_precision: Option<DType>,
    /// The starting weights, by transformers name, that rounding is anchored to, if any.
    rounding_anchors: Option<Arc<HashMap<String, Tensor>>>,
    /// Weight gradients of checkpointed blocks, deposited by their backward; `None` when
    /// activation checkpointing is off.
    checkpoint_grads: Option<Arc<Mutex<HashMap<TensorId, Tensor>>>>,
}

impl CausalLm {
    /// Build the model from named weights, converting them to `dtype` on `device`.
    pub fn new(config: ModelConfig, source: &mut dyn WeightSource, dtype: DType, device: &Device) -> Result<Self> {
        let has_lm_head = !config.tie_word_embeddings && source.contains("lm_head.weight");
        let mut w = Loader { source, dtype, device };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Block {
                input_layernorm: w.tensor(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: w.linear(&format!("{p}.self_attn.q_proj"), config.qkv_bias)?,
                    k_proj: w.linear(&format!("{p}.self_attn.k_proj"), config.qkv_bias)?,
                    v_proj: w.linear(&format!("{p}.self_attn.v_proj"), config.qkv_bias)?,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), config.o_bias)?,
                },
                post_attention_layernorm: w.tensor(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: w.linear(&format!("{p}.mlp.gate_proj"), config.mlp_bias)?,
                    up_proj: w.linear(&format!("{p}.mlp.up_proj"), config.mlp_bias)?,
                    down_proj: w.linear(&format!("{p}.mlp.down_proj"), config.mlp_bias)?,
                },
            });
        }
        let embed_tokens = w.tensor("model.embed_tokens.weight")?;
        let norm = w.tensor("model.norm.weight")?;
        let lm_head = if config.num_labels.is_none() && has_lm_head { Some(w.tensor("lm_head.weight")?) } else { None };
        let score = if config.num_labels.is_some() { Some(w.tensor("score.weight")?) } else { None };
        let inv_freq = ops::rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling.as_ref());
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            inv_freq,
            kernels: Kernels::default(),
            matmul_precision: None,
            rounding_anchors: None,
            checkpoint_grads: None,
        })
    }

    /// Keep only the decoder layers `keep` (strictly increasing indices), in order: a smaller
    /// model of the same family and tokenizer (a distillation student). Qwen2's sliding-window
    /// boundary moves with the layers below it.
    pub fn keep_layers(&mut self, keep: &[usize]) -> anyhow::Result<()> {
        let n = self.layers.len();
        if keep.is_empty() || keep.windows(2).any(|w| w[0] >= w[1]) || keep[keep.len() - 1] >= n {
            anyhow::bail!("layers to keep must be strictly increasing indices below {n}, at least one; got {keep:?}");
        }
        self.config.first_sliding_layer = keep.iter().filter(|&&i| i < self.config.first_sliding_layer).count();
        let mut all: Vec<Option<Block>> = std::mem::take(&mut self.layers).into_iter().map(Some).collect();
        self.layers = keep.iter().map(|&i| all[i].take().expect("indices are unique")).collect();
        self.config.num_hidden_layers = keep.len();
        Ok(())
    }

    /// `n` evenly spaced layer indices out of `total`, the first and the last included
    /// (`round(i (total − 1) / (n − 1))`).
    pub fn evenly_spaced_layers(total: usize, n: usize) -> anyhow::Result<Vec<usize>> {
        if n == 0 || n > total {
            anyhow::bail!("cannot keep {n} of {total} layers (1 to {total})");
        }
        if n == 1 {
            return Ok(vec![0]);
        }
        Ok((0..n).map(|i| ((i * (total - 1)) as f64 / (n - 1) as f64).round() as usize).collect())
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Which kernels the forward pass uses (fused by default).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Choose the kernels of later forward passes.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

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
        let anchors = start.named_weights().into_iter().map(|(name, t)| (name, t.detach())).collect();
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
    fn rounded_view(&self) -> Result<Option<Self>> {
        let Some(dtype) = self.matmul_precision else {
            return Ok(None);
        };
        if self.checkpoint_grads.is_some() {
            candle::bail!("gradient checkpointing with bf16 mixed precision is not supported; use one or the other");
        }
        let mut view = self.clone();
        view.matmul_precision = None;
        view.visit_linears_mut(&mut |module, _, lin| {
            lin.weight = self.rounded_weight(&format!("{module}.weight"), &lin.weight, dtype)?;
            lin.round_input = Some(dtype);
            Ok(())
        })?;
        Ok(Some(view))
    }

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

    /// Whether a forward pass without a KV cache takes the fused kernels.
    fn fused(&self) -> bool {
        self.kernels == Kernels::Fused && fused::supports(&[&self.embed_tokens])
    }

    /// Visit every linear projection with its transformers module name and short name
    /// (`model.layers.3.self_attn.q_proj`, `q_proj`).
    pub fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&str, &str, &mut Linear) -> Result<()>) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let a = &mut layer.self_attn;
            let m = &mut layer.mlp;
            for (group, short, lin) in [
                ("self_attn", "q_proj", &mut a.q_proj),
                ("self_attn", "k_proj", &mut a.k_proj),
                ("self_attn", "v_proj", &mut a.v_proj),
                ("self_attn", "o_proj", &mut a.o_proj),
                ("mlp", "gate_proj", &mut m.gate_proj),
                ("mlp", "up_proj", &mut m.up_proj),
                ("mlp", "down_proj", &mut m.down_proj),
            ] {
                f(&format!("model.layers.{i}.{group}.{short}"), short, lin)?;
            }
        }
        Ok(())
    }

    /// Attach fresh LoRA adapters to the configured target modules (seeded initialisation).
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> anyhow::Result<()> {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (dtype, device) = (self.dtype(), self.device().clone());
        let mut err = None;
        self.visit_linears_mut(&mut |_, short, lin| {
            if cfg.targets.iter().any(|t| t == short) {
                let (out, inp) = lin.weight.dims2()?;
                match LoraAdapter::init(out, inp, cfg, &mut rng, dtype, &device) {
                    Ok(ad) => lin.lora = Some(ad),
                    Err(e) => err = Some(e),
                }
            }
            Ok(())
        })?;
        err.map_or(Ok(()), Err)
    }

    /// Attach a saved adapter (every module it names must exist).
    pub fn attach_lora(&mut self, saved: &SavedAdapter) -> anyhow::Result<()> {
        let (dtype, device) = (self.dtype(), self.device().clone());
        let mut attached = 0;
        self.visit_linears_mut(&mut |module, _, lin| {
            if let Some((a, b)) = saved.tensors.get(module) {
                lin.lora = Some(LoraAdapter {
                    a: a.to_device(&device)?.to_dtype(dtype)?,
                    b: b.to_device(&device)?.to_dtype(dtype)?,
                    scale: saved.config.scale(),
                    dropout: saved.config.dropout,
                    dropout_seed: None,
                });
                attached += 1;
            }
            Ok(())
        })?;
        if attached != saved.tensors.len() {
            anyhow::bail!("the adapter names {} modules but only {attached} exist in this model", saved.tensors.len());
        }
        Ok(())
    }

    /// The adapters, by transformers module name.
    pub fn lora_adapters(&self) -> Vec<(String, LoraAdapter)> {
        let mut out = Vec::new();
        let mut copy = self.clone();
        copy.visit_linears_mut(&mut |module, _, lin| {
            if let Some(ad) = &lin.lora {
                out.push((module.to_string(), ad.clone()));
            }
            Ok(())
        })
        .expect("collecting adapters cannot fail");
        out
    }

    /// Make only the adapters trainable; returns their variables under PEFT's names.
    pub fn make_lora_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        self.visit_linears_mut(&mut |module, _, lin| {
            if let Some(ad) = lin.lora.as_mut() {
                vars.extend(ad.make_trainable(module)?);
            }
            Ok(())
        })?;
        Ok(vars)
    }

    /// The same weights without adapters (the reference of a LoRA run: no second copy of the
    /// base weights).
    pub fn without_adapters(&self) -> Self {
        let mut base = self.clone();
        base.visit_linears_mut(&mut |_, _, lin| {
            lin.lora = None;
            Ok(())
        })
        .expect("dropping adapters cannot fail");
        base
    }

    /// Fold every adapter into its weight (`W + α/r · B A`) and drop the adapters.
    pub fn merge_lora(&mut self) -> Result<()> {
        self.visit_linears_mut(&mut |_, _, lin| {
            if let Some(ad) = lin.lora.take() {
                lin.weight = ad.merge_into(&lin.weight.detach())?;
            }
            Ok(())
        })
    }

    /// Dropout masks of the adapters for one optimizer step derive from `seed` and `step`
    /// (reproducible on resume); `None` turns adapter dropout off (evaluation, sampling).
    pub fn set_lora_dropout_step(&mut self, seed_and_step: Option<(u64, u64)>) {
        let mut index = 0u64;
        self.visit_linears_mut(&mut |_, _, lin| {
            if let Some(ad) = lin.lora.as_mut() {
                index += 1;
                ad.dropout_seed = seed_and_step.map(|(seed, step)| {
                    seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
                });
            }
            Ok(())
        })
        .expect("setting seeds cannot fail");
    }

    /// Visit every weight with its transformers name, mutably (conversion, LoRA, trainability).
    /// A tied output projection is visited once, as `model.embed_tokens.weight`.
    pub fn visit_weights_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        f("model.embed_tokens.weight", &mut self.embed_tokens)?;
        self.visit_linears_mut(&mut |module, _, lin| {
            f(&format!("{module}.weight"), &mut lin.weight)?;
            if let Some(b) = lin.bias.as_mut() {
                f(&format!("{module}.bias"), b)?;
            }
            Ok(())
        })?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            f(&format!("model.layers.{i}.input_layernorm.weight"), &mut layer.input_layernorm)?;
            f(&format!("model.layers.{i}.post_attention_layernorm.weight"), &mut layer.post_attention_layernorm)?;
        }
        f("model.norm.weight", &mut self.norm)?;
        if let Some(w) = self.lm_head.as_mut() {
            f("lm_head.weight", w)?;
        }
        if let Some(w) = self.score.as_mut() {
            f("score.weight", w)?;
        }
        Ok(())
    }

    /// Every weight with its transformers name, in checkpoint order.
    pub fn named_weights(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let mut copy = self.clone();
        copy.visit_weights_mut(&mut |name, t| {
            out.push((name.to_string(), t.clone()));
            Ok(())
        })
        .expect("collecting weights cannot fail");
        out
    }

    /// Turn every weight into a trainable `Var` and return them by name. Gradients flow to
    /// these after a forward pass and `loss.backward()`.
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        let mut vars = Vec::new();
        self.visit_weights_mut(&mut |name, t| {
            let var = Var::from_tensor(t)?;
            *t = var.as_tensor().clone();
            vars.push((name.to_string(), var));
            Ok(())
        })?;
        Ok(vars)
    }

    /// A copy that shares the weights' storage but is outside autograd: it sees every
    /// optimizer update, and its forward passes build no graph (evaluation, sampling).
    pub fn frozen_view(&self) -> Self {
        let mut view = self.detached();
        view.set_lora_dropout_step(None);
        view
    }

    /// Hidden states after the final norm, `[B, T, hidden]`, for token ids `[B, T]` (u32).
    /// With a cache, the new positions are appended after the cached ones.
    pub fn forward_hidden(&self, ids: &Tensor, opts: ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if let Some(view) = self.rounded_view()? {
            return view.forward_hidden(ids, opts, cache);
        }
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let device = ids.device();
        let default_positions;
        let positions = match opts.positions {
            Some(p) => p,
            None => {
                default_positions = Tensor::arange(past as u32, (past + t) as u32, device)?
                    .unsqueeze(0)?
                    .broadcast_as((b, t))?
                    .contiguous()?;
                &default_positions
            }
        };
        let (cos, sin) = ops::rope_tables(&self.inv_freq, positions, self.dtype())?;
        let mut x = self.embed_tokens.embedding_rows(ids)?;
        if cache.is_some() {
            x = self.plain_blocks(x, &cos, &sin, opts.attention_mask, cache)?;
            return ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps);
        }
        let ctx = if self.fused() {
            BlockContext::Fused {
                cos,
                sin,
                full: AttentionPattern::new(opts.attention_mask, b, t, None)?,
                sliding: self
                    .config
                    .sliding_window
                    .map(|w| AttentionPattern::new(opts.attention_mask, b, t, Some(w)))
                    .transpose()?,
            }
        } else {
            BlockContext::Plain {
                cos,
                sin,
                full: ops::attention_mask(opts.attention_mask, b, t, 0, None, device)?,
                sliding: self
                    .config
                    .sliding_window
                    .map(|w| ops::attention_mask(opts.attention_mask, b, t, 0, Some(w), device))
                    .transpose()?,
            }
        };
        let checkpoint = match &self.checkpoint_grads {
            Some(sink) if x.track_op() => Some((self.detached(), sink)),
            _ => None,
        };
        for i in 0..self.layers.len() {
            x = match &checkpoint {
                None => self.block(i, &x, &ctx)?,
                Some((frozen, sink)) => {
                    let output = frozen.block(i, &x.detach(), &ctx)?;
                    let op = CheckpointedBlock {
                        model: self.clone(),
                        layer: i,
                        ctx: ctx.clone(),
                        output: Mutex::new(Some(output)),
                        sink: Arc::clone(sink),
                    };
                    x.apply_op1(op)?
                }
            };
        }
        match ctx {
            BlockContext::Fused { .. } => fused::rms_norm(&x, &self.norm, self.config.rms_norm_eps),
            BlockContext::Plain { .. } => ops::rms_norm(&x, &self.norm, self.config.rms_norm_eps),
        }
    }

    /// Decoder block `i` without a cache, with the kernels `ctx` was made for.
    fn block(&self, i: usize, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let layer = &self.layers[i];
        let sliding_layer = i >= self.config.first_sliding_layer;
        match ctx {
            BlockContext::Fused { cos, sin, full, sliding } => {
                let pattern = match sliding {
                    Some(p) if sliding_layer => p,
                    _ => full,
                };
                self.fused_block(layer, x, cos, sin, pattern)
            }
            BlockContext::Plain { cos, sin, full, sliding } => {
                let mask = match sliding {
                    Some(m) if sliding_layer => m,
                    _ => full,
                };
                self.plain_block(i, x.clone(), cos, sin, mask, None)
            }
        }
    }

    /// The same weights outside autograd, adapters' dropout seeds kept (a checkpointed block's
    /// forward must match its recomputation).
    fn detached(&self) -> Self {
        let mut view = self.clone();
        view.visit_weights_mut(&mut |_, t| {
            *t = t.detach();
            Ok(())
        })
        .expect("detaching cannot fail");
        view.visit_linears_mut(&mut |_, _, lin| {
            if let Some(ad) = lin.lora.as_mut() {
                ad.a = ad.a.detach();
                ad.b = ad.b.detach();
            }
            Ok(())
        })
        .expect("detaching cannot fail");
        view
    }

    /// One decoder block with the fused kernels (no cache): q/k/v stay `[B, T, heads, D]`.
    fn fused_block(
        &self,
        layer: &Block,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        pattern: &AttentionPattern,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let normed = fused::rms_norm(x, &layer.input_layernorm, cfg.rms_norm_eps)?;
        let a = &layer.self_attn;
        let [q, k, v] = Linear::forward_group(&normed, [&a.q_proj, &a.k_proj, &a.v_proj])?;
        let q = fused::apply_rope(&q.reshape((b, t, h, hd))?, cos, sin)?;
        let k = fused::apply_rope(&k.reshape((b, t, kv, hd))?, cos, sin)?;
        let attn = fused::attention(&q, &k, &v.reshape((b, t, kv, hd))?, pattern.clone(), cfg.kv_groups())?;
        let x = (x + a.o_proj.forward(&attn.reshape((b, t, h * hd))?)?)?;
        let normed = fused::rms_norm(&x, &layer.post_attention_layernorm, cfg.rms_norm_eps)?;
        let m = &layer.mlp;
        let [gate, up] = Linear::forward_group(&normed, [&m.gate_proj, &m.up_proj])?;
        &x + m.down_proj.forward(&fused::silu_mul(&gate, &up)?)?
    }

    /// Every decoder block with the plain ops, appending to the cache.
    fn plain_blocks(
        &self,
        mut x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        key_padding: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let device = x.device().clone();
        let full_mask = ops::attention_mask(key_padding, b, t, past, None, &device)?;
        let sliding_mask = match self.config.sliding_window {
            Some(w) => Some(ops::attention_mask(key_padding, b, t, past, Some(w), &device)?),
            None => None,
        };
        for i in 0..self.layers.len() {
            let mask = match &sliding_mask {
                Some(m) if i >= self.config.first_sliding_layer => m,
                _ => &full_mask,
            };
            x = self.plain_block(i, x, cos, sin, mask, cache.as_deref_mut())?;
        }
        if let Some(c) = cache {
            c.advance(t);
        }
        Ok(x)
    }

    /// Decoder block `i` with the plain ops and an additive mask, appending its keys and
    /// values to the cache if one is given.
    fn plain_block(
        &self,
        i: usize,
        x: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let layer = &self.layers[i];
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let normed = ops::rms_norm(&x, &layer.input_layernorm, cfg.rms_norm_eps)?;
        let a = &layer.self_attn;
        // [B, T, heads * D] -> [B, heads, T, D]
        let split = |y: Tensor, heads: usize| y.reshape((b, t, heads, hd))?.transpose(1, 2);
        let [q, k, v] = Linear::forward_group(&normed, [&a.q_proj, &a.k_proj, &a.v_proj])?;
        let q = ops::apply_rope(&split(q, h)?, cos, sin)?;
        let k = ops::apply_rope(&split(k, kv)?, cos, sin)?;
        let v = split(v, kv)?;
        let (k, v) = match cache {
            Some(c) => c.append(i, &k, &v)?,
            None => (k, v),
        };
        let attn = ops::attention(&q, &k, &v, mask, cfg.kv_groups())?; // [B, H, T, D]
        let attn = attn.transpose(1, 2)?.reshape((b, t, h * hd))?;
        let x = (x + a.o_proj.forward(&attn)?)?;
        let normed = ops::rms_norm(&x, &layer.post_attention_layernorm, cfg.rms_norm_eps)?;
        let m = &layer.mlp;
        let [gate, up] = Linear::forward_group(&normed, [&m.gate_proj, &m.up_proj])?;
        let gated = ops::silu_mul(&gate, &up)?;
        &x + m.down_proj.forward(&gated)?
    }

    /// Next-token logits `[B, T, V]` at every position.
    pub fn forward(&self, ids: &Tensor, opts: ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, opts, cache)?;
        self.lm_logits(&hidden)
    }

    /// Project hidden states `[B, T, hidden]` to vocabulary logits `[B, T, V]`.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        ops::linear(hidden, self.lm_head.as_ref().unwrap_or(&self.embed_tokens), None)
    }

    /// Log-probability of every next token: `out[b, t] = log p(ids[b, t+1] | ids[b, ..=t])`,
    /// shape `[B, T-1]`, f32. Padding positions hold meaningless values: mask them.
    pub fn token_logps(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let opts = ForwardOptions { attention_mask, positions: None };
        let hidden = self.forward_hidden(ids, opts, None)?.narrow(1, 0, t - 1)?;
        let hidden = hidden.reshape((b * (t - 1), hidden.dim(D::Minus1)?))?;
        let targets: Vec<u32> = ids.narrow(1, 1, t - 1)?.flatten_all()?.to_vec1()?;
        self.target_logps(&hidden, &targets)?.reshape((b, t - 1))
    }

    /// `log p(targets[n] | hidden[n])` for hidden states `[N, hidden]` after the final norm:
    /// the LM head, log-softmax and gather; `[N]`, f32. The fused kernels never hold more than
    /// a chunk of rows' vocabulary logits.
    pub fn target_logps(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        let (head_name, head) = match &self.lm_head {
            Some(w) => ("lm_head.weight", w),
            None => ("model.embed_tokens.weight", &self.embed_tokens),
        };
        let (hidden, head) = match self.matmul_precision {
            Some(dtype) => (round_to(hidden, dtype)?, self.rounded_weight(head_name, head, dtype)?),
            None => (hidden.clone(), head.clone()),
        };
        if self.kernels == Kernels::Fused && fused::supports(&[&hidden, &head]) {
            return fused::lm_head_logps(&hidden, &head, targets);
        }
        let n = targets.len();
        let logits = ops::linear(&hidden.unsqueeze(0)?, &head, None)?;
        ops::gather_token_logps(&logits, &Tensor::from_slice(targets, (1, n), hidden.device())?)?.squeeze(0)
    }

    /// Sequence-classification scores `[B, num_labels]`, pooled at the last non-pad token of
    /// each row (transformers' rule: the rightmost position whose id is not `pad_token_id`,
    /// or the last position when the model has no pad token).
    pub fn sequence_scores(&self, ids: &Tensor, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let score = self.score.as_ref().ok_or_else(|| {
            candle::Error::Msg("this model has no sequence-classification head (`score.weight`)".into())
        })?;
        let t = ids.dim(1)?;
        let last: Vec<u32> = ids
            .to_vec2::<u32>()?
            .iter()
            .map(|r| match self.config.pad_token_id {
                Some(pad) => r.iter().rposition(|&id| id != pad).unwrap_or(0) as u32,
                None => (t - 1) as u32,
            })
            .collect();
        let pooled = self.pooled_hidden(ids, attention_mask, &last)?;
        ops::linear(&pooled, score, None)?.to_dtype(DType::F32)
    }

    /// Final hidden states `[B, hidden]` at position `last[b]` of each row.
    pub fn pooled_hidden(&self, ids: &Tensor, attention_mask: Option<&Tensor>, last: &[u32]) -> Result<Tensor> {
        let b = ids.dim(0)?;
        let hidden = self.forward_hidden(ids, ForwardOptions { attention_mask, positions: None }, None)?;
        let idx =
            Tensor::from_slice(last, (b, 1, 1), ids.device())?.broadcast_as((b, 1, hidden.dim(2)?))?.contiguous()?;
        hidden.gather(&idx, 1)?.squeeze(1)
    }

    /// Make this causal LM a `*ForSequenceClassification` model: a fresh `[num_labels, hidden]`
    /// score head drawn from N(0, 0.02²) (transformers' `initializer_range`) with `seed`, the
    /// LM head dropped, and `pad_token_id` set where the config has none (pooling needs it).
    pub fn add_score_head(&mut self, num_labels: usize, pad_token_id: u32, seed: u64) -> Result<()> {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let hidden = self.config.hidden_size;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid normal");
        let values: Vec<f32> = (0..num_labels * hidden).map(|_| normal.sample(&mut rng)).collect();
        self.score = Some(
            Tensor::from_vec(values, (num_labels, hidden), self.embed_tokens.device())?
                .to_dtype(self.embed_tokens.dtype())?,
        );
        self.lm_head = None;
        self.config.num_labels = Some(num_labels);
        self.config.pad_token_id.get_or_insert(pad_token_id);
        Ok(())
    }

    /// A fresh, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }
}

/// What every block of one forward pass shares: RoPE tables and who attends to whom, in the
/// form the chosen kernels take.
#[derive(Debug, Clone)]
enum BlockContext {
    Fused { cos: Tensor, sin: Tensor, full: AttentionPattern, sliding: Option<AttentionPattern> },
    Plain { cos: Tensor, sin: Tensor, full: Tensor, sliding: Option<Tensor> },
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
    sink: Arc<Mutex<HashMap<TensorId, Tensor>>>,
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
        f(&self.post_attention_layernorm)?;
        let a = &self.self_attn;
        let m = &self.mlp;
        for lin in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj] {
            f(&lin.weight)?;
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

/// `t` rounded to `dtype` and back (differentiable: the gradient is rounded the same way).
fn round_to(t: &Tensor, dtype: DType) -> Result<Tensor> {
    t.to_dtype(dtype)?.to_dtype(t.dtype())
}

/// Row lookup that keeps a gradient path to the table (candle's `index_select` has a backward).
trait EmbeddingRows {
    fn embedding_rows(&self, ids: &Tensor) -> Result<Tensor>;
}

impl EmbeddingRows for Tensor {
    fn embedding_rows(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let hidden = self.dim(D::Minus1)?;
        self.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, hidden))
    }
}

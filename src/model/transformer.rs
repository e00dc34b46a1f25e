//! The decoder-only transformer (Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3 as switches of
//! one config), built only
//! from the differentiable ops in [`super::ops`], in candle's order: weights and projections,
//! decoder blocks, then the model and its forward pass down to the LM head's log-probs.
//!
//! Weights are plain `Tensor`s named as in transformers' checkpoints. A model is frozen until
//! [`CausalLm::make_trainable`] turns its weights into `Var`s; a frozen forward builds no graph.
//! What else a `CausalLm` does lives next door, each in its own `impl CausalLm`: LoRA
//! ([`super::lora`]), mixed precision (`precision.rs`), activation checkpointing
//! (`checkpointing.rs`), the sequence-classification head (`heads.rs`) and layer cutting
//! (`layers.rs`).
//!
//! Shapes: B = batch, T = new positions, S = cached + new positions, V = vocabulary.

use std::collections::HashMap;
use std::sync::Arc;

use candle::quantized::GgmlDType;
use candle::{DType, Device, Result, Tensor, Var, D};

use super::checkpointing::GradSink;
use super::config::{Activation, ModelConfig};
use super::fused::{self, AttentionPattern, Kernels};
use super::kv_cache::KvCache;
use super::lora::LoraAdapter;
use super::ops;
use super::packed::{fitting_kind, PackedWeight};
use super::precision::round_to;
use super::rope::Rope;

/// Anything that can hand out weights by their transformers name.
pub trait WeightSource {
    /// The tensor called `name`, or an error naming it.
    fn get(&mut self, name: &str) -> Result<Tensor>;
    /// Whether a tensor called `name` exists.
    fn contains(&self, name: &str) -> bool;
    /// The `[out, in]` weight `name` in packed blocks of `kind` (any kind when `None`), taken
    /// from the source without a dense copy, when the source stores it so; `Ok(None)` when it
    /// is stored otherwise (then [`WeightSource::get`] reads it).
    fn packed(&mut self, _name: &str, _kind: Option<GgmlDType>) -> Result<Option<PackedWeight>> {
        Ok(None)
    }
}

/// How a model keeps its projection weights (q/k/v/o and the MLP's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Packing {
    /// Dense tensors in the model's dtype (trainable).
    #[default]
    Dense,
    /// Frozen, in the blocks the file stores (a GGUF's quantized types, bf16 or f16 safetensors);
    /// projections stored in f32 stay dense.
    AsStored,
    /// Frozen, quantized at load to this type (`--base-quant`): stored blocks of another type are
    /// dequantized and quantized again. Rows that do not fill a block of a K-quant take the
    /// 32-value type llama.cpp falls back to ([`fitting_kind`]).
    Quantize(GgmlDType),
}

impl Packing {
    /// How a frozen model keeps its projections: quantized to `kind` when given (`--base-quant`;
    /// f32 means dense), else as stored.
    pub fn frozen(kind: Option<GgmlDType>) -> Self {
        match kind {
            None => Self::AsStored,
            Some(GgmlDType::F32) => Self::Dense,
            Some(kind) => Self::Quantize(kind),
        }
    }
}

/// Reads weights from a source, converting each to one dtype and device.
struct Loader<'a> {
    source: &'a mut dyn WeightSource,
    dtype: DType,
    device: &'a Device,
    packing: Packing,
}

impl Loader<'_> {
    fn tensor(&mut self, name: &str) -> Result<Tensor> {
        self.source.get(name)?.to_device(self.device)?.to_dtype(self.dtype)
    }

    /// The embedding table or the untied LM head `name`: dense when training; when frozen, in
    /// the blocks the file stores, else (quantizing at load) in Q8_0, or bf16/f16 when that is
    /// the type asked. The head's rounding shows in every logit, so it keeps 8 bits where the
    /// projections may have 4 (llama.cpp's Q4_K_M gives it 6).
    fn table(&mut self, name: &str) -> Result<ProjectionWeight> {
        let kind = match self.packing {
            Packing::Quantize(k @ (GgmlDType::BF16 | GgmlDType::F16)) => Some(k),
            Packing::Quantize(_) => Some(GgmlDType::Q8_0),
            Packing::Dense | Packing::AsStored => None,
        };
        self.weight(name, kind, true)
    }

    /// The projection weight `name`, kept as [`Packing`] asks.
    fn projection(&mut self, name: &str) -> Result<ProjectionWeight> {
        let kind = match self.packing {
            Packing::Quantize(kind) => Some(kind),
            Packing::Dense | Packing::AsStored => None,
        };
        self.weight(name, kind, false)
    }

    /// The `[out, in]` weight `name`: dense when training; when frozen, packed as stored (any
    /// stored type when `keep_stored` or no `quantize` is asked), else quantized to `quantize`
    /// (or its fallback), else dense. Packed weights stay on the CPU.
    fn weight(&mut self, name: &str, quantize: Option<GgmlDType>, keep_stored: bool) -> Result<ProjectionWeight> {
        if self.packing == Packing::Dense {
            return Ok(ProjectionWeight::Dense(self.tensor(name)?));
        }
        // What to ask the source for, in order: any stored blocks, then blocks of `quantize`.
        let tries = match (keep_stored, quantize) {
            (true, Some(kind)) => vec![None, Some(kind)],
            (false, Some(kind)) => vec![Some(kind)],
            (_, None) => vec![None],
        };
        for kind in tries {
            if let Some(packed) = self.source.packed(name, kind)? {
                return Ok(ProjectionWeight::Packed(Arc::new(packed)));
            }
        }
        let w = self.source.get(name)?;
        Ok(match quantize {
            Some(kind) => {
                ProjectionWeight::Packed(Arc::new(PackedWeight::quantize(&w, fitting_kind(kind, w.dim(1)?))?))
            }
            None => ProjectionWeight::Dense(w.to_device(self.device)?.to_dtype(self.dtype)?),
        })
    }

    /// Consecutive row blocks of `sizes` rows of the fused projection `prefix` (Phi-3's
    /// `qkv_proj`, `gate_up_proj`), as separate projections.
    fn split_linear<const N: usize>(&mut self, prefix: &str, sizes: [usize; N], bias: bool) -> Result<[Linear; N]> {
        let weight = self.projection(&format!("{prefix}.weight"))?;
        let bias = if bias { Some(self.tensor(&format!("{prefix}.bias"))?) } else { None };
        let mut at = 0;
        let mut parts = Vec::with_capacity(N);
        for n in sizes {
            parts.push(Linear {
                weight: weight.rows(at, n)?,
                bias: bias.as_ref().map(|b| b.narrow(0, at, n)).transpose()?,
                lora: None,
                round_input: None,
            });
            at += n;
        }
        Ok(parts.try_into().expect("one part per size"))
    }

    fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear> {
        Ok(Linear {
            weight: self.projection(&format!("{prefix}.weight"))?,
            bias: if bias { Some(self.tensor(&format!("{prefix}.bias"))?) } else { None },
            lora: None,
            round_input: None,
        })
    }
}

/// A projection's `[out, in]` weight: a tensor in the model's dtype (trainable, or frozen in
/// full precision), or frozen packed blocks.
#[derive(Debug, Clone)]
pub enum ProjectionWeight {
    /// A plain tensor.
    Dense(Tensor),
    /// Quantized, bf16 or f16 blocks on the CPU, never trained (see [`super::packed`]).
    Packed(Arc<PackedWeight>),
}

impl ProjectionWeight {
    /// `(out, in)`.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self {
            Self::Dense(w) => w.dims2(),
            Self::Packed(p) => Ok(p.dims()),
        }
    }

    /// The tensor of a dense weight.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(w) => Some(w),
            Self::Packed(_) => None,
        }
    }

    /// The weight as a tensor of `dtype` on `device`: a dense one as it is, a packed one
    /// dequantized (a full-size copy, for export and merging).
    pub fn to_dense(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            Self::Dense(w) => Ok(w.clone()),
            Self::Packed(p) => p.dequantize(device)?.to_dtype(dtype),
        }
    }

    /// `x W^T` for `x` `[..., in]`.
    pub fn linear(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => ops::linear(x, w, None),
            Self::Packed(p) => p.linear(x),
        }
    }

    /// Rows `first..first + n` (Phi-3's fused projections, split).
    fn rows(&self, first: usize, n: usize) -> Result<Self> {
        Ok(match self {
            Self::Dense(w) => Self::Dense(w.narrow(0, first, n)?.contiguous()?),
            Self::Packed(p) => Self::Packed(Arc::new(p.gather_rows(&(first..first + n).collect::<Vec<_>>())?)),
        })
    }
}

/// A linear projection `y = x W^T + b` with HF's `[out, in]` weight layout.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: ProjectionWeight,
    /// `[out]`, if the layer has a bias.
    pub bias: Option<Tensor>,
    /// A LoRA adapter added to the output, if any.
    pub lora: Option<LoraAdapter>,
    /// Mixed precision: round the input to this dtype (and back) before the product.
    pub(super) round_input: Option<DType>,
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
        let dense: Option<Vec<(&Tensor, Option<&Tensor>)>> =
            layers.iter().map(|l| Some((l.weight.dense()?, l.bias.as_ref()))).collect();
        let mut ys = match dense {
            Some(projections) => ops::linear_group(x, &projections)?,
            None => layers.iter().map(|l| l.project(x)).collect::<Result<Vec<_>>>()?,
        };
        for (y, layer) in ys.iter_mut().zip(layers) {
            if let Some(lora) = &layer.lora {
                *y = (&*y + lora.delta(x)?)?;
            }
        }
        Ok(ys.try_into().expect("one output per projection"))
    }

    /// `x W^T + b` without the adapter.
    fn project(&self, x: &Tensor) -> Result<Tensor> {
        match (&self.weight, &self.bias) {
            (ProjectionWeight::Dense(w), b) => ops::linear(x, w, b.as_ref()),
            (packed, Some(b)) => packed.linear(x)?.broadcast_add(b),
            (packed, None) => packed.linear(x),
        }
    }
}

/// Self-attention's projections (grouped-query: k and v may have fewer heads than q).
#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) o_proj: Linear,
    /// Qwen3's RMSNorm weights `[head_dim]` over each query and key head, applied before RoPE.
    pub(super) qk_norm: Option<(Tensor, Tensor)>,
}

impl Attention {
    /// The per-head RMSNorm of queries and keys `[B, T, heads, D]` (over the head's width) of
    /// Qwen3 and Gemma 3, with the fused or the plain kernel; unchanged without one.
    fn norm_heads(&self, q: Tensor, k: Tensor, cfg: &ModelConfig, fused_kernels: bool) -> Result<(Tensor, Tensor)> {
        let Some((qn, kn)) = &self.qk_norm else {
            return Ok((q, k));
        };
        Ok((rms_norm(&q, qn, cfg, fused_kernels)?, rms_norm(&k, kn, cfg, fused_kernels)?))
    }
}

/// RMSNorm of `x` by `weight`, shifted by the configuration's offset (Gemma scales by 1 + w,
/// computed in the weight's dtype as transformers does), with the fused or the plain kernel.
fn rms_norm(x: &Tensor, weight: &Tensor, cfg: &ModelConfig, fused_kernels: bool) -> Result<Tensor> {
    let shifted;
    let weight = if cfg.norm_weight_offset == 0.0 {
        weight
    } else {
        shifted = (weight + cfg.norm_weight_offset)?;
        &shifted
    };
    match fused_kernels {
        true => fused::rms_norm(x, weight, cfg.rms_norm_eps),
        false => ops::rms_norm(x, weight, cfg.rms_norm_eps),
    }
}

/// The gated MLP's projections: `down(act(gate(x)) ∘ up(x))`.
#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
}

impl Mlp {
    /// `down(act(gate(x)) ∘ up(x))`; SwiGLU takes the fused or the plain kernel, GeGLU candle's
    /// tanh-approximated GELU (the formula of PyTorch's `gelu(approximate="tanh")`).
    fn forward(&self, x: &Tensor, act: Activation, fused_kernels: bool) -> Result<Tensor> {
        let [gate, up] = Linear::forward_group(x, [&self.gate_proj, &self.up_proj])?;
        let gated = match (act, fused_kernels) {
            (Activation::Silu, true) => fused::silu_mul(&gate, &up)?,
            (Activation::Silu, false) => ops::silu_mul(&gate, &up)?,
            (Activation::GeluPytorchTanh, _) => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&gated)
    }
}

/// One decoder layer: pre-norm attention and pre-norm gated MLP, each added to the residual;
/// Gemma 3 also norms each sublayer's output before adding it.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) input_layernorm: Tensor,
    pub(super) self_attn: Attention,
    /// The norm before the MLP (Llama's `post_attention_layernorm`, Gemma's
    /// `pre_feedforward_layernorm`).
    pub(super) mlp_layernorm: Tensor,
    pub(super) mlp: Mlp,
    /// Gemma 3's norms of the attention and of the MLP output.
    pub(super) output_norms: Option<(Tensor, Tensor)>,
}

impl Block {
    /// The block on `x` given its attention (normed input in, heads' output out): the
    /// residual sums around attention and the MLP, with the sandwich norms when it has them.
    fn forward(
        &self,
        x: &Tensor,
        cfg: &ModelConfig,
        fused_kernels: bool,
        attention: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let norm = |x: &Tensor, w: &Tensor| rms_norm(x, w, cfg, fused_kernels);
        let mut attn = attention(&norm(x, &self.input_layernorm)?)?;
        if let Some((after_attention, _)) = &self.output_norms {
            attn = norm(&attn, after_attention)?;
        }
        let x = (x + attn)?;
        let mut mlp = self.mlp.forward(&norm(&x, &self.mlp_layernorm)?, cfg.hidden_act, fused_kernels)?;
        if let Some((_, after_mlp)) = &self.output_norms {
            mlp = norm(&mlp, after_mlp)?;
        }
        x + mlp
    }
}

/// cos and sin of one forward pass: of the RoPE every layer uses, and of the sliding-window
/// layers' own base when they have one (Gemma 3).
#[derive(Debug, Clone)]
pub(super) struct RopeTables {
    global: (Tensor, Tensor),
    local: Option<(Tensor, Tensor)>,
}

impl RopeTables {
    /// The tables of a sliding or a global layer.
    fn of(&self, sliding_layer: bool) -> (&Tensor, &Tensor) {
        let (cos, sin) = match &self.local {
            Some(local) if sliding_layer => local,
            _ => &self.global,
        };
        (cos, sin)
    }
}

/// What every block of one forward pass shares: RoPE tables and who attends to whom, in the
/// form the chosen kernels take.
#[derive(Debug, Clone)]
pub(super) enum BlockContext {
    Fused { rope: RopeTables, full: AttentionPattern, sliding: Option<AttentionPattern> },
    Plain { rope: RopeTables, full: Tensor, sliding: Option<Tensor> },
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
    pub(super) config: ModelConfig,
    pub(super) embed_tokens: ProjectionWeight,
    pub(super) layers: Vec<Block>,
    norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    pub(super) lm_head: Option<ProjectionWeight>,
    /// Where the weights and activations live, and the activations' (and dense weights') dtype.
    device: Device,
    dtype: DType,
    /// `[num_labels, hidden]` of a `*ForSequenceClassification` model.
    pub(super) score: Option<Tensor>,
    rope: Rope,
    /// The sliding-window layers' RoPE when its base differs (Gemma 3).
    local_rope: Option<Rope>,
    kernels: Kernels,
    /// Mixed precision: the dtype the matmuls' operands are rounded to (f32 master weights).
    pub(super) matmul_precision: Option<DType>,
    /// The starting weights, by transformers name, that rounding is anchored to, if any.
    pub(super) rounding_anchors: Option<Arc<HashMap<String, Tensor>>>,
    /// Weight gradients of checkpointed blocks, deposited by their backward; `None` when
    /// activation checkpointing is off.
    pub(super) checkpoint_grads: Option<GradSink>,
}

impl CausalLm {
    /// Build the model from named weights, converting them to `dtype` on `device`.
    pub fn new(config: ModelConfig, source: &mut dyn WeightSource, dtype: DType, device: &Device) -> Result<Self> {
        Self::new_packed(config, source, dtype, device, Packing::Dense)
    }

    /// [`CausalLm::new`] with the projections kept as `packing` says.
    pub fn new_packed(
        config: ModelConfig,
        source: &mut dyn WeightSource,
        dtype: DType,
        device: &Device,
        packing: Packing,
    ) -> Result<Self> {
        let has_lm_head = !config.tie_word_embeddings && source.contains("lm_head.weight");
        let mut w = Loader { source, dtype, device, packing };
        let norms = config.block_norm_names();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let [q_proj, k_proj, v_proj] = match config.fused_projections {
                true => {
                    let (q, kv) =
                        (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim);
                    w.split_linear(&format!("{p}.self_attn.qkv_proj"), [q, kv, kv], config.qkv_bias)?
                }
                false => ["q_proj", "k_proj", "v_proj"]
                    .map(|n| w.linear(&format!("{p}.self_attn.{n}"), config.qkv_bias))
                    .into_iter()
                    .collect::<Result<Vec<_>>>()?
                    .try_into()
                    .expect("three projections"),
            };
            let [gate_proj, up_proj] = match config.fused_projections {
                true => {
                    let inter = config.intermediate_size;
                    w.split_linear(&format!("{p}.mlp.gate_up_proj"), [inter, inter], config.mlp_bias)?
                }
                false => [
                    w.linear(&format!("{p}.mlp.gate_proj"), config.mlp_bias)?,
                    w.linear(&format!("{p}.mlp.up_proj"), config.mlp_bias)?,
                ],
            };
            let mut norm = |name: &str| w.tensor(&format!("{p}.{name}.weight"));
            let input_layernorm = norm(norms.attention_input)?;
            let mlp_layernorm = norm(norms.mlp_input)?;
            let output_norms = match norms.outputs {
                Some((attn, mlp)) => Some((norm(attn)?, norm(mlp)?)),
                None => None,
            };
            layers.push(Block {
                input_layernorm,
                self_attn: Attention {
                    q_proj,
                    k_proj,
                    v_proj,
                    o_proj: w.linear(&format!("{p}.self_attn.o_proj"), config.o_bias)?,
                    qk_norm: match config.qk_norm {
                        true => Some((
                            w.tensor(&format!("{p}.self_attn.q_norm.weight"))?,
                            w.tensor(&format!("{p}.self_attn.k_norm.weight"))?,
                        )),
                        false => None,
                    },
                },
                mlp_layernorm,
                mlp: Mlp { gate_proj, up_proj, down_proj: w.linear(&format!("{p}.mlp.down_proj"), config.mlp_bias)? },
                output_norms,
            });
        }
        let embed_tokens = w.table("model.embed_tokens.weight")?;
        let norm = w.tensor("model.norm.weight")?;
        let lm_head = if config.num_labels.is_none() && has_lm_head { Some(w.table("lm_head.weight")?) } else { None };
        let score = if config.num_labels.is_some() { Some(w.tensor("score.weight")?) } else { None };
        let rope = Rope::new(&config);
        let local_rope = Rope::local(&config);
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            score,
            device: device.clone(),
            dtype,
            rope,
            local_rope,
            kernels: Kernels::default(),
            matmul_precision: None,
            rounding_anchors: None,
            checkpoint_grads: None,
        })
    }

    /// Hidden states after the final norm, `[B, T, hidden]`, for token ids `[B, T]` (u32).
    /// With a cache, the new positions are appended after the cached ones.
    pub fn forward_hidden(&self, ids: &Tensor, opts: ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        if let Some(view) = self.rounded_view()? {
            return view.forward_hidden(ids, opts, cache);
        }
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        let default_positions;
        let positions = match opts.positions {
            Some(p) => p,
            None => {
                default_positions = Tensor::arange(past as u32, (past + t) as u32, ids.device())?
                    .unsqueeze(0)?
                    .broadcast_as((b, t))?
                    .contiguous()?;
                &default_positions
            }
        };
        let rope = self.rope_tables(positions)?;
        let mut x = match &self.embed_tokens {
            ProjectionWeight::Dense(table) => table.embedding_rows(ids)?,
            ProjectionWeight::Packed(table) => {
                let (b, t) = ids.dims2()?;
                let rows = table.embedding(&ids.flatten_all()?.to_vec1::<u32>()?, &self.device)?;
                rows.to_dtype(self.dtype)?.reshape((b, t, self.config.hidden_size))?
            }
        };
        if self.config.scale_embeddings {
            // transformers multiplies by √hidden rounded to the embedding dtype.
            x = (x * (self.config.hidden_size as f64).sqrt())?;
        }
        if cache.is_some() {
            x = self.plain_blocks(x, &rope, opts.attention_mask, cache)?;
            return rms_norm(&x, &self.norm, &self.config, false);
        }
        let ctx = self.block_context(ids, rope, opts.attention_mask)?;
        let mut x = self.checkpoint_input(x)?;
        let checkpointer = self.checkpointer(&x);
        for i in 0..self.layers.len() {
            x = match &checkpointer {
                None => self.block(i, &x, &ctx)?,
                Some(c) => c.block(i, &x, &ctx)?,
            };
        }
        rms_norm(&x, &self.norm, &self.config, matches!(ctx, BlockContext::Fused { .. }))
    }

    /// The RoPE tables of one forward pass over `positions` `[B, T]`.
    fn rope_tables(&self, positions: &Tensor) -> Result<RopeTables> {
        let dtype = self.dtype();
        Ok(RopeTables {
            global: self.rope.tables(positions, dtype)?,
            local: self.local_rope.as_ref().map(|r| r.tables(positions, dtype)).transpose()?,
        })
    }

    /// What every block of a forward over `ids` without a cache shares: the RoPE tables and who
    /// attends to whom, in the form the chosen kernels take.
    fn block_context(&self, ids: &Tensor, rope: RopeTables, attention_mask: Option<&Tensor>) -> Result<BlockContext> {
        let (b, t) = ids.dims2()?;
        let device = ids.device();
        let window = self.config.sliding_window;
        Ok(if self.fused() {
            BlockContext::Fused {
                rope,
                full: AttentionPattern::new(attention_mask, b, t, None)?,
                sliding: window.map(|w| AttentionPattern::new(attention_mask, b, t, Some(w))).transpose()?,
            }
        } else {
            BlockContext::Plain {
                rope,
                full: ops::attention_mask(attention_mask, b, t, 0, None, device)?,
                sliding: window.map(|w| ops::attention_mask(attention_mask, b, t, 0, Some(w), device)).transpose()?,
            }
        })
    }

    /// Decoder block `i` without a cache, with the kernels `ctx` was made for.
    pub(super) fn block(&self, i: usize, x: &Tensor, ctx: &BlockContext) -> Result<Tensor> {
        let sliding_layer = self.config.is_sliding(i);
        match ctx {
            BlockContext::Fused { rope, full, sliding } => {
                let pattern = match sliding {
                    Some(p) if sliding_layer => p,
                    _ => full,
                };
                self.fused_block(i, x, rope.of(sliding_layer), pattern)
            }
            BlockContext::Plain { rope, full, sliding } => {
                let mask = match sliding {
                    Some(m) if sliding_layer => m,
                    _ => full,
                };
                self.plain_block(i, x, rope.of(sliding_layer), mask, None)
            }
        }
    }

    /// Queries and keys `[B, T, heads, D]` after the per-head norms, RoPE and the attention
    /// scale's correction (when `query_pre_attn_scalar` is not `head_dim`, the queries carry
    /// the difference, since the attention kernels scale by 1/√head_dim).
    fn position_queries_keys(
        &self,
        a: &Attention,
        (q, k): (Tensor, Tensor),
        (cos, sin): (&Tensor, &Tensor),
        fused_kernels: bool,
    ) -> Result<(Tensor, Tensor)> {
        let cfg = &self.config;
        let (q, k) = a.norm_heads(q, k, cfg, fused_kernels)?;
        // The plain kernels rotate `[B, heads, T, D]`.
        let layout = |x: Tensor| if fused_kernels { Ok(x) } else { x.transpose(1, 2) };
        let q = self.rope.rotate(&layout(q)?, cos, sin, fused_kernels)?;
        let k = self.rope.rotate(&layout(k)?, cos, sin, fused_kernels)?;
        match cfg.query_pre_attn_scalar {
            Some(s) if s != cfg.head_dim as f64 => Ok(((q * (cfg.head_dim as f64 / s).sqrt())?, k)),
            _ => Ok((q, k)),
        }
    }

    /// Decoder block `i` with the fused kernels (no cache): q/k/v stay `[B, T, heads, D]`.
    fn fused_block(
        &self,
        i: usize,
        x: &Tensor,
        tables: (&Tensor, &Tensor),
        pattern: &AttentionPattern,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let layer = &self.layers[i];
        let a = &layer.self_attn;
        layer.forward(x, cfg, true, |normed| {
            let [q, k, v] = Linear::forward_group(normed, [&a.q_proj, &a.k_proj, &a.v_proj])?;
            let qk = (q.reshape((b, t, h, hd))?, k.reshape((b, t, kv, hd))?);
            let (q, k) = self.position_queries_keys(a, qk, tables, true)?;
            let attn = fused::attention(&q, &k, &v.reshape((b, t, kv, hd))?, pattern.clone(), cfg.kv_groups())?;
            a.o_proj.forward(&attn.reshape((b, t, h * hd))?)
        })
    }

    /// Every decoder block with the plain ops, appending to the cache.
    fn plain_blocks(
        &self,
        mut x: Tensor,
        rope: &RopeTables,
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
            let sliding_layer = self.config.is_sliding(i);
            let mask = match &sliding_mask {
                Some(m) if sliding_layer => m,
                _ => &full_mask,
            };
            x = self.plain_block(i, &x, rope.of(sliding_layer), mask, cache.as_deref_mut())?;
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
        x: &Tensor,
        tables: (&Tensor, &Tensor),
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, t, _) = x.dims3()?;
        let (h, kv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let layer = &self.layers[i];
        let a = &layer.self_attn;
        layer.forward(x, cfg, false, |normed| {
            let [q, k, v] = Linear::forward_group(normed, [&a.q_proj, &a.k_proj, &a.v_proj])?;
            let qk = (q.reshape((b, t, h, hd))?, k.reshape((b, t, kv, hd))?);
            // [B, heads, T, D] from here on
            let (q, k) = self.position_queries_keys(a, qk, tables, false)?;
            let v = v.reshape((b, t, kv, hd))?.transpose(1, 2)?;
            let (k, v) = match cache {
                Some(c) => c.append(i, &k, &v)?,
                None => (k, v),
            };
            let attn = ops::attention(&q, &k, &v, mask, cfg.kv_groups())?; // [B, H, T, D]
            a.o_proj.forward(&attn.transpose(1, 2)?.reshape((b, t, h * hd))?)
        })
    }

    /// Next-token logits `[B, T, V]` at every position.
    pub fn forward(&self, ids: &Tensor, opts: ForwardOptions, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, opts, cache)?;
        self.lm_logits(&hidden)
    }

    /// Project hidden states `[B, T, hidden]` to vocabulary logits `[B, T, V]`.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens).linear(hidden)
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
        let (hidden, head) = self.lm_head_operands(hidden)?;
        if self.kernels == Kernels::Fused && fused::supports(&[&hidden]) {
            match &head {
                ProjectionWeight::Dense(w) if fused::supports(&[w]) => {
                    return fused::lm_head_logps(&hidden, w, targets)
                }
                ProjectionWeight::Packed(p) => return fused::packed_lm_head_logps(&hidden, p, targets),
                ProjectionWeight::Dense(_) => {}
            }
        }
        let n = targets.len();
        let logits = head.linear(&hidden.unsqueeze(0)?)?;
        ops::gather_token_logps(&logits, &Tensor::from_slice(targets, (1, n), hidden.device())?)?.squeeze(0)
    }

    /// The resolved configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Dtype of the activations and of the dense weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Which kernels the forward pass uses (fused by default).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Choose the kernels of later forward passes.
    pub fn set_kernels(&mut self, kernels: Kernels) {
        self.kernels = kernels;
    }

    /// Whether a forward pass without a KV cache takes the fused kernels.
    fn fused(&self) -> bool {
        self.kernels == Kernels::Fused && self.dtype == DType::F32 && self.device.is_cpu()
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

    /// Visit every weight held as a tensor with its transformers name, mutably (conversion, LoRA,
    /// trainability): all but packed projections. A tied output projection is visited once, as
    /// `model.embed_tokens.weight`.
    pub fn visit_weights_mut(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        if let ProjectionWeight::Dense(table) = &mut self.embed_tokens {
            f("model.embed_tokens.weight", table)?;
        }
        self.visit_linears_mut(&mut |module, _, lin| {
            if let ProjectionWeight::Dense(w) = &mut lin.weight {
                f(&format!("{module}.weight"), w)?;
            }
            if let Some(b) = lin.bias.as_mut() {
                f(&format!("{module}.bias"), b)?;
            }
            Ok(())
        })?;
        let norms = self.config.block_norm_names();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            f(&format!("model.layers.{i}.{}.weight", norms.attention_input), &mut layer.input_layernorm)?;
            f(&format!("model.layers.{i}.{}.weight", norms.mlp_input), &mut layer.mlp_layernorm)?;
            if let (Some((attn, mlp)), Some((after_attn, after_mlp))) = (norms.outputs, layer.output_norms.as_mut()) {
                f(&format!("model.layers.{i}.{attn}.weight"), after_attn)?;
                f(&format!("model.layers.{i}.{mlp}.weight"), after_mlp)?;
            }
            if let Some((q, k)) = layer.self_attn.qk_norm.as_mut() {
                f(&format!("model.layers.{i}.self_attn.q_norm.weight"), q)?;
                f(&format!("model.layers.{i}.self_attn.k_norm.weight"), k)?;
            }
        }
        f("model.norm.weight", &mut self.norm)?;
        if let Some(ProjectionWeight::Dense(w)) = self.lm_head.as_mut() {
            f("lm_head.weight", w)?;
        }
        if let Some(w) = self.score.as_mut() {
            f("score.weight", w)?;
        }
        Ok(())
    }

    /// Every weight with its transformers name, in checkpoint order; packed projections
    /// dequantized to the model's dtype (a full-size copy: export).
    pub fn named_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut copy = self.clone();
        copy.unpack()?;
        Ok(copy.tensor_weights())
    }

    /// Replace every packed weight by its dequantized tensor in the model's dtype.
    pub fn unpack(&mut self) -> Result<()> {
        let (dtype, device) = (self.dtype(), self.device().clone());
        self.visit_projection_weights_mut(&mut |w| {
            if let ProjectionWeight::Packed(_) = w {
                *w = ProjectionWeight::Dense(w.to_dense(dtype, &device)?);
            }
            Ok(())
        })
    }

    /// Visit the weights that may be packed: the embedding table, the untied LM head and every
    /// projection.
    fn visit_projection_weights_mut(&mut self, f: &mut dyn FnMut(&mut ProjectionWeight) -> Result<()>) -> Result<()> {
        f(&mut self.embed_tokens)?;
        if let Some(head) = self.lm_head.as_mut() {
            f(head)?;
        }
        self.visit_linears_mut(&mut |_, _, lin| f(&mut lin.weight))
    }

    /// The number of parameters, packed ones included.
    pub fn parameter_count(&self) -> usize {
        let packed: usize = self.packed_weights().iter().map(|p| p.dims().0 * p.dims().1).sum();
        packed + self.tensor_weights().iter().map(|(_, t)| t.elem_count()).sum::<usize>()
    }

    /// Bytes of the packed projections (0 when none is packed).
    pub fn packed_bytes(&self) -> usize {
        self.packed_weights().iter().map(|p| p.storage_bytes()).sum()
    }

    /// Every projection's transformers module name and `[out, in]` shape, packed or not.
    pub(super) fn projection_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut copy = self.clone();
        copy.visit_linears_mut(&mut |module, _, lin| {
            let (o, i) = lin.weight.dims2()?;
            out.push((module.to_string(), vec![o, i]));
            Ok(())
        })
        .expect("collecting cannot fail");
        out
    }

    /// The packed weights.
    fn packed_weights(&self) -> Vec<Arc<PackedWeight>> {
        let mut out = Vec::new();
        let mut copy = self.clone();
        copy.visit_projection_weights_mut(&mut |w| {
            if let ProjectionWeight::Packed(p) = w {
                out.push(p.clone());
            }
            Ok(())
        })
        .expect("collecting cannot fail");
        out
    }

    /// The weights held as tensors (all but packed ones) with their transformers names.
    pub(super) fn tensor_weights(&self) -> Vec<(String, Tensor)> {
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
    /// these after a forward pass and `loss.backward()`. Packed projections cannot train: a
    /// model that has them is refused (train adapters on them instead).
    pub fn make_trainable(&mut self) -> Result<Vec<(String, Var)>> {
        if self.packed_bytes() > 0 {
            candle::bail!(
                "full-weight training needs every weight dense, but this model keeps its projections packed (frozen); train LoRA adapters over them, or load it without `--base-quant`"
            );
        }
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

    /// The same weights outside autograd, adapters' dropout seeds kept (a checkpointed block's
    /// forward must match its recomputation).
    pub(super) fn detached(&self) -> Self {
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

    /// A fresh, empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config.num_hidden_layers)
    }
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

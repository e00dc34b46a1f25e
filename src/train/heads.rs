//! Tensors trained beside the policy: PPO's value head, SPO's degree classifiers and DAC-KL's
//! clipping network. They are optimizer variables of the run, checkpointed in [`HEADS_FILE`]
//! and never part of the exported model.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle::{Tensor, Var};
use candor_alignment::Objective;
use rand::SeedableRng;

/// The heads `objective` trains, as named optimizer variables: restored from the checkpoint in
/// `resume` (which must hold every one), else freshly initialised from `seed`.
pub fn start(
    objective: &Objective,
    hidden: usize,
    seed: u64,
    device: &candle::Device,
    resume: Option<&Path>,
) -> Result<Vec<(String, Var)>> {
    let fresh = fresh(objective, hidden, seed, device)?;
    let mut saved = match resume {
        Some(dir) if !fresh.is_empty() => load(dir, device)?,
        _ => HashMap::new(),
    };
    let mut heads = Vec::with_capacity(fresh.len());
    for (name, init) in fresh {
        let value = match saved.remove(&name) {
            Some(t) => t,
            None if resume.is_some() => bail!("the checkpoint lacks `{name}` in `{HEADS_FILE}`"),
            None => init,
        };
        heads.push((name, Var::from_tensor(&value)?));
    }
    Ok(heads)
}

/// Learning-rate multipliers of heads that do not train at the policy's rate.
pub fn lr_scales(objective: &Objective) -> Vec<(&'static str, f64)> {
    objective.degree_heads().map(|spec| (DEGREE_HEADS, spec.lr_multiplier)).into_iter().collect()
}

/// The value head `(weight [1, H], bias [1])` applied to hidden states `[N, H]`: `[N]`.
pub fn values_of(hidden: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(hidden.matmul(&weight.t()?)?.squeeze(1)?.broadcast_add(bias)?)
}

/// The optimizer's (and checkpoints') name of SPO's degree heads.
pub const DEGREE_HEADS: &str = "spo.degree_heads";
/// The value head's weight and bias (TRL's `AutoModelForCausalLMWithValueHead` names).
pub const VALUE_HEAD: [&str; 2] = ["v_head.summary.weight", "v_head.summary.bias"];
/// The file extra heads are checkpointed in (not part of the exported model).
pub const HEADS_FILE: &str = "heads.safetensors";

/// Fresh extra heads for `objective`, seeded by the run seed: SPO's `[heads, classes, hidden]`
/// classifiers from N(0, 0.02²) (transformers' initialisation of a new head); PPO's value head
/// `Linear(hidden, 1)` from U(−1/√hidden, 1/√hidden) (PyTorch's default, as TRL leaves it).
fn fresh(objective: &Objective, hidden: usize, seed: u64, device: &candle::Device) -> Result<Vec<(String, Tensor)>> {
    use rand_distr::Distribution;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5350_4f48);
    let mut heads = Vec::new();
    if let Some(spec) = objective.degree_heads() {
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid normal");
        let values: Vec<f32> = (0..spec.heads * spec.classes * hidden).map(|_| normal.sample(&mut rng)).collect();
        heads.push((DEGREE_HEADS.to_string(), Tensor::from_vec(values, (spec.heads, spec.classes, hidden), device)?));
    }
    if let Some(shapes) = objective.clip_net() {
        // DAC-KL's clipping network: small weights, the lower bound starting at half its range
        // and the upper one near 1 (everything but the tail kept).
        let normal = rand_distr::Normal::new(0f32, 0.02).expect("valid normal");
        for (i, (name, shape)) in shapes.into_iter().enumerate() {
            let n: usize = shape.iter().product();
            // In order: w1, b1, w2, b2.
            let values: Vec<f32> = match i {
                1 => vec![0.0; n],
                3 => vec![0.0, 4.0],
                _ => (0..n).map(|_| normal.sample(&mut rng)).collect(),
            };
            heads.push((name.to_string(), Tensor::from_vec(values, shape, device)?));
        }
    }
    if objective.needs_value_head() {
        let bound = 1.0 / (hidden as f32).sqrt();
        let uniform = rand_distr::Uniform::new(-bound, bound).expect("valid range");
        let weight: Vec<f32> = (0..hidden).map(|_| uniform.sample(&mut rng)).collect();
        heads.push((VALUE_HEAD[0].to_string(), Tensor::from_vec(weight, (1, hidden), device)?));
        heads.push((VALUE_HEAD[1].to_string(), Tensor::new(&[uniform.sample(&mut rng)], device)?));
    }
    Ok(heads)
}

fn load(dir: &Path, device: &candle::Device) -> Result<HashMap<String, Tensor>> {
    let path = dir.join(HEADS_FILE);
    candle::safetensors::load(&path, device)
        .with_context(|| format!("cannot read the extra heads `{}`", path.display()))
}

//! Published models' shapes with random weights (`candor bench --shape NAME`): memory and speed
//! at the scale people align, without downloading the weights. Each shape is the model's
//! `config.json` numbers, shipped in `configs/shapes/` and built into the binary.

use anyhow::{anyhow, bail, Context, Result};
use candle::quantized::GgmlDType;
use candle::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::model::packed::{fitting_kind, PackedWeight};
use crate::model::{CausalLm, ModelConfig, Packing, WeightSource};

/// The shipped shapes: name and `config.json` text.
pub const SHAPES: [(&str, &str); 5] = [
    ("qwen2.5-0.5b", include_str!("../../configs/shapes/qwen2.5-0.5b.json")),
    ("qwen2.5-1.5b", include_str!("../../configs/shapes/qwen2.5-1.5b.json")),
    ("llama-3.2-1b", include_str!("../../configs/shapes/llama-3.2-1b.json")),
    ("llama-3.2-3b", include_str!("../../configs/shapes/llama-3.2-3b.json")),
    ("llama-3.1-8b", include_str!("../../configs/shapes/llama-3.1-8b.json")),
];

/// The configuration of shape `name`, or an error listing the shapes.
pub fn shape_config(name: &str) -> Result<ModelConfig> {
    let Some((_, text)) = SHAPES.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = SHAPES.iter().map(|(n, _)| *n).collect();
        bail!("unknown shape `{name}`: expected one of {}", names.join(", "));
    };
    let config = ModelConfig::from_hf_json(text).map_err(|e| anyhow!("configs/shapes/{name}.json: {e}"))?;
    config.validate().map_err(|e| anyhow!("configs/shapes/{name}.json: {e}"))?;
    Ok(config)
}

/// A model of shape `name` with random weights (seeded), its projections kept as `packing`
/// says: quantized weights are drawn and quantized a row at a time, so no f32 copy of a packed
/// weight ever exists.
pub fn random_model(name: &str, packing: Packing, seed: u64) -> Result<CausalLm> {
    let config = shape_config(name)?;
    let mut source = RandomWeights { shapes: expected_shapes(&config), seed };
    CausalLm::new_packed(config, &mut source, DType::F32, &Device::Cpu, packing)
        .with_context(|| format!("cannot build shape `{name}`"))
}

/// Every tensor the configuration implies, by name, with its shape.
fn expected_shapes(config: &ModelConfig) -> std::collections::HashMap<String, Vec<usize>> {
    (0..config.num_hidden_layers)
        .flat_map(|i| config.expected_layer_tensors(i))
        .chain(config.expected_outer_tensors(!config.tie_word_embeddings))
        .map(|t| (t.name.clone(), t.shape()))
        .collect()
}

/// Weights as transformers initialises them: norms 1, everything else uniform with the
/// standard deviation of `initializer_range` (0.02), each row from its own seeded stream.
struct RandomWeights {
    shapes: std::collections::HashMap<String, Vec<usize>>,
    seed: u64,
}

impl RandomWeights {
    fn dims(&self, name: &str) -> candle::Result<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice).ok_or_else(|| candle::Error::Msg(format!("shape has no `{name}`")))
    }

    /// Row `r` of tensor `name` into `row`.
    fn fill(&self, name: &str, r: usize, row: &mut [f32]) {
        if name.ends_with("norm.weight") {
            return row.fill(1.0);
        }
        let stream = name.bytes().fold(self.seed ^ 0x9E37_79B9_7F4A_7C15, |h, b| h.rotate_left(5) ^ u64::from(b));
        let mut rng = rand::rngs::StdRng::seed_from_u64(stream.wrapping_add(r as u64));
        let bound = 0.02 * 3f32.sqrt();
        row.iter_mut().for_each(|v| *v = rng.random_range(-bound..bound));
    }
}

impl WeightSource for RandomWeights {
    fn get(&mut self, name: &str) -> candle::Result<Tensor> {
        let dims = self.dims(name)?.to_vec();
        let width = *dims.last().unwrap_or(&1);
        let rows = dims.iter().product::<usize>() / width.max(1);
        let mut values = vec![0f32; rows * width];
        values.chunks_mut(width.max(1)).enumerate().for_each(|(r, row)| self.fill(name, r, row));
        Tensor::from_vec(values, dims, &Device::Cpu)
    }

    fn contains(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }

    /// Nothing is stored: a packed weight is drawn directly in the blocks asked for.
    fn packed(&mut self, name: &str, kind: Option<GgmlDType>) -> candle::Result<Option<PackedWeight>> {
        let (Some(kind), &[out, inp]) = (kind, self.dims(name)?) else {
            return Ok(None);
        };
        PackedWeight::from_rows(out, inp, fitting_kind(kind, inp), |r, row| self.fill(name, r, row)).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped shape parses, and its parameter count is the published one (Qwen2.5
    /// 0.49B / 1.54B, Llama 3.2 1.24B / 3.21B, Llama 3.1 8.03B).
    #[test]
    fn shapes_have_their_published_parameter_counts() {
        for (name, billions) in [
            ("qwen2.5-0.5b", 0.494),
            ("qwen2.5-1.5b", 1.544),
            ("llama-3.2-1b", 1.236),
            ("llama-3.2-3b", 3.213),
            ("llama-3.1-8b", 8.030),
        ] {
            let config = shape_config(name).unwrap();
            let count: usize = expected_shapes(&config).values().map(|d| d.iter().product::<usize>()).sum();
            assert!((count as f64 / 1e9 - billions).abs() < 0.001, "{name}: {count} parameters");
        }
        assert!(shape_config("llama-7b").unwrap_err().to_string().contains("qwen2.5-0.5b, qwen2.5-1.5b"));
    }

    /// A packed weight drawn for a shape is exactly the dense draw, quantized.
    #[test]
    fn drawn_packed_weights_equal_the_quantized_dense_draw() {
        let mut source = RandomWeights { shapes: [("w".to_string(), vec![3, 256])].into(), seed: 5 };
        let dense = source.get("w").unwrap();
        let packed = source.packed("w", Some(GgmlDType::Q8_0)).unwrap().unwrap();
        let expected = PackedWeight::quantize(&dense, GgmlDType::Q8_0).unwrap().dequantize(&Device::Cpu).unwrap();
        assert_eq!(
            packed.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap(),
            expected.to_vec2::<f32>().unwrap()
        );
        assert!(source.packed("w", None).unwrap().is_none());
    }
}

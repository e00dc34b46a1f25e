//! Numerically stable kernels shared by the objectives.

use candle::{Result, Tensor, D};

/// `softplus(z) = max(z, 0) + log1p(exp(-|z|))`, stable for large |z|.
pub fn softplus(z: &Tensor) -> Result<Tensor> {
    let relu = z.relu()?;
    let tail = (z.abs()?.neg()?.exp()? + 1.0)?.log()?;
    relu + tail
}

/// `log(sigmoid(z)) = -softplus(-z)`; never computed as `log(sigmoid(z))`.
pub fn log_sigmoid(z: &Tensor) -> Result<Tensor> {
    softplus(&z.neg()?)?.neg()
}

/// `sigmoid(z) = exp(log_sigmoid(z))`, stable for large |z|.
pub fn sigmoid(z: &Tensor) -> Result<Tensor> {
    log_sigmoid(z)?.exp()
}

/// `log(1 − exp(x))` for `x < 0`, stable at both ends (Mächler 2012, as TRL's ORPO branches at
/// −ln 2): `log(1 − eˣ)` below −ln 2, `log(−expm1(x))` above, with `expm1(x) = 2t / (1 − t)`,
/// `t = tanh(x/2)`, which keeps full precision as x → 0. Each branch only sees inputs on its side,
/// so neither produces an infinity whose zero gradient would turn into NaN.
pub fn log1mexp(x: &Tensor) -> Result<Tensor> {
    let cut = -std::f64::consts::LN_2;
    let far = x.minimum(cut)?;
    let far = (far.exp()?.neg()? + 1.0)?.log()?;
    let t = (x.maximum(cut)? * 0.5)?.tanh()?;
    let near = ((t.neg()? * 2.0)? / (t.neg()? + 1.0)?)?.log()?;
    x.lt(cut)?.where_cond(&far, &near)
}

/// `log_softmax` over the last dimension (max-shifted), from differentiable candle ops.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle::Device;

    #[test]
    fn log_sigmoid_is_stable_and_exact() {
        let z = Tensor::new(&[0f32, 2.0, -2.0, 100.0, -100.0], &Device::Cpu).unwrap();
        let v: Vec<f32> = log_sigmoid(&z).unwrap().to_vec1().unwrap();
        // ln 0.5; ln σ(2) = -0.126928; ln σ(-2) = -2.126928; ≈0; -100
        let expect = [-std::f32::consts::LN_2, -0.126_928, -2.126_928, 0.0, -100.0];
        for (a, b) in v.iter().zip(expect) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn log1mexp_keeps_precision_near_zero_and_far_away() {
        let xs = [-1e-6f32, -0.01, -0.5, -0.7, -1.0, -20.0];
        let v: Vec<f32> = log1mexp(&Tensor::new(&xs, &Device::Cpu).unwrap()).unwrap().to_vec1().unwrap();
        for (got, x) in v.iter().zip(xs) {
            let want = (-(x as f64).exp_m1()).ln();
            assert!((*got as f64 - want).abs() <= 2e-6 * want.abs().max(1.0), "{x}: {got} vs {want}");
        }
    }
}

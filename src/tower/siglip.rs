//! SigLIP's sigmoid image–text loss (Zhai et al. 2023, "Sigmoid Loss for Language Image
//! Pre-Training", Algorithm 1): every image–text pair of a batch is a binary classification,
//! positive on the diagonal,
//!
//! L = −1/n Σᵢⱼ log σ(zᵢⱼ (e^{t′} xᵢ·yⱼ + b)),  zᵢⱼ = 1 if i = j else −1,
//!
//! with xᵢ, yⱼ the L2-normalised image and text embeddings, t′ the learnt log-scale and b the
//! learnt bias.

use anyhow::Result;
use candle_core::{Device, Tensor};

/// The logits `e^{t′} X Yᵀ + b` `[n, n]` of normalised embeddings `x`, `y` `[n, d]`;
/// `log_scale` and `bias` are scalars.
pub fn pair_logits(x: &Tensor, y: &Tensor, log_scale: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&y.t()?)?
        .broadcast_mul(&log_scale.exp()?)?
        .broadcast_add(bias)?)
}

/// The sigmoid loss (a scalar) of the pair logits `[n, n]`.
pub fn sigmoid_loss(logits: &Tensor) -> Result<Tensor> {
    let n = logits.dim(0)?;
    let labels = signed_identity(n, logits.device())?;
    let m = (logits * labels)?;
    // −log σ(m) = softplus(−m) = max(−m, 0) + log(1 + e^{−|m|}), stable for any m.
    let softplus = (m.neg()?.relu()? + (m.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok((softplus.sum_all()? / n as f64)?)
}

/// `2 I − 1`: +1 on the diagonal, −1 elsewhere.
fn signed_identity(n: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..n * n)
        .map(|k| if k / n == k % n { 1.0 } else { -1.0 })
        .collect();
    Ok(Tensor::from_vec(data, (n, n), device)?)
}

/// L2-normalises the rows of `x` `[n, d]`.
pub fn normalise_rows(x: &Tensor) -> Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(1)? + 1e-12)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/siglip/siglip_loss.json"
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn matrix(v: &serde_json::Value) -> Tensor {
        let rows: Vec<Vec<f32>> = serde_json::from_value(v.clone()).unwrap();
        let (n, d) = (rows.len(), rows[0].len());
        Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.max(1e-6)
    }

    #[test]
    fn loss_and_gradients_equal_the_numpy_reference() {
        for (i, case) in fixture()["cases"].as_array().unwrap().iter().enumerate() {
            let x = Var::from_tensor(&matrix(&case["x"])).unwrap();
            let y = Var::from_tensor(&matrix(&case["y"])).unwrap();
            let t = Var::new(case["t_prime"].as_f64().unwrap() as f32, &Device::Cpu).unwrap();
            let b = Var::new(case["bias"].as_f64().unwrap() as f32, &Device::Cpu).unwrap();
            let logits = pair_logits(&x, &y, &t, &b).unwrap();
            let loss = sigmoid_loss(&logits).unwrap();
            let expected = case["loss"].as_f64().unwrap() as f32;
            let got = loss.to_scalar::<f32>().unwrap();
            assert!(
                (got - expected).abs() <= 1e-5 * expected.abs().max(1.0),
                "case {i}: loss {got} vs {expected}"
            );
            let grads = loss.backward().unwrap();
            for (name, var, reference) in [("x", &x, "grad_x"), ("y", &y, "grad_y")] {
                let g = grads.get(var).unwrap();
                let diff = max_rel_diff(g, &matrix(&case[reference]));
                assert!(diff < 1e-4, "case {i}: d loss / d {name}: rel diff {diff}");
            }
            for (name, var, reference) in [("t'", &t, "grad_t_prime"), ("b", &b, "grad_bias")] {
                let g = grads.get(var).unwrap().to_scalar::<f32>().unwrap();
                let r = case[reference].as_f64().unwrap() as f32;
                assert!(
                    (g - r).abs() <= 1e-4 * r.abs().max(1e-3),
                    "case {i}: d loss / d {name}: {g} vs {r}"
                );
            }
        }
    }

    #[test]
    fn extreme_logits_stay_finite() {
        let logits = Tensor::new(&[[200f32, -200.0], [-200.0, 200.0]], &Device::Cpu).unwrap();
        let loss = sigmoid_loss(&logits).unwrap().to_scalar::<f32>().unwrap();
        assert!(loss.is_finite() && loss < 1e-6, "{loss}");
        let wrong = Tensor::new(&[[-200f32, 200.0], [200.0, -200.0]], &Device::Cpu).unwrap();
        let loss = sigmoid_loss(&wrong).unwrap().to_scalar::<f32>().unwrap();
        assert!((loss - 400.0).abs() < 1e-3, "{loss}");
    }

    #[test]
    fn rows_are_normalised() {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, -2.0]], &Device::Cpu).unwrap();
        let n = normalise_rows(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0.0, -1.0]]);
    }
}

//! Numerically stable log-probability helpers built from primitive ops (candle's fused softmax
//! kernels drop gradients, see `shared/notes/candle.md`).

use candle_core::{DType, Result, Tensor, D};

/// The float type a loss is computed in: f64 stays f64 (gradient checks), everything else
/// (f32, f16, bf16 logits) is widened to f32.
pub fn compute_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `log_softmax` over the last dimension. The row maximum is detached: the result does not
/// depend on the shift, so its gradient through the shift is exactly zero.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let log_sum = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&log_sum)
}

/// `log(wa·exp(la) + wb·exp(lb))` element-wise, for weights in (0, 1): the log of a mixture of
/// two distributions given as log-probabilities, without leaving log space.
pub fn log_mixture(la: &Tensor, wa: f64, lb: &Tensor, wb: f64) -> Result<Tensor> {
    let a = la.affine(1.0, wa.ln())?;
    let b = lb.affine(1.0, wb.ln())?;
    // Detached shift, as in `log_softmax`.
    let max = a.maximum(&b)?.detach();
    let sum = a.sub(&max)?.exp()?.add(&b.sub(&max)?.exp()?)?;
    max.add(&sum.log()?)
}

/// Row-wise KL(a‖b) = Σ a·(log a − log b) from probabilities `a` and log-probabilities.
pub fn kl_rows(a: &Tensor, log_a: &Tensor, log_b: &Tensor) -> Result<Tensor> {
    a.mul(&log_a.sub(log_b)?)?.sum(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn log_softmax_is_stable_for_huge_logits() {
        let x = Tensor::new(
            &[[1000.0f32, 1001.0, 999.0], [-1e4, 0.0, -1e4]],
            &Device::Cpu,
        )
        .unwrap();
        let got = log_softmax(&x).unwrap().to_vec2::<f32>().unwrap();
        // log_softmax([0, 1, -1]) computed by hand.
        let z = (0f64.exp() + 1f64.exp() + (-1f64).exp()).ln();
        let want = [-z, 1.0 - z, -1.0 - z];
        for (g, w) in got[0].iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
        }
        assert!(got[1][1].abs() < 1e-6 && got[1][0] < -9999.0);
    }

    #[test]
    fn log_mixture_matches_direct_formula() {
        let la = Tensor::new(&[-0.1f64, -3.0, -50.0], &Device::Cpu).unwrap();
        let lb = Tensor::new(&[-2.0f64, -0.5, -49.0], &Device::Cpu).unwrap();
        let got = log_mixture(&la, 0.3, &lb, 0.7)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let a = la.to_vec1::<f64>().unwrap();
        let b = lb.to_vec1::<f64>().unwrap();
        for i in 0..3 {
            let want = (0.3 * a[i].exp() + 0.7 * b[i].exp()).ln();
            assert!((got[i] - want).abs() < 1e-12, "{} vs {want}", got[i]);
        }
    }
}

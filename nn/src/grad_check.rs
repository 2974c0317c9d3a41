//! Checks shared by every model's tests: each trainable parameter must receive a non-zero
//! gradient, analytic gradients must match finite differences, outputs must match references.

use candle_core::{backprop::GradStore, DType, Result, Tensor};

use crate::params::ParamStore;

/// The largest absolute difference of two tensors of one shape (compared in f64, so f64
/// references keep their precision).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Names of trainable parameters that got no gradient, or an all-zero one, from `loss`.
pub fn params_without_gradient(store: &ParamStore, loss: &Tensor) -> Result<Vec<String>> {
    let grads = loss.backward()?;
    params_without_gradient_in(store, &grads)
}

pub fn params_without_gradient_in(store: &ParamStore, grads: &GradStore) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for (name, var) in store.trainable_vars() {
        match grads.get(var.as_tensor()) {
            None => missing.push(format!("{name} (no gradient)")),
            Some(g) => {
                let max = g
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_dtype(DType::F32)?
                    .to_scalar::<f32>()?;
                if max.is_nan() || max <= 0.0 {
                    missing.push(format!("{name} (zero gradient)"));
                }
            }
        }
    }
    Ok(missing)
}

/// Central finite-difference gradient of the scalar `f` at `x` (f64 accumulation, f32 input).
pub fn finite_difference(
    f: impl Fn(&Tensor) -> Result<f64>,
    x: &Tensor,
    eps: f64,
) -> Result<Vec<f64>> {
    let values = x.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let mut grad = Vec::with_capacity(values.len());
    for i in 0..values.len() {
        let mut plus = values.clone();
        plus[i] += eps;
        let mut minus = values.clone();
        minus[i] -= eps;
        let at = |v: Vec<f64>| -> Result<f64> {
            f(&Tensor::from_vec(v, x.shape(), x.device())?.to_dtype(x.dtype())?)
        };
        grad.push((at(plus)? - at(minus)?) / (2.0 * eps));
    }
    Ok(grad)
}

/// The gradient of the scalar `f` at `x` twice: by backpropagation and by central finite
/// differences with step `eps` (both flattened, f64).
pub fn gradients(
    f: impl Fn(&Tensor) -> Result<Tensor>,
    x: &Tensor,
    eps: f64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let var = candle_core::Var::from_tensor(x)?;
    let grads = f(var.as_tensor())?.backward()?;
    let analytic = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        None => vec![0.0; x.elem_count()],
    };
    let numeric = finite_difference(|t| f(t)?.to_dtype(DType::F64)?.to_scalar::<f64>(), x, eps)?;
    Ok((analytic, numeric))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::activation::Activation;
    use crate::layers::{LayerNorm, Linear, RmsNorm};
    use crate::params::ParamBuilder;
    use candle_core::{Device, Var};

    fn check_against_fd(f: impl Fn(&Tensor) -> Result<Tensor>, x0: &Tensor) {
        let x = Var::from_tensor(&x0.to_dtype(DType::F64).unwrap()).unwrap();
        let y = f(x.as_tensor()).unwrap().sum_all().unwrap();
        let g = y.backward().unwrap();
        let analytic = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let fd = finite_difference(
            |t| f(t)?.sum_all()?.to_scalar::<f64>(),
            &x0.to_dtype(DType::F64).unwrap(),
            1e-5,
        )
        .unwrap();
        for (a, n) in analytic.iter().zip(fd.iter()) {
            assert!(
                (a - n).abs() < 1e-5 * (1.0 + n.abs()),
                "analytic {a} vs numeric {n}"
            );
        }
    }

    #[test]
    fn activations_match_finite_differences() {
        let x = Tensor::new(&[-2.0f64, -0.7, 0.0, 0.3, 1.5], &Device::Cpu).unwrap();
        for act in [
            Activation::Gelu,
            Activation::GeluPytorchTanh,
            Activation::QuickGelu,
            Activation::Silu,
        ] {
            // Weight each output differently so the check is not symmetric by accident.
            let w = Tensor::new(&[0.3f64, -1.1, 0.7, 2.0, -0.4], &Device::Cpu).unwrap();
            check_against_fd(|t| act.forward(t)?.mul(&w), &x);
        }
    }

    #[test]
    fn norms_match_finite_differences() {
        let store = ParamStore::new();
        let pb = ParamBuilder::fresh(&store, 1, &Device::Cpu);
        let ln = LayerNorm::new(&pb.pp("ln"), 4, 1e-5).unwrap();
        let rms = RmsNorm::new(&pb.pp("rms"), 4, 1e-6).unwrap();
        let x = Tensor::new(
            &[[0.5f64, -1.0, 2.0, 0.1], [1.0, 1.5, -0.3, 0.0]],
            &Device::Cpu,
        )
        .unwrap();
        let w = Tensor::new(
            &[[0.3f64, -1.1, 0.7, 2.0], [1.0, 0.2, -0.5, 0.9]],
            &Device::Cpu,
        )
        .unwrap();
        let ln64 = LayerNorm {
            weight: ln.weight.to_dtype(DType::F64).unwrap(),
            bias: ln.bias.to_dtype(DType::F64).unwrap(),
            eps: 1e-5,
        };
        let rms64 = RmsNorm {
            weight: rms.weight.to_dtype(DType::F64).unwrap(),
            eps: 1e-6,
        };
        // The f32 statistics path loses precision; compare the f64 path of the same formula.
        check_against_fd(|t| ln64.forward(t)?.to_dtype(DType::F64)?.mul(&w), &x);
        check_against_fd(|t| rms64.forward(t)?.to_dtype(DType::F64)?.mul(&w), &x);
    }

    #[test]
    fn every_layer_parameter_gets_a_gradient() {
        let store = ParamStore::new();
        let pb = ParamBuilder::fresh(&store, 2, &Device::Cpu);
        let lin = Linear::new(&pb.pp("lin"), 4, 3, true, 0.5).unwrap();
        let ln = LayerNorm::new(&pb.pp("ln"), 3, 1e-5).unwrap();
        let rms = RmsNorm::new(&pb.pp("rms"), 3, 1e-6).unwrap();
        let x = Tensor::new(
            &[[[0.5f32, -1.0, 2.0, 0.1], [1.0, 1.5, -0.3, 0.0]]],
            &Device::Cpu,
        )
        .unwrap();
        let y = rms
            .forward(&ln.forward(&lin.forward(&x).unwrap()).unwrap())
            .unwrap();
        let w = Tensor::new(&[[[0.3f32, -1.1, 0.7], [1.0, 0.2, -0.5]]], &Device::Cpu).unwrap();
        let loss = y.mul(&w).unwrap().sum_all().unwrap();
        assert_eq!(
            params_without_gradient(&store, &loss).unwrap(),
            Vec::<String>::new()
        );
    }
}

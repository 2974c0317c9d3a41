//! Gradient utilities between backward and the optimizer step: global-norm clipping and
//! accumulation over micro-batches.

use anyhow::{Context, Result};
use candle_core::{backprop::GradStore, DType, Tensor, Var};

/// The global L2 norm of the gradients of `vars` (parameters without a gradient count as 0).
/// Each parameter's sum of squares is its own candle reduction, run side by side on the pool;
/// they are added in parameter order, so the norm does not depend on the scheduling.
pub fn grad_global_norm(grads: &GradStore, vars: &[(String, Var)]) -> Result<f64> {
    use rayon::prelude::*;
    let squares = vars
        .par_iter()
        .map(|(name, var)| match grads.get(var.as_tensor()) {
            Some(g) => g
                .to_dtype(DType::F32)
                .and_then(|g| g.sqr()?.sum_all()?.to_scalar::<f32>())
                .with_context(|| format!("norm of the gradient of `{name}`")),
            None => Ok(0.0),
        })
        .collect::<Result<Vec<f32>>>()?;
    Ok(squares.iter().map(|&sq| sq as f64).sum::<f64>().sqrt())
}

/// Scales the gradients of `vars` so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` (factor `max_norm / (norm + 1e-6)` when it is below 1),
/// and returns the norm before clipping. A non-finite norm (overflow, NaN loss) leaves the
/// gradients untouched: the caller should skip the optimizer step.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let norm = grad_global_norm(grads, vars)?;
    let coef = max_norm / (norm + 1e-6);
    if norm.is_finite() && coef < 1.0 {
        for (name, var) in vars {
            if let Some(g) = grads.remove(var.as_tensor()) {
                let scaled = g
                    .affine(coef, 0.0)
                    .with_context(|| format!("clipping the gradient of `{name}`"))?;
                grads.insert(var.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Sums the gradients of a fixed set of parameters over micro-batches. Only the parameters'
/// gradients are kept (a `GradStore` from `backward` also holds every intermediate's); the sum
/// is formed when asked for, in one pass per parameter.
pub struct GradAccumulator {
    vars: Vec<(String, Var)>,
    /// Each parameter's gradients, one per micro-batch that gave it one, in order.
    parts: Vec<Vec<Tensor>>,
    micro_batches: usize,
}

impl GradAccumulator {
    pub fn new(vars: &[(String, Var)]) -> Self {
        Self {
            vars: vars.to_vec(),
            parts: vec![Vec::new(); vars.len()],
            micro_batches: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        self.add_scaled(grads, 1.0)
    }

    /// Adds `weight ×` one micro-batch's gradients (e.g. its share of the batch's tokens).
    pub fn add_scaled(&mut self, grads: &GradStore, weight: f64) -> Result<()> {
        for ((name, var), parts) in self.vars.iter().zip(self.parts.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = if weight == 1.0 {
                g.detach()
            } else {
                g.affine(weight, 0.0)
                    .with_context(|| format!("weighting the gradient of `{name}`"))?
                    .detach()
            };
            parts.push(g);
        }
        self.micro_batches += 1;
        Ok(())
    }

    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The summed gradients, keyed by the parameters (ready for `AdamW::step`).
    pub fn sum(&self) -> Result<GradStore> {
        self.scaled(1.0)
    }

    /// The gradients averaged over the micro-batches added so far (sum / k).
    pub fn mean(&self) -> Result<GradStore> {
        anyhow::ensure!(
            self.micro_batches > 0,
            "no micro-batch gradients were accumulated"
        );
        self.scaled(1.0 / self.micro_batches as f64)
    }

    /// Forgets everything accumulated (after an optimizer step).
    pub fn reset(&mut self) {
        self.parts.iter_mut().for_each(Vec::clear);
        self.micro_batches = 0;
    }

    fn scaled(&self, factor: f64) -> Result<GradStore> {
        let mut store = GradStore::default();
        for ((name, var), parts) in self.vars.iter().zip(&self.parts) {
            if parts.is_empty() {
                continue;
            }
            let g = sum_scaled(parts, factor)
                .with_context(|| format!("accumulating the gradient of `{name}`"))?;
            store.insert(var.as_tensor(), g);
        }
        Ok(store)
    }
}

/// (p₀ + p₁ + …)·factor, added left to right and scaled as candle's `add` and `affine` do
/// (f32 sums, then `x·factor + 0`): one parallel pass for contiguous f32 CPU gradients, the
/// tensor ops otherwise. Both give the same numbers.
fn sum_scaled(parts: &[Tensor], factor: f64) -> Result<Tensor> {
    if parts.len() == 1 && factor == 1.0 {
        return Ok(parts[0].clone());
    }
    let fused = parts.iter().all(|p| {
        p.dtype() == DType::F32
            && p.device().is_cpu()
            && p.is_contiguous()
            && p.dims() == parts[0].dims()
    });
    if !fused {
        let mut sum = parts[0].clone();
        for p in &parts[1..] {
            sum = sum.add(p)?;
        }
        return Ok(if factor == 1.0 {
            sum
        } else {
            sum.affine(factor, 0.0)?
        });
    }
    use rayon::prelude::*;
    let guards: Vec<_> = parts.iter().map(Tensor::storage_and_layout).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            candle_core::Storage::Cpu(cpu) => {
                mmkd_nn::fused::data::<f32>(cpu, layout, "gradient accumulation")
            }
            _ => candle_core::bail!("gradient accumulation: expected a CPU tensor"),
        })
        .collect::<candle_core::Result<Vec<&[f32]>>>()?;
    let (scale, scaled) = (factor as f32, factor != 1.0);
    const CHUNK: usize = 1 << 14;
    let mut out = slices[0].to_vec();
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, out)| {
            let span = chunk * CHUNK..chunk * CHUNK + out.len();
            for p in &slices[1..] {
                for (o, &x) in out.iter_mut().zip(&p[span.clone()]) {
                    *o += x;
                }
            }
            if scaled {
                for o in out.iter_mut() {
                    *o = *o * scale + 0.0;
                }
            }
        });
    Ok(Tensor::from_vec(out, parts[0].shape(), parts[0].device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn setup() -> (Vec<(String, Var)>, Tensor) {
        let a = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[[3.0f32]], &Device::Cpu).unwrap();
        // loss = 3·Σa + 4·Σb → ∇a = (3, 3), ∇b = (4): global norm √(9 + 9 + 16) = √34.
        let loss = a
            .as_tensor()
            .sum_all()
            .unwrap()
            .affine(3.0, 0.0)
            .unwrap()
            .add(&b.as_tensor().sum_all().unwrap().affine(4.0, 0.0).unwrap())
            .unwrap();
        (vec![("a".into(), a), ("b".into(), b)], loss)
    }

    fn grad(grads: &GradStore, v: &Var) -> Vec<f32> {
        grads
            .get(v.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn clipping_scales_to_max_norm_and_returns_the_old_norm() {
        let (vars, loss) = setup();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
        assert!((norm - 34f64.sqrt()).abs() < 1e-6);
        let after = grad_global_norm(&grads, &vars).unwrap();
        assert!((after - 1.0).abs() < 1e-5, "{after}");
        let c = (1.0 / (34f64.sqrt() + 1e-6)) as f32;
        assert_eq!(grad(&grads, &vars[0].1), vec![3.0 * c, 3.0 * c]);
    }

    #[test]
    fn clipping_leaves_small_gradients_alone() {
        let (vars, loss) = setup();
        let mut grads = loss.backward().unwrap();
        let norm = clip_grad_norm(&mut grads, &vars, 10.0).unwrap();
        assert!((norm - 34f64.sqrt()).abs() < 1e-6);
        assert_eq!(grad(&grads, &vars[0].1), vec![3.0, 3.0]);
        assert_eq!(grad(&grads, &vars[1].1), vec![4.0]);
    }

    #[test]
    fn the_fused_sum_equals_candles_add_and_affine_bit_for_bit() {
        let dev = Device::Cpu;
        let parts: Vec<Tensor> = (0..3)
            .map(|i| Tensor::randn(0f32, 1.0 + i as f32, (70_000,), &dev).unwrap())
            .collect();
        for (k, factor) in [(1, 0.5), (2, 1.0), (2, 0.5), (3, 1.0 / 3.0)] {
            let fused = sum_scaled(&parts[..k], factor).unwrap();
            let mut reference = parts[0].clone();
            for p in &parts[1..k] {
                reference = reference.add(p).unwrap();
            }
            let reference = reference.affine(factor, 0.0).unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(bits(&fused), bits(&reference), "{k} parts, factor {factor}");
        }
    }

    #[test]
    fn accumulation_sums_and_averages() {
        let (vars, loss) = setup();
        let mut acc = GradAccumulator::new(&vars);
        acc.add(&loss.backward().unwrap()).unwrap();
        // Second micro-batch only touches `a`, with a different gradient.
        let loss2 = vars[0].1.as_tensor().sqr().unwrap().sum_all().unwrap(); // ∇a = 2a = (2, 4)
        acc.add(&loss2.backward().unwrap()).unwrap();
        assert_eq!(acc.micro_batches(), 2);
        let sum = acc.sum().unwrap();
        assert_eq!(grad(&sum, &vars[0].1), vec![5.0, 7.0]);
        assert_eq!(grad(&sum, &vars[1].1), vec![4.0]);
        let mean = acc.mean().unwrap();
        assert_eq!(grad(&mean, &vars[0].1), vec![2.5, 3.5]);
        assert_eq!(grad(&mean, &vars[1].1), vec![2.0]);
        acc.reset();
        assert!(acc.sum().unwrap().get(vars[0].1.as_tensor()).is_none());
        assert!(acc.mean().is_err());
    }
}

//! AdamW's update of one parameter: the tensor form (any dtype and device) and the fused,
//! in-place form for contiguous f32 CPU parameters. Both give the same numbers.

use candle_core::Tensor;

/// The f32 elements of a contiguous CPU tensor's storage, without copying them.
fn f32_elements<'a>(
    storage: &'a candle_core::Storage,
    layout: &candle_core::Layout,
) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => mmkd_nn::fused::data::<f32>(cpu, layout, "AdamW"),
        _ => candle_core::bail!("AdamW: expected a CPU tensor"),
    }
}

/// The scalars of one parameter's update.
pub(super) struct UpdateCoefs {
    pub(super) lr: f64,
    pub(super) weight_decay: f64,
    pub(super) beta1: f64,
    pub(super) beta2: f64,
    pub(super) eps: f64,
    /// The parameter's step count, this update included.
    pub(super) t: i32,
}

impl UpdateCoefs {
    fn step_size(&self) -> f64 {
        self.lr / (1.0 - self.beta1.powi(self.t))
    }

    fn bias_correction2_sqrt(&self) -> f64 {
        (1.0 - self.beta2.powi(self.t)).sqrt()
    }
}

/// The update from tensor ops (any dtype and device); returns (param, m, v).
pub(super) fn tensor_update(
    param: &Tensor,
    grad: &Tensor,
    moments: Option<&(Tensor, Tensor)>,
    c: &UpdateCoefs,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (m, v) = match moments {
        Some(mv) => mv.clone(),
        None => (grad.zeros_like()?, grad.zeros_like()?),
    };
    let mut param = param.clone();
    if c.weight_decay != 0.0 {
        param = param.affine(1.0 - c.lr * c.weight_decay, 0.0)?;
    }
    // m.lerp(g, 1−β1) and v·β2 + (1−β2)·g², as PyTorch writes them.
    let m = m.add(&grad.sub(&m)?.affine(1.0 - c.beta1, 0.0)?)?;
    let v = v
        .affine(c.beta2, 0.0)?
        .add(&grad.sqr()?.affine(1.0 - c.beta2, 0.0)?)?;
    let denom = v.sqrt()?.affine(1.0 / c.bias_correction2_sqrt(), c.eps)?;
    let param = param.sub(&m.div(&denom)?.affine(c.step_size(), 0.0)?)?;
    Ok((param, m, v))
}

/// Runs `f` on the elements of a contiguous f32 CPU tensor's own storage, mutably, through
/// candle's in-place op hook: every tensor sharing that storage (the `Var`) sees the result.
fn with_f32_mut(
    tensor: &Tensor,
    f: impl FnOnce(&mut [f32]) -> candle_core::Result<()> + Send,
) -> candle_core::Result<()> {
    struct InPlace<F>(std::sync::Mutex<Option<F>>);
    impl<F: FnOnce(&mut [f32]) -> candle_core::Result<()> + Send> candle_core::InplaceOp1
        for InPlace<F>
    {
        fn name(&self) -> &'static str {
            "adamw-in-place"
        }
        fn cpu_fwd(
            &self,
            storage: &mut candle_core::CpuStorage,
            layout: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            let f = self
                .0
                .lock()
                .map_err(|_| candle_core::Error::Msg("AdamW: poisoned lock".into()))?
                .take()
                .ok_or_else(|| candle_core::Error::Msg("AdamW: in-place op ran twice".into()))?;
            let candle_core::CpuStorage::F32(all) = storage else {
                candle_core::bail!("AdamW: expected f32 storage")
            };
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("AdamW: the in-place update needs contiguous tensors")
            };
            f(&mut all[start..end])
        }
    }
    tensor.inplace_op1(&InPlace(std::sync::Mutex::new(Some(f))))
}

/// The same update for f32 parameters on the CPU, written in place into the parameter's and the
/// moments' own storage in one pass over each element, spread over rayon's pool. The tensor
/// form makes a dozen single-threaded passes and allocations per parameter, and writing fresh
/// buffers then copying them into the `Var` cost a tenth of a small model's step in allocation,
/// page faults and copies. Same operations in the same order (f32, the scalars rounded to f32
/// as candle's `affine` does), so both give the same numbers.
pub(super) fn fused_update(
    param: &Tensor,
    grads: &[Tensor],
    grad_scale: f64,
    (m, v): &(Tensor, Tensor),
    c: &UpdateCoefs,
) -> candle_core::Result<()> {
    use rayon::prelude::*;
    let decay = (c.weight_decay != 0.0).then_some((1.0 - c.lr * c.weight_decay) as f32);
    let (one_minus_b1, b2, one_minus_b2) = (
        (1.0 - c.beta1) as f32,
        c.beta2 as f32,
        (1.0 - c.beta2) as f32,
    );
    let (inv_bc2, eps, step, grad_scale) = (
        (1.0 / c.bias_correction2_sqrt()) as f32,
        c.eps as f32,
        c.step_size() as f32,
        grad_scale as f32,
    );
    let grads = grads
        .iter()
        .map(Tensor::contiguous)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let guards = grads
        .iter()
        .map(Tensor::storage_and_layout)
        .collect::<Vec<_>>();
    let g = guards
        .iter()
        .map(|(storage, layout)| f32_elements(storage, layout))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let n = param.elem_count();
    if let Some(bad) = g.iter().find(|g| g.len() != n) {
        candle_core::bail!(
            "AdamW: a gradient has {} elements, the parameter {n}",
            bad.len()
        );
    }
    with_f32_mut(param, |p| {
        with_f32_mut(m, |m| {
            with_f32_mut(v, |v| {
                const CHUNK: usize = 1 << 14;
                p.par_chunks_mut(CHUNK)
                    .zip(m.par_chunks_mut(CHUNK))
                    .zip(v.par_chunks_mut(CHUNK))
                    .enumerate()
                    .for_each(|(chunk, ((p, m), v))| {
                        let span = chunk * CHUNK..chunk * CHUNK + p.len();
                        // The micro-batches' mean gradient, summed and scaled as
                        // GradAccumulator does, gathered first (only when there are several)
                        // so the update below is one loop over equal-length slices (it
                        // vectorises).
                        let mean: std::borrow::Cow<[f32]> = if g.len() == 1 {
                            std::borrow::Cow::Borrowed(&g[0][span])
                        } else {
                            let mut sum = g[0][span.clone()].to_vec();
                            for other in &g[1..] {
                                for (x, &y) in sum.iter_mut().zip(&other[span.clone()]) {
                                    *x += y;
                                }
                            }
                            for x in &mut sum {
                                *x *= grad_scale;
                            }
                            std::borrow::Cow::Owned(sum)
                        };
                        let decay = decay.unwrap_or(1.0);
                        for (((pi, mi), vi), &gi) in p
                            .iter_mut()
                            .zip(m.iter_mut())
                            .zip(v.iter_mut())
                            .zip(mean.iter())
                        {
                            let m_new = *mi + (gi - *mi) * one_minus_b1;
                            let v_new = *vi * b2 + (gi * gi) * one_minus_b2;
                            let denom = v_new.sqrt() * inv_bc2 + eps;
                            *pi = *pi * decay - (m_new / denom) * step;
                            *mi = m_new;
                            *vi = v_new;
                        }
                    });
                Ok(())
            })
        })
    })
}

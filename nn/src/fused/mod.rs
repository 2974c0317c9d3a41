//! Fused CPU kernels with exact backward passes, for speed.
//!
//! Each op here is a candle `CustomOp` whose forward reads its inputs once and writes its
//! output once (the primitive-op formulations make 5–8 passes and as many temporaries), and
//! whose `bwd` is a second fused kernel. The backward passes return gradients only for inputs
//! that can need them (never for attention masks or rotary tables), so no work is spent on
//! constants either. Rows are spread over rayon's global pool, the one candle's matmuls use,
//! and each row function is compiled for AVX-512, AVX2 and baseline x86-64 and chosen at run
//! time (see `simd`).
//!
//! Kernels exist for contiguous f32 and f64 tensors; the public functions fall back to the
//! primitive-op formulation (the reference each kernel is tested against, values and
//! gradients) for other dtypes or layouts.

pub mod attention;
pub mod buckets;
pub mod gelu;
mod gemm;
pub mod linear;
pub mod norm;
pub mod rope;
pub mod silu;
mod simd;
pub mod softmax;
pub mod xent;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, WithDType};
use rayon::prelude::*;
pub(crate) use simd::{multiversion, Real};

pub use attention::attention;
pub use buckets::topk_bucket_log_probs;
pub use gelu::{gelu, GeluKind};
pub use linear::{linear, lora_linear};
pub use norm::rms_norm;
pub use rope::rope;
pub use silu::silu_mul;
pub use softmax::scaled_masked_softmax;
pub use xent::{cross_entropy_rows, forward_kl_rows};

/// Whether `t` can go through a fused kernel.
pub(crate) fn has_kernel(t: &Tensor) -> bool {
    t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// The contiguous data of a kernel input.
pub fn data<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [T]> {
    let all = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&all[start..end]),
        None => candle_core::bail!("{op}: the kernel needs contiguous inputs"),
    }
}

/// Below this many elements per task the rayon hand-off costs more than it saves.
const MIN_TASK_ELEMENTS: usize = 16 * 1024;

/// Calls `f(row_index, out_row)` for every `width`-wide row of `out`, in parallel over groups
/// of rows.
pub(crate) fn for_each_row<T: Send>(
    out: &mut [T],
    width: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    for_each_row_costing(out, width, width, f)
}

/// [`for_each_row`] where each row reads about `row_cost` input elements (more than its
/// output width, e.g. one loss value per vocabulary row).
pub(crate) fn for_each_row_costing<T: Send>(
    out: &mut [T],
    width: usize,
    row_cost: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if width == 0 {
        return;
    }
    let rows_per_task = (MIN_TASK_ELEMENTS / row_cost.max(1)).max(1);
    if out.len() <= width * rows_per_task {
        for (r, row) in out.chunks_mut(width).enumerate() {
            f(r, row);
        }
        return;
    }
    out.par_chunks_mut(width * rows_per_task)
        .enumerate()
        .for_each(|(task, rows)| {
            for (j, row) in rows.chunks_mut(width).enumerate() {
                f(task * rows_per_task + j, row);
            }
        });
}

/// Σ over rows of `f(row_index, acc)`, where `f` adds one row's contribution into the
/// `width`-long accumulator: a column reduction (weight and bias gradients), in parallel over
/// groups of rows. The groups' partial sums are added in group order, so the result does not
/// depend on how rayon happened to split the work (its `reduce` would associate them
/// differently from run to run, and a training run would not repeat itself bit for bit).
pub(crate) fn sum_over_rows<T: Real>(
    rows: usize,
    width: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    let rows_per_task = (MIN_TASK_ELEMENTS / width.max(1)).max(1);
    let tasks = rows.div_ceil(rows_per_task);
    let partial = |task: usize| {
        let mut acc = vec![T::zero(); width];
        for r in task * rows_per_task..rows.min((task + 1) * rows_per_task) {
            f(r, &mut acc);
        }
        acc
    };
    if tasks <= 1 {
        return partial(0);
    }
    let partials: Vec<Vec<T>> = (0..tasks).into_par_iter().map(partial).collect();
    let mut partials = partials.into_iter();
    let mut total = partials.next().unwrap_or_else(|| vec![T::zero(); width]);
    for p in partials {
        for (x, y) in total.iter_mut().zip(p) {
            *x += y;
        }
    }
    total
}

/// Wraps kernel output in CPU storage.
pub(crate) fn storage<T: WithDType>(values: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(values)
}

#[cfg(test)]
pub(crate) mod testing {
    //! Helpers for checking a fused op against its primitive-op reference.

    use candle_core::{DType, Device, Result, Tensor, Var};

    use crate::rng::SeededRng;

    pub fn random(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let values = SeededRng::new(seed).normal_vec(n, 1.0);
        Tensor::from_vec(values, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    pub use crate::grad_check::max_abs_diff;

    /// Outputs and input gradients (of Σ output ⊙ probe) of `fused` and `slow` agree to `tol`
    /// for every input in `inputs` (each made a `Var`).
    pub fn check_against_slow(
        inputs: &[Tensor],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        slow: impl Fn(&[Tensor]) -> Result<Tensor>,
        tol: f64,
    ) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let args: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y_fast = fused(&args).unwrap();
        let y_slow = slow(&args).unwrap();
        let d = max_abs_diff(&y_fast, &y_slow);
        assert!(d < tol, "forward differs by {d}");
        let probe = random(y_fast.dims(), 99, y_fast.dtype());
        let g_fast = y_fast
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_slow = y_slow
            .mul(&probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let (a, b) = (
                g_fast
                    .get(v.as_tensor())
                    .expect("fused op gave no gradient"),
                g_slow
                    .get(v.as_tensor())
                    .expect("reference gave no gradient"),
            );
            let d = max_abs_diff(a, b);
            assert!(d < tol, "gradient of input {i} differs by {d}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    #[test]
    fn column_sums_add_the_groups_in_order_every_time() {
        // Many row groups, so rayon splits the work, and values whose sum depends on the order
        // of the additions.
        let (rows, width) = (4096, 64);
        let a = SeededRng::new(9).normal_vec(rows * width, 1.0);
        let row_sum = |r: usize, acc: &mut [f32]| {
            for (x, v) in acc.iter_mut().zip(&a[r * width..(r + 1) * width]) {
                *x += *v;
            }
        };
        // The same groups, summed one after another on one thread.
        let rows_per_task = (MIN_TASK_ELEMENTS / width).max(1);
        let mut want = vec![0f32; width];
        for group in (0..rows).collect::<Vec<_>>().chunks(rows_per_task) {
            let mut acc = vec![0f32; width];
            for &r in group {
                row_sum(r, &mut acc);
            }
            for (x, y) in want.iter_mut().zip(acc) {
                *x += y;
            }
        }
        for _ in 0..20 {
            assert_eq!(sum_over_rows(rows, width, row_sum), want);
        }
    }
}

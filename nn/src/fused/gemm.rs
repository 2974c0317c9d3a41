//! Matrix products through the `gemm` crate (the one behind candle's matmuls) on strided
//! operands, so kernels can multiply sub-matrices (one head of a `[b, s, heads·d]` tensor)
//! in place.

use gemm::Parallelism;

use super::Real;

/// A matrix operand: its data and its (row, column) strides.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a, T> {
    pub data: &'a [T],
    pub rs: usize,
    pub cs: usize,
}

impl<T> Operand<'_, T> {
    /// Whether a `rows × cols` matrix at these strides lies inside `data`.
    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// The number of threads candle's own matmuls use.
pub(crate) fn parallelism() -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// dst (`m × n` at `dst_rs`, `dst_cs`) = [dst +] lhs (`m × k`) · rhs (`k × n`).
///
/// # Safety
/// `dst` must be valid for writes (and, with `accumulate`, reads of initialised values) at
/// every `i·dst_rs + j·dst_cs`, i < m, j < n, and no other thread may touch those elements
/// during the call. Without `accumulate` the elements may be uninitialised: gemm writes each
/// without reading it.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into<T: Real>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
    parallelism: Parallelism,
) {
    assert!(
        lhs.covers(m, k) && rhs.covers(k, n),
        "matmul operands out of bounds"
    );
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs.data.as_ptr(),
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.data.as_ptr(),
        rhs.cs as isize,
        rhs.rs as isize,
        T::one(),
        T::one(),
        false,
        false,
        false,
        parallelism,
    );
}

/// `lhs · rhs` (`m × k` times `k × n`) as a new row-major `m × n` matrix, plus `bias` on every
/// row when given; gemm parallelised as candle's matmuls are.
pub(crate) fn matmul<T: Real>(
    (m, n, k): (usize, usize, usize),
    lhs: Operand<'_, T>,
    rhs: Operand<'_, T>,
    bias: Option<&[T]>,
) -> Vec<T> {
    let len = m * n;
    let mut y = Vec::with_capacity(len);
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias length");
        for _ in 0..m {
            y.extend_from_slice(b);
        }
    }
    // SAFETY: y has room for m·n elements at row stride n. Without a bias gemm writes every
    // element without reading it (k = 0 writes zeros), so all are initialised before set_len;
    // with one they were written above.
    unsafe {
        gemm_into(
            (m, n, k),
            y.as_mut_ptr(),
            (n, 1),
            bias.is_some(),
            lhs,
            rhs,
            parallelism(),
        );
        y.set_len(len);
    }
    y
}

//! Row losses computed chunk by chunk from final hidden states and a bias-free LM head, so no
//! `[rows × vocab]` logits tensor of the whole batch exists for the student or the teacher
//! (the memory plan of Liger-Kernel's fused JSD and TRL's chunked loss).
//!
//! candle has no activation checkpointing, so each chunk runs its own small graph on detached
//! copies of the student's rows and head: its logits, its per-row loss, and a local backward
//! that yields the chunk's gradients with respect to those rows and the head. Only these
//! hidden-width gradients are kept. The returned tensor carries the mean's value and, through
//! the value-preserving surrogate `Σ H·G_H + Σ W·G_W − (the same, detached) + mean`, exactly
//! those gradients into the step's graph: its backward adds G_H to the student's hidden rows
//! and G_W to the head as the unchunked loss would.

use std::ops::Range;

use anyhow::{ensure, Context, Result};
use candle_core::{Tensor, Var};

use super::config::DistillLossConfig;
use super::logprob::compute_dtype;
use super::topk::{topk_per_token, TopKRows};

/// Hidden rows `[rows, hidden]` and the bias-free head `[vocab, hidden]` whose product are a
/// model's logits at those rows.
#[derive(Clone, Copy, Debug)]
pub struct HeadRows<'a> {
    pub hidden: &'a Tensor,
    pub head: &'a Tensor,
}

impl HeadRows<'_> {
    fn dims(&self, who: &str) -> Result<(usize, usize)> {
        let (rows, width) = self.hidden.dims2().with_context(|| {
            format!(
                "the {who}'s hidden rows must be [rows, hidden], got {:?}",
                self.hidden.dims()
            )
        })?;
        let (vocab, head_width) = self.head.dims2().with_context(|| {
            format!(
                "the {who}'s LM head must be [vocab, hidden], got {:?}",
                self.head.dims()
            )
        })?;
        ensure!(
            head_width == width,
            "the {who}'s LM head is [{vocab}, {head_width}], its hidden rows are {width} wide"
        );
        Ok((rows, vocab))
    }

    fn logits(&self, range: &Range<usize>) -> Result<Tensor> {
        let rows = self.hidden.narrow(0, range.start, range.len())?;
        Ok(mmkd_nn::fused::linear(&rows, self.head, None)?)
    }
}

/// The per-row loss of one chunk: the student's logits `[c, vocab]` (differentiable), the
/// teacher's `[c, vocab]` (constants) when there is a teacher, and the chunk's rows within
/// the whole; returns `[c]`.
pub type ChunkLoss<'f> = dyn Fn(&Tensor, Option<&Tensor>, Range<usize>) -> Result<Tensor> + 'f;

/// The mean over all rows of `per_row`, computed `chunk_rows` rows at a time; `student` is
/// part of the step's graph, `teacher` is read as constants. The value equals the unchunked
/// `per_row(all rows).mean_all()` up to summation order, and so do the gradients reaching the
/// student's hidden rows and head.
pub fn chunked_row_mean(
    student: HeadRows<'_>,
    teacher: Option<HeadRows<'_>>,
    chunk_rows: usize,
    per_row: &ChunkLoss<'_>,
) -> Result<Tensor> {
    ensure!(chunk_rows > 0, "the loss chunk must hold at least one row");
    let (rows, vocab) = student.dims("student")?;
    ensure!(rows > 0, "a chunked loss needs at least one row");
    let teacher = match teacher {
        Some(t) => {
            let (t_rows, t_vocab) = t.dims("teacher")?;
            ensure!(
                (t_rows, t_vocab) == (rows, vocab),
                "the teacher's rows give [{t_rows}, {t_vocab}] logits, the student's [{rows}, {vocab}]"
            );
            Some((t.hidden.detach(), t.head.detach()))
        }
        None => None,
    };
    let head = Var::from_tensor(&student.head.detach())?;
    let mut head_grad: Option<Tensor> = None;
    let mut row_grads = Vec::with_capacity(rows.div_ceil(chunk_rows));
    // Summed on the device: reading each chunk's value back would wait for it.
    let mut total: Option<Tensor> = None;
    for start in (0..rows).step_by(chunk_rows) {
        let range = start..(start + chunk_rows).min(rows);
        let chunk = Var::from_tensor(&student.hidden.narrow(0, start, range.len())?.detach())?;
        let logits = mmkd_nn::fused::linear(chunk.as_tensor(), head.as_tensor(), None)?;
        let teacher_logits = teacher
            .as_ref()
            .map(|(hidden, head)| HeadRows { hidden, head }.logits(&range))
            .transpose()?;
        let losses = per_row(&logits, teacher_logits.as_ref(), range.clone())?;
        ensure!(
            losses.dims() == [range.len()],
            "a chunk's loss must have one value per row ({}), got {:?}",
            range.len(),
            losses.dims()
        );
        let sum = losses.sum_all()?;
        total = Some(match total {
            Some(t) => (t + sum.detach())?,
            None => sum.detach(),
        });
        let grads = sum.backward()?;
        row_grads.push(match grads.get(chunk.as_tensor()) {
            Some(g) => g.clone(),
            None => chunk.as_tensor().zeros_like()?,
        });
        if let Some(g) = grads.get(head.as_tensor()) {
            head_grad = Some(match head_grad {
                Some(sum) => (sum + g)?,
                None => g.clone(),
            });
        }
    }
    let scale = 1.0 / rows as f64;
    let row_grads = (Tensor::cat(&row_grads, 0)? * scale)?;
    let mut surrogate = (student.hidden * row_grads)?.sum_all()?;
    if let Some(g) = head_grad {
        surrogate = (surrogate + (student.head * (g * scale)?)?.sum_all()?)?;
    }
    let mean = (total.context("a chunked loss needs at least one row")? * scale)?
        .to_dtype(surrogate.dtype())?;
    Ok(((&surrogate - surrogate.detach())? + mean)?)
}

/// The mean divergence between the student's and an online teacher's logits at the same
/// rows, both computed chunk by chunk.
pub fn divergence_to_hidden(
    student: HeadRows<'_>,
    teacher: HeadRows<'_>,
    chunk_rows: usize,
    cfg: &DistillLossConfig,
) -> Result<Tensor> {
    let per_row = |s: &Tensor, t: Option<&Tensor>, _: Range<usize>| {
        cfg.per_token(s, t.context("the divergence needs the teacher's rows")?)
    };
    chunked_row_mean(student, Some(teacher), chunk_rows, &per_row)
}

/// The mean divergence between the student's logits, chunk by chunk, and a teacher cache's
/// top-k rows (one per student row).
pub fn divergence_to_topk(
    student: HeadRows<'_>,
    teacher: &TopKRows,
    chunk_rows: usize,
    cfg: &DistillLossConfig,
) -> Result<Tensor> {
    let per_row = |s: &Tensor, _: Option<&Tensor>, rows: Range<usize>| {
        topk_per_token(s, &teacher.narrow(rows)?, cfg)
    };
    chunked_row_mean(student, None, chunk_rows, &per_row)
}

/// The mean next-token cross-entropy of the student's response rows against `targets` (one
/// per row), chunk by chunk.
pub fn cross_entropy(student: HeadRows<'_>, targets: &[u32], chunk_rows: usize) -> Result<Tensor> {
    let per_row = |s: &Tensor, _: Option<&Tensor>, rows: Range<usize>| -> Result<Tensor> {
        let s = s.to_dtype(compute_dtype(s))?;
        let targets = Tensor::new(&targets[rows], s.device())?;
        Ok(mmkd_nn::fused::cross_entropy_rows(&s, &targets)?)
    };
    chunked_row_mean(student, None, chunk_rows, &per_row)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::Divergence;
    use candle_core::Device;

    fn values(seed: f32, shape: (usize, usize)) -> Tensor {
        let data: Vec<f32> = (0..shape.0 * shape.1)
            .map(|i| ((i as f32 * 0.71 + seed) * 1.3).sin())
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Value and gradients (of the hidden rows and the head) of a loss built on the graph.
    fn with_grads(loss: impl Fn(&Tensor, &Tensor) -> Tensor) -> (f32, Vec<f32>, Vec<f32>) {
        let hidden = Var::from_tensor(&values(0.0, (7, 4))).unwrap();
        let head = Var::from_tensor(&values(1.0, (11, 4))).unwrap();
        // Through one op each, as the model's hidden rows and tied head are.
        let (h, w) = (
            (hidden.as_tensor() * 2.0).unwrap(),
            (head.as_tensor() * 1.5).unwrap(),
        );
        let value = loss(&h, &w);
        let grads = value.backward().unwrap();
        let flat = |v: &Var| {
            grads
                .get(v.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        (value.to_scalar().unwrap(), flat(&hidden), flat(&head))
    }

    fn assert_close(a: &[f32], b: &[f32]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-6 + 1e-5 * y.abs(), "{x} vs {y}");
        }
    }

    #[test]
    fn chunks_equal_the_whole_for_a_divergence_against_a_teacher() {
        let cfg = DistillLossConfig {
            divergence: Divergence::GeneralizedJsd { beta: 0.3 },
            temperature: 1.7,
            ..DistillLossConfig::default()
        };
        let t_hidden = values(2.0, (7, 3));
        let t_head = values(3.0, (11, 3));
        let whole = with_grads(|h, w| {
            let s = h.matmul(&w.t().unwrap()).unwrap();
            let t = t_hidden.matmul(&t_head.t().unwrap()).unwrap();
            cfg.per_token(&s, &t).unwrap().mean_all().unwrap()
        });
        for chunk in [1, 3, 7, 100] {
            let chunked = with_grads(|h, w| {
                let per_row =
                    |s: &Tensor, t: Option<&Tensor>, _: Range<usize>| cfg.per_token(s, t.unwrap());
                let teacher = HeadRows {
                    hidden: &t_hidden,
                    head: &t_head,
                };
                chunked_row_mean(
                    HeadRows { hidden: h, head: w },
                    Some(teacher),
                    chunk,
                    &per_row,
                )
                .unwrap()
            });
            assert!(
                (chunked.0 - whole.0).abs() < 1e-6,
                "chunk {chunk}: {} vs {}",
                chunked.0,
                whole.0
            );
            assert_close(&chunked.1, &whole.1);
            assert_close(&chunked.2, &whole.2);
        }
    }

    #[test]
    fn chunks_see_their_own_rows() {
        // A loss that reads each row's target by its index within the whole.
        let targets = [3u32, 0, 10, 5, 5, 1, 7];
        let ce = |s: &Tensor, range: Range<usize>| -> Result<Tensor> {
            let t = Tensor::new(&targets[range], s.device())?;
            Ok(mmkd_nn::fused::cross_entropy_rows(s, &t)?)
        };
        let whole = with_grads(|h, w| {
            let s = h.matmul(&w.t().unwrap()).unwrap();
            ce(&s, 0..7).unwrap().mean_all().unwrap()
        });
        let chunked = with_grads(|h, w| {
            let per_row = |s: &Tensor, _: Option<&Tensor>, r: Range<usize>| ce(s, r);
            chunked_row_mean(HeadRows { hidden: h, head: w }, None, 2, &per_row).unwrap()
        });
        assert!((chunked.0 - whole.0).abs() < 1e-6);
        assert_close(&chunked.1, &whole.1);
        assert_close(&chunked.2, &whole.2);
    }

    #[test]
    fn bad_shapes_are_named() {
        fn mean(hidden: &Tensor, head: &Tensor, teacher: Option<HeadRows>, chunk: usize) -> String {
            let per_row = |s: &Tensor, _: Option<&Tensor>, _: Range<usize>| Ok(s.sum(1)?);
            chunked_row_mean(HeadRows { hidden, head }, teacher, chunk, &per_row)
                .unwrap_err()
                .to_string()
        }
        let (h, w) = (values(0.0, (4, 3)), values(1.0, (5, 3)));
        assert_eq!(
            mean(&h, &values(1.0, (5, 2)), None, 2),
            "the student's LM head is [5, 2], its hidden rows are 3 wide"
        );
        let t = values(2.0, (3, 3));
        let teacher = HeadRows {
            hidden: &t,
            head: &w,
        };
        assert_eq!(
            mean(&h, &w, Some(teacher), 2),
            "the teacher's rows give [3, 5] logits, the student's [4, 5]"
        );
        assert_eq!(
            mean(&h, &w, None, 0),
            "the loss chunk must hold at least one row"
        );
    }
}

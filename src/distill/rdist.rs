//! RDist: visual-token relation distillation (LLaVA-KD).
//!
//! For each sample with at least one visual position, Z = the logits at its visual positions
//! (Np × V, f32) and R = Z Zᵀ (Np × Np), for teacher and student alike. The loss is
//! 1 − cos(vec(R_s), vec(R_t)), averaged over the samples that have images. R does not depend
//! on the hidden size, so teacher and student may differ there.
//!
//! When the logits come from a head without bias, Z = H Wᵀ and Z Zᵀ = H (WᵀW) Hᵀ:
//! [`relation_loss_from_hidden`] computes R that way, at O(Np·H² + Np²·H) per sample plus one
//! O(V·H²) Gram matrix per model instead of O(Np²·V) per sample.

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;

use super::logprob::compute_dtype;
use super::mdist::check_labels;
use super::positions::visual_positions_per_sample;

/// Whether [`relation_loss_from_hidden`] costs fewer FLOPs than [`relation_loss`] for a batch
/// whose samples have `visual_per_sample` visual positions, a vocabulary of `vocab` and hidden
/// sizes `student_hidden`, `teacher_hidden`. The logits form costs 2·Np²·V per sample and
/// model; the hidden form 2·V·H² per model (the Gram matrix) plus 2·Np·H² + 2·Np²·H per
/// sample. The hidden form wins for real vocabularies (V ≫ H), not for small test ones.
pub fn hidden_form_is_cheaper(
    visual_per_sample: &[usize],
    vocab: usize,
    student_hidden: usize,
    teacher_hidden: usize,
) -> bool {
    let hidden = hidden_form_flops(visual_per_sample, vocab, student_hidden)
        + hidden_form_flops(visual_per_sample, vocab, teacher_hidden);
    hidden < 2.0 * logits_form_flops(visual_per_sample, vocab)
}

/// [`hidden_form_is_cheaper`] for the student alone (the teacher's relations read from a
/// cache).
pub fn student_hidden_form_is_cheaper(
    visual_per_sample: &[usize],
    vocab: usize,
    student_hidden: usize,
) -> bool {
    hidden_form_flops(visual_per_sample, vocab, student_hidden)
        < logits_form_flops(visual_per_sample, vocab)
}

fn logits_form_flops(visual_per_sample: &[usize], vocab: usize) -> f64 {
    visual_per_sample
        .iter()
        .map(|&n| 2.0 * (n * n) as f64 * vocab as f64)
        .sum()
}

fn hidden_form_flops(visual_per_sample: &[usize], vocab: usize, hidden: usize) -> f64 {
    let h = hidden as f64;
    2.0 * vocab as f64 * h * h
        + visual_per_sample
            .iter()
            .map(|&n| 2.0 * n as f64 * h * h + 2.0 * (n * n) as f64 * h)
            .sum::<f64>()
}

/// Norms below this are clamped before dividing (as `torch.nn.functional.cosine_similarity`).
const COSINE_EPS: f64 = 1e-8;

/// L_rel from `[batch, seq, vocab]` logits; `None` when no sample has a visual position.
/// Teacher and student must cover the same positions (the vocabularies may differ).
pub fn relation_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    visual_mask: &Tensor,
) -> Result<Option<Tensor>> {
    let (sb, ss, _) = student_logits.dims3().with_context(|| {
        format!(
            "student logits must be [batch, seq, vocab], got {:?}",
            student_logits.dims()
        )
    })?;
    let (tb, ts, _) = teacher_logits.dims3().with_context(|| {
        format!(
            "teacher logits must be [batch, seq, vocab], got {:?}",
            teacher_logits.dims()
        )
    })?;
    ensure!(
        (sb, ss) == (tb, ts),
        "student logits {:?} and teacher logits {:?} cover different positions",
        student_logits.dims(),
        teacher_logits.dims()
    );
    check_labels(student_logits, visual_mask, "visual mask")?;
    let teacher_logits = teacher_logits.detach();
    per_sample_mean(
        &visual_positions_per_sample(visual_mask)?,
        visual_mask.device(),
        |b, index| {
            let zs = widen(&student_logits.get(b)?.index_select(index, 0)?)?;
            let zt = widen(&teacher_logits.get(b)?.index_select(index, 0)?)?;
            Ok((zs.matmul(&zs.t()?)?, zt.matmul(&zt.t()?)?))
        },
    )
    .context("relation distillation loss (L_rel)")
}

/// L_rel from final hidden states `[batch, seq, H]` and bias-free `lm_head` weights `[V, H]`
/// (hidden sizes may differ between teacher and student); equal to [`relation_loss`] on the
/// logits `hidden · headᵀ`. Gradients reach the student's hidden states and head.
pub fn relation_loss_from_hidden(
    student_hidden: &Tensor,
    student_head: &Tensor,
    teacher_hidden: &Tensor,
    teacher_head: &Tensor,
    visual_mask: &Tensor,
) -> Result<Option<Tensor>> {
    let (sb, ss, sh) = student_hidden.dims3().with_context(|| {
        format!(
            "student hidden states must be [batch, seq, hidden], got {:?}",
            student_hidden.dims()
        )
    })?;
    let (tb, ts, th) = teacher_hidden.dims3().with_context(|| {
        format!(
            "teacher hidden states must be [batch, seq, hidden], got {:?}",
            teacher_hidden.dims()
        )
    })?;
    ensure!(
        (sb, ss) == (tb, ts),
        "student hidden states {:?} and teacher hidden states {:?} cover different positions",
        student_hidden.dims(),
        teacher_hidden.dims()
    );
    let (_, swh) = student_head
        .dims2()
        .context("student lm_head weight must be [vocab, hidden]")?;
    let (_, twh) = teacher_head
        .dims2()
        .context("teacher lm_head weight must be [vocab, hidden]")?;
    ensure!(
        swh == sh,
        "student lm_head weight {:?} does not match hidden size {sh}",
        student_head.dims()
    );
    ensure!(
        twh == th,
        "teacher lm_head weight {:?} does not match hidden size {th}",
        teacher_head.dims()
    );
    check_labels(student_hidden, visual_mask, "visual mask")?;

    let teacher_hidden = teacher_hidden.detach();
    // WᵀW, once per call: [H, H].
    let gram = |w: &Tensor| -> candle_core::Result<Tensor> {
        let w = widen(w)?;
        w.t()?.matmul(&w)
    };
    let gram_s = gram(student_head)?;
    let gram_t = gram(&teacher_head.detach())?;
    per_sample_mean(
        &visual_positions_per_sample(visual_mask)?,
        visual_mask.device(),
        |b, index| {
            let hs = widen(&student_hidden.get(b)?.index_select(index, 0)?)?;
            let ht = widen(&teacher_hidden.get(b)?.index_select(index, 0)?)?;
            let rs = hs.matmul(&gram_s)?.matmul(&hs.t()?)?;
            let rt = ht.matmul(&gram_t)?.matmul(&ht.t()?)?;
            Ok((rs, rt))
        },
    )
    .context("relation distillation loss (L_rel) from hidden states")
}

/// The relation matrix R = Z Zᵀ (f32, detached) of each sample of `[batch, seq, vocab]`
/// logits, `None` for samples without visual positions: what an offline teacher cache keeps.
pub fn relation_matrices(logits: &Tensor, visual_mask: &Tensor) -> Result<Vec<Option<Tensor>>> {
    logits.dims3().with_context(|| {
        format!(
            "logits must be [batch, seq, vocab], got {:?}",
            logits.dims()
        )
    })?;
    check_labels(logits, visual_mask, "visual mask")?;
    let logits = logits.detach();
    per_sample(visual_mask, |b, index| {
        let z = widen(&logits.get(b)?.index_select(index, 0)?)?;
        z.matmul(&z.t()?)
    })
}

/// [`relation_matrices`] from hidden states `[batch, seq, H]` and a bias-free head `[V, H]`.
pub fn relation_matrices_from_hidden(
    hidden: &Tensor,
    head: &Tensor,
    visual_mask: &Tensor,
) -> Result<Vec<Option<Tensor>>> {
    let (_, _, h) = hidden.dims3().with_context(|| {
        format!(
            "hidden states must be [batch, seq, hidden], got {:?}",
            hidden.dims()
        )
    })?;
    let (_, wh) = head
        .dims2()
        .context("lm_head weight must be [vocab, hidden]")?;
    ensure!(
        wh == h,
        "lm_head weight {:?} does not match hidden size {h}",
        head.dims()
    );
    check_labels(hidden, visual_mask, "visual mask")?;
    let hidden = hidden.detach();
    let w = widen(&head.detach())?;
    let gram = w.t()?.matmul(&w)?;
    per_sample(visual_mask, |b, index| {
        let x = widen(&hidden.get(b)?.index_select(index, 0)?)?;
        x.matmul(&gram)?.matmul(&x.t()?)
    })
}

fn per_sample(
    visual_mask: &Tensor,
    relation: impl Fn(usize, &Tensor) -> candle_core::Result<Tensor>,
) -> Result<Vec<Option<Tensor>>> {
    visual_positions_per_sample(visual_mask)?
        .iter()
        .enumerate()
        .map(|(b, positions)| {
            if positions.is_empty() {
                return Ok(None);
            }
            let index = Tensor::from_slice(positions, positions.len(), visual_mask.device())?;
            let r =
                relation(b, &index).with_context(|| format!("relation matrix of sample {b}"))?;
            Ok(Some(r.detach()))
        })
        .collect()
}

/// Where the student's relation matrices come from: its logits, or (same value, cheaper for
/// large vocabularies) its hidden states and bias-free head.
#[derive(Clone, Copy, Debug)]
pub enum StudentRelation<'a> {
    /// Logits `[batch, seq, vocab]` at every position.
    Logits(&'a Tensor),
    Hidden {
        hidden: &'a Tensor,
        head: &'a Tensor,
    },
    /// Logits `[visual rows, vocab]` at the batch's visual positions only, sample by sample in
    /// position order (as [`super::positions::visual_rows`] lists them).
    VisualRows(&'a Tensor),
}

/// L_rel against teacher relation matrices computed earlier (one per batch row, `None` for
/// rows without visual positions); equal to [`relation_loss`] when they are the teacher's
/// [`relation_matrices`].
pub fn relation_loss_to_cached(
    student: StudentRelation<'_>,
    teacher: &[Option<Tensor>],
    visual_mask: &Tensor,
) -> Result<Option<Tensor>> {
    let positions = visual_positions_per_sample(visual_mask)?;
    // Where each sample's visual rows start among the batch's (for `VisualRows`).
    let offsets: Vec<usize> = positions
        .iter()
        .scan(0, |at, p| {
            let start = *at;
            *at += p.len();
            Some(start)
        })
        .collect();
    let b = match student {
        StudentRelation::Logits(source) | StudentRelation::Hidden { hidden: source, .. } => {
            let (b, _, _) = source.dims3().with_context(|| {
                format!(
                    "student tensor must be [batch, seq, _], got {:?}",
                    source.dims()
                )
            })?;
            check_labels(source, visual_mask, "visual mask")?;
            b
        }
        StudentRelation::VisualRows(rows) => {
            let total: usize = positions.iter().map(Vec::len).sum();
            ensure!(
                rows.rank() == 2 && rows.dim(0)? == total,
                "student visual-row logits are {:?}, the batch has {total} visual positions",
                rows.dims()
            );
            positions.len()
        }
    };
    ensure!(
        teacher.len() == b,
        "{} cached relation matrices for a batch of {b}",
        teacher.len()
    );
    let gram = match student {
        StudentRelation::Hidden { hidden, head } => {
            let (_, wh) = head
                .dims2()
                .context("lm_head weight must be [vocab, hidden]")?;
            ensure!(
                wh == hidden.dim(2)?,
                "student lm_head weight {:?} does not match hidden size {}",
                head.dims(),
                hidden.dim(2)?
            );
            let w = widen(head)?;
            Some(w.t()?.matmul(&w)?)
        }
        StudentRelation::Logits(_) | StudentRelation::VisualRows(_) => None,
    };
    per_sample_mean(&positions, visual_mask.device(), |b, index| {
        let rt = teacher[b].clone().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "batch row {b} has visual positions but no cached relation matrix"
            ))
        })?;
        let x = match student {
            StudentRelation::Logits(source) | StudentRelation::Hidden { hidden: source, .. } => {
                source.get(b)?.index_select(index, 0)?
            }
            StudentRelation::VisualRows(rows) => rows.narrow(0, offsets[b], index.dim(0)?)?,
        };
        let x = widen(&x)?;
        let rs = match &gram {
            Some(g) => x.matmul(g)?.matmul(&x.t()?)?,
            None => x.matmul(&x.t()?)?,
        };
        if rs.dims() != rt.dims() {
            return Err(candle_core::Error::Msg(format!(
                "batch row {b}: the cached relation matrix is {:?}, the student's {:?}",
                rt.dims(),
                rs.dims()
            )));
        }
        let rt = rt.to_dtype(rs.dtype())?;
        Ok((rs, rt))
    })
    .context("relation distillation loss (L_rel) against cached teacher relations")
}

/// Mean over samples with visual positions of 1 − cos(R_s, R_t), where `relations(b, index)`
/// returns (R_s, R_t) for sample b given the u32 index tensor of its visual positions.
fn per_sample_mean(
    positions_per_sample: &[Vec<u32>],
    device: &candle_core::Device,
    relations: impl Fn(usize, &Tensor) -> candle_core::Result<(Tensor, Tensor)>,
) -> Result<Option<Tensor>> {
    let mut losses = Vec::new();
    for (b, positions) in positions_per_sample.iter().enumerate() {
        if positions.is_empty() {
            continue;
        }
        let index = Tensor::from_slice(positions, positions.len(), device)?;
        let (rs, rt) = relations(b, &index).with_context(|| format!("sample {b}"))?;
        losses.push(cosine_distance(&rs, &rt.detach())?);
    }
    if losses.is_empty() {
        return Ok(None);
    }
    Ok(Some(Tensor::stack(&losses, 0)?.mean_all()?))
}

/// 1 − cos(vec(a), vec(b)), each norm clamped below at `COSINE_EPS`.
fn cosine_distance(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let dot = a.mul(b)?.sum_all()?;
    let norm_a = a.sqr()?.sum_all()?.sqrt()?.maximum(COSINE_EPS)?;
    let norm_b = b.sqr()?.sum_all()?.sqrt()?.maximum(COSINE_EPS)?;
    dot.div(&norm_a.mul(&norm_b)?)?.affine(-1.0, 1.0)
}

/// Relation matrices are computed in f32 (f64 kept for gradient checks), never in f16/bf16:
/// their entries are sums over the whole vocabulary.
fn widen(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(compute_dtype(t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use mmkd_nn::grad_check::finite_difference;

    fn data(seed: f64, dims: &[usize]) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i as f64 + seed) * 0.61).sin() * 2.0)
            .collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn identical_relations_give_zero_and_scale_does_not_matter() {
        let s = data(0.0, &[2, 5, 7]);
        let mask = Tensor::new(&[[0u8, 1, 1, 1, 0], [1, 0, 0, 1, 0]], &Device::Cpu).unwrap();
        // R scales by c², which the cosine ignores.
        let loss = relation_loss(&s, &s.affine(3.0, 0.0).unwrap(), &mask)
            .unwrap()
            .unwrap();
        assert!(loss.to_scalar::<f64>().unwrap().abs() < 1e-12);
    }

    #[test]
    fn no_images_is_none() {
        let s = data(0.0, &[2, 3, 4]);
        let mask = Tensor::zeros((2, 3), DType::U8, &Device::Cpu).unwrap();
        assert!(relation_loss(&s, &s, &mask).unwrap().is_none());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let s = data(0.0, &[2, 4, 6]);
        let t = data(5.0, &[2, 4, 9]); // a different vocabulary size is allowed here
        let mask = Tensor::new(&[[0u8, 1, 1, 1], [1, 0, 0, 0]], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&s).unwrap();
        let loss = relation_loss(var.as_tensor(), &t, &mask).unwrap().unwrap();
        let analytic = loss
            .backward()
            .unwrap()
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap();
        let analytic = analytic.to_vec1::<f64>().unwrap();
        let numeric = finite_difference(
            |x| {
                relation_loss(x, &t, &mask)
                    .map_err(candle_core::Error::wrap)?
                    .unwrap()
                    .to_scalar::<f64>()
            },
            &s,
            1e-6,
        )
        .unwrap();
        for (a, n) in analytic.iter().zip(&numeric) {
            assert!((a - n).abs() < 1e-8, "analytic {a} vs numeric {n}");
        }
        // The text-only sample 1 has one visual position: a 1×1 relation whose cosine is 1.
        // Sample 0's non-visual positions get no gradient.
        assert_eq!(&analytic[0..6], &[0.0; 6]);
    }

    #[test]
    fn hidden_state_form_equals_logits_form() {
        let hs = data(0.0, &[2, 5, 3]);
        let ws = data(1.0, &[11, 3]);
        let ht = data(2.0, &[2, 5, 4]);
        let wt = data(3.0, &[11, 4]);
        let mask = Tensor::new(&[[1u8, 1, 0, 1, 0], [0, 0, 0, 0, 0]], &Device::Cpu).unwrap();
        let logits = |h: &Tensor, w: &Tensor| h.broadcast_matmul(&w.t().unwrap()).unwrap();
        let from_logits = relation_loss(&logits(&hs, &ws), &logits(&ht, &wt), &mask)
            .unwrap()
            .unwrap();
        let from_hidden = relation_loss_from_hidden(&hs, &ws, &ht, &wt, &mask)
            .unwrap()
            .unwrap();
        let (a, b) = (
            from_logits.to_scalar::<f64>().unwrap(),
            from_hidden.to_scalar::<f64>().unwrap(),
        );
        assert!(a > 1e-3 && (a - b).abs() < 1e-12, "{a} vs {b}");
    }

    #[test]
    fn cached_relations_give_the_online_loss() {
        let hs = data(0.0, &[2, 5, 3]);
        let ws = data(1.0, &[11, 3]);
        let ht = data(2.0, &[2, 5, 4]);
        let wt = data(3.0, &[11, 4]);
        let mask = Tensor::new(&[[1u8, 1, 0, 1, 0], [0, 0, 0, 0, 0]], &Device::Cpu).unwrap();
        let logits = |h: &Tensor, w: &Tensor| h.broadcast_matmul(&w.t().unwrap()).unwrap();
        let (ls, lt) = (logits(&hs, &ws), logits(&ht, &wt));
        let online = relation_loss(&ls, &lt, &mask).unwrap().unwrap();
        let cached = relation_matrices(&lt, &mask).unwrap();
        assert!(cached[1].is_none());
        let from_hidden = relation_matrices_from_hidden(&ht, &wt, &mask).unwrap();
        for (a, b) in cached.iter().zip(&from_hidden) {
            if let (Some(a), Some(b)) = (a, b) {
                let d: f64 = a
                    .sub(b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap();
                assert!(d < 1e-9, "{d}");
            }
        }
        let want = online.to_scalar::<f64>().unwrap();
        for student in [
            StudentRelation::Logits(&ls),
            StudentRelation::Hidden {
                hidden: &hs,
                head: &ws,
            },
        ] {
            let got = relation_loss_to_cached(student, &cached, &mask)
                .unwrap()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(want > 1e-3 && (got - want).abs() < 1e-12, "{got} vs {want}");
        }
        // Gradients reach the student logits the same way.
        let var = Var::from_tensor(&ls).unwrap();
        let g = |loss: Tensor| {
            loss.backward()
                .unwrap()
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let g_online = g(relation_loss(var.as_tensor(), &lt, &mask).unwrap().unwrap());
        let g_cached =
            g(
                relation_loss_to_cached(StudentRelation::Logits(var.as_tensor()), &cached, &mask)
                    .unwrap()
                    .unwrap(),
            );
        for (a, b) in g_online.iter().zip(&g_cached) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let err = relation_loss_to_cached(StudentRelation::Logits(&ls), &[None, None], &mask)
            .unwrap_err();
        assert!(
            format!("{err:#}")
                .contains("batch row 0 has visual positions but no cached relation matrix"),
            "{err:#}"
        );
    }

    #[test]
    fn the_cheaper_form_depends_on_the_vocabulary() {
        // The benchmark spec: 8 samples × 64 visual tokens, V = 2048, H = 256 / 512.
        assert!(!hidden_form_is_cheaper(&[64; 8], 2048, 256, 512));
        // A Qwen-sized vocabulary with 576 visual tokens per sample.
        assert!(hidden_form_is_cheaper(&[576; 8], 151_936, 896, 1536));
        assert!(!hidden_form_is_cheaper(&[], 151_936, 896, 1536));
    }

    #[test]
    fn head_width_mismatch_is_an_error() {
        let hs = data(0.0, &[1, 2, 3]);
        let mask = Tensor::new(&[[1u8, 1]], &Device::Cpu).unwrap();
        let err =
            relation_loss_from_hidden(&hs, &data(0.0, &[5, 4]), &hs, &data(0.0, &[5, 3]), &mask)
                .unwrap_err()
                .to_string();
        assert_eq!(
            err,
            "student lm_head weight [5, 4] does not match hidden size 3"
        );
    }
}

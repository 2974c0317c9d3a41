//! Distillation across vocabularies (a teacher with another tokenizer).
//!
//! - **ULD**, Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
//!   Distillation: the Universal Logit Distillation Loss for LLMs", arXiv 2402.12030):
//!   with p = softmax(z_t/T) and q = softmax(z_s/T) each sorted in decreasing order and the
//!   shorter padded with zeros to the longer vocabulary,
//!   L_ULD = Σ_i |q_(i) − p_(i)|, the closed form of the Wasserstein-1 distance between the two
//!   distributions under a cost that needs no mapping between the vocabularies.
//! - **Exact token match**: where the vocabularies share entries (the same token string), the
//!   two distributions restricted to the shared entries (each renormalised over them) are
//!   compared with an ordinary divergence.
//!
//! Both take rows already paired across the two tokenizations (see [`super::align`]).

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};

use super::config::DistillLossConfig;
use super::logprob::{compute_dtype, log_softmax};

/// ULD per row of `[rows, student vocab]` and `[rows, teacher vocab]` logits; the teacher is
/// read detached. Gradients reach the student through its sorted probabilities (the order is a
/// fixed permutation).
pub fn uld_rows(student: &Tensor, teacher: &Tensor, temperature: f64) -> Result<Tensor> {
    ensure!(
        temperature.is_finite() && temperature > 0.0,
        "uld: temperature must be a positive number, got {temperature}"
    );
    let (n, vs) = student.dims2()?;
    let (tn, vt) = teacher.dims2()?;
    ensure!(
        n == tn,
        "uld: {n} student rows but {tn} teacher rows to compare"
    );
    let dtype = compute_dtype(student);
    let sorted_probs = |z: &Tensor| -> Result<Tensor> {
        let probs = log_softmax(&z.to_dtype(dtype)?.affine(1.0 / temperature, 0.0)?)?.exp()?;
        let order = probs.detach().arg_sort_last_dim(false)?;
        Ok(probs.contiguous()?.gather(&order.contiguous()?, 1)?)
    };
    let width = vs.max(vt);
    let padded = |p: Tensor, v: usize| -> Result<Tensor> {
        if v == width {
            return Ok(p);
        }
        let zeros = Tensor::zeros((n, width - v), p.dtype(), p.device())?;
        Ok(Tensor::cat(&[&p, &zeros], 1)?)
    };
    let q = padded(sorted_probs(student)?, vs)?;
    let p = padded(sorted_probs(&teacher.detach())?, vt)?;
    Ok(q.sub(&p)?.abs()?.sum(D::Minus1)?)
}

/// The entries two vocabularies share: `student[k]` and `teacher[k]` are the ids of the same
/// token string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SharedVocab {
    pub student: Vec<u32>,
    pub teacher: Vec<u32>,
}

impl SharedVocab {
    /// The shared entries of two `token → id` maps, in the student's id order.
    pub fn between(
        student: &std::collections::HashMap<String, u32>,
        teacher: &std::collections::HashMap<String, u32>,
    ) -> Self {
        let mut pairs: Vec<(u32, u32)> = student
            .iter()
            .filter_map(|(token, &s)| teacher.get(token).map(|&t| (s, t)))
            .collect();
        pairs.sort_unstable();
        let (student, teacher) = pairs.into_iter().unzip();
        Self { student, teacher }
    }

    pub fn len(&self) -> usize {
        self.student.len()
    }

    pub fn is_empty(&self) -> bool {
        self.student.is_empty()
    }
}

/// The divergence of `cfg` per row between the two distributions restricted to the shared
/// entries (each renormalised over them).
pub fn exact_match_rows(
    student: &Tensor,
    teacher: &Tensor,
    shared: &SharedVocab,
    cfg: &DistillLossConfig,
) -> Result<Tensor> {
    ensure!(
        !shared.is_empty(),
        "the two vocabularies share no token: exact token matching has nothing to compare (use \
         `vocab_match = \"sorted\"`, ULD)"
    );
    let (n, _) = student.dims2()?;
    let pick = |z: &Tensor, ids: &[u32]| -> Result<Tensor> {
        let index = Tensor::from_slice(ids, ids.len(), z.device())?
            .unsqueeze(0)?
            .broadcast_as((n, ids.len()))?
            .contiguous()?;
        Ok(z.contiguous()?.gather(&index, 1)?)
    };
    let s = pick(student, &shared.student)?;
    let t = pick(&teacher.detach().to_dtype(DType::F32)?, &shared.teacher)?;
    cfg.per_token(&s, &t.to_dtype(s.dtype())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn uld_of_a_hand_example_with_padding() {
        let dev = Device::Cpu;
        // Student probabilities ln-space (0.5, 0.3, 0.2) → sorted (0.5, 0.3, 0.2);
        // teacher (0.1, 0.9) → sorted (0.9, 0.1, 0 padded). |0.5−0.9|+|0.3−0.1|+|0.2−0| = 0.8.
        let s = Tensor::new(&[[0.5f64.ln(), 0.2f64.ln(), 0.3f64.ln()]], &dev).unwrap();
        let t = Tensor::new(&[[0.1f64.ln(), 0.9f64.ln()]], &dev).unwrap();
        let v = uld_rows(&s, &t, 1.0).unwrap().to_vec1::<f64>().unwrap();
        assert!((v[0] - 0.8).abs() < 1e-12, "{v:?}");
        // Any permutation of either vocabulary gives the same value.
        let s2 = Tensor::new(&[[0.3f64.ln(), 0.5f64.ln(), 0.2f64.ln()]], &dev).unwrap();
        let v2 = uld_rows(&s2, &t, 1.0).unwrap().to_vec1::<f64>().unwrap();
        assert!((v2[0] - 0.8).abs() < 1e-12);
    }

    #[test]
    fn exact_match_compares_the_shared_entries_renormalised() {
        let dev = Device::Cpu;
        let student: std::collections::HashMap<String, u32> = [("a", 0), ("b", 1), ("c", 2)]
            .map(|(t, i)| (t.to_string(), i))
            .into();
        let teacher: std::collections::HashMap<String, u32> = [("c", 0), ("x", 1), ("a", 2)]
            .map(|(t, i)| (t.to_string(), i))
            .into();
        let shared = SharedVocab::between(&student, &teacher);
        assert_eq!(
            (shared.student.clone(), shared.teacher.clone()),
            (vec![0, 2], vec![2, 0])
        );
        let s = Var::new(&[[1.0f64, 5.0, 2.0]], &dev).unwrap();
        let t = Tensor::new(&[[0.5f64, 9.0, 0.5]], &dev).unwrap();
        let cfg = DistillLossConfig::default();
        let v = exact_match_rows(s.as_tensor(), &t, &shared, &cfg)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // Shared: student (a 1.0, c 2.0) vs teacher (a 0.5, c 0.5): p = (½, ½),
        // q = softmax(1, 2); KL(p‖q) = Σ ½ (ln ½ − ln q).
        let lse = (1f64.exp() + 2f64.exp()).ln();
        let want = 0.5 * ((0.5f64).ln() - (1.0 - lse)) + 0.5 * ((0.5f64).ln() - (2.0 - lse));
        assert!((v[0] - want).abs() < 1e-12, "{v:?} vs {want}");
        let none = SharedVocab::default();
        let err = exact_match_rows(s.as_tensor(), &t, &none, &cfg).unwrap_err();
        assert!(err.to_string().contains("share no token"), "{err}");
    }
}

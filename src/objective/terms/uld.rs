//! `uld`: distillation from a teacher whose tokenizer is not the student's. The teacher reads
//! its own tokenization of each sample; the rows of the two tokenizations that predict the same
//! response text are paired (`alignment`: tokens starting at the same place of the answer, or
//! ULD's k-th with k-th), and each pair is compared with
//!
//! - `vocab_match = "sorted"` (default): the Universal Logit Distillation loss (Boizard et al.
//!   2024), Σ_i |q_(i) − p_(i)| over both distributions sorted and zero-padded, which needs no
//!   mapping between the vocabularies;
//! - `vocab_match = "exact"`: the term's divergence over the token strings both vocabularies
//!   hold, each distribution renormalised over them.
//!
//! L_uld = mean over the pairs. With one tokenizer the pairs are the response rows themselves,
//! so the term also runs against an ordinary teacher.

use anyhow::Result;
use candle_core::Tensor;

use super::TermKind;
use crate::distill::align::Alignment;
use crate::distill::uld::{exact_match_rows, uld_rows, SharedVocab};
use crate::distill::{DistillLossConfig, LossInputs};
use crate::objective::{Binding, Needs, Term, VocabMatch};

pub const KIND: TermKind = TermKind {
    name: "uld",
    log_name: "l_uld",
    about: "teacher with another tokenizer: sorted-probability (ULD) or shared-token divergence \
            on the aligned response tokens",
    divergence_options: true,
    options: &["vocab_match", "alignment"],
    build: |cfg| {
        Ok(Box::new(Uld {
            cfg: cfg.loss.clone(),
            vocab_match: cfg.spec.vocab_match.unwrap_or_default(),
            alignment: cfg.spec.alignment.unwrap_or_default(),
            shared: None,
        }))
    },
};

#[derive(Debug)]
struct Uld {
    cfg: DistillLossConfig,
    vocab_match: VocabMatch,
    alignment: Alignment,
    /// The shared entries, with a teacher of another tokenizer.
    shared: Option<std::sync::Arc<SharedVocab>>,
}

impl Term for Uld {
    fn needs(&self) -> Needs {
        Needs {
            teacher: true,
            teacher_logits: true,
            any_tokenizer: true,
            ..Needs::default()
        }
    }

    fn bind(&mut self, binding: &Binding) -> Result<()> {
        self.shared = binding.shared_vocab.clone();
        Ok(())
    }

    fn alignment(&self) -> Option<Alignment> {
        Some(self.alignment)
    }

    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>> {
        let Some((student, teacher)) = inputs.aligned_rows(KIND.name)? else {
            return Ok(None);
        };
        let per_pair = match (self.vocab_match, &self.shared) {
            (VocabMatch::Sorted, _) => {
                let d = uld_rows(&student, &teacher, self.cfg.temperature)?;
                if self.cfg.t2_scaling {
                    d.affine(self.cfg.temperature * self.cfg.temperature, 0.0)?
                } else {
                    d
                }
            }
            (VocabMatch::Exact, Some(shared)) => {
                exact_match_rows(&student, &teacher, shared, &self.cfg)?
            }
            // One tokenizer: every entry is shared.
            (VocabMatch::Exact, None) => self.cfg.per_token(&student, &teacher)?,
        };
        Ok(Some(per_pair.mean_all()?))
    }
}

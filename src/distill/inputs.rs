//! One micro-batch as every loss term reads it: the student's logits (at every position, or at
//! the rows a term asks for), the labels and visual positions computed once, and the teacher's
//! side (its logits from an online model, or its top-k rows from a cache). Each term of an
//! objective is one method here, so the named terms of `crate::objective` and the fixed
//! LLaVA-KD combination ([`super::distill_loss`]) run the same code.

use std::cell::OnceCell;
use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;

use super::balance::Routers;
use super::ce::{ce_of_rows, ce_rows, check_targets};
use super::chunked::{self, HeadRows};
use super::config::DistillLossConfig;
use super::mdist::{check_labels, check_pair, rows_loss};
use super::policy::PolicyRows;
use super::positions::{gather_rows, response_rows, visual_rows, ResponseRows};
use super::rdist::{
    relation_loss, relation_loss_from_hidden, relation_loss_to_cached,
    student_hidden_form_is_cheaper, StudentRelation,
};
use super::sides::not_served;
pub use super::sides::{CachedTeacher, RelationHidden, StudentLogits, TeacherSide};
use super::topk::{topk_per_token, TopKRows};

/// The positions a term reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rows {
    /// Logit t where label t + 1 is supervised.
    Response,
    /// The image-token positions.
    Visual,
}

/// One micro-batch's loss inputs, checked once; the student's logit rows that several terms
/// read (the response rows: CE and L_res; the visual rows: L_vis and L_rel) are computed once.
pub struct LossInputs<'a> {
    student: StudentLogits<'a>,
    labels: &'a Tensor,
    visual_mask: &'a Tensor,
    teacher: Option<TeacherSide<'a>>,
    student_relation: Option<StudentRelation<'a>>,
    batch: usize,
    seq: usize,
    vocab: usize,
    response: ResponseRows,
    visual: Vec<u32>,
    response_logits: OnceCell<Option<Tensor>>,
    visual_logits: OnceCell<Option<Tensor>>,
    layers: Option<LayerPair<'a>>,
    switch: Option<SwitchPath<'a>>,
    policy: Option<&'a PolicyRows>,
    /// On a micro-batch whose answers were generated: the student's logits on the data's own
    /// answers and their labels, which the cross-entropy reads.
    data_answers: Option<(&'a Tensor, ResponseRows)>,
    /// A sparse student's routers (empty logits for a dense student).
    routers: Option<Routers<'a>>,
    /// Rows of logits computed at once from hidden states (see [`super::chunked`]).
    chunk_rows: Option<usize>,
}

/// Switch-KD's visual switch: the student's visual tokens and the online teacher's language
/// pathway to read them with.
#[derive(Clone, Copy)]
pub struct SwitchPath<'a> {
    /// The student's visual tokens `[images, tokens, student width]` (part of the graph).
    pub student_visual: &'a Tensor,
    /// The teacher's logits `[batch, seq, vocab]` on the batch with the given visual tokens
    /// `[images, tokens, teacher width]` in place of its own (cut to the vocabulary both
    /// compare; the teacher's weights are constants, so gradients reach only the tokens).
    pub teacher_reads: &'a (dyn Fn(&Tensor) -> Result<Tensor> + Sync),
}

impl std::fmt::Debug for SwitchPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SwitchPath")
            .field("student_visual", &self.student_visual.dims())
            .finish_non_exhaustive()
    }
}

/// Decoder hidden states `[batch, seq, width]` by layer (0 = embeddings) of the student (part
/// of the graph) and of an online teacher (detached).
#[derive(Clone, Copy, Debug)]
pub struct LayerPair<'a> {
    pub student: &'a BTreeMap<usize, Tensor>,
    pub teacher: &'a BTreeMap<usize, Tensor>,
}

impl<'a> LossInputs<'a> {
    /// Checks the shapes (and, with a teacher's logits, that both sides agree) and computes
    /// the positions. `student_relation` chooses the student side of L_rel against a cache;
    /// `None` lets [`LossInputs::relation`] pick the cheaper form.
    pub fn new(
        student: StudentLogits<'a>,
        labels: &'a Tensor,
        visual_mask: &'a Tensor,
        teacher: Option<TeacherSide<'a>>,
        student_relation: Option<StudentRelation<'a>>,
    ) -> Result<Self> {
        let (batch, seq, vocab) = student.dims()?;
        match (&student, &teacher) {
            (StudentLogits::Full(s), Some(TeacherSide::Logits { logits, .. })) => {
                check_pair(s, logits)?;
                check_labels(s, labels, "labels")?;
                check_labels(s, visual_mask, "visual mask")?;
            }
            (StudentLogits::Full(s), None) => {
                check_labels(s, labels, "labels")?;
                check_labels(s, visual_mask, "visual mask")?;
            }
            (StudentLogits::Full(s), Some(TeacherSide::OtherTokens { logits, aligned })) => {
                check_labels(s, labels, "labels")?;
                check_labels(s, visual_mask, "visual mask")?;
                let (b, ts, _) = logits.dims3().with_context(|| {
                    format!(
                        "the teacher's logits must be [batch, seq, vocab], got {:?}",
                        logits.dims()
                    )
                })?;
                let (sb, ss, _) = s.dims3()?;
                ensure!(
                    b == sb,
                    "the teacher's logits cover {b} samples, the student's {sb}"
                );
                ensure!(
                    aligned.student.iter().all(|&r| (r as usize) < sb * ss)
                        && aligned.teacher.iter().all(|&r| (r as usize) < b * ts),
                    "aligned rows fall outside the logits"
                );
            }
            (StudentLogits::AtRows { .. }, Some(TeacherSide::Hidden { hidden, head })) => {
                let (b, s, width) = hidden.dims3().with_context(|| {
                    format!(
                        "the teacher's hidden states must be [batch, seq, hidden], got {:?}",
                        hidden.dims()
                    )
                })?;
                ensure!(
                    (b, s) == (batch, seq),
                    "the teacher's hidden states cover [{b}, {s}] positions, the student's [{batch}, {seq}]"
                );
                ensure!(
                    head.dims() == [vocab, width],
                    "the teacher's LM head is {:?}, expected [{vocab}, {width}] (the student's vocabulary, the teacher's width)",
                    head.dims()
                );
                for (t, what) in [(labels, "labels"), (visual_mask, "visual mask")] {
                    ensure!(
                        t.dims() == [batch, seq],
                        "{what} have shape {:?}, the logits cover [{batch}, {seq}] positions",
                        t.dims()
                    );
                }
            }
            (_, Some(TeacherSide::Hidden { .. })) => bail!(
                "an online teacher's hidden states are compared with the student's hidden states \
                 (a chunked loss), not with its logits"
            ),
            (_, Some(TeacherSide::Logits { .. } | TeacherSide::OtherTokens { .. })) => bail!(
                "an online teacher's logits are compared with the student's full logits, not \
                 with logits at selected rows"
            ),
            (_, _) => {
                for (t, what) in [(labels, "labels"), (visual_mask, "visual mask")] {
                    ensure!(
                        t.dims() == [batch, seq],
                        "{what} have shape {:?}, the logits cover [{batch}, {seq}] positions",
                        t.dims()
                    );
                }
            }
        }
        let response = response_rows(labels)?;
        if matches!(teacher, Some(TeacherSide::Cached(_))) {
            check_targets(&response, seq, vocab)?;
        }
        let visual = visual_rows(visual_mask)?;
        Ok(Self {
            student,
            labels,
            visual_mask,
            teacher,
            student_relation,
            batch,
            seq,
            vocab,
            response,
            visual,
            response_logits: OnceCell::new(),
            visual_logits: OnceCell::new(),
            layers: None,
            switch: None,
            policy: None,
            data_answers: None,
            routers: None,
            chunk_rows: None,
        })
    }

    /// The same inputs with the student's (and an online teacher's) logits computed `rows`
    /// rows at a time from the final hidden states by the terms that read them row by row (CE,
    /// L_res, L_vis; L_rel reads the hidden states). Needs [`StudentLogits::AtRows`].
    pub fn with_chunk_rows(mut self, rows: usize) -> Result<Self> {
        ensure!(
            matches!(self.student, StudentLogits::AtRows { .. }),
            "a chunked loss computes the student's logits from its hidden states, not from full logits"
        );
        ensure!(rows > 0, "the loss chunk must hold at least one row");
        self.chunk_rows = Some(rows);
        Ok(self)
    }

    /// The student's hidden rows at `rows` and its head, when the loss is chunked.
    fn chunked_student(&self, rows: &[u32]) -> Result<Option<(Tensor, &'a Tensor, usize)>> {
        match (self.chunk_rows, self.student) {
            (Some(chunk), StudentLogits::AtRows { hidden, head }) if !rows.is_empty() => {
                Ok(Some((gather_rows(hidden, rows)?, head, chunk)))
            }
            _ => Ok(None),
        }
    }

    /// L_res or L_vis against an online teacher's hidden states, chunked (`None`: no row).
    fn divergence_to_hidden(
        &self,
        rows: &[u32],
        teacher: (&Tensor, &Tensor),
        cfg: &DistillLossConfig,
    ) -> Result<Option<Tensor>> {
        let Some((student, head, chunk)) = self.chunked_student(rows)? else {
            ensure!(
                self.chunk_rows.is_some(),
                "an online teacher's hidden states are read by a chunked loss only"
            );
            return Ok(None);
        };
        let t_hidden = gather_rows(&teacher.0.detach(), rows)?;
        chunked::divergence_to_hidden(
            HeadRows {
                hidden: &student,
                head,
            },
            HeadRows {
                hidden: &t_hidden,
                head: teacher.1,
            },
            chunk,
            cfg,
        )
        .map(Some)
    }

    /// L_res or L_vis against a cache's top-k rows: chunked when the loss is, else on the
    /// student's logits at `rows` computed whole.
    fn divergence_to_topk(
        &self,
        at: Rows,
        teacher: &TopKRows,
        cfg: &DistillLossConfig,
    ) -> Result<Option<Tensor>> {
        if let Some((student, head, chunk)) = self.chunked_student(self.row_indices(at))? {
            let student = HeadRows {
                hidden: &student,
                head,
            };
            return chunked::divergence_to_topk(student, teacher, chunk, cfg).map(Some);
        }
        self.student_rows(at)?
            .map(|rows| -> Result<Tensor> { Ok(topk_per_token(&rows, teacher, cfg)?.mean_all()?) })
            .transpose()
    }

    /// The same inputs with the student's routers on this micro-batch.
    pub fn with_routers(mut self, routers: Routers<'a>) -> Self {
        self.routers = Some(routers);
        self
    }

    /// The student's routers; an error naming `term` for a dense student.
    pub fn routers(&self, term: &str) -> Result<Routers<'a>> {
        self.routers
            .filter(|r| !r.logits.is_empty())
            .with_context(|| {
                format!("{term} balances a Mixture-of-Experts student's routers; this student has no sparse layer")
            })
    }

    /// The same inputs with the per-token constants of the student's sampled answers.
    pub fn with_policy(mut self, policy: &'a PolicyRows) -> Self {
        self.policy = Some(policy);
        self
    }

    /// The same inputs with the student's `[batch, seq, vocab]` logits on the data's own
    /// answers (`labels` unshifted), for a micro-batch whose answers were generated: the
    /// cross-entropy then reads these.
    pub fn with_data_answers(mut self, logits: &'a Tensor, labels: &Tensor) -> Result<Self> {
        check_labels(logits, labels, "labels of the data's answers")?;
        self.data_answers = Some((logits, response_rows(labels)?));
        Ok(self)
    }

    /// The student's sampled answers: their per-token constants and the student's logits
    /// `[N, vocab]` at their rows. `None` on a micro-batch whose answers the student did not
    /// sample.
    pub fn policy_rows(&self) -> Result<Option<(&'a PolicyRows, Tensor)>> {
        match self.policy.filter(|p| !p.is_empty()) {
            Some(policy) => Ok(Some((policy, self.student.rows(&policy.rows)?))),
            None => Ok(None),
        }
    }

    /// An online teacher's logits `[N, vocab]` at `rows` (detached).
    pub fn teacher_rows_at(&self, rows: &[u32], term: &str) -> Result<Tensor> {
        gather_rows(&self.teacher_logits(term)?, rows)
    }

    /// The same inputs with the visual switch (the student has images and the teacher is
    /// online).
    pub fn with_switch(mut self, switch: SwitchPath<'a>) -> Self {
        self.switch = Some(switch);
        self
    }

    /// The visual switch; `None` when the batch has no image. An error naming `term` when the
    /// step has no online teacher.
    pub fn switch_path(&self, term: &str) -> Result<Option<SwitchPath<'a>>> {
        let side = self.same_tokens(term)?;
        let TeacherSide::Logits { .. } = side else {
            return Err(not_served(
                side,
                term,
                "runs the teacher on the student's visual tokens",
            ));
        };
        Ok(self.switch)
    }

    /// An online teacher's own logits `[batch, seq, vocab]` (detached).
    pub fn teacher_logits(&self, term: &str) -> Result<Tensor> {
        match self.same_tokens(term)? {
            TeacherSide::Logits { logits, .. } => Ok(logits.detach()),
            TeacherSide::OtherTokens { .. } => {
                unreachable!("same_tokens refuses another tokenizer")
            }
            side => Err(not_served(side, term, "reads the teacher's full logits")),
        }
    }

    /// The same inputs with both models' hidden states at the layers the objective reads.
    pub fn with_layers(mut self, layers: LayerPair<'a>) -> Self {
        self.layers = Some(layers);
        self
    }

    /// The hidden states of both models (an error naming `term` when the step has none: a
    /// teacher cache keeps no hidden state).
    pub fn layer_states(&self, term: &str) -> Result<LayerPair<'a>> {
        let side = self.same_tokens(term)?;
        let TeacherSide::Logits { .. } = side else {
            return Err(not_served(side, term, "reads the teacher's hidden states"));
        };
        self.layers
            .with_context(|| format!("{term}: the forward kept no hidden state"))
    }

    /// The flat `batch·seq` row indices of `rows`, in the order the row tensors use.
    pub fn row_indices(&self, rows: Rows) -> &[u32] {
        match rows {
            Rows::Response => &self.response.rows,
            Rows::Visual => &self.visual,
        }
    }

    pub fn labels(&self) -> &Tensor {
        self.labels
    }

    pub fn visual_mask(&self) -> &Tensor {
        self.visual_mask
    }

    pub fn has_teacher(&self) -> bool {
        self.teacher.is_some()
    }

    /// Next-token cross-entropy over the supervised tokens (`None`: no supervised token).
    pub fn ce(&self) -> Result<Option<Tensor>> {
        if let Some((logits, rows)) = &self.data_answers {
            return ce_rows(logits, rows);
        }
        if let Some((student, head, chunk)) = self.chunked_student(&self.response.rows)? {
            let student = HeadRows {
                hidden: &student,
                head,
            };
            return chunked::cross_entropy(student, &self.response.targets, chunk).map(Some);
        }
        match self.student {
            StudentLogits::Full(logits) => ce_rows(logits, &self.response),
            StudentLogits::AtRows { .. } => self
                .response_logits()?
                .map(|rows| ce_of_rows(&rows, &self.response))
                .transpose(),
        }
    }

    /// MDist's L_res: the mean divergence over the response rows.
    pub fn response_divergence(&self, cfg: &DistillLossConfig) -> Result<Option<Tensor>> {
        match self.same_tokens("L_res")? {
            TeacherSide::Logits { logits, .. } => {
                rows_loss(self.full_logits()?, logits, &self.response.rows, cfg)
                    .context("response distillation loss (L_res)")
            }
            TeacherSide::OtherTokens { .. } => {
                unreachable!("same_tokens refuses another tokenizer")
            }
            TeacherSide::Hidden { hidden, head } => self
                .divergence_to_hidden(&self.response.rows, (hidden, head), cfg)
                .context("response distillation loss (L_res)"),
            TeacherSide::Cached(cached) => {
                let what = "response distillation loss (L_res) from the teacher cache";
                check_cached(self.response.rows.len(), cached.response, "L_res").context(what)?;
                self.divergence_to_topk(Rows::Response, cached.response, cfg)
                    .context(what)
            }
        }
    }

    /// MDist's L_vis: the mean divergence over the visual rows.
    pub fn visual_divergence(&self, cfg: &DistillLossConfig) -> Result<Option<Tensor>> {
        match self.same_tokens("L_vis")? {
            TeacherSide::Logits { logits, .. } => {
                rows_loss(self.full_logits()?, logits, &self.visual, cfg)
                    .context("visual distillation loss (L_vis)")
            }
            TeacherSide::OtherTokens { .. } => {
                unreachable!("same_tokens refuses another tokenizer")
            }
            TeacherSide::Hidden { hidden, head } => self
                .divergence_to_hidden(&self.visual, (hidden, head), cfg)
                .context("visual distillation loss (L_vis)"),
            TeacherSide::Cached(cached) => {
                let what = "visual distillation loss (L_vis) from the teacher cache";
                check_cached(self.visual.len(), cached.visual, "L_vis").context(what)?;
                self.divergence_to_topk(Rows::Visual, cached.visual, cfg)
                    .context(what)
            }
        }
    }

    /// RDist's L_rel: 1 − cosine between the student's and the teacher's visual-token
    /// relation matrices, averaged over the samples with images.
    pub fn relation(&self) -> Result<Option<Tensor>> {
        match self.same_tokens("L_rel")? {
            TeacherSide::Logits {
                relation_hidden: Some(h),
                ..
            } => relation_loss_from_hidden(
                h.student_hidden,
                h.student_head,
                h.teacher_hidden,
                h.teacher_head,
                self.visual_mask,
            ),
            TeacherSide::Logits {
                logits,
                relation_hidden: None,
            } => relation_loss(self.full_logits()?, logits, self.visual_mask),
            TeacherSide::Hidden {
                hidden: teacher_hidden,
                head: teacher_head,
            } => {
                let StudentLogits::AtRows { hidden, head } = self.student else {
                    bail!(
                        "L_rel against a teacher's hidden states needs the student's hidden states"
                    );
                };
                relation_loss_from_hidden(
                    hidden,
                    head,
                    teacher_hidden,
                    teacher_head,
                    self.visual_mask,
                )
            }
            TeacherSide::OtherTokens { .. } => {
                unreachable!("same_tokens refuses another tokenizer")
            }
            TeacherSide::Cached(cached) => {
                // Unless the caller chose, the student side takes the cheaper of Z Zᵀ =
                // H (WᵀW) Hᵀ and the visual-row logits (the teacher's side is cached).
                let relation = match (self.student_relation, self.student) {
                    (Some(relation), _) => Some(relation),
                    (None, StudentLogits::AtRows { hidden, head }) => {
                        let mut per_sample = vec![0usize; self.batch];
                        for &row in &self.visual {
                            per_sample[row as usize / self.seq] += 1;
                        }
                        // A chunked loss never forms the visual rows' logits.
                        (self.chunk_rows.is_some()
                            || student_hidden_form_is_cheaper(
                                &per_sample,
                                self.vocab,
                                hidden.dim(2)?,
                            ))
                        .then_some(StudentRelation::Hidden { hidden, head })
                    }
                    (None, _) => None,
                };
                match relation {
                    Some(relation) => {
                        relation_loss_to_cached(relation, cached.relations, self.visual_mask)
                    }
                    None => match self.visual_logits()? {
                        Some(rows) => relation_loss_to_cached(
                            StudentRelation::VisualRows(&rows),
                            cached.relations,
                            self.visual_mask,
                        ),
                        None => Ok(None),
                    },
                }
            }
        }
    }

    /// The student's logits `[rows, vocab]` at `rows` (part of the graph; computed once per
    /// batch), `None` when the batch has no such position.
    pub fn student_rows(&self, rows: Rows) -> Result<Option<Tensor>> {
        match rows {
            Rows::Response => self.response_logits(),
            Rows::Visual => self.visual_logits(),
        }
    }

    /// An online teacher's logits `[rows, vocab]` at `rows` (detached), `None` when the batch
    /// has no such position. A cache keeps only the teacher's top-k: an error naming `term`.
    pub fn teacher_logit_rows(&self, rows: Rows, term: &str) -> Result<Option<Tensor>> {
        let side = self.same_tokens(term)?;
        let TeacherSide::Logits { logits, .. } = side else {
            return Err(not_served(side, term, "reads the teacher's full logits"));
        };
        let rows = match rows {
            Rows::Response => &self.response.rows,
            Rows::Visual => &self.visual,
        };
        if rows.is_empty() {
            return Ok(None);
        }
        gather_rows(&logits.detach(), rows).map(Some)
    }

    fn teacher_side(&self, term: &str) -> Result<TeacherSide<'a>> {
        self.teacher
            .with_context(|| format!("{term} compares with a teacher, and this batch has none"))
    }

    /// The teacher's side when it reads the student's own tokens (one vocabulary).
    fn same_tokens(&self, term: &str) -> Result<TeacherSide<'a>> {
        let side = self.teacher_side(term)?;
        if let TeacherSide::OtherTokens { .. } = side {
            bail!(
                "{term} compares teacher and student token by token and needs one vocabulary; the \
                 teacher's tokenizer is not the student's (use the `uld` term)"
            );
        }
        Ok(side)
    }

    /// The student's and the teacher's logit rows that predict the same response text,
    /// `([pairs, student vocab], [pairs, teacher vocab])` (the teacher's detached): with one
    /// tokenizer the response rows of both; with two, the aligned rows. `None` when nothing
    /// pairs up.
    pub fn aligned_rows(&self, term: &str) -> Result<Option<(Tensor, Tensor)>> {
        match self.teacher_side(term)? {
            TeacherSide::Logits { logits, .. } => {
                let Some(student) = self.response_logits()? else {
                    return Ok(None);
                };
                Ok(Some((
                    student,
                    gather_rows(&logits.detach(), &self.response.rows)?,
                )))
            }
            TeacherSide::OtherTokens { logits, aligned } => {
                if aligned.is_empty() {
                    return Ok(None);
                }
                Ok(Some((
                    self.student.rows(&aligned.student)?,
                    gather_rows(&logits.detach(), &aligned.teacher)?,
                )))
            }
            side => Err(not_served(side, term, "reads the teacher's full logits")),
        }
    }

    fn full_logits(&self) -> Result<&'a Tensor> {
        match self.student {
            StudentLogits::Full(logits) => Ok(logits),
            StudentLogits::AtRows { .. } => {
                bail!("this loss needs the student's logits at every position")
            }
        }
    }

    /// The student's logits at the response rows (`None`: no supervised token), computed once.
    fn response_logits(&self) -> Result<Option<Tensor>> {
        memo(&self.response_logits, || {
            if self.response.is_empty() {
                Ok(None)
            } else {
                self.student.rows(&self.response.rows).map(Some)
            }
        })
    }

    /// The student's logits at the visual rows (`None`: no visual position), computed once.
    fn visual_logits(&self) -> Result<Option<Tensor>> {
        memo(&self.visual_logits, || {
            if self.visual.is_empty() {
                Ok(None)
            } else {
                self.student.rows(&self.visual).map(Some)
            }
        })
    }
}

fn memo(
    cell: &OnceCell<Option<Tensor>>,
    compute: impl FnOnce() -> Result<Option<Tensor>>,
) -> Result<Option<Tensor>> {
    if let Some(value) = cell.get() {
        return Ok(value.clone());
    }
    let value = compute()?;
    Ok(cell.get_or_init(|| value).clone())
}

/// The cache must hold one teacher row per position of the batch.
fn check_cached(positions: usize, top: &TopKRows, what: &str) -> Result<()> {
    ensure!(
        top.rows()? == positions,
        "{what}: the cache holds {} teacher rows for the batch's {positions} positions",
        top.rows()?
    );
    Ok(())
}

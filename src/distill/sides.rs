//! The two sides a loss compares on one micro-batch: where the student's logits come from
//! (every position, or the rows a term reads from hidden states and the head), and the
//! teacher's side (an online teacher's logits or hidden states, another tokenizer's logits, a
//! cache's rows).

use anyhow::{ensure, Context, Result};
use candle_core::Tensor;

use super::align::AlignedRows;
use super::positions::gather_rows;
use super::topk::TopKRows;

/// Where the student's logits at the rows a loss reads come from.
#[derive(Clone, Copy, Debug)]
pub enum StudentLogits<'a> {
    /// `[batch, seq, vocab]` at every position; the rows are gathered from them.
    Full(&'a Tensor),
    /// Final hidden states `[batch, seq, hidden]` and the bias-free LM head `[vocab, hidden]`
    /// (cut to the vocabulary the loss compares): logits are computed at the loss's rows only.
    /// Same values; the head then skips the positions no loss reads, and the backward scatters
    /// hidden-width gradients instead of a vocabulary-wide one per gathered row set.
    AtRows {
        hidden: &'a Tensor,
        head: &'a Tensor,
    },
}

impl StudentLogits<'_> {
    /// `[batch, seq, vocab]`.
    pub(crate) fn dims(&self) -> Result<(usize, usize, usize)> {
        match self {
            StudentLogits::Full(logits) => logits.dims3().with_context(|| {
                format!(
                    "student logits must be [batch, seq, vocab], got {:?}",
                    logits.dims()
                )
            }),
            StudentLogits::AtRows { hidden, head } => {
                let (b, s, h) = hidden.dims3().with_context(|| {
                    format!(
                        "student hidden states must be [batch, seq, hidden], got {:?}",
                        hidden.dims()
                    )
                })?;
                let (v, head_h) = head
                    .dims2()
                    .context("the LM head must be [vocab, hidden]")?;
                ensure!(
                    head_h == h,
                    "the LM head is [{v}, {head_h}], the hidden states are {h} wide"
                );
                Ok((b, s, v))
            }
        }
    }

    /// The logits `[rows, vocab]` at flat `batch·seq` rows.
    pub(super) fn rows(&self, rows: &[u32]) -> Result<Tensor> {
        match self {
            StudentLogits::Full(logits) => gather_rows(logits, rows),
            StudentLogits::AtRows { hidden, head } => {
                let picked = gather_rows(hidden, rows)?;
                Ok(mmkd_nn::fused::linear(&picked, head, None)?)
            }
        }
    }
}

/// Hidden states and bias-free `lm_head` weights for the cheaper relation loss
/// (see [`super::relation_loss_from_hidden`]).
#[derive(Clone, Copy, Debug)]
pub struct RelationHidden<'a> {
    pub student_hidden: &'a Tensor,
    pub student_head: &'a Tensor,
    pub teacher_hidden: &'a Tensor,
    pub teacher_head: &'a Tensor,
}

/// A teacher read back from an offline cache, lined up with one batch.
#[derive(Clone, Copy, Debug)]
pub struct CachedTeacher<'a> {
    /// Top-k rows at the batch's response positions, in
    /// [`super::positions::response_rows`] order.
    pub response: &'a TopKRows,
    /// Top-k rows at the batch's visual positions, in [`super::positions::visual_rows`]
    /// order.
    pub visual: &'a TopKRows,
    /// The teacher's relation matrix of each batch row (`None`: no visual position, or the
    /// cache holds none because L_rel is off).
    pub relations: &'a [Option<Tensor>],
}

/// The teacher's side of a micro-batch.
#[derive(Clone, Copy, Debug)]
pub enum TeacherSide<'a> {
    /// An online teacher's logits `[batch, seq, vocab]` (detached here), with the hidden
    /// states for the cheaper L_rel when both heads are bias-free and uncut.
    Logits {
        logits: &'a Tensor,
        relation_hidden: Option<RelationHidden<'a>>,
    },
    /// A teacher cache's rows for this batch.
    Cached(CachedTeacher<'a>),
    /// An online teacher with another tokenizer: its logits `[batch, teacher seq, teacher
    /// vocab]` over its own tokenization of the batch (detached here), and the rows of the two
    /// tokenizations that predict the same response text.
    OtherTokens {
        logits: &'a Tensor,
        aligned: &'a AlignedRows,
    },
    /// An online teacher's final hidden states `[batch, seq, width]` and bias-free LM head
    /// `[vocab, width]` (cut to the vocabulary both compare), for a chunked loss
    /// ([`super::LossInputs::with_chunk_rows`]) that computes its logits rows at a time.
    Hidden {
        hidden: &'a Tensor,
        head: &'a Tensor,
    },
}

/// Why `side` cannot serve a term that `reads` something only an online teacher's full
/// forward has.
pub(super) fn not_served(side: TeacherSide<'_>, term: &str, reads: &str) -> anyhow::Error {
    match side {
        TeacherSide::Cached(_) => anyhow::anyhow!(
            "{term} {reads}, which a teacher cache does not keep: run it with --teacher"
        ),
        _ => anyhow::anyhow!(
            "{term} {reads}, which a chunked loss does not form: set train.loss_chunk_rows = 0"
        ),
    }
}

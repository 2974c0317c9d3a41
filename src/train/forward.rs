//! One micro-batch's student forward and objective, against whatever teacher side the step
//! has: none, an online teacher's output on the same batch, or a teacher cache's rows. The
//! trainer and the bench both call [`objective_loss`], so the bench times the training step.

use std::time::Instant;

use anyhow::{bail, ensure, Result};
use candle_core::Tensor;

use super::step::MicroLoss;
use crate::distill::align::AlignedRows;
use crate::distill::balance::Routers;
use crate::distill::policy::PolicyRows;
use crate::distill::{
    truncate_vocab, CachedTeacher, LayerPair, LossInputs, RelationHidden, StudentLogits,
    SwitchPath, TeacherSide,
};
use crate::models::llava::{ImageInput, LlavaModel, LlavaOutput, TokenBatch};
use crate::objective::Objective;
use crate::teacher_cache::CachedBatch;

/// What the student reads of one micro-batch.
#[derive(Clone, Copy)]
pub struct StudentBatch<'a> {
    pub tokens: &'a TokenBatch,
    /// `[batch, seq]` unshifted labels.
    pub labels: &'a Tensor,
    /// `[batch, seq]`, 1 at the image-token positions.
    pub visual_mask: &'a Tensor,
    pub images: Option<ImageInput<'a>>,
    /// On a micro-batch whose answers were generated: the data's own tokens and labels (the
    /// cross-entropy reads the student on these), when the objective reads them.
    pub data_answers: Option<(&'a TokenBatch, &'a Tensor)>,
    /// The student's sampled answers' per-token constants (MiniLLM's terms).
    pub policy: Option<&'a PolicyRows>,
}

impl<'a> StudentBatch<'a> {
    /// A micro-batch of the data as it is (no generated answer).
    pub fn of_data(
        tokens: &'a TokenBatch,
        labels: &'a Tensor,
        visual_mask: &'a Tensor,
        images: Option<ImageInput<'a>>,
    ) -> Self {
        Self {
            tokens,
            labels,
            visual_mask,
            images,
            data_answers: None,
            policy: None,
        }
    }
}

/// The teacher's side of one micro-batch.
#[derive(Clone, Copy)]
pub enum TeacherRows<'a> {
    /// The objective reads no teacher.
    None,
    /// An online teacher's output on the same batch, with the vocabulary both are cut to.
    Online {
        output: &'a LlavaOutput,
        teacher: &'a LlavaModel,
        truncate: Option<usize>,
        /// With a teacher of another tokenizer, `output` covers its own tokenization and these
        /// rows pair it with the student's.
        aligned: Option<&'a AlignedRows>,
    },
    /// An online teacher's final hidden states `[batch, seq, width]` on the same batch, for a
    /// chunked loss, with the vocabulary both are cut to.
    OnlineHidden {
        hidden: &'a Tensor,
        teacher: &'a LlavaModel,
        truncate: Option<usize>,
    },
    /// A teacher cache's rows for the batch (already checked against its positions), and the
    /// cache's vocabulary when it is smaller than the student's.
    Cached {
        rows: &'a CachedBatch,
        truncate: Option<usize>,
    },
}

/// The student's forward on `batch` and the objective against `teacher`.
///
/// Without a teacher, and with an online one, the student's logits are computed at every
/// position; against a cache only at the rows the terms read (`StudentLogits::AtRows`). With
/// an online teacher whose vocabulary is not cut, L_rel comes from the hidden states
/// (Z Zᵀ = H (WᵀW) Hᵀ). A chunked objective ([`Objective::loss_chunk_rows`]) reads the
/// student's hidden states and head in every case, and an online teacher's too: no logits of
/// the whole batch are formed.
pub fn objective_loss(
    student: &LlavaModel,
    batch: StudentBatch<'_>,
    teacher: TeacherRows<'_>,
    objective: &Objective,
) -> Result<MicroLoss> {
    if let Some(chunk) = objective.loss_chunk_rows() {
        return loss_at_rows(student, batch, teacher, objective, Some(chunk));
    }
    let clock = Instant::now();
    let elapsed = || clock.elapsed().as_secs_f64();
    let loss = |logits: StudentLogits<'_>,
                side: Option<TeacherSide<'_>>,
                routers: &[Tensor],
                forward: f64| {
        let extras = Extras {
            routers,
            ..Extras::default()
        };
        micro_loss(student, objective, batch, logits, side, extras, forward)
    };
    match teacher {
        TeacherRows::OnlineHidden { .. } => {
            bail!("an online teacher's hidden states are read by a chunked objective only")
        }
        TeacherRows::Cached { .. } => loss_at_rows(student, batch, teacher, objective, None),
        TeacherRows::None => {
            let out = student.forward_images(batch.tokens, batch.images)?;
            let routers = &out.layers.router_logits;
            loss(StudentLogits::Full(&out.logits), None, routers, elapsed())
        }
        TeacherRows::Online {
            output,
            aligned: Some(aligned),
            ..
        } => {
            let out = student.forward_images(batch.tokens, batch.images)?;
            let forward = elapsed();
            let t_logits = output.logits.detach();
            let side = TeacherSide::OtherTokens {
                logits: &t_logits,
                aligned,
            };
            let routers = &out.layers.router_logits;
            loss(
                StudentLogits::Full(&out.logits),
                Some(side),
                routers,
                forward,
            )
        }
        TeacherRows::Online {
            output,
            teacher,
            truncate,
            aligned: None,
        } => {
            let (student_layers, _) = objective.layers();
            let out = student.forward_images_layers(batch.tokens, batch.images, &student_layers)?;
            let forward = elapsed();
            let t_logits = output.logits.detach();
            let (s_logits, t_logits) = match truncate {
                Some(n) => (
                    truncate_vocab(&out.logits, n)?,
                    truncate_vocab(&t_logits, n)?,
                ),
                None => (out.logits.clone(), t_logits),
            };
            let t_hidden = output.hidden.detach();
            let relation_hidden = truncate.is_none().then(|| RelationHidden {
                student_hidden: &out.hidden,
                student_head: student.lm.lm_head_weight(),
                teacher_hidden: &t_hidden,
                teacher_head: teacher.lm.lm_head_weight(),
            });
            let side = TeacherSide::Logits {
                logits: &t_logits,
                relation_hidden,
            };
            let layers = LayerPair {
                student: &out.layers.states,
                teacher: &output.layers.states,
            };
            // Switch-KD: the teacher's decoder on the student's visual tokens.
            let reads = |tokens: &Tensor| -> Result<Tensor> {
                let logits = teacher
                    .forward_images(batch.tokens, Some(ImageInput::Projected(tokens)))?
                    .logits;
                match truncate {
                    Some(n) => truncate_vocab(&logits, n),
                    None => Ok(logits),
                }
            };
            let switch = out
                .image_features
                .as_ref()
                .filter(|_| objective.needs_switch())
                .map(|student_visual| SwitchPath {
                    student_visual,
                    teacher_reads: &reads,
                });
            micro_loss(
                student,
                objective,
                batch,
                StudentLogits::Full(&s_logits),
                Some(side),
                Extras {
                    layers: Some(layers),
                    switch,
                    routers: &out.layers.router_logits,
                    chunk: None,
                },
                forward,
            )
        }
    }
}

/// The head's first `truncate` rows (the vocabulary both sides compare; `whose` names the
/// other side).
fn cut_head(model: &LlavaModel, truncate: Option<usize>, whose: &str) -> Result<Tensor> {
    let head = model.lm.lm_head_weight();
    match truncate {
        Some(n) => {
            let have = head.dim(0)?;
            ensure!(
                n <= have,
                "cannot cut the vocabulary of {have} to {whose} {n}: it is larger"
            );
            Ok(head.narrow(0, 0, n)?)
        }
        None => Ok(head.clone()),
    }
}

/// [`objective_loss`] from the student's final hidden states and head, its logits formed only
/// at the rows the terms read: against a cache, and for a chunked objective (`chunk`), whose
/// online teacher is read through its hidden states and head too.
fn loss_at_rows(
    student: &LlavaModel,
    batch: StudentBatch<'_>,
    teacher: TeacherRows<'_>,
    objective: &Objective,
    chunk: Option<usize>,
) -> Result<MicroLoss> {
    let clock = Instant::now();
    let out = student.forward_images_hidden(batch.tokens, batch.images)?;
    let forward = clock.elapsed().as_secs_f64();
    // An online teacher's hidden states, also from one that formed its logits anyway (a
    // held-out pass beside a run that is not chunked).
    let online = match teacher {
        TeacherRows::OnlineHidden {
            hidden,
            teacher,
            truncate,
        } => Some((hidden, teacher, truncate)),
        TeacherRows::Online {
            output,
            teacher,
            truncate,
            aligned: None,
        } => Some((&output.hidden, teacher, truncate)),
        TeacherRows::Online { .. } => bail!(
            "a chunked objective compares one vocabulary; this teacher reads its own tokenization"
        ),
        TeacherRows::None | TeacherRows::Cached { .. } => None,
    };
    let (side, head, teacher_head);
    match (online, teacher) {
        (Some((hidden, teacher, truncate)), _) => {
            head = cut_head(student, truncate, "the teacher's")?;
            teacher_head = cut_head(teacher, truncate, "the student's")?;
            side = Some(TeacherSide::Hidden {
                hidden,
                head: &teacher_head,
            });
        }
        (None, TeacherRows::Cached { rows, truncate }) => {
            head = cut_head(student, truncate, "the cache's")?;
            side = Some(TeacherSide::Cached(CachedTeacher {
                response: &rows.response,
                visual: &rows.visual,
                relations: &rows.relations,
            }));
        }
        (None, _) => {
            head = student.lm.lm_head_weight().clone();
            side = None;
        }
    }
    let logits = StudentLogits::AtRows {
        hidden: &out.hidden,
        head: &head,
    };
    let extras = Extras {
        routers: &out.router_logits,
        chunk,
        ..Extras::default()
    };
    micro_loss(student, objective, batch, logits, side, extras, forward)
}

/// What an online teacher's step adds for the terms that read more than logits.
#[derive(Default)]
struct Extras<'a> {
    layers: Option<LayerPair<'a>>,
    switch: Option<SwitchPath<'a>>,
    /// A sparse student's router logits per sparse layer (empty for a dense one).
    routers: &'a [Tensor],
    /// Logit rows computed at once (a chunked objective).
    chunk: Option<usize>,
}

/// The objective on one micro-batch's student logits and teacher side; `forward`: the seconds
/// the student's forward took.
fn micro_loss(
    student: &LlavaModel,
    objective: &Objective,
    batch: StudentBatch<'_>,
    logits: StudentLogits<'_>,
    side: Option<TeacherSide<'_>>,
    extras: Extras<'_>,
    forward: f64,
) -> Result<MicroLoss> {
    // The data's own answers, read by the cross-entropy of a micro-batch whose answers were
    // generated: one more forward of the student.
    let data_logits = match batch.data_answers {
        Some((tokens, _)) if objective.needs_data_answers() => {
            Some(student.forward_images(tokens, batch.images)?.logits)
        }
        _ => None,
    };
    let mut inputs = LossInputs::new(logits, batch.labels, batch.visual_mask, side, None)?;
    if let Some(rows) = extras.chunk {
        inputs = inputs.with_chunk_rows(rows)?;
    }
    if let (Some(logits), Some((_, labels))) = (&data_logits, batch.data_answers) {
        inputs = inputs.with_data_answers(logits, labels)?;
    }
    if let Some(policy) = batch.policy {
        inputs = inputs.with_policy(policy);
    }
    if let Some(layers) = extras.layers {
        inputs = inputs.with_layers(layers);
    }
    if let Some(switch) = extras.switch {
        inputs = inputs.with_switch(switch);
    }
    let token_mask = match student.config.text_config.moe_shape() {
        Some(shape) if !extras.routers.is_empty() => {
            let flat: Vec<f32> = batch
                .tokens
                .mask
                .iter()
                .flatten()
                .map(|&m| f32::from(m))
                .collect();
            let n = flat.len();
            Some((Tensor::from_vec(flat, n, student.device())?, shape.top_k))
        }
        _ => None,
    };
    if let Some((token_mask, top_k)) = &token_mask {
        inputs = inputs.with_routers(Routers {
            logits: extras.routers,
            top_k: *top_k,
            token_mask,
        });
    }
    let value = objective.evaluate(&inputs)?;
    let mut loss = MicroLoss::new(value.total, value.total_value, value.terms);
    loss.student_forward_seconds = forward;
    Ok(loss)
}

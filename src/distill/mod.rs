//! Distillation losses (LLaVA-KD): MDist (response and visual output distributions), RDist
//! (visual-token relations), the divergence menu they use, and the combined objective with the
//! masked cross-entropy every stage trains on; the same objective against a teacher kept as
//! top-k log-probabilities in an offline cache (`topk`).

pub mod align;
pub mod balance;
mod ce;
pub mod chunked;
pub mod config;
pub mod dbild;
pub mod divergence;
pub mod inputs;
mod logprob;
pub mod loss;
pub mod mdist;
pub mod policy;
pub mod positions;
pub mod rdist;
mod sides;
pub mod topk;
pub mod uld;

pub use ce::cross_entropy;
pub use config::DistillLossConfig;
pub use divergence::Divergence;
pub use inputs::{
    CachedTeacher, LayerPair, LossInputs, RelationHidden, Rows, StudentLogits, SwitchPath,
    TeacherSide,
};
pub use logprob::log_softmax;
pub use loss::{
    distill_loss, distill_loss_cached, truncate_vocab, weighted_sum, CachedDistillBatch,
    DistillBatch, LossTerms,
};
pub use mdist::{response_loss, visual_loss};
pub use positions::{visual_mask_from_ids, visual_positions_per_sample, IGNORE_INDEX};
pub use rdist::{
    hidden_form_is_cheaper, relation_loss, relation_loss_from_hidden, relation_loss_to_cached,
    relation_matrices, relation_matrices_from_hidden, student_hidden_form_is_cheaper,
    StudentRelation,
};
pub use topk::{topk_per_token, TopKHost, TopKRows};

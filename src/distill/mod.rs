//! Distillation losses (LLaVA-KD): MDist (response and visual output distributions), RDist
//! (visual-token relations), the divergence menu they use, and the combined objective with the
//! masked cross-entropy every stage trains on.

pub mod divergence;
mod logprob;
pub mod loss;
pub mod mdist;
pub mod positions;
pub mod rdist;

pub use divergence::Divergence;
pub use logprob::log_softmax;
pub use loss::{
    cross_entropy, distill_loss, truncate_vocab, DistillBatch, DistillLossConfig, LossTerms,
    RelationHidden,
};
pub use mdist::{response_loss, visual_loss};
pub use positions::{visual_mask_from_ids, IGNORE_INDEX};
pub use rdist::{hidden_form_is_cheaper, relation_loss, relation_loss_from_hidden};

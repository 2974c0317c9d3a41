//! Training objectives composed by name. A stage's objective is a list of weighted terms
//! (`[[stages.<stage>.objective]]` in a preset); each term says what it reads ([`Needs`]: a
//! teacher, the teacher's relation matrices, the temperature of the teacher's probabilities)
//! and gives one scalar per micro-batch. The built-in stages are objectives too: `ce` for
//! pretrain and SFT, `ce + α·mdist.response + β·mdist.visual + γ·rdist` (the `[distill]`
//! weights) for DPT and DFT.
//!
//! Adding a method: write a [`Term`] in `terms/` and list it in [`terms::TERMS`].

mod spec;
pub mod terms;

use std::fmt;

use anyhow::{bail, ensure, Context, Result};
use candle_core::Tensor;
use serde::Serialize;

use std::sync::Arc;

use crate::distill::align::Alignment;
use crate::distill::uld::SharedVocab;
use crate::distill::{weighted_sum, DistillLossConfig, LossInputs};
use mmkd_nn::ParamBuilder;
pub use spec::{HiddenDistance, TermConfig, TermPositions, TermSpec, VocabMatch};
pub use terms::{TermKind, TERMS};

/// One loss term of an objective.
pub trait Term: Send + Sync + fmt::Debug {
    /// What the term reads besides the student.
    fn needs(&self) -> Needs;
    /// The term's unweighted value on one micro-batch (part of the graph); `None` when the
    /// batch has nothing it reads (no supervised token, no image).
    fn loss(&self, inputs: &LossInputs<'_>) -> Result<Option<Tensor>>;
    /// Settles what depends on the models (layer maps, widths) and creates the term's own
    /// trainable parameters under `binding.params` (e.g. a projection between two widths).
    /// These train with the student, are saved in its checkpoints' training state and are not
    /// part of the exported student.
    fn bind(&mut self, _binding: &Binding) -> Result<()> {
        Ok(())
    }
    /// The decoder layers whose hidden states the term reads: (student's, teacher's).
    fn layers(&self) -> (Vec<usize>, Vec<usize>) {
        (Vec::new(), Vec::new())
    }
    /// How the term pairs a teacher's tokenization of the responses with the student's, when
    /// it takes a teacher with another tokenizer.
    fn alignment(&self) -> Option<Alignment> {
        None
    }
}

/// What a term's [`Term::bind`] sees: the two language models' shapes and where its
/// parameters go.
#[derive(Clone)]
pub struct Binding {
    pub student: LmShape,
    /// `None` without an online teacher.
    pub teacher: Option<LmShape>,
    /// Rooted at `objective`; each term gets its own prefix (its logged name).
    pub params: ParamBuilder,
    /// The entries the two vocabularies share, when the teacher's tokenizer is not the
    /// student's (`None`: one tokenizer).
    pub shared_vocab: Option<Arc<SharedVocab>>,
}

/// A decoder's depth and width, as the terms that read hidden states need them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LmShape {
    /// Decoder layers (hidden states 0 = embeddings ..= layers).
    pub layers: usize,
    /// Hidden width.
    pub width: usize,
}

/// The prefix of the objective's own parameters in a checkpoint's training state.
pub const PARAMS_PREFIX: &str = "objective";

/// What a term reads besides the student.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Needs {
    /// A teacher signal (an online teacher or a teacher cache).
    pub teacher: bool,
    /// The teacher's visual-token relation matrices (a cache must hold them).
    pub teacher_relations: bool,
    /// The teacher's distributions at the image tokens (a cache must hold them).
    pub teacher_visual: bool,
    /// The teacher's full logits (an online teacher: a cache keeps only the top-k).
    pub teacher_logits: bool,
    /// The temperature the teacher's probabilities are read at (a cache stores them at one).
    pub teacher_temperature: Option<f64>,
    /// The online teacher run on the student's visual tokens (Switch-KD's visual switch).
    pub switch: bool,
    /// Works with a teacher whose tokenizer is not the student's (it reads the teacher on its
    /// own tokenization, paired by [`Term::alignment`]).
    pub any_tokenizer: bool,
    /// The per-token constants of answers the student sampled (the stage must roll out:
    /// `[rollout]`).
    pub rollouts: bool,
    /// The data's own answers, also on a micro-batch the student answered itself (the
    /// cross-entropy: the language-modelling loss stays on the data).
    pub data_answers: bool,
    /// Reads logits only row by row at the response or visual rows, or hidden states, so a
    /// chunked loss serves it ([`crate::distill::chunked`]).
    pub chunkable: bool,
}

/// A term with its weight and the name it is logged under.
#[derive(Debug)]
struct Entry {
    name: String,
    kind: &'static str,
    weight: f64,
    term: Box<dyn Term>,
}

/// A stage's objective: Σ weight·term over its terms.
#[derive(Debug)]
pub struct Objective {
    entries: Vec<Entry>,
    /// Rows of logits its terms compute at once (see [`Objective::chunk_loss`]).
    chunk_rows: Option<usize>,
}

/// Each term's value on one micro-batch (or its mean over a step), by logged name, in the
/// objective's order; `None` where the batch had nothing for the term or its weight is 0.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct TermValues(pub Vec<(String, Option<f32>)>);

impl TermValues {
    pub fn get(&self, name: &str) -> Option<f32> {
        self.0.iter().find(|(n, _)| n == name).and_then(|(_, v)| *v)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(n, _)| n.as_str())
    }
}

/// One micro-batch's objective: the total to backpropagate and each term's value.
#[derive(Clone, Debug)]
pub struct ObjectiveValue {
    pub total: Tensor,
    pub total_value: f32,
    pub terms: TermValues,
}

impl Objective {
    /// Builds the objective of `specs`; options a term leaves unset come from `defaults` (the
    /// preset's `[distill]` section). Unknown terms or options are errors listing the valid
    /// ones.
    pub fn new(specs: &[TermSpec], defaults: &DistillLossConfig) -> Result<Self> {
        ensure!(
            !specs.is_empty(),
            "the objective has no term (known: {})",
            terms::known()
        );
        let mut entries: Vec<Entry> = Vec::new();
        for spec in specs {
            let kind = terms::kind(&spec.term)?;
            ensure!(
                spec.weight.is_finite() && spec.weight >= 0.0,
                "objective term `{}`: weight must be ≥ 0, got {}",
                spec.term,
                spec.weight
            );
            let term = (kind.build)(&spec.resolve(kind, defaults)?)
                .with_context(|| format!("objective term `{}`", spec.term))?;
            let name = spec.name.clone().unwrap_or_else(|| kind.log_name.into());
            ensure!(
                !matches!(
                    name.as_str(),
                    "step" | "epoch" | "loss" | "grad_norm" | "lr" | "samples_per_s" | "samples"
                ),
                "objective term `{}`: `{name}` is a metrics field; give the term another `name`",
                spec.term
            );
            if entries.iter().any(|e| e.name == name) {
                bail!("the objective names `{name}` twice: give one of the terms another `name`");
            }
            entries.push(Entry {
                name,
                kind: kind.name,
                weight: spec.weight,
                term,
            });
        }
        Ok(Self {
            entries,
            chunk_rows: None,
        })
    }

    /// Binds every term to the models (see [`Term::bind`]); `binding.params` should be rooted
    /// at [`PARAMS_PREFIX`]. Binding two objectives to one store shares their parameters.
    pub fn bind(&mut self, binding: &Binding) -> Result<()> {
        for e in &mut self.entries {
            let own = Binding {
                params: binding.params.pp(&e.name),
                ..binding.clone()
            };
            e.term
                .bind(&own)
                .with_context(|| format!("objective term `{}`", e.kind))?;
        }
        Ok(())
    }

    /// The decoder layers the active terms read hidden states of: (student's, teacher's),
    /// sorted, without repeats.
    pub fn layers(&self) -> (Vec<usize>, Vec<usize>) {
        let (mut student, mut teacher) = (Vec::new(), Vec::new());
        for e in self.active() {
            let (s, t) = e.term.layers();
            student.extend(s);
            teacher.extend(t);
        }
        for layers in [&mut student, &mut teacher] {
            layers.sort_unstable();
            layers.dedup();
        }
        (student, teacher)
    }

    /// The terms of `specs` that read no teacher (what can be measured where no teacher's
    /// output exists, e.g. on held-out data against a teacher cache).
    pub fn teacher_free_terms(
        specs: &[TermSpec],
        defaults: &DistillLossConfig,
    ) -> Result<Vec<TermSpec>> {
        let mut kept = Vec::new();
        for spec in specs {
            let kind = terms::kind(&spec.term)?;
            if !(kind.build)(&spec.resolve(kind, defaults)?)?
                .needs()
                .teacher
            {
                kept.push(spec.clone());
            }
        }
        Ok(kept)
    }

    /// The names the terms are logged under, in order.
    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    /// The first term (its registered name) that reads a teacher, if any.
    pub fn teacher_term(&self) -> Option<&'static str> {
        self.active()
            .find(|e| e.term.needs().teacher)
            .map(|e| e.kind)
    }

    /// The first term (its registered name) that reads the teacher's full logits, if any.
    pub fn teacher_logits_term(&self) -> Option<&'static str> {
        self.active()
            .find(|e| e.term.needs().teacher_logits)
            .map(|e| e.kind)
    }

    /// The first term that reads a teacher and needs it to share the student's tokenizer.
    pub fn one_vocabulary_term(&self) -> Option<&'static str> {
        self.active()
            .find(|e| {
                let needs = e.term.needs();
                needs.teacher && !needs.any_tokenizer
            })
            .map(|e| e.kind)
    }

    /// How the responses of a teacher with another tokenizer are paired with the student's
    /// (the first cross-tokenizer term's choice; text alignment by default).
    pub fn alignment(&self) -> Alignment {
        self.active()
            .find_map(|e| e.term.alignment())
            .unwrap_or_default()
    }

    /// Whether a term runs the teacher on the student's visual tokens.
    pub fn needs_switch(&self) -> bool {
        self.active().any(|e| e.term.needs().switch)
    }

    /// Whether a term reads the student's sampled answers' constants.
    pub fn needs_rollouts(&self) -> bool {
        self.active().any(|e| e.term.needs().rollouts)
    }

    /// Whether a term reads the data's own answers.
    pub fn needs_data_answers(&self) -> bool {
        self.active().any(|e| e.term.needs().data_answers)
    }

    /// Whether a term reads the teacher's distributions at the image tokens.
    pub fn needs_teacher_visual(&self) -> bool {
        self.active().any(|e| e.term.needs().teacher_visual)
    }

    /// Whether a term reads the teacher's relation matrices.
    pub fn needs_teacher_relations(&self) -> bool {
        self.active().any(|e| e.term.needs().teacher_relations)
    }

    /// The temperature each term reads the teacher's probabilities at.
    pub fn teacher_temperatures(&self) -> Vec<(&str, f64)> {
        self.active()
            .filter_map(|e| e.term.needs().teacher_temperature.map(|t| (e.kind, t)))
            .collect()
    }

    /// Computes the logits `rows` rows at a time from hidden states (`None`: all at once) when
    /// every term can be served that way ([`Needs::chunkable`]); otherwise all at once.
    pub fn chunk_loss(&mut self, rows: Option<usize>) {
        self.chunk_rows = rows.filter(|_| self.active().all(|e| e.term.needs().chunkable));
    }

    /// The rows of logits computed at once, when the loss is chunked.
    pub fn loss_chunk_rows(&self) -> Option<usize> {
        self.chunk_rows
    }

    /// Terms of positive weight (a zero weight turns a term off).
    fn active(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.weight > 0.0)
    }

    /// Every term on one micro-batch, then their weighted sum.
    pub fn evaluate(&self, inputs: &LossInputs<'_>) -> Result<ObjectiveValue> {
        let values = self
            .entries
            .iter()
            .map(|e| {
                if e.weight > 0.0 {
                    e.term.loss(inputs)
                } else {
                    Ok(None)
                }
            })
            .collect::<Result<Vec<Option<Tensor>>>>()?;
        let total = weighted_sum(
            values
                .iter()
                .zip(&self.entries)
                .map(|(v, e)| (v.as_ref(), e.weight)),
        )?;
        let Some(total) = total else {
            bail!(
                "the batch has nothing any term of the objective reads ({}): no supervised token{}; \
                 nothing to train on",
                self.names().join(", "),
                if self.entries.len() > 1 {
                    " and no visual position"
                } else {
                    ""
                }
            );
        };
        let terms = values
            .iter()
            .zip(&self.entries)
            .map(|(v, e)| Ok((e.name.clone(), v.as_ref().map(scalar).transpose()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(ObjectiveValue {
            total_value: scalar(&total)?,
            total,
            terms: TermValues(terms),
        })
    }
}

fn scalar(t: &Tensor) -> Result<f32> {
    Ok(t.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distill::{distill_loss, DistillBatch, Divergence, RelationHidden, StudentLogits};
    use candle_core::{Device, Var};

    fn spec(toml_text: &str) -> Vec<TermSpec> {
        #[derive(serde::Deserialize)]
        struct Doc {
            objective: Vec<TermSpec>,
        }
        toml::from_str::<Doc>(toml_text).unwrap().objective
    }

    /// A batch of random student and teacher logits with supervised and visual positions.
    struct Batch {
        student: Var,
        teacher: Tensor,
        labels: Tensor,
        mask: Tensor,
    }

    fn batch() -> Batch {
        let dev = Device::Cpu;
        let (b, s, v) = (2, 6, 11);
        Batch {
            student: Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, s, v), &dev).unwrap()).unwrap(),
            teacher: Tensor::randn(0f32, 2.0, (b, s, v), &dev).unwrap(),
            labels: Tensor::new(
                &[
                    [-100i64, -100, -100, 4, 7, 2],
                    [-100, -100, -100, 5, 1, -100],
                ],
                &dev,
            )
            .unwrap(),
            mask: Tensor::new(&[[0u8, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0]], &dev).unwrap(),
        }
    }

    fn inputs(b: &Batch) -> LossInputs<'_> {
        LossInputs::new(
            StudentLogits::Full(b.student.as_tensor()),
            &b.labels,
            &b.mask,
            Some(crate::distill::TeacherSide::Logits {
                logits: &b.teacher,
                relation_hidden: None,
            }),
            None,
        )
        .unwrap()
    }

    #[test]
    fn the_builtin_distillation_objective_is_llava_kd_bit_for_bit() {
        let b = batch();
        let cfg = DistillLossConfig {
            alpha_res: 0.7,
            gamma_rel: 0.5,
            ..Default::default()
        };
        let objective = Objective::new(&TermSpec::builtin(true, &cfg), &cfg).unwrap();
        let ours = objective.evaluate(&inputs(&b)).unwrap();
        let reference = distill_loss(
            &DistillBatch {
                student_logits: b.student.as_tensor(),
                teacher_logits: &b.teacher,
                labels: &b.labels,
                visual_mask: &b.mask,
                relation_hidden: None::<RelationHidden>,
            },
            &cfg,
        )
        .unwrap();
        assert_eq!(ours.total_value, reference.total_value);
        assert_eq!(
            ours.terms,
            TermValues(vec![
                ("ce".into(), reference.ce),
                ("l_res".into(), reference.l_res),
                ("l_vis".into(), reference.l_vis),
                ("l_rel".into(), reference.l_rel),
            ])
        );
        let (g1, g2) = (
            ours.total.backward().unwrap(),
            reference.total.backward().unwrap(),
        );
        let (g1, g2) = (
            g1.get(b.student.as_tensor()).unwrap(),
            g2.get(b.student.as_tensor()).unwrap(),
        );
        assert_eq!(
            g1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            g2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn terms_take_their_own_divergence_weight_and_name() {
        let b = batch();
        let defaults = DistillLossConfig::default();
        let objective = Objective::new(
            &spec(
                r#"
                [[objective]]
                term = "ce"
                [[objective]]
                term = "mdist.response"
                name = "rkl"
                weight = 0.5
                divergence = "reverse_kl"
                temperature = 2.0
                [[objective]]
                term = "mdist.response"
                "#,
            ),
            &defaults,
        )
        .unwrap();
        assert_eq!(objective.names(), ["ce", "rkl", "l_res"]);
        assert_eq!(objective.teacher_term(), Some("mdist.response"));
        assert!(!objective.needs_teacher_relations());
        assert_eq!(
            objective.teacher_temperatures(),
            [("mdist.response", 2.0), ("mdist.response", 1.0)]
        );
        let value = objective.evaluate(&inputs(&b)).unwrap();
        let (ce, rkl, fkl) = (
            value.terms.get("ce").unwrap(),
            value.terms.get("rkl").unwrap(),
            value.terms.get("l_res").unwrap(),
        );
        assert!((value.total_value - (ce + 0.5 * rkl + fkl)).abs() < 1e-5);
        // The reverse KL at T = 2 is its own number, not the forward one.
        let reverse = DistillLossConfig {
            divergence: Divergence::ReverseKl,
            temperature: 2.0,
            ..defaults
        };
        let expected =
            crate::distill::response_loss(b.student.as_tensor(), &b.teacher, &b.labels, &reverse)
                .unwrap()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
        assert_eq!(rkl, expected);
        assert_ne!(rkl, fkl);
    }

    #[test]
    fn a_zero_weight_turns_a_term_off_and_a_teacher_free_objective_needs_no_teacher() {
        let b = batch();
        let cfg = DistillLossConfig {
            beta_vis: 0.0,
            ..Default::default()
        };
        let objective = Objective::new(&TermSpec::builtin(true, &cfg), &cfg).unwrap();
        let value = objective.evaluate(&inputs(&b)).unwrap();
        assert_eq!(value.terms.get("l_vis"), None);
        assert!(
            value.terms.names().any(|n| n == "l_vis"),
            "still logged, as null"
        );

        let ce_only = Objective::new(&TermSpec::builtin(false, &cfg), &cfg).unwrap();
        assert_eq!(ce_only.teacher_term(), None);
        let no_teacher = LossInputs::new(
            StudentLogits::Full(b.student.as_tensor()),
            &b.labels,
            &b.mask,
            None,
            None,
        )
        .unwrap();
        let value = ce_only.evaluate(&no_teacher).unwrap();
        assert_eq!(value.terms.0.len(), 1);
        // A teacher term on a batch without a teacher is an error naming the term.
        let err = objective.evaluate(&no_teacher).unwrap_err().to_string();
        assert!(err.contains("L_res") && err.contains("teacher"), "{err}");
    }

    #[test]
    fn bad_objectives_are_errors_that_list_what_is_valid() {
        let defaults = DistillLossConfig::default();
        let err = |text: &str| format!("{:#}", Objective::new(&spec(text), &defaults).unwrap_err());
        let unknown = err("[[objective]]\nterm = \"kld\"");
        assert!(
            unknown.contains("unknown objective term `kld`"),
            "{unknown}"
        );
        for name in ["ce", "mdist.response", "mdist.visual", "rdist"] {
            assert!(unknown.contains(name), "{unknown} lacks {name}");
        }
        let option = err("[[objective]]\nterm = \"rdist\"\ntemperature = 2.0");
        assert!(
            option.contains("`rdist` takes no `temperature`") && option.contains("weight"),
            "{option}"
        );
        let twice = err("[[objective]]\nterm = \"ce\"\n[[objective]]\nterm = \"ce\"");
        assert!(twice.contains("names `ce` twice"), "{twice}");
        let negative = err("[[objective]]\nterm = \"ce\"\nweight = -1.0");
        assert!(negative.contains("weight must be ≥ 0"), "{negative}");
        let reserved = err("[[objective]]\nterm = \"ce\"\nname = \"loss\"");
        assert!(reserved.contains("metrics field"), "{reserved}");
        let bad_t = err("[[objective]]\nterm = \"mdist.visual\"\ntemperature = 0.0");
        assert!(bad_t.contains("temperature"), "{bad_t}");
        assert!(Objective::new(&[], &defaults).is_err());
        // A misspelt option is named by the preset reader.
        let typo = toml::from_str::<TermSpec>("term = \"ce\"\nwieght = 1.0")
            .unwrap_err()
            .to_string();
        assert!(
            typo.contains("unknown field `wieght`") && typo.contains("weight"),
            "{typo}"
        );
    }
}

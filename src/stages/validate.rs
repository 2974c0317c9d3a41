//! The validation pass of a stage (`train.validate_every`): the objective on held-out data
//! (no gradient, no update, no random number drawn), and VQA accuracy on held-out questions
//! when the split has them. Each pass is one line of `OUT/validation.jsonl`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use mmkd_datasets::{Template, TokenizedDataset};
use serde::{Deserialize, Serialize};

use crate::batch::{prepare_data, training_tokenize_config, ModelInputs};
use crate::checkpoint::LoadedModel;
use crate::config::StageSettings;
use crate::eval::files::{read_records, AnswerLine, QuestionLine};
use crate::eval::run::{score_vqa, vqa_prompts};
use crate::eval::Answerer;
use crate::models::llava::ImageInput;
use crate::objective::{Binding, Objective, TermValues};
use crate::teacher::{teacher_rows, TeacherSignal};
use crate::train::forward::{objective_loss, StudentBatch};

pub const VALIDATION_FILE: &str = "validation.jsonl";

/// Answers of at most this many new tokens (VQA answers are a word or two).
const MAX_NEW_TOKENS: usize = 16;

/// One validation pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidationRecord {
    /// Optimizer steps taken before the pass.
    pub step: usize,
    /// The objective on the held-out data (a sample-weighted mean over its batches); `None`
    /// without `data.val_data`.
    pub loss: Option<f32>,
    /// Each term it computed: the whole objective with an online teacher; with a teacher cache
    /// (which holds no held-out rows) or none, the terms that read no teacher.
    pub terms: TermValues,
    pub samples: usize,
    /// VQA accuracy (%) on the first `train.validate_questions` held-out questions.
    pub vqa_accuracy: Option<f64>,
    pub vqa_questions: usize,
    pub seconds: f64,
}

/// What the pass runs on, read once when the stage starts.
pub struct Validation {
    every: usize,
    data: Option<TokenizedDataset>,
    vqa: Option<(Vec<QuestionLine>, Vec<AnswerLine>)>,
    images: PathBuf,
    template: Template,
    batch_size: usize,
    objective: Objective,
    log: PathBuf,
}

impl Validation {
    /// The stage's validation, or `None` when `train.validate_every` is 0. `online_teacher`
    /// (the objective's binding) is given when the held-out objective can read the teacher;
    /// otherwise only the terms that read no teacher are measured.
    pub fn prepare(
        settings: &StageSettings,
        student: &LoadedModel,
        template: &Template,
        images: &Path,
        online_teacher: Option<&Binding>,
        out: &Path,
    ) -> Result<Option<Self>> {
        let every = settings.train.validate_every;
        if every == 0 {
            return Ok(None);
        }
        let data = settings
            .data
            .val_data
            .as_ref()
            .map(|path| {
                prepare_data(
                    path,
                    images,
                    &student.tokenizer,
                    template,
                    &training_tokenize_config(&student.model, settings.data.max_length),
                    "validation",
                )
            })
            .transpose()?;
        let vqa = match (&settings.data.val_questions, &settings.data.val_answers) {
            (Some(q), Some(a)) => {
                let mut questions: Vec<QuestionLine> = read_records(q)?;
                questions.truncate(settings.train.validate_questions);
                let ids: std::collections::HashSet<&str> =
                    questions.iter().map(|q| q.question_id.as_str()).collect();
                let answers: Vec<AnswerLine> = read_records::<AnswerLine>(a)?
                    .into_iter()
                    .filter(|r| ids.contains(r.question_id.as_str()))
                    .collect();
                Some((questions, answers))
            }
            _ => None,
        };
        let specs: Vec<_> = if online_teacher.is_some() {
            settings.objective.clone()
        } else {
            Objective::teacher_free_terms(&settings.objective, &settings.distill)?
        };
        let objective = if specs.is_empty() {
            // A teacher-only objective against a cache: the held-out data gets the CE.
            Objective::new(
                &crate::objective::TermSpec::builtin(false, &settings.distill),
                &settings.distill,
            )?
        } else {
            let mut objective = Objective::new(&specs, &settings.distill)?;
            if let Some(binding) = online_teacher {
                // The same store: the training run's parameters.
                objective.bind(binding)?;
            }
            objective
        };
        let mut objective = objective;
        objective.chunk_loss(settings.train.loss_chunk_rows_on(student.model.device()));
        Ok(Some(Self {
            every,
            data,
            vqa,
            images: images.to_path_buf(),
            template: template.clone(),
            batch_size: settings.train.batch_size,
            objective,
            log: out.join(VALIDATION_FILE),
        }))
    }

    /// Whether a pass runs after `done` of `total` steps.
    pub fn due(&self, done: usize, total: usize) -> bool {
        done.is_multiple_of(self.every) || done == total
    }

    /// Keeps the log's passes up to `step` (a resumed run re-runs the later ones).
    pub fn truncate_log(&self, step: Option<usize>) -> Result<()> {
        let kept: Vec<ValidationRecord> = match step {
            Some(step) if self.log.exists() => read_validation(&self.log)?
                .into_iter()
                .filter(|r| r.step <= step)
                .collect(),
            _ => Vec::new(),
        };
        let mut text = String::new();
        for r in &kept {
            text.push_str(&serde_json::to_string(r)?);
            text.push('\n');
        }
        std::fs::write(&self.log, text).with_context(|| format!("writing {}", self.log.display()))
    }

    /// One pass after `step` steps, appended to `validation.jsonl`.
    pub fn run(
        &self,
        step: usize,
        student: &Arc<LoadedModel>,
        teacher: Option<&TeacherSignal>,
    ) -> Result<ValidationRecord> {
        let started = Instant::now();
        // A teacher with another tokenizer has tokenized the training data only.
        let online = teacher.filter(|t| t.is_online() && !t.reads_own_tokens());
        let (loss, terms, samples) = match &self.data {
            Some(data) => self.held_out_loss(data, student, online)?,
            None => (None, TermValues::default(), 0),
        };
        let (vqa_accuracy, vqa_questions) = match &self.vqa {
            Some((questions, answers)) => {
                let answerer = Answerer::new(
                    student.clone(),
                    self.template.clone(),
                    self.batch_size.max(8),
                    MAX_NEW_TOKENS,
                    format!("step-{step}"),
                );
                let items = vqa_prompts(questions, &self.images, "");
                let (predictions, _) = answerer.answer_all(&items, "validate", false)?;
                let summary = score_vqa(questions, &predictions, answers)?;
                (Some(summary.accuracy), questions.len())
            }
            None => (None, 0),
        };
        let record = ValidationRecord {
            step,
            loss,
            terms,
            samples,
            vqa_accuracy,
            vqa_questions,
            seconds: started.elapsed().as_secs_f64(),
        };
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        writeln!(file, "{}", serde_json::to_string(&record)?)
            .with_context(|| format!("writing {}", self.log.display()))?;
        Ok(record)
    }

    /// The objective over every held-out sample, in order, `batch_size` at a time.
    fn held_out_loss(
        &self,
        data: &TokenizedDataset,
        student: &LoadedModel,
        teacher: Option<&TeacherSignal>,
    ) -> Result<(Option<f32>, TermValues, usize)> {
        let mut loss_sum = 0f64;
        let mut term_sums: Vec<(String, f64, usize)> = self
            .objective
            .names()
            .into_iter()
            .map(|n| (n, 0.0, 0))
            .collect();
        let mut samples = 0;
        let indices: Vec<usize> = (0..data.samples.len()).collect();
        for chunk in indices.chunks(self.batch_size.max(1)) {
            let inputs = ModelInputs::collate(&data.samples, chunk.to_vec(), student)?;
            let teacher_out = match teacher {
                Some(t) => t.forward_ahead(&inputs, &data.samples)?,
                None => None,
            };
            let loss = objective_loss(
                &student.model,
                StudentBatch::of_data(
                    &inputs.tokens,
                    &inputs.labels,
                    &inputs.visual_mask,
                    inputs.pixels.as_ref().map(ImageInput::Pixels),
                ),
                teacher_rows(teacher, teacher_out.as_ref(), None)?,
                &self.objective,
            )
            .with_context(|| {
                format!(
                    "validation on samples {}",
                    inputs.collated.sample_ids.join(", ")
                )
            })?;
            let n = chunk.len();
            samples += n;
            loss_sum += loss.value as f64 * n as f64;
            for ((_, sum, seen), (_, value)) in term_sums.iter_mut().zip(&loss.terms.0) {
                if let Some(v) = value {
                    *sum += *v as f64 * n as f64;
                    *seen += n;
                }
            }
        }
        let terms = TermValues(
            term_sums
                .into_iter()
                .map(|(name, sum, seen)| (name, (seen > 0).then(|| (sum / seen as f64) as f32)))
                .collect(),
        );
        let loss = (samples > 0).then(|| (loss_sum / samples as f64) as f32);
        Ok((loss, terms, samples))
    }
}

/// Reads `validation.jsonl`; a bad line is an error naming the file and line.
pub fn read_validation(path: &Path) -> Result<Vec<ValidationRecord>> {
    read_records(path)
}

//! How well each student drafts for its teacher: greedy speculative decoding (γ
//! [`GAMMA`]) of the first [`QUESTIONS`] test VQA questions with the teacher verifying, the
//! acceptance rate recorded per model (the practical payoff of distillation: Online
//! Speculative Decoding, Liu et al. 2023).

use std::cell::OnceCell;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::settings::DemoSettings;
use crate::eval::files::{read_records, QuestionLine};
use crate::eval::run::vqa_prompts;
use crate::eval::{Answerer, PromptItem};
use crate::models::llava::{BuildOptions, Trainable};

/// Tokens the draft proposes a round.
pub const GAMMA: usize = 4;
/// Test questions drafted.
pub const QUESTIONS: usize = 100;
/// Where a model's figures are kept under its evaluation directory.
const FILE: &str = "speculative.json";

/// One model as the teacher's draft.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Drafting {
    pub proposed: usize,
    pub accepted: usize,
    pub acceptance_rate: f64,
    /// Teacher forwards per generated token would be 1 without a draft.
    pub target_forwards: usize,
}

/// One seed's teacher as the target of its students' drafts: the teacher loaded and the
/// questions read once, on the first student whose figures are not kept already.
pub struct Drafts<'a> {
    teacher: &'a Path,
    data: &'a Path,
    demo: &'a DemoSettings,
    template: &'a str,
    target: OnceCell<(Answerer, Vec<PromptItem>)>,
}

impl<'a> Drafts<'a> {
    pub fn new(
        teacher: &'a Path,
        data: &'a Path,
        demo: &'a DemoSettings,
        template: &'a str,
    ) -> Self {
        Self {
            teacher,
            data,
            demo,
            template,
            target: OnceCell::new(),
        }
    }

    fn target(&self) -> Result<&(Answerer, Vec<PromptItem>)> {
        if let Some(target) = self.target.get() {
            return Ok(target);
        }
        let answerer = Answerer::load(
            self.teacher.to_str().context("non-UTF-8 path")?,
            Some(self.template),
            1,
            self.demo.max_new_tokens,
            crate::runtime::DeviceSpec::Cpu,
        )?;
        let questions: Vec<QuestionLine> = read_records(
            &self
                .data
                .join(self.demo.eval_split.name())
                .join("questions.jsonl"),
        )?;
        let items = vqa_prompts(&questions[..questions.len().min(QUESTIONS)], self.data, "");
        Ok(self.target.get_or_init(|| (answerer, items)))
    }

    /// `draft`'s acceptance as the teacher's draft (kept in `eval_dir`, read back when there).
    pub fn drafting(&self, draft: &Path, eval_dir: &Path) -> Result<Drafting> {
        let file = eval_dir.join(FILE);
        if let Ok(text) = std::fs::read_to_string(&file) {
            if let Ok(done) = serde_json::from_str(&text) {
                return Ok(done);
            }
        }
        let (target, items) = self.target()?;
        let draft_model = crate::checkpoint::LoadedModel::load(
            draft.to_str().context("non-UTF-8 path")?,
            &BuildOptions::new(Trainable::NONE, 0),
        )?;
        let stats = target
            .speculate(&draft_model, items, GAMMA)
            .with_context(|| {
                format!(
                    "{} drafting for {}",
                    draft.display(),
                    self.teacher.display()
                )
            })?;
        let result = Drafting {
            proposed: stats.proposed,
            accepted: stats.accepted,
            acceptance_rate: 100.0 * stats.acceptance_rate(),
            target_forwards: stats.target_forwards,
        };
        std::fs::create_dir_all(eval_dir)?;
        std::fs::write(&file, serde_json::to_string_pretty(&result)?)?;
        Ok(result)
    }
}

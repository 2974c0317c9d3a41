//! Conversation templates as data: each template is a TOML file giving the exact strings around
//! the system text, the questions and the answers. The six LLaVA templates ship in
//! `datasets/templates/` (embedded in the binary); users can load their own with
//! [`Template::from_file`].
//!
//! A conversation is laid out as
//! `bos + system_prefix + system + system_suffix`, then for every round
//! `user_prefix + question + user_suffix + assistant_prefix + ANSWER + answer_end + assistant_suffix`,
//! where only `ANSWER + answer_end` is supervised.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where a sample's single image goes in its human turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImagePlacement {
    /// LLaVA's behaviour: with one image, `<image>` is removed from the question, the question is
    /// trimmed and the turn becomes `<image>` + `image_separator` + question. Samples with several
    /// images keep their placeholders where they are.
    Front,
    /// Placeholders stay exactly where the data puts them.
    AsWritten,
}

/// What the human turns contribute to the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HumanText {
    /// The question is written out.
    Keep,
    /// Only the turn's images are kept (LLaVA's `plain` pretraining: image then caption).
    ImagesOnly,
}

/// A conversation template. Field meanings are in the module documentation; every field is a
/// literal string (special tokens such as `<|im_end|>` are written as text and must be tokens of
/// the tokenizer).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Text at the very start of the sequence (a BOS token for Llama-family tokenizers).
    #[serde(default)]
    pub bos: String,
    #[serde(default)]
    pub system: String,
    #[serde(default)]
    pub system_prefix: String,
    #[serde(default)]
    pub system_suffix: String,
    #[serde(default)]
    pub user_prefix: String,
    #[serde(default)]
    pub user_suffix: String,
    #[serde(default)]
    pub assistant_prefix: String,
    /// Closes every answer and is supervised with it (an end-of-turn token, or "\n" for `plain`).
    pub answer_end: String,
    /// After `answer_end`, not supervised (e.g. the "\n" after `<|im_end|>` in ChatML).
    #[serde(default)]
    pub assistant_suffix: String,
    pub image_placement: ImagePlacement,
    /// Between a front-placed image and the question.
    #[serde(default)]
    pub image_separator: String,
    pub human_text: HumanText,
    /// Only one question/answer round per sample (`plain`).
    #[serde(default)]
    pub single_round: bool,
}

/// The shipped templates, by name.
const BUILTIN: &[(&str, &str)] = &[
    ("plain", include_str!("../templates/plain.toml")),
    ("vicuna_v1", include_str!("../templates/vicuna_v1.toml")),
    ("phi", include_str!("../templates/phi.toml")),
    ("qwen2_base", include_str!("../templates/qwen2_base.toml")),
    ("chatml", include_str!("../templates/chatml.toml")),
    ("llama3", include_str!("../templates/llama3.toml")),
];

impl Template {
    /// Names of the shipped templates.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }

    /// A shipped template by name.
    pub fn builtin(name: &str) -> Result<Template> {
        let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) else {
            bail!(
                "unknown template {name:?}; shipped templates: {}",
                Self::builtin_names().join(", ")
            );
        };
        Self::from_toml_str(text, &format!("built-in template {name}"))
    }

    /// Parse a template from TOML text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Template> {
        let t: Template =
            toml::from_str(text).with_context(|| format!("invalid template in {origin}"))?;
        t.validate()
            .with_context(|| format!("invalid template in {origin}"))?;
        Ok(t)
    }

    /// Load a template from a TOML file.
    pub fn from_file(path: &Path) -> Result<Template> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read template {}", path.display()))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// A shipped name, or else a path to a TOML file.
    pub fn by_name_or_path(spec: &str) -> Result<Template> {
        if BUILTIN.iter().any(|(n, _)| *n == spec) {
            return Self::builtin(spec);
        }
        let path = Path::new(spec);
        if path.is_file() {
            return Self::from_file(path);
        }
        bail!(
            "{spec:?} is neither a shipped template ({}) nor a template file",
            Self::builtin_names().join(", ")
        )
    }

    fn validate(&self) -> Result<()> {
        if self.answer_end.is_empty() {
            bail!("`answer_end` is empty: every answer needs a supervised end so the model learns to stop");
        }
        let fields = [
            ("bos", &self.bos),
            ("system", &self.system),
            ("system_prefix", &self.system_prefix),
            ("system_suffix", &self.system_suffix),
            ("user_prefix", &self.user_prefix),
            ("user_suffix", &self.user_suffix),
            ("assistant_prefix", &self.assistant_prefix),
            ("answer_end", &self.answer_end),
            ("assistant_suffix", &self.assistant_suffix),
            ("image_separator", &self.image_separator),
        ];
        for (name, value) in fields {
            if value.contains(crate::sample::IMAGE_PLACEHOLDER) {
                bail!(
                    "`{name}` contains the image placeholder {:?}",
                    crate::sample::IMAGE_PLACEHOLDER
                );
            }
        }
        Ok(())
    }

    /// The text before the first question (BOS and system block).
    pub fn preamble(&self) -> String {
        format!(
            "{}{}{}{}",
            self.bos, self.system_prefix, self.system, self.system_suffix
        )
    }

    /// The prompt text for generation: the conversation so far (all rounds answered) followed by
    /// `question` and the assistant prefix, with images as `<image>` placeholders. `history` holds
    /// (question, answer) pairs; images are placed as in training.
    pub fn generation_prompt(
        &self,
        history: &[(&str, &str)],
        question: &str,
        num_images: usize,
    ) -> String {
        let mut out = self.preamble();
        let mut first = true;
        for (q, a) in history {
            out.push_str(&self.user_prefix);
            out.push_str(&self.human_content(q, if first { num_images } else { 0 }));
            out.push_str(&self.user_suffix);
            out.push_str(&self.assistant_prefix);
            out.push_str(a);
            out.push_str(&self.answer_end);
            out.push_str(&self.assistant_suffix);
            first = false;
        }
        out.push_str(&self.user_prefix);
        out.push_str(&self.human_content(question, if first { num_images } else { 0 }));
        out.push_str(&self.user_suffix);
        out.push_str(&self.assistant_prefix);
        out
    }

    /// The human turn's text with its image placeholders placed by this template.
    /// `images_here` is how many images belong to this turn when its text has no placeholder
    /// (they are put in front, as LLaVA does); with placeholders present it is ignored.
    pub fn human_content(&self, question: &str, images_here: usize) -> String {
        use crate::sample::IMAGE_PLACEHOLDER as TAG;
        let written = question.matches(TAG).count();
        let images = if written > 0 { written } else { images_here };
        match self.human_text {
            HumanText::ImagesOnly => TAG.repeat(images),
            HumanText::Keep if images == 0 => question.to_string(),
            HumanText::Keep
                if images == 1
                    && (self.image_placement == ImagePlacement::Front || written == 0) =>
            {
                let rest = question.replace(TAG, "");
                let rest = rest.trim();
                if rest.is_empty() {
                    TAG.to_string()
                } else {
                    format!("{TAG}{}{rest}", self.image_separator)
                }
            }
            HumanText::Keep if written == 0 => {
                format!(
                    "{}{}",
                    format!("{TAG}{}", self.image_separator).repeat(images),
                    question.trim()
                )
            }
            HumanText::Keep => question.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_template_parses() {
        for name in Template::builtin_names() {
            let t = Template::builtin(name).unwrap();
            assert_eq!(t.name, name);
        }
    }

    #[test]
    fn unknown_field_and_unknown_name_are_errors() {
        let err = Template::from_toml_str("name = \"x\"\nanswer_end = \"</s>\"\nimage_placement = \"front\"\nhuman_text = \"keep\"\nuser_prefx = \"U\"\n", "test.toml")
            .unwrap_err();
        assert!(format!("{err:#}").contains("user_prefx"), "{err:#}");
        let err = Template::builtin("vicuna").unwrap_err();
        assert!(err.to_string().contains("vicuna_v1"), "{err}");
    }

    #[test]
    fn front_placement_moves_single_image_like_llava() {
        let t = Template::builtin("phi").unwrap();
        assert_eq!(
            t.human_content("What is this?\n<image>", 1),
            "<image>\nWhat is this?"
        );
        assert_eq!(t.human_content("  Describe.  ", 1), "<image>\nDescribe.");
        assert_eq!(t.human_content("<image>", 1), "<image>");
        assert_eq!(
            t.human_content("Compare <image> and <image>.", 2),
            "Compare <image> and <image>."
        );
        assert_eq!(
            t.human_content("Compare them.", 2),
            "<image>\n<image>\nCompare them."
        );
        let plain = Template::builtin("plain").unwrap();
        assert_eq!(plain.human_content("Describe.\n<image>", 1), "<image>");
    }

    #[test]
    fn generation_prompt_matches_phi_layout() {
        let t = Template::builtin("phi").unwrap();
        let sys = "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions.";
        assert_eq!(
            t.generation_prompt(&[("What color?", "red")], "What shape?", 1),
            format!("{sys} USER: <image>\nWhat color? ASSISTANT: red<|endoftext|>USER: What shape? ASSISTANT: ")
        );
    }
}

//! What is kept of the teacher's replies: each dropped reply is counted under its reason, so a
//! manifest accounts for every prompt sent.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use super::recipe::{normalize, Mode, PlannedPrompt, Recipe};

/// Why a reply was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reject {
    /// The request failed after its retries (refused, timed out, malformed reply).
    RequestFailed,
    /// Nothing (or only whitespace) was written.
    Empty,
    /// Cut off at `max_tokens`, or a final answer over `max_answer_words`.
    OverLong,
    /// No `Question:` / `Answer:` where the recipe asks for them.
    Unparsed,
    /// The final answer is not in the template's answer set.
    OutsideAnswerSet,
    /// The teacher's mean token log-probability is below `min_mean_logprob`.
    LowLogprob,
    /// The same instruction and answer as a sample already kept for the image.
    Duplicate,
    /// n-gram Jaccard similarity with a kept sample of the image at or above the threshold.
    NearDuplicate,
    /// The sample has no supervised answer token once tokenized, or does not fit max_length.
    SupervisedSpan,
    /// `--keep-logprobs` with a server: its tokens are not the student's answer tokens.
    UnalignedLogprobs,
}

impl Reject {
    pub const ALL: [Reject; 10] = [
        Reject::RequestFailed,
        Reject::Empty,
        Reject::OverLong,
        Reject::Unparsed,
        Reject::OutsideAnswerSet,
        Reject::LowLogprob,
        Reject::Duplicate,
        Reject::NearDuplicate,
        Reject::SupervisedSpan,
        Reject::UnalignedLogprobs,
    ];

    /// The reason's name in manifests and reports.
    pub fn name(self) -> &'static str {
        match self {
            Reject::RequestFailed => "request_failed",
            Reject::Empty => "empty",
            Reject::OverLong => "over_long",
            Reject::Unparsed => "unparsed",
            Reject::OutsideAnswerSet => "outside_answer_set",
            Reject::LowLogprob => "low_logprob",
            Reject::Duplicate => "duplicate",
            Reject::NearDuplicate => "near_duplicate",
            Reject::SupervisedSpan => "supervised_span",
            Reject::UnalignedLogprobs => "unaligned_logprobs",
        }
    }
}

/// Dropped replies by reason.
pub type RejectCounts = BTreeMap<Reject, usize>;

/// What a teacher wrote for one prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub text: String,
    /// Generation stopped by itself (not cut at `max_tokens`).
    pub finished: bool,
    /// Log-probability of each generated token, when the teacher reports them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_logprobs: Option<Vec<f32>>,
    /// The server's tokens and their alternatives (`top_logprobs`), when asked for.
    #[serde(skip)]
    pub alternatives: Vec<super::client::TokenAlternatives>,
}

/// A question and answer as they go into the data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Written {
    pub question: String,
    /// The whole response (with its reasoning when the recipe asks for it).
    pub response: String,
}

/// The instruction and response a reply makes under the recipe, or why it cannot make one:
/// the checks on the reply alone (not against the image's other samples).
pub fn accept(recipe: &Recipe, prompt: &PlannedPrompt, reply: &Reply) -> Result<Written, Reject> {
    let text = reply.text.trim();
    if text.is_empty() {
        return Err(Reject::Empty);
    }
    if !reply.finished {
        return Err(Reject::OverLong);
    }
    let (question, response) = match recipe.mode {
        Mode::Answer => (prompt.instruction.clone(), text.to_string()),
        Mode::Instruct => {
            let (q, a) = split_labelled(text).ok_or(Reject::Unparsed)?;
            (q, a)
        }
    };
    let final_answer = if recipe.generation.rationale {
        last_labelled(&response, "answer:").ok_or(Reject::Unparsed)?
    } else {
        response.clone()
    };
    if final_answer.trim().is_empty() {
        return Err(Reject::Empty);
    }
    if let Some(max) = recipe.filters.max_answer_words {
        if final_answer.split_whitespace().count() > max {
            return Err(Reject::OverLong);
        }
    }
    if let Some(set) = recipe.accepted_answers(prompt.template) {
        if !set.contains(&normalize(&final_answer)) {
            return Err(Reject::OutsideAnswerSet);
        }
    }
    if let (Some(min), Some(lp)) = (recipe.filters.min_mean_logprob, &reply.token_logprobs) {
        if !lp.is_empty() && (lp.iter().sum::<f32>() / lp.len() as f32) < min {
            return Err(Reject::LowLogprob);
        }
    }
    Ok(Written { question, response })
}

/// `Question: …` then `Answer: …` (labels in any case); the answer runs to the end.
fn split_labelled(text: &str) -> Option<(String, String)> {
    let lower = text.to_lowercase();
    let q = lower.find("question:")?;
    let a = q + lower[q..].find("answer:")?;
    let question = text[q + "question:".len()..a].trim();
    let answer = text[a + "answer:".len()..].trim();
    (!question.is_empty() && !answer.is_empty()).then(|| (question.into(), answer.into()))
}

/// The text after the last `label` (lower case) in `text`, to the end of its line.
fn last_labelled(text: &str, label: &str) -> Option<String> {
    let at = text.to_lowercase().rfind(label)?;
    let rest = &text[at + label.len()..];
    Some(rest.lines().next().unwrap_or("").trim().to_string())
}

/// Keeps one image's samples free of exact and near duplicates.
pub struct DuplicateFilter {
    ngram: usize,
    jaccard: f32,
    exact: HashSet<(String, String)>,
    kept: Vec<HashSet<Vec<String>>>,
}

impl DuplicateFilter {
    pub fn new(recipe: &Recipe) -> Self {
        Self {
            ngram: recipe.filters.near_duplicate_ngram,
            jaccard: recipe.filters.near_duplicate_jaccard,
            exact: HashSet::new(),
            kept: Vec::new(),
        }
    }

    /// Admits `w` unless it duplicates a sample admitted before.
    pub fn admit(&mut self, w: &Written) -> Result<(), Reject> {
        let key = (normalize(&w.question), normalize(&w.response));
        if self.exact.contains(&key) {
            return Err(Reject::Duplicate);
        }
        let grams = ngrams(&format!("{} {}", key.0, key.1), self.ngram);
        if self.kept.iter().any(|k| jaccard(k, &grams) >= self.jaccard) {
            return Err(Reject::NearDuplicate);
        }
        self.exact.insert(key);
        self.kept.push(grams);
        Ok(())
    }
}

/// The word n-grams of `text` (the whole text as one gram when it is shorter than n words).
fn ngrams(text: &str, n: usize) -> HashSet<Vec<String>> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_string)
        .collect();
    if words.len() < n {
        return HashSet::from([words]);
    }
    words.windows(n).map(<[String]>::to_vec).collect()
}

fn jaccard(a: &HashSet<Vec<String>>, b: &HashSet<Vec<String>>) -> f32 {
    let union = a.union(b).count();
    if union == 0 {
        return 1.0;
    }
    a.intersection(b).count() as f32 / union as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(extra: &str) -> Recipe {
        let text = format!(
            "name = \"t\"\nseed_file = \"s\"\ntemplates = [{{ prompt = \"What color is the {{shape}}?\", answers = \"color\" }}]\n{extra}\n"
        );
        Recipe::parse(&text, "t.toml", |_| {
            Ok("{\"shape\": \"circle\"}\n{\"color\": \"red\"}\n{\"color\": \"top left\"}\n".into())
        })
        .unwrap()
    }

    fn reply(text: &str) -> Reply {
        Reply {
            text: text.into(),
            finished: true,
            token_logprobs: None,
            alternatives: Vec::new(),
        }
    }

    #[test]
    fn each_reply_is_kept_or_dropped_for_its_reason() {
        let r = recipe("[filters]\nmax_answer_words = 1\nmin_mean_logprob = -1.0");
        let p = &r.plan("a.png")[0];
        let written = accept(&r, p, &reply(" Red. ")).unwrap();
        assert_eq!(written.question, "What color is the circle?");
        assert_eq!(written.response, "Red.");
        assert_eq!(accept(&r, p, &reply("  ")), Err(Reject::Empty));
        assert_eq!(accept(&r, p, &reply("blue")), Err(Reject::OutsideAnswerSet));
        assert_eq!(accept(&r, p, &reply("top left")), Err(Reject::OverLong));
        let cut = Reply {
            finished: false,
            ..reply("red")
        };
        assert_eq!(accept(&r, p, &cut), Err(Reject::OverLong));
        let unsure = Reply {
            token_logprobs: Some(vec![-0.5, -2.0]),
            ..reply("red")
        };
        assert_eq!(accept(&r, p, &unsure), Err(Reject::LowLogprob));
        let sure = Reply {
            token_logprobs: Some(vec![-0.5, -1.0]),
            ..reply("red")
        };
        assert!(accept(&r, p, &sure).is_ok());
    }

    #[test]
    fn instruct_replies_and_rationales_are_parsed() {
        let r = recipe("mode = \"instruct\"");
        let p = &r.plan("a.png")[0];
        let w = accept(&r, p, &reply("question: What is red?\nAnswer: red")).unwrap();
        assert_eq!(
            (w.question.as_str(), w.response.as_str()),
            ("What is red?", "red")
        );
        assert_eq!(accept(&r, p, &reply("red")), Err(Reject::Unparsed));
        let r = recipe("[generation]\nrationale = true");
        let p = &r.plan("a.png")[0];
        let w = accept(&r, p, &reply("It is bright.\nAnswer: red")).unwrap();
        assert_eq!(w.response, "It is bright.\nAnswer: red");
        assert_eq!(accept(&r, p, &reply("It is red")), Err(Reject::Unparsed));
        assert_eq!(
            accept(&r, p, &reply("Answer: blue")),
            Err(Reject::OutsideAnswerSet)
        );
    }

    #[test]
    fn reasons_are_named_as_the_manifest_writes_them() {
        for r in Reject::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.name());
        }
    }

    #[test]
    fn exact_and_near_duplicates_of_an_image_are_dropped() {
        let r = recipe("");
        let mut f = DuplicateFilter::new(&r);
        let w = |q: &str, a: &str| Written {
            question: q.into(),
            response: a.into(),
        };
        assert!(f.admit(&w("What color is the circle?", "red")).is_ok());
        assert_eq!(
            f.admit(&w("what color is the circle? ", "Red.")),
            Err(Reject::Duplicate)
        );
        assert!(f.admit(&w("What color is the square?", "red")).is_ok());
        let long = "a large red circle in the top left and a small blue star in the center";
        assert!(f.admit(&w("Describe the image.", long)).is_ok());
        let near = "a large red circle in the top left and a small blue star in the centre";
        assert_eq!(
            f.admit(&w("Describe the image.", near)),
            Err(Reject::NearDuplicate)
        );
    }
}

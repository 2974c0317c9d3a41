//! Lining up two tokenizations of the same responses, for a teacher whose tokenizer is not the
//! student's. Each supervised token is known by where it starts in the text of its answer
//! (`TokenizedSample::answer_offsets`); the logit row before it predicts it.

use serde::{Deserialize, Serialize};

/// How two tokenizations of a response are paired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Alignment {
    /// Tokens that start at the same place of the same answer: both models then predict the
    /// text from the same point on. Tokens inside the other model's longer tokens go unpaired.
    #[default]
    Text,
    /// The k-th token with the k-th, up to the shorter tokenization (ULD's choice, Boizard et
    /// al. 2024).
    Position,
}

/// The pairs (student index, teacher index) into two lists of supervised tokens, each given as
/// (answer round, start offset) in increasing order.
pub fn align(
    student: &[(u32, u32)],
    teacher: &[(u32, u32)],
    how: Alignment,
) -> Vec<(usize, usize)> {
    match how {
        Alignment::Position => (0..student.len().min(teacher.len()))
            .map(|k| (k, k))
            .collect(),
        Alignment::Text => {
            let (mut i, mut j) = (0, 0);
            let mut pairs = Vec::new();
            while i < student.len() && j < teacher.len() {
                match student[i].cmp(&teacher[j]) {
                    std::cmp::Ordering::Equal => {
                        pairs.push((i, j));
                        i += 1;
                        j += 1;
                    }
                    std::cmp::Ordering::Less => i += 1,
                    std::cmp::Ordering::Greater => j += 1,
                }
            }
            pairs
        }
    }
}

/// A micro-batch's aligned logit rows: flat `batch·seq` rows of the student's logits and of the
/// teacher's (over its own tokenization), pair by pair.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AlignedRows {
    pub student: Vec<u32>,
    pub teacher: Vec<u32>,
}

impl AlignedRows {
    pub fn len(&self) -> usize {
        self.student.len()
    }

    pub fn is_empty(&self) -> bool {
        self.student.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_alignment_pairs_tokens_that_start_together() {
        // "the red square": student "the| red| square", teacher "the| re|d| squ|are".
        let student = [(0, 0), (0, 3), (0, 7)];
        let teacher = [(0, 0), (0, 3), (0, 6), (0, 7), (0, 11)];
        assert_eq!(
            align(&student, &teacher, Alignment::Text),
            [(0, 0), (1, 1), (2, 3)]
        );
        assert_eq!(
            align(&student, &teacher, Alignment::Position),
            [(0, 0), (1, 1), (2, 2)]
        );
        // A second answer round starts its offsets again.
        let student = [(0, 0), (0, 4), (1, 0)];
        let teacher = [(0, 0), (1, 0), (1, 2)];
        assert_eq!(align(&student, &teacher, Alignment::Text), [(0, 0), (2, 1)]);
        assert!(align(&[], &teacher, Alignment::Text).is_empty());
    }
}

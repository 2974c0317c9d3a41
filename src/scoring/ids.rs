//! Sample identifiers shared by predictions and references.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A question (or image) id. Files use JSON integers (VQAv2, COCO) or strings (GQA, TextVQA);
/// both are kept as their decimal/string text so `42` and `"42"` name the same sample.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleId(pub String);

impl SampleId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SampleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for SampleId {
    fn from(s: &str) -> Self {
        SampleId(s.to_string())
    }
}

impl From<u64> for SampleId {
    fn from(n: u64) -> Self {
        SampleId(n.to_string())
    }
}

impl Serialize for SampleId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for SampleId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(i64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Int(n)) => Ok(SampleId(n.to_string())),
            Ok(Raw::Text(s)) => Ok(SampleId(s)),
            Err(_) => Err(serde::de::Error::custom(
                "an id must be an integer or a string",
            )),
        }
    }
}

//! Where an app runs in a fleet: its placement (`[placement]` in the manifest) selects the
//! nodes whose labels it names, and its [`Stamp`] orders the changes made on different
//! nodes (the newest wins, last-writer-wins per app).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[placement]`: `requires = ["gpu"]` names labels a node must have (with any value but
/// `"false"`); every other key is a label the node must have with exactly that value
/// (`region = "eu-1"`). Empty: every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Placement {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<String>,
    #[serde(flatten)]
    pub labels: BTreeMap<String, String>,
}

/// Longest label key or value a placement may name, and how many it may name.
const MAX_LABEL_BYTES: usize = 128;
const MAX_LABELS: usize = 32;

impl Placement {
    /// Whether a node with `labels` runs the app.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requires
            .iter()
            .all(|key| labels.get(key).is_some_and(|value| value != "false"))
            && self
                .labels
                .iter()
                .all(|(key, value)| labels.get(key) == Some(value))
    }

    /// Refuses label names that could not be labels, and more than [`MAX_LABELS`].
    pub fn validate(&self) -> Result<(), String> {
        if self.requires.len() + self.labels.len() > MAX_LABELS {
            return Err(format!("placement: at most {MAX_LABELS} labels"));
        }
        let keys = self.requires.iter().chain(self.labels.keys());
        for key in keys {
            let valid = (1..=MAX_LABEL_BYTES).contains(&key.len())
                && key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'));
            if !valid {
                return Err(format!(
                    "placement: {key:?} is not a label name (1-{MAX_LABEL_BYTES} letters, digits, '-', '_', '.', '/')"
                ));
            }
        }
        if let Some(value) = self.labels.values().find(|v| v.len() > MAX_LABEL_BYTES) {
            return Err(format!(
                "placement: label value {value:?} is longer than {MAX_LABEL_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// When and where an app was last changed: milliseconds since the Unix epoch, then the node
/// id, so that two changes are never equal. Records from before stamps are the oldest.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    pub at_ms: u64,
    pub node: String,
}

impl Stamp {
    /// A stamp for a change on `node` now that is newer than `after` (the app's stamp until
    /// now), even when this node's clock is behind the one that made `after`.
    pub fn next(node: &str, after: Option<&Stamp>) -> Stamp {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Stamp {
            at_ms: now.max(after.map_or(0, |stamp| stamp.at_ms + 1)),
            node: node.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_placement_selects_nodes_by_required_and_equal_labels() {
        let anywhere = Placement::default();
        assert!(anywhere.selects(&labels(&[])));
        let placement: Placement = toml::from_str("requires = [\"gpu\"]\nregion = \"eu\"").unwrap();
        assert!(placement.selects(&labels(&[("gpu", "h100"), ("region", "eu")])));
        assert!(!placement.selects(&labels(&[("gpu", "false"), ("region", "eu")])));
        assert!(!placement.selects(&labels(&[("gpu", "h100"), ("region", "us")])));
        assert!(!placement.selects(&labels(&[("region", "eu")])));
        assert!(placement.validate().is_ok());
        let bad: Placement = toml::from_str("\"a b\" = \"x\"").unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn a_new_stamp_is_newer_than_the_last_even_from_a_clock_behind() {
        let future = Stamp {
            at_ms: u64::MAX / 2,
            node: "b".into(),
        };
        let next = Stamp::next("a", Some(&future));
        assert!(next > future);
        assert!(Stamp::next("a", None) > Stamp::default());
    }
}

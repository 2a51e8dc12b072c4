//! Apps: what the node keeps about each deployed app (its record), the settings a deployment
//! may give and their check against the node's limits. The runtime turns a record into an app
//! ready to instantiate.

use crate::config::LimitsConfig;
use serde::{Deserialize, Serialize};

/// What the node keeps about a deployed app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppRecord {
    pub name: String,
    /// SHA-256 of the component, hex; the component is stored under this name.
    pub digest: String,
    pub size_bytes: u64,
    pub timeout_secs: u64,
    pub memory_mib: u64,
    pub max_body_bytes: u64,
    /// Models the app may load by name; others are refused (`security`).
    #[serde(default)]
    pub models: Vec<String>,
    /// Whether models the app passes as bytes may go to native backends (else tract only).
    #[serde(default)]
    pub native_guest_models: bool,
    /// Seconds since the Unix epoch.
    pub deployed_at: u64,
}

/// Per-deployment settings; unset ones take the node's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppSettings {
    pub timeout_secs: Option<u64>,
    pub memory_mib: Option<u64>,
    pub max_body_bytes: Option<u64>,
    /// Comma-separated names of the models the app may load.
    pub models: Option<String>,
    /// Let models the app passes as bytes go to native backends (ONNX Runtime, OpenVINO).
    pub native_guest_models: Option<bool>,
}

impl AppSettings {
    /// The declared model names.
    pub fn model_names(&self) -> Vec<String> {
        self.models
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect()
    }
}

/// Whether `name` can name an app: 1-63 lower-case letters, digits or '-', starting with a
/// letter or digit (it appears in URLs and tree names).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// The timeout, memory limit and body limit a deployment gets: its settings, else the node's
/// defaults, checked against the node's ceilings.
pub fn settle(settings: &AppSettings, limits: &LimitsConfig) -> Result<(u64, u64, u64), String> {
    let timeout = settings.timeout_secs.unwrap_or(limits.timeout_secs);
    let memory = settings.memory_mib.unwrap_or(limits.memory_mib);
    let body = settings.max_body_bytes.unwrap_or(limits.max_body_bytes);
    if !(1..=3600).contains(&timeout) {
        return Err(format!("timeout_secs must be 1-3600, not {timeout}"));
    }
    if !(1..=limits.max_memory_mib).contains(&memory) {
        return Err(format!(
            "memory_mib must be 1-{} (the node's max_memory_mib), not {memory}",
            limits.max_memory_mib
        ));
    }
    let most = limits.max_buffered_body_bytes.min(1 << 30);
    if body > most {
        return Err(format!(
            "max_body_bytes must be at most {most} (1 GiB, and no more than the node's max_buffered_body_bytes), not {body}"
        ));
    }
    Ok((timeout, memory, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Names come from URLs: any string is judged without panicking, and the ones let
        /// through are safe in a URL path and a tree name.
        #[test]
        fn only_url_safe_names_pass(name in ".{0,80}") {
            if valid_name(&name) {
                prop_assert!((1..=63).contains(&name.len()));
                prop_assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
                prop_assert!(!name.starts_with('-'));
            }
        }

        /// Any settings a deployment sends end within the node's ceilings or are refused.
        #[test]
        fn settled_limits_stay_within_the_ceilings(
            timeout in proptest::option::of(any::<u64>()),
            memory in proptest::option::of(any::<u64>()),
            body in proptest::option::of(any::<u64>()),
        ) {
            let limits = LimitsConfig::default();
            let settings = AppSettings {
                timeout_secs: timeout,
                memory_mib: memory,
                max_body_bytes: body,
                ..AppSettings::default()
            };
            if let Ok((timeout, memory, body)) = settle(&settings, &limits) {
                prop_assert!((1..=3600).contains(&timeout));
                prop_assert!((1..=limits.max_memory_mib).contains(&memory));
                prop_assert!(body <= limits.max_buffered_body_bytes);
            }
        }
    }

    #[test]
    fn app_names_are_url_safe() {
        assert!(valid_name("classify"));
        assert!(valid_name("kv-counter2"));
        assert!(!valid_name("-x"));
        assert!(!valid_name("Hello"));
        assert!(!valid_name("a/b"));
        assert!(!valid_name(""));
    }

    #[test]
    fn settings_take_the_node_defaults_within_its_ceilings() {
        let limits = LimitsConfig::default();
        assert_eq!(
            settle(&AppSettings::default(), &limits),
            Ok((30, 128, 16 << 20))
        );
        let too_much = AppSettings {
            memory_mib: Some(limits.max_memory_mib + 1),
            ..AppSettings::default()
        };
        assert!(settle(&too_much, &limits)
            .unwrap_err()
            .contains("memory_mib"));
        let no_time = AppSettings {
            timeout_secs: Some(0),
            ..AppSettings::default()
        };
        assert!(settle(&no_time, &limits)
            .unwrap_err()
            .contains("timeout_secs"));
    }
}

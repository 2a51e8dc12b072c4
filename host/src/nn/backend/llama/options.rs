//! The options of one generation (the JSON `options` tensor, see `wit/README.md`): what a
//! guest may ask for, its defaults, and the bounds that keep every decoding step cheap.

use super::BackendError;
use serde::Deserialize;
use std::collections::BTreeMap;

/// Generation settings (the JSON `options` tensor).
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct Options {
    pub(super) max_tokens: u32,
    pub(super) temperature: f32,
    pub(super) top_p: f32,
    pub(super) top_k: i32,
    pub(super) repeat_penalty: f32,
    /// Drops tokens less likely than this share of the likeliest one (0 = off).
    pub(super) min_p: f32,
    /// Lowered logits of tokens already generated: by this once (presence) and by this per
    /// time generated (frequency), over the whole completion, as OpenAI defines them.
    pub(super) presence_penalty: f32,
    pub(super) frequency_penalty: f32,
    /// Added to the logits of these tokens (by id) at every step: −100 bans one, 100 forces it.
    pub(super) logit_bias: BTreeMap<i32, f32>,
    /// Return each generated token's log-probability and this many likeliest alternatives.
    pub(super) logprobs: Option<usize>,
    pub(super) seed: Option<u32>,
    pub(super) stop: Vec<String>,
    /// Tokens a `compute` call waits for (it returns all that are ready): 1 streams token by
    /// token; a large value returns everything at once.
    pub(super) chunk_tokens: u32,
    /// A GBNF grammar (llama.cpp's) that every generated text must follow, from rule `root`.
    pub(super) grammar: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            repeat_penalty: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
            logit_bias: BTreeMap::new(),
            seed: None,
            stop: Vec::new(),
            chunk_tokens: 1,
            grammar: None,
        }
    }
}

/// Stop strings a generation may ask for, and the longest one, in bytes: each is searched for
/// after every token.
const MAX_STOP_STRINGS: usize = 16;
const MAX_STOP_BYTES: usize = 256;
/// The longest grammar a generation may ask for, in bytes.
const MAX_GRAMMAR_BYTES: usize = 64 << 10;
/// The most alternatives per token `logprobs` may ask for (OpenAI's bound).
const MAX_TOP_LOGPROBS: usize = 20;
/// How far presence and frequency penalties may push (OpenAI's bound).
const MAX_PENALTY: f32 = 2.0;
/// Tokens one generation may bias, and how far (OpenAI's bound).
const MAX_LOGIT_BIASES: usize = 1024;
const MAX_LOGIT_BIAS: f32 = 100.0;

impl Options {
    /// Refuses options that cannot work or would make every step expensive.
    pub(super) fn validate(&self) -> Result<(), BackendError> {
        let invalid = |message: String| Err(BackendError::InvalidArgument(message));
        if self.stop.len() > MAX_STOP_STRINGS {
            return invalid(format!(
                "at most {MAX_STOP_STRINGS} stop strings, not {}",
                self.stop.len()
            ));
        }
        if let Some(stop) = self
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return invalid(format!(
                "a stop string must be 1 to {MAX_STOP_BYTES} bytes, not {}",
                stop.len()
            ));
        }
        if let Some(grammar) = self
            .grammar
            .as_ref()
            .filter(|g| g.len() > MAX_GRAMMAR_BYTES)
        {
            return invalid(format!(
                "a grammar may be at most {MAX_GRAMMAR_BYTES} bytes, not {}",
                grammar.len()
            ));
        }
        if !(0.0..=100.0).contains(&self.temperature) {
            return invalid(format!(
                "temperature must be between 0 and 100, not {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return invalid(format!("top_p must be in (0, 1], not {}", self.top_p));
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return invalid(format!(
                "repeat_penalty must be positive, not {}",
                self.repeat_penalty
            ));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return invalid(format!("min_p must be between 0 and 1, not {}", self.min_p));
        }
        for (name, penalty) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-MAX_PENALTY..=MAX_PENALTY).contains(&penalty) {
                return invalid(format!(
                    "{name} must be between -{MAX_PENALTY} and {MAX_PENALTY}, not {penalty}"
                ));
            }
        }
        if self.logit_bias.len() > MAX_LOGIT_BIASES {
            return invalid(format!(
                "logit_bias may bias at most {MAX_LOGIT_BIASES} tokens, not {}",
                self.logit_bias.len()
            ));
        }
        if let Some((token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, bias)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(*bias))
        {
            return invalid(format!(
                "logit_bias must be between -{MAX_LOGIT_BIAS} and {MAX_LOGIT_BIAS}, not {bias} for token {token}"
            ));
        }
        if let Some(top) = self.logprobs.filter(|top| *top > MAX_TOP_LOGPROBS) {
            return invalid(format!(
                "logprobs may ask for at most {MAX_TOP_LOGPROBS} alternatives, not {top}"
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Options;
    use proptest::prelude::*;

    proptest! {
        /// Options come from guests as JSON: any object of these fields is parsed and judged
        /// without panicking.
        #[test]
        fn any_options_json_is_judged_without_panicking(
            max_tokens in any::<i64>(),
            temperature in any::<f64>(),
            top_p in any::<f64>(),
            stop in prop::collection::vec(".{0,300}", 0..20),
        ) {
            let json = serde_json::json!({
                "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "stop": stop,
            });
            if let Ok(options) = serde_json::from_value::<Options>(json) {
                let valid = options.validate().is_ok();
                prop_assert!(!valid || (options.stop.len() <= 16 && options.stop.iter().all(|s| (1..=256).contains(&s.len()))));
            }
        }
    }

    fn options(json: &str) -> Options {
        serde_json::from_str(json).expect("options parse")
    }

    #[test]
    fn options_that_would_make_every_step_expensive_or_cannot_work_are_refused() {
        assert!(options("{}").validate().is_ok());
        assert!(options(r#"{"stop": ["\n", "User:"], "temperature": 0}"#)
            .validate()
            .is_ok());
        assert!(options(
            r#"{"min_p": 1, "presence_penalty": -2, "frequency_penalty": 2, "logprobs": 20, "logit_bias": {"5": -100, "7": 100}}"#
        )
        .validate()
        .is_ok());
        let many = format!(r#"{{"stop": {:?}}}"#, vec!["x"; 17]);
        let long = format!(r#"{{"stop": [{:?}]}}"#, "y".repeat(257));
        for refused in [
            many.as_str(),
            long.as_str(),
            r#"{"stop": [""]}"#,
            r#"{"temperature": -1}"#,
            r#"{"top_p": 0}"#,
            r#"{"repeat_penalty": 0}"#,
            r#"{"min_p": 1.5}"#,
            r#"{"presence_penalty": 2.5}"#,
            r#"{"frequency_penalty": -3}"#,
            r#"{"logprobs": 21}"#,
            r#"{"logit_bias": {"5": 101}}"#,
        ] {
            assert!(options(refused).validate().is_err(), "{refused}");
        }
        assert!(serde_json::from_str::<Options>(r#"{"stopp": []}"#).is_err());
    }
}

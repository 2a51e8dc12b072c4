//! Log-probabilities of generated tokens (`logprobs` in the options): each token's
//! log-probability under the model's own distribution at that step — the softmax of its raw
//! logits, before temperature, penalties or a grammar reshape it — and the likeliest
//! alternatives, as OpenAI reports them.

use serde::Serialize;

/// One generated token and how likely the model found it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct TokenLogprob {
    #[serde(flatten)]
    pub(super) token: Candidate,
    /// The likeliest tokens at this step, likeliest first.
    pub(super) top_logprobs: Vec<Candidate>,
}

/// A token's text (lossy where it ends mid-character), its bytes, and its log-probability.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(super) struct Candidate {
    pub(super) token: String,
    pub(super) bytes: Vec<u8>,
    pub(super) logprob: f32,
}

/// The log-probability of `chosen` and the `top` likeliest tokens, from one step's `logits`;
/// `piece` gives a token's bytes.
pub(super) fn token_logprob(
    logits: &[f32],
    chosen: usize,
    top: usize,
    piece: impl Fn(usize) -> Vec<u8>,
) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|l| f64::from(l - max).exp()).sum();
    let log_normaliser = f64::from(max) + sum.ln();
    let candidate = |id: usize| {
        let bytes = piece(id);
        Candidate {
            token: String::from_utf8_lossy(&bytes).into_owned(),
            logprob: (f64::from(logits[id]) - log_normaliser) as f32,
            bytes,
        }
    };
    TokenLogprob {
        token: candidate(chosen),
        top_logprobs: likeliest(logits, top).into_iter().map(candidate).collect(),
    }
}

/// The ids of the `count` largest logits, largest first (the lower id first among equals), in
/// one pass that keeps only `count` of them.
fn likeliest(logits: &[f32], count: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(count + 1);
    if count == 0 {
        return best;
    }
    for (id, logit) in logits.iter().enumerate() {
        if best.len() == count && *logit <= logits[best[count - 1]] {
            continue;
        }
        let at = best.partition_point(|&other| logits[other] >= *logit);
        best.insert(at, id);
        best.truncate(count);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(id: usize) -> Vec<u8> {
        format!("t{id}").into_bytes()
    }

    #[test]
    fn log_probabilities_are_the_softmax_of_the_logits() {
        let logits = [1.0_f32, 3.0, 2.0, 3.0, -50.0];
        let step = token_logprob(&logits, 2, 3, piece);
        let normaliser: f32 = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!(
            (step.token.logprob - (2.0 - normaliser)).abs() < 1e-5,
            "{step:?}"
        );
        assert_eq!(step.token.token, "t2");
        let top: Vec<&str> = step.top_logprobs.iter().map(|c| c.token.as_str()).collect();
        assert_eq!(top, ["t1", "t3", "t2"]);
        assert_eq!(step.top_logprobs[2], step.token);
        let total: f32 = logits.iter().map(|l| (l - normaliser).exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
    }

    #[test]
    fn huge_logits_do_not_overflow_and_no_alternatives_is_allowed() {
        let logits = [1000.0_f32, 1000.0];
        let step = token_logprob(&logits, 0, 0, piece);
        assert!((step.token.logprob - (-std::f32::consts::LN_2)).abs() < 1e-5);
        assert!(step.top_logprobs.is_empty());
    }

    #[test]
    fn the_likeliest_are_kept_in_order_without_sorting_everything() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let mut sorted: Vec<usize> = (0..logits.len()).collect();
        sorted.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        assert_eq!(likeliest(&logits, 20), sorted[..20]);
        assert_eq!(likeliest(&logits[..3], 20).len(), 3);
    }
}

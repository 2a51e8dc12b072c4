//! Traffic splitting across an app's revisions, as Knative does it: percentages that sum to
//! 100, `latest` following the newest revision, tags that reach one revision at its own path
//! (`/apps/<app>@<tag>/`), and a sticky key that keeps a client on one revision.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Which revision a traffic target means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevisionRef {
    /// The newest revision, whichever it is when the request comes.
    Latest,
    Number(u32),
}

impl Serialize for RevisionRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            RevisionRef::Latest => serializer.serialize_str("latest"),
            RevisionRef::Number(number) => serializer.serialize_u32(*number),
        }
    }
}

impl<'de> Deserialize<'de> for RevisionRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Number(number) => Ok(RevisionRef::Number(number)),
            Raw::Text(text) if text == "latest" => Ok(RevisionRef::Latest),
            Raw::Text(text) => text.parse().map(RevisionRef::Number).map_err(|_| {
                serde::de::Error::custom(format!(
                    "revision must be a number or \"latest\", not {text:?}"
                ))
            }),
        }
    }
}

impl std::fmt::Display for RevisionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RevisionRef::Latest => f.write_str("latest"),
            RevisionRef::Number(number) => write!(f, "{number}"),
        }
    }
}

/// One entry of a split: a revision, its share of requests and an optional tag.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrafficTarget {
    pub revision: RevisionRef,
    #[serde(default)]
    pub percent: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
}

/// Every request to the newest revision: the split when a deployment gives none.
pub fn all_to_latest() -> Vec<TrafficTarget> {
    vec![TrafficTarget {
        revision: RevisionRef::Latest,
        percent: 100,
        tag: None,
    }]
}

/// Whether `tag` can name a tag: an app-like name (it appears in URLs) that is not a number
/// (numbers reach revisions: `/apps/<app>@3/`).
pub fn valid_tag(tag: &str) -> bool {
    super::valid_name(tag) && !tag.bytes().all(|b| b.is_ascii_digit()) && tag != "latest"
}

/// Checks a split: percentages summing to 100, revisions that exist, unique valid tags.
pub fn validate(targets: &[TrafficTarget], latest: u32, revisions: &[u32]) -> Result<(), String> {
    if targets.is_empty() {
        return Err("traffic.split is empty: give at least one revision with 100 percent".into());
    }
    let mut sum = 0u32;
    let mut tags = Vec::new();
    for target in targets {
        if target.percent > 100 {
            return Err(format!(
                "traffic: percent must be 0-100, not {}",
                target.percent
            ));
        }
        sum += u32::from(target.percent);
        if let RevisionRef::Number(number) = target.revision {
            if !revisions.contains(&number) {
                return Err(format!(
                    "traffic: revision {number} does not exist (the newest is {latest})"
                ));
            }
        }
        if let Some(tag) = &target.tag {
            if !valid_tag(tag) {
                return Err(format!("traffic: tag {tag:?} must be 1-63 lower-case letters, digits or '-', not a number nor \"latest\""));
            }
            if tags.contains(&tag) {
                return Err(format!("traffic: tag {tag:?} is given twice"));
            }
            tags.push(tag);
        }
    }
    if sum != 100 {
        return Err(format!(
            "traffic: the percentages sum to {sum}, they must sum to 100"
        ));
    }
    Ok(())
}

/// Revisions named by the split (with `latest` resolved), so that they are kept.
pub fn referenced(targets: &[TrafficTarget], latest: u32) -> impl Iterator<Item = u32> + '_ {
    targets
        .iter()
        .map(move |target| resolve(target.revision, latest))
}

/// The revision number `revision` means while `latest` is the newest.
pub fn resolve(revision: RevisionRef, latest: u32) -> u32 {
    match revision {
        RevisionRef::Latest => latest,
        RevisionRef::Number(number) => number,
    }
}

/// A split resolved to revision numbers, ready to route requests.
#[derive(Debug, Clone)]
pub struct Split {
    /// (revision, upper bound of its share in 0..100)
    bounds: Vec<(u32, u8)>,
}

impl Split {
    /// The split `targets` means while `latest` is the newest revision.
    pub fn new(targets: &[TrafficTarget], latest: u32) -> Self {
        let mut upper = 0u8;
        let bounds = targets
            .iter()
            .filter(|target| target.percent > 0)
            .map(|target| {
                upper += target.percent;
                (resolve(target.revision, latest), upper)
            })
            .collect();
        Self { bounds }
    }

    /// The revision for a request: by its sticky key when it has one (the same key always
    /// lands on the same revision while the split stays), else at random.
    pub fn pick(&self, sticky: Option<&[u8]>) -> u32 {
        let point = match sticky {
            Some(key) => {
                let hash = Sha256::digest(key);
                (u64::from_le_bytes(hash[..8].try_into().expect("8 bytes")) % 100) as u8
            }
            None => rand::Rng::gen_range(&mut rand::thread_rng(), 0..100),
        };
        self.at(point)
    }

    fn at(&self, point: u8) -> u32 {
        self.bounds
            .iter()
            .find(|(_, upper)| point < *upper)
            .or(self.bounds.last())
            .map(|(revision, _)| *revision)
            .expect("a validated split has a revision with a share")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn target(revision: RevisionRef, percent: u8, tag: Option<&str>) -> TrafficTarget {
        TrafficTarget {
            revision,
            percent,
            tag: tag.map(str::to_string),
        }
    }

    #[test]
    fn splits_must_sum_to_100_over_existing_revisions_with_unique_tags() {
        let revisions = [1, 2];
        let good = [
            target(RevisionRef::Number(1), 90, Some("stable")),
            target(RevisionRef::Latest, 10, Some("canary")),
        ];
        assert!(validate(&good, 2, &revisions).is_ok());
        let short = [target(RevisionRef::Number(1), 90, None)];
        assert!(validate(&short, 2, &revisions)
            .unwrap_err()
            .contains("sum to 90"));
        let missing = [target(RevisionRef::Number(7), 100, None)];
        assert!(validate(&missing, 2, &revisions)
            .unwrap_err()
            .contains("revision 7"));
        let twice = [
            target(RevisionRef::Number(1), 50, Some("a")),
            target(RevisionRef::Number(2), 50, Some("a")),
        ];
        assert!(validate(&twice, 2, &revisions)
            .unwrap_err()
            .contains("twice"));
        let numeric = [target(RevisionRef::Number(1), 100, Some("12"))];
        assert!(validate(&numeric, 2, &revisions).is_err());
        assert!(validate(&[], 2, &revisions).is_err());
    }

    #[test]
    fn revision_refs_read_numbers_and_latest() {
        let parsed: TrafficTarget =
            serde_json::from_str(r#"{"revision": "latest", "percent": 10}"#).unwrap();
        assert_eq!(parsed.revision, RevisionRef::Latest);
        let parsed: TrafficTarget =
            serde_json::from_str(r#"{"revision": 3, "percent": 90}"#).unwrap();
        assert_eq!(parsed.revision, RevisionRef::Number(3));
        assert!(serde_json::from_str::<TrafficTarget>(r#"{"revision": "newest"}"#).is_err());
    }

    #[test]
    fn zero_percent_targets_get_no_requests() {
        let split = Split::new(
            &[
                target(RevisionRef::Number(1), 0, Some("preview")),
                target(RevisionRef::Number(2), 100, None),
            ],
            2,
        );
        assert!((0..100).all(|point| split.at(point) == 2));
    }

    #[test]
    fn random_picks_follow_the_percentages_without_bias() {
        let split = Split::new(
            &[
                target(RevisionRef::Number(1), 90, None),
                target(RevisionRef::Number(2), 10, None),
            ],
            2,
        );
        let second = (0..100_000).filter(|_| split.pick(None) == 2).count();
        // 10 % of 100 000, standard deviation 95: five deviations either side.
        assert!((9_525..=10_475).contains(&second), "{second}");
    }

    proptest! {
        /// Every point of 0..100 lands on a revision, and each revision gets exactly its
        /// percentage of the points.
        #[test]
        fn each_revision_gets_exactly_its_share(shares in proptest::collection::vec(0u8..=100, 1..5)) {
            let total: u32 = shares.iter().map(|&s| u32::from(s)).sum();
            prop_assume!(total > 0 && total <= 100);
            let mut targets: Vec<_> = shares
                .iter()
                .enumerate()
                .map(|(i, &percent)| target(RevisionRef::Number(i as u32 + 1), percent, None))
                .collect();
            targets.push(target(RevisionRef::Number(99), (100 - total) as u8, None));
            let split = Split::new(&targets, 99);
            for t in &targets {
                let RevisionRef::Number(number) = t.revision else { unreachable!() };
                let hits = (0..100u8).filter(|&p| split.at(p) == number).count();
                prop_assert_eq!(hits, usize::from(t.percent));
            }
        }

        /// The same sticky key always lands on the same revision.
        #[test]
        fn sticky_keys_are_stable(key in proptest::collection::vec(any::<u8>(), 0..32)) {
            let split = Split::new(
                &[target(RevisionRef::Number(1), 50, None), target(RevisionRef::Number(2), 50, None)],
                2,
            );
            let first = split.pick(Some(&key));
            prop_assert!((0..10).all(|_| split.pick(Some(&key)) == first));
        }
    }
}

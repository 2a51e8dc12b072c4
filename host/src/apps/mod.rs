//! Apps: what the node keeps about each deployed app. An app is a name, its revisions
//! (immutable, numbered versions of component + settings: [`spec`]) and what holds across
//! them: the traffic split ([`traffic`]), rate limits ([`rate`]), its fallback, its secrets
//! ([`secrets`]) and the hosts it may call ([`outbound`]). [`AppRecords`] keeps them in the
//! store; the runtime turns them into apps ready to serve.

pub mod outbound;
pub mod placement;
pub mod rate;
pub mod secrets;
pub mod spec;
pub mod traffic;

pub use spec::{AppRecord, DeploySpec, RevisionRecord, RevisionSpec};

use crate::store::{self, Store, StoreError};
use serde::{Deserialize, Serialize};
use sled::Transactional;
use std::collections::BTreeMap;

/// Whether `name` can name an app (or a model, a tag): 1-63 lower-case letters, digits or
/// '-', starting with a letter or digit (it appears in URLs, host names and tree names).
pub fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// An app with its revisions, as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredApp {
    pub record: AppRecord,
    pub revisions: BTreeMap<u32, RevisionRecord>,
}

/// What is left of a removed app, so that a fleet's nodes agree it is gone: an older record
/// of it from a peer does not bring it back, a newer deployment does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Removal {
    pub tenant: String,
    pub stamp: placement::Stamp,
}

/// The records of apps (tree `apps`, by name), revisions (tree `revisions`, by
/// `<app>/<number>` with the number zero-padded so they sort) and removals (tree
/// `removed_apps`, by name).
pub struct AppRecords {
    apps: sled::Tree,
    revisions: sled::Tree,
    removals: sled::Tree,
}

fn revision_key(app: &str, number: u32) -> String {
    format!("{app}/{number:010}")
}

/// An app record as nodes before revisions wrote it: one component and its settings.
#[derive(Deserialize)]
struct LegacyAppRecord {
    name: String,
    digest: String,
    size_bytes: u64,
    timeout_secs: u64,
    memory_mib: u64,
    max_body_bytes: u64,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    native_guest_models: bool,
    deployed_at: u64,
}

impl LegacyAppRecord {
    /// The app as revision 1 with all the traffic, the node's defaults for what it did not have.
    fn upgrade(self, limits: &crate::config::LimitsConfig) -> StoredApp {
        let revision = RevisionRecord {
            app: self.name.clone(),
            number: 1,
            digest: self.digest,
            size_bytes: self.size_bytes,
            created_at: self.deployed_at,
            spec: RevisionSpec {
                timeout_secs: self.timeout_secs,
                memory_mib: self.memory_mib,
                max_body_bytes: self.max_body_bytes,
                cpu_ms: None,
                max_concurrency: None,
                max_queued: limits.max_queued_requests,
                queue_timeout_secs: limits.queue_timeout_secs,
                min_instances: 0,
                idle_timeout_secs: limits.app_idle_timeout_secs,
                requests_per_instance: 1,
                models: self.models,
                native_guest_models: self.native_guest_models,
                buckets: None,
                replicated_buckets: Vec::new(),
                config: BTreeMap::new(),
                allowed_hosts: Vec::new(),
                cache: None,
            },
        };
        StoredApp {
            record: AppRecord {
                latest: 1,
                next_revision: 2,
                public: true,
                ..AppRecord::new(
                    &self.name,
                    crate::tenancy::OPERATOR_TENANT,
                    self.deployed_at,
                )
            },
            revisions: BTreeMap::from([(1, revision)]),
        }
    }
}

impl AppRecords {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            apps: store.tree("apps")?,
            revisions: store.tree("revisions")?,
            removals: store.tree("removed_apps")?,
        })
    }

    /// The removal of app `name`, when it was removed and not deployed since.
    pub fn removal(&self, name: &str) -> Result<Option<Removal>, StoreError> {
        store::get_json(&self.removals, name)
    }

    /// Every removal kept, by app name.
    pub fn removals(&self) -> Result<BTreeMap<String, Removal>, StoreError> {
        let mut removals = BTreeMap::new();
        for entry in self.removals.iter() {
            let (key, bytes) = entry?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let removal = serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                key: name.clone(),
                source,
            })?;
            removals.insert(name, removal);
        }
        Ok(removals)
    }

    /// Every app with its revisions. Records of an older node (one component per app) are
    /// rewritten as revision 1 (not yet durable: the caller makes the store durable).
    pub fn load_all(
        &self,
        limits: &crate::config::LimitsConfig,
    ) -> Result<Vec<StoredApp>, StoreError> {
        let mut apps = Vec::new();
        for entry in self.apps.iter() {
            let (key, bytes) = entry?;
            let name = String::from_utf8_lossy(&key).into_owned();
            let corrupt = |source| StoreError::Corrupt {
                key: name.clone(),
                source,
            };
            let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(corrupt)?;
            if value.get("digest").is_some() {
                let legacy: LegacyAppRecord = serde_json::from_value(value).map_err(corrupt)?;
                let upgraded = legacy.upgrade(limits);
                self.commit(&upgraded.record, upgraded.revisions.get(&1), &[])?;
                apps.push(upgraded);
                continue;
            }
            let record: AppRecord = serde_json::from_value(value).map_err(corrupt)?;
            let revisions = self.revisions_of(&record.name)?;
            apps.push(StoredApp { record, revisions });
        }
        Ok(apps)
    }

    fn revisions_of(&self, app: &str) -> Result<BTreeMap<u32, RevisionRecord>, StoreError> {
        let mut revisions = BTreeMap::new();
        for entry in self.revisions.scan_prefix(format!("{app}/")) {
            let (key, bytes) = entry?;
            let revision: RevisionRecord =
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    source,
                })?;
            revisions.insert(revision.number, revision);
        }
        Ok(revisions)
    }

    /// The stored app called `name`.
    pub fn get(&self, name: &str) -> Result<Option<StoredApp>, StoreError> {
        let Some(record) = store::get_json::<AppRecord>(&self.apps, name)? else {
            return Ok(None);
        };
        let revisions = self.revisions_of(name)?;
        Ok(Some(StoredApp { record, revisions }))
    }

    /// Writes `record`, adds `created` and deletes the revisions numbered `removed`, all or
    /// nothing (one sled transaction over both trees; not yet durable).
    pub fn commit(
        &self,
        record: &AppRecord,
        created: Option<&RevisionRecord>,
        removed: &[u32],
    ) -> Result<(), StoreError> {
        let app = serde_json::to_vec(record).expect("records serialise");
        let created = created.map(|revision| {
            (
                revision_key(&revision.app, revision.number),
                serde_json::to_vec(revision).expect("records serialise"),
            )
        });
        let removed: Vec<String> = removed
            .iter()
            .map(|number| revision_key(&record.name, *number))
            .collect();
        (&self.apps, &self.revisions, &self.removals)
            .transaction(|(apps, revisions, removals)| {
                apps.insert(record.name.as_bytes(), app.as_slice())?;
                removals.remove(record.name.as_bytes())?;
                if let Some((key, value)) = &created {
                    revisions.insert(key.as_bytes(), value.as_slice())?;
                }
                for key in &removed {
                    revisions.remove(key.as_bytes())?;
                }
                Ok(())
            })
            .map_err(transaction_error)
    }

    /// Deletes an app and its revisions and keeps `removal` of it, all or nothing (not yet
    /// durable).
    pub fn remove_app(&self, name: &str, removal: &Removal) -> Result<(), StoreError> {
        let keys: Vec<String> = self
            .revisions_of(name)?
            .keys()
            .map(|number| revision_key(name, *number))
            .collect();
        let removal = serde_json::to_vec(removal).expect("records serialise");
        (&self.apps, &self.revisions, &self.removals)
            .transaction(|(apps, revisions, removals)| {
                apps.remove(name.as_bytes())?;
                removals.insert(name.as_bytes(), removal.as_slice())?;
                for key in &keys {
                    revisions.remove(key.as_bytes())?;
                }
                Ok(())
            })
            .map_err(transaction_error)
    }

    /// Makes `app` what is stored of it, a peer's copy: its record and exactly its
    /// revisions, all or nothing (not yet durable).
    pub fn replace(&self, app: &StoredApp) -> Result<(), StoreError> {
        let name = &app.record.name;
        let record = serde_json::to_vec(&app.record).expect("records serialise");
        let stale: Vec<String> = self
            .revisions_of(name)?
            .keys()
            .filter(|number| !app.revisions.contains_key(number))
            .map(|number| revision_key(name, *number))
            .collect();
        let kept: Vec<(String, Vec<u8>)> = app
            .revisions
            .values()
            .map(|revision| {
                (
                    revision_key(name, revision.number),
                    serde_json::to_vec(revision).expect("records serialise"),
                )
            })
            .collect();
        (&self.apps, &self.revisions, &self.removals)
            .transaction(|(apps, revisions, removals)| {
                apps.insert(name.as_bytes(), record.as_slice())?;
                removals.remove(name.as_bytes())?;
                for key in &stale {
                    revisions.remove(key.as_bytes())?;
                }
                for (key, value) in &kept {
                    revisions.insert(key.as_bytes(), value.as_slice())?;
                }
                Ok(())
            })
            .map_err(transaction_error)
    }
}

fn transaction_error(error: sled::transaction::TransactionError) -> StoreError {
    match error {
        sled::transaction::TransactionError::Storage(error)
        | sled::transaction::TransactionError::Abort(error) => error.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempStore;
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
    fn records_of_an_older_node_become_revision_one_with_all_traffic() {
        let temp = TempStore::default();
        let limits = crate::config::LimitsConfig::default();
        let apps = temp.store.tree("apps").unwrap();
        apps.insert(
            "hello",
            serde_json::to_vec(&serde_json::json!({
                "name": "hello", "digest": "ab".repeat(32), "size_bytes": 10,
                "timeout_secs": 5, "memory_mib": 64, "max_body_bytes": 1000,
                "models": ["m"], "deployed_at": 7
            }))
            .unwrap(),
        )
        .unwrap();
        let records = AppRecords::open(&temp.store).unwrap();
        let loaded = records.load_all(&limits).unwrap();
        assert_eq!(loaded.len(), 1);
        let revision = &loaded[0].revisions[&1];
        assert_eq!(revision.digest, "ab".repeat(32));
        assert_eq!(
            (revision.spec.timeout_secs, revision.spec.memory_mib),
            (5, 64)
        );
        assert_eq!(revision.spec.models, vec!["m".to_string()]);
        assert_eq!(loaded[0].record.traffic, traffic::all_to_latest());
        // Rewritten in the new form: a second load reads it as such.
        let again = records.load_all(&limits).unwrap();
        assert_eq!(again[0].record, loaded[0].record);
        assert_eq!(again[0].revisions, loaded[0].revisions);
    }

    #[test]
    fn revisions_of_one_app_are_not_another_apps() {
        let temp = TempStore::default();
        let records = AppRecords::open(&temp.store).unwrap();
        let limits = crate::config::LimitsConfig::default();
        let spec = spec::settle(&DeploySpec::default(), &limits).unwrap();
        for (app, number) in [("a", 1), ("a", 2), ("ab", 1)] {
            let revision = RevisionRecord {
                app: app.into(),
                number,
                digest: "00".repeat(32),
                size_bytes: 1,
                created_at: 0,
                spec: spec.clone(),
            };
            records
                .commit(&AppRecord::new(app, "default", 0), Some(&revision), &[])
                .unwrap();
        }
        assert_eq!(records.revisions_of("a").unwrap().len(), 2);
        let removal = Removal {
            tenant: "default".into(),
            stamp: placement::Stamp::next("n", None),
        };
        records.remove_app("a", &removal).unwrap();
        assert_eq!(records.removal("a").unwrap(), Some(removal));
        assert_eq!(records.revisions_of("ab").unwrap().len(), 1);
        assert!(records.get("a").unwrap().is_none());
        records
            .commit(&AppRecord::new("ab", "default", 0), None, &[1])
            .unwrap();
        assert!(records.revisions_of("ab").unwrap().is_empty());
        assert!(records.revisions_of("a").unwrap().is_empty());
        // A deployment after the removal ends it.
        records
            .commit(&AppRecord::new("a", "default", 0), None, &[])
            .unwrap();
        assert!(records.removals().unwrap().is_empty());
    }

    #[test]
    fn a_replica_replaces_the_record_and_exactly_its_revisions() {
        let temp = TempStore::default();
        let records = AppRecords::open(&temp.store).unwrap();
        let spec = spec::settle(
            &DeploySpec::default(),
            &crate::config::LimitsConfig::default(),
        )
        .unwrap();
        let revision = |number| RevisionRecord {
            app: "a".into(),
            number,
            digest: "00".repeat(32),
            size_bytes: 1,
            created_at: 0,
            spec: spec.clone(),
        };
        for number in [1, 2] {
            records
                .commit(
                    &AppRecord::new("a", "default", 0),
                    Some(&revision(number)),
                    &[],
                )
                .unwrap();
        }
        let replica = StoredApp {
            record: AppRecord {
                latest: 3,
                next_revision: 4,
                ..AppRecord::new("a", "default", 0)
            },
            revisions: BTreeMap::from([(2, revision(2)), (3, revision(3))]),
        };
        records.replace(&replica).unwrap();
        let stored = records.get("a").unwrap().unwrap();
        assert_eq!(stored.record, replica.record);
        assert_eq!(stored.revisions.keys().copied().collect::<Vec<_>>(), [2, 3]);
    }
}

//! Desired state shared with the fleet: what this node tells peers it has (each app's stamp,
//! the removals it keeps, the apps it serves), and applying what a peer has when it is newer
//! (last-writer-wins per app: the whole app, its record and revisions, as the newest change
//! left it). The components of a peer's revisions must be in the blob store before its app is
//! applied; `cluster::replication` fetches them. An app's secrets travel with it
//! ([`AppReplica`]), and each node keeps them encrypted with its own key.

use super::app::App;
use super::deploy::{retire, DeployError};
use super::Runtime;
use crate::apps::placement::Stamp;
use crate::apps::spec::{AppRecord, RevisionRecord};
use crate::apps::{self, Removal, StoredApp};
use crate::store::blobs::{self, Held};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// An app's name with the stamp of its last change (or of its removal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppVersion {
    pub name: String,
    pub stamp: Stamp,
}

/// An app as a node hands it to a peer: its record and revisions as stored (the fields of
/// [`StoredApp`], which a node of an older version reads), and its secrets in plain text,
/// which only a member of the cluster reads (the node port is mutual TLS) and which it
/// encrypts again with its own key. No `Debug`: it holds the secrets. (Not a flattened
/// `StoredApp`: serde's flatten cannot read the revisions' numeric keys from JSON.)
#[derive(Serialize, Deserialize)]
pub struct AppReplica {
    pub record: AppRecord,
    pub revisions: BTreeMap<u32, RevisionRecord>,
    /// The app's secrets as `(name, value)`; absent from a node of a version that does not
    /// send them, whose change then leaves this node's secrets as they are.
    #[serde(default)]
    pub secrets: Option<Vec<(String, String)>>,
}

/// What a node has: every app with its stamp, the removals it keeps (by app name), and the
/// apps whose placement selects it (those it serves).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DesiredState {
    pub apps: Vec<AppVersion>,
    pub removed: BTreeMap<String, Removal>,
    pub serving: Vec<String>,
}

/// How busy a node is: instances running and requests waiting, against its limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    pub running: usize,
    pub queued: usize,
    pub max_running: usize,
    pub max_queued: usize,
}

impl Load {
    /// Whether a request would be shed: every instance slot taken and the queue full.
    pub fn saturated(&self) -> bool {
        self.running >= self.max_running && self.queued >= self.max_queued
    }

    /// Work per instance slot, to compare nodes of different sizes.
    pub fn per_slot(&self) -> f64 {
        (self.running + self.queued) as f64 / self.max_running.max(1) as f64
    }
}

/// A key-value bucket whose data the fleet shares: of app `app` (whose scoped name, the one
/// its data is filed under, is `scoped`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReplicatedBucket {
    pub app: String,
    pub scoped: String,
    pub bucket: String,
}

impl Runtime {
    /// The replicated buckets of the apps that run here (any of their revisions declares it).
    pub fn replicated_buckets(&self) -> Vec<ReplicatedBucket> {
        let mut buckets: Vec<ReplicatedBucket> = self
            .apps()
            .iter()
            .filter(|app| app.placed)
            .flat_map(|app| {
                app.revisions.values().flat_map(move |revision| {
                    let scoped = crate::tenancy::scoped_name(&revision.tenant, &app.record.name);
                    revision
                        .record
                        .spec
                        .replicated_buckets
                        .iter()
                        .map(move |bucket| ReplicatedBucket {
                            app: app.record.name.clone(),
                            scoped: scoped.clone(),
                            bucket: bucket.clone(),
                        })
                })
            })
            .collect();
        buckets.sort();
        buckets.dedup();
        buckets
    }

    /// The feed of replicated bucket `bucket`.
    pub fn kv_feed(
        &self,
        bucket: &ReplicatedBucket,
    ) -> Result<crate::kv::feed::Feed, crate::store::StoreError> {
        crate::kv::feed::Feed::open(
            &self.resources.store,
            &self.resources.kv_usage,
            &bucket.scoped,
            &bucket.bucket,
            &self.resources.node_id,
        )
    }

    /// What this node has, for its peers.
    pub fn desired_state(&self) -> Result<DesiredState, DeployError> {
        let apps = self.apps();
        Ok(DesiredState {
            apps: apps
                .iter()
                .map(|app| AppVersion {
                    name: app.record.name.clone(),
                    stamp: app.record.stamp.clone(),
                })
                .collect(),
            removed: self.records.removals()?,
            serving: apps
                .iter()
                .filter(|app| app.placed)
                .map(|app| app.record.name.clone())
                .collect(),
        })
    }

    /// How busy this node is now.
    pub fn load(&self) -> Load {
        Load {
            running: self.admission.running(),
            queued: self.admission.queued(),
            max_running: self.limits.max_concurrent_instances as usize,
            max_queued: self.limits.max_queued_requests as usize,
        }
    }

    /// The stamp of the newest change this node knows of app `name`: its record's, or its
    /// removal's.
    pub fn known_stamp(&self, name: &str) -> Result<Option<Stamp>, DeployError> {
        let record = self.app(name).map(|app| app.record.stamp.clone());
        let removed = self.records.removal(name)?.map(|removal| removal.stamp);
        Ok(record.max(removed))
    }

    /// App `name` as stored here, with its revisions and secrets, for a peer. The record is
    /// read before the secrets, and a change of secrets writes them before the record: secrets
    /// are never older than the stamp they come with.
    pub fn replica_of(&self, name: &str) -> Result<Option<AppReplica>, DeployError> {
        let Some(StoredApp { record, revisions }) = self.records.get(name)? else {
            return Ok(None);
        };
        let secrets = self.secrets.values(name)?;
        Ok(Some(AppReplica {
            record,
            revisions,
            secrets: Some(secrets),
        }))
    }

    /// The components of `revisions` that the blob store lacks: digest and size.
    pub fn missing_components(
        &self,
        revisions: &BTreeMap<u32, RevisionRecord>,
    ) -> Vec<(String, u64)> {
        let mut missing: Vec<(String, u64)> = revisions
            .values()
            .filter(|revision| !self.blobs.path(&revision.digest).is_file())
            .map(|revision| (revision.digest.clone(), revision.size_bytes))
            .collect();
        missing.sort();
        missing.dedup();
        missing
    }

    /// Makes a peer's app this node's, when it is newer than what this node knows of it (its
    /// record or its removal); whether it did. Its components must be in the blob store
    /// (`fetched` holds those just fetched until its revisions hold them). Its secrets, when the
    /// peer sent them, replace this node's (checked first: a bad one changes nothing), and
    /// revisions kept from before get them; the data of its local key-value buckets stays
    /// this node's own. Requests already running finish on their revisions.
    pub async fn apply_replica(
        self: &Arc<Self>,
        replica: AppReplica,
        fetched: Vec<Held>,
    ) -> Result<bool, DeployError> {
        let AppReplica {
            record,
            revisions,
            secrets,
        } = replica;
        let app = StoredApp { record, revisions };
        check_replica(&app)?;
        let name = app.record.name.clone();
        let _changing = self.changes.lock().await;
        if self
            .known_stamp(&name)?
            .is_some_and(|known| known >= app.record.stamp)
        {
            return Ok(false);
        }
        if let Some((digest, _)) = self.missing_components(&app.revisions).first() {
            return Err(DeployError::Invalid(format!(
                "component {digest} of app {name:?} is not on this node"
            )));
        }
        self.check_claims(&app.record)?;
        if let Some(secrets) = &secrets {
            self.secrets.check_all(&name, secrets)?;
        }
        self.records.replace(&app)?;
        let secrets_changed = match &secrets {
            Some(secrets) => self.secrets.replace_app(&name, secrets)?,
            None => false,
        };
        self.store.make_durable().await?;
        let current = self.app(&name);
        let (runtime, kept) = (self.clone(), current.clone());
        let (app, revisions) = tokio::task::spawn_blocking(move || {
            let revisions = runtime.build_revisions(&app, kept.as_deref());
            (app, revisions)
        })
        .await
        .map_err(|e| DeployError::Invalid(format!("preparing failed: {e}")))?;
        drop(fetched);
        let rate = match &current {
            Some(current)
                if current.record.rate_limit == app.record.rate_limit
                    && current.record.client_rate_limit == app.record.client_rate_limit =>
            {
                current.rate.clone()
            }
            _ => self.rate_limits(&app.record),
        };
        let retired: Vec<_> = current
            .as_ref()
            .map(|current| {
                current
                    .revisions
                    .iter()
                    .filter(|(number, old)| {
                        revisions
                            .get(number)
                            .is_none_or(|new| !Arc::ptr_eq(new, old))
                    })
                    .map(|(_, old)| old.clone())
                    .collect()
            })
            .unwrap_or_default();
        let forgotten: Vec<u32> = retired
            .iter()
            .map(|revision| revision.record.number)
            .filter(|number| !revisions.contains_key(number))
            .collect();
        self.resources
            .telemetry
            .metrics
            .forget_revisions(&name, forgotten);
        let placed = self.places(&app.record);
        tracing::info!(app = %name, node = %app.record.stamp.node, placed, "took a peer's change of an app");
        let app = Arc::new(App::new(app.record, revisions, rate, placed));
        self.apps
            .write()
            .expect("apps lock")
            .insert(name, app.clone());
        if secrets_changed {
            // Revisions kept from before hold the secrets they were built with.
            self.give_secrets(&app)?;
        }
        drop(current);
        retire(retired).await;
        Ok(true)
    }

    /// Removes app `name` as a peer did, when the removal is newer than what this node knows
    /// of the app; whether it did. The removal is kept either way it is newer, so that it
    /// travels on.
    pub async fn apply_removal(&self, name: &str, removal: Removal) -> Result<bool, DeployError> {
        if !apps::valid_name(name) {
            return Err(DeployError::InvalidName(name.to_string()));
        }
        let _changing = self.changes.lock().await;
        if self
            .known_stamp(name)?
            .is_some_and(|known| known >= removal.stamp)
        {
            return Ok(false);
        }
        tracing::info!(app = %name, node = %removal.stamp.node, "took a peer's removal of an app");
        self.remove_locked(name, &removal).await?;
        Ok(true)
    }
}

/// Refuses a peer's app that this node could not have made: bad names, revisions filed under
/// another app or number, digests that are not digests, settings that do not validate.
fn check_replica(app: &StoredApp) -> Result<(), DeployError> {
    let record = &app.record;
    if !apps::valid_name(&record.name) {
        return Err(DeployError::InvalidName(record.name.clone()));
    }
    for (number, revision) in &app.revisions {
        if revision.app != record.name || revision.number != *number {
            return Err(DeployError::InvalidSetting(format!(
                "revision {number} of the peer's app {:?} is filed under another app or number",
                record.name
            )));
        }
        if !blobs::is_digest(&revision.digest) {
            return Err(DeployError::InvalidSetting(format!(
                "revision {number} of the peer's app {:?} names no component",
                record.name
            )));
        }
        if *number >= record.next_revision {
            return Err(DeployError::InvalidSetting(format!(
                "revision {number} of the peer's app {:?} is past its next revision",
                record.name
            )));
        }
    }
    if !app.revisions.contains_key(&record.latest) {
        return Err(DeployError::InvalidSetting(format!(
            "the peer's app {:?} lacks its newest revision",
            record.name
        )));
    }
    let numbers: Vec<u32> = app.revisions.keys().copied().collect();
    record
        .validate(&numbers)
        .map_err(DeployError::InvalidSetting)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::spec::{self, AppRecord, DeploySpec, RevisionRecord};

    fn replica() -> StoredApp {
        let spec = spec::settle(
            &DeploySpec::default(),
            &crate::config::LimitsConfig::default(),
        )
        .unwrap();
        let revision = RevisionRecord {
            app: "hello".into(),
            number: 1,
            digest: "ab".repeat(32),
            size_bytes: 10,
            created_at: 0,
            spec,
        };
        StoredApp {
            record: AppRecord {
                latest: 1,
                next_revision: 2,
                ..AppRecord::new("hello", "default", 0)
            },
            revisions: BTreeMap::from([(1, revision)]),
        }
    }

    #[test]
    fn a_peers_app_is_taken_only_when_this_node_could_have_made_it() {
        assert!(check_replica(&replica()).is_ok());
        let mut bad_name = replica();
        bad_name.record.name = "../etc".into();
        assert!(check_replica(&bad_name).is_err());
        let mut other_app = replica();
        other_app.revisions.get_mut(&1).unwrap().app = "other".into();
        assert!(check_replica(&other_app).is_err());
        let mut no_digest = replica();
        no_digest.revisions.get_mut(&1).unwrap().digest = "../../db".into();
        assert!(check_replica(&no_digest).is_err());
        let mut no_latest = replica();
        no_latest.record.latest = 7;
        no_latest.record.next_revision = 8;
        assert!(check_replica(&no_latest).is_err());
        let mut future = replica();
        future.record.next_revision = 1;
        assert!(check_replica(&future).is_err());
        let mut bad_route = replica();
        bad_route.record.routes = vec!["/v1/admin".into()];
        assert!(check_replica(&bad_route).is_err());
    }

    #[test]
    fn an_app_with_its_secrets_reads_as_an_app_and_an_app_as_one_without_secrets() {
        let StoredApp { record, revisions } = replica();
        let sent = AppReplica {
            record,
            revisions,
            secrets: Some(vec![("API_KEY".into(), "value".into())]),
        };
        let json = serde_json::to_vec(&sent).unwrap();
        let read: StoredApp = serde_json::from_slice(&json).unwrap();
        assert_eq!(read.record, sent.record);
        assert_eq!(read.revisions, sent.revisions);
        let read: AppReplica = serde_json::from_slice(&json).unwrap();
        assert_eq!(read.secrets, sent.secrets);

        let older = serde_json::to_vec(&replica()).unwrap();
        let read: AppReplica = serde_json::from_slice(&older).unwrap();
        assert!(
            read.secrets.is_none(),
            "an older node's app leaves secrets as they are"
        );
        assert_eq!(read.revisions, replica().revisions);
    }

    #[test]
    fn a_saturated_node_has_every_slot_taken_and_its_queue_full() {
        let load = Load {
            running: 4,
            queued: 3,
            max_running: 4,
            max_queued: 4,
        };
        assert!(!load.saturated());
        assert!(Load { queued: 4, ..load }.saturated());
        assert_eq!(load.per_slot(), 1.75);
    }
}

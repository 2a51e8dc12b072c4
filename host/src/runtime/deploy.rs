//! Changing what the runtime serves: deployments (new revisions, the app-level settings),
//! traffic splits and rollbacks, removals and secrets. Each change writes its records in one
//! transaction and makes them durable before the apps in memory change, under one lock, so
//! that records, apps and the holds on blobs change together.

use super::app::{App, Revision};
use super::{check_preamble, Runtime};
use crate::apps;
use crate::apps::placement::Stamp;
use crate::apps::secrets::SecretsError;
use crate::apps::spec::{self, AppRecord, DeploySpec, RevisionRecord};
use crate::apps::traffic::{self, RevisionRef, TrafficTarget};
use crate::apps::Removal;
use crate::store::{self, StoreError};
use bytes::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Why a deployment (or a change of traffic, a rollback) was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("invalid app name {0:?}: use 1-63 lower-case letters, digits or '-', starting with a letter or digit")]
    InvalidName(String),
    #[error("the upload is not a WebAssembly binary (it does not start with \\0asm)")]
    NotWasm,
    #[error("this is a core WebAssembly module, not a component: build it with `cargo build --target wasm32-wasip2` or `cargo component build`")]
    CoreModule,
    #[error("the component does not compile: {0}")]
    Invalid(String),
    #[error("the component does not fit the tensorlet world (wasi:http proxy + wasi:nn + wasi:keyvalue + wasi:config): {0}")]
    WrongWorld(String),
    #[error("{0}")]
    InvalidSetting(String),
    #[error("no app named {0:?} is deployed on this node")]
    NotFound(String),
    #[error("app name {0:?} is taken on this node: app names are node-wide (they are URLs), pick another")]
    NameTaken(String),
    #[error("{0}: routes and queues are node-wide, pick another")]
    Taken(String),
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("component file I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How a deployment applies.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// The tenant the app belongs to. An app of another tenant by that name is not changed.
    pub tenant: String,
    /// Report what would change; change nothing.
    pub dry_run: bool,
    /// Change only what the request sets on the current deployment (a shorthand deploy),
    /// instead of taking it as the whole app (a manifest).
    pub overlay: bool,
}

impl Default for DeployOptions {
    /// A whole deployment, applied, of an app of the operator's tenant.
    fn default() -> Self {
        Self {
            tenant: crate::tenancy::OPERATOR_TENANT.to_string(),
            dry_run: false,
            overlay: false,
        }
    }
}

/// Lets go of revisions taken out of service: at once when no request uses them any more
/// (their components' files are deleted before this returns, if nothing else holds them),
/// else when the last request using one ends.
pub(super) async fn retire(revisions: Vec<Arc<Revision>>) {
    for revision in revisions {
        revision.retire();
        if let Ok(revision) = Arc::try_unwrap(revision) {
            revision.release().await;
        }
    }
}

/// What a deployment did (or, for a dry run, would do).
#[derive(Debug, Serialize)]
pub struct Deployed {
    pub app: AppRecord,
    /// The revision the deployment's settings live in (new or unchanged).
    pub revision: u32,
    /// Whether a new revision was made.
    pub created: bool,
    /// What changed, one line per setting: `path: old → new`.
    pub changes: Vec<String>,
}

impl Runtime {
    /// Applies a deployment to `name`: a new revision when the component or the revision's
    /// settings differ from the newest revision's (none otherwise: deploying the same
    /// manifest twice changes nothing), and the app-level settings (traffic, rate limits,
    /// fallback, routes). `component` `None` keeps the newest revision's component. A manifest
    /// describes the whole app; with `options.overlay` the request only changes what it sets
    /// on the current deployment (the CLI's flags, a bare component). A dry run checks and
    /// reports the changes without applying them. Requests already running finish on the
    /// revision they started on.
    pub async fn deploy(
        self: &Arc<Self>,
        name: &str,
        component: Option<Bytes>,
        request: DeploySpec,
        options: DeployOptions,
    ) -> Result<Deployed, DeployError> {
        if !apps::valid_name(name) {
            return Err(DeployError::InvalidName(name.to_string()));
        }
        if let Some(named) = request.app.name.as_deref().filter(|named| *named != name) {
            return Err(DeployError::InvalidSetting(format!(
                "the manifest names app {named:?}, not {name:?}"
            )));
        }
        // Storing and compiling are file and seconds of CPU work: on the blocking pool. The
        // blob is stored first and held, so that its compiled artifact goes with it; a
        // component that does not compile lets it go again.
        let fresh = match component {
            Some(bytes) => {
                check_preamble(&bytes)?;
                let runtime = self.clone();
                let size = bytes.len() as u64;
                let (held, pre) = tokio::task::spawn_blocking(move || {
                    let held = runtime.blobs.put_bytes(&bytes)?;
                    let pre = runtime.prepare(held.digest(), &bytes)?;
                    Ok::<_, DeployError>((held, pre))
                })
                .await
                .map_err(|e| DeployError::Invalid(format!("compilation failed: {e}")))??;
                Some((held, pre, size))
            }
            None => None,
        };
        let _changing = self.changes.lock().await;
        let stored = self.records.get(name)?;
        if stored
            .as_ref()
            .is_some_and(|app| app.record.tenant != options.tenant)
        {
            return Err(DeployError::NameTaken(name.to_string()));
        }
        let newest = stored
            .as_ref()
            .and_then(|app| app.revisions.get(&app.record.latest));
        // A shorthand deploy that names no buckets keeps a revision from before bucket
        // allow-lists able to open any of its buckets, as it could.
        let keeps_any_bucket = options.overlay
            && request.app.buckets.is_empty()
            && newest.is_some_and(|newest| newest.spec.buckets.is_none());
        let request = match (options.overlay, &stored, newest) {
            (true, Some(app), Some(newest)) => {
                DeploySpec::of(&app.record, &newest.spec).overlay(request)
            }
            _ => request,
        };
        let mut settled =
            spec::settle(&request, &self.limits).map_err(DeployError::InvalidSetting)?;
        if keeps_any_bucket {
            settled.buckets = None;
        }
        let (digest, size_bytes) = match (&fresh, newest) {
            (Some((held, _, size)), _) => (held.digest().to_string(), *size),
            (None, Some(newest)) => (newest.digest.clone(), newest.size_bytes),
            (None, None) => {
                return Err(DeployError::InvalidSetting(format!(
                    "app {name:?} is not deployed yet: give its component"
                )))
            }
        };
        let now = store::unix_now();
        let before = match &stored {
            Some(app) => app.record.clone(),
            None => AppRecord::new(name, &options.tenant, now),
        };
        let new_revision = newest
            .is_none_or(|newest| newest.digest != digest || newest.spec != settled)
            .then(|| RevisionRecord {
                app: name.to_string(),
                number: before.next_revision,
                digest: digest.clone(),
                size_bytes,
                created_at: now,
                spec: settled.clone(),
            });
        let mut after = before.with_policy(&request);
        if let Some(revision) = &new_revision {
            after.latest = revision.number;
            after.next_revision = revision.number + 1;
        }
        let mut numbers: Vec<u32> = stored
            .as_ref()
            .map(|app| app.revisions.keys().copied().collect())
            .unwrap_or_default();
        numbers.extend(new_revision.as_ref().map(|r| r.number));
        after
            .validate(&numbers)
            .map_err(DeployError::InvalidSetting)?;
        self.check_claims(&after)?;
        let pruned = self.prunable(&after, &numbers);
        let view = |record: &AppRecord, revision: Option<&RevisionRecord>| {
            serde_json::json!({
                "component": revision.map(|r| r.digest.clone()),
                "revision": revision.map(|r| &r.spec),
                "traffic": record.traffic,
                "sticky_header": record.sticky_header,
                "rate_limit": record.rate_limit,
                "client_rate_limit": record.client_rate_limit,
                "fallback": record.fallback,
                "routes": record.routes,
                "consumes": record.consumes,
                "public": record.public,
                "placement": record.placement,
            })
        };
        let changes = spec::diff(
            &view(&before, newest),
            &view(&after, new_revision.as_ref().or(newest)),
        );
        let unchanged = new_revision.is_none() && after == before;
        if options.dry_run || unchanged {
            return Ok(Deployed {
                revision: after.latest,
                app: if unchanged { before } else { after },
                created: false,
                changes,
            });
        }
        after.updated_at = now;
        after.stamp = self.next_stamp(&before)?;
        self.records
            .commit(&after, new_revision.as_ref(), &pruned)?;
        self.store.make_durable().await?;
        self.resources
            .telemetry
            .metrics
            .forget_revisions(name, pruned.iter().copied());

        let current = self.app(name);
        let mut revisions: BTreeMap<u32, Arc<Revision>> = current
            .as_ref()
            .map(|app| app.revisions.clone())
            .unwrap_or_default();
        let retired: Vec<Arc<Revision>> = pruned
            .iter()
            .filter_map(|number| revisions.remove(number))
            .collect();
        if let Some(record) = new_revision.clone() {
            let (hold, prepared) = match fresh {
                Some((held, pre, _)) => (held, Some(pre)),
                // The same component with new settings: the newest revision's preparation
                // serves it as well.
                None => (
                    self.blobs.hold(record.digest.clone()),
                    newest
                        .and_then(|n| revisions.get(&n.number))
                        .and_then(|previous| previous.prepared_now()),
                ),
            };
            let prepared = match prepared {
                None if record.spec.min_instances > 0 => {
                    let (runtime, digest) = (self.clone(), record.digest.clone());
                    tokio::task::spawn_blocking(move || runtime.load_prepared(&digest))
                        .await
                        .map_err(|e| DeployError::Invalid(format!("preparing failed: {e}")))?
                        .ok()
                }
                prepared => prepared,
            };
            let secrets = self.secrets.values(name)?;
            revisions.insert(
                record.number,
                Arc::new(Revision::new(
                    record,
                    &after.tenant,
                    hold,
                    prepared,
                    &secrets,
                )),
            );
        }
        let rate = match &current {
            Some(app)
                if app.record.rate_limit == after.rate_limit
                    && app.record.client_rate_limit == after.client_rate_limit =>
            {
                app.rate.clone()
            }
            _ => self.rate_limits(&after),
        };
        let placed = self.places(&after);
        self.apps.write().expect("apps lock").insert(
            name.to_string(),
            Arc::new(App::new(after.clone(), revisions, rate, placed)),
        );
        drop(current);
        retire(retired).await;
        Ok(Deployed {
            revision: after.latest,
            app: after,
            created: new_revision.is_some(),
            changes,
        })
    }

    /// Refuses routes and queues that another app holds. A route may not lie under another
    /// tenant's route either (it would take part of that app's paths, and the requests its
    /// clients send there), and only the operator's tenant may take `/`. Another tenant's app
    /// is not named.
    pub(super) fn check_claims(&self, app: &AppRecord) -> Result<(), DeployError> {
        let others: Vec<Arc<App>> = self
            .apps()
            .into_iter()
            .filter(|other| other.record.name != app.name)
            .collect();
        let refuse = |other: &App, what: String| {
            if other.record.tenant == app.tenant {
                DeployError::InvalidSetting(format!("{what} app {:?}", other.record.name))
            } else {
                DeployError::Taken(format!("{what} another tenant's app"))
            }
        };
        for route in &app.routes {
            if route == "/" && app.tenant != crate::tenancy::OPERATOR_TENANT {
                return Err(DeployError::InvalidSetting(
                    "app.routes: \"/\" (every path no app claims) is the operator's to take".into(),
                ));
            }
            for other in &others {
                for theirs in &other.record.routes {
                    let under = other.record.tenant != app.tenant
                        && theirs != "/"
                        && spec::route_covers(theirs, route);
                    if theirs == route || under {
                        let how = if theirs == route { "already" } else { "under" };
                        return Err(refuse(
                            other,
                            format!("app.routes: {route:?} is {how} a route of"),
                        ));
                    }
                }
            }
        }
        for queue in &app.consumes {
            if let Some(other) = others
                .iter()
                .find(|other| other.record.consumes.contains(queue))
            {
                return Err(refuse(
                    other,
                    format!("app.consumes: queue {queue:?} is already consumed by"),
                ));
            }
        }
        Ok(())
    }

    /// Revisions to delete so that at most `max_revisions_per_app` are kept: the oldest that
    /// no traffic target, tag or fallback names.
    fn prunable(&self, record: &AppRecord, numbers: &[u32]) -> Vec<u32> {
        let keep = self.limits.max_revisions_per_app as usize;
        let mut needed: Vec<u32> = traffic::referenced(&record.traffic, record.latest).collect();
        needed.push(record.latest);
        needed.extend(record.fallback.as_ref().and_then(|f| f.revision));
        let mut candidates: Vec<u32> = numbers
            .iter()
            .copied()
            .filter(|n| !needed.contains(n))
            .collect();
        candidates.sort_unstable();
        let excess = numbers.len().saturating_sub(keep);
        candidates.into_iter().take(excess).collect()
    }

    /// Sets how `name`'s requests are split across its revisions; `sticky_header` `None`
    /// keeps the app's. Requests already running finish on theirs.
    pub async fn set_traffic(
        &self,
        name: &str,
        split: Vec<TrafficTarget>,
        sticky_header: Option<Option<String>>,
    ) -> Result<AppRecord, DeployError> {
        let _changing = self.changes.lock().await;
        self.set_traffic_locked(name, split, sticky_header).await
    }

    async fn set_traffic_locked(
        &self,
        name: &str,
        split: Vec<TrafficTarget>,
        sticky_header: Option<Option<String>>,
    ) -> Result<AppRecord, DeployError> {
        let stored = self
            .records
            .get(name)?
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        let mut after = stored.record.clone();
        after.traffic = split;
        if let Some(header) = sticky_header {
            after.sticky_header = header.map(|h| h.to_ascii_lowercase());
        }
        let numbers: Vec<u32> = stored.revisions.keys().copied().collect();
        after
            .validate(&numbers)
            .map_err(DeployError::InvalidSetting)?;
        let app = self.commit_record(&stored.record, after).await?;
        Ok(app.record.clone())
    }

    /// Stores `after` as the new record of the app `before` describes, as a change made here
    /// now (of its settings, not of its revisions): stamped, durable, then served with the
    /// revisions, rate limits and placement the app has. The caller holds `changes`.
    async fn commit_record(
        &self,
        before: &AppRecord,
        mut after: AppRecord,
    ) -> Result<Arc<App>, DeployError> {
        after.updated_at = store::unix_now();
        after.stamp = self.next_stamp(before)?;
        self.records.commit(&after, None, &[])?;
        self.store.make_durable().await?;
        let current = self
            .app(&after.name)
            .ok_or_else(|| DeployError::NotFound(after.name.clone()))?;
        let app = Arc::new(App::new(
            after,
            current.revisions.clone(),
            current.rate.clone(),
            current.placed,
        ));
        self.apps
            .write()
            .expect("apps lock")
            .insert(app.record.name.clone(), app.clone());
        Ok(app)
    }

    /// Sends all of `name`'s traffic to `revision`, or, without one, to the revision before
    /// the one that has all of it now. Tags stay, with no share.
    pub async fn rollback(
        &self,
        name: &str,
        revision: Option<u32>,
    ) -> Result<AppRecord, DeployError> {
        let _changing = self.changes.lock().await;
        let stored = self
            .records
            .get(name)?
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        let record = &stored.record;
        let target = match revision {
            Some(number) => number,
            None => {
                let mut serving: Vec<u32> = record
                    .traffic
                    .iter()
                    .filter(|t| t.percent > 0)
                    .map(|t| traffic::resolve(t.revision, record.latest))
                    .collect();
                serving.dedup();
                let [current] = serving[..] else {
                    return Err(DeployError::InvalidSetting(
                        "traffic is split across revisions: name the revision to roll back to"
                            .into(),
                    ));
                };
                *stored
                    .revisions
                    .range(..current)
                    .next_back()
                    .ok_or_else(|| {
                        DeployError::InvalidSetting(format!(
                            "revision {current} is the oldest one kept: there is none to roll back to"
                        ))
                    })?
                    .0
            }
        };
        let mut split = vec![TrafficTarget {
            revision: RevisionRef::Number(target),
            percent: 100,
            tag: None,
        }];
        split.extend(
            record
                .traffic
                .iter()
                .filter(|t| t.tag.is_some())
                .map(|t| TrafficTarget {
                    percent: 0,
                    ..t.clone()
                }),
        );
        self.set_traffic_locked(name, split, None).await
    }

    /// Removes an app with its revisions and secrets; requests already running finish (their
    /// revisions hold what they need). Its components' files go once nothing uses them. The
    /// removal is kept, so that the fleet's other nodes remove it too.
    pub async fn remove(&self, name: &str) -> Result<Option<AppRecord>, DeployError> {
        let _changing = self.changes.lock().await;
        let Some(stored) = self.records.get(name)? else {
            return Ok(None);
        };
        let removal = Removal {
            tenant: stored.record.tenant.clone(),
            stamp: self.next_stamp(&stored.record)?,
        };
        self.remove_locked(name, &removal).await?;
        Ok(Some(stored.record))
    }

    /// Removes app `name` (if this node has it) and keeps `removal`; the caller holds
    /// `changes`.
    pub(super) async fn remove_locked(
        &self,
        name: &str,
        removal: &Removal,
    ) -> Result<(), DeployError> {
        let stored = self.records.get(name)?;
        self.records.remove_app(name, removal)?;
        self.secrets.remove_app(name)?;
        self.store.make_durable().await?;
        let removed = self.apps.write().expect("apps lock").remove(name);
        if let Some(stored) = stored {
            self.resources
                .telemetry
                .metrics
                .forget_app(name, 1..stored.record.next_revision);
        }
        if let Err(error) = self.resources.telemetry.logs.remove_app(name).await {
            tracing::error!(app = name, %error, "deleting the removed app's log failed");
        }
        if let Some(app) = removed {
            let revisions = app.revisions.values().cloned().collect();
            drop(app);
            retire(revisions).await;
        }
        Ok(())
    }

    /// The stamp of a change of `record` made here now: newer than the record's and than a
    /// removal of an app of that name before it.
    fn next_stamp(&self, record: &AppRecord) -> Result<Stamp, DeployError> {
        let removed = self.records.removal(&record.name)?.map(|r| r.stamp);
        let last = removed.max(Some(record.stamp.clone()));
        Ok(Stamp::next(&self.resources.node_id, last.as_ref()))
    }

    /// Sets secret `key` of app `name` (stored encrypted); its next requests see it. A change
    /// of the app: the fleet's other nodes take the secret with it.
    pub async fn set_secret(&self, name: &str, key: &str, value: &[u8]) -> Result<(), DeployError> {
        let _changing = self.changes.lock().await;
        self.app(name)
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        self.secrets.set(name, key, value)?;
        self.secrets_changed(name).await
    }

    /// Removes secret `key` of app `name`; whether it was there. A change of the app, as
    /// [`Runtime::set_secret`].
    pub async fn remove_secret(&self, name: &str, key: &str) -> Result<bool, DeployError> {
        let _changing = self.changes.lock().await;
        self.app(name)
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        let removed = self.secrets.remove(name, key)?;
        if removed {
            self.secrets_changed(name).await?;
        }
        Ok(removed)
    }

    /// Stamps app `name` with a change made here now (its secrets were written first, so a
    /// peer that reads the new stamp reads the new secrets), makes both durable, and gives the
    /// app's revisions their new secrets; the caller holds `changes`.
    async fn secrets_changed(&self, name: &str) -> Result<(), DeployError> {
        let stored = self
            .records
            .get(name)?
            .ok_or_else(|| DeployError::NotFound(name.to_string()))?;
        let app = self
            .commit_record(&stored.record, stored.record.clone())
            .await?;
        self.give_secrets(&app)
    }

    /// The names (never the values) of app `name`'s secrets.
    pub fn secret_names(&self, name: &str) -> Result<Vec<String>, DeployError> {
        Ok(self.secrets.names(name)?)
    }

    /// Gives `app`'s revisions its secrets as they are now.
    pub(super) fn give_secrets(&self, app: &App) -> Result<(), DeployError> {
        let secrets = self.secrets.values(&app.record.name)?;
        for revision in app.revisions.values() {
            revision.set_secrets(&secrets);
        }
        Ok(())
    }
}

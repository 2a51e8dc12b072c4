//! Desired state across the fleet, by anti-entropy: every `[cluster] sync_interval_ms` a node
//! asks up to [`PEERS_PER_ROUND`] alive peers what they have (`GET /cluster/v1/state`), and
//! takes every app whose change is newer than what it knows (`GET /cluster/v1/apps/<name>`),
//! with the components it lacks (`GET /cluster/v1/blobs/<digest>`, verified against the
//! digest on arrival), and every newer removal. An app that runs here brings the models it
//! names that this node lacks (`GET /cluster/v1/models/<name>`, the file again by digest).
//! A CRL of the cluster CA issued after the one in use travels the same way
//! (`GET /cluster/v1/crl`): revoking a node on one node revokes it on all. Last writer wins per app. A node that was down
//! catches up at its first round after it rejoins; a change travels on from node to node, so
//! the node where it was made need not stay up. An app's secrets come with it, in the
//! mutual-TLS channel, and are encrypted here with this node's own key.
//!
//! The replicated key-value buckets of the apps that run here are read from each peer that
//! runs the app too, from where this node left off in that peer's feed
//! (`GET /cluster/v1/kv/<app>/<bucket>?after=<seq>`, see [`crate::kv::feed`]); last writer
//! wins per key.

use super::client;
use super::fleet::{Fleet, PeerState};
use super::Member;
use crate::apps::spec::RevisionRecord;
use crate::kv::feed::{FeedPage, MAX_PAGE_BYTES, TOMBSTONE_RETENTION};
use crate::nn::{ModelRecord, ModelRegistry, Upload};
use crate::runtime::{AppReplica, ReplicatedBucket, Runtime};
use crate::store::blobs::{self, Blobs, Held};
use crate::store::Store;
use crate::tenancy::{SharedTenancy, Tenancy};
use crate::tls::peer::PeerTls;
use futures_util::StreamExt;
use rand::seq::SliceRandom;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Peers asked per round.
const PEERS_PER_ROUND: usize = 8;
/// The longest a state or an app record may take to arrive.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a component or model file may take to arrive, plus a second per MiB.
const BLOB_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest state or app record taken from a peer.
const MAX_RECORD_BYTES: usize = 16 << 20;
/// The longest a page of a peer's key-value feed may take to arrive.
const KV_PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Pages of one bucket's feed taken from a peer per round: a bucket far behind catches up over
/// several rounds, without holding up the others.
const KV_PAGES_PER_ROUND: usize = 16;
/// This node's place in each peer's feeds: `<peer>/<scoped app>/<bucket>` → the last sequence
/// number it took (big-endian).
const KV_CURSORS_TREE: &str = "kvcursors";
/// How often tombstones older than [`TOMBSTONE_RETENTION`] are swept.
const TOMBSTONE_SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// What a round of replication needs.
pub struct Replicator {
    pub fleet: Arc<Fleet>,
    pub runtime: Arc<Runtime>,
    pub models: Arc<ModelRegistry>,
    pub tls: Arc<PeerTls>,
    pub tenancy: Tenancy,
    pub store: Store,
    pub blobs: Arc<Blobs>,
    /// Largest model file taken (`nn.max_model_bytes`).
    pub max_model_bytes: u64,
    /// Where components are staged as they arrive.
    pub tmp_dir: PathBuf,
}

impl Replicator {
    /// Runs a round every `every` until `shutdown`.
    pub fn spawn(
        self,
        every: Duration,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut swept_at = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                tokio::select! {
                    () = self.round() => {}
                    () = shutdown.cancelled() => return,
                }
                if swept_at.elapsed() >= TOMBSTONE_SWEEP_EVERY {
                    swept_at = std::time::Instant::now();
                    self.sweep_tombstones().await;
                }
            }
        })
    }

    /// Asks some alive peers what they have, and takes what is newer.
    async fn round(&self) {
        let mut peers = self.fleet.alive_peers();
        peers.shuffle(&mut rand::thread_rng());
        peers.truncate(PEERS_PER_ROUND);
        let states =
            futures_util::future::join_all(peers.iter().map(|peer| {
                self.get_json::<PeerState>(peer, "/cluster/v1/state", REQUEST_TIMEOUT)
            }))
            .await;
        for (peer, state) in peers.iter().zip(states) {
            match state {
                Ok(state) => {
                    if state.crl_issued_at > self.tls.crl_issued_at() {
                        if let Err(error) = self.take_crl(peer).await {
                            tracing::warn!(peer = %peer.id, %error, "a peer's newer CRL was not taken");
                        }
                    }
                    if let Err(error) = self.take_tenancy(peer, &state).await {
                        tracing::warn!(peer = %peer.id, %error, "a peer's tenants and keys were not taken");
                    }
                    self.catch_up(peer, &state).await;
                    self.take_kv(peer, &state).await;
                    self.fleet.record(&peer.id, state);
                }
                Err(error) => {
                    tracing::debug!(peer = %peer.id, %error, "a peer's state did not arrive")
                }
            }
        }
    }

    /// Takes the tenants, keys and revocations of `peer` when what it shares differs.
    async fn take_tenancy(&self, peer: &Member, state: &PeerState) -> Result<(), String> {
        let ours = self.tenancy.shared().map_err(|e| e.to_string())?;
        if state.tenancy.is_none() || state.tenancy == Some(ours.fingerprint()) {
            return Ok(());
        }
        let theirs: SharedTenancy = self
            .get_json(peer, "/cluster/v1/tenancy", REQUEST_TIMEOUT)
            .await?;
        if self.tenancy.merge(&theirs).map_err(|e| e.to_string())? {
            self.store.make_durable().await.map_err(|e| e.to_string())?;
            tracing::info!(peer = %peer.id, "took a peer's tenants and keys");
        }
        Ok(())
    }

    /// Takes `peer`'s CRL, when the cluster CA signed it and it is newer than this node's.
    async fn take_crl(&self, peer: &Member) -> Result<(), String> {
        let pem = self
            .get_bytes(peer, "/cluster/v1/crl", REQUEST_TIMEOUT, MAX_RECORD_BYTES)
            .await?;
        let tls = self.tls.clone();
        let adopted = tokio::task::spawn_blocking(move || tls.adopt_crl(&pem))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{e:#}"))?;
        if adopted {
            tracing::info!(peer = %peer.id, "took the cluster's newer CRL");
        }
        Ok(())
    }

    /// Takes the apps and removals of `state` (from `peer`) that are newer than this node's.
    async fn catch_up(&self, peer: &Member, state: &PeerState) {
        for (name, removal) in &state.desired.removed {
            if let Err(error) = self.runtime.apply_removal(name, removal.clone()).await {
                tracing::warn!(peer = %peer.id, app = %name, %error, "a peer's removal was not taken");
            }
        }
        for version in &state.desired.apps {
            let newer = match self.runtime.known_stamp(&version.name) {
                Ok(known) => known.is_none_or(|known| known < version.stamp),
                Err(error) => {
                    tracing::error!(app = %version.name, %error, "reading an app failed");
                    continue;
                }
            };
            if !newer {
                continue;
            }
            if let Err(error) = self.take_app(peer, &version.name).await {
                tracing::warn!(peer = %peer.id, app = %version.name, %error, "a peer's app was not taken");
            }
        }
    }

    /// Takes the changes of the replicated buckets of the apps that run here and on `peer`.
    async fn take_kv(&self, peer: &Member, state: &PeerState) {
        for replicated in self.runtime.replicated_buckets() {
            if !state.desired.serving.contains(&replicated.app) {
                continue;
            }
            if let Err(error) = self.take_feed(peer, &replicated).await {
                tracing::warn!(
                    peer = %peer.id,
                    app = %replicated.app,
                    bucket = %replicated.bucket,
                    %error,
                    "a peer's key-value changes were not taken"
                );
            }
        }
    }

    /// Takes the changes of `replicated`'s feed on `peer` that came after those this node
    /// took last, up to [`KV_PAGES_PER_ROUND`] pages.
    async fn take_feed(&self, peer: &Member, replicated: &ReplicatedBucket) -> Result<(), String> {
        let cursors = self
            .store
            .tree(KV_CURSORS_TREE)
            .map_err(|e| e.to_string())?;
        let cursor_key = format!("{}/{}/{}", peer.id, replicated.scoped, replicated.bucket);
        let mut cursor = match cursors.get(&cursor_key).map_err(|e| e.to_string())? {
            Some(bytes) => u64::from_be_bytes(
                bytes[..]
                    .try_into()
                    .map_err(|_| "a malformed feed cursor")?,
            ),
            None => 0,
        };
        let feed = self
            .runtime
            .kv_feed(replicated)
            .map_err(|e| e.to_string())?;
        for _ in 0..KV_PAGES_PER_ROUND {
            let path = format!(
                "/cluster/v1/kv/{}/{}?after={cursor}",
                replicated.app, replicated.bucket
            );
            let page = self
                .get_bytes(peer, &path, KV_PAGE_TIMEOUT, MAX_PAGE_BYTES)
                .await?;
            let page = FeedPage::decode(&page)?;
            if page.last < cursor {
                // The peer's database is not the one this cursor was in (restored, replaced):
                // read its feed again from the start.
                cursor = 0;
                continue;
            }
            let Some(newest) = page.changes.last().map(|change| change.seq) else {
                break;
            };
            let applying = feed.clone();
            let applied = tokio::task::spawn_blocking(move || applying.apply(&page.changes))
                .await
                .map_err(|e| e.to_string())??;
            if applied > 0 {
                self.store.make_durable().await.map_err(|e| e.to_string())?;
                tracing::debug!(peer = %peer.id, app = %replicated.app, bucket = %replicated.bucket, applied, "took key-value changes");
            }
            cursor = newest;
            cursors
                .insert(&cursor_key, &cursor.to_be_bytes())
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Drops the tombstones older than [`TOMBSTONE_RETENTION`] from every replicated bucket.
    async fn sweep_tombstones(&self) {
        let before_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |now| now.as_millis() as u64)
            .saturating_sub(TOMBSTONE_RETENTION.as_millis() as u64);
        for replicated in self.runtime.replicated_buckets() {
            let feed = match self.runtime.kv_feed(&replicated) {
                Ok(feed) => feed,
                Err(error) => {
                    tracing::warn!(app = %replicated.app, %error, "opening a bucket's feed failed");
                    continue;
                }
            };
            let swept = tokio::task::spawn_blocking(move || feed.sweep_tombstones(before_ms)).await;
            match swept {
                Ok(Ok(0)) => {}
                Ok(Ok(swept)) => {
                    tracing::info!(app = %replicated.app, bucket = %replicated.bucket, swept, "swept old tombstones")
                }
                Ok(Err(error)) => {
                    tracing::warn!(app = %replicated.app, %error, "sweeping tombstones failed")
                }
                Err(error) => {
                    tracing::warn!(app = %replicated.app, %error, "sweeping tombstones failed")
                }
            }
        }
    }

    /// Fetches app `name` from `peer` with the components this node lacks, and applies it.
    async fn take_app(&self, peer: &Member, name: &str) -> Result<(), String> {
        let replica: AppReplica = self
            .get_json(peer, &format!("/cluster/v1/apps/{name}"), REQUEST_TIMEOUT)
            .await?;
        if replica.record.name != name {
            return Err(format!(
                "the peer answered with app {:?}",
                replica.record.name
            ));
        }
        if self.runtime.places(&replica.record) {
            self.take_models(peer, &replica.revisions).await?;
        }
        let mut fetched = Vec::new();
        for (digest, size) in self.runtime.missing_components(&replica.revisions) {
            fetched.push(self.fetch_component(peer, &digest, size).await?);
        }
        let applied = self
            .runtime
            .apply_replica(replica, fetched)
            .await
            .map_err(|e| e.to_string())?;
        if applied {
            tracing::info!(peer = %peer.id, app = name, "app replicated");
        }
        Ok(())
    }

    /// Registers the models that `revisions` name and this node lacks, as `peer` has them.
    async fn take_models(
        &self,
        peer: &Member,
        revisions: &BTreeMap<u32, RevisionRecord>,
    ) -> Result<(), String> {
        let mut wanted: Vec<&String> = revisions
            .values()
            .flat_map(|revision| &revision.spec.models)
            .collect();
        wanted.sort();
        wanted.dedup();
        for model in wanted {
            if self.models.record(model).is_some() {
                continue;
            }
            let record: ModelRecord = self
                .get_json(
                    peer,
                    &format!("/cluster/v1/models/{model}"),
                    REQUEST_TIMEOUT,
                )
                .await?;
            if record.size_bytes > self.max_model_bytes {
                return Err(format!(
                    "model {model} ({} bytes) is larger than nn.max_model_bytes",
                    record.size_bytes
                ));
            }
            let staged = self
                .fetch_blob(peer, &record.digest, record.size_bytes)
                .await?;
            let upload = Upload {
                encoding: record.encoding,
                // This node picks its own backend for the encoding and target.
                backend: None,
                target: record.target,
                digest: record.digest,
                size_bytes: record.size_bytes,
                tenant: record.tenant,
                batching: record.batching,
            };
            self.models
                .add(model, staged, upload)
                .await
                .map_err(|e| format!("model {model}: {e}"))?;
            tracing::info!(peer = %peer.id, model = %model, "model replicated");
        }
        Ok(())
    }

    /// Fetches component `digest` of `size` bytes from `peer` into the blob store.
    async fn fetch_component(
        &self,
        peer: &Member,
        digest: &str,
        size: u64,
    ) -> Result<Held, String> {
        if size > crate::runtime::MAX_COMPONENT_BYTES {
            return Err(format!(
                "component {digest} ({size} bytes) is larger than this node takes"
            ));
        }
        let staged = self.fetch_blob(peer, digest, size).await?;
        let (blobs, digest) = (self.blobs.clone(), digest.to_string());
        tokio::task::spawn_blocking(move || blobs.put_file(&staged, &digest))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("storing a component: {e}"))
    }

    /// Fetches blob `digest` of `size` bytes from `peer` into a staged file, refused unless
    /// its bytes hash to `digest` and are `size` long.
    async fn fetch_blob(&self, peer: &Member, digest: &str, size: u64) -> Result<PathBuf, String> {
        if !blobs::is_digest(digest) {
            return Err(format!("{digest:?} is not a digest"));
        }
        let client = self
            .fleet
            .clients
            .client(peer)
            .ok_or("no client for the peer")?;
        // A large file gets a second more per MiB.
        let timeout = BLOB_TIMEOUT + Duration::from_secs(size >> 20);
        let response = client
            .get(client::url(peer, &format!("/cluster/v1/blobs/{digest}")))
            .timeout(timeout)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("fetching blob {digest}: {e}"))?;
        let (staged, arrived, arrived_size) =
            blobs::stage_stream(&self.tmp_dir, response.bytes_stream(), size)
                .await
                .map_err(|e| format!("blob {digest}: {e}"))?;
        if arrived != digest || arrived_size != size {
            let _ = tokio::fs::remove_file(&staged).await;
            return Err(format!(
                "blob {digest} arrived as other bytes (SHA-256 {arrived}): refused"
            ));
        }
        Ok(staged)
    }

    /// `path` of `peer` as JSON, at most [`MAX_RECORD_BYTES`], within `timeout`.
    async fn get_json<T: DeserializeOwned>(
        &self,
        peer: &Member,
        path: &str,
        timeout: Duration,
    ) -> Result<T, String> {
        let body = self
            .get_bytes(peer, path, timeout, MAX_RECORD_BYTES)
            .await?;
        serde_json::from_slice(&body).map_err(|e| format!("{path}: {e}"))
    }

    /// `path` of `peer`, at most `max_bytes`, within `timeout`.
    async fn get_bytes(
        &self,
        peer: &Member,
        path: &str,
        timeout: Duration,
        max_bytes: usize,
    ) -> Result<Vec<u8>, String> {
        let client = self
            .fleet
            .clients
            .client(peer)
            .ok_or("no client for the peer")?;
        let read = async {
            let response = client
                .get(client::url(peer, path))
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .map_err(|e| e.to_string())?;
            let mut body = Vec::new();
            let mut chunks = response.bytes_stream();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                if body.len() + chunk.len() > max_bytes {
                    return Err(format!("{path} is larger than {max_bytes} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(body)
        };
        tokio::time::timeout(timeout, read)
            .await
            .map_err(|_| format!("{path} did not arrive within {timeout:?}"))?
    }
}

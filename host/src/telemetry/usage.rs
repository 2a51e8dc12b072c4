//! Metering: what each app used, per hour (requests, errors, time, inference per model, LLM
//! tokens, bytes, jobs), for `tensorlet usage [--app] [--since]` and `/v1/admin/usage`.
//!
//! Recording only adds to a map in memory ([`Meter::record`]); [`spawn_persist_loop`] merges
//! that map into the sled tree `usage` every few seconds and makes it durable, so a crash loses
//! at most the last interval. Key: `<app>/<hour>`, the hour being `unix_secs / 3600` written
//! with 10 digits (zero-padded, so keys sort by hour) → [`UsageRecord`] JSON.
//!
//! Usage is billing history: it outlives the app it belongs to (removing an app keeps its
//! rows) and goes only when [`Meter::prune`] passes its retention.

use crate::store::{get_json, unix_now, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::collections::{btree_map, BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How often [`spawn_persist_loop`] persists, unless configured otherwise.
pub const DEFAULT_PERSIST_INTERVAL: Duration = Duration::from_secs(10);
/// How long usage is kept, unless configured otherwise: 90 days.
pub const DEFAULT_RETENTION_HOURS: u64 = 90 * 24;
/// The most (app, hour) records held in memory; one more is persisted first.
pub const MAX_PENDING_RECORDS: usize = 10_000;

/// What one app used in one hour (or, summed, over several). Every field defaults to zero
/// when absent, so records stored before a field existed still read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UsageRecord {
    pub requests: u64,
    /// Answers with a 4xx status.
    pub errors_client: u64,
    /// Answers with a 5xx status.
    pub errors_server: u64,
    /// Requests refused by the node's limits (429 and 503).
    pub shed: u64,
    pub timeouts: u64,
    /// Wall time of requests, in microseconds.
    pub wall_us: u64,
    /// CPU time of the guest, in microseconds.
    pub cpu_us: u64,
    /// Inference time per model name, in microseconds.
    pub inference_us: BTreeMap<String, u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Asynchronous jobs run.
    pub jobs: u64,
}

impl UsageRecord {
    /// Adds `other` to this record (saturating).
    pub fn merge(&mut self, other: &UsageRecord) {
        let Self {
            requests,
            errors_client,
            errors_server,
            shed,
            timeouts,
            wall_us,
            cpu_us,
            inference_us,
            prompt_tokens,
            completion_tokens,
            bytes_in,
            bytes_out,
            jobs,
        } = other;
        for (total, added) in [
            (&mut self.requests, requests),
            (&mut self.errors_client, errors_client),
            (&mut self.errors_server, errors_server),
            (&mut self.shed, shed),
            (&mut self.timeouts, timeouts),
            (&mut self.wall_us, wall_us),
            (&mut self.cpu_us, cpu_us),
            (&mut self.prompt_tokens, prompt_tokens),
            (&mut self.completion_tokens, completion_tokens),
            (&mut self.bytes_in, bytes_in),
            (&mut self.bytes_out, bytes_out),
            (&mut self.jobs, jobs),
        ] {
            *total = total.saturating_add(*added);
        }
        for (model, micros) in inference_us {
            let total = self.inference_us.entry(model.clone()).or_default();
            *total = total.saturating_add(*micros);
        }
    }
}

/// One app's usage in one hour.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// The tenant that owns the app.
    pub tenant: String,
    pub app: String,
    /// `unix_secs / 3600` at the start of the hour.
    pub hour: u64,
    pub usage: UsageRecord,
}

/// The hour (`unix_secs / 3600`) that a time falls in.
pub fn unix_hour(unix_secs: u64) -> u64 {
    unix_secs / 3600
}

/// Sums rows per app.
pub fn totals(rows: &[UsageRow]) -> BTreeMap<String, UsageRecord> {
    let mut totals: BTreeMap<String, UsageRecord> = BTreeMap::new();
    for row in rows {
        totals
            .entry(crate::tenancy::scoped_name(&row.tenant, &row.app))
            .or_default()
            .merge(&row.usage);
    }
    totals
}

/// The node's meter; cheap to clone. Open one per store: persisting relies on being the only
/// writer of the `usage` tree.
#[derive(Clone)]
pub struct Meter {
    shared: Arc<Shared>,
}

struct Shared {
    tree: sled::Tree,
    pending: Mutex<Pending>,
    /// Held while the tree and the pending map are read or changed together: by
    /// [`Meter::persist`] from taking the map until its batch is applied (so no query counts
    /// usage twice or not at all), by [`Meter::query`] and by [`Meter::prune`].
    tree_lock: Mutex<()>,
}

/// Usage recorded since the last persist, per app and hour.
#[derive(Default)]
struct Pending {
    by_app: HashMap<String, BTreeMap<u64, UsageRecord>>,
    records: usize,
}

impl Pending {
    fn record_mut(&mut self, app: &str, hour: u64) -> &mut UsageRecord {
        match self.by_app.entry(app.to_string()).or_default().entry(hour) {
            btree_map::Entry::Occupied(existing) => existing.into_mut(),
            btree_map::Entry::Vacant(new) => {
                self.records += 1;
                new.insert(UsageRecord::default())
            }
        }
    }

    fn merge(&mut self, other: Pending) {
        for (app, hours) in other.by_app {
            for (hour, usage) in hours {
                self.record_mut(&app, hour).merge(&usage);
            }
        }
    }
}

impl Meter {
    /// Opens the `usage` tree of `store`.
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            shared: Arc::new(Shared {
                tree: store.tree("usage")?,
                pending: Mutex::new(Pending::default()),
                tree_lock: Mutex::new(()),
            }),
        })
    }

    /// Adds to `app`'s usage in the current hour: `f` runs under a lock and must only add.
    pub fn record(&self, app: &str, f: impl FnOnce(&mut UsageRecord)) {
        self.record_at(app, unix_hour(unix_now()), f);
    }

    /// Adds to `app`'s usage in `hour`. When [`MAX_PENDING_RECORDS`] (app, hour) records are
    /// already pending and this is a new one, the pending usage is persisted first (on this
    /// thread; if that fails it is discarded, with an error logged, to bound memory).
    pub fn record_at(&self, app: &str, hour: u64, f: impl FnOnce(&mut UsageRecord)) {
        {
            let mut pending = self.lock_pending();
            let existing = pending
                .by_app
                .get_mut(app)
                .and_then(|hours| hours.get_mut(&hour));
            if let Some(record) = existing {
                f(record);
                return;
            }
            if pending.records < MAX_PENDING_RECORDS {
                f(pending.record_mut(app, hour));
                return;
            }
        }
        if let Err(error) = self.persist() {
            let mut pending = self.lock_pending();
            let discarded = std::mem::take(&mut *pending).records;
            tracing::error!(%error, discarded, "usage could not be persisted and was discarded to bound memory");
        }
        f(self.lock_pending().record_mut(app, hour));
    }

    /// Merges the pending usage into the stored rows, in one sled batch; on failure it stays
    /// pending. Not durable by itself: the caller then calls [`Store::make_durable`].
    pub fn persist(&self) -> Result<(), StoreError> {
        let _tree = lock(&self.shared.tree_lock);
        let taken = std::mem::take(&mut *self.lock_pending());
        if taken.records == 0 {
            return Ok(());
        }
        let written = self.merge_into_tree(&taken);
        if written.is_err() {
            self.lock_pending().merge(taken);
        }
        written
    }

    fn merge_into_tree(&self, pending: &Pending) -> Result<(), StoreError> {
        let tree = &self.shared.tree;
        let mut batch = sled::Batch::default();
        for (app, hours) in &pending.by_app {
            for (hour, usage) in hours {
                let key = row_key(app, *hour);
                let mut stored: UsageRecord = get_json(tree, &key)?.unwrap_or_default();
                stored.merge(usage);
                let json = serde_json::to_vec(&stored).expect("usage records serialise");
                batch.insert(key.as_bytes(), json);
            }
        }
        tree.apply_batch(batch)?;
        Ok(())
    }

    /// Usage per app and hour, stored and pending together, sorted by subject then hour: of
    /// the subject `app` (a [`crate::tenancy::scoped_name`]; all when `None`), in the hours `since_hour <= hour < until_hour` (no upper bound
    /// when `None`).
    pub fn query(
        &self,
        app: Option<&str>,
        since_hour: u64,
        until_hour: Option<u64>,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let wanted_hour =
            |hour: u64| hour >= since_hour && until_hour.is_none_or(|until| hour < until);
        let _tree = lock(&self.shared.tree_lock);
        let mut rows: BTreeMap<(String, u64), UsageRecord> = BTreeMap::new();
        let stored = match app {
            Some(app) => self.shared.tree.scan_prefix(format!("{app}/")),
            None => self.shared.tree.iter(),
        };
        for entry in stored {
            let (key, value) = entry?;
            let (row_app, hour) = parse_row_key(&key)?;
            if wanted_hour(hour) && app.is_none_or(|app| app == row_app) {
                let usage =
                    serde_json::from_slice(&value).map_err(|source| StoreError::Corrupt {
                        key: row_key(&row_app, hour),
                        source,
                    })?;
                rows.insert((row_app, hour), usage);
            }
        }
        let pending = self.lock_pending();
        for (pending_app, hours) in &pending.by_app {
            if app.is_some_and(|app| app != pending_app) {
                continue;
            }
            for (hour, usage) in hours.iter().filter(|(hour, _)| wanted_hour(**hour)) {
                rows.entry((pending_app.clone(), *hour))
                    .or_default()
                    .merge(usage);
            }
        }
        Ok(rows
            .into_iter()
            .map(|((subject, hour), usage)| {
                let (tenant, app) = crate::tenancy::split_scoped_name(&subject);
                UsageRow {
                    tenant: tenant.to_string(),
                    app: app.to_string(),
                    hour,
                    usage,
                }
            })
            .collect())
    }

    /// Deletes the stored rows of every app from hours before `before_hour`; returns how
    /// many. Not durable by itself.
    pub fn prune(&self, before_hour: u64) -> Result<usize, StoreError> {
        let _tree = lock(&self.shared.tree_lock);
        let mut batch = sled::Batch::default();
        let mut pruned = 0;
        for key in self.shared.tree.iter().keys() {
            let key = key?;
            if parse_row_key(&key)?.1 < before_hour {
                batch.remove(key);
                pruned += 1;
            }
        }
        self.shared.tree.apply_batch(batch)?;
        Ok(pruned)
    }

    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        lock(&self.shared.pending)
    }
}

/// Persists `meter` every `every` (at least a millisecond) and makes it durable, until
/// `shutdown`; then persists once more, makes that durable and ends. Failures are logged and
/// the usage stays pending for the next round. Persisting runs on the task itself: it is a
/// few sled reads and one batch per interval, microseconds for a typical node.
pub fn spawn_persist_loop(
    meter: Meter,
    store: Store,
    every: Duration,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let every = every.max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = ticks.tick() => false,
                () = shutdown.cancelled() => true,
            };
            let persisted = match meter.persist() {
                Ok(()) => store.make_durable().await,
                Err(error) => Err(error),
            };
            if let Err(error) = persisted {
                tracing::warn!(%error, stopping, "usage could not be persisted");
            }
            if stopping {
                break;
            }
        }
    })
}

fn row_key(app: &str, hour: u64) -> String {
    format!("{app}/{hour:010}")
}

fn parse_row_key(key: &[u8]) -> Result<(String, u64), StoreError> {
    let text = String::from_utf8_lossy(key);
    text.rsplit_once('/')
        .and_then(|(app, hour)| Some((app.to_string(), hour.parse().ok()?)))
        .ok_or_else(|| StoreError::Corrupt {
            key: text.to_string(),
            source: serde::de::Error::custom("a usage key is <app>/<hour>"),
        })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 490_000;

    fn one_request(usage: &mut UsageRecord) {
        usage.requests += 1;
        usage.wall_us += 1500;
        *usage.inference_us.entry("resnet".into()).or_default() += 700;
    }

    fn requests(rows: &[UsageRow]) -> Vec<(&str, u64, u64)> {
        rows.iter()
            .map(|row| (row.app.as_str(), row.hour, row.usage.requests))
            .collect()
    }

    #[test]
    fn merging_adds_every_field() {
        let mut total = UsageRecord {
            requests: 1,
            errors_server: 2,
            bytes_out: u64::MAX,
            inference_us: BTreeMap::from([("a".into(), 5)]),
            ..UsageRecord::default()
        };
        total.merge(&UsageRecord {
            requests: 2,
            errors_client: 1,
            shed: 1,
            timeouts: 1,
            cpu_us: 9,
            prompt_tokens: 10,
            completion_tokens: 20,
            bytes_in: 3,
            bytes_out: 1,
            jobs: 4,
            inference_us: BTreeMap::from([("a".into(), 1), ("b".into(), 2)]),
            ..UsageRecord::default()
        });
        assert_eq!(
            total,
            UsageRecord {
                requests: 3,
                errors_client: 1,
                errors_server: 2,
                shed: 1,
                timeouts: 1,
                wall_us: 0,
                cpu_us: 9,
                inference_us: BTreeMap::from([("a".into(), 6), ("b".into(), 2)]),
                prompt_tokens: 10,
                completion_tokens: 20,
                bytes_in: 3,
                bytes_out: u64::MAX,
                jobs: 4,
            }
        );
    }

    #[test]
    fn records_with_missing_or_unknown_fields_read() {
        let usage: UsageRecord =
            serde_json::from_str(r#"{"requests": 3, "a_future_field": 1}"#).unwrap();
        assert_eq!(usage.requests, 3);
        assert_eq!(usage.jobs, 0);
        assert!(usage.inference_us.is_empty());
    }

    #[test]
    fn recorded_usage_is_queryable_before_it_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        meter.record("echo", one_request);
        meter.record("echo", one_request);
        let now = unix_hour(unix_now());
        let rows = meter.query(None, now.saturating_sub(1), None).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].hour == now || rows[0].hour + 1 == now);
        assert_eq!(rows[0].usage.requests, 2);
        assert_eq!(rows[0].usage.wall_us, 3000);
        assert_eq!(rows[0].usage.inference_us["resnet"], 1400);
        assert!(meter.shared.tree.is_empty());
    }

    #[tokio::test]
    async fn persisted_usage_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::testing::open_store(dir.path());
            let meter = Meter::open(&store).unwrap();
            meter.record_at("echo", HOUR, one_request);
            meter.persist().unwrap();
            store.make_durable().await.unwrap();
        }
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        assert_eq!(
            requests(&meter.query(None, 0, None).unwrap()),
            [("echo", HOUR, 1)]
        );
    }

    #[test]
    fn persists_add_to_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        meter.record_at("echo", HOUR, one_request);
        meter.persist().unwrap();
        meter.record_at("echo", HOUR, |usage| {
            one_request(usage);
            usage.prompt_tokens += 12;
        });
        meter.persist().unwrap();
        meter.persist().unwrap();
        meter.record_at("echo", HOUR, one_request);

        let rows = meter.query(Some("echo"), 0, None).unwrap();
        assert_eq!(requests(&rows), [("echo", HOUR, 3)]);
        assert_eq!(rows[0].usage.inference_us["resnet"], 2100);
        assert_eq!(rows[0].usage.prompt_tokens, 12);
        let stored: UsageRecord = get_json(&meter.shared.tree, &row_key("echo", HOUR))
            .unwrap()
            .unwrap();
        assert_eq!(stored.requests, 2);
    }

    #[test]
    fn usage_falls_into_its_hour() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        meter.record_at("echo", HOUR, one_request);
        meter.persist().unwrap();
        meter.record_at("echo", HOUR + 1, one_request);
        meter.record_at("echo", HOUR + 1, one_request);

        let rows = meter.query(Some("echo"), 0, None).unwrap();
        assert_eq!(requests(&rows), [("echo", HOUR, 1), ("echo", HOUR + 1, 2)]);
        assert_eq!(totals(&rows)["echo"].requests, 3);
        assert_eq!(unix_hour(HOUR * 3600 + 3599), HOUR);
        assert_eq!(unix_hour((HOUR + 1) * 3600), HOUR + 1);
    }

    #[test]
    fn queries_filter_by_app_and_hours() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        for hour in HOUR..HOUR + 4 {
            meter.record_at("echo", hour, one_request);
            meter.record_at("echo-two", hour, one_request);
        }
        meter.persist().unwrap();
        meter.record_at("echo", HOUR + 4, one_request);
        meter.record_at("zeta", HOUR + 4, one_request);

        assert_eq!(
            requests(&meter.query(Some("echo"), HOUR + 2, None).unwrap()),
            [
                ("echo", HOUR + 2, 1),
                ("echo", HOUR + 3, 1),
                ("echo", HOUR + 4, 1)
            ]
        );
        assert_eq!(
            requests(&meter.query(Some("echo"), HOUR + 1, Some(HOUR + 3)).unwrap()),
            [("echo", HOUR + 1, 1), ("echo", HOUR + 2, 1)]
        );
        assert_eq!(
            requests(&meter.query(None, HOUR + 3, None).unwrap()),
            [
                ("echo", HOUR + 3, 1),
                ("echo", HOUR + 4, 1),
                ("echo-two", HOUR + 3, 1),
                ("zeta", HOUR + 4, 1)
            ]
        );
        assert!(meter.query(Some("ech"), 0, None).unwrap().is_empty());
        let totals = totals(&meter.query(None, 0, None).unwrap());
        assert_eq!(totals.len(), 3);
        assert_eq!(totals["echo"].requests, 5);
        assert_eq!(totals["echo-two"].requests, 4);
    }

    #[test]
    fn pruning_deletes_rows_before_an_hour() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        for hour in HOUR..HOUR + 5 {
            meter.record_at("echo", hour, one_request);
            meter.record_at("other", hour, one_request);
        }
        meter.persist().unwrap();
        assert_eq!(meter.prune(HOUR + 3).unwrap(), 6);
        assert_eq!(
            requests(&meter.query(None, 0, None).unwrap()),
            [
                ("echo", HOUR + 3, 1),
                ("echo", HOUR + 4, 1),
                ("other", HOUR + 3, 1),
                ("other", HOUR + 4, 1)
            ]
        );
    }

    #[test]
    fn too_many_pending_records_are_persisted_early() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        for hour in 0..MAX_PENDING_RECORDS as u64 {
            meter.record_at("echo", hour, one_request);
        }
        assert!(meter.shared.tree.is_empty());
        meter.record_at("echo", 0, one_request);
        assert!(meter.shared.tree.is_empty());
        meter.record_at("other", 0, one_request);
        assert_eq!(meter.shared.tree.len(), MAX_PENDING_RECORDS);
        assert_eq!(meter.lock_pending().records, 1);
        let rows = meter.query(None, 0, None).unwrap();
        assert_eq!(rows.len(), MAX_PENDING_RECORDS + 1);
        assert_eq!(
            totals(&rows)["echo"].requests,
            MAX_PENDING_RECORDS as u64 + 1
        );
    }

    #[test]
    fn a_corrupt_row_is_an_error_and_its_usage_stays_pending() {
        let dir = tempfile::tempdir().unwrap();
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        let key = row_key("echo", HOUR);
        meter.shared.tree.insert(&key, &b"not json"[..]).unwrap();
        meter.record_at("echo", HOUR, one_request);

        assert!(matches!(meter.persist(), Err(StoreError::Corrupt { key: k, .. }) if k == key));
        assert!(matches!(
            meter.query(None, 0, None),
            Err(StoreError::Corrupt { .. })
        ));
        meter.shared.tree.remove(&key).unwrap();
        assert_eq!(
            requests(&meter.query(None, 0, None).unwrap()),
            [("echo", HOUR, 1)]
        );
        meter.persist().unwrap();
        assert_eq!(meter.lock_pending().records, 0);
        assert_eq!(
            requests(&meter.query(None, 0, None).unwrap()),
            [("echo", HOUR, 1)]
        );
    }

    #[tokio::test]
    async fn the_persist_loop_persists_on_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = crate::testing::open_store(dir.path());
            let meter = Meter::open(&store).unwrap();
            let shutdown = CancellationToken::new();
            let persisting = spawn_persist_loop(
                meter.clone(),
                store.clone(),
                Duration::from_secs(3600),
                shutdown.clone(),
            );
            meter.record_at("echo", HOUR, one_request);
            shutdown.cancel();
            persisting.await.unwrap();
            assert_eq!(meter.lock_pending().records, 0);
        }
        let meter = Meter::open(&crate::testing::open_store(dir.path())).unwrap();
        assert_eq!(
            requests(&meter.query(None, 0, None).unwrap()),
            [("echo", HOUR, 1)]
        );
    }

    #[tokio::test]
    async fn the_persist_loop_persists_every_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::testing::open_store(dir.path());
        let meter = Meter::open(&store).unwrap();
        let shutdown = CancellationToken::new();
        let every = Duration::from_millis(50);
        let persisting = spawn_persist_loop(meter.clone(), store, every, shutdown.clone());
        meter.record_at("echo", HOUR, one_request);
        let waiting = tokio::time::Instant::now();
        while meter.shared.tree.is_empty() {
            assert!(
                waiting.elapsed() < Duration::from_secs(10),
                "never persisted"
            );
            tokio::time::sleep(every / 5).await;
        }
        assert_eq!(meter.lock_pending().records, 0);
        shutdown.cancel();
        persisting.await.unwrap();
    }
}

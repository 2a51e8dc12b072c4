//! A node: opening its data dir and wiring the capabilities together. `tensorlet serve`
//! (`cli::serve`) opens one and serves it.

use crate::config::Config;
use crate::jobs::JobStore;
use crate::nn::{backend::Backends, ModelRegistry};
use crate::runtime::Runtime;
use crate::store::blobs::Blobs;
use crate::store::Store;
use crate::telemetry::Telemetry;
use anyhow::Context;
use std::sync::Arc;
use std::time::Instant;

/// Everything a request handler may need; shared by all connections.
pub struct Node {
    pub config: Config,
    pub store: Store,
    pub models: Arc<ModelRegistry>,
    pub runtime: Arc<Runtime>,
    pub telemetry: Arc<Telemetry>,
    /// Async invocations, stored until they are run and their results read.
    pub jobs: JobStore,
    /// Clients following app logs now (bounded: each holds a stream open).
    pub log_followers: Arc<tokio::sync::Semaphore>,
    /// Tenants and API keys: who may do what.
    pub tenancy: crate::tenancy::Tenancy,
    /// This node's place in its cluster (membership, what peers have), once `serve` has
    /// started it (`[cluster]`).
    pub fleet: std::sync::OnceLock<Arc<crate::cluster::Fleet>>,
    /// SHA-256 fingerprint of the served certificate; `None` with plain HTTP.
    pub tls_fingerprint: Option<String>,
    pub started: Instant,
}

/// Clients that may follow app logs at once.
pub const MAX_LOG_FOLLOWERS: usize = 64;

/// The file in the data dir where a running node writes its URL, for the CLI to find.
pub const ENDPOINT_FILE: &str = "endpoint";

/// The folder in the data dir for uploads in progress (emptied at start).
pub const TMP_DIR: &str = "tmp";

/// Opens the node's state in `config.data_dir`. Blocking (loads models, prepares apps).
pub fn open(config: Config, tls_fingerprint: Option<String>) -> anyhow::Result<Node> {
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    crate::store::files::create_private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let admin_token = crate::tenancy::token::load_or_create_admin_token(&config.data_dir)
        .with_context(|| {
            format!(
                "cannot read or create the admin token in {}",
                config.data_dir.display()
            )
        })?;
    // Uploads in progress when the node stopped are of no use now.
    let tmp = config.data_dir.join(TMP_DIR);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("cannot empty {}", tmp.display()))?;
    }
    let store = Store::open(&config.data_dir.join("db"))?;
    let tenancy = crate::tenancy::Tenancy::open(&store, &admin_token)
        .context("cannot open the tenants and API keys")?;
    store
        .flush_blocking()
        .context("cannot store the admin token's key")?;
    let blobs = Blobs::open(&config.data_dir.join("blobs"))?;
    blobs
        .adopt_legacy_folders(&config.data_dir)
        .context("cannot move the files of an older node into blobs/")?;
    let models = Arc::new(ModelRegistry::open(
        store.clone(),
        blobs.clone(),
        Backends::builtin(&config.nn).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?,
    )?);
    let telemetry = Arc::new(
        Telemetry::open(&store, &config.telemetry).context("cannot open the logs and usage")?,
    );
    let labels = crate::cluster::node_labels(&config.cluster, models.backends());
    let runtime = Runtime::open(
        &config,
        store.clone(),
        blobs.clone(),
        models.clone(),
        telemetry.clone(),
        labels,
    )?;
    let jobs = JobStore::open(&store, config.jobs.clone()).context("cannot open the job queue")?;
    telemetry
        .metrics
        .register_collector(Box::new(crate::jobs::metrics::JobsCollector(jobs.clone())));
    runtime.set_queue_sink(Arc::new(crate::jobs::run::JobQueueSink::new(
        jobs.clone(),
        &config.jobs,
    )));
    // Every record now holds its blob: what none holds was left by a crash.
    let orphans = blobs.sweep().context("cannot clean blobs/")?;
    if orphans > 0 {
        tracing::info!(files = orphans, "deleted blobs that no record holds");
    }
    Ok(Node {
        config,
        store,
        models,
        runtime,
        telemetry,
        jobs,
        log_followers: Arc::new(tokio::sync::Semaphore::new(MAX_LOG_FOLLOWERS)),
        tenancy,
        fleet: std::sync::OnceLock::new(),
        tls_fingerprint,
        started: Instant::now(),
    })
}

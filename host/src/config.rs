//! Node configuration: one typed struct per section, read from TOML, with defaults that work
//! for a single node on a laptop. CLI flags and `TENSORLET_*` variables override the file.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole node configuration (`tensorlet serve --config FILE`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the public and admin API listen on.
    pub listen: SocketAddr,
    /// Where the node keeps its database, components, models, certificate and admin token.
    pub data_dir: PathBuf,
    /// Serve plain HTTP instead of HTTPS. Only for trusted networks and benchmarks.
    pub plain_http: bool,
    /// TLS certificate and key; without them a self-signed certificate is generated.
    pub tls: TlsConfig,
    /// Connection limits and timeouts of the HTTP edge.
    pub server: ServerConfig,
    /// Limits that apply to apps unless a deployment sets its own.
    pub limits: LimitsConfig,
    /// Model and inference settings.
    pub nn: NnConfig,
    /// What the node keeps of its apps' logs and usage.
    pub telemetry: crate::telemetry::TelemetryConfig,
    /// Async invocation: workers, retries, what the queue keeps.
    pub jobs: crate::jobs::JobsConfig,
    /// The node's identity in a cluster and its node port.
    pub cluster: crate::cluster::ClusterConfig,
}

/// `[tls]`: the certificate the node presents.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain. Needs `key` too.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
}

/// `[server]`: what one client connection may hold and for how long. Every wait a client can
/// cause has a timeout here, and the connections themselves a cap.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Connections open at once. Beyond it a new connection is closed as soon as it is
    /// accepted. Unset: 4096, or less where the open-file limit cannot hold that many.
    pub max_connections: Option<u32>,
    /// Time a client has to complete the TLS handshake, in seconds.
    pub tls_handshake_timeout_secs: u64,
    /// Time a client has to send a request's headers once it starts one (and, between
    /// requests, an HTTP/1 keep-alive connection may wait for the next), in seconds.
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and
    /// HTTP/2 alike), in seconds.
    pub idle_timeout_secs: u64,
    /// A response the client does not read for this long (the socket stays full) ends the
    /// connection, in seconds.
    pub write_timeout_secs: u64,
    /// Time a client has to send a request body to an app once its headers are in, in
    /// seconds (408 after it).
    pub body_read_timeout_secs: u64,
    /// Largest request head (request line and headers; HTTP/2: header list), in bytes.
    pub max_header_bytes: u32,
    /// Requests one HTTP/2 connection may have in flight at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 flow-control windows: bytes a client may send per stream and per connection
    /// before the node has read them.
    pub http2_stream_window_bytes: u32,
    pub http2_connection_window_bytes: u32,
    /// HTTP/2 keep-alive: the node pings an idle-looking peer this often and drops it when a
    /// ping goes unanswered as long, in seconds.
    pub http2_keep_alive_secs: u64,
}

/// `[limits]`: per-app defaults and node-wide ceilings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Default time an app has to answer a request, in seconds.
    pub timeout_secs: u64,
    /// Default linear-memory limit of one app instance, in MiB.
    pub memory_mib: u64,
    /// The largest memory limit a deployment may ask for, in MiB (sizes the instance pool).
    pub max_memory_mib: u64,
    /// Default largest request body an app accepts, in bytes.
    pub max_body_bytes: u64,
    /// Instances that may run at once on this node; further requests wait in a queue.
    pub max_concurrent_instances: u32,
    /// Requests that may wait for an instance at once; beyond it 503 with `Retry-After`.
    pub max_queued_requests: u32,
    /// How long a request may wait for an instance, in seconds (503 with `Retry-After` after).
    pub queue_timeout_secs: u64,
    /// Request bodies held in memory at once, node-wide, in bytes: a body that does not fit
    /// in what is left is answered 503 with `Retry-After` instead of being read.
    pub max_buffered_body_bytes: u64,
    /// Key-value data one app may keep (keys and values), in bytes.
    pub kv_max_bytes_per_app: u64,
    /// Keys one app may keep, over all its buckets.
    pub kv_max_keys_per_app: u64,
    /// Buckets one app may have.
    pub kv_max_buckets_per_app: u32,
    /// Default seconds without requests after which a revision with `min_instances = 0`
    /// scales to zero (lets go of its prepared component).
    pub app_idle_timeout_secs: u64,
    /// Revisions kept per app; older ones that get no traffic are deleted at the next deploy.
    pub max_revisions_per_app: u32,
    /// Bytes of cached responses the node keeps in memory, over all apps.
    pub response_cache_bytes: u64,
    /// Clients whose rate-limit state one app tracks at once (beyond, new clients are refused
    /// until old ones are forgotten).
    pub max_rate_limited_clients: u32,
    /// Nested calls between apps (`http://<app>.internal/`) one request may make in depth.
    pub max_call_depth: u32,
    /// Instances of apps that reuse them (`scaling.requests_per_instance` above 1) kept
    /// between requests, node-wide; each holds its memory while it waits. 0 turns reuse off.
    pub max_idle_instances: u32,
    /// Memory an instance dirtied that its pool slot keeps after it ends, MiB: reset in place
    /// to the component's image (only the written pages, found with Linux's `PAGEMAP_SCAN`)
    /// instead of handed back to the kernel, so the next instance in that slot takes no page
    /// faults. Costs up to this much resident memory per slot in use; 0, or a kernel without
    /// `PAGEMAP_SCAN` (before 6.7), hands every page back.
    pub memory_keep_resident_mib: u64,
}

/// `[nn]`: models.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NnConfig {
    /// Largest model a guest may pass as bytes to `wasi:nn/graph.load`, in bytes.
    /// Larger models are registered with `tensorlet model add` and loaded by name.
    pub max_guest_model_bytes: u64,
    /// Largest model file `tensorlet model add` accepts, in bytes.
    pub max_model_bytes: u64,
    /// Threads one inference (an LLM generation) uses; 0 means all cores but one.
    pub threads: u32,
    /// Largest context window (prompt + generated tokens) an LLM generation gets.
    pub max_context_tokens: u32,
    /// How many steps below the node's CPU priority inference runs (Unix nice, 0 to 19; 0
    /// runs it at the node's own), so that requests to other apps and key-value writes are
    /// served at once while every core is busy with models.
    pub inference_nice: u32,
    /// Whether inference threads run under `SCHED_IDLE` (Linux): any other thread of the
    /// node that becomes runnable (a request, a key-value flush) preempts them at once, where
    /// a nice value still lets them finish a time slice of a few milliseconds first. The price:
    /// while other work takes every core, inference gets almost none (false: it keeps the share
    /// `inference_nice` gives it).
    pub inference_sched_idle: bool,
    /// LLM generations of one model that are decoded together in one llama.cpp batch, per
    /// lane (a model has a lane per compute slot). Each lane that has run keeps a KV cache of
    /// this many × `max_context_tokens`; generations beyond lanes × this wait. 1 to 64.
    pub llm_batch_sequences: u32,
    /// What a model asked to run on the GPU gets when no backend here can: `fail` (the
    /// default) refuses it; `cpu` runs it on the CPU and records that it fell back.
    pub gpu_fallback: GpuFallback,
    /// The backend for an encoding when `model add` names none, e.g. `onnx = "onnxruntime"`.
    /// Otherwise the first available backend of the encoding is used.
    pub default_backends: BTreeMap<String, String>,
    /// The ONNX Runtime library (`libonnxruntime.so.*`). Unset: `$ORT_DYLIB_PATH`, then the
    /// pip-installed `onnxruntime` package.
    pub onnxruntime_library: Option<PathBuf>,
    /// The OpenVINO C library (`libopenvino_c.so*`). Unset: `$OPENVINO_LIBRARY`, then the
    /// pip-installed `openvino` package.
    pub openvino_library: Option<PathBuf>,
}

/// See [`NnConfig::gpu_fallback`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuFallback {
    #[default]
    Fail,
    Cpu,
}

/// The most LLM generations a lane may decode together (`[nn] llm_batch_sequences`).
pub const MAX_LLM_BATCH_SEQUENCES: u32 = 64;

impl NnConfig {
    /// `threads`, with 0 resolved to all cores but one (at least one). The core left over
    /// serves HTTP and runs guests: llama.cpp's threads wait for each other by spinning, so a
    /// generation that spans every core slows to a crawl as soon as anything else runs
    /// (measured: 74 → 5 tok/s with another app busy on one of 2 cores).
    pub fn inference_threads(&self) -> u32 {
        match self.threads {
            0 => cores().saturating_sub(1).max(1),
            n => n,
        }
    }

    /// How many inferences may compute at once: as many as the cores hold at `threads` each
    /// (at least one). Generations interleave step by step beyond that instead of
    /// oversubscribing the CPU.
    pub fn compute_slots(&self) -> usize {
        (cores() / self.inference_threads()).max(1) as usize
    }
}

fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| n.get() as u32)
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8443".parse().expect("static address"),
            data_dir: default_data_dir(),
            plain_http: false,
            tls: TlsConfig::default(),
            server: ServerConfig::default(),
            limits: LimitsConfig::default(),
            nn: NnConfig::default(),
            telemetry: crate::telemetry::TelemetryConfig::default(),
            jobs: crate::jobs::JobsConfig::default(),
            cluster: crate::cluster::ClusterConfig::default(),
        }
    }
}

impl ServerConfig {
    /// The connection cap: `max_connections`, or 4096 held to what the open-file limit
    /// `open_files` leaves once [`RESERVED_FILES`] are set aside.
    pub fn connection_cap(&self, open_files: u64) -> Result<u32, String> {
        let room = open_files.saturating_sub(RESERVED_FILES);
        match self.max_connections {
            Some(0) => Err("server.max_connections must be at least 1".into()),
            Some(cap) if u64::from(cap) > room => Err(format!(
                "server.max_connections = {cap} cannot be held: the open-file limit is {open_files} and the node keeps {RESERVED_FILES} for itself; raise `ulimit -n` or lower max_connections"
            )),
            Some(cap) => Ok(cap),
            None if room == 0 => Err(format!(
                "the open-file limit ({open_files}) leaves no room for connections; raise `ulimit -n`"
            )),
            None => Ok(room.min(4096) as u32),
        }
    }
}

/// Files the node keeps open for itself (database, models, logs) beside its connections.
pub const RESERVED_FILES: u64 = 256;

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_connections: None,
            tls_handshake_timeout_secs: 10,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            write_timeout_secs: 30,
            body_read_timeout_secs: 60,
            max_header_bytes: 64 << 10,
            http2_max_concurrent_streams: 128,
            http2_stream_window_bytes: 1 << 20,
            http2_connection_window_bytes: 4 << 20,
            http2_keep_alive_secs: 30,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            timeout_secs: 30,
            memory_mib: 128,
            max_memory_mib: 1024,
            max_body_bytes: 16 << 20,
            max_concurrent_instances: 128,
            max_queued_requests: 1024,
            queue_timeout_secs: 10,
            max_buffered_body_bytes: 256 << 20,
            kv_max_bytes_per_app: 256 << 20,
            kv_max_keys_per_app: 1_000_000,
            kv_max_buckets_per_app: 64,
            app_idle_timeout_secs: 300,
            max_revisions_per_app: 20,
            response_cache_bytes: 64 << 20,
            max_rate_limited_clients: 10_000,
            max_call_depth: 4,
            max_idle_instances: 32,
            memory_keep_resident_mib: 16,
        }
    }
}

impl Default for NnConfig {
    fn default() -> Self {
        Self {
            max_guest_model_bytes: 64 << 20,
            max_model_bytes: 16 << 30,
            threads: 0,
            max_context_tokens: 2048,
            inference_nice: 10,
            inference_sched_idle: true,
            llm_batch_sequences: 4,
            gpu_fallback: GpuFallback::Fail,
            default_backends: BTreeMap::new(),
            onnxruntime_library: None,
            openvino_library: None,
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors so that typos do not pass silently. Its
    /// values are checked by [`Config::validate`] once flags and variables have overridden
    /// them (a node id may come from the environment).
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))
    }

    /// Checks the values that parse but cannot work, naming the key and the range it takes.
    pub fn validate(&self) -> Result<(), String> {
        self.telemetry.validate()?;
        self.jobs.validate()?;
        self.cluster.validate()?;
        let in_range = |key: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
            if range.contains(&value) {
                Ok(())
            } else {
                Err(format!(
                    "{key} must be between {} and {}, not {value}",
                    range.start(),
                    range.end()
                ))
            }
        };
        let (limits, server, nn) = (&self.limits, &self.server, &self.nn);
        in_range("limits.timeout_secs", limits.timeout_secs, 1..=3600)?;
        in_range("limits.max_memory_mib", limits.max_memory_mib, 1..=65536)?;
        in_range(
            "limits.memory_mib",
            limits.memory_mib,
            1..=limits.max_memory_mib,
        )?;
        in_range(
            "limits.max_concurrent_instances",
            limits.max_concurrent_instances.into(),
            1..=100_000,
        )?;
        in_range(
            "limits.max_idle_instances",
            limits.max_idle_instances.into(),
            0..=10_000,
        )?;
        in_range(
            "limits.memory_keep_resident_mib",
            limits.memory_keep_resident_mib,
            0..=limits.max_memory_mib,
        )?;
        in_range(
            "limits.app_idle_timeout_secs",
            limits.app_idle_timeout_secs,
            1..=86_400 * 30,
        )?;
        in_range(
            "limits.max_revisions_per_app",
            limits.max_revisions_per_app.into(),
            1..=10_000,
        )?;
        in_range(
            "limits.max_rate_limited_clients",
            limits.max_rate_limited_clients.into(),
            1..=10_000_000,
        )?;
        in_range(
            "limits.max_call_depth",
            limits.max_call_depth.into(),
            0..=64,
        )?;
        in_range(
            "limits.queue_timeout_secs",
            limits.queue_timeout_secs,
            1..=3600,
        )?;
        in_range(
            "limits.max_buffered_body_bytes",
            limits.max_buffered_body_bytes,
            1..=1 << 40,
        )?;
        in_range(
            "limits.max_body_bytes",
            limits.max_body_bytes,
            0..=limits.max_buffered_body_bytes.min(1 << 30),
        )?;
        in_range(
            "limits.kv_max_buckets_per_app",
            limits.kv_max_buckets_per_app.into(),
            1..=100_000,
        )?;
        for (key, value) in [
            (
                "server.tls_handshake_timeout_secs",
                server.tls_handshake_timeout_secs,
            ),
            (
                "server.header_read_timeout_secs",
                server.header_read_timeout_secs,
            ),
            ("server.idle_timeout_secs", server.idle_timeout_secs),
            ("server.write_timeout_secs", server.write_timeout_secs),
            (
                "server.body_read_timeout_secs",
                server.body_read_timeout_secs,
            ),
            ("server.http2_keep_alive_secs", server.http2_keep_alive_secs),
        ] {
            in_range(key, value, 1..=86_400)?;
        }
        in_range(
            "server.max_header_bytes",
            server.max_header_bytes.into(),
            8192..=1 << 20,
        )?;
        in_range(
            "server.http2_max_concurrent_streams",
            server.http2_max_concurrent_streams.into(),
            1..=10_000,
        )?;
        // HTTP/2 allows windows of 2^31 - 1 bytes at most.
        in_range(
            "server.http2_stream_window_bytes",
            server.http2_stream_window_bytes.into(),
            65_535..=(1 << 31) - 1,
        )?;
        in_range(
            "server.http2_connection_window_bytes",
            server.http2_connection_window_bytes.into(),
            65_535..=(1 << 31) - 1,
        )?;
        in_range(
            "nn.llm_batch_sequences",
            nn.llm_batch_sequences.into(),
            1..=MAX_LLM_BATCH_SEQUENCES.into(),
        )?;
        // llama.cpp gives each sequence a multiple of 256 tokens, and a lane's context holds
        // every sequence's window: their product must stay a 32-bit count.
        in_range(
            "nn.max_context_tokens",
            nn.max_context_tokens.into(),
            256..=1 << 20,
        )?;
        if nn.max_context_tokens % 256 != 0 {
            return Err(format!(
                "nn.max_context_tokens must be a multiple of 256, not {}",
                nn.max_context_tokens
            ));
        }
        in_range("nn.threads", nn.threads.into(), 0..=1024)?;
        in_range("nn.inference_nice", nn.inference_nice.into(), 0..=19)?;
        Ok(())
    }
}

/// `$TENSORLET_DATA_DIR`, else `~/.tensorlet`, else `./tensorlet-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TENSORLET_DATA_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".tensorlet"),
        None => PathBuf::from("tensorlet-data"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_file_keeps_defaults_for_the_rest() {
        let config: Config =
            toml::from_str("listen = \"0.0.0.0:9000\"\n[limits]\ntimeout_secs = 5\n")
                .expect("valid config");
        assert_eq!(config.listen.port(), 9000);
        assert_eq!(config.limits.timeout_secs, 5);
        assert_eq!(config.limits.memory_mib, 128);
    }

    #[test]
    fn inferences_never_oversubscribe_the_cores() {
        let cores = std::thread::available_parallelism().unwrap().get();
        let one_thread = NnConfig {
            threads: 1,
            ..NnConfig::default()
        };
        assert_eq!(one_thread.compute_slots(), cores);
        let default = NnConfig::default();
        assert_eq!(default.inference_threads() as usize, (cores - 1).max(1));
        assert_eq!(
            default.compute_slots(),
            cores / default.inference_threads() as usize
        );
        let more_than_cores = NnConfig {
            threads: 1000,
            ..NnConfig::default()
        };
        assert_eq!(more_than_cores.compute_slots(), 1);
    }

    #[test]
    fn batch_sizes_llama_cpp_cannot_take_are_rejected() {
        for batch in [0, 65] {
            let config: Config =
                toml::from_str(&format!("[nn]\nllm_batch_sequences = {batch}\n")).unwrap();
            let error = config.validate().unwrap_err();
            assert!(error.contains("llm_batch_sequences"), "{error}");
        }
        assert!(Config::default().validate().is_ok());
    }

    #[test]
    fn values_that_cannot_work_are_refused_with_their_key() {
        for (text, key) in [
            (
                "[limits]\nmax_concurrent_instances = 0\n",
                "limits.max_concurrent_instances",
            ),
            ("[limits]\ntimeout_secs = 0\n", "limits.timeout_secs"),
            ("[limits]\nmemory_mib = 4096\n", "limits.memory_mib"),
            (
                "[limits]\nmax_buffered_body_bytes = 1000\n",
                "limits.max_body_bytes",
            ),
            (
                "[server]\nidle_timeout_secs = 0\n",
                "server.idle_timeout_secs",
            ),
            (
                "[server]\nhttp2_stream_window_bytes = 4294967295\n",
                "server.http2_stream_window_bytes",
            ),
            (
                "[nn]\nmax_context_tokens = 4294967040\n",
                "nn.max_context_tokens",
            ),
            ("[nn]\nmax_context_tokens = 1000\n", "nn.max_context_tokens"),
        ] {
            let config: Config = toml::from_str(text).unwrap();
            let error = config.validate().unwrap_err();
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn the_connection_cap_fits_the_open_file_limit() {
        let auto = ServerConfig::default();
        assert_eq!(auto.connection_cap(1 << 20), Ok(4096));
        assert_eq!(auto.connection_cap(1024), Ok(1024 - RESERVED_FILES as u32));
        assert!(auto.connection_cap(RESERVED_FILES).is_err());
        let explicit = ServerConfig {
            max_connections: Some(5000),
            ..ServerConfig::default()
        };
        assert_eq!(explicit.connection_cap(1 << 20), Ok(5000));
        let error = explicit.connection_cap(1024).unwrap_err();
        assert!(error.contains("ulimit"), "{error}");
        let zero = ServerConfig {
            max_connections: Some(0),
            ..ServerConfig::default()
        };
        assert!(zero.connection_cap(1 << 20).is_err());
    }

    proptest::proptest! {
        /// Any value in any key of a config file is read and checked without panicking.
        #[test]
        fn any_config_value_is_judged_without_panicking(
            entries in proptest::collection::vec(
                (
                    proptest::sample::select(vec![
                        "limits.timeout_secs", "limits.memory_mib", "limits.max_memory_mib",
                        "limits.max_body_bytes", "limits.max_concurrent_instances",
                        "limits.max_queued_requests", "limits.queue_timeout_secs",
                        "limits.max_buffered_body_bytes", "limits.kv_max_buckets_per_app",
                        "limits.memory_keep_resident_mib",
                        "server.max_connections", "server.idle_timeout_secs",
                        "server.max_header_bytes", "server.http2_stream_window_bytes",
                        "nn.threads", "nn.max_context_tokens", "nn.llm_batch_sequences",
                    ]),
                    proptest::prelude::any::<i64>(),
                ),
                0..6,
            ),
        ) {
            let mut text = String::new();
            for (key, value) in entries {
                let (section, name) = key.split_once('.').unwrap();
                text.push_str(&format!("[{section}]\n{name} = {value}\n"));
            }
            if let Ok(config) = toml::from_str::<Config>(&text) {
                let _ = config.validate();
                let _ = config.server.connection_cap(1024);
            }
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let error = toml::from_str::<Config>("[limits]\ntimeout = 5\n").unwrap_err();
        assert!(error.to_string().contains("timeout"), "{error}");
    }
}

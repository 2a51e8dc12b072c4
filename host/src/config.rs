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
    /// Limits that apply to apps unless a deployment sets its own.
    pub limits: LimitsConfig,
    /// Model and inference settings.
    pub nn: NnConfig,
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
            limits: LimitsConfig::default(),
            nn: NnConfig::default(),
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
            llm_batch_sequences: 4,
            gpu_fallback: GpuFallback::Fail,
            default_backends: BTreeMap::new(),
            onnxruntime_library: None,
            openvino_library: None,
        }
    }
}

impl Config {
    /// Reads a TOML file; unknown keys are errors so that typos do not pass silently.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config {}: {e}", path.display()))?;
        let config: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?;
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid config {}: {e}", path.display()))?;
        Ok(config)
    }

    /// Checks the values that parse but make no sense.
    pub fn validate(&self) -> Result<(), String> {
        let batch = self.nn.llm_batch_sequences;
        if !(1..=crate::nn::backend::llama::MAX_BATCH_SEQUENCES).contains(&batch) {
            return Err(format!(
                "nn.llm_batch_sequences must be between 1 and {}, not {batch}",
                crate::nn::backend::llama::MAX_BATCH_SEQUENCES
            ));
        }
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
    fn unknown_keys_are_rejected() {
        let error = toml::from_str::<Config>("[limits]\ntimeout = 5\n").unwrap_err();
        assert!(error.to_string().contains("timeout"), "{error}");
    }
}

//! Shared helpers of the end-to-end tests: start the real `tensorlet` binary on a free
//! loopback port with a temporary data dir, and talk to it over HTTPS with a rustls client
//! that trusts the certificate the node generated.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub use tensorlet_test_artifacts as artifacts;

/// Path of the binary under test.
pub const BINARY: &str = env!("CARGO_BIN_EXE_tensorlet");

/// A running node process.
pub struct TestNode {
    child: Child,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    /// `https://127.0.0.1:PORT`
    pub url: String,
    /// The fingerprint the node printed at start.
    pub printed_fingerprint: Option<String>,
    pub client: reqwest::Client,
    pub token: String,
}

impl TestNode {
    /// Starts a node with a fresh data dir.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a node with a fresh data dir and extra `serve` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path().to_path_buf();
        let mut node = Self::start_in(&dir, extra);
        node._temp = Some(temp);
        node
    }

    /// Starts a node on an existing data dir (a restart).
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Self {
        Self::start_in_with_env(data_dir, extra, &[])
    }

    /// Starts a node on `data_dir` with extra `serve` arguments and environment variables.
    pub fn start_in_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BINARY)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("TENSORLET_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting tensorlet serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        // Read the start-up lines, then keep draining stdout so the node never blocks on it.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let mut url = None;
        let mut printed_fingerprint = None;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while url.is_none() || (printed_fingerprint.is_none() && !extra.contains(&"--plain-http")) {
            let remaining = deadline.saturating_duration_since(std::time::Instant::now());
            let line = receiver.recv_timeout(remaining).unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("the node did not start within 120 s")
            });
            if let Some(rest) = line.split("listening on ").nth(1) {
                url = Some(rest.trim().to_string());
            }
            if let Some(rest) = line.strip_prefix("TLS certificate SHA-256 fingerprint: ") {
                printed_fingerprint = Some(rest.trim().to_string());
            }
        }
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(120))
            // The node ends a keep-alive connection idle for its header timeout (10 s); a
            // client that reuses one as it closes sees a broken pipe. Like any client that
            // knows its server, drop pooled connections well before that.
            .pool_idle_timeout(Duration::from_secs(5));
        if let Ok(pem) = std::fs::read(data_dir.join("tls/cert.pem")) {
            builder = builder.add_root_certificate(
                reqwest::Certificate::from_pem(&pem).expect("PEM certificate"),
            );
        }
        let token = std::fs::read_to_string(data_dir.join("admin-token"))
            .expect("admin token written at start");
        Self {
            child,
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            url: url.expect("url"),
            printed_fingerprint,
            client: builder.build().expect("client"),
            token: token.trim().to_string(),
        }
    }

    /// Stops the node abruptly (SIGKILL), as a crash or power cut would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Files the node process has open now (sockets included).
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("the node's /proc entry")
            .count()
    }

    /// A figure of the node process from /proc/PID/status, e.g. `VmHWM` (peak resident
    /// memory), in KiB.
    pub fn proc_status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the node's /proc entry");
        status
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{field}:")))
            .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// A rustls client configuration that trusts the node's certificate, for tests that speak
    /// TLS by hand.
    pub fn tls_client_config(&self) -> std::sync::Arc<rustls::ClientConfig> {
        let pem = std::fs::read(self.data_dir.join("tls/cert.pem")).expect("node certificate");
        let mut roots = rustls::RootCertStore::empty();
        for certificate in rustls_pemfile::certs(&mut pem.as_slice()) {
            roots.add(certificate.expect("PEM certificate")).unwrap();
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        std::sync::Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }

    /// The node's `/v1/admin/status`.
    pub async fn status(&self) -> serde_json::Value {
        self.admin_json("/v1/admin/status").await
    }

    /// Stops the node with SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }

    /// Hands over the data dir (kept alive by the returned guard) so that the node can be
    /// restarted on it after this handle is gone.
    pub fn take_data_dir(&mut self) -> tempfile::TempDir {
        self._temp.take().expect("node owns its temp dir")
    }

    /// `url` + `path`.
    pub fn at(&self, path: &str) -> String {
        format!("{}{path}", self.url)
    }

    /// Runs the CLI against this node, the way an operator on the node would.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_with_env(args, &[])
    }

    /// Runs the CLI with extra environment variables.
    pub fn cli_with_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new(BINARY)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .expect("running the CLI")
    }

    /// Runs the CLI with `input` on its standard input.
    pub fn cli_with_input(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = Command::new(BINARY)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("running the CLI");
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input)
            .expect("writing the CLI's input");
        child.wait_with_output().expect("the CLI ends")
    }

    /// Writes `text` as a manifest `tensorlet.toml` in a new folder beside which the test can
    /// put files; returns the folder (deleted with the handle) and the manifest's path.
    pub fn manifest(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tensorlet.toml");
        std::fs::write(&path, text).expect("writing the manifest");
        (dir, path)
    }

    /// Runs the CLI and asserts that it succeeded; returns its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let output = self.cli(args);
        assert!(
            output.status.success(),
            "tensorlet {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Deploys a component through the admin API with the given query settings. Unless the
    /// query says otherwise, the app is public and may open the buckets the test components
    /// use (kv-counter: `default`; misbehave: `flaky`, `orders`).
    pub async fn deploy(&self, app: &str, component: &str, query: &str) -> reqwest::Response {
        let bytes = std::fs::read(component).expect("component built");
        let mut query = query.to_string();
        for (setting, default) in [("public", "true"), ("buckets", "default,flaky,orders")] {
            if !query
                .split('&')
                .any(|pair| pair.starts_with(&format!("{setting}=")))
            {
                query = format!("{query}&{setting}={default}");
            }
        }
        self.client
            .put(self.at(&format!("/v1/admin/apps/{app}?{query}")))
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await
            .expect("deploy request")
    }

    /// Deploys and asserts success.
    pub async fn deploy_ok(&self, app: &str, component: &str, query: &str) {
        let response = self.deploy(app, component, query).await;
        let status = response.status();
        assert_eq!(
            status,
            200,
            "deploying {app}: {}",
            response.text().await.unwrap_or_default()
        );
    }

    /// Registers the text-orientation model as `text-orientation` through the CLI.
    pub fn add_text_orientation_model(&self) {
        let model = artifacts::text_orientation_model();
        self.cli_ok(&[
            "model",
            "add",
            "text-orientation",
            model.to_str().expect("utf-8 path"),
        ]);
    }

    /// Registers SmolLM2 as `smollm2` and deploys the `openai` app on it with the given
    /// timeout, through the CLI.
    pub fn add_smollm2_and_openai(&self, timeout_secs: u64) {
        let model = artifacts::smollm2_model();
        self.cli_ok(&[
            "model",
            "add",
            "smollm2",
            model.to_str().unwrap(),
            "--encoding",
            "ggml",
        ]);
        self.cli_ok(&[
            "deploy",
            "--public",
            "openai",
            artifacts::OPENAI,
            "--model",
            "smollm2",
            "--timeout-secs",
            &timeout_secs.to_string(),
        ]);
    }

    /// GET `path`, returning status and body text.
    pub async fn get(&self, path: &str) -> (u16, String) {
        let response = self.client.get(self.at(path)).send().await.expect("GET");
        (
            response.status().as_u16(),
            response.text().await.expect("body"),
        )
    }

    /// POSTs an empty body to `path`.
    pub async fn post(&self, path: &str) -> reqwest::Response {
        self.client.post(self.at(path)).send().await.expect("POST")
    }

    /// POSTs `body` as JSON to `path`.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client
            .post(self.at(path))
            .json(body)
            .send()
            .await
            .expect("POST")
    }

    /// GETs an admin API path with the admin token; returns the JSON answer.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        self.client
            .get(self.at(path))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("admin GET")
            .json()
            .await
            .expect("JSON answer")
    }

    /// Runs one of the Python scripts in tests/e2e (official `openai` client) against this
    /// node's `openai` app with `model`; returns the JSON it printed.
    pub fn run_openai_script(&self, script: &str, model: &str) -> serde_json::Value {
        let output = Command::new("python3")
            .arg(
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/e2e")
                    .join(script),
            )
            .arg(self.at("/apps/openai/v1"))
            .arg(self.data_dir.join("tls/cert.pem"))
            .arg(model)
            .output()
            .expect("python3 runs");
        assert!(
            output.status.success(),
            "the OpenAI client failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("the script prints JSON")
    }

    /// Asserts the node still serves: `/healthz` answers ok.
    pub async fn assert_healthy(&self) {
        assert_eq!(self.get("/healthz").await, (200, "ok\n".to_string()));
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Tests that load the machine (LLM generations, floods, crash loops) run one at a time: each
/// holds this while it runs, so none of them measures another's load. Others run beside them.
pub async fn heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    HEAVY.lock().await
}

/// A node configuration file holding `text` (TOML); it lasts as long as the handle.
pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), text).unwrap();
    config
}

/// The `{ "error": { "code" } }` of a JSON error body.
pub fn error_code(body: &str) -> String {
    let value: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|_| panic!("not a JSON error: {body}"));
    value["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error code in {body}"))
        .to_string()
}

/// A plain-HTTP server on loopback that answers 200 with `answer` to every request and sends
/// each request it got (head and body) to the returned channel: an outside host, a callback
/// receiver, a collector.
pub async fn http_sink(
    answer: &'static [u8],
) -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let sender = sender.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(read) = socket.read(&mut buffer).await else {
                        return;
                    };
                    if read == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..read]);
                    let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&request[..end]).to_string();
                    let body = request[end + 4..].to_vec();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() < length {
                        continue;
                    }
                    let _ = sender.send((head, body));
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        answer.len()
                    );
                    let _ = socket.write_all(head.as_bytes()).await;
                    let _ = socket.write_all(answer).await;
                    return;
                }
            });
        }
    });
    (format!("http://{address}"), receiver)
}

/// Scrapes `/metrics` with the admin token and parses it with `prometheus_client`'s parser;
/// returns every sample.
pub async fn scrape(node: &TestNode) -> Vec<serde_json::Value> {
    let response = node
        .client
        .get(node.at("/metrics"))
        .bearer_auth(&node.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    let samples = python("parse_metrics.py", &[], text.as_bytes());
    serde_json::from_slice::<Vec<serde_json::Value>>(&samples).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
pub fn sample(samples: &[serde_json::Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s["name"] == name
                && labels
                    .iter()
                    .all(|(key, value)| s["labels"][key].as_str() == Some(value))
        })
        .map(|s| s["value"].as_f64().unwrap())
}

/// Runs `script` (in tests/e2e) with `args`, feeding it `input`; its stdout, or a panic with
/// its stderr.
pub fn python(script: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    let mut child = Command::new("python3")
        .arg(format!(
            "{}/../tests/e2e/{script}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    child.stdin.take().unwrap().write_all(input).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

//! `cargo bench -p tensorlet --bench platform`: the figures the README reports, each next to
//! a baseline measured in the same run on the same machine.
//!
//! 1. Instantiation of the `hello` component (store + `InstancePre::instantiate`), p50/p99.
//! 2. `hello` through a real `tensorlet serve` process over HTTPS and plain HTTP on loopback at
//!    1 and 32 connections, against a native axum handler answering the same bytes over the
//!    same TLS stack in another process-like runtime; then the same components (Rust, and
//!    Python and JavaScript when built) against `wasmtime serve`, and with the pages their
//!    instances write kept resident in the pool (`memory_keep_resident_mib`) against without,
//!    requests/s and the node's resident memory.
//! 3. `classify` through the component (instantiate, JSON, wasi-nn, response) against the same
//!    model and preprocessing run natively with tract.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorlet::config::Config;
use tensorlet::nn::backend::Cancellation;
use tensorlet::nn::Encoding;
use tensorlet_test_artifacts as artifacts;
use tract_onnx::prelude::*;

const LOAD_SECONDS: u64 = 3;

/// How the benchmark deploys an app that reuses its instances.
const REUSE_MANIFEST: &str = "[scaling]\nrequests_per_instance = 10000\n";

/// Whether a section runs: all do unless `TENSORLET_BENCH_ONLY` lists some (`services`,
/// `interpreted`, `onnx`, `embeddings`, `batching`, `llm`, `edge`, `http`, comma-separated);
/// instantiation and classify always run.
fn wanted(section: &str) -> bool {
    std::env::var("TENSORLET_BENCH_ONLY")
        .map_or(true, |only| only.split(',').any(|s| s.trim() == section))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Load {
    requests_per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// Drives `url` with `connections` clients (one connection each) for LOAD_SECONDS.
async fn load(url: &str, connections: usize, cert: Option<&[u8]>) -> Load {
    let deadline = Instant::now() + Duration::from_secs(LOAD_SECONDS);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let mut builder = reqwest::Client::builder()
                .use_rustls_tls()
                .http1_only()
                .pool_max_idle_per_host(1);
            if let Some(pem) = cert {
                builder =
                    builder.add_root_certificate(reqwest::Certificate::from_pem(pem).unwrap());
            }
            let client = builder.build().unwrap();
            let url = url.to_string();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let response = client.get(&url).send().await.unwrap();
                    assert!(response.status().is_success());
                    response.bytes().await.unwrap();
                    latencies.push(started.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap());
    }
    all.sort();
    Load {
        requests_per_sec: all.len() as f64 / LOAD_SECONDS as f64,
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
    }
}

/// Starts `tensorlet serve` on `data_dir` (with `extra` arguments); returns the process and its URL once it listens.
fn spawn_node(data_dir: &std::path::Path, extra: &[&str]) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(env!("CARGO_BIN_EXE_tensorlet"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env("TENSORLET_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("node exited").unwrap();
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, url)
}

/// A figure of a process from /proc/PID/status, in KiB.
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

/// Edge fitness: the size of this binary stripped, and a node restarted with 10 apps
/// deployed and no models: time from spawn until an app answers, and resident memory once
/// idle, next to the same node with no apps.
async fn edge_fitness() {
    println!("edge fitness (this build's features; see the README for the tract-only build):");
    let stripped = tempfile::tempdir().unwrap();
    let binary = stripped.path().join("tensorlet");
    std::fs::copy(env!("CARGO_BIN_EXE_tensorlet"), &binary).unwrap();
    let strip = Command::new("strip").arg(&binary).status();
    match strip {
        Ok(status) if status.success() => println!(
            "  binary, stripped: {:.1} MB",
            std::fs::metadata(&binary).unwrap().len() as f64 / 1e6
        ),
        _ => println!("  binary: `strip` is not installed here"),
    }
    let mut figures = Vec::new();
    for apps in [0usize, 10] {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, _) = spawn_node(dir.path(), &[]);
        for n in 0..apps {
            let deployed = Command::new(env!("CARGO_BIN_EXE_tensorlet"))
                .arg("--data-dir")
                .arg(dir.path())
                .args(["deploy", "--public", &format!("app-{n}"), artifacts::HELLO])
                .output()
                .unwrap();
            assert!(deployed.status.success());
        }
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().unwrap();
        let pem = std::fs::read(dir.path().join("tls/cert.pem")).unwrap();
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .build()
            .unwrap();
        let started = Instant::now();
        let (mut child, url) = spawn_node(dir.path(), &[]);
        let path = if apps > 0 { "/apps/app-0/" } else { "/healthz" };
        loop {
            if let Ok(response) = client.get(format!("{url}{path}")).send().await {
                if response.status().is_success() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let ready = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_mib = proc_status_kib(child.id(), "VmRSS") as f64 / 1024.0;
        let _ = child.kill();
        let _ = child.wait();
        figures.push((ready, rss_mib));
        println!(
            "  {apps:>2} apps: start to first answer {:.0} ms, idle resident memory {rss_mib:.1} MiB",
            ready.as_secs_f64() * 1e3
        );
    }
    println!(
        "  10 apps vs none: ready {:.2}x, memory {:.2}x",
        figures[1].0.as_secs_f64() / figures[0].0.as_secs_f64(),
        figures[1].1 / figures[0].1
    );
    println!();
}

/// A running `tensorlet serve` with `hello` deployed.
struct ServedNode {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
    cert: Option<Vec<u8>>,
}

impl Drop for ServedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A node with `config` (TOML) serving `component` as `<name>` (a fresh instance per request)
/// and as `<name>-reuse` (instances reused), for each of `components`.
fn serve_apps(plain_http: bool, config: &str, components: &[(&str, &str)]) -> ServedNode {
    let dir = tempfile::tempdir().unwrap();
    let config_file = dir.path().join("config.toml");
    std::fs::write(&config_file, config).unwrap();
    let mut extra = vec!["--config", config_file.to_str().unwrap()];
    if plain_http {
        extra.push("--plain-http");
    }
    let (child, url) = spawn_node(dir.path(), &extra);
    for (name, component) in components {
        for (app, settings) in [
            (name.to_string(), ""),
            (format!("{name}-reuse"), REUSE_MANIFEST),
        ] {
            let manifest = dir.path().join(format!("{app}.toml"));
            std::fs::write(
                &manifest,
                format!("[app]\nname = {app:?}\ncomponent = {component:?}\n{settings}"),
            )
            .unwrap();
            let deployed = Command::new(env!("CARGO_BIN_EXE_tensorlet"))
                .arg("--data-dir")
                .arg(dir.path())
                .args(["deploy", "--public", "-f"])
                .arg(&manifest)
                .output()
                .unwrap();
            assert!(
                deployed.status.success(),
                "{}",
                String::from_utf8_lossy(&deployed.stderr)
            );
        }
    }
    let cert = (!plain_http).then(|| std::fs::read(dir.path().join("tls/cert.pem")).unwrap());
    ServedNode {
        child,
        url,
        _dir: dir,
        cert,
    }
}

/// The simplest alternative: a native axum handler with the same answer, same TLS stack.
fn serve_native(tls: Option<Arc<rustls::ServerConfig>>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let scheme = if tls.is_some() { "https" } else { "http" };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let router = axum::Router::new().route(
                "/apps/hello/",
                axum::routing::get(|| async { "Hello, world!\n" }),
            );
            let service = hyper_util::service::TowerToHyperService::new(router);
            let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let (service, acceptor) = (service.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = match acceptor {
                        Some(acceptor) => {
                            let stream = acceptor.accept(tcp).await.unwrap();
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        None => {
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                                .await
                        }
                    };
                });
            }
        });
    });
    format!("{scheme}://{address}")
}

fn native_classifier(model: &std::path::Path) -> Arc<TypedRunnableModel> {
    tract_onnx::onnx()
        .model_for_path(model)
        .unwrap()
        .with_input_fact(0, f32::fact([1, 3, 48, 192]).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

fn preprocess(pixels: &[u8]) -> Vec<f32> {
    let mut input = vec![0f32; 3 * 48 * 192];
    for (i, rgb) in pixels.chunks_exact(3).enumerate() {
        for (channel, value) in rgb.iter().enumerate() {
            input[channel * 48 * 192 + i] = (f32::from(*value) / 255.0 - 0.5) / 0.5;
        }
    }
    input
}

fn summary(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("tensorlet platform benchmark");
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!();

    // In-process node for instantiation and classify.
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let node = tokio::task::spawn_blocking(move || tensorlet::node::open(config, None))
        .await
        .unwrap()
        .unwrap();
    let hello = std::fs::read(artifacts::HELLO).unwrap();
    node.runtime
        .deploy(
            "hello",
            Some(hello.into()),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let app = node.runtime.app("hello").unwrap();
    let revision = app.revisions[&app.record.latest].clone();
    for _ in 0..200 {
        node.runtime.instantiate_only(&revision).await.unwrap();
    }
    let mut samples = Vec::new();
    for _ in 0..5000 {
        let started = Instant::now();
        node.runtime.instantiate_only(&revision).await.unwrap();
        samples.push(started.elapsed());
    }
    let (instantiate_p50, p99) = summary(samples);
    println!(
        "instantiate hello (store + InstancePre::instantiate): p50 {:.1} µs, p99 {:.1} µs",
        micros(instantiate_p50),
        micros(p99)
    );
    let hello_request = || {
        let mut request = http::Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = "https://localhost/".parse().unwrap();
        request
    };
    let mut samples = Vec::new();
    for _ in 0..5000 {
        let started = Instant::now();
        let response = node
            .runtime
            .invoke(app.clone(), hello_request())
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        samples.push(started.elapsed());
    }
    let (p50, p99) = summary(samples);
    println!(
        "invoke hello in-process (instantiate + handler + response body): p50 {:.1} µs, p99 {:.1} µs",
        micros(p50),
        micros(p99)
    );
    let reusing = deploy_hello(&node, "hello-reuse", REUSE_MANIFEST).await;
    let mut samples = Vec::new();
    for _ in 0..5000 {
        samples.push(timed_invoke(&node, &reusing, get("/")).await);
    }
    let (reuse_p50, reuse_p99) = summary(samples);
    println!(
        "invoke hello in-process, instance reused (requests_per_instance = 10000): p50 {:.1} µs, p99 {:.1} µs ({:.2}x the fresh instance's requests/s at p50)",
        micros(reuse_p50),
        micros(reuse_p99),
        p50.as_secs_f64() / reuse_p50.as_secs_f64()
    );
    println!();

    // classify: component vs native.
    let model = artifacts::text_orientation_model();
    register_model(
        &node,
        "text-orientation",
        Encoding::Onnx,
        Some("tract"),
        &model,
        dir.path(),
    )
    .await;
    let classify =
        deploy_with_model(&node, "classify", artifacts::CLASSIFY, "text-orientation").await;
    let pixels: Vec<u8> = (0..48 * 192 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let body = Bytes::from(serde_json::to_vec(&serde_json::json!({ "pixels": pixels })).unwrap());
    let request = || {
        let mut request = http::Request::new(Full::new(body.clone()));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = "https://localhost/".parse().unwrap();
        request
    };
    let native = native_classifier(&model);
    let run_native = || {
        let input = tract_onnx::prelude::Tensor::from_shape(&[1, 3, 48, 192], &preprocess(&pixels))
            .unwrap();
        let output = native.run(tvec![input.into()]).unwrap();
        std::hint::black_box(output);
    };
    for _ in 0..20 {
        run_native();
        let response = node
            .runtime
            .invoke(classify.clone(), request())
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
    }
    let (mut component, mut native_samples) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        let started = Instant::now();
        let response = node
            .runtime
            .invoke(classify.clone(), request())
            .await
            .unwrap();
        assert!(response.status().is_success());
        response.into_body().collect().await.unwrap();
        component.push(started.elapsed());
        let started = Instant::now();
        run_native();
        native_samples.push(started.elapsed());
    }
    let (component_p50, component_p99) = summary(component);
    let (native_p50, native_p99) = summary(native_samples);
    println!("classify (PP-OCR text orientation, 1x3x48x192):");
    println!(
        "  component (instantiate + JSON + wasi-nn + response): p50 {:.0} µs, p99 {:.0} µs",
        micros(component_p50),
        micros(component_p99)
    );
    println!(
        "  native tract (preprocess + run):                     p50 {:.0} µs, p99 {:.0} µs",
        micros(native_p50),
        micros(native_p99)
    );
    println!(
        "  component / native (p50): {:.2}x",
        component_p50.as_secs_f64() / native_p50.as_secs_f64()
    );
    println!();
    wasi_nn_from_component(&node, dir.path(), &native).await;
    if wanted("services") {
        services(&node).await;
    }
    if wanted("interpreted") {
        interpreted_components(&node).await;
    }
    if wanted("onnx") {
        onnx_backends(&node).await;
    }
    if wanted("embeddings") {
        embeddings(&node, dir.path()).await;
    }
    if wanted("batching") {
        dynamic_batching(&node, dir.path()).await;
    }
    if wanted("llm") {
        let idle = llm(&node, dir.path()).await;
        llm_concurrency(&node, idle).await;
        orphaned_generations(&node).await;
    }
    drop(node);
    if wanted("edge") {
        edge_fitness().await;
    }
    if !wanted("http") {
        return;
    }

    // hello over loopback.
    let interpreted = std::env::var("TENSORLET_INTERPRETED_COMPONENTS_DIR").ok();
    let mut components = vec![("hello", artifacts::HELLO.to_string())];
    if let Some(dir) = &interpreted {
        components.push(("hello-py", format!("{dir}/hello-py.wasm")));
        components.push(("hello-js", format!("{dir}/hello-js.wasm")));
    }
    let components: Vec<(&str, &str)> = components
        .iter()
        .map(|(name, path)| (*name, path.as_str()))
        .collect();
    let https_node = serve_apps(false, "", &components[..1]);
    let http_node = serve_apps(true, "", &components);
    let identity =
        tensorlet::tls::load_or_generate(&Default::default(), https_node._dir.path()).unwrap();
    let native_https = serve_native(Some(identity.server_config().unwrap()));
    let native_http = serve_native(None);
    let cert = https_node.cert.clone();
    println!(
        "hello over loopback ({LOAD_SECONDS} s per row; client and server share the machine):"
    );
    print_versus_header("scheme", "native");
    for (scheme, node_url, native_url, cert) in [
        ("https", &https_node.url, &native_https, cert.as_deref()),
        ("http", &http_node.url, &native_http, None),
    ] {
        for connections in [1, 32] {
            let ours = load(&format!("{node_url}/apps/hello/"), connections, cert).await;
            let reused = load(&format!("{node_url}/apps/hello-reuse/"), connections, cert).await;
            let theirs = load(&format!("{native_url}/apps/hello/"), connections, cert).await;
            print_versus_row(scheme, connections, &ours, &reused, &theirs);
        }
    }
    println!();
    versus_wasmtime_serve(&http_node, &components).await;
    drop(http_node);
    println!();
    kept_pages(&components).await;
}

/// What keeping the pages an instance wrote resident in its slot gains and costs: a node
/// serving each component fresh at 32 connections with `[limits] memory_keep_resident_mib` at
/// its default (16) and at 0 (off): requests/s, and the node's resident memory after the load.
async fn kept_pages(components: &[(&str, &str)]) {
    println!(
        "pages kept resident in instance slots, plain HTTP, 32 connections ({LOAD_SECONDS} s per row):"
    );
    println!(
        "  {:<9} {:>8}  {:>22}  {:>12}",
        "app", "kept MiB", "req/s p50 p99", "node RSS MiB"
    );
    for (name, component) in components {
        for kept in [16, 0] {
            let config = format!("[limits]\nmemory_keep_resident_mib = {kept}\n");
            let node = serve_apps(true, &config, &[(name, component)]);
            let load = load(&format!("{}/apps/{name}/", node.url), 32, None).await;
            let rss_mib = proc_status_kib(node.child.id(), "VmRSS") as f64 / 1024.0;
            println!(
                "  {name:<9} {kept:>8}  {}  {rss_mib:>12.1}",
                load_cell(&load)
            );
        }
    }
}

/// `wasmtime serve` (the `wasmtime` on PATH, or `TENSORLET_BENCH_WASMTIME`) against tensorlet
/// over plain HTTP: the same components, the same load driver, one after the other.
async fn versus_wasmtime_serve(node: &ServedNode, components: &[(&str, &str)]) {
    let wasmtime =
        std::env::var("TENSORLET_BENCH_WASMTIME").unwrap_or_else(|_| "wasmtime".to_string());
    let version = Command::new(&wasmtime)
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success());
    let Some(version) = version else {
        println!("wasmtime serve: skipped (no `wasmtime`: `cargo install wasmtime-cli --locked --version 48.0.8`, or set TENSORLET_BENCH_WASMTIME)");
        return;
    };
    println!(
        "against `{} serve`, plain HTTP over loopback ({LOAD_SECONDS} s per row):",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    print_versus_header("app", "wasmtime");
    for (name, component) in components {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = Command::new(&wasmtime)
            // `-Scli`: the wasi:cli interfaces (stdout, environment) the components import.
            .args([
                "serve",
                "-Scli",
                "--addr",
                &format!("127.0.0.1:{port}"),
                component,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/apps/{name}/");
        let client = reqwest::Client::new();
        let mut ready = false;
        // It compiles the component before it listens.
        for _ in 0..600 {
            if let Ok(response) = client.get(&url).send().await {
                ready = response.status().is_success();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ready {
            let _ = server.kill();
            let output = server.wait_with_output().unwrap();
            println!(
                "  {name:<9} wasmtime serve did not serve it: {}",
                String::from_utf8_lossy(&output.stderr)
                    .lines()
                    .next()
                    .unwrap_or_default()
            );
            continue;
        }
        for connections in [1, 32] {
            let theirs = load(&url, connections, None).await;
            let ours = load(&format!("{}/apps/{name}/", node.url), connections, None).await;
            let reused = load(
                &format!("{}/apps/{name}-reuse/", node.url),
                connections,
                None,
            )
            .await;
            print_versus_row(name, connections, &ours, &reused, &theirs);
        }
        let _ = server.kill();
        let _ = server.wait();
    }
}

/// The heading of a table of loads on tensorlet, fresh and reused, against `baseline`.
fn print_versus_header(label: &str, baseline: &str) {
    println!(
        "  {label:<9} {:>5}  {:>22}  {:>22}  {:>22}  {:>7} {:>7}",
        "conns",
        "tensorlet req/s p50 p99",
        "reused req/s p50 p99",
        format!("{baseline} req/s p50 p99"),
        "ratio",
        "reused"
    );
}

/// One row of that table: each load's requests/s, p50 and p99, then tensorlet's requests/s,
/// fresh and reused, as ratios to the baseline's.
fn print_versus_row(label: &str, connections: usize, ours: &Load, reused: &Load, baseline: &Load) {
    println!(
        "  {label:<9} {connections:>5}  {}  {}  {}  {:>6.2}x {:>6.2}x",
        load_cell(ours),
        load_cell(reused),
        load_cell(baseline),
        ours.requests_per_sec / baseline.requests_per_sec,
        reused.requests_per_sec / baseline.requests_per_sec,
    );
}

/// A load's requests/s, p50 and p99, as one table cell.
fn load_cell(load: &Load) -> String {
    format!(
        "{:>8.0} {:>6.0}µs {:>6.0}µs",
        load.requests_per_sec,
        micros(load.p50),
        micros(load.p99)
    )
}

/// Serves `request` on `app` in-process and reads the whole response; how long it took.
async fn timed_invoke(
    node: &tensorlet::node::Node,
    app: &Arc<tensorlet::runtime::App>,
    request: http::Request<Full<Bytes>>,
) -> Duration {
    let started = Instant::now();
    let response = node.runtime.invoke(app.clone(), request).await.unwrap();
    assert!(response.status().is_success());
    response.into_body().collect().await.unwrap();
    started.elapsed()
}

fn get(path: &str) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::new(Full::new(Bytes::new()));
    *request.uri_mut() = format!("https://localhost{path}").parse().unwrap();
    request
}

/// Deploys hello as `app` with `manifest` (TOML) and returns it.
async fn deploy_hello(
    node: &tensorlet::node::Node,
    app: &str,
    manifest: &str,
) -> Arc<tensorlet::runtime::App> {
    let spec: tensorlet::apps::DeploySpec = toml::from_str(manifest).unwrap();
    node.runtime
        .deploy(
            app,
            Some(std::fs::read(artifacts::HELLO).unwrap().into()),
            spec,
            Default::default(),
        )
        .await
        .unwrap();
    node.runtime.app(app).unwrap()
}

/// The hello example in Python and JavaScript (`components/build-interpreted`, into
/// `TENSORLET_INTERPRETED_COMPONENTS_DIR`), in-process, one request after another: a fresh
/// instance per request against instances reused, and against the Rust hello the same way.
async fn interpreted_components(node: &tensorlet::node::Node) {
    let Ok(dir) = std::env::var("TENSORLET_INTERPRETED_COMPONENTS_DIR") else {
        println!("interpreted components: skipped (build them with `bash components/build-interpreted DIR` and set TENSORLET_INTERPRETED_COMPONENTS_DIR=DIR)");
        println!();
        return;
    };
    println!("hello in three languages, in-process, one request after another (whole request and response):");
    println!(
        "  {:<9} {:>22}  {:>22}  {:>8}  {:>16}",
        "language", "fresh p50 p99", "reused p50 p99", "reused/fresh req/s", "instantiate p50"
    );
    for (language, component) in [
        ("rust", artifacts::HELLO.to_string()),
        ("python", format!("{dir}/hello-py.wasm")),
        ("js", format!("{dir}/hello-js.wasm")),
    ] {
        let bytes = Bytes::from(std::fs::read(&component).unwrap());
        let mut apps = Vec::new();
        for (suffix, manifest) in [("fresh", ""), ("reused", REUSE_MANIFEST)] {
            let name = format!("hello-{language}-{suffix}");
            let spec: tensorlet::apps::DeploySpec = toml::from_str(manifest).unwrap();
            node.runtime
                .deploy(&name, Some(bytes.clone()), spec, Default::default())
                .await
                .unwrap();
            apps.push(node.runtime.app(&name).unwrap());
        }
        let (mut fresh, mut reused) = (Vec::new(), Vec::new());
        for round in 0..1200 {
            let (fresh_time, reused_time) = (
                timed_invoke(node, &apps[0], get("/?name=bench")).await,
                timed_invoke(node, &apps[1], get("/?name=bench")).await,
            );
            // The first rounds warm both up (and compile nothing: deploy did).
            if round >= 200 {
                fresh.push(fresh_time);
                reused.push(reused_time);
            }
        }
        let ((fresh_p50, fresh_p99), (reused_p50, reused_p99)) = (summary(fresh), summary(reused));
        // What a fresh instance costs before its handler runs.
        let revision = apps[0].revisions[&apps[0].record.latest].clone();
        let mut instantiations = Vec::new();
        for _ in 0..500 {
            let started = Instant::now();
            node.runtime.instantiate_only(&revision).await.unwrap();
            instantiations.push(started.elapsed());
        }
        println!(
            "  {language:<9} {:>9.0}µs {:>9.0}µs  {:>9.0}µs {:>9.0}µs  {:>17.2}x  {:>14.0}µs",
            micros(fresh_p50),
            micros(fresh_p99),
            micros(reused_p50),
            micros(reused_p99),
            fresh_p50.as_secs_f64() / reused_p50.as_secs_f64(),
            micros(summary(instantiations).0)
        );
    }
    println!();
}

/// Apps as services, in-process, each figure against its baseline in the same run: a cold
/// start from zero against a warm request, a cache hit against a miss, and a revision limited
/// to one request at a time (the rest queue) against an unlimited one.
async fn services(node: &tensorlet::node::Node) {
    println!("apps as services (hello, in-process, whole request and response):");
    let app = deploy_hello(node, "cold", "").await;
    let revision = app.revisions[&app.record.latest].clone();
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for round in 0..2200 {
        let warm_time = timed_invoke(node, &app, get("/")).await;
        if round >= 200 {
            warm.push(warm_time);
        }
    }
    for round in 0..220 {
        assert!(revision.scale_to_zero());
        let cold_time = timed_invoke(node, &app, get("/")).await;
        if round >= 20 {
            cold.push(cold_time);
        }
    }
    let ((cold_p50, cold_p99), (warm_p50, _)) = (summary(cold), summary(warm));
    println!(
        "  cold start from zero (compile cache → InstancePre → request): p50 {:.0} µs, p99 {:.0} µs; warm request p50 {:.0} µs: {:.1}x",
        micros(cold_p50),
        micros(cold_p99),
        micros(warm_p50),
        cold_p50.as_secs_f64() / warm_p50.as_secs_f64()
    );

    let cached = deploy_hello(node, "cached", "[cache]\nttl_secs = 600\n").await;
    let (mut hits, mut misses) = (Vec::new(), Vec::new());
    for round in 0..2200 {
        let miss = timed_invoke(node, &cached, get(&format!("/?name=n{round}"))).await;
        let hit = timed_invoke(node, &cached, get(&format!("/?name=n{round}"))).await;
        if round >= 200 {
            misses.push(miss);
            hits.push(hit);
        }
    }
    let ((hit_p50, hit_p99), (miss_p50, _)) = (summary(hits), summary(misses));
    println!(
        "  response cache: hit p50 {:.1} µs, p99 {:.1} µs; miss (runs the app, stores) p50 {:.1} µs: a hit takes {:.2}x a miss",
        micros(hit_p50),
        micros(hit_p99),
        micros(miss_p50),
        hit_p50.as_secs_f64() / miss_p50.as_secs_f64()
    );

    const CLIENTS: usize = 16;
    const PER_CLIENT: usize = 500;
    let mut rows = Vec::new();
    for (name, manifest) in [
        ("free", ""),
        (
            "queued",
            "[scaling]\nmax_concurrency = 1\nmax_queued = 64\n",
        ),
    ] {
        let app = deploy_hello(node, name, manifest).await;
        let started = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let (runtime, app) = (node.runtime.clone(), app.clone());
            clients.push(tokio::spawn(async move {
                let mut samples = Vec::new();
                for _ in 0..PER_CLIENT {
                    let started = Instant::now();
                    let response = runtime.invoke(app.clone(), get("/")).await.unwrap();
                    response.into_body().collect().await.unwrap();
                    samples.push(started.elapsed());
                }
                samples
            }));
        }
        let mut samples = Vec::new();
        for client in clients {
            samples.extend(client.await.unwrap());
        }
        let rate = (CLIENTS * PER_CLIENT) as f64 / started.elapsed().as_secs_f64();
        rows.push((name, rate, summary(samples)));
    }
    let free_rate = rows[0].1;
    for (name, rate, (p50, p99)) in rows {
        println!(
            "  {CLIENTS} clients, {}: {rate:.0} req/s ({:.2}x unlimited), p50 {:.0} µs, p99 {:.0} µs",
            if name == "free" { "no per-app limit" } else { "max_concurrency = 1 (the rest queue)" },
            rate / free_rate,
            micros(p50),
            micros(p99)
        );
    }
    println!();
}

/// Registers the model file at `path` on `node` as `name` with `backend` (or the node's
/// choice), as `tensorlet model add` would.
async fn register_model(
    node: &tensorlet::node::Node,
    name: &str,
    encoding: tensorlet::nn::Encoding,
    backend: Option<&str>,
    path: &std::path::Path,
    scratch: &std::path::Path,
) {
    register_batched_model(node, name, encoding, backend, path, scratch, None).await;
}

/// [`register_model`] with a dynamic-batching policy.
async fn register_batched_model(
    node: &tensorlet::node::Node,
    name: &str,
    encoding: tensorlet::nn::Encoding,
    backend: Option<&str>,
    path: &std::path::Path,
    scratch: &std::path::Path,
    batching: Option<tensorlet::nn::backend::batching::BatchPolicy>,
) {
    let staged = scratch.join(format!("staged-{name}"));
    std::fs::copy(path, &staged).unwrap();
    let upload = tensorlet::nn::Upload {
        encoding,
        backend: backend.map(str::to_string),
        target: "cpu".to_string(),
        digest: tensorlet::store::blobs::digest_of_file(path).unwrap(),
        size_bytes: std::fs::metadata(path).unwrap().len(),
        tenant: None,
        batching,
    };
    node.models.add(name, staged, upload).await.unwrap();
}

/// Deploys `component` as `app`, allowed to load `model`.
async fn deploy_with_model(
    node: &tensorlet::node::Node,
    app: &str,
    component: &str,
    model: &str,
) -> Arc<tensorlet::runtime::App> {
    let mut spec = tensorlet::apps::DeploySpec::default();
    spec.app.models = vec![model.to_string()];
    node.runtime
        .deploy(
            app,
            Some(std::fs::read(component).unwrap().into()),
            spec,
            Default::default(),
        )
        .await
        .unwrap();
    node.runtime.app(app).unwrap()
}

/// SmolLM2-135M through the `openai` component against the same model driven natively with
/// llama-cpp-2 (same library, same threads), greedy, 96 new tokens.
/// Single-stream LLM figures; returns the node's resident memory (MiB) with the model loaded,
/// before its first generation.
async fn llm(node: &tensorlet::node::Node, scratch: &std::path::Path) -> f64 {
    const NEW_TOKENS: u32 = 96;
    // A prompt the model continues for long, so that every run generates all the tokens.
    const PROMPT: &str = "1, 2, 3, 4, 5, 6,";
    let model_path = artifacts::smollm2_model();
    register_model(node, "smollm2", Encoding::Ggml, None, &model_path, scratch).await;
    let app = deploy_with_model(node, "openai", artifacts::OPENAI, "smollm2").await;
    let idle = resident_mib();
    let body = serde_json::json!({
        "model": "smollm2", "prompt": PROMPT, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": true,
        "stop": [], "stream_options": { "include_usage": true },
    });
    let threads = node.config.nn.inference_threads();

    let mut component_rates = Vec::new();
    let mut component_first = Vec::new();
    for _ in 0..3 {
        let (_, generated, first, total) = stream_completion(node, &app, body.clone()).await;
        component_first.push(first);
        component_rates.push((generated - 1) as f64 / (total - first).as_secs_f64());
    }

    let (native_rate, native_first) =
        tokio::task::spawn_blocking(move || native_llm(&model_path, PROMPT, NEW_TOKENS, threads))
            .await
            .unwrap();
    let component_rate = component_rates.iter().cloned().fold(0.0, f64::max);
    let component_first = component_first.into_iter().min().unwrap();
    println!(
        "LLM: SmolLM2-135M-Instruct Q4_1, greedy, {NEW_TOKENS} new tokens, {threads} threads:"
    );
    println!(
        "  openai component (streamed): {:.1} tok/s, first token {:.0} ms",
        component_rate,
        component_first.as_secs_f64() * 1e3
    );
    println!(
        "  native llama.cpp (llama-cpp-2, same library): {:.1} tok/s, first token {:.0} ms",
        native_rate,
        native_first.as_secs_f64() * 1e3
    );
    println!(
        "  component / native decode rate: {:.2}x",
        component_rate / native_rate
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/llama_cpp_python.py");
    let python = Command::new("python3")
        .arg(script)
        .arg(artifacts::smollm2_model())
        .args([PROMPT, &NEW_TOKENS.to_string(), &threads.to_string()])
        .stderr(Stdio::null())
        .output();
    match python.ok().filter(|o| o.status.success()) {
        Some(output) => {
            let baseline: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            let rate = baseline["tokens_per_sec"].as_f64().unwrap();
            println!(
                "  llama-cpp-python {}: {:.1} tok/s, first token {:.0} ms; component / llama-cpp-python: {:.2}x",
                baseline["version"].as_str().unwrap_or("?"),
                rate,
                baseline["first_token_ms"].as_f64().unwrap(),
                component_rate / rate
            );
        }
        None => println!(
            "  llama-cpp-python: not installed (pip install llama-cpp-python==0.3.36 for this baseline)"
        ),
    }
    println!();
    idle
}

/// The ONNX backends the bench compares, each with the PP-OCR classifier registered under
/// [`classifier_on`]'s name by [`wasi_nn_from_component`].
const ONNX_BACKENDS: [&str; 3] = ["tract", "onnxruntime", "openvino"];

/// The name of the PP-OCR classifier registered for `backend`.
fn classifier_on(backend: &str) -> String {
    format!("nn-{backend}")
}

/// The classifier's input for the backend interface: zeros, 1x3x48x192.
fn classifier_zeros() -> tensorlet::nn::backend::Tensor {
    tensorlet::nn::backend::Tensor {
        dimensions: vec![1, 3, 48, 192],
        ty: tensorlet::nn::backend::TensorType::Fp32,
        data: vec![0u8; 4 * 3 * 48 * 192],
    }
}

/// The PP-OCR classifier on every ONNX backend, through the backend interface (what a
/// component's `compute` reaches), same input, 200 runs each.
async fn onnx_backends(node: &tensorlet::node::Node) {
    let input = classifier_zeros();
    println!("ONNX backends, PP-OCR text orientation 1x3x48x192, compute p50 over 200 runs:");
    let mut tract_p50 = None;
    for backend in ONNX_BACKENDS {
        let graph = node
            .models
            .graph_for(&classifier_on(backend), "default")
            .unwrap();
        let input = input.clone();
        let samples = tokio::task::spawn_blocking(move || {
            let mut context = graph.init_execution_context().unwrap();
            let mut samples = Vec::new();
            for round in 0..220 {
                let started = Instant::now();
                std::hint::black_box(
                    context
                        .compute(vec![("x".into(), input.clone())], &Cancellation::default())
                        .unwrap(),
                );
                if round >= 20 {
                    samples.push(started.elapsed());
                }
            }
            samples
        })
        .await
        .unwrap();
        let (p50, p99) = summary(samples);
        let baseline = *tract_p50.get_or_insert(p50);
        println!(
            "  {backend:<12} p50 {:.0} µs, p99 {:.0} µs, {:.2}x tract",
            micros(p50),
            micros(p99),
            p50.as_secs_f64() / baseline.as_secs_f64()
        );
    }
    println!();
}

/// The platform's own share of a compute: a component (`misbehave`'s `/infer`) runs the
/// classifier 20 times on one prepared tensor, against 20 runs of the same tensorlet graph
/// each sent to the node's inference threads as the host sends a guest's compute, 20 runs of
/// it called directly on one thread (the backend's library and tensorlet's tensor conversion,
/// no wasm) and, for tract, 20 runs of a plan of its own (tract alone). Rounds alternate so
/// drift hits all alike.
async fn wasi_nn_from_component(
    node: &tensorlet::node::Node,
    scratch: &std::path::Path,
    native_tract: &Arc<TypedRunnableModel>,
) {
    const RUNS: u32 = 20;
    let model = artifacts::text_orientation_model();
    let input = classifier_zeros();
    let zeros =
        tract_onnx::prelude::Tensor::from_shape(&[1, 3, 48, 192], &vec![0f32; 3 * 48 * 192])
            .unwrap();
    println!(
        "wasi-nn compute from a component, PP-OCR classifier, {RUNS} runs on a prepared tensor, p50 per run:"
    );
    for backend in ONNX_BACKENDS {
        let name = classifier_on(backend);
        register_model(node, &name, Encoding::Onnx, Some(backend), &model, scratch).await;
        let app = deploy_with_model(
            node,
            &format!("infer-{backend}"),
            artifacts::MISBEHAVE,
            &name,
        )
        .await;
        let graph = node.models.graph_for(&name, "default").unwrap();
        let context = Arc::new(std::sync::Mutex::new(
            graph.init_execution_context().unwrap(),
        ));
        let (mut component, mut hopping, mut direct, mut alone) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..60 {
            let elapsed = timed_invoke(
                node,
                &app,
                get(&format!("/infer?model={name}&iterations={RUNS}")),
            )
            .await;
            // What the host does for a guest's compute, without the guest: each run goes to
            // the node's inference threads and back.
            let started = Instant::now();
            for _ in 0..RUNS {
                let (context, input) = (context.clone(), input.clone());
                node.models
                    .backends()
                    .threads()
                    .spawn(move || {
                        let inputs = vec![("x".into(), input)];
                        let mut context = context.lock().unwrap();
                        std::hint::black_box(
                            context.compute(inputs, &Cancellation::default()).unwrap(),
                        );
                    })
                    .await
                    .unwrap();
            }
            let hopping_elapsed = started.elapsed();
            let (context, input) = (context.clone(), input.clone());
            let direct_elapsed = tokio::task::spawn_blocking(move || {
                let mut context = context.lock().unwrap();
                let started = Instant::now();
                for _ in 0..RUNS {
                    let inputs = vec![("x".into(), input.clone())];
                    std::hint::black_box(
                        context.compute(inputs, &Cancellation::default()).unwrap(),
                    );
                }
                started.elapsed()
            })
            .await
            .unwrap();
            let started = Instant::now();
            if backend == "tract" {
                for _ in 0..RUNS {
                    std::hint::black_box(native_tract.run(tvec![zeros.clone().into()]).unwrap());
                }
            }
            let alone_elapsed = started.elapsed();
            if round >= 10 {
                component.push(elapsed);
                hopping.push(hopping_elapsed);
                direct.push(direct_elapsed);
                alone.push(alone_elapsed);
            }
        }
        let per_run = |samples: Vec<Duration>| summary(samples).0 / RUNS;
        let (component, hopping, direct) = (per_run(component), per_run(hopping), per_run(direct));
        let ratio = |d: Duration| component.as_secs_f64() / d.as_secs_f64();
        print!(
            "  {backend:<12} component {:.0} µs; the graph with a hop to the inference threads per run {:.0} µs: {:.3}x; called directly {:.0} µs: {:.3}x",
            micros(component),
            micros(hopping),
            ratio(hopping),
            micros(direct),
            ratio(direct)
        );
        if backend == "tract" {
            let alone = per_run(alone);
            print!(
                "; tract alone {:.0} µs: {:.3}x",
                micros(alone),
                ratio(alone)
            );
        }
        println!();
    }
    println!();
}

/// all-MiniLM-L6-v2 through the `openai` component's /v1/embeddings against the same candle
/// graph called directly (no wasm, no HTTP, no JSON).
async fn embeddings(node: &tensorlet::node::Node, scratch: &std::path::Path) {
    let bundle = scratch.join("minilm.tar");
    tensorlet::cli::bundle::bundle_dir(&artifacts::minilm_model(), &bundle).unwrap();
    register_model(
        node,
        "minilm",
        Encoding::Safetensors,
        None,
        &bundle,
        scratch,
    )
    .await;
    let app = deploy_with_model(node, "openai-embed", artifacts::OPENAI, "minilm").await;
    let graph = node.models.graph_for("minilm", "default").unwrap();
    println!("Embeddings, all-MiniLM-L6-v2 (candle), p50 over 50 requests:");
    for texts in [1usize, 8] {
        let inputs: Vec<String> = (0..texts)
            .map(|i| format!("Edge node {i} serves sentence embeddings to nearby clients."))
            .collect();
        let body =
            serde_json::json!({ "model": "minilm", "input": inputs, "encoding_format": "float" })
                .to_string();
        let texts_json = serde_json::to_vec(&inputs).unwrap();
        let (mut component, mut native) = (Vec::new(), Vec::new());
        for round in 0..60 {
            let mut request = http::Request::new(Full::new(Bytes::from(body.clone())));
            *request.method_mut() = http::Method::POST;
            *request.uri_mut() = "https://localhost/v1/embeddings".parse().unwrap();
            let started = Instant::now();
            let response = node.runtime.invoke(app.clone(), request).await.unwrap();
            assert!(response.status().is_success());
            response.into_body().collect().await.unwrap();
            let component_elapsed = started.elapsed();
            let graph = graph.clone();
            let texts_json = texts_json.clone();
            let native_elapsed = tokio::task::spawn_blocking(move || {
                let tensor = tensorlet::nn::backend::Tensor {
                    dimensions: vec![texts_json.len() as u32],
                    ty: tensorlet::nn::backend::TensorType::U8,
                    data: texts_json,
                };
                let started = Instant::now();
                let mut context = graph.init_execution_context().unwrap();
                std::hint::black_box(
                    context
                        .compute(vec![("texts".into(), tensor)], &Cancellation::default())
                        .unwrap(),
                );
                started.elapsed()
            })
            .await
            .unwrap();
            if round >= 10 {
                component.push(component_elapsed);
                native.push(native_elapsed);
            }
        }
        let (component_p50, _) = summary(component);
        let (native_p50, _) = summary(native);
        println!(
            "  {texts} text(s): component {:.2} ms, native candle {:.2} ms: {:.2}x",
            component_p50.as_secs_f64() * 1e3,
            native_p50.as_secs_f64() * 1e3,
            component_p50.as_secs_f64() / native_p50.as_secs_f64()
        );
    }
    println!();
}

/// A compute's inputs or outputs.
type NamedTensors = Vec<(String, tensorlet::nn::backend::Tensor)>;

/// A model to batch: its label, file, backend, and each caller's input.
type BatchingCase<'a> = (
    &'a str,
    &'a std::path::Path,
    &'a str,
    fn(usize) -> NamedTensors,
);

/// Callers computing at once, one model at a time.
const BATCHING_CALLERS: usize = 8;
/// How long each configuration is driven (a call of the embedding model takes ~50 ms).
const BATCHING_SECONDS: u64 = 6;

/// Dynamic batching: [`BATCHING_CALLERS`] callers computing at once on the same model
/// registered twice, unbatched and batched (max batch size 8, the default 2 ms delay), for
/// BATCHING_SECONDS each, on the path a guest's `compute` takes (a compute slot per run, the
/// blocking pool); every batched output is checked bit-identical to the unbatched one. Then
/// `classify` end to end at 8 requests at once, on each of the two registrations.
async fn dynamic_batching(node: &tensorlet::node::Node, scratch: &std::path::Path) {
    use tensorlet::nn::backend::batching::{BatchPolicy, DEFAULT_QUEUE_DELAY_US};
    use tensorlet::nn::backend::{Tensor, TensorType};
    let policy = BatchPolicy::new(8, DEFAULT_QUEUE_DELAY_US).unwrap();
    let classifier = artifacts::text_orientation_model();
    let embedder = artifacts::minilm_onnx_model();
    // Each caller its own input: a distinct image, a distinct 32-token sentence.
    let image = |caller: usize| -> NamedTensors {
        let pixels: Vec<f32> = (0..3 * 48 * 192)
            .map(|i| ((i * 7 + caller * 13) % 251) as f32 / 125.0 - 1.0)
            .collect();
        vec![("x".into(), f32_tensor(&[1, 3, 48, 192], &pixels))]
    };
    let sentence = |caller: usize| -> NamedTensors {
        let ids: Vec<i64> = (0..32)
            .map(|i| {
                if i == 0 {
                    101
                } else if i == 31 {
                    102
                } else {
                    1000 + ((i * 31 + caller * 97) % 20000) as i64
                }
            })
            .collect();
        let i64_tensor = |values: &[i64]| Tensor {
            dimensions: vec![1, 32],
            ty: TensorType::I64,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        vec![
            ("input_ids".into(), i64_tensor(&ids)),
            ("attention_mask".into(), i64_tensor(&[1; 32])),
            ("token_type_ids".into(), i64_tensor(&[0; 32])),
        ]
    };
    println!(
        "Dynamic batching, {BATCHING_CALLERS} callers at once for {BATCHING_SECONDS} s, batched: max batch size 8, delay {} ms:",
        DEFAULT_QUEUE_DELAY_US / 1000
    );
    println!(
        "  {:<44} {:>22}  {:>22}  {:>8}  {:>10}  {:>8}",
        "model", "unbatched calls/s p95", "batched calls/s p95", "ratio", "mean batch", "ceiling"
    );
    println!(
        "  (ceiling: rows per second of one thread running 8 rows at once vs one row at a time)"
    );
    let mut cases: Vec<BatchingCase> = Vec::new();
    for backend in ["tract", "onnxruntime"] {
        cases.push((
            "PP-OCR text orientation 1x3x48x192",
            &classifier,
            backend,
            image,
        ));
        cases.push((
            "MiniLM-L6 int8 ONNX, 1x32 tokens",
            &embedder,
            backend,
            sentence,
        ));
    }
    for (index, (model, path, backend, input)) in cases.into_iter().enumerate() {
        let label = format!("{model} ({backend})");
        let inputs: Vec<_> = (0..BATCHING_CALLERS).map(input).collect();
        let (unbatched, batched) = (format!("unbatched-{index}"), format!("batched-{index}"));
        register_model(
            node,
            &unbatched,
            Encoding::Onnx,
            Some(backend),
            path,
            scratch,
        )
        .await;
        register_batched_model(
            node,
            &batched,
            Encoding::Onnx,
            Some(backend),
            path,
            scratch,
            Some(policy),
        )
        .await;
        // A first round each, untimed: plans per shape, and the batcher's first batch of each
        // shape, which it checks against unbatched runs.
        concurrent_computes(node, &unbatched, &inputs).await;
        concurrent_computes(node, &batched, &inputs).await;
        let alone = concurrent_computes(node, &unbatched, &inputs).await;
        let graph = node.models.graph_for(&batched, "default").unwrap();
        let before = graph.batching_activity().unwrap();
        let together = concurrent_computes(node, &batched, &inputs).await;
        assert_eq!(
            alone.outputs, together.outputs,
            "{label}: batched outputs differ from unbatched ones"
        );
        let activity = graph.batching_activity().unwrap();
        let mean_batch = (activity.batched_calls - before.batched_calls) as f64
            / (activity.batches - before.batches).max(1) as f64;
        if let Some(reason) = &activity.disabled {
            println!("  {label}: batching turned itself off: {reason}");
        }
        let ceiling = rows_per_run_gain(node, &unbatched, &inputs).await;
        println!(
            "  {label:<44} {:>9.0} {:>9.2} ms  {:>9.0} {:>9.2} ms  {:>7.2}x  {:>10.2}  {ceiling:>7.2}x",
            alone.calls_per_sec,
            alone.p95.as_secs_f64() * 1e3,
            together.calls_per_sec,
            together.p95.as_secs_f64() * 1e3,
            together.calls_per_sec / alone.calls_per_sec,
            mean_batch,
        );
    }
    // classify end to end (instantiate, JSON, preprocessing in wasm, compute, response).
    let mut spec = tensorlet::apps::DeploySpec::default();
    // The classifier on ONNX Runtime, whose batches match its unbatched runs byte for byte.
    spec.app.models = vec!["unbatched-2".to_string(), "batched-2".to_string()];
    node.runtime
        .deploy(
            "classify-batching",
            Some(std::fs::read(artifacts::CLASSIFY).unwrap().into()),
            spec,
            Default::default(),
        )
        .await
        .unwrap();
    let classify = node.runtime.app("classify-batching").unwrap();
    let pixels: Vec<u8> = (0..48 * 192 * 3).map(|i| (i * 7 % 251) as u8).collect();
    let body = Bytes::from(serde_json::to_vec(&serde_json::json!({ "pixels": pixels })).unwrap());
    let mut figures = Vec::new();
    for model in ["unbatched-2", "batched-2"] {
        let deadline = Instant::now() + Duration::from_secs(BATCHING_SECONDS);
        let callers: Vec<_> = (0..BATCHING_CALLERS)
            .map(|_| {
                let (runtime, app, body) = (node.runtime.clone(), classify.clone(), body.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let mut request = http::Request::new(Full::new(body.clone()));
                        *request.method_mut() = http::Method::POST;
                        *request.uri_mut() =
                            format!("https://localhost/?model={model}").parse().unwrap();
                        let started = Instant::now();
                        let response = runtime.invoke(app.clone(), request).await.unwrap();
                        assert!(response.status().is_success());
                        response.into_body().collect().await.unwrap();
                        latencies.push(started.elapsed());
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for caller in callers {
            all.extend(caller.await.unwrap());
        }
        all.sort();
        figures.push((
            all.len() as f64 / BATCHING_SECONDS as f64,
            percentile(&all, 0.95),
        ));
    }
    println!(
        "  {:<44} {:>9.0} {:>9.2} ms  {:>9.0} {:>9.2} ms  {:>7.2}x",
        "classify end to end (onnxruntime)",
        figures[0].0,
        figures[0].1.as_secs_f64() * 1e3,
        figures[1].0,
        figures[1].1.as_secs_f64() * 1e3,
        figures[1].0 / figures[0].0,
    );
    println!();
}

/// What batching can gain at most on this machine: rows per second of one run of all the
/// callers' rows against one run per row, on one thread, the model called directly.
async fn rows_per_run_gain(
    node: &tensorlet::node::Node,
    name: &str,
    inputs: &[NamedTensors],
) -> f64 {
    let graph = node.models.graph_for(name, "default").unwrap();
    let joined: NamedTensors = (0..inputs[0].len())
        .map(|index| {
            let (name, first) = &inputs[0][index];
            let mut tensor = first.clone();
            tensor.dimensions[0] = inputs.len() as u32;
            tensor.data = inputs
                .iter()
                .flat_map(|input| input[index].1.data.iter().copied())
                .collect();
            (name.clone(), tensor)
        })
        .collect();
    let inputs = inputs.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut context = graph.init_execution_context().unwrap();
        let mut timed = |calls: &[NamedTensors]| {
            let started = Instant::now();
            for _ in 0..10 {
                for call in calls {
                    let outputs = context.compute(call.clone(), &Cancellation::default());
                    std::hint::black_box(outputs.unwrap());
                }
            }
            started.elapsed()
        };
        timed(&inputs);
        timed(std::slice::from_ref(&joined));
        let one_by_one = timed(&inputs);
        let at_once = timed(std::slice::from_ref(&joined));
        one_by_one.as_secs_f64() / at_once.as_secs_f64()
    })
    .await
    .unwrap()
}

fn f32_tensor(dimensions: &[u32], values: &[f32]) -> tensorlet::nn::backend::Tensor {
    tensorlet::nn::backend::Tensor {
        dimensions: dimensions.to_vec(),
        ty: tensorlet::nn::backend::TensorType::Fp32,
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

struct ConcurrentComputes {
    calls_per_sec: f64,
    p95: Duration,
    /// Each caller's last outputs.
    outputs: Vec<NamedTensors>,
}

/// One caller per input, each computing on model `name` in a loop for BATCHING_SECONDS the way
/// the wasi-nn host does: a compute slot per run unless the graph takes its own, the run on
/// the blocking pool.
async fn concurrent_computes(
    node: &tensorlet::node::Node,
    name: &str,
    inputs: &[NamedTensors],
) -> ConcurrentComputes {
    let graph = node.models.graph_for(name, "default").unwrap();
    let slots = node.models.backends().compute_slots().clone();
    let deadline = Instant::now() + Duration::from_secs(BATCHING_SECONDS);
    let callers: Vec<_> = inputs
        .iter()
        .cloned()
        .map(|input| {
            let (graph, slots) = (graph.clone(), slots.clone());
            tokio::spawn(async move {
                let context = Arc::new(std::sync::Mutex::new(
                    graph.init_execution_context().unwrap(),
                ));
                let takes_slots = context.lock().unwrap().takes_compute_slots_itself();
                let (mut latencies, mut last) = (Vec::new(), None);
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let slot = if takes_slots {
                        None
                    } else {
                        Some(slots.acquire().await)
                    };
                    let (context, input) = (context.clone(), input.clone());
                    let outputs = tokio::task::spawn_blocking(move || {
                        let _slot = slot;
                        context
                            .lock()
                            .unwrap()
                            .compute(input, &Cancellation::default())
                            .unwrap()
                    })
                    .await
                    .unwrap();
                    latencies.push(started.elapsed());
                    last = Some(outputs);
                }
                (latencies, last.unwrap())
            })
        })
        .collect();
    let (mut all, mut outputs) = (Vec::new(), Vec::new());
    for caller in callers {
        let (latencies, last) = caller.await.unwrap();
        all.extend(latencies);
        outputs.push(last);
    }
    all.sort();
    ConcurrentComputes {
        calls_per_sec: all.len() as f64 / BATCHING_SECONDS as f64,
        p95: percentile(&all, 0.95),
        outputs,
    }
}

/// A POST of `body` to the `openai` app's `/v1/completions`.
fn completion_request(body: &serde_json::Value) -> http::Request<Full<Bytes>> {
    let mut request = http::Request::new(Full::new(Bytes::from(body.to_string())));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = "https://localhost/v1/completions".parse().unwrap();
    request
}

/// Streams one completion through the `openai` app: (text, completion tokens, first-chunk
/// latency, total time).
async fn stream_completion(
    node: &tensorlet::node::Node,
    app: &Arc<tensorlet::runtime::App>,
    body: serde_json::Value,
) -> (String, u64, Duration, Duration) {
    let request = completion_request(&body);
    let started = Instant::now();
    let response = node.runtime.invoke(app.clone(), request).await.unwrap();
    let mut body = response.into_body();
    let (mut first, mut raw) = (None, Vec::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            first.get_or_insert_with(|| started.elapsed());
            raw.extend_from_slice(&data);
        }
    }
    let total = started.elapsed();
    let (mut text, mut tokens) = (String::new(), 0);
    for event in String::from_utf8(raw).unwrap().split("data: ") {
        if let Ok(event) = serde_json::from_str::<serde_json::Value>(event.trim()) {
            if let Some(chunk) = event["choices"][0]["text"].as_str() {
                text.push_str(chunk);
            }
            if let Some(generated) = event["usage"]["completion_tokens"].as_u64() {
                tokens = generated;
            }
        }
    }
    (text, tokens, first.unwrap(), total)
}

fn resident_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// Generations side by side on one loaded model: aggregate tokens/s of 4 concurrent against
/// the same 4 one after another (greedy, so the texts must be identical), and resident
/// memory with 1 and 8 generations running.
/// Concurrent generations vs one after another, a generation beside a busy app, and resident
/// memory; `idle` is the node's resident memory with the model loaded, before its first
/// generation.
async fn llm_concurrency(node: &tensorlet::node::Node, idle: f64) {
    const NEW_TOKENS: u32 = 64;
    let app = node.runtime.app("openai").unwrap();
    let prompts = [
        "1, 2, 3, 4,",
        "The sea is",
        "Edge computing means",
        "A recipe for bread:",
        "Once upon a time",
        "The best way to learn Rust is",
        "Mountains are",
        "Dear diary, today",
    ];
    let body = |prompt: &str| {
        serde_json::json!({
            "model": "smollm2", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
            "stream": true, "stop": [], "stream_options": { "include_usage": true },
        })
    };
    // Resident memory while generations run: hold each response after its first chunk.
    let resident_while_running = |running: usize| {
        let app = app.clone();
        async move {
            let mut bodies = Vec::new();
            for _ in 0..running {
                let request = completion_request(&body(prompts[0]));
                let response = node.runtime.invoke(app.clone(), request).await.unwrap();
                let mut response_body = response.into_body();
                response_body.frame().await.unwrap().unwrap();
                bodies.push(response_body);
            }
            resident_mib()
        }
    };
    let one_running = resident_while_running(1).await;

    let started = Instant::now();
    let mut sequential = Vec::new();
    let mut tokens = 0;
    for prompt in prompts {
        let (text, generated, _, _) = stream_completion(node, &app, body(prompt)).await;
        tokens += generated;
        sequential.push(text);
    }
    let sequential_rate = tokens as f64 / started.elapsed().as_secs_f64();
    println!(
        "LLM, generations of {NEW_TOKENS} tokens, {} thread(s) per lane, {} lane(s) of up to {} sequences decoded in one batch:",
        node.config.nn.inference_threads(),
        node.config.nn.compute_slots(),
        node.config.nn.llm_batch_sequences,
    );
    println!("  one after another {sequential_rate:.1} tok/s");
    // (forward passes, decoded tokens) of the model so far.
    let decoded = || {
        let models = node.models.list();
        let activity = models
            .iter()
            .find(|m| m.record.name == "smollm2")
            .and_then(|m| m.generation.clone())
            .unwrap();
        (activity.decode_passes, activity.decoded_tokens)
    };
    for at_once in [4, 8] {
        let (passes_before, tokens_before) = decoded();
        let started = Instant::now();
        let runs = futures_util::future::join_all(
            prompts[..at_once]
                .iter()
                .map(|prompt| stream_completion(node, &app, body(prompt))),
        )
        .await;
        let concurrent_rate =
            runs.iter().map(|r| r.1).sum::<u64>() as f64 / started.elapsed().as_secs_f64();
        let identical = runs
            .iter()
            .zip(&sequential)
            .all(|(run, text)| run.0 == *text);
        let (passes, tokens) = decoded();
        println!(
            "  {at_once} at once {concurrent_rate:.1} tok/s: {:.2}x; mean batch {:.2} sequences; greedy texts identical to one after another: {identical}",
            concurrent_rate / sequential_rate,
            (tokens - tokens_before) as f64 / (passes - passes_before) as f64
        );
    }
    let eight_running = resident_while_running(8).await;
    println!(
        "  resident memory: model loaded, before any generation {idle:.0} MiB; 1 generation running {one_running:.0} MiB; 8 running {eight_running:.0} MiB"
    );

    // One generation while another app keeps a core busy (an infinite loop until its timeout).
    let mut settings = tensorlet::apps::DeploySpec::default();
    settings.limits.timeout_secs = Some(20);
    node.runtime
        .deploy(
            "busy",
            Some(std::fs::read(artifacts::MISBEHAVE).unwrap().into()),
            settings,
            Default::default(),
        )
        .await
        .unwrap();
    let busy_app = node.runtime.app("busy").unwrap();
    let (_, alone_tokens, alone_first, alone_total) =
        stream_completion(node, &app, body(prompts[1])).await;
    let busy = tokio::spawn({
        let runtime = node.runtime.clone();
        async move {
            let mut request = http::Request::new(Full::new(Bytes::new()));
            *request.uri_mut() = "https://localhost/loop".parse().unwrap();
            if let Ok(response) = runtime.invoke(busy_app, request).await {
                let _ = response.into_body().collect().await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, busy_tokens, busy_first, busy_total) =
        stream_completion(node, &app, body(prompts[1])).await;
    busy.abort();
    let rate = |tokens: u64, first: Duration, total: Duration| {
        (tokens - 1) as f64 / (total - first).as_secs_f64()
    };
    let (alone, contended) = (
        rate(alone_tokens, alone_first, alone_total),
        rate(busy_tokens, busy_first, busy_total),
    );
    println!(
        "  one generation alone {alone:.1} tok/s; while another app busy-loops on a core {contended:.1} tok/s: {:.2}x",
        contended / alone
    );

    println!();
}

/// Another app's key-value increments while a burst of generations is orphaned (their
/// requests go away after 1 s, or after their first streamed chunk), against the same
/// increments on the idle node: durability work must not queue behind inference.
async fn orphaned_generations(node: &tensorlet::node::Node) {
    const BURST: usize = 20;
    let mut counter_spec = tensorlet::apps::DeploySpec::default();
    counter_spec.app.buckets = vec!["default".to_string()];
    node.runtime
        .deploy(
            "kv-counter",
            Some(std::fs::read(artifacts::KV_COUNTER).unwrap().into()),
            counter_spec,
            Default::default(),
        )
        .await
        .unwrap();
    let counter = node.runtime.app("kv-counter").unwrap();
    let increments = |count: usize| {
        let (runtime, counter) = (node.runtime.clone(), counter.clone());
        async move {
            let mut samples = Vec::with_capacity(count);
            for _ in 0..count {
                let mut request = http::Request::new(Full::new(Bytes::new()));
                *request.method_mut() = http::Method::POST;
                *request.uri_mut() = "https://localhost/count".parse().unwrap();
                let started = Instant::now();
                let response = runtime.invoke(counter.clone(), request).await.unwrap();
                assert_eq!(response.status(), 200);
                response.into_body().collect().await.unwrap();
                samples.push(started.elapsed());
            }
            summary(samples)
        }
    };
    increments(50).await;
    let (idle_p50, idle_p99) = increments(300).await;

    let app = node.runtime.app("openai").unwrap();
    let mut orphans = Vec::new();
    for n in 0..BURST {
        let streamed = n % 2 == 0;
        let body = serde_json::json!({
            "model": "smollm2", "prompt": "Write a long story about the sea.", "max_tokens": 1500,
            "temperature": 0, "stream": streamed,
        });
        let (runtime, app) = (node.runtime.clone(), app.clone());
        orphans.push(tokio::spawn(async move {
            let request = completion_request(&body);
            if streamed {
                // The client leaves after the first chunk.
                let response = runtime.invoke(app, request).await.unwrap();
                response.into_body().frame().await;
            } else {
                // The client leaves after 1 s, before the answer.
                let _ = tokio::time::timeout(Duration::from_secs(1), runtime.invoke(app, request))
                    .await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (burst_p50, burst_p99) = increments(300).await;
    for orphan in orphans {
        orphan.await.unwrap();
    }
    let left = Instant::now();
    let running = || {
        node.models
            .list()
            .iter()
            .find(|m| m.record.name == "smollm2")
            .and_then(|m| m.generation.clone())
            .map_or(0, |g| g.running + g.waiting)
    };
    while running() > 0 && left.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("Key-value increments of another app (300 each, durable), idle vs during a burst of {BURST} orphaned generations:");
    println!(
        "  idle p50 {:.0} µs, p99 {:.0} µs; during the burst p50 {:.0} µs, p99 {:.0} µs: {:.2}x (p50), {:.2}x (p99)",
        micros(idle_p50),
        micros(idle_p99),
        micros(burst_p50),
        micros(burst_p99),
        micros(burst_p50) / micros(idle_p50),
        micros(burst_p99) / micros(idle_p99),
    );
    println!(
        "  generations still running or waiting {} ms after the last client left: {}",
        left.elapsed().as_millis(),
        running()
    );
    println!();
}

/// Greedy generation straight on llama-cpp-2: (decode tokens/s, time to first token).
fn native_llm(
    path: &std::path::Path,
    prompt: &str,
    new_tokens: u32,
    threads: u32,
) -> (f64, Duration) {
    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::{params::LlamaModelParams, LlamaModel};
    use llama_cpp_2::sampling::LlamaSampler;
    // llama.cpp's state is process-wide: share the node's.
    let backend = tensorlet::nn::backend::llama::llama_backend().unwrap();
    let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default()).unwrap();
    let mut best = (0.0f64, Duration::MAX);
    for _ in 0..3 {
        let params = LlamaContextParams::default()
            .with_n_ctx(std::num::NonZeroU32::new(2048))
            .with_n_batch(512)
            .with_n_threads(threads as i32)
            .with_n_threads_batch(threads as i32);
        let mut context = model.new_context(backend, params).unwrap();
        let tokens = model.vocab().tokenize(prompt.as_bytes(), true, false);
        let started = Instant::now();
        let mut batch = LlamaBatch::new(512, 1);
        for (i, token) in tokens.iter().enumerate() {
            batch
                .add(*token, i as i32, &[0], i + 1 == tokens.len())
                .unwrap();
        }
        context.decode(&mut batch).unwrap();
        let mut sampler = LlamaSampler::greedy();
        let mut position = tokens.len() as i32;
        let mut token = sampler.sample(&context, batch.n_tokens() - 1);
        let first = started.elapsed();
        let mut generated = 1;
        while generated < new_tokens && !model.vocab().is_eog(token) {
            batch.clear();
            batch.add(token, position, &[0], true).unwrap();
            position += 1;
            context.decode(&mut batch).unwrap();
            token = sampler.sample(&context, batch.n_tokens() - 1);
            generated += 1;
        }
        let rate = f64::from(generated - 1) / (started.elapsed() - first).as_secs_f64();
        best = (best.0.max(rate), best.1.min(first));
    }
    best
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

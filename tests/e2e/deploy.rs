//! Serving: HTTPS with the generated certificate, the CLI, deploying, listing and removing
//! apps, plain HTTP on request, and restarts that reuse compiled components.

use crate::support::{artifacts, error_code, TestNode};
use sha2::{Digest, Sha256};

#[tokio::test]
async fn hello_is_served_over_https_with_the_generated_certificate() {
    let node = TestNode::start();
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);

    let pem = std::fs::read(node.data_dir.join("tls/cert.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    let expected: Vec<String> = Sha256::digest(&der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    assert_eq!(
        node.printed_fingerprint.as_deref(),
        Some(expected.join(":").as_str())
    );

    let deployed = node.cli_ok(&["deploy", "--public", "hello", artifacts::HELLO]);
    assert!(deployed.contains("deployed hello"), "{deployed}");
    assert_eq!(
        node.get("/apps/hello/?name=edge").await,
        (200, "Hello, edge!\n".to_string())
    );
    assert_eq!(
        node.get("/apps/hello").await,
        (200, "Hello, world!\n".to_string())
    );
    node.assert_healthy().await;

    let listed = node.cli_ok(&["apps"]);
    assert!(
        listed.lines().any(|line| line.starts_with("hello ")),
        "{listed}"
    );
    let status: serde_json::Value = serde_json::from_str(&node.cli_ok(&["status"])).unwrap();
    assert_eq!(status["apps"], 1);
    assert_eq!(
        status["tls_fingerprint"].as_str(),
        node.printed_fingerprint.as_deref()
    );

    node.cli_ok(&["remove", "hello"]);
    let (status, body) = node.get("/apps/hello/").await;
    assert_eq!((status, error_code(&body).as_str()), (404, "app_not_found"));
}

#[tokio::test]
async fn plain_http_is_served_only_when_asked_for() {
    let node = TestNode::start_with(&["--plain-http"]);
    assert!(node.url.starts_with("http://"), "{}", node.url);
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    assert_eq!(
        node.get("/apps/hello/?name=plain").await,
        (200, "Hello, plain!\n".to_string())
    );
}

#[tokio::test]
async fn a_restart_reuses_the_compiled_component_and_keeps_apps() {
    let mut node = TestNode::start();
    node.deploy_ok("hello", artifacts::HELLO, "timeout_secs=7")
        .await;
    let compiled: Vec<_> = std::fs::read_dir(node.data_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(compiled.len(), 1, "{compiled:?}");
    let written = std::fs::metadata(&compiled[0]).unwrap().modified().unwrap();

    node.terminate();
    let data_dir = node.take_data_dir();
    let restarted = TestNode::start_in(data_dir.path(), &[]);
    assert_eq!(
        restarted.get("/apps/hello/?name=again").await,
        (200, "Hello, again!\n".to_string())
    );
    assert_eq!(
        std::fs::metadata(&compiled[0]).unwrap().modified().unwrap(),
        written,
        "the component was recompiled"
    );
    let revisions = restarted.cli_ok(&["revisions", "hello"]);
    assert!(
        revisions.contains("7s"),
        "deployment settings were not kept: {revisions}"
    );
}

#[tokio::test]
async fn replaced_and_removed_components_leave_no_files_behind() {
    // One revision kept per app: a replaced revision goes at once, with its files.
    let config = crate::support::config_file("[limits]\nmax_revisions_per_app = 1\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    // Components and their compiled artifacts (`<digest>.<engine>.cwasm`), in blobs/.
    let blobs = || -> (Vec<String>, usize) {
        let names: Vec<String> = std::fs::read_dir(node.data_dir.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        let mut components: Vec<String> =
            names.iter().filter(|n| !n.contains('.')).cloned().collect();
        components.sort();
        let compiled = names.iter().filter(|n| n.ends_with(".cwasm")).count();
        assert_eq!(components.len() + compiled, names.len(), "{names:?}");
        (components, compiled)
    };
    // Two apps share one component: one file, one compiled artifact.
    node.deploy_ok("first", artifacts::HELLO, "").await;
    node.deploy_ok("second", artifacts::HELLO, "").await;
    let (hello, compiled) = blobs();
    assert_eq!((hello.len(), compiled), (1, 1), "{hello:?}");
    // Replacing one keeps the shared file; replacing both lets it go.
    node.deploy_ok("first", artifacts::KV_COUNTER, "").await;
    assert!(blobs().0.contains(&hello[0]));
    node.deploy_ok("second", artifacts::KV_COUNTER, "").await;
    assert!(!blobs().0.contains(&hello[0]));
    assert_eq!((blobs().0.len(), blobs().1), (1, 1));
    // Removing the last app that uses a component deletes it and its compiled artifact.
    node.cli_ok(&["remove", "first"]);
    assert_eq!(blobs().0.len(), 1);
    node.cli_ok(&["remove", "second"]);
    assert_eq!(blobs(), (Vec::new(), 0));
}

/// The hello example written in Python (componentize-py) and in JavaScript (componentize-js):
/// components of other languages' toolchains deploy and serve unchanged, a fresh instance per
/// request, or reusing their instances (each releases its request's resources, so each
/// instance is kept). `.ci/test` builds them (`components/build-interpreted`) and runs this
/// test with `TENSORLET_INTERPRETED_COMPONENTS_DIR` pointing at the output; it is ignored
/// otherwise because it needs those toolchains.
#[tokio::test]
#[ignore = "needs componentize-py and componentize-js; run by .ci/test"]
async fn examples_built_with_componentize_py_and_js_serve_fresh_or_reused() {
    let dir = std::env::var("TENSORLET_INTERPRETED_COMPONENTS_DIR").expect(
        "TENSORLET_INTERPRETED_COMPONENTS_DIR names the output of components/build-interpreted",
    );
    let node = TestNode::start();
    for language in ["py", "js"] {
        let component = format!("{dir}/hello-{language}.wasm");
        let (fresh, reused) = (
            format!("hello-{language}"),
            format!("hello-{language}-reused"),
        );
        node.deploy_ok(&fresh, &component, "").await;
        node.deploy_ok(&reused, &component, "requests_per_instance=100")
            .await;
        for app in [&fresh, &reused] {
            for name in ["edge", "wasm", "again"] {
                assert_eq!(
                    node.get(&format!("/apps/{app}/?name={name}")).await,
                    (200, format!("Hello, {name}!\n")),
                    "{app}"
                );
            }
        }
        let reuses = |app: String| {
            let node = &node;
            async move {
                node.admin_json(&format!("/v1/admin/apps/{app}")).await["app"]["revisions"][0]
                    ["stats"]["instance_reuses"]
                    .clone()
            }
        };
        assert_eq!(reuses(fresh).await, 0);
        assert_eq!(
            reuses(reused).await,
            2,
            "hello-{language} reused its instance"
        );
    }
    node.assert_healthy().await;
}

/// The examples also build with `cargo component build` (wasm32-wasip1 + the preview1
/// adapter). `.ci/test` builds them that way and runs this test with
/// `TENSORLET_CARGO_COMPONENT_DIR` pointing at the output; it is ignored otherwise because it
/// needs cargo-component installed.
#[tokio::test]
#[ignore = "needs cargo-component; run by .ci/test"]
async fn examples_built_with_cargo_component_deploy_and_serve() {
    let dir = std::env::var("TENSORLET_CARGO_COMPONENT_DIR")
        .expect("TENSORLET_CARGO_COMPONENT_DIR names the cargo-component output");
    let node = TestNode::start();
    for (app, file) in [
        ("hello", "hello.wasm"),
        ("classify", "classify.wasm"),
        ("kv-counter", "kv_counter.wasm"),
    ] {
        node.deploy_ok(app, &format!("{dir}/{file}"), "models=text-orientation")
            .await;
    }
    assert_eq!(
        node.get("/apps/hello/?name=component").await,
        (200, "Hello, component!\n".to_string())
    );
    let response = node.post("/apps/kv-counter/count").await;
    assert_eq!(
        response.json::<serde_json::Value>().await.unwrap()["count"],
        1
    );
    let (status, body) = node.get("/apps/classify/").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (405, "method_not_allowed")
    );
}

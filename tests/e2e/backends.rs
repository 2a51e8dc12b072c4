//! Several backends for one encoding: the same ONNX model on tract, ONNX Runtime and OpenVINO
//! (both found in their pip packages) gives the native answer; a missing library makes its
//! backend unavailable with the reason; `gpu` on a node without one fails clearly or falls
//! back to the CPU only when the configuration says so; a model whose backend went away is
//! listed as not loaded.

use crate::nn::{classify, native_scores, scores_of, test_pixels};
use crate::support::{artifacts, config_file, error_code, TestNode};

fn add_text_orientation(node: &TestNode, name: &str, extra: &[&str]) -> std::process::Output {
    let model = artifacts::text_orientation_model();
    let mut args = vec!["model", "add", name, model.to_str().unwrap()];
    args.extend_from_slice(extra);
    node.cli(&args)
}

#[tokio::test]
async fn one_onnx_model_gives_the_native_answer_on_tract_onnxruntime_and_openvino() {
    let node = TestNode::start();
    let (status, body) = node.get("/v1/admin/backends").await;
    assert_eq!(status, 401, "{body}");
    let backends = node.cli_ok(&["status"]);
    let status: serde_json::Value = serde_json::from_str(&backends).unwrap();
    let listed = |name: &str| {
        status["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {status}"))
            .clone()
    };
    for backend in ["tract", "onnxruntime", "openvino", "llama.cpp", "candle"] {
        let listed = listed(backend);
        assert_eq!(listed["available"], true, "{listed}");
        assert_eq!(listed["targets"], serde_json::json!(["cpu"]), "{listed}");
    }
    let version = |name: &str| {
        listed(name)["version"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(version("onnxruntime"), "1.22.1");
    assert!(version("openvino").starts_with("2025.2"), "{status}");
    let pixels = test_pixels();
    let expected = native_scores(&pixels);
    let names = ["on-tract", "on-onnxruntime", "on-openvino"];
    for name in names {
        let backend = name.trim_start_matches("on-");
        let output = add_text_orientation(&node, name, &["--backend", backend]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains(&format!("onnx on {backend}, cpu")),
            "{}",
            String::from_utf8_lossy(&output.stdout)
        );
    }
    node.deploy_ok(
        "classify",
        artifacts::CLASSIFY,
        &format!("models={}", names.join(",")),
    )
    .await;
    for name in names {
        let scores = scores_of(&classify(&node, &format!("?model={name}"), &pixels).await);
        for (got, want) in scores.iter().zip(&expected) {
            assert!(
                (got - want).abs() < 1e-4,
                "{name}: {scores:?} vs native tract {expected:?}"
            );
        }
    }
    let output = add_text_orientation(&node, "nowhere", &["--backend", "tensorrt"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("400") && stderr.contains("tract, onnxruntime, openvino"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_backend_without_its_library_is_unavailable_with_the_reason() {
    let config = config_file("[nn]\nonnxruntime_library = \"/nonexistent/libonnxruntime.so.1\"\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    let backends = node.admin_json("/v1/admin/backends").await;
    let onnxruntime = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "onnxruntime")
        .unwrap();
    assert_eq!(onnxruntime["available"], false, "{onnxruntime}");
    assert!(
        onnxruntime["reason"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/libonnxruntime.so.1"),
        "{onnxruntime}"
    );
    let output = add_text_orientation(&node, "m", &["--backend", "onnxruntime"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("400") && stderr.contains("does not exist"),
        "{stderr}"
    );
    // Without a named backend the node picks one that works.
    let output = add_text_orientation(&node, "m", &[]);
    assert!(output.status.success());
    assert!(String::from_utf8_lossy(&output.stdout).contains("on tract"));
    node.assert_healthy().await;
}

#[tokio::test]
async fn gpu_models_fail_clearly_unless_the_node_allows_a_cpu_fallback() {
    let node = TestNode::start();
    let output = add_text_orientation(&node, "m", &["--target", "gpu"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    for expected in [
        "400",
        "on gpu",
        "tract: runs on the CPU only",
        "onnxruntime:",
        "gpu_fallback",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
    let response = node
        .client
        .put(node.at("/v1/admin/models/m?target=quantum"))
        .bearer_auth(&node.token)
        .body(std::fs::read(artifacts::text_orientation_model()).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(
        error_code(&response.text().await.unwrap()),
        "invalid_target"
    );
    assert!(!node
        .cli_ok(&["models"])
        .lines()
        .any(|l| l.starts_with("m ")));

    let config = config_file("[nn]\ngpu_fallback = \"cpu\"\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    let output = add_text_orientation(&node, "m", &["--target", "gpu"]);
    assert!(output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("warning: gpu requested") && stderr.contains("running on the CPU"),
        "{stderr}"
    );
    let record = node.admin_json("/v1/admin/models/m").await;
    assert_eq!(record["model"]["target"], "cpu", "{record}");
    assert!(record["model"]["fallback"]
        .as_str()
        .unwrap()
        .contains("gpu requested"));
}

#[tokio::test]
async fn a_model_whose_backend_went_away_is_listed_as_not_loaded() {
    let mut node = TestNode::start();
    let output = add_text_orientation(&node, "text-orientation", &["--backend", "openvino"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    node.deploy_ok("classify", artifacts::CLASSIFY, "models=text-orientation")
        .await;
    node.terminate();
    let data = node.take_data_dir();
    let config = config_file("[nn]\nopenvino_library = \"/nonexistent/libopenvino_c.so\"\n");
    let node = TestNode::start_in(data.path(), &["--config", config.path().to_str().unwrap()]);
    let models = node.cli_ok(&["models"]);
    let line = models
        .lines()
        .find(|l| l.starts_with("text-orientation"))
        .unwrap_or_else(|| panic!("{models}"));
    assert!(
        line.contains("no: the openvino backend is unavailable"),
        "{line}"
    );
    let response = node
        .post_json(
            "/apps/classify/",
            &serde_json::json!({ "pixels": test_pixels() }),
        )
        .await;
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(
        status.is_server_error() && body.contains("did not load"),
        "{status} {body}"
    );
    node.assert_healthy().await;
}

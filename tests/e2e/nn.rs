//! Models through wasi-nn: registering models, the classify example against the same model
//! run natively, not-found for unknown models, and inference off the async reactor.

use crate::support::{artifacts, error_code, TestNode};
use std::time::{Duration, Instant};
use tract_onnx::prelude::*;

/// A deterministic 48x192 RGB test image.
pub(crate) fn test_pixels() -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    (0..48 * 192 * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect()
}

/// The classifier run natively with tract on the same input the component builds.
pub(crate) fn native_scores(pixels: &[u8]) -> Vec<f32> {
    let plan = tract_onnx::onnx()
        .model_for_path(artifacts::text_orientation_model())
        .unwrap()
        .with_input_fact(0, f32::fact([1, 3, 48, 192]).into())
        .unwrap()
        .into_typed()
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let mut input = vec![0f32; 3 * 48 * 192];
    for (i, rgb) in pixels.chunks_exact(3).enumerate() {
        for (channel, value) in rgb.iter().enumerate() {
            input[channel * 48 * 192 + i] = (f32::from(*value) / 255.0 - 0.5) / 0.5;
        }
    }
    let tensor = tract_onnx::prelude::Tensor::from_shape(&[1, 3, 48, 192], &input).unwrap();
    let outputs = plan.run(tvec![tensor.into()]).unwrap();
    outputs[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

/// The `classify` app's answer for `pixels`; `query` may pick the model (`?model=NAME`).
pub(crate) async fn classify(node: &TestNode, query: &str, pixels: &[u8]) -> serde_json::Value {
    let response = node
        .post_json(
            &format!("/apps/classify/{query}"),
            &serde_json::json!({ "pixels": pixels }),
        )
        .await;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{answer}");
    answer
}

/// The class scores in a `classify` answer.
pub(crate) fn scores_of(answer: &serde_json::Value) -> Vec<f32> {
    answer["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_f64().unwrap() as f32)
        .collect()
}

#[tokio::test]
async fn classify_answers_what_the_model_computes_natively() {
    let node = TestNode::start();
    node.add_text_orientation_model();
    let models = node.cli_ok(&["models"]);
    assert!(
        models.lines().any(|l| l.starts_with("text-orientation")
            && l.contains("onnx")
            && l.contains("tract")),
        "{models}"
    );
    node.deploy_ok("classify", artifacts::CLASSIFY, "models=text-orientation")
        .await;

    let pixels = test_pixels();
    let answer = classify(&node, "", &pixels).await;
    let scores = scores_of(&answer);
    let expected = native_scores(&pixels);
    assert_eq!(scores.len(), 2);
    for (got, want) in scores.iter().zip(&expected) {
        assert!(
            (got - want).abs() < 1e-6,
            "component {scores:?} vs native {expected:?}"
        );
    }
    let class = if expected[0] >= expected[1] { 0 } else { 1 };
    assert_eq!(answer["class"], class);
    assert_eq!(answer["label"], ["0", "180"][class]);

    let (status, body) = node.get("/apps/classify/").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (405, "method_not_allowed")
    );
    let response = node
        .client
        .post(node.at("/apps/classify/"))
        .json(&serde_json::json!({ "pixels": [1, 2, 3] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn models_that_are_not_onnx_are_refused_and_unknown_models_are_not_found() {
    let node = TestNode::start();
    let bogus = node.data_dir.join("bogus.onnx");
    std::fs::write(&bogus, b"definitely not a protobuf model").unwrap();
    let output = node.cli(&["model", "add", "bogus", bogus.to_str().unwrap()]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("400") && stderr.contains("not a valid ONNX model"),
        "{stderr}"
    );
    assert_eq!(
        node.cli_ok(&["models"]).lines().count(),
        1,
        "a refused model was registered"
    );
    assert_eq!(
        std::fs::read_dir(node.data_dir.join("blobs"))
            .unwrap()
            .count(),
        0,
        "a refused model file was kept"
    );

    node.deploy_ok("misbehave", artifacts::MISBEHAVE, "models=no-such-model")
        .await;
    let (status, body) = node.get("/apps/misbehave/nn-missing").await;
    assert_eq!(status, 200);
    let reported: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        reported["code"].as_str().unwrap().contains("NotFound"),
        "{body}"
    );
    assert!(
        reported["message"]
            .as_str()
            .unwrap()
            .contains("no-such-model"),
        "{body}"
    );
}

#[tokio::test]
async fn a_long_inference_does_not_stall_the_node_or_other_apps() {
    let node = TestNode::start();
    node.add_text_orientation_model();
    node.deploy_ok(
        "misbehave",
        artifacts::MISBEHAVE,
        "timeout_secs=120&models=text-orientation",
    )
    .await;
    node.deploy_ok("hello", artifacts::HELLO, "").await;

    let long = {
        let (client, url) = (
            node.client.clone(),
            node.at("/apps/misbehave/infer?iterations=1000"),
        );
        tokio::spawn(async move {
            let started = Instant::now();
            let status = client.get(url).send().await.unwrap().status().as_u16();
            (status, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut answered = 0;
    // The node and another app keep answering while the inference runs: several answers come
    // back before it ends (counted only while it still runs, so speed does not matter).
    while !long.is_finished() {
        node.assert_healthy().await;
        assert_eq!(node.get("/apps/hello/").await.0, 200);
        if !long.is_finished() {
            answered += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, took) = long.await.unwrap();
    assert_eq!(status, 200);
    assert!(
        answered >= 3,
        "the inference ({took:?}) was too short to show anything; raise iterations"
    );
}

#[tokio::test]
async fn guests_may_load_small_models_from_bytes_on_the_cpu_only() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), "[nn]\nmax_guest_model_bytes = 600000\n").unwrap();
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("misbehave", artifacts::MISBEHAVE, "").await;
    let model = std::fs::read(artifacts::text_orientation_model()).unwrap();
    assert!(model.len() < 600_000);

    let load = |query: &'static str, body: Vec<u8>| {
        let request = node
            .client
            .post(node.at(&format!("/apps/misbehave/nn-load{query}")))
            .body(body);
        async move {
            request
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let loaded = load("", model.clone()).await;
    assert_eq!(loaded["outputs"], 1, "{loaded}");

    let gpu = load("?target=gpu", model.clone()).await;
    assert!(
        gpu["code"]
            .as_str()
            .unwrap()
            .contains("UnsupportedOperation"),
        "{gpu}"
    );
    assert!(gpu["message"].as_str().unwrap().contains("CPU"), "{gpu}");

    let mut oversized = model;
    oversized.resize(600_001, 0);
    let refused = load("", oversized).await;
    assert!(
        refused["code"].as_str().unwrap().contains("TooLarge"),
        "{refused}"
    );
}

#[tokio::test]
async fn apps_load_only_the_models_they_declared() {
    let node = TestNode::start();
    node.add_text_orientation_model();
    node.deploy_ok("undeclared", artifacts::MISBEHAVE, "").await;
    let (status, body) = node
        .get("/apps/undeclared/infer?model=text-orientation")
        .await;
    assert_eq!(status, 500);
    assert!(
        body.contains("Security") && body.contains("--model text-orientation"),
        "{body}"
    );

    let deployed = node.cli_ok(&[
        "deploy",
        "--public",
        "declared",
        artifacts::MISBEHAVE,
        "--model",
        "text-orientation",
    ]);
    assert!(deployed.contains("deployed declared"), "{deployed}");
    assert_eq!(
        node.get("/apps/declared/infer?model=text-orientation")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn models_can_come_from_a_url_or_a_pypi_package_with_their_digest_checked() {
    use sha2::Digest;
    let node = TestNode::start();
    let model = artifacts::text_orientation_model();
    let digest = hex::encode(sha2::Sha256::digest(std::fs::read(&model).unwrap()));

    // A plain HTTP server on loopback serving the models folder.
    let mut server = std::process::Command::new("python3")
        .args([
            "-m",
            "http.server",
            "0",
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(model.parent().unwrap())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let port = line
        .split(" port ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let url = format!(
        "http://127.0.0.1:{port}/{}",
        model.file_name().unwrap().to_str().unwrap()
    );

    let refused = node.cli(&[
        "model",
        "add",
        "from-url",
        &url,
        "--sha256",
        &"0".repeat(64),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not the expected"));
    let added = node.cli_ok(&["model", "add", "from-url", &url, "--sha256", &digest]);
    assert!(added.contains(&digest[..12]), "{added}");
    let _ = server.kill();
    let _ = server.wait();

    let member = "--member=rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx";
    let added = node.cli_ok(&[
        "model",
        "add",
        "from-pypi",
        "pypi:rapidocr-onnxruntime==1.4.4",
        member,
        "--sha256",
        &digest,
    ]);
    assert!(added.contains(&digest[..12]), "{added}");
    let models = node.cli_ok(&["models"]);
    assert!(
        models.contains("from-url") && models.contains("from-pypi"),
        "{models}"
    );
}

#[tokio::test]
async fn a_wheel_whose_members_would_leave_the_model_folder_is_refused() {
    let node = TestNode::start();
    // A wheel (a zip) with a member that climbs out of the folder being extracted, offered to
    // pip from a local folder instead of an index.
    let wheels = tempfile::tempdir().unwrap();
    let outside = node.data_dir.join("escaped.txt");
    let made = std::process::Command::new("python3")
        .args([
            "-c",
            r#"import sys, zipfile
with zipfile.ZipFile(sys.argv[1] + "/slippy-1.0-py3-none-any.whl", "w") as wheel:
    wheel.writestr("slippy/model/config.json", "{}")
    wheel.writestr("slippy/model/../../../../../../../../" + sys.argv[2], "planted")
    wheel.writestr("slippy-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: slippy\nVersion: 1.0\n")
    wheel.writestr("slippy-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    wheel.writestr("slippy-1.0.dist-info/RECORD", "")
"#,
            wheels.path().to_str().unwrap(),
            outside.to_str().unwrap().trim_start_matches('/'),
        ])
        .status()
        .unwrap();
    assert!(made.success());
    let refused = node.cli_with_env(
        &[
            "model",
            "add",
            "slippy",
            "pypi:slippy==1.0",
            "--member",
            "slippy/model/",
        ],
        &[
            ("PIP_NO_INDEX", "1"),
            ("PIP_FIND_LINKS", wheels.path().to_str().unwrap()),
        ],
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("outside the model folder"), "{stderr}");
    assert!(!outside.exists(), "the member was written outside");
    assert!(node.cli_ok(&["models"]).lines().count() == 1);
}

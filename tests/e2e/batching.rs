//! Dynamic batching through a component on a real node: concurrent `classify` requests on a
//! model added with `--max-batch-size` are joined into batches (admin field `batches`, the
//! `tensorlet models` column), and every answer is, to the last bit, what the same model
//! registered unbatched answers. On tract, whose kernels for a batch may round otherwise, the
//! node may turn batching off (with the reason); the answers are exact either way.

use crate::nn::{classify, scores_of, test_pixels};
use crate::support::{artifacts, TestNode};

/// Requests sent at once, each with its own image.
const CALLERS: usize = 8;

#[tokio::test]
async fn concurrent_requests_are_batched_and_answer_exactly_what_unbatched_runs_do() {
    let node = TestNode::start();
    let model = artifacts::text_orientation_model();
    let model = model.to_str().unwrap();
    let mut names = Vec::new();
    for backend in ["onnxruntime", "tract"] {
        let (alone, batched) = (format!("alone-{backend}"), format!("batched-{backend}"));
        node.cli_ok(&["model", "add", &alone, model, "--backend", backend]);
        let added = node.cli_ok(&[
            "model",
            "add",
            &batched,
            model,
            "--backend",
            backend,
            "--max-batch-size",
            "8",
            "--max-queue-delay-us",
            "50000",
        ]);
        assert!(added.contains(&batched), "{added}");
        names.extend([alone, batched]);
    }
    node.deploy_ok(
        "classify",
        artifacts::CLASSIFY,
        &format!("models={}", names.join(",")),
    )
    .await;
    let base = test_pixels();
    let images: Vec<Vec<u8>> = (0..CALLERS)
        .map(|caller| {
            base.iter()
                .enumerate()
                .map(|(i, p)| p.wrapping_add((caller * 37 + i % 7) as u8))
                .collect()
        })
        .collect();
    for backend in ["onnxruntime", "tract"] {
        let mut unbatched = Vec::new();
        for image in &images {
            let answer = classify(&node, &format!("?model=alone-{backend}"), image).await;
            unbatched.push(scores_of(&answer));
        }
        // Rounds of requests at once: the first batch of a shape is checked against unbatched
        // runs by the node, the later ones are not; all must answer the same.
        for round in 0..3 {
            let query = format!("?model=batched-{backend}");
            let answers = futures_util::future::join_all(
                images.iter().map(|image| classify(&node, &query, image)),
            )
            .await;
            for (caller, answer) in answers.iter().enumerate() {
                assert_eq!(
                    scores_of(answer),
                    unbatched[caller],
                    "{backend}, round {round}, caller {caller}: {answer}"
                );
            }
        }
    }
    let models = node.admin_json("/v1/admin/models").await;
    let activity = |name: &str| {
        models["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {models}"))["batches"]
            .clone()
    };
    let onnxruntime = activity("batched-onnxruntime");
    assert_eq!(onnxruntime["max_batch_size"], 8, "{onnxruntime}");
    assert_eq!(onnxruntime["max_queue_delay_us"], 50000, "{onnxruntime}");
    assert!(onnxruntime.get("disabled").is_none(), "{onnxruntime}");
    let (batches, batched_calls) = (
        onnxruntime["batches"].as_u64().unwrap(),
        onnxruntime["batched_calls"].as_u64().unwrap(),
    );
    assert!(
        batches >= 1 && batched_calls >= 2 * batches,
        "{onnxruntime}"
    );
    assert!(activity("alone-onnxruntime").is_null(), "{models}");
    let tract = activity("batched-tract");
    if let Some(reason) = tract.get("disabled") {
        assert!(
            reason
                .as_str()
                .unwrap()
                .contains("other outputs than unbatched runs"),
            "{tract}"
        );
    }
    let listing = node.cli_ok(&["models"]);
    let line = listing
        .lines()
        .find(|l| l.starts_with("batched-onnxruntime"))
        .unwrap_or_else(|| panic!("{listing}"));
    assert!(line.contains("≤8 in 50000µs"), "{listing}");
}

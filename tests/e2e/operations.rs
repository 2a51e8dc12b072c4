//! Operating a node, against a real daemon: Prometheus metrics read by the official Python
//! client's parser, request ids, per-app logs, metering, async jobs that survive SIGKILL.

use crate::support::{artifacts, error_code, TestNode};
use serde_json::Value;
use std::io::Write;
use std::process::{Command, Stdio};

/// Scrapes `/metrics` with the admin token and parses it with `prometheus_client`'s parser;
/// returns every sample.
async fn scrape(node: &TestNode) -> Vec<Value> {
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
    let mut parser = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/e2e/parse_metrics.py"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    parser
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = parser.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the Prometheus parser refused the exposition:\n{}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice::<Vec<Value>>(&output.stdout).unwrap()
}

/// The value of the sample `name` whose labels include `labels`.
fn sample(samples: &[Value], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

#[tokio::test]
async fn metrics_parse_with_prometheus_own_parser_and_count_what_happened() {
    let node = TestNode::start();
    let (status, body) = node.get("/metrics").await;
    assert_eq!(status, 401, "metrics need the admin token: {body}");
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    for _ in 0..5 {
        assert_eq!(node.get("/apps/hello/").await.0, 200);
    }
    assert_eq!(node.get("/apps/nobody/").await.0, 404);

    let samples = scrape(&node).await;
    let hello = [("app", "hello"), ("revision", "1")];
    assert_eq!(
        sample(
            &samples,
            "tensorlet_requests_total",
            &[("app", "hello"), ("revision", "1"), ("class", "2xx")]
        ),
        Some(5.0)
    );
    assert_eq!(
        sample(&samples, "tensorlet_request_duration_seconds_count", &hello),
        Some(5.0)
    );
    assert_eq!(
        sample(&samples, "tensorlet_warm_starts_total", &hello),
        Some(5.0)
    );
    assert_eq!(
        sample(&samples, "tensorlet_instances_running", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&samples, "tensorlet_requests_queued", &[]),
        Some(0.0)
    );
    assert!(
        sample(&samples, "tensorlet_store_flush_seconds_count", &[]).unwrap() >= 1.0,
        "the deploy was flushed"
    );
    assert!(
        !samples
            .iter()
            .any(|s| s["labels"]["app"].as_str() == Some("nobody")),
        "an unknown app name is never a label"
    );

    node.cli_ok(&["remove", "hello"]);
    let samples = scrape(&node).await;
    assert!(
        !samples
            .iter()
            .any(|s| s["labels"]["app"].as_str() == Some("hello")),
        "a removed app's series are gone"
    );
}

#[tokio::test]
async fn every_response_carries_a_request_id_the_client_may_choose() {
    let node = TestNode::start();
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    let response = node
        .client
        .get(node.at("/apps/hello/"))
        .send()
        .await
        .unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(id.len(), 32, "{id}");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));

    for (sent, kept) in [("trace-42.a:b", true), ("not valid!", false)] {
        let response = node
            .client
            .get(node.at("/apps/hello/"))
            .header("x-request-id", sent)
            .send()
            .await
            .unwrap();
        let echoed = response.headers()["x-request-id"].to_str().unwrap();
        assert_eq!(echoed == sent, kept, "{sent:?} → {echoed:?}");
    }
    // Errors of the node's carry one too.
    let response = node
        .client
        .get(node.at("/apps/nobody/"))
        .send()
        .await
        .unwrap();
    assert!(response.headers().contains_key("x-request-id"));
    assert_eq!(error_code(&response.text().await.unwrap()), "app_not_found");
}

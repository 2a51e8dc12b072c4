//! Operating a node, against a real daemon: Prometheus metrics read by the official Python
//! client's parser, request ids, per-app logs, metering, async jobs that survive SIGKILL.

use crate::support::{artifacts, error_code, http_sink, python, sample, scrape, TestNode};
use serde_json::Value;
use std::process::Stdio;

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

/// Polls `check` every 100 ms until it gives a value, for at most `seconds`.
async fn eventually<T, F, Fut>(seconds: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {seconds} s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The app's log lines through the admin API.
async fn log_lines(node: &TestNode, app: &str) -> Vec<Value> {
    node.admin_json(&format!("/v1/admin/apps/{app}/logs?limit=1000"))
        .await["lines"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn an_apps_stdout_stderr_and_wasi_logging_lines_are_kept_with_their_request_in_a_bounded_ring(
) {
    let config = crate::support::config_file("[telemetry]\nlog_lines_per_app = 6\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("noisy", artifacts::MISBEHAVE, "").await;
    let response = node
        .client
        .get(node.at("/apps/noisy/log?text=hello%20%1B%5B2J"))
        .header("x-request-id", "req-logs-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    let lines = eventually(10, "three log lines", || async {
        let lines = log_lines(&node, "noisy").await;
        (lines.len() == 3).then_some(lines)
    })
    .await;
    let seen: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| {
            assert_eq!(l["request_id"], "req-logs-1");
            assert_eq!(l["revision"], 1);
            (
                l["source"].as_str().unwrap(),
                l["level"].as_str().unwrap(),
                l["message"].as_str().unwrap(),
            )
        })
        .collect();
    // The escape sequence arrives escaped: a guest cannot drive the operator's terminal.
    assert_eq!(
        seen,
        [
            ("stdout", "info", "hello \\u{1b}[2J"),
            ("stderr", "error", "hello \\u{1b}[2J"),
            ("logging", "warn", "misbehave: hello \\u{1b}[2J"),
        ]
    );
    let printed = node.cli_ok(&["logs", "noisy"]);
    assert_eq!(printed.lines().count(), 3, "{printed}");
    assert!(
        printed.contains("req-logs-1 warn  logging: misbehave: hello"),
        "{printed}"
    );

    // Followed: lines that come later are printed as they come.
    let mut follower = std::process::Command::new(crate::support::BINARY)
        .args(["--data-dir", node.data_dir.to_str().unwrap()])
        .args(["logs", "noisy", "--follow", "-n", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follower.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = sender.send(line);
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(node.get("/apps/noisy/log?text=later").await.0, 200);
    let mut followed = Vec::new();
    while followed.len() < 3 {
        match receiver.recv_timeout(std::time::Duration::from_secs(10)) {
            Ok(line) => followed.push(line),
            Err(_) => panic!("the follower printed only {followed:?}"),
        }
    }
    assert!(followed.iter().all(|l| l.contains("later")), "{followed:?}");
    follower.kill().unwrap();
    follower.wait().unwrap();

    // The ring keeps the newest 6 lines.
    assert_eq!(node.get("/apps/noisy/log?text=last").await.0, 200);
    let lines = eventually(10, "the ring", || async {
        let lines = log_lines(&node, "noisy").await;
        lines
            .last()
            .is_some_and(|l| l["message"].as_str().unwrap().ends_with("last"))
            .then_some(lines)
    })
    .await;
    assert_eq!(lines.len(), 6);
    assert!(lines[0]["message"].as_str().unwrap().ends_with("later"));

    let (status, body) = node.get("/v1/admin/apps/nobody/logs").await;
    assert_eq!(status, 401, "{body}");
    let missing = node
        .client
        .get(node.at("/v1/admin/apps/nobody/logs"))
        .bearer_auth(&node.token)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

/// The usage totals of `app` over the last day.
async fn usage_of(node: &TestNode, app: &str) -> Value {
    node.admin_json(&format!("/v1/admin/usage?app={app}")).await["totals"][app].clone()
}

#[tokio::test]
async fn usage_is_metered_per_app_and_survives_a_crash() {
    let config = crate::support::config_file("[telemetry]\nusage_persist_secs = 1\n");
    let config_path = config.path().to_str().unwrap().to_string();
    let mut node = TestNode::start_with(&["--config", &config_path]);
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    node.deploy_ok("spinner", artifacts::MISBEHAVE, "").await;
    node.add_text_orientation_model();
    node.deploy_ok("classify", artifacts::CLASSIFY, "models=text-orientation")
        .await;
    for _ in 0..3 {
        assert_eq!(node.get("/apps/hello/").await.0, 200);
    }
    for _ in 0..2 {
        assert_eq!(node.get("/apps/spinner/spin?ms=150").await.0, 200);
    }
    assert_eq!(node.get("/apps/spinner/trap").await.0, 500);
    crate::nn::classify(&node, "", &crate::nn::test_pixels()).await;

    let hello = usage_of(&node, "hello").await;
    assert_eq!(hello["requests"], 3);
    assert!(hello["bytes_out"].as_u64().unwrap() > 0, "{hello}");
    let spinner = usage_of(&node, "spinner").await;
    assert_eq!(spinner["requests"], 3);
    assert_eq!(spinner["errors_server"], 1);
    assert!(
        spinner["cpu_us"].as_u64().unwrap() >= 200_000,
        "two 150 ms spins are metered as CPU: {spinner}"
    );
    let classify = usage_of(&node, "classify").await;
    assert!(
        classify["inference_us"]["text-orientation"]
            .as_u64()
            .unwrap()
            > 0,
        "{classify}"
    );
    assert!(
        classify["bytes_in"].as_u64().unwrap() > 10_000,
        "{classify}"
    );

    let table = node.cli_ok(&["usage"]);
    for app in ["hello", "spinner", "classify"] {
        assert!(table.lines().any(|l| l.starts_with(app)), "{table}");
    }
    let (status, body) = node.get("/v1/admin/usage?since=forever").await;
    assert_eq!(status, 401, "{body}");
    let bad = node
        .client
        .get(node.at("/v1/admin/usage?since=forever"))
        .bearer_auth(&node.token)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // Persisted every second: a crash after that loses nothing.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    node.kill();
    let data = node.take_data_dir();
    let node = TestNode::start_in(data.path(), &["--config", &config_path]);
    assert_eq!(usage_of(&node, "hello").await["requests"], 3);
    assert_eq!(usage_of(&node, "spinner").await["errors_server"], 1);
}

/// A job's status.
async fn job_status(node: &TestNode, id: &str) -> Value {
    node.client
        .get(node.at(&format!("/jobs/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until job `id` is `state`.
async fn job_reaches(node: &TestNode, id: &str, state: &str, seconds: u64) -> Value {
    eventually(seconds, &format!("job {id} {state}"), || async {
        let status = job_status(node, id).await;
        (status["state"] == state).then_some(status)
    })
    .await
}

/// Posts `path` for async invocation with extra headers; the response.
async fn post_async(node: &TestNode, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = node.client.post(node.at(path)).body("payload");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

#[tokio::test]
async fn async_jobs_are_retried_report_to_their_callback_and_end_in_dead_letters() {
    let node = TestNode::start();
    let (callback, mut callbacks) = http_sink(b"").await;
    let (_dir, manifest) = TestNode::manifest(&format!(
        "[app]\nname = \"worker\"\ncomponent = {:?}\nbuckets = [\"flaky\", \"orders\"]\n[outbound]\nallowed_hosts = [{callback:?}]\n",
        artifacts::MISBEHAVE
    ));
    node.cli_ok(&["deploy", "--public", "-f", manifest.to_str().unwrap()]);

    // Fails once, then succeeds: retried after a backoff, completed on the second attempt.
    let response = post_async(
        &node,
        "/async/worker/flaky?key=a&fail=1",
        &[("tensorlet-callback", &format!("{callback}/done"))],
    )
    .await;
    assert_eq!(response.status(), 202);
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let accepted: Value = response.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    assert_eq!(location, format!("/jobs/{id}"));
    let done = job_reaches(&node, &id, "completed", 30).await;
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["result"]["status"], 200);
    let (status, body) = node.get(&format!("/jobs/{id}/result")).await;
    assert_eq!((status, body.as_str()), (200, "ok after 2 calls"));
    let (head, body) = tokio::time::timeout(std::time::Duration::from_secs(10), callbacks.recv())
        .await
        .expect("the callback was called")
        .unwrap();
    assert!(head.starts_with("POST /done "), "{head}");
    let reported: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reported["id"], id.as_str());
    assert_eq!(reported["state"], "completed");

    // The same idempotency key gives the same job.
    let key = [("idempotency-key", "order-17")];
    let first: Value = post_async(&node, "/async/worker/flaky?key=i", &key)
        .await
        .json()
        .await
        .unwrap();
    let again: Value = post_async(&node, "/async/worker/flaky?key=i", &key)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["id"], again["id"]);
    assert_eq!(again["existing"], true);

    // Never succeeds: dead after its attempts, then retried by the operator, then purged.
    let response = post_async(
        &node,
        "/async/worker/flaky?key=b&fail=1000",
        &[("tensorlet-max-attempts", "2")],
    )
    .await;
    let id: String = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .into();
    let dead = job_reaches(&node, &id, "dead", 30).await;
    assert_eq!(dead["attempts"], 2);
    assert!(
        dead["last_error"].as_str().unwrap().contains("503"),
        "{dead}"
    );
    let (status, body) = node.get(&format!("/jobs/{id}/result")).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(error_code(&body), "job_not_completed");
    let letters = node.admin_json("/v1/admin/apps/worker/dead-letters").await;
    assert_eq!(letters["dead_letters"][0]["id"], id.as_str());
    let retried = node
        .client
        .post(node.at(&format!("/v1/admin/apps/worker/dead-letters/{id}/retry")))
        .bearer_auth(&node.token)
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), 200);
    let dead_again = job_reaches(&node, &id, "dead", 30).await;
    assert_eq!(dead_again["attempts"], 2, "attempts start again");
    let purged: Value = node
        .client
        .delete(node.at("/v1/admin/apps/worker/dead-letters"))
        .bearer_auth(&node.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 1);
    assert_eq!(node.get(&format!("/jobs/{id}")).await.0, 404);

    let samples = scrape(&node).await;
    assert_eq!(
        sample(
            &samples,
            "tensorlet_job_attempts_total",
            &[("app", "worker"), ("outcome", "retried")]
        ),
        Some(3.0),
        "one retry of the first job and one of each run of the dead one"
    );
    assert_eq!(
        sample(
            &samples,
            "tensorlet_job_attempts_total",
            &[("app", "worker"), ("outcome", "dead")]
        ),
        Some(2.0)
    );

    // Bad input changes nothing.
    for (path, headers, status) in [
        ("/async/nobody/x", vec![], 404),
        (
            "/async/worker/x",
            vec![("tensorlet-callback", "http://elsewhere.example/")],
            400,
        ),
        (
            "/async/worker/x",
            vec![("tensorlet-max-attempts", "0")],
            400,
        ),
        (
            "/async/worker/x",
            vec![("tensorlet-max-attempts", "lots")],
            400,
        ),
    ] {
        let response = post_async(&node, path, &headers).await;
        assert_eq!(response.status(), status, "{path} {headers:?}");
    }
    assert_eq!(node.get("/jobs/not-a-job").await.0, 404);
    assert_eq!(
        node.get("/jobs/00000000000000000000000000000000").await.0,
        404
    );
}

#[tokio::test]
async fn accepted_jobs_survive_sigkill_and_each_completes_once() {
    let _heavy = crate::support::heavy().await;
    let mut node = TestNode::start();
    node.deploy_ok("slow", artifacts::MISBEHAVE, "").await;
    let mut ids = Vec::new();
    for _ in 0..10 {
        let response = post_async(&node, "/async/slow/sleep?ms=400", &[]).await;
        assert_eq!(response.status(), 202);
        ids.push(
            response.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    // Killed while the workers are in the middle of the queue.
    eventually(20, "a job running", || async {
        let jobs = node.admin_json("/v1/admin/jobs").await;
        (jobs["total"]["running"].as_u64() > Some(0)).then_some(())
    })
    .await;
    node.kill();
    let data = node.take_data_dir();
    let node = TestNode::start_in(data.path(), &[]);
    for id in &ids {
        let done = job_reaches(&node, id, "completed", 60).await;
        assert_eq!(done["result"]["status"], 200);
        let (status, body) = node.get(&format!("/jobs/{id}/result")).await;
        assert_eq!((status, body.as_str()), (200, "slept"));
    }
    let jobs = node.admin_json("/v1/admin/jobs").await;
    assert_eq!(jobs["total"]["queued"], 0);
    assert_eq!(jobs["total"]["running"], 0);
    assert_eq!(jobs["total"]["dead"], 0);
}

#[tokio::test]
async fn the_admin_api_is_described_by_a_valid_openapi_document() {
    let node = TestNode::start();
    let (status, document) = node.get("/openapi.json").await;
    assert_eq!(status, 200);
    let paths: Vec<String> =
        serde_json::from_slice(&python("validate_openapi.py", &[], document.as_bytes())).unwrap();
    for path in [
        "/v1/admin/status",
        "/v1/admin/apps/{name}",
        "/v1/admin/apps/{name}/traffic",
        "/v1/admin/apps/{name}/rollback",
        "/v1/admin/apps/{name}/logs",
        "/v1/admin/apps/{name}/dead-letters",
        "/v1/admin/usage",
        "/v1/admin/models/{name}",
    ] {
        assert!(paths.iter().any(|p| p == path), "{path} in {paths:?}");
    }
    // Every documented route is served, and needs the token.
    for path in &paths {
        let concrete = path
            .replace("{name}", "nobody")
            .replace("{key}", "k")
            .replace("{id}", "0");
        let (status, _) = node.get(&concrete).await;
        assert!(
            status == 401 || status == 405,
            "{concrete}: {status} without the token"
        );
    }
}

#[tokio::test]
async fn the_dashboard_works_in_a_real_browser() {
    let _heavy = crate::support::heavy().await;
    let node = TestNode::start();
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    node.deploy_ok("hello", artifacts::HELLO, "timeout_secs=7")
        .await;
    node.deploy_ok("worker", artifacts::MISBEHAVE, "").await;
    for _ in 0..3 {
        assert_eq!(node.get("/apps/hello/").await.0, 200);
    }
    assert_eq!(
        node.get("/apps/worker/log?text=dashboard-line").await.0,
        200
    );
    let response = post_async(
        &node,
        "/async/worker/flaky?key=d&fail=100",
        &[("tensorlet-max-attempts", "1")],
    )
    .await;
    let id: String = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .into();
    job_reaches(&node, &id, "dead", 30).await;

    let page = node.client.get(node.at("/dashboard")).send().await.unwrap();
    assert!(page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    let summary = python("dashboard_browser.py", &[&node.url, &node.token], b"");
    let summary: Value = serde_json::from_slice(&summary).unwrap();
    assert_eq!(summary["ok"], true, "{summary}");
    let app = node.admin_json("/v1/admin/apps/hello").await;
    assert_eq!(
        app["app"]["record"]["traffic"][0]["revision"], 1,
        "the dashboard rolled hello back"
    );
}

#[tokio::test]
async fn a_message_sent_to_a_named_queue_triggers_the_app_that_consumes_it() {
    let node = TestNode::start();
    node.deploy_ok("producer", artifacts::MISBEHAVE, "").await;
    let (_dir, manifest) = TestNode::manifest(&format!(
        "[app]\nname = \"consumer\"\ncomponent = {:?}\nbuckets = [\"orders\"]\nconsumes = [\"events\"]\n",
        artifacts::MISBEHAVE
    ));
    node.cli_ok(&["deploy", "--public", "-f", manifest.to_str().unwrap()]);

    let (status, id) = node
        .get("/apps/producer/send?queue=events&text=order%2042")
        .await;
    assert_eq!(status, 200, "{id}");
    job_reaches(&node, &id, "completed", 30).await;
    let (status, received) = node.get("/apps/consumer/kv?keys=received/events").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&received).unwrap()["received/events"],
        "order 42 from producer"
    );

    // A client cannot pass itself off as a producer: the node strips the queue headers.
    let forged = node
        .client
        .post(node.at("/apps/consumer/queues/forged"))
        .header("tensorlet-producer", "billing")
        .body("fake")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 200);
    let (_, received) = node.get("/apps/consumer/kv?keys=received/forged").await;
    assert_eq!(
        serde_json::from_str::<Value>(&received).unwrap()["received/forged"],
        "fake from "
    );

    // No consumer: a clean error for the producer.
    let (status, body) = node.get("/apps/producer/send?queue=nobody&text=x").await;
    assert_eq!(status, 500);
    assert!(
        body.contains("no app of this tenant consumes queue"),
        "{body}"
    );
    // One consumer per queue.
    let (_dir, second) = TestNode::manifest(&format!(
        "[app]\nname = \"second\"\ncomponent = {:?}\nbuckets = [\"orders\"]\nconsumes = [\"events\"]\n",
        artifacts::MISBEHAVE
    ));
    let refused = node.cli(&["deploy", "--public", "-f", second.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already consumed by app"));
}

#[tokio::test]
async fn request_spans_are_exported_to_an_otlp_collector() {
    let (collector, mut exports) = http_sink(b"").await;
    let config = crate::support::config_file(&format!(
        "[telemetry]\notlp_endpoint = {collector:?}\notlp_service_name = \"edge-7\"\n"
    ));
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    let response = node
        .client
        .get(node.at("/apps/hello/"))
        .header("x-request-id", "trace-me-4242")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // Spans are batched and sent every second; look for the request's among them.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (head, body) = tokio::time::timeout_at(deadline, exports.recv())
            .await
            .expect("the request's span was exported")
            .unwrap();
        assert!(head.starts_with("POST /v1/traces "), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/x-protobuf"),
            "{head}"
        );
        let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        if contains(b"trace-me-4242") {
            assert!(contains(b"edge-7"), "the service name is on the spans");
            assert!(contains(b"hello"), "the app span is there");
            break;
        }
    }
    node.assert_healthy().await;
}

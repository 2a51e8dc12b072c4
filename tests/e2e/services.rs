//! Apps as services, against a real daemon: manifests applied idempotently, revisions with
//! traffic splits, tags, sticky keys and rollback under load; config and encrypted secrets
//! through wasi:config; per-revision concurrency and CPU budgets; scale to zero; rate limits
//! and fallbacks; calls between apps and to allowed hosts only; response caching.

use crate::support::{artifacts, config_file, error_code, sample, scrape, TestNode};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn manifest_for(component: &str, rest: &str) -> String {
    format!("[app]\ncomponent = {component:?}\n{rest}")
}

/// Writes a manifest for `component` with `rest` and deploys it; the manifest's folder lives
/// as long as the handle.
fn deploy_manifest(node: &TestNode, component: &str, rest: &str) -> tempfile::TempDir {
    let (dir, path) = TestNode::manifest(&manifest_for(component, rest));
    node.cli_ok(&["deploy", "--public", "-f", path.to_str().unwrap()]);
    dir
}

fn revision_of(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("tensorlet-revision")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn manifests_apply_idempotently_show_their_diff_and_refuse_unknown_keys() {
    let node = TestNode::start();
    let (_dir, path) = TestNode::manifest(&manifest_for(
        artifacts::HELLO,
        "name = \"hello\"\n[limits]\ntimeout_secs = 5\n",
    ));
    let manifest = path.to_str().unwrap();
    let first = node.cli_ok(&["deploy", "--public", "-f", manifest]);
    assert!(first.contains("deployed hello: revision 1"), "{first}");
    let again = node.cli_ok(&["deploy", "--public", "-f", manifest]);
    assert!(again.contains("unchanged (revision 1)"), "{again}");

    std::fs::write(
        &path,
        manifest_for(
            artifacts::HELLO,
            "name = \"hello\"\n[limits]\ntimeout_secs = 6\n",
        ),
    )
    .unwrap();
    let dry = node.cli_ok(&["deploy", "--public", "-f", manifest, "--dry-run"]);
    assert!(dry.contains("revision.timeout_secs: 5 → 6"), "{dry}");
    let app = node.admin_json("/v1/admin/apps/hello").await;
    assert_eq!(
        app["app"]["record"]["latest"], 1,
        "a dry run changed nothing"
    );
    let second = node.cli_ok(&["deploy", "--public", "-f", manifest]);
    assert!(second.contains("deployed hello: revision 2"), "{second}");
    assert!(second.contains("revision.timeout_secs: 5 → 6"), "{second}");

    std::fs::write(
        &path,
        manifest_for(
            artifacts::HELLO,
            "name = \"hello\"\n[limits]\ntimeout = 6\n",
        ),
    )
    .unwrap();
    let refused = node.cli(&["deploy", "--public", "-f", manifest]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains("line 5") && message.contains("timeout"),
        "{message}"
    );
    let app = node.admin_json("/v1/admin/apps/hello").await;
    assert_eq!(app["app"]["record"]["latest"], 2);
}

/// Deploys hello twice (two revisions differing in one config value).
fn two_revisions(node: &TestNode) {
    node.cli_ok(&[
        "deploy",
        "--public",
        "hello",
        artifacts::HELLO,
        "--config",
        "v=1",
    ]);
    node.cli_ok(&[
        "deploy",
        "--public",
        "hello",
        artifacts::HELLO,
        "--config",
        "v=2",
    ]);
}

#[tokio::test]
async fn traffic_splits_by_percent_tags_reach_their_revision_and_sticky_keys_stay() {
    let node = TestNode::start();
    two_revisions(&node);
    node.cli_ok(&[
        "traffic",
        "hello",
        "1=90",
        "2=10",
        "--tag",
        "2=canary",
        "--sticky-header",
        "x-user",
    ]);
    let counts = Arc::new(std::sync::Mutex::new(HashMap::<String, usize>::new()));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (client, url, counts, next) = (
            node.client.clone(),
            node.at("/apps/hello/"),
            counts.clone(),
            next.clone(),
        );
        workers.push(tokio::spawn(async move {
            while next.fetch_add(1, Ordering::Relaxed) < 10_000 {
                let response = client.get(&url).send().await.unwrap();
                assert_eq!(response.status(), 200);
                *counts
                    .lock()
                    .unwrap()
                    .entry(revision_of(&response))
                    .or_default() += 1;
            }
        }));
    }
    for worker in workers {
        worker.await.unwrap();
    }
    let counts = counts.lock().unwrap().clone();
    let canary = counts.get("2").copied().unwrap_or_default();
    assert_eq!(counts.values().sum::<usize>(), 10_000, "{counts:?}");
    // 10 % of 10 000 with a standard deviation of 30: five deviations either side.
    assert!(
        (850..=1150).contains(&canary),
        "revision 2 got {canary} of 10 000: {counts:?}"
    );

    for _ in 0..20 {
        let response = node
            .client
            .get(node.at("/apps/hello@canary/"))
            .send()
            .await
            .unwrap();
        assert_eq!(revision_of(&response), "2");
        let response = node
            .client
            .get(node.at("/apps/hello@1/"))
            .send()
            .await
            .unwrap();
        assert_eq!(revision_of(&response), "1");
    }
    let (status, body) = node.get("/apps/hello@nope/").await;
    assert_eq!((status, error_code(&body).as_str()), (404, "app_not_found"));

    for user in ["ada", "grace", "linus", "barbara"] {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..30 {
            let response = node
                .client
                .get(node.at("/apps/hello/"))
                .header("x-user", user)
                .send()
                .await
                .unwrap();
            seen.insert(revision_of(&response));
        }
        assert_eq!(seen.len(), 1, "{user} moved between revisions: {seen:?}");
    }

    // A new split without --sticky-header keeps the app's sticky header.
    node.cli_ok(&["traffic", "hello", "1=50", "2=50"]);
    let app = node.admin_json("/v1/admin/apps/hello").await;
    assert_eq!(app["app"]["record"]["sticky_header"], "x-user");

    let refused = node.cli(&["traffic", "hello", "1=90", "2=20"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("sum to 110"));
    let refused = node.cli(&["traffic", "hello", "7=100"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("revision 7 does not exist"));
}

#[tokio::test]
async fn rollback_under_load_is_instant_and_loses_no_request() {
    let node = TestNode::start();
    two_revisions(&node);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (client, url) = (node.client.clone(), node.at("/apps/hello/"));
        let (stop, failures, served) = (stop.clone(), failures.clone(), served.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {
                        served.lock().unwrap().push(revision_of(&response))
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Waits (without a deadline of its own: the test harness has one) for `count` answers.
    let answered = |count: usize| {
        let served = served.clone();
        async move {
            while served.lock().unwrap().len() < count {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    answered(200).await;
    let rolled = node.cli_ok(&["rollback", "hello"]);
    assert!(rolled.contains("1: 100%"), "{rolled}");
    let after_rollback = served.lock().unwrap().len();
    answered(after_rollback + 200).await;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    let served = served.lock().unwrap();
    assert!(served[..after_rollback.saturating_sub(16)].contains(&"2".to_string()));
    // Requests that started after the rollback returned all went to revision 1 (a few in
    // flight when it happened may still finish on 2).
    assert!(
        served[after_rollback + 16..].iter().all(|r| r == "1"),
        "revision 2 served after the rollback"
    );
    assert!(served.len() > after_rollback + 16);
}

#[tokio::test]
async fn config_and_secrets_reach_the_component_and_secrets_are_never_shown_nor_stored_plain() {
    let node = TestNode::start();
    node.cli_ok(&[
        "deploy",
        "--public",
        "misbehave",
        artifacts::MISBEHAVE,
        "--config",
        "greeting=hi",
    ]);
    assert_eq!(
        node.get("/apps/misbehave/config?key=greeting").await,
        (200, "hi".into())
    );
    assert_eq!(node.get("/apps/misbehave/config?key=API_KEY").await.0, 404);

    const SECRET: &str = "s3cr3t-value-that-must-not-leak";
    let set = node.cli_with_input(
        &["secret", "set", "misbehave", "API_KEY"],
        format!("{SECRET}\n").as_bytes(),
    );
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert_eq!(
        node.get("/apps/misbehave/config?key=API_KEY").await,
        (200, SECRET.into())
    );
    assert_eq!(
        node.cli_ok(&["secret", "list", "misbehave"]).trim(),
        "API_KEY"
    );

    let described = node
        .admin_json("/v1/admin/apps/misbehave")
        .await
        .to_string();
    assert!(!described.contains(SECRET) && described.contains("API_KEY"));
    assert!(!node.cli_ok(&["apps"]).contains(SECRET));
    let bad = node.cli_with_input(&["secret", "set", "misbehave", "has space"], b"x");
    assert!(!bad.status.success());

    // Nothing the node wrote holds the value in plain text.
    fn files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                files(&path, out);
            } else {
                out.push(path);
            }
        }
    }
    let mut written = Vec::new();
    files(&node.data_dir, &mut written);
    for file in written {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()),
            "{} holds the secret in plain text",
            file.display()
        );
    }
    assert_eq!(
        node.cli_ok(&["secret", "remove", "misbehave", "API_KEY"])
            .trim(),
        "removed secret API_KEY of misbehave"
    );
    assert_eq!(node.get("/apps/misbehave/config?key=API_KEY").await.0, 404);
}

#[tokio::test]
async fn a_revision_runs_at_most_its_concurrency_queues_within_bounds_and_sheds_with_retry_after() {
    let node = TestNode::start();
    let _dir = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        "name = \"misbehave\"\n[scaling]\nmax_concurrency = 1\nmax_queued = 1\nqueue_timeout_secs = 10\n",
    );
    // Waits until the revision's gate shows `field` at `count`.
    let gate_shows = |field: &'static str, count: u64| {
        let node = &node;
        async move {
            for _ in 0..1000 {
                let app = node.admin_json("/v1/admin/apps/misbehave").await;
                if app["app"]["revisions"][0][field] == count {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("the revision never had {count} {field}");
        }
    };
    let slow = || {
        node.client
            .get(node.at("/apps/misbehave/sleep?ms=4000"))
            .send()
    };
    let running = tokio::spawn(slow());
    gate_shows("running", 1).await;
    let queued = tokio::spawn(slow());
    gate_shows("queued", 1).await;
    let shed = node
        .client
        .get(node.at("/apps/misbehave/sleep?ms=10"))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), 503);
    assert!(shed.headers().contains_key("retry-after"));
    assert!(shed
        .text()
        .await
        .unwrap()
        .contains("app misbehave (revision 1)"));
    assert_eq!(running.await.unwrap().unwrap().status(), 200);
    assert_eq!(queued.await.unwrap().unwrap().status(), 200);
    // Another app is not held back by misbehave's limit.
    node.cli_ok(&["deploy", "--public", "hello", artifacts::HELLO]);
    assert_eq!(node.get("/apps/hello/").await.0, 200);
}

#[tokio::test]
async fn the_cpu_budget_stops_a_spinning_request_but_not_a_waiting_one() {
    let node = TestNode::start();
    let _dir = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        "name = \"misbehave\"\n[limits]\ntimeout_secs = 30\ncpu_ms = 200\n",
    );
    let (status, body) = node.get("/apps/misbehave/spin?ms=5000").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (500, "cpu_limit"),
        "{body}"
    );
    assert_eq!(
        node.get("/apps/misbehave/sleep?ms=1000").await,
        (200, "slept".into())
    );
    // Forty waits of 30 ms: each return to guest code after a wait is not charged either.
    assert_eq!(
        node.get("/apps/misbehave/sleep?ms=30&times=40").await,
        (200, "slept".into())
    );
    assert_eq!(
        node.get("/apps/misbehave/spin?ms=20").await,
        (200, "spun".into())
    );
}

#[tokio::test]
async fn an_idle_revision_scales_to_zero_and_its_next_request_starts_cold_from_the_cache() {
    let node = TestNode::start();
    let _dir = deploy_manifest(
        &node,
        artifacts::HELLO,
        "name = \"hello\"\n[scaling]\nidle_timeout_secs = 1\n",
    );
    let revision = |app: serde_json::Value| app["app"]["revisions"][0].clone();
    // Waits (the harness has the deadline) until the first revision has scaled to zero.
    let scaled_to_zero = || async {
        loop {
            let state = revision(node.admin_json("/v1/admin/apps/hello").await);
            if state["warm"] == false {
                return state;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    assert_eq!(node.get("/apps/hello/").await.0, 200);
    let warm = revision(node.admin_json("/v1/admin/apps/hello").await);
    assert_eq!(warm["warm"], true);
    assert_eq!(warm["stats"]["warm_starts"], 1);
    let cold = scaled_to_zero().await;
    assert_eq!(cold["stats"]["cold_starts"], 0);
    assert_eq!(
        node.get("/apps/hello/?name=again").await,
        (200, "Hello, again!\n".into())
    );
    let restarted = revision(node.admin_json("/v1/admin/apps/hello").await);
    assert_eq!(restarted["stats"]["cold_starts"], 1);
    assert_eq!(restarted["warm"], true);

    // min_instances keeps a revision warm however idle it is; a revision made by settings
    // alone (no component: the newest one's) while that one is cold is prepared at once.
    scaled_to_zero().await;
    let (_dir, path) = TestNode::manifest(
        "[app]\nname = \"hello\"\n[scaling]\nidle_timeout_secs = 1\nmin_instances = 1\n",
    );
    let deployed = node.cli_ok(&["deploy", "--public", "-f", path.to_str().unwrap()]);
    assert!(deployed.contains("revision 2"), "{deployed}");
    let kept = node.admin_json("/v1/admin/apps/hello").await;
    assert_eq!(kept["app"]["revisions"][1]["warm"], true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = node.admin_json("/v1/admin/apps/hello").await;
    assert_eq!(kept["app"]["revisions"][1]["warm"], true);
    assert_eq!(kept["app"]["revisions"][1]["stats"]["cold_starts"], 0);
}

#[tokio::test]
async fn rate_limits_answer_429_with_retry_after_and_the_fallback_serves_when_shedding_or_failing()
{
    let node = TestNode::start();
    let _dir = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        "name = \"misbehave\"\n[client_rate_limit]\nper_second = 1\nburst = 3\n",
    );
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = node
            .client
            .get(node.at("/apps/misbehave/config-all"))
            .send()
            .await
            .unwrap();
        if response.status() == 429 {
            let wait: u64 = response.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(wait >= 1);
        }
        statuses.push(response.status().as_u16());
    }
    assert_eq!(&statuses[..3], &[200, 200, 200]);
    assert_eq!(statuses[4], 429, "{statuses:?}");

    let _dir = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        "name = \"misbehave\"\n[rate_limit]\nper_second = 1\nburst = 2\n[fallback]\nstatus = 200\nbody = \"degraded answer\"\n",
    );
    let trapped = node
        .client
        .get(node.at("/apps/misbehave/trap"))
        .send()
        .await
        .unwrap();
    assert_eq!(trapped.headers()["tensorlet-fallback"], "trap");
    assert_eq!(trapped.text().await.unwrap(), "degraded answer");
    let mut fallbacks = 0;
    for _ in 0..5 {
        let response = node
            .client
            .get(node.at("/apps/misbehave/config-all"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        if response
            .headers()
            .get("tensorlet-fallback")
            .is_some_and(|v| v == "rate_limited")
        {
            fallbacks += 1;
        }
    }
    assert!(
        fallbacks >= 2,
        "{fallbacks} of 5 requests over the app's rate limit got the fallback"
    );
}

#[tokio::test]
async fn apps_call_each_other_on_the_node_and_reach_only_allowed_hosts() {
    let node = TestNode::start();
    node.cli_ok(&["deploy", "--public", "hello", artifacts::HELLO]);
    let (outside, _requests) = crate::support::http_sink(b"outside").await;
    let outside_port: u16 = outside.rsplit(':').next().unwrap().parse().unwrap();
    let _dir = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        &format!("name = \"misbehave\"\n[outbound]\nallowed_hosts = [\"hello.internal\", \"misbehave.internal\", \"127.0.0.1:{outside_port}\"]\n"),
    );
    let fetch = |url: &str| {
        format!(
            "/apps/misbehave/fetch?url={}",
            url.replace(':', "%3A")
                .replace('/', "%2F")
                .replace('?', "%3F")
                .replace('=', "%3D")
                .replace('&', "%26")
        )
    };
    assert_eq!(
        node.get(&fetch("http://hello.internal/?name=neighbour"))
            .await,
        (200, "status 200\nHello, neighbour!\n".into())
    );
    assert_eq!(
        node.get(&fetch(&format!("http://127.0.0.1:{outside_port}/")))
            .await,
        (200, "status 200\noutside".into())
    );
    let (status, body) = node.get(&fetch("http://kv-counter.internal/")).await;
    assert_eq!(status, 502);
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let (status, body) = node
        .get(&fetch(&format!("http://127.0.0.1:{}/", outside_port + 1)))
        .await;
    assert_eq!(status, 502);
    assert!(body.contains("HttpRequestDenied"), "{body}");
    let (status, body) = node.get(&fetch("http://nowhere.internal/")).await;
    assert_eq!(status, 502, "{body}");
    // An app that calls itself without end is stopped at the node's depth.
    let mut url = "http://misbehave.internal/config-all".to_string();
    for _ in 0..6 {
        url = format!(
            "http://misbehave.internal{}",
            fetch(&url).trim_start_matches("/apps/misbehave")
        );
    }
    let (status, body) = node.get(&fetch(&url)).await;
    assert_eq!(status, 200);
    assert!(body.contains("508"), "{body}");
}

#[tokio::test]
async fn a_two_app_pipeline_classifies_text_by_embeddings_from_another_app() {
    let node = TestNode::start();
    let model = artifacts::minilm_model();
    node.cli_ok(&["model", "add", "minilm", model.to_str().unwrap()]);
    node.cli_ok(&[
        "deploy",
        "--public",
        "openai",
        artifacts::OPENAI,
        "--model",
        "minilm",
    ]);
    let _dir = deploy_manifest(
        &node,
        artifacts::PIPELINE,
        "name = \"pipeline\"\n[config]\nembeddings_app = \"openai\"\nembeddings_model = \"minilm\"\n[outbound]\nallowed_hosts = [\"openai.internal\"]\n",
    );
    for (text, expected) in [
        (
            "The striker scored twice and the team won the league match.",
            "sports",
        ),
        (
            "Whisk the eggs with butter and bake the cake for forty minutes.",
            "cooking",
        ),
    ] {
        let response = node
            .post_json(
                "/apps/pipeline/",
                &serde_json::json!({ "text": text, "labels": ["sports", "cooking", "finance"] }),
            )
            .await;
        assert_eq!(response.status(), 200);
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(answer["label"], expected, "{answer}");
    }
    let (status, _) = node.get("/apps/pipeline/").await;
    assert_ne!(status, 200);
}

#[tokio::test]
async fn cached_responses_are_served_without_running_the_app_until_they_expire() {
    let node = TestNode::start();
    let _dir = deploy_manifest(
        &node,
        artifacts::HELLO,
        "name = \"hello\"\n[cache]\nttl_secs = 600\n",
    );
    let get = |query: &'static str| {
        node.client
            .get(node.at(&format!("/apps/hello/?name={query}")))
            .send()
    };
    let first = get("cache").await.unwrap();
    assert_eq!(first.headers()["tensorlet-cache"], "miss");
    assert_eq!(first.text().await.unwrap(), "Hello, cache!\n");
    let second = get("cache").await.unwrap();
    assert_eq!(second.headers()["tensorlet-cache"], "hit");
    assert_eq!(second.text().await.unwrap(), "Hello, cache!\n");
    assert_eq!(
        get("other").await.unwrap().headers()["tensorlet-cache"],
        "miss"
    );
    let bypass = node
        .client
        .get(node.at("/apps/hello/?name=cache"))
        .header("cache-control", "no-cache")
        .send()
        .await
        .unwrap();
    assert_eq!(bypass.headers()["tensorlet-cache"], "miss");
    // A request with credentials gets an answer for its sender only: never from the cache.
    for _ in 0..2 {
        let private = node
            .client
            .get(node.at("/apps/hello/?name=cache"))
            .bearer_auth("someone")
            .send()
            .await
            .unwrap();
        assert!(private.headers().get("tensorlet-cache").is_none());
    }
    let app = node.admin_json("/v1/admin/apps/hello").await;
    let stats = &app["app"]["revisions"][0]["stats"];
    assert_eq!(
        (stats["cache_hits"].as_u64(), stats["cache_misses"].as_u64()),
        (Some(1), Some(3))
    );

    // An answer is reused for its TTL only.
    let _dir = deploy_manifest(
        &node,
        artifacts::HELLO,
        "name = \"hello\"\n[cache]\nttl_secs = 1\n",
    );
    assert_eq!(
        get("brief").await.unwrap().headers()["tensorlet-cache"],
        "miss"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        get("brief").await.unwrap().headers()["tensorlet-cache"],
        "miss"
    );
}

#[tokio::test]
async fn routes_serve_an_app_at_its_own_paths_and_cannot_be_taken_twice() {
    let node = TestNode::start();
    let _dir = deploy_manifest(
        &node,
        artifacts::HELLO,
        "name = \"hello\"\nroutes = [\"/greet\"]\n",
    );
    assert_eq!(
        node.get("/greet?name=route").await,
        (200, "Hello, route!\n".into())
    );
    assert_eq!(
        node.get("/greet/below?name=deeper").await,
        (200, "Hello, deeper!\n".into())
    );
    let (status, body) = node.get("/greeting").await;
    assert_eq!((status, error_code(&body).as_str()), (404, "not_found"));
    assert_eq!(node.get("/healthz").await, (200, "ok\n".into()));

    // A shorthand deploy (flags, no manifest, no component) changes only what it sets: a
    // new revision with the new timeout, the route kept.
    let updated = node.cli_ok(&["deploy", "--public", "hello", "--timeout-secs", "9"]);
    assert!(updated.contains("revision 2"), "{updated}");
    assert_eq!(
        node.get("/greet?name=kept").await,
        (200, "Hello, kept!\n".into())
    );
    let app = node.admin_json("/v1/admin/apps/hello").await;
    assert_eq!(app["app"]["revisions"][1]["timeout_secs"], 9);

    let (_dir, taken) = TestNode::manifest(&manifest_for(
        artifacts::HELLO,
        "name = \"other\"\nroutes = [\"/greet\"]\n",
    ));
    let refused = node.cli(&["deploy", "--public", "-f", taken.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is already a route of app \"hello\"")
    );
    let (_dir, reserved) = TestNode::manifest(&manifest_for(
        artifacts::HELLO,
        "name = \"other\"\nroutes = [\"/v1/admin/apps\"]\n",
    ));
    let refused = node.cli(&["deploy", "--public", "-f", reserved.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("keeps for itself"));
    assert_eq!(
        node.get("/apps/other/").await.0,
        404,
        "a refused deploy was recorded"
    );
}

#[tokio::test]
async fn an_app_that_reuses_instances_serves_requests_in_turn_and_never_reuses_a_spoiled_one() {
    let node = TestNode::start();
    let _reuses = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        "name = \"misbehave\"\n[limits]\ntimeout_secs = 2\n[scaling]\nrequests_per_instance = 5\n",
    );
    let _fresh = deploy_manifest(&node, artifacts::MISBEHAVE, "name = \"fresh\"\n");
    // What `/count` says: the requests the instance that answered has served.
    let counts = |app: &'static str, path: &'static str, times: usize| {
        let node = &node;
        async move {
            let mut seen = Vec::new();
            for _ in 0..times {
                let (status, body) = node.get(&format!("/apps/{app}{path}")).await;
                assert_eq!(status, 200, "{body}");
                seen.push(body.parse::<u64>().expect("a count"));
            }
            seen
        }
    };
    // One instance serves five requests in turn, then a fresh one takes over; an app that
    // does not opt in (the same component) gets a fresh instance every time.
    assert_eq!(
        counts("misbehave", "/count", 7).await,
        [1, 2, 3, 4, 5, 1, 2]
    );
    assert_eq!(counts("fresh", "/count", 3).await, [1, 1, 1]);
    let revision = node.admin_json("/v1/admin/apps/misbehave").await["app"]["revisions"][0].clone();
    assert_eq!(revision["idle_instances"], 1, "{revision}");
    assert_eq!(revision["stats"]["instance_reuses"], 5, "{revision}");
    let samples = scrape(&node).await;
    for (name, labels, value) in [
        ("tensorlet_instances_idle", &[][..], 1.0),
        (
            "tensorlet_revision_instances_idle",
            &[("app", "misbehave"), ("revision", "1")],
            1.0,
        ),
        (
            "tensorlet_instance_reuses_total",
            &[("app", "misbehave"), ("revision", "1")],
            5.0,
        ),
        (
            "tensorlet_instance_reuses_total",
            &[("app", "fresh"), ("revision", "1")],
            0.0,
        ),
    ] {
        assert_eq!(
            sample(&samples, name, labels),
            Some(value),
            "{name} {labels:?}"
        );
    }

    // An instance that trapped, ran past its timeout, or holds an unfinished response body
    // is never reused: the next request starts fresh.
    assert_eq!(node.get("/apps/misbehave/trap").await.0, 500);
    assert_eq!(counts("misbehave", "/count", 2).await, [1, 2]);
    assert_eq!(node.get("/apps/misbehave/sleep?ms=5000").await.0, 504);
    assert_eq!(counts("misbehave", "/count", 1).await, [1]);
    assert_eq!(counts("misbehave", "/count?leak=1", 1).await, [2]);
    assert_eq!(counts("misbehave", "/count", 2).await, [1, 2]);
    // New secrets retire kept instances (a guest may hold the old ones in memory).
    let set = node.cli_with_input(&["secret", "set", "misbehave", "API_KEY"], b"rotated");
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    assert_eq!(counts("misbehave", "/count", 1).await, [1]);

    // Concurrent requests get instances of their own, each kept afterwards.
    let concurrent = futures_util::future::join_all((0..3).map(|_| {
        node.client
            .get(node.at("/apps/misbehave/sleep?ms=1000"))
            .send()
    }))
    .await;
    assert!(concurrent
        .iter()
        .all(|r| r.as_ref().unwrap().status() == 200));
    let revision = node.admin_json("/v1/admin/apps/misbehave").await["app"]["revisions"][0].clone();
    assert_eq!(revision["idle_instances"], 3, "{revision}");

    // Scaling to zero lets kept instances go with the prepared component.
    let _idler = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        "name = \"idler\"\n[scaling]\nrequests_per_instance = 10\nidle_timeout_secs = 1\n",
    );
    assert_eq!(counts("idler", "/count", 2).await, [1, 2]);
    loop {
        let revision = node.admin_json("/v1/admin/apps/idler").await["app"]["revisions"][0].clone();
        if revision["warm"] == false {
            assert_eq!(revision["idle_instances"], 0, "{revision}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counts("idler", "/count", 1).await, [1]);
    node.assert_healthy().await;
}

#[tokio::test]
async fn kept_instances_stay_within_the_node_bound_and_the_longest_waiting_goes_first() {
    let config = config_file("[limits]\nmax_idle_instances = 2\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    let reuse = "[scaling]\nrequests_per_instance = 100\n";
    let _first = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        &format!("name = \"first\"\n{reuse}"),
    );
    let _second = deploy_manifest(
        &node,
        artifacts::MISBEHAVE,
        &format!("name = \"second\"\n{reuse}"),
    );
    let idle = |app: &'static str| {
        let node = &node;
        async move {
            node.admin_json(&format!("/v1/admin/apps/{app}")).await["app"]["revisions"][0]
                ["idle_instances"]
                .clone()
        }
    };
    // Two at once: `first` keeps both instances, which fills the node's places.
    let both = futures_util::future::join_all(
        (0..2).map(|_| node.client.get(node.at("/apps/first/sleep?ms=1000")).send()),
    )
    .await;
    assert!(both.iter().all(|r| r.as_ref().unwrap().status() == 200));
    assert_eq!(
        (idle("first").await, idle("second").await),
        (2.into(), 0.into())
    );
    // `second` gets a place: the instance of `first` that has waited longest goes.
    assert_eq!(node.get("/apps/second/count").await, (200, "1".to_string()));
    assert_eq!(
        (idle("first").await, idle("second").await),
        (1.into(), 1.into())
    );
    assert_eq!(node.get("/apps/second/count").await, (200, "2".to_string()));
    assert_eq!(node.get("/apps/first/count").await.0, 200);
    assert_eq!(
        (idle("first").await, idle("second").await),
        (1.into(), 1.into())
    );
}

//! Bad input and misbehaving apps: each gets a clear JSON error with the right status, changes
//! nothing, and the node keeps serving.

use crate::support::{artifacts, error_code, TestNode};
use std::time::{Duration, Instant};

#[tokio::test]
async fn uploads_that_are_not_http_components_are_refused() {
    let node = TestNode::start();
    let cases: [(&str, Vec<u8>, &str, &str); 3] = [
        (
            "junk",
            b"this is not wasm at all".to_vec(),
            "not_wasm",
            "not a WebAssembly binary",
        ),
        (
            "core",
            b"\0asm\x01\0\0\0".to_vec(),
            "core_module",
            "wasm32-wasip2",
        ),
        (
            "cmd",
            std::fs::read(artifacts::NOT_HTTP).unwrap(),
            "wrong_world",
            "wasi:http/incoming-handler",
        ),
    ];
    for (app, bytes, code, hint) in cases {
        let response = node
            .client
            .put(node.at(&format!("/v1/admin/apps/{app}")))
            .bearer_auth(&node.token)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{app}");
        let body = response.text().await.unwrap();
        assert_eq!(error_code(&body), code, "{body}");
        assert!(body.contains(hint), "{app}: {body}");
    }
    let apps = node.cli_ok(&["apps"]);
    assert_eq!(
        apps.lines().count(),
        1,
        "a refused deployment was recorded: {apps}"
    );
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    assert_eq!(node.get("/apps/hello/").await.0, 200);
}

#[tokio::test]
async fn the_admin_api_needs_the_admin_token() {
    let node = TestNode::start();
    let missing = node
        .client
        .get(node.at("/v1/admin/apps"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(error_code(&missing.text().await.unwrap()), "unauthorized");
    let wrong = node
        .client
        .get(node.at("/v1/admin/apps"))
        .bearer_auth("tlt_guess")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let refused = node
        .client
        .put(node.at("/v1/admin/apps/hello"))
        .body(std::fs::read(artifacts::HELLO).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    assert_eq!(
        node.get("/apps/hello/").await.0,
        404,
        "an unauthorised deploy took effect"
    );
}

#[tokio::test]
async fn unknown_apps_and_oversized_bodies_are_refused() {
    let node = TestNode::start();
    let (status, body) = node.get("/apps/nothing-here/x").await;
    assert_eq!((status, error_code(&body).as_str()), (404, "app_not_found"));

    node.deploy_ok("hello", artifacts::HELLO, "max_body_bytes=1024")
        .await;
    let response = node
        .client
        .post(node.at("/apps/hello/"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(
        error_code(&response.text().await.unwrap()),
        "body_too_large"
    );
    // A chunked body (no Content-Length) over the limit is refused too.
    let chunks =
        futures_util::stream::iter((0..8).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 512])));
    let response = node
        .client
        .post(node.at("/apps/hello/"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    assert_eq!(response.headers()["connection"], "close");
    // The client opens a new connection for the next request.
    let small = node
        .client
        .post(node.at("/apps/hello/"))
        .body(vec![b'x'; 512])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200);
}

#[tokio::test]
async fn traps_loops_and_memory_bombs_fail_only_their_own_request() {
    let node = TestNode::start();
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    const TIMEOUT_SECS: u64 = 5;
    node.deploy_ok(
        "misbehave",
        artifacts::MISBEHAVE,
        &format!("timeout_secs={TIMEOUT_SECS}&memory_mib=32"),
    )
    .await;

    let (status, body) = node.get("/apps/misbehave/trap").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (500, "trap"),
        "{body}"
    );

    // A trap after the head was sent cannot change the status any more: the body ends in an
    // error, so the client never takes the part it got for the whole answer.
    let response = node
        .client
        .get(node.at("/apps/misbehave/trap-after-head"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.bytes().await.is_err(),
        "a body cut short by a trap read as complete"
    );
    node.assert_healthy().await;

    let (status, body) = node.get("/apps/misbehave/membomb").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (500, "memory_limit"),
        "{body}"
    );
    assert!(body.contains("32 MiB"), "{body}");

    // Tensors live in host memory: they count against the same limit, and the node lives.
    let (status, body) = node.get("/apps/misbehave/tensor-bomb").await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (500, "memory_limit"),
        "{body}"
    );
    assert!(body.contains("wasi-nn tensors"), "{body}");

    // While one request spins forever, the node and other apps keep answering: both answers
    // come back before the spinning request's timeout ends it.
    let spinning = {
        let (client, url) = (node.client.clone(), node.at("/apps/misbehave/loop"));
        tokio::spawn(async move {
            let started = Instant::now();
            let response = client.get(url).send().await.unwrap();
            (
                started.elapsed(),
                response.status().as_u16(),
                response.text().await.unwrap(),
            )
        })
    };
    while node
        .cli_ok(&["status"])
        .contains("\"running_instances\": 0")
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        node.get("/apps/hello/?name=alive").await,
        (200, "Hello, alive!\n".to_string())
    );
    node.assert_healthy().await;
    assert!(
        !spinning.is_finished(),
        "the node answered only after the spinning request ended"
    );

    let (elapsed, status, body) = spinning.await.unwrap();
    assert_eq!(
        (status, error_code(&body).as_str()),
        (504, "timeout"),
        "{body}"
    );
    // Not before the app's timeout; well before the client's own.
    assert!(
        elapsed >= Duration::from_secs(TIMEOUT_SECS) && elapsed < Duration::from_secs(60),
        "timed out after {elapsed:?}"
    );

    assert_eq!(node.get("/apps/hello/").await.0, 200);
}

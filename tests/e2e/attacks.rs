//! A real daemon attacked as the open internet would: thousands of idle sockets, stalled TLS
//! handshakes, slow-header clients, connections past the cap, floods of large bodies at a
//! slow app, HTTP/2 rapid resets and clients that grant no window, and LLM clients that leave
//! early or never read. The node keeps answering, sheds what it cannot hold with 503 +
//! `Retry-After`, and gives back every file, slot and sequence.

use crate::support::{artifacts, config_file, error_code, TestNode};
use futures_util::StreamExt;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Waits until `condition` holds, checking every 100 ms; panics with `what` after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what} (waited {limit:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads from `stream` until the peer closes it (EOF or reset); `false` if it is still open
/// after `limit`.
async fn closed_by_peer(stream: &mut (impl AsyncReadExt + Unpin), limit: Duration) -> bool {
    let mut buffer = [0u8; 1024];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    };
    tokio::time::timeout(limit, read).await.is_ok()
}

fn address(node: &TestNode) -> String {
    node.url.trim_start_matches("https://").to_string()
}

#[tokio::test]
async fn hostile_connections_are_cut_by_their_timeouts_and_the_node_keeps_answering() {
    let _heavy = crate::support::heavy().await;
    const TIMEOUT_SECS: u64 = 3;
    let config = config_file(&format!(
        "[server]\ntls_handshake_timeout_secs = {TIMEOUT_SECS}\nheader_read_timeout_secs = {TIMEOUT_SECS}\nidle_timeout_secs = {TIMEOUT_SECS}\n"
    ));
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    assert_eq!(node.get("/apps/hello/").await.0, 200);
    let files_before = node.open_files();
    let address = address(&node);

    // 2 000 sockets that never say anything.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(&address).await.unwrap());
    }
    // 200 TLS handshakes that stop half-way through the ClientHello.
    let mut stalled = Vec::new();
    for _ in 0..200 {
        let mut stream = TcpStream::connect(&address).await.unwrap();
        stream
            .write_all(&[
                0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
            ])
            .await
            .unwrap();
        stalled.push(stream);
    }
    // 200 clients that complete the handshake, then send their request head a byte a second.
    let connector = tokio_rustls::TlsConnector::from(node.tls_client_config());
    let mut slow = Vec::new();
    for _ in 0..200 {
        let tcp = TcpStream::connect(&address).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let connector = connector.clone();
        slow.push(tokio::spawn(async move {
            let mut tls = connector.connect(name, tcp).await.unwrap();
            tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .await
                .unwrap();
            let started = Instant::now();
            // Bounded: a minute at most, then the test fails below.
            for _ in 0..60 {
                if tls.write_all(b"a").await.is_err() || tls.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            started.elapsed()
        }));
    }

    // Meanwhile the node and its apps answer.
    for _ in 0..10 {
        let started = Instant::now();
        node.assert_healthy().await;
        assert_eq!(node.get("/apps/hello/?name=edge").await.0, 200);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "answering took {:?} under attack",
            started.elapsed()
        );
    }

    // Each attacker is cut off by its timeout, not left open.
    let limit = Duration::from_secs(TIMEOUT_SECS + 30);
    for stream in idle.iter_mut().chain(stalled.iter_mut()) {
        assert!(
            closed_by_peer(stream, limit).await,
            "a silent connection stayed open"
        );
    }
    for task in slow {
        let held = task.await.unwrap();
        assert!(
            held < Duration::from_secs(50),
            "a slow-header client was held for {held:?}"
        );
    }
    drop((idle, stalled));

    let status = node.status().await;
    let connections = &status["connections"];
    assert!(
        connections["tls_handshake_timeouts"].as_u64().unwrap() >= 2200,
        "{connections}"
    );
    // Once the attackers are gone, the node's open files are back where they were.
    eventually(
        Duration::from_secs(30),
        "the node's open files did not return to where they were",
        || async { node.open_files() <= files_before },
    )
    .await;
    node.assert_healthy().await;
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let _heavy = crate::support::heavy().await;
    let config = config_file("[server]\nmax_connections = 50\ntls_handshake_timeout_secs = 60\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.assert_healthy().await;
    let address = address(&node);
    // The test client's pooled connection holds one slot; 49 idle sockets fill the rest.
    let mut held = Vec::new();
    for _ in 0..49 {
        held.push(TcpStream::connect(&address).await.unwrap());
    }
    eventually(
        Duration::from_secs(30),
        "the connections were not accepted",
        || async { node.status().await["connections"]["open"].as_u64().unwrap() == 50 },
    )
    .await;
    // The 51st is accepted and closed at once: nothing queues for a slot.
    let mut over = TcpStream::connect(&address).await.unwrap();
    assert!(
        closed_by_peer(&mut over, Duration::from_secs(10)).await,
        "a connection past the cap was left open"
    );
    // Slots come back as connections go.
    drop(held);
    eventually(
        Duration::from_secs(30),
        "slots did not come back",
        || async { node.status().await["connections"]["open"].as_u64().unwrap() <= 1 },
    )
    .await;
    let status = node.status().await;
    assert!(
        status["connections"]["refused_at_cap"].as_u64().unwrap() >= 1,
        "{status}"
    );
}

/// An HTTP/2 connection over TLS to `node`, whose client grants the server only the protocol's
/// minimum window (64 KiB) unless its data is read.
async fn http2_connection(
    node: &TestNode,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
    usize,
) {
    let mut tls = (*node.tls_client_config()).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(address(node)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, mut connection) = h2::client::Builder::new()
        .initial_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake(stream)
        .await
        .unwrap();
    // The server's SETTINGS arrive with the first exchange.
    let client = client.ready().await.unwrap();
    let (response, _) = client
        .clone()
        .send_request(http_request("/healthz"), true)
        .unwrap();
    let driven = tokio::select! {
        response = response => response.unwrap().status(),
        _ = &mut connection => panic!("the connection ended before its first answer"),
    };
    assert_eq!(driven, 200);
    let streams = connection.max_concurrent_send_streams();
    (client, tokio::spawn(connection), streams)
}

fn http_request(path: &str) -> http::Request<()> {
    http::Request::get(format!("https://127.0.0.1{path}"))
        .body(())
        .unwrap()
}

#[tokio::test]
async fn http2_clients_cannot_flood_streams_or_hold_responses_open() {
    let _heavy = crate::support::heavy().await;
    const WRITE_TIMEOUT_SECS: u64 = 2;
    let config = config_file(&format!(
        "[server]\nwrite_timeout_secs = {WRITE_TIMEOUT_SECS}\nhttp2_max_concurrent_streams = 8\n"
    ));
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("hello", artifacts::HELLO, "").await;
    node.deploy_ok("kv-counter", artifacts::KV_COUNTER, "")
        .await;
    let big = vec![b'x'; 1 << 20];
    let stored = node
        .client
        .put(node.at("/apps/kv-counter/items/big"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert!(stored.status().is_success(), "{}", stored.status());
    let files_before = node.open_files();

    // The stream limit is what the node announces.
    let (mut client, connection, streams) = http2_connection(&node).await;
    assert_eq!(streams, 8);

    // Rapid reset (CVE-2023-44487): 20 000 streams opened and cancelled at once. The node
    // keeps answering others meanwhile, and nothing of the cancelled streams stays in flight.
    let flood = tokio::spawn(async move {
        for sent in 0..20_000 {
            let Ok(ready) = client.ready().await else {
                return sent;
            };
            client = ready;
            let Ok((_, mut stream)) = client.send_request(http_request("/apps/hello/"), false)
            else {
                return sent;
            };
            stream.send_reset(h2::Reason::CANCEL);
        }
        20_000
    });
    while !flood.is_finished() {
        let started = Instant::now();
        node.assert_healthy().await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "/healthz took {:?} during a rapid-reset flood",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sent = flood.await.unwrap();
    println!("rapid reset: {sent} streams opened and cancelled on one connection");
    connection.abort();
    eventually(
        Duration::from_secs(30),
        "requests of the reset streams were still in flight",
        || async { node.status().await["queued_requests"] == 0 },
    )
    .await;

    // A client that asks for 1 MiB and never grants window beyond the first 64 KiB: the
    // response cannot be written, and the node drops the connection after its write timeout.
    let (client, connection, _) = http2_connection(&node).await;
    let (response, _) = client
        .ready()
        .await
        .unwrap()
        .send_request(http_request("/apps/kv-counter/items/big"), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let held = response.into_body();
    let started = Instant::now();
    let ended =
        tokio::time::timeout(Duration::from_secs(WRITE_TIMEOUT_SECS + 20), connection).await;
    assert!(
        ended.is_ok(),
        "a connection whose client grants no window stayed open"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(WRITE_TIMEOUT_SECS - 1),
        "the connection ended before its write timeout: {:?}",
        started.elapsed()
    );
    drop(held);
    assert!(
        node.status().await["connections"]["write_stalled"]
            .as_u64()
            .unwrap()
            >= 1
    );

    eventually(
        Duration::from_secs(30),
        "the node's open files did not return to where they were",
        || async { node.open_files() <= files_before },
    )
    .await;
    assert_eq!(
        node.get("/apps/hello/?name=after").await,
        (200, "Hello, after!\n".to_string())
    );
}

#[tokio::test]
async fn a_flood_of_large_bodies_at_a_slow_app_is_shed_with_bounded_memory() {
    let _heavy = crate::support::heavy().await;
    // Two instances, two places in the queue, 64 MiB of bodies in memory at once.
    let config = config_file(
        "[limits]\nmax_concurrent_instances = 2\nmax_queued_requests = 2\nqueue_timeout_secs = 60\nmax_buffered_body_bytes = 67108864\n",
    );
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("misbehave", artifacts::MISBEHAVE, "timeout_secs=5")
        .await;
    let baseline_kib = node.proc_status_kib("VmRSS");

    // Two requests occupy both instances (the app spins until its timeout).
    let busy: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (node.client.clone(), node.at("/apps/misbehave/loop"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status().as_u16() })
        })
        .collect();
    eventually(
        Duration::from_secs(30),
        "the slow requests did not start",
        || async { node.status().await["running_instances"] == 2 },
    )
    .await;

    // 40 uploads of 16 MiB each at once: 640 MiB if the node buffered them all.
    let body = vec![7u8; 16 << 20];
    let flood = futures_util::future::join_all((0..40).map(|_| {
        let (client, url, body) = (
            node.client.clone(),
            node.at("/apps/misbehave/loop"),
            body.clone(),
        );
        async move {
            match client.post(url).body(body).send().await {
                Ok(response) => {
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .map(|v| v.to_str().unwrap().to_string());
                    let status = response.status().as_u16();
                    let text = response.text().await.unwrap_or_default();
                    Some((status, retry_after, text))
                }
                // A client refused before it finished sending may see its upload cut.
                Err(_) => None,
            }
        }
    }))
    .await;
    // Each upload is refused at once (503), cut while it is still being sent, or, when it
    // arrives as a queue place frees, waits and runs into the looping app's timeout (504).
    // How many arrive in time for a freed place depends on the machine's speed, not on the
    // node: the bound is that most are refused and memory stays bounded (below).
    let outcomes: Vec<_> = flood
        .iter()
        .map(|o| o.as_ref().map(|(s, _, _)| *s))
        .collect();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o, None | Some(503) | Some(504))),
        "an upload was answered otherwise: {outcomes:?}"
    );
    let shed: Vec<_> = flood
        .iter()
        .flatten()
        .filter(|(status, _, _)| *status == 503)
        .collect();
    let refused = outcomes.iter().filter(|o| !matches!(o, Some(504))).count();
    assert!(
        shed.len() >= 20 && refused >= 30,
        "{} of 40 shed, {refused} refused: {outcomes:?}",
        shed.len()
    );
    for (_, retry_after, text) in &shed {
        assert_eq!(error_code(text), "overloaded", "{text}");
        assert_eq!(retry_after.as_deref(), Some("1"), "{text}");
    }
    let peak_kib = node.proc_status_kib("VmHWM");
    assert!(
        peak_kib < baseline_kib + (256 << 10),
        "resident memory peaked at {} MiB (from {} MiB)",
        peak_kib >> 10,
        baseline_kib >> 10
    );
    for task in busy {
        assert_eq!(task.await.unwrap(), 504);
    }
    assert_eq!(node.status().await["queued_requests"], 0);
    node.assert_healthy().await;
}

#[tokio::test]
async fn llm_clients_that_leave_early_or_never_read_leave_nothing_running() {
    let _heavy = crate::support::heavy().await;
    const APP_TIMEOUT_SECS: u64 = 20;
    let config = config_file("[server]\nwrite_timeout_secs = 3\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.add_smollm2_and_openai(APP_TIMEOUT_SECS);
    let chat = |stream: bool| {
        serde_json::json!({
            "model": "smollm2",
            "messages": [{ "role": "user", "content": "Write a very long story about the sea." }],
            "max_tokens": 1500,
            "stream": stream,
        })
    };
    let url = node.at("/apps/openai/v1/chat/completions");

    // 25 non-streamed chats whose clients give up after a second…
    let impatient = (0..25).map(|_| {
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        let (url, body) = (url.clone(), chat(false));
        tokio::spawn(async move {
            assert!(client.post(url).json(&body).send().await.is_err());
        })
    });
    // …and 25 streamed ones whose clients leave after the first token.
    let tasters = (0..25).map(|_| {
        let (client, url, body) = (node.client.clone(), url.clone(), chat(true));
        tokio::spawn(async move {
            let response = client.post(url).json(&body).send().await.unwrap();
            let mut events = response.bytes_stream();
            let _ = events.next().await;
        })
    });
    for leaver in impatient.chain(tasters).collect::<Vec<_>>() {
        leaver.await.unwrap();
    }

    // Everything is given back: instances, LLM sequences, computations on the blocking pool.
    let generation =
        || async { node.admin_json("/v1/admin/models").await["models"][0]["generation"].clone() };
    let all_released = || async {
        let status = node.status().await;
        let generation = generation().await;
        status["running_instances"] == 0
            && status["computes_running"] == 0
            && generation["running"] == 0
            && generation["waiting"] == 0
    };
    // Decoding all 50 to the end would take minutes on this machine.
    eventually(
        Duration::from_secs(60),
        "generations whose clients left were still running",
        all_released,
    )
    .await;
    let decoded = generation().await["decoded_tokens"].as_u64().unwrap();
    assert!(
        decoded < 50 * 1500 / 4,
        "{decoded} tokens were decoded for clients that had left"
    );

    // 20 streamed chats whose clients send the request and never read a byte: each holds its
    // instance and sequence at most until the app's timeout.
    let connector = tokio_rustls::TlsConnector::from(node.tls_client_config());
    let request = chat(true).to_string();
    let mut silent = Vec::new();
    for _ in 0..20 {
        let tcp = TcpStream::connect(address(&node)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        let head = format!(
            "POST /apps/openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            request.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.write_all(request.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        silent.push(tls);
    }
    eventually(
        Duration::from_secs(APP_TIMEOUT_SECS + 60),
        "generations whose clients never read outlived the app's timeout",
        all_released,
    )
    .await;
    drop(silent);
    node.assert_healthy().await;
}

//! LLMs on llama.cpp through wasi-nn: the `openai` component driven by the official OpenAI
//! Python client (streaming included), malformed models, a client that disconnects mid-stream,
//! and concurrent generations decoded together in batches.

use crate::support::{artifacts, config_file, TestNode};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

/// The text of a streamed completion: its server-sent events' `choices[0].text`, joined.
fn streamed_text(events: &str) -> String {
    events
        .lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| {
            let event: serde_json::Value = serde_json::from_str(data).unwrap();
            event["choices"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

/// Generations here assert what is generated, not how fast: a generous timeout keeps a slow,
/// busy machine from turning them into 504s.
fn with_smollm2_and_openai(node: &TestNode) {
    node.add_smollm2_and_openai(600);
}

#[tokio::test]
async fn the_official_openai_client_chats_streams_and_gets_openai_errors() {
    let _heavy = crate::support::heavy().await;
    let node = TestNode::start();
    with_smollm2_and_openai(&node);
    let models = node.cli_ok(&["models"]);
    assert!(
        models
            .lines()
            .any(|l| l.starts_with("smollm2") && l.contains("ggml") && l.contains("llama.cpp")),
        "{models}"
    );

    let seen = node.run_openai_script("openai_client.py", "smollm2");
    assert!(
        seen["answer"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("paris"),
        "{seen}"
    );
    assert_eq!(
        seen["errors"]["unknown_model"],
        serde_json::json!([404, "model_not_found"]),
        "{seen}"
    );
    assert_eq!(
        seen["errors"]["max_tokens"],
        serde_json::json!([400, "max_tokens"]),
        "{seen}"
    );
    for field in [
        "logit_bias",
        "top_logprobs",
        "presence_penalty",
        "tools",
        "response_format",
        "n",
        "bogus",
    ] {
        assert_eq!(seen["refused"][field], field, "{seen}");
    }
    assert_eq!(seen["errors"]["too_long"][0], 400, "{seen}");
    assert!(
        seen["errors"]["too_long"][1]
            .as_str()
            .unwrap()
            .contains("context window"),
        "{seen}"
    );
}

#[tokio::test]
async fn tools_are_called_through_the_models_own_chat_template() {
    let _heavy = crate::support::heavy().await;
    let node = TestNode::start();
    for (name, model) in [
        ("smollm2", artifacts::smollm2_model()),
        ("smollm2-tools", artifacts::smollm2_tools_model()),
    ] {
        node.cli_ok(&[
            "model",
            "add",
            name,
            model.to_str().unwrap(),
            "--encoding",
            "ggml",
        ]);
    }
    node.cli_ok(&[
        "deploy",
        "--public",
        "openai",
        artifacts::OPENAI,
        "--model",
        "smollm2",
        "--model",
        "smollm2-tools",
    ]);
    let langchain = node.run_openai_script("langchain_client.py", "smollm2-tools");
    assert!(
        langchain["answer"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("paris"),
        "{langchain}"
    );
    let seen = node.run_openai_script("openai_tools.py", "smollm2-tools");
    assert!(
        seen["answer"].as_str().is_some_and(|a| !a.is_empty()),
        "{seen}"
    );
    for (case, param) in [
        ("unknown_tool", "tool_choice"),
        ("choice_without_tools", "tool_choice"),
        ("bad_name", "tools"),
        ("unenforceable", "tools"),
        ("completions", "tools"),
    ] {
        assert_eq!(
            seen["errors"][case],
            serde_json::json!([400, param]),
            "{case}: {seen}"
        );
    }
    let refused = &seen["errors"]["template_without_tools"];
    assert_eq!(
        (&refused[0], &refused[1]),
        (&400.into(), &"tools".into()),
        "{seen}"
    );
    assert!(
        refused[2]
            .as_str()
            .unwrap()
            .contains("does not support tools"),
        "{seen}"
    );
}

#[tokio::test]
async fn a_file_that_is_not_gguf_is_refused() {
    let node = TestNode::start();
    let bogus = node.data_dir.join("bogus.gguf");
    std::fs::write(&bogus, b"GGUF but not really a model at all").unwrap();
    let add_bogus = || {
        let output = node.cli(&[
            "model",
            "add",
            "bogus",
            bogus.to_str().unwrap(),
            "--encoding",
            "ggml",
        ]);
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = add_bogus();
    assert!(
        stderr.contains("400") && stderr.contains("GGUF"),
        "{stderr}"
    );
    std::fs::write(&bogus, b"plain text").unwrap();
    let stderr = add_bogus();
    assert!(
        stderr.contains("400") && stderr.contains("not a GGUF model"),
        "{stderr}"
    );
    node.assert_healthy().await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_stream_stops_the_generation() {
    let _heavy = crate::support::heavy().await;
    let node = TestNode::start();
    with_smollm2_and_openai(&node);
    let request = serde_json::json!({
        "model": "smollm2",
        "messages": [{ "role": "user", "content": "Write a very long story about the sea." }],
        "max_tokens": 1500,
        "stream": true,
    });
    let response = node
        .post_json("/apps/openai/v1/chat/completions", &request)
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut events = response.bytes_stream();
    let mut received = 0;
    while received < 5 {
        received += events.next().await.unwrap().unwrap().len().min(1);
    }
    let status = |node: &TestNode| {
        let text = node.cli_ok(&["status"]);
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["running_instances"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(status(&node), 1, "the generation should be running");
    let sequences = || async {
        node.admin_json("/v1/admin/models").await["models"][0]["generation"]["running"].clone()
    };
    assert_eq!(
        sequences().await,
        1,
        "the generation should hold a sequence"
    );
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&node) != 0 || sequences().await != 0 {
        assert!(
            Instant::now() < deadline,
            "the generation kept running (or its sequence) after the client left"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn generations_on_one_model_run_side_by_side() {
    let _heavy = crate::support::heavy().await;
    let node = TestNode::start();
    with_smollm2_and_openai(&node);
    // A long generation (counting goes on and on)…
    let long = serde_json::json!({
        "model": "smollm2", "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1500, "temperature": 0, "stream": true,
    });
    let started = Instant::now();
    let response = node.post_json("/apps/openai/v1/completions", &long).await;
    let mut long_events = response.bytes_stream();
    long_events.next().await.unwrap().unwrap();
    // …does not hold up a second one on the same model: it ends while the first still runs.
    let short = serde_json::json!({
        "model": "smollm2", "messages": [{ "role": "user", "content": "Hi!" }], "max_tokens": 8, "stream": true,
    });
    let response = node
        .post_json("/apps/openai/v1/chat/completions", &short)
        .await;
    let mut short_events = response.bytes_stream();
    short_events.next().await.unwrap().unwrap();
    let mut rest = Vec::new();
    while let Some(chunk) = short_events.next().await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    assert!(String::from_utf8(rest)
        .unwrap()
        .trim_end()
        .ends_with("data: [DONE]"));
    let status: serde_json::Value = serde_json::from_str(&node.cli_ok(&["status"])).unwrap();
    assert_eq!(
        status["running_instances"],
        1,
        "the long generation should still be running ({:?} in)",
        started.elapsed()
    );
    drop(long_events);
}

#[tokio::test]
async fn concurrent_generations_share_batches_and_match_sequential_ones() {
    let _heavy = crate::support::heavy().await;
    // One lane (its threads span every core) batching up to three sequences: three generations
    // at once are decoded together.
    let cores = std::thread::available_parallelism().unwrap().get();
    let config = config_file(&format!(
        "[nn]\nthreads = {cores}\nllm_batch_sequences = 3\n"
    ));
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    with_smollm2_and_openai(&node);
    let prompts = ["1, 2, 3, 4,", "The sea is", "Edge computing means"];
    let request = |prompt: &str, stream: bool| {
        serde_json::json!({
            "model": "smollm2", "prompt": prompt, "max_tokens": 64, "temperature": 0, "stop": [],
            "stream": stream,
        })
    };
    let activity = || async {
        let models = node.admin_json("/v1/admin/models").await;
        models["models"][0]["generation"].clone()
    };

    let mut sequential = Vec::new();
    for prompt in prompts {
        let response = node
            .post_json("/apps/openai/v1/completions", &request(prompt, false))
            .await;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        sequential.push(body["choices"][0]["text"].as_str().unwrap().to_string());
    }
    let before = activity().await;
    assert_eq!(before["lanes"], 1);
    assert_eq!(before["sequences_per_lane"], 3);
    assert_eq!(
        before["decode_passes"], before["decoded_tokens"],
        "one generation at a time decodes one token per forward pass"
    );

    // Three streamed generations, each started and read up to its first token before the
    // next starts: all three are then in the lane together, however late each request
    // arrived, and the rest of them is read at once.
    let mut streams = Vec::new();
    for prompt in prompts {
        let response = node
            .post_json("/apps/openai/v1/completions", &request(prompt, true))
            .await;
        assert_eq!(response.status(), 200);
        let mut events = response.bytes_stream();
        let first = events.next().await.unwrap().unwrap().to_vec();
        streams.push((first, events));
    }
    let concurrent = futures_util::future::join_all(streams.into_iter().map(
        |(mut received, mut events)| async move {
            while let Some(chunk) = events.next().await {
                received.extend_from_slice(&chunk.unwrap());
            }
            streamed_text(&String::from_utf8(received).unwrap())
        },
    ))
    .await;
    assert_eq!(concurrent, sequential, "greedy texts differ when batched");
    let after = activity().await;
    let passes =
        after["decode_passes"].as_u64().unwrap() - before["decode_passes"].as_u64().unwrap();
    let tokens =
        after["decoded_tokens"].as_u64().unwrap() - before["decoded_tokens"].as_u64().unwrap();
    assert!(
        tokens as f64 / passes as f64 >= 1.5,
        "{tokens} tokens in {passes} forward passes: the generations were not batched"
    );
    assert_eq!(after["waiting"], 0);
    // Finished generations give their sequences back as their instances go.
    let deadline = Instant::now() + Duration::from_secs(30);
    while activity().await["running"] != 0 {
        assert!(Instant::now() < deadline, "sequences were not freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let models = node.cli_ok(&["models"]);
    assert!(models.contains("0/3 running"), "{models}");
}

#[tokio::test]
async fn a_prompt_longer_than_one_batch_is_decoded_whole() {
    let _heavy = crate::support::heavy().await;
    let node = TestNode::start();
    with_smollm2_and_openai(&node);
    // About 1 500 tokens: three 512-token pieces. The model can only continue the count if it
    // saw the end of the prompt in place.
    let prompt: String = (1..=400).map(|n| format!("{n}, ")).collect();
    let body = serde_json::json!({
        "model": "smollm2", "prompt": prompt.trim_end(), "max_tokens": 12, "temperature": 0, "stop": [],
    });
    let response = node.post_json("/apps/openai/v1/completions", &body).await;
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let text = body["choices"][0]["text"].as_str().unwrap();
    assert!(text.trim_start().starts_with("401, 402"), "{text:?}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 1024);

    // The node metered the same tokens for the app, and the model's inference time.
    let usage = node.admin_json("/v1/admin/usage?app=openai").await;
    let metered = &usage["totals"]["openai"];
    assert_eq!(
        metered["prompt_tokens"], body["usage"]["prompt_tokens"],
        "{usage}"
    );
    assert_eq!(
        metered["completion_tokens"], body["usage"]["completion_tokens"],
        "{usage}"
    );
    assert!(
        metered["inference_us"]["smollm2"].as_u64().unwrap() > 0,
        "{usage}"
    );
}

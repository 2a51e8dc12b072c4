//! State through wasi:keyvalue on sled: CRUD, atomic increments and compare-and-swap, atomic
//! batches, leases, a workflow with compensation, and durability of every acknowledged write
//! across SIGKILL.

use crate::support::{artifacts, TestNode};

#[tokio::test]
async fn acknowledged_increments_survive_sigkill() {
    let mut node = TestNode::start();
    node.deploy_ok("kv-counter", artifacts::KV_COUNTER, "")
        .await;
    const N: i64 = 25;
    for expected in 1..=N {
        let response = node.post("/apps/kv-counter/count").await;
        assert_eq!(response.status(), 200);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["count"], expected);
    }
    node.kill();
    let data_dir = node.take_data_dir();
    let restarted = TestNode::start_in(data_dir.path(), &[]);
    let (status, body) = restarted.get("/apps/kv-counter/count").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["count"],
        N
    );
}

#[tokio::test]
async fn items_can_be_stored_listed_and_deleted() {
    let node = TestNode::start();
    node.deploy_ok("kv-counter", artifacts::KV_COUNTER, "")
        .await;
    for (key, value) in [("b", "second"), ("a", "first")] {
        let response = node
            .client
            .put(node.at(&format!("/apps/kv-counter/items/{key}")))
            .body(value)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 204);
    }
    assert_eq!(
        node.get("/apps/kv-counter/items/a").await,
        (200, "first".to_string())
    );
    let (_, keys) = node.get("/apps/kv-counter/items").await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&keys).unwrap()["keys"],
        serde_json::json!(["a", "b"])
    );
    let response = node
        .client
        .delete(node.at("/apps/kv-counter/items/a"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(node.get("/apps/kv-counter/items/a").await.0, 404);

    // Another app has its own buckets: it cannot see kv-counter's items.
    node.deploy_ok("other", artifacts::KV_COUNTER, "").await;
    assert_eq!(node.get("/apps/other/items/b").await.0, 404);
    assert_eq!(
        node.get("/apps/kv-counter/items/b").await,
        (200, "second".to_string())
    );
}

#[tokio::test]
async fn concurrent_compare_and_swap_appends_all_land() {
    let node = TestNode::start();
    node.deploy_ok("kv-counter", artifacts::KV_COUNTER, "")
        .await;
    let appends = (0..8).map(|i| {
        let (client, url) = (
            node.client.clone(),
            node.at("/apps/kv-counter/items/log/append"),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .body(format!("{i};"))
                .send()
                .await
                .unwrap()
                .status()
        })
    });
    for append in appends.collect::<Vec<_>>() {
        assert_eq!(append.await.unwrap(), 200);
    }
    let (_, log) = node.get("/apps/kv-counter/items/log").await;
    let mut entries: Vec<&str> = log.split(';').filter(|s| !s.is_empty()).collect();
    entries.sort();
    assert_eq!(entries, ["0", "1", "2", "3", "4", "5", "6", "7"]);
}

#[tokio::test]
async fn an_app_past_its_key_value_quota_gets_an_error_and_nothing_is_written() {
    let config = crate::support::config_file(
        "[limits]\nkv_max_keys_per_app = 3\nkv_max_bytes_per_app = 4096\n",
    );
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("kv-counter", artifacts::KV_COUNTER, "")
        .await;
    let put = |key: &str, value: Vec<u8>| {
        let request = node
            .client
            .put(node.at(&format!("/apps/kv-counter/items/{key}")))
            .body(value);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    for key in ["a", "b", "c"] {
        assert_eq!(put(key, b"small".to_vec()).await.0, 204);
    }
    let (status, body) = put("d", b"small".to_vec()).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("quota of 3 keys"), "{body}");
    assert_eq!(node.get("/apps/kv-counter/items/d").await.0, 404);
    // Replacing a value is not a new key, but bytes count too.
    assert_eq!(put("a", b"replaced".to_vec()).await.0, 204);
    let (status, body) = put("b", vec![b'x'; 5000]).await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("kv_max_bytes_per_app"), "{body}");
    assert_eq!(
        node.get("/apps/kv-counter/items/b").await,
        (200, "small".to_string())
    );
    // Deleting frees a key for another.
    let deleted = node
        .client
        .delete(node.at("/apps/kv-counter/items/c"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_eq!(put("d", b"small".to_vec()).await.0, 204);
}

/// `/kv?keys=…` of the `orders` app: each key's value, or null.
async fn orders_state(node: &TestNode, keys: &str) -> serde_json::Value {
    let (status, body) = node.get(&format!("/apps/orders/kv?keys={keys}")).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn a_two_step_workflow_compensates_atomically_under_a_lease() {
    let config = crate::support::config_file("[limits]\nkv_max_keys_per_app = 4\n");
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);
    node.deploy_ok("orders", artifacts::MISBEHAVE, "").await;

    // Both steps succeed.
    assert_eq!(
        node.get("/apps/orders/order?id=1").await,
        (200, "charged".to_string())
    );
    assert_eq!(
        orders_state(&node, "order/1,stock/1").await,
        serde_json::json!({"order/1": "charged", "stock/1": "1"})
    );
    // Step 2 fails: the compensation ran and nothing of step 1 is left.
    assert_eq!(
        node.get("/apps/orders/order?id=2&fail=1").await,
        (500, "compensated".to_string())
    );
    assert_eq!(
        orders_state(&node, "order/2,stock/2").await,
        serde_json::json!({"order/2": null, "stock/2": null})
    );
    // The workflow's lease was let go with its instance.
    assert_eq!(node.get("/apps/orders/lease?name=order-2").await.0, 200);

    // A batch past the key quota writes none of its keys (2 are used, 4 allowed).
    let (status, body) = node.get("/apps/orders/batch?keys=a,b,c").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("kv_max_keys_per_app"), "{body}");
    assert_eq!(
        orders_state(&node, "a,b,c").await,
        serde_json::json!({"a": null, "b": null, "c": null})
    );
    assert_eq!(node.get("/apps/orders/batch?keys=a,b").await.0, 200);
}

#[tokio::test]
async fn a_lease_has_one_holder_and_is_released_by_a_trap_or_its_expiry() {
    let node = TestNode::start();
    node.deploy_ok("orders", artifacts::MISBEHAVE, "").await;

    // Held by a long request: another instance finds it busy until it ends.
    let holder = {
        let client = node.client.clone();
        let url = node.at("/apps/orders/lease?name=x&hold=1500");
        tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        node.get("/apps/orders/lease?name=x").await,
        (409, "busy".to_string())
    );
    assert_eq!(holder.await.unwrap(), 200);
    assert_eq!(node.get("/apps/orders/lease?name=x").await.0, 200);

    // An instance that traps while holding a lease lets it go.
    assert_eq!(node.get("/apps/orders/lease-trap?name=t").await.0, 500);
    assert_eq!(node.get("/apps/orders/lease?name=t").await.0, 200);

    // A lease whose time ran out is taken by the next instance, though its holder still runs.
    let slow = {
        let client = node.client.clone();
        let url = node.at("/apps/orders/lease?name=e&ttl=200&hold=1500");
        tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(node.get("/apps/orders/lease?name=e").await.0, 200);
    assert_eq!(slow.await.unwrap(), 200);

    // Bad input is a clean error for the guest.
    assert_eq!(node.get("/apps/orders/lease?name=x&ttl=0").await.0, 400);
    assert_eq!(
        node.get("/apps/orders/lease?name=x&ttl=600000").await.0,
        400
    );
}

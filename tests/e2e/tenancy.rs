//! Tenants, API keys and roles against a real node: every kind of bad credential on every
//! route, tenants that cannot see each other, capability allow-lists, and keys made with the
//! CLI.

use crate::support::{artifacts, error_code, TestNode};
use reqwest::Method;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// A key made through the admin API with `creator`'s key.
async fn make_key(node: &TestNode, creator: &str, body: Value) -> (u16, Value) {
    let response = node
        .client
        .post(node.at("/v1/admin/keys"))
        .bearer_auth(creator)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// `method path` with `key` (none when empty); status and body.
async fn call(node: &TestNode, method: Method, path: &str, key: &str) -> (u16, String) {
    let mut request = node.client.request(method, node.at(path));
    if !key.is_empty() {
        request = request.bearer_auth(key);
    }
    if path.ends_with("/traffic") {
        request = request.json(&json!({ "split": [{ "revision": "latest", "percent": 100 }] }));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Deploys the hello component as `app` with `key`, with the query settings `query`.
async fn deploy_with(node: &TestNode, key: &str, app: &str, query: &str) -> (u16, String) {
    let response = node
        .client
        .put(node.at(&format!("/v1/admin/apps/{app}?{query}")))
        .bearer_auth(key)
        .body(std::fs::read(artifacts::HELLO).unwrap())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Deploys `component` as `app` with `key` and the manifest `manifest` (as JSON).
async fn deploy_manifest(
    node: &TestNode,
    key: &str,
    app: &str,
    component: &str,
    manifest: Value,
) -> (u16, String) {
    let form = reqwest::multipart::Form::new()
        .text("manifest", manifest.to_string())
        .part(
            "component",
            reqwest::multipart::Part::bytes(std::fs::read(component).unwrap()),
        );
    let response = node
        .client
        .put(node.at(&format!("/v1/admin/apps/{app}")))
        .bearer_auth(key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// The keys of the matrix: one per kind of caller.
struct Keys {
    operator: String,
    acme_admin: String,
    acme_deployer: String,
    acme_invoker: String,
    acme_reader: String,
    acme_expired: String,
    acme_revoked: String,
    globex_admin: String,
    globex_invoker: String,
}

async fn setup(node: &TestNode) -> Keys {
    let operator = node.token.clone();
    for tenant in ["acme", "globex"] {
        let (status, body) = call(
            node,
            Method::PUT,
            &format!("/v1/admin/tenants/{tenant}"),
            &operator,
        )
        .await;
        assert_eq!(status, 201, "{body}");
    }
    let key = |tenant: &'static str, role: &'static str| {
        let operator = operator.clone();
        async move {
            let (status, body) = make_key(
                node,
                &operator,
                json!({ "tenant": tenant, "role": role, "description": format!("{tenant} {role}") }),
            )
            .await;
            assert_eq!(status, 201, "{body}");
            body["key"]["key"].as_str().unwrap().to_string()
        }
    };
    let acme_admin = key("acme", "admin").await;
    let (status, expired) = make_key(
        node,
        &acme_admin,
        json!({ "role": "invoker", "expires_in_secs": 1 }),
    )
    .await;
    assert_eq!(status, 201, "{expired}");
    let (status, revoked) = make_key(node, &acme_admin, json!({ "role": "invoker" })).await;
    assert_eq!(status, 201, "{revoked}");
    let (status, body) = call(
        node,
        Method::DELETE,
        &format!("/v1/admin/keys/{}", revoked["key"]["id"].as_str().unwrap()),
        &acme_admin,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let keys = Keys {
        operator: operator.clone(),
        acme_deployer: key("acme", "deployer").await,
        acme_invoker: key("acme", "invoker").await,
        acme_reader: key("acme", "reader").await,
        acme_expired: expired["key"]["key"].as_str().unwrap().to_string(),
        acme_revoked: revoked["key"]["key"].as_str().unwrap().to_string(),
        globex_admin: key("globex", "admin").await,
        globex_invoker: key("globex", "invoker").await,
        acme_admin,
    };
    let (status, body) = deploy_with(node, &keys.acme_deployer, "acme-app", "").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = deploy_with(node, &keys.globex_admin, "globex-app", "").await;
    assert_eq!(status, 200, "{body}");
    // Let the short-lived key expire.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    keys
}

/// An error answer carries the error and nothing of the app.
fn assert_no_data(body: &str) {
    let value: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("{body}"));
    assert_eq!(
        value
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["error".to_string()]),
        "{body}"
    );
}

#[tokio::test]
async fn every_route_refuses_bad_keys_other_tenants_and_wrong_roles() {
    let node = TestNode::start();
    let keys = setup(&node).await;

    // Invoking a private app.
    let invoke = "/apps/acme-app/?name=key";
    for (who, key, expected) in [
        ("no key", "", 404),
        ("a bad key", "tlk_0000", 401),
        ("an expired key", keys.acme_expired.as_str(), 401),
        ("a revoked key", keys.acme_revoked.as_str(), 401),
        ("the wrong role", keys.acme_reader.as_str(), 403),
        ("another tenant's key", keys.globex_invoker.as_str(), 404),
        ("another tenant's admin", keys.globex_admin.as_str(), 404),
        ("its invoker", keys.acme_invoker.as_str(), 200),
        ("its deployer", keys.acme_deployer.as_str(), 200),
        ("the operator", keys.operator.as_str(), 200),
    ] {
        for path in [invoke.to_string(), "/async/acme-app/".to_string()] {
            let method = if path.starts_with("/async") {
                Method::POST
            } else {
                Method::GET
            };
            let (status, body) = call(&node, method, &path, key).await;
            let expected = match (expected, path.starts_with("/async")) {
                (200, true) => 202,
                (other, _) => other,
            };
            assert_eq!(status, expected, "{who} on {path}: {body}");
            if expected >= 400 {
                assert_no_data(&body);
            }
        }
    }
    // Another tenant's app and an absent one are the same answer.
    let (_, forbidden) = call(&node, Method::GET, invoke, &keys.globex_invoker).await;
    let (_, absent) = call(&node, Method::GET, "/apps/no-such/", &keys.globex_invoker).await;
    assert_eq!(
        forbidden.replace("acme-app", "X"),
        absent.replace("no-such", "X")
    );
    let (_, anonymous) = call(&node, Method::GET, invoke, "").await;
    assert_eq!(anonymous, forbidden);

    // The admin API: every app route, every credential.
    let app_routes = [
        (Method::GET, "/v1/admin/apps/acme-app", false),
        (Method::GET, "/v1/admin/apps/acme-app/secrets", false),
        (Method::GET, "/v1/admin/apps/acme-app/logs", false),
        (Method::GET, "/v1/admin/apps/acme-app/dead-letters", false),
        (Method::PUT, "/v1/admin/apps/acme-app/traffic", true),
        (Method::POST, "/v1/admin/apps/acme-app/rollback", true),
        (Method::PUT, "/v1/admin/apps/acme-app/secrets/token", true),
        (Method::DELETE, "/v1/admin/apps/acme-app/dead-letters", true),
        (Method::DELETE, "/v1/admin/apps/acme-app", true),
    ];
    for (method, path, changes) in &app_routes {
        for (who, key, expected) in [
            ("no key", "", 401),
            ("a bad key", "tlk_0000", 401),
            ("an expired key", keys.acme_expired.as_str(), 401),
            ("a revoked key", keys.acme_revoked.as_str(), 401),
            ("another tenant's admin", keys.globex_admin.as_str(), 404),
            ("an invoker", keys.acme_invoker.as_str(), 403),
            (
                "a reader",
                keys.acme_reader.as_str(),
                if *changes { 403 } else { 200 },
            ),
        ] {
            let (status, body) = call(&node, method.clone(), path, key).await;
            assert_eq!(status, expected, "{who} on {method} {path}: {body}");
            if expected >= 400 {
                assert_no_data(&body);
                assert!(!body.contains("revision"), "{body}");
            }
        }
    }
    // The node's own routes are the operator's.
    for (method, path) in [
        (Method::GET, "/v1/admin/status"),
        (Method::GET, "/v1/admin/backends"),
        (Method::GET, "/v1/admin/jobs"),
        (Method::GET, "/metrics"),
        (Method::PUT, "/v1/admin/tenants/initech"),
    ] {
        for key in [&keys.acme_admin, &keys.globex_admin] {
            let (status, body) = call(&node, method.clone(), path, key).await;
            assert_eq!(status, 403, "{method} {path}: {body}");
        }
        let (status, body) = call(&node, method.clone(), path, &keys.operator).await;
        assert!(status == 200 || status == 201, "{method} {path}: {body}");
    }

    // Listings show a tenant only its own; the operator sees all.
    let names = |body: String| -> Vec<String> {
        let value: Value = serde_json::from_str(&body).unwrap();
        value["apps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|app| app["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, globex) = call(&node, Method::GET, "/v1/admin/apps", &keys.globex_admin).await;
    assert_eq!(names(globex), vec!["globex-app"]);
    let (_, all) = call(&node, Method::GET, "/v1/admin/apps", &keys.operator).await;
    assert_eq!(names(all).len(), 2);

    // A tenant's admin manages its own keys only; a deployer manages none.
    let (_, listed) = call(&node, Method::GET, "/v1/admin/keys", &keys.acme_admin).await;
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let listed = listed["keys"].as_array().unwrap();
    assert!(listed.iter().all(|key| key["tenant"] == "acme"));
    assert!(!listed.is_empty() && listed.iter().all(|key| key.get("key").is_none()));
    let (_, globex_keys) = call(&node, Method::GET, "/v1/admin/keys", &keys.globex_admin).await;
    let globex_key_id = serde_json::from_str::<Value>(&globex_keys).unwrap()["keys"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) = call(
        &node,
        Method::DELETE,
        &format!("/v1/admin/keys/{globex_key_id}"),
        &keys.acme_admin,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = make_key(&node, &keys.acme_deployer, json!({ "role": "admin" })).await;
    assert_eq!(status, 403);
    let (status, _) = make_key(
        &node,
        &keys.acme_admin,
        json!({ "tenant": "globex", "role": "admin" }),
    )
    .await;
    assert_eq!(status, 404);

    // App names are node-wide: another tenant cannot take or change one.
    let (status, body) = deploy_with(&node, &keys.globex_admin, "acme-app", "timeout_secs=3").await;
    assert_eq!((status, error_code(&body).as_str()), (409, "name_taken"));
    let (_, app) = call(
        &node,
        Method::GET,
        "/v1/admin/apps/acme-app",
        &keys.acme_reader,
    )
    .await;
    let app: Value = serde_json::from_str(&app).unwrap();
    assert_eq!(app["app"]["record"]["tenant"], "acme");
    assert_eq!(app["app"]["record"]["latest"], 1);

    // A public app needs no key, and a key it does not know passes through to it.
    let (status, body) = deploy_with(&node, &keys.acme_deployer, "acme-open", "public=true").await;
    assert_eq!(status, 200, "{body}");
    for key in ["", "sk-of-the-apps-own-scheme"] {
        let (status, body) = call(&node, Method::GET, "/apps/acme-open/?name=all", key).await;
        assert_eq!((status, body.as_str()), (200, "Hello, all!\n"));
    }
}

#[tokio::test]
async fn another_tenants_app_answers_like_an_absent_one_in_time_too() {
    let node = TestNode::start();
    let keys = setup(&node).await;
    // Interleaved, so that drift in the machine's speed hits both alike.
    let (mut forbidden, mut absent) = (Vec::new(), Vec::new());
    for _ in 0..300 {
        for (path, samples) in [
            ("/apps/acme-app/", &mut forbidden),
            ("/apps/no-such-app/", &mut absent),
        ] {
            let started = Instant::now();
            let (status, _) = call(&node, Method::GET, path, &keys.globex_invoker).await;
            samples.push(started.elapsed());
            assert_eq!(status, 404);
        }
    }
    let median = |samples: &mut Vec<Duration>| {
        samples.sort();
        samples[samples.len() / 2]
    };
    let (forbidden, absent) = (median(&mut forbidden), median(&mut absent));
    let gap = forbidden.abs_diff(absent);
    assert!(
        gap < absent / 5 + Duration::from_micros(100),
        "another tenant's app {forbidden:?} vs an absent one {absent:?}"
    );
}

#[tokio::test]
async fn capabilities_outside_the_allow_lists_are_clean_guest_errors() {
    let node = TestNode::start();
    let keys = setup(&node).await;
    // A tenant's model is its own: another tenant neither sees it nor loads it.
    let model = std::fs::read(artifacts::text_orientation_model()).unwrap();
    let response = node
        .client
        .put(node.at("/v1/admin/models/acme-model"))
        .bearer_auth(&keys.acme_deployer)
        .body(model.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let (status, _) = call(
        &node,
        Method::GET,
        "/v1/admin/models/acme-model",
        &keys.globex_admin,
    )
    .await;
    assert_eq!(status, 404);
    let (_, listed) = call(&node, Method::GET, "/v1/admin/models", &keys.globex_admin).await;
    assert!(!listed.contains("acme-model"), "{listed}");
    let response = node
        .client
        .put(node.at("/v1/admin/models/acme-model"))
        .bearer_auth(&keys.globex_admin)
        .body(model)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 409);

    let all_open = |models: &[&str]| {
        json!({
            "app": { "public": true, "models": models, "buckets": ["orders"] },
            "outbound": { "allowed_hosts": ["acme-app.internal", "acme-open.internal"] },
        })
    };
    let (status, body) = deploy_manifest(
        &node,
        &keys.acme_deployer,
        "acme-worker",
        artifacts::MISBEHAVE,
        all_open(&["acme-model"]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = deploy_manifest(
        &node,
        &keys.globex_admin,
        "globex-worker",
        artifacts::MISBEHAVE,
        all_open(&["acme-model"]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &node,
        Method::GET,
        "/apps/acme-worker/infer?model=acme-model",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(
        &node,
        Method::GET,
        "/apps/globex-worker/infer?model=acme-model",
        "",
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (500, "model_error"),
        "{body}"
    );
    assert!(body.contains("no model named"), "{body}");

    // Buckets: only those declared open; another is refused to the guest as access denied.
    let (status, body) = call(&node, Method::GET, "/apps/acme-worker/flaky", "").await;
    assert_eq!(status, 500, "{body}");
    assert!(body.to_lowercase().contains("access"), "{body}");
    let (status, body) = call(&node, Method::POST, "/apps/acme-worker/order?id=1", "").await;
    assert_eq!((status, body.as_str()), (200, "charged"));

    // Calls to other apps: the tenant's own, and public ones, but not another tenant's
    // private app, which is not there for the caller.
    let fetch = |app: &str, target: &str| {
        format!("/apps/{app}/fetch?url=http%3A%2F%2F{target}.internal%2F")
    };
    let (status, body) = call(&node, Method::GET, &fetch("acme-worker", "acme-app"), "").await;
    assert_eq!(
        (status, body.starts_with("status 200")),
        (200, true),
        "{body}"
    );
    let (status, body) = call(&node, Method::GET, &fetch("globex-worker", "acme-app"), "").await;
    assert_eq!(
        (status, body.starts_with("status 404")),
        (200, true),
        "{body}"
    );
    let (status, body) = deploy_with(&node, &keys.acme_deployer, "acme-open", "public=true").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = call(&node, Method::GET, &fetch("globex-worker", "acme-open"), "").await;
    assert_eq!(
        (status, body.starts_with("status 200")),
        (200, true),
        "{body}"
    );
    node.assert_healthy().await;
}

#[tokio::test]
async fn keys_made_with_the_cli_work_once_shown_and_stop_when_revoked() {
    let node = TestNode::start();
    node.cli_ok(&["tenant", "add", "acme"]);
    let made = node.cli(&[
        "key",
        "create",
        "--tenant",
        "acme",
        "--role",
        "deployer",
        "--description",
        "ci",
        "--expires-in",
        "30d",
    ]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let key = String::from_utf8(made.stdout).unwrap().trim().to_string();
    assert!(key.starts_with("tlk_"), "{key}");
    // The key works for the CLI too, and the node keeps only its digest.
    let whoami = node.cli_ok(&["--token", &key, "whoami"]);
    assert!(whoami.contains("tenant acme (deployer)"), "{whoami}");
    let listed = node.cli_ok(&["key", "list", "--tenant", "acme"]);
    assert!(listed.contains("acme  deployer  active  ci"), "{listed}");
    assert!(!listed.contains(&key[4..]), "{listed}");
    let deployed = node.cli_ok(&["--token", &key, "deploy", "mine", artifacts::HELLO]);
    assert!(deployed.contains("deployed mine"), "{deployed}");
    assert_eq!(listed.lines().count(), 1, "{listed}");
    let id = listed.split_whitespace().next().unwrap().to_string();
    node.cli_ok(&["key", "revoke", &id]);
    let refused = node.cli(&["--token", &key, "whoami"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let listed = node.cli_ok(&["key", "list", "--tenant", "acme"]);
    assert!(listed.contains("revoked"), "{listed}");
    // A tenant that owns an app is not removed; once empty it is, and its keys with it.
    let refused = node.cli(&["tenant", "remove", "acme"]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("still owns 1 apps"));
    node.cli_ok(&["remove", "mine"]);
    node.cli_ok(&["tenant", "remove", "acme"]);
    assert!(!node.cli_ok(&["tenant", "list"]).contains("acme"));
}

#[tokio::test]
async fn a_new_admin_token_replaces_the_operators_key_and_private_apps_stay_private() {
    // A node's admin token is the operator's key from its first start on: replacing the file
    // (and restarting) replaces the key, and the old token stops working.
    let mut node = TestNode::start();
    node.deploy_ok("hello", artifacts::HELLO, "public=false")
        .await;
    let old = node.token.clone();
    node.terminate();
    let dir = node.take_data_dir();
    std::fs::remove_file(dir.path().join("admin-token")).unwrap();
    let node = TestNode::start_in(dir.path(), &[]);
    assert_ne!(node.token, old);
    let (status, _) = call(&node, Method::GET, "/v1/admin/apps", &old).await;
    assert_eq!(status, 401);
    let (status, body) = call(&node, Method::GET, "/apps/hello/", &node.token).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = call(&node, Method::GET, "/apps/hello/", "").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_tenant_takes_no_other_tenants_paths_data_or_keys() {
    let node = TestNode::start();
    let keys = setup(&node).await;
    // Routes: not another tenant's, nor under one, nor `/`; and its app is not named.
    let routed = json!({ "app": { "public": true, "routes": ["/acme-svc"] } });
    let (status, body) = deploy_manifest(
        &node,
        &keys.acme_deployer,
        "acme-routed",
        artifacts::HELLO,
        routed,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for (routes, expected) in [
        (json!(["/acme-svc"]), 409),
        (json!(["/acme-svc/v1"]), 409),
        (json!(["/"]), 400),
    ] {
        let manifest = json!({ "app": { "public": true, "routes": routes } });
        let (status, body) = deploy_manifest(
            &node,
            &keys.globex_admin,
            "globex-routed",
            artifacts::HELLO,
            manifest,
        )
        .await;
        assert_eq!(status, expected, "{routes}: {body}");
        assert!(!body.contains("acme-routed"), "{body}");
    }
    let (status, body) = call(&node, Method::GET, "/acme-svc/?name=route", "").await;
    assert_eq!((status, body.as_str()), (200, "Hello, route!\n"));

    // Key-value data stays with its tenant: another tenant taking a removed app's name starts
    // from nothing.
    let counter = json!({ "app": { "public": true, "buckets": ["default"] } });
    let count = |node: &TestNode| {
        let client = node.client.clone();
        let url = node.at("/apps/counter/count");
        async move {
            let response = client.post(url).send().await.unwrap();
            response.json::<Value>().await.unwrap()["count"].clone()
        }
    };
    let (status, body) = deploy_manifest(
        &node,
        &keys.acme_deployer,
        "counter",
        artifacts::KV_COUNTER,
        counter.clone(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&node).await, 1);
    assert_eq!(count(&node).await, 2);
    let (status, _) = call(
        &node,
        Method::DELETE,
        "/v1/admin/apps/counter",
        &keys.acme_deployer,
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = deploy_manifest(
        &node,
        &keys.globex_admin,
        "counter",
        artifacts::KV_COUNTER,
        counter,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&node).await, 1, "globex saw acme's counter");
}

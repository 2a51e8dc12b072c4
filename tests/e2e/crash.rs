//! A crash loop in the style of sled's own crash tests, but stricter: the node is SIGKILLed at a
//! random moment while clients increment counters, deploy apps and add models; after every
//! restart the store opens, everything the node acknowledged is there, no half-written file is
//! left behind, and the blob store holds exactly the files the records point to.

use crate::support::{artifacts, TestNode};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Kill-and-restart cycles. Each runs the clients for a random 0.2–1.5 s.
const CYCLES: usize = 30;

/// What the node answered 2xx to, so far.
#[derive(Default)]
struct Acknowledged {
    /// The highest counter value a client was told.
    count: i64,
    apps: Vec<String>,
    models: Vec<String>,
}

/// The blobs that are neither a record's file nor derived from one: a file whose deploy or
/// model add was never acknowledged must not outlive the restart.
fn unreferenced_blobs(data_dir: &Path, records: &[&serde_json::Value]) -> Vec<String> {
    let referenced: BTreeSet<&str> = records
        .iter()
        .flat_map(|list| list.as_array().unwrap())
        .flat_map(|record| match record["revisions"].as_array() {
            // An app holds the components of its revisions; a model its file.
            Some(revisions) => revisions.iter().collect(),
            None => vec![record],
        })
        .map(|record| record["digest"].as_str().unwrap())
        .collect();
    std::fs::read_dir(data_dir.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| !referenced.contains(name.split('.').next().unwrap()))
        .collect()
}

/// Files an interrupted write may leave: the staged names of `write_durably`, uploads in tmp/.
fn stray_files(data_dir: &Path) -> Vec<String> {
    let mut stray = Vec::new();
    for folder in ["blobs", "tls", "."] {
        let Ok(entries) = std::fs::read_dir(data_dir.join(folder)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                stray.push(format!("{folder}/{name}"));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(data_dir.join("tmp")) {
        stray.extend(
            entries
                .flatten()
                .map(|e| format!("tmp/{:?}", e.file_name())),
        );
    }
    stray
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_across_a_loop_of_sigkills() {
    let _heavy = crate::support::heavy().await;
    let mut node = TestNode::start();
    node.deploy_ok("kv-counter", artifacts::KV_COUNTER, "")
        .await;
    let data = node.take_data_dir();
    drop(node);
    let model = std::fs::read(artifacts::text_orientation_model()).unwrap();
    let hello = std::fs::read(artifacts::HELLO).unwrap();
    let acknowledged = Arc::new(Mutex::new(Acknowledged::default()));
    let started = Instant::now();

    for cycle in 0..CYCLES {
        let mut node = TestNode::start_in(data.path(), &[]);
        // After every restart: the store opened (the node answers), and everything
        // acknowledged before the kill is there.
        let stray = stray_files(data.path());
        assert!(stray.is_empty(), "cycle {cycle}: stray files {stray:?}");
        {
            let (status, body) = node.get("/apps/kv-counter/count").await;
            assert_eq!(status, 200, "cycle {cycle}: {body}");
            let count = serde_json::from_str::<serde_json::Value>(&body).unwrap()["count"]
                .as_i64()
                .unwrap();
            let apps = node.admin_json("/v1/admin/apps").await;
            let models = node.admin_json("/v1/admin/models").await;
            let orphans = unreferenced_blobs(data.path(), &[&apps["apps"], &models["models"]]);
            assert!(
                orphans.is_empty(),
                "cycle {cycle}: orphan blobs {orphans:?}"
            );
            let seen = acknowledged.lock().unwrap();
            assert!(
                count >= seen.count,
                "cycle {cycle}: the counter is {count} but {} was acknowledged",
                seen.count
            );
            let deployed: Vec<&str> = apps["apps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a["name"].as_str().unwrap())
                .collect();
            for app in &seen.apps {
                assert!(
                    deployed.contains(&app.as_str()),
                    "cycle {cycle}: {app} lost"
                );
            }
            for name in &seen.models {
                let record = models["models"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|m| m["name"] == name.as_str())
                    .unwrap_or_else(|| panic!("cycle {cycle}: model {name} lost"));
                assert_eq!(record["loaded"], true, "cycle {cycle}: {record}");
            }
        }

        // Clients: four incrementing, one deploying, one adding models, until the kill.
        let mut clients = Vec::new();
        for _ in 0..4 {
            let (client, url, seen) = (
                node.client.clone(),
                node.at("/apps/kv-counter/count"),
                acknowledged.clone(),
            );
            clients.push(tokio::spawn(async move {
                while let Ok(response) = client.post(&url).send().await {
                    let Ok(body) = response.json::<serde_json::Value>().await else {
                        break;
                    };
                    let count = body["count"].as_i64().unwrap();
                    let mut seen = seen.lock().unwrap();
                    seen.count = seen.count.max(count);
                }
            }));
        }
        let admin = |path: String, body: Vec<u8>| {
            let request = node
                .client
                .put(node.at(&path))
                .bearer_auth(&node.token)
                .body(body);
            async move { request.send().await.is_ok_and(|r| r.status() == 200) }
        };
        // The kill comes at a random moment, whatever is in flight then.
        let deadline =
            tokio::time::sleep(Duration::from_millis(200 + rand::random::<u64>() % 1300));
        tokio::pin!(deadline);
        for n in 0.. {
            let app = format!("app-{cycle}-{n}");
            let deploy = admin(format!("/v1/admin/apps/{app}"), hello.clone());
            // One model per cycle: every restart loads them all.
            let name = (n == 0).then(|| format!("model-{cycle}"));
            let add = async {
                match &name {
                    Some(name) => {
                        admin(
                            format!("/v1/admin/models/{name}?encoding=onnx"),
                            model.clone(),
                        )
                        .await
                    }
                    None => false,
                }
            };
            let (deployed, added) = tokio::select! {
                both = async { tokio::join!(deploy, add) } => both,
                () = &mut deadline => break,
            };
            let mut seen = acknowledged.lock().unwrap();
            if deployed {
                seen.apps.push(app);
            }
            if let (true, Some(name)) = (added, name) {
                seen.models.push(name);
            }
        }
        node.kill();
        for client in clients {
            let _ = client.await;
        }
    }
    let seen = acknowledged.lock().unwrap();
    assert!(seen.count > 0 && !seen.apps.is_empty() && !seen.models.is_empty());
    println!(
        "{CYCLES} SIGKILL cycles in {:?}: {} increments, {} deploys, {} models acknowledged, none lost",
        started.elapsed(),
        seen.count,
        seen.apps.len(),
        seen.models.len()
    );
}

/// `tensorlet --data-dir <dir> <args>`.
fn cli_in(dir: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::support::BINARY)
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running the CLI")
}

#[tokio::test]
async fn a_backup_restores_a_node_whole_and_a_damaged_one_restores_nothing() {
    let mut node = TestNode::start();
    node.deploy_ok("kv-counter", artifacts::KV_COUNTER, "")
        .await;
    for _ in 0..3 {
        assert!(node
            .post("/apps/kv-counter/count")
            .await
            .status()
            .is_success());
    }
    node.add_text_orientation_model();
    node.deploy_ok(
        "worker",
        artifacts::MISBEHAVE,
        "models=text-orientation&public=false",
    )
    .await;
    node.cli_ok(&["tenant", "add", "acme"]);
    let key = node.cli_ok(&["key", "create", "--tenant", "acme", "--role", "reader"]);
    let key = key.trim().to_string();
    let scratch = tempfile::tempdir().unwrap();
    let backup = scratch.path().join("node.backup");
    let backup_arg = backup.to_str().unwrap();

    // A running node is not backed up: its files would not be one state.
    let refused = cli_in(&node.data_dir, &["backup", "--out", backup_arg]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("stop the node"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let token = node.token.clone();
    node.terminate();
    let made = cli_in(&node.data_dir, &["backup", "--out", backup_arg]);
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let restored_dir = scratch.path().join("restored");
    let restored = cli_in(&restored_dir, &["restore", backup_arg]);
    assert!(
        restored.status.success(),
        "{}",
        String::from_utf8_lossy(&restored.stderr)
    );
    let again = cli_in(&restored_dir, &["restore", backup_arg]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("not empty"));

    let restored = TestNode::start_in(&restored_dir, &[]);
    assert_eq!(restored.token, token, "the admin token came back");
    let count: serde_json::Value = restored
        .post("/apps/kv-counter/count")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(count["count"], 4);
    let inferred = restored
        .client
        .get(restored.at("/apps/worker/infer"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(inferred.status(), 200, "{}", inferred.text().await.unwrap());
    let whoami = restored.cli_ok(&["--token", &key, "whoami"]);
    assert!(whoami.contains("tenant acme (reader)"), "{whoami}");

    // One flipped byte anywhere after the manifest: the restore fails and leaves nothing.
    let mut bytes = std::fs::read(&backup).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    let damaged = scratch.path().join("damaged.backup");
    std::fs::write(&damaged, bytes).unwrap();
    let target = scratch.path().join("from-damaged");
    let outcome = cli_in(&target, &["restore", damaged.to_str().unwrap()]);
    assert!(!outcome.status.success());
    assert!(!target.exists());
    let leftovers = std::fs::read_dir(scratch.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with(".tensorlet-restore-")
        })
        .count();
    assert_eq!(leftovers, 0);
}

//! The Kubernetes manifests in deploy/: every resource they make validates against the
//! Kubernetes schema (offline, with kubernetes-validate), the DaemonSet mounts what the node's
//! config names, and nodes started the way the DaemonSet starts them (its config file, its
//! environment) form a cluster through the headless Service's DNS name.

use crate::cluster::{eventually, free_port, sees, write_identity};
use crate::support::TestNode;
use std::process::Command;
use tensorlet::tls::cluster::{ClusterCa, NodeCert};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
/// The Kubernetes version the manifests are checked against (k3s' stable channel).
const KUBERNETES_VERSION: &str = "1.33.0";

#[test]
fn the_manifests_validate_against_the_kubernetes_schema() {
    let output = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/e2e/validate_manifests.py"
        ))
        .args([DEPLOY, KUBERNETES_VERSION])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for kind in ["Namespace", "Service", "DaemonSet"] {
        assert!(printed.contains(&format!("{kind} ")), "{printed}");
    }
    assert!(printed.contains("mounts everything"), "{printed}");
}

/// The shipped config as node `id`'s pod sees it: its paths under `root` instead of the
/// volumes', its node port on `port`, and the Service's name as `localhost` at `seed_port`
/// (on loopback every node has a port of its own).
fn pod_config(shipped: &str, root: &std::path::Path, port: u16, seed_port: u16) -> String {
    let replacements = [
        (
            "/etc/tensorlet/",
            format!("{}/etc/tensorlet/", root.display()),
        ),
        (
            "/var/lib/tensorlet/",
            format!("{}/var/lib/tensorlet/", root.display()),
        ),
        ("\"0.0.0.0:7443\"", format!("\"127.0.0.1:{port}\"")),
        (
            "tensorlet-peers.tensorlet.svc.cluster.local:7443",
            format!("localhost:{seed_port}"),
        ),
    ];
    let mut config = shipped.to_string();
    for (from, to) in replacements {
        assert!(config.contains(from), "deploy/tensorlet.toml has no {from}");
        config = config.replace(from, &to);
    }
    config
}

#[tokio::test]
async fn nodes_started_as_the_daemonset_starts_them_find_each_other_through_dns() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
    let shipped = std::fs::read_to_string(format!("{DEPLOY}/tensorlet.toml")).unwrap();
    let ports = [free_port(), free_port()];
    let mut nodes = Vec::new();
    for (n, id) in ["a", "b"].into_iter().enumerate() {
        let root = dir.path().join(id);
        // What the pod mounts: the cluster's Secret and the node's own certificate.
        let cluster = root.join("etc/tensorlet/cluster");
        let identity = root.join("etc/tensorlet/node");
        std::fs::create_dir_all(&cluster).unwrap();
        std::fs::create_dir_all(&identity).unwrap();
        std::fs::write(cluster.join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::copy(dir.path().join("ca/crl.pem"), cluster.join("crl.pem")).unwrap();
        let issued = ca.issue(&NodeCert::new(&ca.cluster, id, 30)).unwrap();
        write_identity(&identity, "node", &issued.cert_pem, &issued.key_pem);
        let config = root.join("tensorlet.toml");
        std::fs::write(&config, pod_config(&shipped, &root, ports[n], ports[1 - n])).unwrap();
        let data_dir = root.join("var/lib/tensorlet/node");
        let args = ["--config", config.to_str().unwrap()];
        if n == 0 {
            // Without the node id its pod gives it, the config is refused at start.
            let refused = Command::new(crate::support::BINARY)
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(&data_dir)
                .args(args)
                .env_remove("TENSORLET_NODE_ID")
                .output()
                .unwrap();
            assert!(!refused.status.success());
            let stderr = String::from_utf8_lossy(&refused.stderr);
            assert!(
                stderr.contains("cluster.listen needs cluster.node_id"),
                "{stderr}"
            );
        }
        let advertise = format!("127.0.0.1:{}", ports[n]);
        nodes.push(TestNode::start_in_with_env(
            &data_dir,
            &args,
            &[
                ("TENSORLET_NODE_ID", id),
                ("TENSORLET_ADVERTISE", &advertise),
            ],
        ));
    }
    let (a, b) = (&nodes[0], &nodes[1]);
    eventually("the nodes to find each other through DNS", || {
        sees(a, "b", "alive")
    })
    .await;
    eventually("the nodes to find each other through DNS", || {
        sees(b, "a", "alive")
    })
    .await;
    let listed = a.admin_json("/v1/admin/cluster").await;
    let b_member = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "b")
        .unwrap()
        .clone();
    assert_eq!(b_member["addr"], format!("127.0.0.1:{}", ports[1]));
    assert_eq!(b_member["labels"]["region"], "edge");
}

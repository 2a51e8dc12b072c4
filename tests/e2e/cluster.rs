//! A node's port for its cluster against real TLS clients: only a node of the cluster gets
//! through the handshake, every other certificate is refused there, and a new certificate or
//! CRL applies without a restart.

use crate::support::{artifacts, config_file, TestNode};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorlet::tls::cluster::{node_id_of, node_uri, ClusterCa, Issued, NodeCert};
use tensorlet::tls::peer::{PeerFiles, PeerTls};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `cert_pem` and `key_pem` as `<name>.pem` and `<name>.key` in `dir`.
pub(crate) fn write_identity(
    dir: &Path,
    name: &str,
    cert_pem: &str,
    key_pem: &str,
) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&key, key_pem).unwrap();
    std::fs::write(&cert, cert_pem).unwrap();
    (cert, key)
}

/// A client that trusts `ca_pem` and presents `identity` (cert and key PEM) when given.
fn client(ca_pem: &str, identity: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                rustls_pemfile::certs(&mut cert.as_bytes())
                    .map(Result::unwrap)
                    .collect(),
                rustls_pemfile::private_key(&mut key.as_bytes())
                    .unwrap()
                    .unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// `GET /cluster/v1/hello` on node `server_name` at `port`: its JSON answer and the
/// certificate it served, or why the exchange failed.
async fn hello(
    port: u16,
    config: Arc<rustls::ClientConfig>,
    server_name: &str,
) -> Result<(serde_json::Value, CertificateDer<'static>), String> {
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let name = ServerName::try_from(server_name.to_string()).unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let served = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        tls.write_all(b"GET /cluster/v1/hello HTTP/1.1\r\nhost: peer\r\nconnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut answer = Vec::new();
        tls.read_to_end(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&answer);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json = serde_json::from_str(body).map_err(|_| format!("not JSON: {text}"))?;
        Ok((json, served))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Waits (up to 15 s) until `check` holds.
pub(crate) async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn only_nodes_of_the_cluster_pass_the_handshake_and_new_certificates_apply_live() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    let node_dir = dir.path().join("node-a");
    // The CA and node a's identity, made with the CLI as an operator would.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(crate::support::BINARY)
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let ca_path = ca_dir.to_str().unwrap();
    cli(&["cluster", "init", "--name", "edge", "--ca-dir", ca_path]);
    cli(&[
        "cluster",
        "issue",
        "a",
        "--ca-dir",
        ca_path,
        "--out",
        node_dir.to_str().unwrap(),
    ]);
    let crl = node_dir.join("crl.pem");
    std::fs::copy(ca_dir.join("crl.pem"), &crl).unwrap();
    let port = free_port();
    let config = config_file(&format!(
        "[cluster]\nnode_id = \"a\"\nlisten = \"127.0.0.1:{port}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\ncrl = {:?}\nreload_secs = 1\n",
        node_dir.join("ca.pem"),
        node_dir.join("node.pem"),
        node_dir.join("node.key"),
        crl,
    ));
    let node = TestNode::start_with(&["--config", config.path().to_str().unwrap()]);

    let ca = ClusterCa::open(&ca_dir).unwrap();
    let ca_pem = ca.cert_pem().to_string();
    // Node b's identity through the request flow: its key is made on b and never leaves it;
    // the CA signs the request, for node b only.
    let peer_dir = dir.path().join("node-b");
    let peer_path = peer_dir.to_str().unwrap();
    cli(&["cluster", "csr", "b", "--out", peer_path]);
    let request = peer_dir.join("node.csr");
    let signing = |node: &str| {
        std::process::Command::new(crate::support::BINARY)
            .args(["cluster", "sign", node, "--csr", request.to_str().unwrap()])
            .args(["--ca-dir", ca_path, "--out", peer_path])
            .output()
            .unwrap()
    };
    let for_another_node = signing("c");
    assert!(!for_another_node.status.success());
    assert!(!peer_dir.join("node.pem").exists());
    assert!(signing("b").status.success());
    let (b_cert, b_key) = (peer_dir.join("node.pem"), peer_dir.join("node.key"));
    let b = Issued {
        cert_pem: std::fs::read_to_string(&b_cert).unwrap(),
        key_pem: std::fs::read_to_string(&b_key).unwrap(),
    };

    // Node b, through the same TLS a node dials with: it checks that it reached node a.
    let b_tls = PeerTls::load(
        PeerFiles {
            ca: node_dir.join("ca.pem"),
            cert: b_cert.clone(),
            key: b_key.clone(),
            crl: None,
        },
        "b",
    )
    .unwrap();
    let mut dialling = (*b_tls.client_config()).clone();
    dialling.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (answer, _) = hello(port, Arc::new(dialling.clone()), "a").await.unwrap();
    assert_eq!(answer["node"], "a");
    assert_eq!(answer["peer"], "b");
    assert_eq!(answer["cluster"], "edge");
    // A node that answers for another name is not the node dialled.
    assert!(hello(port, Arc::new(dialling), "b").await.is_err());
    // An address dialled without knowing which node is there (a seed found through DNS): any
    // member passes, and the certificate it served says who answered.
    let mut discovering = (*b_tls.discovery_client_config()).clone();
    discovering.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (answer, served) = hello(port, Arc::new(discovering), "127.0.0.1")
        .await
        .unwrap();
    assert_eq!(answer["node"], "a");
    assert_eq!(node_id_of(&served, "edge").as_deref(), Some("a"));

    // Every other caller is refused in the handshake.
    let now = OffsetDateTime::now_utc();
    let other_ca = ClusterCa::init(&dir.path().join("other-ca"), "edge").unwrap();
    // A node of another CA's cluster of the same name does not take node a for a member.
    let stranger = other_ca.issue(&NodeCert::new("edge", "b", 30)).unwrap();
    let (stranger_cert, stranger_key) =
        write_identity(&peer_dir, "stranger", &stranger.cert_pem, &stranger.key_pem);
    let stranger_tls = PeerTls::load(
        PeerFiles {
            ca: dir.path().join("other-ca").join("ca.pem"),
            cert: stranger_cert,
            key: stranger_key,
            crl: None,
        },
        "b",
    )
    .unwrap();
    let mut discovering = (*stranger_tls.discovery_client_config()).clone();
    discovering.alpn_protocols = vec![b"http/1.1".to_vec()];
    let refused = hello(port, Arc::new(discovering), "127.0.0.1").await;
    assert!(refused.unwrap_err().starts_with("handshake"));
    let refused: Vec<(&str, NodeCert, &ClusterCa)> = vec![
        ("another CA", NodeCert::new("edge", "b", 30), &other_ca),
        (
            "expired",
            NodeCert {
                not_before: now - time::Duration::days(10),
                not_after: now - time::Duration::days(1),
                ..NodeCert::new("edge", "b", 30)
            },
            &ca,
        ),
        (
            "not yet valid",
            NodeCert {
                not_before: now + time::Duration::days(1),
                ..NodeCert::new("edge", "b", 30)
            },
            &ca,
        ),
        (
            "a name outside the cluster",
            NodeCert {
                uri: node_uri("other", "b"),
                ..NodeCert::new("edge", "b", 30)
            },
            &ca,
        ),
        (
            "server auth only",
            NodeCert {
                client_auth: false,
                ..NodeCert::new("edge", "b", 30)
            },
            &ca,
        ),
    ];
    let no_certificate = hello(port, client(&ca_pem, None), "a").await;
    assert!(no_certificate.is_err(), "no certificate got through");
    for (what, spec, issuer) in refused {
        let issued = issuer.issue(&spec).unwrap();
        let outcome = hello(
            port,
            client(&ca_pem, Some((&issued.cert_pem, &issued.key_pem))),
            "a",
        )
        .await;
        let error = outcome
            .err()
            .unwrap_or_else(|| panic!("{what}: got through"));
        assert!(error.contains("alert"), "{what}: {error}");
    }

    // Revoked: once the new CRL is in place, the certificate is refused; others still pass.
    let c = ca.issue(&NodeCert::new("edge", "c", 30)).unwrap();
    let c_client = client(&ca_pem, Some((&c.cert_pem, &c.key_pem)));
    let b_client = client(&ca_pem, Some((&b.cert_pem, &b.key_pem)));
    assert!(hello(port, c_client.clone(), "a").await.is_ok());
    let revoked_crl = ca.revoke(&c.cert_pem).unwrap();
    std::fs::copy(&revoked_crl, &crl).unwrap();
    eventually("the CRL to apply", || {
        let c_client = c_client.clone();
        async move { hello(port, c_client, "a").await.is_err() }
    })
    .await;
    assert!(hello(port, b_client.clone(), "a").await.is_ok());

    // Rotation: node a's new certificate is served from the next connection on.
    let (_, before) = hello(port, b_client.clone(), "a").await.unwrap();
    let renewed = ca.issue(&NodeCert::new("edge", "a", 60)).unwrap();
    write_identity(&node_dir, "node", &renewed.cert_pem, &renewed.key_pem);
    let renewed_der = tensorlet::tls::cluster::pem_der(&renewed.cert_pem).unwrap();
    eventually("the new certificate to be served", || {
        let b_client = b_client.clone();
        let renewed_der = renewed_der.clone();
        async move {
            matches!(hello(port, b_client, "a").await, Ok((_, served)) if served.as_ref() == renewed_der.as_slice())
        }
    })
    .await;
    assert_ne!(before.as_ref(), renewed_der.as_slice());
    node.assert_healthy().await;
}

#[test]
fn a_node_refuses_to_start_with_a_certificate_of_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
    let issued = ca.issue(&NodeCert::new("edge", "b", 30)).unwrap();
    let (cert, key) = write_identity(dir.path(), "b", &issued.cert_pem, &issued.key_pem);
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    let config = config_file(&format!(
        "[cluster]\nnode_id = \"a\"\nlisten = \"127.0.0.1:{}\"\nca = {:?}\ncert = {cert:?}\nkey = {key:?}\n",
        free_port(),
        dir.path().join("ca.pem"),
    ));
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(crate::support::BINARY)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args(["--config", config.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("is not a certificate of node \"a\""),
        "{stderr}"
    );
}

/// Starts node `id` of the cluster whose CA is `ca`, its node port on `port`, joining through
/// `seeds` (tried again every second), in `data_dir` (a fresh one when `None`), with label
/// `region = "test-<id>"` and the TOML lines `labels` (more labels). The returned file is its
/// config.
fn start_member(
    ca: &ClusterCa,
    dir: &Path,
    id: &str,
    port: u16,
    seeds: &[String],
    data_dir: Option<&Path>,
    labels: &str,
) -> (TestNode, tempfile::NamedTempFile) {
    let crl = dir.join(format!("{id}-crl.pem"));
    if !crl.exists() {
        std::fs::copy(dir.join("ca").join("crl.pem"), &crl).unwrap();
    }
    let identity = dir.join(id);
    if !identity.exists() {
        std::fs::create_dir_all(&identity).unwrap();
        let issued = ca.issue(&NodeCert::new(&ca.cluster, id, 30)).unwrap();
        write_identity(&identity, "node", &issued.cert_pem, &issued.key_pem);
        std::fs::write(identity.join("ca.pem"), ca.cert_pem()).unwrap();
    }
    let config = config_file(&format!(
        "[cluster]\nnode_id = {id:?}\nlisten = \"127.0.0.1:{port}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\ncrl = {crl:?}\nreload_secs = 1\nseeds = {seeds:?}\nseed_interval_secs = 1\nprobe_period_ms = 500\nsuspect_to_down_ms = 1500\n[cluster.labels]\nregion = \"test-{id}\"\n{labels}",
        identity.join("ca.pem"),
        identity.join("node.pem"),
        identity.join("node.key"),
    ));
    let args = ["--config", config.path().to_str().unwrap()];
    let node = match data_dir {
        Some(data_dir) => TestNode::start_in(data_dir, &args),
        None => TestNode::start_with(&args),
    };
    (node, config)
}

/// What `node` thinks of each member: id → state.
pub(crate) async fn states(node: &TestNode) -> std::collections::BTreeMap<String, String> {
    node.admin_json("/v1/admin/cluster").await["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["state"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub(crate) async fn sees(node: &TestNode, member: &str, state: &str) -> bool {
    states(node).await.get(member).map(String::as_str) == Some(state)
}

#[tokio::test]
async fn members_join_detect_a_kill_heal_a_partition_and_cut_off_a_revoked_node() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let seed = vec![format!("a@127.0.0.1:{}", ports[0])];
    let (a, _a_config) = start_member(&ca, dir.path(), "a", ports[0], &[], None, "");
    let (mut b, b_config) = start_member(&ca, dir.path(), "b", ports[1], &seed, None, "");
    let (c, _c_config) = start_member(&ca, dir.path(), "c", ports[2], &seed, None, "");
    for (node, other) in [(&a, "b"), (&a, "c"), (&c, "b"), (&b, "c")] {
        eventually("every member to see the others", || {
            sees(node, other, "alive")
        })
        .await;
    }
    let status = a.cli_ok(&["cluster", "status"]);
    assert_eq!(status.matches("alive").count(), 3, "{status}");
    assert!(status.contains("region=test-b"), "{status}");
    let members = a.admin_json("/v1/admin/cluster").await;
    let b_labels = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "b")
        .unwrap()["labels"]
        .clone();
    assert!(
        b_labels["backends"].as_str().unwrap().contains("tract"),
        "{b_labels}"
    );

    // B dies without a word: A and C declare it down within the detection window.
    b.kill();
    let killed = Instant::now();
    for node in [&a, &c] {
        eventually("the killed member to be declared down", || {
            sees(node, "b", "down")
        })
        .await;
    }
    let detected = killed.elapsed();
    assert!(detected < Duration::from_secs(15), "{detected:?}");

    // B restarts on its data dir and is alive again for both.
    let b_data = b.take_data_dir();
    let b_args = ["--config", b_config.path().to_str().unwrap()];
    let b = TestNode::start_in(b_data.path(), &b_args);
    for node in [&a, &c] {
        eventually("the restarted member to be alive again", || {
            sees(node, "b", "alive")
        })
        .await;
    }
    assert!(sees(&b, "a", "alive").await && sees(&b, "c", "alive").await);

    // A partition: c is cut off (stopped, so nothing it sends or answers arrives) until the
    // others declare it down, then reachable again: it rejoins without anyone doing anything.
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([name, &c.pid().to_string()])
            .status()
            .unwrap();
    };
    signal("-STOP");
    for node in [&a, &b] {
        eventually("the cut-off member to be declared down", || {
            sees(node, "c", "down")
        })
        .await;
    }
    signal("-CONT");
    for node in [&a, &b] {
        eventually("the partition to heal", || sees(node, "c", "alive")).await;
    }

    // A revoked node is cut off: the new CRL is given to a alone, the cluster takes it to b,
    // c's messages no longer pass their handshakes and c is down for them, and stays down.
    let crl = ca
        .revoke(&std::fs::read_to_string(dir.path().join("c").join("node.pem")).unwrap())
        .unwrap();
    std::fs::copy(&crl, dir.path().join("a-crl.pem")).unwrap();
    let new_crl = std::fs::read(&crl).unwrap();
    eventually("the new CRL to reach b through the cluster", || async {
        std::fs::read(dir.path().join("b-crl.pem")).unwrap() == new_crl
    })
    .await;
    for node in [&a, &b] {
        eventually("the revoked member to be cut off", || {
            sees(node, "c", "down")
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for node in [&a, &b] {
        assert!(
            sees(node, "c", "down").await,
            "the revoked member came back"
        );
    }
    assert!(sees(&a, "b", "alive").await);
}

#[tokio::test]
async fn a_node_joins_through_a_dns_seed_that_was_not_up_when_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
    let ports: Vec<u16> = (0..2).map(|_| free_port()).collect();
    // Every address `localhost` resolves to is a seed (as a headless Service's name lists its
    // pods); nothing answers there yet.
    let seed = vec![format!("dns:localhost:{}", ports[0])];
    let (b, _b_config) = start_member(&ca, dir.path(), "b", ports[1], &seed, None, "");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(states(&b).await.keys().eq(["b"]), "{:?}", states(&b).await);
    let (a, _a_config) = start_member(&ca, dir.path(), "a", ports[0], &[], None, "");
    eventually("the node to join through its DNS seed", || {
        sees(&b, "a", "alive")
    })
    .await;
    eventually("the seed to see the node", || sees(&a, "b", "alive")).await;
    let listed = b.admin_json("/v1/admin/cluster").await;
    let a_member = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "a")
        .unwrap()
        .clone();
    assert_eq!(a_member["addr"], format!("127.0.0.1:{}", ports[0]));
}

/// GET `path` on `node`: status, body, and the node that served it (`tensorlet-served-by`,
/// set when the request was forwarded).
async fn get_served(node: &TestNode, path: &str) -> (u16, String, Option<String>) {
    let response = node.client.get(node.at(path)).send().await.expect("GET");
    let served_by = response
        .headers()
        .get("tensorlet-served-by")
        .map(|v| v.to_str().unwrap().to_string());
    (
        response.status().as_u16(),
        response.text().await.unwrap(),
        served_by,
    )
}

/// Whether `node` has the text-orientation model registered and loaded.
async fn has_model(node: &TestNode) -> bool {
    node.admin_json("/v1/admin/models").await["models"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == "text-orientation" && m["loaded"] == true)
}

#[tokio::test]
async fn a_deployment_reaches_the_nodes_its_placement_selects_and_the_others_forward_to_them() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let seed = vec![format!("a@127.0.0.1:{}", ports[0])];
    let eu = "zone = \"eu\"\n";
    let (mut a, _a_config) = start_member(&ca, dir.path(), "a", ports[0], &[], None, eu);
    let (mut b, b_config) = start_member(&ca, dir.path(), "b", ports[1], &seed, None, eu);
    let us = "zone = \"us\"\n";
    let (c, _c_config) = start_member(&ca, dir.path(), "c", ports[2], &seed, None, us);
    for (node, other) in [(&a, "b"), (&a, "c"), (&c, "b"), (&b, "c"), (&c, "a")] {
        eventually("every member to see the others", || {
            sees(node, other, "alive")
        })
        .await;
    }

    // Deployed on A, placed in zone eu: B takes it (component by digest from A) and serves it.
    let manifest = |name: &str| {
        TestNode::manifest(&format!(
            "[app]\nname = {name:?}\ncomponent = {:?}\npublic = true\n[placement]\nzone = \"eu\"\n",
            artifacts::HELLO
        ))
    };
    let (_hello_dir, hello) = manifest("hello");
    a.cli_ok(&["deploy", "-f", hello.to_str().unwrap()]);
    eventually("B to serve the app deployed on A", || async {
        get_served(&b, "/apps/hello?name=b").await == (200, "Hello, b!\n".into(), None)
    })
    .await;
    // C has the app but is not in zone eu: it forwards to A or B, and says which.
    eventually("C to forward the app", || async {
        get_served(&c, "/apps/hello").await.0 == 200
    })
    .await;
    let placed_here = |listing: serde_json::Value| listing["apps"][0]["placed_here"].clone();
    assert_eq!(placed_here(c.admin_json("/v1/admin/apps").await), false);
    assert_eq!(placed_here(b.admin_json("/v1/admin/apps").await), true);
    let mut served_by = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (status, body, by) = get_served(&c, "/apps/hello?name=c").await;
        assert_eq!((status, body.as_str()), (200, "Hello, c!\n"));
        served_by.insert(by.expect("a forwarded response names its node"));
    }
    assert!(
        served_by.iter().all(|node| node == "a" || node == "b"),
        "{served_by:?}"
    );
    // An app that names a model brings it along to the nodes that run it, by digest.
    a.add_text_orientation_model();
    let (_classify_dir, classify) = TestNode::manifest(&format!(
        "[app]\nname = \"classify\"\ncomponent = {:?}\npublic = true\nmodels = [\"text-orientation\"]\n[placement]\nzone = \"eu\"\n",
        artifacts::CLASSIFY
    ));
    a.cli_ok(&["deploy", "-f", classify.to_str().unwrap()]);
    eventually("B to have the model its app names", || has_model(&b)).await;
    eventually("C to have the app", || async {
        c.admin_json("/v1/admin/apps").await["apps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|app| app["name"] == "classify")
    })
    .await;
    let answer = crate::nn::classify(&c, "", &crate::nn::test_pixels()).await;
    assert_eq!(answer["scores"].as_array().unwrap().len(), 2, "{answer}");
    assert!(
        !has_model(&c).await,
        "C does not run the app: it needs no model"
    );

    // A key made on A works on C for an app that is not public, and its revocation travels.
    let (_private_dir, private) = TestNode::manifest(&format!(
        "[app]\nname = \"private\"\ncomponent = {:?}\npublic = false\n[placement]\nzone = \"eu\"\n",
        artifacts::HELLO
    ));
    a.cli_ok(&["deploy", "-f", private.to_str().unwrap()]);
    let made: serde_json::Value = a
        .client
        .post(a.at("/v1/admin/keys"))
        .bearer_auth(&a.token)
        .json(&serde_json::json!({ "role": "invoker" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (key, key_id) = (
        made["key"]["key"].as_str().unwrap().to_string(),
        made["key"]["id"].as_str().unwrap().to_string(),
    );
    let invoke_private = |key: String| {
        let request = c
            .client
            .get(c.at("/apps/private?name=key"))
            .bearer_auth(key);
        async move { request.send().await.unwrap().status().as_u16() }
    };
    eventually("A's key to open the private app on C", || {
        let status = invoke_private(key.clone());
        async move { status.await == 200 }
    })
    .await;
    let revoked = a
        .client
        .delete(a.at(&format!("/v1/admin/keys/{key_id}")))
        .bearer_auth(&a.token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    eventually("the revocation to reach C", || {
        let status = invoke_private(key.clone());
        async move { status.await == 401 }
    })
    .await;

    // `cluster status` shows each member's load as it last reported it.
    let status = c.cli_ok(&["cluster", "status"]);
    assert_eq!(status.matches(" running, ").count(), 3, "{status}");

    // An async job accepted by C runs on a node of zone eu; C keeps the job and its result.
    let accepted: serde_json::Value = c
        .client
        .post(c.at("/async/hello?name=job"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().expect("a job id").to_string();
    eventually("C's job to complete on a peer", || async {
        c.get(&format!("/jobs/{id}"))
            .await
            .1
            .contains("\"completed\"")
    })
    .await;
    assert_eq!(
        c.get(&format!("/jobs/{id}/result")).await,
        (200, "Hello, job!\n".to_string())
    );

    // A client cannot pretend its request was forwarded (and so skip the hop).
    let spoofed = c
        .client
        .get(c.at("/apps/hello"))
        .header("tensorlet-forwarded-by", "b")
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), 200);
    assert!(spoofed.headers().contains_key("tensorlet-served-by"));

    // B dies while C forwards a stream of requests: every one of them still succeeds.
    let stream = {
        let (client, url) = (c.client.clone(), c.at("/apps/hello"));
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for _ in 0..60 {
                let response = client.get(&url).send().await.unwrap();
                if response.status() != 200 {
                    failures.push(response.text().await.unwrap());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            failures
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.kill();
    let failures = stream.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");

    // While B is down, A removes hello and deploys hello2; B catches up once it is back.
    let (_second_dir, second) = manifest("hello2");
    a.cli_ok(&["deploy", "-f", second.to_str().unwrap()]);
    a.cli_ok(&["remove", "hello"]);
    let b_data = b.take_data_dir();
    let b = TestNode::start_in(
        b_data.path(),
        &["--config", b_config.path().to_str().unwrap()],
    );
    eventually("the restarted B to catch up", || async {
        get_served(&b, "/apps/hello2?name=b").await == (200, "Hello, b!\n".into(), None)
            && b.get("/apps/hello").await.0 == 404
    })
    .await;
    eventually("the removal to reach C", || async {
        c.get("/apps/hello").await.0 == 404
    })
    .await;

    // With no node of zone eu left, C answers for the app it does not run with a clear 503.
    a.kill();
    let mut b = b;
    b.kill();
    eventually("C to report that no node serves the app", || async {
        let (status, body) = c.get("/apps/hello2").await;
        status == 503 && crate::support::error_code(&body) == "not_placed"
    })
    .await;
    c.assert_healthy().await;
}

/// Stores `value` under `key` in app `app` (a kv-counter) on `node`.
async fn put_item(node: &TestNode, app: &str, key: &str, value: &str) {
    let response = node
        .client
        .put(node.at(&format!("/apps/{app}/items/{key}")))
        .body(value.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().await.unwrap());
}

/// What the raced key of app `shared` holds on `node`.
async fn raced(node: &TestNode) -> String {
    node.get("/apps/shared/items/race").await.1
}

/// The keys app `app` (a kv-counter) holds on `node`.
async fn item_keys(node: &TestNode, app: &str) -> Vec<String> {
    let (status, body) = node.get(&format!("/apps/{app}/items")).await;
    assert_eq!(status, 200, "{body}");
    let listing: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut keys: Vec<String> = listing["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|key| key.as_str().unwrap().to_string())
        .collect();
    keys.sort();
    keys
}

#[tokio::test]
async fn replicated_buckets_and_secrets_reach_every_node_and_a_restarted_node_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let seed = vec![format!("a@127.0.0.1:{}", ports[0])];
    let (a, _a_config) = start_member(&ca, dir.path(), "a", ports[0], &[], None, "");
    let (mut b, b_config) = start_member(&ca, dir.path(), "b", ports[1], &seed, None, "");
    let (c, _c_config) = start_member(&ca, dir.path(), "c", ports[2], &seed, None, "");
    for (node, other) in [(&a, "b"), (&a, "c"), (&c, "b"), (&b, "c"), (&c, "a")] {
        eventually("every member to see the others", || {
            sees(node, other, "alive")
        })
        .await;
    }
    // One component twice: as `shared`, whose bucket replicates, and as `local`, whose does not.
    let manifest = |name: &str, replicated: &str| {
        TestNode::manifest(&format!(
            "[app]\nname = {name:?}\ncomponent = {:?}\npublic = true\nbuckets = [\"default\"]\n{replicated}",
            artifacts::KV_COUNTER
        ))
    };
    let (_shared_dir, shared) = manifest("shared", "replicated_buckets = [\"default\"]\n");
    let (_local_dir, local) = manifest("local", "");
    a.cli_ok(&["deploy", "-f", shared.to_str().unwrap()]);
    a.cli_ok(&["deploy", "-f", local.to_str().unwrap()]);
    // A bucket that is not among the app's buckets cannot replicate.
    let (_bad_dir, bad) = manifest("bad", "replicated_buckets = [\"other\"]\n");
    let refused = a.cli(&["deploy", "-f", bad.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("replicated_buckets"));
    for node in [&b, &c] {
        eventually("every node to run both apps", || async {
            node.get("/apps/shared/items").await.0 == 200
                && node.get("/apps/local/items").await.0 == 200
        })
        .await;
    }

    // Written on A, read on C; the local bucket's write stays on A.
    put_item(&a, "local", "k", "stays on a").await;
    put_item(&a, "shared", "k", "written on a").await;
    eventually("A's write to reach C", || async {
        c.get("/apps/shared/items/k").await == (200, "written on a".to_string())
    })
    .await;
    assert_eq!(c.get("/apps/local/items/k").await.0, 404);
    assert_eq!(
        a.get("/apps/local/items/k").await,
        (200, "stays on a".into())
    );

    // A secret set on A reaches the app on C (the app's change carries it).
    a.cli_ok(&["deploy", "--public", "misbehave", artifacts::MISBEHAVE]);
    let set = a.cli_with_input(&["secret", "set", "misbehave", "API_KEY"], b"first");
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    eventually("A's secret to reach C", || async {
        c.get("/apps/misbehave/config?key=API_KEY").await == (200, "first".to_string())
    })
    .await;

    // B dies; A takes writes, C deletes a key and rotates the secret while it is down. Back,
    // B catches up.
    b.kill();
    let rotated = c.cli_with_input(&["secret", "set", "misbehave", "API_KEY"], b"rotated");
    assert!(rotated.status.success());
    let written: Vec<String> = (0..40).map(|i| format!("key-{i:02}")).collect();
    for key in &written {
        put_item(&a, "shared", key, &format!("value of {key}")).await;
    }
    let deleted = c
        .client
        .delete(c.at("/apps/shared/items/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let b_data = b.take_data_dir();
    let b = TestNode::start_in(
        b_data.path(),
        &["--config", b_config.path().to_str().unwrap()],
    );
    for node in [&a, &b, &c] {
        eventually("every node to hold the same keys", || async {
            item_keys(node, "shared").await == written
        })
        .await;
    }
    assert_eq!(
        b.get("/apps/shared/items/key-07").await,
        (200, "value of key-07".to_string())
    );
    eventually("the rotated secret to reach every node", || async {
        for node in [&a, &b] {
            if node.get("/apps/misbehave/config?key=API_KEY").await != (200, "rotated".into()) {
                return false;
            }
        }
        true
    })
    .await;
    assert_eq!(
        b.cli_ok(&["secret", "remove", "misbehave", "API_KEY"])
            .trim(),
        "removed secret API_KEY of misbehave"
    );
    eventually("the removal of the secret to reach A", || async {
        a.get("/apps/misbehave/config?key=API_KEY").await.0 == 404
    })
    .await;

    // A and C write one key at once: every node ends with the same one of the two values.
    tokio::join!(
        put_item(&a, "shared", "race", "from a"),
        put_item(&c, "shared", "race", "from c")
    );
    eventually("the nodes to agree on the raced key", || async {
        let on_a = raced(&a).await;
        on_a == raced(&b).await && on_a == raced(&c).await
    })
    .await;
    assert!(["from a", "from c"].contains(&raced(&b).await.as_str()));
    for node in [&a, &b, &c] {
        node.assert_healthy().await;
    }
}

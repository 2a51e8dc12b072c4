//! A node's port for its cluster against real TLS clients: only a node of the cluster gets
//! through the handshake, every other certificate is refused there, and a new certificate or
//! CRL applies without a restart.

use crate::support::{config_file, TestNode};
use rustls::pki_types::{CertificateDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tensorlet::tls::cluster::{node_uri, ClusterCa, NodeCert};
use tensorlet::tls::peer::{PeerFiles, PeerTls};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `cert_pem` and `key_pem` as `<name>.pem` and `<name>.key` in `dir`.
fn write_identity(dir: &Path, name: &str, cert_pem: &str, key_pem: &str) -> (PathBuf, PathBuf) {
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
async fn eventually<F, Fut>(what: &str, mut check: F)
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
    let peer_dir = dir.path().join("node-b");
    std::fs::create_dir_all(&peer_dir).unwrap();
    let b = ca.issue(&NodeCert::new("edge", "b", 30)).unwrap();
    let (b_cert, b_key) = write_identity(&peer_dir, "b", &b.cert_pem, &b.key_pem);

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

    // Every other caller is refused in the handshake.
    let now = OffsetDateTime::now_utc();
    let other_ca = ClusterCa::init(&dir.path().join("other-ca"), "edge").unwrap();
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

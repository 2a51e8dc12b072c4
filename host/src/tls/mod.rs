//! The node's TLS identity: the configured certificate, or a self-signed one for localhost
//! generated on first start with rcgen and kept in the data dir. The cluster's CA and the
//! mutual TLS between nodes are in [`cluster`] and [`peer`].

pub mod cluster;
pub mod peer;

use crate::config::TlsConfig;
use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where the generated certificate lives in the data dir; the CLI trusts it from there.
pub fn generated_cert_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("cert.pem")
}

fn generated_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("tls").join("key.pem")
}

/// The certificate chain and key the node serves with.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// SHA-256 fingerprint of the leaf certificate, as colon-separated hex.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.chain[0])
    }

    /// A rustls server configuration offering HTTP/2 and HTTP/1.1.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .context("the TLS certificate and key do not match")?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// SHA-256 fingerprint of a DER certificate, as colon-separated upper-case hex.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    Sha256::digest(cert.as_ref())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Loads the configured certificate, or the generated one, generating it if needed.
pub fn load_or_generate(config: &TlsConfig, data_dir: &Path) -> anyhow::Result<Identity> {
    match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => load(cert, key),
        (None, None) => {
            let (cert, key) = (generated_cert_path(data_dir), generated_key_path(data_dir));
            if !cert.exists() || !key.exists() {
                generate(&cert, &key)?;
            }
            crate::store::files::check_secret_mode(&key)?;
            load(&cert, &key)
        }
        _ => Err(anyhow!("[tls] needs both `cert` and `key`, or neither (then a self-signed certificate is generated)")),
    }
}

/// The certificates of a PEM file (at least one).
fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(path)
            .with_context(|| format!("cannot open certificate {}", path.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn load(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
    let chain = read_certs(cert)?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key).with_context(|| format!("cannot open key {}", key.display()))?,
    ))
    .with_context(|| format!("{} is not a PEM private key", key.display()))?
    .ok_or_else(|| anyhow!("{} holds no private key", key.display()))?;
    Ok(Identity { chain, key })
}

fn generate(cert_path: &Path, key_path: &Path) -> anyhow::Result<()> {
    let names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    let certified =
        rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    let dir = cert_path.parent().expect("cert path has a folder");
    std::fs::create_dir_all(dir)?;
    let key = certified.key_pair.serialize_pem();
    crate::store::files::write_durably(key_path, key.as_bytes(), 0o600)?;
    crate::store::files::write_durably(cert_path, certified.cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_is_kept_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_generate(&TlsConfig::default(), dir.path()).unwrap();
        let second = load_or_generate(&TlsConfig::default(), dir.path()).unwrap();
        assert_eq!(first.fingerprint(), second.fingerprint());
        assert_eq!(first.fingerprint().len(), 32 * 3 - 1);
        first.server_config().unwrap();
    }

    #[test]
    fn half_a_tls_config_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let config = TlsConfig {
            cert: Some("c.pem".into()),
            key: None,
        };
        let error = load_or_generate(&config, dir.path()).err().unwrap();
        assert!(error.to_string().contains("both"), "{error}");
    }
}

//! TLS between nodes: mutual, with the cluster CA as the only root. rustls (webpki) checks the
//! chain, the validity period, the usage (client auth for a caller, server auth for a callee)
//! and the CRL; tensorlet then checks the name: a caller must be a node of this cluster (its
//! `spiffe://<cluster>/node/<id>` URI), a callee the very node it dialled. A failure of either
//! check fails the handshake. The files are read again when they change, so a new certificate,
//! CA bundle or CRL applies to the next connection without a restart.

use super::cluster::{cluster_of_ca, node_id_of};
use anyhow::{anyhow, bail, Context};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme,
};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// The files of a node's cluster identity.
#[derive(Debug, Clone)]
pub struct PeerFiles {
    /// The cluster CA's certificate (PEM).
    pub ca: PathBuf,
    /// This node's certificate (PEM) and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The cluster's CRL (PEM), when it has one.
    pub crl: Option<PathBuf>,
}

impl PeerFiles {
    fn paths(&self) -> Vec<&PathBuf> {
        [&self.ca, &self.cert, &self.key]
            .into_iter()
            .chain(self.crl.as_ref())
            .collect()
    }

    /// When each file last changed (`None`: unreadable).
    fn stamps(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .into_iter()
            .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
            .collect()
    }
}

/// The node port's TLS configurations, as last loaded.
pub struct PeerTls {
    files: PeerFiles,
    node_id: String,
    loaded: RwLock<Loaded>,
    /// How many times the files were loaded again: clients made with an older configuration
    /// are made anew.
    generation: AtomicU64,
}

struct Loaded {
    cluster: String,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    discovery: Arc<rustls::ClientConfig>,
    stamps: Vec<Option<SystemTime>>,
    /// When the CRL in use was issued (seconds since the epoch); `None` without one.
    crl_issued_at: Option<i64>,
}

impl PeerTls {
    /// Loads the identity of node `node_id` from `files`; its certificate must name it.
    pub fn load(files: PeerFiles, node_id: &str) -> anyhow::Result<Self> {
        let loaded = build(&files, node_id)?;
        Ok(Self {
            files,
            node_id: node_id.to_string(),
            loaded: RwLock::new(loaded),
            generation: AtomicU64::new(0),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The cluster this node is a member of (from its CA's certificate).
    pub fn cluster(&self) -> String {
        self.read().cluster.clone()
    }

    /// What the node port accepts connections with now.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.read().server.clone()
    }

    /// What this node dials peers with now: ALPN h2, its certificate as the client's.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.read().client.clone()
    }

    /// What this node dials an address with when it does not know which node is there (a
    /// seed found through DNS): any member of the cluster passes, checked as a callee is for
    /// the node its certificate names, which is who answered.
    pub fn discovery_client_config(&self) -> Arc<rustls::ClientConfig> {
        self.read().discovery.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads the files again if any changed since the last load. A set of files that does not
    /// load (half-copied, mismatched) leaves the previous configuration in place.
    pub fn reload_if_changed(&self) -> anyhow::Result<bool> {
        if self.files.stamps() == self.read().stamps {
            return Ok(false);
        }
        let loaded = build(&self.files, &self.node_id)?;
        *self.loaded.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        self.generation.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// When the CRL in use was issued (seconds since the epoch); `None` without one.
    pub fn crl_issued_at(&self) -> Option<i64> {
        self.read().crl_issued_at
    }

    /// The CRL file in use (PEM), when there is one.
    pub fn crl_pem(&self) -> Option<Vec<u8>> {
        std::fs::read(self.files.crl.as_ref()?).ok()
    }

    /// Takes `pem`, a peer's copy of the cluster's CRL, when the cluster CA signed it and it was
    /// issued after the one in use: it replaces the CRL file and applies at once. Whether it
    /// did. Blocking.
    pub fn adopt_crl(&self, pem: &[u8]) -> anyhow::Result<bool> {
        let Some(path) = &self.files.crl else {
            bail!("cluster.crl is not set: there is no file to keep the cluster's CRL in");
        };
        let crls = rustls_pemfile::crls(&mut &pem[..])
            .collect::<Result<Vec<_>, _>>()
            .context("not a PEM CRL")?;
        let ca = super::read_certs(&self.files.ca)?;
        let mut issued = None;
        for crl in &crls {
            super::cluster::check_crl_signed_by(crl, &ca[0])?;
            issued = issued.max(Some(super::cluster::crl_issued_at(crl)?));
        }
        let Some(issued) = issued else {
            bail!("the peer's CRL file holds no CRL");
        };
        if self
            .crl_issued_at()
            .is_some_and(|current| current >= issued)
        {
            return Ok(false);
        }
        crate::store::files::write_durably(path, pem, 0o644)?;
        self.reload_if_changed()?;
        Ok(true)
    }

    /// Grows each time the files are loaded again.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }
}

impl crate::api::TlsSource for PeerTls {
    fn current(&self) -> Arc<rustls::ServerConfig> {
        self.server_config()
    }
}

fn build(files: &PeerFiles, node_id: &str) -> anyhow::Result<Loaded> {
    // Stamps first: a file changed while it is read is read again at the next check.
    let stamps = files.stamps();
    let ca = super::read_certs(&files.ca)?;
    let ca_first = ca[0].clone();
    let cluster = cluster_of_ca(&ca[0]).ok_or_else(|| {
        anyhow!(
            "{} is not a tensorlet cluster CA (no spiffe:// name)",
            files.ca.display()
        )
    })?;
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots
            .add(cert)
            .with_context(|| format!("{} holds an unusable CA certificate", files.ca.display()))?;
    }
    let roots = Arc::new(roots);
    let crls: Vec<CertificateRevocationListDer<'static>> = match &files.crl {
        None => Vec::new(),
        Some(path) => rustls_pemfile::crls(&mut std::io::BufReader::new(
            std::fs::File::open(path)
                .with_context(|| format!("cannot open CRL {}", path.display()))?,
        ))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not a PEM CRL", path.display()))?,
    };
    // An empty file (one being copied in, say) would turn revocation off: refused, and so is
    // a CRL the cluster CA did not sign, which would refuse every peer.
    if let Some(path) = &files.crl {
        if crls.is_empty() {
            bail!("{} holds no CRL", path.display());
        }
        for crl in &crls {
            super::cluster::check_crl_signed_by(crl, &ca_first)
                .with_context(|| format!("{} is not the cluster CA's CRL", path.display()))?;
        }
    }
    let identity = super::load(&files.cert, &files.key)?;
    match node_id_of(&identity.chain[0], &cluster) {
        Some(named) if named == node_id => {}
        named => bail!(
            "{} is not a certificate of node {node_id:?} of cluster {cluster:?} (it names {named:?})",
            files.cert.display()
        ),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .build()
            .context("the cluster CA or CRL is unusable")?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(MemberClientVerifier {
            inner: client_verifier,
            cluster: cluster.clone(),
        }))
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("the node certificate and key do not match")?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .with_crls(crls.clone())
        .build()
        .context("the cluster CA or CRL is unusable")?;
    let client_with = |callee: Callee| -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(MemberServerVerifier {
                inner: server_verifier.clone(),
                cluster: cluster.clone(),
                callee,
            }))
            .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
            .context("the node certificate and key do not match")?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(client))
    };
    let crl_issued_at = crls
        .iter()
        .filter_map(|crl| super::cluster::crl_issued_at(crl).ok())
        .max();
    Ok(Loaded {
        crl_issued_at,
        client: client_with(Callee::Dialled)?,
        discovery: client_with(Callee::AnyMember)?,
        cluster,
        server: Arc::new(server),
        stamps,
    })
}

/// Accepts a caller whose chain webpki accepts and whose certificate names a node of the
/// cluster.
#[derive(Debug)]
struct MemberClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    cluster: String,
}

impl ClientCertVerifier for MemberClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        match node_id_of(end_entity, &self.cluster) {
            Some(_) => Ok(verified),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Which callee a dialling node accepts.
#[derive(Debug, Clone, Copy)]
enum Callee {
    /// The node dialled: the name dialled is its id.
    Dialled,
    /// Any member: whichever node the certificate names.
    AnyMember,
}

/// Accepts a callee whose chain webpki accepts for the node id dialled (its DNS name) and
/// whose certificate names that very node of the cluster; for [`Callee::AnyMember`], the node
/// id the certificate names stands for the name dialled.
#[derive(Debug)]
struct MemberServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    cluster: String,
    callee: Callee,
}

impl ServerCertVerifier for MemberServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let not_a_member = || rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        let named = node_id_of(end_entity, &self.cluster).ok_or_else(not_a_member)?;
        let dialled = match self.callee {
            Callee::Dialled => server_name.clone(),
            Callee::AnyMember => ServerName::try_from(named.clone()).map_err(|_| not_a_member())?,
        };
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            &dialled,
            ocsp_response,
            now,
        )?;
        match dialled {
            ServerName::DnsName(name) if name.as_ref() == named => Ok(verified),
            _ => Err(not_a_member()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::cluster::{ClusterCa, NodeCert};

    /// Node `a`'s files of the cluster whose CA is in `dir/ca`, its CRL a copy of the CA's.
    fn node_files(dir: &std::path::Path, ca: &ClusterCa) -> PeerFiles {
        let issued = ca.issue(&NodeCert::new(&ca.cluster, "a", 30)).unwrap();
        let files = PeerFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
            crl: Some(dir.join("crl.pem")),
        };
        std::fs::write(&files.ca, ca.cert_pem()).unwrap();
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
        std::fs::write(&files.key, &issued.key_pem).unwrap();
        std::fs::copy(dir.join("ca").join("crl.pem"), dir.join("crl.pem")).unwrap();
        files
    }

    #[test]
    fn a_peers_crl_is_taken_only_when_the_cluster_ca_signed_it_and_it_is_newer() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
        let tls = PeerTls::load(node_files(dir.path(), &ca), "a").unwrap();
        let first = tls.crl_issued_at().expect("a CRL in use");
        let initial = std::fs::read(dir.path().join("ca").join("crl.pem")).unwrap();

        let other = ClusterCa::init(&dir.path().join("other"), "edge").unwrap();
        let foreign = std::fs::read(dir.path().join("other").join("crl.pem")).unwrap();
        assert!(tls.adopt_crl(&foreign).is_err());
        assert!(tls.adopt_crl(b"not a crl").is_err());
        drop(other);

        // thisUpdate has whole seconds: the next CRL is a second later.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let issued = ca.issue(&NodeCert::new(&ca.cluster, "b", 30)).unwrap();
        let newer = std::fs::read(ca.revoke(&issued.cert_pem).unwrap()).unwrap();
        let generation = tls.generation();
        assert!(tls.adopt_crl(&newer).unwrap());
        assert!(tls.crl_issued_at().unwrap() > first);
        assert!(tls.generation() > generation, "applied at once");
        assert_eq!(tls.crl_pem().unwrap(), newer);
        // The same CRL again, or the older one, changes nothing.
        assert!(!tls.adopt_crl(&newer).unwrap());
        assert!(!tls.adopt_crl(&initial).unwrap());
        assert_eq!(tls.crl_pem().unwrap(), newer);
    }
}

//! The cluster's certificate authority, kept in a folder of its own (offline, or on the first
//! node): `ca.pem`, `ca.key` (0600), the serials it revoked and the CRL that lists them. A
//! node's certificate names it twice: a DNS name that is its node id (what a peer dialling it
//! checks) and the URI `spiffe://<cluster>/node/<id>` (what tensorlet reads to know which
//! member a peer is). Both usages are in it: nodes serve and dial each other.

use anyhow::{anyhow, bail, Context};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams,
    SanType, SerialNumber,
};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

/// Files of the CA folder.
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const REVOKED: &str = "revoked.json";
/// The CRL the CA folder holds; nodes read a copy of it (`[cluster] crl`).
pub const CRL_FILE: &str = "crl.pem";

/// The URI a node's certificate carries: `spiffe://<cluster>/node/<id>`.
pub fn node_uri(cluster: &str, node_id: &str) -> String {
    format!("spiffe://{cluster}/node/{node_id}")
}

/// The cluster a CA certificate (PEM or DER) is the authority of: its `spiffe://<cluster>` URI.
pub fn cluster_of_ca(ca_der: &[u8]) -> Option<String> {
    uris(ca_der)?
        .into_iter()
        .find_map(|uri| uri.strip_prefix("spiffe://").map(str::to_string))
        .filter(|name| crate::apps::valid_name(name))
}

/// The node a certificate names as a member of `cluster`, if it names one.
pub fn node_id_of(cert_der: &[u8], cluster: &str) -> Option<String> {
    let prefix = node_uri(cluster, "");
    uris(cert_der)?
        .into_iter()
        .find_map(|uri| uri.strip_prefix(&prefix).map(str::to_string))
        .filter(|id| crate::apps::valid_name(id))
}

/// Checks that the CRL `crl_der` is signed by the CA certificate `ca_der`.
pub fn check_crl_signed_by(crl_der: &[u8], ca_der: &[u8]) -> anyhow::Result<()> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl_der)
        .map_err(|e| anyhow!("not a CRL: {e}"))?;
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der)
        .map_err(|e| anyhow!("not a certificate: {e}"))?;
    crl.verify_signature(ca.public_key())
        .map_err(|e| anyhow!("its signature is not the CA's: {e}"))
}

/// When the CRL `crl_der` was issued (its `thisUpdate`), in seconds since the Unix epoch: of
/// two CRLs of one CA, the later one says what is revoked.
pub fn crl_issued_at(crl_der: &[u8]) -> anyhow::Result<i64> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(crl_der)
        .map_err(|e| anyhow!("not a CRL: {e}"))?;
    Ok(crl.last_update().timestamp())
}

fn uris(der: &[u8]) -> Option<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = cert.subject_alternative_name().ok()??;
    Some(
        names
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::URI(uri) => Some(uri.to_string()),
                _ => None,
            })
            .collect(),
    )
}

/// What a node certificate says. [`NodeCert::new`] gives what `cluster issue` makes; the
/// other fields exist so that tests can make the certificates a node must refuse.
#[derive(Debug, Clone)]
pub struct NodeCert {
    pub node_id: String,
    /// The URI it carries (by default [`node_uri`]).
    pub uri: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub client_auth: bool,
    pub server_auth: bool,
}

impl NodeCert {
    /// A certificate for `node_id` of `cluster`, valid from now for `days`, for both usages.
    pub fn new(cluster: &str, node_id: &str, days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            node_id: node_id.to_string(),
            uri: node_uri(cluster, node_id),
            not_before: now - Duration::minutes(5),
            not_after: now + Duration::days(days.into()),
            client_auth: true,
            server_auth: true,
        }
    }
}

/// Refuses a node id that is not a valid name (node ids are names like apps').
fn check_node_id(node_id: &str) -> anyhow::Result<()> {
    if !crate::apps::valid_name(node_id) {
        bail!("invalid node id {node_id:?}: use 1-63 lower-case letters, digits or '-'");
    }
    Ok(())
}

/// What a node certificate of `spec` says: its node id as the common name and the DNS name,
/// the cluster URI, the usages asked for, the validity period and a random serial.
fn node_params(spec: &NodeCert) -> anyhow::Result<CertificateParams> {
    check_node_id(&spec.node_id)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, spec.node_id.clone());
    params.subject_alt_names = vec![
        SanType::DnsName(spec.node_id.clone().try_into()?),
        SanType::URI(spec.uri.clone().try_into()?),
    ];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = [
        (spec.server_auth, ExtendedKeyUsagePurpose::ServerAuth),
        (spec.client_auth, ExtendedKeyUsagePurpose::ClientAuth),
    ]
    .into_iter()
    .filter_map(|(wanted, usage)| wanted.then_some(usage))
    .collect();
    params.not_before = spec.not_before;
    params.not_after = spec.not_after;
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A node's key and its certificate signing request for `node_id`, as PEM: what
/// `tensorlet cluster csr` writes on the node, so that its key never leaves it.
pub fn node_request(node_id: &str) -> anyhow::Result<Issued> {
    check_node_id(node_id)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, node_id.to_string());
    let request = params.serialize_request(&key)?;
    Ok(Issued {
        cert_pem: request.pem()?,
        key_pem: key.serialize_pem(),
    })
}

/// An issued certificate and its key, as PEM.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A cluster CA opened from its folder.
pub struct ClusterCa {
    dir: PathBuf,
    pub cluster: String,
    cert_pem: String,
    issuer: rcgen::Certificate,
    key: KeyPair,
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl ClusterCa {
    /// Creates a CA for cluster `cluster` in `dir` (which must not hold one), valid for ten
    /// years, and an empty CRL.
    pub fn init(dir: &Path, cluster: &str) -> anyhow::Result<Self> {
        if !crate::apps::valid_name(cluster) {
            bail!("invalid cluster name {cluster:?}: use 1-63 lower-case letters, digits or '-'");
        }
        if dir.join(CA_KEY).exists() {
            bail!("{} holds a cluster CA already", dir.display());
        }
        crate::store::files::create_private_dir(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("tensorlet cluster {cluster}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{cluster}").try_into()?)];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::minutes(5);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        crate::store::files::write_durably(
            &dir.join(CA_KEY),
            key.serialize_pem().as_bytes(),
            0o600,
        )?;
        crate::store::files::write_durably(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
        let ca = Self::open(dir)?;
        ca.write_crl(&[])?;
        Ok(ca)
    }

    /// Opens the CA in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let key_path = dir.join(CA_KEY);
        crate::store::files::check_secret_mode(&key_path)?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(&key_path).with_context(|| {
            format!(
                "no cluster CA in {} (run `tensorlet cluster init`)",
                dir.display()
            )
        })?)?;
        let cert_pem = std::fs::read_to_string(dir.join(CA_CERT))?;
        let der = pem_der(&cert_pem)?;
        let cluster = cluster_of_ca(&der)
            .ok_or_else(|| anyhow!("{} is not a tensorlet cluster CA", dir.display()))?;
        let issuer = CertificateParams::from_ca_cert_pem(&cert_pem)?.self_signed(&key)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            cluster,
            cert_pem,
            issuer,
            key,
        })
    }

    /// The CA certificate, as PEM: what every node trusts.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for `spec` with a fresh key (both returned).
    pub fn issue(&self, spec: &NodeCert) -> anyhow::Result<Issued> {
        let key = KeyPair::generate()?;
        let cert = node_params(spec)?.signed_by(&key, &self.issuer, &self.key)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs the certificate signing request `csr_pem` (made by `tensorlet cluster csr` on the
    /// node, whose key never leaves it) as `spec` says: the request's signature must verify and
    /// its common name must be `spec`'s node id; the names and usages are the CA's, never the
    /// request's. Returns the certificate (PEM).
    pub fn sign(&self, csr_pem: &str, spec: &NodeCert) -> anyhow::Result<String> {
        let request = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow!("not a signed certificate request: {e}"))?;
        let named = match request.params.distinguished_name.get(&DnType::CommonName) {
            Some(rcgen::DnValue::Utf8String(name)) => Some(name.clone()),
            _ => None,
        };
        if named.as_deref() != Some(spec.node_id.as_str()) {
            bail!(
                "the request is for {:?}, not node {:?}",
                named.unwrap_or_default(),
                spec.node_id
            );
        }
        let cert = node_params(spec)?.signed_by(&request.public_key, &self.issuer, &self.key)?;
        Ok(cert.pem())
    }

    /// Revokes the certificate in `cert_pem` and rewrites the CRL; returns the CRL's path.
    pub fn revoke(&self, cert_pem: &str) -> anyhow::Result<PathBuf> {
        let der = pem_der(cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| anyhow!("not a certificate: {e}"))?;
        let serial = hex::encode(cert.raw_serial());
        let mut revoked = self.revoked()?;
        if !revoked.contains(&serial) {
            revoked.push(serial);
        }
        crate::store::files::write_durably(
            &self.dir.join(REVOKED),
            &serde_json::to_vec(&revoked)?,
            0o644,
        )?;
        self.write_crl(&revoked)
    }

    fn revoked(&self) -> anyhow::Result<Vec<String>> {
        match std::fs::read(self.dir.join(REVOKED)) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes)?),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error.into()),
        }
    }

    fn write_crl(&self, serials: &[String]) -> anyhow::Result<PathBuf> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = serials
            .iter()
            .map(|serial| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&hex::decode(serial)?),
                    revocation_time: now,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let crl = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(3650),
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer, &self.key)?;
        let path = self.dir.join(CRL_FILE);
        crate::store::files::write_durably(&path, crl.pem()?.as_bytes(), 0o644)?;
        Ok(path)
    }
}

/// The DER of the first PEM block in `pem`.
pub fn pem_der(pem: &str) -> anyhow::Result<Vec<u8>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| anyhow!("no certificate in the PEM"))?
        .map(|der| der.to_vec())
        .map_err(Into::into)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_certificate_names_its_node_and_a_revoked_one_is_in_the_crl() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
        assert!(ClusterCa::init(&dir.path().join("ca"), "edge").is_err());
        let ca = {
            drop(ca);
            ClusterCa::open(&dir.path().join("ca")).unwrap()
        };
        assert_eq!(ca.cluster, "edge");
        let issued = ca.issue(&NodeCert::new("edge", "node-a", 30)).unwrap();
        let der = pem_der(&issued.cert_pem).unwrap();
        assert_eq!(node_id_of(&der, "edge").as_deref(), Some("node-a"));
        assert_eq!(node_id_of(&der, "other"), None);
        assert!(ca.issue(&NodeCert::new("edge", "Bad Id", 30)).is_err());

        let crl = ca.revoke(&issued.cert_pem).unwrap();
        let crl = std::fs::read(crl).unwrap();
        let der = rustls_pemfile::crls(&mut crl.as_slice())
            .next()
            .unwrap()
            .unwrap();
        let (_, parsed) =
            <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(&der).unwrap();
        assert_eq!(parsed.iter_revoked_certificates().count(), 1);
    }

    #[test]
    fn a_nodes_request_is_signed_for_the_node_it_names_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::init(&dir.path().join("ca"), "edge").unwrap();
        let request = node_request("node-b").unwrap();
        assert!(request.cert_pem.contains("CERTIFICATE REQUEST"));
        let cert = ca
            .sign(&request.cert_pem, &NodeCert::new("edge", "node-b", 30))
            .unwrap();
        let der = pem_der(&cert).unwrap();
        assert_eq!(node_id_of(&der, "edge").as_deref(), Some("node-b"));
        // The certificate carries the request's key, which stayed with the node.
        let (_, parsed) = x509_parser::parse_x509_certificate(&der).unwrap();
        let key = KeyPair::from_pem(&request.key_pem).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data,
            key.public_key_raw()
        );

        let refused = ca
            .sign(&request.cert_pem, &NodeCert::new("edge", "node-a", 30))
            .unwrap_err();
        assert!(
            refused.to_string().contains("not node \"node-a\""),
            "{refused}"
        );
        assert!(ca
            .sign("not a request", &NodeCert::new("edge", "node-b", 30))
            .is_err());
        // A request whose signature was altered (the last base64 line is the signature's).
        let mut lines: Vec<String> = request.cert_pem.lines().map(str::to_string).collect();
        let signature = lines.len() - 2;
        let signature_line = &mut lines[signature];
        let flipped = if signature_line.starts_with('A') {
            "B"
        } else {
            "A"
        };
        signature_line.replace_range(0..1, flipped);
        assert!(ca
            .sign(&lines.join("\n"), &NodeCert::new("edge", "node-b", 30))
            .is_err());
        assert!(node_request("Bad Id").is_err());
    }
}

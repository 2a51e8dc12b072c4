//! The fleet: a node's place in a cluster of nodes that trust each other only through mutual
//! TLS. Its identity (node id, the cluster CA, its certificate, the CRL) and the node port it
//! serves peers on are configured in `[cluster]`; the TLS itself is [`crate::tls::peer`], the
//! routes peers call are the API's node port.

use crate::tls::peer::PeerFiles;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// `[cluster]`: off unless `listen` is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id: what its certificate names (`tensorlet cluster issue <id>`).
    pub node_id: Option<String>,
    /// Address of the node port, which speaks only mutual TLS with the cluster's nodes.
    pub listen: Option<SocketAddr>,
    /// The cluster CA's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM) and key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The cluster's CRL (PEM): certificates listed there are refused.
    pub crl: Option<PathBuf>,
    /// How often the files above are checked for changes, in seconds: a replaced certificate,
    /// CA or CRL applies to connections made after that, without a restart.
    pub reload_secs: u64,
    /// Node-port connections open at once; beyond it a new one is closed at once.
    pub max_connections: u32,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            listen: None,
            ca: None,
            cert: None,
            key: None,
            crl: None,
            reload_secs: 5,
            max_connections: 256,
        }
    }
}

impl ClusterConfig {
    /// The node id and identity files when the node port is on, `None` when it is off.
    pub fn peer_files(&self) -> Option<(String, PeerFiles)> {
        self.listen?;
        Some((
            self.node_id.clone()?,
            PeerFiles {
                ca: self.ca.clone()?,
                cert: self.cert.clone()?,
                key: self.key.clone()?,
                crl: self.crl.clone(),
            },
        ))
    }

    /// Refuses a node port without its identity, and bounds that cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.listen.is_none() {
            return Ok(());
        }
        match &self.node_id {
            Some(id) if crate::apps::valid_name(id) => {}
            Some(id) => {
                return Err(format!(
                    "cluster.node_id {id:?}: use 1-63 lower-case letters, digits or '-'"
                ))
            }
            None => return Err("cluster.listen needs cluster.node_id".into()),
        }
        if self.ca.is_none() || self.cert.is_none() || self.key.is_none() {
            return Err(
                "cluster.listen needs cluster.ca, cluster.cert and cluster.key (`tensorlet cluster issue` makes them)"
                    .into(),
            );
        }
        if !(1..=3600).contains(&self.reload_secs) {
            return Err(format!(
                "cluster.reload_secs must be between 1 and 3600, not {}",
                self.reload_secs
            ));
        }
        if self.max_connections == 0 {
            return Err("cluster.max_connections must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_port_needs_its_identity() {
        assert!(ClusterConfig::default().validate().is_ok());
        let mut config = ClusterConfig {
            listen: Some("127.0.0.1:7443".parse().unwrap()),
            ..Default::default()
        };
        assert!(config.validate().unwrap_err().contains("node_id"));
        config.node_id = Some("a".into());
        assert!(config.validate().unwrap_err().contains("cluster.ca"));
        config.ca = Some("ca.pem".into());
        config.cert = Some("node.pem".into());
        config.key = Some("node.key".into());
        assert!(config.validate().is_ok());
        assert!(config.peer_files().is_some());
        config.reload_secs = 0;
        assert!(config.validate().is_err());
    }
}

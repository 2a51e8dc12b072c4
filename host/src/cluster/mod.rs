//! The fleet: a node's place in a cluster of nodes that trust each other only through mutual
//! TLS. Its identity (node id, the cluster CA, its certificate, the CRL) and the node port it
//! serves peers on are configured in `[cluster]`; the TLS itself is [`crate::tls::peer`], the
//! routes peers call are the API's node port, who is in the cluster is [`membership`], what
//! each peer has is the [`Fleet`], deployments travel by [`replication`] and requests by
//! [`forwarding`].

pub mod client;
pub mod fleet;
pub mod forwarding;
pub mod membership;
pub mod replication;
pub mod seeds;

pub use fleet::Fleet;
pub use membership::{Member, MemberStatus, Membership};
pub use seeds::Seed;

use crate::tls::peer::PeerFiles;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// Members to join through: `<node-id>@<host:port>` of a node port, or
    /// `dns:<name>:<port>` for every address a name resolves to (a Kubernetes headless
    /// Service); any one that answers is enough.
    pub seeds: Vec<String>,
    /// How often seeds are resolved again and announced to when they are not known as alive,
    /// in seconds.
    pub seed_interval_secs: u64,
    /// The address peers reach this node's port at (default: `listen`).
    pub advertise: Option<SocketAddr>,
    /// What this node says of itself to the cluster (`region = "eu-1"`); the node adds
    /// `backends` (those available here).
    pub labels: BTreeMap<String, String>,
    /// How often a member probes another, in milliseconds.
    pub probe_period_ms: u64,
    /// How long a suspected member has to refute it before it is declared down, in ms.
    pub suspect_to_down_ms: u64,
    /// How many members the cluster is expected to have (updates are passed on more times in
    /// a larger one).
    pub expected_members: u32,
    /// How often a node asks peers what they have (apps, removals, load), in milliseconds.
    pub sync_interval_ms: u64,
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
            seeds: Vec::new(),
            seed_interval_secs: 10,
            advertise: None,
            labels: BTreeMap::new(),
            probe_period_ms: 1000,
            suspect_to_down_ms: 3000,
            expected_members: 32,
            sync_interval_ms: 1000,
        }
    }
}

/// What a node says of itself: the labels configured in `[cluster.labels]`, and `backends`,
/// those of `backends` available here (comma-separated). Apps are placed by these.
pub fn node_labels(
    config: &ClusterConfig,
    backends: &crate::nn::backend::Backends,
) -> BTreeMap<String, String> {
    let mut labels = config.labels.clone();
    let available: Vec<&str> = backends
        .describe()
        .iter()
        .filter(|backend| backend.available)
        .map(|backend| backend.name)
        .collect();
    labels.insert("backends".into(), available.join(","));
    labels
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
        self.seeds()?;
        if !(1..=3600).contains(&self.seed_interval_secs) {
            return Err(format!(
                "cluster.seed_interval_secs must be between 1 and 3600, not {}",
                self.seed_interval_secs
            ));
        }
        if !(100..=60_000).contains(&self.probe_period_ms) {
            return Err(format!(
                "cluster.probe_period_ms must be between 100 and 60000, not {}",
                self.probe_period_ms
            ));
        }
        if !(self.probe_period_ms..=600_000).contains(&self.suspect_to_down_ms) {
            return Err(format!(
                "cluster.suspect_to_down_ms must be between probe_period_ms and 600000, not {}",
                self.suspect_to_down_ms
            ));
        }
        if !(1..=100_000).contains(&self.expected_members) {
            return Err(format!(
                "cluster.expected_members must be between 1 and 100000, not {}",
                self.expected_members
            ));
        }
        if !(100..=600_000).contains(&self.sync_interval_ms) {
            return Err(format!(
                "cluster.sync_interval_ms must be between 100 and 600000, not {}",
                self.sync_interval_ms
            ));
        }
        Ok(())
    }

    /// The seeds, parsed (names are resolved when they are contacted, not here).
    pub fn seeds(&self) -> Result<Vec<Seed>, String> {
        self.seeds.iter().map(|seed| seed.parse()).collect()
    }

    /// How fast failures are detected.
    pub fn timing(&self) -> membership::Timing {
        membership::Timing {
            probe_period: std::time::Duration::from_millis(self.probe_period_ms),
            suspect_to_down_after: std::time::Duration::from_millis(self.suspect_to_down_ms),
            expected_members: self.expected_members,
        }
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

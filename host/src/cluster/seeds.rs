//! Seeds: the members a node joins the cluster through. A seed is named
//! (`<node-id>@<host:port>`) or found through DNS (`dns:<name>:<port>`: every address the name
//! resolves to, as a Kubernetes headless Service lists its pods). An address found through DNS
//! says who it is by its certificate: the node dials it with a TLS handshake that any member of
//! the cluster passes, and takes the node id the verified certificate names.
//!
//! Every `[cluster] seed_interval_secs` the node resolves its seeds again and announces itself to each one
//! it does not know as alive. So a node joins through a seed that was down or not yet in DNS
//! when it started, and two groups that formed apart (nodes that started while DNS listed only
//! some of them) find each other; a name that does not resolve yet is not an error, only
//! logged.

use super::membership::{Member, Membership};
use crate::tls::cluster::node_id_of;
use crate::tls::peer::PeerTls;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The longest a name may take to resolve, or an address to answer who it is.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Addresses taken from one DNS name per round: a name that lists more is cut there.
pub const MAX_ADDRESSES_PER_NAME: usize = 64;

/// A seed as `[cluster] seeds` gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seed {
    /// `<node-id>@<host:port>`: the node, and where its node port is.
    Named { id: String, address: String },
    /// `dns:<name>:<port>`: every address `name` resolves to, at `port`.
    Dns { address: String },
}

impl std::str::FromStr for Seed {
    type Err = String;

    fn from_str(seed: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "cluster.seeds: {seed:?} is neither <node-id>@<host:port> nor dns:<name>:<port>"
            )
        };
        let has_port = |address: &str| {
            address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        if let Some(address) = seed.strip_prefix("dns:") {
            return has_port(address)
                .then(|| Self::Dns {
                    address: address.to_string(),
                })
                .ok_or_else(bad);
        }
        let (id, address) = seed.split_once('@').ok_or_else(bad)?;
        (crate::apps::valid_name(id) && has_port(address))
            .then(|| Self::Named {
                id: id.to_string(),
                address: address.to_string(),
            })
            .ok_or_else(bad)
    }
}

/// Resolves `address` (`host:port`) to at most [`MAX_ADDRESSES_PER_NAME`] addresses, within
/// [`LOOKUP_TIMEOUT`]; none when it does not resolve (logged).
async fn resolve(address: &str) -> Vec<SocketAddr> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(address)).await {
        Ok(Ok(found)) => {
            let mut found: Vec<SocketAddr> = found.collect();
            found.sort();
            found.dedup();
            found.truncate(MAX_ADDRESSES_PER_NAME);
            found
        }
        Ok(Err(error)) => {
            tracing::debug!(seed = address, %error, "a seed does not resolve");
            Vec::new()
        }
        Err(_) => {
            tracing::debug!(seed = address, "a seed took too long to resolve");
            Vec::new()
        }
    }
}

/// The node that answers at `addr`, as its certificate (verified against the cluster CA and
/// CRL, as any member's) names it; `None` when nothing answers in time or the certificate is
/// not a member's.
async fn node_at(tls: &PeerTls, addr: SocketAddr) -> Option<String> {
    let connector = tokio_rustls::TlsConnector::from(tls.discovery_client_config());
    let handshake = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let server_name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        connector.connect(server_name, tcp).await.ok()
    };
    let stream = tokio::time::timeout(LOOKUP_TIMEOUT, handshake)
        .await
        .ok()
        .flatten();
    let Some(stream) = stream else {
        tracing::debug!(%addr, "an address found through DNS is not a member that answers");
        return None;
    };
    let certificate = stream.get_ref().1.peer_certificates()?.first()?.clone();
    node_id_of(&certificate, &tls.cluster())
}

/// Announces this node to every seed it does not know as alive, now and then `every`, until
/// `shutdown`.
pub fn spawn(
    seeds: Vec<Seed>,
    every: Duration,
    membership: Arc<Membership>,
    tls: Arc<PeerTls>,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if seeds.is_empty() {
            return;
        }
        let mut rounds = tokio::time::interval(every);
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = rounds.tick() => {}
                () = shutdown.cancelled() => return,
            }
            for seed in unknown_seeds(&seeds, &membership, &tls).await {
                membership.join(seed);
            }
        }
    })
}

/// The seeds that are neither this node nor a member it knows as alive.
async fn unknown_seeds(seeds: &[Seed], membership: &Membership, tls: &PeerTls) -> Vec<Member> {
    let me = membership.me();
    let alive: Vec<Member> = membership
        .members()
        .into_iter()
        .filter(|status| status.state == "alive")
        .map(|status| status.member)
        .collect();
    let known = |id: &str, addr: SocketAddr| {
        alive
            .iter()
            .any(|member| member.id == id || member.addr == addr)
    };
    let mut found = Vec::new();
    for seed in seeds {
        match seed {
            Seed::Named { id, address } => {
                if let Some(addr) = resolve(address).await.first() {
                    if !known(id, *addr) {
                        found.push((id.clone(), *addr));
                    }
                }
            }
            Seed::Dns { address } => {
                let unknown = resolve(address)
                    .await
                    .into_iter()
                    .filter(|addr| !alive.iter().any(|member| member.addr == *addr));
                let named = futures_util::future::join_all(
                    unknown.map(|addr| async move { (node_at(tls, addr).await, addr) }),
                )
                .await;
                for (id, addr) in named {
                    if let Some(id) = id.filter(|id| !known(id, addr)) {
                        found.push((id, addr));
                    }
                }
            }
        }
    }
    found
        .into_iter()
        .filter(|(id, _)| id != &me.id)
        .map(|(id, addr)| Member {
            id,
            addr,
            bump: 0,
            labels: BTreeMap::new(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_named_or_found_through_dns() {
        assert_eq!(
            "a@10.0.0.1:7443".parse(),
            Ok(Seed::Named {
                id: "a".into(),
                address: "10.0.0.1:7443".into()
            })
        );
        assert_eq!(
            "edge-1@edge-1.example:7443".parse::<Seed>().unwrap(),
            Seed::Named {
                id: "edge-1".into(),
                address: "edge-1.example:7443".into()
            }
        );
        assert_eq!(
            "dns:tensorlet-peers.tensorlet.svc.cluster.local:7443".parse(),
            Ok(Seed::Dns {
                address: "tensorlet-peers.tensorlet.svc.cluster.local:7443".into()
            })
        );
        assert!("dns:[::1]:7443".parse::<Seed>().is_ok());
        for refused in [
            "",
            "a",
            "a@",
            "a@host",
            "a@host:port",
            "a@:7443",
            "a@host:70000",
            "Bad_Id@host:7443",
            "dns:",
            "dns:name",
            "dns::7443",
        ] {
            let error = refused.parse::<Seed>().unwrap_err();
            assert!(error.contains("dns:<name>:<port>"), "{refused}: {error}");
        }
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_gives_no_address() {
        assert!(resolve("no-such-seed.invalid:7443").await.is_empty());
        assert_eq!(
            resolve("127.0.0.1:7443").await,
            vec!["127.0.0.1:7443".parse().unwrap()]
        );
    }
}

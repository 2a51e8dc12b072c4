//! HTTPS clients to the cluster's members over mutual TLS: one per member (its id and
//! address), made with the current TLS identity and made again when it is reloaded. Shared by
//! membership, replication and forwarding; each request sets its own timeout.

use super::Member;
use crate::tls::peer::PeerTls;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Clients kept (one per member and address).
const MAX_CLIENTS: usize = 1024;
/// The longest a connection to a member may take to open (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections kept per member.
const IDLE_PER_MEMBER: usize = 8;

/// Clients made with one generation of the TLS identity.
struct Clients {
    generation: u64,
    by_member: HashMap<(String, SocketAddr), reqwest::Client>,
}

/// This node's clients to its peers.
pub struct PeerClients {
    tls: Arc<PeerTls>,
    clients: Mutex<Clients>,
}

impl PeerClients {
    pub fn new(tls: Arc<PeerTls>) -> Self {
        Self {
            tls,
            clients: Mutex::new(Clients {
                generation: 0,
                by_member: HashMap::new(),
            }),
        }
    }

    /// This node's id, as its certificate names it.
    pub fn node_id(&self) -> &str {
        self.tls.node_id()
    }

    /// A client to `member`, which must present a certificate naming it.
    pub fn client(&self, member: &Member) -> Option<reqwest::Client> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.tls.generation();
        if clients.generation != generation {
            *clients = Clients {
                generation,
                by_member: HashMap::new(),
            };
        }
        let key = (member.id.clone(), member.addr);
        if let Some(client) = clients.by_member.get(&key) {
            return Some(client.clone());
        }
        // Members that moved leave clients behind: start over rather than grow without bound.
        if clients.by_member.len() >= MAX_CLIENTS {
            clients.by_member.clear();
        }
        let mut config = (*self.tls.client_config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(config)
            .resolve(&member.id, member.addr)
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(IDLE_PER_MEMBER)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| tracing::warn!(%error, "cannot make a client for a peer"))
            .ok()?;
        clients.by_member.insert(key, client.clone());
        Some(client)
    }
}

/// The URL of `path` on `member`'s node port (`path` starts with `/`).
pub fn url(member: &Member, path: &str) -> String {
    format!("https://{}:{}{path}", member.id, member.addr.port())
}

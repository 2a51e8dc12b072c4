//! What this node knows of its peers beyond membership: the state each last reported (the
//! apps it has and serves, how busy it is), fetched by [`super::replication`] and read by
//! [`super::forwarding`] to pick a peer for a request.

use super::client::PeerClients;
use super::{Member, Membership};
use crate::runtime::{DesiredState, Load};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// What a node reports of itself to its peers (`GET /cluster/v1/state`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PeerState {
    #[serde(flatten)]
    pub desired: DesiredState,
    pub load: Load,
    /// When the cluster CRL it uses was issued (seconds since the epoch).
    #[serde(default)]
    pub crl_issued_at: Option<i64>,
    /// The fingerprint of the tenants and keys it shares.
    #[serde(default)]
    pub tenancy: Option<String>,
}

/// A peer's last report, and when it came.
struct PeerView {
    state: PeerState,
    at: Instant,
}

/// This node's view of the fleet.
pub struct Fleet {
    pub membership: Arc<Membership>,
    pub clients: Arc<PeerClients>,
    views: RwLock<HashMap<String, PeerView>>,
    /// A report older than this is not used to pick a peer.
    fresh_for: Duration,
}

impl Fleet {
    /// A fleet whose reports are trusted for `fresh_for`.
    pub fn new(
        membership: Arc<Membership>,
        clients: Arc<PeerClients>,
        fresh_for: Duration,
    ) -> Self {
        Self {
            membership,
            clients,
            views: RwLock::new(HashMap::new()),
            fresh_for,
        }
    }

    /// The members alive now, other than this node.
    pub fn alive_peers(&self) -> Vec<Member> {
        let me = &self.membership.me().id;
        self.membership
            .members()
            .into_iter()
            .filter(|status| status.state == "alive" && status.member.id != *me)
            .map(|status| status.member)
            .collect()
    }

    /// Keeps `state` as `peer`'s latest report; forgets reports of members no longer alive.
    pub fn record(&self, peer: &str, state: PeerState) {
        let alive: Vec<String> = self.alive_peers().into_iter().map(|m| m.id).collect();
        let mut views = self.views.write().unwrap_or_else(|e| e.into_inner());
        views.retain(|id, _| alive.contains(id));
        views.insert(
            peer.to_string(),
            PeerView {
                state,
                at: Instant::now(),
            },
        );
    }

    /// The load `peer` last reported, if it has.
    pub fn load_of(&self, peer: &str) -> Option<Load> {
        let views = self.views.read().unwrap_or_else(|e| e.into_inner());
        views.get(peer).map(|view| view.state.load)
    }

    /// The alive peers whose fresh report says they serve `app`, with their load.
    pub fn serving(&self, app: &str) -> Vec<(Member, Load)> {
        let views = self.views.read().unwrap_or_else(|e| e.into_inner());
        self.alive_peers()
            .into_iter()
            .filter_map(|member| {
                let view = views.get(&member.id)?;
                let serves = view.at.elapsed() <= self.fresh_for
                    && view.state.desired.serving.iter().any(|name| name == app);
                serves.then_some((member, view.state.load))
            })
            .collect()
    }
}

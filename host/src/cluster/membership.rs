//! Membership and failure detection: SWIM, as the `foca` crate implements it (with suspicion
//! and periodic gossip), its messages carried over the node port's mutual TLS as
//! `POST /cluster/v1/swim`. A node joins through any seed; each member says who it is (its
//! node id, which its certificate must name, the address of its node port, its labels). A
//! message whose sender is not the node its certificate names is refused.
//!
//! One task owns the protocol state; messages, timers and joins reach it through a bounded
//! channel, and what it sends goes out on tasks of its own, at most [`MAX_SENDS_IN_FLIGHT`] at
//! once (beyond that a message is dropped, which SWIM is built to survive).

use super::client::{self, PeerClients};
use bytes::Bytes;
use foca::{Codec, Foca, OwnedNotification, PostcardCodec, Timer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Messages, timers and joins waiting for the protocol task.
const INPUT_QUEUE: usize = 1024;
/// Messages being sent at once.
const MAX_SENDS_IN_FLIGHT: usize = 64;
/// The longest one message may take to reach a peer.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message accepted (foca's packets are at most 1400 bytes).
pub const MAX_MESSAGE_BYTES: usize = 64 << 10;

/// A member as the cluster knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its node id, which its certificate names.
    pub id: String,
    /// Where its node port is.
    pub addr: SocketAddr,
    /// Grows each time it joins again (its start time, then +1 per renewal): the newest wins.
    pub bump: u64,
    /// What it says of itself: region, accelerator, backends.
    pub labels: BTreeMap<String, String>,
}

impl foca::Identity for Member {
    type Addr = String;

    fn renew(&self) -> Option<Self> {
        Some(Self {
            bump: self.bump.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> String {
        self.id.clone()
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}

/// A member and what this node thinks of it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    #[serde(flatten)]
    pub member: Member,
    /// `alive`, `suspect` or `down`.
    pub state: &'static str,
}

/// Why a message was not taken.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("not a membership message")]
    NotMembership,
    #[error("the message's sender is not the node its certificate names")]
    WrongSender,
    #[error("the membership queue is full")]
    Busy,
}

/// The timing of failure detection, from `[cluster]`.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub probe_period: Duration,
    pub suspect_to_down_after: Duration,
    /// How many members the cluster is expected to have: how many times an update is passed
    /// on grows with it (memberlist's rule, as foca's LAN settings have it).
    pub expected_members: u32,
}

enum Input {
    Data(Bytes),
    Timer(Timer<Member>),
    Join(Member),
}

/// This node's membership: feed it messages, ask it who is there.
pub struct Membership {
    inputs: mpsc::Sender<Input>,
    members: Arc<RwLock<Vec<MemberStatus>>>,
    me: Member,
}

impl Membership {
    /// Starts the protocol as `me`, until `shutdown`, when it leaves the cluster. It joins
    /// through the members given to [`Membership::join`].
    pub fn start(
        me: Member,
        clients: Arc<PeerClients>,
        timing: Timing,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (inputs, receiver) = mpsc::channel(INPUT_QUEUE);
        let members = Arc::new(RwLock::new(Vec::new()));
        let membership = Arc::new(Self {
            inputs: inputs.clone(),
            members: members.clone(),
            me: me.clone(),
        });
        let sender = Sender::new(clients);
        tokio::spawn(run(
            me,
            timing,
            receiver,
            inputs.clone(),
            sender,
            members,
            shutdown,
        ));
        membership
    }

    /// Announces this node to `seed`, which answers with what it knows of the cluster.
    pub fn join(&self, seed: Member) {
        if self.inputs.try_send(Input::Join(seed)).is_err() {
            tracing::warn!("the membership queue is full; a seed was not contacted");
        }
    }

    /// This node as the cluster sees it.
    pub fn me(&self) -> &Member {
        &self.me
    }

    /// Every member this node knows of, itself first, then by id.
    pub fn members(&self) -> Vec<MemberStatus> {
        let mut members = vec![MemberStatus {
            member: self.me.clone(),
            state: "alive",
        }];
        members.extend(
            self.members
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .cloned(),
        );
        members
    }

    /// Takes a message from node `peer` (as its certificate names it). Refused when its sender
    /// is another node, or when the protocol's queue is full.
    pub fn receive(&self, peer: &str, message: Bytes) -> Result<(), Refused> {
        let header: foca::Header<Member> = PostcardCodec
            .decode_header(&message[..])
            .map_err(|_| Refused::NotMembership)?;
        if foca::Identity::addr(&header.src) != peer {
            return Err(Refused::WrongSender);
        }
        self.inputs
            .try_send(Input::Data(message))
            .map_err(|_| Refused::Busy)
    }
}

/// Sends messages to peers over mutual TLS, at most [`MAX_SENDS_IN_FLIGHT`] at once.
struct Sender {
    clients: Arc<PeerClients>,
    in_flight: Arc<Semaphore>,
}

impl Sender {
    fn new(clients: Arc<PeerClients>) -> Self {
        Self {
            clients,
            in_flight: Arc::new(Semaphore::new(MAX_SENDS_IN_FLIGHT)),
        }
    }

    fn send(&self, to: Member, message: Bytes) {
        let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
            tracing::debug!(peer = %to.id, "too many membership messages in flight; one dropped");
            return;
        };
        let Some(client) = self.clients.client(&to) else {
            return;
        };
        let url = client::url(&to, "/cluster/v1/swim");
        tokio::spawn(async move {
            let sent = client
                .post(url)
                .timeout(SEND_TIMEOUT)
                .body(message)
                .send()
                .await;
            if let Err(error) = sent.and_then(|response| response.error_for_status()) {
                tracing::debug!(peer = %to.id, %error, "a membership message did not arrive");
            }
            drop(permit);
        });
    }
}

/// The protocol's settings: memberlist's LAN settings for the expected cluster size with
/// `timing`, and announcements every 5 s (to one member, and to two members that are down) so
/// that partitions heal.
pub fn protocol_config(timing: Timing) -> foca::Config {
    let size = std::num::NonZeroU32::new(timing.expected_members.max(1)).expect("at least 1");
    let mut config = foca::Config::new_lan(size);
    config.probe_period = timing.probe_period;
    config.probe_rtt = timing.probe_period / 2;
    config.suspect_to_down_after = timing.suspect_to_down_after;
    config.periodic_announce = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: std::num::NonZeroUsize::new(1).expect("nonzero"),
    });
    config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
        frequency: Duration::from_secs(5),
        num_members: std::num::NonZeroUsize::new(2).expect("nonzero"),
    });
    config
}

/// The protocol task.
async fn run(
    me: Member,
    timing: Timing,
    mut receiver: mpsc::Receiver<Input>,
    inputs: mpsc::Sender<Input>,
    sender: Sender,
    members: Arc<RwLock<Vec<MemberStatus>>>,
    shutdown: CancellationToken,
) {
    let rng = <rand09::rngs::StdRng as rand09::SeedableRng>::from_os_rng();
    let mut foca = Foca::new(me, protocol_config(timing), rng, PostcardCodec);
    let mut runtime = foca::AccumulatingRuntime::new();
    loop {
        let input = tokio::select! {
            input = receiver.recv() => input,
            () = shutdown.cancelled() => None,
        };
        let Some(input) = input else {
            if let Err(error) = foca.leave_cluster(&mut runtime) {
                tracing::debug!(?error, "leaving the cluster");
            }
            while let Some((to, message)) = runtime.to_send() {
                sender.send(to, message);
            }
            return;
        };
        let handled = match input {
            Input::Data(message) => foca.handle_data(&message, &mut runtime),
            Input::Timer(timer) => foca.handle_timer(timer, &mut runtime),
            Input::Join(seed) => foca.announce(seed, &mut runtime),
        };
        if let Err(error) = handled {
            tracing::debug!(?error, "a membership input was refused");
        }
        while let Some(notification) = runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(member) => {
                    tracing::info!(peer = %member.id, "member up")
                }
                OwnedNotification::MemberDown(member) => {
                    tracing::warn!(peer = %member.id, "member down")
                }
                OwnedNotification::Defunct => {
                    // The others declared this node down: it joins again as a newer self.
                    let renewed = foca::Identity::renew(foca.identity()).expect("renewable");
                    if let Err(error) = foca.change_identity(renewed, &mut runtime) {
                        tracing::warn!(?error, "rejoining the cluster failed");
                    }
                }
                _ => {}
            }
        }
        while let Some((to, message)) = runtime.to_send() {
            sender.send(to, message);
        }
        while let Some((delay, timer)) = runtime.to_schedule() {
            let inputs = inputs.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = inputs.send(Input::Timer(timer)).await;
            });
        }
        let mut known: Vec<MemberStatus> = foca
            .iter_membership_state()
            .map(|member| MemberStatus {
                member: member.id().clone(),
                state: match member.state() {
                    foca::State::Alive => "alive",
                    foca::State::Suspect => "suspect",
                    foca::State::Down => "down",
                },
            })
            .collect();
        known.sort_by(|a, b| a.member.id.cmp(&b.member.id));
        *members.write().unwrap_or_else(|e| e.into_inner()) = known;
    }
}

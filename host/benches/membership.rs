//! Membership at scale, simulated: N members in one process run the node's own SWIM settings
//! (`tensorlet::cluster::membership::protocol_config` with the `[cluster]` defaults and
//! `expected_members` = N) on a
//! virtual clock, over a network that delivers every message after 1 ms. It reports how long
//! N members take to all know each other after joining through one seed, how long until every
//! member has declared a killed one down, and how many messages a member sends per second.
//!
//! `cargo bench -p tensorlet --bench membership [-- 100 300 1000]`

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, Timer};
use rand09::SeedableRng;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};
use tensorlet::cluster::membership::{protocol_config, Timing};
use tensorlet::cluster::Member;

/// One-way delay of every message.
const LATENCY_MS: u64 = 1;

enum Event {
    Deliver { to: usize, message: bytes::Bytes },
    Timer { at: usize, timer: Timer<Member> },
}

struct Simulation {
    members: Vec<Foca<Member, PostcardCodec, rand09::rngs::StdRng, foca::NoCustomBroadcast>>,
    alive: Vec<bool>,
    /// Events by virtual time (ms), then order of scheduling.
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    now_ms: u64,
    sent: u64,
    /// Per member: how many others it knows to be active.
    known: Vec<usize>,
    /// When (virtual ms) each member declared the killed member down.
    declared_down: Vec<u64>,
    killed: Option<String>,
}

fn member(index: usize) -> Member {
    Member {
        id: format!("node-{index}"),
        addr: ([10, 0, (index / 250) as u8, (index % 250) as u8], 7443).into(),
        bump: 1,
        labels: BTreeMap::new(),
    }
}

impl Simulation {
    fn new(size: usize) -> Self {
        let timing = Timing {
            probe_period: Duration::from_millis(1000),
            suspect_to_down_after: Duration::from_millis(3000),
            expected_members: size as u32,
        };
        let members = (0..size)
            .map(|index| {
                Foca::new(
                    member(index),
                    protocol_config(timing),
                    rand09::rngs::StdRng::seed_from_u64(index as u64),
                    PostcardCodec,
                )
            })
            .collect();
        Self {
            members,
            alive: vec![true; size],
            queue: BinaryHeap::new(),
            events: Vec::new(),
            now_ms: 0,
            sent: 0,
            known: vec![0; size],
            declared_down: Vec::new(),
            killed: None,
        }
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        let slot = self.events.len();
        self.events.push(Some(event));
        self.queue.push(Reverse((at_ms, slot as u64, slot)));
    }

    /// Hands what member `index` produced to the network and the clock.
    fn drain(&mut self, index: usize, runtime: &mut AccumulatingRuntime<Member>) {
        while let Some((to, message)) = runtime.to_send() {
            self.sent += 1;
            let to = to.id["node-".len()..].parse().expect("simulated id");
            self.schedule(self.now_ms + LATENCY_MS, Event::Deliver { to, message });
        }
        while let Some((delay, timer)) = runtime.to_schedule() {
            let at = self.now_ms + delay.as_millis() as u64;
            self.schedule(at, Event::Timer { at: index, timer });
        }
        while let Some(notification) = runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(_) => self.known[index] += 1,
                OwnedNotification::MemberDown(down) => {
                    self.known[index] = self.known[index].saturating_sub(1);
                    if self.killed.as_ref() == Some(&down.id) {
                        self.declared_down.push(self.now_ms);
                    }
                }
                _ => {}
            }
        }
    }

    /// Runs events until virtual time `until_ms`, or until `done` holds.
    fn run_until(&mut self, until_ms: u64, done: impl Fn(&Self) -> bool) -> Option<u64> {
        let mut runtime = AccumulatingRuntime::new();
        while let Some(Reverse((at, _, slot))) = self.queue.peek().copied() {
            if at > until_ms {
                break;
            }
            self.queue.pop();
            self.now_ms = at;
            let event = self.events[slot].take().expect("each event runs once");
            let index = match event {
                Event::Deliver { to, message } => {
                    if self.alive[to] {
                        let _ = self.members[to].handle_data(&message, &mut runtime);
                    }
                    to
                }
                Event::Timer { at, timer } => {
                    if self.alive[at] {
                        let _ = self.members[at].handle_timer(timer, &mut runtime);
                    }
                    at
                }
            };
            self.drain(index, &mut runtime);
            if done(self) {
                return Some(self.now_ms);
            }
        }
        self.now_ms = until_ms;
        None
    }
}

fn measure(size: usize) {
    let started = Instant::now();
    let mut simulation = Simulation::new(size);
    let mut runtime = AccumulatingRuntime::new();
    for index in 1..size {
        let _ = simulation.members[index].announce(member(0), &mut runtime);
        simulation.drain(index, &mut runtime);
    }
    let converged =
        simulation.run_until(600_000, |s| s.known.iter().all(|&known| known == size - 1));
    let Some(converged_ms) = converged else {
        println!("{size:>5} members: did not converge within 600 s (virtual)");
        return;
    };
    // Steady state: messages per member per second over 10 s.
    let before = simulation.sent;
    let from = simulation.now_ms;
    simulation.run_until(from + 10_000, |_| false);
    let per_member_per_sec = (simulation.sent - before) as f64 / size as f64 / 10.0;
    // A member dies without a word.
    let victim = size / 2;
    simulation.alive[victim] = false;
    simulation.killed = Some(member(victim).id);
    let killed_at = simulation.now_ms;
    simulation.run_until(killed_at + 120_000, |s| s.declared_down.len() == size - 1);
    let seconds = |at: u64| (at - killed_at) as f64 / 1000.0;
    let down = &simulation.declared_down;
    let detection = match down.len() {
        0 => "no member declared it down within 120 s".to_string(),
        n => format!(
            "down for half the members after {:.1} s, for 99 % after {}, for all after {}",
            seconds(down[(size - 1) / 2].min(down[n - 1])),
            down.get((size - 1) * 99 / 100)
                .map_or("-".into(), |&at| format!("{:.1} s", seconds(at))),
            if n == size - 1 {
                format!("{:.1} s", seconds(down[n - 1]))
            } else {
                format!("- ({n} of {} within 120 s)", size - 1)
            },
        ),
    };
    println!(
        "{size:>5} members: all know all {:>5.1} s after joining; a killed member is {detection}; {per_member_per_sec:.1} messages/member/s (simulated in {:.1} s)",
        converged_ms as f64 / 1000.0,
        started.elapsed().as_secs_f64(),
    );
}

fn main() {
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|arg| arg.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![10, 100, 300, 1000]
    } else {
        sizes
    };
    println!("SWIM membership (foca), the node's settings (probe 1 s, suspicion 3 s), 1 ms links, virtual time:");
    for size in sizes {
        measure(size);
    }
}

//! Replicated buckets (`app.replicated_buckets`): the change feed such a bucket keeps, and
//! applying the changes read from a peer's feed.
//!
//! Every write to a replicated bucket gets a [`Stamp`] (when, and on which node; newer than
//! the key's last stamp even when this node's clock is behind) and goes, in one sled
//! transaction with the value itself, into the bucket's feed under a sequence number that
//! only grows. The feed keeps the newest change of each key only, so it never holds more
//! entries than the bucket has keys, plus the tombstones of deleted keys (kept for
//! [`TOMBSTONE_RETENTION`], so that a delete is not undone by a peer that still has the
//! value). A peer reads the feed page by page from the last sequence number it saw, and
//! applies each change whose stamp is newer than this node's for the key: last writer wins
//! per key across the fleet. A change taken from a peer enters this node's feed too, so
//! changes travel on from node to node and a node that was down catches up from any peer.
//! Atomics (`increment`, `swap`) are atomic on one node; two nodes that change one key at
//! once keep the later of the two changes, not both.

use super::quota::AppUsage;
use super::{admit_sizes, KvUsage};
use crate::apps::placement::Stamp;
use crate::store::{Store, StoreError};
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{IVec, Transactional};
use std::sync::Arc;
use std::time::Duration;

/// The most changes a page of a feed holds, and the most bytes of keys and values (a page
/// holds one change whatever its size).
pub const PAGE_CHANGES: usize = 1000;
pub const PAGE_VALUE_BYTES: usize = 4 << 20;
/// The largest page a node takes from a peer.
pub const MAX_PAGE_BYTES: usize = 64 << 20;

/// How long a deleted key's tombstone is kept. A node that comes back after longer than this
/// with the key's old value gives it back to the fleet.
pub const TOMBSTONE_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The prefixes of the trees that hold a replicated bucket's stamps (key → [`KeyState`])
/// and feed (sequence number → [`Change`]), beside the bucket's own tree.
const STAMPS_PREFIX: &str = "kvstamps/";
const FEED_PREFIX: &str = "kvfeed/";

/// What this node knows of a key of a replicated bucket: its newest change's stamp and
/// sequence number, and whether that change deleted it.
#[derive(Debug, Serialize, Deserialize)]
struct KeyState {
    stamp: Stamp,
    seq: u64,
    deleted: bool,
}

/// One change of a key: its new value, or `None` when it was deleted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub seq: u64,
    pub key: Vec<u8>,
    pub stamp: Stamp,
    pub value: Option<Vec<u8>>,
}

/// A page of a feed: its changes after a sequence number, in order, and the feed's newest
/// sequence number (a reader whose cursor is past it reads the feed again from the start:
/// the node's database was restored or replaced).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct FeedPage {
    pub changes: Vec<Change>,
    pub last: u64,
}

impl FeedPage {
    /// The page as bytes for a peer.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a page always encodes")
    }

    /// A page a peer sent.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("a malformed feed page: {e}"))
    }
}

/// The new values a write decides on, key by key (`None`: delete it; no values at all: write
/// nothing), and what it returns to the guest.
pub type Decided<R> = (Vec<Option<Vec<u8>>>, R);

/// A replicated bucket: its values, its keys' stamps and its feed.
#[derive(Clone)]
pub struct Feed {
    values: sled::Tree,
    stamps: sled::Tree,
    log: sled::Tree,
    usage: Arc<AppUsage>,
    node: Arc<str>,
}

fn storage(error: impl std::fmt::Display) -> String {
    format!("the database: {error}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("a feed record always encodes")
}

fn decode_state(bytes: &[u8]) -> Result<KeyState, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("a malformed key stamp: {e}"))
}

impl Feed {
    /// Bucket `bucket` of the app whose scoped name is `app`, written on node `node`.
    pub fn open(
        store: &Store,
        usage: &KvUsage,
        app: &str,
        bucket: &str,
        node: &Arc<str>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            values: store.tree(&super::tree_name(app, bucket))?,
            stamps: store.tree(&format!("{STAMPS_PREFIX}{app}/{bucket}"))?,
            log: store.tree(&format!("{FEED_PREFIX}{app}/{bucket}"))?,
            usage: usage.of(app),
            node: node.clone(),
        })
    }

    /// The bucket's own tree, where its values are.
    pub fn values(&self) -> &sled::Tree {
        &self.values
    }

    /// Writes what `decide` makes of the current values of `keys`, with a new stamp for each
    /// key, in one transaction, once the app's quotas admit the whole change; then counts it.
    /// A refusal of `decide` or of the quotas writes nothing.
    pub fn write<R>(
        &self,
        keys: &[&[u8]],
        decide: impl Fn(&[Option<IVec>]) -> Result<Decided<R>, String>,
    ) -> Result<R, String> {
        let _writing = self.usage.writing();
        let outcome =
            (&self.values, &self.stamps, &self.log).transaction(|(values, stamps, log)| {
                let abort = |message: String| ConflictableTransactionError::Abort(message);
                let mut current = Vec::with_capacity(keys.len());
                for key in keys {
                    current.push(values.get(key)?);
                }
                let (new, returned) = decide(&current).map_err(abort)?;
                if new.is_empty() {
                    return Ok((returned, Vec::new()));
                }
                let sizes: Vec<_> = keys
                    .iter()
                    .zip(&current)
                    .zip(&new)
                    .map(|((key, old), new)| {
                        (
                            key.len(),
                            old.as_ref().map(|v| v.len()),
                            new.as_ref().map(Vec::len),
                        )
                    })
                    .collect();
                admit_sizes(&self.usage, &sizes).map_err(abort)?;
                for (key, value) in keys.iter().zip(new) {
                    let known = match stamps.get(key)? {
                        Some(bytes) => Some(decode_state(&bytes).map_err(abort)?),
                        None => None,
                    };
                    let change = Change {
                        seq: next_seq(log)?,
                        key: key.to_vec(),
                        stamp: Stamp::next(&self.node, known.as_ref().map(|k| &k.stamp)),
                        value,
                    };
                    if let Some(known) = &known {
                        log.remove(&known.seq.to_be_bytes()[..])?;
                    }
                    record(values, stamps, log, &change)?;
                }
                Ok((returned, sizes))
            });
        let (returned, sizes) = outcome.map_err(|error| match error {
            TransactionError::Abort(message) => message,
            TransactionError::Storage(error) => storage(error),
        })?;
        for (key_len, old, new) in sizes {
            self.usage.record(key_len, old, new);
        }
        Ok(returned)
    }

    /// Applies the changes of a peer's feed whose stamps are newer than this node's for their
    /// keys; how many it applied. A change the app's quotas refuse is skipped (and logged):
    /// this node then keeps its older value of the key.
    pub fn apply(&self, changes: &[Change]) -> Result<usize, String> {
        let mut applied = 0;
        for change in changes {
            let _writing = self.usage.writing();
            let outcome =
                (&self.values, &self.stamps, &self.log).transaction(|(values, stamps, log)| {
                    let abort = |message: String| ConflictableTransactionError::Abort(message);
                    let known = match stamps.get(&change.key)? {
                        Some(bytes) => Some(decode_state(&bytes).map_err(abort)?),
                        None => None,
                    };
                    if known
                        .as_ref()
                        .is_some_and(|known| known.stamp >= change.stamp)
                    {
                        return Ok(None);
                    }
                    let old = values.get(&change.key)?.map(|v| v.len());
                    let size = (change.key.len(), old, change.value.as_ref().map(Vec::len));
                    admit_sizes(&self.usage, &[size]).map_err(abort)?;
                    if let Some(known) = &known {
                        log.remove(&known.seq.to_be_bytes()[..])?;
                    }
                    let ours = Change {
                        seq: next_seq(log)?,
                        ..change.clone()
                    };
                    record(values, stamps, log, &ours)?;
                    Ok(Some(size))
                });
            match outcome {
                Ok(Some((key_len, old, new))) => {
                    self.usage.record(key_len, old, new);
                    applied += 1;
                }
                Ok(None) => {}
                Err(TransactionError::Abort(message)) => tracing::warn!(
                    key = %String::from_utf8_lossy(&change.key),
                    %message,
                    "a peer's key-value change was not taken"
                ),
                Err(TransactionError::Storage(error)) => return Err(storage(error)),
            }
        }
        Ok(applied)
    }

    /// The changes after sequence number `after`, in order: at most `max_changes`, and no more
    /// than `max_bytes` of values unless the first alone is larger.
    pub fn page(
        &self,
        after: u64,
        max_changes: usize,
        max_bytes: usize,
    ) -> Result<FeedPage, String> {
        let last = match self.log.last().map_err(storage)? {
            Some((seq, _)) => seq_of(&seq)?,
            None => 0,
        };
        let mut page = FeedPage {
            changes: Vec::new(),
            last,
        };
        let mut bytes = 0;
        let start = after.saturating_add(1).to_be_bytes();
        for entry in self.log.range(start..) {
            let (_, encoded) = entry.map_err(storage)?;
            let change: Change = postcard::from_bytes(&encoded)
                .map_err(|e| format!("a malformed feed entry: {e}"))?;
            bytes += change.key.len() + change.value.as_ref().map_or(0, Vec::len);
            if !page.changes.is_empty() && bytes > max_bytes {
                break;
            }
            page.changes.push(change);
            if page.changes.len() == max_changes {
                break;
            }
        }
        Ok(page)
    }

    /// Drops the tombstones of keys deleted before `before_ms` (milliseconds since the Unix
    /// epoch); how many it dropped.
    pub fn sweep_tombstones(&self, before_ms: u64) -> Result<usize, String> {
        let mut swept = 0;
        for entry in self.stamps.iter() {
            let (key, bytes) = entry.map_err(storage)?;
            let state = decode_state(&bytes)?;
            if !state.deleted || state.stamp.at_ms >= before_ms {
                continue;
            }
            let _writing = self.usage.writing();
            // Only if no change came meanwhile.
            let outcome: Result<bool, TransactionError<()>> = (&self.stamps, &self.log)
                .transaction(|(stamps, log)| {
                    if stamps.get(&key)?.as_deref() != Some(&bytes[..]) {
                        return Ok(false);
                    }
                    stamps.remove(key.clone())?;
                    log.remove(&state.seq.to_be_bytes()[..])?;
                    Ok(true)
                });
            match outcome {
                Ok(dropped) => swept += usize::from(dropped),
                Err(TransactionError::Storage(error)) => return Err(storage(error)),
                Err(TransactionError::Abort(())) => {}
            }
        }
        Ok(swept)
    }
}

/// Writes `change` as this node's newest of its key: the value (or its absence), the key's
/// stamp and the feed entry.
fn record(
    values: &sled::transaction::TransactionalTree,
    stamps: &sled::transaction::TransactionalTree,
    log: &sled::transaction::TransactionalTree,
    change: &Change,
) -> Result<(), sled::transaction::UnabortableTransactionError> {
    match &change.value {
        Some(value) => values.insert(&change.key[..], &value[..])?,
        None => values.remove(&change.key[..])?,
    };
    let state = KeyState {
        stamp: change.stamp.clone(),
        seq: change.seq,
        deleted: change.value.is_none(),
    };
    stamps.insert(&change.key[..], encode(&state))?;
    log.insert(&change.seq.to_be_bytes()[..], encode(change))?;
    Ok(())
}

/// A sequence number for a new feed entry: above every one before it, and never 0 (a reader
/// that has seen nothing reads after 0).
fn next_seq(
    log: &sled::transaction::TransactionalTree,
) -> Result<u64, sled::transaction::UnabortableTransactionError> {
    Ok(log.generate_id()? + 1)
}

fn seq_of(bytes: &[u8]) -> Result<u64, String> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| "a malformed feed sequence number".to_string())?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvQuotas;
    use crate::testing::TempStore;

    struct Node {
        _store: TempStore,
        usage: KvUsage,
        feed: Feed,
    }

    fn node(id: &str, max_bytes: u64) -> Node {
        let store = TempStore::default();
        let quotas = KvQuotas {
            max_bytes,
            max_keys: 100,
            max_buckets: 4,
        };
        let usage = KvUsage::open(&store.store, quotas).unwrap();
        let feed = Feed::open(&store.store, &usage, "app", "b", &Arc::from(id)).unwrap();
        Node {
            _store: store,
            usage,
            feed,
        }
    }

    fn set(node: &Node, key: &str, value: &str) {
        let value = value.as_bytes().to_vec();
        node.feed
            .write(&[key.as_bytes()], |_| Ok((vec![Some(value.clone())], ())))
            .unwrap();
    }

    fn delete(node: &Node, key: &str) {
        node.feed
            .write(&[key.as_bytes()], |_| Ok((vec![None], ())))
            .unwrap();
    }

    fn get(node: &Node, key: &str) -> Option<String> {
        let value = node.feed.values().get(key).unwrap();
        value.map(|v| String::from_utf8(v.to_vec()).unwrap())
    }

    /// Everything `from` has after `after`, applied to `to`; how many changes applied.
    fn pull(from: &Node, to: &Node, after: u64) -> usize {
        let page = from.feed.page(after, 1000, 1 << 20).unwrap();
        let page = FeedPage::decode(&page.encode()).unwrap();
        to.feed.apply(&page.changes).unwrap()
    }

    #[test]
    fn the_feed_holds_the_newest_change_of_each_key_in_order() {
        let a = node("a", 1 << 20);
        set(&a, "x", "1");
        set(&a, "y", "1");
        set(&a, "x", "2");
        delete(&a, "y");
        let page = a.feed.page(0, 100, 1 << 20).unwrap();
        let changes: Vec<_> = page
            .changes
            .iter()
            .map(|c| (c.key.clone(), c.value.clone()))
            .collect();
        assert_eq!(
            changes,
            vec![(b"x".to_vec(), Some(b"2".to_vec())), (b"y".to_vec(), None)]
        );
        assert_eq!(page.last, page.changes[1].seq);
        assert!(page.changes[0].seq < page.changes[1].seq);
        // A reader past the first change sees only the second; one at the end sees none.
        let rest = a.feed.page(page.changes[0].seq, 100, 1 << 20).unwrap();
        assert_eq!(rest.changes, page.changes[1..]);
        assert!(a
            .feed
            .page(page.last, 100, 1 << 20)
            .unwrap()
            .changes
            .is_empty());
        // Pages are bounded by count and by bytes, but always hold one change.
        assert_eq!(a.feed.page(0, 1, 1 << 20).unwrap().changes.len(), 1);
        assert_eq!(a.feed.page(0, 100, 0).unwrap().changes.len(), 1);
    }

    #[test]
    fn nodes_that_exchange_feeds_converge_on_the_last_writer_per_key() {
        let (a, b) = (node("a", 1 << 20), node("b", 1 << 20));
        set(&a, "only-a", "from a");
        set(&b, "only-b", "from b");
        set(&a, "both", "a's");
        std::thread::sleep(Duration::from_millis(5));
        set(&b, "both", "b's, later");
        set(&a, "gone", "soon deleted");
        assert_eq!(
            pull(&a, &b, 0),
            2,
            "b takes what it lacks, not a's older write"
        );
        assert_eq!(pull(&b, &a, 0), 2, "a takes b's key and b's later write");
        delete(&b, "gone");
        assert_eq!(pull(&b, &a, 0), 1, "the delete travels");
        for node in [&a, &b] {
            assert_eq!(get(node, "only-a").as_deref(), Some("from a"));
            assert_eq!(get(node, "only-b").as_deref(), Some("from b"));
            assert_eq!(get(node, "both").as_deref(), Some("b's, later"));
            assert_eq!(get(node, "gone"), None);
        }
        // Nothing is new any more either way, and a's older write does not come back.
        assert_eq!(pull(&a, &b, 0), 0);
        assert_eq!(pull(&b, &a, 0), 0);
        // The usage counts what each node holds.
        assert_eq!(a.usage.of("app").totals(), b.usage.of("app").totals());
        // A change taken from a peer travels on: c learns a's key from b.
        let c = node("c", 1 << 20);
        pull(&b, &c, 0);
        assert_eq!(get(&c, "only-a").as_deref(), Some("from a"));
    }

    #[test]
    fn a_local_write_is_newer_than_the_last_change_even_from_a_clock_ahead() {
        let (a, b) = (node("a", 1 << 20), node("b", 1 << 20));
        let ahead = Change {
            seq: 1,
            key: b"k".to_vec(),
            stamp: Stamp {
                at_ms: u64::MAX / 2,
                node: "clock-ahead".into(),
            },
            value: Some(b"old".to_vec()),
        };
        assert_eq!(b.feed.apply(&[ahead]).unwrap(), 1);
        set(&b, "k", "new");
        pull(&b, &a, 0);
        assert_eq!(get(&a, "k").as_deref(), Some("new"));
    }

    #[test]
    fn a_peer_change_past_the_quota_is_skipped_and_the_rest_are_taken() {
        let (a, small) = (node("a", 1 << 20), node("small", 50));
        set(&a, "big", &"x".repeat(100));
        set(&a, "fits", "y");
        assert_eq!(pull(&a, &small, 0), 1);
        assert_eq!(get(&small, "big"), None);
        assert_eq!(get(&small, "fits").as_deref(), Some("y"));
        assert_eq!(small.usage.of("app").totals(), (5, 1));
        // A local write past the quota is refused and writes nothing, not even a feed entry.
        let before = small.feed.page(0, 100, 1 << 20).unwrap().changes.len();
        let refused = small
            .feed
            .write(&[b"big".as_slice()], |_| Ok((vec![Some(vec![0; 100])], ())));
        assert!(refused.unwrap_err().contains("quota"));
        assert_eq!(
            small.feed.page(0, 100, 1 << 20).unwrap().changes.len(),
            before
        );
    }

    #[test]
    fn old_tombstones_are_swept_and_recent_ones_kept() {
        let a = node("a", 1 << 20);
        set(&a, "kept", "1");
        set(&a, "deleted", "1");
        delete(&a, "deleted");
        let now = Stamp::next("a", None).at_ms;
        assert_eq!(a.feed.sweep_tombstones(now - 60_000).unwrap(), 0);
        // (A write is stamped past the one before it, so the delete may be a ms ahead.)
        assert_eq!(a.feed.sweep_tombstones(now + 1000).unwrap(), 1);
        let page = a.feed.page(0, 100, 1 << 20).unwrap();
        assert_eq!(page.changes.len(), 1);
        assert_eq!(page.changes[0].key, b"kept");
    }
}

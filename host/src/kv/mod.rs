//! `wasi:keyvalue` (store, atomics, batch; 0.2.0-draft2) on the node's sled database.
//!
//! Buckets are namespaced per app and tenant: bucket `b` of app `a` is the sled tree `kv/a/b`
//! for the operator's tenant and `kv/t/a/b` for tenant `t`, so apps never see each other's
//! data, nor an app of another tenant that takes a removed app's name. A batch (`set-many`, `delete-many`) is one sled batch: all its
//! keys or none, checked against the quotas as a whole. Every write (`set`, `delete`,
//! `increment`, a successful `swap`, a batch) returns to the guest only once it is on disk — acknowledged means durable — and
//! concurrent writers share one flush (see [`Store::make_durable`]). A bucket the app declares
//! in `app.replicated_buckets` also keeps a change feed that its peers in the fleet read
//! ([`feed`]).

pub mod feed;
mod quota;

pub use quota::{KvQuotas, KvUsage};

use crate::store::Store;
use feed::{Decided, Feed};
use quota::AppUsage;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::Arc;
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "wasi:keyvalue/imports",
        imports: {
            "wasi:keyvalue/store.[method]bucket.set": async | trappable,
            "wasi:keyvalue/store.[method]bucket.delete": async | trappable,
            "wasi:keyvalue/atomics.increment": async | trappable,
            "wasi:keyvalue/atomics.swap": async | trappable,
            "wasi:keyvalue/batch.set-many": async | trappable,
            "wasi:keyvalue/batch.delete-many": async | trappable,
            default: trappable,
        },
        with: {
            "wasi:keyvalue/store.bucket": super::Bucket,
            "wasi:keyvalue/atomics.cas": super::Cas,
        },
        require_store_data_send: true,
    });
}

use bindings::wasi::keyvalue::{atomics, batch, store};

/// Keys a `list-keys` page returns at most.
const LIST_PAGE: usize = 1000;
/// Largest value a guest may store.
const MAX_VALUE_BYTES: usize = 16 << 20;

/// The buckets an instance may open, and which of them replicate.
#[derive(Debug, Clone, Default)]
pub struct KvGrant {
    /// The buckets the app declared (`None`: any of its buckets, for revisions made before
    /// allow-lists).
    pub allowed: Option<Vec<String>>,
    /// Those that keep a change feed for the fleet.
    pub replicated: Vec<String>,
    /// The node the instance runs on, which stamps its writes to replicated buckets.
    pub node: Arc<str>,
}

/// Per-request key-value state: whose buckets this instance opens, and its app's quotas.
pub struct KvCtx {
    store: Store,
    app: String,
    usage: Arc<KvUsage>,
    grant: KvGrant,
}

impl KvCtx {
    /// State for one instance of the app whose [`crate::tenancy::scoped_name`] is `app`, which
    /// may open the buckets `grant` names.
    pub fn new(store: Store, app: &str, usage: &Arc<KvUsage>, grant: KvGrant) -> Self {
        Self {
            store,
            app: app.to_string(),
            usage: usage.clone(),
            grant,
        }
    }
}

/// The value behind a `bucket` resource: its tree, and its feed when it replicates (every
/// write then goes through the feed).
pub struct Bucket {
    tree: sled::Tree,
    usage: Arc<AppUsage>,
    feed: Option<Feed>,
}

/// The value behind a `cas` resource: the bucket, the key and the value it saw.
pub struct Cas {
    tree: sled::Tree,
    usage: Arc<AppUsage>,
    feed: Option<Feed>,
    key: String,
    seen: Option<sled::IVec>,
}

/// Refuses values over [`MAX_VALUE_BYTES`] and changes past the app's quotas, before anything
/// is written. Each change is a key's length, its value's old length (`None`: a new key) and
/// its new one (`None`: deleted).
pub(crate) fn admit_sizes(
    usage: &AppUsage,
    changes: &[(usize, Option<usize>, Option<usize>)],
) -> Result<(), String> {
    let (mut grows, mut shrinks, mut new_keys) = (0u64, 0u64, 0u64);
    for &(key_len, old, new) in changes {
        if let Some(new) = new.filter(|&new| new > MAX_VALUE_BYTES) {
            return Err(format!(
                "a value may be at most {MAX_VALUE_BYTES} bytes, not {new}"
            ));
        }
        let size = |len: Option<usize>| len.map_or(0, |l| (l + key_len) as u64);
        let (before, after) = (size(old), size(new));
        grows += after.saturating_sub(before);
        shrinks += before.saturating_sub(after);
        new_keys += u64::from(old.is_none() && new.is_some());
    }
    usage.admit_change(grows.saturating_sub(shrinks), new_keys)
}

/// [`admit_sizes`] for one value replacing `old` bytes under `key`.
fn admit(
    usage: &AppUsage,
    key: &str,
    old: Option<usize>,
    value: &[u8],
) -> Result<(), store::Error> {
    admit_sizes(usage, &[(key.len(), old, Some(value.len()))]).map_err(store::Error::Other)
}

/// Writes through a replicated bucket's feed what `decide` makes of the current values of
/// `keys`, and waits until it is on disk.
async fn write_replicated<R>(
    store: Store,
    feed: &Feed,
    keys: &[&[u8]],
    decide: impl Fn(&[Option<sled::IVec>]) -> Result<Decided<R>, String>,
) -> Result<R, store::Error> {
    let returned = feed.write(keys, decide).map_err(store::Error::Other)?;
    durable(store).await?;
    Ok(returned)
}

/// The view of a store that the key-value host functions work on.
pub struct KvView<'a> {
    pub ctx: &'a mut KvCtx,
    pub table: &'a mut ResourceTable,
}

struct HasKv;

impl HasData for HasKv {
    type Data<'a> = KvView<'a>;
}

/// Adds `wasi:keyvalue/store` and `wasi:keyvalue/atomics` to a linker.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> KvView<'_>,
) -> wasmtime::Result<()> {
    bindings::Imports::add_to_linker::<T, HasKv>(linker, view)
}

/// The prefix of every key-value tree's name.
const TREE_PREFIX: &str = "kv/";

/// The sled tree that holds bucket `bucket` of the app whose scoped name is `app`.
pub fn tree_name(app: &str, bucket: &str) -> String {
    format!("{TREE_PREFIX}{app}/{bucket}")
}

fn other(error: impl std::fmt::Display) -> store::Error {
    store::Error::Other(error.to_string())
}

/// Whether `identifier` can name a bucket: 1-64 letters, digits, '.', '_' or '-'.
pub fn valid_bucket(identifier: &str) -> bool {
    (1..=64).contains(&identifier.len())
        && identifier
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Waits until the writes made so far are on disk. Takes the store by value so that the
/// future does not borrow the (non-`Sync`) view across the flush.
async fn durable(store: Store) -> Result<(), store::Error> {
    store.make_durable().await.map_err(other)
}

impl store::Host for KvView<'_> {
    fn open(
        &mut self,
        identifier: String,
    ) -> wasmtime::Result<Result<Resource<Bucket>, store::Error>> {
        if !valid_bucket(&identifier) {
            return Ok(Err(store::Error::Other(format!(
                "invalid bucket name {identifier:?}: use 1-64 letters, digits, '.', '_' or '-'"
            ))));
        }
        let grant = &self.ctx.grant;
        if grant
            .allowed
            .as_ref()
            .is_some_and(|allowed| !allowed.contains(&identifier))
        {
            return Ok(Err(store::Error::AccessDenied));
        }
        let usage = self.ctx.usage.of(&self.ctx.app);
        if let Err(message) = usage.open_bucket(&identifier) {
            return Ok(Err(store::Error::Other(message)));
        }
        let (store, app) = (&self.ctx.store, &self.ctx.app);
        let opened = if grant.replicated.contains(&identifier) {
            Feed::open(store, &self.ctx.usage, app, &identifier, &grant.node)
                .map(|feed| (feed.values().clone(), Some(feed)))
        } else {
            store
                .tree(&tree_name(app, &identifier))
                .map(|tree| (tree, None))
        };
        match opened {
            Ok((tree, feed)) => Ok(Ok(self.table.push(Bucket { tree, usage, feed })?)),
            Err(error) => Ok(Err(other(error))),
        }
    }
}

impl store::HostBucket for KvView<'_> {
    fn get(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        let tree = &self.table.get(&bucket)?.tree;
        Ok(tree
            .get(key.as_bytes())
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(other))
    }

    async fn set(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let Bucket { tree, usage, feed } = self.table.get(&bucket)?;
        if let Some(feed) = feed {
            let decide = |_: &[_]| Ok((vec![Some(value.clone())], ()));
            let store = self.ctx.store.clone();
            return Ok(write_replicated(store, feed, &[key.as_bytes()], decide).await);
        }
        let written = {
            let _writing = usage.writing();
            tree.get(key.as_bytes())
                .map_err(other)
                .and_then(|old| admit(usage, &key, old.map(|v| v.len()), &value))
                .and_then(|()| {
                    let new = value.len();
                    let replaced = tree.insert(key.as_bytes(), value).map_err(other)?;
                    usage.record(key.len(), replaced.map(|v| v.len()), Some(new));
                    Ok(())
                })
        };
        if let Err(error) = written {
            return Ok(Err(error));
        }
        Ok(durable(self.ctx.store.clone()).await)
    }

    async fn delete(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let Bucket { tree, usage, feed } = self.table.get(&bucket)?;
        if let Some(feed) = feed {
            let decide = |_: &[_]| Ok((vec![None], ()));
            let store = self.ctx.store.clone();
            return Ok(write_replicated(store, feed, &[key.as_bytes()], decide).await);
        }
        let removed = {
            let _writing = usage.writing();
            tree.remove(key.as_bytes())
                .map(|removed| usage.record(key.len(), removed.map(|v| v.len()), None))
        };
        if let Err(error) = removed {
            return Ok(Err(other(error)));
        }
        Ok(durable(self.ctx.store.clone()).await)
    }

    fn exists(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<bool, store::Error>> {
        let tree = &self.table.get(&bucket)?.tree;
        Ok(tree.contains_key(key.as_bytes()).map_err(other))
    }

    fn list_keys(
        &mut self,
        bucket: Resource<Bucket>,
        cursor: Option<String>,
    ) -> wasmtime::Result<Result<store::KeyResponse, store::Error>> {
        let tree = &self.table.get(&bucket)?.tree;
        let start = match &cursor {
            Some(after) => Bound::Excluded(after.as_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let mut keys = Vec::new();
        for entry in tree.range::<Vec<u8>, _>((start, Bound::Unbounded)).keys() {
            match entry {
                Ok(key) => keys.push(String::from_utf8_lossy(&key).into_owned()),
                Err(error) => return Ok(Err(other(error))),
            }
            if keys.len() == LIST_PAGE {
                break;
            }
        }
        let cursor = (keys.len() == LIST_PAGE).then(|| keys[LIST_PAGE - 1].clone());
        Ok(Ok(store::KeyResponse { keys, cursor }))
    }

    fn drop(&mut self, bucket: Resource<Bucket>) -> wasmtime::Result<()> {
        self.table.delete(bucket)?;
        Ok(())
    }
}

/// Keys one batch call may name.
const MAX_BATCH_KEYS: usize = 1000;
/// Bytes of values one `get-many` may return: the host copies them before the guest's memory
/// limit can refuse them.
const MAX_BATCH_READ_BYTES: usize = 64 << 20;

fn check_batch_size(keys: usize) -> Result<(), store::Error> {
    if keys > MAX_BATCH_KEYS {
        return Err(store::Error::Other(format!(
            "a batch may name at most {MAX_BATCH_KEYS} keys, not {keys}"
        )));
    }
    Ok(())
}

impl batch::Host for KvView<'_> {
    fn get_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<Vec<Option<(String, Vec<u8>)>>, store::Error>> {
        if let Err(error) = check_batch_size(keys.len()) {
            return Ok(Err(error));
        }
        let tree = &self.table.get(&bucket)?.tree;
        let mut values = Vec::with_capacity(keys.len());
        let mut bytes = 0usize;
        for key in keys {
            match tree.get(key.as_bytes()) {
                Ok(value) => {
                    bytes += value.as_ref().map_or(0, |v| v.len());
                    if bytes > MAX_BATCH_READ_BYTES {
                        return Ok(Err(store::Error::Other(format!(
                            "a get-many may return at most {MAX_BATCH_READ_BYTES} bytes of values: ask for fewer keys"
                        ))));
                    }
                    values.push(value.map(|v| (key, v.to_vec())));
                }
                Err(error) => return Ok(Err(other(error))),
            }
        }
        Ok(Ok(values))
    }

    async fn set_many(
        &mut self,
        bucket: Resource<Bucket>,
        key_values: Vec<(String, Vec<u8>)>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        if let Err(error) = check_batch_size(key_values.len()) {
            return Ok(Err(error));
        }
        // The last value given for a key wins, as it would with one `set` after another.
        let writes: BTreeMap<String, Option<Vec<u8>>> = key_values
            .into_iter()
            .map(|(key, value)| (key, Some(value)))
            .collect();
        self.write_many(bucket, writes).await
    }

    async fn delete_many(
        &mut self,
        bucket: Resource<Bucket>,
        keys: Vec<String>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        if let Err(error) = check_batch_size(keys.len()) {
            return Ok(Err(error));
        }
        let deletes: BTreeMap<String, Option<Vec<u8>>> =
            keys.into_iter().map(|key| (key, None)).collect();
        self.write_many(bucket, deletes).await
    }
}

impl KvView<'_> {
    /// Writes (`Some`) and deletes (`None`) every key of a batch at once, then waits until the
    /// batch is on disk.
    async fn write_many(
        &mut self,
        bucket: Resource<Bucket>,
        changes: BTreeMap<String, Option<Vec<u8>>>,
    ) -> wasmtime::Result<Result<(), store::Error>> {
        let Bucket { tree, usage, feed } = self.table.get(&bucket)?;
        if let Some(feed) = feed {
            let keys: Vec<&[u8]> = changes.keys().map(String::as_bytes).collect();
            let decide = |_: &[_]| Ok((changes.values().cloned().collect(), ()));
            let store = self.ctx.store.clone();
            return Ok(write_replicated(store, feed, &keys, decide).await);
        }
        let written = {
            let _writing = usage.writing();
            write_batch(tree, usage, changes.into_iter())
        };
        if let Err(error) = written {
            return Ok(Err(error));
        }
        Ok(durable(self.ctx.store.clone()).await)
    }
}

/// Writes (`Some`) and deletes (`None`) every key at once, in one sled batch, once the app's
/// quotas admit the whole change; then counts it. The caller holds the app's write guard.
fn write_batch(
    tree: &sled::Tree,
    usage: &AppUsage,
    changes: impl Iterator<Item = (String, Option<Vec<u8>>)>,
) -> Result<(), store::Error> {
    let mut batch = sled::Batch::default();
    let mut counted = Vec::new();
    for (key, value) in changes {
        let old = tree.get(key.as_bytes()).map_err(other)?.map(|v| v.len());
        counted.push((key.len(), old, value.as_ref().map(Vec::len)));
        match value {
            Some(value) => batch.insert(key.as_bytes(), value),
            None => batch.remove(key.as_bytes()),
        }
    }
    admit_sizes(usage, &counted).map_err(store::Error::Other)?;
    tree.apply_batch(batch).map_err(other)?;
    for (key_len, old, new) in counted {
        usage.record(key_len, old, new);
    }
    Ok(())
}

/// Adds `delta` to the decimal counter in `current` (absent counts as 0).
fn incremented(current: Option<&[u8]>, delta: i64) -> Result<i64, String> {
    let value = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or("the key holds a value that is not a decimal integer")?,
    };
    value
        .checked_add(delta)
        .ok_or_else(|| "the counter would overflow".to_string())
}

impl atomics::Host for KvView<'_> {
    async fn increment(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
        delta: i64,
    ) -> wasmtime::Result<Result<i64, store::Error>> {
        let Bucket { tree, usage, feed } = self.table.get(&bucket)?;
        if let Some(feed) = feed {
            let decide = |current: &[Option<sled::IVec>]| -> Result<Decided<i64>, String> {
                let value = incremented(current[0].as_deref(), delta)?;
                Ok((vec![Some(value.to_string().into_bytes())], value))
            };
            let store = self.ctx.store.clone();
            return Ok(write_replicated(store, feed, &[key.as_bytes()], decide).await);
        }
        let writing = usage.writing();
        let mut outcome = Err(String::new());
        let mut sizes = (None, None);
        // sled may run the closure more than once under contention; the last run wins.
        let updated = tree.update_and_fetch(key.as_bytes(), |current| {
            outcome = incremented(current, delta).and_then(|value| {
                let text = value.to_string();
                usage.admit(key.len(), current.map(<[u8]>::len), text.len())?;
                Ok(value)
            });
            sizes = (current.map(<[u8]>::len), current.map(<[u8]>::len));
            match &outcome {
                Ok(value) => {
                    let text = value.to_string().into_bytes();
                    sizes.1 = Some(text.len());
                    Some(text)
                }
                Err(_) => current.map(<[u8]>::to_vec),
            }
        });
        if let Err(error) = updated {
            return Ok(Err(other(error)));
        }
        usage.record(key.len(), sizes.0, sizes.1);
        drop(writing);
        match outcome {
            Ok(value) => Ok(durable(self.ctx.store.clone()).await.map(|()| value)),
            Err(message) => Ok(Err(store::Error::Other(message))),
        }
    }

    async fn swap(
        &mut self,
        cas: Resource<Cas>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), atomics::CasError>> {
        let Cas {
            tree,
            usage,
            feed,
            key,
            seen,
        } = self.table.delete(cas)?;
        if let Some(replicated) = &feed {
            type Conflict = Option<Option<sled::IVec>>;
            let decide = |current: &[Option<sled::IVec>]| -> Result<Decided<Conflict>, String> {
                Ok(if current[0] == seen {
                    (vec![Some(value.clone())], None)
                } else {
                    (Vec::new(), Some(current[0].clone()))
                })
            };
            let store = self.ctx.store.clone();
            let conflict = write_replicated(store, replicated, &[key.as_bytes()], decide).await;
            return match conflict {
                Ok(None) => Ok(Ok(())),
                Ok(Some(current)) => {
                    let retry = self.table.push(Cas {
                        tree,
                        usage,
                        feed,
                        key,
                        seen: current,
                    })?;
                    Ok(Err(atomics::CasError::CasFailed(retry)))
                }
                Err(error) => Ok(Err(atomics::CasError::StoreError(error))),
            };
        }
        let old = seen.as_ref().map(|v| v.len());
        let swapped = {
            let _writing = usage.writing();
            admit(&usage, &key, old, &value).map(|()| {
                let new = value.len();
                let swapped = tree.compare_and_swap(key.as_bytes(), seen, Some(value));
                if let Ok(Ok(())) = swapped {
                    usage.record(key.len(), old, Some(new));
                }
                swapped
            })
        };
        let swapped = match swapped {
            Ok(swapped) => swapped,
            Err(error) => return Ok(Err(atomics::CasError::StoreError(error))),
        };
        match swapped {
            Err(error) => Ok(Err(atomics::CasError::StoreError(other(error)))),
            Ok(Ok(())) => Ok(durable(self.ctx.store.clone())
                .await
                .map_err(atomics::CasError::StoreError)),
            Ok(Err(conflict)) => {
                let retry = self.table.push(Cas {
                    tree,
                    usage,
                    feed,
                    key,
                    seen: conflict.current,
                })?;
                Ok(Err(atomics::CasError::CasFailed(retry)))
            }
        }
    }
}

impl atomics::HostCas for KvView<'_> {
    fn new(
        &mut self,
        bucket: Resource<Bucket>,
        key: String,
    ) -> wasmtime::Result<Result<Resource<Cas>, store::Error>> {
        let Bucket { tree, usage, feed } = self.table.get(&bucket)?;
        let (tree, usage, feed) = (tree.clone(), usage.clone(), feed.clone());
        match tree.get(key.as_bytes()) {
            Ok(seen) => Ok(Ok(self.table.push(Cas {
                tree,
                usage,
                feed,
                key,
                seen,
            })?)),
            Err(error) => Ok(Err(other(error))),
        }
    }

    fn current(
        &mut self,
        cas: Resource<Cas>,
    ) -> wasmtime::Result<Result<Option<Vec<u8>>, store::Error>> {
        Ok(Ok(self.table.get(&cas)?.seen.as_ref().map(|v| v.to_vec())))
    }

    fn drop(&mut self, cas: Resource<Cas>) -> wasmtime::Result<()> {
        self.table.delete(cas)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempStore;
    use atomics::{Host as _, HostCas as _};
    use batch::Host as _;
    use store::{Host as _, HostBucket as _};

    fn usage(store: &TempStore, max_bytes: u64) -> Arc<KvUsage> {
        let quotas = KvQuotas {
            max_bytes,
            max_keys: 1000,
            max_buckets: 4,
        };
        Arc::new(KvUsage::open(&store.store, quotas).unwrap())
    }

    /// One instance of `app`, which may open `grant`'s buckets: its key-value state and
    /// resource table.
    fn instance_with(
        store: &TempStore,
        usage: &Arc<KvUsage>,
        app: &str,
        grant: KvGrant,
    ) -> (KvCtx, ResourceTable) {
        (
            KvCtx::new(store.store.clone(), app, usage, grant),
            ResourceTable::new(),
        )
    }

    /// One instance of `app`, which may open any of its buckets.
    fn instance(store: &TempStore, usage: &Arc<KvUsage>, app: &str) -> (KvCtx, ResourceTable) {
        instance_with(store, usage, app, KvGrant::default())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_increments_from_many_instances_lose_none() {
        let store = TempStore::default();
        let usage = usage(&store, 1 << 20);
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (mut ctx, mut table) = instance(&store, &usage, "counter");
            tasks.push(tokio::spawn(async move {
                let mut view = KvView {
                    ctx: &mut ctx,
                    table: &mut table,
                };
                let bucket = view.open("hits".into()).unwrap().unwrap();
                let mut seen = Vec::new();
                for _ in 0..50 {
                    let reply = view.increment(Resource::new_borrow(bucket.rep()), "n".into(), 1);
                    seen.push(reply.await.unwrap().unwrap());
                }
                seen
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.unwrap());
        }
        all.sort_unstable();
        assert_eq!(
            all,
            (1..=400).collect::<Vec<i64>>(),
            "every increment saw its own value"
        );
    }

    #[test]
    fn only_the_declared_buckets_open_and_others_are_access_denied() {
        let store = TempStore::default();
        let usage = usage(&store, 1 << 20);
        let grant = KvGrant {
            allowed: Some(vec!["cache".into()]),
            ..KvGrant::default()
        };
        let (mut ctx, mut table) = instance_with(&store, &usage, "listed", grant);
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        assert!(view.open("cache".into()).unwrap().is_ok());
        assert!(matches!(
            view.open("other".into()).unwrap(),
            Err(store::Error::AccessDenied)
        ));
        assert!(!store
            .store
            .tree_names(TREE_PREFIX)
            .contains(&tree_name("listed", "other")));
    }

    #[tokio::test]
    async fn a_write_past_the_quota_fails_clearly_and_changes_nothing() {
        let store = TempStore::default();
        let usage = usage(&store, 100);
        let (mut ctx, mut table) = instance(&store, &usage, "small");
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let bucket = view.open("b".into()).unwrap().unwrap();
        let borrow = || Resource::<Bucket>::new_borrow(bucket.rep());
        view.set(borrow(), "k".into(), vec![1; 60])
            .await
            .unwrap()
            .unwrap();
        let refused = view.set(borrow(), "k2".into(), vec![2; 60]).await.unwrap();
        let Err(store::Error::Other(message)) = refused else {
            panic!("{refused:?}")
        };
        assert!(message.contains("100"), "{message}");
        assert_eq!(view.get(borrow(), "k2".into()).unwrap().unwrap(), None);
        // Through a swap too: the size check is on every write path.
        let cas = view.new(borrow(), "k".into()).unwrap().unwrap();
        let swapped = view.swap(cas, vec![3; 200]).await.unwrap();
        assert!(matches!(swapped, Err(atomics::CasError::StoreError(_))));
        assert_eq!(
            view.get(borrow(), "k".into()).unwrap().unwrap(),
            Some(vec![1; 60])
        );
    }

    #[tokio::test]
    async fn a_swap_after_another_write_fails_with_the_current_value_and_apps_are_apart() {
        let store = TempStore::default();
        let usage = usage(&store, 1 << 20);
        let (mut ctx, mut table) = instance(&store, &usage, "first");
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let bucket = view.open("shared-name".into()).unwrap().unwrap();
        let borrow = || Resource::<Bucket>::new_borrow(bucket.rep());
        let cas = view.new(borrow(), "k".into()).unwrap().unwrap();
        view.set(borrow(), "k".into(), b"written meanwhile".to_vec())
            .await
            .unwrap()
            .unwrap();
        let Err(atomics::CasError::CasFailed(retry)) =
            view.swap(cas, b"mine".to_vec()).await.unwrap()
        else {
            panic!("the swap did not see the other write")
        };
        assert_eq!(
            view.current(Resource::new_borrow(retry.rep()))
                .unwrap()
                .unwrap(),
            Some(b"written meanwhile".to_vec())
        );
        view.swap(retry, b"mine".to_vec()).await.unwrap().unwrap();

        let (mut other_ctx, mut other_table) = instance(&store, &usage, "second");
        let mut other = KvView {
            ctx: &mut other_ctx,
            table: &mut other_table,
        };
        let theirs = other.open("shared-name".into()).unwrap().unwrap();
        assert_eq!(other.get(theirs, "k".into()).unwrap().unwrap(), None);
    }

    #[tokio::test]
    async fn every_write_to_a_replicated_bucket_enters_its_feed_and_other_buckets_keep_none() {
        let store = TempStore::default();
        let usage = usage(&store, 1 << 20);
        let grant = KvGrant {
            allowed: None,
            replicated: vec!["shared".into()],
            node: Arc::from("a"),
        };
        let (mut ctx, mut table) = instance_with(&store, &usage, "app", grant);
        let mut view = KvView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let shared = view.open("shared".into()).unwrap().unwrap();
        let local = view.open("local".into()).unwrap().unwrap();
        let borrow = || Resource::<Bucket>::new_borrow(shared.rep());
        view.set(borrow(), "set".into(), b"1".to_vec())
            .await
            .unwrap()
            .unwrap();
        let counted = view.increment(borrow(), "n".into(), 2).await.unwrap();
        assert_eq!(counted.unwrap(), 2);
        let counted = view.increment(borrow(), "n".into(), 3).await.unwrap();
        assert_eq!(counted.unwrap(), 5);
        let pairs = vec![("m1".into(), b"x".to_vec()), ("m2".into(), b"y".to_vec())];
        view.set_many(borrow(), pairs).await.unwrap().unwrap();
        view.delete_many(borrow(), vec!["m2".into()])
            .await
            .unwrap()
            .unwrap();
        let cas = view.new(borrow(), "set".into()).unwrap().unwrap();
        view.set(borrow(), "set".into(), b"2".to_vec())
            .await
            .unwrap()
            .unwrap();
        let Err(atomics::CasError::CasFailed(retry)) = view.swap(cas, b"3".to_vec()).await.unwrap()
        else {
            panic!("the swap did not see the other write")
        };
        view.swap(retry, b"3".to_vec()).await.unwrap().unwrap();
        let local_bucket = Resource::<Bucket>::new_borrow(local.rep());
        view.set(local_bucket, "k".into(), b"v".to_vec())
            .await
            .unwrap()
            .unwrap();

        let feed = Feed::open(&store.store, &usage, "app", "shared", &Arc::from("a")).unwrap();
        let page = feed.page(0, 100, 1 << 20).unwrap();
        let text = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).unwrap();
        let newest: Vec<(String, Option<String>)> = page
            .changes
            .iter()
            .map(|change| (text(&change.key), change.value.as_deref().map(text)))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        let expected = [
            ("m1", Some("x")),
            ("m2", None),
            ("n", Some("5")),
            ("set", Some("3")),
        ];
        assert_eq!(
            newest,
            expected.map(|(k, v)| (k.to_string(), v.map(str::to_string)))
        );
        assert_eq!(page.changes.len(), 4, "one entry per key");
        assert!(store.store.tree_names("kvfeed/") == vec!["kvfeed/app/shared".to_string()]);
        // Each write was counted once: set, n and m1 in the shared bucket, k in the other.
        assert_eq!(usage.of("app").totals(), (4 + 2 + 3 + 2, 4));
    }

    #[test]
    fn counters_are_decimal_text_and_refuse_other_values() {
        assert_eq!(incremented(None, 5), Ok(5));
        assert_eq!(incremented(Some(b"41"), 1), Ok(42));
        assert_eq!(incremented(Some(b"-3"), -2), Ok(-5));
        assert!(incremented(Some(b"hello"), 1).is_err());
        assert!(incremented(Some(b"9223372036854775807"), 1).is_err());
    }
}

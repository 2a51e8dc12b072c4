//! Key-value quotas per app: bytes (keys and values), keys and buckets. Usage is counted from
//! the database once at start, then kept up to date by every write; a write that would pass a
//! quota is refused with a clear guest error and changes nothing.

use crate::store::Store;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// The `[limits]` quotas every app gets.
#[derive(Debug, Clone, Copy)]
pub struct KvQuotas {
    pub max_bytes: u64,
    pub max_keys: u64,
    pub max_buckets: usize,
}

/// The node's key-value usage, per app.
pub struct KvUsage {
    quotas: KvQuotas,
    apps: Mutex<HashMap<String, Arc<AppUsage>>>,
}

/// What one app's buckets hold.
pub struct AppUsage {
    /// Held by a write from its quota check to its count, so that concurrent writes of one
    /// app cannot all pass the check on the same figures (never held across an await).
    writing: Mutex<()>,
    quotas: KvQuotas,
    bytes: AtomicU64,
    keys: AtomicU64,
    buckets: Mutex<HashSet<String>>,
}

impl KvUsage {
    /// Counts what every app's buckets hold. Blocking (reads all key-value data once): call it
    /// at start-up.
    pub fn open(store: &Store, quotas: KvQuotas) -> Result<Self, String> {
        let usage = Self {
            quotas,
            apps: Mutex::new(HashMap::new()),
        };
        for name in store.tree_names(super::TREE_PREFIX) {
            // Bucket names hold no '/'; what is before the last one is the app's scoped name.
            let Some((app, bucket)) = name[super::TREE_PREFIX.len()..].rsplit_once('/') else {
                continue;
            };
            let tree = store.tree(&name).map_err(|e| e.to_string())?;
            let app = usage.of(app);
            for entry in tree.iter() {
                let (key, value) = entry.map_err(|e| format!("reading {name}: {e}"))?;
                app.record(key.len(), None, Some(value.len()));
            }
            // Buckets already there count, even past a quota lowered since.
            app.buckets
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(bucket.to_string());
        }
        Ok(usage)
    }

    /// `app`'s usage.
    pub fn of(&self, app: &str) -> Arc<AppUsage> {
        let mut apps = self.apps.lock().unwrap_or_else(PoisonError::into_inner);
        apps.entry(app.to_string())
            .or_insert_with(|| {
                Arc::new(AppUsage {
                    writing: Mutex::new(()),
                    quotas: self.quotas,
                    bytes: AtomicU64::new(0),
                    keys: AtomicU64::new(0),
                    buckets: Mutex::new(HashSet::new()),
                })
            })
            .clone()
    }
}

impl AppUsage {
    /// Serialises this app's writes from quota check to count; hold it for no longer.
    pub fn writing(&self) -> std::sync::MutexGuard<'_, ()> {
        self.writing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits opening `bucket`: an existing one always, a new one within the bucket quota.
    pub fn open_bucket(&self, bucket: &str) -> Result<(), String> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.contains(bucket) {
            return Ok(());
        }
        if buckets.len() >= self.quotas.max_buckets {
            return Err(format!(
                "the app has its quota of {} buckets (limits.kv_max_buckets_per_app)",
                self.quotas.max_buckets
            ));
        }
        buckets.insert(bucket.to_string());
        Ok(())
    }

    /// Admits replacing a value of `old` bytes (`None`: a new key) under a `key_len`-byte key
    /// by one of `new` bytes.
    pub fn admit(&self, key_len: usize, old: Option<usize>, new: usize) -> Result<(), String> {
        let grows = (new as u64).saturating_sub(old.unwrap_or(0) as u64)
            + if old.is_none() { key_len as u64 } else { 0 };
        self.admit_change(grows, u64::from(old.is_none()))
    }

    /// Admits a change that adds `grows` bytes (net) and `new_keys` keys.
    pub fn admit_change(&self, grows: u64, new_keys: u64) -> Result<(), String> {
        let bytes = self.bytes.load(Ordering::Relaxed);
        if bytes + grows > self.quotas.max_bytes {
            return Err(format!(
                "the write would take the app's key-value data to {} bytes, past its quota of {} (limits.kv_max_bytes_per_app)",
                bytes + grows,
                self.quotas.max_bytes
            ));
        }
        if new_keys > 0 && self.keys.load(Ordering::Relaxed) + new_keys > self.quotas.max_keys {
            return Err(format!(
                "the app has its quota of {} keys (limits.kv_max_keys_per_app)",
                self.quotas.max_keys
            ));
        }
        Ok(())
    }

    /// Records a write that replaced `old` bytes (`None`: none) by `new` (`None`: deleted)
    /// under a `key_len`-byte key.
    pub fn record(&self, key_len: usize, old: Option<usize>, new: Option<usize>) {
        let size = |value: Option<usize>| value.map_or(0, |v| (v + key_len) as u64);
        let (before, after) = (size(old), size(new));
        if after >= before {
            self.bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            let _ = self
                .bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
                    Some(b.saturating_sub(before - after))
                });
        }
        match (old.is_some(), new.is_some()) {
            (false, true) => {
                self.keys.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                let _ = self
                    .keys
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |k| {
                        Some(k.saturating_sub(1))
                    });
            }
            _ => {}
        }
    }

    /// Bytes and keys held now.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.keys.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(max_bytes: u64, max_keys: u64) -> AppUsage {
        AppUsage {
            writing: Mutex::new(()),
            quotas: KvQuotas {
                max_bytes,
                max_keys,
                max_buckets: 2,
            },
            bytes: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            buckets: Mutex::new(HashSet::new()),
        }
    }

    #[test]
    fn writes_are_admitted_within_the_quotas_and_counted() {
        let app = usage(100, 2);
        app.admit(10, None, 50).unwrap();
        app.record(10, None, Some(50));
        assert_eq!(app.totals(), (60, 1));
        // Growing a value past the byte quota is refused; shrinking it is not.
        assert!(app.admit(10, Some(50), 91).is_err());
        app.admit(10, Some(50), 5).unwrap();
        app.record(10, Some(50), Some(5));
        assert_eq!(app.totals(), (15, 1));
        app.record(3, None, Some(1));
        assert!(app.admit(1, None, 1).unwrap_err().contains("keys"));
        app.record(10, Some(5), None);
        assert_eq!(app.totals(), (4, 1));
    }

    #[test]
    fn new_buckets_are_counted_against_the_quota() {
        let app = usage(100, 100);
        app.open_bucket("a").unwrap();
        app.open_bucket("b").unwrap();
        app.open_bucket("a").unwrap();
        assert!(app.open_bucket("c").unwrap_err().contains("buckets"));
    }
}

//! State through `wasi:keyvalue`: buckets private to the app, kept in the node's database.
//! A write that returns `Ok` is on disk; a batch (`set_many`, `delete_many`) is atomic.

use crate::bindings::wasi::keyvalue::{atomics, batch, store};

/// A key-value failure, as the host described it.
#[derive(Debug, Clone)]
pub struct KvError(pub String);

impl std::fmt::Display for KvError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KvError {}

impl From<store::Error> for KvError {
    fn from(error: store::Error) -> Self {
        Self(match error {
            store::Error::NoSuchStore => "no such bucket".into(),
            store::Error::AccessDenied => "access denied".into(),
            store::Error::Other(message) => message,
        })
    }
}

/// A bucket of this app.
pub struct Bucket(store::Bucket);

impl Bucket {
    /// Opens bucket `name` (created on first use), e.g. `"default"`.
    pub fn open(name: &str) -> Result<Self, KvError> {
        Ok(Self(store::open(name)?))
    }

    pub fn get(&self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        Ok(self.0.get(key)?)
    }

    pub fn set(&self, key: &str, value: &[u8]) -> Result<(), KvError> {
        Ok(self.0.set(key, value)?)
    }

    pub fn delete(&self, key: &str) -> Result<(), KvError> {
        Ok(self.0.delete(key)?)
    }

    pub fn exists(&self, key: &str) -> Result<bool, KvError> {
        Ok(self.0.exists(key)?)
    }

    /// Every key of the bucket, in byte order.
    pub fn keys(&self) -> Result<Vec<String>, KvError> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self.0.list_keys(cursor.as_deref())?;
            keys.extend(page.keys);
            match page.cursor {
                Some(next) => cursor = Some(next),
                None => return Ok(keys),
            }
        }
    }

    /// Atomically adds `delta` to the decimal counter at `key` (absent = 0); returns the new
    /// value.
    pub fn increment(&self, key: &str, delta: i64) -> Result<i64, KvError> {
        Ok(atomics::increment(&self.0, key, delta)?)
    }

    /// Atomically replaces the value at `key` with `update(current)`, retrying while other
    /// writers get in between (compare-and-swap). Returns the value written.
    pub fn update(
        &self,
        key: &str,
        mut update: impl FnMut(Option<&[u8]>) -> Vec<u8>,
    ) -> Result<Vec<u8>, KvError> {
        let mut cas = atomics::Cas::new(&self.0, key)?;
        loop {
            let next = update(cas.current()?.as_deref());
            match atomics::swap(cas, &next) {
                Ok(()) => return Ok(next),
                Err(atomics::CasError::CasFailed(retry)) => cas = retry,
                Err(atomics::CasError::StoreError(error)) => return Err(error.into()),
            }
        }
    }

    /// The values of `keys`, in their order (`None` for a missing key).
    pub fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<Vec<u8>>>, KvError> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        Ok(batch::get_many(&self.0, &keys)?
            .into_iter()
            .map(|pair| pair.map(|(_, value)| value))
            .collect())
    }

    /// Sets every pair at once: on tensorlet all of them are written or none (one
    /// transaction), and they are on disk when this returns `Ok`.
    pub fn set_many(&self, pairs: &[(&str, &[u8])]) -> Result<(), KvError> {
        let pairs: Vec<(String, Vec<u8>)> = pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_vec()))
            .collect();
        Ok(batch::set_many(&self.0, &pairs)?)
    }

    /// Deletes every key at once (missing ones are ignored), all or none.
    pub fn delete_many(&self, keys: &[&str]) -> Result<(), KvError> {
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        Ok(batch::delete_many(&self.0, &keys)?)
    }
}

//! Per-app secrets: values an operator sets for an app (API keys, passwords) that its
//! components read through `wasi:config` and that the API never shows again once set.
//!
//! They live encrypted at rest in the sled tree `secrets`, under the key `<app>/<name>`, as
//! `nonce (24 bytes) || XChaCha20-Poly1305 ciphertext`, with `<app>/<name>` as the associated
//! data so that a ciphertext moved under another key does not decrypt. The 32-byte key is the
//! file `secrets.key` in the data dir (mode 0600), created on first start. A backup of the
//! database is worthless without that file, and that file alone reveals nothing: keep them
//! apart.
//!
//! Everything here is synchronous and short (a sled read or write and the encryption of at
//! most [`MAX_VALUE_BYTES`]), so callers on the async reactor may call it inline; flushing is
//! left to them ([`Store::make_durable`], which runs on the store's flush thread).

use crate::store::files::{check_secret_mode, write_durably};
use crate::store::{Store, StoreError};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use std::path::{Path, PathBuf};

/// File name of the secrets key inside the data dir.
pub const KEY_FILE: &str = "secrets.key";

/// The largest secret value, in bytes (of UTF-8).
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The sled tree holding the encrypted values.
const TREE: &str = "secrets";
const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

/// Errors from the secrets store.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file cannot be read or written, or others may read it.
    #[error("the secrets key {path} cannot be used: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    /// The key file is not 32 bytes.
    #[error("{path} is not a secrets key: it holds {len} bytes, not 32. Restore the original file (secrets set with another key cannot be read), or move it aside to start with a new key and set every secret again")]
    KeyLength { path: String, len: usize },
    /// A secret name that is not a config key.
    #[error("`{0}` is not a valid secret name: use 1-128 ASCII letters, digits, '_', '-' or '.'")]
    InvalidName(String),
    /// An app name that [`super::valid_name`] refuses (the caller checks it first).
    #[error("`{0}` is not a valid app name")]
    InvalidApp(String),
    /// A value over [`MAX_VALUE_BYTES`].
    #[error("the value of secret `{name}` is {len} bytes; the most is 65536")]
    ValueTooLarge { name: String, len: usize },
    /// A value that is not UTF-8.
    #[error("the value of secret `{name}` is not UTF-8 text (wasi:config values are strings)")]
    NotUtf8 { name: String },
    /// A stored value that does not decrypt under this key and its `<app>/<name>`.
    #[error("secret `{name}` of app `{app}` cannot be decrypted with the node's key {key}: it was set with another key or is damaged. Set it again")]
    Undecryptable {
        app: String,
        name: String,
        key: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for SecretsError {
    fn from(error: sled::Error) -> Self {
        Self::Store(error.into())
    }
}

/// The node's secrets: the `secrets` tree and the key that encrypts it. Share it in an `Arc`.
pub struct Secrets {
    tree: sled::Tree,
    cipher: XChaCha20Poly1305,
    key_path: PathBuf,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Secrets")
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Secrets {
    /// Opens the secrets of `store` with the key in `<data_dir>/secrets.key`, creating a random
    /// key (mode 0600, written durably) if there is none. A key file that others may read, or
    /// that is not 32 bytes, is refused. Assumes `data_dir` exists; reads or writes one small
    /// file, so call it at start-up, not on the reactor's hot path.
    pub fn open(store: &Store, data_dir: &Path) -> Result<Self, SecretsError> {
        let tree = store.tree(TREE)?;
        let key_path = data_dir.join(KEY_FILE);
        let file_error = |source| SecretsError::KeyFile {
            path: key_path.display().to_string(),
            source,
        };
        let key = match std::fs::read(&key_path) {
            Ok(key) => {
                check_secret_mode(&key_path).map_err(file_error)?;
                key
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !tree.is_empty() {
                    tracing::warn!(
                        "{} is missing: a new key is made, and the {} secrets stored with the old one cannot be read until they are set again (or the old key file is restored)",
                        key_path.display(),
                        tree.len()
                    );
                }
                let mut key = vec![0u8; KEY_BYTES];
                rand::rngs::OsRng.fill_bytes(&mut key);
                write_durably(&key_path, &key, 0o600).map_err(file_error)?;
                key
            }
            Err(e) => return Err(file_error(e)),
        };
        let cipher =
            XChaCha20Poly1305::new_from_slice(&key).map_err(|_| SecretsError::KeyLength {
                path: key_path.display().to_string(),
                len: key.len(),
            })?;
        Ok(Self {
            tree,
            cipher,
            key_path,
        })
    }

    /// Sets secret `name` of `app` to `value`, replacing any earlier value. The value must be
    /// UTF-8 and at most [`MAX_VALUE_BYTES`]; a refused value changes nothing. Not yet durable:
    /// the caller calls [`Store::make_durable`] before acknowledging.
    pub fn set(&self, app: &str, name: &str, value: &[u8]) -> Result<(), SecretsError> {
        let (key, sealed) = self.seal(app, name, value)?;
        self.tree.insert(key.as_bytes(), sealed)?;
        Ok(())
    }

    /// Makes `app`'s secrets exactly `values` (as a peer has them), in one atomic batch; says
    /// whether they differ from what this node had. Every name and value is checked first: one
    /// that [`Secrets::set`] would refuse refuses all, changing nothing. Not yet durable: the
    /// caller calls [`Store::make_durable`].
    pub fn replace_app(
        &self,
        app: &str,
        values: &[(String, String)],
    ) -> Result<bool, SecretsError> {
        let mut sorted = values.to_vec();
        sorted.sort();
        sorted.dedup_by(|a, b| a.0 == b.0);
        if self.values(app).ok().as_ref() == Some(&sorted) {
            return Ok(false);
        }
        let sealed = sorted
            .iter()
            .map(|(name, value)| self.seal(app, name, value.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut batch = sled::Batch::default();
        for key in self.tree.scan_prefix(app_prefix(app)?.as_bytes()).keys() {
            batch.remove(key?);
        }
        for (key, value) in sealed {
            batch.insert(key.as_bytes(), value);
        }
        self.tree.apply_batch(batch)?;
        Ok(true)
    }

    /// Checks every `(name, value)` of `values` as [`Secrets::set`] would, writing nothing.
    pub fn check_all(&self, app: &str, values: &[(String, String)]) -> Result<(), SecretsError> {
        for (name, value) in values {
            checked_key(app, name, value.as_bytes())?;
        }
        Ok(())
    }

    /// The tree key of secret `name` of `app` and `value` encrypted under it, once both are
    /// checked ([`checked_key`]).
    fn seal(&self, app: &str, name: &str, value: &[u8]) -> Result<(String, Vec<u8>), SecretsError> {
        let key = checked_key(app, name, value)?;
        let mut nonce = [0u8; NONCE_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: key.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any message under 256 GiB");
        let mut sealed = Vec::with_capacity(NONCE_BYTES + ciphertext.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&ciphertext);
        Ok((key, sealed))
    }

    /// Removes secret `name` of `app`; says whether it was there. Not yet durable: the caller
    /// calls [`Store::make_durable`].
    pub fn remove(&self, app: &str, name: &str) -> Result<bool, SecretsError> {
        let key = entry_key(app, name)?;
        Ok(self.tree.remove(key.as_bytes())?.is_some())
    }

    /// The names of `app`'s secrets, sorted; never their values.
    pub fn names(&self, app: &str) -> Result<Vec<String>, SecretsError> {
        let prefix = app_prefix(app)?;
        self.tree
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|key| Ok(name_of(&key?, &prefix)))
            .collect()
    }

    /// `app`'s secrets decrypted, as `(name, value)` sorted by name: the config an instance of
    /// the app gets. A value that does not decrypt is an error naming the secret. Never log
    /// what this returns.
    pub fn values(&self, app: &str) -> Result<Vec<(String, String)>, SecretsError> {
        let prefix = app_prefix(app)?;
        self.tree
            .scan_prefix(prefix.as_bytes())
            .map(|entry| {
                let (key, stored) = entry?;
                let name = name_of(&key, &prefix);
                let value =
                    self.decrypt(&key, &stored)
                        .ok_or_else(|| SecretsError::Undecryptable {
                            app: app.to_string(),
                            name: name.clone(),
                            key: self.key_path.display().to_string(),
                        })?;
                Ok((name, value))
            })
            .collect()
    }

    /// Removes every secret of `app` (when the app is removed), in one atomic batch; says how
    /// many there were. Not yet durable: the caller calls [`Store::make_durable`].
    pub fn remove_app(&self, app: &str) -> Result<usize, SecretsError> {
        let prefix = app_prefix(app)?;
        let mut batch = sled::Batch::default();
        let mut removed = 0;
        for key in self.tree.scan_prefix(prefix.as_bytes()).keys() {
            batch.remove(key?);
            removed += 1;
        }
        self.tree.apply_batch(batch)?;
        Ok(removed)
    }

    /// The plaintext of `stored` (nonce || ciphertext) kept under `key`, if it decrypts to text.
    fn decrypt(&self, key: &[u8], stored: &[u8]) -> Option<String> {
        if stored.len() < NONCE_BYTES {
            return None;
        }
        let (nonce, ciphertext) = stored.split_at(NONCE_BYTES);
        let plaintext = self
            .cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad: key,
                },
            )
            .ok()?;
        String::from_utf8(plaintext).ok()
    }
}

/// `<app>/`, the prefix of every key of `app`'s secrets. App names never hold '/', so the
/// prefix of `a` is not one of `ab`.
fn app_prefix(app: &str) -> Result<String, SecretsError> {
    if !super::valid_name(app) {
        return Err(SecretsError::InvalidApp(app.to_string()));
    }
    Ok(format!("{app}/"))
}

/// `<app>/<name>`, the tree key of a secret and the associated data of its ciphertext. Secret
/// names have the shape of config keys, which never hold '/'.
fn entry_key(app: &str, name: &str) -> Result<String, SecretsError> {
    let prefix = app_prefix(app)?;
    if !super::spec::valid_config_key(name) {
        return Err(SecretsError::InvalidName(name.to_string()));
    }
    Ok(prefix + name)
}

/// The tree key of secret `name` of `app` set to `value`, if all three may be stored: valid
/// names, a UTF-8 value of at most [`MAX_VALUE_BYTES`].
fn checked_key(app: &str, name: &str, value: &[u8]) -> Result<String, SecretsError> {
    let key = entry_key(app, name)?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(SecretsError::ValueTooLarge {
            name: name.to_string(),
            len: value.len(),
        });
    }
    if std::str::from_utf8(value).is_err() {
        return Err(SecretsError::NotUtf8 {
            name: name.to_string(),
        });
    }
    Ok(key)
}

/// The secret name in tree key `key` under `prefix` (keys are written from valid names).
fn name_of(key: &[u8], prefix: &str) -> String {
    String::from_utf8_lossy(&key[prefix.len()..]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TempStore;
    use std::os::unix::fs::PermissionsExt;

    const PLAINTEXT: &str = "sk-live-4f9c2e7a1b3d5e6f-the-plaintext-secret";

    fn open(store: &TempStore) -> Secrets {
        Secrets::open(&store.store, store.dir.path()).unwrap()
    }

    /// Whether any file under `dir` contains `needle`.
    fn any_file_contains(dir: &Path, needle: &[u8]) -> bool {
        std::fs::read_dir(dir).unwrap().any(|entry| {
            let path = entry.unwrap().path();
            if path.is_dir() {
                any_file_contains(&path, needle)
            } else {
                let bytes = std::fs::read(&path).unwrap();
                bytes.windows(needle.len()).any(|w| w == needle)
            }
        })
    }

    #[test]
    fn a_value_round_trips_and_is_encrypted_in_sled_and_on_disk() {
        let store = TempStore::default();
        let secrets = open(&store);
        secrets.set("app", "API_KEY", PLAINTEXT.as_bytes()).unwrap();
        assert_eq!(
            secrets.values("app").unwrap(),
            vec![("API_KEY".to_string(), PLAINTEXT.to_string())]
        );

        let raw = store
            .store
            .tree("secrets")
            .unwrap()
            .get("app/API_KEY")
            .unwrap();
        let raw = raw.expect("stored under <app>/<name>");
        assert_eq!(raw.len(), NONCE_BYTES + PLAINTEXT.len() + 16);
        assert!(!raw
            .windows(PLAINTEXT.len())
            .any(|w| w == PLAINTEXT.as_bytes()));

        store.store.flush_blocking().unwrap();
        let db = store.dir.path().join("db");
        assert!(
            any_file_contains(&db, b"app/API_KEY"),
            "the search finds what is there"
        );
        assert!(!any_file_contains(&db, PLAINTEXT.as_bytes()));

        let key_file = store.dir.path().join(KEY_FILE);
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&key_file).unwrap().len(), KEY_BYTES);
    }

    #[test]
    fn values_survive_a_restart_with_the_same_key_file() {
        let store = TempStore::default();
        let secrets = open(&store);
        secrets.set("app", "b", b"two").unwrap();
        secrets.set("app", "a", b"one").unwrap();
        secrets.set("app", "a", b"uno").unwrap();
        store.store.flush_blocking().unwrap();
        drop(secrets);
        let store = store.reopen();
        let secrets = open(&store);
        assert_eq!(
            secrets.values("app").unwrap(),
            vec![("a".into(), "uno".into()), ("b".into(), "two".into())]
        );
    }

    #[test]
    fn another_key_cannot_decrypt_and_the_error_names_the_secret() {
        let store = TempStore::default();
        open(&store).set("app", "DB_PASSWORD", b"hunter2").unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let other = Secrets::open(&store.store, elsewhere.path()).unwrap();
        let error = other.values("app").unwrap_err();
        assert!(
            matches!(&error, SecretsError::Undecryptable { app, name, .. }
                if app == "app" && name == "DB_PASSWORD"),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains("DB_PASSWORD") && !message.contains("hunter2"),
            "{message}"
        );
        // Names stay readable; the value is still there for the right key.
        assert_eq!(other.names("app").unwrap(), vec!["DB_PASSWORD"]);
        assert_eq!(open(&store).values("app").unwrap()[0].1, "hunter2");
    }

    #[test]
    fn names_lists_names_only_sorted() {
        let store = TempStore::default();
        let secrets = open(&store);
        for (name, value) in [
            ("zeta", "z-value"),
            ("Alpha", "a-value"),
            ("m.id-dle_1", "m"),
        ] {
            secrets.set("app", name, value.as_bytes()).unwrap();
        }
        secrets.set("other", "beta", b"b-value").unwrap();
        assert_eq!(
            secrets.names("app").unwrap(),
            vec!["Alpha", "m.id-dle_1", "zeta"]
        );
        assert!(secrets.names("nobody").unwrap().is_empty());
        assert!(secrets.values("nobody").unwrap().is_empty());
    }

    #[test]
    fn a_ciphertext_moved_under_another_name_or_app_does_not_decrypt() {
        let store = TempStore::default();
        let secrets = open(&store);
        secrets.set("app", "real", b"value").unwrap();
        let tree = store.store.tree("secrets").unwrap();
        let raw = tree.get("app/real").unwrap().unwrap();
        tree.insert("app/copy", raw.clone()).unwrap();
        tree.insert("thief/real", raw).unwrap();
        for (app, name) in [("app", "copy"), ("thief", "real")] {
            let error = secrets.values(app).unwrap_err();
            assert!(
                matches!(&error, SecretsError::Undecryptable { name: n, .. } if n == name),
                "{error:?}"
            );
        }
        tree.insert("app/copy", &b"short"[..]).unwrap();
        assert!(matches!(
            secrets.values("app"),
            Err(SecretsError::Undecryptable { .. })
        ));
    }

    #[test]
    fn invalid_names_and_values_are_refused_and_change_nothing() {
        let store = TempStore::default();
        let secrets = open(&store);
        secrets.set("app", "kept", b"old").unwrap();
        let long = "n".repeat(129);
        for name in ["", "a/b", "spa ce", "é", "kept\n", long.as_str()] {
            assert!(
                matches!(
                    secrets.set("app", name, b"v"),
                    Err(SecretsError::InvalidName(_))
                ),
                "{name:?} was accepted"
            );
        }
        let big = vec![b'x'; MAX_VALUE_BYTES + 1];
        let error = secrets.set("app", "kept", &big).unwrap_err();
        assert!(matches!(error, SecretsError::ValueTooLarge { len, .. } if len == big.len()));
        let error = secrets.set("app", "kept", &[0xff, 0xfe]).unwrap_err();
        assert!(matches!(error, SecretsError::NotUtf8 { .. }), "{error:?}");
        for app in ["", "App", "a/b", "-x"] {
            assert!(matches!(
                secrets.set(app, "n", b"v"),
                Err(SecretsError::InvalidApp(_))
            ));
            assert!(matches!(
                secrets.remove_app(app),
                Err(SecretsError::InvalidApp(_))
            ));
        }
        assert_eq!(store.store.tree("secrets").unwrap().len(), 1);
        assert_eq!(
            secrets.values("app").unwrap(),
            vec![("kept".into(), "old".into())]
        );
        secrets
            .set("app", "kept", &vec![b'x'; MAX_VALUE_BYTES])
            .unwrap();
        secrets.set("app", &"n".repeat(128), b"v").unwrap();
    }

    #[test]
    fn remove_and_remove_app_touch_only_their_own_secrets() {
        let store = TempStore::default();
        let secrets = open(&store);
        for app in ["a", "ab", "a-b", "b"] {
            secrets.set(app, "one", b"1").unwrap();
            secrets.set(app, "two", b"2").unwrap();
        }
        assert!(secrets.remove("b", "one").unwrap());
        assert!(!secrets.remove("b", "one").unwrap());
        assert_eq!(secrets.names("b").unwrap(), vec!["two"]);

        assert_eq!(secrets.remove_app("a").unwrap(), 2);
        assert!(secrets.names("a").unwrap().is_empty());
        for app in ["ab", "a-b"] {
            assert_eq!(secrets.names(app).unwrap(), vec!["one", "two"], "{app}");
        }
        assert_eq!(secrets.remove_app("a").unwrap(), 0);
    }

    #[test]
    fn replace_app_makes_an_apps_secrets_exactly_a_peers_or_changes_nothing() {
        let store = TempStore::default();
        let secrets = open(&store);
        secrets.set("a", "old", b"1").unwrap();
        secrets.set("a", "kept", b"2").unwrap();
        secrets.set("ab", "other", b"3").unwrap();
        let theirs = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect()
        };

        let peer = theirs(&[("new", "4"), ("kept", "2")]);
        assert!(secrets.replace_app("a", &peer).unwrap());
        assert_eq!(
            secrets.values("a").unwrap(),
            theirs(&[("kept", "2"), ("new", "4")])
        );
        assert!(!secrets.replace_app("a", &peer).unwrap(), "nothing changed");
        assert_eq!(secrets.values("ab").unwrap(), theirs(&[("other", "3")]));

        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        for refused in [
            theirs(&[("fine", "v"), ("bad name", "v")]),
            theirs(&[("fine", "v"), ("big", &big)]),
        ] {
            assert!(secrets.replace_app("a", &refused).is_err());
            assert_eq!(
                secrets.values("a").unwrap(),
                theirs(&[("kept", "2"), ("new", "4")])
            );
        }
        assert!(secrets.replace_app("a", &[]).unwrap());
        assert!(secrets.names("a").unwrap().is_empty());
        assert_eq!(store.store.tree("secrets").unwrap().len(), 1);
    }

    #[test]
    fn a_key_file_others_may_read_or_of_the_wrong_length_is_refused() {
        let store = TempStore::default();
        drop(open(&store));
        let key_file = store.dir.path().join(KEY_FILE);
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = Secrets::open(&store.store, store.dir.path()).unwrap_err();
        assert!(
            matches!(error, SecretsError::KeyFile { .. })
                && error.to_string().contains("chmod 600"),
            "{error}"
        );
        write_durably(&key_file, &[7u8; 16], 0o600).unwrap();
        let error = Secrets::open(&store.store, store.dir.path()).unwrap_err();
        assert!(
            matches!(error, SecretsError::KeyLength { len: 16, .. }),
            "{error}"
        );
    }

    #[test]
    fn secrets_can_be_shared_across_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Secrets>();
        let store = TempStore::default();
        let debug = format!("{:?}", open(&store));
        assert!(
            debug.contains(KEY_FILE) && !debug.contains("cipher"),
            "{debug}"
        );
    }
}

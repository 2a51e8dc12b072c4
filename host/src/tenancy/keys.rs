//! Tenants and their API keys in sled. A key is 32 random bytes shown once
//! (`tlk_<64 hex>`); the node keeps only its SHA-256 (tree `api_keys`, by digest), so a copy
//! of the data dir gives no usable key. A key is looked up by the digest of what the caller
//! presents, and refused when unknown, expired or revoked. Revoked keys stay listed (who had
//! access, until when) but never authenticate again.

use super::{Principal, Role, OPERATOR_TENANT};
use crate::store::{self, Store, StoreError};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The id of the key that the admin token is.
pub const ADMIN_TOKEN_KEY_ID: &str = "admin-token";

/// A tenant: a name that owns apps, models and everything below them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TenantRecord {
    pub name: String,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
}

/// What the node keeps of an API key: never the key itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyRecord {
    /// Names the key in listings and revocation (not secret).
    pub id: String,
    pub tenant: String,
    pub role: Role,
    /// What the key is for, as its creator said.
    pub description: Option<String>,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    /// After this (seconds since the Unix epoch) the key no longer authenticates.
    pub expires_at: Option<u64>,
    pub revoked_at: Option<u64>,
}

impl KeyRecord {
    /// Whether the key authenticates at `now`.
    fn valid_at(&self, now: u64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|at| now < at)
    }
}

/// A key just made: the record, and the key itself, which nobody can see again.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewKey {
    #[serde(flatten)]
    pub record: KeyRecord,
    pub key: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("invalid tenant name {0:?}: use 1-63 lower-case letters, digits or '-'")]
    InvalidName(String),
    #[error("tenant {0:?} exists already")]
    TenantExists(String),
    #[error("no tenant named {0:?}")]
    NoSuchTenant(String),
    #[error("no API key with id {0:?}")]
    NoSuchKey(String),
    #[error("the operator's tenant {OPERATOR_TENANT:?} cannot be removed")]
    OperatorTenant,
    #[error("the admin token's key is revoked by replacing the admin-token file and restarting the node")]
    AdminTokenKey,
    #[error("an API key's description is at most 256 characters")]
    DescriptionTooLong,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sled::Error> for TenancyError {
    fn from(error: sled::Error) -> Self {
        Self::Store(error.into())
    }
}

/// The tenants and API keys of a node.
#[derive(Clone)]
pub struct Tenancy {
    tenants: sled::Tree,
    /// Key records by the hex SHA-256 of the key.
    keys: sled::Tree,
    /// Key digests by key id.
    key_ids: sled::Tree,
    /// When each removed tenant was removed (seconds since the Unix epoch), by name.
    removed_tenants: sled::Tree,
}

/// What a node shares of its tenants and keys with its cluster: every tenant but the
/// operator's, the removals of tenants, and every key record (by the SHA-256 of its key) but
/// the admin token's, which is each node's own. Keys are never in it, only their digests.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SharedTenancy {
    pub tenants: Vec<TenantRecord>,
    pub removed_tenants: std::collections::BTreeMap<String, u64>,
    pub keys: Vec<(String, KeyRecord)>,
}

impl SharedTenancy {
    /// A short digest of it: two nodes with the same have nothing to exchange.
    pub fn fingerprint(&self) -> String {
        digest_of(&serde_json::to_string(self).expect("records serialise"))
    }
}

/// The credentials of a `Bearer` authorization (the scheme's case does not matter).
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, credentials) = authorization.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| credentials.trim())
}

/// Whether an `Authorization` value carries what looks like a tensorlet key or admin token:
/// the node takes those out of requests to public apps, so that no app collects them.
pub fn looks_like_key(authorization: &str) -> bool {
    bearer(authorization).is_some_and(|c| c.starts_with("tlk_") || c.starts_with("tlt_"))
}

fn digest_of(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Tenancy {
    /// Opens the tenants and keys, making sure the operator's tenant exists and that the
    /// admin token is its admin key (a replaced token replaces the old one's key). Not yet
    /// durable: the caller makes the store durable.
    pub fn open(store: &Store, admin_token: &str) -> Result<Self, TenancyError> {
        let tenancy = Self {
            tenants: store.tree("tenants")?,
            keys: store.tree("api_keys")?,
            key_ids: store.tree("api_key_ids")?,
            removed_tenants: store.tree("removed_tenants")?,
        };
        let now = store::unix_now();
        if !tenancy.tenants.contains_key(OPERATOR_TENANT)? {
            store::put_json(
                &tenancy.tenants,
                OPERATOR_TENANT,
                &TenantRecord {
                    name: OPERATOR_TENANT.to_string(),
                    created_at: now,
                },
            )?;
        }
        let digest = digest_of(admin_token);
        let previous = tenancy.key_ids.get(ADMIN_TOKEN_KEY_ID)?;
        if previous.as_deref() != Some(digest.as_bytes()) {
            if let Some(previous) = previous {
                tenancy.keys.remove(previous)?;
            }
            let record = KeyRecord {
                id: ADMIN_TOKEN_KEY_ID.to_string(),
                tenant: OPERATOR_TENANT.to_string(),
                role: Role::Admin,
                description: Some("the node's admin token".to_string()),
                created_at: now,
                expires_at: None,
                revoked_at: None,
            };
            store::put_json(&tenancy.keys, &digest, &record)?;
            tenancy
                .key_ids
                .insert(ADMIN_TOKEN_KEY_ID, digest.as_bytes())?;
        }
        Ok(tenancy)
    }

    /// The caller an `Authorization` header value proves, if it carries a valid key.
    pub fn authenticate(&self, authorization: &str) -> Option<Principal> {
        let presented = bearer(authorization)?;
        let record: KeyRecord = store::get_json(&self.keys, &digest_of(presented))
            .ok()
            .flatten()?;
        let valid = record.valid_at(store::unix_now());
        valid.then_some(Principal {
            key_id: record.id,
            tenant: record.tenant,
            role: record.role,
        })
    }

    /// Adds a tenant.
    pub fn add_tenant(&self, name: &str) -> Result<TenantRecord, TenancyError> {
        if !crate::apps::valid_name(name) {
            return Err(TenancyError::InvalidName(name.to_string()));
        }
        let record = TenantRecord {
            name: name.to_string(),
            created_at: store::unix_now(),
        };
        let bytes = serde_json::to_vec(&record).expect("records serialise");
        self.tenants
            .compare_and_swap(name, None::<&[u8]>, Some(bytes))?
            .map_err(|_| TenancyError::TenantExists(name.to_string()))?;
        self.removed_tenants.remove(name)?;
        Ok(record)
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> Result<Vec<TenantRecord>, TenancyError> {
        Ok(store::all_json(&self.tenants)?)
    }

    pub fn tenant_exists(&self, name: &str) -> Result<bool, TenancyError> {
        Ok(self.tenants.contains_key(name)?)
    }

    /// Removes a tenant and revokes its keys (the caller has checked that it owns nothing).
    /// Returns how many keys were revoked.
    pub fn remove_tenant(&self, name: &str) -> Result<usize, TenancyError> {
        if name == OPERATOR_TENANT {
            return Err(TenancyError::OperatorTenant);
        }
        if self.tenants.remove(name)?.is_none() {
            return Err(TenancyError::NoSuchTenant(name.to_string()));
        }
        self.removed_tenants
            .insert(name, &store::unix_now().to_be_bytes())?;
        let mut revoked = 0;
        for record in self.keys(Some(name))? {
            if record.revoked_at.is_none() {
                self.revoke(&record.id)?;
                revoked += 1;
            }
        }
        Ok(revoked)
    }

    /// Makes a key for `tenant` with `role`, valid until `expires_at` (seconds since the
    /// Unix epoch) when given.
    pub fn create_key(
        &self,
        tenant: &str,
        role: Role,
        description: Option<String>,
        expires_at: Option<u64>,
    ) -> Result<NewKey, TenancyError> {
        if !self.tenant_exists(tenant)? {
            return Err(TenancyError::NoSuchTenant(tenant.to_string()));
        }
        if description
            .as_ref()
            .is_some_and(|d| d.chars().count() > 256)
        {
            return Err(TenancyError::DescriptionTooLong);
        }
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let key = format!("tlk_{}", hex::encode(secret));
        let mut id = [0u8; 8];
        rand::thread_rng().fill_bytes(&mut id);
        let record = KeyRecord {
            id: hex::encode(id),
            tenant: tenant.to_string(),
            role,
            description,
            created_at: store::unix_now(),
            expires_at,
            revoked_at: None,
        };
        let digest = digest_of(&key);
        store::put_json(&self.keys, &digest, &record)?;
        self.key_ids
            .insert(record.id.as_bytes(), digest.as_bytes())?;
        Ok(NewKey { record, key })
    }

    /// The keys of `tenant` (of every tenant with `None`), revoked ones included.
    pub fn keys(&self, tenant: Option<&str>) -> Result<Vec<KeyRecord>, TenancyError> {
        let mut keys: Vec<KeyRecord> = store::all_json::<KeyRecord>(&self.keys)?
            .into_iter()
            .filter(|record| tenant.is_none_or(|tenant| record.tenant == tenant))
            .collect();
        keys.sort_by(|a, b| (&a.tenant, a.created_at).cmp(&(&b.tenant, b.created_at)));
        Ok(keys)
    }

    /// The key with id `id`.
    pub fn key(&self, id: &str) -> Result<Option<KeyRecord>, TenancyError> {
        let Some(digest) = self.key_ids.get(id)? else {
            return Ok(None);
        };
        Ok(store::get_json(
            &self.keys,
            std::str::from_utf8(&digest).unwrap_or_default(),
        )?)
    }

    /// Revokes the key with id `id`: it never authenticates again.
    pub fn revoke(&self, id: &str) -> Result<KeyRecord, TenancyError> {
        if id == ADMIN_TOKEN_KEY_ID {
            return Err(TenancyError::AdminTokenKey);
        }
        let digest = self
            .key_ids
            .get(id)?
            .ok_or_else(|| TenancyError::NoSuchKey(id.to_string()))?;
        let digest = String::from_utf8_lossy(&digest).into_owned();
        let mut record: KeyRecord = store::get_json(&self.keys, &digest)?
            .ok_or_else(|| TenancyError::NoSuchKey(id.to_string()))?;
        record.revoked_at.get_or_insert_with(store::unix_now);
        store::put_json(&self.keys, &digest, &record)?;
        Ok(record)
    }
}

impl Tenancy {
    /// What this node shares with its cluster.
    pub fn shared(&self) -> Result<SharedTenancy, TenancyError> {
        let tenants = store::all_json::<TenantRecord>(&self.tenants)?
            .into_iter()
            .filter(|tenant| tenant.name != OPERATOR_TENANT)
            .collect();
        let mut removed_tenants = std::collections::BTreeMap::new();
        for entry in self.removed_tenants.iter() {
            let (name, at) = entry?;
            let at = <[u8; 8]>::try_from(&at[..]).map_or(0, u64::from_be_bytes);
            removed_tenants.insert(String::from_utf8_lossy(&name).into_owned(), at);
        }
        let mut keys = Vec::new();
        for entry in self.keys.iter() {
            let (digest, bytes) = entry?;
            let digest = String::from_utf8_lossy(&digest).into_owned();
            let record: KeyRecord =
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    key: digest.clone(),
                    source,
                })?;
            if record.id != ADMIN_TOKEN_KEY_ID {
                keys.push((digest, record));
            }
        }
        Ok(SharedTenancy {
            tenants,
            removed_tenants,
            keys,
        })
    }

    /// Takes what a peer shares: tenants it added (unless removed here later), removals of
    /// tenants (unless added here later), keys it made, and revocations (a revoked key stays
    /// revoked). Every node ends with the same tenants and keys whatever the order. Whether
    /// anything changed (not yet durable: the caller makes the store durable).
    pub fn merge(&self, peer: &SharedTenancy) -> Result<bool, TenancyError> {
        let mut changed = false;
        for (name, removed_at) in &peer.removed_tenants {
            if name == OPERATOR_TENANT || !crate::apps::valid_name(name) {
                continue;
            }
            let known = self
                .removed_tenants
                .get(name)?
                .and_then(|at| <[u8; 8]>::try_from(&at[..]).ok())
                .map(u64::from_be_bytes);
            if known.is_some_and(|known| known >= *removed_at) {
                continue;
            }
            let tenant: Option<TenantRecord> = store::get_json(&self.tenants, name)?;
            if tenant.as_ref().is_some_and(|t| t.created_at > *removed_at) {
                continue;
            }
            self.tenants.remove(name.as_bytes())?;
            self.removed_tenants
                .insert(name.as_bytes(), &removed_at.to_be_bytes())?;
            changed = true;
        }
        for tenant in &peer.tenants {
            if tenant.name == OPERATOR_TENANT || !crate::apps::valid_name(&tenant.name) {
                continue;
            }
            let removed = self
                .removed_tenants
                .get(&tenant.name)?
                .and_then(|at| <[u8; 8]>::try_from(&at[..]).ok())
                .map(u64::from_be_bytes);
            if removed.is_some_and(|at| at >= tenant.created_at)
                || self.tenants.contains_key(&tenant.name)?
            {
                continue;
            }
            store::put_json(&self.tenants, &tenant.name, tenant)?;
            self.removed_tenants.remove(tenant.name.as_bytes())?;
            changed = true;
        }
        for (digest, record) in &peer.keys {
            let is_digest = digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit());
            if record.id == ADMIN_TOKEN_KEY_ID || !is_digest {
                continue;
            }
            match store::get_json::<KeyRecord>(&self.keys, digest)? {
                None => {
                    store::put_json(&self.keys, digest, record)?;
                    self.key_ids
                        .insert(record.id.as_bytes(), digest.as_bytes())?;
                    changed = true;
                }
                Some(mut local) if local.revoked_at.is_none() && record.revoked_at.is_some() => {
                    local.revoked_at = record.revoked_at;
                    store::put_json(&self.keys, digest, &local)?;
                    changed = true;
                }
                Some(_) => {}
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_that_merge_each_other_end_with_the_same_tenants_and_keys() {
        let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (a, b) = (open(dir_a.path(), "tlt_a"), open(dir_b.path(), "tlt_b"));
        a.add_tenant("team").unwrap();
        let key = a.create_key("team", Role::Invoker, None, None).unwrap();
        b.add_tenant("gone").unwrap();
        assert!(b.merge(&a.shared().unwrap()).unwrap());
        let bearer = format!("Bearer {}", key.key);
        assert_eq!(b.authenticate(&bearer).unwrap().tenant, "team");
        // The admin tokens stay each node's own.
        assert!(b.authenticate("Bearer tlt_a").is_none());
        // A revocation and a tenant's removal travel; nothing comes back from an older copy.
        let older = b.shared().unwrap();
        b.revoke(&key.record.id).unwrap();
        b.remove_tenant("gone").unwrap();
        a.merge(&older).unwrap();
        assert!(a.merge(&b.shared().unwrap()).unwrap());
        assert!(a.authenticate(&bearer).is_none());
        assert!(!a.tenant_exists("gone").unwrap());
        assert!(!a.merge(&older).unwrap());
        assert!(a.authenticate(&bearer).is_none());
        assert!(b.merge(&a.shared().unwrap()).is_ok());
        assert_eq!(
            a.shared().unwrap().fingerprint(),
            b.shared().unwrap().fingerprint()
        );
    }

    fn open(dir: &std::path::Path, token: &str) -> Tenancy {
        Tenancy::open(&crate::testing::open_store(dir), token).unwrap()
    }

    #[test]
    fn the_admin_token_is_the_operators_admin_key_and_a_new_token_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let tenancy = open(dir.path(), "tlt_first");
            let principal = tenancy.authenticate("Bearer tlt_first").unwrap();
            assert!(principal.is_operator());
            assert_eq!(principal.key_id, ADMIN_TOKEN_KEY_ID);
            assert!(tenancy.authenticate("tlt_first").is_none());
            assert!(tenancy.authenticate("bearer tlt_first").is_some());
            assert!(looks_like_key("Bearer tlt_first") && !looks_like_key("Bearer sk-1"));
            assert!(tenancy.authenticate("Bearer tlt_firsT").is_none());
            assert!(matches!(
                tenancy.revoke(ADMIN_TOKEN_KEY_ID),
                Err(TenancyError::AdminTokenKey)
            ));
        }
        let tenancy = open(dir.path(), "tlt_second");
        assert!(tenancy.authenticate("Bearer tlt_first").is_none());
        assert!(tenancy.authenticate("Bearer tlt_second").is_some());
        assert_eq!(tenancy.keys(None).unwrap().len(), 1);
    }

    #[test]
    fn keys_are_stored_hashed_and_stop_working_when_revoked_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let tenancy = open(dir.path(), "tlt_admin");
        tenancy.add_tenant("acme").unwrap();
        assert!(matches!(
            tenancy.add_tenant("acme"),
            Err(TenancyError::TenantExists(_))
        ));
        assert!(matches!(
            tenancy.add_tenant("Acme!"),
            Err(TenancyError::InvalidName(_))
        ));
        let made = tenancy
            .create_key("acme", Role::Invoker, Some("ci".into()), None)
            .unwrap();
        assert!(made.key.starts_with("tlk_") && made.key.len() == 68);
        let stored: Vec<u8> = tenancy
            .keys
            .iter()
            .flat_map(|entry| {
                let (k, v) = entry.unwrap();
                [k.to_vec(), v.to_vec()].concat()
            })
            .collect();
        let secret = made.key.trim_start_matches("tlk_");
        assert!(!String::from_utf8_lossy(&stored).contains(secret));
        let bearer = format!("Bearer {}", made.key);
        let principal = tenancy.authenticate(&bearer).unwrap();
        assert_eq!(
            (principal.tenant.as_str(), principal.role),
            ("acme", Role::Invoker)
        );
        tenancy.revoke(&made.record.id).unwrap();
        assert!(tenancy.authenticate(&bearer).is_none());
        assert!(tenancy
            .key(&made.record.id)
            .unwrap()
            .unwrap()
            .revoked_at
            .is_some());

        let expired = tenancy
            .create_key("acme", Role::Reader, None, Some(store::unix_now() - 1))
            .unwrap();
        assert!(tenancy
            .authenticate(&format!("Bearer {}", expired.key))
            .is_none());
        assert!(matches!(
            tenancy.create_key("nobody", Role::Reader, None, None),
            Err(TenancyError::NoSuchTenant(_))
        ));
    }

    #[test]
    fn removing_a_tenant_revokes_its_keys_and_the_operators_tenant_stays() {
        let dir = tempfile::tempdir().unwrap();
        let tenancy = open(dir.path(), "tlt_admin");
        tenancy.add_tenant("acme").unwrap();
        let key = tenancy.create_key("acme", Role::Admin, None, None).unwrap();
        assert_eq!(tenancy.remove_tenant("acme").unwrap(), 1);
        assert!(tenancy
            .authenticate(&format!("Bearer {}", key.key))
            .is_none());
        assert!(matches!(
            tenancy.remove_tenant(OPERATOR_TENANT),
            Err(TenancyError::OperatorTenant)
        ));
        assert!(matches!(
            tenancy.remove_tenant("acme"),
            Err(TenancyError::NoSuchTenant(_))
        ));
    }
}

//! Who may do what. Every app, model, bucket, job, log and usage record belongs to a tenant;
//! callers prove who they are with an API key (`Authorization: Bearer tlk_…`), and the key's
//! role says what they may do within its tenant. The node's operator is the admin of the
//! `default` tenant: the admin token in the data dir is that tenant's first admin key.

pub mod keys;
pub mod token;

pub use keys::{KeyRecord, NewKey, SharedTenancy, Tenancy, TenancyError, TenantRecord};

use serde::{Deserialize, Serialize};

/// The operator's tenant: its admins run the node (tenants, node-wide models, status,
/// metrics), and apps deployed before tenants existed belong to it.
pub const OPERATOR_TENANT: &str = "default";

/// A tenant's name for something named by its app: the app's name for the operator's tenant
/// (as before tenants existed), `<tenant>/<app>` for others. Key-value trees and usage are
/// filed under it, so that an app name another tenant used before never reaches its data.
pub fn scoped_name(tenant: &str, app: &str) -> String {
    if tenant == OPERATOR_TENANT {
        app.to_string()
    } else {
        format!("{tenant}/{app}")
    }
}

/// The tenant and app a [`scoped_name`] names.
pub fn split_scoped_name(scoped: &str) -> (&str, &str) {
    scoped.split_once('/').unwrap_or((OPERATOR_TENANT, scoped))
}

/// What a key may do within its tenant. Each role includes the ones below it in this list,
/// except that an invoker cannot read and a reader cannot invoke.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything a deployer may, and the tenant's keys.
    Admin,
    /// Deploy, change and remove apps, their secrets and the tenant's models; read; invoke.
    Deployer,
    /// Invoke the tenant's apps (synchronously or as async jobs).
    Invoker,
    /// Read the tenant's apps, models, logs, usage, jobs and dead letters.
    Reader,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "admin" => Ok(Role::Admin),
            "deployer" => Ok(Role::Deployer),
            "invoker" => Ok(Role::Invoker),
            "reader" => Ok(Role::Reader),
            other => Err(format!(
                "unknown role {other:?}: use admin, deployer, invoker or reader"
            )),
        }
    }
}

/// Something a request asks to do to a tenant's things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Invoke,
    Read,
    Deploy,
    ManageKeys,
}

impl Role {
    /// Whether a key with this role may do `action` within its tenant.
    pub fn allows(self, action: Action) -> bool {
        match self {
            Role::Admin => true,
            Role::Deployer => action != Action::ManageKeys,
            Role::Invoker => action == Action::Invoke,
            Role::Reader => action == Action::Read,
        }
    }
}

/// The caller behind a request, as its API key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key's id (never its secret): for logs, rate limits and usage.
    pub key_id: String,
    pub tenant: String,
    pub role: Role,
}

impl Principal {
    /// An admin of the operator's tenant: sees every tenant's things and runs the node.
    pub fn is_operator(&self) -> bool {
        self.tenant == OPERATOR_TENANT && self.role == Role::Admin
    }

    /// Whether things owned by `tenant` are visible to this caller at all (else they are
    /// answered as absent).
    pub fn sees(&self, tenant: &str) -> bool {
        self.is_operator() || self.tenant == tenant
    }

    /// Whether this caller may do `action` to things owned by `tenant`.
    pub fn may(&self, action: Action, tenant: &str) -> bool {
        self.sees(tenant) && self.role.allows(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_the_readme_says() {
        use Action::*;
        let table = [
            (Role::Admin, [true, true, true, true]),
            (Role::Deployer, [true, true, true, false]),
            (Role::Invoker, [true, false, false, false]),
            (Role::Reader, [false, true, false, false]),
        ];
        for (role, allowed) in table {
            for (action, expected) in [Invoke, Read, Deploy, ManageKeys].into_iter().zip(allowed) {
                assert_eq!(role.allows(action), expected, "{role:?} {action:?}");
            }
        }
    }

    #[test]
    fn only_the_operator_sees_other_tenants() {
        let principal = |tenant: &str, role| Principal {
            key_id: "k".into(),
            tenant: tenant.into(),
            role,
        };
        let operator = principal(OPERATOR_TENANT, Role::Admin);
        assert!(operator.sees("acme") && operator.may(Action::Deploy, "acme"));
        let acme_admin = principal("acme", Role::Admin);
        assert!(acme_admin.sees("acme") && !acme_admin.sees("globex"));
        assert!(!acme_admin.is_operator());
        let default_reader = principal(OPERATOR_TENANT, Role::Reader);
        assert!(!default_reader.is_operator() && !default_reader.sees("acme"));
        assert!(!principal("acme", Role::Invoker).may(Action::Read, "acme"));
    }
}

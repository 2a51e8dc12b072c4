//! Tenants and API keys under `/v1/admin`: the operator adds and removes tenants; a tenant's
//! admins make, list and revoke its keys (the operator those of every tenant). A new key is
//! shown once, in the answer that makes it.

use super::auth;
use super::ApiError;
use crate::node::Node;
use crate::runtime::dispatch::ErrorBody;
use crate::tenancy::{Action, Principal, Role};
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// Longest a key may be made valid for: ten years.
const MAX_KEY_LIFETIME_SECS: u64 = 10 * 365 * 86_400;

#[utoipa::path(get, path = "/whoami", tag = "tenants", responses((status = 200, description = "The caller's key id, tenant and role", body = serde_json::Value), (status = 401, description = "No or an invalid key", body = ErrorBody)))]
pub async fn whoami(Extension(principal): Extension<Principal>) -> Json<Value> {
    Json(json!({
        "key_id": principal.key_id,
        "tenant": principal.tenant,
        "role": principal.role,
        "operator": principal.is_operator(),
    }))
}

#[utoipa::path(get, path = "/tenants", tag = "tenants", responses((status = 200, description = "Every tenant (the operator), or the caller's own", body = serde_json::Value), (status = 401, description = "No or an invalid key", body = ErrorBody)))]
pub async fn list_tenants(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    let tenants: Vec<_> = node
        .tenancy
        .tenants()?
        .into_iter()
        .filter(|tenant| principal.sees(&tenant.name))
        .collect();
    Ok(Json(json!({ "tenants": tenants })))
}

#[utoipa::path(put, path = "/tenants/{name}", tag = "tenants", params(("name" = String, Path, description = "The tenant's name")), responses((status = 201, description = "Added", body = serde_json::Value), (status = 400, description = "An invalid name", body = ErrorBody), (status = 401, description = "No or an invalid key", body = ErrorBody), (status = 403, description = "Not the operator", body = ErrorBody), (status = 409, description = "It exists", body = ErrorBody)))]
pub async fn add_tenant(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    auth::operator(&principal)?;
    let tenant = node.tenancy.add_tenant(&name)?;
    node.store.make_durable().await?;
    tracing::info!(tenant = %name, "tenant added");
    Ok((StatusCode::CREATED, Json(json!({ "tenant": tenant }))).into_response())
}

#[utoipa::path(delete, path = "/tenants/{name}", tag = "tenants", params(("name" = String, Path, description = "The tenant's name")), responses((status = 200, description = "Removed, its keys revoked", body = serde_json::Value), (status = 401, description = "No or an invalid key", body = ErrorBody), (status = 403, description = "Not the operator", body = ErrorBody), (status = 404, description = "No such tenant", body = ErrorBody), (status = 409, description = "It still owns apps or models, or it is the operator's", body = ErrorBody)))]
pub async fn remove_tenant(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth::operator(&principal)?;
    let apps = node
        .runtime
        .apps()
        .iter()
        .filter(|app| app.record.tenant == name)
        .count();
    let models = node
        .models
        .list()
        .iter()
        .filter(|model| model.record.tenant.as_deref() == Some(name.as_str()))
        .count();
    if apps + models > 0 {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "tenant_not_empty",
            format!(
                "tenant {name:?} still owns {apps} apps and {models} models: remove them first"
            ),
        ));
    }
    let revoked = node.tenancy.remove_tenant(&name)?;
    node.store.make_durable().await?;
    tracing::info!(tenant = %name, revoked, "tenant removed");
    Ok(Json(json!({ "removed": name, "keys_revoked": revoked })))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KeysQuery {
    /// Only this tenant's keys (the operator sees every tenant's without it).
    tenant: Option<String>,
}

#[utoipa::path(get, path = "/keys", tag = "tenants", params(KeysQuery), responses((status = 200, description = "The keys (never their secrets), revoked ones included", body = serde_json::Value), (status = 401, description = "No or an invalid key", body = ErrorBody), (status = 403, description = "Not an admin", body = ErrorBody)))]
pub async fn list_keys(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<KeysQuery>,
) -> Result<Json<Value>, ApiError> {
    auth::allow(&principal, Action::ManageKeys)?;
    let tenant = match query.tenant {
        Some(tenant) => Some(tenant),
        None if principal.is_operator() => None,
        None => Some(principal.tenant.clone()),
    };
    if tenant
        .as_ref()
        .is_some_and(|tenant| !principal.sees(tenant))
    {
        return Ok(Json(json!({ "keys": [] })));
    }
    Ok(Json(
        json!({ "keys": node.tenancy.keys(tenant.as_deref())? }),
    ))
}

/// A key to make.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    /// The tenant (the caller's own when left out).
    tenant: Option<String>,
    role: Role,
    description: Option<String>,
    /// Seconds until it stops working; never, when left out.
    expires_in_secs: Option<u64>,
}

#[utoipa::path(post, path = "/keys", tag = "tenants", request_body = KeyRequest, responses((status = 201, description = "The key, shown this once, and its record", body = serde_json::Value), (status = 400, description = "An invalid request", body = ErrorBody), (status = 401, description = "No or an invalid key", body = ErrorBody), (status = 403, description = "Not an admin of the tenant", body = ErrorBody), (status = 404, description = "No such tenant", body = ErrorBody)))]
pub async fn create_key(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    auth::allow(&principal, Action::ManageKeys)?;
    let request: KeyRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_key",
            format!("invalid key request: {e}"),
        )
    })?;
    let tenant = request.tenant.unwrap_or_else(|| principal.tenant.clone());
    if !principal.sees(&tenant) {
        return Err(crate::tenancy::TenancyError::NoSuchTenant(tenant).into());
    }
    let expires_at = match request.expires_in_secs {
        None => None,
        Some(secs @ 1..=MAX_KEY_LIFETIME_SECS) => Some(crate::store::unix_now() + secs),
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_key",
                format!("expires_in_secs must be 1 to {MAX_KEY_LIFETIME_SECS}, not {other}"),
            ))
        }
    };
    let made = node
        .tenancy
        .create_key(&tenant, request.role, request.description, expires_at)?;
    node.store.make_durable().await?;
    tracing::info!(key = %made.record.id, tenant = %tenant, role = ?made.record.role, by = %principal.key_id, "API key made");
    Ok((StatusCode::CREATED, Json(json!({ "key": made }))).into_response())
}

#[utoipa::path(delete, path = "/keys/{id}", tag = "tenants", params(("id" = String, Path, description = "The key's id")), responses((status = 200, description = "Revoked: it never works again", body = serde_json::Value), (status = 401, description = "No or an invalid key", body = ErrorBody), (status = 403, description = "Not an admin of its tenant", body = ErrorBody), (status = 404, description = "No such key", body = ErrorBody), (status = 409, description = "The admin token's key (replace the file instead)", body = ErrorBody)))]
pub async fn revoke_key(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth::allow(&principal, Action::ManageKeys)?;
    let visible = node
        .tenancy
        .key(&id)?
        .filter(|record| principal.sees(&record.tenant));
    if visible.is_none() {
        return Err(crate::tenancy::TenancyError::NoSuchKey(id).into());
    }
    let record = node.tenancy.revoke(&id)?;
    node.store.make_durable().await?;
    tracing::info!(key = %id, by = %principal.key_id, "API key revoked");
    Ok(Json(json!({ "revoked": record })))
}

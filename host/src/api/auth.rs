//! Authentication and authorisation at the edge. The admin API and `/metrics` need a valid API
//! key (`Authorization: Bearer …`); each handler then asks for what it does with the helpers
//! here. Something of a tenant the caller cannot see is answered exactly as if it did not
//! exist (404), so that a key learns nothing about other tenants; a role that may see but not
//! act gets 403.

use super::ApiError;
use crate::node::Node;
use crate::runtime::App;
use crate::tenancy::{Action, Principal};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use std::sync::Arc;

/// Most bytes of an unauthenticated upload read (and dropped) before answering 401.
const MAX_DRAINED_BYTES: usize = 256 << 20;

/// The caller a request's `Authorization` header proves, if any.
pub fn principal(node: &Node, headers: &HeaderMap) -> Option<Principal> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| node.tenancy.authenticate(v))
}

/// The 401 of a missing, unknown, expired or revoked key: one answer for all four, so that a
/// caller learns nothing about which keys exist.
pub fn unauthorized() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "this needs `Authorization: Bearer <API key>` with a valid key (the node's admin token is in its data dir, admin-token)",
    )
}

/// Lets a request through only with a valid API key, handing its [`Principal`] to the handler.
pub(super) async fn require_key(
    State(node): State<Arc<Node>>,
    mut request: Request,
    next: Next,
) -> Response {
    if let Some(principal) = principal(&node, request.headers()) {
        request.extensions_mut().insert(principal);
        return next.run(request).await;
    }
    // Read (and drop) what the client is uploading before answering: an HTTP/1.1 client
    // still writing its body would otherwise see the connection close instead of the 401.
    // Each chunk is dropped as it comes: nothing is buffered for an unauthenticated client.
    let mut body = request.into_body();
    let drain = async {
        let mut drained = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            drained += frame.data_ref().map_or(0, |data| data.len());
            if drained > MAX_DRAINED_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
    unauthorized().into_response()
}

/// The 403 of a key whose role does not allow `action`.
pub fn forbidden(principal: &Principal, action: Action) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!(
            "a {:?} key of tenant {:?} may not {}",
            principal.role,
            principal.tenant,
            match action {
                Action::Invoke => "invoke apps",
                Action::Read => "read this",
                Action::Deploy => "change apps or models",
                Action::ManageKeys => "manage keys",
            }
        )
        .to_lowercase(),
    )
}

/// Refuses with 403 unless the caller's role allows `action`.
pub fn allow(principal: &Principal, action: Action) -> Result<(), ApiError> {
    if principal.role.allows(action) {
        Ok(())
    } else {
        Err(forbidden(principal, action))
    }
}

/// Refuses with 403 unless the caller runs the node (an admin of the operator's tenant).
pub fn operator(principal: &Principal) -> Result<(), ApiError> {
    if principal.is_operator() {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the node's operator (an admin key of tenant \"default\") may do this",
        ))
    }
}

/// The app `name` if the caller may see it (404 as for an absent app otherwise), once its role
/// allows `action` on it (403).
pub fn visible_app(
    node: &Node,
    principal: &Principal,
    name: &str,
    action: Action,
) -> Result<Arc<App>, ApiError> {
    let app = node
        .runtime
        .app(name)
        .filter(|app| principal.sees(&app.record.tenant))
        .ok_or_else(|| super::admin::app_not_found(name))?;
    allow(principal, action)?;
    Ok(app)
}

/// The 404 of an app a caller may not invoke: the same whether the app is absent, another
/// tenant's, or private and the caller gave no key.
pub fn not_invocable(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "app_not_found",
        format!("no app named {name:?} is deployed on this node, or it is not public and needs an invoker key of its tenant (`Authorization: Bearer <key>`)"),
    )
}

/// Whether the caller behind `headers` may invoke app `name`. A public app lets everyone in
/// and its `Authorization` header through to the app (`None`). Any other needs a key of the
/// app's tenant whose role may invoke: the key is then the node's, and is taken out of the
/// headers before the app sees them. A present but invalid key is 401; no key, an absent app
/// and another tenant's app are one 404 (the same work is done for each).
pub fn invoker(
    node: &Node,
    name: &str,
    headers: &mut HeaderMap,
) -> Result<Option<Principal>, ApiError> {
    let app = node.runtime.app(name);
    if app.as_ref().is_some_and(|app| app.record.public) {
        // The app's own credentials pass; a tensorlet key never reaches an app.
        let ours = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(crate::tenancy::keys::looks_like_key);
        if ours {
            headers.remove(header::AUTHORIZATION);
        }
        return Ok(None);
    }
    let principal = match headers.contains_key(header::AUTHORIZATION) {
        false => None,
        true => Some(principal(node, headers).ok_or_else(unauthorized)?),
    };
    headers.remove(header::AUTHORIZATION);
    match (app, principal) {
        (Some(app), Some(principal)) if principal.sees(&app.record.tenant) => {
            allow(&principal, Action::Invoke)?;
            Ok(Some(principal))
        }
        _ => Err(not_invocable(name)),
    }
}

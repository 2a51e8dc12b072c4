//! The admin API under `/v1/admin`, for holders of API keys: deploy apps (a manifest and a
//! component), split their traffic, roll back, set their secrets, remove them; add and remove
//! models; tenants and keys; node status. Each key sees its tenant's things (the operator
//! sees all) and may do what its role allows. The CLI is its client.

use super::auth;
use super::ApiError;
use crate::apps::spec::DeploySpec;
use crate::nn::backend::batching::{BatchPolicy, DEFAULT_QUEUE_DELAY_US};
use crate::nn::ModelRecord;
use crate::nn::{Encoding, Upload};
use crate::node::Node;
use crate::runtime::dispatch::ErrorBody;
use crate::runtime::{App, DeployOptions};
use crate::store::blobs::{self, StageError};
use crate::tenancy::{Action, Principal};
use axum::body::{Body, Bytes};
use axum::extract::{
    DefaultBodyLimit, Extension, FromRequest, Multipart, Path, Query, Request, State,
};
use axum::http::{header, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Largest deployment manifest (as JSON) the admin API accepts.
const MAX_MANIFEST_BYTES: usize = 32 << 20;

/// The admin routes, all behind the admin-token check, with their OpenAPI description.
pub fn router(node: Arc<Node>) -> OpenApiRouter<Arc<Node>> {
    let deploys = OpenApiRouter::new()
        .routes(routes!(get_app, deploy, remove_app))
        .layer(DefaultBodyLimit::max(
            crate::runtime::MAX_COMPONENT_BYTES as usize + MAX_MANIFEST_BYTES,
        ));
    let secrets = OpenApiRouter::new()
        .routes(routes!(set_secret, remove_secret))
        .layer(DefaultBodyLimit::max(
            crate::apps::secrets::MAX_VALUE_BYTES + 1,
        ));
    let models = OpenApiRouter::new()
        .routes(routes!(get_model, add_model, remove_model))
        .layer(DefaultBodyLimit::disable());
    OpenApiRouter::new()
        .routes(routes!(status))
        .routes(routes!(backends))
        .routes(routes!(list_apps))
        .merge(deploys)
        .routes(routes!(set_traffic))
        .routes(routes!(rollback))
        .routes(routes!(list_secrets))
        .merge(secrets)
        .routes(routes!(super::telemetry::logs))
        .routes(routes!(super::telemetry::usage))
        .routes(routes!(super::jobs::stats))
        .routes(routes!(super::jobs::dead_letters, super::jobs::purge_dead))
        .routes(routes!(super::jobs::retry_dead))
        .routes(routes!(list_models))
        .merge(models)
        .routes(routes!(super::tenants::whoami))
        .routes(routes!(super::tenants::list_tenants))
        .routes(routes!(
            super::tenants::add_tenant,
            super::tenants::remove_tenant
        ))
        .routes(routes!(
            super::tenants::list_keys,
            super::tenants::create_key
        ))
        .routes(routes!(super::tenants::revoke_key))
        .routes(routes!(cluster))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            node,
            super::auth::require_key,
        ))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such admin route")
}

/// What each backend is. Blocking the first time a runtime-linked backend is asked (it is
/// started then), so it runs on the blocking pool.
async fn describe_backends(node: &Arc<Node>) -> Vec<crate::nn::backend::BackendInfo> {
    let node = node.clone();
    tokio::task::spawn_blocking(move || node.models.backends().describe())
        .await
        .unwrap_or_default()
}

#[utoipa::path(get, path = "/backends", tag = "node", responses((status = 200, description = "Every inference backend, whether it is available, and why not", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
async fn backends(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    auth::operator(&principal)?;
    Ok(Json(json!({ "backends": describe_backends(&node).await })))
}

#[utoipa::path(get, path = "/cluster", tag = "node", responses((status = 200, description = "This node's cluster and every member it knows of: id, node-port address, labels, state (alive, suspect, down)", body = serde_json::Value), (status = 401, description = "No or an invalid key", body = ErrorBody), (status = 403, description = "Not the operator", body = ErrorBody)))]
async fn cluster(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    auth::operator(&principal)?;
    Ok(Json(match node.fleet.get() {
        None => json!({ "enabled": false, "members": [] }),
        Some(fleet) => {
            let me = fleet.membership.me().id.clone();
            let members: Vec<Value> = fleet
                .membership
                .members()
                .into_iter()
                .map(|status| {
                    let load = match status.member.id == me {
                        true => Some(node.runtime.load()),
                        false => fleet.load_of(&status.member.id),
                    };
                    let mut member = json!(status);
                    member["load"] = json!(load);
                    member
                })
                .collect();
            json!({ "enabled": true, "node": me, "members": members })
        }
    }))
}

#[utoipa::path(get, path = "/status", tag = "node", responses((status = 200, description = "Version, uptime, instances, queues, connections and backends", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
async fn status(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Extension(connections): Extension<Arc<super::ConnectionStats>>,
) -> Result<Json<Value>, ApiError> {
    auth::operator(&principal)?;
    let backends = describe_backends(&node).await;
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "listen": node.config.listen.to_string(),
        "tls_fingerprint": node.tls_fingerprint,
        "uptime_secs": node.started.elapsed().as_secs(),
        "apps": node.runtime.apps().len(),
        "models": node.models.list().len(),
        "running_instances": node.runtime.running_instances(),
        "max_concurrent_instances": node.config.limits.max_concurrent_instances,
        "queued_requests": node.runtime.queued_requests(),
        "connections": connections.to_json(),
        "computes_running": node.models.backends().running_computes().count(),
        "backends": backends,
    })))
}

/// What the API shows of an app: its record, whether it runs on this node (its placement
/// selects it), its secrets' names and its revisions with their state and counters.
fn describe_app(node: &Node, app: &App) -> Value {
    json!({
        "name": app.record.name,
        "record": app.record,
        "placed_here": app.placed,
        "secrets": node.runtime.secret_names(&app.record.name).unwrap_or_default(),
        "revisions": app.revisions.values().map(|r| r.describe()).collect::<Vec<_>>(),
    })
}

#[utoipa::path(get, path = "/apps", tag = "apps", responses((status = 200, description = "Every app with its record, secrets' names and revisions", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
async fn list_apps(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    auth::allow(&principal, Action::Read)?;
    let apps: Vec<Value> = node
        .runtime
        .apps()
        .iter()
        .filter(|app| principal.sees(&app.record.tenant))
        .map(|app| describe_app(&node, app))
        .collect();
    Ok(Json(json!({ "apps": apps })))
}

pub(super) fn app_not_found(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "app_not_found",
        format!("no app named {name:?} is deployed on this node"),
    )
}

#[utoipa::path(get, path = "/apps/{name}", tag = "apps", params(("name" = String, Path, description = "The app's name")), responses((status = 200, description = "The app, its record and revisions", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app", body = ErrorBody)))]
async fn get_app(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let app = auth::visible_app(&node, &principal, &name, Action::Read)?;
    Ok(Json(json!({ "app": describe_app(&node, &app) })))
}

/// The shorthand settings of a deployment sent as a bare component (`curl -T app.wasm
/// '…/apps/hello?timeout_secs=5'`); a manifest says more.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeployQuery {
    timeout_secs: Option<u64>,
    memory_mib: Option<u64>,
    max_body_bytes: Option<u64>,
    /// Requests one instance serves in turn (1: a fresh instance per request).
    requests_per_instance: Option<u32>,
    /// Comma-separated names of the models the app may load.
    models: Option<String>,
    native_guest_models: Option<bool>,
    /// Anyone may invoke the app without a key.
    public: Option<bool>,
    /// Comma-separated names of the key-value buckets the app may open.
    buckets: Option<String>,
    dry_run: Option<bool>,
    /// With a manifest: change only what it sets on the current deployment (the CLI's
    /// shorthand flags). A bare component always does.
    overlay: Option<bool>,
}

impl DeployQuery {
    fn spec(&self) -> DeploySpec {
        let mut spec = DeploySpec::default();
        spec.limits.timeout_secs = self.timeout_secs;
        spec.limits.memory_mib = self.memory_mib;
        spec.limits.max_body_bytes = self.max_body_bytes;
        spec.scaling.requests_per_instance = self.requests_per_instance;
        spec.app.models = comma_separated(self.models.as_deref());
        spec.app.buckets = comma_separated(self.buckets.as_deref());
        spec.app.native_guest_models = self.native_guest_models.unwrap_or(false);
        spec.app.public = self.public;
        spec
    }
}

/// The names in a comma-separated list, blanks left out.
fn comma_separated(list: Option<&str>) -> Vec<String> {
    list.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(str::to_string)
        .collect()
}

fn bad_deploy(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_deployment", message)
}

/// `PUT /apps/{name}`: either `multipart/form-data` with a `manifest` part (the deployment as
/// JSON) and an optional `component` part, or the component alone as the body with the
/// shorthand settings in the query. `?dry_run=true` reports the changes without applying them.
#[utoipa::path(put, path = "/apps/{name}", tag = "apps", params(("name" = String, Path, description = "The app's name"), DeployQuery), request_body(description = "multipart/form-data with a `manifest` part (JSON) and an optional `component` part, or the component alone (application/wasm) with the shorthand settings in the query", content((String = "multipart/form-data"), (Vec<u8> = "application/wasm"))), responses((status = 200, description = "Deployed (or, with dry_run, what would change)", body = serde_json::Value), (status = 400, description = "Not a component, or an invalid manifest or setting", body = ErrorBody), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 413, description = "Component or manifest too large", body = ErrorBody)))]
async fn deploy(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    auth::allow(&principal, Action::Deploy)?;
    // An existing app stays its tenant's (the operator may change any); a new one is the
    // caller's. An app of a tenant the caller cannot see makes the deployment fail as taken.
    let tenant = node
        .runtime
        .app(&name)
        .map(|app| app.record.tenant.clone())
        .filter(|tenant| principal.sees(tenant))
        .unwrap_or_else(|| principal.tenant.clone());
    let Query(query) =
        Query::<DeployQuery>::try_from_uri(request.uri()).map_err(|e| bad_deploy(e.body_text()))?;
    let multipart = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let (spec, component, overlay) = if multipart {
        let mut form = Multipart::from_request(request, &())
            .await
            .map_err(|e| bad_deploy(e.body_text()))?;
        let (mut spec, mut component) = (None, None);
        while let Some(field) = form
            .next_field()
            .await
            .map_err(|e| bad_deploy(e.body_text()))?
        {
            let part = field.name().unwrap_or_default().to_string();
            let bytes = field.bytes().await.map_err(|e| bad_deploy(e.body_text()))?;
            match part.as_str() {
                "manifest" => {
                    spec = Some(serde_json::from_slice::<DeploySpec>(&bytes).map_err(|e| {
                        bad_deploy(format!("the manifest is not a valid deployment: {e}"))
                    })?)
                }
                "component" => component = Some(bytes),
                other => {
                    return Err(bad_deploy(format!(
                        "unknown part {other:?}: send `manifest` and `component`"
                    )))
                }
            }
        }
        (
            spec.ok_or_else(|| bad_deploy("the deployment has no `manifest` part"))?,
            component,
            query.overlay.unwrap_or(false),
        )
    } else {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|e| bad_deploy(e.body_text()))?;
        (query.spec(), Some(body), true)
    };
    let options = DeployOptions {
        tenant,
        dry_run: query.dry_run.unwrap_or(false),
        overlay,
    };
    let deployed = node.runtime.deploy(&name, component, spec, options).await?;
    if deployed.created {
        tracing::info!(app = %name, revision = deployed.revision, "deployed a new revision");
    }
    Ok((StatusCode::OK, Json(json!(deployed))).into_response())
}

/// A change of an app's traffic: the new split, and the sticky header when given (`null`
/// turns it off; left out, it stays).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficChange {
    split: Vec<crate::apps::traffic::TrafficTarget>,
    #[serde(default, deserialize_with = "present")]
    sticky_header: Option<Option<String>>,
}

/// A field that is there, even as `null`, is `Some`.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// `PUT /apps/{name}/traffic`: a new split (and sticky header).
#[utoipa::path(put, path = "/apps/{name}/traffic", tag = "apps", params(("name" = String, Path, description = "The app's name")), request_body(description = "`{\"split\": [{\"revision\": 3|\"latest\", \"percent\": 90, \"tag\": \"stable\"}], \"sticky_header\": \"x-user\"}`", content_type = "application/json", content = serde_json::Value), responses((status = 200, description = "The app's new record", body = serde_json::Value), (status = 400, description = "An invalid split", body = ErrorBody), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app", body = ErrorBody)))]
async fn set_traffic(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    auth::visible_app(&node, &principal, &name, Action::Deploy)?;
    let change: TrafficChange = serde_json::from_slice(&body)
        .map_err(|e| bad_deploy(format!("invalid traffic change: {e}")))?;
    let record = node
        .runtime
        .set_traffic(&name, change.split, change.sticky_header)
        .await?;
    Ok(Json(json!({ "app": record })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    revision: Option<u32>,
}

/// `POST /apps/{name}/rollback`: all traffic to a revision (by default the one before).
#[utoipa::path(post, path = "/apps/{name}/rollback", tag = "apps", params(("name" = String, Path, description = "The app's name")), request_body(description = "Optional `{\"revision\": N}`; without it the revision before the current one", content_type = "application/json", content = serde_json::Value), responses((status = 200, description = "The app's new record", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app", body = ErrorBody)))]
async fn rollback(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    auth::visible_app(&node, &principal, &name, Action::Deploy)?;
    let request: RollbackRequest = if body.is_empty() {
        RollbackRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| bad_deploy(format!("invalid rollback request: {e}")))?
    };
    let record = node.runtime.rollback(&name, request.revision).await?;
    Ok(Json(json!({ "app": record })))
}

#[utoipa::path(get, path = "/apps/{name}/secrets", tag = "apps", params(("name" = String, Path, description = "The app's name")), responses((status = 200, description = "The names of the app's secrets (never their values)", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app", body = ErrorBody)))]
async fn list_secrets(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth::visible_app(&node, &principal, &name, Action::Read)?;
    Ok(Json(
        json!({ "secrets": node.runtime.secret_names(&name)? }),
    ))
}

/// `PUT /apps/{name}/secrets/{key}`: the body is the value. It is stored encrypted and never
/// shown again.
#[utoipa::path(put, path = "/apps/{name}/secrets/{key}", tag = "apps", params(("name" = String, Path, description = "The app's name"), ("key" = String, Path, description = "The secret's key")), request_body(description = "The value", content_type = "application/octet-stream", content = Vec<u8>), responses((status = 200, description = "Stored, encrypted", body = serde_json::Value), (status = 400, description = "An invalid key or value", body = ErrorBody), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app", body = ErrorBody)))]
async fn set_secret(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path((name, key)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    auth::visible_app(&node, &principal, &name, Action::Deploy)?;
    node.runtime.set_secret(&name, &key, &body).await?;
    Ok(Json(json!({ "app": name, "secret": key })))
}

#[utoipa::path(delete, path = "/apps/{name}/secrets/{key}", tag = "apps", params(("name" = String, Path, description = "The app's name"), ("key" = String, Path, description = "The secret's key")), responses((status = 200, description = "Removed", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app or secret", body = ErrorBody)))]
async fn remove_secret(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path((name, key)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    auth::visible_app(&node, &principal, &name, Action::Deploy)?;
    if !node.runtime.remove_secret(&name, &key).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "secret_not_found",
            format!("app {name:?} has no secret {key:?}"),
        ));
    }
    Ok(Json(json!({ "removed": key })))
}

#[utoipa::path(delete, path = "/apps/{name}", tag = "apps", params(("name" = String, Path, description = "The app's name")), responses((status = 200, description = "Removed, with its jobs", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app", body = ErrorBody)))]
async fn remove_app(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    auth::visible_app(&node, &principal, &name, Action::Deploy)?;
    // Jobs go first: they are filed by the app's name, which another tenant may take next.
    let jobs = node.jobs.remove_app(&name).await?;
    let record = node
        .runtime
        .remove(&name)
        .await?
        .ok_or_else(|| app_not_found(&name))?;
    Ok(Json(json!({ "removed": record, "jobs_removed": jobs })))
}

#[utoipa::path(get, path = "/models", tag = "models", responses((status = 200, description = "Every registered model, whether it is loaded, and LLM activity", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
async fn list_models(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    auth::allow(&principal, Action::Read)?;
    let models: Vec<_> = node
        .models
        .list()
        .into_iter()
        .filter(|model| model_visible(&principal, &model.record))
        .collect();
    Ok(Json(json!({ "models": models })))
}

/// Whether the caller sees a model: the node's own models are everyone's to see (and load),
/// a tenant's only its own and the operator's.
fn model_visible(principal: &Principal, model: &ModelRecord) -> bool {
    principal.is_operator() || model.usable_by(&principal.tenant)
}

#[utoipa::path(get, path = "/models/{name}", tag = "models", params(("name" = String, Path, description = "The model's name")), responses((status = 200, description = "The model", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such model", body = ErrorBody)))]
async fn get_model(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = visible_model(&node, &principal, &name, Action::Read)?;
    Ok(Json(json!({ "model": record })))
}

/// The model `name` if the caller may see it (404 as for an absent model otherwise), once its
/// role allows `action` (403).
fn visible_model(
    node: &Node,
    principal: &Principal,
    name: &str,
    action: Action,
) -> Result<crate::nn::ModelStatus, ApiError> {
    let model = node
        .models
        .list()
        .into_iter()
        .find(|m| m.record.name == name && model_visible(principal, &m.record))
        .ok_or_else(|| ApiError::from(crate::nn::ModelError::NotFound(name.to_string())))?;
    auth::allow(principal, action)?;
    Ok(model)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ModelQuery {
    encoding: Option<String>,
    backend: Option<String>,
    target: Option<String>,
    /// Join concurrent computes into batches of at most this many rows (2–256).
    max_batch_size: Option<u32>,
    /// With `max_batch_size`: how long a compute waits for others to join it, in µs
    /// (0–1000000, default 2000).
    max_queue_delay_us: Option<u64>,
}

#[utoipa::path(put, path = "/models/{name}", tag = "models", params(("name" = String, Path, description = "The model's name"), ModelQuery), request_body(description = "The model file (or a model bundle)", content_type = "application/octet-stream", content = Vec<u8>), responses((status = 200, description = "Registered and loaded", body = serde_json::Value), (status = 400, description = "An invalid model, encoding or backend", body = ErrorBody), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 413, description = "Larger than nn.max_model_bytes", body = ErrorBody)))]
async fn add_model(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(query): Query<ModelQuery>,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    auth::allow(&principal, Action::Deploy)?;
    let encoding = match query.encoding.as_deref() {
        None => Encoding::Onnx,
        Some(name) => name
            .parse()
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "unknown_encoding", e))?,
    };
    let batching = match (query.max_batch_size, query.max_queue_delay_us) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_batching",
                "max_queue_delay_us needs max_batch_size",
            ))
        }
        (Some(size), delay) => Some(
            BatchPolicy::new(size, delay.unwrap_or(DEFAULT_QUEUE_DELAY_US))
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_batching", e))?,
        ),
    };
    let limit = node.config.nn.max_model_bytes;
    let tmp_dir = node.config.data_dir.join(crate::node::TMP_DIR);
    // Streamed to disk while hashing it: models can be far larger than memory wants.
    let staged = blobs::stage_stream(&tmp_dir, body.into_data_stream(), limit).await;
    let (staged, digest, size) = staged.map_err(|error| match error {
        StageError::TooLarge(_) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the model is larger than this node's max_model_bytes ({limit})"),
        ),
        StageError::Read(error) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("reading the upload failed: {error}"),
        ),
        StageError::Io(error) => io_error(error),
    })?;
    if size == 0 {
        let _ = tokio::fs::remove_file(&staged).await;
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_model",
            "the model file is empty",
        ));
    }
    let upload = Upload {
        encoding,
        backend: query.backend,
        target: query.target.unwrap_or_else(|| "cpu".to_string()),
        digest,
        size_bytes: size,
        // The operator's models are the node's, every app's to load; a tenant's are its own.
        tenant: (!principal.is_operator()).then(|| principal.tenant.clone()),
        batching,
    };
    let record = node.models.add(&name, staged, upload).await?;
    tracing::info!(model = %record.name, digest = %record.digest, "model added");
    Ok(Json(json!({ "model": record })))
}

#[utoipa::path(delete, path = "/models/{name}", tag = "models", params(("name" = String, Path, description = "The model's name")), responses((status = 200, description = "Unregistered", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such model", body = ErrorBody), (status = 409, description = "An app still declares it", body = ErrorBody)))]
async fn remove_model(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let owner = visible_model(&node, &principal, &name, Action::Deploy)?
        .record
        .tenant;
    if owner.is_none() {
        auth::operator(&principal)?;
    }
    let record = node.models.remove(&name).await?;
    Ok(Json(json!({ "removed": record })))
}

fn io_error(error: std::io::Error) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "io_error",
        error.to_string(),
    )
}

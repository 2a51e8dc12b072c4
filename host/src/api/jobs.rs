//! Async invocation: `POST /async/<app>/<path>` stores the request as a job and answers 202
//! with its id once it is durable; `/jobs/<id>` tells its state and `/jobs/<id>/result` gives
//! the app's answer. Dead letters are the operator's, under `/v1/admin/apps/<app>/dead-letters`.
//!
//! A job id is 128 random bits: whoever holds it may read the job, as with a capability URL.

use super::invoke::read_app_body;
use super::ApiError;
use crate::apps::outbound::{self, Destination};
use crate::jobs::run::status_json;
use crate::jobs::{JobError, JobState, NewJob};
use crate::node::Node;
use crate::runtime::dispatch::Decision;
use crate::runtime::dispatch::ErrorBody;
use crate::runtime::queue::{PRODUCER_HEADER, QUEUE_HEADER};
use crate::tenancy::{Action, Principal};
use axum::body::Body;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

/// The header that asks for a callback once the job is completed or dead.
pub const CALLBACK_HEADER: &str = "tensorlet-callback";
/// The header that asks for another number of attempts than `[jobs] max_attempts`.
pub const MAX_ATTEMPTS_HEADER: &str = "tensorlet-max-attempts";
/// The header that makes a retried POST return the job it made the first time.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// The longest idempotency key a client may send.
const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

/// Headers a job does not keep: the connection's own, and those that steer the job.
const UNSTORED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    CALLBACK_HEADER,
    MAX_ATTEMPTS_HEADER,
    IDEMPOTENCY_HEADER,
    QUEUE_HEADER,
    PRODUCER_HEADER,
];

impl From<JobError> for ApiError {
    fn from(error: JobError) -> Self {
        match error {
            JobError::Invalid(message) => {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_job", message)
            }
            JobError::QueueFull { .. } | JobError::ResultsFull { .. } => ApiError {
                retry_after_secs: Some(5),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "queue_full",
                    error.to_string(),
                )
            },
            JobError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, "job_not_found", "no such job")
            }
            JobError::Store(error) => error.into(),
        }
    }
}

fn bad_header(name: &str, why: &str) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "bad_header",
        format!("{name}: {why}"),
    )
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| bad_header(name, "not visible ASCII"))
        })
        .transpose()
}

/// `POST /async/<app>[/<path>]`.
pub async fn enqueue(
    State(node): State<Arc<Node>>,
    Path(params): Path<Vec<(String, String)>>,
    request: Request,
) -> Result<Response, ApiError> {
    let app_name = params
        .iter()
        .find(|(key, _)| key == "app")
        .map(|(_, value)| value.clone())
        .unwrap_or_default();
    let rest = params
        .iter()
        .find(|(key, _)| key == "rest")
        .map_or("", |(_, value)| value.as_str());
    let peer = request
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|info| info.0);
    let (mut parts, body) = request.into_parts();
    let caller = super::auth::invoker(&node, &app_name, &mut parts.headers)?;
    let client = super::invoke::client_key(caller.as_ref(), peer);
    // The app's rate limits apply when a job is asked for, as to a request, and the body
    // limit is that of the revision the split picks now.
    let admitted = match node
        .runtime
        .admit(&app_name, None, &parts.headers, &client)?
    {
        Decision::Serve(admitted) => admitted,
        Decision::Degraded(response) => return Ok(response.map(Body::new)),
    };
    let callback = header_text(&parts.headers, CALLBACK_HEADER)?.map(str::to_string);
    if let Some(url) = &callback {
        let parsed: axum::http::Uri = url
            .parse()
            .map_err(|_| bad_header(CALLBACK_HEADER, "not a URL"))?;
        let reachable = matches!(
            outbound::destination(
                &admitted.revision.record.spec.allowed_hosts,
                parsed.scheme_str().unwrap_or_default(),
                parsed.authority().map_or("", |a| a.as_str()),
            ),
            Destination::Network
        );
        if !reachable {
            return Err(bad_header(
                CALLBACK_HEADER,
                "a callback goes only to an http(s) host the app's [outbound] allowed_hosts names",
            ));
        }
    }
    let max_attempts = match header_text(&parts.headers, MAX_ATTEMPTS_HEADER)? {
        Some(text) => text
            .parse()
            .map_err(|_| bad_header(MAX_ATTEMPTS_HEADER, "not a number"))?,
        None => node.config.jobs.max_attempts,
    };
    // Keys are the client's own: another client sending the same key gets a job of its own,
    // never the id (and so the result) of this one.
    let idempotency_key = match header_text(&parts.headers, IDEMPOTENCY_HEADER)? {
        Some(key) if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_BYTES => {
            return Err(bad_header(
                IDEMPOTENCY_HEADER,
                &format!("1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            ))
        }
        key => key.map(|key| format!("{client} {key}")),
    };
    let limit = admitted.revision.record.spec.max_body_bytes;
    drop(admitted);
    let mut reservation = node.runtime.body_reservation();
    let body = match read_app_body(
        &node,
        body,
        &parts.headers,
        &app_name,
        limit,
        &mut reservation,
    )
    .await
    {
        Ok(body) => body,
        Err(response) => return Ok(response),
    };
    let path = match parts.uri.query() {
        Some(query) => format!("/{rest}?{query}"),
        None => format!("/{rest}"),
    };
    let headers = parts
        .headers
        .iter()
        .filter(|(name, _)| !UNSTORED_HEADERS.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect();
    let enqueued = node
        .jobs
        .enqueue(NewJob {
            app: app_name,
            method: parts.method.to_string(),
            path,
            headers,
            body,
            max_attempts,
            callback,
            idempotency_key,
            client: Some(client),
        })
        .await?;
    drop(reservation);
    let status_url = format!("/jobs/{}", enqueued.id);
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, status_url.clone())],
        Json(json!({
            "id": enqueued.id,
            "existing": enqueued.existing,
            "status_url": status_url,
            "result_url": format!("/jobs/{}/result", enqueued.id),
        })),
    )
        .into_response())
}

/// A job id as the node makes them: 32 lowercase hex digits.
fn valid_job_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn job(node: &Node, id: &str) -> Result<crate::jobs::JobRecord, ApiError> {
    if !valid_job_id(id) {
        return Err(JobError::NotFound.into());
    }
    node.jobs.get(id)?.ok_or_else(|| JobError::NotFound.into())
}

/// `GET /jobs/<id>`: the job's state, attempts, last error and result's status.
pub async fn status(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(status_json(&job(&node, &id)?)))
}

/// `GET /jobs/<id>/result`: the app's answer (status, headers, body) once the job is
/// completed; 409 before, or when it is dead.
pub async fn result(
    State(node): State<Arc<Node>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let job = job(&node, &id)?;
    let (JobState::Completed, Some(result)) = (job.state, &job.result) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_not_completed",
            format!(
                "the job is {}{}",
                serde_json::to_value(job.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                job.last_error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        ));
    };
    let body = node.jobs.result_body(&id)?.unwrap_or_default();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = StatusCode::from_u16(result.status).unwrap_or(StatusCode::OK);
    for (name, value) in &result.headers {
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::try_from(name.as_str()),
            header::HeaderValue::try_from(value.as_str()),
        ) {
            if !UNSTORED_HEADERS.contains(&name.as_str()) {
                response.headers_mut().append(name, value);
            }
        }
    }
    Ok(response)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeadQuery {
    limit: Option<usize>,
}

/// `GET /v1/admin/apps/<app>/dead-letters`: the app's dead jobs, newest first.
#[utoipa::path(get, path = "/apps/{name}/dead-letters", tag = "jobs", params(("name" = String, Path, description = "The app's name"), DeadQuery), responses((status = 200, description = "The app's dead jobs, newest first", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
pub async fn dead_letters(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(app): Path<String>,
    Query(query): Query<DeadQuery>,
) -> Result<Json<Value>, ApiError> {
    super::auth::visible_app(&node, &principal, &app, Action::Read)?;
    let jobs = node
        .jobs
        .list_dead(&app, query.limit.unwrap_or(100).min(1000))?;
    Ok(Json(json!({
        "dead_letters": jobs.iter().map(status_json).collect::<Vec<_>>(),
    })))
}

/// `POST /v1/admin/apps/<app>/dead-letters/<id>/retry`: the job is queued again, its attempts
/// reset.
#[utoipa::path(post, path = "/apps/{name}/dead-letters/{id}/retry", tag = "jobs", params(("name" = String, Path, description = "The app's name"), ("id" = String, Path, description = "The job's id")), responses((status = 200, description = "Queued again, attempts reset", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "Not a dead letter of this app", body = ErrorBody), (status = 429, description = "The app's queue is full", body = ErrorBody)))]
pub async fn retry_dead(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path((app, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    super::auth::visible_app(&node, &principal, &app, Action::Deploy)?;
    if !node.jobs.retry_dead(&app, &id).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_a_dead_letter",
            format!("{id} is not a dead letter of app {app:?}"),
        ));
    }
    Ok(Json(json!({ "retried": id })))
}

/// `DELETE /v1/admin/apps/<app>/dead-letters`: deletes them all.
#[utoipa::path(delete, path = "/apps/{name}/dead-letters", tag = "jobs", params(("name" = String, Path, description = "The app's name")), responses((status = 200, description = "How many were deleted", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
pub async fn purge_dead(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(app): Path<String>,
) -> Result<Json<Value>, ApiError> {
    super::auth::visible_app(&node, &principal, &app, Action::Deploy)?;
    let purged = node.jobs.purge_dead(&app).await?;
    Ok(Json(json!({ "purged": purged })))
}

/// `GET /v1/admin/jobs`: jobs queued, running and dead, per app and in total.
#[utoipa::path(get, path = "/jobs", tag = "jobs", responses((status = 200, description = "Jobs queued, running and dead, in total and per app", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
pub async fn stats(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    super::auth::operator(&principal)?;
    Ok(Json(json!({
        "total": node.jobs.stats(),
        "apps": node.jobs.stats_by_app(),
    })))
}

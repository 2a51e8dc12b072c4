//! A tenant's view of its apps at work, under `/v1/admin`: an app's log (read, or followed
//! as it grows) and metered usage per app and hour (the operator sees every tenant's).

use super::ApiError;
use crate::node::{Node, MAX_LOG_FOLLOWERS};
use crate::runtime::dispatch::ErrorBody;
use crate::telemetry::logs::{LogLine, MAX_READ_LINES};
use crate::telemetry::usage::{self, UsageRow};
use crate::tenancy::{Action, Principal};
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Lines a log read returns unless `limit` says otherwise.
const DEFAULT_LOG_LINES: usize = 100;

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Lines after this sequence number (oldest first); without it, the newest lines.
    after: Option<u64>,
    limit: Option<usize>,
    /// Keep the response open and send new lines as they come (NDJSON).
    #[serde(default)]
    follow: bool,
}

/// `GET /v1/admin/apps/{name}/logs`: the app's newest lines, or those after `after`, as
/// `{"lines": [...]}`; with `follow=true`, those lines then every new one, one JSON object
/// per line (NDJSON), until the client goes or the app is removed. A follower that falls
/// behind is told how many lines it missed (`{"skipped": n}`).
#[utoipa::path(get, path = "/apps/{name}/logs", tag = "operations", params(("name" = String, Path, description = "The app's name"), LogQuery), responses((status = 200, description = "`{\"lines\": [...]}`, or with follow=true one JSON line per log line (application/x-ndjson)", body = serde_json::Value), (status = 401, description = "No or a wrong admin token", body = ErrorBody), (status = 404, description = "No such app", body = ErrorBody), (status = 503, description = "Too many followers", body = ErrorBody)))]
pub async fn logs(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Path(name): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Response, ApiError> {
    super::auth::visible_app(&node, &principal, &name, Action::Read)?;
    let limit = query.limit.unwrap_or(DEFAULT_LOG_LINES).min(MAX_READ_LINES);
    let logs = &node.telemetry.logs;
    if !query.follow {
        let lines = logs.read(&name, query.after, limit)?;
        return Ok(Json(json!({ "lines": lines })).into_response());
    }
    let Ok(follower) = node.log_followers.clone().try_acquire_owned() else {
        return Err(ApiError {
            retry_after_secs: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_followers",
                format!("{MAX_LOG_FOLLOWERS} log followers are connected already"),
            )
        });
    };
    // Subscribed before reading, so no line falls between the read and the stream.
    let receiver = logs.subscribe(&name);
    let backlog = logs.read(&name, query.after, limit)?;
    let last_seq = backlog.last().map_or(query.after.unwrap_or(0), |l| l.seq);
    let first = futures_util::stream::iter(backlog.into_iter().map(|line| ndjson(&line)));
    let rest = futures_util::stream::unfold(
        (receiver, last_seq),
        |(mut receiver, mut last_seq)| async move {
            loop {
                let text = match receiver.recv().await {
                    Ok(line) if line.seq <= last_seq => continue,
                    Ok(line) => {
                        last_seq = line.seq;
                        ndjson(&line)
                    }
                    Err(RecvError::Lagged(skipped)) => {
                        format!("{}\n", json!({ "skipped": skipped }))
                    }
                    Err(RecvError::Closed) => return None,
                };
                return Some((text, (receiver, last_seq)));
            }
        },
    );
    let stream = first.chain(rest).map(move |line| {
        let _held = &follower;
        Ok::<_, std::convert::Infallible>(line)
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn ndjson(line: &LogLine) -> String {
    let mut text = serde_json::to_string(line).expect("log lines serialise");
    text.push('\n');
    text
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UsageQuery {
    app: Option<String>,
    /// How far back: `90m`, `24h`, `7d` (default `24h`).
    since: Option<String>,
}

/// A duration like `90m`, `24h` or `7d`.
pub fn parse_since(text: &str) -> Option<Duration> {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit())?);
    let number: u64 = number.parse().ok()?;
    let seconds = match unit {
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    Some(Duration::from_secs(number.checked_mul(seconds)?))
}

/// `GET /v1/admin/usage?app=&since=`: metered usage per app and hour (the current hour
/// included), and each app's totals over the period.
#[utoipa::path(get, path = "/usage", tag = "operations", params(UsageQuery), responses((status = 200, description = "Usage per app and hour, and totals per app", body = serde_json::Value), (status = 400, description = "An invalid period", body = ErrorBody), (status = 401, description = "No or a wrong admin token", body = ErrorBody)))]
pub async fn usage(
    State(node): State<Arc<Node>>,
    Extension(principal): Extension<Principal>,
    Query(query): Query<UsageQuery>,
) -> Result<Json<Value>, ApiError> {
    super::auth::allow(&principal, Action::Read)?;
    let since = query.since.as_deref().unwrap_or("24h");
    let Some(back) = parse_since(since) else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_since",
            format!(
                "since must be a number of minutes, hours or days (90m, 24h, 7d), not {since:?}"
            ),
        ));
    };
    let now = crate::store::unix_now();
    let since_hour = usage::unix_hour(now.saturating_sub(back.as_secs()));
    // Each row names its tenant: a caller gets its tenant's (the operator every tenant's).
    let rows: Vec<UsageRow> = node
        .telemetry
        .meter
        .query(None, since_hour, None)?
        .into_iter()
        .filter(|row| principal.sees(&row.tenant))
        .filter(|row| query.app.as_ref().is_none_or(|app| *app == row.app))
        .collect();
    let totals = usage::totals(&rows);
    Ok(Json(json!({
        "since_hour": since_hour,
        "rows": rows,
        "totals": totals,
    })))
}

#[cfg(test)]
mod tests {
    use super::parse_since;
    use std::time::Duration;

    #[test]
    fn periods_are_minutes_hours_or_days() {
        assert_eq!(parse_since("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_since("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_since("7d"), Some(Duration::from_secs(604_800)));
        for bad in ["", "h", "24", "24x", "-1h", "99999999999999999999d"] {
            assert_eq!(parse_since(bad), None, "{bad}");
        }
    }
}

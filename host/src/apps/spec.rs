//! What a deployment asks for (a [`DeploySpec`], the manifest without its component path) and
//! what the node keeps of it: an immutable, numbered [`RevisionRecord`] per deployed version,
//! and an [`AppRecord`] with what belongs to the app across revisions (traffic, rate limits,
//! fallback). [`settle`] turns a request into a revision's settings against the node's limits.

use super::placement::{Placement, Stamp};
use super::rate::RateLimitSpec;
use super::traffic::{self, TrafficTarget};
use crate::config::LimitsConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A deployment as the admin API receives it: `tensorlet.toml` less the component's path.
/// Everything is optional; what is left out takes the node's defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeploySpec {
    pub app: AppSection,
    pub limits: LimitsSpec,
    pub scaling: ScalingSpec,
    /// Values the component reads through `wasi:config/store`.
    pub config: BTreeMap<String, String>,
    pub outbound: OutboundSpec,
    pub cache: Option<CacheSpec>,
    /// Requests per second the app as a whole takes.
    pub rate_limit: Option<RateLimitSpec>,
    /// Requests per second one client (API key, else IP address) may send the app.
    pub client_rate_limit: Option<RateLimitSpec>,
    pub traffic: Option<TrafficSpec>,
    pub fallback: Option<Fallback>,
    /// Which nodes of a fleet run the app (every node when empty).
    pub placement: Placement,
}

impl DeploySpec {
    /// The deployment that gives `record` with `revision` back: what a shorthand deploy (the
    /// CLI's flags without a manifest, a bare component) changes.
    pub fn of(record: &AppRecord, revision: &RevisionSpec) -> DeploySpec {
        DeploySpec {
            app: AppSection {
                name: Some(record.name.clone()),
                component: None,
                models: revision.models.clone(),
                native_guest_models: revision.native_guest_models,
                routes: record.routes.clone(),
                consumes: record.consumes.clone(),
                public: Some(record.public),
                buckets: revision.buckets.clone().unwrap_or_default(),
                replicated_buckets: revision.replicated_buckets.clone(),
            },
            limits: LimitsSpec {
                timeout_secs: Some(revision.timeout_secs),
                memory_mib: Some(revision.memory_mib),
                max_body_bytes: Some(revision.max_body_bytes),
                cpu_ms: revision.cpu_ms,
            },
            scaling: ScalingSpec {
                max_concurrency: revision.max_concurrency,
                max_queued: Some(revision.max_queued),
                queue_timeout_secs: Some(revision.queue_timeout_secs),
                min_instances: Some(revision.min_instances),
                idle_timeout_secs: Some(revision.idle_timeout_secs),
                requests_per_instance: Some(revision.requests_per_instance),
            },
            config: revision.config.clone(),
            outbound: OutboundSpec {
                allowed_hosts: revision.allowed_hosts.clone(),
            },
            cache: revision.cache.clone(),
            rate_limit: record.rate_limit.clone(),
            client_rate_limit: record.client_rate_limit.clone(),
            traffic: Some(TrafficSpec {
                split: record.traffic.clone(),
                sticky_header: record.sticky_header.clone(),
            }),
            fallback: record.fallback.clone(),
            placement: record.placement.clone(),
        }
    }

    /// This deployment with what `changes` sets: limits and scaling it gives replace these,
    /// its config keys are added, its models, routes and hosts replace these when it has
    /// some, and its sections (cache, rate limits, traffic, fallback) when it has them.
    pub fn overlay(mut self, changes: DeploySpec) -> DeploySpec {
        let (limits, scaling) = (changes.limits, changes.scaling);
        self.limits.timeout_secs = limits.timeout_secs.or(self.limits.timeout_secs);
        self.limits.memory_mib = limits.memory_mib.or(self.limits.memory_mib);
        self.limits.max_body_bytes = limits.max_body_bytes.or(self.limits.max_body_bytes);
        self.limits.cpu_ms = limits.cpu_ms.or(self.limits.cpu_ms);
        self.scaling.max_concurrency = scaling.max_concurrency.or(self.scaling.max_concurrency);
        self.scaling.max_queued = scaling.max_queued.or(self.scaling.max_queued);
        self.scaling.queue_timeout_secs = scaling
            .queue_timeout_secs
            .or(self.scaling.queue_timeout_secs);
        self.scaling.min_instances = scaling.min_instances.or(self.scaling.min_instances);
        self.scaling.idle_timeout_secs =
            scaling.idle_timeout_secs.or(self.scaling.idle_timeout_secs);
        self.scaling.requests_per_instance = scaling
            .requests_per_instance
            .or(self.scaling.requests_per_instance);
        if !changes.app.models.is_empty() {
            self.app.models = changes.app.models;
        }
        self.app.native_guest_models |= changes.app.native_guest_models;
        if !changes.app.routes.is_empty() {
            self.app.routes = changes.app.routes;
        }
        if !changes.app.consumes.is_empty() {
            self.app.consumes = changes.app.consumes;
        }
        self.app.public = changes.app.public.or(self.app.public);
        if !changes.app.buckets.is_empty() {
            self.app.buckets = changes.app.buckets;
            self.app.replicated_buckets = changes.app.replicated_buckets;
        } else if !changes.app.replicated_buckets.is_empty() {
            self.app.replicated_buckets = changes.app.replicated_buckets;
        }
        self.config.extend(changes.config);
        if !changes.outbound.allowed_hosts.is_empty() {
            self.outbound = changes.outbound;
        }
        self.cache = changes.cache.or(self.cache);
        self.rate_limit = changes.rate_limit.or(self.rate_limit);
        self.client_rate_limit = changes.client_rate_limit.or(self.client_rate_limit);
        self.traffic = changes.traffic.or(self.traffic);
        self.fallback = changes.fallback.or(self.fallback);
        if changes.placement != Placement::default() {
            self.placement = changes.placement;
        }
        self
    }
}

/// `[app]`: the app's name and component (read by the CLI), its models.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AppSection {
    /// The app's name; the CLI's argument, when given, must match it.
    pub name: Option<String>,
    /// Path of the component, relative to the manifest. Only the CLI reads it.
    pub component: Option<String>,
    /// Models the app may load by name; others are refused.
    pub models: Vec<String>,
    /// Let models the app passes as bytes go to native backends (else tract only).
    pub native_guest_models: bool,
    /// Paths the app is also served at, besides `/apps/<app>/`: `"/chat"` serves
    /// `/chat/<rest>` as `/<rest>`; `"/"` takes every path no other route or the node claims.
    pub routes: Vec<String>,
    /// Named queues whose messages this app is triggered by: each message becomes an async
    /// job, `POST /queues/<queue>` with the message as its body. One app consumes a queue.
    pub consumes: Vec<String>,
    /// Anyone may invoke the app, without an API key (else an invoker key of its tenant is
    /// needed). Left out: not public.
    pub public: Option<bool>,
    /// Key-value buckets the app may open; others are refused.
    pub buckets: Vec<String>,
    /// Those of `buckets` whose data the fleet shares: every node that runs the app keeps
    /// every key, last writer wins per key (the others stay on the node that wrote them).
    pub replicated_buckets: Vec<String>,
}

/// Paths the node keeps for itself: no app route may be one of them or lie below one.
const RESERVED_ROUTES: &[&str] = &[
    "/apps",
    "/v1/admin",
    "/healthz",
    "/metrics",
    "/async",
    "/jobs",
    "/dashboard",
    "/openapi.json",
];

/// Checks an app route: `/` or `/segment[/segment…]` of URL-safe characters, not a path the
/// node keeps for itself.
pub fn validate_route(route: &str) -> Result<(), String> {
    let well_formed = route == "/"
        || (route.starts_with('/')
            && !route.ends_with('/')
            && route.len() <= 256
            && route[1..].split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
                    })
            }));
    if !well_formed {
        return Err(format!(
            "app.routes: {route:?} must be \"/\" or /segment[/segment…] of letters, digits, '-', '_', '.', '~' (no trailing '/')"
        ));
    }
    if let Some(reserved) = RESERVED_ROUTES
        .iter()
        .find(|reserved| route_covers(route, reserved) || route_covers(reserved, route))
        .filter(|_| route != "/")
    {
        return Err(format!(
            "app.routes: {route:?} overlaps {reserved}, which the node keeps for itself"
        ));
    }
    Ok(())
}

/// Whether `path` is one the node keeps for itself (no app route may serve it).
pub fn is_reserved(path: &str) -> bool {
    RESERVED_ROUTES
        .iter()
        .any(|reserved| route_covers(reserved, path))
}

/// Whether `path` lies at or below `route` (on a segment boundary).
pub fn route_covers(route: &str, path: &str) -> bool {
    route == "/"
        || path == route
        || path
            .strip_prefix(route)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `[limits]`: what one request may use.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSpec {
    pub timeout_secs: Option<u64>,
    pub memory_mib: Option<u64>,
    pub max_body_bytes: Option<u64>,
    /// CPU time one request may spend running the component's code, in milliseconds
    /// (measured in epoch ticks of 10 ms; time in host calls such as inference is not counted).
    pub cpu_ms: Option<u64>,
}

/// `[scaling]`: how many requests run at once and how the revision scales to zero.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ScalingSpec {
    /// Requests of this revision that run at once (the node's limit stays a ceiling).
    pub max_concurrency: Option<u32>,
    /// Requests that may wait for one of those slots; beyond, 503 with `Retry-After`.
    pub max_queued: Option<u32>,
    /// How long a request may wait for a slot, in seconds.
    pub queue_timeout_secs: Option<u64>,
    /// 0 lets the revision scale to zero when idle; 1 or more keeps it prepared (compiled,
    /// linked: its instances start in microseconds) from deploy and node start on.
    pub min_instances: Option<u32>,
    /// Seconds without requests after which a revision with `min_instances = 0` lets go of
    /// its prepared component; its next request starts cold, from the compile cache.
    pub idle_timeout_secs: Option<u64>,
    /// Requests one instance serves one after another before it is replaced (1, the default:
    /// a fresh instance per request). Above 1 the app trades isolation for speed: what one
    /// request leaves in the instance's memory, the next request of the same revision sees.
    /// An instance that traps, times out, hits a limit or loses its client is never reused.
    pub requests_per_instance: Option<u32>,
}

/// `[outbound]`: hosts the app may call over `wasi:http`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OutboundSpec {
    /// `<app>.internal` (another app on this node, no network) or `host[:port]` of an
    /// outside service; `*.internal` allows every app of the node.
    pub allowed_hosts: Vec<String>,
}

/// `[cache]`: responses the node may answer again without running the app.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// How long a response is reused; a response's `Cache-Control: max-age` may shorten it.
    pub ttl_secs: u64,
    /// Largest response body kept, in bytes (default 1 MiB).
    #[serde(default = "default_max_entry_bytes")]
    pub max_entry_bytes: u64,
}

fn default_max_entry_bytes() -> u64 {
    1 << 20
}

/// `[traffic]`: how requests are split across revisions.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrafficSpec {
    /// Percent per revision, summing to 100; tags reach a revision at `/apps/<app>@<tag>/`.
    pub split: Vec<TrafficTarget>,
    /// A request header whose value keeps a client on one revision of the split.
    pub sticky_header: Option<String>,
}

/// `[fallback]`: what a client gets when the app sheds load or fails: another revision, or a
/// fixed response.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Fallback {
    pub revision: Option<u32>,
    pub status: Option<u16>,
    pub body: Option<String>,
    pub content_type: Option<String>,
}

impl Fallback {
    fn validate(&self) -> Result<(), String> {
        let fixed = self.status.is_some() || self.body.is_some() || self.content_type.is_some();
        match (self.revision, fixed) {
            (Some(_), true) => {
                Err("fallback: give either revision or status/body, not both".into())
            }
            (None, false) => Err("fallback: give a revision or a status and body".into()),
            (None, true) => match self.status.unwrap_or(200) {
                200..=599 => Ok(()),
                status => Err(format!("fallback.status must be 200-599, not {status}")),
            },
            (Some(_), false) => Ok(()),
        }
    }
}

/// A revision's settings, settled against the node's defaults and limits (each field is the
/// manifest key of the same name: [`LimitsSpec`], [`ScalingSpec`], [`AppSection`],
/// `[config]`, [`OutboundSpec`], [`CacheSpec`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevisionSpec {
    pub timeout_secs: u64,
    pub memory_mib: u64,
    pub max_body_bytes: u64,
    pub cpu_ms: Option<u64>,
    pub max_concurrency: Option<u32>,
    pub max_queued: u32,
    pub queue_timeout_secs: u64,
    pub min_instances: u32,
    pub idle_timeout_secs: u64,
    /// Records made before instance reuse existed: a fresh instance per request.
    #[serde(default = "one_request_per_instance")]
    pub requests_per_instance: u32,
    pub models: Vec<String>,
    pub native_guest_models: bool,
    /// Key-value buckets the app may open. `None` in revisions made before allow-lists
    /// existed: those may open any of their app's buckets, as they could then.
    #[serde(default)]
    pub buckets: Option<Vec<String>>,
    /// Those of them whose data the fleet shares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicated_buckets: Vec<String>,
    pub config: BTreeMap<String, String>,
    pub allowed_hosts: Vec<String>,
    pub cache: Option<CacheSpec>,
}

/// One deployed version of an app: its component and settings, never changed once made.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RevisionRecord {
    pub app: String,
    pub number: u32,
    /// SHA-256 of the component, hex; the component is stored under this name.
    pub digest: String,
    pub size_bytes: u64,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    #[serde(flatten)]
    pub spec: RevisionSpec,
}

/// What the node keeps about an app across its revisions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppRecord {
    pub name: String,
    /// The tenant that owns the app and everything below it (records made before tenants
    /// existed belong to the operator's).
    #[serde(default = "operator_tenant")]
    pub tenant: String,
    /// Anyone may invoke it without a key (records made before keys existed were open to
    /// anyone, and stay so until deployed again).
    #[serde(default = "open_before_keys")]
    pub public: bool,
    /// The newest revision.
    pub latest: u32,
    /// The number the next revision gets (numbers are never reused).
    pub next_revision: u32,
    pub traffic: Vec<TrafficTarget>,
    pub sticky_header: Option<String>,
    pub rate_limit: Option<RateLimitSpec>,
    pub client_rate_limit: Option<RateLimitSpec>,
    pub fallback: Option<Fallback>,
    /// Paths the app is also served at (see [`AppSection::routes`]).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Queues the app is triggered by (see [`AppSection::consumes`]).
    #[serde(default)]
    pub consumes: Vec<String>,
    /// Which nodes of a fleet run it.
    #[serde(default)]
    pub placement: Placement,
    /// Its last change, which orders it against the same app's records on other nodes.
    #[serde(default)]
    pub stamp: Stamp,
    /// Seconds since the Unix epoch.
    pub created_at: u64,
    pub updated_at: u64,
}

fn one_request_per_instance() -> u32 {
    1
}

fn operator_tenant() -> String {
    crate::tenancy::OPERATOR_TENANT.to_string()
}

fn open_before_keys() -> bool {
    true
}

impl AppRecord {
    /// A new app of `tenant`, with no revision yet and all traffic to the newest.
    pub fn new(name: &str, tenant: &str, now: u64) -> Self {
        Self {
            name: name.to_string(),
            tenant: tenant.to_string(),
            public: false,
            latest: 0,
            next_revision: 1,
            traffic: traffic::all_to_latest(),
            sticky_header: None,
            rate_limit: None,
            client_rate_limit: None,
            fallback: None,
            routes: Vec::new(),
            consumes: Vec::new(),
            placement: Placement::default(),
            stamp: Stamp::default(),
            created_at: now,
            updated_at: now,
        }
    }

    /// The app-level part of `spec` applied to this record (traffic, rate limits, fallback).
    pub fn with_policy(&self, spec: &DeploySpec) -> AppRecord {
        let traffic = spec.traffic.clone().unwrap_or_default();
        AppRecord {
            traffic: if traffic.split.is_empty() {
                traffic::all_to_latest()
            } else {
                traffic.split
            },
            sticky_header: traffic.sticky_header.map(|h| h.to_ascii_lowercase()),
            rate_limit: spec.rate_limit.clone(),
            client_rate_limit: spec.client_rate_limit.clone(),
            fallback: spec.fallback.clone(),
            routes: spec.app.routes.clone(),
            consumes: spec.app.consumes.clone(),
            public: spec.app.public.unwrap_or(false),
            placement: spec.placement.clone(),
            ..self.clone()
        }
    }

    /// Checks the app-level settings against the revisions that exist.
    pub fn validate(&self, revisions: &[u32]) -> Result<(), String> {
        traffic::validate(&self.traffic, self.latest, revisions)?;
        self.placement.validate()?;
        if let Some(header) = &self.sticky_header {
            http::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("traffic.sticky_header {header:?} is not a header name"))?;
        }
        for spec in [&self.rate_limit, &self.client_rate_limit]
            .into_iter()
            .flatten()
        {
            spec.validate()?;
        }
        for (index, route) in self.routes.iter().enumerate() {
            validate_route(route)?;
            if self.routes[..index].contains(route) {
                return Err(format!("app.routes: {route:?} is given twice"));
            }
        }
        for (index, queue) in self.consumes.iter().enumerate() {
            if !super::valid_name(queue) {
                return Err(format!(
                    "app.consumes: {queue:?} is not a queue name (the rules of app names)"
                ));
            }
            if self.consumes[..index].contains(queue) {
                return Err(format!("app.consumes: {queue:?} is given twice"));
            }
        }
        if let Some(fallback) = &self.fallback {
            fallback.validate()?;
            if let Some(number) = fallback.revision {
                if !revisions.contains(&number) {
                    return Err(format!("fallback.revision {number} does not exist"));
                }
            }
        }
        Ok(())
    }
}

/// Longest config key and value, and how many keys a revision may have.
const MAX_CONFIG_KEY: usize = 128;
const MAX_CONFIG_VALUE: usize = 64 << 10;
const MAX_CONFIG_KEYS: usize = 256;
/// Most requests one reused instance may serve before it is replaced.
const MAX_REQUESTS_PER_INSTANCE: u32 = 100_000;

/// Whether `key` can name a config value or a secret: 1-128 ASCII letters, digits, `_`, `-`
/// or `.`.
pub fn valid_config_key(key: &str) -> bool {
    (1..=MAX_CONFIG_KEY).contains(&key.len())
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// The settings a revision gets from `spec`: its values, else the node's defaults, checked
/// against the node's ceilings.
pub fn settle(spec: &DeploySpec, limits: &LimitsConfig) -> Result<RevisionSpec, String> {
    let timeout = spec.limits.timeout_secs.unwrap_or(limits.timeout_secs);
    let memory = spec.limits.memory_mib.unwrap_or(limits.memory_mib);
    let body = spec.limits.max_body_bytes.unwrap_or(limits.max_body_bytes);
    if !(1..=3600).contains(&timeout) {
        return Err(format!("limits.timeout_secs must be 1-3600, not {timeout}"));
    }
    if !(1..=limits.max_memory_mib).contains(&memory) {
        return Err(format!(
            "limits.memory_mib must be 1-{} (the node's max_memory_mib), not {memory}",
            limits.max_memory_mib
        ));
    }
    let most = limits.max_buffered_body_bytes.min(1 << 30);
    if body > most {
        return Err(format!(
            "limits.max_body_bytes must be at most {most} (1 GiB, and no more than the node's max_buffered_body_bytes), not {body}"
        ));
    }
    if let Some(cpu) = spec.limits.cpu_ms {
        if !(10..=timeout * 1000).contains(&cpu) {
            return Err(format!(
                "limits.cpu_ms must be 10 to the timeout ({} ms), not {cpu}",
                timeout * 1000
            ));
        }
    }
    let scaling = &spec.scaling;
    if let Some(concurrency) = scaling.max_concurrency {
        if !(1..=limits.max_concurrent_instances).contains(&concurrency) {
            return Err(format!(
                "scaling.max_concurrency must be 1-{} (the node's max_concurrent_instances), not {concurrency}",
                limits.max_concurrent_instances
            ));
        }
    }
    let max_queued = scaling.max_queued.unwrap_or(limits.max_queued_requests);
    if max_queued > limits.max_queued_requests {
        return Err(format!(
            "scaling.max_queued must be at most {} (the node's max_queued_requests), not {max_queued}",
            limits.max_queued_requests
        ));
    }
    let queue_timeout = scaling
        .queue_timeout_secs
        .unwrap_or(limits.queue_timeout_secs);
    if queue_timeout > limits.queue_timeout_secs {
        return Err(format!(
            "scaling.queue_timeout_secs must be at most {} (the node's queue_timeout_secs), not {queue_timeout}",
            limits.queue_timeout_secs
        ));
    }
    let min_instances = scaling.min_instances.unwrap_or(0);
    if min_instances > 1024 {
        return Err(format!(
            "scaling.min_instances must be at most 1024, not {min_instances}"
        ));
    }
    let idle_timeout = scaling
        .idle_timeout_secs
        .unwrap_or(limits.app_idle_timeout_secs);
    if !(1..=86_400 * 30).contains(&idle_timeout) {
        return Err(format!(
            "scaling.idle_timeout_secs must be 1 to 30 days, not {idle_timeout}"
        ));
    }
    let requests_per_instance = scaling.requests_per_instance.unwrap_or(1);
    if !(1..=MAX_REQUESTS_PER_INSTANCE).contains(&requests_per_instance) {
        return Err(format!(
            "scaling.requests_per_instance must be 1-{MAX_REQUESTS_PER_INSTANCE}, not {requests_per_instance}"
        ));
    }
    if requests_per_instance > 1 && limits.max_idle_instances == 0 {
        return Err(
            "scaling.requests_per_instance above 1 needs instances kept between requests, which this node turns off (limits.max_idle_instances = 0)"
                .into(),
        );
    }
    if spec.config.len() > MAX_CONFIG_KEYS {
        return Err(format!("config may hold at most {MAX_CONFIG_KEYS} keys"));
    }
    for (key, value) in &spec.config {
        if !valid_config_key(key) {
            return Err(format!(
                "config key {key:?}: use 1-{MAX_CONFIG_KEY} ASCII letters, digits, '_', '-' or '.'"
            ));
        }
        if value.len() > MAX_CONFIG_VALUE {
            return Err(format!(
                "config value of {key:?} is longer than {MAX_CONFIG_VALUE} bytes"
            ));
        }
    }
    for host in &spec.outbound.allowed_hosts {
        super::outbound::validate_allowed_host(host)?;
    }
    if let Some(cache) = &spec.cache {
        if !(1..=86_400).contains(&cache.ttl_secs) {
            return Err(format!(
                "cache.ttl_secs must be 1-86400, not {}",
                cache.ttl_secs
            ));
        }
        if !(1..=64 << 20).contains(&cache.max_entry_bytes) {
            return Err(format!(
                "cache.max_entry_bytes must be 1 to 64 MiB, not {}",
                cache.max_entry_bytes
            ));
        }
    }
    let mut models = Vec::new();
    for model in &spec.app.models {
        if !super::valid_name(model) {
            return Err(format!("app.models: {model:?} is not a model name"));
        }
        if !models.contains(model) {
            models.push(model.clone());
        }
    }
    let mut buckets = Vec::new();
    for bucket in &spec.app.buckets {
        if !crate::kv::valid_bucket(bucket) {
            return Err(format!(
                "app.buckets: {bucket:?} is not a bucket name (1-64 letters, digits, '.', '_' or '-')"
            ));
        }
        if !buckets.contains(bucket) {
            buckets.push(bucket.clone());
        }
    }
    let mut replicated_buckets = Vec::new();
    for bucket in &spec.app.replicated_buckets {
        if !buckets.contains(bucket) {
            return Err(format!(
                "app.replicated_buckets: {bucket:?} is not one of app.buckets"
            ));
        }
        if !replicated_buckets.contains(bucket) {
            replicated_buckets.push(bucket.clone());
        }
    }
    Ok(RevisionSpec {
        timeout_secs: timeout,
        memory_mib: memory,
        max_body_bytes: body,
        cpu_ms: spec.limits.cpu_ms,
        max_concurrency: scaling.max_concurrency,
        max_queued,
        queue_timeout_secs: queue_timeout,
        min_instances,
        idle_timeout_secs: idle_timeout,
        requests_per_instance,
        models,
        native_guest_models: spec.app.native_guest_models,
        buckets: Some(buckets),
        replicated_buckets,
        config: spec.config.clone(),
        allowed_hosts: spec.outbound.allowed_hosts.clone(),
        cache: spec.cache.clone(),
    })
}

/// What changes between two JSON values, one line per leaf: `path: old → new`.
pub fn diff(before: &serde_json::Value, after: &serde_json::Value) -> Vec<String> {
    let mut lines = Vec::new();
    diff_into(&mut lines, String::new(), before, after);
    lines
}

fn diff_into(
    lines: &mut Vec<String>,
    path: String,
    before: &serde_json::Value,
    after: &serde_json::Value,
) {
    use serde_json::Value;
    match (before, after) {
        (Value::Object(a), Value::Object(b)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            for key in keys {
                let inner = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                diff_into(
                    lines,
                    inner,
                    a.get(key).unwrap_or(&Value::Null),
                    b.get(key).unwrap_or(&Value::Null),
                );
            }
        }
        (a, b) if a != b => lines.push(format!("{path}: {a} → {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any limits a deployment sends end within the node's ceilings or are refused.
        #[test]
        fn settled_limits_stay_within_the_ceilings(
            timeout in proptest::option::of(any::<u64>()),
            memory in proptest::option::of(any::<u64>()),
            body in proptest::option::of(any::<u64>()),
            cpu in proptest::option::of(any::<u64>()),
            concurrency in proptest::option::of(any::<u32>()),
            queued in proptest::option::of(any::<u32>()),
            reuse in proptest::option::of(any::<u32>()),
        ) {
            let limits = LimitsConfig::default();
            let spec = DeploySpec {
                limits: LimitsSpec { timeout_secs: timeout, memory_mib: memory, max_body_bytes: body, cpu_ms: cpu },
                scaling: ScalingSpec { max_concurrency: concurrency, max_queued: queued, requests_per_instance: reuse, ..ScalingSpec::default() },
                ..DeploySpec::default()
            };
            if let Ok(settled) = settle(&spec, &limits) {
                prop_assert!((1..=3600).contains(&settled.timeout_secs));
                prop_assert!((1..=limits.max_memory_mib).contains(&settled.memory_mib));
                prop_assert!(settled.max_body_bytes <= limits.max_buffered_body_bytes);
                prop_assert!(settled.cpu_ms.is_none_or(|cpu| cpu <= settled.timeout_secs * 1000));
                prop_assert!(settled.max_concurrency.is_none_or(|c| c >= 1 && c <= limits.max_concurrent_instances));
                prop_assert!(settled.max_queued <= limits.max_queued_requests);
                prop_assert!((1..=MAX_REQUESTS_PER_INSTANCE).contains(&settled.requests_per_instance));
            }
        }
    }

    #[test]
    fn settings_take_the_node_defaults_within_its_ceilings() {
        let limits = LimitsConfig::default();
        let settled = settle(&DeploySpec::default(), &limits).unwrap();
        assert_eq!(
            (
                settled.timeout_secs,
                settled.memory_mib,
                settled.max_body_bytes
            ),
            (30, 128, 16 << 20)
        );
        assert_eq!(settled.min_instances, 0);
        let mut too_much = DeploySpec::default();
        too_much.limits.memory_mib = Some(limits.max_memory_mib + 1);
        assert!(settle(&too_much, &limits)
            .unwrap_err()
            .contains("memory_mib"));
        let mut no_time = DeploySpec::default();
        no_time.limits.timeout_secs = Some(0);
        assert!(settle(&no_time, &limits)
            .unwrap_err()
            .contains("timeout_secs"));
        let mut bad_key = DeploySpec::default();
        bad_key.config.insert("has space".into(), "x".into());
        assert!(settle(&bad_key, &limits)
            .unwrap_err()
            .contains("config key"));
    }

    #[test]
    fn instances_are_reused_only_when_asked_and_the_node_allows_it() {
        let limits = LimitsConfig::default();
        assert_eq!(
            settle(&DeploySpec::default(), &limits)
                .unwrap()
                .requests_per_instance,
            1
        );
        let mut reuse = DeploySpec::default();
        reuse.scaling.requests_per_instance = Some(500);
        assert_eq!(settle(&reuse, &limits).unwrap().requests_per_instance, 500);
        reuse.scaling.requests_per_instance = Some(0);
        assert!(settle(&reuse, &limits)
            .unwrap_err()
            .contains("requests_per_instance must be 1-100000"));
        reuse.scaling.requests_per_instance = Some(2);
        let no_idle = LimitsConfig {
            max_idle_instances: 0,
            ..LimitsConfig::default()
        };
        assert!(settle(&reuse, &no_idle)
            .unwrap_err()
            .contains("limits.max_idle_instances = 0"));
        let old: RevisionSpec = serde_json::from_value({
            let mut value = serde_json::to_value(settle(&reuse, &limits).unwrap()).unwrap();
            value
                .as_object_mut()
                .unwrap()
                .remove("requests_per_instance");
            value
        })
        .unwrap();
        assert_eq!(old.requests_per_instance, 1, "records from before reuse");
    }

    #[test]
    fn a_shorthand_deploy_changes_only_what_it_gives() {
        let limits = LimitsConfig::default();
        let mut first = DeploySpec::default();
        first.config.insert("greeting".into(), "hi".into());
        first.limits.cpu_ms = Some(500);
        first.app.routes = vec!["/greet".into()];
        first.fallback = Some(Fallback {
            status: Some(503),
            ..Fallback::default()
        });
        let revision = settle(&first, &limits).unwrap();
        let record = AppRecord::new("hello", "default", 0).with_policy(&first);
        let mut shorthand = DeploySpec::default();
        shorthand.limits.timeout_secs = Some(7);
        shorthand.config.insert("more".into(), "yes".into());
        let next = DeploySpec::of(&record, &revision).overlay(shorthand);
        let settled = settle(&next, &limits).unwrap();
        assert_eq!(settled.timeout_secs, 7);
        assert_eq!(settled.cpu_ms, Some(500));
        assert_eq!(settled.config.len(), 2);
        let after = record.with_policy(&next);
        assert_eq!(after.routes, record.routes);
        assert_eq!(after.fallback, record.fallback);
        assert_eq!(after.traffic, record.traffic);
        // Nothing given: the same deployment.
        let same = DeploySpec::of(&record, &revision).overlay(DeploySpec::default());
        assert_eq!(settle(&same, &limits).unwrap(), revision);
        assert_eq!(record.with_policy(&same), record);
    }

    #[test]
    fn fallbacks_are_a_revision_or_a_fixed_response() {
        let fixed = Fallback {
            status: Some(503),
            body: Some("busy".into()),
            ..Fallback::default()
        };
        assert!(fixed.validate().is_ok());
        let both = Fallback {
            revision: Some(1),
            ..fixed.clone()
        };
        assert!(both.validate().is_err());
        assert!(Fallback::default().validate().is_err());
        let odd = Fallback {
            status: Some(42),
            ..Fallback::default()
        };
        assert!(odd.validate().is_err());
    }

    #[test]
    fn routes_are_url_paths_outside_the_nodes_own() {
        assert!(validate_route("/").is_ok());
        assert!(validate_route("/chat").is_ok());
        assert!(validate_route("/v2/chat.api").is_ok());
        for bad in [
            "chat",
            "/chat/",
            "//x",
            "/a/../b",
            "/a b",
            "/apps",
            "/apps/x",
            "/v1",
            "/v1/admin/x",
            "/healthz",
            "/metrics",
            "/jobs",
            "/async/x",
            "/dashboard",
            "/openapi.json",
        ] {
            assert!(validate_route(bad).is_err(), "{bad}");
        }
        assert!(route_covers("/chat", "/chat/x"));
        assert!(route_covers("/chat", "/chat"));
        assert!(!route_covers("/chat", "/chatter"));
        assert!(route_covers("/", "/anything"));
    }

    #[test]
    fn the_diff_names_each_changed_leaf() {
        let before =
            serde_json::json!({"limits": {"timeout_secs": 30, "memory_mib": 128}, "config": {}});
        let after = serde_json::json!({"limits": {"timeout_secs": 60, "memory_mib": 128}, "config": {"k": "v"}});
        assert_eq!(
            diff(&before, &after),
            vec!["config.k: null → \"v\"", "limits.timeout_secs: 30 → 60"]
        );
        assert!(diff(&before, &before).is_empty());
    }

    #[test]
    fn an_app_recorded_before_tenants_is_the_operators_and_stays_open() {
        let mut old = serde_json::to_value(AppRecord::new("legacy", "acme", 7)).unwrap();
        let fields = old.as_object_mut().unwrap();
        fields.remove("tenant");
        fields.remove("public");
        let upgraded: AppRecord = serde_json::from_value(old).unwrap();
        assert_eq!(upgraded.tenant, crate::tenancy::OPERATOR_TENANT);
        assert!(upgraded.public);
        assert!(!AppRecord::new("fresh", "acme", 7).public);
    }
}

//! One request's instance: its store state, its limits, and running the component's
//! `wasi:http/incoming-handler` on a request with a deadline. An app that opts into reuse
//! (`scaling.requests_per_instance`) has its instances kept between requests, while they end
//! cleanly, within a node-wide bound ([`IdleInstances`]).

use super::admission::Slot;
use super::app::Revision;
use super::lease::{LeaseCtx, LeaseView};
use super::outgoing::OutgoingPolicy;
use super::output::InstanceLog;
use super::queue::QueueCtx;
use crate::kv::{KvCtx, KvView};
use crate::nn::{NnCtx, NnGrant, NnView};
use crate::telemetry::AppMeter;
use bytes::Bytes;
use http_body_util::Full;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::oneshot::error::TryRecvError;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_config::{WasiConfig, WasiConfigVariables};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::{HostIncomingBody, HostOutgoingBody, HyperOutgoingBody};
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

/// Everything one instance's host functions reach.
pub struct InstanceState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    outgoing: OutgoingPolicy,
    nn: NnCtx,
    kv: KvCtx,
    config: Arc<WasiConfigVariables>,
    limiter: MemoryLimiter,
    /// Epoch ticks (of [`super::engine::EPOCH_TICK`]) of guest code this request may still
    /// run, when its revision has a CPU budget.
    cpu_ticks_left: Option<u64>,
    /// The engine's epoch, and the epoch at the guest's last yield, for the CPU budget.
    epoch: Arc<std::sync::atomic::AtomicU64>,
    last_epoch: u64,
    /// Epoch ticks the guest ran through (its CPU time, metered when the instance goes).
    cpu_ticks_used: u64,
    meter: AppMeter,
    log: InstanceLog,
    lease: LeaseCtx,
    queue: QueueCtx,
}

impl Drop for InstanceState {
    fn drop(&mut self) {
        self.meter_cpu();
    }
}

impl InstanceState {
    /// Meters the guest CPU time not metered yet.
    fn meter_cpu(&mut self) {
        let ticks = std::mem::take(&mut self.cpu_ticks_used);
        if ticks > 0 {
            let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
            self.meter.cpu_used(super::engine::EPOCH_TICK * ticks);
        }
    }

    /// A kept instance takes its next request: that request's id, config and outgoing
    /// policy, and a whole CPU budget and log budget again.
    fn begin_request(
        &mut self,
        spec: &crate::apps::RevisionSpec,
        request_id: &str,
        config: Arc<WasiConfigVariables>,
        outgoing: OutgoingPolicy,
    ) {
        self.log.begin_request(request_id);
        self.config = config;
        self.outgoing = outgoing;
        self.cpu_ticks_left = cpu_budget_ticks(spec);
        self.last_epoch = self.epoch.load(Ordering::Relaxed);
        self.limiter.hit.store(false, Ordering::Relaxed);
    }

    /// Whether the instance may serve another request: not while it holds a part of the
    /// request it answered — the request, its body, the response's outparam or body. A
    /// response body it never finished would keep its client waiting as long as the instance
    /// waits, and a request it kept holds that request's headers and unread body in the
    /// host's memory (componentize-js's `fetch` event handlers keep theirs, and could not
    /// serve a second request anyway).
    fn may_serve_again(&mut self) -> bool {
        !self.table.iter_mut().any(|entry| {
            entry.is::<HostOutgoingBody>()
                || entry.is::<HostResponseOutparam>()
                || entry.is::<HostIncomingRequest>()
                || entry.is::<HostIncomingBody>()
        })
    }
}

/// The CPU budget of one request of a revision with `spec`, in epoch ticks.
fn cpu_budget_ticks(spec: &crate::apps::RevisionSpec) -> Option<u64> {
    spec.cpu_ms
        .map(|ms| ms.div_ceil(super::engine::EPOCH_TICK.as_millis() as u64))
}

/// The instances kept between requests, node-wide (`limits.max_idle_instances`; each holds
/// its memory and a slot of the engine's pool while it waits), in the order they were kept:
/// when the bound is reached, the one that has waited longest goes, whichever app it serves,
/// so an app that was busy once cannot hold every place while others are busy now. Each
/// instance itself waits in its revision ([`Revision::take_idle`]).
pub struct IdleInstances {
    max: usize,
    order: Mutex<IdleOrder>,
}

struct IdleOrder {
    next: u64,
    /// Every kept instance by the number it was kept under, with the revision it waits in.
    kept: std::collections::BTreeMap<u64, Weak<Revision>>,
}

impl IdleInstances {
    pub fn new(max: u32) -> Arc<Self> {
        Arc::new(Self {
            max: max as usize,
            order: Mutex::new(IdleOrder {
                next: 0,
                kept: Default::default(),
            }),
        })
    }

    fn order(&self) -> std::sync::MutexGuard<'_, IdleOrder> {
        self.order
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Instances kept now.
    pub fn kept(&self) -> usize {
        self.order().kept.len()
    }

    /// Keeps an instance of `revision` for its next request, letting the longest-waiting
    /// instances go while the bound is reached. Whatever goes is dropped outside the lock
    /// (dropping a store runs the guest's resources' destructors, and a dropped revision its
    /// own kept instances').
    fn keep(
        self: &Arc<Self>,
        revision: &Arc<Revision>,
        store: Store<InstanceState>,
        proxy: Proxy,
        served: u32,
    ) {
        if self.max == 0 {
            return;
        }
        let mut gone = Vec::new();
        let mut order = self.order();
        while order.kept.len() >= self.max {
            let Some((number, owner)) = order.kept.pop_first() else {
                break;
            };
            if let Some(owner) = owner.upgrade() {
                let instance = owner.remove_idle(number);
                gone.push((owner, instance));
            }
        }
        let number = order.next;
        order.next += 1;
        let instance = IdleInstance {
            store,
            proxy,
            served,
            place: IdlePlace {
                number,
                pool: self.clone(),
            },
        };
        let refused = match revision.keep_idle(instance) {
            Ok(()) => {
                order.kept.insert(number, Arc::downgrade(revision));
                None
            }
            Err(instance) => Some(instance),
        };
        drop(order);
        drop(gone);
        drop(refused);
    }
}

/// One kept instance's place among the [`IdleInstances`], given up when it goes (taken for a
/// request, or dropped).
struct IdlePlace {
    number: u64,
    pool: Arc<IdleInstances>,
}

impl Drop for IdlePlace {
    fn drop(&mut self) {
        self.pool.order().kept.remove(&self.number);
    }
}

/// An instance of a revision that reuses instances, between two of its requests.
pub struct IdleInstance {
    store: Store<InstanceState>,
    proxy: Proxy,
    /// Requests it has served.
    served: u32,
    place: IdlePlace,
}

impl IdleInstance {
    /// The number it was kept under.
    pub fn number(&self) -> u64 {
        self.place.number
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for InstanceState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.outgoing,
        }
    }
}

/// Caps each linear memory of an instance and remembers whether the cap was hit, so that a
/// guest that dies of it is reported as such.
struct MemoryLimiter {
    max_bytes: usize,
    hit: Arc<AtomicBool>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Adds every interface a component may import to the node's linker: WASI p2 (sandboxed per
/// store), wasi:http, wasi:nn, wasi:keyvalue, wasi:config, wasi:logging, leases and queues.
pub fn build_linker(engine: &wasmtime::Engine) -> wasmtime::Result<Linker<InstanceState>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
    crate::nn::add_to_linker(&mut linker, |s: &mut InstanceState| NnView {
        ctx: &mut s.nn,
        table: &mut s.table,
    })?;
    crate::kv::add_to_linker(&mut linker, |s: &mut InstanceState| KvView {
        ctx: &mut s.kv,
        table: &mut s.table,
    })?;
    wasmtime_wasi_config::add_to_linker(&mut linker, |s: &mut InstanceState| {
        WasiConfig::new(&s.config)
    })?;
    super::output::add_to_linker(&mut linker, |s: &mut InstanceState| &mut s.log)?;
    super::lease::add_to_linker(&mut linker, |s: &mut InstanceState| LeaseView {
        ctx: &s.lease,
        table: &mut s.table,
    })?;
    super::queue::add_to_linker(&mut linker, |s: &mut InstanceState| &mut s.queue)?;
    Ok(linker)
}

/// Why an invocation failed; the API maps each to a status.
#[derive(Debug, thiserror::Error)]
pub enum InvokeError {
    #[error("the app did not answer within its timeout of {0} s")]
    Timeout(u64),
    #[error("the app hit its memory limit of {limit_mib} MiB and was stopped ({detail})")]
    MemoryLimit { limit_mib: u64, detail: String },
    #[error("the app trapped: {0}")]
    Trap(String),
    #[error("the app finished without sending a response")]
    NoResponse,
    #[error("the app reported an error instead of a response: {0}")]
    AppError(String),
    #[error("could not start the app: {0}")]
    Instantiate(String),
    #[error("the node is overloaded: {reason}; retry in {retry_after_secs} s")]
    Overloaded {
        reason: String,
        retry_after_secs: u64,
    },
    #[error("the app used up its CPU budget of {0} ms for one request")]
    CpuLimit(u64),
    #[error("{0}")]
    NotFound(String),
    #[error("{reason}; retry in {retry_after_secs} s")]
    RateLimited {
        reason: String,
        retry_after_secs: u64,
    },
    #[error(
        "calls between apps went {0} deep, deeper than the node allows (limits.max_call_depth)"
    )]
    TooDeep(u32),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unusable(String),
    #[error("{0}")]
    NotPlaced(String),
}

impl InvokeError {
    /// The HTTP status a client gets for this error.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            InvokeError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            InvokeError::MemoryLimit { .. }
            | InvokeError::Trap(_)
            | InvokeError::NoResponse
            | InvokeError::AppError(_)
            | InvokeError::CpuLimit(_)
            | InvokeError::Unusable(_) => StatusCode::INTERNAL_SERVER_ERROR,
            InvokeError::Instantiate(_)
            | InvokeError::Overloaded { .. }
            | InvokeError::NotPlaced(_) => StatusCode::SERVICE_UNAVAILABLE,
            InvokeError::NotFound(_) => StatusCode::NOT_FOUND,
            InvokeError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            InvokeError::TooDeep(_) => StatusCode::LOOP_DETECTED,
            InvokeError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// The stable, machine-readable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            InvokeError::Timeout(_) => "timeout",
            InvokeError::MemoryLimit { .. } => "memory_limit",
            InvokeError::Trap(_) => "trap",
            InvokeError::NoResponse => "no_response",
            InvokeError::AppError(_) => "app_error",
            InvokeError::Instantiate(_) => "instantiate_failed",
            InvokeError::Overloaded { .. } => "overloaded",
            InvokeError::CpuLimit(_) => "cpu_limit",
            InvokeError::NotFound(_) => "app_not_found",
            InvokeError::RateLimited { .. } => "rate_limited",
            InvokeError::TooDeep(_) => "call_too_deep",
            InvokeError::TooLarge(_) => "body_too_large",
            InvokeError::Unusable(_) => "revision_unusable",
            InvokeError::NotPlaced(_) => "not_placed",
        }
    }

    /// Seconds the client should wait before it retries (`Retry-After`), when that helps.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            InvokeError::Overloaded {
                retry_after_secs, ..
            }
            | InvokeError::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            InvokeError::NotPlaced(_) => Some(1),
            _ => None,
        }
    }

    /// Whether the app shed the request or failed on it: what its fallback answers.
    pub fn is_shedding_or_failure(&self) -> bool {
        !matches!(
            self,
            InvokeError::NotFound(_)
                | InvokeError::RateLimited { .. }
                | InvokeError::TooDeep(_)
                | InvokeError::TooLarge(_)
                | InvokeError::NotPlaced(_)
        )
    }
}

/// The error a guest is stopped with when it runs past its CPU budget.
#[derive(Debug, thiserror::Error)]
#[error("the request's CPU budget is used up")]
struct CpuBudgetSpent;

/// What a request's instance is made from: the revision's prepared component, the config it
/// reads and the outgoing calls it may make.
pub struct Launch {
    pub pre: ProxyPre<InstanceState>,
    pub revision: Arc<Revision>,
    pub config: Arc<WasiConfigVariables>,
    pub outgoing: OutgoingPolicy,
}

/// Resources (handles to tensors, streams, headers, …) one instance may hold at once; past it
/// creating one more fails for the guest instead of growing the host's table.
const MAX_RESOURCES: usize = 65_536;

/// Per-node resources an instance is given.
pub struct InstanceResources {
    pub store: crate::store::Store,
    pub kv_usage: Arc<crate::kv::KvUsage>,
    pub models: Arc<crate::nn::ModelRegistry>,
    pub max_guest_model_bytes: u64,
    /// The engine's epoch, as its ticker counts it.
    pub epoch: Arc<std::sync::atomic::AtomicU64>,
    pub telemetry: Arc<crate::telemetry::Telemetry>,
    /// Every app's leases.
    pub leases: Arc<super::lease::Leases>,
    /// This node's id in its cluster ("" outside one): what its changes (apps, replicated
    /// key-value writes) are stamped with.
    pub node_id: Arc<str>,
    /// Instances kept between requests, over all apps.
    pub idle: Arc<IdleInstances>,
}

/// A fresh store for one instance of `revision`, with its limits and its yield-on-tick policy.
fn new_store(
    pre: &ProxyPre<InstanceState>,
    revision: &Revision,
    resources: &InstanceResources,
    memory_hit: Arc<AtomicBool>,
    config: Arc<WasiConfigVariables>,
    outgoing: OutgoingPolicy,
    request_id: &str,
) -> Store<InstanceState> {
    let record = &revision.record;
    let spec = &record.spec;
    let log = InstanceLog::new(
        resources.telemetry.logs.clone(),
        &record.app,
        record.number,
        request_id,
    );
    let (stdout, stderr) = log.streams();
    let meter = AppMeter::new(resources.telemetry.clone(), &revision.tenant, &record.app);
    let queue = QueueCtx::new(outgoing.runtime(), &record.app, &revision.tenant);
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_RESOURCES);
    let state = InstanceState {
        table,
        wasi: WasiCtx::builder()
            .stdout(stdout)
            .stderr(stderr)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .env("TENSORLET_APP", &record.app)
            .env("TENSORLET_REVISION", record.number.to_string())
            .env("TENSORLET_MODELS", spec.models.join(","))
            .build(),
        http: WasiHttpCtx::new(),
        outgoing,
        nn: NnCtx::new(
            resources.models.clone(),
            NnGrant {
                tenant: revision.tenant.clone(),
                models: spec.models.clone(),
                max_guest_model_bytes: resources.max_guest_model_bytes,
                max_host_bytes: spec.memory_mib << 20,
                native_guest_models: spec.native_guest_models,
            },
            memory_hit.clone(),
            meter.clone(),
        ),
        kv: KvCtx::new(
            resources.store.clone(),
            &crate::tenancy::scoped_name(&revision.tenant, &record.app),
            &resources.kv_usage,
            crate::kv::KvGrant {
                allowed: spec.buckets.clone(),
                replicated: spec.replicated_buckets.clone(),
                node: resources.node_id.clone(),
            },
        ),
        config,
        limiter: MemoryLimiter {
            max_bytes: (spec.memory_mib as usize) << 20,
            hit: memory_hit,
        },
        cpu_ticks_left: cpu_budget_ticks(spec),
        last_epoch: resources.epoch.load(Ordering::Relaxed),
        epoch: resources.epoch.clone(),
        cpu_ticks_used: 0,
        meter,
        log,
        lease: LeaseCtx::new(resources.leases.clone(), &record.app),
        queue,
    };
    let mut store = Store::new(pre.engine(), state);
    store.limiter(|s| &mut s.limiter);
    // Yield to the reactor at every epoch tick so one busy guest cannot starve others; the
    // deadline itself is enforced by the caller's timeout. A tick that finds the guest
    // running also spends its CPU budget.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|mut context| {
        let state = context.data_mut();
        let epoch = state.epoch.load(Ordering::Relaxed);
        // A tick counts when the guest ran through it: this check comes one epoch after the
        // last yield. After a wait in the host (a timer, I/O, inference) across more ticks,
        // the first check back in guest code is not charged.
        let ran = epoch == state.last_epoch + 1;
        state.last_epoch = epoch;
        state.cpu_ticks_used += u64::from(ran);
        if let (Some(left), true) = (&mut state.cpu_ticks_left, ran) {
            if *left == 0 {
                return Err(CpuBudgetSpent.into());
            }
            *left -= 1;
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store
}

/// Creates an instance of `revision` and drops it without calling it: the cost every request
/// pays before its handler runs. Used by the benchmark.
pub async fn instantiate_only(
    pre: &ProxyPre<InstanceState>,
    revision: &Revision,
    resources: &InstanceResources,
) -> Result<(), InvokeError> {
    let mut store = new_store(
        pre,
        revision,
        resources,
        Arc::new(AtomicBool::new(false)),
        Arc::new(WasiConfigVariables::new()),
        OutgoingPolicy::denied(),
        "",
    );
    pre.instantiate_async(&mut store)
        .await
        .map(drop)
        .map_err(|e| InvokeError::Instantiate(format!("{e:#}")))
}

/// Keeps an instance that answered its request cleanly for its revision's next request, when
/// the revision reuses instances, it has served fewer than their count, it did not hit its
/// memory limit and [may serve again](InstanceState::may_serve_again); else drops it.
fn keep_if_clean(
    mut store: Store<InstanceState>,
    proxy: Proxy,
    served: u32,
    revision: &Arc<Revision>,
    idle: &Arc<IdleInstances>,
) {
    let state = store.data_mut();
    state.meter_cpu();
    if served < revision.record.spec.requests_per_instance
        && !state.limiter.hit.load(Ordering::Relaxed)
        && state.may_serve_again()
    {
        idle.keep(revision, store, proxy, served);
    }
}

/// What an instance's run ends with: `Err` if it ran past its deadline.
type Outcome = Result<wasmtime::Result<()>, tokio::time::error::Elapsed>;

/// A running instance, polled to make progress.
type RunningInstance = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// Runs one request in a fresh instance made from `launch` and returns its response.
///
/// The instance runs on the caller's task, not a task of its own: until the response head is
/// set it is polled here, and after that by the response body, so a streamed body is produced
/// as the client reads it and no cross-thread wake-up sits between guest and connection. The
/// instance lives until its body is complete or dropped (a client that goes away stops it), or
/// until its deadline, which a timer enforces even when nobody polls the body (a client that
/// never reads). `permit` (its admission slot) is given back with the instance.
pub async fn invoke(
    launch: Launch,
    resources: &InstanceResources,
    request: http::Request<Full<Bytes>>,
    permit: Slot,
) -> Result<http::Response<InstanceBody>, InvokeError> {
    let Launch {
        pre,
        revision,
        config,
        outgoing,
    } = launch;
    let request_id = request
        .headers()
        .get(crate::telemetry::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let reuses = revision.record.spec.requests_per_instance > 1;
    let (mut store, kept_proxy, served) = match reuses.then(|| revision.take_idle()).flatten() {
        Some(IdleInstance {
            mut store,
            proxy,
            served,
            ..
        }) => {
            store
                .data_mut()
                .begin_request(&revision.record.spec, &request_id, config, outgoing);
            store.set_epoch_deadline(1);
            (store, Some(proxy), served)
        }
        None => {
            let store = new_store(
                &pre,
                &revision,
                resources,
                Arc::new(AtomicBool::new(false)),
                config,
                outgoing,
                &request_id,
            );
            (store, None, 0)
        }
    };
    let memory_hit = store.data().limiter.hit.clone();

    let (sender, mut receiver) = tokio::sync::oneshot::channel();
    let scheme = if request.uri().scheme() == Some(&http::uri::Scheme::HTTP) {
        Scheme::Http
    } else {
        Scheme::Https
    };
    let incoming = store
        .data_mut()
        .http()
        .new_incoming_request(scheme, request)
        .map_err(|e| InvokeError::Instantiate(e.to_string()))?;
    let outparam = store
        .data_mut()
        .http()
        .new_response_outparam(sender)
        .map_err(|e| InvokeError::Instantiate(e.to_string()))?;

    let timeout_secs = revision.record.spec.timeout_secs;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_secs);
    let (owner, idle) = (revision.clone(), resources.idle.clone());
    let mut instance: RunningInstance = Box::pin(async move {
        let run = async {
            let proxy = match kept_proxy {
                Some(proxy) => proxy,
                None => pre.instantiate_async(&mut store).await?,
            };
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, outparam)
                .await?;
            Ok(proxy)
        };
        match tokio::time::timeout_at(deadline, run).await {
            Ok(Ok(proxy)) => {
                keep_if_clean(store, proxy, served + 1, &owner, &idle);
                Ok(Ok(()))
            }
            failed => {
                drop(store);
                failed.map(|run| run.map(drop))
            }
        }
    });

    // The head can only be set while the instance runs, that is within its poll, so it is
    // looked for after each poll instead of waited for: a task woken while it runs is
    // scheduled again, and that wakes another worker thread for nothing on every request.
    let mut finished = None;
    let head = std::future::poll_fn(|cx| {
        if let Poll::Ready(outcome) = instance.as_mut().poll(cx) {
            finished = Some(outcome);
        }
        match receiver.try_recv() {
            Err(TryRecvError::Empty) if finished.is_none() => Poll::Pending,
            head => Poll::Ready(head),
        }
    })
    .await;
    let Ok(head) = head else {
        return Err(match finished {
            None | Some(Ok(Ok(()))) => InvokeError::NoResponse,
            Some(Err(_elapsed)) => InvokeError::Timeout(timeout_secs),
            Some(Ok(Err(error))) => classify(error, memory_hit.load(Ordering::Relaxed), &revision),
        });
    };
    match head {
        Ok(response) => {
            let still_running = finished.is_none().then_some(instance);
            let running = Arc::new(Mutex::new(Running {
                permit: still_running.is_some().then_some(permit),
                instance: still_running,
                cut_short: finished.and_then(failure_of),
                reaper: None,
            }));
            let mut state = lock(&running);
            if state.instance.is_some() {
                let reaper = tokio::spawn(reap_at(deadline, Arc::downgrade(&running)));
                state.reaper = Some(reaper.abort_handle());
            }
            drop(state);
            Ok(response.map(|body| InstanceBody { body, running }))
        }
        Err(code) => Err(InvokeError::AppError(format!("{code:?}"))),
    }
}

/// The instance behind a response body, until it finishes or is reaped.
struct Running {
    instance: Option<RunningInstance>,
    permit: Option<Slot>,
    /// Why the body ends in an error at its next frame: the instance failed after it set its
    /// response, or it was dropped at its deadline.
    cut_short: Option<String>,
    /// The timer task that enforces the deadline; stopped once the instance is gone.
    reaper: Option<tokio::task::AbortHandle>,
}

impl Running {
    /// The instance finished: its slot goes back, and its deadline no longer matters.
    fn finish(&mut self) {
        self.instance = None;
        self.permit = None;
        if let Some(reaper) = self.reaper.take() {
            reaper.abort();
        }
    }
}

/// The lock if it is free now.
fn try_lock(running: &Mutex<Running>) -> Option<std::sync::MutexGuard<'_, Running>> {
    match running.try_lock() {
        Ok(state) => Some(state),
        Err(std::sync::TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

fn lock(running: &Mutex<Running>) -> std::sync::MutexGuard<'_, Running> {
    running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// At the app's deadline, drops the instance behind a body nobody has finished reading, with
/// its admission slot (and so its memory, models' sequences and compute).
async fn reap_at(deadline: tokio::time::Instant, running: Weak<Mutex<Running>>) {
    tokio::time::sleep_until(deadline).await;
    let Some(running) = running.upgrade() else {
        return;
    };
    // The body may be polling the guest under the lock right now (until its next yield):
    // wait for it without blocking this worker thread.
    let mut state = loop {
        if let Some(state) = try_lock(&running) {
            break state;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (instance, permit) = {
        if state.instance.is_none() {
            return;
        }
        state.cut_short = Some(TIMED_OUT_SENDING.to_string());
        state.reaper = None;
        (state.instance.take(), state.permit.take())
    };
    drop(state);
    // Dropped outside the lock: dropping a store runs destructors of the guest's resources.
    drop(instance);
    drop(permit);
}

const TIMED_OUT_SENDING: &str = "the app ran past its timeout while sending its response";

/// What went wrong with an instance that ended after it set its response, if anything.
fn failure_of(outcome: Outcome) -> Option<String> {
    match outcome {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(format!(
            "the app failed while sending its response: {error:#}"
        )),
        Err(_elapsed) => Some(TIMED_OUT_SENDING.to_string()),
    }
}

/// A response body that also drives the instance producing it.
pub struct InstanceBody {
    body: HyperOutgoingBody,
    running: Arc<Mutex<Running>>,
}

impl Drop for InstanceBody {
    /// The client is done with the response (or gone): the instance, if it still runs, goes
    /// now, with its slot and its deadline's timer.
    fn drop(&mut self) {
        let mut running = lock(&self.running);
        let instance = running.instance.take();
        running.finish();
        drop(running);
        drop(instance);
    }
}

impl hyper::body::Body for InstanceBody {
    type Data = Bytes;
    type Error = wasmtime_wasi_http::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let failure = {
            let mut running = lock(&self.running);
            if let Some(instance) = running.instance.as_mut() {
                if let Poll::Ready(outcome) = instance.as_mut().poll(cx) {
                    running.finish();
                    running.cut_short = failure_of(outcome);
                }
            }
            running.cut_short.take()
        };
        if let Some(message) = failure {
            tracing::warn!(%message, "response body cut short");
            return Poll::Ready(Some(Err(wasmtime_wasi_http::Error::InternalError(Some(
                message,
            )))));
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        let running = lock(&self.running);
        running.instance.is_none() && running.cut_short.is_none() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn classify(error: wasmtime::Error, memory_hit: bool, revision: &Revision) -> InvokeError {
    if error.downcast_ref::<CpuBudgetSpent>().is_some() {
        return InvokeError::CpuLimit(revision.record.spec.cpu_ms.unwrap_or_default());
    }
    let limit_mib = revision.record.spec.memory_mib;
    let detail = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        // A host function's error (a refused wasi-nn tensor) is the root of the chain; the
        // layers above it are wasm backtraces.
        None => error
            .root_cause()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    };
    if memory_hit {
        InvokeError::MemoryLimit { limit_mib, detail }
    } else {
        InvokeError::Trap(detail)
    }
}

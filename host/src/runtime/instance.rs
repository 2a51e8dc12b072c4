//! One request's instance: its store state, its limits, and running the component's
//! `wasi:http/incoming-handler` on a request with a deadline.

use super::App;
use crate::kv::{KvCtx, KvView};
use crate::nn::{NnCtx, NnView};
use bytes::Bytes;
use http_body_util::Full;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::http::types::{ErrorCode, Scheme};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

/// Everything one instance's host functions reach.
pub struct InstanceState {
    table: ResourceTable,
    wasi: WasiCtx,
    http: WasiHttpCtx,
    outgoing: OutgoingPolicy,
    nn: NnCtx,
    kv: KvCtx,
    limiter: MemoryLimiter,
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

/// Outgoing HTTP from apps. Until apps can declare the hosts they may reach, none is allowed.
struct OutgoingPolicy;

impl WasiHttpHooks for OutgoingPolicy {
    fn send_request(
        &mut self,
        _request: http::Request<wasmtime_wasi_http::WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
    ) -> Box<
        dyn Future<
                Output = wasmtime_wasi_http::Result<(
                    http::Response<wasmtime_wasi_http::WasiBody>,
                    Box<dyn Future<Output = Result<(), wasmtime_wasi_http::Error>> + Send>,
                )>,
            > + Send,
    > {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
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
/// store), wasi:http, wasi:nn and wasi:keyvalue.
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
}

/// Per-node resources an instance is given.
pub struct InstanceResources {
    pub store: crate::store::Store,
    pub models: Arc<crate::nn::ModelRegistry>,
    pub max_guest_model_bytes: u64,
}

/// A fresh store for one instance of `app`, with its limits and its yield-on-tick policy.
fn new_store(
    app: &App,
    resources: &InstanceResources,
    memory_hit: Arc<AtomicBool>,
) -> Store<InstanceState> {
    let state = InstanceState {
        table: ResourceTable::new(),
        wasi: WasiCtx::builder()
            .inherit_stdout()
            .inherit_stderr()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build(),
        http: WasiHttpCtx::new(),
        outgoing: OutgoingPolicy,
        nn: NnCtx::new(resources.models.clone(), resources.max_guest_model_bytes),
        kv: KvCtx::new(resources.store.clone(), &app.record.name),
        limiter: MemoryLimiter {
            max_bytes: (app.record.memory_mib as usize) << 20,
            hit: memory_hit,
        },
    };
    let mut store = Store::new(app.pre.engine(), state);
    store.limiter(|s| &mut s.limiter);
    // Yield to the reactor at every epoch tick so one busy guest cannot starve others; the
    // deadline itself is enforced by the caller's timeout.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
    store
}

/// Creates an instance of `app` and drops it without calling it: the cost every request pays
/// before its handler runs. Used by the benchmark.
pub async fn instantiate_only(app: &App, resources: &InstanceResources) -> Result<(), InvokeError> {
    let mut store = new_store(app, resources, Arc::new(AtomicBool::new(false)));
    app.pre
        .instantiate_async(&mut store)
        .await
        .map(drop)
        .map_err(|e| InvokeError::Instantiate(format!("{e:#}")))
}

/// Runs `app` on one request in a fresh instance and returns its response. The instance may
/// keep running after the response head is returned, to stream the body, until its deadline.
pub async fn invoke(
    app: Arc<App>,
    resources: &InstanceResources,
    request: http::Request<Full<Bytes>>,
) -> Result<http::Response<HyperOutgoingBody>, InvokeError> {
    let memory_hit = Arc::new(AtomicBool::new(false));
    let mut store = new_store(&app, resources, memory_hit.clone());

    let (sender, receiver) = tokio::sync::oneshot::channel();
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

    let timeout_secs = app.record.timeout_secs;
    let pre = app.pre.clone();
    let task = tokio::spawn(async move {
        let run = async {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, incoming, outparam)
                .await
        };
        let outcome = tokio::time::timeout(Duration::from_secs(timeout_secs), run).await;
        drop(store);
        outcome
    });

    match receiver.await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(code)) => Err(InvokeError::AppError(describe_error_code(&code))),
        Err(_) => Err(match task.await {
            Err(join) => InvokeError::Trap(join.to_string()),
            Ok(Err(_elapsed)) => InvokeError::Timeout(timeout_secs),
            Ok(Ok(Ok(()))) => InvokeError::NoResponse,
            Ok(Ok(Err(error))) => classify(
                error,
                memory_hit.load(Ordering::Relaxed),
                app.record.memory_mib,
            ),
        }),
    }
}

fn describe_error_code(code: &ErrorCode) -> String {
    format!("{code:?}")
}

fn classify(error: wasmtime::Error, memory_hit: bool, limit_mib: u64) -> InvokeError {
    let detail = match error.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => format!("{error:#}")
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

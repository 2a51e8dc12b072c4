//! The host implementation of the `wasi:nn` WIT interfaces.

use super::backend::{
    self, BackendError, CancelOnDrop, Cancellation, ChoiceError, ExecutionContext, Graph, Tensor,
};
use super::bindings::wasi::nn::{errors, graph, inference, tensor};
use super::registry::ModelError;
use super::{Encoding, NnView};
use std::sync::{Arc, Mutex};
use wasmtime::component::Resource;

/// The value behind a `graph` resource: a loaded model, shared, and the bytes it holds for
/// its instance (a model the guest loaded from bytes; 0 for registered models).
pub struct GraphResource {
    graph: Arc<dyn Graph>,
    held_bytes: usize,
    /// The model's name, for metering (models passed as bytes share one).
    model: Arc<str>,
}

/// What models a guest passed as bytes are metered as.
const GUEST_LOADED_MODEL: &str = "(guest-loaded)";

/// The value behind a `graph-execution-context` resource. The mutex is per context, never
/// per graph: it only lets `compute` move the context to a blocking thread.
pub struct ContextResource {
    context: Arc<Mutex<Box<dyn ExecutionContext>>>,
    takes_compute_slots_itself: bool,
    model: Arc<str>,
    /// Completion tokens of the current generation already metered.
    completion_metered: u64,
}

/// The value behind an `error` resource.
#[derive(Debug)]
pub struct NnError {
    code: errors::ErrorCode,
    message: String,
}

type NnResult<T> = wasmtime::Result<Result<Resource<T>, Resource<NnError>>>;

impl NnView<'_> {
    fn fail<T>(
        &mut self,
        code: errors::ErrorCode,
        message: impl Into<String>,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        let message = message.into();
        tracing::debug!(?code, %message, "wasi-nn error returned to guest");
        Ok(Err(self.table.push(NnError { code, message })?))
    }

    fn fail_backend<T>(
        &mut self,
        error: BackendError,
    ) -> wasmtime::Result<Result<T, Resource<NnError>>> {
        let code = match error {
            BackendError::InvalidModel(_) => errors::ErrorCode::InvalidEncoding,
            BackendError::InvalidArgument(_) => errors::ErrorCode::InvalidArgument,
            BackendError::Unsupported(_) => errors::ErrorCode::UnsupportedOperation,
            BackendError::Runtime(_) => errors::ErrorCode::RuntimeError,
        };
        self.fail(code, error.to_string())
    }
}

/// The backend that takes models passed as bytes unless the app may use native ones.
const PURE_RUST_BACKEND: &str = "tract";

impl graph::Host for NnView<'_> {
    async fn load(
        &mut self,
        builders: Vec<graph::GraphBuilder>,
        encoding: graph::GraphEncoding,
        target: graph::ExecutionTarget,
    ) -> NnResult<GraphResource> {
        let size: u64 = builders.iter().map(|b| b.len() as u64).sum();
        if size > self.ctx.grant.max_guest_model_bytes {
            let limit = self.ctx.grant.max_guest_model_bytes;
            return self.fail(
                errors::ErrorCode::TooLarge,
                format!("a model passed as bytes may be at most {limit} bytes (this one is {size}); register it with `tensorlet model add` and use load-by-name"),
            );
        }
        if builders.len() != 1 || builders[0].is_empty() {
            return self.fail(
                errors::ErrorCode::InvalidArgument,
                "load takes exactly one non-empty graph builder",
            );
        }
        let encoding = match Encoding::from_wasi(encoding, &builders[0]) {
            Ok(encoding) => encoding,
            Err(error) => return self.fail(errors::ErrorCode::InvalidEncoding, error),
        };
        // Guest bytes reach a native library only with the app's permission: the pure-Rust
        // backend is the one whose parser a hostile model cannot turn into memory corruption.
        let backend = (!self.ctx.grant.native_guest_models).then_some(PURE_RUST_BACKEND);
        // Choosing may start a runtime-linked backend (its first use): blocking work.
        let backends = self.ctx.models.backends().clone();
        let chosen =
            tokio::task::spawn_blocking(move || backends.choose(encoding, backend, target)).await?;
        let choice = match chosen {
            Ok(choice) => choice,
            Err(error @ ChoiceError::Unavailable(_)) => {
                return self.fail(errors::ErrorCode::UnsupportedOperation, error.to_string())
            }
            Err(error @ ChoiceError::UnknownBackend { .. }) => {
                return self.fail(
                    errors::ErrorCode::Security,
                    format!("{error}: a model passed as bytes goes to {PURE_RUST_BACKEND} unless the app is deployed with --native-guest-models"),
                )
            }
            Err(error) => return self.fail(errors::ErrorCode::InvalidEncoding, error.to_string()),
        };
        let (backend, target) = (choice.backend, choice.target);
        let bytes = builders.into_iter().next().unwrap_or_default();
        let held_bytes = bytes.len();
        self.ctx.hold(held_bytes)?;
        // Parsing and optimising a model is CPU work: keep it off the reactor, and take a
        // compute slot for it like any inference.
        let slot = self.ctx.models.backends().compute_slots().acquire().await;
        let loaded = self
            .ctx
            .models
            .backends()
            .threads()
            .spawn(move || {
                let _slot = slot;
                backend::catch_panic("load", || backend.load(&bytes, target))
            })
            .await?;
        match loaded {
            Ok(graph) => Ok(Ok(self.table.push(GraphResource {
                graph,
                held_bytes,
                model: GUEST_LOADED_MODEL.into(),
            })?)),
            Err(error) => {
                self.ctx.release(held_bytes);
                self.fail_backend(error)
            }
        }
    }

    fn load_by_name(&mut self, name: String) -> NnResult<GraphResource> {
        if !self.ctx.grant.models.contains(&name) {
            return self.fail(
                errors::ErrorCode::Security,
                format!("this app did not declare model {name:?}: deploy it with `--model {name}`"),
            );
        }
        match self.ctx.models.graph_for(&name, &self.ctx.grant.tenant) {
            Ok(graph) => Ok(Ok(self.table.push(GraphResource {
                graph,
                held_bytes: 0,
                model: name.into(),
            })?)),
            Err(error @ ModelError::NotFound(_)) => self.fail(
                errors::ErrorCode::NotFound,
                format!("{error}: `tensorlet models` lists the registered ones"),
            ),
            Err(error) => self.fail(errors::ErrorCode::RuntimeError, error.to_string()),
        }
    }
}

impl graph::HostGraph for NnView<'_> {
    fn init_execution_context(
        &mut self,
        graph: Resource<GraphResource>,
    ) -> NnResult<ContextResource> {
        let graph = self.table.get(&graph)?;
        let model = graph.model.clone();
        match graph.graph.init_execution_context() {
            Ok(context) => Ok(Ok(self.table.push(ContextResource {
                model,
                completion_metered: 0,
                takes_compute_slots_itself: context.takes_compute_slots_itself(),
                context: Arc::new(Mutex::new(context)),
            })?)),
            Err(error) => self.fail_backend(error),
        }
    }

    fn drop(&mut self, graph: Resource<GraphResource>) -> wasmtime::Result<()> {
        let graph = self.table.delete(graph)?;
        self.ctx.release(graph.held_bytes);
        Ok(())
    }
}

impl inference::Host for NnView<'_> {}

impl inference::HostGraphExecutionContext for NnView<'_> {
    async fn compute(
        &mut self,
        context: Resource<ContextResource>,
        inputs: Vec<inference::NamedTensor>,
    ) -> wasmtime::Result<Result<Vec<inference::NamedTensor>, Resource<NnError>>> {
        let starts_anew = !inputs.is_empty();
        let mut tensors = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            let tensor = self.table.delete(tensor)?;
            self.ctx.release(tensor.data.len());
            tensors.push((name, tensor));
        }
        let context_handle = context;
        let resource = self.table.get(&context_handle)?;
        let context = resource.context.clone();
        // Each inference uses `nn.threads` threads; running more at once than the cores can
        // hold makes all of them crawl (spinning thread pools), so computes take turns.
        let slot = if resource.takes_compute_slots_itself {
            None
        } else {
            Some(self.ctx.models.backends().compute_slots().acquire().await)
        };
        // Inference blocks for as long as the model runs: it goes to the blocking pool so the
        // reactor keeps serving other requests, other apps and /healthz meanwhile. That work
        // cannot be aborted from here: if this future is dropped (the request went away), the
        // guard tells the computation, which then does not start or stops at its next step.
        let cancel = Cancellation::default();
        let cancel_on_drop = CancelOnDrop::new(cancel.clone());
        let running = self.ctx.models.backends().running_computes().clone();
        let span = tracing::info_span!("compute", model = %resource.model);
        let (meter, model) = (self.ctx.meter.clone(), resource.model.clone());
        let outputs = self
            .ctx
            .models
            .backends()
            .threads()
            .spawn(move || {
                let _span = span.entered();
                let _running = running.enter();
                // The slot is held until the computation ends, even if the guest is gone.
                let _slot = slot;
                cancel.check()?;
                let mut context = context
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                let started = std::time::Instant::now();
                let outputs = backend::catch_panic("compute", || context.compute(tensors, &cancel));
                // Metered here, whatever the outcome and whether or not the guest still waits.
                meter.model_computed(&model, started.elapsed());
                outputs
            })
            .await?;
        cancel_on_drop.disarm();
        match outputs {
            Ok(outputs) => {
                self.meter_tokens(&context_handle, starts_anew, &outputs)?;
                let mut named = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    self.ctx.hold(tensor.data.len())?;
                    named.push((name, self.table.push(tensor)?));
                }
                Ok(Ok(named))
            }
            Err(error) => self.fail_backend(error),
        }
    }

    fn drop(&mut self, context: Resource<ContextResource>) -> wasmtime::Result<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl NnView<'_> {
    /// Meters the tokens of one compute of `context`, for a model that reports `usage` (LLMs,
    /// embeddings). A compute with inputs starts a new generation; later ones report the
    /// generation's running total of completion tokens, of which only the new ones count.
    fn meter_tokens(
        &mut self,
        context: &Resource<ContextResource>,
        starts_anew: bool,
        outputs: &[backend::NamedTensor],
    ) -> wasmtime::Result<()> {
        let usage = outputs
            .iter()
            .find(|(name, _)| name == "usage")
            .and_then(|(_, tensor)| serde_json::from_slice::<ReportedUsage>(&tensor.data).ok());
        let resource = self.table.get_mut(context)?;
        if starts_anew {
            resource.completion_metered = 0;
        }
        let (mut prompt, mut completion) = (0, 0);
        if let Some(usage) = usage {
            if starts_anew {
                prompt = usage.prompt_tokens;
            }
            completion = usage
                .completion_tokens
                .saturating_sub(resource.completion_metered);
            resource.completion_metered = resource.completion_metered.max(usage.completion_tokens);
        }
        self.ctx.meter.tokens(&resource.model, prompt, completion);
        Ok(())
    }
}

/// The `usage` output of models that count tokens.
#[derive(serde::Deserialize)]
struct ReportedUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl tensor::Host for NnView<'_> {}

impl tensor::HostTensor for NnView<'_> {
    fn new(
        &mut self,
        dimensions: tensor::TensorDimensions,
        ty: tensor::TensorType,
        data: tensor::TensorData,
    ) -> wasmtime::Result<Resource<Tensor>> {
        self.ctx.hold(data.len())?;
        Ok(self.table.push(Tensor {
            dimensions,
            ty,
            data,
        })?)
    }

    fn dimensions(
        &mut self,
        tensor: Resource<Tensor>,
    ) -> wasmtime::Result<tensor::TensorDimensions> {
        Ok(self.table.get(&tensor)?.dimensions.clone())
    }

    fn ty(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<tensor::TensorType> {
        Ok(self.table.get(&tensor)?.ty)
    }

    fn data(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<tensor::TensorData> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    fn drop(&mut self, tensor: Resource<Tensor>) -> wasmtime::Result<()> {
        let tensor = self.table.delete(tensor)?;
        self.ctx.release(tensor.data.len());
        Ok(())
    }
}

impl errors::Host for NnView<'_> {}

impl errors::HostError for NnView<'_> {
    fn code(&mut self, error: Resource<NnError>) -> wasmtime::Result<errors::ErrorCode> {
        Ok(self.table.get(&error)?.code)
    }

    fn data(&mut self, error: Resource<NnError>) -> wasmtime::Result<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    fn drop(&mut self, error: Resource<NnError>) -> wasmtime::Result<()> {
        self.table.delete(error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{ModelRegistry, NnCtx, NnGrant};
    use crate::testing::{fake_model, FakeBackend, TempStore};
    use graph::{ExecutionTarget, GraphEncoding, Host as _, HostGraph as _};
    use inference::HostGraphExecutionContext as _;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tensor::HostTensor;
    use wasmtime::component::ResourceTable;

    /// A registry holding `triple` (a fake model), and what the guest of `grant` sees of it.
    async fn registry_with_triple(store: &TempStore) -> Arc<ModelRegistry> {
        let registry = store.registry(&Arc::new(FakeBackend::default()));
        let (staged, upload) = store.upload(&fake_model(3));
        registry.add("triple", staged, upload).await.unwrap();
        registry
    }

    fn grant(models: &[&str]) -> NnGrant {
        NnGrant {
            tenant: "default".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
            max_guest_model_bytes: 1 << 20,
            max_host_bytes: 1 << 20,
            native_guest_models: false,
        }
    }

    /// The code and message of a failed call.
    fn failure<T>(
        view: &NnView<'_>,
        result: Result<T, Resource<NnError>>,
    ) -> (errors::ErrorCode, String) {
        let Err(error) = result else {
            panic!("the call succeeded")
        };
        let error = view.table.get(&error).unwrap();
        (error.code, error.message.clone())
    }

    /// A meter for instances of app `app` on `store`.
    fn test_meter(store: &TempStore) -> crate::telemetry::AppMeter {
        let telemetry = crate::telemetry::Telemetry::open(&store.store, &Default::default())
            .expect("telemetry opens");
        crate::telemetry::AppMeter::new(Arc::new(telemetry), "default", "app")
    }

    #[tokio::test]
    async fn an_app_loads_only_the_models_it_declared_and_computes_on_them() {
        let store = TempStore::default();
        let models = registry_with_triple(&store).await;
        let mut ctx = NnCtx::new(
            models,
            grant(&["triple", "ghost"]),
            Arc::default(),
            test_meter(&store),
        );
        let mut table = ResourceTable::new();
        let mut view = NnView {
            ctx: &mut ctx,
            table: &mut table,
        };

        let refused = view.load_by_name("double".into()).unwrap();
        let (code, message) = failure(&view, refused);
        assert_eq!(code, errors::ErrorCode::Security);
        assert!(message.contains("--model double"), "{message}");
        let missing = view.load_by_name("ghost".into()).unwrap();
        assert_eq!(failure(&view, missing).0, errors::ErrorCode::NotFound);

        let graph = view.load_by_name("triple".into()).unwrap().unwrap();
        let context = view.init_execution_context(graph).unwrap().unwrap();
        let input =
            HostTensor::new(&mut view, vec![2], tensor::TensorType::U8, vec![1, 2]).unwrap();
        let outputs = view
            .compute(context, vec![(String::new(), input)])
            .await
            .unwrap()
            .unwrap();
        let product = HostTensor::data(&mut view, outputs.into_iter().next().unwrap().1).unwrap();
        assert_eq!(product, vec![3, 6]);
    }

    #[tokio::test]
    async fn what_a_guest_holds_on_the_host_is_bounded_by_its_memory_limit() {
        let store = TempStore::default();
        let memory_hit = Arc::new(AtomicBool::new(false));
        let mut ctx = NnCtx::new(
            registry_with_triple(&store).await,
            NnGrant {
                max_host_bytes: 1000,
                ..grant(&[])
            },
            memory_hit.clone(),
            test_meter(&store),
        );
        let mut table = ResourceTable::new();
        let mut view = NnView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let tensor = |view: &mut NnView<'_>, bytes: usize| {
            HostTensor::new(
                view,
                vec![bytes as u32],
                tensor::TensorType::U8,
                vec![0; bytes],
            )
        };
        let first = tensor(&mut view, 600).unwrap();
        let trap = tensor(&mut view, 600).err().unwrap().to_string();
        assert!(
            trap.contains("past its memory limit of 1000 bytes"),
            "{trap}"
        );
        assert!(memory_hit.load(Ordering::Relaxed));
        // What is dropped no longer counts.
        HostTensor::drop(&mut view, first).unwrap();
        assert!(tensor(&mut view, 600).is_ok());
    }

    #[tokio::test]
    async fn guest_bytes_reach_a_native_backend_only_with_permission_and_within_limits() {
        let store = TempStore::default();
        let models = registry_with_triple(&store).await;
        let model = fake_model(2);
        let mut table = ResourceTable::new();

        // The only backend here is not the pure-Rust one: without permission, refused.
        let mut ctx = NnCtx::new(
            models.clone(),
            grant(&[]),
            Arc::default(),
            test_meter(&store),
        );
        let mut view = NnView {
            ctx: &mut ctx,
            table: &mut table,
        };
        let refused = view
            .load(
                vec![model.clone()],
                GraphEncoding::Onnx,
                ExecutionTarget::Cpu,
            )
            .await
            .unwrap();
        let (code, message) = failure(&view, refused);
        assert_eq!(code, errors::ErrorCode::Security);
        assert!(message.contains("--native-guest-models"), "{message}");

        let mut ctx = NnCtx::new(
            models,
            NnGrant {
                native_guest_models: true,
                max_guest_model_bytes: 64,
                ..grant(&[])
            },
            Arc::default(),
            test_meter(&store),
        );
        let mut view = NnView {
            ctx: &mut ctx,
            table: &mut table,
        };
        assert!(view
            .load(
                vec![model.clone()],
                GraphEncoding::Autodetect,
                ExecutionTarget::Cpu
            )
            .await
            .unwrap()
            .is_ok());
        let too_large = view
            .load(vec![vec![0; 65]], GraphEncoding::Onnx, ExecutionTarget::Cpu)
            .await
            .unwrap();
        assert_eq!(failure(&view, too_large).0, errors::ErrorCode::TooLarge);
        let tensorflow = view
            .load(vec![model], GraphEncoding::Tensorflow, ExecutionTarget::Cpu)
            .await
            .unwrap();
        assert_eq!(
            failure(&view, tensorflow).0,
            errors::ErrorCode::InvalidEncoding
        );
        let empty = view
            .load(vec![], GraphEncoding::Onnx, ExecutionTarget::Cpu)
            .await
            .unwrap();
        assert_eq!(failure(&view, empty).0, errors::ErrorCode::InvalidArgument);
    }
}

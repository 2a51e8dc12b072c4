//! Dynamic batching for models whose computes are independent (ONNX on tract, ONNX Runtime,
//! OpenVINO; BERT on candle), with the semantics of Triton's dynamic batcher: concurrent
//! `compute` calls whose inputs differ only in their first (batch) dimension are joined along
//! it into one run of at most `max_batch_size` rows, and each caller gets its own rows of every
//! output back. The oldest waiting call waits at most `max_queue_delay_us` for others to join.
//!
//! No thread of its own: the first waiting caller collects the batch and runs it for everyone,
//! holding one compute slot only for the run itself (waiting callers hold none). A batch takes
//! at most its share of the waiting rows per free compute slot, so joined calls still use every
//! core. A batch that fails, or whose outputs do not split by rows, is run again one call at a
//! time, so every caller gets exactly what an unbatched run gives it; the first batch of each
//! shape (signature and rows) is also run call by call and compared byte for byte, since a
//! backend may pick other kernels for another batch size. A model that cannot batch, or whose
//! batched outputs differ from its unbatched ones, runs unbatched from there on, with the reason
//! shown to the operator.

use super::{
    catch_panic, BackendError, Cancellation, ComputeSlots, ExecutionContext, Graph, NamedTensor,
    Tensor, TensorType,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Most rows one batch may have.
pub const MAX_BATCH_SIZE: u32 = 256;
/// Longest a call may wait for others to join it.
pub const MAX_QUEUE_DELAY_US: u64 = 1_000_000;
/// How long a call waits for others when the operator gives a batch size only.
pub const DEFAULT_QUEUE_DELAY_US: u64 = 2_000;
/// Calls that may wait for a batch at once, per batch size: beyond `max_batch_size` times this,
/// a call runs alone at once instead of queueing.
const WAITING_PER_BATCH_ROW: usize = 16;
/// Batch shapes whose outputs were checked against unbatched runs and remembered as matching;
/// past this many, a new shape is checked every time it runs (never run unchecked).
const REMEMBERED_SHAPES: usize = 1024;

/// How a model batches (`model add --max-batch-size N --max-queue-delay-us D`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPolicy {
    /// Most rows (the sum of the calls' first dimensions) in one run.
    pub max_batch_size: u32,
    /// How long the oldest waiting call waits for others, in microseconds.
    pub max_queue_delay_us: u64,
}

impl BatchPolicy {
    /// A policy within the node's bounds (2–256 rows, at most one second of delay).
    pub fn new(max_batch_size: u32, max_queue_delay_us: u64) -> Result<Self, String> {
        if !(2..=MAX_BATCH_SIZE).contains(&max_batch_size) {
            return Err(format!(
                "max_batch_size {max_batch_size} is out of range: use 2 to {MAX_BATCH_SIZE}"
            ));
        }
        if max_queue_delay_us > MAX_QUEUE_DELAY_US {
            return Err(format!(
                "max_queue_delay_us {max_queue_delay_us} is out of range: use 0 to {MAX_QUEUE_DELAY_US}"
            ));
        }
        Ok(Self {
            max_batch_size,
            max_queue_delay_us,
        })
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.max_queue_delay_us)
    }
}

/// What an operator sees of a batching model (`/v1/admin/models`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchingActivity {
    #[serde(flatten)]
    pub policy: BatchPolicy,
    /// Runs of the model that served joined calls, and the calls they served: their ratio is
    /// the mean batch size.
    pub batches: u64,
    pub batched_calls: u64,
    /// Calls run alone: nothing to join them, inputs that cannot batch, or a full queue.
    pub unbatched_calls: u64,
    /// Why the model is no longer batched, once a batch showed that it cannot be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled: Option<String>,
}

/// A graph whose contexts batch their computes together.
pub struct BatchedGraph {
    inner: Arc<dyn Graph>,
    queue: Arc<BatchQueue>,
}

impl BatchedGraph {
    /// Batches the computes of `inner`, which must compute each call independently of any
    /// other ([`Graph::computes_independently`]).
    pub fn new(inner: Arc<dyn Graph>, policy: BatchPolicy, slots: ComputeSlots) -> Self {
        Self {
            inner,
            queue: Arc::new(BatchQueue {
                policy,
                slots,
                state: Mutex::new(QueueState::default()),
                changed: Condvar::new(),
                disabled: OnceLock::new(),
                checked_shapes: Mutex::new(HashSet::new()),
                batches: AtomicU64::new(0),
                batched_calls: AtomicU64::new(0),
                unbatched_calls: AtomicU64::new(0),
            }),
        }
    }
}

impl Graph for BatchedGraph {
    fn init_execution_context(&self) -> Result<Box<dyn ExecutionContext>, BackendError> {
        Ok(Box::new(BatchedContext {
            graph: self.inner.clone(),
            queue: self.queue.clone(),
        }))
    }

    fn batching_activity(&self) -> Option<BatchingActivity> {
        let queue = &self.queue;
        Some(BatchingActivity {
            policy: queue.policy,
            batches: queue.batches.load(Ordering::Relaxed),
            batched_calls: queue.batched_calls.load(Ordering::Relaxed),
            unbatched_calls: queue.unbatched_calls.load(Ordering::Relaxed),
            disabled: queue.disabled.get().cloned(),
        })
    }
}

struct BatchedContext {
    graph: Arc<dyn Graph>,
    queue: Arc<BatchQueue>,
}

impl ExecutionContext for BatchedContext {
    fn compute(
        &mut self,
        inputs: Vec<NamedTensor>,
        cancel: &Cancellation,
    ) -> Result<Vec<NamedTensor>, BackendError> {
        self.queue.compute(&self.graph, inputs, cancel)
    }

    /// Waiting for a batch holds no slot; the run of a batch holds one.
    fn takes_compute_slots_itself(&self) -> bool {
        true
    }
}

/// What calls may join one batch: the same input names, types and dimensions after the first.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signature(Vec<(String, TensorType, Vec<u32>)>);

impl std::hash::Hash for Signature {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        for (name, ty, dimensions) in &self.0 {
            (name, *ty as u8, dimensions).hash(state);
        }
    }
}

impl Signature {
    /// The signature of `inputs` and their rows, if they can batch: every input has a first
    /// dimension, and all have the same one.
    fn of(inputs: &[NamedTensor]) -> Option<(Self, u32)> {
        let rows = *inputs.first()?.1.dimensions.first()?;
        let mut signature = Vec::with_capacity(inputs.len());
        for (name, tensor) in inputs {
            let (&first, rest) = tensor.dimensions.split_first()?;
            if first != rows {
                return None;
            }
            signature.push((name.clone(), tensor.ty, rest.to_vec()));
        }
        (rows > 0).then_some((Self(signature), rows))
    }
}

struct Waiting {
    id: u64,
    signature: Signature,
    rows: u32,
    inputs: Vec<NamedTensor>,
    cancel: Cancellation,
    arrived: Instant,
}

type Outcome = Result<Vec<NamedTensor>, BackendError>;

#[derive(Default)]
struct QueueState {
    waiting: VecDeque<Waiting>,
    /// Whether a caller is collecting a batch now.
    collecting: bool,
    /// Whether the waiting calls were left by a batch that took only its share of a due queue:
    /// the next collector takes them without waiting.
    due: bool,
    /// Batches collected whose run does not hold its compute slot yet.
    starting: usize,
    /// Outcomes of batched calls, until their callers take them.
    done: HashMap<u64, Outcome>,
    next_id: u64,
}

struct BatchQueue {
    policy: BatchPolicy,
    slots: ComputeSlots,
    state: Mutex<QueueState>,
    changed: Condvar,
    disabled: OnceLock<String>,
    /// Shapes (signature, total rows) whose batched outputs matched unbatched runs.
    checked_shapes: Mutex<HashSet<(Signature, u32)>>,
    batches: AtomicU64,
    batched_calls: AtomicU64,
    unbatched_calls: AtomicU64,
}

impl BatchQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn compute(
        &self,
        graph: &Arc<dyn Graph>,
        inputs: Vec<NamedTensor>,
        cancel: &Cancellation,
    ) -> Outcome {
        cancel.check()?;
        let batchable = Signature::of(&inputs).filter(|(_, rows)| {
            *rows < self.policy.max_batch_size && self.disabled.get().is_none()
        });
        let Some((signature, rows)) = batchable else {
            return self.run_alone(graph, inputs, cancel);
        };
        let mut state = self.lock();
        let limit = self.policy.max_batch_size as usize * WAITING_PER_BATCH_ROW;
        if state.waiting.len() >= limit {
            drop(state);
            return self.run_alone(graph, inputs, cancel);
        }
        let id = state.next_id;
        state.next_id += 1;
        state.waiting.push_back(Waiting {
            id,
            signature,
            rows,
            inputs,
            cancel: cancel.clone(),
            arrived: Instant::now(),
        });
        self.changed.notify_all();
        loop {
            if let Some(outcome) = state.done.remove(&id) {
                return outcome;
            }
            if !state.collecting && !state.waiting.is_empty() {
                state.collecting = true;
                let (batch, next) = self.collect(state);
                drop(next);
                self.run_batch(graph, batch);
                state = self.lock();
                continue;
            }
            // Woken whenever a call arrives, a batch is taken or a batch is done; the timeout
            // is a safety net only.
            state = self
                .changed
                .wait_timeout(state, Duration::from_secs(1))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until the oldest waiting call's batch is full or its delay is over, then takes
    /// its batch out of the queue and lets another caller collect the next one.
    fn collect<'a>(
        &'a self,
        mut state: std::sync::MutexGuard<'a, QueueState>,
    ) -> (Vec<Waiting>, std::sync::MutexGuard<'a, QueueState>) {
        loop {
            let oldest = state.waiting.front().expect("collecting a non-empty queue");
            let deadline = oldest.arrived + self.policy.delay();
            let rows: u32 = state
                .waiting
                .iter()
                .filter(|w| w.signature == oldest.signature)
                .map(|w| w.rows)
                .sum();
            let now = Instant::now();
            if state.due || rows >= self.policy.max_batch_size || now >= deadline {
                break;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let signature = state.waiting[0].signature.clone();
        let waiting_rows: u32 = state
            .waiting
            .iter()
            .filter(|w| w.signature == signature)
            .map(|w| w.rows)
            .sum();
        let free_slots = self.slots.available().saturating_sub(state.starting).max(1) as u32;
        let most_rows = self
            .policy
            .max_batch_size
            .min(waiting_rows.div_ceil(free_slots));
        let (mut batch, mut rows) = (Vec::new(), 0);
        let mut index = 0;
        while index < state.waiting.len() {
            let fits = {
                let waiting = &state.waiting[index];
                waiting.signature == signature && (rows == 0 || rows + waiting.rows <= most_rows)
            };
            if fits {
                let waiting = state.waiting.remove(index).expect("index in range");
                if let Err(cancelled) = waiting.cancel.check() {
                    state.done.insert(waiting.id, Err(cancelled));
                    continue;
                }
                rows += waiting.rows;
                batch.push(waiting);
            } else {
                index += 1;
            }
        }
        state.due = most_rows < self.policy.max_batch_size
            && state.waiting.iter().any(|w| w.signature == signature);
        state.starting += usize::from(!batch.is_empty());
        state.collecting = false;
        self.changed.notify_all();
        (batch, state)
    }

    /// Runs `batch` under one compute slot and hands every call its outcome.
    fn run_batch(&self, graph: &Arc<dyn Graph>, batch: Vec<Waiting>) {
        if batch.is_empty() {
            return;
        }
        let _slot = self.slots.acquire_blocking();
        self.lock().starting -= 1;
        let outcomes: Vec<(u64, Outcome)> = if batch.len() == 1 {
            self.unbatched_calls.fetch_add(1, Ordering::Relaxed);
            batch
                .into_iter()
                .map(|w| (w.id, run(graph, w.inputs)))
                .collect()
        } else {
            self.run_joined(graph, batch)
        };
        let mut state = self.lock();
        state.done.extend(outcomes);
        self.changed.notify_all();
    }

    fn run_joined(&self, graph: &Arc<dyn Graph>, batch: Vec<Waiting>) -> Vec<(u64, Outcome)> {
        let rows: Vec<u32> = batch.iter().map(|w| w.rows).collect();
        let joined = join(&batch);
        let outcome = run(graph, joined).and_then(|outputs| split(outputs, &rows));
        let shape = (batch[0].signature.clone(), rows.iter().sum::<u32>());
        let checked = self
            .checked_shapes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&shape);
        match outcome {
            Ok(parts) if !checked => self.compare_with_unbatched(graph, batch, parts, shape),
            Ok(parts) => {
                self.batches.fetch_add(1, Ordering::Relaxed);
                self.batched_calls
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch
                    .iter()
                    .map(|w| w.id)
                    .zip(parts.into_iter().map(Ok))
                    .collect()
            }
            Err(batch_error) => {
                // Each call gets what an unbatched run gives it; if every one succeeds alone,
                // the model cannot batch.
                self.unbatched_calls
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                let outcomes: Vec<(u64, Outcome)> = batch
                    .into_iter()
                    .map(|w| (w.id, run(graph, w.inputs)))
                    .collect();
                if outcomes.iter().all(|(_, outcome)| outcome.is_ok()) {
                    let reason = format!("a batch of {} calls failed: {batch_error}", rows.len());
                    tracing::warn!(%reason, "model runs unbatched from now on");
                    let _ = self.disabled.set(reason);
                }
                outcomes
            }
        }
    }

    /// The first batch of a shape: each call is run alone too, and the batch's outputs are
    /// kept only if they are the same bytes; if not, the model runs unbatched from now on.
    /// Either way every caller gets what an unbatched run gives it.
    fn compare_with_unbatched(
        &self,
        graph: &Arc<dyn Graph>,
        batch: Vec<Waiting>,
        parts: Vec<Vec<NamedTensor>>,
        shape: (Signature, u32),
    ) -> Vec<(u64, Outcome)> {
        let calls = batch.len();
        let outcomes: Vec<(u64, Outcome)> = batch
            .into_iter()
            .map(|w| (w.id, run(graph, w.inputs)))
            .collect();
        let difference = outcomes
            .iter()
            .zip(&parts)
            .find_map(|((_, alone), joined)| match alone {
                Ok(alone) => first_difference(alone, joined),
                Err(error) => Some(format!(
                    "a call that succeeded in the batch fails alone: {error}"
                )),
            });
        match difference {
            None => {
                let mut shapes = self
                    .checked_shapes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if shapes.len() < REMEMBERED_SHAPES {
                    shapes.insert(shape);
                }
                self.batches.fetch_add(1, Ordering::Relaxed);
                self.batched_calls
                    .fetch_add(calls as u64, Ordering::Relaxed);
            }
            Some(difference) => {
                let reason = format!(
                    "a batch of {} rows gave other outputs than unbatched runs ({difference}): \
                     this backend picks other kernels for other batch sizes",
                    shape.1
                );
                tracing::warn!(%reason, "model runs unbatched from now on");
                let _ = self.disabled.set(reason);
                self.unbatched_calls
                    .fetch_add(calls as u64, Ordering::Relaxed);
            }
        }
        outcomes
    }

    fn run_alone(
        &self,
        graph: &Arc<dyn Graph>,
        inputs: Vec<NamedTensor>,
        cancel: &Cancellation,
    ) -> Outcome {
        self.unbatched_calls.fetch_add(1, Ordering::Relaxed);
        let _slot = self.slots.acquire_blocking();
        cancel.check()?;
        run(graph, inputs)
    }
}

/// One run of the model, as an unbatched context makes it.
fn run(graph: &Arc<dyn Graph>, inputs: Vec<NamedTensor>) -> Outcome {
    catch_panic("compute", || {
        graph
            .init_execution_context()?
            .compute(inputs, &Cancellation::default())
    })
}

/// Where a call's rows of a batch's outputs differ from its unbatched outputs, if they do.
fn first_difference(alone: &[NamedTensor], joined: &[NamedTensor]) -> Option<String> {
    if alone.len() != joined.len() {
        return Some(format!("{} outputs, not {}", joined.len(), alone.len()));
    }
    alone.iter().zip(joined).find_map(|((name, a), (_, b))| {
        if a.dimensions != b.dimensions || a.ty != b.ty {
            return Some(format!(
                "output {name:?} has dimensions {:?}, not {:?}",
                b.dimensions, a.dimensions
            ));
        }
        let element = super::element_size(a.ty).max(1);
        let index = a
            .data
            .chunks(element)
            .zip(b.data.chunks(element))
            .position(|(x, y)| x != y)?;
        let value = |bytes: &[u8]| match (a.ty, bytes.try_into()) {
            (TensorType::Fp32, Ok(four)) => f32::from_le_bytes(four).to_string(),
            _ => format!("{bytes:02x?}"),
        };
        let start = index * element;
        Some(format!(
            "output {name:?} element {index}: {} batched, {} alone",
            value(&b.data[start..start + element]),
            value(&a.data[start..start + element])
        ))
    })
}

/// The calls' inputs joined along their first dimension, in the calls' order.
fn join(batch: &[Waiting]) -> Vec<NamedTensor> {
    let total: u32 = batch.iter().map(|w| w.rows).sum();
    (0..batch[0].inputs.len())
        .map(|input| {
            let (name, first) = &batch[0].inputs[input];
            let mut dimensions = first.dimensions.clone();
            dimensions[0] = total;
            let mut data = Vec::with_capacity(first.data.len() * total as usize);
            for waiting in batch {
                data.extend_from_slice(&waiting.inputs[input].1.data);
            }
            let tensor = Tensor {
                dimensions,
                ty: first.ty,
                data,
            };
            (name.clone(), tensor)
        })
        .collect()
}

/// Every call's rows of every output, or why the outputs do not split by rows.
fn split(outputs: Vec<NamedTensor>, rows: &[u32]) -> Result<Vec<Vec<NamedTensor>>, BackendError> {
    let total: u32 = rows.iter().sum();
    let mut parts: Vec<Vec<NamedTensor>> = rows.iter().map(|_| Vec::new()).collect();
    for (name, tensor) in outputs {
        if tensor.dimensions.first() != Some(&total) || tensor.data.len() % total as usize != 0 {
            return Err(BackendError::Unsupported(format!(
                "output {name:?} has dimensions {:?}, not {total} rows",
                tensor.dimensions
            )));
        }
        let row_bytes = tensor.data.len() / total as usize;
        let mut offset = 0;
        for (part, &rows) in parts.iter_mut().zip(rows) {
            let bytes = row_bytes * rows as usize;
            let mut dimensions = tensor.dimensions.clone();
            dimensions[0] = rows;
            part.push((
                name.clone(),
                Tensor {
                    dimensions,
                    ty: tensor.ty,
                    data: tensor.data[offset..offset + bytes].to_vec(),
                },
            ));
            offset += bytes;
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::backend::{share, StatelessModel};
    use std::sync::Barrier;

    /// Sums each row of its one U8 input `[N, K]` into output `sums` `[N]`, refuses a row
    /// that starts with 255, and records the rows of every run. With `whole`, it sums the
    /// whole input into one value instead (an output that does not split by rows); with
    /// `batch_dependent`, a run of several rows adds one to every sum (as a backend whose
    /// kernels for batches round otherwise); each run takes `duration`.
    #[derive(Default)]
    struct RowSums {
        runs: Mutex<Vec<u32>>,
        whole: bool,
        batch_dependent: bool,
        duration: Duration,
    }

    impl StatelessModel for Arc<RowSums> {
        fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
            let input = &inputs[0].1;
            let (rows, width) = (input.dimensions[0], input.dimensions[1] as usize);
            self.runs.lock().unwrap().push(rows);
            std::thread::sleep(self.duration);
            let offset = u8::from(self.batch_dependent && rows > 1);
            let row_sums: Vec<u8> = input
                .data
                .chunks(width)
                .map(|row| row.iter().fold(offset, |a, b| a.wrapping_add(*b)))
                .collect();
            if input.data.chunks(width).any(|row| row[0] == 255) {
                return Err(BackendError::InvalidArgument(
                    "a row starts with 255".into(),
                ));
            }
            let (dimensions, data) = if self.whole {
                (
                    vec![1],
                    vec![row_sums.iter().fold(0u8, |a, b| a.wrapping_add(*b))],
                )
            } else {
                (vec![rows], row_sums)
            };
            let tensor = Tensor {
                dimensions,
                ty: TensorType::U8,
                data,
            };
            Ok(vec![("sums".into(), tensor)])
        }
    }

    fn rows(values: &[&[u8]]) -> Vec<NamedTensor> {
        let tensor = Tensor {
            dimensions: vec![values.len() as u32, values[0].len() as u32],
            ty: TensorType::U8,
            data: values.concat(),
        };
        vec![("x".into(), tensor)]
    }

    /// `model` batched, on a node with one compute slot.
    fn batched(model: &Arc<RowSums>, max_batch_size: u32, delay_us: u64) -> BatchedGraph {
        batched_on(model, max_batch_size, delay_us, 1)
    }

    fn batched_on(
        model: &Arc<RowSums>,
        max_batch_size: u32,
        delay_us: u64,
        slots: usize,
    ) -> BatchedGraph {
        let policy = BatchPolicy::new(max_batch_size, delay_us).unwrap();
        BatchedGraph::new(share(model.clone()), policy, ComputeSlots::new(slots))
    }

    /// Runs `calls` at once, each on its own thread, and returns their outcomes in order.
    fn at_once(graph: &BatchedGraph, calls: Vec<Vec<NamedTensor>>) -> Vec<Outcome> {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let barrier = Barrier::new(calls.len());
        std::thread::scope(|scope| {
            let threads: Vec<_> = calls
                .into_iter()
                .map(|inputs| {
                    let (barrier, handle) = (&barrier, runtime.handle());
                    let mut context = graph.init_execution_context().unwrap();
                    scope.spawn(move || {
                        let _runtime = handle.enter();
                        barrier.wait();
                        context.compute(inputs, &Cancellation::default())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    }

    fn sums(outcome: &Outcome) -> (Vec<u32>, Vec<u8>) {
        let outputs = outcome.as_ref().expect("the call succeeds");
        assert_eq!(outputs.len(), 1);
        (outputs[0].1.dimensions.clone(), outputs[0].1.data.clone())
    }

    #[test]
    fn concurrent_calls_run_as_one_batch_and_each_gets_its_own_rows() {
        let model = Arc::new(RowSums::default());
        // The delay is long: the batch runs as soon as it is full, not when the delay ends.
        let graph = batched(&model, 8, MAX_QUEUE_DELAY_US);
        for round in 0..2 {
            let calls = (0..8u8).map(|i| rows(&[&[i, i, round]])).collect();
            let outcomes = at_once(&graph, calls);
            for (i, outcome) in outcomes.iter().enumerate() {
                assert_eq!(sums(outcome), (vec![1], vec![2 * i as u8 + round]));
            }
        }
        // The first batch of its shape is checked call by call against unbatched runs; the
        // second is not.
        let mut expected = vec![8];
        expected.extend([1; 8]);
        expected.push(8);
        assert_eq!(*model.runs.lock().unwrap(), expected);
        let activity = graph.batching_activity().unwrap();
        assert_eq!((activity.batches, activity.batched_calls), (2, 16));
        assert_eq!((activity.unbatched_calls, activity.disabled), (0, None));
    }

    #[test]
    fn calls_of_several_rows_split_back_and_a_batch_never_exceeds_its_size() {
        let model = Arc::new(RowSums::default());
        let graph = batched(&model, 4, 20_000);
        let calls = (0..6u8).map(|i| rows(&[&[i, 0], &[i, 100]])).collect();
        let outcomes = at_once(&graph, calls);
        for (i, outcome) in outcomes.iter().enumerate() {
            assert_eq!(sums(outcome), (vec![2], vec![i as u8, i as u8 + 100]));
        }
        let runs = model.runs.lock().unwrap().clone();
        assert!(runs.iter().all(|&r| r <= 4), "runs {runs:?}");
    }

    #[test]
    fn calls_whose_other_dimensions_differ_are_never_joined() {
        let model = Arc::new(RowSums::default());
        let graph = batched(&model, 8, 50_000);
        let calls = (0..6u8)
            .map(|i| {
                if i % 2 == 0 {
                    rows(&[&[i, 1]])
                } else {
                    rows(&[&[i, 1, 1]])
                }
            })
            .collect();
        let outcomes = at_once(&graph, calls);
        for (i, outcome) in outcomes.iter().enumerate() {
            let expected = i as u8 + 1 + (i % 2) as u8;
            assert_eq!(sums(outcome), (vec![1], vec![expected]));
        }
        let runs = model.runs.lock().unwrap().clone();
        assert!(runs.iter().all(|&r| r <= 3), "runs {runs:?}");
    }

    #[test]
    fn a_model_whose_batched_outputs_differ_from_unbatched_ones_stops_batching() {
        let model = Arc::new(RowSums {
            batch_dependent: true,
            ..Default::default()
        });
        let graph = batched(&model, 2, MAX_QUEUE_DELAY_US);
        // Each caller gets its unbatched result, never the batch's.
        let outcomes = at_once(&graph, vec![rows(&[&[1, 1]]), rows(&[&[2, 2]])]);
        assert_eq!(sums(&outcomes[0]), (vec![1], vec![2]));
        assert_eq!(sums(&outcomes[1]), (vec![1], vec![4]));
        let reason = graph
            .batching_activity()
            .unwrap()
            .disabled
            .expect("batching is off");
        assert!(reason.contains("other outputs than unbatched"), "{reason}");
        assert!(
            reason.contains("element 0: [03] batched, [02] alone")
                || reason.contains("element 0: [05] batched, [04] alone"),
            "{reason}"
        );
        let outcomes = at_once(&graph, vec![rows(&[&[3, 3]]), rows(&[&[4, 4]])]);
        assert_eq!(sums(&outcomes[0]), (vec![1], vec![6]));
        assert_eq!(*model.runs.lock().unwrap(), vec![2, 1, 1, 1, 1]);
        let activity = graph.batching_activity().unwrap();
        assert_eq!((activity.batches, activity.unbatched_calls), (0, 4));
    }

    #[test]
    fn waiting_calls_are_shared_between_the_free_compute_slots() {
        let model = Arc::new(RowSums {
            duration: Duration::from_millis(50),
            ..Default::default()
        });
        // Two free slots, eight calls: two batches of four run side by side, at once (the
        // delay is long: they never wait for it).
        let graph = batched_on(&model, 8, MAX_QUEUE_DELAY_US, 2);
        let started = Instant::now();
        let calls = (0..8u8).map(|i| rows(&[&[i]])).collect();
        let outcomes = at_once(&graph, calls);
        assert!(started.elapsed() < Duration::from_millis(MAX_QUEUE_DELAY_US / 1000));
        for (i, outcome) in outcomes.iter().enumerate() {
            assert_eq!(sums(outcome), (vec![1], vec![i as u8]));
        }
        let mut batches: Vec<u32> = model
            .runs
            .lock()
            .unwrap()
            .iter()
            .copied()
            .filter(|&rows| rows > 1)
            .collect();
        batches.sort();
        assert_eq!(batches, vec![4, 4]);
        let activity = graph.batching_activity().unwrap();
        assert_eq!((activity.batches, activity.batched_calls), (2, 8));
    }

    #[test]
    fn a_failing_call_fails_alone_and_the_others_of_its_batch_succeed() {
        let model = Arc::new(RowSums::default());
        let graph = batched(&model, 4, MAX_QUEUE_DELAY_US);
        let calls = vec![
            rows(&[&[1, 1]]),
            rows(&[&[255, 1]]),
            rows(&[&[2, 2]]),
            rows(&[&[3, 3]]),
        ];
        let outcomes = at_once(&graph, calls);
        assert_eq!(sums(&outcomes[0]), (vec![1], vec![2]));
        assert!(matches!(outcomes[1], Err(BackendError::InvalidArgument(_))));
        assert_eq!(sums(&outcomes[2]), (vec![1], vec![4]));
        assert_eq!(sums(&outcomes[3]), (vec![1], vec![6]));
        // The batch, then each call alone; the model still batches.
        assert_eq!(*model.runs.lock().unwrap(), vec![4, 1, 1, 1, 1]);
        assert_eq!(graph.batching_activity().unwrap().disabled, None);
    }

    #[test]
    fn a_model_whose_outputs_do_not_split_by_rows_is_run_unbatched_from_then_on() {
        let model = Arc::new(RowSums {
            whole: true,
            ..Default::default()
        });
        let graph = batched(&model, 2, MAX_QUEUE_DELAY_US);
        let outcomes = at_once(&graph, vec![rows(&[&[1, 1]]), rows(&[&[2, 2]])]);
        assert_eq!(sums(&outcomes[0]), (vec![1], vec![2]));
        assert_eq!(sums(&outcomes[1]), (vec![1], vec![4]));
        let activity = graph.batching_activity().unwrap();
        let reason = activity.disabled.expect("batching is off");
        assert!(reason.contains("not 2 rows"), "{reason}");
        let outcomes = at_once(&graph, vec![rows(&[&[3, 3]]), rows(&[&[4, 4]])]);
        assert_eq!(sums(&outcomes[0]), (vec![1], vec![6]));
        assert_eq!(sums(&outcomes[1]), (vec![1], vec![8]));
        assert_eq!(*model.runs.lock().unwrap(), vec![2, 1, 1, 1, 1]);
        assert_eq!(graph.batching_activity().unwrap().batches, 0);
    }

    #[test]
    fn calls_that_cannot_join_run_alone_and_cancelled_ones_do_not_run() {
        let model = Arc::new(RowSums::default());
        let graph = batched(&model, 2, 0);
        // As many rows as a batch holds, and no rows at all: alone.
        let no_rows = Tensor {
            dimensions: vec![0, 2],
            ty: TensorType::U8,
            data: Vec::new(),
        };
        let outcomes = at_once(
            &graph,
            vec![rows(&[&[1], &[2]]), vec![("x".into(), no_rows)]],
        );
        assert_eq!(sums(&outcomes[1]), (vec![0], vec![]));
        assert_eq!(sums(&outcomes[0]), (vec![2], vec![1, 2]));
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let _runtime = runtime.enter();
        let cancel = Cancellation::default();
        cancel.cancel();
        let mut context = graph.init_execution_context().unwrap();
        assert!(context.compute(rows(&[&[9]]), &cancel).is_err());
        assert_eq!(model.runs.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_policy_outside_its_bounds_is_refused() {
        assert!(BatchPolicy::new(1, 0).is_err());
        assert!(BatchPolicy::new(MAX_BATCH_SIZE + 1, 0).is_err());
        assert!(BatchPolicy::new(8, MAX_QUEUE_DELAY_US + 1).is_err());
        assert!(BatchPolicy::new(MAX_BATCH_SIZE, MAX_QUEUE_DELAY_US).is_ok());
    }
}

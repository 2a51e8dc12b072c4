//! The default backend: tract-onnx, pure Rust, CPU only. A graph is an optimised tract plan;
//! plans are immutable and each `run` makes its own state, so contexts run concurrently.
//!
//! ONNX models often leave input dimensions open (a dynamic batch). Where tract can optimise
//! the model with those dimensions as symbols, one plan serves every shape. Where it cannot
//! (a `Reshape` computed from the input shape, common in exported Paddle models), the graph
//! keeps the parsed model and builds one plan per distinct input shape, cached.

use super::{
    Backend, BackendError, ExecutionTarget, Graph, NamedTensor, StatelessModel, Tensor, TensorType,
};
use crate::nn::Encoding;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::DimLike;
use tract_onnx::tract_hir::infer::Factoid;

/// Loads ONNX models with tract.
pub struct TractBackend;

/// Distinct input shapes a shape-specialised graph keeps plans for.
const MAX_PLANS_PER_GRAPH: usize = 16;

type Plan = Arc<TypedRunnableModel>;

enum Plans {
    /// One plan for every input shape.
    Symbolic(Plan),
    /// Plans built per input shape from the parsed model.
    PerShape {
        model: Box<InferenceModel>,
        cache: Mutex<HashMap<Vec<Vec<usize>>, Plan>>,
    },
}

/// A loaded model.
struct TractGraph {
    plans: Plans,
    inputs: Arc<[String]>,
    outputs: Arc<[String]>,
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn encoding(&self) -> Encoding {
        Encoding::Onnx
    }

    fn load(&self, bytes: &[u8], target: ExecutionTarget) -> Result<Arc<dyn Graph>, BackendError> {
        if target != ExecutionTarget::Cpu {
            return Err(BackendError::Unsupported(format!(
                "the tract backend runs on the CPU only; execution target {target:?} is not available"
            )));
        }
        super::catch_panic("loading the ONNX model", || {
            let graph = load_graph(bytes).map_err(|e| {
                BackendError::InvalidModel(format!("not a valid ONNX model: {e:#}"))
            })?;
            Ok(super::share(graph))
        })
    }
}

fn node_names<F, O>(model: &tract_onnx::prelude::Graph<F, O>, outlets: &[OutletId]) -> Arc<[String]>
where
    F: Fact + Clone + 'static,
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static,
{
    outlets
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect()
}

fn load_graph(bytes: &[u8]) -> TractResult<TractGraph> {
    let model = tract_onnx::onnx().model_for_read(&mut std::io::Cursor::new(bytes))?;
    let inputs = node_names(&model, model.input_outlets()?);
    let outputs = node_names(&model, model.output_outlets()?);
    let mut symbolic = model.clone();
    let plans = match with_open_dims_as_symbols(&mut symbolic).and_then(|()| optimise(symbolic)) {
        Ok(plan) => Plans::Symbolic(plan),
        Err(_) => {
            // Prove the model is usable by planning it once with every open dimension at 1.
            let ones = concrete_shapes(&model, |_| 1)?;
            let plan = plan_for_shapes(&model, &ones)?;
            Plans::PerShape {
                model: Box::new(model),
                cache: Mutex::new(HashMap::from([(ones, plan)])),
            }
        }
    };
    Ok(TractGraph {
        plans,
        inputs,
        outputs,
    })
}

fn optimise(model: InferenceModel) -> TractResult<Plan> {
    model.into_typed()?.into_optimized()?.into_runnable()
}

fn declared_datum(model: &InferenceModel, index: usize) -> TractResult<DatumType> {
    model
        .input_fact(index)?
        .datum_type
        .concretize()
        .ok_or_else(|| TractError::msg(format!("input {index} has no declared element type")))
}

fn with_open_dims_as_symbols(model: &mut InferenceModel) -> TractResult<()> {
    for index in 0..model.inputs.len() {
        let fact = model.input_fact(index)?.clone();
        if fact.shape.is_open() {
            return Err(TractError::msg(format!(
                "input {index} has no declared rank"
            )));
        }
        let dims: TVec<TDim> = fact
            .shape
            .dims()
            .enumerate()
            .map(|(axis, dim)| {
                dim.concretize()
                    .unwrap_or_else(|| model.symbols.sym(&format!("in{index}_d{axis}")).into())
            })
            .collect();
        let datum = declared_datum(model, index)?;
        model.set_input_fact(index, InferenceFact::dt_shape(datum, dims))?;
    }
    Ok(())
}

/// The declared input shapes with each open dimension replaced by `open(axis)`.
fn concrete_shapes(
    model: &InferenceModel,
    open: impl Fn(usize) -> usize,
) -> TractResult<Vec<Vec<usize>>> {
    (0..model.inputs.len())
        .map(|index| {
            let fact = model.input_fact(index)?;
            if fact.shape.is_open() {
                return Err(TractError::msg(format!(
                    "input {index} has no declared rank"
                )));
            }
            fact.shape
                .dims()
                .enumerate()
                .map(|(axis, dim)| match dim.concretize() {
                    Some(d) => d.to_usize().map_err(|e| TractError::msg(format!("{e:?}"))),
                    None => Ok(open(axis)),
                })
                .collect()
        })
        .collect()
}

fn plan_for_shapes(model: &InferenceModel, shapes: &[Vec<usize>]) -> TractResult<Plan> {
    let mut model = model.clone();
    for (index, shape) in shapes.iter().enumerate() {
        let datum = declared_datum(&model, index)?;
        model.set_input_fact(index, InferenceFact::dt_shape(datum, shape.clone()))?;
    }
    optimise(model)
}

impl TractGraph {
    fn plan_for(&self, inputs: &TVec<TValue>) -> Result<Plan, BackendError> {
        match &self.plans {
            Plans::Symbolic(plan) => Ok(plan.clone()),
            Plans::PerShape { model, cache } => {
                let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
                if let Some(plan) = cache.lock().expect("plan cache lock").get(&shapes) {
                    return Ok(plan.clone());
                }
                let plan = plan_for_shapes(model, &shapes).map_err(|e| {
                    BackendError::InvalidArgument(format!(
                        "the model cannot take inputs of shapes {shapes:?}: {e:#}"
                    ))
                })?;
                let mut cache = cache.lock().expect("plan cache lock");
                if cache.len() >= MAX_PLANS_PER_GRAPH {
                    cache.clear();
                }
                cache.insert(shapes, plan.clone());
                Ok(plan)
            }
        }
    }
}

impl StatelessModel for TractGraph {
    fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let graph = self;
        let mut ordered: Vec<Option<TValue>> = vec![None; graph.inputs.len()];
        for (name, tensor) in inputs {
            let position = graph
                .inputs
                .iter()
                .position(|input| *input == name)
                .or_else(|| (graph.inputs.len() == 1 && name.is_empty()).then_some(0))
                .ok_or_else(|| {
                    BackendError::InvalidArgument(format!(
                        "the model has no input named {name:?}; its inputs are {:?}",
                        graph.inputs
                    ))
                })?;
            ordered[position] = Some(to_tract(&tensor)?.into());
        }
        let inputs = ordered
            .into_iter()
            .zip(graph.inputs.iter())
            .map(|(value, name)| {
                value.ok_or_else(|| {
                    BackendError::InvalidArgument(format!("input {name:?} is missing"))
                })
            })
            .collect::<Result<TVec<_>, _>>()?;
        let outputs = super::catch_panic("running the model", || {
            let plan = graph.plan_for(&inputs)?;
            plan.run(inputs).map_err(|e| {
                BackendError::InvalidArgument(format!("the model rejected its inputs: {e:#}"))
            })
        })?;
        outputs
            .into_iter()
            .zip(graph.outputs.iter())
            .map(|(value, name)| Ok((name.clone(), from_tract(&value)?)))
            .collect()
    }
}

fn to_tract(tensor: &Tensor) -> Result<tract_onnx::prelude::Tensor, BackendError> {
    tensor.validate()?;
    let datum = match tensor.ty {
        TensorType::Fp32 => f32::datum_type(),
        TensorType::Fp64 => f64::datum_type(),
        TensorType::I32 => i32::datum_type(),
        TensorType::I64 => i64::datum_type(),
        TensorType::U8 => u8::datum_type(),
        other => {
            return Err(BackendError::Unsupported(format!(
                "the tract backend does not take {other:?} tensors"
            )))
        }
    };
    let shape: Vec<usize> = tensor.dimensions.iter().map(|&d| d as usize).collect();
    // SAFETY: `validate` checked that `data` holds exactly shape.product() elements of
    // `datum`, and every bit pattern is a valid value of these plain numeric types.
    unsafe { tract_onnx::prelude::Tensor::from_raw_dt(datum, &shape, &tensor.data) }
        .map_err(|e| BackendError::InvalidArgument(e.to_string()))
}

fn from_tract(value: &TValue) -> Result<Tensor, BackendError> {
    let ty = match value.datum_type() {
        DatumType::F32 => TensorType::Fp32,
        DatumType::F64 => TensorType::Fp64,
        DatumType::I32 => TensorType::I32,
        DatumType::I64 => TensorType::I64,
        DatumType::U8 => TensorType::U8,
        DatumType::F16 => TensorType::Fp16,
        other => {
            return Err(BackendError::Unsupported(format!(
                "the model produced a {other:?} tensor, which wasi-nn cannot carry"
            )))
        }
    };
    Ok(Tensor {
        dimensions: value.shape().iter().map(|&d| d as u32).collect(),
        ty,
        data: value.as_bytes().to_vec(),
    })
}

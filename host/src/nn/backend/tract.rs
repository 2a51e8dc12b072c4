//! The default backend: tract-onnx, pure Rust, CPU only. A graph is an optimised tract plan;
//! plans are immutable and each `run` makes its own state, so contexts run concurrently.

use super::{Backend, BackendError, ExecutionContext, ExecutionTarget, Graph, NamedTensor, Tensor, TensorType};
use std::sync::Arc;
use tract_onnx::prelude::*;

/// Loads ONNX models with tract.
pub struct TractBackend;

/// A loaded model; cloning shares the plan.
#[derive(Clone)]
struct TractGraph {
    plan: Arc<TypedRunnableModel>,
    inputs: Arc<[String]>,
    outputs: Arc<[String]>,
}

struct TractContext {
    graph: TractGraph,
}

impl Backend for TractBackend {
    fn name(&self) -> &'static str {
        "tract"
    }

    fn encoding(&self) -> &'static str {
        "onnx"
    }

    fn load(&self, bytes: &[u8], target: ExecutionTarget) -> Result<Arc<dyn Graph>, BackendError> {
        if target != ExecutionTarget::Cpu {
            return Err(BackendError::Unsupported(format!(
                "the tract backend runs on the CPU only; execution target {target:?} is not available"
            )));
        }
        super::catch_panic("loading the ONNX model", || {
            let graph = load_plan(bytes).map_err(|e| BackendError::InvalidModel(format!("not a valid ONNX model: {e:#}")))?;
            Ok(Arc::new(graph) as Arc<dyn Graph>)
        })
    }
}

fn load_plan(bytes: &[u8]) -> TractResult<TractGraph> {
    let model = tract_onnx::onnx().model_for_read(&mut std::io::Cursor::new(bytes))?;
    let typed = model.into_typed()?;
    let plan = typed.into_optimized()?.into_runnable()?;
    let names = |outlets: &[OutletId]| -> Arc<[String]> {
        outlets.iter().map(|o| plan.model().node(o.node).name.clone()).collect()
    };
    let inputs = names(plan.model().input_outlets()?);
    let outputs = names(plan.model().output_outlets()?);
    Ok(TractGraph { plan, inputs, outputs })
}

impl Graph for TractGraph {
    fn init_execution_context(&self) -> Result<Box<dyn ExecutionContext>, BackendError> {
        Ok(Box::new(TractContext { graph: self.clone() }))
    }
}

impl ExecutionContext for TractContext {
    fn compute(&mut self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let graph = &self.graph;
        let mut ordered: Vec<Option<TValue>> = vec![None; graph.inputs.len()];
        for (name, tensor) in inputs {
            let position = graph
                .inputs
                .iter()
                .position(|input| *input == name)
                .or_else(|| (graph.inputs.len() == 1 && name.is_empty()).then_some(0))
                .ok_or_else(|| {
                    BackendError::InvalidArgument(format!("the model has no input named {name:?}; its inputs are {:?}", graph.inputs))
                })?;
            ordered[position] = Some(to_tract(&tensor)?.into());
        }
        let inputs = ordered
            .into_iter()
            .zip(graph.inputs.iter())
            .map(|(value, name)| value.ok_or_else(|| BackendError::InvalidArgument(format!("input {name:?} is missing"))))
            .collect::<Result<TVec<_>, _>>()?;
        let outputs = super::catch_panic("running the model", || {
            graph.plan.run(inputs).map_err(|e| BackendError::InvalidArgument(format!("the model rejected its inputs: {e:#}")))
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
        other => return Err(BackendError::Unsupported(format!("the tract backend does not take {other:?} tensors"))),
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
        other => return Err(BackendError::Unsupported(format!("the model produced a {other:?} tensor, which wasi-nn cannot carry"))),
    };
    Ok(Tensor {
        dimensions: value.shape().iter().map(|&d| d as u32).collect(),
        ty,
        data: value.as_bytes().to_vec(),
    })
}

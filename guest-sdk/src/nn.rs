//! Models through `wasi:nn`: load a model the node has registered by name, build tensors,
//! compute. The model itself stays in the host, loaded once and shared by all instances.

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};

pub use errors::ErrorCode;
pub use graph::{ExecutionTarget, GraphEncoding};
pub use tensor::TensorType;

/// A wasi-nn failure: its code and the host's message.
#[derive(Debug, Clone)]
pub struct NnError {
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for NnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for NnError {}

impl From<errors::Error> for NnError {
    fn from(error: errors::Error) -> Self {
        Self {
            code: error.code(),
            message: error.data(),
        }
    }
}

/// A tensor held by the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dimensions: Vec<u32>,
    pub ty: TensorType,
    pub data: Vec<u8>,
}

impl Tensor {
    /// An `f32` tensor of the given shape (row-major).
    pub fn from_f32(dimensions: &[u32], values: &[f32]) -> Self {
        Self {
            dimensions: dimensions.to_vec(),
            ty: TensorType::Fp32,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An `i64` tensor of the given shape (row-major).
    pub fn from_i64(dimensions: &[u32], values: &[i64]) -> Self {
        Self {
            dimensions: dimensions.to_vec(),
            ty: TensorType::I64,
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// The values of an `f32` tensor, or `None` for another type.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.ty == TensorType::Fp32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }

    fn into_resource(self) -> tensor::Tensor {
        tensor::Tensor::new(&self.dimensions, self.ty, &self.data)
    }

    fn from_resource(resource: &tensor::Tensor) -> Self {
        Self {
            dimensions: resource.dimensions(),
            ty: resource.ty(),
            data: resource.data(),
        }
    }
}

/// A loaded model.
pub struct Graph(graph::Graph);

impl Graph {
    /// The model the node registered as `name` (`tensorlet model add <name> …`).
    pub fn by_name(name: &str) -> Result<Self, NnError> {
        Ok(Self(graph::load_by_name(name)?))
    }

    /// Loads a small model from bytes (the node caps the size; register large ones).
    pub fn from_bytes(
        bytes: &[u8],
        encoding: GraphEncoding,
        target: ExecutionTarget,
    ) -> Result<Self, NnError> {
        Ok(Self(graph::load(&[bytes.to_vec()], encoding, target)?))
    }

    /// A context to run the model in; keep it to run several computations.
    pub fn context(&self) -> Result<Context, NnError> {
        Ok(Context(self.0.init_execution_context()?))
    }

    /// Runs the model once on named inputs and returns every named output.
    pub fn compute(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
        self.context()?.compute(inputs)
    }
}

/// An execution context of a [`Graph`].
pub struct Context(inference::GraphExecutionContext);

impl Context {
    /// Runs the model on named inputs and returns every named output.
    pub fn compute(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
        let inputs = inputs
            .into_iter()
            .map(|(name, t)| (name, t.into_resource()))
            .collect();
        let outputs = self.0.compute(inputs)?;
        Ok(outputs
            .iter()
            .map(|(name, t)| (name.clone(), Tensor::from_resource(t)))
            .collect())
    }
}

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
        TensorView::f32(dimensions, values).to_owned()
    }

    /// An `i64` tensor of the given shape (row-major).
    pub fn from_i64(dimensions: &[u32], values: &[i64]) -> Self {
        TensorView::i64(dimensions, values).to_owned()
    }

    /// The values of an `f32` tensor, or `None` for another type.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.ty == TensorType::Fp32 && self.data.len().is_multiple_of(4))
            .then(|| bytemuck::pod_collect_to_vec(&self.data))
    }

    /// This tensor lent to a computation.
    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            dimensions: &self.dimensions,
            ty: self.ty,
            data: &self.data,
        }
    }

    fn from_resource(resource: &tensor::Tensor) -> Self {
        Self {
            dimensions: resource.dimensions(),
            ty: resource.ty(),
            data: resource.data(),
        }
    }
}

/// A tensor lent to [`Context::compute_views`]: its bytes go to the host straight from the
/// caller's values, with no copy in the guest. Element bytes are little-endian, as wasi-nn
/// defines them and as wasm stores numbers, so a slice of `f32` is already a tensor's data.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorView<'a> {
    pub dimensions: &'a [u32],
    pub ty: TensorType,
    pub data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// An `f32` tensor of the given shape (row-major) over `values`.
    pub fn f32(dimensions: &'a [u32], values: &'a [f32]) -> Self {
        Self::of_numbers(dimensions, TensorType::Fp32, values)
    }

    /// An `i64` tensor of the given shape (row-major) over `values`.
    pub fn i64(dimensions: &'a [u32], values: &'a [i64]) -> Self {
        Self::of_numbers(dimensions, TensorType::I64, values)
    }

    fn of_numbers<T: bytemuck::Pod>(
        dimensions: &'a [u32],
        ty: TensorType,
        values: &'a [T],
    ) -> Self {
        Self {
            dimensions,
            ty,
            data: little_endian_bytes(values),
        }
    }

    /// A tensor of its own, with a copy of the bytes.
    pub fn to_owned(&self) -> Tensor {
        Tensor {
            dimensions: self.dimensions.to_vec(),
            ty: self.ty,
            data: self.data.to_vec(),
        }
    }

    fn to_resource(self) -> tensor::Tensor {
        tensor::Tensor::new(self.dimensions, self.ty, self.data)
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!(
    "tensorlet-sdk lends numbers' memory as wasi-nn tensor data: little-endian targets (wasm) only"
);

/// The bytes of `values` as wasi-nn lays out tensor data (little-endian elements): on a
/// little-endian target, which wasm always is, the values' own memory.
fn little_endian_bytes<T: bytemuck::Pod>(values: &[T]) -> &[u8] {
    bytemuck::cast_slice(values)
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

    /// Runs the model once on named inputs lent by the caller ([`Context::compute_views`]).
    pub fn compute_views(
        &self,
        inputs: &[(&str, TensorView<'_>)],
    ) -> Result<Vec<(String, Tensor)>, NnError> {
        self.context()?.compute_views(inputs)
    }
}

/// An execution context of a [`Graph`].
pub struct Context(inference::GraphExecutionContext);

impl Context {
    /// Runs the model on named inputs and returns every named output.
    pub fn compute(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, NnError> {
        let views: Vec<(&str, TensorView<'_>)> = inputs
            .iter()
            .map(|(name, tensor)| (name.as_str(), tensor.view()))
            .collect();
        self.compute_views(&views)
    }

    /// Runs the model on named inputs lent by the caller (the host copies each input's bytes
    /// once, from the caller's memory) and returns every named output.
    pub fn compute_views(
        &self,
        inputs: &[(&str, TensorView<'_>)],
    ) -> Result<Vec<(String, Tensor)>, NnError> {
        let inputs = inputs
            .iter()
            .map(|(name, view)| (name.to_string(), view.to_resource()))
            .collect();
        let outputs = self.0.compute(inputs)?;
        Ok(outputs
            .iter()
            .map(|(name, t)| (name.clone(), Tensor::from_resource(t)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_view_of_numbers_is_their_little_endian_bytes_and_reads_back() {
        let values = [1.5f32, -0.25, f32::MAX, 0.0];
        let view = TensorView::f32(&[2, 2], &values);
        let expected: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(view.data, expected.as_slice());
        assert_eq!(view.ty, TensorType::Fp32);
        let owned = Tensor::from_f32(&[2, 2], &values);
        assert_eq!(owned, view.to_owned());
        assert_eq!(owned.to_f32().unwrap(), values);
        let ids = [7i64, -1];
        let expected: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(Tensor::from_i64(&[2], &ids).data, expected);
    }

    #[test]
    fn to_f32_reads_unaligned_bytes_and_refuses_other_types_and_ragged_data() {
        let mut bytes = vec![0u8];
        bytes.extend(2.0f32.to_le_bytes());
        let unaligned = Tensor {
            dimensions: vec![1],
            ty: TensorType::Fp32,
            data: bytes[1..].to_vec(),
        };
        assert_eq!(unaligned.to_f32().unwrap(), [2.0]);
        let ragged = Tensor {
            data: vec![0; 5],
            ..unaligned.clone()
        };
        assert_eq!(ragged.to_f32(), None);
        let integers = Tensor::from_i64(&[1], &[3]);
        assert_eq!(integers.to_f32(), None);
    }
}

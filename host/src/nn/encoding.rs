//! The model formats this node loads, named as operators, model records and wasi-nn's
//! `graph-encoding` name them, and how a model's first bytes tell its format.

use super::bindings::wasi::nn::graph::GraphEncoding;
use serde::{Deserialize, Serialize};

/// A model format; each has one or more backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// ONNX protobuf: tract, ONNX Runtime, OpenVINO.
    Onnx,
    /// GGUF language models (wasi-nn's `ggml`): llama.cpp.
    Ggml,
    /// BERT embedding models, a tar bundle of safetensors weights, config and tokenizer
    /// (`tensorlet model add` bundles a directory): candle. No wasi-nn encoding names it, so
    /// guests load such models by name.
    Safetensors,
}

impl Encoding {
    /// Every encoding, in the order operators see them.
    pub const ALL: [Encoding; 3] = [Encoding::Onnx, Encoding::Ggml, Encoding::Safetensors];

    /// The lower-case name (`onnx`).
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Onnx => "onnx",
            Encoding::Ggml => "ggml",
            Encoding::Safetensors => "safetensors",
        }
    }

    /// The format the first bytes of a model announce: a GGUF header → `ggml`, a tar archive
    /// (a bundle) → `safetensors`, anything else → `onnx` (protobuf has no magic number).
    pub fn detect(head: &[u8]) -> Self {
        if head.starts_with(b"GGUF") {
            Encoding::Ggml
        } else if head.get(257..262) == Some(b"ustar") {
            Encoding::Safetensors
        } else {
            Encoding::Onnx
        }
    }

    /// The encoding a guest's `load` names; `autodetect` reads it from the model's bytes.
    pub fn from_wasi(encoding: GraphEncoding, model: &[u8]) -> Result<Self, String> {
        match encoding {
            GraphEncoding::Onnx => Ok(Encoding::Onnx),
            GraphEncoding::Ggml => Ok(Encoding::Ggml),
            GraphEncoding::Autodetect => Ok(Encoding::detect(model)),
            GraphEncoding::Openvino
            | GraphEncoding::Tensorflow
            | GraphEncoding::Pytorch
            | GraphEncoding::Tensorflowlite => Err(format!(
                "this node loads no {} models (encodings: {})",
                match encoding {
                    GraphEncoding::Openvino => "openvino IR",
                    GraphEncoding::Tensorflow => "tensorflow",
                    GraphEncoding::Pytorch => "pytorch",
                    _ => "tensorflowlite",
                },
                Encoding::names()
            )),
        }
    }

    /// `onnx, ggml, safetensors`, for messages.
    pub fn names() -> String {
        Encoding::ALL.map(Encoding::name).join(", ")
    }
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Encoding::ALL
            .into_iter()
            .find(|encoding| encoding.name() == name)
            .ok_or_else(|| {
                format!(
                    "unknown encoding {name:?}: use one of {}",
                    Encoding::names()
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_and_unknown_ones_are_refused_with_the_list() {
        for encoding in Encoding::ALL {
            assert_eq!(encoding.name().parse::<Encoding>(), Ok(encoding));
            assert_eq!(
                serde_json::to_string(&encoding).unwrap(),
                format!("\"{encoding}\"")
            );
        }
        let error = "onx".parse::<Encoding>().unwrap_err();
        assert!(error.contains("onnx, ggml, safetensors"), "{error}");
    }

    #[test]
    fn the_first_bytes_tell_the_format() {
        assert_eq!(Encoding::detect(b"GGUF\x03\0\0\0"), Encoding::Ggml);
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(Encoding::detect(&tar), Encoding::Safetensors);
        assert_eq!(Encoding::detect(b"\x08\x07\x12\x04onnx"), Encoding::Onnx);
        assert_eq!(Encoding::detect(b""), Encoding::Onnx);
        assert_eq!(
            Encoding::from_wasi(GraphEncoding::Autodetect, b"GGUF"),
            Ok(Encoding::Ggml)
        );
        assert!(Encoding::from_wasi(GraphEncoding::Tensorflow, b"")
            .unwrap_err()
            .contains("no tensorflow models"));
    }
}

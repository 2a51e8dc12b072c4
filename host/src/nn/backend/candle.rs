//! The embeddings backend: BERT sentence-embedding models (sentence-transformers layout:
//! `model.safetensors`, `config.json`, `tokenizer.json`, optional `1_Pooling/config.json`,
//! `modules.json`, `sentence_bert_config.json`) run with candle.
//!
//! Such a model is a directory; `tensorlet model add DIR` uploads it as one tar bundle (see
//! [`crate::cli::bundle`]), which is what this backend loads. The weights are loaded once and
//! shared; each `compute` tokenises, runs the encoder and pools on a thread pool of the node's
//! inference-thread count. The guest contract is in `wit/README.md` ("Embeddings").

use super::{
    Backend, BackendError, ExecutionTarget, Graph, NamedTensor, StatelessModel, Tensor, TensorType,
};
use crate::nn::Encoding;
use candle_core::{DType, Device, Tensor as CandleTensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// Texts one `compute` may embed.
pub const MAX_TEXTS_PER_COMPUTE: usize = 256;

/// Loads BERT embedding models with candle.
pub struct CandleBertBackend {
    pool: Arc<rayon::ThreadPool>,
}

impl CandleBertBackend {
    /// A backend whose computations use `threads` threads at `priority` below the node's
    /// (see [`super::InferenceThreads`]).
    pub fn new(threads: usize, priority: super::ThreadPriority) -> Self {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("tensorlet-candle-{i}"))
            .start_handler(move |_| super::lower_this_threads_priority(priority))
            .build()
            .expect("building a thread pool only fails when threads cannot be spawned");
        Self {
            pool: Arc::new(pool),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Pooling {
    Mean,
    Cls,
}

struct BertGraph {
    model: BertModel,
    tokenizer: Tokenizer,
    pooling: Pooling,
    normalize: bool,
    pool: Arc<rayon::ThreadPool>,
}

/// The files of a bundle, by path relative to the model directory: slices of `bytes` (an
/// uncompressed tar stores each file contiguously), so nothing is copied.
fn unpack(bytes: &[u8]) -> Result<HashMap<String, &[u8]>, BackendError> {
    let not_a_bundle = |detail: String| {
        BackendError::InvalidModel(format!(
            "a safetensors model is a directory (model.safetensors, config.json, tokenizer.json) \
             added with `tensorlet model add DIR` or `--member DIR/`; this upload is not such a \
             bundle: {detail}"
        ))
    };
    let mut files = HashMap::new();
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries().map_err(|e| not_a_bundle(e.to_string()))? {
        let entry = entry.map_err(|e| not_a_bundle(e.to_string()))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry
            .path()
            .map_err(|e| not_a_bundle(e.to_string()))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let start = entry.raw_file_position() as usize;
        let content = start
            .checked_add(entry.size() as usize)
            .and_then(|end| bytes.get(start..end))
            .ok_or_else(|| not_a_bundle(format!("{path} is cut short")))?;
        files.insert(path, content);
    }
    if files.is_empty() {
        return Err(not_a_bundle("it holds no files".into()));
    }
    Ok(files)
}

fn required<'a>(files: &HashMap<String, &'a [u8]>, name: &str) -> Result<&'a [u8], BackendError> {
    files.get(name).copied().ok_or_else(|| {
        let mut present: Vec<_> = files.keys().map(String::as_str).collect();
        present.sort_unstable();
        BackendError::InvalidModel(format!(
            "the model directory has no {name} (it has: {})",
            present.join(", ")
        ))
    })
}

fn json<T: for<'de> Deserialize<'de>>(bytes: &[u8], name: &str) -> Result<T, BackendError> {
    serde_json::from_slice(bytes)
        .map_err(|e| BackendError::InvalidModel(format!("{name} is not valid: {e}")))
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
}

fn load_graph(bytes: &[u8], pool: Arc<rayon::ThreadPool>) -> Result<BertGraph, BackendError> {
    let files = unpack(bytes)?;
    let config: Config = json(required(&files, "config.json")?, "config.json")?;
    let mut tokenizer =
        Tokenizer::from_bytes(required(&files, "tokenizer.json")?).map_err(|e| {
            BackendError::InvalidModel(format!("tokenizer.json is not a valid tokenizer: {e}"))
        })?;
    let weights = required(&files, "model.safetensors")?;
    let vars = VarBuilder::from_slice_safetensors(weights, DType::F32, &Device::Cpu)
        .map_err(|e| BackendError::InvalidModel(format!("model.safetensors is not valid: {e}")))?;
    let model = BertModel::load(vars, &config).map_err(|e| {
        BackendError::InvalidModel(format!(
            "model.safetensors does not hold the BERT model config.json describes: {e}"
        ))
    })?;
    let pooling = match files.get("1_Pooling/config.json") {
        Some(bytes)
            if json::<PoolingConfig>(bytes, "1_Pooling/config.json")?.pooling_mode_cls_token =>
        {
            Pooling::Cls
        }
        _ => Pooling::Mean,
    };
    let normalize = match files.get("modules.json") {
        Some(bytes) => json::<Vec<Module>>(bytes, "modules.json")?
            .iter()
            .any(|m| m.kind.ends_with(".Normalize")),
        None => false,
    };
    let max_tokens = match files.get("sentence_bert_config.json") {
        Some(bytes) => json::<SentenceBertConfig>(bytes, "sentence_bert_config.json")?
            .max_seq_length
            .unwrap_or(config.max_position_embeddings),
        None => config.max_position_embeddings,
    }
    .min(config.max_position_embeddings);
    let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
    let pad_token = tokenizer
        .get_padding()
        .map_or_else(|| "[PAD]".to_string(), |p| p.pad_token.clone());
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_id,
        pad_token,
        ..PaddingParams::default()
    }));
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_tokens,
            ..TruncationParams::default()
        }))
        .map_err(|e| BackendError::InvalidModel(format!("tokenizer.json: {e}")))?;
    Ok(BertGraph {
        model,
        tokenizer,
        pooling,
        normalize,
        pool,
    })
}

impl Backend for CandleBertBackend {
    fn name(&self) -> &'static str {
        "candle"
    }

    fn encoding(&self) -> Encoding {
        Encoding::Safetensors
    }

    fn load(&self, bytes: &[u8], target: ExecutionTarget) -> Result<Arc<dyn Graph>, BackendError> {
        if target != ExecutionTarget::Cpu {
            return Err(BackendError::Unsupported(format!(
                "this node's candle backend is built for the CPU only; execution target {target:?} is not available"
            )));
        }
        let pool = self.pool.clone();
        super::catch_panic("loading the embedding model", || {
            Ok(super::share(load_graph(bytes, pool)?))
        })
    }
}

/// The texts to embed: a JSON string or array of strings in the `texts` input.
fn texts_from(inputs: Vec<NamedTensor>) -> Result<Vec<String>, BackendError> {
    let mut texts = None;
    for (name, tensor) in inputs {
        match name.as_str() {
            "texts" | "" if tensor.ty == TensorType::U8 => texts = Some(tensor.data),
            "texts" | "" => {
                return Err(BackendError::InvalidArgument(format!(
                    "`texts` must be a U8 tensor of UTF-8 JSON, not {:?}",
                    tensor.ty
                )))
            }
            other => {
                return Err(BackendError::InvalidArgument(format!(
                    "unknown input {other:?}: an embedding model takes `texts`"
                )))
            }
        }
    }
    let texts = texts.ok_or_else(|| {
        BackendError::InvalidArgument("missing input `texts` (JSON array of strings)".into())
    })?;
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Texts {
        One(String),
        Many(Vec<String>),
    }
    let texts = match serde_json::from_slice(&texts) {
        Ok(Texts::One(text)) => vec![text],
        Ok(Texts::Many(texts)) => texts,
        Err(e) => {
            return Err(BackendError::InvalidArgument(format!(
                "`texts` must be a JSON string or array of strings: {e}"
            )))
        }
    };
    if texts.is_empty() || texts.len() > MAX_TEXTS_PER_COMPUTE {
        return Err(BackendError::InvalidArgument(format!(
            "give 1 to {MAX_TEXTS_PER_COMPUTE} texts per compute, not {}",
            texts.len()
        )));
    }
    Ok(texts)
}

fn runtime(e: impl std::fmt::Display) -> BackendError {
    BackendError::Runtime(e.to_string())
}

impl BertGraph {
    /// Embeddings `[texts, hidden]`, row-major, and the number of tokens read.
    fn embed(&self, texts: Vec<String>) -> Result<(Vec<f32>, usize, usize), BackendError> {
        let encodings = self.tokenizer.encode_batch(texts, true).map_err(runtime)?;
        let rows = encodings.len();
        let width = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(rows * width);
        let mut mask = Vec::with_capacity(rows * width);
        for encoding in &encodings {
            ids.extend_from_slice(encoding.get_ids());
            mask.extend_from_slice(encoding.get_attention_mask());
        }
        let tokens = mask.iter().filter(|&&m| m == 1).count();
        let device = &Device::Cpu;
        let ids = CandleTensor::from_vec(ids, (rows, width), device).map_err(runtime)?;
        let mask = CandleTensor::from_vec(mask, (rows, width), device).map_err(runtime)?;
        let type_ids = ids.zeros_like().map_err(runtime)?;
        let hidden = self
            .pool
            .install(|| self.model.forward(&ids, &type_ids, Some(&mask)))
            .map_err(runtime)?;
        let pooled = match self.pooling {
            Pooling::Cls => hidden.narrow(1, 0, 1).and_then(|t| t.squeeze(1)),
            Pooling::Mean => mask.to_dtype(DType::F32).and_then(|mask| {
                let mask = mask.unsqueeze(2)?;
                let summed = hidden.broadcast_mul(&mask)?.sum(1)?;
                summed.broadcast_div(&mask.sum(1)?)
            }),
        }
        .map_err(runtime)?;
        let pooled = if self.normalize {
            pooled
                .sqr()
                .and_then(|s| s.sum_keepdim(1))
                .and_then(|s| s.sqrt())
                .and_then(|norm| pooled.broadcast_div(&norm))
                .map_err(runtime)?
        } else {
            pooled
        };
        let dimension = pooled.dim(1).map_err(runtime)?;
        let values = pooled
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(runtime)?;
        Ok((values, dimension, tokens))
    }
}

impl StatelessModel for BertGraph {
    fn run(&self, inputs: Vec<NamedTensor>) -> Result<Vec<NamedTensor>, BackendError> {
        let texts = texts_from(inputs)?;
        let rows = texts.len();
        let (values, dimension, tokens) =
            super::catch_panic("computing embeddings", || self.embed(texts))?;
        let usage = serde_json::json!({ "prompt_tokens": tokens }).to_string();
        Ok(vec![
            (
                "embeddings".to_string(),
                Tensor {
                    dimensions: vec![rows as u32, dimension as u32],
                    ty: TensorType::Fp32,
                    data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                },
            ),
            (
                "usage".to_string(),
                Tensor {
                    dimensions: vec![usage.len() as u32],
                    ty: TensorType::U8,
                    data: usage.into_bytes(),
                },
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, content) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, path, *content).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn load_error(bytes: &[u8]) -> String {
        match CandleBertBackend::new(
            1,
            crate::nn::backend::ThreadPriority {
                nice: 0,
                sched_idle: false,
            },
        )
        .load(bytes, ExecutionTarget::Cpu)
        {
            Err(BackendError::InvalidModel(message)) => message,
            Err(other) => panic!("wrong error kind: {other}"),
            Ok(_) => panic!("loaded"),
        }
    }

    #[test]
    fn a_bundle_missing_files_or_with_bad_weights_is_refused_by_name() {
        assert!(load_error(b"plain bytes").contains("not such a bundle"));
        let message = load_error(&bundle(&[("config.json", b"{}")]));
        assert!(message.contains("config.json is not valid"), "{message}");
        let config = br#"{"vocab_size": 10, "hidden_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "max_position_embeddings": 16, "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0}"#;
        let message = load_error(&bundle(&[("config.json", config)]));
        assert!(message.contains("has no tokenizer.json"), "{message}");
        let tokenizer = br###"{"version": "1.0", "model": {"type": "WordPiece", "vocab": {"[UNK]": 0, "[PAD]": 1}, "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100}}"###;
        let message = load_error(&bundle(&[
            ("config.json", config),
            ("tokenizer.json", tokenizer),
            ("model.safetensors", b"not safetensors"),
        ]));
        assert!(message.contains("model.safetensors"), "{message}");
    }

    #[test]
    fn texts_must_be_json_strings_within_the_limit() {
        let u8_tensor = |text: &str| Tensor {
            dimensions: vec![text.len() as u32],
            ty: TensorType::U8,
            data: text.as_bytes().to_vec(),
        };
        assert_eq!(
            texts_from(vec![("texts".into(), u8_tensor(r#"["a","b"]"#))]).unwrap(),
            ["a", "b"]
        );
        assert_eq!(
            texts_from(vec![("".into(), u8_tensor(r#""a""#))]).unwrap(),
            ["a"]
        );
        for bad in [
            vec![("texts".into(), u8_tensor("[1]"))],
            vec![("texts".into(), u8_tensor("[]"))],
            vec![("other".into(), u8_tensor(r#""a""#))],
            vec![],
        ] {
            assert!(matches!(
                texts_from(bad),
                Err(BackendError::InvalidArgument(_))
            ));
        }
    }
}

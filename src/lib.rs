//! posegpt-edge: an offline PoseGPT device daemon.
//!
//! The data path, one module per stage:
//!
//! ```text
//! frame ──► vision (preprocess + tract encoder) ──► llm (llama.cpp) ──► pose_head ──► smpl
//!            [tokens, n_embd] image embeddings       hidden state        24 × 6D      axis-angle
//! ```
//!
//! * [`bundle`] — the model bundle (`posegpt.toml` + `llm.gguf` + `vision.onnx` +
//!   `pose_head.onnx`), checked on load with errors that name the file and key.
//! * [`vision`] — preprocessing exactly as the model was trained (Pillow-exact bicubic) and the
//!   ONNX vision tower + projector.
//! * [`llm`] — the only module that calls C directly: a small safe wrapper over llama.cpp.
//! * [`posegpt`] — prompts, image injection, generation, pose-token capture: `pose()` per frame
//!   and `ask()` for chat.
//! * [`pose_head`] — hidden state → 24 × 6D → rotation matrices → axis-angle.
//! * [`smpl`] — rotation conventions (and, later, the body model).

pub mod bench;
pub mod bundle;
pub mod config;
pub mod daemon;
pub mod frame;
pub mod health;
pub mod llm;
pub mod mqtt;
pub mod pose_head;
pub mod posegpt;
pub mod protocol;
pub mod service;
pub mod smpl;
pub mod vision;

// tract's CUDA runtime registers itself with tract when linked; nothing names it otherwise.
#[cfg(feature = "vision-cuda")]
extern crate tract_cuda;

/// `threads`, or for 0 the number of cores.
pub fn threads_or_all_cores(threads: usize) -> usize {
    if threads > 0 {
        threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// Configure tract to run matrix products on `threads` threads (0 = all cores); tract uses
/// one thread otherwise. The setting is process-wide.
pub fn set_tract_threads(threads: usize) {
    let threads = threads_or_all_cores(threads);
    if threads > 1 {
        tract_linalg::multithread::set_default_executor(
            tract_linalg::multithread::Executor::multithread(threads),
        );
    }
}

//! posegpt-edge: an offline PoseGPT device daemon.
//!
//! The data path, one module per stage:
//!
//! ```text
//! frame ──► vision ──────────────► llm ────────────► pose_head ──► smpl ──────► protocol + mqtt
//! camera,    preprocess + tract      llama.cpp:         hidden        rotations,   JSON messages,
//! files      encoder: [tokens,       image embeddings   state →       joints       the broker
//!            n_embd] embeddings      + text → hidden    24 × 6D
//! ```
//!
//! * [`frame`] — frame sources (V4L2 camera, an image file, a folder) and the latest-frame
//!   slot the inference thread takes from.
//! * [`vision`] — image decoding within size limits, preprocessing exactly as the model was
//!   trained (Pillow-exact bicubic), and the ONNX vision tower + projector.
//! * [`llm`] — the only module that calls C directly: a small safe wrapper over llama.cpp.
//! * [`posegpt`] — prompts, image injection, generation, pose-token capture: `pose()` per frame
//!   and `ask()` for chat.
//! * [`pose_head`] — hidden state → 24 × 6D → rotation matrices → axis-angle.
//! * [`smpl`] — rotation conventions, forward kinematics on a skeleton, the SMPL body model.
//! * [`protocol`] — the MQTT JSON messages and the validation of requests; [`mqtt`] — topics,
//!   the client, Home Assistant's discovery and the embedded broker.
//! * [`daemon`] — the wiring: start, run, shutdown; the inference thread (poses, questions,
//!   watch rules on the live frame), the request intake, the hand-overs between them and what
//!   each does when full.
//! * [`web`] — the live view: a page served by the daemon that draws the pose, charts the
//!   stream, shows the watch rules and the device's health, and asks questions.
//! * Around them: [`bundle`] (a model bundle, checked on load), [`config`] (the daemon's TOML),
//!   [`service`] (systemd), [`health`] (temperatures, GPU load, power), [`bench`].

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
pub mod web;

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

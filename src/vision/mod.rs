//! Images to image embeddings: decoding, preprocessing exactly as the model was trained, and the
//! vision encoder (CLIP-style tower + projector, an ONNX file run by tract).
//!
//! The path, file by file:
//! * [`decode`] — JPEG/PNG decoding within size limits checked from the header.
//! * [`preprocess`] — crop or pad to the encoder's square and normalise, as the model was
//!   trained; [`resize`] — the Pillow-exact bicubic resize it uses.
//! * [`encoder`] — the tower + projector: the ONNX file read with the fused operators,
//!   rewritten, optimised and run; [`runner`] — the tract runner it shares with the pose head.
//! * [`rewrite`] — graph rewrites: the linear layers to [`linear`] where its kernel pays
//!   ([`rewrite::products`]), unit gathers to reshapes.
//! * [`ops`] — the fused operators (attention, layer norm, quick-GELU), one file each, and the
//!   writing of their outputs as the next product's packed operand (`ops/pack.rs`, with the
//!   transposed write in `panel.rs`).
//! * [`linear`] — the linear layers' operator and its threading; [`weights`] — the packed
//!   weight layout its kernel reads; `pool.rs` — activation buffers kept between runs.
//! * `arch/` — the only CPU-specific code, behind one dispatch point (`arch/mod.rs`):
//!   `arch/x86_64.rs` (the AVX-512 product kernel and softmax) and `arch/avx2.rs` (the AVX2
//!   panel transpose) are built on x86-64 only and chosen at run time when the CPU has them;
//!   `arch/portable.rs` stands in elsewhere.
//!
//! What runs on a Jetson (aarch64): everything above except `arch/x86_64.rs` and
//! `arch/avx2.rs`, which are not even built there. The linear layers then stay tract's own
//! products (its aarch64 kernels), the softmax and panel writes the portable loops.

mod arch;
mod decode;
pub mod encoder;
pub mod linear;
pub mod ops;
mod panel;
mod pool;
pub mod preprocess;
pub mod resize;
pub mod rewrite;
pub mod runner;
pub mod weights;

pub use decode::{check_image_header, decode_image, load_image, load_image_limited, ImageLimits};
pub(crate) use encoder::EncoderRunner;
pub use encoder::{load_plan, load_typed, GraphForm, VisionEncoder};
pub use preprocess::{
    crop_resize_size, normalise, pad_to_square, preprocess, to_square, ImageSpec, Preprocessor,
    ResizeMode,
};
pub use resize::{resize_bicubic, SquarePlan};
pub(crate) use runner::TractRunner;
pub use runner::{tract_runtime, CPU_RUNTIME};

use std::path::PathBuf;

/// An 8-bit RGB image, row-major, 3 bytes per pixel.
pub type RgbImage = image::RgbImage;

#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    #[error("cannot read image {path}: {cause}")]
    ReadImage {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{what} is not a JPEG or PNG image this build can decode ({reason}); pass a .jpg or .png file")]
    NotAnImage { what: String, reason: String },
    #[error("image {what} is empty (0 pixels wide or high)")]
    EmptyImage { what: String },
    #[error("image {what} is {width} x {height} pixels, over {limit}")]
    TooLarge {
        what: String,
        width: u32,
        height: u32,
        limit: String,
    },
    #[error("vision encoder {path}: {reason}")]
    Model { path: PathBuf, reason: String },
    #[error("vision encoder {path} outputs {got:?}, expected [tokens, n_embd] with n_embd = {n_embd}; the bundle's vision.onnx does not fit its LLM")]
    OutputShape {
        path: PathBuf,
        got: Vec<usize>,
        n_embd: usize,
    },
    #[error("vision encoder failed on an image: {0}")]
    Run(String),
}

//! The vision tower + projector: an ONNX file read with the fused operators, rewritten and
//! optimised for this project's CPU plan (or prepared by another tract runtime), run on
//! preprocessed pixels to image embeddings.

use super::preprocess::{ImageSpec, Preprocessor};
use super::runner::{tract_runtime, KeptState, TractRunner, CPU_RUNTIME};
use super::{ops, rewrite, RgbImage, VisionError};
use std::path::Path;
use tract_onnx::prelude::*;

/// Read, optimise and prepare an encoder ONNX file for a `[1,3,size,size]` input (`None`: the
/// size the file declares). Returns the runnable plan and the output shape.
pub fn load_plan(
    path: &Path,
    size: Option<usize>,
) -> Result<(std::sync::Arc<TypedRunnableModel>, Vec<usize>), VisionError> {
    crate::llm::heap::loading_weights(|| load_plan_inner(path, size))
}

/// Which operators an encoder graph is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphForm {
    /// This project's fused operators ([`ops`]) and, after the rewrites, its linear layers: the
    /// fastest form on a CPU, where they run.
    Fused,
    /// tract's own operators only: attention as its scaled-dot-product attention (`Sdpa`),
    /// layer norm and quick-GELU as element-wise and reduction operators. A GPU runtime
    /// translates every one of them, so the whole tower runs there; our fused operators have
    /// no GPU form and would run on the CPU between GPU segments.
    Standard,
}

/// Read an encoder ONNX file for a `[1,3,size,size]` input (`None`: the size the file
/// declares) in the [`GraphForm::Standard`] form and simplify it without choosing kernels: what
/// another tract runtime (e.g. CUDA, `bench-vision --runtime`) prepares itself.
pub fn load_typed(path: &Path, size: Option<usize>) -> Result<TypedModel, VisionError> {
    let (model, s) = read_with_input(path, size, GraphForm::Standard)?;
    model
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(|e| VisionError::Model {
            path: path.to_path_buf(),
            reason: format!("cannot type it for a [1,3,{s},{s}] input: {e:#}"),
        })
}

/// The ONNX file read in `form` and its input set to `[1,3,S,S]`, with S.
fn read_with_input(
    path: &Path,
    size: Option<usize>,
    form: GraphForm,
) -> Result<(InferenceModel, usize), VisionError> {
    let err = |reason: String| VisionError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let reader = match form {
        GraphForm::Fused => ops::onnx(),
        GraphForm::Standard => tract_onnx::onnx(),
    };
    let model = reader.model_for_path(path).map_err(|e| {
        let e = format!("{e:#}");
        let hint = if e.contains("external data") {
            "; its weights live in a separate file named in the message: keep it next to the .onnx"
        } else {
            ""
        };
        err(format!("cannot read it as ONNX: {e}{hint}"))
    })?;
    let s = match size {
        Some(s) => s,
        None => {
            let fact = model
                .input_fact(0)
                .map_err(|e| err(format!("no input: {e:#}")))?;
            use tract_onnx::tract_hir::infer::Factoid;
            let dims: Option<Vec<usize>> = fact
                .shape
                .dims()
                .map(|d| d.concretize()?.as_i64().map(|v| v as usize))
                .collect();
            match dims.as_deref() {
                Some([1, 3, h, w]) if h == w => *h,
                _ => return Err(err(format!("its input is {fact:?}, not a fixed [1,3,S,S]"))),
            }
        }
    };
    let model = model
        .with_input_fact(0, f32::fact([1, 3, s, s]).into())
        .map_err(|e| err(format!("cannot set its input to [1,3,{s},{s}]: {e:#}")))?;
    Ok((model, s))
}

fn load_plan_inner(
    path: &Path,
    size: Option<usize>,
) -> Result<(std::sync::Arc<TypedRunnableModel>, Vec<usize>), VisionError> {
    let err = |reason: String| VisionError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let (model, s) = read_with_input(path, size, GraphForm::Fused)?;
    let optimise = |model: InferenceModel| -> TractResult<TypedModel> {
        let mut model = model.into_typed()?.into_decluttered()?;
        let taken = rewrite::take_products(&mut model)?;
        rewrite::unit_gathers_to_reshapes(&mut model)?;
        if taken > 0 {
            log::debug!(
                "{}: {taken} linear layers on this project's kernel",
                path.display()
            );
        }
        model.into_optimized()
    };
    let model = optimise(model).map_err(|e| {
        err(format!(
            "cannot optimise it for a [1,3,{s},{s}] input: {e:#}"
        ))
    })?;
    let out_fact = model
        .output_fact(0)
        .map_err(|e| err(format!("no output: {e:#}")))?;
    let got: Vec<usize> = out_fact
        .shape
        .as_concrete()
        .map(|d| d.to_vec())
        .unwrap_or_default();
    let plan = model
        .into_runnable()
        .map_err(|e| err(format!("cannot prepare it to run: {e:#}")))?;
    Ok((plan, got))
}

/// An encoder plan prepared by a tract runtime other than [`CPU_RUNTIME`], for a
/// `[1,3,size,size]` input, with its output shape.
fn prepare_on_runtime(
    path: &Path,
    size: Option<usize>,
    runtime: &str,
) -> Result<(Box<dyn Runnable>, Vec<usize>), VisionError> {
    let err = |reason: String| VisionError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let rt = tract_runtime(runtime).map_err(err)?;
    let model = load_typed(path, size)?;
    let output = model
        .output_fact(0)
        .ok()
        .and_then(|f| f.shape.as_concrete().map(|d| d.to_vec()))
        .unwrap_or_default();
    let runnable = rt.prepare(model).map_err(|e| {
        err(format!(
            "tract runtime {runtime:?} cannot prepare it: {e:#}"
        ))
    })?;
    Ok((runnable, output))
}

/// How an encoder runs: this crate's CPU plan, or a plan another tract runtime prepared. Either
/// keeps its run state from one run to the next and rebuilds it after a failed run.
pub(crate) enum EncoderRunner {
    Cpu(TractRunner),
    Runtime {
        state: KeptState<Box<dyn State>>,
        runnable: Box<dyn Runnable>,
    },
}

impl EncoderRunner {
    /// Load an encoder ONNX file on `runtime` for a `[1,3,size,size]` input (`None`: the size
    /// the file declares); returns the runner, the input size and the output shape.
    pub(crate) fn load(
        path: &Path,
        size: Option<usize>,
        runtime: &str,
    ) -> Result<(Self, usize, Vec<usize>), VisionError> {
        let side = |shape: Option<&[usize]>| shape.and_then(|d| d.get(3).copied()).unwrap_or(0);
        if runtime == CPU_RUNTIME {
            let (plan, got) = load_plan(path, size)?;
            let s = side(
                plan.model()
                    .input_fact(0)
                    .ok()
                    .and_then(|f| f.shape.as_concrete()),
            );
            Ok((EncoderRunner::Cpu(TractRunner::new(plan)), s, got))
        } else {
            let (runnable, got) =
                crate::llm::heap::loading_weights(|| prepare_on_runtime(path, size, runtime))?;
            let s = side(
                runnable
                    .input_fact(0)
                    .ok()
                    .and_then(|f| f.shape.as_concrete()),
            );
            let state = KeptState::new();
            Ok((EncoderRunner::Runtime { state, runnable }, s, got))
        }
    }

    pub(crate) fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        match self {
            EncoderRunner::Cpu(runner) => runner.run(inputs),
            EncoderRunner::Runtime { state, runnable } => {
                state.run(|| runnable.spawn(), |state| state.run(inputs))
            }
        }
    }

    /// The CPU plan's runner, where this is one.
    pub(crate) fn cpu(&self) -> Option<&TractRunner> {
        match self {
            EncoderRunner::Cpu(runner) => Some(runner),
            EncoderRunner::Runtime { .. } => None,
        }
    }
}

/// The vision tower + projector: normalised pixels `[1,3,S,S]` → image embeddings `[N, n_embd]`.
pub struct VisionEncoder {
    runner: EncoderRunner,
    runtime: String,
    preprocessor: std::sync::Arc<Preprocessor>,
    n_tokens: usize,
    n_embd: usize,
}

impl VisionEncoder {
    /// Load and optimise the ONNX model for a fixed input size, and check that its output is
    /// `[tokens, n_embd]`.
    pub fn load(path: &Path, spec: &ImageSpec, n_embd: usize) -> Result<Self, VisionError> {
        Self::load_on(path, spec, n_embd, CPU_RUNTIME)
    }

    /// [`VisionEncoder::load`] for the tract runtime `runtime`: [`CPU_RUNTIME`] (the default
    /// path) or another one this build has, e.g. `cuda` (docs/performance.md compares them).
    pub fn load_on(
        path: &Path,
        spec: &ImageSpec,
        n_embd: usize,
        runtime: &str,
    ) -> Result<Self, VisionError> {
        let (runner, _, got) = EncoderRunner::load(path, Some(spec.size as usize), runtime)?;
        if got.len() != 2 || got[1] != n_embd {
            return Err(VisionError::OutputShape {
                path: path.to_path_buf(),
                got,
                n_embd,
            });
        }
        Ok(Self {
            runner,
            runtime: runtime.to_string(),
            preprocessor: std::sync::Arc::new(Preprocessor::new(spec)),
            n_tokens: got[0],
            n_embd,
        })
    }

    /// The tract runtime this encoder runs on ([`CPU_RUNTIME`] unless chosen otherwise).
    pub fn runtime(&self) -> &str {
        &self.runtime
    }

    /// Number of image tokens (embedding rows) per image.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }

    pub fn spec(&self) -> &ImageSpec {
        self.preprocessor.spec()
    }

    /// Encode preprocessed pixels (from [`preprocess`]) to `n_tokens * n_embd` floats.
    pub fn encode_pixels(&self, pixels: &[f32]) -> Result<Vec<f32>, VisionError> {
        let s = self.spec().size as usize;
        let input = tract_ndarray::Array4::from_shape_vec((1, 3, s, s), pixels.to_vec())
            .map_err(|e| VisionError::Run(format!("pixel buffer: {e}")))?;
        let out = self
            .runner
            .run(tvec!(Tensor::from(input).into()))
            .map_err(|e| VisionError::Run(format!("{e:#}")))?;
        let view = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| VisionError::Run(format!("{e:#}")))?;
        let data: Vec<f32> = view.iter().copied().collect();
        debug_assert_eq!(data.len(), self.n_tokens * self.n_embd);
        Ok(data)
    }

    /// [`preprocess`] with this encoder's spec, reusing the plan while frames keep their size.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        self.preprocessor.preprocess(img)
    }

    /// The encoder's preprocessing, to run on another thread (the daemon's capture thread).
    pub fn preprocessor(&self) -> std::sync::Arc<Preprocessor> {
        self.preprocessor.clone()
    }

    /// Preprocess and encode an image.
    pub fn encode(&self, img: &RgbImage) -> Result<Vec<f32>, VisionError> {
        self.encode_pixels(&self.preprocess(img))
    }
}

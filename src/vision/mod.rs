//! Image preprocessing and the vision encoder (CLIP-style tower + projector, ONNX run by tract).
//!
//! Preprocessing is pure and follows what the model was trained with, as the bundle manifest
//! says:
//! * `crop` — the CLIP image processor that ChatPose runs: the short side resized to `size`
//!   with bicubic filtering, the long side to `int(long * size / short)`, then a centre crop
//!   (offsets rounded down);
//! * `pad` — LLaVA's pad-to-square: the image pasted centred on a square of the mean colour,
//!   then resized to `size`.
//!
//! Then `[0, 1]` scaling and per-channel mean/std normalisation, as planar CHW floats.
//!
//! The resize reproduces Pillow's bicubic (what the CLIP processor calls) exactly: a separable
//! cubic kernel with a = -0.5 whose support widens by the scale factor when shrinking,
//! weights normalised and rounded to 22-bit fixed point, a horizontal pass then a vertical one,
//! each rounded and clipped to 8 bits. Generic bicubic filters differ from it by up to ~18
//! levels on real images, which would move the pose.

mod decode;
pub mod linear;
pub mod ops;
mod panel;

pub use decode::{check_image_header, decode_image, load_image, load_image_limited, ImageLimits};

use std::path::{Path, PathBuf};
use tract_onnx::prelude::*;

/// How an image is brought to the encoder's square input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    Crop,
    Pad,
}

/// The encoder's input: side length, normalisation and resize mode (from the manifest).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub mode: ResizeMode,
}

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

/// Bring an image to the encoder's input: resize/crop or pad per `spec`, scale to `[0, 1]`,
/// normalise. Returns planar CHW floats, `3 * size * size` of them.
pub fn preprocess(img: &RgbImage, spec: &ImageSpec) -> Vec<f32> {
    SquarePlan::new(img.dimensions(), spec).preprocess(img)
}

/// The 8-bit `size`×`size` image the encoder sees, before normalisation.
pub fn to_square(img: &RgbImage, spec: &ImageSpec) -> RgbImage {
    SquarePlan::new(img.dimensions(), spec).square(img)
}

/// LLaVA's pad-to-square: the image pasted centred (offsets rounded down) on a square of its
/// long side, filled with the mean colour.
pub fn pad_to_square(img: &RgbImage, mean: &[f32; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let side = w.max(h);
    let fill = image::Rgb(mean.map(|m| (m * 255.0) as u8));
    let mut canvas = RgbImage::from_pixel(side, side, fill);
    image::imageops::replace(
        &mut canvas,
        img,
        ((side - w) / 2) as i64,
        ((side - h) / 2) as i64,
    );
    canvas
}

/// The size `crop` resizes a `w`×`h` image to before cutting the centre square: the short side
/// to `size`, the long side to the CLIP processor's `int(long * size / short)`, computed in
/// floating point as it does.
pub fn crop_resize_size((w, h): (u32, u32), size: u32) -> (u32, u32) {
    let (short, long) = if w <= h { (w, h) } else { (h, w) };
    let new_long = ((long as f64) * (size as f64) / (short as f64)) as u32;
    if w <= h {
        (size, new_long)
    } else {
        (new_long, size)
    }
}

/// Everything about bringing images of one size to the encoder's square that does not depend
/// on the pixels: filter windows and weights (computed once per frame size, since a camera
/// keeps its size), and the crop window. Only the output pixels that survive the crop are
/// computed, and only the rows the vertical pass reads go through the horizontal pass; every
/// computed pixel goes through exactly the arithmetic of a full resize (the two passes are
/// separable and each output depends on its own window only), so the result is the same.
#[derive(Debug, Clone)]
pub struct SquarePlan {
    input: (u32, u32),
    spec: ImageSpec,
    /// Pad mode: side of the square canvas the image is pasted on.
    canvas: Option<u32>,
    /// Horizontal pass (None: width unchanged, columns copied from `col0`).
    horizontal: Option<Axis>,
    col0: usize,
    vertical: Option<Axis>,
    row0: usize,
    /// Per channel: byte value → normalised float.
    lut: [[f32; 256]; 3],
}

/// One pass's windows for the kept output indices, all `taps` long (zero weights pad the
/// shorter ones, shifted so every window stays inside the input).
#[derive(Debug, Clone)]
struct Axis {
    starts: Vec<usize>,
    taps: usize,
    weights: Vec<i32>,
}

impl Axis {
    fn new(in_size: u32, out_size: u32, keep: std::ops::Range<u32>) -> Self {
        let c = coeffs(in_size, out_size);
        let windows = &c.windows[keep.start as usize..keep.end as usize];
        let longest = windows.iter().map(|(_, k)| k.len()).max().unwrap_or(0);
        // Padded up to a length the horizontal pass has an unrolled loop for, where the
        // input is long enough.
        let taps = match longest {
            0..=4 => 4,
            5..=6 => 6,
            7..=8 => 8,
            n => n,
        }
        .min(in_size as usize)
        .max(longest);
        let mut starts = Vec::with_capacity(windows.len());
        let mut weights = vec![0i32; windows.len() * taps];
        for (o, (xmin, k)) in windows.iter().enumerate() {
            // Every window lies inside [0, in_size) and no window is longer than the input,
            // so shifting the start left keeps the padded window inside too.
            let start = (*xmin).min(in_size as usize - taps);
            let shift = xmin - start;
            weights[o * taps + shift..o * taps + shift + k.len()].copy_from_slice(k);
            starts.push(start);
        }
        Self {
            starts,
            taps,
            weights,
        }
    }

    /// Input indices the kept outputs read.
    fn span(&self) -> std::ops::Range<usize> {
        let lo = self.starts.iter().copied().min().unwrap_or(0);
        let hi = self.starts.iter().map(|s| s + self.taps).max().unwrap_or(0);
        lo..hi
    }
}

impl SquarePlan {
    pub fn new((w, h): (u32, u32), spec: &ImageSpec) -> Self {
        let size = spec.size;
        let (canvas, (nw, nh), (left, top)) = match spec.mode {
            ResizeMode::Crop => {
                let (nw, nh) = crop_resize_size((w, h), size);
                (None, (nw, nh), ((nw - size) / 2, (nh - size) / 2))
            }
            ResizeMode::Pad => (Some(w.max(h)), (size, size), (0, 0)),
        };
        let (iw, ih) = canvas.map_or((w, h), |side| (side, side));
        let lut = std::array::from_fn(|c| {
            std::array::from_fn(|v| (v as f32 / 255.0 - spec.mean[c]) / spec.std[c])
        });
        Self {
            input: (w, h),
            spec: spec.clone(),
            canvas,
            horizontal: (nw != iw).then(|| Axis::new(iw, nw, left..left + size)),
            col0: left as usize,
            vertical: (nh != ih).then(|| Axis::new(ih, nh, top..top + size)),
            row0: top as usize,
            lut,
        }
    }

    /// The image size this plan was made for.
    pub fn input(&self) -> (u32, u32) {
        self.input
    }

    /// The square image, 8-bit.
    pub fn square(&self, img: &RgbImage) -> RgbImage {
        let size = self.spec.size;
        RgbImage::from_raw(size, size, self.square_bytes(img)).expect("size*size*3 bytes")
    }

    /// Square, scaled and normalised: planar CHW floats.
    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        let bytes = self.square_bytes(img);
        let plane = (self.spec.size * self.spec.size) as usize;
        let mut out = vec![0f32; 3 * plane];
        let (r, rest) = out.split_at_mut(plane);
        let (g, b) = rest.split_at_mut(plane);
        for (i, px) in bytes.chunks_exact(3).enumerate() {
            r[i] = self.lut[0][px[0] as usize];
            g[i] = self.lut[1][px[1] as usize];
            b[i] = self.lut[2][px[2] as usize];
        }
        out
    }

    fn square_bytes(&self, img: &RgbImage) -> Vec<u8> {
        assert_eq!(
            img.dimensions(),
            self.input,
            "image size differs from the plan's"
        );
        let padded;
        let img = match self.canvas {
            Some(_) => {
                padded = pad_to_square(img, &self.spec.mean);
                &padded
            }
            None => img,
        };
        let size = self.spec.size as usize;
        let (w, h) = (img.width() as usize, img.height() as usize);
        let src = img.as_raw();
        // Rows the vertical pass reads (or the kept rows themselves when height is unchanged).
        let rows = match &self.vertical {
            Some(v) => v.span(),
            None => self.row0..self.row0 + size,
        };
        // Horizontal pass over those rows only: `size` columns each.
        let stride = size * 3;
        let mut mid = vec![0u8; rows.len() * stride];
        for (r, y) in rows.clone().enumerate() {
            let row = &src[y * w * 3..(y + 1) * w * 3];
            let dst = &mut mid[r * stride..(r + 1) * stride];
            match &self.horizontal {
                // Windows padded to 4, 6 or 8 taps (down to half size) get an unrolled loop.
                Some(a) => match a.taps {
                    4 => horizontal_row::<4>(a, row, dst),
                    6 => horizontal_row::<6>(a, row, dst),
                    8 => horizontal_row::<8>(a, row, dst),
                    _ => horizontal_row_any(a, row, dst),
                },
                None => dst.copy_from_slice(&row[self.col0 * 3..(self.col0 + size) * 3]),
            }
        }
        let Some(v) = &self.vertical else {
            return mid;
        };
        debug_assert!(rows.end <= h);
        // Vertical pass: whole rows at a time, so the inner loop runs along memory.
        let mut out = vec![0u8; size * stride];
        let mut acc = vec![0i32; stride];
        for (yy, (&start, k)) in v
            .starts
            .iter()
            .zip(v.weights.chunks_exact(v.taps))
            .enumerate()
        {
            acc.fill(1 << (PRECISION_BITS - 1));
            for (i, &kw) in k.iter().enumerate() {
                let r = start + i - rows.start;
                for (a, &p) in acc.iter_mut().zip(&mid[r * stride..(r + 1) * stride]) {
                    *a += p as i32 * kw;
                }
            }
            for (o, &a) in out[yy * stride..(yy + 1) * stride].iter_mut().zip(&acc) {
                *o = clip8(a as i64);
            }
        }
        out
    }
}

/// Scale to `[0, 1]` and normalise per channel; planar CHW.
pub fn normalise(square: &RgbImage, spec: &ImageSpec) -> Vec<f32> {
    let plane = (square.width() * square.height()) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, px) in square.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (px[c] as f32 / 255.0 - spec.mean[c]) / spec.std[c];
        }
    }
    out
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output index: the first input index and the fixed-point weights of its window.
struct Coeffs {
    windows: Vec<(usize, Vec<i32>)>,
}

fn coeffs(in_size: u32, out_size: u32) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let windows = (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // Truncating casts of (value + 0.5), exactly as the reference rounds.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let fixed = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let scaled = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect();
    Coeffs { windows }
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow-exact bicubic resize (see the module docs). A pass whose size does not change is
/// skipped, as in the reference.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let horizontal = if width != w {
        let c = coeffs(w, width);
        let mut out = RgbImage::new(width, h);
        let src = img.as_raw();
        let dst: &mut [u8] = &mut out;
        for y in 0..h as usize {
            let row = &src[y * w as usize * 3..(y + 1) * w as usize * 3];
            for (xx, (xmin, k)) in c.windows.iter().enumerate() {
                for ch in 0..3 {
                    let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &kw) in k.iter().enumerate() {
                        ss += row[(xmin + i) * 3 + ch] as i64 * kw as i64;
                    }
                    dst[(y * width as usize + xx) * 3 + ch] = clip8(ss);
                }
            }
        }
        out
    } else {
        img.clone()
    };
    if height == h {
        return horizontal;
    }
    let c = coeffs(h, height);
    let mut out = RgbImage::new(width, height);
    let src = horizontal.as_raw();
    let stride = width as usize * 3;
    let dst: &mut [u8] = &mut out;
    for (yy, (ymin, k)) in c.windows.iter().enumerate() {
        for x in 0..stride {
            let mut ss: i64 = 1 << (PRECISION_BITS - 1);
            for (i, &kw) in k.iter().enumerate() {
                ss += src[(ymin + i) * stride + x] as i64 * kw as i64;
            }
            dst[yy * stride + x] = clip8(ss);
        }
    }
    out
}

/// Read, optimise and prepare an encoder ONNX file for a `[1,3,size,size]` input (`None`: the
/// size the file declares). Returns the runnable plan and the output shape.
pub fn load_plan(
    path: &Path,
    size: Option<usize>,
) -> Result<(std::sync::Arc<TypedRunnableModel>, Vec<usize>), VisionError> {
    crate::llm::heap::loading_weights(|| load_plan_inner(path, size))
}

/// Read an encoder ONNX file for a `[1,3,size,size]` input (`None`: the size the file
/// declares) and simplify it without choosing kernels: the form another tract runtime (e.g.
/// CUDA, `bench-vision --runtime`) prepares itself.
pub fn load_typed(path: &Path, size: Option<usize>) -> Result<TypedModel, VisionError> {
    let (model, s) = read_with_input(path, size)?;
    model
        .into_typed()
        .and_then(|m| m.into_decluttered())
        .map_err(|e| VisionError::Model {
            path: path.to_path_buf(),
            reason: format!("cannot type it for a [1,3,{s},{s}] input: {e:#}"),
        })
}

/// The ONNX file read with the fused operators registered and its input set to
/// `[1,3,S,S]`, with S.
fn read_with_input(
    path: &Path,
    size: Option<usize>,
) -> Result<(InferenceModel, usize), VisionError> {
    let err = |reason: String| VisionError::Model {
        path: path.to_path_buf(),
        reason,
    };
    let model = ops::onnx().model_for_path(path).map_err(|e| {
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
    let (model, s) = read_with_input(path, size)?;
    let optimise = |model: InferenceModel| -> TractResult<TypedModel> {
        let mut model = model.into_typed()?.into_decluttered()?;
        let taken = linear::take_products(&mut model)?;
        unit_gathers_to_reshapes(&mut model)?;
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

/// Replace each gather of index 0 along an axis of length 1 (how an exported tower drops its
/// batch axis) by the removal of that axis, which leaves the values where they are instead of
/// copying them (ViT-L's projector output: 9 MB).
fn unit_gathers_to_reshapes(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::array::Gather;
    use tract_onnx::tract_core::ops::change_axes::AxisOp;
    let mut replaced = 0;
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(gather) = node.op_as::<Gather>() else {
            continue;
        };
        let [data, index] = node.inputs[..] else {
            continue;
        };
        let unit = model.outlet_fact(data)?.shape.get(gather.axis) == Some(&1.to_dim());
        let zero = model.outlet_fact(index)?.konst.as_ref().is_some_and(|i| {
            i.rank() == 0 && i.cast_to_scalar::<i64>().is_ok_and(|i| i == 0 || i == -1)
        });
        if !(unit && zero && gather.output_type.is_none()) {
            continue;
        }
        let name = node.name.clone();
        let mut patch = TypedModelPatch::default();
        let input = patch.tap_model(model, data)?;
        let out = patch.wire_node(&name, AxisOp::Rm(gather.axis), &[input])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), out)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

/// One row of the horizontal pass for windows of exactly `N` taps: the tap loop has a fixed
/// length, so it unrolls and needs no bounds checks.
fn horizontal_row<const N: usize>(a: &Axis, row: &[u8], dst: &mut [u8]) {
    for ((&start, k), out) in a
        .starts
        .iter()
        .zip(a.weights.chunks_exact(N))
        .zip(dst.chunks_exact_mut(3))
    {
        let win = &row[start * 3..][..N * 3];
        let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
        for t in 0..N {
            acc[0] += win[t * 3] as i32 * k[t];
            acc[1] += win[t * 3 + 1] as i32 * k[t];
            acc[2] += win[t * 3 + 2] as i32 * k[t];
        }
        for c in 0..3 {
            out[c] = clip8(acc[c] as i64);
        }
    }
}

fn horizontal_row_any(a: &Axis, row: &[u8], dst: &mut [u8]) {
    for (xx, (&start, k)) in a
        .starts
        .iter()
        .zip(a.weights.chunks_exact(a.taps))
        .enumerate()
    {
        let win = &row[start * 3..(start + a.taps) * 3];
        let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
        for (px, &kw) in win.chunks_exact(3).zip(k) {
            acc[0] += px[0] as i32 * kw;
            acc[1] += px[1] as i32 * kw;
            acc[2] += px[2] as i32 * kw;
        }
        for c in 0..3 {
            dst[xx * 3 + c] = clip8(acc[c] as i64);
        }
    }
}

/// Multiply-adds per run from which a plan runs on tract's pool (see [`on_tract_pool`]):
/// about a millisecond of work. Moving a run onto the pool costs tens of microseconds, more
/// than a small pose head or the tiny test tower saves by it.
const POOL_MIN_FMA: u64 = 100_000_000;

/// Run `f` on a thread of tract's matrix-product pool when tract has one (else here).
///
/// Every parallel operator hands its work to that pool. Called from outside the pool, each
/// hand-off queues the work, wakes a pool thread and puts this thread to sleep until it is done
/// (about 160 hand-offs per ViT-B/16 run). Called from a pool thread, an operator runs its share
/// at once on that thread and wakes only the other workers: a ViT-B/16 run at two threads took
/// 2 % less time this way (docs/performance.md).
fn on_tract_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match tract_linalg::multithread::current_tract_executor() {
        tract_linalg::multithread::Executor::MultiThread(pool) => pool.install(f),
        _ => f(),
    }
}

/// Multiply-adds of one run of `model`, as its operators state them (0 where one cannot say).
pub(crate) fn fma_per_run(model: &TypedModel) -> u64 {
    model
        .nodes()
        .iter()
        .filter_map(|node| {
            let inputs = model.node_input_facts(node.id).ok()?;
            node.op.cost(&inputs).ok()
        })
        .flatten()
        .filter(|(cost, _)| matches!(cost, tract_onnx::tract_core::ops::Cost::FMA(_)))
        .map(|(_, n)| n.to_i64().map_or(0, |n| n.max(0) as u64))
        .sum()
}

/// A tract plan with its run state kept between runs: spawning a fresh state per run (what
/// `plan.run` does) costs more than the whole pose head on a small model. After a failed run
/// the state is rebuilt, so a bad input cannot leave stale values behind. Large plans run on
/// tract's pool ([`on_tract_pool`]).
#[derive(Debug)]
pub(crate) struct TractRunner {
    plan: std::sync::Arc<TypedRunnableModel>,
    state: KeptState<TypedSimpleState>,
    on_pool: bool,
}

/// A plan's run state kept from one run to the next (spawned on first use); a failed run drops
/// it, so the next run starts from a fresh one.
#[derive(Debug)]
pub(crate) struct KeptState<S>(std::sync::Mutex<Option<S>>);

impl<S> KeptState<S> {
    fn new() -> Self {
        Self(std::sync::Mutex::new(None))
    }

    fn run<R>(
        &self,
        spawn: impl FnOnce() -> TractResult<S>,
        run: impl FnOnce(&mut S) -> TractResult<R>,
    ) -> TractResult<R> {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = match slot.take() {
            Some(state) => state,
            None => spawn()?,
        };
        let out = run(&mut state)?;
        *slot = Some(state);
        Ok(out)
    }
}

impl TractRunner {
    pub(crate) fn new(plan: std::sync::Arc<TypedRunnableModel>) -> Self {
        let on_pool = fma_per_run(plan.model()) >= POOL_MIN_FMA;
        Self {
            plan,
            state: KeptState::new(),
            on_pool,
        }
    }

    pub(crate) fn run(&self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        self.state.run(
            || self.plan.spawn(),
            |state| self.on_its_thread(|| state.run(inputs)),
        )
    }

    /// Run `f` where this plan's runs happen: on tract's pool for a large plan, else here.
    pub(crate) fn on_its_thread<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        if self.on_pool {
            on_tract_pool(f)
        } else {
            f()
        }
    }

    pub(crate) fn plan(&self) -> &std::sync::Arc<TypedRunnableModel> {
        &self.plan
    }
}

/// [`preprocess`] for one encoder's spec, keeping the plan of the last frame size seen (a
/// camera keeps its size, so the plan is built once). Shareable between threads.
#[derive(Debug)]
pub struct Preprocessor {
    spec: ImageSpec,
    plan: std::sync::Mutex<Option<std::sync::Arc<SquarePlan>>>,
}

impl Preprocessor {
    pub fn new(spec: &ImageSpec) -> Self {
        Self {
            spec: spec.clone(),
            plan: std::sync::Mutex::new(None),
        }
    }

    pub fn spec(&self) -> &ImageSpec {
        &self.spec
    }

    pub fn preprocess(&self, img: &RgbImage) -> Vec<f32> {
        let plan = {
            let mut slot = self.plan.lock().unwrap_or_else(|p| p.into_inner());
            match &*slot {
                Some(plan) if plan.input() == img.dimensions() => plan.clone(),
                _ => {
                    let plan = std::sync::Arc::new(SquarePlan::new(img.dimensions(), &self.spec));
                    *slot = Some(plan.clone());
                    plan
                }
            }
        };
        plan.preprocess(img)
    }
}

/// The tract runtime name of the encoder's default path: this crate's own CPU plan, with its
/// fused operators and thread handling ([`load_plan`], `TractRunner`).
pub const CPU_RUNTIME: &str = "cpu";

/// The tract runtime called `name` (e.g. `cuda` on a build with the `vision-cuda` feature;
/// `default` is tract's generic CPU runtime), or an error that says which runtimes this build
/// can use here.
pub fn tract_runtime(name: &str) -> Result<&'static dyn Runtime, String> {
    let usable = || {
        // tract calls its generic CPU runtime "cpu" too; here that name is this crate's plan.
        let mut names = vec![CPU_RUNTIME.to_string(), "default".to_string()];
        names.extend(
            runtimes()
                .map(|r| r.name().to_string())
                .filter(|n| n != "cpu"),
        );
        names.join(", ")
    };
    match runtime_for_name(name) {
        Ok(Some(rt)) => Ok(rt),
        Ok(None) => Err(format!(
            "tract runtime {name:?} is not in this build (usable here: {}; \"cuda\" needs a build \
             with --features vision-cuda)",
            usable()
        )),
        Err(e) => Err(format!(
            "tract runtime {name:?} cannot run here: {e:#} (usable here: {})",
            usable()
        )),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gather_of_a_unit_axis_becomes_its_removal_and_other_gathers_stay() {
        use tract_onnx::tract_core::ops::array::Gather;
        // (data shape, axis, index, replaced)
        let cases: &[(&[usize], usize, i64, bool)] = &[
            (&[1, 5, 3], 0, 0, true),
            (&[5, 1, 3], 1, -1, true),
            (&[2, 5, 3], 0, 1, false),
            (&[2, 5, 3], 0, 0, false),
        ];
        for &(shape, axis, index, replaced) in cases {
            let what = format!("{shape:?}, axis {axis}, index {index}");
            let mut model = TypedModel::default();
            let x = model.add_source("x", f32::fact(shape)).unwrap();
            let i = model.add_const("i", tensor0(index)).unwrap();
            let y = model
                .wire_node("gather", Gather::new(axis), &[x, i])
                .unwrap();
            model.select_output_outlets(&y).unwrap();
            let mut ours = model.clone();
            let n = unit_gathers_to_reshapes(&mut ours).unwrap();
            assert_eq!(n, replaced as usize, "{what}");
            let len = shape.iter().product();
            let values: Vec<f32> = (0..len).map(|v| v as f32 * 0.5 - 3.0).collect();
            let x = Tensor::from_shape(shape, &values).unwrap();
            let run = |m: TypedModel| {
                let plan = m.into_optimized().unwrap().into_runnable().unwrap();
                plan.run(tvec!(x.clone().into_tvalue())).unwrap().remove(0)
            };
            let (want, got) = (run(model), run(ours));
            assert_eq!(got.shape(), want.shape(), "{what}");
            assert_eq!(
                got.to_plain_array_view::<f32>().unwrap(),
                want.to_plain_array_view::<f32>().unwrap(),
                "{what}"
            );
        }
    }

    #[test]
    fn fma_per_run_counts_a_matrix_product_before_and_after_optimisation() {
        use tract_onnx::tract_core::ops::einsum::EinSum;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([8, 16])).unwrap();
        let w = model
            .add_const("w", Tensor::from_shape(&[16, 4], &[0.5f32; 64]).unwrap())
            .unwrap();
        let axes = "mk,kn->mn".parse().unwrap();
        let y = model
            .wire_node("mm", EinSum::new(axes, f32::datum_type()), &[x, w])
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        assert_eq!(fma_per_run(&model), 8 * 16 * 4);
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        assert_eq!(fma_per_run(plan.model()), 8 * 16 * 4);
        // Far below the pool threshold: such a plan runs on the calling thread.
        assert!(!TractRunner::new(plan).on_pool);
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
    }

    /// The straightforward form: resize the whole image (or padded canvas), then crop.
    fn full_resize_then_crop(img: &RgbImage, spec: &ImageSpec) -> RgbImage {
        let size = spec.size;
        let (w, h) = img.dimensions();
        match spec.mode {
            ResizeMode::Crop => {
                let (nw, nh) = crop_resize_size((w, h), size);
                let resized = resize_bicubic(img, nw, nh);
                image::imageops::crop_imm(&resized, (nw - size) / 2, (nh - size) / 2, size, size)
                    .to_image()
            }
            ResizeMode::Pad => resize_bicubic(&pad_to_square(img, &spec.mean), size, size),
        }
    }

    #[test]
    fn the_cropped_plan_computes_what_a_full_resize_then_crop_does() {
        // Sizes around the square (passes skipped), up- and down-scaling, extreme aspect
        // ratios, a 1-pixel-wide image; noisy pixels so every weight matters.
        let mut seed = 7u32;
        let mut noise = |w: u32, h: u32| {
            RgbImage::from_fn(w, h, |_, _| {
                let mut px = [0u8; 3];
                for p in &mut px {
                    seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                    *p = (seed >> 24) as u8;
                }
                image::Rgb(px)
            })
        };
        let sizes = [
            (56, 56),
            (56, 90),
            (90, 56),
            (60, 90),
            (57, 120),
            (301, 197),
            (640, 480),
            (33, 20),
            (1, 40),
            (40, 1),
            (500, 56),
            (7, 9),
        ];
        let mut checked = 0;
        for &(w, h) in &sizes {
            let img = noise(w, h);
            for size in [16, 56, 224] {
                for mode in [ResizeMode::Crop, ResizeMode::Pad] {
                    let spec = ImageSpec {
                        size,
                        mean: [0.48, 0.46, 0.41],
                        std: [0.27, 0.26, 0.28],
                        mode,
                    };
                    let want = full_resize_then_crop(&img, &spec);
                    assert_eq!(to_square(&img, &spec), want, "{w}x{h} -> {size} {mode:?}");
                    assert_eq!(preprocess(&img, &spec), normalise(&want, &spec));
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, sizes.len() * 6);
    }

    #[test]
    fn kernel_weights_are_normalised_and_symmetric() {
        let c = coeffs(100, 37);
        for (_, k) in &c.windows {
            let sum: i64 = k.iter().map(|&v| v as i64).sum();
            // Rounding each weight moves the sum by at most half a unit per tap.
            assert!((sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64);
        }
        // Upscaling by 2: the interior window has 5 taps (support 2), mirrored weights pairs.
        let up = coeffs(10, 20);
        assert!(up.windows[10].1.len() <= 5);
    }

    #[test]
    fn same_size_resize_is_identity_and_constant_stays_constant() {
        let img = gradient(17, 9);
        assert_eq!(resize_bicubic(&img, 17, 9), img);
        let flat = RgbImage::from_pixel(31, 23, image::Rgb([200, 10, 90]));
        let r = resize_bicubic(&flat, 12, 40);
        assert!(r.pixels().all(|p| p.0 == [200, 10, 90]));
    }

    #[test]
    fn crop_and_pad_differ_for_a_non_square_image_only() {
        let spec = |mode| ImageSpec {
            size: 16,
            mean: [0.5, 0.4, 0.3],
            std: [0.2, 0.25, 0.3],
            mode,
        };
        let wide = gradient(40, 20);
        let a = preprocess(&wide, &spec(ResizeMode::Crop));
        let b = preprocess(&wide, &spec(ResizeMode::Pad));
        assert_eq!(a.len(), 3 * 16 * 16);
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 0.1));
        let square = gradient(32, 32);
        assert_eq!(
            preprocess(&square, &spec(ResizeMode::Crop)),
            preprocess(&square, &spec(ResizeMode::Pad))
        );
    }

    #[test]
    fn pad_fills_with_the_mean_colour_which_normalises_to_zero() {
        let spec = ImageSpec {
            size: 8,
            mean: [0.2, 0.6, 1.0],
            std: [0.5, 0.5, 0.5],
            mode: ResizeMode::Pad,
        };
        // A 1-pixel-high strip: almost all of the square is padding.
        let strip = RgbImage::from_pixel(64, 2, image::Rgb([255, 255, 255]));
        let px = preprocess(&strip, &spec);
        // Top-left pixel of each plane is padding: (byte(mean*255)/255 - mean)/std ≈ 0.
        for c in 0..3 {
            assert!(px[c * 64].abs() < 0.01, "channel {c}: {}", px[c * 64]);
        }
    }
}

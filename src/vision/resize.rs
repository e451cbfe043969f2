//! Pillow-exact bicubic resize (what the CLIP image processor calls): a separable cubic kernel
//! with a = -0.5 whose support widens by the scale factor when shrinking, weights normalised
//! and rounded to 22-bit fixed point, a horizontal pass then a vertical one, each rounded and
//! clipped to 8 bits. Generic bicubic filters differ from it by up to ~18 levels on real
//! images, which would move the pose.

use super::preprocess::{crop_resize_size, pad_to_square, ImageSpec, ResizeMode};
use super::RgbImage;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vision::preprocess::tests::gradient;
    use crate::vision::preprocess::{normalise, preprocess, to_square};

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
}

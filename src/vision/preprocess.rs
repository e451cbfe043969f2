//! Bringing an image to the encoder's input, as the model was trained (the bundle manifest
//! says which):
//! * `crop` — the CLIP image processor that ChatPose runs: the short side resized to `size`
//!   with bicubic filtering, the long side to `int(long * size / short)`, then a centre crop
//!   (offsets rounded down);
//! * `pad` — LLaVA's pad-to-square: the image pasted centred on a square of the mean colour,
//!   then resized to `size`.
//!
//! Then `[0, 1]` scaling and per-channel mean/std normalisation, as planar CHW floats. The
//! resize itself is in [`super::resize`].

use super::resize::SquarePlan;
use super::RgbImage;

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

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::vision) fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
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

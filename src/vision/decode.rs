//! Decoding JPEG and PNG images from outside (asks, files, cameras) within size limits.
//!
//! An image's header states its size before any pixel is decoded, and a few hundred bytes can
//! announce a picture of billions of pixels. So the header is read first and the image is
//! refused when a side, the pixel count or the aspect ratio is over its limit: a refusal costs
//! microseconds, where decoding a 200000 × 1 PNG took seconds and hundreds of megabytes.

use super::{RgbImage, VisionError};
use std::io::Cursor;
use std::path::Path;

/// Limits every decoded image must meet (config `[image_limits]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageLimits {
    /// Longest side, in pixels.
    pub max_side: u32,
    /// Width × height.
    pub max_pixels: u64,
    /// Long side / short side.
    pub max_aspect: f64,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self {
            max_side: 8192,
            max_pixels: 40_000_000,
            max_aspect: 20.0,
        }
    }
}

impl ImageLimits {
    /// Whether an image of `width` × `height` may be decoded; the error names the limit.
    pub fn check(&self, width: u32, height: u32, what: &str) -> Result<(), VisionError> {
        let too_large = |limit: String| VisionError::TooLarge {
            what: what.to_string(),
            width,
            height,
            limit,
        };
        if width == 0 || height == 0 {
            return Err(VisionError::EmptyImage {
                what: what.to_string(),
            });
        }
        if width.max(height) > self.max_side {
            return Err(too_large(format!(
                "image_limits.max_side = {} pixels",
                self.max_side
            )));
        }
        if u64::from(width) * u64::from(height) > self.max_pixels {
            return Err(too_large(format!(
                "image_limits.max_pixels = {}",
                self.max_pixels
            )));
        }
        let aspect = f64::from(width.max(height)) / f64::from(width.min(height));
        if aspect > self.max_aspect {
            return Err(too_large(format!(
                "image_limits.max_aspect = {} (this one is {aspect:.1})",
                self.max_aspect
            )));
        }
        Ok(())
    }
}

/// The format and size of a JPEG or PNG, read from its header, within `limits`: what a
/// decode would cost, known in microseconds.
pub fn check_image_header(
    bytes: &[u8],
    what: &str,
    limits: &ImageLimits,
) -> Result<(image::ImageFormat, u32, u32), VisionError> {
    let not_an_image = |reason: String| VisionError::NotAnImage {
        what: what.to_string(),
        reason,
    };
    let format = image::guess_format(bytes).map_err(|e| not_an_image(e.to_string()))?;
    if !matches!(format, image::ImageFormat::Jpeg | image::ImageFormat::Png) {
        return Err(not_an_image(format!("it is {format:?}")));
    }
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| not_an_image(e.to_string()))?;
    limits.check(width, height, what)?;
    Ok((format, width, height))
}

/// Decode a JPEG or PNG from memory within `limits`. `what` names the source in errors (a
/// path, "field `image.inline`").
pub fn decode_image(
    bytes: &[u8],
    what: &str,
    limits: &ImageLimits,
) -> Result<RgbImage, VisionError> {
    let not_an_image = |reason: String| VisionError::NotAnImage {
        what: what.to_string(),
        reason,
    };
    let (format, width, height) = check_image_header(bytes, what, limits)?;
    let reader = || image::ImageReader::with_format(Cursor::new(bytes), format);
    // The decoder's own allocation limit as a second guard: the RGBA the PNG decoder may
    // expand to, plus room for the RGB copy.
    let mut decoder = reader();
    let mut image_limits = image::Limits::default();
    image_limits.max_image_width = Some(width);
    image_limits.max_image_height = Some(height);
    image_limits.max_alloc = Some(u64::from(width) * u64::from(height) * 16 + (1 << 20));
    decoder.limits(image_limits);
    let img = decoder
        .decode()
        .map_err(|e| not_an_image(e.to_string()))?
        .to_rgb8();
    Ok(img)
}

/// Read and decode an image file within `limits`.
pub fn load_image_limited(path: &Path, limits: &ImageLimits) -> Result<RgbImage, VisionError> {
    let bytes = std::fs::read(path).map_err(|cause| VisionError::ReadImage {
        path: path.to_path_buf(),
        cause,
    })?;
    decode_image(&bytes, &path.display().to_string(), limits)
}

/// Read and decode an image file within the default limits (command-line use).
pub fn load_image(path: &Path) -> Result<RgbImage, VisionError> {
    load_image_limited(path, &ImageLimits::default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(width: u32, height: u32) -> Vec<u8> {
        let img = RgbImage::from_pixel(width, height, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
            .expect("encode png");
        out
    }

    #[test]
    fn images_within_the_limits_decode() {
        let img = decode_image(&png(40, 30), "test", &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (40, 30));
    }

    #[test]
    fn each_limit_refuses_from_the_header_and_names_itself() {
        let limits = ImageLimits {
            max_side: 100,
            max_pixels: 5000,
            max_aspect: 4.0,
        };
        for ((w, h), key) in [
            ((101, 50), "image_limits.max_side"),
            ((80, 80), "image_limits.max_pixels"),
            ((100, 20), "image_limits.max_aspect"),
        ] {
            let e = decode_image(&png(w, h), "field `image.inline`", &limits).unwrap_err();
            assert!(matches!(e, VisionError::TooLarge { .. }), "{e}");
            let text = e.to_string();
            assert!(
                text.contains(key) && text.contains(&format!("{w} x {h}")),
                "{text}"
            );
        }
        assert!(decode_image(&png(60, 60), "ok", &limits).is_ok());
    }

    #[test]
    fn a_huge_header_on_a_few_bytes_is_refused_without_decoding() {
        // A valid PNG of 200000 x 1 pixels in a few kilobytes.
        let bytes = png(200_000, 1);
        assert!(bytes.len() < 8192, "{}", bytes.len());
        let e = decode_image(&bytes, "inline", &ImageLimits::default()).unwrap_err();
        assert!(e.to_string().contains("image_limits.max_side"), "{e}");
    }

    #[test]
    fn jpeg_and_png_both_decode() {
        let img = RgbImage::from_fn(48, 32, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 7) as u8, 128])
        });
        for format in [image::ImageFormat::Jpeg, image::ImageFormat::Png] {
            let mut bytes = Cursor::new(Vec::new());
            image::DynamicImage::ImageRgb8(img.clone())
                .write_to(&mut bytes, format)
                .unwrap();
            let back = decode_image(bytes.get_ref(), "frame", &ImageLimits::default()).unwrap();
            assert_eq!(back.dimensions(), (48, 32));
            // PNG is lossless; JPEG stays close on a smooth gradient.
            let worst = back
                .as_raw()
                .iter()
                .zip(img.as_raw())
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            let limit = if format == image::ImageFormat::Png {
                0
            } else {
                24
            };
            assert!(worst <= limit, "{format:?}: max difference {worst}");
        }
    }

    #[test]
    fn non_images_are_refused_with_their_name() {
        let e = decode_image(
            b"definitely not an image",
            "notes.txt",
            &ImageLimits::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("notes.txt"), "{e}");
        // A GIF header is an image, but not one the daemon takes.
        let e = decode_image(
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
            "anim.gif",
            &ImageLimits::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("anim.gif"), "{e}");
    }
}

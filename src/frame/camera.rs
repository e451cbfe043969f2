//! Cameras through nokhwa (V4L2 on Linux): by index or by name, at a requested resolution and
//! frame rate (the negotiated format is logged). MJPEG frames are decoded with the image crate,
//! YUYV with nokhwa's converter. A camera that fails or disappears is reported, then reopened
//! with a growing pause until it returns.

use super::{FrameError, FrameSource, Next};
use crate::vision::{decode_image, ImageLimits, RgbImage};
use nokhwa::pixel_format::RgbFormat;
use nokhwa::utils::{
    ApiBackend, CameraFormat, CameraIndex, CameraInfo, FrameFormat, RequestedFormat,
    RequestedFormatType, Resolution,
};
use nokhwa::Camera;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What `posegpt-edge cameras` prints per device.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CameraEntry {
    pub index: String,
    pub name: String,
    pub description: String,
}

/// The cameras the system offers. An error means the camera API itself is unusable.
pub fn list_cameras() -> Result<Vec<CameraEntry>, String> {
    let infos = nokhwa::query(ApiBackend::Auto).map_err(|e| e.to_string())?;
    Ok(infos.iter().map(entry).collect())
}

fn entry(info: &CameraInfo) -> CameraEntry {
    CameraEntry {
        index: info.index().to_string(),
        name: info.human_name(),
        description: info.description().to_string(),
    }
}

/// Capture settings.
#[derive(Debug, Clone)]
pub struct CameraRequest {
    /// An index ("0") or part of a camera's name ("Logitech").
    pub selector: String,
    pub width: u32,
    pub height: u32,
    pub fps: u32,
}

/// What the capture loop needs from an open camera: nokhwa's, or a scripted one in tests.
trait Device {
    fn grab(&mut self) -> Result<RgbImage, Grab>;
}

/// Why no image came from [`Device::grab`].
enum Grab {
    /// This frame is unusable (the device still works).
    Bad(String),
    /// The device failed or disappeared: close it and reopen.
    Lost(String),
}

impl Device for Camera {
    fn grab(&mut self) -> Result<RgbImage, Grab> {
        let buffer = self.frame().map_err(|e| Grab::Lost(e.to_string()))?;
        let res = buffer.resolution();
        to_rgb(
            buffer.source_frame_format(),
            res.width(),
            res.height(),
            buffer.buffer(),
        )
        .map_err(Grab::Bad)
    }
}

type Opener = Box<dyn FnMut() -> Result<Box<dyn Device>, String>>;

/// First and longest pause between attempts to reopen a lost camera.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

pub struct CameraSource {
    selector: String,
    open: Opener,
    camera: Option<Box<dyn Device>>,
    retry_in: Duration,
    first_retry: Duration,
    longest_retry: Duration,
}

impl CameraSource {
    /// Open and close the camera to check that it exists and streams; the error names the
    /// camera and what was tried.
    pub fn probe(request: &CameraRequest) -> Result<(), FrameError> {
        open_camera(request)
            .map(drop)
            .map_err(|problem| FrameError::Source {
                path: PathBuf::from(format!("camera {}", request.selector)),
                problem,
            })
    }

    /// Open the camera on this thread; if that fails, the source starts in its retry state
    /// (reported as unavailable until the camera comes back).
    pub fn connect(request: CameraRequest) -> Self {
        let selector = request.selector.clone();
        let open: Opener =
            Box::new(move || open_camera(&request).map(|c| Box::new(c) as Box<dyn Device>));
        Self::with_opener(selector, open, FIRST_RETRY, LONGEST_RETRY)
    }

    fn with_opener(
        selector: String,
        mut open: Opener,
        first_retry: Duration,
        longest_retry: Duration,
    ) -> Self {
        let camera = match open() {
            Ok(c) => Some(c),
            Err(e) => {
                log::warn!("camera {selector}: {e}; retrying");
                None
            }
        };
        Self {
            selector,
            open,
            camera,
            retry_in: first_retry,
            first_retry,
            longest_retry,
        }
    }
}

fn resolve_index(selector: &str) -> Result<CameraIndex, String> {
    if let Ok(i) = selector.parse::<u32>() {
        return Ok(CameraIndex::Index(i));
    }
    let cameras =
        nokhwa::query(ApiBackend::Auto).map_err(|e| format!("cannot list cameras: {e}"))?;
    let wanted = selector.to_lowercase();
    cameras
        .iter()
        .find(|c| c.human_name().to_lowercase().contains(&wanted))
        .map(|c| c.index().clone())
        .ok_or_else(|| {
            let names: Vec<String> = cameras.iter().map(|c| c.human_name()).collect();
            format!("no camera's name contains {selector:?} (cameras: {names:?}); run `posegpt-edge cameras`")
        })
}

fn open_camera(request: &CameraRequest) -> Result<Camera, String> {
    let index = resolve_index(&request.selector)?;
    let wanted = CameraFormat::new(
        Resolution::new(request.width, request.height),
        FrameFormat::MJPEG,
        request.fps,
    );
    let format = RequestedFormat::new::<RgbFormat>(RequestedFormatType::Closest(wanted));
    let mut camera = Camera::new(index.clone(), format).map_err(|e| {
        format!("cannot open camera {index}: {e}; run `posegpt-edge cameras` to see what exists")
    })?;
    camera
        .open_stream()
        .map_err(|e| format!("camera {index} opened but will not stream: {e}"))?;
    let got = camera.camera_format();
    log::info!(
        "camera {} ({}): asked {}x{} @ {} fps, got {}x{} @ {} fps {}",
        index,
        camera.info().human_name(),
        request.width,
        request.height,
        request.fps,
        got.resolution().width(),
        got.resolution().height(),
        got.frame_rate(),
        got.format()
    );
    Ok(camera)
}

/// One camera buffer to RGB.
fn to_rgb(format: FrameFormat, width: u32, height: u32, data: &[u8]) -> Result<RgbImage, String> {
    let raw = match format {
        FrameFormat::MJPEG => {
            return decode_image(data, "camera frame", &ImageLimits::default())
                .map_err(|e| e.to_string())
        }
        FrameFormat::YUYV => {
            nokhwa::utils::yuyv422_to_rgb(data, false).map_err(|e| e.to_string())?
        }
        FrameFormat::RAWRGB => data.to_vec(),
        other => {
            return Err(format!(
                "the camera sends {other}, which is not supported (MJPEG, YUYV or RGB)"
            ))
        }
    };
    RgbImage::from_raw(width, height, raw).ok_or_else(|| {
        format!(
            "a {width}x{height} {format} frame has the wrong size ({} bytes)",
            data.len()
        )
    })
}

impl FrameSource for CameraSource {
    fn next(&mut self) -> Next {
        let Some(camera) = self.camera.as_mut() else {
            // Lost: wait, then try again with a growing pause.
            std::thread::sleep(self.retry_in);
            return match (self.open)() {
                Ok(c) => {
                    log::info!("camera {} is back", self.selector);
                    self.camera = Some(c);
                    self.retry_in = self.first_retry;
                    Next::Skip("camera reopened".into())
                }
                Err(e) => {
                    self.retry_in = (self.retry_in * 2).min(self.longest_retry);
                    Next::Unavailable(format!("{e}; next try in {:?}", self.retry_in))
                }
            };
        };
        let started = Instant::now();
        match camera.grab() {
            Ok(img) => Next::Frame(img, format!("camera {}", self.selector)),
            Err(Grab::Bad(e)) => Next::Skip(e),
            Err(Grab::Lost(e)) => {
                log::warn!(
                    "camera {} failed after {:?}: {e}; reopening",
                    self.selector,
                    started.elapsed()
                );
                self.camera = None;
                Next::Unavailable(format!("camera {} lost: {e}", self.selector))
            }
        }
    }

    fn describe(&self) -> String {
        format!("camera {}", self.selector)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yuyv_and_raw_frames_become_rgb_and_bad_sizes_are_refused() {
        // 2x1 YUYV: Y0 U Y1 V, mid-grey.
        let img = to_rgb(FrameFormat::YUYV, 2, 1, &[128, 128, 128, 128]).unwrap();
        assert_eq!(img.dimensions(), (2, 1));
        assert!(
            img.as_raw().iter().all(|&v| (120..=136).contains(&v)),
            "{:?}",
            img.as_raw()
        );
        let raw = to_rgb(FrameFormat::RAWRGB, 1, 1, &[1, 2, 3]).unwrap();
        assert_eq!(raw.as_raw(), &[1, 2, 3]);
        assert!(to_rgb(FrameFormat::RAWRGB, 2, 2, &[1, 2, 3]).is_err());
        assert!(to_rgb(FrameFormat::MJPEG, 2, 2, b"not a jpeg").is_err());
        assert!(to_rgb(FrameFormat::GRAY, 1, 1, &[1]).is_err());
    }

    /// A device that gives `frames` images (the last one undecodable if `bad_last`), then fails.
    struct Scripted {
        frames: usize,
        bad_last: bool,
    }

    impl Device for Scripted {
        fn grab(&mut self) -> Result<RgbImage, Grab> {
            match self.frames {
                0 => Err(Grab::Lost("device unplugged".into())),
                1 if self.bad_last => {
                    self.frames = 0;
                    Err(Grab::Bad("corrupt frame".into()))
                }
                _ => {
                    self.frames -= 1;
                    Ok(RgbImage::new(4, 4))
                }
            }
        }
    }

    #[test]
    fn a_lost_camera_is_reported_retried_with_growing_pauses_and_resumed() {
        // Open attempts: 1 works, 2-4 fail (camera gone), 5 works again.
        let mut attempt = 0;
        let open: Opener = Box::new(move || {
            attempt += 1;
            match attempt {
                1 | 5 => Ok(Box::new(Scripted {
                    frames: 3,
                    bad_last: attempt == 1,
                }) as Box<dyn Device>),
                _ => Err(format!("no /dev/video0 (attempt {attempt})")),
            }
        });
        let mut cam = CameraSource::with_opener(
            "0".into(),
            open,
            Duration::from_millis(1),
            Duration::from_millis(4),
        );
        let mut kinds = Vec::new();
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let next = cam.next();
            kinds.push(match &next {
                Next::Frame(..) => "frame",
                Next::Skip(_) => "skip",
                Next::Unavailable(_) => "unavailable",
                Next::End => "end",
            });
            pauses.push(cam.retry_in.as_millis());
        }
        assert_eq!(
            kinds,
            [
                "frame",       // device 1
                "frame",       //
                "skip",        // its corrupt frame: skipped, the camera stays
                "unavailable", // unplugged
                "unavailable", // attempt 2 fails
                "unavailable", // attempt 3 fails
                "unavailable", // attempt 4 fails
                "skip",        // attempt 5: reopened
                "frame",       // and streaming again
                "frame",
            ]
        );
        // The pause doubles per failed attempt up to the cap, and resets once it is back.
        assert_eq!(&pauses[3..8], &[1, 2, 4, 4, 1]);
    }

    #[test]
    fn a_camera_that_does_not_exist_is_a_clear_error() {
        let e = CameraSource::probe(&CameraRequest {
            selector: "no-such-camera-anywhere".into(),
            width: 640,
            height: 480,
            fps: 30,
        })
        .expect_err("no camera by that name");
        assert!(e.to_string().contains("no-such-camera-anywhere"), "{e}");
    }
}

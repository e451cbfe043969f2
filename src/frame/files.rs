//! Image-file sources: one file, or the images of a folder in name order.

use super::{FrameError, FrameSource, Next};
use crate::vision::{load_image_limited, ImageLimits, RgbImage};
use std::path::{Path, PathBuf};

/// One image, decoded once; delivered again and again when looped, else once.
pub struct FileSource {
    path: PathBuf,
    image: RgbImage,
    looped: bool,
    delivered: bool,
}

impl FileSource {
    pub fn open(path: &Path, looped: bool, limits: ImageLimits) -> Result<Self, FrameError> {
        let image = load_image_limited(path, &limits).map_err(|e| FrameError::Source {
            path: path.to_path_buf(),
            problem: format!("{e}; set source.path to a JPEG or PNG image"),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            image,
            looped,
            delivered: false,
        })
    }
}

impl FrameSource for FileSource {
    fn next(&mut self) -> Next {
        if self.delivered && !self.looped {
            return Next::End;
        }
        self.delivered = true;
        Next::Frame(self.image.clone(), file_name(&self.path))
    }

    fn describe(&self) -> String {
        format!("image {}", self.path.display())
    }
}

/// The JPEG and PNG files of a folder, in name order.
pub struct DirSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    index: usize,
    looped: bool,
    limits: ImageLimits,
}

impl DirSource {
    pub fn open(dir: &Path, looped: bool, limits: ImageLimits) -> Result<Self, FrameError> {
        let err = |problem: String| FrameError::Source {
            path: dir.to_path_buf(),
            problem,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| {
            err(format!(
                "cannot list the folder ({e}); set source.path to a folder of JPEG/PNG images"
            ))
        })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image_name(p))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(err(
                "holds no .jpg, .jpeg or .png files; put frames there or change source.path".into(),
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            index: 0,
            looped,
            limits,
        })
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

impl FrameSource for DirSource {
    fn next(&mut self) -> Next {
        if self.index >= self.files.len() {
            if !self.looped {
                return Next::End;
            }
            self.index = 0;
        }
        let path = &self.files[self.index];
        self.index += 1;
        match load_image_limited(path, &self.limits) {
            Ok(img) => Next::Frame(img, file_name(path)),
            Err(e) => Next::Skip(e.to_string()),
        }
    }

    fn describe(&self) -> String {
        format!("{} images in {}", self.files.len(), self.dir.display())
    }
}

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        .unwrap_or(false)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Capture, LatestFrame, SourceBuilder};
    use std::time::Duration;

    fn samples() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/samples")
    }

    fn names(src: &mut dyn FrameSource, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| match src.next() {
                Next::Frame(_, name) => name,
                Next::Skip(why) | Next::Unavailable(why) => format!("skip: {why}"),
                Next::End => "end".into(),
            })
            .collect()
    }

    #[test]
    fn a_folder_plays_in_name_order_and_loops_or_ends() {
        let mut looped = DirSource::open(&samples(), true, ImageLimits::default()).unwrap();
        assert_eq!(looped.len(), 3);
        let got = names(&mut looped, 4);
        assert_eq!(
            got,
            [
                "person-arms-up.png",
                "person-squat.png",
                "person-wave.png",
                "person-arms-up.png"
            ]
        );
        let mut once = DirSource::open(&samples(), false, ImageLimits::default()).unwrap();
        assert_eq!(names(&mut once, 4)[3], "end");
    }

    #[test]
    fn images_over_the_limits_are_skipped_with_the_limit_named() {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::new(4000, 10)
            .save(dir.path().join("a-thin.png"))
            .unwrap();
        std::fs::copy(samples().join("person-wave.png"), dir.path().join("b.png")).unwrap();
        let limits = ImageLimits {
            max_side: 2048,
            ..ImageLimits::default()
        };
        let mut src = DirSource::open(dir.path(), false, limits).unwrap();
        let got = names(&mut src, 3);
        assert!(
            got[0].starts_with("skip:")
                && got[0].contains("a-thin.png")
                && got[0].contains("image_limits.max_side"),
            "{got:?}"
        );
        assert_eq!(got[1], "b.png");
        // A single file source over the limits is refused at start, naming the limit.
        let e = FileSource::open(&dir.path().join("a-thin.png"), true, limits)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("image_limits.max_side"), "{e}");
    }

    #[test]
    fn bad_files_are_skipped_not_fatal_and_bad_folders_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(samples().join("person-wave.png"), dir.path().join("b.png")).unwrap();
        std::fs::write(dir.path().join("a.jpg"), b"not really a jpeg").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"ignored").unwrap();
        let mut src = DirSource::open(dir.path(), false, ImageLimits::default()).unwrap();
        let got = names(&mut src, 3);
        assert!(
            got[0].starts_with("skip:") && got[0].contains("a.jpg"),
            "{got:?}"
        );
        assert_eq!(got[1], "b.png");
        assert_eq!(got[2], "end");

        let empty = tempfile::tempdir().unwrap();
        let e = DirSource::open(empty.path(), true, ImageLimits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(&empty.path().display().to_string()) && e.contains("no .jpg"),
            "{e}"
        );
        let e = DirSource::open(Path::new("/no/such/frames"), true, ImageLimits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("/no/such/frames"), "{e}");
        let e = FileSource::open(&dir.path().join("a.jpg"), true, ImageLimits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("a.jpg"), "{e}");
    }

    #[test]
    fn a_single_file_repeats_only_when_looped() {
        let path = samples().join("person-squat.png");
        let mut once = FileSource::open(&path, false, ImageLimits::default()).unwrap();
        assert_eq!(names(&mut once, 2), ["person-squat.png", "end"]);
        let mut looped = FileSource::open(&path, true, ImageLimits::default()).unwrap();
        assert_eq!(names(&mut looped, 3), ["person-squat.png"; 3]);
    }

    #[test]
    fn capture_runs_at_its_pace_and_a_slow_taker_drops_frames() {
        let slot = LatestFrame::new();
        let src = DirSource::open(&samples(), true, ImageLimits::default()).unwrap();
        let mut cap = Capture::spawn(SourceBuilder::ready(src), 100.0, slot.clone());
        // A taker slower than the source: it sees increasing sequence numbers with gaps.
        let mut seqs = Vec::new();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(60));
            if let Some(f) = slot.take(Duration::from_secs(2)) {
                seqs.push(f.seq);
            }
        }
        cap.stop();
        assert_eq!(seqs.len(), 4);
        assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");
        assert!(
            slot.dropped() > 0,
            "a source faster than its taker drops frames"
        );
        assert_eq!(
            slot.captured(),
            slot.dropped() + 4 + u64::from(slot.take(Duration::ZERO).is_some())
        );
    }

    #[test]
    fn auto_without_that_camera_falls_back_to_the_folder() {
        let config = crate::config::SourceConfig {
            kind: crate::config::SourceKind::Auto,
            camera: "no-such-camera-anywhere".into(),
            path: samples(),
            ..Default::default()
        };
        let src = crate::frame::open_source(&config, ImageLimits::default()).unwrap();
        assert!(src.description.contains("3 images"), "{}", src.description);
        let config = crate::config::SourceConfig {
            kind: crate::config::SourceKind::Camera,
            ..config
        };
        let e = crate::frame::open_source(&config, ImageLimits::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no-such-camera-anywhere"), "{e}");
    }

    #[test]
    fn a_finished_source_closes_the_slot() {
        let slot = LatestFrame::new();
        let src = FileSource::open(
            &samples().join("person-wave.png"),
            false,
            ImageLimits::default(),
        )
        .unwrap();
        let _cap = Capture::spawn(SourceBuilder::ready(src), 50.0, slot.clone());
        assert!(slot.take(Duration::from_secs(2)).is_some());
        assert!(slot.take(Duration::from_secs(2)).is_none());
        assert!(slot.is_closed());
    }
}

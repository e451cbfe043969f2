//! The model bundle: a folder with `posegpt.toml` (everything about the model) and its three
//! files (`llm.gguf`, `vision.onnx`, `pose_head.onnx`). Loading checks everything up front and
//! reports the first problem with the file (and key) at fault and what to do.

use crate::llm::{LlmError, Model, ModelParams, Token};
use crate::pose_head::{PoseHead, PoseHeadError};
use crate::vision::{ImageSpec, ResizeMode, VisionEncoder, VisionError};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const MANIFEST: &str = "posegpt.toml";

/// `posegpt.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub files: Files,
    pub prompt: PromptSpec,
    pub frame: FrameSpec,
    pub image: ImageManifest,
    pub pose_head: HeadSpec,
}

/// File names inside the bundle folder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Files {
    #[serde(default = "default_llm")]
    pub llm: String,
    #[serde(default = "default_vision")]
    pub vision: String,
    #[serde(default = "default_head")]
    pub pose_head: String,
}

fn default_llm() -> String {
    "llm.gguf".into()
}
fn default_vision() -> String {
    "vision.onnx".into()
}
fn default_head() -> String {
    "pose_head.onnx".into()
}

impl Default for Files {
    fn default() -> Self {
        Self {
            llm: default_llm(),
            vision: default_vision(),
            pose_head: default_head(),
        }
    }
}

/// The conversation template. `{message}` marks where a turn's text goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSpec {
    pub system: String,
    #[serde(default)]
    pub system_suffix: String,
    pub user: String,
    pub assistant: String,
    /// Put before the question when an image is attached; contains `image_marker`.
    pub image_block: String,
    /// Where the prompt is split and the image embeddings go (need not be a token).
    pub image_marker: String,
    #[serde(default)]
    pub image_start: Option<String>,
    #[serde(default)]
    pub image_end: Option<String>,
    pub pose_token: String,
    #[serde(default)]
    pub stop: Vec<String>,
    /// Follows a yes/no question (after a line break), as the model was trained for short
    /// answers.
    #[serde(default = "default_short_answer")]
    pub short_answer: String,
}

fn default_short_answer() -> String {
    "Answer the question using a single word or phrase.".into()
}

/// The per-frame fast path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrameSpec {
    pub instruction: String,
    pub answer_prefix: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageManifest {
    pub size: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub mode: ResizeMode,
    pub tokens: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadSpec {
    pub layout: String,
    pub joints: usize,
}

const MESSAGE: &str = "{message}";

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("bundle folder {0} does not exist; pass --bundle with a folder holding posegpt.toml")]
    NoFolder(PathBuf),
    #[error("{0} is missing: a bundle folder needs its manifest posegpt.toml")]
    NoManifest(PathBuf),
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} is not a valid manifest: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("{path}: key `{key}` {problem}")]
    ManifestValue {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
    #[error("{path} is missing (named by `files.{key}` in posegpt.toml); copy it into the bundle or fix the name")]
    MissingFile { path: PathBuf, key: &'static str },
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Vision(#[from] VisionError),
    #[error(transparent)]
    Head(#[from] PoseHeadError),
    #[error("{manifest}: `{key}` = {text:?} is not a single token of {gguf}'s vocabulary (it tokenizes to {tokens:?}); the GGUF must contain it as an added token")]
    NotOneToken {
        manifest: PathBuf,
        gguf: PathBuf,
        key: &'static str,
        text: String,
        tokens: Vec<Token>,
    },
    #[error("{vision} outputs {got} image tokens but posegpt.toml says image.tokens = {want}; fix the manifest or re-export the encoder")]
    ImageTokens {
        vision: PathBuf,
        got: usize,
        want: usize,
    },
}

impl Manifest {
    /// Read and validate a manifest file.
    pub fn load(path: &Path) -> Result<Self, BundleError> {
        if !path.is_file() {
            return Err(BundleError::NoManifest(path.to_path_buf()));
        }
        let text = std::fs::read_to_string(path).map_err(|cause| BundleError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let m: Manifest = toml::from_str(&text).map_err(|e| BundleError::Manifest {
            path: path.to_path_buf(),
            message: e.to_string().trim().to_string(),
        })?;
        m.validate(path)?;
        Ok(m)
    }

    fn validate(&self, path: &Path) -> Result<(), BundleError> {
        let bad = |key: &'static str, problem: &str| {
            Err(BundleError::ManifestValue {
                path: path.to_path_buf(),
                key,
                problem: problem.to_string(),
            })
        };
        if !self.prompt.user.contains(MESSAGE) {
            return bad("prompt.user", "must contain {message}");
        }
        if !self.prompt.assistant.contains(MESSAGE) {
            return bad("prompt.assistant", "must contain {message}");
        }
        if self.prompt.image_marker.is_empty() {
            return bad("prompt.image_marker", "must not be empty");
        }
        if !self.prompt.image_block.contains(&self.prompt.image_marker) {
            return bad("prompt.image_block", "must contain prompt.image_marker");
        }
        if self.prompt.pose_token.is_empty() {
            return bad("prompt.pose_token", "must not be empty");
        }
        if self.image.size == 0 {
            return bad("image.size", "must be > 0");
        }
        if self.image.std.iter().any(|s| *s <= 0.0 || !s.is_finite()) {
            return bad("image.std", "must be three positive numbers");
        }
        if self.pose_head.layout != "rot6d" {
            return bad(
                "pose_head.layout",
                "must be \"rot6d\" (24 joints × 6D, HMR2/ChatPose order)",
            );
        }
        if self.pose_head.joints != crate::smpl::NUM_JOINTS {
            return bad("pose_head.joints", "must be 24 (SMPL joints)");
        }
        Ok(())
    }

    pub fn image_spec(&self) -> ImageSpec {
        ImageSpec {
            size: self.image.size,
            mean: self.image.mean,
            std: self.image.std,
            mode: self.image.mode,
        }
    }

    /// The system part of the prompt.
    pub fn system_text(&self) -> String {
        format!("{}{}", self.prompt.system, self.prompt.system_suffix)
    }

    /// A user turn; `with_image` puts the image block before the text.
    pub fn user_turn(&self, text: &str, with_image: bool) -> String {
        let content = if with_image {
            format!("{}{}", self.prompt.image_block, text)
        } else {
            text.to_string()
        };
        self.prompt.user.replace(MESSAGE, &content)
    }

    /// A finished assistant turn.
    pub fn assistant_turn(&self, text: &str) -> String {
        self.prompt.assistant.replace(MESSAGE, text)
    }

    /// The opened assistant turn the model continues: the template up to `{message}`, with
    /// trailing whitespace dropped when there is no prefix (LLaVA ends prompts with
    /// "ASSISTANT:"), or followed by `prefix` verbatim (its trailing space matters).
    pub fn assistant_open(&self, prefix: &str) -> String {
        let head = self
            .prompt
            .assistant
            .split(MESSAGE)
            .next()
            .unwrap_or_default();
        if prefix.is_empty() {
            head.trim_end().to_string()
        } else {
            format!("{head}{prefix}")
        }
    }
}

/// Runtime options for loading a bundle.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub model: ModelParams,
    /// The tract runtime of the vision encoder: "cpu" (this crate's CPU plan, the default) or
    /// another one the build has ("cuda" with the vision-cuda feature).
    pub vision_runtime: String,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            model: ModelParams::default(),
            vision_runtime: crate::vision::CPU_RUNTIME.into(),
        }
    }
}

/// A loaded, checked bundle.
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub llm: Arc<Model>,
    pub vision: VisionEncoder,
    pub head: PoseHead,
    pub pose_token: Token,
    pub image_start: Option<Token>,
    pub image_end: Option<Token>,
}

impl Bundle {
    pub fn load(dir: &Path, options: &LoadOptions) -> Result<Self, BundleError> {
        if !dir.is_dir() {
            return Err(BundleError::NoFolder(dir.to_path_buf()));
        }
        let manifest_path = dir.join(MANIFEST);
        let manifest = Manifest::load(&manifest_path)?;
        let file = |name: &str, key: &'static str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(BundleError::MissingFile { path: p, key })
            }
        };
        let llm_path = file(&manifest.files.llm, "llm")?;
        let vision_path = file(&manifest.files.vision, "vision")?;
        let head_path = file(&manifest.files.pose_head, "pose_head")?;

        log::info!("loading LLM {}", llm_path.display());
        let llm = Arc::new(Model::load(&llm_path, &options.model)?);
        let one_token = |key: &'static str, text: &str| {
            llm.single_token(text)
                .ok_or_else(|| BundleError::NotOneToken {
                    manifest: manifest_path.clone(),
                    gguf: llm_path.clone(),
                    key,
                    text: text.to_string(),
                    tokens: llm.tokenize(text, false, true).unwrap_or_default(),
                })
        };
        let pose_token = one_token("prompt.pose_token", &manifest.prompt.pose_token)?;
        let image_start = match &manifest.prompt.image_start {
            Some(t) => Some(one_token("prompt.image_start", t)?),
            None => None,
        };
        let image_end = match &manifest.prompt.image_end {
            Some(t) => Some(one_token("prompt.image_end", t)?),
            None => None,
        };

        log::info!(
            "loading vision encoder {} (tract runtime {})",
            vision_path.display(),
            options.vision_runtime
        );
        let vision = VisionEncoder::load_on(
            &vision_path,
            &manifest.image_spec(),
            llm.n_embd(),
            &options.vision_runtime,
        )?;
        if vision.n_tokens() != manifest.image.tokens {
            return Err(BundleError::ImageTokens {
                vision: vision_path,
                got: vision.n_tokens(),
                want: manifest.image.tokens,
            });
        }
        log::info!("loading pose head {}", head_path.display());
        let head = PoseHead::load(&head_path, llm.n_embd())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest,
            llm,
            vision,
            head,
            pose_token,
            image_start,
            image_end,
        })
    }

    /// Facts about the bundle for `check`.
    pub fn facts(&self) -> BundleFacts {
        let m = &self.llm;
        BundleFacts {
            name: self.manifest.name.clone(),
            llm_architecture: m.meta("general.architecture").unwrap_or_default(),
            llm_description: m.description(),
            llm_parameters: m.n_params(),
            llm_size_bytes: m.size_bytes(),
            llm_file_type: m.meta("general.file_type").and_then(|v| v.parse().ok()),
            vocabulary: m.n_vocab(),
            n_embd: m.n_embd(),
            context_train: m.n_ctx_train(),
            pose_token: self.manifest.prompt.pose_token.clone(),
            pose_token_id: self.pose_token,
            image_size: self.manifest.image.size,
            image_mode: self.manifest.image.mode,
            image_tokens: self.vision.n_tokens(),
            head_shape: [m.n_embd(), crate::pose_head::HEAD_OUTPUTS],
        }
    }
}

/// What `check` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BundleFacts {
    pub name: String,
    pub llm_architecture: String,
    pub llm_description: String,
    pub llm_parameters: u64,
    pub llm_size_bytes: u64,
    /// llama.cpp's `general.file_type` (the quantisation, e.g. 15 = Q4_K_M).
    pub llm_file_type: Option<u32>,
    pub vocabulary: usize,
    pub n_embd: usize,
    pub context_train: u32,
    pub pose_token: String,
    pub pose_token_id: Token,
    pub image_size: u32,
    pub image_mode: ResizeMode,
    pub image_tokens: usize,
    pub head_shape: [usize; 2],
}

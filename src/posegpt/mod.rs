//! PoseGPT: prompt building from the manifest, image injection, generation, and the pose
//! head on the hidden state that chose each pose token.
//!
//! The prompt is split at the image marker and each text piece is tokenized on its own, BOS on
//! the first only (LLaVA's `tokenizer_image_token`); the image embeddings go between the pieces.
//! The head reads the final-norm hidden state of the position **whose logits chose** the pose
//! token (ChatPose's `output_ids[:, 1:] == seg_token_idx` shift), never the pose token's own.
//!
//! Two entry points:
//! * [`PoseGpt::pose`] — the per-frame fast path. The prompt is the manifest's fixed
//!   instruction with the assistant turn already opened by the answer prefix (e.g.
//!   "Sure, it is "), so one frame costs the encoder plus one prefill (everything before the
//!   image comes from the KV cache) and the head reads the last prompt position. The pose
//!   carries the probability the LLM gave the pose token there (`confidence`): low means the
//!   prefix does not end where the model would emit the pose token.
//! * [`PoseGpt::ask`] — chat: text with one [`POSE_MARKER`] per pose, multi-turn by
//!   conversation id with a bounded history. [`PoseGpt::ask_yes_no`] reads P(yes) from one
//!   prefill, with no generation.
//!
//! The live scene: [`PoseGpt::pose_frame`] keeps the frame's image embeddings ([`LiveImage`]).
//! A question about that frame passes them back ([`AskImage::Encoded`]): no encoder run, and
//! since the KV cache still holds the frame prompt (system, user turn up to the image, the image
//! and the first tokens after it) and its positions are keyed by token or by a hash of each
//! embedding row, the session computes only the question's own positions.

use crate::bundle::{Bundle, BundleError, LoadOptions};
use crate::llm::{
    GenerateParams, LlmError, PlainText, Sampling, Segment, Session, SessionParams, Token,
};
use crate::pose_head::{PoseHeadError, SmplPose, HEAD_OUTPUTS};
use crate::smpl::model::as_joint_rotations;
use crate::smpl::{Skeleton, Vec3};
use crate::vision::{RgbImage, VisionError};
use serde::Serialize;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

mod chat;

use chat::Run;

/// Written into a reply's text where the model emitted a pose token; `poses[i]` belongs to the
/// i-th marker.
pub const POSE_MARKER: &str = "[POSE]";

#[derive(Debug, thiserror::Error)]
pub enum PoseGptError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Vision(#[from] VisionError),
    #[error(transparent)]
    Head(#[from] PoseHeadError),
    #[error("the question is empty")]
    EmptyQuestion,
    #[error("this bundle's tokenizer gives no distinct first tokens for the answers \"Yes\" and \"No\" after `prompt.assistant`; yes/no questions need them")]
    NoYesNoTokens,
}

/// Runtime settings (from the daemon config or CLI flags).
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub load: LoadOptions,
    pub session: SessionParams,
    /// Threads for the vision encoder's matrix products (0 = all cores).
    pub vision_threads: usize,
    /// Most tokens one answer may have.
    pub max_tokens: usize,
    pub sampling: Sampling,
    /// Earlier turns kept per conversation (oldest dropped first).
    pub max_history_turns: usize,
    /// Conversations kept (least recently used dropped first).
    pub max_conversations: usize,
    /// The skeleton each pose's joint positions come from (built-in, or an SMPL model's).
    pub skeleton: Skeleton,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            load: LoadOptions::default(),
            session: SessionParams::default(),
            vision_threads: 0,
            max_tokens: 256,
            sampling: Sampling::Greedy,
            max_history_turns: 4,
            max_conversations: 16,
            skeleton: Skeleton::default(),
        }
    }
}

/// Milliseconds per stage of one call.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub preprocess_ms: f64,
    pub encode_ms: f64,
    pub prefill_ms: f64,
    pub generate_ms: f64,
    pub head_ms: f64,
    /// The part of `head_ms` spent in the pose head network itself (tract); the rest is
    /// 6D → axis-angle, the joints and P(pose token). For benchmarks, not in messages.
    #[serde(skip)]
    pub head_network_ms: f64,
    pub total_ms: f64,
    /// Prompt positions, and how many came from the KV cache.
    pub prompt_positions: usize,
    pub reused_positions: usize,
    pub generated_tokens: usize,
}

/// One pose: SMPL parameters, the head's raw output and how sure the LLM was of the pose token.
#[derive(Debug, Clone, Serialize)]
pub struct Pose {
    #[serde(flatten)]
    pub smpl: SmplPose,
    /// The 24 joint positions (metres, SMPL axes, pelvis at the origin) from forward
    /// kinematics of these rotations on the configured skeleton.
    pub joints: Vec<Vec3>,
    /// Softmax probability of the pose token at the position the head read.
    pub confidence: f32,
    /// The head's 144 outputs (24 × 6D).
    #[serde(skip)]
    pub raw: [f32; HEAD_OUTPUTS],
    /// The hidden state the head read.
    #[serde(skip)]
    pub hidden: Vec<f32>,
}

/// A pose from the per-frame path, with its timings.
#[derive(Debug, Clone, Serialize)]
pub struct FramePose {
    #[serde(flatten)]
    pub pose: Pose,
    pub timings: Timings,
}

/// The image a question is about.
#[derive(Debug, Clone, Copy)]
pub enum AskImage<'a> {
    /// Encoded already: the live frame's embeddings ([`LiveImage`]).
    Encoded(&'a Arc<Vec<f32>>),
    /// Decoded: preprocessed by [`PoseGpt::ask_about`].
    Rgb(&'a RgbImage),
    /// Preprocessed for the encoder already (planar CHW floats), and what that took.
    Pixels {
        pixels: &'a [f32],
        preprocess_ms: f64,
    },
}

/// The answer to [`PoseGpt::ask`].
#[derive(Debug, Clone, Serialize)]
pub struct Reply {
    /// The answer, with one [`POSE_MARKER`] per entry of `poses`.
    pub text: String,
    pub poses: Vec<Pose>,
    pub stop_reason: crate::llm::StopReason,
    pub timings: Timings,
}

/// The answer to [`PoseGpt::ask_yes_no`].
#[derive(Debug, Clone, Serialize)]
pub struct YesNo {
    /// P(yes): the softmax over the answer tokens "Yes" and "No" at the last prompt position.
    pub p_yes: f32,
    /// `p_yes >= 0.5`.
    pub value: bool,
    pub timings: Timings,
}

/// The image embeddings of the frame the model saw last (see the module docs).
#[derive(Debug, Clone)]
pub struct LiveImage {
    /// The frame's sequence number at its source.
    pub frame_seq: u64,
    pub captured: Instant,
    pub embeddings: Arc<Vec<f32>>,
}

impl LiveImage {
    pub fn age(&self) -> std::time::Duration {
        self.captured.elapsed()
    }
}

#[derive(Debug, Clone)]
struct Turn {
    user: String,
    image: Option<Arc<Vec<f32>>>,
    /// The answer as the model wrote it (pose tokens as their text), for the next prompt.
    assistant: String,
}

#[derive(Debug, Default)]
struct Conversation {
    turns: Vec<Turn>,
    last_used: u64,
}

/// A loaded PoseGPT bundle with its LLM session.
pub struct PoseGpt {
    bundle: Bundle,
    session: Session,
    options: RuntimeOptions,
    conversations: HashMap<String, Conversation>,
    clock: u64,
    /// The per-frame prompt's tokens before and after the image, fixed by the manifest.
    frame: (Vec<Token>, Vec<Token>),
    /// Keeps special tokens out of client text: they come from the template only.
    plain: PlainText,
    /// The last frame posed (or seen for a question about the live scene).
    live: Option<LiveImage>,
    /// The first token of the answers "Yes" and "No", when the tokenizer tells them apart.
    yes_no: Option<(Token, Token)>,
}

impl PoseGpt {
    /// Load and check a bundle, and create the LLM session.
    pub fn load(dir: &Path, options: RuntimeOptions) -> Result<Self, PoseGptError> {
        crate::set_tract_threads(options.vision_threads);
        let bundle = Bundle::load(dir, &options.load)?;
        let session = Session::new(bundle.llm.clone(), &options.session)?;
        let p = &bundle.manifest.prompt;
        let markers = [
            Some(&p.image_marker),
            p.image_start.as_ref(),
            p.image_end.as_ref(),
        ];
        let markers: Vec<&str> = markers.into_iter().flatten().map(String::as_str).collect();
        let plain = PlainText::for_model(&bundle.llm, &markers);
        let mut pg = Self {
            bundle,
            session,
            options,
            conversations: HashMap::new(),
            clock: 0,
            frame: (Vec::new(), Vec::new()),
            plain,
            live: None,
            yes_no: None,
        };
        pg.frame = pg.build_frame_tokens()?;
        pg.yes_no = pg.find_yes_no_tokens()?;
        if pg.yes_no.is_none() {
            log::warn!("{}", PoseGptError::NoYesNoTokens);
        }
        Ok(pg)
    }

    /// The ids of the answers' first tokens as the model would write them after the opened
    /// assistant turn: the first token where `open + " Yes"` departs from `open` (and "No").
    fn find_yes_no_tokens(&self) -> Result<Option<(Token, Token)>, PoseGptError> {
        let llm = &self.bundle.llm;
        let open = self.bundle.manifest.assistant_open("");
        let base = llm.tokenize(&open, false, true)?;
        let first = |word: &str| -> Result<Option<Token>, PoseGptError> {
            let t = llm.tokenize(&format!("{open} {word}"), false, true)?;
            let common = base.iter().zip(&t).take_while(|(a, b)| a == b).count();
            // Skip a lone word-boundary piece ("▁") the tokenizer may put first.
            Ok(t[common..].iter().copied().find(|&tok| {
                !String::from_utf8_lossy(&llm.token_bytes(tok, false))
                    .trim()
                    .is_empty()
            }))
        };
        Ok(match (first("Yes")?, first("No")?) {
            (Some(y), Some(n)) if y != n => Some((y, n)),
            _ => None,
        })
    }

    /// The answer tokens yes/no questions compare, when this bundle has them.
    pub fn yes_no_tokens(&self) -> Option<(Token, Token)> {
        self.yes_no
    }

    /// The frame the model saw last, with its image embeddings.
    pub fn live_image(&self) -> Option<&LiveImage> {
        self.live.as_ref()
    }

    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// Once `flag` is set (from any thread), the running LLM decode or generation stops and
    /// its call fails with [`LlmError::Aborted`]; the daemon's bounded shutdown sets it.
    pub fn set_abort_flag(&mut self, flag: Arc<std::sync::atomic::AtomicBool>) {
        self.session.set_abort_flag(flag);
    }

    /// Change the most tokens one answer may have; returns the previous limit.
    pub fn set_max_tokens(&mut self, max_tokens: usize) -> usize {
        std::mem::replace(&mut self.options.max_tokens, max_tokens)
    }

    /// The runtime settings this instance was loaded with.
    pub fn options(&self) -> &RuntimeOptions {
        &self.options
    }

    /// The LLM session (its KV cache holds the last prompt).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// Image embeddings for an image: `[tokens, n_embd]`, row-major.
    pub fn encode_image(&self, img: &RgbImage) -> Result<Vec<f32>, PoseGptError> {
        Ok(self.bundle.vision.encode(img)?)
    }

    /// The per-frame prompt as token runs around the image: (before, after).
    pub fn frame_tokens(&self) -> (&[Token], &[Token]) {
        (&self.frame.0, &self.frame.1)
    }

    fn build_frame_tokens(&self) -> Result<(Vec<Token>, Vec<Token>), PoseGptError> {
        let m = &self.bundle.manifest;
        let text = format!(
            "{}{}{}",
            m.system_text(),
            m.user_turn(&m.frame.instruction, true),
            m.assistant_open(&m.frame.answer_prefix)
        );
        let no_image = Arc::new(Vec::new());
        let runs = self.prompt_runs(&text, std::slice::from_ref(&no_image))?;
        let mut runs = runs.into_iter().filter_map(|r| match r {
            Run::Tokens(t) => Some(t),
            Run::Image(_) => None,
        });
        let before = runs.next().unwrap_or_default();
        let after = runs.next().unwrap_or_default();
        Ok((before, after))
    }

    /// One pose of a blank frame, thrown away: afterwards the prompt before the image is in the
    /// KV cache, so the first real frame computes only the image and what follows it as every
    /// later one does, and the encoder has run once (its buffers allocated; on a GPU runtime
    /// its kernels compiled). The daemon calls it before it reports ready.
    pub fn warm_up(&mut self) -> Result<FramePose, PoseGptError> {
        let size = self.bundle.vision.spec().size.max(1);
        self.pose(&RgbImage::new(size, size))
    }

    /// The per-frame fast path: image → pose (see the module docs).
    pub fn pose(&mut self, img: &RgbImage) -> Result<FramePose, PoseGptError> {
        let t0 = Instant::now();
        let pixels = self.bundle.vision.preprocess(img);
        let preprocess_ms = ms(t0.elapsed());
        self.pose_prepared(&pixels, preprocess_ms)
    }

    /// [`PoseGpt::pose`] from pixels already preprocessed (the daemon's capture thread does
    /// that), with the time that took, for the timings.
    pub fn pose_prepared(
        &mut self,
        pixels: &[f32],
        preprocess_ms: f64,
    ) -> Result<FramePose, PoseGptError> {
        let t1 = Instant::now();
        let embeddings = self.bundle.vision.encode_pixels(pixels)?;
        let t2 = Instant::now();
        let mut pose = self.pose_from_embeddings(&embeddings)?;
        pose.timings.preprocess_ms = preprocess_ms;
        pose.timings.encode_ms = ms(t2 - t1);
        pose.timings.total_ms = preprocess_ms + ms(t1.elapsed());
        Ok(pose)
    }

    /// The per-frame fast path on a frame from a source, kept as the live image: questions
    /// about the live scene then reuse its embeddings and KV positions.
    pub fn pose_frame(
        &mut self,
        pixels: &[f32],
        preprocess_ms: f64,
        frame_seq: u64,
        captured: Instant,
    ) -> Result<FramePose, PoseGptError> {
        let t1 = Instant::now();
        let embeddings = Arc::new(self.bundle.vision.encode_pixels(pixels)?);
        let t2 = Instant::now();
        self.live = Some(LiveImage {
            frame_seq,
            captured,
            embeddings: embeddings.clone(),
        });
        let mut pose = self.pose_from_embeddings(&embeddings)?;
        pose.timings.preprocess_ms = preprocess_ms;
        pose.timings.encode_ms = ms(t2 - t1);
        pose.timings.total_ms = preprocess_ms + ms(t1.elapsed());
        Ok(pose)
    }

    /// Encode a frame and keep it as the live image without posing it (for a question when
    /// the live image is too old or there is none).
    pub fn see_frame(
        &mut self,
        pixels: &[f32],
        frame_seq: u64,
        captured: Instant,
    ) -> Result<LiveImage, PoseGptError> {
        let live = LiveImage {
            frame_seq,
            captured,
            embeddings: Arc::new(self.bundle.vision.encode_pixels(pixels)?),
        };
        self.live = Some(live.clone());
        Ok(live)
    }

    /// The fast path from image embeddings already computed.
    pub fn pose_from_embeddings(&mut self, embeddings: &[f32]) -> Result<FramePose, PoseGptError> {
        let t0 = Instant::now();
        let out = self.session.prefill(
            &[
                Segment::Tokens(&self.frame.0),
                Segment::Embeddings(embeddings),
                Segment::Tokens(&self.frame.1),
            ],
            true,
        )?;
        let t1 = Instant::now();
        let hidden = out.hidden.ok_or(LlmError::NoOutput {
            what: "hidden state",
        })?;
        let confidence = crate::llm::probability_of(&out.logits, self.bundle.pose_token);
        let (pose, head_network_ms) = self.head_pose_timed(hidden, confidence)?;
        let timings = Timings {
            prefill_ms: ms(t1 - t0),
            head_ms: ms(t1.elapsed()),
            head_network_ms,
            prompt_positions: out.position + 1,
            reused_positions: self.session.last_reused_positions(),
            ..Timings::default()
        };
        Ok(FramePose { pose, timings })
    }

    /// The 24 joint positions of a pose on the configured skeleton (empty if it does not have
    /// 24 rotations).
    pub fn joints(&self, smpl: &SmplPose) -> Vec<Vec3> {
        match as_joint_rotations(&smpl.rotmats) {
            Some(local) => self
                .options
                .skeleton
                .forward(&local, [0.0; 3])
                .joints
                .to_vec(),
            None => Vec::new(),
        }
    }

    /// Run the pose head on a hidden state.
    pub fn head_pose(&self, hidden: Vec<f32>, confidence: f32) -> Result<Pose, PoseGptError> {
        Ok(self.head_pose_timed(hidden, confidence)?.0)
    }

    /// [`PoseGpt::head_pose`], with the milliseconds the head network took.
    fn head_pose_timed(
        &self,
        hidden: Vec<f32>,
        confidence: f32,
    ) -> Result<(Pose, f64), PoseGptError> {
        let t = Instant::now();
        let raw = self.bundle.head.run(&hidden)?;
        let network_ms = ms(t.elapsed());
        let smpl = SmplPose::from_rot6d(&raw);
        let joints = self.joints(&smpl);
        let pose = Pose {
            smpl,
            joints,
            confidence,
            raw,
            hidden,
        };
        Ok((pose, network_ms))
    }
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

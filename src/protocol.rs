//! The MQTT JSON messages (docs/mqtt.md is the contract) and the validation of requests.
//!
//! Every request field is checked; a bad request becomes an [`ErrorReply`] with a stable
//! `code` and a message naming the field, answered on the answer topic — never a crash and
//! never silence.

use crate::llm::LlmError;
use crate::posegpt::{Pose, PoseGptError, Reply, Timings, YesNo};
use base64::Engine;
use serde::{Deserialize, Serialize};

/// `<base>/ask` payload.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    /// Chosen by the client; copied into the answer.
    pub id: String,
    /// The question.
    pub text: String,
    /// Which image the question is about (default: none).
    #[serde(default)]
    pub image: ImageRef,
    /// Multi-turn: answers in the same conversation see its earlier turns.
    #[serde(default)]
    pub conversation: Option<String>,
    /// What kind of answer (default: text).
    #[serde(default)]
    pub answer: AnswerKind,
}

/// The kind of answer a request wants.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerKind {
    /// Generated text, with poses.
    #[default]
    Text,
    /// P(yes) from one prefill, no generation.
    YesNo,
}

/// The image of a request.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageRef {
    /// No image: a text-only question.
    #[default]
    None,
    /// The newest camera frame.
    Live,
    /// A JPEG or PNG, base64-encoded: `{"inline": "..."}`.
    Inline(String),
}

/// Limits a request is checked against (from the config).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_text_bytes: usize,
    pub max_image_bytes: usize,
    pub max_id_bytes: usize,
}

/// A request that passed validation; an inline image is decoded to bytes (not yet to pixels).
#[derive(Debug, Clone, PartialEq)]
pub struct ValidAsk {
    pub id: String,
    pub text: String,
    pub image: ValidImage,
    pub conversation: Option<String>,
    pub answer: AnswerKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ValidImage {
    None,
    Live,
    Inline(Vec<u8>),
}

/// Error codes of `answer` messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The payload is not JSON (or not UTF-8).
    BadJson,
    /// A field is unknown, missing or of the wrong type.
    InvalidRequest,
    EmptyText,
    TextTooLong,
    /// The inline image is not base64, or not a JPEG/PNG.
    BadImage,
    ImageTooLarge,
    /// `image: "live"` but no frame has been captured.
    NoFrame,
    /// The request queue is full; try again later.
    Busy,
    /// The daemon is stopping.
    ShuttingDown,
    /// The prompt (question, conversation history, image) does not fit the model's context.
    ContextFull,
    /// The vision encoder failed on the request's image.
    EncoderError,
    /// The model failed on this request otherwise.
    ModelError,
}

impl ErrorCode {
    /// The code for the model's failure on a request.
    pub fn of_model_error(e: &PoseGptError) -> Self {
        match e {
            PoseGptError::Llm(LlmError::ContextFull { .. }) => Self::ContextFull,
            // llama.cpp's "no KV slot for the batch": the context is full too.
            PoseGptError::Llm(LlmError::Decode { code: 1, .. }) => Self::ContextFull,
            PoseGptError::Llm(LlmError::TextTooLong { .. }) => Self::TextTooLong,
            PoseGptError::Llm(LlmError::Aborted) => Self::ShuttingDown,
            PoseGptError::EmptyQuestion => Self::EmptyText,
            PoseGptError::Vision(_) => Self::EncoderError,
            _ => Self::ModelError,
        }
    }
}

/// `{"code": ..., "message": ...}` inside an error answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// An error answer: the request id when one could be read, and the error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub id: Option<String>,
    pub error: ErrorBody,
}

impl ErrorReply {
    pub fn new(id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            error: ErrorBody {
                code,
                message: message.into(),
            },
        }
    }
}

/// Check an `ask` payload. On failure the error carries the request id if the payload had a
/// readable string `id`, so the client can match it.
pub fn parse_ask(payload: &[u8], limits: &Limits) -> Result<ValidAsk, ErrorReply> {
    let value: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
        ErrorReply::new(
            None,
            ErrorCode::BadJson,
            bounded_message(&format!("the payload is not valid JSON: {e}")),
        )
    })?;
    let id = value
        .get("id")
        .and_then(|v| v.as_str())
        .map(|s| truncate(s, limits.max_id_bytes));
    let fail = |code, message: String| ErrorReply::new(id.clone(), code, message);
    if !value.is_object() {
        return Err(fail(
            ErrorCode::InvalidRequest,
            "the payload must be a JSON object with fields id, text, image, conversation, answer"
                .into(),
        ));
    }
    let req: AskRequest = serde_json::from_value(value.clone()).map_err(|e| {
        fail(
            ErrorCode::InvalidRequest,
            bounded_message(&format!("field error: {e}")),
        )
    })?;
    if req.id.is_empty() || req.id.len() > limits.max_id_bytes {
        return Err(fail(
            ErrorCode::InvalidRequest,
            format!("field `id` must be 1..={} bytes", limits.max_id_bytes),
        ));
    }
    if req.text.trim().is_empty() {
        return Err(fail(ErrorCode::EmptyText, "field `text` is empty".into()));
    }
    if req.text.len() > limits.max_text_bytes {
        return Err(fail(
            ErrorCode::TextTooLong,
            format!(
                "field `text` has {} bytes, more than the limit of {}",
                req.text.len(),
                limits.max_text_bytes
            ),
        ));
    }
    if let Some(c) = &req.conversation {
        if c.is_empty() || c.len() > limits.max_id_bytes {
            return Err(fail(
                ErrorCode::InvalidRequest,
                format!(
                    "field `conversation` must be 1..={} bytes",
                    limits.max_id_bytes
                ),
            ));
        }
    }
    let image = match req.image {
        ImageRef::None => ValidImage::None,
        ImageRef::Live => ValidImage::Live,
        ImageRef::Inline(b64) => {
            // base64 grows data by 4/3: refuse before decoding what cannot fit.
            if b64.len() / 4 * 3 > limits.max_image_bytes + 3 {
                return Err(fail(
                    ErrorCode::ImageTooLarge,
                    format!(
                        "field `image.inline` holds about {} bytes, more than the limit of {}",
                        b64.len() / 4 * 3,
                        limits.max_image_bytes
                    ),
                ));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| {
                    fail(
                        ErrorCode::BadImage,
                        bounded_message(&format!("field `image.inline` is not base64: {e}")),
                    )
                })?;
            if bytes.len() > limits.max_image_bytes {
                return Err(fail(
                    ErrorCode::ImageTooLarge,
                    format!(
                        "field `image.inline` holds {} bytes, more than the limit of {}",
                        bytes.len(),
                        limits.max_image_bytes
                    ),
                ));
            }
            ValidImage::Inline(bytes)
        }
    };
    Ok(ValidAsk {
        id: req.id,
        text: req.text,
        image,
        conversation: req.conversation,
        answer: req.answer,
    })
}

/// The longest request `id` (and conversation id) taken, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// The `id` of an ask payload when it has a readable string one, cut to [`MAX_ID_BYTES`]: for
/// replies to asks refused before they are parsed.
pub fn peek_id(payload: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: Option<String>,
    }
    let id = serde_json::from_slice::<IdOnly>(payload).ok()?.id?;
    Some(truncate(&id, MAX_ID_BYTES))
}

/// How much of a client's input an error message quotes.
pub const EXCERPT_BYTES: usize = 80;
/// The longest error message sent back, whatever it quotes.
const MAX_MESSAGE_BYTES: usize = 400;

/// `s` cut to at most `max` bytes (on a character boundary), with `…` when something was cut.
pub fn excerpt(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut cut = truncate(s, max);
    cut.push('…');
    cut
}

/// A message built around client input, bounded: every quoted part (between backticks or
/// double quotes, as serde quotes what it could not take) cut to [`EXCERPT_BYTES`], and the
/// whole to [`MAX_MESSAGE_BYTES`].
fn bounded_message(message: &str) -> String {
    let mut out = String::with_capacity(message.len().min(MAX_MESSAGE_BYTES + 8));
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest.as_bytes()[open] as char;
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        match rest.find(quote) {
            Some(close) => {
                out.push_str(&excerpt(&rest[..close], EXCERPT_BYTES));
                out.push(quote);
                rest = &rest[close + 1..];
            }
            None => {
                out.push_str(&excerpt(rest, EXCERPT_BYTES));
                rest = "";
            }
        }
        if out.len() > MAX_MESSAGE_BYTES {
            break;
        }
    }
    out.push_str(rest);
    excerpt(&out, MAX_MESSAGE_BYTES)
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The frame a question about the live scene was answered on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FrameRef {
    /// The frame's sequence number at the source, as in pose messages.
    pub frame_seq: u64,
    /// How old the frame was when the answer was made.
    pub frame_age_ms: f64,
}

/// A successful `<base>/answer` payload: generated text with poses, or a yes/no answer
/// (`value`, `p_yes`; `text` "yes" or "no").
#[derive(Debug, Clone, Serialize)]
pub struct Answer<'a> {
    pub id: &'a str,
    pub text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_yes: Option<f32>,
    pub poses: &'a [Pose],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<crate::llm::StopReason>,
    #[serde(flatten)]
    pub frame: Option<FrameRef>,
    pub timings: &'a Timings,
}

impl<'a> Answer<'a> {
    pub fn new(id: &'a str, reply: &'a Reply, frame: Option<FrameRef>) -> Self {
        Self {
            id,
            text: &reply.text,
            value: None,
            p_yes: None,
            poses: &reply.poses,
            stop_reason: Some(reply.stop_reason),
            frame,
            timings: &reply.timings,
        }
    }

    pub fn yes_no(id: &'a str, answer: &'a YesNo, frame: Option<FrameRef>) -> Self {
        Self {
            id,
            text: if answer.value { "yes" } else { "no" },
            value: Some(answer.value),
            p_yes: Some(answer.p_yes),
            poses: &[],
            stop_reason: None,
            frame,
            timings: &answer.timings,
        }
    }
}

/// A `<base>/pose` payload: one processed frame.
#[derive(Debug, Clone, Serialize)]
pub struct PoseMessage<'a> {
    /// Pose messages published, from 0.
    pub seq: u64,
    /// The frame's sequence number at the source (gaps = frames dropped).
    pub frame_seq: u64,
    /// Capture and publish times, milliseconds since the Unix epoch.
    pub captured_at_ms: u64,
    pub published_at_ms: u64,
    /// From capture to publish.
    pub latency_ms: f64,
    /// One entry per person (PoseGPT reads one person per frame).
    pub persons: &'a [Pose],
    /// The rotations (and joints) went through the One Euro filter (`pose.smoothing`).
    pub smoothed: bool,
    pub timings: &'a Timings,
}

/// A `<base>/stats` payload.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub uptime_s: f64,
    /// False while the frame source (a camera) is unavailable.
    pub source_up: bool,
    pub pose_fps: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub latency_ms_p99: f64,
    pub frames_captured: u64,
    pub frames_dropped: u64,
    pub frames_skipped: u64,
    pub poses_published: u64,
    pub asks_answered: u64,
    pub asks_rejected: u64,
    /// Asks whose id came again (e.g. a QoS 1 redelivery): answered once only.
    pub asks_duplicate: u64,
    pub outbox_dropped: u64,
    pub tokens_per_s: f64,
    /// The last pose's confidence (P(pose token)).
    pub pose_confidence: f64,
    /// Median total time of the last 100 answers, ms (0 before the first).
    pub answer_ms_p50: f64,
    /// Watch rule evaluations since start, and their mean time (ms).
    pub watch_evaluations: u64,
    pub watch_ms_mean: f64,
    /// Temperatures, GPU load and power rails where the machine has them (each left out
    /// otherwise).
    #[serde(flatten)]
    pub health: crate::health::Health,
    /// The hottest of `temperature_c` (left out where there is none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c_max: Option<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_text_bytes: 64,
        max_image_bytes: 1000,
        max_id_bytes: 32,
    };

    fn code_of(payload: &str) -> (Option<String>, ErrorCode, String) {
        let e = parse_ask(payload.as_bytes(), &LIMITS).expect_err("must be refused");
        (e.id, e.error.code, e.error.message)
    }

    #[test]
    fn valid_requests_parse() {
        let a = parse_ask(br#"{"id":"q1","text":"hi"}"#, &LIMITS).unwrap();
        assert_eq!(a.image, ValidImage::None);
        let a = parse_ask(
            br#"{"id":"q1","text":"hi","image":"live","conversation":"c"}"#,
            &LIMITS,
        )
        .unwrap();
        assert_eq!(a.image, ValidImage::Live);
        assert_eq!(a.conversation.as_deref(), Some("c"));
        let b64 = base64::engine::general_purpose::STANDARD.encode(b"\x89PNG....");
        let a = parse_ask(
            format!(r#"{{"id":"q1","text":"hi","image":{{"inline":"{b64}"}}}}"#).as_bytes(),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(a.image, ValidImage::Inline(b"\x89PNG....".to_vec()));
    }

    #[test]
    fn each_malformed_kind_gets_its_code_and_names_the_field() {
        let (id, code, _) = code_of("{not json");
        assert_eq!((id, code), (None, ErrorCode::BadJson));

        let (id, code, msg) = code_of(r#"{"id":"q2","text":"hi","colour":"red"}"#);
        assert_eq!(
            (id.as_deref(), code),
            (Some("q2"), ErrorCode::InvalidRequest)
        );
        assert!(msg.contains("colour"), "{msg}");

        let (_, code, msg) = code_of(r#"{"id":"q3"}"#);
        assert_eq!(code, ErrorCode::InvalidRequest);
        assert!(msg.contains("text"), "{msg}");

        let (_, code, msg) = code_of(r#"{"id":"q4","text":5}"#);
        assert_eq!(code, ErrorCode::InvalidRequest);
        assert!(msg.contains("string"), "{msg}");

        let (_, code, _) = code_of(r#"{"id":"q5","text":"  "}"#);
        assert_eq!(code, ErrorCode::EmptyText);

        let long = "x".repeat(65);
        let (_, code, msg) = code_of(&format!(r#"{{"id":"q6","text":"{long}"}}"#));
        assert_eq!(code, ErrorCode::TextTooLong);
        assert!(msg.contains("text") && msg.contains("64"), "{msg}");

        let (_, code, msg) = code_of(r#"{"id":"q7","text":"hi","image":{"inline":"@@@"}}"#);
        assert_eq!(code, ErrorCode::BadImage);
        assert!(msg.contains("image.inline"), "{msg}");

        let big = base64::engine::general_purpose::STANDARD.encode(vec![7u8; 2000]);
        let (_, code, msg) = code_of(&format!(
            r#"{{"id":"q8","text":"hi","image":{{"inline":"{big}"}}}}"#
        ));
        assert_eq!(code, ErrorCode::ImageTooLarge);
        assert!(msg.contains("1000"), "{msg}");

        let (_, code, msg) = code_of(r#"{"id":"q9","text":"hi","image":"camera"}"#);
        assert_eq!(code, ErrorCode::InvalidRequest);
        assert!(msg.contains("camera"), "{msg}");

        let (_, code, _) = code_of(r#"["id","text"]"#);
        assert_eq!(code, ErrorCode::InvalidRequest);

        let (id, code, _) = code_of(r#"{"id":"","text":"hi"}"#);
        assert_eq!((id.as_deref(), code), (Some(""), ErrorCode::InvalidRequest));
    }

    #[test]
    fn error_messages_quote_at_most_an_excerpt_of_what_was_sent() {
        let huge = "A".repeat(1_600_000);
        for payload in [
            format!(r#"{{"id":"q1","text":"hi","image":"{huge}"}}"#),
            format!(r#"{{"id":"q1","text":"hi","{huge}":1}}"#),
            format!(r#"{{"id":"q1","text":"hi","image":{{"inline":5, "x":"{huge}"}}}}"#),
            format!(r#"{{"id":"q1","text":["{huge}"]}}"#),
            format!(r#"{{"id":"q1","text":"hi","conversation":{{"{huge}":"`{huge}"}}}}"#),
            format!("{{\"id\":\"q1\",\"text\":\"{huge}"),
        ] {
            let e = parse_ask(payload.as_bytes(), &LIMITS).expect_err("refused");
            let m = &e.error.message;
            assert!(m.len() <= 410, "{} bytes: {}", m.len(), excerpt(m, 200));
            assert!(
                !m.contains(&"A".repeat(EXCERPT_BYTES + 1)),
                "{}",
                excerpt(m, 200)
            );
        }
        // What is short is quoted whole, so the message still names the culprit.
        let (_, _, msg) = code_of(r#"{"id":"q9","text":"hi","image":"camera"}"#);
        assert!(msg.contains("`camera`"), "{msg}");
    }

    #[test]
    fn the_id_of_a_refused_request_is_read_when_there_is_one() {
        assert_eq!(peek_id(br#"{"id":"q1","text":5}"#).as_deref(), Some("q1"));
        assert_eq!(peek_id(br#"{"id":7}"#), None);
        assert_eq!(peek_id(b"{not json"), None);
        let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(1000));
        assert_eq!(peek_id(long.as_bytes()).unwrap().len(), MAX_ID_BYTES);
    }

    #[test]
    fn excerpts_cut_on_character_boundaries() {
        assert_eq!(excerpt("short", 80), "short");
        assert_eq!(excerpt("ééé", 3), "é…");
        assert_eq!(bounded_message("x `abc` y"), "x `abc` y");
        let long = format!("bad `{}` here", "é".repeat(100));
        assert_eq!(
            bounded_message(&long),
            format!("bad `{}…` here", "é".repeat(40))
        );
    }

    #[test]
    fn model_failures_get_their_own_codes() {
        let full = PoseGptError::Llm(LlmError::ContextFull {
            needed: 5000,
            n_ctx: 2048,
        });
        assert_eq!(ErrorCode::of_model_error(&full), ErrorCode::ContextFull);
        let no_slot = PoseGptError::Llm(LlmError::Decode {
            code: 1,
            from: 0,
            to: 9,
            hint: "",
        });
        assert_eq!(ErrorCode::of_model_error(&no_slot), ErrorCode::ContextFull);
        let vision = PoseGptError::Vision(crate::vision::VisionError::Run("x".into()));
        assert_eq!(ErrorCode::of_model_error(&vision), ErrorCode::EncoderError);
        let other = PoseGptError::Llm(LlmError::NoOutput { what: "logits" });
        assert_eq!(ErrorCode::of_model_error(&other), ErrorCode::ModelError);
        assert_eq!(
            serde_json::to_value(ErrorCode::ContextFull).unwrap(),
            "context_full"
        );
    }

    #[test]
    fn error_replies_serialise_as_documented() {
        let e = ErrorReply::new(Some("q1".into()), ErrorCode::Busy, "queue full");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "q1", "error": {"code": "busy", "message": "queue full"}})
        );
    }
}

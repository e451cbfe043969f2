//! Property-based tests of what the daemon takes from clients: the ask parser and the image
//! header check get random bytes, random JSON and mutated valid requests and images. Whatever
//! arrives: no panic, a request or an error with a code, an error message of bounded size that
//! quotes at most an excerpt, and an image refused from its header when it is over the limits.
//!
//! `POSEGPT_FUZZ_CASES` sets the cases per property (default 2000, what CI runs);
//! docs/reliability.md has the 100 000-case command.

use base64::Engine;
use posegpt_edge::protocol::{parse_ask, ErrorCode, Limits};
use posegpt_edge::vision::{check_image_header, decode_image, ImageLimits};
use proptest::prelude::*;
use std::io::Cursor;

const LIMITS: Limits = Limits {
    max_text_bytes: 4096,
    max_image_bytes: 1 << 20,
    max_id_bytes: 256,
};

fn config() -> ProptestConfig {
    let cases = std::env::var("POSEGPT_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The parser's contract on any payload.
fn parses_or_refuses_with_a_code(payload: &[u8]) {
    match parse_ask(payload, &LIMITS) {
        Ok(ask) => {
            assert!(!ask.id.is_empty() && ask.id.len() <= LIMITS.max_id_bytes);
            assert!(!ask.text.trim().is_empty() && ask.text.len() <= LIMITS.max_text_bytes);
        }
        Err(e) => {
            let m = &e.error.message;
            assert!(!m.is_empty());
            assert!(m.len() <= 410, "a {}-byte message", m.len());
            assert!(e
                .id
                .as_ref()
                .is_none_or(|id| id.len() <= LIMITS.max_id_bytes));
            // A JSON payload never gets `bad_json`; anything else gets nothing but `bad_json`.
            let is_json = serde_json::from_slice::<serde_json::Value>(payload).is_ok();
            assert_eq!(e.error.code == ErrorCode::BadJson, !is_json, "{m}");
        }
    }
}

/// A small gradient image in `format`.
fn encoded(width: u32, height: u32, format: image::ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]))
        .write_to(&mut Cursor::new(&mut out), format)
        .unwrap();
    out
}

fn png(width: u32, height: u32) -> Vec<u8> {
    encoded(width, height, image::ImageFormat::Png)
}

/// A byte string with random bytes replaced, inserted and removed.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = base.len();
    prop::collection::vec((0..len.max(1), any::<u8>(), 0..3u8), 1..8).prop_map(move |edits| {
        let mut b = base.clone();
        for (at, byte, kind) in edits {
            let at = at.min(b.len());
            match kind {
                0 if at < b.len() => b[at] = byte,
                1 => b.insert(at, byte),
                _ if at < b.len() => {
                    b.remove(at);
                }
                _ => b.push(byte),
            }
        }
        b
    })
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
        prop::sample::select(vec![
            "id",
            "text",
            "image",
            "live",
            "none",
            "inline",
            "conversation"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(vec!["id", "text", "image", "conversation", "inline"])
                        .prop_map(String::from),
                    ".{0,12}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn random_bytes_are_refused_with_a_code(payload in prop::collection::vec(any::<u8>(), 0..512)) {
        parses_or_refuses_with_a_code(&payload);
    }

    #[test]
    fn random_json_is_taken_or_refused_with_a_code(value in json_value()) {
        parses_or_refuses_with_a_code(&serde_json::to_vec(&value).unwrap());
    }

    #[test]
    fn mutated_requests_are_taken_or_refused_with_a_code(
        payload in mutated(format!(
            r#"{{"id":"q-17","text":"What is the person doing?","image":{{"inline":"{}"}},"conversation":"lobby"}}"#,
            base64::engine::general_purpose::STANDARD.encode(png(4, 3))
        ).into_bytes())
    ) {
        parses_or_refuses_with_a_code(&payload);
    }

    #[test]
    fn mutated_images_never_panic_and_oversized_ones_never_decode(
        bytes in prop_oneof![mutated(png(24, 16)), mutated(encoded(24, 16, image::ImageFormat::Jpeg)), prop::collection::vec(any::<u8>(), 0..256)]
    ) {
        let limits = ImageLimits { max_side: 64, max_pixels: 2048, max_aspect: 8.0 };
        let header = check_image_header(&bytes, "fuzz", &limits);
        match decode_image(&bytes, "fuzz", &limits) {
            Ok(img) => {
                // What decodes passed the header check, and is what the header said.
                let (_, w, h) = header.expect("decoded without a header");
                prop_assert_eq!(img.dimensions(), (w, h));
                prop_assert!(w <= 64 && h <= 64 && u64::from(w) * u64::from(h) <= 2048);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }
}

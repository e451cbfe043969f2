//! The live scene on both tiny bundles, in exact mode: a question about the frame the model
//! last posed reuses its image embeddings and KV positions and answers as the same question
//! computed cold; yes/no questions read P(yes) from one prefill.

mod common;

use common::{max_abs_diff, root};
use posegpt_edge::llm::Segment;
use posegpt_edge::posegpt::{AskImage, PoseGpt};
use posegpt_edge::vision::{load_image, RgbImage};
use std::time::Instant;

const BUNDLES: [&str; 2] = ["models/test-tiny", "models/test-chatpose-tiny"];

fn sample() -> RgbImage {
    let dir = root().join("models/samples");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    load_image(&names[0]).unwrap()
}

/// Positions the per-frame prompt shares with any question about its image: system, the user
/// turn up to the image, and the image.
fn shared_positions(pg: &PoseGpt) -> usize {
    pg.frame_tokens().0.len() + pg.bundle().manifest.image.tokens
}

#[test]
fn a_live_question_reuses_the_frame_and_answers_as_computed_cold() {
    let mut hidden_compared = 0;
    for bundle in BUNDLES {
        let mut pg = common::load_exact(&root().join(bundle), 24);
        let img = sample();
        let pixels = pg.bundle().vision.preprocess(&img);
        pg.pose_frame(&pixels, 0.0, 7, Instant::now()).unwrap();
        let live = pg.live_image().unwrap().clone();
        assert_eq!(live.frame_seq, 7);

        let q = "What is the person doing?";
        let warm = pg
            .ask_about(q, Some(AskImage::Encoded(&live.embeddings)), None)
            .unwrap();
        assert_eq!(
            warm.timings.encode_ms, 0.0,
            "{bundle}: the encoder ran again"
        );
        assert!(
            warm.timings.reused_positions >= shared_positions(&pg),
            "{bundle}: reused {} positions, the frame shares {}",
            warm.timings.reused_positions,
            shared_positions(&pg)
        );

        pg.session_mut().clear();
        let cold = pg.ask_about(q, Some(AskImage::Rgb(&img)), None).unwrap();
        assert_eq!(cold.timings.reused_positions, 0, "{bundle}");
        assert_eq!(warm.text, cold.text, "{bundle}");
        assert_eq!(
            warm.timings.generated_tokens, cold.timings.generated_tokens,
            "{bundle}"
        );
        assert_eq!(warm.poses.len(), cold.poses.len(), "{bundle}");
        for (w, c) in warm.poses.iter().zip(&cold.poses) {
            let d = max_abs_diff(&w.hidden, &c.hidden);
            assert!(
                d < common::llm_tol(1e-4, 1e-2),
                "{bundle}: hidden differs by {d}"
            );
            hidden_compared += 1;
        }
        // A second question about the same frame reuses it again.
        let again = pg
            .ask_about("And now?", Some(AskImage::Encoded(&live.embeddings)), None)
            .unwrap();
        assert!(again.timings.reused_positions >= shared_positions(&pg));
    }
    // test-tiny's answer to this question has pose tokens (3 with greedy decoding).
    assert!(hidden_compared > 0, "no pose hidden state was compared");
}

#[test]
fn yes_no_is_the_two_token_softmax_of_a_cold_prefill() {
    for bundle in BUNDLES {
        let mut pg = common::load_exact(&root().join(bundle), 24);
        let (yes, no) = pg
            .yes_no_tokens()
            .expect("the tiny bundles have Yes/No tokens");
        let llm = pg.bundle().llm.clone();
        let text = |t| String::from_utf8_lossy(&llm.token_bytes(t, false)).into_owned();
        let (yes_text, no_text) = (text(yes), text(no));
        assert!(yes_text.trim().starts_with('Y'), "{bundle}: {yes_text:?}");
        assert!(no_text.trim().starts_with('N'), "{bundle}: {no_text:?}");

        let img = sample();
        let pixels = pg.bundle().vision.preprocess(&img);
        pg.pose_frame(&pixels, 0.0, 1, Instant::now()).unwrap();
        let live = pg.live_image().unwrap().clone();
        let q = "Is the person standing?";
        let got = pg
            .ask_yes_no(q, Some(AskImage::Encoded(&live.embeddings)), None)
            .unwrap();
        assert!(
            got.timings.reused_positions >= shared_positions(&pg),
            "{bundle}"
        );
        assert_eq!(got.value, got.p_yes >= 0.5);

        // The reference: the prompt written out here from the manifest, a cold prefill, and
        // the softmax of the two logits in double precision.
        let m = pg.bundle().manifest.clone();
        let prompt = format!(
            "{}{}{}",
            m.system_text(),
            m.user_turn(&format!("{q}\n{}", m.prompt.short_answer), true),
            m.assistant_open("")
        );
        let (before, after) = prompt.split_once(&m.prompt.image_marker).unwrap();
        let before = llm.tokenize(before, llm.adds_bos(), true).unwrap();
        let after = llm.tokenize(after, false, true).unwrap();
        let embeddings = pg.encode_image(&img).unwrap();
        pg.session_mut().clear();
        let out = pg
            .session_mut()
            .prefill(
                &[
                    Segment::Tokens(&before),
                    Segment::Embeddings(&embeddings),
                    Segment::Tokens(&after),
                ],
                false,
            )
            .unwrap();
        let (ly, ln) = (
            out.logits[yes as usize] as f64,
            out.logits[no as usize] as f64,
        );
        let want = 1.0 / (1.0 + (ln - ly).exp());
        let d = (got.p_yes as f64 - want).abs();
        assert!(
            d < common::llm_tol(1e-4, 1e-2) as f64,
            "{bundle}: p_yes {} vs cold {want}",
            got.p_yes
        );
    }
}

#[test]
fn a_conversation_about_the_live_frame_goes_on() {
    let mut pg = common::load_exact(&root().join("models/test-tiny"), 8);
    let img = sample();
    let pixels = pg.bundle().vision.preprocess(&img);
    pg.pose_frame(&pixels, 0.0, 3, Instant::now()).unwrap();
    let live = pg.live_image().unwrap().clone();
    let first = pg
        .ask_about(
            "Who is there?",
            Some(AskImage::Encoded(&live.embeddings)),
            Some("c"),
        )
        .unwrap();
    // The follow-up's prompt holds the first turn, its image included: the cache holds all of
    // the first prompt, so at least that is reused.
    let second = pg.ask_about("And what next?", None, Some("c")).unwrap();
    assert_eq!(pg.history_len("c"), 2);
    assert!(
        second.timings.reused_positions >= first.timings.prompt_positions,
        "{} reused, the first prompt had {}",
        second.timings.reused_positions,
        first.timings.prompt_positions
    );
    assert!(second.timings.prompt_positions > first.timings.prompt_positions);
    let yes_no = pg
        .ask_yes_no("Is it the same person?", None, Some("c"))
        .unwrap();
    assert!(yes_no.timings.reused_positions >= second.timings.prompt_positions);
    assert_eq!(pg.history_len("c"), 3);
}

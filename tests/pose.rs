//! The whole pose path on models/test-tiny against the independent numpy reference:
//! preprocessing (Pillow-exact), vision encoder, per-frame prompt, hidden state, head, SMPL
//! axis-angle, confidence; `ask` with pose tokens; with perturbation checks that a broken port
//! would not pass.

mod common;

use common::{expected, floats, ids, llm_tol, max_abs_diff, root};
use posegpt_edge::posegpt::{PoseGpt, RuntimeOptions, POSE_MARKER};
use posegpt_edge::vision::{load_image, preprocess, to_square, ImageSpec, ResizeMode};
use serde_json::Value;

fn exact() -> PoseGpt {
    common::load_exact(&root().join("models/test-tiny"), 24)
}

fn spec_with(pg: &PoseGpt, mode: ResizeMode) -> ImageSpec {
    ImageSpec {
        mode,
        ..pg.bundle().manifest.image_spec()
    }
}

fn mode_of(case: &Value) -> ResizeMode {
    match case["mode"].as_str().unwrap() {
        "crop" => ResizeMode::Crop,
        "pad" => ResizeMode::Pad,
        m => panic!("mode {m}"),
    }
}

#[test]
fn preprocessing_matches_pillow_exactly() {
    let pg = exact();
    let cases = expected()["preprocess"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let img = load_image(&root().join(case["image"].as_str().unwrap())).unwrap();
        let want = load_image(&root().join(case["expected"].as_str().unwrap())).unwrap();
        let got = to_square(&img, &spec_with(&pg, mode_of(case)));
        let diff = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            diff, 0,
            "{} ({:?}): {diff} bytes differ",
            case["image"], case["mode"]
        );
    }
}

#[test]
fn frame_prompt_tokens_match_llava_tokenization() {
    let pg = exact();
    let (before, after) = pg.frame_tokens();
    let case = &expected()["pose"][0];
    assert_eq!(before, ids(&case["before_ids"]));
    assert_eq!(after, ids(&case["after_ids"]));
    // The answer prefix ends in the lone SPM space piece, the position ChatPose's head reads.
    let last = *after.last().unwrap();
    assert_eq!(
        pg.bundle().llm.token_text(last).as_deref(),
        Some("\u{2581}")
    );
}

#[test]
fn pose_matches_the_reference_for_every_fixture() {
    let mut pg = exact();
    for case in expected()["pose"].as_array().unwrap() {
        let img = load_image(&root().join(case["image"].as_str().unwrap())).unwrap();
        let pixels = preprocess(&img, &spec_with(&pg, mode_of(case)));
        let emb = pg.bundle().vision.encode_pixels(&pixels).unwrap();
        let de = max_abs_diff(&emb, &floats(&case["embeddings"]));
        assert!(de < 1e-3, "{}: embeddings differ by {de}", case["image"]);

        let fp = pg.pose_from_embeddings(&emb).unwrap();
        let p = &fp.pose;
        let dh = max_abs_diff(&p.hidden, &floats(&case["hidden"]));
        let dr = max_abs_diff(&p.raw, &floats(&case["head"]));
        let dc = (p.confidence as f64 - case["confidence"].as_f64().unwrap()).abs();
        assert!(
            dh < llm_tol(1e-3, 1e-2),
            "{}: hidden differs by {dh}",
            case["image"]
        );
        assert!(
            dr < llm_tol(1e-3, 1e-2),
            "{}: head differs by {dr}",
            case["image"]
        );
        let tc = llm_tol(1e-3, 1e-2) as f64;
        assert!(dc < tc, "{}: confidence differs by {dc}", case["image"]);
        let dg = max_abs_diff(&p.smpl.global_orient, &floats(&case["global_orient"]));
        let db = max_abs_diff(&p.smpl.body_pose, &floats(&case["body_pose"]));
        assert!(
            dg < llm_tol(1e-3, 3e-2) && db < llm_tol(1e-3, 3e-2),
            "{}: axis-angle differs by {dg} / {db}",
            case["image"]
        );
    }
}

#[test]
fn pose_from_an_image_file_uses_the_manifest_preprocessing() {
    let mut pg = exact();
    let case = &expected()["pose"][0];
    assert_eq!(mode_of(case), pg.bundle().manifest.image.mode);
    let img = load_image(&root().join(case["image"].as_str().unwrap())).unwrap();
    let fp = pg.pose(&img).unwrap();
    let dr = max_abs_diff(&fp.pose.raw, &floats(&case["head"]));
    assert!(dr < llm_tol(1e-3, 1e-2), "head differs by {dr}");
    assert!(fp.timings.encode_ms > 0.0 && fp.timings.prefill_ms > 0.0);

    // The daemon's path: pixels prepared elsewhere (its capture thread) give the same pose,
    // and the time reported for preprocessing is the one passed in.
    let pixels = pg.bundle().vision.preprocessor().preprocess(&img);
    let prepared = pg.pose_prepared(&pixels, 1.25).unwrap();
    assert_eq!(prepared.pose.raw, fp.pose.raw);
    assert_eq!(prepared.pose.hidden, fp.pose.hidden);
    assert_eq!(prepared.timings.preprocess_ms, 1.25);
    assert!(prepared.timings.total_ms > 1.25);
}

#[test]
fn perturbations_change_the_pose() {
    let mut pg = exact();
    let cases = expected()["pose"].as_array().unwrap();
    let img = load_image(&root().join(cases[0]["image"].as_str().unwrap())).unwrap();
    let base = pg.pose(&img).unwrap().pose;

    // Another image changes the pose.
    let other = load_image(&root().join(cases[1]["image"].as_str().unwrap())).unwrap();
    let moved = pg.pose(&other).unwrap().pose;
    assert!(max_abs_diff(&base.raw, &moved.raw) > 1e-2);

    // Dropping the image embeddings changes it.
    let (before, after) = pg.frame_tokens();
    let (before, after) = (before.to_vec(), after.to_vec());
    let s = pg.session_mut();
    use posegpt_edge::llm::Segment;
    let no_image = s
        .prefill(&[Segment::Tokens(&before), Segment::Tokens(&after)], true)
        .unwrap();
    let no_image = pg.head_pose(no_image.hidden.unwrap(), 0.0).unwrap();
    assert!(max_abs_diff(&base.raw, &no_image.raw) > 1e-2);

    // Reading the hidden state one position later (at the pose token itself) changes it.
    let emb = pg.encode_image(&img).unwrap();
    let pose_token = pg.bundle().pose_token;
    let mut after_pose = after.clone();
    after_pose.push(pose_token);
    let s = pg.session_mut();
    let late = s
        .prefill(
            &[
                Segment::Tokens(&before),
                Segment::Embeddings(&emb),
                Segment::Tokens(&after_pose),
            ],
            true,
        )
        .unwrap();
    let late = pg.head_pose(late.hidden.unwrap(), 0.0).unwrap();
    assert!(max_abs_diff(&base.raw, &late.raw) > 1e-2);

    // crop and pad give different embeddings for a non-square image.
    let crop = preprocess(&img, &spec_with(&pg, ResizeMode::Crop));
    let pad = preprocess(&img, &spec_with(&pg, ResizeMode::Pad));
    let e_crop = pg.bundle().vision.encode_pixels(&crop).unwrap();
    let e_pad = pg.bundle().vision.encode_pixels(&pad).unwrap();
    assert!(max_abs_diff(&e_crop, &e_pad) > 1e-2);
}

/// The daemon's warm-up leaves the prompt before the image in the KV cache: the first real
/// frame computes only the image and what follows, and gives the pose a cold cache gives.
#[test]
fn the_first_frame_after_the_warm_up_reuses_the_prompt_before_the_image() {
    let cases = expected()["pose"].as_array().unwrap();
    let img = load_image(&root().join(cases[0]["image"].as_str().unwrap())).unwrap();
    let mut pg = exact();
    let warm = pg.warm_up().unwrap();
    assert_eq!(warm.timings.reused_positions, 0);
    let first = pg.pose(&img).unwrap();
    let (before, _) = pg.frame_tokens();
    assert!(!before.is_empty());
    assert_eq!(first.timings.reused_positions, before.len());
    let cold = exact().pose(&img).unwrap();
    assert_eq!(first.pose.hidden, cold.pose.hidden);
    assert_eq!(first.pose.raw, cold.pose.raw);
}

#[test]
fn cached_prefix_gives_the_same_pose_as_a_cold_cache() {
    let cases = expected()["pose"].as_array().unwrap();
    let a = load_image(&root().join(cases[0]["image"].as_str().unwrap())).unwrap();
    let b = load_image(&root().join(cases[1]["image"].as_str().unwrap())).unwrap();
    let mut warm = exact();
    warm.pose(&a).unwrap();
    let second = warm.pose(&b).unwrap();
    // Everything before the image came from the KV cache.
    let (before, _) = warm.frame_tokens();
    assert_eq!(second.timings.reused_positions, before.len());
    let mut cold = exact();
    let fresh = cold.pose(&b).unwrap();
    assert_eq!(fresh.timings.reused_positions, 0);
    assert_eq!(second.pose.hidden, fresh.pose.hidden);
    assert_eq!(second.pose.raw, fresh.pose.raw);
    assert_eq!(second.pose.confidence, fresh.pose.confidence);
}

#[test]
fn ask_returns_one_pose_per_pose_token_matching_the_reference() {
    let mut pg = exact();
    let case = &expected()["ask"];
    let reply = pg
        .ask(case["question"].as_str().unwrap(), None, None)
        .unwrap();
    let want = case["poses"].as_array().unwrap();
    assert!(!want.is_empty());
    assert_eq!(reply.poses.len(), want.len());
    assert_eq!(reply.text.matches(POSE_MARKER).count(), want.len());
    for (p, w) in reply.poses.iter().zip(want) {
        let d = max_abs_diff(&p.raw, &floats(&w["head"]));
        assert!(d < llm_tol(1e-3, 1e-2), "ask pose head differs by {d}");
        let dp = (p.confidence as f64 - w["probability"].as_f64().unwrap()).abs();
        assert!(
            dp < llm_tol(1e-3, 1e-2) as f64,
            "ask pose probability differs by {dp}"
        );
    }
    assert_eq!(reply.timings.generated_tokens, ids(&case["tokens"]).len());
}

#[test]
fn ask_keeps_a_bounded_conversation_and_reuses_its_prefix() {
    let mut pg = PoseGpt::load(
        &root().join("models/test-tiny"),
        RuntimeOptions {
            max_tokens: 8,
            max_history_turns: 2,
            ..RuntimeOptions::default()
        },
    )
    .unwrap();
    let first = pg.ask("Describe the person.", None, Some("c1")).unwrap();
    let second = pg.ask("And now?", None, Some("c1")).unwrap();
    // The second prompt holds the first turn, whose positions are still in the KV cache.
    assert!(second.timings.prompt_positions > first.timings.prompt_positions);
    assert!(second.timings.reused_positions >= first.timings.prompt_positions);
    // A fresh conversation starts from the system prompt only.
    let other = pg.ask("Describe the person.", None, Some("c2")).unwrap();
    assert_eq!(
        other.timings.prompt_positions,
        first.timings.prompt_positions
    );
    assert_eq!(other.text, first.text, "greedy answers are reproducible");
    // History is bounded: the oldest turns are dropped.
    assert_eq!(pg.history_len("c1"), 2);
    pg.ask("Again?", None, Some("c1")).unwrap();
    assert_eq!(pg.history_len("c1"), 2);
    pg.forget("c1");
    assert_eq!(pg.history_len("c1"), 0);
}

#[test]
fn ask_about_an_image_differs_from_text_only() {
    let mut pg = exact();
    let img = load_image(&root().join("models/samples/person-wave.png")).unwrap();
    let with = pg
        .ask("What is the person doing?", Some(&img), None)
        .unwrap();
    let without = pg.ask("What is the person doing?", None, None).unwrap();
    let n_img = pg.bundle().manifest.image.tokens;
    assert!(with.timings.prompt_positions >= without.timings.prompt_positions + n_img);
    assert!(pg.ask("   ", None, None).is_err());
}

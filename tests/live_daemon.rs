//! The live scene through the daemon, against a real mosquitto: questions about the live frame
//! reuse it (the reply's timings and frame fields say so), yes/no answers, and watch rules'
//! retained states and events. The hold logic itself is tested in src/daemon/watches.rs.

#[path = "common/daemon_harness.rs"]
mod harness;

use harness::*;
use posegpt_edge::posegpt::{PoseGpt, RuntimeOptions};
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

/// The first message on `<base>/watch/<id>` for each id (retained ones come at subscription).
async fn retained(w: &mut Watcher, ids: &[&str]) -> HashMap<String, Value> {
    let mut got = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while got.len() < ids.len() {
        let m = tokio::time::timeout_at(deadline, w.rx.recv())
            .await
            .unwrap_or_else(|_| panic!("retained watch states: only {:?}", got.keys()))
            .expect("the watcher runs");
        if let Some(id) = m.topic.rsplit_once("/watch/").map(|(_, id)| id.to_string()) {
            got.entry(id).or_insert_with(|| json(&m));
        }
    }
    got
}

/// Positions the per-frame prompt of models/test-tiny shares with a question about its image:
/// system, the user turn up to the image, the image.
fn shared_positions() -> u64 {
    let pg = PoseGpt::load(&root().join("models/test-tiny"), RuntimeOptions::default()).unwrap();
    (pg.frame_tokens().0.len() + pg.bundle().manifest.image.tokens) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_questions_and_watch_rules() {
    let shared = shared_positions();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let _broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher-live").await;
    // Events on a watcher of their own: `expect` on the main one drops other topics, and the
    // start event may come while it waits for an answer.
    let events_topic = format!("posegpt/{DEVICE}/events");
    let mut events = Watcher::connect_to(port, "watcher-events", &[events_topic]).await;
    // Events are not retained: subscribed before the daemon starts, or one may be missed.
    events.wait_subacks(1, 30).await;
    // Thresholds at the ends of (0, 1): "always" is yes and "never" no whatever the random
    // model says.
    let config = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         [requests]\nlive_max_age_ms = 5000\n\
         [[watch]]\nid = \"always\"\nquestion = \"Is anyone there?\"\nkind = \"yes_no\"\nevery_s = 0.3\nthreshold = 0.000001\nhold_s = 0.5\n\
         [[watch]]\nid = \"never\"\nquestion = \"Is anyone there?\"\nkind = \"yes_no\"\nevery_s = 0.3\nthreshold = 0.999999\n\
         [[watch]]\nid = \"activity\"\nquestion = \"What is the person doing?\"\nkind = \"text\"\nevery_s = 0.5\n"
    );
    let mut daemon = Daemon::start(dir.path(), &config);
    w.expect("available", 60, is("online")).await;
    w.expect("pose", 30, |_| true).await;

    // A text question about the live frame.
    w.ask(r#"{"id":"live-1","text":"What is the person doing?","image":"live"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("live-1")).await);
    assert!(a["text"].is_string(), "{a}");
    assert!(a["frame_seq"].is_u64() && a["frame_age_ms"].is_f64(), "{a}");
    assert!(a["frame_age_ms"].as_f64().unwrap() < 5000.0, "{a}");
    let reused = a["timings"]["reused_positions"].as_u64().unwrap();
    assert!(reused >= shared, "reused {reused} < {shared}: {a}");
    assert_eq!(a["timings"]["encode_ms"], 0.0, "{a}");

    // A yes/no question about the live frame.
    w.ask(r#"{"id":"live-2","text":"Is the person standing?","image":"live","answer":"yes_no"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("live-2")).await);
    let p = a["p_yes"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{a}");
    assert_eq!(a["value"], p >= 0.5, "{a}");
    assert_eq!(a["text"], if p >= 0.5 { "yes" } else { "no" }, "{a}");
    assert_eq!(a["timings"]["generated_tokens"], 0, "{a}");
    assert!(
        a["timings"]["reused_positions"].as_u64().unwrap() >= shared,
        "{a}"
    );
    assert!(a.get("stop_reason").is_none(), "{a}");
    // A yes/no question without an image.
    w.ask(r#"{"id":"plain","text":"Is the sky blue?","answer":"yes_no"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("plain")).await);
    assert!(a["p_yes"].is_f64() && a.get("frame_seq").is_none(), "{a}");
    // An unknown answer kind is refused, naming the field.
    w.ask(r#"{"id":"bad","text":"Is it?","answer":"maybe"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("bad")).await);
    assert_eq!(a["error"]["code"], "invalid_request", "{a}");
    assert!(
        a["error"]["message"].as_str().unwrap().contains("maybe"),
        "{a}"
    );

    // Watch rules: a start event for the one that is yes, retained states for all three.
    let e = json(
        &events
            .expect("events", 30, |m| json(m)["watch"] == "always")
            .await,
    );
    assert_eq!(e["type"], "start", "{e}");
    assert!(e["p_yes"].is_f64() && e["frame_seq"].is_u64(), "{e}");
    let st = json(
        &w.expect("stats", 30, |m| {
            json(m)["watch_evaluations"].as_u64() > Some(3)
        })
        .await,
    );
    assert!(st["watch_ms_mean"].as_f64().unwrap() > 0.0, "{st}");
    // The pose stream goes on between watch evaluations.
    w.expect("pose", 10, |_| true).await;

    // A client that subscribes now gets each rule's retained state.
    let mut late = Watcher::connect(port, "watcher-late").await;
    let states = retained(&mut late, &["always", "never", "activity"]).await;
    let s = &states["always"];
    assert_eq!(s["value"], true, "{s}");
    assert!(
        s["p_yes"].is_f64() && s["frame_seq"].is_u64() && s["at_ms"].is_u64(),
        "{s}"
    );
    assert_eq!(states["never"]["value"], false, "{}", states["never"]);
    let s = &states["activity"];
    assert!(s["value"].is_string() && s["text"] == s["value"], "{s}");

    daemon.signal("-TERM");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
    // Among every event seen, none is about "never".
    while let Ok(m) = events.rx.try_recv() {
        if m.topic.ends_with("/events") {
            assert_ne!(
                json(&m)["watch"],
                "never",
                "{}",
                String::from_utf8_lossy(&m.payload)
            );
        }
    }
}

/// A live frame older than `requests.live_max_age_ms` is not reused: the newest frame is
/// encoded for the question (here every time: the limit is 0). With `pose.smoothing` on, pose
/// messages say they are smoothed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_live_frame_is_replaced_by_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let _broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher-stale").await;
    let config =
        format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n[requests]\nlive_max_age_ms = 0\n");
    let mut daemon = Daemon::start(dir.path(), &config);
    w.expect("available", 60, is("online")).await;
    w.expect("pose", 30, |_| true).await;
    w.ask(r#"{"id":"stale","text":"Is anyone there?","image":"live","answer":"yes_no"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("stale")).await);
    assert!(a["timings"]["encode_ms"].as_f64().unwrap() > 0.0, "{a}");
    assert!(a["frame_seq"].is_u64(), "{a}");
    daemon.signal("-TERM");
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

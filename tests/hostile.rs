//! Hostile input against a running daemon (`posegpt-edge run` on models/test-tiny, a real
//! mosquitto): each request is answered with its error code within a second, the pose stream
//! goes on within two seconds after it, and images that announce a huge size cost no memory.

#[path = "common/daemon_harness.rs"]
mod harness;

use harness::*;
use std::io::Cursor;
use std::time::{Duration, Instant};

fn png(width: u32, height: u32) -> String {
    use base64::Engine;
    let mut bytes = Vec::new();
    image::RgbImage::from_pixel(width, height, image::Rgb([90, 120, 150]))
        .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The newest pose's `seq` after `after`, within `secs`.
async fn pose_after(w: &mut Watcher, after: u64, secs: u64) -> u64 {
    let v = json(
        &w.expect("pose", secs, |m| {
            json(m)["seq"].as_u64().is_some_and(|s| s > after)
        })
        .await,
    );
    v["seq"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_at_once_and_the_pose_stream_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let _broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher-hostile").await;
    // Default image limits and payload size (4 MiB images); a small context, so that a long
    // question does not fit.
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{DEVICE}\"\n\
             [model]\nbundle = \"{}\"\nthreads = 2\nmax_tokens = 8\nn_ctx = 256\n\
             [source]\nkind = \"dir\"\npath = \"{}\"\nfps = 20.0\n\
             [pose]\nmax_rate_hz = 10.0\n\
             [requests]\nqueue = 2\nmax_text_bytes = 4096\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\nstats_interval_s = 1.0\n\
             [web]\nlisten = \"\"\n",
            root().join("models/test-tiny").display(),
            root().join("models/samples").display(),
        ),
    )
    .unwrap();
    let mut daemon = Daemon::start_config(&config);
    w.expect("available", 60, is("online")).await;
    // One ordinary question first, so that what answering allocates is in the baseline.
    w.ask(r#"{"id":"warm","text":"What is the person doing?","image":"live"}"#)
        .await;
    json(&w.expect("answer", 60, answer_for("warm")).await);
    let mut seq = pose_after(&mut w, 0, 30).await;
    let rss_before = daemon.rss();

    let huge = "A".repeat(1_600_000);
    let words: String = (0..400).map(|i| format!("w{i} ")).collect();
    let cases: Vec<(&'static str, String, &str, &str)> = vec![
        (
            "wide",
            format!(
                r#"{{"id":"wide","text":"hi","image":{{"inline":"{}"}}}}"#,
                png(200_000, 1)
            ),
            "image_too_large",
            "image_limits.max_side",
        ),
        (
            "tall",
            format!(
                r#"{{"id":"tall","text":"hi","image":{{"inline":"{}"}}}}"#,
                png(1, 200_000)
            ),
            "image_too_large",
            "image_limits.max_side",
        ),
        (
            "long-image-field",
            format!(r#"{{"id":"long-image-field","text":"hi","image":"{huge}"}}"#),
            "invalid_request",
            "unknown variant",
        ),
        (
            "too-long-for-context",
            format!(r#"{{"id":"too-long-for-context","text":"{words}"}}"#),
            "context_full",
            "n_ctx",
        ),
    ];
    for (id, payload, code, says) in cases {
        let sent = Instant::now();
        w.ask(&payload).await;
        let e = json(&w.expect("answer", 10, answer_for(id)).await);
        let took = sent.elapsed();
        let short: String = e.to_string().chars().take(300).collect();
        assert_eq!(e["error"]["code"], code, "{id}: {short}");
        let message = e["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{id}: {message}");
        assert!(message.len() <= 410, "{id}: {} bytes", message.len());
        assert!(!message.contains(&"A".repeat(81)), "{id}: echoes the input");
        assert!(
            took < Duration::from_secs(1),
            "{id}: answered after {took:?}"
        );
        seq = pose_after(&mut w, seq, 2).await;
    }
    let rss_after = daemon.rss();
    assert!(
        rss_after < rss_before + 50 * 1024 * 1024,
        "resident memory grew from {} MB to {} MB",
        rss_before >> 20,
        rss_after >> 20
    );

    daemon.signal("-TERM");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

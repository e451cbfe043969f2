//! The live view in a real headless Chromium: the page draws the pose and redraws it as poses
//! come, and a question typed into it is answered on the page. And the token: without it the
//! page, its feed and its questions get 401 when the daemon listens off loopback.

#[path = "common/cdp.rs"]
mod cdp;
#[path = "common/daemon_harness.rs"]
mod harness;

use harness::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const TOKEN: &str = "view-token-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; the status and the body.
fn http(port: u16, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{headers}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    // The feed never ends: a little of it is enough.
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if path.starts_with("/events") && String::from_utf8_lossy(&out).contains("event: hello") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Pixels of the 3D view that are the skeleton's (saturated colour; the floor is grey), and
/// the view's pixels.
fn view_pixels(shot: &image::RgbaImage, rect: &Value) -> (usize, Vec<[u8; 3]>) {
    let f = |k: &str| rect[k].as_f64().unwrap() as u32;
    let (x0, y0, w, h) = (f("x"), f("y"), f("width"), f("height"));
    let mut coloured = 0;
    let mut pixels = Vec::new();
    for y in y0..(y0 + h).min(shot.height()) {
        for x in x0..(x0 + w).min(shot.width()) {
            let p = shot.get_pixel(x, y).0;
            let (max, min) = (p[..3].iter().max().unwrap(), p[..3].iter().min().unwrap());
            if max - min > 60 {
                coloured += 1;
            }
            pixels.push([p[0], p[1], p[2]]);
        }
    }
    (coloured, pixels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_draws_the_pose_and_answers_a_question_typed_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let web_port = free_port();
    let _broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher-web").await;
    let config = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         [web]\nlisten = \"127.0.0.1:{web_port}\"\ntoken = \"{TOKEN}\"\nshow_frames = true\n\
         [[watch]]\nid = \"someone\"\nquestion = \"Is anyone there?\"\nkind = \"yes_no\"\nevery_s = 1.0\n"
    );
    let mut daemon = Daemon::start(dir.path(), &config);
    w.expect("available", 60, is("online")).await;
    w.expect("pose", 30, |_| true).await;
    daemon.wait_log(
        &format!("live view on http://127.0.0.1:{web_port}/"),
        Duration::from_secs(5),
    );

    let browser = tokio::task::spawn_blocking(move || {
        let mut b = cdp::Browser::launch(1280, 900);
        b.navigate(&format!("http://127.0.0.1:{web_port}/?token={TOKEN}"));
        b.wait_for(
            "document.getElementById('status').className === 'up'",
            Duration::from_secs(30),
        );
        // Poses arrive and are drawn.
        let first = b.wait_for(
            "document.getElementById('pose-info').textContent",
            Duration::from_secs(30),
        );
        let rect =
            b.eval("JSON.stringify(document.getElementById('view').getBoundingClientRect())");
        let rect: Value = serde_json::from_str(rect.as_str().unwrap()).unwrap();
        let shot1 = b.screenshot();
        let (coloured1, pixels1) = view_pixels(&shot1, &rect);
        assert!(
            coloured1 > 300,
            "the 3D view shows no skeleton ({coloured1} coloured pixels)"
        );
        // A later pose redraws it: wait for another pose, then compare the two pictures.
        let mut changed = 0;
        for _ in 0..20 {
            let script = format!("document.getElementById('pose-info').textContent !== {first}");
            b.wait_for(&script, Duration::from_secs(30));
            let (coloured2, pixels2) = view_pixels(&b.screenshot(), &rect);
            assert!(coloured2 > 300, "{coloured2} coloured pixels");
            changed = pixels1.iter().zip(&pixels2).filter(|(a, b)| a != b).count();
            if changed > 100 {
                break;
            }
        }
        assert!(
            changed > 100,
            "the 3D view did not change between poses ({changed} pixels)"
        );
        // The watch rule, the health panel and the frame (show_frames is on).
        b.wait_for(
            "document.querySelector('#watches [data-watch=someone] span').textContent !== '…'",
            Duration::from_secs(30),
        );
        b.wait_for(
            "document.getElementById('health').textContent.includes('poses/s')",
            Duration::from_secs(30),
        );
        b.wait_for(
            "document.getElementById('frame').naturalWidth > 0",
            Duration::from_secs(30),
        );
        // For the picture in docs/web.md, let the charts fill a little first.
        if std::env::var_os("WEB_SCREENSHOT").is_some() {
            std::thread::sleep(Duration::from_secs(20));
        }
        // A question typed into the page, answered on the page.
        b.eval("document.getElementById('question').focus()");
        b.type_text("What is the person doing?");
        b.press_enter();
        let meta = b.wait_for(
            "document.querySelector('#answers li .meta')?.textContent",
            Duration::from_secs(60),
        );
        let id = b.eval("document.querySelector('#answers li').dataset.id");
        let question = b.eval("document.querySelector('#answers li .q').textContent");
        let answer = b.eval("document.querySelector('#answers li .a').textContent");
        // The picture in docs/web.md: `WEB_SCREENSHOT=docs/web.png cargo test --test web`.
        if let Ok(path) = std::env::var("WEB_SCREENSHOT") {
            b.save_screenshot(std::path::Path::new(&path));
        }
        (meta, id, question, answer)
    })
    .await
    .unwrap();
    let (meta, id, question, answer) = browser;
    assert_eq!(question, "What is the person doing?");
    assert!(id.as_str().unwrap().starts_with("web-"), "{id}");
    assert!(answer.as_str().is_some_and(|a| a != "…"), "{answer}");
    let meta = meta.as_str().unwrap();
    assert!(
        meta.contains("positions reused") && meta.contains("frame"),
        "{meta}"
    );

    daemon.signal("-TERM");
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_page_its_feed_and_its_questions_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let web_port = free_port();
    let _broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher-web-token").await;
    let config = format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
         [web]\nlisten = \"0.0.0.0:{web_port}\"\ntoken = \"{TOKEN}\"\n"
    );
    let mut daemon = Daemon::start(dir.path(), &config);
    w.expect("available", 60, is("online")).await;
    daemon.wait_log("live view on http://0.0.0.0:", Duration::from_secs(5));
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let ask = r#"{"text":"Is the person standing?","image":"live","answer":"yes_no"}"#;
    let checks = tokio::task::spawn_blocking(move || {
        let with = format!("?token={TOKEN}");
        let wrong = "?token=view-token-0123456788";
        for path in ["/", "/events", "/frame.jpg"] {
            assert_eq!(http(web_port, "GET", path, "", "").0, 401, "GET {path}");
            assert_eq!(
                http(web_port, "GET", &format!("{path}{wrong}"), "", "").0,
                401,
                "GET {path} with a wrong token"
            );
        }
        assert_eq!(http(web_port, "POST", "/api/ask", "", ask).0, 401);
        let (status, page) = http(web_port, "GET", &format!("/{with}"), "", "");
        assert_eq!(status, 200);
        assert!(page.contains("<canvas id=\"view\""), "{page}");
        let (status, feed) = http(web_port, "GET", &format!("/events{with}"), "", "");
        assert_eq!(status, 200);
        assert!(feed.contains("event: hello"), "{feed}");
        // Frames are off by default.
        assert_eq!(
            http(web_port, "GET", &format!("/frame.jpg{with}"), "", "").0,
            404
        );
        // Questions: the same checks and codes as MQTT asks.
        let (status, body) = http(web_port, "POST", "/api/ask", &bearer, ask);
        assert_eq!(status, 200, "{body}");
        let reply: Value = serde_json::from_str(&body).unwrap();
        assert!(
            reply["p_yes"].is_f64() && reply["frame_seq"].is_u64(),
            "{reply}"
        );
        let long = format!(r#"{{"text":"{}"}}"#, "a".repeat(300));
        let (status, body) = http(web_port, "POST", "/api/ask", &bearer, &long);
        assert_eq!(status, 400, "{body}");
        let reply: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(reply["error"]["code"], "text_too_long", "{reply}");
        let (status, body) = http(web_port, "POST", "/api/ask", &bearer, "[1, 2]");
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("bad_json"), "{body}");
        let (status, body) = http(
            web_port,
            "POST",
            "/api/ask",
            &bearer,
            r#"{"text":"hi","colour":1}"#,
        );
        assert_eq!(status, 400, "{body}");
        assert!(
            body.contains("invalid_request") && body.contains("colour"),
            "{body}"
        );
    });
    checks.await.unwrap();
    daemon.signal("-TERM");
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

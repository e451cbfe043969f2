//! A headless Chromium driven over the DevTools protocol (`--remote-debugging-pipe`: JSON
//! messages ended by a NUL byte, commands on the browser's fd 3, replies on its fd 4). The
//! pipes are FIFOs that a shell opens as fds 3 and 4 before it becomes the browser.

use serde_json::{json, Value};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The longest any one command may take.
const REPLY_WAIT: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    commands: File,
    replies: mpsc::Receiver<Value>,
    next_id: u64,
    session: Option<String>,
    _profile: tempfile::TempDir,
}

/// Debian's `chromium`, or a Chromium or Chrome on the PATH under another name.
fn executable() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|e| {
            Command::new(e)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

impl Browser {
    /// A headless browser with a `width` × `height` viewport.
    pub fn launch(width: u32, height: u32) -> Self {
        let exe = executable().expect(
            "chromium is not installed: run scripts/setup.sh --tests (apt-get install chromium)",
        );
        let profile = tempfile::tempdir().unwrap();
        let to_browser = profile.path().join("cdp-in");
        let from_browser = profile.path().join("cdp-out");
        let made = Command::new("mkfifo")
            .arg(&to_browser)
            .arg(&from_browser)
            .status()
            .expect("mkfifo");
        assert!(made.success(), "mkfifo failed");
        let child = Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 3<\"$CDP_IN\" 4>\"$CDP_OUT\"")
            .arg(exe)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--remote-debugging-pipe",
                &format!("--window-size={width},{height}"),
                &format!(
                    "--user-data-dir={}",
                    profile.path().join("profile").display()
                ),
                "about:blank",
            ])
            .env("CDP_IN", &to_browser)
            .env("CDP_OUT", &from_browser)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        // The shell opens fd 3 (reading) first, then fd 4 (writing): open them in that order.
        let commands = OpenOptions::new().write(true).open(&to_browser).unwrap();
        let replies_file = File::open(&from_browser).unwrap();
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(replies_file);
            let mut buf = Vec::new();
            while reader.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
                buf.clear();
            }
        });
        let mut b = Self {
            child,
            commands,
            replies,
            next_id: 1,
            session: None,
            _profile: profile,
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target = target["targetId"].as_str().unwrap().to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        );
        b.session = Some(attached["sessionId"].as_str().unwrap().to_string());
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        b.call("Page.enable", json!({}));
        b
    }

    /// Run a command (in the page once one is attached) and return its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.commands.write_all(&bytes).unwrap();
        loop {
            let m = self
                .replies
                .recv_timeout(REPLY_WAIT)
                .unwrap_or_else(|_| panic!("chromium did not answer {method} within 30 s"));
            if m["id"] == id {
                assert!(m.get("error").is_none(), "{method}: {}", m["error"]);
                return m["result"].clone();
            }
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// The value of a JavaScript expression in the page (promises awaited).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression}: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }

    /// Evaluate `expression` every 200 ms until it is truthy; its value. While the page loads
    /// the elements it names may not exist yet: an exception counts as "not yet".
    pub fn wait_for(&mut self, expression: &str, within: Duration) -> Value {
        let deadline = std::time::Instant::now() + within;
        let guarded = format!(
            "(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        );
        loop {
            let v = self.eval(&guarded);
            let truthy =
                !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0);
            if truthy {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the page never had {expression} within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn screenshot(&mut self) -> image::RgbaImage {
        use base64::Engine;
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        image::load_from_memory(&png).unwrap().to_rgba8()
    }

    /// Type into the focused element, as a keyboard would.
    pub fn type_text(&mut self, text: &str) {
        self.call("Input.insertText", json!({"text": text}));
    }

    pub fn press_enter(&mut self) {
        for kind in ["keyDown", "keyUp"] {
            self.call(
                "Input.dispatchKeyEvent",
                json!({"type": kind, "key": "Enter", "code": "Enter",
                       "windowsVirtualKeyCode": 13, "text": "\r"}),
            );
        }
    }

    /// Save a screenshot as PNG (for docs/web.md).
    pub fn save_screenshot(&mut self, path: &Path) {
        self.screenshot().save(path).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

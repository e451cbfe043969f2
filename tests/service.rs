//! The systemd unit (firmware-config/posegpt-edge.service): `systemd-analyze verify` accepts it,
//! and the binary started as the unit starts it (its arguments and environment, a notify socket
//! and a watchdog as systemd would provide) reports READY=1, feeds the watchdog, and says
//! STOPPING=1 on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn unit_text() -> String {
    std::fs::read_to_string(root().join("firmware-config/posegpt-edge.service")).unwrap()
}

/// Values of `key=` lines in the [Service] section.
fn service_values(unit: &str, key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service {
            if let Some(v) = line.strip_prefix(&prefix) {
                out.push(v.to_string());
            }
        }
    }
    out
}

const INSTALLED_BINARY: &str = "/usr/bin/posegpt-edge";
const INSTALLED_CONFIG: &str = "/etc/posegpt-edge/config.toml";

#[test]
fn systemd_analyze_verifies_the_unit() {
    let unit = unit_text();
    assert_eq!(service_values(&unit, "Type"), ["notify"]);
    assert_eq!(service_values(&unit, "Restart"), ["on-failure"]);
    assert_eq!(service_values(&unit, "ProtectSystem"), ["strict"]);
    assert_eq!(service_values(&unit, "SupplementaryGroups"), ["video"]);
    assert_eq!(service_values(&unit, "WatchdogSec").len(), 1);
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("posegpt-edge.service");
    std::fs::write(
        &path,
        unit.replace(INSTALLED_BINARY, env!("CARGO_BIN_EXE_posegpt-edge")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd, installed by scripts/setup.sh)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {stderr}"
    );
    // Unknown keys and other mistakes are only warnings: none are allowed either.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze verify warns: {stderr}"
    );
}

fn free_port_pair() -> u16 {
    for _ in 0..100 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return p;
        }
    }
    panic!("no free port pair on 127.0.0.1");
}

fn write_config(dir: &Path) -> PathBuf {
    let port = free_port_pair();
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            r#"[device]
id = "unit-test"
[model]
bundle = "{root}/models/test-tiny"
threads = 1
[source]
kind = "dir"
path = "{root}/models/samples"
fps = 20.0
[mqtt]
embedded_port = {port}
[web]
listen = ""
"#,
            root = root().display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn started_as_the_unit_starts_it_the_daemon_reports_ready_and_feeds_the_watchdog() {
    let unit = unit_text();
    let exec = service_values(&unit, "ExecStart");
    assert_eq!(exec.len(), 1);
    let mut words = exec[0].split_whitespace();
    assert_eq!(words.next(), Some(INSTALLED_BINARY));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let args: Vec<String> = words
        .map(|w| {
            if w == INSTALLED_CONFIG {
                config.display().to_string()
            } else {
                w.to_string()
            }
        })
        .collect();
    assert!(
        args.contains(&config.display().to_string()),
        "ExecStart does not read {INSTALLED_CONFIG}: {args:?}"
    );

    // The notify socket systemd would create, and a 1 s watchdog.
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_posegpt-edge"));
    cmd.args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for kv in service_values(&unit, "Environment") {
        let (k, v) = kv.split_once('=').expect("Environment=KEY=VALUE");
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();

    let mut seen: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let mut read_until = |what: &str, secs: u64, seen: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let hit = msg.lines().any(|l| l == what);
                seen.push(msg);
                if hit {
                    return true;
                }
            }
        }
        false
    };
    let ready = read_until("READY=1", 60, &mut seen);
    let fed = ready && read_until("WATCHDOG=1", 10, &mut seen);
    // What `systemctl stop` sends.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let stopping = read_until("STOPPING=1", 30, &mut seen);
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut stderr);
    }
    assert!(ready, "no READY=1; notifications {seen:?}; log:\n{stderr}");
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=loading model bundle")),
        "no loading status before ready: {seen:?}"
    );
    assert!(fed, "no WATCHDOG=1 after READY=1: {seen:?}");
    assert!(stopping, "no STOPPING=1 on SIGTERM: {seen:?}");
    assert!(status.success(), "exit {status:?}; log:\n{stderr}");
}

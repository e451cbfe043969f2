//! The daemon end to end: `posegpt-edge run` on models/test-tiny with a folder source, against
//! a real mosquitto started here on a free loopback port, and against the embedded broker,
//! watched by an independent MQTT 5 client.

#[path = "common/cut_proxy.rs"]
mod cut_proxy;
#[path = "common/daemon_harness.rs"]
mod harness;

use cut_proxy::CutProxy;
use harness::*;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use rumqttc::v5::mqttbytes::QoS;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_with_mosquitto() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let _broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher").await;
    let mut daemon = Daemon::start(
        dir.path(),
        &format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\""),
    );

    w.expect("available", 60, is("online")).await;

    // The pose stream: valid schema, increasing sequence numbers, and from the first frame on
    // the prompt before the image comes from the KV cache (the warm-up put it there).
    let mut last = None;
    for _ in 0..3 {
        let v = json(&w.expect("pose", 30, |_| true).await);
        assert!(
            v["timings"]["reused_positions"].as_u64().unwrap() > 0,
            "{v}"
        );
        assert_eq!(v["persons"].as_array().unwrap().len(), 1);
        assert_eq!(v["persons"][0]["body_pose"].as_array().unwrap().len(), 69);
        assert_eq!(
            v["persons"][0]["global_orient"].as_array().unwrap().len(),
            3
        );
        assert!(v["latency_ms"].as_f64().unwrap() >= 0.0);
        // 24 joint positions from the built-in skeleton, pelvis at the origin.
        let joints = v["persons"][0]["joints"].as_array().unwrap();
        assert_eq!(joints.len(), 24);
        assert!(joints.iter().all(|p| p.as_array().unwrap().len() == 3));
        assert_eq!(joints[0], serde_json::json!([0.0, 0.0, 0.0]));
        let seq = v["seq"].as_u64().unwrap();
        if let Some(prev) = last {
            assert!(seq > prev, "pose seq {seq} after {prev}");
        }
        last = Some(seq);
    }

    // A question gets its answer.
    w.ask(r#"{"id":"a1","text":"What is the person doing?","image":"live"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("a1")).await);
    assert!(a["text"].is_string(), "{a}");
    assert!(a["error"].is_null(), "{a}");

    // Each malformed kind gets its error code, and the daemon carries on.
    w.ask("{not json").await;
    let e = json(
        &w.expect("answer", 20, |m| json(m)["error"]["code"] == "bad_json")
            .await,
    );
    assert!(e["id"].is_null());
    for (payload, id, code, field) in [
        (
            r#"{"id":"m1","text":"hi","colour":1}"#,
            "m1",
            "invalid_request",
            "colour",
        ),
        (r#"{"id":"m2"}"#, "m2", "invalid_request", "text"),
        (r#"{"id":"m3","text":"   "}"#, "m3", "empty_text", "text"),
        (
            &format!(r#"{{"id":"m4","text":"{}"}}"#, "x".repeat(300)),
            "m4",
            "text_too_long",
            "text",
        ),
        (
            r#"{"id":"m5","text":"hi","image":{"inline":"%%%"}}"#,
            "m5",
            "bad_image",
            "image.inline",
        ),
        (
            r#"{"id":"m6","text":"hi","image":{"inline":"aGVsbG8gd29ybGQ="}}"#,
            "m6",
            "bad_image",
            "image.inline",
        ),
    ] {
        w.ask(payload).await;
        let id: &'static str = Box::leak(id.to_string().into_boxed_str());
        let e = json(&w.expect("answer", 20, answer_for(id)).await);
        assert_eq!(e["error"]["code"], code, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{e} should name {field}"
        );
    }

    // An MQTT 5 request is answered on its response topic with its correlation data.
    let props = PublishProperties {
        response_topic: Some("client/replies/7".into()),
        correlation_data: Some(b"corr-7".to_vec().into()),
        ..Default::default()
    };
    w.client
        .publish_with_properties(
            format!("posegpt/{DEVICE}/ask"),
            QoS::AtLeastOnce,
            false,
            r#"{"id":"r7","text":"Describe the person."}"#,
            props,
        )
        .await
        .unwrap();
    let r = w.expect("client/replies/7", 30, |_| true).await;
    assert_eq!(r.correlation.as_deref(), Some(&b"corr-7"[..]));
    assert_eq!(json(&r)["id"], "r7");

    // Stats arrive.
    let s = json(&w.expect("stats", 10, |_| true).await);
    assert!(s["poses_published"].as_u64().unwrap() >= 3, "{s}");
    assert!(s["asks_rejected"].as_u64().unwrap() >= 7, "{s}");
    // Device health: exactly the thermal zones this machine has with a sane reading (read here
    // directly), and no GPU load or power fields where there is no Jetson GPU or INA3221 (none
    // on the test machine); a missing file is never an error.
    let mut zones: Vec<String> = std::fs::read_dir("/sys/class/thermal")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
                .filter(|e| {
                    std::fs::read_to_string(e.path().join("temp"))
                        .ok()
                        .and_then(|t| t.trim().parse::<f64>().ok())
                        .is_some_and(|m| (-40_000.0..=200_000.0).contains(&m))
                })
                .filter_map(|e| std::fs::read_to_string(e.path().join("type")).ok())
                .map(|t| t.trim().to_lowercase())
                .collect()
        })
        .unwrap_or_default();
    zones.sort();
    zones.dedup();
    let mut reported: Vec<String> = s
        .get("temperature_c")
        .map(|t| t.as_object().unwrap().keys().cloned().collect())
        .unwrap_or_default();
    reported.sort();
    assert_eq!(reported, zones, "{s}");
    let gpu_load_files = [
        "/sys/devices/platform/bus@0/17000000.gpu/load",
        "/sys/devices/platform/17000000.gpu/load",
        "/sys/devices/platform/17000000.ga10b/load",
        "/sys/devices/17000000.ga10b/load",
        "/sys/devices/platform/gpu.0/load",
        "/sys/devices/gpu.0/load",
    ];
    let jetson_gpu = gpu_load_files
        .iter()
        .any(|f| std::path::Path::new(f).exists());
    assert_eq!(s.get("gpu_load_percent").is_some(), jetson_gpu, "{s}");
    if !std::path::Path::new("/sys/class/hwmon").exists() {
        assert!(s.get("power_w").is_none(), "{s}");
    }

    // SIGTERM: offline, exit 0.
    daemon.signal("-TERM");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());

    // kill -9: the broker publishes the last will.
    let mut daemon = Daemon::start(
        dir.path(),
        &format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\""),
    );
    w.expect("available", 60, is("online")).await;
    daemon.signal("-KILL");
    w.expect("available", 30, is("offline")).await;
    daemon.wait_exit(Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_with_the_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let mut daemon = Daemon::start(dir.path(), &format!("[mqtt]\nembedded_port = {port}"));
    wait_port(port + 1);
    // MQTT 5 clients use the second port.
    let mut w = Watcher::connect(port + 1, "watcher-embedded").await;
    w.expect("available", 60, is("online")).await;
    let v = json(&w.expect("pose", 30, |_| true).await);
    assert_eq!(v["persons"][0]["body_pose"].as_array().unwrap().len(), 69);
    w.ask(r#"{"id":"e1","text":"What is the person doing?"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("e1")).await);
    assert!(a["text"].is_string(), "{a}");
    daemon.signal("-INT");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_survives_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher-restart").await;
    let mut daemon = Daemon::start(
        dir.path(),
        &format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\""),
    );
    w.expect("available", 60, is("online")).await;
    w.expect("pose", 30, |_| true).await;

    // The broker goes away (no persistence: every session is lost) and comes back once the
    // daemon has noticed and made a pose it could not send.
    drop(broker);
    daemon.wait_log("MQTT connection lost", Duration::from_secs(30));
    daemon.wait_log(
        "poses are dropped until it is back",
        Duration::from_secs(30),
    );
    let _broker = Mosquitto::start(dir.path(), port);

    // The daemon reconnects, announces itself again, resubscribes and resumes the stream.
    w.expect("available", 60, is("online")).await;
    let before = json(&w.expect("pose", 30, |_| true).await)["seq"]
        .as_u64()
        .unwrap();
    let after = json(&w.expect("pose", 30, |_| true).await)["seq"]
        .as_u64()
        .unwrap();
    assert!(after > before);
    // A question sent after the restart is answered.
    w.ask(r#"{"id":"after-restart","text":"Are you back?"}"#)
        .await;
    let a = json(&w.expect("answer", 30, answer_for("after-restart")).await);
    assert!(a["text"].is_string(), "{a}");
    // Poses made while the broker was away were counted, not hidden.
    let s = json(
        &w.expect("stats", 10, |m| {
            json(m)["outbox_dropped"].as_u64().unwrap_or(0) > 0
        })
        .await,
    );
    assert!(s["poses_published"].as_u64().unwrap() > after, "{s}");
    daemon.signal("-TERM");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

/// An answer made after the broker lost the connection, before the daemon noticed, is
/// delivered once the daemon reconnects.
///
/// The outage is a proxy the test controls, so the order of events is certain rather than a
/// race: the daemon is stopped (SIGSTOP) while the proxy hands it a question; the broker's side
/// of the connection is then closed, the daemon's side kept open and its writes dropped. The
/// daemon continues and answers into the dead connection; once its stats count the answer, the
/// daemon's side is closed too and, after the daemon has seen the loss, reconnection is allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answer_made_during_an_outage_is_delivered_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let _broker = Mosquitto::start(dir.path(), port);
    let proxy = CutProxy::start(port);
    let mut w = Watcher::connect(port, "watcher-outage").await;
    let mut daemon = Daemon::start(
        dir.path(),
        &format!("[mqtt]\nurl = \"mqtt://127.0.0.1:{}\"", proxy.port),
    );
    w.expect("available", 60, is("online")).await;
    w.expect("pose", 30, |_| true).await;

    daemon.signal("-STOP");
    w.ask(r#"{"id":"in-outage","text":"Still there?"}"#).await;
    proxy.wait_sent_to_client(b"in-outage", Duration::from_secs(30));
    proxy.sever_broker();
    daemon.signal("-CONT");
    // The stats line (logged every second, connected or not) counts the answer.
    daemon.wait_log("asks 1 answered", Duration::from_secs(30));
    proxy.cut();
    daemon.wait_log("MQTT connection lost", Duration::from_secs(30));
    proxy.heal();

    let a = json(&w.expect("answer", 60, answer_for("in-outage")).await);
    assert!(a["text"].is_string(), "{a}");
    assert!(a["error"].is_null(), "{a}");
    daemon.signal("-TERM");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

/// Write a CA, a broker certificate for 127.0.0.1/localhost and a client certificate with
/// the openssl command line tool (installed by scripts/setup.sh).
fn make_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl is not installed: run scripts/setup.sh");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=posegpt test CA"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca);
    for (name, cn, ext) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        ),
        ("client", "posegpt-device", "extendedKeyUsage=clientAuth\n"),
    ] {
        let (key, csr, pem, extfile) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        std::fs::write(dir.join(&extfile), ext).unwrap();
        let subj = format!("/CN={cn}");
        let mut req = vec!["req", "-subj", &subj, "-keyout", &key, "-out", &csr];
        req.extend(ec);
        openssl(&req);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &pem,
            "-extfile",
            &extfile,
        ]);
    }
}

/// `mqtts://` against a mosquitto TLS listener that also requires a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_over_tls_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let port = free_port_pair();
    let tls_port = port + 1;
    let d = dir.path().display();
    let _broker = Mosquitto::start_with(
        dir.path(),
        port,
        &format!(
            "persistence false\nlistener {tls_port} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n\
             keyfile {d}/server.key\nrequire_certificate true\n\
             # Started as root, mosquitto would drop to a user that cannot read the test's\n\
             # private files; as any other user this line does nothing.\nuser root\n"
        ),
        &[port, tls_port],
    );
    // The watcher uses the plain listener; the daemon only the TLS one.
    let mut w = Watcher::connect(port, "watcher-tls").await;
    let mut daemon = Daemon::start(
        dir.path(),
        &format!(
            "[mqtt]\nurl = \"mqtts://localhost:{tls_port}\"\nca_file = \"ca.pem\"\n\
             client_cert = \"client.pem\"\nclient_key = \"client.key\""
        ),
    );
    w.expect("available", 60, is("online")).await;
    let v = json(&w.expect("pose", 30, |_| true).await);
    assert_eq!(v["persons"][0]["body_pose"].as_array().unwrap().len(), 69);
    w.ask(r#"{"id":"t1","text":"Secure?"}"#).await;
    let a = json(&w.expect("answer", 30, answer_for("t1")).await);
    assert!(a["text"].is_string(), "{a}");
    daemon.signal("-TERM");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());

    // Without the client certificate the broker refuses the handshake: the daemon keeps
    // retrying and never comes online, and still stops cleanly.
    let mut daemon = Daemon::start(
        dir.path(),
        &format!("[mqtt]\nurl = \"mqtts://localhost:{tls_port}\"\nca_file = \"ca.pem\""),
    );
    daemon.wait_log("cannot connect to the MQTT broker", Duration::from_secs(60));
    assert!(
        daemon.child.try_wait().unwrap().is_none(),
        "the daemon exited"
    );
    daemon.signal("-TERM");
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    while let Ok(m) = w.rx.try_recv() {
        assert!(
            !(m.topic.ends_with("/available") && m.payload == b"online"),
            "came online without a client certificate"
        );
    }

    // A CA file that is not PEM stops the start with an error naming the key.
    std::fs::write(dir.path().join("bad-ca.pem"), "not a certificate").unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nbundle = \"{}\"\n[source]\nkind = \"dir\"\npath = \"{}\"\n\
             [mqtt]\nurl = \"mqtts://localhost:{tls_port}\"\nca_file = \"bad-ca.pem\"\n",
            root().join("models/test-tiny").display(),
            root().join("models/samples").display(),
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_posegpt-edge"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("mqtt.ca_file") && err.contains("bad-ca.pem"),
        "{err}"
    );
}

/// SIGTERM while the model works on a request: nothing new is taken, the request in hand is
/// aborted at `device.shutdown_timeout_s` (llama.cpp's abort callback) and answered
/// `shutting_down`, `offline` is published, and the process exits within the timeout + 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_long_request_stops_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let _broker = Mosquitto::start(dir.path(), port);
    let mut w = Watcher::connect(port, "watcher-sigterm").await;
    let timeout = 1.0;
    // A question of ~30 000 tokens: its prefill takes seconds, whatever the model answers.
    let mut daemon = Daemon::start_with(
        dir.path(),
        &format!(
            "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n\
             [device]\nshutdown_timeout_s = {timeout}\n\
             [model]\nmax_tokens = 1\nn_ctx = 32768\n\
             [requests]\nmax_text_bytes = 65536\n"
        ),
    );
    w.expect("available", 60, is("online")).await;
    w.expect("pose", 30, |_| true).await;
    let long: String = (0..9000).map(|i| format!("w{} ", i % 97)).collect();
    w.ask(&format!(r#"{{"id":"long","text":"{long}"}}"#)).await;
    w.ask(r#"{"id":"queued","text":"And this one?"}"#).await;
    // The question is in the model once the pose stream pauses (questions come first).
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_millis(400) {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), w.rx.recv()).await {
            if m.topic.ends_with("/pose") {
                quiet_since = Instant::now();
            }
        }
    }
    let signalled = Instant::now();
    daemon.signal("-TERM");
    // Both answered `shutting_down`, in whatever order.
    let mut codes = std::collections::BTreeMap::new();
    while codes.len() < 2 {
        let a = json(&w.expect("answer", 10, |_| true).await);
        codes.insert(
            a["id"].as_str().unwrap().to_string(),
            a["error"]["code"].clone(),
        );
    }
    for id in ["long", "queued"] {
        assert_eq!(codes[id], "shutting_down", "{id}: {codes:?}");
    }
    w.expect("available", 10, is("offline")).await;
    let status = daemon.wait_exit(Duration::from_secs(10));
    let took = signalled.elapsed();
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs_f64(timeout + 2.0),
        "exited {took:?} after SIGTERM"
    );
}

//! Home Assistant's MQTT discovery against a real mosquitto: the discovery message, what every
//! component's topics carry read as Home Assistant reads them, a question from the text entity,
//! discovery again on Home Assistant's `online`, and a dropped watch rule removed.
//!
//! Home Assistant itself is not run here. The daemon keeps every state template to one of two
//! forms (src/mqtt/homeassistant.rs), and [`render`] evaluates exactly those, failing on any
//! other: a template Home Assistant might read differently cannot slip through.

#[path = "common/daemon_harness.rs"]
mod harness;

use harness::*;
use rumqttc::v5::mqttbytes::QoS;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

const DISCOVERY: &str = "homeassistant/device/posegpt_edge_test-dev/config";

/// A state template applied to a payload, as Home Assistant's Jinja would render it.
fn render(template: &str, payload: &[u8]) -> String {
    let json: Value = serde_json::from_slice(payload).expect("a JSON state payload");
    let inner = template
        .strip_prefix("{{ ")
        .and_then(|t| t.strip_suffix(" }}"))
        .unwrap_or_else(|| panic!("not a template of the known forms: {template}"));
    let get = |path: &str| {
        let key = path
            .strip_prefix("value_json.")
            .unwrap_or_else(|| panic!("not value_json.KEY: {template}"));
        assert!(
            !key.contains(['.', '[', '|']),
            "nested or filtered: {template}"
        );
        json.get(key).cloned().unwrap_or(Value::Null)
    };
    if let Some(cond) = inner
        .strip_prefix("'ON' if ")
        .and_then(|c| c.strip_suffix(" else 'OFF'"))
    {
        let v = get(cond);
        assert!(v.is_boolean(), "{template} on {json}: not a boolean");
        return if v == true { "ON" } else { "OFF" }.into();
    }
    match get(inner) {
        Value::String(s) => s,
        Value::Number(n) => n.to_string(),
        other => panic!("{template} on {json}: renders {other}, not a state"),
    }
}

/// Every message that arrives within `secs`, by topic (oldest first).
async fn collect(w: &mut Watcher, secs: u64) -> HashMap<String, Vec<Vec<u8>>> {
    let mut by_topic: HashMap<String, Vec<Vec<u8>>> = HashMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, w.rx.recv()).await {
        by_topic.entry(m.topic).or_default().push(m.payload);
    }
    by_topic
}

fn config(port: u16, watches: &str) -> String {
    format!(
        "[mqtt]\nurl = \"mqtt://127.0.0.1:{port}\"\n[homeassistant]\ndevice_name = \"Hall camera\"\n{watches}"
    )
}

const FLOOR: &str = "[[watch]]\nid = \"floor\"\nquestion = \"Is a person lying on the floor?\"\nkind = \"yes_no\"\nevery_s = 0.3\ndevice_class = \"safety\"\n";
const DOING: &str = "[[watch]]\nid = \"doing\"\nquestion = \"What is the person doing?\"\nkind = \"text\"\nevery_s = 0.5\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_components_questions_and_removal() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port_pair();
    let _broker = Mosquitto::start(dir.path(), port);
    let all = ["homeassistant/#".to_string(), format!("posegpt/{DEVICE}/#")];
    let mut w = Watcher::connect_to(port, "watcher-ha", &all).await;
    let mut daemon = Daemon::start(dir.path(), &config(port, &format!("{FLOOR}{DOING}")));
    w.expect("available", 60, is("online")).await;

    let d = json(&w.expect(DISCOVERY, 30, |_| true).await);
    assert_eq!(d["dev"]["name"], "Hall camera", "{d}");
    assert_eq!(d["dev"]["ids"][0], "posegpt_edge_test-dev", "{d}");
    assert_eq!(d["dev"]["mdl"], "test-tiny", "{d}");
    assert!(
        d["o"]["name"].is_string() && d["o"]["sw"].is_string(),
        "{d}"
    );
    let avty = &d["availability"][0];
    assert_eq!(avty["topic"], format!("posegpt/{DEVICE}/available"), "{d}");
    assert_eq!(
        (&avty["payload_available"], &avty["payload_not_available"]),
        (&Value::from("online"), &Value::from("offline"))
    );
    let cmps = d["cmps"].as_object().unwrap().clone();
    let find = |p: &str, name: &str| {
        cmps.values()
            .find(|c| c["p"] == p && c["name"] == name)
            .unwrap_or_else(|| panic!("no {p} named {name} in {d}"))
            .clone()
    };
    let floor = find("binary_sensor", "floor");
    assert_eq!(floor["device_class"], "safety");
    find("sensor", "doing");
    let ask = find("text", "Ask");
    let answer = find("sensor", "Last answer");
    for name in ["Pose confidence", "Poses per second", "Answer latency"] {
        find("sensor", name);
    }
    for name in ["Uptime", "Frames dropped"] {
        assert_eq!(find("sensor", name)["entity_category"], "diagnostic");
    }
    assert_eq!(
        find("binary_sensor", "Camera")["entity_category"],
        "diagnostic"
    );
    for (id, c) in &cmps {
        assert_eq!(&c["unique_id"], id, "{c}");
    }

    // A question from the text entity, answered on the last-answer sensor's topic.
    let command = ask["command_topic"].as_str().unwrap().to_string();
    w.client
        .publish(command, QoS::AtMostOnce, false, "What is the person doing?")
        .await
        .unwrap();
    let answer_topic = answer["state_topic"].as_str().unwrap().to_string();
    let a = json(
        &w.expect(
            &answer_topic.replace(&format!("posegpt/{DEVICE}/"), ""),
            30,
            |_| true,
        )
        .await,
    );
    assert!(
        a["text"].is_string() && a["id"].as_str().unwrap().starts_with("ha-"),
        "{a}"
    );
    assert!(a["frame_seq"].is_u64(), "about the live frame: {a}");

    // Every component's state topic, read as Home Assistant reads it: by a client that
    // subscribes now, as Home Assistant may, getting the retained states (watch rules publish
    // theirs when they change, perhaps while this test waited for the answer) and then the
    // stream's next messages.
    let mut late = Watcher::connect_to(port, "watcher-ha-late", &all).await;
    let seen = collect(&mut late, 6).await;
    let latest = |topic: &str| -> Vec<u8> {
        if topic == answer_topic {
            return serde_json::to_vec(&a).unwrap();
        }
        seen.get(topic)
            .and_then(|m| m.last().cloned())
            .unwrap_or_else(|| panic!("nothing on {topic} within 6 s"))
    };
    let mut checked = 0;
    for c in cmps.values() {
        let (Some(topic), Some(template)) =
            (c["state_topic"].as_str(), c["value_template"].as_str())
        else {
            continue;
        };
        let payload = latest(topic);
        let state = render(template, &payload);
        match c["p"].as_str().unwrap() {
            "binary_sensor" => assert!(state == "ON" || state == "OFF", "{c}: {state}"),
            _ if c.get("unit_of_measurement").is_some() || c.get("state_class").is_some() => {
                state
                    .parse::<f64>()
                    .unwrap_or_else(|_| panic!("{c}: {state:?} is not numeric"));
            }
            _ => assert!(state.chars().count() <= 255, "{c}: {} chars", state.len()),
        }
        if let Some(attrs) = c["json_attributes_topic"].as_str() {
            let v: Value = serde_json::from_slice(&latest(attrs)).unwrap();
            assert!(v.is_object(), "{c}: attributes {v}");
        }
        checked += 1;
    }
    assert!(checked >= 9, "{checked} components checked");

    // Home Assistant starts: discovery is published again.
    w.client
        .publish("homeassistant/status", QoS::AtLeastOnce, false, "online")
        .await
        .unwrap();
    let again = json(&w.expect(DISCOVERY, 30, |_| true).await);
    assert_eq!(again["cmps"], d["cmps"]);

    // A watch dropped from the config disappears: its component is sent with its platform
    // alone, then the discovery without it.
    daemon.signal("-TERM");
    w.expect("available", 30, is("offline")).await;
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
    let mut daemon = Daemon::start(dir.path(), &config(port, FLOOR));
    let doing = cmps
        .iter()
        .find(|(_, c)| c["name"] == "doing")
        .map(|(id, _)| id.clone())
        .unwrap();
    let removal = json(
        &w.expect(DISCOVERY, 60, |m| {
            json(m)["cmps"][&doing] == serde_json::json!({"p": "sensor"})
        })
        .await,
    );
    assert!(removal["cmps"].as_object().unwrap().len() > 1, "{removal}");
    let clean = json(
        &w.expect(DISCOVERY, 30, |m| json(m)["cmps"].get(&doing).is_none())
            .await,
    );
    assert!(clean["cmps"].get(&doing).is_none());
    daemon.signal("-TERM");
    assert!(daemon.wait_exit(Duration::from_secs(60)).success());
}

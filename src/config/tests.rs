//! The config's defaults, the shipped files and the validation of every key.
use super::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_packaged_config_points_at_what_the_package_installs() {
    let path = root().join("firmware-config/package.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Installed as /etc/posegpt-edge/config.toml: relative paths would mean /etc/..., so
    // the file must name absolute ones.
    let config = Config::parse(&text, Path::new("/etc/posegpt-edge/config.toml")).unwrap();
    assert!(config.model.bundle.is_absolute() && config.source.path.is_absolute());
    // Where Cargo.toml's [package.metadata.deb] assets put the bundle and the samples.
    let cargo: toml::Value =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let assets = cargo["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap();
    let dest_of = |src: &str| {
        assets
            .iter()
            .find(|a| a[0].as_str() == Some(src))
            .map(|a| format!("/{}", a[1].as_str().unwrap().trim_end_matches('/')))
            .unwrap_or_else(|| panic!("{src} is not packaged"))
    };
    assert_eq!(
        config.model.bundle,
        PathBuf::from(dest_of("models/test-tiny/*"))
    );
    assert_eq!(
        config.source.path,
        PathBuf::from(dest_of("models/samples/*"))
    );
    assert_eq!(
        dest_of("firmware-config/package.toml"),
        "/etc/posegpt-edge/config.toml"
    );
    // And the unit reads that file.
    let unit =
        std::fs::read_to_string(root().join("firmware-config/posegpt-edge.service")).unwrap();
    assert!(unit.contains("--config /etc/posegpt-edge/config.toml"));
}

#[test]
fn engine_threads_leave_one_core_unless_set() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let auto = ModelConfig::default();
    assert_eq!(auto.threads, 0);
    assert_eq!(auto.engine_threads(), (cores - 1).max(1));
    let set = ModelConfig {
        threads: 7,
        ..ModelConfig::default()
    };
    assert_eq!(set.engine_threads(), 7);
}

#[test]
fn shipped_default_file_documents_exactly_the_code_defaults() {
    let path = root().join("firmware-config/default.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let parsed = Config::parse(&text, &path).unwrap();
    assert_eq!(parsed, Config::default());
    // Every key is written out in the file (not left to a default).
    for key in [
        "height_m =",
        "betas =",
        "id =",
        "shutdown_timeout_s =",
        "bundle =",
        "threads =",
        "n_ctx =",
        "n_gpu_layers =",
        "vision_runtime =",
        "exact =",
        "max_tokens =",
        "temperature =",
        "top_k =",
        "top_p =",
        "seed =",
        "max_history_turns =",
        "max_conversations =",
        "kind =",
        "camera =",
        "width =",
        "height =",
        "path =",
        "fps =",
        "loop =",
        "max_rate_hz =",
        "qos =",
        "queue =",
        "max_text_bytes =",
        "max_image_bytes =",
        "max_side =",
        "max_pixels =",
        "max_aspect =",
        "url =",
        "embedded_port =",
        "topic_prefix =",
        "client_id =",
        "username =",
        "password_env =",
        "keep_alive_s =",
        "outbox =",
        "stats_interval_s =",
        "listen =",
        "token =",
        "show_frames =",
    ] {
        assert!(text.contains(key), "default.toml does not document {key}");
    }
}

#[test]
fn shipped_jetson_example_is_valid() {
    Config::load(&root().join("firmware-config/jetson-orin.toml")).unwrap();
}

#[test]
fn relative_paths_resolve_from_the_project_root_for_firmware_config() {
    let c = Config::load(&root().join("firmware-config/default.toml")).unwrap();
    assert!(
        c.model.bundle.join("posegpt.toml").is_file(),
        "{:?}",
        c.model.bundle
    );
    assert!(c.source.path.is_dir(), "{:?}", c.source.path);
}

fn err(text: &str) -> String {
    Config::parse(text, Path::new("test.toml"))
        .expect_err("must be refused")
        .to_string()
}

#[test]
fn errors_name_the_key() {
    let e = err("[model]\nbundel = \"x\"\n");
    assert!(e.contains("bundel") && e.contains("test.toml"), "{e}");
    let e = err("[source]\nfps = \"fast\"\n");
    assert!(e.contains("fps"), "{e}");
    let e = err("[source]\nkind = \"webcam\"\n");
    assert!(e.contains("webcam"), "{e}");
    let e = err("[pose]\nsmoothing_beta = -1\n");
    assert!(e.contains("pose.smoothing_beta"), "{e}");
    let e = err("[pose]\nqos = 2\n");
    assert!(e.contains("pose.qos"), "{e}");
    let e = err("[device]\nid = \"a/b\"\n");
    assert!(e.contains("device.id"), "{e}");
    let e = err("[requests]\nqueue = 0\n");
    assert!(e.contains("requests.queue"), "{e}");
    let e = err("[device]\nshutdown_timeout_s = 0\n");
    assert!(e.contains("device.shutdown_timeout_s"), "{e}");
    let e = err("[requests]\nqueue = 8\n[mqtt]\noutbox = 100\n");
    assert!(
        e.contains("mqtt.outbox") && e.contains("requests.queue"),
        "{e}"
    );
    let e = err("[image_limits]\nmax_aspect = 0.5\n");
    assert!(e.contains("image_limits.max_aspect"), "{e}");
    let e = err("[image_limits]\nmax_side = 0\n");
    assert!(e.contains("image_limits.max_side"), "{e}");
    let e = err("[model]\ntop_p = 1.5\n");
    assert!(e.contains("model.top_p"), "{e}");
    let e = err("[model]\nvision_runtime = \" \"\n");
    assert!(
        e.contains("model.vision_runtime") && e.contains("cuda"),
        "{e}"
    );
    let e = err("[homeassistant]\nprefix = \"#\"\n");
    assert!(e.contains("homeassistant.prefix"), "{e}");
    let e = err("[sauce]\n");
    assert!(e.contains("sauce"), "{e}");
    let e = err("[mqtt]\nurl = \"http://x\"\n");
    assert!(e.contains("mqtt.url"), "{e}");
    let e = err("[mqtt]\nurl = \"mqtt://host:port\"\n");
    assert!(e.contains("mqtt.url") && e.contains("port"), "{e}");
}

#[test]
fn broker_urls() {
    let m = |url: &str| MqttConfig {
        url: url.into(),
        ..MqttConfig::default()
    };
    assert_eq!(m("").broker().unwrap(), None);
    assert_eq!(
        m("mqtt://10.1.2.3:1999").broker().unwrap(),
        Some(BrokerAddress {
            host: "10.1.2.3".into(),
            port: 1999,
            tls: false,
        })
    );
    assert_eq!(
        m("mqtt://broker.local").broker().unwrap().unwrap().port,
        1883
    );
    let tls = m("mqtts://broker.example").broker().unwrap().unwrap();
    assert!(tls.tls && tls.port == 8883 && tls.host == "broker.example");
    assert!(m("ws://x:80").broker().is_err());
}

#[test]
fn smpl_section_is_checked() {
    let e = err("[smpl]\nheight_m = 170\n");
    assert!(e.contains("smpl.height_m") && e.contains("metres"), "{e}");
    let e = err("[smpl]\nmodel = \"m.npz\"\nbetas = [0,0,0,0,0,0,0,0,0,0,0]\n");
    assert!(e.contains("smpl.betas") && e.contains("10"), "{e}");
    let e = err("[smpl]\nbetas = [1.0]\n");
    assert!(e.contains("smpl.betas") && e.contains("smpl.model"), "{e}");
    let ok = Config::parse(
        "[smpl]\nmodel = \"m.npz\"\nbetas = [0.5, -1]\n",
        Path::new("t.toml"),
    )
    .unwrap();
    assert_eq!(ok.smpl.betas, vec![0.5, -1.0]);
}

#[test]
fn tls_files_need_a_tls_url_and_come_in_pairs() {
    let e = err("[mqtt]\nurl = \"mqtt://h\"\nca_file = \"ca.pem\"\n");
    assert!(e.contains("mqtt.ca_file") && e.contains("mqtts://"), "{e}");
    let e = err("[mqtt]\nurl = \"mqtts://h\"\nclient_cert = \"c.pem\"\n");
    assert!(e.contains("mqtt.client_key"), "{e}");
    let e = err("[mqtt]\nurl = \"mqtts://h\"\nclient_key = \"k.pem\"\n");
    assert!(e.contains("mqtt.client_cert"), "{e}");
    let ok = "[mqtt]\nurl = \"mqtts://h\"\nca_file = \"ca.pem\"\nclient_cert = \"c.pem\"\nclient_key = \"k.pem\"\n";
    assert!(Config::parse(ok, Path::new("t.toml")).is_ok());
}

#[test]
fn an_empty_file_is_all_defaults() {
    assert_eq!(
        Config::parse("", Path::new("x.toml")).unwrap(),
        Config::default()
    );
}

#[test]
fn watch_rules_are_checked() {
    let rule = |extra: &str| {
        format!("[[watch]]\nid = \"w\"\nquestion = \"Is someone there?\"\nkind = \"yes_no\"\nevery_s = 1\n{extra}")
    };
    let e = err(&rule("threshold = 1.5\n"));
    assert!(e.contains("watch[0].threshold"), "{e}");
    let e = err(&rule("hold_s = -1\n"));
    assert!(e.contains("watch[0].hold_s"), "{e}");
    let e = err(&rule("device_class = \"Safety!\"\n"));
    assert!(e.contains("watch[0].device_class"), "{e}");
    let e = err(&rule("colour = 1\n"));
    assert!(e.contains("colour"), "{e}");
    let e = err(&rule("").replace("every_s = 1", "every_s = 0"));
    assert!(e.contains("watch[0].every_s"), "{e}");
    let e = err(&rule("").replace("id = \"w\"", "id = \"a/b\""));
    assert!(e.contains("watch[0].id"), "{e}");
    let e = err(&rule("").replace("Is someone there?", " "));
    assert!(e.contains("watch[0].question"), "{e}");
    let e = err(&format!("{}{}", rule(""), rule("")));
    assert!(e.contains("watch[1].id") && e.contains("earlier"), "{e}");
    let e = err(&rule("").replace("yes_no", "maybe"));
    assert!(e.contains("maybe"), "{e}");
    let text = rule("").replace("yes_no", "text");
    let e = err(&format!("{text}threshold = 0.5\n"));
    assert!(
        e.contains("watch[0].threshold") && e.contains("yes_no"),
        "{e}"
    );
    let ok = Config::parse(&rule("threshold = 0.7\nhold_s = 3\n"), Path::new("t.toml")).unwrap();
    assert_eq!(ok.watch[0].threshold(), 0.7);
    assert_eq!(ok.watch[0].hold_s(), 3.0);
    assert_eq!(
        Config::parse(&text, Path::new("t.toml")).unwrap().watch[0].hold_s(),
        0.0
    );
}

#[test]
fn the_watch_examples_in_default_toml_are_valid() {
    let text = std::fs::read_to_string(root().join("firmware-config/default.toml")).unwrap();
    // The examples are commented out: uncomment every line from the first [[watch]] on.
    let start = text
        .find("# [[watch]]")
        .expect("default.toml has a [[watch]] example");
    let examples: String = text[start..]
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter(|l| !l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    let c = Config::parse(&examples, Path::new("default.toml")).unwrap();
    assert_eq!(c.watch.len(), 2);
    assert_eq!(c.watch[0].kind, WatchKind::YesNo);
    assert_eq!(c.watch[0].hold_s(), 10.0);
    assert_eq!(c.watch[1].kind, WatchKind::Text);
}

#[test]
fn the_page_needs_a_token_off_loopback() {
    let c = Config::parse("", Path::new("t.toml")).unwrap();
    assert_eq!(c.web.address(), Some("127.0.0.1:8080".parse().unwrap()));
    assert!(!c.web.show_frames);
    let e = err("[web]\nlisten = \"0.0.0.0:8080\"\n");
    assert!(e.contains("web.token") && e.contains("0.0.0.0:8080"), "{e}");
    let e = err("[web]\nlisten = \"0.0.0.0:8080\"\ntoken = \"short\"\n");
    assert!(e.contains("web.token") && e.contains("16"), "{e}");
    let e = err("[web]\nlisten = \"localhost:8080\"\n");
    assert!(
        e.contains("web.listen") && e.contains("localhost:8080"),
        "{e}"
    );
    let ok = "[web]\nlisten = \"0.0.0.0:8080\"\ntoken = \"0123456789abcdef\"\n";
    let c = Config::parse(ok, Path::new("t.toml")).unwrap();
    assert_eq!(c.web.address().map(|a| a.port()), Some(8080));
    let off = Config::parse("[web]\nlisten = \"\"\n", Path::new("t.toml")).unwrap();
    assert_eq!(off.web.address(), None);
}

//! Design §5's table of defaults, as each service reads them with no file, no variable
//! and no flag, and `STORAGETIER__STORAGE__DATA_DIR` alone moving every embedded default.

use std::collections::HashMap;

use framework::Service;
use framework::config::LoadOptions;
use serde_json::{Value, json};

/// What `check-config` shows of service `S`: its config and, under `resolved`, where the
/// unset keys lead. `env` stands for the process environment.
fn shown<S: Service>(env: &[(&str, &str)]) -> Value {
    let mut opts = isolated_with(env);
    // event-forwarder has no default endpoint (§5: none): one is named to load at all.
    opts.overrides = vec![(
        "event_forwarder.endpoint".into(),
        "http://127.0.0.1:1/events".into(),
    )];
    let cfg = framework::cli::load_config::<S>(&opts).expect("the defaults load");
    let mut v = serde_json::to_value(&cfg).expect("config as JSON");
    v["resolved"] = S::resolved(&cfg).unwrap_or(Value::Null);
    v
}

/// Every service: the bus, retry, log and storage defaults, its queue, output exchange and
/// port.
fn assert_common(v: &Value, name: &str, port: u16) {
    let a = &v["amqp"];
    assert_eq!(a["url"], "amqp://guest:***@127.0.0.1:5672/%2f", "{name}");
    assert_eq!(a["urls"], json!([]), "{name}");
    assert_eq!(a["declare_sources"], true, "{name}");
    assert_eq!(a["queue_type"], "quorum", "{name}");
    assert_eq!(a["prefetch"], 16, "{name}");
    assert_eq!(a["delivery_limit"], 20, "{name}");
    assert_eq!(a["drain_timeout_ms"], 30000, "{name}");
    assert_eq!(v["retry"]["delays_ms"], json!([1000, 5000, 30000, 120000]));
    assert_eq!(v["retry"]["max_attempts"], 50, "{name}");
    assert_eq!(v["log"]["level"], "info", "{name}");
    assert_eq!(v["log"]["format"], "text", "{name}");
    assert_eq!(v["storage"]["data_dir"], "./data", "{name}");
    // §6: span export is off unless a collector is named.
    assert_eq!(v["telemetry"]["otlp_endpoint"], "", "{name}");
    let s = &v["service"];
    assert_eq!(s["queue"], format!("storagetier-{name}"));
    assert_eq!(s["output_exchange"], format!("storagetier-{name}"));
    assert_eq!(s["http_listen"], format!("127.0.0.1:{port}"));
}

#[test]
fn every_service_reads_the_documented_defaults() {
    let cases: [(&str, u16, Value); 6] = [
        (
            "online-archive",
            9101,
            shown::<online_archive::OnlineArchive>(&[]),
        ),
        (
            "online-nearline",
            9102,
            shown::<online_nearline::OnlineNearline>(&[]),
        ),
        (
            "project-ingest",
            9103,
            shown::<project_ingest::ProjectIngest>(&[]),
        ),
        (
            "crash-router",
            9104,
            shown::<crash_router::CrashRouterService>(&[]),
        ),
        (
            "snapshot-status",
            9105,
            shown::<snapshot_status::SnapshotStatus>(&[]),
        ),
        (
            "event-forwarder",
            9106,
            shown::<event_forwarder::EventForwarderService>(&[]),
        ),
    ];
    for (name, port, v) in &cases {
        assert_common(v, name, *port);
    }
    let [archive, nearline, _, crash, snapshot, forwarder] = &cases;
    assert_eq!(
        archive.2["resolved"],
        json!({"online_roots": ["./data/online"], "store": "./data/archive",
               "database_url": db::default_url(std::path::Path::new("./data"), "online-archive")})
    );
    assert_eq!(nearline.2["resolved"]["store"], "./data/nearline");
    let c = &crash.2["settings"];
    assert_eq!(
        (&c["queues"], &c["accept_digit"], &c["seed"]),
        (&json!("socorro.normal"), &json!("0"), &Value::Null)
    );
    let s = &snapshot.2["settings"];
    assert_eq!(s["export_state_exchange"], "snapshot-export-state");
    assert_eq!(s["monitoring_exchange"], "monitoring");
    let f = &forwarder.2["settings"];
    assert_eq!(
        (
            &f["token"],
            &f["token_file"],
            &f["timeout_ms"],
            &f["ordered"]
        ),
        (&Value::Null, &Value::Null, &json!(10000), &json!(false))
    );
}

#[test]
fn the_data_directory_alone_moves_every_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    let moved = dir.path().join("x");
    std::fs::create_dir(&moved).unwrap();
    let moved = moved.display().to_string();
    let env = [("STORAGETIER__STORAGE__DATA_DIR", moved.as_str())];
    let under = |v: &Value| {
        let text = v.to_string();
        assert!(!text.contains("./data"), "{text}");
    };
    // What each resolves from the data directory, every one named (an empty `resolved`
    // would check nothing).
    for (v, keys) in [
        (
            shown::<online_archive::OnlineArchive>(&env),
            &["online_roots", "store", "database_url"][..],
        ),
        (
            shown::<online_nearline::OnlineNearline>(&env),
            &["online_roots", "store", "database_url"][..],
        ),
        (
            shown::<project_ingest::ProjectIngest>(&env),
            &["database_url"][..],
        ),
        (
            shown::<snapshot_status::SnapshotStatus>(&env),
            &["database_url"][..],
        ),
    ] {
        let resolved = v["resolved"].as_object().expect("resolved paths");
        under(&v["resolved"]);
        let mut named: Vec<&str> = resolved.keys().map(String::as_str).collect();
        named.sort_unstable();
        let mut want = keys.to_vec();
        want.sort_unstable();
        assert_eq!(named, want, "{v}");
        for (_, path) in resolved {
            let text = path.to_string();
            assert!(text.contains(&moved), "{text}");
        }
    }
}

/// A configured data directory that does not exist (a volume not mounted) is refused,
/// naming `storage.data_dir`, by every service that would make a database or a store
/// there — not made on the root disk, a new empty database, copies hidden by the mount
/// later. Only the built-in `./data` is made; with every default configured elsewhere,
/// nothing is made there and nothing is refused.
#[test]
fn a_configured_data_directory_that_is_missing_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("unmounted/volume").display().to_string();
    let env = [("STORAGETIER__STORAGE__DATA_DIR", missing.as_str())];
    let errors = [
        refused::<online_archive::OnlineArchive>(&env),
        refused::<online_nearline::OnlineNearline>(&env),
        refused::<project_ingest::ProjectIngest>(&env),
        refused::<snapshot_status::SnapshotStatus>(&env),
    ];
    for e in errors {
        let e = e.expect("refused");
        assert_eq!(e.key, "storage.data_dir", "{e}");
        assert!(e.to_string().contains("unmounted/volume"), "{e}");
    }
    assert!(!dir.path().join("unmounted").exists(), "nothing made");
    // Nothing defaults under it: accepted.
    let pg = "postgres://storagetier@127.0.0.1:5432/test";
    let elsewhere = [
        ("STORAGETIER__STORAGE__DATA_DIR", missing.as_str()),
        ("STORAGETIER__PROJECT_INGEST__DATABASE_URL", pg),
    ];
    assert!(refused::<project_ingest::ProjectIngest>(&elsewhere).is_none());
}

/// The error `S` refuses its configuration with under `env`, if it does.
fn refused<S: Service>(env: &[(&str, &str)]) -> Option<framework::ConfigError> {
    framework::cli::load_config::<S>(&isolated_with(env)).err()
}

/// Built-in defaults only, with `env` standing for the process environment.
fn isolated_with(env: &[(&str, &str)]) -> LoadOptions {
    let mut opts = LoadOptions::isolated();
    opts.env_vars = Some(
        env.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    );
    opts
}

/// Design §7's subscriptions, as each service binds with no config: the producer's
/// exchange, the binding keys (a typo consumes nothing in production; a key widened to
/// `#` takes other producers' messages) and the output key of its success messages.
#[test]
fn every_service_binds_to_its_producers_exchange_and_keys() {
    /// (exchange, binding keys, output key)
    type Bound = (String, Vec<String>, String);
    fn bound<S: Service>() -> Bound {
        let mut opts = LoadOptions::isolated();
        opts.env_vars = Some(HashMap::new());
        opts.overrides = vec![(
            "event_forwarder.endpoint".into(),
            "http://127.0.0.1:1/events".into(),
        )];
        let cfg = framework::cli::load_config::<S>(&opts).expect("the defaults load");
        let b = framework::cli::binding_of::<S>(&cfg);
        (b.exchange, b.routing_keys, b.output_routing_key)
    }
    let sweeper = |out: &str| {
        (
            "assetsweeper".to_string(),
            vec!["assetsweeper.asset_folder_importer.file.#".to_string()],
            out.to_string(),
        )
    };
    assert_eq!(
        bound::<online_archive::OnlineArchive>(),
        sweeper("storagetier.onlinearchive.newfile")
    );
    assert_eq!(
        bound::<online_nearline::OnlineNearline>(),
        sweeper("storagetier.onlinenearline.newfile")
    );
    let pairs: [(Bound, [&str; 3]); 4] = [
        (
            bound::<project_ingest::ProjectIngest>(),
            [
                "pluto-core",
                "core.project.#",
                "storagetier.projectingest.project",
            ],
        ),
        (
            bound::<crash_router::CrashRouterService>(),
            ["s3-events", "#", "storagetier.crashrouter.crash"],
        ),
        (
            bound::<snapshot_status::SnapshotStatus>(),
            [
                "snapshot-sender",
                "snapshot.status.#",
                "storagetier.snapshotstatus.status",
            ],
        ),
        (
            bound::<event_forwarder::EventForwarderService>(),
            ["events", "#", "storagetier.eventforwarder.event"],
        ),
    ];
    for (got, [exchange, key, out]) in pairs {
        assert_eq!(
            got,
            (exchange.to_string(), vec![key.to_string()], out.to_string())
        );
    }
}

/// Design §5: "Unknown keys and bad values are errors, not silently ignored" — in every
/// service's own section and in the stores' option tables, where a typo
/// (`export_state_exchnage`) would otherwise leave the default in force unseen.
#[test]
fn an_unknown_key_in_any_services_section_is_refused_naming_it() {
    fn refused<S: Service>(key: &str) -> String {
        let mut opts = LoadOptions::isolated();
        opts.env_vars = Some(HashMap::new());
        opts.overrides = vec![
            (
                "event_forwarder.endpoint".into(),
                "http://127.0.0.1:1/events".into(),
            ),
            (key.into(), "1".into()),
        ];
        match framework::cli::load_config::<S>(&opts) {
            Ok(_) => panic!("{key} was accepted by {}", S::NAME),
            Err(e) => e.to_string(),
        }
    }
    let cases = [
        (
            "online_archive.bogus_key",
            refused::<online_archive::OnlineArchive>("online_archive.bogus_key"),
        ),
        (
            "online_archive.archive_options.bogus",
            refused::<online_archive::OnlineArchive>("online_archive.archive_options.bogus"),
        ),
        (
            "online_nearline.bogus_key",
            refused::<online_nearline::OnlineNearline>("online_nearline.bogus_key"),
        ),
        (
            "online_nearline.vault_options.bogus",
            refused::<online_nearline::OnlineNearline>("online_nearline.vault_options.bogus"),
        ),
        (
            "project_ingest.bogus_key",
            refused::<project_ingest::ProjectIngest>("project_ingest.bogus_key"),
        ),
        (
            "crash_router.bogus_key",
            refused::<crash_router::CrashRouterService>("crash_router.bogus_key"),
        ),
        (
            "snapshot_status.bogus_key",
            refused::<snapshot_status::SnapshotStatus>("snapshot_status.bogus_key"),
        ),
        (
            "event_forwarder.bogus_key",
            refused::<event_forwarder::EventForwarderService>("event_forwarder.bogus_key"),
        ),
    ];
    for (key, err) in cases {
        let last = key.rsplit('.').next().unwrap_or(key);
        assert!(err.contains(last), "{key}: {err}");
    }
}

/// `[<service>] database_password_file` (a mounted secret) in every service with a
/// database: a file that cannot be read, or an empty one, is refused naming the key; a
/// readable one is the password of the PostgreSQL URL in effect.
#[test]
fn every_database_takes_its_password_from_a_file() {
    fn loaded<S: Service>(section: &str, file: &std::path::Path) -> Result<(), String> {
        let mut opts = LoadOptions::isolated();
        opts.env_vars = Some(HashMap::new());
        opts.overrides = vec![
            (
                format!("{section}.database_url"),
                "postgres://app@127.0.0.1:5432/records".into(),
            ),
            (
                format!("{section}.database_password_file"),
                file.display().to_string(),
            ),
        ];
        framework::cli::load_config::<S>(&opts)
            .map(|_| ())
            .map_err(|e| e.key)
    }
    let dir = tempfile::tempdir().expect("temp");
    let missing = dir.path().join("missing");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").expect("write");
    let good = dir.path().join("pw");
    std::fs::write(&good, "s3cret\n").expect("write");
    for file in [&missing, &empty] {
        for (section, got) in [
            (
                "online_archive",
                loaded::<online_archive::OnlineArchive>("online_archive", file),
            ),
            (
                "online_nearline",
                loaded::<online_nearline::OnlineNearline>("online_nearline", file),
            ),
            (
                "project_ingest",
                loaded::<project_ingest::ProjectIngest>("project_ingest", file),
            ),
            (
                "snapshot_status",
                loaded::<snapshot_status::SnapshotStatus>("snapshot_status", file),
            ),
        ] {
            assert_eq!(
                got,
                Err(format!("{section}.database_password_file")),
                "{file:?}"
            );
        }
    }
    assert_eq!(
        loaded::<online_archive::OnlineArchive>("online_archive", &good),
        Ok(())
    );
    let mut opts = LoadOptions::isolated();
    opts.env_vars = Some(HashMap::new());
    opts.overrides = vec![
        (
            "project_ingest.database_url".into(),
            "postgres://app@127.0.0.1:5432/records".into(),
        ),
        (
            "project_ingest.database_password_file".into(),
            good.display().to_string(),
        ),
    ];
    let cfg = framework::cli::load_config::<project_ingest::ProjectIngest>(&opts).expect("loads");
    assert_eq!(
        project_ingest::database(&cfg).as_deref(),
        Ok("postgres://app:s3cret@127.0.0.1:5432/records")
    );
}

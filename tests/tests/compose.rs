//! docker-compose.yml stays valid and in step with the services' config keys: no Docker
//! engine runs here, so the file is parsed and every service's environment is loaded
//! through that service's own strict config loader.

use std::collections::HashMap;
use std::path::PathBuf;

use framework::Service;
use framework::config::LoadOptions;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Resolves `${VAR:-default}` / `${VAR:?msg}` / `${VAR}` the way compose would with an
/// empty environment (defaults taken, required ones get a placeholder).
fn interpolate(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else { break };
        let inner = &rest[i + 2..i + j];
        let value = if let Some((_, d)) = inner.split_once(":-") {
            d.to_string()
        } else {
            "placeholder".to_string()
        };
        out.push_str(&value);
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out.replace("$$", "$")
}

fn env_of(svc: &serde_norway::Value) -> HashMap<String, String> {
    let mut m = HashMap::new();
    if let Some(env) = svc.get("environment").and_then(|e| e.as_mapping()) {
        for (k, v) in env {
            let k = k.as_str().expect("env key").to_string();
            let v = match v {
                serde_norway::Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap().trim().to_string(),
            };
            m.insert(k, interpolate(&v));
        }
    }
    m
}

/// Loads one service's config from a compose environment.
type Loader = fn(&HashMap<String, String>) -> Result<(String, bool, u64), String>;

/// Loads `S`'s config as `env` sets it; its `http_listen`, `[amqp] declare_sources`, and
/// the longest its stop may take past the shutdown's tail (ms): the drain budget and the
/// operation bound a handler awaiting its retry's confirm is given beyond it.
fn check<S: Service>(env: &HashMap<String, String>) -> Result<(String, bool, u64), String> {
    // Online roots are mounts inside the container: a configured root must exist, so on
    // this host each is checked as a directory that does.
    let host_root = std::env::temp_dir();
    let mut env = env.clone();
    for (k, v) in env.iter_mut() {
        if k.ends_with("__ONLINE_ROOTS") {
            assert!(v.starts_with('/'), "{k} is an absolute path: {v}");
            *v = host_root.display().to_string();
        }
    }
    let opts = LoadOptions {
        config_dir: Some(repo().join("config")),
        config_dir_explicit: true,
        env_name: env.get("APP_ENV").cloned(),
        env_vars: Some(env),
        overrides: vec![],
    };
    framework::cli::load_config::<S>(&opts)
        .map(|c| {
            let stop_ms = c.amqp.drain_timeout_ms + c.amqp.operation_timeout_ms;
            (c.service.http_listen, c.amqp.declare_sources, stop_ms)
        })
        .map_err(|e| e.to_string())
}

#[test]
fn compose_file_is_valid_and_matches_the_config_keys() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    // No secret is written in the file: every password in a URL is a `${…}` substitution
    // (set in the environment or an .env file; the defaults are for a local trial).
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        let Some((_, rest)) = line.split_once("://") else {
            continue;
        };
        if let Some((userinfo, _)) = rest.split_once('@')
            && let Some((_, password)) = userinfo.split_once(':')
        {
            assert!(password.starts_with("${"), "a password written in: {line}");
        }
    }
    let doc: serde_norway::Value =
        serde_norway::from_str(&text).expect("docker-compose.yml is YAML");
    let doc = {
        // Apply YAML merge keys (<<) as compose does.
        let mut d = doc;
        d.apply_merge().unwrap();
        d
    };
    let services = doc["services"].as_mapping().expect("services");
    for infra in ["rabbitmq", "postgres", "s3"] {
        assert!(services.contains_key(infra), "{infra} service");
        // Back after a host or daemon restart, or the services never become ready.
        assert_eq!(
            doc["services"][infra]["restart"].as_str(),
            Some("unless-stopped"),
            "{infra} restarts"
        );
    }
    // The queues, retries and dead letters outlive a re-created broker container: a
    // volume, under a fixed host name (RabbitMQ's data directory is named for it).
    let rabbit = &doc["services"]["rabbitmq"];
    assert!(rabbit["hostname"].as_str().is_some(), "a fixed host name");
    assert!(
        serde_norway::to_string(&rabbit["volumes"])
            .unwrap()
            .contains(":/var/lib/rabbitmq"),
        "the broker's data in a volume"
    );
    assert!(
        doc["services"]["rabbitmq"]["image"]
            .as_str()
            .unwrap()
            .contains("management")
    );
    assert!(
        doc["services"]["rabbitmq"]["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .any(|p| p.as_str() == Some("127.0.0.1:${RABBITMQ_UI_HOST_PORT:-15672}:15672")),
        "the management UI on 15672 unless RABBITMQ_UI_HOST_PORT says otherwise"
    );
    let ours: [(&str, u16, Loader); 6] = [
        (
            "online-archive",
            9101,
            check::<online_archive::OnlineArchive>,
        ),
        (
            "online-nearline",
            9102,
            check::<online_nearline::OnlineNearline>,
        ),
        (
            "project-ingest",
            9103,
            check::<project_ingest::ProjectIngest>,
        ),
        (
            "crash-router",
            9104,
            check::<crash_router::CrashRouterService>,
        ),
        (
            "snapshot-status",
            9105,
            check::<snapshot_status::SnapshotStatus>,
        ),
        (
            "event-forwarder",
            9106,
            check::<event_forwarder::EventForwarderService>,
        ),
    ];
    for (name, port, load) in ours {
        let svc = &doc["services"][name];
        assert!(!svc.is_null(), "{name} is in the compose file");
        assert_eq!(
            svc["command"][0].as_str(),
            Some(name),
            "{name} runs its own binary"
        );
        let hc = serde_norway::to_string(&svc["healthcheck"]["test"]).unwrap();
        assert!(
            hc.contains(&format!("{port}/readyz")),
            "{name} healthcheck on /readyz: {hc}"
        );
        let vols = serde_norway::to_string(&svc["volumes"]).unwrap();
        assert!(
            vols.contains("./config:/etc/storagetier"),
            "{name} mounts config/"
        );
        let env = env_of(svc);
        assert!(env.contains_key("APP_ENV"), "{name} sets APP_ENV");
        let (_, declares, stop_ms) = load(&env)
            .unwrap_or_else(|e| panic!("{name}: compose environment is not a valid config: {e}"));
        // Killed before its stop ends, a handler awaiting its retry's confirm leaves its
        // input in the queue beside a retry that may still land: the message twice. The
        // shutdown's tail (last frames, span and log flushes) is about 7 s.
        let grace = svc["stop_grace_period"].as_str().unwrap_or("10s");
        let grace_ms: u64 = grace
            .strip_suffix('s')
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n * 1000)
            .unwrap_or_else(|| panic!("{name}: stop_grace_period in seconds: {grace}"));
        assert!(
            grace_ms >= stop_ms + 7000,
            "{name}: stop_grace_period {grace} covers the drain budget, a late confirm's \
             operation bound and the tail ({stop_ms} ms + 7 s)"
        );
        // The stack has no producers: its services make the exchanges they subscribe to.
        assert!(declares, "{name} declares missing sources under compose");
        // Without compose's `http_listen` override (APP_ENV=prod is the image's own, as a
        // Kubernetes deployment starts it): metrics and probes must be reachable from
        // outside the container.
        let data = tempfile::tempdir().unwrap();
        let mut bare = env.clone();
        bare.retain(|k, _| !k.ends_with("__HTTP_LISTEN"));
        bare.insert("APP_ENV".into(), "prod".into());
        bare.insert(
            "STORAGETIER__STORAGE__DATA_DIR".into(),
            data.path().display().to_string(),
        );
        bare.retain(|k, _| !k.ends_with("__DECLARE_SOURCES"));
        let (listen, declares, _) =
            load(&bare).unwrap_or_else(|e| panic!("{name}: prod is not a valid config: {e}"));
        assert_eq!(listen, format!("0.0.0.0:{port}"), "{name} under --env prod");
        // Production's producers declare their own exchanges, with flags of their own
        // (pluto-core's is not durable): one a service made first would refuse them.
        assert!(
            !declares,
            "{name} leaves the producers' exchanges to them under prod"
        );
    }
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("USER storagetier"),
        "runtime image runs as non-root"
    );
    // An environment variable would override every config file's `data_dir`: an operator's
    // mounted disk set in prod.toml would be silently ignored.
    assert!(
        !dockerfile.contains("STORAGETIER__STORAGE__DATA_DIR"),
        "the image leaves data_dir to the config"
    );
    for (name, ..) in ours {
        assert!(
            dockerfile.contains(&format!("target/release/{name}")),
            "Dockerfile ships {name}"
        );
    }
}

//! The command line of design §4, run as a real process: exit codes, config errors,
//! redaction, SIGTERM drain, declare and the dead-letter tools.

use std::collections::HashSet;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use framework::lapin::BasicProperties;
use framework::testing::*;
use framework::{MessageContext, Outcome};

const BIN: &str = env!("CARGO_BIN_EXE_echo");

/// The echo binary with an empty config dir and env overrides for queue `q`.
fn echo_cmd(q: &str, dir: &std::path::Path) -> Command {
    let mut c = isolated_command(BIN);
    c.arg("--config-dir").arg(dir);
    c.env("STORAGETIER__AMQP__URL", amqp_url())
        .env("STORAGETIER__ECHO__QUEUE", q)
        .env("STORAGETIER__ECHO__OUTPUT_EXCHANGE", format!("{q}-out"))
        .env("STORAGETIER__ECHO__INPUT_EXCHANGE", format!("{q}-in"))
        .env("STORAGETIER__ECHO__HTTP_LISTEN", "127.0.0.1:0")
        .env("STORAGETIER__RETRY__DELAYS_MS", "200,400");
    c
}

fn run(c: &mut Command) -> Output {
    c.stdin(Stdio::null())
        .output_within(WAIT)
        .expect("echo runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config file that is there but cannot be read as one — a directory (what a bind
/// mount of a missing file leaves), a link to nothing, a file without read permission —
/// exits 2 naming it, instead of being skipped (its settings silently unapplied) or
/// failing without its name.
#[test]
fn a_config_file_that_cannot_be_read_exits_2_naming_it() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let check = |what: &str| {
        let o = run(echo_cmd("unused", dir.path()).arg("check-config"));
        assert_eq!(o.status.code(), Some(2), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains("dev.toml"), "{what}: {}", stderr(&o));
    };
    let dev = dir.path().join("dev.toml");
    std::fs::create_dir(&dev).unwrap();
    check("a directory");
    std::fs::remove_dir(&dev).unwrap();
    std::os::unix::fs::symlink(dir.path().join("gone.toml"), &dev).unwrap();
    check("a link to nothing");
    std::fs::remove_file(&dev).unwrap();
    std::fs::write(&dev, "[amqp]\nprefetch = 4\n").unwrap();
    std::fs::set_permissions(&dev, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads whatever the permissions say (the suite runs as root): the service is
    // then run as nobody, who may enter the directory but not read the file.
    let mut cmd = echo_cmd("unused", dir.path());
    cmd.arg("check-config");
    if std::fs::read(&dev).is_ok() {
        use std::os::unix::process::CommandExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    let o = run(&mut cmd);
    assert_eq!(o.status.code(), Some(2), "unreadable: {}", stderr(&o));
    assert!(
        stderr(&o).contains("dev.toml"),
        "unreadable: {}",
        stderr(&o)
    );
}

/// A password in a `STORAGETIER__…` variable that is not UTF-8 is refused naming the
/// variable, never quoted (the config parser's own error quoted the value).
#[test]
fn a_variable_that_is_not_utf8_is_named_not_quoted() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let value = std::ffi::OsStr::from_bytes(b"amqp://u:s3cr\xe9t@h/");
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__AMQP__URL", value)
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("STORAGETIER__AMQP__URL"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("s3cr"), "{}", stderr(&o));
}

/// A broker password holding `/` (or `?`, `#`) unencoded, which the URL parser reads as
/// host, port and path: `check-config` exits 2 naming the key and never prints it.
#[test]
fn a_password_the_parser_takes_for_a_path_exits_2_unprinted() {
    let dir = tempfile::tempdir().unwrap();
    for var in ["STORAGETIER__AMQP__URL", "STORAGETIER__AMQP__URLS"] {
        let o = run(echo_cmd("unused", dir.path())
            .env(var, "amqp://user:42/Zm9vYmFy@rabbit/%2f")
            .arg("check-config"));
        let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert_eq!(o.status.code(), Some(2), "{var}: {out}");
        assert!(
            out.contains("amqp.url") && out.contains("percent-encode"),
            "{out}"
        );
        assert!(!out.contains("Zm9vYmFy"), "{out}");
    }
}

/// An override with one underscore after the prefix was silently ignored (the service ran
/// on the broker of the files): exit 2 naming it, not its value.
#[test]
fn a_variable_with_one_underscore_after_the_prefix_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    for var in ["STORAGETIER_AMQP__URL", "STORAGETIER_AMQP_URL"] {
        let o = run(echo_cmd("unused", dir.path())
            .env(var, "amqp://u:s3cret@rabbit/%2f")
            .arg("check-config"));
        assert_eq!(o.status.code(), Some(2), "{var}: {}", stderr(&o));
        assert!(stderr(&o).contains(var), "{}", stderr(&o));
        assert!(!stderr(&o).contains("s3cret"), "{}", stderr(&o));
    }
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER_TEST_AMQP_URL", "amqp://x/%2f")
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// `check-config` says what `run` warns about at start (seconds typed as milliseconds),
/// on stderr beside its JSON: a check in CI passed `drain_timeout_ms = 30` unremarked.
#[test]
fn check_config_warns_of_seconds_typed_as_milliseconds() {
    let dir = tempfile::tempdir().unwrap();
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__AMQP__DRAIN_TIMEOUT_MS", "30")
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: amqp.drain_timeout_ms is 30"),
        "{}",
        stderr(&o)
    );
    let shown: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON alone");
    assert_eq!(shown["amqp"]["drain_timeout_ms"], 30);
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__RETRY__DELAYS_MS", "1000,5000")
        .arg("check-config"));
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

/// The repository's own config files, each environment as shipped (the README's
/// `echo -- --env prod check-config`): a placeholder there that the checks refuse (a user
/// without a password, once they were added) made it exit 2.
#[test]
fn the_shipped_configs_pass_check_config() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../config");
    for env in ["dev", "test", "prod"] {
        let o = run(isolated_command(BIN).args([
            "--config-dir",
            shipped,
            "--env",
            env,
            "check-config",
        ]));
        assert_eq!(o.status.code(), Some(0), "{env}: {}", stderr(&o));
    }
}

/// `--config-dir` naming a directory whose files are none of those read (`prod.toml`
/// without `--env prod`): exit 2 listing them, not a run on the built-in defaults.
#[test]
fn a_config_dir_none_of_whose_files_is_read_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prod.toml"), "[amqp]\nprefetch = 4\n").unwrap();
    let o = run(echo_cmd("unused", dir.path()).arg("check-config"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--config-dir") && stderr(&o).contains("prod.toml"),
        "{}",
        stderr(&o)
    );
    let o = run(echo_cmd("unused", dir.path()).args(["--env", "prod", "check-config"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// An empty password file (a secret not mounted yet) exits 2 naming the key: its empty
/// password removed the one in the URL, and the client logged in as guest, refused for
/// ever.
#[test]
fn an_empty_password_file_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "\n").unwrap();
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__AMQP__PASSWORD_FILE", &pw)
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("amqp.password_file"), "{}", stderr(&o));
}

/// A TLS key the client cannot use — encrypted, or another certificate's — exits 2 naming
/// `amqp.tls_key_file`: its PEM header passed, and `run` then failed every connection
/// ("no items found") naming no key, retrying for ever.
#[test]
fn a_tls_key_the_client_cannot_use_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    framework::testing::tls::make_certificates(&certs);
    let encrypted = certs.join("encrypted.key");
    let made = Command::new("openssl")
        .args(["pkcs8", "-topk8", "-passout", "pass:secret", "-in"])
        .arg(certs.join("client.key"))
        .arg("-out")
        .arg(&encrypted)
        .output_within(WAIT)
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let check = |key: &str| {
        run(echo_cmd("unused", dir.path())
            .env(
                "STORAGETIER__AMQP__URL",
                "amqps://guest:guest@127.0.0.1:5671/%2f",
            )
            .env("STORAGETIER__AMQP__TLS_CA_FILE", certs.join("ca.pem"))
            .env("STORAGETIER__AMQP__TLS_CERT_FILE", certs.join("client.pem"))
            .env("STORAGETIER__AMQP__TLS_KEY_FILE", certs.join(key))
            .arg("check-config"))
    };
    let o = check("client.key");
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for (key, says) in [
        ("encrypted.key", "no private key the TLS client reads"),
        ("server.key", "is not the key of the certificate"),
    ] {
        let o = check(key);
        assert_eq!(o.status.code(), Some(2), "{key}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("amqp.tls_key_file") && stderr(&o).contains(says),
            "{key}: {}",
            stderr(&o)
        );
    }
}

/// The broker refusing the password, or a vhost that does not exist: exit 1 naming the
/// setting to fix, not only the broker's own words.
#[test]
fn a_refused_login_or_vhost_names_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let mut vhost = url::Url::parse(&amqp_url()).unwrap();
    vhost.set_path("/no-such-vhost");
    for (url, says) in [
        (with_credentials(&amqp_url(), "guest", "wrong"), "password"),
        (vhost.to_string(), "vhost"),
    ] {
        let o = run(echo_cmd("unused", dir.path())
            .env("STORAGETIER__AMQP__URL", &url)
            .args(["dlq", "list"]));
        assert_eq!(o.status.code(), Some(1), "{url}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("[amqp] url") && stderr(&o).contains(says),
            "{url}: {}",
            stderr(&o)
        );
    }
}

/// `--env` (or `--config-dir`) given before the command and again after it: clap took the
/// last (`--env prod dlq purge --yes --env dev` purged dev); refused, exit 2, nothing done.
#[test]
fn a_global_option_given_twice_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prod.toml"), "").unwrap();
    std::fs::write(dir.path().join("dev.toml"), "").unwrap();
    for args in [
        &["--env", "prod", "check-config", "--env", "dev"][..],
        &["--env=prod", "check-config", "--env=dev"][..],
    ] {
        let o = run(echo_cmd("unused", dir.path()).args(args));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--env"), "{args:?}: {}", stderr(&o));
    }
    let o = run(echo_cmd("unused", dir.path()).args(["--env", "prod", "check-config"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

#[test]
fn bad_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("STORAGETIER__AMQP__PREFETCH", "lots", "amqp.prefetch"),
        ("STORAGETIER__AMQP__PREFETCH", "0", "amqp.prefetch"),
        ("STORAGETIER__RETRY__MAX_ATTEMPT", "3", "retry.max_attempt"),
        ("STORAGETIER__AMQP__QUEUE_TYPE", "fast", "amqp.queue_type"),
        ("STORAGETIER__AMQP__URL", "http://x", "amqp.url"),
        ("STORAGETIER__RETRY__DELAYS_MS", "", "retry.delays_ms"),
        ("STORAGETIER__LOG__FORMAT", "xml", "log.format"),
        (
            "STORAGETIER__ECHO__HTTP_LISTEN",
            "nowhere",
            "echo.http_listen",
        ),
        ("STORAGETIER__ECHO__ROUTING_KEYZ", "a", "echo.routing_keyz"),
        // Names RabbitMQ refuses (reserved, the unbindable default exchange, too long):
        // config errors, not a declaration retried forever.
        ("STORAGETIER__ECHO__QUEUE", "amq.echo", "echo.queue"),
        (
            "STORAGETIER__ECHO__INPUT_EXCHANGE",
            "",
            "echo.input_exchange",
        ),
        (
            "STORAGETIER__ECHO__OUTPUT_EXCHANGE",
            "amq.topic",
            "echo.output_exchange",
        ),
        // A service consuming what it publishes: its messages would come back for ever.
        (
            "STORAGETIER__ECHO__INPUT_EXCHANGE",
            "unused-out",
            "echo.input_exchange",
        ),
        (
            "STORAGETIER__ECHO__INPUT_EXCHANGE",
            "unused-retry",
            "echo.input_exchange",
        ),
        (
            "STORAGETIER__ECHO__OUTPUT_EXCHANGE",
            "unused-fail",
            "echo.output_exchange",
        ),
        // Under `amq.` only RabbitMQ's own exist (a typo of `amq.topic`).
        (
            "STORAGETIER__ECHO__INPUT_EXCHANGE",
            "amq.topics",
            "echo.input_exchange",
        ),
        // Seconds typed for milliseconds, declared on Q where a fix does not replace it.
        (
            "STORAGETIER__AMQP__CONSUMER_TIMEOUT_MS",
            "3600",
            "amqp.consumer_timeout_ms",
        ),
        ("STORAGETIER__BOGUS__X", "1", "bogus"),
        // Valid filter syntax (a target named so), but with no level set it would turn
        // every other log line off (` info`: the filter does not trim).
        ("STORAGETIER__LOG__LEVEL", "warning", "log.level"),
        ("STORAGETIER__LOG__LEVEL", "lapin=warn, info", "log.level"),
    ];
    for (k, v, key) in cases {
        let o = run(echo_cmd("unused", dir.path()).env(k, v).arg("check-config"));
        assert_eq!(o.status.code(), Some(2), "{k}={v}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(key),
            "{k}={v} names {key}: {}",
            stderr(&o)
        );
    }
    // An address this host does not have (TEST-NET-1): found only when `run` listens,
    // still the config's fault.
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__ECHO__HTTP_LISTEN", "192.0.2.1:9100")
        .arg("run"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("echo.http_listen"), "{}", stderr(&o));
    // Logging JSON for a collector, it says so in a JSON line at level ERROR too (a
    // pipeline filtering on the level saw nothing of why the service exited).
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__ECHO__HTTP_LISTEN", "192.0.2.1:9100")
        .env("STORAGETIER__LOG__FORMAT", "json")
        .arg("run"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let logged = stderr(&o)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|l| {
            l["level"] == "ERROR"
                && l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("echo.http_listen"))
        });
    assert!(logged, "{}", stderr(&o));
    // Their neighbours are taken: RabbitMQ's own `amq.topic`, a minute's consumer timeout.
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__ECHO__INPUT_EXCHANGE", "amq.topic")
        .env("STORAGETIER__AMQP__CONSUMER_TIMEOUT_MS", "60000")
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // A bad value in a config file is named the same way.
    std::fs::write(
        dir.path().join("dev.toml"),
        "[amqp]\ndrain_timeout_ms = -5\n",
    )
    .unwrap();
    let o = run(echo_cmd("unused", dir.path()).arg("check-config"));
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("amqp.drain_timeout_ms"),
        "{}",
        stderr(&o)
    );
    // A value of a type its key cannot have is refused, not rounded or converted.
    for (toml, key) in [
        ("[amqp]\nprefetch = 16.7\n", "amqp.prefetch"),
        ("[retry]\nmax_attempts = 2.5\n", "retry.max_attempts"),
        ("[amqp]\ndeclare_sources = 0\n", "amqp.declare_sources"),
    ] {
        std::fs::write(dir.path().join("dev.toml"), toml).unwrap();
        let o = run(echo_cmd("unused", dir.path()).arg("check-config"));
        assert_eq!(o.status.code(), Some(2), "{toml}: {}", stderr(&o));
        assert!(stderr(&o).contains(key), "{toml}: {}", stderr(&o));
    }
    // A file that does not parse is named, without quoting its lines (they may hold a
    // password); an OTLP endpoint refused is not echoed either (its credentials).
    std::fs::write(
        dir.path().join("dev.toml"),
        "[amqp]\nurl = \"amqp://u:s3cr3t@h/\" x\n",
    )
    .unwrap();
    let o = run(echo_cmd("unused", dir.path()).arg("check-config"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("line 2"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("s3cr3t"), "{}", stderr(&o));
    std::fs::remove_file(dir.path().join("dev.toml")).unwrap();
    let o = run(echo_cmd("unused", dir.path())
        .env(
            "STORAGETIER__TELEMETRY__OTLP_ENDPOINT",
            "htps://otel:s3cr3t@c:4318/?api-key=k3y",
        )
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("telemetry.otlp_endpoint"),
        "{}",
        stderr(&o)
    );
    assert!(
        !stderr(&o).contains("s3cr3t") && !stderr(&o).contains("k3y"),
        "{}",
        stderr(&o)
    );
    // A missing environment file, config dir or bad flag.
    let o = run(echo_cmd("unused", dir.path()).args(["--env", "prod-typo", "check-config"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("prod-typo"));
    // An environment name that would lead out of the config dir is no name.
    for env in ["../../etc/x", "a/b", ""] {
        let o = run(echo_cmd("unused", dir.path()).args(["--env", env, "check-config"]));
        assert_eq!(o.status.code(), Some(2), "{env:?}: {}", stderr(&o));
        assert!(stderr(&o).contains("--env"), "{env:?}: {}", stderr(&o));
    }
    let o = run(echo_cmd("unused", &dir.path().join("nope")).arg("check-config"));
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--config-dir"));
    let o = run(echo_cmd("unused", dir.path()).arg("--no-such-flag"));
    assert_eq!(o.status.code(), Some(2));
    // `--config-dir=D` names a directory as surely as `--config-dir D`.
    let nope = format!("--config-dir={}", dir.path().join("nope").display());
    let o = run(Command::new(BIN).args([nope.as_str(), "check-config"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--config-dir"), "{}", stderr(&o));
    // Run where there is no ./config (an installed binary, from $HOME): without an
    // environment it runs on the built-in defaults; a named one must find its file, not
    // silently run on those defaults (guest@localhost, ./data).
    let home = tempfile::tempdir().unwrap();
    let bare = |env: Option<&str>| {
        let mut c = Command::new(BIN);
        c.current_dir(home.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .arg("check-config");
        if let Some(e) = env {
            c.env("APP_ENV", e);
        }
        run(&mut c)
    };
    assert_eq!(bare(None).status.code(), Some(0), "{}", stderr(&bare(None)));
    let o = bare(Some("prod"));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("prod"), "{}", stderr(&o));
}

/// `dlq` arguments that can never work are usage errors (exit 2) found before any
/// connection: with nothing listening on the broker's port they still exit 2, naming the
/// argument, not 1 with "cannot connect".
#[test]
fn dlq_usage_errors_exit_2_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on: connecting would fail (exit 1).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        closed.local_addr().unwrap().port()
    );
    drop(closed);
    for (args, named) in [
        (&["dlq", "purge"][..], "--yes"),
        (&["dlq", "replay", "--all", "--rate", "0"][..], "--rate"),
        (
            &["dlq", "replay", "--all", "--kind", "retries_exhausted"][..],
            "retries-exhausted",
        ),
        (
            &["dlq", "replay", "--all", "--older-than", "1.5h"][..],
            "whole number",
        ),
        (
            &["dlq", "replay", "--message-id", "m", "--limit", "0"][..],
            "--limit",
        ),
        (&["dlq", "list", "--limit", "0"][..], "--limit"),
        (&["dlq", "replay", "--message-id", ""][..], "--message-id"),
        (&["dlq", "replay", "--message-id", "  "][..], "--message-id"),
    ] {
        let o = run(echo_cmd("unused", dir.path())
            .env("STORAGETIER__AMQP__URL", &url)
            .args(args));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(named), "{args:?}: {}", stderr(&o));
    }
    // The same URL for a command that needs the broker: exit 1.
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__AMQP__URL", &url)
        .env("STORAGETIER__AMQP__CONNECT_TIMEOUT_MS", "2000")
        .args(["dlq", "list"]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    // Said once: text logs do not repeat the line the person at the terminal gets.
    assert_eq!(
        stderr(&o).matches("cannot connect").count(),
        1,
        "{}",
        stderr(&o)
    );
    // A reachable broker where the service was never declared: the way out is named.
    let o = run(echo_cmd(&unique("undeclared"), dir.path()).args(["dlq", "list"]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("`declare`"), "{}", stderr(&o));
}

#[test]
fn layers_apply_in_order_and_check_config_redacts_secrets() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("default.toml"),
        "[amqp]\nprefetch = 3\n[log]\nlevel = \"debug\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("staging.toml"), "[amqp]\nprefetch = 5\n").unwrap();
    let pwfile = dir.path().join("pw");
    std::fs::write(&pwfile, "from-a-file-s3cret\n").unwrap();
    let o = run(echo_cmd("unused", dir.path())
        .env("APP_ENV", "staging")
        .env(
            "STORAGETIER__AMQP__URL",
            "amqps://user:hunter2-s3cret@broker.example:5671/prod",
        )
        .env("STORAGETIER__STORAGE__DATA_DIR", "/tmp/elsewhere")
        // A collector reached with credentials in its URL (no other OTLP auth exists).
        .env(
            "STORAGETIER__TELEMETRY__OTLP_ENDPOINT",
            "https://otel:collector-s3cret@collector:4318/?api-key=apikey-s3cret",
        )
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("s3cret"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["amqp"]["prefetch"], 5, "env file beats default.toml");
    assert_eq!(v["log"]["level"], "debug", "default.toml beats built-in");
    assert_eq!(
        v["storage"]["data_dir"], "/tmp/elsewhere",
        "env var beats files"
    );
    assert_eq!(
        v["amqp"]["url"],
        "amqps://user:***@broker.example:5671/prod"
    );
    assert!(!text.contains("hunter2"));
    let o = run(echo_cmd("unused", dir.path())
        .env("STORAGETIER__AMQP__PASSWORD_FILE", &pwfile)
        .arg("check-config"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("from-a-file"));

    // `--env NAME` picks `NAME.toml`, and beats `APP_ENV`.
    std::fs::write(dir.path().join("canary.toml"), "[amqp]\nprefetch = 7\n").unwrap();
    let prefetch = |cmd: &mut Command| {
        let o = run(cmd.arg("check-config"));
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["amqp"]["prefetch"].clone()
    };
    assert_eq!(
        prefetch(echo_cmd("unused", dir.path()).args(["--env", "canary"])),
        7
    );
    assert_eq!(
        prefetch(
            echo_cmd("unused", dir.path())
                .env("APP_ENV", "staging")
                .args(["--env", "canary"])
        ),
        7,
        "--env beats APP_ENV"
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_messages_and_exits_0() {
    a_signal_drains_in_flight_messages_and_exits_0(process::SIGTERM).await;
}

/// Ctrl-C in a terminal (design §4: SIGTERM/SIGINT) stops as SIGTERM does.
#[tokio::test]
async fn sigint_drains_in_flight_messages_and_exits_0() {
    a_signal_drains_in_flight_messages_and_exits_0(process::SIGINT).await;
}

async fn a_signal_drains_in_flight_messages_and_exits_0(signal: i32) {
    let q = unique("sigterm");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let dir = tempfile::tempdir().unwrap();
    // Declare first so bindings exist before anything is published.
    let o = run(echo_cmd(&q, dir.path()).arg("declare"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_c, ch) = test_channel().await;
    let port = framework::testing::broker::free_port();
    let mut child = process::spawn(
        echo_cmd(&q, dir.path())
            .env("STORAGETIER__ECHO__DELAY_MS", "1500")
            .env("STORAGETIER__AMQP__PREFETCH", "4")
            .env(
                "STORAGETIER__ECHO__HTTP_LISTEN",
                format!("127.0.0.1:{port}"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    let total = 12;
    for i in 0..total {
        publish(
            &ch,
            &format!("{q}-in"),
            "k",
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    // Wait until 4 handlers (its prefetch) run, each taking 1.5 s: in flight. A delivery
    // the broker sent but no handler took yet would go back instead (also fine, not this
    // test's point), so the handlers themselves are counted.
    await_metric(port, &format!("storagetier_in_flight{{queue=\"{q}\"}} 4")).await;
    let mut seen = HashSet::new();
    let status = tokio::task::spawn_blocking(move || {
        child.signal(signal);
        child.wait_for(WAIT)
    })
    .await
    .unwrap()
    .expect("exited after the signal");
    assert_eq!(status.code(), Some(0), "clean exit after signal {signal}");
    // Every message either done or back in the queue (a delivery the service had not
    // started goes back as its channel closes, which the broker may finish a moment later).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        while let Some(d) = next_within(&mut out, Duration::from_millis(100)).await {
            assert!(seen.insert(d.data.clone()), "no duplicate outputs");
        }
        if seen.len() >= 4 && seen.len() + ready_count(&ch, &q).await as usize == total {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} done and {} back in the queue of {total}",
            seen.len(),
            ready_count(&ch, &q).await
        );
    }
    while let Some(d) = next_within(&mut out, Duration::from_millis(300)).await {
        assert!(seen.insert(d.data.clone()), "no duplicate outputs");
    }
    assert!(
        seen.len() >= 4,
        "the 4 in-flight messages were finished, not abandoned ({})",
        seen.len()
    );
    // Every message either done or back in the queue (a delivery the service had not
    // started goes back as its channel closes, which the broker may finish a moment later).
    await_ready_count(&ch, &q, (total - seen.len()) as u32).await;
}

/// A closed stderr (a log collector gone, `2>&1 | head`) loses log lines but changes no
/// exit code: printing to it used to panic (exit 101), from a config error's message and
/// from tracing-subscriber's report of a log line it could not write.
#[test]
fn a_closed_stderr_changes_no_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let closed_stderr = || {
        let (reader, writer) = std::io::pipe().expect("pipe");
        drop(reader);
        writer
    };
    let code = |c: &mut Command| {
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(closed_stderr())
            .status_within(WAIT)
            .expect("echo runs")
            .code()
    };
    let q = unique("nostderr");
    // A config error: exit 2.
    assert_eq!(
        code(
            echo_cmd(&q, dir.path())
                .env("STORAGETIER__AMQP__PREFETCH", "lots")
                .arg("run")
        ),
        Some(2)
    );
    // A broker that cannot be reached: logged (tracing), then exit 1.
    let nowhere = format!(
        "amqp://guest:guest@127.0.0.1:{}/%2f",
        framework::testing::broker::free_port()
    );
    assert_eq!(
        code(
            echo_cmd(&q, dir.path())
                .env("STORAGETIER__AMQP__URL", nowhere)
                .arg("declare")
        ),
        Some(1)
    );
}

/// A command other than `run` stops at SIGTERM or SIGINT (exit 1, saying so) even where
/// the process ignores both — PID 1 of a container without an init, a script's background
/// job: here the signals are set to be ignored before the command starts, and its broker
/// is a host that never answers (a connect waiting out a 10-minute timeout). Before, it
/// went on for the whole of its timeouts (`dlq list` up to 5 minutes holding every dead
/// letter and the DLQ's lock).
#[tokio::test]
async fn other_commands_stop_at_a_signal_even_where_signals_are_ignored() {
    let relay = framework::testing::relay::Relay::start().await;
    relay.lose_host();
    let dir = tempfile::tempdir().unwrap();
    for (args, signal) in [
        (&["declare"][..], process::SIGTERM),
        (&["dlq", "list"][..], process::SIGINT),
        (&["dlq", "purge", "--yes"][..], process::SIGTERM),
    ] {
        let tried = relay.attempts().len();
        let mut cmd = echo_cmd(&unique("ignored"), dir.path());
        cmd.env("STORAGETIER__AMQP__URL", relay.url.as_str())
            .env("STORAGETIER__AMQP__CONNECT_TIMEOUT_MS", "600000")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: signal() is async-signal-safe; it only sets two dispositions.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                Ok(())
            });
        }
        let mut child = process::spawn(&mut cmd).unwrap();
        let deadline = tokio::time::Instant::now() + WAIT;
        while relay.attempts().len() == tried {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{args:?} connects to the broker"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        child.signal(signal);
        let mut err = child.take_stderr().expect("stderr");
        let status = tokio::task::spawn_blocking(move || child.wait_for(WAIT))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{args:?} exits at the signal"));
        let mut text = String::new();
        std::io::Read::read_to_string(&mut err, &mut text).unwrap();
        assert_eq!(status.code(), Some(1), "{args:?}: {text}");
        assert!(text.contains("stopped by a signal"), "{args:?}: {text}");
    }
}

/// A second SIGTERM during the drain exits at once (code 1) instead of waiting for a
/// handler that would take minutes; its message goes back to the queue.
#[tokio::test]
async fn a_second_sigterm_during_the_drain_exits_at_once() {
    let q = unique("sigterm2");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let dir = tempfile::tempdir().unwrap();
    let o = run(echo_cmd(&q, dir.path()).arg("declare"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let (_c, ch) = test_channel().await;
    let http = framework::testing::broker::free_port();
    let mut svc = process::spawn(
        echo_cmd(&q, dir.path())
            // Far longer than the test may wait: only the second signal can end it in time.
            .env("STORAGETIER__ECHO__DELAY_MS", "600000")
            .env("STORAGETIER__AMQP__DRAIN_TIMEOUT_MS", "600000")
            .env(
                "STORAGETIER__ECHO__HTTP_LISTEN",
                format!("127.0.0.1:{http}"),
            )
            .env("STORAGETIER__LOG__LEVEL", "info")
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .unwrap();
    let seen_rx = process::lines_holding(svc.take_stderr().expect("stderr"), "shutdown requested");
    publish(
        &ch,
        &format!("{q}-in"),
        "k",
        b"{}",
        BasicProperties::default(),
    )
    .await;
    await_metric(http, &format!("storagetier_in_flight{{queue=\"{q}\"}} 1")).await;
    await_metric(http, "\nstoragetier_stopping 0\n").await;
    svc.signal(process::SIGTERM);
    tokio::task::spawn_blocking(move || seen_rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the first signal starts the drain");
    // Draining, not consuming, and saying why: the not-connected alert leaves it alone.
    await_metric(http, "\nstoragetier_stopping 1\n").await;
    await_metric(http, "\nstoragetier_connected 0\n").await;
    svc.signal(process::SIGTERM);
    let status = tokio::task::spawn_blocking(move || svc.wait_for(WAIT))
        .await
        .unwrap()
        .expect("exited at the second signal, not after the drain");
    assert_eq!(status.code(), Some(1));
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready_count(&ch, &q).await != 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message went back to the queue"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn declare_creates_the_topology_and_definitions_describe_it() {
    let q = unique("declare");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let dir = tempfile::tempdir().unwrap();
    // The log filter of the shipped configs.
    let o = run(echo_cmd(&q, dir.path())
        .env("STORAGETIER__LOG__LEVEL", "info,lapin=warn")
        .arg("declare"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    // The producer's exchange did not exist: its passive check's 404 is expected, and
    // a first start on a fresh broker prints no error for it.
    assert!(!stderr(&o).contains("ERROR"), "{}", stderr(&o));
    let (_c, ch) = test_channel().await;
    for name in [
        q.clone(),
        format!("{q}-dlq"),
        format!("{q}-retry-200"),
        format!("{q}-retry-400"),
    ] {
        assert_eq!(ready_count(&ch, &name).await, 0, "{name} declared");
    }
    // Re-running is idempotent.
    assert_eq!(
        run(echo_cmd(&q, dir.path()).arg("declare")).status.code(),
        Some(0)
    );
    // This release's DLQ takes any number of looks: no warning.
    let o = run(echo_cmd(&q, dir.path()).args(["dlq", "list"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(!stderr(&o).contains("delivery-limit"), "{}", stderr(&o));
    // Another delivery limit (a queue declared by an earlier release or config) is used as
    // it is, with a warning: the remedy of a conflict, deleting the queue, would throw
    // away its messages.
    let o = run(echo_cmd(&q, dir.path())
        .env("STORAGETIER__AMQP__DELIVERY_LIMIT", "7")
        .arg("declare"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("kept as they are") && stderr(&o).contains("x-delivery-limit"),
        "{}",
        stderr(&o)
    );
    // A `Q-dlq` and a retry tier of earlier releases, declared without an overflow
    // argument or without a delivery limit, are used as they are too, with a warning
    // naming the way to lift the limit: every replica of the next release used to exit.
    use framework::lapin::types::{AMQPValue, FieldTable};
    let text = |v: &str| AMQPValue::LongString(v.into());
    let mut old_dlq = FieldTable::default();
    old_dlq.insert("x-queue-type".into(), text("quorum"));
    let mut old_tier = old_dlq.clone();
    old_tier.insert("x-message-ttl".into(), AMQPValue::LongLongInt(200));
    old_tier.insert("x-dead-letter-exchange".into(), text(""));
    old_tier.insert("x-dead-letter-routing-key".into(), text(&q));
    old_tier.insert("x-dead-letter-strategy".into(), text("at-least-once"));
    old_tier.insert("x-overflow".into(), text("reject-publish"));
    for (name, args) in [
        (format!("{q}-dlq"), old_dlq),
        (format!("{q}-retry-200"), old_tier),
    ] {
        ch.queue_delete(
            name.as_str().into(),
            framework::lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .expect("delete the queue");
        ch.queue_declare(
            name.as_str().into(),
            framework::lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("an earlier release's queue");
    }
    let o = run(echo_cmd(&q, dir.path()).arg("declare"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("x-overflow"), "{}", stderr(&o));
    for name in [format!("{q}-dlq"), format!("{q}-retry-200")] {
        let warned = stderr(&o).lines().any(|l| {
            l.contains(&name) && l.contains("another delivery limit") && l.contains("policy")
        });
        assert!(warned, "{name}: {}", stderr(&o));
    }
    // Looking at an earlier release's DLQ warns that each look counts on RabbitMQ 4.x,
    // naming the policy that lifts the limit.
    let o = run(echo_cmd(&q, dir.path()).args(["dlq", "list"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("looked at 20 times")
            && stderr(&o).contains(&format!("'^{q}-dlq$'"))
            && stderr(&o).contains("delivery-limit"),
        "{}",
        stderr(&o)
    );
    // A conflicting queue type is a clear failure, exit 1.
    let o = run(echo_cmd(&q, dir.path())
        .env("STORAGETIER__AMQP__QUEUE_TYPE", "classic")
        .arg("declare"));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("topology conflict"), "{}", stderr(&o));
    // Also where `Q-dlq` is out of the way: the broker names `Q`'s tolerated arguments
    // (overflow, dead-letter strategy) before its type, and the type is still refused.
    ch.queue_delete(
        format!("{q}-dlq").as_str().into(),
        framework::lapin::options::QueueDeleteOptions::default(),
    )
    .await
    .expect("delete the DLQ");
    let o = run(echo_cmd(&q, dir.path())
        .env("STORAGETIER__AMQP__QUEUE_TYPE", "classic")
        .arg("declare"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("topology conflict") && stderr(&o).contains("x-queue-type"),
        "{}",
        stderr(&o)
    );

    let o = run(echo_cmd(&q, dir.path()).arg("definitions"));
    assert_eq!(o.status.code(), Some(0));
    let defs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let queues: Vec<&str> = defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert!(queues.contains(&q.as_str()) && queues.contains(&format!("{q}-dlq").as_str()));
    let main = defs["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == q.as_str())
        .unwrap();
    assert_eq!(main["arguments"]["x-queue-type"], "quorum");
    assert_eq!(
        main["arguments"]["x-dead-letter-exchange"],
        format!("{q}-fail")
    );
    assert!(
        defs["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["source"] == format!("{q}-fail") && b["routing_key"] == "#")
    );
    assert_eq!(defs["queues"][0]["vhost"], "/", "the vhost of `[amqp] url`");
    let source = format!("{q}-in");
    let names = |defs: &serde_json::Value, list: &str, field: &str| -> Vec<String> {
        (defs[list].as_array().unwrap().iter())
            .map(|x| x[field].as_str().unwrap().to_string())
            .collect()
    };
    assert!(names(&defs, "exchanges", "name").contains(&source));
    assert!(names(&defs, "bindings", "source").contains(&source));
    // Where the producers declare their own exchanges (with flags of their own: pluto-core's
    // is not durable), an imported durable one would refuse them: neither it nor its
    // bindings are in the document.
    let o = run(echo_cmd(&q, dir.path())
        .env("STORAGETIER__AMQP__DECLARE_SOURCES", "false")
        .arg("definitions"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let defs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!names(&defs, "exchanges", "name").contains(&source));
    assert!(!names(&defs, "bindings", "source").contains(&source));
    assert!(names(&defs, "exchanges", "name").contains(&format!("{q}-fail")));

    // Written for the vhost the service declares in: imported into another, it would
    // build a topology nothing consumes from. `--vhost` still names another.
    let o = run(echo_cmd(&q, dir.path())
        .env(
            "STORAGETIER__AMQP__URL",
            "amqp://guest:guest@127.0.0.1:5672/media%2Fprod",
        )
        .arg("definitions"));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let defs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(defs["queues"][0]["vhost"], "media/prod");
    assert_eq!(defs["exchanges"][0]["vhost"], "media/prod");
    let o = run(echo_cmd(&q, dir.path()).args(["definitions", "--vhost", "other"]));
    let defs: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(defs["bindings"][0]["vhost"], "other");
    // No vhost is named "": a document naming it cannot be imported.
    let o = run(echo_cmd(&q, dir.path()).args(["definitions", "--vhost", ""]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--vhost"), "{}", stderr(&o));
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_after_confirm_and_purged() {
    let p = FnProcessor(|v: serde_json::Value, _: &MessageContext| {
        if v["poison"] == serde_json::json!(true) {
            Outcome::permanent("poisoned input")
        } else {
            Outcome::success(v)
        }
    });
    let mut hs = Harness::start("dlqcli", &[], p).await;
    let q = hs.q.clone();
    hs.publish(
        "test.p",
        br#"{"poison":true}"#,
        BasicProperties::default().with_message_id("poison-1".into()),
    )
    .await;
    let mut own = framework::lapin::types::FieldTable::default();
    framework::headers::set_str(&mut own, "x-producer-trace", "t-2");
    hs.publish(
        "test.p",
        br#"{"poison":true,"n":2}"#,
        BasicProperties::default()
            .with_message_id("poison-2".into())
            .with_correlation_id("corr-2".into())
            .with_timestamp(1_700_000_002)
            .with_app_id("producer".into())
            .with_type("kind-2".into())
            .with_headers(own),
    )
    .await;
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 2).await;
    hs.stop().await;
    let dir = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = echo_cmd(&q, dir.path());
        c.env("STORAGETIER__ECHO__INPUT_EXCHANGE", format!("{q}-in"))
            .args(args);
        run(&mut c)
    };
    let o = cmd(&["dlq", "list", "--json"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["kind"], "permanent");
    assert_eq!(lines[0]["error"], "poisoned input");
    assert_eq!(lines[0]["original_routing_key"], "test.p");
    assert!(lines[0]["failed_at"].is_string() && lines[0]["size"].as_u64().unwrap() > 0);
    // The text listing, cut by `--limit`: the error, kind, original key and failed-at of
    // the first dead letter only, and how many there are.
    let o = cmd(&["dlq", "list", "--limit", "1"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let rows: Vec<&str> = text.lines().collect();
    assert_eq!(rows.len(), 3, "header, one dead letter, summary: {text}");
    // Which one comes first depends on the order the broker put them back after the
    // last look (a quorum queue returns a closed channel's messages in no set order).
    let shown = lines
        .iter()
        .find(|l| rows[1].contains(l["message_id"].as_str().unwrap_or("?")))
        .unwrap_or_else(|| panic!("a dead letter's id in {text}"));
    let other = lines
        .iter()
        .find(|l| *l != shown)
        .expect("two dead letters");
    for field in [
        shown["message_id"].as_str().unwrap(),
        "permanent",
        "poisoned input",
        "/test.p",
        shown["failed_at"].as_str().unwrap(),
    ] {
        assert!(rows[1].contains(field), "{field} in {text}");
    }
    assert!(
        !text.contains(other["message_id"].as_str().unwrap()),
        "{text}"
    );
    assert!(rows[2].starts_with("1 of 2 dead letter(s)"), "{text}");
    let o = cmd(&["dlq", "list", "--json", "--limit", "1"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    // What the limit left out is told beside the lines, not among them.
    let said = String::from_utf8_lossy(&o.stderr);
    assert!(said.contains("1 of 2 dead letter(s)"), "{said}");
    // list removes nothing
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 2).await;
    // A reader that stops early (`dlq list | head`, here one that never reads): no panic,
    // exit 0, and the dead letters are all still there.
    let mut c = echo_cmd(&q, dir.path());
    c.args(["dlq", "list"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = process::spawn(&mut c).expect("echo runs");
    drop(child.take_stdout());
    let status = child.wait_for(WAIT).expect("exits");
    let mut err = String::new();
    if let Some(mut e) = child.take_stderr() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert_eq!(status.code(), Some(0), "{err}");
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 2).await;

    let o = cmd(&["dlq", "replay", "--message-id", "poison-2", "--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("would replay 1"));
    // a dry run moves nothing
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 2).await;
    // For scripts: one JSON object per dead letter, then a summary.
    let o = cmd(&[
        "dlq",
        "replay",
        "--message-id",
        "poison-2",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["message_id"], "poison-2");
    assert_eq!(lines[0]["action"], "would_replay");
    assert_eq!(lines[0]["kind"], "permanent");
    assert_eq!(lines[1]["summary"]["moved"], 1);
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 2).await;

    let o = cmd(&["dlq", "replay", "--message-id", "poison-2"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 1).await;
    // An id no dead letter has (a typo): a failure a script sees, nothing moved.
    let o = cmd(&["dlq", "replay", "--message-id", "poison-2-typo"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("poison-2-typo"), "{}", stderr(&o));
    // ... and a script reading the JSON summary sees why in its `error`.
    let o = cmd(&["dlq", "replay", "--message-id", "poison-2-typo", "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    let last: serde_json::Value = out
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("a JSON summary: {out}"));
    assert_eq!(last["summary"]["moved"], 0, "{out}");
    let error = last["summary"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("poison-2-typo"), "{out}");
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 1).await;
    // Back in the service's own queue through the default exchange (no other subscriber of
    // the original exchange sees it again), where it first came from kept, errors stripped.
    let mut back = consume(&hs.ch, &q).await;
    let d = next(&mut back).await;
    assert_eq!(d.data, br#"{"poison":true,"n":2}"#);
    assert_eq!(d.exchange.as_str(), "");
    assert_eq!(d.routing_key.as_str(), q);
    assert_eq!(
        header(&d, "x-original-routing-key").as_deref(),
        Some("test.p")
    );
    assert_eq!(header(&d, "x-original-exchange"), Some(format!("{q}-in")));
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("poison-2")
    );
    for k in ["x-error", "x-error-kind", "x-retry-count", "x-failed-at"] {
        assert!(
            header(&d, k).is_none() && int_header(&d, k).is_none(),
            "{k} stripped"
        );
    }
    // The original's properties and its own headers, as first published (design §3).
    let p = &d.properties;
    let text = |v: &Option<framework::lapin::types::ShortString>| {
        v.as_ref().map(|s| s.as_str().to_string())
    };
    assert_eq!(text(p.correlation_id()).as_deref(), Some("corr-2"));
    assert_eq!(*p.timestamp(), Some(1_700_000_002));
    assert_eq!(text(p.app_id()).as_deref(), Some("producer"));
    assert_eq!(text(p.kind()).as_deref(), Some("kind-2"));
    assert_eq!(header(&d, "x-producer-trace").as_deref(), Some("t-2"));

    // One `dlq` command at a time: one that runs (here a connection holding its lock, as a
    // paced replay holds the dead letters it passed) makes another fail, not purge or list
    // a fraction and report success. The lock goes with its connection.
    {
        let (holder, ch) = test_channel().await;
        ch.queue_declare(
            format!("{q}-dlq.lock").as_str().into(),
            framework::lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("the lock");
        for args in [&["dlq", "purge", "--yes"][..], &["dlq", "list"]] {
            let o = cmd(args);
            assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
            assert!(
                stderr(&o).contains("another `dlq` command"),
                "{}",
                stderr(&o)
            );
        }
        // A script reading `replay --json` learns the run failed, and how far it got.
        let o = cmd(&["dlq", "replay", "--all", "--json"]);
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout).to_string();
        let last: serde_json::Value = out
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_else(|| panic!("a summary line: {out}"));
        assert_eq!(last["summary"]["moved"], 0, "{out}");
        assert!(
            last["summary"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("another `dlq` command")),
            "{out}"
        );
        await_ready_count(&hs.ch, &format!("{q}-dlq"), 1).await;
        let _ = holder.close(200, "done".into()).await;
    }

    let o = cmd(&["dlq", "purge"]);
    assert_eq!(o.status.code(), Some(2), "purge without --yes is refused");
    await_ready_count(&hs.ch, &format!("{q}-dlq"), 1).await;
    let o = cmd(&["dlq", "purge", "--yes"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(ready_count(&hs.ch, &format!("{q}-dlq")).await, 0);
    let o = cmd(&["dlq", "replay"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "replay needs --all or --message-id"
    );
    // Saying so, both ways (clap's own check named only --all).
    assert!(
        stderr(&o).contains("--all or --message-id"),
        "{}",
        stderr(&o)
    );
}

#[tokio::test]
async fn the_amqp_password_never_shows_in_logs_metrics_or_dead_letters() {
    let user = unique("user");
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let _user = admin::Admin::suite().add_user(&user, &password).await;
    let q = unique("secret");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let dir = tempfile::tempdir().unwrap();
    let url = with_credentials(&amqp_url(), &user, &password);
    let port = framework::testing::broker::free_port();
    let cmd = |args: &[&str]| {
        let mut c = echo_cmd(&q, dir.path());
        c.env("STORAGETIER__AMQP__URL", &url)
            .env("STORAGETIER__LOG__LEVEL", "trace")
            .env(
                "STORAGETIER__ECHO__HTTP_LISTEN",
                format!("127.0.0.1:{port}"),
            )
            .args(args);
        c
    };
    let o = run(&mut cmd(&["declare"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let log = dir.path().join("service.log");
    let mut child = process::spawn(
        cmd(&["run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    )
    .unwrap();
    let (_c, ch) = test_channel().await;
    let mut dlq = consume(&ch, &format!("{q}-dlq")).await;
    publish(
        &ch,
        &format!("{q}-in"),
        "k",
        b"not json",
        BasicProperties::default(),
    )
    .await;
    let d = next(&mut dlq).await;
    let headers = format!("{:?}", d.properties.headers());
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let check = run(&mut cmd(&["check-config"]));
    assert_eq!(child.terminate(WAIT).and_then(|s| s.code()), Some(0));
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(
        logs.contains(&user),
        "the logs did run at trace level with this user"
    );
    for (what, text) in [
        ("logs", logs.as_str()),
        ("dead-letter headers", headers.as_str()),
        ("metrics", metrics.as_str()),
        ("check-config", &String::from_utf8_lossy(&check.stdout)),
    ] {
        assert!(!text.contains(&password), "the password leaked into {what}");
    }
}

/// A service that never reaches its broker still says so in its metrics: the
/// `storagetier_connected` gauge is 0 (not absent, which no `== 0` alert matches) and the
/// recoveries counter exists at 0; failed connection attempts are not counted as
/// recoveries (one broker restart would otherwise look like flapping).
#[tokio::test]
async fn a_service_that_cannot_connect_reports_it_in_its_metrics() {
    use framework::testing::broker::free_port;
    let dir = tempfile::tempdir().unwrap();
    let q = unique("never");
    let http = free_port();
    let mut c = echo_cmd(&q, dir.path());
    c.env(
        "STORAGETIER__AMQP__URL",
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
    )
    .env("STORAGETIER__AMQP__RECONNECT_INITIAL_MS", "50")
    .env("STORAGETIER__AMQP__RECONNECT_MAX_MS", "100")
    .env(
        "STORAGETIER__ECHO__HTTP_LISTEN",
        format!("127.0.0.1:{http}"),
    )
    .env("STORAGETIER__LOG__LEVEL", "warn")
    .arg("run")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    let mut svc = process::spawn(&mut c).expect("echo runs");
    // Three failed attempts logged first: none of them may count as a recovery.
    let stderr = svc.take_stderr().expect("stderr");
    let attempts = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("cannot reach the broker"))
            .take(3)
            .count()
    });
    let attempts = tokio::time::timeout(WAIT, attempts)
        .await
        .expect("three failed attempts in time")
        .unwrap();
    assert_eq!(attempts, 3);
    // Its stderr is closed now (the reader above stopped): it goes on logging into it.
    await_metric(http, "storagetier_connected 0").await;
    // Which release it runs, and since when (a restart loop shows as changes of it).
    await_metric(
        http,
        &format!(
            "storagetier_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ),
    )
    .await;
    await_metric(http, "\nstoragetier_start_time_seconds 1").await;
    await_metric(
        http,
        &format!("storagetier_reconnects_total{{queue=\"{q}\"}} 0"),
    )
    .await;
    let ready = reqwest::get(format!("http://127.0.0.1:{http}/readyz")).await;
    assert!(
        svc.is_running(),
        "the service went on with its stderr closed"
    );
    assert_eq!(ready.expect("/readyz answers").status(), 503);
}

/// An echo service's topology declared by its own `declare` on a queue of its own, with
/// the config dir it runs with and a consumer of its output; removed when dropped.
struct Declared {
    dir: tempfile::TempDir,
    q: String,
    ch: framework::lapin::Channel,
    out: framework::lapin::Consumer,
    _conn: framework::lapin::Connection,
    _gone: Cleanup,
}

async fn declared(prefix: &str) -> Declared {
    let dir = tempfile::tempdir().unwrap();
    let q = unique(prefix);
    let _gone = Cleanup::service(&q, &[200, 400]);
    let done = run(echo_cmd(&q, dir.path()).arg("declare"));
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
    let (_conn, ch) = test_channel().await;
    let out = watch(&ch, &format!("{q}-out"), "#").await;
    Declared {
        dir,
        q,
        ch,
        out,
        _conn,
        _gone,
    }
}

/// A producer's message whose header nests arrays 25,000 deep (what fits in one 128 KiB
/// frame) aborted the service (the AMQP client's frame parser overflowed its thread's
/// stack), and every instance it was redelivered to after: it is dead-lettered without
/// its headers, and the service goes on.
#[tokio::test]
async fn a_header_nested_deeper_than_any_stack_does_not_kill_the_service() {
    // Bound, not `..`: the connection and the clean-up live to the end of the test.
    let Declared {
        dir,
        q,
        ch,
        mut out,
        _conn,
        _gone,
    } = declared("deephdr").await;
    let mut child = process::spawn(
        echo_cmd(&q, dir.path())
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .expect("echo runs");
    let depth = 25_000;
    let headers = format!("{{\"deep\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
    assert!(
        framework::testing::admin::Admin::suite()
            .publish_raw_headers(&format!("{q}-in"), "k.deep", &headers, "{}")
            .await,
        "routed to the service's queue"
    );
    await_ready_count(&ch, &format!("{q}-dlq"), 1).await;
    assert!(child.is_running(), "the service is still running");
    publish(
        &ch,
        &format!("{q}-in"),
        "k.after",
        br#"{"n":1}"#,
        BasicProperties::default(),
    )
    .await;
    let d = next(&mut out).await;
    let v: serde_json::Value = serde_json::from_slice(&d.data).expect("json output");
    assert_eq!(v["n"], 1, "the next message handled");
    assert_eq!(child.terminate(WAIT).and_then(|s| s.code()), Some(0));
}

/// A log reader that stops reading (a collector behind, Docker's blocking log delivery)
/// leaves stderr a full pipe: the runtime's threads blocked writing to it, and with them
/// every message, the health endpoints and the stop on SIGTERM. Lines that do not fit are
/// dropped now, counted in `storagetier_log_lines_dropped_total`, and the service goes on.
#[tokio::test]
async fn a_full_log_pipe_does_not_stop_the_service() {
    let Declared {
        dir,
        q,
        ch,
        mut out,
        _conn,
        _gone,
    } = declared("fullpipe").await;
    let http = framework::testing::broker::free_port();
    let mut child = process::spawn(
        echo_cmd(&q, dir.path())
            // Trace: the client's lines for every frame, many times the buffer's 16,384
            // lines over the run.
            .env("STORAGETIER__LOG__LEVEL", "trace")
            .env(
                "STORAGETIER__ECHO__HTTP_LISTEN",
                format!("127.0.0.1:{http}"),
            )
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .expect("echo runs");
    // Held open and never read: the pipe (64 KiB) fills within the first few hundred
    // messages' debug lines.
    let _unread = child.take_stderr();
    let n = 1500;
    for i in 0..n {
        publish(
            &ch,
            &format!("{q}-in"),
            "k.log",
            format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(200)).as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    for _ in 0..n {
        next(&mut out).await;
    }
    let metrics = reqwest::get(format!("http://127.0.0.1:{http}/metrics"))
        .await
        .expect("/metrics answers")
        .text()
        .await
        .unwrap_or_default();
    let dropped = metrics
        .lines()
        .find_map(|l| l.strip_prefix("storagetier_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(dropped.is_some_and(|n| n > 0), "{dropped:?} in:\n{metrics}");
    assert_eq!(child.terminate(WAIT).and_then(|s| s.code()), Some(0));
}

/// `[log] format = "json"`: one JSON object per line, and what a message causes is logged
/// in its span, which names the queue, routing key, message id and attempt (design §6).
#[tokio::test]
async fn json_logs_carry_each_message_span() {
    let dir = tempfile::tempdir().unwrap();
    let q = unique("jsonlog");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let declared = run(echo_cmd(&q, dir.path()).arg("declare"));
    assert_eq!(declared.status.code(), Some(0), "{}", stderr(&declared));
    let (_c, ch) = test_channel().await;
    publish(
        &ch,
        &format!("{q}-in"),
        "k.log",
        b"not json",
        BasicProperties::default().with_message_id("log-1".into()),
    )
    .await;
    // A processor's panic quoting its input, which tries to forge a log line.
    publish(
        &ch,
        &format!("{q}-in"),
        "k.panic",
        br#""x\n{\"level\":\"ERROR\",\"forged\":1}""#,
        BasicProperties::default().with_message_id("log-2".into()),
    )
    .await;
    // A retry coming back from its tier (through the default exchange, to Q): its span
    // names its attempt and the key it was first published with, not the tier's.
    let mut retried = framework::lapin::types::FieldTable::default();
    framework::headers::set_int(&mut retried, framework::headers::RETRY_COUNT, 2);
    framework::headers::set_str(
        &mut retried,
        framework::headers::ORIGINAL_ROUTING_KEY,
        "k.orig",
    );
    publish(
        &ch,
        "",
        &q,
        b"not json either",
        BasicProperties::default()
            .with_message_id("log-3".into())
            .with_headers(retried),
    )
    .await;
    // At `warn` (an operator cutting the noise): the dead-lettering and the panic are
    // still in their messages' spans.
    let mut child = process::spawn(
        echo_cmd(&q, dir.path())
            .env("STORAGETIER__LOG__FORMAT", "json")
            .env("STORAGETIER__LOG__LEVEL", "warn")
            .env("STORAGETIER__ECHO__PANIC_KEY", "k.panic")
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    )
    .expect("echo runs");
    await_ready_count(&ch, &format!("{q}-dlq"), 3).await;
    assert_eq!(child.terminate(WAIT).and_then(|s| s.code()), Some(0));
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.take_stderr().expect("stderr"), &mut log)
        .expect("read the log");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let in_span = lines
        .iter()
        .find(|l| l["span"]["message_id"] == "log-1")
        .unwrap_or_else(|| panic!("no line in the message's span:\n{log}"));
    let span = &in_span["span"];
    assert_eq!(span["queue"], q.as_str(), "{span}");
    assert_eq!(span["routing_key"], "k.log", "{span}");
    assert_eq!(span["attempt"], 0, "{span}");
    assert!(in_span["level"].is_string() && in_span["fields"].is_object());
    let again = lines
        .iter()
        .find(|l| l["span"]["message_id"] == "log-3")
        .unwrap_or_else(|| panic!("no line in the retried message's span:\n{log}"));
    assert_eq!(again["span"]["attempt"], 2, "{again}");
    assert_eq!(again["span"]["routing_key"], "k.orig", "{again}");
    // The panic is a log event in its message's span, its text kept inside a field.
    assert!(
        lines.iter().all(|l| l.get("forged").is_none()),
        "a forged line:\n{log}"
    );
    let panicked = lines
        .iter()
        .find(|l| l["span"]["message_id"] == "log-2" && l["fields"]["panic"].is_string())
        .unwrap_or_else(|| panic!("no panic event in the message's span:\n{log}"));
    assert!(
        panicked["fields"]["panic"]
            .as_str()
            .is_some_and(|p| p.contains("forged")),
        "{panicked}"
    );
}

/// With span export on, `storagetier_spans_dropped_total` is there at 0 from the start: an
/// alert on its increase sees the first spans lost, not only those after.
#[tokio::test]
async fn the_spans_dropped_counter_starts_at_0() {
    let Declared {
        dir,
        q,
        _conn,
        _gone,
        ..
    } = declared("spans0").await;
    let port = framework::testing::broker::free_port();
    let collector = format!(
        "http://127.0.0.1:{}",
        framework::testing::broker::free_port()
    );
    let mut child = process::spawn(
        echo_cmd(&q, dir.path())
            .env("STORAGETIER__TELEMETRY__OTLP_ENDPOINT", collector)
            .env(
                "STORAGETIER__ECHO__HTTP_LISTEN",
                format!("127.0.0.1:{port}"),
            )
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )
    .unwrap();
    await_metric(port, "\nstoragetier_spans_dropped_total 0\n").await;
    assert_eq!(child.terminate(WAIT).and_then(|s| s.code()), Some(0));
}

/// A service raises its soft limit of open files to the hard one: started with the 1,024
/// most hosts set as the soft default (here 64), a busy service ran out of descriptors
/// while the hard limit allowed far more.
#[tokio::test]
async fn a_service_raises_its_open_files_limit_to_the_hard_one() {
    let Declared {
        dir,
        q,
        _conn,
        _gone,
        ..
    } = declared("nofile").await;
    let port = framework::testing::broker::free_port();
    let mut cmd = echo_cmd(&q, dir.path());
    cmd.env(
        "STORAGETIER__ECHO__HTTP_LISTEN",
        format!("127.0.0.1:{port}"),
    )
    .arg("run")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes only the one struct given.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) }, 0);
    let hard = now.rlim_max.min(4096);
    let low = libc::rlimit {
        rlim_cur: 64,
        rlim_max: hard,
    };
    // SAFETY: setrlimit is async-signal-safe and reads only the copied struct.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &low) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = process::spawn(&mut cmd).unwrap();
    await_metric(port, "storagetier_connected 1\n").await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open files line");
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    let hard = hard.to_string();
    assert_eq!(numbers, [hard.as_str(), hard.as_str()], "{line}");
    assert_eq!(child.terminate(WAIT).and_then(|s| s.code()), Some(0));
}

/// A producer's exchange that exists as another type than topic is not a conflict (it is
/// the producer's), but the queue's pattern bindings would match nothing on a direct
/// exchange: `declare` says so instead of binding without a word.
#[tokio::test]
async fn a_producer_exchange_of_another_type_is_warned_about() {
    let q = unique("direct");
    let _gone = Cleanup::new(vec![], vec![format!("{q}-in")]);
    let _topology = Cleanup::service(&q, &[200, 400]);
    let (_c, ch) = test_channel().await;
    ch.exchange_declare(
        format!("{q}-in").as_str().into(),
        framework::lapin::ExchangeKind::Direct,
        framework::lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        framework::lapin::types::FieldTable::default(),
    )
    .await
    .expect("the producer's direct exchange");
    let dir = tempfile::tempdir().unwrap();
    let o = run(echo_cmd(&q, dir.path()).arg("declare"));
    assert_eq!(o.status.code(), Some(0), "not a conflict: {}", stderr(&o));
    assert!(
        stderr(&o).contains("not a topic exchange"),
        "{}",
        stderr(&o)
    );
}

/// A vhost sized to the service's own queues (`max-queues`): the `dlq` commands still run
/// (their lock queue has no room: warned, unguarded), and a queue more than the limit is a
/// limit reached, named as such — not a "topology conflict" to delete queues over.
#[tokio::test]
async fn a_vhost_at_its_queue_limit_is_named_and_still_runs_dlq_commands() {
    let vhost = unique("limited");
    // Q, its two retry tiers and Q-dlq.
    let _vhost = admin::Admin::suite().add_vhost_limited(&vhost, 4).await;
    let mut url = url::Url::parse(&amqp_url()).expect("suite URL");
    url.set_path(&format!("/{vhost}"));
    let q = unique("limited");
    let dir = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = echo_cmd(&q, dir.path());
        c.env("STORAGETIER__AMQP__URL", url.as_str()).args(args);
        c
    };
    let o = run(&mut cmd(&["declare"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = run(&mut cmd(&["dlq", "list"]));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("queue limit"), "{}", stderr(&o));
    let o = run(cmd(&["declare"]).env("STORAGETIER__RETRY__DELAYS_MS", "200,400,800"));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let said = stderr(&o);
    assert!(
        said.contains("limit") && !said.contains("topology conflict"),
        "{said}"
    );
}

//! Connecting (design §5): a cluster's `[amqp] urls` tried in turn, every attempt bounded in
//! time, and `amqps://` with a private CA and a client certificate against a real TLS
//! listener (a private node, certificates made with openssl in the test).

use framework::lapin::BasicProperties;
use framework::testing::broker::{PrivateBroker, free_port};
use framework::testing::relay::Relay;
use framework::testing::*;
use framework::{MessageContext, Outcome};

fn echo() -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v))
}

/// A URL like the suite's broker's, on another port.
fn on_port(port: u16) -> String {
    let mut u = url::Url::parse(&amqp_url()).expect("suite URL");
    let _ = u.set_port(Some(port));
    u.to_string()
}

async fn round_trip(hs: &Harness) {
    let mut out = hs.watch_output().await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
}

/// A round trip, and another once the `bad` node (behind a relay counting connections) has
/// been tried and passed over. The first connect starts at a node picked at random, which
/// may be the good one: the service's connection (named `name`) is then closed by the
/// broker, and a lost node is left for another, so with two nodes the reconnect starts at
/// the bad one (again, should another test of this binary have moved the shared start).
async fn round_trips_through_both_nodes(hs: &Harness, name: &str, bad: &Relay) {
    round_trip(hs).await;
    for _ in 0..5 {
        if !bad.attempts().is_empty() {
            break;
        }
        let mut sessions = hs.status.sessions();
        let before = *sessions.borrow();
        assert!(
            close_connection_named(name).await >= 1,
            "found the connection"
        );
        tokio::time::timeout(WAIT, sessions.wait_for(|n| *n > before))
            .await
            .expect("reconnected")
            .expect("status kept");
    }
    assert!(!bad.attempts().is_empty(), "the bad node was tried");
    round_trip(hs).await;
}

#[tokio::test]
async fn the_nodes_of_a_cluster_are_tried_in_turn() {
    // The first node refuses connections (a node down on a host that is up); the second
    // is the suite's broker.
    let relay = Relay::start().await;
    relay.refuse();
    let dead = relay.url.clone();
    let urls = format!("[\"{dead}\", \"{}\"]", amqp_url());
    let name = unique("urls-conn");
    // `url` names the dead node too: `urls` is what is tried.
    let mut hs = Harness::start(
        "urls",
        &[
            ("amqp.urls", &urls),
            ("amqp.url", &dead),
            ("amqp.connection_name", &name),
            ("amqp.reconnect_initial_ms", "100"),
        ],
        echo(),
    )
    .await;
    round_trips_through_both_nodes(&hs, &name, &relay).await;
    hs.stop().await;
}

/// A credential rotated in the mounted secret of `[amqp] password_file` (and on the
/// broker) is used at the next reconnect: the password read at start was refused on every
/// node for ever, `/healthz` still 200, until someone restarted the service.
#[tokio::test]
async fn a_rotated_password_file_is_used_at_the_next_reconnect() {
    let admin = admin::Admin::suite();
    let user = unique("rotated");
    let _user = admin.add_user(&user, "first-password").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("password");
    std::fs::write(&secret, "first-password\n").expect("write the secret");
    let mut url = url::Url::parse(&amqp_url()).expect("suite URL");
    let _ = url.set_username(&user);
    let _ = url.set_password(None);
    let name = unique("rotated-conn");
    let mut hs = Harness::start(
        "rotated",
        &[
            ("amqp.url", url.as_str()),
            ("amqp.password_file", &secret.display().to_string()),
            ("amqp.connection_name", &name),
            ("amqp.reconnect_initial_ms", "100"),
        ],
        echo(),
    )
    .await;
    round_trip(&hs).await;

    admin.set_password(&user, "second-password").await;
    std::fs::write(&secret, "second-password\n").expect("rotate the secret");
    let mut sessions = hs.status.sessions();
    assert_eq!(
        close_connection_named(&name).await,
        1,
        "found the connection"
    );
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("reconnected with the rotated password")
        .expect("status kept");
    round_trip(&hs).await;
    hs.stop().await;
}

/// A node that accepts the connection but cannot run a session (here its user may not
/// declare anything; in production a minority partition or a node without quorum) is
/// passed over: the next connect starts at the next node instead of the same one forever.
#[tokio::test]
async fn a_node_that_connects_but_cannot_run_a_session_is_passed_over() {
    let user = unique("noconf");
    let _user = admin::Admin::suite()
        .add_user_configuring(&user, "pw", "^$")
        .await;
    let relay = Relay::start().await;
    let limited = with_credentials(&relay.url, &user, "pw");
    let urls = format!("[\"{limited}\", \"{}\"]", amqp_url());
    let name = unique("passover-conn");
    let mut hs = Harness::start(
        "passover",
        &[
            ("amqp.urls", &urls),
            ("amqp.url", &limited),
            ("amqp.connection_name", &name),
            ("amqp.reconnect_initial_ms", "100"),
            ("amqp.operation_timeout_ms", "3000"),
        ],
        echo(),
    )
    .await;
    round_trips_through_both_nodes(&hs, &name, &relay).await;
    hs.stop().await;
}

/// A locked-down production user (no `configure` permission) runs on the topology an
/// administrator declared: it could not re-declare any of it, and failed every session
/// with "the broker refuses the user or password". Where nothing is declared yet, it says
/// what is missing and who must declare it.
#[tokio::test]
async fn a_user_who_may_not_declare_runs_on_the_topology_an_administrator_declared() {
    let user = unique("locked");
    let _user = admin::Admin::suite()
        .add_user_configuring(&user, "pw", "^$")
        .await;
    let limited = with_credentials(&amqp_url(), &user, "pw");
    let q = unique("locked");
    // The administrator's declaration (a run as a user who may), then the service's own.
    let mut declared = Harness::start_with(config(&q, &[]), echo()).await;
    declared.stop().await;
    let mut hs = Harness::start_with(config(&q, &[("amqp.url", &limited)]), echo()).await;
    round_trip(&hs).await;
    hs.stop().await;

    let fresh = unique("locked-new");
    let cfg = config(&fresh, &[]);
    let topo = test_topology(&fresh, &cfg);
    let conn = framework::lapin::Connection::connect(&limited, Default::default())
        .await
        .expect("the user may connect");
    let e = topo
        .declare(&conn)
        .await
        .expect_err("nothing to run on, nothing it may declare");
    let text = e.to_string();
    assert!(
        matches!(e, framework::topology::DeclareError::NotDeclared { .. })
            && text.contains(&format!("`{fresh}-"))
            && text.contains("does not exist")
            && text.contains("administrator"),
        "{text}"
    );
    assert!(!e.is_conflict());
    // The `declare` command must declare, and so check, every object: refused, not "done".
    let e = declared
        .topology()
        .declare_all(&conn)
        .await
        .expect_err("this user may declare nothing");
    assert!(e.to_string().contains("ACCESS_REFUSED"), "{e}");
    let _ = conn.close(200, "done".into()).await;
}

/// A user who may configure only the service's own names cannot declare its retry tiers:
/// a queue that dead-letters (into the default exchange) takes `write` on `amq.default`,
/// which no doc or message named — the refusal sent operators looking for `configure`.
#[tokio::test]
async fn a_user_who_may_not_write_the_default_exchange_is_told_so() {
    let q = unique("noamqdefault");
    let user = unique("owner");
    let own = format!("^{q}.*");
    let _user = admin::Admin::suite()
        .add_user_with(&user, "pw", &own, &own)
        .await;
    let cfg = config(&q, &[]);
    let _gone = Cleanup::service(&q, &cfg.retry.delays_ms);
    let topo = test_topology(&q, &cfg);
    let conn = framework::lapin::Connection::connect(
        &with_credentials(&amqp_url(), &user, "pw"),
        Default::default(),
    )
    .await
    .expect("the user may connect");
    let e = topo
        .declare(&conn)
        .await
        .expect_err("a retry tier it may not declare");
    let text = e.to_string();
    assert!(
        text.contains("`write` permission on `amq.default`"),
        "{text}"
    );
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_node_that_never_answers_is_given_up_on_in_time() {
    // A listener that accepts and then says nothing: without a bound the connect would
    // wait forever and never try the next node.
    let silent = Relay::start().await;
    silent.lose_host();
    let urls = format!("[\"{}\", \"{}\"]", silent.url, amqp_url());
    let name = unique("silent-conn");
    let mut hs = Harness::start(
        "silent",
        &[
            ("amqp.urls", &urls),
            ("amqp.url", &silent.url),
            ("amqp.connection_name", &name),
            ("amqp.connect_timeout_ms", "1000"),
            ("amqp.reconnect_initial_ms", "100"),
        ],
        echo(),
    )
    .await;
    round_trips_through_both_nodes(&hs, &name, &silent).await;
    hs.stop().await;
}

/// A stop while connecting to a node that accepts and never answers ends at once: it
/// waited out the whole connect timeout (and that of every node of `urls` in turn) before
/// a SIGTERM took effect.
#[tokio::test]
async fn a_stop_while_connecting_to_a_silent_node_ends_at_once() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listener");
    let port = silent.local_addr().expect("addr").port();
    let q = unique("stopconnect");
    let cfg = config(
        &q,
        &[
            ("amqp.url", &on_port(port)),
            ("amqp.connect_timeout_ms", "600000"),
        ],
    );
    let service = Background::start(
        "stop-connect",
        &cfg,
        framework::ProcessorConfiguration::new(&format!("{q}-in"), "test.#", "test.out", echo()),
    );
    // Connecting: the listener has its connection, and says nothing back.
    let (_held, _) = tokio::time::timeout(WAIT, silent.accept())
        .await
        .expect("the service connects")
        .expect("accepted");
    tokio::time::timeout(std::time::Duration::from_secs(60), service.stop())
        .await
        .expect("stopped without waiting out the 10-minute connect timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_and_a_client_certificate() {
    let tls_port = free_port();
    let client = tempfile::tempdir().expect("client dir");
    let broker = PrivateBroker::start_with(|host, inner| {
        framework::testing::tls::make_certificates(host);
        for f in ["ca.pem", "client.pem", "client.key"] {
            std::fs::copy(host.join(f), client.path().join(f)).expect("client copy");
        }
        let p = |f: &str| inner.join(f).display().to_string();
        format!(
            "listeners.ssl.default = {tls_port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n",
            p("ca.pem"),
            p("server.pem"),
            p("server.key")
        )
    })
    .await;
    let c = |f: &str| client.path().join(f).display().to_string();
    let url = format!("amqps://guest:guest@localhost:{tls_port}/%2f");
    // The harness's own test channel talks plain AMQP to the same node.
    let q = unique("tls");
    let cfg = framework::testing::config(
        &q,
        &[
            ("amqp.url", &url),
            ("amqp.tls_ca_file", &c("ca.pem")),
            ("amqp.tls_cert_file", &c("client.pem")),
            ("amqp.tls_key_file", &c("client.key")),
        ],
    );
    let service = Background::start(
        "tls",
        &cfg,
        framework::ProcessorConfiguration::new(&format!("{q}-in"), "test.#", "test.out", echo()),
    );
    let status = service.status.clone();
    wait_until("consuming over TLS", || status.is_ready()).await;
    // Published over plain AMQP to the same node, processed by the TLS-connected service.
    let (conn, ch) = broker.channel().await.expect("plain channel");
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    publish(
        &ch,
        &format!("{q}-in"),
        "test.x",
        br#"{"tls":1}"#,
        Default::default(),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"tls":1}"#);
    service.stop().await;
    drop(conn);

    // Without the client certificate the broker refuses the connection.
    let no_cert = framework::testing::config(
        &q,
        &[("amqp.url", &url), ("amqp.tls_ca_file", &c("ca.pem"))],
    );
    assert!(
        framework::runtime::connect(&no_cert.amqp, "tls")
            .await
            .is_err(),
        "mutual TLS is enforced"
    );
    // Without the private CA the client refuses the broker's certificate.
    let no_ca = framework::testing::config(&q, &[("amqp.url", &url)]);
    assert!(
        framework::runtime::connect(&no_ca.amqp, "tls")
            .await
            .is_err()
    );
}

/// A retry the broker refuses (the service's user may not publish to `Q-retry`: a
/// permission, like a full tier or a user's channel limit, that a new session would not
/// change) is held and published again until the broker takes it, within the same session:
/// the processor is not run again for the same attempt (what it did would be done twice),
/// and no new session is started per message (which skipped the pause and reported an
/// incomplete topology).
#[tokio::test]
async fn a_refused_retry_is_held_and_published_again_within_its_session() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let q = unique("refused");
    let user = unique("nowrite");
    let admin = admin::Admin::suite();
    let _user = admin
        .add_user_with(&user, "pw", ".*", &format!("^(?!{q}-retry$).*"))
        .await;
    let limited = with_credentials(&amqp_url(), &user, "pw");
    let calls = Arc::new(AtomicUsize::new(0));
    let handled = calls.clone();
    let p = FnProcessor(move |v: serde_json::Value, ctx: &MessageContext| {
        handled.fetch_add(1, SeqCst);
        if ctx.attempt == 0 {
            Outcome::retry("not yet")
        } else {
            Outcome::success(v)
        }
    });
    // Counters recorded from the first session on (the refusals are awaited by them).
    let _recorder = framework::telemetry::metrics_handle();
    let mut hs = Harness::start_with(config(&q, &[("amqp.url", &limited)]), p).await;
    let mut out = hs.watch_output().await;
    let sessions = hs.status.sessions();
    let first = *sessions.borrow();
    hs.publish("test.r", br#"{"n":1}"#, BasicProperties::default())
        .await;
    // Refused twice: the retry, then its first publish again while held.
    let deadline = tokio::time::Instant::now() + WAIT;
    while counted(
        "storagetier_publish_failures_total",
        &[("queue", q.as_str())],
    ) < 2
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry was refused"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(calls.load(SeqCst), 1, "held, not handled again");
    // The refusal lifted: the held retry goes out, and its attempt succeeds.
    admin.set_permissions(&user, ".*", ".*").await;
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
    assert_eq!(calls.load(SeqCst), 2, "attempt 0 once, then its retry");
    assert_eq!(*sessions.borrow(), first, "no new session for a refusal");
    hs.stop().await;
}

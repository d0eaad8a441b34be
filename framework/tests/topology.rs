//! A service declares what it owns, and only that (design §2): its extra exchanges on every
//! (re)connect; the producers' exchanges only checked, created only with `declare_sources`,
//! and never a conflict because of their flags.

use framework::lapin::options::ExchangeDeclareOptions;
use framework::lapin::types::FieldTable;
use framework::lapin::{Connection, ExchangeKind};
use framework::testing::*;
use framework::{Binding, MessageContext, Outcome, ProcessorConfiguration};

fn echo() -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v))
}

/// Declares `exchange` as its producer would: a durable topic exchange.
async fn declare_durable_topic(ch: &framework::lapin::Channel, exchange: &str) {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("the producer declares its exchange");
}

/// True if `exchange` exists (a passive declare on a channel of its own).
async fn exists(conn: &Connection, exchange: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn exchanges_a_service_publishes_to_are_declared_on_every_connect() {
    let q = unique("owns");
    let side = format!("{q}-side");
    let name = unique("conn");
    let cfg = config(&q, &[("amqp.connection_name", &name)]);
    let _gone = Cleanup::new(vec![], vec![side.clone()]);
    let pc = ProcessorConfiguration {
        binding: Binding {
            exchange: format!("{q}-in"),
            routing_keys: vec!["test.#".into()],
            output_routing_key: "test.out".into(),
            publishes_to: vec![side.clone()],
            ..Default::default()
        },
        processor: echo(),
    };
    let mut hs = Harness::start_pc("owner", cfg, pc).await;
    assert!(exists(&hs.conn, &side).await, "declared at start");
    hs.ch
        .exchange_delete(side.as_str().into(), Default::default())
        .await
        .expect("delete");
    assert!(!exists(&hs.conn, &side).await);
    let mut sessions = hs.status.sessions();
    assert_eq!(close_connection_named(&name).await, 1);
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("reconnected")
        .expect("status alive");
    assert!(exists(&hs.conn, &side).await, "declared again on reconnect");
    hs.stop().await;
}

/// Its output exchange deleted while it runs: the next success finds it gone (the
/// broker closes the publishing channel, 404) and the service declares its topology again
/// at once, instead of turning every success into a retry until it reconnects.
#[tokio::test]
async fn an_own_exchange_deleted_while_running_is_declared_again() {
    let mut hs = Harness::start("regone", &[("retry.delays_ms", "[600000]")], echo()).await;
    let mut sessions = hs.status.sessions();
    let out = hs.output_exchange.clone();
    hs.ch
        .exchange_delete(out.as_str().into(), Default::default())
        .await
        .expect("delete");
    assert!(!exists(&hs.conn, &out).await);
    hs.publish(
        "test.gone",
        br#"{"n":1}"#,
        framework::lapin::BasicProperties::default(),
    )
    .await;
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("a new session")
        .expect("status alive");
    assert!(exists(&hs.conn, &out).await, "declared again");
    // Its message waits in a retry tier (far longer than the test), not lost.
    await_ready_count(&hs.ch, &format!("{}-retry-600000", hs.q), 1).await;
    hs.stop().await;
}

/// A producer's exchange deleted and declared again while the service runs (a redeploy,
/// an operator's cleanup) has lost the queue's binding: the service binds it again
/// (`[amqp] rebind_interval_ms`) instead of letting every message to it reach nothing
/// until its next reconnect.
#[tokio::test]
async fn a_producer_exchange_declared_again_is_bound_again() {
    let mut hs = Harness::start("rebind", &[("amqp.rebind_interval_ms", "200")], echo()).await;
    let mut out = hs.watch_output().await;
    let input = hs.input_exchange.clone();
    hs.ch
        .exchange_delete(input.as_str().into(), Default::default())
        .await
        .expect("delete");
    declare_durable_topic(&hs.ch, &input).await;
    // Published mandatory until routed: the broker returns it while no queue is bound.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let confirm = hs
            .ch
            .basic_publish(
                input.as_str().into(),
                "test.again".into(),
                framework::lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                br#"{"n":2}"#,
                Default::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        if confirm.take_message().is_none() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue was never bound again to its producer's exchange"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(next(&mut out).await.data, br#"{"n":2}"#);
    hs.stop().await;
}

#[tokio::test]
async fn a_producer_exchange_with_other_flags_is_not_a_conflict() {
    let q = unique("flags");
    let (conn, ch) = test_channel().await;
    // The producer declared its exchange its own way (not durable, auto-delete).
    ch.exchange_declare(
        format!("{q}-in").as_str().into(),
        ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: false,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("producer's exchange");
    let mut hs = Harness::start_with(config(&q, &[]), echo()).await;
    assert!(hs.status.is_ready(), "consuming despite the other flags");
    let mut out = hs.watch_output().await;
    hs.publish("test.x", br#"{"n":1}"#, Default::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
    hs.stop().await;
    drop(conn);
}

#[tokio::test]
async fn without_declare_sources_a_missing_producer_exchange_is_waited_for() {
    let q = unique("nosrc");
    let input = format!("{q}-in");
    let cfg = config(&q, &[("amqp.declare_sources", "false")]);
    let _gone = Cleanup::service(&q, &cfg.retry.delays_ms.clone());
    let pc = ProcessorConfiguration {
        binding: Binding {
            exchange: input.clone(),
            routing_keys: vec!["test.#".into()],
            output_routing_key: "test.out".into(),
            publishes_to: Vec::new(),
            ..Default::default()
        },
        processor: echo(),
    };
    let service = Background::start("nosrc", &cfg, pc);
    let status = service.status.clone();
    let (conn, ch) = test_channel().await;
    // It has tried: its own exchanges, queues and the bindings among them are declared
    // before the producers' are checked (`declare` before the producers exist makes all
    // but the bindings to them).
    let fail = format!("{q}-fail");
    let deadline = tokio::time::Instant::now() + WAIT;
    let tier = format!("{q}-retry-{}", cfg.retry.delays_ms[0]);
    while !exists(&conn, &fail).await
        || !queue_exists(&conn, &q).await
        || !queue_exists(&conn, &tier).await
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the service never declared its topology"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // A dead letter published meanwhile reaches `Q-dlq`: its binding is made too (the
    // bindings follow the queues, so a first publish may come just before it).
    let dlq = format!("{q}-dlq");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        ch.basic_publish(
            fail.as_str().into(),
            "test.k".into(),
            Default::default(),
            b"{}",
            Default::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if framework::dlq::count(&ch, &dlq).await.unwrap_or(0) > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no dead letter reached {dlq}: Q-dlq is not bound to Q-fail"
        );
    }
    // It keeps trying (reconnect backoff 100 ms .. 1 s) but never creates the exchange.
    for _ in 0..20 {
        assert!(!status.is_ready(), "not consuming without its producer");
        assert!(
            !exists(&conn, &input).await,
            "the producer's exchange was not created"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The producer comes up: the service binds to it and consumes.
    declare_durable_topic(&ch, &input).await;
    wait_until("the service to consume", || status.is_ready()).await;
    service.stop().await;
}

/// True if `queue` exists (a passive declare on a channel of its own).
async fn queue_exists(conn: &Connection, queue: &str) -> bool {
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        framework::lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_ok()
}

/// The retry tiers and `Q-dlq` have no consumer: a policy's `expires` (or an operator's
/// delete) takes them while the session runs, and nothing else would notice until a retry
/// or dead letter found no queue. The queue watcher declares them again.
#[tokio::test]
async fn own_queues_deleted_while_running_are_declared_again() {
    let p = FnProcessor(|_v: serde_json::Value, _ctx: &MessageContext| Outcome::permanent("bad"));
    let mut hs = Harness::start(
        "qgone",
        &[
            ("amqp.queue_metrics_interval_ms", "200"),
            ("retry.delays_ms", "[600000]"),
        ],
        p,
    )
    .await;
    let sessions = hs.status.sessions();
    let first_session = *sessions.borrow();
    let gone = [format!("{}-dlq", hs.q), format!("{}-retry-600000", hs.q)];
    for q in &gone {
        hs.ch
            .queue_delete(q.as_str().into(), Default::default())
            .await
            .expect("delete");
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    for q in &gone {
        while !queue_exists(&hs.conn, q).await {
            assert!(tokio::time::Instant::now() < deadline, "{q} declared again");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    assert_eq!(*sessions.borrow(), first_session, "without a new session");
    hs.publish(
        "test.gone",
        br#"{"n":1}"#,
        framework::lapin::BasicProperties::default(),
    )
    .await;
    await_ready_count(&hs.ch, &gone[0], 1).await;
    hs.stop().await;
}

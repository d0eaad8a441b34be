//! A handler that runs longer than the broker's consumer (acknowledgement) timeout — a
//! 200 GiB archive copy outlasts the default 30 min — must complete once, not be cut off
//! and redelivered in a loop. The framework declares `Q` with `x-consumer-timeout`
//! (`[amqp] consumer_timeout_ms`), which RabbitMQ 4.0 reads from the queue (it ignores the
//! per-consumer argument, also sent, that 3.12–3.13 read); RabbitMQ 3.10 and 3.11 ignore
//! both (their `consumer_timeout` must be raised in rabbitmq.conf, see README), so this
//! test can only hold on 3.12 and later, as its name says.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use framework::testing::broker::PrivateBroker;
use framework::testing::*;
use framework::{MessageContext, MessageProcessor, Outcome, async_trait};

/// Takes longer than the node's consumer timeout, then succeeds; counts its calls.
struct Slow(Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for Slow {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(6)).await;
        Outcome::success(v)
    }
}

/// Never returns (a hung share, a processor's bug).
struct Hung(Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for Hung {
    type Input = serde_json::Value;
    async fn handle(&self, _v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::pending::<()>().await;
        Outcome::success(serde_json::Value::Null)
    }
}

/// A handler that never returns is stopped just before the consumer timeout declared on
/// `Q` and its message retried, counted: RabbitMQ 4.3 takes a timed-out delivery back
/// without counting it toward the delivery limit, so it came back to hang again for ever
/// (3.10 ignores the queue's timeout and 4.0 takes the message back at it: neither ends it
/// within this test either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_that_never_returns_is_retried_before_the_consumer_timeout() {
    let mut cfg = config(&unique("hung"), &[("retry.max_attempts", "1")]);
    // Below the 60 s a configuration may set (a test's own budget): the deadline is about
    // 13 s (a third of it kept for the retry's publish).
    cfg.amqp.consumer_timeout_ms = 20_000;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut hs = Harness::start_with(cfg, Hung(calls.clone())).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.x", br#"{"stuck":1}"#, Default::default())
        .await;
    let dead = next(&mut dlq).await;
    let why = header(&dead, framework::headers::ERROR).unwrap_or_default();
    assert!(why.contains("without an outcome"), "{why}");
    // Settled: left unacknowledged, the broker would take the message back at 20 s and
    // hand it to the hung handler again.
    assert!(
        framework::testing::admin::Admin::suite()
            .await_settled(&hs.q)
            .await,
        "the stopped handler's message acknowledged"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "handled once, not again");
    hs.stop().await;
}

/// Keeps its place and never returns at `m1`'s first delivery (an ordered processor
/// waiting out an outage it does not bound itself); succeeds otherwise. Records the ids
/// it was handed, in order.
struct HungInPlace(Arc<std::sync::Mutex<Vec<String>>>);

#[async_trait]
impl MessageProcessor for HungInPlace {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let first = {
            let mut seen = self.0.lock().expect("calls");
            let first = !seen.contains(&id);
            seen.push(id.clone());
            first
        };
        if first && id == "m1" {
            ctx.keep_place();
            std::future::pending::<()>().await;
        }
        Outcome::success(v)
    }
}

/// A handler that keeps its message's place (event-forwarder's ordered mode) and is still
/// running at its deadline is given back in its place, not retried behind the messages
/// after it: handed out again before the next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_keeping_its_place_is_given_back_in_its_place_at_its_deadline() {
    let mut cfg = config(
        &unique("hung-in-place"),
        &[("amqp.prefetch", "1"), ("amqp.concurrency", "1")],
    );
    // The deadline about 13 s after the delivery (see above).
    cfg.amqp.consumer_timeout_ms = 20_000;
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut hs = Harness::start_with(cfg, HungInPlace(calls.clone())).await;
    let mut out = hs.watch_output().await;
    for id in ["m1", "m2"] {
        hs.publish(
            "test.x",
            format!(r#"{{"id":"{id}"}}"#).as_bytes(),
            Default::default(),
        )
        .await;
    }
    for id in ["m1", "m2"] {
        let o: serde_json::Value =
            serde_json::from_slice(&next(&mut out).await.data).expect("JSON");
        assert_eq!(o["id"], id, "in the queue's order");
    }
    assert_eq!(
        *calls.lock().expect("calls"),
        ["m1", "m1", "m2"],
        "given back in its place, not retried behind m2"
    );
    hs.stop().await;
}

/// A private node that gives up on an unacked delivery after `ms`, checked every second.
async fn node_with_consumer_timeout(ms: u64) -> PrivateBroker {
    PrivateBroker::start_with(move |host, _| {
        std::fs::write(
            host.join("advanced.config"),
            "[{rabbit, [{channel_tick_interval, 1000}]}].\n",
        )
        .expect("advanced.config");
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(
            host.join("advanced.config"),
            std::fs::Permissions::from_mode(0o644),
        );
        format!("consumer_timeout = {ms}\n")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_longer_than_the_consumer_timeout_completes_once_on_rabbitmq_3_12_and_later() {
    let broker = node_with_consumer_timeout(1000).await;
    let version = broker.version();
    if version < (3, 12) {
        println!("RabbitMQ {version:?} ignores x-consumer-timeout: not applicable");
        return;
    }
    let q = unique("slow");
    let cfg = config(
        &q,
        &[
            ("amqp.url", &broker.url()),
            ("amqp.consumer_timeout_ms", "300000"),
            ("amqp.drain_timeout_ms", "1000"),
        ],
    );
    let calls = Arc::new(AtomicUsize::new(0));
    let service = Background::start(
        "slow",
        &cfg,
        framework::ProcessorConfiguration::new(
            &format!("{q}-in"),
            "test.#",
            "test.out",
            Slow(calls.clone()),
        ),
    );
    let status = service.status.clone();
    wait_until("consuming", || status.is_ready()).await;
    let (_conn, ch) = broker.channel().await.expect("channel");
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    publish(
        &ch,
        &format!("{q}-in"),
        "test.x",
        br#"{"big":1}"#,
        Default::default(),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"big":1}"#);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "handled once, never cut off"
    );
    service.stop().await;
    // Acknowledged once, not held unsettled (a ready count reads 0 either way).
    assert!(broker.await_settled(&q).await, "the input settled");
}

/// A paced, filtered replay holds the dead letters it passes over (so that each look
/// fetches the next one): held longer than the node's consumer timeout, the broker took
/// the channel and the replay ended halfway with a broker error. It stops before that,
/// hands them back, and says to run it again; run again until done, it replays every
/// match once and keeps the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_filtered_replay_stops_before_the_consumer_timeout_and_goes_on_when_run_again() {
    use framework::dlq::{self, DlqError, Filter};
    use framework::lapin::BasicProperties;
    use framework::lapin::options::QueueDeclareOptions;
    use framework::lapin::types::{AMQPValue, FieldTable};
    let broker = node_with_consumer_timeout(3000).await;
    let q = unique("replay-held");
    let cfg = config(&q, &[("amqp.url", &broker.url())]);
    let topo = framework::topology::Topology::new(
        &q,
        &format!("{q}-out"),
        Vec::new(),
        &cfg.amqp,
        &cfg.retry,
    );
    let (conn, ch) = broker.channel().await.expect("channel");
    for name in [q.clone(), topo.dlq()] {
        ch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    }
    // One the filter passes over, at the head, then three it replays.
    for (i, kind) in [
        "permanent",
        "retries-exhausted",
        "retries-exhausted",
        "retries-exhausted",
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = FieldTable::default();
        h.insert("x-error-kind".into(), AMQPValue::LongString(kind.into()));
        publish(
            &ch,
            "",
            &topo.dlq(),
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default().with_headers(h),
        )
        .await;
    }
    let filter = Filter {
        kind: Some("retries-exhausted".into()),
        // 5 s between two replays: far past the node's 3 s with one held.
        per_second: Some(0.2),
        hold_at_most: Some(Duration::from_millis(500)),
        ..Filter::default()
    };
    let mut replayed = 0;
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs <= 10, "the replay goes on when run again");
        match dlq::replay_filtered(&conn, &topo, &filter, false).await {
            Ok(moved) => {
                replayed += moved.len();
                break;
            }
            Err(DlqError::Stopped { moved, .. }) => replayed += moved,
            Err(e) => panic!("replay run {runs}: {e}"),
        }
    }
    assert_eq!(replayed, 3);
    assert_eq!(broker.count(&q).await, Some(3));
    assert_eq!(broker.count(&topo.dlq()).await, Some(1));
}

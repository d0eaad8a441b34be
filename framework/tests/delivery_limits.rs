//! Rules that RabbitMQ 4.x made easy to break, run against whichever broker the suite
//! targets (`scripts/test` runs them on 3.x and 4.x):
//! - 4.x quorum queues get a default delivery limit of 20, and browsing or dry-run
//!   replaying a DLQ hands every message back by closing the channel, which counts as a
//!   delivery: dead letters must survive any number of looks (design §2);
//! - RabbitMQ 4.3 no longer counts `basic.nack(requeue)` toward the limit: a message whose
//!   outcome can never be published must still end in the DLQ, not loop (design §3);
//! - a length limit on the DLQ (a blanket max-length policy) must refuse dead letters,
//!   not drop the oldest as the broker's default overflow does, silently; on a classic
//!   retry tier what it drops must come back to `Q`.

use framework::dlq::{self, Selection};
use framework::lapin::BasicProperties;
use framework::testing::*;
use framework::{MessageContext, Outcome, Publication};

#[tokio::test]
async fn dead_letters_survive_30_listings_and_10_dry_run_replays() {
    let p = FnProcessor(|_: serde_json::Value, _: &MessageContext| Outcome::permanent("bad"));
    let mut hs = Harness::start("dlqlooks", &[], p).await;
    let dlq_name = format!("{}-dlq", hs.q);
    for i in 0..3 {
        hs.publish(
            "test.x",
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default().with_message_id(format!("m-{i}").into()),
        )
        .await;
    }
    await_ready_count(&hs.ch, &dlq_name, 3).await;
    hs.stop().await;
    let topo = hs.topology();
    for round in 0..30 {
        let seen = dlq::list(&hs.conn, &topo, 10).await.expect("list");
        assert_eq!(seen.len(), 3, "listing {round} saw every dead letter");
        await_ready_count(&hs.ch, &dlq_name, 3).await;
    }
    for round in 0..10 {
        let would = dlq::replay(&hs.conn, &topo, &Selection::All, true)
            .await
            .expect("dry run");
        assert_eq!(would.len(), 3, "dry run {round} saw every dead letter");
        await_ready_count(&hs.ch, &dlq_name, 3).await;
    }
    // And they still replay, once each.
    let moved = dlq::replay(&hs.conn, &topo, &Selection::All, false)
        .await
        .expect("replay");
    assert_eq!(moved.len(), 3);
    await_ready_count(&hs.ch, &dlq_name, 0).await;
    await_ready_count(&hs.ch, &hs.q, 3).await;
}

/// A processor whose success also publishes, mandatory, to `exchange` (`key`).
fn success_with_extra(
    exchange: String,
) -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(move |v: serde_json::Value, _: &MessageContext| {
        Outcome::success(v.clone())
            .with_extra([Publication::value(&exchange, "nowhere", &v).mandatory()])
    })
}

async fn assert_ends_in_dlq_as_exhausted(hs: &Harness) {
    let mut dlq = hs.watch_dlq().await;
    let sessions = hs.status.sessions();
    let first_session = *sessions.borrow();
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, br#"{"n":1}"#);
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert_eq!(int_header(&d, "x-retry-count"), Some(3));
    let err = header(&d, "x-error").unwrap_or_default();
    assert!(
        err.contains("could not publish the success outcome"),
        "x-error names the publish failure: {err}"
    );
    // The session survived the failures (not `is_ready`: a restarted one is ready again
    // long before the dead letter).
    assert_eq!(*sessions.borrow(), first_session, "no session restarted");
}

#[tokio::test]
async fn an_outcome_that_is_never_routable_ends_in_the_dlq_not_a_loop() {
    let side = unique("side");
    let (_c, ch) = test_channel().await;
    ch.exchange_declare(
        side.as_str().into(),
        framework::lapin::ExchangeKind::Topic,
        Default::default(),
        Default::default(),
    )
    .await
    .expect("side exchange, bound to nothing");
    let _gone = Cleanup::new(vec![], vec![side.clone()]);
    let hs = Harness::start(
        "unroutable",
        &[("retry.max_attempts", "3")],
        success_with_extra(side),
    )
    .await;
    assert_ends_in_dlq_as_exhausted(&hs).await;
}

#[tokio::test]
async fn an_outcome_to_a_missing_exchange_ends_in_the_dlq_not_a_loop() {
    let hs = Harness::start(
        "missingex",
        &[("retry.max_attempts", "3")],
        success_with_extra(unique("no-such-exchange")),
    )
    .await;
    assert_ends_in_dlq_as_exhausted(&hs).await;
}

/// A length limit on `Q-dlq` (here a policy of one message) refuses new dead letters
/// instead of dropping the oldest, which the broker's default overflow does silently: the
/// refused ones are retried, and reach the DLQ once there is room.
#[tokio::test]
async fn a_full_dlq_refuses_dead_letters_instead_of_dropping_the_oldest() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let p = FnProcessor(move |_v: serde_json::Value, _ctx: &MessageContext| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Outcome::permanent("poison")
    });
    // One at a time: a quorum queue checks its limit against what it holds, so dead
    // letters published together could all fit.
    let mut hs = Harness::start("dlqfull", &[("amqp.prefetch", "1")], p).await;
    let dlq_name = format!("{}-dlq", hs.q);
    let policy = one_message_at_most(&dlq_name).await;
    publish_numbered(&hs, 4).await;
    // The DLQ full (a quorum queue refuses once it holds more than its limit), a later
    // dead letter is refused, so retried (called again).
    let c = calls.clone();
    wait_until("a refused dead letter to be retried", || {
        c.load(std::sync::atomic::Ordering::SeqCst) >= 5
    })
    .await;
    let before = ready_count(&hs.ch, &dlq_name).await;
    assert!(before < 4, "{before} in the DLQ: none refused");
    // Room made one dead letter at a time (a quorum queue applies a policy's removal only
    // after a while): every refused dead letter comes in, once — none was dropped.
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while seen.len() < 4 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead letters were dropped: only {seen:?} reached the DLQ"
        );
        let got = hs
            .ch
            .basic_get(
                dlq_name.as_str().into(),
                framework::lapin::options::BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get from the DLQ");
        match got {
            Some(m) => {
                let v: serde_json::Value =
                    serde_json::from_slice(&m.delivery.data).expect("a dead letter's body");
                seen.push(v["i"].as_i64().expect("the body as published"));
            }
            None => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3], "each dead letter once");
    drop(policy);
    hs.stop().await;
}

/// A max-length policy of one message on `queue` (a blanket limit an operator set), once
/// the queue shows it.
async fn one_message_at_most(queue: &str) -> admin::TestPolicy {
    let admin = admin::Admin::suite();
    let policy = admin
        .set_policy(
            &unique("length"),
            &format!("^{queue}$"),
            serde_json::json!({"max-length": 1}),
        )
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while admin.queue_policy(queue).await.is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the policy applies");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    policy
}

/// Publishes `{"i": 0}` … `{"i": n-1}` to the service.
async fn publish_numbered(hs: &Harness, n: usize) {
    for i in 0..n {
        hs.publish(
            "test.k",
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
}

/// The reasons of a delivery's `x-death` entries.
fn death_reasons(headers: &framework::lapin::types::FieldTable) -> Vec<String> {
    use framework::lapin::types::AMQPValue;
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        return Vec::new();
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => match t.inner().get("reason") {
                Some(AMQPValue::LongString(r)) => Some(r.to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A full classic retry tier (a blanket max-length policy) loses no retry: the broker
/// drops its oldest, as a classic queue's default overflow does, but dead-letters it back
/// to `Q` (the tier's own dead-letter target), where it is handled before its delay is up.
#[tokio::test]
async fn a_full_classic_retry_tier_loses_no_retry() {
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let d = dropped.clone();
    let p = FnProcessor(move |v: serde_json::Value, ctx: &MessageContext| {
        if ctx.attempt == 0 {
            return Outcome::retry("once");
        }
        // Back early from the full tier: `x-death` says why.
        if death_reasons(&ctx.headers).iter().any(|r| r == "maxlen") {
            d.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        Outcome::success(v)
    });
    // One long tier: the retries of messages handled together meet in it.
    let cfg = [
        ("amqp.queue_type", "classic"),
        ("amqp.prefetch", "4"),
        ("retry.delays_ms", "[10000]"),
    ];
    let mut hs = Harness::start("tierfull", &cfg, p).await;
    let tier = format!("{}-retry-10000", hs.q);
    let policy = one_message_at_most(&tier).await;
    let mut out = hs.watch_output().await;
    publish_numbered(&hs, 4).await;
    // Every message comes out once, after its retry.
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let d = next_within(&mut out, WAIT)
            .await
            .unwrap_or_else(|| panic!("retries were lost: only {seen:?} came out"));
        let v: serde_json::Value = serde_json::from_slice(&d.data).expect("an output");
        seen.push(v["i"].as_i64().expect("the body as published"));
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 1, 2, 3], "each message once");
    // The tier was full: at most one retry waited there, the others came back early.
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the tier dropped no retry: {dropped:?}"
    );
    drop(policy);
    hs.stop().await;
}

/// Hands its message back once its session ends (an ordered adapter stopping mid-wait).
struct HandsBackAtTheStop(std::sync::Arc<std::sync::atomic::AtomicBool>);

#[framework::async_trait]
impl framework::MessageProcessor for HandsBackAtTheStop {
    type Input = serde_json::Value;
    async fn handle(&self, _v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        ctx.cancelled().await;
        Outcome::Interrupted("stopping".into())
    }
}

/// On a queue with a single active consumer (ordered handling) the consumer is not
/// cancelled at a stop: a message handed back meanwhile came straight back to it, read
/// no more, and went back again as the channel closed — two returns, each counted toward
/// the delivery limit, at every stop. It goes back once, with the channel.
#[tokio::test]
async fn a_hand_back_at_a_stop_of_a_single_active_consumer_counts_one_delivery() {
    use framework::lapin::types::AMQPValue;
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let q = unique("sacback");
    let pc = framework::ProcessorConfiguration {
        binding: framework::Binding {
            exchange: format!("{q}-in"),
            routing_keys: vec!["test.#".into()],
            output_routing_key: "test.out".into(),
            single_active_consumer: true,
            ..Default::default()
        },
        processor: HandsBackAtTheStop(started.clone()),
    };
    let mut hs = Harness::start_pc("test-service", config(&q, &[]), pc).await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let s = started.clone();
    wait_until("the handler to start", || {
        s.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    hs.stop().await;
    // Consumed (a single-active-consumer quorum queue takes no basic.get), as the next
    // instance would.
    let mut back = hs
        .ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            framework::lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("consume");
    let got = next(&mut back).await;
    // `x-delivery-count` counts the returns the broker counts toward the limit (4.3 no
    // longer counts a requeue); `x-acquired-count` (4.x) every hand-out.
    for header in ["x-delivery-count", "x-acquired-count"] {
        let count = got
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(header).cloned());
        let count = match count {
            None => 0,
            Some(AMQPValue::LongLongInt(n)) => n,
            Some(AMQPValue::LongInt(n)) => i64::from(n),
            Some(other) => panic!("{header} {other:?}"),
        };
        assert!(
            count <= 1,
            "{header} {count}: handed back more than once by one stop"
        );
    }
}

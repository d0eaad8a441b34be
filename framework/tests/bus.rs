//! The bus contract of design §2–§3 against the real RabbitMQ.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use framework::headers as h;
use framework::lapin::BasicProperties;
use framework::lapin::options::QueueDeclareOptions;
use framework::lapin::types::{AMQPValue, FieldTable};
use framework::testing::*;
use framework::topology::UNLIMITED_DELIVERIES;
use framework::{MessageContext, MessageProcessor, Outcome, async_trait};
use serde_json::json;

fn echo() -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v))
}

fn recording<F>(
    calls: &Calls,
    f: F,
) -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync + use<F>>
where
    F: Fn(&serde_json::Value, &MessageContext) -> Outcome + Send + Sync + 'static,
{
    let calls = calls.clone();
    FnProcessor(move |v: serde_json::Value, ctx: &MessageContext| {
        let o = f(&v, ctx);
        calls.lock().unwrap().push((v, ctx.clone()));
        o
    })
}

async fn redeclare(ch: &framework::lapin::Channel, q: &str, args: FieldTable) -> bool {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .is_ok()
}

/// Whether declaring exchange `name` as `kind` (durable or not) matches what exists: the
/// broker refuses a declaration of another kind or durability (406), so only the exchange's
/// own shape is accepted. A channel of its own each time: a refusal closes it.
async fn exchange_is(name: &str, kind: framework::lapin::ExchangeKind, durable: bool) -> bool {
    let (_c, ch) = test_channel().await;
    ch.exchange_declare(
        name.into(),
        kind,
        framework::lapin::options::ExchangeDeclareOptions {
            durable,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_ok()
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

#[tokio::test]
async fn topology_is_declared_with_the_designed_arguments() {
    let mut hs = Harness::start("topo", &[("amqp.delivery_limit", "7")], echo()).await;
    let q = hs.q.clone();
    let (conn, ch) = test_channel().await;
    let q_args = args(&[
        ("x-queue-type", s("quorum")),
        ("x-dead-letter-exchange", s(&format!("{q}-fail"))),
        ("x-delivery-limit", AMQPValue::LongLongInt(7)),
        ("x-dead-letter-strategy", s("at-least-once")),
        ("x-overflow", s("reject-publish")),
        // The default `[amqp] consumer_timeout_ms` (RabbitMQ 4.3 compares it too).
        ("x-consumer-timeout", AMQPValue::LongLongInt(86_400_000)),
    ]);
    // An equivalent re-declaration succeeds; any differing argument is refused by the broker.
    assert!(
        redeclare(&ch, &q, q_args.clone()).await,
        "Q has exactly the designed arguments"
    );
    let (_c2, ch2) = test_channel().await;
    let mut wrong = q_args.clone();
    wrong.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(8));
    assert!(
        !redeclare(&ch2, &q, wrong).await,
        "a different delivery limit is refused"
    );
    for (d, rest) in [(200, 400), (400, 200)] {
        let (_c, ch) = test_channel().await;
        let mut a = args(&[
            ("x-queue-type", s("quorum")),
            ("x-message-ttl", AMQPValue::LongLongInt(d)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&q)),
            ("x-dead-letter-strategy", s("at-least-once")),
            ("x-overflow", s("reject-publish")),
            (
                "x-delivery-limit",
                AMQPValue::LongLongInt(UNLIMITED_DELIVERIES),
            ),
        ]);
        assert!(
            redeclare(&ch, &format!("{q}-retry-{d}"), a.clone()).await,
            "tier {d} args"
        );
        let (_c, ch) = test_channel().await;
        a.insert("x-message-ttl".into(), AMQPValue::LongLongInt(rest));
        assert!(
            !redeclare(&ch, &format!("{q}-retry-{d}"), a).await,
            "tier {d} TTL is {d}"
        );
    }
    assert!(
        redeclare(
            &ch,
            &format!("{q}-dlq"),
            args(&[
                ("x-queue-type", s("quorum")),
                (
                    "x-delivery-limit",
                    AMQPValue::LongLongInt(UNLIMITED_DELIVERIES)
                ),
                // Full, it refuses dead letters (retried) instead of dropping the oldest.
                ("x-overflow", s("reject-publish")),
            ])
        )
        .await
    );
    // Exchanges (design §1–§2): Q-retry direct, Q-fail and the output exchange topic, all
    // durable (a transient Q-fail would be gone after a broker restart, and with it the
    // dead letters the broker routes there).
    use framework::lapin::ExchangeKind::{Direct, Fanout, Topic};
    for (name, kind, other) in [
        (format!("{q}-retry"), Direct, Topic),
        (format!("{q}-fail"), Topic, Fanout),
        (format!("{q}-out"), Topic, Direct),
        // The producer's exchange, created by `declare_sources`: a transient one would be
        // gone after a broker restart, with its bindings and what producers sent meanwhile.
        (format!("{q}-in"), Topic, Direct),
    ] {
        assert!(
            exchange_is(&name, kind.clone(), true).await,
            "{name} is a durable {kind:?} exchange"
        );
        assert!(
            !exchange_is(&name, other, true).await,
            "{name} is no other kind"
        );
        assert!(!exchange_is(&name, kind, false).await, "{name} is durable");
    }
    // Declaring again (a restart) is idempotent.
    let cfg = config(&q, &[("amqp.delivery_limit", "7")]);
    let topo = test_topology(&q, &cfg);
    topo.declare(&conn)
        .await
        .expect("re-declaration is idempotent");
    // Bindings: a message on the input exchange reaches Q; one on the fail exchange the
    // DLQ; one on the retry exchange its tier, which hands it back to Q once its 400 ms are
    // up (awaited, not timed: the tier may already have expired it when counted).
    hs.stop().await;
    publish(
        &ch,
        &format!("{q}-in"),
        "other.x",
        b"{}",
        BasicProperties::default(),
    )
    .await;
    await_ready_count(&ch, &q, 1).await;
    publish(
        &ch,
        &format!("{q}-fail"),
        "any.key",
        b"{}",
        BasicProperties::default(),
    )
    .await;
    await_ready_count(&ch, &format!("{q}-dlq"), 1).await;
    publish(
        &ch,
        &format!("{q}-retry"),
        "400",
        b"{}",
        BasicProperties::default(),
    )
    .await;
    await_ready_count(&ch, &q, 2).await;
    assert_eq!(ready_count(&ch, &format!("{q}-retry-400")).await, 0);
    assert_eq!(ready_count(&ch, &format!("{q}-dlq")).await, 1);
}

#[tokio::test]
async fn classic_queue_type_is_selectable() {
    let mut hs = Harness::start("classic", &[("amqp.queue_type", "classic")], echo()).await;
    let (_c, ch) = test_channel().await;
    let q = hs.q.clone();
    let a = args(&[
        ("x-queue-type", s("classic")),
        ("x-dead-letter-exchange", s(&format!("{q}-fail"))),
    ]);
    assert!(
        redeclare(&ch, &q, a).await,
        "classic Q without delivery limit"
    );
    // Its retry tiers and DLQ too (a classic Q beside quorum tiers would still need a
    // quorum-capable cluster, and would mix two kinds of guarantees).
    for d in hs.delays.clone() {
        let a = args(&[
            ("x-queue-type", s("classic")),
            ("x-message-ttl", AMQPValue::LongLongInt(d as i64)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&q)),
        ]);
        let (_c, ch) = test_channel().await;
        assert!(
            redeclare(&ch, &format!("{q}-retry-{d}"), a).await,
            "classic tier {d}"
        );
    }
    let a = args(&[
        ("x-queue-type", s("classic")),
        ("x-overflow", s("reject-publish")),
    ]);
    assert!(redeclare(&ch, &format!("{q}-dlq"), a).await, "classic DLQ");
    let mut out = hs.watch_output().await;
    hs.publish("test.a", br#"{"a":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"a":1}"#);
    // Its consumer asks to be cancelled on a mirrored queue's failover (RabbitMQ 3.x): a
    // new leader delivers every unacknowledged message again, and handlers left running
    // would handle them a second time beside the copies.
    let consumers = framework::testing::admin::Admin::suite()
        .consumers(&q)
        .await;
    assert_eq!(consumers.len(), 1, "{consumers:?}");
    assert_eq!(
        consumers[0]["arguments"]["x-cancel-on-ha-failover"],
        serde_json::json!(true),
        "{consumers:?}"
    );
    hs.stop().await;
}

#[tokio::test]
async fn success_is_published_with_response_headers() {
    let mut hs = Harness::start("success", &[], echo()).await;
    let mut out = hs.watch_output().await;
    let props = BasicProperties::default()
        .with_message_id("msg-1".into())
        .with_correlation_id("corr-9".into());
    hs.publish("test.one", br#"{"x":1}"#, props).await;
    let d = next(&mut out).await;
    assert_eq!(d.routing_key.as_str(), "test.out.success");
    assert_eq!(d.exchange.as_str(), hs.output_exchange);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&d.data).unwrap(),
        json!({"x":1})
    );
    assert_eq!(header(&d, h::IN_RESPONSE_TO).as_deref(), Some("msg-1"));
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-9")
    );
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    let mid = d
        .properties
        .message_id()
        .clone()
        .expect("output has a message id");
    assert!(!mid.as_str().is_empty() && mid.as_str() != "msg-1");

    // Without a message id, x-in-response-to is the routing key.
    hs.publish("other.two", br#"{"y":2}"#, BasicProperties::default())
        .await;
    let d = next(&mut out).await;
    assert_eq!(header(&d, h::IN_RESPONSE_TO).as_deref(), Some("other.two"));
    assert!(d.properties.message_id().is_some());

    // A blank message id is none: two such inputs of other bodies on one key are
    // answered by outputs with ids of their own (taken as an id, "" made them one), in
    // response to the routing key.
    let mut ids = Vec::new();
    for (blank, body) in [("", br#"{"z":3}"#), (" ", br#"{"z":4}"#)] {
        let props = BasicProperties::default().with_message_id(blank.into());
        hs.publish("other.three", body, props).await;
        let d = next(&mut out).await;
        assert_eq!(
            header(&d, h::IN_RESPONSE_TO).as_deref(),
            Some("other.three")
        );
        ids.push(
            d.properties
                .message_id()
                .clone()
                .expect("an id")
                .to_string(),
        );
    }
    assert!(ids.iter().all(|id| !id.trim().is_empty()), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
    hs.stop().await;
}

/// Declares the topic exchange `name` (a destination a test's processor publishes to).
async fn declare_topic(ch: &framework::lapin::Channel, name: &str) {
    ch.exchange_declare(
        name.into(),
        framework::lapin::ExchangeKind::Topic,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn extra_destinations_are_published_with_the_success() {
    let extra_ex = unique("extra");
    let _gone = Cleanup::new(vec![], vec![extra_ex.clone()]);
    let ex2 = extra_ex.clone();
    let p = FnProcessor(move |v: serde_json::Value, _: &MessageContext| {
        Outcome::success(&v).with_extra([framework::Publication::text(&ex2, "side.key", "hello")])
    });
    let mut hs = Harness::start("extra", &[], p).await;
    declare_topic(&hs.ch, &extra_ex).await;
    let mut side = watch(&hs.ch, &extra_ex, "#").await;
    let props = BasicProperties::default()
        .with_message_id("in-side".into())
        .with_correlation_id("corr-side".into());
    hs.publish("test.x", b"{}", props).await;
    let d = next(&mut side).await;
    assert_eq!(d.data, b"hello");
    assert_eq!(d.routing_key.as_str(), "side.key");
    // A side message is an output like the success message (design §3): persistent,
    // answering its input, in its input's conversation.
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-side")
    );
    assert_eq!(header(&d, h::IN_RESPONSE_TO).as_deref(), Some("in-side"));
    hs.stop().await;
}

/// The message ids of one input's outputs: its success message, then its three side
/// messages in the order published.
async fn output_ids(
    out: &mut framework::lapin::Consumer,
    side: &mut framework::lapin::Consumer,
) -> Vec<String> {
    let mut ids = vec![message_id(&next(out).await)];
    for _ in 0..3 {
        ids.push(message_id(&next(side).await));
    }
    ids
}

/// The outputs of an input delivered again (a lost ack, a retry coming back from its tier)
/// carry the message ids the first delivery's outputs had, so a consumer can drop the
/// duplicates at-least-once delivery makes; other inputs' outputs, and outputs of one
/// input to other places or with other bodies, have ids of their own. Before, every
/// publish drew a random id.
#[tokio::test]
async fn outputs_of_an_input_delivered_again_keep_their_ids() {
    let extra_ex = unique("ids");
    let _gone = Cleanup::new(vec![], vec![extra_ex.clone()]);
    let ex2 = extra_ex.clone();
    let p = FnProcessor(move |v: serde_json::Value, _: &MessageContext| {
        Outcome::success(&v).with_extra([
            framework::Publication::text(&ex2, "side.a", "one"),
            framework::Publication::text(&ex2, "side.a", "two"),
            framework::Publication::text(&ex2, "side.b", "one"),
        ])
    });
    let mut hs = Harness::start("ids", &[], p).await;
    declare_topic(&hs.ch, &extra_ex).await;
    let mut out = hs.watch_output().await;
    let mut side = watch(&hs.ch, &extra_ex, "#").await;
    let with_id = |m: &str| BasicProperties::default().with_message_id(m.into());
    hs.publish("test.a", b"{}", with_id("m-1")).await;
    let first = output_ids(&mut out, &mut side).await;
    hs.publish("test.a", b"{}", with_id("m-1")).await;
    assert_eq!(
        first,
        output_ids(&mut out, &mut side).await,
        "a redelivery's outputs keep their ids"
    );
    let distinct: std::collections::HashSet<_> = first.iter().collect();
    assert_eq!(
        distinct.len(),
        4,
        "each output of one input has its own id: {first:?}"
    );
    // Back from a retry tier: through the default exchange, its origin in headers.
    let mut retried = FieldTable::default();
    h::set_int(&mut retried, h::RETRY_COUNT, 1);
    h::set_str(&mut retried, h::ORIGINAL_EXCHANGE, &hs.input_exchange);
    h::set_str(&mut retried, h::ORIGINAL_ROUTING_KEY, "test.a");
    publish(
        &hs.ch,
        "",
        &hs.q,
        b"{}",
        with_id("m-1").with_headers(retried),
    )
    .await;
    assert_eq!(
        first,
        output_ids(&mut out, &mut side).await,
        "a retry's outputs keep their ids"
    );
    hs.publish("test.a", b"{}", with_id("m-2")).await;
    let other = output_ids(&mut out, &mut side).await;
    assert!(
        other.iter().all(|i| !first.contains(i)),
        "another input's ids differ"
    );
    // A replayed part of a batch keeps the batch's message id: its part tells them apart.
    let mut part = FieldTable::default();
    h::set_str(&mut part, h::BATCH_PART, "2");
    hs.publish_retried(
        "test.a",
        b"{}",
        with_id("m-1").with_headers(part.clone()),
        0,
    )
    .await;
    let part_ids = output_ids(&mut out, &mut side).await;
    assert!(
        part_ids.iter().all(|i| !first.contains(i)),
        "a part's ids differ from its batch's"
    );
    // On a producer's message the header is the producer's: ignored.
    hs.publish("test.a", b"{}", with_id("m-1").with_headers(part))
        .await;
    assert_eq!(
        first,
        output_ids(&mut out, &mut side).await,
        "a producer's part header changes no id"
    );
    // Without an input id, and its processor not knowing inputs by their body, one body
    // may be a new message: fresh ids each time.
    hs.publish("test.a", b"{}", BasicProperties::default())
        .await;
    let bare = output_ids(&mut out, &mut side).await;
    hs.publish("test.a", b"{}", BasicProperties::default())
        .await;
    let bare_again = output_ids(&mut out, &mut side).await;
    assert!(bare.iter().all(|i| !bare_again.contains(i)));
    hs.stop().await;
}

/// Succeeds with three side messages to its exchange, knowing inputs by their body.
struct KnownByBody(String);

#[async_trait]
impl MessageProcessor for KnownByBody {
    type Input = serde_json::Value;
    fn knows_inputs_by_body(&self) -> bool {
        true
    }
    async fn handle(&self, v: serde_json::Value, _: &MessageContext) -> Outcome {
        Outcome::success(&v).with_extra([
            framework::Publication::text(&self.0, "side.a", "one"),
            framework::Publication::text(&self.0, "side.a", "two"),
            framework::Publication::text(&self.0, "side.b", "one"),
        ])
    }
}

/// A processor knowing its inputs by their body (one body is one message): the outputs of
/// an input without an id keep their ids when it is delivered again (they were random, and
/// a re-sent output could not be told from a new one); another body's outputs have others.
#[tokio::test]
async fn outputs_of_an_input_known_by_its_body_keep_their_ids() {
    let extra_ex = unique("bodyids");
    let _gone = Cleanup::new(vec![], vec![extra_ex.clone()]);
    let mut hs = Harness::start("bodyids", &[], KnownByBody(extra_ex.clone())).await;
    declare_topic(&hs.ch, &extra_ex).await;
    let mut out = hs.watch_output().await;
    let mut side = watch(&hs.ch, &extra_ex, "#").await;
    hs.publish("test.a", b"{}", BasicProperties::default())
        .await;
    let first = output_ids(&mut out, &mut side).await;
    let distinct: std::collections::HashSet<_> = first.iter().collect();
    assert_eq!(distinct.len(), 4, "{first:?}");
    hs.publish("test.a", b"{}", BasicProperties::default())
        .await;
    assert_eq!(first, output_ids(&mut out, &mut side).await);
    hs.publish("test.a", b"{ }", BasicProperties::default())
        .await;
    let other = output_ids(&mut out, &mut side).await;
    assert!(other.iter().all(|i| !first.contains(i)), "{other:?}");
    // A message id, where there is one, names the input alone.
    let with_id = |m: &str| BasicProperties::default().with_message_id(m.into());
    hs.publish("test.a", b"{}", with_id("m-1")).await;
    let named = output_ids(&mut out, &mut side).await;
    hs.publish("test.a", b"{ }", with_id("m-1")).await;
    assert_eq!(named, output_ids(&mut out, &mut side).await);
    assert!(named.iter().all(|i| !first.contains(i)));
    hs.stop().await;
}

/// Dead-letters record 0 of every message as a part of its own, then succeeds.
struct FirstRecordRefused;

#[async_trait]
impl MessageProcessor for FirstRecordRefused {
    type Input = serde_json::Value;
    fn progress_headers(&self) -> &'static [&'static str] {
        &["x-test-parts"]
    }
    async fn handle(&self, _: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let mut parts = framework::batch::Progress::resume(ctx, "x-test-parts");
        match parts
            .dead_letter("0", br#"{"record":0}"#.to_vec(), "record 0 refused")
            .await
        {
            Ok(_) => Outcome::success(json!({})),
            Err(e) => Outcome::retry(e),
        }
    }
}

/// A replayed part of a batch (one record, `x-batch-part: 3`) whose record is refused
/// again keeps its place in its batch: dead-lettered as part 0 of the one-record message
/// it now is, it lost it (event-forwarder's idempotency key of a record without an event
/// id, and its outputs' ids, derive from the part: a third try posted it under a key the
/// endpoint had not seen). The same header on a producer's message is the producer's:
/// ignored, the part is the record's own place.
#[tokio::test]
async fn a_replayed_part_dead_lettered_again_keeps_its_place() {
    let mut hs = Harness::start("partagain", &[], FirstRecordRefused).await;
    let mut dlq = consume(&hs.ch, &format!("{}-dlq", hs.q)).await;
    let with_id = |m: &str| BasicProperties::default().with_message_id(m.into());
    hs.publish("test.a", b"{}", with_id("m-1")).await;
    let first = next(&mut dlq).await;
    assert_eq!(header(&first, h::BATCH_PART).as_deref(), Some("0"));
    let mut part = FieldTable::default();
    h::set_str(&mut part, h::BATCH_PART, "3");
    // A replay comes back through the default exchange to the queue.
    hs.publish_retried(
        "test.a",
        b"{}",
        with_id("m-1").with_headers(part.clone()),
        0,
    )
    .await;
    let again = next(&mut dlq).await;
    assert_eq!(header(&again, h::BATCH_PART).as_deref(), Some("3"));
    hs.publish("test.a", b"{}", with_id("m-2").with_headers(part.clone()))
        .await;
    let forged = next(&mut dlq).await;
    assert_eq!(header(&forged, h::BATCH_PART).as_deref(), Some("0"));
    // The replay of a dead letter the broker made of a producer's delivery comes back
    // through the default exchange too, but its headers are the producer's: ignored.
    let mut replayed = part;
    h::set_str(&mut replayed, h::PRODUCERS_REPLAY, "true");
    hs.publish_retried("test.a", b"{}", with_id("m-3").with_headers(replayed), 0)
        .await;
    let producers = next(&mut dlq).await;
    assert_eq!(header(&producers, h::BATCH_PART).as_deref(), Some("0"));
    // Its origin is the one the replay wrote (where the broker recorded it was published).
    assert_eq!(
        header(&producers, h::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("test.a")
    );
    assert_eq!(
        header(&producers, h::ORIGINAL_EXCHANGE),
        Some(hs.input_exchange.clone())
    );
    // The marker on a producer's own delivery keeps no origin of the producer's.
    let mut forged = FieldTable::default();
    h::set_str(&mut forged, h::PRODUCERS_REPLAY, "true");
    h::set_str(&mut forged, h::ORIGINAL_ROUTING_KEY, "forged.key");
    hs.publish("test.a", b"{}", with_id("m-4").with_headers(forged))
        .await;
    let own = next(&mut dlq).await;
    assert_eq!(
        header(&own, h::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("test.a")
    );
    for d in [&producers, &own] {
        assert_eq!(header(d, h::PRODUCERS_REPLAY), None, "not carried on");
    }
    hs.stop().await;
}

#[derive(serde::Deserialize)]
#[allow(dead_code)]
struct Shaped {
    name: String,
    size: u64,
}

struct Typed;

#[async_trait]
impl MessageProcessor for Typed {
    type Input = Shaped;
    async fn handle(&self, input: Shaped, _ctx: &MessageContext) -> Outcome {
        Outcome::success(json!({"name": input.name}))
    }
}

/// `x-retry-count` of `d` is an integer on the wire (design §3), not a string holding one:
/// the original's consumers read it as a number.
fn assert_wire_count(d: &framework::lapin::message::Delivery) {
    let raw = d
        .properties
        .headers()
        .as_ref()
        .and_then(|t| t.inner().get("x-retry-count").cloned());
    assert!(
        matches!(
            raw,
            Some(
                AMQPValue::ShortShortInt(_)
                    | AMQPValue::ShortInt(_)
                    | AMQPValue::LongInt(_)
                    | AMQPValue::LongLongInt(_)
                    | AMQPValue::ShortShortUInt(_)
                    | AMQPValue::ShortUInt(_)
                    | AMQPValue::LongUInt(_)
            )
        ),
        "x-retry-count is an integer: {raw:?}"
    );
}

fn assert_dead_letter(d: &framework::lapin::message::Delivery, kind: &str, key: &str) {
    assert_eq!(header(d, h::ERROR_KIND).as_deref(), Some(kind));
    assert!(header(d, h::ERROR).is_some_and(|e| !e.is_empty() && e.len() <= 1024));
    assert!(header(d, h::ORIGINAL_EXCHANGE).is_some_and(|e| e.ends_with("-in")));
    assert_eq!(header(d, h::ORIGINAL_ROUTING_KEY).as_deref(), Some(key));
    assert!(int_header(d, h::RETRY_COUNT).is_some());
    // Design §3's names, spelled out (not through the constants), and the count an integer
    // on the wire, as the original's consumers read it.
    assert_wire_count(d);
    let at = header(d, "x-failed-at").expect("x-failed-at");
    chrono::DateTime::parse_from_rfc3339(&at).expect("x-failed-at is RFC 3339");
    assert_eq!(header(d, "x-service").as_deref(), Some("test-service"));
    for name in [
        "x-error",
        "x-error-kind",
        "x-original-exchange",
        "x-original-routing-key",
    ] {
        let present = d
            .properties
            .headers()
            .as_ref()
            .is_some_and(|t| t.inner().contains_key(name));
        assert!(present, "{name}");
    }
    assert_eq!(*d.properties.delivery_mode(), Some(2));
}

#[tokio::test]
async fn bad_bodies_are_dead_lettered_byte_for_byte() {
    let mut hs = Harness::start("badbody", &[], Typed).await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let not_json: &[u8] = b"\xff\xfenot json at all {";
    let mut own = FieldTable::default();
    own.insert("x-producer-trace".into(), s("t-77"));
    let props = BasicProperties::default()
        .with_message_id("bad-1".into())
        .with_content_type("application/octet-stream".into())
        .with_content_encoding("identity".into())
        .with_correlation_id("corr-bad".into())
        .with_timestamp(1_700_000_000)
        .with_type("sweeper.file".into())
        .with_app_id("asset-sweeper".into())
        .with_priority(3)
        .with_headers(own);
    hs.publish("test.bad", not_json, props).await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, not_json, "body kept byte-for-byte");
    // Every property of the original, and its own headers, kept (design §3).
    let p = &d.properties;
    let text = |v: &Option<framework::lapin::types::ShortString>| {
        v.as_ref().map(|s| s.as_str().to_string())
    };
    assert_eq!(text(p.content_encoding()).as_deref(), Some("identity"));
    assert_eq!(text(p.correlation_id()).as_deref(), Some("corr-bad"));
    assert_eq!(*p.timestamp(), Some(1_700_000_000));
    assert_eq!(text(p.kind()).as_deref(), Some("sweeper.file"));
    assert_eq!(text(p.app_id()).as_deref(), Some("asset-sweeper"));
    assert_eq!(*p.priority(), Some(3));
    assert_eq!(header(&d, "x-producer-trace").as_deref(), Some("t-77"));
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        Some("bad-1")
    );
    assert_eq!(
        d.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("application/octet-stream")
    );
    assert_dead_letter(&d, "permanent", "test.bad");
    assert!(header(&d, h::ERROR).unwrap().contains("not valid JSON"));

    let wrong_shape = br#"{"name": "a", "size": "big"}"#;
    hs.publish("test.shape", wrong_shape, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, wrong_shape);
    assert_dead_letter(&d, "permanent", "test.shape");
    let err = header(&d, h::ERROR).unwrap();
    assert!(
        err.contains("does not match") && err.contains("invalid type"),
        "{err}"
    );

    hs.publish("test.shape", br#"{"size": 3}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert!(
        header(&d, h::ERROR)
            .unwrap()
            .contains("missing field `name`")
    );

    hs.publish("test.empty", b"", BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert!(d.data.is_empty());
    assert_dead_letter(&d, "permanent", "test.empty");

    // A compressed body is named as such, not as "invalid JSON", and kept byte for byte.
    let gzipped = [
        0x1f_u8, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03,
    ];
    hs.publish(
        "test.gzip",
        &gzipped,
        BasicProperties::default().with_content_encoding("gzip".into()),
    )
    .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, gzipped);
    let err = header(&d, h::ERROR).unwrap_or_default();
    assert!(err.contains("`gzip`-encoded"), "{err}");

    // A good message still works afterwards.
    hs.publish(
        "test.good",
        br#"{"name":"n","size":1}"#,
        BasicProperties::default(),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"name":"n"}"#);
    hs.stop().await;
}

/// A body over `[amqp] max_body_bytes` is dead-lettered unread, byte for byte, naming the
/// key: decoding it could take many times its size (every record of a batch a value of
/// its own), and a few such bodies at once took a service down. The processor never sees
/// it; a body within the limit goes through as before.
#[tokio::test]
async fn a_body_over_the_limit_is_dead_lettered_unread() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |v, _| Outcome::success(v.clone()));
    let mut hs = Harness::start("bodylimit", &[("amqp.max_body_bytes", "1024")], p).await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let big = serde_json::to_vec(&json!({"records": vec![0; 600]})).unwrap();
    assert!(big.len() > 1024);
    hs.publish("test.big", &big, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "permanent", "test.big");
    let e = header(&d, h::ERROR).unwrap();
    assert!(
        e.contains("max_body_bytes") && e.contains(&big.len().to_string()),
        "{e}"
    );
    assert_eq!(d.data, big, "the body as it came");
    hs.publish(
        "test.small",
        br#"{"records":[0]}"#,
        BasicProperties::default(),
    )
    .await;
    next(&mut out).await;
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "only the small one was handled"
    );
    hs.stop().await;
}

/// A body within `max_body_bytes` holding millions of small JSON values is dead-lettered
/// unread: decoded, `[0,0,…]` takes 16 times its text and more (a 16 MiB one took about
/// 400 MiB and killed the service at every redelivery). A body as large made of few values
/// is decoded and handled as before.
#[tokio::test]
async fn a_body_of_millions_of_values_is_dead_lettered_unread() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_, _| Outcome::success(json!({"ok": true})));
    let mut hs = Harness::start("manyvalues", &[], p).await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let values = framework::MAX_JSON_VALUES + 1;
    let many = serde_json::to_vec(&json!({ "records": vec![0; values] })).unwrap();
    hs.publish("test.many", &many, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "permanent", "test.many");
    let e = header(&d, h::ERROR).unwrap();
    assert!(e.contains("JSON values"), "{e}");
    assert_eq!(d.data, many, "the body as it came");
    // As large, in few values (commas, colons and brackets inside strings are text).
    let few = serde_json::to_vec(&json!({ "records": ["[0,{\"a\":0}],".repeat(many.len() / 12)] }))
        .unwrap();
    assert!(few.len() >= many.len());
    hs.publish("test.few", &few, BasicProperties::default())
        .await;
    next(&mut out).await;
    assert_eq!(
        calls.lock().unwrap().len(),
        1,
        "only the one of few values was handled"
    );
    hs.stop().await;
}

#[tokio::test]
async fn long_errors_are_cut_to_one_kib() {
    let p = FnProcessor(|_v, _: &MessageContext| Outcome::permanent("é".repeat(5000)));
    let mut hs = Harness::start("longerr", &[], p).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.x", b"{}", BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    let e = header(&d, h::ERROR).unwrap();
    assert!(e.len() <= 1024 && e.len() > 1000, "len {}", e.len());
    hs.stop().await;
}

#[tokio::test]
async fn retries_carry_headers_and_count_up() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| {
        if ctx.attempt < 2 {
            Outcome::retry(format!("not yet ({})", ctx.attempt))
        } else {
            Outcome::success(json!({"done": ctx.attempt}))
        }
    });
    let mut hs = Harness::start("retry", &[], p).await;
    let mut out = hs.watch_output().await;
    let props = BasicProperties::default().with_correlation_id("c-r".into());
    hs.publish("test.retry.me", br#"{"k":1}"#, props).await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"done":2}"#);
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("c-r")
    );
    let calls = calls.lock().unwrap().clone();
    let attempts: Vec<u32> = calls.iter().map(|(_, c)| c.attempt).collect();
    assert_eq!(attempts, vec![0, 1, 2]);
    for (i, (body, ctx)) in calls.iter().enumerate() {
        assert_eq!(body, &json!({"k":1}));
        assert_eq!(
            ctx.routing_key, "test.retry.me",
            "original key survives retries"
        );
        assert_eq!(ctx.exchange, hs.input_exchange);
        let count = framework::headers::get_int(&ctx.headers, h::RETRY_COUNT);
        assert_eq!(count, if i == 0 { None } else { Some(i as i64) });
        if i > 0 {
            let last = framework::headers::get_str(&ctx.headers, h::LAST_ERROR).unwrap();
            assert_eq!(last, format!("not yet ({})", i - 1));
            assert_eq!(
                framework::headers::get_str(&ctx.headers, h::ORIGINAL_ROUTING_KEY).as_deref(),
                Some("test.retry.me")
            );
        }
    }
    hs.stop().await;
}

#[tokio::test]
async fn retries_exhausted_after_exactly_max_attempts() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| {
        // Progress of the last attempt must reach the dead letter, so a replay skips it.
        ctx.set_retry_header("x-test-progress", &format!("attempt-{}", ctx.attempt));
        Outcome::retry("always failing")
    });
    let mut hs = Harness::start("exhaust", &[("retry.max_attempts", "3")], p).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "retries-exhausted", "test.x");
    assert_eq!(int_header(&d, h::RETRY_COUNT), Some(3));
    assert!(header(&d, h::ERROR).unwrap().contains("always failing"));
    assert_eq!(header(&d, "x-test-progress").as_deref(), Some("attempt-2"));
    assert_eq!(d.data, br#"{"n":1}"#);
    let n = calls.lock().unwrap().len();
    assert_eq!(n, 3, "exactly max_attempts handler calls");
    // Nothing is left to call the handler again. `Q` is looked at once the service
    // stopped: while it consumes, anything there is handed to it, never counted ready (a
    // message it held at the stop goes back there).
    hs.stop().await;
    assert_eq!(
        calls.lock().unwrap().len(),
        3,
        "no call after the dead letter"
    );
    for t in [
        format!("{}-retry-200", hs.q),
        format!("{}-retry-400", hs.q),
        hs.q.clone(),
    ] {
        assert_eq!(ready_count(&hs.ch, &t).await, 0, "{t} is empty");
    }
}

#[tokio::test]
async fn an_outage_is_waited_out_without_counting_its_attempts() {
    // A store down for longer than max_attempts' worth of tiers dead-lettered the whole
    // backlog; its attempts are not the message's fault.
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| match ctx.attempt {
        0..=3 => {
            ctx.retry_for_outage();
            Outcome::retry(format!("store down ({})", ctx.attempt))
        }
        4 => Outcome::retry("the message's own trouble"),
        _ => Outcome::success(json!({"done": ctx.attempt})),
    });
    let mut hs = Harness::start("outage", &[("retry.max_attempts", "2")], p).await;
    let mut out = hs.watch_output().await;
    // A producer's header on a first delivery is not an outage of ours (an outage "since
    // 1970" would dead-letter it at once).
    let mut forged = FieldTable::default();
    h::set_int(&mut forged, h::OUTAGE_SINCE, 1);
    let props = BasicProperties::default().with_headers(forged);
    hs.publish("test.o", br#"{"k":1}"#, props).await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"done":5}"#);
    let calls = calls.lock().unwrap().clone();
    let since: Vec<Option<i64>> = calls
        .iter()
        .map(|(_, c)| framework::headers::get_int(&c.headers, h::OUTAGE_SINCE))
        .collect();
    assert_eq!(since[0], None, "a producer's header is not read");
    assert!(
        since[1].is_some_and(|t| t > 1),
        "the outage's start is carried: {since:?}"
    );
    assert!(since[1..=4].iter().all(|s| *s == since[1]), "{since:?}");
    // Kept through a retry of the message's own: one outage budget in all.
    assert_eq!(since[5], since[1]);
    let count = framework::headers::get_int(&calls[5].1.headers, h::RETRY_COUNT);
    assert_eq!(count, Some(5), "x-retry-count still counts every attempt");
    hs.stop().await;
}

/// The framework's count and origin headers are read only on a message that came back
/// the framework's way (through the default exchange to `Q`): a producer's own
/// `x-retry-count` (a scheme of its own, a dead letter shovelled back) made the first
/// retry "retries exhausted", and its `x-original-routing-key` named another origin.
#[tokio::test]
async fn a_producers_own_retry_headers_are_not_read() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| match ctx.attempt {
        0 => Outcome::retry("first sight"),
        n => Outcome::success(json!({"attempt": n, "key": ctx.routing_key})),
    });
    let mut hs = Harness::start("producer-hdr", &[("retry.max_attempts", "3")], p).await;
    let mut out = hs.watch_output().await;
    let mut hdr = FieldTable::default();
    h::set_int(&mut hdr, h::RETRY_COUNT, 2);
    h::set_int(&mut hdr, h::PROGRESS_ATTEMPTS, 1);
    h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, "elsewhere");
    h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, "forged.key");
    // Another service's dead letter shovelled back: its error headers are not this
    // message's (the broker's dead letter of a retry was listed with them).
    h::set_str(&mut hdr, h::ERROR, "old");
    h::set_str(&mut hdr, h::ERROR_KIND, "permanent");
    h::set_str(&mut hdr, h::FAILED_AT, "2020-01-01T00:00:00Z");
    h::set_str(&mut hdr, h::SERVICE, "elsewhere");
    h::set_str(&mut hdr, h::LAST_ERROR, "old");
    hs.publish(
        "test.p",
        br#"{"n":1}"#,
        BasicProperties::default().with_headers(hdr),
    )
    .await;
    let d = next(&mut out).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&d.data).unwrap(),
        json!({"attempt": 1, "key": "test.p"})
    );
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls[0].1.exchange, hs.input_exchange);
        let retried = &calls[1].1.headers;
        for k in [h::ERROR, h::ERROR_KIND, h::FAILED_AT, h::SERVICE] {
            assert_eq!(h::get_str(retried, k), None, "{k} carried onto the retry");
        }
        assert_eq!(
            h::get_str(retried, h::LAST_ERROR).as_deref(),
            Some("first sight")
        );
    }
    hs.stop().await;
}

/// A first delivery's `x-outage-since` (a replayed dead letter's, a producer's straight to
/// `Q`) is not carried by its retry: the next attempt's outage retry took it as the start
/// of its outage and, from 1970, gave up at once.
#[tokio::test]
async fn a_first_deliverys_outage_start_is_not_carried_into_its_retry() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| match ctx.attempt {
        0 => Outcome::retry("the message's own trouble"),
        1 => {
            ctx.retry_for_outage();
            Outcome::retry("store down")
        }
        n => Outcome::success(json!({"attempt": n})),
    });
    let mut hs = Harness::start("outage-first", &[], p).await;
    let mut out = hs.watch_output().await;
    let mut hdr = FieldTable::default();
    h::set_int(&mut hdr, h::OUTAGE_SINCE, 1);
    publish(
        &hs.ch,
        "",
        &hs.q,
        br#"{"n":1}"#,
        BasicProperties::default().with_headers(hdr),
    )
    .await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"attempt":2}"#);
    hs.stop().await;
}

/// The broker's own headers on an input (`x-death` naming `Q` itself: a dead letter the
/// broker made, moved back by hand; `x-delivery-count`) are not carried onto its retry:
/// RabbitMQ 3.x reads a published `x-death` and dropped the retry as a dead-letter cycle
/// when it expired from its tier into `Q`.
#[tokio::test]
async fn the_brokers_headers_are_not_carried_onto_a_retry() {
    use framework::lapin::types::{AMQPValue, FieldArray};
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| match ctx.attempt {
        0 => Outcome::retry("first sight"),
        n => Outcome::success(json!({"attempt": n})),
    });
    let mut hs = Harness::start("broker-hdr", &[], p).await;
    let mut out = hs.watch_output().await;
    let mut death = FieldTable::default();
    for (k, v) in [
        ("queue", hs.q.as_str()),
        ("reason", "delivery_limit"),
        ("exchange", ""),
    ] {
        h::set_str(&mut death, k, v);
    }
    death.insert("count".into(), AMQPValue::LongLongInt(1));
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
            hs.q.as_str().into(),
        )])),
    );
    let mut hdr = FieldTable::default();
    hdr.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    h::set_str(&mut hdr, "x-first-death-queue", &hs.q);
    h::set_int(&mut hdr, "x-delivery-count", 7);
    publish(
        &hs.ch,
        "",
        &hs.q,
        br#"{"n":1}"#,
        BasicProperties::default().with_headers(hdr),
    )
    .await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"attempt":1}"#);
    let retried = calls.lock().unwrap()[1].1.headers.clone();
    let deaths = match retried.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let queues: Vec<_> = deaths
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => framework::headers::get_str(t, "queue"),
            _ => None,
        })
        .collect();
    assert!(
        !queues.contains(&hs.q),
        "only the tier's own death: {queues:?}"
    );
    assert_ne!(
        framework::headers::get_int(&retried, "x-delivery-count"),
        Some(7)
    );
    assert_ne!(
        framework::headers::get_str(&retried, "x-first-death-queue"),
        Some(hs.q.clone())
    );
    hs.stop().await;
}

/// An attempt that made progress is not an outage's whatever its processor says (a batch
/// a throttling endpoint lets through a slice at a time): no outage clock runs on it, so it
/// gets as many attempts as it needs.
#[tokio::test]
async fn progress_during_an_outage_is_not_held_to_its_budget() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| {
        if ctx.attempt == 0 {
            ctx.retry_for_outage();
            return Outcome::retry("down, nothing done");
        }
        let mut progress = framework::batch::Progress::resume(ctx, "x-test-done");
        let next = (0..6).find(|i| !progress.is_done(&i.to_string()));
        match next {
            Some(i) => {
                progress.mark_done(i.to_string());
                ctx.retry_for_outage();
                Outcome::retry("throttled after one part")
            }
            None => Outcome::success(json!({"parts": 6})),
        }
    });
    let extra = [("retry.max_attempts", "1"), ("retry.max_outage_ms", "300")];
    let mut hs = Harness::start("outage-progress", &extra, p).await;
    let mut out = hs.watch_output().await;
    hs.publish("test.o", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"parts":6}"#);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 8);
    let since = |i: usize| framework::headers::get_int(&calls[i].1.headers, h::OUTAGE_SINCE);
    assert!(since(1).is_some(), "the first attempt's outage is carried");
    // Progress shows the downstream working: that outage is over, so a later one would
    // start its own clock instead of being measured from this one.
    assert_eq!(since(2), None);
    hs.stop().await;
}

#[tokio::test]
async fn an_outage_longer_than_its_budget_ends_in_the_dlq() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| {
        ctx.retry_for_outage();
        Outcome::retry("store down")
    });
    let extra = [("retry.max_attempts", "1"), ("retry.max_outage_ms", "1500")];
    let mut hs = Harness::start("outage-budget", &extra, p).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.o", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "retries-exhausted", "test.o");
    let error = header(&d, h::ERROR).unwrap();
    assert!(
        error.contains("retry.max_outage_ms") && error.contains("store down"),
        "{error}"
    );
    let n = calls.lock().unwrap().len();
    assert!(
        n > 1,
        "outage attempts are not counted toward max_attempts 1: {n} call(s)"
    );
    hs.stop().await;
}

#[tokio::test]
async fn forged_retry_counts_at_their_ceiling_still_end_in_the_dlq() {
    // x-retry-count and x-progress-attempts are anyone's numbers: at u32::MAX the count
    // cannot grow, and progress cancelled every attempt: retried every second forever.
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, _ctx| Outcome::retry("always failing"));
    let mut hs = Harness::start("forged", &[("retry.max_attempts", "3")], p).await;
    let mut dlq = hs.watch_dlq().await;
    let mut hdr = FieldTable::default();
    h::set_int(&mut hdr, h::PROGRESS_ATTEMPTS, i64::from(u32::MAX));
    hs.publish_retried(
        "test.x",
        br#"{"n":1}"#,
        BasicProperties::default().with_headers(hdr),
        u32::MAX,
    )
    .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "retries-exhausted", "test.x");
    assert_eq!(calls.lock().unwrap().len(), 1, "one handler call, no loop");
    hs.stop().await;
}

#[tokio::test]
async fn a_permanent_failure_keeps_the_progress_made_before_it() {
    let p = FnProcessor(|_v: serde_json::Value, ctx: &MessageContext| {
        if ctx.attempt == 0 {
            ctx.set_retry_header("x-test-progress", "first");
            return Outcome::retry("part failed");
        }
        // The mark the retry carried, then this attempt's own: the dead letter keeps the last.
        assert_eq!(
            framework::headers::get_str(&ctx.headers, "x-test-progress").as_deref(),
            Some("first")
        );
        ctx.set_retry_header("x-test-progress", "first,second");
        Outcome::permanent("the rest is bad")
    });
    let mut hs = Harness::start("progress", &[], p).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "permanent", "test.x");
    assert_eq!(
        header(&d, "x-test-progress").as_deref(),
        Some("first,second")
    );
    hs.stop().await;
}

#[tokio::test]
async fn a_short_retry_overtakes_a_long_one() {
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let o2 = order.clone();
    let p = FnProcessor(move |v: serde_json::Value, ctx: &MessageContext| {
        let name = v["name"].as_str().unwrap_or("?").to_string();
        let first = framework::headers::get_str(&ctx.headers, h::LAST_ERROR).is_none();
        if first {
            Outcome::retry("first sight")
        } else {
            o2.lock().unwrap().push(name.clone());
            Outcome::success(json!({"name": name}))
        }
    });
    let mut hs = Harness::start("tiers", &[("retry.delays_ms", "[300, 600000]")], p).await;
    let mut out = hs.watch_output().await;
    // "slow" already has one attempt behind it, so its retry waits in the 10 min tier.
    hs.publish_retried(
        "test.slow",
        br#"{"name":"slow"}"#,
        BasicProperties::default(),
        1,
    )
    .await;
    hs.publish(
        "test.fast",
        br#"{"name":"fast"}"#,
        BasicProperties::default(),
    )
    .await;
    // Its tier is its own: the 300 ms retry does not wait behind it.
    await_ready_count(&hs.ch, &format!("{}-retry-600000", hs.q), 1).await;
    let first = next(&mut out).await;
    assert_eq!(
        first.data, br#"{"name":"fast"}"#,
        "300 ms retry did not wait behind the 10 min one"
    );
    assert_eq!(*order.lock().unwrap(), vec!["fast"]);
    assert_eq!(
        ready_count(&hs.ch, &format!("{}-retry-600000", hs.q)).await,
        1,
        "the slow one still waits in its own tier"
    );
    // As it waits there (design §3): persistent, so a broker restart keeps it, with the
    // four retry headers.
    let waiting = hs
        .ch
        .basic_get(
            format!("{}-retry-600000", hs.q).as_str().into(),
            framework::lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the retry waits in its tier")
        .delivery;
    assert_eq!(waiting.data, br#"{"name":"slow"}"#);
    assert_eq!(*waiting.properties.delivery_mode(), Some(2));
    assert_eq!(int_header(&waiting, "x-retry-count"), Some(2));
    assert_wire_count(&waiting);
    assert_eq!(
        header(&waiting, "x-original-exchange"),
        Some(format!("{}-in", hs.q))
    );
    assert_eq!(
        header(&waiting, "x-original-routing-key").as_deref(),
        Some("test.slow")
    );
    assert_eq!(
        header(&waiting, "x-last-error").as_deref(),
        Some("first sight")
    );
    hs.stop().await;
}

/// A retry that asks for a longer wait (a peer's `Retry-After`) goes through the first
/// tier at least that long; one that asks for nothing takes its attempt's own tier.
#[tokio::test]
async fn a_retry_asking_for_a_longer_wait_takes_a_tier_that_long() {
    let p = FnProcessor(|v: serde_json::Value, ctx: &MessageContext| {
        if let Some(ms) = v["wait_ms"].as_u64() {
            ctx.retry_no_sooner_than(Duration::from_millis(ms));
        }
        Outcome::retry("later")
    });
    let mut hs = Harness::start(
        "retryafter",
        &[
            ("retry.delays_ms", "[200, 600000, 900000]"),
            ("retry.max_attempts", "2"),
        ],
        p,
    )
    .await;
    // Far longer than the test: the message stays in the tier it was sent to.
    hs.publish(
        "test.x",
        br#"{"wait_ms": 1000}"#,
        BasicProperties::default(),
    )
    .await;
    let long = format!("{}-retry-600000", hs.q);
    await_ready_count(&hs.ch, &long, 1).await;
    // Longer than every tier: the longest.
    hs.publish(
        "test.x",
        br#"{"wait_ms": 3600000}"#,
        BasicProperties::default(),
    )
    .await;
    await_ready_count(&hs.ch, &format!("{}-retry-900000", hs.q), 1).await;
    // Nothing asked: the first tier, whence it comes back for its last attempt and is
    // dead-lettered (it never went into the long tiers, which still hold one each).
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.x", br#"{}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, b"{}");
    assert_eq!(ready_count(&hs.ch, &long).await, 1);
    assert_eq!(
        ready_count(&hs.ch, &format!("{}-retry-900000", hs.q)).await,
        1
    );
    hs.stop().await;
}

#[tokio::test]
async fn drop_acks_and_publishes_nothing() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |v, _ctx| {
        if v["drop"] == json!(true) {
            Outcome::drop("not interesting")
        } else {
            Outcome::success(v)
        }
    });
    // prefetch 1: the sentinel is delivered only after the dropped message was acked.
    let mut hs = Harness::start("drop", &[("amqp.prefetch", "1")], p).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.d", br#"{"drop":true}"#, BasicProperties::default())
        .await;
    hs.publish("test.d", br#"{"sentinel":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut out).await;
    assert_eq!(
        d.data, br#"{"sentinel":1}"#,
        "the dropped message published nothing"
    );
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert!(
        next_within(&mut dlq, Duration::from_millis(300))
            .await
            .is_none()
    );
    // `Q` once the service stopped (while it consumes, nothing there is counted ready).
    hs.stop().await;
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(ready_count(&hs.ch, &hs.q).await, 0);
    for d in [200, 400] {
        assert_eq!(ready_count(&hs.ch, &format!("{}-retry-{d}", hs.q)).await, 0);
    }
}

#[tokio::test]
async fn a_panicking_processor_dead_letters_and_keeps_running() {
    let p = FnProcessor(|v: serde_json::Value, _: &MessageContext| {
        if v["boom"] == json!(true) {
            panic!("kaboom in handler");
        }
        Outcome::success(v)
    });
    let mut hs = Harness::start("panic", &[], p).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.p", br#"{"boom":true}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "permanent", "test.p");
    assert!(header(&d, h::ERROR).unwrap().contains("kaboom in handler"));
    hs.publish("test.p", br#"{"ok":1}"#, BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"ok":1}"#);
    assert!(hs.status.is_ready());
    hs.stop().await;
}

/// A handler that panicked because the process could not start a thread (tokio's blocking
/// pool under a container's pid limit: every file copy runs on one) is retried, not
/// dead-lettered as a bug: the next attempt finds threads again.
#[tokio::test]
async fn a_panic_for_want_of_threads_is_retried() {
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let seen = attempts.clone();
    let p = FnProcessor(move |v: serde_json::Value, ctx: &MessageContext| {
        seen.lock().unwrap().push(ctx.attempt);
        if ctx.attempt == 0 {
            panic!("OS can't spawn worker thread: Resource temporarily unavailable (os error 11)");
        }
        Outcome::success(v)
    });
    let mut hs = Harness::start("nothreads", &[], p).await;
    let mut out = hs.watch_output().await;
    hs.publish("test.t", br#"{"t":1}"#, BasicProperties::default())
        .await;
    // The output comes from the second attempt: the first panicked and was retried, not
    // dead-lettered as a bug.
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"t":1}"#);
    assert_eq!(*attempts.lock().unwrap(), [0, 1]);
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 0);
    hs.stop().await;
}

#[tokio::test]
async fn a_nacked_publish_is_retried_and_never_acked_as_success() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |v, _| Outcome::success(v));
    let mut hs = Harness::start("nack", &[("retry.max_attempts", "2")], p).await;
    // A full queue that rejects publishes: every success publish is nacked by the broker.
    let full = unique("full");
    let _gone = Cleanup::new(vec![full.clone()], vec![]);
    let mut a = FieldTable::default();
    a.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    a.insert("x-overflow".into(), s("reject-publish"));
    hs.ch
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            a,
        )
        .await
        .unwrap();
    hs.ch
        .queue_bind(
            full.as_str().into(),
            hs.output_exchange.as_str().into(),
            "#".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.n", br#"{"n":1}"#, BasicProperties::default())
        .await;
    // Never acked as a success: each nacked outcome becomes a retry (confirmed before the
    // ack), so the attempts are counted and bounded on every broker version.
    let d = next(&mut dlq).await;
    assert_eq!(d.data, br#"{"n":1}"#);
    assert_eq!(
        header(&d, h::ERROR_KIND).as_deref(),
        Some("retries-exhausted")
    );
    let err = header(&d, h::ERROR).unwrap_or_default();
    assert!(err.contains("nacked"), "the error names the nack: {err}");
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "one call per attempt");
    assert_eq!(calls[1].1.attempt, 1, "the second call is the retry");
    hs.stop().await;
}

/// Concurrent handlers' successes share one confirm channel, each confirmed by its own
/// publish's confirm, whatever the threads' interleaving: publishes from 32 tasks on two
/// threads into a queue that takes some and refuses others (`reject-publish`, kept full by
/// a slow consumer) — every publish confirmed as taken is in the queue, and no refused one
/// is (lapin numbers a publish before it queues its frames: unordered, a refused output was
/// confirmed as another's and its input acked, lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_on_one_channel_are_each_confirmed_by_their_own() {
    use framework::publisher::{Outgoing, publish_confirmed_in_order};
    let (conn, ch) = test_channel().await;
    ch.confirm_select(Default::default()).await.unwrap();
    let (_c, consuming) = test_channel().await;
    let mut a = FieldTable::default();
    a.insert("x-max-length".into(), AMQPValue::LongLongInt(2));
    a.insert("x-overflow".into(), s("reject-publish"));
    let full = consuming
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            a,
        )
        .await
        .unwrap()
        .name()
        .to_string();
    // One at a time: the queue stays about full, each publish taken or refused by a race.
    consuming.basic_qos(1, Default::default()).await.unwrap();
    let mut out = consume(&consuming, &full).await;
    let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        while let Some(d) = next_within(&mut out, WAIT).await {
            let id = u64::from_be_bytes(d.data[..8].try_into().unwrap());
            if got_tx.send(id).is_err() {
                break;
            }
        }
    });
    let ch = Arc::new(ch);
    let order = Arc::new(Mutex::new(()));
    let alarm = Arc::new(framework::alarm::Alarm::watch(
        &conn,
        framework::CancellationToken::new(),
        None,
    ));
    let frame_max = framework::connection::frame_max(&conn);
    let tasks: Vec<_> = (0..32u64)
        .map(|t| {
            let (ch, full, order, alarm) = (ch.clone(), full.clone(), order.clone(), alarm.clone());
            tokio::spawn(async move {
                let mut taken = Vec::new();
                for i in 0..150 {
                    let id = t * 1000 + i;
                    // 64 KiB: lapin copies the body into frames between numbering the
                    // publish and queueing it.
                    let mut body = id.to_be_bytes().to_vec();
                    body.resize(64 * 1024, 0);
                    let o = Outgoing {
                        exchange: String::new(),
                        routing_key: full.clone(),
                        body,
                        properties: BasicProperties::default(),
                        mandatory: false,
                        broker_adds: 0,
                    };
                    let r = publish_confirmed_in_order(
                        &ch,
                        vec![o],
                        &alarm,
                        WAIT,
                        frame_max,
                        Some(&order),
                    )
                    .await;
                    if r.is_ok() {
                        taken.push(id);
                    }
                }
                taken
            })
        })
        .collect();
    let mut taken = std::collections::BTreeSet::new();
    for t in tasks {
        taken.extend(t.await.unwrap());
    }
    // Every message the broker took is confirmed to one publish: as many arrive as were
    // confirmed, and they must be those.
    let mut got = std::collections::BTreeSet::new();
    while got.len() < taken.len() {
        let id = within(WAIT, "the queue's messages", got_rx.recv())
            .await
            .expect("the collector runs");
        got.insert(id);
    }
    collector.abort();
    assert_eq!(
        taken.difference(&got).collect::<Vec<_>>(),
        Vec::<&u64>::new(),
        "confirmed as taken but refused (their inputs would be acked, lost)"
    );
    assert_eq!(got, taken, "taken but confirmed as refused");
    assert!(taken.len() > 1, "some publishes are taken: {}", taken.len());
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    let q = unique("http");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let cfg = config(&q, &[]);
    let shutdown = framework::CancellationToken::new();
    // Each outcome on demand: `{"do": …}`.
    let scripted =
        FnProcessor(
            |v: serde_json::Value, ctx: &MessageContext| match v["do"].as_str() {
                Some("retry") if ctx.attempt == 0 => Outcome::retry("once"),
                Some("permanent") => Outcome::permanent("never"),
                Some("drop") => Outcome::drop("nothing to do"),
                _ => Outcome::success(v),
            },
        );
    let pc =
        framework::ProcessorConfiguration::new(&format!("{q}-in"), "test.#", "test.out", scripted);
    let t = shutdown.clone();
    let port = framework::testing::broker::free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut cfg = cfg;
    cfg.service.http_listen = addr.clone();
    let cfg2 = cfg.clone();
    let task = tokio::spawn(async move {
        framework::cli::run_processor("test-service", &cfg2, pc, t)
            .await
            .is_ok()
    });
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Counters are there at 0 before anything happened: an alert on their increase
    // fires on the first failure, not only from the second on.
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for zero in [
        format!("storagetier_publish_failures_total{{queue=\"{q}\"}} 0"),
        format!("storagetier_messages_total{{queue=\"{q}\",outcome=\"dead_letter\"}} 0"),
        format!("storagetier_messages_total{{queue=\"{q}\",outcome=\"retry\"}} 0"),
        // Gauges and the histogram too: a dashboard shows 0, not "no data", when idle.
        format!("storagetier_in_flight{{queue=\"{q}\"}} 0"),
        format!("storagetier_handler_seconds_count{{queue=\"{q}\"}} 0"),
    ] {
        assert!(text.contains(&zero), "{zero} in {text}");
    }
    let (_c, ch) = test_channel().await;
    let mut out = watch(&ch, &format!("{q}-out"), "#").await;
    publish(
        &ch,
        &format!("{q}-in"),
        "test.m",
        b"{}",
        BasicProperties::default(),
    )
    .await;
    next(&mut out).await;
    // The output is confirmed before the input is acked and counted: poll briefly.
    let want = format!("storagetier_messages_total{{queue=\"{q}\",outcome=\"success\"}} 1");
    let deadline = tokio::time::Instant::now() + WAIT;
    let text = loop {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(&want) {
            break text;
        }
        assert!(tokio::time::Instant::now() < deadline, "{want} in {text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Buckets up to hours: a storage tier's long copies have a p99 to alert on (with 300 s
    // the largest, histogram_quantile could never report more).
    let longest = format!("storagetier_handler_seconds_bucket{{queue=\"{q}\",le=\"21600\"}} 1");
    assert!(text.contains(&longest), "{longest} in {text}");
    assert!(text.contains(&format!("storagetier_in_flight{{queue=\"{q}\"}}")));
    assert!(text.contains("storagetier_connected"));

    // Every outcome is counted once, under its own label (the alerts on dead letters and
    // retries read them).
    for what in ["retry", "permanent", "drop"] {
        publish(
            &ch,
            &format!("{q}-in"),
            "test.m",
            json!({"do": what}).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    for (outcome, n) in [
        ("success", 2),
        ("retry", 1),
        ("dead_letter", 1),
        ("drop", 1),
    ] {
        await_metric(
            port,
            &format!("storagetier_messages_total{{queue=\"{q}\",outcome=\"{outcome}\"}} {n}\n"),
        )
        .await;
    }
    // Every handler is done: the in-flight gauge is back at 0, not left at what it rose to.
    await_metric(port, &format!("storagetier_in_flight{{queue=\"{q}\"}} 0\n")).await;
    // (`storagetier_connected` has no label: every runtime of this test binary sets it;
    // its value is checked where a service runs as a process of its own, cli.rs.)
    shutdown.cancel();
    assert!(tokio::time::timeout(WAIT, task).await.unwrap().unwrap());
}

/// A request sent half (no end of headers) is cut off once its headers are overdue, and
/// one still open when the service stops does not hold the shutdown: the server had no
/// header timeout and its graceful shutdown waited for every connection.
#[tokio::test]
async fn a_half_sent_request_holds_neither_its_connection_nor_the_shutdown() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let q = unique("halfhttp");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let mut cfg = config(&q, &[]);
    let addr = format!("127.0.0.1:{}", framework::testing::broker::free_port());
    cfg.service.http_listen = addr.clone();
    let shutdown = framework::CancellationToken::new();
    let pc =
        framework::ProcessorConfiguration::new(&format!("{q}-in"), "test.#", "test.out", echo());
    let t = shutdown.clone();
    let task = tokio::spawn(async move {
        framework::cli::run_processor("test-service", &cfg, pc, t)
            .await
            .is_ok()
    });
    let half = || async {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut s = loop {
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(s) => break s,
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "serving: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        s
    };
    // Whatever the server answers (nothing, or a 408), the connection ends.
    let drain = |mut s: tokio::net::TcpStream| async move {
        let mut buf = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
            .await
            .expect("the server closed the half-sent request's connection")
    };
    let _ = drain(half().await).await;
    let open = half().await;
    shutdown.cancel();
    assert!(
        tokio::time::timeout(WAIT, task)
            .await
            .expect("stopped with a request still half-sent")
            .unwrap()
    );
    let _ = drain(open).await;
}

struct PartialProcessor;

#[async_trait]
impl MessageProcessor for PartialProcessor {
    type Input = serde_json::Value;
    async fn handle(&self, input: serde_json::Value, ctx: &MessageContext) -> Outcome {
        // Dead-letter each bad item on its own, publish the good ones, tag retries.
        for item in input["items"].as_array().cloned().unwrap_or_default() {
            if item["bad"] == json!(true) {
                if let Err(e) = ctx
                    .dead_letter(item.to_string().into_bytes(), "bad item")
                    .await
                {
                    return Outcome::retry(e);
                }
            } else if let Err(e) = ctx
                .publish(framework::Publication::value(
                    &format!("{}-side", input["q"].as_str().unwrap_or("")),
                    "item",
                    &item,
                ))
                .await
            {
                return Outcome::retry(e);
            }
        }
        if ctx.attempt == 0 {
            ctx.set_retry_header("x-test-progress", "items-done");
            return Outcome::retry("once more");
        }
        assert_eq!(
            framework::headers::get_str(&ctx.headers, "x-test-progress").as_deref(),
            Some("items-done")
        );
        Outcome::success(json!({"done": true}))
    }
}

#[tokio::test]
async fn processors_can_publish_dead_letter_parts_and_tag_retries() {
    // The recorder in place before the service registers its metrics.
    let metrics = framework::telemetry::metrics_handle();
    let mut hs = Harness::start("partial", &[], PartialProcessor).await;
    let side = format!("{}-side", hs.q);
    let _gone = Cleanup::new(vec![], vec![side.clone()]);
    declare_topic(&hs.ch, &side).await;
    let mut side_c = watch(&hs.ch, &side, "#").await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let body = json!({"q": hs.q, "items": [{"n": 1}, {"bad": true, "n": 2}]});
    hs.publish(
        "test.batch",
        body.to_string().as_bytes(),
        BasicProperties::default().with_message_id("batch-1".into()),
    )
    .await;
    let d = next(&mut side_c).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&d.data).unwrap(),
        json!({"n": 1})
    );
    assert_eq!(header(&d, h::IN_RESPONSE_TO).as_deref(), Some("batch-1"));
    let d = next(&mut dlq).await;
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&d.data).unwrap(),
        json!({"bad": true, "n": 2})
    );
    assert_dead_letter(&d, "permanent", "test.batch");
    assert_eq!(header(&d, h::ERROR).as_deref(), Some("bad item"));
    // The retry carried x-test-progress; the second attempt succeeds.
    assert_eq!(next(&mut out).await.data, br#"{"done":true}"#);
    // Each attempt dead-lettered the bad item (this processor keeps no progress): both
    // counted, as `Q-dlq` grew by both, though no message ended as a dead letter.
    let line = format!(
        "storagetier_parts_dead_lettered_total{{queue=\"{}\"}} 2",
        hs.q
    );
    let text = metrics.render();
    assert!(text.contains(&line), "{line} in {text}");
    hs.stop().await;
}

struct MandatoryPublisher;

#[async_trait]
impl MessageProcessor for MandatoryPublisher {
    type Input = serde_json::Value;
    async fn handle(&self, _v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let p = framework::Publication::text("", &unique("no-such-queue"), "id").mandatory();
        match ctx.publish(p).await {
            Err(e) => Outcome::retry(e),
            Ok(()) => Outcome::success(json!({"published": true})),
        }
    }
}

#[tokio::test]
async fn a_mandatory_publication_that_reaches_no_queue_is_an_error() {
    let mut hs = Harness::start(
        "mandatory",
        &[("retry.max_attempts", "1")],
        MandatoryPublisher,
    )
    .await;
    let mut dlq = hs.watch_dlq().await;
    let sessions = hs.status.sessions();
    let first_session = *sessions.borrow();
    hs.publish("test.m", b"{}", BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, h::ERROR_KIND).as_deref(),
        Some("retries-exhausted")
    );
    assert!(
        header(&d, h::ERROR).unwrap().contains("reached no queue"),
        "{:?}",
        header(&d, h::ERROR)
    );
    // Not `is_ready`: a restarted session is ready again long before the dead letter.
    assert_eq!(
        *sessions.borrow(),
        first_session,
        "an unroutable publication does not restart the session"
    );
    hs.stop().await;
}

/// Every handler of a round publishes at the same moment: even inputs to a queue that
/// exists, odd ones to one that does not (mandatory, so the broker returns them).
struct Crossed {
    round: Arc<tokio::sync::Barrier>,
    routable: String,
}

#[async_trait]
impl MessageProcessor for Crossed {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let n = v["n"].as_u64().unwrap_or(u64::MAX);
        self.round.wait().await;
        let to = if n.is_multiple_of(2) {
            self.routable.clone()
        } else {
            unique("no-such-queue")
        };
        match ctx
            .publish(framework::Publication::text("", &to, n.to_string()).mandatory())
            .await
        {
            Err(e) => Outcome::permanent(e),
            Ok(()) => Outcome::success(json!({ "n": n })),
        }
    }
}

#[tokio::test]
async fn concurrent_outcomes_each_get_their_own_confirm_and_return() {
    // One confirm channel carrying all of a round's publishes at once would credit a return
    // to whichever publish a multiple-ack settles first: an even input dead-lettered as
    // unroutable, an odd one acked as a success while its message went nowhere.
    const PREFETCH: usize = 16;
    const ROUNDS: usize = 10;
    let routable = unique("routable");
    let _gone = Cleanup::new(vec![routable.clone()], vec![]);
    let mut hs = Harness::start(
        "crossed",
        &[("amqp.prefetch", "16"), ("retry.max_attempts", "1")],
        Crossed {
            round: Arc::new(tokio::sync::Barrier::new(PREFETCH)),
            routable: routable.clone(),
        },
    )
    .await;
    hs.ch
        .queue_declare(
            routable.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut routed = consume(&hs.ch, &routable).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    for n in 0..PREFETCH * ROUNDS {
        hs.publish(
            "test.c",
            json!({ "n": n }).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let half = PREFETCH * ROUNDS / 2;
    let all = 0..(PREFETCH * ROUNDS) as u64;
    let evens: Vec<u64> = all.clone().filter(|n| n % 2 == 0).collect();
    let odds: Vec<u64> = all.filter(|n| n % 2 == 1).collect();
    let mut got_routed = Vec::new();
    let mut got_out = Vec::new();
    let mut got_dead = Vec::new();
    for _ in 0..half {
        let d = next(&mut routed).await;
        got_routed.push(String::from_utf8_lossy(&d.data).parse::<u64>().unwrap());
        let d = next(&mut out).await;
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        got_out.push(v["n"].as_u64().unwrap());
        let d = next(&mut dlq).await;
        let err = header(&d, h::ERROR).unwrap_or_default();
        assert!(err.contains("reached no queue"), "{err}");
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        got_dead.push(v["n"].as_u64().unwrap());
    }
    for got in [&mut got_routed, &mut got_out, &mut got_dead] {
        got.sort_unstable();
    }
    assert_eq!(
        got_routed, evens,
        "every even publish reached its queue once"
    );
    assert_eq!(got_out, evens, "every even input succeeded once");
    assert_eq!(
        got_dead, odds,
        "every odd input, and only those, was unroutable"
    );
    hs.stop().await;
}

/// What a republished copy cannot carry is set aside, not fatal: a routing key from a
/// header longer than AMQP carries (lapin panicked publishing the dead letter, leaving the
/// input unacked for good), an `expiration` (the dead letter expired out of the DLQ), a
/// `user_id` (the broker refuses it from another user's connection).
#[tokio::test]
async fn what_no_copy_can_carry_is_set_aside_and_the_message_dead_lettered() {
    let mut hs = Harness::start("setaside", &[("amqp.prefetch", "1")], Typed).await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let mut hdr = FieldTable::default();
    h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, &"k".repeat(300));
    let props = BasicProperties::default()
        .with_headers(hdr)
        .with_expiration("600000".into())
        .with_user_id("guest".into());
    hs.publish("test.long", b"not json", props).await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "permanent", "test.long");
    assert_eq!(d.routing_key.as_str(), "test.long");
    assert_eq!(
        *d.properties.expiration(),
        None,
        "a dead letter never expires"
    );
    assert_eq!(
        header(&d, h::ORIGINAL_EXPIRATION).as_deref(),
        Some("600000")
    );
    assert_eq!(*d.properties.user_id(), None);
    assert_eq!(header(&d, h::ORIGINAL_USER_ID).as_deref(), Some("guest"));
    // Consuming goes on (prefetch 1: a stuck delivery would block it).
    hs.publish(
        "test.ok",
        br#"{"name":"n","size":1}"#,
        BasicProperties::default(),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"name":"n"}"#);
    hs.stop().await;
}

/// A processor's destination with a routing key longer than AMQP carries is an error of
/// that outcome (retried, then dead-lettered), not a panic that leaves the input unacked.
#[tokio::test]
async fn an_extra_destination_with_an_overlong_key_fails_the_outcome_only() {
    let p = FnProcessor(|v: serde_json::Value, _: &MessageContext| {
        Outcome::success(v).with_extra(vec![framework::Publication::text(
            "",
            &"q".repeat(300),
            "x",
        )])
    });
    let mut hs = Harness::start("longkey", &[("retry.max_attempts", "1")], p).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_dead_letter(&d, "retries-exhausted", "test.x");
    let e = header(&d, h::ERROR).unwrap();
    assert!(e.contains("255 bytes"), "{e}");
    hs.stop().await;
}

/// Processes a two-part message: the first attempt does part 0 and fails; the second
/// dead-letters part 1 as a message of its own.
struct TwoParts;

#[async_trait]
impl MessageProcessor for TwoParts {
    type Input = serde_json::Value;
    fn progress_headers(&self) -> &'static [&'static str] {
        &[TEST_PROGRESS]
    }
    async fn handle(&self, _v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let mut p = framework::batch::Progress::resume(ctx, "x-test-done");
        if ctx.attempt == 0 {
            p.mark_done("0");
            return Outcome::retry("part 1 failed");
        }
        match p
            .dead_letter("1", br#"{"part":1}"#.to_vec(), "part 1 is bad")
            .await
        {
            Ok(_) => Outcome::success(json!({"done": true})),
            Err(e) => Outcome::retry(e),
        }
    }
}

/// A part dead-lettered on its own does not carry the whole message's progress marks: its
/// replay, a message of one part, would read mark "0" as itself done and skip it.
#[tokio::test]
async fn a_part_dead_letter_carries_no_progress_of_the_whole() {
    let mut hs = Harness::start("parts", &[], TwoParts).await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    hs.publish("test.parts", br#"{"parts":2}"#, BasicProperties::default())
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, br#"{"part":1}"#);
    assert_eq!(header(&d, "x-test-done"), None);
    assert_eq!(next(&mut out).await.data, br#"{"done":true}"#);
    hs.stop().await;
}

/// Publishes `body` to the harness's input with message id `id`, written as raw bytes.
async fn publish_with_id(hs: &Harness, id: Vec<u8>, body: &[u8]) {
    framework::testing::raw::publish(
        &framework::testing::amqp_url(),
        &framework::testing::raw::RawMessage {
            exchange: hs.input_exchange.clone(),
            routing_key: "test.utf8".into(),
            message_id: id,
            body: body.to_vec(),
            ..Default::default()
        },
    )
    .await;
}

/// A message id that is not UTF-8 (a producer writing raw bytes: Go's `string(uuidBytes)`):
/// the broker passes it on unchecked. The client's parser refused the delivery frame and
/// killed the whole connection — every handler's work redelivered — again at every
/// redelivery; the message is handled like any other, its id read leniently.
#[tokio::test]
async fn a_message_id_that_is_not_utf8_does_not_kill_the_connection() {
    let mut hs = Harness::start("badutf8", &[], Typed).await;
    let mut out = hs.watch_output().await;
    publish_with_id(&hs, b"\xff\xfeid".to_vec(), br#"{"name":"raw","size":1}"#).await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"name":"raw"}"#);
    let first = d.properties.message_id().clone();
    // Another id differing only in its bad bytes (another binary UUID) stays another id:
    // its output's id, derived from it, is not the first's (a consumer dropping duplicates
    // would drop it).
    publish_with_id(&hs, b"\xfe\xffid".to_vec(), br#"{"name":"raw2","size":1}"#).await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"name":"raw2"}"#);
    assert!(first.is_some());
    assert_ne!(
        d.properties.message_id(),
        &first,
        "two inputs, two output ids"
    );
    // 255 bad bytes read as 765 bytes of U+FFFD would not fit the dead letter's message
    // id (a short string): cut to what fits, its dead letter goes out whole.
    let mut dlq = hs.watch_dlq().await;
    publish_with_id(&hs, vec![0xff; 255], br#"{"name":"no size"}"#).await;
    let d = next(&mut dlq).await;
    let id = d.properties.message_id().as_ref().map(|s| s.as_str().len());
    assert!(id.is_some_and(|n| n <= 255), "{id:?}");
    hs.stop().await;
}

/// A header nested thousands of levels deep (a few bytes a level: 20,000 fit one frame)
/// is a producer's message like any other: handled (what lies below 64 levels is kept as
/// bytes), and so is the next. Decoding it recursed once per level on lapin's I/O thread,
/// whose stack overflowed: the process aborted, and again at every redelivery.
#[tokio::test]
async fn a_header_nested_thousands_deep_does_not_kill_the_process() {
    let mut hs = Harness::start("deephdr", &[], Typed).await;
    let mut out = hs.watch_output().await;
    framework::testing::raw::publish(
        &framework::testing::amqp_url(),
        &framework::testing::raw::RawMessage {
            exchange: hs.input_exchange.clone(),
            routing_key: "test.deep".into(),
            message_id: b"deep".to_vec(),
            body: br#"{"name":"deep","size":1}"#.to_vec(),
            headers: framework::testing::raw::nested_arrays_header("x-deep", 20_000),
        },
    )
    .await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"name":"deep"}"#);
    hs.publish(
        "test.after",
        br#"{"name":"after","size":1}"#,
        BasicProperties::default(),
    )
    .await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"name":"after"}"#);
    hs.stop().await;
}

/// Counts handlers inside at once. A plain body stays until a second handler is in (or
/// 1.5 s pass). The pair `"role": "hold"` (large) and `"role": "small"` meet: the held one
/// stays until the small one has been inside beside it, the small one waits until the held
/// one is in (each bounded by [`PAIR_WAIT`], well within [`WAIT`]): however slow the
/// machine, both are inside at once unless the framework keeps the small one out.
struct Overlap {
    now: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
    held_in: Arc<tokio::sync::Notify>,
    small_seen: Arc<tokio::sync::Notify>,
}

const PAIR_WAIT: Duration = Duration::from_secs(30);

#[async_trait]
impl MessageProcessor for Overlap {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        use std::sync::atomic::Ordering::SeqCst;
        self.most
            .fetch_max(self.now.fetch_add(1, SeqCst) + 1, SeqCst);
        match v["role"].as_str() {
            Some("hold") => {
                // `notify_one` keeps a permit for a small handler not waiting yet.
                self.held_in.notify_one();
                let _ = tokio::time::timeout(PAIR_WAIT, self.small_seen.notified()).await;
            }
            Some("small") => {
                let _ = tokio::time::timeout(PAIR_WAIT, self.held_in.notified()).await;
                self.most.fetch_max(self.now.load(SeqCst), SeqCst);
                self.small_seen.notify_one();
            }
            _ => {
                let until = std::time::Instant::now() + Duration::from_millis(1500);
                while self.now.load(SeqCst) < 2 && std::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                self.most.fetch_max(self.now.load(SeqCst), SeqCst);
            }
        }
        self.now.fetch_sub(1, SeqCst);
        Outcome::success(json!({"n": v["n"]}))
    }
}

/// A processor that holds every message until `gate` lets it go, counting those it holds.
struct Gated {
    started: Arc<std::sync::atomic::AtomicUsize>,
    now: Arc<std::sync::atomic::AtomicUsize>,
    most: Arc<std::sync::atomic::AtomicUsize>,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait]
impl MessageProcessor for Gated {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        use std::sync::atomic::Ordering::SeqCst;
        self.started.fetch_add(1, SeqCst);
        let now = self.now.fetch_add(1, SeqCst) + 1;
        self.most.fetch_max(now, SeqCst);
        let _pass = self.gate.acquire().await;
        self.now.fetch_sub(1, SeqCst);
        Outcome::success(v)
    }
}

/// Design §5: prefetch = in-flight handlers. With `prefetch = 3` and ten messages, three
/// are handled at once, the broker holds the other seven back (its consumer's prefetch is
/// 3), and all ten are handled once the first ones finish.
#[tokio::test]
async fn prefetch_bounds_the_messages_in_flight() {
    use std::sync::atomic::Ordering::SeqCst;
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let p = Gated {
        started: started.clone(),
        now: Arc::default(),
        most: most.clone(),
        gate: gate.clone(),
    };
    let mut hs = Harness::start("prefetch", &[("amqp.prefetch", "3")], p).await;
    let mut out = hs.watch_output().await;
    for n in 0..10 {
        hs.publish(
            "test.p",
            json!({ "n": n }).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while started.load(SeqCst) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "three handlers started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    await_ready_count(&hs.ch, &hs.q, 7).await;
    let prefetch: Vec<_> = framework::testing::admin::Admin::suite()
        .consumers(&hs.q)
        .await
        .iter()
        .map(|c| c["prefetch_count"].as_u64())
        .collect();
    assert_eq!(
        prefetch,
        vec![Some(3)],
        "the broker delivers no more than prefetch"
    );
    assert_eq!(started.load(SeqCst), 3, "no fourth handler");
    gate.add_permits(10);
    for _ in 0..10 {
        next(&mut out).await;
    }
    assert_eq!(most.load(SeqCst), 3, "at most prefetch at once");
    hs.stop().await;
}

/// Decoded, a large JSON body takes many times its size (a 16 MiB array of small numbers
/// is 256 MiB of values): prefetch-many of them at once could take gigabytes. Large
/// bodies are handled one at a time; a small one beside a large one is not held back.
#[tokio::test]
async fn large_bodies_are_handled_one_at_a_time() {
    let most = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let p = Overlap {
        now: Arc::default(),
        most: most.clone(),
        held_in: Arc::default(),
        small_seen: Arc::default(),
    };
    let mut hs = Harness::start("large", &[], p).await;
    let mut out = hs.watch_output().await;
    let body = |n: usize, pad: usize, role: &str| {
        serde_json::to_vec(&json!({"n": n, "role": role, "pad": "x".repeat(pad)})).unwrap()
    };
    for n in 0..3 {
        hs.publish(
            "test.large",
            &body(n, 300 * 1024, ""),
            BasicProperties::default(),
        )
        .await;
    }
    for _ in 0..3 {
        next(&mut out).await;
    }
    assert_eq!(
        most.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one large body at a time"
    );
    hs.publish(
        "test.large",
        &body(3, 300 * 1024, "hold"),
        BasicProperties::default(),
    )
    .await;
    hs.publish(
        "test.small",
        &body(4, 10, "small"),
        BasicProperties::default(),
    )
    .await;
    for _ in 0..2 {
        next(&mut out).await;
    }
    assert_eq!(
        most.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "a small one beside it"
    );
    hs.stop().await;
}

#[tokio::test]
async fn hostile_inputs_are_dead_lettered_and_consuming_goes_on() {
    let mut hs = Harness::start("hostile", &[], Typed).await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let big = vec![b'x'; 10 * 1024 * 1024];
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let deep_objects = format!("{}1{}", "{\"a\":".repeat(100_000), "}".repeat(100_000));
    let mut huge = FieldTable::default();
    framework::headers::set_str(&mut huge, "x-junk", &"h".repeat(60 * 1024));
    let cases: Vec<(&[u8], BasicProperties, &str)> = vec![
        (&big, BasicProperties::default(), "not valid JSON"),
        (
            deep.as_bytes(),
            BasicProperties::default(),
            "does not match the expected input",
        ),
        (
            deep_objects.as_bytes(),
            BasicProperties::default(),
            "missing field `name`",
        ),
        (
            b"\xc3\x28\xa0\xa1",
            BasicProperties::default(),
            "not valid JSON",
        ),
        (b"", BasicProperties::default(), "not valid JSON"),
        (
            br#"{"name":"clip\udce9.mov","size":1}"#,
            BasicProperties::default(),
            "name that is not UTF-8",
        ),
        (
            br#"{"name": 5, "size": -1}"#,
            BasicProperties::default(),
            "field `name`: invalid type",
        ),
        (
            br#"{"name":"n","size":1}"#,
            BasicProperties::default().with_headers(huge),
            "",
        ),
        // A byte-order mark before valid JSON is read past.
        (
            b"\xEF\xBB\xBF{\"name\":\"n\",\"size\":1}",
            BasicProperties::default(),
            "",
        ),
    ];
    for (body, props, why) in cases {
        hs.publish("test.hostile", body, props).await;
        if why.is_empty() {
            // Valid body, huge header: processed normally.
            assert_eq!(next(&mut out).await.data, br#"{"name":"n"}"#);
            continue;
        }
        let d = next(&mut dlq).await;
        assert_eq!(d.data.len(), body.len(), "body kept whole");
        let e = header(&d, h::ERROR).unwrap();
        assert!(e.contains(why), "{why}: {e}");
    }
    hs.publish(
        "test.after",
        br#"{"name":"ok","size":2}"#,
        BasicProperties::default(),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"name":"ok"}"#);
    assert!(hs.status.is_ready());
    hs.stop().await;
}

#[tokio::test]
async fn trace_context_is_continued_on_outputs_retries_and_dead_letters() {
    let p = FnProcessor(|v: serde_json::Value, ctx: &MessageContext| {
        if v["fail"] == json!(true) {
            if ctx.attempt == 0 {
                Outcome::retry("once more")
            } else {
                Outcome::permanent("still failing")
            }
        } else {
            Outcome::success(v)
        }
    });
    let hs = Harness::start("trace", &[], p).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("00-{trace}-00f067aa0ba902b7-01");
    let with_trace = || {
        let mut t = FieldTable::default();
        h::set_str(&mut t, "traceparent", &incoming);
        h::set_str(&mut t, "tracestate", "congo=t61rcWkgMzE");
        BasicProperties::default().with_headers(t)
    };
    let is_child = |tp: &str| {
        let parts: Vec<&str> = tp.split('-').collect();
        parts.len() == 4
            && parts[0] == "00"
            && parts[1] == trace
            && parts[2].len() == 16
            && parts[2] != "00f067aa0ba902b7"
            && parts[3] == "01"
    };
    hs.publish("test.t", br#"{"ok":1}"#, with_trace()).await;
    let d = next(&mut out).await;
    let tp = header(&d, "traceparent").expect("output carries traceparent");
    assert!(is_child(&tp), "output continues the trace: {tp}");
    assert_eq!(
        header(&d, "tracestate").as_deref(),
        Some("congo=t61rcWkgMzE")
    );
    hs.publish("test.t", br#"{"fail":true}"#, with_trace())
        .await;
    let d = next(&mut dlq).await;
    let tp = header(&d, "traceparent").expect("dead letter carries traceparent");
    assert!(
        is_child(&tp),
        "the retry and dead letter continue the trace: {tp}"
    );
    // No trace on the input: the service starts one.
    hs.publish("test.t", br#"{"ok":2}"#, BasicProperties::default())
        .await;
    let d = next(&mut out).await;
    let tp = header(&d, "traceparent").expect("a new trace");
    assert!(
        tp.starts_with("00-") && tp.len() == 55 && !tp.contains(trace),
        "{tp}"
    );
}

/// Holds the first delivery of `{"n":0}` until the other messages' acks have left, then
/// gives it back (which, its session running on, is a retry); everything else succeeds.
struct HoldsTheFirst {
    queue: String,
    others: u64,
    firsts: Arc<std::sync::atomic::AtomicU32>,
    /// The others finish together, so their acks leave together.
    together: tokio::sync::Barrier,
}

/// `storagetier_messages_total{queue, outcome="success"}` as rendered now.
fn successes(queue: &str) -> u64 {
    outcome_count(queue, "success")
}

#[async_trait]
impl MessageProcessor for HoldsTheFirst {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        if v["n"] == json!(0) && ctx.attempt == 0 {
            self.firsts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            wait_until("the other messages' acks", || {
                successes(&self.queue) >= self.others
            })
            .await;
            return Outcome::Interrupted("given back after the others were acked".into());
        }
        if v["n"] != json!(0) {
            self.together.wait().await;
        }
        Outcome::success(v)
    }
}

#[tokio::test]
async fn acks_sent_together_never_cover_an_unsettled_delivery() {
    // Acks that finish together leave as one multiple ack; one reaching the held first
    // delivery would ack it, its own settling would then close the channel (unknown
    // delivery tag). Its give-back, returned while the session runs, is a retry: a
    // requeue would bring it straight back, for ever on RabbitMQ 4.3.
    const OTHERS: u64 = 12;
    let _recorder = framework::telemetry::metrics_handle();
    let q = unique("coalesce");
    let firsts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let p = HoldsTheFirst {
        queue: q.clone(),
        others: OTHERS,
        firsts: firsts.clone(),
        together: tokio::sync::Barrier::new(OTHERS as usize),
    };
    let mut hs = Harness::start_with(config(&q, &[("amqp.prefetch", "16")]), p).await;
    let mut out = hs.watch_output().await;
    let sessions = hs.status.sessions();
    let first_session = *sessions.borrow();
    for n in 0..=OTHERS {
        hs.publish(
            "test.k",
            json!({ "n": n }).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let mut got = Vec::new();
    for _ in 0..=OTHERS {
        let d = next(&mut out).await;
        let v: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
        got.push(v["n"].as_u64().unwrap());
    }
    let retried = format!("storagetier_messages_total{{queue=\"{q}\",outcome=\"retry\"}} 1");
    wait_until("the give-back counted as a retry", || {
        framework::telemetry::metrics_handle()
            .render()
            .lines()
            .any(|l| l == retried)
    })
    .await;
    let rendered = framework::telemetry::metrics_handle().render();
    assert!(
        !rendered
            .lines()
            .filter(|l| l.contains(&format!("queue=\"{q}\"")))
            .any(|l| l.contains("outcome=\"interrupted\"") && !l.ends_with(" 0")),
        "nothing was given back to the queue"
    );
    assert_eq!(
        got.last(),
        Some(&0),
        "the held message came back and succeeded last"
    );
    got.sort_unstable();
    assert_eq!(
        got,
        (0..=OTHERS).collect::<Vec<_>>(),
        "each message succeeded once"
    );
    assert_eq!(firsts.load(std::sync::atomic::Ordering::SeqCst), 1);
    wait_until("every success counted once acked", || {
        successes(&q) == OTHERS + 1
    })
    .await;
    assert_eq!(*sessions.borrow(), first_session, "no channel closed");
    // `Q` once the service stopped (while it consumes, nothing there is counted ready).
    hs.stop().await;
    assert_eq!(ready_count(&hs.ch, &hs.q).await, 0);
}

/// A header near AMQP's frame limit (128 KiB): a retry or dead letter of the message with
/// the framework's own headers added would not fit in one frame, and RabbitMQ closes the
/// whole connection over a frame too large — every handler's, on every redelivery.
#[tokio::test]
async fn headers_that_leave_no_room_for_a_retry_never_cost_the_session() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |v, ctx| {
        if v["grow"].as_bool() == Some(true) {
            // A processor's retry header that overflows the frame by itself.
            ctx.set_retry_header("x-progress-of-sorts", &"y".repeat(131 * 1024));
        }
        if v["retry"].as_bool() == Some(true) {
            Outcome::retry("e".repeat(1000))
        } else {
            Outcome::success(v.clone())
        }
    });
    let mut hs = Harness::start("frame", &[], p).await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let sessions = hs.status.sessions();
    let first_session = *sessions.borrow();

    // Accepted by the broker (under 128 KiB), but a retry of it would not be.
    let mut near = FieldTable::default();
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    h::set_str(&mut near, "traceparent", parent);
    h::set_str(&mut near, "x-pad", &"p".repeat(130_400));
    hs.publish(
        "test.near",
        br#"{"retry": true}"#,
        BasicProperties::default().with_headers(near),
    )
    .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, br#"{"retry": true}"#, "body kept whole");
    assert_eq!(
        header(&d, h::ERROR_KIND).as_deref(),
        Some(h::KIND_PERMANENT)
    );
    let e = header(&d, h::ERROR).unwrap();
    assert!(e.contains("headers take"), "{e}");
    assert_eq!(header(&d, "x-pad"), None, "dead-lettered without them");
    assert!(
        header(&d, "traceparent").is_some_and(|t| t.contains("0af7651916cd43dd8448eb211c80319c")),
        "its trace goes on"
    );
    assert_eq!(
        header(&d, h::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("test.near")
    );
    assert!(calls.lock().unwrap().is_empty(), "never handled");

    // Small headers, but the processor's own retry header overflows the frame.
    hs.publish(
        "test.grow",
        br#"{"retry": true, "grow": true}"#,
        BasicProperties::default(),
    )
    .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, br#"{"retry": true, "grow": true}"#);
    let e = header(&d, h::ERROR).unwrap();
    assert!(e.contains("properties and headers"), "{e}");
    assert_eq!(header(&d, "x-progress-of-sorts"), None);

    // The session lived through both.
    hs.publish("test.after", br#"{"n":1}"#, BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
    assert_eq!(*sessions.borrow(), first_session, "no reconnect");
    hs.stop().await;
}

/// A retry that fits in a frame by less than what the broker adds as its tier hands it
/// back (`x-death`) came back larger than a frame, and the client closed the connection
/// over it — every handler's, at every redelivery. Retries whose processor headers bring
/// them ever nearer the frame: each comes back (and, its headers now over the input
/// budget, is dead-lettered without them) or, with too little room left for the way back,
/// is dead-lettered bare at once; the session lives through all of them.
#[tokio::test]
async fn a_retry_that_would_come_back_over_a_frame_never_costs_the_session() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |v, ctx| {
        let pad = v["pad"].as_u64().unwrap_or(0) as usize;
        ctx.set_retry_header("x-progress-of-sorts", &"y".repeat(pad));
        Outcome::retry("e")
    });
    let mut hs = Harness::start("frameback", &[("retry.delays_ms", "[100]")], p).await;
    let mut dlq = hs.watch_dlq().await;
    let sessions = hs.status.sessions();
    let first_session = *sessions.borrow();
    // 128 KiB less 0.1 to 6 KiB: the window x-death falls in (about 0.3 to 0.5 KiB
    // under a frame with the names here) is crossed whatever the framework's own headers
    // take.
    let (mut bare, mut came_back) = (Vec::new(), Vec::new());
    for short_by in (100..=6000).step_by(100) {
        let body = json!({"pad": 131_072 - short_by}).to_string();
        hs.publish("test.back", body.as_bytes(), BasicProperties::default())
            .await;
        let d = next(&mut dlq).await;
        assert_eq!(d.data, body.as_bytes());
        assert_eq!(header(&d, "x-progress-of-sorts"), None, "without them");
        let e = header(&d, h::ERROR).unwrap_or_default();
        if e.contains("could not publish the retry outcome") {
            assert!(e.contains("kept for the headers the broker adds"), "{e}");
            bare.push(short_by);
        } else {
            assert!(e.contains("the message's headers take"), "{short_by}: {e}");
            came_back.push(short_by);
        }
    }
    assert!(
        !bare.is_empty() && !came_back.is_empty(),
        "{bare:?} {came_back:?}"
    );
    assert!(
        bare.iter().max() < came_back.iter().min(),
        "only those nearest the frame are dead-lettered at once: {bare:?} {came_back:?}"
    );
    assert_eq!(*sessions.borrow(), first_session, "no reconnect");
    hs.stop().await;
}

/// A dead letter's error headers on a message sent back to `Q` through the default
/// exchange (a publish to "", a shovel of a dead letter) are not carried onto its retry:
/// left out of the header budget as a retry's own, one near a frame made every retry of
/// the message too large to publish, and it was dead-lettered at its first failure.
#[tokio::test]
async fn a_dead_letters_error_headers_sent_back_to_the_queue_are_not_carried_on() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |v, ctx| {
        if ctx.attempt < 2 {
            Outcome::retry("e")
        } else {
            Outcome::success(v.clone())
        }
    });
    let mut hs = Harness::start("frameforged", &[("retry.delays_ms", "[100]")], p).await;
    let mut out = hs.watch_output().await;
    let mut forged = FieldTable::default();
    h::set_str(&mut forged, h::ERROR, &"e".repeat(128_500));
    h::set_str(&mut forged, h::ERROR_KIND, h::KIND_PERMANENT);
    h::set_str(&mut forged, h::FAILED_AT, "2020-01-01T00:00:00Z");
    h::set_str(&mut forged, h::PROGRESS_ATTEMPTS, &"0".repeat(500));
    hs.publish_retried(
        "test.forged",
        br#"{"n":1}"#,
        BasicProperties::default().with_headers(forged),
        1,
    )
    .await;
    assert_eq!(
        next(&mut out).await.data,
        br#"{"n":1}"#,
        "retried, then handled"
    );
    let seen = calls.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "attempts 1 and 2");
    for (_, ctx) in &seen {
        for k in [h::ERROR, h::ERROR_KIND, h::FAILED_AT] {
            assert!(!ctx.headers.inner().contains_key(k), "{k} not carried");
        }
        assert!(
            matches!(
                ctx.headers.inner().get(h::PROGRESS_ATTEMPTS),
                Some(AMQPValue::LongLongInt(0))
            ),
            "the count as the number it read as: {:?}",
            ctx.headers.inner().get(h::PROGRESS_ATTEMPTS)
        );
    }
    hs.stop().await;
}

/// A retry's last error sent back to the queue longer than a retry writes one (a forged or
/// shovelled `x-last-error`) is cut as a retry cuts it: carried whole onto the dead letter
/// of a permanent failure, it made that dead letter too large for a frame, and the
/// permanent failure was retried (its work done once more) before it could go.
#[tokio::test]
async fn a_long_last_error_sent_back_costs_a_permanent_failure_no_second_attempt() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_, _| Outcome::permanent("refused"));
    let mut hs = Harness::start("framelast", &[("retry.delays_ms", "[100]")], p).await;
    let mut dlq = hs.watch_dlq().await;
    let mut forged = FieldTable::default();
    // Accepted by the broker, but with a dead letter's own headers over a frame.
    h::set_str(&mut forged, h::LAST_ERROR, &"e".repeat(130_750));
    hs.publish_retried(
        "test.last",
        br#"{"n":1}"#,
        BasicProperties::default().with_headers(forged),
        1,
    )
    .await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, h::ERROR_KIND).as_deref(),
        Some(h::KIND_PERMANENT)
    );
    assert_eq!(calls.lock().unwrap().len(), 1, "handled once");
    let last = header(&d, h::LAST_ERROR).expect("the last error kept");
    assert!(
        last.len() <= h::MAX_ERROR_BYTES,
        "cut: {} bytes",
        last.len()
    );
    assert!(last.ends_with("(130750 bytes in all)"), "the cut said");
    // Not text at all (bytes): no error a retry wrote, dropped.
    let mut forged = FieldTable::default();
    forged.insert(
        h::LAST_ERROR.into(),
        AMQPValue::ByteArray(vec![b'e'; 130_750].into()),
    );
    hs.publish_retried(
        "test.last",
        br#"{"n":2}"#,
        BasicProperties::default().with_headers(forged),
        1,
    )
    .await;
    let d = next(&mut dlq).await;
    assert_eq!(calls.lock().unwrap().len(), 2, "each handled once");
    assert_eq!(header(&d, h::LAST_ERROR), None, "dropped");
    hs.stop().await;
}

/// A header of the framework's name that a retry carries as it came (`x-in-response-to`, a
/// producer's or a forged one) counts against the budget like any other: one near a whole
/// frame is dead-lettered unread, naming its headers. Not counted, the processor did its work and its
/// retry, too large for a frame, was dead-lettered bare (a batch's progress marks lost, its
/// replay doing the work again).
#[tokio::test]
async fn a_carried_framework_header_counts_against_the_budget() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_, _| Outcome::retry("e".repeat(1000)));
    let mut hs = Harness::start("framecarry", &[], p).await;
    let mut dlq = hs.watch_dlq().await;
    let mut big = FieldTable::default();
    // Accepted by the broker (under 128 KiB), but a retry of it would not be.
    h::set_str(&mut big, "x-in-response-to", &"r".repeat(130_000));
    hs.publish(
        "test.carry",
        br#"{"n":1}"#,
        BasicProperties::default().with_headers(big),
    )
    .await;
    let d = next(&mut dlq).await;
    let e = header(&d, h::ERROR).unwrap();
    assert!(e.contains("headers take"), "{e}");
    assert_eq!(calls.lock().unwrap().len(), 0, "dead-lettered unread");
    hs.stop().await;
}

/// Headers just within what leaves room for a retry's own (a frame's 128 KiB less 16 KiB):
/// every retry of the message is handled, not the first only — the headers each retry
/// writes afresh (its counts and errors, the broker's `x-death`) are not the producer's,
/// and counting them dead-lettered the message on its first return as "headers too big".
#[tokio::test]
async fn headers_within_the_budget_are_retried_to_the_end() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |v, ctx| {
        if ctx.attempt < 2 {
            Outcome::retry("e".repeat(1000))
        } else {
            Outcome::success(v.clone())
        }
    });
    let mut hs = Harness::start("framefit", &[("retry.delays_ms", "[100, 200]")], p).await;
    let mut out = hs.watch_output().await;
    let mut near = FieldTable::default();
    h::set_str(&mut near, "x-pad", &"p".repeat(114_000));
    hs.publish(
        "test.fit",
        br#"{"fits": true}"#,
        BasicProperties::default().with_headers(near),
    )
    .await;
    let d = next(&mut out).await;
    assert_eq!(d.data, br#"{"fits":true}"#);
    let attempts: Vec<u32> = calls
        .lock()
        .unwrap()
        .iter()
        .map(|(_, c)| c.attempt)
        .collect();
    assert_eq!(attempts, [0, 1, 2]);
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 0);
    hs.stop().await;
}

/// `CC`/`BCC` headers make RabbitMQ route a publish by their keys too (sender-selected
/// distribution): a retry carrying the input's would also reach the tier they name, and
/// the message would be handled twice.
#[tokio::test]
async fn an_inputs_cc_header_never_routes_its_retry() {
    let calls: Calls = Arc::default();
    let p = recording(&calls, |_v, ctx| {
        if ctx.attempt == 0 {
            Outcome::retry("once more")
        } else {
            Outcome::success(json!({"attempt": ctx.attempt}))
        }
    });
    let mut hs = Harness::start("cc", &[("retry.delays_ms", "[200, 600000]")], p).await;
    let mut out = hs.watch_output().await;
    let mut cc = FieldTable::default();
    cc.insert("CC".into(), AMQPValue::FieldArray(vec![s("600000")].into()));
    hs.publish(
        "test.cc",
        br#"{}"#,
        BasicProperties::default().with_headers(cc),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"attempt":1}"#);
    let long = format!("{}-retry-600000", hs.q);
    assert_eq!(
        ready_count(&hs.ch, &long).await,
        0,
        "no copy in the long tier"
    );
    let second = calls.lock().unwrap()[1].1.headers.clone();
    assert!(!second.contains_key("CC"), "{second:?}");
    hs.stop().await;
}

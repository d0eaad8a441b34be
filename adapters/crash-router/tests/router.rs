//! crash-router against the real RabbitMQ: routing rules, throttles, retries, config.

use std::time::Duration;

use crash_router::CrashRouterService;
use crash_router::router::CrashRouter;
use crash_router::spec::parse_queues;
use framework::lapin::options::QueueDeclareOptions;
use framework::lapin::types::{AMQPValue, FieldTable};
use framework::lapin::{BasicProperties, Channel};
use framework::testing::*;
use serde_json::{Value, json};

/// Destination queues of one test, deleted on drop.
struct Dests(Vec<String>);

impl Drop for Dests {
    fn drop(&mut self) {
        cleanup(self.0.clone(), Vec::new());
    }
}

async fn declare(ch: &Channel, q: &str, args: FieldTable) {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare destination queue");
}

/// `n` unique destination queue names, declared (classic, durable: RabbitMQ 4.3 refuses
/// transient non-exclusive queues by default).
async fn dests(ch: &Channel, n: usize) -> Dests {
    let mut v = Vec::new();
    for _ in 0..n {
        let q = unique("crash-dest");
        declare(ch, &q, FieldTable::default()).await;
        v.push(q);
    }
    Dests(v)
}

fn put(key: &str) -> Value {
    json!({
        "eventVersion": "2.0",
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "crashes"}, "object": {"key": key, "size": 100}}
    })
}

fn raw(id: &str) -> String {
    format!("v2/raw_crash/000/20180313/{id}")
}

/// A crash id whose throttle digit is `digit`, unique by `n`.
fn crash_id(n: u32, digit: char) -> String {
    format!("{n:08x}-2d1c-4865-af09-80bc0{digit}180313")
}

fn text(d: &framework::lapin::message::Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

async fn start(data: &std::path::Path, extra: &[(&str, &str)]) -> Harness {
    Harness::start_service::<CrashRouterService>(service_config::<CrashRouterService>(data, extra))
        .await
}

#[tokio::test]
async fn routes_accepted_crashes_and_skips_the_rest() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 2).await;
    let spec = format!(" {} ,  {} ", d.0[0], d.0[1]);
    let hs = start(data.path(), &[("crash_router.queues", &spec)]).await;
    let mut out = hs.watch_output().await;
    let mut qa = consume(&hs.ch, &d.0[0]).await;
    let mut qb = consume(&hs.ch, &d.0[1]).await;

    let a1 = "00007bd0-2d1c-4865-af09-80bc00180313"; // the design's example: accept
    let a2 = crash_id(2, '0');
    let mut delete = put(&raw(&crash_id(3, '0')));
    delete["eventName"] = json!("ObjectRemoved:Delete");
    let mut s3form = put(&raw(&a2));
    s3form["eventName"] = json!("s3:ObjectCreated:Put");
    let body = json!({"Records": [
        put(&raw(a1)),
        put(&raw(&crash_id(4, '1'))),                       // deferred
        put(&raw(&crash_id(5, '7'))),                       // junk digit
        put(&format!("v2/raw_crash/000/20180313/{}", "00007bd0-2d1c-4865-af09-80bc0018031")), // bad id
        put(&format!("v1/raw_crash/000/20180313/{}", crash_id(6, '0'))), // wrong prefix
        delete,                                             // wrong event
        {"eventName": "ObjectCreated:Put"},                 // missing key: junk
        s3form,
        put(&raw(a1)),                                      // same crash again: published once
    ]});
    hs.publish(
        "crashes.put",
        body.to_string().as_bytes(),
        BasicProperties::default().with_message_id("evt-1".into()),
    )
    .await;

    let o = next(&mut out).await;
    assert_eq!(
        o.routing_key.as_str(),
        "storagetier.crashrouter.crash.success"
    );
    assert_eq!(header(&o, "x-in-response-to").as_deref(), Some("evt-1"));
    let summary: Value = serde_json::from_slice(&o.data).unwrap();
    assert_eq!(summary["records"], 9);
    assert_eq!(summary["accepted"], json!([a1, a2]));
    assert_eq!(
        summary["counts"],
        json!({"accepted": 3, "deferred": 1, "junk": 3, "ignored": 2, "throttled": 0})
    );
    assert_eq!(summary["deliveries"][&d.0[0]], json!([a1, a2]));
    assert_eq!(summary["deliveries"][&d.0[1]], json!([a1, a2]));

    for q in [&mut qa, &mut qb] {
        let m1 = next(q).await;
        assert_eq!(text(&m1), a1);
        assert_eq!(m1.properties.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            m1.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("text/plain")
        );
        assert_eq!(text(&next(q).await), a2);
        assert!(next_within(q, Duration::from_millis(300)).await.is_none());
    }
}

/// Two instances (no seed configured), each handling the same event as a redelivery would
/// reach it: both publish the same ids to the same throttled queues.
#[tokio::test]
async fn a_redelivered_event_makes_the_same_choices_on_another_instance() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let dest = &d.0[0];
    let ids: Vec<String> = (0..40).map(|n| crash_id(1000 + n, '0')).collect();
    let body = json!({"Records": ids.iter().map(|i| put(&raw(i))).collect::<Vec<_>>()});
    let mut seen = Vec::new();
    for _instance in 0..2 {
        let spec = format!("50:{dest}");
        let hs = start(data.path(), &[("crash_router.queues", &spec)]).await;
        let mut out = hs.watch_output().await;
        hs.publish("k", body.to_string().as_bytes(), BasicProperties::default())
            .await;
        let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
        let got = summary["deliveries"]
            .get(dest)
            .cloned()
            .unwrap_or_else(|| json!([]));
        seen.push(got);
    }
    let picked = seen[0].as_array().map_or(0, Vec::len);
    assert!(
        0 < picked && picked < 40,
        "a 50% throttle picks some of 40, got {picked}"
    );
    assert_eq!(seen[0], seen[1], "both instances chose the same ids");
}

#[tokio::test]
async fn accept_digit_1_routes_what_the_original_pigeon_accepted() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let hs = start(
        data.path(),
        &[
            ("crash_router.queues", &d.0[0]),
            ("crash_router.accept_digit", "1"),
        ],
    )
    .await;
    let mut out = hs.watch_output().await;
    let acc = crash_id(1, '1');
    let body = json!({"Records": [put(&raw(&crash_id(9, '0'))), put(&raw(&acc))]});
    hs.publish("k", body.to_string().as_bytes(), BasicProperties::default())
        .await;
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["accepted"], json!([acc]));
    assert_eq!(summary["counts"]["deferred"], 1);
    assert_eq!(ready_count(&hs.ch, &d.0[0]).await, 1);
}

#[tokio::test]
async fn throttles_0_15_100_with_a_fixed_seed() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 3).await;
    let spec = format!("100:{}, 15:{} ,0:{}", d.0[0], d.0[1], d.0[2]);
    let hs = start(
        data.path(),
        &[
            ("crash_router.queues", &spec),
            ("crash_router.seed", "20180313"),
        ],
    )
    .await;
    let mut out = hs.watch_output().await;
    let ids: Vec<String> = (0..60).map(|n| crash_id(n, '0')).collect();
    let body = json!({"Records": ids.iter().map(|i| put(&raw(i))).collect::<Vec<_>>()});
    hs.publish("k", body.to_string().as_bytes(), BasicProperties::default())
        .await;
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();

    // The same seed and queue list make the same draw for each crash id.
    let expect = CrashRouter::new(parse_queues(&spec).unwrap(), '0', '1', Some(20180313));
    let expected_b: Vec<String> = ids
        .iter()
        .filter(|id| expect.select_queues(id).contains(&d.0[1]))
        .cloned()
        .collect();
    assert!(
        !expected_b.is_empty() && expected_b.len() < 30,
        "15% of 60 ids, got {}",
        expected_b.len()
    );
    assert_eq!(summary["deliveries"][&d.0[0]], json!(ids));
    assert_eq!(summary["deliveries"][&d.0[1]], json!(expected_b));
    assert!(summary["deliveries"].get(&d.0[2]).is_none());
    assert_eq!(
        summary["counts"]["throttled"],
        json!(60 + 60 - expected_b.len())
    );
    assert_eq!(ready_count(&hs.ch, &d.0[0]).await, 60);
    assert_eq!(ready_count(&hs.ch, &d.0[1]).await, expected_b.len() as u32);
    assert_eq!(ready_count(&hs.ch, &d.0[2]).await, 0);
}

/// Two destination queues: `first` takes messages, `full` holds one message ("filler")
/// and refuses more (basic.nack) until that one is consumed.
async fn first_and_full(ch: &Channel) -> (String, String, Dests) {
    let first = unique("crash-dest");
    let full = unique("crash-dest");
    let d = Dests(vec![first.clone(), full.clone()]);
    declare(ch, &first, FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    declare(ch, &full, args).await;
    publish(ch, "", &full, b"filler", BasicProperties::default()).await;
    (first, full, d)
}

/// Waits until a failed attempt of `hs`'s message sits in one of its retry tiers.
async fn await_a_retry(hs: &Harness) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r1 = ready_count(&hs.ch, &format!("{}-retry-200", hs.q)).await;
        let r2 = ready_count(&hs.ch, &format!("{}-retry-400", hs.q)).await;
        if r1 + r2 > 0 {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no retry happened");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_retry_does_not_republish_to_a_queue_that_already_got_the_id() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let (first, full, _d) = first_and_full(&ch).await;

    let hs = start(
        data.path(),
        &[("crash_router.queues", &format!("{first},{full}"))],
    )
    .await;
    let mut out = hs.watch_output().await;
    let mut qa = consume(&hs.ch, &first).await;
    let id = crash_id(77, '0');
    let body = json!({"Records": [put(&raw(&id))]});
    hs.publish("k", body.to_string().as_bytes(), BasicProperties::default())
        .await;
    assert_eq!(text(&next(&mut qa).await), id);

    // Wait until the failed attempt sits in a retry tier, then make room in `full`.
    await_a_retry(&hs).await;
    let mut qf = consume(&hs.ch, &full).await;
    assert_eq!(text(&next(&mut qf).await), "filler");
    assert_eq!(text(&next(&mut qf).await), id);

    let o = next(&mut out).await;
    let summary: Value = serde_json::from_slice(&o.data).unwrap();
    assert_eq!(summary["already_published"], 1);
    assert_eq!(summary["deliveries"][&first], json!([id]));
    assert_eq!(summary["deliveries"][&full], json!([id]));
    assert!(
        next_within(&mut qa, Duration::from_millis(300))
            .await
            .is_none(),
        "the first queue got the id only once"
    );
}

/// One destination queue is missing: the queue listed after it still gets every id of the
/// notification at once (not after the retries, or never if they run out), and the retry
/// publishes only the missing queue's ids once it exists — no second copy anywhere.
#[tokio::test]
async fn a_missing_queue_holds_back_only_its_own_ids() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let missing = unique("crash-dest");
    let d = dests(&ch, 1).await;
    let _gone = Dests(vec![missing.clone()]);
    let first = d.0[0].clone();
    let hs = start(
        data.path(),
        &[
            ("crash_router.queues", &format!("{missing},{first}")),
            // Retries never run out however slowly the queue appears.
            ("retry.max_attempts", "1000"),
        ],
    )
    .await;
    let mut out = hs.watch_output().await;
    let mut qa = consume(&hs.ch, &first).await;
    let ids = [crash_id(81, '0'), crash_id(82, '0'), crash_id(83, '0')];
    let body = json!({"Records": ids.iter().map(|id| put(&raw(id))).collect::<Vec<_>>()});
    hs.publish("k", body.to_string().as_bytes(), BasicProperties::default())
        .await;
    for id in &ids {
        assert_eq!(
            &text(&next(&mut qa).await),
            id,
            "the healthy queue got its ids"
        );
    }
    // The attempt waits in a retry tier; the missing queue appears.
    await_a_retry(&hs).await;
    declare(&ch, &missing, FieldTable::default()).await;
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["already_published"], 3);
    assert_eq!(summary["deliveries"][&missing], json!(ids));
    assert_eq!(summary["deliveries"][&first], json!(ids));
    let mut qm = consume(&hs.ch, &missing).await;
    for id in &ids {
        assert_eq!(&text(&next(&mut qm).await), id);
    }
    // The success is published after its outputs are confirmed: nothing more is coming.
    assert!(
        next_within(&mut qa, Duration::from_millis(300))
            .await
            .is_none(),
        "the healthy queue got each id once"
    );
    assert!(
        next_within(&mut qm, Duration::from_millis(300))
            .await
            .is_none(),
        "the missing queue got each id once"
    );
}

/// A destination queue that confirms nothing (a quorum queue that lost its majority)
/// holds back only its own ids, as a missing one does: the other queue gets every id of
/// the notification while it stalls, and the stalled one gets its ids once it answers.
/// Before, each attempt gave up at the stalled queue's first id and retried the whole
/// notification: the healthy queue got nothing until the stalled one answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_that_confirms_nothing_holds_back_only_its_own_ids() {
    use framework::testing::broker::{PrivateBroker, close};
    let broker = PrivateBroker::start().await;
    let data = tempfile::tempdir().unwrap();
    let (stalled, healthy) = (unique("crash-stalled"), unique("crash-healthy"));
    let (conn, ch) = broker.channel().await.expect("private broker reachable");
    declare(&ch, &stalled, FieldTable::default()).await;
    declare(&ch, &healthy, FieldTable::default()).await;
    let url = broker.url();
    let cfg = service_config::<CrashRouterService>(
        data.path(),
        &[
            ("amqp.url", &url),
            // The stalled queue's confirm is given up on after this; the healthy one's
            // must come within it, on a loaded machine too (a second timeout is taken
            // for the connection's, and the whole notification retried).
            ("amqp.operation_timeout_ms", "10000"),
            ("crash_router.queues", &format!("{stalled},{healthy}")),
            // Retries never run out however long the queue stalls.
            ("retry.max_attempts", "1000"),
        ],
    );
    let input = format!("{}-in", cfg.service.queue);
    let pc = framework::cli::processor_configuration::<CrashRouterService>(&cfg)
        .await
        .expect("the processor builds");
    let service = Background::start("crash-router", &cfg, pc);
    let status = service.status.clone();
    wait_until("consuming", || status.is_ready()).await;
    broker.suspend_queue(&stalled, "st_crash_stalled", true);
    let ids = [crash_id(91, '0'), crash_id(92, '0'), crash_id(93, '0')];
    let body = json!({"Records": ids.iter().map(|id| put(&raw(id))).collect::<Vec<_>>()});
    publish(
        &ch,
        &input,
        "k",
        body.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let mut qh = consume(&ch, &healthy).await;
    for id in &ids {
        assert_eq!(
            &text(&next(&mut qh).await),
            id,
            "the healthy queue gets its ids while the other stalls"
        );
    }
    broker.suspend_queue(&stalled, "st_crash_stalled", false);
    // Each id once at least: a publish given up on may land after all.
    let mut qs = consume(&ch, &stalled).await;
    let mut got = std::collections::BTreeSet::new();
    while got.len() < ids.len() {
        got.insert(text(&next(&mut qs).await));
    }
    assert_eq!(got, ids.iter().cloned().collect());
    service.stop().await;
    assert!(
        next_within(&mut qh, Duration::from_millis(300))
            .await
            .is_none(),
        "the healthy queue got each id once"
    );
    close(conn).await;
}

/// An event whose publish to one queue kept failing ran out of retries and was
/// dead-lettered, carrying which queues already got each id: replayed once the queue takes
/// messages again, it publishes only what was missing, never a second copy of a crash to
/// the queue that got it.
#[tokio::test]
async fn a_replayed_dead_letter_publishes_only_to_the_queues_that_missed_the_id() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let (first, full, _d) = first_and_full(&ch).await;
    let hs = start(
        data.path(),
        &[
            ("crash_router.queues", &format!("{first},{full}")),
            ("retry.max_attempts", "1"),
        ],
    )
    .await;
    let id = crash_id(78, '0');
    let body = json!({"Records": [put(&raw(&id))]});
    hs.publish("k", body.to_string().as_bytes(), BasicProperties::default())
        .await;
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), 1).await;
    assert_eq!(ready_count(&hs.ch, &first).await, 1);
    // Room in `full` again, then the operator replays.
    let mut qf = consume(&hs.ch, &full).await;
    assert_eq!(text(&next(&mut qf).await), "filler");
    let mut out = hs.watch_output().await;
    let replayed = hs.replay_all().await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(text(&next(&mut qf).await), id);
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["deliveries"][&full], json!([id]));
    // Its outputs are confirmed before its success: nothing more is coming to `first`.
    assert_eq!(
        ready_count(&hs.ch, &first).await,
        1,
        "the first queue got the id only once"
    );
}

/// The usual fix of a dead-lettered notification: a destination queue was misspelled, the
/// operator corrects `queues` and replays. The queue that had its ids gets none again (the
/// progress of each queue is kept apart from the queue list), the corrected one gets them.
#[tokio::test]
async fn a_replay_after_correcting_a_queue_sends_nothing_twice() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 2).await;
    let (first, corrected) = (d.0[0].clone(), d.0[1].clone());
    let misspelled = format!("{corrected}-typo");
    let mut hs = start(
        data.path(),
        &[
            ("crash_router.queues", &format!("{first},{misspelled}")),
            ("retry.max_attempts", "1"),
        ],
    )
    .await;
    let ids = [crash_id(91, '0'), crash_id(92, '0')];
    let body = json!({"Records": ids.iter().map(|id| put(&raw(id))).collect::<Vec<_>>()});
    hs.publish("k", body.to_string().as_bytes(), BasicProperties::default())
        .await;
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), 1).await;
    assert_eq!(ready_count(&ch, &first).await, 2);
    hs.stop().await;

    // The corrected release, on the same queue, replays the dead letter.
    let fixed = Harness::start_service::<CrashRouterService>(replica_config::<CrashRouterService>(
        data.path(),
        &hs,
        &[("crash_router.queues", &format!("{first},{corrected}"))],
    ))
    .await;
    let mut out = fixed.watch_output().await;
    assert_eq!(fixed.replay_all().await.len(), 1);
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["already_published"], 2, "{summary}");
    assert_eq!(summary["deliveries"][&corrected], json!(ids));
    // The success is published after its outputs are confirmed: nothing more is coming.
    assert_eq!(ready_count(&ch, &corrected).await, 2);
    assert_eq!(
        ready_count(&ch, &first).await,
        2,
        "no second copy in `first`"
    );
}

#[tokio::test]
async fn a_body_that_is_not_an_s3_event_is_dead_lettered() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let hs = start(data.path(), &[("crash_router.queues", &d.0[0])]).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("k", br#"{"records": []}"#, BasicProperties::default())
        .await;
    let dl = next(&mut dlq).await;
    assert_eq!(header(&dl, "x-error-kind").as_deref(), Some("permanent"));
    assert!(header(&dl, "x-error").unwrap().contains("Records"));
    assert_eq!(dl.data, br#"{"records": []}"#);
    // A `Records` that is not an array is named as such, not as missing.
    hs.publish("k", br#"{"Records": {}}"#, BasicProperties::default())
        .await;
    let dl = next(&mut dlq).await;
    let e = header(&dl, "x-error").unwrap();
    assert!(e.contains("whose `Records` is not an array"), "{e}");
}

/// S3 events reaching the bus through SNS (without raw message delivery) or EventBridge are
/// routed like the notifications they carry; SNS's subscription messages and its wrapped
/// S3 test event are dropped, not dead-lettered.
#[tokio::test]
async fn sns_and_eventbridge_deliveries_are_routed() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    // One at a time: the summaries come in publishing order, after every drop before them.
    let hs = start(
        data.path(),
        &[("crash_router.queues", &d.0[0]), ("amqp.prefetch", "1")],
    )
    .await;
    let mut out = hs.watch_output().await;
    let mut q = consume(&hs.ch, &d.0[0]).await;
    let (via_sns, via_eventbridge) = (crash_id(21, '0'), crash_id(22, '0'));
    let sns = |kind: &str, message: String| {
        json!({"Type": kind, "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
               "TopicArn": "arn:aws:sns:us-west-2:123456789012:crashes",
               "Message": message, "Timestamp": "2026-11-29T18:00:00.000Z"})
    };
    let test_event = json!({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "crashes"});
    let eventbridge = json!({"version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103",
        "detail-type": "Object Created", "source": "aws.s3", "account": "111122223333",
        "time": "2026-11-29T18:00:00Z", "region": "us-west-2",
        "resources": ["arn:aws:s3:::crashes"],
        "detail": {"version": "0", "bucket": {"name": "crashes"},
                   "object": {"key": raw(&via_eventbridge), "size": 100},
                   "request-id": "N4N7GDK58NMKJ12R", "requester": "123456789012",
                   "reason": "PutObject"}});
    for (id, body) in [
        (
            "subscribe",
            sns("SubscriptionConfirmation", "confirm".into()),
        ),
        ("test", sns("Notification", test_event.to_string())),
        (
            "sns",
            sns(
                "Notification",
                json!({"Records": [put(&raw(&via_sns))]}).to_string(),
            ),
        ),
        ("unsubscribe", sns("UnsubscribeConfirmation", "bye".into())),
        ("eventbridge", eventbridge),
    ] {
        hs.publish(
            "crashes.put",
            body.to_string().as_bytes(),
            BasicProperties::default().with_message_id(id.into()),
        )
        .await;
    }
    for (id, crash) in [("sns", &via_sns), ("eventbridge", &via_eventbridge)] {
        let o = next(&mut out).await;
        assert_eq!(header(&o, "x-in-response-to").as_deref(), Some(id));
        let summary: Value = serde_json::from_slice(&o.data).unwrap();
        assert_eq!(summary["records"], 1, "{id}");
        assert_eq!(summary["accepted"], json!([crash]), "{id}");
        assert_eq!(&text(&next(&mut q).await), crash);
    }
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 0);
    assert!(
        next_within(&mut q, Duration::from_millis(300))
            .await
            .is_none()
    );
}

/// The notifications real stores send as they are, end to end: MinIO's AMQP target (its
/// own top-level `EventName`/`Key`, `eventSource` `minio:s3`, the key with `/` encoded)
/// and AWS's current event version (2.1, with its extra fields).
#[tokio::test]
async fn minio_and_current_aws_notifications_are_routed() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let hs = start(
        data.path(),
        &[("crash_router.queues", &d.0[0]), ("amqp.prefetch", "1")],
    )
    .await;
    let mut out = hs.watch_output().await;
    let mut q = consume(&hs.ch, &d.0[0]).await;
    let (via_minio, via_aws) = (crash_id(31, '0'), crash_id(32, '0'));
    let minio = json!({
        "EventName": "s3:ObjectCreated:Put",
        "Key": format!("crashes/{}", raw(&via_minio)),
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "",
            "eventTime": "2026-11-29T18:00:00.000Z", "eventName": "s3:ObjectCreated:Put",
            "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "10.0.0.5"},
            "responseElements": {"x-amz-id-2": "dd9025bab4ad464b049177c95eb6ebf374d3b3fd1af9251148b658df7ac2e3e8",
                                 "x-amz-request-id": "1803A5E5A5B1E1C2", "x-minio-deployment-id": "2c1e4f4c",
                                 "x-minio-origin-endpoint": "http://10.0.0.2:9000"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": "crashes", "ownerIdentity": {"principalId": "minioadmin"},
                              "arn": "arn:aws:s3:::crashes"},
                   "object": {"key": raw(&via_minio).replace('/', "%2F"), "size": 100,
                              "eTag": "e3b0c44298fc1c149afbf4c8996fb924",
                              "contentType": "application/octet-stream",
                              "userMetadata": {"content-type": "application/octet-stream"},
                              "sequencer": "1803A5E5A5D3F5B2"}},
            "source": {"host": "10.0.0.5", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.63"}
        }]
    });
    let aws = json!({"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-west-2",
        "eventTime": "2026-11-29T18:00:00.000Z", "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AWS:AIDAJDPLRKLG7UEXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "C3D13FE58DE4C810",
                             "x-amz-id-2": "FMyUVURIY8/IgAtTv8xRjskZQpcIZ9KG4V5Wp6S7S/JRWeUWerMUE5JgHvANOjpD"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "crashes",
               "bucket": {"name": "crashes", "ownerIdentity": {"principalId": "A3NL1KOZZKExample"},
                          "arn": "arn:aws:s3:::crashes"},
               "object": {"key": raw(&via_aws), "size": 100,
                          "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                          "versionId": "096fKKXTRTtl3on89fVO.nfljtsv6qko",
                          "sequencer": "0055AED6DCD90281E5"}}
    }]});
    // MinIO's AMQP target sets no message id, and re-sends an event's body after a
    // reconnect: the re-sent crash id keeps its id, so a consumer can drop the copy.
    let mut minio_ids = Vec::new();
    for _ in 0..2 {
        hs.publish(
            "crashes.put",
            minio.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
        let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
        assert_eq!(summary["accepted"], json!([via_minio]));
        let d = next(&mut q).await;
        assert_eq!(text(&d), via_minio);
        minio_ids.push(d.properties.message_id().clone().expect("an id"));
    }
    assert_eq!(
        minio_ids[0], minio_ids[1],
        "a re-sent event's crash id keeps its id"
    );
    hs.publish(
        "crashes.put",
        aws.to_string().as_bytes(),
        BasicProperties::default().with_message_id("aws".into()),
    )
    .await;
    let o = next(&mut out).await;
    assert_eq!(header(&o, "x-in-response-to").as_deref(), Some("aws"));
    let summary: Value = serde_json::from_slice(&o.data).unwrap();
    assert_eq!(summary["accepted"], json!([via_aws]));
    assert_eq!(text(&next(&mut q).await), via_aws);
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 0);
}

/// `[crash_router] key_prefixes` is what the running service routes by: with Antenna's
/// `v1/raw_crash/` configured, its crashes go out and the default `v2/raw_crash/` ones are
/// ignored.
#[tokio::test]
async fn the_configured_key_prefixes_are_the_ones_routed() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let hs = start(
        data.path(),
        &[
            ("crash_router.queues", &d.0[0]),
            ("crash_router.key_prefixes", r#"["v1/raw_crash/"]"#),
        ],
    )
    .await;
    let mut out = hs.watch_output().await;
    let mut q = consume(&hs.ch, &d.0[0]).await;
    let (v1, v2) = (crash_id(41, '0'), crash_id(42, '0'));
    let body = json!({"Records": [
        put(&format!("v1/raw_crash/20180313/{v1}")),
        put(&raw(&v2)),
    ]});
    hs.publish(
        "crashes.put",
        body.to_string().as_bytes(),
        BasicProperties::default().with_message_id("evt-v1".into()),
    )
    .await;
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["accepted"], json!([v1]));
    assert_eq!(summary["counts"]["ignored"], 1, "{summary}");
    assert_eq!(&text(&next(&mut q).await), &v1);
}

/// An SQS batch (what a queue between S3 and the bus delivers) is opened: each body's
/// notification is routed, whether S3 wrote it to the queue or through SNS; a body that
/// carries no event is a counted junk record, never a silent success.
#[tokio::test]
async fn sqs_batches_are_opened_and_their_crashes_routed() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let hs = start(data.path(), &[("crash_router.queues", &d.0[0])]).await;
    let mut out = hs.watch_output().await;
    let mut q = consume(&hs.ch, &d.0[0]).await;
    let (direct, via_sns) = (crash_id(31, '0'), crash_id(32, '0'));
    let sqs = |id: &str, body: Value| {
        json!({"messageId": id, "receiptHandle": "AQEB",
        "body": body, "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {}, "md5OfBody": "x", "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-west-2:123456789012:crashes",
        "awsRegion": "us-west-2"})
    };
    let sns = json!({"Type": "Notification", "MessageId": "n-1",
        "TopicArn": "arn:aws:sns:us-west-2:123456789012:crashes",
        "Message": json!({"Records": [put(&raw(&via_sns))]}).to_string()});
    let batch = json!({"Records": [
        sqs("m-1", Value::String(json!({"Records": [put(&raw(&direct))]}).to_string())),
        sqs("m-2", Value::String(sns.to_string())),
        sqs("m-3", Value::String(json!({"Event": "s3:TestEvent"}).to_string())),
        sqs("m-4", Value::String("not json".into())),
    ]});
    hs.publish(
        "crashes.put",
        batch.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["accepted"], json!([direct, via_sns]), "{summary}");
    assert_eq!(summary["records"], 4, "{summary}");
    assert_eq!(summary["counts"]["junk"], 1, "{summary}");
    assert_eq!(summary["counts"]["ignored"], 1, "{summary}");
    let mut got = vec![text(&next(&mut q).await), text(&next(&mut q).await)];
    got.sort();
    let mut want = vec![direct, via_sns];
    want.sort();
    assert_eq!(got, want);
}

/// An SNS topic's notifications as Lambda receives them (`EventSource` `aws:sns`, the
/// envelope under `Sns`) are opened like an SQS batch: each envelope's S3 notification is
/// routed — not taken for a record without an `eventName` and skipped as junk, its crash
/// lost behind a success.
#[tokio::test]
async fn sns_notifications_as_lambda_receives_them_are_opened_and_routed() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let hs = start(data.path(), &[("crash_router.queues", &d.0[0])]).await;
    let mut out = hs.watch_output().await;
    let mut q = consume(&hs.ch, &d.0[0]).await;
    let id = crash_id(33, '0');
    let sns = |message_id: &str, message: &str| {
        json!({"EventSource": "aws:sns", "EventVersion": "1.0",
        "EventSubscriptionArn": "arn:aws:sns:us-west-2:123456789012:crashes:2bcfbf39",
        "Sns": {"Type": "Notification", "MessageId": message_id,
            "TopicArn": "arn:aws:sns:us-west-2:123456789012:crashes",
            "Subject": "Amazon S3 Notification", "Message": message,
            "Timestamp": "2018-03-13T00:00:00.000Z", "SignatureVersion": "1",
            "Signature": "EXAMPLE", "MessageAttributes": {}}})
    };
    let batch = json!({"Records": [
        sns("n-1", &json!({"Records": [put(&raw(&id))]}).to_string()),
        sns("n-2", "not json"),
    ]});
    hs.publish(
        "crashes.put",
        batch.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["accepted"], json!([id]), "{summary}");
    assert_eq!(summary["records"], 2, "{summary}");
    assert_eq!(summary["counts"]["junk"], 1, "{summary}");
    assert_eq!(text(&next(&mut q).await), id);
}

/// Stopped (SIGTERM) in the middle of a notification of thousands of crashes, the router
/// stops publishing in time to retry the rest with what it published marked: no crash id
/// is published twice (a handler stopped by the drain budget gives its message back as it
/// came, and a redelivery published every id again, on every rolling deploy).
#[tokio::test]
async fn a_notification_stopped_with_the_service_keeps_what_it_published() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let mut hs = start(
        data.path(),
        &[
            ("crash_router.queues", &d.0[0]),
            // Publishing goes on while more than a publish's 5 s and the retry's 2 s are
            // left: the first 100 ms of the drain.
            ("amqp.drain_timeout_ms", "7100"),
            ("retry.delays_ms", "[600000]"),
        ],
    )
    .await;
    let n = 9000;
    let records: Vec<Value> = (0..n).map(|i| put(&raw(&crash_id(i, '0')))).collect();
    hs.publish(
        "crashes.put",
        json!({ "Records": records }).to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready_count(&ch, &d.0[0]).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no crash id published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    hs.stop().await;
    let tier = format!("{}-retry-600000", hs.q);
    await_ready_count(&hs.ch, &tier, 1).await;
    let published = ready_count(&ch, &d.0[0]).await;
    assert!(published < n, "stopped before the end: {published}");
    let mut waiting = consume(&ch, &tier).await;
    let r = next(&mut waiting).await;
    let sent = header(&r, crash_router::router::SENT_HEADER).expect("progress kept");
    let marked: u32 = serde_json::from_str::<Vec<Value>>(&sent)
        .expect("a JSON array")
        .iter()
        .map(|m| match m {
            Value::Array(r) => (r[1].as_u64().unwrap() - r[0].as_u64().unwrap() + 1) as u32,
            Value::String(s) if s.parse::<u32>().is_ok() => 1,
            _ => 0,
        })
        .sum();
    assert_eq!(
        marked, published,
        "every id published, and only those, is marked"
    );
    assert_eq!(
        ready_count(&hs.ch, &hs.q).await,
        0,
        "not given back as it came"
    );
}

fn run_bin(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = isolated_command(env!("CARGO_BIN_EXE_crash-router"));
    cmd.args(args)
        .current_dir(dir.path())
        .env_remove("APP_ENV")
        .env_remove("STORAGETIER_CONFIG_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output_within(WAIT).unwrap()
}

#[test]
fn a_bad_queue_spec_exits_2_naming_the_key() {
    for bad in ["a,101:b", "a,,b", "", "15:", "x:q"] {
        let out = run_bin(
            &["check-config"],
            &[("STORAGETIER__CRASH_ROUTER__QUEUES", bad)],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("crash_router.queues"), "{bad}: {err}");
    }
    let out = run_bin(
        &["check-config"],
        &[("STORAGETIER__CRASH_ROUTER__ACCEPT_DIGIT", "7")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("crash_router.accept_digit"));
}

#[test]
fn check_config_shows_the_defaults_and_env_overrides() {
    let out = run_bin(&["check-config"], &[]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cfg["settings"]["queues"], "socorro.normal");
    assert_eq!(cfg["settings"]["accept_digit"], "0");
    assert_eq!(cfg["settings"]["seed"], Value::Null);
    assert_eq!(cfg["settings"]["key_prefixes"], json!(["v2/raw_crash/"]));
    assert_eq!(cfg["service"]["queue"], "storagetier-crash-router");

    let out = run_bin(
        &["check-config"],
        &[
            (
                "STORAGETIER__CRASH_ROUTER__QUEUES",
                "socorro.normal, 15:socorro.submitter",
            ),
            ("STORAGETIER__CRASH_ROUTER__SEED", "42"),
            (
                "STORAGETIER__CRASH_ROUTER__KEY_PREFIXES",
                "v2/raw_crash/,v1/raw_crash/",
            ),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cfg["settings"]["seed"], 42);
    assert_eq!(
        cfg["settings"]["key_prefixes"],
        json!(["v2/raw_crash/", "v1/raw_crash/"])
    );
    // One prefix alone (no comma) is a list of one; a prefix without its `/` is refused.
    let out = run_bin(
        &["check-config"],
        &[("STORAGETIER__CRASH_ROUTER__KEY_PREFIXES", "v1/raw_crash/")],
    );
    let cfg: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cfg["settings"]["key_prefixes"], json!(["v1/raw_crash/"]));
    let out = run_bin(
        &["check-config"],
        &[("STORAGETIER__CRASH_ROUTER__KEY_PREFIXES", "v1/raw_crash")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("crash_router.key_prefixes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An SQS batch of a few envelopes whose bodies each hold thousands of `Records` is
/// dead-lettered whole as too many records once the first body is counted, before its
/// records are classified or another body is opened: expanded first, 8 bodies of a
/// million elements (16 MiB) were 8 million junk records, a gigabyte, and the service was
/// killed at every redelivery.
#[tokio::test]
async fn sqs_bodies_past_max_records_are_dead_lettered_unexpanded() {
    let data = tempfile::tempdir().unwrap();
    let (_c, ch) = test_channel().await;
    let d = dests(&ch, 1).await;
    let hs = start(
        data.path(),
        &[("crash_router.queues", &d.0[0]), ("amqp.max_records", "10")],
    )
    .await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    // 4 envelopes (under the limit), 20,000 records inside; the first body holds 5,000.
    let sqs: Vec<Value> = [5000, 5001, 5002, 4997]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            json!({"messageId": format!("m-{i}"), "eventSource": "aws:sqs",
                   "body": json!({"Records": vec![0; n]}).to_string()})
        })
        .collect();
    let body = json!({ "Records": sqs }).to_string();
    hs.publish("crashes.put", body.as_bytes(), BasicProperties::default())
        .await;
    let dl = next(&mut dlq).await;
    assert_eq!(header(&dl, "x-error-kind").as_deref(), Some("permanent"));
    let e = header(&dl, "x-error").unwrap_or_default();
    // The count stopped at the first body: expanded, it would name all 20,000.
    assert!(
        e.starts_with("5000 records in one message, more than [amqp] max_records = 10"),
        "{e}"
    );
    assert_eq!(dl.data, body.as_bytes());
    // A batch within the limit is opened and routed as ever.
    let id = crash_id(41, '0');
    let ok = json!({"Records": [{"messageId": "m-ok", "eventSource": "aws:sqs",
        "body": json!({"Records": [put(&raw(&id))]}).to_string()}]});
    hs.publish(
        "crashes.put",
        ok.to_string().as_bytes(),
        BasicProperties::default(),
    )
    .await;
    let summary: Value = serde_json::from_slice(&next(&mut out).await.data).unwrap();
    assert_eq!(summary["accepted"], json!([id]), "{summary}");
    assert_eq!(summary["records"], 1, "{summary}");
}

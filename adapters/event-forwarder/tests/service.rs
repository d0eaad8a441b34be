//! event-forwarder against the real RabbitMQ and a real local HTTP server.

use event_forwarder::EventForwarderService;
use framework::lapin::BasicProperties;
use framework::lapin::message::Delivery;
use framework::testing::*;
use serde_json::{Value, json};
use wiremock::matchers::{body_string, body_string_contains, header as http_header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const TOKEN: &str = "tok-9f8e7d6c5b4a";

async fn start(server: &MockServer, data: &std::path::Path, extra: &[(&str, &str)]) -> Harness {
    let endpoint = format!("{}/events", server.uri());
    let mut all: Vec<(&str, &str)> = vec![("event_forwarder.endpoint", endpoint.as_str())];
    if !extra
        .iter()
        .any(|(k, _)| k.starts_with("event_forwarder.token"))
    {
        all.push(("event_forwarder.token", TOKEN));
    }
    all.extend_from_slice(extra);
    Harness::start_service::<EventForwarderService>(service_config::<EventForwarderService>(
        data, &all,
    ))
    .await
}

/// The service in ordered mode (one event at a time), giving up after `max_attempts`.
async fn start_ordered(server: &MockServer, data: &std::path::Path, max_attempts: u32) -> Harness {
    let n = max_attempts.to_string();
    start(
        server,
        data,
        &[
            ("event_forwarder.ordered", "true"),
            ("amqp.prefetch", "1"),
            ("retry.max_attempts", &n),
        ],
    )
    .await
}

fn json_of(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data).unwrap()
}

/// An endpoint answering every POST with `status`.
async fn answering(status: u16) -> MockServer {
    answering_after(status, std::time::Duration::ZERO).await
}

/// An endpoint answering `answer` to every POST whose body holds `marker`, 200 to the rest.
async fn answering_on(marker: &str, answer: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(body_string_contains(marker))
        .respond_with(answer)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

/// An endpoint answering every POST with `status` after `delay`.
async fn answering_after(status: u16, delay: std::time::Duration) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(status).set_delay(delay))
        .mount(&server)
        .await;
    server
}

fn with_id(id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(id.into())
}

/// No header of `d` contains the token.
fn assert_no_token(d: &Delivery) {
    if let Some(h) = d.properties.headers() {
        for (k, v) in h.inner() {
            assert!(
                !format!("{v:?}").contains(TOKEN),
                "token leaked in header {k}"
            );
        }
    }
    assert!(!String::from_utf8_lossy(&d.data).contains(TOKEN));
}

/// Waits (at most `WAIT`) until the endpoint has received `n` POSTs.
async fn await_posts(server: &MockServer, n: usize) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while bodies(server).await.len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} POSTs came in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

async fn bodies(server: &MockServer) -> Vec<String> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| String::from_utf8(r.body.clone()).unwrap())
        .collect()
}

/// How many POSTs the endpoint received whose body holds `marker`.
async fn posts_of(server: &MockServer, marker: &str) -> usize {
    bodies(server)
        .await
        .iter()
        .filter(|b| b.contains(marker))
        .count()
}

#[tokio::test]
async fn an_event_is_posted_unchanged_with_the_token() {
    let server = MockServer::start().await;
    let body = r#"{"type":"member-registered", "data":{"z":1,"a":[2,1]},"Records":"not kinesis"}"#;
    Mock::given(method("POST"))
        .and(path("/events"))
        .and(http_header("Authorization", TOKEN))
        .and(http_header("Content-Type", "application/json"))
        .and(body_string(body))
        .respond_with(ResponseTemplate::new(204))
        .expect(1)
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    hs.publish("member.registered", body.as_bytes(), with_id("ev-1"))
        .await;
    let o = next(&mut out).await;
    assert_eq!(
        o.routing_key.as_str(),
        "storagetier.eventforwarder.event.success"
    );
    assert_eq!(header(&o, "x-in-response-to").as_deref(), Some("ev-1"));
    let s = json_of(&o);
    assert_eq!(s["kind"], "event");
    assert_eq!(s["status"], 204);
    assert_no_token(&o);
}

#[tokio::test]
async fn a_4xx_dead_letters_the_event_without_the_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        // An endpoint that echoes the token it was sent: the token must not reach the
        // dead letter's x-error (nor the logs) through the quoted answer.
        .respond_with(
            ResponseTemplate::new(422).set_body_string(format!("invalid member (auth {TOKEN})")),
        )
        .expect(1)
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut dlq = hs.watch_dlq().await;
    let body = br#"{"type":"bad"}"#;
    hs.publish("member.bad", body, with_id("ev-2")).await;
    let d = next(&mut dlq).await;
    assert_eq!(
        d.data,
        body.to_vec(),
        "dead letter keeps the body byte-for-byte"
    );
    assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
    let err = header(&d, "x-error").unwrap();
    assert!(
        err.contains("422") && err.contains("invalid member"),
        "{err}"
    );
    assert_no_token(&d);
}

#[tokio::test]
async fn a_5xx_is_retried_until_delivered() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    hs.publish("k", br#"{"n":1}"#, with_id("ev-3")).await;
    let o = next(&mut out).await;
    assert_eq!(int_header(&o, "x-retry-count"), None);
    assert_eq!(json_of(&o)["status"], 200);
    assert_eq!(bodies(&server).await, vec![r#"{"n":1}"#; 2]);
}

/// An endpoint's `Retry-After` is honoured: the retry waits in the first tier at least
/// that long instead of coming back at once to be refused again.
#[tokio::test]
async fn a_retry_after_sends_the_retry_through_a_tier_that_long() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "30"))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(
        &server,
        data.path(),
        &[("retry.delays_ms", "[200, 600000]")],
    )
    .await;
    hs.publish("k", br#"{"n":1}"#, with_id("ev-ra")).await;
    // Far longer than the test: it stays there, POSTed once.
    await_ready_count(&hs.ch, &format!("{}-retry-600000", hs.q), 1).await;
    assert_eq!(bodies(&server).await, vec![r#"{"n":1}"#]);
}

/// In a Kinesis batch, an endpoint that cannot take more now (asking to wait, throttling,
/// unavailable) is not sent the rest of the batch in that attempt: the records after it
/// wait with the retry. An error answer to one record (500) holds back no other.
#[tokio::test]
async fn an_endpoint_that_cannot_take_more_is_not_sent_the_rest_of_the_batch() {
    for (case, answer, posted_in_attempt) in [
        (
            "503 + Retry-After",
            ResponseTemplate::new(503).insert_header("Retry-After", "30"),
            2,
        ),
        ("429", ResponseTemplate::new(429), 2),
        ("500", ResponseTemplate::new(500), 3),
    ] {
        let server = answering_on("seq-2", answer).await;
        let data = tempfile::tempdir().unwrap();
        // A retry waits far longer than the test: the message stays in the long tier.
        let delays = if case.contains("Retry-After") {
            "[200, 600000]"
        } else {
            "[600000]"
        };
        let hs = start(&server, data.path(), &[("retry.delays_ms", delays)]).await;
        let body = json!({"Records": [record("seq-1"), record("seq-2"), record("seq-3")]});
        hs.publish(
            "kinesis",
            body.to_string().as_bytes(),
            with_id("batch-wait"),
        )
        .await;
        let tier = format!("{}-retry-600000", hs.q);
        await_ready_count(&hs.ch, &tier, 1).await;
        let posted = bodies(&server).await;
        assert_eq!(posted.len(), posted_in_attempt, "{case}: {posted:?}");
        assert!(posted[0].contains("seq-1") && posted[1].contains("seq-2"));
        let (_c, ch) = test_channel().await;
        let mut waiting = consume(&ch, &tier).await;
        let d = next(&mut waiting).await;
        let (done, pending) = if posted_in_attempt == 2 {
            (r#"["0"]"#, "2 of 3 records")
        } else {
            (r#"["0","2"]"#, "1 of 3 records")
        };
        assert_eq!(
            header(&d, "x-event-forwarder-done").as_deref(),
            Some(done),
            "{case}"
        );
        assert!(
            header(&d, "x-last-error").is_some_and(|e| e.contains(pending)),
            "{case}: {:?}",
            header(&d, "x-last-error")
        );
    }
}

/// On the last attempt a slow or failing answer (502, 504: it may be one record's trouble,
/// a record crashing the endpoint behind a gateway) holds back no other record: held back,
/// the records after it were dead-lettered unsent with it, and held back again at every
/// replay. The dead letter marks the others done, so its replay posts only the failing one.
#[tokio::test]
async fn on_the_last_attempt_a_failing_record_holds_back_no_other() {
    for status in [502, 504] {
        let server = answering_on("seq-2", ResponseTemplate::new(status)).await;
        let data = tempfile::tempdir().unwrap();
        let extra = [("retry.max_attempts", "1"), ("retry.delays_ms", "[100]")];
        let mut hs = start(&server, data.path(), &extra).await;
        let mut dlq = hs.watch_dlq().await;
        let body = json!({"Records": [record("seq-1"), record("seq-2"), record("seq-3")]});
        hs.publish("kinesis", body.to_string().as_bytes(), with_id("last-try"))
            .await;
        let d = next(&mut dlq).await;
        assert_eq!(
            header(&d, "x-error-kind").as_deref(),
            Some("retries-exhausted"),
            "{status}"
        );
        assert_eq!(
            header(&d, "x-event-forwarder-done").as_deref(),
            Some(r#"["0","2"]"#),
            "{status}"
        );
        let posted = bodies(&server).await;
        assert_eq!(
            posted.iter().filter(|b| b.contains("seq-3")).count(),
            1,
            "{status}: {posted:?}"
        );
        assert_eq!(
            posted.iter().filter(|b| b.contains("seq-1")).count(),
            1,
            "{status}: {posted:?}"
        );
        hs.stop().await;
    }
}

/// A record whose own error answers (500) share a batch with one the endpoint is too busy
/// to take (503): its answers count toward `max_attempts` as a lone event's would, and it
/// is dead-lettered alone when they are used up, the busy record waiting out the outage.
/// The busy record made every attempt an outage's, uncounted for a day, and the failing
/// record was posted again every two minutes all that time.
#[tokio::test]
async fn a_busy_records_outage_does_not_hide_another_records_errors() {
    let server = MockServer::start().await;
    for (marker, status) in [("seq-1", 500), ("seq-2", 503)] {
        Mock::given(body_string_contains(marker))
            .respond_with(ResponseTemplate::new(status))
            .mount(&server)
            .await;
    }
    let data = tempfile::tempdir().unwrap();
    let extra = [("retry.max_attempts", "1"), ("retry.delays_ms", "[100]")];
    let mut hs = start(&server, data.path(), &extra).await;
    let mut dlq = hs.watch_dlq().await;
    let body = json!({"Records": [record("seq-1"), record("seq-2")]});
    hs.publish(
        "kinesis",
        body.to_string().as_bytes(),
        with_id("busy-and-poison"),
    )
    .await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    let dead = String::from_utf8_lossy(&d.data).to_string();
    assert!(
        dead.contains("seq-1") && !dead.contains("seq-2"),
        "the failing record alone: {dead}"
    );
    hs.stop().await;
}

/// A single event back from a retry tier after its POST succeeded but its success
/// message could not be published (the retry carries the done mark): not POSTed again.
#[tokio::test]
async fn a_delivered_event_is_not_posted_again_by_its_retry() {
    use framework::lapin::types::{AMQPValue, FieldTable};
    let server = answering(200).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let mut h = FieldTable::default();
    h.insert(
        event_forwarder::DONE_HEADER.into(),
        AMQPValue::LongString(r#"["0"]"#.into()),
    );
    hs.publish_retried("k", br#"{"n":7}"#, with_id("ev-7").with_headers(h), 1)
        .await;
    let o = json_of(&next(&mut out).await);
    assert_eq!(o["skipped"], json!([0]));
    assert!(bodies(&server).await.is_empty(), "not posted again");
    // A first attempt is posted, and its mark is what a retry would carry.
    hs.publish("k", br#"{"n":8}"#, with_id("ev-8")).await;
    assert_eq!(json_of(&next(&mut out).await)["delivered"], json!([0]));
    assert_eq!(bodies(&server).await, vec![r#"{"n":8}"#]);
}

/// The service's progress mark on a producer's message (not one that came back through a
/// retry or replay) is the producer's: ignored, the event is posted — and its retry (the
/// endpoint refused the first try) carries this attempt's marks, not the producer's.
/// Believed, a forged `x-event-forwarder-done` had the event reported delivered and never
/// posted.
#[tokio::test]
async fn a_producers_progress_mark_is_ignored() {
    use framework::lapin::types::{AMQPValue, FieldTable};
    let server = first_refused(1).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let mut h = FieldTable::default();
    h.insert(
        event_forwarder::DONE_HEADER.into(),
        AMQPValue::LongString(r#"["0"]"#.into()),
    );
    hs.publish("k", br#"{"e":"first"}"#, with_id("ev-9").with_headers(h))
        .await;
    assert_eq!(json_of(&next(&mut out).await)["delivered"], json!([0]));
    assert_eq!(
        bodies(&server).await,
        vec![r#"{"e":"first"}"#, r#"{"e":"first"}"#]
    );
}

fn record(seq: &str) -> Value {
    json!({
        "eventID": format!("shardId-000000000000:{seq}"),
        "eventSource": "aws:kinesis",
        "kinesis": {
            "kinesisSchemaVersion": "1.0",
            "partitionKey": "member",
            "sequenceNumber": seq,
            "data": "eyJ0eXBlIjoibWVtYmVyLXJlZ2lzdGVyZWQifQ==",
        }
    })
}

#[tokio::test]
async fn kinesis_records_succeed_or_fail_on_their_own() {
    let server = MockServer::start().await;
    Mock::given(body_string_contains("seq-bad"))
        .respond_with(ResponseTemplate::new(400).set_body_string("malformed"))
        .mount(&server)
        .await;
    Mock::given(body_string_contains("seq-flaky"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(http_header("Authorization", TOKEN))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    let (ok, bad, flaky) = (record("seq-ok"), record("seq-bad"), record("seq-flaky"));
    let body = json!({"Records": [ok, bad, flaky]});
    hs.publish("kinesis", body.to_string().as_bytes(), with_id("batch-1"))
        .await;

    let d = next(&mut dlq).await;
    let dead = json_of(&d);
    assert_eq!(dead, json!({"Records": [bad]}), "only the refused record");
    let err = header(&d, "x-error").unwrap();
    assert!(
        err.starts_with("record 2 of 3:") && err.contains("400"),
        "{err}"
    );
    assert_no_token(&d);

    let o = next(&mut out).await;
    let s = json_of(&o);
    assert_eq!(s["kind"], "kinesis");
    assert_eq!(
        s["delivered"],
        json!([2]),
        "the retry delivered the flaky record"
    );
    assert_eq!(
        s["skipped"],
        json!([0, 1]),
        "done records are not posted again"
    );

    let posted = bodies(&server).await;
    let count = |seq: &str| posted.iter().filter(|b| b.contains(seq)).count();
    assert_eq!(count("seq-ok"), 1);
    assert_eq!(count("seq-bad"), 1);
    assert_eq!(count("seq-flaky"), 2);
    // Each post is the record's `kinesis` object alone.
    let first: Value = serde_json::from_str(&posted[0]).unwrap();
    assert_eq!(first, ok["kinesis"]);
    assert!(
        next_within(&mut dlq, std::time::Duration::from_millis(300))
            .await
            .is_none()
    );
}

/// A batch that ran out of retries on one record is dead-lettered whole, noting which
/// records were delivered: replayed once the endpoint is back, it posts only the record
/// still undelivered, under the idempotency key its first POSTs had (the endpoint can
/// tell it is the same event); the delivered one is never posted again.
#[tokio::test]
async fn a_replayed_batch_posts_only_its_undelivered_record_under_its_key() {
    let server = MockServer::start().await;
    // The endpoint refuses the late record until it is dead-lettered.
    let refusing = Mock::given(body_string_contains("seq-late"))
        .respond_with(ResponseTemplate::new(503))
        .with_priority(1)
        .mount_as_scoped(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    // An unavailable endpoint's retries counted as any (they are not, for a day, by default).
    let counted = [("retry.max_attempts", "1"), ("retry.max_outage_ms", "0")];
    let hs = start(&server, data.path(), &counted).await;
    let (ok, late) = (record("seq-ok"), record("seq-late"));
    let body = json!({"Records": [ok, late]});
    hs.publish("kinesis", body.to_string().as_bytes(), with_id("batch-r"))
        .await;
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), 1).await;
    drop(refusing);
    let mut out = hs.watch_output().await;
    let replayed = hs.replay_all().await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].kind.as_deref(), Some("retries-exhausted"));
    let summary = json_of(&next(&mut out).await);
    assert_eq!(summary["delivered"], json!([1]));
    assert_eq!(summary["skipped"], json!([0]));
    let requests = server.received_requests().await.unwrap();
    let keys = |seq: &str| -> Vec<String> {
        requests
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.body).contains(seq))
            .map(|r| {
                r.headers
                    .get("Idempotency-Key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_string()
            })
            .collect()
    };
    assert_eq!(
        keys("seq-ok").len(),
        1,
        "the delivered record is not posted again"
    );
    let late_keys = keys("seq-late");
    assert!(late_keys.len() >= 2, "{late_keys:?}");
    assert!(
        late_keys.iter().all(|k| *k == late_keys[0]),
        "one key for one event: {late_keys:?}"
    );
    assert_ne!(late_keys[0], keys("seq-ok")[0]);
}

/// Two identical records in one envelope are two events: when the second one's POST fails,
/// the retry posts it again even though its twin was delivered (progress is kept per
/// record, not per content).
#[tokio::test]
async fn identical_records_are_each_delivered_across_a_retry() {
    let server = MockServer::start().await;
    Mock::given(body_string_contains("seq-twin"))
        .respond_with(ResponseTemplate::new(200))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(body_string_contains("seq-twin"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(2)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let twin = record("seq-twin");
    let body = json!({"Records": [twin, twin]});
    hs.publish(
        "kinesis",
        body.to_string().as_bytes(),
        with_id("batch-twins"),
    )
    .await;
    let s = json_of(&next(&mut out).await);
    assert_eq!(s["delivered"], json!([1]), "{s}");
    assert_eq!(s["skipped"], json!([0]), "{s}");
    let posted = bodies(&server).await;
    assert_eq!(
        posted.iter().filter(|b| b.contains("seq-twin")).count(),
        3,
        "delivered, refused once, delivered"
    );
}

/// A `kinesis` value that is not an object (a string, a number, an array) is still one
/// record of the envelope: each is POSTed on its own, not the envelope as one event.
#[tokio::test]
async fn kinesis_values_of_any_json_type_are_posted_on_their_own() {
    let server = answering(200).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let body = r#"{"Records":[{"kinesis":"plain text"},{"kinesis":42},{"kinesis":{"a":1}},{"kinesis":[1,"b"]}]}"#;
    hs.publish("kinesis", body.as_bytes(), with_id("batch-any"))
        .await;
    let s = json_of(&next(&mut out).await);
    assert_eq!(s["kind"], "kinesis");
    assert_eq!(s["delivered"], json!([0, 1, 2, 3]));
    let mut posted = bodies(&server).await;
    posted.sort();
    let mut expected = vec![r#""plain text""#, "42", r#"{"a":1}"#, r#"[1,"b"]"#];
    expected.sort();
    assert_eq!(posted, expected);
}

#[tokio::test]
async fn the_token_can_come_from_a_file() {
    let server = MockServer::start().await;
    Mock::given(http_header("Authorization", "file-token-123"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let tf = data.path().join("token");
    std::fs::write(&tf, "  file-token-123\n").unwrap();
    let tf = tf.display().to_string();
    let hs = start(&server, data.path(), &[("event_forwarder.token_file", &tf)]).await;
    let mut out = hs.watch_output().await;
    hs.publish("k", b"{}", with_id("ev-5")).await;
    assert_eq!(json_of(&next(&mut out).await)["status"], 200);
}

/// An endpoint answering 503 to the first `n` POSTs of the event named "first", 200 to
/// every other.
async fn first_refused(n: u64) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(body_string_contains("first"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(n)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

/// The `Idempotency-Key` of every POST of the event (or record) named in `server`'s log.
async fn idempotency_keys(server: &MockServer) -> Vec<Option<String>> {
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| {
            r.headers
                .get("idempotency-key")
                .map(|v| v.to_str().unwrap().to_string())
        })
        .collect()
}

/// Every try of one event carries the same `Idempotency-Key` — the message's id; a Kinesis
/// record's `eventID`, else the message's id and the record's place — so an endpoint can
/// drop a repeat (a POST whose answer was lost, a redelivery, a replay). A message
/// without an id and a record without either get none; a blank `eventID` is none.
#[tokio::test]
async fn every_try_of_an_event_carries_the_same_idempotency_key() {
    let server = first_refused(1).await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    hs.publish("k", br#"{"e":"first"}"#, with_id("m1")).await;
    next(&mut out).await;
    hs.publish(
        "k",
        br#"{"Records":[{"eventID":"shardId-000:4955","kinesis":{"a":1}},{"kinesis":{"b":2}},{"eventID":" ","kinesis":{"c":3}}]}"#,
        with_id("m2"),
    )
    .await;
    next(&mut out).await;
    hs.publish("k", br#"{"e":"anonymous"}"#, BasicProperties::default())
        .await;
    next(&mut out).await;
    let keys = idempotency_keys(&server).await;
    // The id (and place), then the start of the posted body's SHA-256.
    let digest = |body: &str| {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(body.as_bytes())[..8])
    };
    let first = format!("m1:{}", digest(r#"{"e":"first"}"#));
    let want: Vec<Option<String>> = vec![
        Some(first.clone()),
        Some(first),
        Some("shardId-000:4955".into()),
        Some(format!("m2:1:{}", digest(r#"{"b":2}"#))),
        // A blank eventID names nothing: the record's place does.
        Some(format!("m2:2:{}", digest(r#"{"c":3}"#))),
        None,
    ];
    assert_eq!(keys, want, "{:?}", bodies(&server).await);
    hs.stop().await;
}

/// A Kinesis record published on its own (a per-record Kinesis → RabbitMQ bridge) is a
/// one-record envelope: its `kinesis` value is POSTed byte-for-byte, not the wrapper, under
/// the key the same record gets inside `Records` (its `eventID`; without one, the message's
/// id and place 0), as the original forwarder posted `record.kinesis`.
#[tokio::test]
async fn a_kinesis_record_on_its_own_is_posted_as_in_a_batch() {
    let server = answering(200).await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let kinesis = r#"{"data":"eyJ0eXBlIjoibWVtYmVyIn0=", "partitionKey":"p","approximateArrivalTimestamp":1.7e9}"#;
    let lone = format!(
        r#"{{"kinesis":{kinesis},"eventSource":"aws:kinesis","eventID":"shardId-000000000000:7"}}"#
    );
    let unnamed = format!(r#"{{"kinesis":{kinesis},"eventSource":"aws:kinesis"}}"#);
    for (body, id) in [
        (lone.clone(), "lone-1"),
        (format!(r#"{{"Records":[{lone}]}}"#), "batch-1"),
        (unnamed.clone(), "lone-2"),
        (format!(r#"{{"Records":[{unnamed}]}}"#), "lone-2"),
    ] {
        hs.publish("kinesis", body.as_bytes(), with_id(id)).await;
        let s = json_of(&next(&mut out).await);
        assert_eq!(s["kind"], "kinesis", "{body}");
        assert_eq!(s["delivered"], json!([0]), "{body}");
    }
    assert_eq!(bodies(&server).await, vec![kinesis; 4]);
    let digest = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(kinesis.as_bytes())[..8])
    };
    let by_place = Some(format!("lone-2:0:{digest}"));
    let by_event_id = Some("shardId-000000000000:7".to_string());
    assert_eq!(
        idempotency_keys(&server).await,
        vec![by_event_id.clone(), by_event_id, by_place.clone(), by_place]
    );
    hs.stop().await;
}

/// A Kinesis record published alone that the endpoint refuses (4xx) is that message's
/// failure: dead-lettered byte for byte as it came, no success published. Before, it was
/// dead-lettered wrapped in an envelope of one and the message counted a success. A
/// one-record envelope is a batch still: its record is dead-lettered and the batch succeeds.
#[tokio::test]
async fn a_refused_kinesis_record_on_its_own_is_dead_lettered_as_it_came() {
    let server = answering(422).await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    let lone = r#"{"kinesis":{"data":"e30="} , "eventSource":"aws:kinesis","eventID":"s:1"}"#;
    hs.publish("kinesis", lone.as_bytes(), with_id("lone-refused"))
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(d.data, lone.as_bytes());
    assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
    let batch = format!(r#"{{"Records":[{lone}]}}"#);
    hs.publish("kinesis", batch.as_bytes(), with_id("batch-refused"))
        .await;
    let o = next(&mut out).await;
    assert_eq!(
        header(&o, "x-in-response-to").as_deref(),
        Some("batch-refused"),
        "the lone record published no success"
    );
    assert_eq!(json_of(&o)["dead_lettered"], json!([0]));
    next(&mut dlq).await;
    hs.stop().await;
}

/// An endpoint that cannot take anything (unreachable, 503, throttling) is an outage:
/// its retries do not count toward `max_attempts` (1 here), so the events sent while it
/// lasts are delivered once it is back instead of dead-lettered; an error answer to one
/// event (500) still counts.
#[tokio::test]
async fn an_unavailable_endpoint_is_waited_out_uncounted() {
    let server = first_refused(3).await;
    Mock::given(body_string_contains("broken"))
        .respond_with(ResponseTemplate::new(500))
        .with_priority(1)
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(&server, data.path(), &[("retry.max_attempts", "1")]).await;
    let mut out = hs.watch_output().await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("k", br#"{"e":"first"}"#, with_id("m1")).await;
    let o = next(&mut out).await;
    assert_eq!(header(&o, "x-in-response-to").as_deref(), Some("m1"));
    hs.publish("k", br#"{"e":"broken"}"#, with_id("m2")).await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    hs.stop().await;
}

/// Two events a producer sent under one message id (a counter restarted, two producers'
/// schemes meeting) get two keys: with the id alone, an endpoint honouring the key
/// answered the second from its record of the first, and the second was lost.
#[tokio::test]
async fn two_events_under_one_id_get_two_idempotency_keys() {
    let server = answering(200).await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    for body in [br#"{"e":1}"#, br#"{"e":2}"#] {
        hs.publish("k", body, with_id("same")).await;
        next(&mut out).await;
    }
    let keys = idempotency_keys(&server).await;
    assert_eq!(keys.len(), 2);
    assert_ne!(keys[0], keys[1], "{keys:?}");
    assert!(
        keys.iter().flatten().all(|k| k.starts_with("same:")),
        "{keys:?}"
    );
    hs.stop().await;
}

/// The POST joins the event's trace (design §6): the input's trace id, this handling as
/// the parent, the input's `tracestate` passed on.
#[tokio::test]
async fn the_post_carries_the_events_trace() {
    use framework::lapin::types::{AMQPValue, FieldTable};
    let server = answering(200).await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(&server, data.path(), &[]).await;
    let mut out = hs.watch_output().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = FieldTable::default();
    for (k, v) in [
        ("traceparent", format!("00-{trace}-00f067aa0ba902b7-01")),
        ("tracestate", "congo=t61rcWkgMzE".to_string()),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    hs.publish(
        "k",
        br#"{"e":"traced"}"#,
        with_id("m1").with_headers(headers),
    )
    .await;
    next(&mut out).await;
    let posts = server.received_requests().await.unwrap();
    let [post] = posts.as_slice() else {
        panic!("one POST, got {}", posts.len());
    };
    let got = |name: &str| {
        post.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let tp = got("traceparent").expect("a traceparent on the POST");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[1], trace, "the input's trace continued: {tp}");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "this handling is the parent: {tp}"
    );
    assert_eq!(got("tracestate").as_deref(), Some("congo=t61rcWkgMzE"));
    hs.stop().await;
}

#[tokio::test]
async fn ordered_mode_retries_in_place_and_keeps_order() {
    // No prefetch given: ordered mode brings its own (one at a time).
    first_waits_for_its_refusals_and_second_after_it(2, &[("event_forwarder.ordered", "true")])
        .await;
}

/// Ordered with `settings`, an event the endpoint refuses (503) `refusals` times is
/// delivered, and the event published after it only then: nothing goes to a retry tier or
/// the dead-letter queue.
async fn first_waits_for_its_refusals_and_second_after_it(
    refusals: u64,
    settings: &[(&str, &str)],
) {
    let server = first_refused(refusals).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), settings).await;
    let mut out = hs.watch_output().await;
    publish_first_and_second(&hs).await;
    let o1 = next(&mut out).await;
    let o2 = next(&mut out).await;
    assert_eq!(header(&o1, "x-in-response-to").as_deref(), Some("m1"));
    assert_eq!(header(&o2, "x-in-response-to").as_deref(), Some("m2"));
    let mut want = vec![r#"{"e":"first"}"#; refusals as usize + 1];
    want.push(r#"{"e":"second"}"#);
    assert_eq!(
        bodies(&server).await,
        want,
        "the second event waits until the first is delivered"
    );
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 0);
    for d in &hs.delays {
        assert_eq!(ready_count(&hs.ch, &format!("{}-retry-{d}", hs.q)).await, 0);
    }
}

#[tokio::test]
async fn ordered_mode_gives_up_after_max_attempts() {
    let server = answering(500).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start_ordered(&server, data.path(), 3).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("k", br#"{"e":"doomed"}"#, with_id("m3")).await;
    let d = next(&mut dlq).await;
    let err = header(&d, "x-error").unwrap();
    assert!(err.contains("gave up after 3 attempts"), "{err}");
    assert_eq!(bodies(&server).await.len(), 3);
    // Counted as the retry tiers would have counted them: the DLQ tells how often it was
    // tried.
    assert_eq!(int_header(&d, "x-retry-count"), Some(3));
}

/// Ordered, an in-place wait and POST that would end past a third of the consumer timeout
/// (the broker's 30 minutes on 3.10/3.11 whatever is configured) is not begun: an event the
/// endpoint answers with errors (not down) is handed back in its place with its counted
/// tries, and dead-lettered once `max_attempts` are made — not dead-lettered at that point
/// whatever `max_attempts` said (the remedy the docs give for Rabble Rouser, raising it,
/// did nothing past 10 minutes), nor taken back by the broker as it came, its attempts
/// starting over, never dead-lettered.
#[tokio::test]
async fn ordered_mode_keeps_an_erring_event_in_place_until_max_attempts() {
    let server = answering(500).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(
        &server,
        data.path(),
        &[
            ("event_forwarder.ordered", "true"),
            // A checkpoint of 20 s; the second wait (20 s) would pass it.
            ("amqp.consumer_timeout_ms", "60000"),
            ("retry.delays_ms", "[100, 20000]"),
            ("retry.max_attempts", "3"),
            ("event_forwarder.timeout_ms", "1000"),
        ],
    )
    .await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("k", br#"{"e":"doomed"}"#, with_id("m-ct")).await;
    let d = next(&mut dlq).await;
    let err = header(&d, "x-error").unwrap();
    assert!(err.contains("gave up after 3 attempts in place"), "{err}");
    assert_eq!(
        bodies(&server).await.len(),
        3,
        "two tries, a hand-back, the third"
    );
}

/// Ordered mode that may hold an event 20 s (a third of a 60 s consumer timeout): after a
/// 100 ms wait, the next (20 s) would pass that; two counted tries; a second per POST.
const HELD_20_S: [(&str, &str); 5] = [
    ("event_forwarder.ordered", "true"),
    ("amqp.consumer_timeout_ms", "60000"),
    ("retry.delays_ms", "[100, 20000]"),
    ("retry.max_attempts", "2"),
    ("event_forwarder.timeout_ms", "1000"),
];

/// Ordered, an endpoint still down (503: not an answer about the event) when the event may
/// be held no longer is waited out with the event in its place: handed back and tried again
/// at once, its tries not counted (two of them here, with `max_attempts` 2), and the event
/// after it waits. Before, the event was dead-lettered at every third of the consumer
/// timeout an outage lasted, and the queue moved on without it.
#[tokio::test]
async fn ordered_mode_keeps_the_event_in_place_through_an_outage() {
    first_waits_for_its_refusals_and_second_after_it(3, &HELD_20_S).await;
}

/// Ordered, an endpoint down whose `Retry-After` (2 minutes) is longer than the event may
/// be held (a third of the consumer timeout: 20 s here) is tried again only once that time
/// has passed — the event waits it out, then is handed back in its place — not handed back
/// and posted again at once, round and round; and an outage older than `[retry]
/// max_outage_ms` (5 s) dead-letters the event as exhausted, naming the outage.
#[tokio::test]
async fn ordered_mode_waits_an_outage_out_only_up_to_max_outage() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "120"))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(
        &server,
        data.path(),
        &[&HELD_20_S[..], &[("retry.max_outage_ms", "5000")]].concat(),
    )
    .await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("k", br#"{"e":"down"}"#, with_id("m-down")).await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    let err = header(&d, "x-error").unwrap();
    assert!(err.contains("longer than [retry] max_outage_ms"), "{err}");
    assert_eq!(
        bodies(&server).await.len(),
        2,
        "posted, held until it could be held no longer, posted again, given up"
    );
}

/// Ordered, a batch record the endpoint is down for (503 to it alone) while it takes the
/// record before it is handed back in its place, and its outage is measured from its first
/// try across the batch's deliveries: the first record's 2xx, posted again at each
/// delivery, started the outage over, and the batch was handed back for ever. The record
/// delivered is not posted again at the batch's next delivery.
#[tokio::test]
async fn an_ordered_records_outage_spans_its_batchs_deliveries() {
    let server = answering_on("seq-down", ResponseTemplate::new(503)).await;
    let data = tempfile::tempdir().unwrap();
    // Longer than one delivery may hold the batch (20 s): it is handed back at least once.
    let hs = start(
        &server,
        data.path(),
        &[&HELD_20_S[..], &[("retry.max_outage_ms", "25000")]].concat(),
    )
    .await;
    let mut dlq = hs.watch_dlq().await;
    let body = json!({"Records": [record("seq-up"), record("seq-down")]});
    hs.publish("kinesis", body.to_string().as_bytes(), with_id("b-outage"))
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(json_of(&d), json!({"Records": [record("seq-down")]}));
    let err = header(&d, "x-error").unwrap();
    assert!(err.contains("longer than [retry] max_outage_ms"), "{err}");
    let ups = posts_of(&server, "seq-up").await;
    assert_eq!(ups, 1, "handed back, the first record is not posted again");
}

/// Ordered, a batch handed back through an outage of the whole endpoint that began after
/// its first record was delivered does not post that record again at its next delivery:
/// posted again, it met the outage, took the batch's outage clock and was dead-lettered
/// as exhausted once that ran out — an event the endpoint had, in the DLQ, that a replay
/// would post again. The record the outage held is the one dead-lettered.
#[tokio::test]
async fn an_ordered_batchs_delivered_record_is_not_posted_again_after_its_hand_back() {
    let server = MockServer::start().await;
    Mock::given(body_string_contains("seq-up"))
        .respond_with(ResponseTemplate::new(200))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .with_priority(2)
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(
        &server,
        data.path(),
        &[&HELD_20_S[..], &[("retry.max_outage_ms", "25000")]].concat(),
    )
    .await;
    let mut dlq = hs.watch_dlq().await;
    let mut out = hs.watch_output().await;
    let body = json!({"Records": [record("seq-up"), record("seq-down")]});
    hs.publish(
        "kinesis",
        body.to_string().as_bytes(),
        with_id("b-all-down"),
    )
    .await;
    let d = next(&mut dlq).await;
    assert_eq!(json_of(&d), json!({"Records": [record("seq-down")]}));
    let err = header(&d, "x-error").unwrap();
    assert!(err.contains("longer than [retry] max_outage_ms"), "{err}");
    let done = json_of(&next(&mut out).await);
    assert_eq!(done["dead_lettered"], json!([1]), "{done}");
    assert_eq!(done["skipped"], json!([0]), "{done}");
    let ups = posts_of(&server, "seq-up").await;
    assert_eq!(ups, 1, "the delivered record posted once");
}

/// Ordered, the tries an endpoint's error answers counted go with an event across the
/// hand-backs that keep its place through an outage: an endpoint answering 500, then down
/// (503), then 500 again dead-letters the event at `max_attempts` (2) — the hand-back does
/// not start its count over, which let an endpoint flapping between errors and outages
/// hold one event for a day.
#[tokio::test]
async fn ordered_mode_keeps_counting_an_events_errors_across_its_hand_backs() {
    let server = MockServer::start().await;
    for (priority, status) in [(1u8, 500u16), (2, 503), (3, 500)] {
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(status))
            .up_to_n_times(1)
            .with_priority(priority)
            .mount(&server)
            .await;
    }
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .with_priority(4)
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &HELD_20_S).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("k", br#"{"e":"flapping"}"#, with_id("m-flap"))
        .await;
    let d = next(&mut dlq).await;
    let err = header(&d, "x-error").unwrap();
    assert!(err.contains("gave up after 2 attempts in place"), "{err}");
    assert_eq!(bodies(&server).await.len(), 3);
}

/// An ordered batch still posting at a third of the consumer timeout goes on in a retry
/// carrying what it posted, as an unordered one does: kept in place, the broker would take
/// it back as it came at the timeout and every record would be posted again, for ever.
#[tokio::test]
async fn an_ordered_batch_near_the_consumer_timeout_goes_on_in_a_retry() {
    let server = answering_after(200, std::time::Duration::from_millis(500)).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(
        &server,
        data.path(),
        &[
            ("event_forwarder.ordered", "true"),
            // A checkpoint 20 s after the delivery; each POST takes half a second, and a
            // batch stops before the checkpoint with room for a POST of the whole timeout
            // (and 2 s), so it posts for about 10 s. The timeout is 16 times a POST: a stall
            // of a loaded machine does not time one out (which would be retried in place);
            // and the longest that leaves room for two POSTs before the checkpoint.
            ("amqp.consumer_timeout_ms", "60000"),
            ("event_forwarder.timeout_ms", "8000"),
            // In-place retries within the consumer timeout, as the start-up check wants.
            ("retry.delays_ms", "[20000]"),
            ("retry.max_attempts", "2"),
        ],
    )
    .await;
    let records: Vec<Value> = (0..80).map(|i| record(&format!("seq-{i}"))).collect();
    hs.publish(
        "kinesis",
        json!({ "Records": records }).to_string().as_bytes(),
        with_id("ordered-long"),
    )
    .await;
    let tier = format!("{}-retry-20000", hs.q);
    let (_c, ch) = test_channel().await;
    let mut waiting = consume(&ch, &tier).await;
    let d = next(&mut waiting).await;
    let done = marks(&header(&d, "x-event-forwarder-done").expect("progress kept"));
    let posted = bodies(&server).await.len();
    assert!(posted < 80, "stopped before the end: {posted}");
    assert!(posted > 0, "posted some before stopping");
    assert_eq!(
        done,
        (0..posted as u64).collect::<Vec<_>>(),
        "every record posted, and only those, is marked done"
    );
}

/// Ordered, a batch whose second record meets an outage it cannot wait out (a third of
/// the consumer timeout) keeps its place: handed back, it posts the second record (not the
/// first again, which it delivered) before anything after it. Gone on in a retry behind the
/// messages after it, its rest reached Rabble Rouser's listener after later events, which
/// drops it as older than what it had.
#[tokio::test]
async fn an_ordered_batch_meeting_a_long_outage_keeps_its_place() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let server = MockServer::start().await;
    // `seq-b` finds the endpoint down while it is retried in place (a second apart); the
    // try after the wait that ends in a hand-back (several seconds) finds it up.
    let firsts = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = firsts.clone();
    let last_b = std::sync::Mutex::new(None::<std::time::Instant>);
    Mock::given(method("POST"))
        .respond_with(move |r: &wiremock::Request| {
            let body = String::from_utf8_lossy(&r.body);
            if body.contains("seq-a") {
                seen.fetch_add(1, Ordering::SeqCst);
                ResponseTemplate::new(200)
            } else if body.contains("seq-b") {
                let mut last = last_b.lock().unwrap();
                let after_a_wait =
                    last.is_some_and(|t| t.elapsed() > std::time::Duration::from_secs(5));
                *last = Some(std::time::Instant::now());
                ResponseTemplate::new(if after_a_wait { 200 } else { 503 })
            } else {
                ResponseTemplate::new(200)
            }
        })
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(
        &server,
        data.path(),
        &[
            ("event_forwarder.ordered", "true"),
            // A hand-back 20 s after the delivery (a third of the consumer timeout).
            ("amqp.consumer_timeout_ms", "60000"),
            ("event_forwarder.timeout_ms", "8000"),
            ("retry.delays_ms", "[1000]"),
            ("retry.max_attempts", "2"),
        ],
    )
    .await;
    let mut out = hs.watch_output().await;
    let body = json!({"Records": [record("seq-a"), record("seq-b")]});
    hs.publish(
        "kinesis",
        body.to_string().as_bytes(),
        with_id("ordered-outage"),
    )
    .await;
    hs.publish(
        "kinesis",
        json!({"Records": [record("seq-c")]}).to_string().as_bytes(),
        with_id("ordered-after"),
    )
    .await;
    let first = json_of(&next(&mut out).await);
    assert_eq!(first["delivered"], json!([1]), "{first}");
    assert_eq!(
        first["skipped"],
        json!([0]),
        "delivered before the hand-back: {first}"
    );
    next(&mut out).await;
    let order: Vec<&str> = bodies(&server)
        .await
        .iter()
        .filter_map(|b| {
            ["seq-a", "seq-b", "seq-c"]
                .into_iter()
                .find(|s| b.contains(s))
        })
        .collect::<Vec<_>>();
    let last_b = order
        .iter()
        .rposition(|s| *s == "seq-b")
        .expect("seq-b posted");
    assert_eq!(
        &order[last_b..],
        ["seq-b", "seq-c"],
        "the batch's rest before the message after it: {order:?}"
    );
    assert_eq!(firsts.load(Ordering::SeqCst), 1, "posted once: {order:?}");
}

/// Ordered, a batch record retried in place until its attempts ran out is dead-lettered
/// with `x-retry-count` counting those tries; the record after it, refused at its first
/// try, with 1.
#[tokio::test]
async fn ordered_dead_lettered_records_count_their_own_tries() {
    let server = MockServer::start().await;
    Mock::given(body_string_contains("seq-down"))
        .respond_with(ResponseTemplate::new(500))
        .mount(&server)
        .await;
    Mock::given(body_string_contains("seq-bad"))
        .respond_with(ResponseTemplate::new(400))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start_ordered(&server, data.path(), 3).await;
    let mut dlq = hs.watch_dlq().await;
    let body = json!({"Records": [record("seq-down"), record("seq-bad")]});
    hs.publish("kinesis", body.to_string().as_bytes(), with_id("b-tries"))
        .await;
    let first = next(&mut dlq).await;
    assert_eq!(json_of(&first), json!({"Records": [record("seq-down")]}));
    assert_eq!(int_header(&first, "x-retry-count"), Some(3));
    let second = next(&mut dlq).await;
    assert_eq!(json_of(&second), json!({"Records": [record("seq-bad")]}));
    assert_eq!(int_header(&second, "x-retry-count"), Some(1));
}

/// Design §2: a message whose retries ran out is dead-lettered `retries-exhausted`, in
/// ordered mode too (issue 14 item 9).
#[tokio::test]
async fn ordered_mode_exhaustion_is_dead_lettered_as_retries_exhausted() {
    let server = answering(500).await;
    let data = tempfile::tempdir().unwrap();
    let hs = start_ordered(&server, data.path(), 2).await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("k", br#"{"e":"exhausted"}"#, with_id("m9"))
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
}

fn run_bin(env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = isolated_command(env!("CARGO_BIN_EXE_event-forwarder"));
    cmd.arg("check-config")
        .current_dir(dir.path())
        .env_remove("APP_ENV")
        .env_remove("STORAGETIER_CONFIG_DIR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output_within(WAIT).unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const EP: &str = "STORAGETIER__EVENT_FORWARDER__ENDPOINT";

#[test]
fn config_errors_exit_2_naming_the_key() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "event_forwarder.endpoint"),
        (&[(EP, "ftp://example.org/x")], "event_forwarder.endpoint"),
        (&[(EP, "not a url")], "event_forwarder.endpoint"),
        (
            &[(EP, "http://u:pw@example.org/")],
            "event_forwarder.endpoint",
        ),
        (
            &[
                (EP, "http://h/"),
                (
                    "STORAGETIER__EVENT_FORWARDER__TOKEN_FILE",
                    "/nonexistent/tok",
                ),
            ],
            "event_forwarder.token_file",
        ),
        (
            &[
                (EP, "http://h/"),
                ("STORAGETIER__EVENT_FORWARDER__TOKEN", TOKEN),
                ("STORAGETIER__EVENT_FORWARDER__TOKEN_FILE", "/etc/hostname"),
            ],
            "event_forwarder.token_file",
        ),
        (
            &[
                (EP, "http://h/"),
                ("STORAGETIER__EVENT_FORWARDER__TIMEOUT_MS", "0"),
            ],
            "event_forwarder.timeout_ms",
        ),
        // Seconds typed for milliseconds.
        (
            &[
                (EP, "http://h/"),
                ("STORAGETIER__EVENT_FORWARDER__TIMEOUT_MS", "10"),
            ],
            "event_forwarder.timeout_ms",
        ),
        (
            &[
                (EP, "http://h/"),
                ("STORAGETIER__EVENT_FORWARDER__BOGUS", "1"),
            ],
            "event_forwarder",
        ),
        // A POST timeout leaving a batch no room before its checkpoint (a third of a
        // one-minute consumer timeout): one record per attempt.
        (
            &[
                (EP, "http://h/"),
                ("STORAGETIER__AMQP__CONSUMER_TIMEOUT_MS", "60000"),
                ("STORAGETIER__EVENT_FORWARDER__TIMEOUT_MS", "15000"),
            ],
            "event_forwarder.timeout_ms",
        ),
        // Ordered, the same: an event that timed out once would be given up on, its
        // in-place retry past the checkpoint — though every attempt fits the consumer
        // timeout.
        (
            &[
                (EP, "http://h/"),
                ("STORAGETIER__EVENT_FORWARDER__ORDERED", "true"),
                ("STORAGETIER__EVENT_FORWARDER__TIMEOUT_MS", "400000"),
            ],
            "event_forwarder.timeout_ms",
        ),
        // In-place retries (49 waits of up to 120 s) longer than the broker's default
        // consumer timeout (30 minutes): taken back mid-retry, started over, never ended.
        (
            &[
                (EP, "http://h/"),
                ("STORAGETIER__EVENT_FORWARDER__ORDERED", "true"),
                ("STORAGETIER__AMQP__CONSUMER_TIMEOUT_MS", "0"),
            ],
            "event_forwarder.ordered",
        ),
    ];
    for (env, key) in cases {
        let (code, _, err) = run_bin(env);
        assert_eq!(code, Some(2), "{env:?}: {err}");
        assert!(err.contains(key), "{env:?}: {err}");
        assert!(!err.contains(TOKEN), "{err}");
    }
    // A private CA's file: missing, or holding no certificate, is refused at start; a
    // real one is taken.
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "just text\n").unwrap();
    let ca = "STORAGETIER__EVENT_FORWARDER__CA_FILE";
    for file in ["/nonexistent/ca.pem", not_pem.to_str().unwrap()] {
        let (code, _, err) = run_bin(&[(EP, "https://h/"), (ca, file)]);
        assert_eq!(code, Some(2), "{file}: {err}");
        assert!(err.contains("event_forwarder.ca_file"), "{file}: {err}");
    }
    framework::testing::tls::make_certificates(dir.path());
    let real = dir.path().join("ca.pem");
    let (code, out, err) = run_bin(&[(EP, "https://h/"), (ca, real.to_str().unwrap())]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ca.pem"), "{out}");
}

#[test]
fn check_config_shows_defaults_and_hides_the_token() {
    let (code, out, err) = run_bin(&[
        (EP, "https://core.example.org/events"),
        ("STORAGETIER__EVENT_FORWARDER__TOKEN", TOKEN),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!out.contains(TOKEN) && !err.contains(TOKEN));
    let cfg: Value = serde_json::from_str(&out).unwrap();
    let s = &cfg["settings"];
    assert_eq!(s["token"], "***");
    assert_eq!(s["endpoint"], "https://core.example.org/events");
    assert_eq!(s["timeout_ms"], 10000);
    assert_eq!(s["ordered"], false);
    assert_eq!(cfg["service"]["queue"], "storagetier-event-forwarder");

    // Ordered mode takes one event at a time whatever prefetch the shared files give.
    let (code, out, err) = run_bin(&[
        (EP, "http://h/"),
        ("STORAGETIER__EVENT_FORWARDER__ORDERED", "true"),
        ("STORAGETIER__AMQP__PREFETCH", "32"),
    ]);
    assert_eq!(code, Some(0), "{err}");
    let cfg: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cfg["amqp"]["prefetch"], 1, "{out}");
    assert_eq!(cfg["amqp"]["concurrency"], 1, "{out}");
}

/// Ordered mode stopped during an in-place backoff: backoffs and a drain budget far beyond
/// the harness's stop bound (WAIT); the backoff and its POST within a third of the consumer
/// timeout (10 minutes), so it is begun.
async fn start_ordered_to_stop(server: &MockServer, data: &std::path::Path) -> Harness {
    start(
        server,
        data,
        &[
            ("event_forwarder.ordered", "true"),
            ("amqp.prefetch", "1"),
            ("amqp.drain_timeout_ms", "600000"),
            ("retry.delays_ms", "[300000]"),
        ],
    )
    .await
}

/// SIGTERM during an ordered in-place backoff ends the backoff at once and hands the event
/// back unacked (it keeps its place in the queue): nothing goes to the retry tiers or the
/// DLQ, and shutdown does not wait out the backoff nor the drain budget.
#[tokio::test]
async fn ordered_mode_stops_backing_off_at_shutdown_and_keeps_the_event_in_place() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start_ordered_to_stop(&server, data.path()).await;
    hs.publish("k", br#"{"e":"waiting"}"#, with_id("m10")).await;
    await_posts(&server, 1).await;
    hs.stop().await;
    await_ready_count(&hs.ch, &hs.q, 1).await;
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 0);
    assert_eq!(
        ready_count(&hs.ch, &format!("{}-retry-300000", hs.q)).await,
        0
    );
}

/// SIGTERM during the in-place wait of an ordered batch that already dead-lettered a
/// record: the rest goes on in a retry carrying that record's mark, as when the wait runs
/// out. Handed back as it came (to keep its place), the next delivery dead-lettered the
/// record again: two copies in the DLQ, and a replay posting it twice.
#[tokio::test]
async fn an_ordered_batch_stopped_after_dead_lettering_a_record_keeps_its_mark() {
    let server = MockServer::start().await;
    Mock::given(body_string_contains("seq-bad"))
        .respond_with(ResponseTemplate::new(400).set_body_string("malformed"))
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start_ordered_to_stop(&server, data.path()).await;
    let records = [record("seq-bad"), record("seq-waits")];
    hs.publish(
        "kinesis",
        json!({ "Records": records }).to_string().as_bytes(),
        with_id("dead-then-wait"),
    )
    .await;
    // The bad record's 400, then the next one's first 503: it waits in place.
    await_posts(&server, 2).await;
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), 1).await;
    hs.stop().await;
    let tier = format!("{}-retry-300000", hs.q);
    await_ready_count(&hs.ch, &tier, 1).await;
    let (_c, ch) = test_channel().await;
    let mut waiting = consume(&ch, &tier).await;
    let d = next(&mut waiting).await;
    let done = marks(&header(&d, "x-event-forwarder-done").expect("progress kept"));
    assert_eq!(done, [0], "the dead-lettered record is marked done");
    assert_eq!(
        ready_count(&hs.ch, &hs.q).await,
        0,
        "not handed back as it came"
    );
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 1);
}

/// The marks of a progress header: strings, and `[first, last]` runs of indices.
fn marks(header: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for item in serde_json::from_str::<Vec<Value>>(header).expect("a JSON array") {
        match item {
            Value::String(m) => out.push(m.parse().expect("an index")),
            Value::Array(r) => out.extend(r[0].as_u64().unwrap()..=r[1].as_u64().unwrap()),
            other => panic!("{other}"),
        }
    }
    out
}

/// Stopped (SIGTERM) in the middle of a long batch, the forwarder stops posting in time
/// to retry the rest with what it posted marked done: nothing is posted twice (a handler
/// stopped by the drain budget gives its message back as it came).
#[tokio::test]
async fn a_batch_stopped_with_the_service_keeps_what_it_posted() {
    let server = answering_after(200, std::time::Duration::from_millis(300)).await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(
        &server,
        data.path(),
        &[
            // Posting goes on while more than one POST's timeout and the retry's 2 s
            // are left: about the first second of the drain.
            ("amqp.drain_timeout_ms", "8000"),
            ("event_forwarder.timeout_ms", "5000"),
            ("retry.delays_ms", "[600000]"),
        ],
    )
    .await;
    let records: Vec<Value> = (0..60).map(|i| record(&format!("seq-{i}"))).collect();
    hs.publish(
        "kinesis",
        json!({ "Records": records }).to_string().as_bytes(),
        with_id("long-batch"),
    )
    .await;
    await_posts(&server, 2).await;
    hs.stop().await;
    let tier = format!("{}-retry-600000", hs.q);
    await_ready_count(&hs.ch, &tier, 1).await;
    let posted = bodies(&server).await;
    assert!(
        posted.len() < 60,
        "stopped before the end: {}",
        posted.len()
    );
    let (_c, ch) = test_channel().await;
    let mut waiting = consume(&ch, &tier).await;
    let d = next(&mut waiting).await;
    let done = marks(&header(&d, "x-event-forwarder-done").expect("progress kept"));
    assert_eq!(
        done,
        (0..posted.len() as u64).collect::<Vec<_>>(),
        "every record posted, and only those, is marked done"
    );
    assert_eq!(
        ready_count(&hs.ch, &hs.q).await,
        0,
        "not given back as it came"
    );
}

#[test]
fn the_bus_commands_need_no_endpoint_but_running_does() {
    // An operator declares the topology or reads the DLQ of a forwarder whose endpoint is
    // not configured here; only running (and check-config) needs it.
    let q = unique("fwd-bus-only");
    let _gone = Cleanup::service(&q, &[200]);
    let dir = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        let mut c = isolated_command(env!("CARGO_BIN_EXE_event-forwarder"));
        c.arg("--config-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("APP_ENV")
            .env_remove("STORAGETIER_CONFIG_DIR")
            .env_remove(EP)
            .env("STORAGETIER__AMQP__URL", amqp_url())
            .env("STORAGETIER__EVENT_FORWARDER__QUEUE", &q)
            .env(
                "STORAGETIER__EVENT_FORWARDER__OUTPUT_EXCHANGE",
                format!("{q}-out"),
            )
            .env(
                "STORAGETIER__EVENT_FORWARDER__INPUT_EXCHANGE",
                format!("{q}-in"),
            )
            .env("STORAGETIER__RETRY__DELAYS_MS", "200");
        c.output_within(WAIT).unwrap()
    };
    for args in [&["declare"][..], &["definitions"], &["dlq", "list"]] {
        let o = cmd(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
    }
    for args in [&["check-config"][..], &["run"]] {
        let o = cmd(args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("event_forwarder.endpoint"), "{args:?}: {err}");
    }
}

/// An endpoint that takes two events, then answers 429, again and again.
struct TwoThenBusy(std::sync::atomic::AtomicUsize);

impl wiremock::Respond for TwoThenBusy {
    fn respond(&self, _: &wiremock::Request) -> ResponseTemplate {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ResponseTemplate::new(if n % 3 == 2 { 429 } else { 200 })
    }
}

/// A batch that a rate-limited endpoint lets through two records per attempt needs more
/// attempts than `max_attempts` (2 here): attempts that delivered records are not
/// counted, so every record is delivered instead of the rest being dead-lettered.
#[tokio::test]
async fn a_batch_making_progress_is_not_given_up_on() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(TwoThenBusy(Default::default()))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let hs = start(&server, data.path(), &[("retry.max_attempts", "2")]).await;
    let mut out = hs.watch_output().await;
    let seqs: Vec<String> = (1..=12).map(|i| format!("seq-{i}")).collect();
    let body = json!({"Records": seqs.iter().map(|s| record(s)).collect::<Vec<_>>()});
    hs.publish(
        "kinesis",
        body.to_string().as_bytes(),
        with_id("slow-batch"),
    )
    .await;
    let done = json_of(&next(&mut out).await);
    assert_eq!(
        done["delivered"].as_array().map(Vec::len),
        Some(2),
        "{done}"
    );
    assert_eq!(done["skipped"].as_array().map(Vec::len), Some(10), "{done}");
    let dlq = format!("{}-dlq", hs.q);
    assert_eq!(ready_count(&hs.ch, &dlq).await, 0, "nothing dead-lettered");
    // Every record was taken by the endpoint once (each 429 was posted again).
    let posted = bodies(&server).await;
    assert_eq!(posted.len(), 12 + 5, "{posted:?}");
}

/// A token rotated in its file while the service runs (a mounted secret) is picked up
/// when the endpoint refuses the old one: the event is delivered with the new token, not
/// dead-lettered, and the next one goes with the new token at once.
#[tokio::test]
async fn a_rotated_token_file_is_read_again_when_the_endpoint_refuses_the_token() {
    let server = MockServer::start().await;
    Mock::given(http_header("Authorization", "token-new"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    // Slow to refuse: concurrent events all go out with the old token before the first
    // refusal makes one handler read the new one.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_delay(std::time::Duration::from_millis(200)))
        .mount(&server)
        .await;
    let data = tempfile::tempdir().unwrap();
    let tf = data.path().join("token");
    std::fs::write(&tf, "token-old\n").unwrap();
    let hs = start(
        &server,
        data.path(),
        &[("event_forwarder.token_file", &tf.display().to_string())],
    )
    .await;
    let mut out = hs.watch_output().await;
    std::fs::write(&tf, "token-new\n").unwrap();
    for i in 0..4 {
        hs.publish(
            "k",
            format!(r#"{{"n":{i}}}"#).as_bytes(),
            with_id(&format!("rotated-{i}")),
        )
        .await;
    }
    for _ in 0..4 {
        assert_eq!(json_of(&next(&mut out).await)["status"], 200);
    }
    assert_eq!(ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await, 0);
    // The next event goes with the new token at once.
    hs.publish("k", br#"{"n":9}"#, with_id("rotated-9")).await;
    assert_eq!(json_of(&next(&mut out).await)["status"], 200);
    let requests = server.received_requests().await.unwrap();
    let last = requests.last().and_then(|r| r.headers.get("authorization"));
    assert_eq!(last.and_then(|v| v.to_str().ok()), Some("token-new"));
    assert!(requests.len() <= 9, "each event refused once at most");
}

/// Two ordered replicas (prefetch 1) on one queue, with `extra` settings, against
/// `server`; the second started while the first consumes. Their data directories go with
/// the last value.
async fn ordered_pair(
    server: &MockServer,
    extra: &[(&str, &str)],
) -> (Harness, Harness, [tempfile::TempDir; 2]) {
    let mut ordered = vec![("event_forwarder.ordered", "true"), ("amqp.prefetch", "1")];
    ordered.extend_from_slice(extra);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let first = start(server, dirs[0].path(), &ordered).await;
    let endpoint = format!("{}/events", server.uri());
    ordered.extend([
        ("event_forwarder.endpoint", endpoint.as_str()),
        ("event_forwarder.token", TOKEN),
    ]);
    let second =
        Harness::start_service::<EventForwarderService>(replica_config::<EventForwarderService>(
            dirs[1].path(),
            &first,
            &ordered,
        ))
        .await;
    (first, second, dirs)
}

/// The events "first" (message id m1) then "second" (m2), to `hs`'s input.
async fn publish_first_and_second(hs: &Harness) {
    hs.publish("k", br#"{"e":"first"}"#, with_id("m1")).await;
    hs.publish("k", br#"{"e":"second"}"#, with_id("m2")).await;
}

/// Two ordered replicas on one queue (a rolling update's surge, a scale-out by mistake)
/// keep the order: the queue has one active consumer at a time, so the second replica
/// does not take the second event while the first replica is still retrying the first
/// in place. Without `x-single-active-consumer` the second event was POSTed first.
#[tokio::test]
async fn ordered_replicas_on_one_queue_keep_the_order() {
    let server = first_refused(3).await;
    let (mut first, mut second, _dirs) = ordered_pair(&server, &[]).await;
    let mut out = first.watch_output().await;
    publish_first_and_second(&first).await;
    let o1 = next(&mut out).await;
    let o2 = next(&mut out).await;
    assert_eq!(header(&o1, "x-in-response-to").as_deref(), Some("m1"));
    assert_eq!(header(&o2, "x-in-response-to").as_deref(), Some("m2"));
    assert_eq!(
        bodies(&server).await,
        [r#"{"e":"first"}"#; 4]
            .into_iter()
            .chain([r#"{"e":"second"}"#])
            .collect::<Vec<_>>(),
        "the second event waits for the first, whichever replica holds it"
    );
    second.stop().await;
    first.stop().await;
}

/// Ordered mode refuses to run on a queue without one active consumer at a time (a
/// topology conflict naming the argument), while an unordered service runs on a queue
/// that has it (one replica at a time: slower, never wrong).
#[tokio::test]
async fn ordered_mode_needs_its_queue_to_have_one_active_consumer() {
    use framework::topology::Topology;
    let data = tempfile::tempdir().unwrap();
    let cfg = |ordered: &str| {
        service_config::<EventForwarderService>(
            data.path(),
            &[
                ("event_forwarder.endpoint", "http://127.0.0.1:9/events"),
                ("event_forwarder.ordered", ordered),
                ("amqp.prefetch", "1"),
                ("amqp.declare_sources", "true"),
            ],
        )
    };
    let topology = |c: &framework::Config<_>| {
        Topology::of(&framework::cli::binding_of::<EventForwarderService>(c), c)
    };
    let (conn, _ch) = test_channel().await;
    let unordered = cfg("false");
    let q = unordered.service.queue.clone();
    let _gone = Cleanup::service(&q, &unordered.retry.delays_ms);
    topology(&unordered).declare(&conn).await.expect("declared");
    let mut ordered = cfg("true");
    ordered.service.queue = q.clone();
    ordered.service.output_exchange = unordered.service.output_exchange.clone();
    let mut ordered_topology = topology(&ordered);
    ordered_topology.subscriptions = topology(&unordered).subscriptions;
    let e = ordered_topology
        .declare(&conn)
        .await
        .expect_err("no single active consumer on the queue");
    assert!(
        e.is_conflict() && e.to_string().contains("x-single-active-consumer"),
        "{e}"
    );
    // The other way round: a queue made for ordered mode serves an unordered service.
    let fresh = cfg("true");
    let _gone_too = Cleanup::service(&fresh.service.queue, &fresh.retry.delays_ms);
    topology(&fresh).declare(&conn).await.expect("declared");
    let mut relaxed = cfg("false");
    relaxed.service.queue = fresh.service.queue.clone();
    relaxed.service.output_exchange = fresh.service.output_exchange.clone();
    let mut relaxed_topology = topology(&relaxed);
    relaxed_topology.subscriptions = topology(&fresh).subscriptions;
    relaxed_topology
        .declare(&conn)
        .await
        .expect("an unordered service runs on it");
}

/// The active ordered replica stopped while it retries an event in place hands the queue
/// over in order: its standby gets that event first, then the next. Before, the stopping
/// replica cancelled its consumer first, the broker made the standby active at once, and
/// the standby delivered the next event while the first was still held.
#[tokio::test]
async fn an_ordered_replica_stopped_mid_retry_hands_over_in_order() {
    // "first" refused until the endpoint is reset below.
    let server = first_refused(u64::MAX).await;
    let (mut first, mut second, _dirs) =
        ordered_pair(&server, &[("retry.delays_ms", "[200]")]).await;
    let (_c, ch) = test_channel().await;
    let mut out = watch(&ch, &first.output_exchange, "#").await;
    publish_first_and_second(&first).await;
    await_posts(&server, 1).await;
    first.stop().await;
    // The endpoint takes everything now.
    server.reset().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    let o1 = next(&mut out).await;
    let o2 = next(&mut out).await;
    assert_eq!(
        (
            header(&o1, "x-in-response-to").as_deref(),
            header(&o2, "x-in-response-to").as_deref()
        ),
        (Some("m1"), Some("m2")),
        "the standby took over in order"
    );
    second.stop().await;
}

/// Design §5/§7: `[event_forwarder] timeout_ms` bounds each POST — an endpoint slower than
/// it is a timeout, retried, and (with no attempt left) dead-lettered naming the bound.
#[tokio::test]
async fn an_endpoint_slower_than_timeout_ms_is_a_timeout() {
    let server = answering_after(200, std::time::Duration::from_secs(30)).await;
    let data = tempfile::tempdir().unwrap();
    let mut hs = start(
        &server,
        data.path(),
        &[
            ("event_forwarder.timeout_ms", "700"),
            ("retry.max_attempts", "1"),
            ("retry.max_outage_ms", "0"),
        ],
    )
    .await;
    let mut dlq = hs.watch_dlq().await;
    hs.publish("ev.slow", br#"{"eventID":"slow-1"}"#, with_id("slow-1"))
        .await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    let why = header(&d, "x-error").unwrap_or_default();
    assert!(why.contains("timed out after 700 ms"), "{why}");
    hs.stop().await;
}

/// A batch still posting half-way to the broker's consumer timeout returns a retry
/// carrying what it posted, instead of running on until the broker closes the channel and
/// redelivers it as it came (every record posted again, at every delivery).
#[tokio::test]
async fn a_batch_near_the_consumer_timeout_goes_on_in_a_retry_carrying_its_progress() {
    let server = answering(200).await;
    let ctx = retried_at_the_checkpoint(&server).await;
    assert_eq!(bodies(&server).await.len(), 1, "one record posted first");
    let done: Vec<_> = ctx
        .retry_headers()
        .into_iter()
        .filter(|(k, _)| k == event_forwarder::DONE_HEADER)
        .collect();
    assert_eq!(done.len(), 1, "the retry carries what is done: {done:?}");
}

/// The forwarder processor of `settings` (besides the endpoint and token), to call
/// `handle` on directly.
async fn processor_with(
    server: &MockServer,
    settings: &[(&str, &str)],
) -> <EventForwarderService as framework::Service>::Processor {
    use framework::Service;
    let endpoint = format!("{}/events", server.uri());
    let mut o = framework::config::LoadOptions::isolated()
        .set("event_forwarder.endpoint", endpoint.as_str())
        .set("event_forwarder.token", TOKEN);
    for (k, v) in settings {
        o = o.set(k, *v);
    }
    let cfg = framework::cli::load_config::<EventForwarderService>(&o).expect("config");
    EventForwarderService::processor(&cfg)
        .await
        .expect("processor")
}

/// The context of three records handled past the consumer-timeout checkpoint, once
/// their handling returned the retry that says so.
async fn retried_at_the_checkpoint(server: &MockServer) -> framework::MessageContext {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let processor = processor_with(server, &[]).await;
    let ctx =
        MessageContext::for_test("events", "k", 0).with_checkpoint_in(std::time::Duration::ZERO);
    match processor.handle(three_records(), &ctx).await {
        Outcome::Retry(why) => assert!(why.contains("consumer timeout"), "{why}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    ctx
}

fn three_records() -> Box<serde_json::value::RawValue> {
    let body = json!({"Records": [record("seq-1"), record("seq-2"), record("seq-3")]});
    serde_json::value::to_raw_value(&body).expect("raw")
}

/// [`three_records`]' retry as it comes back after `first` stopped at record 1 with
/// seq-1 failing still: begun with the others (the resume header `first` set, which is
/// returned), it ends with seq-1 alone not delivered.
async fn retried_where_it_stopped(
    processor: &<EventForwarderService as framework::Service>::Processor,
    first: &framework::MessageContext,
) -> framework::lapin::types::FieldTable {
    use framework::lapin::types::{AMQPValue, FieldTable};
    use framework::{MessageContext, MessageProcessor, Outcome};
    let (_, resume) = first
        .retry_headers()
        .into_iter()
        .find(|(k, _)| k == event_forwarder::RESUME_HEADER)
        .expect("where the retry begins");
    assert_eq!(resume, "1");
    let mut retry = MessageContext::for_test("events", "k", 1);
    let mut h = FieldTable::default();
    h.insert(
        event_forwarder::RESUME_HEADER.into(),
        AMQPValue::LongString(resume.as_str().into()),
    );
    retry.headers = h.clone();
    match processor.handle(three_records(), &retry).await {
        Outcome::Retry(why) => assert!(why.contains("1 of 3 records not delivered"), "{why}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    h
}

/// Asserts `server` was posted seq-1, then seq-2 and seq-3, then seq-1 again.
async fn posted_then_round_to_the_first(server: &MockServer) {
    let posted = bodies(server).await;
    let order: Vec<bool> = ["seq-1", "seq-2", "seq-3", "seq-1"]
        .iter()
        .zip(&posted)
        .map(|(seq, body)| body.contains(seq))
        .collect();
    assert_eq!(
        (posted.len(), order),
        (4, vec![true; 4]),
        "the records not tried first, then round to the first: {posted:?}"
    );
}

/// A batch whose records all fail (an endpoint answering 500 to each) stops at the
/// checkpoint too, in a counted retry: going on, it outlasted the broker's consumer
/// timeout, and the broker took it back uncounted — with every other message on the
/// channel — at every delivery, for ever.
#[tokio::test]
async fn a_batch_failing_record_after_record_stops_at_the_checkpoint() {
    let server = answering(500).await;
    retried_at_the_checkpoint(&server).await;
    assert_eq!(
        bodies(&server).await.len(),
        1,
        "one record tried, then the retry"
    );
}

/// Stopping during a batch's last attempt, once this attempt delivered records, the rest
/// go on in a retry carrying them (a retry that made progress is not counted, so it is not
/// dead-lettered): going on, the handler was stopped mid-batch and its message given back
/// as it came, and every record delivered meanwhile was posted again.
#[tokio::test]
async fn a_stop_during_the_last_attempt_keeps_what_it_delivered() {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let server = answering(200).await;
    let processor = processor_with(&server, &[("retry.max_attempts", "1")]).await;
    let ctx = MessageContext::for_test("events", "k", 0).with_time_left(std::time::Duration::ZERO);
    match processor.handle(three_records(), &ctx).await {
        Outcome::Retry(why) => assert!(why.contains("stopped after 1 of 3"), "{why}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    assert_eq!(bodies(&server).await.len(), 1);
    assert!(
        ctx.retry_headers()
            .iter()
            .any(|(k, _)| k == event_forwarder::DONE_HEADER),
        "the retry carries what was delivered"
    );
}

/// A record answered with a whole-endpoint failure (a 502: one that crashes the endpoint
/// behind its gateway) holds back the records after it, and its retry begins with those,
/// coming round to it: begun with at every attempt, it held them back until the last
/// (all dead-lettered untried with it where that failed too).
#[tokio::test]
async fn a_retry_after_a_record_held_the_others_back_begins_with_them() {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let server = answering_on("seq-1", ResponseTemplate::new(502)).await;
    let processor = processor_with(&server, &[]).await;
    let first = MessageContext::for_test("events", "k", 0);
    match processor.handle(three_records(), &first).await {
        Outcome::Retry(why) => assert!(why.contains("3 of 3 records not delivered"), "{why}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    retried_where_it_stopped(&processor, &first).await;
    posted_then_round_to_the_first(&server).await;
}

/// A batch whose first record keeps failing slowly until the checkpoint begins its retry
/// with the records it did not try: begun again at the first record each time, the records
/// behind it were never tried, and were dead-lettered untried once the attempts ran out.
#[tokio::test]
async fn a_retry_from_the_checkpoint_begins_with_the_records_not_tried() {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let server = answering_on("seq-1", ResponseTemplate::new(500)).await;
    let processor = processor_with(&server, &[]).await;
    let first =
        MessageContext::for_test("events", "k", 0).with_checkpoint_in(std::time::Duration::ZERO);
    match processor.handle(three_records(), &first).await {
        Outcome::Retry(why) => assert!(why.contains("first failure: record 1 of 3"), "{why}"),
        other => panic!("expected a retry, got {other:?}"),
    }
    let h = retried_where_it_stopped(&processor, &first).await;
    posted_then_round_to_the_first(&server).await;
    // A producer's delivery carrying the header (it did not come back) begins at the start.
    let mut forged = MessageContext::for_test("events", "k", 0);
    forged.headers = h;
    let _ = processor.handle(three_records(), &forged).await;
    let posted = bodies(&server).await;
    assert!(posted[4].contains("seq-1"), "{posted:?}");
}

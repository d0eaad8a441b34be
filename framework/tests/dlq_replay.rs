//! `dlq replay` after an incident: narrowed by kind, key pattern, age and count, paced by a
//! rate, and killed at any point without losing a dead letter.

use std::collections::HashMap;
use std::process::Stdio;

use framework::dlq::{self, Filter};
use framework::lapin::BasicProperties;
use framework::lapin::options::BasicGetOptions;
use framework::testing::*;
use framework::{MessageContext, Outcome};

const BIN: &str = env!("CARGO_BIN_EXE_echo");

/// Permanent for `{"p":true}`, otherwise a retry that exhausts at once (max_attempts 1).
fn failing() -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(|v: serde_json::Value, _: &MessageContext| {
        if v["p"] == serde_json::json!(true) {
            Outcome::permanent("bad input")
        } else {
            Outcome::retry("downstream down")
        }
    })
}

/// Dead letters of both kinds on two keys: 2 permanent on test.a.x, 3 exhausted on test.b.y.
async fn incident(prefix: &str) -> Harness {
    let mut hs = Harness::start(prefix, &[("retry.max_attempts", "1")], failing()).await;
    for i in 0..2 {
        let body = format!("{{\"p\":true,\"i\":{i}}}");
        hs.publish("test.a.x", body.as_bytes(), BasicProperties::default())
            .await;
    }
    for i in 0..3 {
        let body = format!("{{\"i\":{i}}}");
        hs.publish("test.b.y", body.as_bytes(), BasicProperties::default())
            .await;
    }
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), 5).await;
    hs.stop().await;
    hs
}

#[tokio::test]
async fn replay_filters_by_kind_key_age_and_count() {
    let hs = incident("filters").await;
    let topo = hs.topology();
    let dlq = format!("{}-dlq", hs.q);
    let dry = |f: Filter| {
        let (conn, topo, ch, dlq) = (&hs.conn, &topo, &hs.ch, &dlq);
        async move {
            // The previous look gave its dead letters back by closing its channel: all
            // five are there again before this one (its wait for them is bounded).
            await_ready_count(ch, dlq, 5).await;
            dlq::replay_filtered(conn, topo, &f, true)
                .await
                .expect("dry run")
                .len()
        }
    };
    let kind = |k: &str| Filter {
        kind: Some(k.into()),
        ..Filter::default()
    };
    assert_eq!(dry(kind("permanent")).await, 2);
    assert_eq!(dry(kind("retries-exhausted")).await, 3);
    let key = |p: &str| Filter {
        key: Some(p.into()),
        ..Filter::default()
    };
    assert_eq!(dry(key("test.a.#")).await, 2);
    assert_eq!(dry(key("*.b.*")).await, 3);
    assert_eq!(dry(key("test.c.#")).await, 0);
    let old = Filter {
        older_than: Some(std::time::Duration::from_secs(3600)),
        ..Filter::default()
    };
    assert_eq!(dry(old).await, 0, "they failed just now");
    let recent = Filter {
        older_than: Some(std::time::Duration::from_secs(0)),
        ..Filter::default()
    };
    assert_eq!(dry(recent).await, 5);
    // The CLI takes the same filters: replay two exhausted ones for real.
    let dir = tempfile::tempdir().expect("dir");
    let out = service_command(BIN, "echo", &hs.q, &amqp_url(), dir.path())
        .args([
            "dlq",
            "replay",
            "--all",
            "--kind",
            "retries-exhausted",
            "--key",
            "test.b.#",
            "--limit",
            "2",
        ])
        .stdout(Stdio::piped())
        .output_within(WAIT)
        .expect("echo runs");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("replayed 2 dead letter(s)"));
    await_ready_count(&hs.ch, &hs.q, 2).await;
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), 3).await;
    let bad = service_command(BIN, "echo", &hs.q, &amqp_url(), dir.path())
        .args(["dlq", "replay", "--all", "--older-than", "soon"])
        .stderr(Stdio::piped())
        .output_within(WAIT)
        .expect("echo runs");
    assert_eq!(bad.status.code(), Some(2), "a bad age is a usage error");
}

/// Takes every message out of `queue`, counting bodies.
async fn drain(hs: &Harness, queue: &str, seen: &mut HashMap<Vec<u8>, usize>) {
    while let Ok(Some(m)) = hs
        .ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
    {
        *seen.entry(m.delivery.data.clone()).or_default() += 1;
    }
}

/// Waits until the service's queue and its DLQ hold `n` messages between them (what a
/// replay cut short held comes back to the DLQ).
async fn await_accounted_for(hs: &Harness, n: u32) {
    let dlq = format!("{}-dlq", hs.q);
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let total = ready_count(&hs.ch, &hs.q).await + ready_count(&hs.ch, &dlq).await;
        if total >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{total} of {n} accounted for"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Takes every message out of the service's queue and its DLQ, counting bodies.
async fn drain_both(hs: &Harness) -> HashMap<Vec<u8>, usize> {
    let mut seen = HashMap::new();
    drain(hs, &hs.q, &mut seen).await;
    drain(hs, &format!("{}-dlq", hs.q), &mut seen).await;
    seen
}

/// A stopped service with `n` permanent dead letters, the `i`th `{"p":true,"i":i}` with
/// message id `m<i>` (its harness, for the queues).
async fn dead_letters(prefix: &str, n: u32) -> Harness {
    let mut hs = Harness::start(prefix, &[], failing()).await;
    for i in 0..n {
        let body = format!("{{\"p\":true,\"i\":{i}}}");
        let props = BasicProperties::default().with_message_id(format!("m{i}").into());
        hs.publish("test.k", body.as_bytes(), props).await;
    }
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), n).await;
    hs.stop().await;
    hs
}

/// `dlq replay --all --rate 5` of `hs`'s service as a process of its own, started once
/// its first `k` are replayed; its stdout and stderr read as they come (a pipe left
/// unread could hold it up).
async fn paced_replay_under_way(
    hs: &Harness,
    dir: &std::path::Path,
    k: u32,
) -> (
    process::Guarded,
    std::thread::JoinHandle<String>,
    std::thread::JoinHandle<String>,
) {
    let mut replay = process::spawn(
        service_command(BIN, "echo", &hs.q, &amqp_url(), dir)
            .args(["dlq", "replay", "--all", "--rate", "5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .expect("replay runs");
    let read = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = r.read_to_string(&mut text);
            text
        })
    };
    let printed = read(Box::new(replay.take_stdout().expect("stdout")));
    let said = read(Box::new(replay.take_stderr().expect("stderr")));
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready_count(&hs.ch, &hs.q).await < k {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay got going"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    (replay, printed, said)
}

#[tokio::test]
async fn a_replay_killed_midway_loses_nothing() {
    let n = 60;
    let hs = dead_letters("killreplay", n).await;
    let (q, dlq_name) = (hs.q.clone(), format!("{}-dlq", hs.q));
    let dir = tempfile::tempdir().expect("dir");
    let (mut replay, printed, _) = paced_replay_under_way(&hs, dir.path(), 5).await;
    replay.kill();
    // It said which it moved as it went, not only at its end (which a kill never reaches):
    // every line names one now in the queue.
    let lines = printed.join().expect("reader").lines().count();
    let in_queue = ready_count(&hs.ch, &q).await as usize;
    assert!(
        (1..=in_queue).contains(&lines),
        "{lines} lines printed, {in_queue} replayed"
    );
    // Whatever the killed replay held comes back to the DLQ; count both queues once settled.
    await_accounted_for(&hs, n).await;
    assert!(
        ready_count(&hs.ch, &dlq_name).await > 0,
        "killed midway: some dead letters were not replayed yet"
    );
    let seen = drain_both(&hs).await;
    assert_eq!(
        seen.len(),
        n as usize,
        "every dead letter is in the DLQ or replayed"
    );
    let dup: usize = seen.values().map(|c| c - 1).sum();
    assert!(dup <= 1, "at most the one in flight twice, got {dup}");
}

/// A dry run stopped (Ctrl-C) says it replayed and removed nothing: "interrupted after
/// replaying N: those are replayed and removed" told an operator that what a dry run only
/// looked at was gone.
#[tokio::test]
async fn a_dry_run_interrupted_says_nothing_was_replayed() {
    let hs = dead_letters("dryint", 3).await;
    let dlq_name = format!("{}-dlq", hs.q);
    let stop = tokio_util::sync::CancellationToken::new();
    stop.cancel();
    let filter = Filter {
        stop: Some(stop),
        ..Default::default()
    };
    let e = dlq::replay_filtered(&hs.conn, &hs.topology(), &filter, true)
        .await
        .expect_err("stopped");
    let text = e.to_string();
    assert!(
        matches!(e, dlq::DlqError::DryRunInterrupted { total: 3, .. }),
        "{text}"
    );
    assert!(text.contains("nothing was replayed or removed"), "{text}");
    await_ready_count(&hs.ch, &dlq_name, 3).await;
}

/// Ctrl-C during a paced replay stops it between two dead letters: it exits 1 saying how
/// many it replayed and to run it again, having printed each one it moved; every dead
/// letter is in the queue or the DLQ, none twice.
#[tokio::test]
async fn a_replay_interrupted_stops_between_two_dead_letters_and_says_how_far_it_got() {
    let n = 30;
    let hs = dead_letters("intreplay", n).await;
    let (q, dlq_name) = (hs.q.clone(), format!("{}-dlq", hs.q));
    let dir = tempfile::tempdir().expect("dir");
    let (mut replay, printed, said) = paced_replay_under_way(&hs, dir.path(), 2).await;
    replay.signal(process::SIGINT);
    let status = replay.wait_for(WAIT).expect("the replay ends on SIGINT");
    assert_eq!(status.code(), Some(1), "an exit code, not a signal");
    let said = said.join().expect("stderr");
    assert!(said.contains("interrupted after replaying"), "{said}");
    let lines = printed.join().expect("stdout").lines().count();
    let mut seen = HashMap::new();
    await_ready_count(&hs.ch, &dlq_name, n - lines as u32).await;
    drain(&hs, &q, &mut seen).await;
    assert_eq!(seen.len(), lines, "each line names one replayed");
    assert!(lines < n as usize, "stopped midway");
    drain(&hs, &dlq_name, &mut seen).await;
    assert_eq!(seen.len(), n as usize, "every dead letter accounted for");
    assert!(seen.values().all(|c| *c == 1), "none twice: {seen:?}");
}

/// A replay given `--limit` and cut short (Ctrl-C) says to go on with what its limit
/// left: told to run the same command again, an operator replayed the whole limit again
/// (`--limit 500` stopped at 300, rerun: 800 replayed).
#[tokio::test]
async fn an_interrupted_replay_with_a_limit_says_what_its_limit_left() {
    let hs = dead_letters("intlimit", 6).await;
    let dlq_name = format!("{}-dlq", hs.q);
    let stop = tokio_util::sync::CancellationToken::new();
    let filter = Filter {
        limit: Some(5),
        stop: Some(stop.clone()),
        ..Default::default()
    };
    let mut moved = 0;
    let e = dlq::replay_each(&hs.conn, &hs.topology(), &filter, false, |_| {
        moved += 1;
        if moved == 2 {
            stop.cancel();
        }
    })
    .await
    .expect_err("stopped");
    let text = e.to_string();
    assert!(
        matches!(
            e,
            dlq::DlqError::Interrupted {
                moved: 2,
                left: Some(3)
            }
        ),
        "{text}"
    );
    assert!(text.contains("again with --limit 3"), "{text}");
    await_ready_count(&hs.ch, &dlq_name, 4).await;
}

/// Design §3: a replay is confirmed in `Q` before its dead letter is removed. With `Q`
/// gone (deleted by hand, a typo'd `queue`), the broker returns every replay: each dead
/// letter stays, and the replay says so instead of "replayed".
#[tokio::test]
async fn a_replay_the_broker_cannot_deliver_keeps_its_dead_letter() {
    let hs = dead_letters("undeliverable", 2).await;
    let dlq_name = format!("{}-dlq", hs.q);
    hs.ch
        .queue_delete(hs.q.as_str().into(), Default::default())
        .await
        .expect("Q deleted");
    let e = dlq::replay_filtered(&hs.conn, &hs.topology(), &Filter::default(), false)
        .await
        .expect_err("nothing can be replayed into a queue that is not there");
    assert!(
        matches!(e, dlq::DlqError::Publish(_)),
        "refused by the broker, not removed: {e}"
    );
    assert!(e.to_string().contains("dead letter kept"), "{e}");
    assert!(e.to_string().contains("queue does not exist"), "{e}");
    await_ready_count(&hs.ch, &dlq_name, 2).await;
}

/// A replay that fails partway (here the broker returns its publish: `Q` is gone) gives
/// back what it held before it says so — the dead letters it passed over and the one it
/// failed on — in their order, and they are all there when it returns: it left them held
/// until its connection closed, on RabbitMQ 3.x behind the rest of the DLQ, and an
/// operator's next command right after it (as its text invites) found fewer of them.
#[tokio::test]
async fn a_replay_that_fails_partway_leaves_the_dlq_as_it_was() {
    let mut hs = Harness::start("failpartway", &[], failing()).await;
    hs.stop().await;
    let dlq_name = format!("{}-dlq", hs.q);
    dead_letters_of_kinds(&hs, "fp", &["permanent", "retries-exhausted", "permanent"]).await;
    hs.ch
        .queue_delete(hs.q.as_str().into(), Default::default())
        .await
        .expect("Q deleted");
    let exhausted = Filter {
        kind: Some("retries-exhausted".into()),
        ..Filter::default()
    };
    let e = dlq::replay_filtered(&hs.conn, &hs.topology(), &exhausted, false)
        .await
        .expect_err("nothing can be replayed into a queue that is not there");
    assert!(matches!(e, dlq::DlqError::Publish(_)), "{e}");
    assert_eq!(ready_count(&hs.ch, &dlq_name).await, 3, "all back at once");
    let order: Vec<_> = dlq::list(&hs.conn, &hs.topology(), 10)
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.message_id.unwrap_or_default())
        .collect();
    assert_eq!(order, ["fp-0", "fp-1", "fp-2"]);
}

/// Replays every dead letter of `hs` (its service stopped) and takes the one that lands
/// in `Q`: what was moved, and the message as the service would get it.
async fn replay_the_one(
    hs: &Harness,
) -> (Vec<dlq::DeadLetter>, framework::lapin::message::Delivery) {
    let moved = dlq::replay_filtered(&hs.conn, &hs.topology(), &Filter::default(), false)
        .await
        .expect("replayed");
    await_ready_count(&hs.ch, &hs.q, 1).await;
    let got = hs
        .ch
        .basic_get(hs.q.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the replay is in Q")
        .delivery;
    (moved, got)
}

/// Puts in `Q-dlq` the dead letter the broker makes (its delivery limit) of a delivery to
/// `Q` published to `exchange` with `key` and the headers `hdr`: through `Q-fail`, with
/// `key`, its `x-death` naming both. Lists the DLQ.
async fn broker_dead_letters(
    hs: &Harness,
    exchange: &str,
    key: &str,
    message_id: &str,
    mut hdr: framework::lapin::types::FieldTable,
) -> Vec<dlq::DeadLetter> {
    use framework::headers as h;
    use framework::lapin::types::{AMQPValue, FieldArray, FieldTable};
    let mut death = FieldTable::default();
    for (k, v) in [
        ("reason", "delivery_limit"),
        ("queue", hs.q.as_str()),
        ("exchange", exchange),
    ] {
        h::set_str(&mut death, k, v);
    }
    death.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(key.into())])),
    );
    hdr.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    publish(
        &hs.ch,
        &format!("{}-fail", hs.q),
        key,
        b"{}",
        BasicProperties::default()
            .with_message_id(message_id.into())
            .with_headers(hdr),
    )
    .await;
    await_ready_count(&hs.ch, &format!("{}-dlq", hs.q), 1).await;
    dlq::list(&hs.conn, &hs.topology(), 10)
        .await
        .expect("listed")
}

/// Design §3: a replay starts the message afresh — every error, retry, progress and
/// broker death header is gone, the `x-original-*` ones and the producer's own are kept.
/// A dead letter carrying all of them at once (as one retried, progressed and finally
/// dead-lettered by the broker would).
#[tokio::test]
async fn a_replay_strips_every_error_and_retry_header() {
    use framework::headers as h;
    use framework::lapin::types::{AMQPValue, FieldArray, FieldTable};
    let mut hs = Harness::start("strip", &[], failing()).await;
    hs.stop().await;
    let mut hdr = FieldTable::default();
    for (k, v) in [
        (h::ERROR, "bad"),
        (h::ERROR_KIND, "retries-exhausted"),
        (h::LAST_ERROR, "downstream down"),
        (h::SERVICE, "test-service"),
        (h::FAILED_AT, "2026-01-01T00:00:00Z"),
        ("x-first-death-reason", "rejected"),
        ("x-first-death-queue", "q"),
        ("x-first-death-exchange", "e"),
        ("x-last-death-reason", "rejected"),
        ("x-last-death-queue", "q"),
        ("x-last-death-exchange", "e"),
        (h::ORIGINAL_EXCHANGE, "producer"),
        (h::ORIGINAL_ROUTING_KEY, "test.k"),
        ("x-own", "kept"),
    ] {
        h::set_str(&mut hdr, k, v);
    }
    h::set_int(&mut hdr, h::RETRY_COUNT, 7);
    h::set_int(&mut hdr, h::PROGRESS_ATTEMPTS, 3);
    h::set_int(&mut hdr, "x-delivery-count", 4);
    let mut death = FieldTable::default();
    death.insert("reason".into(), AMQPValue::LongString("rejected".into()));
    hdr.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    let dlq_name = format!("{}-dlq", hs.q);
    publish(
        &hs.ch,
        "",
        &dlq_name,
        b"{}",
        BasicProperties::default()
            .with_message_id("strip-1".into())
            .with_headers(hdr),
    )
    .await;
    await_ready_count(&hs.ch, &dlq_name, 1).await;
    let (moved, got) = replay_the_one(&hs).await;
    assert_eq!(moved.len(), 1);
    let mut names: Vec<String> = got
        .properties
        .headers()
        .as_ref()
        .map(|t| t.inner().keys().map(|k| k.to_string()).collect())
        .unwrap_or_default();
    // A quorum queue's `basic.get` writes its own count (0 here) whatever was stripped.
    names.retain(|n| n != "x-delivery-count");
    names.sort();
    assert_eq!(
        names,
        vec![
            h::ORIGINAL_EXCHANGE,
            h::ORIGINAL_ROUTING_KEY,
            "x-own",
            h::REPLAY_RUN
        ],
        "only the origin, the run's mark and the producer's own header are left"
    );
    assert_eq!(
        header(&got, h::ORIGINAL_EXCHANGE).as_deref(),
        Some("producer")
    );
    assert_eq!(
        header(&got, h::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("test.k")
    );
    assert_eq!(
        got.properties.message_id().as_ref().map(|m| m.as_str()),
        Some("strip-1")
    );
}

/// A dead letter the broker made (its delivery limit) of a producer's delivery keeps the
/// producer's own `x-original-*`, which the service never read (it came through the
/// producer's exchange): listed and replayed with the origin the broker records, not a
/// forged one that the replay, arriving through the default exchange, would have made the
/// processor believe.
#[tokio::test]
async fn a_brokers_dead_letter_of_a_producers_message_keeps_its_real_origin() {
    use framework::headers as h;
    use framework::lapin::types::FieldTable;
    let mut hs = Harness::start("realorigin", &[], failing()).await;
    hs.stop().await;
    let mut hdr = FieldTable::default();
    h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, "forged");
    h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, "forged.key");
    // The service's own dead-letter headers and marks, forged: they made the dead letter
    // look like one the service wrote (its kind and time picked it for a filtered replay)
    // and, replayed back through the default exchange, its marks were believed.
    h::set_str(&mut hdr, h::SERVICE, "t-service");
    h::set_str(&mut hdr, h::ERROR, "forged error");
    h::set_str(&mut hdr, h::ERROR_KIND, h::KIND_RETRIES_EXHAUSTED);
    h::set_str(&mut hdr, h::FAILED_AT, "2001-01-01T00:00:00Z");
    h::set_str(&mut hdr, h::BATCH_PART, "7");
    h::set_str(&mut hdr, "x-test-done", "[\"0\"]");
    let input = hs.input_exchange.clone();
    let listed = broker_dead_letters(&hs, &input, "test.real", "origin-1", hdr).await;
    assert_eq!(listed[0].kind.as_deref(), Some("delivery_limit"));
    assert_eq!(listed[0].error, None);
    assert_ne!(listed[0].failed_at.as_deref(), Some("2001-01-01T00:00:00Z"));
    let (moved, got) = replay_the_one(&hs).await;
    assert_eq!(moved.len(), 1);
    assert!(moved[0].from_producer);
    assert!(
        header(&got, h::PRODUCERS_REPLAY).is_some(),
        "read as a first arrival"
    );
    assert_eq!(header(&got, h::BATCH_PART), None);
    assert_eq!(moved[0].original_exchange, hs.input_exchange);
    assert_eq!(moved[0].original_routing_key, "test.real");
    assert_eq!(
        header(&got, h::ORIGINAL_EXCHANGE),
        Some(hs.input_exchange.clone())
    );
    assert_eq!(
        header(&got, h::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("test.real")
    );
}

/// The broker's dead letter of a producer's message that was replayed before (its delivery
/// limit reached again: the replay's marker still on it, its `x-death` naming the default
/// exchange) is still the producer's: replayed as a first arrival again, its producer's
/// progress marks and part not believed. Before, the second replay lost the marker and
/// the processor skipped the parts the producer's header named.
#[tokio::test]
async fn a_producers_message_dead_lettered_again_after_its_replay_is_still_the_producers() {
    use framework::headers as h;
    use framework::lapin::types::FieldTable;
    let mut hs = Harness::start("replayedagain", &[], failing()).await;
    hs.stop().await;
    let mut hdr = FieldTable::default();
    h::set_str(&mut hdr, h::PRODUCERS_REPLAY, "true");
    h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, &hs.input_exchange);
    h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, "test.real");
    h::set_str(&mut hdr, h::BATCH_PART, "7");
    h::set_str(&mut hdr, TEST_PROGRESS, "[\"0\"]");
    // The replayed copy was published through the default exchange with the queue's name.
    let q = hs.q.clone();
    let listed = broker_dead_letters(&hs, "", &q, "again-1", hdr).await;
    assert_eq!(listed[0].kind.as_deref(), Some("delivery_limit"));
    assert!(listed[0].from_producer);
    let (moved, got) = replay_the_one(&hs).await;
    assert!(moved[0].from_producer);
    assert!(
        header(&got, h::PRODUCERS_REPLAY).is_some(),
        "read as a first arrival again"
    );
    assert_eq!(header(&got, h::BATCH_PART), None);
    assert_eq!(moved[0].original_exchange, hs.input_exchange);
    assert_eq!(moved[0].original_routing_key, "test.real");
    assert_eq!(
        header(&got, h::ORIGINAL_ROUTING_KEY).as_deref(),
        Some("test.real")
    );
}

/// A producer's message dead-lettered by the service before its processor read its
/// progress (refused at once; a limit an operator raises before replaying it) leaves the
/// producer's progress header behind: the replay, coming back the framework's way, does
/// every part — before, the processor believed the producer's marks and skipped them.
#[tokio::test]
async fn a_dead_letter_made_before_the_progress_was_read_carries_no_producers_marks() {
    use framework::headers as h;
    use framework::lapin::types::FieldTable;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let refusing = Arc::new(AtomicBool::new(true));
    let seen: Arc<Mutex<Vec<bool>>> = Arc::default();
    let p = {
        let (refusing, seen) = (refusing.clone(), seen.clone());
        FnProcessor(move |_v: serde_json::Value, ctx: &MessageContext| {
            if refusing.load(Ordering::SeqCst) {
                return Outcome::permanent("over a limit");
            }
            let p = framework::batch::Progress::resume(ctx, TEST_PROGRESS);
            seen.lock().unwrap().push(p.is_done("0"));
            Outcome::success(serde_json::json!({}))
        })
    };
    let mut hs = Harness::start("producersmarks", &[], p).await;
    let mut out = hs.watch_output().await;
    let mut hdr = FieldTable::default();
    h::set_str(&mut hdr, TEST_PROGRESS, "[\"0\"]");
    h::set_str(&mut hdr, "x-own", "kept");
    hs.publish(
        "test.marks",
        b"{}",
        BasicProperties::default()
            .with_message_id("marks-1".into())
            .with_headers(hdr),
    )
    .await;
    let dlq_name = format!("{}-dlq", hs.q);
    await_ready_count(&hs.ch, &dlq_name, 1).await;
    refusing.store(false, Ordering::SeqCst);
    let moved = hs.replay_all().await;
    assert_eq!(moved.len(), 1);
    next(&mut out).await;
    assert_eq!(
        *seen.lock().unwrap(),
        vec![false],
        "part 0 is done on the replay"
    );
    hs.stop().await;
}

/// A dead letter the service itself made of a delivery that came with the broker's
/// dead-lettering headers of its own (a dead letter shovelled back to the producer's
/// exchange) is listed as the service's — its error, kind and time — not taken for one the
/// broker made of a producer's message (the `x-death` it came with named this queue).
#[tokio::test]
async fn the_services_own_dead_letter_of_a_shovelled_back_message_is_its_own() {
    use framework::headers as h;
    use framework::lapin::types::{AMQPValue, FieldArray, FieldTable};
    let mut hs = Harness::start("shovelled", &[], failing()).await;
    let mut death = FieldTable::default();
    for (k, v) in [
        ("reason", "delivery_limit"),
        ("queue", hs.q.as_str()),
        ("exchange", hs.input_exchange.as_str()),
    ] {
        h::set_str(&mut death, k, v);
    }
    let mut hdr = FieldTable::default();
    hdr.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
    );
    hs.publish(
        "test.back",
        br#"{"p":true}"#,
        BasicProperties::default()
            .with_message_id("back-1".into())
            .with_headers(hdr),
    )
    .await;
    let dlq_name = format!("{}-dlq", hs.q);
    await_ready_count(&hs.ch, &dlq_name, 1).await;
    hs.stop().await;
    let listed = dlq::list(&hs.conn, &hs.topology(), 10)
        .await
        .expect("listed");
    assert_eq!(listed[0].kind.as_deref(), Some(h::KIND_PERMANENT));
    assert_eq!(listed[0].error.as_deref(), Some("bad input"));
    assert!(!listed[0].from_producer);
    assert_eq!(listed[0].original_routing_key, "test.back");
}

/// A dry run holds every dead letter it looks at (it removes none), so the hold limit
/// counts from its first look, matched or not, and a dry run stopped by it says it
/// replayed nothing and cannot look further — not "run the same command again to go on",
/// which would show the same ones again.
#[tokio::test]
async fn a_dry_run_stopped_by_the_hold_limit_says_it_replayed_nothing() {
    let mut hs = Harness::start("dryhold", &[], failing()).await;
    hs.stop().await;
    let dlq_name = format!("{}-dlq", hs.q);
    for i in 0..300 {
        publish(
            &hs.ch,
            "",
            &dlq_name,
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default().with_message_id(format!("dry-{i}").into()),
        )
        .await;
    }
    await_ready_count(&hs.ch, &dlq_name, 300).await;
    let filter = Filter {
        hold_at_most: Some(std::time::Duration::from_nanos(1)),
        ..Default::default()
    };
    let e = dlq::replay_filtered(&hs.conn, &hs.topology(), &filter, true)
        .await
        .expect_err("stopped by the hold limit at its second look");
    let text = e.to_string();
    assert!(
        matches!(e, dlq::DlqError::DryRunStopped { total: 300, .. }),
        "{text}"
    );
    assert!(text.contains("nothing was replayed"), "{text}");
    assert!(!text.contains("Run the same command again"), "{text}");
    await_ready_count(&hs.ch, &dlq_name, 300).await;
    assert_eq!(ready_count(&hs.ch, &hs.q).await, 0, "nothing moved");
}

/// Dead letters in `hs`'s DLQ, one per kind of `kinds` (`x-error-kind`), in that order,
/// with message ids `<prefix>-<i>` and bodies `{"i":<i>}`.
async fn dead_letters_of_kinds(hs: &Harness, prefix: &str, kinds: &[&str]) {
    let dlq_name = format!("{}-dlq", hs.q);
    for (i, kind) in kinds.iter().enumerate() {
        let mut headers = framework::lapin::types::FieldTable::default();
        headers.insert(
            "x-error-kind".into(),
            framework::lapin::types::AMQPValue::LongString((*kind).into()),
        );
        publish(
            &hs.ch,
            "",
            &dlq_name,
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default()
                .with_message_id(format!("{prefix}-{i}").into())
                .with_headers(headers),
        )
        .await;
    }
    await_ready_count(&hs.ch, &dlq_name, kinds.len() as u32).await;
}

/// A replay with `--limit` stopped by the hold limit says how much of the limit is left:
/// run again as it was, it would replay the whole limit again on top of what it did.
#[tokio::test]
async fn a_limited_replay_stopped_by_the_hold_limit_names_what_is_left() {
    let mut hs = Harness::start("limithold", &[], failing()).await;
    hs.stop().await;
    let dlq_name = format!("{}-dlq", hs.q);
    let kinds = ["permanent", "retries-exhausted"].repeat(3);
    dead_letters_of_kinds(&hs, "lim", &kinds).await;
    // The first is replayed, the second passed over; any later look would hold it too
    // long.
    let filter = Filter {
        kind: Some("permanent".into()),
        limit: Some(200),
        hold_at_most: Some(std::time::Duration::from_nanos(1)),
        ..Default::default()
    };
    let e = dlq::replay_filtered(&hs.conn, &hs.topology(), &filter, false)
        .await
        .expect_err("stopped by the hold limit");
    let text = e.to_string();
    assert!(
        matches!(
            e,
            dlq::DlqError::Stopped {
                moved: 1,
                left: Some(199),
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("with --limit 199"), "{text}");
    await_ready_count(&hs.ch, &dlq_name, 5).await;
}

/// A replay with `--limit` that replayed its limit is done, however long it held what it
/// passed over on the way: not "stopped, run it again with --limit 0" (a limit refused),
/// after which the run again as it was replays another limit's worth.
#[tokio::test]
async fn a_limited_replay_that_reached_its_limit_is_done_past_the_hold_limit() {
    let mut hs = Harness::start("limitdone", &[], failing()).await;
    hs.stop().await;
    let dlq_name = format!("{}-dlq", hs.q);
    dead_letters_of_kinds(
        &hs,
        "done",
        &["retries-exhausted", "permanent", "permanent"],
    )
    .await;
    // The first is passed over, the second replayed: the limit, reached while the first
    // is held longer than the hold limit.
    let filter = Filter {
        kind: Some("permanent".into()),
        limit: Some(1),
        hold_at_most: Some(std::time::Duration::from_nanos(1)),
        ..Default::default()
    };
    let moved = dlq::replay_filtered(&hs.conn, &hs.topology(), &filter, false)
        .await
        .expect("its limit replayed: done");
    assert_eq!(moved.len(), 1);
    await_ready_count(&hs.ch, &hs.q, 1).await;
    await_ready_count(&hs.ch, &dlq_name, 2).await;
}

/// `--message-id` on a long DLQ: its dead letter found and replayed, a look further back
/// cut short by the hold limit is reported as done — not as "stopped, run it again", after
/// which the run again finds nothing and fails too (and the operator republishes from
/// upstream what was replayed).
#[tokio::test]
async fn a_message_id_replayed_before_the_hold_limit_is_reported_done() {
    let mut hs = Harness::start("idhold", &[], failing()).await;
    hs.stop().await;
    let dlq_name = format!("{}-dlq", hs.q);
    for i in 0..300 {
        let id = if i == 0 {
            "target".to_string()
        } else {
            format!("other-{i}")
        };
        publish(
            &hs.ch,
            "",
            &dlq_name,
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default().with_message_id(id.into()),
        )
        .await;
    }
    await_ready_count(&hs.ch, &dlq_name, 300).await;
    let filter = Filter {
        message_id: Some("target".into()),
        hold_at_most: Some(std::time::Duration::from_nanos(1)),
        ..Default::default()
    };
    let moved = dlq::replay_filtered(&hs.conn, &hs.topology(), &filter, false)
        .await
        .expect("the dead letter asked for is replayed");
    assert_eq!(moved.len(), 1);
    await_ready_count(&hs.ch, &hs.q, 1).await;
    await_ready_count(&hs.ch, &dlq_name, 299).await;
}

/// Looking at dead letters leaves them in their order: a `dlq list` of the first few, a dry
/// run stopped by its count, a filtered replay passing others over. A quorum queue puts
/// what a channel gives back behind what it did not hold, so each of them moved the dead
/// letters it looked at to the tail, and a replay of 2 after a dry run of 2 replayed two
/// others than the ones it had named.
#[tokio::test]
async fn looking_at_dead_letters_leaves_them_in_their_order() {
    let mut hs = Harness::start("order", &[], failing()).await;
    for i in 0..8 {
        let body = format!("{{\"p\":true,\"i\":{i}}}");
        let props = BasicProperties::default().with_message_id(format!("m{i}").into());
        hs.publish("test.k", body.as_bytes(), props).await;
    }
    let dlq_name = format!("{}-dlq", hs.q);
    await_ready_count(&hs.ch, &dlq_name, 8).await;
    hs.stop().await;
    let topo = hs.topology();
    let ids = |v: Vec<dlq::DeadLetter>| -> Vec<String> {
        v.into_iter()
            .map(|d| d.message_id.unwrap_or_default())
            .collect()
    };
    let order = || async {
        await_ready_count(&hs.ch, &dlq_name, 8).await;
        ids(dlq::list(&hs.conn, &topo, 100).await.expect("list"))
    };
    let before = order().await;
    assert_eq!(before.len(), 8);
    dlq::list(&hs.conn, &topo, 3).await.expect("list 3");
    assert_eq!(order().await, before, "after a list of 3");
    let two = Filter {
        limit: Some(2),
        ..Filter::default()
    };
    let would = ids(dlq::replay_filtered(&hs.conn, &topo, &two, true)
        .await
        .expect("dry run"));
    assert_eq!(would, before[..2], "a dry run of 2 names the first two");
    assert_eq!(order().await, before, "after a dry run of 2");
    let one_of_them = Filter {
        message_id: Some(before[4].clone()),
        ..Filter::default()
    };
    let moved = ids(dlq::replay_filtered(&hs.conn, &topo, &one_of_them, false)
        .await
        .expect("replay one"));
    assert_eq!(moved, [before[4].clone()]);
    let mut rest = before.clone();
    rest.remove(4);
    await_ready_count(&hs.ch, &dlq_name, 7).await;
    let after = ids(dlq::list(&hs.conn, &topo, 100).await.expect("list"));
    assert_eq!(after, rest, "the others passed over stay in their order");
    await_ready_count(&hs.ch, &dlq_name, 7).await;
    let replayed = ids(dlq::replay_filtered(&hs.conn, &topo, &two, false)
        .await
        .expect("replay 2"));
    assert_eq!(replayed, rest[..2], "a replay of 2 takes the first two");
}

/// Dead letters that fail while a replay runs are not taken for those it set out to look
/// at: on RabbitMQ 4.x a quorum DLQ hands one of priority 5 or more out before those
/// already there, and counted among them it left older ones unlooked at while the run
/// said it had replayed everything it found. (On 3.x the arrivals come last: nothing to
/// take the place of.)
#[tokio::test]
async fn a_replay_looks_at_every_dead_letter_there_when_it_began() {
    use framework::headers as h;
    use framework::lapin::types::FieldTable;
    let mut hs = Harness::start("arrivals", &[], failing()).await;
    hs.stop().await;
    let dlq_name = format!("{}-dlq", hs.q);
    let dead_letter = |id: &str, failed_at: chrono::DateTime<chrono::Utc>, priority: u8| {
        let mut hdr = FieldTable::default();
        h::set_str(&mut hdr, h::SERVICE, "t-service");
        h::set_str(&mut hdr, h::ERROR, "bad input");
        h::set_str(&mut hdr, h::ERROR_KIND, h::KIND_PERMANENT);
        h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, &hs.input_exchange);
        h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, "test.k");
        h::set_str(
            &mut hdr,
            h::FAILED_AT,
            &failed_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        BasicProperties::default()
            .with_message_id(id.into())
            .with_priority(priority)
            .with_headers(hdr)
    };
    let old = chrono::Utc::now() - chrono::TimeDelta::hours(1);
    for i in 0..3 {
        publish(
            &hs.ch,
            "",
            &dlq_name,
            b"{}",
            dead_letter(&format!("old-{i}"), old, 0),
        )
        .await;
    }
    await_ready_count(&hs.ch, &dlq_name, 3).await;
    let began = chrono::Utc::now();
    let paced = Filter {
        per_second: Some(0.5),
        ..Filter::default()
    };
    let topo = hs.topology();
    let run = dlq::replay_filtered(&hs.conn, &topo, &paced, false);
    // Two fail while it waits to look at the second (their failure time well after the
    // run began, whatever this machine's speed).
    let arrivals = async {
        let deadline = tokio::time::Instant::now() + WAIT;
        while dlq::count(&hs.ch, &hs.q).await.expect("Q") < 1 {
            assert!(tokio::time::Instant::now() < deadline, "the first replayed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        for i in 0..2 {
            let failed = began + chrono::TimeDelta::seconds(60);
            let props = dead_letter(&format!("new-{i}"), failed, 9);
            publish(&hs.ch, "", &dlq_name, b"{}", props).await;
        }
    };
    let (moved, ()) = tokio::join!(run, arrivals);
    let moved = moved.expect("replayed");
    let ids: Vec<String> = moved.into_iter().filter_map(|d| d.message_id).collect();
    for i in 0..3 {
        assert!(
            ids.contains(&format!("old-{i}")),
            "old-{i} not replayed: {ids:?}"
        );
    }
}

/// A list of more dead letters than it can read within its hold limit stops there, says
/// so and shows what it read (the broker's consumer timeout would otherwise close its
/// channel with nothing shown), everything left in the DLQ in its order.
#[tokio::test]
async fn a_list_that_outlasts_its_hold_limit_shows_what_it_read() {
    let mut hs = Harness::start("listcut", &[], failing()).await;
    for i in 0..3 {
        let body = format!("{{\"p\":true,\"i\":{i}}}");
        let props = BasicProperties::default().with_message_id(format!("c{i}").into());
        hs.publish("test.k", body.as_bytes(), props).await;
    }
    let dlq_name = format!("{}-dlq", hs.q);
    await_ready_count(&hs.ch, &dlq_name, 3).await;
    hs.stop().await;
    let topo = hs.topology();
    let cut = dlq::list_held_at_most(&hs.conn, &topo, 10, std::time::Duration::from_nanos(1))
        .await
        .expect("list");
    assert!(cut.cut_short, "{cut:?}");
    assert_eq!((cut.items.len(), cut.total), (1, 3), "{cut:?}");
    await_ready_count(&hs.ch, &dlq_name, 3).await;
    let whole = dlq::list_of_total(&hs.conn, &topo, 10).await.expect("list");
    assert!(!whole.cut_short);
    assert_eq!(whole.items.len(), 3);
    assert_eq!(whole.items[0].message_id, cut.items[0].message_id);
}

/// Where each look counts a delivery against a limit (a `Q-dlq` an earlier release
/// declared with RabbitMQ 4.x's default of 20, kept as it is), a look reads no further
/// than it shows: reading the rest through to keep their order would count a delivery on
/// every dead letter of the queue, and twenty lists of the first few would drop them all.
#[tokio::test]
async fn a_dlq_counting_deliveries_is_not_read_through() {
    let (hs, dlq_name) = an_earlier_releases_dlq_of_six("limited").await;
    let shown = dlq::list(&hs.conn, &hs.topology(), 2)
        .await
        .expect("list 2");
    assert_eq!(shown.len(), 2);
    await_ready_count(&hs.ch, &dlq_name, 6).await;
    let delivered = deliveries_counted(&hs, &dlq_name).await;
    assert!(
        delivered <= 2,
        "{delivered} dead letters counted a delivery for a list of 2"
    );
}

/// The same, listed by an operator who may not declare (`configure` on nothing): the
/// check of the DLQ's arguments is refused to them, which tells nothing — so nothing is
/// read through. Before, the refusal read as "no limit kept" and every look counted a
/// delivery on every dead letter.
#[tokio::test]
async fn a_dlq_whose_limit_cannot_be_checked_is_not_read_through() {
    let (hs, dlq_name) = an_earlier_releases_dlq_of_six("unchecked").await;
    let user = unique("lookonly");
    let _user = admin::Admin::suite()
        .add_user_configuring(&user, "pw", "^$")
        .await;
    let limited = with_credentials(&amqp_url(), &user, "pw");
    let conn = framework::lapin::Connection::connect(&limited, Default::default())
        .await
        .expect("the user may connect");
    let topo = hs.topology();
    assert!(
        !matches!(topo.dlq_delivery_limit_kept(&conn).await, Ok(false)),
        "a refused check is no answer"
    );
    let shown = dlq::list(&conn, &topo, 2).await.expect("list 2");
    assert_eq!(shown.len(), 2);
    let _ = conn.close(200, "done".into()).await;
    await_ready_count(&hs.ch, &dlq_name, 6).await;
    let delivered = deliveries_counted(&hs, &dlq_name).await;
    assert!(
        delivered <= 2,
        "{delivered} dead letters counted a delivery for a list of 2"
    );
}

/// A stopped service whose quorum `Q-dlq` an earlier release declared (RabbitMQ's default
/// delivery limit kept), holding six dead letters.
async fn an_earlier_releases_dlq_of_six(prefix: &str) -> (Harness, String) {
    use framework::lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use framework::lapin::types::{AMQPValue, FieldTable};
    let mut hs = Harness::start(prefix, &[], failing()).await;
    hs.stop().await;
    let dlq_name = format!("{}-dlq", hs.q);
    hs.ch
        .queue_delete(dlq_name.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the DLQ");
    let mut old = FieldTable::default();
    old.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    hs.ch
        .queue_declare(
            dlq_name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            old,
        )
        .await
        .expect("an earlier release's DLQ");
    for i in 0..6 {
        let props = BasicProperties::default().with_message_id(format!("m{i}").into());
        publish(&hs.ch, "", &dlq_name, b"{}", props).await;
    }
    await_ready_count(&hs.ch, &dlq_name, 6).await;
    (hs, dlq_name)
}

/// Takes every message of `queue` away, counting those the broker had delivered before.
async fn deliveries_counted(hs: &Harness, queue: &str) -> usize {
    use framework::lapin::types::AMQPValue;
    let mut delivered = 0;
    while let Ok(Some(m)) = hs
        .ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
    {
        // The broker's count of earlier deliveries (0, or no header, for none).
        let count = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-delivery-count").cloned());
        if count.is_some_and(|c| !matches!(c, AMQPValue::LongLongInt(0) | AMQPValue::LongInt(0))) {
            delivered += 1;
        }
    }
    delivered
}

/// A replay while the service still fails one of the dead letters moves each dead letter
/// it found once: the failing one's new dead letter (a quorum DLQ on RabbitMQ 4.x hands out
/// a message of priority 5 or more ahead of those before it) is passed over, not replayed
/// again and counted among those it set out to move. Before, the same message went round
/// the service dozens of times and the dead letters behind it stayed where they were.
#[tokio::test]
async fn a_dead_letter_failing_again_during_its_replay_is_replayed_once() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let (poisoned, handled) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (p, n) = (poisoned.clone(), handled.clone());
    let processor = FnProcessor(move |v: serde_json::Value, _: &MessageContext| {
        if v["poison"] == serde_json::json!(true) {
            p.fetch_add(1, SeqCst);
            Outcome::permanent("still bad")
        } else {
            n.fetch_add(1, SeqCst);
            Outcome::success(&v)
        }
    });
    let mut hs = Harness::start("replayonce", &[], processor).await;
    let dlq_name = format!("{}-dlq", hs.q);
    let priority = |props: BasicProperties| props.with_priority(9);
    publish(
        &hs.ch,
        "",
        &dlq_name,
        br#"{"poison":true}"#,
        priority(BasicProperties::default().with_message_id("poison".into())),
    )
    .await;
    const N: usize = 500;
    for i in 0..N {
        publish(
            &hs.ch,
            "",
            &dlq_name,
            format!("{{\"i\":{i}}}").as_bytes(),
            BasicProperties::default().with_message_id(format!("n-{i}").into()),
        )
        .await;
    }
    let all = N as u32 + 1;
    await_ready_count(&hs.ch, &dlq_name, all).await;

    // One message by id: replayed once, failed once, back in the DLQ once.
    let one = Filter {
        message_id: Some("poison".into()),
        ..Default::default()
    };
    let moved = dlq::replay_filtered(&hs.conn, &hs.topology(), &one, false)
        .await
        .expect("replayed");
    assert_eq!(moved.len(), 1, "the poison replayed once");
    await_ready_count(&hs.ch, &dlq_name, all).await;
    assert_eq!(poisoned.load(SeqCst), 1, "the poison went round once");

    // Everything: each of them once (the poison's earlier dead letter included), and the
    // poison's new dead letter left for the next run.
    let moved = dlq::replay_filtered(&hs.conn, &hs.topology(), &Filter::default(), false)
        .await
        .expect("replayed");
    assert_eq!(moved.len(), N + 1);
    await_ready_count(&hs.ch, &dlq_name, 1).await;
    assert_eq!(poisoned.load(SeqCst), 2, "the poison went round once more");
    wait_until("every other dead letter handled", || {
        handled.load(SeqCst) >= N
    })
    .await;
    hs.stop().await;
    assert_eq!(handled.load(SeqCst), N, "each of them once");
    assert_eq!(poisoned.load(SeqCst), 2);
}

/// A replay that moved every dead letter and closed its channel (the broker took every
/// removal) is done, whatever happens to the count of the DLQ after it: it was reported as
/// cut off, naming the last one as maybe still in the DLQ, where it could not be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_done_is_not_reported_cut_off_by_the_count_after_it() {
    let n = 3;
    let hs = dead_letters("countafter", n).await;
    let conn = framework::testing::broker::connect(&amqp_url())
        .await
        .expect("connected");
    let dlq_name = format!("{}-dlq", hs.q);
    let mut ids = Vec::new();
    let r = within(
        WAIT,
        "the replay ending",
        dlq::replay_each(&conn, &hs.topology(), &Filter::default(), false, |d| {
            ids.push(d.message_id.clone());
            // The count after the replay fails: its queue is gone.
            if ids.len() == n as usize {
                tokio::task::block_in_place(|| {
                    tokio::runtime::Handle::current().block_on(async {
                        hs.ch
                            .queue_delete(dlq_name.as_str().into(), Default::default())
                            .await
                            .expect("the DLQ deleted")
                    })
                });
            }
        }),
    )
    .await;
    assert_eq!(r.expect("the replay is done"), n as usize);
    framework::testing::broker::close(conn).await;
    await_ready_count(&hs.ch, &hs.q, n).await;
}

/// A replay whose connection is lost after some dead letters were replayed says that the
/// last one may still be in the DLQ (its removal was written, never answered): a bare
/// "broker error" sent the operator to run it again, delivering it twice unwarned. And
/// nothing is lost.
#[tokio::test]
async fn a_replay_cut_off_midway_names_the_last_one_as_maybe_still_there() {
    let n = 10;
    let hs = dead_letters("cutreplay", n).await;
    let relay = framework::testing::relay::Relay::start().await;
    let conn = within(
        WAIT,
        "connecting through the relay",
        framework::lapin::Connection::connect(&relay.url, Default::default()),
    )
    .await
    .expect("connected through the relay");
    let filter = Filter {
        per_second: Some(20.0),
        ..Filter::default()
    };
    let mut ids = Vec::new();
    let r = within(
        WAIT,
        "the replay ending",
        dlq::replay_each(&conn, &hs.topology(), &filter, false, |d| {
            ids.push(d.message_id.clone());
            if ids.len() == 3 {
                relay.refuse();
            }
        }),
    )
    .await;
    assert_eq!(ids.len(), 3, "{ids:?}");
    let last = ids[2].clone();
    let e = r.expect_err("cut off");
    assert!(e.to_string().contains("may still be in the DLQ"), "{e}");
    match &e {
        dlq::DlqError::LostAfterReplaying { message_id, .. } => {
            assert_eq!(message_id, &last, "the last one replayed is named");
        }
        other => panic!("{other:?}"),
    }
    // What the cut connection held comes back to the DLQ.
    await_accounted_for(&hs, n).await;
    let seen = drain_both(&hs).await;
    assert_eq!(
        seen.len(),
        n as usize,
        "every dead letter is in the DLQ or replayed"
    );
    for (body, count) in &seen {
        if *count > 1 {
            let v: serde_json::Value = serde_json::from_slice(body).expect("JSON");
            assert_eq!(count, &2, "{v}");
            assert_eq!(
                Some(format!("m{}", v["i"])),
                last,
                "only the one named is twice"
            );
        }
    }
}

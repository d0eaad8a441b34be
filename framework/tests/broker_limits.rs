//! The broker's limits, on private nodes so the shared broker and every other test are
//! untouched:
//! - a resource alarm (memory or disk): RabbitMQ blocks every publishing connection until
//!   it clears. An outcome published meanwhile lands when it clears; the framework must
//!   not take its unanswered confirm for a failure and publish a retry beside it (one
//!   input, several outputs, handled at once);
//! - `max_message_size`: an outcome larger than the broker accepts is dead-lettered at once
//!   with the reason, not retried `max_attempts` times into the same refusal; an input
//!   itself larger than the broker now accepts is dead-lettered by the broker, once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use framework::testing::broker::PrivateBroker;
use framework::testing::*;
use framework::{MessageContext, MessageProcessor, Outcome, async_trait};

/// Succeeds once the gate opens; counts its calls.
struct Gated(tokio::sync::watch::Receiver<bool>, Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for Gated {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        self.1.fetch_add(1, Ordering::SeqCst);
        let mut open = self.0.clone();
        let _ = open.wait_for(|o| *o).await;
        Outcome::success(v)
    }
}

/// Whether the node reports a resource alarm (`check_alarms` exits 69 then; any other
/// failure is the CLI's, not an alarm). Not `check_local_alarms`: RabbitMQ 4.3 reports no
/// disk alarm there while the node blocks publishers for one; the node is alone.
fn alarmed(broker: &PrivateBroker) -> bool {
    let out = tokio::task::block_in_place(|| {
        broker.tool_output("rabbitmq-diagnostics", &["check_alarms"])
    });
    match out.status.code() {
        Some(0) => false,
        Some(69) => true,
        _ => panic!(
            "rabbitmq-diagnostics check_alarms: {:?}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Sets the node's free-disk limit (the CLI takes seconds: off the runtime's workers,
/// which the service under test shares).
fn disk_limit(broker: &PrivateBroker, limit: &str) {
    tokio::task::block_in_place(|| broker.ctl(&["set_disk_free_limit", limit]));
}

/// The confirm limit of these tests: long enough for a loaded machine's confirm once the
/// alarm clears; the alarm is held for well beyond it.
const LIMIT_MS: u64 = 8000;

/// Starts `processor` on queue `q` of `broker` with `extra` config, once it consumes.
async fn start_on<P: MessageProcessor>(
    broker: &PrivateBroker,
    q: &str,
    extra: &[(&str, &str)],
    processor: P,
) -> (Background, framework::config::Config<serde::de::IgnoredAny>) {
    let url = broker.url();
    let mut all = vec![("amqp.url", url.as_str())];
    all.extend_from_slice(extra);
    let cfg = config(q, &all);
    let service = Background::start(
        q,
        &cfg,
        framework::ProcessorConfiguration::new(&format!("{q}-in"), "test.#", "test.out", processor),
    );
    let status = service.status.clone();
    wait_until("consuming", || status.is_ready()).await;
    (service, cfg)
}

/// Publishes the input `{"n":1}` to service `q` on `broker`, confirmed.
async fn send_input(broker: &PrivateBroker, q: &str) {
    send_input_with(broker, q, Default::default()).await;
}

/// [`send_input`] with `props`.
async fn send_input_with(
    broker: &PrivateBroker,
    q: &str,
    props: framework::lapin::BasicProperties,
) {
    let (conn, ch) = broker.channel().await.expect("channel");
    publish(&ch, &format!("{q}-in"), "test.x", br#"{"n":1}"#, props).await;
    framework::testing::broker::close(conn).await;
}

/// Raises a disk alarm on `broker` (publishers blocked) and waits until it is on.
async fn raise_alarm(broker: &PrivateBroker) {
    disk_limit(broker, "1000000GB");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !alarmed(broker) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the alarm to go off"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Service `q` on `broker` (confirm limit `limit_ms`, drain 1 s) with a sink on its output,
/// its one input's outcome published once a disk alarm blocks publishers: the alarm is on
/// and the outcome waits for it. Returns the service, its config and the sink's name.
async fn outcome_waiting_out_an_alarm(
    broker: &PrivateBroker,
    q: &str,
    limit_ms: &str,
    open: tokio::sync::watch::Sender<bool>,
    gate: tokio::sync::watch::Receiver<bool>,
    calls: &Arc<AtomicUsize>,
) -> (
    Background,
    framework::config::Config<serde::de::IgnoredAny>,
    String,
) {
    let (service, cfg) = start_on(
        broker,
        q,
        &[
            ("amqp.operation_timeout_ms", limit_ms),
            ("amqp.drain_timeout_ms", "1000"),
        ],
        Gated(gate, calls.clone()),
    )
    .await;
    let sink = format!("{q}-sink");
    broker.sink(&sink, &format!("{q}-out")).await;
    send_input(broker, q).await;
    let c = calls.clone();
    wait_until("the handler to start", || c.load(Ordering::SeqCst) == 1).await;
    // A disk alarm: the node blocks publishers until the limit comes down again.
    raise_alarm(broker).await;
    open.send(true).expect("gate open");
    (service, cfg, sink)
}

/// Waits until service `q` on `broker` has settled: an output in `sink`, nothing left in
/// `q` or its retry tiers, and `also` holds.
async fn settle(
    broker: &PrivateBroker,
    q: &str,
    sink: &str,
    cfg: &framework::config::Config<serde::de::IgnoredAny>,
    also: impl Fn() -> bool,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = broker.count(sink).await.unwrap_or(0);
        let mut busy = broker.count(q).await.unwrap_or(1);
        for d in &cfg.retry.delays_ms {
            busy += broker.count(&format!("{q}-retry-{d}")).await.unwrap_or(0);
        }
        if out >= 1 && busy == 0 && also() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "settled ({out} outputs, {busy} waiting)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_published_during_a_resource_alarm_lands_once() {
    // Installed before the service registers its metrics, as a service binary does.
    let metrics = framework::telemetry::metrics_handle();
    let broker = PrivateBroker::start().await;
    let q = unique("alarm");
    let (open, gate) = tokio::sync::watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let (service, cfg, sink) =
        outcome_waiting_out_an_alarm(&broker, &q, &LIMIT_MS.to_string(), open, gate, &calls).await;
    // The stall shows: the broker blocks the service's connection, which stays connected.
    let blocked = |v: &str| {
        let line = format!("storagetier_connection_blocked{{queue=\"{q}\"}} {v}");
        let metrics = metrics.clone();
        move || metrics.render().contains(&line)
    };
    wait_until("storagetier_connection_blocked 1", blocked("1")).await;
    // The outcome's confirm cannot come while the alarm lasts. What must not happen
    // cannot be awaited: the alarm is held for two and a half times the confirm limit,
    // in which the framework used to time the confirm out, publish a retry (blocked too,
    // landing with the output once the alarm clears) and give the input back.
    tokio::time::sleep(Duration::from_millis(LIMIT_MS * 5 / 2)).await;
    disk_limit(&broker, "1MB");
    wait_until("storagetier_connection_blocked 0", blocked("0")).await;

    // Everything settles: the output once, nothing left in the input queue or the retry
    // tiers, the handler called once.
    settle(&broker, &q, &sink, &cfg, || !alarmed(&broker)).await;
    service.stop().await;
    assert_eq!(
        broker.count(&sink).await,
        Some(1),
        "one output for one input"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1, "handled once");
}

/// A stop while the broker blocks the connection (a resource alarm), an outcome waiting
/// for its confirm: the stop keeps to its drain budget. The cancel, the last acks and the
/// closes cannot be written then, and each used to wait out the whole operation limit (30 s
/// by default: a SIGTERM took over 90 s, past any orchestrator's grace period). Here the
/// limit is longer than the test's own bound, so any one of those waits fails it.
/// Nothing is lost: the input goes back to its queue (or its output lands once the alarm
/// clears).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_during_a_resource_alarm_keeps_to_its_drain_budget() {
    let broker = PrivateBroker::start().await;
    let q = unique("alarmstop");
    let (open, gate) = tokio::sync::watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let (service, _cfg, sink) =
        outcome_waiting_out_an_alarm(&broker, &q, "120000", open, gate, &calls).await;
    // Within WAIT (60 s), or `stop` fails the test.
    service.stop().await;
    disk_limit(&broker, "1MB");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = broker.count(&sink).await.unwrap_or(0);
        let back = broker.count(&q).await.unwrap_or(0);
        if out + back >= 1 && !alarmed(&broker) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the input is neither back in its queue nor handled"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Refuses everything; counts its calls.
struct Refusing(Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for Refusing {
    type Input = serde_json::Value;
    async fn handle(&self, _v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        Outcome::permanent("refused")
    }
}

/// A message queued before the broker's `max_message_size` came down below its size (an
/// operator's change; an upgrade to 4.x, whose default is 16 MiB, with a backlog): no
/// outcome of it can be published, since a retry or a dead letter carries it whole. It is
/// handled once and the broker dead-letters it as it came (`Q-dlq`, with `x-death`),
/// instead of going back to the queue to be handled again and again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_larger_than_the_broker_now_accepts_is_dead_lettered_by_the_broker() {
    let broker = PrivateBroker::start().await;
    let q = unique("shrunk");
    let calls = Arc::new(AtomicUsize::new(0));
    // Declared by a first start; the message goes in while nothing consumes.
    let (service, _cfg) = start_on(&broker, &q, &[], Refusing(calls.clone())).await;
    service.stop().await;
    let (conn, ch) = broker.channel().await.expect("channel");
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    publish(
        &ch,
        &format!("{q}-in"),
        "test.x",
        body.as_bytes(),
        Default::default(),
    )
    .await;
    framework::testing::broker::close(conn).await;
    // 1 MiB from now on, for every channel opened after.
    tokio::task::block_in_place(|| {
        broker.ctl(&[
            "eval",
            "application:set_env(rabbit, max_message_size, 1048576).",
        ])
    });
    // RabbitMQ 4.x reads the limit as the app starts: restarted (the message is durable).
    if broker.version().0 >= 4 {
        tokio::task::block_in_place(|| broker.stop_app());
        broker.start_app().await;
    }
    let (service, _cfg) = start_on(&broker, &q, &[], Refusing(calls.clone())).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&format!("{q}-dlq")).await.unwrap_or(0) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dead-lettered by the broker ({} calls)",
            calls.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    service.stop().await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "handled once");
    assert_eq!(broker.count(&q).await, Some(0), "nothing back in the queue");

    // Its replay is refused for its size and stops there, saying so: nothing reached the
    // queue (not "it may have", which sends an operator looking for a duplicate).
    let topo = test_topology(&q, &_cfg);
    let conn = framework::testing::broker::connect(&broker.url())
        .await
        .expect("connect");
    let e = framework::dlq::replay(&conn, &topo, &framework::dlq::Selection::All, false)
        .await
        .expect_err("larger than the broker accepts");
    let text = e.to_string();
    assert!(
        matches!(
            e,
            framework::dlq::DlqError::Publish(
                framework::publisher::PublishError::BodyTooLarge { .. }
            )
        ),
        "{text}"
    );
    assert!(text.contains("max_message_size"), "{text}");
    assert!(!text.contains("may have reached"), "{text}");
    framework::testing::broker::close(conn).await;
    // The dead letter handed back is ready again once the quorum queue has applied the
    // return, which may be just after the channel closed: awaited, not read at once.
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&format!("{q}-dlq")).await != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead letter kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(broker.count(&q).await, Some(0), "nothing replayed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_larger_than_the_broker_accepts_is_dead_lettered_at_once() {
    let broker = PrivateBroker::start_with(|_, _| "max_message_size = 1048576\n".to_string()).await;
    let q = unique("toolarge");
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (service, _) = start_on(
        &broker,
        &q,
        &[],
        FnProcessor(move |_: serde_json::Value, _: &MessageContext| {
            c.fetch_add(1, Ordering::SeqCst);
            Outcome::success(serde_json::json!({"report": "x".repeat(2 << 20)}))
        }),
    )
    .await;
    dead_lettered_at_once(&broker, &q, &calls, "larger than the broker accepts").await;
    service.stop().await;
}

/// Sends service `q` on `broker` its input and asserts it is dead-lettered as it came,
/// permanent, `why` naming the refusal, after one call of its handler (not retried).
async fn dead_lettered_at_once(broker: &PrivateBroker, q: &str, calls: &AtomicUsize, why: &str) {
    let (_conn, ch) = broker.channel().await.expect("channel");
    let mut dlq = consume(&ch, &format!("{q}-dlq")).await;
    send_input(broker, q).await;
    let d = next(&mut dlq).await;
    assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
    let error = header(&d, "x-error").unwrap_or_default();
    assert!(error.contains(why), "{error}");
    assert_eq!(d.data, br#"{"n":1}"#, "the input as it came");
    assert_eq!(calls.load(Ordering::SeqCst), 1, "not retried");
}

/// Publishes a message of 2 MiB from inside its handler (as snapshot-status publishes
/// export-state messages built from producer text); counts its calls.
struct PublishesTooMuch(String, Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for PublishesTooMuch {
    type Input = serde_json::Value;
    async fn handle(&self, _: serde_json::Value, ctx: &MessageContext) -> Outcome {
        self.1.fetch_add(1, Ordering::SeqCst);
        let big = framework::Publication::text(&self.0, "big", "x".repeat(2 << 20));
        match ctx.publish(big).await {
            Ok(()) => Outcome::success("published"),
            Err(e) => Outcome::publish_failed("publishing the big one", &e),
        }
    }
}

/// A handler's own publish refused by the broker for its size will be refused again at
/// every retry: its input is dead-lettered at once, naming the refusal, not retried
/// `max_attempts` times into it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handlers_publish_larger_than_the_broker_accepts_dead_letters_its_input() {
    let broker = PrivateBroker::start_with(|_, _| "max_message_size = 1048576\n".to_string()).await;
    let q = unique("bigextra");
    let calls = Arc::new(AtomicUsize::new(0));
    let (service, _) = start_on(
        &broker,
        &q,
        &[],
        PublishesTooMuch(format!("{q}-out"), calls.clone()),
    )
    .await;
    dead_lettered_at_once(&broker, &q, &calls, "max_message_size").await;
    service.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_during_a_resource_alarm_moves_each_dead_letter_once() {
    let broker = PrivateBroker::start().await;
    let q = unique("alarmreplay");
    let (service, cfg) = start_on(
        &broker,
        &q,
        &[("amqp.operation_timeout_ms", &LIMIT_MS.to_string())],
        FnProcessor(|_: serde_json::Value, _: &MessageContext| Outcome::permanent("bad")),
    )
    .await;
    send_input(&broker, &q).await;
    let dlq = format!("{q}-dlq");
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&dlq).await != Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing consumes `Q` while the replay runs: what it moves stays there to be counted.
    service.stop().await;
    let topo = test_topology(&q, &cfg);
    let conn = framework::testing::broker::connect(&broker.url())
        .await
        .expect("connect");
    raise_alarm(&broker).await;
    let replay = tokio::spawn(async move {
        let r = framework::dlq::replay(&conn, &topo, &framework::dlq::Selection::All, false).await;
        (r.map(|moved| moved.len()).map_err(|e| e.to_string()), conn)
    });
    // Held for two and a half times the confirm limit, in which the replay used to time out,
    // leaving the dead letter to be replayed again while its first copy was on its way.
    tokio::time::sleep(Duration::from_millis(LIMIT_MS * 5 / 2)).await;
    assert!(
        !replay.is_finished(),
        "the replay waits for the alarm to clear"
    );
    disk_limit(&broker, "1MB");
    let (moved, conn) = tokio::time::timeout(WAIT, replay)
        .await
        .expect("the replay finished after the alarm")
        .expect("replay task");
    assert_eq!(moved, Ok(1));
    framework::testing::broker::close(conn).await;
    assert_eq!(
        broker.count(&dlq).await,
        Some(0),
        "the dead letter was removed"
    );
    assert_eq!(broker.count(&q).await, Some(1), "and replayed once");

    // Stopped (Ctrl-C) while the broker blocks its publish, a replay ends at once and says
    // that the one it was publishing may still land and that its dead letter is kept;
    // before, the first signal did nothing until the alarm cleared.
    let (pc, ch) = broker.channel().await.expect("channel");
    publish(
        &ch,
        "",
        &dlq,
        br#"{"n":2}"#,
        framework::lapin::BasicProperties::default().with_message_id("blocked-2".into()),
    )
    .await;
    framework::testing::broker::close(pc).await;
    let conn = framework::testing::broker::connect(&broker.url())
        .await
        .expect("connect");
    raise_alarm(&broker).await;
    let stop = framework::CancellationToken::new();
    let filter = framework::dlq::Filter {
        stop: Some(stop.clone()),
        ..Default::default()
    };
    let topo = test_topology(&q, &cfg);
    let replay = tokio::spawn(async move {
        let r = framework::dlq::replay_each(&conn, &topo, &filter, false, |_| {}).await;
        (r, conn)
    });
    tokio::time::sleep(Duration::from_millis(LIMIT_MS * 2)).await;
    assert!(!replay.is_finished(), "waiting for the broker");
    stop.cancel();
    let (r, conn) = tokio::time::timeout(WAIT, replay)
        .await
        .expect("a stop ends the wait")
        .expect("replay task");
    let e = r.expect_err("stopped before the confirm");
    assert!(
        matches!(&e, framework::dlq::DlqError::Unconfirmed { moved: 0, message_id: Some(id) } if id == "blocked-2"),
        "{e}"
    );
    assert!(e.to_string().contains("may still land"), "{e}");
    framework::testing::broker::close(conn).await;
    disk_limit(&broker, "1MB");
    // Back in the DLQ once the broker has taken the closed channel's deliveries back.
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&dlq).await != Some(1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "its dead letter is kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Retries its first call once the gate opens, succeeds after; counts its calls.
struct RetriesOnceGated(tokio::sync::watch::Receiver<bool>, Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for RetriesOnceGated {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        if self.1.fetch_add(1, Ordering::SeqCst) > 0 {
            return Outcome::success(v);
        }
        let mut open = self.0.clone();
        let _ = open.wait_for(|o| *o).await;
        Outcome::retry("first")
    }
}

/// A retry whose confirm comes later than the operation bound (its tier not confirming
/// for a while: a quorum queue electing a leader) lands once and replaces its input:
/// the input is not given back meanwhile. Given back, the message lived twice — handled
/// again at once, and again when the late retry came back: two outputs for one input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_confirm_comes_late_replaces_its_input_once() {
    // Long enough for a loaded machine's confirm of the success output (a quorum sink on
    // a private node): the bound is every confirm's, not only the held one's.
    const BOUND_MS: u64 = 8000;
    let broker = PrivateBroker::start().await;
    let q = unique("lateretry");
    let (open, gate) = tokio::sync::watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let (service, cfg) = start_on(
        &broker,
        &q,
        &[
            ("amqp.operation_timeout_ms", &BOUND_MS.to_string()),
            ("amqp.queue_metrics_interval_ms", "0"),
        ],
        RetriesOnceGated(gate, calls.clone()),
    )
    .await;
    let sink = format!("{q}-sink");
    broker.sink(&sink, &format!("{q}-out")).await;
    send_input(&broker, &q).await;
    let c = calls.clone();
    wait_until("the handler to start", || c.load(Ordering::SeqCst) == 1).await;
    let tier = format!("{q}-retry-{}", cfg.retry.delays_ms[0]);
    broker.suspend_queue(&tier, "st_late_retry", true);
    open.send(true).expect("gate open");
    // What must not happen cannot be awaited: the tier confirms nothing for twice the
    // operation bound, in which the framework used to give the confirm up and give
    // the input back (handled again, while its retry was still to land).
    tokio::time::sleep(Duration::from_millis(BOUND_MS * 2)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the input is held while its retry's confirm is awaited"
    );
    broker.suspend_queue(&tier, "st_late_retry", false);

    settle(&broker, &q, &sink, &cfg, || {
        calls.load(Ordering::SeqCst) >= 2
    })
    .await;
    service.stop().await;
    assert_eq!(
        broker.count(&sink).await,
        Some(1),
        "one output for one input"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "handled twice: the first attempt and its retry"
    );
}

/// A stop whose drain budget runs out while a handler awaits its retry's confirm (the
/// retry tier not confirming for a while: a quorum queue electing a leader during a rolling
/// deploy) waits for that confirm, up to the operation bound, instead of stopping the
/// handler: stopped, its input went back to the queue while the retry landed all the same,
/// and the message lived twice (two copies handled, two outputs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_past_its_drain_budget_for_a_retrys_late_confirm() {
    const DRAIN_MS: u64 = 1000;
    let broker = PrivateBroker::start().await;
    let q = unique("stopretry");
    let (open, gate) = tokio::sync::watch::channel(false);
    let calls = Arc::new(AtomicUsize::new(0));
    let (service, cfg) = start_on(
        &broker,
        &q,
        &[
            ("amqp.drain_timeout_ms", &DRAIN_MS.to_string()),
            ("amqp.queue_metrics_interval_ms", "0"),
        ],
        RetriesOnceGated(gate, calls.clone()),
    )
    .await;
    send_input(&broker, &q).await;
    let c = calls.clone();
    wait_until("the handler to start", || c.load(Ordering::SeqCst) == 1).await;
    let tier = format!("{q}-retry-{}", cfg.retry.delays_ms[0]);
    broker.suspend_queue(&tier, "st_stop_retry", true);
    open.send(true).expect("gate open");
    let stopping = tokio::spawn(service.stop());
    // What must not happen cannot be awaited: the tier confirms nothing for three times
    // the drain budget, at whose end the handler used to be stopped.
    tokio::time::sleep(Duration::from_millis(DRAIN_MS * 3)).await;
    broker.suspend_queue(&tier, "st_stop_retry", false);
    stopping.await.expect("the stop ends");
    // The retry comes back to `q` from its tier; the input itself must not be there too.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let waiting = broker.count(&tier).await.unwrap_or(1);
        let back = broker.count(&q).await.unwrap_or(0);
        if waiting == 0 && back >= 1 {
            assert_eq!(
                back, 1,
                "one copy of the message: its retry, not its input too"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the retry to come back ({waiting} in its tier, {back} in the queue)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// Retries every message the first time, all 16 at once (the first 16 calls wait for each
/// other); succeeds after. Counts its calls.
struct RetriesTogether(Arc<tokio::sync::Barrier>, Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for RetriesTogether {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        if self.1.fetch_add(1, Ordering::SeqCst) < 16 {
            self.0.wait().await;
        }
        if ctx.attempt == 0 {
            Outcome::retry("once")
        } else {
            Outcome::success(v)
        }
    }
}

/// A broker whose `channel_max` is below the service's handlers: each retry needs a
/// channel of its own, and lapin refused those past the limit, so their inputs went back
/// to the queue (handled again, towards the delivery limit). The pool opens no more than
/// the broker allows and the others wait for one: 16 retries at once on a node allowing
/// 10 channels, each message handled twice (once, then once retried), one output each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_wait_for_a_channel_where_the_broker_allows_fewer_than_the_handlers() {
    let broker = PrivateBroker::start_with(|_, _| "channel_max = 10\n".to_string()).await;
    let q = unique("chanmax");
    let calls = Arc::new(AtomicUsize::new(0));
    let (service, cfg) = start_on(
        &broker,
        &q,
        &[("amqp.prefetch", "16")],
        RetriesTogether(Arc::new(tokio::sync::Barrier::new(16)), calls.clone()),
    )
    .await;
    let sink = format!("{q}-sink");
    broker.sink(&sink, &format!("{q}-out")).await;
    broker
        .preload(
            &format!("{q}-in"),
            "test.x",
            (0..16).map(|i| format!(r#"{{"n":{i}}}"#).into_bytes()),
        )
        .await;
    let c = calls.clone();
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&sink).await.unwrap_or(0) < 16 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "16 outputs ({} calls)",
            c.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    settle(&broker, &q, &sink, &cfg, || true).await;
    service.stop().await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        32,
        "each handled once, then once retried"
    );
    assert_eq!(broker.count(&sink).await, Some(16), "one output each");
    assert_eq!(
        broker.count(&format!("{q}-dlq")).await,
        Some(0),
        "nothing dead-lettered"
    );
}

/// Dead-letters one part of its message (a bad record of a batch) and succeeds with the
/// rest; a part whose dead letter failed is retried, as the batch adapters do. Counts its
/// calls.
struct DeadLettersAPart(Arc<AtomicUsize>);

#[async_trait]
impl MessageProcessor for DeadLettersAPart {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        match ctx
            .dead_letter(br#"{"bad":1}"#.to_vec(), "a bad record")
            .await
        {
            Ok(()) => Outcome::success(v),
            Err(e) => Outcome::retry(format!("the bad record's dead letter: {e}")),
        }
    }
}

/// A part's dead letter whose confirm comes later than the operation bound (the DLQ not
/// confirming for a while: a quorum queue electing a leader) is awaited as a whole
/// message's is: given up on, it landed all the same while the message was retried, and
/// the retry dead-lettered the part again — two dead letters of one record, replayed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parts_dead_letter_whose_confirm_comes_late_is_dead_lettered_once() {
    // Long enough for a loaded machine's confirm of the success output (a quorum sink on
    // a private node): the bound is every confirm's, not only the held one's.
    const BOUND_MS: u64 = 8000;
    let broker = PrivateBroker::start().await;
    let q = unique("latepart");
    let calls = Arc::new(AtomicUsize::new(0));
    let (service, _cfg) = start_on(
        &broker,
        &q,
        &[
            ("amqp.operation_timeout_ms", &BOUND_MS.to_string()),
            ("amqp.queue_metrics_interval_ms", "0"),
        ],
        DeadLettersAPart(calls.clone()),
    )
    .await;
    let sink = format!("{q}-sink");
    broker.sink(&sink, &format!("{q}-out")).await;
    let dlq = format!("{q}-dlq");
    broker.suspend_queue(&dlq, "st_late_part", true);
    send_input(&broker, &q).await;
    let c = calls.clone();
    wait_until("the handler to start", || c.load(Ordering::SeqCst) == 1).await;
    // What must not happen cannot be awaited: the DLQ confirms nothing for twice the
    // operation bound, in which the framework used to give the part's confirm up and
    // retry the message (its retries come back within 200 ms).
    tokio::time::sleep(Duration::from_millis(BOUND_MS * 2)).await;
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the message is held while its part's dead letter is confirmed"
    );
    broker.suspend_queue(&dlq, "st_late_part", false);
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&sink).await.unwrap_or(0) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the output");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    service.stop().await;
    assert_eq!(
        broker.count(&dlq).await,
        Some(1),
        "the part dead-lettered once"
    );
    assert_eq!(
        broker.count(&sink).await,
        Some(1),
        "one output for one input"
    );
}

/// Where [`OneStepThenPauses`] marks its step done.
const PARTS: &str = "x-test-parts";

/// What [`OneStepThenPauses`] does once per message before it goes on.
#[derive(Clone, Copy)]
enum Step {
    /// Dead-letters part 1 of its message.
    DeadLetterAPart,
    /// Publishes `"one"` to the queue `<service queue>-`[`SIDE`] through `amq.topic`.
    Publish,
}

/// Where [`Step::Publish`] publishes (by routing key).
const SIDE: &str = "side";

/// Takes its [`Step`] (once: marked in [`PARTS`]), then goes on as the batch adapters and
/// crash-router do: a Retry carrying that mark if the service is stopping, else success.
/// Counts its calls.
struct OneStepThenPauses(Arc<AtomicUsize>, Step);

#[async_trait]
impl MessageProcessor for OneStepThenPauses {
    type Input = serde_json::Value;
    fn progress_headers(&self) -> &'static [&'static str] {
        &[PARTS]
    }
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        self.0.fetch_add(1, Ordering::SeqCst);
        let mut parts = framework::batch::Progress::resume(ctx, PARTS);
        match self.1 {
            Step::DeadLetterAPart => {
                if let Err(e) = parts
                    .dead_letter("1", br#"{"bad":1}"#.to_vec(), "a bad record")
                    .await
                {
                    return Outcome::retry(format!("the bad record's dead letter: {e}"));
                }
            }
            Step::Publish if !parts.is_done("1") => {
                let p = framework::Publication::text("amq.topic", SIDE, "one").mandatory();
                if let Err(e) = ctx.publish(p).await {
                    return Outcome::retry(format!("the side publish: {e}"));
                }
                parts.mark_done("1");
            }
            Step::Publish => {}
        }
        if let Some(why) = parts.pause_before(Duration::from_secs(1)) {
            return Outcome::retry(why);
        }
        Outcome::success(v)
    }
}

/// A stop whose drain budget runs out while a handler awaits its part's dead letter's
/// confirm (the DLQ a quorum queue electing a leader during a rolling deploy) waits for
/// that confirm, as for a whole message's retry, and the handler goes on in a retry
/// carrying the part's mark: stopped at the deadline, it gave its input back as it came
/// while the part's dead letter landed all the same, and the next instance dead-lettered
/// the part again — two dead letters of one record, replayed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_past_its_drain_budget_for_a_parts_late_dead_letter() {
    a_stop_waits_past_its_drain_budget_for("stoppart", "dlq", |c| {
        OneStepThenPauses(c, Step::DeadLetterAPart)
    })
    .await;
}

/// As for a part's dead letter, for a publish of the processor's own (crash-router's crash
/// ids): stopped mid-confirm, its handler lost the mark of what it had published, and the
/// next instance published it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_waits_past_its_drain_budget_for_a_processors_late_publish() {
    a_stop_waits_past_its_drain_budget_for("stoppub", SIDE, |c| {
        OneStepThenPauses(c, Step::Publish)
    })
    .await;
}

/// Stops a service on a private node while its handler (made by `processor`) awaits the
/// confirm of what it publishes to the queue `<q>-<late>`, which confirms nothing for three
/// times the drain budget; then a second instance finishes the message. What the handler
/// published lands once, the output once, in two calls.
async fn a_stop_waits_past_its_drain_budget_for<P: MessageProcessor>(
    name: &str,
    late: &str,
    processor: impl Fn(Arc<AtomicUsize>) -> P,
) {
    const DRAIN_MS: u64 = 1000;
    let broker = PrivateBroker::start().await;
    let q = unique(name);
    let calls = Arc::new(AtomicUsize::new(0));
    let settings = [
        ("amqp.drain_timeout_ms", DRAIN_MS.to_string()),
        ("amqp.queue_metrics_interval_ms", "0".to_string()),
    ];
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (service, _cfg) = start_on(&broker, &q, &settings, processor(calls.clone())).await;
    let sink = format!("{q}-sink");
    broker.sink(&sink, &format!("{q}-out")).await;
    let late = format!("{q}-{late}");
    if late.ends_with(SIDE) {
        broker.sink(&late, "amq.topic").await;
    }
    broker.suspend_queue(&late, "st_stop_late", true);
    send_input(&broker, &q).await;
    let c = calls.clone();
    wait_until("the handler to start", || c.load(Ordering::SeqCst) == 1).await;
    let stopping = tokio::spawn(service.stop());
    // What must not happen cannot be awaited: the queue confirms nothing for three times
    // the drain budget, at whose end the handler used to be stopped.
    tokio::time::sleep(Duration::from_millis(DRAIN_MS * 3)).await;
    broker.suspend_queue(&late, "st_stop_late", false);
    stopping.await.expect("the stop ends");
    // The next instance finishes the message.
    let (service, _cfg) = start_on(&broker, &q, &settings, processor(calls.clone())).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while broker.count(&sink).await.unwrap_or(0) < 1 {
        assert!(tokio::time::Instant::now() < deadline, "the output");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    service.stop().await;
    assert_eq!(
        broker.count(&late).await,
        Some(1),
        "published to {late} once"
    );
    assert_eq!(broker.count(&sink).await, Some(1), "one output");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// Messages of `queue` on `broker` delivered and not yet acknowledged.
fn unacked(broker: &PrivateBroker, queue: &str) -> u64 {
    let out = tokio::task::block_in_place(|| {
        broker.ctl_output(&["list_queues", "-q", "name", "messages_unacknowledged"])
    });
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(queue))
                .then(|| cols.next().and_then(|n| n.parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

/// A second Ctrl-C during `dlq replay` while a replayed copy waits for its confirm (the
/// service's queue not confirming: a quorum queue electing a leader) ends the replay at
/// once, its `--json` summary naming that copy as one that may still land — which it does,
/// once the queue answers, while its dead letter is kept. Before, the second signal exited
/// from the signal handler: no summary, no name, and the next replay delivered it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_a_replay_names_the_copy_that_may_still_land() {
    use std::process::Stdio;
    let broker = PrivateBroker::start().await;
    let q = unique("replaystop");
    let refuse =
        FnProcessor(|_: serde_json::Value, _: &MessageContext| Outcome::permanent("refused"));
    let (service, _cfg) = start_on(&broker, &q, &[], refuse).await;
    let props = framework::lapin::BasicProperties::default().with_message_id("stuck-1".into());
    send_input_with(&broker, &q, props).await;
    let (conn, ch) = broker.channel().await.expect("channel");
    let dlq = format!("{q}-dlq");
    await_ready_count(&ch, &dlq, 1).await;
    service.stop().await;
    broker.suspend_queue(&q, "st_replay_stop", true);

    let dir = tempfile::tempdir().expect("config dir");
    let mut cmd = isolated_command(env!("CARGO_BIN_EXE_echo"));
    cmd.arg("--config-dir")
        .arg(dir.path())
        .env("STORAGETIER__AMQP__URL", broker.url())
        // Far longer than the test waits: only the second signal can end it in time.
        .env("STORAGETIER__AMQP__OPERATION_TIMEOUT_MS", "600000")
        .env("STORAGETIER__LOG__LEVEL", "info")
        .env("STORAGETIER__ECHO__QUEUE", &q)
        .env("STORAGETIER__ECHO__INPUT_EXCHANGE", format!("{q}-in"))
        .env("STORAGETIER__ECHO__OUTPUT_EXCHANGE", format!("{q}-out"))
        .env("STORAGETIER__RETRY__DELAYS_MS", "200,400")
        .args(["dlq", "replay", "--all", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut replay = process::spawn(&mut cmd).expect("replay runs");
    let seen_rx =
        process::lines_holding(replay.take_stderr().expect("stderr"), "shutdown requested");
    // The dead letter fetched: its copy is published, and waits for the confirm.
    wait_until("the replay to fetch the dead letter", || {
        unacked(&broker, &dlq) == 1
    })
    .await;
    replay.signal(process::SIGINT);
    tokio::task::spawn_blocking(move || seen_rx.recv_timeout(WAIT))
        .await
        .expect("join")
        .expect("the first signal is taken");
    replay.signal(process::SIGINT);
    let mut out = replay.take_stdout().expect("stdout");
    let status = tokio::task::spawn_blocking(move || replay.wait_for(WAIT))
        .await
        .expect("join")
        .expect("the replay ends at the second signal");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut out, &mut text).expect("stdout");
    assert_eq!(status.code(), Some(1), "{text}");
    let last: serde_json::Value = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("a summary last: {text}"));
    let error = last["summary"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("stuck-1") && error.contains("may still land"),
        "{last}"
    );
    assert_eq!(last["summary"]["moved"], 0, "{last}");

    broker.suspend_queue(&q, "st_replay_stop", false);
    // The copy lands once the queue answers; the dead letter was kept.
    await_ready_count(&ch, &q, 1).await;
    await_ready_count(&ch, &dlq, 1).await;
    framework::testing::broker::close(conn).await;
}

/// A pooled channel dropped while a confirm on it is still awaited (its handler stopped
/// by a drain) is closed, not handed to the next outcome: lapin credits a return to the
/// oldest confirm pending on a channel, so the next outcome's unroutable retry could be
/// confirmed as routed in the stale publish's place, its input acked and lost. One whose
/// publishes were all answered is reused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_channel_dropped_mid_confirm_is_never_lent_again() {
    use framework::lapin::BasicProperties;
    use framework::lapin::options::BasicPublishOptions;
    let broker = PrivateBroker::start().await;
    let q = unique("poolstale");
    broker.sink(&q, "amq.topic").await;
    let (conn, _ch) = broker.channel().await.expect("private broker reachable");
    let pool =
        framework::channel_pool::ChannelPool::new(Arc::new(conn), Duration::from_secs(30), None);
    async fn publish(ch: &framework::lapin::Channel) -> framework::lapin::PublisherConfirm {
        ch.basic_publish(
            "amq.topic".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
    }
    // Answered: the channel goes back and is lent again.
    let mut ch = pool.get().await.expect("a channel");
    let answered = ch.id();
    publish(&ch).await.await.expect("confirmed");
    ch.settled();
    drop(ch);
    let ch = pool.get().await.expect("a channel");
    assert_eq!(ch.id(), answered, "an answered channel is reused");
    // Its queue confirms nothing now: the confirm is given up on as the publish is dropped.
    broker.suspend_queue(&q, "st_pool_stale", true);
    let confirm = publish(&ch).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), confirm)
            .await
            .is_err(),
        "the queue confirms nothing while suspended"
    );
    let stale = ch.id();
    drop(ch);
    let next = pool.get().await.expect("a channel");
    broker.suspend_queue(&q, "st_pool_stale", false);
    assert_ne!(
        next.id(),
        stale,
        "a channel with a confirm pending is not lent"
    );
}

//! Recovery without a process restart: broker-closed connections and deleted queues.

use framework::lapin::BasicProperties;
use framework::lapin::options::QueueDeleteOptions;
use framework::testing::relay::Relay;
use framework::testing::*;
use framework::{MessageContext, Outcome};

fn echo() -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v))
}

#[tokio::test]
async fn survives_the_broker_closing_its_connection() {
    let name = unique("conn");
    let mut hs = Harness::start(
        "closed",
        &[
            ("amqp.connection_name", &name),
            ("amqp.reconnect_initial_ms", "1000"),
        ],
        echo(),
    )
    .await;
    let mut out = hs.watch_output().await;
    hs.publish("test.before", br#"{"n":0}"#, BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"n":0}"#);

    let mut sessions = hs.status.sessions();
    assert_eq!(
        close_connection_named(&name).await,
        1,
        "found the service's connection"
    );
    // Not ready while disconnected (the first reconnect waits 1 s).
    let status = hs.status.clone();
    wait_until("readiness to drop", || !status.is_ready()).await;
    // Published while the service is down: must not be lost.
    hs.publish("test.during", br#"{"n":1}"#, BasicProperties::default())
        .await;
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("reconnected without a restart")
        .unwrap();
    assert!(hs.status.is_ready());
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
    hs.publish("test.after", br#"{"n":2}"#, BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"n":2}"#);
    hs.stop().await;
}

#[tokio::test]
async fn survives_its_queue_being_deleted() {
    let mut hs = Harness::start("deleted", &[], echo()).await;
    let mut out = hs.watch_output().await;
    let mut sessions = hs.status.sessions();
    hs.ch
        .queue_delete(hs.q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the service's queue");
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("the consumer cancel was noticed and the queue re-declared")
        .unwrap();
    assert!(ready_count(&hs.ch, &hs.q).await == 0, "queue exists again");
    hs.publish(
        "test.again",
        br#"{"back":true}"#,
        BasicProperties::default(),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"back":true}"#);
    hs.stop().await;
}

/// Handlers running now, and the most that ever ran at once, per message body.
#[derive(Default)]
struct Concurrency {
    now: std::sync::atomic::AtomicUsize,
    max: std::sync::atomic::AtomicUsize,
    calls: std::sync::atomic::AtomicUsize,
}

struct Busy(std::sync::Arc<Concurrency>);

impl Busy {
    fn enter(c: &std::sync::Arc<Concurrency>) -> Busy {
        use std::sync::atomic::Ordering::SeqCst;
        let n = c.now.fetch_add(1, SeqCst) + 1;
        c.max.fetch_max(n, SeqCst);
        c.calls.fetch_add(1, SeqCst);
        Busy(c.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The first delivery blocks until its session ends; the redelivery succeeds.
struct BlockFirst(std::sync::Arc<Concurrency>);

#[framework::async_trait]
impl framework::MessageProcessor for BlockFirst {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let _busy = Busy::enter(&self.0);
        if !ctx.redelivered {
            // Long work that only notices the end of its session (a copy, a backoff).
            ctx.cancelled().await;
            return Outcome::retry("interrupted");
        }
        Outcome::success(v)
    }
}

/// A harness with one message in a handler that `processor` keeps busy: its connection
/// named (returned, for closing it), prefetch 1, then `extra`.
async fn one_busy_handler<P: framework::MessageProcessor>(
    service: &str,
    extra: &[(&str, &str)],
    processor: impl FnOnce(std::sync::Arc<Concurrency>) -> P,
) -> (Harness, String, std::sync::Arc<Concurrency>) {
    let name = unique("conn");
    let seen = std::sync::Arc::new(Concurrency::default());
    let mut opts = vec![
        ("amqp.connection_name", name.as_str()),
        ("amqp.prefetch", "1"),
    ];
    opts.extend_from_slice(extra);
    let hs = Harness::start(service, &opts, processor(seen.clone())).await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let s = seen.clone();
    wait_until("the handler to be busy", || {
        s.now.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    (hs, name, seen)
}

#[tokio::test]
async fn a_lost_connection_shows_at_once_and_its_handlers_never_run_beside_the_redelivery() {
    let (mut hs, name, seen) =
        one_busy_handler("busy", &[("amqp.reconnect_initial_ms", "100")], BlockFirst).await;
    let mut out = hs.watch_output().await;
    let mut sessions = hs.status.sessions();
    assert_eq!(close_connection_named(&name).await, 1);
    // The only permit is busy, yet readiness follows the connection.
    let status = hs.status.clone();
    wait_until("readiness to drop", || !status.is_ready()).await;
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("reconnected")
        .expect("status alive");
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
    assert_eq!(
        seen.max.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the old session's handler ended before the message was redelivered"
    );
    hs.stop().await;
}

/// Never finishes on its own and ignores cancellation; records when it started and when
/// it is dropped.
struct Stuck(
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
);

struct SetOnDrop(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[framework::async_trait]
impl framework::MessageProcessor for Stuck {
    type Input = serde_json::Value;
    async fn handle(&self, _v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        let _mark = SetOnDrop(self.0.clone());
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        std::future::pending::<()>().await;
        Outcome::drop("unreachable")
    }
}

#[tokio::test]
async fn shutdown_stops_a_handler_that_outlives_the_drain_budget() {
    let recorder = framework::telemetry::metrics_handle();
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hs = Harness::start(
        "stuck",
        &[("amqp.drain_timeout_ms", "500")],
        Stuck(dropped.clone(), started.clone()),
    )
    .await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let q = hs.q.clone();
    let s = started.clone();
    wait_until("the handler to start", || {
        s.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    hs.stop().await;
    assert!(
        dropped.load(std::sync::atomic::Ordering::SeqCst),
        "the handler was stopped when the runtime returned"
    );
    // Its message was not acked: it is back in the queue.
    await_ready_count(&hs.ch, &q, 1).await;
    // And counted as handed back unfinished.
    let interrupted =
        format!("storagetier_messages_total{{queue=\"{q}\",outcome=\"interrupted\"}} 1");
    let text = recorder.render();
    assert!(
        text.lines().any(|l| l == interrupted),
        "{interrupted} in {text}"
    );
}

/// A stop while the network to the broker has stopped answering keeps to the drain
/// budget and a moment: the cancel waited out the whole operation limit before the drain
/// even started, then each close did (a 5 s drain took 95 s, past any orchestrator's
/// grace period). Nothing is lost: what was held goes back once the connection is gone.
#[tokio::test]
async fn a_stop_on_a_network_that_stopped_answering_keeps_to_its_budget() {
    let relay = Relay::start().await;
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut hs = Harness::start(
        "stalled",
        &[
            ("amqp.url", &relay.url),
            ("amqp.drain_timeout_ms", "1000"),
            ("amqp.operation_timeout_ms", "60000"),
        ],
        Stuck(dropped.clone(), started.clone()),
    )
    .await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let s = started.clone();
    wait_until("the handler to start", || {
        s.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    relay.freeze();
    // The bound is half the operation limit: any one wait for a frame that cannot come
    // passes it.
    tokio::time::timeout(std::time::Duration::from_secs(30), hs.stop())
        .await
        .expect("stopped within the drain budget and a moment, not the operation limit");
    let q = hs.q.clone();
    drop(relay);
    await_ready_count(&hs.ch, &q, 1).await;
}

/// The first delivery never ends and never notices its session ending (work that cannot:
/// a blocking copy); the redelivery succeeds.
struct DeafFirst(std::sync::Arc<Concurrency>);

#[framework::async_trait]
impl framework::MessageProcessor for DeafFirst {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let _busy = Busy::enter(&self.0);
        if !ctx.redelivered {
            std::future::pending::<()>().await;
        }
        Outcome::success(v)
    }
}

/// With the connection gone, the broker has already requeued what the session's handlers
/// held: they are stopped at once, not after the drain budget (here 5 minutes), during
/// which the redelivery would wait — or run beside them on another instance.
#[tokio::test]
async fn a_lost_connection_stops_its_handlers_at_once_even_deaf_ones() {
    let (mut hs, name, seen) = one_busy_handler(
        "deaf",
        &[
            ("amqp.reconnect_initial_ms", "100"),
            ("amqp.drain_timeout_ms", "300000"),
        ],
        DeafFirst,
    )
    .await;
    let mut out = hs.watch_output().await;
    assert_eq!(close_connection_named(&name).await, 1);
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
    assert_eq!(
        seen.max.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the lost session's handler was stopped before the redelivery ran"
    );
    hs.stop().await;
}

/// A connection lost while a stop drains its handlers ends the drain too: the broker has
/// requeued what they hold, so a handler that ran on for the rest of a 5-minute budget
/// would run beside its redelivery on another instance.
#[tokio::test]
async fn a_connection_lost_during_the_drain_stops_the_handlers_at_once() {
    let (mut hs, name, seen) = one_busy_handler(
        "deaf-drain",
        &[("amqp.drain_timeout_ms", "300000")],
        DeafFirst,
    )
    .await;
    hs.request_stop();
    let status = hs.status.clone();
    wait_until("the drain to start", move || !status.is_ready()).await;
    assert_eq!(close_connection_named(&name).await, 1);
    // Within WAIT, not the 5-minute drain budget.
    hs.stop().await;
    assert_eq!(seen.now.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Waits for its gate to open, counting handlers that started.
struct Gated(
    tokio::sync::watch::Receiver<bool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

#[framework::async_trait]
impl framework::MessageProcessor for Gated {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.0.clone();
        let _ = open.wait_for(|o| *o).await;
        Outcome::success(v)
    }
}

/// With `concurrency` below `prefetch`, the broker is asked for no more deliveries than
/// there are handlers: none waits in the client behind a long handler (against the
/// consumer timeout, while another instance could have taken it).
#[tokio::test]
async fn no_delivery_waits_without_a_handler() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut hs = Harness::start(
        "conc",
        &[("amqp.prefetch", "8"), ("amqp.concurrency", "1")],
        Gated(gate, started.clone()),
    )
    .await;
    let mut out = hs.watch_output().await;
    for n in 0..3 {
        let body = format!("{{\"n\":{n}}}");
        hs.publish("test.x", body.as_bytes(), BasicProperties::default())
            .await;
    }
    let s = started.clone();
    wait_until("the first handler to start", || {
        s.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    // The other two are still in the queue, for whoever can take them.
    await_ready_count(&hs.ch, &hs.q, 2).await;
    open.send(true).expect("gate open");
    for _ in 0..3 {
        next(&mut out).await;
    }
    hs.stop().await;
}

/// The broker cancelling the consumer (its queue deleted; on RabbitMQ 4.3 also a consumer
/// timeout) is noticed while every handler is busy, not when one finishes: readiness
/// drops and the queue is declared again by the next session meanwhile. The handlers are
/// stopped at once, not drained: what they hold is no longer the session's (4.3 hands it
/// to another consumer), so finishing it would run it twice at once.
#[tokio::test]
async fn a_cancelled_consumer_is_noticed_while_every_handler_is_busy() {
    let (_open, gate) = tokio::sync::watch::channel(false);
    let started = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut hs = Harness::start(
        "cancelbusy",
        &[
            ("amqp.prefetch", "1"),
            // Far beyond WAIT: only stopping the handler at once lets the next session come.
            ("amqp.drain_timeout_ms", "600000"),
            ("amqp.reconnect_initial_ms", "100"),
        ],
        Gated(gate, started.clone()),
    )
    .await;
    hs.publish("test.x", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let s = started.clone();
    wait_until("the only handler to be busy", || {
        s.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let mut sessions = hs.status.sessions();
    hs.ch
        .queue_delete(hs.q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the service's queue");
    // The gate never opens: only noticing the cancel can end this session.
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("the cancel was noticed with the handler still busy")
        .expect("status alive");
    assert_eq!(ready_count(&hs.ch, &hs.q).await, 0, "queue declared again");
    hs.stop().await;
}

/// Holds `{"hold":..}` until the gate opens; anything else asks for a retry.
struct HoldOrRetry(
    tokio::sync::watch::Receiver<bool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
);

#[framework::async_trait]
impl framework::MessageProcessor for HoldOrRetry {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        if v.get("hold").is_none() {
            return Outcome::retry("again");
        }
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut open = self.0.clone();
        let _ = open.wait_for(|o| *o).await;
        Outcome::success(v)
    }
}

/// A session that ends with its connection still up (here: a retry found its tier queue
/// gone) cancels its consumer before it drains: while a long handler finishes, the broker
/// pushes nothing more into the freed prefetch slots, where it would sit unread until the
/// channel closes and come back with its delivery count raised.
#[tokio::test]
async fn a_session_ending_with_its_connection_up_takes_nothing_new_while_it_drains() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let held = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut hs = Harness::start(
        "drainstop",
        &[
            ("amqp.prefetch", "4"),
            ("amqp.drain_timeout_ms", "120000"),
            ("amqp.reconnect_initial_ms", "100"),
        ],
        HoldOrRetry(gate, held.clone()),
    )
    .await;
    hs.publish("test.hold", br#"{"hold":1}"#, BasicProperties::default())
        .await;
    let h = held.clone();
    wait_until("the long handler to start", || {
        h.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    // Its first retry tier gone, a retry is unroutable: the session ends to declare it again.
    let tier = hs.topology().retry_queue(hs.delays[0]);
    hs.ch
        .queue_delete(tier.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete a retry tier");
    hs.publish("test.retry", br#"{"n":1}"#, BasicProperties::default())
        .await;
    let status = hs.status.clone();
    wait_until("the session to end", || !status.is_ready()).await;
    // The long handler still runs (the gate is shut). The retried message, given back,
    // waits in the queue for the next session: a consumer still active would have it
    // pushed into the slot its nack freed, to sit unread in the draining session.
    await_ready_count(&hs.ch, &hs.q, 1).await;
    assert_eq!(held.load(std::sync::atomic::Ordering::SeqCst), 1);
    let mut sessions = hs.status.sessions();
    open.send(true).expect("gate open");
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("the next session started once the handler finished")
        .expect("status alive");
    hs.stop().await;
}

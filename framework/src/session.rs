//! One consuming session: consume with bounded concurrency, hand each delivery to the
//! processor (cancellable when the session ends), publish its outcome with confirms, then
//! settle it; readiness follows the session's connection.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::fields::{MAX_JSON_VALUES, json_values};
use tracing::{Instrument, debug, error, error_span, info, warn};

use crate::channel_pool::ChannelPool;
use crate::config::AmqpConfig;
use crate::connection::{bounded, connect};
use crate::headers as h;
use crate::processor::{MessageContext, MessageProcessor, Outcome};
use crate::publisher::{Outgoing, PublishError, Publisher};
use crate::runtime::Inner;
use crate::settler::{Settler, Settling};
use crate::telemetry as m;
use crate::topology::{DeclareError, Topology};

/// How long a message whose outcome could not be published waits before going back, at
/// its first delivery; doubled at each redelivery the broker counts, up to
/// [`PUBLISH_FAILURE_BACKOFF_MAX`].
const PUBLISH_FAILURE_BACKOFF: Duration = Duration::from_secs(1);

/// The longest such wait.
const PUBLISH_FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// How long a message none of whose outcomes could be published (its retry tier full, a
/// quorum queue electing a leader) is held before it goes back. Each give-back counts
/// toward `Q`'s delivery limit (20 by default), and at one a second the broker
/// dead-lettered the message after 20 s of a fault that lasts minutes; doubling from 1 s
/// with the broker's count of earlier deliveries (`x-delivery-count`, quorum queues), the
/// limit is reached after about a quarter of an hour instead. A classic queue counts no
/// deliveries and has no limit: there the message's own retries (`x-retry-count`) tell how
/// long it has failed — one at its last attempt whose dead letter the broker refuses (a
/// `Q-dlq` held at a maximum length) comes back once a minute, not once a second, its
/// handler run again each time until the dead-letter queue takes it.
fn publish_failure_backoff(headers: &FieldTable) -> Duration {
    let count = |key: &str| h::get_int(headers, key).unwrap_or(0).clamp(0, 16);
    let earlier = count("x-delivery-count").max(count(h::RETRY_COUNT));
    PUBLISH_FAILURE_BACKOFF
        .saturating_mul(1 << earlier)
        .min(PUBLISH_FAILURE_BACKOFF_MAX)
}

/// How long a message whose outcome could not be published may still be held before it
/// goes back, `elapsed` after its delivery: until a tenth of the consumer timeout (at most
/// 5 s) before it, after which the broker takes it back itself.
fn pause_left(consumer_timeout: Duration, elapsed: Duration) -> Duration {
    consumer_timeout
        .saturating_sub((consumer_timeout / 10).min(Duration::from_secs(5)))
        .saturating_sub(elapsed)
}

/// How long a message whose retry the broker refuses is held at most, publishing its retry
/// again, before it goes back to the queue.
fn publish_hold_limit() -> Duration {
    Duration::from_secs(5 * 60)
}

/// How long after its delivery a message may still be held while its retry is refused:
/// two thirds of the consumer timeout (see [`Inner::consumer_timeout`]), so the hold never
/// costs the channel.
fn hold_until(consumer_timeout: Duration) -> Duration {
    consumer_timeout * 2 / 3
}

/// How long the confirm of an outcome labelled `label` may take for a message delivered
/// at `started`: the operation bound, but for a retry or a dead letter as long as the
/// message may be held (see [`hold_until`]). One given up on may land all the same (a
/// quorum tier electing a leader) while its input goes back to the queue: the message
/// would then live twice — two copies handled at once, two retry chains, two outputs.
fn confirm_limit<P>(inner: &Inner<P>, label: &str, started: Instant) -> Duration {
    let bound = inner.amqp.operation_timeout();
    if label == "retry" || label == "dead_letter" {
        hold_until(inner.consumer_timeout())
            .saturating_sub(started.elapsed())
            .max(bound)
    } else {
        bound
    }
}

/// Whether a failed publish is a refusal, after which nothing landed: a nack, or a channel
/// the broker closed over it (a permission, a channel limit). A confirm that never came is
/// not: the message may have landed, and publishing it again would make two.
fn refused(e: &PublishError) -> bool {
    match e {
        PublishError::Nacked(_) => true,
        // Not the broker's refusal where the connection went with it (the session ends,
        // and the message is delivered again to the next): a socket that failed under a
        // half-written publish, before the connection's state said so, may have carried
        // it whole, and a retry published again would make two.
        PublishError::Amqp(_) => !e.lost_with_connection(),
        _ => false,
    }
}

/// Room a retry or dead letter needs in its frame beyond the input's headers: the
/// framework's own headers (errors of up to 1 KiB each, original names, trace), the
/// properties, and the `x-death` entries the broker adds on the way through the tiers.
const HEADER_HEADROOM: usize = 16 * 1024;
const _: () = assert!(HEADER_HEADROOM >= 4 * h::DEAD_LETTERING_ROOM);

/// The most header bytes an input may carry to be handled: with more, its retry or dead
/// letter would not fit in one frame of `frame_max`.
fn input_header_budget(frame_max: usize) -> usize {
    frame_max.saturating_sub(HEADER_HEADROOM).max(frame_max / 2)
}

/// The handlers of one consuming session: told when the session ends (`cancel`, seen by
/// processors through [`MessageContext::cancelled`]) and stopped at their next await point
/// if still running after the drain budget (`kill`), so no handler outlives its session
/// while the broker redelivers its message to the next one.
struct SessionTasks {
    tasks: TaskTracker,
    cancel: CancellationToken,
    kill: CancellationToken,
    /// Stops the handlers `kill` left running: those awaiting the confirm of what they
    /// published ([`Confirming`]).
    force: CancellationToken,
    /// How many such confirms its handlers await.
    confirming: Arc<AtomicUsize>,
    /// How many of its handlers only wait ([`MessageContext::waiting`]).
    waiting: Arc<AtomicUsize>,
    /// When `kill` comes, once the session is ending ([`MessageContext::time_left`]).
    stops_at: Arc<std::sync::OnceLock<Instant>>,
}

impl SessionTasks {
    fn new() -> Self {
        Self {
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            kill: CancellationToken::new(),
            force: CancellationToken::new(),
            confirming: Arc::default(),
            waiting: Arc::default(),
            stops_at: Arc::default(),
        }
    }

    /// A new handler's [`Confirming`].
    fn confirming(&self) -> Confirming {
        Confirming {
            on: AtomicUsize::new(0),
            done: tokio::sync::Notify::new(),
            session: self.confirming.clone(),
            waiting: self.waiting.clone(),
        }
    }

    /// Signals the handlers, waits up to `budget` for them, then stops the rest; stops
    /// them at once when `lost` completes (the connection went during the drain: the broker
    /// has requeued what they hold, and another instance may be running it already).
    /// `at_once`: why there is no budget, where there is none (the connection is gone,
    /// the consumer cancelled), for the log.
    ///
    /// A handler awaiting the confirm of an outcome or a publish of its own when the budget
    /// runs out gets up to `confirm_grace` more, unless the connection is gone or blocked:
    /// stopped, its input goes back to the queue while what it published may land all the
    /// same (a quorum tier electing a leader confirms late) — the message would then live
    /// twice, or its outputs go out twice.
    async fn end(
        &self,
        budget: Duration,
        confirm_grace: Duration,
        alarm: &crate::alarm::Alarm,
        lost: impl std::future::Future<Output = ()>,
        at_once: &'static str,
    ) {
        let _ = self.stops_at.set(Instant::now() + budget);
        self.cancel.cancel();
        self.tasks.close();
        tokio::pin!(lost);
        let (why, gone) = if budget.is_zero() {
            (at_once, true)
        } else {
            tokio::select! {
                r = tokio::time::timeout(budget, self.tasks.wait()) => match r {
                    Ok(()) => return,
                    Err(_) => ("drain timeout reached", false),
                },
                () = &mut lost => ("the connection dropped while draining", true),
            }
        };
        if self.tasks.is_empty() {
            return;
        }
        let confirming = self.confirming.load(Ordering::SeqCst);
        // Not only while some confirm is awaited at this instant: a handler woken by the
        // stop may start its outcome's publish in that same turn (its frames queued before
        // the stop is seen), and cut off then, its retry landed beside its requeued input.
        // Handlers awaiting nothing stop at once all the same (`Confirming::idle`).
        let graced = !gone && !alarm.blocked() && !confirm_grace.is_zero();
        warn!(
            still_running = self.tasks.len(),
            awaiting_a_confirm = confirming,
            "{why}; stopping unfinished handlers, their messages return to the queue{}",
            if graced && confirming > 0 {
                format!(
                    " — those awaiting the confirm of what they published are given up to {} \
                     ms more",
                    confirm_grace.as_millis()
                )
            } else {
                String::new()
            }
        );
        if !graced {
            self.force.cancel();
        }
        self.kill.cancel();
        if graced {
            tokio::select! {
                () = self.tasks.wait() => return,
                () = tokio::time::sleep(confirm_grace) => {
                    warn!(still_running = self.tasks.len(), "the confirms did not come in time; stopping those handlers");
                }
                () = &mut lost => {}
            }
            self.force.cancel();
        }
        self.tasks.wait().await;
    }
}

/// The outcome of a handler past its deadline ([`crate::runtime::Inner::handler_deadline`]):
/// stopped, and its message retried (counted) — or given back where the processor keeps
/// its place (ordered mode). Stopped while it awaits the confirm of something it published
/// (a part's dead letter, a routed id), that may land all the same while its progress mark
/// is never made, and the retry does it twice: such a handler is polled on until no
/// confirm is awaited (at most `grace`), as a drain does (see [`SessionTasks::end`]).
async fn past_deadline(
    mut handling: impl std::future::Future<Output = Outcome> + Unpin,
    confirming: &Confirming,
    ctx: &MessageContext,
    started: Instant,
    grace: Duration,
) -> Outcome {
    let stopped = async {
        tokio::select! {
            () = confirming.idle() => {}
            () = tokio::time::sleep(grace) => {}
        }
    };
    tokio::select! {
        biased;
        outcome = &mut handling => return outcome,
        () = stopped => {}
    }
    let why = format!(
        "the handler ran {} s without an outcome, up to just under the queue's consumer \
         timeout ([amqp] consumer_timeout_ms), after which the broker takes the message back: \
         stopped",
        started.elapsed().as_secs()
    );
    warn!("{why}");
    if ctx.keeps_place() {
        Outcome::Interrupted(format!("{why}, and given back in its place"))
    } else {
        Outcome::Retry(format!("{why}, and retried"))
    }
}

/// Whether a handler awaits the confirm of what it published (its outcome, a part's dead
/// letter, a publish of the processor's own): such a handler is not stopped with the
/// others when the drain budget runs out (see [`SessionTasks::end`]). Stopped, its input
/// went back to the queue while what it published landed all the same.
#[derive(Debug)]
pub(crate) struct Confirming {
    /// How many such confirms the handler awaits (parts may be dead-lettered at once).
    on: AtomicUsize,
    /// Told when `on` falls to 0.
    done: tokio::sync::Notify,
    /// The session's count of confirms awaited.
    session: Arc<AtomicUsize>,
    /// The session's count of handlers only waiting ([`Confirming::waiting`]).
    waiting: Arc<AtomicUsize>,
}

impl Confirming {
    /// Runs `publish` (an outcome's, a part's dead letter, a processor's own), marked as
    /// awaiting its confirm. A success's too: cut off, its message landed while the input
    /// went back to be handled, and announced, again.
    pub(crate) async fn awaiting<T>(&self, publish: impl std::future::Future<Output = T>) -> T {
        /// Clears the mark however the publish ends (done, or dropped with its handler).
        struct Clear<'a>(&'a Confirming);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.session.fetch_sub(1, Ordering::SeqCst);
                if self.0.on.fetch_sub(1, Ordering::SeqCst) == 1 {
                    self.0.done.notify_waiters();
                }
            }
        }
        self.on.fetch_add(1, Ordering::SeqCst);
        self.session.fetch_add(1, Ordering::SeqCst);
        let _clear = Clear(self);
        publish.await
    }

    /// Runs `wait`, a wait of the handler's own, counted as the session's handler not at
    /// work (see [`MessageContext::waiting`]).
    pub(crate) async fn waiting<T>(&self, wait: impl std::future::Future<Output = T>) -> T {
        /// Clears the count however the wait ends (done, or dropped with its handler).
        struct Clear<'a>(&'a AtomicUsize);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _clear = Clear(&self.waiting);
        wait.await
    }

    /// Completes once no confirm is awaited.
    async fn idle(&self) {
        loop {
            // Registered before the look, so a clearing in between is not missed.
            let cleared = self.done.notified();
            if self.on.load(Ordering::SeqCst) == 0 {
                return;
            }
            cleared.await;
        }
    }
}

/// Why a session ended.
pub(crate) enum SessionEnd {
    /// Shutdown was asked for.
    Shutdown,
    /// The connection or channel was lost (why).
    Lost(String),
    /// The broker cancelled the consumer (why): what the session held is no longer its
    /// own (its queue deleted; on RabbitMQ 4.3 a consumer timeout returns the deliveries
    /// to the queue for another consumer and leaves the channel open).
    Released(String),
}

/// The outcome of a handler that panicked: a bug, which the same input meets again, is
/// permanent; a process out of threads (tokio's and std's spawn panics, under a container's
/// pid limit or `ulimit -u`) is not the input's fault, and a later attempt finds threads.
fn panicked(message: &str) -> Outcome {
    const OUT_OF_THREADS: [&str; 2] = ["OS can't spawn worker thread", "failed to spawn thread"];
    if OUT_OF_THREADS.iter().any(|p| message.starts_with(p)) {
        Outcome::Retry(format!("the process is out of threads: {message}"))
    } else {
        Outcome::Permanent(format!("processor panicked: {message}"))
    }
}

/// How long a session's last frames (acks, closes) are waited for while the broker blocks
/// its connection: none can be written then.
const WAIT_WHILE_BLOCKED: Duration = Duration::from_secs(1);

/// Time for a session's last frames (the cancel, the last acks, the closes) beyond the
/// drain budget: however the network behaves, a stop takes at most about
/// `drain_timeout_ms` and this.
const LAST_FRAMES: Duration = Duration::from_secs(2);

/// The least any of those frames is given, even past the deadline.
const LAST_FRAME_MIN: Duration = Duration::from_millis(200);

/// `step`'s result, or None if a stop comes first: connecting to a node that accepts and
/// never answers, or a declaration a stalled network holds, would otherwise hold a SIGTERM
/// for the whole connect or operation timeout (for every node of `urls` in turn).
async fn unless_stopped<T>(
    shutdown: &CancellationToken,
    step: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        r = step => Some(r),
    }
}

/// One consuming session: connect, declare, consume until shutdown or a loss, then end
/// the session's handlers before returning.
pub(crate) async fn session<P: MessageProcessor>(
    inner: &Arc<Inner<P>>,
    shutdown: &CancellationToken,
) -> Result<SessionEnd, DeclareError> {
    let limit = inner.amqp.operation_timeout();
    let Some(conn) = unless_stopped(shutdown, connect(&inner.amqp, &inner.service)).await else {
        return Ok(SessionEnd::Shutdown);
    };
    let conn = Arc::new(conn.map_err(DeclareError::Connect)?);
    let pool = ChannelPool::new(
        conn.clone(),
        limit,
        Some(m::connection_blocked(&inner.topology.queue)),
    );
    if pool.capacity() < inner.amqp.effective_concurrency() {
        warn!(
            queue = %inner.topology.queue,
            channel_max = conn.configuration().channel_max(),
            publishing_channels = pool.capacity(),
            handlers = inner.amqp.effective_concurrency(),
            "the broker allows fewer channels on a connection (its channel_max) than this \
             service has handlers: outcomes that need a channel of their own (retries, dead \
             letters, mandatory publishes) wait for one to come free; raise the broker's \
             channel_max, or lower [amqp] concurrency / prefetch"
        );
    }
    let publisher = Publisher::new(
        pool,
        &inner.service,
        &inner.topology.queue,
        &inner.topology.fail_exchange(),
        &inner.topology.output_exchange,
    );
    let metrics = inner.metrics.clone();
    let Some(declared) = unless_stopped(
        shutdown,
        bounded_declare(&inner.topology, &conn, limit, false),
    )
    .await
    else {
        return Ok(SessionEnd::Shutdown);
    };
    inner.declared(declared?);
    // No more unacked deliveries than handlers that can take them (design §5: prefetch =
    // in-flight handlers): with `concurrency` below `prefetch`, deliveries held without a
    // handler would wait out the broker's consumer timeout behind long handlers, and be
    // kept from other instances meanwhile.
    let qos = u16::try_from(inner.amqp.effective_concurrency()).unwrap_or(inner.amqp.prefetch);
    let tag = format!("{}-{}", inner.service, uuid::Uuid::new_v4());
    // Consuming and settling only: every publish goes through the pool.
    let Some(consuming) = unless_stopped(shutdown, start_consuming(&conn, inner, qos, &tag)).await
    else {
        return Ok(SessionEnd::Shutdown);
    };
    let (ch, mut consumer) = consuming?;
    let settling = Settling::start(ch.clone(), metrics.clone());
    let broken = CancellationToken::new();
    let shared = Arc::new(Shared {
        conn: conn.clone(),
        inner: inner.clone(),
        publisher,
        metrics,
        settler: settling.settler(),
        broken: broken.clone(),
    });
    info!(queue = %inner.topology.queue, url = %inner.amqp.endpoints_shown(), "consuming");
    inner.status.attach(Some(conn.clone()));
    inner.status.set_ready(true);
    let handlers = SessionTasks::new();
    // Cancelled by the watcher when `Q` has had no leader this node reaches for
    // `CUT_OFF_AFTER`: only with other nodes to move to.
    let cut_off = CancellationToken::new();
    // A node that still delivers is not cut off, however slowly its queue's leader
    // answers the watcher; nor can one be told while every handler is busy.
    let activity = Arc::new(Activity::default());
    if inner.amqp.queue_metrics_interval_ms > 0 {
        tokio::spawn(watch_queue_depths(
            conn.clone(),
            inner.topology.clone(),
            Duration::from_millis(inner.amqp.queue_metrics_interval_ms),
            limit,
            handlers.cancel.clone(),
            (inner.amqp.endpoints().len() > 1).then(|| Watched {
                cut_off: cut_off.clone(),
                activity: activity.clone(),
                confirming: handlers.confirming.clone(),
                waiting: handlers.waiting.clone(),
                handlers: inner.amqp.effective_concurrency(),
            }),
        ));
    }
    if inner.amqp.rebind_interval_ms > 0 {
        tokio::spawn(keep_bound(
            conn.clone(),
            inner.topology.source_bindings(),
            Duration::from_millis(inner.amqp.rebind_interval_ms),
            limit,
            handlers.cancel.clone(),
        ));
    }
    let topology_lost = || {
        SessionEnd::Lost(
            "topology incomplete (an exchange gone, or a retry or dead letter unroutable)".into(),
        )
    };
    let moved = || {
        SessionEnd::Lost(format!(
            "the queue has had no leader this node reaches for {}s, and nothing was delivered \
             meanwhile: the node is most likely cut off from its cluster's majority (a \
             network partition); moving to another node",
            CUT_OFF_AFTER.as_secs()
        ))
    };
    let alive = || conn.status().connected() && ch.status().connected();
    // Notices a dead connection while every handler is busy and nothing is consumed.
    let mut health = tokio::time::interval(HEALTH_CHECK);

    // A delivery read before a handler was free (see below).
    let mut early: Option<Delivery> = None;
    let end = loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break SessionEnd::Shutdown,
            _ = broken.cancelled() => break topology_lost(),
            _ = cut_off.cancelled() => break moved(),
            _ = health.tick() => {
                if alive() { continue } else { break SessionEnd::Lost("the connection dropped".into()) }
            }
            // While every handler is busy the broker sends nothing more (qos), but it can
            // cancel the consumer (its queue deleted; RabbitMQ 4.3's consumer timeout):
            // noticed now, not when a handler finishes. A delivery that comes meanwhile
            // (an ack just left) waits for the next free handler. With a handler free,
            // the permit comes first, as it always did (no extra turn per message).
            n = consumer.next(), if early.is_none() && inner.permits.available_permits() == 0 => match n {
                Some(Ok(d)) => {
                    early = Some(d);
                    continue;
                }
                other => break consumer_ended(other),
            },
            p = inner.permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break SessionEnd::Shutdown,
            },
        };
        let next = match early.take() {
            Some(d) => Some(Ok(d)),
            None => tokio::select! {
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                _ = broken.cancelled() => break topology_lost(),
                _ = cut_off.cancelled() => break moved(),
                n = consumer.next() => n,
            },
        };
        match next {
            Some(Ok(delivery)) => {
                settling.delivered(delivery.delivery_tag);
                let busy = Busy::enter(&activity);
                // Taken here, in delivery order, not in the handler: handlers start in any
                // order (tokio runs the last spawned first), and one taking its own time
                // put a later update of a project before an earlier one.
                let received_at = crate::processor::receipt_stamp();
                let shared = shared.clone();
                let cancel = handlers.cancel.clone();
                let stops_at = handlers.stops_at.clone();
                let (kill, force) = (handlers.kill.clone(), handlers.force.clone());
                let confirming = Arc::new(handlers.confirming());
                let metrics = shared.metrics.clone();
                let (tag, settler) = (delivery.delivery_tag, shared.settler.clone());
                // The handler's state machine (several KiB) lives on the heap from the start,
                // not in the spawned future, which tokio moves more than once while spawning.
                let fut = async move {
                    let marked = confirming.clone();
                    let handling = Box::pin(async move {
                        shared
                            .handle_delivery(delivery, received_at, cancel, stops_at, &marked)
                            .await
                    });
                    // A handler awaiting the confirm of what it published is stopped
                    // only once that is over or by `force`.
                    let stopped = async {
                        kill.cancelled().await;
                        tokio::select! {
                            () = confirming.idle() => {}
                            () = force.cancelled() => {}
                        }
                    };
                    tokio::select! {
                        // The handler first: once its confirm came, it acks in the same
                        // turn; that ack is not lost to a stop seen at the same time.
                        biased;
                        _ = handling => {}
                        // Stopped unsettled: the broker requeues it with the channel —
                        // which stays open while another handler is given time for its
                        // confirm (`force` not yet come): given back now instead, so another
                        // instance can take it meanwhile (once the broker answered the
                        // consumer's cancel: see `Settling::ending`).
                        () = stopped => {
                            if !force.is_cancelled() {
                                settler.give_back(tag);
                            } else {
                                metrics.count("interrupted");
                            }
                        }
                    }
                    drop(permit);
                    drop(busy);
                };
                handlers.tasks.spawn(fut);
            }
            other => break consumer_ended(other),
        }
    };
    inner.status.set_ready(false);
    inner.status.attach(None);
    // With the connection gone the broker has already requeued what the handlers hold, and
    // another session or instance may be running it: stop them now instead of letting them
    // run beside it for the drain budget (their acks could never land anyway).
    // So too on a node cut off from its cluster: their acks could not land (no leader
    // here), and the majority gives what they hold to other consumers once it notices
    // the node gone (its `net_ticktime`).
    let budget = match &end {
        SessionEnd::Lost(_) if !alive() || cut_off.is_cancelled() => Duration::ZERO,
        // Acks on a cancelled consumer's deliveries are ignored, and another consumer may
        // already run them.
        SessionEnd::Released(_) => Duration::ZERO,
        _ => Duration::from_millis(inner.amqp.drain_timeout_ms),
    };
    let (code, reason) = match &end {
        SessionEnd::Shutdown => {
            info!(queue = %inner.topology.queue, in_flight = handlers.tasks.len(), "shutting down: cancelling consumer and draining");
            (200, "shutdown")
        }
        SessionEnd::Lost(_) | SessionEnd::Released(_) => (320, "recovering"),
    };
    // Whatever ended the session, no new delivery is taken while the handlers drain: each
    // ack frees a prefetch slot, and a delivery the broker pushed into it would sit unread
    // until the channel closes, then be requeued with its delivery count raised (quorum
    // queues dead-letter at their limit) and delayed by the longest handler. Except on a
    // queue with a single active consumer (ordered handling): cancelling makes the broker
    // hand the queue to a standby at once, which would take the next message while this
    // session still holds the one before it. There the consumer stays until the channel
    // closes, and what it holds then goes back ahead of the rest. While the broker blocks
    // the connection (a resource alarm) lapin writes no frame: the cancel, the last acks and
    // the closes would each wait out their whole limit, and a SIGTERM's drain would outlast
    // any orchestrator's grace period. They are given a moment instead; what stays unacked
    // the broker requeues as the connection goes.
    // One deadline for all of it: the drain budget and a moment for the last frames. On a
    // network that stopped answering, the cancel, the last acks and each close used to wait
    // out the whole operation limit in turn: a SIGTERM with a 5 s drain took 95 s.
    // Moved on where handlers awaiting a confirm were given more time (see
    // `SessionTasks::end`): their acks are among the last frames.
    let ends_by = std::sync::Mutex::new(tokio::time::Instant::now() + budget + LAST_FRAMES);
    let deadline = || *ends_by.lock().unwrap_or_else(|p| p.into_inner());
    let alarm = shared.publisher.alarm().clone();
    let wait = || {
        let left = deadline()
            .saturating_duration_since(tokio::time::Instant::now())
            .max(LAST_FRAME_MIN);
        left.min(if alarm.blocked() {
            WAIT_WHILE_BLOCKED
        } else {
            limit
        })
    };
    let cancel = async {
        if ch.status().connected() && !inner.topology.single_active_consumer && !alarm.blocked() {
            match bounded(
                wait(),
                "basic.cancel",
                ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
            )
            .await
            {
                Ok(()) => settling.released(),
                Err(e) => debug!(error = %e, "basic.cancel failed"),
            }
        }
    };
    // The broker redelivers what these handlers hold to the next session (or the next
    // instance): they finish or stop before that, never running beside their redelivery.
    // The cancel goes out at once beside the drain, not before its budget starts.
    let lost = async {
        let mut check = tokio::time::interval(HEALTH_CHECK);
        while alive() {
            check.tick().await;
        }
    };
    let at_once = match &end {
        SessionEnd::Released(_) => "the broker cancelled the consumer",
        SessionEnd::Lost(_) if !alive() => "the connection to the broker was lost",
        SessionEnd::Lost(_) if cut_off.is_cancelled() => {
            "the broker node is cut off from its cluster"
        }
        _ => "drain timeout reached",
    };
    // Before the handlers are told: what they give back is held until the broker
    // answered the cancel (see `Settling::ending`).
    settling.ending();
    if let SessionEnd::Released(_) = &end {
        settling.released();
    }
    tokio::join!(cancel, handlers.end(budget, limit, &alarm, lost, at_once));
    let later = deadline().max(tokio::time::Instant::now() + LAST_FRAMES);
    *ends_by.lock().unwrap_or_else(|p| p.into_inner()) = later;
    // The handlers' settler is dropped with the last of them; this one goes now, or the
    // settling task would wait for it.
    drop(shared);
    settling.finish(wait()).await;
    if let SessionEnd::Shutdown = end {
        let _ = bounded(wait(), "closing the channel", ch.close(code, reason.into())).await;
    }
    let _ = bounded(
        wait(),
        "closing the connection",
        conn.close(code, reason.into()),
    )
    .await;
    Ok(end)
}

/// Sets `storagetier_queue_messages` for each of the service's queues every `every` until
/// `stop`, with passive declares on a channel of its own (a failed one closes only that
/// channel). A queue found gone is declared again at once: the retry tiers and `Q-dlq`
/// have no consumer, so a policy's `expires` (or an operator's delete) takes them, with
/// the retries and dead letters in them, without the session noticing; the next retry or
/// dead letter would find no queue. Where `Q` has had no leader this node reaches for
/// [`CUT_OFF_AFTER`] ([`look`]), `cut_off` (given where there are other nodes to go to) is
/// cancelled, ending the session.
async fn watch_queue_depths(
    conn: Arc<Connection>,
    topology: Topology,
    every: Duration,
    limit: Duration,
    stop: CancellationToken,
    cut_off: Option<Watched>,
) {
    let queues = topology.queue_names();
    let mut tick = tokio::time::interval(every);
    // A slow look is followed by the next at its interval, not by a burst of them.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ch: Option<Channel> = None;
    // The queues whose depth could not be read at the last look (warned about once).
    let mut unread: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut leaderless = Leaderless::default();
    let mut taken_before = 0;
    // Looks in a row (of those that read it) at which `Q` showed more than one consumer.
    let mut shared: u32 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        // A look still under way when the session ends is dropped: finishing on a dying
        // connection, it could land after the next session's first read.
        let looked = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            l = look(&conn, &topology, &queues, limit, &stop, &mut ch, &mut unread) => l,
        };
        if let (Some(why), Some(consumers)) = (&topology.one_consumer_advised, looked.consumers) {
            // Lasting, not a moment's: a rolling update's overlap, or the consumer of this
            // replica's last session the broker has not yet seen gone (its heartbeat, a
            // cut-off node's `net_ticktime`), is not a second replica.
            shared = if consumers > 1 {
                shared.saturating_add(1)
            } else {
                0
            };
            if shared == SHARED_LOOKS {
                warn!(queue = %topology.queue, consumers, "{why}");
            }
        }
        // RabbitMQ answers a look with no leader also where the leader is only slow (a
        // quarter second): a session still taking deliveries is not taken for cut off,
        // nor one whose handlers are all at work (it takes none then, cut off or not). A
        // handler awaiting a confirm is not at work: on a node cut off, none comes. Nor is
        // one only waiting (an ordered event-forwarder's backoff between tries in place,
        // an outage waited out): counted at work, a cut-off replica kept its one event —
        // posting it beside the replica the majority gave it to — until the wait ended,
        // up to ten minutes.
        let (taken, idle) = cut_off.as_ref().map_or((0, false), |w| {
            let running = w
                .activity
                .running
                .load(std::sync::atomic::Ordering::Relaxed);
            let confirming = w.confirming.load(std::sync::atomic::Ordering::SeqCst);
            let waiting = w.waiting.load(std::sync::atomic::Ordering::SeqCst);
            (
                w.activity.taken.load(std::sync::atomic::Ordering::Relaxed),
                running.saturating_sub(confirming).saturating_sub(waiting) < w.handlers,
            )
        });
        let delivering = std::mem::replace(&mut taken_before, taken) != taken;
        if leaderless.seen(
            looked.no_leader && !delivering && idle,
            std::time::Instant::now(),
        ) && let Some(Watched { cut_off, .. }) = &cut_off
        {
            error!(queue = %topology.queue, after_s = CUT_OFF_AFTER.as_secs(),
                "the queue has no leader this broker node reaches (it shows no consumer while \
                 this service consumes it, or does not answer) and nothing was delivered \
                 meanwhile: the node is most likely cut off from the cluster's majority, \
                 where its messages go to other consumers; ending the session to connect to \
                 another node");
            cut_off.cancel();
            break;
        }
    }
    // Nothing reads these depths until the next session's watcher does (its first read
    // sets them back to 0): the gauges keep the last depth read, which a disconnected
    // replica would otherwise serve as current to the alerts (`max by` a stale `Q-dlq`).
    for q in &queues {
        metrics::gauge!(m::QUEUE_DEPTH_UNREADABLE, "queue" => q.clone()).set(1.0);
    }
}

/// Looks over which `Q` shows more than one consumer before a service that advises one
/// ([`crate::Binding::one_consumer_advised`]) warns: two minutes at the default interval.
const SHARED_LOOKS: u32 = 8;

/// What the queue watcher is given to end a session on a node cut off (several nodes in
/// `[amqp] urls`).
struct Watched {
    /// Cancelled to end the session.
    cut_off: CancellationToken,
    /// The session's deliveries and handlers.
    activity: Arc<Activity>,
    /// The session's confirms awaited ([`SessionTasks`]).
    confirming: Arc<AtomicUsize>,
    /// The session's handlers only waiting ([`SessionTasks`]).
    waiting: Arc<AtomicUsize>,
    /// `[amqp]`'s effective concurrency.
    handlers: usize,
}

/// What the queue watcher reads of its session to tell a node cut off from a slow leader.
#[derive(Debug, Default)]
struct Activity {
    /// Deliveries taken.
    taken: std::sync::atomic::AtomicU64,
    /// Handlers running.
    running: std::sync::atomic::AtomicUsize,
}

/// A handler running, counted in its session's [`Activity`] while it lives.
struct Busy(Arc<Activity>);

impl Busy {
    fn enter(a: &Arc<Activity>) -> Busy {
        a.taken.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        a.running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long `Q` may show no leader through this node before the session moves to another:
/// a leader election (a node restarting) takes seconds; a node cut off from its cluster's
/// majority by a network partition stays so until the split is mended, and RabbitMQ 4.3
/// (Khepri) keeps its clients connected meanwhile, idle.
pub(crate) const CUT_OFF_AFTER: Duration = Duration::from_secs(30);

/// Looks in a row at which `Q` showed no leader: the node is taken for cut off once they
/// span [`CUT_OFF_AFTER`], over at least [`Leaderless::LOOKS`] looks.
#[derive(Debug, Default)]
struct Leaderless {
    /// The first look of the run, and how many since.
    run: Option<(std::time::Instant, u32)>,
}

impl Leaderless {
    /// One look is never enough, however slow: a look that ran into its time limit while
    /// the leader moved.
    const LOOKS: u32 = 3;

    /// Records a look at `at` (`no_leader`: what it found); true once the node is taken
    /// for cut off.
    fn seen(&mut self, no_leader: bool, at: std::time::Instant) -> bool {
        if !no_leader {
            self.run = None;
            return false;
        }
        let (since, looks) = self.run.get_or_insert((at, 0));
        *looks += 1;
        *looks >= Self::LOOKS && at.duration_since(*since) >= CUT_OFF_AFTER
    }
}

/// What one look of [`watch_queue_depths`] found about `Q`.
#[derive(Debug, Default)]
struct Looked {
    /// `Q` showed no leader this node reaches (no consumer while this session consumes
    /// it, or no answer in time). Where the node cut off led `Q`, `Q` reads there as it
    /// was, and nothing shows.
    no_leader: bool,
    /// `Q`'s consumers, where it was read.
    consumers: Option<u32>,
}

/// One look of [`watch_queue_depths`] at each of `queues`.
async fn look(
    conn: &Connection,
    topology: &Topology,
    queues: &[String],
    limit: Duration,
    stop: &CancellationToken,
    ch: &mut Option<Channel>,
    unread: &mut std::collections::HashSet<String>,
) -> Looked {
    let mut gone = Vec::new();
    let mut no_leader = false;
    let mut consumers = None;
    for q in queues {
        let Some(c) = open_channel(ch, conn, limit).await else {
            break;
        };
        let unreadable = metrics::gauge!(m::QUEUE_DEPTH_UNREADABLE, "queue" => q.clone());
        let why = match tokio::time::timeout(limit, crate::dlq::depth(c, q)).await {
            // `Q` is consumed by this very session: no consumer on it means a quorum
            // queue without a leader, whose passive check answers 0 for whatever it
            // holds.
            Ok(Ok((0, 0))) if *q == topology.queue && !stop.is_cancelled() => {
                no_leader = true;
                "the queue shows no consumer while this service consumes it (a quorum \
                 queue without a leader answers 0 messages for what it holds)"
                    .to_string()
            }
            Ok(Ok((n, c))) => {
                if *q == topology.queue {
                    consumers = Some(c);
                }
                metrics::gauge!(m::QUEUE_MESSAGES, "queue" => q.clone()).set(f64::from(n));
                unreadable.set(0.0);
                if unread.remove(q) {
                    info!(queue = %q, "the queue's depth can be read again");
                }
                continue;
            }
            // Only "no queue 'q' in vhost 'v'" says the queue is gone: RabbitMQ answers
            // NOT_FOUND too for a classic queue whose home node is down (3.x) or a queue
            // whose process is stopped, where the messages wait and declaring it again
            // would report them lost.
            Ok(Err(e))
                if crate::topology::is_soft(&e, lapin::protocol::AMQPSoftError::NOTFOUND)
                    && e.to_string().contains("no queue") =>
            {
                metrics::gauge!(m::QUEUE_MESSAGES, "queue" => q.clone()).set(0.0);
                gone.push(q.as_str());
                continue;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => {
                // The broker handles a channel's calls in turn: the next look on this
                // one would wait behind the unanswered one.
                *ch = None;
                no_leader |= *q == topology.queue && !stop.is_cancelled();
                format!("no answer in {limit:?}")
            }
        };
        // The last depth read stays (a backlog alert does not lose its history over
        // one bad look); that it is old says this gauge.
        unreadable.set(1.0);
        if unread.insert(q.clone()) {
            warn!(queue = %q, error = %m::LogText(&why),
                "cannot read the queue's depth; storagetier_queue_depth_unreadable is 1 until it can");
        }
    }
    if !gone.is_empty() {
        error!(queues = ?gone,
            "the service's queues are gone, and the messages that were in them (deleted by \
             hand, or by a policy's `expires`: keep such policies off the service's queues); \
             declaring them again");
        let why = match tokio::time::timeout(limit, topology.declare(conn)).await {
            Ok(Ok(_)) => {
                return Looked {
                    no_leader,
                    consumers,
                };
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("timed out after {limit:?}"),
        };
        warn!(error = %m::LogText(&why), "could not declare the gone queues again; the next look tries again");
    }
    Looked {
        no_leader,
        consumers,
    }
}

/// `ch` while it is open, else a new channel of `conn` in its place (None if none opens): a
/// watcher's own channel, which a failed passive check or bind closes.
async fn open_channel<'a>(
    ch: &'a mut Option<Channel>,
    conn: &Connection,
    limit: Duration,
) -> Option<&'a Channel> {
    if ch.as_ref().is_none_or(|c| !c.status().connected()) {
        *ch = bounded(limit, "opening a channel", conn.create_channel())
            .await
            .ok();
    }
    ch.as_ref()
}

/// Binds the input queue to its producers' exchanges again every `every` until `stop`: a
/// producer's exchange deleted and declared anew while the session runs has lost the
/// queue's bindings, and every message published to it would reach nothing until the next
/// reconnect (days, maybe). A missing exchange is logged once, until it is back.
async fn keep_bound(
    conn: Arc<Connection>,
    bindings: Vec<crate::topology::BindingSpec>,
    every: Duration,
    limit: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    // The session has just bound them.
    tick.tick().await;
    let mut ch: Option<Channel> = None;
    let mut gone: Vec<String> = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for b in &bindings {
            let Some(c) = open_channel(&mut ch, &conn, limit).await else {
                break;
            };
            let bound = bounded(
                limit,
                "queue.bind",
                c.queue_bind(
                    b.queue.as_str().into(),
                    b.exchange.as_str().into(),
                    b.routing_key.as_str().into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await;
            let was_gone = gone.iter().position(|e| *e == b.exchange);
            match (bound, was_gone) {
                (Ok(()), Some(i)) => {
                    gone.swap_remove(i);
                    info!(exchange = %m::LogText(&b.exchange), "a producer's exchange is back; the queue is bound to it again");
                }
                (Err(e), None)
                    if crate::topology::is_soft(&e, lapin::protocol::AMQPSoftError::NOTFOUND) =>
                {
                    warn!(exchange = %m::LogText(&b.exchange), queue = %m::LogText(&b.queue),
                        "a producer's exchange is gone: what it is sent reaches no queue of this service until it is declared again");
                    gone.push(b.exchange.clone());
                }
                (Err(e), _) => debug!(error = %e, "binding the queue again failed"),
                (Ok(()), None) => {}
            }
        }
        // A channel per round: lapin keeps every bind a channel made (for its recovery)
        // until the channel closes, and a session's channel bound every 30 s for months
        // grew without end.
        if let Some(c) = ch.take() {
            let _ = bounded(limit, "channel.close", c.close(200, "bound again".into())).await;
        }
    }
}

/// Opens the consuming channel with its `qos` and starts the consumer `tag` on the input
/// queue. RabbitMQ 4.3 takes the per-consumer timeout argument on quorum queues only and
/// refuses it elsewhere (406, closing the channel): the consumer is then started without it
/// on a fresh channel (the queue's own `x-consumer-timeout` covers what the broker reads),
/// instead of every start failing as a "topology conflict".
async fn start_consuming<P: MessageProcessor>(
    conn: &Connection,
    inner: &Inner<P>,
    qos: u16,
    tag: &str,
) -> Result<(Channel, lapin::Consumer), DeclareError> {
    let limit = inner.amqp.operation_timeout();
    let mut args = consumer_arguments(&inner.amqp);
    loop {
        let ch = bounded(limit, "opening a channel", conn.create_channel()).await?;
        bounded(
            limit,
            "basic.qos",
            ch.basic_qos(qos, BasicQosOptions::default()),
        )
        .await?;
        let consumed = bounded(
            limit,
            "basic.consume",
            ch.basic_consume(
                inner.topology.queue.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                args.clone(),
            ),
        )
        .await;
        match consumed {
            Ok(consumer) => return Ok((ch, consumer)),
            Err(e) if refuses_consumer_timeout(&e) && args.contains_key(CONSUMER_TIMEOUT) => {
                warn!(queue = %inner.topology.queue, error = %e,
                    "the broker refuses a per-consumer timeout on this queue type; consuming without it \
                     (the queue's x-consumer-timeout or the broker's consumer_timeout applies)");
                args = crate::headers::without(&args, &[CONSUMER_TIMEOUT]);
            }
            Err(e)
                if refuses_argument(&e, CANCEL_ON_FAILOVER)
                    && args.contains_key(CANCEL_ON_FAILOVER) =>
            {
                warn!(queue = %inner.topology.queue, error = %e,
                    "the broker refuses x-cancel-on-ha-failover; consuming without it");
                args = crate::headers::without(&args, &[CANCEL_ON_FAILOVER]);
            }
            Err(e) => return Err(DeclareError::Consume(e)),
        }
    }
}

/// The per-consumer acknowledgement timeout argument.
const CONSUMER_TIMEOUT: &str = "x-consumer-timeout";

/// The argument that has RabbitMQ 3.x cancel a classic mirrored queue's consumer when the
/// queue's leader fails over.
const CANCEL_ON_FAILOVER: &str = "x-cancel-on-ha-failover";

/// Whether `e` is the broker refusing the consumer's `x-consumer-timeout` argument.
fn refuses_consumer_timeout(e: &lapin::Error) -> bool {
    refuses_argument(e, CONSUMER_TIMEOUT)
}

/// Whether `e` is the broker refusing the consumer argument `name`.
fn refuses_argument(e: &lapin::Error, name: &str) -> bool {
    crate::topology::is_soft(e, lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
        && e.to_string().contains(name)
}

/// `basic.consume` arguments: the per-consumer acknowledgement timeout, so a handler longer
/// than the broker's default (30 min) is not cut off and redelivered while it still runs.
/// RabbitMQ 3.12 and 3.13 read it; 4.0 reads the queue's (see `Topology::queues`); 3.10
/// and 3.11 ignore both (their `consumer_timeout` in rabbitmq.conf must be raised instead).
///
/// On a classic queue, also `x-cancel-on-ha-failover`: where an `ha-mode` policy mirrors it
/// (RabbitMQ 3.x), a new leader after a failover requeues every unacknowledged message and
/// delivers them again, and a consumer not told so keeps handling its copies while
/// another takes them — one message handled twice at once. Told (`basic.cancel`), the
/// session ends and its handlers with it. Brokers without mirroring ignore it.
fn consumer_arguments(amqp: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if amqp.consumer_timeout_ms > 0 {
        args.insert(
            CONSUMER_TIMEOUT.into(),
            lapin::types::AMQPValue::LongLongInt(
                i64::try_from(amqp.consumer_timeout_ms).unwrap_or(i64::MAX),
            ),
        );
    }
    if amqp.queue_type == crate::config::QueueType::Classic {
        args.insert(
            CANCEL_ON_FAILOVER.into(),
            lapin::types::AMQPValue::Boolean(true),
        );
    }
    args
}

/// How often a session checks that its connection is still there.
const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// Declares the topology, failing (and so restarting the session) if the broker hangs;
/// `every_object` for the `declare` command, where an object this user may not declare is
/// an error rather than checked to exist (see [`Topology::declare_all`]).
pub(crate) async fn bounded_declare(
    topology: &Topology,
    conn: &Connection,
    limit: Duration,
    every_object: bool,
) -> Result<crate::topology::Declared, DeclareError> {
    let declared = async {
        if every_object {
            topology.declare_all(conn).await
        } else {
            topology.declare(conn).await
        }
    };
    tokio::time::timeout(limit, declared)
        .await
        .unwrap_or_else(|_| {
            Err(DeclareError::Amqp(
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("declaring the topology timed out after {limit:?}"),
                )
                .into(),
            ))
        })
}

/// How a session ends when its consumer stream yields `next`, not a delivery: an error
/// (the channel closed: the broker's consumer timeout is named) or its end (the broker
/// cancelled the consumer).
fn consumer_ended(next: Option<Result<Delivery, lapin::Error>>) -> SessionEnd {
    match next {
        Some(Err(e)) => {
            let why = e.to_string();
            if why.contains("delivery acknowledgement") {
                error!(error = %why, "the broker's consumer timeout closed the channel while a handler ran: \
                    raise [amqp] consumer_timeout_ms (RabbitMQ 3.12+; a queue declared before keeps its old value) \
                    or the broker's consumer_timeout / a consumer-timeout policy above the longest handler");
            }
            SessionEnd::Lost(why)
        }
        _ => SessionEnd::Released(
            "consumer cancelled by the broker (queue deleted, its consumer timeout, or a mirrored queue's failover)".into(),
        ),
    }
}

/// Metadata read off a delivery before processing.
struct Incoming {
    /// Through the default exchange to the service's queue: a retry or a replay.
    came_back: bool,
    attempt: u32,
    exchange: String,
    routing_key: String,
    headers: FieldTable,
}

/// A body at least this large is decoded and handled one at a time (per service): a
/// large JSON body takes many times its size once decoded, and a flood of them could take
/// the process's memory; real messages are far smaller.
pub(crate) const LARGE_BODY: usize = 256 * 1024;

fn incoming(d: &Delivery, queue: &str) -> Incoming {
    let mut headers = d.properties.headers().clone().unwrap_or_default();
    let producers_replay = headers.inner().contains_key(h::PRODUCERS_REPLAY);
    if producers_replay {
        headers = h::without(&headers, &[h::PRODUCERS_REPLAY]);
    }
    let via_default = d.exchange.as_str().is_empty() && d.routing_key.as_str() == queue;
    let came_back = via_default && !producers_replay;
    // The origin a replay wrote is the broker's record; on a producer's own delivery the
    // same header (and the marker) are the producer's.
    let keep_origin = via_default && producers_replay;
    if !came_back
        && (h::FRAMEWORK_COUNTS.iter())
            .chain([&h::BATCH_PART])
            .chain(h::ERROR_HEADERS)
            .any(|k| headers.inner().contains_key(*k))
    {
        // A producer's: with its own `x-retry-count: 49` the first retry was "retries
        // exhausted", its `x-original-*` named another origin, and its `x-batch-part`
        // (kept on the retries and dead letters made of the message) another part. A
        // replay of a producer's message keeps the origin the replay wrote (the broker's
        // record of where it was published), not one of the producer's. Its error
        // headers (a dead letter of another service shovelled back) rode on the retries,
        // and the broker's dead letter of one was listed with the producer's kind, error
        // and time — and picked or passed over by `replay --kind`/`--older-than` so.
        headers = h::without_where(&headers, |k| {
            k == h::BATCH_PART
                || h::ERROR_HEADERS.contains(&k)
                || (h::FRAMEWORK_COUNTS.contains(&k)
                    && !(keep_origin
                        && [h::ORIGINAL_EXCHANGE, h::ORIGINAL_ROUTING_KEY].contains(&k)))
        });
    }
    if came_back {
        // Back through the default exchange to `Q`: a retry from its tier or a replay, which
        // carry no dead letter's error headers (a retry writes only its last error, a
        // replay strips them) — or a publish to "" / a shovel of a dead letter, which may.
        // Not carried on: they are left out of the header budget as a retry's own, and one
        // near a frame made the retry come back over it (the connection closed at every
        // redelivery); a broker's dead letter of that retry was listed with their kind
        // and time. The counts go on as the numbers they read as, not as the text they
        // came in (`"000…0"` is 0, and as long as a frame).
        let dead_letters = [h::ERROR, h::ERROR_KIND, h::FAILED_AT, h::SERVICE];
        if dead_letters
            .iter()
            .any(|k| headers.inner().contains_key(*k))
        {
            headers = h::without(&headers, &dead_letters);
        }
        // A retry's last error, kept for its dead letter (which carries it as it is): no
        // longer than a retry writes one, or that dead letter, too large for a frame,
        // became one more retry — a permanent failure's work done again.
        match h::get_str(&headers, h::LAST_ERROR) {
            Some(last) if last.len() > h::MAX_ERROR_BYTES => {
                h::set_str(&mut headers, h::LAST_ERROR, &h::error_text(&last));
            }
            // Not text (an array, a table): no error a retry wrote.
            None if headers.inner().contains_key(h::LAST_ERROR) => {
                headers = h::without(&headers, &[h::LAST_ERROR]);
            }
            _ => {}
        }
        for k in [h::RETRY_COUNT, h::PROGRESS_ATTEMPTS, h::OUTAGE_SINCE] {
            if headers.inner().contains_key(k) {
                match h::get_int(&headers, k) {
                    Some(v) => h::set_int(&mut headers, k, v),
                    None => headers = h::without(&headers, &[k]),
                }
            }
        }
    }
    let attempt = h::get_int(&headers, h::RETRY_COUNT)
        .unwrap_or(0)
        .clamp(0, i64::from(u32::MAX)) as u32;
    // A name from a header is anyone's text: one AMQP cannot carry (a dead letter is
    // published with this routing key) falls back to the delivery's own.
    let name = |key: &str| h::get_str(&headers, key).filter(|s| s.len() <= h::MAX_NAME_BYTES);
    let exchange = name(h::ORIGINAL_EXCHANGE).unwrap_or_else(|| d.exchange.to_string());
    let routing_key = name(h::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| d.routing_key.to_string());
    Incoming {
        came_back,
        attempt,
        exchange,
        routing_key,
        headers,
    }
}

/// Whether a `content_encoding` names a compression (producers also put a charset there,
/// which says nothing about why a body is not JSON).
fn is_compression(encoding: &str) -> bool {
    [
        "gzip", "x-gzip", "deflate", "br", "zstd", "compress", "snappy", "lz4", "zlib",
    ]
    .iter()
    .any(|c| encoding.trim().eq_ignore_ascii_case(c))
}

/// Describes a body that failed to decode, naming what was wrong.
pub fn describe_decode_error(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match e.classify() {
        // Well-formed JSON, but deeper than serde_json parses (128 levels).
        Category::Syntax if e.to_string().contains("recursion limit exceeded") => {
            format!("body is nested too deeply (at most 128 levels): {e}")
        }
        Category::Data => format!("body does not match the expected input: {e}"),
        // Grammatical JSON serde_json will not read: an escape of half a UTF-16 pair.
        Category::Syntax if e.to_string().contains("surrogate") => format!(
            "body is not valid JSON: {e} (an escaped `\\udc80`–`\\udcff` alone is how Python's \
             json writes a name that is not UTF-8; text must be Unicode)"
        ),
        Category::Syntax | Category::Eof | Category::Io => format!("body is not valid JSON: {e}"),
    }
}

/// What every handler of one session shares (one clone per message, not one per piece).
struct Shared<P: MessageProcessor> {
    /// The session's connection (to check the topology when a publish finds it broken).
    conn: Arc<Connection>,
    inner: Arc<Inner<P>>,
    publisher: Publisher,
    metrics: Arc<m::QueueMetrics>,
    settler: Settler,
    /// Cancelled when an outcome found the service's own topology incomplete: the session
    /// ends and the next one declares it again.
    broken: CancellationToken,
}

impl<P: MessageProcessor> Shared<P> {
    /// Publishes the retry of `delivery` again, after a growing pause, while the broker
    /// refuses it for a state of its own (a full retry tier, a refused permission, a channel
    /// limit: a nack or a closed channel, where nothing landed) — for at most
    /// [`publish_hold_limit`] from now and two thirds of the broker's consumer timeout from
    /// `started`, while the session runs, and by at most a quarter of the handlers at once
    /// (the others keep working). Given back at once instead, the message ran its processor
    /// again from the start: what the attempt did and marked in its retry's headers (ids
    /// published, events posted) was done twice, once a second on a classic queue, for as
    /// long as the refusal lasted. True once the retry is confirmed.
    async fn hold_retry(
        &self,
        delivery: &Delivery,
        ctx: &MessageContext,
        reason: &str,
        started: Instant,
        confirming: &Confirming,
    ) -> bool {
        let inner = &*self.inner;
        let Ok(_holding) = inner.held_retries.try_acquire() else {
            return false;
        };
        let until = (Instant::now() + publish_hold_limit())
            .min(started + hold_until(inner.consumer_timeout()));
        // Each try may wait for its confirm as long as the operation bound: counted in.
        if Instant::now() + PUBLISH_FAILURE_BACKOFF + inner.amqp.operation_timeout() > until {
            return false;
        }
        warn!("the broker refuses the retry; holding the message and publishing its retry again");
        let (label, msgs) = inner.planner.plan(
            &self.publisher,
            &delivery.data,
            ctx,
            Outcome::Retry(reason.to_string()),
        );
        // Planned again later, an outage's budget may have run out meanwhile: that is a
        // dead letter, not the retry this holds for.
        if label != "retry" {
            return false;
        }
        let mut wait = PUBLISH_FAILURE_BACKOFF;
        while Instant::now() + wait + inner.amqp.operation_timeout() <= until {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = ctx.cancel.cancelled() => return false,
            }
            match self
                .publish_outcome(msgs.clone(), label, started, confirming)
                .await
            {
                Ok(()) => {
                    info!("the retry the broker refused is published now");
                    return true;
                }
                Err(e) => {
                    if self.topology_incomplete(&e).await {
                        self.broken.cancel();
                        return false;
                    }
                    if !refused(&e) || !self.conn.status().connected() {
                        return false;
                    }
                    debug!(error = %m::LogText(&e.to_string()), "the retry is still refused");
                }
            }
            wait = (wait * 2).min(PUBLISH_FAILURE_BACKOFF_MAX);
        }
        false
    }

    /// Publishes the messages of an outcome labelled `label` of a message delivered at
    /// `started`, waiting for their confirms as long as [`confirm_limit`] allows; each
    /// failure counted (`storagetier_publish_failures_total`), a replacement's or a held
    /// retry's too.
    async fn publish_outcome(
        &self,
        msgs: Vec<Outgoing>,
        label: &str,
        started: Instant,
        confirming: &Confirming,
    ) -> Result<(), PublishError> {
        let limit = confirm_limit(&self.inner, label, started);
        let sent = confirming
            .awaiting(self.publisher.send_within(msgs, limit))
            .await;
        if let Err(e) = &sent
            && self.publisher.failure_counts(e)
        {
            self.metrics.publish_failures().increment(1);
        }
        sent
    }

    /// Whether a failed publish means the service's own topology is incomplete, which a
    /// new session re-declares: a retry or dead letter that reached no queue, or a publish
    /// to an exchange of its own that is gone (404 closes the channel; the output exchange
    /// deleted while it ran would fail every outcome until the next reconnect).
    async fn topology_incomplete(&self, e: &PublishError) -> bool {
        let inner = &*self.inner;
        match e {
            PublishError::Unroutable(ex, _) => {
                *ex == inner.topology.retry_exchange() || *ex == inner.topology.fail_exchange()
            }
            PublishError::Amqp(err)
                if crate::topology::is_soft(err, lapin::protocol::AMQPSoftError::NOTFOUND) =>
            {
                let missing = bounded(
                    inner.amqp.operation_timeout(),
                    "checking the topology",
                    async {
                        Ok::<_, lapin::Error>(inner.topology.missing_exchange(&self.conn).await)
                    },
                )
                .await
                .unwrap_or(None);
                match &missing {
                    Some(ex)
                        if *ex != inner.topology.retry_exchange()
                            && *ex != inner.topology.fail_exchange() =>
                    {
                        // Its bindings were the consumers' of this service's outputs, not
                        // the service's: declared again, it routes to nothing.
                        error!(
                            exchange = %ex,
                            "an output exchange of this service is gone; declaring it again — the \
                             queues that were bound to it (the consumers of this service's \
                             outputs) must be bound again: until they are, every output \
                             published to it reaches no queue"
                        );
                    }
                    Some(ex) => {
                        warn!(exchange = %ex, "an exchange of the service's own topology is gone; declaring it again");
                    }
                    None => {}
                }
                missing.is_some()
            }
            _ => false,
        }
    }

    async fn handle_delivery(
        &self,
        mut delivery: Delivery,
        received_at: std::time::SystemTime,
        cancel: CancellationToken,
        stops_at: Arc<std::sync::OnceLock<Instant>>,
        confirming: &Arc<Confirming>,
    ) {
        let (inner, publisher, metrics) = (&*self.inner, &self.publisher, &*self.metrics);
        let mut inc = incoming(&delivery, &inner.topology.queue);
        let declared_progress = inner.processor.progress_headers();
        if !inc.came_back
            && (declared_progress.iter()).any(|k| inc.headers.inner().contains_key(*k))
        {
            inc.headers = h::without(&inc.headers, declared_progress);
        }
        let trace = crate::trace::TraceContext::continue_from(&inc.headers);
        // An input whose headers leave no room for a retry's or dead letter's in one frame
        // is dead-lettered at once, without them (publishing it with them would make the
        // broker close the connection, every handler's with it, on every redelivery). The
        // headers a retry writes afresh (its counts, the broker's `x-death`) do not count:
        // with them a message just within the budget was refused on its first retry.
        let header_bytes = h::carried_len(&inc.headers);
        let budget = input_header_budget(publisher.frame_max());
        let oversized = (header_bytes > budget).then(|| {
            inc.headers = lapin::types::FieldTable::default();
            format!(
                "the message's headers take {header_bytes} bytes, more than the {budget} that \
                 leave room in one frame ({} bytes) for a retry's or dead letter's own; \
                 dead-lettered without them",
                publisher.frame_max()
            )
        });
        // Moved, not copied: the context is the only holder of the delivery's properties.
        let properties = std::mem::take(&mut delivery.properties);
        // A blank id is no id: taken as one, every such input's `x-in-response-to` read ""
        // and its outputs on one routing key shared one derived id, so consumers dropping
        // duplicates by id dropped real messages.
        let message_id = properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str())
            .filter(|s| !s.trim().is_empty())
            .map(str::to_string);
        // At the most severe level, so it exists whatever `[log] level` lets through: at
        // `info` it was filtered out under `warn`, and every warning and error about a
        // message (dead-lettering, a panic, a failed publish) lost which message it was.
        let span = error_span!("message",
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        queue = %inner.topology.queue,
        routing_key = %m::LogText(&inc.routing_key),
        message_id = %m::LogText(message_id.as_deref().unwrap_or("")),
        attempt = inc.attempt);
        async move {
            let _in_flight = InFlight::enter(metrics.in_flight());
            let started = Instant::now();
            let started_at = std::time::SystemTime::now();
            let ctx = MessageContext {
                exchange: inc.exchange,
                routing_key: inc.routing_key,
                attempt: inc.attempt,
                redelivered: delivery.redelivered,
                content_id: (message_id.is_none() && inner.processor.knows_inputs_by_body())
                    .then(|| crate::publisher::content_id(&delivery.data)),
                message_id,
                correlation_id: properties.correlation_id().as_ref().map(|s| s.to_string()),
                timestamp: *properties.timestamp(),
                headers: inc.headers,
                retry_notes: Default::default(),
                progress_headers: Default::default(),
                declared_progress: Some(declared_progress),
                cancel,
                stops_at,
                trace,
                publisher: Some(publisher.clone()),
                confirming: Some(confirming.clone()),
                publish_failures: metrics.publish_failures().clone(),
                properties,
                max_records: inner.amqp.max_records,
                held_until: Some(started + hold_until(inner.consumer_timeout())),
                checkpoint_at: Some(
                    started + crate::config::checkpoint_within(inner.consumer_timeout()),
                ),
                received_at: Some(received_at),
                came_back: inc.came_back,
                when_done: Default::default(),
            };
            // Decoding runs inside catch_unwind too: a panicking Deserialize is the input's fault.
            let handled = AssertUnwindSafe(async {
                if let Some(why) = inner.processor.ignores(&ctx) {
                    return Outcome::Drop(why);
                }
                if let Some(why) = oversized {
                    return Outcome::Permanent(why);
                }
                let max = inner.amqp.max_body_bytes;
                if max > 0 && delivery.data.len() as u64 > max {
                    return Outcome::Permanent(format!(
                        "the body is {} bytes, more than [amqp] max_body_bytes ({max}): \
                         dead-lettered unread",
                        delivery.data.len()
                    ));
                }
                // Only a large body can hold that many (a value takes two bytes at least).
                if delivery.data.len() >= LARGE_BODY {
                    let values = json_values(&delivery.data);
                    if values > MAX_JSON_VALUES {
                        return Outcome::Permanent(format!(
                            "the body holds about {values} JSON values, more than the \
                             {MAX_JSON_VALUES} a message may (decoded, each takes 32 bytes \
                             or more): dead-lettered unread"
                        ));
                    }
                }
                // Decoded, JSON can take 10–30 times its text (a 16 MiB array of small
                // numbers, 256 MiB as values): one large body at a time, so prefetch-many
                // of them cannot take gigabytes at once.
                let _large = if delivery.data.len() >= LARGE_BODY {
                    tokio::select! {
                        p = inner.large_bodies.acquire() => p.ok(),
                        _ = ctx.cancelled() => {
                            return Outcome::Interrupted(
                                "the session ended while a large body waited its turn".into(),
                            );
                        }
                    }
                } else {
                    None
                };
                // A byte-order mark before the JSON (Windows tools write one): RFC 8259 lets
                // a reader ignore it, and nothing else in the body is wrong.
                let body = delivery
                    .data
                    .strip_prefix(b"\xEF\xBB\xBF")
                    .unwrap_or(&delivery.data);
                match serde_json::from_slice::<P::Input>(body) {
                    Err(e) => Outcome::Permanent(match ctx.properties.content_encoding() {
                        // A typed input whose field has the wrong type or value: decoded
                        // again, only now, to name the field (`mtime`, `records[3].id`).
                        _ if e.classify() == serde_json::error::Category::Data => {
                            let at = serde_path_to_error::deserialize::<_, P::Input>(
                                &mut serde_json::Deserializer::from_slice(body),
                            )
                            .err()
                            .map(|p| p.path().to_string())
                            .filter(|p| p != ".")
                            // A huge key named in full would leave no room for the reason.
                            .map(|p| h::truncate(&p, 200).to_string());
                            match at {
                                Some(field) => format!(
                                    "body does not match the expected input: field `{}`: {e}",
                                    m::LogText(&field)
                                ),
                                None => describe_decode_error(&e),
                            }
                        }
                        // A compressed body (gzip) is not "invalid JSON": say what it is.
                        Some(enc) if is_compression(enc.as_str()) => format!(
                            "the body is `{}`-encoded (content_encoding), which is not read: \
                             send plain JSON ({})",
                            m::LogText(enc.as_str()),
                            describe_decode_error(&e)
                        ),
                        _ => describe_decode_error(&e),
                    }),
                    Ok(input) => match inner.handler_deadline() {
                        Some(limit) => {
                            let handling = inner.processor.handle(input, &ctx);
                            tokio::pin!(handling);
                            let left = limit.saturating_sub(started.elapsed());
                            match tokio::time::timeout(left, &mut handling).await {
                                Ok(outcome) => outcome,
                                Err(_) => {
                                    past_deadline(
                                        &mut handling,
                                        confirming,
                                        &ctx,
                                        started,
                                        inner.amqp.operation_timeout(),
                                    )
                                    .await
                                }
                            }
                        }
                        None => inner.processor.handle(input, &ctx).await,
                    },
                }
            })
            .catch_unwind()
            .await;
            let outcome = handled.unwrap_or_else(|p| panicked(&m::panic_message(&*p)));
            metrics
                .handler_seconds()
                .record(started.elapsed().as_secs_f64());
            let error = match &outcome {
                Outcome::Retry(r) | Outcome::Permanent(r) | Outcome::Exhausted(r)
                    if inner.spans.is_some() =>
                {
                    Some(h::truncate(r, h::MAX_ERROR_BYTES).to_string())
                }
                _ => None,
            };
            let label = self
                .settle(&delivery, &ctx, outcome, started, confirming)
                .await;
            if let Some(spans) = &inner.spans {
                spans.record(crate::otlp::Span {
                    trace: ctx.trace.clone(),
                    start: started_at,
                    // From the monotonic clock: a wall clock stepped back meanwhile (NTP)
                    // would end the span before it started.
                    end: started_at + started.elapsed(),
                    queue: inner.topology.queue.clone(),
                    routing_key: ctx.routing_key.clone(),
                    message_id: ctx.message_id.clone(),
                    attempt: ctx.attempt,
                    outcome: label,
                    error,
                });
            }
        }
        .instrument(span)
        .await
    }

    /// Publishes the outcome's messages with confirms, then hands the delivery to the settler
    /// to be acked (or given back); returns the outcome's label, which the settler counts once
    /// the ack is sent.
    async fn settle(
        &self,
        delivery: &Delivery,
        ctx: &MessageContext,
        outcome: Outcome,
        started: Instant,
        confirming: &Confirming,
    ) -> &'static str {
        let (inner, publisher, settler, broken) =
            (&*self.inner, &self.publisher, &self.settler, &self.broken);
        // A give-back is for a session that ends: while it runs, one would come straight
        // back (an endless loop on RabbitMQ 4.3, which no longer counts requeues toward
        // the delivery limit), so it is a retry, counted and bounded like any other —
        // unless the processor keeps the message's place through an outage it bounds.
        let outcome = match outcome {
            Outcome::Interrupted(reason) if !ctx.is_cancelled() && !ctx.keeps_place() => {
                warn!(
                    reason = %m::LogText(&reason),
                    "interrupted while its session runs: retried instead of given back"
                );
                Outcome::Retry(reason)
            }
            o => o,
        };
        if let Outcome::Interrupted(reason) = &outcome {
            info!(reason = %m::LogText(reason), "interrupted; the message goes back to the queue");
            settler.give_back(delivery.delivery_tag);
            return "interrupted";
        }
        let was_retry = matches!(outcome, Outcome::Retry(_));
        // Kept for the retry that replaces a dead letter the broker refused: its
        // `x-last-error` says why the message was to be dead-lettered, not only that the
        // dead letter could not be published.
        let dead_letter_reason = match &outcome {
            Outcome::Permanent(r) | Outcome::Exhausted(r) => Some(r.clone()),
            _ => None,
        };
        // Kept to publish the retry again if the broker refuses it (see `hold_retry`).
        let mut retry_reason = match &outcome {
            Outcome::Retry(r) => Some(r.clone()),
            _ => None,
        };
        let (mut label, msgs) = inner.planner.plan(publisher, &delivery.data, ctx, outcome);
        // The sizes of the first bodies, kept without an allocation per message: a refusal
        // for its size must name one of this outcome's (see `body_too_large`).
        let mut sizes = [usize::MAX; 4];
        for (s, m) in sizes.iter_mut().zip(&msgs) {
            *s = m.body.len();
        }
        let mut published = self.publish_outcome(msgs, label, started, confirming).await;
        // Whether that failure showed the topology incomplete (looked at once per error).
        let mut incomplete = false;
        if let Err(e) = &published {
            error!(error = %m::LogText(&e.to_string()), outcome = label, "could not publish the outcome");
            incomplete = self.topology_incomplete(e).await;
            if incomplete {
                broken.cancel();
            }
            let replacement = if e.body_too_large(&sizes) && label != "dead_letter" {
                // A success message (or extra) over the broker's max_message_size: the
                // next attempt would build the same one, so the input is dead-lettered
                // now, saying why, instead of being retried max_attempts times.
                Some(Outcome::Permanent(format!(
                    "the {label} outcome is larger than the broker accepts ({e}); \
                     retrying would build it again"
                )))
            } else if !was_retry {
                // An outcome that cannot be published (an unroutable or missing
                // destination) becomes a retry: it counts toward max_attempts and ends in
                // the DLQ, instead of looping through requeues that RabbitMQ 4.3 no longer
                // counts.
                let reason = match &dead_letter_reason {
                    Some(r) => format!("{r} (its dead letter could not be published: {e})"),
                    None => format!("could not publish the {label} outcome: {e}"),
                };
                retry_reason = Some(reason.clone());
                Some(Outcome::Retry(reason))
            } else {
                None
            };
            if let Some(o) = replacement {
                let (l, msgs) = inner.planner.plan(publisher, &delivery.data, ctx, o);
                label = l;
                published = self.publish_outcome(msgs, label, started, confirming).await;
                incomplete = match &published {
                    Err(e) => self.topology_incomplete(e).await,
                    Ok(()) => false,
                };
            }
        }
        if let Err(e @ PublishError::TooLarge { .. }) = &published {
            // Headers the processor added (progress marks, say) left no room: no retry of
            // this message can ever be published, so it is dead-lettered without them.
            let why = format!("could not publish the {label} outcome: {e}");
            label = "dead_letter";
            let msgs = inner
                .planner
                .bare_dead_letter(publisher, &delivery.data, ctx, &why);
            published = self.publish_outcome(msgs, label, started, confirming).await;
            incomplete = match &published {
                Err(e) => self.topology_incomplete(e).await,
                Ok(()) => false,
            };
        }
        match published {
            // Counted once the ack has left (the settler sends it).
            Ok(()) => settler.ack_counting(delivery.delivery_tag, label, ctx.when_done(label)),
            Err(e) if e.body_too_large(&[delivery.data.len()]) => {
                // The input itself is larger than the broker now takes (its
                // max_message_size lowered since the message was queued): no retry or dead
                // letter of it can ever be published. The broker dead-letters it instead,
                // as it came, through `Q`'s own dead-letter exchange (`Q-fail`): it reaches
                // `Q-dlq` with `x-death`, not this framework's headers.
                error!(error = %m::LogText(&e.to_string()), "the message is larger than the broker now accepts; \
                    the broker dead-letters it as it came");
                settler.reject(delivery.delivery_tag);
                label = "dead_letter";
                for (counter, n) in ctx.when_done(label) {
                    counter.increment(n);
                }
            }
            Err(e) => {
                // Not even our own retry tier took it. Our topology gone: re-declare it in a
                // new session. Anything else — a nack or a confirm that never came (a full
                // queue, a resource alarm), a refusal that closed the publishing channel
                // (a permission, a channel limit) — is the broker's state, which a new
                // session would not change (it would only hand the message straight back,
                // skipping the pause, and say "topology incomplete"): the message goes back
                // after a pause, as a failed delivery (`basic.reject`, which RabbitMQ 4.3
                // still counts toward a quorum queue's delivery limit where it no longer
                // counts a `nack`): a message none of whose outcomes can ever be published
                // ends dead-lettered by the broker at the limit instead of looping.
                if incomplete {
                    broken.cancel();
                } else if label == "retry"
                    && refused(&e)
                    // Not a refusal where the connection is gone (a pending confirm fails
                    // with its I/O error): the session ends, and the next gets the message.
                    && self.conn.status().connected()
                    && let Some(reason) = &retry_reason
                    && self.hold_retry(delivery, ctx, reason, started, confirming).await
                {
                    settler.ack(delivery.delivery_tag, label);
                    return label;
                }
                error!(
                    error = %m::LogText(&e.to_string()),
                    hint = crate::connection::refusal_hint(&e),
                    outcome = label,
                    "could not publish the outcome (its {}); the input goes back to the queue",
                    label.replace('_', " ")
                );
                // A stop or a lost connection does not wait for it: the message goes back
                // either way. Nor is it held into the consumer timeout (a handler stopped at
                // its deadline, whose retry failed): the broker would take it back itself,
                // with the channel's other deliveries (RabbitMQ 4.3: uncounted, for ever).
                // The timeout the broker may apply (RabbitMQ 3.10/3.11: their own 30 min).
                let pause = publish_failure_backoff(&ctx.headers)
                    .min(pause_left(inner.consumer_timeout(), started.elapsed()));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ctx.cancel.cancelled() => {}
                }
                settler.give_back_failed(delivery.delivery_tag);
            }
        }
        label
    }
}

/// Counts a handler in `storagetier_in_flight` until dropped, however the handler ends.
struct InFlight<'a>(&'a metrics::Gauge);

impl<'a> InFlight<'a> {
    fn enter(g: &'a metrics::Gauge) -> Self {
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Refused is what the broker refused with the connection up; a failure that went
    /// with the connection (its socket, a missed heartbeat) is not: the publish may have
    /// landed.
    #[test]
    fn a_publish_lost_with_its_connection_is_no_refusal() {
        let io = |k: std::io::ErrorKind| PublishError::Amqp(std::io::Error::new(k, "x").into());
        assert!(!refused(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(!refused(&io(std::io::ErrorKind::BrokenPipe)));
        assert!(!refused(&PublishError::Amqp(
            lapin::ErrorKind::MissingHeartbeatError.into()
        )));
        // This framework's own bound on a channel's opening: nothing was sent.
        assert!(refused(&io(std::io::ErrorKind::TimedOut)));
        assert!(refused(&PublishError::Nacked("x".into())));
        assert!(!refused(&PublishError::Timeout("x".into())));
    }

    #[test]
    fn a_message_whose_outcomes_cannot_be_published_waits_longer_each_time() {
        let after = |n: Option<i64>| {
            let mut t = FieldTable::default();
            if let Some(n) = n {
                h::set_int(&mut t, "x-delivery-count", n);
            }
            publish_failure_backoff(&t)
        };
        assert_eq!(after(None), Duration::from_secs(1), "a first delivery");
        assert_eq!(after(Some(1)), Duration::from_secs(2));
        assert_eq!(after(Some(5)), Duration::from_secs(32));
        assert_eq!(after(Some(6)), Duration::from_secs(60), "at most a minute");
        assert_eq!(after(Some(i64::MAX)), Duration::from_secs(60));
        assert_eq!(
            after(Some(-3)),
            Duration::from_secs(1),
            "a producer's own header"
        );
        // 20 deliveries (RabbitMQ's default limit) last about a quarter of an hour.
        let total: Duration = (0..20).map(|n| after(Some(n))).sum();
        assert!(total >= Duration::from_secs(14 * 60), "{total:?}");
        // A classic queue counts no deliveries: a message that has been retried often
        // (its dead letter refused at its last attempt) waits as long.
        let mut t = FieldTable::default();
        h::set_int(&mut t, h::RETRY_COUNT, 9);
        assert_eq!(publish_failure_backoff(&t), Duration::from_secs(60));
    }

    #[test]
    fn a_message_is_not_held_into_the_consumer_timeout() {
        let secs = Duration::from_secs;
        // A handler stopped at its deadline (a minute and a half before a day's timeout):
        // the minute's pause would end past it otherwise.
        let day = secs(86_400);
        assert_eq!(pause_left(day, day - secs(90)), secs(85));
        assert_eq!(pause_left(day, day - secs(3)), Duration::ZERO);
        assert_eq!(pause_left(day, secs(10)), day - secs(15));
        // A short timeout keeps a tenth of it.
        assert_eq!(pause_left(secs(20), secs(13)), secs(5));
        assert_eq!(pause_left(secs(20), secs(30)), Duration::ZERO);
    }

    #[test]
    fn a_node_is_taken_for_cut_off_only_after_looks_spanning_the_limit() {
        let t0 = std::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut l = Leaderless::default();
        // A leader election: a look or two without one, then a leader again.
        assert!(!l.seen(true, at(0)));
        assert!(!l.seen(true, at(15)));
        assert!(!l.seen(false, at(30)));
        // The run starts again: three looks, but spanning less than the limit.
        assert!(!l.seen(true, at(45)));
        assert!(!l.seen(true, at(46)));
        assert!(!l.seen(true, at(47)));
        assert!(l.seen(true, at(45) + CUT_OFF_AFTER));
        // Two slow looks spanning the limit are not enough.
        let mut l = Leaderless::default();
        assert!(!l.seen(true, at(0)));
        assert!(!l.seen(true, at(0) + CUT_OFF_AFTER * 2));
        assert!(l.seen(true, at(0) + CUT_OFF_AFTER * 3));
    }
}

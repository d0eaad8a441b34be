//! The consumer runtime: connect, declare, consume with bounded concurrency, publish
//! outcomes with confirms before acking, recover from any loss, drain on shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use lapin::Connection;
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::config::{AmqpConfig, Config};
use crate::otlp::SpanExporter;
use crate::outcome::Planner;
use crate::processor::{MessageProcessor, ProcessorConfiguration};
use crate::session::{SessionEnd, session};
use crate::telemetry as m;
use crate::topology::Topology;

/// How long the spans left at a stop may take to reach the collector.
const SPAN_FLUSH: Duration = Duration::from_secs(2);

/// Live state of a runtime, read by `/readyz` and by tests.
pub struct Status {
    ready: AtomicBool,
    sessions: watch::Sender<u64>,
    /// The session's connection: readiness is its real state, not only our last word.
    conn: std::sync::Mutex<Option<Arc<Connection>>>,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Status")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Default for Status {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            sessions: watch::channel(0).0,
            conn: std::sync::Mutex::new(None),
        }
    }
}

impl Status {
    /// True while connected and consuming (the connection is asked, so a broker that went
    /// away shows at once, even while every handler is busy).
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
            && self
                .conn
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .is_some_and(|c| c.status().connected())
    }
    pub(crate) fn attach(&self, conn: Option<Arc<Connection>>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }
    /// Counts consuming sessions started so far (1 after the first connect, +1 per recovery).
    pub fn sessions(&self) -> watch::Receiver<u64> {
        self.sessions.subscribe()
    }
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        metrics::gauge!(m::CONNECTED).set(if ready { 1.0 } else { 0.0 });
        if ready {
            self.sessions.send_modify(|n| *n += 1);
        }
    }
}

/// Errors that stop a runtime (everything else is retried by reconnecting).
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The broker has an object with the same name but other arguments.
    #[error(
        "topology conflict: {0}. An existing queue or exchange has different arguments \
         (e.g. another queue_type): change the config back, or move its messages away \
         (a shovel; `dlq list --json` first for Q-dlq) before deleting it. An exchange of \
         that name that another system owns (a shared name such as `monitoring`) is not \
         to be deleted: give the service another name for it in its config"
    )]
    TopologyConflict(String),
}

pub use crate::connection::{bounded, confirm_channel, connect};

pub use crate::publisher::{Outgoing, PublishError, Publisher, publish_confirmed};

/// Runs one processor against the broker until shut down.
pub struct Runtime<P: MessageProcessor> {
    inner: Arc<Inner<P>>,
}

/// What every session of a runtime shares.
pub(crate) struct Inner<P> {
    pub(crate) service: String,
    pub(crate) topology: Topology,
    pub(crate) planner: Planner,
    pub(crate) amqp: AmqpConfig,
    pub(crate) processor: P,
    pub(crate) status: Arc<Status>,
    pub(crate) permits: Arc<Semaphore>,
    /// One large body decoded and handled at a time (see [`crate::session::LARGE_BODY`]).
    pub(crate) large_bodies: Semaphore,
    /// Messages held while the broker refuses their retry: a quarter of the handlers at
    /// most, so the others keep working meanwhile.
    pub(crate) held_retries: Semaphore,
    /// Span export (`[telemetry] otlp_endpoint`), if on.
    pub(crate) spans: Option<SpanExporter>,
    /// The queue's metrics, one set for the process: a reconnect neither resets a counter
    /// nor hides an in-flight count that a session's handlers failed to give back.
    pub(crate) metrics: Arc<crate::telemetry::QueueMetrics>,
    /// The other `x-consumer-timeout` (ms) `Q` was found declared with at the session's
    /// last declaration, 0 if none (see [`crate::topology::Declared`]): learnt only where
    /// the broker refused this config's value (a user who may not declare `Q` learns none).
    pub(crate) kept_consumer_timeout_ms: std::sync::atomic::AtomicU64,
}

impl<P> Inner<P> {
    /// The consumer timeout the broker applies as far as the service can know it: this
    /// config's ([`AmqpConfig::consumer_timeout_known`]), or the shorter one kept on `Q`.
    pub(crate) fn consumer_timeout(&self) -> std::time::Duration {
        let known = self.amqp.consumer_timeout_known();
        match self
            .kept_consumer_timeout_ms
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            0 => known,
            ms => known.min(std::time::Duration::from_millis(ms)),
        }
    }

    /// How long a handler may run before the framework stops it and retries its message:
    /// just under the consumer timeout declared on `Q` (`[amqp] consumer_timeout_ms`, or a
    /// shorter one kept there), after which the broker takes the delivery back — RabbitMQ
    /// 4.3 hands it out again without counting it toward the delivery limit, so a handler
    /// that never returns held its message for ever, a day at a time. None where the
    /// broker's own applies (`0`).
    ///
    /// The margin before it is a tenth of it (at most a minute), and room for what the
    /// stopped handler's end may still take — the wait for a confirm it awaits, a channel
    /// for its retry and the retry's confirm, each up to `[amqp] operation_timeout_ms`,
    /// and 5 s — at most a third.
    pub(crate) fn handler_deadline(&self) -> Option<std::time::Duration> {
        use std::time::Duration;
        let timeout = self.declared_consumer_timeout()?;
        let margin = (timeout / 10)
            .min(Duration::from_secs(60))
            .max(self.amqp.operation_timeout() * 3 + Duration::from_secs(5))
            .min(timeout / 3);
        Some(timeout - margin)
    }

    /// The consumer timeout declared on `Q`: this config's (`[amqp] consumer_timeout_ms`)
    /// or a shorter one kept there; None where the broker's own applies (`0`).
    pub(crate) fn declared_consumer_timeout(&self) -> Option<std::time::Duration> {
        let configured = self.amqp.consumer_timeout_ms;
        let kept = self
            .kept_consumer_timeout_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        let ms = match (configured, kept) {
            (0, 0) => return None,
            (c, 0) => c,
            (0, k) => k,
            (c, k) => c.min(k),
        };
        Some(std::time::Duration::from_millis(ms))
    }

    /// Notes what the last declaration found kept on `Q`.
    pub(crate) fn declared(&self, found: crate::topology::Declared) {
        let ms = found.consumer_timeout_ms.unwrap_or(0);
        let before = self
            .kept_consumer_timeout_ms
            .swap(ms, std::sync::atomic::Ordering::Relaxed);
        if ms > 0
            && ms != before
            && std::time::Duration::from_millis(ms) < self.amqp.consumer_timeout_known()
        {
            tracing::warn!(queue = %self.topology.queue, kept_ms = ms,
                configured_ms = self.amqp.consumer_timeout_ms,
                "the input queue keeps a shorter x-consumer-timeout than [amqp] consumer_timeout_ms \
                 (declared by another release or config); handlers checkpoint and hold by the shorter one");
        }
    }
}

impl<P: MessageProcessor> Runtime<P> {
    /// Builds a runtime for `service` from its config and processor configuration.
    pub fn new<S>(service: &str, cfg: &Config<S>, pc: ProcessorConfiguration<P>) -> Self {
        Self::with_status(service, cfg, pc, Arc::new(Status::default()))
    }

    /// A runtime reporting to `status`, which may be served before the runtime exists
    /// (while the processor was being built).
    pub fn with_status<S>(
        service: &str,
        cfg: &Config<S>,
        pc: ProcessorConfiguration<P>,
        status: Arc<Status>,
    ) -> Self {
        let topology = Topology::of(&pc.binding, cfg);
        let planner = Planner::new(&topology, &pc.binding.output_routing_key, &cfg.retry);
        let concurrency = cfg.amqp.effective_concurrency();
        metrics::gauge!(crate::telemetry::CONCURRENCY, "queue" => topology.queue.clone())
            .set(concurrency as f64);
        let metrics = Arc::new(crate::telemetry::QueueMetrics::new(&topology.queue));
        Self {
            inner: Arc::new(Inner {
                service: service.to_string(),
                topology,
                planner,
                amqp: cfg.amqp.clone(),
                spans: SpanExporter::new(&cfg.telemetry, service),
                metrics,
                processor: pc.processor,
                status,
                permits: Arc::new(Semaphore::new(concurrency)),
                large_bodies: Semaphore::new(1),
                held_retries: Semaphore::new((concurrency / 4).max(1)),
                kept_consumer_timeout_ms: Default::default(),
            }),
        }
    }

    /// Shared status (readiness, session count).
    pub fn status(&self) -> Arc<Status> {
        self.inner.status.clone()
    }

    /// The topology this runtime declares.
    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// Consumes until `shutdown`, reconnecting with capped exponential backoff on any loss.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), RuntimeError> {
        let ms = self.inner.amqp.consumer_timeout_ms;
        if ms > 0 && ms < crate::config::SHORT_CONSUMER_TIMEOUT_MS {
            tracing::warn!(
                consumer_timeout_ms = ms,
                "[amqp] consumer_timeout_ms is under 5 minutes (it is in milliseconds): a \
                 handler longer than that has its channel closed by the broker and its message \
                 delivered again"
            );
        }
        if let Some(asked) = self.inner.amqp.concurrency_capped_from {
            tracing::warn!(
                concurrency = asked,
                prefetch = self.inner.amqp.prefetch,
                "[amqp] concurrency is above prefetch: the broker hands out at most prefetch \
                 messages at once, so that many handlers run; raise prefetch for more"
            );
        }
        if self.inner.topology.queue_type == crate::config::QueueType::Classic {
            tracing::warn!(
                "[amqp] queue_type is classic: the broker moves a retry from its tier back to \
                 the queue, and a message it rejects to the DLQ, at most once (a \
                 broker restart at that moment, or a queue that refuses it, loses it); quorum \
                 queues move them at least once"
            );
        }
        // Spans are exported until every handler has ended, then flushed.
        let export_stop = CancellationToken::new();
        let inner2 = self.inner.clone();
        let stop2 = export_stop.clone();
        let export = tokio::spawn(async move {
            if let Some(e) = &inner2.spans {
                e.run(stop2).await;
            }
        });
        let r = self.consume(&shutdown).await;
        export_stop.cancel();
        // A moment, not another drain budget: a collector on a network that stopped
        // answering would otherwise double the time a stop takes.
        if tokio::time::timeout(SPAN_FLUSH, export).await.is_err() {
            warn!("span export did not finish in time; the rest is dropped");
        }
        r
    }

    /// Sessions until `shutdown` or a topology conflict.
    async fn consume(&self, shutdown: &CancellationToken) -> Result<(), RuntimeError> {
        let inner = &self.inner;
        let initial = Duration::from_millis(inner.amqp.reconnect_initial_ms);
        let max = Duration::from_millis(inner.amqp.reconnect_max_ms);
        let mut backoff = initial;
        // Both exist from the start: a service that never connects shows `connected 0`
        // (its alert can fire), and the first recovery is an increase of the counter.
        metrics::gauge!(m::CONNECTED).set(0.0);
        m::connection_blocked(&inner.topology.queue).increment(0.0);
        let recoveries =
            metrics::counter!(m::RECONNECTS_TOTAL, "queue" => inner.topology.queue.clone());
        recoveries.increment(0);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let started = tokio::time::Instant::now();
            let end = session(inner, shutdown).await;
            if let Ok(SessionEnd::Lost(_)) = end {
                // A lost connection's node may be gone with its host: tried first again,
                // every reconnect would wait out `connect_timeout_ms` on it before the next
                // node. A node that is fine costs nothing to leave.
                crate::connection::skip_last_node();
            }
            match end {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Lost(why) | SessionEnd::Released(why)) => {
                    // One per lost session, not per failed attempt to get a new one: a
                    // broker restart is one recovery however many connects it takes.
                    recoveries.increment(1);
                    // Back to a quick reconnect after a session that ran a while; sessions
                    // lost one after another back off as failed connects do.
                    if started.elapsed() >= max {
                        backoff = initial;
                    }
                    warn!(queue = %inner.topology.queue, reason = %why, retry_in_ms = backoff.as_millis() as u64,
                        "lost the broker; reconnecting");
                }
                Err(e) if e.is_conflict() => {
                    return Err(RuntimeError::TopologyConflict(e.to_string()));
                }
                Err(e) => {
                    warn!(queue = %inner.topology.queue, error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "broker session failed (cannot reach the broker, or it refused the session){}", crate::connection::refusal_hint(&e));
                    // A node that took the connection and then refused the session is passed
                    // over next time. A connect that failed on every node already moved the
                    // start on by one: moved again, two nodes' `urls` started at the same
                    // (perhaps dead) node every time.
                    if !matches!(e, crate::topology::DeclareError::Connect(_)) {
                        crate::connection::skip_last_node();
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(jittered(backoff)) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(max);
        }
        Ok(())
    }
}

/// `backoff` less up to half of it, at random: every replica of every service loses the
/// broker at the same instant (a restart, a node going down), and reconnecting all at once,
/// declaring and taking a full prefetch each, would meet the broker as one burst every
/// time. The first wait is at most what is configured, never more.
fn jittered(backoff: Duration) -> Duration {
    let spread = u64::try_from(backoff.as_millis() / 2).unwrap_or(u64::MAX);
    backoff.saturating_sub(Duration::from_millis(rand::random_range(0..=spread)))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;

    #[async_trait::async_trait]
    impl MessageProcessor for Nop {
        type Input = serde_json::Value;
        async fn handle(
            &self,
            v: serde_json::Value,
            _ctx: &crate::MessageContext,
        ) -> crate::Outcome {
            crate::Outcome::success(v)
        }
    }

    /// A shorter `x-consumer-timeout` the broker says `Q` keeps (declared by another
    /// release or config) is what the handlers' checkpoints and holds follow; a longer one
    /// changes nothing, and a declaration that finds none forgets it.
    #[tokio::test]
    async fn a_shorter_consumer_timeout_kept_on_the_queue_is_followed() {
        let o = crate::config::LoadOptions::isolated()
            .set("echo.queue", "q")
            .set("echo.output_exchange", "q-out")
            .set("amqp.consumer_timeout_ms", "1800000");
        let cfg = crate::config::load::<serde::de::IgnoredAny>("echo", &o).expect("valid");
        let rt = Runtime::new(
            "echo",
            &cfg,
            ProcessorConfiguration::new("q-in", "#", "out", Nop),
        );
        let inner = &rt.inner;
        let kept = |ms| crate::topology::Declared {
            consumer_timeout_ms: ms,
        };
        assert_eq!(inner.consumer_timeout(), Duration::from_secs(1800));
        inner.declared(kept(Some(60_000)));
        assert_eq!(inner.consumer_timeout(), Duration::from_secs(60));
        inner.declared(kept(Some(3_600_000)));
        assert_eq!(inner.consumer_timeout(), Duration::from_secs(1800));
        inner.declared(kept(Some(60_000)));
        inner.declared(kept(None));
        assert_eq!(inner.consumer_timeout(), Duration::from_secs(1800));
    }

    #[test]
    fn reconnect_waits_are_spread_between_half_and_all_of_the_backoff() {
        let b = Duration::from_millis(1000);
        let waits: Vec<Duration> = (0..200).map(|_| jittered(b)).collect();
        assert!(waits.iter().all(|w| *w >= b / 2 && *w <= b));
        let distinct: std::collections::HashSet<_> = waits.iter().collect();
        assert!(distinct.len() > 20, "spread, not one instant: {distinct:?}");
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}

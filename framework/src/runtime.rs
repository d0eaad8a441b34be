//! The consumer runtime: connect, declare, consume with bounded concurrency, publish
//! outcomes with confirms before acking, recover from any loss, drain on shutdown.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::channel_pool::ChannelPool;
use crate::config::{AmqpConfig, Config, RetryConfig};
use crate::headers::{self as h};
use crate::processor::{MessageContext, MessageProcessor, Outcome, ProcessorConfiguration};
use crate::telemetry as m;
use crate::topology::{DeclareError, Topology};

/// How long a message whose outcome could not be published waits before going back.
const PUBLISH_FAILURE_BACKOFF: Duration = Duration::from_secs(1);

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
    fn attach(&self, conn: Option<Arc<Connection>>) {
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = conn;
    }
    /// Counts consuming sessions started so far (1 after the first connect, +1 per recovery).
    pub fn sessions(&self) -> watch::Receiver<u64> {
        self.sessions.subscribe()
    }
    fn set_ready(&self, ready: bool) {
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
         (e.g. another queue_type); delete it or change the config"
    )]
    TopologyConflict(String),
}

pub use crate::connection::{bounded, confirm_channel, connect};

/// Why an outcome could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Channel or connection failure.
    #[error("publish failed: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused the message (basic.nack).
    #[error("broker nacked the publish to exchange `{0}`")]
    Nacked(String),
    /// A mandatory message reached no queue (e.g. a retry or dead-letter queue was deleted).
    #[error("message to exchange `{0}` routing key `{1}` reached no queue")]
    Unroutable(String, String),
    /// The context is not attached to a broker channel (processor called outside a runtime).
    #[error("no broker channel available to publish on")]
    NoChannel,
    /// The broker did not confirm within `[amqp] operation_timeout_ms`.
    #[error("the broker did not confirm the publish to exchange `{0}` in time")]
    Timeout(String),
}

/// A processor's handle for publishing during handling (see [`MessageContext::publish`]).
#[derive(Clone)]
pub struct Publisher {
    pool: Arc<ChannelPool>,
    service: String,
    fail_exchange: String,
    properties: BasicProperties,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("service", &self.service)
            .finish()
    }
}

impl Publisher {
    pub(crate) async fn publish(
        &self,
        ctx: &MessageContext,
        p: crate::processor::Publication,
    ) -> Result<(), PublishError> {
        let props = output_properties(&self.service, ctx, &p.content_type);
        publish_pooled(
            &self.pool,
            vec![Outgoing {
                exchange: p.exchange,
                routing_key: p.routing_key,
                body: p.body,
                properties: props,
                mandatory: p.mandatory,
            }],
        )
        .await
    }

    pub(crate) async fn dead_letter(
        &self,
        ctx: &MessageContext,
        body: Vec<u8>,
        error: &str,
        kind: &str,
    ) -> Result<(), PublishError> {
        let env = Envelope {
            service: &self.service,
            fail_exchange: &self.fail_exchange,
            properties: &self.properties,
            headers: &ctx.headers,
            exchange: &ctx.exchange,
            routing_key: &ctx.routing_key,
            trace: &ctx.trace,
        };
        let msg = env.dead_letter(body, ctx.attempt.saturating_add(1), kind, error);
        publish_pooled(&self.pool, vec![msg]).await
    }
}

/// Publishes on a channel of the pool that no other outcome uses meanwhile.
async fn publish_pooled(pool: &Arc<ChannelPool>, msgs: Vec<Outgoing>) -> Result<(), PublishError> {
    let ch = pool.get().await?;
    publish_confirmed(&ch, msgs, pool.limit()).await
}

/// One message to send as part of an outcome.
pub struct Outgoing {
    /// Exchange.
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body.
    pub body: Vec<u8>,
    /// Properties.
    pub properties: BasicProperties,
    /// Must reach a queue (retry and dead letters).
    pub mandatory: bool,
}

/// Publishes all messages, then waits (at most `limit`) for every confirm; any nack, return
/// or timeout is an error.
pub async fn publish_confirmed(
    ch: &Channel,
    msgs: Vec<Outgoing>,
    limit: Duration,
) -> Result<(), PublishError> {
    let first = msgs.first().map(|o| o.exchange.clone()).unwrap_or_default();
    tokio::time::timeout(limit, publish_and_confirm(ch, msgs))
        .await
        .unwrap_or(Err(PublishError::Timeout(first)))
}

async fn publish_and_confirm(ch: &Channel, msgs: Vec<Outgoing>) -> Result<(), PublishError> {
    let mut pending = Vec::with_capacity(msgs.len());
    for o in msgs {
        let confirm = ch
            .basic_publish(
                o.exchange.as_str().into(),
                o.routing_key.as_str().into(),
                BasicPublishOptions {
                    mandatory: o.mandatory,
                    ..Default::default()
                },
                &o.body,
                o.properties,
            )
            .await?;
        pending.push((o.exchange, o.routing_key, confirm));
    }
    for (ex, rk, confirm) in pending {
        match confirm.await? {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            Confirmation::Ack(Some(_)) => return Err(PublishError::Unroutable(ex, rk)),
            Confirmation::Nack(_) => return Err(PublishError::Nacked(ex)),
        }
    }
    Ok(())
}

/// Runs one processor against the broker until shut down.
pub struct Runtime<P: MessageProcessor> {
    inner: Arc<Inner<P>>,
}

struct Inner<P> {
    service: String,
    topology: Topology,
    output_routing_key: String,
    amqp: AmqpConfig,
    retry: RetryConfig,
    processor: P,
    status: Arc<Status>,
    permits: Arc<Semaphore>,
}

/// The handlers of one consuming session: told when the session ends (`cancel`, seen by
/// processors through [`MessageContext::cancelled`]) and stopped at their next await point
/// if still running after the drain budget (`kill`), so no handler outlives its session
/// while the broker redelivers its message to the next one.
struct SessionTasks {
    tasks: TaskTracker,
    cancel: CancellationToken,
    kill: CancellationToken,
}

impl SessionTasks {
    fn new() -> Self {
        Self {
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            kill: CancellationToken::new(),
        }
    }

    /// Signals the handlers, waits up to `budget` for them, then stops the rest.
    async fn end(&self, budget: Duration) {
        self.cancel.cancel();
        self.tasks.close();
        if tokio::time::timeout(budget, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                still_running = self.tasks.len(),
                "drain timeout reached; stopping unfinished handlers, their messages return to the queue"
            );
            self.kill.cancel();
            self.tasks.wait().await;
        }
    }
}

enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl<P: MessageProcessor> Runtime<P> {
    /// Builds a runtime for `service` from its config and processor configuration.
    pub fn new<S>(service: &str, cfg: &Config<S>, pc: ProcessorConfiguration<P>) -> Self {
        let topology = Topology::of(&pc.binding, cfg);
        Self {
            inner: Arc::new(Inner {
                service: service.to_string(),
                topology,
                output_routing_key: pc.binding.output_routing_key,
                amqp: cfg.amqp.clone(),
                retry: cfg.retry.clone(),
                processor: pc.processor,
                status: Arc::new(Status::default()),
                permits: Arc::new(Semaphore::new(cfg.amqp.effective_concurrency())),
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
        let inner = &self.inner;
        let initial = Duration::from_millis(inner.amqp.reconnect_initial_ms);
        let max = Duration::from_millis(inner.amqp.reconnect_max_ms);
        let mut backoff = initial;
        let mut first = true;
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            if !first {
                metrics::counter!(m::RECONNECTS_TOTAL, "queue" => inner.topology.queue.clone())
                    .increment(1);
            }
            first = false;
            match self.session(&shutdown).await {
                Ok(SessionEnd::Shutdown) => break,
                Ok(SessionEnd::Lost(why)) => {
                    warn!(queue = %inner.topology.queue, reason = %why, "lost the broker; reconnecting");
                    backoff = initial;
                }
                Err(e) if e.is_conflict() => {
                    return Err(RuntimeError::TopologyConflict(e.to_string()));
                }
                Err(e) => {
                    warn!(queue = %inner.topology.queue, error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "cannot reach the broker");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(max);
        }
        Ok(())
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<SessionEnd, DeclareError> {
        let inner = &self.inner;
        let limit = inner.amqp.operation_timeout();
        let conn = Arc::new(connect(&inner.amqp, &inner.service).await?);
        // Consuming and settling only: every publish goes through the pool.
        let ch = bounded(limit, "opening a channel", conn.create_channel()).await?;
        let pool = ChannelPool::new(conn.clone(), limit);
        bounded_declare(&inner.topology, &conn, limit).await?;
        bounded(
            limit,
            "basic.qos",
            ch.basic_qos(inner.amqp.prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = format!("{}-{}", inner.service, uuid::Uuid::new_v4());
        let mut consumer = bounded(
            limit,
            "basic.consume",
            ch.basic_consume(
                inner.topology.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                consumer_arguments(&inner.amqp),
            ),
        )
        .await?;
        info!(queue = %inner.topology.queue, url = %conn_url(&inner.amqp), "consuming");
        inner.status.attach(Some(conn.clone()));
        inner.status.set_ready(true);
        let broken = CancellationToken::new();
        let handlers = SessionTasks::new();
        if inner.amqp.queue_metrics_interval_ms > 0 {
            tokio::spawn(watch_queue_depths(
                conn.clone(),
                inner.topology.queue_names(),
                Duration::from_millis(inner.amqp.queue_metrics_interval_ms),
                limit,
                handlers.cancel.clone(),
            ));
        }
        let topology_lost =
            || SessionEnd::Lost("topology incomplete (unroutable retry or dead letter)".into());
        let alive = || conn.status().connected() && ch.status().connected();
        // Notices a dead connection while every handler is busy and nothing is consumed.
        let mut health = tokio::time::interval(HEALTH_CHECK);

        let end = loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                _ = broken.cancelled() => break topology_lost(),
                _ = health.tick() => {
                    if alive() { continue } else { break SessionEnd::Lost("the connection dropped".into()) }
                }
                p = inner.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break SessionEnd::Shutdown,
                },
            };
            let next = tokio::select! {
                _ = shutdown.cancelled() => break SessionEnd::Shutdown,
                _ = broken.cancelled() => break topology_lost(),
                n = consumer.next() => n,
            };
            match next {
                Some(Ok(delivery)) => {
                    let inner2 = inner.clone();
                    let pool2 = pool.clone();
                    let broken2 = broken.clone();
                    let cancel = handlers.cancel.clone();
                    let kill = handlers.kill.clone();
                    handlers.tasks.spawn(async move {
                        tokio::select! {
                            _ = handle_delivery(&inner2, &pool2, delivery, &broken2, cancel) => {}
                            _ = kill.cancelled() => {}
                        }
                        drop(permit);
                    });
                }
                Some(Err(e)) => {
                    let why = e.to_string();
                    if why.contains("delivery acknowledgement") {
                        error!(error = %why, "the broker's consumer timeout closed the channel while a handler ran: \
                            raise [amqp] consumer_timeout_ms (RabbitMQ 3.12+; a queue declared before keeps its old value) \
                            or the broker's consumer_timeout / a consumer-timeout policy above the longest handler");
                    }
                    break SessionEnd::Lost(why);
                }
                None => {
                    break SessionEnd::Lost(
                        "consumer cancelled by the broker (queue deleted?)".into(),
                    );
                }
            }
        };
        inner.status.set_ready(false);
        inner.status.attach(None);
        let budget = Duration::from_millis(inner.amqp.drain_timeout_ms);
        match &end {
            SessionEnd::Shutdown => {
                info!(queue = %inner.topology.queue, in_flight = handlers.tasks.len(), "shutting down: cancelling consumer and draining");
                if let Err(e) = bounded(
                    limit,
                    "basic.cancel",
                    ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
                )
                .await
                {
                    debug!(error = %e, "basic.cancel failed");
                }
                handlers.end(budget).await;
                let _ = bounded(
                    limit,
                    "closing the channel",
                    ch.close(200, "shutdown".into()),
                )
                .await;
                let _ = bounded(
                    limit,
                    "closing the connection",
                    conn.close(200, "shutdown".into()),
                )
                .await;
            }
            SessionEnd::Lost(_) => {
                // The broker redelivers what these handlers hold to the next session: they
                // finish or stop before it starts, never running beside their redelivery.
                handlers.end(budget).await;
                let _ = bounded(
                    limit,
                    "closing the connection",
                    conn.close(320, "recovering".into()),
                )
                .await;
            }
        }
        Ok(end)
    }
}

/// Sets `storagetier_queue_messages` for each of `queues` every `every` until `stop`, with
/// passive declares on a channel of its own (a failed one closes only that channel).
async fn watch_queue_depths(
    conn: Arc<Connection>,
    queues: Vec<String>,
    every: Duration,
    limit: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    let mut ch: Option<Channel> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for q in &queues {
            if ch.as_ref().is_none_or(|c| !c.status().connected()) {
                ch = bounded(limit, "opening a channel", conn.create_channel())
                    .await
                    .ok();
            }
            let Some(c) = &ch else { break };
            if let Ok(Ok(n)) = tokio::time::timeout(limit, crate::dlq::count(c, q)).await {
                metrics::gauge!(m::QUEUE_MESSAGES, "queue" => q.clone()).set(f64::from(n));
            }
        }
    }
}

/// `basic.consume` arguments: the per-consumer acknowledgement timeout, so a handler longer
/// than the broker's default (30 min) is not cut off and redelivered while it still runs.
/// RabbitMQ 3.12 and 3.13 read it; 4.0 reads the queue's (see `Topology::queues`); 3.10
/// and 3.11 ignore both (their `consumer_timeout` in rabbitmq.conf must be raised instead).
fn consumer_arguments(amqp: &AmqpConfig) -> FieldTable {
    let mut args = FieldTable::default();
    if amqp.consumer_timeout_ms > 0 {
        args.insert(
            "x-consumer-timeout".into(),
            lapin::types::AMQPValue::LongLongInt(
                i64::try_from(amqp.consumer_timeout_ms).unwrap_or(i64::MAX),
            ),
        );
    }
    args
}

/// How often a session checks that its connection is still there.
const HEALTH_CHECK: Duration = Duration::from_millis(250);

/// The node a session is connected to, for logs (password redacted).
fn conn_url(amqp: &AmqpConfig) -> String {
    amqp.endpoints()
        .iter()
        .map(|u| u.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Declares the topology, failing (and so restarting the session) if the broker hangs.
async fn bounded_declare(
    topology: &Topology,
    conn: &Connection,
    limit: Duration,
) -> Result<(), DeclareError> {
    tokio::time::timeout(limit, topology.declare(conn))
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

/// Metadata read off a delivery before processing.
struct Incoming {
    attempt: u32,
    exchange: String,
    routing_key: String,
    headers: FieldTable,
}

fn incoming(d: &Delivery) -> Incoming {
    let headers = d.properties.headers().clone().unwrap_or_default();
    let attempt = h::get_int(&headers, h::RETRY_COUNT)
        .unwrap_or(0)
        .clamp(0, i64::from(u32::MAX)) as u32;
    let exchange =
        h::get_str(&headers, h::ORIGINAL_EXCHANGE).unwrap_or_else(|| d.exchange.to_string());
    let routing_key =
        h::get_str(&headers, h::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| d.routing_key.to_string());
    Incoming {
        attempt,
        exchange,
        routing_key,
        headers,
    }
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
        Category::Syntax | Category::Eof | Category::Io => format!("body is not valid JSON: {e}"),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

async fn handle_delivery<P: MessageProcessor>(
    inner: &Inner<P>,
    pool: &Arc<ChannelPool>,
    delivery: Delivery,
    broken: &CancellationToken,
    cancel: CancellationToken,
) {
    let inc = incoming(&delivery);
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string());
    let trace = crate::trace::TraceContext::continue_from(&inc.headers);
    let span = info_span!("message",
        trace_id = %trace.trace_id,
        span_id = %trace.span_id,
        queue = %inner.topology.queue,
        routing_key = %inc.routing_key,
        message_id = message_id.as_deref().unwrap_or(""),
        attempt = inc.attempt);
    async move {
        let queue = inner.topology.queue.clone();
        let _in_flight = InFlight::enter(&queue);
        let started = Instant::now();
        let ctx = MessageContext {
            exchange: inc.exchange.clone(),
            routing_key: inc.routing_key.clone(),
            attempt: inc.attempt,
            redelivered: delivery.redelivered,
            message_id: message_id.clone(),
            correlation_id: delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
            timestamp: *delivery.properties.timestamp(),
            headers: inc.headers.clone(),
            retry_headers: Default::default(),
            cancel,
            trace,
            publisher: Some(Publisher {
                pool: pool.clone(),
                service: inner.service.clone(),
                fail_exchange: inner.topology.fail_exchange(),
                properties: delivery.properties.clone(),
            }),
        };
        // Decoding runs inside catch_unwind too: a panicking Deserialize is the input's fault.
        let handled = AssertUnwindSafe(async {
            match serde_json::from_slice::<P::Input>(&delivery.data) {
                Err(e) => Outcome::Permanent(describe_decode_error(&e)),
                Ok(input) => inner.processor.handle(input, &ctx).await,
            }
        })
        .catch_unwind()
        .await;
        let outcome = handled.unwrap_or_else(|p| {
            Outcome::Permanent(format!("processor panicked: {}", panic_message(&*p)))
        });
        metrics::histogram!(m::HANDLER_SECONDS, "queue" => queue.clone())
            .record(started.elapsed().as_secs_f64());
        if let Outcome::Interrupted(reason) = &outcome {
            info!(reason = %reason, "interrupted; the message goes back to the queue");
            let _ = delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            return;
        }
        let was_retry = matches!(outcome, Outcome::Retry(_));
        let (mut label, msgs) = plan(inner, &delivery, &inc, &ctx, outcome);
        let mut published = publish_outcome(pool, msgs).await;
        if let Err(e) = &published {
            metrics::counter!(m::PUBLISH_FAILURES_TOTAL, "queue" => queue.clone()).increment(1);
            error!(error = %e, outcome = label, "could not publish the outcome");
            // A retry or dead letter that reached no queue means our own topology is
            // incomplete: re-declare it by starting a new session.
            if let PublishError::Unroutable(ex, _) = &e
                && (*ex == inner.topology.retry_exchange() || *ex == inner.topology.fail_exchange())
            {
                broken.cancel();
            }
            // An outcome that cannot be published (an unroutable or missing destination)
            // becomes a retry: it counts toward max_attempts and ends in the DLQ, instead
            // of looping through requeues that RabbitMQ 4.3 no longer counts.
            if !was_retry {
                let why = format!("could not publish the {label} outcome: {e}");
                let (l, msgs) = plan(inner, &delivery, &inc, &ctx, Outcome::Retry(why));
                label = l;
                published = publish_outcome(pool, msgs).await;
            }
        }
        match published {
            Ok(()) => match delivery.acker.ack(BasicAckOptions::default()).await {
                // Ok(false): the channel is gone and the ack was never sent.
                Ok(true) => {
                    metrics::counter!(m::MESSAGES_TOTAL, "queue" => queue.clone(), "outcome" => label)
                        .increment(1);
                }
                Ok(false) => {
                    warn!(outcome = label, "ack not sent (channel closed); the message will be redelivered");
                }
                Err(e) => warn!(error = %e, "ack failed; the message will be redelivered"),
            },
            Err(e) => {
                // Not even our own retry tier took it: the broker is failing or our
                // topology is gone. Re-declare it and let the message come back.
                error!(error = %e, "could not publish a retry either; re-declaring the topology, the input goes back to the queue");
                broken.cancel();
                tokio::time::sleep(PUBLISH_FAILURE_BACKOFF).await;
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }
    .instrument(span)
    .await
}

/// Publishes an outcome's messages (none for Drop) on a pooled channel.
async fn publish_outcome(pool: &Arc<ChannelPool>, msgs: Vec<Outgoing>) -> Result<(), PublishError> {
    if msgs.is_empty() {
        return Ok(());
    }
    publish_pooled(pool, msgs).await
}

/// Counts a handler in `storagetier_in_flight` until dropped, however the handler ends.
struct InFlight(metrics::Gauge);

impl InFlight {
    fn enter(queue: &str) -> Self {
        let g = metrics::gauge!(m::IN_FLIGHT, "queue" => queue.to_string());
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Properties of a message a service originates: persistent, new id, response headers.
fn output_properties(service: &str, ctx: &MessageContext, content_type: &str) -> BasicProperties {
    let in_response_to = ctx
        .message_id
        .clone()
        .unwrap_or_else(|| ctx.routing_key.clone());
    let mut hdr = FieldTable::default();
    h::set_str(&mut hdr, h::IN_RESPONSE_TO, &in_response_to);
    ctx.trace.write(&mut hdr);
    let mut p = BasicProperties::default()
        .with_content_type(content_type.into())
        .with_delivery_mode(2)
        .with_message_id(new_message_id())
        .with_timestamp(now_ts())
        .with_app_id(service.into())
        .with_headers(hdr);
    if let Some(c) = &ctx.correlation_id {
        p = p.with_correlation_id(c.as_str().into());
    }
    p
}

fn new_message_id() -> ShortString {
    uuid::Uuid::new_v4().to_string().into()
}

fn now_ts() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Turns an outcome into the messages to publish (before ack) and a metric label.
fn plan<P>(
    inner: &Inner<P>,
    d: &Delivery,
    inc: &Incoming,
    ctx: &MessageContext,
    outcome: Outcome,
) -> (&'static str, Vec<Outgoing>) {
    let is_exhausted = matches!(outcome, Outcome::Exhausted(_));
    match outcome {
        Outcome::Success { body, extra } => {
            let props = |content_type: &str| output_properties(&inner.service, ctx, content_type);
            let mut msgs = vec![Outgoing {
                exchange: inner.topology.output_exchange.clone(),
                routing_key: format!("{}.success", inner.output_routing_key),
                body: body.to_string().into_bytes(),
                properties: props("application/json"),
                mandatory: false,
            }];
            for x in extra {
                msgs.push(Outgoing {
                    properties: props(&x.content_type),
                    exchange: x.exchange,
                    routing_key: x.routing_key,
                    body: x.body,
                    mandatory: x.mandatory,
                });
            }
            info!("success");
            ("success", msgs)
        }
        Outcome::Drop(reason) => {
            info!(reason = %reason, "dropped");
            ("drop", Vec::new())
        }
        // Settled before planning (nack, requeue); never published.
        Outcome::Interrupted(_) => ("interrupted", Vec::new()),
        Outcome::Retry(reason) => {
            let attempts = inc.attempt.saturating_add(1);
            if attempts >= inner.retry.max_attempts {
                let why = format!("gave up after {attempts} attempts; last error: {reason}");
                warn!(error = %why, "retries exhausted; dead-lettering");
                return (
                    "dead_letter",
                    vec![dead_letter(
                        inner,
                        d,
                        inc,
                        &ctx.trace,
                        attempts,
                        h::KIND_RETRIES_EXHAUSTED,
                        &why,
                    )],
                );
            }
            let delay = inner.retry.delay_for_attempt(inc.attempt);
            warn!(error = %reason, retry_in_ms = delay, "retrying later");
            let mut hdr = inc.headers.clone();
            h::set_int(&mut hdr, h::RETRY_COUNT, i64::from(attempts));
            h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, &inc.exchange);
            h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, &inc.routing_key);
            h::set_str(
                &mut hdr,
                h::LAST_ERROR,
                h::truncate(&reason, h::MAX_ERROR_BYTES),
            );
            for (k, v) in ctx.retry_headers() {
                h::set_str(&mut hdr, &k, &v);
            }
            ctx.trace.write(&mut hdr);
            let props = d.properties.clone().with_delivery_mode(2).with_headers(hdr);
            (
                "retry",
                vec![Outgoing {
                    exchange: inner.topology.retry_exchange(),
                    routing_key: Topology::retry_routing_key(delay),
                    body: d.data.clone(),
                    properties: props,
                    mandatory: true,
                }],
            )
        }
        Outcome::Permanent(reason) | Outcome::Exhausted(reason) => {
            let kind = if is_exhausted {
                h::KIND_RETRIES_EXHAUSTED
            } else {
                h::KIND_PERMANENT
            };
            warn!(error = %reason, kind, "dead-lettering");
            let attempts = inc.attempt.saturating_add(1);
            (
                "dead_letter",
                vec![dead_letter(
                    inner, d, inc, &ctx.trace, attempts, kind, &reason,
                )],
            )
        }
    }
}

/// What a dead letter is built from.
struct Envelope<'a> {
    service: &'a str,
    fail_exchange: &'a str,
    properties: &'a BasicProperties,
    headers: &'a FieldTable,
    exchange: &'a str,
    routing_key: &'a str,
    trace: &'a crate::trace::TraceContext,
}

impl Envelope<'_> {
    /// The original properties and headers plus the dead-letter headers of design §3.
    fn dead_letter(&self, body: Vec<u8>, attempts: u32, kind: &str, error: &str) -> Outgoing {
        let mut hdr = self.headers.clone();
        self.trace.write(&mut hdr);
        h::set_str(&mut hdr, h::ERROR, h::truncate(error, h::MAX_ERROR_BYTES));
        h::set_str(&mut hdr, h::ERROR_KIND, kind);
        h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, self.exchange);
        h::set_str(&mut hdr, h::ORIGINAL_ROUTING_KEY, self.routing_key);
        h::set_int(&mut hdr, h::RETRY_COUNT, i64::from(attempts));
        h::set_str(
            &mut hdr,
            h::FAILED_AT,
            &chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        );
        h::set_str(&mut hdr, h::SERVICE, self.service);
        Outgoing {
            exchange: self.fail_exchange.to_string(),
            routing_key: self.routing_key.to_string(),
            body,
            properties: self
                .properties
                .clone()
                .with_delivery_mode(2)
                .with_headers(hdr),
            mandatory: true,
        }
    }
}

fn dead_letter<P>(
    inner: &Inner<P>,
    d: &Delivery,
    inc: &Incoming,
    trace: &crate::trace::TraceContext,
    attempts: u32,
    kind: &str,
    error: &str,
) -> Outgoing {
    Envelope {
        service: &inner.service,
        fail_exchange: &inner.topology.fail_exchange(),
        properties: &d.properties,
        headers: &inc.headers,
        exchange: &inc.exchange,
        routing_key: &inc.routing_key,
        trace,
    }
    .dead_letter(d.data.clone(), attempts, kind, error)
}

//! Publishing with confirms: the messages a processor sends, the pool of confirm channels
//! they go out on (each used by one outcome at a time, so every confirm and return belongs
//! to its own publish), and what can go wrong.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use serde::Serialize;

use crate::channel_pool::ChannelPool;
use crate::dlq::envelope::Envelope;
use crate::headers as h;
use crate::trace::TraceContext;

/// A message to publish besides the primary success message (another exchange or queue).
#[derive(Debug, Clone, PartialEq)]
pub struct Publication {
    /// Target exchange (`""` = the default exchange, routing key = queue name).
    pub exchange: String,
    /// Routing key.
    pub routing_key: String,
    /// Body bytes, sent as given.
    pub body: Vec<u8>,
    /// MIME type of `body`.
    pub content_type: String,
    /// Must reach a queue: an unroutable message is an error (the input is retried)
    /// instead of being dropped by the broker.
    pub mandatory: bool,
    /// What it announces, where its body differs from one attempt to the next (a time of
    /// writing, say): its message id is derived from this instead of the body, so every
    /// attempt's copy has one id a consumer can drop repeats by.
    pub identity: Option<String>,
}

impl Publication {
    /// A JSON publication of any serialisable value; an error if it cannot be serialised
    /// (never an empty body).
    pub fn json(
        exchange: &str,
        routing_key: &str,
        body: &impl Serialize,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::value(
            exchange,
            routing_key,
            &serde_json::to_value(body)?,
        ))
    }
    /// A JSON publication of a JSON value (always serialisable).
    pub fn value(exchange: &str, routing_key: &str, body: &serde_json::Value) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: body.to_string().into_bytes(),
            content_type: "application/json".to_string(),
            mandatory: false,
            identity: None,
        }
    }
    /// A plain-text publication.
    pub fn text(exchange: &str, routing_key: &str, body: impl Into<String>) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            body: body.into().into_bytes(),
            content_type: "text/plain".to_string(),
            mandatory: false,
            identity: None,
        }
    }

    /// Requires the message to reach at least one queue (e.g. a named destination queue).
    pub fn mandatory(mut self) -> Self {
        self.mandatory = true;
        self
    }

    /// Names what it announces, stable across attempts (see [`Publication::identity`]).
    pub fn with_identity(mut self, identity: impl Into<String>) -> Self {
        self.identity = Some(identity.into());
        self
    }

    /// What its message id is derived from: its identity, else its body.
    pub(crate) fn id_source(&self) -> &[u8] {
        self.identity
            .as_deref()
            .map_or(self.body.as_slice(), str::as_bytes)
    }
}

/// An exchange as an error names it: the default exchange (`""`) in words.
fn exchange_shown(name: &str) -> String {
    if name.is_empty() {
        "the default exchange".into()
    } else {
        format!("exchange `{name}`")
    }
}

/// Why an outcome could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Channel or connection failure.
    #[error("publish failed: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused the message (basic.nack).
    #[error("broker nacked the publish to {}", exchange_shown(.0))]
    Nacked(String),
    /// A mandatory message reached no queue (e.g. a retry or dead-letter queue was deleted).
    #[error("message to {shown} routing key `{1}` reached no queue", shown = exchange_shown(.0))]
    Unroutable(String, String),
    /// The context is not attached to a broker channel (processor called outside a runtime).
    #[error("no broker channel available to publish on")]
    NoChannel,
    /// An exchange name or routing key longer than AMQP allows (255 bytes); nothing was
    /// published.
    #[error(
        "exchange `{0}…` or routing key `{1}…` is longer than AMQP's 255 bytes; nothing published"
    )]
    NameTooLong(String, String),
    /// The broker did not confirm within `[amqp] operation_timeout_ms`.
    #[error("the broker did not confirm the publish to {} in time", exchange_shown(.0))]
    Timeout(String),
    /// The message's properties (its headers, mostly) would not fit in one AMQP frame: the
    /// broker would close the whole connection over it. Nothing was published.
    #[error(
        "the message to exchange `{exchange}` has {bytes} bytes of properties and headers, \
         more than one frame of the connection carries ({frame_max} bytes){}; nothing published",
        if *kept > 0 { format!(" less the {kept} kept for the headers the broker adds on its way back") } else { String::new() }
    )]
    TooLarge {
        /// Destination exchange.
        exchange: String,
        /// Bytes of its content-header frame.
        bytes: usize,
        /// The connection's negotiated frame size.
        frame_max: usize,
        /// Bytes kept free for headers the broker adds before it is delivered again
        /// ([`Outgoing::broker_adds`]).
        kept: usize,
    },
    /// The broker refused the body for its size (larger than its `max_message_size`) and
    /// closed the channel: nothing was published, and no retry will make it fit.
    #[error(
        "the broker refused the {bytes}-byte body to {} (larger than its max_message_size); \
         nothing published",
        exchange_shown(exchange)
    )]
    BodyTooLarge {
        /// Destination exchange.
        exchange: String,
        /// Bytes of the body.
        bytes: usize,
    },
}

impl PublishError {
    /// Whether it failed because the connection went (its socket failed, a heartbeat was
    /// missed, or it was no longer open): lapin may fail a publish half written with the
    /// socket's error before the connection's state says so.
    pub(crate) fn lost_with_connection(&self) -> bool {
        match self {
            PublishError::Amqp(a) => match a.kind() {
                lapin::ErrorKind::InvalidConnectionState(_)
                | lapin::ErrorKind::MissingHeartbeatError => true,
                // Not this framework's own time bound on a broker call (a timed-out
                // channel open is the broker's slowness, counted).
                lapin::ErrorKind::IOError(io) => io.kind() != std::io::ErrorKind::TimedOut,
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether publishing the same message again can never succeed (too large for the
    /// broker or a frame, a name too long): its input is dead-lettered, not retried into
    /// the same refusal.
    pub fn never_passes(&self) -> bool {
        matches!(
            self,
            PublishError::TooLarge { .. }
                | PublishError::NameTooLong(..)
                | PublishError::BodyTooLarge { .. }
        )
    }

    /// Whether only this message's destination refused it (no queue bound, or the queue
    /// full and rejecting): the channel is fine, and a publish elsewhere can still pass.
    pub fn destination_refused(&self) -> bool {
        matches!(
            self,
            PublishError::Unroutable(..) | PublishError::Nacked(..)
        )
    }

    /// Whether the broker refused one of these bodies (`sizes`, in bytes) for its size
    /// (`max_message_size`, 16 MiB by default on RabbitMQ 4.x): the same outcome will never
    /// fit, however often retried. The size the broker names must be one of them: the
    /// refusal closes the channel, and every other publish pending on it fails with the
    /// same text.
    pub fn body_too_large(&self, sizes: &[usize]) -> bool {
        let PublishError::Amqp(e) = self else {
            return false;
        };
        if !crate::topology::is_soft(e, lapin::protocol::AMQPSoftError::PRECONDITIONFAILED) {
            return false;
        }
        // "message size N is larger than configured max size M" (or "… than max size M").
        let text = e.to_string();
        let refused = text
            .split("message size ")
            .nth(1)
            .and_then(|r| r.split_once(" is larger than "))
            .filter(|(_, rest)| rest.contains("max size"))
            .and_then(|(n, _)| n.trim().parse::<usize>().ok());
        refused.is_some_and(|n| sizes.contains(&n))
    }

    /// This error, or `BodyTooLarge` where it is the broker refusing this one body of
    /// `bytes` to `exchange` for its size: a refusal no retry gets past, named as such.
    pub fn sized(self, exchange: &str, bytes: usize) -> PublishError {
        if self.body_too_large(&[bytes]) {
            PublishError::BodyTooLarge {
                exchange: exchange.to_string(),
                bytes,
            }
        } else {
            self
        }
    }
}

/// Largest body published on the shared confirm channel (see [`Publisher::send`]).
const SHARED_CHANNEL_MAX_BODY: usize = 1024 * 1024;

/// One message to send as part of an outcome.
#[derive(Clone)]
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
    /// Bytes of headers the broker adds before the message is delivered again (a retry
    /// tier's `x-death` on its way back to the queue), kept free in its frame (an eighth
    /// of it at most): a retry that fitted by less came back larger than a frame, and the
    /// client closed the connection over it — every handler's, at every redelivery.
    pub broker_adds: usize,
}

/// The delivery a service's own messages answer: what their properties and dead letters
/// are derived from.
pub(crate) struct Origin<'a> {
    /// The delivery's message id, if any.
    pub message_id: Option<&'a str>,
    /// Without one, a digest of its body ([`content_id`]).
    pub content_id: Option<&'a str>,
    /// Its correlation id, if any.
    pub correlation_id: Option<&'a str>,
    /// The exchange it was first published to.
    pub exchange: &'a str,
    /// The routing key it was first published with.
    pub routing_key: &'a str,
    /// Its 0-based attempt.
    pub attempt: u32,
    /// Its headers.
    pub headers: &'a FieldTable,
    /// Its properties.
    pub properties: &'a BasicProperties,
    /// The trace it is handled in.
    pub trace: &'a TraceContext,
}

/// A session's publishing handle: confirm channels from its pool, the service's names.
#[derive(Clone)]
pub struct Publisher {
    pool: Arc<ChannelPool>,
    service: Arc<str>,
    fail_exchange: Arc<str>,
    /// The service's own output exchange: its non-mandatory publishes share a channel.
    output_exchange: Arc<str>,
    /// `storagetier_parts_dead_lettered_total` of the service's queue.
    parts_dead_lettered: metrics::Counter,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("service", &self.service)
            .finish()
    }
}

impl Publisher {
    /// The broker's flow control of the connection it publishes on.
    pub(crate) fn alarm(&self) -> &crate::alarm::Alarm {
        self.pool.alarm()
    }

    /// Whether a publish that failed now counts as one (`storagetier_publish_failures_total`):
    /// not where the connection went with it — nothing was refused, the input is delivered
    /// again, and the reconnect counter says so. Counted, every broker restart set off the
    /// publish-failure alert for its whole window.
    pub(crate) fn failure_counts(&self, e: &PublishError) -> bool {
        self.pool.connected() && !e.lost_with_connection()
    }

    /// A publisher for `service` consuming `queue` on `pool`, dead-lettering to
    /// `fail_exchange` (`Q-fail`), its success messages going to `output_exchange`
    /// (declared by the service).
    pub(crate) fn new(
        pool: Arc<ChannelPool>,
        service: &str,
        queue: &str,
        fail_exchange: &str,
        output_exchange: &str,
    ) -> Self {
        let parts_dead_lettered = metrics::counter!(
            crate::telemetry::PARTS_DEAD_LETTERED_TOTAL,
            "queue" => queue.to_string()
        );
        // Shown at 0 from the start, as the other counters (an alert on its increase).
        parts_dead_lettered.increment(0);
        Self {
            pool,
            service: service.into(),
            fail_exchange: fail_exchange.into(),
            output_exchange: output_exchange.into(),
            parts_dead_lettered,
        }
    }

    /// The service's name (`x-service`, `app_id`).
    pub(crate) fn service(&self) -> &str {
        &self.service
    }

    /// Publishes `p` as a message of this service answering `origin`, and waits for the
    /// confirm.
    pub(crate) async fn publish(
        &self,
        origin: &Origin<'_>,
        p: Publication,
    ) -> Result<(), PublishError> {
        let properties = output_properties(
            &self.service,
            origin,
            &p.content_type,
            OutputOf::Publication {
                exchange: &p.exchange,
                routing_key: &p.routing_key,
                body: p.id_source(),
            },
        );
        let bytes = p.body.len();
        let exchange = p.exchange.clone();
        self.send(vec![Outgoing {
            exchange: p.exchange,
            routing_key: p.routing_key,
            body: p.body,
            properties,
            mandatory: p.mandatory,
            broker_adds: 0,
        }])
        .await
        .map_err(|e| e.sized(&exchange, bytes))
    }

    /// The dead letter of `body` (the whole input or a part of it) failed as `kind`.
    pub(crate) fn dead_letter_message(
        &self,
        origin: &Origin<'_>,
        body: Vec<u8>,
        attempts: u32,
        kind: &str,
        error: &str,
    ) -> Outgoing {
        let env = Envelope {
            service: &self.service,
            properties: origin.properties,
            headers: origin.headers,
            exchange: origin.exchange,
            routing_key: origin.routing_key,
            trace: origin.trace,
        };
        Outgoing {
            exchange: self.fail_exchange.to_string(),
            routing_key: origin.routing_key.to_string(),
            body,
            properties: env.properties(attempts, kind, error),
            mandatory: true,
            broker_adds: 0,
        }
    }

    /// Dead-letters `body` (a part of the input) now, waiting for the confirm until
    /// `held_until` (at least the operation bound): a confirm given up on may land all the
    /// same, and the part, not marked done, would be dead-lettered again by the next
    /// attempt — two dead letters of one record, replayed twice.
    pub(crate) async fn dead_letter(
        &self,
        origin: &Origin<'_>,
        body: Vec<u8>,
        error: &str,
        kind: &str,
        held_until: Option<std::time::Instant>,
    ) -> Result<(), PublishError> {
        let msg =
            self.dead_letter_message(origin, body, origin.attempt.saturating_add(1), kind, error);
        let limit = held_until
            .map(|t| t.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_default()
            .max(self.pool.limit());
        self.send_within(vec![msg], limit).await?;
        self.parts_dead_lettered.increment(1);
        Ok(())
    }

    /// The largest frame the connection carries (a message's properties must fit in one).
    pub(crate) fn frame_max(&self) -> usize {
        self.pool.frame_max()
    }

    /// Publishes `msgs` and waits for every confirm (nothing to do for none): on the shared
    /// channel if the broker can return none of them (not mandatory, to the service's own
    /// output exchange), else on a channel of the pool that no other outcome uses meanwhile.
    pub(crate) async fn send(&self, msgs: Vec<Outgoing>) -> Result<(), PublishError> {
        self.send_within(msgs, self.pool.limit()).await
    }

    /// [`Publisher::send`], waiting for the confirms up to `limit` (while the broker does
    /// not block the connection) instead of the operation bound.
    pub(crate) async fn send_within(
        &self,
        msgs: Vec<Outgoing>,
        limit: Duration,
    ) -> Result<(), PublishError> {
        if msgs.is_empty() {
            return Ok(());
        }
        // A large body could pass the broker's `max_message_size` (16 MiB by default on
        // 4.x, lower where set), which closes the channel and fails every confirm pending
        // on it: on the shared channel, other handlers' successes would be retried (and
        // published twice). Such a publish takes a channel of its own.
        let unreturnable = msgs.iter().all(|o| {
            !o.mandatory
                && *o.exchange == *self.output_exchange
                && o.body.len() < SHARED_CHANNEL_MAX_BODY
        });
        let frame_max = self.pool.frame_max();
        let alarm = self.pool.alarm();
        if unreturnable {
            let ch = self.pool.shared().await?;
            let order = Some(self.pool.shared_order());
            return publish_confirmed_in_order(&ch, msgs, alarm, limit, frame_max, order).await;
        }
        let mut ch = self.pool.get().await?;
        let r = publish_confirmed(&ch, msgs, alarm, limit, frame_max).await;
        // Given up on (a timeout), its confirms would be kept by lapin for the channel's
        // life: dropped unsettled, it is closed.
        if !matches!(r, Err(PublishError::Timeout(_))) {
            ch.settled();
        }
        r
    }
}

/// Publishes all messages, then waits for every confirm, at most `limit` while the broker
/// does not block the connection (`alarm`: a publish waiting out a resource alarm is not
/// a failed one, see crate::alarm); any nack, return or timeout is an error. A message
/// whose properties exceed `frame_max` (the connection's frame size) is refused before
/// anything is sent.
pub async fn publish_confirmed(
    ch: &Channel,
    msgs: Vec<Outgoing>,
    alarm: &crate::alarm::Alarm,
    limit: Duration,
    frame_max: usize,
) -> Result<(), PublishError> {
    publish_confirmed_in_order(ch, msgs, alarm, limit, frame_max, None).await
}

/// [`publish_confirmed`] on a channel that other tasks publish on at the same time, each
/// publish numbered and queued under `order` (see [`in_tag_order`]).
pub async fn publish_confirmed_in_order(
    ch: &Channel,
    msgs: Vec<Outgoing>,
    alarm: &crate::alarm::Alarm,
    limit: Duration,
    frame_max: usize,
    order: Option<&std::sync::Mutex<()>>,
) -> Result<(), PublishError> {
    let first = msgs.first().map(|o| o.exchange.clone()).unwrap_or_default();
    alarm
        .within(limit, publish_and_confirm(ch, msgs, frame_max, order))
        .await
        .unwrap_or(Err(PublishError::Timeout(first)))
}

/// Runs `publish` (a lapin `basic_publish`) with its first poll under `order`. lapin takes
/// a publish's confirm number when the call starts and queues its frames later in that same
/// first poll (after copying the body into frames); the broker numbers publishes in the
/// order their frames arrive. Two tasks publishing on one channel from two threads could
/// queue their frames in the other order than their numbers, and each would be resolved
/// with the other's confirm: a message the broker refused (a full queue's `reject-publish`)
/// confirmed as taken, its input acked and lost. Under the lock, numbering and queueing are
/// one step; the confirm is awaited outside it.
async fn in_tag_order<F: std::future::Future>(
    order: &std::sync::Mutex<()>,
    publish: F,
) -> F::Output {
    let mut publish = std::pin::pin!(publish);
    let mut first = true;
    std::future::poll_fn(|cx| {
        if std::mem::take(&mut first) {
            let _numbered_and_queued = order.lock().unwrap_or_else(|p| p.into_inner());
            return publish.as_mut().poll(cx);
        }
        publish.as_mut().poll(cx)
    })
    .await
}

/// Bytes of the content-header frame carrying `p`: the frame's own 8, class, weight, body
/// size and property flags 14, then each property present.
pub fn header_frame_len(p: &BasicProperties) -> usize {
    let short = |s: &Option<ShortString>| s.as_ref().map_or(0, |s| 1 + s.as_str().len());
    22 + short(p.content_type())
        + short(p.content_encoding())
        + p.headers().as_ref().map_or(0, h::encoded_len)
        + p.delivery_mode().map_or(0, |_| 1)
        + p.priority().map_or(0, |_| 1)
        + short(p.correlation_id())
        + short(p.reply_to())
        + short(p.expiration())
        + short(p.message_id())
        + p.timestamp().map_or(0, |_| 8)
        + short(p.kind())
        + short(p.user_id())
        + short(p.app_id())
        + short(p.cluster_id())
}

async fn publish_and_confirm(
    ch: &Channel,
    msgs: Vec<Outgoing>,
    frame_max: usize,
    order: Option<&std::sync::Mutex<()>>,
) -> Result<(), PublishError> {
    // lapin panics on a longer name; a processor's destination can be anything.
    if let Some(o) = msgs
        .iter()
        .find(|o| o.exchange.len() > h::MAX_NAME_BYTES || o.routing_key.len() > h::MAX_NAME_BYTES)
    {
        return Err(PublishError::NameTooLong(
            h::truncate(&o.exchange, 64).to_string(),
            h::truncate(&o.routing_key, 64).to_string(),
        ));
    }
    // lapin sends a content header of any size as one frame, and RabbitMQ closes the
    // connection on a frame over its frame_max (every handler of the session with it).
    for o in &msgs {
        let bytes = header_frame_len(&o.properties);
        let kept = o.broker_adds.min(frame_max / 8);
        if bytes.saturating_add(kept) > frame_max {
            return Err(PublishError::TooLarge {
                exchange: o.exchange.clone(),
                bytes,
                frame_max,
                kept,
            });
        }
    }
    let mut pending = Vec::with_capacity(msgs.len());
    for o in msgs {
        let publish = ch.basic_publish(
            o.exchange.as_str().into(),
            o.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: o.mandatory,
                ..Default::default()
            },
            &o.body,
            o.properties,
        );
        let confirm = match order {
            Some(order) => in_tag_order(order, publish).await?,
            None => publish.await?,
        };
        pending.push((o.exchange, o.routing_key, confirm));
    }
    // Every confirm is awaited, the first failure reported: lapin keeps a confirm dropped
    // unanswered (with a returned message's body) for as long as its channel lives.
    let mut first: Result<(), PublishError> = Ok(());
    for (ex, rk, confirm) in pending {
        let this = match confirm.await {
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Unroutable(ex, rk)),
            Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked(ex)),
            Err(e) => Err(e.into()),
        };
        if first.is_ok() {
            first = this;
        }
    }
    first
}

/// The properties a copy of a delivery is republished with (retry, dead letter, replay):
/// the original's, persistent, with `headers` — except `expiration` (a dead letter must not
/// expire out of the DLQ, nor a retry leave its tier early) and `user_id` (the broker
/// refuses a publish whose user id is not the publishing connection's user), which are
/// kept as the headers `x-original-expiration` and `x-original-user-id`, as RabbitMQ
/// keeps an expiration when it dead-letters.
pub(crate) fn republished(p: &BasicProperties, mut headers: FieldTable) -> BasicProperties {
    if h::SENDER_SELECTED.iter().any(|k| headers.contains_key(k)) {
        headers = h::without(&headers, h::SENDER_SELECTED);
    }
    if p.expiration().is_none() && p.user_id().is_none() {
        return p.clone().with_delivery_mode(2).with_headers(headers);
    }
    if let Some(e) = p.expiration() {
        h::set_str(&mut headers, h::ORIGINAL_EXPIRATION, e.as_str());
    }
    if let Some(u) = p.user_id() {
        h::set_str(&mut headers, h::ORIGINAL_USER_ID, u.as_str());
    }
    let mut out = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(headers);
    if let Some(v) = p.content_type() {
        out = out.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        out = out.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        out = out.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        out = out.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        out = out.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        out = out.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        out = out.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        out = out.with_type(v.clone());
    }
    if let Some(v) = p.app_id() {
        out = out.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        out = out.with_cluster_id(v.clone());
    }
    out
}

/// Which of the outputs answering one input a message is, for its id.
#[derive(Clone, Copy)]
pub(crate) enum OutputOf<'a> {
    /// The success message (one per input).
    Success,
    /// Another publication: told apart by destination and body (or identity).
    Publication {
        exchange: &'a str,
        routing_key: &'a str,
        body: &'a [u8],
    },
}

/// Properties of a message a service originates: persistent, its id, response headers.
pub(crate) fn output_properties(
    service: &str,
    origin: &Origin<'_>,
    content_type: &str,
    output: OutputOf<'_>,
) -> BasicProperties {
    let in_response_to = origin.message_id.unwrap_or(origin.routing_key);
    let mut hdr = FieldTable::default();
    h::set_str(&mut hdr, h::IN_RESPONSE_TO, in_response_to);
    origin.trace.write(&mut hdr);
    let mut p = BasicProperties::default()
        .with_content_type(content_type.into())
        .with_delivery_mode(2)
        .with_message_id(output_message_id(service, origin, output))
        .with_timestamp(now_ts())
        .with_app_id(service.into())
        .with_headers(hdr);
    if let Some(c) = origin.correlation_id {
        p = p.with_correlation_id(c.into());
    }
    p
}

/// What stands for the message id of an input that has none: a digest of its body, which
/// its redeliveries, retries and replays keep (as SQS's content-based deduplication
/// takes one body for one message).
pub(crate) fn content_id(body: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body);
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("content sha256:{hex}")
}

/// An output's message id: derived from the input's message id (with the service, where
/// the input first came from, which part of a batch it is, and which output it is), so the outputs of a redelivered,
/// retried or replayed input carry the ids the first attempt's had, and a consumer can
/// drop the duplicates that at-least-once delivery makes. An input without an id is known
/// by its body ([`content_id`]) where its processor says one body is one message
/// (`MessageProcessor::knows_inputs_by_body`: snapshot-status, whose re-sent export-state
/// or monitoring message had a random id no consumer could drop it by, and crash-router,
/// whose MinIO notifications come without one). Random otherwise:
/// one body may come again as a new message, whose outputs must not share the first's.
fn output_message_id(service: &str, origin: &Origin<'_>, output: OutputOf<'_>) -> ShortString {
    use sha2::Digest;
    let Some(input) = origin.message_id.or(origin.content_id) else {
        return new_message_id();
    };
    // A replayed part of a batch keeps its batch's message id: which part it is tells its
    // outputs from its batch's and its sibling parts' (one id would make a consumer that
    // drops duplicates drop theirs).
    let part = crate::headers::get_str(origin.headers, crate::headers::BATCH_PART);
    let mut h = sha2::Sha256::new();
    for field in [
        service,
        origin.exchange,
        origin.routing_key,
        input,
        part.as_deref().unwrap_or(""),
    ] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field.as_bytes());
    }
    match output {
        OutputOf::Success => h.update(b"success"),
        OutputOf::Publication {
            exchange,
            routing_key,
            body,
        } => {
            h.update(b"publication");
            for part in [exchange.as_bytes(), routing_key.as_bytes(), body] {
                h.update((part.len() as u64).to_le_bytes());
                h.update(part);
            }
        }
    }
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
        .into()
}

fn new_message_id() -> ShortString {
    uuid::Builder::from_random_bytes(crate::trace::random_u128().to_le_bytes())
        .into_uuid()
        .to_string()
        .into()
}

fn now_ts() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output ids are how consumers drop the duplicates of a redelivered, retried or
    /// replayed input, also across a release: pinned, so a change of how they are derived
    /// (a field added to the hash) is seen as the compatibility break it is.
    #[test]
    fn output_ids_of_an_input_are_pinned_across_releases() {
        let headers = FieldTable::default();
        let properties = BasicProperties::default();
        let trace = TraceContext::continue_from(&headers);
        let origin = Origin {
            message_id: Some("m-1"),
            content_id: None,
            correlation_id: None,
            exchange: "assetsweeper",
            routing_key: "assetsweeper.asset_folder_importer.file.new",
            attempt: 0,
            headers: &headers,
            properties: &properties,
            trace: &trace,
        };
        let success = output_message_id("online-archive", &origin, OutputOf::Success);
        let other = output_message_id(
            "online-archive",
            &origin,
            OutputOf::Publication {
                exchange: "x",
                routing_key: "k",
                body: b"{}",
            },
        );
        assert_eq!(success.as_str(), "05b4f42d-60b4-8791-afc3-e41cdd85c45e");
        assert_eq!(other.as_str(), "58a1f7b5-4167-875f-80f1-ac6d134ac2b1");
        let mut part = FieldTable::default();
        crate::headers::set_str(&mut part, crate::headers::BATCH_PART, "2");
        let origin = Origin {
            headers: &part,
            ..origin
        };
        let of_part = output_message_id("online-archive", &origin, OutputOf::Success);
        assert_eq!(of_part.as_str(), "3de3908e-ee03-81c0-8ea1-725813cab7f7");
    }

    /// An input without a message id is known by its body: its outputs' ids are the same
    /// for every delivery of that body, other for another body, and a message id, where
    /// there is one, decides alone.
    #[test]
    fn outputs_of_an_input_without_an_id_are_named_by_its_body() {
        let headers = FieldTable::default();
        let properties = BasicProperties::default();
        let trace = TraceContext::continue_from(&headers);
        let (a, b) = (content_id(br#"{"n":1}"#), content_id(br#"{"n":2}"#));
        let origin = |message_id, content_id| Origin {
            message_id,
            content_id,
            correlation_id: None,
            exchange: "x",
            routing_key: "k",
            attempt: 0,
            headers: &headers,
            properties: &properties,
            trace: &trace,
        };
        let id = |o: &Origin<'_>| output_message_id("s", o, OutputOf::Success);
        assert_eq!(id(&origin(None, Some(&a))), id(&origin(None, Some(&a))));
        assert_ne!(id(&origin(None, Some(&a))), id(&origin(None, Some(&b))));
        assert_eq!(
            id(&origin(Some("m"), Some(&a))),
            id(&origin(Some("m"), Some(&b)))
        );
        assert_eq!(a, content_id(br#"{"n":1}"#));
    }
}

//! What a service writes: a typed message processor and its outcomes (design §3).

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use lapin::types::FieldTable;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use crate::publisher::Publication;
use crate::publisher::{Origin, PublishError, Publisher};

/// The result of processing one message.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done: publish `body` to the output exchange (and `extra`), then ack.
    Success {
        /// Success message body (JSON).
        body: serde_json::Value,
        /// Further messages published, with confirms, before the ack.
        extra: Vec<Publication>,
        /// What the success message announces, where that can differ from one attempt
        /// to the next (see [`Outcome::with_identity`]).
        identity: Option<String>,
    },
    /// Transient failure: try again later via the retry tiers.
    Retry(String),
    /// Will never succeed: dead-letter now.
    Permanent(String),
    /// Retried in place (e.g. an ordered processor's own backoff) until the attempts ran
    /// out: dead-letter now as `retries-exhausted`, as the retry tiers would have.
    Exhausted(String),
    /// Nothing to do: ack, log and count, publish nothing.
    Drop(String),
    /// The session ended while handling (see [`MessageContext::cancelled`]): give the
    /// message back unacked, so it is redelivered in its place; nothing is published.
    /// Returned while the session still runs, it is a [`Outcome::Retry`], unless the
    /// processor asked to keep the message's place ([`MessageContext::keep_place`]).
    Interrupted(String),
}

impl Outcome {
    /// Success with a serializable body and no extra destinations.
    pub fn success(body: impl Serialize) -> Self {
        match serde_json::to_value(body) {
            Ok(body) => Outcome::Success {
                body,
                extra: Vec::new(),
                identity: None,
            },
            Err(e) => Outcome::Permanent(format!("success body could not be serialized: {e}")),
        }
    }
    /// Adds extra publications to a Success (no effect on other outcomes).
    pub fn with_extra(mut self, more: impl IntoIterator<Item = Publication>) -> Self {
        if let Outcome::Success { extra, .. } = &mut self {
            extra.extend(more);
        }
        self
    }
    /// Names what a Success's message announces (no effect on other outcomes): its
    /// message id is then derived as an extra [`Publication`]'s with that identity to the
    /// success routing key would be. Without one it is the input's one success id, which a
    /// redelivery that announces another record first (the one before dropped, now stored)
    /// would give to that other record, and a consumer dropping duplicates by id would
    /// drop that record's only announcement.
    pub fn with_identity(mut self, what: impl Into<String>) -> Self {
        if let Outcome::Success { identity, .. } = &mut self {
            *identity = Some(what.into());
        }
        self
    }
    /// A Retry with a reason.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        Outcome::Retry(reason.to_string())
    }
    /// A Permanent failure with a reason.
    pub fn permanent(reason: impl std::fmt::Display) -> Self {
        Outcome::Permanent(reason.to_string())
    }
    /// The outcome of a message whose handler's own publish failed with `e` (`reason`
    /// says which): permanent where publishing it again can never pass (a message too
    /// large for the broker, see [`PublishError::never_passes`]), else a retry.
    pub fn publish_failed(reason: impl std::fmt::Display, e: &PublishError) -> Self {
        if e.never_passes() {
            Outcome::Permanent(format!("{reason}: {e}"))
        } else {
            Outcome::Retry(format!("{reason}: {e}"))
        }
    }
    /// Retries done in place ran out: dead-lettered as `retries-exhausted`.
    pub fn exhausted(reason: impl std::fmt::Display) -> Self {
        Outcome::Exhausted(reason.to_string())
    }
    /// A Drop with a reason.
    pub fn drop(reason: impl std::fmt::Display) -> Self {
        Outcome::Drop(reason.to_string())
    }
    /// The metric label of this outcome.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Success { .. } => "success",
            Outcome::Retry(_) => "retry",
            Outcome::Permanent(_) | Outcome::Exhausted(_) => "dead_letter",
            Outcome::Drop(_) => "drop",
            Outcome::Interrupted(_) => "interrupted",
        }
    }
}

/// What a processor may know about the delivery it handles, and what it may do beyond
/// returning an outcome (publish with confirms, dead-letter a part, tag a retry).
#[derive(Debug, Clone)]
pub struct MessageContext {
    /// Exchange the message was first published to (survives retries).
    pub exchange: String,
    /// Routing key it was first published with (survives retries).
    pub routing_key: String,
    /// 0-based attempt number (`x-retry-count` of the delivery).
    pub attempt: u32,
    /// The broker's redelivered flag (a previous delivery was not acked).
    pub redelivered: bool,
    /// AMQP message id, if the producer set one.
    pub message_id: Option<String>,
    /// AMQP correlation id, if set.
    pub correlation_id: Option<String>,
    /// Where the message has no id and its processor knows inputs by their body
    /// ([`MessageProcessor::knows_inputs_by_body`]): a digest of its body, which its
    /// outputs' ids are derived from instead (see `publisher::output_message_id`).
    pub(crate) content_id: Option<String>,
    /// AMQP `timestamp` property (seconds since the epoch), if the producer set one: when
    /// the message was first published (retries and replays keep it).
    pub timestamp: Option<u64>,
    /// All headers of the delivery.
    pub headers: FieldTable,
    /// What this attempt asked of its Retry: headers to add, the shortest wait.
    pub(crate) retry_notes: Arc<Mutex<RetryNotes>>,
    /// Progress headers ([`crate::batch::Progress`]): about this message's parts, so a
    /// part dead-lettered as a message of its own does not carry them.
    pub(crate) progress_headers: Arc<Mutex<Vec<&'static str>>>,
    /// The processor's [`MessageProcessor::progress_headers`]; None outside a runtime.
    pub(crate) declared_progress: Option<&'static [&'static str]>,
    /// The session's publisher; None outside a runtime (unit tests).
    pub(crate) publisher: Option<Publisher>,
    /// Marks this handler as awaiting the confirm of a part's dead letter or of its own
    /// publish, which a stop then waits for as for its outcome's; None outside a runtime.
    pub(crate) confirming: Option<Arc<crate::session::Confirming>>,
    /// `storagetier_publish_failures_total` of the queue: a handler's own publishes count
    /// there as outcomes do, or a destination that refuses every one would never show.
    pub(crate) publish_failures: metrics::Counter,
    /// The delivery's properties (kept on dead letters).
    pub(crate) properties: lapin::BasicProperties,
    /// The trace this message is handled in (continued from its `traceparent`).
    pub(crate) trace: crate::trace::TraceContext,
    /// Cancelled when the session that delivered this message ends (shutdown or a lost
    /// connection): long waits should stop; the message will be redelivered if not acked.
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// Set when the session starts ending: the moment unfinished handlers are stopped.
    pub(crate) stops_at: Arc<std::sync::OnceLock<std::time::Instant>>,
    /// Until when the message may be held (two thirds of the consumer timeout after its
    /// delivery, as a whole message's retry may wait for its confirm): how long a part's
    /// dead letter may wait for its confirm. None outside a runtime.
    pub(crate) held_until: Option<std::time::Instant>,
    /// `[amqp] max_records` (0: no limit), see [`MessageContext::too_many_records`].
    pub(crate) max_records: usize,
    /// A third of the broker's consumer timeout after the delivery (see
    /// [`MessageContext::checkpoint_in`]); None outside a runtime.
    pub(crate) checkpoint_at: Option<std::time::Instant>,
    /// See [`MessageContext::came_back`].
    pub(crate) came_back: bool,
    /// See [`MessageContext::received_at`]; None outside a runtime.
    pub(crate) received_at: Option<std::time::SystemTime>,
    /// Counts held until the outcome is settled (see [`MessageContext::count_when_done`]).
    pub(crate) when_done: Arc<Mutex<Vec<(metrics::Counter, u64)>>>,
}

/// The last receipt stamp given, in nanoseconds since the epoch.
static LAST_RECEIPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A receipt time for the delivery taken now: the clock's, but a microsecond past the
/// last one given at least, so that deliveries taken in order have times in that order
/// (and apart at the microsecond that services keep) even where the clock stood still or
/// stepped back.
pub(crate) fn receipt_stamp() -> std::time::SystemTime {
    use std::sync::atomic::Ordering;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let after = |last: u64| now.max(last.saturating_add(1_000));
    let last = LAST_RECEIPT
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| Some(after(l)))
        .unwrap_or_else(|last| last);
    let given = after(last);
    std::time::UNIX_EPOCH + std::time::Duration::from_nanos(given)
}

/// What an attempt asked of its Retry outcome (see [`MessageContext::set_retry_header`] and
/// [`MessageContext::retry_no_sooner_than`]).
#[derive(Debug, Default)]
pub(crate) struct RetryNotes {
    /// Headers the retried message (and a dead letter) carries.
    headers: Vec<(String, String)>,
    /// The shortest wait before the retry; zero: the attempt's own tier.
    wait: std::time::Duration,
    /// The Retry is an outage's (see [`MessageContext::retry_for_outage`]).
    outage: bool,
    /// An Interrupted outcome gives the message back (see [`MessageContext::keep_place`]).
    keep_place: bool,
    /// Tries made in place beyond the delivery's own (see
    /// [`MessageContext::tried_in_place`]).
    tries_in_place: u32,
}

impl MessageContext {
    /// Awaits `wait`, a wait of the handler's own (a backoff before it tries again, an
    /// outage waited out), as a handler not at work: where the session's broker node is cut
    /// off from its cluster (the queue's messages going to other consumers meanwhile), a
    /// session whose handlers all only wait is ended as an idle one is (and `cancelled`
    /// completes), not kept until the wait is over. In a context for tests
    /// ([`MessageContext::for_test`]), only `wait`.
    pub async fn waiting<T>(&self, wait: impl std::future::Future<Output = T>) -> T {
        match &self.confirming {
            Some(c) => c.waiting(wait).await,
            None => wait.await,
        }
    }

    /// A context for calling a processor directly in unit tests (publishing unavailable).
    pub fn for_test(exchange: &str, routing_key: &str, attempt: u32) -> Self {
        Self {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
            attempt,
            redelivered: false,
            message_id: None,
            correlation_id: None,
            content_id: None,
            timestamp: None,
            headers: FieldTable::default(),
            retry_notes: Arc::default(),
            progress_headers: Arc::default(),
            declared_progress: None,
            publisher: None,
            confirming: None,
            publish_failures: metrics::Counter::noop(),
            properties: Default::default(),
            cancel: Default::default(),
            stops_at: Arc::default(),
            trace: crate::trace::TraceContext::continue_from(&FieldTable::default()),
            max_records: 0,
            held_until: None,
            checkpoint_at: None,
            came_back: attempt > 0,
            received_at: None,
            when_done: Arc::default(),
        }
    }

    /// When this process took the delivery from the broker: in the order deliveries came
    /// (each at least a microsecond after the one before it, whatever order their
    /// handlers run in), for a service that orders events by when it saw them. The
    /// clock's time now outside a runtime.
    pub fn received_at(&self) -> std::time::SystemTime {
        self.received_at.unwrap_or_else(std::time::SystemTime::now)
    }

    /// Whether this delivery came back the framework's way — a retry from its tier, a
    /// replayed dead letter: through the default exchange to the service's own queue —
    /// so that headers an attempt of this service wrote (progress marks) are its own. On a
    /// producer's delivery they are the producer's, and ignored (and replaced on its retry
    /// and dead letter, see [`crate::batch::Progress::resume`]): a forged
    /// `x-event-forwarder-done` had an event reported delivered and never posted.
    /// (Outside a runtime, [`MessageContext::for_test`]: whether `attempt` > 0.)
    pub fn came_back(&self) -> bool {
        self.came_back
    }

    /// How long this handler may go on before it should return a Retry carrying its
    /// progress: until a third of the broker's consumer timeout has passed since the delivery
    /// (past the whole of it, the broker closes the channel and redelivers the message as
    /// it came — every part done meanwhile done again, at every delivery). None outside a
    /// runtime.
    pub fn checkpoint_in(&self) -> Option<std::time::Duration> {
        self.checkpoint_at
            .map(|t| t.saturating_duration_since(std::time::Instant::now()))
    }

    /// A context whose [`MessageContext::checkpoint_in`] is `left` from now (unit tests).
    pub fn with_checkpoint_in(mut self, left: std::time::Duration) -> Self {
        self.checkpoint_at = Some(std::time::Instant::now() + left);
        self
    }

    /// A context whose session is ending with `left` to go (unit tests of processors
    /// watching [`MessageContext::time_left`]).
    pub fn with_time_left(self, left: std::time::Duration) -> Self {
        let _ = self.stops_at.set(std::time::Instant::now() + left);
        self
    }

    /// The outcome of a message holding `n` records, more than `[amqp] max_records`: it
    /// is dead-lettered whole, before any record is handled. Each bad record of a batch is
    /// dead-lettered on its own, so a body of tiny records (a 16 MiB array of `{}` is 5.6
    /// million) would otherwise flood the dead-letter queue for hours.
    pub fn too_many_records(&self, n: usize) -> Option<Outcome> {
        (self.max_records > 0 && n > self.max_records).then(|| {
            Outcome::permanent(format!(
                "{n} records in one message, more than [amqp] max_records = {} \
                 (raise it for a producer that sends larger batches, then replay)",
                self.max_records
            ))
        })
    }

    /// Adds `n` to `counter` once this message's outcome is published and its ack sent,
    /// not for an attempt that ends in a retry — one the handler returned, or one the
    /// framework made of an outcome the broker refused: a per-record counter incremented
    /// in the handler counted the message's records again at every such attempt. Counted
    /// at once outside a runtime ([`MessageContext::for_test`]).
    pub fn count_when_done(&self, counter: metrics::Counter, n: u64) {
        if self.publisher.is_none() {
            counter.increment(n);
        } else if let Ok(mut held) = self.when_done.lock() {
            held.push((counter, n));
        }
    }

    /// The counts [`MessageContext::count_when_done`] held, for the ack of an outcome
    /// `label` (none for a retry).
    pub(crate) fn when_done(&self, label: &str) -> Vec<(metrics::Counter, u64)> {
        let held = self
            .when_done
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default();
        if label == "retry" { Vec::new() } else { held }
    }

    /// Sets a string header carried by the retried message if this attempt returns Retry,
    /// and by its dead letter if it ends in one (e.g. which destinations already got their
    /// copy, so a retry or a replay skips them).
    /// A header the framework writes itself (`x-retry-count`, `x-original-*`,
    /// `traceparent`…, see [`crate::headers::is_reserved`]) is refused with a warning.
    pub fn set_retry_header(&self, key: &str, value: &str) {
        if crate::headers::is_reserved(key) {
            tracing::warn!(
                header = %crate::telemetry::LogText(key),
                "a processor's retry header may not be one the framework writes: ignored"
            );
            return;
        }
        if let Ok(mut n) = self.retry_notes.lock() {
            n.headers.retain(|(k, _)| k != key);
            n.headers.push((key.to_string(), value.to_string()));
        }
    }

    /// Asks that a Retry outcome of this attempt wait at least `wait` (a peer's
    /// `Retry-After`, say): the retry goes through the first tier of `[retry] delays_ms`
    /// that is at least that long (the longest if none is), never a shorter one than the
    /// attempt's own. The attempt counts as one as always; the longest of several calls
    /// holds.
    pub fn retry_no_sooner_than(&self, wait: std::time::Duration) {
        if let Ok(mut n) = self.retry_notes.lock() {
            n.wait = n.wait.max(wait);
        }
    }

    /// The wait asked for with [`MessageContext::retry_no_sooner_than`] (zero: none).
    pub(crate) fn retry_wait(&self) -> std::time::Duration {
        self.retry_notes.lock().map(|n| n.wait).unwrap_or_default()
    }

    /// Marks a Retry of this attempt as caused by an outage of something the processor
    /// needs (its object store, its database, an endpoint), not by the message: such
    /// attempts do not count toward `[retry] max_attempts` while the outage has lasted less
    /// than `[retry] max_outage_ms`, and their delay grows with the outage's age. A store
    /// down for two hours would otherwise dead-letter the whole backlog.
    pub fn retry_for_outage(&self) {
        if let Ok(mut n) = self.retry_notes.lock() {
            n.outage = true;
        }
    }

    /// Whether [`MessageContext::retry_for_outage`] was called in this attempt.
    pub(crate) fn outage(&self) -> bool {
        self.retry_notes.lock().map(|n| n.outage).unwrap_or(false)
    }

    /// Asks that an [`Outcome::Interrupted`] of this attempt give the message back to its
    /// queue, in its place, even while the session runs (otherwise it is a Retry): for a
    /// processor that keeps queue order and waits out an outage of what it needs longer
    /// than it may hold the message (a third of the consumer timeout). It is handed out
    /// again at once, so the processor bounds how long (not counted as an attempt; before
    /// RabbitMQ 4.3 each give-back counts toward a quorum queue's delivery limit).
    pub fn keep_place(&self) {
        if let Ok(mut n) = self.retry_notes.lock() {
            n.keep_place = true;
        }
    }

    /// Whether [`MessageContext::keep_place`] was called in this attempt.
    pub(crate) fn keeps_place(&self) -> bool {
        self.retry_notes
            .lock()
            .map(|n| n.keep_place)
            .unwrap_or(false)
    }

    /// The W3C `traceparent` of this message's handling, for calls the processor makes
    /// (e.g. an HTTP request), so they join the message's trace.
    pub fn traceparent(&self) -> String {
        self.trace.traceparent()
    }

    /// The input's W3C `tracestate`, when it is passed on, to go with [`Self::traceparent`].
    pub fn tracestate(&self) -> Option<&str> {
        self.trace.tracestate.as_deref()
    }

    /// True once the session that delivered this message is ending.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Completes when the session that delivered this message ends (SIGTERM or a lost
    /// connection): a processor waiting or backing off selects on it to stop early.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    /// Once the session is ending, how long this handler has before it is stopped (its
    /// message then goes back to the queue as it came, whatever it did meanwhile): a
    /// processor of many parts stops in time to return a Retry carrying its progress.
    /// None while the session runs; zero once the connection is lost.
    pub fn time_left(&self) -> Option<std::time::Duration> {
        self.stops_at
            .get()
            .map(|t| t.saturating_duration_since(std::time::Instant::now()))
    }

    /// This attempt tried its work `n` times in all, retrying in place (ordered
    /// processing): a dead letter made now counts them in `x-retry-count`, as retries
    /// through the tiers would have been counted. Set back to 1 before dead-lettering
    /// something that was tried once.
    pub fn tried_in_place(&self, n: u32) {
        if let Ok(mut notes) = self.retry_notes.lock() {
            notes.tries_in_place = n.saturating_sub(1);
        }
    }

    /// The tries beyond the delivery's own this attempt made (see [`Self::tried_in_place`]).
    fn tries_in_place(&self) -> u32 {
        self.retry_notes
            .lock()
            .map(|n| n.tries_in_place)
            .unwrap_or(0)
    }

    /// Headers set with [`MessageContext::set_retry_header`].
    pub fn retry_headers(&self) -> Vec<(String, String)> {
        self.retry_notes
            .lock()
            .map(|n| n.headers.clone())
            .unwrap_or_default()
    }

    /// The delivery this context is about, as the publisher derives messages from it.
    pub(crate) fn origin(&self) -> Origin<'_> {
        Origin {
            message_id: self.message_id.as_deref(),
            content_id: self.content_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            exchange: &self.exchange,
            routing_key: &self.routing_key,
            // A dead letter's `x-retry-count` counts the tries made in place too.
            attempt: self.attempt.saturating_add(self.tries_in_place()),
            headers: &self.headers,
            properties: &self.properties,
            trace: &self.trace,
        }
    }

    /// Publishes one message now, persistently, and waits for the broker's confirm.
    pub async fn publish(&self, p: Publication) -> Result<(), PublishError> {
        let published = match (&self.publisher, &self.confirming) {
            // Marked as a dead letter's: stopped mid-confirm by a drain, its handler would
            // lose the progress marks of what it published, and a redelivery publish all
            // of it again.
            (Some(pb), Some(c)) => c.awaiting(pb.publish(&self.origin(), p)).await,
            (Some(pb), None) => pb.publish(&self.origin(), p).await,
            (None, _) => Err(PublishError::NoChannel),
        };
        self.count_failure(published)
    }

    /// `r`, counted in `storagetier_publish_failures_total` if it failed.
    fn count_failure(&self, r: Result<(), PublishError>) -> Result<(), PublishError> {
        if let Err(e) = &r
            && self.publisher.as_ref().is_none_or(|p| p.failure_counts(e))
        {
            self.publish_failures.increment(1);
        }
        r
    }

    /// Dead-letters `body` (a part of this message, e.g. one bad record of a batch) with
    /// the full dead-letter envelope (`x-error-kind: permanent`), waiting for the confirm;
    /// the rest goes on.
    pub async fn dead_letter(&self, body: Vec<u8>, error: &str) -> Result<(), PublishError> {
        self.dead_letter_kind(body, error, crate::headers::KIND_PERMANENT, None)
            .await
    }

    /// As [`Self::dead_letter`], for a part whose retries ran out in place
    /// (`x-error-kind: retries-exhausted`).
    pub async fn dead_letter_exhausted(
        &self,
        body: Vec<u8>,
        error: &str,
    ) -> Result<(), PublishError> {
        self.dead_letter_kind(body, error, crate::headers::KIND_RETRIES_EXHAUSTED, None)
            .await
    }

    /// Which part of its message this delivery was, where it is a replayed dead letter of
    /// one part of a batch ([`crate::headers::BATCH_PART`]).
    pub fn batch_part(&self) -> Option<String> {
        crate::headers::get_str(&self.headers, crate::headers::BATCH_PART)
    }

    /// Dead-letters `body` as `kind`; `part` names which part of the message it is.
    pub(crate) async fn dead_letter_kind(
        &self,
        body: Vec<u8>,
        error: &str,
        kind: &str,
        part: Option<&str>,
    ) -> Result<(), PublishError> {
        let Some(pb) = &self.publisher else {
            return self.count_failure(Err(PublishError::NoChannel));
        };
        // The part is a message of its own: the whole message's progress marks (record
        // indexes, say) would name its parts wrongly, and a replay would skip it. What
        // the attempt noted about the whole message otherwise (project-ingest's first
        // receipt, which orders an update without a time of its own) goes with the part
        // too: a replayed part stamped anew could overwrite a newer update.
        let progress = self
            .progress_headers
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default();
        let notes: Vec<(String, String)> = self
            .retry_headers()
            .into_iter()
            .filter(|(k, _)| !progress.contains(&k.as_str()))
            .collect();
        let mut headers;
        let mut origin = self.origin();
        if !progress.is_empty() || part.is_some() || !notes.is_empty() {
            headers = crate::headers::without(&self.headers, &progress);
            for (k, v) in &notes {
                crate::headers::set_str(&mut headers, k, v);
            }
            // A replayed part (one record) dead-lettered again is still that part of its
            // first message, not part 0 of the one-record message it now is: ids and
            // idempotency keys derived from its place stay those of its first delivery.
            if let Some(part) = part
                && self.batch_part().is_none()
            {
                crate::headers::set_str(&mut headers, crate::headers::BATCH_PART, part);
            }
            origin.headers = &headers;
        }
        let publish = pb.dead_letter(&origin, body, error, kind, self.held_until);
        let published = match &self.confirming {
            Some(c) => c.awaiting(publish).await,
            None => publish.await,
        };
        self.count_failure(published)
    }

    /// Earlier attempts that count toward `[retry] max_attempts`: those that finished no
    /// part of the message (see [`crate::headers::PROGRESS_ATTEMPTS`]). With `max_attempts`,
    /// whether a retry of this attempt without progress would be dead-lettered.
    pub fn counted_attempts(&self) -> u32 {
        let progressed = crate::headers::get_int(&self.headers, crate::headers::PROGRESS_ATTEMPTS)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0);
        self.attempt - progressed.min(self.attempt)
    }

    /// Whether this attempt finished parts of the message (a [`crate::batch::Progress`]
    /// wrote its header: it writes one only when it marked a part done), given the retry
    /// headers it wrote.
    pub(crate) fn made_progress(&self, written: &[(String, String)]) -> bool {
        let Ok(progress) = self.progress_headers.lock() else {
            return false;
        };
        // An emptied progress (`Progress::clear`) finished nothing.
        written
            .iter()
            .any(|(k, v)| progress.contains(&k.as_str()) && v != "[]")
    }

    /// Notes `header` as a progress header of this message (see `progress_headers`).
    pub(crate) fn note_progress_header(&self, header: &'static str) {
        debug_assert!(
            self.declared_progress
                .is_none_or(|declared| declared.contains(&header)),
            "progress header {header} is not among the processor's progress_headers()"
        );
        if let Ok(mut v) = self.progress_headers.lock()
            && !v.contains(&header)
        {
            v.push(header);
        }
    }
}

/// A service's message handler; the framework does decoding, publishing and acking.
#[async_trait]
pub trait MessageProcessor: Send + Sync + 'static {
    /// The JSON shape of input messages; a body that does not fit is Permanent.
    type Input: DeserializeOwned + Send + 'static;

    /// Handles one decoded message. Must be idempotent: delivery is at-least-once.
    async fn handle(&self, input: Self::Input, ctx: &MessageContext) -> Outcome;

    /// The headers its [`crate::batch::Progress`] marks are kept in (every name it passes
    /// to `Progress::resume`), and any other retry header it reads back on a later
    /// attempt (project-ingest's receipt time). On a delivery that did not come back the framework's way
    /// they are a producer's: removed before the processor, its retries and its dead
    /// letters see them — a retry or dead letter made before the processor read its marks
    /// would otherwise carry the producer's, believed when it came back.
    fn progress_headers(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether an input without a message id is known by its body: true where one body
    /// coming again can only be that message again (a redelivery, a producer's re-send),
    /// and its outputs then get ids derived from the body, kept across redeliveries,
    /// retries and replays, so a consumer can drop a re-sent one. False (the default)
    /// where one body may come again as a new message — project-ingest's updates A, B, A
    /// of one project carry one `updated` time — whose outputs must not share the first's
    /// ids: each attempt's outputs then get fresh ids.
    fn knows_inputs_by_body(&self) -> bool {
        false
    }

    /// Why this processor takes no message of this kind (its routing key, say), or None:
    /// such a message is dropped before its body is decoded, so a producer's other
    /// messages on a broad binding are not dead-lettered for a shape they never had.
    fn ignores(&self, _ctx: &MessageContext) -> Option<String> {
        None
    }
}

/// Where a processor listens and where its successes go (the original `ProcessorConfiguration`).
#[derive(Debug, Clone)]
pub struct ProcessorConfiguration<P> {
    /// Subscription, output key and other exchanges published to.
    pub binding: crate::cli::Binding,
    /// The handler.
    pub processor: P,
}

impl<P> ProcessorConfiguration<P> {
    /// A configuration with one binding key.
    pub fn new(exchange: &str, routing_key: &str, output_routing_key: &str, processor: P) -> Self {
        Self {
            binding: crate::cli::Binding {
                exchange: exchange.to_string(),
                routing_keys: vec![routing_key.to_string()],
                output_routing_key: output_routing_key.to_string(),
                publishes_to: Vec::new(),
                ..Default::default()
            },
            processor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_that_cannot_be_serialised_is_an_error_not_an_empty_message() {
        let mut m = std::collections::BTreeMap::new();
        m.insert((1, 2), "tuple keys are not JSON object keys");
        assert!(Publication::json("x", "k", &m).is_err());
        let ok = Publication::json("x", "k", &serde_json::json!({"a": 1})).expect("serialises");
        assert_eq!(ok.body, br#"{"a":1}"#);
    }

    #[test]
    fn a_retry_header_may_not_forge_one_the_framework_writes() {
        // `x-retry-count: 0` on every retry would never reach `max_attempts`.
        let ctx = MessageContext::for_test("x", "k", 3);
        for forged in [
            "x-retry-count",
            "x-progress-attempts",
            "x-original-routing-key",
            "traceparent",
        ] {
            ctx.set_retry_header(forged, "0");
        }
        ctx.set_retry_header("x-my-progress", "[1]");
        assert_eq!(
            ctx.retry_headers(),
            vec![("x-my-progress".to_string(), "[1]".to_string())]
        );
    }
}

//! The event-forwarder processor, its settings and its `Service` wiring.

use std::path::PathBuf;
use std::time::Duration;

use framework::config::{Config, ConfigError, RetryConfig};
use framework::{BoxError, MessageContext, MessageProcessor, Outcome, Secret, Service};
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use crate::envelope::{Events, KinesisRecord, single_record_envelope, split};
use crate::forward::{Forwarder, IDEMPOTENCY_KEY, PostResult, Scope, idempotency_key};
use reqwest::header::{HeaderMap, HeaderValue};

/// What posting one event came to, in ordered mode's in-place retries included.
enum Posted {
    /// The endpoint's answer (or the first one, outside ordered mode).
    Result(PostResult),
    /// Ordered mode retried in place until `max_attempts`: why, and the POSTs this
    /// delivery made.
    Exhausted(String, u32),
    /// The session ended during an in-place retry.
    Interrupted(String),
    /// Ordered mode could hold the event no longer and hands it back in its place (its
    /// counted tries kept for its next delivery): why, and whether for an outage (the
    /// endpoint down) rather than error answers.
    HandedBack { why: String, outage: bool },
}

/// Exchange the events arrive on.
pub const INPUT_EXCHANGE: &str = "events";
/// Success messages go out as `<this>.success`.
pub const OUTPUT_ROUTING_KEY: &str = "storagetier.eventforwarder.event";
/// Retry header: the Kinesis records (0-based) already delivered or dead-lettered.
pub const DONE_HEADER: &str = "x-event-forwarder-done";
/// Retry header of an unordered batch stopped at the consumer-timeout checkpoint: the
/// record its retry begins with (the first this attempt did not try), so the records
/// behind ones that keep failing slowly are tried too, not dead-lettered untried.
pub const RESUME_HEADER: &str = "x-event-forwarder-resume";
/// Counter of POSTs by result (delivered | retry | rejected).
pub const POSTS_METRIC: &str = "storagetier_event_forwarder_posts_total";
/// Every `result` of [`POSTS_METRIC`], as docs/adapters.md lists them.
pub const POST_RESULTS: [&str; 3] = ["delivered", "retry", "rejected"];

/// The shortest `timeout_ms` taken: no POST over a network is answered sooner.
pub const MIN_TIMEOUT_MS: u64 = 100;

/// `[event_forwarder]` keys besides the framework's queue/output_exchange/http_listen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ForwarderSettings {
    /// http(s) URL events are POSTed to (required); shown without secret query values.
    #[serde(default, serialize_with = "framework::config::serialize_redacted_url")]
    pub endpoint: Option<String>,
    /// `Authorization` header value.
    #[serde(default)]
    pub token: Option<Secret>,
    /// File holding the token (trimmed), read at startup and again when the endpoint
    /// answers 401 or 403 (a rotated secret); exclusive with `token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Per-request timeout in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Keep queue order: retry in place instead of through the retry queues.
    #[serde(default)]
    pub ordered: bool,
    /// PEM file of CA certificates trusted for an https endpoint besides the system's trust
    /// store and the public CAs built in (a private CA the image does not carry).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

/// The CA certificates of `[event_forwarder] ca_file`, checked: readable, at least one,
/// each one a client can trust.
pub fn ca_certificates(s: &ForwarderSettings) -> Result<Vec<reqwest::Certificate>, ConfigError> {
    let key = "event_forwarder.ca_file";
    let Some(path) = &s.ca_file else {
        return Ok(Vec::new());
    };
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", path.display())))?;
    let bad = |why: String| ConfigError::new(key, format!("{}: {why}", path.display()));
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    // A certificate the TLS library cannot take fails only when a client is built.
    certs
        .iter()
        .fold(reqwest::Client::builder(), |b, c| {
            b.add_root_certificate(c.clone())
        })
        .build()
        .map_err(|e| bad(format!("not a usable CA certificate: {e}")))?;
    Ok(certs)
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// The endpoint URL, checked: present, http or https, no credentials in it.
pub fn endpoint_of(s: &ForwarderSettings) -> Result<url::Url, ConfigError> {
    let key = "event_forwarder.endpoint";
    let raw = s.endpoint.as_deref().map(str::trim).unwrap_or_default();
    if raw.is_empty() {
        return Err(ConfigError::new(
            key,
            "required: the http(s) URL events are POSTed to (set [event_forwarder] endpoint \
             or STORAGETIER__EVENT_FORWARDER__ENDPOINT)",
        ));
    }
    let url = url::Url::parse(raw).map_err(|e| ConfigError::new(key, format!("not a URL: {e}")))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        return Err(ConfigError::new(
            key,
            format!(
                "must be an http:// or https:// URL, not {}://",
                url.scheme()
            ),
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(key, "has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigError::new(
            key,
            "must not carry credentials; use token or token_file",
        ));
    }
    Ok(url)
}

/// The token from `token` or `token_file` (read now, trimmed), or None.
pub fn token_of(s: &ForwarderSettings) -> Result<Option<Secret>, ConfigError> {
    let token = match (&s.token, &s.token_file) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::new(
                "event_forwarder.token_file",
                "set either token or token_file, not both",
            ));
        }
        (Some(t), None) => {
            let t = t.expose().trim();
            if t.is_empty() {
                return Err(ConfigError::new("event_forwarder.token", "is empty"));
            }
            Some((Secret::new(t), "event_forwarder.token"))
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                ConfigError::new(
                    "event_forwarder.token_file",
                    format!(
                        "cannot read {}: {e}",
                        framework::config::secret_path_shown(path)
                    ),
                )
            })?;
            let t = text.trim();
            if t.is_empty() {
                return Err(ConfigError::new(
                    "event_forwarder.token_file",
                    format!("{} is empty", path.display()),
                ));
            }
            Some((Secret::new(t), "event_forwarder.token_file"))
        }
        (None, None) => None,
    };
    match token {
        Some((t, key)) => {
            if reqwest::header::HeaderValue::from_str(t.expose()).is_err() {
                return Err(ConfigError::new(
                    key,
                    "the token is not a valid HTTP header value (visible ASCII only)",
                ));
            }
            Ok(Some(t))
        }
        None => Ok(None),
    }
}

/// Asks this message's retry to honour the endpoint's `Retry-After`, if it sent one.
fn wait_for(ctx: &MessageContext, after: Option<Duration>) {
    if let Some(d) = after {
        ctx.retry_no_sooner_than(d);
    }
}

/// Time a retry needs to be published (with its confirm) once a stopping batch gives up.
const RETRY_PUBLISH_ROOM: Duration = Duration::from_secs(2);

/// Forwards each event (or each Kinesis record) to the endpoint.
pub struct EventForwarder {
    forwarder: Forwarder,
    ordered: bool,
    retry: RetryConfig,
    /// Ordered: what an endpoint outage has held so far (see [`EventForwarder::post`]).
    outage: std::sync::Mutex<OrderedOutage>,
}

/// Ordered mode's memory of an endpoint outage, across the give-backs that keep an event
/// in its place (each a new delivery, starting its tries over).
#[derive(Debug, Default)]
struct OrderedOutage {
    /// When a try first found the endpoint down, since which no try found it up.
    since: Option<std::time::Instant>,
    /// The event handed back (a digest of its id and body), its counted tries so far (an
    /// endpoint that answers errors between its outages still dead-letters it) and the
    /// outage it was handed back in, if it was (see [`EventForwarder::post`]).
    held: Option<Held>,
    /// The records of the batch handed back that were delivered before it was: its next
    /// delivery does not post them again. Posted again, each would meet the outage the
    /// batch was handed back in, take its outage clock and, once that ran out, be
    /// dead-lettered as exhausted — an event the endpoint had.
    delivered: Option<DeliveredBefore>,
}

/// The records a batch handed back had delivered (see [`OrderedOutage::delivered`]).
#[derive(Debug)]
struct DeliveredBefore {
    /// Which batch ([`batch_digest`]): only its next delivery skips them.
    batch: [u8; 32],
    /// Their indices in it, sorted.
    records: Vec<usize>,
    /// When it was handed back (stale after [`HELD_STALE`], as [`Held::at`]).
    at: std::time::Instant,
}

/// A digest naming one batch across its deliveries: its message id and every record's
/// posted body, in order (two records of one body are still two records).
fn batch_digest(ctx: &MessageContext, records: &[crate::envelope::KinesisRecord<'_>]) -> [u8; 32] {
    use sha2::Digest;
    let mut d = sha2::Sha256::new();
    d.update(ctx.message_id.as_deref().unwrap_or("").as_bytes());
    for r in records {
        let body = r.kinesis.get();
        d.update((body.len() as u64).to_be_bytes());
        d.update(body.as_bytes());
    }
    d.finalize().into()
}

/// An event handed back in its place, as its next delivery takes it up.
#[derive(Debug, Clone, Copy)]
struct Held {
    /// Which event ([`event_digest`]).
    digest: [u8; 32],
    /// Its tries counted toward `max_attempts` so far.
    counted: u32,
    /// When the outage it was handed back in began.
    outage_since: Option<std::time::Instant>,
    /// When it was handed back: its next delivery comes at once, so one not back within
    /// [`HELD_STALE`] was taken elsewhere (another replica, the broker's delivery limit)
    /// and, replayed later, starts afresh.
    at: std::time::Instant,
}

/// How long a hand-back's memory lasts (see [`Held::at`]): the longest a third of the
/// consumer timeout is taken to be, 10 minutes, and room to spare.
const HELD_STALE: Duration = Duration::from_secs(30 * 60);

/// A digest naming one event across its deliveries: its message id and what is posted.
fn event_digest(ctx: &MessageContext, body: &str) -> [u8; 32] {
    use sha2::Digest;
    let mut id = sha2::Sha256::new();
    id.update(ctx.message_id.as_deref().unwrap_or("").as_bytes());
    id.update([0]);
    id.update(body.as_bytes());
    id.finalize().into()
}

impl EventForwarder {
    /// A processor posting through `forwarder`; `ordered` retries in place using `retry`.
    pub fn new(forwarder: Forwarder, ordered: bool, retry: RetryConfig) -> Self {
        framework::telemetry::counters_from_zero(
            POSTS_METRIC,
            "event-forwarder: POSTs to the endpoint, by result",
            "result",
            &POST_RESULTS,
        );
        Self {
            forwarder,
            ordered,
            retry,
            outage: std::sync::Mutex::new(OrderedOutage::default()),
        }
    }

    fn outage(&self) -> std::sync::MutexGuard<'_, OrderedOutage> {
        self.outage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Posts once, or in ordered mode until it is not retryable, the attempts run out
    /// (Exhausted: dead-lettered as `retries-exhausted`) or the session ends (Interrupted:
    /// handed back unacked, so the event keeps its place). Ordered, tries that found the
    /// endpoint down (no connection, 429, 503…) are not counted, as an outage's retries
    /// are not in the default mode; one still down when the event may be held no longer
    /// (a third of the consumer timeout) waits out that time and hands the event back in
    /// its place, for up to `[retry] max_outage_ms` of outage — before, the event was
    /// dead-lettered at every third of the consumer timeout an outage lasted. Error
    /// answers with tries left at that point hand it back likewise (HandedBack), their
    /// count going with it to its next delivery.
    async fn post(&self, body: &str, key: Option<HeaderValue>, ctx: &MessageContext) -> Posted {
        let event = event_headers(key, ctx);
        let digest = self.ordered.then(|| event_digest(ctx, body));
        let mut attempt: u32 = 0;
        // The tries an earlier delivery of this event counted, when it was handed back
        // (taken: a hand-back leaves them again).
        // Taken by that event only, its outage going on from when it began: a batch handed
        // back posts again the records it delivered where its memory of them is gone (stale),
        // and one of them taking the count
        // would start the held record's tries over at every delivery; their 2xx clears
        // the outage, and an endpoint down for that one record only would never be down
        // for `max_outage_ms` — handed back at every checkpoint, for ever.
        let mut counted: u32 = {
            let mut outage = self.outage();
            match (outage.held, digest) {
                (Some(held), Some(d)) if held.digest == d && held.at.elapsed() < HELD_STALE => {
                    outage.held = None;
                    if let Some(t) = held.outage_since {
                        outage.since = Some(t);
                    }
                    held.counted
                }
                _ => 0,
            }
        };
        loop {
            let r = self.forwarder.post(body, &event).await;
            let label = match &r {
                PostResult::Delivered(_) => "delivered",
                PostResult::Retryable(..) => "retry",
                PostResult::Rejected(_) => "rejected",
            };
            metrics::counter!(POSTS_METRIC, "result" => label).increment(1);
            // `max_outage_ms = 0`: outages are counted as any failure.
            let down = matches!(r, PostResult::Retryable(_, _, Scope::Down))
                && self.retry.max_outage_ms > 0;
            if self.ordered {
                let mut outage = self.outage();
                if down {
                    outage.since.get_or_insert_with(std::time::Instant::now);
                } else {
                    outage.since = None;
                }
            }
            match r {
                PostResult::Retryable(e, after, _) if self.ordered => {
                    attempt = attempt.saturating_add(1);
                    if !down {
                        counted = counted.saturating_add(1);
                    }
                    if counted >= self.retry.max_attempts {
                        return Posted::Exhausted(
                            format!(
                                "gave up after {counted} attempts in place (ordered mode): {e}"
                            ),
                            attempt.max(counted),
                        );
                    }
                    // The endpoint's Retry-After, as the retry tiers would honour it.
                    let delay = self
                        .retry
                        .delay_at_least(attempt - 1, after.unwrap_or_default());
                    // The wait and the next POST must end before a third of the consumer
                    // timeout (30 minutes on RabbitMQ 3.10/3.11 whatever is configured):
                    // past it the broker takes the event back as it came, its attempts
                    // start over, and it is never dead-lettered. Handed back in its place
                    // instead, with its counted tries.
                    let next = Duration::from_millis(delay)
                        + self.forwarder.timeout()
                        + RETRY_PUBLISH_ROOM;
                    if ctx.checkpoint_in().is_some_and(|left| left < next) {
                        let d = digest.unwrap_or_else(|| event_digest(ctx, body));
                        if down {
                            return self.hold_through_outage(ctx, &e, d, counted, attempt).await;
                        }
                        // Tries left: it waits what it may of its delay and goes back in
                        // its place, its counted tries kept. Dead-lettered here,
                        // `max_attempts` could never keep it past a third of the consumer
                        // timeout (10 minutes at most), and once later events passed it,
                        // Rabble Rouser's endpoint answers its replay 204 unhandled.
                        let why = format!(
                            "the endpoint's errors outlast what one delivery may hold the \
                             event ({counted} of {} tries made): handed back in its place to \
                             keep the queue's order ({e})",
                            self.retry.max_attempts
                        );
                        let wait = Duration::from_millis(delay);
                        return self.hand_back(ctx, why, d, counted, wait, false).await;
                    }
                    tracing::warn!(error = %framework::telemetry::LogText(&e.to_string()), attempt, retry_in_ms = delay, "retrying in place");
                    tokio::select! {
                        // Only waiting: on a broker node cut off from its cluster the
                        // session ends meanwhile (the event is the majority's to give).
                        _ = ctx.waiting(tokio::time::sleep(Duration::from_millis(delay))) => {}
                        _ = ctx.cancelled() => {
                            return Posted::Interrupted(format!(
                                "shutting down during an in-place retry: {e}"
                            ));
                        }
                    }
                }
                other => return Posted::Result(other),
            }
        }
    }

    /// Ordered, the endpoint still down when the event may be held no longer: while the
    /// outage is younger than `[retry] max_outage_ms` the event waits out the time it may
    /// still be held (so a hand-back comes at most once a checkpoint, whatever the tiers
    /// or the endpoint's `Retry-After` say) and is handed back in its place, its counted
    /// tries kept for its next delivery; an older outage dead-letters it as exhausted.
    async fn hold_through_outage(
        &self,
        ctx: &MessageContext,
        e: &str,
        digest: [u8; 32],
        counted: u32,
        tries: u32,
    ) -> Posted {
        let down = self.outage().since.map_or(Duration::ZERO, |t| t.elapsed());
        if down >= Duration::from_millis(self.retry.max_outage_ms) {
            return Posted::Exhausted(
                format!(
                    "the endpoint was down for {} s, longer than [retry] max_outage_ms \
                     (ordered mode, kept in place meanwhile): {e}",
                    down.as_secs()
                ),
                tries,
            );
        }
        tracing::warn!(error = %framework::telemetry::LogText(e), down_for_s = down.as_secs(), "the endpoint is down: the event waits, then goes back in its place");
        let why = format!(
            "the endpoint is down: handed back in its place to keep the queue's order ({e})"
        );
        self.hand_back(ctx, why, digest, counted, Duration::MAX, true)
            .await
    }

    /// Waits `wait`, at most as long as the event may still be held, then hands it back in
    /// its place with its `counted` tries kept for its next delivery (the one event in
    /// flight, known again by `digest`).
    async fn hand_back(
        &self,
        ctx: &MessageContext,
        why: String,
        digest: [u8; 32],
        counted: u32,
        wait: Duration,
        outage: bool,
    ) -> Posted {
        let wait = ctx
            .checkpoint_in()
            .unwrap_or_default()
            .saturating_sub(RETRY_PUBLISH_ROOM)
            .min(wait);
        tracing::warn!(
            wait_s = wait.as_secs(),
            counted,
            "handing the event back in its place after a wait"
        );
        tokio::select! {
            _ = ctx.waiting(tokio::time::sleep(wait)) => {}
            _ = ctx.cancelled() => {}
        }
        let mut state = self.outage();
        let outage_since = state.since.filter(|_| outage);
        state.held = Some(Held {
            digest,
            counted,
            outage_since,
            at: std::time::Instant::now(),
        });
        drop(state);
        ctx.keep_place();
        Posted::HandedBack { why, outage }
    }

    async fn handle_single(&self, body: &RawValue, ctx: &MessageContext) -> Outcome {
        // Marked once delivered, like a batch's records: if the success message cannot be
        // published, the retry does not POST the event again.
        let mut progress = framework::batch::Progress::resume(ctx, DONE_HEADER);
        if progress.is_done("0") {
            return Outcome::success(json!({
                "kind": "event",
                "records": 1,
                "delivered": [],
                "dead_lettered": [],
                "skipped": [0],
            }));
        }
        // The message's own id (and the part of a batch it was, once replayed alone).
        let key = message_key(ctx, None, body.get());
        let r = match self.post(body.get(), key, ctx).await {
            Posted::Result(r) => r,
            Posted::Exhausted(e, tries) => {
                ctx.tried_in_place(tries);
                return Outcome::exhausted(e);
            }
            Posted::Interrupted(e) | Posted::HandedBack { why: e, .. } => {
                return Outcome::Interrupted(e);
            }
        };
        match r {
            PostResult::Delivered(status) => {
                progress.mark_done("0");
                Outcome::success(json!({
                    "kind": "event",
                    "records": 1,
                    "status": status,
                    "delivered": [0],
                    "dead_lettered": [],
                    "skipped": [],
                }))
            }
            PostResult::Retryable(e, after, scope) => {
                wait_for(ctx, after);
                outage_if(ctx, scope);
                Outcome::retry(e)
            }
            PostResult::Rejected(e) => Outcome::permanent(e),
        }
    }

    /// POSTs each record's `kinesis` value on its own. `lone`: the message is one record
    /// published alone, whose failure is the message's own (dead-lettered as it came and
    /// counted so), not a record of a batch wrapped in an envelope of one.
    async fn handle_records(
        &self,
        records: &[crate::envelope::KinesisRecord<'_>],
        lone: bool,
        ctx: &MessageContext,
    ) -> Outcome {
        let mut progress = framework::batch::Progress::resume(ctx, DONE_HEADER);
        let (mut delivered, mut dead, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
        // Ordered: the records this batch delivered before it was handed back, if this is
        // its next delivery (only one message is in flight).
        let before = self.outage().delivered.take();
        let had: Vec<usize> = match before {
            Some(before)
                if self.ordered
                    && before.at.elapsed() < HELD_STALE
                    && before.batch == batch_digest(ctx, records) =>
            {
                before.records
            }
            _ => Vec::new(),
        };
        let mut retry: Option<String> = None;
        let mut pending = 0usize;
        // Set once the endpoint as a whole cannot take more (unreachable, throttling, or
        // asking to wait): the records after it are not POSTed in this attempt (each would
        // be refused the same way, or time out in turn), only retried.
        let mut endpoint_unavailable = false;
        // Of those, the endpoint is down (not slow): the retry is an outage's.
        let mut endpoint_down = false;
        // The records that failed this attempt with an answer of their own (counted), with
        // their errors.
        let mut counted: Vec<(usize, String)> = Vec::new();
        // A retry of this attempt without progress would be dead-lettered as exhausted.
        // Then a slow or failing answer (no answer in time, 502, 504) holds nothing back:
        // it may be one record's trouble (a record crashing the endpoint behind a gateway),
        // and held back, the records after it were dead-lettered unsent with it, and held
        // back again at every replay. An endpoint that is down still holds the rest: its
        // retries are an outage's, not counted.
        let last =
            !self.ordered && ctx.counted_attempts().saturating_add(1) >= self.retry.max_attempts;
        // Whether this attempt has posted a record yet.
        let mut posted = false;
        // Where an earlier attempt stopped at the checkpoint: this one begins there and
        // comes round to the records before it. Ordered, a batch keeps its own order.
        let n = records.len();
        let start = framework::headers::get_str(&ctx.headers, RESUME_HEADER)
            .filter(|_| ctx.came_back() && !self.ordered)
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|s| *s < n)
            .unwrap_or(0);
        for (seen, i) in (start..n).chain(0..start).enumerate() {
            let r = &records[i];
            let mark = i.to_string();
            if progress.is_done(&mark) {
                skipped.push(i);
                continue;
            }
            if had.binary_search(&i).is_ok() {
                progress.mark_done(mark);
                skipped.push(i);
                continue;
            }
            if endpoint_unavailable {
                pending += 1;
                continue;
            }
            // The service is stopping and this POST might not end before the handler is:
            // the rest go with a retry carrying what is done. (A handler stopped mid-batch
            // gives its message back as it came, and every record posted meanwhile would
            // be posted again.) Ordered, the batch keeps its place instead; on its last
            // attempt it goes on too, since that retry would dead-letter it as exhausted —
            // unless this attempt delivered records: then the retry is progress, not counted.
            let room = self.forwarder.timeout() + RETRY_PUBLISH_ROOM;
            if !self.ordered
                && (progress.advanced()
                    || ctx.counted_attempts().saturating_add(1) < self.retry.max_attempts)
                && ctx.time_left().is_some_and(|left| left < room)
            {
                ctx.set_retry_header(RESUME_HEADER, &i.to_string());
                return Outcome::retry(format!(
                    "the service stopped after {seen} of {n} records; the rest go with this retry"
                ));
            }
            // A batch of many records to a slow endpoint can outlast the broker's consumer
            // timeout, which would redeliver it as it came (every record posted meanwhile
            // posted again, at every delivery): a third of the way there, the rest go with a retry
            // carrying what is done. Only once some record of this attempt is done, so the
            // retry counts as progress. Ordered too: the broker would take the batch back as
            // it came (every record posted again, at every delivery, for ever), so the rest
            // of this one batch gives up its place.
            // On the last attempt too (records timing out one after another made no
            // progress): its retry dead-letters the rest with what is done marked. And once
            // this attempt posted anything: records failing one after another (an endpoint
            // answering 500 to each) went on past the consumer timeout, and the broker took
            // back the batch, uncounted, with every other message on the channel — again at
            // every delivery. (Not before a first POST: a delivery that waited its turn
            // behind others is not failed for it; ordered, `post` hands an event back in
            // its place at the checkpoint itself.)
            if (progress.advanced() || last || (posted && !self.ordered))
                && ctx.checkpoint_in().is_some_and(|left| left < room)
            {
                if self.ordered {
                    tracing::warn!(
                        "an ordered batch outlasted a third of the consumer timeout: the rest \
                         of it goes on in a retry, behind the messages after it"
                    );
                }
                if !self.ordered {
                    ctx.set_retry_header(RESUME_HEADER, &i.to_string());
                }
                return Outcome::retry(format!(
                    "the batch outlasted a third of the broker's consumer timeout after {seen} \
                     of {n} records{}; the rest go with this retry",
                    retry
                        .as_deref()
                        .map(|first| format!(" (first failure: {first})"))
                        .unwrap_or_default()
                ));
            }
            let key = record_key(r, i, ctx, r.kinesis.get());
            posted = true;
            let rest_in_a_retry = |e: String| {
                Outcome::retry(format!(
                    "record {} of {}: {e}; the rest go with this retry",
                    i + 1,
                    records.len()
                ))
            };
            let result = match self.post(r.kinesis.get(), key, ctx).await {
                Posted::Result(res) => res,
                Posted::Exhausted(e, tries) if lone => {
                    ctx.tried_in_place(tries);
                    return Outcome::exhausted(e);
                }
                Posted::Exhausted(e, tries) => {
                    let why = format!("record {} of {}: {e}", i + 1, records.len());
                    let body = single_record_envelope(r.record);
                    ctx.tried_in_place(tries);
                    let published = progress.dead_letter_exhausted(mark, body, &why).await;
                    // The records after it were not retried in place (yet).
                    ctx.tried_in_place(1);
                    match published {
                        Ok(_) => dead.push(i),
                        Err(pe) => {
                            pending += 1;
                            retry.get_or_insert(format!(
                                "dead-lettering record {} failed: {pe}",
                                i + 1
                            ));
                        }
                    }
                    continue;
                }
                // Held in place through an outage, the batch keeps its place: a give-back
                // carries no progress, so the records this delivery posted are remembered
                // (`OrderedOutage::delivered`) and not posted again by its next delivery
                // here; on another replica they are, and endpoints drop them as had (Rabble
                // Rouser's by `sequenceNumber`, others by `Idempotency-Key`); gone on in a retry behind
                // the messages after it, its rest came after theirs, and Rabble Rouser's
                // listener dropped it as older than what it had. The rest of this one batch
                // goes on in a retry, as at the checkpoint, when this delivery dead-lettered
                // a record (handed back, it would dead-letter it again), or when error
                // answers, not an outage, outlasted the delivery: their tries must add up
                // to `max_attempts` across deliveries, and each delivery's re-posts of the
                // records before it would take another checkpoint's time.
                // At a stop too where a record was dead-lettered: handed back, the next
                // delivery dead-lettered it again (two copies, a replay posting it twice).
                Posted::HandedBack { why: e, outage }
                    if progress.advanced()
                        && (!dead.is_empty() || (!outage && !ctx.is_cancelled())) =>
                {
                    tracing::warn!(
                        "an ordered batch met failures it could not wait out in place: the rest \
                         of it goes on in a retry, behind the messages after it"
                    );
                    if outage {
                        outage_if(ctx, Scope::Down);
                    }
                    return rest_in_a_retry(e);
                }
                Posted::Interrupted(e) if progress.advanced() && !dead.is_empty() => {
                    return rest_in_a_retry(e);
                }
                Posted::Interrupted(e) | Posted::HandedBack { why: e, .. } => {
                    if self.ordered {
                        let batch = batch_digest(ctx, records);
                        let mut records: Vec<usize> =
                            delivered.iter().chain(&skipped).copied().collect();
                        records.sort_unstable();
                        self.outage().delivered = Some(DeliveredBefore {
                            batch,
                            records,
                            at: std::time::Instant::now(),
                        });
                    }
                    return Outcome::Interrupted(e);
                }
            };
            match result {
                PostResult::Delivered(_) => {
                    progress.mark_done(mark);
                    delivered.push(i);
                }
                PostResult::Rejected(e) if lone => return Outcome::permanent(e),
                PostResult::Rejected(e) => {
                    let why = format!("record {} of {}: {e}", i + 1, records.len());
                    let body = single_record_envelope(r.record);
                    match progress.dead_letter(mark, body, &why).await {
                        Ok(_) => {
                            tracing::warn!(record = i, error = %framework::telemetry::LogText(&e.to_string()), "record dead-lettered");
                            dead.push(i);
                        }
                        Err(pe) => {
                            pending += 1;
                            retry.get_or_insert(format!(
                                "dead-lettering record {} failed: {pe}",
                                i + 1
                            ));
                        }
                    }
                }
                PostResult::Retryable(e, after, scope) => {
                    wait_for(ctx, after);
                    let holds_back = scope.whole_endpoint() && (!last || scope == Scope::Down);
                    // The retry begins with the records held back, and comes round to this
                    // one: a record that alone brings a 502 or a timeout (one crashing the
                    // endpoint behind its gateway), begun with at every attempt, held the
                    // others back until the last.
                    if holds_back && !endpoint_unavailable && !self.ordered {
                        ctx.set_retry_header(RESUME_HEADER, &((i + 1) % n).to_string());
                    }
                    endpoint_unavailable |= holds_back;
                    endpoint_down |= scope == Scope::Down;
                    if scope != Scope::Down {
                        counted.push((i, e.clone()));
                    }
                    pending += 1;
                    retry.get_or_insert(format!("record {} of {}: {e}", i + 1, records.len()));
                }
            }
        }
        if let Some(first) = retry {
            // The last counted attempt of a batch that an endpoint down holds too: the
            // records whose own answers used it up are dead-lettered alone, as exhausted,
            // and the rest wait out the outage. Dead-lettered whole, the records the
            // endpoint was only too busy for (or that were never tried) went with them.
            if endpoint_down && last && !counted.is_empty() && !progress.advanced() {
                let mut kept = Vec::new();
                for (i, e) in counted {
                    let why = format!("record {} of {}: {e}", i + 1, records.len());
                    let body = single_record_envelope(records[i].record);
                    match progress
                        .dead_letter_exhausted(i.to_string(), body, &why)
                        .await
                    {
                        Ok(_) => {
                            tracing::warn!(record = i, error = %framework::telemetry::LogText(&e), "record dead-lettered: its retries are used up");
                            dead.push(i);
                            pending -= 1;
                        }
                        Err(pe) => {
                            tracing::warn!(record = i, error = %pe, "dead-lettering a record failed; the batch's retry counts");
                            kept.push((i, e));
                        }
                    }
                }
                counted = kept;
            }
            // Not while another record's own error answer counts: a busy endpoint's 503s
            // to one record kept a poison record's 500s from ever adding up.
            if endpoint_down && counted.is_empty() {
                outage_if(ctx, Scope::Down);
            }
            return Outcome::retry(format!(
                "{pending} of {} records not delivered yet; first: {first}",
                records.len()
            ));
        }
        // In the records' order, whichever record this attempt began with.
        for list in [&mut delivered, &mut dead, &mut skipped] {
            list.sort_unstable();
        }
        Outcome::success(json!({
            "kind": "kinesis",
            "records": records.len(),
            "delivered": delivered,
            "dead_lettered": dead,
            "skipped": skipped,
        }))
    }
}

#[framework::async_trait]
impl MessageProcessor for EventForwarder {
    type Input = Box<RawValue>;

    fn progress_headers(&self) -> &'static [&'static str] {
        &[DONE_HEADER, RESUME_HEADER]
    }

    async fn handle(&self, input: Box<RawValue>, ctx: &MessageContext) -> Outcome {
        match split(&input) {
            Events::Single(body) => self.handle_single(body, ctx).await,
            Events::NoRecords => {
                Outcome::Drop("a Kinesis envelope of no records: nothing to post".into())
            }
            Events::Kinesis(records) => match ctx.too_many_records(records.len()) {
                Some(o) => o,
                None => {
                    // A record published alone is split from the body itself.
                    let lone = matches!(records.as_slice(), [r] if std::ptr::eq(r.record, &*input));
                    self.handle_records(&records, lone, ctx).await
                }
            },
        }
    }
}

/// RabbitMQ's own consumer timeout, where `[amqp] consumer_timeout_ms = 0` leaves it.
const BROKER_CONSUMER_TIMEOUT_MS: u64 = 30 * 60 * 1000;

/// Refuses an ordered mode whose in-place retries can outlast the consumer timeout: the
/// broker would take the event back mid-retry and hand it out again, its count of
/// attempts starting over each time — retried for ever, never dead-lettered.
fn in_place_retries_fit(cfg: &Config<ForwarderSettings>) -> Result<(), ConfigError> {
    let limit = match cfg.amqp.consumer_timeout_ms {
        0 => BROKER_CONSUMER_TIMEOUT_MS,
        t => t,
    };
    let attempts = u64::from(cfg.retry.max_attempts);
    // The worst case: every wait the longest tier (an endpoint's Retry-After picks one
    // at least as long), every POST its whole timeout.
    let longest = cfg.retry.delays_ms.iter().copied().max().unwrap_or(0);
    let budget = attempts
        .saturating_sub(1)
        .saturating_mul(longest)
        .saturating_add(attempts.saturating_mul(cfg.settings.timeout_ms));
    if budget >= limit {
        return Err(ConfigError::new(
            "event_forwarder.ordered",
            format!(
                "in-place retries may take up to {budget} ms (`retry.max_attempts` POSTs of up \
                 to `event_forwarder.timeout_ms`, the longest `retry.delays_ms` between them), \
                 not within the consumer timeout of {limit} ms (`amqp.consumer_timeout_ms`, 0 = \
                 the broker's 30 minutes): the broker would take the event back and its \
                 attempts start over, never dead-lettered; lower `retry.max_attempts` or raise \
                 `amqp.consumer_timeout_ms`"
            ),
        ));
    }
    Ok(())
}

/// Refuses a POST timeout that leaves a batch no room before its checkpoint (a third of
/// the consumer timeout: see `MessageContext::checkpoint_in`): every attempt would post one
/// record and go on in a retry, a batch taking a retry delay per record — ordered, an
/// event that timed out once would be given up on at once, its in-place retry past the
/// checkpoint.
fn posts_fit_before_checkpoint(cfg: &Config<ForwarderSettings>) -> Result<(), ConfigError> {
    let checkpoint = cfg.amqp.checkpoint_after();
    let post = Duration::from_millis(cfg.settings.timeout_ms) + RETRY_PUBLISH_ROOM;
    if post * 2 > checkpoint {
        return Err(ConfigError::new(
            "event_forwarder.timeout_ms",
            format!(
                "{} ms leaves a batch too little room before it must go on in a retry (a third \
                 of the consumer timeout, {} ms: `amqp.consumer_timeout_ms`, taken as at most \
                 30 minutes since RabbitMQ 3.10 and 3.11 ignore a longer one); at most {} ms \
                 fits",
                cfg.settings.timeout_ms,
                checkpoint.as_millis(),
                (checkpoint / 2)
                    .saturating_sub(RETRY_PUBLISH_ROOM)
                    .as_millis()
            ),
        ));
    }
    Ok(())
}

/// The `Idempotency-Key` of record `i` of a message: the record's `eventID`, else the
/// message's id and the record's place in the batch it came in (a record replayed alone
/// keeps its place: `x-batch-part`); none when neither names it.
fn record_key(
    r: &KinesisRecord<'_>,
    i: usize,
    ctx: &MessageContext,
    posted: &str,
) -> Option<HeaderValue> {
    match &r.event_id {
        Some(e) => Some(idempotency_key(e)),
        None => message_key(ctx, Some(i.to_string()), posted),
    }
}

/// Marks a retry for an endpoint that is down (unreachable, throttling, unavailable,
/// moved) as an outage's: not counted toward `[retry] max_attempts` for up to
/// `max_outage_ms`, so an endpoint down for hours does not dead-letter every event sent
/// meanwhile. An error answer to one event, or a timeout, still counts.
fn outage_if(ctx: &MessageContext, scope: Scope) {
    if scope == Scope::Down {
        ctx.retry_for_outage();
    }
}

/// The `Idempotency-Key` from the message's own id: of the whole message, or of its part
/// (the place a record replayed alone had in its batch, `x-batch-part`, else `place`),
/// with the start of the SHA-256 of what is `posted`. The body is the same on every try
/// of the event, so the key is too; two events a producer sent under one id (a counter
/// restarted, two producers' schemes meeting) get two keys instead of the second being
/// answered from the endpoint's record of the first, and lost.
fn message_key(ctx: &MessageContext, place: Option<String>, posted: &str) -> Option<HeaderValue> {
    use sha2::Digest;
    let id = ctx.message_id.as_deref()?;
    let digest = hex::encode(&sha2::Sha256::digest(posted.as_bytes())[..8]);
    Some(match ctx.batch_part().or(place) {
        Some(part) => idempotency_key(&format!("{id}:{part}:{digest}")),
        None => idempotency_key(&format!("{id}:{digest}")),
    })
}

/// The headers of one event's POST: its `Idempotency-Key` (when something names it) and
/// the message's W3C trace context, so the endpoint's work joins the event's trace.
fn event_headers(key: Option<HeaderValue>, ctx: &MessageContext) -> HeaderMap {
    let mut h = HeaderMap::new();
    if let Some(k) = key {
        h.insert(IDEMPOTENCY_KEY, k);
    }
    if let Ok(tp) = HeaderValue::from_str(&ctx.traceparent()) {
        h.insert(framework::trace::TRACEPARENT, tp);
    }
    if let Some(ts) = ctx.tracestate().and_then(|t| HeaderValue::from_str(t).ok()) {
        h.insert(framework::trace::TRACESTATE, ts);
    }
    h
}

/// The event-forwarder service: `events` / `#` → HTTP POST.
pub struct EventForwarderService;

#[framework::async_trait]
impl Service for EventForwarderService {
    const NAME: &'static str = "event-forwarder";
    const ABOUT: &'static str = "POSTs each bus event to an HTTP endpoint";
    const SECTION: &'static str = "event_forwarder";
    type Settings = ForwarderSettings;
    type Processor = EventForwarder;

    fn binding(cfg: &Config<ForwarderSettings>) -> framework::Binding {
        framework::Binding {
            exchange: INPUT_EXCHANGE.to_string(),
            routing_keys: vec!["#".to_string()],
            output_routing_key: OUTPUT_ROUTING_KEY.to_string(),
            // Order holds across replicas only if one of them consumes at a time.
            single_active_consumer: cfg.settings.ordered,
            ..Default::default()
        }
    }

    /// Ordered mode holds one event at a time: a second one in flight could be posted
    /// while the first is retried in place. The shared `[amqp] prefetch` is for the
    /// other services.
    fn settle(cfg: &mut Config<ForwarderSettings>) {
        if cfg.settings.ordered {
            cfg.amqp.prefetch = 1;
            cfg.amqp.concurrency = 1;
        }
    }

    fn validate(cfg: &Config<ForwarderSettings>) -> Result<(), ConfigError> {
        let s = &cfg.settings;
        endpoint_of(s)?;
        token_of(s)?;
        ca_certificates(s)?;
        if s.timeout_ms < MIN_TIMEOUT_MS {
            // Seconds typed for milliseconds: every connection then "not made within" a
            // few ms, taken as the endpoint down and waited out for max_outage_ms.
            return Err(ConfigError::new(
                "event_forwarder.timeout_ms",
                format!(
                    "is {}: it is in milliseconds and must be at least {MIN_TIMEOUT_MS}",
                    s.timeout_ms
                ),
            ));
        }
        if s.ordered {
            in_place_retries_fit(cfg)?;
        }
        posts_fit_before_checkpoint(cfg)?;
        Ok(())
    }

    async fn processor(cfg: &Config<ForwarderSettings>) -> Result<EventForwarder, BoxError> {
        let s = &cfg.settings;
        let endpoint = endpoint_of(s)?;
        let token = token_of(s)?;
        if token.is_none() {
            tracing::warn!("no token or token_file: events are POSTed without Authorization");
        } else if endpoint.scheme() == "http"
            && !endpoint
                .host_str()
                .is_some_and(framework::config::is_this_machine)
        {
            tracing::warn!(
                "the token goes in the clear over http:// to another machine: anyone on the \
                 path can read it and post as this service; use https://"
            );
        }
        let mut fwd = Forwarder::new(
            endpoint.clone(),
            token.as_ref(),
            Duration::from_millis(s.timeout_ms),
            ca_certificates(s)?,
        )?;
        if let Some(file) = &s.token_file {
            fwd = fwd.reloading_token_from(file.clone());
        }
        tracing::info!(endpoint = %framework::config::redacted_url(endpoint.as_str()), ordered = s.ordered, timeout_ms = s.timeout_ms, "forwarding events");
        Ok(EventForwarder::new(fwd, s.ordered, cfg.retry.clone()))
    }
}

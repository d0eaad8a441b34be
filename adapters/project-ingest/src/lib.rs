//! project-ingest: Pluto project events (plain JSON, pluto-core's arrays of project
//! entries or Kinesis envelopes) → project and commission records in the database
//! (design §7).

pub mod event;
pub mod store;

use db::DatabaseUrl;
use framework::config::Config;
use framework::telemetry::LogText;
use framework::{
    Binding, BoxError, MessageContext, MessageProcessor, Outcome, Publication, Service, async_trait,
};
use serde::{Deserialize, Serialize};

use event::{Delivery, Parsed, items_delivered, normalize_time};
use store::{Applied, DeletedCommission, Store, StoredProject};

/// A success message: the project as stored, or what a commission's deletion deleted.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Announced {
    Project(StoredProject),
    Deletion(DeletedCommission),
}

impl Announced {
    /// Names its message, whatever the attempt (see the call).
    fn identity(&self, record: usize) -> String {
        match self {
            Announced::Project(p) => format!("record {record}: project {}", p.id),
            Announced::Deletion(d) => {
                format!("record {record}: commission {} deleted", d.commission_id)
            }
        }
    }
}

/// Header listing the 1-based records of a batch already dead-lettered (kept across retries).
pub const DEAD_LETTERED_HEADER: &str = framework::batch::DEAD_LETTERED_RECORDS;

/// Header carrying when a message first reached this service (RFC 3339, UTC), kept
/// across retries: the ordering key of an update without an `updated` time (plain, or a
/// Kinesis record without an arrival time) when the message has no AMQP `timestamp`, so an
/// older update returning from a retry tier loses to a newer one applied meanwhile.
pub const RECEIVED_HEADER: &str = "x-project-ingest-received";

/// Header carrying when this service first saw a message, by its own clock (RFC 3339,
/// UTC), kept across retries and replays: an event's own time (`updated`, a Kinesis
/// arrival) is believed only up to 5 minutes past it, the same at every attempt.
pub const FIRST_SEEN_HEADER: &str = "x-project-ingest-first-seen";

/// The longest one record of a batch is expected to take (its database calls): see
/// `Progress::pause_before`.
const RECORD_STEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Counter of handled events by `result` (stored, deleted, stale, missing, unknown_type,
/// retry_copy, invalid).
pub const EVENTS_METRIC: &str = "storagetier_projectingest_events_total";

/// Every `result` of [`EVENTS_METRIC`], as docs/adapters.md lists them.
pub const EVENT_RESULTS: [&str; 7] = [
    "stored",
    "deleted",
    "stale",
    "missing",
    "unknown_type",
    "retry_copy",
    "invalid",
];

/// One attempt's records by result, added to [`EVENTS_METRIC`] only when the attempt
/// settles the message: a retry handles every record again (a batch waiting for one
/// update's create stores the rest again), and counted at each attempt a batch of three
/// records gave six `stored` and six `invalid`.
#[derive(Default)]
struct Tally([u64; EVENT_RESULTS.len()]);

impl Tally {
    fn count(&mut self, result: &'static str) {
        if let Some(i) = EVENT_RESULTS.iter().position(|r| *r == result) {
            self.0[i] += 1;
        }
    }

    /// Adds the counts to the metric once the message's outcome is settled (not where
    /// the broker refuses it, and the message is retried: see
    /// [`MessageContext::count_when_done`]).
    fn record(&self, ctx: &MessageContext) {
        for (result, n) in EVENT_RESULTS.iter().zip(self.0) {
            if n > 0 {
                ctx.count_when_done(metrics::counter!(EVENTS_METRIC, "result" => *result), n);
            }
        }
    }
}

/// The exact log line (and Drop reason) for an update of an unknown project.
pub const MISSING_PROJECT: &str = "attempted to update a project that does not exist";

/// `[project_ingest]` keys besides the framework's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectIngestSettings {
    /// `postgres://…` or `sqlite://…` (unset = `<data_dir>/project-ingest.db`).
    #[serde(default)]
    pub database_url: Option<DatabaseUrl>,
    /// A file holding the PostgreSQL password of `database_url` (a mounted secret).
    #[serde(default)]
    pub database_password_file: Option<std::path::PathBuf>,
    /// Retries an update of a project not stored yet waits before it is dropped: with
    /// several handlers or instances an update can overtake its own `project-created`
    /// (or the create can be waiting in a retry tier).
    #[serde(default = "default_missing_project_retries")]
    pub missing_project_retries: u32,
    /// One replica consumes at a time (`x-single-active-consumer`): updates sharing an
    /// `updated` time and no publishing time are ordered by when a replica first saw each,
    /// by its own clock — across replicas, a few milliseconds between their clocks reorder
    /// them; one consuming replica keeps the queue's order.
    #[serde(default)]
    pub ordered: bool,
}

/// Six retries wait about 6.5 minutes on the default tiers (1 s, 5 s, 30 s, then 120 s):
/// longer than a create held by another instance that died without closing its connection
/// (the broker returns it after the heartbeat timeout, about half a minute) or climbing the
/// tiers itself through a database fault on its instance.
fn default_missing_project_retries() -> u32 {
    6
}

impl Default for ProjectIngestSettings {
    fn default() -> Self {
        Self {
            database_url: None,
            database_password_file: None,
            missing_project_retries: default_missing_project_retries(),
            ordered: false,
        }
    }
}

/// The project-ingest service.
pub struct ProjectIngest;

/// The message processor: validates events and applies them to the store.
pub struct ProjectProcessor {
    store: Store,
    output_exchange: String,
    success_key: String,
    missing_retries: u32,
    /// When receipts were last pruned (seconds since the epoch).
    pruned_at: std::sync::atomic::AtomicI64,
}

impl ProjectProcessor {
    /// A processor over `store`; extra projects of a batch go to `output_exchange`.
    pub fn new(store: Store, output_exchange: &str, output_routing_key: &str) -> Self {
        framework::telemetry::counters_from_zero(
            EVENTS_METRIC,
            "project-ingest: events, each once, by result on its message's final outcome",
            "result",
            &EVENT_RESULTS,
        );
        Self {
            store,
            output_exchange: output_exchange.to_string(),
            success_key: format!("{output_routing_key}.success"),
            missing_retries: default_missing_project_retries(),
            pruned_at: std::sync::atomic::AtomicI64::new(0),
        }
    }

    /// Sets how many retries an update of a project not stored yet waits for it.
    pub fn with_missing_retries(mut self, retries: u32) -> Self {
        self.missing_retries = retries;
        self
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }
}

#[async_trait]
impl MessageProcessor for ProjectProcessor {
    type Input = serde_json::Value;

    fn progress_headers(&self) -> &'static [&'static str] {
        // The receipt times too: kept for the retries like progress, a producer's on a
        // dead letter made before they were read would be believed on its replay.
        &[DEAD_LETTERED_HEADER, RECEIVED_HEADER, FIRST_SEEN_HEADER]
    }

    async fn handle(&self, input: serde_json::Value, ctx: &MessageContext) -> Outcome {
        let mut tally = Tally::default();
        let outcome = self.attempt(input, ctx, &mut tally).await;
        // A retry (or a delivery given back) handles its records again and counts them
        // then; like crash-router, each record is counted on its message's final outcome.
        if !matches!(outcome, Outcome::Retry(_) | Outcome::Interrupted(_)) {
            tally.record(ctx);
        }
        outcome
    }
}

impl ProjectProcessor {
    /// One attempt at `input`, its records' results counted in `tally`.
    async fn attempt(
        &self,
        input: serde_json::Value,
        ctx: &MessageContext,
        tally: &mut Tally,
    ) -> Outcome {
        // Counted before each record is copied and parsed into one of its own.
        let records = match &input {
            serde_json::Value::Array(a) => a.len(),
            v => v
                .get("Records")
                .and_then(serde_json::Value::as_array)
                .map_or(1, Vec::len),
        };
        if let Some(o) = ctx.too_many_records(records) {
            return o;
        }
        // When the message was published (AMQP timestamp), else its first receipt here.
        // A publishing time further ahead than any believed (a producer's clock gone
        // wrong) is not one: the first receipt stands. Decided once, at the first
        // attempt, and kept for the retries in a header: decided again, a time refused as
        // too far ahead came within bounds minutes later, and a retried update jumped
        // ahead of updates applied meanwhile (and of every one received after it, dropped
        // as stale). A header further ahead than any believed is no earlier attempt's
        // (theirs were at most that far ahead then, less now): a producer's, ignored — as
        // are both headers on a delivery that did not come back through a retry or replay
        // (a message's first delivery, or the broker's redelivery of it: no attempt of
        // ours wrote them).
        let ours = |name: &str| {
            ctx.came_back()
                .then(|| framework::headers::get_str(&ctx.headers, name))
                .flatten()
                .and_then(|s| normalize_time(&s))
                .filter(|t| *t <= crate::event::latest_believable())
        };
        let decided = ours(RECEIVED_HEADER);
        let stamped = ctx
            .timestamp
            // 0 is some clients' "unset", not 1970: an update ordered there lost to
            // every stored version and was dropped.
            .filter(|&t| t != 0)
            .and_then(published_at)
            .filter(|t| *t <= crate::event::latest_believable());
        // A retry or dead letter of a release before this header was measured against its
        // first receipt: it still is.
        let mut first_seen = ours(FIRST_SEEN_HEADER).or_else(|| decided.clone());
        let received = match decided {
            Some(k) => k,
            None => match self.first_receipt(&input, ctx, stamped.clone()).await {
                Ok((k, noted)) => {
                    first_seen = first_seen.or(noted);
                    k
                }
                Err(e) => {
                    // A message of no event to store (an unknown type, no records, a body
                    // that is no event) needs no place: it ends now, not after the outage.
                    if let Some(now) = crate::event::time_key(received_at(ctx))
                        && !needs_the_database(&input, &now, &ctx.routing_key)
                    {
                        first_seen = first_seen.or_else(|| Some(now.clone()));
                        now
                    } else {
                        // The retry still carries the place this first attempt gives it (the
                        // database may stay down for all of them, and no receipt is noted
                        // meanwhile): its publishing time where believable, as a noted receipt
                        // would have given — the attempt's own time put it behind updates
                        // published after it, which it then overwrote — else this attempt's
                        // time. Not a redelivery's, whose first attempt's may be noted: looked
                        // up again.
                        if !again(ctx)
                            && let Some(now) = crate::event::time_key(received_at(ctx))
                        {
                            let key = stamped.unwrap_or_else(|| now.clone());
                            ctx.set_retry_header(RECEIVED_HEADER, &key);
                            ctx.set_retry_header(FIRST_SEEN_HEADER, &now);
                        }
                        return e.retry(ctx, format!("cannot note the message's receipt: {e}"));
                    }
                }
            },
        };
        ctx.set_retry_header(RECEIVED_HEADER, &received);
        let first_seen = first_seen.or_else(|| crate::event::time_key(received_at(ctx)));
        if let Some(seen) = &first_seen {
            ctx.set_retry_header(FIRST_SEEN_HEADER, seen);
        }
        let delivery = Delivery {
            received: &received,
            first_seen: first_seen.as_deref(),
            routing_key: &ctx.routing_key,
        };
        let items = items_delivered(&input, &delivery);
        let batch = items.len() > 1;
        let mut dead = framework::batch::Progress::resume(ctx, DEAD_LETTERED_HEADER);
        let mut stored = Vec::new();
        let mut dropped = Vec::new();
        let mut not_yet = Vec::new();
        let total = items.len();
        for (i, item) in items.into_iter().enumerate() {
            let n = i + 1;
            // Stopping (or near the consumer timeout) with records dead-lettered: the rest
            // go with a retry carrying them, not in a redelivery that sends them again.
            if let Some(why) = dead.pause_before(RECORD_STEP) {
                return Outcome::retry(format!(
                    "{why} after {i} of {total} records; the rest go with this retry"
                ));
            }
            // A record no attempt can store: the whole message when it is the only one,
            // else that record on its own, and the rest go on.
            let refused = async |dead: &mut framework::batch::Progress<'_>, e: String| {
                if !batch {
                    return Err(Outcome::permanent(e));
                }
                let reason = format!("record {n}: {e}");
                let body = serde_json::to_vec(&item.raw).unwrap_or_default();
                match dead.dead_letter(n.to_string(), body, &reason).await {
                    Ok(true) => {
                        tracing::warn!(record = n, error = %LogText(&e.to_string()), "dead-lettered record")
                    }
                    Ok(false) => {}
                    Err(pe) => {
                        return Err(Outcome::retry(format!(
                            "cannot dead-letter record {n}: {pe}"
                        )));
                    }
                }
                Ok(())
            };
            let ev = match &item.parsed {
                Err(e) => {
                    tally.count("invalid");
                    if let Err(o) = refused(&mut dead, e.to_string()).await {
                        return o;
                    }
                    continue;
                }
                Ok(Parsed::UnknownType(t)) => {
                    tracing::info!(record = n, kind = %LogText(&t.to_string()), "unknown message type, ignored");
                    tally.count("unknown_type");
                    dropped.push(format!("unknown message type `{t}`"));
                    continue;
                }
                Ok(Parsed::RetryCopy(count)) => {
                    tracing::info!(
                        record = n,
                        retry_count = *count,
                        "a retry copy another consumer published again (the original came here too), ignored"
                    );
                    tally.count("retry_copy");
                    dropped.push(format!(
                        "a copy another consumer of the exchange published again (retry_count {count}): the original came here too"
                    ));
                    continue;
                }
                // Nothing to do, no record to count.
                Ok(Parsed::NoEvent(why)) => {
                    tracing::info!("{why}, ignored");
                    dropped.push((*why).to_string());
                    continue;
                }
                Ok(Parsed::DeleteCommission(d)) => {
                    match db::bounded(self.store.delete_commission(d)).await {
                        Ok(done) => {
                            tracing::info!(commission = %LogText(&d.commission_id),
                                projects = done.deleted_projects.len(), "commission deleted");
                            tally.count("deleted");
                            stored.push((n, Announced::Deletion(done)));
                        }
                        // As a project's: an id PostgreSQL cannot index was retried until
                        // the attempts ran out, and took the batch's later records with it.
                        Err(e) if e.refuses_the_data() => {
                            tally.count("invalid");
                            let e = format!(
                                "the database refuses the deletion of commission {}: {e}",
                                d.commission_id
                            );
                            if let Err(o) = refused(&mut dead, e).await {
                                return o;
                            }
                        }
                        Err(e) => return e.retry(ctx, &e),
                    }
                    continue;
                }
                Ok(Parsed::Project(ev)) => ev,
            };
            match db::bounded(self.store.apply(ev)).await {
                Ok(Applied::Stored(p)) => {
                    // Debug, as the framework logs a success: a line per event is the log's
                    // biggest cost at volume, and `result="stored"` counts them.
                    tracing::debug!(project = %LogText(&p.id), event = ev.kind.as_str(), "project stored");
                    tally.count("stored");
                    stored.push((n, Announced::Project(*p)));
                }
                Ok(Applied::Missing) if ctx.counted_attempts() < self.missing_retries => {
                    not_yet.push(ev.id.clone());
                }
                Ok(Applied::Missing) => {
                    tracing::warn!(project = %LogText(&ev.id), "{MISSING_PROJECT}");
                    tally.count("missing");
                    dropped.push(MISSING_PROJECT.to_string());
                }
                Ok(Applied::Stale) => {
                    tally.count("stale");
                    tracing::info!(project = %LogText(&ev.id), version = ev.version.as_deref().unwrap_or("-"),
                        "stale {} ignored: a newer state is stored", ev.kind.as_str());
                    dropped.push(format!(
                        "stale {} for project {}: a newer state is stored",
                        ev.kind.as_str(),
                        ev.id
                    ));
                }
                // It had put the project in the commission before its deletion: the
                // project went with it, which is announced as the deletion's own were.
                Ok(Applied::Deleted(d)) if !d.deleted_projects.is_empty() => {
                    tracing::info!(project = %LogText(&ev.id), commission = %LogText(&d.commission_id),
                        "project deleted with its commission, by an older {} delivered after the deletion",
                        ev.kind.as_str());
                    tally.count("deleted");
                    stored.push((n, Announced::Deletion(*d)));
                }
                Ok(Applied::Deleted(d)) => {
                    tally.count("stale");
                    tracing::info!(project = %LogText(&ev.id), commission = %LogText(&d.commission_id),
                        "{} older than its commission's deletion ignored", ev.kind.as_str());
                    dropped.push(format!(
                        "{} for project {}: its commission {} was deleted after it",
                        ev.kind.as_str(),
                        ev.id,
                        d.commission_id
                    ));
                }
                Err(e) if e.refuses_the_data() => {
                    tally.count("invalid");
                    let e = format!("the database refuses project {}: {e}", ev.id);
                    if let Err(o) = refused(&mut dead, e).await {
                        return o;
                    }
                }
                Err(e) => return e.retry(ctx, &e),
            }
        }
        if !not_yet.is_empty() {
            // What this attempt stored is stored again by the next one: idempotent (an
            // equal ordering key re-applies), and the retry keeps this attempt's key.
            return Outcome::retry(format!(
                "project {} not stored yet (its project-created may be behind this update); \
                 waiting for it",
                not_yet.join(", ")
            ));
        }
        let mut stored = stored.into_iter();
        let Some((first_n, first)) = stored.next() else {
            if dropped.is_empty() {
                dropped.push("every record was dead-lettered".into());
            }
            return Outcome::drop(dropped.join("; "));
        };
        // Each announcement named by its record, not its body (which holds the time of
        // this attempt's write): every attempt's copy has one message id.
        let extra: Result<Vec<Publication>, _> = stored
            .map(|(n, a)| {
                Publication::json(&self.output_exchange, &self.success_key, &a)
                    .map(|x| x.with_identity(a.identity(n)))
            })
            .collect();
        // The first too: a redelivery may store a record this attempt dropped, and announce
        // it first.
        let named = first.identity(first_n);
        match extra {
            Ok(extra) => Outcome::success(first)
                .with_extra(extra)
                .with_identity(named),
            Err(e) => Outcome::permanent(format!("cannot serialise a stored project: {e}")),
        }
    }
}

/// How long a message's first receipt is kept for a redelivery or replay of it.
pub const KEEP_RECEIPTS: chrono::TimeDelta = chrono::TimeDelta::days(30);

impl ProjectProcessor {
    /// When a message with no time of its own and no first-receipt header first reached
    /// the service. A broker redelivery (an instance died between its write and its ack, or
    /// lost its connection) or a replay of a message the broker dead-lettered carries no
    /// header: ordered as received again, an older update would overwrite the newer ones
    /// applied since its first delivery. So each receipt is noted by the message's digest
    /// (id, routing key and body), and a redelivered or replayed message takes its first.
    /// A timestamp (`stamped`) is the key where it is believable against that first
    /// receipt (no more than [`crate::event::MAX_AHEAD`] after it), as the first attempt
    /// judged it: the receipt is noted for a stamped message too, so a redelivery judges
    /// its stamp and its own `updated` against when it was first seen, not the clock now
    /// (a time refused then came within bounds minutes later, and the redelivered update
    /// overtook newer ones). Returns the ordering key and the first receipt.
    async fn first_receipt(
        &self,
        input: &serde_json::Value,
        ctx: &MessageContext,
        stamped: Option<String>,
    ) -> Result<(String, Option<String>), store::StoreError> {
        let digest = receipt_digest(ctx.message_id.as_deref(), &ctx.routing_key, input);
        let noted = match again(ctx) {
            true => db::bounded(self.store.first_receipt(&digest)).await?,
            false => None,
        };
        let first = match noted {
            Some(first) => first,
            None => {
                let now = crate::event::time_key(received_at(ctx))
                    .unwrap_or_else(|| unreachable!("the clock is past the year 9999"));
                db::bounded(self.store.note_receipt(&digest, &now)).await?;
                self.prune_receipts();
                now
            }
        };
        let bound = crate::event::believable_after(&first);
        let key = stamped
            .filter(|t| bound.as_ref().is_some_and(|b| t <= b))
            .unwrap_or_else(|| first.clone());
        Ok((key, Some(first)))
    }

    /// Forgets receipts older than [`KEEP_RECEIPTS`], at most once an hour, on a task of its
    /// own: the message that happens to start it is not held while a backlog of receipts is
    /// deleted (a statement's bound, a minute, per batch).
    fn prune_receipts(&self) {
        use std::sync::atomic::Ordering;
        let now = chrono::Utc::now();
        let last = self.pruned_at.load(Ordering::Relaxed);
        if now.timestamp() - last < 3600
            || self
                .pruned_at
                .compare_exchange(last, now.timestamp(), Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let Some(before) = crate::event::time_key(now - KEEP_RECEIPTS) else {
            return;
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            match store.prune_receipts(&before).await {
                Ok(n) if n > 0 => tracing::info!(
                    receipts = n,
                    "forgot receipts older than {} days",
                    KEEP_RECEIPTS.num_days()
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune old receipts (tried again in an hour)")
                }
            }
        });
    }
}

/// When this service took `ctx`'s delivery, in delivery order (see
/// `MessageContext::received_at`): two updates of one project delivered in order keep that
/// order, whichever handler runs first.
fn received_at(ctx: &MessageContext) -> chrono::DateTime<chrono::Utc> {
    ctx.received_at().into()
}

/// Whether `input` holds an event to store or a deletion (given `received` as its place):
/// one that does not ends the same whatever the database's state.
fn needs_the_database(input: &serde_json::Value, received: &str, routing_key: &str) -> bool {
    let delivery = Delivery {
        received,
        first_seen: None,
        routing_key,
    };
    items_delivered(input, &delivery).iter().any(|item| {
        matches!(
            item.parsed,
            Ok(Parsed::Project(_) | Parsed::DeleteCommission(_))
        )
    })
}

/// Whether `ctx` is a message handled before: redelivered by the broker, or put back
/// (a retry, a replay) with its origin named.
fn again(ctx: &MessageContext) -> bool {
    ctx.redelivered
        || framework::headers::get_str(&ctx.headers, framework::headers::ORIGINAL_EXCHANGE)
            .is_some()
}

/// The AMQP `timestamp` of a message as an ordering key. The property counts whole seconds,
/// so the key is the end of that second: an update published in the same second as its
/// project's `created` (which has milliseconds) is not older than it. A value only a finer
/// unit can be (after the year 5000 read as seconds) is read as milliseconds, microseconds
/// or nanoseconds, as some producers write it; a time beyond the year 9999 is no key.
fn published_at(t: u64) -> Option<String> {
    const E11: i64 = crate::event::FINER_UNIT_FROM;
    let t = i64::try_from(t).ok()?;
    // (whole seconds, microseconds into the second: the end of the unit's span)
    let (secs, micros) = if t < E11 {
        (t, 999_999)
    } else if t < E11 * 1000 {
        (t / 1000, (t % 1000) * 1000 + 999)
    } else if t < E11 * 1_000_000 {
        (t / 1_000_000, t % 1_000_000)
    } else {
        (t / 1_000_000_000, (t % 1_000_000_000) / 1000)
    };
    let at = chrono::DateTime::from_timestamp(secs, u32::try_from(micros * 1000).ok()?)?;
    crate::event::time_key(at)
}

/// What a message's first receipt is noted under: its id, routing key and body.
pub fn receipt_digest(
    message_id: Option<&str>,
    routing_key: &str,
    input: &serde_json::Value,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [message_id.unwrap_or(""), routing_key] {
        h.update(part.len().to_be_bytes());
        h.update(part.as_bytes());
    }
    h.update(serde_json::to_vec(input).unwrap_or_default());
    hex::encode(h.finalize())
}

/// The service's database keys (`database_url`, `database_password_file`).
pub fn database_keys(cfg: &Config<ProjectIngestSettings>) -> db::DatabaseKeys<'_> {
    db::DatabaseKeys {
        url: cfg.settings.database_url.as_ref(),
        password_file: cfg.settings.database_password_file.as_deref(),
        data_dir: &cfg.storage.data_dir,
        service: ProjectIngest::NAME,
    }
}

/// The database URL in effect: the configured one, else SQLite under the data dir; its
/// password read from `database_password_file` where one is named (an error names the
/// file, never the password).
pub fn database(cfg: &Config<ProjectIngestSettings>) -> Result<String, String> {
    database_keys(cfg).resolve()
}

/// [`database`], or without the password where its file cannot be read (validation
/// refuses such a file before anything connects).
pub fn database_url(cfg: &Config<ProjectIngestSettings>) -> String {
    database_keys(cfg).resolve_lenient()
}

#[async_trait]
impl Service for ProjectIngest {
    const NAME: &'static str = "project-ingest";
    const ABOUT: &'static str = "records Pluto project and commission events";
    const SECTION: &'static str = "project_ingest";
    type Settings = ProjectIngestSettings;
    type Processor = ProjectProcessor;

    fn binding(cfg: &Config<ProjectIngestSettings>) -> Binding {
        Binding {
            exchange: "pluto-core".into(),
            routing_keys: vec!["core.project.#".into()],
            output_routing_key: "storagetier.projectingest.project".into(),
            // Same-time updates keep the queue's order across replicas only if one of
            // them consumes at a time (within one, its clock orders them as received).
            single_active_consumer: cfg.settings.ordered,
            one_consumer_advised: (!cfg.settings.ordered).then(|| {
                "several consumers take this queue with [project_ingest] ordered = false: \
                 updates of one project that pluto-core gives one `updated` time are ordered \
                 by when a replica first saw each, its own clock, so two replicas may keep an \
                 older one; set ordered = true with more than one replica (docs/scaling.md)"
                    .to_string()
            }),
            ..Default::default()
        }
    }

    fn validate(cfg: &Config<ProjectIngestSettings>) -> Result<(), framework::config::ConfigError> {
        database_keys(cfg).check(Self::SECTION)
    }

    fn resolved(cfg: &Config<ProjectIngestSettings>) -> Option<serde_json::Value> {
        Some(serde_json::json!({"database_url": db::redact_url(&database_url(cfg))}))
    }

    async fn processor(cfg: &Config<ProjectIngestSettings>) -> Result<ProjectProcessor, BoxError> {
        let url = database_url(cfg);
        let password_file = cfg.settings.database_password_file.is_some();
        let store = Store::open(&url)
            .await
            .map_err(|e| e.at_start(Self::SECTION, password_file, &url))?;
        let b = framework::cli::binding_of::<Self>(cfg);
        Ok(
            ProjectProcessor::new(store, &cfg.service.output_exchange, &b.output_routing_key)
                // Within the retries there are: the last attempt drops the update, never
                // dead-letters it as retries-exhausted.
                .with_missing_retries(
                    cfg.settings
                        .missing_project_retries
                        .min(cfg.retry.max_attempts.saturating_sub(1)),
                ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A redelivery or replay finds its first receipt by this digest, also across a
    /// release (a dead letter replayed after an upgrade): pinned, so a change of how it is
    /// made (or of how the body is written back, a serde_json feature) is seen as the
    /// break it is.
    #[test]
    fn receipt_digests_are_pinned_across_releases() {
        let body = serde_json::json!({"type": "project-updated", "id": "p", "title": "t"});
        assert_eq!(
            receipt_digest(Some("m-1"), "core.project.event", &body),
            "ad0b0e7286690da2e526d20410c04d0585d7a68e2b14dce7c1e670763985668f"
        );
    }

    /// The wait of an update for its project on the default tiers, in seconds.
    fn default_wait_secs() -> u64 {
        let cfg = framework::cli::load_config::<ProjectIngest>(
            &framework::config::LoadOptions::isolated(),
        )
        .expect("defaults load");
        (0..cfg.settings.missing_project_retries)
            .map(|n| cfg.retry.delay_for_attempt(n))
            .sum::<u64>()
            / 1000
    }

    #[test]
    fn an_update_waits_out_a_create_held_by_a_dead_instance() {
        // A dead instance's unacked create comes back after the heartbeat timeout (15 s
        // asked for by the services, up to twice that to notice), and a create retried on
        // its own instance climbs 1 s, 5 s, 30 s, 120 s.
        let wait = default_wait_secs();
        assert!(wait >= 5 * 60, "an update waits {wait} s for its create");
    }
}

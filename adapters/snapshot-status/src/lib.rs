//! snapshot-status: DataWorks snapshot-sender status messages → per-collection state,
//! export-state and monitoring messages, product status (design §7).

pub mod cli;
pub mod message;
pub mod store;

use db::DatabaseUrl;
use framework::config::{Config, ConfigError};
use framework::telemetry::LogText;
use framework::{
    Binding, BoxError, MessageContext, MessageProcessor, Outcome, Publication, Service,
    async_trait, publisher::PublishError,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use message::{FILENAME_NOT_SET, Input, Kind, StatusMessage, decode, title_case};
use store::{Collection, Store, StoreError};

/// Routing key of export-state messages.
pub const EXPORT_STATE_KEY: &str = "snapshot.export-state";
/// Routing key of monitoring messages.
pub const MONITORING_KEY: &str = "monitoring.snapshot-sender";
/// Header listing the 1-based records of a batch already dead-lettered (kept across retries).
pub const DEAD_LETTERED_HEADER: &str = framework::batch::DEAD_LETTERED_RECORDS;
/// Retry header listing the export-state and monitoring messages of this message already
/// confirmed, so a retry (one of them unroutable, say) never sends the others again.
pub const PUBLISHED_HEADER: &str = "x-snapshot-status-published";
/// Retry header listing the records (1-based) whose file this message counted, so a retry
/// of it (its export-state publish failed, say) finds the file counted by itself, not by
/// a duplicate from the sender.
pub const COUNTED_HEADER: &str = "x-snapshot-status-counted";

/// The longest one record of a batch is expected to take (its database calls, its
/// confirmed publishes): see `Progress::pause_before`.
const RECORD_STEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Counter of file messages by `counted` ("true", or "false" for a duplicate).
pub const FILES_METRIC: &str = "storagetier_snapshotstatus_files_total";
/// Counter of state changes by `to` (Received, Success, RECEIVED, COMPLETED).
pub const TRANSITIONS_METRIC: &str = "storagetier_snapshotstatus_transitions_total";
/// Every `to` of [`TRANSITIONS_METRIC`], as docs/adapters.md lists them.
pub const TRANSITIONS: [&str; 4] = ["Received", "Success", "RECEIVED", "COMPLETED"];

fn transition(to: &'static str) {
    metrics::counter!(TRANSITIONS_METRIC, "to" => to).increment(1);
}

/// `[snapshot_status]` keys besides the framework's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotStatusSettings {
    /// `postgres://…` or `sqlite://…` (unset = `<data_dir>/snapshot-status.db`).
    #[serde(default)]
    pub database_url: Option<DatabaseUrl>,
    /// A file holding the PostgreSQL password of `database_url` (a mounted secret).
    #[serde(default)]
    pub database_password_file: Option<std::path::PathBuf>,
    /// Exchange export-state messages go to.
    #[serde(default = "default_export_state_exchange")]
    pub export_state_exchange: String,
    /// Exchange monitoring messages go to.
    #[serde(default = "default_monitoring_exchange")]
    pub monitoring_exchange: String,
    /// Days a COMPLETED run's state (its collections and every received file's row) is
    /// kept, then deleted; 0 keeps it forever. A file row per file of every run otherwise
    /// grows the database for as long as the service runs.
    #[serde(default = "default_keep_completed_runs_days")]
    pub keep_completed_runs_days: u64,
    /// Days a run that never COMPLETED is kept after the last message of it (an export
    /// given up on), then deleted; 0 keeps it forever.
    #[serde(default = "default_keep_idle_runs_days")]
    pub keep_idle_runs_days: u64,
}

fn default_keep_completed_runs_days() -> u64 {
    30
}

fn default_keep_idle_runs_days() -> u64 {
    90
}

/// `days` as an age to keep runs for; None for 0 (forever).
fn kept_for(days: u64) -> Option<std::time::Duration> {
    (days > 0).then(|| std::time::Duration::from_secs(days.saturating_mul(86_400)))
}

/// How often runs past their keeping are looked for.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

fn default_export_state_exchange() -> String {
    "snapshot-export-state".into()
}

fn default_monitoring_exchange() -> String {
    "monitoring".into()
}

/// The snapshot-status service.
pub struct SnapshotStatus;

/// The message processor.
pub struct StatusProcessor {
    store: Store,
    export_state_exchange: String,
    monitoring_exchange: String,
    /// Deletes completed runs past their keeping, while the processor lives.
    pruner: Option<tokio::task::JoinHandle<()>>,
    /// Retries a success file that overtook its collection waits for it.
    missing_retries: u32,
}

/// Six retries wait about 6.5 minutes on the default tiers: a success file can overtake
/// its collection's counts (several handlers or instances, a counts message held in a
/// retry tier); dropped at once, the collection never reached Success and its run never
/// completed. The original's SQS redelivered it until the collection was there.
pub const MISSING_COLLECTION_RETRIES: u32 = 6;

impl Drop for StatusProcessor {
    fn drop(&mut self) {
        if let Some(p) = &self.pruner {
            p.abort();
        }
    }
}

/// The result of one status message: what to report, publish, or why nothing happened.
#[derive(Debug)]
struct Handled {
    report: Value,
    extra: Vec<Extra>,
    dropped: Option<String>,
    /// A success file that overtook its collection (not heard of yet, Pending or Exported,
    /// or moved by another instance while it looked): worth waiting for.
    too_early: bool,
}

/// A message of a run deleted past its keeping (completed, or idle): it changes nothing,
/// dropped with the reason.
fn pruned(m: &StatusMessage) -> Handled {
    let reason = format!(
        "run `{}` was deleted past its keeping; this message of it changes nothing",
        m.correlation_id
    );
    tracing::info!("{}", LogText(&reason));
    Handled {
        report: json!({"correlation_id": m.correlation_id,
            "collection_name": m.collection_name, "ignored": reason}),
        extra: Vec::new(),
        dropped: Some(reason),
        too_early: false,
    }
}

/// An export-state or monitoring message, and the mark its confirm leaves in
/// [`PUBLISHED_HEADER`].
#[derive(Debug)]
struct Extra {
    /// Its mark: the record that sends it and which of its messages it is
    /// ([`sent_mark`]). A decimal mark, so the header of a batch that sent thousands
    /// stays a few ranges: a text mark per message (about 100 bytes each) outgrew an AMQP
    /// frame past ~1,000 records, and the retry was dead-lettered without its progress,
    /// whose replay sent every one again.
    mark: u64,
    /// The marks older releases left for the same message, also taken as done: a retry
    /// in flight across an upgrade still knows it was sent.
    legacy_marks: Vec<String>,
    publication: Publication,
}

/// What a record sends, at most one of each: its collection's export-state message, and
/// the monitoring messages of its run becoming RECEIVED and COMPLETED.
#[derive(Debug, Clone, Copy)]
enum Sent {
    ExportState = 0,
    Received = 1,
    Completed = 2,
}

/// The mark of what record `record` (1-based) sent: `3 × record + what`.
fn sent_mark(record: usize, what: Sent) -> u64 {
    (record as u64)
        .saturating_mul(3)
        .saturating_add(what as u64)
}

/// The destinations that refused a publish of this attempt (nothing bound to them, a queue
/// full): what goes elsewhere still goes — a batch's later records of other runs are
/// handled and announced — and the input is retried at the end for what they refused.
#[derive(Default)]
struct Refused {
    /// Where a publish was refused, as (exchange, routing key): whether a message can be
    /// routed depends on its key, and the two kinds may share one exchange.
    destinations: Vec<(String, String)>,
    /// The first refusal (why, the error): the retry's reason.
    first: Option<(String, PublishError)>,
    /// Messages left for the retry so far (refused, or to a destination that refused one).
    held: usize,
    /// The runs (correlation ids) one of whose messages was left for the retry: their
    /// later records wait for it too. The retry builds a message again from the run's
    /// state as it finds it, which a later record of the batch could change (reopen the
    /// run and receive it again, complete it): handled before the retry, it left the
    /// message that was held never sent.
    runs: Vec<String>,
}

impl Refused {
    /// Whether records of run `correlation_id` wait for the retry.
    fn holds(&self, correlation_id: &str) -> bool {
        self.runs.iter().any(|r| r == correlation_id)
    }

    /// The input's outcome if a destination refused one of its publishes.
    fn outcome(self) -> Option<Outcome> {
        self.first.map(|(why, e)| Outcome::publish_failed(why, &e))
    }
}

/// Publishes each of `extra` not confirmed by an earlier attempt, waiting for its confirm
/// and marking it done. One whose destination refused a publish of this attempt is left
/// for the retry (unmarked; so are the later ones to it, which keep their order); a
/// refusal by the destination is noted in `refused` and the others still go; any other
/// failure stops the rest, naming where it went (see [`Outcome::publish_failed`] for what
/// the input's outcome then is). `record`: what the reasons name.
async fn publish_extras(
    ctx: &MessageContext,
    published: &mut framework::batch::Progress<'_>,
    extra: Vec<Extra>,
    refused: &mut Refused,
    record: &str,
) -> Result<(), (String, PublishError)> {
    for e in extra {
        let mark = e.mark.to_string();
        if published.is_done(&mark) || e.legacy_marks.iter().any(|m| published.is_done(m)) {
            continue;
        }
        let exchange = e.publication.exchange.clone();
        let destination = (exchange.clone(), e.publication.routing_key.clone());
        if refused.destinations.contains(&destination) {
            refused.held += 1;
            continue;
        }
        match ctx.publish(e.publication).await {
            Ok(()) => published.mark_done(mark),
            Err(err) => {
                let why = format!("{record}publishing to `{exchange}` failed");
                if !err.destination_refused() {
                    return Err((why, err));
                }
                tracing::warn!(error = %LogText(&err.to_string()), "{why}; the rest go on, and \
                    it goes with the retry");
                refused.destinations.push(destination);
                refused.first.get_or_insert((why, err));
                refused.held += 1;
            }
        }
    }
    Ok(())
}

/// The export-state message for `m`'s collection `c`: the flags are those the collection's
/// files came with (stored), else `m`'s own.
fn export_state(m: &StatusMessage, c: &Collection) -> Value {
    json!({
        "shutdown_flag": c.shutdown_flag.as_deref().unwrap_or(&m.shutdown_flag),
        "correlation_id": m.correlation_id,
        "topic_name": m.collection_name,
        "snapshot_type": m.snapshot_type,
        "reprocess_files": c.reprocess_files.as_deref().unwrap_or(&m.reprocess_files),
        "export_date": m.export_date,
        "send_success_indicator": "true",
    })
}

/// What the monitoring message of a run that has every collection Received says (as the
/// original: then NiFi has every file).
pub const ALL_RECEIVED: &str = "All collections received by NiFi";
/// What the monitoring message of a run whose every collection is Success says.
pub const ALL_SUCCESSFUL: &str = "All collections successful";

/// The monitoring message of a run that reached `what` ([`ALL_RECEIVED`],
/// [`ALL_SUCCESSFUL`]).
pub fn monitoring(m: &StatusMessage, what: &str) -> Value {
    json!({
        "severity": "Critical",
        "notification_type": "Information",
        "slack_username": "Snapshot Sender",
        "title_text": format!("{} - {what}", title_case(&m.snapshot_type)),
        "custom_elements": [
            {"key": "Export date", "value": m.export_date},
            {"key": "Correlation Id", "value": m.correlation_id},
        ],
    })
}

impl StatusProcessor {
    /// A processor over `store` publishing to the given exchanges.
    pub fn new(store: Store, export_state_exchange: &str, monitoring_exchange: &str) -> Self {
        framework::telemetry::counters_from_zero(
            FILES_METRIC,
            "snapshot-status: files seen, counted or a duplicate",
            "counted",
            &["true", "false"],
        );
        framework::telemetry::counters_from_zero(
            TRANSITIONS_METRIC,
            "snapshot-status: status transitions made, by the status reached",
            "to",
            &TRANSITIONS,
        );
        Self {
            store,
            export_state_exchange: export_state_exchange.to_string(),
            monitoring_exchange: monitoring_exchange.to_string(),
            pruner: None,
            missing_retries: MISSING_COLLECTION_RETRIES,
        }
    }

    /// Sets how many retries a success file that overtook its collection waits for it.
    pub fn with_missing_retries(mut self, retries: u32) -> Self {
        self.missing_retries = retries;
        self
    }

    /// Deletes the runs completed more than `completed` ago and those never completed that
    /// heard nothing for `idle` (None: kept forever), now and every hour, while this
    /// processor lives.
    pub fn pruning_runs(
        mut self,
        completed: Option<std::time::Duration>,
        idle: Option<std::time::Duration>,
    ) -> Self {
        if completed.is_none() && idle.is_none() {
            return self;
        }
        let store = self.store.clone();
        self.pruner = Some(tokio::spawn(async move {
            loop {
                // Not bounded as one call: a backlog of runs is pruned a transaction at a
                // time, for as long as it takes (a background task, no handler waits).
                if let Some(keep) = completed {
                    match store.prune_completed_runs(keep).await {
                        Ok(0) => {}
                        Ok(n) => {
                            tracing::info!(runs = n, "completed runs past their keeping deleted")
                        }
                        Err(e) => tracing::warn!(error = %e, "could not delete old completed runs"),
                    }
                }
                if let Some(keep) = idle {
                    match store.prune_idle_runs(keep).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(
                            runs = n,
                            "runs never completed and idle past their keeping deleted"
                        ),
                        Err(e) => tracing::warn!(error = %e, "could not delete idle runs"),
                    }
                }
                tokio::time::sleep(PRUNE_EVERY).await;
            }
        }));
        self
    }

    /// The store (for tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The export-state message for `m`, mandatory: an unroutable one fails the publish,
    /// so the input is retried (a retried message re-emits it) instead of the broker
    /// dropping it while the collection is already `Received`.
    fn export_state_publication(&self, m: &StatusMessage, c: &Collection, record: usize) -> Extra {
        let identity = format!(
            "export-state {}",
            json!([c.correlation_id, c.collection_name])
        );
        Extra {
            mark: sent_mark(record, Sent::ExportState),
            // Named by its collection, not its body: sent again (its confirm lost) after
            // a later file of the collection changed the flags it carries, it is still
            // the one message to a consumer that drops a message id it had.
            publication: Publication::value(
                &self.export_state_exchange,
                EXPORT_STATE_KEY,
                &export_state(m, c),
            )
            .mandatory()
            .with_identity(identity.clone()),
            legacy_marks: vec![identity],
        }
    }

    /// The monitoring message of `m`'s run, mandatory (an unroutable one fails the
    /// publish, so the input is retried and sends it again).
    /// `dedupe` keys the message that made the run RECEIVED; `record` is its record.
    fn monitoring_publication(
        &self,
        m: &StatusMessage,
        what: &str,
        dedupe: &str,
        record: usize,
    ) -> Extra {
        // Each is marked for the collection and message that made the run RECEIVED or
        // COMPLETED, as the store names them (`received_by`, `completed_by`): one batch
        // can complete a run, reopen it (a collection heard of next) and complete it
        // again, and each is announced. The success message's mark was one per run
        // before (which skipped the second): an attempt of an older release that left it
        // has sent this run's.
        let (sent, identity, legacy_mark) = match what {
            ALL_RECEIVED => (
                Sent::Received,
                format!(
                    "monitoring-received {}",
                    json!([m.correlation_id, m.collection_name, dedupe])
                ),
                None,
            ),
            _ => (
                Sent::Completed,
                format!(
                    "monitoring-completed {}",
                    json!([m.correlation_id, m.collection_name, dedupe])
                ),
                Some(format!("monitoring {}", json!(m.correlation_id))),
            ),
        };
        // Named by its mark: one batch can announce a run's completion twice with one
        // body, and a message id derived from the body would make the second a duplicate
        // to a consumer that drops those.
        let publication = Publication::value(
            &self.monitoring_exchange,
            MONITORING_KEY,
            &monitoring(m, what),
        )
        .mandatory()
        .with_identity(identity.clone());
        Extra {
            mark: sent_mark(record, sent),
            legacy_marks: std::iter::once(identity).chain(legacy_mark).collect(),
            publication,
        }
    }

    /// After a collection of `m`'s run became Received: marks the run RECEIVED when every
    /// collection is, and tells monitoring; a `retried` message that made the run RECEIVED
    /// earlier tells it again (its publish may have been lost), no other message does.
    async fn run_received(
        &self,
        m: &StatusMessage,
        dedupe: &str,
        retried: bool,
        record: usize,
        extra: &mut Vec<Extra>,
    ) -> Result<(), StoreError> {
        let (cid, collection) = (&m.correlation_id, &m.collection_name);
        let moved = db::bounded(self.store.mark_product_received(cid, collection, dedupe)).await?;
        if moved {
            transition("RECEIVED");
        }
        let resend = !moved
            && retried
            && db::bounded(self.store.received_by(cid, collection, dedupe)).await?;
        if moved || resend {
            extra.push(self.monitoring_publication(m, ALL_RECEIVED, dedupe, record));
        }
        Ok(())
    }

    /// Handles one valid status message; `dedupe` keys a file without a name, `record`
    /// (1-based) names it in `own` (the files this message counted at earlier attempts) and
    /// in the marks of what it sends.
    async fn handle_one(
        &self,
        m: &StatusMessage,
        dedupe: &str,
        retried: bool,
        own: &mut framework::batch::Progress<'_>,
        record: usize,
    ) -> Result<Handled, StoreError> {
        // A run completed and deleted past its keeping: a message of it now (a dead letter
        // replayed weeks later) would start it over as a collection that never completes.
        // Looked up first (no writing transaction for those), and again by each record under
        // the run's lock, which a prune running now may have deleted meanwhile.
        if db::bounded(self.store.was_pruned(&m.correlation_id)).await? {
            return Ok(pruned(m));
        }
        let mut extra = Vec::new();
        let mut dropped = None;
        let mut too_early = false;
        let (collection, kind, counted) = match m.kind() {
            Kind::Counts => {
                let key = format!("counts:{dedupe}");
                let Some((c, moved, triggered)) =
                    db::bounded(self.store.record_counts(m, &key)).await?
                else {
                    return Ok(pruned(m));
                };
                if moved {
                    transition("Received");
                }
                // The counts message that completed the collection re-emits when it comes
                // again (its publish may have been lost); no other message does.
                if moved || (retried && triggered && c.status == "Received") {
                    extra.push(self.export_state_publication(m, &c, record));
                }
                // Its run's "all received" too, though the sender had the export-state
                // message and moved the collection on to Success meanwhile: the run is
                // still RECEIVED by this message, and nothing else announces it.
                if moved || (retried && triggered) {
                    self.run_received(m, dedupe, retried, record, &mut extra)
                        .await?;
                }
                (c, "counts", true)
            }
            Kind::File => {
                let key = if m.filename == FILENAME_NOT_SET {
                    dedupe.to_string()
                } else {
                    format!("file:{}", m.filename)
                };
                let Some(f) = db::bounded(self.store.record_file(m, &key, dedupe)).await? else {
                    return Ok(pruned(m));
                };
                // Counted by an earlier attempt of this very message (which then failed, an
                // export-state publish unroutable, say): no duplicate from the sender, and
                // counted once already.
                let ours = !f.counted && own.is_done(&record.to_string());
                if f.counted {
                    own.mark_done(record.to_string());
                }
                if ours {
                    tracing::debug!(file = %LogText(&m.filename), "file counted by an earlier attempt of this message");
                } else {
                    metrics::counter!(FILES_METRIC, "counted" => if f.counted { "true" } else { "false" })
                        .increment(1);
                }
                if f.counted && f.triggered_received {
                    transition("Received");
                }
                if !f.counted && !ours {
                    if key.starts_with("content:") {
                        // Alike, unnamed and id-less, two files cannot be told from one
                        // delivered twice: a collection that then never completes says why.
                        tracing::warn!(
                            collection = %LogText(&m.collection_name),
                            "a file with no name and no message id, alike with one counted \
                             already, is not counted again: this message delivered again, or \
                             another file the sender sent alike (files without `file_name` or \
                             a message id cannot be told apart: such a collection never \
                             completes)"
                        );
                    } else {
                        tracing::info!(file = %LogText(&m.filename), "file already counted (sent again by the sender, or this message delivered again)");
                    }
                }
                // The file that completed the collection re-emits when it comes back (its
                // publish may have been lost), not when the sender sends it again.
                // Not once the collection moved on to Success: the sender then had it.
                if f.triggered_received
                    && (f.counted || (retried && f.collection.status == "Received"))
                {
                    extra.push(self.export_state_publication(m, &f.collection, record));
                }
                // Its run's "all received" even then (refused, and the sender acted on the
                // export-state message before the retry): the run is still RECEIVED by this
                // file, and nothing else announces it.
                if f.triggered_received && (f.counted || retried) {
                    self.run_received(m, dedupe, retried, record, &mut extra)
                        .await?;
                }
                // This message's own count, an earlier attempt's included.
                (f.collection, "file", f.counted || ours)
            }
            Kind::SuccessFile => {
                let Some((c, moved)) = db::bounded(self.store.record_success(m)).await? else {
                    return Ok(pruned(m));
                };
                if moved {
                    transition("Success");
                }
                let Some(c) = c else {
                    let reason = format!(
                        "success file for unknown collection `{}` of `{}`",
                        m.collection_name, m.correlation_id
                    );
                    tracing::warn!("{}", LogText(&reason));
                    return Ok(Handled {
                        report: json!({"correlation_id": m.correlation_id,
                            "collection_name": m.collection_name, "ignored": reason}),
                        extra,
                        dropped: Some(reason),
                        too_early: true,
                    });
                };
                if c.status != "Success" {
                    let reason = format!(
                        "success file for collection `{}` in status {}, not Received",
                        m.collection_name, c.status
                    );
                    tracing::warn!("{}", LogText(&reason));
                    // Its last files or its counts may still be on their way. Received or
                    // Sent: moved by another replica's message between this one's update and
                    // its look (two statements: PostgreSQL reads each in a snapshot of its
                    // own) — retried, it moves the collection; dropped, the run never
                    // completed.
                    too_early = true;
                    dropped = Some(reason);
                } else {
                    // Every collection is Received or Success now where this one was the
                    // last outstanding (Sent → Success): the run is RECEIVED, announced,
                    // before it is COMPLETED — whichever collection's success file came
                    // first. (Only after the completion, it never was when the Sent
                    // collection's success file came last.)
                    self.run_received(m, dedupe, retried, record, &mut extra)
                        .await?;
                    let completed = db::bounded(self.store.mark_product_completed(
                        &m.correlation_id,
                        &m.collection_name,
                        dedupe,
                    ))
                    .await?;
                    if completed {
                        transition("COMPLETED");
                    }
                    let product = db::bounded(self.store.product_status(&m.correlation_id)).await?;
                    // Who completed the product publishes; a retried success file of a
                    // completed product re-emits, so a lost publish is not lost for good.
                    let is_completed = product.as_deref() == Some("COMPLETED");
                    let resend = retried
                        && is_completed
                        && db::bounded(self.store.completed_by(
                            &m.correlation_id,
                            &m.collection_name,
                            dedupe,
                        ))
                        .await?;
                    if is_completed && (completed || resend) {
                        // Mandatory: an unroutable message fails the publish, so the input
                        // is retried and this branch (retried) sends it again.
                        extra.push(self.monitoring_publication(m, ALL_SUCCESSFUL, dedupe, record));
                    }
                }
                (c, "success-file", moved)
            }
        };
        let product = db::bounded(self.store.product_status(&m.correlation_id)).await?;
        Ok(Handled {
            report: json!({
                "correlation_id": collection.correlation_id,
                "collection_name": collection.collection_name,
                "kind": kind,
                "filename": m.filename,
                "counted": counted,
                "status": collection.status,
                "files_exported": collection.files_exported,
                "files_sent": collection.files_sent,
                "files_received": collection.files_received,
                "files_expected": collection.files_expected(),
                "product_status": product,
                "published": extra.iter().map(|e| json!({"exchange": e.publication.exchange, "routing_key": e.publication.routing_key})).collect::<Vec<_>>(),
            }),
            extra,
            dropped,
            too_early,
        })
    }
}

/// The de-duplication key of a file without a filename: the SQS `messageId` of its record
/// where it came in an SQS batch (the same SQS message delivered again, even re-sent by a
/// bridge in a new message, counts once; two files of identical content count twice); else
/// the message id and record number when the producer set an id; otherwise a hash of the
/// record's content, so a redelivery (same bytes) counts once. Two unnamed, id-less files
/// with identical content in separate messages cannot be told apart and count once too: undercounting stalls a
/// collection visibly, while counting a redelivery twice would send the export-state
/// message before every file arrived. A record dead-lettered from a batch and replayed
/// keeps its batch's message id and its own record number: the number it had in the
/// batch, not 1.
///
/// `twin` is how many earlier records of the same envelope have this record's bytes: the
/// seed's producer sends unnamed files as records of one envelope ("as many records as you
/// like"), and two of them alike are two files (the envelope delivered again has the same
/// twins, so it still counts once); the first of them keeps the plain content key.
fn dedupe_key(
    ctx: &MessageContext,
    record: &str,
    sqs_message_id: Option<&str>,
    content: &[u8],
    twin: usize,
) -> String {
    match (sqs_message_id, &ctx.message_id) {
        // With the record's content: one SQS message delivered again is the same key, two
        // records a bridge gave one id are not.
        (Some(sqs), _) => format!("sqs:{sqs}:{}", hex::encode(Sha256::digest(content))),
        // An id the database may not store (PostgreSQL refuses U+0000 in text: the file
        // that completed its collection was dead-lettered) stands as its hash.
        (None, Some(id)) if id.contains('\0') => {
            format!(
                "message-sha256:{}#{record}",
                hex::encode(Sha256::digest(id))
            )
        }
        (None, Some(id)) => format!("message:{id}#{record}"),
        (None, None) if twin == 0 => format!("content:{}", hex::encode(Sha256::digest(content))),
        (None, None) => format!(
            "content:{}~{}",
            hex::encode(Sha256::digest(content)),
            twin + 1
        ),
    }
}

#[async_trait]
impl MessageProcessor for StatusProcessor {
    type Input = Value;

    fn progress_headers(&self) -> &'static [&'static str] {
        &[PUBLISHED_HEADER, COUNTED_HEADER, DEAD_LETTERED_HEADER]
    }

    /// A status message names its run, collection and file (or counts): the same body
    /// again is that message again (a file is counted once by its body's digest too), so
    /// the export-state and monitoring messages a re-sent one sends again keep their ids.
    fn knows_inputs_by_body(&self) -> bool {
        true
    }

    async fn handle(&self, input: Value, ctx: &MessageContext) -> Outcome {
        // Seen before: retried, redelivered, or replayed from the DLQ (a replay keeps
        // `x-original-exchange`, which only the framework's retries and replays carry).
        let retried = ctx.redelivered
            || ctx.attempt > 0
            || framework::headers::get_str(&ctx.headers, framework::headers::ORIGINAL_EXCHANGE)
                .is_some();
        // Each export-state and monitoring message is published (and confirmed) as soon as
        // its record is handled; a retry skips those an earlier attempt published.
        let mut published = framework::batch::Progress::resume(ctx, PUBLISHED_HEADER);
        let mut own = framework::batch::Progress::resume(ctx, COUNTED_HEADER);
        // Counted before each record is parsed into one of its own.
        let records = input
            .get("Records")
            .and_then(Value::as_array)
            .map_or(1, Vec::len);
        if let Some(o) = ctx.too_many_records(records) {
            return o;
        }
        match decode(&input) {
            Input::Empty => Outcome::drop("`Records` is empty: no status message to handle"),
            Input::Single(Err(e)) => Outcome::permanent(e),
            Input::Single(Ok(m)) => {
                let content = serde_json::to_vec(&input).unwrap_or_default();
                match self
                    .handle_one(
                        &m,
                        &dedupe_key(
                            ctx,
                            &ctx.batch_part().unwrap_or_else(|| "1".into()),
                            None,
                            &content,
                            0,
                        ),
                        retried,
                        &mut own,
                        1,
                    )
                    .await
                {
                    Err(e) if e.refuses_the_data() => {
                        Outcome::permanent(format!("the database refuses this message: {e}"))
                    }
                    Err(e) => e.retry(ctx, &e),
                    Ok(h) => {
                        let nothing_to_send = h.extra.is_empty();
                        let mut refused = Refused::default();
                        let sent = publish_extras(ctx, &mut published, h.extra, &mut refused, "");
                        if let Err((why, e)) = sent.await {
                            return Outcome::publish_failed(why, &e);
                        }
                        if let Some(o) = refused.outcome() {
                            return o;
                        }
                        match h.dropped {
                            Some(reason)
                                if h.too_early && ctx.counted_attempts() < self.missing_retries =>
                            {
                                Outcome::retry(format!("{reason}: waiting for its counts"))
                            }
                            Some(reason) if nothing_to_send => Outcome::drop(reason),
                            _ => Outcome::success(h.report),
                        }
                    }
                }
            }
            Input::Records(records) => {
                let mut dead = framework::batch::Progress::resume(ctx, DEAD_LETTERED_HEADER);
                let mut reports = Vec::new();
                let mut too_early = Vec::new();
                let mut refused = Refused::default();
                let records_total = records.len();
                let twins: Vec<usize> = {
                    let mut seen: std::collections::HashMap<&[u8], usize> =
                        std::collections::HashMap::new();
                    records
                        .iter()
                        .map(|r| {
                            let n = seen.entry(r.raw.as_slice()).or_default();
                            *n += 1;
                            *n - 1
                        })
                        .collect()
                };
                for ((i, r), twin) in records.into_iter().enumerate().zip(twins) {
                    let n = i + 1;
                    // Stopping (or near the consumer timeout) with messages published or
                    // records dead-lettered: the rest go with a retry carrying them, not
                    // in a redelivery that sends them again (a second Slack alert).
                    if let Some(why) = published
                        .pause_before(RECORD_STEP)
                        .or_else(|| dead.pause_before(RECORD_STEP))
                    {
                        return Outcome::retry(format!(
                            "{why} after {i} of {records_total} records; the rest go with this \
                             retry"
                        ));
                    }
                    let run = r.parsed.as_ref().ok().map(|m| m.correlation_id.clone());
                    if run.as_deref().is_some_and(|c| refused.holds(c)) {
                        continue;
                    }
                    let held_before = refused.held;
                    let handled = match r.parsed {
                        Err(e) => Err(e.to_string()),
                        Ok(m) => match self
                            .handle_one(
                                &m,
                                &dedupe_key(
                                    ctx,
                                    &n.to_string(),
                                    r.sqs_message_id.as_deref(),
                                    &r.raw,
                                    twin,
                                ),
                                retried,
                                &mut own,
                                n,
                            )
                            .await
                        {
                            // No attempt can store it: dead-lettered on its own.
                            Err(e) if e.refuses_the_data() => {
                                Err(format!("the database refuses this record: {e}"))
                            }
                            Err(e) => return e.retry(ctx, format!("record {n}: {e}")),
                            Ok(h) => Ok(h),
                        },
                    };
                    match handled {
                        Err(e) => {
                            let reason = format!("record {n}: {e}");
                            match dead.dead_letter(n.to_string(), r.raw, &reason).await {
                                Ok(true) => tracing::warn!("dead-lettered {}", LogText(&reason)),
                                Ok(false) => {}
                                Err(pe) => {
                                    return Outcome::retry(format!(
                                        "cannot dead-letter record {n}: {pe}"
                                    ));
                                }
                            }
                            report(&mut reports, n, json!({"record": n, "dead_lettered": e}));
                        }
                        Ok(mut h) => {
                            // A message no broker will take dead-letters the whole batch
                            // (not the record alone, whose replay on its own would be keyed
                            // apart from the change it already made, and announce nothing),
                            // with its progress: a replay skips what was done.
                            let record = format!("record {n}: ");
                            if let Err((why, e)) =
                                publish_extras(ctx, &mut published, h.extra, &mut refused, &record)
                                    .await
                            {
                                return Outcome::publish_failed(why, &e);
                            }
                            if refused.held > held_before
                                && let Some(run) = run
                            {
                                refused.runs.push(run);
                            }
                            if h.too_early {
                                too_early.push(n.to_string());
                            }
                            if let Value::Object(o) = &mut h.report {
                                o.insert("record".into(), json!(n));
                            }
                            report(&mut reports, n, h.report);
                        }
                    }
                }
                // What a destination refused goes with a retry, which handles every record
                // again: each is counted once, and published once, whatever comes again.
                if let Some(o) = refused.outcome() {
                    return o;
                }
                // Every other record is counted once and published once whatever comes
                // again: the batch waits for the collections its success files name.
                if !too_early.is_empty() && ctx.counted_attempts() < self.missing_retries {
                    return Outcome::retry(format!(
                        "record {}: success file ahead of its collection (its counts or last \
                         files); waiting for them",
                        too_early.join(", ")
                    ));
                }
                if records_total > MAX_REPORTED {
                    return Outcome::success(json!({
                        "records": reports,
                        "records_total": records_total,
                        "records_not_shown": records_total - MAX_REPORTED,
                    }));
                }
                Outcome::success(json!({"records": reports}))
            }
        }
    }
}

/// Records of a batch reported one by one in its success body; the rest are counted. A
/// report is about twice its record's size, so a batch of small records reported whole
/// gave a success body larger than the broker takes (16 MiB on RabbitMQ 4.x), refused
/// after every record's work was done, and the batch dead-lettered on every replay.
const MAX_REPORTED: usize = 1000;

/// Adds record `n`'s report (1-based) unless [`MAX_REPORTED`] are already there.
fn report(reports: &mut Vec<Value>, n: usize, r: Value) {
    if n <= MAX_REPORTED {
        reports.push(r);
    }
}

/// The service's database keys (`database_url`, `database_password_file`).
pub fn database_keys(cfg: &Config<SnapshotStatusSettings>) -> db::DatabaseKeys<'_> {
    db::DatabaseKeys {
        url: cfg.settings.database_url.as_ref(),
        password_file: cfg.settings.database_password_file.as_deref(),
        data_dir: &cfg.storage.data_dir,
        service: SnapshotStatus::NAME,
    }
}

/// The database URL in effect: the configured one, else SQLite under the data dir; its
/// password read from `database_password_file` where one is named (an error names the
/// file, never the password).
pub fn database(cfg: &Config<SnapshotStatusSettings>) -> Result<String, String> {
    database_keys(cfg).resolve()
}

/// [`database`], or without the password where its file cannot be read (validation
/// refuses such a file before anything connects).
pub fn database_url(cfg: &Config<SnapshotStatusSettings>) -> String {
    database_keys(cfg).resolve_lenient()
}

#[async_trait]
impl Service for SnapshotStatus {
    const NAME: &'static str = "snapshot-status";
    const ABOUT: &'static str = "tracks snapshot-sender collection status";
    const SECTION: &'static str = "snapshot_status";
    type Settings = SnapshotStatusSettings;
    type Processor = StatusProcessor;

    fn binding(cfg: &Config<SnapshotStatusSettings>) -> Binding {
        Binding {
            exchange: "snapshot-sender".into(),
            routing_keys: vec!["snapshot.status.#".into()],
            output_routing_key: "storagetier.snapshotstatus.status".into(),
            // Owned by this service: declared with its topology on `declare` and every
            // (re)connect, so its messages have somewhere to go from the start.
            publishes_to: vec![
                cfg.settings.export_state_exchange.clone(),
                cfg.settings.monitoring_exchange.clone(),
            ],
            ..Default::default()
        }
    }

    fn validate_topology(cfg: &Config<SnapshotStatusSettings>) -> Result<(), ConfigError> {
        let s = &cfg.settings;
        for (key, v) in [
            (
                "snapshot_status.export_state_exchange",
                &s.export_state_exchange,
            ),
            (
                "snapshot_status.monitoring_exchange",
                &s.monitoring_exchange,
            ),
        ] {
            if v.trim().is_empty() {
                return Err(ConfigError::new(key, "must not be empty"));
            }
            framework::config::check_owned_name(key, v)?;
            cfg.check_publishes_to(key, v)?;
        }
        Ok(())
    }

    fn validate(cfg: &Config<SnapshotStatusSettings>) -> Result<(), ConfigError> {
        database_keys(cfg).check(Self::SECTION)
    }

    fn resolved(cfg: &Config<SnapshotStatusSettings>) -> Option<serde_json::Value> {
        Some(serde_json::json!({"database_url": db::redact_url(&database_url(cfg))}))
    }

    async fn processor(cfg: &Config<SnapshotStatusSettings>) -> Result<StatusProcessor, BoxError> {
        let url = database_url(cfg);
        let password_file = cfg.settings.database_password_file.is_some();
        let store = Store::open(&url)
            .await
            .map_err(|e| e.at_start(Self::SECTION, password_file, &url))?;
        let p = StatusProcessor::new(
            store,
            &cfg.settings.export_state_exchange,
            &cfg.settings.monitoring_exchange,
        )
        // Within the retries there are: the last attempt drops it, never dead-letters it
        // as retries-exhausted.
        .with_missing_retries(
            MISSING_COLLECTION_RETRIES.min(cfg.retry.max_attempts.saturating_sub(1)),
        );
        Ok(p.pruning_runs(
            kept_for(cfg.settings.keep_completed_runs_days),
            kept_for(cfg.settings.keep_idle_runs_days),
        ))
    }

    fn extra_commands() -> Vec<clap::Command> {
        vec![cli::status_command()]
    }

    async fn run_extra(
        name: &str,
        args: &clap::ArgMatches,
        cfg: Config<SnapshotStatusSettings>,
    ) -> Result<(), framework::cli::Failure> {
        match name {
            "status" => cli::status(args, cfg).await,
            other => Err(framework::cli::Failure::Usage(format!(
                "unknown command `{other}`"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unnamed file counts once by this key, also across a release (a dead letter
    /// replayed after an upgrade must not count again): pinned, so a change of how it is
    /// made is seen as the break it is.
    #[test]
    fn dedupe_keys_are_pinned_across_releases() {
        let mut ctx = MessageContext::for_test("snapshot-sender", "snapshot.status.x", 0);
        let content = br#"{"collection_name":"db.c","correlation_id":"r"}"#;
        assert_eq!(
            dedupe_key(&ctx, "1", Some("sqs-1"), content, 0),
            "sqs:sqs-1:2d56c8f4814d2f21c943440d0afb8605376aa9bce46e05fcd0fe72ee41c6e863"
        );
        assert_eq!(
            dedupe_key(&ctx, "1", None, content, 0),
            "content:2d56c8f4814d2f21c943440d0afb8605376aa9bce46e05fcd0fe72ee41c6e863"
        );
        assert_eq!(
            dedupe_key(&ctx, "2", None, content, 1),
            "content:2d56c8f4814d2f21c943440d0afb8605376aa9bce46e05fcd0fe72ee41c6e863~2"
        );
        ctx.message_id = Some("m-1".into());
        assert_eq!(dedupe_key(&ctx, "3", None, content, 0), "message:m-1#3");
        ctx.message_id = Some("m\u{0}".into());
        assert_eq!(
            dedupe_key(&ctx, "3", None, content, 0),
            "message-sha256:187355b101e4d1f66c7948f93d109b63e1e0e5ec14eba8043e6428aff3a3e4ca#3"
        );
    }
}

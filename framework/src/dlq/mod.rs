//! Dead letters: the envelope a failed message is sent to `Q-dlq` in, and the operator's
//! tooling: list, replay (confirm before removing) and purge.

pub(crate) mod envelope;

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Serialize;

use crate::connection::{bounded, confirm_channel};
use crate::headers as h;
use crate::publisher::{Outgoing, PublishError, publish_confirmed};
use crate::topology::Topology;

/// One dead letter as shown by `dlq list`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// AMQP message id, if any.
    pub message_id: Option<String>,
    /// `x-error`.
    pub error: Option<String>,
    /// `x-error-kind` (broker-side dead letters have none; then the x-death reason).
    pub kind: Option<String>,
    /// Exchange it first came from (kept as `x-original-exchange` on replay).
    pub original_exchange: String,
    /// Routing key it first came with (kept as `x-original-routing-key` on replay).
    pub original_routing_key: String,
    /// `x-failed-at`.
    pub failed_at: Option<String>,
    /// Body size in bytes.
    pub size: usize,
    /// Dead-lettered by the broker straight from a producer's delivery: every header on it
    /// is the producer's (its kind, time and origin are the broker's `x-death` record), so
    /// its replay is read as a first arrival ([`crate::headers::PRODUCERS_REPLAY`]).
    #[serde(skip)]
    pub from_producer: bool,
}

impl DeadLetter {
    /// When it failed, where its failure time reads as one.
    fn failed_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        let t = chrono::DateTime::parse_from_rfc3339(self.failed_at.as_deref()?).ok()?;
        Some(t.with_timezone(&chrono::Utc))
    }
}

/// How a replay cut short is gone on with: the same command, given what is left of its
/// `--limit` (the whole limit again replayed more than asked).
fn go_on(left: Option<usize>) -> String {
    match left {
        Some(0) => "Its --limit is reached: nothing of it is left to replay".into(),
        Some(n) => format!(
            "Run the same command again with --limit {n} (what this one's limit left) to go on"
        ),
        None => "Run the same command again to go on".into(),
    }
}

/// A dead letter as an error names it: by its message id (shown safely), or as having none.
fn named(message_id: &Option<String>) -> String {
    match message_id {
        Some(id) => format!("message id `{}`", printable(id)),
        None => "a message without an id".into(),
    }
}

/// What an unconfirmed replay may have done: a publish that failed on the way (a lost
/// channel, no confirm in time) may have reached the queue before it did.
fn maybe_delivered(e: &PublishError) -> &'static str {
    match e {
        // The broker closed the channel over the publish itself: nothing landed.
        PublishError::Amqp(a)
            if crate::topology::is_soft(a, lapin::protocol::AMQPSoftError::ACCESSREFUSED) =>
        {
            " — the broker refused it, so nothing reached the queue: a replay publishes \
             through the default exchange, which takes `write` permission on `amq.default`"
        }
        PublishError::BodyTooLarge { .. } => {
            ": raise the broker's max_message_size, or leave this one out (--kind, --key, \
             --message-id)"
        }
        // A replay goes through the default exchange to `Q` by name: returned, `Q` is not
        // there (deleted, or mid-way through a queue-type change).
        PublishError::Unroutable(..) => {
            ": the service's queue does not exist — declare it (the service's `declare`, or \
             start the service), then replay again"
        }
        PublishError::Amqp(_) | PublishError::Timeout(_) => {
            " — it may have reached the service's queue all the same: replaying it again \
             may deliver it twice"
        }
        _ => "",
    }
}

/// Failures of the dead-letter tools.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Broker failure.
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    /// A purge sent and not answered (timed out, connection lost): the broker carries a
    /// purge out whatever the client does next.
    #[error(
        "the purge was sent but not answered ({0}): the broker may have purged the DLQ all \
         the same — `dlq list` shows what is left"
    )]
    PurgeUnanswered(lapin::Error),
    /// A quorum DLQ that said it held nothing could not be read: one without a leader
    /// says so whatever it holds.
    #[error(
        "the DLQ says it holds no dead letter but cannot be read ({0}): a quorum queue \
         without a leader (most of its nodes down or cut off) says so whatever it holds — \
         try again once its nodes are back"
    )]
    Unanswered(lapin::Error),
    /// A replay could not be confirmed; the dead letter was kept. Unless the broker
    /// refused it, the copy may have reached the queue all the same.
    #[error("replay not confirmed, dead letter kept: {0}{hint}", hint = maybe_delivered(.0))]
    Publish(#[from] PublishError),
    /// The replay was confirmed but the dead letter could not be removed (the channel or
    /// connection closed or blocked): it is still in the DLQ, and replaying it again
    /// delivers it twice.
    #[error(
        "replayed {} but could not remove its dead letter (channel or connection lost); it \
         is still in the DLQ: replaying it again delivers it twice",
        named(.0)
    )]
    NotRemoved(Option<String>),
    /// The broker or connection failed after some dead letters were replayed: the removal
    /// of the last one (sent, never answered) may not have reached the broker.
    #[error(
        "broker error after replaying dead letters: {error}; the last one replayed ({}) may \
         still be in the DLQ (its removal may not have reached the broker): replaying it \
         again may deliver it twice",
        named(.message_id)
    )]
    LostAfterReplaying {
        /// The broker's or connection's failure.
        error: lapin::Error,
        /// The message id of the last dead letter replayed.
        message_id: Option<String>,
    },
    /// A replay stopped before the dead letters it passed over had been held longer than
    /// the broker allows (its consumer timeout); what it replayed is replayed.
    #[error(
        "stopped after {moved} dead letter(s): those passed over had been held for \
         {held_secs} s, and the broker's consumer timeout would take the channel; they are \
         back in the DLQ. {}",
        go_on(*.left)
    )]
    Stopped {
        /// Dead letters replayed before it stopped.
        moved: usize,
        /// What is left of the replay's `--limit`: the run again is given that, not the
        /// whole limit again.
        left: Option<usize>,
        /// How long the passed-over ones were held, in seconds.
        held_secs: u64,
    },
    /// A dry run stopped before the dead letters it looked at had been held longer than the
    /// broker allows (a dry run holds each one it looks at: nothing is removed). A dry run
    /// run again starts from the head: it cannot look further.
    #[error(
        "dry run stopped after looking at {looked} of {total} dead letter(s) ({would} would be \
         replayed so far): it holds each one it looks at, and after {held_secs} s the broker's \
         consumer timeout would take the channel; nothing was replayed, and a dry run cannot \
         look further — narrow it (--kind, --key, --older-than, --limit) or replay without \
         --dry-run"
    )]
    DryRunStopped {
        /// Dead letters looked at.
        looked: usize,
        /// Dead letters in the DLQ when it began.
        total: usize,
        /// Of those looked at, how many would be replayed.
        would: usize,
        /// How long the first was held, in seconds.
        held_secs: u64,
    },
    /// The replay was stopped (SIGINT, SIGTERM) while the broker had not confirmed a
    /// publish (it blocks publishes during a resource alarm; or a second signal came
    /// first): that message may still land in `Q`, and its dead letter is kept.
    #[error(
        "interrupted after replaying {moved}, while the broker had not confirmed the replay \
         of {} (it blocks publishes during a resource alarm — \
         `rabbitmq-diagnostics alarms` — or the stop came before its confirm): that one may \
         still land in the queue once the broker takes it, and its dead letter is kept — \
         look for it in the queue before replaying it again, or it is delivered twice",
        named(message_id)
    )]
    Unconfirmed {
        /// Dead letters replayed and removed before it.
        moved: usize,
        /// The message id of the one left unconfirmed.
        message_id: Option<String>,
    },
    /// The replay was stopped (SIGINT, SIGTERM) between two dead letters.
    #[error(
        "interrupted after replaying {moved}: those are replayed and removed, the rest are \
         still in the DLQ. {}",
        go_on(*.left)
    )]
    Interrupted {
        /// Dead letters replayed and removed.
        moved: usize,
        /// What is left of the replay's `--limit` (see [`DlqError::Stopped`]).
        left: Option<usize>,
    },
    /// The replay was stopped at a second signal while it waited for the broker (not for
    /// a confirm: [`DlqError::Unconfirmed`]).
    #[error(
        "stopped at a second signal after replaying {moved}: those are replayed and removed, \
         the rest are still in the DLQ (one whose replay was confirmed as the stop came may \
         be there too: delivered twice if replayed again). {}",
        go_on(*.left)
    )]
    StoppedNow {
        /// Dead letters replayed (and removed, but for the last perhaps).
        moved: usize,
        /// What is left of the replay's `--limit` (see [`DlqError::Stopped`]).
        left: Option<usize>,
    },
    /// A dry run was stopped at a second signal while it waited for the broker.
    #[error(
        "dry run stopped at a second signal after {0} dead letter(s) that would be replayed: \
         nothing was replayed or removed"
    )]
    DryRunStoppedNow(usize),
    /// A dry run was stopped (SIGINT, SIGTERM) before it had looked at every dead letter.
    #[error(
        "dry run interrupted after looking at {looked} of {total} dead letters ({would} of \
         them would be replayed): nothing was replayed or removed"
    )]
    DryRunInterrupted {
        /// Dead letters looked at.
        looked: usize,
        /// Dead letters in the DLQ when it began.
        total: usize,
        /// Of those looked at, how many would be replayed.
        would: usize,
    },
    /// Another `dlq` command holds the service's dead letters.
    #[error(
        "another `dlq` command is working on {0} (the dead letters it passed are held until it \
         ends, so this one would see, replay or purge only part of them); try again once it \
         has finished"
    )]
    Busy(String),
}

/// Makes this connection the only `dlq` command on `topo`'s dead letters until it closes:
/// a command holds the dead letters it has passed (a filtered or paced replay, for
/// minutes), so a second one beside it found a message "not there", listed a fraction, or
/// purged a fraction and reported success. The lock is an exclusive queue, `Q-dlq.lock`,
/// which the broker deletes with the connection, however it ends.
pub async fn exclusive(conn: &Connection, topo: &Topology) -> Result<(), DlqError> {
    let t = topo.operation_timeout;
    let name = format!("{}.lock", topo.dlq());
    let ch = bounded(t, "channel.open", conn.create_channel()).await?;
    let mut args = FieldTable::default();
    // A policy's queue type cannot make it a quorum queue, which cannot be exclusive.
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("classic".into()),
    );
    let declare = ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        args,
    );
    match bounded(t, "queue.declare", declare).await {
        Ok(_) => {
            let _ = bounded(t, "channel.close", ch.close(200, "locked".into())).await;
            Ok(())
        }
        Err(e) if crate::topology::is_soft(&e, lapin::protocol::AMQPSoftError::RESOURCELOCKED) => {
            Err(DlqError::Busy(topo.dlq()))
        }
        // A user without `configure` on the lock's name (an operator's read-only account)
        // still runs the command, unguarded, as before the lock.
        Err(e) if crate::topology::is_soft(&e, lapin::protocol::AMQPSoftError::ACCESSREFUSED) => {
            tracing::warn!(queue = %name,
                "no permission to declare the dlq lock: running without it (another dlq command \
                 beside this one would see only part of the dead letters)");
            Ok(())
        }
        // A vhost sized to the service's own queues (`max-queues`) has no room for it:
        // the same, rather than no dlq command at all.
        Err(e) if crate::connection::is_limit(&e) => {
            tracing::warn!(queue = %name, error = %e,
                "the vhost's queue limit leaves no room for the dlq lock: running without it \
                 (another dlq command beside this one would see only part of the dead letters)");
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

/// Every kind a dead letter can have: the framework's `x-error-kind`, or the broker's
/// reason when it dead-lettered the message itself (`dlq replay --kind` takes no other, so
/// a typo is refused instead of replaying nothing).
pub const KINDS: [&str; 6] = [
    crate::headers::KIND_PERMANENT,
    crate::headers::KIND_RETRIES_EXHAUSTED,
    "rejected",
    "expired",
    "maxlen",
    "delivery_limit",
];

fn describe(
    props: &lapin::BasicProperties,
    routing_key: &str,
    size: usize,
    queue: &str,
) -> DeadLetter {
    let hdr = props.headers().clone().unwrap_or_default();
    // The broker's reason for the latest dead-lettering: `x-death` lists the newest event
    // first, while `x-first-death-reason` keeps the first (a retry tier's `expired`).
    let latest = latest_death(&hdr);
    let death_reason = latest
        .and_then(|d| h::get_str(d, "reason"))
        .or_else(|| h::get_str(&hdr, "x-last-death-reason"))
        .or_else(|| h::get_str(&hdr, "x-first-death-reason"));
    let death_exchange = h::get_str(&hdr, "x-first-death-exchange");
    // Dead-lettered by the broker from a delivery that came to the service's queue through
    // a producer's exchange, not back through the default one: every header on it is the
    // producer's — `x-original-*`, `x-service`, `x-error*`, progress marks — which the
    // service never wrote; its origin is where the broker says it was published and its
    // failure the broker's record (a replay would otherwise hand forged ones to the
    // processor, and a forged kind or time would pick it for a filtered replay).
    let producers = latest
        .filter(|d| {
            h::get_str(&hdr, h::SERVICE).is_none()
                || h::get_str(d, "queue").as_deref() == Some(queue)
        })
        .and_then(|d| Some((h::get_str(d, "exchange")?, d)))
        .filter(|(exchange, _)| !exchange.is_empty());
    // Or the broker's dead letter of a producer's message replayed before (the marker that
    // replay set is on it, and its `x-death` now names the default exchange): its headers
    // are still the producer's, and its origin the one that replay wrote. The service
    // never writes the marker on a dead letter of its own (it is taken off the delivery).
    let from_producer = producers.is_some() || hdr.inner().contains_key(h::PRODUCERS_REPLAY);
    let (original_exchange, original_routing_key) = match producers {
        Some((exchange, d)) => (
            exchange,
            first_routing_key(d).unwrap_or_else(|| routing_key.to_string()),
        ),
        None => (
            h::get_str(&hdr, h::ORIGINAL_EXCHANGE)
                .or(death_exchange)
                .unwrap_or_default(),
            h::get_str(&hdr, h::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| routing_key.to_string()),
        ),
    };
    DeadLetter {
        // Blank is none, as the service reads it (shown `-`).
        message_id: props
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .filter(|s| !s.trim().is_empty()),
        error: h::get_str(&hdr, h::ERROR).filter(|_| !from_producer),
        kind: h::get_str(&hdr, h::ERROR_KIND)
            .filter(|_| !from_producer)
            .or(death_reason),
        original_exchange,
        original_routing_key,
        // Dead-lettered by the broker (its delivery limit), it has no `x-failed-at`: the
        // time of its latest dead-lettering is when it failed.
        failed_at: h::get_str(&hdr, h::FAILED_AT)
            .filter(|_| !from_producer)
            .or_else(|| latest.and_then(death_time)),
        size,
        from_producer,
    }
}

/// The first of an `x-death` entry's `routing-keys` (those the message was published with).
fn first_routing_key(death: &lapin::types::FieldTable) -> Option<String> {
    use lapin::types::AMQPValue;
    let Some(AMQPValue::FieldArray(keys)) = death.inner().get("routing-keys") else {
        return None;
    };
    match keys.as_slice().first()? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// The newest `x-death` entry, if the broker dead-lettered the message.
fn latest_death(hdr: &lapin::types::FieldTable) -> Option<&lapin::types::FieldTable> {
    use lapin::types::AMQPValue;
    let Some(AMQPValue::FieldArray(deaths)) = hdr.inner().get("x-death") else {
        return None;
    };
    match deaths.as_slice().first() {
        Some(AMQPValue::FieldTable(newest)) => Some(newest),
        _ => None,
    }
}

/// An `x-death` entry's `time` (a timestamp in seconds) as RFC 3339, like `x-failed-at`.
fn death_time(death: &lapin::types::FieldTable) -> Option<String> {
    use lapin::types::AMQPValue;
    let secs = match death.inner().get("time")? {
        AMQPValue::Timestamp(t) => i64::try_from(*t).ok()?,
        _ => h::get_int(death, "time")?,
    };
    chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

/// `s` with control characters escaped (`\n`, `\u{1b}`): a dead letter's headers come
/// from publishers and file names, and must not move the operator's cursor or hide text
/// when `dlq list` prints them.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    // Writing to a String cannot fail.
    let _ = crate::telemetry::write_escaped(&mut out, s);
    out
}

/// Messages ready in `queue` (a passive declare: fails if the queue does not exist).
pub async fn count(ch: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    Ok(depth(ch, queue).await?.0)
}

/// How many dead letters `topo`'s DLQ holds. A passive declare says, except that a
/// quorum queue without a leader (a cluster that lost its majority) answers 0 whatever it
/// holds: an operator would be shown "0 of 0", told "no dead letter matched" and republish
/// from upstream what the DLQ still holds. So a quorum DLQ that says 0 is asked for one
/// dead letter too, bounded: one that cannot answer fails the command.
async fn dlq_total(ch: &Channel, topo: &Topology, t: Duration) -> Result<u32, DlqError> {
    let dlq = topo.dlq();
    let total = bounded(t, "queue.declare", count(ch, &dlq)).await?;
    if total > 0 || topo.queue_type != crate::config::QueueType::Quorum {
        return Ok(total);
    }
    let get = ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: false });
    let got = bounded(t, "basic.get", get)
        .await
        .map_err(DlqError::Unanswered)?;
    match got {
        None => Ok(0),
        // One dead-lettered since the count: given back, and counted again.
        Some(m) => {
            let give_back = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            bounded(
                t,
                "basic.nack",
                ch.basic_nack(m.delivery.delivery_tag, give_back),
            )
            .await?;
            let again = bounded(t, "queue.declare", count(ch, &dlq)).await?;
            Ok(again.max(1))
        }
    }
}

/// Messages ready in `queue` and its consumers, by a passive declare.
pub async fn depth(ch: &Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Reads up to `limit` dead letters without removing them (they return when the channel closes).
pub async fn list(
    conn: &Connection,
    topo: &Topology,
    limit: usize,
) -> Result<Vec<DeadLetter>, DlqError> {
    Ok(list_of_total(conn, topo, limit).await?.items)
}

/// What a look at the DLQ found ([`list_of_total`]).
#[derive(Debug)]
pub struct Listing {
    /// The dead letters shown, oldest first.
    pub items: Vec<DeadLetter>,
    /// How many the DLQ held (an operator shown 20 must know whether that is all).
    pub total: usize,
    /// Whether the look stopped before its limit, having held what it read for
    /// [`HOLD_AT_MOST`]: the broker's consumer timeout would close a channel holding
    /// them longer, cutting the look off with a broker error and nothing shown.
    pub cut_short: bool,
}

/// [`list`], and how many dead letters the DLQ held.
pub async fn list_of_total(
    conn: &Connection,
    topo: &Topology,
    limit: usize,
) -> Result<Listing, DlqError> {
    list_held_at_most(conn, topo, limit, HOLD_AT_MOST).await
}

/// [`list_of_total`], reading for no longer than `hold` (at least one dead letter).
pub async fn list_held_at_most(
    conn: &Connection,
    topo: &Topology,
    limit: usize,
    hold: Duration,
) -> Result<Listing, DlqError> {
    let mut items = Vec::new();
    let looked = list_each(conn, topo, limit, hold, |d| items.push(d)).await?;
    Ok(Listing {
        items,
        total: looked.total,
        cut_short: looked.cut_short,
    })
}

/// What a look at the DLQ whose dead letters went to a callback found ([`list_each`]).
#[derive(Debug, Clone, Copy)]
pub struct Looked {
    /// How many dead letters were shown.
    pub shown: usize,
    /// How many the DLQ held.
    pub total: usize,
    /// Whether the look stopped before its limit ([`Listing::cut_short`]).
    pub cut_short: bool,
}

/// Reads up to `limit` dead letters without removing them, for no longer than `hold` (at
/// least one), handing each to `each` as it is read: `dlq list` prints them as they come,
/// holding none of them (a look at a million kept them all, and printed nothing if
/// stopped). They return to the DLQ, in order, before it ends.
pub async fn list_each(
    conn: &Connection,
    topo: &Topology,
    limit: usize,
    hold: Duration,
    mut each: impl FnMut(DeadLetter),
) -> Result<Looked, DlqError> {
    // Every broker call bounded: an operator's command never hangs on a stuck broker.
    let t = topo.operation_timeout;
    let ch = bounded(t, "channel.open", conn.create_channel()).await?;
    let total = dlq_total(&ch, topo, t).await? as usize;
    let began = tokio::time::Instant::now();
    let mut shown = 0usize;
    let mut last = None;
    let mut cut_short = false;
    let looped: Result<(), DlqError> = async {
        while shown < limit.min(total) {
            if shown > 0 && began.elapsed() >= hold {
                cut_short = true;
                break;
            }
            let get = ch.basic_get(
                topo.dlq().as_str().into(),
                BasicGetOptions { no_ack: false },
            );
            let Some(m) = bounded(t, "basic.get", get).await? else {
                break;
            };
            last = Some(m.delivery.delivery_tag);
            each(describe(
                &m.delivery.properties,
                m.delivery.routing_key.as_str(),
                m.delivery.data.len(),
                &topo.queue,
            ));
            shown += 1;
        }
        Ok(())
    }
    .await;
    // Given back in order and awaited on a failure too (a `basic.get` past its time): left
    // held until the connection closed, they went behind the rest of the DLQ on 3.x, and
    // on 4.x a command right after the failed one missed those still on their way back.
    let through = ReadThrough::allowed(conn, topo).await.then(|| ReadThrough {
        until: began + hold,
        stop: None,
    });
    Held { last }
        .give_back_in_order(&ch, &topo.dlq(), through, t)
        .await;
    let _ = bounded(t, "channel.close", ch.close(200, "list done".into())).await;
    let returned = await_returned(conn, &topo.dlq(), total as u32, t).await;
    if let Err(e) = looped {
        if let Err(c) = returned {
            tracing::warn!(error = %c, "the dead letters looked at could not be counted back after the look failed");
        }
        return Err(e);
    }
    returned?;
    Ok(Looked {
        shown,
        total,
        cut_short,
    })
}

/// The dead letters a look at the DLQ holds on its channel (fetched, not removed).
#[derive(Default)]
struct Held {
    /// The delivery tag of the last one fetched and not removed.
    last: Option<u64>,
}

/// How far a look may go on holding the rest of the DLQ to give everything back in order.
struct ReadThrough<'a> {
    /// Held no later than this: the broker's consumer timeout takes a channel holding a
    /// delivery longer than it allows (30 minutes by default), returning what it held in
    /// another order.
    until: tokio::time::Instant,
    /// The operator's Ctrl-C: they wait for no more reading.
    stop: Option<&'a tokio_util::sync::CancellationToken>,
}

impl ReadThrough<'_> {
    /// Whether `topo`'s DLQ may be read through: not a classic one (no need); not where a delivery limit counts each
    /// look (a `Q-dlq` an earlier release declared with RabbitMQ 4.x's default of 20, as it
    /// is kept): there every dead letter read through would count a delivery, where the
    /// look itself counted only those it showed. Where the check cannot be made, not.
    async fn allowed(conn: &Connection, topo: &Topology) -> bool {
        // A classic queue puts what is given back at its old place: nothing to keep.
        if topo.queue_type == crate::config::QueueType::Classic {
            return false;
        }
        matches!(
            tokio::time::timeout(topo.operation_timeout, topo.dlq_delivery_limit_kept(conn)).await,
            Ok(Ok(false))
        )
    }
}

impl Held {
    /// Gives back every dead letter held on `ch`, in the order `queue` had them. RabbitMQ
    /// 3.x's quorum queues put what a channel gives back behind what it did not hold, and
    /// a closed channel's return even shuffles it: a `list` of the first 20 moved them to
    /// the tail, and a replay of 20 after it took 20 others. So where `through` allows,
    /// the rest of the queue is held too (those arrived meanwhile included), and everything
    /// goes back in one `basic.nack(multiple)`, in order. Whatever fails here, the dead
    /// letters are not lost: they return when the channel closes, perhaps out of order (a
    /// warning says so).
    async fn give_back_in_order(
        mut self,
        ch: &Channel,
        queue: &str,
        through: Option<ReadThrough<'_>>,
        t: Duration,
    ) {
        // Nothing held, nothing can come back out of order: the rest is not read.
        let through = through.filter(|_| self.last.is_some());
        let mut whole = through.is_none();
        let given_back = async {
            if let Some(through) = &through {
                loop {
                    if tokio::time::Instant::now() >= through.until
                        || through.stop.is_some_and(|s| s.is_cancelled())
                    {
                        break;
                    }
                    let get = ch.basic_get(queue.into(), BasicGetOptions { no_ack: false });
                    let Some(m) = bounded(t, "basic.get", get).await? else {
                        whole = true;
                        break;
                    };
                    self.last = Some(m.delivery.delivery_tag);
                }
            }
            if let Some(tag) = self.last {
                let give_back = BasicNackOptions {
                    multiple: true,
                    requeue: true,
                };
                bounded(t, "basic.nack", ch.basic_nack(tag, give_back)).await?;
            }
            Ok::<(), lapin::Error>(())
        };
        match given_back.await {
            Err(e) => tracing::warn!(queue, error = %e,
                "could not give the dead letters looked at back in their order: they return \
                 as the channel closes, perhaps in another order"),
            Ok(()) if !whole && self.last.is_some() => tracing::warn!(
                queue,
                "gave the dead letters looked at back before reading the rest of the DLQ (out \
                 of time, or stopped): on RabbitMQ 3.x they now come after the others"
            ),
            Ok(()) => {}
        }
    }
}

/// How long a look at the DLQ waits for the dead letters it held to be back.
const RETURN_WAIT: Duration = Duration::from_secs(10);

/// Waits (bounded) until `queue` holds `n` ready messages again: messages a closed channel
/// held return to a quorum queue asynchronously (on RabbitMQ 4.x visibly so), and the
/// operator's next command — a replay right after a list — must find them there.
async fn await_returned(
    conn: &Connection,
    queue: &str,
    n: u32,
    t: Duration,
) -> Result<(), DlqError> {
    let ch = bounded(t, "channel.open", conn.create_channel()).await?;
    let deadline = tokio::time::Instant::now() + RETURN_WAIT;
    let mut back = bounded(t, "queue.declare", count(&ch, queue)).await?;
    while back < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        back = bounded(t, "queue.declare", count(&ch, queue)).await?;
    }
    if back < n {
        // Another consumer of the DLQ, or the broker dropping what was looked at: a
        // policy's `delivery-limit` (each look counts a delivery), `message-ttl`,
        // `overflow: drop-head`. Said, so a browse that cost dead letters is not silent.
        tracing::warn!(queue = %queue, expected = n, back,
            "fewer dead letters are back in the queue than were looked at: another consumer \
             took them, or the broker dropped them (a `delivery-limit`, `message-ttl` or \
             `overflow` policy on this queue?)");
    }
    let _ = bounded(t, "channel.close", ch.close(200, "counted".into())).await;
    Ok(())
}

/// Which dead letters a replay moves.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every dead letter present when the replay starts.
    All,
    /// Only those with this message id.
    MessageId(String),
}

/// What an operator narrows a replay to after an incident; every set field must match.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only this message id.
    pub message_id: Option<String>,
    /// Only this `x-error-kind` (`permanent`, `retries-exhausted`) or, for a dead letter
    /// the broker made, its `x-death` reason (`rejected`, `delivery_limit`, …).
    pub kind: Option<String>,
    /// Only original routing keys matching this topic pattern (`*` one word, `#` any).
    pub key: Option<String>,
    /// Only dead letters that failed at least this long ago.
    pub older_than: Option<Duration>,
    /// At most this many.
    pub limit: Option<usize>,
    /// At most this many per second (a downstream just back is not flooded).
    pub per_second: Option<f64>,
    /// How long the dead letters passed over may be held before the replay stops (None:
    /// [`HOLD_AT_MOST`]).
    pub hold_at_most: Option<Duration>,
    /// Cancelled to stop the replay before its next dead letter (an operator's Ctrl-C).
    pub stop: Option<tokio_util::sync::CancellationToken>,
    /// Cancelled to stop it at once, even while a copy waits for its confirm (a second
    /// Ctrl-C): that copy is named ([`DlqError::Unconfirmed`]), as it may still land.
    pub stop_now: Option<tokio_util::sync::CancellationToken>,
}

/// How long a replay holds the dead letters it passed over (unacknowledged on its channel,
/// so that each look fetches the next one) before it stops and hands them back: the
/// broker's consumer timeout (30 minutes by default) closes a channel holding a delivery
/// longer, which cut a long paced or filtered replay off halfway with a broker error.
pub const HOLD_AT_MOST: Duration = Duration::from_secs(5 * 60);

impl From<&Selection> for Filter {
    fn from(s: &Selection) -> Self {
        match s {
            Selection::All => Filter::default(),
            Selection::MessageId(id) => Filter {
                message_id: Some(id.clone()),
                ..Filter::default()
            },
        }
    }
}

impl Filter {
    /// What is left of the `--limit` once `moved` dead letters are replayed.
    pub fn left_after(&self, moved: usize) -> Option<usize> {
        self.limit.map(|n| n.saturating_sub(moved))
    }

    fn matches(&self, d: &DeadLetter, now: chrono::DateTime<chrono::Utc>) -> bool {
        // The id as it is, or as `dlq list` shows it (escaped: an id with a byte-order
        // mark or a newline is pasted from the list in that form).
        if let Some(id) = &self.message_id
            && d.message_id
                .as_ref()
                .is_none_or(|m| m != id && printable(m) != *id)
        {
            return false;
        }
        if self
            .kind
            .as_ref()
            .is_some_and(|k| d.kind.as_ref() != Some(k))
        {
            return false;
        }
        if self
            .key
            .as_ref()
            .is_some_and(|p| !topic_matches(p, &d.original_routing_key))
        {
            return false;
        }
        if let Some(age) = self.older_than {
            // A dead letter with no failure time is as old as can be.
            if let Some(t) = d.failed_time() {
                let elapsed = now.signed_duration_since(t);
                if elapsed.to_std().map_or(true, |e| e < age) {
                    return false;
                }
            }
        }
        true
    }
}

/// Whether routing key `key` matches topic pattern `pattern` as a RabbitMQ topic binding
/// would (`*` exactly one word, `#` zero or more words).
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    // The broker reads an empty key or pattern as no words at all, so an empty pattern
    // selects exactly the dead letters published with an empty key.
    let p: Vec<&str> = if pattern.is_empty() {
        Vec::new()
    } else {
        pattern.split('.').collect()
    };
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    // `m[j]`: the pattern's words so far match the key's first `j` words. One pass per
    // pattern word, so a pattern of several `#` against a long key (a producer's) takes
    // words × words steps, where trying each split of the key in turn took exponentially
    // many.
    let mut m = vec![false; k.len() + 1];
    m[0] = true;
    for w in &p {
        if *w == "#" {
            for j in 1..=k.len() {
                m[j] = m[j] || m[j - 1];
            }
        } else {
            for j in (1..=k.len()).rev() {
                m[j] = m[j - 1] && (*w == "*" || *w == k[j - 1]);
            }
            m[0] = false;
        }
    }
    m[k.len()]
}

/// Parses an age such as `90s`, `30m`, `2h`, `7d` (a bare number is seconds).
pub fn parse_age(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not an age like 90s, 30m, 2h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => {
            return Err(format!(
                "`{s}`: an age is a whole number followed by s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(secs))
}

/// Republishes selected dead letters to the service's own queue `Q` (through the default
/// exchange, never to the original exchange, whose other subscribers must not see the
/// message again), keeping where each first came from in `x-original-exchange` /
/// `x-original-routing-key`. Each is removed from the DLQ only after the broker confirmed
/// its replay. Returns what was (or, with `dry_run`, would be) replayed.
pub async fn replay(
    conn: &Connection,
    topo: &Topology,
    selection: &Selection,
    dry_run: bool,
) -> Result<Vec<DeadLetter>, DlqError> {
    replay_filtered(conn, topo, &Filter::from(selection), dry_run).await
}

/// [`replay`] narrowed by `filter` (kind, key pattern, age, count, rate). Killed at any
/// point it loses nothing: each dead letter is removed only after its replay was confirmed.
pub async fn replay_filtered(
    conn: &Connection,
    topo: &Topology,
    filter: &Filter,
    dry_run: bool,
) -> Result<Vec<DeadLetter>, DlqError> {
    let mut moved = Vec::new();
    replay_each(conn, topo, filter, dry_run, |d| moved.push(d.clone())).await?;
    Ok(moved)
}

/// [`replay_filtered`], telling `each` of every dead letter as it is replayed (or would
/// be) instead of keeping them: a replay of millions holds none of them in memory, and one
/// cut short has said which it moved. Returns how many.
pub async fn replay_each(
    conn: &Connection,
    topo: &Topology,
    filter: &Filter,
    dry_run: bool,
    mut each: impl FnMut(&DeadLetter),
) -> Result<usize, DlqError> {
    // The last one replayed, and whether there was one.
    let mut last: Option<Option<String>> = None;
    let replayed = replay_each_told(conn, topo, filter, dry_run, |d| {
        last = Some(d.message_id.clone());
        each(d);
    })
    .await;
    match (replayed, last) {
        // The broker or connection lost after a removal was sent: an ack is written, not
        // answered, so the last one may still be in the DLQ, and "broker error" alone sent
        // the operator to run it again, delivering it twice unwarned.
        (Err(DlqError::Amqp(error)), Some(message_id)) if !dry_run => {
            Err(DlqError::LostAfterReplaying { error, message_id })
        }
        (r, _) => r,
    }
}

/// [`replay_each`] itself.
async fn replay_each_told(
    conn: &Connection,
    topo: &Topology,
    filter: &Filter,
    dry_run: bool,
    mut each: impl FnMut(&DeadLetter),
) -> Result<usize, DlqError> {
    let ch = bounded(
        topo.operation_timeout,
        "channel.open",
        confirm_channel(conn),
    )
    .await?;
    // A replay published during a resource alarm lands when it clears: timed out, the
    // dead letter would stay and a second replay publish it again.
    let watching = tokio_util::sync::CancellationToken::new();
    let alarm = crate::alarm::Alarm::watch(conn, watching.clone(), None);
    let _stop_watching = watching.drop_guard();
    let now = chrono::Utc::now();
    let pace = filter
        .per_second
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let mut next_at = tokio::time::Instant::now();
    let t = topo.operation_timeout;
    let total = dlq_total(&ch, topo, t).await?;
    let mut moved = 0usize;
    let hold_at_most = filter.hold_at_most.unwrap_or(HOLD_AT_MOST);
    // Since when a dead letter passed over is held (none: nothing held).
    let mut held_since: Option<tokio::time::Instant> = None;
    let mut stopped = None;
    let mut interrupted = false;
    // Dead letters fetched so far (a dry run that stops says how far it got).
    let mut looked = 0usize;
    let mut held = Held::default();
    let stop = filter.stop.clone().unwrap_or_default();
    let stop_now = filter.stop_now.clone().unwrap_or_default();
    // This run's mark on what it replays: a copy that failed again and is back in the DLQ
    // is not one of the `total` it set out to look at.
    let run = uuid::Uuid::new_v4().to_string();
    // Dead letters of the `total` fetched so far (this run's own copies not counted).
    let mut fetched = 0u32;
    // The delivery tag of the last dead letter fetched: a replay that fails holds it and
    // those passed over before it.
    let mut last_fetched = None;
    // Every exit of the loop, failures too, goes on below: what it holds is given back
    // and waited for, so the DLQ keeps its order and the operator's next command (as a
    // failure's text invites) finds every dead letter there.
    let looped: Result<(), DlqError> = async {
        while fetched < total {
            if stop.is_cancelled() {
                interrupted = true;
                break;
            }
            // Its limit reached, a replay is done: looked at before the hold limit, which
            // would call it stopped with nothing of its limit left.
            if filter.limit.is_some_and(|n| moved >= n) {
                break;
            }
            // Stopped before the next look or replay (its paced wait included) would hold
            // the first one passed over longer than allowed.
            // Only once it has moved some: one that stopped before its first would stop
            // there again on every run (a match deep in a long DLQ), so it looks on as it
            // did before, for as long as the broker lets it.
            let next = next_at.max(tokio::time::Instant::now());
            if let Some(since) = held_since
                && moved > 0
                && next.duration_since(since) >= hold_at_most
            {
                stopped = Some(since.elapsed());
                break;
            }
            // Paced before the look, not after it: a dead letter fetched and then held through
            // the wait (1000 s at `--rate 0.001`) could outlast the broker's consumer timeout.
            if !dry_run && pace.is_some() {
                tokio::select! {
                    _ = tokio::time::sleep_until(next_at) => {}
                    _ = stop.cancelled() => {
                        interrupted = true;
                        break;
                    }
                }
            }
            let get = ch.basic_get(
                topo.dlq().as_str().into(),
                BasicGetOptions { no_ack: false },
            );
            let Some(m) = bounded(t, "basic.get", get).await? else {
                break;
            };
            let d = m.delivery;
            last_fetched = Some(d.delivery_tag);
            let own = d
                .properties
                .headers()
                .as_ref()
                .and_then(|t| h::get_str(t, h::REPLAY_RUN))
                .is_some_and(|r| r == run);
            if own {
                // Replayed by this run and failed again: left where it is, like one passed over.
                held_since.get_or_insert_with(tokio::time::Instant::now);
                held.last = Some(d.delivery_tag);
                continue;
            }
            let info = describe(
                &d.properties,
                d.routing_key.as_str(),
                d.data.len(),
                &topo.queue,
            );
            // One of priority 5 or more that failed after the run began is not one of the
            // `total` either (looked at all the same): a quorum DLQ on RabbitMQ 4.x hands
            // such a one out before those already there, and counted it took the place of one
            // the run then never looked at, while the run said it had replayed them all. Only
            // those: the rule compares this host's clock with the writer's, and any other
            // arrival comes after the dead letters the run set out to look at. (A second's
            // margin: the failure time is written in whole seconds.)
            let arrived = d.properties.priority().is_some_and(|p| p >= 5)
                && info
                    .failed_time()
                    .is_some_and(|t| t > now + chrono::TimeDelta::seconds(1));
            if !arrived {
                fetched += 1;
            }
            looked += 1;
            let wanted = filter.matches(&info, now);
            // A dry run holds what it would replay too (nothing is removed).
            if dry_run || !wanted {
                held_since.get_or_insert_with(tokio::time::Instant::now);
                held.last = Some(d.delivery_tag);
            }
            if !wanted {
                continue;
            }
            if !dry_run {
                if let Some(p) = pace {
                    next_at = tokio::time::Instant::now() + p;
                }
                let mut hdr =
                    h::without_where(&d.properties.headers().clone().unwrap_or_default(), |k| {
                        h::replay_stripped(k) || (info.from_producer && k == h::BATCH_PART)
                    });
                if info.from_producer {
                    h::set_str(&mut hdr, h::PRODUCERS_REPLAY, "true");
                }
                h::set_str(&mut hdr, h::REPLAY_RUN, &run);
                h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, &info.original_exchange);
                h::set_str(
                    &mut hdr,
                    h::ORIGINAL_ROUTING_KEY,
                    &info.original_routing_key,
                );
                let published = publish_confirmed(
                    &ch,
                    vec![Outgoing {
                        exchange: String::new(),
                        routing_key: topo.queue.clone(),
                        body: d.data.clone(),
                        properties: crate::publisher::republished(&d.properties, hdr),
                        mandatory: true,
                        broker_adds: 0,
                    }],
                    &alarm,
                    topo.operation_timeout,
                    crate::connection::frame_max(conn),
                );
                // The wait for a confirm has no end while the broker blocks publishes (a
                // resource alarm): a stop asked for meanwhile ends it, saying that this one
                // may still land, as a second stop does whatever the broker does. Otherwise
                // the confirm is on its way (bounded): waited for, so the dead letter is
                // removed and the stop falls between two dead letters.
                tokio::pin!(published);
                loop {
                    tokio::select! {
                        r = &mut published => {
                            // Refused for its size (a dead letter the broker made of an input
                            // larger than it now accepts): nothing landed, and it never will.
                            r.map_err(|e| e.sized("", d.data.len()))?;
                            break;
                        }
                        _ = stop.cancelled(), if !stop.is_cancelled() => {}
                        _ = stop_now.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)), if stop.is_cancelled() => {}
                    }
                    if (stop.is_cancelled() && alarm.blocked()) || stop_now.is_cancelled() {
                        return Err(DlqError::Unconfirmed {
                            moved,
                            message_id: info.message_id,
                        });
                    }
                }
                // Confirmed in `Q`: whatever keeps the ack from landing (a closed channel, a
                // connection lost or blocked) leaves the dead letter too, and the operator must
                // hear that a second replay would deliver it twice, not "broker error".
                if !matches!(
                    bounded(t, "basic.ack", d.acker.ack(BasicAckOptions::default())).await,
                    Ok(true)
                ) {
                    // The ack may have landed: a give-back naming its tag would close the
                    // channel; it returns as the channel closes, if it is still there.
                    last_fetched = held.last;
                    return Err(DlqError::NotRemoved(info.message_id));
                }
                // Removed: a failure from here on gives back only what is held (a nack
                // naming a tag acked already would close the channel instead).
                last_fetched = held.last;
            }
            each(&info);
            moved += 1;
        }
        Ok(())
    }
    .await;
    if let Err(e) = looped {
        // Stopped at once (a second signal, or a stop while the broker blocks publishes,
        // when it would not read a give-back either): what is held returns as the
        // connection closes.
        if matches!(e, DlqError::Unconfirmed { .. }) {
            return Err(e);
        }
        held.last = last_fetched;
        let cleanup = async {
            let through = ReadThrough::allowed(conn, topo).await.then(|| ReadThrough {
                until: held_since.unwrap_or_else(tokio::time::Instant::now) + hold_at_most,
                stop: Some(&stop),
            });
            held.give_back_in_order(&ch, &topo.dlq(), through, t).await;
            let _ = bounded(t, "channel.close", ch.close(200, "replay failed".into())).await;
            let kept = total.saturating_sub(u32::try_from(moved).unwrap_or(u32::MAX));
            if let Err(c) = await_returned(conn, &topo.dlq(), kept, t).await {
                tracing::warn!(error = %c, "the dead letters left could not be counted after the replay failed");
            }
        };
        // A second signal ends the clean-up too: the operator waits for no more.
        tokio::select! {
            () = cleanup => {}
            () = stop_now.cancelled() => {}
        }
        return Err(e);
    }
    // Stopped or interrupted, it holds no more than it did: the broker's consumer timeout
    // may be near, or the operator waits.
    let through = match stopped.is_none() && !interrupted {
        true => ReadThrough::allowed(conn, topo).await.then(|| ReadThrough {
            until: held_since.unwrap_or_else(tokio::time::Instant::now) + hold_at_most,
            stop: Some(&stop),
        }),
        false => None,
    };
    held.give_back_in_order(&ch, &topo.dlq(), through, t).await;
    // Answered, the close says the broker took every removal sent on the channel before it.
    let closed = bounded(t, "channel.close", ch.close(200, "replay done".into()))
        .await
        .is_ok();
    let done = u32::try_from(moved).unwrap_or(u32::MAX);
    let kept = total.saturating_sub(if dry_run { 0 } else { done });
    debug_assert!(kept <= total);
    match await_returned(conn, &topo.dlq(), kept, t).await {
        // The replay is done: a count that fails after it is not its failure (reported as
        // one, the last dead letter was named as maybe still in the DLQ, which it cannot be).
        Err(e) if closed => tracing::warn!(
            error = %e,
            replayed = moved,
            "the replay is done; the dead letters left could not be counted after it"
        ),
        r => r?,
    }
    if interrupted && dry_run {
        return Err(DlqError::DryRunInterrupted {
            looked,
            total: total as usize,
            would: moved,
        });
    }
    if interrupted {
        return Err(DlqError::Interrupted {
            moved,
            left: filter.left_after(moved),
        });
    }
    match stopped {
        // The message id asked for is replayed: a second dead letter of that id (a message
        // dead-lettered twice) would be further back. Reported as done, not as "run it
        // again" — run again, it finds none and fails, and an operator told twice it
        // failed republishes from upstream what is already replayed.
        Some(held) if moved > 0 && filter.message_id.is_some() => {
            tracing::warn!(
                looked,
                total,
                held_secs = held.as_secs(),
                "stopped looking for more dead letters with this message id (the broker's \
                 consumer timeout); any further back are still in the DLQ"
            );
            Ok(moved)
        }
        Some(held) if dry_run => Err(DlqError::DryRunStopped {
            looked,
            total: total as usize,
            would: moved,
            held_secs: held.as_secs(),
        }),
        Some(held) => Err(DlqError::Stopped {
            moved,
            left: filter.left_after(moved),
            held_secs: held.as_secs(),
        }),
        None => Ok(moved),
    }
}

/// Deletes every dead letter; returns how many.
pub async fn purge(conn: &Connection, topo: &Topology) -> Result<u32, DlqError> {
    let t = topo.operation_timeout;
    let ch = bounded(t, "channel.open", conn.create_channel()).await?;
    let purge = ch.queue_purge(topo.dlq().as_str().into(), QueuePurgeOptions::default());
    let n = bounded(t, "queue.purge", purge).await.map_err(|e| {
        // The broker's refusal of the purge itself (a channel error: no such queue, no
        // permission) purged nothing; a connection closed meanwhile (a node shutting down)
        // may have come after it purged.
        if matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
            if matches!(p.kind(), lapin::protocol::AMQPErrorKind::Soft(_)))
        {
            DlqError::Amqp(e)
        } else {
            DlqError::PurgeUnanswered(e)
        }
    })?;
    let _ = bounded(t, "channel.close", ch.close(200, "purge done".into())).await;
    Ok(n)
}

#[cfg(test)]
mod tests {

    /// A replay cut short with nothing left of its limit says so, not "again with
    /// --limit 0" (which the command refuses).
    #[test]
    fn a_replay_cut_short_names_what_its_limit_left() {
        assert!(super::go_on(Some(3)).contains("again with --limit 3"));
        assert!(!super::go_on(Some(0)).contains("--limit 0"));
        assert!(super::go_on(None).contains("same command again"));
    }
    /// An unconfirmed replay says it may have been delivered where it may (the confirm
    /// lost on the way), not where the broker refused it; the default exchange is named
    /// in words, not as empty quotes.
    #[test]
    fn an_unconfirmed_replay_says_whether_it_may_have_been_delivered() {
        use crate::publisher::PublishError;
        let lost = super::DlqError::Publish(PublishError::Timeout(String::new())).to_string();
        assert!(lost.contains("may have reached"), "{lost}");
        assert!(lost.contains("the default exchange"), "{lost}");
        assert!(!lost.contains("``"), "{lost}");
        let refused = super::DlqError::Publish(PublishError::Unroutable(String::new(), "q".into()))
            .to_string();
        assert!(!refused.contains("may have reached"), "{refused}");
    }

    #[test]
    fn the_kind_of_a_broker_dead_letter_is_its_latest_death() {
        use lapin::types::{AMQPValue, FieldArray, FieldTable};
        let death = |reason: &str, queue: &str| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            AMQPValue::FieldTable(t)
        };
        // Retried once through a tier (expired there), then dead-lettered by Q's delivery
        // limit: RabbitMQ 3.x keeps x-first-death-reason at the first event.
        let mut hdr = FieldTable::default();
        hdr.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                death("delivery_limit", "q"),
                death("expired", "q-retry-1000"),
            ])),
        );
        hdr.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        let props = lapin::BasicProperties::default().with_headers(hdr);
        let d = super::describe(&props, "k", 1, "q");
        assert_eq!(d.kind.as_deref(), Some("delivery_limit"));
    }

    #[test]
    fn a_broker_dead_letter_failed_when_it_was_last_dead_lettered() {
        use lapin::types::{AMQPValue, FieldArray, FieldTable};
        let now = chrono::Utc::now();
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert(
            "time".into(),
            AMQPValue::Timestamp(u64::try_from(now.timestamp()).unwrap()),
        );
        let mut hdr = FieldTable::default();
        hdr.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let d = super::describe(
            &lapin::BasicProperties::default().with_headers(hdr),
            "k",
            1,
            "q",
        );
        assert!(d.failed_at.is_some(), "{d:?}");
        // Failed a moment ago: not older than two hours (it was "as old as can be").
        let f = super::Filter {
            older_than: Some(std::time::Duration::from_secs(7200)),
            ..Default::default()
        };
        assert!(!f.matches(&d, now));
    }

    /// An id with a byte-order mark is shown escaped by `dlq list`; pasted from there into
    /// `--message-id` it picks that dead letter, as the id itself does.
    #[test]
    fn a_message_id_is_matched_as_listed_too() {
        let mut d = super::describe(&lapin::BasicProperties::default(), "k", 1, "q");
        d.message_id = Some("\u{feff}order-42".into());
        let now = chrono::Utc::now();
        let by = |id: &str| super::Filter {
            message_id: Some(id.into()),
            ..Default::default()
        };
        assert_eq!(super::printable("\u{feff}order-42"), "\\u{feff}order-42");
        assert!(by("\\u{feff}order-42").matches(&d, now));
        assert!(by("\u{feff}order-42").matches(&d, now));
        assert!(!by("order-42").matches(&d, now));
    }

    #[test]
    fn topic_patterns_match_like_bindings() {
        use super::topic_matches as m;
        assert!(m("a.*.c", "a.b.c"));
        assert!(!m("a.*.c", "a.b.x.c"));
        assert!(m("a.#", "a"));
        assert!(m("a.#", "a.b.c"));
        assert!(m("#.c", "a.b.c"));
        assert!(m("#", ""));
        assert!(m("", ""));
        assert!(!m("", "a"));
        assert!(!m("*", ""));
        assert!(!m("a.b", "a.b.c"));
        assert!(m(
            "assetsweeper.#.new",
            "assetsweeper.asset_folder_importer.file.new"
        ));
        assert!(m("#.#", "a"));
        assert!(m("a.#.#.b", "a.b"));
        assert!(m("*.#.*", "a.b"));
        assert!(!m("*.#.*", "a"));
        assert!(m("#.x.#", "a.x.b.c"));
        assert!(!m("#.x.#", "a.b.c"));
    }

    /// A pattern of several `#` against a producer's long routing key: trying every split
    /// of the key took exponentially long (a replay that never ended).
    #[test]
    fn many_hashes_against_a_long_key_take_no_time() {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let pattern = format!("{}x", "#.".repeat(10));
            let key = vec!["a"; 128].join(".");
            let _ = tx.send(super::topic_matches(&pattern, &key));
        });
        let matched = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("answered");
        assert!(!matched);
    }

    #[test]
    fn ages_parse_with_units() {
        use std::time::Duration;
        assert_eq!(super::parse_age("90").unwrap(), Duration::from_secs(90));
        assert_eq!(super::parse_age("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(super::parse_age("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(
            super::parse_age("7d").unwrap(),
            Duration::from_secs(604_800)
        );
        assert!(super::parse_age("soon").is_err());
        assert!(super::parse_age("5y").is_err());
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(
            super::printable("a\nb\u{1b}[2J\0é\r"),
            "a\\nb\\u{1b}[2J\\u{0}é\\r"
        );
        // A right-to-left override shows "gpj.exe" as "exe.jpg"; a line separator breaks
        // the row in many viewers; a zero-width space hides in a key.
        assert_eq!(
            super::printable("a\u{202e}b\u{2028}c\u{200b}d\u{61c}"),
            "a\\u{202e}b\\u{2028}c\\u{200b}d\\u{61c}"
        );
        // A joiner in a Persian name is part of the name.
        assert_eq!(super::printable("می\u{200c}خواهم"), "می\u{200c}خواهم");
    }
}

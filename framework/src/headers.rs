//! Header names of design §3 and helpers to read and write AMQP field tables.

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// On the dead letter of one part of a batch (a record of a Kinesis batch): which part
/// of its message it was (the batch's own mark for it, a 1-based record number or an
/// index). Kept through a replay, so a processor that de-duplicates parts by message id
/// and part tells replayed parts of one message apart.
pub const BATCH_PART: &str = "x-batch-part";
/// On the replay of a dead letter the broker made straight from a producer's delivery
/// (its delivery limit, its expiry): every header on it is the producer's, never the
/// service's, so the replay — back through the default exchange — is read as a first
/// arrival (progress, part and count headers ignored, as on the producer's delivery).
/// Removed as the delivery is read.
pub const PRODUCERS_REPLAY: &str = "x-replay-of-producers-message";
/// On a replayed message: which `dlq replay` run moved it (an id of that run). The
/// service carries it onto the dead letter of that copy if it fails again, so the run
/// that replayed it passes over it instead of taking it for a dead letter it has still to
/// look at (a quorum DLQ on RabbitMQ 4.x hands out a dead letter of priority 5 or more
/// ahead of those before it: the same message replayed again and again).
pub const REPLAY_RUN: &str = "x-replay-run";
/// Attempts so far.
pub const RETRY_COUNT: &str = "x-retry-count";
/// Of those, the attempts that finished parts of the message (records posted, ids
/// published): they do not count toward `max_attempts` nor raise the retry delay.
pub const PROGRESS_ATTEMPTS: &str = "x-progress-attempts";
/// When (milliseconds since the epoch) the outage its retries wait out began (see
/// `MessageContext::retry_for_outage`); kept through the message's own retries, removed by
/// one that made progress.
pub const OUTAGE_SINCE: &str = "x-outage-since";
/// Exchange the message was first published to.
pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
/// Routing key the message was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
/// Reason of the last Retry.
pub const LAST_ERROR: &str = "x-last-error";
/// Dead letter: the error (≤ 1 KiB).
pub const ERROR: &str = "x-error";
/// Dead letter: `permanent` or `retries-exhausted`.
pub const ERROR_KIND: &str = "x-error-kind";
/// Dead letter: when (RFC 3339).
pub const FAILED_AT: &str = "x-failed-at";
/// Dead letter: which service.
pub const SERVICE: &str = "x-service";
/// Success: the input's message id, or its routing key.
pub const IN_RESPONSE_TO: &str = "x-in-response-to";
/// The `expiration` property of a message republished without it (retry, dead letter).
pub const ORIGINAL_EXPIRATION: &str = "x-original-expiration";
/// The `user_id` property of a message republished without it (retry, dead letter).
pub const ORIGINAL_USER_ID: &str = "x-original-user-id";
/// Longest exchange name or routing key AMQP carries (a short string).
pub const MAX_NAME_BYTES: usize = 255;

/// The framework's count and origin headers: read only on a delivery that came back to
/// `Q` the framework's own way (a retry tier's expiry, a replay: the default exchange,
/// routing key `Q`). On any other they are a producer's (its own retry scheme's
/// `x-retry-count`, a dead letter shovelled back to the producer's exchange) and dropped.
pub const FRAMEWORK_COUNTS: &[&str] = &[
    RETRY_COUNT,
    PROGRESS_ATTEMPTS,
    OUTAGE_SINCE,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
];

/// Headers the broker writes on a message it dead-letters or redelivers: never carried
/// onto a retry (RabbitMQ 3.x reads a published `x-death` for its cycle detection and
/// drops a message it thinks went round; a stale `x-delivery-count` reads as earlier
/// failed deliveries), nor onto the service's own dead letters (see
/// `dlq::envelope`): only the broker's own dead-lettering writes them there.
pub const BROKER_OWNED: &[&str] = &[
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
    // RabbitMQ 4.x quorum queues: how often the message was handed out, failed or not.
    "x-acquired-count",
];

/// Room a retry keeps free in its frame for what the broker adds as its tier hands it
/// back ([`BROKER_OWNED`]): one `x-death` entry (the retry carries none of the input's)
/// and the `x-first-death-*` and (4.x) `x-last-death-*` headers, each naming a queue, an
/// exchange and a routing key of up to 255 bytes — about 2.1 KiB at most, 0.5 KiB for
/// names of usual length — and a delivery count. An eighth of the frame at most (a
/// small `frame_max` has room for little beside the input's headers).
pub const DEAD_LETTERING_ROOM: usize = 3 * 1024;

/// The error headers of a dead letter (and a retry's last error).
pub(crate) const ERROR_HEADERS: &[&str] = &[LAST_ERROR, ERROR, ERROR_KIND, FAILED_AT, SERVICE];

/// Whether a replay removes `name` so the message starts afresh: the counts and origin
/// (the replay writes its origin again), the errors, the broker's dead-lettering.
pub fn replay_stripped(name: &str) -> bool {
    name == PRODUCERS_REPLAY
        || FRAMEWORK_COUNTS.contains(&name)
        || ERROR_HEADERS.contains(&name)
        || BROKER_OWNED.contains(&name)
}

/// Whether `name` is a header the framework writes itself on retries, dead letters or
/// outputs: a processor's retry header of that name would forge the attempt count or the
/// origin (`x-retry-count: 0` on every retry never reaches `max_attempts`), so it is refused.
pub fn is_reserved(name: &str) -> bool {
    replay_stripped(name)
        || [
            IN_RESPONSE_TO,
            ORIGINAL_EXPIRATION,
            ORIGINAL_USER_ID,
            BATCH_PART,
            PRODUCERS_REPLAY,
            REPLAY_RUN,
            "traceparent",
            "tracestate",
        ]
        .contains(&name)
}

/// `x-error-kind` values.
pub const KIND_PERMANENT: &str = "permanent";
/// `x-error-kind` when `max_attempts` ran out.
pub const KIND_RETRIES_EXHAUSTED: &str = "retries-exhausted";

/// Maximum size of `x-error`.
pub const MAX_ERROR_BYTES: usize = 1024;

/// A header's value as text, if it is a string.
pub fn get_str(h: &FieldTable, key: &str) -> Option<String> {
    match h.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

/// A header's value as an integer (any integer width, or a decimal string).
pub fn get_int(h: &FieldTable, key: &str) -> Option<i64> {
    match h.inner().get(key)? {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// Sets a string header.
pub fn set_str(h: &mut FieldTable, key: &str, value: &str) {
    h.insert(
        ShortString::from(key),
        AMQPValue::LongString(LongString::from(value)),
    );
}

/// Sets an integer header.
pub fn set_int(h: &mut FieldTable, key: &str, value: i64) {
    h.insert(ShortString::from(key), AMQPValue::LongLongInt(value));
}

/// A copy of `h` without `keys`.
pub fn without(h: &FieldTable, keys: &[&str]) -> FieldTable {
    without_where(h, |k| keys.contains(&k))
}

/// `h` without the headers whose names `drop` picks.
pub fn without_where(h: &FieldTable, drop: impl Fn(&str) -> bool) -> FieldTable {
    let mut out = FieldTable::default();
    for (k, v) in h.inner() {
        if !drop(k.as_str()) {
            out.insert(k.clone(), v.clone());
        }
    }
    out
}

/// Headers RabbitMQ routes a publish by besides its routing key (sender-selected
/// distribution): never carried onto a copy the framework republishes (a retry would also
/// reach the tiers they name, a replay the queues they name).
pub const SENDER_SELECTED: &[&str] = &["CC", "BCC"];

/// Bytes `t` takes on the wire (an AMQP 0-9-1 field table, its length prefix included).
pub fn encoded_len(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .map(|(k, v)| entry_len(k, v))
        .sum::<usize>()
}

/// The encoded size of `t`'s headers that a retry or dead letter carries on as they are:
/// all but those each retry writes afresh, each of a bounded size (its counts and origin,
/// its last error, the trace; room for them is kept apart), and the broker's, which it
/// drops — so a message's size does not grow with its retries. Other names of the
/// framework's (`x-in-response-to`, `x-original-user-id` …) are carried as they came: a
/// producer's one near a whole frame passed as "within budget", the processor did its work,
/// and the retry could not be published (dead-lettered bare, its progress marks lost).
pub fn carried_len(t: &FieldTable) -> usize {
    4 + t
        .inner()
        .iter()
        .filter(|(k, _)| !written_afresh(k.as_str()))
        .map(|(k, v)| entry_len(k, v))
        .sum::<usize>()
}

/// Whether a retry writes `name` afresh (bounded) or drops it (see [`carried_len`]).
fn written_afresh(name: &str) -> bool {
    FRAMEWORK_COUNTS.contains(&name)
        || ERROR_HEADERS.contains(&name)
        || BROKER_OWNED.contains(&name)
        || name == "traceparent"
        || name == crate::trace::TRACESTATE
}

fn entry_len(k: &lapin::types::ShortString, v: &AMQPValue) -> usize {
    1 + k.as_str().len() + 1 + value_len(v)
}

fn value_len(v: &AMQPValue) -> usize {
    match v {
        AMQPValue::Void => 0,
        AMQPValue::Boolean(_) | AMQPValue::ShortShortInt(_) | AMQPValue::ShortShortUInt(_) => 1,
        AMQPValue::ShortInt(_) | AMQPValue::ShortUInt(_) => 2,
        AMQPValue::LongInt(_) | AMQPValue::LongUInt(_) | AMQPValue::Float(_) => 4,
        AMQPValue::DecimalValue(_) => 5,
        AMQPValue::LongLongInt(_) | AMQPValue::Double(_) | AMQPValue::Timestamp(_) => 8,
        AMQPValue::ShortString(s) => 1 + s.as_str().len(),
        AMQPValue::LongString(s) => 4 + s.as_bytes().len(),
        AMQPValue::ByteArray(b) => 4 + b.as_slice().len(),
        AMQPValue::FieldArray(a) => {
            4 + a.as_slice().iter().map(|v| 1 + value_len(v)).sum::<usize>()
        }
        AMQPValue::FieldTable(t) => encoded_len(t),
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `error` as an error header holds it: whole up to [`MAX_ERROR_BYTES`], else cut there
/// with the cut said (`… (N bytes in all)`), as a log line says it, so a reader knows the
/// rest is missing.
pub fn error_text(error: &str) -> std::borrow::Cow<'_, str> {
    if error.len() <= MAX_ERROR_BYTES {
        return error.into();
    }
    let tail = format!("… ({} bytes in all)", error.len());
    format!("{}{tail}", truncate(error, MAX_ERROR_BYTES - tail.len())).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_cut_to_fit_says_so_and_fits() {
        assert_eq!(error_text("short"), "short");
        let long = "é".repeat(MAX_ERROR_BYTES);
        let cut = error_text(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(
            cut.ends_with(&format!("… ({} bytes in all)", long.len())),
            "{cut}"
        );
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let s = "é".repeat(600);
        let t = truncate(&s, MAX_ERROR_BYTES);
        assert!(t.len() <= MAX_ERROR_BYTES);
        assert_eq!(t.len(), 1024);
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn a_tables_length_is_what_lapin_writes() {
        use lapin::types::{FieldArray, LongString};
        let mut inner = FieldTable::default();
        inner.insert("n".into(), AMQPValue::LongInt(-3));
        let mut t = FieldTable::default();
        set_str(&mut t, "x-last-error", "é and more");
        set_int(&mut t, "x-retry-count", 4);
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert("s".into(), AMQPValue::ShortString("short".into()));
        t.insert("t".into(), AMQPValue::Timestamp(1));
        t.insert("d".into(), AMQPValue::Double(0.5));
        t.insert("v".into(), AMQPValue::Void);
        t.insert("bytes".into(), AMQPValue::ByteArray(vec![1u8, 2, 3].into()));
        t.insert(
            "a".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongString(LongString::from("q")),
                AMQPValue::FieldTable(inner),
            ])),
        );
        let buf =
            cookie_factory::gen_simple(lapin::types::generation::gen_field_table(&t), Vec::new())
                .expect("encodes");
        assert_eq!(encoded_len(&t), buf.len());
    }

    #[test]
    fn ints_read_from_any_width_and_strings() {
        let mut h = FieldTable::default();
        h.insert("a".into(), AMQPValue::ShortShortUInt(3));
        h.insert("b".into(), AMQPValue::LongString("42".into()));
        set_int(&mut h, "c", 7);
        assert_eq!(get_int(&h, "a"), Some(3));
        assert_eq!(get_int(&h, "b"), Some(42));
        assert_eq!(get_int(&h, "c"), Some(7));
        assert_eq!(get_int(&h, "d"), None);
    }
}

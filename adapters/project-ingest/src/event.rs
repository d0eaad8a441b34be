//! Decoding Pluto project events: plain JSON, pluto-core's arrays of project entries, or
//! Kinesis envelopes with base64 `data`.

use base64::Engine;
use framework::fields::{FieldError, kind_name, no_nul, present, string};
use serde_json::{Map, Value};

/// Why a message (or one record of it) can never be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// A field is missing, null or of the wrong type or value.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// `data` of a Kinesis record is not valid base64.
    #[error("field `{field}`: invalid base64: {reason}")]
    Base64 {
        /// Field name.
        field: String,
        /// Decoder message.
        reason: String,
    },
    /// Decoded `data` of a Kinesis record is not a JSON object (or holds more than a
    /// message may).
    #[error("field `{field}`: decoded data {reason}")]
    DataJson {
        /// Field name.
        field: String,
        /// Parser message.
        reason: String,
    },
    /// The message is neither a project event nor a Kinesis envelope.
    #[error("{0}")]
    Shape(String),
}

/// The kind of a Pluto project event (`type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// `project-created`.
    Created,
    /// `project-updated`.
    Updated,
}

impl EventKind {
    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::Created => "project-created",
            EventKind::Updated => "project-updated",
        }
    }

    /// The kind a routing key names by its last segment, as pluto-core's
    /// RabbitMqPropagator writes it (`core.project.create`, `core.project.update`): its
    /// entries carry no `type`.
    pub fn from_routing_key(key: &str) -> Option<Self> {
        match key.rsplit('.').next() {
            Some("create") => Some(EventKind::Created),
            Some("update") => Some(EventKind::Updated),
            _ => None,
        }
    }
}

/// What the delivery of a message tells about its events where they do not say it
/// themselves.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    /// When the message was published, else first received (normalized): the last resort
    /// ordering a project-updated event that has no time of its own.
    pub received: &'a str,
    /// When this service first saw the message, by its own clock (normalized), kept
    /// across retries: what an event's own time is measured against (see
    /// [`believable`]). None: now.
    pub first_seen: Option<&'a str>,
    /// The routing key it was first published with: names the kind of an event without
    /// `type` (see [`EventKind::from_routing_key`]).
    pub routing_key: &'a str,
}

/// A validated project event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectEvent {
    /// Created or updated.
    pub kind: EventKind,
    /// Pluto project id (integers are kept as their decimal text).
    pub id: String,
    /// Project title.
    pub title: String,
    /// Project status.
    pub status: String,
    /// Commission id (integers are kept as their decimal text); None: the project has no
    /// commission (a pluto-core entry with `commissionId` null or absent).
    pub commission_id: Option<String>,
    /// Commission title; None when the event does not carry it (pluto-core entries never
    /// do): the title already stored for the commission is kept.
    pub commission_title: Option<String>,
    /// Production office.
    pub production_office: String,
    /// Creation time as sent (validated RFC 3339).
    pub created: String,
    /// Ordering key: normalized UTC timestamp, compared as text; None = unordered.
    pub version: Option<String>,
    /// Orders events of one `version` among themselves, None first: for an event whose key
    /// is its own `updated` time, when it arrived or was published, then its Kinesis
    /// sequence number or else when this service first saw it; for a Kinesis record keyed
    /// by its arrival time, its sequence number; for a plain update keyed by its publishing
    /// time (whole seconds), when this service first saw it. Normalized as `version`. Kept in a column of its own, so a release before it still
    /// applies an event of an equal `version` over a row this one wrote (a rollback).
    pub tie: Option<String>,
}

/// The `commissionTitle` with which Pluto deletes a commission and its projects (its
/// ingestion Lambda has read it so since 2018: `{"type": "project-created",
/// "commissionId": "123", "commissionTitle": "(DELETE)"}`, no other field needed).
pub const DELETE_TITLE: &str = "(DELETE)";

/// A commission deletion: the commission and every project of it stored no later than
/// the deletion (its ordering key) go, and older events of them are stale from then on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommissionDeletion {
    /// Pluto commission id (integers are kept as their decimal text).
    pub commission_id: String,
    /// Ordering key, as a project-updated event's ([`ProjectEvent::version`]).
    pub version: Option<String>,
    /// Orders deletions and events of one `version` ([`ProjectEvent::tie`]).
    pub tie: Option<String>,
}

/// One event found in a message: a project event, a commission deletion, or a `type`
/// this service ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A project-created / project-updated event.
    Project(ProjectEvent),
    /// A project-created / project-updated event whose `commissionTitle` is
    /// [`DELETE_TITLE`].
    DeleteCommission(CommissionDeletion),
    /// Any other `type` (logged and dropped).
    UnknownType(String),
    /// A message holding no event (a Kinesis envelope of no records): dropped, for this
    /// reason, as the Lambda succeeded with nothing to do.
    NoEvent(&'static str),
    /// A pluto-core entry another consumer of `pluto-core` (pluto-atomresponder) failed on
    /// and published again with its own `retry_count` (this one): the queue received the
    /// original, so the copy is dropped — applied, it put an older state back over a newer
    /// one of the same `updated` time and announced the project again.
    RetryCopy(u64),
}

/// The Drop reason of `{"Records": []}`.
pub const NO_RECORDS: &str = "a Kinesis envelope of no records";

/// One unit of a message: the record's raw JSON (for dead-lettering) and its parse.
#[derive(Debug, Clone)]
pub struct Item {
    /// The record as received (the envelope record, or the whole message).
    pub raw: Value,
    /// Parse result.
    pub parsed: Result<Parsed, EventError>,
}

fn identifier(o: &Map<String, Value>, f: &str) -> Result<String, FieldError> {
    let bad = |found: String| FieldError::Type {
        field: f.into(),
        expected: "integer or non-empty string",
        found,
    };
    match present(o, f)? {
        Value::Number(n) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        Value::Number(n) => Err(bad(format!("number {n}"))),
        Value::String(s) if !s.trim().is_empty() => no_nul(f, s).map(|()| s.clone()),
        Value::String(_) => Err(bad("empty string".into())),
        other => Err(bad(kind_name(other).into())),
    }
}

/// [`identifier`] where null or absent means none.
fn optional_identifier(o: &Map<String, Value>, f: &str) -> Result<Option<String>, FieldError> {
    match o.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => identifier(o, f).map(Some),
    }
}

/// [`string`] where null or absent means none.
fn optional_string(o: &Map<String, Value>, f: &str) -> Result<Option<String>, FieldError> {
    match o.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => string(o, f).map(Some),
    }
}

/// A time as fixed-width UTC text, so text order is time order; None for a year chrono
/// would write with a sign or a fifth digit (which would sort before every real time).
pub fn time_key(t: chrono::DateTime<chrono::Utc>) -> Option<String> {
    use chrono::Datelike;
    (0..=9999)
        .contains(&t.year())
        .then(|| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
}

/// How far ahead of this machine's clock an ordering key may be: more is a producer's
/// clock (or a unit) gone wrong, and kept as it is it would make every later event stale
/// until that date.
pub const MAX_AHEAD: chrono::TimeDelta = chrono::TimeDelta::minutes(5);

/// The latest ordering key believed now ([`MAX_AHEAD`] from this machine's clock).
pub fn latest_believable() -> String {
    time_key(chrono::Utc::now() + MAX_AHEAD).unwrap_or_else(|| "9999".into())
}

/// How far ahead of this machine's clock a stored key must be to lose to any event: a
/// key an earlier release kept from a producer's clock gone wrong (a unit mistaken: years
/// ahead). Wider than [`MAX_AHEAD`]: a replica whose clock runs some minutes slow sees
/// the keys its peers stored ahead of it, and with the narrow bound let older updates
/// replace them. Not wider still: a key stored within it holds its project until then.
pub const STORED_AHEAD: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The ordering key beyond which a stored key loses to any event (see [`STORED_AHEAD`]).
pub fn stored_beyond_belief() -> String {
    time_key(chrono::Utc::now() + STORED_AHEAD).unwrap_or_else(|| "9999".into())
}

/// The latest ordering key believable of a message first seen at `first_seen` (a key):
/// [`MAX_AHEAD`] after it. None where `first_seen` is no time.
pub fn believable_after(first_seen: &str) -> Option<String> {
    let t = chrono::DateTime::parse_from_rfc3339(first_seen).ok()?;
    time_key(t.with_timezone(&chrono::Utc) + MAX_AHEAD)
}

/// `key`, or where it is more than [`MAX_AHEAD`] ahead of `first_seen` (when this service
/// first saw its message, by its own clock, kept across retries; else now), `received` or
/// else this machine's time; a warning names the key. Measured from the first sight, not
/// the clock now: decided again at each attempt, a key refused at the first came within
/// bounds at a retry minutes later, and the retried event overtook updates applied
/// meanwhile. Nor from `received`, which may be a producer's clock (its AMQP timestamp).
pub fn believable(key: String, received: Option<&str>, first_seen: Option<&str>) -> String {
    let bound = first_seen
        .and_then(believable_after)
        .unwrap_or_else(latest_believable);
    if key <= bound {
        return key;
    }
    tracing::warn!(
        ordering_key = %key,
        "an ordering time more than {} minutes ahead of this clock: ordered as first received",
        MAX_AHEAD.num_minutes()
    );
    match received {
        Some(r) if r <= latest_believable().as_str() => r.to_string(),
        _ => time_key(chrono::Utc::now()).unwrap_or(key),
    }
}

/// Normalizes an RFC 3339 time to fixed-width UTC text, so text order is time order.
pub fn normalize_time(s: &str) -> Option<String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .and_then(|t| time_key(t.with_timezone(&chrono::Utc)))
}

/// An epoch number at or above which it is read in a finer unit than the one before
/// (seconds, then milliseconds, microseconds, nanoseconds): as that unit it would be after
/// the year 5000, which no producer means.
pub(crate) const FINER_UNIT_FROM: i64 = 100_000_000_000;

/// [`normalize_time`] of a producer's time, which may come with an offset without its
/// colon — Java's and Joda's `yyyy-MM-dd'T'HH:mm:ss.SSSZ` (`2017-04-24T17:20:11.503+0000`),
/// as Pluto's project service before pluto-core wrote `created` — or without an offset —
/// Python's `isoformat()` of a naive datetime (`2018-08-01T12:21:12.532000`), as a Pluto
/// whose datetimes are naive writes them — read as UTC: refused, every event of such a
/// producer was a dead letter, where the original Lambda passed the text on unread.
fn producer_time(s: &str) -> Option<String> {
    normalize_time(s)
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"]
                .into_iter()
                .find_map(|f| chrono::DateTime::parse_from_str(s, f).ok())
                .and_then(|t| time_key(t.with_timezone(&chrono::Utc)))
        })
        .or_else(|| {
            ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
                .into_iter()
                .find_map(|f| chrono::NaiveDateTime::parse_from_str(s, f).ok())
                .and_then(|t| time_key(t.and_utc()))
        })
}

fn time_field(o: &Map<String, Value>, f: &str) -> Result<(String, String), FieldError> {
    let s = string(o, f)?;
    match producer_time(&s) {
        Some(n) => Ok((s, n)),
        None => Err(FieldError::Type {
            field: f.into(),
            expected: "an RFC 3339 timestamp",
            found: format!("{s:?}"),
        }),
    }
}

/// Parses a Pluto project JSON object; `arrival` is the Kinesis arrival time, if any.
pub fn parse_project(v: &Value, arrival: Option<String>) -> Result<Parsed, EventError> {
    parse_delivered(
        v,
        Arrival {
            time: arrival,
            sequence: None,
        },
        None,
    )
}

/// Where a Kinesis record sits in its stream: its arrival time and sequence number.
#[derive(Debug, Default)]
struct Arrival {
    /// `approximateArrivalTimestamp`, normalized as a `version`.
    time: Option<String>,
    /// `sequenceNumber`, zero-padded so text order is numeric order.
    sequence: Option<String>,
}

/// Widest sequence number Kinesis writes (decimal digits: `0|([1-9]\d{0,128})`).
const SEQUENCE_DIGITS: usize = 129;

/// A record's `sequenceNumber` as a tie: `s` and the number zero-padded to
/// [`SEQUENCE_DIGITS`]; None unless it is decimal digits that fit, as Kinesis writes it (a
/// hand-built producer's other text orders nothing). The letter sorts it after a time (the
/// tie an earlier release stored where this one stores the number), by bytes as by a
/// locale's collation (PostgreSQL's `en_US` weighs no punctuation, ICU's `en-US` weighs it
/// below digits: a `~` sorted first in both): a newer record of one arrival time is never
/// taken for an older one across the upgrade.
fn sequence_number(rec: &Map<String, Value>) -> Option<String> {
    let s = rec.get("sequenceNumber")?.as_str()?;
    let digits = s.trim_start_matches('0');
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && digits.len() <= SEQUENCE_DIGITS)
        .then(|| format!("s{digits:0>SEQUENCE_DIGITS$}"))
}

/// [`parse_project`] of an event as delivered: `delivery` orders a project-updated event
/// without a time of its own, and names the kind of one without `type`.
fn parse_delivered(
    v: &Value,
    arrival: Arrival,
    delivery: Option<&Delivery<'_>>,
) -> Result<Parsed, EventError> {
    let Value::Object(o) = v else {
        return Err(EventError::Shape(format!(
            "expected a JSON object, found {}",
            kind_name(v)
        )));
    };
    // No `type` at all: a pluto-core project entry (Play JSON of its `ProjectEntry`), whose
    // kind is the routing key's operation; on any other key still "missing".
    let routed = match o.get("type") {
        None => Some(
            delivery
                .and_then(|d| EventKind::from_routing_key(d.routing_key))
                .ok_or_else(|| FieldError::Missing("type".into()))?,
        ),
        Some(_) => None,
    };
    let entry = routed.is_some();
    // pluto-atomresponder nacks an entry it cannot handle and publishes it again to the
    // exchange and key it came from, with `retry_count` added, up to 33 times.
    if entry
        && let Some(n) = o
            .get("retry_count")
            .and_then(Value::as_u64)
            .filter(|n| *n > 0)
    {
        return Ok(Parsed::RetryCopy(n));
    }
    let kind = match routed {
        Some(kind) => kind,
        None => match string(o, "type")?.as_str() {
            "project-created" => EventKind::Created,
            "project-updated" => EventKind::Updated,
            other => return Ok(Parsed::UnknownType(other.to_string())),
        },
    };
    // Pluto's deletion carries the commission alone; a full project event with that title
    // is one too (the Lambda deleted on the title whatever else the message held), never
    // a commission to store under the title "(DELETE)".
    if !entry && o.get("commissionTitle").and_then(Value::as_str) == Some(DELETE_TITLE) {
        let commission_id = identifier(o, "commissionId")?;
        let (version, tie) = ordering(o, EventKind::Updated, None, arrival, delivery)?;
        return Ok(Parsed::DeleteCommission(CommissionDeletion {
            commission_id,
            version,
            tie,
        }));
    }
    let id = identifier(o, "id")?;
    let title = string(o, "title")?;
    let status = string(o, "status")?;
    // A pluto-core entry writes no `commissionId` (or null) for a project without a
    // commission, and never the commission's title; the Pluto event JSON has both.
    let (commission_id, commission_title) = if entry {
        // An entry is never a deletion (pluto-core deletes by its own routing key), and
        // "(DELETE)" is never a commission's title to store.
        match optional_identifier(o, "commissionId")? {
            Some(c) => (
                Some(c),
                optional_string(o, "commissionTitle")?.filter(|t| t != DELETE_TITLE),
            ),
            None => (None, None),
        }
    } else {
        (
            Some(identifier(o, "commissionId")?),
            Some(string(o, "commissionTitle")?),
        )
    };
    let production_office = string(o, "productionOffice")?;
    let (created, created_norm) = time_field(o, "created")?;
    let (version, tie) = ordering(o, kind, Some(created_norm), arrival, delivery)?;
    Ok(Parsed::Project(ProjectEvent {
        kind,
        id,
        title,
        status,
        commission_id,
        commission_title,
        production_office,
        created,
        version,
        tie,
    }))
}

/// The ordering key and tie of an event of `kind` (see [`ProjectEvent::version`]):
/// `created_norm` is its normalized `created` time, where it has one.
fn ordering(
    o: &Map<String, Value>,
    kind: EventKind,
    created_norm: Option<String>,
    arrival: Arrival,
    delivery: Option<&Delivery<'_>>,
) -> Result<(Option<String>, Option<String>), FieldError> {
    let Arrival {
        time: arrival,
        sequence,
    } = arrival;
    // Ordering key: an explicit `updated` time wins, then the Kinesis arrival time; then a
    // project-created event falls back to its `created` time, and a project-updated one
    // to when its message was published or first received (kept across retries), so an
    // older update returning from a retry tier never overwrites a newer one applied
    // meanwhile.
    let updated = match o.get("updated") {
        None | Some(Value::Null) => None,
        Some(_) => Some(time_field(o, "updated")?.1),
    };
    let received = delivery.map(|d| d.received.to_string());
    let fallback = match kind {
        EventKind::Created => created_norm,
        EventKind::Updated => received.clone(),
    };
    let believed = |v: String| {
        believable(
            v,
            delivery.map(|d| d.received),
            delivery.and_then(|d| d.first_seen),
        )
    };
    // Events of one `updated` time are ordered among themselves as events without one
    // are: pluto-core changes a project by copying its entry with one field changed,
    // `updated` as it was, so all its updates of a project share one time, and whichever
    // was applied last won — an older one back from a retry tier too.
    // A publishing time (the AMQP `timestamp`) counts whole seconds: two updates a user
    // saved within one second share it, and the older, back from a retry tier, overwrote
    // the newer. Among those, when this service first saw each (its own clock, kept
    // across retries and redeliveries) decides.
    // Records of one arrival time (milliseconds: one `PutRecords` call) are ordered by
    // their sequence number, which Kinesis gives in the order it took them: the older,
    // back from a retry tier or a replay, overwrote the newer.
    let seen = delivery.and_then(|d| d.first_seen).map(str::to_string);
    let tie = match updated {
        Some(_) => arrival.clone().or(received).map(believed).map(|t| {
            match sequence.as_ref().or(seen.as_ref()) {
                Some(s) => format!("{t} {s}"),
                None => t,
            }
        }),
        None if arrival.is_some() => sequence,
        None if kind == EventKind::Updated => seen,
        None => None,
    };
    let version = updated.or(arrival).or(fallback).map(believed);
    Ok((version, tie))
}

/// Decodes base64 as leniently as the Node Lambda this replaces (`Buffer.from(s,
/// "base64")`) did: line breaks and other ASCII whitespace anywhere, the URL-safe
/// alphabet (`-`, `_`) as well as the standard one, padding present or not. Kinesis writes
/// canonical base64; bridges and hand-built producers do not always, and a record they
/// sent was dead-lettered for good.
fn decode_base64(data: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let canonical: String = data
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .map(|c| match c {
            '-' => '+',
            '_' => '/',
            c => c,
        })
        .collect();
    LENIENT.decode(canonical)
}

/// Kinesis' `approximateArrivalTimestamp`: epoch seconds with a fraction (milliseconds,
/// microseconds or nanoseconds from a producer that writes those, as [`FINER_UNIT_FROM`]
/// tells them apart). None for 0 or less: some producers' "unset", not 1970 — taken as a
/// time, it ordered every update of such a producer before any real one (each dropped as
/// stale) and alike among themselves (a retried older one overwrote a newer one).
fn arrival_time(rec: &Map<String, Value>) -> Option<String> {
    let mut secs = rec.get("approximateArrivalTimestamp")?.as_f64()?;
    if secs <= 0.0 {
        return None;
    }
    for _ in 0..3 {
        if secs < FINER_UNIT_FROM as f64 {
            break;
        }
        secs /= 1000.0;
    }
    let micros = (secs * 1_000_000.0).round() as i64;
    chrono::DateTime::from_timestamp_micros(micros).and_then(time_key)
}

/// Decodes one Kinesis record (`{"data": base64, ...}`); `path` names it in errors. A record
/// without an arrival time is ordered by its message's `delivery`, as a plain message.
fn parse_kinesis_record(
    rec: &Value,
    path: &str,
    delivery: &Delivery<'_>,
) -> Result<Parsed, EventError> {
    let Value::Object(o) = rec else {
        return Err(FieldError::wrong_type(path, "object", rec).into());
    };
    let field = format!("{path}.data");
    let data = match o.get("data") {
        None => return Err(FieldError::Missing(field).into()),
        Some(Value::Null) => return Err(FieldError::Null(field).into()),
        Some(Value::String(s)) => s,
        Some(other) => return Err(FieldError::wrong_type(field, "base64 string", other).into()),
    };
    let bytes = decode_base64(data).map_err(|e| EventError::Base64 {
        field: field.clone(),
        reason: e.to_string(),
    })?;
    let json: Value =
        framework::fields::json_in_text(&bytes).map_err(|e| EventError::DataJson {
            field: field.clone(),
            reason: e.to_string(),
        })?;
    if !json.is_object() {
        return Err(EventError::DataJson {
            field,
            reason: format!("is not a JSON object: found {}", kind_name(&json)),
        });
    }
    let arrival = Arrival {
        time: arrival_time(o),
        sequence: sequence_number(o),
    };
    parse_delivered(&json, arrival, Some(delivery))
}

/// [`items_delivered`] of a message whose routing key is not known: `received`
/// (normalized) orders a project-updated event without `updated` or arrival time, and an
/// event without `type` is refused as missing it.
pub fn items(msg: &Value, received: &str) -> Vec<Item> {
    items_delivered(
        msg,
        &Delivery {
            received,
            first_seen: None,
            routing_key: "",
        },
    )
}

/// Splits a message into its events: a plain project JSON (one item), pluto-core's array
/// of project entries (an item each), a Kinesis record (`{"kinesis":{"data":…}}` or
/// `{"data":…}`) or a Kinesis event (`{"Records":[…]}`); `delivery` orders a
/// project-updated event without `updated` or arrival time, and names the kind of one
/// without `type`.
pub fn items_delivered(msg: &Value, delivery: &Delivery<'_>) -> Vec<Item> {
    let one = |parsed| {
        vec![Item {
            raw: msg.clone(),
            parsed,
        }]
    };
    // pluto-core publishes its entries as a JSON array: a batch, each entry on its own. An
    // array of anything else is no such batch and is refused whole, as before.
    if let Value::Array(entries) = msg
        && !entries.is_empty()
        && entries.iter().all(Value::is_object)
    {
        return entries
            .iter()
            .map(|e| Item {
                raw: e.clone(),
                parsed: parse_delivered(e, Arrival::default(), Some(delivery)),
            })
            .collect();
    }
    let Value::Object(o) = msg else {
        return one(Err(EventError::Shape(format!(
            "expected a JSON object, found {}",
            kind_name(msg)
        ))));
    };
    if let Some(records) = o.get("Records") {
        let Value::Array(records) = records else {
            return one(Err(
                FieldError::wrong_type("Records", "array", records).into()
            ));
        };
        if records.is_empty() {
            return one(Ok(Parsed::NoEvent(NO_RECORDS)));
        }
        return records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let path = format!("Records[{i}].kinesis");
                let parsed = match r.get("kinesis") {
                    Some(k) => parse_kinesis_record(k, &path, delivery),
                    None => Err(FieldError::Missing(path).into()),
                };
                Item {
                    raw: r.clone(),
                    parsed,
                }
            })
            .collect();
    }
    if let Some(k) = o.get("kinesis") {
        return one(parse_kinesis_record(k, "kinesis", delivery));
    }
    if o.contains_key("data") && !o.contains_key("type") {
        return one(parse_kinesis_record(msg, "record", delivery));
    }
    one(parse_delivered(msg, Arrival::default(), Some(delivery)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A Kinesis record's decoded `data` holding more JSON values than a message may is
    /// refused unread (its base64 hides them from the framework's bound of the body):
    /// decoded, 12 MiB of them took hundreds of MiB and killed the service at every
    /// redelivery.
    #[test]
    fn decoded_data_with_too_many_values_is_refused_unread() {
        use base64::Engine;
        let text = serde_json::to_vec(&vec![0u8; framework::MAX_JSON_VALUES]).unwrap();
        let data = base64::engine::general_purpose::STANDARD.encode(text);
        let items = items(
            &json!({"kinesis": {"data": data}}),
            "2026-01-01T00:00:00.000000Z",
        );
        let e = items[0].parsed.as_ref().expect_err("refused");
        assert!(e.to_string().contains("decoded data holds about"), "{e}");
    }

    /// Base64 as the Node Lambda took it: unpadded, URL-safe, wrapped at 76 columns — each
    /// the same project as the canonical form; what is no base64 at all is still refused.
    #[test]
    fn kinesis_data_in_any_base64_the_original_took_decodes_alike() {
        use base64::Engine;
        // Long enough to wrap, and with bytes that encode to `+`/`/` and need padding.
        let (text, canonical) = (0..3)
            .map(|n| {
                let mut p = project();
                p["title"] = json!(format!("{}\u{3fff}\u{ffbf}~?>", "t".repeat(80 + n)));
                let text = serde_json::to_vec(&p).unwrap();
                let canonical = base64::engine::general_purpose::STANDARD.encode(&text);
                (text, canonical)
            })
            .find(|(_, c)| c.ends_with('='))
            .unwrap();
        assert!(
            canonical.contains(['+', '/']) && canonical.ends_with('='),
            "{canonical}"
        );
        let wrapped = canonical
            .as_bytes()
            .chunks(76)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n");
        let variants = [
            canonical.clone(),
            canonical.trim_end_matches('=').to_string(),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&text),
            wrapped,
        ];
        let parse = |data: &str| {
            let items = items(
                &json!({"kinesis": {"data": data}}),
                "2026-01-01T00:00:00.000000Z",
            );
            items[0].parsed.clone()
        };
        let want = parse(&canonical).expect("canonical base64");
        for v in &variants {
            assert_eq!(parse(v).as_ref(), Ok(&want), "{v:?}");
        }
        let e = parse("%%% not base64 %%%").expect_err("refused");
        assert!(e.to_string().contains("invalid base64"), "{e}");
    }

    #[test]
    fn arrival_times_in_any_unit_give_one_key_and_no_signed_year() {
        let at = |v: Value| {
            let mut m = Map::new();
            m.insert("approximateArrivalTimestamp".into(), v);
            arrival_time(&m)
        };
        let want = Some("2018-12-17T22:10:50.987000Z".to_string());
        assert_eq!(at(json!(1_545_084_650.987)), want);
        assert_eq!(at(json!(1_545_084_650_987_u64)), want);
        // Microseconds and nanoseconds, as a message's own timestamp is read.
        assert_eq!(at(json!(1_545_084_650_987_000_u64)), want);
        assert_eq!(at(json!(1_545_084_650_987_000_000_u64)), want);
        // Beyond the year 9999 whichever unit: no key, rather than "+…" text that sorts
        // before every real time.
        assert_eq!(at(json!(1e21)), None);
        assert_eq!(
            time_key(chrono::DateTime::from_timestamp(253_402_300_800, 0).unwrap()),
            None
        );
        assert_eq!(at(json!("soon")), None);
        // A producer's "unset": ordered as a record without an arrival time.
        assert_eq!(at(json!(0)), None);
        assert_eq!(at(json!(0.0)), None);
        assert_eq!(at(json!(-5)), None);
    }

    fn project() -> Value {
        json!({"type":"project-created","id":"foo","title":"bar","status":"New",
               "commissionId":"baz","commissionTitle":"baz","productionOffice":"UK",
               "created":"2017-04-24T17:20:11.503Z"})
    }

    #[test]
    fn seed_example_parses() {
        let Parsed::Project(p) = parse_project(&project(), None).unwrap() else {
            panic!()
        };
        assert_eq!(p.id, "foo");
        assert_eq!(p.version.as_deref(), Some("2017-04-24T17:20:11.503000Z"));
    }

    #[test]
    fn integer_ids_and_type_errors() {
        let mut v = project();
        v["commissionId"] = json!(42);
        let Parsed::Project(p) = parse_project(&v, None).unwrap() else {
            panic!()
        };
        assert_eq!(p.commission_id.as_deref(), Some("42"));
        v["commissionId"] = json!(true);
        assert_eq!(
            parse_project(&v, None).unwrap_err().to_string(),
            "field `commissionId`: expected integer or non-empty string, found boolean"
        );
    }

    /// A pluto-core project entry, as its RabbitMqPropagator publishes it (in an array).
    fn entry() -> Value {
        json!({"id": 1234, "projectTypeId": 1, "title": "T",
               "created": "2021-04-29T13:53:43.413+01:00",
               "updated": "2021-04-29T13:53:43.413+01:00", "user": "u", "workingGroupId": 3,
               "commissionId": 42, "deletable": true, "status": "New",
               "productionOffice": "UK"})
    }

    const RECEIVED: &str = "2024-01-01T00:00:00.000000Z";

    fn on(key: &str) -> Delivery<'_> {
        Delivery {
            received: RECEIVED,
            first_seen: None,
            routing_key: key,
        }
    }

    fn project_of(item: &Item) -> &ProjectEvent {
        match &item.parsed {
            Ok(Parsed::Project(p)) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pluto_core_entries_take_their_kind_from_the_routing_key() {
        let msg = json!([entry(), entry()]);
        let created = items_delivered(&msg, &on("core.project.create"));
        assert_eq!(created.len(), 2);
        let p = project_of(&created[0]);
        assert_eq!(p.kind, EventKind::Created);
        assert_eq!(p.id, "1234");
        assert_eq!(p.commission_id.as_deref(), Some("42"));
        assert_eq!(p.commission_title, None);
        assert_eq!(p.version.as_deref(), Some("2021-04-29T12:53:43.413000Z"));
        // Entries of one `updated` time are ordered by their delivery.
        assert_eq!(p.tie.as_deref(), Some(RECEIVED));
        let updated = items_delivered(&msg, &on("core.project.update"));
        assert_eq!(project_of(&updated[1]).kind, EventKind::Updated);
        // Any other operation: still the missing `type`.
        for key in [
            "core.project.delete",
            "core.project.event",
            "create.project",
        ] {
            let it = items_delivered(&json!([entry()]), &on(key));
            assert_eq!(
                it[0].parsed.as_ref().unwrap_err().to_string(),
                "field `type` is missing",
                "{key}"
            );
        }
    }

    /// Only a pluto-core entry with a whole `retry_count` of 1 or more is another
    /// consumer's retry copy; an event with a `type` and any other value are events.
    #[test]
    fn a_retry_copy_is_an_entry_with_a_positive_retry_count() {
        let mut copy = entry();
        copy["retry_count"] = json!(1);
        let it = items_delivered(&json!([copy.clone()]), &on("core.project.update"));
        assert_eq!(it[0].parsed, Ok(Parsed::RetryCopy(1)));
        copy["retry_count"] = json!(33);
        let it = items_delivered(&copy, &on("core.project.create"));
        assert_eq!(it[0].parsed, Ok(Parsed::RetryCopy(33)));
        for count in [json!(0), json!(-1), json!("1"), json!(1.5), Value::Null] {
            let mut v = entry();
            v["retry_count"] = count.clone();
            let it = items_delivered(&v, &on("core.project.update"));
            project_of(&it[0]);
        }
        let mut typed = project();
        typed["retry_count"] = json!(1);
        let it = items_delivered(&typed, &on("core.project.event"));
        project_of(&it[0]);
    }

    #[test]
    fn a_pluto_core_entry_without_commission_has_none() {
        let mut null = entry();
        null["commissionId"] = Value::Null;
        null["commissionTitle"] = json!("ignored without an id");
        let mut absent = entry();
        absent.as_object_mut().unwrap().remove("commissionId");
        for v in [null, absent] {
            let it = items_delivered(&v, &on("core.project.create"));
            let p = project_of(&it[0]);
            assert_eq!((&p.commission_id, &p.commission_title), (&None, &None));
        }
        // With a title, it is taken; the Pluto event JSON still requires both.
        let mut titled = entry();
        titled["commissionTitle"] = json!("C");
        let it = items_delivered(&titled, &on("core.project.update"));
        assert_eq!(project_of(&it[0]).commission_title.as_deref(), Some("C"));
        // Never the deletion marker, which no commission is titled.
        titled["commissionTitle"] = json!(DELETE_TITLE);
        let it = items_delivered(&titled, &on("core.project.update"));
        let p = project_of(&it[0]);
        assert_eq!(p.commission_id.as_deref(), Some("42"));
        assert_eq!(p.commission_title, None);
        let mut typed = project();
        typed["commissionId"] = Value::Null;
        assert_eq!(
            items_delivered(&typed, &on("core.project.create"))[0]
                .parsed
                .as_ref()
                .unwrap_err()
                .to_string(),
            "field `commissionId` is null"
        );
    }

    #[test]
    fn only_a_non_empty_array_of_objects_is_a_batch() {
        for msg in [json!([]), json!([1, 2]), json!([entry(), 3])] {
            let it = items_delivered(&msg, &on("core.project.create"));
            assert_eq!(it.len(), 1, "{msg}");
            assert_eq!(
                it[0].parsed.as_ref().unwrap_err().to_string(),
                "expected a JSON object, found array"
            );
        }
    }

    /// `{"Records": []}` holds no event: one item saying so (dropped), not an error.
    #[test]
    fn a_kinesis_envelope_of_no_records_is_no_event() {
        let it = items_delivered(&json!({"Records": []}), &on("k"));
        assert_eq!(it.len(), 1);
        assert_eq!(it[0].parsed, Ok(Parsed::NoEvent(NO_RECORDS)));
    }

    #[test]
    fn a_kinesis_update_without_arrival_time_is_ordered_by_its_delivery() {
        let mut upd = project();
        upd["type"] = json!("project-updated");
        let data = base64::engine::general_purpose::STANDARD.encode(upd.to_string());
        let it = items_delivered(&json!({"kinesis": {"data": data}}), &on("k"));
        assert_eq!(project_of(&it[0]).version.as_deref(), Some(RECEIVED));
        // An arrival time still wins.
        let rec =
            json!({"kinesis": {"data": data, "approximateArrivalTimestamp": 1_545_084_650.987}});
        assert_eq!(
            project_of(&items_delivered(&rec, &on("k"))[0])
                .version
                .as_deref(),
            Some("2018-12-17T22:10:50.987000Z")
        );
    }

    /// A sequence number orders numerically as text, and after the time an earlier release
    /// stored as the tie in its place (a newer record is never stale across the upgrade);
    /// anything but digits that fit orders nothing.
    #[test]
    fn sequence_numbers_order_as_numbers_and_after_a_time() {
        let seq = |v: Value| sequence_number(json!({ "sequenceNumber": v }).as_object().unwrap());
        let (small, big) = (seq(json!("9")).unwrap(), seq(json!("10")).unwrap());
        assert!(small < big, "{small} < {big}");
        assert_eq!(seq(json!("0010")), Some(big.clone()));
        let widest = "9".repeat(SEQUENCE_DIGITS);
        assert!(seq(json!(widest)).is_some());
        for bad in [
            json!(""),
            json!("12a"),
            json!(12),
            json!(format!("1{widest}")),
        ] {
            assert_eq!(seq(bad.clone()), None, "{bad}");
        }
        let arrival = "2018-12-17T22:10:50.987000Z";
        assert!(format!("{arrival} 2026-01-01T00:00:00.000000Z") < format!("{arrival} {small}"));
    }

    /// The ordering key of the seed project created at `created`, or why it is refused.
    fn created_keyed_as(created: &str) -> Result<String, EventError> {
        let mut p = project();
        p["created"] = json!(created);
        match parse_project(&p, None)? {
            Parsed::Project(e) => Ok(e.version.expect("a created project has a key")),
            other => panic!("{created}: not a project: {other:?}"),
        }
    }

    /// A time without an offset (Python's `isoformat()` of a naive datetime, with or
    /// without its fraction) is read as UTC, not refused; what is no time still is.
    #[test]
    fn a_producer_time_without_an_offset_is_read_as_utc() {
        for (created, key) in [
            ("2018-08-01T12:21:12.532000", "2018-08-01T12:21:12.532000Z"),
            ("2018-08-01T12:21:12", "2018-08-01T12:21:12.000000Z"),
            ("2018-08-01 12:21:12.5", "2018-08-01T12:21:12.500000Z"),
        ] {
            assert_eq!(created_keyed_as(created).unwrap(), key, "{created}");
        }
        for bad in ["2018-08-01", "2018-08-01T25:00:00", "yesterday"] {
            let e = created_keyed_as(bad).expect_err(bad);
            assert!(e.to_string().contains("field `created`"), "{e}");
        }
    }

    /// A time whose offset has no colon (Java's and Joda's `…SSSZ`: `+0000`) is read at
    /// that offset, not refused.
    #[test]
    fn a_producer_time_with_an_offset_without_its_colon_is_read() {
        for (created, key) in [
            (
                "2017-04-24T17:20:11.503+0000",
                "2017-04-24T17:20:11.503000Z",
            ),
            (
                "2017-04-24T18:20:11.503+0100",
                "2017-04-24T17:20:11.503000Z",
            ),
            ("2017-04-24T15:50:11-0130", "2017-04-24T17:20:11.000000Z"),
            ("2017-04-24 17:20:11.5+0000", "2017-04-24T17:20:11.500000Z"),
        ] {
            assert_eq!(created_keyed_as(created).unwrap(), key, "{created}");
        }
        for bad in ["2017-04-24T17:20:11+2500", "2017-04-24T17:20:11+00000"] {
            let e = created_keyed_as(bad).expect_err(bad);
            assert!(e.to_string().contains("field `created`"), "{e}");
        }
    }

    #[test]
    fn offsets_normalize_to_utc() {
        assert_eq!(
            normalize_time("2020-01-01T01:00:00+01:00").unwrap(),
            "2020-01-01T00:00:00.000000Z"
        );
    }
}

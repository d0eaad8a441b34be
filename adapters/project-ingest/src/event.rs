//! Decoding Pluto project events: plain JSON or Kinesis envelopes with base64 `data`.

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
    /// Decoded `data` of a Kinesis record is not a JSON object.
    #[error("field `{field}`: decoded data is not a JSON object: {reason}")]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Commission id (integers are kept as their decimal text).
    pub commission_id: String,
    /// Commission title.
    pub commission_title: String,
    /// Production office.
    pub production_office: String,
    /// Creation time as sent (validated RFC 3339).
    pub created: String,
    /// Ordering key: normalized UTC timestamp, compared as text; None = unordered.
    pub version: Option<String>,
}

/// One event found in a message: a project event, or a `type` this service ignores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A project-created / project-updated event.
    Project(ProjectEvent),
    /// Any other `type` (logged and dropped).
    UnknownType(String),
}

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

/// A time as fixed-width UTC text, so text order is time order; None for a year chrono
/// would write with a sign or a fifth digit (which would sort before every real time).
pub fn time_key(t: chrono::DateTime<chrono::Utc>) -> Option<String> {
    use chrono::Datelike;
    (0..=9999)
        .contains(&t.year())
        .then(|| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string())
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

fn time_field(o: &Map<String, Value>, f: &str) -> Result<(String, String), FieldError> {
    let s = string(o, f)?;
    match normalize_time(&s) {
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
    parse_with_receipt(v, arrival, None)
}

/// [`parse_project`] of a plain message, with `received`: when it first reached this
/// service (normalized), the last resort ordering a project-updated event.
fn parse_with_receipt(
    v: &Value,
    arrival: Option<String>,
    received: Option<&str>,
) -> Result<Parsed, EventError> {
    let Value::Object(o) = v else {
        return Err(EventError::Shape(format!(
            "expected a JSON object, found {}",
            kind_name(v)
        )));
    };
    let kind = match string(o, "type")?.as_str() {
        "project-created" => EventKind::Created,
        "project-updated" => EventKind::Updated,
        other => return Ok(Parsed::UnknownType(other.to_string())),
    };
    let id = identifier(o, "id")?;
    let title = string(o, "title")?;
    let status = string(o, "status")?;
    let commission_id = identifier(o, "commissionId")?;
    let commission_title = string(o, "commissionTitle")?;
    let production_office = string(o, "productionOffice")?;
    let (created, created_norm) = time_field(o, "created")?;
    // Ordering key: an explicit `updated` time wins, then the Kinesis arrival time; then a
    // project-created event falls back to its `created` time, and a project-updated one
    // to the first receipt of a plain message (kept across retries), so an older update
    // returning from a retry tier never overwrites a newer one applied meanwhile.
    let updated = match o.get("updated") {
        None | Some(Value::Null) => None,
        Some(_) => Some(time_field(o, "updated")?.1),
    };
    let fallback = match kind {
        EventKind::Created => Some(created_norm),
        EventKind::Updated => received.map(str::to_string),
    };
    let version = updated.or(arrival).or(fallback);
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
    }))
}

/// Kinesis' `approximateArrivalTimestamp`: epoch seconds with a fraction (milliseconds
/// from a producer that writes those).
fn arrival_time(rec: &Map<String, Value>) -> Option<String> {
    let mut secs = rec.get("approximateArrivalTimestamp")?.as_f64()?;
    if secs >= FINER_UNIT_FROM as f64 {
        secs /= 1000.0;
    }
    let micros = (secs * 1_000_000.0).round() as i64;
    chrono::DateTime::from_timestamp_micros(micros).and_then(time_key)
}

/// Decodes one Kinesis record (`{"data": base64, ...}`); `path` names it in errors.
fn parse_kinesis_record(rec: &Value, path: &str) -> Result<Parsed, EventError> {
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
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| EventError::Base64 {
            field: field.clone(),
            reason: e.to_string(),
        })?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| EventError::DataJson {
        field: field.clone(),
        reason: e.to_string(),
    })?;
    if !json.is_object() {
        return Err(EventError::DataJson {
            field,
            reason: format!("found {}", kind_name(&json)),
        });
    }
    parse_project(&json, arrival_time(o))
}

/// Splits a message into its events: a plain project JSON (one item), a Kinesis record
/// (`{"kinesis":{"data":…}}` or `{"data":…}`) or a Kinesis event (`{"Records":[…]}`);
/// `received` (normalized) orders a plain project-updated JSON, which has no arrival time.
pub fn items(msg: &Value, received: &str) -> Vec<Item> {
    let one = |parsed| {
        vec![Item {
            raw: msg.clone(),
            parsed,
        }]
    };
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
            return one(Err(EventError::Shape("`Records` is empty".into())));
        }
        return records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let path = format!("Records[{i}].kinesis");
                let parsed = match r.get("kinesis") {
                    Some(k) => parse_kinesis_record(k, &path),
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
        return one(parse_kinesis_record(k, "kinesis"));
    }
    if o.contains_key("data") && !o.contains_key("type") {
        return one(parse_kinesis_record(msg, "record"));
    }
    one(parse_with_receipt(msg, None, Some(received)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arrival_times_in_seconds_or_milliseconds_give_one_key_and_no_signed_year() {
        let at = |v: Value| {
            let mut m = Map::new();
            m.insert("approximateArrivalTimestamp".into(), v);
            arrival_time(&m)
        };
        let want = Some("2018-12-17T22:10:50.987000Z".to_string());
        assert_eq!(at(json!(1_545_084_650.987)), want);
        assert_eq!(at(json!(1_545_084_650_987_u64)), want);
        // Beyond the year 9999 whichever unit: no key, rather than "+…" text that sorts
        // before every real time.
        assert_eq!(at(json!(1e17)), None);
        assert_eq!(
            time_key(chrono::DateTime::from_timestamp(253_402_300_800, 0).unwrap()),
            None
        );
        assert_eq!(at(json!("soon")), None);
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
        assert_eq!(p.commission_id, "42");
        v["commissionId"] = json!(true);
        assert_eq!(
            parse_project(&v, None).unwrap_err().to_string(),
            "field `commissionId`: expected integer or non-empty string, found boolean"
        );
    }

    #[test]
    fn offsets_normalize_to_utc() {
        assert_eq!(
            normalize_time("2020-01-01T01:00:00+01:00").unwrap(),
            "2020-01-01T00:00:00.000000Z"
        );
    }
}

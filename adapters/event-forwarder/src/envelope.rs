//! Telling a Kinesis envelope from a plain event, keeping every byte as received.

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

/// One record of a Kinesis envelope.
#[derive(Debug, Clone)]
pub struct KinesisRecord<'a> {
    /// The whole record, as received (dead-lettered alone when the endpoint refuses it).
    pub record: &'a RawValue,
    /// Its `kinesis` value (any JSON type), as received: what is POSTed.
    pub kinesis: &'a RawValue,
    /// Its `eventID` where it is a string (`shardId-…:<sequence number>`, unique in the
    /// stream): the record's own identity, whatever message carried it.
    pub event_id: Option<String>,
}

/// What one bus message holds.
#[derive(Debug)]
pub enum Events<'a> {
    /// A single event: the whole body is POSTed unchanged.
    Single(&'a RawValue),
    /// `{"Records":[{"kinesis":…}, …]}`, or one such record on its own: each record's
    /// `kinesis` value is POSTed on its own.
    Kinesis(Vec<KinesisRecord<'a>>),
    /// `{"Records":[]}` and nothing else: a batch of no events, so nothing to POST (the
    /// original's loop over the records posted nothing either).
    NoRecords,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmptyEnvelope {
    #[serde(rename = "Records")]
    _records: [serde::de::IgnoredAny; 0],
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "Records", borrow)]
    records: Vec<&'a RawValue>,
}

#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    kinesis: &'a RawValue,
    // Any JSON type: a record is a record whatever its eventID holds.
    #[serde(rename = "eventID", borrow, default)]
    event_id: Option<&'a RawValue>,
}

/// The keys that tell a Kinesis record standing alone from an event that merely has a
/// `kinesis` field: events are arbitrary JSON, and any of them may.
#[derive(Deserialize)]
struct LoneRecordMarks<'a> {
    // Present even as `null`: `Option` alone would read a `null` as absent.
    #[serde(rename = "Records", borrow, default, deserialize_with = "present")]
    records: Option<&'a RawValue>,
    #[serde(rename = "eventSource", borrow, default, deserialize_with = "present")]
    event_source: Option<&'a RawValue>,
}

/// A key's value whatever it is, `null` included, so that only an absent key is `None`.
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Only JSON objects are envelopes and records: serde would also read a struct from an
/// array (`[[…]]` as `{"Records":[…]}`), turning any nested array into "records".
fn is_object(r: &RawValue) -> bool {
    r.get().trim_start().starts_with('{')
}

/// `raw` as a Kinesis record (an object with a `kinesis` key), wherever it came from: an
/// element of `Records` or a body of its own.
fn kinesis_record(raw: &RawValue) -> Option<KinesisRecord<'_>> {
    if !is_object(raw) {
        return None;
    }
    let r = serde_json::from_str::<Record<'_>>(raw.get()).ok()?;
    Some(KinesisRecord {
        record: raw,
        kinesis: r.kinesis,
        // A blank id names nothing: every such record anywhere would share one
        // Idempotency-Key, and an endpoint honouring it would drop all but the first.
        event_id: r
            .event_id
            .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
            .filter(|id| !id.trim().is_empty()),
    })
}

/// Whether `body`, an object, is one Kinesis record published alone (a per-record
/// Kinesis → RabbitMQ bridge): no `Records` key, and `"eventSource": "aws:kinesis"`, which
/// every record Kinesis writes carries (an `eventID` alone is no mark: an application's
/// event may have one, and its body must be posted whole). The `kinesis` key itself is
/// left to [`kinesis_record`].
fn is_lone_record(body: &RawValue) -> bool {
    let Ok(marks) = serde_json::from_str::<LoneRecordMarks<'_>>(body.get()) else {
        return false;
    };
    let from_kinesis = marks
        .event_source
        .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
        .is_some_and(|s| s == "aws:kinesis");
    marks.records.is_none() && from_kinesis
}

/// Splits a body: a Kinesis envelope when `Records` is a non-empty array whose every
/// element is an object with a `kinesis` key, whatever the JSON type of its value (an
/// object, a string, a number…, design §7); a one-record envelope when the body is itself
/// such a record, marked as one by `"eventSource": "aws:kinesis"` and with no `Records`
/// key; `{"Records":[]}` and nothing else, a batch of no events; anything else (an object
/// with a `kinesis` key but not that mark included) is a single event.
pub fn split(body: &RawValue) -> Events<'_> {
    if !is_object(body) {
        return Events::Single(body);
    }
    if is_lone_record(body) {
        return match kinesis_record(body) {
            Some(r) => Events::Kinesis(vec![r]),
            None => Events::Single(body),
        };
    }
    let Ok(env) = serde_json::from_str::<Envelope<'_>>(body.get()) else {
        return Events::Single(body);
    };
    if env.records.is_empty() {
        return match serde_json::from_str::<EmptyEnvelope>(body.get()) {
            Ok(_) => Events::NoRecords,
            Err(_) => Events::Single(body),
        };
    }
    let mut out = Vec::with_capacity(env.records.len());
    for record in env.records {
        match kinesis_record(record) {
            Some(r) => out.push(r),
            None => return Events::Single(body),
        }
    }
    Events::Kinesis(out)
}

/// A one-record envelope around `record`, so a dead-lettered record replays as an event.
pub fn single_record_envelope(record: &RawValue) -> Vec<u8> {
    format!("{{\"Records\":[{}]}}", record.get()).into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_are_single_events_never_envelopes() {
        for body in ["[[1]]", "[[[{\"kinesis\":1}]]]", "{\"Records\":[[1]]}"] {
            assert!(matches!(split(&raw(body)), Events::Single(_)), "{body}");
        }
    }

    fn raw(s: &str) -> Box<RawValue> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn plain_events_stay_whole() {
        for s in [
            r#"{"type":"member-registered","data":{"b":1,"a":2}}"#,
            r#"{"Records":[],"type":"x"}"#,
            r#"{"Records":[{"kinesis":{"data":"x"}},{"body":"y"}]}"#,
            r#"{"Records":"x"}"#,
            r#"[1,2]"#,
            r#""text""#,
        ] {
            let r = raw(s);
            match split(&r) {
                Events::Single(b) => assert_eq!(b.get(), s),
                e => panic!("{s}: {e:?}"),
            }
        }
    }

    #[test]
    fn an_envelope_of_no_records_holds_no_event() {
        for s in [r#"{"Records":[]}"#, r#" { "Records" : [ ] } "#] {
            assert!(matches!(split(&raw(s)), Events::NoRecords), "{s}");
        }
    }

    #[test]
    fn a_kinesis_value_of_any_json_type_is_its_own_event() {
        let s = r#"{"Records":[{"kinesis":"text"},{"kinesis":42},{"kinesis":{"a":1}},{"kinesis":[1, 2]},{"kinesis":null},{"kinesis":true}]}"#;
        let r = raw(s);
        let Events::Kinesis(recs) = split(&r) else {
            panic!("envelope expected")
        };
        let posted: Vec<&str> = recs.iter().map(|k| k.kinesis.get()).collect();
        assert_eq!(
            posted,
            [r#""text""#, "42", r#"{"a":1}"#, "[1, 2]", "null", "true"]
        );
    }

    /// The one record of `body`, which must be an envelope of exactly one.
    fn lone(body: &RawValue) -> KinesisRecord<'_> {
        match split(body) {
            Events::Kinesis(mut recs) if recs.len() == 1 => recs.remove(0),
            e => panic!("{}: a one-record envelope expected, got {e:?}", body.get()),
        }
    }

    #[test]
    fn a_record_from_kinesis_alone_is_a_one_record_envelope() {
        let s = r#"{"kinesis":{"data":"eyJ9", "partitionKey":"p","approximateArrivalTimestamp":1.7e9},"eventSource":"aws:kinesis"}"#;
        let r = raw(s);
        let rec = lone(&r);
        assert_eq!(
            rec.kinesis.get(),
            r#"{"data":"eyJ9", "partitionKey":"p","approximateArrivalTimestamp":1.7e9}"#
        );
        assert_eq!(rec.record.get(), s);
        assert_eq!(rec.event_id, None);
        // Dead-lettered alone, it replays as the same record inside `Records`.
        assert_eq!(
            single_record_envelope(rec.record),
            format!("{{\"Records\":[{s}]}}").into_bytes()
        );
    }

    #[test]
    fn a_record_alone_is_keyed_by_its_event_id() {
        let s =
            r#"{"eventID":"shardId-000000000000:7","kinesis":"text","eventSource":"aws:kinesis"}"#;
        let r = raw(s);
        let rec = lone(&r);
        assert_eq!(rec.kinesis.get(), r#""text""#);
        assert_eq!(rec.event_id.as_deref(), Some("shardId-000000000000:7"));
        // Keyed as the same record inside `Records` would be.
        let batch = raw(&format!("{{\"Records\":[{s}]}}"));
        let Events::Kinesis(in_batch) = split(&batch) else {
            panic!("envelope expected")
        };
        assert_eq!(in_batch[0].event_id, rec.event_id);
        assert_eq!(in_batch[0].kinesis.get(), rec.kinesis.get());
        // Only a non-blank string names it.
        for s in [
            r#"{"kinesis":1,"eventSource":"aws:kinesis","eventID":null}"#,
            r#"{"kinesis":1,"eventSource":"aws:kinesis","eventID":7}"#,
            r#"{"kinesis":1,"eventSource":"aws:kinesis","eventID":" "}"#,
        ] {
            assert_eq!(lone(&raw(s)).event_id, None, "{s}");
        }
    }

    #[test]
    fn an_event_that_merely_has_a_kinesis_key_stays_whole() {
        for s in [
            r#"{"kinesis":{"data":"eyJ9"}}"#,
            r#"{"kinesis":{"a":1},"eventSource":"aws:sqs"}"#,
            r#"{"kinesis":{"a":1},"eventSource":["aws:kinesis"]}"#,
            r#"{"eventSource":"aws:kinesis","eventID":"shardId-0:1"}"#,
            r#"{"kinesis":1,"eventSource":"aws:kinesis","Records":null}"#,
            r#"{"kinesis":1,"eventID":"x","Records":[]}"#,
            // An application's event with an id of its own and a `kinesis` field.
            r#"{"eventID":"e1","kinesis":{"a":1},"user":"u"}"#,
        ] {
            let r = raw(s);
            match split(&r) {
                Events::Single(b) => assert_eq!(b.get(), s),
                e => panic!("{s}: {e:?}"),
            }
        }
    }

    #[test]
    fn kinesis_records_are_split_byte_for_byte() {
        let s = r#"{"Records":[{"eventSource":"aws:kinesis","kinesis":{"sequenceNumber":"1", "data":"eyJ9"}},{"kinesis":{"z":1,"a":0}}]}"#;
        let r = raw(s);
        let Events::Kinesis(recs) = split(&r) else {
            panic!("envelope expected")
        };
        assert_eq!(recs.len(), 2);
        assert_eq!(
            recs[0].kinesis.get(),
            r#"{"sequenceNumber":"1", "data":"eyJ9"}"#
        );
        assert_eq!(recs[1].kinesis.get(), r#"{"z":1,"a":0}"#);
        assert_eq!(
            single_record_envelope(recs[1].record),
            br#"{"Records":[{"kinesis":{"z":1,"a":0}}]}"#.to_vec()
        );
    }
}

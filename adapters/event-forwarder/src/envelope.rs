//! Telling a Kinesis envelope from a plain event, keeping every byte as received.

use serde::Deserialize;
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
    /// `{"Records":[{"kinesis":…}, …]}`: each record's `kinesis` value is POSTed on its own.
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

/// Splits a body: a Kinesis envelope when `Records` is a non-empty array whose every
/// element is an object with a `kinesis` key, whatever the JSON type of its value (an
/// object, a string, a number…, design §7); `{"Records":[]}` and nothing else, a batch
/// of no events; anything else is a single event.
pub fn split(body: &RawValue) -> Events<'_> {
    // Only JSON objects are envelopes and records: serde would also read a struct from an
    // array (`[[…]]` as `{"Records":[…]}`), turning any nested array into "records".
    let is_object = |r: &RawValue| r.get().trim_start().starts_with('{');
    if !is_object(body) {
        return Events::Single(body);
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
        if !is_object(record) {
            return Events::Single(body);
        }
        match serde_json::from_str::<Record<'_>>(record.get()) {
            Ok(r) => out.push(KinesisRecord {
                record,
                kinesis: r.kinesis,
                // A blank id names nothing: every such record anywhere would share one
                // Idempotency-Key, and an endpoint honouring it would drop all but the first.
                event_id: r
                    .event_id
                    .and_then(|v| serde_json::from_str::<String>(v.get()).ok())
                    .filter(|id| !id.trim().is_empty()),
            }),
            Err(_) => return Events::Single(body),
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

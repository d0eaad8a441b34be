//! Which S3 event records carry a crash to route (design §7, crash-router).

use std::borrow::Cow;

use serde_json::Value;

/// Prefix of raw-crash object keys (design §7; `[crash_router] key_prefixes` by default).
pub const RAW_CRASH_PREFIX: &str = "v2/raw_crash/";

/// What makes a record a crash to route: the throttle digits and the key prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The throttle digit that means accept.
    pub accept: char,
    /// The throttle digit that means defer.
    pub defer: char,
    /// Prefixes of raw-crash object keys (Socorro's collector writes `v2/raw_crash/`;
    /// Antenna, its successor, `v1/raw_crash/`).
    pub prefixes: Vec<String>,
}

impl Rules {
    /// Rules of the digits `accept` and `defer` under [`RAW_CRASH_PREFIX`].
    pub fn digits(accept: char, defer: char) -> Self {
        Self {
            accept,
            defer,
            prefixes: vec![RAW_CRASH_PREFIX.to_string()],
        }
    }
}

/// What one S3 event record means for routing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A raw crash whose throttle result is the accept digit: route it.
    Accepted(String),
    /// A raw crash the collector deferred: count and skip.
    Deferred(String),
    /// Looks like a raw crash but is malformed (bad id, unknown digit, missing fields).
    /// A fixed reason is borrowed: a batch of tiny junk records allocates nothing each.
    Junk(Cow<'static, str>),
    /// Not a raw-crash creation (other event or other key): count and skip.
    Ignored(Cow<'static, str>),
}

impl Record {
    /// The metric label of this result.
    pub fn label(&self) -> &'static str {
        match self {
            Record::Accepted(_) => "accepted",
            Record::Deferred(_) => "deferred",
            Record::Junk(_) => "junk",
            Record::Ignored(_) => "ignored",
        }
    }
}

/// Whether `s` is a Socorro crash id: a lowercase UUID whose last six digits are the
/// submission date (yymmdd), as pigeon's `^[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-
/// [a-f0-9]{6}[0-9]{6}$`. (Checked by hand: a regex crate here alone made every other
/// service's own `cargo build` rebuild the workspace's shared crates.)
pub fn is_crash_id(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            30.. => c.is_ascii_digit(),
            _ => matches!(c, b'0'..=b'9' | b'a'..=b'f'),
        })
}

/// Whether an S3 `eventName` is a plain object upload (`ObjectCreated:Put`; the
/// `s3:`-prefixed notification-configuration spelling is accepted too).
pub fn is_put_event(name: &str) -> bool {
    name == "ObjectCreated:Put" || name == "s3:ObjectCreated:Put"
}

/// An event's object key as stored: S3 notifications carry it form-encoded (a space as
/// `+`, other characters as `%XX`), and MinIO's encode `/` too (`v2%2Fraw_crash%2F…`), so
/// matching the text as received would skip every crash such a store reports. Text that
/// does not decode to UTF-8 is kept as received.
fn object_key(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.contains(['%', '+']) {
        return raw.into();
    }
    let spaced = raw.replace('+', " ");
    match percent_encoding::percent_decode_str(&spaced).decode_utf8() {
        Ok(k) => k.into_owned().into(),
        Err(_) => raw.into(),
    }
}

/// Classifies one record of an S3 event notification by `rules`.
pub fn classify(record: &Value, rules: &Rules) -> Record {
    let Some(name) = record.get("eventName").and_then(Value::as_str) else {
        return Record::Junk("record has no string `eventName`".into());
    };
    if !is_put_event(name) {
        return Record::Ignored(format!("event `{name}` is not ObjectCreated:Put").into());
    }
    let Some(key) = record
        .get("s3")
        .and_then(|s| s.get("object"))
        .and_then(|o| o.get("key"))
        .and_then(Value::as_str)
    else {
        return Record::Junk("record has no string `s3.object.key`".into());
    };
    classify_key(&object_key(key), rules)
}

/// The `reason` of an EventBridge "Object Created" event that S3 notifications call
/// `ObjectCreated:Put` (the others: `POST Object`, `CopyObject`, `CompleteMultipartUpload`).
pub const EVENTBRIDGE_PUT_REASON: &str = "PutObject";

/// Classifies an S3 event delivered by EventBridge (`{"source":"aws.s3","detail-type":…,
/// "detail":{"object":{"key":…},"reason":…}}`) as the one record it stands for: an
/// "Object Created" event with reason `PutObject` is an `ObjectCreated:Put`. Its key is the
/// object's key as stored (EventBridge does not URL-encode it), so it is not decoded: a
/// `+` or `%` in it is part of the key.
pub fn classify_eventbridge(event: &Value, rules: &Rules) -> Record {
    let Some(detail_type) = event.get("detail-type").and_then(Value::as_str) else {
        return Record::Junk("EventBridge event has no string `detail-type`".into());
    };
    if detail_type != "Object Created" {
        return Record::Ignored(
            format!("EventBridge event `{detail_type}` is not Object Created").into(),
        );
    }
    let detail = event.get("detail");
    let Some(reason) = detail.and_then(|d| d.get("reason")).and_then(Value::as_str) else {
        return Record::Junk("EventBridge event has no string `detail.reason`".into());
    };
    if reason != EVENTBRIDGE_PUT_REASON {
        return Record::Ignored(format!("Object Created by `{reason}` is not a PutObject").into());
    }
    let Some(key) = detail
        .and_then(|d| d.get("object"))
        .and_then(|o| o.get("key"))
        .and_then(Value::as_str)
    else {
        return Record::Junk("EventBridge event has no string `detail.object.key`".into());
    };
    classify_key(key, rules)
}

/// Classifies a created object by its key (decoded): a raw crash, and which.
fn classify_key(key: &str, rules: &Rules) -> Record {
    let (accept, defer) = (rules.accept, rules.defer);
    if !rules.prefixes.iter().any(|p| key.starts_with(p.as_str())) {
        return Record::Ignored(
            format!("key `{key}` is not under {}", rules.prefixes.join(" or ")).into(),
        );
    }
    let id = key.rsplit('/').next().unwrap_or_default();
    if !is_crash_id(id) {
        return Record::Junk(format!("key `{key}` does not end in a crash id").into());
    }
    // A crash id is ASCII of fixed length 36, so the 7th-from-last char always exists.
    match id.chars().rev().nth(6) {
        Some(c) if c == accept => Record::Accepted(id.to_string()),
        Some(c) if c == defer => Record::Deferred(id.to_string()),
        Some(c) => {
            Record::Junk(format!("crash id `{id}` has unknown throttle result `{c}`").into())
        }
        None => Record::Junk(format!("crash id `{id}` is too short").into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Antenna's keys (`v1/raw_crash/<date>/<crash id>`) are routed once their prefix is
    /// configured, and ignored under the default (pigeon's `v2/raw_crash/`) alone.
    #[test]
    fn other_key_prefixes_are_routed_when_configured() {
        let key = "v1/raw_crash/20240115/de1bb258-cbbf-4589-a673-34f800240115";
        let r = json!({"eventName": "ObjectCreated:Put", "s3": {"object": {"key": key}}});
        assert!(matches!(
            classify(&r, &Rules::digits('0', '1')),
            Record::Ignored(_)
        ));
        let mut both = Rules::digits('0', '1');
        both.prefixes.push("v1/raw_crash/".into());
        assert_eq!(
            classify(&r, &both),
            Record::Accepted("de1bb258-cbbf-4589-a673-34f800240115".into())
        );
    }

    fn rec(event: &str, key: &str) -> Value {
        json!({"eventName": event, "s3": {"bucket": {"name": "b"}, "object": {"key": key}}})
    }

    const ACCEPT_KEY: &str = "v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc00180313";
    const DEFER_KEY: &str = "v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc01180313";
    const JUNK_KEY: &str = "v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc05180313";

    #[test]
    fn encoded_keys_are_matched_as_stored() {
        // MinIO encodes `/`; AWS sends a space as `+` (a key that is then not a crash id).
        let minio = ACCEPT_KEY.replace('/', "%2F");
        assert_eq!(
            classify(
                &rec("s3:ObjectCreated:Put", &minio),
                &Rules::digits('0', '1')
            ),
            Record::Accepted("00007bd0-2d1c-4865-af09-80bc00180313".into())
        );
        assert!(matches!(
            classify(&rec("ObjectCreated:Put", "v2/raw_crash/a+b/%ZZ"), &Rules::digits('0', '1')),
            Record::Junk(why) if why.contains("v2/raw_crash/a b/%ZZ")
        ));
        assert!(matches!(
            classify(
                &rec("ObjectCreated:Put", "v2%2Fraw_crash%2F%FF"),
                &Rules::digits('0', '1')
            ),
            Record::Ignored(_)
        ));
    }

    /// pigeon's pattern, `^[a-f0-9]{8}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{4}-[a-f0-9]{6}[0-9]{6}$`,
    /// character by character.
    #[test]
    fn crash_ids_are_lowercase_uuids_ending_in_six_digits() {
        for id in [
            "de1bb258-cbbf-4589-a673-34f800160918",
            // The last hex digit before the date.
            "de1bb258-cbbf-4589-a673-34f80a160918",
            "00000000-0000-0000-0000-ffffff999999",
        ] {
            assert!(is_crash_id(id), "{id}");
        }
        for bad in [
            "DE1BB258-cbbf-4589-a673-34f800160918",
            "de1bb258-cbbf-4589-a673-34f80016091a",
            "de1bb258-cbbf-4589-a673-34f8001609189",
            "de1bb258-cbbf-4589-a673-34f80016091",
            "de1bb258cbbf-4589-a673-34f800160918-",
            "de1bb258-cbbf-4589-a673-34f8g0160918",
            "de1bb258-cbbf-4589-a673_34f800160918",
            // 36 bytes, two of them one character.
            "de1bb258-cbbf-4589-a673-34f8001609\u{e9}",
            "",
        ] {
            assert!(!is_crash_id(bad), "{bad}");
        }
    }

    #[test]
    fn design_example_key_is_accepted_with_digit_0() {
        assert_eq!(
            classify(
                &rec("ObjectCreated:Put", ACCEPT_KEY),
                &Rules::digits('0', '1')
            ),
            Record::Accepted("00007bd0-2d1c-4865-af09-80bc00180313".into())
        );
        assert!(matches!(
            classify(
                &rec("s3:ObjectCreated:Put", ACCEPT_KEY),
                &Rules::digits('0', '1')
            ),
            Record::Accepted(_)
        ));
    }

    #[test]
    fn defer_and_junk_digits() {
        assert_eq!(
            classify(
                &rec("ObjectCreated:Put", DEFER_KEY),
                &Rules::digits('0', '1')
            ),
            Record::Deferred("00007bd0-2d1c-4865-af09-80bc01180313".into())
        );
        assert!(matches!(
            classify(
                &rec("ObjectCreated:Put", JUNK_KEY),
                &Rules::digits('0', '1')
            ),
            Record::Junk(_)
        ));
    }

    #[test]
    fn accept_digit_1_swaps_the_meaning() {
        assert!(matches!(
            classify(
                &rec("ObjectCreated:Put", DEFER_KEY),
                &Rules::digits('1', '0')
            ),
            Record::Accepted(_)
        ));
        assert!(matches!(
            classify(
                &rec("ObjectCreated:Put", ACCEPT_KEY),
                &Rules::digits('1', '0')
            ),
            Record::Deferred(_)
        ));
    }

    #[test]
    fn other_events_and_prefixes_are_ignored() {
        for ev in [
            "ObjectCreated:Copy",
            "ObjectRemoved:Delete",
            "objectcreated:put",
            "",
        ] {
            assert!(
                matches!(
                    classify(&rec(ev, ACCEPT_KEY), &Rules::digits('0', '1')),
                    Record::Ignored(_)
                ),
                "{ev}"
            );
        }
        for key in [
            "v1/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc00180313",
            "v2/dump/00007bd0-2d1c-4865-af09-80bc00180313",
            "/v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc00180313",
            "00007bd0-2d1c-4865-af09-80bc00180313",
        ] {
            assert!(
                matches!(
                    classify(&rec("ObjectCreated:Put", key), &Rules::digits('0', '1')),
                    Record::Ignored(_)
                ),
                "{key}"
            );
        }
    }

    #[test]
    fn bad_crash_ids_are_junk() {
        for id in [
            "00007BD0-2d1c-4865-af09-80bc00180313",
            "00007bd0-2d1c-4865-af09-80bc0018031",
            "00007bd0-2d1c-4865-af09-80bc001803133",
            "00007bd0-2d1c-4865-af09-80bc0018031a",
            "00007bd0_2d1c-4865-af09-80bc00180313",
            "not-a-crash",
            "",
        ] {
            let key = format!("v2/raw_crash/000/20180313/{id}");
            assert!(
                matches!(
                    classify(&rec("ObjectCreated:Put", &key), &Rules::digits('0', '1')),
                    Record::Junk(_)
                ),
                "{id}"
            );
        }
    }

    fn eventbridge(detail_type: &str, reason: &str, key: &str) -> Value {
        json!({"source": "aws.s3", "detail-type": detail_type,
               "detail": {"bucket": {"name": "b"}, "object": {"key": key}, "reason": reason}})
    }

    #[test]
    fn eventbridge_puts_are_classified_by_their_raw_key() {
        let id = "00007bd0-2d1c-4865-af09-80bc00180313";
        assert_eq!(
            classify_eventbridge(
                &eventbridge("Object Created", "PutObject", ACCEPT_KEY),
                &Rules::digits('0', '1'),
            ),
            Record::Accepted(id.into())
        );
        assert!(matches!(
            classify_eventbridge(
                &eventbridge("Object Created", "PutObject", DEFER_KEY),
                &Rules::digits('0', '1'),
            ),
            Record::Deferred(_)
        ));
        // Not URL-encoded: `%2F` and `+` are the key's own characters, not `/` and space.
        let encoded = ACCEPT_KEY.replace('/', "%2F");
        assert!(matches!(
            classify_eventbridge(
                &eventbridge("Object Created", "PutObject", &encoded),
                &Rules::digits('0', '1'),
            ),
            Record::Ignored(_)
        ));
        assert!(matches!(
            classify_eventbridge(
                &eventbridge("Object Created", "PutObject", "v2/raw_crash/a+b/x"),
                &Rules::digits('0', '1'),
            ),
            Record::Junk(why) if why.contains("v2/raw_crash/a+b/x")
        ));
        for (dt, reason) in [
            ("Object Created", "CopyObject"),
            ("Object Created", "POST Object"),
            ("Object Created", "CompleteMultipartUpload"),
            ("Object Deleted", "DeleteObject"),
        ] {
            assert!(
                matches!(
                    classify_eventbridge(
                        &eventbridge(dt, reason, ACCEPT_KEY),
                        &Rules::digits('0', '1')
                    ),
                    Record::Ignored(_)
                ),
                "{dt} {reason}"
            );
        }
        for bad in [
            json!({"source": "aws.s3"}),
            json!({"source": "aws.s3", "detail-type": "Object Created", "detail": {}}),
            json!({"source": "aws.s3", "detail-type": "Object Created",
                   "detail": {"reason": "PutObject", "object": {"key": 7}}}),
        ] {
            assert!(
                matches!(
                    classify_eventbridge(&bad, &Rules::digits('0', '1')),
                    Record::Junk(_)
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn records_missing_fields_are_junk() {
        for r in [
            json!({}),
            json!("text"),
            json!({"eventName": 5}),
            json!({"eventName": "ObjectCreated:Put"}),
            json!({"eventName": "ObjectCreated:Put", "s3": {"object": {}}}),
            json!({"eventName": "ObjectCreated:Put", "s3": {"object": {"key": 7}}}),
        ] {
            assert!(
                matches!(classify(&r, &Rules::digits('0', '1')), Record::Junk(_)),
                "{r}"
            );
        }
    }
}

//! Status messages: validation, defaults and the `Records[].body` envelope.

use framework::fields::{FieldError, kind_name, no_nul, non_empty_text};
use serde_json::{Map, Value};

/// Default of `filename` when absent.
pub const FILENAME_NOT_SET: &str = "NOT_SET";

/// Why a status message (or one record) is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    /// A field is missing, null, empty or of the wrong type or value.
    #[error(transparent)]
    Field(#[from] FieldError),
    /// A `body` string is not JSON, or holds more than a message may.
    #[error("field `body` {0}")]
    BodyJson(framework::fields::TextJsonError),
    /// The message is not an object / `Records` is not usable.
    #[error("{0}")]
    Shape(String),
}

/// A validated status message with defaults applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusMessage {
    /// Snapshot run id.
    pub correlation_id: String,
    /// Collection (topic) name.
    pub collection_name: String,
    /// `full` / `incremental` …
    pub snapshot_type: String,
    /// Export date.
    pub export_date: String,
    /// Passed through to the export-state message (default "true").
    pub shutdown_flag: String,
    /// Passed through to the export-state message (default "true").
    pub reprocess_files: String,
    /// `is_success_file`, compared case-insensitively with "true" (default false).
    pub is_success_file: bool,
    /// File name: `filename`, else the original lambda's `file_name` (default `NOT_SET`).
    pub filename: String,
    /// Files the exporter wrote for the collection, when this message reports it.
    pub files_exported: Option<i64>,
    /// Files the sender sent for the collection, when this message reports it.
    pub files_sent: Option<i64>,
}

/// What a status message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Carries `files_exported` and/or `files_sent`.
    Counts,
    /// A success file arrived.
    SuccessFile,
    /// A data file arrived.
    File,
}

impl StatusMessage {
    /// The message's kind (counts take precedence over files).
    pub fn kind(&self) -> Kind {
        if self.files_exported.is_some() || self.files_sent.is_some() {
            Kind::Counts
        } else if self.is_success_file {
            Kind::SuccessFile
        } else {
            Kind::File
        }
    }
}

/// One record of a message: its body bytes (dead-lettered as is) and its validation.
#[derive(Debug, Clone)]
pub struct Record {
    /// The record body as received (a JSON string body: its text).
    pub raw: Vec<u8>,
    /// The SQS `messageId` of the record, where it came from SQS: what tells two unnamed
    /// files of identical content apart, and a redelivery of one from a second file.
    pub sqs_message_id: Option<String>,
    /// Validated message or why not.
    pub parsed: Result<StatusMessage, InvalidMessage>,
}

/// A decoded input message.
#[derive(Debug, Clone)]
pub enum Input {
    /// A plain status message.
    Single(Result<StatusMessage, InvalidMessage>),
    /// `{"Records": [{"body": …}, …]}`.
    Records(Vec<Record>),
    /// `{"Records": []}`: a batch of no status messages (the Lambda did nothing with it).
    Empty,
}

fn optional(o: &Map<String, Value>, f: &str, default: &str) -> Result<String, FieldError> {
    match o.get(f) {
        Some(Value::String(s)) if s.is_empty() => Ok(default.to_string()),
        _ => passed_on(o, f, default),
    }
}

/// A field passed on to the export-state message: its default only when it is not there
/// (the seed: "defaults to true if not present"); an empty one is passed on empty, as the
/// original did, rather than turned into "true" (the sender would then shut down).
fn passed_on(o: &Map<String, Value>, f: &str, default: &str) -> Result<String, FieldError> {
    match o.get(f) {
        None | Some(Value::Null) => Ok(default.to_string()),
        Some(Value::String(s)) => no_nul(f, s).map(|()| s.clone()),
        // As the required fields: a boolean or a number is taken as its text (`1` is
        // passed on as "1", as the original passed whatever it was given).
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(FieldError::wrong_type(f, "string", other)),
    }
}

/// A count: an integer ≥ 0, one written as a whole float (`7.0`, `1e3`: how some JSON
/// writers put every number), or as a string of decimal digits (`"2"`: how the original's
/// producers wrote every value, the DynamoDB way); a fraction, a negative, any other text
/// or a count beyond `i64` is refused.
fn count(o: &Map<String, Value>, f: &str) -> Result<Option<i64>, FieldError> {
    // 2^63 as a float: whole floats below it are exact in an i64.
    const LIMIT: f64 = 9_223_372_036_854_775_808.0;
    let whole = |n: &serde_json::Number| {
        n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|v| v.fract() == 0.0 && (0.0..LIMIT).contains(v))
                .map(|v| v as i64)
        })
    };
    match o.get(f) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) if whole(n).is_some_and(|i| i >= 0) => Ok(whole(n)),
        Some(Value::String(t))
            if !t.is_empty()
                && t.bytes().all(|b| b.is_ascii_digit())
                && t.parse::<i64>().is_ok() =>
        {
            Ok(t.parse().ok())
        }
        Some(other) => Err(FieldError::Type {
            field: f.into(),
            // A count no record can hold is named for its size, not as if it were negative.
            expected: match other {
                Value::Number(n)
                    if n.as_u64().is_some() || n.as_f64().is_some_and(|v| v >= LIMIT) =>
                {
                    "an integer ≥ 0 of at most 9223372036854775807"
                }
                Value::String(t) if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) => {
                    "an integer ≥ 0 of at most 9223372036854775807"
                }
                _ => "an integer ≥ 0",
            },
            found: match other {
                Value::Number(n) => n.to_string(),
                Value::String(t) => format!("{t:?}"),
                v => kind_name(v).into(),
            },
        }),
    }
}

/// The file's name: `filename` (this contract's and the lambda README's), else `file_name`,
/// the field the original lambda actually reads (its `FILE_NAME_FIELD_NAME`), so a sender
/// written against the lambda has its files counted by name; both are validated alike.
fn filename(o: &Map<String, Value>) -> Result<String, FieldError> {
    let filename = optional(o, "filename", "")?;
    let file_name = optional(o, "file_name", "")?;
    Ok([filename, file_name]
        .into_iter()
        .find(|n| !n.is_empty())
        .unwrap_or_else(|| FILENAME_NOT_SET.to_string()))
}

/// Validates one status message object.
pub fn parse_status(v: &Value) -> Result<StatusMessage, InvalidMessage> {
    let Value::Object(o) = v else {
        return Err(InvalidMessage::Shape(format!(
            "expected a JSON object, found {}",
            kind_name(v)
        )));
    };
    // Required fields given as a boolean or a number are taken as their text, as the
    // original (which formatted whatever it got) did (design §7).
    Ok(StatusMessage {
        correlation_id: non_empty_text(o, "correlation_id")?,
        collection_name: non_empty_text(o, "collection_name")?,
        snapshot_type: non_empty_text(o, "snapshot_type")?,
        export_date: non_empty_text(o, "export_date")?,
        shutdown_flag: passed_on(o, "shutdown_flag", "true")?,
        reprocess_files: passed_on(o, "reprocess_files", "true")?,
        is_success_file: optional(o, "is_success_file", "false")?.eq_ignore_ascii_case("true"),
        filename: filename(o)?,
        files_exported: count(o, "files_exported")?,
        files_sent: count(o, "files_sent")?,
    })
}

fn parse_record(r: &Value) -> Record {
    let body = match r {
        Value::Object(o) => o.get("body"),
        _ => None,
    };
    // An id that could not be one (blank, control characters, longer than SQS's 100
    // characters by far) is not used: the record is keyed as one without it.
    let sqs_message_id = r
        .get("messageId")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|id| !id.is_empty() && id.len() <= 256 && !id.chars().any(char::is_control))
        .map(str::to_string);
    let (raw, parsed) = match body {
        Some(Value::String(s)) => (
            s.as_bytes().to_vec(),
            framework::fields::json_in_text(s.as_bytes())
                .map_err(InvalidMessage::BodyJson)
                .and_then(|v| parse_status(&v)),
        ),
        Some(Value::Null) => (
            serde_json::to_vec(r).unwrap_or_default(),
            Err(FieldError::Null("body".into()).into()),
        ),
        Some(v) => (serde_json::to_vec(v).unwrap_or_default(), parse_status(v)),
        None => (
            serde_json::to_vec(r).unwrap_or_default(),
            Err(FieldError::Missing("body".into()).into()),
        ),
    };
    Record {
        raw,
        sqs_message_id,
        parsed,
    }
}

/// Decodes a message: `Records` envelope or a plain status message.
pub fn decode(v: &Value) -> Input {
    match v.get("Records") {
        Some(Value::Array(recs)) if !recs.is_empty() => {
            Input::Records(recs.iter().map(parse_record).collect())
        }
        Some(Value::Array(_)) => Input::Empty,
        Some(other) => Input::Single(Err(FieldError::wrong_type("Records", "array", other).into())),
        None => Input::Single(parse_status(v)),
    }
}

/// Python-style title case: first letter of each alphabetic run upper, the rest lower.
pub fn title_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut prev_alpha = false;
    for c in s.chars() {
        if c.is_alphabetic() {
            if prev_alpha {
                out.extend(c.to_lowercase());
            } else {
                out.extend(c.to_uppercase());
            }
            prev_alpha = true;
        } else {
            out.push(c);
            prev_alpha = false;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"correlation_id":"c","collection_name":"db.a","snapshot_type":"full","export_date":"2020-01-01"})
    }

    /// A record's `body` text holding more JSON values than a message may is refused
    /// unread (the framework bounds the body's values, not its strings' text): decoded, a
    /// 16 MiB one took 400 MiB and killed the service at every redelivery.
    #[test]
    fn a_body_text_with_too_many_values_is_refused_unread() {
        let text = serde_json::to_string(&vec![0u8; framework::MAX_JSON_VALUES]).unwrap();
        let Input::Records(records) = decode(&json!({"Records": [{"body": text}]})) else {
            panic!("records");
        };
        let e = records[0].parsed.as_ref().expect_err("refused");
        assert!(e.to_string().starts_with("field `body` holds about"), "{e}");
    }

    #[test]
    fn defaults() {
        let m = parse_status(&base()).unwrap();
        assert_eq!(m.shutdown_flag, "true");
        assert_eq!(m.reprocess_files, "true");
        assert!(!m.is_success_file);
        assert_eq!(m.filename, FILENAME_NOT_SET);
        assert_eq!(m.kind(), Kind::File);
        let mut b = base();
        b["shutdown_flag"] = Value::Null;
        assert_eq!(
            parse_status(&b).unwrap().shutdown_flag,
            "true",
            "null: not given"
        );
    }

    /// The seed defaults the flags only when they are not present: an empty one is passed
    /// on empty (turned into "true", the sender shut down where the original's did not).
    #[test]
    fn empty_flags_are_passed_on_empty() {
        let mut b = base();
        b["shutdown_flag"] = json!("");
        b["reprocess_files"] = json!("");
        let m = parse_status(&b).unwrap();
        assert_eq!(m.shutdown_flag, "");
        assert_eq!(m.reprocess_files, "");
    }

    /// The flags, like the required fields, take a boolean or a number as its text (a
    /// number was dead-lettered: the file uncounted, its collection stalled).
    #[test]
    fn flags_given_as_booleans_or_numbers_are_their_text() {
        let mut b = base();
        b["shutdown_flag"] = json!(false);
        b["reprocess_files"] = json!(1);
        b["is_success_file"] = json!(true);
        let m = parse_status(&b).unwrap();
        assert_eq!(m.shutdown_flag, "false");
        assert_eq!(m.reprocess_files, "1");
        assert!(m.is_success_file);
        b["reprocess_files"] = json!([1]);
        assert!(parse_status(&b).is_err(), "an array is no flag");
    }

    #[test]
    fn success_flag_is_case_insensitive() {
        for v in ["true", "TRUE", "True", "tRuE"] {
            let mut b = base();
            b["is_success_file"] = json!(v);
            assert!(parse_status(&b).unwrap().is_success_file, "{v}");
        }
        let mut b = base();
        b["is_success_file"] = json!("yes");
        assert!(!parse_status(&b).unwrap().is_success_file);
    }

    #[test]
    fn counts_must_be_non_negative_integers() {
        let mut b = base();
        b["files_sent"] = json!(-1);
        assert_eq!(
            parse_status(&b).unwrap_err().to_string(),
            "field `files_sent`: expected an integer ≥ 0, found -1"
        );
        // Written as text, as the original's producers wrote every value: that count; any
        // other text is no count.
        for (v, want) in [("3", 3), ("0", 0), ("0042", 42)] {
            b["files_sent"] = json!(v);
            assert_eq!(parse_status(&b).unwrap().files_sent, Some(want), "{v}");
        }
        for v in ["", " 3", "+3", "-1", "3.0", "three", "9223372036854775808"] {
            b["files_sent"] = json!(v);
            assert!(parse_status(&b).is_err(), "{v:?}");
        }
        for v in [
            json!(9_223_372_036_854_775_808_u64),
            json!("9223372036854775808"),
            json!(1e19),
        ] {
            b["files_sent"] = v.clone();
            assert_eq!(
                parse_status(&b).unwrap_err().to_string(),
                format!(
                    "field `files_sent`: expected an integer ≥ 0 of at most \
                     9223372036854775807, found {}",
                    match &v {
                        Value::String(t) => format!("{t:?}"),
                        n => n.to_string(),
                    }
                )
            );
        }
        b["files_sent"] = json!(3);
        b["files_exported"] = json!("x");
        assert_eq!(
            parse_status(&b).unwrap_err().to_string(),
            "field `files_exported`: expected an integer ≥ 0, found \"x\""
        );
        b["files_exported"] = json!(null);
        // A whole number written as a float is that count; a fraction is not a count.
        for (v, want) in [(json!(7.0), 7), (json!(0.0), 0), (json!(1e3), 1000)] {
            b["files_sent"] = v.clone();
            assert_eq!(parse_status(&b).unwrap().files_sent, Some(want), "{v}");
        }
        for v in [json!(7.5), json!(-1.0), json!(1e19), json!(-0.5)] {
            b["files_sent"] = v.clone();
            assert!(parse_status(&b).is_err(), "{v}");
        }
    }

    #[test]
    fn required_booleans_and_numbers_are_taken_as_text() {
        let mut b = base();
        b["correlation_id"] = json!(12);
        b["export_date"] = json!(20200101);
        b["snapshot_type"] = json!(true);
        b["collection_name"] = json!(1.5);
        let m = parse_status(&b).unwrap();
        assert_eq!(m.correlation_id, "12");
        assert_eq!(m.export_date, "20200101");
        assert_eq!(m.snapshot_type, "true");
        assert_eq!(m.collection_name, "1.5");
        b["collection_name"] = json!(["x"]);
        assert_eq!(
            parse_status(&b).unwrap_err().to_string(),
            "field `collection_name`: expected string, found array"
        );
    }

    #[test]
    fn nul_in_any_string_is_refused_naming_the_field() {
        for f in [
            "correlation_id",
            "filename",
            "shutdown_flag",
            "reprocess_files",
        ] {
            let mut b = base();
            b[f] = json!("a\u{0}");
            assert_eq!(
                parse_status(&b).unwrap_err(),
                InvalidMessage::Field(FieldError::Nul(f.into())),
                "{f}"
            );
        }
    }

    #[test]
    fn file_name_is_an_alias_of_filename() {
        let mut b = base();
        b["file_name"] = json!("a.gz.enc");
        assert_eq!(parse_status(&b).unwrap().filename, "a.gz.enc");
        // `filename` wins when both are given; an empty or null one defers to the other.
        b["filename"] = json!("b.gz.enc");
        assert_eq!(parse_status(&b).unwrap().filename, "b.gz.enc");
        for none in [json!(""), Value::Null] {
            b["filename"] = none;
            assert_eq!(parse_status(&b).unwrap().filename, "a.gz.enc");
        }
        b["file_name"] = json!("");
        assert_eq!(parse_status(&b).unwrap().filename, FILENAME_NOT_SET);
        // Validated like `filename`, naming the field.
        b["file_name"] = json!(true);
        assert_eq!(parse_status(&b).unwrap().filename, "true");
        for (v, e) in [
            (
                json!("a\u{0}"),
                "field `file_name` contains a NUL character (\\u0000)",
            ),
            (
                json!(["a"]),
                "field `file_name`: expected string, found array",
            ),
        ] {
            b["file_name"] = v;
            assert_eq!(parse_status(&b).unwrap_err().to_string(), e);
        }
    }

    #[test]
    fn titles() {
        assert_eq!(title_case("incremental"), "Incremental");
        assert_eq!(title_case("FULL snapshot"), "Full Snapshot");
    }
}

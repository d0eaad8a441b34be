//! Reading the fields of a JSON input validated by hand (when a service must say which
//! field is wrong and how, or keep going with the rest of a batch), with errors that name
//! the field and what was there — the `x-error` an operator reads in the DLQ.

use serde_json::{Map, Value};

/// Why one field of a JSON input cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// A required field is absent.
    #[error("field `{0}` is missing")]
    Missing(String),
    /// A required field is JSON null.
    #[error("field `{0}` is null")]
    Null(String),
    /// A required string is empty or blank.
    #[error("field `{0}` is empty")]
    Empty(String),
    /// A string holds U+0000: valid JSON, but PostgreSQL text cannot store it, so it
    /// would fail every retry; it is refused where it is read instead.
    #[error("field `{0}` contains a NUL character (\\u0000)")]
    Nul(String),
    /// A field has the wrong JSON type or an unusable value.
    #[error("field `{field}`: expected {expected}, found {found}")]
    Type {
        /// Field name (or path).
        field: String,
        /// What was expected.
        expected: &'static str,
        /// What was there.
        found: String,
    },
}

impl FieldError {
    /// `field` holds a value of the wrong JSON type.
    pub fn wrong_type(field: impl Into<String>, expected: &'static str, found: &Value) -> Self {
        Self::Type {
            field: field.into(),
            expected,
            found: kind_name(found).into(),
        }
    }
}

/// The most JSON values a body may hold to be decoded. Decoded, a value takes 32 bytes or
/// more where its text can take two (`0,`): a 16 MiB array of small numbers — within
/// `max_body_bytes` — took about 400 MiB while it was decoded and killed a service run
/// with the memory limit docs/scaling.md gives, again at every redelivery. A million
/// values (tens of MiB decoded) is far beyond any real message.
pub const MAX_JSON_VALUES: usize = 1 << 20;

/// An upper bound of the values in JSON text `body` (keys included): one more than the
/// separators and openers outside strings. One pass over the bytes, nothing allocated.
pub fn json_values(body: &[u8]) -> usize {
    let mut n = 1;
    let mut in_string = false;
    let mut escaped = false;
    for &b in body {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b',' | b':' | b'[' | b'{' => n += 1,
                _ => {}
            }
        }
    }
    n
}

/// Why JSON text found inside a message was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextJsonError {
    /// More values than a message may hold ([`MAX_JSON_VALUES`]): not decoded at all.
    #[error(
        "holds about {0} JSON values, more than the {MAX_JSON_VALUES} a message may (decoded, \
         each takes 32 bytes or more): not decoded"
    )]
    TooMany(usize),
    /// Not JSON (serde_json's reason).
    #[error("is not valid JSON: {0}")]
    Invalid(String),
}

/// JSON text found inside a message (an SQS record's `body`, an SNS `Message`, a Kinesis
/// record's decoded `data`) decoded as a value, refused unread when it holds more than
/// [`MAX_JSON_VALUES`]: the framework bounds what a body holds, not the text inside its
/// strings, so a 16 MiB `"[0,0,…]"` there took 400 MiB decoded and killed the service at
/// every redelivery.
pub fn json_in_text(text: &[u8]) -> Result<Value, TextJsonError> {
    let values = json_values(text);
    if values > MAX_JSON_VALUES {
        return Err(TextJsonError::TooMany(values));
    }
    serde_json::from_slice(text).map_err(|e| TextJsonError::Invalid(e.to_string()))
}

/// The JSON type of `v` as error messages name it.
pub fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Refuses `s`, the text of field `f`, if it contains a NUL character.
pub fn no_nul(f: &str, s: &str) -> Result<(), FieldError> {
    if s.contains('\0') {
        return Err(FieldError::Nul(f.into()));
    }
    Ok(())
}

/// Field `f` of `o`, neither absent nor null.
pub fn present<'a>(o: &'a Map<String, Value>, f: &str) -> Result<&'a Value, FieldError> {
    match o.get(f) {
        None => Err(FieldError::Missing(f.into())),
        Some(Value::Null) => Err(FieldError::Null(f.into())),
        Some(v) => Ok(v),
    }
}

/// Field `f` of `o` as a string (possibly empty, never with a NUL).
pub fn string(o: &Map<String, Value>, f: &str) -> Result<String, FieldError> {
    match present(o, f)? {
        Value::String(s) => no_nul(f, s).map(|()| s.clone()),
        other => Err(FieldError::wrong_type(f, "string", other)),
    }
}

/// Field `f` of `o` as a string that is not blank (and has no NUL).
pub fn non_empty_string(o: &Map<String, Value>, f: &str) -> Result<String, FieldError> {
    match present(o, f)? {
        Value::String(s) if s.trim().is_empty() => Err(FieldError::Empty(f.into())),
        Value::String(s) => no_nul(f, s).map(|()| s.clone()),
        other => Err(FieldError::wrong_type(f, "string", other)),
    }
}

/// 2^53: from here on not every integer has an f64 of its own.
const INEXACT_FROM: f64 = 9_007_199_254_740_992.0;

/// Field `f` of `o` as non-blank text: a string, or a boolean or number taken as its JSON
/// text (`true`, `42`, `1.5`), for inputs whose producers did not quote every value.
pub fn non_empty_text(o: &Map<String, Value>, f: &str) -> Result<String, FieldError> {
    match present(o, f)? {
        // Beyond 64 bits an integer is held as an f64 and its text would be another number
        // (…901234 and …901235 alike): two ids would name one thing.
        Value::Number(n)
            if n.as_f64().is_some_and(|x| {
                !n.is_i64() && !n.is_u64() && x.fract() == 0.0 && x.abs() >= INEXACT_FROM
            }) =>
        {
            Err(FieldError::Type {
                field: f.into(),
                expected: "a number that is kept exactly (send a larger one as a string)",
                found: format!("{n}"),
            })
        }
        v @ (Value::Bool(_) | Value::Number(_)) => Ok(v.to_string()),
        _ => non_empty_string(o, f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_values_count_what_decoding_would_make_and_nothing_inside_strings() {
        assert_eq!(json_values(b"0"), 1);
        assert_eq!(json_values(b"[0,0,0]"), 4, "the array and its three");
        assert_eq!(json_values(br#"{"a":1,"b":[2]}"#), 6, "keys count");
        assert_eq!(
            json_values(br#"["a,b:[{", "x\",y", "\\"]"#),
            4,
            "an escaped quote ends no string, an escaped backslash hides no quote"
        );
        let many = serde_json::to_vec(&vec![0u8; 5000]).unwrap();
        assert_eq!(json_values(&many), 5001);
    }

    /// JSON text inside a message is decoded as the body is bounded: too many values is
    /// refused unread, naming why; what fits is decoded; bad text says what serde_json says.
    #[test]
    fn json_inside_text_is_bounded_like_a_body() {
        let many = serde_json::to_vec(&vec![0u8; MAX_JSON_VALUES]).expect("text");
        let e = json_in_text(&many).expect_err("too many");
        assert_eq!(e, TextJsonError::TooMany(MAX_JSON_VALUES + 1));
        assert!(e.to_string().contains("more than the 1048576"), "{e}");
        assert_eq!(json_in_text(br#"{"a":[1,2]}"#), Ok(json!({"a": [1, 2]})));
        assert!(matches!(
            json_in_text(b"[1,"),
            Err(TextJsonError::Invalid(_))
        ));
    }

    #[test]
    fn errors_name_the_field_and_what_was_there() {
        let v = json!({"n": null, "b": true, "e": " ", "s": "x"});
        let o = v.as_object().expect("object");
        let err = |r: Result<String, FieldError>| r.expect_err("an error").to_string();
        assert_eq!(err(string(o, "m")), "field `m` is missing");
        assert_eq!(err(string(o, "n")), "field `n` is null");
        assert_eq!(
            err(string(o, "b")),
            "field `b`: expected string, found boolean"
        );
        assert_eq!(err(non_empty_string(o, "e")), "field `e` is empty");
        assert_eq!(string(o, "e").as_deref(), Ok(" "));
        assert_eq!(non_empty_string(o, "s").as_deref(), Ok("x"));
    }

    #[test]
    fn nul_characters_are_refused_naming_the_field() {
        let v = json!({"t": "a\u{0}b", "e": "\u{0}"});
        let o = v.as_object().expect("object");
        let nul = "field `t` contains a NUL character (\\u0000)";
        assert_eq!(string(o, "t").expect_err("nul").to_string(), nul);
        assert_eq!(non_empty_string(o, "t").expect_err("nul").to_string(), nul);
        assert_eq!(non_empty_text(o, "t").expect_err("nul").to_string(), nul);
        assert_eq!(string(o, "e"), Err(FieldError::Nul("e".into())));
        assert_eq!(no_nul("x", "fine"), Ok(()));
    }

    #[test]
    fn text_takes_booleans_and_numbers_as_their_json_text() {
        let v =
            json!({"b": true, "n": 42, "f": 1.5, "s": "x", "a": [], "o": {}, "e": "", "z": null});
        let o = v.as_object().expect("object");
        assert_eq!(non_empty_text(o, "b").as_deref(), Ok("true"));
        assert_eq!(non_empty_text(o, "n").as_deref(), Ok("42"));
        assert_eq!(non_empty_text(o, "f").as_deref(), Ok("1.5"));
        assert_eq!(non_empty_text(o, "s").as_deref(), Ok("x"));
        let err = |f| non_empty_text(o, f).expect_err("an error").to_string();
        assert_eq!(err("a"), "field `a`: expected string, found array");
        assert_eq!(err("o"), "field `o`: expected string, found object");
        assert_eq!(err("e"), "field `e` is empty");
        assert_eq!(err("z"), "field `z` is null");
        assert_eq!(err("m"), "field `m` is missing");
    }

    #[test]
    fn a_number_beyond_64_bits_is_refused_as_text_not_rounded() {
        let v: Value = serde_json::from_str(
            r#"{"big": 123456789012345678901234, "max": 18446744073709551615, "min": -9223372036854775808, "e": 1e300, "f": 0.25}"#,
        )
        .expect("json");
        let o = v.as_object().expect("object");
        let err = non_empty_text(o, "big").expect_err("rounded digits would merge two ids");
        assert!(err.to_string().contains("kept exactly"), "{err}");
        assert!(
            non_empty_text(o, "e").is_err(),
            "1e300 has no exact integer text"
        );
        assert_eq!(
            non_empty_text(o, "max").as_deref(),
            Ok("18446744073709551615")
        );
        assert_eq!(
            non_empty_text(o, "min").as_deref(),
            Ok("-9223372036854775808")
        );
        assert_eq!(non_empty_text(o, "f").as_deref(), Ok("0.25"));
    }
}

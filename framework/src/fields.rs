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

/// Field `f` of `o`, neither absent nor null.
pub fn present<'a>(o: &'a Map<String, Value>, f: &str) -> Result<&'a Value, FieldError> {
    match o.get(f) {
        None => Err(FieldError::Missing(f.into())),
        Some(Value::Null) => Err(FieldError::Null(f.into())),
        Some(v) => Ok(v),
    }
}

/// Field `f` of `o` as a string (possibly empty).
pub fn string(o: &Map<String, Value>, f: &str) -> Result<String, FieldError> {
    match present(o, f)? {
        Value::String(s) => Ok(s.clone()),
        other => Err(FieldError::wrong_type(f, "string", other)),
    }
}

/// Field `f` of `o` as a string that is not blank.
pub fn non_empty_string(o: &Map<String, Value>, f: &str) -> Result<String, FieldError> {
    match present(o, f)? {
        Value::String(s) if s.trim().is_empty() => Err(FieldError::Empty(f.into())),
        Value::String(s) => Ok(s.clone()),
        other => Err(FieldError::wrong_type(f, "string", other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
}

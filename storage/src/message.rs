//! The asset-sweeper file message both storage tiers consume (design §7).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One file seen by the asset sweeper; the file is `parent_dir/filename`.
///
/// The sweeper sends `parent_dir` and epoch-second times (numbers, possibly fractional);
/// the older shape (`filepath`, RFC 3339 strings) is accepted too, and so is a message
/// carrying both names for one directory (a producer moving between the shapes).
// `remote = "Self"`: the derived reading runs after `filepath` is folded into
// `parent_dir` (see the `Deserialize` impl below).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(remote = "Self")]
pub struct AssetSweeperFile {
    /// Pluto's id for the item, if imported (text; a number is taken as its digits).
    #[serde(default, deserialize_with = "id_text")]
    pub imported_id: Option<String>,
    /// Size the sweeper saw, in bytes (a number, or one written as a string).
    #[serde(deserialize_with = "size_int")]
    pub size: u64,
    /// Skip this file (record as ignored).
    pub ignore: bool,
    /// MIME type (null, as a sweeper writes for a type it could not tell: empty).
    #[serde(deserialize_with = "string_or_null")]
    pub mime_type: String,
    /// Modification time as the sweeper saw it.
    pub mtime: SweeperTime,
    /// Change time.
    pub ctime: SweeperTime,
    /// Access time.
    pub atime: SweeperTime,
    /// Owner uid (a number, or one written as a string as the older shape has it).
    #[serde(deserialize_with = "owner_int")]
    pub owner: i64,
    /// Group gid (likewise).
    #[serde(deserialize_with = "group_int")]
    pub group: i64,
    /// Directory of the file (`filepath` in the older shape).
    pub parent_dir: String,
    /// File name within `parent_dir`.
    pub filename: String,
}

impl Serialize for AssetSweeperFile {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        AssetSweeperFile::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for AssetSweeperFile {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let Fields(mut fields) = Fields::deserialize(d)?;
        // A null `filepath` beside the newer field is absent, as a null `parent_dir` is.
        if let Some(older) = fields.remove("filepath").filter(|v| !v.is_null()) {
            match fields.get("parent_dir") {
                None | Some(serde_json::Value::Null) => {
                    fields.insert("parent_dir".into(), older);
                }
                Some(dir) if same_dir(dir, &older) => {}
                Some(dir) => {
                    return Err(D::Error::custom(format!(
                        "`parent_dir` ({dir}) and `filepath` ({older}) name different \
                         directories: which file is meant cannot be told"
                    )));
                }
            }
        }
        // Read from the fields, not the body, where the bus cannot see which field was
        // wrong: named here.
        let mut track = serde_path_to_error::Track::new();
        let fields = serde_json::Value::Object(fields);
        AssetSweeperFile::deserialize(serde_path_to_error::Deserializer::new(fields, &mut track))
            .map_err(|e| match track.path().to_string() {
                p if p == "." => D::Error::custom(e),
                p => D::Error::custom(format!("field `{p}`: {e}")),
            })
    }
}

/// Whether `parent_dir` and `filepath` name one directory: spelled alike but for trailing
/// slashes (`/srv/online/p/` is `/srv/online/p`).
fn same_dir(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    fn trimmed(s: &str) -> &str {
        match s.trim_end_matches('/') {
            "" => s,
            t => t,
        }
    }
    match (a, b) {
        (serde_json::Value::String(a), serde_json::Value::String(b)) => trimmed(a) == trimmed(b),
        _ => a == b,
    }
}

/// Pluto's id as text: a string, null, or an integer written as a number (a producer
/// whose ids are numbers); anything else is refused.
fn id_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => Ok(Some(s)),
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        other => Err(D::Error::custom(format!(
            "expected a string, an integer or null, got {other}"
        ))),
    }
}

/// The fields read (the message's, and the older shape's `filepath`); any other is
/// skipped.
const FIELDS: [&str; 12] = [
    "imported_id",
    "size",
    "ignore",
    "mime_type",
    "mtime",
    "ctime",
    "atime",
    "owner",
    "group",
    "parent_dir",
    "filepath",
    "filename",
];

/// A JSON object's fields of [`FIELDS`], refusing a field named twice as the derived reading does (the
/// file meant would depend on which one a reader kept).
struct Fields(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an asset-sweeper file message (a JSON object)")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Fields, A::Error> {
                use serde::de::Error;
                let mut fields = serde_json::Map::new();
                while let Some(k) = map.next_key::<String>()? {
                    // Skipped unread, as the derived reading skips them: another field,
                    // however large or deep, is never built up in memory.
                    if !FIELDS.contains(&k.as_str()) {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        continue;
                    }
                    let v = map.next_value()?;
                    if fields.contains_key(&k) {
                        return Err(A::Error::custom(format!("duplicate field `{k}`")));
                    }
                    fields.insert(k, v);
                }
                Ok(Fields(fields))
            }
        }
        d.deserialize_map(V)
    }
}

impl AssetSweeperFile {
    /// Refuses a text field holding U+0000 that the file's records keep: valid JSON, but
    /// PostgreSQL text cannot store it, so it would fail every retry instead of once.
    /// `mime_type` is kept nowhere: one with a NUL (a type guessed from a file's magic,
    /// written verbatim) is no reason to leave its file uncopied.
    pub fn check_text(&self) -> Result<(), framework::fields::FieldError> {
        use framework::fields::no_nul;
        no_nul("parent_dir", &self.parent_dir)?;
        no_nul("filename", &self.filename)?;
        if let Some(id) = &self.imported_id {
            no_nul("imported_id", id)?;
        }
        Ok(())
    }

    /// `parent_dir/filename` as given (not yet resolved or checked).
    pub fn joined_path(&self) -> String {
        if self.parent_dir.is_empty() {
            self.filename.clone()
        } else {
            format!(
                "{}/{}",
                self.parent_dir.trim_end_matches('/'),
                self.filename
            )
        }
    }
}

/// An integer field the services only carry along: a JSON integer, a whole number written
/// as a float (`1.0`, `1e3`: how some JSON writers put every number), or either written
/// as a string (`"100"`, `"1.0"`). A message is not refused over how a field it does not
/// use is written; one that is none of these, or out of range, is still refused, naming
/// the field.
fn lenient_int<'de, D, T>(field: &str, d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: std::str::FromStr + TryFrom<i64> + TryFrom<u64>,
{
    use serde::de::Error;
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n
            .as_i64()
            .and_then(|v| T::try_from(v).ok())
            .or_else(|| n.as_u64().and_then(|v| T::try_from(v).ok()))
            .or_else(|| n.as_f64().and_then(whole))
            .ok_or_else(|| D::Error::custom(format!("{field}: {n} is not an integer in range"))),
        serde_json::Value::String(s) => {
            let t = s.trim();
            t.parse()
                .ok()
                .or_else(|| t.parse::<f64>().ok().and_then(whole))
                .ok_or_else(|| D::Error::custom(format!("{field}: `{s}` is not an integer")))
        }
        other => Err(D::Error::custom(format!(
            "{field}: expected an integer, got {other}"
        ))),
    }
}

/// `v` as a `T` if it is a whole number `T` holds: no fraction, NaN or infinity.
fn whole<T: TryFrom<i64> + TryFrom<u64>>(v: f64) -> Option<T> {
    if !v.is_finite() || v.fract() != 0.0 {
        return None;
    }
    // Whole and finite: exact in an i128 up to its (saturated) bounds, which no i64 or u64
    // reaches, so an out-of-range value fails the conversions below.
    let w = v as i128;
    i64::try_from(w)
        .ok()
        .and_then(|v| T::try_from(v).ok())
        .or_else(|| u64::try_from(w).ok().and_then(|v| T::try_from(v).ok()))
}

fn size_int<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    lenient_int("size", d)
}

fn owner_int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    lenient_int("owner", d)
}

fn group_int<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    lenient_int("group", d)
}

/// A text field that may be null (taken as empty).
fn string_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// A time from the sweeper, as epoch seconds: given as a number (integer or fractional,
/// or such a number written as a string) or, in the older shape, as an RFC 3339 string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SweeperTime(pub f64);

impl SweeperTime {
    /// The time as RFC 3339 UTC, if it is representable.
    pub fn to_rfc3339(self) -> Option<String> {
        let secs = self.0.floor();
        let nanos = ((self.0 - secs) * 1e9).round().clamp(0.0, 999_999_999.0) as u32;
        // f64 → i64 saturates; out-of-range times give None below.
        chrono::DateTime::from_timestamp(secs as i64, nanos).map(|t| t.to_rfc3339())
    }
}

impl Serialize for SweeperTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for SweeperTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = SweeperTime;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("epoch seconds (a number) or an RFC 3339 time")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SweeperTime, E> {
                Ok(SweeperTime(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SweeperTime, E> {
                Ok(SweeperTime(v as f64))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SweeperTime, E> {
                if v.is_finite() {
                    Ok(SweeperTime(v))
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Float(v), &self))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SweeperTime, E> {
                if let Ok(secs) = v.trim().parse::<f64>() {
                    return self.visit_f64(secs);
                }
                let t = chrono::DateTime::parse_from_rfc3339(v)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))?;
                Ok(SweeperTime(
                    t.timestamp() as f64 + f64::from(t.timestamp_subsec_nanos()) / 1e9,
                ))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "imported_id": null, "size": 3, "ignore": false, "mime_type": "video/mp4",
            "owner": 1000, "group": 1000, "filename": "a.mp4",
        })
    }

    #[test]
    fn fields_the_services_only_carry_may_be_written_as_strings_or_null() {
        let mut m = base();
        m["parent_dir"] = "/srv/online/p".into();
        m["owner"] = "100".into();
        m["group"] = " 100 ".into();
        m["size"] = "12345".into();
        m["mime_type"] = serde_json::Value::Null;
        m["mtime"] = "1718000000.5".into();
        m["ctime"] = 1_718_000_000.into();
        m["atime"] = "2024-06-10T06:13:20Z".into();
        let f: AssetSweeperFile = serde_json::from_value(m.clone()).expect("accepted");
        assert_eq!((f.owner, f.group, f.size), (100, 100, 12345));
        assert_eq!(f.mime_type, "");
        assert_eq!(f.mtime, SweeperTime(1_718_000_000.5));
        // A whole number written as a float, or as one in a string, is that integer.
        for (v, want) in [
            (serde_json::json!(1.0), 1),
            (serde_json::json!(0.0), 0),
            (
                serde_json::from_str::<serde_json::Value>("1e3").expect("json"),
                1000,
            ),
            (serde_json::json!("1.0"), 1),
            (serde_json::json!(" 1e3 "), 1000),
            (
                serde_json::json!(18_446_744_073_709_549_568.0),
                18_446_744_073_709_549_568,
            ),
            (serde_json::json!("18446744073709551615"), u64::MAX),
        ] {
            let mut loose = m.clone();
            loose["size"] = v.clone();
            let f: AssetSweeperFile = serde_json::from_value(loose).expect("accepted");
            assert_eq!(f.size, want, "size={v}");
        }
        let mut loose = m.clone();
        loose["owner"] = serde_json::json!(-2.0);
        loose["group"] = serde_json::json!("100.0");
        let f: AssetSweeperFile = serde_json::from_value(loose).expect("accepted");
        assert_eq!((f.owner, f.group), (-2, 100));
        // What no reading can make an integer or a time is still refused, by name.
        for (k, v, says) in [
            ("owner", serde_json::json!("root"), "owner"),
            ("group", serde_json::json!(true), "group"),
            ("size", serde_json::json!(-1), "size"),
            ("size", serde_json::json!(1.5), "size"),
            ("size", serde_json::json!("1.5"), "size"),
            ("size", serde_json::json!(-1.0), "size"),
            ("size", serde_json::json!("-1.0"), "size"),
            ("size", serde_json::json!("NaN"), "size"),
            ("size", serde_json::json!("inf"), "size"),
            ("size", serde_json::json!("-infinity"), "size"),
            (
                "size",
                serde_json::json!(18_446_744_073_709_551_616.0),
                "size",
            ),
            ("size", serde_json::json!("1e20"), "size"),
            ("size", serde_json::json!("1e400"), "size"),
            ("owner", serde_json::json!(1e19), "owner"),
            ("mtime", serde_json::json!("soon"), "epoch seconds"),
            ("mtime", serde_json::json!("NaN"), "epoch seconds"),
        ] {
            let mut bad = m.clone();
            bad[k] = v.clone();
            let e = serde_json::from_value::<AssetSweeperFile>(bad).expect_err("refused");
            assert!(e.to_string().contains(says), "{k}={v}: {e}");
            assert!(
                e.to_string().contains(&format!("field `{k}`")),
                "{k}={v}: {e}"
            );
        }
    }

    #[test]
    fn the_sweepers_shape_and_the_older_one_are_both_accepted() {
        let mut real = base();
        real["parent_dir"] = "/srv/online/p".into();
        real["mtime"] = 1_700_000_000.into();
        real["ctime"] = 1_700_000_000.25.into();
        real["atime"] = 1_700_000_001.5.into();
        let m: AssetSweeperFile = serde_json::from_value(real).expect("real shape");
        assert_eq!(m.joined_path(), "/srv/online/p/a.mp4");
        assert_eq!(m.ctime, SweeperTime(1_700_000_000.25));
        assert_eq!(
            m.mtime.to_rfc3339().as_deref(),
            Some("2023-11-14T22:13:20+00:00")
        );

        let mut old = base();
        old["filepath"] = "p".into();
        for k in ["mtime", "ctime", "atime"] {
            old[k] = "2023-11-14T22:13:20.5Z".into();
        }
        let m: AssetSweeperFile = serde_json::from_value(old.clone()).expect("older shape");
        assert_eq!(m.joined_path(), "p/a.mp4");
        assert_eq!(m.atime, SweeperTime(1_700_000_000.5));
        // Written out in the sweeper's shape, it reads back the same.
        let written = serde_json::to_value(&m).expect("written");
        assert_eq!(written["parent_dir"], "p");
        assert!(written.get("filepath").is_none());
        assert_eq!(
            serde_json::from_value::<AssetSweeperFile>(written).expect("read"),
            m
        );

        // Both names, as a producer moving between the shapes sends: one directory is
        // that directory; two different ones are refused, naming both.
        let mut both = old;
        both["parent_dir"] = "p".into();
        let m: AssetSweeperFile = serde_json::from_value(both.clone()).expect("both names");
        assert_eq!(m.joined_path(), "p/a.mp4");
        // Spelled with a trailing slash, or `parent_dir` null: still that directory.
        both["parent_dir"] = "p/".into();
        let m: AssetSweeperFile = serde_json::from_value(both.clone()).expect("a slash");
        assert_eq!(m.joined_path(), "p/a.mp4");
        both["parent_dir"] = serde_json::Value::Null;
        let m: AssetSweeperFile = serde_json::from_value(both.clone()).expect("null");
        assert_eq!(m.joined_path(), "p/a.mp4");
        // And `filepath` null beside a real `parent_dir`: that directory.
        let mut newer = both.clone();
        newer["parent_dir"] = "/srv/online/p".into();
        newer["filepath"] = serde_json::Value::Null;
        let m: AssetSweeperFile = serde_json::from_value(newer).expect("null filepath");
        assert_eq!(m.joined_path(), "/srv/online/p/a.mp4");
        both["parent_dir"] = "q".into();
        let e = serde_json::from_value::<AssetSweeperFile>(both).expect_err("two directories");
        assert!(e.to_string().contains("different directories"), "{e}");
    }

    /// A NUL is refused where the records keep the text (the path, Pluto's id), not in
    /// the MIME type, which nothing keeps.
    #[test]
    fn a_nul_is_refused_only_in_what_the_records_keep() {
        let msg = |field: &str| {
            let mut v = serde_json::json!({"size": 3, "ignore": false, "mime_type": "video/mp4",
                "mtime": 1, "ctime": 1, "atime": 1, "owner": 0, "group": 0,
                "parent_dir": "p", "filename": "a.mp4", "imported_id": "VX-1"});
            v[field] = format!("{}\u{0}", v[field].as_str().unwrap_or_default()).into();
            serde_json::from_value::<AssetSweeperFile>(v).expect("read")
        };
        msg("mime_type")
            .check_text()
            .expect("a NUL in the MIME type is no matter");
        for field in ["parent_dir", "filename", "imported_id"] {
            let e = msg(field).check_text().expect_err("refused");
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    }

    /// Pluto's id as a string, null, absent or an integer (kept as its digits); any other
    /// JSON is refused, naming the field.
    #[test]
    fn an_imported_id_may_be_a_number() {
        let msg = |id: Option<serde_json::Value>| {
            let mut v = serde_json::json!({"size": 3, "ignore": false, "mime_type": "video/mp4",
                "mtime": 1, "ctime": 1, "atime": 1, "owner": 0, "group": 0,
                "parent_dir": "p", "filename": "a.mp4"});
            if let Some(id) = id {
                v["imported_id"] = id;
            }
            serde_json::from_value::<AssetSweeperFile>(v)
        };
        for (id, want) in [
            (Some(serde_json::json!("VX-12")), Some("VX-12")),
            (Some(serde_json::json!(1234)), Some("1234")),
            (Some(serde_json::Value::Null), None),
            (None, None),
        ] {
            let m = msg(id.clone()).expect("read");
            assert_eq!(m.imported_id.as_deref(), want, "{id:?}");
        }
        for bad in [serde_json::json!(1.5), serde_json::json!([1])] {
            let e = msg(Some(bad.clone())).expect_err("refused");
            assert!(e.to_string().contains("field `imported_id`"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_field_named_twice_is_refused() {
        for twice in [
            r#"{"parent_dir": "p", "filename": "a.mp4", "filename": "b.mp4"}"#,
            r#"{"parent_dir": "p", "parent_dir": "q", "filename": "a.mp4"}"#,
        ] {
            let e = serde_json::from_str::<AssetSweeperFile>(twice).expect_err(twice);
            assert!(e.to_string().contains("duplicate field"), "{twice}: {e}");
        }
        // Every field of the message is read (none left out of FIELDS), and others are
        // skipped unread, however deep.
        let mut m = base();
        m["parent_dir"] = "p".into();
        for k in ["mtime", "ctime", "atime"] {
            m[k] = 1.into();
        }
        let f: AssetSweeperFile = serde_json::from_value(m.clone()).expect("message");
        let written = serde_json::to_value(&f).expect("written");
        for k in written.as_object().expect("object").keys() {
            assert!(FIELDS.contains(&k.as_str()), "{k} is read");
        }
        let mut text = m.to_string();
        text.pop();
        text.push_str(&format!(
            r#","x":{}1{}}}"#,
            "[".repeat(10_000),
            "]".repeat(10_000)
        ));
        let f2: AssetSweeperFile = serde_json::from_str(&text).expect("deep other field");
        assert_eq!(f2, f);
        let e = serde_json::from_str::<AssetSweeperFile>("[1]").expect_err("an array");
        assert!(e.to_string().contains("JSON object"), "{e}");
    }

    #[test]
    fn bad_times_and_a_missing_directory_are_refused() {
        let mut m = base();
        m["parent_dir"] = "p".into();
        m["mtime"] = "yesterday".into();
        m["ctime"] = 1.into();
        m["atime"] = 1.into();
        assert!(serde_json::from_value::<AssetSweeperFile>(m.clone()).is_err());
        m["mtime"] = true.into();
        assert!(serde_json::from_value::<AssetSweeperFile>(m.clone()).is_err());
        m["mtime"] = 1.into();
        assert!(serde_json::from_value::<AssetSweeperFile>(m.clone()).is_ok());
        m.as_object_mut().expect("object").remove("parent_dir");
        let e = serde_json::from_value::<AssetSweeperFile>(m).expect_err("no directory");
        assert!(e.to_string().contains("parent_dir"), "{e}");
    }
}

//! W3C trace context (`traceparent`, `tracestate`) carried with every message (design §6):
//! an input's trace is continued by the message's span and written on every output, retry
//! and dead letter it causes, so one trace follows a file or an event across services.

use lapin::types::FieldTable;

use crate::headers as h;

/// `traceparent` header name.
pub const TRACEPARENT: &str = "traceparent";
/// `tracestate` header name.
pub const TRACESTATE: &str = "tracestate";

/// The trace a message is handled in: the input's trace id (or a new one) and this
/// handling's own span id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex digits, shared by the whole trace.
    pub trace_id: String,
    /// 16 lowercase hex digits, this message's handling.
    pub span_id: String,
    /// The input's span id, if it came with a trace.
    pub parent_span_id: Option<String>,
    /// 2 hex digits (`01` = sampled).
    pub flags: String,
    /// The input's `tracestate`, passed on unchanged.
    pub tracestate: Option<String>,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn random_hex(len: usize) -> String {
    let mut s = format!("{:032x}", random_u128());
    s.truncate(len);
    s
}

/// 128 random bits for ids (trace and span ids, message ids), from `rand`'s per-thread
/// generator (seeded from the OS once, then no system call per id, several per message).
pub(crate) fn random_u128() -> u128 {
    rand::random()
}

/// Longest `tracestate` passed on: W3C asks at least 512 characters to be propagated and
/// allows a longer one to be dropped; a producer's 100 KB value would otherwise ride on
/// every output, retry, dead letter and exported span.
const MAX_TRACESTATE: usize = 512;

/// Whether a `tracestate` is passed on: at most [`MAX_TRACESTATE`] bytes of printable
/// ASCII in at most 32 list members (what W3C allows).
fn usable_tracestate(s: &str) -> bool {
    s.len() <= MAX_TRACESTATE
        && s.bytes().all(|b| (0x20..0x7f).contains(&b))
        && s.split(',').count() <= 32
}

impl TraceContext {
    /// Continues the trace of `headers` (a valid version-00 `traceparent`), or starts one.
    pub fn continue_from(headers: &FieldTable) -> Self {
        let parsed = h::get_str(headers, TRACEPARENT).and_then(|tp| {
            let parts: Vec<&str> = tp.trim().split('-').collect();
            // A later version may append fields: its first four are read as version 00's
            // (W3C trace context, "versioning of traceparent"); version 00 has exactly four.
            let four = match parts.as_slice() {
                [v, t, p, f] => Some([*v, *t, *p, *f]),
                [v, t, p, f, ..] if *v != "00" => Some([*v, *t, *p, *f]),
                _ => None,
            };
            match four.as_ref() {
                Some([v, t, p, f])
                    if is_hex(v, 2)
                        && *v != "ff"
                        && is_hex(t, 32)
                        && *t != "0".repeat(32)
                        && is_hex(p, 16)
                        && *p != "0".repeat(16)
                        && is_hex(f, 2) =>
                {
                    // Only the flags W3C defines (sampled, random trace id) are passed on:
                    // the rest "MUST be set to zero" by whoever writes the header next.
                    let f = u8::from_str_radix(f, 16).unwrap_or(1) & 0x03;
                    Some((t.to_string(), p.to_string(), format!("{f:02x}")))
                }
                _ => None,
            }
        });
        match parsed {
            Some((trace_id, parent, flags)) => Self {
                trace_id,
                span_id: random_hex(16),
                parent_span_id: Some(parent),
                flags,
                tracestate: h::get_str(headers, TRACESTATE).filter(|s| usable_tracestate(s)),
            },
            None => Self {
                trace_id: random_hex(32),
                span_id: random_hex(16),
                parent_span_id: None,
                flags: "01".into(),
                tracestate: None,
            },
        }
    }

    /// The `traceparent` naming this handling as the parent of what it publishes.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }

    /// Writes `traceparent` and `tracestate` into `headers` (a copy of the input's, for a
    /// retry or dead letter): a `tracestate` not passed on (too long, or of a broken trace)
    /// is taken out, not left beside the new `traceparent`.
    pub fn write(&self, headers: &mut FieldTable) {
        h::set_str(headers, TRACEPARENT, &self.traceparent());
        match &self.tracestate {
            Some(ts) => h::set_str(headers, TRACESTATE, ts),
            None if headers.contains_key(TRACESTATE) => {
                *headers = h::without(headers, &[TRACESTATE]);
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(tp: &str) -> FieldTable {
        let mut t = FieldTable::default();
        h::set_str(&mut t, TRACEPARENT, tp);
        h::set_str(&mut t, TRACESTATE, "vendor=x");
        t
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let c = TraceContext::continue_from(&with(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ));
        assert_eq!(c.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.parent_span_id.as_deref(), Some("b7ad6b7169203331"));
        assert_ne!(c.span_id, "b7ad6b7169203331");
        assert!(is_hex(&c.span_id, 16));
        assert_eq!(c.tracestate.as_deref(), Some("vendor=x"));
        assert!(
            c.traceparent()
                .starts_with("00-0af7651916cd43dd8448eb211c80319c-")
        );
    }

    #[test]
    fn only_the_defined_flags_are_passed_on() {
        for (flags, kept) in [("ff", "03"), ("01", "01"), ("00", "00"), ("fe", "02")] {
            let c = TraceContext::continue_from(&with(&format!(
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}"
            )));
            assert!(c.traceparent().ends_with(&format!("-{kept}")), "{flags}");
        }
    }

    #[test]
    fn a_missing_or_malformed_traceparent_starts_a_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let c = TraceContext::continue_from(&with(bad));
            assert!(is_hex(&c.trace_id, 32) && is_hex(&c.span_id, 16), "{bad}");
            assert_eq!(c.parent_span_id, None, "{bad}");
            assert_eq!(
                c.tracestate, None,
                "{bad}: a broken trace's state is not passed on"
            );
        }
        // Version 00 has exactly four fields.
        let c = TraceContext::continue_from(&with(
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
        ));
        assert_eq!(c.parent_span_id, None);
        let c = TraceContext::continue_from(&FieldTable::default());
        assert_eq!(c.flags, "01");
        let d = TraceContext::continue_from(&FieldTable::default());
        assert_ne!(c.trace_id, d.trace_id, "every new trace has its own id");
        assert_ne!(c.span_id, d.span_id);
    }

    #[test]
    fn a_later_version_is_read_by_its_first_four_fields() {
        let c = TraceContext::continue_from(&with(
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-comes-later",
        ));
        assert_eq!(c.trace_id, "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(c.parent_span_id.as_deref(), Some("b7ad6b7169203331"));
    }

    #[test]
    fn a_tracestate_too_long_or_not_text_is_not_passed_on() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let with_state = |ts: &str| {
            let mut t = FieldTable::default();
            h::set_str(&mut t, TRACEPARENT, tp);
            h::set_str(&mut t, TRACESTATE, ts);
            TraceContext::continue_from(&t)
        };
        let big = format!("v={}", "x".repeat(100 * 1024));
        assert_eq!(with_state(&big).tracestate, None);
        assert_eq!(with_state("v=a\nb").tracestate, None);
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert_eq!(with_state(&many).tracestate, None);
        assert_eq!(with_state("a=1,b=2").tracestate.as_deref(), Some("a=1,b=2"));
        // The trace itself is still continued.
        assert_eq!(
            with_state(&big).parent_span_id.as_deref(),
            Some("b7ad6b7169203331")
        );
    }

    #[test]
    fn a_tracestate_not_passed_on_leaves_the_copy_of_the_input_headers() {
        // A retry or dead letter starts from a copy of the input's headers.
        for input in [with("garbage"), {
            let mut t = with("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
            h::set_str(&mut t, TRACESTATE, &"x".repeat(600));
            t
        }] {
            let c = TraceContext::continue_from(&input);
            let mut copy = input.clone();
            c.write(&mut copy);
            assert!(!copy.contains_key(TRACESTATE), "{copy:?}");
            assert_eq!(
                h::get_str(&copy, TRACEPARENT).as_deref(),
                Some(c.traceparent().as_str())
            );
        }
        let kept = with("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        let mut copy = kept.clone();
        TraceContext::continue_from(&kept).write(&mut copy);
        assert_eq!(h::get_str(&copy, TRACESTATE).as_deref(), Some("vendor=x"));
    }
}

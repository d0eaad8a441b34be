//! Progress through a message of several parts — the records of a batch, the destinations
//! of a fan-out — kept across retries in a retry header, so a retry redoes only what is not
//! done and dead-letters each bad part once.
//!
//! A part is named by a mark of the processor's choosing (a record's index, a
//! `crash id → queue` pair). The header holds the marks as a JSON array of strings, so any
//! text is a valid mark; a run of three or more consecutive decimal marks (record indices)
//! is written as `[first, last]`, so the header of a batch stays small however many of its
//! records are done (it must fit, with the message's other headers, in one AMQP frame).
//! The header is written once the processor is done with the progress, not per mark. The
//! header travels with the message through the retry tiers and
//! onto its dead letter (so a replay skips what was done), never onto a part dead-lettered
//! as a message of its own; a redelivery after a lost connection starts from the progress
//! the broker last held.

use std::collections::BTreeSet;

use crate::processor::MessageContext;
use crate::publisher::PublishError;

/// Retry header of the batch adapters: the records (1-based) already dead-lettered.
pub const DEAD_LETTERED_RECORDS: &str = "x-dead-lettered-records";

/// The parts of one message already done (published, posted, stored or dead-lettered).
#[derive(Debug)]
pub struct Progress<'c> {
    ctx: &'c MessageContext,
    header: &'static str,
    done: BTreeSet<String>,
    /// Marked since the header was last written.
    dirty: bool,
}

impl<'c> Progress<'c> {
    /// The progress an earlier attempt of this message recorded in `header` (none if the
    /// header is missing or unreadable: then every part is done again, at least once).
    pub fn resume(ctx: &'c MessageContext, header: &'static str) -> Self {
        ctx.note_progress_header(header);
        let done = crate::headers::get_str(&ctx.headers, header)
            .and_then(|s| decode(&s))
            .unwrap_or_default();
        Self {
            ctx,
            header,
            done,
            dirty: false,
        }
    }

    /// Whether an earlier attempt (or this one) finished `part`.
    pub fn is_done(&self, part: &str) -> bool {
        self.done.contains(part)
    }

    /// How many parts are done.
    pub fn len(&self) -> usize {
        self.done.len()
    }

    /// True when no part is done yet.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// Records `part` as done, so a retry of this message skips it.
    pub fn mark_done(&mut self, part: impl Into<String>) {
        self.dirty |= self.done.insert(part.into());
    }

    /// Dead-letters `body` (the part, as a message of its own) with `x-error-kind:
    /// permanent` unless an earlier attempt already did, then marks `part` done. Returns
    /// false when it had been dead-lettered before. On error nothing is marked: the part
    /// is tried again with the message.
    pub async fn dead_letter(
        &mut self,
        part: impl Into<String>,
        body: Vec<u8>,
        reason: &str,
    ) -> Result<bool, PublishError> {
        self.dead_letter_kind(part.into(), body, reason, crate::headers::KIND_PERMANENT)
            .await
    }

    /// As [`Self::dead_letter`], for a part whose retries ran out in place
    /// (`x-error-kind: retries-exhausted`).
    pub async fn dead_letter_exhausted(
        &mut self,
        part: impl Into<String>,
        body: Vec<u8>,
        reason: &str,
    ) -> Result<bool, PublishError> {
        self.dead_letter_kind(
            part.into(),
            body,
            reason,
            crate::headers::KIND_RETRIES_EXHAUSTED,
        )
        .await
    }

    async fn dead_letter_kind(
        &mut self,
        part: String,
        body: Vec<u8>,
        reason: &str,
        kind: &str,
    ) -> Result<bool, PublishError> {
        if self.is_done(&part) {
            return Ok(false);
        }
        self.ctx.dead_letter_kind(body, reason, kind).await?;
        self.mark_done(part);
        Ok(true)
    }
}

/// Written when the processor lets go of its progress (before its outcome is published):
/// once per attempt, not once per part (a batch of n records would write n headers of up
/// to n marks).
impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if self.dirty {
            self.ctx.set_retry_header(self.header, &encode(&self.done));
        }
    }
}

/// A mark that is a decimal index as written by `usize::to_string` (no sign, no leading
/// zero), so `[first, last]` gives back exactly the marks it stands for.
fn index(mark: &str) -> Option<u64> {
    let canonical = !mark.is_empty()
        && mark.bytes().all(|b| b.is_ascii_digit())
        && (mark == "0" || !mark.starts_with('0'));
    canonical.then(|| mark.parse().ok()).flatten()
}

/// The header's text: other marks as strings, runs of three or more indices as ranges.
fn encode(done: &BTreeSet<String>) -> String {
    let mut indices: Vec<u64> = Vec::new();
    let mut items: Vec<serde_json::Value> = Vec::new();
    for m in done {
        match index(m) {
            Some(i) => indices.push(i),
            None => items.push(m.as_str().into()),
        }
    }
    // BTreeSet orders text, not numbers ("10" < "9").
    indices.sort_unstable();
    let mut i = 0;
    while i < indices.len() {
        let mut j = i;
        while j + 1 < indices.len() && indices[j + 1] == indices[j] + 1 {
            j += 1;
        }
        if j - i >= 2 {
            items.push(serde_json::json!([indices[i], indices[j]]));
        } else {
            items.extend(indices[i..=j].iter().map(|n| n.to_string().into()));
        }
        i = j + 1;
    }
    serde_json::Value::Array(items).to_string()
}

/// Most marks a header may stand for: more parts than any message has (Kinesis sends at
/// most 10,000 records), so a crafted header of a few ranges cannot make a handler build
/// billions of marks.
const MAX_MARKS: u64 = 100_000;

/// The marks a header holds; None if it is not one this module writes (or stands for more
/// than [`MAX_MARKS`]).
fn decode(text: &str) -> Option<BTreeSet<String>> {
    let items: Vec<serde_json::Value> = serde_json::from_str(text).ok()?;
    let mut done = BTreeSet::new();
    let mut count: u64 = 0;
    for item in items {
        match item {
            serde_json::Value::String(m) => {
                count += 1;
                done.insert(m);
            }
            serde_json::Value::Array(r) => {
                let (Some(a), Some(b)) = (r.first()?.as_u64(), r.get(1)?.as_u64()) else {
                    return None;
                };
                if r.len() != 2 || b < a {
                    return None;
                }
                count = count.saturating_add(b - a + 1);
                if count > MAX_MARKS {
                    return None;
                }
                done.extend((a..=b).map(|n| n.to_string()));
            }
            _ => return None,
        }
        if count > MAX_MARKS {
            return None;
        }
    }
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};

    const H: &str = "x-test-progress";

    fn ctx_with(header: Option<&str>) -> MessageContext {
        let mut ctx = MessageContext::for_test("x", "k", 1);
        if let Some(v) = header {
            let mut h = FieldTable::default();
            h.insert(H.into(), AMQPValue::LongString(v.into()));
            ctx.headers = h;
        }
        ctx
    }

    fn written(ctx: &MessageContext) -> Option<String> {
        ctx.retry_headers()
            .into_iter()
            .find(|(k, _)| k == H)
            .map(|(_, v)| v)
    }

    #[test]
    fn marks_round_trip_through_the_retry_header_whatever_their_text() {
        let ctx = ctx_with(None);
        let mut p = Progress::resume(&ctx, H);
        assert!(p.is_empty());
        for m in ["1", "a,b", "id \"q\"", "ünï"] {
            p.mark_done(m);
        }
        drop(p);
        let header = written(&ctx).expect("header written");
        let next = ctx_with(Some(&header));
        let q = Progress::resume(&next, H);
        assert_eq!(q.len(), 4);
        for m in ["1", "a,b", "id \"q\"", "ünï"] {
            assert!(q.is_done(m), "{m} kept");
        }
        assert!(!q.is_done("a"), "a comma inside a mark does not split it");
    }

    #[test]
    fn runs_of_indices_are_written_as_ranges_and_read_back_exactly() {
        let ctx = ctx_with(None);
        {
            let mut p = Progress::resume(&ctx, H);
            for i in (0..10_000).filter(|i| *i != 5_000) {
                p.mark_done(i.to_string());
            }
            for m in ["7a", "010000", "12x", "10001", "10002"] {
                p.mark_done(m);
            }
            assert!(written(&ctx).is_none(), "written once, when let go");
        }
        let header = written(&ctx).expect("header written");
        assert!(header.len() < 100, "{header}");
        assert!(header.contains("[0,4999]") && header.contains("[5001,9999]"));
        let next = ctx_with(Some(&header));
        let back = Progress::resume(&next, H);
        assert_eq!(back.len(), 9_999 + 5);
        assert!(!back.is_done("5000"));
        for m in [
            "0", "4999", "5001", "9999", "7a", "010000", "12x", "10001", "10002",
        ] {
            assert!(back.is_done(m), "{m}");
        }
        assert!(!back.is_done("10000"), "010000 is a mark of its own");
        // Not a header this module writes: nothing is done.
        let bomb = format!(
            "[{}]",
            (0..1000)
                .map(|i| format!("[{},{}]", i * 1_000_000, i * 1_000_000 + 999_999))
                .collect::<Vec<_>>()
                .join(",")
        );
        for bad in [
            r#"[[3,1]]"#,
            r#"[[1]]"#,
            r#"[[0,99999999999]]"#,
            r#"[1]"#,
            bomb.as_str(),
        ] {
            assert!(
                Progress::resume(&ctx_with(Some(bad)), H).is_empty(),
                "{bad}"
            );
        }
    }

    #[test]
    fn an_unreadable_header_means_nothing_is_done() {
        let ctx = ctx_with(Some("1,2,3"));
        assert!(Progress::resume(&ctx, H).is_empty());
    }

    #[tokio::test]
    async fn a_part_already_dead_lettered_is_not_dead_lettered_again() {
        // for_test contexts cannot publish: a dead letter attempted would be an error.
        let ctx = ctx_with(Some(r#"["3"]"#));
        let mut p = Progress::resume(&ctx, H);
        assert!(
            !p.dead_letter("3", b"{}".to_vec(), "bad")
                .await
                .expect("skipped")
        );
        assert!(p.dead_letter("4", b"{}".to_vec(), "bad").await.is_err());
        assert!(!p.is_done("4"), "a failed dead letter is not progress");
    }
}

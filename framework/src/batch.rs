//! Progress through a message of several parts — the records of a batch, the destinations
//! of a fan-out — kept across retries in a retry header, so a retry redoes only what is not
//! done and dead-letters each bad part once.
//!
//! A part is named by a mark of the processor's choosing (a record's index, a
//! `crash id → queue` pair). The header holds the marks as a JSON array of strings, so any
//! text is a valid mark. The header travels with the message through the retry tiers and
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
}

impl<'c> Progress<'c> {
    /// The progress an earlier attempt of this message recorded in `header` (none if the
    /// header is missing or unreadable: then every part is done again, at least once).
    pub fn resume(ctx: &'c MessageContext, header: &'static str) -> Self {
        ctx.note_progress_header(header);
        let done = crate::headers::get_str(&ctx.headers, header)
            .and_then(|s| serde_json::from_str::<Vec<String>>(&s).ok())
            .map(|v| v.into_iter().collect())
            .unwrap_or_default();
        Self { ctx, header, done }
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
        if self.done.insert(part.into()) {
            self.write();
        }
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

    fn write(&self) {
        let marks: Vec<&str> = self.done.iter().map(String::as_str).collect();
        if let Ok(s) = serde_json::to_string(&marks) {
            self.ctx.set_retry_header(self.header, &s);
        }
    }
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

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
    /// Marks done that are not record indices.
    done: BTreeSet<String>,
    /// Record indices done, as ranges: a header of a few bytes (`[[0,149999]]`) stands
    /// for as many records as a message holds without a string per record.
    indices: Ranges,
    /// Marked since the header was last written.
    dirty: bool,
    /// The delivery carried the header without having come back: a producer's, replaced by
    /// this attempt's marks on the retry or dead letter.
    forged: bool,
}

/// Disjoint, non-adjacent inclusive ranges of indices (first → last).
#[derive(Debug, Default)]
struct Ranges(std::collections::BTreeMap<u64, u64>);

impl Ranges {
    fn contains(&self, i: u64) -> bool {
        self.0
            .range(..=i)
            .next_back()
            .is_some_and(|(_, &last)| i <= last)
    }

    /// Adds `first..=last`, merging with the ranges it touches; true if anything was new.
    fn insert(&mut self, first: u64, last: u64) -> bool {
        let (mut a, mut b) = (first, last);
        if let Some((&s, &e)) = self.0.range(..=a).next_back()
            && e.saturating_add(1) >= a
        {
            if e >= b {
                return false;
            }
            a = s;
            b = b.max(e);
        }
        let touched: Vec<(u64, u64)> = self
            .0
            .range(a..=b.saturating_add(1))
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touched {
            self.0.remove(&s);
            b = b.max(e);
        }
        self.0.insert(a, b);
        true
    }

    /// Removes `first..=last`, splitting the ranges it cuts; true if anything was there.
    fn remove(&mut self, first: u64, last: u64) -> bool {
        let cut: Vec<(u64, u64)> = self
            .0
            .range(..=last)
            .rev()
            .take_while(|(_, e)| **e >= first)
            .map(|(&s, &e)| (s, e))
            .collect();
        for &(s, e) in &cut {
            self.0.remove(&s);
            if s < first {
                self.0.insert(s, first - 1);
            }
            if e > last {
                self.0.insert(last + 1, e);
            }
        }
        !cut.is_empty()
    }

    /// How many indices the ranges hold.
    fn count(&self) -> u64 {
        self.0.iter().fold(0u64, |n, (&s, &e)| {
            n.saturating_add((e - s).saturating_add(1))
        })
    }
}

impl<'c> Progress<'c> {
    /// The progress an earlier attempt of this message recorded in `header` (none if the
    /// header is missing or unreadable, or the delivery did not come back the framework's
    /// way — a producer's header, [`MessageContext::came_back`]: then every part is done
    /// again, at least once, and the retry or dead letter made of the message carries this
    /// attempt's marks in its place, not the producer's).
    pub fn resume(ctx: &'c MessageContext, header: &'static str) -> Self {
        ctx.note_progress_header(header);
        let found = crate::headers::get_str(&ctx.headers, header);
        let forged = found.is_some() && !ctx.came_back();
        let (done, indices) = found
            .filter(|_| !forged)
            .and_then(|s| decode(&s))
            .unwrap_or_default();
        Self {
            ctx,
            header,
            done,
            indices,
            dirty: false,
            forged,
        }
    }

    /// Whether an earlier attempt (or this one) finished `part`.
    pub fn is_done(&self, part: &str) -> bool {
        match index(part) {
            Some(i) => self.indices.contains(i),
            None => self.done.contains(part),
        }
    }

    /// How many parts are done.
    pub fn len(&self) -> usize {
        usize::try_from(self.indices.count())
            .unwrap_or(usize::MAX)
            .saturating_add(self.done.len())
    }

    /// Whether this attempt changed the marks (a part done, or the marks cleared): a retry
    /// now carries progress of its own.
    pub fn advanced(&self) -> bool {
        self.dirty
    }

    /// Why this attempt should stop before its next part, whose work may take up to
    /// `step`, and go on in a Retry carrying what it did, if it should: it has done parts
    /// (so that retry is not counted) and the service is stopping — a handler stopped
    /// mid-batch gives its message back as it came, and every part done meanwhile is done
    /// again (ids published twice, a second alert) — or the broker's consumer timeout
    /// nears, which redelivers it as it came (see [`MessageContext::checkpoint_in`]).
    pub fn pause_before(&self, step: std::time::Duration) -> Option<&'static str> {
        // The retry's own publish and confirm, after the step.
        let room = step + std::time::Duration::from_secs(2);
        // Marks cleared (`clear`) are no part done: a retry then would be counted.
        if !self.advanced() || self.is_empty() {
            None
        } else if self.ctx.time_left().is_some_and(|left| left < room) {
            Some("the service is stopping")
        } else if self.ctx.checkpoint_in().is_some_and(|left| left < room) {
            Some("a third of the broker's consumer timeout has passed")
        } else {
            None
        }
    }

    /// True when no part is done yet.
    pub fn is_empty(&self) -> bool {
        self.done.is_empty() && self.indices.0.is_empty()
    }

    /// Forgets every part done (an earlier attempt's marks that no longer name the same
    /// parts: a processor whose parts are positions in an order its configuration decides
    /// clears them when that configuration changed between attempts).
    pub fn clear(&mut self) {
        if !self.is_empty() {
            self.done.clear();
            self.indices.0.clear();
            self.dirty = true;
        }
    }

    /// The marks done that are not record indices, in order (a processor's names for
    /// its parts, or for what its indices stand for).
    pub fn named(&self) -> impl Iterator<Item = &str> {
        self.done.iter().map(String::as_str)
    }

    /// Forgets `part` (a mark that no longer names the same part).
    pub fn forget(&mut self, part: &str) {
        self.dirty |= match index(part) {
            Some(i) => self.indices.remove(i, i),
            None => self.done.remove(part),
        };
    }

    /// Forgets the indices `first..=last` (a block of them that no longer names the same
    /// parts), keeping every other.
    pub fn forget_indices(&mut self, first: u64, last: u64) {
        self.dirty |= self.indices.remove(first, last);
    }

    /// Records `part` as done, so a retry of this message skips it.
    pub fn mark_done(&mut self, part: impl Into<String>) {
        let part = part.into();
        self.dirty |= match index(&part) {
            Some(i) => self.indices.insert(i, i),
            None => self.done.insert(part),
        };
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
        self.ctx
            .dead_letter_kind(body, reason, kind, Some(&part))
            .await?;
        self.mark_done(part);
        Ok(true)
    }
}

/// Written when the processor lets go of its progress (before its outcome is published):
/// once per attempt, not once per part (a batch of n records would write n headers of up
/// to n marks).
impl Drop for Progress<'_> {
    fn drop(&mut self) {
        if self.dirty || self.forged {
            self.ctx
                .set_retry_header(self.header, &encode(&self.done, &self.indices));
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

/// The header's text: other marks as strings, runs of three or more indices as ranges —
/// or, where that is shorter, the indices as a bitmap (`{"from": first, "bits":
/// base64}`, bit `k` of byte `j` standing for `first + 8j + k`). Scattered indices (every
/// other record of a batch done) took about 7 bytes each as strings: past ~16,000 of them
/// the header outgrew a frame, and the batch was dead-lettered without its progress; as
/// bits they take a sixth of a byte each.
fn encode(done: &BTreeSet<String>, indices: &Ranges) -> String {
    let mut items: Vec<serde_json::Value> = done.iter().map(|m| m.as_str().into()).collect();
    let mut listed = Vec::new();
    for (&first, &last) in &indices.0 {
        if last - first >= 2 {
            listed.push(serde_json::json!([first, last]));
        } else {
            listed.extend((first..=last).map(|n| n.to_string().into()));
        }
    }
    match bitmap(indices) {
        // The slice serialises as the array would, without copying its items.
        Some(b)
            if b.to_string().len() < serde_json::to_string(&listed).unwrap_or_default().len() =>
        {
            items.push(b)
        }
        _ => items.extend(listed),
    }
    serde_json::Value::Array(items).to_string()
}

/// Longest span of indices written as a bitmap (its text is about a sixth of it).
const MAX_BITMAP_SPAN: u64 = 8 * 1024 * 1024;

/// `indices` as one bitmap item, if they span at most [`MAX_BITMAP_SPAN`].
fn bitmap(indices: &Ranges) -> Option<serde_json::Value> {
    use base64::Engine;
    let first = *indices.0.keys().next()?;
    let last = *indices.0.values().next_back()?;
    // Checked: a forged header's ranges can reach u64::MAX.
    let span = (last - first).checked_add(1)?;
    if indices.0.len() < 2 || span > MAX_BITMAP_SPAN {
        return None;
    }
    let mut bits = vec![0u8; usize::try_from(span.div_ceil(8)).ok()?];
    for (&a, &b) in &indices.0 {
        for i in a - first..=b - first {
            bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    Some(serde_json::json!({
        "from": first,
        "bits": base64::engine::general_purpose::STANDARD.encode(bits),
    }))
}

/// The indices a bitmap item stands for, added to `indices`; None if it is malformed.
fn read_bitmap(
    item: &serde_json::Map<String, serde_json::Value>,
    indices: &mut Ranges,
) -> Option<()> {
    use base64::Engine;
    let from = item.get("from")?.as_u64()?;
    let bits = base64::engine::general_purpose::STANDARD
        .decode(item.get("bits")?.as_str()?)
        .ok()?;
    let mut run: Option<(u64, u64)> = None;
    for (j, byte) in bits.iter().enumerate() {
        for k in 0..8u64 {
            let i = from.checked_add(j as u64 * 8 + k)?;
            if byte & (1 << k) != 0 {
                run = match run {
                    Some((a, b)) if b + 1 == i => Some((a, i)),
                    Some((a, b)) => {
                        indices.insert(a, b);
                        Some((i, i))
                    }
                    None => Some((i, i)),
                };
            }
        }
    }
    if let Some((a, b)) = run {
        indices.insert(a, b);
    }
    Some(())
}

/// The marks a header holds; None if it is not one this module writes. Ranges stay
/// ranges: however many records a header stands for (a Kinesis batch of 150,000 in a
/// 16 MiB message), reading it costs what its text does.
fn decode(text: &str) -> Option<(BTreeSet<String>, Ranges)> {
    let items: Vec<serde_json::Value> = serde_json::from_str(text).ok()?;
    let mut done = BTreeSet::new();
    let mut indices = Ranges::default();
    for item in items {
        match item {
            serde_json::Value::String(m) => match index(&m) {
                Some(i) => {
                    indices.insert(i, i);
                }
                None => {
                    done.insert(m);
                }
            },
            serde_json::Value::Array(r) => {
                let (Some(a), Some(b)) = (r.first()?.as_u64(), r.get(1)?.as_u64()) else {
                    return None;
                };
                if r.len() != 2 || b < a {
                    return None;
                }
                indices.insert(a, b);
            }
            serde_json::Value::Object(o) => read_bitmap(&o, &mut indices)?,
            _ => return None,
        }
    }
    Some((done, indices))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};

    const H: &str = "x-test-progress";

    /// A batch pauses only once it has done parts of its own (so its retry is not counted),
    /// and only when the service stops or the consumer timeout nears within a step.
    #[test]
    fn a_batch_pauses_with_parts_done_when_stopping_or_near_the_consumer_timeout() {
        let step = std::time::Duration::from_secs(5);
        let ctx = MessageContext::for_test("x", "k", 0);
        let mut p = Progress::resume(&ctx, H);
        p.mark_done("a");
        assert_eq!(
            p.pause_before(step),
            None,
            "neither stopping nor near a timeout"
        );

        let ctx = MessageContext::for_test("x", "k", 0);
        let _ = ctx
            .stops_at
            .set(std::time::Instant::now() + std::time::Duration::from_secs(3));
        let mut p = Progress::resume(&ctx, H);
        assert_eq!(
            p.pause_before(step),
            None,
            "nothing done yet: handled as it came"
        );
        p.mark_done("a");
        assert_eq!(p.pause_before(step), Some("the service is stopping"));
        // Marks cleared are no part done: that retry would be counted.
        p.clear();
        assert!(p.advanced());
        assert_eq!(p.pause_before(step), None);

        let ctx = MessageContext::for_test("x", "k", 0)
            .with_checkpoint_in(std::time::Duration::from_secs(60));
        let mut p = Progress::resume(&ctx, H);
        p.mark_done("a");
        assert_eq!(p.pause_before(step), None, "a minute is room enough");
        let ctx = MessageContext::for_test("x", "k", 0)
            .with_checkpoint_in(std::time::Duration::from_secs(1));
        let mut p = Progress::resume(&ctx, H);
        p.mark_done("a");
        assert!(
            p.pause_before(step)
                .is_some_and(|w| w.contains("consumer timeout"))
        );
    }

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
        for bad in [r#"[[3,1]]"#, r#"[[1]]"#, r#"[1]"#, r#"[[0,"9"]]"#] {
            assert!(
                Progress::resume(&ctx_with(Some(bad)), H).is_empty(),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_batch_of_any_size_resumes_from_its_ranges_without_expanding_them() {
        // More records done than the old cap of 100,000 marks: that header was read as
        // "nothing done", and every retry sent the whole batch again for ever.
        let ctx = ctx_with(None);
        {
            let mut p = Progress::resume(&ctx, H);
            for i in 0..150_000u32 {
                p.mark_done(i.to_string());
            }
        }
        let header = written(&ctx).expect("header written");
        assert_eq!(header, "[[0,149999]]");
        let next = ctx_with(Some(&header));
        let back = Progress::resume(&next, H);
        assert_eq!(back.len(), 150_000);
        assert!(back.is_done("149999") && !back.is_done("150000"));
        // Billions of records in a few bytes cost a few bytes.
        let forged = ctx_with(Some("[[0,99999999999],[100000000001,100000000005]]"));
        let huge = Progress::resume(&forged, H);
        assert_eq!(huge.len(), 100_000_000_005);
        assert!(huge.is_done("99999999999") && !huge.is_done("100000000000"));
    }

    #[test]
    fn scattered_indices_fit_a_frame_as_a_bitmap_and_read_back_exactly() {
        // Every other record of a 100,000-record batch done (an endpoint refusing every
        // other event): as strings about 700 KB, beyond a frame (128 KiB).
        let ctx = ctx_with(None);
        {
            let mut p = Progress::resume(&ctx, H);
            p.mark_done("export-state [\"c\"]");
            for i in (0..100_000u32).step_by(2) {
                p.mark_done(i.to_string());
            }
            p.mark_done("100001");
            p.mark_done("100002");
            p.mark_done("100003");
        }
        let header = written(&ctx).expect("header written");
        assert!(header.len() < 20_000, "{} bytes", header.len());
        let next = ctx_with(Some(&header));
        let back = Progress::resume(&next, H);
        assert_eq!(back.len(), 50_000 + 3 + 1);
        for i in [0u32, 2, 99_998, 100_001, 100_003] {
            assert!(back.is_done(&i.to_string()), "{i}");
        }
        for i in [1u32, 99_999, 100_000, 100_004] {
            assert!(!back.is_done(&i.to_string()), "{i}");
        }
        assert!(back.is_done("export-state [\"c\"]"));
        // Few marks stay as they were written before.
        let ctx = ctx_with(None);
        {
            let mut p = Progress::resume(&ctx, H);
            for i in [1u32, 5, 6, 7, 8] {
                p.mark_done(i.to_string());
            }
        }
        assert_eq!(written(&ctx).as_deref(), Some(r#"["1",[5,8]]"#));
        // Ranges a forged header stretched to the end of u64 are written back as ranges.
        let forged = ctx_with(Some("[[0,5],[7,18446744073709551615]]"));
        {
            let mut p = Progress::resume(&forged, H);
            p.mark_done("6");
        }
        assert_eq!(
            written(&forged).as_deref(),
            Some("[[0,18446744073709551615]]")
        );
        // A malformed bitmap is no header of this module's (nothing done), not a panic.
        for bad in [
            r#"[{"from":1}]"#,
            r#"[{"from":1,"bits":"%%"}]"#,
            r#"[{"from":18446744073709551615,"bits":"/w=="}]"#,
        ] {
            let c = ctx_with(Some(bad));
            assert!(Progress::resume(&c, H).is_empty(), "{bad}");
        }
    }

    #[test]
    fn ranges_merge_with_their_neighbours() {
        let mut r = Ranges::default();
        assert!(r.insert(5, 5));
        assert!(r.insert(7, 7));
        assert!(r.insert(6, 6), "fills the gap");
        assert_eq!(r.0.iter().collect::<Vec<_>>(), [(&5, &7)]);
        assert!(!r.insert(6, 7), "nothing new");
        assert!(r.insert(0, 4));
        assert!(r.insert(8, 20));
        assert!(r.insert(30, 40));
        assert!(r.insert(21, 29), "joins three");
        assert_eq!(r.0.iter().collect::<Vec<_>>(), [(&0, &40)]);
        assert!(r.insert(u64::MAX, u64::MAX));
        assert!(r.contains(u64::MAX) && !r.contains(41));
        assert_eq!(r.count(), 42);
    }

    #[test]
    fn ranges_split_where_a_block_is_removed() {
        let mut r = Ranges::default();
        r.insert(0, 10);
        r.insert(20, 30);
        r.insert(40, 40);
        assert!(r.remove(5, 25), "cuts two ranges");
        assert_eq!(
            r.0.iter().collect::<Vec<_>>(),
            [(&0, &4), (&26, &30), (&40, &40)]
        );
        assert!(!r.remove(31, 39), "nothing there");
        assert!(r.remove(40, 40));
        assert!(r.remove(0, 0));
        assert_eq!(r.0.iter().collect::<Vec<_>>(), [(&1, &4), (&26, &30)]);
        r.insert(u64::MAX - 1, u64::MAX);
        assert!(r.remove(u64::MAX, u64::MAX));
        assert!(r.contains(u64::MAX - 1) && !r.contains(u64::MAX));
        assert_eq!(r.count(), 10);
    }

    #[test]
    fn forgotten_parts_are_no_longer_done_and_the_header_is_rewritten() {
        let ctx = ctx_with(Some(r#"["a","b",[0,9],[100,109]]"#));
        let mut p = Progress::resume(&ctx, H);
        assert_eq!(p.named().collect::<Vec<_>>(), ["a", "b"]);
        p.forget("c");
        p.forget_indices(10, 99);
        assert!(!p.advanced(), "nothing was there to forget");
        p.forget("a");
        p.forget("5");
        p.forget_indices(100, 200);
        assert!(p.advanced());
        assert!(!p.is_done("a") && p.is_done("b"));
        assert!(!p.is_done("5") && p.is_done("4") && p.is_done("6"));
        assert!(!p.is_done("100"));
        drop(p);
        assert_eq!(written(&ctx).as_deref(), Some(r#"["b",[0,4],[6,9]]"#));
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

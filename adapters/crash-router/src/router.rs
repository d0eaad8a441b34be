//! The crash-router processor and its `Service` wiring.

use framework::telemetry::LogText;
use std::collections::BTreeMap;

use framework::config::{Config, ConfigError};
use framework::{BoxError, MessageContext, MessageProcessor, Outcome, Publication, Service};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::rules::{Record, Rules, classify, classify_eventbridge};
use crate::spec::{DEFAULT_SEED, QueueSpec, parse_queues, selected};

/// Exchange the S3 notifications arrive on.
pub const INPUT_EXCHANGE: &str = "s3-events";
/// Success messages go out as `<this>.success`.
pub const OUTPUT_ROUTING_KEY: &str = "storagetier.crashrouter.crash";
/// Retry header of earlier releases: the `<crash id> <queue>` pairs already published
/// (JSON array), still honoured on the retries and dead letters they wrote. At 54 bytes a
/// pair, it outgrew an AMQP frame beyond about 2,400 pairs.
pub const PUBLISHED_HEADER: &str = "x-crash-router-published";
/// Retry header: per destination queue, the positions in its list of crash ids (the
/// notification's accepted ids drawn for it, in order) already published — as ranges, a
/// few bytes however many — under a mark naming the queue and a digest of that list
/// (`"to <slot> <digest> <queue>"`, positions `slot·2³² + i`). A queue whose list changed
/// between attempts (its throttle, the seed, a release that accepts otherwise) has its
/// positions forgotten; every other queue keeps them, so correcting or adding a queue and
/// replaying sends nothing twice to the queues that had their ids. (Earlier builds wrote
/// positions over all pairs under one mark of the whole routing, `"queues …"`: read
/// under that routing and carried over to each queue's own.)
pub const SENT_HEADER: &str = "x-crash-router-sent";

/// Bits of a [`SENT_HEADER`] position below its destination's slot: a notification's
/// crash ids number far fewer than 2³² (each is a record of at least ~30 bytes).
const SLOT_BITS: u32 = 32;
/// Counter of S3 records (and throttled deliveries) by result.
pub const RECORDS_METRIC: &str = "storagetier_crash_router_records_total";
/// Every `result` of [`RECORDS_METRIC`], as docs/adapters.md lists them.
pub const RECORD_RESULTS: [&str; 5] = ["accepted", "deferred", "junk", "ignored", "throttled"];

/// `[crash_router]` keys besides the framework's queue/output_exchange/http_listen.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CrashRouterSettings {
    /// Destination queues, `"socorro.normal,15:socorro.submitter"`.
    #[serde(default = "default_queues")]
    pub queues: String,
    /// The throttle-result digit that means accept ("0" or "1"; the other one defers).
    #[serde(default = "default_accept_digit")]
    pub accept_digit: String,
    /// Seed for the throttle draws; unset = [`DEFAULT_SEED`] (draws stay deterministic).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Prefixes of raw-crash object keys: Socorro's collector writes `v2/raw_crash/`
    /// (pigeon's, the default), Antenna `v1/raw_crash/`.
    #[serde(default = "default_key_prefixes")]
    pub key_prefixes: Vec<String>,
}

fn default_key_prefixes() -> Vec<String> {
    vec![crate::rules::RAW_CRASH_PREFIX.to_string()]
}

/// The `[crash_router] key_prefixes` setting, checked: at least one, each a non-empty
/// key prefix ending in `/` (a prefix without it, `v2/raw_crash`, also matches
/// `v2/raw_crash_old/…`) and not starting with one (S3 keys do not).
pub fn key_prefixes_of(prefixes: &[String]) -> Result<Vec<String>, ConfigError> {
    let bad = |m: String| ConfigError::new("crash_router.key_prefixes", m);
    if prefixes.is_empty() {
        return Err(bad(
            "needs at least one prefix (the default is `v2/raw_crash/`)".into(),
        ));
    }
    prefixes
        .iter()
        .map(|p| {
            let p = p.trim();
            if p.is_empty() || p.starts_with('/') || !p.ends_with('/') {
                Err(bad(format!(
                    "`{p}` is no key prefix: one like `v2/raw_crash/` (ending in `/`, not \
                     starting with one)"
                )))
            } else {
                Ok(p.to_string())
            }
        })
        .collect()
}

fn default_queues() -> String {
    "socorro.normal".to_string()
}

fn default_accept_digit() -> String {
    "0".to_string()
}

/// The accept and defer digits for an `accept_digit` setting.
pub fn digits(accept_digit: &str) -> Result<(char, char), ConfigError> {
    match accept_digit.trim() {
        "0" => Ok(('0', '1')),
        "1" => Ok(('1', '0')),
        other => Err(ConfigError::new(
            "crash_router.accept_digit",
            format!("must be \"0\" or \"1\" (the other digit means defer), got `{other}`"),
        )),
    }
}

/// Parses `[crash_router] queues` into a config error naming the key.
pub fn queues_of(spec: &str) -> Result<Vec<QueueSpec>, ConfigError> {
    parse_queues(spec).map_err(|e| ConfigError::new("crash_router.queues", e.to_string()))
}

/// Routes accepted crash ids to the configured queues.
pub struct CrashRouter {
    queues: Vec<QueueSpec>,
    rules: Rules,
    seed: u64,
}

/// Record counts of one message.
#[derive(Debug, Default, Serialize)]
struct Counts {
    accepted: u64,
    deferred: u64,
    junk: u64,
    ignored: u64,
    throttled: u64,
}

impl CrashRouter {
    /// A router for `queues`; `seed` (default [`DEFAULT_SEED`]) keys the throttle draws.
    pub fn new(queues: Vec<QueueSpec>, accept: char, defer: char, seed: Option<u64>) -> Self {
        framework::telemetry::counters_from_zero(
            RECORDS_METRIC,
            "crash-router: records of the notifications handled, by result",
            "result",
            &RECORD_RESULTS,
        );
        Self {
            queues,
            rules: Rules::digits(accept, defer),
            seed: seed.unwrap_or(DEFAULT_SEED),
        }
    }

    /// This router with raw crashes' keys under `prefixes` (`[crash_router] key_prefixes`).
    pub fn with_key_prefixes(mut self, prefixes: Vec<String>) -> Self {
        self.rules.prefixes = prefixes;
        self
    }

    /// Everything that decides the order of a notification's (crash id, queue) pairs:
    /// the accept digit, the seed and the queues with their throttles.
    fn routing_spec(&self) -> String {
        let queues: Vec<String> = self
            .queues
            .iter()
            .map(|q| format!("{}:{}", q.throttle, q.name))
            .collect();
        format!(
            "accept={} seed={} {}",
            self.rules.accept,
            self.seed,
            queues.join(",")
        )
    }

    /// The mark earlier releases wrote over all of `pairs` — each accepted crash id, in
    /// order, with the queues it is to go to: the routing spec and a digest of the pairs.
    /// Their positions are kept only under the same mark: a release that classifies a
    /// record otherwise, or another configuration, puts other pairs at the same positions.
    fn legacy_mark(&self, pairs: &[(&String, Vec<&str>)]) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (id, queues) in pairs {
            for q in queues {
                h.update(id.as_bytes());
                h.update(b" ");
                h.update(q.as_bytes());
                h.update(b"\n");
            }
        }
        let digest: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("queues {} pairs={digest}", self.routing_spec())
    }

    /// Where each configured queue's progress is kept in `sent` (in the configured order):
    /// its slot under an earlier attempt's mark where its list of ids is still the same,
    /// else a free one. Positions under a mark whose list changed (or whose queue is gone)
    /// are forgotten; an earlier build's positions over all pairs are carried over to the
    /// queues' own (see [`Self::legacy_sent`]).
    fn destinations(
        &self,
        pairs: &[(&String, Vec<&str>)],
        sent: &mut framework::batch::Progress<'_>,
    ) -> Vec<Destination> {
        let digests: Vec<String> = self
            .queues
            .iter()
            .map(|q| {
                list_digest(
                    pairs
                        .iter()
                        .filter(|(_, picks)| picks.contains(&q.name.as_str()))
                        .map(|(id, _)| id.as_str()),
                )
            })
            .collect();
        let legacy = sent.named().any(|m| m.starts_with(LEGACY_PREFIX));
        let carried = if legacy {
            self.legacy_sent(pairs, sent)
        } else {
            Default::default()
        };
        // Slot kept by each queue whose list is unchanged; every other mark forgotten.
        let mut slots: Vec<Option<u64>> = vec![None; self.queues.len()];
        let marks: Vec<String> = sent.named().map(str::to_owned).collect();
        for m in &marks {
            let kept = parse_mark(m).and_then(|(slot, digest, name)| {
                let i = self.queues.iter().position(|q| q.name == name)?;
                let free = slots[i].is_none() && !slots.contains(&Some(slot));
                (digests[i] == digest && free).then_some((i, slot))
            });
            match kept {
                Some((i, slot)) => slots[i] = Some(slot),
                None => sent.forget(m),
            }
        }
        let forget_slot = |sent: &mut framework::batch::Progress<'_>, slot: u64| {
            sent.forget_indices(slot << SLOT_BITS, (slot << SLOT_BITS) | SLOT_MASK);
        };
        // Positions in a slot no kept mark holds name no ids any more.
        for (slot, _, _) in marks.iter().filter_map(|m| parse_mark(m)) {
            if !slots.contains(&Some(slot)) {
                forget_slot(sent, slot);
            }
        }
        let mut dests = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let slot = match slots[i] {
                Some(slot) => slot,
                None => {
                    let free = (0u64..)
                        .find(|s| !slots.contains(&Some(*s)))
                        .unwrap_or_default();
                    forget_slot(sent, free);
                    slots[i] = Some(free);
                    free
                }
            };
            dests.push(Destination {
                mark: format!("to {slot} {} {}", digests[i], q.name),
                base: slot << SLOT_BITS,
                next: 0,
            });
        }
        if !carried.is_empty() {
            for (q, dest) in self.queues.iter().zip(&dests) {
                let list = pairs
                    .iter()
                    .filter(|(_, picks)| picks.contains(&q.name.as_str()));
                for (position, (id, _)) in (0u64..).zip(list) {
                    if carried.contains(&((*id).clone(), q.name.clone())) {
                        sent.mark_done(dest.mark.as_str());
                        sent.mark_done((dest.base + position).to_string());
                    }
                }
            }
        }
        dests
    }

    /// What an earlier build's header (positions over all pairs under one routing mark)
    /// says is sent, as (crash id, queue) pairs — read under the routing it names, so a
    /// dead letter it wrote is replayed after a change of queues (correcting a misspelled
    /// one) without sending again what the others had — with its marks and positions
    /// forgotten. Nothing where that routing's pairs are not these ids' (another accept
    /// digit, a release that classified otherwise).
    fn legacy_sent(
        &self,
        pairs: &[(&String, Vec<&str>)],
        sent: &mut framework::batch::Progress<'_>,
    ) -> std::collections::HashSet<(String, String)> {
        let mut facts = std::collections::HashSet::new();
        let earlier = sent
            .named()
            .find(|m| m.starts_with(LEGACY_PREFIX))
            .and_then(|m| self.legacy_router(m));
        if let Some(earlier) = earlier {
            let old_pairs = earlier.pairs(pairs.iter().map(|(id, _)| *id));
            if sent.is_done(&earlier.legacy_mark(&old_pairs)) {
                let mut at = 0u64;
                for (id, picks) in &old_pairs {
                    for q in picks {
                        if sent.is_done(&at.to_string()) {
                            facts.insert(((*id).clone(), (*q).to_string()));
                        }
                        at += 1;
                    }
                }
            }
        }
        sent.clear();
        facts
    }

    /// The router an earlier build's mark (`"queues accept=<d> seed=<n> <t>:<queue>,…
    /// pairs=<digest>"`) was drawn with, if it is one this build reads the same way (the
    /// same accept digit).
    fn legacy_router(&self, mark: &str) -> Option<CrashRouter> {
        let rest = mark.strip_prefix(LEGACY_PREFIX)?.strip_prefix("accept=")?;
        let (accept, rest) = rest.split_once(" seed=")?;
        let (seed, rest) = rest.split_once(' ')?;
        let (specs, _) = rest.rsplit_once(" pairs=")?;
        if accept != self.rules.accept.to_string() {
            return None;
        }
        let queues = specs
            .split(',')
            .map(|spec| {
                let (throttle, name) = spec.split_once(':')?;
                Some(QueueSpec {
                    name: name.to_string(),
                    throttle: throttle.parse().ok().filter(|t| *t <= 100)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some(CrashRouter {
            queues,
            rules: self.rules.clone(),
            seed: seed.parse().ok()?,
        })
    }

    /// Each of `ids` with the queues it is drawn for, in the configured order.
    fn pairs<'a>(
        &'a self,
        ids: impl Iterator<Item = &'a String>,
    ) -> Vec<(&'a String, Vec<&'a str>)> {
        ids.map(|id| {
            let picks = self.select_queues(id);
            let queues = self
                .queues
                .iter()
                .filter(|q| picks.contains(&q.name))
                .map(|q| q.name.as_str())
                .collect();
            (id, queues)
        })
        .collect()
    }

    /// The configured queues, in order, that get `crash_id`: a function of the seed and
    /// the id only, so any instance handling any delivery of it chooses the same.
    pub fn select_queues(&self, crash_id: &str) -> Vec<String> {
        self.queues
            .iter()
            .filter(|q| selected(q.throttle, self.seed, &q.name, crash_id))
            .map(|q| q.name.clone())
            .collect()
    }
}

#[framework::async_trait]
impl MessageProcessor for CrashRouter {
    type Input = Value;

    fn progress_headers(&self) -> &'static [&'static str] {
        &[PUBLISHED_HEADER, SENT_HEADER]
    }

    /// An S3 notification names its events (time, sequencer, request id): the same body
    /// again is that notification again — MinIO's AMQP target sets no message id and
    /// re-sends a body after a reconnect — so its crash ids keep their ids.
    fn knows_inputs_by_body(&self) -> bool {
        true
    }

    async fn handle(&self, input: Value, ctx: &MessageContext) -> Outcome {
        // Counted before anything is classified, then as an SQS batch's bodies are opened
        // (each may hold a million): counted after opening, 8 bodies of `[0,0,…]` made 8
        // million junk records, a gigabyte, and the service was killed at every delivery.
        let listed = input
            .get("Records")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if let Some(o) = ctx.too_many_records(listed) {
            return o;
        }
        // In a block: the tally (not `Send`) is gone before the first publish is awaited.
        let records = {
            let too_many = |n| ctx.too_many_records(n);
            let mut tally = Tally::new(&too_many);
            match self.records_of(input, false, &mut tally) {
                Ok(records) => {
                    debug_assert_eq!(tally.seen, records.len(), "every record is counted");
                    records
                }
                Err(o) => return o,
            }
        };

        let mut counts = Counts::default();
        let accepted = distinct_accepted(&records);
        for (i, rec) in records.iter().enumerate() {
            match rec {
                Record::Accepted(_) => counts.accepted += 1,
                Record::Deferred(id) => {
                    counts.deferred += 1;
                    tracing::debug!(record = i, crash_id = %id, "deferred crash, skipped");
                }
                Record::Junk(why) => {
                    counts.junk += 1;
                    // Debug, as every per-record line: the counters say how many, and at
                    // Socorro's volume a line each would crowd out the log.
                    tracing::debug!(record = i, reason = %LogText(why), "junk record, skipped");
                }
                Record::Ignored(why) => {
                    counts.ignored += 1;
                    tracing::debug!(record = i, reason = %LogText(why), "record ignored");
                }
            }
        }

        // The throttle draw is a function of seed, queue and crash id, so a retry, a
        // redelivery and another instance all choose the same queues; a retry skips the
        // pairs an earlier attempt already published.
        let earlier_release = framework::batch::Progress::resume(ctx, PUBLISHED_HEADER);
        let mut sent = framework::batch::Progress::resume(ctx, SENT_HEADER);
        let pairs = self.pairs(accepted.iter());
        let mut dests = self.destinations(&pairs, &mut sent);
        let mut deliveries: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut already = 0u64;
        // Queues that refused an id this attempt (missing, or full and rejecting): their
        // other ids are left for the retry, and every other queue still gets its own now
        // rather than waiting out the retries (or a dead letter) with them.
        let mut refused: BTreeMap<String, (u64, String)> = BTreeMap::new();
        // Whether a queue already left a publish unconfirmed this attempt (see below).
        let mut stalled = false;
        for (id, picks) in &pairs {
            for (q, dest) in self.queues.iter().zip(dests.iter_mut()) {
                if !picks.contains(&q.name.as_str()) {
                    continue;
                }
                let at = dest.next_position();
                if sent.is_done(&at) || earlier_release.is_done(&format!("{id} {}", q.name)) {
                    already += 1;
                } else if let Some((missed, _)) = refused.get_mut(&q.name) {
                    *missed += 1;
                    continue;
                } else if let Some(why) = sent.pause_before(PUBLISH_STEP) {
                    // Stopping (or near the consumer timeout) with ids published: the rest
                    // go with a retry carrying what is done, not in a redelivery that
                    // publishes them all again.
                    let published: usize = deliveries.values().map(Vec::len).sum();
                    let total: usize = pairs.iter().map(|(_, picks)| picks.len()).sum();
                    return Outcome::retry(format!(
                        "{why} after {published} of the notification's {total} deliveries; \
                         the rest go with this retry"
                    ));
                } else if let Err(e) = ctx
                    .publish(Publication::text("", &q.name, id.as_str()).mandatory())
                    .await
                {
                    // A queue that confirms nothing in time (a quorum queue without its
                    // majority) holds back its own ids only, as one that refuses them:
                    // every other queue's waited out its retries with it. A second such
                    // queue says the connection is the one not answering.
                    let first_stall = matches!(e, framework::publisher::PublishError::Timeout(_))
                        && !std::mem::replace(&mut stalled, true);
                    if !e.destination_refused() && !first_stall {
                        // The channel, the connection or the message itself failed: the
                        // next publish would too.
                        return Outcome::publish_failed(
                            format!("publishing crash id {id} to queue `{}` failed", q.name),
                            &e,
                        );
                    }
                    refused.insert(q.name.clone(), (1, e.to_string()));
                    continue;
                } else {
                    sent.mark_done(dest.mark.as_str());
                    sent.mark_done(at);
                    tracing::debug!(crash_id = %id, queue = %q.name, "crash id published");
                }
                deliveries
                    .entry(q.name.clone())
                    .or_default()
                    .push((*id).clone());
            }
            let not_picked = self.queues.len().saturating_sub(picks.len());
            counts.throttled += not_picked as u64;
        }

        if !refused.is_empty() {
            let missed: Vec<String> = refused
                .iter()
                .map(|(q, (n, e))| format!("{n} crash id(s) for queue `{q}` ({e})"))
                .collect();
            return Outcome::retry(format!(
                "{} published; still to go: {}",
                deliveries.values().map(Vec::len).sum::<usize>() as u64 - already,
                missed.join(", ")
            ));
        }

        for (label, n) in [
            ("accepted", counts.accepted),
            ("deferred", counts.deferred),
            ("junk", counts.junk),
            ("ignored", counts.ignored),
            ("throttled", counts.throttled),
        ] {
            // Counted once the summary is published: one the broker refuses makes the
            // message a retry, whose next attempt counts the records again.
            if n > 0 {
                ctx.count_when_done(metrics::counter!(RECORDS_METRIC, "result" => label), n);
            }
        }

        summary(records.len(), accepted, deliveries, already, &counts)
    }
}

/// Crash ids a success summary lists, in `accepted` and per queue in `deliveries`; the
/// rest are counted. Listed whole, a notification of many records (a raised
/// `max_records`, many queues) made a summary larger than the broker takes, refused after
/// every id went out, and the notification dead-lettered again at every replay.
const MAX_LISTED: usize = 1000;

/// The success summary: ids past [`MAX_LISTED`] in a list are left out, and that list's
/// whole count is given beside it (`accepted_total`, `deliveries_total`).
fn summary(
    records: usize,
    mut accepted: Vec<String>,
    mut deliveries: BTreeMap<String, Vec<String>>,
    already: u64,
    counts: &Counts,
) -> Outcome {
    let mut body = json!({
        "records": records,
        "already_published": already,
        "counts": counts,
    });
    if accepted.len() > MAX_LISTED {
        body["accepted_total"] = accepted.len().into();
        accepted.truncate(MAX_LISTED);
    }
    let mut totals = serde_json::Map::new();
    for (queue, ids) in deliveries.iter_mut() {
        if ids.len() > MAX_LISTED {
            totals.insert(queue.clone(), ids.len().into());
            ids.truncate(MAX_LISTED);
        }
    }
    if !totals.is_empty() {
        body["deliveries_total"] = totals.into();
    }
    body["accepted"] = json!(accepted);
    body["deliveries"] = json!(deliveries);
    Outcome::success(body)
}

/// The mark an earlier release's [`SENT_HEADER`] begins with (`"queues <routing>"`).
const LEGACY_PREFIX: &str = "queues ";

/// A position's bits within its slot.
const SLOT_MASK: u64 = (1 << SLOT_BITS) - 1;

/// One destination queue's progress in [`SENT_HEADER`]: its mark, and where its positions
/// begin.
struct Destination {
    mark: String,
    base: u64,
    /// Position of the queue's next crash id in its list.
    next: u64,
}

impl Destination {
    /// The progress mark of the queue's next crash id, moving on to the one after.
    fn next_position(&mut self) -> String {
        let at = self.base + (self.next & SLOT_MASK);
        self.next += 1;
        at.to_string()
    }
}

/// A digest of a queue's list of crash ids, in order: its positions name the same ids only
/// under the same one.
fn list_digest<'a>(ids: impl Iterator<Item = &'a str>) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for id in ids {
        h.update(id.as_bytes());
        h.update(b"\n");
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A destination mark's slot, list digest and queue (`"to <slot> <digest> <queue>"`).
fn parse_mark(mark: &str) -> Option<(u64, &str, &str)> {
    let mut parts = mark.strip_prefix("to ")?.splitn(3, ' ');
    let slot: u64 = parts.next()?.parse().ok()?;
    let digest = parts.next()?;
    let queue = parts.next()?;
    (slot < 1 << (64 - SLOT_BITS)).then_some((slot, digest, queue))
}

/// The longest one publish of a crash id is expected to take, confirm included: a handler
/// stopping within it of the drain's end returns a retry instead (see
/// `Progress::pause_before`).
const PUBLISH_STEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The accepted crash ids of `records`, each once, in the order they first appear. With a
/// set beside the list: a notification of 150,000 records made `Vec::contains` compare
/// 10^10 ids, a minute of one worker per attempt.
fn distinct_accepted(records: &[Record]) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    records
        .iter()
        .filter_map(|r| match r {
            Record::Accepted(id) if seen.insert(id.as_str()) => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// A message's records counted as they are opened, against `[amqp] max_records`.
struct Tally<'a> {
    /// Records counted so far.
    seen: usize,
    /// Whether `seen` went past the limit (the outcome is the message's, not a record's).
    over: bool,
    /// [`MessageContext::too_many_records`] (a stand-in in unit tests).
    too_many: &'a dyn Fn(usize) -> Option<Outcome>,
}

impl<'a> Tally<'a> {
    fn new(too_many: &'a dyn Fn(usize) -> Option<Outcome>) -> Self {
        Self {
            seen: 0,
            over: false,
            too_many,
        }
    }

    /// Counts `n` more records, before they are classified: past the limit, the
    /// message's too-many-records outcome.
    fn add(&mut self, n: usize) -> Result<(), Outcome> {
        self.seen = self.seen.saturating_add(n);
        match (self.too_many)(self.seen) {
            Some(o) => {
                self.over = true;
                Err(o)
            }
            None => Ok(()),
        }
    }
}

impl CrashRouter {
    /// The S3 records `input` carries, classified: an S3 notification's `Records`, an
    /// EventBridge event, either inside an SNS envelope, or (`inner` false) an SQS batch
    /// (`{"Records":[{"eventSource":"aws:sqs","body":…}]}`, what a queue between S3 and the
    /// bus delivers) whose bodies are any of those. An SQS body that carries none is a
    /// junk record, counted and logged, never a silent success; at the top the message is
    /// Dropped (S3's test event, SNS's handshakes) or Permanent (no event at all). Every
    /// record is counted in `tally` before it is classified: past the limit, the message's
    /// outcome, with nothing more opened.
    fn records_of(
        &self,
        input: Value,
        inner: bool,
        tally: &mut Tally<'_>,
    ) -> Result<Vec<Record>, Outcome> {
        let input = unwrap_sns(input)?;
        // S3 sends this to a notification's destination whenever the bucket's notification
        // configuration is saved: not an event, nothing wrong with it.
        if input.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
            let why = "S3 test event (sent when notifications are configured)";
            if !inner {
                return Err(Outcome::drop(why));
            }
            tally.add(1)?;
            return Ok(vec![Record::Ignored(why.into())]);
        }
        if input.get("source").and_then(Value::as_str) == Some("aws.s3")
            && input.get("detail-type").is_some()
        {
            // EventBridge carries one object event per message.
            tally.add(1)?;
            return Ok(vec![classify_eventbridge(&input, &self.rules)]);
        }
        if let Some(records) = input.get("Records").and_then(Value::as_array) {
            if inner {
                // An SQS body's records are one each: counted all at once, before any is
                // classified.
                tally.add(records.len())?;
            }
            let mut out = Vec::with_capacity(records.len());
            for r in records {
                match r.get("eventSource").and_then(Value::as_str) {
                    Some("aws:sqs") if !inner => {
                        out.extend(self.wrapped(Wrapper::Sqs, r, tally)?)
                    }
                    // SNS spells its record's fields capitalised.
                    _ if !inner
                        && r.get("EventSource").and_then(Value::as_str) == Some("aws:sns") =>
                    {
                        out.extend(self.wrapped(Wrapper::Sns, r, tally)?)
                    }
                    _ => {
                        if !inner {
                            tally.add(1)?;
                        }
                        out.push(classify(r, &self.rules));
                    }
                }
            }
            return Ok(out);
        }
        let what = match &input {
            Value::Object(o) if o.contains_key("Records") => {
                "an object whose `Records` is not an array"
            }
            Value::Object(_) => "an object without a `Records` array",
            Value::Array(_) => "an array",
            Value::String(_) => "a string",
            Value::Number(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Null => "null",
        };
        Err(Outcome::permanent(format!(
            "expected an S3 event notification (an object with a `Records` array), got {what}"
        )))
    }

    /// The records of one SQS record's `body` (JSON text, or an object where a bridge
    /// decoded it), or of one SNS record's `Sns` envelope (as Lambda receives a topic's
    /// notifications); what cannot be read is one junk record naming the SQS or SNS
    /// message. Counted in `tally`: past the limit, the message's outcome.
    fn wrapped(
        &self,
        wrapper: Wrapper,
        record: &Value,
        tally: &mut Tally<'_>,
    ) -> Result<Vec<Record>, Outcome> {
        // The message id is the record's own (SQS) or its envelope's (SNS).
        let (what, id_field, body_field, id_in) = match wrapper {
            Wrapper::Sqs => ("SQS", "messageId", "body", None),
            Wrapper::Sns => ("SNS", "MessageId", "Sns", Some("Sns")),
        };
        let id = id_in
            .map_or(Some(record), |f| record.get(f))
            .and_then(|r| r.get(id_field))
            .and_then(Value::as_str)
            .unwrap_or("-");
        let body = match record.get(body_field) {
            Some(Value::String(text)) => match framework::fields::json_in_text(text.as_bytes()) {
                Ok(v) => v,
                Err(e) => {
                    tally.add(1)?;
                    return Ok(vec![Record::Junk(
                        format!("{what} message {id}: `{body_field}` {e}").into(),
                    )]);
                }
            },
            Some(v @ Value::Object(_)) => v.clone(),
            _ => {
                tally.add(1)?;
                return Ok(vec![Record::Junk(
                    format!("{what} message {id} has no `{body_field}` of JSON").into(),
                )]);
            }
        };
        let one = match self.records_of(body, true, tally) {
            // A body of no records (`{"Records": []}`) is a message that carried nothing:
            // junk, counted and logged, not a silent success.
            Ok(records) if records.is_empty() => {
                Record::Junk(format!("{what} message {id} carries no records").into())
            }
            Ok(records) => return Ok(records),
            // Too many records is the whole message's outcome, not this body's junk.
            Err(o) if tally.over => return Err(o),
            Err(Outcome::Drop(why)) => {
                // Said at info, not with the other ignored records at debug: an SNS
                // subscription to confirm is an operator's step, not traffic.
                if why.starts_with("SNS SubscriptionConfirmation ") {
                    tracing::info!(reason = %LogText(&why), "{what} message {id} ignored");
                }
                Record::Ignored(format!("{what} message {id}: {why}").into())
            }
            Err(o) => Record::Junk(format!("{what} message {id}: {}", outcome_reason(&o)).into()),
        };
        tally.add(1)?;
        Ok(vec![one])
    }
}

/// The AWS services whose batches carry an S3 notification in each record.
#[derive(Clone, Copy)]
enum Wrapper {
    /// `{"eventSource":"aws:sqs","messageId":…,"body":"<notification or SNS envelope>"}`.
    Sqs,
    /// `{"EventSource":"aws:sns","Sns":{"Type":"Notification","MessageId":…,"Message":…}}`.
    Sns,
}

/// The reason an outcome other than Success carries.
fn outcome_reason(o: &Outcome) -> &str {
    match o {
        Outcome::Retry(r)
        | Outcome::Permanent(r)
        | Outcome::Exhausted(r)
        | Outcome::Drop(r)
        | Outcome::Interrupted(r) => r,
        Outcome::Success { .. } => "",
    }
}

/// The S3 event inside an SNS envelope (`{"Type":"Notification","Message":"<JSON text>",…}`:
/// what a topic subscriber without raw message delivery gets), one level only; any other
/// message as it is. SNS's subscription handshakes (`SubscriptionConfirmation`,
/// `UnsubscribeConfirmation`) carry no event: Drop, whose reason (naming the topic) the
/// framework logs.
fn unwrap_sns(input: Value) -> Result<Value, Outcome> {
    if input.get("Records").is_some() {
        return Ok(input);
    }
    let topic = input
        .get("TopicArn")
        .and_then(Value::as_str)
        .unwrap_or("an unnamed topic");
    match input.get("Type").and_then(Value::as_str) {
        Some("Notification") => {}
        Some(t @ ("SubscriptionConfirmation" | "UnsubscribeConfirmation")) => {
            // The URL that confirms the subscription, where SNS gave one: without it in
            // the log, whoever wires S3 → SNS → the bus never sees it, and no notification
            // ever comes.
            let url = (t == "SubscriptionConfirmation")
                .then(|| input.get("SubscribeURL").and_then(Value::as_str))
                .flatten()
                .map(|u| format!("; confirm it at {u}"))
                .unwrap_or_default();
            return Err(Outcome::drop(format!(
                "SNS {t} from {topic} (not an S3 event){url}"
            )));
        }
        _ => return Ok(input),
    }
    match input.get("Message") {
        Some(Value::String(m)) => framework::fields::json_in_text(m.as_bytes()).map_err(|e| {
            Outcome::permanent(format!("SNS notification from {topic}: `Message` {e}"))
        }),
        // Already opened by a bridge that expands JSON held in strings, as an SQS `body`
        // is taken.
        Some(m @ Value::Object(_)) => Ok(m.clone()),
        Some(other) => Err(Outcome::permanent(format!(
            "SNS notification from {topic}: `Message`: expected a string of JSON, found {}",
            framework::fields::kind_name(other)
        ))),
        None => Err(Outcome::permanent(format!(
            "SNS notification from {topic} has no `Message`"
        ))),
    }
}

/// The crash-router service: `s3-events` / `#` → crash queues.
pub struct CrashRouterService;

#[framework::async_trait]
impl Service for CrashRouterService {
    const NAME: &'static str = "crash-router";
    const ABOUT: &'static str =
        "routes Socorro raw-crash S3 notifications to throttled crash queues";
    const SECTION: &'static str = "crash_router";
    type Settings = CrashRouterSettings;
    type Processor = CrashRouter;

    fn binding(_cfg: &Config<CrashRouterSettings>) -> framework::Binding {
        framework::Binding {
            exchange: INPUT_EXCHANGE.to_string(),
            routing_keys: vec!["#".to_string()],
            output_routing_key: OUTPUT_ROUTING_KEY.to_string(),
            ..Default::default()
        }
    }

    fn validate(cfg: &Config<CrashRouterSettings>) -> Result<(), ConfigError> {
        let queues = queues_of(&cfg.settings.queues)?;
        // One under `amq.` cannot exist (RabbitMQ refuses the name), so every id to it is
        // unroutable.
        if let Some(q) = queues.iter().find(|q| q.name.starts_with("amq.")) {
            return Err(ConfigError::new(
                "crash_router.queues",
                format!(
                    "`{}` is a name RabbitMQ reserves (`amq.`): name the processors' queues",
                    q.name
                ),
            ));
        }
        // A crash id sent to a queue of this service's topology, or of another service's
        // (a copied value), reaches it as a body that is no event of its: dead-lettered
        // there, and dead-lettered again by every replay.
        for q in &queues {
            if let Some((owner, role)) = cfg.topology_owner(&q.name, false) {
                return Err(ConfigError::new(
                    "crash_router.queues",
                    format!(
                        "`{}` is {role} of {owner}, not a processor's queue: crash ids sent \
                         there would be dead letters; name the processors' queues",
                        q.name
                    ),
                ));
            }
        }
        digits(&cfg.settings.accept_digit)?;
        key_prefixes_of(&cfg.settings.key_prefixes)?;
        Ok(())
    }

    async fn processor(cfg: &Config<CrashRouterSettings>) -> Result<CrashRouter, BoxError> {
        let queues = queues_of(&cfg.settings.queues)?;
        let (accept, defer) = digits(&cfg.settings.accept_digit)?;
        let prefixes = key_prefixes_of(&cfg.settings.key_prefixes)?;
        tracing::info!(
            queues = %queues.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            accept_digit = %accept,
            key_prefixes = %prefixes.join(","),
            seeded = cfg.settings.seed.is_some(),
            "crash router configured"
        );
        Ok(CrashRouter::new(queues, accept, defer, cfg.settings.seed).with_key_prefixes(prefixes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use framework::lapin::types::{AMQPValue, FieldTable};

    fn event(keys: &[&str]) -> Value {
        json!({"Records": keys.iter().map(|k| json!({
            "eventName": "ObjectCreated:Put",
            "s3": {"object": {"key": k}}
        })).collect::<Vec<_>>()})
    }

    const ID: &str = "00007bd0-2d1c-4865-af09-80bc00180313";

    fn router(spec: &str, seed: u64) -> CrashRouter {
        CrashRouter::new(parse_queues(spec).unwrap(), '0', '1', Some(seed))
    }

    #[test]
    fn accepted_ids_are_kept_once_in_their_first_order() {
        let rec = |id: &str| Record::Accepted(id.to_string());
        let records = [
            rec("b"),
            Record::Deferred("x".into()),
            rec("a"),
            rec("b"),
            Record::Junk("j".into()),
            rec("c"),
            rec("a"),
        ];
        assert_eq!(distinct_accepted(&records), ["b", "a", "c"]);
        assert!(distinct_accepted(&[]).is_empty());
    }

    #[tokio::test]
    async fn not_an_event_is_permanent() {
        let r = router("a", 1);
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        for body in [
            json!([]),
            json!({"records": []}),
            json!({"Records": {}}),
            json!(3),
        ] {
            match r.handle(body.clone(), &ctx).await {
                Outcome::Permanent(m) => assert!(m.contains("Records"), "{m}"),
                o => panic!("{body}: {o:?}"),
            }
        }
    }

    #[tokio::test]
    async fn the_s3_test_event_is_dropped_not_dead_lettered() {
        let r = router("a", 1);
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        let body = json!({"Service": "Amazon S3", "Event": "s3:TestEvent",
            "Time": "2026-11-29T18:00:00.000Z", "Bucket": "crashes",
            "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR+YstdA6Knx4Ip8EXAMPLE"});
        match r.handle(body, &ctx).await {
            Outcome::Drop(m) => assert!(m.contains("test event"), "{m}"),
            o => panic!("{o:?}"),
        }
    }

    /// JSON text with more values than a message may hold (as a 16 MiB body could).
    fn too_many_values() -> String {
        serde_json::to_string(&vec![0u8; framework::MAX_JSON_VALUES]).expect("text")
    }

    /// An SQS body or SNS `Message` whose text holds more JSON values than a message may
    /// is refused unread (the framework bounds the body's values, not its strings' text):
    /// decoded, a 16 MiB one took 400 MiB and killed the service at every redelivery.
    #[tokio::test]
    async fn json_text_with_too_many_values_is_refused_unread() {
        let r = router("a", 1);
        let sqs = json!({"Records": [{"eventSource": "aws:sqs", "messageId": "m1",
            "body": too_many_values()}]});
        match unlimited(&r, sqs).as_deref() {
            Ok([Record::Junk(why)]) => assert!(why.contains("holds about"), "{why}"),
            o => panic!("{o:?}"),
        }
        let mut n = sns(&json!({}));
        n["Message"] = json!(too_many_values());
        match unlimited(&r, n) {
            Err(Outcome::Permanent(m)) => assert!(m.contains("`Message` holds about"), "{m}"),
            o => panic!("{o:?}"),
        }
    }

    /// The records of `input` with no `max_records`.
    fn unlimited(r: &CrashRouter, input: Value) -> Result<Vec<Record>, Outcome> {
        r.records_of(input, false, &mut Tally::new(&|_| None))
    }

    /// An SQS batch whose bodies hold `sizes` elements each (`0`s: junk records).
    fn sqs_of_zeros(sizes: &[usize]) -> Value {
        let sqs: Vec<Value> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                json!({"eventSource": "aws:sqs", "messageId": format!("m{i}"),
                       "body": json!({"Records": vec![0; n]}).to_string()})
            })
            .collect();
        json!({ "Records": sqs })
    }

    /// An SQS body of no records is one junk record naming its message, as the code and
    /// docs say, not a silent success of none.
    #[test]
    fn an_sqs_body_of_no_records_is_junk() {
        let r = router("a", 1);
        let records = unlimited(&r, sqs_of_zeros(&[0, 1])).expect("records");
        assert_eq!(
            records.iter().map(Record::label).collect::<Vec<_>>(),
            ["junk", "junk"]
        );
        assert!(
            matches!(&records[0], Record::Junk(why) if why.contains("m0 carries no records")),
            "{records:?}"
        );
    }

    /// An SQS body's `Records` are counted before any is classified, and past the limit
    /// nothing more is opened: counted after, 8 bodies of a million `0`s each were 8
    /// million junk records (a gigabyte) and the service was killed at every delivery.
    #[test]
    fn sqs_bodies_are_counted_before_they_are_classified() {
        let r = router("a", 1);
        let asked = &std::cell::RefCell::new(Vec::new());
        let limit = |max: usize| {
            move |n: usize| {
                asked.borrow_mut().push(n);
                (n > max).then(|| Outcome::permanent(format!("{n} records, more than {max}")))
            }
        };
        let ten = limit(10);
        let mut tally = Tally::new(&ten);
        match r.records_of(sqs_of_zeros(&[1000, 2000, 3000, 4000]), false, &mut tally) {
            Err(Outcome::Permanent(m)) => assert_eq!(m, "1000 records, more than 10"),
            Ok(v) => panic!("{} records classified", v.len()),
            Err(o) => panic!("{o:?}"),
        }
        // One count, of the first body: the others were never opened.
        assert_eq!(*asked.borrow(), [1000]);

        // Under the limit, the same records as ever, each counted once: exactly at it is
        // no more than it, one more is.
        let mixed = json!({"Records": [
            {"eventSource": "aws:sqs", "messageId": "m1",
             "body": json!({"Records": [{"eventName": "ObjectCreated:Put"}, 0]}).to_string()},
            {"eventSource": "aws:sqs", "messageId": "m2", "body": "not json"},
            {"eventName": "ObjectRemoved:Delete"},
        ]});
        let four = limit(4);
        let mut tally = Tally::new(&four);
        let records = r
            .records_of(mixed.clone(), false, &mut tally)
            .expect("4 records");
        assert_eq!(records, unlimited(&r, mixed.clone()).expect("4 records"));
        assert_eq!(
            records.iter().map(Record::label).collect::<Vec<_>>(),
            ["junk", "junk", "junk", "ignored"]
        );
        assert_eq!(tally.seen, 4);
        let three = limit(3);
        let mut tally = Tally::new(&three);
        assert!(matches!(
            r.records_of(mixed, false, &mut tally),
            Err(Outcome::Permanent(m)) if m == "4 records, more than 3"
        ));
    }

    const DEFERRED: &str = "00007bd0-2d1c-4865-af09-80bc01180313";

    /// `inner` as SNS delivers it to a subscriber without raw message delivery.
    fn sns(inner: &Value) -> Value {
        json!({"Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
               "TopicArn": "arn:aws:sns:us-west-2:123456789012:crashes",
               "Subject": "Amazon S3 Notification", "Message": inner.to_string(),
               "Timestamp": "2026-11-29T18:00:00.000Z", "SignatureVersion": "1"})
    }

    /// An S3 event as EventBridge delivers it (the key as stored, not URL-encoded).
    fn eventbridge(detail_type: &str, reason: &str, key: &str) -> Value {
        json!({"version": "0", "id": "17793124-05d4-b198-2fde-7ededc63b103",
               "detail-type": detail_type, "source": "aws.s3", "account": "111122223333",
               "time": "2026-11-29T18:00:00Z", "region": "us-west-2",
               "resources": ["arn:aws:s3:::crashes"],
               "detail": {"version": "0", "bucket": {"name": "crashes"},
                          "object": {"key": key, "size": 5, "etag": "b1946ac92492d2347c6235b4d2611184"},
                          "request-id": "N4N7GDK58NMKJ12R", "requester": "123456789012",
                          "reason": reason}})
    }

    async fn counts_of(r: &CrashRouter, body: Value) -> Value {
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        match r.handle(body.clone(), &ctx).await {
            Outcome::Success { body, .. } => body,
            o => panic!("{body}: {o:?}"),
        }
    }

    #[tokio::test]
    async fn sns_notifications_are_unwrapped_once() {
        let r = router("a", 1);
        let key = format!("v2/raw_crash/000/20180313/{DEFERRED}");
        let body = counts_of(&r, sns(&event(&[&key]))).await;
        assert_eq!(body["records"], 1);
        assert_eq!(body["counts"]["deferred"], 1);
        // An accepted crash is routed (here: its publish attempted, failing without a broker).
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        let accepted = sns(&event(&[&format!("v2/raw_crash/000/20180313/{ID}")]));
        assert!(matches!(r.handle(accepted, &ctx).await, Outcome::Retry(m) if m.contains(ID)));
        // One level only: SNS in SNS is not an S3 event.
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        match r.handle(sns(&sns(&event(&[&key]))), &ctx).await {
            Outcome::Permanent(m) => assert!(m.contains("Records"), "{m}"),
            o => panic!("{o:?}"),
        }
        // A `Message` already opened (a bridge expanding JSON held in strings) is taken.
        let mut opened = sns(&json!({}));
        opened["Message"] = event(&[&format!("v2/raw_crash/000/20180313/{ID}")]);
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        assert!(matches!(r.handle(opened, &ctx).await, Outcome::Retry(m) if m.contains(ID)));
        // A `Message` that is not JSON text is named.
        for bad in [json!("{not json"), json!(["Records"])] {
            let mut n = sns(&json!({}));
            n["Message"] = bad;
            let ctx = MessageContext::for_test("s3-events", "k", 0);
            match r.handle(n, &ctx).await {
                Outcome::Permanent(m) => assert!(m.contains("`Message`"), "{m}"),
                o => panic!("{o:?}"),
            }
        }
    }

    #[tokio::test]
    async fn sns_confirmations_and_wrapped_test_events_are_dropped() {
        let r = router("a", 1);
        let test_event = json!({"Service": "Amazon S3", "Event": "s3:TestEvent",
            "Time": "2026-11-29T18:00:00.000Z", "Bucket": "crashes"});
        let mut cases = vec![(sns(&test_event), "test event")];
        for t in ["SubscriptionConfirmation", "UnsubscribeConfirmation"] {
            let mut c = sns(&json!({}));
            c["Type"] = json!(t);
            c["Message"] = json!("You have chosen to subscribe to the topic …");
            c["SubscribeURL"] =
                json!("https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription");
            cases.push((c, t));
        }
        for (body, why) in cases {
            let ctx = MessageContext::for_test("s3-events", "k", 0);
            match r.handle(body, &ctx).await {
                Outcome::Drop(m) => {
                    assert!(m.contains(why), "{why}: {m}");
                    // The operator's step is named: the URL that confirms it.
                    assert_eq!(
                        m.contains("Action=ConfirmSubscription"),
                        why == "SubscriptionConfirmation",
                        "{m}"
                    );
                }
                o => panic!("{why}: {o:?}"),
            }
        }
    }

    #[tokio::test]
    async fn eventbridge_object_created_by_put_is_one_record() {
        let r = router("a", 1);
        let key = format!("v2/raw_crash/000/20180313/{DEFERRED}");
        let body = counts_of(&r, eventbridge("Object Created", "PutObject", &key)).await;
        assert_eq!(body["records"], 1);
        assert_eq!(body["counts"]["deferred"], 1);
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        let accepted = format!("v2/raw_crash/000/20180313/{ID}");
        let put = eventbridge("Object Created", "PutObject", &accepted);
        assert!(matches!(r.handle(put, &ctx).await, Outcome::Retry(m) if m.contains(ID)));
        // Other creations and other events are not puts; EventBridge keys are not
        // URL-encoded, so an encoded-looking key is taken as it is.
        for (dt, reason, k) in [
            ("Object Created", "CopyObject", accepted.as_str()),
            (
                "Object Created",
                "CompleteMultipartUpload",
                accepted.as_str(),
            ),
            ("Object Deleted", "DeleteObject", accepted.as_str()),
            ("Object Created", "PutObject", &accepted.replace('/', "%2F")),
        ] {
            let body = counts_of(&r, eventbridge(dt, reason, k)).await;
            assert_eq!(body["counts"]["ignored"], 1, "{dt} {reason} {k}");
        }
        let mut keyless = eventbridge("Object Created", "PutObject", &accepted);
        keyless["detail"]["object"] = json!({});
        assert_eq!(counts_of(&r, keyless).await["counts"]["junk"], 1);
    }

    #[tokio::test]
    async fn nothing_accepted_needs_no_broker() {
        let r = router("a", 1);
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        let body = json!({"Records": [
            {"eventName": "ObjectRemoved:Delete", "s3": {"object": {"key": format!("v2/raw_crash/000/20180313/{ID}")}}},
            {"eventName": "ObjectCreated:Put", "s3": {"object": {"key": "v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc01180313"}}},
            {"nonsense": true}
        ]});
        let Outcome::Success { body, .. } = r.handle(body, &ctx).await else {
            panic!("success expected")
        };
        assert_eq!(body["counts"]["ignored"], 1);
        assert_eq!(body["counts"]["deferred"], 1);
        assert_eq!(body["counts"]["junk"], 1);
        assert_eq!(body["accepted"], json!([]));
    }

    #[tokio::test]
    async fn publish_failure_is_retry_and_nothing_is_marked_published() {
        // for_test contexts have no channel: every publish fails.
        let r = router("a,b", 1);
        let ctx = MessageContext::for_test("s3-events", "k", 0);
        let key = format!("v2/raw_crash/000/20180313/{ID}");
        let out = r.handle(event(&[&key]), &ctx).await;
        assert!(
            matches!(out, Outcome::Retry(ref m) if m.contains("queue `a`")),
            "{out:?}"
        );
        assert!(
            ctx.retry_headers()
                .iter()
                .all(|(k, _)| k != PUBLISHED_HEADER && k != SENT_HEADER),
            "nothing was published"
        );
    }

    /// A context whose retry header says which positions were sent, under `routing`.
    fn sent_before(routing: &str, positions: &str) -> MessageContext {
        let mut ctx = MessageContext::for_test("s3-events", "k", 1);
        let mut h = FieldTable::default();
        let sent = serde_json::to_string(&json!([routing])).unwrap().replacen(
            ']',
            &format!(",{positions}]"),
            1,
        );
        h.insert(
            SENT_HEADER.into(),
            AMQPValue::LongString(sent.as_str().into()),
        );
        ctx.headers = h;
        ctx
    }

    #[tokio::test]
    async fn an_earlier_builds_positions_are_read_under_the_routing_they_name() {
        let r = router("a,b", 1);
        let key = format!("v2/raw_crash/000/20180313/{ID}");
        let id = ID.to_string();
        let mark = r.legacy_mark(&[(&id, vec!["a", "b"])]);
        // Pairs 0 and 1 (ID to a, ID to b) sent under this routing: nothing to publish,
        // under this configuration or another (a seed changed since).
        for now in [router("a,b", 1), router("b,a", 2)] {
            let ctx = sent_before(&mark, "[0,1]");
            let Outcome::Success { body, .. } = now.handle(event(&[&key]), &ctx).await else {
                panic!("no publish should have been attempted")
            };
            assert_eq!(body["already_published"], 2);
        }
        // Positions whose pairs are not these (the digest differs) are forgotten: published
        // again (here attempted: a test context cannot publish).
        let ctx = sent_before(&mark.replace("pairs=", "pairs=0"), "[0,1]");
        let out = r.handle(event(&[&key]), &ctx).await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("queue `a`")),
            "{out:?}"
        );
        assert!(
            ctx.retry_headers()
                .iter()
                .any(|(k, v)| k == SENT_HEADER && v == "[]"),
            "{:?}",
            ctx.retry_headers()
        );
    }

    /// Positions kept under the same configuration but over other pairs — a release
    /// that accepts a record the one that wrote them did not — are forgotten: kept, the
    /// first id's pairs were taken as sent (never sent) and the second's sent twice.
    #[tokio::test]
    async fn sent_positions_over_other_pairs_are_forgotten() {
        let r = router("a,b", 1);
        let earlier = "00007bd0-2d1c-4865-af09-80bc00180312".to_string();
        // Written by an attempt that accepted only ID: positions 0 and 1 are ID's.
        let id = ID.to_string();
        let ctx = sent_before(&r.legacy_mark(&[(&id, vec!["a", "b"])]), "[0,1]");
        let keys = [
            format!("v2/raw_crash/000/20180312/{earlier}"),
            format!("v2/raw_crash/000/20180313/{ID}"),
        ];
        let out = r.handle(event(&[&keys[0], &keys[1]]), &ctx).await;
        assert!(matches!(&out, Outcome::Retry(_)), "{out:?}");
        assert!(
            ctx.retry_headers()
                .iter()
                .any(|(k, v)| k == SENT_HEADER && v == "[]"),
            "{:?}",
            ctx.retry_headers()
        );
    }

    /// The header as a retry of this router writes it: each destination's mark (slot,
    /// digest of its list) with the positions of its list that are sent.
    fn sent_to(dests: &[(u64, &[&str], &str, &str)]) -> MessageContext {
        let mut items = Vec::new();
        for (slot, ids, queue, positions) in dests {
            let digest = list_digest(ids.iter().copied());
            items.push(json!(format!("to {slot} {digest} {queue}")));
            items.push(serde_json::from_str(positions).unwrap());
        }
        let mut ctx = MessageContext::for_test("s3-events", "k", 1);
        let mut h = FieldTable::default();
        let text = Value::Array(items).to_string();
        h.insert(
            SENT_HEADER.into(),
            AMQPValue::LongString(text.as_str().into()),
        );
        ctx.headers = h;
        ctx
    }

    fn written_sent(ctx: &MessageContext) -> Vec<Value> {
        let (_, v) = ctx
            .retry_headers()
            .into_iter()
            .find(|(k, _)| k == SENT_HEADER)
            .expect("progress written");
        serde_json::from_str(&v).unwrap()
    }

    /// A queue added (or a misspelled one corrected) between attempts leaves the other
    /// queues' progress alone: the retry or replay publishes only to the new queue.
    #[tokio::test]
    async fn a_queue_added_between_attempts_keeps_the_others_progress() {
        let key = format!("v2/raw_crash/000/20180313/{ID}");
        // Written when the queues were `a,typo`: ID went to `a`.
        let ctx = sent_to(&[(0, &[ID], "a", "\"0\"")]);
        let out = router("a,b", 1).handle(event(&[&key]), &ctx).await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("queue `b`")),
            "`a` skipped, `b` attempted: {out:?}"
        );
        // Nothing changed: the header is carried as it came.
        assert!(ctx.retry_headers().iter().all(|(k, _)| k != SENT_HEADER));
        // With `a` done and `b` done under its own mark, nothing is left.
        let ctx = sent_to(&[(0, &[ID], "a", "\"0\""), (1, &[ID], "b", "\"4294967296\"")]);
        let Outcome::Success { body, .. } = router("b,a", 1).handle(event(&[&key]), &ctx).await
        else {
            panic!("nothing to publish, whatever the queues' order")
        };
        assert_eq!(body["already_published"], 2);
    }

    /// Only the queue whose list of ids changed (its throttle, the seed) has its
    /// positions forgotten and sent again; the other queue's are kept.
    #[tokio::test]
    async fn a_queue_whose_list_changed_is_sent_again_alone() {
        let key = format!("v2/raw_crash/000/20180313/{ID}");
        let other = "00007bd0-2d1c-4865-af09-80bc00180312";
        // `a` had ID, `b` had another id at its position 0: another list.
        let ctx = sent_to(&[
            (0, &[ID], "a", "\"0\""),
            (1, &[other], "b", "\"4294967296\""),
        ]);
        let out = router("a,b", 1).handle(event(&[&key]), &ctx).await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("queue `b`")),
            "{out:?}"
        );
        let digest = list_digest([ID].into_iter());
        assert_eq!(
            written_sent(&ctx),
            [json!(format!("to 0 {digest} a")), json!("0")],
            "`b`'s mark and position forgotten, `a`'s kept"
        );
    }

    /// An earlier release's header (positions over all pairs) is carried over to the
    /// queues' own positions under the same routing.
    #[tokio::test]
    async fn an_earlier_releases_positions_are_carried_over() {
        let r = router("a,b", 1);
        let key = format!("v2/raw_crash/000/20180313/{ID}");
        let id = ID.to_string();
        // Pair 0 (ID to a) sent, pair 1 (ID to b) not.
        let ctx = sent_before(&r.legacy_mark(&[(&id, vec!["a", "b"])]), "\"0\"");
        let out = r.handle(event(&[&key]), &ctx).await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("queue `b`")),
            "`a` skipped: {out:?}"
        );
        let digest = list_digest([ID].into_iter());
        assert_eq!(
            written_sent(&ctx),
            [json!(format!("to 0 {digest} a")), json!("0")]
        );
    }

    /// Each pair an earlier build's positions name is carried over to its queue's own
    /// position: two ids to two queues, all but the last pair sent.
    #[tokio::test]
    async fn an_earlier_builds_positions_are_carried_to_each_queues_own() {
        let r = router("a,b", 1);
        let (first, second) = (
            ID.to_string(),
            "00007bd0-2d1c-4865-af09-80bc00180312".to_string(),
        );
        let keys = [
            format!("v2/raw_crash/000/20180313/{first}"),
            format!("v2/raw_crash/000/20180312/{second}"),
        ];
        let pairs = [(&first, vec!["a", "b"]), (&second, vec!["a", "b"])];
        // Pairs 0-2: first to a, first to b, second to a.
        let ctx = sent_before(&r.legacy_mark(&pairs), "[0,2]");
        let out = r.handle(event(&[&keys[0], &keys[1]]), &ctx).await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains(&format!("{second} to queue `b`"))),
            "only the last pair is left: {out:?}"
        );
    }

    /// A dead letter an earlier build wrote is read under the routing it names: replayed
    /// after a misspelled queue was corrected, the queue that had its id is skipped.
    #[tokio::test]
    async fn an_earlier_builds_dead_letter_is_replayed_after_a_queue_is_corrected() {
        let key = format!("v2/raw_crash/000/20180313/{ID}");
        let id = ID.to_string();
        let before = router("a,typo", 1);
        // ID went to `a`, not to `typo`.
        let ctx = sent_before(&before.legacy_mark(&[(&id, vec!["a", "typo"])]), "\"0\"");
        let out = router("a,b", 1).handle(event(&[&key]), &ctx).await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("queue `b`")),
            "`a` skipped: {out:?}"
        );
        // Under another accept digit the positions name other pairs: forgotten.
        let ctx = sent_before(
            &before
                .legacy_mark(&[(&id, vec!["a", "typo"])])
                .replace("accept=0", "accept=1"),
            "\"0\"",
        );
        let out = router("a,b", 1).handle(event(&[&key]), &ctx).await;
        assert!(
            matches!(&out, Outcome::Retry(m) if m.contains("queue `a`")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn already_published_queues_are_skipped() {
        let r = router("a,b", 1);
        let mut ctx = MessageContext::for_test("s3-events", "k", 1);
        let mut h = FieldTable::default();
        let both = format!(r#"["{ID} a","{ID} b"]"#);
        h.insert(
            PUBLISHED_HEADER.into(),
            AMQPValue::LongString(both.as_str().into()),
        );
        ctx.headers = h;
        let key = format!("v2/raw_crash/000/20180313/{ID}");
        let Outcome::Success { body, .. } = r.handle(event(&[&key]), &ctx).await else {
            panic!("no publish should have been attempted")
        };
        assert_eq!(body["already_published"], 2);
        assert_eq!(body["deliveries"], json!({"a": [ID], "b": [ID]}));
    }

    /// A notification of many crash ids lists at most [`MAX_LISTED`] of them in its summary
    /// (and per queue), counting the rest: whole, the summary outgrew what the broker takes.
    #[tokio::test]
    async fn a_summary_lists_a_bounded_number_of_crash_ids_and_counts_the_rest() {
        let r = router("a,b", 1);
        let ids = ids(3000);
        let keys: Vec<String> = ids
            .iter()
            .map(|id| format!("v2/raw_crash/000/20180313/{id}"))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        // Every delivery already made by an earlier attempt: nothing is published here.
        let marks: Vec<String> = ids
            .iter()
            .flat_map(|id| [format!("{id} a"), format!("{id} b")])
            .collect();
        let mut ctx = MessageContext::for_test("s3-events", "k", 1);
        ctx.headers.insert(
            PUBLISHED_HEADER.into(),
            AMQPValue::LongString(json!(marks).to_string().as_str().into()),
        );
        let Outcome::Success { body, .. } = r.handle(event(&keys), &ctx).await else {
            panic!("no publish should have been attempted")
        };
        assert_eq!(body["already_published"], 6000);
        assert_eq!(body["counts"]["accepted"], 3000);
        assert_eq!(body["accepted"].as_array().map(Vec::len), Some(MAX_LISTED));
        assert_eq!(body["accepted_total"], 3000);
        for q in ["a", "b"] {
            assert_eq!(
                body["deliveries"][q].as_array().map(Vec::len),
                Some(MAX_LISTED)
            );
            assert_eq!(body["deliveries_total"][q], 3000);
        }
        assert!(body.to_string().len() < 256 * 1024, "bounded");
    }

    fn ids(n: u32) -> Vec<String> {
        (0..n)
            .map(|i| format!("{i:08x}-2d1c-4865-af09-80bc00180313"))
            .collect()
    }

    #[test]
    fn seeded_selection_is_reproducible() {
        let picks = |seed| {
            let r = router("a,15:b,0:c,100:d", seed);
            ids(2000)
                .iter()
                .map(|id| r.select_queues(id))
                .collect::<Vec<_>>()
        };
        let p = picks(99);
        assert_eq!(p, picks(99));
        assert!(
            p.iter()
                .all(|v| v.contains(&"a".to_string()) && v.contains(&"d".to_string()))
        );
        assert!(p.iter().all(|v| !v.contains(&"c".to_string())));
        let b = p.iter().filter(|v| v.contains(&"b".to_string())).count();
        assert!((200..=400).contains(&b), "about 15% of 2000, got {b}");
    }

    #[test]
    fn two_instances_choose_the_same_queues_for_an_id() {
        // Instance A has already drawn for other ids (its history differs from B's); a
        // redelivery of the same id on either must still choose the same queues.
        for seed in [None, Some(7)] {
            let spec = parse_queues("a,15:b,50:c").unwrap();
            let a = CrashRouter::new(spec.clone(), '0', '1', seed);
            let b = CrashRouter::new(spec, '0', '1', seed);
            let all = ids(500);
            for id in &all[..100] {
                a.select_queues(id);
            }
            let pa: Vec<_> = all.iter().rev().map(|id| a.select_queues(id)).collect();
            let pb: Vec<_> = all.iter().rev().map(|id| b.select_queues(id)).collect();
            assert_eq!(pa, pb, "seed {seed:?}");
            // And the draws really vary between ids (not one fixed choice).
            assert!(
                pa.iter().any(|v| v.contains(&"b".to_string())),
                "seed {seed:?}"
            );
            assert!(
                pa.iter().any(|v| !v.contains(&"b".to_string())),
                "seed {seed:?}"
            );
        }
        // Unset, the seed is the same fixed value in every process (two replicas compare
        // only in separate processes): a default drawn once per process passed the above.
        let spec = parse_queues("a,15:b,50:c").unwrap();
        let unset = CrashRouter::new(spec.clone(), '0', '1', None);
        let fixed = CrashRouter::new(spec, '0', '1', Some(0));
        for id in ids(500) {
            assert_eq!(unset.select_queues(&id), fixed.select_queues(&id), "{id}");
        }
    }

    /// A target queue that is the service's own or another service's (its input, a tier,
    /// its DLQ) or under `amq.` is refused naming the key.
    #[test]
    fn the_services_own_queues_and_amq_names_are_no_targets() {
        use framework::config::LoadOptions;
        let load = |q: &str| {
            framework::cli::load_config::<CrashRouterService>(
                &LoadOptions::isolated().set("crash_router.queues", q),
            )
        };
        for q in [
            "storagetier-crash-router",
            "socorro.normal,storagetier-crash-router-dlq",
            "15:amq.crashes",
            // Another service's queues (the section's default names and a renamed one).
            "socorro.normal,storagetier-project-ingest-dlq",
            "storagetier-online-archive",
            "storagetier-event-forwarder-retry-5000",
        ] {
            match load(q) {
                Err(e) => assert_eq!(e.key, "crash_router.queues", "{q}"),
                Ok(_) => panic!("{q} accepted"),
            }
        }
        assert!(load("socorro.normal,15:socorro.submitter").is_ok());
        let renamed = framework::cli::load_config::<CrashRouterService>(
            &LoadOptions::isolated()
                .set("snapshot_status.queue", "snapshots")
                .set("crash_router.queues", "snapshots-dlq"),
        );
        assert_eq!(renamed.expect_err("accepted").key, "crash_router.queues");
    }

    #[test]
    fn accept_digit_validation() {
        assert_eq!(digits("0").unwrap(), ('0', '1'));
        assert_eq!(digits("1").unwrap(), ('1', '0'));
        for bad in ["2", "", "01", "a"] {
            assert_eq!(digits(bad).unwrap_err().key, "crash_router.accept_digit");
        }
    }

    #[test]
    fn key_prefixes_validation() {
        let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            key_prefixes_of(&list(&[" v2/raw_crash/", "v1/raw_crash/ "])).unwrap(),
            list(&["v2/raw_crash/", "v1/raw_crash/"])
        );
        for bad in [&[][..], &[""], &["v2/raw_crash"], &["/v2/raw_crash/"]] {
            assert_eq!(
                key_prefixes_of(&list(bad)).unwrap_err().key,
                "crash_router.key_prefixes",
                "{bad:?}"
            );
        }
    }
}

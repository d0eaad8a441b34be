//! The crash-router processor and its `Service` wiring.

use std::collections::BTreeMap;

use framework::config::{Config, ConfigError};
use framework::{BoxError, MessageContext, MessageProcessor, Outcome, Publication, Service};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::rules::{Record, classify};
use crate::spec::{DEFAULT_SEED, QueueSpec, parse_queues, selected};

/// Exchange the S3 notifications arrive on.
pub const INPUT_EXCHANGE: &str = "s3-events";
/// Success messages go out as `<this>.success`.
pub const OUTPUT_ROUTING_KEY: &str = "storagetier.crashrouter.crash";
/// Retry header: the `<crash id> <queue>` pairs already published (JSON array).
pub const PUBLISHED_HEADER: &str = "x-crash-router-published";
/// Counter of S3 records (and throttled deliveries) by result.
pub const RECORDS_METRIC: &str = "storagetier_crash_router_records_total";

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
    accept: char,
    defer: char,
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
        Self {
            queues,
            accept,
            defer,
            seed: seed.unwrap_or(DEFAULT_SEED),
        }
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

    async fn handle(&self, input: Value, ctx: &MessageContext) -> Outcome {
        // S3 sends this to a notification's destination whenever the bucket's notification
        // configuration is saved: not an event, nothing wrong with it.
        if input.get("Event").and_then(Value::as_str) == Some("s3:TestEvent") {
            return Outcome::drop("S3 test event (sent when notifications are configured)");
        }
        let Some(records) = input.get("Records").and_then(Value::as_array) else {
            let what = match &input {
                Value::Object(_) => "an object without a `Records` array",
                Value::Array(_) => "an array",
                Value::String(_) => "a string",
                Value::Number(_) => "a number",
                Value::Bool(_) => "a boolean",
                Value::Null => "null",
            };
            return Outcome::permanent(format!(
                "expected an S3 event notification (an object with a `Records` array), got {what}"
            ));
        };

        let mut counts = Counts::default();
        let mut accepted: Vec<String> = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let rec = classify(r, self.accept, self.defer);
            match &rec {
                Record::Accepted(id) => {
                    counts.accepted += 1;
                    if !accepted.contains(id) {
                        accepted.push(id.clone());
                    }
                }
                Record::Deferred(id) => {
                    counts.deferred += 1;
                    tracing::debug!(record = i, crash_id = %id, "deferred crash, skipped");
                }
                Record::Junk(why) => {
                    counts.junk += 1;
                    tracing::info!(record = i, reason = %why, "junk record, skipped");
                }
                Record::Ignored(why) => {
                    counts.ignored += 1;
                    tracing::debug!(record = i, reason = %why, "record ignored");
                }
            }
        }

        // The throttle draw is a function of seed, queue and crash id, so a retry, a
        // redelivery and another instance all choose the same queues; a retry skips the
        // pairs an earlier attempt already published.
        let mut published = framework::batch::Progress::resume(ctx, PUBLISHED_HEADER);
        let mut deliveries: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut already = 0u64;
        for id in &accepted {
            let picks = self.select_queues(id);
            for q in self.queues.iter().filter(|q| picks.contains(&q.name)) {
                // A crash id is fixed-length ASCII without spaces: the mark is unambiguous.
                let mark = format!("{id} {}", q.name);
                if published.is_done(&mark) {
                    already += 1;
                } else if let Err(e) = ctx
                    .publish(Publication::text("", &q.name, id.as_str()).mandatory())
                    .await
                {
                    return Outcome::retry(format!(
                        "publishing crash id {id} to queue `{}` failed: {e}",
                        q.name
                    ));
                } else {
                    published.mark_done(mark);
                    tracing::info!(crash_id = %id, queue = %q.name, "crash id published");
                }
                deliveries
                    .entry(q.name.clone())
                    .or_default()
                    .push(id.clone());
            }
            let not_picked = self.queues.len().saturating_sub(
                self.queues
                    .iter()
                    .filter(|q| picks.contains(&q.name))
                    .count(),
            );
            counts.throttled += not_picked as u64;
        }

        for (label, n) in [
            ("accepted", counts.accepted),
            ("deferred", counts.deferred),
            ("junk", counts.junk),
            ("ignored", counts.ignored),
            ("throttled", counts.throttled),
        ] {
            if n > 0 {
                metrics::counter!(RECORDS_METRIC, "result" => label).increment(n);
            }
        }

        Outcome::success(json!({
            "records": records.len(),
            "accepted": accepted,
            "deliveries": deliveries,
            "already_published": already,
            "counts": counts,
        }))
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
        queues_of(&cfg.settings.queues)?;
        digits(&cfg.settings.accept_digit)?;
        Ok(())
    }

    async fn processor(cfg: &Config<CrashRouterSettings>) -> Result<CrashRouter, BoxError> {
        let queues = queues_of(&cfg.settings.queues)?;
        let (accept, defer) = digits(&cfg.settings.accept_digit)?;
        tracing::info!(
            queues = %queues.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            accept_digit = %accept,
            seeded = cfg.settings.seed.is_some(),
            "crash router configured"
        );
        Ok(CrashRouter::new(queues, accept, defer, cfg.settings.seed))
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
                .all(|(k, _)| k != PUBLISHED_HEADER),
            "nothing was published"
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
    }

    #[test]
    fn accept_digit_validation() {
        assert_eq!(digits("0").unwrap(), ('0', '1'));
        assert_eq!(digits("1").unwrap(), ('1', '0'));
        for bad in ["2", "", "01", "a"] {
            assert_eq!(digits(bad).unwrap_err().key, "crash_router.accept_digit");
        }
    }
}

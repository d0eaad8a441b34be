//! deploy/: the Grafana dashboard and the Prometheus alerting rules on-call watches the
//! services with (issue 15 item 6). The rules pass `promtool check rules` and their unit
//! tests, every dashboard expression is valid PromQL, every alert has a severity, a summary,
//! a description and a runbook section in docs/operations.md, and every `storagetier_*`
//! metric (and `outcome`/`result` value) the dashboard and the rules query is served on
//! `/metrics` by real running services: echo's runtime, crash-router and event-forwarder.
//!
//! promtool comes from Debian's `prometheus` package (`scripts/test` installs it); without it
//! these tests fail, they never skip.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crash_router::CrashRouterService;
use event_forwarder::EventForwarderService;
use framework::lapin::BasicProperties;
use framework::lapin::options::QueueDeleteOptions;
use framework::testing::*;
use framework::{MessageContext, Outcome, Publication};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RULES: &str = "deploy/prometheus/storagetier-rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/storagetier-rules.test.yml";
const PROMETHEUS_CONFIG: &str = "deploy/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/storagetier.json";
const RUNBOOK: &str = "docs/operations.md";

/// Gauge of ready messages in `Q`, each `Q-retry-<ms>` and `Q-dlq` (issue 15 item 5). It is
/// being added to the framework beside this test; until `framework::telemetry` has the
/// constant, its name is spelled here.
const QUEUE_MESSAGES: &str = "storagetier_queue_messages";

/// Every metric of the framework's runtime: the dashboard shows each of them.
fn framework_metrics() -> Vec<&'static str> {
    use framework::telemetry as t;
    vec![
        t::MESSAGES_TOTAL,
        t::HANDLER_SECONDS,
        t::IN_FLIGHT,
        t::CONCURRENCY,
        t::CONNECTED,
        t::CONNECTION_BLOCKED,
        t::PUBLISH_FAILURES_TOTAL,
        t::RECONNECTS_TOTAL,
        QUEUE_MESSAGES,
    ]
}

/// Alerts on-call needs (issue 15 item 6): each must stay in the rules.
const REQUIRED_ALERTS: &[&str] = &[
    "StoragetierTargetDown",
    "StoragetierNotConnected",
    "StoragetierRestarting",
    "StoragetierConnectionFlapping",
    "StoragetierBrokerBlocking",
    "StoragetierDeadLettersGrowing",
    "StoragetierRetryRateHigh",
    "StoragetierHandlerLatencyHigh",
    "StoragetierPublishFailures",
    "StoragetierEndpointFailing",
];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn rules() -> serde_norway::Value {
    serde_norway::from_str(&read(RULES)).unwrap_or_else(|e| panic!("{RULES} is YAML: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD} is JSON: {e}"))
}

/// Runs promtool in the repository root; fails the test (never skips) when it is missing.
fn promtool(args: &[&str]) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo())
        .output_within(WAIT)
        .unwrap_or_else(|e| {
            panic!(
                "promtool could not be run ({e}): install Debian's `prometheus` package \
                 (apt-get install -y prometheus; scripts/test does it)"
            )
        });
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every string in a JSON document.
fn json_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|v| json_strings(v, out)),
        Value::Object(o) => o.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

/// Every string in a YAML document.
fn yaml_strings(v: &serde_norway::Value, out: &mut Vec<String>) {
    use serde_norway::Value as Y;
    match v {
        Y::String(s) => out.push(s.clone()),
        Y::Sequence(a) => a.iter().for_each(|v| yaml_strings(v, out)),
        Y::Mapping(m) => m.values().for_each(|v| yaml_strings(v, out)),
        Y::Tagged(t) => yaml_strings(&t.value, out),
        _ => {}
    }
}

/// storagetier's metric names are `[a-z0-9_]` (no recording-rule colons): prose such as
/// "storagetier_connected: 1 while …" names the metric without its colon.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `storagetier_*` metric names in `text` (whole identifiers only).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("storagetier_") {
        if text[..i].chars().next_back().is_some_and(is_name_char) {
            continue;
        }
        let name: String = text[i..].chars().take_while(|c| is_name_char(*c)).collect();
        names.insert(name);
    }
    names
}

/// Values an expression selects for `label` with `=` or `=~` (plain alternatives only;
/// `!=` and `!~` are not selections).
fn label_values(text: &str, label: &str) -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    for (i, _) in text.match_indices(label) {
        if text[..i].chars().next_back().is_some_and(is_name_char) {
            continue;
        }
        let rest = text[i + label.len()..].trim_start();
        let Some(rest) = rest
            .strip_prefix("=~")
            .or_else(|| rest.strip_prefix('='))
            .map(str::trim_start)
        else {
            continue;
        };
        let Some(quoted) = rest.strip_prefix('"') else {
            continue;
        };
        let Some(end) = quoted.find('"') else {
            continue;
        };
        for v in quoted[..end].split('|') {
            // A regular expression other than plain alternatives is not checked.
            if !v.is_empty() && !v.contains(|c| ".*+?()[]{}^$\\".contains(c)) {
                values.insert(v.to_string());
            }
        }
    }
    values
}

/// What a `/metrics` page serves: sample names, and every value of every label.
#[derive(Debug, Default)]
struct Served {
    names: BTreeSet<String>,
    labels: BTreeMap<String, BTreeSet<String>>,
}

fn parse_exposition(text: &str) -> Served {
    let mut s = Served::default();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name: String = line.chars().take_while(|c| is_name_char(*c)).collect();
        if let Some(body) = line[name.len()..]
            .strip_prefix('{')
            .and_then(|r| r.split_once('}'))
            .map(|(b, _)| b)
        {
            for pair in body.split("\",") {
                if let Some((k, v)) = pair.split_once("=\"") {
                    s.labels
                        .entry(k.trim().to_string())
                        .or_default()
                        .insert(v.trim_end_matches('"').to_string());
                }
            }
        }
        s.names.insert(name);
    }
    s
}

/// What the dashboard and the rules query.
#[derive(Debug, Default)]
struct Queried {
    /// metric name → where it is used
    names: BTreeMap<String, BTreeSet<&'static str>>,
    /// (label, value) → where it is used
    values: BTreeMap<(String, String), BTreeSet<&'static str>>,
}

impl Queried {
    fn add(&mut self, file: &'static str, text: &str) {
        for n in metric_names(text) {
            self.names.entry(n).or_default().insert(file);
        }
        if text.contains("storagetier_") {
            for label in ["outcome", "result"] {
                for v in label_values(text, label) {
                    self.values
                        .entry((label.to_string(), v))
                        .or_default()
                        .insert(file);
                }
            }
        }
    }

    fn of_files() -> Queried {
        let mut q = Queried::default();
        let mut strings = Vec::new();
        json_strings(&dashboard(), &mut strings);
        strings.iter().for_each(|s| q.add(DASHBOARD, s));
        let mut strings = Vec::new();
        yaml_strings(&rules(), &mut strings);
        strings.iter().for_each(|s| q.add(RULES, s));
        q
    }

    /// What is queried but not served, described for the failure message.
    fn unserved(&self, served: &Served) -> Vec<String> {
        let mut missing = Vec::new();
        for (n, files) in &self.names {
            if !served.names.contains(n) {
                let hint = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| n.strip_suffix(s))
                    .map(|base| format!(" (histogram {base})"))
                    .unwrap_or_default();
                missing.push(format!("metric {n}{hint} (used in {files:?})"));
            }
        }
        for ((label, v), files) in &self.values {
            if !served.labels.get(label).is_some_and(|vs| vs.contains(v)) {
                missing.push(format!("{label}=\"{v}\" (used in {files:?})"));
            }
        }
        missing
    }
}

fn dashboard_panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// GitHub's anchor of a Markdown heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    promtool(&["check", "rules", RULES]);
    // Each alert fires on the trouble it names (after its `for`) and not on healthy series.
    promtool(&["test", "rules", RULE_TESTS]);
    promtool(&["check", "config", PROMETHEUS_CONFIG]);
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook_section() {
    let ops = read(RUNBOOK);
    let anchors: BTreeSet<String> = ops
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|l| slug(l.trim_start_matches('#')))
        .collect();
    let doc = rules();
    let mut alerts = BTreeSet::new();
    for group in doc["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts.insert(name.to_string());
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: severity label critical|warning|info, got {severity:?}"
            );
            for a in ["summary", "description"] {
                assert!(
                    rule["annotations"][a]
                        .as_str()
                        .is_some_and(|s| !s.trim().is_empty()),
                    "{name}: a {a} annotation"
                );
            }
            let runbook = rule["annotations"]["runbook"].as_str().unwrap_or_default();
            let anchor = runbook
                .strip_prefix(&format!("{RUNBOOK}#"))
                .unwrap_or_else(|| panic!("{name}: runbook {runbook:?} points into {RUNBOOK}"));
            assert!(
                anchors.contains(anchor),
                "{name}: runbook anchor #{anchor} is a heading of {RUNBOOK}"
            );
        }
    }
    for a in REQUIRED_ALERTS {
        assert!(alerts.contains(*a), "alert {a} in {RULES}");
    }
}

#[test]
fn dashboard_is_importable_and_its_expressions_are_valid_promql() {
    let d = dashboard();
    assert!(d["uid"].is_string() && d["title"].is_string());
    let vars: BTreeMap<&str, &Value> = d["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .map(|v| (v["name"].as_str().expect("variable name"), v))
        .collect();
    assert_eq!(vars["DS_PROMETHEUS"]["type"], "datasource");
    assert_eq!(vars["DS_PROMETHEUS"]["query"], "prometheus");
    for v in ["service", "queue"] {
        assert_eq!(vars[v]["type"], "query", "${v} variable");
    }
    let ds = json!({"type": "prometheus", "uid": "${DS_PROMETHEUS}"});
    // Grafana's variables replaced as it would before sending the query.
    let subst = |e: &str| {
        e.replace("$__rate_interval", "5m")
            .replace("$service", ".+")
            .replace("$queue", ".+")
    };
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for p in dashboard_panels(&d) {
        assert!(
            ids.insert(p["id"].as_u64().expect("panel id")),
            "unique ids"
        );
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().expect("panel title");
        assert_eq!(
            p["datasource"], ds,
            "{title}: the ${{DS_PROMETHEUS}} data source"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} queries something");
        for t in targets {
            assert_eq!(t["datasource"], ds, "{title}: target data source");
            let e = t["expr"].as_str().expect("expr");
            assert!(!subst(e).contains('$'), "{title}: unknown variable in {e}");
            exprs.push((title.to_string(), subst(e)));
        }
    }
    // promtool parses PromQL only in rule files: one recording rule per expression.
    let groups = json!({"groups": [{"name": "dashboard", "rules": exprs.iter().enumerate()
        .map(|(i, (_, e))| json!({"record": format!("dashboard:expr_{i}"), "expr": e}))
        .collect::<Vec<_>>()}]});
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-exprs.yml");
    std::fs::write(&file, serde_norway::to_string(&groups).unwrap()).unwrap();
    promtool(&["check", "rules", file.to_str().unwrap()]);
    // The dashboard shows every metric of the framework's runtime.
    let q = Queried::of_files();
    let shown: BTreeSet<String> = q
        .names
        .iter()
        .filter(|(_, f)| f.contains(DASHBOARD))
        .map(|(n, _)| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| n.strip_suffix(s))
                .unwrap_or(n)
                .to_string()
        })
        .collect();
    for m in framework_metrics() {
        assert!(shown.contains(m), "{DASHBOARD} has a panel on {m}");
    }
}

#[test]
fn the_served_check_catches_a_typo_and_a_metric_no_longer_served() {
    let served = parse_exposition(
        "# TYPE storagetier_messages_total counter\n\
         storagetier_messages_total{queue=\"q\",outcome=\"success\"} 1\n\
         storagetier_handler_seconds_bucket{queue=\"q\",le=\"+Inf\"} 1\n\
         storagetier_connected 1\n",
    );
    let mut ok = Queried::default();
    ok.add(RULES, "storagetier_connected == 0");
    ok.add(DASHBOARD, "storagetier_connected: 1 while connected");
    ok.add(
        RULES,
        "rate(storagetier_messages_total{outcome=~\"success\"}[5m]) and \
         histogram_quantile(0.99, rate(storagetier_handler_seconds_bucket[5m]))",
    );
    assert_eq!(ok.unserved(&served), Vec::<String>::new());
    for bad in [
        "storagetier_conected == 0",
        "storagetier_handler_seconds > 1",
        "rate(storagetier_messages_total{outcome=\"dead-letter\"}[5m])",
        "rate(storagetier_messages_total{outcome=~\"success|retry\"}[5m])",
        "storagetier_in_flight > 0",
    ] {
        let mut q = Queried::default();
        q.add(RULES, bad);
        assert_eq!(q.unserved(&served).len(), 1, "{bad} is reported");
    }
}

/// `GET path` on `addr`: (status, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Polls `/metrics` until `done` holds for what it serves; panics naming `what` after WAIT.
async fn metrics_until(
    addr: std::net::SocketAddr,
    what: &str,
    done: impl Fn(&Served) -> Vec<String>,
) -> Served {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let served = match http_get(addr, "/metrics").await {
            Some((200, body)) => parse_exposition(&body),
            _ => Served::default(),
        };
        let missing = done(&served);
        if missing.is_empty() {
            return served;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not served on /metrics:\n  {}",
            missing.join("\n  ")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_query_is_served() {
    let queried = Queried::of_files();
    for m in framework_metrics() {
        let used = queried.names.keys().any(|n| n.starts_with(m));
        assert!(used, "{m} is queried by the dashboard or the rules");
    }
    framework::telemetry::metrics_handle();

    // The framework's runtime, serving HTTP as every service does, with a processor that
    // produces each outcome on demand.
    let q = unique("observe");
    let _gone = Cleanup::service(&q, &[200, 400]);
    let nowhere = unique("nowhere");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let mut cfg = config(&q, &[("retry.max_attempts", "2")]);
    cfg.service.http_listen = addr.to_string();
    let processor = FnProcessor(move |v: Value, ctx: &MessageContext| {
        match v["do"].as_str().unwrap_or_default() {
            "retry" if ctx.attempt == 0 => Outcome::retry("observability test"),
            "drop" => Outcome::drop("observability test"),
            "dead" => Outcome::permanent("observability test"),
            // A mandatory extra that reaches no queue: a publish failure, then retried.
            "unroutable" => {
                Outcome::success(&v)
                    .with_extra([Publication::text("", &nowhere, v.to_string()).mandatory()])
            }
            _ => Outcome::success(v),
        }
    });
    let pc =
        framework::ProcessorConfiguration::new(&format!("{q}-in"), "test.#", "test.out", processor);
    let shutdown = framework::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let (t, cfg2, name) = (shutdown.clone(), cfg.clone(), q.clone());
    let task = tokio::spawn(async move {
        framework::cli::run_processor(&name, &cfg2, pc, t)
            .await
            .is_ok()
    });
    let deadline = tokio::time::Instant::now() + WAIT;
    while !matches!(http_get(addr, "/readyz").await, Some((200, _))) {
        assert!(tokio::time::Instant::now() < deadline, "echo became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_c, ch) = test_channel().await;
    for what in ["success", "retry", "drop", "dead", "unroutable"] {
        let body = json!({"do": what}).to_string();
        publish(
            &ch,
            &format!("{q}-in"),
            "test.m",
            body.as_bytes(),
            BasicProperties::default(),
        )
        .await;
    }
    let outcomes = ["success", "retry", "dead_letter", "drop"];
    metrics_until(addr, "the runtime's outcomes", |s| {
        let mut missing = Vec::new();
        for o in outcomes {
            let seen = s.labels.get("outcome").is_some_and(|v| v.contains(o));
            if !seen {
                missing.push(format!("outcome=\"{o}\""));
            }
        }
        if !s
            .names
            .contains(framework::telemetry::PUBLISH_FAILURES_TOTAL)
        {
            missing.push(framework::telemetry::PUBLISH_FAILURES_TOTAL.into());
        }
        missing
    })
    .await;
    // Losing the queue makes the runtime recover (storagetier_reconnects_total).
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the service's queue");

    // Adapters with metrics of their own, in this process (one registry).
    let data = tempfile::tempdir().unwrap();
    let crash = Harness::start_service::<CrashRouterService>(service_config::<CrashRouterService>(
        data.path(),
        &[],
    ))
    .await;
    // Throttle digit 1: deferred, so no destination queue is needed.
    let record = json!({"eventName": "ObjectCreated:Put", "s3": {"object": {"key":
        "v2/raw_crash/000/20180313/00007bd0-2d1c-4865-af09-80bc01180313"}}});
    crash
        .publish(
            "s3.object.created",
            json!({"Records": [record]}).to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let endpoint = wiremock::MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&endpoint)
        .await;
    let url = format!("{}/events", endpoint.uri());
    let forwarder =
        Harness::start_service::<EventForwarderService>(service_config::<EventForwarderService>(
            data.path(),
            &[("event_forwarder.endpoint", &url)],
        ))
        .await;
    forwarder
        .publish(
            "member.registered",
            json!({"type": "member-registered", "id": "1"})
                .to_string()
                .as_bytes(),
            BasicProperties::default(),
        )
        .await;

    // Everything the dashboard and the rules query is now on /metrics.
    let served = metrics_until(addr, "queried by the dashboard or the rules", |s| {
        queried.unserved(s)
    })
    .await;
    // The adapters' own metrics are on the dashboard, under the names their code uses.
    for m in [
        crash_router::router::RECORDS_METRIC,
        event_forwarder::service::POSTS_METRIC,
    ] {
        assert!(served.names.contains(m), "{m} served");
        assert!(queried.names.contains_key(m), "{m} on the dashboard");
    }
    drop(crash);
    drop(forwarder);
    shutdown.cancel();
    assert!(
        tokio::time::timeout(WAIT, task).await.unwrap().unwrap(),
        "the runtime stopped cleanly"
    );
}

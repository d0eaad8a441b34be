//! A downstream outage (object store, database, HTTP endpoint) that outlasts several retry
//! tiers: the messages wait in the retry queues, nothing is dead-lettered (max_attempts is
//! far away), and every one succeeds once the downstream is back. Each test prints one row
//! for docs/reliability.md.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_forwarder::EventForwarderService;
use framework::headers as h;
use framework::lapin::message::Delivery;
use framework::lapin::{BasicProperties, Consumer};
use framework::testing::*;
use online_archive::OnlineArchive;
use project_ingest::ProjectIngest;
use project_ingest::store::Store;
use serde_json::json;
use storage::testing::{MotoServer, put_online_file, sweeper_message};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

/// Messages per test.
const N: usize = 20;

/// Three fast tiers, and so many attempts that nothing may legitimately be dead-lettered.
const RETRY: [(&str, &str); 2] = [
    ("retry.delays_ms", "[100, 200, 400]"),
    ("retry.max_attempts", "1000"),
];

/// One delivery seen on a watcher queue.
#[derive(Clone)]
struct Seen {
    /// `x-in-response-to` (outputs) or the message id (retry hops, the barrier).
    id: String,
    routing_key: String,
    retry_count: i64,
    last_error: String,
    at: Instant,
}

/// Collects a consumer's deliveries in the background (no delivery is lost to a
/// cancelled wait); aborted on drop.
struct Collector {
    log: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn spawn(mut c: Consumer) -> Self {
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = Arc::clone(&log);
        let task = tokio::spawn(async move {
            while let Some(d) = next_within(&mut c, Duration::from_secs(3600)).await {
                let seen = Seen {
                    id: id_of(&d),
                    routing_key: d.routing_key.to_string(),
                    retry_count: int_header(&d, h::RETRY_COUNT).unwrap_or(0),
                    last_error: header(&d, h::LAST_ERROR).unwrap_or_default(),
                    at: Instant::now(),
                };
                l.lock().expect("collector lock").push(seen);
            }
        });
        Self { log, task }
    }

    fn all(&self) -> Vec<Seen> {
        self.log.lock().expect("collector lock").clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn id_of(d: &Delivery) -> String {
    header(d, h::IN_RESPONSE_TO)
        .or_else(|| d.properties.message_id().as_ref().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Watchers on the retry tiers (`Q-retry` is a direct exchange keyed by the delay in
/// ms) and on the output exchange.
struct Watch {
    tiers: Collector,
    out: Collector,
    delays: Vec<u64>,
}

/// What one outage run measured.
struct Figures {
    tiers: usize,
    hops: usize,
    max_retry_count: i64,
    duplicated: usize,
    recovered_s: f64,
}

impl Watch {
    async fn start(hs: &Harness) -> Watch {
        let ex = format!("{}-retry", hs.q);
        let tiers = hs.watch_first_retry().await;
        for d in &hs.delays[1..] {
            hs.ch
                .queue_bind(
                    tiers.queue(),
                    ex.as_str().into(),
                    d.to_string().as_str().into(),
                    Default::default(),
                    Default::default(),
                )
                .await
                .expect("bind the tier watcher");
        }
        Watch {
            tiers: Collector::spawn(tiers),
            out: Collector::spawn(hs.watch_output().await),
            delays: hs.delays.clone(),
        }
    }

    /// Waits until every id has gone through every retry tier; meanwhile no success and
    /// no dead letter, and every hop's error names the downstream (`error_has`).
    async fn through_all_tiers(&self, hs: &Harness, ids: &[String], error_has: &str) {
        let tiers_of = |hops: &[Seen], id: &str| {
            hops.iter()
                .filter(|s| s.id == id)
                .map(|s| s.routing_key.clone())
                .collect::<BTreeSet<_>>()
                .len()
        };
        wait_until("every message through every retry tier", || {
            let hops = self.tiers.all();
            ids.iter()
                .all(|id| tiers_of(&hops, id) >= self.delays.len())
        })
        .await;
        for s in self.tiers.all() {
            assert!(
                s.last_error.contains(error_has),
                "hop error: {}",
                s.last_error
            );
        }
        assert!(self.out.all().is_empty(), "no success during the outage");
        assert_eq!(
            dlq_count(hs).await,
            0,
            "nothing dead-lettered during the outage"
        );
    }

    /// After the downstream is back (at `back`): waits until every id succeeded, stops the
    /// service (in-flight messages finish), then counts outputs up to a barrier published
    /// after the stop. Asserts nothing lost, nothing left queued, nothing dead-lettered.
    async fn recovery(&self, hs: &mut Harness, ids: &[String], back: Instant) -> Figures {
        wait_until("every message succeeded after the outage", || {
            let out = self.out.all();
            ids.iter().all(|id| out.iter().any(|s| &s.id == id))
        })
        .await;
        let out = self.out.all();
        let last_first = ids
            .iter()
            .filter_map(|id| out.iter().find(|s| &s.id == id).map(|s| s.at))
            .max()
            .expect("outputs");
        hs.stop().await;
        publish(
            &hs.ch,
            &hs.output_exchange,
            "outage.barrier",
            b"",
            BasicProperties::default().with_message_id("barrier".into()),
        )
        .await;
        wait_until("the barrier behind every output", || {
            self.out.all().iter().any(|s| s.id == "barrier")
        })
        .await;
        let mut queues = vec![hs.q.clone()];
        queues.extend(self.delays.iter().map(|d| format!("{}-retry-{d}", hs.q)));
        for q in queues {
            assert_eq!(ready_count(&hs.ch, &q).await, 0, "{q} is empty");
        }
        assert_eq!(dlq_count(hs).await, 0, "nothing dead-lettered");
        let mut per_id: HashMap<String, usize> = HashMap::new();
        for s in self.out.all().iter().filter(|s| s.id != "barrier") {
            assert!(ids.contains(&s.id), "output for an unknown id {:?}", s.id);
            *per_id.entry(s.id.clone()).or_default() += 1;
        }
        assert_eq!(per_id.len(), ids.len(), "lost 0");
        let hops = self.tiers.all();
        Figures {
            tiers: ids
                .iter()
                .map(|id| {
                    hops.iter()
                        .filter(|s| &s.id == id)
                        .map(|s| &s.routing_key)
                        .collect::<BTreeSet<_>>()
                        .len()
                })
                .min()
                .unwrap_or(0),
            hops: hops.len(),
            max_retry_count: hops.iter().map(|s| s.retry_count).max().unwrap_or(0),
            duplicated: per_id.values().map(|n| n - 1).sum(),
            recovered_s: last_first.saturating_duration_since(back).as_secs_f64(),
        }
    }
}

async fn dlq_count(hs: &Harness) -> u32 {
    ready_count(&hs.ch, &format!("{}-dlq", hs.q)).await
}

/// Publishes `(id, body)` pairs with the id as message id.
async fn send_all(hs: &Harness, key: &str, msgs: &[(String, Vec<u8>)]) {
    for (id, body) in msgs {
        hs.publish(
            key,
            body,
            BasicProperties::default().with_message_id(id.as_str().into()),
        )
        .await;
    }
}

fn ids(prefix: &str) -> Vec<String> {
    (0..N).map(|i| format!("{prefix}-{i:02}")).collect()
}

/// Prints the docs/reliability.md row.
fn row(downstream: &str, service: &str, f: &Figures, duplicated: usize) {
    println!(
        "hops {} (max x-retry-count {}), {} duplicate success outputs",
        f.hops, f.max_retry_count, f.duplicated
    );
    println!(
        "| {downstream} outage across {} retry tiers, {service} | sent {N} | lost 0 | duplicated {duplicated} | \
         recovered in {:.1} s after the downstream returned | dead-lettered 0 |",
        f.tiers, f.recovered_s
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_outage_across_retry_tiers_loses_nothing() {
    let bucket = "archive";
    let mut moto = MotoServer::start(bucket).await;
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg: Vec<(&str, &str)> = vec![
        ("online_archive.archive_url", "s3://archive/outage"),
        (
            "online_archive.archive_options.endpoint",
            moto.endpoint.as_str(),
        ),
        ("online_archive.archive_options.allow_http", "true"),
        ("online_archive.archive_options.access_key_id", "test"),
        ("online_archive.archive_options.secret_access_key", "test"),
        ("online_archive.archive_options.max_retries", "0"),
        ("online_archive.archive_options.retry_timeout_ms", "2000"),
    ];
    cfg.extend(RETRY);
    let mut hs =
        Harness::start_service::<OnlineArchive>(service_config::<OnlineArchive>(data.path(), &cfg))
            .await;
    let w = Watch::start(&hs).await;
    let ids = ids("file");
    let msgs: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| {
            let dir = put_online_file(
                data.path(),
                &format!("batch/{id}.bin"),
                format!("{id} ").repeat(500).as_bytes(),
            );
            let body = sweeper_message(&dir, &format!("{id}.bin"), false);
            (id.clone(), body.to_string().into_bytes())
        })
        .collect();

    moto.stop();
    send_all(&hs, "assetsweeper.asset_folder_importer.file.new", &msgs).await;
    w.through_all_tiers(&hs, &ids, "object store").await;
    moto.restart(bucket).await;
    let f = w.recovery(&mut hs, &ids, Instant::now()).await;

    let opts = moto.store_options();
    let tier = storage::store::open("s3://archive/outage", &opts).expect("open the S3 tier");
    let out = w.out.all();
    for id in &ids {
        let o = out.iter().find(|s| &s.id == id).expect("an output");
        assert_eq!(o.routing_key, "storagetier.onlinearchive.newfile.success");
        let got = storage::copy::hash_object(
            &tier,
            &tier.key(&format!("batch/{id}.bin")),
            storage::Algorithm::Sha256,
        )
        .await
        .expect("read back from moto")
        .unwrap_or_else(|| panic!("{id} stored in S3"));
        assert_eq!(got.size, format!("{id} ").repeat(500).len() as u64);
    }
    row("object store (moto S3)", "online-archive", &f, f.duplicated);
    assert_eq!(f.duplicated, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_across_retry_tiers_loses_nothing() {
    let pg = db::testing::TempPostgres::create()
        .await
        .expect("create a test database");
    let name = pg
        .url
        .rsplit('/')
        .next()
        .expect("database name")
        .to_string();
    let admin = db::AnyPool::connect(&format!("{}/postgres", db::testing::postgres_server()))
        .await
        .expect("admin connection to the postgres database");
    let allow = |on: bool| format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {on}");
    let data = tempfile::tempdir().expect("tempdir");
    // Fewer attempts than the outage lasts: a database's outage is not counted against
    // the messages (`MessageContext::retry_for_outage`).
    let cfg: Vec<(&str, &str)> = vec![
        ("project_ingest.database_url", pg.url.as_str()),
        (RETRY[0].0, RETRY[0].1),
        ("retry.max_attempts", "2"),
    ];
    let mut hs =
        Harness::start_service::<ProjectIngest>(service_config::<ProjectIngest>(data.path(), &cfg))
            .await;
    let w = Watch::start(&hs).await;
    let ids = ids(&unique("proj"));
    let msgs: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| {
            let ev = json!({"type": "project-created", "id": id, "title": format!("title {id}"),
                "status": "New", "commissionId": "c-outage", "commissionTitle": "Outage",
                "productionOffice": "UK", "created": "2024-01-01T00:00:00Z"});
            (id.clone(), ev.to_string().into_bytes())
        })
        .collect();

    // Only this test's database goes away: no new connections, existing ones killed.
    db::sqlx::query(&allow(false))
        .execute(&admin)
        .await
        .expect("disallow connections");
    db::sqlx::query(&format!(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = '{name}'"
    ))
    .execute(&admin)
    .await
    .expect("terminate the service's connections");
    assert!(
        db::AnyPool::connect(&pg.url).await.is_err(),
        "the database refuses connections during the outage"
    );
    send_all(&hs, "core.project.event", &msgs).await;
    w.through_all_tiers(&hs, &ids, "database").await;
    println!("error during the outage: {}", w.tiers.all()[0].last_error);
    db::sqlx::query(&allow(true))
        .execute(&admin)
        .await
        .expect("allow connections again");
    let f = w.recovery(&mut hs, &ids, Instant::now()).await;

    let store = Store::open(&pg.url).await.expect("open the store");
    for id in &ids {
        let p = store
            .project(id)
            .await
            .expect("query the project")
            .unwrap_or_else(|| panic!("project {id} stored"));
        assert_eq!(p.title, format!("title {id}"));
    }
    store.close().await;
    admin.close().await;
    drop(hs);
    pg.drop_db().await.expect("drop the test database");
    row("database (PostgreSQL)", "project-ingest", &f, f.duplicated);
    assert_eq!(f.duplicated, 0);
}

/// The endpoint: 503 while down, 200 (recording the body) while up.
struct Endpoint {
    up: Arc<AtomicBool>,
    delivered: Arc<Mutex<Vec<String>>>,
}

impl Respond for Endpoint {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if !self.up.load(Ordering::SeqCst) {
            return ResponseTemplate::new(503).set_body_string("down for maintenance");
        }
        let body = String::from_utf8_lossy(&request.body).into_owned();
        self.delivered.lock().expect("endpoint lock").push(body);
        ResponseTemplate::new(200)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoint_outage_across_retry_tiers_loses_nothing() {
    let server = MockServer::start().await;
    let up = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(Mutex::new(Vec::new()));
    Mock::given(wiremock::matchers::method("POST"))
        .respond_with(Endpoint {
            up: Arc::clone(&up),
            delivered: Arc::clone(&delivered),
        })
        .mount(&server)
        .await;
    let endpoint = format!("{}/events", server.uri());
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg: Vec<(&str, &str)> = vec![("event_forwarder.endpoint", endpoint.as_str())];
    cfg.extend(RETRY);
    let mut hs = Harness::start_service::<EventForwarderService>(service_config::<
        EventForwarderService,
    >(data.path(), &cfg))
    .await;
    let w = Watch::start(&hs).await;
    let ids = ids("ev");
    let body_of = |id: &str| json!({"type": "member-registered", "id": id}).to_string();
    let msgs: Vec<(String, Vec<u8>)> = ids
        .iter()
        .map(|id| (id.clone(), body_of(id).into_bytes()))
        .collect();

    send_all(&hs, "member.registered", &msgs).await;
    w.through_all_tiers(&hs, &ids, "503").await;
    up.store(true, Ordering::SeqCst);
    let f = w.recovery(&mut hs, &ids, Instant::now()).await;

    let requests = server
        .received_requests()
        .await
        .expect("wiremock records requests");
    let delivered = delivered.lock().expect("endpoint lock").clone();
    let mut re_posts = 0;
    for id in &ids {
        let posts = requests
            .iter()
            .filter(|r| r.body == body_of(id).as_bytes())
            .count();
        assert!(
            posts > 3,
            "{id} posted during the outage and after ({posts})"
        );
        let ok = delivered.iter().filter(|b| **b == body_of(id)).count();
        assert!(ok >= 1, "{id} delivered to the endpoint");
        re_posts += ok - 1;
    }
    assert_eq!(delivered.len(), N + re_posts);
    println!(
        "{} POSTs in all ({} answered 503), {re_posts} re-posts of delivered events",
        requests.len(),
        requests.len() - delivered.len()
    );
    row(
        "HTTP endpoint (503)",
        "event-forwarder",
        &f,
        re_posts.max(f.duplicated),
    );
    assert_eq!(re_posts, 0, "no delivered event posted again");
    assert_eq!(f.duplicated, 0);
}

//! snapshot-status against the real RabbitMQ and real databases (SQLite and PostgreSQL).

use std::time::Duration;

use db::testing::TempPostgres;
use framework::lapin::message::Delivery;
use framework::lapin::{BasicProperties, Consumer};
use framework::testing::*;
use serde_json::{Value, json};
use snapshot_status::SnapshotStatus;
use snapshot_status::store::Store;

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Env {
    hs: Harness,
    store: Store,
    pg: Option<TempPostgres>,
    export_ex: String,
    monitoring_ex: String,
    out: Consumer,
    export: Consumer,
    /// Monitoring messages saying every collection is successful.
    monitoring: Titled,
    /// Monitoring messages saying every collection was received by NiFi.
    received: Titled,
    /// The consumer tag of the monitoring watcher (cancelled: nothing bound there).
    monitoring_tag: String,
    dir: tempfile::TempDir,
}

async fn start(backend: Backend, extra: &[(&str, &str)]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(TempPostgres::create().await.unwrap()),
    };
    let url = match &pg {
        Some(p) => p.url.clone(),
        None => db::default_url(dir.path(), "snapshot-status"),
    };
    let export_ex = unique("export-state");
    let monitoring_ex = unique("monitoring");
    let mut o: Vec<(&str, &str)> = vec![
        ("snapshot_status.database_url", url.as_str()),
        ("snapshot_status.export_state_exchange", export_ex.as_str()),
        (
            "snapshot_status.monitoring_exchange",
            monitoring_ex.as_str(),
        ),
        // One message at a time, so "processed before" is observable.
        ("amqp.prefetch", "1"),
    ];
    o.extend_from_slice(extra);
    let cfg = service_config::<SnapshotStatus>(dir.path(), &o);
    let hs = Harness::start_service::<SnapshotStatus>(cfg).await;
    let store = Store::open(&url).await.unwrap();
    let out = hs.watch_output().await;
    let export = watch(&hs.ch, &export_ex, "#").await;
    let watching = watch(&hs.ch, &monitoring_ex, "#").await;
    let monitoring_tag = watching.tag().to_string();
    let (monitoring, received) = Titled::split(watching, "All collections received");
    Env {
        hs,
        store,
        pg,
        export_ex,
        monitoring_ex,
        out,
        export,
        monitoring,
        received,
        monitoring_tag,
        dir,
    }
}

impl Env {
    async fn send(&self, body: &Value) {
        self.send_with(body, BasicProperties::default()).await;
    }
    /// Sends as the retry tiers send a message back after one attempt.
    async fn send_retried(&self, body: &Value, props: BasicProperties) {
        self.hs
            .publish_retried(
                "snapshot.status.update",
                &serde_json::to_vec(body).unwrap(),
                props,
                1,
            )
            .await;
    }
    async fn send_with(&self, body: &Value, props: BasicProperties) {
        self.hs
            .publish(
                "snapshot.status.update",
                &serde_json::to_vec(body).unwrap(),
                props,
            )
            .await;
    }
    /// Sends and waits for the success message.
    async fn process(&mut self, body: &Value) -> Value {
        self.send(body).await;
        json_of(&next(&mut self.out).await)
    }
    async fn dlq_count(&self) -> u32 {
        ready_count(&self.hs.ch, &format!("{}-dlq", self.hs.q)).await
    }
    /// True when no success message is waiting.
    async fn out_is_empty(&mut self) -> bool {
        next_within(&mut self.out, Duration::from_millis(300))
            .await
            .is_none()
    }
    async fn no_more(&mut self) {
        assert!(
            next_within(&mut self.export, Duration::from_millis(300))
                .await
                .is_none(),
            "no further export-state message"
        );
        assert!(
            self.monitoring
                .next_within(Duration::from_millis(300))
                .await
                .is_none(),
            "no further all-successful message"
        );
        assert!(
            self.received
                .next_within(Duration::from_millis(300))
                .await
                .is_none(),
            "no further all-received message"
        );
    }
    /// The next all-received monitoring message, for run `cid`.
    /// Collection `coll` of run `cid` (its only one so far) made Received by its one file:
    /// its export-state message and the run's all-received one taken.
    async fn collection_received(&mut self, cid: &str, coll: &str) {
        self.process(&msg(cid, coll, json!({"files_exported": 1})))
            .await;
        self.process(&file(cid, coll, &format!("{coll}-1"))).await;
        assert_eq!(json_of(&next(&mut self.export).await)["topic_name"], coll);
        self.received_once(cid).await;
    }
    async fn received_once(&mut self, cid: &str) {
        let v = json_of(&self.received.next().await);
        assert_eq!(v["custom_elements"][1]["value"], cid, "{v}");
    }
    async fn collection(&self, cid: &str, name: &str) -> snapshot_status::store::Collection {
        self.store.collection(cid, name).await.unwrap().unwrap()
    }
    async fn finish(mut self) {
        self.hs.stop().await;
        self.store.close().await;
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await.unwrap();
        }
        cleanup(
            vec![],
            vec![self.export_ex.clone(), self.monitoring_ex.clone()],
        );
    }
}

/// One monitoring exchange's messages, split by title: those whose `title_text` contains
/// a text, and the rest.
struct Titled(tokio::sync::mpsc::UnboundedReceiver<Delivery>);

impl Titled {
    /// (the rest, those titled with `text`)
    fn split(mut c: Consumer, text: &'static str) -> (Titled, Titled) {
        let (rest, rest_rx) = tokio::sync::mpsc::unbounded_channel();
        let (titled, titled_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Ends with the test (its runtime) or the consumer.
            while let Some(d) = next_within(&mut c, Duration::from_secs(3600)).await {
                let title = json_of(&d)["title_text"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let to = if title.contains(text) { &titled } else { &rest };
                if to.send(d).is_err() {
                    return;
                }
            }
        });
        (Titled(rest_rx), Titled(titled_rx))
    }
    async fn next(&mut self) -> Delivery {
        self.next_within(WAIT).await.expect("a monitoring message")
    }
    async fn next_within(&mut self, d: Duration) -> Option<Delivery> {
        tokio::time::timeout(d, self.0.recv()).await.ok().flatten()
    }
}

fn json_of(d: &Delivery) -> Value {
    serde_json::from_slice(&d.data).unwrap()
}

fn msg(cid: &str, coll: &str, extra: Value) -> Value {
    let mut v = json!({"correlation_id": cid, "collection_name": coll,
                       "snapshot_type": "incremental", "export_date": "2020-01-01"});
    if let (Value::Object(o), Value::Object(e)) = (&mut v, extra) {
        o.extend(e);
    }
    v
}

fn file(cid: &str, coll: &str, name: &str) -> Value {
    msg(cid, coll, json!({"filename": name}))
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::Backend::Postgres).await
            }
        }
    )*};
}

on_both!(
    a_collection_arriving_after_the_run_completed_reopens_it,
    a_batch_that_reopens_its_run_announces_each_reception,
    a_batch_that_reopens_its_run_announces_each_completion,
    full_flow_received_then_completed,
    completed_runs_past_their_keeping_are_deleted,
    idle_runs_past_their_keeping_are_deleted,
    files_arriving_before_counts_are_counted,
    redelivered_files_are_counted_once,
    records_with_mixed_valid_and_invalid_bodies,
    an_unnamed_file_whose_message_id_holds_a_nul_counts_once,
);

/// A message id is anyone's text: one holding U+0000 (which PostgreSQL cannot store) still
/// tells an unnamed file apart, once, instead of dead-lettering the file that completes
/// its collection.
async fn an_unnamed_file_whose_message_id_holds_a_nul_counts_once(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-nul-id";
    env.process(&msg(c, "db.z", json!({"files_exported": 2})))
        .await;
    let unnamed = msg(c, "db.z", json!({}));
    let with_id = |id: &str| BasicProperties::default().with_message_id(id.into());
    env.send_with(&unnamed, with_id("m\u{0}x")).await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(
        (r["counted"].clone(), r["files_received"].clone()),
        (json!(true), json!(1))
    );
    env.send_with(&unnamed, with_id("m\u{0}x")).await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(
        (r["counted"].clone(), r["files_received"].clone()),
        (json!(false), json!(1))
    );
    env.send_with(&unnamed, with_id("m\u{0}y")).await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(r["status"], "Received");
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// A completed run's state (product, collections, every file's row) is deleted once past
/// its keeping, an open run's never; without it the database grows by a row per file for
/// as long as the service runs.
async fn completed_runs_past_their_keeping_are_deleted(b: Backend) {
    let mut env = start(b, &[]).await;
    let (done, open) = ("corr-prune-done", "corr-prune-open");
    env.process(&msg(done, "db.a", json!({"files_exported": 1})))
        .await;
    env.process(&file(done, "db.a", "a1")).await;
    let r = env
        .process(&msg(done, "db.a", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    env.process(&msg(open, "db.b", json!({"files_exported": 2})))
        .await;
    env.process(&file(open, "db.b", "b1")).await;
    let day = Duration::from_secs(86_400);
    assert_eq!(
        env.store.prune_completed_runs(day).await.unwrap(),
        0,
        "kept a day"
    );
    assert_eq!(env.store.collections(done).await.unwrap().len(), 1);
    assert_eq!(
        env.store
            .prune_completed_runs(Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert!(env.store.collections(done).await.unwrap().is_empty());
    assert_eq!(env.store.product_status(done).await.unwrap(), None);
    assert_eq!(
        env.collection(open, "db.b").await.files_received,
        1,
        "open: kept"
    );
    // A message of it afterwards (a dead letter replayed weeks later) changes nothing: it
    // does not start the run over as a collection that never completes.
    env.send(&file(done, "db.a", "a1")).await;
    env.send(&msg(open, "db.b", json!({"filename": "b2"})))
        .await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(
        r["correlation_id"], open,
        "the pruned run's file was dropped"
    );
    assert!(env.store.collections(done).await.unwrap().is_empty());
    assert_eq!(
        env.store.prune_completed_runs(Duration::MAX).await.unwrap(),
        0,
        "no age past the clock's range"
    );
    env.finish().await;
}

/// A run that never completes (an export given up on) is deleted once nothing of it was
/// heard for `keep_idle_runs_days`; a completed one is left to its own keeping. Without it
/// each such run kept a row per file for as long as the database did.
async fn idle_runs_past_their_keeping_are_deleted(b: Backend) {
    let mut env = start(b, &[]).await;
    let (idle, done) = ("corr-idle", "corr-idle-done");
    env.process(&msg(idle, "db.i", json!({"files_exported": 5})))
        .await;
    env.process(&file(idle, "db.i", "i1")).await;
    env.process(&msg(done, "db.d", json!({"files_exported": 1})))
        .await;
    env.process(&file(done, "db.d", "d1")).await;
    let r = env
        .process(&msg(done, "db.d", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    let day = Duration::from_secs(86_400);
    assert_eq!(
        env.store.prune_idle_runs(day).await.unwrap(),
        0,
        "heard of today"
    );
    assert_eq!(env.store.prune_idle_runs(Duration::ZERO).await.unwrap(), 1);
    assert!(env.store.collections(idle).await.unwrap().is_empty());
    assert_eq!(
        env.store.collections(done).await.unwrap().len(),
        1,
        "a completed run is left to keep_completed_runs_days"
    );
    // A late message of the deleted run is dropped, not the start of a new run.
    env.send(&file(idle, "db.i", "i2")).await;
    env.send(&msg(done, "db.d", json!({"filename": "d2"})))
        .await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(r["correlation_id"], done, "the idle run's file was dropped");
    assert!(env.store.collections(idle).await.unwrap().is_empty());
    env.finish().await;
}

async fn full_flow_received_then_completed(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-1";
    // The exporter reports A; the exporter then the sender report B.
    let r = env
        .process(&msg(c, "db.a", json!({"files_exported": 2})))
        .await;
    assert_eq!(r["status"], "Exported");
    assert_eq!(r["files_expected"], 2);
    env.process(&msg(c, "db.b", json!({"files_exported": 3})))
        .await;
    let r = env.process(&msg(c, "db.b", json!({"files_sent": 1}))).await;
    assert_eq!(r["status"], "Sent");
    assert_eq!(r["files_expected"], 1, "files_sent wins once known");
    // The exporter's count again, after the sender's: it does not replace it.
    let r = env
        .process(&msg(c, "db.b", json!({"files_exported": 4})))
        .await;
    assert_eq!(
        (&r["status"], &r["files_expected"]),
        (&json!("Sent"), &json!(1))
    );

    let r = env.process(&file(c, "db.a", "a1.gz.enc")).await;
    assert_eq!(r["files_received"], 1);
    assert_eq!(r["status"], "Exported");
    let r = env
        .process(&msg(
            c,
            "db.a",
            json!({"filename": "a2.gz.enc", "shutdown_flag": "false"}),
        ))
        .await;
    assert_eq!(r["status"], "Received");
    let e = json_of(&next(&mut env.export).await);
    assert_eq!(
        e,
        json!({"shutdown_flag": "false", "correlation_id": c, "topic_name": "db.a",
               "snapshot_type": "incremental", "reprocess_files": "true",
               "export_date": "2020-01-01", "send_success_indicator": "true"})
    );
    assert_eq!(
        env.store.product_status(c).await.unwrap(),
        None,
        "B not received yet"
    );

    env.process(&file(c, "db.b", "b1.gz.enc")).await;
    let d = next(&mut env.export).await;
    assert_eq!(d.routing_key.as_str(), "snapshot.export-state");
    assert_eq!(json_of(&d)["topic_name"], "db.b");
    assert_eq!(json_of(&d)["shutdown_flag"], "true");
    assert_eq!(
        env.store.product_status(c).await.unwrap().as_deref(),
        Some("RECEIVED")
    );
    // As the original: monitoring hears that NiFi has every collection, once.
    let d = env.received.next().await;
    assert_eq!(d.routing_key.as_str(), "monitoring.snapshot-sender");
    assert_eq!(
        json_of(&d),
        json!({"severity": "Critical", "notification_type": "Information",
               "slack_username": "Snapshot Sender",
               "title_text": "Incremental - All collections received by NiFi",
               "custom_elements": [{"key": "Export date", "value": "2020-01-01"},
                                   {"key": "Correlation Id", "value": c}]})
    );
    env.no_more().await;
    assert!(
        env.received
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );

    // Success files (the flag is case-insensitive).
    let r = env
        .process(&msg(
            c,
            "db.a",
            json!({"is_success_file": "TRUE", "filename": "_SUCCESS"}),
        ))
        .await;
    assert_eq!(r["status"], "Success");
    assert_eq!(r["product_status"], "RECEIVED");
    let r = env
        .process(&msg(c, "db.b", json!({"is_success_file": "True"})))
        .await;
    assert_eq!(r["status"], "Success");
    assert_eq!(r["product_status"], "COMPLETED");
    let d = env.monitoring.next().await;
    assert_eq!(d.routing_key.as_str(), "monitoring.snapshot-sender");
    assert_eq!(
        json_of(&d),
        json!({"severity": "Critical", "notification_type": "Information",
               "slack_username": "Snapshot Sender",
               "title_text": "Incremental - All collections successful",
               "custom_elements": [{"key": "Export date", "value": "2020-01-01"},
                                   {"key": "Correlation Id", "value": c}]})
    );
    assert_eq!(env.collection(c, "db.a").await.status, "Success");
    env.no_more().await;
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

async fn files_arriving_before_counts_are_counted(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-early";
    let r = env.process(&file(c, "db.x", "x1")).await;
    assert_eq!(r["status"], "Pending");
    assert_eq!(r["files_expected"], Value::Null);
    env.process(&file(c, "db.x", "x2")).await;
    assert_eq!(env.collection(c, "db.x").await.files_received, 2);
    // (A success file before Received waits for it: see
    // `a_success_file_before_its_collection_waits_for_it`.)
    // The counts arrive last and complete the collection at once.
    let r = env.process(&msg(c, "db.x", json!({"files_sent": 2}))).await;
    assert_eq!(r["status"], "Received");
    assert_eq!(r["files_received"], 2);
    let e = json_of(&next(&mut env.export).await);
    assert_eq!(e["topic_name"], "db.x");
    assert_eq!(
        env.store.product_status(c).await.unwrap().as_deref(),
        Some("RECEIVED")
    );
    assert_eq!(env.dlq_count().await, 0);
    env.received_once(c).await;
    env.no_more().await;
    // Operators: `snapshot-status status <correlation-id>`.
    if let Backend::Sqlite = b {
        let o = isolated_command(env!("CARGO_BIN_EXE_snapshot-status"))
            .args([
                "status",
                c,
                "--config-dir",
                "/nonexistent-config-dir-for-test",
            ])
            .env("STORAGETIER__STORAGE__DATA_DIR", env.dir.path())
            .env("STORAGETIER__AMQP__URL", amqp_url())
            .output_within(WAIT)
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        // The config dir does not exist and was given explicitly: a usage error.
        assert_eq!(o.status.code(), Some(2), "{text}");
        // As if the database were one migration behind (a service of the previous version
        // still runs on it): a look must not migrate it (here, re-applying the last
        // migration would fail outright).
        db::sqlx::any::install_default_drivers();
        let url = db::default_url(env.dir.path(), "snapshot-status");
        let raw = db::sqlx::AnyPool::connect(&url).await.unwrap();
        let migrations = || async {
            db::sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM _sqlx_migrations")
                .fetch_one(&raw)
                .await
                .unwrap()
        };
        let before = migrations().await;
        db::sqlx::query("DELETE FROM _sqlx_migrations WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)")
            .execute(&raw)
            .await
            .unwrap();
        let o = isolated_command(env!("CARGO_BIN_EXE_snapshot-status"))
            .args(["status", c])
            .current_dir(env.dir.path())
            .env("STORAGETIER__STORAGE__DATA_DIR", env.dir.path())
            .output_within(WAIT)
            .unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(text.contains("product status: RECEIVED"), "{text}");
        assert!(text.contains("db.x"), "{text}");
        assert!(text.contains("Received"), "{text}");
        assert_eq!(migrations().await, before - 1, "not migrated by looking");
        db::sqlx::query(
            "INSERT INTO pruned_runs (correlation_id, pruned_at) VALUES ('corr-pruned', '2026-01-01')",
        )
        .execute(&raw)
        .await
        .unwrap();
        raw.close().await;
        let o = isolated_command(env!("CARGO_BIN_EXE_snapshot-status"))
            .args(["status", "unknown-id"])
            .current_dir(env.dir.path())
            .env("STORAGETIER__STORAGE__DATA_DIR", env.dir.path())
            .output_within(WAIT)
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let unknown = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(unknown.contains("no collections"), "{unknown}");
        // A run deleted past its keeping is told from one never seen.
        let o = isolated_command(env!("CARGO_BIN_EXE_snapshot-status"))
            .args(["status", "corr-pruned"])
            .current_dir(env.dir.path())
            .env("STORAGETIER__STORAGE__DATA_DIR", env.dir.path())
            .output_within(WAIT)
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        let pruned = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(pruned.contains("was deleted past its keeping"), "{pruned}");
        // No database yet: reported, and none is created by looking.
        let empty = tempfile::tempdir().unwrap();
        let o = isolated_command(env!("CARGO_BIN_EXE_snapshot-status"))
            .args(["status", c])
            .current_dir(empty.path())
            .env("STORAGETIER__STORAGE__DATA_DIR", empty.path())
            .output_within(WAIT)
            .unwrap();
        assert_eq!(o.status.code(), Some(1));
        assert!(!empty.path().join("snapshot-status.db").exists());
        // The command is the framework CLI's own subcommand: listed in --help.
        let o = isolated_command(env!("CARGO_BIN_EXE_snapshot-status"))
            .arg("--help")
            .output_within(WAIT)
            .unwrap();
        let help = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{help}");
        assert!(
            help.lines().any(|l| l.trim_start().starts_with("status ")
                && l.contains("collections and product status")),
            "{help}"
        );
        assert!(help.contains("dlq"), "{help}");
    }
    env.finish().await;
}

async fn redelivered_files_are_counted_once(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-dup";
    env.process(&msg(c, "db.d", json!({"files_exported": 3})))
        .await;
    let r = env.process(&file(c, "db.d", "d1")).await;
    assert_eq!(r["counted"], true);
    let r = env.process(&file(c, "db.d", "d1")).await;
    assert_eq!(r["counted"], false);
    assert_eq!(r["files_received"], 1);
    // Files without a name are told apart by message id.
    let with_id = |id: &str| BasicProperties::default().with_message_id(id.into());
    let unnamed = msg(c, "db.d", json!({}));
    env.send_with(&unnamed, with_id("m-1")).await;
    assert_eq!(json_of(&next(&mut env.out).await)["files_received"], 2);
    env.send_with(&unnamed, with_id("m-1")).await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(r["counted"], false);
    assert_eq!(r["files_received"], 2);
    assert_eq!(r["status"], "Exported");
    env.send_with(&unnamed, with_id("m-2")).await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(r["status"], "Received");
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.d");
    env.received.next().await;
    // The file that completed the collection, back from a retry tier (its publish may
    // have failed), is not counted again but re-emits its export-state message and the
    // run's all-received message (at-least-once: a lost publish is repaired).
    env.send_retried(
        &unnamed,
        BasicProperties::default().with_message_id("m-2".into()),
    )
    .await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(r["files_received"], 3);
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.d");
    env.received.next().await;
    // Other late duplicates publish nothing.
    env.process(&file(c, "db.d", "d1")).await;
    env.no_more().await;
    assert!(
        env.received
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    assert_eq!(env.collection(c, "db.d").await.files_received, 3);
    env.finish().await;
}

async fn records_with_mixed_valid_and_invalid_bodies(b: Backend) {
    let mut env = start(b, &[]).await;
    let mut dlq = env.hs.watch_dlq().await;
    let c = "corr-rec";
    env.process(&msg(c, "db.r", json!({"files_sent": 2}))).await;
    let as_string = serde_json::to_string(&file(c, "db.r", "r2")).unwrap();
    let bad = msg(c, "db.r", json!({"export_date": ""}));
    let r = env
        .process(&json!({"Records": [
            {"body": file(c, "db.r", "r1")},
            {"body": bad},
            {"body": as_string},
            {"body": "{not json"},
        ]}))
        .await;
    let recs = r["records"].as_array().unwrap();
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[0]["files_received"], 1);
    assert_eq!(recs[2]["files_received"], 2);
    assert_eq!(recs[2]["status"], "Received");
    assert_eq!(recs[1]["dead_lettered"], "field `export_date` is empty");
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error").as_deref(),
        Some("record 2: field `export_date` is empty")
    );
    assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
    assert_eq!(json_of(&d), bad, "the record's own body is dead-lettered");
    let d = next(&mut dlq).await;
    assert!(
        header(&d, "x-error")
            .unwrap()
            .starts_with("record 4: field `body` is not valid JSON"),
    );
    assert_eq!(&d.data[..], b"{not json");
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.r");
    env.received_once(c).await;
    env.no_more().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_null_empty_and_mistyped_fields_are_permanent() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let mut dlq = env.hs.watch_dlq().await;
    let base = msg("c", "db.v", json!({}));
    let mut cases: Vec<(Value, String)> = Vec::new();
    for f in [
        "correlation_id",
        "collection_name",
        "snapshot_type",
        "export_date",
    ] {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(f);
        cases.push((v, format!("field `{f}` is missing")));
        let mut v = base.clone();
        v[f] = Value::Null;
        cases.push((v, format!("field `{f}` is null")));
        let mut v = base.clone();
        v[f] = json!("");
        cases.push((v, format!("field `{f}` is empty")));
    }
    let mut v = base.clone();
    v["files_sent"] = json!(-1);
    cases.push((
        v,
        "field `files_sent`: expected an integer ≥ 0, found -1".into(),
    ));
    let mut v = base.clone();
    v["files_exported"] = json!("seven");
    cases.push((
        v,
        "field `files_exported`: expected an integer ≥ 0, found \"seven\"".into(),
    ));
    let mut v = base.clone();
    v["collection_name"] = json!(["db.v"]);
    cases.push((
        v,
        "field `collection_name`: expected string, found array".into(),
    ));
    cases.push((json!("text"), "expected a JSON object, found string".into()));
    for (v, expected) in &cases {
        env.send(v).await;
        let d = next(&mut dlq).await;
        assert_eq!(
            header(&d, "x-error").as_deref(),
            Some(expected.as_str()),
            "for {v}"
        );
        assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
    }
    // A batch of none is dropped (the Lambda did nothing with it), not dead-lettered.
    env.send(&json!({"Records": []})).await;
    // Defaults: a file with no optional fields is a received file named NOT_SET.
    let r = env.process(&base).await;
    assert_eq!(r["kind"], "file");
    assert_eq!(r["filename"], "NOT_SET");
    assert!(
        next_within(&mut dlq, Duration::from_millis(300))
            .await
            .is_none(),
        "an empty batch is not dead-lettered"
    );
    // "false" in any case is not a success file.
    let r = env
        .process(&msg(
            "c",
            "db.v",
            json!({"is_success_file": "FALSE", "filename": "f"}),
        ))
        .await;
    assert_eq!(r["kind"], "file");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_is_retried_not_lost() {
    let mut env = start(Backend::Postgres, &[("retry.max_attempts", "2")]).await;
    let mut dlq = env.hs.watch_dlq().await;
    env.process(&file("c", "db.z", "z1")).await;
    env.store.close().await;
    env.pg.take().unwrap().drop_db().await.unwrap();
    env.send(&file("c", "db.z", "z2")).await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert!(header(&d, "x-error").unwrap().contains("database"));
    env.finish().await;
}

/// A queue rejecting every publish, bound to an exchange; deleted by [`unblock`], or when
/// dropped if the test fails first.
struct Blocked {
    name: String,
    _cleanup: Cleanup,
}

/// Binds a queue that rejects every publish to `exchange`: publishes there are nacked.
async fn block(env: &Env, exchange: &str) -> Blocked {
    use framework::lapin::options::{QueueBindOptions, QueueDeclareOptions};
    use framework::lapin::types::{AMQPValue, FieldTable};
    let full = unique("full");
    // Taken before the queue exists: a test failing after this still deletes it.
    let cleanup = Cleanup::new(vec![full.clone()], Vec::new());
    let mut a = FieldTable::default();
    a.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    a.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    env.hs
        .ch
        .queue_declare(
            full.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            a,
        )
        .await
        .unwrap();
    env.hs
        .ch
        .queue_bind(
            full.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    Blocked {
        name: full,
        _cleanup: cleanup,
    }
}

/// Deletes the queue of [`block`] now (its guard deleting it again finds nothing).
async fn unblock(env: &Env, full: Blocked) {
    use framework::lapin::options::QueueDeleteOptions;
    env.hs
        .ch
        .queue_delete(full.name.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// The sender's messages carry no message id (the Lambda's, the SQS bridge's): the
/// export-state and monitoring messages a retried input sends again have the ids the first
/// ones had, so the snapshot-sender and Slack can drop them. They had random ids: `_success`
/// went to Crown twice, and Slack had a second "All collections successful".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_again_for_an_input_without_an_id_keep_their_ids() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let c = "corr-no-id";
    env.process(&msg(c, "db.a", json!({"files_exported": 1})))
        .await;
    let id = framework::testing::message_id;
    let bare = BasicProperties::default();
    env.send(&file(c, "db.a", "f1")).await;
    next(&mut env.out).await;
    let first = id(&next(&mut env.export).await);
    env.send_retried(&file(c, "db.a", "f1"), bare.clone()).await;
    next(&mut env.out).await;
    assert_eq!(first, id(&next(&mut env.export).await), "export-state");
    let success = msg(c, "db.a", json!({"is_success_file": "true"}));
    env.send(&success).await;
    next(&mut env.out).await;
    let first = id(&env.monitoring.next().await);
    env.send_retried(&success, bare).await;
    next(&mut env.out).await;
    assert_eq!(first, id(&env.monitoring.next().await), "monitoring");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_publish_is_repeated_on_redelivery() {
    let mut env = start(Backend::Sqlite, &[("amqp.delivery_limit", "1000")]).await;
    let c = "corr-nack";
    env.process(&msg(c, "db.n", json!({"files_exported": 1})))
        .await;
    // Copies of what goes to the first retry tier: proof that an attempt's publish was
    // refused before the way is cleared (the file counted in the database says only that
    // the attempt got that far, and its publish could come after the unblocking).
    let mut retried = env.hs.watch_first_retry().await;
    // The export-state publish is refused: the file's message is not acked as done.
    let full = block(&env, &env.export_ex.clone()).await;
    env.send(&file(c, "db.n", "n1")).await;
    next(&mut retried).await;
    assert_eq!(env.collection(c, "db.n").await.status, "Received");
    unblock(&env, full).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.n");
    // The success message comes from a later attempt (the first counted the file): the
    // first was not acked as done.
    let done = json_of(&next(&mut env.out).await);
    // Counted once, by this message (at its first attempt): said so in its report, as
    // the report of a file it counted at once says.
    assert_eq!(done["counted"], true, "this message's count");
    assert_eq!(env.collection(c, "db.n").await.files_received, 1);
    // Same for the monitoring message of the last success file. (The file's message may
    // have been retried more than once before the way cleared: its late copies are not
    // the success file's retry.)
    let full = block(&env, &env.monitoring_ex.clone()).await;
    env.send(&msg(c, "db.n", json!({"is_success_file": "true"})))
        .await;
    while json_of(&next(&mut retried).await)["is_success_file"] != "true" {}
    assert_eq!(
        env.store.product_status(c).await.unwrap().as_deref(),
        Some("COMPLETED")
    );
    unblock(&env, full).await;
    let m = json_of(&env.monitoring.next().await);
    assert_eq!(m["title_text"], "Incremental - All collections successful");
    // (A nacked publish may still have reached the watcher's queue: the watchers can see
    // copies here, the point is that nothing is lost.)
    next(&mut env.out).await;
    assert_eq!(
        env.store.product_status(c).await.unwrap().as_deref(),
        Some("COMPLETED")
    );
    env.finish().await;
}

on_both!(
    counts_after_files_carry_the_files_flags,
    success_of_the_last_outstanding_collection_marks_received,
    a_run_completed_by_a_sent_collection_is_announced_received_first,
    a_nul_character_is_permanent_naming_the_field,
    a_retried_message_that_changed_nothing_sends_nothing_again,
    a_file_sent_again_in_another_message_sends_nothing_again,
);

/// The sender sends again the file that completed a collection (or the success file that
/// completed the run) in a message of its own, and that copy is retried (a database blip)
/// or redelivered: it changed nothing, so nothing is sent again. The message that made the
/// change still re-sends when it comes back (its publish may have been lost).
async fn a_file_sent_again_in_another_message_sends_nothing_again(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-copy";
    let retried_as = |id: &str| BasicProperties::default().with_message_id(id.into());
    env.process(&msg(c, "db.a", json!({"files_exported": 1})))
        .await;
    env.send_with(
        &file(c, "db.a", "f1"),
        BasicProperties::default().with_message_id("m1".into()),
    )
    .await;
    next(&mut env.out).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.a");
    env.received_once(c).await;
    // The sender's second copy of f1, retried: no second export-state message.
    env.send_retried(&file(c, "db.a", "f1"), retried_as("m2"))
        .await;
    next(&mut env.out).await;
    env.no_more().await;
    // The first copy comes back: it did complete db.a, so it sends again.
    env.send_retried(&file(c, "db.a", "f1"), retried_as("m1"))
        .await;
    next(&mut env.out).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.a");
    env.received_once(c).await;
    // The success file completes the run: one monitoring message.
    let success = msg(c, "db.a", json!({"is_success_file": "true"}));
    env.send_with(
        &success,
        BasicProperties::default().with_message_id("s1".into()),
    )
    .await;
    next(&mut env.out).await;
    env.monitoring.next().await;
    // Its second copy, retried: no second Slack alert; the first, retried: sent again.
    env.send_retried(&success, retried_as("s2")).await;
    next(&mut env.out).await;
    env.no_more().await;
    env.send_retried(&success, retried_as("s1")).await;
    next(&mut env.out).await;
    env.monitoring.next().await;
    env.finish().await;
}

/// Only the message that made a change re-sends its message when it comes back (its
/// publish may have been lost): a retried counts message after a file completed the
/// collection, or a retried success file of a collection that did not complete the
/// product, sends no second export-state (the sender would send `_success` to Crown
/// twice) or monitoring message (a second Slack alert).
async fn a_retried_message_that_changed_nothing_sends_nothing_again(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-resend";
    env.process(&msg(c, "db.a", json!({"files_exported": 1})))
        .await;
    env.process(&msg(c, "db.b", json!({"files_exported": 1})))
        .await;
    for coll in ["db.a", "db.b"] {
        let r = env.process(&file(c, coll, "f1")).await;
        assert_eq!(r["status"], "Received");
        assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], coll);
    }
    env.received_once(c).await;
    // The sender sends the file that completed db.a again (a new message, not a retry).
    let again = env.process(&file(c, "db.a", "f1")).await;
    assert_eq!(again["counted"], false);
    env.no_more().await;
    // The sender's count for db.a, retried once (a database blip): changes nothing.
    env.send_retried(
        &msg(c, "db.a", json!({"files_sent": 1})),
        BasicProperties::default(),
    )
    .await;
    next(&mut env.out).await;
    env.no_more().await;
    // db.a's success file, then db.b's completes the product: one monitoring message.
    env.process(&msg(c, "db.a", json!({"is_success_file": "true"})))
        .await;
    let r = env
        .process(&msg(c, "db.b", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    env.monitoring.next().await;
    // db.a's success file comes back: db.b's completed the product, not it.
    env.send_retried(
        &msg(c, "db.a", json!({"is_success_file": "true"})),
        BasicProperties::default(),
    )
    .await;
    next(&mut env.out).await;
    env.no_more().await;
    // db.b's does: its monitoring message may have been lost, so it is sent again.
    env.send_retried(
        &msg(c, "db.b", json!({"is_success_file": "true"})),
        BasicProperties::default(),
    )
    .await;
    next(&mut env.out).await;
    env.monitoring.next().await;
    // The file that completed db.a comes back once db.a is Success: the sender had its
    // export-state message (it sent the success file), so none is sent again.
    env.send_retried(&file(c, "db.a", "f1"), BasicProperties::default())
        .await;
    next(&mut env.out).await;
    env.no_more().await;
    env.finish().await;
}

/// The counts complete a collection whose files came first: the export-state message
/// carries the flags the files came with, not the counts message's defaults.
async fn counts_after_files_carry_the_files_flags(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-flags";
    let flags = json!({"shutdown_flag": "false", "reprocess_files": "false"});
    for name in ["f1", "f2"] {
        let mut f = file(c, "db.f", name);
        f.as_object_mut()
            .unwrap()
            .extend(flags.as_object().unwrap().clone());
        env.process(&f).await;
    }
    let r = env.process(&msg(c, "db.f", json!({"files_sent": 2}))).await;
    assert_eq!(r["status"], "Received");
    let e = json_of(&next(&mut env.export).await);
    assert_eq!(e["shutdown_flag"], "false");
    assert_eq!(e["reprocess_files"], "false");
    assert_eq!(e["topic_name"], "db.f");
    env.received_once(c).await;
    env.no_more().await;
    env.finish().await;
}

/// The last outstanding collection goes Sent → Success while another is Received: every
/// collection is Received or Success, so the product is RECEIVED (then COMPLETED).
async fn success_of_the_last_outstanding_collection_marks_received(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-sent-success";
    env.process(&msg(c, "db.a", json!({"files_exported": 1})))
        .await;
    env.process(&msg(c, "db.b", json!({"files_sent": 5}))).await;
    let r = env.process(&file(c, "db.a", "a1")).await;
    assert_eq!(r["status"], "Received");
    next(&mut env.export).await;
    assert_eq!(
        env.store.product_status(c).await.unwrap(),
        None,
        "db.b is Sent"
    );
    let r = env
        .process(&msg(c, "db.b", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["status"], "Success");
    assert_eq!(r["product_status"], "RECEIVED");
    env.received_once(c).await;
    assert_eq!(
        env.store.product_status(c).await.unwrap().as_deref(),
        Some("RECEIVED")
    );
    let r = env
        .process(&msg(c, "db.a", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    env.monitoring.next().await;
    env.no_more().await;
    env.finish().await;
}

/// The same run with its success files the other way round: the Sent collection's,
/// coming last, makes every collection Success at once. The run is announced RECEIVED, and
/// then COMPLETED: it went straight to COMPLETED, and the all-received alert never came.
async fn a_run_completed_by_a_sent_collection_is_announced_received_first(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-sent-last";
    env.process(&msg(c, "db.a", json!({"files_exported": 1})))
        .await;
    env.process(&msg(c, "db.b", json!({"files_sent": 5}))).await;
    env.process(&file(c, "db.a", "a1")).await;
    next(&mut env.export).await;
    let r = env
        .process(&msg(c, "db.a", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], Value::Null, "db.b is Sent");
    let r = env
        .process(&msg(c, "db.b", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    env.received_once(c).await;
    let m = json_of(&env.monitoring.next().await);
    assert!(
        m["title_text"]
            .as_str()
            .is_some_and(|t| t.ends_with("All collections successful")),
        "{m}"
    );
    env.no_more().await;
    env.finish().await;
}

/// PostgreSQL cannot store U+0000 in text: refused when read, not retried 50 times.
async fn a_nul_character_is_permanent_naming_the_field(b: Backend) {
    let mut env = start(b, &[]).await;
    let mut dlq = env.hs.watch_dlq().await;
    for (field, v) in [
        ("filename", file("corr-nul", "db.n", "bad\u{0}name")),
        ("correlation_id", file("corr\u{0}nul", "db.n", "f")),
        (
            "shutdown_flag",
            msg("corr-nul", "db.n", json!({"shutdown_flag": "\u{0}"})),
        ),
    ] {
        env.send(&v).await;
        let d = next(&mut dlq).await;
        assert_eq!(
            header(&d, "x-error").as_deref(),
            Some(format!("field `{field}` contains a NUL character (\\u0000)").as_str())
        );
        assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
        assert_eq!(int_header(&d, "x-retry-count"), Some(1), "no retries");
    }
    // In a batch, the record alone is dead-lettered; the others are stored.
    let r = env
        .process(&json!({"Records": [
            {"body": file("corr-nul", "db.n", "ok")},
            {"body": file("corr-nul", "db.n", "x\u{0}")},
        ]}))
        .await;
    assert_eq!(r["records"][0]["counted"], true);
    assert_eq!(
        r["records"][1]["dead_lettered"],
        "field `filename` contains a NUL character (\\u0000)"
    );
    next(&mut dlq).await;
    assert_eq!(env.collection("corr-nul", "db.n").await.files_received, 1);
    env.finish().await;
}

/// Waits until nothing is bound to `exchange` (a probe published mandatory comes back).
async fn await_unbound(exchange: &str) {
    let (_c, ch) = test_channel().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let confirm = ch
            .basic_publish(
                exchange.into(),
                "probe".into(),
                framework::lapin::options::BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"probe",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if matches!(confirm, framework::lapin::Confirmation::Ack(Some(_))) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{exchange} still bound"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A service (SQLite) whose export-state exchange has nothing bound.
async fn start_unbound(extra: &[(&str, &str)]) -> Env {
    let env = start(Backend::Sqlite, extra).await;
    unbind_export(&env).await;
    env
}

/// Cancels the export-state watcher (deleting its auto-delete queue): nothing is bound.
async fn unbind_export(env: &Env) {
    use framework::lapin::options::BasicCancelOptions;
    env.hs
        .ch
        .basic_cancel(env.export.tag(), BasicCancelOptions::default())
        .await
        .unwrap();
    await_unbound(&env.export_ex).await;
}

/// Cancels the monitoring watcher (deleting its auto-delete queue): nothing is bound.
async fn unbind_monitoring(env: &Env) {
    use framework::lapin::options::BasicCancelOptions;
    env.hs
        .ch
        .basic_cancel(
            env.monitoring_tag.as_str().into(),
            BasicCancelOptions::default(),
        )
        .await
        .unwrap();
    await_unbound(&env.monitoring_ex).await;
}

/// Design §7: the monitoring message is published mandatory too — with nothing bound to
/// the monitoring exchange, the success file that completes a product is retried (the
/// product stays COMPLETED), and the Slack alert is delivered once something is bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_monitoring_message_is_retried_until_bound() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let c = "corr-unroutable-mon";
    env.process(&msg(c, "db.m", json!({"files_exported": 1})))
        .await;
    env.process(&file(c, "db.m", "m1")).await;
    next(&mut env.export).await;
    unbind_monitoring(&env).await;
    let mut retried = env.hs.watch_first_retry().await;
    env.send(&msg(c, "db.m", json!({"is_success_file": "true"})))
        .await;
    next(&mut retried).await;
    assert_eq!(
        env.store.product_status(c).await.unwrap().as_deref(),
        Some("COMPLETED")
    );
    let mut monitoring = watch(&env.hs.ch, &env.monitoring_ex, "#").await;
    let m = json_of(&next(&mut monitoring).await);
    assert_eq!(m["title_text"], "Incremental - All collections successful");
    next(&mut env.out).await;
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// A batch record whose monitoring message has nowhere to go (nothing bound to the
/// monitoring exchange: the Slack notifier's queue gone) holds back that message only: the
/// batch's later records are still counted and their export-state messages sent (a stop at
/// the first refusal left them uncounted through every retry, then in the DLQ), and the
/// batch is retried for the monitoring message, delivered once something is bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_monitoring_message_holds_back_no_later_record_of_its_batch() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let (one, other) = ("corr-held-one", "corr-held-other");
    env.process(&msg(one, "db.a", json!({"files_exported": 1})))
        .await;
    // Two collections: its file does not complete its run (no monitoring message of its own).
    env.process(&msg(other, "db.x", json!({"files_exported": 1})))
        .await;
    env.process(&msg(other, "db.y", json!({"files_exported": 5})))
        .await;
    unbind_monitoring(&env).await;
    env.send(&json!({"Records": [
        {"body": file(one, "db.a", "a1")},
        {"body": file(other, "db.x", "x1")},
    ]}))
    .await;
    let first = json_of(&next(&mut env.export).await);
    assert_eq!(first["topic_name"], "db.a");
    let second = json_of(&next(&mut env.export).await);
    assert_eq!(
        second["topic_name"], "db.x",
        "the later record is not held back"
    );
    assert_eq!(env.collection(other, "db.x").await.status, "Received");
    let mut monitoring = watch(&env.hs.ch, &env.monitoring_ex, "#").await;
    let m = json_of(&next(&mut monitoring).await);
    assert_eq!(
        m["title_text"], "Incremental - All collections received by NiFi",
        "{m}"
    );
    assert_eq!(m["custom_elements"][1]["value"], one, "{m}");
    next(&mut env.out).await;
    assert_eq!(env.dlq_count().await, 0);
    assert_eq!(env.collection(other, "db.x").await.files_received, 1);
    env.finish().await;
}

/// A run's later records in a batch wait with its refused monitoring message: handled
/// first, a record that reopened the run (counts of a new collection) and one that received
/// it again left the first "all received" never built again by the retry (which builds a
/// message from the run's state as it finds it): each is announced, two in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_monitoring_message_is_not_lost_to_a_later_record_of_its_run() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let r = "corr-held-reopened";
    env.process(&msg(r, "db.a", json!({"files_exported": 1})))
        .await;
    unbind_monitoring(&env).await;
    env.send(&json!({"Records": [
        {"body": file(r, "db.a", "a1")},
        {"body": msg(r, "db.c", json!({"files_exported": 1}))},
        {"body": file(r, "db.c", "c1")},
    ]}))
    .await;
    // Its first record's export-state goes; the rest of the run waits for the retry.
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.a");
    let mut monitoring = watch(&env.hs.ch, &env.monitoring_ex, "#").await;
    for _ in 0..2 {
        let m = json_of(&next(&mut monitoring).await);
        assert_eq!(
            m["title_text"], "Incremental - All collections received by NiFi",
            "{m}"
        );
    }
    next(&mut env.out).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.c");
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// The file that made a run RECEIVED, its "all received" refused (nothing bound to the
/// monitoring exchange), sends it at a retry even after the sender acted on its
/// export-state message and moved the collection on to Success: the run is still RECEIVED,
/// and the retry that skipped it once the collection was no longer Received lost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_all_received_is_sent_after_its_collection_moved_on_to_success() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let r = "corr-received-then-success";
    env.process(&msg(r, "db.a", json!({"files_exported": 1})))
        .await;
    env.process(&msg(r, "db.b", json!({"files_exported": 1})))
        .await;
    env.process(&file(r, "db.a", "a1")).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.a");
    unbind_monitoring(&env).await;
    let mut retried = env.hs.watch_first_retry().await;
    env.send(&file(r, "db.b", "b1")).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.b");
    next(&mut retried).await;
    assert_eq!(
        env.store.product_status(r).await.unwrap().as_deref(),
        Some("RECEIVED")
    );
    // The sender acts on the export-state message while the file's retries wait.
    let done = env
        .process(&msg(r, "db.b", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(done["collection_name"], "db.b", "{done}");
    assert_eq!(env.collection(r, "db.b").await.status, "Success");
    let mut monitoring = watch(&env.hs.ch, &env.monitoring_ex, "#").await;
    let m = json_of(&next(&mut monitoring).await);
    assert_eq!(
        m["title_text"], "Incremental - All collections received by NiFi",
        "{m}"
    );
    assert_eq!(m["custom_elements"][1]["value"], r, "{m}");
    assert_eq!(
        json_of(&next(&mut env.out).await)["collection_name"],
        "db.b"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// As above with the run's only collection: its success file completes the run while the
/// file that made it RECEIVED waits for its retry, whose refused "all received" alert was
/// then never sent (the product no longer RECEIVED, nothing named its maker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_all_received_is_sent_after_its_run_completed() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let r = "corr-received-then-completed";
    env.process(&msg(r, "db.a", json!({"files_exported": 1})))
        .await;
    unbind_monitoring(&env).await;
    let mut retried = env.hs.watch_first_retry().await;
    env.send(&file(r, "db.a", "a1")).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.a");
    next(&mut retried).await;
    // The sender acts on the export-state message while the file's retries wait; the
    // success file's own "all successful" is refused too, and retried.
    env.send(&msg(r, "db.a", json!({"is_success_file": "true"})))
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.store.product_status(r).await.unwrap().as_deref() != Some("COMPLETED") {
        assert!(tokio::time::Instant::now() < deadline, "the run completes");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut monitoring = watch(&env.hs.ch, &env.monitoring_ex, "#").await;
    let mut titles = Vec::new();
    for _ in 0..2 {
        let m = json_of(&next(&mut monitoring).await);
        assert_eq!(m["custom_elements"][1]["value"], r, "{m}");
        titles.push(m["title_text"].as_str().unwrap_or_default().to_string());
    }
    titles.sort();
    assert_eq!(
        titles,
        [
            "Incremental - All collections received by NiFi",
            "Incremental - All collections successful"
        ],
        "each alert once"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// Both kinds set to one exchange, only the monitoring key bound there: the unroutable
/// export-state message holds back only what goes to its own key — the all-received alert
/// still goes at once (held per exchange, it waited for the export-state consumer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_exchange_for_both_kinds_holds_back_only_the_refused_key() {
    let dir = tempfile::tempdir().unwrap();
    let url = db::default_url(dir.path(), "snapshot-status");
    let shared = unique("snapshot-out");
    let cfg = service_config::<SnapshotStatus>(
        dir.path(),
        &[
            ("snapshot_status.database_url", url.as_str()),
            ("snapshot_status.export_state_exchange", shared.as_str()),
            ("snapshot_status.monitoring_exchange", shared.as_str()),
            ("amqp.prefetch", "1"),
        ],
    );
    let mut hs = Harness::start_service::<SnapshotStatus>(cfg).await;
    let mut out = hs.watch_output().await;
    let mut monitoring = watch(&hs.ch, &shared, "monitoring.#").await;
    let c = "corr-shared-exchange";
    let send = |body: Value| {
        let hs = &hs;
        async move {
            hs.publish(
                "snapshot.status.update",
                &serde_json::to_vec(&body).unwrap(),
                BasicProperties::default(),
            )
            .await
        }
    };
    send(msg(c, "db.s", json!({"files_exported": 1}))).await;
    next(&mut out).await;
    let mut retried = hs.watch_first_retry().await;
    send(file(c, "db.s", "s1")).await;
    let m = json_of(&next(&mut monitoring).await);
    assert!(
        m["title_text"]
            .as_str()
            .is_some_and(|t| t.contains("All collections received")),
        "{m}"
    );
    assert_eq!(m["custom_elements"][1]["value"], c);
    // The export-state message, unroutable, goes with the retry.
    next(&mut retried).await;
    hs.stop().await;
    cleanup(vec![], vec![shared]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_export_state_message_is_retried_until_bound() {
    let mut env = start_unbound(&[]).await;
    let c = "corr-unroutable";
    env.process(&msg(c, "db.u", json!({"files_exported": 1})))
        .await;
    // Nothing is bound to the export-state exchange: the message is unroutable, and its
    // attempt goes to the retry tier (a copy here proves it, before anything is bound).
    let mut retried = env.hs.watch_first_retry().await;
    env.send(&file(c, "db.u", "u1")).await;
    next(&mut retried).await;
    assert_eq!(env.collection(c, "db.u").await.status, "Received");
    // Once something is bound, a retry delivers the export-state message.
    let mut export = watch(&env.hs.ch, &env.export_ex, "#").await;
    let e = json_of(&next(&mut export).await);
    assert_eq!(e["topic_name"], "db.u");
    assert_eq!(e["correlation_id"], c);
    // ... and its success message comes from that later attempt: the first was not acked
    // as done (Received and forgotten).
    let done = json_of(&next(&mut env.out).await);
    // Counted once, by this message (at its first attempt): said so in its report, as
    // the report of a file it counted at once says.
    assert_eq!(done["counted"], true, "this message's count");
    assert_eq!(env.dlq_count().await, 0);
    assert_eq!(env.collection(c, "db.u").await.files_received, 1);
    env.finish().await;
}

/// A batch retried until its attempts run out (its export-state message is unroutable)
/// dead-letters its bad record once: the retries carry which records are already
/// dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_dead_letters_its_bad_record_once() {
    let mut env = start_unbound(&[("retry.max_attempts", "3")]).await;
    let c = "corr-batch-retry";
    env.process(&msg(c, "db.b", json!({"files_exported": 1})))
        .await;
    env.send(&json!({"Records": [
        {"body": msg(c, "db.b", json!({"export_date": ""}))},
        {"body": file(c, "db.b", "b1")},
    ]}))
    .await;
    // Three attempts: the bad record, once, then the batch itself.
    let mut dlq = env.hs.watch_dlq().await;
    let record = next(&mut dlq).await;
    assert_eq!(
        header(&record, "x-error-kind").as_deref(),
        Some("permanent")
    );
    let batch = next(&mut dlq).await;
    assert_eq!(
        header(&batch, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    assert!(
        next_within(&mut dlq, Duration::from_millis(300))
            .await
            .is_none(),
        "the bad record once, not once per attempt"
    );
    assert!(env.out_is_empty().await, "no attempt succeeded");
    env.finish().await;
}

/// A batch whose export-state message is unroutable is retried; its monitoring message,
/// confirmed on the first attempt, is not sent again by the retries (one Slack alert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_sends_what_it_published_once() {
    let mut env = start(Backend::Sqlite, &[("retry.max_attempts", "3")]).await;
    let (done, open) = ("corr-once-done", "corr-once-open");
    // `done`'s only collection is Received: its success file completes the product.
    env.process(&msg(done, "db.d", json!({"files_exported": 1})))
        .await;
    env.process(&file(done, "db.d", "d1")).await;
    next(&mut env.export).await;
    env.process(&msg(open, "db.o", json!({"files_exported": 1})))
        .await;
    unbind_export(&env).await;
    env.send(&json!({"Records": [
        {"body": msg(done, "db.d", json!({"is_success_file": "true"}))},
        {"body": file(open, "db.o", "o1")},
    ]}))
    .await;
    // Every attempt fails on `open`'s export-state message, until the attempts run out.
    let mut dlq = env.hs.watch_dlq().await;
    let batch = next(&mut dlq).await;
    assert_eq!(
        header(&batch, "x-error-kind").as_deref(),
        Some("retries-exhausted")
    );
    let m = json_of(&env.monitoring.next().await);
    assert_eq!(m["custom_elements"][1]["value"], done);
    assert!(
        env.monitoring
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "one monitoring message, not one per attempt"
    );
    env.finish().await;
}

/// A batch that sent thousands of messages and is then retried (its success file ahead of
/// its collection) carries its marks in the retry: marked by their text (about 100 bytes
/// each), they outgrew an AMQP frame, the retry went to the DLQ without them, and its
/// replay sent every export-state message again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_batch_of_thousands_of_records_sends_each_message_once() {
    const N: usize = 2500;
    let mut env = start(Backend::Sqlite, &[]).await;
    let c = "corr-thousand";
    let mut retried = env.hs.watch_first_retry().await;
    let mut records: Vec<Value> = (0..N)
        .map(|i| {
            json!({"body": msg(c, &format!("db.collection.{i:05}"), json!({"files_exported": 0}))})
        })
        .collect();
    records.push(json!({"body": msg(c, "db.late", json!({"is_success_file": "true"}))}));
    env.send(&json!({ "Records": records })).await;
    let r = next(&mut retried).await;
    let marks = header(&r, snapshot_status::PUBLISHED_HEADER).expect("the marks kept");
    assert!(marks.len() < 8192, "{} bytes of marks", marks.len());
    // Its collection comes: the success file is taken at a retry and the batch is done.
    env.send(&msg(c, "db.late", json!({"files_exported": 0})))
        .await;
    let mut seen = std::collections::HashSet::new();
    while seen.len() < N + 1 {
        let e = json_of(&next(&mut env.export).await);
        let topic = e["topic_name"].as_str().unwrap_or_default().to_string();
        assert!(seen.insert(topic.clone()), "{topic} sent twice");
    }
    let done = loop {
        let o = json_of(&next(&mut env.out).await);
        if o.get("records").is_some() {
            break o;
        }
    };
    assert_eq!(done["records_total"], N + 1, "{done}");
    assert!(
        next_within(&mut env.export, Duration::from_millis(300))
            .await
            .is_none(),
        "an export-state message sent again"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_file_without_message_id_counts_once_when_redelivered() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let c = "corr-unnamed";
    env.process(&msg(c, "db.w", json!({"files_exported": 2})))
        .await;
    // No filename, no message id: the same content delivered twice is one file.
    let unnamed = msg(c, "db.w", json!({}));
    let r = env.process(&unnamed).await;
    assert_eq!(r["counted"], true);
    let r = env.process(&unnamed).await;
    assert_eq!(r["counted"], false);
    assert_eq!(r["files_received"], 1);
    assert_eq!(r["status"], "Exported");
    // The same body inside a Records envelope is the same content too.
    let r = env.process(&json!({"Records": [{"body": unnamed}]})).await;
    assert_eq!(r["records"][0]["counted"], false);
    // Two alike in one envelope (the seed's producer: unnamed files as records of one
    // message) are two files; the envelope delivered again counts none more.
    env.process(&msg(c, "db.x", json!({"files_exported": 2})))
        .await;
    let twins = json!({"Records": [
        {"body": msg(c, "db.x", json!({}))},
        {"body": msg(c, "db.x", json!({}))},
    ]});
    let r = env.process(&twins).await;
    assert_eq!(r["records"][0]["counted"], true, "{r}");
    assert_eq!(r["records"][1]["counted"], true, "{r}");
    assert_eq!(r["records"][1]["status"], "Received", "{r}");
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.x");
    let r = env.process(&twins).await;
    assert_eq!(r["records"][0]["counted"], false, "{r}");
    assert_eq!(r["records"][1]["counted"], false, "{r}");
    assert_eq!(r["records"][1]["files_received"], 2, "{r}");
    env.no_more().await;
    env.finish().await;
}

/// Unnamed files that came through SQS are told apart by their SQS `messageId`: two files
/// of identical content count twice (the collection completes), and the same SQS messages
/// delivered again, in a new message without an id, count no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_files_from_sqs_count_once_each_by_their_sqs_message_id() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let c = "corr-sqs";
    env.process(&msg(c, "db.s", json!({"files_exported": 2})))
        .await;
    let unnamed = msg(c, "db.s", json!({}));
    let batch = |ids: [&str; 2]| {
        json!({"Records": ids.map(|id| json!({"messageId": id, "eventSource": "aws:sqs",
            "body": unnamed.to_string()}))})
    };
    let r = env.process(&batch(["sqs-a", "sqs-b"])).await;
    assert_eq!(r["records"][0]["counted"], true, "{r}");
    assert_eq!(r["records"][1]["counted"], true, "{r}");
    assert_eq!(r["records"][1]["status"], "Received", "{r}");
    let state = json_of(&next(&mut env.export).await);
    env.received_once(c).await;
    assert_eq!(state["topic_name"], "db.s");
    let r = env.process(&batch(["sqs-b", "sqs-a"])).await;
    assert_eq!(r["records"][0]["counted"], false, "{r}");
    assert_eq!(r["records"][1]["counted"], false, "{r}");
    assert_eq!(r["records"][1]["files_received"], 2, "{r}");
    // Two different files a bridge gave one id are two files.
    env.process(&msg(c, "db.t", json!({"files_exported": 2})))
        .await;
    let records: Vec<Value> = ["t1", "t2"]
        .iter()
        .map(|f| {
            json!({"messageId": "same", "eventSource": "aws:sqs",
                   "body": msg(c, "db.t", json!({"reference": f})).to_string()})
        })
        .collect();
    let one_id = json!({ "Records": records });
    let r = env.process(&one_id).await;
    assert_eq!(r["records"][1]["counted"], true, "{r}");
    assert_eq!(r["records"][1]["status"], "Received", "{r}");
    env.received_once(c).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.t");
    env.no_more().await;
    env.finish().await;
}

/// The original lambda reads the file's name from `file_name` (its FILE_NAME_FIELD_NAME):
/// one file sent twice under different message ids counts once, as with `filename`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_named_by_file_name_counts_once() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let c = "corr-file-name";
    env.process(&msg(c, "db.n", json!({"files_exported": 2})))
        .await;
    let named = msg(c, "db.n", json!({"file_name": "n1.gz.enc"}));
    let mut replies = Vec::new();
    for id in ["fn-1", "fn-2"] {
        env.send_with(
            &named,
            BasicProperties::default().with_message_id(id.into()),
        )
        .await;
        replies.push(json_of(&next(&mut env.out).await));
    }
    assert_eq!(replies[0]["counted"], true);
    assert_eq!(replies[0]["filename"], "n1.gz.enc");
    assert_eq!(replies[1]["counted"], false);
    assert_eq!(replies[1]["files_received"], 1);
    assert_eq!(env.collection(c, "db.n").await.files_received, 1);
    env.no_more().await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_booleans_and_numbers_are_taken_as_their_text() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let r = env
        .process(&json!({"correlation_id": 42, "collection_name": "db.t",
                         "snapshot_type": true, "export_date": 20200101, "files_sent": 1}))
        .await;
    assert_eq!(r["correlation_id"], "42");
    assert_eq!(r["status"], "Sent");
    assert_eq!(env.collection("42", "db.t").await.files_sent, Some(1));
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

on_both!(instances_share_state_without_races);
on_both!(a_success_file_before_its_collection_waits_for_it);

/// Two service instances on one database count concurrently delivered files exactly once
/// and make each transition exactly once.
async fn instances_share_state_without_races(b: Backend) {
    let mut env = start(b, &[("amqp.prefetch", "16")]).await;
    let url = match &env.pg {
        Some(p) => p.url.clone(),
        None => db::default_url(env.dir.path(), "snapshot-status"),
    };
    let second_dir = tempfile::tempdir().unwrap();
    let cfg = service_config::<SnapshotStatus>(
        second_dir.path(),
        &[
            ("snapshot_status.database_url", url.as_str()),
            (
                "snapshot_status.export_state_exchange",
                env.export_ex.as_str(),
            ),
            (
                "snapshot_status.monitoring_exchange",
                env.monitoring_ex.as_str(),
            ),
            ("amqp.prefetch", "16"),
        ],
    );
    let mut other = Harness::start_service::<SnapshotStatus>(cfg).await;
    let mut other_out = other.watch_output().await;
    let c = "corr-race";
    let n = 30;
    // Every file goes to both instances (a duplicate delivered concurrently): each is
    // counted once all the same.
    for i in 0..n {
        let f = file(c, "db.p", &format!("p{i}"));
        env.send(&f).await;
        other
            .publish(
                "snapshot.status.update",
                &serde_json::to_vec(&f).unwrap(),
                BasicProperties::default(),
            )
            .await;
    }
    for _ in 0..n {
        next(&mut env.out).await;
        next(&mut other_out).await;
    }
    assert_eq!(env.collection(c, "db.p").await.files_received, i64::from(n));
    // The counts, then the last files split between the instances: one transition.
    let total = n + 20;
    env.process(&msg(c, "db.p", json!({"files_sent": total})))
        .await;
    for i in n..total {
        let f = file(c, "db.p", &format!("p{i}"));
        if i % 2 == 0 {
            env.send(&f).await;
        } else {
            other
                .publish(
                    "snapshot.status.update",
                    &serde_json::to_vec(&f).unwrap(),
                    BasicProperties::default(),
                )
                .await;
        }
    }
    for _ in 0..(total - n) / 2 {
        next(&mut env.out).await;
        next(&mut other_out).await;
    }
    let n = total;
    let col = env.collection(c, "db.p").await;
    assert_eq!(col.files_received, i64::from(n));
    assert_eq!(col.status, "Received");
    let e = json_of(&next(&mut env.export).await);
    assert_eq!(e["topic_name"], "db.p");
    // Once, or again by the redelivered message that completed the run — which re-emits
    // its export-state message too.
    env.received_once(c).await;
    while env
        .received
        .next_within(Duration::from_millis(300))
        .await
        .is_some()
    {}
    while let Some(d) = next_within(&mut env.export, Duration::from_millis(300)).await {
        assert_eq!(json_of(&d)["topic_name"], "db.p");
    }
    env.no_more().await;
    other.stop().await;
    env.finish().await;
}

/// Waits (at most `WAIT`) until `cond` holds on the database.
async fn await_state<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Two replicas consuming ONE queue on one PostgreSQL database (how a scaled-out
/// deployment runs), with the files of three collections interleaved, every message
/// published twice, and one replica's connection closed by the broker mid-stream (its
/// unacked messages are redelivered, to either replica): the final state is exact — every
/// file counted once, every collection Received then Success, the product COMPLETED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_queue_reach_the_exact_final_state() {
    let name_a = unique("replica-a");
    let mut env = start(
        Backend::Postgres,
        &[
            ("amqp.prefetch", "16"),
            ("amqp.connection_name", name_a.as_str()),
        ],
    )
    .await;
    let url = env.pg.as_ref().map(|p| p.url.clone()).expect("postgres");
    let name_b = unique("replica-b");
    let second_dir = tempfile::tempdir().unwrap();
    let cfg = replica_config::<SnapshotStatus>(
        second_dir.path(),
        &env.hs,
        &[
            ("snapshot_status.database_url", url.as_str()),
            (
                "snapshot_status.export_state_exchange",
                env.export_ex.as_str(),
            ),
            (
                "snapshot_status.monitoring_exchange",
                env.monitoring_ex.as_str(),
            ),
            ("amqp.prefetch", "16"),
            ("amqp.connection_name", name_b.as_str()),
        ],
    );
    let mut other = Harness::start_service::<SnapshotStatus>(cfg).await;
    let c = "corr-replicas";
    let collections = ["db.x", "db.y", "db.z"];
    let per = 40;
    let mut sent = 0;
    for coll in collections {
        env.process(&msg(c, coll, json!({"files_sent": per}))).await;
        sent += 1;
    }
    // Files of the three collections interleaved, each published twice.
    for i in 0..per {
        for coll in collections {
            let f = file(c, coll, &format!("{coll}-{i}.gz.enc"));
            env.send(&f).await;
            env.send(&f).await;
            sent += 2;
        }
        if i == per / 2 {
            // Replica B loses its connection with messages in flight: redelivered.
            let closed = close_connection_named(&name_b).await;
            assert_eq!(closed, 1, "replica B's connection closed by the broker");
        }
    }
    let store = &env.store;
    await_state("every collection Received", || async {
        store
            .collections(c)
            .await
            .unwrap()
            .iter()
            .filter(|k| k.status == "Received")
            .count()
            == collections.len()
    })
    .await;
    for coll in collections {
        let s = msg(
            c,
            coll,
            json!({"is_success_file": "true", "filename": "_SUCCESS"}),
        );
        env.send(&s).await;
        env.send(&s).await;
        sent += 2;
    }
    await_state("the product COMPLETED", || async {
        store.product_status(c).await.unwrap().as_deref() == Some("COMPLETED")
    })
    .await;
    // Every message handled: the queue drained, then both replicas stopped (each finishes
    // what it holds).
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready_count(&env.hs.ch, &env.hs.q).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "queue drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.stop().await;
    env.hs.stop().await;
    let mut outputs = 0;
    while next_within(&mut env.out, Duration::from_millis(300))
        .await
        .is_some()
    {
        outputs += 1;
    }
    let cols = env.store.collections(c).await.unwrap();
    assert_eq!(cols.len(), collections.len());
    for k in &cols {
        assert_eq!(k.status, "Success", "{k:?}");
        assert_eq!(
            k.files_received,
            i64::from(per),
            "each file counted once: {k:?}"
        );
        assert_eq!(k.files_sent, Some(i64::from(per)));
    }
    // Outputs are at least once: the file that completed a collection re-emits its
    // export-state message when redelivered; each collection's comes at least once.
    let mut exports = std::collections::HashMap::<String, usize>::new();
    while let Some(d) = next_within(&mut env.export, Duration::from_millis(300)).await {
        *exports
            .entry(json_of(&d)["topic_name"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for coll in collections {
        assert!(exports.get(coll).is_some_and(|n| *n >= 1), "{exports:?}");
    }
    let mut monitoring = 0;
    while env
        .monitoring
        .next_within(Duration::from_millis(300))
        .await
        .is_some()
    {
        monitoring += 1;
    }
    assert!(monitoring >= 1, "the all-successful message was sent");
    assert_eq!(env.dlq_count().await, 0, "nothing dead-lettered");
    println!(
        "| 2 replicas of snapshot-status on one queue and one PostgreSQL, {} files of 3 collections interleaved, each sent twice, one replica's connection closed mid-stream | {sent} | 0 | every message sent twice; {outputs} success outputs | exact final state: every file counted once, 3 × Received → Success, COMPLETED; export-state messages per collection {exports:?}, monitoring {monitoring} |",
        per * 3
    );
    env.finish().await;
    // Dropped last: a harness deletes the queue and exchanges it shares with the first.
    drop(other);
}

/// Retry tiers of [`bus_command`]'s service.
const BUS_DELAYS: [u64; 2] = [200, 400];

/// The `snapshot-status` binary on the suite's broker (config files from `config_dir`,
/// none there: the built-in defaults) with every name its topology holds unique to this
/// call: queue `q` (its tiers [`BUS_DELAYS`]), exchanges `<q>-in` (the producer's),
/// `<q>-out`, `<q>-export-state` and `<q>-monitoring`; never the production names on the
/// shared broker. The guard deletes all of them, pass or fail.
fn bus_command(q: &str, config_dir: &std::path::Path) -> (std::process::Command, Cleanup) {
    let (export, monitoring) = (format!("{q}-export-state"), format!("{q}-monitoring"));
    let mut queues = vec![q.to_string(), format!("{q}-dlq")];
    queues.extend(BUS_DELAYS.iter().map(|d| format!("{q}-retry-{d}")));
    let exchanges = ["in", "out", "retry", "fail", "export-state", "monitoring"]
        .iter()
        .map(|x| format!("{q}-{x}"))
        .collect();
    let cleanup = Cleanup::new(queues, exchanges);
    let delays = BUS_DELAYS.map(|d| d.to_string()).join(",");
    let mut c = service_command(
        env!("CARGO_BIN_EXE_snapshot-status"),
        "snapshot_status",
        q,
        &amqp_url(),
        config_dir,
    );
    c.env_remove("APP_ENV")
        .env_remove("STORAGETIER_CONFIG_DIR")
        .env("STORAGETIER__RETRY__DELAYS_MS", delays)
        .env(
            "STORAGETIER__SNAPSHOT_STATUS__EXPORT_STATE_EXCHANGE",
            export,
        )
        .env(
            "STORAGETIER__SNAPSHOT_STATUS__MONITORING_EXCHANGE",
            monitoring,
        );
    (c, cleanup)
}

#[test]
fn an_empty_exchange_name_is_refused_by_the_bus_commands_too() {
    // The export-state and monitoring exchanges are part of this service's topology:
    // `declare` and `definitions` check them although they skip the run-only checks.
    // A name longer than AMQP carries panicked in lapin's declaration instead.
    let dir = tempfile::tempdir().unwrap();
    let long = "x".repeat(300);
    for bad in [" ", long.as_str(), "amq.export"] {
        for cmd in ["declare", "definitions", "check-config"] {
            // Unique names: were the refusal to regress, `declare` would declare the rest
            // of the topology before failing (if it failed), and leave it.
            let (mut c, _cleanup) = bus_command(&unique("snapshot-status"), dir.path());
            let o = c
                .arg(cmd)
                .env("STORAGETIER__SNAPSHOT_STATUS__EXPORT_STATE_EXCHANGE", bad)
                .output_within(WAIT)
                .unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(2), "{cmd} {bad}: {err}");
            assert!(
                err.contains("snapshot_status.export_state_exchange"),
                "{cmd}: {err}"
            );
        }
    }
}

/// An export-state or monitoring exchange that is a `-fail` or `-retry` exchange of a
/// topology (this service's or another's) is refused naming the key, by the bus commands
/// too: its messages landed in that service's queues as retries or dead letters.
#[test]
fn an_exchange_of_a_services_topology_is_refused_as_export_state_or_monitoring() {
    let dir = tempfile::tempdir().unwrap();
    for (key, var) in [
        (
            "snapshot_status.export_state_exchange",
            "STORAGETIER__SNAPSHOT_STATUS__EXPORT_STATE_EXCHANGE",
        ),
        (
            "snapshot_status.monitoring_exchange",
            "STORAGETIER__SNAPSHOT_STATUS__MONITORING_EXCHANGE",
        ),
    ] {
        for cmd in ["declare", "check-config"] {
            let q = unique("snapshot-status");
            for bad in [
                format!("{q}-fail"),
                format!("{q}-retry"),
                "storagetier-online-archive-fail".to_string(),
            ] {
                let (mut c, _cleanup) = bus_command(&q, dir.path());
                let o = c.arg(cmd).env(var, &bad).output_within(WAIT).unwrap();
                let err = String::from_utf8_lossy(&o.stderr);
                assert_eq!(o.status.code(), Some(2), "{cmd} {bad}: {err}");
                assert!(
                    err.contains(key) && err.contains("exchange of"),
                    "{cmd}: {err}"
                );
            }
        }
    }
}

/// Design §2/§7: the service owns its export-state and monitoring exchanges, and `declare`
/// declares them as every exchange of the bus is: durable topic exchanges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_makes_its_export_state_and_monitoring_exchanges_durable_topics() {
    use framework::lapin::ExchangeKind;
    use framework::lapin::options::ExchangeDeclareOptions;
    use framework::lapin::types::FieldTable;
    let dir = tempfile::tempdir().unwrap();
    let q = unique("snapshot-status");
    let (mut c, _cleanup) = bus_command(&q, dir.path());
    let o = tokio::task::spawn_blocking(move || c.arg("declare").output_within(WAIT))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for ex in [format!("{q}-export-state"), format!("{q}-monitoring")] {
        // There (a passive declaration of a missing exchange closes the channel: 404)...
        let (_conn, ch) = test_channel().await;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        };
        ch.exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{ex} declared: {e}"));
        // ...and a durable topic exchange: the broker accepts a declaration of an existing
        // exchange only with its own kind and durability (else 406, the channel closed).
        let (_conn, ch) = test_channel().await;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            ex.as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("{ex} is a durable topic exchange: {e}"));
    }
}

/// A filename PostgreSQL refuses to index (8,000 random hex digits, over 2,704 bytes after
/// compression) is the message's fault, not the database's: Permanent at once (alone in a
/// batch, the other records handled), not retried until the attempts run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_the_database_cannot_index_is_permanent() {
    let mut env = start(Backend::Postgres, &[]).await;
    let c = "corr-unindexable";
    env.process(&msg(c, "db.l", json!({"files_exported": 2})))
        .await;
    let long: String = (0..250)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let mut dlq = env.hs.watch_dlq().await;
    env.send(&file(c, "db.l", &long)).await;
    let dl = next(&mut dlq).await;
    assert_eq!(header(&dl, "x-error-kind").as_deref(), Some("permanent"));
    assert!(header(&dl, "x-error").unwrap().contains("refuses"));
    env.send(&json!({"Records": [
        {"body": file(c, "db.l", &long)},
        {"body": file(c, "db.l", "fits")},
    ]}))
    .await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(r["records"][1]["counted"], true);
    expect_only_record_dead_lettered(&mut dlq, 1).await;
    assert_eq!(env.collection(c, "db.l").await.files_received, 1);
    env.finish().await;
}

/// Records dead-lettered one by one from a batch with a message id, mended and replayed,
/// each count as the record they were: the dead letter names its part
/// (`x-batch-part`), kept through the replay. Before, each replay arrived as a single
/// message of the batch's id, keyed as its record 1: the first was "already counted"
/// and the collection never completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_records_of_one_batch_count_as_their_own_records() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let mut dlq = env.hs.watch_dlq().await;
    let c = "corr-parts";
    env.process(&msg(c, "db.p", json!({"files_exported": 3})))
        .await;
    let bad = msg(c, "db.p", json!({"export_date": ""}));
    env.send_with(
        &json!({"Records": [{"body": msg(c, "db.p", json!({}))}, {"body": bad}, {"body": bad}]}),
        BasicProperties::default().with_message_id("batch-1".into()),
    )
    .await;
    let r = json_of(&next(&mut env.out).await);
    assert_eq!(r["records"][0]["files_received"], 1);
    let mut parts = Vec::new();
    for _ in 0..2 {
        let d = next(&mut dlq).await;
        assert_eq!(
            d.properties.message_id().as_ref().map(|m| m.as_str()),
            Some("batch-1")
        );
        parts.push(header(&d, "x-batch-part").expect("the part is named"));
    }
    assert_eq!(parts, ["2", "3"]);
    // The records mended (the producer's fix) and replayed as `dlq replay` sends them:
    // the batch's message id and the part header kept.
    for part in &parts {
        let mut h = framework::lapin::types::FieldTable::default();
        framework::headers::set_str(&mut h, "x-batch-part", part);
        framework::headers::set_str(&mut h, "x-original-exchange", "snapshot-sender");
        framework::headers::set_str(&mut h, "x-original-routing-key", "snapshot.status.update");
        let props = BasicProperties::default()
            .with_message_id("batch-1".into())
            .with_headers(h);
        // Through the default exchange to the service's queue, as a replay goes.
        publish(
            &env.hs.ch,
            "",
            &env.hs.q,
            &serde_json::to_vec(&msg(c, "db.p", json!({}))).unwrap(),
            props,
        )
        .await;
        let r = json_of(&next(&mut env.out).await);
        assert_eq!(r["counted"], true, "part {part}: {r}");
    }
    assert_eq!(env.collection(c, "db.p").await.files_received, 3);
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.p");
    env.finish().await;
}

/// The sender sends collections one after another: a run whose every known collection is
/// Success is COMPLETED (and announced), but a collection heard of afterwards reopens it,
/// and the run is RECEIVED, COMPLETED and announced again when that one gets there too —
/// as the original lambda checked "all collections" anew on each success. Before, the run
/// stayed COMPLETED with the late collection in flight and its real end was never sent.
async fn a_collection_arriving_after_the_run_completed_reopens_it(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-late";
    env.collection_received(c, "db.a").await;
    let r = env
        .process(&msg(c, "db.a", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    env.monitoring.next().await;

    // db.b: its counts reopen the run, its file makes it RECEIVED again, its success
    // file COMPLETED again, announced again.
    let r = env
        .process(&msg(c, "db.b", json!({"files_exported": 1})))
        .await;
    assert_eq!(r["status"], "Exported");
    assert_eq!(r["product_status"], Value::Null, "the run is open again");
    let r = env.process(&file(c, "db.b", "b1")).await;
    assert_eq!(r["product_status"], "RECEIVED");
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.b");
    env.received_once(c).await;
    let r = env
        .process(&msg(c, "db.b", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    assert_eq!(
        json_of(&env.monitoring.next().await)["title_text"],
        "Incremental - All collections successful"
    );
    // An empty collection (0 files exported) is Received at once: the run, COMPLETED,
    // is only RECEIVED again until that collection's success file completes it.
    let r = env
        .process(&msg(c, "db.empty", json!({"files_exported": 0})))
        .await;
    assert_eq!(r["status"], "Received");
    assert_eq!(r["product_status"], "RECEIVED", "not COMPLETED any more");
    assert_eq!(
        json_of(&next(&mut env.export).await)["topic_name"],
        "db.empty"
    );
    env.received_once(c).await;
    let r = env
        .process(&msg(c, "db.empty", json!({"is_success_file": "true"})))
        .await;
    assert_eq!(r["product_status"], "COMPLETED");
    assert_eq!(
        json_of(&env.monitoring.next().await)["title_text"],
        "Incremental - All collections successful"
    );
    // A file of a collection not heard of before (no counts yet) reopens it as well.
    let r = env.process(&file(c, "db.c", "c1")).await;
    assert_eq!(r["status"], "Pending");
    assert_eq!(r["product_status"], Value::Null);
    env.no_more().await;
    env.finish().await;
}

/// One batch can hold the end of one collection and the whole of the next small one: the
/// run is RECEIVED, reopened by the new collection and RECEIVED again within one message,
/// and each reception is announced. Before, the first announcement's mark (one per run)
/// skipped the second, while the record's report listed it as published.
async fn a_batch_that_reopens_its_run_announces_each_reception(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-batch-reopen";
    let r = env
        .process(&json!({"Records": [
            {"body": msg(c, "db.a", json!({"files_exported": 1}))},
            {"body": file(c, "db.a", "a1")},
            {"body": msg(c, "db.b", json!({"files_exported": 1}))},
            {"body": file(c, "db.b", "b1")},
        ]}))
        .await;
    let recs = r["records"].as_array().expect("records");
    assert_eq!(recs[1]["product_status"], "RECEIVED");
    assert_eq!(recs[2]["product_status"], Value::Null, "reopened");
    assert_eq!(recs[3]["product_status"], "RECEIVED");
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.a");
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.b");
    env.received_once(c).await;
    env.received_once(c).await;
    env.no_more().await;
    env.finish().await;
}

/// One batch can complete a run, reopen it (an empty collection, Received at once) and
/// complete it again: each completion is announced. Before, the first announcement's mark
/// (one per run) skipped the second, while the record's report listed it as published.
async fn a_batch_that_reopens_its_run_announces_each_completion(b: Backend) {
    let mut env = start(b, &[]).await;
    let c = "corr-batch-complete";
    env.collection_received(c, "db.a").await;
    // With a message id, as the bridge from SQS sends it: outputs' ids are derived from it.
    env.send_with(
        &json!({"Records": [
            {"body": msg(c, "db.a", json!({"is_success_file": "true"}))},
            {"body": msg(c, "db.b", json!({"files_exported": 0}))},
            {"body": msg(c, "db.b", json!({"is_success_file": "true"}))},
        ]}),
        BasicProperties::default().with_message_id("batch-1".into()),
    )
    .await;
    let r = json_of(&next(&mut env.out).await);
    let recs = r["records"].as_array().expect("records");
    assert_eq!(recs[0]["product_status"], "COMPLETED");
    assert_eq!(recs[1]["product_status"], "RECEIVED", "reopened");
    assert_eq!(recs[2]["product_status"], "COMPLETED");
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.b");
    env.received_once(c).await;
    let mut ids = std::collections::BTreeSet::new();
    for _ in 0..2 {
        let d = env.monitoring.next().await;
        assert_eq!(
            json_of(&d)["title_text"],
            "Incremental - All collections successful"
        );
        // Two announcements of one body: each its own message id, or a consumer that
        // drops duplicates by id (as it should) drops the run's real end.
        ids.insert(d.properties.message_id().clone().map(|i| i.to_string()));
    }
    assert_eq!(ids.len(), 2, "{ids:?}");
    env.no_more().await;
    env.finish().await;
}

/// A success file can overtake its collection's counts (another handler or instance, a
/// counts message held in a retry tier): it waits in the retry tiers for the collection
/// instead of being dropped — dropped, the collection never reached Success and its run
/// never completed — and completes the run once the collection is Received.
async fn a_success_file_before_its_collection_waits_for_it(b: Backend) {
    // Its 6 retries span about 10 s here (2.2 s with the test's usual tiers): enough for
    // the collection's messages to follow on a loaded machine.
    let mut env = start(b, &[("retry.delays_ms", "[200, 2000]")]).await;
    let c = "corr-early";
    let mut retried = env.hs.watch_first_retry().await;
    env.send(&msg(c, "db.e", json!({"is_success_file": "true"})))
        .await;
    next(&mut retried).await;
    env.send(&msg(c, "db.e", json!({"files_exported": 1})))
        .await;
    env.send(&file(c, "db.e", "e1")).await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.e");
    env.received_once(c).await;
    assert_eq!(
        json_of(&env.monitoring.next().await)["title_text"],
        "Incremental - All collections successful"
    );
    assert_eq!(
        env.store.product_status(c).await.unwrap().as_deref(),
        Some("COMPLETED")
    );
    // The usual overtake: the collection's file first (Pending), its success file, then
    // its counts — the success file waits for them too.
    let c2 = "corr-early-2";
    env.send(&file(c2, "db.f", "f1")).await;
    env.send(&msg(c2, "db.f", json!({"is_success_file": "true"})))
        .await;
    next(&mut retried).await;
    env.send(&msg(c2, "db.f", json!({"files_exported": 1})))
        .await;
    assert_eq!(json_of(&next(&mut env.export).await)["topic_name"], "db.f");
    env.received_once(c2).await;
    assert_eq!(
        json_of(&env.monitoring.next().await)["title_text"],
        "Incremental - All collections successful"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// A batch's success body reports its first 1,000 records one by one and counts the rest:
/// reported whole, a batch of small records made a success body larger than the broker
/// takes (each report is about twice its record), refused after all the work was done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_reports_its_first_records_and_counts_the_rest() {
    let mut env = start(Backend::Sqlite, &[]).await;
    let c = "corr-many";
    let records: Vec<Value> = (0..1005)
        .map(|i| json!({"body": file(c, "db.m", &format!("f{i}"))}))
        .collect();
    let r = env.process(&json!({ "Records": records })).await;
    assert_eq!(r["records"].as_array().map(Vec::len), Some(1000));
    assert_eq!(r["records"][999]["record"], 1000);
    assert_eq!(r["records_total"], 1005);
    assert_eq!(r["records_not_shown"], 5);
    assert_eq!(env.collection(c, "db.m").await.files_received, 1005);
    env.finish().await;
}

/// `status` on a PostgreSQL database the service never started on says that nothing is
/// recorded there yet (as for an SQLite file that is not there), not the driver's
/// `relation "snapshot_collections" does not exist`.
#[tokio::test]
async fn status_on_a_database_the_service_never_ran_on_says_so() {
    let pg = TempPostgres::create().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let o = isolated_command(env!("CARGO_BIN_EXE_snapshot-status"))
        .args(["status", "some-id"])
        .current_dir(dir.path())
        .env("STORAGETIER__STORAGE__DATA_DIR", dir.path())
        .env("STORAGETIER__SNAPSHOT_STATUS__DATABASE_URL", &pg.url)
        .output_within(WAIT)
        .unwrap();
    pg.drop_db().await.unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing recorded yet"), "{err}");
}

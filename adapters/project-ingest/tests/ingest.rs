//! project-ingest against the real RabbitMQ and real databases (SQLite and PostgreSQL).

use std::time::Duration;

use base64::Engine;
use db::testing::TempPostgres;
use framework::lapin::BasicProperties;
use framework::testing::*;
use project_ingest::ProjectIngest;
use project_ingest::store::Store;
use serde_json::{Value, json};

#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

struct Env {
    hs: Harness,
    store: Store,
    url: String,
    pg: Option<TempPostgres>,
    _dir: tempfile::TempDir,
}

/// A fresh database of `backend` (SQLite in `dir`) and its URL.
async fn database(backend: Backend, dir: &std::path::Path) -> (Option<TempPostgres>, String) {
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(TempPostgres::create().await.unwrap()),
    };
    let url = match &pg {
        Some(p) => p.url.clone(),
        None => db::default_url(dir, "project-ingest"),
    };
    (pg, url)
}

async fn start(backend: Backend, extra: &[(&str, &str)]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let (pg, url) = database(backend, dir.path()).await;
    let mut o: Vec<(&str, &str)> = vec![
        ("project_ingest.database_url", url.as_str()),
        // One message at a time, so "processed before" is observable.
        ("amqp.prefetch", "1"),
    ];
    o.extend_from_slice(extra);
    let cfg = service_config::<ProjectIngest>(dir.path(), &o);
    // Counters recorded from the first session on (`assert_dropped` reads them).
    let _recorder = framework::telemetry::metrics_handle();
    let hs = Harness::start_service::<ProjectIngest>(cfg).await;
    let store = Store::open(&url).await.unwrap();
    Env {
        hs,
        store,
        url,
        pg,
        _dir: dir,
    }
}

impl Env {
    async fn send(&self, body: &Value) {
        self.send_raw(&serde_json::to_vec(body).unwrap()).await;
    }
    async fn send_raw(&self, body: &[u8]) {
        self.send_raw_on("core.project.event", body).await;
    }
    /// Publishes `body` with routing key `key` (pluto-core's `core.project.create`…).
    async fn send_on(&self, key: &str, body: &Value) {
        self.send_raw_on(key, &serde_json::to_vec(body).unwrap())
            .await;
    }
    async fn send_raw_on(&self, key: &str, body: &[u8]) {
        self.hs.publish(key, body, BasicProperties::default()).await;
    }
    async fn finish(mut self) {
        self.hs.stop().await;
        self.store.close().await;
        if let Some(pg) = self.pg.take() {
            pg.drop_db().await.unwrap();
        }
    }
    async fn dlq_count(&self) -> u32 {
        ready_count(&self.hs.ch, &format!("{}-dlq", self.hs.q)).await
    }
}

fn project(kind: &str, id: &str, title: &str) -> Value {
    json!({"type": kind, "id": id, "title": title, "status": "New",
           "commissionId": "c-1", "commissionTitle": "Commission one",
           "productionOffice": "UK", "created": "2017-04-24T17:20:11.503Z"})
}

fn body(d: &framework::lapin::message::Delivery) -> Value {
    serde_json::from_slice(&d.data).unwrap()
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(v).unwrap())
}

fn kinesis(records: &[Value]) -> Value {
    let recs: Vec<Value> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            json!({"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "1",
                   "sequenceNumber": format!("4959{i}"), "data": b64(r),
                   "approximateArrivalTimestamp": 1_545_084_650.987 + i as f64},
                   "eventSource": "aws:kinesis", "eventID": format!("shardId-000:{i}")})
        })
        .collect();
    json!({ "Records": recs })
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
    created_stores_project_and_commission,
    updated_changes_a_known_project,
    update_of_unknown_project_is_dropped,
    update_of_a_project_never_seen_stays_unknown_after_its_commissions_deletion,
    a_move_out_that_overtook_its_create_across_a_deletion_is_stored,
    unknown_type_is_dropped,
    kinesis_envelopes_single_and_multiple,
    older_updates_never_overwrite_newer_ones,
    records_of_one_arrival_time_keep_their_sequence_order,
    a_plain_update_back_from_a_retry_tier_never_overwrites_a_newer_one,
    a_plain_update_of_the_same_second_back_from_a_retry_tier_never_overwrites_a_newer_one,
    a_plain_update_published_earlier_never_overwrites_a_newer_one,
    a_kinesis_update_without_arrival_time_never_overwrites_a_newer_one,
    pluto_core_entries_are_stored_then_updated,
    projects_stored_before_0002_survive_it,
    a_nul_character_is_permanent_naming_the_field,
    an_update_that_overtakes_its_create_waits_for_it,
    an_update_published_in_the_second_of_its_create_is_applied,
    a_batch_delivered_again_announces_with_the_same_ids,
    a_project_announced_first_by_a_redelivery_has_an_id_of_its_own,
    a_future_dated_event_does_not_freeze_its_project,
    an_update_applies_over_a_create_stamped_by_a_clock_ahead,
    a_plain_update_replayed_after_the_broker_dead_lettered_it_never_overwrites_a_newer_one,
    a_plain_update_redelivered_after_a_newer_one_keeps_its_first_place,
    a_retried_update_keeps_the_place_its_first_attempt_gave_it,
    updates_of_one_updated_time_keep_the_order_they_came_in,
    a_stamped_update_notes_when_it_was_first_seen,
    an_update_whose_receipt_could_not_be_noted_keeps_its_publishing_time,
    pluto_deletes_a_commission_and_its_projects,
    moves_across_a_deleted_commission_delivered_after_it_end_as_pluto_ordered_them,
    a_deletion_retried_with_its_batch_announces_what_it_deleted,
    a_retry_copy_another_consumer_published_is_dropped,
    ordered_replicas_consume_one_at_a_time_in_queue_order,
);

/// Runs `sql` on the database at `url` through a connection of its own.
async fn run_sql(url: &str, sql: &str) {
    use db::sqlx::Connection;
    db::sqlx::any::install_default_drivers();
    let mut conn = db::sqlx::AnyConnection::connect(url)
        .await
        .expect("connect");
    db::sqlx::query(sql).execute(&mut conn).await.expect(sql);
    conn.close().await.expect("close");
}

/// A stamped update whose first attempt cannot note its receipt (the database failing a
/// moment) is retried in the place its publishing time gives it, as a noted receipt would
/// have: its retry carried the attempt's own time, minutes after its publishing in a
/// backlog, and overwrote an update published after it and applied meanwhile.
async fn an_update_whose_receipt_could_not_be_noted_keeps_its_publishing_time(b: Backend) {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let (pg, url) = database(b, dir.path()).await;
    let store = Store::open(&url).await.unwrap();
    let p = project_ingest::ProjectProcessor::new(store.clone(), "out", "done");
    let now = chrono::Utc::now();
    let ctx = |id: &str, minutes_ago: i64, attempt: u32| {
        let mut c = MessageContext::for_test("pluto-core", "core.project.event", attempt);
        c.message_id = Some(id.to_string());
        c.timestamp = Some((now - chrono::TimeDelta::minutes(minutes_ago)).timestamp() as u64);
        c
    };
    p.handle(project("project-created", "nr", "v0"), &ctx("c", 10, 0))
        .await;
    // Published 3 minutes ago, first handled now, while its receipt cannot be noted.
    let older = project("project-updated", "nr", "older");
    run_sql(&url, "ALTER TABLE receipts RENAME TO receipts_away").await;
    let first = ctx("u1", 3, 0);
    let o = p.handle(older.clone(), &first).await;
    run_sql(&url, "ALTER TABLE receipts_away RENAME TO receipts").await;
    assert!(matches!(o, Outcome::Retry(_)), "{o:?}");
    // Published after it, applied while it waits in its retry tier.
    p.handle(project("project-updated", "nr", "newer"), &ctx("u2", 2, 0))
        .await;
    assert_eq!(store.project("nr").await.unwrap().unwrap().title, "newer");
    let mut retried = ctx("u1", 3, 1);
    for (k, v) in first.retry_headers() {
        framework::headers::set_str(&mut retried.headers, &k, &v);
    }
    framework::headers::set_str(
        &mut retried.headers,
        framework::headers::ORIGINAL_EXCHANGE,
        "pluto-core",
    );
    p.handle(older, &retried).await;
    assert_eq!(
        store.project("nr").await.unwrap().unwrap().title,
        "newer",
        "the retried update overtook one published after it"
    );
    store.close().await;
    if let Some(pg) = pg {
        pg.drop_db().await.unwrap();
    }
}

/// A stamped update (a believable AMQP `timestamp`) notes when it was first seen, as one
/// without does: its redelivery or replay (no header of ours on it) judges its stamp and
/// its `updated` against that first sight, not against the clock minutes later, where a
/// time refused at first is within bounds and the update overtook newer ones. Then a
/// redelivery keeps the stamp as its key, and refuses what its first sight refused.
async fn a_stamped_update_notes_when_it_was_first_seen(b: Backend) {
    use framework::{MessageContext, MessageProcessor};
    use project_ingest::event::time_key;
    let dir = tempfile::tempdir().unwrap();
    let (pg, url) = database(b, dir.path()).await;
    let store = Store::open(&url).await.unwrap();
    let p = project_ingest::ProjectProcessor::new(store.clone(), "out", "done");
    let ctx = |stamp: chrono::DateTime<chrono::Utc>| {
        let mut c = MessageContext::for_test("pluto-core", "core.project.event", 0);
        c.message_id = Some(format!("m-{}", stamp.timestamp_millis()));
        c.timestamp = Some(stamp.timestamp() as u64);
        c
    };
    let now = chrono::Utc::now();
    p.handle(
        project("project-created", "st", "v0"),
        &ctx(now - chrono::TimeDelta::minutes(10)),
    )
    .await;
    let stamp = now - chrono::TimeDelta::minutes(3);
    let mut older = project("project-updated", "st", "older");
    // More than 5 minutes ahead: refused, the stamp orders it.
    older["updated"] = time_key(now + chrono::TimeDelta::minutes(6))
        .unwrap()
        .into();
    let first = ctx(stamp);
    p.handle(older.clone(), &first).await;
    let digest =
        project_ingest::receipt_digest(first.message_id.as_deref(), &first.routing_key, &older);
    let seen = store.first_receipt(&digest).await.unwrap();
    assert!(seen.is_some(), "its first sight is noted");
    assert_eq!(store.project("st").await.unwrap().unwrap().title, "older");
    // As if first seen 2 minutes ago (minutes pass before the redelivery: judged against
    // the clock then, `updated` would be believed and overtake the newer update).
    store
        .note_receipt(
            &digest,
            &time_key(now - chrono::TimeDelta::minutes(2)).unwrap(),
        )
        .await
        .unwrap();
    p.handle(
        project("project-updated", "st", "newer"),
        &ctx(now - chrono::TimeDelta::minutes(1)),
    )
    .await;
    assert_eq!(store.project("st").await.unwrap().unwrap().title, "newer");
    let mut again = ctx(stamp);
    again.redelivered = true;
    p.handle(older, &again).await;
    assert_eq!(store.project("st").await.unwrap().unwrap().title, "newer");
    store.close().await;
    if let Some(pg) = pg {
        pg.drop_db().await.unwrap();
    }
}

/// A batch delivered again (a lost ack, a replay) stores its projects again and announces
/// them again, each under the id its first announcement had: a consumer can drop the
/// repeats, though the bodies differ (each says when it was written).
async fn a_batch_delivered_again_announces_with_the_same_ids(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    let entry = |id: u64| {
        json!({"id": id, "projectTypeId": 1, "title": format!("T{id}"),
               "created": "2021-04-29T13:53:43.413+01:00", "updated": "2021-04-29T13:53:43.413+01:00",
               "user": "u", "workingGroupId": 3, "commissionId": null,
               "deletable": true, "status": "New", "productionOffice": "UK"})
    };
    let batch = serde_json::to_vec(&json!([entry(2001), entry(2002)])).unwrap();
    let mut ids = Vec::new();
    for _ in 0..2 {
        env.hs
            .publish(
                "core.project.create",
                &batch,
                BasicProperties::default().with_message_id("batch-1".into()),
            )
            .await;
        let mut announced = Vec::new();
        for _ in 0..2 {
            let d = next(&mut out).await;
            let id = d
                .properties
                .message_id()
                .as_ref()
                .expect("an id")
                .to_string();
            announced.push((body(&d)["id"].to_string(), id));
        }
        announced.sort();
        ids.push(announced);
    }
    assert_eq!(ids[0], ids[1], "the same ids for the same announcements");
    assert_ne!(ids[0][0].1, ids[0][1].1, "one id per project");
    env.finish().await;
}

/// A batch whose first record was dropped at its first delivery (stale there) and stored
/// at its next (its project gone meanwhile) announces that record first: it gets an id of
/// its own, not the id the first delivery gave the record it announced first — a consumer
/// dropping duplicates by id would have dropped that project's only announcement — and the
/// record announced both times keeps its id, first at one delivery, second at the next.
async fn a_project_announced_first_by_a_redelivery_has_an_id_of_its_own(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    let entry = |id: u64, updated: &str| {
        json!({"id": id, "projectTypeId": 1, "title": format!("T{id}"),
               "created": "2021-04-29T13:53:43.413+01:00", "updated": updated,
               "user": "u", "workingGroupId": 3, "commissionId": null,
               "deletable": true, "status": "New", "productionOffice": "UK"})
    };
    let (older, newer) = (
        "2021-04-29T13:53:43.413+01:00",
        "2021-05-03T09:00:00.000+01:00",
    );
    env.hs
        .publish(
            "core.project.create",
            &serde_json::to_vec(&json!([entry(2101, newer)])).unwrap(),
            BasicProperties::default().with_message_id("newer-2101".into()),
        )
        .await;
    let d = next(&mut out).await;
    assert_eq!(body(&d)["id"], "2101");
    let batch = serde_json::to_vec(&json!([entry(2101, older), entry(2102, older)])).unwrap();
    let delivery = |ids: &mut Vec<(String, String)>, d: &framework::lapin::message::Delivery| {
        let id = d
            .properties
            .message_id()
            .as_ref()
            .expect("an id")
            .to_string();
        ids.push((body(d)["id"].as_str().unwrap_or_default().to_string(), id));
    };
    let send = || {
        env.hs.publish(
            "core.project.create",
            &batch,
            BasicProperties::default().with_message_id("batch-2".into()),
        )
    };
    // 2101 is older than the stored one: only 2102 is announced.
    send().await;
    let mut first = Vec::new();
    delivery(&mut first, &next(&mut out).await);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].0, "2102", "{first:?}");
    run_sql(&env.url, "DELETE FROM projects WHERE id = '2101'").await;
    // Now 2101 is stored, and announced first.
    send().await;
    let mut second = Vec::new();
    delivery(&mut second, &next(&mut out).await);
    delivery(&mut second, &next(&mut out).await);
    second.sort();
    assert_eq!(
        second.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>(),
        ["2101", "2102"],
        "{second:?}"
    );
    assert_eq!(
        second[1], first[0],
        "2102 keeps its id: {first:?} {second:?}"
    );
    assert_ne!(
        second[0].1, first[0].1,
        "2101 has an id of its own, not the one 2102 was announced with"
    );
    env.finish().await;
}

/// With several handlers or instances (or a create waiting in a retry tier) an update can
/// be handled before its own `project-created`: it waits a retry or two for the project
/// instead of being dropped, so the newer state is not lost.
async fn an_update_that_overtakes_its_create_waits_for_it(b: Backend) {
    // Retries enough to outlast a loaded machine between the two sends (6 retries of the
    // test tiers are about 2 s).
    let env = start(b, &[("project_ingest.missing_project_retries", "50")]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-updated", "late", "updated"))
        .await;
    env.send(&project("project-created", "late", "created"))
        .await;
    assert_eq!(body(&next(&mut out).await)["title"], "created");
    assert_eq!(body(&next(&mut out).await)["title"], "updated");
    let p = env.store.project("late").await.unwrap().unwrap();
    assert_eq!(p.title, "updated");
    assert_eq!(p.last_event, "project-updated");
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// The AMQP `timestamp` counts whole seconds while `created` has milliseconds: an update
/// published in the second its project was created (11.9 s, stamped 11 s, against a
/// `created` of 11.503 s) is newer, not stale; a producer stamping milliseconds (or micro-
/// or nanoseconds) is read as such, not as a date 47,000 years ahead (which sorted before
/// every real date).
async fn an_update_published_in_the_second_of_its_create_is_applied(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    // project()'s `created` is 2017-04-24T17:20:11.503Z = 1493054411.503.
    for (id, stamp) in [
        ("secs", 1_493_054_411_u64),
        ("millis", 1_493_054_411_900),
        ("micros", 1_493_054_411_900_000),
        ("nanos", 1_493_054_411_900_000_000),
    ] {
        env.send(&project("project-created", id, "created")).await;
        assert_eq!(body(&next(&mut out).await)["title"], "created");
        let u = serde_json::to_vec(&project("project-updated", id, "updated")).unwrap();
        env.hs
            .publish(
                "core.project.event",
                &u,
                BasicProperties::default().with_timestamp(stamp),
            )
            .await;
        assert_eq!(body(&next(&mut out).await)["title"], "updated", "{id}");
        assert_eq!(
            env.store.project(id).await.unwrap().unwrap().title,
            "updated"
        );
    }
    env.finish().await;
}

/// Plain updates carry no time of their own, but their producer's AMQP `timestamp` says
/// when each was published: one published earlier and delivered later (held in a retry
/// tier, redelivered, replayed) never overwrites a newer one.
async fn a_plain_update_published_earlier_never_overwrites_a_newer_one(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "t", "v0")).await;
    next(&mut out).await;
    let now = chrono::Utc::now().timestamp() as u64;
    let send_at = |title: &str, ts: u64| {
        let body = serde_json::to_vec(&project("project-updated", "t", title)).unwrap();
        (body, BasicProperties::default().with_timestamp(ts))
    };
    let (newer, p) = send_at("newer", now);
    env.hs.publish("core.project.event", &newer, p).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    let (older, p) = send_at("older", now - 60);
    env.hs.publish("core.project.event", &older, p).await;
    // FIFO with prefetch 1: the sentinel's success proves `older` was handled.
    env.send(&project("project-created", "sentinel2", "s"))
        .await;
    assert_eq!(
        body(&next(&mut out).await)["id"],
        "sentinel2",
        "older was dropped"
    );
    assert_eq!(
        env.store.project("t").await.unwrap().unwrap().title,
        "newer"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// An AMQP `timestamp` of 0 is some clients' "unset", not 1970: a plain update carrying it
/// is ordered as received, not dropped as older than everything stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_timestamp_is_no_publishing_time() {
    let env = start(Backend::Sqlite, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "z", "v0")).await;
    next(&mut out).await;
    let now = chrono::Utc::now().timestamp() as u64;
    for (title, stamp) in [("v1", now - 60), ("v2", 0)] {
        let update = serde_json::to_vec(&project("project-updated", "z", title)).unwrap();
        env.hs
            .publish(
                "core.project.event",
                &update,
                BasicProperties::default().with_timestamp(stamp),
            )
            .await;
        assert_eq!(body(&next(&mut out).await)["title"], title);
    }
    assert_eq!(env.store.project("z").await.unwrap().unwrap().title, "v2");
    env.finish().await;
}

/// An event stamped far in the future (a producer's clock or unit gone wrong) is ordered
/// as received: it does not make every later update of its project and of its commission
/// stale until that date; a key stored so by an earlier release loses to the next event.
async fn a_future_dated_event_does_not_freeze_its_project(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "f", "v0")).await;
    next(&mut out).await;
    let update = |title: &str, commission: &str, ts: u64| {
        let mut v = project("project-updated", "f", title);
        v["commissionTitle"] = json!(commission);
        let body = serde_json::to_vec(&v).unwrap();
        (body, BasicProperties::default().with_timestamp(ts))
    };
    let year_ahead = chrono::Utc::now().timestamp() as u64 + 365 * 86_400;
    let (bad, p) = update("bad", "bad commission", year_ahead);
    env.hs.publish("core.project.event", &bad, p).await;
    assert_eq!(body(&next(&mut out).await)["title"], "bad");
    // Published after `bad` was applied, by a producer whose clock is right.
    let (good, p) = update(
        "good",
        "good commission",
        chrono::Utc::now().timestamp() as u64,
    );
    env.hs.publish("core.project.event", &good, p).await;
    assert_eq!(body(&next(&mut out).await)["title"], "good");
    assert_eq!(env.store.project("f").await.unwrap().unwrap().title, "good");
    assert_eq!(
        env.store.commission("c-1").await.unwrap().unwrap().0,
        "good commission"
    );

    // A key an earlier release kept from such a clock.
    let mut frozen = project_ingest::event::ProjectEvent {
        kind: project_ingest::event::EventKind::Updated,
        id: "f".into(),
        title: "frozen".into(),
        status: "New".into(),
        commission_id: Some("c-1".into()),
        commission_title: Some("frozen commission".into()),
        production_office: "UK".into(),
        created: "2017-04-24T17:20:11.503Z".into(),
        version: Some("2100-01-01T00:00:00.000000Z".into()),
        tie: None,
    };
    env.store.apply(&frozen).await.unwrap();
    frozen.version = Some("2000-01-01T00:00:00.000000Z".into());
    frozen.title = "healed".into();
    frozen.commission_title = Some("healed commission".into());
    env.store.apply(&frozen).await.unwrap();
    assert_eq!(
        env.store.project("f").await.unwrap().unwrap().title,
        "healed"
    );
    assert_eq!(
        env.store.commission("c-1").await.unwrap().unwrap().0,
        "healed commission"
    );

    // A key a peer replica stored from its clock minutes ahead of this one's (or this
    // replica's clock minutes behind) is newer state, not a broken clock's: an older update
    // is stale against it.
    let at = |minutes: i64| {
        project_ingest::event::time_key(chrono::Utc::now() + chrono::TimeDelta::minutes(minutes))
    };
    frozen.version = at(10);
    frozen.title = "newest".into();
    assert!(matches!(
        env.store.apply(&frozen).await.unwrap(),
        project_ingest::store::Applied::Stored(_)
    ));
    frozen.version = at(8);
    frozen.title = "older".into();
    assert!(matches!(
        env.store.apply(&frozen).await.unwrap(),
        project_ingest::store::Applied::Stale
    ));
    assert_eq!(
        env.store.project("f").await.unwrap().unwrap().title,
        "newest"
    );
    env.finish().await;
}

/// A project's `created` time is Pluto's clock, a plain update's key this replica's: with
/// Pluto's clock two minutes ahead, an update right after the create is still applied (any
/// update is newer than the creation), and a second update then orders by its own key.
async fn an_update_applies_over_a_create_stamped_by_a_clock_ahead(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    let ahead = (chrono::Utc::now() + chrono::TimeDelta::minutes(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut created = project("project-created", "skew", "v0");
    created["created"] = json!(ahead);
    env.send(&created).await;
    next(&mut out).await;
    env.send(&project("project-updated", "skew", "first update"))
        .await;
    assert_eq!(body(&next(&mut out).await)["title"], "first update");
    assert_eq!(
        env.store.project("skew").await.unwrap().unwrap().title,
        "first update"
    );
    // Its commission, which the creation wrote with Pluto's key, takes the update too.
    let mut renamed = project("project-updated", "skew", "second update");
    renamed["commissionTitle"] = json!("renamed commission");
    env.send(&renamed).await;
    next(&mut out).await;
    assert_eq!(
        env.store.commission("c-1").await.unwrap().unwrap().0,
        "renamed commission"
    );
    env.finish().await;
}

/// A plain update (no `updated` time) held in a retry tier comes back after a newer one
/// was applied: it carries its first receipt time (the retry header), older than the
/// newer update's, so it is stale and the newer state stays.
async fn a_plain_update_back_from_a_retry_tier_never_overwrites_a_newer_one(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "r", "v0")).await;
    next(&mut out).await;
    // The older update was first received before the newer one…
    let first_received = chrono::Utc::now() - chrono::Duration::seconds(5);
    env.send(&project("project-updated", "r", "newer")).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    let older = project("project-updated", "r", "older");
    assert_dropped_as_retried(&env, &mut out, &older, first_received).await;
    assert_eq!(
        env.store.project("r").await.unwrap().unwrap().title,
        "newer"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// Two plain updates a user saved within one second carry one AMQP `timestamp` (whole
/// seconds): the older, back from a retry tier after the newer was applied, is ordered by
/// when each was first seen and dropped — it overwrote the newer.
async fn a_plain_update_of_the_same_second_back_from_a_retry_tier_never_overwrites_a_newer_one(
    b: Backend,
) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "sec", "v0")).await;
    next(&mut out).await;
    let second = chrono::Utc::now().timestamp() as u64 - 1;
    // The key its first attempt decided: the end of its publishing second.
    let stamped = chrono::DateTime::from_timestamp(second as i64, 999_999_000).expect("a time");
    // The older update was first seen (and sent to a retry tier) before the newer one…
    let first_seen = chrono::Utc::now() - chrono::Duration::milliseconds(300);
    let newer = serde_json::to_vec(&project("project-updated", "sec", "newer")).unwrap();
    env.hs
        .publish(
            "core.project.event",
            &newer,
            BasicProperties::default().with_timestamp(second),
        )
        .await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    // …and comes back as the retry tier returns it: its publishing second decided, and when
    // it was first seen.
    let older = project("project-updated", "sec", "older");
    assert_dropped_as_retried_with(
        &env,
        &mut out,
        &older,
        stamped,
        &[(project_ingest::FIRST_SEEN_HEADER, first_seen)],
        BasicProperties::default().with_timestamp(second),
    )
    .await;
    assert_eq!(
        env.store.project("sec").await.unwrap().unwrap().title,
        "newer"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// pluto-core changes a project by copying its entry with one field changed, `updated`
/// as it was: every update of a project carries one time. Among those the order they came
/// in decides, as for updates without a time: an older one back from a retry tier loses
/// to a newer one applied meanwhile, and a later one still applies.
async fn updates_of_one_updated_time_keep_the_order_they_came_in(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    let stamped = |kind: &str, title: &str| {
        let mut v = project(kind, "tie", title);
        v["updated"] = json!("2021-04-29T13:53:43.413+01:00");
        v
    };
    env.send(&stamped("project-created", "v0")).await;
    next(&mut out).await;
    // The older update was first received before the newer one…
    let first_received = chrono::Utc::now() - chrono::Duration::seconds(5);
    env.send(&stamped("project-updated", "newer")).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    let older = stamped("project-updated", "older");
    assert_dropped_as_retried(&env, &mut out, &older, first_received).await;
    assert_eq!(
        env.store.project("tie").await.unwrap().unwrap().title,
        "newer"
    );
    env.send(&stamped("project-updated", "newest")).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newest");
    let stored = env.store.project("tie").await.unwrap().unwrap();
    assert_eq!(stored.title, "newest");
    // The key itself stays the time, as an earlier release compares it: rolled back to
    // one, the next update of that time still applies.
    assert_eq!(
        stored.version.as_deref(),
        Some("2021-04-29T12:53:43.413000Z")
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// A Kinesis record without `approximateArrivalTimestamp` (the docs' own
/// `{"kinesis":{"data":…}}`) is ordered like a plain message, by when the message was
/// published or first received: an older update back from a retry tier is stale.
async fn a_kinesis_update_without_arrival_time_never_overwrites_a_newer_one(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "kr", "v0")).await;
    next(&mut out).await;
    let first_received = chrono::Utc::now() - chrono::Duration::seconds(5);
    let record =
        |title: &str| json!({"kinesis": {"data": b64(&project("project-updated", "kr", title))}});
    env.send(&record("newer")).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    assert_dropped_as_retried(&env, &mut out, &record("older"), first_received).await;
    assert_eq!(
        env.store.project("kr").await.unwrap().unwrap().title,
        "newer"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// A plain update the broker dead-lettered (its delivery limit: no header of this service)
/// and an operator replayed after a newer update was applied: it is ordered by when it
/// first reached the service, not by its replay, so the newer state stays.
async fn a_plain_update_replayed_after_the_broker_dead_lettered_it_never_overwrites_a_newer_one(
    b: Backend,
) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "rp", "v0")).await;
    next(&mut out).await;
    let older = project("project-updated", "rp", "older");
    env.send(&older).await;
    assert_eq!(body(&next(&mut out).await)["title"], "older");
    env.send(&project("project-updated", "rp", "newer")).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    // As `dlq replay` publishes it: to the queue, its origin in headers, nothing else.
    let h = origin_headers(&env);
    publish(
        &env.hs.ch,
        "",
        &env.hs.q,
        &serde_json::to_vec(&older).unwrap(),
        BasicProperties::default().with_headers(h),
    )
    .await;
    env.send(&project("project-created", "sentinel", "s")).await;
    assert_eq!(
        body(&next(&mut out).await)["id"],
        "sentinel",
        "the replayed update was dropped as stale"
    );
    assert_eq!(
        env.store.project("rp").await.unwrap().unwrap().title,
        "newer"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// A plain update redelivered by the broker (the instance that applied it died before its
/// ack) after another instance applied a newer one: it keeps the place of its first
/// delivery, so the newer state stays; a redelivery with no newer update re-applies.
async fn a_plain_update_redelivered_after_a_newer_one_keeps_its_first_place(b: Backend) {
    use framework::{MessageContext, MessageProcessor};
    let dir = tempfile::tempdir().unwrap();
    let (pg, url) = database(b, dir.path()).await;
    let store = Store::open(&url).await.unwrap();
    let p = project_ingest::ProjectProcessor::new(store.clone(), "out", "done");
    let ctx = || MessageContext::for_test("pluto-core", "core.project.event", 0);
    p.handle(project("project-created", "rd", "v0"), &ctx())
        .await;
    let older = project("project-updated", "rd", "older");
    p.handle(older.clone(), &ctx()).await;
    assert_eq!(store.project("rd").await.unwrap().unwrap().title, "older");
    p.handle(project("project-updated", "rd", "newer"), &ctx())
        .await;
    let mut again = ctx();
    again.redelivered = true;
    p.handle(older.clone(), &again).await;
    assert_eq!(store.project("rd").await.unwrap().unwrap().title, "newer");
    // The newer one redelivered too re-applies (its own first place): nothing changes.
    p.handle(project("project-updated", "rd", "newer"), &again)
        .await;
    assert_eq!(store.project("rd").await.unwrap().unwrap().title, "newer");
    store.close().await;
    if let Some(pg) = pg {
        pg.drop_db().await.unwrap();
    }
}

/// A retried update keeps the place its first attempt gave it: a publishing time (AMQP
/// `timestamp`, or the event's `updated`) refused then as too far ahead of the clock stays
/// refused, though minutes later it is within bounds. Decided again at the retry, it made
/// the update overtake a newer one applied meanwhile (and every update received after it
/// dropped as stale).
async fn a_retried_update_keeps_the_place_its_first_attempt_gave_it(b: Backend) {
    use framework::{MessageContext, MessageProcessor};
    use project_ingest::event::time_key;
    let dir = tempfile::tempdir().unwrap();
    let (pg, url) = database(b, dir.path()).await;
    let store = Store::open(&url).await.unwrap();
    let p = project_ingest::ProjectProcessor::new(store.clone(), "out", "done");
    let ctx = || MessageContext::for_test("pluto-core", "core.project.event", 0);
    let now = chrono::Utc::now();
    // What the first attempt of an update, two minutes ago, left on its retry: its
    // receipt, its timestamp (then 6 minutes ahead) or `updated` refused.
    let retried = |timestamp: Option<u64>| {
        let mut c = MessageContext::for_test("pluto-core", "core.project.event", 1);
        c.timestamp = timestamp;
        let first = time_key(now - chrono::TimeDelta::minutes(2)).unwrap();
        framework::headers::set_str(&mut c.headers, project_ingest::RECEIVED_HEADER, &first);
        framework::headers::set_str(&mut c.headers, project_ingest::FIRST_SEEN_HEADER, &first);
        framework::headers::set_str(
            &mut c.headers,
            framework::headers::ORIGINAL_EXCHANGE,
            "pluto-core",
        );
        c
    };
    let ahead = now + chrono::TimeDelta::minutes(4);
    for (id, older, timestamp) in [
        (
            "stamped",
            project("project-updated", "stamped", "older"),
            Some(ahead.timestamp() as u64),
        ),
        (
            "updated",
            {
                let mut v = project("project-updated", "updated", "older");
                v["updated"] = json!(ahead.to_rfc3339());
                v
            },
            None,
        ),
    ] {
        p.handle(project("project-created", id, "v0"), &ctx()).await;
        p.handle(project("project-updated", id, "newer"), &ctx())
            .await;
        assert_eq!(store.project(id).await.unwrap().unwrap().title, "newer");
        p.handle(older, &retried(timestamp)).await;
        assert_eq!(
            store.project(id).await.unwrap().unwrap().title,
            "newer",
            "{id}: the retried update overtook the newer one"
        );
    }
    store.close().await;
    if let Some(pg) = pg {
        pg.drop_db().await.unwrap();
    }
}

/// The headers naming where a message put back into the queue first came from, as the
/// framework's retries and `dlq replay` set them.
fn origin_headers(env: &Env) -> framework::lapin::types::FieldTable {
    use framework::lapin::types::{AMQPValue, FieldTable};
    let mut h = FieldTable::default();
    h.insert(
        "x-original-exchange".into(),
        AMQPValue::LongString(env.hs.input_exchange.as_str().into()),
    );
    h.insert(
        "x-original-routing-key".into(),
        AMQPValue::LongString("core.project.event".into()),
    );
    h
}

/// Puts `v` back into the queue as the framework's retry tier does (its retry count,
/// origin, and the first-receipt header of its first attempt at `first_received`), then
/// a sentinel: with prefetch 1 the sentinel's success proves `v` was handled, and that
/// it published nothing.
async fn assert_dropped_as_retried(
    env: &Env,
    out: &mut framework::lapin::Consumer,
    v: &Value,
    first_received: chrono::DateTime<chrono::Utc>,
) {
    assert_dropped_as_retried_with(env, out, v, first_received, &[], BasicProperties::default())
        .await
}

/// [`assert_dropped_as_retried`] with more retry headers (`extra`) and properties.
async fn assert_dropped_as_retried_with(
    env: &Env,
    out: &mut framework::lapin::Consumer,
    v: &Value,
    first_received: chrono::DateTime<chrono::Utc>,
    extra: &[(&str, chrono::DateTime<chrono::Utc>)],
    properties: BasicProperties,
) {
    use framework::lapin::types::AMQPValue;
    let mut h = origin_headers(env);
    h.insert("x-retry-count".into(), AMQPValue::LongLongInt(1));
    let received = [(project_ingest::RECEIVED_HEADER, first_received)];
    for (name, at) in received.iter().chain(extra) {
        h.insert(
            (*name).into(),
            AMQPValue::LongString(at.to_rfc3339().as_str().into()),
        );
    }
    publish(
        &env.hs.ch,
        "",
        &env.hs.q,
        &serde_json::to_vec(v).unwrap(),
        properties.with_headers(h),
    )
    .await;
    let sentinel = serde_json::to_vec(&project("project-created", "sentinel", "s")).unwrap();
    publish(
        &env.hs.ch,
        "",
        &env.hs.q,
        &sentinel,
        BasicProperties::default(),
    )
    .await;
    assert_eq!(
        body(&next(out).await)["id"],
        "sentinel",
        "the retried message was dropped"
    );
}

/// pluto-core's RabbitMqPropagator publishes a JSON array of its project entries (Play
/// JSON of `ProjectEntry`: no `type`, no `commissionTitle`, `commissionId` null or absent
/// without a commission), the operation in the routing key `core.project.create|update`.
async fn pluto_core_entries_are_stored_then_updated(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    let mut dlq = env.hs.watch_dlq().await;
    // Commission 42's title, known from an event that carries it.
    let mut known = project("project-created", "pc-known", "t");
    known["commissionId"] = json!(42);
    known["commissionTitle"] = json!("Commission 42");
    env.send(&known).await;
    next(&mut out).await;
    let entry = |id: u64, title: &str, commission: Value, updated: &str| {
        json!({"id": id, "projectTypeId": 1, "title": title,
               "created": "2021-04-29T13:53:43.413+01:00", "updated": updated,
               "user": "u", "workingGroupId": 3, "commissionId": commission,
               "deletable": true, "status": "New", "productionOffice": "UK"})
    };
    let t0 = "2021-04-29T13:53:43.413+01:00";
    let mut untitled = entry(1236, "", json!(42), t0);
    untitled.as_object_mut().unwrap().remove("title");
    let mut no_key = entry(1237, "No commission key", Value::Null, t0);
    no_key.as_object_mut().unwrap().remove("commissionId");
    let created = json!([
        entry(1234, "T", json!(42), t0),
        entry(1235, "No commission", Value::Null, t0),
        untitled,
        no_key,
    ]);
    let send = |key: &'static str, v: Value| {
        let env = &env;
        async move { env.send_on(key, &v).await }
    };
    send("core.project.create", created.clone()).await;
    let mut stored: Vec<Value> = Vec::new();
    for _ in 0..3 {
        stored.push(body(&next(&mut out).await));
    }
    stored.sort_by_key(|v| v["id"].as_str().unwrap_or_default().to_string());
    assert_eq!(stored[0]["id"], "1234");
    assert_eq!(stored[0]["title"], "T");
    assert_eq!(stored[0]["lastEvent"], "project-created");
    assert_eq!(stored[0]["commissionId"], "42");
    assert_eq!(stored[0]["commissionTitle"], "Commission 42");
    assert_eq!(stored[0]["version"], "2021-04-29T12:53:43.413000Z");
    for (p, title) in stored[1..]
        .iter()
        .zip(["No commission", "No commission key"])
    {
        assert_eq!(p["title"], title);
        assert_eq!(p["commissionId"], Value::Null, "{p}");
        assert_eq!(p["commissionTitle"], Value::Null, "{p}");
    }
    // The bad entry is dead-lettered alone, as a bad record of a Kinesis batch.
    let dl = next(&mut dlq).await;
    assert_eq!(
        header(&dl, "x-error").as_deref(),
        Some("record 3: field `title` is missing")
    );
    assert_eq!(body(&dl), created[2]);
    let p = serde_json::to_value(env.store.project("1235").await.unwrap().unwrap()).unwrap();
    assert_eq!(p["commissionId"], Value::Null);
    assert_eq!(p["commissionTitle"], Value::Null);
    // The update: stored over the created state, the commission's title kept.
    let mut upd = entry(1234, "T2", json!(42), "2021-04-30T09:00:00.000+01:00");
    upd["status"] = json!("In Production");
    send("core.project.update", json!([upd])).await;
    let v = body(&next(&mut out).await);
    assert_eq!(v["title"], "T2");
    assert_eq!(v["status"], "In Production");
    assert_eq!(v["lastEvent"], "project-updated");
    assert_eq!(v["commissionTitle"], "Commission 42");
    let p = serde_json::to_value(env.store.project("1234").await.unwrap().unwrap()).unwrap();
    assert_eq!(p["title"], "T2");
    assert_eq!(p["commissionTitle"], "Commission 42");
    assert_eq!(
        env.store.commission("42").await.unwrap().unwrap().0,
        "Commission 42"
    );
    // Read from the consumer watching the DLQ (which takes whatever lands there): with
    // one message in flight, a dead letter before the last output has been handed to it.
    assert!(
        next_within(&mut dlq, Duration::from_millis(300))
            .await
            .is_none(),
        "nothing dead-lettered"
    );
    env.finish().await;
}

/// PostgreSQL cannot store U+0000 in text: refused when read, naming the field, not
/// retried until `retries-exhausted`.
async fn a_nul_character_is_permanent_naming_the_field(b: Backend) {
    let env = start(b, &[]).await;
    let mut dlq = env.hs.watch_dlq().await;
    for (field, v) in [
        ("title", project("project-created", "n1", "bad\u{0}title")),
        ("id", project("project-created", "n\u{0}2", "t")),
        (
            "data.productionOffice",
            kinesis(&[{
                let mut p = project("project-created", "n3", "t");
                p["productionOffice"] = json!("U\u{0}K");
                p
            }]),
        ),
    ] {
        env.send(&v).await;
        let d = next(&mut dlq).await;
        let err = header(&d, "x-error").unwrap();
        let name = field.rsplit('.').next().unwrap();
        assert!(
            err.contains(&format!(
                "field `{name}` contains a NUL character (\\u0000)"
            )),
            "{field}: {err}"
        );
        assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
        assert_eq!(int_header(&d, "x-retry-count"), Some(1), "no retries");
    }
    assert!(env.store.project("n1").await.unwrap().is_none());
    env.finish().await;
}

/// Pluto deletes a commission with a message whose `commissionTitle` is "(DELETE)" (its
/// ingestion Lambda's since 2018; the current one sends only `type`, `commissionId` and the
/// title): the commission and its projects go, an older event of them replayed later
/// brings nothing back, the deletion delivered again is a success that deletes nothing
/// more, and a newer event of the commission is stored. Before, the message was a dead
/// letter (``field `id` is missing``), and a full project event with that title stored a
/// commission named "(DELETE)".
async fn pluto_deletes_a_commission_and_its_projects(b: Backend) {
    // Missing projects waited for: an older update dropped at once proves the deletion
    // was found, not the project missing.
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    // Not `project`'s commission: `assert_dropped`'s sentinel is of that one.
    let of = |kind: &str, id: &str, c: &str| {
        let mut v = project(kind, id, id);
        v["commissionId"] = json!(c);
        v
    };
    for id in ["p1", "p2"] {
        env.send(&of("project-created", id, "c-del")).await;
        next(&mut out).await;
    }
    env.send(&of("project-created", "p3", "c-2")).await;
    next(&mut out).await;

    // As Pluto's Kinesis stream carries it (after the projects' creation).
    let deletion = json!({"type": "project-created", "commissionId": "c-del",
                          "commissionTitle": "(DELETE)"});
    let mut envelope = kinesis(&[deletion]);
    envelope["Records"][0]["kinesis"]["approximateArrivalTimestamp"] = json!(1_600_000_000.0);
    env.send(&envelope).await;
    let d = next(&mut out).await;
    assert_eq!(
        d.routing_key.as_str(),
        "storagetier.projectingest.project.success"
    );
    let v = body(&d);
    assert_eq!(v["commissionId"], "c-del");
    assert_eq!(v["commissionDeleted"], true);
    assert_eq!(v["deletedProjects"], json!(["p1", "p2"]));
    assert_eq!(v["lastEvent"], "commission-deleted");
    for id in ["p1", "p2"] {
        assert!(env.store.project(id).await.unwrap().is_none(), "{id}");
    }
    assert!(env.store.commission("c-del").await.unwrap().is_none());
    assert!(env.store.project("p3").await.unwrap().is_some());
    assert!(env.store.commission("c-2").await.unwrap().is_some());

    // Older events of the commission (a retry, a replay) bring nothing back.
    assert_dropped(&env, &mut out, &of("project-created", "p1", "c-del")).await;
    let mut older = of("project-updated", "p2", "c-del");
    older["updated"] = json!("2019-01-01T00:00:00Z");
    assert_dropped(&env, &mut out, &older).await;
    assert!(env.store.project("p1").await.unwrap().is_none());
    assert!(env.store.project("p2").await.unwrap().is_none());
    assert!(env.store.commission("c-del").await.unwrap().is_none());

    // Delivered again: a success deleting nothing more, saying what it deleted.
    env.send(&envelope).await;
    let v = body(&next(&mut out).await);
    assert_eq!(v["commissionDeleted"], true);
    assert_eq!(v["deletedProjects"], json!(["p1", "p2"]));

    // A full project event with that title deletes too: never a commission named so.
    let mut full = of("project-updated", "p3", "c-2");
    full["commissionTitle"] = json!("(DELETE)");
    env.send(&full).await;
    let v = body(&next(&mut out).await);
    assert_eq!(v["deletedProjects"], json!(["p3"]));
    assert!(env.store.commission("c-2").await.unwrap().is_none());
    assert!(env.store.project("p3").await.unwrap().is_none());

    // A newer event of the deleted commission is stored.
    let mut newer = of("project-created", "p4", "c-del");
    newer["updated"] = json!("2021-01-01T00:00:00Z");
    env.send(&newer).await;
    assert_eq!(body(&next(&mut out).await)["id"], "p4");
    assert_eq!(
        env.store.commission("c-del").await.unwrap().unwrap().0,
        "Commission one"
    );

    // The deletion delivered again (a redelivery, a replay) takes nothing created since
    // it was first applied: before, p4 and the commission went with it, for good.
    for _ in 0..2 {
        env.send(&envelope).await;
        let v = body(&next(&mut out).await);
        assert_eq!(v["deletedProjects"], json!(["p1", "p2"]));
        assert!(env.store.project("p4").await.unwrap().is_some());
        assert!(env.store.commission("c-del").await.unwrap().is_some());
    }
    // Nor does it once a newer deletion of the commission came after it: p5, created
    // after that one, stays when the older is replayed.
    env.send(&deletion_of("c-del", 1_700_000_000.0)).await;
    assert_eq!(
        body(&next(&mut out).await)["deletedProjects"],
        json!(["p4"])
    );
    let mut p5 = of("project-created", "p5", "c-del");
    p5["updated"] = json!("2024-06-01T00:00:00Z");
    env.send(&p5).await;
    assert_eq!(body(&next(&mut out).await)["id"], "p5");
    env.send(&envelope).await;
    assert_eq!(body(&next(&mut out).await)["deletedProjects"], json!([]));
    assert!(env.store.project("p5").await.unwrap().is_some());
    assert!(env.store.commission("c-del").await.unwrap().is_some());
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// `kind` of project `id` in commission `c`, updated at `updated` if given.
fn in_commission(kind: &str, id: &str, c: &str, updated: Option<&str>) -> Value {
    let mut v = project(kind, id, id);
    v["commissionId"] = json!(c);
    if let Some(t) = updated {
        v["updated"] = json!(t);
    }
    v
}

/// Pluto's deletion of commission `c`, arriving (Kinesis) at `at` (epoch seconds).
fn deletion_of(c: &str, at: f64) -> Value {
    let mut envelope = kinesis(&[json!({"type": "project-created", "commissionId": c,
                                        "commissionTitle": "(DELETE)"})]);
    envelope["Records"][0]["kinesis"]["approximateArrivalTimestamp"] = json!(at);
    envelope
}

/// A project moved out of a commission before the commission's deletion, the move
/// delivered after the deletion (a retry tier, another replica), lives on in its new
/// commission — before, the deletion took it and the move then waited as missing and was
/// dropped, with every later update. One moved into the commission before its deletion,
/// delivered after it, goes — before, it was dropped as stale and the project outlived
/// its commission in its old one.
async fn moves_across_a_deleted_commission_delivered_after_it_end_as_pluto_ordered_them(
    b: Backend,
) {
    // A project missing is dropped at once: one that must stay deleted is seen to.
    let env = start(b, &[("project_ingest.missing_project_retries", "0")]).await;
    let mut out = env.hs.watch_output().await;
    for (id, c) in [("out", "c-gone"), ("in", "c-stays"), ("back", "c-gone")] {
        env.send(&in_commission("project-created", id, c, None))
            .await;
        next(&mut out).await;
    }
    // In 2020 Pluto deletes c-gone, after (2019) moving `out` out of it and `in` into it.
    env.send(&deletion_of("c-gone", 1_600_000_000.0)).await;
    let v = body(&next(&mut out).await);
    assert_eq!(v["deletedProjects"], json!(["back", "out"]));
    let moved_out = in_commission(
        "project-updated",
        "out",
        "c-stays",
        Some("2019-06-01T00:00:00Z"),
    );
    env.send(&moved_out).await;
    let v = body(&next(&mut out).await);
    assert_eq!(
        (&v["id"], &v["commissionId"]),
        (&json!("out"), &json!("c-stays"))
    );
    let p = env
        .store
        .project("out")
        .await
        .unwrap()
        .expect("moved out: kept");
    assert_eq!(p.commission_id.as_deref(), Some("c-stays"));
    let moved_in = in_commission(
        "project-updated",
        "in",
        "c-gone",
        Some("2019-06-01T00:00:00Z"),
    );
    env.send(&moved_in).await;
    let v = body(&next(&mut out).await);
    assert_eq!(v["commissionId"], "c-gone");
    assert_eq!(v["deletedProjects"], json!(["in"]));
    assert!(
        env.store.project("in").await.unwrap().is_none(),
        "moved in: deleted"
    );
    assert!(env.store.commission("c-gone").await.unwrap().is_none());
    // `back` moved to c-stays, then back into c-gone before the deletion; delivered after
    // it, the move back is stale, and the older move out no longer brings it back.
    let moved_back = in_commission(
        "project-updated",
        "back",
        "c-gone",
        Some("2019-09-01T00:00:00Z"),
    );
    assert_dropped(&env, &mut out, &moved_back).await;
    let moved_away = in_commission(
        "project-updated",
        "back",
        "c-stays",
        Some("2019-06-01T00:00:00Z"),
    );
    assert_dropped(&env, &mut out, &moved_away).await;
    assert!(
        env.store.project("back").await.unwrap().is_none(),
        "stays deleted"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// A deletion in a batch retried for another record (an update waiting for its create)
/// deletes at its first attempt; the success the last attempt publishes still says what it
/// deleted — before, it said nothing was (`deletedProjects: []`), the only announcement of
/// that deletion.
async fn a_deletion_retried_with_its_batch_announces_what_it_deleted(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&in_commission("project-created", "d1", "c-batch", None))
        .await;
    next(&mut out).await;
    let deletion = json!({"type": "project-created", "commissionId": "c-batch",
                          "commissionTitle": "(DELETE)"});
    let waiting = in_commission("project-updated", "late", "c-other", None);
    let retried = outcome_count(&env.hs.q, "retry");
    env.send(&kinesis(&[deletion, waiting])).await;
    await_outcome_count(&env.hs.q, "retry", retried + 1).await;
    assert!(
        env.store.project("d1").await.unwrap().is_none(),
        "deleted at once"
    );
    env.send(&kinesis(&[in_commission(
        "project-created",
        "late",
        "c-other",
        None,
    )]))
    .await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        seen.push(body(&next(&mut out).await));
    }
    let announced = seen
        .iter()
        .find(|v| v["commissionId"] == "c-batch")
        .unwrap_or_else(|| panic!("the deletion announced: {seen:?}"));
    assert_eq!(announced["deletedProjects"], json!(["d1"]), "{announced}");
    assert_eq!(announced["commissionDeleted"], true, "{announced}");
    env.finish().await;
}

async fn created_stores_project_and_commission(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "foo", "bar")).await;
    let d = next(&mut out).await;
    assert_eq!(
        d.routing_key.as_str(),
        "storagetier.projectingest.project.success"
    );
    let v = body(&d);
    assert_eq!(v["id"], "foo");
    assert_eq!(v["title"], "bar");
    assert_eq!(v["commissionId"], "c-1");
    assert_eq!(v["productionOffice"], "UK");
    assert_eq!(v["created"], "2017-04-24T17:20:11.503Z");
    assert_eq!(v["lastEvent"], "project-created");
    let p = env.store.project("foo").await.unwrap().unwrap();
    assert_eq!(p.status, "New");
    assert_eq!(
        env.store.commission("c-1").await.unwrap().unwrap(),
        ("Commission one".to_string(), "UK".to_string())
    );
    // Integer ids (Pluto's real ids) are accepted and kept as text; a redelivered
    // created event is idempotent.
    let mut int = project("project-created", "x", "int ids");
    int["id"] = json!(1234);
    int["commissionId"] = json!(56);
    env.send(&int).await;
    assert_eq!(body(&next(&mut out).await)["id"], "1234");
    env.send(&int).await;
    assert_eq!(body(&next(&mut out).await)["commissionId"], "56");
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

async fn updated_changes_a_known_project(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "foo", "bar")).await;
    next(&mut out).await;
    let mut upd = project("project-updated", "foo", "new title");
    upd["status"] = json!("In Production");
    upd["commissionTitle"] = json!("Renamed commission");
    env.send(&upd).await;
    let v = body(&next(&mut out).await);
    assert_eq!(v["title"], "new title");
    assert_eq!(v["status"], "In Production");
    assert_eq!(v["lastEvent"], "project-updated");
    assert_eq!(
        env.store.commission("c-1").await.unwrap().unwrap().0,
        "Renamed commission"
    );
    env.finish().await;
}

/// pluto-atomresponder, another consumer of `pluto-core`, publishes an entry it failed on
/// again to the exchange and key it came from with `retry_count` added: this queue got the
/// original, so the copy is dropped — applied, the older state (same `updated`, seen last)
/// replaced the newer one and the project was announced again.
async fn a_retry_copy_another_consumer_published_is_dropped(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    let entry = |title: &str| {
        json!({"id": 1300, "projectTypeId": 1, "title": title,
               "created": "2021-04-29T13:53:43.413+01:00",
               "updated": "2021-04-29T13:53:43.413+01:00",
               "user": "u", "workingGroupId": 3, "commissionId": 42,
               "deletable": true, "status": "New", "productionOffice": "UK"})
    };
    env.send_on("core.project.create", &json!([entry("Old")]))
        .await;
    assert_eq!(body(&next(&mut out).await)["title"], "Old");
    env.send_on("core.project.update", &json!([entry("New")]))
        .await;
    assert_eq!(body(&next(&mut out).await)["title"], "New");
    let dropped = outcome_count(&env.hs.q, "drop");
    let mut copy = entry("Old");
    copy["retry_count"] = json!(1);
    env.send_on("core.project.update", &json!([copy.clone()]))
        .await;
    copy["retry_count"] = json!(2);
    env.send_on("core.project.create", &json!([copy])).await;
    env.send(&project("project-created", "sentinel", "s")).await;
    assert_eq!(body(&next(&mut out).await)["id"], "sentinel");
    await_outcome_count(&env.hs.q, "drop", dropped + 2).await;
    assert_eq!(
        env.store.project("1300").await.unwrap().unwrap().title,
        "New"
    );
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// Publishes `v`, then a sentinel; with prefetch 1 the sentinel's success proves `v` was
/// handled, and nothing else may have been published or dead-lettered — and `v` was
/// counted as dropped (a retry would also publish nothing the sentinel's output shows).
async fn assert_dropped(env: &Env, out: &mut framework::lapin::Consumer, v: &Value) {
    let dropped = outcome_count(&env.hs.q, "drop");
    let retried = outcome_count(&env.hs.q, "retry");
    env.send(v).await;
    env.send(&project("project-created", "sentinel", "s")).await;
    let d = next(out).await;
    assert_eq!(body(&d)["id"], "sentinel", "nothing published for {v}");
    assert_eq!(env.dlq_count().await, 0, "nothing dead-lettered for {v}");
    await_outcome_count(&env.hs.q, "drop", dropped + 1).await;
    assert_eq!(
        outcome_count(&env.hs.q, "retry"),
        retried,
        "not retried: {v}"
    );
}

/// `missing_project_retries` past `[retry] max_attempts` is capped: the last attempt drops
/// the update, never dead-letters it as retries-exhausted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_missing_project_ends_within_the_attempts() {
    let env = start(
        Backend::Sqlite,
        &[
            ("retry.max_attempts", "2"),
            ("project_ingest.missing_project_retries", "6"),
        ],
    )
    .await;
    let dropped = outcome_count(&env.hs.q, "drop");
    env.send(&project("project-updated", "never-seen", "t"))
        .await;
    await_outcome_count(&env.hs.q, "drop", dropped + 1).await;
    assert_eq!(outcome_count(&env.hs.q, "retry"), 1);
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

async fn update_of_unknown_project_is_dropped(b: Backend) {
    // No wait for a create that may be behind it: dropped at once.
    let env = start(b, &[("project_ingest.missing_project_retries", "0")]).await;
    let mut out = env.hs.watch_output().await;
    assert_dropped(
        &env,
        &mut out,
        &project("project-updated", "never-seen", "t"),
    )
    .await;
    assert!(env.store.project("never-seen").await.unwrap().is_none());
    env.finish().await;
}

/// A project never seen here stays unknown whatever its updates say: one older than its
/// commission's deletion is dropped as stale, and a newer one moving it elsewhere is an
/// update of a project that does not exist (dropped) — before, the stale one noted it as
/// deleted with the commission, and the newer one then stored it as "moved out before
/// the deletion" from the update alone.
async fn update_of_a_project_never_seen_stays_unknown_after_its_commissions_deletion(b: Backend) {
    let env = start(b, &[("project_ingest.missing_project_retries", "0")]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&deletion_of("c-gone", 1_600_000_000.0)).await;
    next(&mut out).await;
    let stale = in_commission(
        "project-updated",
        "ghost",
        "c-gone",
        Some("2019-06-01T00:00:00Z"),
    );
    assert_dropped(&env, &mut out, &stale).await;
    let moved = in_commission(
        "project-updated",
        "ghost",
        "c-other",
        Some("2021-06-01T00:00:00Z"),
    );
    assert_dropped(&env, &mut out, &moved).await;
    assert!(env.store.project("ghost").await.unwrap().is_none());
    env.finish().await;
}

/// Pluto creates a project in a commission, moves it to another, then deletes the first;
/// here the deletion comes first, the move overtakes the create (it waits for it), and the
/// create comes last: the project lives on in its new commission, as in Pluto.
async fn a_move_out_that_overtook_its_create_across_a_deletion_is_stored(b: Backend) {
    // Retries enough to outlast a loaded machine between the sends.
    let env = start(b, &[("project_ingest.missing_project_retries", "50")]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&deletion_of("c-gone", 1_600_000_000.0)).await;
    next(&mut out).await;
    env.send(&in_commission(
        "project-updated",
        "late",
        "c-other",
        Some("2019-06-01T00:00:00Z"),
    ))
    .await;
    env.send(&in_commission("project-created", "late", "c-gone", None))
        .await;
    // The create is stale (dropped); the move, waiting for it, is stored once it came.
    let v = body(&next(&mut out).await);
    assert_eq!(
        (&v["id"], &v["commissionId"]),
        (&json!("late"), &json!("c-other"))
    );
    let p = env.store.project("late").await.unwrap().expect("stored");
    assert_eq!(p.commission_id.as_deref(), Some("c-other"));
    env.finish().await;
}

async fn unknown_type_is_dropped(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    assert_dropped(
        &env,
        &mut out,
        &json!({"type": "project-deleted", "id": "foo"}),
    )
    .await;
    // Other fields are not validated for a type this service ignores.
    assert_dropped(&env, &mut out, &json!({"type": "commission-created"})).await;
    env.finish().await;
}

async fn kinesis_envelopes_single_and_multiple(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    let mut dlq = env.hs.watch_dlq().await;
    // One record.
    env.send(&kinesis(&[project("project-created", "k1", "one")]))
        .await;
    assert_eq!(body(&next(&mut out).await)["id"], "k1");
    // A bare Kinesis record ({"kinesis": {...}}).
    env.send(&json!({"kinesis": {"data": b64(&project("project-created", "k0", "bare"))}}))
        .await;
    assert_eq!(body(&next(&mut out).await)["id"], "k0");
    // Several records: each is applied in order, each stored project is published.
    env.send(&kinesis(&[
        project("project-created", "k2", "two"),
        json!({"type": "something-else"}),
        project("project-created", "k3", "three"),
        project("project-updated", "k2", "two, updated"),
    ]))
    .await;
    let mut titles = Vec::new();
    for _ in 0..3 {
        titles.push(
            body(&next(&mut out).await)["title"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(titles, ["two", "three", "two, updated"]);
    assert_eq!(
        env.store.project("k2").await.unwrap().unwrap().title,
        "two, updated"
    );
    // A bad record in a batch goes to the DLQ alone; the others are stored.
    let mut batch = kinesis(&[
        project("project-created", "k4", "four"),
        project("project-created", "k5", "five"),
    ]);
    batch["Records"][1]["kinesis"]["data"] = json!("%%% not base64 %%%");
    env.send(&batch).await;
    assert_eq!(body(&next(&mut out).await)["id"], "k4");
    let dl = next(&mut dlq).await;
    let err = header(&dl, "x-error").unwrap();
    assert!(
        err.starts_with("record 2: field `Records[1].kinesis.data`: invalid base64"),
        "{err}"
    );
    assert_eq!(body(&dl)["kinesis"]["data"], "%%% not base64 %%%");
    // It names its record, and carries its batch's first receipt: replayed, it is ordered
    // as received then, not when replayed (it could overwrite a newer update).
    assert_eq!(header(&dl, "x-batch-part").as_deref(), Some("2"));
    assert!(
        header(&dl, project_ingest::RECEIVED_HEADER).is_some(),
        "the first receipt goes with the record"
    );
    // A single invalid record is Permanent for the whole message.
    env.send(&json!({"Records": [{"kinesis": {"data": "!!"}}]}))
        .await;
    let dl = next(&mut dlq).await;
    assert_eq!(header(&dl, "x-error-kind").as_deref(), Some("permanent"));
    assert!(header(&dl, "x-error").unwrap().contains("invalid base64"));
    // Valid base64 that is not JSON.
    let not_json = base64::engine::general_purpose::STANDARD.encode(b"hello");
    env.send(&json!({"kinesis": {"data": not_json}})).await;
    let dl = next(&mut dlq).await;
    assert!(
        header(&dl, "x-error")
            .unwrap()
            .contains("decoded data is not valid JSON")
    );
    env.finish().await;
}

async fn older_updates_never_overwrite_newer_ones(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "p", "v0")).await;
    next(&mut out).await;
    let upd = |title: &str, at: &str| {
        let mut v = project("project-updated", "p", title);
        v["updated"] = json!(at);
        v
    };
    env.send(&upd("v2", "2020-01-01T12:00:00Z")).await;
    assert_eq!(body(&next(&mut out).await)["title"], "v2");
    // Older (also in another offset) → stale, dropped.
    assert_dropped(&env, &mut out, &upd("v1", "2020-01-01T12:30:00+01:00")).await;
    assert_eq!(env.store.project("p").await.unwrap().unwrap().title, "v2");
    // The created event redelivered late never overwrites an update.
    assert_dropped(&env, &mut out, &project("project-created", "p", "v0")).await;
    assert_eq!(env.store.project("p").await.unwrap().unwrap().title, "v2");
    // Newer applies; the same event again (redelivery) is applied idempotently.
    let v3 = upd("v3", "2020-01-01T12:00:00.5Z");
    env.send(&v3).await;
    assert_eq!(body(&next(&mut out).await)["title"], "v3");
    env.send(&v3).await;
    assert_eq!(body(&next(&mut out).await)["title"], "v3");
    // Kinesis arrival time orders events without an `updated` field.
    let mut late = kinesis(&[project("project-updated", "p", "arrived 2018")]);
    late["Records"][0]["kinesis"]["approximateArrivalTimestamp"] = json!(1_514_764_800.0);
    assert_dropped(&env, &mut out, &late).await;
    let mut newer = kinesis(&[project("project-updated", "p", "arrived 2021")]);
    newer["Records"][0]["kinesis"]["approximateArrivalTimestamp"] = json!(1_609_459_200.0);
    env.send(&newer).await;
    assert_eq!(body(&next(&mut out).await)["title"], "arrived 2021");
    assert_eq!(
        env.store
            .project("p")
            .await
            .unwrap()
            .unwrap()
            .version
            .as_deref(),
        Some("2021-01-01T00:00:00.000000Z")
    );
    env.finish().await;
}

/// Records of one arrival time (one `PutRecords` call: Kinesis counts milliseconds) are
/// ordered by their sequence number: the older, delivered after the newer (a retry tier,
/// a replay), is stale, while the newer delivered again applies again.
async fn records_of_one_arrival_time_keep_their_sequence_order(b: Backend) {
    let env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "sq", "v0")).await;
    next(&mut out).await;
    let record = |title: &str, seq: &str| {
        let mut r = kinesis(&[project("project-updated", "sq", title)]);
        r["Records"][0]["kinesis"]["sequenceNumber"] = json!(seq);
        r
    };
    // A shorter number is a smaller one, not a later text.
    let newer = record("newer", "49590000000000000000000000010");
    env.send(&newer).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    assert_dropped(
        &env,
        &mut out,
        &record("older", "4959000000000000000000000009"),
    )
    .await;
    assert_eq!(
        env.store.project("sq").await.unwrap().unwrap().title,
        "newer"
    );
    env.send(&newer).await;
    assert_eq!(body(&next(&mut out).await)["title"], "newer");
    env.send(&record("newest", "49590000000000000000000000011"))
        .await;
    assert_eq!(body(&next(&mut out).await)["title"], "newest");
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_or_missing_fields_are_permanent_naming_the_field() {
    let env = start(Backend::Sqlite, &[]).await;
    let mut dlq = env.hs.watch_dlq().await;
    let base = project("project-created", "foo", "bar");
    let mut cases: Vec<(Value, String)> = Vec::new();
    for f in [
        "type",
        "id",
        "title",
        "status",
        "commissionId",
        "commissionTitle",
        "productionOffice",
        "created",
    ] {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(f);
        cases.push((v, format!("field `{f}` is missing")));
        let mut v = base.clone();
        v[f] = Value::Null;
        cases.push((v, format!("field `{f}` is null")));
    }
    let typed = [
        (
            "commissionId",
            json!(true),
            "field `commissionId`: expected integer or non-empty string, found boolean",
        ),
        (
            "id",
            json!(1.5),
            "field `id`: expected integer or non-empty string, found number 1.5",
        ),
        (
            "id",
            json!(""),
            "field `id`: expected integer or non-empty string, found empty string",
        ),
        (
            "title",
            json!(7),
            "field `title`: expected string, found number",
        ),
        (
            "status",
            json!(["a"]),
            "field `status`: expected string, found array",
        ),
        (
            "type",
            json!({}),
            "field `type`: expected string, found object",
        ),
        (
            "created",
            json!("yesterday"),
            "field `created`: expected an RFC 3339 timestamp, found \"yesterday\"",
        ),
        (
            "updated",
            json!("soon"),
            "field `updated`: expected an RFC 3339 timestamp, found \"soon\"",
        ),
    ];
    for (f, val, msg) in typed {
        let mut v = base.clone();
        v[f] = val;
        cases.push((v, msg.to_string()));
    }
    cases.push((json!([1, 2]), "expected a JSON object, found array".into()));
    // A commission deletion needs the commission.
    cases.push((
        json!({"type": "project-created", "commissionTitle": "(DELETE)"}),
        "field `commissionId` is missing".into(),
    ));
    for (v, expected) in &cases {
        env.send(v).await;
        let d = next(&mut dlq).await;
        assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
        assert_eq!(
            header(&d, "x-error").as_deref(),
            Some(expected.as_str()),
            "for {v}"
        );
        assert_eq!(&body(&d), v, "dead letter keeps the body");
    }
    // Not JSON at all: the framework's decoding error.
    env.send_raw(b"{not json").await;
    let d = next(&mut dlq).await;
    assert_eq!(header(&d, "x-error-kind").as_deref(), Some("permanent"));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_down_is_retried_not_lost() {
    let mut env = start(Backend::Postgres, &[("retry.max_attempts", "2")]).await;
    let mut out = env.hs.watch_output().await;
    let mut dlq = env.hs.watch_dlq().await;
    env.send(&project("project-created", "a", "before")).await;
    next(&mut out).await;
    // The database disappears under the running service.
    env.store.close().await;
    env.pg.take().unwrap().drop_db().await.unwrap();
    // What holds no event to store ends as it would with the database up: dropped now,
    // not retried until the outage ends (or dead-lettered when it outlasts the retries).
    let (dropped, retried) = (
        outcome_count(&env.hs.q, "drop"),
        outcome_count(&env.hs.q, "retry"),
    );
    env.send(&json!({"type": "iconik-project-created", "id": "i"}))
        .await;
    await_outcome_count(&env.hs.q, "drop", dropped + 1).await;
    assert_eq!(outcome_count(&env.hs.q, "retry"), retried);
    env.send(&project("project-created", "b", "after")).await;
    let d = next(&mut dlq).await;
    assert_eq!(
        header(&d, "x-error-kind").as_deref(),
        Some("retries-exhausted"),
        "database faults are retried until the limit"
    );
    assert!(
        header(&d, "x-error").unwrap().contains("database"),
        "{:?}",
        header(&d, "x-error")
    );
    assert_eq!(int_header(&d, "x-retry-count"), Some(2));
    // Its first receipt rode along (its place among updates, for a replay).
    assert!(header(&d, project_ingest::RECEIVED_HEADER).is_some());
    assert!(
        next_within(&mut out, Duration::from_millis(200))
            .await
            .is_none()
    );
    env.finish().await;
}

on_both!(
    concurrent_shuffled_updates_end_at_the_newest,
    same_time_updates_delivered_at_once_end_at_the_last,
);

/// Waits until `n` messages of `queue` reached a final outcome in this process (success,
/// drop or dead letter, counted once acked: after the handler's database write). A retried
/// message counts at its last attempt only. Counted at least once each: a message
/// redelivered after a connection loss may count twice.
async fn await_final_outcomes(queue: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let done: u64 = ["success", "drop", "dead_letter"]
            .iter()
            .map(|o| outcome_count(queue, o))
            .sum();
        if done >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue}: {done} of {n} messages reached a final outcome"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Updates of one project that share their `updated` time and carry no publishing time
/// (pluto-core's: it copies the entry with one field changed), queued while the service
/// was down and delivered in one burst to 16 handlers: the last one sent wins. Each
/// handler took its own receipt time, in whatever order tokio ran them (the last spawned
/// first; a large body waits for the others before it is decoded), and an earlier update
/// was kept over the last as "newer". The earlier ones here are large (an array's worth
/// of notes), the last small.
async fn same_time_updates_delivered_at_once_end_at_the_last(b: Backend) {
    let mut env = start(b, &[]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "burst", "v0")).await;
    next(&mut out).await;
    env.hs.stop().await;
    let n = 30;
    for i in 0..n {
        let mut v = project("project-updated", "burst", &format!("u{i:02}"));
        v["updated"] = json!("2021-01-01T00:00:00Z");
        if i < n - 1 {
            v["notes"] = json!("n".repeat(300 * 1024));
        }
        env.send(&v).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = replica_config::<ProjectIngest>(
        dir.path(),
        &env.hs,
        &[
            ("project_ingest.database_url", env.url.as_str()),
            ("amqp.prefetch", "16"),
        ],
    );
    let mut second = Harness::start_service::<ProjectIngest>(cfg).await;
    await_final_outcomes(&env.hs.q, 1 + n as u64).await;
    second.stop().await;
    let p = env.store.project("burst").await.unwrap().unwrap();
    assert_eq!(p.title, format!("u{:02}", n - 1));
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// `ordered = true`: the queue has one active consumer, the other replica waits as a
/// standby (each replica orders same-time updates by its own clock, so two consuming at
/// once reorder a burst by their clocks' difference), and a burst of pluto-core's
/// same-time updates ends at the last one queued.
async fn ordered_replicas_consume_one_at_a_time_in_queue_order(b: Backend) {
    let env = start(
        b,
        &[("project_ingest.ordered", "true"), ("amqp.prefetch", "16")],
    )
    .await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "one-at-a-time", "v0"))
        .await;
    next(&mut out).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = replica_config::<ProjectIngest>(
        dir.path(),
        &env.hs,
        &[
            ("project_ingest.database_url", env.url.as_str()),
            ("project_ingest.ordered", "true"),
            ("amqp.prefetch", "16"),
        ],
    );
    let mut second = Harness::start_service::<ProjectIngest>(cfg).await;
    let admin = framework::testing::admin::Admin::suite();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut statuses = loop {
        let consumers = admin.consumers(&env.hs.q).await;
        if consumers.len() == 2 || tokio::time::Instant::now() > deadline {
            break consumers
                .iter()
                .map(|c| c["activity_status"].as_str().unwrap_or("?").to_string())
                .collect::<Vec<_>>();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    statuses.sort();
    assert_eq!(statuses, ["single_active", "waiting"]);
    let n = 30;
    for i in 0..n {
        let mut v = project("project-updated", "one-at-a-time", &format!("u{i:02}"));
        v["updated"] = json!("2021-01-01T00:00:00Z");
        env.send(&v).await;
    }
    await_final_outcomes(&env.hs.q, 1 + n as u64).await;
    second.stop().await;
    let p = env.store.project("one-at-a-time").await.unwrap().unwrap();
    assert_eq!(p.title, format!("u{:02}", n - 1));
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// Many updates handled concurrently in shuffled order: the newest one always wins.
async fn concurrent_shuffled_updates_end_at_the_newest(b: Backend) {
    let mut env = start(b, &[("amqp.prefetch", "16")]).await;
    let mut out = env.hs.watch_output().await;
    env.send(&project("project-created", "race", "v0")).await;
    next(&mut out).await;
    let n = 40;
    // A fixed permutation of 0..n (7 is coprime with 40).
    for k in 0..n {
        let i = (k * 7) % n;
        let mut v = project("project-updated", "race", &format!("u{i:02}"));
        v["updated"] = json!(format!("2021-01-01T00:00:{i:02}Z"));
        env.send(&v).await;
    }
    // Every message handled (an empty queue is not that: up to 16 may still be in
    // handlers), and nothing left in flight, before the one read that decides.
    await_final_outcomes(&env.hs.q, 1 + n as u64).await;
    env.hs.stop().await;
    let p = env.store.project("race").await.unwrap().unwrap();
    assert_eq!(p.title, format!("u{:02}", n - 1));
    assert_eq!(p.version.as_deref(), Some("2021-01-01T00:00:39.000000Z"));
    assert_eq!(env.dlq_count().await, 0);
    env.finish().await;
}

/// Two replicas consuming ONE queue on one PostgreSQL database (how a scaled-out
/// deployment runs): 20 projects created, then 5 versioned updates of each published
/// interleaved across projects and out of version order, every message twice, while the
/// broker closes one replica's connection mid-stream (its unacked messages are redelivered,
/// to either replica). The final state is exact: every project holds its newest update.
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
    let cfg = replica_config::<ProjectIngest>(
        second_dir.path(),
        &env.hs,
        &[
            ("project_ingest.database_url", url.as_str()),
            ("amqp.prefetch", "16"),
            ("amqp.connection_name", name_b.as_str()),
        ],
    );
    let mut other = Harness::start_service::<ProjectIngest>(cfg).await;
    let projects = 20;
    let versions = [2, 4, 0, 3, 1];
    let id = |p: usize| format!("rp{p:02}");
    let mut sent = 0;
    for p in 0..projects {
        let c = project("project-created", &id(p), "created");
        env.send(&c).await;
        env.send(&c).await;
        sent += 2;
    }
    // An update of an unknown project is dropped: the creates land first.
    let deadline = tokio::time::Instant::now() + WAIT;
    for p in 0..projects {
        while env.store.project(&id(p)).await.unwrap().is_none() {
            assert!(tokio::time::Instant::now() < deadline, "{} created", id(p));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for (k, v) in versions.iter().enumerate() {
        for p in 0..projects {
            let mut u = project("project-updated", &id(p), &format!("{} v{v}", id(p)));
            u["status"] = json!(if v % 2 == 0 { "In Production" } else { "Held" });
            u["updated"] = json!(format!("2024-01-01T00:00:0{v}Z"));
            env.send(&u).await;
            env.send(&u).await;
            sent += 2;
        }
        if k == 1 {
            let closed = close_connection_named(&name_b).await;
            assert_eq!(closed, 1, "replica B's connection closed by the broker");
        }
    }
    let newest = versions.iter().max().copied().unwrap_or_default();
    // Every message handled by one replica or the other (an empty queue is not that: up to
    // 16 per replica may still be in handlers, and a redelivery after the closed connection
    // counts twice, so both are awaited), then both replicas stopped, their handlers
    // drained: nothing is in flight when the final state is read.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        await_final_outcomes(&env.hs.q, sent).await;
        let ready = ready_count(&env.hs.ch, &env.hs.q).await;
        if ready == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{ready} messages still queued"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stopped, not dropped: a harness deletes the queue and exchanges on drop, and they are
    // shared with the first replica.
    other.stop().await;
    env.hs.stop().await;
    for p in 0..projects {
        let got = env.store.project(&id(p)).await.unwrap().unwrap();
        assert_eq!(got.title, format!("{} v{newest}", id(p)));
        assert_eq!(got.status, "In Production");
        assert_eq!(got.last_event, "project-updated");
        assert_eq!(
            got.version.as_deref(),
            Some(format!("2024-01-01T00:00:0{newest}.000000Z").as_str())
        );
    }
    assert_eq!(
        env.store.commission("c-1").await.unwrap().map(|c| c.0),
        Some("Commission one".to_string())
    );
    assert_eq!(env.dlq_count().await, 0, "nothing dead-lettered");
    println!(
        "| 2 replicas of project-ingest on one queue and one PostgreSQL, {projects} projects × {} versioned updates interleaved out of order, each sent twice, one replica's connection closed mid-stream | {sent} | 0 | every message sent twice | exact final state: every project at its newest update, nothing dead-lettered |",
        versions.len()
    );
    env.finish().await;
    drop(other);
}

/// Text PostgreSQL cannot index: 8,000 random hex digits (a key over 2,704 bytes after
/// compression).
fn unindexable() -> String {
    (0..250)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect()
}

/// An id PostgreSQL refuses to index is the event's fault, not the database's: Permanent
/// at once (alone in a batch, the other records stored), not retried until the attempts
/// run out — a project's id, and a deleted commission's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_the_database_cannot_index_is_permanent() {
    let env = start(Backend::Postgres, &[]).await;
    let mut out = env.hs.watch_output().await;
    let mut dlq = env.hs.watch_dlq().await;
    let long = unindexable();
    env.send(&project("project-created", &long, "too long"))
        .await;
    let dl = next(&mut dlq).await;
    assert_eq!(header(&dl, "x-error-kind").as_deref(), Some("permanent"));
    assert!(header(&dl, "x-error").unwrap().contains("refuses"));
    env.send(&kinesis(&[
        project("project-created", &long, "too long"),
        project("project-created", "fits", "fits"),
    ]))
    .await;
    assert_eq!(body(&next(&mut out).await)["id"], "fits");
    expect_only_record_dead_lettered(&mut dlq, 1).await;
    // A commission's deletion as well, and the records after it are stored.
    let deletion = json!({"type": "project-created", "commissionId": long,
                          "commissionTitle": "(DELETE)"});
    env.send(&kinesis(&[
        deletion,
        project("project-created", "after", "after"),
    ]))
    .await;
    assert_eq!(body(&next(&mut out).await)["id"], "after");
    let dl = next(&mut dlq).await;
    assert_eq!(header(&dl, "x-error-kind").as_deref(), Some("permanent"));
    let error = header(&dl, "x-error").unwrap_or_default();
    assert!(
        error.starts_with("record 1: the database refuses"),
        "{error}"
    );
    env.finish().await;
}

/// Migration 0002 rebuilds `projects` (its commission columns become optional): every
/// project the first release stored is there afterwards, as it was.
async fn projects_stored_before_0002_survive_it(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (pg, url) = database(backend, dir.path()).await;
    let all = &project_ingest::store::MIGRATOR;
    let first_release = db::Migrator {
        migrations: std::borrow::Cow::Owned(all.migrations[..1].to_vec()),
        ignore_missing: false,
        locking: all.locking,
        no_tx: all.no_tx,
    };
    let pool = db::connect(&url, &first_release).await.unwrap();
    sqlx::query(
        "INSERT INTO projects (id, title, status, commission_id, commission_title, \
         production_office, created, version, last_event, updated_at) VALUES \
         ('p-1', 'Old title', 'In Production', 'c-1', 'Commission one', 'UK', \
          '2017-04-24T17:20:11.503Z', '2020-01-01T00:00:00.000000000Z', 'project-updated', \
          '2020-01-01T00:00:01Z')",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let store = Store::open(&url).await.unwrap();
    let p = store
        .project("p-1")
        .await
        .unwrap()
        .expect("kept by the migration");
    assert_eq!(
        (
            p.title.as_str(),
            p.status.as_str(),
            p.production_office.as_str()
        ),
        ("Old title", "In Production", "UK")
    );
    assert_eq!(p.commission_id.as_deref(), Some("c-1"));
    assert_eq!(p.commission_title.as_deref(), Some("Commission one"));
    assert_eq!(p.version.as_deref(), Some("2020-01-01T00:00:00.000000000Z"));
    assert_eq!(p.last_event, "project-updated");
    store.close().await;
    if let Some(pg) = pg {
        pg.drop_db().await.unwrap();
    }
}

/// A processor on an SQLite file under `dir`, waiting `missing` attempts for a create.
async fn processor_on_sqlite(
    dir: &std::path::Path,
    missing: u32,
) -> project_ingest::ProjectProcessor {
    let store = Store::open(&db::default_url(dir, "project-ingest"))
        .await
        .unwrap();
    project_ingest::ProjectProcessor::new(store, "out", "storagetier.projectingest.project")
        .with_missing_retries(missing)
}

/// The headers an attempt of the service writes for its retries are a producer's on a
/// message's first delivery: ignored. Taken, a producer's `x-project-ingest-received` far
/// in the past ordered its update there, and it was dropped as stale.
#[tokio::test]
async fn the_services_own_headers_from_a_producer_are_ignored() {
    use framework::{MessageContext, MessageProcessor};
    let dir = tempfile::tempdir().unwrap();
    let p = processor_on_sqlite(dir.path(), 0).await;
    let ctx = || MessageContext::for_test("pluto-core", "core.project.event", 0);
    p.handle(project("project-created", "forged", "v0"), &ctx())
        .await;
    p.handle(project("project-updated", "forged", "earlier"), &ctx())
        .await;
    let mut forged = ctx();
    for h in [
        project_ingest::RECEIVED_HEADER,
        project_ingest::FIRST_SEEN_HEADER,
    ] {
        framework::headers::set_str(&mut forged.headers, h, "2018-01-01T00:00:00.000000Z");
    }
    p.handle(project("project-updated", "forged", "new"), &forged)
        .await;
    assert_eq!(
        p.store().project("forged").await.unwrap().unwrap().title,
        "new"
    );
}

/// Design §7's words for an update of a project never seen, which operators search the
/// logs for: the drop (logged with its reason) says exactly them.
#[tokio::test]
async fn an_unknown_projects_update_is_dropped_in_the_designs_words() {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let p = processor_on_sqlite(dir.path(), 0).await;
    let ctx = MessageContext::for_test("pluto-core", "core.project.event", 0);
    match p
        .handle(project("project-updated", "never-seen", "t"), &ctx)
        .await
    {
        Outcome::Drop(reason) => assert!(
            reason.contains("attempted to update a project that does not exist"),
            "{reason}"
        ),
        other => panic!("dropped, not {other:?}"),
    }
}

/// A Kinesis envelope of no records holds no work: dropped, as the Lambda succeeded with
/// nothing to do and event-forwarder drops it, not dead-lettered as a permanent error.
#[tokio::test]
async fn a_kinesis_envelope_of_no_records_is_dropped() {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let p = processor_on_sqlite(dir.path(), 0).await;
    let ctx = MessageContext::for_test("pluto-core", "core.project.event", 0);
    match p.handle(json!({"Records": []}), &ctx).await {
        Outcome::Drop(reason) => assert!(
            reason.contains("a Kinesis envelope of no records"),
            "{reason}"
        ),
        other => panic!("dropped, not {other:?}"),
    }
}

/// Attempts a database outage took are not the update's wait for its create: an update
/// and its create that both waited out an outage, then raced out of the retry tiers, did
/// not drop the update (its `missing_project_retries` spent by the outage's attempts).
#[tokio::test]
async fn an_outages_attempts_do_not_spend_the_wait_for_a_create() {
    use framework::{MessageContext, MessageProcessor, Outcome};
    let dir = tempfile::tempdir().unwrap();
    let p = processor_on_sqlite(dir.path(), 2).await;
    // Six attempts so far, all of them an outage's (not counted).
    let mut ctx = MessageContext::for_test("pluto-core", "core.project.event", 6);
    framework::headers::set_int(&mut ctx.headers, framework::headers::PROGRESS_ATTEMPTS, 6);
    match p
        .handle(project("project-updated", "created-later", "t"), &ctx)
        .await
    {
        Outcome::Retry(reason) => assert!(reason.contains("not stored yet"), "{reason}"),
        other => panic!("still waiting for its create, not {other:?}"),
    }
}

/// A SQLite file another process holds the write lock of, through a handle on it of its
/// own (as a second instance on one file is), held until `release` is sent.
async fn hold_sqlite_write_lock(url: &str) -> tokio::sync::oneshot::Sender<()> {
    use db::sqlx::Connection;
    db::sqlx::any::install_default_drivers();
    let mut conn = db::sqlx::AnyConnection::connect(url)
        .await
        .expect("connect");
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (held, is_held) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        db::sqlx::query("PRAGMA journal_mode = WAL")
            .execute(&mut conn)
            .await
            .expect("wal");
        db::sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut conn)
            .await
            .expect("lock");
        let _ = held.send(());
        let _ = released.await;
        db::sqlx::query("COMMIT")
            .execute(&mut conn)
            .await
            .expect("commit");
    });
    is_held.await.expect("lock held");
    release
}

/// The tests that hold an SQLite file's write lock, one at a time: each recognises the
/// connections waiting for its lock among this process's SQLite threads.
static SQLITE_LOCK_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// This process's SQLite connection threads (sqlx runs each connection on a thread named
/// `sqlx-sqlite-worker-N`, of which the kernel keeps the first 15 bytes), by thread id.
fn sqlite_threads() -> std::collections::HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task (Linux): how a test sees a connection wait for a lock")
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.starts_with("sqlx-sqlite-wor"))
        })
        .filter_map(|t| t.file_name().to_str()?.parse().ok())
        .collect()
}

/// Whether thread `tid` of this process is asleep in the kernel's nanosleep. An SQLite
/// connection's thread sleeps there only in SQLite's busy handler, between its tries for a
/// lock another connection holds (an idle one waits for its next command on a futex).
fn in_busy_wait(tid: u32) -> bool {
    let task = format!("/proc/self/task/{tid}");
    // The syscall's number where the kernel does not name the sleeping function.
    let nanosleep: &[&str] = if cfg!(target_arch = "x86_64") {
        &["35", "230"]
    } else if cfg!(target_arch = "aarch64") {
        &["101", "115"]
    } else {
        &[]
    };
    std::fs::read_to_string(format!("{task}/wchan")).is_ok_and(|w| w.contains("nanosleep"))
        || std::fs::read_to_string(format!("{task}/syscall"))
            .is_ok_and(|s| s.split(' ').next().is_some_and(|n| nanosleep.contains(&n)))
}

/// Waits until `n` SQLite connections of this process not among `before` have been seen
/// waiting for a lock (in SQLite's busy handler), or until `ended` says what waits for it
/// has ended (failed while the lock was held: the caller's assertions say how).
async fn await_waiting_for_lock(
    before: &std::collections::HashSet<u32>,
    n: usize,
    ended: impl Fn() -> bool,
) {
    let mut waiting = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while waiting.len() < n && !ended() {
        waiting.extend(
            sqlite_threads()
                .into_iter()
                .filter(|t| !before.contains(t) && in_busy_wait(*t)),
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {n} connections seen waiting for the lock",
            waiting.len()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Two instances on one SQLite file: an update (which reads its project's creation before
/// it writes) while the other holds the write lock waits for it, as every write does,
/// instead of failing at once with "database is locked" (a retry, an attempt used up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_waits_for_another_instances_write_on_one_sqlite_file() {
    let _one_at_a_time = SQLITE_LOCK_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = db::default_url(dir.path(), "project-ingest");
    let before = sqlite_threads();
    let store = Store::open(&url).await.unwrap();
    let p = project_ingest::ProjectProcessor::new(store.clone(), "out", "done");
    let ctx = || framework::MessageContext::for_test("pluto-core", "core.project.event", 0);
    framework::MessageProcessor::handle(&p, project("project-created", "w", "v0"), &ctx()).await;
    let release = hold_sqlite_write_lock(&url).await;
    let ev = project_ingest::event::parse_project(
        &project("project-updated", "w", "v1"),
        Some("2030-01-01T00:00:00.000000Z".into()),
    )
    .unwrap();
    let project_ingest::event::Parsed::Project(ev) = ev else {
        panic!("a project event")
    };
    let update = tokio::spawn({
        let store = store.clone();
        async move { store.apply(&ev).await }
    });
    // Released once the store's connection waits for the lock, however long the update
    // takes to get there: an update that fails at once instead ("database is locked") ends
    // while the lock is still held, and is not Stored.
    await_waiting_for_lock(&before, 1, || update.is_finished()).await;
    let _ = release.send(());
    let applied = update.await.unwrap();
    assert!(
        matches!(applied, Ok(project_ingest::store::Applied::Stored(_))),
        "{applied:?}"
    );
    store.close().await;
}

/// Two instances starting at once on a new SQLite file both find its migrations missing:
/// both start, neither fails on a table the other just created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_starting_at_once_on_a_new_sqlite_file_both_start() {
    let _one_at_a_time = SQLITE_LOCK_TESTS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let url = db::default_url(dir.path(), "project-ingest");
    let release = hold_sqlite_write_lock(&format!("{url}?mode=rwc")).await;
    let before = sqlite_threads();
    let open = |u: String| tokio::spawn(async move { Store::open(&u).await });
    let (a, b) = (open(url.clone()), open(url.clone()));
    // Both waiting for the lock (each at its first write), however long they take to get
    // there; one that ended meanwhile failed, as `expect` below says.
    await_waiting_for_lock(&before, 2, || a.is_finished() || b.is_finished()).await;
    let _ = release.send(());
    for s in [a.await.unwrap(), b.await.unwrap()] {
        s.expect("started").close().await;
    }
}

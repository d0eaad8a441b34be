//! The storage stack end to end on the local broker: one asset-sweeper message reaches
//! both tiers; a poison message is dead-lettered, the fault fixed, the dead letter
//! replayed, and it succeeds.

use framework::dlq::{self, Selection};
use framework::lapin::BasicProperties;
use framework::testing::*;
use framework::topology::Topology;
use online_archive::OnlineArchive;
use online_nearline::OnlineNearline;
use storage::testing::sweeper_message;

const KEY: &str = "assetsweeper.asset_folder_importer.file.new";

fn dlq_topology<S>(cfg: &framework::Config<S>) -> Topology {
    Topology::new(
        &cfg.service.queue,
        &cfg.service.output_exchange,
        vec![],
        &cfg.amqp,
        &cfg.retry,
    )
}

async fn success_for(c: &mut framework::lapin::Consumer, file: &str) -> serde_json::Value {
    loop {
        let v: serde_json::Value = serde_json::from_slice(&next(c).await.data).unwrap();
        if v["original_file_path"]
            .as_str()
            .is_some_and(|p| p.ends_with(file))
        {
            return v;
        }
    }
}

#[tokio::test]
async fn one_file_reaches_both_tiers_and_a_replayed_dead_letter_succeeds() {
    let data = tempfile::tempdir().unwrap();
    let online = data.path().join("online/show");
    std::fs::create_dir_all(&online).unwrap();
    std::fs::write(online.join("ep1.mov"), b"episode one").unwrap();
    let shared_in = unique("assetsweeper");
    let a_cfg = service_config::<OnlineArchive>(
        data.path(),
        &[("online_archive.input_exchange", &shared_in)],
    );
    let n_cfg = service_config::<OnlineNearline>(
        data.path(),
        &[("online_nearline.input_exchange", &shared_in)],
    );
    let (a_topo, n_topo) = (dlq_topology(&a_cfg), dlq_topology(&n_cfg));
    let mut archive = Harness::start_service::<OnlineArchive>(a_cfg).await;
    let mut nearline = Harness::start_service::<OnlineNearline>(n_cfg).await;
    let mut a_out = archive.watch_output().await;
    let mut n_out = nearline.watch_output().await;
    let dir = online.display().to_string();

    archive
        .publish(
            KEY,
            sweeper_message(&dir, "ep1.mov", false)
                .to_string()
                .as_bytes(),
            BasicProperties::default(),
        )
        .await;
    let a = success_for(&mut a_out, "ep1.mov").await;
    let n = success_for(&mut n_out, "ep1.mov").await;
    assert_eq!(a["archive_key"], "show/ep1.mov");
    assert_eq!(n["vault_key"], "show/ep1.mov");
    assert!(data.path().join("archive/show/ep1.mov").exists());
    assert!(data.path().join("nearline/show/ep1.mov").exists());

    // A file that is not there yet: both services dead-letter it.
    let late = sweeper_message(&dir, "late.mov", false);
    archive
        .publish(
            KEY,
            late.to_string().as_bytes(),
            BasicProperties::default().with_message_id("late-1".into()),
        )
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while ready_count(&archive.ch, &a_topo.dlq()).await < 1
        || ready_count(&archive.ch, &n_topo.dlq()).await < 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both dead-lettered the missing file"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let listed = dlq::list(&archive.conn, &a_topo, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(
        listed[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("does not exist")
    );
    assert_eq!(listed[0].original_exchange, shared_in);

    // The operator fixes the fault and replays: the message succeeds.
    std::fs::write(online.join("late.mov"), b"arrived late").unwrap();
    let moved = dlq::replay(
        &archive.conn,
        &a_topo,
        &Selection::MessageId("late-1".into()),
        false,
    )
    .await
    .unwrap();
    assert_eq!(moved.len(), 1);
    let a = success_for(&mut a_out, "late.mov").await;
    assert_eq!(a["archive_key"], "show/late.mov");
    assert_eq!(ready_count(&archive.ch, &a_topo.dlq()).await, 0);
    // A replay goes to the replaying service's own queue only: online-nearline, which
    // subscribes to the same exchange, neither copies the file again nor dead-letters it
    // a second time; its own dead letter waits for its own replay.
    assert_eq!(ready_count(&nearline.ch, &n_topo.dlq()).await, 1);
    let moved = dlq::replay(&nearline.conn, &n_topo, &Selection::All, false)
        .await
        .unwrap();
    assert_eq!(moved.len(), 1);
    let n = success_for(&mut n_out, "late.mov").await;
    assert_eq!(n["vault_key"], "show/late.mov");
    assert_eq!(ready_count(&nearline.ch, &n_topo.dlq()).await, 0);

    // Each service handled `late.mov` once more, from its own replay: a replay that
    // reached the other service's queue too would have made a second success there
    // (the file exists by then). Both stopped (their handlers drained, every output
    // confirmed), a fence after each output shows all of it.
    archive.stop().await;
    nearline.stop().await;
    for (h, out, service) in [
        (&archive, &mut a_out, "online-archive"),
        (&nearline, &mut n_out, "online-nearline"),
    ] {
        publish(
            &h.ch,
            &h.output_exchange,
            "fence",
            br#"{"fence":true}"#,
            BasicProperties::default(),
        )
        .await;
        loop {
            let v: serde_json::Value = serde_json::from_slice(&next(out).await.data).unwrap();
            if v["fence"] == true {
                break;
            }
            assert!(
                !v["original_file_path"]
                    .as_str()
                    .is_some_and(|p| p.ends_with("late.mov")),
                "{service} handled late.mov twice (another service's replay reached it): {v}"
            );
        }
    }
    cleanup(vec![], vec![shared_in]);
}

//! Recovery without a process restart: broker-closed connections and deleted queues.

use framework::lapin::BasicProperties;
use framework::lapin::options::QueueDeleteOptions;
use framework::testing::*;
use framework::{MessageContext, Outcome};

fn echo() -> FnProcessor<impl Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync> {
    FnProcessor(|v, _ctx: &MessageContext| Outcome::success(v))
}

#[tokio::test]
async fn survives_the_broker_closing_its_connection() {
    let name = unique("conn");
    let mut hs = Harness::start(
        "closed",
        &[
            ("amqp.connection_name", &name),
            ("amqp.reconnect_initial_ms", "1000"),
        ],
        echo(),
    )
    .await;
    let mut out = hs.watch_output().await;
    hs.publish("test.before", br#"{"n":0}"#, BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"n":0}"#);

    let mut sessions = hs.status.sessions();
    assert_eq!(
        close_connection_named(&name).await,
        1,
        "found the service's connection"
    );
    // Not ready while disconnected (the first reconnect waits 1 s).
    let status = hs.status.clone();
    wait_until("readiness to drop", || !status.is_ready()).await;
    // Published while the service is down: must not be lost.
    hs.publish("test.during", br#"{"n":1}"#, BasicProperties::default())
        .await;
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("reconnected without a restart")
        .unwrap();
    assert!(hs.status.is_ready());
    assert_eq!(next(&mut out).await.data, br#"{"n":1}"#);
    hs.publish("test.after", br#"{"n":2}"#, BasicProperties::default())
        .await;
    assert_eq!(next(&mut out).await.data, br#"{"n":2}"#);
    hs.stop().await;
}

#[tokio::test]
async fn survives_its_queue_being_deleted() {
    let mut hs = Harness::start("deleted", &[], echo()).await;
    let mut out = hs.watch_output().await;
    let mut sessions = hs.status.sessions();
    hs.ch
        .queue_delete(hs.q.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the service's queue");
    tokio::time::timeout(WAIT, sessions.wait_for(|n| *n >= 2))
        .await
        .expect("the consumer cancel was noticed and the queue re-declared")
        .unwrap();
    assert!(ready_count(&hs.ch, &hs.q).await == 0, "queue exists again");
    hs.publish(
        "test.again",
        br#"{"back":true}"#,
        BasicProperties::default(),
    )
    .await;
    assert_eq!(next(&mut out).await.data, br#"{"back":true}"#);
    hs.stop().await;
}

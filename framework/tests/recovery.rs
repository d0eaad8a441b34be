//! Recovery without a process restart: broker-closed connections and deleted queues.

use std::process::Command;

use framework::lapin::BasicProperties;
use framework::lapin::options::QueueDeleteOptions;
use framework::testing::*;
use framework::{MessageContext, Outcome};

/// Closes the broker connection(s) whose client-provided name is `name`.
fn close_connection_named(name: &str) {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl available");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines() {
        let Some((pid, props)) = line.split_once('\t') else {
            continue;
        };
        if props.contains(&format!("{{\"connection_name\",<<\"{name}\">>}}"))
            || props.contains(&format!("\"{name}\""))
        {
            let st = Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test: forced close", "-q"])
                .status()
                .expect("close_connection");
            assert!(st.success(), "closed {pid}");
            closed += 1;
        }
    }
    assert_eq!(closed, 1, "found the service's connection {name}");
}

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
    close_connection_named(&name);
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

//! Throughput benchmark: the framework with a pass-through processor against a raw lapin
//! consume → publish-with-confirm → ack loop, same prefetch, same queue type, same broker.
//!
//! `cargo bench -p framework --bench throughput` (env: BENCH_MESSAGES, default 100000;
//! BENCH_PREFETCH, default 16; AMQP_URL). Prints a markdown table for docs/benchmarks.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use framework::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueDeclareOptions,
};
use framework::lapin::types::FieldTable;
use framework::lapin::{BasicProperties, Channel};
use framework::testing::{cleanup, cleanup_service, config, ready_count, test_channel, unique};
use framework::{CancellationToken, MessageContext, MessageProcessor, Outcome, async_trait};
use futures_util::StreamExt;

struct PassThrough;

#[async_trait]
impl MessageProcessor for PassThrough {
    type Input = serde_json::Value;
    async fn handle(&self, v: serde_json::Value, _ctx: &MessageContext) -> Outcome {
        Outcome::success(v)
    }
}

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn body() -> Vec<u8> {
    // A 1 KiB JSON document.
    let pad = "x".repeat(1024 - 12);
    format!("{{\"pad\":\"{pad}\"}}").into_bytes()
}

async fn fill(ch: &Channel, exchange: &str, key: &str, n: usize) {
    let b = body();
    let props = BasicProperties::default().with_delivery_mode(2);
    for chunk in 0..n.div_ceil(1000) {
        let m = 1000.min(n - chunk * 1000);
        for _ in 0..m {
            ch.basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                &b,
                props.clone(),
            )
            .await
            .expect("publish");
        }
        ch.wait_for_confirms().await.expect("confirms");
    }
}

async fn sink(ch: &Channel, exchange: &str) -> String {
    let name = unique("bench-sink");
    ch.queue_declare(
        name.as_str().into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("sink");
    ch.queue_bind(
        name.as_str().into(),
        exchange.into(),
        "#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind sink");
    name
}

async fn wait_count(ch: &Channel, q: &str, n: usize) {
    while (ready_count(ch, q).await as usize) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raw lapin: consume, publish with confirm, ack after the confirm; `prefetch` at once.
async fn raw(n: usize, prefetch: u16, queue_type: &str) -> f64 {
    let (_c, ch) = test_channel().await;
    let q = unique("bench-raw");
    let out = format!("{q}-out");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        framework::lapin::types::AMQPValue::LongString(queue_type.into()),
    );
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
    ch.exchange_declare(
        out.as_str().into(),
        framework::lapin::ExchangeKind::Topic,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let s = sink(&ch, &out).await;
    fill(&ch, "", &q, n).await;

    let (conn, work) = test_channel().await;
    work.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = work
        .basic_consume(
            q.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let d2 = done.clone();
    let out2 = out.clone();
    let task = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let work = work.clone();
            let out = out2.clone();
            let done = d2.clone();
            tokio::spawn(async move {
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into());
                let c = work
                    .basic_publish(
                        out.as_str().into(),
                        "raw.success".into(),
                        BasicPublishOptions::default(),
                        &delivery.data,
                        props,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm");
                if c.is_ack() {
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .expect("ack");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    wait_count(&ch, &s, n).await;
    let secs = start.elapsed().as_secs_f64();
    task.abort();
    let _ = conn.close(200, "done".into()).await;
    cleanup(vec![q, s], vec![out]);
    n as f64 / secs
}

/// The framework runtime with a pass-through processor.
async fn framework(n: usize, prefetch: u16, queue_type: &str) -> f64 {
    let (c, ch) = test_channel().await;
    let q = unique("bench-fw");
    let cfg = config(
        &q,
        &[
            ("amqp.prefetch", &prefetch.to_string()),
            ("amqp.queue_type", queue_type),
        ],
    );
    // Declare the topology, fill Q, then start consuming and time it.
    let pc =
        framework::ProcessorConfiguration::new(&format!("{q}-in"), "bench.#", "bench", PassThrough);
    let rt = framework::Runtime::new("bench", &cfg, pc);
    rt.topology().declare(&c).await.expect("declare");
    let s = sink(&ch, &format!("{q}-out")).await;
    fill(&ch, &format!("{q}-in"), "bench.x", n).await;
    let status = rt.status();
    let mut sessions = status.sessions();
    let stop = CancellationToken::new();
    let t = stop.clone();
    let task = tokio::spawn(async move { rt.run(t).await });
    let _ = sessions.wait_for(|n| *n >= 1).await;
    // Timed from the moment it consumes, like the raw loop.
    let start = Instant::now();
    wait_count(&ch, &s, n).await;
    let secs = start.elapsed().as_secs_f64();
    stop.cancel();
    let _ = task.await;
    cleanup_service(&q, &cfg.retry.delays_ms);
    cleanup(vec![s], vec![]);
    n as f64 / secs
}

#[tokio::main]
async fn main() {
    let n = env_usize("BENCH_MESSAGES", 100_000);
    let prefetch = env_usize("BENCH_PREFETCH", 16) as u16;
    println!("messages: {n} × 1 KiB, prefetch {prefetch}, persistent, publisher confirms\n");
    println!("| queue type | raw lapin msg/s | framework msg/s | framework / raw |");
    println!("|---|---:|---:|---:|");
    for qt in ["quorum", "classic"] {
        let r = raw(n, prefetch, qt).await;
        let f = framework(n, prefetch, qt).await;
        println!("| {qt} | {r:.0} | {f:.0} | {:.2} |", f / r);
    }
}

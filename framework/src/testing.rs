//! Test support for services and the framework: a real broker, unique names per test,
//! a runtime started in-process, helpers to publish and observe, cleanup on drop.
//! Not used by production code paths.

pub mod admin;
pub mod broker;
pub mod cluster;
pub mod heap;
pub mod process;
pub mod raw;
pub mod relay;
pub mod tls;

pub use process::RunWithin;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cli::{Service, load_config, processor_configuration};
use crate::config::{Config, LoadOptions};
use crate::{
    CancellationToken, MessageContext, MessageProcessor, Outcome, ProcessorConfiguration, Runtime,
    async_trait,
};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ExchangeDeleteOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use serde::de::IgnoredAny;

/// The broker the suite runs against: `STORAGETIER_TEST_AMQP_URL` (or `AMQP_URL`), default
/// the local RabbitMQ. With [`admin::mgmt_url`] it is the one setting that picks the broker.
pub fn amqp_url() -> String {
    std::env::var("STORAGETIER_TEST_AMQP_URL")
        .or_else(|_| std::env::var("AMQP_URL"))
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// `url` with its user and password replaced.
pub fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let mut u = url::Url::parse(url).expect("a valid AMQP URL");
    let _ = u.set_username(user);
    let _ = u.set_password(Some(password));
    u.to_string()
}

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "t-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// Bounds every wait in the tests: sized for a loaded 2-core machine running a debug build
/// (a passing test never waits this long; it only bounds a failing one).
pub const WAIT: Duration = Duration::from_secs(60);

/// Awaits `f`, failing the test naming `what` if it takes longer than `limit`: a peer that
/// stops answering (a broker under an alarm, a node stopping, a hung task) must fail the
/// test, not hold the suite for ever.
pub async fn within<T>(limit: Duration, what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {limit:?}"))
}

/// Config for queue `q` with fast retries, from the built-in defaults plus `extra`.
pub fn config(q: &str, extra: &[(&str, &str)]) -> Config<IgnoredAny> {
    let mut o = LoadOptions::isolated()
        .set("amqp.url", amqp_url())
        .set("amqp.reconnect_initial_ms", "100")
        .set("amqp.reconnect_max_ms", "1000")
        .set("amqp.drain_timeout_ms", "5000")
        .set("retry.delays_ms", "[200, 400]")
        .set("echo.queue", q)
        .set("echo.output_exchange", format!("{q}-out"))
        .set("echo.http_listen", "127.0.0.1:0");
    for (k, v) in extra {
        o = o.set(k, *v);
    }
    crate::config::load::<IgnoredAny>("echo", &o).expect("test config is valid")
}

/// A processor defined by a closure.
pub struct FnProcessor<F>(pub F);

#[async_trait]
impl<F> MessageProcessor for FnProcessor<F>
where
    F: Fn(serde_json::Value, &MessageContext) -> Outcome + Send + Sync + 'static,
{
    type Input = serde_json::Value;
    async fn handle(&self, input: serde_json::Value, ctx: &MessageContext) -> Outcome {
        (self.0)(input, ctx)
    }
    fn progress_headers(&self) -> &'static [&'static str] {
        &[TEST_PROGRESS]
    }
}

/// The progress header test processors keep their marks in.
pub const TEST_PROGRESS: &str = "x-test-done";

/// Calls seen by a processor: (body, context).
pub type Calls = Arc<Mutex<Vec<(serde_json::Value, MessageContext)>>>;

/// A running runtime plus broker handles for asserting.
pub struct Harness {
    pub q: String,
    pub input_exchange: String,
    pub output_exchange: String,
    pub conn: Connection,
    pub ch: Channel,
    /// The service's runtime (None once stopped).
    runtime: Option<Background>,
    pub status: Arc<crate::Status>,
    pub delays: Vec<u64>,
    /// Other exchanges the service declared (`Binding::publishes_to`), deleted on drop too.
    pub publishes_to: Vec<String>,
    /// Deletes what the service declared, after the runtime was told to stop (fields drop
    /// after [`Drop::drop`]).
    _cleanup: Cleanup,
}

/// A runtime running in the background of a test, for what [`Harness`] does not cover
/// (another broker, a binding the harness does not make, a runtime that is not ready yet).
pub struct Background {
    /// Its status (readiness, sessions).
    pub status: Arc<crate::Status>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), crate::runtime::RuntimeError>>>,
}

impl Background {
    /// Starts `pc` under `cfg` (does not wait until it consumes).
    pub fn start<P: MessageProcessor, S>(
        name: &str,
        cfg: &Config<S>,
        pc: ProcessorConfiguration<P>,
    ) -> Background {
        let runtime = Runtime::new(name, cfg, pc);
        let status = runtime.status();
        let stop = CancellationToken::new();
        let t = stop.clone();
        let task = tokio::spawn(async move { runtime.run(t).await });
        Background {
            status,
            stop,
            task: Some(task),
        }
    }

    /// Stops it and asserts it ended cleanly within `WAIT`.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            within(WAIT, "stopping the runtime", t)
                .await
                .expect("runtime task")
                .expect("runtime ended without error");
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Config of service `S` for a test: built-in defaults, a unique queue, output exchange
/// and input exchange (`<Q>-in`), fast retries, an ephemeral HTTP port, the data dir
/// `data_dir` (made here: a configured data dir must exist), then `extra` overrides
/// (`("online_archive.vault_url", "…")`).
pub fn service_config<S: Service>(
    data_dir: &std::path::Path,
    extra: &[(&str, &str)],
) -> Config<S::Settings> {
    std::fs::create_dir_all(data_dir).expect("test data dir can be made");
    let q = unique(S::NAME);
    let sec = S::SECTION;
    let mut o = LoadOptions::isolated()
        .set("amqp.url", amqp_url())
        .set("amqp.reconnect_initial_ms", "100")
        .set("amqp.reconnect_max_ms", "1000")
        .set("amqp.drain_timeout_ms", "5000")
        .set("retry.delays_ms", "[200, 400]")
        .set("storage.data_dir", data_dir.display().to_string())
        .set(&format!("{sec}.queue"), &q)
        .set(&format!("{sec}.output_exchange"), format!("{q}-out"))
        .set(&format!("{sec}.input_exchange"), format!("{q}-in"))
        .set(&format!("{sec}.http_listen"), "127.0.0.1:0");
    for (k, v) in extra {
        o = o.set(k, *v);
    }
    load_config::<S>(&o).expect("test config is valid")
}

/// Config of another replica of service `S` on `first`'s queue and exchanges (how a
/// scaled-out deployment runs): [`service_config`] with `first`'s names, then `extra`.
pub fn replica_config<S: Service>(
    data_dir: &std::path::Path,
    first: &Harness,
    extra: &[(&str, &str)],
) -> Config<S::Settings> {
    let sec = S::SECTION;
    let names = [
        (format!("{sec}.queue"), first.q.clone()),
        (
            format!("{sec}.input_exchange"),
            first.input_exchange.clone(),
        ),
        (
            format!("{sec}.output_exchange"),
            first.output_exchange.clone(),
        ),
    ];
    let mut all: Vec<(&str, &str)> = names
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    all.extend_from_slice(extra);
    service_config::<S>(data_dir, &all)
}

/// A command running `bin` with none of the test's environment but `PATH`, `HOME` and
/// `TMPDIR`: an `APP_ENV` or a `STORAGETIER__…` exported in the shell that runs the suite
/// would otherwise reach the service and change what it runs on.
pub fn isolated_command(bin: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.env_clear();
    for keep in ["PATH", "HOME", "TMPDIR"] {
        if let Some(v) = std::env::var_os(keep) {
            c.env(keep, v);
        }
    }
    c
}

/// A command running service binary `bin` as its own process in a test: broker `url`,
/// queue `q` under `[section]` with the `<q>-in` / `<q>-out` exchanges, an ephemeral
/// HTTP port, warn-level logs, config files from `config_dir` (empty: built-in defaults),
/// and no other environment of the test's (but `PATH`, `HOME`, `TMPDIR`).
pub fn service_command(
    bin: &str,
    section: &str,
    q: &str,
    url: &str,
    config_dir: &std::path::Path,
) -> std::process::Command {
    let sec = section.to_uppercase();
    let mut c = isolated_command(bin);
    c.arg("--config-dir")
        .arg(config_dir)
        .env("STORAGETIER__AMQP__URL", url)
        .env(format!("STORAGETIER__{sec}__QUEUE"), q)
        .env(
            format!("STORAGETIER__{sec}__OUTPUT_EXCHANGE"),
            format!("{q}-out"),
        )
        .env(
            format!("STORAGETIER__{sec}__INPUT_EXCHANGE"),
            format!("{q}-in"),
        )
        .env(format!("STORAGETIER__{sec}__HTTP_LISTEN"), "127.0.0.1:0")
        .env("STORAGETIER__LOG__LEVEL", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    c
}

/// Opens a test connection with a confirm channel.
pub async fn test_channel() -> (Connection, Channel) {
    let conn = within(
        WAIT,
        "the broker's connection handshake",
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("broker reachable (is RabbitMQ running on 127.0.0.1:5672?)");
    let ch = within(
        WAIT,
        "opening a channel",
        crate::runtime::confirm_channel(&conn),
    )
    .await
    .expect("channel");
    (conn, ch)
}

impl Harness {
    /// Starts `processor` on a fresh queue and waits until it consumes.
    pub async fn start<P: MessageProcessor>(
        prefix: &str,
        extra: &[(&str, &str)],
        processor: P,
    ) -> Harness {
        let q = unique(prefix);
        let cfg = config(&q, extra);
        Self::start_with(cfg, processor).await
    }

    /// Starts `processor` with an explicit config, bound to `<Q>-in` with `test.#`, `other.*`.
    pub async fn start_with<P: MessageProcessor, S>(cfg: Config<S>, processor: P) -> Harness {
        let q = cfg.service.queue.clone();
        let pc = ProcessorConfiguration {
            binding: crate::Binding {
                exchange: format!("{q}-in"),
                routing_keys: vec!["test.#".into(), "other.*".into()],
                output_routing_key: "test.out".into(),
                publishes_to: Vec::new(),
                ..Default::default()
            },
            processor,
        };
        Self::start_pc("test-service", cfg, pc).await
    }

    /// Starts service `S` in-process with `cfg` (see [`service_config`]).
    pub async fn start_service<S: Service>(cfg: Config<S::Settings>) -> Harness {
        let pc = processor_configuration::<S>(&cfg)
            .await
            .expect("service processor builds");
        Self::start_pc(S::NAME, cfg, pc).await
    }

    /// Starts a processor configuration in-process and waits until it consumes.
    pub async fn start_pc<P: MessageProcessor, S>(
        name: &str,
        cfg: Config<S>,
        pc: ProcessorConfiguration<P>,
    ) -> Harness {
        let q = cfg.service.queue.clone();
        let input_exchange = pc.binding.exchange.clone();
        let publishes_to = pc.binding.publishes_to.clone();
        // Taken before the runtime declares anything: a runtime that never consumes fails
        // the test below, before a `Harness` exists to clean up.
        let mut queues = vec![q.clone(), format!("{q}-dlq")];
        queues.extend(cfg.retry.delays_ms.iter().map(|d| format!("{q}-retry-{d}")));
        let mut exchanges = vec![
            input_exchange.clone(),
            cfg.service.output_exchange.clone(),
            format!("{q}-retry"),
            format!("{q}-fail"),
        ];
        exchanges.extend(publishes_to.iter().cloned());
        let cleanup = Cleanup::new(queues, exchanges);
        let runtime = Background::start(name, &cfg, pc);
        let status = runtime.status.clone();
        let mut sessions = status.sessions();
        within(
            WAIT,
            "the runtime starting to consume",
            sessions.wait_for(|n| *n >= 1),
        )
        .await
        .expect("status alive");
        let (conn, ch) = test_channel().await;
        Harness {
            output_exchange: cfg.service.output_exchange.clone(),
            q,
            input_exchange,
            conn,
            ch,
            runtime: Some(runtime),
            status,
            delays: cfg.retry.delays_ms.clone(),
            publishes_to,
            _cleanup: cleanup,
        }
    }

    /// The topology this harness's service declared (for the `dlq` functions), as
    /// [`Harness::start`] binds it (`<Q>-in` with `test.#`).
    pub fn topology(&self) -> crate::topology::Topology {
        let cfg = config(&self.q, &[]);
        crate::topology::Topology::new(
            &self.q,
            &self.output_exchange,
            vec![crate::topology::Subscription {
                exchange: self.input_exchange.clone(),
                routing_key: "test.#".into(),
            }],
            &cfg.amqp,
            &cfg.retry,
        )
    }

    /// Replays every dead letter of this harness's service, as `dlq replay --all` does.
    pub async fn replay_all(&self) -> Vec<crate::dlq::DeadLetter> {
        crate::dlq::replay_filtered(&self.conn, &self.topology(), &Default::default(), false)
            .await
            .expect("replayed")
    }

    /// Publishes to the input exchange with confirms.
    pub async fn publish(&self, key: &str, body: &[u8], props: BasicProperties) {
        publish(&self.ch, &self.input_exchange, key, body, props).await;
    }

    /// Publishes as a retry tier sends a message back after `attempts` attempts: through
    /// the default exchange to `Q`, its origin (the input exchange, `key`) in headers, as
    /// well as any in `props`. The only way the framework reads those headers: on a
    /// producer's delivery they are the producer's, and dropped.
    pub async fn publish_retried(
        &self,
        key: &str,
        body: &[u8],
        props: BasicProperties,
        attempts: u32,
    ) {
        let mut headers = props.headers().clone().unwrap_or_default();
        crate::headers::set_int(&mut headers, crate::headers::RETRY_COUNT, attempts.into());
        crate::headers::set_str(
            &mut headers,
            crate::headers::ORIGINAL_EXCHANGE,
            &self.input_exchange,
        );
        crate::headers::set_str(&mut headers, crate::headers::ORIGINAL_ROUTING_KEY, key);
        publish(&self.ch, "", &self.q, body, props.with_headers(headers)).await;
    }

    /// A consumer on a fresh queue bound to the output exchange with `#`.
    pub async fn watch_output(&self) -> Consumer {
        watch(&self.ch, &self.output_exchange, "#").await
    }

    /// A copy of every message sent to the first retry tier (`Q-retry`, its delay as the
    /// key): a retry awaited as it happens, not by its coming back.
    pub async fn watch_first_retry(&self) -> Consumer {
        watch(
            &self.ch,
            &format!("{}-retry", self.q),
            &self.delays[0].to_string(),
        )
        .await
    }

    /// A consumer on `Q-dlq`.
    pub async fn watch_dlq(&self) -> Consumer {
        consume(&self.ch, &format!("{}-dlq", self.q)).await
    }

    /// Asks the runtime to stop (as a SIGTERM does) without waiting for it; [`Harness::stop`]
    /// then waits for the end.
    pub fn request_stop(&self) {
        if let Some(r) = &self.runtime {
            r.stop.cancel();
        }
    }

    /// Stops the runtime and waits for it to return.
    pub async fn stop(&mut self) {
        if let Some(r) = self.runtime.take() {
            r.stop().await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Told to stop first; `_cleanup` then deletes what it declared.
        drop(self.runtime.take());
    }
}

/// Runs `f` to completion (at most [`WAIT`]) on a thread and runtime of its own: usable
/// from `Drop`, inside or outside a runtime. Bounded: a broker that stops answering must
/// not hold a test (its clean-up runs in every test's drops) for ever.
pub(crate) fn run_on_own_thread(f: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            // The timer is made inside the runtime: `timeout` needs one to exist.
            && rt
                .block_on(async { tokio::time::timeout(WAIT, f).await })
                .is_err()
        {
            eprintln!("test clean-up: no answer within {WAIT:?}; given up");
        }
    })
    .join();
}

/// Deletes queues and exchanges from a separate thread (usable in Drop).
pub fn cleanup(queues: Vec<String>, exchanges: Vec<String>) {
    run_on_own_thread(async move {
        let Ok(conn) = Connection::connect(&amqp_url(), ConnectionProperties::default()).await
        else {
            return;
        };
        for q in queues {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        for e in exchanges {
            if let Ok(ch) = conn.create_channel().await {
                let _ = ch
                    .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "cleanup".into()).await;
    });
}

/// Deletes everything a service with queue `q` declared (retry tiers `delays`) plus its
/// `<q>-in` / `<q>-out` exchanges as the tests name them.
pub fn cleanup_service(q: &str, delays: &[u64]) {
    drop(Cleanup::service(q, delays));
}

/// Deletes its queues and exchanges when dropped, so a failing test cleans up too: take
/// one as soon as a test names its broker objects.
#[derive(Debug, Default)]
pub struct Cleanup {
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Cleanup {
    /// These queues and exchanges.
    pub fn new(queues: Vec<String>, exchanges: Vec<String>) -> Cleanup {
        Cleanup { queues, exchanges }
    }

    /// Everything a service with queue `q` declares (retry tiers `delays`) plus its
    /// `<q>-in` / `<q>-out` exchanges as the tests name them.
    pub fn service(q: &str, delays: &[u64]) -> Cleanup {
        let mut queues = vec![q.to_string(), format!("{q}-dlq")];
        queues.extend(delays.iter().map(|d| format!("{q}-retry-{d}")));
        Cleanup::new(
            queues,
            vec![
                format!("{q}-in"),
                format!("{q}-out"),
                format!("{q}-retry"),
                format!("{q}-fail"),
            ],
        )
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        cleanup(
            std::mem::take(&mut self.queues),
            std::mem::take(&mut self.exchanges),
        );
    }
}

/// Publishes with confirms and asserts the broker acked.
pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
    let c = within(WAIT, "the broker's confirm of a test publish", async {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm")
    })
    .await;
    assert!(c.is_ack(), "broker acked the test publish");
}

/// A consumer (auto-ack off; helper acks) on a new exclusive queue bound to `exchange`.
pub async fn watch(ch: &Channel, exchange: &str, key: &str) -> Consumer {
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("temp queue");
    ch.queue_bind(
        q.name().clone(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind temp queue");
    consume(ch, q.name().as_str()).await
}

/// A consumer on an existing queue.
pub async fn consume(ch: &Channel, queue: &str) -> Consumer {
    ch.basic_consume(
        queue.into(),
        format!("test-{}", uuid::Uuid::new_v4()).as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("consume")
}

/// The next delivery within `WAIT`, acked; panics if none comes.
pub async fn next(c: &mut Consumer) -> Delivery {
    next_within(c, WAIT)
        .await
        .expect("a message arrived in time")
}

/// The next delivery within `d`, acked, or None.
pub async fn next_within(c: &mut Consumer, d: Duration) -> Option<Delivery> {
    match tokio::time::timeout(d, c.next()).await {
        Ok(Some(Ok(del))) => {
            within(
                WAIT,
                "a test ack (a blocked connection sends nothing)",
                del.acker.ack(BasicAckOptions::default()),
            )
            .await
            .expect("ack");
            Some(del)
        }
        _ => None,
    }
}

/// Ready messages in `queue` (passive declare).
pub async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    crate::dlq::count(ch, queue).await.expect("queue exists")
}

/// Waits (at most `WAIT`) until `queue` holds exactly `n` ready messages. Messages a
/// closing channel held unacked (`dlq list`, `dlq replay`) return to a quorum queue
/// asynchronously, so a count taken at once can miss them.
pub async fn await_ready_count(ch: &Channel, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = ready_count(ch, queue).await;
        if got == n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue} holds {got} ready messages, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A string header of a delivery.
pub fn header(d: &Delivery, key: &str) -> Option<String> {
    crate::headers::get_str(d.properties.headers().as_ref()?, key)
}

/// The message id of an output (every output has one: design §3).
pub fn message_id(d: &Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .expect("an output has a message id")
}

/// Takes the next dead letter from `dlq` and asserts it is record `n` of a batch,
/// dead-lettered on its own (`x-error-kind: permanent`, `x-error` starting `record n: `),
/// and that no other follows it within 300 ms.
pub async fn expect_only_record_dead_lettered(dlq: &mut Consumer, n: usize) {
    let dl = next(dlq).await;
    assert_eq!(
        header(&dl, crate::headers::ERROR_KIND).as_deref(),
        Some(crate::headers::KIND_PERMANENT)
    );
    let error = header(&dl, "x-error").unwrap_or_default();
    assert!(error.starts_with(&format!("record {n}: ")), "{error}");
    assert!(
        next_within(dlq, Duration::from_millis(300)).await.is_none(),
        "record {n} dead-lettered once, and nothing else"
    );
}

/// An integer header of a delivery.
pub fn int_header(d: &Delivery, key: &str) -> Option<i64> {
    crate::headers::get_int(d.properties.headers().as_ref()?, key)
}

/// The topology of a test service on queue `q` under `cfg`, bound as [`Harness::start`]
/// binds it: `<q>-in` with `test.#`, output `<q>-out`.
pub fn test_topology<S>(q: &str, cfg: &Config<S>) -> crate::topology::Topology {
    crate::topology::Topology::new(
        q,
        &format!("{q}-out"),
        vec![crate::topology::Subscription {
            exchange: format!("{q}-in"),
            routing_key: "test.#".into(),
        }],
        &cfg.amqp,
        &cfg.retry,
    )
}

/// How many messages of `queue` this process counted under `outcome`
/// (`storagetier_messages_total`): for services run in-process, whose counters are this
/// process's (the recorder is installed here if it was not; a session started before
/// that counts nothing).
pub fn outcome_count(queue: &str, outcome: &str) -> u64 {
    counted(
        "storagetier_messages_total",
        &[("queue", queue), ("outcome", outcome)],
    )
}

/// The sum of this process's counter `metric` over the series carrying every label of
/// `labels` (see [`outcome_count`]).
pub fn counted(metric: &str, labels: &[(&str, &str)]) -> u64 {
    let want: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let prefix = format!("{metric}{{");
    crate::telemetry::metrics_handle()
        .render()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter(|l| want.iter().all(|w| l.contains(w.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until [`outcome_count`] of `queue` under `outcome` reaches `n`, or fails the test
/// after [`WAIT`].
pub async fn await_outcome_count(queue: &str, outcome: &str, n: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let now = outcome_count(queue, outcome);
        if now >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{queue}: {now} of {n} counted as {outcome}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the `/metrics` of a service on `127.0.0.1:port` holds `line`, or fails the
/// test after [`WAIT`].
pub async fn await_metric(port: u16, line: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let text = match reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.contains(line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{line:?} in:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `cond` holds, polling every 20 ms, at most `WAIT`.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Closes, from the broker side (management API), every connection whose client-provided
/// name is `name`; returns how many were closed.
pub async fn close_connection_named(name: &str) -> usize {
    admin::Admin::suite().close_connections_named(name).await
}

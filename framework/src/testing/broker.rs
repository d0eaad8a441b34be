//! A private RabbitMQ node per test, so a test can stop and start "the broker"
//! (`rabbitmqctl stop_app` / `start_app`) without touching the shared broker every other
//! test runs against: broker-restart scenarios stay parallel-safe.
//!
//! The node is started from the machine's RabbitMQ install (`rabbitmq-server`, run as root
//! or as the `rabbitmq` user, like `scripts/ensure-services`), or from the chroot named by
//! `STORAGETIER_TEST_RABBITMQ_ROOT` (RabbitMQ 4.x from `scripts/rabbitmq4`), on free loopback
//! ports with its own data directory, and is killed and deleted on drop; a node whose test
//! process died before it could be dropped is killed by its reaper within seconds (and any
//! left is swept by the next start).

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::process::{self, Guarded, RunWithin};

/// Bounds every wait of a fault run.
const FAULT_RUN_LIMIT: Duration = Duration::from_secs(600);

/// How long one RabbitMQ CLI command may take (`await_startup` is given 90 s of it): a
/// node that stops answering fails the test instead of holding it (the CLI's own
/// timeout is infinite by default).
const CLI_BUDGET: Duration = Duration::from_secs(150);

/// A RabbitMQ node of this test's own.
pub struct PrivateBroker {
    node: String,
    port: u16,
    /// The node's directory as this process sees it.
    dir: PathBuf,
    root: Option<PathBuf>,
    server: Option<Guarded>,
    /// Held while the node lives: its closing (this handle dropped, or the test process
    /// gone however it ended) sets off the node's [`reaper`].
    _reaper: Option<std::process::ChildStdin>,
}

/// A loopback port nothing listens on right now, and not handed out before by this
/// process: the kernel may offer a port again once it is released, and a node booting
/// for seconds before it binds the port it was given would then lose it to another.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The RabbitMQ install private nodes come from: the chroot named by
/// `STORAGETIER_TEST_RABBITMQ_ROOT` (`scripts/rabbitmq4`'s 4.x) or, unset, the machine's own.
pub fn install_root() -> Option<PathBuf> {
    std::env::var_os("STORAGETIER_TEST_RABBITMQ_ROOT")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// A command of the RabbitMQ install at `root` (None: the machine's own).
fn rabbit_command(root: Option<&Path>, program: &str) -> Command {
    match root {
        Some(r) => {
            let mut c = Command::new("chroot");
            c.arg(r).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Where private nodes keep their directories, seen from inside the install.
const NODE_DIRS: &str = "/tmp";
const DIR_PREFIX: &str = "storagetier-broker-";

/// Kills and deletes private nodes whose test process is gone (killed before its guards
/// could run), so no run leaves a node behind for the next.
fn sweep_orphans(root: Option<&Path>) {
    let base = host_path(root, Path::new(NODE_DIRS));
    let Ok(entries) = std::fs::read_dir(&base) else {
        return;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(".making-") {
            // Renamed within microseconds of its creation: one this old lost its process
            // in between (it never started a node).
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|a| a > Duration::from_secs(600)));
            if old {
                let _ = std::fs::remove_dir_all(&dir);
            }
            continue;
        }
        if !name.starts_with(DIR_PREFIX) {
            continue;
        }
        let pid_of = |f: &str| -> Option<i32> {
            std::fs::read_to_string(dir.join(f))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let owner_alive =
            pid_of("owner").is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
        if owner_alive {
            continue;
        }
        if let Some(p) = pid_of("pid") {
            kill_node(p, &name[DIR_PREFIX.len()..]);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Kills process `pid` if it is still private node `id`'s server: a pid read from a file
/// may long since belong to another process (ids come round: pid_max is 32768 on many
/// machines), which a blind SIGKILL as root would take down — another test's node or
/// server, or the test run itself.
fn kill_node(pid: i32, id: &str) {
    // Its arguments name its directory (or, with some wrappers, only its environment does).
    let marks = [format!("{DIR_PREFIX}{id}"), format!("st{id}@")];
    let names_it = |what: &str| {
        std::fs::read(format!("/proc/{pid}/{what}")).is_ok_and(|text| {
            marks
                .iter()
                .any(|m| text.windows(m.len()).any(|w| w == m.as_bytes()))
        })
    };
    if names_it("cmdline") || names_it("environ") {
        // SAFETY: plain syscall; a pid that is gone yields ESRCH, ignored.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// A process outside the test's process tree, in a session of its own, that kills node
/// `id`'s processes and deletes its directory `dir` once the returned pipe closes: when
/// the node is dropped, and when the test process dies without dropping it (killed by a
/// time bound, a Ctrl-C on `cargo test`), and when it is dropped before the node wrote its
/// pid file (a panic while it booted). The
/// install's wrapper starts the server through `su`, in another session, where neither
/// the test's process-group kill nor its parent-death signal reaches it; a sweep at the
/// next node's start came only if another test started one.
fn reaper(id: &str, dir: &Path) -> Option<std::process::ChildStdin> {
    // Names come through the environment, not the script's text, and the server is found by
    // its environment too (its command line may not name it). Done at once if the node was
    // dropped (its directory gone); otherwise tried for a while: a wrapper killed while
    // starting may still start the server after the first try. One `grep` reads every
    // process's files; the reaper skips itself (its environment names the node).
    const SCRIPT: &str = r#"read -r line
[ -d "$STORAGETIER_NODE_DIR" ] || exit 0
mark=$STORAGETIER_NODE_MARK
dir=$STORAGETIER_NODE_DIR
unset STORAGETIER_NODE_MARK STORAGETIER_NODE_DIR STORAGETIER_REAPER
i=0
while [ "$i" -lt 10 ]; do
  for f in $(grep -laE "$mark" /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}
    p=${p%%/*}
    [ "$p" = "$$" ] || kill -9 "$p" 2>/dev/null
  done
  i=$((i + 1))
  sleep 1
done
rm -rf -- "$dir""#;
    let mut outer = Command::new("sh")
        .arg("-c")
        // A background job's stdin is /dev/null unless redirected from a descriptor.
        .arg(r#"exec 3<&0; setsid sh -c "$STORAGETIER_REAPER" <&3 >/dev/null 2>&1 &"#)
        .env("STORAGETIER_REAPER", SCRIPT)
        // Its directory, or its node name where only the environment names the directory.
        .env("STORAGETIER_NODE_MARK", format!("{DIR_PREFIX}{id}|st{id}@"))
        .env("STORAGETIER_NODE_DIR", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let pipe = outer.stdin.take();
    // The outer shell returns at once, its reaper started and no longer its child.
    let _ = outer.wait();
    pipe
}

fn host_path(root: Option<&Path>, inner: &Path) -> PathBuf {
    match root {
        Some(r) => r.join(inner.strip_prefix("/").unwrap_or(inner)),
        None => inner.to_path_buf(),
    }
}

impl PrivateBroker {
    /// Starts a fresh node and waits until it accepts AMQP connections.
    pub async fn start() -> PrivateBroker {
        Self::start_with(|_, _| String::new()).await
    }

    /// Starts a fresh node whose `rabbitmq.conf` also holds what `setup` returns; `setup`
    /// gets the node's directory as this process sees it and as the node sees it (they
    /// differ for a chrooted install), to put files such as certificates there.
    pub async fn start_with(setup: impl FnOnce(&Path, &Path) -> String) -> PrivateBroker {
        let broker = Self::spawn_with(setup);
        broker.await_started().await;
        broker
    }

    /// Starts the node's server process and returns at once (see [`Self::await_started`]),
    /// so several nodes can boot side by side.
    pub(crate) fn spawn_with(setup: impl FnOnce(&Path, &Path) -> String) -> PrivateBroker {
        let root = install_root();
        sweep_orphans(root.as_deref());
        let id = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let node = format!("st{id}@localhost");
        let port = free_port();
        let inner = PathBuf::from(NODE_DIRS).join(format!("{DIR_PREFIX}{id}"));
        let dir = host_path(root.as_deref(), &inner);
        // Made under another name and renamed once it names its owner: a sweep by another
        // test starting a node at the same moment never sees it without one.
        let making = dir.with_file_name(format!(".making-{id}"));
        std::fs::create_dir_all(&making).expect("broker dir");
        std::fs::write(making.join("owner"), std::process::id().to_string()).expect("owner file");
        std::fs::rename(&making, &dir).expect("broker dir in place");
        // The server runs as the `rabbitmq` user (the install's wrapper switches to it).
        set_mode(&dir, 0o777);
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        let extra = setup(&dir, &inner);
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n{extra}"),
        )
        .expect("broker config");
        for f in ["enabled_plugins", "rabbitmq.conf"] {
            set_mode(&dir.join(f), 0o666);
        }
        let log = std::fs::File::create(dir.join("server.out")).expect("server log");
        set_mode(&dir.join("server.out"), 0o666);
        let d = |name: &str| inner.join(name).display().to_string();
        let mut cmd = rabbit_command(root.as_deref(), "rabbitmq-server");
        cmd.env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", d("feature_flags"))
            .env("RABBITMQ_PID_FILE", d("pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        let reaper = reaper(id, &dir);
        let server = process::spawn(&mut cmd)
            .expect("rabbitmq-server on PATH (the machine's RabbitMQ install)");
        PrivateBroker {
            node,
            port,
            dir,
            root,
            server: Some(server),
            _reaper: reaper,
        }
    }

    /// Waits until a node started by [`Self::spawn_with`] accepts AMQP connections.
    pub(crate) async fn await_started(&self) {
        let broker = self;
        let inner = PathBuf::from(NODE_DIRS).join(
            broker
                .dir
                .file_name()
                .expect("the node directory has a name"),
        );
        let d = |name: &str| inner.join(name).display().to_string();
        // `rabbitmqctl wait` reads the pid file as soon as it exists and fails on one that is
        // still being written ("garbage_in_pid_file"): wait for a whole pid first.
        let pid_file = broker.dir.join("pid");
        let deadline = Instant::now() + Duration::from_secs(90);
        while std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "private broker wrote its pid file: {}",
                std::fs::read_to_string(broker.dir.join("server.out")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        broker.ctl(&["wait", &d("pid"), "--timeout", "90"]);
        broker.await_amqp().await;
    }

    /// The node's Erlang name (`st…@localhost`), as `rabbitmqctl -n` and `join_cluster` take it.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The RabbitMQ version of this node's install, e.g. `(4, 0)`.
    pub fn version(&self) -> (u32, u32) {
        let out = rabbit_command(self.root.as_deref(), "rabbitmqctl")
            .args(["version"])
            .output_within(CLI_BUDGET)
            .expect("rabbitmqctl on PATH (and answering)");
        let text = String::from_utf8_lossy(&out.stdout);
        // Unread, a version taken as 0.0 would skip the tests that depend on it, silently.
        let parsed = text.trim().lines().last().map(|l| {
            l.trim()
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Vec<_>>()
        });
        match (out.status.success(), parsed.as_deref()) {
            (true, Some([Some(major), Some(minor), ..])) => (*major, *minor),
            _ => panic!(
                "`rabbitmqctl version` gave no version: {:?}\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// The AMQP URL of this node.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Stops the RabbitMQ application (connections drop, the port closes; the node and
    /// its data stay).
    pub fn stop_app(&self) {
        self.ctl(&["stop_app"]);
    }

    /// Starts the application again and waits until it accepts connections.
    pub async fn start_app(&self) {
        self.ctl(&["start_app"]);
        self.ctl(&["await_startup", "--timeout", "90"]);
        self.await_amqp().await;
    }

    /// Runs `rabbitmqctl -n <node> args…` and asserts it succeeded.
    pub fn ctl(&self, args: &[&str]) {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "rabbitmqctl -n {} {args:?} failed: {}\n{}\nserver output: {}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default()
        );
    }

    /// Suspends (`on`) or resumes the process of `queue` on this node — a quorum queue's Ra
    /// server or a classic queue's process — so that nothing published to it is confirmed
    /// meanwhile, as a quorum queue electing a leader does not confirm. The suspender is a
    /// process of its own (registered as `name`): the CLI's own call ends at once, and a
    /// process's suspensions end with it. Blocks its thread (a multi-threaded runtime's).
    pub fn suspend_queue(&self, queue: &str, name: &str, on: bool) {
        let expr = if on {
            format!(
                "{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{queue}\">>)), \
                 P = case amqqueue:get_pid(Q) of {{Ra, _}} -> whereis(Ra); Pid -> Pid end, \
                 Me = self(), \
                 S = spawn(fun() -> true = erlang:suspend_process(P), Me ! suspended, \
                     receive resume -> erlang:resume_process(P) end end), \
                 register({name}, S), \
                 receive suspended -> ok after 10000 -> timeout end."
            )
        } else {
            format!("{name} ! resume, ok.")
        };
        let out = tokio::task::block_in_place(|| self.ctl_output(&["eval", &expr]));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.trim() == "ok",
            "rabbitmqctl eval {expr}: {:?}\n{said}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `rabbitmqctl -n <node> args…` (or another CLI tool of the install, e.g.
    /// `rabbitmq-queues`, with [`Self::tool_output`]) and returns what it did.
    pub fn ctl_output(&self, args: &[&str]) -> std::process::Output {
        self.tool_output("rabbitmqctl", args)
    }

    /// Runs `tool -n <node> args…` of this node's install.
    pub fn tool_output(&self, tool: &str, args: &[&str]) -> std::process::Output {
        rabbit_command(self.root.as_deref(), tool)
            .arg("-n")
            .arg(&self.node)
            .args(args)
            .output_within(CLI_BUDGET)
            .expect("the RabbitMQ CLI tools on PATH (and answering)")
    }

    async fn await_amqp(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match connect(&self.url()).await {
                Ok(c) => {
                    close(c).await;
                    return;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "private broker up: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// A connection and confirm channel to this node.
    pub async fn channel(&self) -> Option<(Connection, Channel)> {
        let conn = connect(&self.url()).await.ok()?;
        let ch = tokio::time::timeout(CONNECT_LIMIT, crate::runtime::confirm_channel(&conn))
            .await
            .ok()?
            .ok()?;
        Some((conn, ch))
    }

    /// Messages ready in `queue`, or None while the node is unreachable.
    pub async fn count(&self, queue: &str) -> Option<u32> {
        count_at(&self.url(), queue).await
    }

    /// Waits up to [`super::WAIT`] for `queue` to hold no message, ready or delivered and
    /// unacknowledged ([`Self::messages`]: a quorum queue applies a settlement a moment
    /// after it is sent); false if it still holds some then.
    pub async fn await_settled(&self, queue: &str) -> bool {
        let deadline = Instant::now() + super::WAIT;
        loop {
            if self.messages(queue) == Some(0) {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Messages in `queue`, ready or delivered and unacknowledged, as the node counts
    /// them now; None where the queue is not listed. Blocks its thread (a multi-threaded
    /// runtime's).
    pub fn messages(&self, queue: &str) -> Option<u64> {
        tokio::task::block_in_place(|| self.all_messages())?
            .get(queue)
            .copied()
    }

    /// Every queue's messages, ready and unacknowledged (`rabbitmqctl list_queues`, read
    /// as JSON: a name may hold spaces); None where the node does not answer. Blocking.
    pub fn all_messages(&self) -> Option<std::collections::HashMap<String, u64>> {
        let out = self.ctl_output(&["list_queues", "name", "messages", "--formatter", "json"]);
        if !out.status.success() {
            return None;
        }
        let serde_json::Value::Array(rows) = serde_json::from_slice(&out.stdout).ok()? else {
            return None;
        };
        Some(
            rows.iter()
                .filter_map(|r| Some((r["name"].as_str()?.to_string(), r["messages"].as_u64()?)))
                .collect(),
        )
    }

    /// Declares a durable quorum queue bound to `exchange` with `#` to collect outputs.
    pub async fn sink(&self, queue: &str, exchange: &str) {
        super::within(
            super::WAIT,
            "declaring the sink",
            self.declare_sink(queue, exchange),
        )
        .await;
    }

    async fn declare_sink(&self, queue: &str, exchange: &str) {
        let (conn, ch) = self.channel().await.expect("private broker reachable");
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(queue.into(), durable, args)
            .await
            .expect("sink queue");
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind sink");
        close(conn).await;
    }

    /// Publishes every body persistently to `exchange` with `key`, waiting for confirms.
    pub async fn preload(&self, exchange: &str, key: &str, bodies: impl Iterator<Item = Vec<u8>>) {
        super::within(
            FAULT_RUN_LIMIT,
            "the preload",
            self.publish_all(exchange, key, bodies),
        )
        .await;
    }

    async fn publish_all(&self, exchange: &str, key: &str, bodies: impl Iterator<Item = Vec<u8>>) {
        let (conn, ch) = self.channel().await.expect("private broker reachable");
        let mut pending = Vec::new();
        for body in bodies {
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    key.into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish");
            pending.push(confirm);
        }
        for confirm in pending {
            assert!(confirm.await.expect("confirm").is_ack(), "preload acked");
        }
        close(conn).await;
    }

    /// Waits until `sink` holds a fifth of `n` outputs, stops the broker for `outage`,
    /// starts it again and publishes `held_back`, so the stream is still under way after
    /// the restart however fast the service ran before it; then waits until `sink` holds
    /// `n` outputs (preloaded and held back) and the service's queue `queue` is empty.
    /// Returns when consuming resumed after the broker was back.
    pub async fn restart_mid_stream(
        &self,
        queue: &str,
        sink: &str,
        n: usize,
        outage: Duration,
        held_back: super::cluster::Feed,
    ) -> Restart {
        assert!(
            !held_back.bodies.is_empty(),
            "something to handle after the restart"
        );
        let started = Instant::now();
        await_outputs(self, sink, n / 5, started).await;
        self.stop_app();
        let down_at = Instant::now();
        // The outage itself: the service must ride it out; there is no condition to await.
        tokio::time::sleep(outage).await;
        self.start_app().await;
        let up_at = Instant::now();
        let before = self.count(sink).await.unwrap_or(0) as usize;
        self.preload(
            &held_back.exchange,
            &held_back.key,
            held_back.bodies.into_iter(),
        )
        .await;
        await_outputs(self, sink, before + 1, started).await;
        let resumed = up_at.elapsed();
        await_done(self, queue, sink, n, started).await;
        Restart {
            down: up_at - down_at,
            resumed,
            total: started.elapsed(),
        }
    }

    /// Closes every client connection (`rabbitmqctl close_all_connections`) `times` times,
    /// evenly spread over the `n` outputs, then waits as [`Self::restart_mid_stream`] does.
    /// Returns how long the whole run took.
    pub async fn close_all_mid_stream(
        &self,
        queue: &str,
        sink: &str,
        n: usize,
        times: usize,
    ) -> Duration {
        let started = Instant::now();
        for k in 1..=times {
            await_outputs(self, sink, k * n / (times + 1), started).await;
            self.ctl(&["close_all_connections", "closed by a fault test"]);
        }
        await_done(self, queue, sink, n, started).await;
        started.elapsed()
    }

    /// Takes every message out of `queue` and counts them by `id` (None: not counted).
    pub async fn drain_ids(
        &self,
        queue: &str,
        id: impl Fn(&[u8]) -> Option<String>,
    ) -> HashMap<String, usize> {
        let (conn, ch) = self.channel().await.expect("private broker reachable");
        let mut seen = HashMap::new();
        // A consumer with a deep prefetch: one basic.get per message crawls on a quorum
        // queue (tens of thousands of outputs took minutes).
        let mut consumer = super::within(super::WAIT, "starting the drain", async {
            ch.basic_qos(1000, BasicQosOptions::default())
                .await
                .expect("qos");
            ch.basic_consume(
                queue.into(),
                "drain".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume the queue to drain")
        })
        .await;
        let deadline = Instant::now() + FAULT_RUN_LIMIT;
        loop {
            match tokio::time::timeout(Duration::from_secs(1), consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    if let Some(k) = id(&d.data) {
                        *seen.entry(k).or_default() += 1;
                    }
                }
                Ok(_) => break,
                // Quiet for a second: done once the queue reads empty.
                Err(_) => {
                    if crate::dlq::count(&ch, queue).await.unwrap_or(0) == 0 {
                        break;
                    }
                }
            }
            assert!(Instant::now() < deadline, "drained {queue} in time");
        }
        close(conn).await;
        seen
    }
}

/// Bounds a test connection's handshake: a node stopping or booting can accept the TCP
/// connection and never answer, and an unbounded connect would hang the test for good.
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Connects to `url` within [`CONNECT_LIMIT`].
pub async fn connect(url: &str) -> Result<Connection, String> {
    match tokio::time::timeout(
        CONNECT_LIMIT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no AMQP handshake within {CONNECT_LIMIT:?}")),
    }
}

/// Closes `conn`, giving up after a few seconds (its node may have gone away meanwhile).
pub async fn close(conn: Connection) {
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "".into())).await;
}

/// Messages ready in `queue` on the broker at `url`, or None while it is unreachable.
pub async fn count_at(url: &str, queue: &str) -> Option<u32> {
    let conn = connect(url).await.ok()?;
    // A node stopping under the call must not hang it.
    let n = tokio::time::timeout(CONNECT_LIMIT, async {
        match conn.create_channel().await {
            Ok(ch) => crate::dlq::count(&ch, queue).await.ok(),
            Err(_) => None,
        }
    })
    .await
    .ok()
    .flatten();
    close(conn).await;
    n
}

/// Something that can count a queue's ready messages: one node, or a cluster (any node that
/// answers). The fault runs' waits poll it.
pub trait QueueCounts {
    /// Messages ready in `queue`, or None while unreachable.
    fn ready(&self, queue: &str) -> impl std::future::Future<Output = Option<u32>> + Send;
}

impl QueueCounts for PrivateBroker {
    async fn ready(&self, queue: &str) -> Option<u32> {
        self.count(queue).await
    }
}

/// Polls until `sink` holds at least `at_least` messages (at most 10 min from `since`).
pub async fn await_outputs(b: &impl QueueCounts, sink: &str, at_least: usize, since: Instant) {
    while (b.ready(sink).await.unwrap_or(0) as usize) < at_least {
        assert!(
            since.elapsed() < FAULT_RUN_LIMIT,
            "timed out waiting for {at_least} outputs in {sink}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `sink` holds `n` outputs and `queue` is empty (at most 10 min from `since`).
pub async fn await_done(b: &impl QueueCounts, queue: &str, sink: &str, n: usize, since: Instant) {
    loop {
        await_outputs(b, sink, n, since).await;
        if b.ready(queue).await == Some(0) {
            return;
        }
        assert!(
            since.elapsed() < FAULT_RUN_LIMIT,
            "timed out waiting for {queue} to empty"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        // The node's own pid: the wrapper may have left the process group behind.
        let pid: Option<i32> = std::fs::read_to_string(self.dir.join("pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
        if let Some(p) = pid
            && let Some(id) = self
                .node
                .strip_prefix("st")
                .and_then(|n| n.split('@').next())
        {
            kill_node(p, id);
        }
        // A node that never wrote its pid (dropped by a panic while it booted, on a loaded
        // machine) is killed by its reaper, which sweeps by its mark once its pipe closes
        // (when `_reaper` drops, next) — if its directory is still there: removed now, the
        // reaper took the node for dropped and left it running.
        if pid.is_some() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// Timings of a [`PrivateBroker::restart_mid_stream`] run.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    /// How long the broker was stopped.
    pub down: Duration,
    /// From the broker being back to the first new output.
    pub resumed: Duration,
    /// The whole run, from the service starting to the last output.
    pub total: Duration,
}

/// What a fault run measured: one row of docs/reliability.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Distinct inputs sent.
    pub sent: usize,
    /// Inputs with no outcome.
    pub lost: usize,
    /// Outcomes beyond the first per input.
    pub duplicated: usize,
}

impl Tally {
    /// The docs/reliability.md row for a broker restart run of `what`.
    pub fn restart_row(&self, what: &str, r: &Restart) -> String {
        format!(
            "| broker stop_app/start_app mid-stream, {what} | {} | {} | {} | resumed {:.1} s after start_app (down {:.1} s), {:.1} s in all |",
            self.sent,
            self.lost,
            self.duplicated,
            r.resumed.as_secs_f64(),
            r.down.as_secs_f64(),
            r.total.as_secs_f64()
        )
    }

    /// A docs/reliability.md row: `| what | sent | lost | duplicated | recovery |`.
    pub fn row(&self, what: &str, recovery: &str) -> String {
        format!(
            "| {what} | {} | {} | {} | {recovery} |",
            self.sent, self.lost, self.duplicated
        )
    }

    /// Counts `seen` (outcomes per input id) against `sent` inputs.
    pub fn of(sent: usize, seen: &HashMap<String, usize>) -> Tally {
        Tally {
            sent,
            lost: sent.saturating_sub(seen.len()),
            duplicated: seen.values().map(|c| c.saturating_sub(1)).sum(),
        }
    }
}

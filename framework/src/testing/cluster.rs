//! A private three-node RabbitMQ cluster per test, for scale-out and node-failure scenarios:
//! quorum queues replicated on every node, services given every node in `[amqp] urls`.
//!
//! Each node is a [`PrivateBroker`] (own node name, data directory, AMQP and distribution
//! ports, from the machine's install or `STORAGETIER_TEST_RABBITMQ_ROOT`'s chroot); the
//! nodes boot side by side, then the second and third join the first
//! (`rabbitmqctl stop_app` / `join_cluster` / `start_app`). They run as the install's
//! `rabbitmq` user and so share its Erlang cookie (`/var/lib/rabbitmq/.erlang.cookie`),
//! which clustering needs; [`PrivateCluster::start`] checks every node sees all the others
//! running. `quorum_cluster_size` is set to the node count so every quorum queue (the
//! framework's default) gets a member on each node. Everything is killed and deleted on drop.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::WAIT;
use super::broker::{PrivateBroker, QueueCounts, await_done, await_outputs, close, count_at};

/// A RabbitMQ cluster of this test's own.
pub struct PrivateCluster {
    nodes: Vec<PrivateBroker>,
    _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
}

/// One cluster per test process at a time: three nodes each are heavy on a 2-core machine,
/// and the tests of one file run in parallel.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Where a quorum queue lives: its leader and members (node names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueReplicas {
    /// The node leading the queue.
    pub leader: String,
    /// Every node holding a replica.
    pub members: Vec<String>,
    /// The members running right now.
    pub online: Vec<String>,
}

/// Messages a fault scenario publishes only after the fault, to `exchange` with `key`.
#[derive(Debug, Clone, Default)]
pub struct Feed {
    /// The exchange published to.
    pub exchange: String,
    /// The routing key of every message.
    pub key: String,
    /// The message bodies, published persistently, confirms awaited.
    pub bodies: Vec<Vec<u8>>,
}

/// Timings of a [`PrivateCluster::stop_leader_mid_stream`] run.
#[derive(Debug, Clone)]
pub struct Failover {
    /// The node that led the service's queue and was stopped.
    pub stopped: String,
    /// Outputs already in the sink when it was stopped.
    pub outputs_before: usize,
    /// Outputs in the sink once the stop had returned (read through a surviving node):
    /// below what was preloaded, inputs were still to do when the node went down.
    pub outputs_at_stop: usize,
    /// From `stop_app` to another node leading the queue.
    pub new_leader: Duration,
    /// From `stop_app` to the first output after it.
    pub resumed: Duration,
    /// The whole run, from the services starting to the last output.
    pub total: Duration,
}

/// Timings of a [`PrivateCluster::rolling_restart_mid_stream`] run.
#[derive(Debug, Clone)]
pub struct Rolling {
    /// Outputs in the sink when each node was stopped, in restart order.
    pub outputs_at_stop: Vec<usize>,
    /// Per node: from `stop_app` to every replica of the watched queues being online again.
    pub node_cycle: Vec<Duration>,
    /// The longest time without a new output from the first stop to the last node's
    /// replicas being online again.
    pub longest_stall: Duration,
    /// The whole run.
    pub total: Duration,
}

fn advanced_config(dir: &Path, nodes: usize) -> String {
    // Not a rabbitmq.conf key on 3.10: the application setting, through advanced.config.
    let path = dir.join("advanced.config");
    std::fs::write(
        &path,
        format!("[{{rabbit, [{{quorum_cluster_size, {nodes}}}]}}].\n"),
    )
    .expect("advanced.config");
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666));
    String::new()
}

/// A node name list from `rabbitmqctl … --formatter json` (a list, or one name).
fn names(v: &serde_json::Value) -> Vec<String> {
    match v {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect(),
        serde_json::Value::String(s) => vec![s.clone()],
        _ => Vec::new(),
    }
}

impl PrivateCluster {
    /// Starts three nodes and clusters them.
    pub async fn start() -> PrivateCluster {
        Self::start_n(3).await
    }

    /// Starts `n` nodes and clusters them; every quorum queue gets a member on each.
    pub async fn start_n(n: usize) -> PrivateCluster {
        assert!(n >= 1, "a cluster has nodes");
        let guard = ONE_AT_A_TIME.lock().await;
        let began = Instant::now();
        // Boot side by side (the slow part), then join one after another.
        let nodes: Vec<PrivateBroker> = (0..n)
            .map(|_| PrivateBroker::spawn_with(|dir, _| advanced_config(dir, n)))
            .collect();
        for b in &nodes {
            b.await_started().await;
        }
        let booted = began.elapsed();
        let first = nodes[0].node().to_string();
        for b in &nodes[1..] {
            b.ctl(&["stop_app"]);
            b.ctl(&["join_cluster", &first]);
            b.start_app().await;
        }
        let cluster = PrivateCluster {
            nodes,
            _one_at_a_time: guard,
        };
        for i in 0..n {
            cluster.await_running_seen_by(i, n).await;
        }
        eprintln!(
            "private cluster of {n} nodes up in {:.1} s (booted in {:.1} s)",
            began.elapsed().as_secs_f64(),
            booted.as_secs_f64()
        );
        cluster
    }

    /// Waits until node `i` sees `n` running nodes (joined, same cookie, app started).
    async fn await_running_seen_by(&self, i: usize, n: usize) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.nodes[i].ctl_output(&["cluster_status", "--formatter", "json"]);
            let running = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|v| names(&v["running_nodes"]))
                .unwrap_or_default();
            if running.len() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {} sees {n} running nodes, saw {running:?}: {}",
                self.nodes[i].node(),
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The nodes, in join order (the first is the one the others joined).
    pub fn nodes(&self) -> &[PrivateBroker] {
        &self.nodes
    }

    /// Every node's AMQP URL, starting with node `first` (give replicas different starting
    /// nodes so they spread over the cluster), comma-separated as `STORAGETIER__AMQP__URLS`
    /// takes them.
    pub fn urls_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n)
            .map(|i| self.nodes[(first + i) % n].url())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node named `node`.
    pub fn index_of(&self, node: &str) -> usize {
        self.nodes
            .iter()
            .position(|b| b.node() == node)
            .unwrap_or_else(|| panic!("{node} is not a node of this cluster"))
    }

    /// The node the client connection named `name` (its `connection_name`) is connected
    /// to, once a node lists it (at most `WAIT`).
    pub async fn node_of_connection(&self, name: &str) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            // Every node lists the whole cluster's connections; the first that answers.
            let rows = self.nodes.iter().find_map(|b| {
                let out = b.ctl_output(&[
                    "list_connections",
                    "port",
                    "client_properties",
                    "--formatter",
                    "json",
                ]);
                match serde_json::from_slice(&out.stdout) {
                    Ok(serde_json::Value::Array(rows)) if out.status.success() => Some(rows),
                    _ => None,
                }
            });
            let port = rows.iter().flatten().find_map(|r| {
                r["client_properties"]
                    .to_string()
                    .contains(name)
                    .then(|| r["port"].as_u64())
                    .flatten()
            });
            if let Some(at) = port.and_then(|p| {
                self.nodes
                    .iter()
                    .position(|b| b.url().contains(&format!(":{p}/")))
            }) {
                return at;
            }
            assert!(
                Instant::now() < deadline,
                "a node lists connection {name}: {rows:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Cuts node `i` off from the others while it keeps running, as a network partition
    /// does: it drops its links to them and refuses every new one (the CLI's too: it no
    /// longer answers `rabbitmqctl`) until it is killed with the cluster. Its AMQP clients
    /// stay connected to it. Blocks its thread (a multi-threaded runtime's).
    pub fn cut_off(&self, i: usize) {
        let expr = "net_kernel:allow(['nobody@nowhere']), \
                    [erlang:disconnect_node(N) || N <- nodes()], ok.";
        tokio::task::block_in_place(|| self.nodes[i].ctl(&["eval", expr]));
    }

    /// Leader and members of quorum queue `queue`, from the first node that answers.
    pub fn replicas(&self, queue: &str) -> Option<QueueReplicas> {
        for b in &self.nodes {
            let out = b.ctl_output(&[
                "list_queues",
                "name",
                "leader",
                "members",
                "online",
                "--formatter",
                "json",
            ]);
            if !out.status.success() {
                continue;
            }
            let Ok(serde_json::Value::Array(rows)) = serde_json::from_slice(&out.stdout) else {
                continue;
            };
            return rows
                .iter()
                .find(|r| r["name"] == queue)
                .map(|r| QueueReplicas {
                    leader: r["leader"].as_str().unwrap_or_default().to_string(),
                    members: names(&r["members"]),
                    online: names(&r["online"]),
                });
        }
        None
    }

    /// Waits (at most `WAIT`) until every replica of each of `queues` is online and the
    /// queue has a leader on a running node.
    pub async fn await_replicas_online(&self, queues: &[&str]) {
        let n = self.nodes.len();
        let deadline = Instant::now() + WAIT;
        for q in queues {
            loop {
                let r = self.replicas(q);
                if let Some(r) = &r
                    && r.members.len() == n
                    && r.online.len() == n
                    && r.online.contains(&r.leader)
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "every replica of {q} online: {r:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Every queue's messages, ready and unacknowledged, from the first node that answers.
    pub fn messages(&self) -> Option<HashMap<String, u64>> {
        self.nodes.iter().find_map(PrivateBroker::all_messages)
    }

    /// Waits until `sink` holds at least `n` outputs and nothing is left in `queue` or its
    /// retry tiers, in flight included: with duplicates among the outputs, `n` outputs
    /// alone can come before the last input is done (e.g. one waiting in a retry tier).
    pub async fn await_settled(&self, queue: &str, sink: &str, n: usize, since: Instant) {
        await_done(self, queue, sink, n, since).await;
        let tier = format!("{queue}-retry-");
        loop {
            let left: u64 = self
                .messages()
                .map(|m| {
                    m.iter()
                        .filter(|(name, _)| *name == queue || name.starts_with(&tier))
                        .map(|(_, c)| c)
                        .sum()
                })
                .unwrap_or(1);
            if left == 0 {
                return;
            }
            assert!(
                since.elapsed() < Duration::from_secs(600),
                "{queue} and its retry tiers emptied: {left} left"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Declares a durable quorum queue bound to `exchange` with `#` to collect outputs.
    pub async fn sink(&self, queue: &str, exchange: &str) {
        self.nodes[0].sink(queue, exchange).await;
    }

    /// Publishes every body persistently to `exchange` with `key`, waiting for confirms.
    pub async fn preload(&self, exchange: &str, key: &str, bodies: impl Iterator<Item = Vec<u8>>) {
        self.nodes[0].preload(exchange, key, bodies).await;
    }

    /// Messages ready in `queue`, from the first node that answers.
    pub async fn count(&self, queue: &str) -> Option<u32> {
        for b in &self.nodes {
            if let Some(n) = b.count(queue).await {
                return Some(n);
            }
        }
        None
    }

    /// The node leading quorum queue `queue` and the URLs of the others: a replica given
    /// only those is on a node other than the leader's (one cut off with the leader
    /// answers for the queue from its own state there).
    pub fn leader_and_others(&self, queue: &str) -> (usize, Vec<String>) {
        let leader = self.index_of(&self.replicas(queue).expect("the queue exists").leader);
        let others = (0..self.nodes.len())
            .filter(|&i| i != leader)
            .map(|i| self.nodes[i].url())
            .collect();
        (leader, others)
    }

    /// Waits (at most `WAIT`) until `queue` has a consumer the cluster knows.
    pub async fn await_consumer(&self, queue: &str) {
        let deadline = Instant::now() + WAIT;
        while self.consumers(queue).await == 0 {
            assert!(Instant::now() < deadline, "a replica consumes {queue}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Asserts that `replica` (connection `name`), once on node `from`, moved without a
    /// restart to the node that is neither `from` nor `leader`, then stops it and
    /// asserts that it drained and exited cleanly.
    pub async fn assert_moved(
        &self,
        replica: &mut super::process::Guarded,
        name: &str,
        from: usize,
        leader: usize,
    ) {
        assert!(replica.is_running(), "the replica moved without a restart");
        let moved = self.node_of_connection(name).await;
        assert!(
            moved != from && moved != leader,
            "moved to the other node: {moved}"
        );
        let code = replica.terminate(WAIT).and_then(|s| s.code());
        assert_eq!(code, Some(0), "the replica drained and exited cleanly");
    }

    /// Consumers on `queue`, from the first node that answers (0 where none does, or the
    /// queue is not there yet).
    pub async fn consumers(&self, queue: &str) -> u32 {
        for b in &self.nodes {
            if let Some((conn, ch)) = b.channel().await {
                let passive = lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                };
                let n = ch
                    .queue_declare(queue.into(), passive, Default::default())
                    .await
                    .map(|ok| ok.consumer_count())
                    .unwrap_or(0);
                close(conn).await;
                return n;
            }
        }
        0
    }

    /// Takes every message out of `queue` through the first node that answers and counts
    /// them by `id`.
    pub async fn drain_ids(
        &self,
        queue: &str,
        id: impl Fn(&[u8]) -> Option<String>,
    ) -> HashMap<String, usize> {
        for b in &self.nodes {
            if let Some((conn, _)) = b.channel().await {
                close(conn).await;
                return b.drain_ids(queue, id).await;
            }
        }
        panic!("no node of the cluster answers");
    }

    /// Records `sink`'s ready count every 100 ms in the background (through any node), to
    /// time recoveries while the test blocks on `rabbitmqctl` (needs a multi-thread runtime).
    pub fn timeline(&self, sink: &str) -> Timeline {
        let urls: Vec<String> = self.nodes.iter().map(PrivateBroker::url).collect();
        let sink = sink.to_string();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let s = samples.clone();
        let task = tokio::spawn(async move {
            // The node that answered last is asked first: a stopping node can hold a call
            // for seconds, and asking it first every time left whole recoveries unsampled.
            let mut first = 0;
            loop {
                for k in 0..urls.len() {
                    let at = (first + k) % urls.len();
                    if let Some(n) = count_at(&urls[at], &sink).await {
                        lock(&s).push((Instant::now(), n as usize));
                        first = at;
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Timeline { samples, task }
    }

    /// Waits until `sink` holds a fifth of `n` outputs, stops the node leading `queue`
    /// (`rabbitmqctl stop_app`: its connections drop, its replicas go away) and leaves it
    /// down; once another node leads `queue`, publishes `held_back` through a surviving
    /// node, so the stream is still under way after the stop however fast the services
    /// run; waits until `sink` holds `n` outputs (preloaded and held back) and `queue` is
    /// empty, then starts the node again. Needs a multi-thread runtime.
    pub async fn stop_leader_mid_stream(
        &self,
        queue: &str,
        sink: &str,
        n: usize,
        held_back: Feed,
    ) -> Failover {
        let started = Instant::now();
        let timeline = self.timeline(sink);
        // The leader is looked up before the stream is under way: `rabbitmqctl` takes
        // seconds on a loaded machine, long enough for a short stream to finish before
        // the stop it was meant to interrupt.
        let leader = self.replicas(queue).expect("the queue exists").leader;
        let i = self.index_of(&leader);
        await_outputs(self, sink, n / 5, started).await;
        let outputs_before = self.count(sink).await.unwrap_or(0) as usize;
        self.nodes[i].stop_app();
        let down_at = Instant::now();
        let outputs_at_stop = loop {
            // The sink's own leader may be moving: read where it answers.
            if let Some(c) = self.count(sink).await {
                break c as usize;
            }
            assert!(down_at.elapsed() < WAIT, "{sink} readable after the stop");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let new_leader = loop {
            // `rabbitmqctl` takes about a second per call: this is the resolution.
            if self
                .replicas(queue)
                .is_some_and(|r| r.leader != leader && r.online.contains(&r.leader))
            {
                break down_at.elapsed();
            }
            assert!(
                down_at.elapsed() < WAIT,
                "another node leads {queue} after stopping {leader}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let survivor = &self.nodes[(i + 1) % self.nodes.len()];
        survivor
            .preload(
                &held_back.exchange,
                &held_back.key,
                held_back.bodies.into_iter(),
            )
            .await;
        self.await_settled(queue, sink, n, started).await;
        let total = started.elapsed();
        // Every output is in (checked above); the sampler may still be on its way to a
        // sample that shows them.
        let deadline = Instant::now() + WAIT;
        while timeline.first_output_after(down_at).is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let resumed = timeline
            .first_output_after(down_at)
            .map(|t| t - down_at)
            .unwrap_or_else(|| {
                panic!(
                    "no output after the stop of {leader} (stopped at {outputs_before} of {n} \
                     outputs)"
                )
            });
        self.nodes[i].start_app().await;
        Failover {
            stopped: leader,
            outputs_before,
            outputs_at_stop,
            new_leader,
            resumed,
            total,
        }
    }

    /// Waits until `sink` holds a tenth of `n` outputs, then restarts every node in turn
    /// (`stop_app`, `start_app`, then waits until every replica of `queue` and `sink` is
    /// online before the next, as an operator's rolling upgrade does), while the services
    /// keep consuming; then waits until `sink` holds `n` outputs and `queue` is empty.
    /// Needs a multi-thread runtime.
    pub async fn rolling_restart_mid_stream(&self, queue: &str, sink: &str, n: usize) -> Rolling {
        let started = Instant::now();
        let timeline = self.timeline(sink);
        await_outputs(self, sink, n / 10, started).await;
        let mut outputs_at_stop = Vec::new();
        let mut node_cycle = Vec::new();
        let first_stop = Instant::now();
        for b in &self.nodes {
            outputs_at_stop.push(self.count(sink).await.unwrap_or(0) as usize);
            let down_at = Instant::now();
            b.stop_app();
            b.start_app().await;
            self.await_replicas_online(&[queue, sink]).await;
            node_cycle.push(down_at.elapsed());
            eprintln!(
                "rolling restart: {} back, every replica online, after {:.1} s",
                b.node(),
                down_at.elapsed().as_secs_f64()
            );
        }
        let last_up = Instant::now();
        self.await_settled(queue, sink, n, started).await;
        Rolling {
            outputs_at_stop,
            node_cycle,
            longest_stall: timeline.longest_stall(first_stop, last_up, n),
            total: started.elapsed(),
        }
    }
}

/// A background record of a queue's ready count over time (see [`PrivateCluster::timeline`]).
pub struct Timeline {
    samples: Arc<Mutex<Vec<(Instant, usize)>>>,
    task: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Timeline {
    /// When the count first grew after `t` (None: not yet).
    pub fn first_output_after(&self, t: Instant) -> Option<Instant> {
        let samples = lock(&self.samples);
        let base = samples
            .iter()
            .take_while(|(at, _)| *at <= t)
            .last()
            .map_or(0, |(_, n)| *n);
        samples
            .iter()
            .find(|(at, n)| *at > t && *n > base)
            .map(|(at, _)| *at)
    }

    /// The longest time between `from` and `to` the count stood still below `n`.
    pub fn longest_stall(&self, from: Instant, to: Instant, n: usize) -> Duration {
        let samples = lock(&self.samples);
        let mut longest = Duration::ZERO;
        let mut since = from;
        let mut last = None;
        for (at, c) in samples.iter().filter(|(at, _)| *at >= from && *at <= to) {
            if last != Some(*c) || *c >= n {
                if last.is_some() {
                    longest = longest.max(*at - since);
                }
                since = *at;
                last = Some(*c);
            }
        }
        if last.is_some_and(|c| c < n) {
            longest = longest.max(to - since);
        }
        longest
    }
}

impl Drop for Timeline {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl QueueCounts for PrivateCluster {
    async fn ready(&self, queue: &str) -> Option<u32> {
        self.count(queue).await
    }
}

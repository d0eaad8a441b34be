//! A session that lives for months: what it repeats on a timer must not keep anything.
//! One test on purpose: the heap is measured with a counting global allocator, so nothing
//! else may run in this binary meanwhile.

use std::time::Duration;

use framework::lapin::types::FieldTable;
use framework::testing::*;
use framework::{Binding, MessageContext, Outcome, ProcessorConfiguration};

#[global_allocator]
static ALLOCATOR: heap::Counting = heap::Counting;

/// Binding keys of the service: each is bound again every round.
const KEYS: usize = 32;

/// Rounds counted in the warm-up and in the measured window.
const WARM_ROUNDS: usize = 100;
const ROUNDS: usize = 200;

/// Live heap a round may add, at most: kept, the 32 binds of a round are ~5.4 KB (measured,
/// 32 binds a count on a channel never closed); with the fix the window's growth is noise,
/// ~11 KB in all, ~60 bytes a counted round.
const PER_ROUND: f64 = 1024.0;

/// Rounds of binding again, counted from outside: `key0.#` is unbound, and a round has
/// run once the broker lists it bound again. Each count is a bind of a round of its own
/// (the broker handled it after the unbind before it), and more rounds may run between
/// two counts: the count is a lower bound, so growth per counted round is at least the
/// growth per round, however fast or slow the machine.
struct Rounds {
    http: reqwest::Client,
    url: String,
    user: String,
    password: String,
    queue: String,
    exchange: String,
}

impl Rounds {
    fn new(queue: &str, exchange: &str) -> Rounds {
        let u = url::Url::parse(&admin::mgmt_url()).expect("a valid management URL");
        let base = format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or("127.0.0.1"),
            u.port_or_known_default().unwrap_or(15672)
        );
        let enc = |s: &str| {
            url::form_urlencoded::byte_serialize(s.as_bytes())
                .collect::<String>()
                .replace('+', "%20")
        };
        Rounds {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            url: format!(
                "{base}/api/bindings/%2F/e/{}/q/{}",
                enc(exchange),
                enc(queue)
            ),
            user: if u.username().is_empty() {
                "guest".into()
            } else {
                u.username().into()
            },
            password: u.password().unwrap_or("guest").into(),
            queue: queue.into(),
            exchange: exchange.into(),
        }
    }

    async fn key0_bound(&self) -> bool {
        let resp = self
            .http
            .get(&self.url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .expect("management API reachable");
        assert!(
            resp.status().is_success(),
            "{}: {}",
            self.url,
            resp.status()
        );
        let v: serde_json::Value = resp.json().await.expect("bindings as JSON");
        v.as_array()
            .expect("a list of bindings")
            .iter()
            .any(|b| b["routing_key"] == "key0.#")
    }

    /// Returns once `n` more rounds have run.
    async fn await_rounds(&self, ch: &framework::lapin::Channel, n: usize) {
        for _ in 0..n {
            within(
                WAIT,
                "queue.unbind",
                ch.queue_unbind(
                    self.queue.as_str().into(),
                    self.exchange.as_str().into(),
                    "key0.#".into(),
                    FieldTable::default(),
                ),
            )
            .await
            .expect("unbound");
            // No event says the broker has the binding again: asked until it does (each
            // answer takes a few milliseconds; a round is due every millisecond).
            within(WAIT, "a round of binding again", async {
                while !self.key0_bound().await {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await;
        }
    }
}

/// The input queue is bound to its producer's exchange again every
/// `rebind_interval_ms` (30 s by default, every millisecond here: a few months of rounds
/// in seconds). lapin keeps every bind a channel made until the channel closes, and the
/// session's one rebinding channel grew by ~200 bytes per key and round — 40 MB per
/// key in three months, freed only by a reconnect. Each round's channel is closed now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_again_for_months_keeps_nothing() {
    let q = unique("longlife");
    let cfg = config(&q, &[("amqp.rebind_interval_ms", "1")]);
    let pc = ProcessorConfiguration {
        binding: Binding {
            exchange: format!("{q}-in"),
            routing_keys: (0..KEYS).map(|i| format!("key{i}.#")).collect(),
            output_routing_key: "test.out".into(),
            ..Default::default()
        },
        processor: FnProcessor(|v: serde_json::Value, _: &MessageContext| Outcome::success(v)),
    };
    let mut hs = Harness::start_pc("long-life", cfg, pc).await;
    let rounds = Rounds::new(&hs.q, &hs.input_exchange);
    rounds.await_rounds(&hs.ch, WARM_ROUNDS).await;
    let warm = heap::live();
    rounds.await_rounds(&hs.ch, ROUNDS).await;
    let after = heap::live();
    let growth = after as f64 - warm as f64;
    let per_round = growth / ROUNDS as f64;
    println!(
        "live heap {warm} → {after} bytes ({growth:+.0}, {per_round:+.0} per round) over \
         {ROUNDS} rounds or more of binding again"
    );
    assert!(hs.status.is_ready());
    assert!(
        per_round <= PER_ROUND,
        "the live heap grew {growth:.0} bytes in {ROUNDS} rounds of binding again \
         ({per_round:.0} a round)"
    );
    hs.stop().await;
}

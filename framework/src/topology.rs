//! The queues and exchanges a service owns (design §2), declared idempotently.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Connection, ExchangeKind};

use crate::cli::Binding;
use crate::config::{AmqpConfig, Config, QueueType, RetryConfig};

/// Why a topology could not be declared.
#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    /// Broker or connection failure (a refused declaration included).
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    /// No node of `[amqp] url` / `urls` took the connection (each was tried in turn, and
    /// the next attempt starts at the node after the first tried).
    #[error(transparent)]
    Connect(lapin::Error),
    /// A subscribed producer exchange does not exist and `[amqp] declare_sources` is false.
    #[error(
        "producer exchange `{0}` does not exist ([amqp] declare_sources = false): its \
         producer declares it (`run` waits for it; the service's own queues are declared, \
         not yet bound to it)"
    )]
    MissingSource(String),
    /// The broker refused the consumer itself (not a declaration): the session is retried,
    /// never taken for a conflict of the service's own objects.
    #[error("basic.consume refused: {0}")]
    Consume(lapin::Error),
    /// The user may not declare (no `configure` permission on the service's names) and an
    /// object the service needs does not exist yet: waited for, as an administrator
    /// declares the topology.
    #[error(
        "{object} does not exist, and this user may not declare it ({refusal}){hint}: have \
         an administrator declare the topology (`declare` run as a user who may, or the \
         `definitions` document imported)",
        hint = declare_refusal_hint(.refusal)
    )]
    NotDeclared {
        /// The missing exchange or queue, named.
        object: String,
        /// The broker's refusal of the declaration.
        refusal: String,
    },
}

/// What a refused declaration needs that `configure` alone does not give: a queue that
/// dead-letters (each retry tier, into the default exchange) is declared only by a user
/// who may `write` to its dead-letter exchange and `read` the queue itself.
fn declare_refusal_hint(refusal: &str) -> &'static str {
    if refusal.contains("'amq.default'") {
        " — declaring a retry tier takes `write` permission on `amq.default` (the default \
         exchange it dead-letters into) besides `configure` on the service's names"
    } else if refusal.contains("read access to queue") {
        " — declaring a queue that dead-letters takes `read` permission on that queue \
         besides `configure`"
    } else {
        ""
    }
}

/// What a declaration found on the broker that the service's timing must follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Declared {
    /// The `x-consumer-timeout` (ms) `Q` was declared with by another release or config
    /// and kept ([`TOLERATED_ARGUMENTS`]); None where it has this config's (or none).
    /// RabbitMQ 4.x applies the queue's value: a shorter one than this config's must
    /// shorten the handlers' checkpoints and holds too, or the broker closes the channel
    /// first.
    pub consumer_timeout_ms: Option<u64>,
}

impl DeclareError {
    /// True when an object the service owns exists with other arguments (fatal: exit 1).
    pub fn is_conflict(&self) -> bool {
        // A vhost's queue limit is refused with the same code: no conflict, nothing to
        // delete; waited out like any refusal (see `connection::refusal_hint`).
        matches!(self, DeclareError::Amqp(e) if is_soft(e, AMQPSoftError::PRECONDITIONFAILED)
            && !crate::connection::is_limit(e))
    }
}

/// Arguments of the input queue `Q` whose value may differ between releases or configs
/// without changing what the queue is: a `Q` declared by an earlier release without
/// `x-delivery-limit` (or with another `[amqp] delivery_limit`) is used with its value,
/// instead of every replica of the next release exiting with a "conflict" whose remedy,
/// deleting the queue, would throw away its messages. On the retry tiers and `Q-dlq` only
/// `x-delivery-limit` (earlier releases declared them without one: kept with a louder
/// warning, as a limit there could drop dead letters that are browsed) and on `Q-dlq`
/// `x-overflow` (which earlier releases did not set), and never a queue's type,
/// dead-letter target or TTL: the declaration is repeated with the broker's own value of
/// the tolerated argument, so the broker still checks every other one.
///
/// `x-single-active-consumer` is kept only where the service does not need it: a queue
/// that has it serves one replica at a time (slower, never wrong), while a service that
/// needs it (ordered handling) must not run on a queue without it.
const TOLERATED_ARGUMENTS: [&str; 5] = [
    DELIVERY_LIMIT,
    OVERFLOW,
    "x-dead-letter-strategy",
    CONSUMER_TIMEOUT,
    SINGLE_ACTIVE_CONSUMER,
];

/// The queue argument bounding how long a delivery may stay unacknowledged (RabbitMQ
/// 4.x reads it from `Q`).
const CONSUMER_TIMEOUT: &str = "x-consumer-timeout";

/// A whole, positive number of milliseconds from an argument's value.
fn whole_ms(v: &AMQPValue) -> Option<u64> {
    let n = match v {
        AMQPValue::LongLongInt(n) => *n,
        AMQPValue::LongInt(n) => i64::from(*n),
        AMQPValue::LongUInt(n) => i64::from(*n),
        AMQPValue::ShortInt(n) => i64::from(*n),
        AMQPValue::ShortUInt(n) => i64::from(*n),
        _ => return None,
    };
    u64::try_from(n).ok().filter(|&n| n > 0)
}

/// The queue argument that bounds redeliveries; tolerated on every queue of the service:
/// the retry tiers and `Q-dlq` of earlier releases have none.
const DELIVERY_LIMIT: &str = "x-delivery-limit";

/// The queue argument saying what a full queue does; tolerated on `Q-dlq` too, which
/// earlier releases declared without it.
const OVERFLOW: &str = "x-overflow";

/// The queue argument that lets one consumer at a time take its messages.
const SINGLE_ACTIVE_CONSUMER: &str = "x-single-active-consumer";

/// For a declaration refused over one of [`TOLERATED_ARGUMENTS`]: the argument and the
/// queue's current value of it (None: the queue has none), from the broker's text
/// (`inequivalent arg 'K' for queue …: received … but current is the value 'V' of type
/// 'T'` or `… but current is none`).
fn tolerated_difference(e: &lapin::Error) -> Option<(&'static str, Option<AMQPValue>)> {
    if !is_soft(e, AMQPSoftError::PRECONDITIONFAILED) {
        return None;
    }
    let text = e.to_string();
    let key = TOLERATED_ARGUMENTS
        .into_iter()
        .find(|a| text.contains(&format!("inequivalent arg '{a}'")))?;
    let current = text.split("but current is ").nth(1)?;
    if current.starts_with("none") {
        return Some((key, None));
    }
    // RabbitMQ 4.x: "the value 'V' of type 'T'"; 3.x: "'V'".
    let (value, kind) = match current.strip_prefix("the value '") {
        Some(rest) => {
            let (value, rest) = rest.split_once("' of type '")?;
            (value, Some(rest.split_once('\'')?.0))
        }
        None => (current.strip_prefix('\'')?.split_once('\'')?.0, None),
    };
    let v = match kind {
        Some("longstr" | "shortstr") => AMQPValue::LongString(value.into()),
        Some("bool") => AMQPValue::Boolean(value.parse().ok()?),
        Some(_) => AMQPValue::LongLongInt(value.parse().ok()?),
        // Untyped: the tolerated arguments are whole numbers, booleans or words.
        None => match (value.parse::<i64>(), value.parse::<bool>()) {
            (Ok(n), _) => AMQPValue::LongLongInt(n),
            (_, Ok(b)) => AMQPValue::Boolean(b),
            _ => AMQPValue::LongString(value.into()),
        },
    };
    Some((key, Some(v)))
}

/// Whether what `ask` declares passively exists, asked on a channel of its own (a missing
/// object closes the channel it was asked on).
async fn found<F>(
    conn: &Connection,
    ask: impl FnOnce(lapin::Channel) -> F,
) -> Result<bool, lapin::Error>
where
    F: std::future::Future<Output = Result<(), lapin::Error>>,
{
    let probe = conn.create_channel().await?;
    match ask(probe.clone()).await {
        Ok(()) => {
            let _ = probe.close(200, "checked".into()).await;
            Ok(true)
        }
        Err(e) if is_soft(&e, AMQPSoftError::NOTFOUND) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether exchange `name` exists (a passive declare).
async fn exchange_exists(conn: &Connection, name: &str) -> Result<bool, lapin::Error> {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    found(conn, |ch| async move {
        ch.exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
    })
    .await
}

/// Warns when a producer's exchange exists as another type than topic: a passive check
/// cannot see the type, and the queue's pattern bindings (`…file.#`) then match nothing
/// (direct) or everything (fanout) without a word. Asked as a declaration of a topic
/// exchange on a channel of its own (which a refusal closes); only its type is looked at,
/// the producer's other flags are its own business.
async fn warn_unless_topic(conn: &Connection, name: &str) {
    // Once per exchange and process: a refused probe (no `configure` on the name, other
    // flags) is logged by the client as a channel error, which every reconnect would
    // repeat.
    static PROBED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    match PROBED.lock() {
        Ok(mut seen) if !seen.iter().any(|n| n == name) => seen.push(name.to_string()),
        _ => return,
    }
    let Ok(probe) = conn.create_channel().await else {
        return;
    };
    let asked = probe
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            durable_exchange(),
            FieldTable::default(),
        )
        .await;
    match asked {
        Ok(()) => {
            let _ = probe.close(200, "checked".into()).await;
        }
        Err(e)
            if is_soft(&e, AMQPSoftError::PRECONDITIONFAILED)
                && e.to_string().contains("'type'") =>
        {
            tracing::warn!(exchange = %name, refusal = %e,
                "the producer's exchange is not a topic exchange: the queue's pattern \
                 bindings match nothing (direct) or everything (fanout) on it");
        }
        Err(_) => {}
    }
}

/// Whether queue `name` exists (a passive declare).
async fn queue_exists(conn: &Connection, name: &str) -> Result<bool, lapin::Error> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    found(conn, |ch| async move {
        ch.queue_declare(name.into(), passive, FieldTable::default())
            .await
            .map(|_| ())
    })
    .await
}

/// Whether `e` is the broker's soft error `kind` (the channel it came on is closed).
pub(crate) fn is_soft(e: &lapin::Error, kind: AMQPSoftError) -> bool {
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p) if *p.kind() == AMQPErrorKind::Soft(kind))
}

/// `x-delivery-limit` of the retry tiers and `Q-dlq`: more deliveries than any message sees.
pub const UNLIMITED_DELIVERIES: i64 = i32::MAX as i64;

/// One binding of the input queue to a producer's exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// Producer's topic exchange.
    pub exchange: String,
    /// Binding key pattern.
    pub routing_key: String,
}

/// Names and arguments of everything a service declares.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Input queue `Q`.
    pub queue: String,
    /// Success exchange.
    pub output_exchange: String,
    /// Bindings of `Q`.
    pub subscriptions: Vec<Subscription>,
    /// Retry delays, one TTL queue each.
    pub delays_ms: Vec<u64>,
    /// Queue type of every queue.
    pub queue_type: QueueType,
    /// Quorum delivery limit on `Q`.
    pub delivery_limit: u32,
    /// Exchanges the service owns and publishes to beside its output exchange.
    pub publishes_to: Vec<String>,
    /// Create a missing producer exchange (`[amqp] declare_sources`).
    pub declare_sources: bool,
    /// Bound on declarations and confirms (`[amqp] operation_timeout_ms`).
    pub operation_timeout: std::time::Duration,
    /// `x-consumer-timeout` of `Q` (`[amqp] consumer_timeout_ms`; 0 = the broker's own).
    pub consumer_timeout_ms: u64,
    /// `x-single-active-consumer` on `Q` ([`crate::Binding::single_active_consumer`]).
    pub single_active_consumer: bool,
    /// [`crate::Binding::one_consumer_advised`].
    pub one_consumer_advised: Option<String>,
}

/// A queue with its arguments, as declared.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// Queue name.
    pub name: String,
    /// `x-` arguments.
    pub arguments: FieldTable,
}

/// An exchange with its kind, as declared.
#[derive(Debug, Clone)]
pub struct ExchangeSpec {
    /// Exchange name.
    pub name: String,
    /// `topic` or `direct`.
    pub kind: &'static str,
}

/// A binding, as declared.
#[derive(Debug, Clone)]
pub struct BindingSpec {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue.
    pub queue: String,
    /// Binding key.
    pub routing_key: String,
}

/// `Q-retry` of queue `q`.
fn retry_exchange_of(q: &str) -> String {
    format!("{q}-retry")
}

/// `Q-retry-<ms>` of queue `q`.
fn retry_queue_of(q: &str, delay_ms: u64) -> String {
    format!("{q}-retry-{delay_ms}")
}

/// Binds each of `specs` on `ch`.
async fn bind_all(ch: &lapin::Channel, specs: Vec<BindingSpec>) -> Result<(), lapin::Error> {
    for b in specs {
        ch.queue_bind(
            b.queue.as_str().into(),
            b.exchange.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    Ok(())
}

/// `Q-fail` of queue `q`.
fn fail_exchange_of(q: &str) -> String {
    format!("{q}-fail")
}

/// `Q-dlq` of queue `q`.
fn dlq_of(q: &str) -> String {
    format!("{q}-dlq")
}

/// The names a service on queue `q` owns, derived here only: its queues (`Q`, one tier per
/// delay, `Q-dlq`) and its exchanges (`Q-fail`, `Q-retry`) — RabbitMQ keeps the two kinds
/// of names apart.
pub fn owned_names(q: &str, delays_ms: &[u64]) -> (Vec<String>, [String; 2]) {
    let mut queues = vec![q.to_string()];
    queues.extend(delays_ms.iter().map(|&d| retry_queue_of(q, d)));
    queues.push(dlq_of(q));
    (queues, [fail_exchange_of(q), retry_exchange_of(q)])
}

impl Topology {
    /// The topology of a service from its config and subscriptions.
    pub fn new(
        queue: &str,
        output_exchange: &str,
        subscriptions: Vec<Subscription>,
        amqp: &AmqpConfig,
        retry: &RetryConfig,
    ) -> Self {
        Self {
            queue: queue.to_string(),
            output_exchange: output_exchange.to_string(),
            subscriptions,
            delays_ms: retry.delays_ms.clone(),
            queue_type: amqp.queue_type,
            delivery_limit: amqp.delivery_limit,
            publishes_to: Vec::new(),
            declare_sources: amqp.declare_sources,
            operation_timeout: amqp.operation_timeout(),
            consumer_timeout_ms: amqp.consumer_timeout_ms,
            single_active_consumer: false,
            one_consumer_advised: None,
        }
    }

    /// The topology of a service's binding under its config.
    pub fn of<S>(b: &Binding, cfg: &Config<S>) -> Self {
        let subs = b
            .routing_keys
            .iter()
            .map(|k| Subscription {
                exchange: b.exchange.clone(),
                routing_key: k.clone(),
            })
            .collect();
        let mut t = Self::new(
            &cfg.service.queue,
            &cfg.service.output_exchange,
            subs,
            &cfg.amqp,
            &cfg.retry,
        );
        t.publishes_to = b.publishes_to.clone();
        t.single_active_consumer = b.single_active_consumer;
        t.one_consumer_advised = b.one_consumer_advised.clone();
        t
    }

    /// The producers' exchanges this service subscribes to (checked, not owned).
    pub fn sources(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for s in &self.subscriptions {
            if !v.contains(&s.exchange) && !self.owns_exchange(&s.exchange) {
                v.push(s.exchange.clone());
            }
        }
        v
    }

    fn owns_exchange(&self, name: &str) -> bool {
        self.exchanges().iter().any(|e| e.name == name)
    }

    /// `Q-retry`: the direct exchange retries are published to.
    pub fn retry_exchange(&self) -> String {
        retry_exchange_of(&self.queue)
    }
    /// `Q-retry-<ms>`: the TTL queue of one delay tier.
    pub fn retry_queue(&self, delay_ms: u64) -> String {
        retry_queue_of(&self.queue, delay_ms)
    }
    /// Routing key on `Q-retry` that reaches the `delay_ms` tier.
    pub fn retry_routing_key(delay_ms: u64) -> String {
        delay_ms.to_string()
    }
    /// `Q-fail`: the dead-letter exchange.
    pub fn fail_exchange(&self) -> String {
        fail_exchange_of(&self.queue)
    }
    /// `Q-dlq`: the dead-letter queue.
    pub fn dlq(&self) -> String {
        dlq_of(&self.queue)
    }

    fn base_args(&self) -> FieldTable {
        let mut a = FieldTable::default();
        put_str(&mut a, "x-queue-type", self.queue_type.as_str());
        a
    }

    /// Lifts the broker's default delivery limit (RabbitMQ 4.x quorum queues: 20) on queues
    /// that must never drop a message for being delivered often: browsing and replaying dead
    /// letters hands each back by closing the channel, which counts as a delivery. A limit no
    /// message reaches is used rather than 4.x's `-1`, which RabbitMQ 3.x reads as "drop at
    /// the first return".
    fn unlimited_deliveries(&self, a: &mut FieldTable) {
        if self.queue_type == QueueType::Quorum {
            a.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(UNLIMITED_DELIVERIES),
            );
        }
    }

    /// Arguments making broker-side dead-lettering from a quorum queue at-least-once.
    fn at_least_once(&self, a: &mut FieldTable) {
        if self.queue_type == QueueType::Quorum {
            put_str(a, "x-dead-letter-strategy", "at-least-once");
            put_str(a, "x-overflow", "reject-publish");
        }
    }

    /// Every exchange the service owns, in declaration order.
    pub fn exchanges(&self) -> Vec<ExchangeSpec> {
        let mut v = vec![
            ExchangeSpec {
                name: self.fail_exchange(),
                kind: "topic",
            },
            ExchangeSpec {
                name: self.retry_exchange(),
                kind: "direct",
            },
            ExchangeSpec {
                name: self.output_exchange.clone(),
                kind: "topic",
            },
        ];
        for name in &self.publishes_to {
            if !v.iter().any(|e| e.name == *name) {
                v.push(ExchangeSpec {
                    name: name.clone(),
                    kind: "topic",
                });
            }
        }
        v
    }

    /// Names of every queue the service owns: `Q`, the retry tiers, `Q-dlq`.
    pub fn queue_names(&self) -> Vec<String> {
        owned_names(&self.queue, &self.delays_ms).0
    }

    /// Every queue with its arguments, in declaration order.
    pub fn queues(&self) -> Vec<QueueSpec> {
        let mut v = Vec::new();
        let mut dlq = self.base_args();
        self.unlimited_deliveries(&mut dlq);
        // A length limit (a blanket max-length policy) refuses new dead letters instead of
        // dropping the oldest, which the default overflow does silently: refused, the
        // message is retried and stays in `Q` or a tier until there is room.
        put_str(&mut dlq, "x-overflow", "reject-publish");
        v.push(QueueSpec {
            name: self.dlq(),
            arguments: dlq,
        });
        let mut q = self.base_args();
        put_str(&mut q, "x-dead-letter-exchange", &self.fail_exchange());
        if self.queue_type == QueueType::Quorum {
            q.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
            );
        }
        self.at_least_once(&mut q);
        // RabbitMQ 4.0 and 4.1 read a delivery's acknowledgement timeout from the queue
        // (argument or `consumer-timeout` policy, the smaller wins), not from the consumer;
        // 3.10 and 3.11 ignore it.
        if self.consumer_timeout_ms > 0 {
            q.insert(
                ShortString::from(CONSUMER_TIMEOUT),
                AMQPValue::LongLongInt(i64::try_from(self.consumer_timeout_ms).unwrap_or(i64::MAX)),
            );
        }
        if self.single_active_consumer {
            q.insert(
                ShortString::from(SINGLE_ACTIVE_CONSUMER),
                AMQPValue::Boolean(true),
            );
        }
        v.push(QueueSpec {
            name: self.queue.clone(),
            arguments: q,
        });
        for &d in &self.delays_ms {
            let mut a = self.base_args();
            a.insert(
                ShortString::from("x-message-ttl"),
                AMQPValue::LongLongInt(d as i64),
            );
            put_str(&mut a, "x-dead-letter-exchange", "");
            put_str(&mut a, "x-dead-letter-routing-key", &self.queue);
            self.at_least_once(&mut a);
            self.unlimited_deliveries(&mut a);
            v.push(QueueSpec {
                name: self.retry_queue(d),
                arguments: a,
            });
        }
        v
    }

    /// Every binding.
    pub fn bindings(&self) -> Vec<BindingSpec> {
        let mut v = self.own_bindings();
        v.extend(self.source_bindings());
        v
    }

    /// The bindings among the service's own objects: `Q-dlq` to `Q-fail`, each tier to
    /// `Q-retry`.
    fn own_bindings(&self) -> Vec<BindingSpec> {
        let mut v = vec![BindingSpec {
            exchange: self.fail_exchange(),
            queue: self.dlq(),
            routing_key: "#".into(),
        }];
        for &d in &self.delays_ms {
            v.push(BindingSpec {
                exchange: self.retry_exchange(),
                queue: self.retry_queue(d),
                routing_key: Self::retry_routing_key(d),
            });
        }
        v
    }

    /// The input queue's bindings to its producers' exchanges.
    pub fn source_bindings(&self) -> Vec<BindingSpec> {
        self.subscriptions
            .iter()
            .map(|s| BindingSpec {
                exchange: s.exchange.clone(),
                queue: self.queue.clone(),
                routing_key: s.routing_key.clone(),
            })
            .collect()
    }

    /// Declares everything the service owns and checks the producers' exchanges (creating
    /// a missing one only with `declare_sources`); safe to repeat. An owned object that
    /// exists with other arguments is an error; a producer's exchange never is. An object
    /// the user may not declare (no `configure` permission on its name: a locked-down
    /// production account, or one limited to the service's own names beside a shared
    /// exchange) is only checked to exist, as an administrator declared it.
    pub async fn declare(&self, conn: &Connection) -> Result<Declared, DeclareError> {
        self.declare_owned(conn, true).await
    }

    /// Whether `Q-dlq` (a quorum queue) exists with a delivery limit other than this
    /// release's unlimited one: declared by an earlier release, and kept as it is by
    /// [`Self::declare`]. On RabbitMQ 4.x such a queue drops a dead letter handed back 20
    /// times, and every look (`dlq list`, a dry run, a filtered replay) hands back what it
    /// saw. Nothing is changed: each check declares the queue as it is, argument by
    /// argument, on a channel of its own. An error where the check cannot tell (the
    /// declaration refused, another argument differing).
    pub async fn dlq_delivery_limit_kept(&self, conn: &Connection) -> Result<bool, lapin::Error> {
        let name = self.dlq();
        let Some(spec) = self.queues().into_iter().find(|q| q.name == name) else {
            return Ok(false);
        };
        if self.queue_type != QueueType::Quorum || !queue_exists(conn, &name).await? {
            return Ok(false);
        }
        let mut args = spec.arguments;
        for _ in 0..=TOLERATED_ARGUMENTS.len() {
            let ch = conn.create_channel().await?;
            let declared = ch
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args.clone(),
                )
                .await;
            match declared {
                Ok(_) => {
                    let _ = ch.close(200, "checked".into()).await;
                    return Ok(false);
                }
                Err(e) => match tolerated_difference(&e) {
                    Some((DELIVERY_LIMIT, _)) => return Ok(true),
                    Some((key, current)) => {
                        args = crate::headers::without(&args, &[key]);
                        if let Some(v) = current {
                            args.insert(key.into(), v);
                        }
                    }
                    // Another difference, or a refusal (a user who may not configure
                    // the queue: ACCESS_REFUSED before any argument is compared): the
                    // limit cannot be told, and "not kept" would let every look count a
                    // delivery on every dead letter. The command's own calls say what
                    // else is wrong.
                    None => return Err(e),
                },
            }
        }
        Ok(false)
    }

    /// [`Self::declare`] for the `declare` command, which must declare (and so check the
    /// arguments of) every object or fail: a user who may not gets the refusal.
    pub async fn declare_all(&self, conn: &Connection) -> Result<Declared, DeclareError> {
        self.declare_owned(conn, false).await
    }

    /// Declares what the service owns; with `check_refused`, an object the broker refuses
    /// to let this user declare is checked to exist instead.
    async fn declare_owned(
        &self,
        conn: &Connection,
        check_refused: bool,
    ) -> Result<Declared, DeclareError> {
        let mut ch = conn.create_channel().await?;
        let mut unchecked: Vec<String> = Vec::new();
        let mut found = Declared::default();
        // Whether `e` refuses this user the declaration of `what` and it may be checked
        // instead: then whether it exists (on a channel of its own), else the error.
        let refused = |e: &lapin::Error| check_refused && is_soft(e, AMQPSoftError::ACCESSREFUSED);
        let missing = |object: String, e: &lapin::Error| DeclareError::NotDeclared {
            object,
            refusal: e.to_string(),
        };
        for e in self.exchanges() {
            let kind = if e.kind == "direct" {
                ExchangeKind::Direct
            } else {
                ExchangeKind::Topic
            };
            let declared = ch
                .exchange_declare(
                    e.name.as_str().into(),
                    kind,
                    durable_exchange(),
                    FieldTable::default(),
                )
                .await;
            match declared {
                Ok(()) => {}
                Err(err) if refused(&err) => {
                    ch = conn.create_channel().await?;
                    if !exchange_exists(conn, &e.name).await? {
                        return Err(missing(format!("exchange `{}`", e.name), &err));
                    }
                    unchecked.push(e.name.clone());
                }
                Err(err) => return Err(err.into()),
            }
        }
        for q in self.queues() {
            let mut args = q.arguments;
            let mut kept: Vec<&str> = Vec::new();
            loop {
                let declared = ch
                    .queue_declare(
                        q.name.as_str().into(),
                        QueueDeclareOptions {
                            durable: true,
                            ..Default::default()
                        },
                        args.clone(),
                    )
                    .await;
                let e = match declared {
                    Ok(_) => break,
                    Err(e) => e,
                };
                // RabbitMQ 4.3 takes `x-consumer-timeout` on quorum queues only (it times
                // out no other queue's consumers) and refuses it on a classic one: declared
                // without it on a new channel (the refusal closed this one), instead of
                // every start failing as a "topology conflict".
                if is_soft(&e, AMQPSoftError::PRECONDITIONFAILED)
                    && e.to_string()
                        .contains(&format!("invalid arg '{CONSUMER_TIMEOUT}'"))
                    && args.contains_key(CONSUMER_TIMEOUT)
                {
                    // Once a process: every reconnect declares again, and nothing changes.
                    static SAID: std::sync::Once = std::sync::Once::new();
                    SAID.call_once(|| {
                        tracing::warn!(queue = %q.name,
                            "the broker takes no x-consumer-timeout on this queue type (RabbitMQ \
                             4.3: quorum queues only, the only ones it times out); declared \
                             without it (a broker that times out classic queues' consumers: set \
                             a consumer-timeout policy)");
                    });
                    ch = conn.create_channel().await?;
                    args = crate::headers::without(&args, &[CONSUMER_TIMEOUT]);
                    continue;
                }
                // A service that must consume one replica at a time cannot run on a queue
                // whose `x-single-active-consumer` nobody checked.
                if refused(&e) && !(q.name == self.queue && self.single_active_consumer) {
                    ch = conn.create_channel().await?;
                    if !queue_exists(conn, &q.name).await? {
                        return Err(missing(format!("queue `{}`", q.name), &e));
                    }
                    unchecked.push(q.name.clone());
                    break;
                }
                match tolerated_difference(&e) {
                    Some((key, current))
                        if (q.name == self.queue
                            || (q.name == self.dlq() && key == OVERFLOW)
                            || key == DELIVERY_LIMIT)
                            && !kept.contains(&key)
                            && !(key == SINGLE_ACTIVE_CONSUMER && self.single_active_consumer) =>
                    {
                        // The refusal closed the channel: asked again, with the queue's
                        // own value, on a new one.
                        ch = conn.create_channel().await?;
                        args = crate::headers::without(&args, &[key]);
                        if key == CONSUMER_TIMEOUT && q.name == self.queue {
                            found.consumer_timeout_ms = current.as_ref().and_then(whole_ms);
                        }
                        if let Some(v) = current {
                            args.insert(key.into(), v);
                        }
                        kept.push(key);
                    }
                    _ => return Err(e.into()),
                }
            }
            if q.name != self.queue && kept.contains(&DELIVERY_LIMIT) {
                tracing::warn!(queue = %q.name,
                    "the queue exists with another delivery limit (declared by an earlier release): \
                     kept. On RabbitMQ 4.x a quorum queue without one drops a message delivered 20 \
                     times, and browsing dead letters (`dlq list`) counts: lift it with a policy \
                     (`delivery-limit` = -1, RabbitMQ 4.0 or later) or move the messages away and \
                     delete the queue");
            }
            if !kept.is_empty() {
                tracing::warn!(queue = %q.name, arguments = ?kept,
                    "the queue exists with other values of these arguments (declared by another release \
                     or config); kept as they are. To apply this one's, move its messages away and \
                     delete it, or set them by a policy");
            }
        }
        // The service's own objects whole first: a missing producer exchange leaves only
        // the bindings to it undone (`declare` before the producers exist makes the rest,
        // and a dead letter or retry published meanwhile has its queue).
        bind_all(&ch, self.own_bindings()).await?;
        for source in self.sources() {
            self.check_source(conn, &source).await?;
        }
        bind_all(&ch, self.source_bindings()).await?;
        let _ = ch.close(200, "declared".into()).await;
        if !unchecked.is_empty() {
            tracing::warn!(objects = ?unchecked,
                "this user may not declare these (no `configure` permission on their names): \
                 running on them as they are on the broker, their arguments unchecked");
        }
        Ok(found)
    }

    /// Passively checks a producer's exchange (a failed check closes its channel, so each
    /// runs on a channel of its own); creates it only when missing and allowed to. Checked
    /// first even with `declare_sources`: a passive declare needs no `configure`
    /// permission, so a locked-down user starts where the exchange exists (lapin logs the
    /// refused check of a missing one as an error, once: then it exists).
    async fn check_source(&self, conn: &Connection, name: &str) -> Result<(), DeclareError> {
        if exchange_exists(conn, name).await? {
            if self.declare_sources {
                warn_unless_topic(conn, name).await;
            }
            return Ok(());
        }
        if !self.declare_sources {
            return Err(DeclareError::MissingSource(name.to_string()));
        }
        let create = conn.create_channel().await?;
        match create
            .exchange_declare(
                name.into(),
                ExchangeKind::Topic,
                durable_exchange(),
                FieldTable::default(),
            )
            .await
        {
            Ok(()) => {
                let _ = create.close(200, "created".into()).await;
                Ok(())
            }
            // Its producer declared it meanwhile, with flags of its own: that is its call.
            Err(e) if is_soft(&e, AMQPSoftError::PRECONDITIONFAILED) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether an exchange the service owns is gone (deleted while it ran): each is
    /// checked passively on a channel of its own (a failed check closes it). A check
    /// that cannot be made counts as nothing missing.
    pub async fn missing_exchange(&self, conn: &Connection) -> Option<String> {
        for e in self.exchanges() {
            match exchange_exists(conn, &e.name).await {
                Ok(true) => {}
                Ok(false) => return Some(e.name),
                Err(_) => return None,
            }
        }
        None
    }

    /// The topology as a RabbitMQ definitions document (management UI import).
    pub fn definitions(&self, vhost: &str) -> serde_json::Value {
        use serde_json::json;
        // The producers' exchanges are listed too, so an import creates what the bindings
        // need — unless the service may not declare them (`declare_sources = false`): their
        // producers declare them with flags of their own (pluto-core's is not durable), and
        // a durable one imported first would refuse them. Their bindings are left out with
        // them (made by the service once they exist).
        let sources = match self.declare_sources {
            true => self.sources(),
            false => Vec::new(),
        };
        let unmade = match self.declare_sources {
            true => Vec::new(),
            false => self.sources(),
        };
        let sources = sources.into_iter().map(|name| ExchangeSpec {
            name,
            kind: "topic",
        });
        let exchanges: Vec<_> = self
            .exchanges()
            .into_iter()
            .chain(sources)
            .map(|e| {
                json!({"name": e.name, "vhost": vhost, "type": e.kind, "durable": true,
                "auto_delete": false, "internal": false, "arguments": {}})
            })
            .collect();
        let queues: Vec<_> = self
            .queues()
            .into_iter()
            .map(|q| {
                json!({"name": q.name, "vhost": vhost, "durable": true,
                "auto_delete": false, "arguments": table_to_json(&q.arguments)})
            })
            .collect();
        let bindings: Vec<_> = self
            .bindings()
            .into_iter()
            .filter(|b| !unmade.contains(&b.exchange))
            .map(|b| {
                json!({"source": b.exchange, "vhost": vhost, "destination": b.queue,
                "destination_type": "queue", "routing_key": b.routing_key, "arguments": {}})
            })
            .collect();
        json!({"exchanges": exchanges, "queues": queues, "bindings": bindings})
    }
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn put_str(a: &mut FieldTable, k: &str, v: &str) {
    a.insert(
        ShortString::from(k),
        AMQPValue::LongString(LongString::from(v)),
    );
}

/// A field table of strings and integers as JSON.
pub fn table_to_json(t: &FieldTable) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in t.inner() {
        m.insert(k.as_str().to_string(), amqp_to_json(v));
    }
    serde_json::Value::Object(m)
}

/// One AMQP value as JSON (strings lossily decoded, nested tables and arrays kept).
pub fn amqp_to_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        AMQPValue::Boolean(b) => J::Bool(*b),
        AMQPValue::ShortShortInt(i) => J::from(*i),
        AMQPValue::ShortShortUInt(i) => J::from(*i),
        AMQPValue::ShortInt(i) => J::from(*i),
        AMQPValue::ShortUInt(i) => J::from(*i),
        AMQPValue::LongInt(i) => J::from(*i),
        AMQPValue::LongUInt(i) => J::from(*i),
        AMQPValue::LongLongInt(i) => J::from(*i),
        AMQPValue::Float(f) => J::from(*f),
        AMQPValue::Double(f) => J::from(*f),
        AMQPValue::ShortString(s) => J::from(s.as_str()),
        AMQPValue::LongString(s) => J::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => J::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::Timestamp(t) => J::from(*t),
        other => J::from(format!("{other:?}")),
    }
}

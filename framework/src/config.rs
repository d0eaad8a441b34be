//! Layered, strictly validated configuration shared by every service (design §5).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use config::{Environment, File, FileFormat, Map, Value};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize, Serializer};

use crate::channel_pool::CHANNEL_HEADROOM;

/// The least `frame_max` a client may ask for of RabbitMQ 4.1 and later (which refuse the
/// connection below it; 3.x take 4,096 up).
const MIN_FRAME_MAX: u32 = 8192;
/// The built-in defaults: `config/default.toml`, compiled in so a binary runs anywhere.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of environment overrides: `STORAGETIER__<SECTION>__<KEY>`.
pub const ENV_PREFIX: &str = "STORAGETIER";

/// Top-level sections that may appear in the shared config files.
pub const KNOWN_SECTIONS: &[&str] = &[
    "amqp",
    "retry",
    "log",
    "storage",
    "telemetry",
    // The services' own, from here on (see `FRAMEWORK_SECTIONS`).
    "echo",
    "online_archive",
    "online_nearline",
    "project_ingest",
    "crash_router",
    "snapshot_status",
    "event_forwarder",
];

/// How many of [`KNOWN_SECTIONS`] are the framework's; the rest are services'.
const FRAMEWORK_SECTIONS: usize = 5;

/// Keys whose environment-variable value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "amqp.urls",
    "retry.delays_ms",
    "echo.routing_keys",
    "online_archive.online_roots",
    "online_nearline.online_roots",
    "crash_router.key_prefixes",
];

/// A configuration problem; `key` names the offending setting (e.g. `amqp.prefetch`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid configuration: {key}: {message}")]
pub struct ConfigError {
    /// Dotted path of the setting, or the file/flag at fault.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// Builds an error naming `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A secret string: usable by code, printed as `***` by Debug, Display and Serialize.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The real value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// True when no secret was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

/// A broker URL (`amqp://` or `amqps://`) whose password never shows when printed.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl(url::Url);

impl AmqpUrl {
    /// Parses and checks scheme and host.
    pub fn parse(s: &str) -> Result<Self, String> {
        if userinfo_past_authority(s) {
            return Err(misplaced_userinfo("password_file"));
        }
        let u = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
        if u.scheme() != "amqp" && u.scheme() != "amqps" {
            return Err(format!(
                "scheme must be amqp or amqps, got `{}`",
                u.scheme()
            ));
        }
        if u.host_str().is_none_or(str::is_empty) {
            return Err("missing host".into());
        }
        // lapin takes the host from the URL's domain, which an IP v6 literal is not: it
        // connected to `localhost` instead, handing it the password.
        if matches!(u.host(), Some(url::Host::Ipv6(_))) {
            return Err(format!(
                "an IPv6 address as host (`{}`) is not supported by the AMQP client: use a DNS name for it",
                u.host_str().unwrap_or_default()
            ));
        }
        // lapin reads the rest only when it connects: a `run` would retry a URL it can
        // never use, forever, with an error that names no key.
        if u.path() == "/" {
            return Err(
                "the vhost is empty (a trailing `/`): write the default vhost `/` as `%2f` \
                 (amqp://host:5672/%2f), or leave the path out"
                    .into(),
            );
        }
        for (k, v) in u.query_pairs() {
            if k == "frame_max"
                && let Ok(n) = v.parse::<u32>()
                && n != 0
                && n < MIN_FRAME_MAX
            {
                return Err(format!(
                    "query parameter `frame_max` = `{n}` is below {MIN_FRAME_MAX}, the least \
                     RabbitMQ 4.1 and later accept (the connection would be refused): leave it \
                     out, or ask for {MIN_FRAME_MAX} or more"
                ));
            }
            let usable = match k.as_ref() {
                "frame_max" => v.parse::<u32>().is_ok(),
                "channel_max" | "heartbeat" => v.parse::<u16>().is_ok(),
                "connection_timeout" => v.parse::<u64>().is_ok(),
                "auth_mechanism" => v.parse::<lapin::uri::SASLMechanism>().is_ok(),
                // The client ignores any other, silently: a typo, or a password's tail
                // after an unencoded `?` (`user:p@ss?word@rabbit`), shown unmasked in
                // every log line. Named only where it cannot be such a tail.
                _ => {
                    let shown = parameter_shown("query parameter", &k);
                    return Err(format!(
                        "{shown} is not one the AMQP client takes (frame_max, channel_max, \
                         heartbeat, connection_timeout, auth_mechanism); a password holding \
                         `?` must be percent-encoded (%3F) or given in password_file"
                    ));
                }
            };
            if !usable {
                return Err(format!(
                    "query parameter `{k}` = `{v}` is not usable by the AMQP client \
                     (frame_max, channel_max, heartbeat and connection_timeout take whole \
                     numbers; heartbeat and channel_max at most 65535)"
                ));
            }
        }
        u.as_str()
            .parse::<lapin::uri::AMQPUri>()
            .map_err(|e| format!("not usable by the AMQP client: {e}"))?;
        Ok(Self(u))
    }
    /// The virtual host the URL names (`/` when it names none), as the client reads it.
    pub fn vhost(&self) -> String {
        self.0
            .as_str()
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "/".to_string())
    }
    /// The node the URL connects to (host and port), as the client reads it.
    pub fn node(&self) -> (String, u16) {
        match self.0.as_str().parse::<lapin::uri::AMQPUri>() {
            Ok(u) => (u.authority.host.to_ascii_lowercase(), u.authority.port),
            Err(_) => (
                self.0.host_str().unwrap_or_default().to_ascii_lowercase(),
                self.0.port().unwrap_or_default(),
            ),
        }
    }
    /// True for `amqps://` (TLS).
    pub fn is_tls(&self) -> bool {
        self.0.scheme() == "amqps"
    }
    /// The full URL including the password, for connecting only.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }
    /// Replaces the password (from a secret file).
    pub fn with_password(&self, password: &str) -> Result<Self, String> {
        // Without a user the client logs in as `guest` — with this password, which then
        // reaches the broker as guest's.
        if self.0.username().is_empty() {
            return Err(format!(
                "the URL names no user to give the password to (write it as \
                 amqp://USER@{}…)",
                self.0.host_str().unwrap_or("host")
            ));
        }
        let mut u = self.0.clone();
        // The file holds the password itself: a `%` in it is a character, not an escape
        // (`set_password` encodes everything else but leaves `%` for the client to decode).
        u.set_password(Some(&password.replace('%', "%25")))
            .map_err(|_| "cannot set a password on this URL".to_string())?;
        Ok(Self(u))
    }
    /// Why the URL's login is not the one meant, where it is not: the client fills what
    /// is left out with `guest`'s — a user without a password logged in with `guest` as
    /// the password (refused, retried for ever as if the broker were away), a password
    /// without a user was sent as `guest`'s.
    pub fn login_gap(&self) -> Option<String> {
        let external = self.external();
        let user = self.0.username();
        match (user.is_empty(), self.0.password().is_some()) {
            _ if external => None,
            (false, false) => Some(format!(
                "names the user `{user}` but no password (the client would send `guest` as it): write it in the URL (percent-encoded) or set amqp.password_file"
            )),
            (true, true) => Some(
                "holds a password but no user (the client would send it as `guest`'s): write the user before it"
                    .into(),
            ),
            _ => None,
        }
    }
    /// Whether the URL logs in by `auth_mechanism=external` (a client certificate).
    fn external(&self) -> bool {
        self.0.query_pairs().any(|(k, v)| {
            k == "auth_mechanism"
                && v.parse::<lapin::uri::SASLMechanism>()
                    .is_ok_and(|m| m == lapin::uri::SASLMechanism::External)
        })
    }
    /// Whether the client would log in as `guest` (no user, no password, not `EXTERNAL`)
    /// to another machine: RabbitMQ refuses `guest` off loopback by default, and the
    /// service would retry that refusal for ever as if the broker were away.
    pub fn guest_on_another_machine(&self) -> bool {
        let external = self.external();
        !external
            && self.0.username().is_empty()
            && self.0.password().is_none()
            && !self.0.host_str().is_some_and(is_this_machine)
    }
    /// Whether the login crosses a network in the clear: plaintext `amqp://` to another
    /// machine (the password, and every message, readable by anyone on the path).
    pub fn in_the_clear(&self) -> bool {
        self.0.scheme() == "amqp" && !self.0.host_str().is_some_and(is_this_machine)
    }
    /// The URL with the password replaced by `***`, safe for logs.
    pub fn redacted(&self) -> String {
        let mut u = self.0.clone();
        if u.password().is_some() {
            let _ = u.set_password(Some("***"));
        }
        u.to_string()
    }
    /// The password, if any (used by tests and redaction checks).
    pub fn password(&self) -> Option<&str> {
        self.0.password()
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for AmqpUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AmqpUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for AmqpUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

/// Queue type for Q, its retry queues and its DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queue; supports `x-delivery-limit`.
    Quorum,
    /// Single-node classic queue.
    Classic,
}

impl QueueType {
    /// Value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

/// `[amqp]`: the broker connection and consumer settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// Broker URL, vhost included.
    pub url: AmqpUrl,
    /// A cluster's nodes, tried in turn on every (re)connect; empty = `url` alone.
    #[serde(default)]
    pub urls: Vec<AmqpUrl>,
    /// PEM file of the CA that signed the broker's certificate (`amqps://`).
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `tls_key_file`).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Bound on one connection attempt (TCP, TLS and AMQP handshake).
    pub connect_timeout_ms: u64,
    /// Bound on every other broker call: declarations and publisher confirms. A call that
    /// takes longer (e.g. a quorum queue without a leader) fails and the session restarts.
    pub operation_timeout_ms: u64,
    /// How often the depth of the service's own queues is read for
    /// `storagetier_queue_messages` (passive declares); 0 turns it off.
    pub queue_metrics_interval_ms: u64,
    /// How often the input queue is bound again to its producers' exchanges while the
    /// service runs (an exchange deleted and declared anew has lost its bindings); 0 turns
    /// it off.
    pub rebind_interval_ms: u64,
    /// File holding the password (overrides the URL's).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Queue type for every queue the service owns.
    pub queue_type: QueueType,
    /// Broker prefetch (unacked deliveries per instance).
    pub prefetch: u16,
    /// Concurrent handlers; 0 means `prefetch`.
    pub concurrency: usize,
    /// The `concurrency` the files asked for where it was above `prefetch` and lowered to
    /// it (warned about at start: more handlers than deliveries cannot run).
    #[serde(skip)]
    pub concurrency_capped_from: Option<usize>,
    /// Quorum `x-delivery-limit` on Q.
    pub delivery_limit: u32,
    /// Budget for finishing in-flight messages on shutdown.
    pub drain_timeout_ms: u64,
    /// First reconnect delay.
    pub reconnect_initial_ms: u64,
    /// Reconnect delay cap.
    pub reconnect_max_ms: u64,
    /// Connection name for the management UI ("" = derived).
    pub connection_name: String,
    /// How long one delivery may stay unacked before the broker closes the channel
    /// (`x-consumer-timeout`, RabbitMQ 3.12+); 0 = the broker's own (30 min by default).
    pub consumer_timeout_ms: u64,
    /// Create a subscribed producer exchange that is missing (design §2); when false the
    /// service waits, checking passively, until the producer has declared it.
    pub declare_sources: bool,
    /// Largest body decoded: a larger one is dead-lettered unread (decoded JSON takes
    /// several times its text, per record more); 0 = no limit.
    pub max_body_bytes: u64,
    /// Most records one message may hold in the batch adapters (Kinesis, S3 event and
    /// pluto-core batches): a message with more is dead-lettered whole; 0 = no limit.
    pub max_records: usize,
}

/// When after its delivery a long handler should go on in a retry, for a broker that gives
/// up on an unacknowledged delivery after `consumer_timeout` (see
/// [`AmqpConfig::checkpoint_after`]).
pub(crate) fn checkpoint_within(consumer_timeout: std::time::Duration) -> std::time::Duration {
    consumer_timeout / 3
}

impl AmqpConfig {
    /// The broker's consumer timeout as far as the service can know it:
    /// `consumer_timeout_ms` where it is lower than RabbitMQ's default 30 minutes, else that
    /// default — 3.10 and 3.11 ignore the per-queue setting, and their own
    /// `consumer_timeout` cannot be read.
    pub fn consumer_timeout_known(&self) -> std::time::Duration {
        let default = std::time::Duration::from_secs(30 * 60);
        match self.consumer_timeout_ms {
            0 => default,
            ms => std::time::Duration::from_millis(ms).min(default),
        }
    }

    /// When after its delivery a long handler should return a Retry carrying its progress
    /// (`MessageContext::checkpoint_in`, which takes a shorter timeout kept on `Q` too): a
    /// third of the consumer timeout this config knows, which leaves room for that retry
    /// to be held if the broker refuses it.
    pub fn checkpoint_after(&self) -> std::time::Duration {
        checkpoint_within(self.consumer_timeout_known())
    }

    /// The broker nodes to try, in order: `urls`, or `url` alone.
    pub fn endpoints(&self) -> Vec<&AmqpUrl> {
        if self.urls.is_empty() {
            vec![&self.url]
        } else {
            self.urls.iter().collect()
        }
    }

    /// The nodes connected to, for messages (passwords redacted): `url`, or every one of
    /// `urls` when set.
    pub fn endpoints_shown(&self) -> String {
        self.endpoints()
            .iter()
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The bound on declarations and publisher confirms.
    pub fn operation_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.operation_timeout_ms)
    }

    /// Handlers allowed to run at once.
    pub fn effective_concurrency(&self) -> usize {
        if self.concurrency == 0 {
            usize::from(self.prefetch)
        } else {
            self.concurrency.min(usize::from(self.prefetch))
        }
    }
}

/// `[retry]`: delay tiers and the attempt limit.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// One TTL queue per delay.
    pub delays_ms: Vec<u64>,
    /// Attempts before `retries-exhausted`.
    pub max_attempts: u32,
    /// How long (ms) retries caused by an outage (a store, database or endpoint down) go
    /// uncounted; 0: they count as any retry.
    #[serde(default = "default_max_outage_ms")]
    pub max_outage_ms: u64,
}

/// A day: an outage over a night is waited out, one over a weekend ends in the DLQ.
fn default_max_outage_ms() -> u64 {
    86_400_000
}

impl RetryConfig {
    /// The delay before attempt `attempt + 1`, i.e. after 0-based attempt `attempt` failed.
    pub fn delay_for_attempt(&self, attempt: u32) -> u64 {
        let i = (attempt as usize).min(self.delays_ms.len().saturating_sub(1));
        self.delays_ms[i]
    }

    /// The delay (ms) of `attempt`, or if `at_least` is longer, of the first tier at least
    /// that long (the longest tier if none is): a peer's `Retry-After` never picks a
    /// shorter tier than the attempt's own, nor one that does not exist.
    pub fn delay_at_least(&self, attempt: u32, at_least: std::time::Duration) -> u64 {
        let at_least_ms = u64::try_from(at_least.as_millis()).unwrap_or(u64::MAX);
        let own = self.delay_for_attempt(attempt);
        if at_least_ms <= own {
            return own;
        }
        let longest = self.delays_ms.iter().copied().max().unwrap_or(own);
        let fits = self
            .delays_ms
            .iter()
            .copied()
            .filter(|&d| d >= at_least_ms)
            .min();
        fits.unwrap_or(longest).max(own)
    }

    /// The delay (ms) of a retry during an outage that began `elapsed` ago: the longest
    /// tier no longer than half of it (the shortest tier at first), so each message tries
    /// again about twice per outage-age doubling whatever its own attempt count; a longer
    /// `at_least` as in [`RetryConfig::delay_at_least`].
    pub fn outage_delay(&self, elapsed: std::time::Duration, at_least: std::time::Duration) -> u64 {
        let half = u64::try_from(elapsed.as_millis() / 2).unwrap_or(u64::MAX);
        let shortest = self.delays_ms.iter().copied().min().unwrap_or(0);
        let fits = self.delays_ms.iter().copied().filter(|&d| d <= half).max();
        let own = fits.unwrap_or(shortest);
        let index = self.delays_ms.iter().position(|&d| d == own).unwrap_or(0);
        self.delay_at_least(u32::try_from(index).unwrap_or(u32::MAX), at_least)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A word-valued setting read as one of `choices` (any case), with an error that lists
/// them: the config crate's own said "enum LogFormat does not have variant constructor
/// xml", naming a Rust type and not what the key takes.
fn one_of<'de, D, T: Copy>(d: D, what: &str, choices: &[(&str, T)]) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let given = String::deserialize(d)?;
    choices
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(given.trim()))
        .map(|&(_, v)| v)
        .ok_or_else(|| {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("`{n}`")).collect();
            // A mistyped word is shown; anything else may be a secret set under the wrong
            // key, and a message is printed and logged.
            let word = given.len() <= 16
                && given
                    .chars()
                    .all(|c| c.is_ascii_alphabetic() || c == '-' || c == '_');
            let shown = match word {
                true => format!("`{given}`"),
                false => format!("the value {WITHHELD}"),
            };
            serde::de::Error::custom(format!(
                "{shown} is not a {what}: expected {}",
                names.join(" or ")
            ))
        })
}

impl<'de> Deserialize<'de> for QueueType {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(
            d,
            "queue type",
            &[
                ("quorum", QueueType::Quorum),
                ("classic", QueueType::Classic),
            ],
        )
    }
}

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        one_of(
            d,
            "log format",
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
        )
    }
}

/// `[log]`: level filter and format.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `tracing` filter directives.
    pub level: String,
    /// Text or JSON.
    pub format: LogFormat,
}

/// Whether `host` (as a URL names it) is this machine: what is sent there crosses no
/// network, so plaintext and unchecked certificates are not warned about.
pub fn is_this_machine(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Whether `url` holds an `@` past the end of its authority as URL parsers end it (at the
/// first `/`, `?` or `#` after `://`): a password holding one of those unencoded, which
/// they read as host, port and path (`amqp://user:42/Zm9v@rabbit/%2f`: host `user`, port
/// 42), leaving no password to mask — the whole secret was printed and logged. An `@` in
/// the path is always taken so; one in the query or fragment only where the authority has
/// none (`?application_name=me@host` after `u:p@h` is a value, not a password's end).
pub fn userinfo_past_authority(url: &str) -> bool {
    // Where the authority holds a user, a later `@` is the vhost's, a database path's or a
    // query value's (`?user=app@server`); only without one is it a misread password's.
    authority_and_tail(url)
        .is_some_and(|(authority, tail)| !authority.contains('@') && tail.contains('@'))
}

/// The authority of `url` as a URL parser finds it (up to the first `/`, `?` or `#` after
/// `://`) and the rest, where there is a rest.
fn authority_and_tail(url: &str) -> Option<(&str, &str)> {
    let (_, rest) = url.split_once("://")?;
    let end = rest.find(['/', '?', '#'])?;
    Some(rest.split_at(end))
}

/// How an error names the URL parameter `name` (of the kind `what`): by name, unless it
/// may be the tail of a password holding an unencoded `?` (`user:p@ss?word@host` reads
/// `word@host` as a parameter), which is then only "a <what>".
pub fn parameter_shown(what: &str, name: &str) -> String {
    match name.contains(['@', ':', '/']) {
        true => format!("a {what}"),
        false => format!("{what} `{name}`"),
    }
}

/// The refusal of a URL [`userinfo_past_authority`] finds, naming the password file key
/// to use instead; the URL itself is never in it (it holds the password).
pub fn misplaced_userinfo(password_file_key: &str) -> String {
    format!(
        "an `@` follows a `/`, `?` or `#` after `://` (URL not shown: it may hold a \
         password): percent-encode the password (`/` as %2F, `?` as %3F, `#` as %23, `@` as \
         %40), or use {password_file_key}; an `@` in the path or query is written %40"
    )
}

/// The secret a mounted file holds: its text without the line ending(s) an editor or
/// `kubectl create secret --from-file` leaves at its end. Only those: spaces are a
/// password's own (trimmed, a password ending in one could not be given by file).
pub fn secret_of_file(text: &str) -> &str {
    text.trim_end_matches(['\n', '\r'])
}

/// The path of a secret file (`password_file`, `token_file`…) as an error shows it: not
/// where neither it nor its directory is there — then the value may well be the secret
/// itself, set under the `_file` key (`token_file = "Bearer …"`), and an error is printed
/// and logged.
pub fn secret_path_shown(path: &Path) -> String {
    let dir_there = path
        .parent()
        .is_some_and(|d| !d.as_os_str().is_empty() && d.is_dir());
    if dir_there || path.exists() {
        path.display().to_string()
    } else {
        "the file it names (not shown: no such file or directory is here, and the value may \
         be the secret itself, set where its file's path goes)"
            .into()
    }
}

/// `url` safe to print: a password in it, and the value of any query parameter whose
/// name says secret (`password`, `token`, `key`, `secret`, `sig`…), as `***` — of an
/// HTTP(S) URL every query value, since web endpoints name their secrets anything
/// (`?code=` of an Azure function, `?jwt=`). Parsed as
/// the clients using it parse it (sqlx, reqwest), so what is masked is what they would
/// send. Text that is no URL shows only its scheme, or nothing if it may hold a secret.
pub fn redacted_url(url: &str) -> String {
    // A password holding `/`, `?` or `#` unencoded is no password to the parser (it reads
    // `user:42/secret@host` as host `user`, port 42), or only its start: everything up to
    // the last `@` is masked, the rest shown as any URL.
    // Also where the authority holds a password: one holding `@` as well is read with its
    // start as the password and the rest as host and path. Masking a vhost's `@` too then
    // costs a log line some detail, never a secret.
    if let Some((scheme, rest)) = url.split_once("://")
        && authority_and_tail(url).is_some_and(|(authority, tail)| {
            tail.contains('@')
                && authority
                    .rsplit_once('@')
                    .is_none_or(|(userinfo, _)| userinfo.contains(':'))
        })
        && url::Url::parse(url).is_ok()
        && let Some((_, host_on)) = rest.rsplit_once('@')
    {
        let shown = redacted_url(&format!("{scheme}://{host_on}"));
        return shown.replacen("://", "://***@", 1);
    }
    let Ok(mut u) = url::Url::parse(url) else {
        return match url.find("://") {
            Some(i) => format!("{}://***", &url[..i]),
            // A connection string of another form (libpq's `host=db password=…`).
            None if url.contains(['@', '?', '=']) || url.to_ascii_lowercase().contains("pass") => {
                "***".to_string()
            }
            None => url.to_string(),
        };
    };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        let secret = |k: &str| {
            let k = k.to_ascii_lowercase();
            [
                "pass",
                "token",
                "key",
                "secret",
                "sig",
                "auth",
                "credential",
            ]
            .iter()
            .any(|w| k.contains(w))
        };
        let web = matches!(u.scheme(), "http" | "https");
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if web || secret(&k) {
                    "***".into()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    // A webhook's credential is a path segment (`/services/T0/B0/<secret>`,
    // `/webhooks/<id>/<secret>`): one long enough to be a random token is masked.
    if matches!(u.scheme(), "http" | "https")
        && let Some(segments) = u.path_segments()
    {
        let token_like = |s: &str| {
            s.len() >= 20
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && s.bytes().any(|b| b.is_ascii_alphabetic())
                && s.bytes().any(|b| b.is_ascii_digit())
        };
        let shown: Vec<String> = segments
            .map(|s| {
                if token_like(s) {
                    "***".into()
                } else {
                    s.to_string()
                }
            })
            .collect();
        u.set_path(&shown.join("/"));
    }
    u.to_string()
}

fn serialize_redacted<S: Serializer>(url: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&redacted_url(url))
}

/// Serializes an optional URL setting as [`redacted_url`] shows it (`check-config`).
pub fn serialize_redacted_url<S: Serializer>(
    url: &Option<String>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(u) => s.serialize_some(&redacted_url(u)),
        None => s.serialize_none(),
    }
}

/// `[telemetry]`: optional span export (design §6).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP collector base URL (spans go to `<url>/v1/traces`); empty = no export.
    /// Shown (`check-config`, logs) without a password or secret query values.
    #[serde(serialize_with = "serialize_redacted")]
    pub otlp_endpoint: String,
    /// Bound on one export request.
    pub otlp_timeout_ms: u64,
}

/// `[storage]`: where embedded defaults live.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Root of SQLite files, local stores and online roots by default.
    pub data_dir: PathBuf,
}

/// The framework-owned keys of a service's own section.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// The input queue `Q`.
    pub queue: String,
    /// Exchange for success messages.
    pub output_exchange: String,
    /// Address of /metrics, /healthz, /readyz.
    pub http_listen: String,
    /// Overrides the producer exchange the input queue binds to (default: the service's).
    #[serde(default)]
    pub input_exchange: Option<String>,
}

const SERVICE_SECTION_KEYS: &[&str] =
    &["queue", "output_exchange", "http_listen", "input_exchange"];

/// Everything a service runs with: shared sections plus its own section.
#[derive(Debug, Clone, Serialize)]
pub struct Config<S> {
    /// `[amqp]`
    pub amqp: AmqpConfig,
    /// `[retry]`
    pub retry: RetryConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[storage]`
    pub storage: StorageConfig,
    /// `[telemetry]`
    pub telemetry: TelemetryConfig,
    /// Framework keys of the service's section.
    pub service: ServiceSection,
    /// The service's own keys.
    pub settings: S,
    /// The other services' sections as these files and this environment set them: for
    /// checks across services (two services given one store).
    #[serde(skip)]
    pub others: OtherSections,
}

/// Every section of the configuration tree, for a service to read another's setting.
#[derive(Clone, Default)]
pub struct OtherSections(Map<String, Value>);

impl OtherSections {
    /// `[section] key` (dotted for a key of a table in it: `vault_options.endpoint`) as
    /// these files and this environment set it; `None` where unset or not a `T` (that
    /// service's own check names it).
    pub fn get<T: DeserializeOwned>(&self, section: &str, key: &str) -> Option<T> {
        let mut value = self.0.get(section)?.clone();
        for part in key.split('.') {
            value = value.into_table().ok()?.get(part)?.clone();
        }
        value.try_deserialize().ok()
    }
}

/// The sections' names only: their values hold secrets (`[amqp] url`, tokens, keys).
impl fmt::Debug for OtherSections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// Where configuration comes from; tests pass explicit env maps and overrides.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Directory with `default.toml` and `<env>.toml`; `None` = built-in defaults only.
    pub config_dir: Option<PathBuf>,
    /// Whether `config_dir` was asked for explicitly (then it must exist).
    pub config_dir_explicit: bool,
    /// Environment name; `None` = `dev`, whose file is optional.
    pub env_name: Option<String>,
    /// Environment variables to read overrides from; `None` = the process environment.
    pub env_vars: Option<HashMap<String, String>>,
    /// Highest-priority overrides, `("amqp.url", "...")`.
    pub overrides: Vec<(String, String)>,
}

impl LoadOptions {
    /// Built-in defaults plus `overrides`, ignoring the process environment.
    pub fn isolated() -> Self {
        Self {
            env_vars: Some(HashMap::new()),
            ..Self::default()
        }
    }
    /// Adds an override (a TOML value or a bare string).
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.overrides.push((key.to_string(), value.into()));
        self
    }
}

fn cfg_err(key: &str, e: impl fmt::Display) -> ConfigError {
    ConfigError::new(key, without_source_lines(&e.to_string()))
}

/// A parser's message without the lines of the file it quotes (`2 | url = "…"`, and the
/// caret under it): the line may hold a password or a token.
fn without_source_lines(msg: &str) -> String {
    msg.lines()
        .filter(|l| {
            let t = l.trim_start();
            let after_number = t.trim_start_matches(|c: char| c.is_ascii_digit());
            !(t.starts_with('|')
                || (after_number.len() < t.len() && after_number.trim_start().starts_with('|')))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether the config file `path` is there to be read: false where nothing is; an error
/// naming it where something is but cannot be read as one (a directory, which a bind
/// mount of a missing file creates; a link to nothing; no permission), which skipped
/// would leave its settings silently unapplied.
fn config_file(path: &Path) -> Result<bool, ConfigError> {
    let shown = path.display();
    let key = "--config-dir (or STORAGETIER_CONFIG_DIR)";
    match std::fs::metadata(path) {
        // Read whole here: the config crate reads a file that is not UTF-8 leniently
        // (U+FFFD for each bad byte), so a Latin-1 password would be another password.
        Ok(m) if m.is_file() => match std::fs::read(path) {
            Ok(bytes) => match std::str::from_utf8(&bytes) {
                Ok(_) => Ok(true),
                Err(e) => {
                    let line = bytes[..e.valid_up_to()]
                        .iter()
                        .filter(|b| **b == b'\n')
                        .count()
                        + 1;
                    Err(ConfigError::new(
                        key,
                        format!("{shown} is not UTF-8 text (line {line}): save it as UTF-8"),
                    ))
                }
            },
            Err(e) => Err(ConfigError::new(key, format!("cannot read {shown}: {e}"))),
        },
        Ok(_) => Err(ConfigError::new(key, format!("{shown} is not a file"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match path.symlink_metadata() {
            Ok(_) => Err(ConfigError::new(
                key,
                format!("{shown} is a symbolic link to nothing"),
            )),
            Err(_) => Ok(false),
        },
        Err(e) => Err(ConfigError::new(key, format!("cannot read {shown}: {e}"))),
    }
}

/// A directory named explicitly (`--config-dir`, STORAGETIER_CONFIG_DIR) of which neither
/// `default.toml` nor `<env_name>.toml` was read: refused, listing the `*.toml` files it
/// holds, where it holds any — a file misnamed (`defaults.toml`) or of another environment
/// (`prod.toml` without `--env prod`) left every setting silently at its built-in default
/// (guest@localhost, ./data). A directory without any `*.toml` is taken as built-in
/// defaults on purpose: the test harnesses name an empty one so.
fn check_unread_config_dir(dir: &Path, env_name: &str) -> Result<(), ConfigError> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".toml"))
                .collect()
        })
        .unwrap_or_default();
    if found.is_empty() {
        return Ok(());
    }
    found.sort();
    Err(ConfigError::new(
        "--config-dir (or STORAGETIER_CONFIG_DIR)",
        format!(
            "{} holds neither default.toml nor {env_name}.toml, so none of its files would be \
             read (it holds {}): rename the file, or name its environment with --env (or \
             APP_ENV)",
            dir.display(),
            found.join(", ")
        ),
    ))
}

/// Environment variables the project reads under a single-underscore `STORAGETIER_` (the
/// test suite's `STORAGETIER_TEST_*` aside): every other such name is a mistyped override.
const OWN_SINGLE_UNDERSCORE_VARS: &[&str] = &[
    "STORAGETIER_CONFIG_DIR",
    "STORAGETIER_RABBITMQ4_ROOT",
    "STORAGETIER_RABBITMQ43_ROOT",
    "STORAGETIER_DEBIAN_MIRROR",
];

/// Refuses a variable named like an override but with one underscore after the prefix
/// (`STORAGETIER_AMQP__URL`, `STORAGETIER_AMQP_URL`): the config crate reads only
/// `STORAGETIER__…`, so it was silently ignored and the service ran on another broker,
/// password or store than the one meant. Named, never its value (it may be a secret).
fn check_env_names(opts: &LoadOptions) -> Result<(), ConfigError> {
    let names: Vec<String> = match &opts.env_vars {
        Some(vars) => vars.keys().cloned().collect(),
        None => std::env::vars_os()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect(),
    };
    let single = format!("{ENV_PREFIX}_");
    let double = format!("{ENV_PREFIX}__");
    let mut wrong: Vec<&String> = names
        .iter()
        .filter(|k| {
            let upper = k.to_ascii_uppercase();
            upper.starts_with(&single)
                && !upper.starts_with(&double)
                && !k.starts_with(&format!("{ENV_PREFIX}_TEST_"))
                && !OWN_SINGLE_UNDERSCORE_VARS.contains(&k.as_str())
                && !is_service_link(&upper)
        })
        .collect();
    wrong.sort();
    match wrong.first() {
        None => Ok(()),
        Some(k) => Err(ConfigError::new(
            k.as_str(),
            format!(
                "is not read: overrides are {double}<SECTION>__<KEY>, with two underscores \
                 after {ENV_PREFIX} and between the parts (e.g. {double}AMQP__URL); the only \
                 variables with one are {} and the test suite's {ENV_PREFIX}_TEST_*",
                OWN_SINGLE_UNDERSCORE_VARS.join(", ")
            ),
        )),
    }
}

/// Whether `upper` is one of Kubernetes' service-link variables, which it sets in every
/// pod for every Service of the namespace (`<SERVICE>_SERVICE_HOST`, `_SERVICE_PORT[_…]`,
/// `_PORT`, `_PORT_<n>_<PROTO>[_…]`): a Service named `storagetier…` makes them start with
/// the prefix, and refusing them would stop every replica there.
fn is_service_link(upper: &str) -> bool {
    upper.ends_with("_SERVICE_HOST")
        || upper.contains("_SERVICE_PORT")
        || upper.ends_with("_PORT")
        || upper
            .split("_PORT_")
            .skip(1)
            .any(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// The environment's `STORAGETIER__…` variables whose value is not UTF-8, by name: the
/// config parser's error would quote the value, a password perhaps.
fn check_env_text(opts: &LoadOptions) -> Result<(), ConfigError> {
    if opts.env_vars.is_some() {
        return Ok(());
    }
    let prefix = format!("{ENV_PREFIX}__");
    for (k, v) in std::env::vars_os() {
        // Any case: the config crate reads `storagetier__…` as well.
        if let Some(k) = k
            .to_str()
            .filter(|k| k.to_ascii_uppercase().starts_with(&prefix))
            && v.to_str().is_none()
        {
            return Err(ConfigError::new(
                k,
                format!("its value is not UTF-8 text {WITHHELD}"),
            ));
        }
    }
    Ok(())
}

/// Loads all layers into one merged tree, checking top-level sections.
fn load_tree(opts: &LoadOptions, own_section: &str) -> Result<Map<String, Value>, ConfigError> {
    let mut b =
        config::Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
    let env_name = opts.env_name.clone().unwrap_or_else(|| "dev".to_string());
    if env_name.is_empty()
        || !env_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(ConfigError::new(
            "--env (or APP_ENV)",
            format!("`{env_name}` is not a valid environment name"),
        ));
    }
    // The files read, in order (for `endpoints_by_layer`).
    let mut files = Vec::new();
    if let Some(dir) = &opts.config_dir {
        if dir.is_dir() {
            let default = dir.join("default.toml");
            if config_file(&default)? {
                b = b.add_source(File::from(default.as_path()).format(FileFormat::Toml));
                files.push(default);
            }
            let envf = dir.join(format!("{env_name}.toml"));
            if config_file(&envf)? {
                b = b.add_source(File::from(envf.as_path()).format(FileFormat::Toml));
                files.push(envf);
            } else if opts.env_name.is_some() {
                return Err(ConfigError::new(
                    "--env (or APP_ENV)",
                    format!(
                        "no config file {} for environment `{env_name}`",
                        envf.display()
                    ),
                ));
            }
            if opts.config_dir_explicit && files.is_empty() {
                check_unread_config_dir(dir, &env_name)?;
            }
        } else if opts.config_dir_explicit {
            // Why not, where it is not that (a parent this user may not enter).
            let why = match std::fs::metadata(dir) {
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    format!("{} cannot be read: {e}", dir.display())
                }
                _ => format!("{} is not a directory", dir.display()),
            };
            return Err(ConfigError::new(
                "--config-dir (or STORAGETIER_CONFIG_DIR)",
                why,
            ));
        } else if opts.env_name.is_some() {
            // A named environment (`--env`, APP_ENV) must find its file: running on the
            // built-in defaults instead (guest@localhost, ./data) would be silent and wrong.
            return Err(ConfigError::new(
                "--env (or APP_ENV)",
                format!(
                    "no config file for environment `{env_name}`: {} is not a directory \
                     (--config-dir or STORAGETIER_CONFIG_DIR names it)",
                    dir.display()
                ),
            ));
        }
    }
    check_env_text(opts)?;
    check_env_names(opts)?;
    // Values stay strings here: each key's own type converts them when the section is read,
    // so a token `0123` or a name `1e3` keeps its text, and a one-element list stays a list.
    let mut env = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(false)
        .list_separator(",");
    for k in LIST_KEYS {
        env = env.with_list_parse_key(k);
    }
    if let Some(vars) = &opts.env_vars {
        env = env.source(Some(vars.clone().into_iter().collect()));
    }
    b = b.add_source(env);
    for (k, v) in &opts.overrides {
        let value: Value = match toml_scalar(v) {
            Some(parsed) => parsed,
            None => Value::from(v.clone()),
        };
        b = b
            .set_override(k.as_str(), value)
            .map_err(|e| cfg_err(k, e))?;
    }
    let built = b.build().map_err(|e| cfg_err("config", e))?;
    let mut tree: Map<String, Value> = built.try_deserialize().map_err(|e| cfg_err("config", e))?;
    let defaults: Map<String, Value> = config::Config::builder()
        .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| cfg_err("config", e))?;
    check_kinds(&tree, &defaults, "")?;
    lists_from_strings(&mut tree);
    endpoints_by_layer(&mut tree, opts, &files);
    for key in tree.keys() {
        // The running service's own section is known whatever it is: a service written
        // beside these (a fifth adapter) runs without an edit of the framework.
        if !KNOWN_SECTIONS.contains(&key.as_str()) && key != own_section {
            return Err(ConfigError::new(
                key,
                format!(
                    "unknown section `[{key}]` (known: {})",
                    KNOWN_SECTIONS.join(", ")
                ),
            ));
        }
    }
    Ok(tree)
}

/// The layer that last set `key` (`section.name`): 0 the built-in defaults, then each of
/// `files` in order, then the environment, then the overrides.
fn layer_of(key: &str, opts: &LoadOptions, files: &[std::path::PathBuf]) -> usize {
    if opts.overrides.iter().any(|(k, _)| k == key) {
        return files.len() + 2;
    }
    let var = format!("{ENV_PREFIX}__{}", key.replace('.', "__"));
    let in_env = match &opts.env_vars {
        Some(vars) => vars.keys().any(|k| k.eq_ignore_ascii_case(&var)),
        None => std::env::vars_os().any(|(k, _)| k.to_string_lossy().eq_ignore_ascii_case(&var)),
    };
    if in_env {
        return files.len() + 1;
    }
    files
        .iter()
        .rposition(|f| {
            config::Config::builder()
                .add_source(File::from(f.as_path()).format(FileFormat::Toml))
                .build()
                .is_ok_and(|c| c.get::<config::Value>(key).is_ok())
        })
        .map_or(0, |i| i + 1)
}

/// `[amqp] url` and `urls` are one setting, the broker's address: the one set by the later
/// layer wins, as any key would (a deployment's `STORAGETIER__AMQP__URL` over an
/// environment file's `urls`, which used to win silently and kept the service on the
/// file's nodes); set in one layer, `urls` wins. An empty `urls` (`STORAGETIER__AMQP__URLS=`)
/// clears it.
fn endpoints_by_layer(
    tree: &mut Map<String, Value>,
    opts: &LoadOptions,
    files: &[std::path::PathBuf],
) {
    let Some(Value {
        kind: config::ValueKind::Table(amqp),
        ..
    }) = tree.get_mut("amqp")
    else {
        return;
    };
    if let Some(Value {
        kind: config::ValueKind::Array(urls),
        ..
    }) = amqp.get_mut("urls")
    {
        // Only a list of nothing clears it: a blank among nodes (`a,,b`) is a typo, refused
        // as the URL it is not.
        if urls
            .iter()
            .all(|u| matches!(&u.kind, config::ValueKind::String(s) if s.trim().is_empty()))
        {
            urls.clear();
        }
        if !urls.is_empty()
            && layer_of("amqp.url", opts, files) > layer_of("amqp.urls", opts, files)
        {
            urls.clear();
        }
    }
}

/// A list key given as one string (an environment variable without a comma, which the
/// `config` crate leaves unsplit) becomes a list of its comma-separated parts.
fn lists_from_strings(tree: &mut Map<String, Value>) {
    for key in LIST_KEYS {
        let Some((sec, name)) = key.split_once('.') else {
            continue;
        };
        let Some(Value {
            kind: config::ValueKind::Table(t),
            ..
        }) = tree.get_mut(sec)
        else {
            continue;
        };
        if let Some(v) = t.get_mut(name)
            && let config::ValueKind::String(text) = &v.kind
        {
            let parts: Vec<Value> = text
                .split(',')
                .map(|p| Value::from(p.trim().to_string()))
                .collect();
            *v = Value::from(parts);
        }
    }
}

/// Refuses a value whose type cannot be its key's, for the keys `default.toml` gives a
/// value: a fraction or a boolean where a whole number goes (`prefetch = 16.7`, which the
/// config crate would round) or a number where a boolean goes (`declare_sources = 0`); and
/// text (an environment override) that is no whole number, or not `true`/`false`, where
/// those go — the config crate would read `yes` as 1 and `off` as 0
/// (`STORAGETIER__AMQP__DRAIN_TIMEOUT_MS=off`: no drain at all).
fn check_kinds(
    tree: &Map<String, Value>,
    defaults: &Map<String, Value>,
    at: &str,
) -> Result<(), ConfigError> {
    use config::ValueKind as K;
    let whole = |k: &K| matches!(k, K::I64(_) | K::I128(_) | K::U64(_) | K::U128(_));
    for (name, v) in tree {
        let unlisted;
        let d = match defaults.get(name) {
            Some(d) => d,
            None => match unlisted_kind(name) {
                Some(k) => {
                    unlisted = k;
                    &unlisted
                }
                // A section `default.toml` lacks (a service written beside these) still
                // has its unlisted keys checked.
                None => {
                    unlisted = Value::from(Map::<String, Value>::new());
                    &unlisted
                }
            },
        };
        let key = if at.is_empty() {
            name.clone()
        } else {
            format!("{at}.{name}")
        };
        // Text is not shown: a secret set under the wrong key would be printed and logged.
        let wrong = |what: &str| {
            let got = match &v.kind {
                K::String(_) => format!("text {WITHHELD}"),
                _ => v.to_string(),
            };
            Err(ConfigError::new(&key, format!("{what}, got {got}")))
        };
        let no_whole_text = |s: &str| s.trim().parse::<i128>().is_err();
        // A float is read into an unsigned key by rounding and saturating (`-1.0` as 0:
        // no body limit, no drain; `1e300` as u64::MAX): only a whole one a whole number
        // holds exactly passes, as its integer would.
        let not_whole = |k: &K| match k {
            K::Float(f) => {
                f.fract() != 0.0 || !f.is_finite() || *f < 0.0 || *f > 9_007_199_254_740_992.0
            }
            K::Boolean(_) => true,
            K::String(s) => no_whole_text(s),
            _ => false,
        };
        let not_boolean = |k: &K| match k {
            K::Boolean(_) => false,
            K::String(s) => !["true", "false"].contains(&s.trim().to_ascii_lowercase().as_str()),
            _ => true,
        };
        let of_whole = |a: &[Value]| a.first().is_some_and(|e| whole(&e.kind));
        match (&d.kind, &v.kind) {
            (K::Table(dt), K::Table(vt)) => check_kinds(vt, dt, &key)?,
            (dk, vk) if whole(dk) && not_whole(vk) => {
                return wrong("must be a whole number");
            }
            (K::Boolean(_), vk) if not_boolean(vk) => {
                return wrong("must be true or false");
            }
            (K::Array(da), K::Array(va))
                if of_whole(da) && va.iter().any(|e| not_whole(&e.kind)) =>
            {
                return wrong("must be whole numbers");
            }
            // One environment value for a list, split on commas later.
            (K::Array(da), K::String(s)) if of_whole(da) && s.split(',').any(no_whole_text) => {
                return wrong("must be whole numbers");
            }
            _ => {}
        }
    }
    Ok(())
}

/// The kind of value a key takes that `default.toml` gives none (its default lives in
/// code: left commented there, as an older release refuses a key it does not know, or
/// unset by default), by the key's own name in any section: checked as if `default.toml`
/// gave it, so `keep_completed_runs_days = true` is refused, not read as 1 day.
fn unlisted_kind(name: &str) -> Option<Value> {
    const WHOLE: &[&str] = &[
        "keep_failures_days",
        "keep_completed_runs_days",
        "keep_idle_runs_days",
        "seed",
        "max_retries",
        "retry_timeout_ms",
        "part_size_mib",
        "part_memory_mib",
    ];
    const BOOLEAN: &[&str] = &[
        "allow_http",
        "virtual_hosted_style",
        "conditional_writes",
        "checksums",
    ];
    // A store's S3 options (`archive_options`, `vault_options`).
    if name.ends_with("_options") {
        let mut t = Map::new();
        for k in WHOLE.iter().chain(BOOLEAN) {
            t.insert(k.to_string(), unlisted_kind(k)?);
        }
        return Some(Value::from(t));
    }
    if WHOLE.contains(&name) {
        Some(Value::from(0u64))
    } else if BOOLEAN.contains(&name) {
        Some(Value::from(false))
    } else {
        None
    }
}

/// The shortest `[amqp] connect_timeout_ms` and `operation_timeout_ms` taken: a TLS
/// handshake or a quorum queue's declaration on a loaded broker takes tens of ms.
const MIN_BROKER_TIMEOUT_MS: u64 = 100;

/// The shortest `[amqp] consumer_timeout_ms` taken (0 aside): a minute. Less is surely
/// seconds typed for milliseconds; under [`SHORT_CONSUMER_TIMEOUT_MS`] a warning says so.
const MIN_CONSUMER_TIMEOUT_MS: u64 = 60_000;

/// A `consumer_timeout_ms` under this (5 minutes) is warned about when the service starts:
/// perhaps seconds typed for milliseconds (86400 for a day), and a storage copy takes
/// minutes.
pub const SHORT_CONSUMER_TIMEOUT_MS: u64 = 300_000;

/// Interprets an override as a TOML scalar or array when it parses as one.
fn toml_scalar(v: &str) -> Option<Value> {
    let looks_typed = v.starts_with('[')
        || v == "true"
        || v == "false"
        || v.parse::<i64>().is_ok()
        || v.parse::<f64>().is_ok();
    if !looks_typed {
        return None;
    }
    let doc = format!("x = {v}");
    let c = config::Config::builder()
        .add_source(File::from_str(&doc, FileFormat::Toml))
        .build()
        .ok()?;
    c.get::<Value>("x").ok()
}

/// A section given as one value (`STORAGETIER__AMQP=amqps://user:pass@…`, `amqp = "…"`):
/// refused without the value, which is often the very secret meant for a key inside it.
fn not_a_table(name: &str) -> ConfigError {
    cfg_err(
        name,
        format!(
            "must be a table of keys ([{name}] in a file, STORAGETIER__{}__<KEY> in the \
             environment), not a single value",
            name.to_uppercase()
        ),
    )
}

/// Deserializes one section, naming the exact key on error.
fn section<T: DeserializeOwned>(tree: &Map<String, Value>, name: &str) -> Result<T, ConfigError> {
    let v = tree
        .get(name)
        .cloned()
        .unwrap_or_else(|| Value::from(Map::<String, Value>::new()));
    if v.clone().into_table().is_err() {
        return Err(not_a_table(name));
    }
    serde_path_to_error::deserialize::<_, T>(v).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." || path.is_empty() {
            name.to_string()
        } else {
            format!("{name}.{path}")
        };
        ConfigError::new(key, without_quoted_string(&e.into_inner().to_string()))
    })
}

/// What a message says in place of a value it withholds: a value given under the wrong
/// key may be a secret, and messages are printed and logged.
const WITHHELD: &str = "(not shown: it may be a secret)";

/// A deserializer's message without the text it quotes (`invalid type: string "…",
/// expected …`): a string given where a table or a number belongs is often the very
/// secret meant for a key inside it (`STORAGETIER__ONLINE_ARCHIVE__ARCHIVE_OPTIONS=<the
/// S3 secret>`), and a message is printed and logged.
fn without_quoted_string(msg: &str) -> String {
    for (lead, close) in [
        ("invalid type: string \"", "\", expected "),
        ("invalid value: string \"", "\", expected "),
        ("unknown variant `", "`, expected "),
    ] {
        if let Some(rest) = msg.strip_prefix(lead)
            && let Some(end) = rest.rfind(close)
        {
            let what = &lead[..lead.len() - 1];
            return format!("{what}{WITHHELD}{}", &rest[end + 1..]);
        }
    }
    msg.to_string()
}

/// Loads and validates the configuration of the service whose section is `section_name`.
pub fn load<S: DeserializeOwned>(
    section_name: &str,
    opts: &LoadOptions,
) -> Result<Config<S>, ConfigError> {
    let tree = load_tree(opts, section_name)?;
    let mut amqp: AmqpConfig = section(&tree, "amqp")?;
    let retry: RetryConfig = section(&tree, "retry")?;
    let log: LogConfig = section(&tree, "log")?;
    let storage: StorageConfig = section(&tree, "storage")?;
    let telemetry: TelemetryConfig = section(&tree, "telemetry")?;

    let own = tree
        .get(section_name)
        .cloned()
        .map(|v| v.into_table().map_err(|_| not_a_table(section_name)))
        .transpose()?
        .unwrap_or_default();
    let (mut framework_part, service_part): (Map<String, Value>, Map<String, Value>) = own
        .into_iter()
        .partition(|(k, _)| SERVICE_SECTION_KEYS.contains(&k.as_str()));
    // Design §5: `queue` (and the output exchange) default to `storagetier-<service>`, for
    // a service whose section the built-in defaults do not hold.
    let own_name = format!("storagetier-{}", section_name.replace('_', "-"));
    for key in ["queue", "output_exchange"] {
        framework_part
            .entry(key.to_string())
            .or_insert_with(|| Value::from(own_name.clone()));
    }
    let mut split = Map::new();
    split.insert("fw".to_string(), Value::from(framework_part));
    split.insert("svc".to_string(), Value::from(service_part));
    let service: ServiceSection =
        section(&split, "fw").map_err(|e| rename(e, "fw", section_name))?;
    let settings: S = section(&split, "svc").map_err(|mut e| {
        // serde lists the service's own keys only: a typo of a framework key of the
        // section (`http_listn`) would point away from the one meant.
        if e.message.starts_with("unknown field") {
            e.message = format!(
                "{}, or one of the section's framework keys: {}",
                e.message,
                SERVICE_SECTION_KEYS.join(", ")
            );
        }
        rename(e, "svc", section_name)
    })?;

    if let Some(pf) = &amqp.password_file {
        let pw = std::fs::read_to_string(pf).map_err(|e| {
            ConfigError::new(
                "amqp.password_file",
                format!("cannot read {}: {e}", secret_path_shown(pf)),
            )
        })?;
        // An empty one (a secret not mounted yet) would remove the password from the URL,
        // and the client would log in as guest: refused, and retried for ever.
        let pw = secret_of_file(&pw);
        if pw.trim().is_empty() {
            return Err(ConfigError::new(
                "amqp.password_file",
                format!("{} is empty", pf.display()),
            ));
        }
        // Only the nodes connected to, as the login check below: where `urls` is set,
        // `url` is unused (prod.toml's placeholder names no user, and refusing it failed
        // every cluster whose password comes from a file).
        if amqp.urls.is_empty() {
            amqp.url = amqp
                .url
                .with_password(pw)
                .map_err(|e| ConfigError::new("amqp.password_file", e))?;
        }
        for u in &mut amqp.urls {
            *u = u
                .with_password(pw)
                .map_err(|e| ConfigError::new("amqp.password_file", e))?;
        }
    }

    // Checked after the password file filled it in.
    // Only the nodes connected to: `url` is not used where `urls` is set (prod.toml's
    // placeholder may name no user, or one whose password only `urls` carry).
    let used: Vec<(String, &AmqpUrl)> = match amqp.urls.is_empty() {
        true => vec![("amqp.url".to_string(), &amqp.url)],
        false => (amqp.urls.iter().enumerate())
            .map(|(i, u)| (format!("amqp.urls[{i}]"), u))
            .collect(),
    };
    for (key, u) in used {
        if let Some(why) = u.login_gap() {
            return Err(ConfigError::new(key, why));
        }
    }
    check_queue_shared(&tree, section_name, &service.queue, &retry.delays_ms)?;
    // At most `prefetch` run at once whatever is asked: shown as it runs.
    if amqp.concurrency > usize::from(amqp.prefetch) {
        amqp.concurrency_capped_from = Some(amqp.concurrency);
        amqp.concurrency = usize::from(amqp.prefetch);
    }
    let cfg = Config {
        amqp,
        retry,
        log,
        storage,
        telemetry,
        service,
        settings,
        others: OtherSections(tree),
    };
    validate(&cfg, section_name)?;
    Ok(cfg)
}

/// Refuses a `queue` whose names meet another service's in the same files (a section
/// copied with its `queue` left in): two services on one queue each got part of the
/// other's messages — files archived or nearlined, never both, all reported done — and a
/// queue named as another's DLQ or tier took its dead letters or retries.
fn check_queue_shared(
    tree: &Map<String, Value>,
    own_section: &str,
    queue: &str,
    delays_ms: &[u64],
) -> Result<(), ConfigError> {
    let (my_queues, my_exchanges) = crate::topology::owned_names(queue, delays_ms);
    for (other, theirs, (queues, exchanges)) in
        service_topologies(tree, delays_ms).filter(|(s, ..)| *s != own_section)
    {
        let shared = queues
            .iter()
            .find(|n| my_queues.contains(n))
            .map(|n| (n, "queue"))
            .or_else(|| {
                exchanges
                    .iter()
                    .find(|n| my_exchanges.contains(n))
                    .map(|n| (n, "exchange"))
            });
        if let Some((name, kind)) = shared {
            let what = if *name == theirs {
                "two services on one queue each take part of the other's messages".to_string()
            } else {
                "one service would take the other's retries or dead letters".to_string()
            };
            return Err(ConfigError::new(
                format!("{own_section}.queue"),
                format!(
                    "`{queue}` makes the {kind} `{name}`, which {other} (`{other}.queue` = \
                     `{theirs}` in these files and this environment) owns too: {what}; give \
                     each service its own (where {other} runs with another queue set only in \
                     its own environment, set it in the shared files)"
                ),
            ));
        }
    }
    Ok(())
}

/// Every service's section with its `queue` as `tree` sets it (else that service's default,
/// `storagetier-<section>`) and the names its topology makes with `delays_ms`
/// ([`crate::topology::owned_names`]).
fn service_topologies<'a>(
    tree: &'a Map<String, Value>,
    delays_ms: &'a [u64],
) -> impl Iterator<Item = (&'static str, String, (Vec<String>, [String; 2]))> + 'a {
    KNOWN_SECTIONS[FRAMEWORK_SECTIONS..]
        .iter()
        .map(move |section| {
            let queue = tree
                .get(*section)
                .and_then(|v| v.clone().into_table().ok())
                .and_then(|t| t.get("queue").and_then(|q| q.clone().into_string().ok()))
                .unwrap_or_else(|| format!("storagetier-{}", section.replace('_', "-")));
            let names = crate::topology::owned_names(&queue, delays_ms);
            (*section, queue, names)
        })
}

/// What a name of a service's topology is to that service, in the order
/// [`crate::topology::owned_names`] gives them.
fn role_of(
    queues: &[String],
    exchanges: &[String; 2],
    name: &str,
    exchange: bool,
) -> Option<&'static str> {
    if exchange {
        return match exchanges.iter().position(|x| x == name)? {
            0 => Some("the dead-letter exchange"),
            _ => Some("the retry exchange"),
        };
    }
    let i = queues.iter().position(|q| q == name)?;
    Some(if i == 0 {
        "the input queue"
    } else if i + 1 == queues.len() {
        "the dead-letter queue"
    } else {
        "a retry queue"
    })
}

fn rename(mut e: ConfigError, from: &str, to: &str) -> ConfigError {
    if let Some(rest) = e.key.strip_prefix(from) {
        e.key = format!("{to}{rest}");
    }
    e
}

/// `[log] level`: a level, or comma-separated directives (`info,lapin=warn`). A filter with
/// no level of its own for everything else, but a bare word that is no level (`warning`,
/// or ` info` after a space, which the filter does not trim), is valid EnvFilter syntax —
/// every event of a target named so — that silently turns every other log line off:
/// refused.
fn check_log_level(level: &str) -> Result<(), ConfigError> {
    use std::str::FromStr;
    if level.trim().is_empty() {
        return Err(ConfigError::new(
            "log.level",
            "empty: it would turn every log line below ERROR off (info is the default)",
        ));
    }
    tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| ConfigError::new("log.level", e.to_string()))?;
    let is_level = |d: &str| tracing_subscriber::filter::LevelFilter::from_str(d).is_ok();
    let pieces: Vec<&str> = level.split(',').filter(|d| !d.is_empty()).collect();
    if pieces.iter().any(|d| is_level(d)) {
        return Ok(());
    }
    if let Some(d) = pieces.iter().find(|d| !d.contains('=') && !d.contains('[')) {
        return Err(ConfigError::new(
            "log.level",
            format!(
                "`{d}` is not a level (trace, debug, info, warn, error or off; no spaces \
                 around commas), and nothing else sets one: every other log line would be off"
            ),
        ));
    }
    Ok(())
}

fn validate<S>(cfg: &Config<S>, section_name: &str) -> Result<(), ConfigError> {
    let endpoint = cfg.telemetry.otlp_endpoint.trim();
    if !endpoint.is_empty() {
        // The value is not echoed: its credentials (user info, an API key in the query)
        // are the only way to authenticate to many collectors.
        let got = match url::Url::parse(endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => None,
            Ok(u) => Some(format!("a URL with scheme `{}`", u.scheme())),
            Err(e) => Some(format!("no URL ({e})")),
        };
        if let Some(got) = got {
            return Err(ConfigError::new(
                "telemetry.otlp_endpoint",
                format!("must be an http(s) URL (e.g. http://otel-collector:4318), got {got}"),
            ));
        }
        if cfg.telemetry.otlp_timeout_ms == 0 {
            return Err(ConfigError::new(
                "telemetry.otlp_timeout_ms",
                "must be at least 1",
            ));
        }
    }
    // Blank, every default file would land in the working directory, wherever that is,
    // and a blank path reads as a redacted secret in `check-config`.
    if cfg.storage.data_dir.to_string_lossy().trim().is_empty() {
        return Err(ConfigError::new(
            "storage.data_dir",
            "must not be empty (`.` is the working directory)",
        ));
    }
    let a = &cfg.amqp;
    if a.prefetch == 0 {
        return Err(ConfigError::new("amqp.prefetch", "must be at least 1"));
    }
    if a.queue_type == QueueType::Quorum && a.delivery_limit == 0 {
        return Err(ConfigError::new(
            "amqp.delivery_limit",
            "must be at least 1",
        ));
    }
    // Read and looked into here, not only found: a directory, another file's name or the
    // key given as the CA passed, and every connection then failed naming no key (`run`
    // retrying for ever), or an empty CA file was silently no CA.
    for (key, file, holds) in [
        ("amqp.tls_ca_file", &a.tls_ca_file, "CERTIFICATE-----"),
        ("amqp.tls_cert_file", &a.tls_cert_file, "CERTIFICATE-----"),
        ("amqp.tls_key_file", &a.tls_key_file, "PRIVATE KEY-----"),
    ] {
        let Some(f) = file else { continue };
        let pem = std::fs::read(f)
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", f.display())))?;
        let text = String::from_utf8_lossy(&pem);
        if !text
            .lines()
            .any(|l| l.starts_with("-----BEGIN ") && l.trim_end().ends_with(holds))
        {
            return Err(ConfigError::new(
                key,
                format!("{}: no PEM `-----BEGIN …{holds}` block in it", f.display()),
            ));
        }
    }
    if a.tls_cert_file.is_some() != a.tls_key_file.is_some() {
        return Err(ConfigError::new(
            "amqp.tls_key_file",
            "tls_cert_file and tls_key_file go together (mutual TLS)",
        ));
    }
    check_tls_identity(a)?;
    // Over amqp:// they would go unused: a plaintext connection the user meant to secure.
    let tls_set = [
        ("amqp.tls_ca_file", a.tls_ca_file.is_some()),
        ("amqp.tls_cert_file", a.tls_cert_file.is_some()),
    ]
    .into_iter()
    .find_map(|(k, set)| set.then_some(k));
    if let Some(key) = tls_set
        && let Some(plain) = a.endpoints().into_iter().find(|u| !u.is_tls())
    {
        return Err(ConfigError::new(
            key,
            format!("is for amqps:// but {plain} is plaintext amqp://, which would not use it"),
        ));
    }
    // A cluster's nodes are one broker: with one node down, the same password would go in
    // the clear to another.
    if a.urls.iter().any(AmqpUrl::is_tls) && a.urls.iter().any(|u| !u.is_tls()) {
        return Err(ConfigError::new(
            "amqp.urls",
            "mixes amqps:// and plaintext amqp:// nodes: with a TLS node down the credentials \
             would go in the clear to another; use one scheme for every node",
        ));
    }
    // A cluster's nodes are one broker, one vhost: a typo in one node's vhost made every
    // other reconnect declare and consume a second topology there, while the producers'
    // messages waited in the real one; a node named twice took two turns of every round.
    if let Some(first) = a.urls.first() {
        for (i, u) in a.urls.iter().enumerate().skip(1) {
            if u.vhost() != first.vhost() {
                return Err(ConfigError::new(
                    format!("amqp.urls[{i}]"),
                    format!(
                        "names the vhost `{}` where amqp.urls[0] names `{}`: a cluster's nodes \
                         serve one vhost",
                        u.vhost(),
                        first.vhost()
                    ),
                ));
            }
            if let Some(j) = (a.urls[..i].iter())
                .position(|o| o.node() == u.node() && o.0.username() == u.0.username())
            {
                return Err(ConfigError::new(
                    format!("amqp.urls[{i}]"),
                    format!("names the node of amqp.urls[{j}] again: list each node once"),
                ));
            }
        }
    }
    // lapin refuses every channel past the URL's `channel_max`: below what a session
    // opens, outcomes could not be published and every message went round to the broker's
    // delivery limit while `/readyz` said ready.
    let least = a.effective_concurrency() + CHANNEL_HEADROOM;
    for u in a.endpoints() {
        let asked =
            u.0.query_pairs()
                .find(|(k, _)| k == "channel_max")
                .and_then(|(_, v)| v.parse::<usize>().ok());
        if let Some(n) = asked
            && n != 0
            && n < least
        {
            return Err(ConfigError::new(
                if a.urls.is_empty() {
                    "amqp.url"
                } else {
                    "amqp.urls"
                },
                format!(
                    "query parameter `channel_max` = `{n}` is below the {least} channels this \
                     service may open (one per handler of `amqp.concurrency`, else \
                     `amqp.prefetch`, and {CHANNEL_HEADROOM} for consuming, the shared \
                     publisher and the watchers): leave it out, or ask for {least} or more"
                ),
            ));
        }
    }
    // A bound no broker call can meet (`operation_timeout_ms = 1`) would never let the
    // service become ready, retrying for ever, never saying which key is wrong.
    for (key, ms, least) in [
        (
            "amqp.connect_timeout_ms",
            a.connect_timeout_ms,
            MIN_BROKER_TIMEOUT_MS,
        ),
        (
            "amqp.operation_timeout_ms",
            a.operation_timeout_ms,
            MIN_BROKER_TIMEOUT_MS,
        ),
        ("amqp.reconnect_initial_ms", a.reconnect_initial_ms, 1),
    ] {
        if ms < least {
            return Err(ConfigError::new(
                key,
                format!("must be at least {least} ms"),
            ));
        }
    }
    if a.reconnect_max_ms < a.reconnect_initial_ms {
        return Err(ConfigError::new(
            "amqp.reconnect_max_ms",
            "must be >= reconnect_initial_ms",
        ));
    }
    // Declared on `Q` (`x-consumer-timeout`), where a later, corrected value does not
    // replace it: seconds typed for milliseconds (86400) would close the channel of every
    // handler longer than 86 s, and redeliver its message, until the queue is moved.
    if a.consumer_timeout_ms > 0 && a.consumer_timeout_ms < MIN_CONSUMER_TIMEOUT_MS {
        return Err(ConfigError::new(
            "amqp.consumer_timeout_ms",
            format!(
                "must be 0 (the broker's own) or at least {MIN_CONSUMER_TIMEOUT_MS} ms (a \
                 minute; it is in milliseconds)"
            ),
        ));
    }
    let r = &cfg.retry;
    if r.delays_ms.is_empty() {
        return Err(ConfigError::new(
            "retry.delays_ms",
            "needs at least one delay",
        ));
    }
    if r.delays_ms.contains(&0) {
        return Err(ConfigError::new("retry.delays_ms", "delays must be > 0 ms"));
    }
    // A tier's delay is its queue's x-message-ttl, which RabbitMQ caps at 2^32 - 1 ms.
    if let Some(d) = r.delays_ms.iter().find(|d| **d > u64::from(u32::MAX)) {
        return Err(ConfigError::new(
            "retry.delays_ms",
            format!(
                "{d} ms is longer than RabbitMQ's longest message TTL (4294967295 ms, about 49.7 days)"
            ),
        ));
    }
    let mut sorted = r.delays_ms.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != r.delays_ms.len() {
        return Err(ConfigError::new(
            "retry.delays_ms",
            "delays must be distinct",
        ));
    }
    if r.max_attempts == 0 {
        return Err(ConfigError::new("retry.max_attempts", "must be at least 1"));
    }
    check_log_level(&cfg.log.level)?;
    let s = &cfg.service;
    for (k, v) in [("queue", &s.queue), ("output_exchange", &s.output_exchange)] {
        check_owned_name(&format!("{section_name}.{k}"), v)?;
    }
    // A section copied with its `output_exchange` set to a `-fail` name: every success
    // message became a dead letter in that DLQ, which a replay dead-letters again.
    cfg.check_publishes_to(
        &format!("{section_name}.output_exchange"),
        &s.output_exchange,
    )?;
    // A producer's exchange: `amq.topic` is one RabbitMQ ships, but the default exchange
    // ("") cannot be bound to.
    if let Some(x) = &s.input_exchange
        && (x.is_empty() || x.len() > 255)
    {
        return Err(ConfigError::new(
            format!("{section_name}.input_exchange"),
            "must be 1 to 255 characters",
        ));
    }
    // Under `amq.` only what RabbitMQ ships exists, and nothing else can be declared: a
    // typo (`amq.topics`) waited for ever for a producer that cannot be.
    if let Some(x) = &s.input_exchange
        && x.starts_with("amq.")
        && !BUILTIN_EXCHANGES.contains(&x.as_str())
        && !x.starts_with("amq.rabbitmq.")
    {
        return Err(ConfigError::new(
            format!("{section_name}.input_exchange"),
            format!(
                "`{x}`: names starting with `amq.` are reserved by RabbitMQ, which has only {} \
                 and its own `amq.rabbitmq.*`",
                BUILTIN_EXCHANGES.join(", ")
            ),
        ));
    }
    s.http_listen
        .parse::<std::net::SocketAddr>()
        .map_err(|e| ConfigError::new(format!("{section_name}.http_listen"), e.to_string()))?;
    Ok(())
}

/// The `amq.` exchanges every RabbitMQ has (and the broker's own `amq.rabbitmq.*`: trace,
/// log, the event exchange plugin's).
const BUILTIN_EXCHANGES: [&str; 5] = [
    "amq.direct",
    "amq.fanout",
    "amq.headers",
    "amq.match",
    "amq.topic",
];

/// Checks the name of a queue or exchange a service declares and owns (`key` names it in
/// the error): 1 to 200 bytes of UTF-8 (room for the `-retry-<ms>`, `-dlq` names derived from
/// it within AMQP's 255), and not under `amq.`, which RabbitMQ reserves (it refuses the
/// declaration, and the service would retry it forever).
pub fn check_owned_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 200 {
        return Err(ConfigError::new(key, "must be 1 to 200 bytes (UTF-8)"));
    }
    if name.starts_with("amq.") {
        return Err(ConfigError::new(
            key,
            format!("`{name}`: names starting with `amq.` are reserved by RabbitMQ"),
        ));
    }
    Ok(())
}

/// A `[retry] max_outage_ms` below this (a minute) is warned about at start.
const SHORT_OUTAGE_MS: u64 = 60_000;

impl<S> Config<S> {
    /// The service whose topology in these files makes `name` one of its queues (`Q`, a
    /// retry tier, `Q-dlq`) or, with `exchange`, one of its exchanges (`Q-fail`,
    /// `Q-retry`), and what it is to that service: `None` for a name of no service's. An
    /// output sent there would reach that service as its input, a retry or a dead letter
    /// that makes no sense to it.
    pub fn topology_owner(&self, name: &str, exchange: bool) -> Option<(String, &'static str)> {
        let delays = &self.retry.delays_ms;
        let (queues, exchanges) = crate::topology::owned_names(&self.service.queue, delays);
        if let Some(role) = role_of(&queues, &exchanges, name, exchange) {
            return Some(("this service".to_string(), role));
        }
        service_topologies(&self.others.0, delays).find_map(|(section, _, (queues, exchanges))| {
            role_of(&queues, &exchanges, name, exchange).map(|role| (format!("[{section}]"), role))
        })
    }

    /// Refuses, naming `key`, an exchange the service publishes to that is a `-fail` or
    /// `-retry` exchange of a topology in these files: what it sends would land in that
    /// service's queues as retries or dead letters (which a replay dead-letters again).
    pub fn check_publishes_to(&self, key: &str, exchange: &str) -> Result<(), ConfigError> {
        match self.topology_owner(exchange, true) {
            None => Ok(()),
            Some((owner, role)) => Err(ConfigError::new(
                key,
                format!(
                    "`{exchange}` is {role} of {owner}: every message published there would \
                     land in its queues; name an exchange of this service's own"
                ),
            )),
        }
    }

    /// Everything `run` and `check-config` warn about in these settings: seconds typed
    /// for milliseconds ([`Self::unit_slips`]), and a broker reached in the clear over a
    /// network (as a database or an endpoint reached so is warned about).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = self.unit_slips();
        for u in self
            .amqp
            .endpoints()
            .into_iter()
            .filter(|u| u.in_the_clear())
        {
            out.push(format!(
                "amqp: {u} is plaintext amqp:// to another machine: the broker password and \
                 every message cross the network readable by anyone on the path; use amqps://"
            ));
        }
        for u in self
            .amqp
            .endpoints()
            .into_iter()
            .filter(|u| u.guest_on_another_machine())
        {
            out.push(format!(
                "amqp: {u} names no user: the client logs in as guest/guest, which RabbitMQ \
                 refuses from other machines by default (retried for ever, never ready); \
                 write the user and password in the URL (or amqp.password_file)"
            ));
        }
        out
    }

    /// What these settings hold that reads like seconds typed for milliseconds, one
    /// warning each: allowed (a test runs at such speeds), but in production a rebind or a
    /// depth read every few milliseconds loads the broker on every replica, a retry tier of
    /// milliseconds spends every attempt in seconds, and an outage waited out for seconds
    /// dead-letters a message at its next retry however few attempts it made.
    pub fn unit_slips(&self) -> Vec<String> {
        let short = |v: u64, under: u64| v > 0 && v < under;
        let mut out = Vec::new();
        for (key, v, what) in [
            (
                "amqp.rebind_interval_ms",
                self.amqp.rebind_interval_ms,
                "the input queue is bound again (a channel and a bind per binding) that often",
            ),
            (
                "amqp.queue_metrics_interval_ms",
                self.amqp.queue_metrics_interval_ms,
                "every queue of the service is declared passively that often",
            ),
        ] {
            if short(v, 1000) {
                out.push(format!(
                    "{key} is {v}, under a second (it is in milliseconds): {what}, on every \
                     replica; 0 turns it off"
                ));
            }
        }
        let longest = self.retry.delays_ms.iter().copied().max().unwrap_or(0);
        if short(longest, 1000) {
            out.push(format!(
                "retry.delays_ms: the longest tier is {longest} ms, under a second (they are in \
                 milliseconds): all {} attempts of a failing message are spent within about {} \
                 s, before a brief fault has passed",
                self.retry.max_attempts,
                (u64::from(self.retry.max_attempts) * longest).div_ceil(1000)
            ));
        }
        let drain = self.amqp.drain_timeout_ms;
        if short(drain, 1000) {
            out.push(format!(
                "amqp.drain_timeout_ms is {drain}, under a second (it is in milliseconds): on \
                 SIGTERM the messages in flight are handed back nearly at once instead of \
                 finishing, and done again by another replica"
            ));
        }
        let body = self.amqp.max_body_bytes;
        if short(body, 1024) {
            out.push(format!(
                "amqp.max_body_bytes is {body}, under a KiB (it is in bytes): nearly every \
                 message is dead-lettered unread as too large; 0 = no limit"
            ));
        }
        let outage = self.retry.max_outage_ms;
        if short(outage, SHORT_OUTAGE_MS) {
            out.push(format!(
                "retry.max_outage_ms is {outage}, under a minute (it is in milliseconds): a \
                 message whose outage lasts longer is dead-lettered at its next retry, however \
                 few attempts it made; 0 counts an outage's retries as any other's"
            ));
        }
        out
    }

    /// A path under `[storage] data_dir`.
    pub fn data_path(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.storage.data_dir.join(rel)
    }
}

/// The built-in `[storage] data_dir` (config/default.toml), the only one made if missing.
pub const DEFAULT_DATA_DIR: &str = "./data";

/// Refuses a configured `[storage] data_dir` that does not exist, where `what` (a
/// database, a store) would default under it: a volume not mounted there would have it
/// made on the root disk — a new, empty database; copies hidden once the volume is
/// mounted. Only the built-in `./data` is created.
pub fn check_data_dir(data_dir: &Path, what: &str) -> Result<(), ConfigError> {
    if is_default_data_dir(data_dir) || data_dir.is_dir() {
        return Ok(());
    }
    Err(ConfigError::new(
        "storage.data_dir",
        format!(
            "{}: no such directory (an unmounted volume?), and {what} would be made in it: \
             create it, or configure {what} elsewhere",
            data_dir.display()
        ),
    ))
}

/// Whether `p` names the built-in `./data`, however written (`data`, `./data/`, or the
/// absolute path `scripts/start` makes of a relative one): each spelling is the default.
fn is_default_data_dir(p: &Path) -> bool {
    let default = Path::new(DEFAULT_DATA_DIR);
    let bare = |p: &Path| -> std::path::PathBuf {
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    };
    bare(p) == bare(default)
        || (p.is_absolute()
            && std::env::current_dir().is_ok_and(|cwd| bare(p) == bare(&cwd.join(default))))
}

/// What the TLS client will do with `[amqp] tls_*` at every connect, done at load: a key
/// it cannot use (encrypted, OpenSSH's, a type it cannot sign with), a key of another
/// certificate, or a CA file of no certificate it reads passed a look at the PEM headers,
/// and then every connection failed ("no items found") naming no key, `run` retrying for
/// ever.
fn check_tls_identity(a: &AmqpConfig) -> Result<(), ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |key: &'static str, f: &Path| {
        std::fs::read(f)
            .map_err(|e| ConfigError::new(key, format!("cannot read {}: {e}", f.display())))
    };
    let certificates = |key: &'static str, f: &Path| {
        let pem = read(key, f)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError::new(key, format!("{}: {e}", f.display())))?;
        match certs.is_empty() {
            true => Err(ConfigError::new(
                key,
                format!(
                    "{}: no `-----BEGIN CERTIFICATE-----` block the TLS client reads",
                    f.display()
                ),
            )),
            false => Ok(certs),
        }
    };
    if let Some(f) = &a.tls_ca_file {
        certificates("amqp.tls_ca_file", f)?;
    }
    let (Some(cert), Some(key)) = (&a.tls_cert_file, &a.tls_key_file) else {
        return Ok(());
    };
    let chain = certificates("amqp.tls_cert_file", cert)?;
    let unusable = |why: String| {
        ConfigError::new(
            "amqp.tls_key_file",
            format!(
                "{}: {why} (an unencrypted PKCS#8, PKCS#1 RSA or SEC1 EC key is needed: \
                 `openssl pkcs8 -topk8 -nocrypt` converts one)",
                key.display()
            ),
        )
    };
    let der = PrivateKeyDer::from_pem_slice(&read("amqp.tls_key_file", key)?)
        .map_err(|e| unusable(format!("no private key the TLS client reads ({e})")))?;
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| unusable(format!("a key the TLS client cannot sign with ({e})")))?;
    match rustls::sign::CertifiedKey::new(chain, signer).keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(()),
        Err(e) => Err(ConfigError::new(
            "amqp.tls_key_file",
            format!(
                "{} is not the key of the certificate in {} ({e})",
                key.display(),
                cert.display()
            ),
        )),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_value_of_a_type_its_key_cannot_have_is_named() {
        let tree = |t: &str| -> Map<String, Value> {
            config::Config::builder()
                .add_source(File::from_str(t, FileFormat::Toml))
                .build()
                .unwrap()
                .try_deserialize()
                .unwrap()
        };
        let defaults = tree(
            "[retry]\ndelays_ms = [1000, 5000]\nmax_attempts = 5\n[amqp]\ndeclare_sources = true\n",
        );
        for (t, key) in [
            ("[retry]\ndelays_ms = [999.5]\n", "retry.delays_ms"),
            ("[retry]\nmax_attempts = 2.5\n", "retry.max_attempts"),
            ("[amqp]\ndeclare_sources = 0\n", "amqp.declare_sources"),
            ("[retry]\nmax_attempts = true\n", "retry.max_attempts"),
        ] {
            let e = check_kinds(&tree(t), &defaults, "").expect_err(t);
            assert_eq!(e.key, key, "{t}");
        }
        let fine =
            "[retry]\ndelays_ms = [7]\nmax_attempts = 3.0\n[amqp]\ndeclare_sources = false\n";
        assert!(check_kinds(&tree(fine), &defaults, "").is_ok());
        // Keys whose defaults live in code, in any service's section.
        for (t, key) in [
            (
                "[snapshot_status]\nkeep_completed_runs_days = true\n",
                "snapshot_status.keep_completed_runs_days",
            ),
            (
                "[online_archive]\nkeep_failures_days = 0.4\n",
                "online_archive.keep_failures_days",
            ),
            (
                "[online_nearline.vault_options]\nmax_retries = \"off\"\n",
                "online_nearline.vault_options.max_retries",
            ),
            (
                "[online_archive.archive_options]\nchecksums = 1\n",
                "online_archive.archive_options.checksums",
            ),
            ("[crash_router]\nseed = \"yes\"\n", "crash_router.seed"),
        ] {
            let e = check_kinds(&tree(t), &defaults, "").expect_err(t);
            assert_eq!(e.key, key, "{t}");
        }
        let fine = "[snapshot_status]\nkeep_completed_runs_days = \"7\"\n\
                    [online_archive.archive_options]\npart_size_mib = 16\nchecksums = false\n\
                    endpoint = \"http://s3:9000\"\n";
        assert!(check_kinds(&tree(fine), &defaults, "").is_ok());
    }
    use super::*;
    use serde::de::IgnoredAny;

    fn with_env(vars: &[(&str, &str)]) -> Result<Config<IgnoredAny>, ConfigError> {
        let opts = LoadOptions {
            env_vars: Some(
                vars.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..LoadOptions::default()
        };
        load::<IgnoredAny>("echo", &opts)
    }

    /// Seconds typed for milliseconds are warned about, each naming its key; the defaults,
    /// `0` (off) and values of a second or more are not.
    #[test]
    fn seconds_typed_for_milliseconds_are_warned_about() {
        let defaults = with_env(&[]).expect("defaults");
        assert_eq!(defaults.unit_slips(), Vec::<String>::new());
        let slipped = with_env(&[
            ("STORAGETIER__AMQP__REBIND_INTERVAL_MS", "30"),
            ("STORAGETIER__AMQP__QUEUE_METRICS_INTERVAL_MS", "15"),
            ("STORAGETIER__RETRY__DELAYS_MS", "1,5,30,120"),
            ("STORAGETIER__RETRY__MAX_OUTAGE_MS", "3600"),
            ("STORAGETIER__AMQP__DRAIN_TIMEOUT_MS", "30"),
            ("STORAGETIER__AMQP__MAX_BODY_BYTES", "16"),
        ])
        .expect("allowed");
        let warned = slipped.unit_slips();
        for key in [
            "amqp.rebind_interval_ms is 30",
            "amqp.queue_metrics_interval_ms is 15",
            "retry.delays_ms: the longest tier is 120 ms",
            "retry.max_outage_ms is 3600",
            "amqp.drain_timeout_ms is 30",
            "amqp.max_body_bytes is 16",
        ] {
            assert!(
                warned.iter().any(|w| w.starts_with(key)),
                "{key}: {warned:?}"
            );
        }
        assert_eq!(warned.len(), 6, "{warned:?}");
        let off = with_env(&[
            ("STORAGETIER__AMQP__REBIND_INTERVAL_MS", "0"),
            ("STORAGETIER__AMQP__QUEUE_METRICS_INTERVAL_MS", "0"),
            ("STORAGETIER__RETRY__DELAYS_MS", "100,1000"),
            ("STORAGETIER__RETRY__MAX_OUTAGE_MS", "0"),
            ("STORAGETIER__AMQP__DRAIN_TIMEOUT_MS", "0"),
            ("STORAGETIER__AMQP__MAX_BODY_BYTES", "0"),
        ])
        .expect("allowed");
        assert_eq!(off.unit_slips(), Vec::<String>::new());
    }

    /// A section copied with its `queue` left in, or a queue named as another service's
    /// DLQ: refused naming the key and the other service.
    #[test]
    fn a_queue_another_service_owns_is_refused() {
        for q in [
            "storagetier-online-archive",
            "storagetier-online-archive-dlq",
            "storagetier-project-ingest-retry-5000",
        ] {
            let e = with_env(&[("STORAGETIER__ECHO__QUEUE", q)]).expect_err(q);
            assert_eq!(e.key, "echo.queue", "{q}");
        }
        // One made only of another's prefix is its own.
        assert!(with_env(&[("STORAGETIER__ECHO__QUEUE", "storagetier-online")]).is_ok());
        // Another service moved off the default frees it.
        assert!(
            with_env(&[
                ("STORAGETIER__ECHO__QUEUE", "storagetier-crash-router"),
                ("STORAGETIER__CRASH_ROUTER__QUEUE", "crashes"),
            ])
            .is_ok()
        );
    }

    #[test]
    fn a_blank_data_dir_is_refused() {
        for d in ["", "  "] {
            let e = with_env(&[("STORAGETIER__STORAGE__DATA_DIR", d)]).expect_err(d);
            assert_eq!(e.key, "storage.data_dir", "{d:?}");
        }
        assert!(with_env(&[("STORAGETIER__STORAGE__DATA_DIR", ".")]).is_ok());
    }

    /// The built-in `./data` is made if missing however it is written (`scripts/start`
    /// makes a relative one absolute); any other missing directory is refused.
    #[test]
    fn the_default_data_dir_is_the_default_however_written() {
        let cwd = std::env::current_dir().expect("cwd");
        for d in [
            std::path::PathBuf::from("data"),
            "./data/".into(),
            "././data".into(),
            cwd.join("data"),
            cwd.join("./data"),
        ] {
            assert!(check_data_dir(&d, "x").is_ok(), "{}", d.display());
        }
        for d in ["data/more", "./datas", "/nonexistent/data"] {
            let e = check_data_dir(Path::new(d), "x").expect_err(d);
            assert_eq!(e.key, "storage.data_dir");
        }
    }

    /// An `output_exchange` that is a `-fail` or `-retry` exchange of a service (its own or
    /// another's, by the other's queue in these files) is refused naming the key: its
    /// success messages became dead letters or retries there.
    #[test]
    fn an_output_exchange_of_a_services_topology_is_refused() {
        for (x, other) in [
            ("storagetier-echo-fail", None),
            ("storagetier-online-nearline-fail", None),
            ("storagetier-project-ingest-retry", None),
            (
                "pigeon-fail",
                Some(("STORAGETIER__CRASH_ROUTER__QUEUE", "pigeon")),
            ),
        ] {
            let mut vars = vec![("STORAGETIER__ECHO__OUTPUT_EXCHANGE", x)];
            vars.extend(other);
            let e = with_env(&vars).expect_err(x);
            assert_eq!(e.key, "echo.output_exchange", "{x}");
            assert!(e.message.contains("exchange of"), "{e}");
        }
        // A queue's name is not an exchange's: RabbitMQ keeps them apart.
        for x in [
            "storagetier-online-nearline",
            "storagetier-online-nearline-dlq",
            "pigeon-fail",
        ] {
            assert!(
                with_env(&[("STORAGETIER__ECHO__OUTPUT_EXCHANGE", x)]).is_ok(),
                "{x}"
            );
        }
    }

    #[test]
    fn the_later_layer_of_url_and_urls_wins_and_an_empty_urls_clears_it() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(
            dir.path().join("prod.toml"),
            "[amqp]\nurls = [\"amqp://a:5672/%2f\", \"amqp://b:5672/%2f\"]\n",
        )
        .expect("file");
        let load_with = |vars: &[(&str, &str)]| {
            let opts = LoadOptions {
                config_dir: Some(dir.path().to_path_buf()),
                config_dir_explicit: true,
                env_name: Some("prod".into()),
                env_vars: Some(
                    vars.iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                overrides: Vec::new(),
            };
            let cfg = load::<IgnoredAny>("echo", &opts).expect("loads");
            let shown: Vec<String> = cfg.amqp.endpoints().iter().map(|u| u.to_string()).collect();
            shown
        };
        // The file's nodes alone.
        assert_eq!(load_with(&[]).len(), 2);
        // The deployment's own URL, a later layer, wins over the file's list (it kept the
        // service on the file's nodes).
        let url = "amqp://env:5672/%2f";
        assert_eq!(load_with(&[("STORAGETIER__AMQP__URL", url)]), vec![url]);
        // So does an empty list, which names no node (it was "urls[0]: not a URL").
        assert_eq!(
            load_with(&[("STORAGETIER__AMQP__URLS", "")]),
            vec!["amqp://guest:***@127.0.0.1:5672/%2f"]
        );
        // A blank among nodes is a typo, not a node less.
        let blank = with_env(&[(
            "STORAGETIER__AMQP__URLS",
            "amqp://a:5672/%2f,,amqp://b:5672/%2f",
        )])
        .expect_err("a blank node accepted");
        assert!(blank.key.starts_with("amqp.urls"), "{blank}");
        // A list in the environment wins over a URL in the environment.
        let both = load_with(&[
            ("STORAGETIER__AMQP__URL", url),
            ("STORAGETIER__AMQP__URLS", "amqp://c:5672/%2f"),
        ]);
        assert_eq!(both, vec!["amqp://c:5672/%2f"]);
    }

    #[test]
    fn a_longer_wait_asked_for_picks_the_first_tier_that_long() {
        let r = RetryConfig {
            delays_ms: vec![1000, 5000, 30000],
            max_attempts: 5,
            max_outage_ms: 60_000,
        };
        let ms = std::time::Duration::from_millis;
        assert_eq!(r.delay_at_least(0, ms(0)), 1000);
        assert_eq!(r.delay_at_least(0, ms(1000)), 1000);
        assert_eq!(r.delay_at_least(0, ms(1001)), 5000);
        assert_eq!(r.delay_at_least(0, ms(20_000)), 30000);
        assert_eq!(r.delay_at_least(0, std::time::Duration::MAX), 30000);
        // Never shorter than the attempt's own tier.
        assert_eq!(r.delay_at_least(2, ms(2000)), 30000);
        assert_eq!(r.delay_at_least(7, ms(0)), 30000);
    }

    #[test]
    fn an_outage_retry_waits_about_half_the_outage_so_far() {
        let r = RetryConfig {
            delays_ms: vec![1000, 5000, 30000, 120_000],
            max_attempts: 5,
            max_outage_ms: 60_000,
        };
        let ms = std::time::Duration::from_millis;
        let none = ms(0);
        assert_eq!(r.outage_delay(ms(0), none), 1000);
        assert_eq!(r.outage_delay(ms(9_999), none), 1000);
        assert_eq!(r.outage_delay(ms(10_000), none), 5000);
        assert_eq!(r.outage_delay(ms(60_000), none), 30000);
        assert_eq!(r.outage_delay(ms(3_600_000), none), 120_000);
        assert_eq!(r.outage_delay(std::time::Duration::MAX, none), 120_000);
        // A peer's Retry-After still picks a longer tier.
        assert_eq!(r.outage_delay(ms(0), ms(20_000)), 30000);
    }

    #[test]
    fn urls_are_shown_without_their_secrets() {
        assert_eq!(
            redacted_url("https://u:s3cret@collector:4318/x?api-key=k1&region=eu"),
            "https://u:***@collector:4318/x?api-key=***&region=***"
        );
        assert_eq!(
            redacted_url("http://sink/events?token=t&sig=s&page=2"),
            "http://sink/events?token=***&sig=***&page=***"
        );
        assert_eq!(
            redacted_url("https://f.azurewebsites.net/api/x?code=abc"),
            "https://f.azurewebsites.net/api/x?code=***"
        );
        assert_eq!(
            redacted_url("postgres://u:pw@db/x?sslmode=require&password=p"),
            "postgres://u:***@db/x?sslmode=require&password=***"
        );
        assert_eq!(
            redacted_url("http://collector:4318"),
            "http://collector:4318/"
        );
        // A webhook's secret in its path; a path of words and ids is kept.
        assert_eq!(
            redacted_url("https://hooks.example/services/T0ABC/B0DEF/k2Jx9QpL4mVt8RzW1nYc3HdG"),
            "https://hooks.example/services/T0ABC/B0DEF/***"
        );
        assert_eq!(
            redacted_url("https://rabble.example/api/v1/events/member-registered"),
            "https://rabble.example/api/v1/events/member-registered"
        );
        assert_eq!(redacted_url("not a url?token=x"), "***");
        assert_eq!(redacted_url("host=db user=u password=PGKV"), "***");
        assert_eq!(
            redacted_url("data/online-archive.db"),
            "data/online-archive.db"
        );
    }

    /// A password holding `/`, `?` or `#` unencoded is read by the URL parser as host,
    /// port and path (`user:42/…@rabbit`: host `user`, port 42), leaving no password to
    /// mask: refused at load naming the key, without the URL; redacted whole where shown.
    #[test]
    fn a_password_the_parser_takes_for_host_and_path_is_refused_never_shown() {
        let secret = "Zm9vYmFy";
        for (var, key) in [
            ("STORAGETIER__AMQP__URL", "amqp.url"),
            ("STORAGETIER__AMQP__URLS", "amqp.urls"),
        ] {
            for url in [
                format!("amqp://user:42/{secret}@rabbit/%2f"),
                format!("amqps://user:42?{secret}@rabbit/%2f"),
                format!("amqp://user:42#{secret}@rabbit/%2f"),
            ] {
                let e = with_env(&[(var, &url)]).expect_err(&url);
                assert!(e.key.starts_with(key), "{e}");
                assert!(
                    e.message.contains("percent-encode") && !e.to_string().contains(secret),
                    "{e}"
                );
            }
        }
        // Percent-encoded, the same password is taken.
        let c = with_env(&[(
            "STORAGETIER__AMQP__URL",
            "amqp://user:42%2FZm9vYmFy@rabbit/%2f",
        )])
        .expect("encoded");
        assert_eq!(c.amqp.url.password(), Some("42%2FZm9vYmFy"));
        for url in [
            "amqp://user:42/Zm9vYmFy@rabbit/%2f",
            "postgres://app:12/Zm9vYmFy@host/db",
            "postgres://app:12?Zm9vYmFy@host/db?sslmode=require",
            "https://u:12#Zm9vYmFy@collector:4318",
            "postgres://app:pw@host:1/Zm9v/Ymar@host/db",
        ] {
            let shown = redacted_url(url);
            assert!(
                !shown.contains("Zm9v") && shown.contains("://***@"),
                "{url} → {shown}"
            );
        }
        assert_eq!(
            redacted_url("postgres://app:12/s3cret@host/db"),
            "postgres://***@host/db"
        );
        // A password holding `@` and `?`: the client reads `ss?Zq9xk@rabbit/%2f` as a query
        // parameter, which is refused without naming it.
        let e = with_env(&[(
            "STORAGETIER__AMQP__URL",
            "amqp://user:p@ss?Zq9xk@rabbit/%2f",
        )])
        .expect_err("a password's tail as a query");
        assert!(!e.to_string().contains("Zq9xk"), "{e}");
        assert!(!redacted_url("amqp://user:p@ss?Zq9xk@rabbit/%2f").contains("Zq9xk"));
        // An `@` after a user is no misread password: a vhost's is taken as written.
        let c = with_env(&[(
            "STORAGETIER__AMQP__URL",
            "amqp://storagetier:pw@rabbit/team@prod",
        )])
        .expect("a vhost with an @");
        assert_eq!(c.amqp.url.vhost(), "team@prod");
    }

    /// `--config-dir` named explicitly, holding config files of which none is read (a
    /// misnamed `defaults.toml`, a `prod.toml` without `--env prod`): refused listing
    /// them, not run silently on the built-in defaults. An empty one is built-in defaults.
    #[test]
    fn an_explicit_config_dir_none_of_whose_files_is_read_is_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let opts = |explicit: bool| LoadOptions {
            config_dir: Some(dir.path().to_path_buf()),
            config_dir_explicit: explicit,
            env_vars: Some(Default::default()),
            ..LoadOptions::default()
        };
        load::<IgnoredAny>("echo", &opts(true)).expect("an empty directory");
        std::fs::write(
            dir.path().join("prod.toml"),
            "[amqp]
prefetch = 4
",
        )
        .expect("file");
        std::fs::write(dir.path().join("defaults.toml"), "").expect("file");
        let e = load::<IgnoredAny>("echo", &opts(true)).expect_err("nothing read");
        assert!(e.key.contains("--config-dir"), "{e}");
        assert!(
            e.message.contains("defaults.toml, prod.toml") && e.message.contains("dev.toml"),
            "{e}"
        );
        // The default `./config`, not named, is not required to be anything.
        load::<IgnoredAny>("echo", &opts(false)).expect("not named");
        std::fs::write(dir.path().join("default.toml"), "").expect("file");
        load::<IgnoredAny>("echo", &opts(true)).expect("default.toml read");
    }

    /// An override with one underscore after the prefix was silently ignored: refused
    /// naming the variable, never its value; the project's own such variables pass.
    #[test]
    fn a_variable_with_one_underscore_after_the_prefix_is_refused() {
        for var in [
            "STORAGETIER_AMQP__URL",
            "STORAGETIER_AMQP_URL",
            "storagetier_amqp__url",
        ] {
            let e = with_env(&[(var, "amqp://u:s3cret@rabbit/%2f")]).expect_err(var);
            assert_eq!(e.key, var);
            assert!(
                !e.to_string().contains("s3cret") && e.message.contains("STORAGETIER__"),
                "{e}"
            );
        }
        for var in [
            "STORAGETIER_CONFIG_DIR",
            "STORAGETIER_TEST_AMQP_URL",
            "STORAGETIER_TEST_MGMT_URL",
            "STORAGETIER_RABBITMQ4_ROOT",
            "STORAGETIERX",
            // Kubernetes' service links of a Service named `storagetier…`.
            "STORAGETIER_SERVICE_HOST",
            "STORAGETIER_SERVICE_PORT",
            "STORAGETIER_ONLINE_ARCHIVE_SERVICE_PORT_METRICS",
            "STORAGETIER_ONLINE_ARCHIVE_PORT",
            "STORAGETIER_ONLINE_ARCHIVE_PORT_9101_TCP_ADDR",
        ] {
            assert!(with_env(&[(var, "x")]).is_ok(), "{var}");
        }
    }

    /// Every single-underscore `STORAGETIER_` variable the project's scripts, Dockerfile and
    /// documents tell a user to set is accepted by the services (exporting one once made
    /// every service exit 2): only the documents' examples of a mistyped override are not.
    #[test]
    fn the_variables_the_project_documents_are_accepted() {
        const MISTYPED_EXAMPLES: &[&str] = &["STORAGETIER_AMQP_URL", "STORAGETIER_AMQP__URL"];
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut files = vec![root.join("README.md"), root.join("Dockerfile")];
        for dir in ["scripts", "docs", "config"] {
            let entries = std::fs::read_dir(root.join(dir)).expect("project directory");
            files.extend(entries.map(|e| e.expect("entry").path()));
        }
        let mut names = std::collections::BTreeSet::new();
        for file in files.iter().filter(|f| f.is_file()) {
            let text = std::fs::read_to_string(file).expect("project file");
            for (at, _) in text.match_indices("STORAGETIER_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if !name.starts_with("STORAGETIER__") {
                    names.insert(name);
                }
            }
        }
        assert!(names.contains("STORAGETIER_DEBIAN_MIRROR"), "{names:?}");
        for name in &names {
            let loaded = with_env(&[(name, "x")]);
            if MISTYPED_EXAMPLES.contains(&name.as_str()) {
                assert!(loaded.is_err(), "{name} is documented as refused");
            } else {
                let refusal = loaded.err();
                assert!(
                    refusal.is_none(),
                    "{name} is documented but refused: {refusal:?}"
                );
            }
        }
    }

    /// Loads echo's config from a `prod.toml` holding `text` and nothing else.
    fn with_prod_toml(text: &[u8]) -> Result<Config<IgnoredAny>, ConfigError> {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("prod.toml"), text).expect("file");
        let opts = LoadOptions {
            config_dir: Some(dir.path().to_path_buf()),
            config_dir_explicit: true,
            env_name: Some("prod".into()),
            env_vars: Some(Default::default()),
            overrides: Vec::new(),
        };
        load::<IgnoredAny>("echo", &opts)
    }

    /// A float is rounded and saturated into an unsigned key: a negative or enormous one
    /// is refused as a whole number would not be taken.
    #[test]
    fn negative_or_enormous_floats_are_not_whole_numbers() {
        let load_file =
            |v: &str| with_prod_toml(format!("[amqp]\ndrain_timeout_ms = {v}\n").as_bytes());
        for v in ["-1.0", "1e300"] {
            let e = load_file(v).map(|_| ()).expect_err(v);
            assert_eq!(e.key, "amqp.drain_timeout_ms", "{e}");
        }
        assert_eq!(
            load_file("2000.0").expect("2000.0").amqp.drain_timeout_ms,
            2000
        );
    }

    /// A config file that is not UTF-8 (a Latin-1 `prod.toml`) is refused naming it and
    /// the line: read leniently, a password in it would have been another password.
    #[test]
    fn a_config_file_that_is_not_utf8_is_refused() {
        let e = with_prod_toml(b"[amqp]\nconnection_name = \"caf\xe9\"\n")
            .map(|_| ())
            .expect_err("latin-1");
        assert!(
            e.to_string().contains("prod.toml") && e.to_string().contains("line 2"),
            "{e}"
        );
    }

    /// A section given as one value is refused naming the section, without the value: it
    /// is often the very URL or secret meant for a key inside it.
    #[test]
    fn a_section_given_as_one_value_is_refused_without_showing_it() {
        for (var, section) in [
            ("STORAGETIER__AMQP", "amqp"),
            ("STORAGETIER__RETRY", "retry"),
            ("STORAGETIER__ECHO", "echo"),
        ] {
            let e = with_env(&[(var, "amqps://app:s3cret@mq/%2f")]).expect_err(var);
            assert_eq!(e.key, section, "{e}");
            assert!(!e.to_string().contains("s3cret"), "{e}");
            assert!(e.to_string().contains("table"), "{e}");
        }
    }

    /// A key given text where a number or a table belongs is refused naming the key and
    /// what it expects, without the text: a secret set under the wrong key (a table of
    /// store options given the S3 secret) was printed and logged whole.
    #[test]
    fn text_given_where_it_does_not_belong_is_refused_without_showing_it() {
        for var in [
            "STORAGETIER__AMQP__PREFETCH",
            "STORAGETIER__RETRY__DELAYS_MS",
            "STORAGETIER__AMQP__QUEUE_TYPE",
        ] {
            let e = with_env(&[(var, "wJalrXUtnFEMI/K7MDENG")]).expect_err(var);
            let text = e.to_string();
            assert!(!text.contains("wJalrXUtnFEMI"), "{text}");
            assert!(text.contains("not shown"), "{text}");
        }
        assert_eq!(
            without_quoted_string("invalid type: string \"a\", expected x\", expected u16"),
            "invalid type: string (not shown: it may be a secret), expected u16"
        );
        assert_eq!(
            without_quoted_string("unknown variant `s3cret`, expected `quorum` or `classic`"),
            "unknown variant (not shown: it may be a secret), expected `quorum` or `classic`"
        );
        assert_eq!(
            without_quoted_string("missing field `url`"),
            "missing field `url`"
        );
    }

    #[test]
    fn a_broker_url_the_client_cannot_use_is_refused_before_run() {
        for url in [
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=30s",
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=70000",
            "amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=big",
            // RabbitMQ 4.1 and later refuse a connection asking for less.
            "amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=4096",
            "amqp://guest:guest@127.0.0.1:5672/%2f?auth_mechanism=foo",
            // lapin takes the empty path after a trailing `/` as vhost "".
            "amqp://guest:guest@127.0.0.1:5672/",
            // Fewer channels than 16 handlers publish on: every outcome refused.
            "amqp://guest:guest@127.0.0.1:5672/%2f?channel_max=8",
        ] {
            let e = with_env(&[("STORAGETIER__AMQP__URL", url)]).expect_err(url);
            assert_eq!(e.key, "amqp.url", "{url}");
        }
        for url in [
            "amqp://guest:guest@127.0.0.1:5672",
            "amqp://guest:guest@127.0.0.1:5672/%2f?heartbeat=30&frame_max=131072",
            "amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=8192",
            "amqp://guest:guest@127.0.0.1:5672/%2f?frame_max=0",
            "amqps://u:p@rabbit/prod?auth_mechanism=external",
            "amqp://guest:guest@127.0.0.1:5672/%2f?channel_max=64",
            "amqp://guest:guest@127.0.0.1:5672/%2f?channel_max=0",
        ] {
            assert!(
                with_env(&[("STORAGETIER__AMQP__URL", url)]).is_ok(),
                "{url}"
            );
        }
    }

    #[test]
    fn a_password_file_is_taken_as_written_percent_signs_included() {
        let u = AmqpUrl::parse("amqp://u:x@h/%2f").expect("url");
        for pw in ["p%41ss", "a b:c@d/%", "plain"] {
            let with = u.with_password(pw).expect("password set");
            let seen: lapin::uri::AMQPUri = with.expose().parse().expect("usable by lapin");
            assert_eq!(seen.authority.userinfo.password, pw);
        }
    }

    /// A secret file loses only the line ending at its end: a password's own spaces are
    /// kept (trimmed, one starting or ending in a space could not be given by file).
    #[test]
    fn a_secret_file_loses_only_its_line_ending() {
        for (text, secret) in [
            ("pw\n", "pw"),
            ("pw\r\n", "pw"),
            ("pw", "pw"),
            (" pass word \n", " pass word "),
            ("\tpw\t\n\n", "\tpw\t"),
        ] {
            assert_eq!(secret_of_file(text), secret, "{text:?}");
        }
    }

    /// A password file with a URL naming no user would send the password as `guest`'s.
    #[test]
    fn a_password_file_needs_a_user_in_the_url() {
        let u = AmqpUrl::parse("amqp://rabbit/%2fprod").expect("url");
        let e = u.with_password("s3cret").expect_err("no user");
        assert!(e.contains("no user") && !e.contains("s3cret"), "{e}");
    }

    /// A user without a password (or the reverse) is refused naming the key: the client
    /// filled the gap with `guest`'s, and a `run` retried the refused login for ever as
    /// if the broker were away. A password file fills it; EXTERNAL needs none.
    #[test]
    fn a_login_half_given_is_refused() {
        let e = with_env(&[("STORAGETIER__AMQP__URL", "amqp://app@127.0.0.1:5672/%2f")])
            .expect_err("no password");
        assert_eq!(e.key, "amqp.url");
        assert!(e.to_string().contains("`app`"), "{e}");
        let e = with_env(&[(
            "STORAGETIER__AMQP__URL",
            "amqp://:s3cret@127.0.0.1:5672/%2f",
        )])
        .expect_err("no user");
        assert_eq!(e.key, "amqp.url");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let e = with_env(&[(
            "STORAGETIER__AMQP__URLS",
            "amqp://guest:guest@127.0.0.1:5672/%2f,amqp://app@127.0.0.2:5672/%2f",
        )])
        .expect_err("a node without a password");
        assert_eq!(e.key, "amqp.urls[1]");
        // `url` is not used where `urls` is set: its placeholder is not checked.
        with_env(&[
            ("STORAGETIER__AMQP__URL", "amqp://app@127.0.0.1:5672/%2f"),
            (
                "STORAGETIER__AMQP__URLS",
                "amqp://app:pw@127.0.0.1:5672/%2f,amqp://app:pw@127.0.0.2:5672/%2f",
            ),
        ])
        .expect("urls carry the passwords");
        let pw = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(pw.path(), "s3cret\n").expect("write");
        with_env(&[
            ("STORAGETIER__AMQP__URL", "amqp://app@127.0.0.1:5672/%2f"),
            (
                "STORAGETIER__AMQP__PASSWORD_FILE",
                &pw.path().display().to_string(),
            ),
        ])
        .expect("the file gives it");
        // A cluster's nodes get it, and prod.toml's `url`, naming no user, is left alone.
        let c = with_env(&[
            (
                "STORAGETIER__AMQP__URL",
                "amqps://rabbitmq.internal:5671/%2f",
            ),
            (
                "STORAGETIER__AMQP__URLS",
                "amqp://app@127.0.0.1:5672/%2f,amqp://app@127.0.0.2:5672/%2f",
            ),
            (
                "STORAGETIER__AMQP__PASSWORD_FILE",
                &pw.path().display().to_string(),
            ),
        ])
        .expect("the file gives every node its password");
        let passwords: Vec<_> = c.amqp.urls.iter().map(|u| u.0.password()).collect();
        assert_eq!(passwords, [Some("s3cret"), Some("s3cret")]);
        with_env(&[(
            "STORAGETIER__AMQP__URL",
            "amqp://app@127.0.0.1:5672/%2f?auth_mechanism=external",
        )])
        .expect("EXTERNAL");
        with_env(&[("STORAGETIER__AMQP__URL", "amqp://127.0.0.1:5672/%2f")])
            .expect("neither: guest");
    }

    /// A secret set where its file's path goes is not printed back in the error: the
    /// value names no file nor directory here. A real path whose file is missing is.
    #[test]
    fn a_secret_set_as_its_files_path_is_not_shown() {
        let dir = tempfile::tempdir().expect("dir");
        let missing = dir.path().join("amqp-password");
        for (value, shown) in [
            ("s3cretPassw0rd", false),
            ("wJalrXUtnFEMI/K7MDENG/bPxRfiCY", false),
            ("/K7MDENG/bPxRfiCY", false),
            (missing.to_str().expect("utf-8"), true),
        ] {
            let e = with_env(&[
                ("STORAGETIER__AMQP__URL", "amqp://app@127.0.0.1:5672/%2f"),
                ("STORAGETIER__AMQP__PASSWORD_FILE", value),
            ])
            .expect_err(value);
            assert_eq!(e.key, "amqp.password_file");
            assert_eq!(e.to_string().contains(value), shown, "{e}");
        }
    }

    /// A broker reached over plaintext `amqp://` on another machine is warned about (its
    /// password crosses the network in the clear), one on this machine or over TLS not.
    #[test]
    fn a_broker_reached_in_the_clear_is_warned_about() {
        let warned = |url: &str| {
            with_env(&[("STORAGETIER__AMQP__URL", url)])
                .expect("valid")
                .warnings()
        };
        let w = warned("amqp://app:s3cret@rabbit.internal:5672/%2f");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("rabbit.internal") && !w[0].contains("s3cret"),
            "{w:?}"
        );
        for this_machine in ["127.0.0.1:5672", "127.0.1.1", "LOCALHOST"] {
            assert_eq!(
                warned(&format!("amqp://app:s3cret@{this_machine}/%2f")),
                Vec::<String>::new(),
                "{this_machine}"
            );
        }
        assert_eq!(
            warned("amqps://app:s3cret@rabbit.internal/%2f"),
            Vec::<String>::new()
        );
        // No user at all: guest's login, refused off loopback by default.
        let w = warned("amqps://rabbit.internal:5671/v");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("guest/guest"), "{w:?}");
        assert_eq!(warned("amqp://127.0.0.1:5672/%2f"), Vec::<String>::new());
        assert_eq!(
            warned("amqps://rabbit.internal/v?auth_mechanism=external"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn an_empty_log_level_is_refused() {
        for level in ["", "  "] {
            let e = with_env(&[("STORAGETIER__LOG__LEVEL", level)]).expect_err("empty");
            assert_eq!(e.key, "log.level");
        }
    }

    #[test]
    fn concurrency_above_prefetch_shows_as_it_runs() {
        let c = with_env(&[
            ("STORAGETIER__AMQP__CONCURRENCY", "1000"),
            ("STORAGETIER__AMQP__PREFETCH", "16"),
        ])
        .expect("valid");
        assert_eq!(c.amqp.concurrency, 16);
        assert_eq!(c.amqp.effective_concurrency(), 16);
        assert_eq!(c.amqp.concurrency_capped_from, Some(1000));
        let c = with_env(&[("STORAGETIER__AMQP__CONCURRENCY", "16")]).expect("valid");
        assert_eq!(c.amqp.concurrency_capped_from, None);
    }

    #[test]
    fn tls_files_with_a_plaintext_url_are_refused() {
        let ca = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(ca.path(), PEM_CERT).expect("write");
        let ca = ca.path().display().to_string();
        let e = with_env(&[("STORAGETIER__AMQP__TLS_CA_FILE", &ca)]).expect_err("amqp://");
        assert_eq!(e.key, "amqp.tls_ca_file");
        assert!(e.to_string().contains("plaintext"), "{e}");
        let c = with_env(&[
            ("STORAGETIER__AMQP__TLS_CA_FILE", &ca),
            (
                "STORAGETIER__AMQP__URL",
                "amqps://guest:guest@rabbit:5671/%2f",
            ),
        ]);
        assert!(c.is_ok(), "{:?}", c.err());
        let mixed = with_env(&[(
            "STORAGETIER__AMQP__URLS",
            "amqps://u:p@h1:5671/%2f,amqp://u:p@h2:5672/%2f",
        )])
        .expect_err("TLS and plaintext nodes");
        assert_eq!(mixed.key, "amqp.urls");
    }

    /// A cluster's nodes serve one vhost, each named once: a typo in one node's vhost
    /// consumed a second topology on every other reconnect.
    #[test]
    fn a_clusters_nodes_name_one_vhost_each_node_once() {
        let e = with_env(&[(
            "STORAGETIER__AMQP__URLS",
            "amqp://u:p@h1:5672/prod,amqp://u:p@h2:5672/%2fprod,amqp://u:p@h3:5672/staging",
        )])
        .expect_err("two vhosts");
        assert_eq!(e.key, "amqp.urls[1]");
        assert!(e.to_string().contains("`/prod`"), "{e}");
        let e = with_env(&[(
            "STORAGETIER__AMQP__URLS",
            "amqp://u:p@h1/%2f,amqp://u:p@h2:5672/%2f,amqp://u:p@H1:5672/%2f",
        )])
        .expect_err("a node twice");
        assert_eq!(e.key, "amqp.urls[2]");
        assert!(e.to_string().contains("amqp.urls[0]"), "{e}");
        with_env(&[(
            "STORAGETIER__AMQP__URLS",
            "amqp://u:p@h1:5672/%2f,amqp://u:p@h1:5673,amqp://u:p@h2:5672",
        )])
        .expect("one vhost (`/`, however written), three nodes");
    }

    const PEM_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    /// A TLS file is looked into at load: a directory, an empty file or a key given as the
    /// CA failed only at each connection, naming no key (`run` retried for ever).
    #[test]
    fn tls_files_that_hold_no_pem_of_their_kind_are_refused_naming_the_key() {
        let dir = tempfile::tempdir().expect("dir");
        let file = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p.display().to_string()
        };
        let key = file(
            "key.pem",
            "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
        );
        let cert = file("cert.pem", PEM_CERT);
        let empty = file("empty.pem", "");
        let url = (
            "STORAGETIER__AMQP__URL",
            "amqps://guest:guest@rabbit:5671/%2f",
        );
        let folder = dir.path().display().to_string();
        for ca in [&key, &empty, &folder] {
            let e = with_env(&[url, ("STORAGETIER__AMQP__TLS_CA_FILE", ca.as_str())])
                .expect_err("no certificate");
            assert_eq!(e.key, "amqp.tls_ca_file", "{ca}");
        }
        let swapped = with_env(&[
            url,
            ("STORAGETIER__AMQP__TLS_CERT_FILE", &key),
            ("STORAGETIER__AMQP__TLS_KEY_FILE", &cert),
        ])
        .expect_err("key and certificate swapped");
        assert_eq!(swapped.key, "amqp.tls_cert_file");
        // A key and certificate are parsed as the TLS client will (framework/tests/cli.rs
        // `a_tls_key_the_client_cannot_use_exits_2_naming_it`, with real ones); a CA file
        // needs a certificate block.
        let fine = with_env(&[url, ("STORAGETIER__AMQP__TLS_CA_FILE", &cert)]);
        assert!(fine.is_ok(), "{:?}", fine.err());
        let trusted = file(
            "trusted.pem",
            "-----BEGIN TRUSTED CERTIFICATE-----\nMIIB\n-----END TRUSTED CERTIFICATE-----\n",
        );
        let e = with_env(&[url, ("STORAGETIER__AMQP__TLS_CA_FILE", &trusted)])
            .expect_err("OpenSSL's trusted-certificate form is no certificate to the client");
        assert_eq!(e.key, "amqp.tls_ca_file");
    }

    #[test]
    fn a_typo_in_a_service_section_lists_its_framework_keys_too() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Own {
            #[serde(default)]
            database_url: Option<String>,
        }
        let opts = LoadOptions::isolated().set("echo.http_listn", "127.0.0.1:1");
        let e = load::<Own>("echo", &opts).expect_err("unknown key");
        assert!(e.key.starts_with("echo"), "{e}");
        assert!(e.message.contains("database_url"), "{e}");
        assert!(e.message.contains("http_listen"), "{e}");
    }

    #[test]
    fn a_service_the_defaults_do_not_know_runs_with_its_own_section() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Own {
            endpoint: String,
        }
        let opts = LoadOptions::isolated()
            .set("my_adapter.http_listen", "127.0.0.1:9199")
            .set("my_adapter.endpoint", "https://example.invalid/");
        let cfg = load::<Own>("my_adapter", &opts).expect("its own section is known");
        assert_eq!(cfg.service.queue, "storagetier-my-adapter");
        assert_eq!(cfg.service.output_exchange, "storagetier-my-adapter");
        assert_eq!(cfg.settings.endpoint, "https://example.invalid/");
        // Where to serve metrics has no default to take: named.
        let opts = LoadOptions::isolated().set("my_adapter.endpoint", "x");
        let e = load::<Own>("my_adapter", &opts).expect_err("no http_listen");
        assert!(e.to_string().contains("http_listen"), "{e}");
        // Another service still takes it for a typo of a section.
        let opts = LoadOptions::isolated().set("my_adaptr.endpoint", "x");
        let e = load::<serde::de::IgnoredAny>("echo", &opts).expect_err("unknown section");
        assert_eq!(e.key, "my_adaptr");
    }

    #[test]
    fn environment_text_that_is_no_number_or_boolean_is_refused() {
        for (var, value, key) in [
            ("STORAGETIER__AMQP__PREFETCH", "yes", "amqp.prefetch"),
            (
                "STORAGETIER__AMQP__DRAIN_TIMEOUT_MS",
                "off",
                "amqp.drain_timeout_ms",
            ),
            (
                "STORAGETIER__AMQP__DECLARE_SOURCES",
                "1",
                "amqp.declare_sources",
            ),
            (
                "STORAGETIER__RETRY__DELAYS_MS",
                "1000,soon",
                "retry.delays_ms",
            ),
            ("STORAGETIER__RETRY__DELAYS_MS", "1s", "retry.delays_ms"),
        ] {
            let e = with_env(&[(var, value)]).expect_err(value);
            assert_eq!(e.key, key, "{var}={value}");
        }
        let c = with_env(&[
            ("STORAGETIER__AMQP__PREFETCH", "8"),
            ("STORAGETIER__AMQP__DECLARE_SOURCES", "TRUE"),
        ])
        .expect("loads");
        assert_eq!(c.amqp.prefetch, 8);
        assert!(c.amqp.declare_sources);
    }

    /// lapin reads the host as a domain name, and an IPv6 literal has none: it connected to
    /// `localhost` with the URL's credentials. Refused, naming the key.
    #[test]
    fn an_ipv6_broker_host_is_refused_not_swapped_for_localhost() {
        let e = with_env(&[(
            "STORAGETIER__AMQP__URL",
            "amqp://u:p@[2001:db8::5]:5672/%2f",
        )])
        .expect_err("IPv6 literal");
        assert_eq!(e.key, "amqp.url");
        assert!(
            e.message.contains("IPv6") && !e.message.contains("u:p"),
            "{e}"
        );
        assert!(AmqpUrl::parse("amqp://u:p@10.0.0.5:5672/%2f").is_ok());
    }

    #[test]
    fn an_owned_name_is_measured_in_bytes_as_amqp_does() {
        // AMQP's names are short strings of at most 255 bytes; `-retry-<ms>` and `-dlq` are
        // added to the 200, so 101 two-byte characters (202 bytes) must be refused.
        assert!(check_owned_name("service.queue", &"q".repeat(200)).is_ok());
        assert!(check_owned_name("service.queue", &"é".repeat(100)).is_ok());
        for bad in ["q".repeat(201), "é".repeat(101), String::new()] {
            let e = check_owned_name("service.queue", &bad).expect_err(&bad);
            assert_eq!(e.key, "service.queue");
            assert!(e.to_string().contains("1 to 200 bytes"), "{e}");
        }
        let e = check_owned_name("service.queue", "amq.mine").expect_err("amq.");
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    #[test]
    fn a_zero_timeout_names_its_own_key() {
        for key in [
            "connect_timeout_ms",
            "operation_timeout_ms",
            "reconnect_initial_ms",
        ] {
            let var = format!("STORAGETIER__AMQP__{}", key.to_uppercase());
            let e = with_env(&[(&var, "0")]).expect_err(key);
            assert_eq!(e.key, format!("amqp.{key}"));
        }
        // A bound no broker call meets: never ready, retried for ever, no key named.
        for key in ["connect_timeout_ms", "operation_timeout_ms"] {
            let var = format!("STORAGETIER__AMQP__{}", key.to_uppercase());
            let e = with_env(&[(&var, "1")]).expect_err(key);
            assert_eq!(e.key, format!("amqp.{key}"));
            assert!(with_env(&[(&var, "100")]).is_ok(), "{key}");
        }
    }

    #[test]
    fn a_word_setting_out_of_its_choices_lists_them() {
        let e = with_env(&[("STORAGETIER__LOG__FORMAT", "xml")]).expect_err("xml");
        assert_eq!(e.key, "log.format");
        assert!(e.message.contains("expected `text` or `json`"), "{e}");
        let e = with_env(&[("STORAGETIER__AMQP__QUEUE_TYPE", "stream")]).expect_err("stream");
        assert_eq!(e.key, "amqp.queue_type");
        assert!(e.message.contains("expected `quorum` or `classic`"), "{e}");
        assert!(
            e.message.contains("`stream`"),
            "a mistyped word is shown: {e}"
        );
        let c = with_env(&[
            ("STORAGETIER__AMQP__QUEUE_TYPE", "Classic"),
            ("STORAGETIER__LOG__FORMAT", "JSON"),
        ])
        .expect("any case");
        assert_eq!(c.amqp.queue_type, QueueType::Classic);
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn environment_overrides_keep_strings_as_strings() {
        let c = with_env(&[("STORAGETIER__AMQP__CONNECTION_NAME", "0123")]).expect("loads");
        assert_eq!(c.amqp.connection_name, "0123");
        let c = with_env(&[("STORAGETIER__AMQP__CONNECTION_NAME", "1e3")]).expect("loads");
        assert_eq!(c.amqp.connection_name, "1e3");
    }

    #[test]
    fn environment_overrides_still_convert_to_numbers_and_lists() {
        let c = with_env(&[
            ("STORAGETIER__AMQP__PREFETCH", "32"),
            ("STORAGETIER__AMQP__DECLARE_SOURCES", "false"),
            ("STORAGETIER__RETRY__DELAYS_MS", "5000"),
        ])
        .expect("loads");
        assert_eq!(c.amqp.prefetch, 32);
        assert!(!c.amqp.declare_sources);
        assert_eq!(
            c.retry.delays_ms,
            vec![5000],
            "one value is a one-element list"
        );
        let c = with_env(&[("STORAGETIER__RETRY__DELAYS_MS", "100,2000")]).expect("loads");
        assert_eq!(c.retry.delays_ms, vec![100, 2000]);
        let e = with_env(&[("STORAGETIER__AMQP__PREFETCH", "many")]).expect_err("not a number");
        assert_eq!(e.key, "amqp.prefetch");
    }

    /// RabbitMQ refuses a queue TTL above 2^32 - 1 ms; declared, it would fail as a
    /// topology conflict at start-up instead of a config error naming the key.
    #[test]
    fn a_retry_delay_longer_than_a_queue_ttl_can_be_is_a_config_error() {
        let c = with_env(&[("STORAGETIER__RETRY__DELAYS_MS", "4294967295")]).expect("the longest");
        assert_eq!(c.retry.delays_ms, vec![4_294_967_295]);
        let e = with_env(&[("STORAGETIER__RETRY__DELAYS_MS", "1000,4294967296")])
            .expect_err("too long");
        assert_eq!(e.key, "retry.delays_ms");
    }
}

//! Connecting to the broker: a cluster's nodes tried in turn, TLS with a private CA and a
//! client certificate, every attempt bounded in time.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection, ConnectionProperties, DefaultConnectionBuilder};
use tracing::warn;

use crate::config::{AmqpConfig, AmqpUrl};

/// The node the next connect tries first: each (re)connect starts after the last one tried,
/// so a cluster's nodes take turns and a dead node is not always tried first. It starts
/// at a random node, so replicas started with one configuration spread over the cluster
/// instead of all connecting to the first node (and all moving to the next one at once
/// when it goes down).
static NEXT_NODE: std::sync::LazyLock<AtomicUsize> =
    std::sync::LazyLock::new(|| AtomicUsize::new(usize::from(rand::random::<u16>())));

/// Set by [`skip_last_node`]: the next connect starts at another node than the last.
static SKIP_LAST: AtomicBool = AtomicBool::new(false);

/// The node a connect starts at: `next`, or where the last node is to be passed over
/// (`skip`), one of the `n` others picked by `r` (random) — not the one after it: every
/// replica configured with one list moved one node on together, and a rolling restart of
/// a cluster's nodes left them all on its last node, lost together with it.
fn start_node(next: usize, n: usize, skip: bool, r: usize) -> usize {
    match (skip, n) {
        (true, 2..) => next % n + 1 + r % (n - 1),
        _ => next,
    }
}

fn timed_out(what: String) -> lapin::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, what).into()
}

/// Runs a broker call, failing it after `limit`: no broker call may hang a service.
pub async fn bounded<T>(
    limit: Duration,
    what: &str,
    call: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    tokio::time::timeout(limit, call)
        .await
        .unwrap_or_else(|_| Err(timed_out(format!("{what} timed out after {limit:?}"))))
}

/// The largest frame `conn` carries, as negotiated (a message's properties must fit in
/// one; AMQP's 0, no limit, as the largest size).
pub fn frame_max(conn: &Connection) -> usize {
    match conn.configuration().frame_max() {
        0 => usize::MAX,
        n => n as usize,
    }
}

/// The connection name shown in the management UI.
fn connection_name(amqp: &AmqpConfig, service: &str) -> String {
    if !amqp.connection_name.is_empty() {
        return amqp.connection_name.clone();
    }
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{service}@{host}")
}

/// TLS settings from `[amqp] tls_*` (read at each connect, so renewed files are picked up).
fn tls_config(amqp: &AmqpConfig) -> Result<OwnedTLSConfig, lapin::Error> {
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            lapin::Error::from(std::io::Error::new(
                e.kind(),
                format!("cannot read {}: {e}", p.display()),
            ))
        })
    };
    let cert_chain = match &amqp.tls_ca_file {
        Some(p) => Some(String::from_utf8_lossy(&read(p)?).into_owned()),
        None => None,
    };
    let identity = match (&amqp.tls_cert_file, &amqp.tls_key_file) {
        (Some(c), Some(k)) => Some(OwnedIdentity::PKCS8 {
            pem: read(c)?,
            key: read(k)?,
        }),
        _ => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// `url` with the password `[amqp] password_file` holds now: read at each connect, as the
/// TLS files are, so a credential rotated in a mounted secret (and on the broker) is used at
/// the next reconnect instead of the one read at start, refused on every node for ever.
/// A file that cannot be read or is empty now (a secret being swapped) leaves the password
/// read at start, which load checked.
fn current_password(url: &AmqpUrl, amqp: &AmqpConfig) -> AmqpUrl {
    let Some(pf) = &amqp.password_file else {
        return url.clone();
    };
    match std::fs::read_to_string(pf).map(|t| crate::config::secret_of_file(&t).to_string()) {
        Ok(pw) if !pw.trim().is_empty() => url.with_password(&pw).unwrap_or_else(|e| {
            warn!(file = %pf.display(), error = %e, "amqp.password_file not applied; using the password read at start");
            url.clone()
        }),
        Ok(_) => {
            warn!(file = %pf.display(), "amqp.password_file is empty now; using the password read at start");
            url.clone()
        }
        Err(e) => {
            warn!(file = %pf.display(), error = %e, "amqp.password_file cannot be read now; using the password read at start");
            url.clone()
        }
    }
}

async fn connect_to(
    url: &AmqpUrl,
    amqp: &AmqpConfig,
    name: &str,
    service: &str,
) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default()
        .with_connection_name(name.into())
        .with_client_property("service".into(), service.into());
    let url = &current_password(url, amqp);
    let builder = DefaultConnectionBuilder::new()?
        .with_uri_str(with_defaults(url.expose()))
        .with_properties(props)
        .with_tls_config(tls_config(amqp)?);
    bounded(
        Duration::from_millis(amqp.connect_timeout_ms),
        &format!("connecting to {url}"),
        builder.connect(),
    )
    .await
}

/// The frame size a connection asks for unless its URL names one (`?frame_max=`):
/// RabbitMQ's default, so the negotiated size is what it was (a header frame up to 128 KiB
/// still arrives). Named up front, lapin allocates its send and receive buffers (32 frames,
/// 4 MiB each) once, and a page of them costs memory only once traffic reaches it; learned
/// from the broker, it grew them from 128 KiB by writing zeros, 8 MiB resident while idle.
/// A broker configured for larger frames needs `?frame_max=` in the URL.
const FRAME_MAX: u32 = 128 * 1024;

/// The heartbeat a connection asks for unless its URL names one (`?heartbeat=`), in
/// seconds (the lower of the two sides' wins): a peer gone silent (a node paused, a network
/// that drops packets) is noticed after twice this, where RabbitMQ's 60 took two to two and
/// a half minutes — the handlers of a connection the broker already closed, their messages
/// redelivered to another replica, ran on beside those copies all that while.
const HEARTBEAT_SECS: u16 = 15;

/// `url` with `frame_max=FRAME_MAX` and `heartbeat=HEARTBEAT_SECS` added to its query,
/// each unless it sets one.
fn with_defaults(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let has = |u: &url::Url, key: &str| u.query_pairs().any(|(k, _)| k == key);
            let (frame_max, heartbeat) = (has(&u, "frame_max"), has(&u, "heartbeat"));
            if frame_max && heartbeat {
                return url.to_string();
            }
            let mut q = u.query_pairs_mut();
            if !frame_max {
                q.append_pair("frame_max", &FRAME_MAX.to_string());
            }
            if !heartbeat {
                q.append_pair("heartbeat", &HEARTBEAT_SECS.to_string());
            }
            drop(q);
            u.to_string()
        }
        Err(_) => url.to_string(),
    }
}

/// Makes the next connect start after the node connected to last: it accepted the
/// connection but could not run a session (no quorum there, a partition, permissions),
/// or the session on it was lost (the node may be down with its host), and the other
/// nodes must get their turn.
pub(crate) fn skip_last_node() {
    SKIP_LAST.store(true, Ordering::Relaxed);
}

/// What a refused connection says about the configuration, to follow its error: the
/// broker's own words (`ACCESS_REFUSED`, `NOT_ALLOWED`) do not name the setting to fix.
pub fn refusal_hint(e: &impl std::fmt::Display) -> &'static str {
    let text = e.to_string();
    if is_limit(&text) {
        " (a limit the broker sets on the vhost or user is reached, e.g. max-queues or \
         max-connections: raise it, or free what holds it)"
    } else if text.contains("in exclusive use") {
        " (another client consumes the queue exclusively: find it in the queue's consumers \
         in the management UI)"
    } else if text.contains("ACCESS_REFUSED") && text.contains(" refused for user") {
        " (the user of [amqp] url / urls lacks a permission on that object: see \
         `rabbitmqctl list_user_permissions`)"
    } else if text.contains("ACCESS_REFUSED") {
        " (the broker refuses the user or password of [amqp] url / urls / password_file)"
    } else if text.contains("NOT_ALLOWED") {
        " (the vhost of [amqp] url / urls does not exist, or the user may not use it)"
    } else {
        ""
    }
}

/// Whether a refusal's text is a broker limit being reached (a vhost's `max-queues` or
/// `max-connections`, a user's `max-channels`…): "… limit (N) is reached".
pub(crate) fn is_limit(e: &impl std::fmt::Display) -> bool {
    let text = e.to_string();
    // "… queue limit in vhost 'v' (11) is reached"; a user's channel limit: "number of
    // channels opened for user 'u' has reached the maximum allowed user limit of (8)".
    (text.contains("limit") && text.contains("is reached"))
        || text.contains("maximum allowed user limit")
}

/// Opens a connection named for the management UI to the first node of `[amqp] urls`
/// (or `url`) that answers, starting at the node connected to last unless it was passed
/// over since ([`skip_last_node`]).
pub async fn connect(amqp: &AmqpConfig, service: &str) -> Result<Connection, lapin::Error> {
    let nodes = amqp.endpoints();
    let name = connection_name(amqp, service);
    let skip = SKIP_LAST.swap(false, Ordering::Relaxed);
    // Each round starts one node on, so a round that found none up does not always
    // begin at the same dead one.
    let next = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
    let start = start_node(next, nodes.len(), skip, rand::random::<u32>() as usize);
    let mut last = None;
    for i in 0..nodes.len() {
        let url = nodes[(start + i) % nodes.len()];
        match connect_to(url, amqp, &name, service).await {
            Ok(c) => {
                // The next reconnect starts with this node again unless it fails.
                NEXT_NODE.store((start + i) % nodes.len(), Ordering::Relaxed);
                return Ok(c);
            }
            Err(e) => {
                if nodes.len() > 1 {
                    warn!(node = %url, error = %e, hint = refusal_hint(&e), "broker node unreachable or refused the connection; trying the next");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| timed_out("no broker URL configured".into())))
}

/// Opens a channel with publisher confirms enabled.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, lapin::Error> {
    let ch = conn.create_channel().await?;
    ch.confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await?;
    Ok(ch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Passed over, the last node is never the next first, and each of the others may be:
    /// replicas lost together spread again instead of moving on together.
    #[test]
    fn a_node_passed_over_is_left_for_any_other() {
        for n in 2..=5 {
            for last in 0..n {
                let picked: std::collections::BTreeSet<usize> = (0..64)
                    .map(|r| start_node(last + 7 * n, n, true, r) % n)
                    .collect();
                let others: std::collections::BTreeSet<usize> =
                    (0..n).filter(|&i| i != last).collect();
                assert_eq!(picked, others, "{n} nodes, {last} passed over");
            }
        }
        // Not passed over: the same node again; one node: always it.
        assert_eq!(start_node(4, 3, false, 9), 4);
        assert_eq!(start_node(4, 1, true, 9), 4);
    }

    #[test]
    fn a_refusal_names_what_to_fix() {
        let limit = "PRECONDITION_FAILED - cannot declare queue 'q': queue limit in vhost 'v' (11) is reached";
        assert!(
            refusal_hint(&limit).contains("limit"),
            "not a conflict to delete: a limit"
        );
        let conns = "NOT_ALLOWED - access to vhost 'v' refused for user 'u': connection limit (1) is reached";
        assert!(refusal_hint(&conns).contains("max-connections"));
        let perm = "ACCESS_REFUSED - access to exchange 'x' in vhost 'v' refused for user 'u'";
        assert!(
            refusal_hint(&perm).contains("permission"),
            "not the password"
        );
        let login = "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN";
        assert!(refusal_hint(&login).contains("password"));
        let vhost = "NOT_ALLOWED - vhost v not found";
        assert!(refusal_hint(&vhost).contains("vhost"));
        let channels = "NOT_ALLOWED - number of channels opened for user 'u' has reached the \
                        maximum allowed user limit of (8)";
        assert!(
            refusal_hint(&channels).contains("limit"),
            "a user's channel limit"
        );
        let exclusive = "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use";
        let hint = refusal_hint(&exclusive);
        assert!(
            hint.contains("exclusively") && !hint.contains("password"),
            "another consumer, not the password: {hint}"
        );
    }

    #[test]
    fn frame_max_and_heartbeat_are_added_unless_the_url_sets_them() {
        assert_eq!(
            with_defaults("amqp://u:p@h:5672/%2f"),
            "amqp://u:p@h:5672/%2f?frame_max=131072&heartbeat=15"
        );
        assert_eq!(
            with_defaults("amqps://h/v?heartbeat=10"),
            "amqps://h/v?heartbeat=10&frame_max=131072"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?frame_max=1048576"),
            "amqp://h/%2f?frame_max=1048576&heartbeat=15"
        );
        assert_eq!(
            with_defaults("amqp://h/%2f?heartbeat=0&frame_max=1048576"),
            "amqp://h/%2f?heartbeat=0&frame_max=1048576"
        );
    }
}

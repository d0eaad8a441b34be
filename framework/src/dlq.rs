//! Dead-letter tooling: list, replay (confirm before removing) and purge `Q-dlq`.

use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use serde::Serialize;

use crate::headers as h;
use crate::runtime::{Outgoing, PublishError, confirm_channel, publish_confirmed};
use crate::topology::Topology;

/// One dead letter as shown by `dlq list`.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// AMQP message id, if any.
    pub message_id: Option<String>,
    /// `x-error`.
    pub error: Option<String>,
    /// `x-error-kind` (broker-side dead letters have none; then the x-death reason).
    pub kind: Option<String>,
    /// Exchange it first came from (kept as `x-original-exchange` on replay).
    pub original_exchange: String,
    /// Routing key it first came with (kept as `x-original-routing-key` on replay).
    pub original_routing_key: String,
    /// `x-failed-at`.
    pub failed_at: Option<String>,
    /// Body size in bytes.
    pub size: usize,
}

/// Failures of the dead-letter tools.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// Broker failure.
    #[error("broker error: {0}")]
    Amqp(#[from] lapin::Error),
    /// A replay could not be confirmed; the dead letter was kept.
    #[error("replay not confirmed, dead letter kept: {0}")]
    Publish(#[from] PublishError),
    /// The replay was confirmed but the dead letter could not be removed (the channel
    /// closed): it is still in the DLQ, and replaying it again delivers it twice.
    #[error(
        "replayed message id {0:?} but could not remove its dead letter (channel closed); \
         it is still in the DLQ"
    )]
    NotRemoved(Option<String>),
}

fn describe(props: &lapin::BasicProperties, routing_key: &str, size: usize) -> DeadLetter {
    let hdr = props.headers().clone().unwrap_or_default();
    let death_reason = h::get_str(&hdr, "x-first-death-reason");
    let death_exchange = h::get_str(&hdr, "x-first-death-exchange");
    DeadLetter {
        message_id: props.message_id().as_ref().map(|s| s.to_string()),
        error: h::get_str(&hdr, h::ERROR),
        kind: h::get_str(&hdr, h::ERROR_KIND).or(death_reason),
        original_exchange: h::get_str(&hdr, h::ORIGINAL_EXCHANGE)
            .or(death_exchange)
            .unwrap_or_default(),
        original_routing_key: h::get_str(&hdr, h::ORIGINAL_ROUTING_KEY)
            .unwrap_or_else(|| routing_key.to_string()),
        failed_at: h::get_str(&hdr, h::FAILED_AT),
        size,
    }
}

/// `s` with control characters escaped (`\n`, `\u{1b}`): a dead letter's headers come
/// from publishers and file names, and must not move the operator's cursor or hide text
/// when `dlq list` prints them.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Messages ready in `queue` (a passive declare: fails if the queue does not exist).
pub async fn count(ch: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(q.message_count())
}

/// Reads up to `limit` dead letters without removing them (they return when the channel closes).
pub async fn list(
    conn: &Connection,
    topo: &Topology,
    limit: usize,
) -> Result<Vec<DeadLetter>, DlqError> {
    let ch = conn.create_channel().await?;
    let total = count(&ch, &topo.dlq()).await? as usize;
    let mut out = Vec::new();
    while out.len() < limit.min(total) {
        let Some(m) = ch
            .basic_get(
                topo.dlq().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        out.push(describe(
            &m.delivery.properties,
            m.delivery.routing_key.as_str(),
            m.delivery.data.len(),
        ));
    }
    let _ = ch.close(200, "list done".into()).await;
    await_returned(conn, &topo.dlq(), total as u32).await?;
    Ok(out)
}

/// How long a look at the DLQ waits for the dead letters it held to be back.
const RETURN_WAIT: Duration = Duration::from_secs(10);

/// Waits (bounded) until `queue` holds `n` ready messages again: messages a closed channel
/// held return to a quorum queue asynchronously (on RabbitMQ 4.x visibly so), and the
/// operator's next command — a replay right after a list — must find them there.
async fn await_returned(conn: &Connection, queue: &str, n: u32) -> Result<(), DlqError> {
    let ch = conn.create_channel().await?;
    let deadline = tokio::time::Instant::now() + RETURN_WAIT;
    while count(&ch, queue).await? < n && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = ch.close(200, "counted".into()).await;
    Ok(())
}

/// Which dead letters a replay moves.
#[derive(Debug, Clone)]
pub enum Selection {
    /// Every dead letter present when the replay starts.
    All,
    /// Only those with this message id.
    MessageId(String),
}

/// Republishes selected dead letters to the service's own queue `Q` (through the default
/// exchange, never to the original exchange, whose other subscribers must not see the
/// message again), keeping where each first came from in `x-original-exchange` /
/// `x-original-routing-key`. Each is removed from the DLQ only after the broker confirmed
/// its replay. Returns what was (or, with `dry_run`, would be) replayed.
pub async fn replay(
    conn: &Connection,
    topo: &Topology,
    selection: &Selection,
    dry_run: bool,
) -> Result<Vec<DeadLetter>, DlqError> {
    let ch = confirm_channel(conn).await?;
    let total = count(&ch, &topo.dlq()).await?;
    let mut moved = Vec::new();
    for _ in 0..total {
        let Some(m) = ch
            .basic_get(
                topo.dlq().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await?
        else {
            break;
        };
        let d = m.delivery;
        let info = describe(&d.properties, d.routing_key.as_str(), d.data.len());
        let selected = match selection {
            Selection::All => true,
            Selection::MessageId(id) => info.message_id.as_deref() == Some(id.as_str()),
        };
        if !selected {
            continue;
        }
        if !dry_run {
            let mut hdr = h::without(
                &d.properties.headers().clone().unwrap_or_default(),
                h::REPLAY_STRIPPED,
            );
            h::set_str(&mut hdr, h::ORIGINAL_EXCHANGE, &info.original_exchange);
            h::set_str(
                &mut hdr,
                h::ORIGINAL_ROUTING_KEY,
                &info.original_routing_key,
            );
            publish_confirmed(
                &ch,
                vec![Outgoing {
                    exchange: String::new(),
                    routing_key: topo.queue.clone(),
                    body: d.data.clone(),
                    properties: d.properties.clone().with_headers(hdr),
                    mandatory: true,
                }],
                topo.operation_timeout,
            )
            .await?;
            if !d.acker.ack(BasicAckOptions::default()).await? {
                return Err(DlqError::NotRemoved(info.message_id));
            }
        }
        moved.push(info);
    }
    let _ = ch.close(200, "replay done".into()).await;
    let kept = total.saturating_sub(if dry_run { 0 } else { moved.len() as u32 });
    await_returned(conn, &topo.dlq(), kept).await?;
    Ok(moved)
}

/// Deletes every dead letter; returns how many.
pub async fn purge(conn: &Connection, topo: &Topology) -> Result<u32, DlqError> {
    let ch = conn.create_channel().await?;
    let n = ch
        .queue_purge(topo.dlq().as_str().into(), QueuePurgeOptions::default())
        .await?;
    let _ = ch.close(200, "purge done".into()).await;
    Ok(n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(
            super::printable("a\nb\u{1b}[2J\0é\r"),
            "a\\nb\\u{1b}[2J\\u{0}é\\r"
        );
    }
}

//! Settles a session's deliveries on its consuming channel, one task per session: acks
//! that finish together leave as one `basic.ack(multiple)` when every delivery below them
//! is settled, which spares the broker a frame (and the client a round through lapin's
//! internal RPC task) per message.
//!
//! Nothing waits to be coalesced: each round sends whatever has finished since the last
//! one, so a slow handler never holds another message's ack (an unacked message counts
//! against the prefetch window). Acks finished while the previous round's frames were being
//! written simply gather for the next round.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures_util::FutureExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use crate::telemetry::QueueMetrics;

/// How a handler left its delivery.
enum Settlement {
    /// Acked; counted under this outcome label once the ack is sent, with the processor's
    /// own counts held until then ([`crate::MessageContext::count_when_done`]).
    Ack(&'static str, Vec<(metrics::Counter, u64)>),
    /// Given back to the queue to be delivered again: `basic.nack` (not handled: shutdown,
    /// an interrupted handler) or, when its outcome could not be published, `basic.reject`
    /// (a failed delivery: RabbitMQ 4.3 counts only rejects toward a quorum queue's
    /// delivery limit, so a message whose outcome can never be published still ends in
    /// the dead-letter queue instead of looping).
    GiveBack { failed: bool },
    /// Rejected without requeue: the broker dead-letters it as it came, through the
    /// queue's own dead-letter exchange (counted as a dead letter once sent).
    Reject,
}

enum Event {
    /// A delivery handed to a handler: unsettled until its `Settled`.
    Delivered(u64),
    Settled(u64, Settlement),
    /// The session ends: what is given back from now on is held (see [`Settling::ending`]).
    Ending,
    /// The broker answered the consumer's cancel: what is held goes back now.
    Released,
}

/// The sending side, cloned into each handler of the session.
#[derive(Clone)]
pub(crate) struct Settler {
    tx: mpsc::UnboundedSender<Event>,
}

/// The settling task of a session; [`Settling::finish`] sends what is left.
pub(crate) struct Settling {
    settler: Settler,
    task: JoinHandle<()>,
}

impl Settling {
    /// Starts settling deliveries of `ch`, counting acked outcomes in `metrics`.
    pub(crate) fn start(ch: Channel, metrics: Arc<QueueMetrics>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            settler: Settler { tx },
            task: tokio::spawn(run(ch, metrics, rx)),
        }
    }

    /// A handle for a handler of this session.
    pub(crate) fn settler(&self) -> Settler {
        self.settler.clone()
    }

    /// Records a delivery as handed out; must come before its handler can settle it, so
    /// no multiple ack covers it meanwhile.
    pub(crate) fn delivered(&self, tag: u64) {
        let _ = self.settler.tx.send(Event::Delivered(tag));
    }

    /// Notes that the session ends: a give-back from now on is held until
    /// [`Settling::released`], else left for the channel's close. Given back to a consumer
    /// the broker still counts as active (its cancel not yet answered, never sent on a
    /// single-active-consumer queue, not sent while the connection is blocked), a message
    /// came straight back to it, read no more, and went back again at the close: two
    /// returns, each counted toward the delivery limit, and held for the whole drain. A
    /// failed delivery's give-back held to the close is not counted as failed there: the
    /// stop, not the message, ended it.
    pub(crate) fn ending(&self) {
        let _ = self.settler.tx.send(Event::Ending);
    }

    /// Notes that the broker answered the consumer's cancel: what is given back goes to
    /// other consumers now.
    pub(crate) fn released(&self) {
        let _ = self.settler.tx.send(Event::Released);
    }

    /// Sends the settlements still queued (every handler has ended), waiting up to `limit`.
    pub(crate) async fn finish(self, limit: std::time::Duration) {
        drop(self.settler);
        let _ = tokio::time::timeout(limit, self.task).await;
    }
}

impl Settler {
    /// Acks `tag` (its outcome is confirmed by the broker), counted as `label`.
    pub(crate) fn ack(&self, tag: u64, label: &'static str) {
        self.ack_counting(tag, label, Vec::new());
    }

    /// Acks `tag` as [`Settler::ack`] does, adding `counts` once the ack is sent.
    pub(crate) fn ack_counting(
        &self,
        tag: u64,
        label: &'static str,
        counts: Vec<(metrics::Counter, u64)>,
    ) {
        let _ = self
            .tx
            .send(Event::Settled(tag, Settlement::Ack(label, counts)));
    }

    /// Returns `tag` to its queue to be delivered again, unhandled.
    pub(crate) fn give_back(&self, tag: u64) {
        let _ = self
            .tx
            .send(Event::Settled(tag, Settlement::GiveBack { failed: false }));
    }

    /// Has the broker dead-letter `tag` (`basic.reject`, no requeue): for a message none
    /// of whose outcomes the broker will take (it is larger than the broker now accepts).
    pub(crate) fn reject(&self, tag: u64) {
        let _ = self.tx.send(Event::Settled(tag, Settlement::Reject));
    }

    /// Returns `tag` to its queue as a failed delivery (counted toward its delivery limit).
    pub(crate) fn give_back_failed(&self, tag: u64) {
        let _ = self
            .tx
            .send(Event::Settled(tag, Settlement::GiveBack { failed: true }));
    }
}

/// What one round sends: one multiple ack up to a tag, then single acks.
#[derive(Debug, PartialEq, Eq)]
struct Plan {
    /// Acks every delivery up to this tag (all settled).
    up_to: Option<u64>,
    /// Acks one delivery each (an unsettled one lies below them).
    single: Vec<u64>,
}

/// Plans the acks of `acked` given the lowest still-unsettled tag: those below it may go
/// in one multiple ack (every delivery below it is settled), the rest one by one.
fn plan(acked: &[u64], lowest_unsettled: Option<u64>) -> Plan {
    let below = |t: u64| lowest_unsettled.is_none_or(|low| t < low);
    let mut below_count = 0;
    let mut up_to = None::<u64>;
    let mut single = Vec::new();
    for &t in acked {
        if below(t) {
            below_count += 1;
            up_to = Some(up_to.map_or(t, |u| u.max(t)));
        } else {
            single.push(t);
        }
    }
    if below_count == 1 {
        // One ack alone: `multiple` would also be exact, but plain is clearer on the wire.
        single.extend(up_to.take());
    }
    Plan { up_to, single }
}

async fn run(ch: Channel, metrics: Arc<QueueMetrics>, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut unsettled = BTreeSet::new();
    let mut events = Vec::with_capacity(64);
    let mut acked = Vec::with_capacity(64);
    let mut labels = Vec::with_capacity(64);
    // Give-backs held while the session ends and its consumer is not released: left
    // unsettled (no multiple ack may reach them), they go back with the channel.
    let (mut ending, mut released) = (false, false);
    let mut held: Vec<(u64, bool)> = Vec::new();
    while rx.recv_many(&mut events, 1024).await > 0 {
        // Let the handlers woken with this one (a confirm frame settles several publishes
        // at once) queue their settlements too, so they leave in this round.
        tokio::task::yield_now().await;
        while let Ok(e) = rx.try_recv() {
            events.push(e);
        }
        let mut give_back = Vec::new();
        let mut rejected = Vec::new();
        for e in events.drain(..) {
            match e {
                Event::Delivered(t) => {
                    unsettled.insert(t);
                }
                Event::Ending => ending = true,
                Event::Released => {
                    released = true;
                    for (t, failed) in held.drain(..) {
                        if unsettled.remove(&t) {
                            give_back.push((t, failed));
                        }
                    }
                }
                Event::Settled(t, Settlement::GiveBack { failed }) if ending && !released => {
                    if unsettled.contains(&t) && !held.iter().any(|(h, _)| *h == t) {
                        held.push((t, failed));
                    }
                }
                Event::Settled(t, s) => {
                    // Settled once: a stopped handler's give-back (see `session`) may
                    // follow its own ack, and a second settlement of one tag is a channel
                    // error that would take every other delivery back with it.
                    if !unsettled.remove(&t) {
                        continue;
                    }
                    match s {
                        Settlement::Ack(label, counts) => {
                            acked.push(t);
                            labels.push((label, counts));
                        }
                        Settlement::GiveBack { failed } => give_back.push((t, failed)),
                        Settlement::Reject => rejected.push(t),
                    }
                }
            }
        }
        // Given-back deliveries first: a multiple ack sent later must not reach them.
        // A failure means the channel is gone, and the broker requeues it anyway.
        for t in rejected {
            let dead = ch
                .basic_reject(t, BasicRejectOptions { requeue: false })
                .await;
            if dead.is_ok() {
                metrics.count("dead_letter");
            }
        }
        for (t, failed) in give_back {
            if failed {
                let _ = ch
                    .basic_reject(t, BasicRejectOptions { requeue: true })
                    .await;
            } else {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                };
                // Handed back either way: by this nack, or by the broker with the channel.
                let _ = ch.basic_nack(t, requeue).await;
                metrics.count("interrupted");
            }
        }
        if acked.is_empty() {
            continue;
        }
        let p = plan(&acked, unsettled.first().copied());
        let multiple = p.up_to.map(|t| (t, BasicAckOptions { multiple: true }));
        let singles = p.single.iter().map(|&t| (t, BasicAckOptions::default()));
        // Each ack is queued for the connection's writer, not waited for: a closed channel
        // refuses it at once (then nothing is counted, the broker redelivers), and waiting
        // for the write would cost this task a wake-up per round.
        let refused = multiple
            .into_iter()
            .chain(singles)
            .find_map(|(t, o)| ch.basic_ack(t, o).now_or_never()?.err());
        if let Some(e) = refused {
            warn!(error = %e, "acks not sent (channel closed); their messages will be redelivered");
        } else {
            // The processor's counts first: one who saw the outcome counted has them.
            for (label, counts) in labels.drain(..) {
                for (counter, n) in counts {
                    counter.increment(n);
                }
                metrics.count(label);
            }
        }
        acked.clear();
        labels.clear();
    }
    // Returned by the broker as the channel closes.
    for _ in held
        .iter()
        .filter(|(t, failed)| !failed && unsettled.contains(t))
    {
        metrics.count("interrupted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_below_every_unsettled_delivery_go_as_one() {
        assert_eq!(
            plan(&[3, 1, 2], None),
            Plan {
                up_to: Some(3),
                single: vec![]
            }
        );
        assert_eq!(
            plan(&[2, 5, 1, 7], Some(4)),
            Plan {
                up_to: Some(2),
                single: vec![5, 7]
            }
        );
    }

    #[test]
    fn acks_above_an_unsettled_delivery_go_one_by_one() {
        assert_eq!(
            plan(&[6, 5], Some(1)),
            Plan {
                up_to: None,
                single: vec![6, 5]
            }
        );
        assert_eq!(
            plan(&[4], None),
            Plan {
                up_to: None,
                single: vec![4]
            }
        );
    }
}

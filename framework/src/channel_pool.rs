//! Confirm channels for publishing, each used by one outcome at a time.
//!
//! lapin matches publisher confirms and returned (unroutable) messages to publishes per
//! channel, in order: two handlers publishing on one channel at once can be credited with
//! each other's confirm or return. And a publish to a missing exchange closes its channel.
//! So every outcome borrows a channel of its own from this pool, and the consuming channel
//! (deliveries, acks) never carries a publish: a failed publish costs one pooled channel,
//! never the in-flight deliveries.
//!
//! One exception keeps the common case cheap: publishes that can be neither returned nor
//! refused by routing — not mandatory, to the service's own output exchange — share one
//! confirm channel. The broker returns only mandatory messages, so on that channel no return
//! can be credited to the wrong publish, and lapin resolves each confirm by its own delivery
//! tag (a multiple-ack resolves exactly the tags it covers) — so long as the publishes reach
//! the wire in the order of their tags, which [`ChannelPool::shared_order`] keeps. A pool
//! channel per success message would cost the broker a channel process and an ack frame per
//! message, and lapin asks every channel of the connection for its flow state before each
//! frame it sends.
//!
//! The pool never opens more channels than the broker allows on the connection (its
//! negotiated `channel_max`, less what a session opens besides): past it, lapin refuses
//! the channel and the outcome failed, so every message whose outcome needed one went
//! round to the delivery limit. Beyond that many, an outcome waits for a channel to come
//! back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{Channel, Connection};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::alarm::Alarm;
use crate::connection::confirm_channel;

/// Channels a session opens on its connection besides the pool's: lapin's own channel 0,
/// consuming, the shared confirm channel, the watchers' (queue depth, re-binding), a
/// declaration's, with room to spare.
pub(crate) const CHANNEL_HEADROOM: usize = 8;

/// A pool of confirm channels on one connection, grown on demand up to the handlers that
/// publish at once, and never past what the broker allows ([`ChannelPool::capacity`]).
pub struct ChannelPool {
    conn: Arc<Connection>,
    /// Open channels no outcome uses now, each with the slot it holds.
    idle: Mutex<Vec<(Channel, OwnedSemaphorePermit)>>,
    /// One permit per channel the pool may have open (idle or in use).
    slots: Arc<Semaphore>,
    /// How many permits `slots` started with.
    capacity: usize,
    /// Wakes a caller waiting for a channel when one goes back idle.
    returned: Notify,
    /// The shared channel of unreturnable publishes (see the module doc), once opened.
    shared: Mutex<Option<Arc<Channel>>>,
    /// Held while the shared channel is (re)opened, so only one is.
    opening: tokio::sync::Mutex<()>,
    /// Held while a publish on the shared channel takes its tag and queues its frames.
    shared_order: Mutex<()>,
    limit: Duration,
    /// The connection's negotiated frame size, read once (lapin keeps it behind a lock
    /// that every delivery and publish would otherwise take).
    frame_max: usize,
    /// Whether the broker blocks the connection: waits stop their clock meanwhile.
    alarm: Alarm,
    /// Ends the alarm's watch with the pool.
    watching: CancellationToken,
}

impl Drop for ChannelPool {
    fn drop(&mut self) {
        self.watching.cancel();
    }
}

impl std::fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPool").finish_non_exhaustive()
    }
}

impl ChannelPool {
    /// A pool on `conn` (open: its frame size negotiated) whose publishes wait at most
    /// `limit` for their confirms; `blocked` shows whether the broker blocks `conn`.
    pub fn new(
        conn: Arc<Connection>,
        limit: Duration,
        blocked: Option<metrics::Gauge>,
    ) -> Arc<ChannelPool> {
        let watching = CancellationToken::new();
        // lapin makes a `channel_max` of 0 (no limit) its largest channel id.
        let capacity = usize::from(conn.configuration().channel_max())
            .saturating_sub(CHANNEL_HEADROOM)
            .max(1);
        Arc::new(ChannelPool {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            returned: Notify::new(),
            frame_max: crate::connection::frame_max(&conn),
            alarm: Alarm::watch(&conn, watching.clone(), blocked),
            watching,
            conn,
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            shared_order: Mutex::new(()),
            limit,
        })
    }

    /// How long a publish on this pool waits for its confirm.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The most channels the pool opens at once: what the broker allows on the connection
    /// less [`CHANNEL_HEADROOM`].
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The largest frame the connection carries.
    pub fn frame_max(&self) -> usize {
        self.frame_max
    }

    /// The connection's blocked state (a resource alarm).
    pub fn alarm(&self) -> &Alarm {
        &self.alarm
    }

    /// Whether the connection the pool publishes on is still up.
    pub fn connected(&self) -> bool {
        self.conn.status().connected()
    }

    /// Opens a confirm channel, within the limit unless the broker blocks the connection.
    async fn open(&self) -> Result<Channel, lapin::Error> {
        self.alarm
            .within(self.limit, confirm_channel(&self.conn))
            .await
            .unwrap_or_else(|| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("opening a channel timed out after {:?}", self.limit),
                )
                .into())
            })
    }

    /// The confirm channel shared by publishes the broker cannot return (not mandatory, to
    /// an exchange the service declared itself); reopened if it closed.
    pub async fn shared(&self) -> Result<Arc<Channel>, lapin::Error> {
        if let Some(c) = self.open_shared() {
            return Ok(c);
        }
        let _opening = self.opening.lock().await;
        if let Some(c) = self.open_shared() {
            return Ok(c);
        }
        let ch = Arc::new(self.open().await?);
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(ch.clone());
        Ok(ch)
    }

    /// The lock a publish on the shared channel holds while lapin numbers it and queues
    /// its frames (see [`crate::publisher::publish_confirmed_in_order`]): two handlers
    /// publishing from two threads could otherwise queue their frames in the other order
    /// than their numbers, and the broker, numbering by arrival, would answer each with
    /// the other's confirm — one's nack acking the other's input.
    pub fn shared_order(&self) -> &Mutex<()> {
        &self.shared_order
    }

    fn open_shared(&self) -> Option<Arc<Channel>> {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// An idle channel still open, if any (a closed one gives its slot back).
    fn take_idle(&self) -> Option<(Channel, OwnedSemaphorePermit)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::from_fn(|| idle.pop()).find(|(c, _)| c.status().connected())
    }

    /// An idle channel, else a slot to open one in, waiting for either while every slot
    /// holds a channel in use.
    async fn slot(&self) -> (Option<Channel>, OwnedSemaphorePermit) {
        loop {
            // Registered before looking, so a channel given back in between still wakes it.
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            if let Some((ch, slot)) = self.take_idle() {
                return (Some(ch), slot);
            }
            tokio::select! {
                slot = self.slots.clone().acquire_owned() => {
                    return (None, slot.expect("the pool never closes its slots"));
                }
                _ = &mut returned => {}
            }
        }
    }

    /// A channel only the caller uses until the guard drops; waits (at most the limit,
    /// while the broker does not block the connection) for one to come back when the pool
    /// holds as many as the broker allows.
    pub async fn get(self: &Arc<Self>) -> Result<PooledChannel, lapin::Error> {
        let (reused, slot) = self
            .alarm
            .within(self.limit, self.slot())
            .await
            .ok_or_else(|| {
                lapin::Error::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no channel came free within {:?} (all {} the broker allows are in use)",
                        self.limit, self.capacity
                    ),
                ))
            })?;
        let ch = match reused {
            Some(c) => c,
            None => self.open().await?,
        };
        Ok(PooledChannel {
            ch: Some(ch),
            slot: Some(slot),
            pool: self.clone(),
            settled: false,
        })
    }
}

/// A borrowed confirm channel; back to the pool on drop if still open and every publish
/// on it was answered ([`PooledChannel::settled`]).
pub struct PooledChannel {
    ch: Option<Channel>,
    /// The pool's slot this channel holds while open.
    slot: Option<OwnedSemaphorePermit>,
    pool: Arc<ChannelPool>,
    /// Whether every confirm of what was published on it came (acked, nacked or returned).
    settled: bool,
}

impl PooledChannel {
    /// Notes that every publish on the channel was answered: it may serve another outcome.
    pub fn settled(&mut self) {
        self.settled = true;
    }

    /// Closes the channel, freeing its slot once closed.
    fn close_then_free(&mut self) {
        let (Some(ch), slot) = (self.ch.take(), self.slot.take()) else {
            return;
        };
        let limit = self.pool.limit;
        // Outside a runtime (its shutdown) the channel goes with its connection.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ =
                    tokio::time::timeout(limit, ch.close(200, "confirms given up on".into())).await;
                // Only now may another channel take its place under the broker's limit.
                drop(slot);
            });
        }
    }
}

impl std::ops::Deref for PooledChannel {
    type Target = Channel;
    fn deref(&self) -> &Channel {
        self.ch.as_ref().expect("present until dropped")
    }
}

impl Drop for PooledChannel {
    fn drop(&mut self) {
        // Dropped with a confirm still awaited (its handler stopped by a drain): lapin
        // credits a return to the oldest confirm pending on the channel, so the next
        // outcome published on it could take that stale confirm's place — a retry that
        // reached no queue confirmed as routed, its input acked and lost.
        if !self.settled && self.ch.as_ref().is_some_and(|c| c.status().connected()) {
            self.close_then_free();
            return;
        }
        if let Some(ch) = self.ch.take()
            && ch.status().connected()
            && let Some(slot) = self.slot.take()
        {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((ch, slot));
            self.pool.returned.notify_one();
        }
    }
}

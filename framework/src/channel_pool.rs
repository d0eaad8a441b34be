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
//! tag (a multiple-ack resolves exactly the tags it covers). A pool channel per success
//! message would cost the broker a channel process and an ack frame per message, and lapin
//! asks every channel of the connection for its flow state before each frame it sends.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;

use crate::alarm::Alarm;
use crate::connection::confirm_channel;

/// A pool of confirm channels on one connection, grown on demand up to the concurrency.
pub struct ChannelPool {
    conn: Arc<Connection>,
    idle: Mutex<Vec<Channel>>,
    /// The shared channel of unreturnable publishes (see the module doc), once opened.
    shared: Mutex<Option<Arc<Channel>>>,
    /// Held while the shared channel is (re)opened, so only one is.
    opening: tokio::sync::Mutex<()>,
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
        Arc::new(ChannelPool {
            frame_max: crate::connection::frame_max(&conn),
            alarm: Alarm::watch(&conn, watching.clone(), blocked),
            watching,
            conn,
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            limit,
        })
    }

    /// How long a publish on this pool waits for its confirm.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The largest frame the connection carries.
    pub fn frame_max(&self) -> usize {
        self.frame_max
    }

    /// The connection's blocked state (a resource alarm).
    pub fn alarm(&self) -> &Alarm {
        &self.alarm
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

    fn open_shared(&self) -> Option<Arc<Channel>> {
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|c| c.status().connected())
            .cloned()
    }

    /// A channel only the caller uses until the guard drops.
    pub async fn get(self: &Arc<Self>) -> Result<PooledChannel, lapin::Error> {
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            std::iter::from_fn(|| idle.pop()).find(|c| c.status().connected())
        };
        let ch = match reused {
            Some(c) => c,
            None => self.open().await?,
        };
        Ok(PooledChannel {
            ch: Some(ch),
            pool: self.clone(),
        })
    }
}

/// A borrowed confirm channel; back to the pool on drop if still open.
pub struct PooledChannel {
    ch: Option<Channel>,
    pool: Arc<ChannelPool>,
}

impl PooledChannel {
    /// Closes the channel instead of giving it back (confirms given up on are kept by lapin
    /// until their channel closes).
    pub fn discard(mut self) {
        if let Some(ch) = self.ch.take() {
            tokio::spawn(async move {
                let _ = ch.close(200, "confirms given up on".into()).await;
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
        if let Some(ch) = self.ch.take()
            && ch.status().connected()
        {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ch);
        }
    }
}

//! Confirm channels for publishing, each used by one outcome at a time.
//!
//! lapin matches publisher confirms and returned (unroutable) messages to publishes per
//! channel, in order: two handlers publishing on one channel at once can be credited with
//! each other's confirm or return. And a publish to a missing exchange closes its channel.
//! So every outcome borrows a channel of its own from this pool, and the consuming channel
//! (deliveries, acks) never carries a publish: a failed publish costs one pooled channel,
//! never the in-flight deliveries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::{Channel, Connection};

use crate::connection::confirm_channel;

/// A pool of confirm channels on one connection, grown on demand up to the concurrency.
pub struct ChannelPool {
    conn: Arc<Connection>,
    idle: Mutex<Vec<Channel>>,
    limit: Duration,
}

impl std::fmt::Debug for ChannelPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelPool").finish_non_exhaustive()
    }
}

impl ChannelPool {
    /// A pool on `conn` whose publishes wait at most `limit` for their confirms.
    pub fn new(conn: Arc<Connection>, limit: Duration) -> Arc<ChannelPool> {
        Arc::new(ChannelPool {
            conn,
            idle: Mutex::new(Vec::new()),
            limit,
        })
    }

    /// How long a publish on this pool waits for its confirm.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// A channel only the caller uses until the guard drops.
    pub async fn get(self: &Arc<Self>) -> Result<PooledChannel, lapin::Error> {
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            std::iter::from_fn(|| idle.pop()).find(|c| c.status().connected())
        };
        let ch = match reused {
            Some(c) => c,
            None => {
                crate::connection::bounded(
                    self.limit,
                    "opening a channel",
                    confirm_channel(&self.conn),
                )
                .await?
            }
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

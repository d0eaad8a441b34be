//! The broker's flow control of a connection: during a memory or disk alarm RabbitMQ sends
//! `connection.blocked` and stops reading from every publishing connection until it clears.
//!
//! A publish made meanwhile is not lost and not refused: its frames wait (in the client, in
//! the socket) and reach the broker once the alarm clears, however long that is. Its fate
//! is unknown, not failed. Timing its confirm out would have the framework publish a retry
//! beside an output that later lands — one input, two or three outputs, and the copies
//! handled at the same time — and open channels or sessions that block in turn. So the
//! waits for a publish's confirm (and for the channel it goes on) stop their clock while the
//! connection is blocked, and give the broker the whole limit again once it unblocks.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::Connection;
use metrics::Gauge;
use tokio_util::sync::CancellationToken;

/// One connection's blocked state, kept from its events until `stop`.
#[derive(Debug, Clone, Default)]
pub struct Alarm(Arc<State>);

#[derive(Debug, Default)]
struct State {
    blocked: AtomicBool,
    /// Blocks and unblocks seen: a wait that saw this change was blocked for part of it.
    changes: AtomicU64,
}

impl Alarm {
    /// Follows `conn`'s `connection.blocked` / `unblocked` until `stop` (or the connection's
    /// end), logging each; `shown` (the service's `storagetier_connection_blocked`) counts
    /// the connection while it is blocked.
    pub fn watch(conn: &Connection, stop: CancellationToken, shown: Option<Gauge>) -> Alarm {
        let alarm = Alarm::default();
        let state = alarm.0.clone();
        let mut events = conn.events_listener();
        tokio::spawn(async move {
            // Counted up and down rather than set: the next connection's watch may start
            // before this one has seen its stop, and must not be overwritten by it.
            let mut shown = Shown {
                gauge: shown,
                on: false,
            };
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = events.next() => e,
                };
                match event {
                    None => return,
                    Some(lapin::Event::ConnectionBlocked(reason)) => {
                        state.blocked.store(true, Ordering::SeqCst);
                        state.changes.fetch_add(1, Ordering::SeqCst);
                        shown.set(true);
                        tracing::warn!(reason = %reason,
                            "the broker blocks publishing (a resource alarm): outcomes wait until it clears");
                    }
                    Some(lapin::Event::ConnectionUnblocked) => {
                        state.blocked.store(false, Ordering::SeqCst);
                        state.changes.fetch_add(1, Ordering::SeqCst);
                        shown.set(false);
                        tracing::info!("the broker takes publishes again");
                    }
                    Some(_) => {}
                }
            }
        });
        alarm
    }

    /// Whether the broker blocks the connection now.
    pub fn blocked(&self) -> bool {
        self.0.blocked.load(Ordering::SeqCst)
    }

    /// `call`'s result, or `None` once `limit` has passed without an alarm: a wait during
    /// which the connection was blocked, even for part of it, starts again.
    pub async fn within<F: Future>(&self, limit: Duration, call: F) -> Option<F::Output> {
        tokio::pin!(call);
        let mut seen = self.0.changes.load(Ordering::SeqCst);
        loop {
            match tokio::time::timeout(limit, &mut call).await {
                Ok(r) => return Some(r),
                Err(_) => {
                    let now = self.0.changes.load(Ordering::SeqCst);
                    if !self.blocked() && now == seen {
                        return None;
                    }
                    seen = now;
                }
            }
        }
    }
}

/// This connection's share of the blocked gauge, given back when the watch ends (a
/// connection that is gone blocks nothing).
struct Shown {
    gauge: Option<Gauge>,
    on: bool,
}

impl Shown {
    fn set(&mut self, on: bool) {
        if let Some(g) = &self.gauge
            && on != self.on
        {
            g.increment(if on { 1.0 } else { -1.0 });
        }
        self.on = on;
    }
}

impl Drop for Shown {
    fn drop(&mut self) {
        self.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // On a paused clock, advanced only by the waits themselves: the bound is exact and no
    // machine's speed enters it.
    #[tokio::test(start_paused = true)]
    async fn a_wait_runs_on_through_an_alarm_and_its_limit_after_it() {
        let alarm = Alarm::default();
        let limit = Duration::from_millis(100);
        assert!(
            alarm
                .within(limit, std::future::pending::<()>())
                .await
                .is_none(),
            "no alarm: the limit"
        );
        alarm.0.blocked.store(true, Ordering::SeqCst);
        alarm.0.changes.fetch_add(1, Ordering::SeqCst);
        let blocked_for = Duration::from_millis(700);
        let a = alarm.clone();
        let unblock = async move {
            tokio::time::sleep(blocked_for).await;
            a.0.blocked.store(false, Ordering::SeqCst);
            a.0.changes.fetch_add(1, Ordering::SeqCst);
        };
        let started = tokio::time::Instant::now();
        let (waited, ()) = tokio::join!(
            async {
                alarm.within(limit, std::future::pending::<()>()).await;
                started.elapsed()
            },
            unblock
        );
        // Not given up while blocked, and the whole limit again once unblocked.
        assert!(waited >= blocked_for + limit, "{waited:?}");
        assert_eq!(
            alarm.within(limit, async { 7 }).await,
            Some(7),
            "a result as soon as it comes"
        );
    }
}

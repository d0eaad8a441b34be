//! Blocking calls that may never return, waited for a bounded time: opening a file on a
//! share whose server stopped answering holds a thread until the server answers (a hard
//! NFS mount: for ever). Waited for without a bound, every handler of the service ended up
//! holding such an open — files on healthy roots waited behind them — and each redelivery
//! stranded another thread, until tokio's pool of blocking threads was used up. Here a
//! call not answered in time is given up (the thread goes on until the server answers),
//! and once too many given-up calls are still running, no more are started until some
//! return.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a call was not made or not waited for.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Stuck {
    /// Not answered within the wait; it still runs.
    #[error("no answer within {} s", .0.as_secs())]
    TimedOut(Duration),
    /// Not started: this many earlier calls were given up and have not returned yet.
    #[error("{0} earlier calls still have no answer")]
    TooMany(usize),
    /// The blocking task ended without an answer (it panicked).
    #[error("the call ended without an answer")]
    Lost,
}

/// Runs blocking calls, each waited for at most `wait`, with at most `max_stuck` given-up
/// calls still running.
#[derive(Debug, Clone)]
pub struct Bounded {
    stuck: Arc<AtomicUsize>,
    wait: Duration,
    max_stuck: usize,
    /// The given-up calls of every share together ([`PerShare`]), and their bound.
    all: Arc<AtomicUsize>,
    max_all: usize,
}

/// One [`Bounded`] per share (a root, or a mount point below one): the calls given up on
/// a share whose server stopped answering use up that share's budget only. With one
/// budget for all, 64 given-up opens on one dead share refused every file of every root
/// — healthy shares and local disks included — as "calls still have no answer", naming
/// the healthy file, until the dead one came back. All shares together still hold at most
/// `max_all` threads.
#[derive(Debug)]
pub struct PerShare {
    wait: Duration,
    max_stuck: usize,
    all: Arc<AtomicUsize>,
    max_all: usize,
    each: Mutex<HashMap<PathBuf, Bounded>>,
}

impl PerShare {
    /// Waits `wait` for each call; at most `max_stuck` given-up calls per share still
    /// running, `max_all` of all shares.
    pub fn new(wait: Duration, max_stuck: usize, max_all: usize) -> Self {
        Self {
            wait,
            max_stuck,
            all: Arc::new(AtomicUsize::new(0)),
            max_all,
            each: Mutex::new(HashMap::new()),
        }
    }

    /// The budget of `share`.
    pub fn of(&self, share: &Path) -> Bounded {
        let mut each = self.each.lock().unwrap_or_else(|p| p.into_inner());
        each.entry(share.to_path_buf())
            .or_insert_with(|| Bounded {
                stuck: Arc::new(AtomicUsize::new(0)),
                wait: self.wait,
                max_stuck: self.max_stuck,
                all: self.all.clone(),
                max_all: self.max_all,
            })
            .clone()
    }
}

const RUNNING: u8 = 0;
const DONE: u8 = 1;
const GIVEN_UP: u8 = 2;

impl Bounded {
    /// Waits `wait` for each call; refuses new ones while `max_stuck` are given up and
    /// still running.
    pub fn new(wait: Duration, max_stuck: usize) -> Self {
        Self {
            stuck: Arc::new(AtomicUsize::new(0)),
            wait,
            max_stuck,
            all: Arc::new(AtomicUsize::new(0)),
            max_all: usize::MAX,
        }
    }

    /// How many given-up calls are still running.
    pub fn stuck(&self) -> usize {
        self.stuck.load(Ordering::Relaxed)
    }

    /// Runs `f` on a blocking thread and waits for it at most the wait; a caller dropped
    /// while it waits gives the call up too.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Stuck> {
        let stuck = self.stuck();
        if stuck >= self.max_stuck {
            return Err(Stuck::TooMany(stuck));
        }
        let all = self.all.load(Ordering::Relaxed);
        if all >= self.max_all {
            return Err(Stuck::TooMany(all));
        }
        let state = Arc::new(AtomicU8::new(RUNNING));
        // Owned by the call: dropped when it returns, unwinds, or is never run (a thread
        // that could not be started), so a given-up call always leaves the count.
        let finished = Finished {
            state: state.clone(),
            stuck: [self.stuck.clone(), self.all.clone()],
        };
        let task = tokio::task::spawn_blocking(move || {
            let _finished = finished;
            f()
        });
        let watch = GiveUpOnDrop {
            state,
            stuck: [self.stuck.clone(), self.all.clone()],
        };
        let r = match tokio::time::timeout(self.wait, task).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(Stuck::Lost),
            Err(_) => Err(Stuck::TimedOut(self.wait)),
        };
        drop(watch);
        r
    }
}

/// Marks its call as returned when dropped; takes it out of the count where it had been
/// given up (and counted) already.
struct Finished {
    state: Arc<AtomicU8>,
    /// The share's count and the count of all shares.
    stuck: [Arc<AtomicUsize>; 2],
}

impl Drop for Finished {
    fn drop(&mut self) {
        if self
            .state
            .compare_exchange(RUNNING, DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.stuck.iter().for_each(|c| {
                c.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }
}

/// Counts its call as stuck when dropped before the call returned.
struct GiveUpOnDrop {
    state: Arc<AtomicU8>,
    /// The share's count and the count of all shares.
    stuck: [Arc<AtomicUsize>; 2],
}

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        // Counted before it is marked, so a call returning at once never takes the count
        // below zero; taken back where it had returned already.
        self.stuck.iter().for_each(|c| {
            c.fetch_add(1, Ordering::AcqRel);
        });
        if self
            .state
            .compare_exchange(RUNNING, GIVEN_UP, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            self.stuck.iter().for_each(|c| {
                c.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits (bounded) until `b` counts `n` stuck calls.
    async fn until_stuck(b: &Bounded, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while b.stuck() != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} stuck, not {n}",
                b.stuck()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_call_that_answers_is_waited_for() {
        let b = Bounded::new(Duration::from_secs(30), 1);
        assert_eq!(b.run(|| 7).await, Ok(7));
        assert_eq!(b.stuck(), 0);
    }

    /// A call without an answer is given up at its wait and counted until it returns;
    /// while `max_stuck` are, no call is started at all.
    #[tokio::test]
    async fn calls_without_an_answer_are_given_up_and_bound_the_threads_they_hold() {
        let b = Bounded::new(Duration::from_millis(100), 1);
        let (release, hang) = std::sync::mpsc::channel::<()>();
        let r = b
            .run(move || {
                let _ = hang.recv();
            })
            .await;
        assert_eq!(r, Err(Stuck::TimedOut(Duration::from_millis(100))));
        assert_eq!(b.stuck(), 1);
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = started.clone();
        let r = b.run(move || s.store(true, Ordering::Relaxed)).await;
        assert_eq!(r, Err(Stuck::TooMany(1)));
        assert!(!started.load(Ordering::Relaxed), "not started");
        // The server answers: the thread returns, and calls are made again (started:
        // whether this one answers within the short wait is the machine's speed).
        release.send(()).expect("release");
        until_stuck(&b, 0).await;
        let r = b.run(|| 8).await;
        assert!(!matches!(r, Err(Stuck::TooMany(_))), "{r:?}");
    }

    /// A call that panics (or never runs) leaves no count behind: counted, 64 of them
    /// stopped every open until a restart.
    #[tokio::test]
    async fn a_call_that_panics_leaves_no_count() {
        let b = Bounded::new(Duration::from_secs(30), 1);
        let r = b.run(|| -> u8 { panic!("injected") }).await;
        assert_eq!(r, Err(Stuck::Lost));
        assert_eq!(b.stuck(), 0);
        assert_eq!(b.run(|| 9).await, Ok(9));
        // Given up first, then panicking: counted until then, not after.
        let b = Bounded::new(Duration::from_millis(50), 4);
        let (release, hang) = std::sync::mpsc::channel::<()>();
        let r = b
            .run(move || {
                let _ = hang.recv();
                panic!("injected after the wait");
            })
            .await;
        assert_eq!(r, Err(Stuck::TimedOut(Duration::from_millis(50))));
        assert_eq!(b.stuck(), 1);
        release.send(()).expect("release");
        until_stuck(&b, 0).await;
    }

    /// Each share has its budget; all of them together one more.
    #[tokio::test]
    async fn each_share_has_its_own_budget_within_one_for_all() {
        let shares = PerShare::new(Duration::from_millis(50), 1, 2);
        let (release, hang) = std::sync::mpsc::channel::<()>();
        let hang = Arc::new(Mutex::new(hang));
        let stuck_on = |share: &str| {
            let b = shares.of(Path::new(share));
            let h = hang.clone();
            async move {
                let r = b
                    .run(move || {
                        let _ = h.lock().map(|h| h.recv());
                    })
                    .await;
                assert_eq!(r, Err(Stuck::TimedOut(Duration::from_millis(50))));
            }
        };
        stuck_on("/mnt/a").await;
        assert_eq!(
            shares.of(Path::new("/mnt/a")).run(|| 1).await,
            Err(Stuck::TooMany(1))
        );
        // Started (whether it answers within the short wait is the machine's speed).
        let r = shares.of(Path::new("/mnt/b")).run(|| 2).await;
        assert!(!matches!(r, Err(Stuck::TooMany(_))), "{r:?}");
        until_stuck(&shares.of(Path::new("/mnt/b")), 0).await;
        stuck_on("/mnt/b").await;
        assert_eq!(
            shares.of(Path::new("/mnt/c")).run(|| 3).await,
            Err(Stuck::TooMany(2)),
            "all shares together"
        );
        drop(release);
        until_stuck(&shares.of(Path::new("/mnt/a")), 0).await;
        until_stuck(&shares.of(Path::new("/mnt/b")), 0).await;
        let r = shares.of(Path::new("/mnt/c")).run(|| 3).await;
        assert!(!matches!(r, Err(Stuck::TooMany(_))), "{r:?}");
    }

    /// A caller dropped while it waits (its handler stopped) gives its call up too: the
    /// thread it leaves behind is counted until it returns.
    #[tokio::test]
    async fn a_caller_dropped_while_waiting_leaves_its_call_counted() {
        use futures_util::FutureExt;
        let b = Bounded::new(Duration::from_secs(30), 4);
        let (release, hang) = std::sync::mpsc::channel::<()>();
        let call = b.run(move || {
            let _ = hang.recv();
        });
        assert!(call.now_or_never().is_none(), "still running");
        assert_eq!(b.stuck(), 1);
        release.send(()).expect("release");
        until_stuck(&b, 0).await;
    }
}

//! Processes a test starts die with the test, pass or fail: each runs in a process group of
//! its own that is killed when its [`Guarded`] handle drops (a panicking test included),
//! and with a parent-death signal, so even a test binary killed outright takes its children.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The signal numbers tests send with [`Guarded::signal`].
pub use libc::{SIGINT, SIGKILL, SIGTERM, SIGXFSZ};

/// How long a killed child is waited for.
const REAP: Duration = Duration::from_secs(30);

/// A child process (and every process it starts) killed when dropped.
#[derive(Debug)]
pub struct Guarded {
    child: Child,
}

/// Reads `stderr` to its end on a thread of its own (so the process never blocks on a full
/// pipe) and sends once for each line holding `needle`: a test awaits a log line with it.
pub fn lines_holding(
    stderr: std::process::ChildStderr,
    needle: &'static str,
) -> std::sync::mpsc::Receiver<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains(needle) {
                let _ = tx.send(());
            }
        }
    });
    rx
}

/// Spawns `cmd` in a new process group guarded by the returned handle.
pub fn spawn(cmd: &mut Command) -> std::io::Result<Guarded> {
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().map(|child| Guarded { child })
}

/// Makes `cmd`'s process die abruptly (SIGXFSZ, no core file) at the first write that takes
/// any file past `bytes`: a death at an exact point of a long write, where a signal sent
/// from outside may arrive before it starts or after it ends.
pub fn die_writing_past(cmd: &mut Command, bytes: u64) -> &mut Command {
    let size = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    let core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit is async-signal-safe and reads only the two copied structs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_FSIZE, &size) != 0
                || libc::setrlimit(libc::RLIMIT_CORE, &core) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

impl Guarded {
    /// The process's stderr, if it was piped and not taken yet (to read its log).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    /// The process's stdout, if it was piped and not taken yet.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The process id (also its process group id).
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` to the whole process group.
    pub fn signal_group(&self, signal: i32) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall; a group that is already gone yields ESRCH, ignored. The
        // leader is reaped only in `drop`, so its id (the group's) cannot have been given to
        // another process meanwhile (pid_max is 32768 on many machines: ids come round
        // within one suite run).
        unsafe {
            libc::kill(-pgid, signal);
        }
    }

    /// Sends `signal` to the process itself (e.g. SIGTERM for a graceful stop).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall on our own child's pid, which is not reaped yet.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// SIGTERM, then waits at most `budget` for the exit status (None: it did not exit).
    pub fn terminate(&mut self, budget: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_for(budget)
    }

    /// Kills the process group at once and waits for the child to die (`kill -9`).
    pub fn kill(&mut self) {
        self.signal_group(libc::SIGKILL);
        let _ = self.wait_for(REAP);
    }

    /// Waits at most `budget` for the process to exit.
    pub fn wait_for(&mut self, budget: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + budget;
        loop {
            match self.exited() {
                Some(s) => return Some(s),
                None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                None => return None,
            }
        }
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.exited().is_none()
    }

    /// The exit status once the process has exited, leaving it unreaped (`WNOWAIT`): its id
    /// stays its own, so signalling it or its group later never reaches another process.
    fn exited(&self) -> Option<ExitStatus> {
        use std::os::unix::process::ExitStatusExt;
        // SAFETY: a zeroed siginfo_t is a valid out-parameter; waitid only writes to it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall on our own unreaped child.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.child.id() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: after a successful waitid, si_pid and si_status are set (si_pid 0: no
        // child has exited yet).
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if r != 0 || pid == 0 {
            return None;
        }
        // Back into a wait(2) status, as std reports it.
        Some(ExitStatus::from_raw(match info.si_code {
            libc::CLD_EXITED => (status & 0xff) << 8,
            libc::CLD_DUMPED => (status & 0x7f) | 0x80,
            _ => status & 0x7f,
        }))
    }
}

/// `Command::output` and `Command::status` for tests: the command runs guarded (it dies
/// with the test) and within a budget, so one that hangs (a `run` that should have
/// refused its config, say) fails its test instead of hanging the suite.
pub trait RunWithin {
    /// Runs to its end with stdout and stderr captured (stdin empty), as `output()` does;
    /// an error of kind `TimedOut` if it is still running after `budget` (it is killed).
    fn output_within(&mut self, budget: Duration) -> std::io::Result<Output>;
    /// Runs to its end with the stdio it was given, as `status()` does, within `budget`.
    fn status_within(&mut self, budget: Duration) -> std::io::Result<ExitStatus>;
}

impl RunWithin for Command {
    fn output_within(&mut self, budget: Duration) -> std::io::Result<Output> {
        self.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut g = spawn(self)?;
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                buf
            })
        };
        let out = drain(g.child.stdout.take().map(|p| Box::new(p) as _));
        let err = drain(g.child.stderr.take().map(|p| Box::new(p) as _));
        let status = g.wait_for(budget);
        // The whole group goes (a grandchild holding a pipe open included): the readers end.
        drop(g);
        let status = status.ok_or_else(|| self.timed_out(budget))?;
        Ok(Output {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    fn status_within(&mut self, budget: Duration) -> std::io::Result<ExitStatus> {
        let mut g = spawn(self)?;
        g.wait_for(budget).ok_or_else(|| self.timed_out(budget))
    }
}

/// The error of a command still running after its budget.
trait TimedOut {
    fn timed_out(&self, budget: Duration) -> std::io::Error;
}

impl TimedOut for Command {
    fn timed_out(&self, budget: Duration) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "{} {:?} still running after {budget:?} (killed)",
                self.get_program().to_string_lossy(),
                self.get_args().collect::<Vec<_>>()
            ),
        )
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // The group outlives its leader when the leader exited first: kill it either way.
        self.signal_group(libc::SIGKILL);
        // Reaped now, at most `REAP` waited for: a process stuck in the kernel
        // (uninterruptible sleep on a hung disk) must not hold the test for ever.
        if self.wait_for(REAP).is_some() {
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: u32) -> bool {
        // SAFETY: signal 0 only checks that the process exists.
        unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
    }

    fn zombie_or_gone(pid: u32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(s) => s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z')),
        }
    }

    #[test]
    fn dropping_the_guard_kills_the_child_and_its_children() {
        let dir = tempfile::tempdir().expect("tmp");
        let pidfile = dir.path().join("grandchild.pid");
        let g = spawn(
            Command::new("sh")
                .arg("-c")
                .arg(format!("sleep 300 & echo $! > {}; wait", pidfile.display())),
        )
        .expect("sh runs");
        let child = g.id();
        let deadline = Instant::now() + Duration::from_secs(20);
        let grandchild: u32 = loop {
            if let Some(p) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break p;
            }
            assert!(Instant::now() < deadline, "the shell started its child");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(alive(child) && alive(grandchild));
        drop(g);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !zombie_or_gone(grandchild) {
            assert!(
                Instant::now() < deadline,
                "the grandchild died with the guard"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(zombie_or_gone(child), "the child died with the guard");
    }

    #[test]
    fn a_panicking_test_still_kills_its_child() {
        let mut pid = 0;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let g = spawn(Command::new("sleep").arg("300")).expect("sleep runs");
            pid = g.id();
            panic!("the test failed");
        }));
        assert!(r.is_err());
        assert!(pid != 0 && zombie_or_gone(pid), "sleep died in the unwind");
    }

    #[test]
    fn a_command_past_its_budget_is_killed_and_reported() {
        let e = Command::new("sleep")
            .arg("300")
            .output_within(Duration::from_millis(200))
            .expect_err("still running");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        let o = Command::new("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .output_within(Duration::from_secs(20))
            .expect("ran");
        assert_eq!(
            (o.status.code(), &o.stdout[..], &o.stderr[..]),
            (Some(3), &b"out\n"[..], &b"err\n"[..])
        );
    }

    #[test]
    fn terminate_returns_the_exit_status() {
        let mut g = spawn(Command::new("sleep").arg("300")).expect("sleep runs");
        let s = g.terminate(Duration::from_secs(20)).expect("exited");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(s.signal(), Some(libc::SIGTERM));
    }

    /// A child that exited keeps its id (unreaped) until its guard drops: the group kill in
    /// `drop` must not reach a process that was given the id since (ids come round).
    #[test]
    fn an_exited_child_keeps_its_id_until_the_guard_drops() {
        let mut g = spawn(Command::new("sleep").arg("300")).expect("sleep runs");
        let pid = g.id();
        g.kill();
        assert!(!g.is_running());
        assert_eq!(
            g.wait_for(Duration::ZERO).and_then(|s| {
                use std::os::unix::process::ExitStatusExt;
                s.signal()
            }),
            Some(libc::SIGKILL)
        );
        assert!(
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s
                .rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))),
            "still a zombie: its id is not free"
        );
        drop(g);
        assert!(
            std::fs::metadata(format!("/proc/{pid}")).is_err(),
            "reaped with the guard"
        );
        let mut exits = spawn(Command::new("sh").args(["-c", "exit 3"])).expect("sh runs");
        assert_eq!(
            exits
                .wait_for(Duration::from_secs(20))
                .and_then(|s| s.code()),
            Some(3)
        );
    }
}

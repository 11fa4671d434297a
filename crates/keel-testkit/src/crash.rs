//! The crash harness, in the manner of sled's crash tests: a test re-runs its own binary as a
//! child with a scenario in the environment; the child does the work; the parent kills it
//! (or arms a crash point that makes it kill itself), restarts it, and finally checks the
//! result against ground truth kept outside the child.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The environment variable that tells a test binary it runs as a crash-test child.
pub const CHILD_ENV: &str = "KEEL_CRASH_CHILD";

/// Whether this process is a crash-test child.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// How one child process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// It finished its work and exited 0.
    Finished,
    /// It was killed by SIGKILL (by itself at a crash point, or by the harness).
    Killed,
    /// It aborted (SIGABRT: `std::process::abort`, a stack overflow, a double panic).
    Aborted,
}

/// A child run of the current test binary.
#[derive(Debug)]
pub struct ChildSpec<'a> {
    /// The exact name of the test function to run in the child (it must check [`is_child`]).
    pub test_name: &'a str,
    /// Environment for the child: data directory, ground-truth log, scenario parameters.
    pub env: Vec<(String, String)>,
}

impl ChildSpec<'_> {
    /// Spawns the child: the current test binary, filtered to the one test (in a `pg_*`
    /// binary, the shared suite's: [`crate::store::test_path`]).
    pub fn spawn(&self, extra_env: &[(&str, String)]) -> Child {
        self.spawn_exact(&crate::store::test_path(self.test_name), extra_env)
    }

    /// Spawns the child: the current test binary, filtered to the test whose full path in
    /// the binary is `test` (for a test of a `pg_*` binary's own, outside its suite).
    pub fn spawn_exact(&self, test: &str, extra_env: &[(&str, String)]) -> Child {
        let exe = std::env::current_exe().expect("current test binary");
        let mut command = Command::new(exe);
        command
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env_remove("KEEL_CRASH_AT")
            .env_remove("KEEL_CRASH_SKIP")
            .env_remove("KEEL_CRASH_SIGNAL")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        for (k, v) in extra_env {
            command.env(k, v);
        }
        command.spawn().expect("spawning the crash-test child")
    }

    /// Runs the child to its end (bounded by `timeout`) and classifies how it ended. A child
    /// that fails any other way fails the test, with its stderr.
    pub fn run(&self, extra_env: &[(&str, String)], timeout: Duration) -> Ending {
        let child = self.spawn(extra_env);
        wait_bounded(child, timeout)
    }

    /// Runs the child and kills it after `delay` if it is still running.
    pub fn run_and_kill_after(&self, delay: Duration, timeout: Duration) -> Ending {
        let mut child = self.spawn(&[]);
        let deadline = Instant::now() + delay;
        // Poll for an early exit so a fast child is not reported as killed.
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("polling the child") {
                return classify(status, &mut child);
            }
            std::thread::sleep(Duration::from_millis(1).min(deadline - Instant::now()));
        }
        let _ = child.kill(); // SIGKILL on Unix
        wait_bounded(child, timeout)
    }
}

impl ChildSpec<'_> {
    /// Kills the child at `point`'s first hit, then, restarted, at its hit number
    /// `later + 1` if it meets the point that often (`KEEL_CRASH_SKIP`), calling `after_kill`
    /// after each kill (to check ground truth). Returns the kills: 1, or 2 when the later hit
    /// was met. Panics if the first hit is never reached.
    pub fn kill_at_first_and_later_hit(
        &self,
        point: &str,
        later: u32,
        timeout: Duration,
        mut after_kill: impl FnMut(),
    ) -> usize {
        let mut kills = 0;
        for (n, skip) in [0, later].into_iter().enumerate() {
            let env = [
                ("KEEL_CRASH_AT", point.to_string()),
                ("KEEL_CRASH_SKIP", skip.to_string()),
            ];
            let ending = self.run(&env, timeout);
            if n == 0 {
                assert_eq!(
                    ending,
                    Ending::Killed,
                    "{point} (skip {skip}) was never reached"
                );
            }
            if ending == Ending::Killed {
                kills += 1;
                after_kill();
            }
        }
        kills
    }

    /// Restarts the child, unarmed, until it finishes; returns how many starts it took.
    /// Panics after 10 starts that all ended killed.
    pub fn run_until_finished(&self, timeout: Duration) -> u32 {
        for starts in 1..=10 {
            if self.run(&[], timeout) == Ending::Finished {
                return starts;
            }
        }
        panic!("crash-test child never finished in 10 starts");
    }

    /// Kills the child `kills` times, each after a delay drawn by `delay` (seeded by the
    /// caller). A child that finishes before its kill calls `fresh_start`, which checks the
    /// finished work and clears it so that later kills land mid-work again. Panics if the
    /// child keeps finishing first (200 starts).
    pub fn kill_repeatedly(
        &self,
        kills: u32,
        mut delay: impl FnMut() -> Duration,
        timeout: Duration,
        mut fresh_start: impl FnMut(),
    ) {
        let mut killed = 0;
        for _ in 0..200 {
            if killed == kills {
                return;
            }
            match self.run_and_kill_after(delay(), timeout) {
                Ending::Killed => killed += 1,
                Ending::Finished => fresh_start(),
                Ending::Aborted => panic!("crash-test child aborted"),
            }
        }
        panic!(
            "crash-test child keeps finishing before it can be killed ({killed} of {kills} kills)"
        );
    }
}

fn wait_bounded(mut child: Child, timeout: Duration) -> Ending {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("polling the child") {
            return classify(status, &mut child);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "crash-test child did not finish within {timeout:?}: {}",
                stderr_of(&mut child)
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn classify(status: ExitStatus, child: &mut Child) -> Ending {
    use std::os::unix::process::ExitStatusExt;
    match status.signal() {
        Some(libc_signal::KILL) => return Ending::Killed,
        Some(libc_signal::ABRT) => return Ending::Aborted,
        _ => {}
    }
    if status.success() {
        return Ending::Finished;
    }
    panic!(
        "crash-test child failed with {status}: {}",
        stderr_of(child)
    );
}

fn stderr_of(child: &mut Child) -> String {
    use std::io::Read;
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

/// Waits until `child` has made the file `path` (a child's way of saying it got somewhere).
/// Panics, with the child's stderr, if it exits first or `timeout` passes.
pub fn until_file(child: &mut Child, path: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(status) = child.try_wait().expect("polling the child") {
            panic!(
                "crash-test child exited ({status}) before it made {}: {}",
                path.display(),
                stderr_of(child)
            );
        }
        assert!(
            Instant::now() < deadline,
            "crash-test child did not make {} within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until `child` has stopped itself at its armed point (`KEEL_CRASH_SIGNAL=STOP`), as
/// `/proc` shows it. Panics, with the child's stderr, if it exits first or `timeout` passes.
pub fn until_stopped(child: &mut Child, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let stat = format!("/proc/{}/stat", child.id());
    loop {
        if let Some(status) = child.try_wait().expect("polling the child") {
            panic!(
                "crash-test child exited ({status}) before it stopped at its point: {}",
                stderr_of(child)
            );
        }
        // `pid (comm) state ...`: the state follows the last parenthesis.
        let text = std::fs::read_to_string(&stat).unwrap_or_default();
        let state = text
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim().chars().next());
        if state == Some('T') {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "crash-test child did not stop at its point within {timeout:?} (state {state:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Continues a child stopped at its point (SIGCONT) and waits, bounded by `timeout`, for
/// its end. A child that fails (other than by SIGKILL or SIGABRT) fails the test, with its
/// stderr.
pub fn continue_to_end(child: Child, timeout: Duration) -> Ending {
    use rustix::process::{kill_process, Pid, Signal};
    let pid = Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
    kill_process(pid, Signal::CONT).expect("SIGCONT to the crash-test child");
    wait_bounded(child, timeout)
}

/// The signal numbers the harness tells apart (Linux).
mod libc_signal {
    pub(super) const KILL: i32 = 9;
    pub(super) const ABRT: i32 = 6;
}

/// Path helper: `dir/name` as a string for the child's environment.
pub fn path_env(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

/// The runtime crash tests use, in the parent and in the child: two worker threads (the CI
/// machine's cores), timers and I/O enabled. In a child it also sends what sled and the
/// store's recovery say about damage to stderr, which the parent prints when the child fails:
/// a store that cannot open after a kill then says which of sled's checks refused it.
pub fn runtime() -> tokio::runtime::Runtime {
    if is_child() {
        // Few lines by design: the parent reads the child's stderr only once it has exited.
        let _ = tracing_subscriber::fmt()
            .with_env_filter("sled=warn,keel_engine::store::sled::recovery=warn")
            .with_writer(std::io::stderr)
            .try_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("building a tokio runtime")
}

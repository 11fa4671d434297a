//! The parent's side of `keel-bench workers`: starts the children, speaks their line
//! protocol (each says `ready`, is told `go`, says `done <steps>` and exits 0), and turns a
//! child that fails, says something else or falls silent into an error carrying the end of
//! its log.
//!
//! Each child's stdout is read by a thread of its own that forwards every line into one
//! channel, so that the parent waits for all children at once, with a deadline.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};

/// How long the children may take to open their engines (a fresh database's schema is
/// created by the first, under a lock the others wait for).
const READY_PATIENCE: Duration = Duration::from_secs(120);

/// How long the children may take to finish their runs: this, plus [`STEP_PATIENCE`] per
/// step (at least 100 steps/s, some 20 times slower than the server's baseline here).
const DONE_PATIENCE_BASE: Duration = Duration::from_secs(60);

/// See [`DONE_PATIENCE_BASE`].
const STEP_PATIENCE: Duration = Duration::from_millis(10);

/// How long a child may take to shut its engine down and exit after `done`.
const EXIT_PATIENCE: Duration = Duration::from_secs(60);

/// How many lines of a failed child's log an error shows.
const LOG_TAIL_LINES: usize = 30;

/// What one child is to do.
#[derive(Clone, Debug)]
pub(crate) struct ChildPlan {
    /// The engine's own data directory.
    pub dir: PathBuf,
    /// Its runs' id prefix, also its name in messages.
    pub prefix: String,
    /// How many runs it starts.
    pub runs: u32,
    /// How many no-op steps each run takes.
    pub steps: u32,
    /// Where its stderr goes.
    pub log: PathBuf,
}

/// The plans of `workers` children sharing `runs` runs of `steps` steps as evenly as they
/// can (the first `runs % workers` children take one more), with their data under `dir` and
/// their logs in `logs`, named after `label`.
pub(crate) fn plans(
    dir: &Path,
    logs: &Path,
    label: &str,
    workers: u32,
    runs: u32,
    steps: u32,
) -> Vec<ChildPlan> {
    (0..workers)
        .map(|i| ChildPlan {
            dir: dir.join(format!("worker-{i}")),
            prefix: format!("worker-{i}"),
            runs: runs / workers + u32::from(i < runs % workers),
            steps,
            log: logs.join(format!("{label}-worker-{i}.log")),
        })
        .collect()
}

/// Runs one child per plan on `database`: waits until all are ready, tells them to go, and
/// waits until each said `done` and exited 0. Returns the steps they reported and the time
/// from the first `go` until the last `done`.
pub(crate) fn drive(database: &str, plans: &[ChildPlan]) -> anyhow::Result<(u64, Duration)> {
    let (said, heard) = mpsc::channel();
    let mut workers = Vec::with_capacity(plans.len());
    for (index, plan) in plans.iter().enumerate() {
        workers.push(Worker::spawn(index, database, plan, said.clone())?);
    }
    drop(said);
    let ready = next_lines(&heard, &mut workers, "ready", READY_PATIENCE)?;
    for (worker, line) in workers.iter_mut().zip(ready) {
        if line != "ready" {
            return Err(worker.failure(&format!("said {line:?} instead of `ready`")));
        }
    }
    let started = Instant::now();
    for worker in &mut workers {
        worker.go()?;
    }
    let steps_total: u64 = plans
        .iter()
        .map(|p| u64::from(p.runs) * u64::from(p.steps))
        .sum();
    let patience = DONE_PATIENCE_BASE + STEP_PATIENCE * u32::try_from(steps_total)?;
    let done = next_lines(&heard, &mut workers, "done", patience)?;
    let wall = started.elapsed();
    let mut steps = 0;
    for ((worker, plan), line) in workers.iter_mut().zip(plans).zip(done) {
        let expected = u64::from(plan.runs) * u64::from(plan.steps);
        match line.strip_prefix("done ").map(str::parse::<u64>) {
            Some(Ok(n)) if n == expected => steps += n,
            _ => {
                let why = format!("said {line:?} instead of `done {expected}`");
                return Err(worker.failure(&why));
            }
        }
    }
    for worker in &mut workers {
        worker.exit()?;
    }
    Ok((steps, wall))
}

/// What a child's stdout brought: a line, or its end.
enum Said {
    Line(usize, String),
    Closed(usize),
}

/// Waits until every child has said one more line, and returns them in the children's
/// order. Fails on a child whose stdout ends first, or when `patience` runs out, naming what
/// it waited for.
fn next_lines(
    heard: &Receiver<Said>,
    workers: &mut [Worker],
    what: &str,
    patience: Duration,
) -> anyhow::Result<Vec<String>> {
    let deadline = Instant::now() + patience;
    let mut lines: Vec<Option<String>> = vec![None; workers.len()];
    while let Some(silent) = lines.iter().position(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match heard.recv_timeout(left) {
            Ok(Said::Line(i, line)) => {
                if let Some(earlier) = &lines[i] {
                    let why = format!("said {line:?} after {earlier:?}, before it was asked");
                    return Err(workers[i].failure(&why));
                }
                lines[i] = Some(line);
            }
            // The end of a child that already said its line is seen by the next phase.
            Ok(Said::Closed(i)) if lines[i].is_some() => {}
            Ok(Said::Closed(i)) => {
                return Err(workers[i].failure(&format!("exited before saying `{what}`")));
            }
            Err(RecvTimeoutError::Timeout) => {
                let count = lines.iter().filter(|line| line.is_none()).count();
                let why = format!(
                    "did not say `{what}` within {patience:?} ({count} of {} workers silent)",
                    workers.len()
                );
                return Err(workers[silent].failure(&why));
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(anyhow!(
                    "every child's output ended before each said `{what}`"
                ));
            }
        }
    }
    Ok(lines.into_iter().flatten().collect())
}

/// One child process; killed on drop, so that no error path leaves one behind.
struct Worker {
    /// Its number, from 0.
    index: usize,
    process: Child,
    stdin: ChildStdin,
    log: PathBuf,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

impl Worker {
    /// Starts `keel-bench workers-child` for `plan` on `database`, its stderr in the plan's
    /// log, and a thread that forwards its stdout's lines to `said`.
    fn spawn(
        index: usize,
        database: &str,
        plan: &ChildPlan,
        said: Sender<Said>,
    ) -> anyhow::Result<Worker> {
        let exe = std::env::current_exe().context("finding this binary")?;
        let log =
            File::create(&plan.log).with_context(|| format!("creating {}", plan.log.display()))?;
        let mut process = Command::new(exe)
            .arg("workers-child")
            .arg("--dir")
            .arg(&plan.dir)
            .args(["--prefix", &plan.prefix])
            .args(["--runs", &plan.runs.to_string()])
            .args(["--steps", &plan.steps.to_string()])
            .env(super::DATABASE_ENV, database)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting worker {index}"))?;
        let (Some(stdin), Some(stdout)) = (process.stdin.take(), process.stdout.take()) else {
            let _ = process.kill();
            let _ = process.wait();
            anyhow::bail!("worker {index} was started without its pipes");
        };
        let worker = Worker {
            index,
            process,
            stdin,
            log: plan.log.clone(),
        };
        std::thread::Builder::new()
            .name(format!("worker-{index}-stdout"))
            .spawn(move || forward(index, stdout, &said))
            .context("starting a thread to read a worker")?;
        Ok(worker)
    }

    /// Tells the child to start its runs.
    fn go(&mut self) -> anyhow::Result<()> {
        match writeln!(self.stdin, "go").and_then(|()| self.stdin.flush()) {
            Ok(()) => Ok(()),
            Err(error) => Err(self.failure(&format!("could not be told `go` ({error})"))),
        }
    }

    /// Waits until the child exited, and checks that it exited 0.
    fn exit(&mut self) -> anyhow::Result<()> {
        match self.status_within(EXIT_PATIENCE) {
            Some(status) if status.success() => Ok(()),
            Some(_) => Err(self.failure("failed after saying `done`")),
            None => Err(self.failure(&format!("did not exit within {EXIT_PATIENCE:?}"))),
        }
    }

    /// The child's exit status, once it exited, if that is within `patience`.
    fn status_within(&mut self, patience: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + patience;
        loop {
            match self.process.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The error for this child: `why`, its exit status (if it exits within a moment) and the
    /// end of its log.
    fn failure(&mut self, why: &str) -> anyhow::Error {
        let status = self
            .status_within(Duration::from_secs(2))
            .map_or_else(|| "still running".to_owned(), |status| status.to_string());
        anyhow!(
            "worker {} {why} ({status}); the end of its log {}:\n{}",
            self.index,
            self.log.display(),
            tail(&self.log, LOG_TAIL_LINES)
        )
    }
}

/// Sends every line of a child's stdout to `said`, then its end.
fn forward(index: usize, stdout: ChildStdout, said: &Sender<Said>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if said.send(Said::Line(index, line)).is_err() {
            return;
        }
    }
    let _ = said.send(Said::Closed(index));
}

/// The last `lines` lines of the file at `path`, or why there are none.
fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) if bytes.is_empty() => "(empty)".to_owned(),
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("(unreadable: {error})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs are shared out evenly, the remainder to the first children, and none is lost.
    #[test]
    fn plans_share_every_run() {
        let plans = plans(Path::new("/d"), Path::new("/l"), "m", 3, 10, 10);
        let runs: Vec<u32> = plans.iter().map(|p| p.runs).collect();
        assert_eq!(runs, [4, 3, 3]);
        let prefixes: Vec<&str> = plans.iter().map(|p| p.prefix.as_str()).collect();
        assert_eq!(prefixes, ["worker-0", "worker-1", "worker-2"]);
        assert_eq!(plans[2].log, Path::new("/l/m-worker-2.log"));
    }

    /// A log's tail is its last lines; an empty log says so.
    #[test]
    fn tails() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let path = dir.path().join("log");
        std::fs::write(&path, "").expect("writing");
        assert_eq!(tail(&path, 2), "(empty)");
        std::fs::write(&path, "a\nb\nc\n").expect("writing");
        assert_eq!(tail(&path, 2), "b\nc");
    }
}

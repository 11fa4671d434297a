//! The worker slots of the failover torture, each over its successive processes: this test
//! binary re-run as a child, its stdout and stderr appended to the slot's log
//! (`worker-N.log`), its stdin carrying how many runs are released (one number a line; its
//! end asks the worker to shut down).
//!
//! A slot's phases, and what moves it on:
//!
//! | phase     | event                                             | next                        |
//! |-----------|---------------------------------------------------|-----------------------------|
//! | `Down`    | its restart time comes                            | `Up` (a new process)        |
//! | `Up`      | SIGKILL ([`Workers::kill`])                       | `Down`                      |
//! | `Up`      | it exits with its lease lost                      | `Down` (noted as unplanned) |
//! | `Up`      | it exits otherwise                                | the test fails              |
//! | `Up`      | SIGSTOP ([`Workers::stop`])                       | `Stopped`                   |
//! | `Stopped` | its continue time comes                           | `Zombie` (SIGCONT)          |
//! | `Zombie`  | it exits with its lease lost                      | `Down`                      |
//! | `Zombie`  | it exits otherwise, or [`ZOMBIE_EXIT_MAX`] passes | the test fails              |
//!
//! The restart delays are drawn from the schedule's seeded generator, which the caller
//! passes in, so that one seed makes one schedule.

use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::Rng;
use rustix::process::{kill_process, Pid, Signal};

use super::{database, DIR_ENV, EFFECTS_ENV, EXIT_LINE, LEASE_LOST_EXIT, SLOT_ENV, URL_ENV};
use crate::crash::CHILD_ENV;
use crate::effects::Effect;

/// How long a continued worker may take to notice its lease is gone and exit.
pub const ZOMBIE_EXIT_MAX: Duration = Duration::from_secs(5);

/// How often the parent looks at its workers.
pub const TICK: Duration = Duration::from_millis(20);

/// How long the workers may take to shut down once their stdin ends.
const SHUTDOWN_MAX: Duration = Duration::from_secs(60);

/// One worker process the parent started.
#[derive(Debug)]
struct Process {
    child: Child,
    /// Where the parent writes how many runs are released; dropped to shut the worker down.
    stdin: Option<ChildStdin>,
    pid: u32,
    /// Where this process's lines begin in its slot's log.
    log_from: u64,
}

impl Drop for Process {
    /// A failing test leaves no worker behind (a stopped one dies of SIGKILL too).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the schedule has done to a worker slot.
#[derive(Debug)]
enum Phase {
    /// Running.
    Up,
    /// No process; one starts at `restart_at`.
    Down { restart_at: Instant },
    /// SIGSTOPped until `cont_at`; `stop` indexes [`Workers::stops`].
    Stopped { cont_at: Instant, stop: usize },
    /// SIGCONTed at `since`: it must exit, its lease lost, within [`ZOMBIE_EXIT_MAX`].
    Zombie { since: Instant, stop: usize },
}

/// One worker, over its successive processes.
#[derive(Debug)]
struct Slot {
    log: PathBuf,
    process: Option<Process>,
    phase: Phase,
    starts: u32,
    /// The engine's directory: with the host, the worker's name, which a worker opened on
    /// it takes over at once from an earlier one (superseding it).
    dir: PathBuf,
    /// Whether the next process opens in `dir` again instead of a fresh directory.
    in_place: bool,
}

/// A SIGSTOP/SIGCONT cycle.
#[derive(Debug)]
pub struct Stop {
    /// The stopped worker's id.
    pub worker: String,
    /// Its process.
    pub pid: u32,
    /// How many unfinished runs it owned when stopped.
    pub owned: usize,
    /// The database's clock just before the SIGCONT.
    pub cont_at: Option<String>,
    /// This machine's clock (`SystemTime`, microseconds since the epoch, as an effect's
    /// `at_us`) just before the SIGCONT.
    pub cont_at_us: u64,
    /// The effect log's length at the SIGCONT: what the zombie did after it follows.
    pub effects_from: u64,
    /// How long after the SIGCONT it exited.
    pub exited_after: Option<Duration>,
    /// Its log, from its start to its exit.
    pub log: String,
}

/// The worker slots, what was done to them, and how they ended.
#[derive(Debug)]
pub struct Workers {
    /// The test a worker runs: the test binary's `--exact` filter.
    test_name: String,
    /// The test's directory: the logs and the engines' directories.
    dir: PathBuf,
    /// The shared database.
    url: String,
    /// The effect log every worker appends to.
    effects: PathBuf,
    slots: Vec<Slot>,
    /// How many runs (the first ones by index) the workers may start.
    released: usize,
    stops: Vec<Stop>,
    /// Workers that lost their lease without being stopped (a starved machine), with why.
    unplanned: Vec<String>,
}

impl Workers {
    /// `count` slots, none running yet: each starts its first process at the first
    /// [`Workers::tend`]. Its processes run the test `test_name` of this binary, with the
    /// database at `url`, the effect log at `effects`, and their logs and engines' directories
    /// in `dir`.
    pub fn new(test_name: &str, count: usize, dir: &Path, url: &str, effects: &Path) -> Workers {
        let slots = (0..count)
            .map(|n| Slot {
                log: dir.join(format!("worker-{n}.log")),
                process: None,
                phase: Phase::Down {
                    restart_at: Instant::now(),
                },
                starts: 0,
                dir: PathBuf::new(),
                in_place: false,
            })
            .collect();
        Workers {
            test_name: test_name.into(),
            dir: dir.to_owned(),
            url: url.into(),
            effects: effects.to_owned(),
            slots,
            released: 0,
            stops: Vec::new(),
            unplanned: Vec::new(),
        }
    }

    /// How many runs are released.
    pub fn released(&self) -> usize {
        self.released
    }

    /// Every SIGSTOP/SIGCONT cycle so far.
    pub fn stops(&self) -> &[Stop] {
        &self.stops
    }

    /// Stop cycles whose worker has exited after its SIGCONT.
    pub fn finished_stops(&self) -> usize {
        self.stops
            .iter()
            .filter(|s| s.exited_after.is_some())
            .count()
    }

    /// Workers that lost their lease without being stopped, each as a sentence.
    pub fn unplanned(&self) -> &[String] {
        &self.unplanned
    }

    /// The slots whose worker is running.
    pub fn up(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|n| matches!(self.slots[*n].phase, Phase::Up))
            .collect()
    }

    /// Whether every slot's worker is running.
    pub fn all_up(&self) -> bool {
        self.slots.iter().all(|s| matches!(s.phase, Phase::Up))
    }

    /// Whether no worker is stopped or continued and not yet gone.
    pub fn nobody_stopped(&self) -> bool {
        self.slots
            .iter()
            .all(|s| !matches!(s.phase, Phase::Stopped { .. } | Phase::Zombie { .. }))
    }

    /// The pid of slot `n`'s process, if it has one.
    pub fn pid(&self, n: usize) -> Option<u32> {
        self.slots[n].process.as_ref().map(|p| p.pid)
    }

    /// Releases runs up to `released` and tells every worker (a dead one's pipe is ignored);
    /// fewer than already released is nothing.
    pub fn release(&mut self, released: usize) {
        if released <= self.released {
            return;
        }
        self.released = released;
        for process in self.slots.iter_mut().filter_map(|s| s.process.as_mut()) {
            if let Some(stdin) = &mut process.stdin {
                let _ = writeln!(stdin, "{released}");
            }
        }
    }

    /// Starts the process of slot `n`, appending to its log, and tells it what is released.
    fn spawn(&mut self, n: usize) {
        let slot = &mut self.slots[n];
        slot.starts += 1;
        if !std::mem::take(&mut slot.in_place) {
            slot.dir = self.dir.join(format!("worker-{n}.{}", slot.starts));
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&slot.log)
            .expect("the worker's log");
        writeln!(log, "--- worker {n}, start {} ---", slot.starts).unwrap();
        let log_from = log.metadata().unwrap().len();
        let mut child = Command::new(std::env::current_exe().expect("the test binary"))
            .args([
                &self.test_name,
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env(URL_ENV, &self.url)
            .env(DIR_ENV, &slot.dir)
            .env(EFFECTS_ENV, &self.effects)
            .env(SLOT_ENV, n.to_string())
            .stdin(Stdio::piped())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning a worker");
        let mut stdin = child.stdin.take();
        if let Some(stdin) = &mut stdin {
            let _ = writeln!(stdin, "{}", self.released);
        }
        let pid = child.id();
        slot.process = Some(Process {
            child,
            stdin,
            pid,
            log_from,
        });
        slot.phase = Phase::Up;
    }
}

/// In a worker: how many runs are released, as the parent writes it to the worker's stdin
/// ([`Workers::release`]), one number a line; the channel closes when stdin ends (the parent
/// asks the worker to shut down).
///
/// # Panics
/// On the reading thread, when a line is not a number.
pub fn released_from_stdin() -> tokio::sync::watch::Receiver<usize> {
    let (sender, receiver) = tokio::sync::watch::channel(0);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            sender.send_replace(line.trim().parse().expect("a number of released runs"));
        }
    });
    receiver
}

/// How long a slot stays empty after its process ended: 0.1-1 s, seeded.
fn restart_delay(rng: &mut StdRng) -> Duration {
    Duration::from_millis(rng.gen_range(100..1_000))
}

/// Sends `signal` to `pid`.
fn signal(pid: u32, signal: Signal) {
    let target = Pid::from_raw(pid as i32).expect("a worker's pid is positive");
    kill_process(target, signal)
        .unwrap_or_else(|e| panic!("signal {} to worker {pid}: {e}", signal.as_raw()));
}

/// The last `lines` lines of `path` from byte `from` on.
fn log_from(path: &Path, from: u64, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[(from as usize).min(text.len())..]).into_owned();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Workers {
    /// Follows every slot: restarts the dead when due, continues the stopped when due, and
    /// reaps what exited (a zombie must exit with its lease lost, others must not exit).
    pub async fn tend(&mut self, rng: &mut StdRng) {
        for n in 0..self.slots.len() {
            match self.slots[n].phase {
                Phase::Down { restart_at } if Instant::now() >= restart_at => self.spawn(n),
                Phase::Down { .. } => {}
                Phase::Up => self.reap_up(n, rng),
                Phase::Stopped { cont_at, stop } if Instant::now() >= cont_at => {
                    self.cont(n, stop).await;
                }
                Phase::Stopped { .. } => {}
                Phase::Zombie { since, stop } => self.reap_zombie(n, since, stop, rng),
            }
        }
    }

    /// A running worker that exited: its lease was lost although it was not stopped (a
    /// starved machine: noted, and it restarts), or it failed (the test fails).
    fn reap_up(&mut self, n: usize, rng: &mut StdRng) {
        let slot = &mut self.slots[n];
        let process = slot.process.as_mut().expect("a running worker's process");
        let Some(status) = process.child.try_wait().expect("polling a worker") else {
            return;
        };
        let log = log_from(&slot.log, process.log_from, 60);
        assert_eq!(
            status.code(),
            Some(LEASE_LOST_EXIT),
            "worker {n} (pid {}) exited unasked with {status}; its log:\n{log}",
            process.pid
        );
        let why = log.lines().find(|l| l.contains(EXIT_LINE)).unwrap_or("?");
        self.unplanned
            .push(format!("worker {n} pid {}: {why}", process.pid));
        slot.process = None;
        let restart_at = Instant::now() + restart_delay(rng);
        self.slots[n].phase = Phase::Down { restart_at };
    }

    /// SIGCONTs a stopped worker, noting the database's clock and the effect log's end first.
    async fn cont(&mut self, n: usize, stop: usize) {
        let now = database::now(&self.url).await;
        let effects_from = std::fs::metadata(&self.effects).map_or(0, |m| m.len());
        let record = &mut self.stops[stop];
        record.cont_at = Some(now);
        record.cont_at_us = crate::effects::now_us();
        record.effects_from = effects_from;
        signal(record.pid, Signal::CONT);
        self.slots[n].phase = Phase::Zombie {
            since: Instant::now(),
            stop,
        };
    }

    /// A continued worker must exit, with its lease lost, within [`ZOMBIE_EXIT_MAX`].
    fn reap_zombie(&mut self, n: usize, since: Instant, stop: usize, rng: &mut StdRng) {
        let slot = &mut self.slots[n];
        let process = slot.process.as_mut().expect("a zombie's process");
        let status = process.child.try_wait().expect("polling a worker");
        let log = || log_from(&slot.log, process.log_from, usize::MAX);
        let Some(status) = status else {
            assert!(
                since.elapsed() < ZOMBIE_EXIT_MAX,
                "worker {n} (pid {}) went on for {ZOMBIE_EXIT_MAX:?} after its SIGCONT, past its \
                 lease; its log:\n{}",
                process.pid,
                log()
            );
            return;
        };
        let record = &mut self.stops[stop];
        record.log = log();
        record.exited_after = Some(since.elapsed());
        assert_eq!(
            status.code(),
            Some(LEASE_LOST_EXIT),
            "worker {n} (pid {}), continued past its lease, exited with {status}; its log:\n{}",
            process.pid,
            record.log
        );
        slot.process = None;
        let restart_at = Instant::now() + restart_delay(rng);
        self.slots[n].phase = Phase::Down { restart_at };
    }
}

impl Workers {
    /// SIGSTOPs slot `n`'s running worker, registered as `worker` and owning `owned`
    /// unfinished runs, until [`Workers::tend`] continues it `cont_after` from now.
    ///
    /// # Panics
    /// When slot `n` has no process.
    pub fn stop(&mut self, n: usize, worker: String, owned: usize, cont_after: Duration) {
        let pid = self.pid(n).expect("a running worker");
        signal(pid, Signal::STOP);
        self.stops.push(Stop {
            worker,
            pid,
            owned,
            cont_at: None,
            cont_at_us: 0,
            effects_from: 0,
            exited_after: None,
            log: String::new(),
        });
        let cont_at = Instant::now() + cont_after;
        let stop = self.stops.len() - 1;
        self.slots[n].phase = Phase::Stopped { cont_at, stop };
    }

    /// SIGKILLs slot `n`'s running worker; its successor opens in its directory (superseding
    /// it at once) when `in_place`, else in a fresh one.
    ///
    /// # Panics
    /// When slot `n` has no process, or it had exited before the kill other than with its
    /// lease lost.
    pub fn kill(&mut self, n: usize, in_place: bool, rng: &mut StdRng) {
        let mut process = self.slots[n].process.take().expect("a running worker");
        let _ = process.child.kill();
        let status = process.child.wait().expect("reaping a killed worker");
        self.note_killed(n, &process, status);
        let restart_at = Instant::now() + restart_delay(rng);
        self.slots[n].phase = Phase::Down { restart_at };
        self.slots[n].in_place = in_place;
    }

    /// A killed worker died of the kill, or had exited just before it with its lease lost.
    fn note_killed(&mut self, n: usize, process: &Process, status: ExitStatus) {
        if status.signal() == Some(Signal::KILL.as_raw()) {
            return;
        }
        let log = log_from(&self.slots[n].log, process.log_from, 60);
        assert_eq!(
            status.code(),
            Some(LEASE_LOST_EXIT),
            "worker {n} (pid {}) exited unasked with {status}; its log:\n{log}",
            process.pid
        );
        self.unplanned.push(format!(
            "worker {n} pid {}: exited with its lease lost",
            process.pid
        ));
    }

    /// Waits until every slot is up (dead ones restarted, a zombie gone) and all `runs` runs
    /// exist and are terminal. After `max`, returns what is unfinished and where, with the
    /// counts (unfinished/created).
    pub async fn drain(
        &mut self,
        runs: usize,
        max: Duration,
        rng: &mut StdRng,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            self.tend(rng).await;
            let (open, created) = database::open_runs(&self.url).await;
            if self.all_up() && open == 0 && created == runs {
                return Ok(());
            }
            if started.elapsed() > max {
                let unfinished = database::unfinished_report(&self.url).await;
                return Err(format!(
                    "unfinished/created {open}/{created}:\n{unfinished}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Ends every worker's stdin: each shuts down, gives its runs up and exits 0.
    ///
    /// # Panics
    /// When a slot has no process, or its worker does not exit 0 within a minute.
    pub fn shut_down(&mut self) {
        for (n, slot) in self.slots.iter_mut().enumerate() {
            let mut process = slot
                .process
                .take()
                .expect("every worker is up after the drain");
            process.stdin = None;
            let deadline = Instant::now() + SHUTDOWN_MAX;
            let status = loop {
                if let Some(status) = process.child.try_wait().expect("polling a worker") {
                    break status;
                }
                assert!(
                    Instant::now() < deadline,
                    "worker {n} did not shut down in {SHUTDOWN_MAX:?}"
                );
                std::thread::sleep(TICK);
            };
            assert!(
                status.success(),
                "worker {n} shut down with {status}; its log:\n{}",
                log_from(&slot.log, process.log_from, 60)
            );
        }
    }
}

/// An effect a stopped worker made after its SIGCONT, and the stop.
#[derive(Debug)]
pub struct LateEffect {
    /// The effect.
    pub effect: Effect,
    /// The id of the worker that made it.
    pub worker: String,
    /// Whether the step had begun making it before the stop: its time (`at_us`, when the poll
    /// that wrote it began: [`crate::effects::PollClock`]) is before the SIGCONT, and the
    /// worker was stopped from the SIGSTOP until then, so the stop caught the step inside the
    /// poll that makes the effect, which runs on once continued.
    pub under_way: bool,
}

impl Workers {
    /// The effect log, split: the effects stopped workers made after their SIGCONT (by steps
    /// already running when they were stopped), and all the others.
    ///
    /// # Panics
    /// When a line of the log does not parse.
    pub fn split_effects(&self) -> (Vec<Effect>, Vec<LateEffect>) {
        let text = std::fs::read_to_string(&self.effects).unwrap_or_default();
        let (mut kept, mut late, mut offset) = (Vec::new(), Vec::new(), 0u64);
        for line in text.split_inclusive('\n') {
            let effect: Effect = serde_json::from_str(line.trim_end())
                .unwrap_or_else(|e| panic!("torn effect line {line:?}: {e}"));
            let stop = self
                .stops
                .iter()
                .find(|s| s.pid == effect.pid && s.cont_at.is_some() && offset >= s.effects_from);
            match stop {
                Some(stop) => late.push(LateEffect {
                    under_way: effect.at_us.is_some_and(|at| at < stop.cont_at_us),
                    effect,
                    worker: stop.worker.clone(),
                }),
                None => kept.push(effect),
            }
            offset += line.len() as u64;
        }
        (kept, late)
    }
}

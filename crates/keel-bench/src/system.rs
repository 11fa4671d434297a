//! What the benchmark reads about the machine: resident memory and CPU time from `/proc`
//! (the process's, its threads', and the whole machine's, with what the hypervisor stole), and
//! which filesystem holds the data (from `df`), since a figure from tmpfs would say nothing
//! about the disk.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use serde::Serialize;

/// The filesystem that holds a directory, as `df` reports it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Filesystem {
    /// The device (or `tmpfs`, `overlay`...).
    pub source: String,
    /// The filesystem type, e.g. `ext4`.
    pub kind: String,
    /// Where it is mounted.
    pub mounted_on: String,
}

impl Filesystem {
    /// Whether the filesystem lives in memory, so that a sync never reaches a disk.
    pub(crate) fn in_memory(&self) -> bool {
        matches!(self.kind.as_str(), "tmpfs" | "ramfs")
    }
}

impl std::fmt::Display for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} on {} ({})", self.kind, self.source, self.mounted_on)
    }
}

/// Runs `df -P -T` on `dir` and reads the filesystem's source, type and mount point.
pub(crate) fn filesystem(dir: &Path) -> anyhow::Result<Filesystem> {
    let output = Command::new("df")
        .args(["-P", "-T"])
        .arg(dir)
        .output()
        .context("running df")?;
    if !output.status.success() {
        bail!(
            "df {} failed: {}",
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Portable format: a header, then "source type blocks used available capacity mount".
    let line = stdout.lines().nth(1).context("df printed no filesystem")?;
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 7 {
        bail!("df printed an unexpected line: {line:?}");
    }
    Ok(Filesystem {
        source: fields[0].to_owned(),
        kind: fields[1].to_owned(),
        mounted_on: fields[6..].join(" "),
    })
}

/// The size of a memory page, from `getconf PAGESIZE` (4096 if that fails).
pub(crate) fn page_bytes() -> u64 {
    getconf("PAGESIZE").unwrap_or(4096)
}

/// A positive system variable, from `getconf NAME`.
fn getconf(name: &str) -> Option<u64> {
    Command::new("getconf")
        .arg(name)
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .filter(|&value| value > 0)
}

/// This process's resident set size, from the second field of `/proc/self/statm` (pages).
pub(crate) fn rss_bytes(page_bytes: u64) -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .with_context(|| format!("no resident page count in /proc/self/statm: {statm:?}"))?;
    Ok(pages * page_bytes)
}

/// CPU time this process has used so far (user and system, every thread), in seconds, from
/// `/proc/self/stat` (in USER_HZ ticks: 100 per second on Linux, so a reading is good to
/// 10 ms).
pub(crate) fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    let (_, ticks) = stat_cpu_ticks(&stat)?;
    Ok(ticks as f64 / 100.0)
}

/// The time a thread has run on a CPU, in nanoseconds: the first field of a
/// `/proc/PID/task/TID/schedstat` line (run time, wait time, time slices).
pub(crate) fn schedstat_run_ns(schedstat: &str) -> anyhow::Result<u64> {
    schedstat
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .with_context(|| format!("no run time in the schedstat line {schedstat:?}"))
}

/// The command name and the CPU ticks (user and system: fields 14 and 15) of a
/// `/proc/PID/stat` or `/proc/PID/task/TID/stat` line.
pub(crate) fn stat_cpu_ticks(stat: &str) -> anyhow::Result<(&str, u64)> {
    // Field 2, the command, is in parentheses and may hold spaces and parentheses: count
    // after its last `)`, where field 3 comes first.
    let (name, after_command) = stat
        .split_once('(')
        .and_then(|(_, rest)| rest.rsplit_once(')'))
        .with_context(|| format!("no command field in the stat line {stat:?}"))?;
    let fields: Vec<&str> = after_command.split_whitespace().collect();
    let ticks = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|field| field.parse().ok())
            .with_context(|| format!("no field {n} in the stat line {stat:?}"))
    };
    Ok((name, ticks(14)? + ticks(15)?))
}

/// The whole machine's CPU time so far, from the `cpu` line of `/proc/stat`, in clock ticks
/// (100 a second per CPU): busy, idle (idle or waiting for I/O) and stolen (the hypervisor
/// ran another virtual machine while this one had work to run). A figure bound by CPU may be
/// low in a stretch where much was stolen, whatever the engine did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MachineCpu {
    busy_ticks: u64,
    idle_ticks: u64,
    stolen_ticks: u64,
}

/// How the machine's CPU time was shared over a stretch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub(crate) struct CpuShares {
    /// The share stolen by the hypervisor of the time the machine had work to run (busy or
    /// stolen), from 0 to 1. An idle CPU has nothing to steal.
    pub stolen: f64,
    /// The share of all the machine's CPU time that was idle, or waiting for I/O.
    pub idle: f64,
    /// The clock ticks of every CPU over the stretch: each share is good to one of them.
    pub ticks: u64,
}

impl CpuShares {
    /// The fewest ticks a stretch is judged on: 20 is 0.1 s of two CPUs, where one stolen
    /// tick is 5% already.
    pub(crate) const TICKS_MIN: u64 = 20;

    /// Whether the stretch was long enough to judge its shares.
    pub(crate) fn judged(&self) -> bool {
        self.ticks >= CpuShares::TICKS_MIN
    }
}

/// A phase's clock: its wall time, and how the machine's CPU was shared meanwhile.
pub(crate) struct PhaseClock {
    started: Instant,
    machine: MachineCpu,
}

impl PhaseClock {
    /// Starts the clock.
    pub(crate) fn start() -> anyhow::Result<PhaseClock> {
        Ok(PhaseClock {
            machine: MachineCpu::now()?,
            started: Instant::now(),
        })
    }

    /// The seconds since the start, and the machine's CPU shares meanwhile.
    pub(crate) fn read(&self) -> anyhow::Result<(f64, CpuShares)> {
        let seconds = self.started.elapsed().as_secs_f64();
        Ok((seconds, MachineCpu::now()?.since(self.machine)))
    }
}

impl MachineCpu {
    /// The machine's CPU time now.
    pub(crate) fn now() -> anyhow::Result<MachineCpu> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        MachineCpu::parse(&stat)
    }

    /// Reads the first (`cpu `, every CPU's) line of a `/proc/stat` text: user, nice, system,
    /// idle, iowait, irq, softirq, steal (guest time is counted in user already).
    fn parse(stat: &str) -> anyhow::Result<MachineCpu> {
        let line = stat
            .lines()
            .find_map(|line| line.strip_prefix("cpu "))
            .context("no `cpu` line in /proc/stat")?;
        let ticks: Vec<u64> = line
            .split_whitespace()
            .take(8)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| {
                format!("a field of /proc/stat's `cpu` line is no number: {line:?}")
            })?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = ticks[..] else {
            bail!("/proc/stat's `cpu` line has fewer than 8 fields (steal among them): {line:?}");
        };
        Ok(MachineCpu {
            busy_ticks: user + nice + system + irq + softirq,
            idle_ticks: idle + iowait,
            stolen_ticks: steal,
        })
    }

    /// The shares of the machine's CPU time between `earlier` and this reading (zeros, and 0
    /// ticks, for a stretch shorter than a tick). The counters only grow, but iowait is
    /// known to step back: a counter lower than before counts as unchanged.
    pub(crate) fn since(self, earlier: MachineCpu) -> CpuShares {
        let busy = self.busy_ticks.saturating_sub(earlier.busy_ticks);
        let idle = self.idle_ticks.saturating_sub(earlier.idle_ticks);
        let stolen = self.stolen_ticks.saturating_sub(earlier.stolen_ticks);
        let share = |part: u64, whole: u64| match whole {
            0 => 0.0,
            whole => part as f64 / whole as f64,
        };
        CpuShares {
            stolen: share(stolen, busy + stolen),
            idle: share(idle, busy + idle + stolen),
            ticks: busy + idle + stolen,
        }
    }
}

/// A fresh data directory in `parent` (created if missing), named `prefix` and a random
/// suffix, removed when dropped.
pub(crate) fn fresh_data_dir(parent: &Path, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(parent)
        .with_context(|| format!("creating a data directory in {}", parent.display()))
}

/// This process's peak resident set size so far, from `VmHWM` in `/proc/self/status`.
pub(crate) fn peak_rss_bytes() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    Ok(vm_kib(&status, "VmHWM:")? * 1024)
}

/// The KiB of the line starting `field` (`VmRSS:`, `VmHWM:`) in a `/proc/PID/status` text.
pub(crate) fn vm_kib(status: &str, field: &str) -> anyhow::Result<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {field} line in /proc/PID/status"))
}

/// Clock ticks per second of `/proc`'s CPU times, from `getconf CLK_TCK` (100 if that fails).
pub(crate) fn clock_ticks_per_s() -> u64 {
    getconf("CLK_TCK").unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread's run time is the first field, in nanoseconds; this thread's own grows as
    /// it works, and a line without a number is refused, quoting it.
    #[test]
    fn schedstat_run_ns_reads_the_run_time() {
        assert_eq!(
            schedstat_run_ns("255749278 151417729 90\n").unwrap(),
            255_749_278
        );
        let own = || {
            let text = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap();
            schedstat_run_ns(&text).unwrap()
        };
        let before = own();
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_millis(30) {
            std::hint::black_box(started.elapsed());
        }
        assert!(own() > before, "30 ms of work did not move the run time");
        let error = schedstat_run_ns("").unwrap_err().to_string();
        assert!(error.contains("no run time"), "{error}");
    }

    /// `/proc/stat`'s first line is read as busy, idle (with iowait) and stolen ticks, and
    /// the shares of a stretch come from two readings; a line without steal is refused.
    #[test]
    fn machine_cpu_reads_the_stolen_share() {
        let earlier = MachineCpu::parse(
            "cpu  100 10 50 800 40 5 5 0 0 0\ncpu0 50 5 25 400 20 2 3 0 0 0\nintr 1\n",
        )
        .unwrap();
        // Guest time (9, 3) is counted in user's already.
        let later = MachineCpu::parse("cpu  160 13 70 820 50 7 11 40 9 3\n").unwrap();
        let shares = later.since(earlier);
        // Busy 60 + 3 + 20 + 2 + 6 = 91, idle 20 + 10 = 30, stolen 40.
        assert!((shares.stolen - 40.0 / 131.0).abs() < 1e-9, "{shares:?}");
        assert!((shares.idle - 30.0 / 161.0).abs() < 1e-9, "{shares:?}");
        assert_eq!(shares.ticks, 161);
        assert!(shares.judged());
        assert_eq!(later.since(later), CpuShares::default());
        assert!(!later.since(later).judged());
        let error = MachineCpu::parse("cpu  1 2 3 4\n").unwrap_err().to_string();
        assert!(error.contains("fewer than 8 fields"), "{error}");
        let error = MachineCpu::parse("intr 1\n").unwrap_err().to_string();
        assert!(error.contains("no `cpu` line"), "{error}");
        MachineCpu::now().unwrap();
    }

    /// A thread's name may hold spaces and parentheses: the ticks are counted after the last
    /// `)`, and a line without the fields is refused, quoting it.
    #[test]
    fn stat_cpu_ticks_reads_the_name_and_user_plus_system_ticks() {
        let line = "4242 (log (flusher) 2) S 1 4242 4242 0 -1 4194368 120 0 0 0 \
                    37 5 0 0 20 0 9 0 1234 5678 90 18446744073709551615";
        assert_eq!(stat_cpu_ticks(line).unwrap(), ("log (flusher) 2", 42));
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let (name, _) = stat_cpu_ticks(&own).unwrap();
        assert!(!name.is_empty());
        let error = stat_cpu_ticks("4242 (short) S 1 2")
            .unwrap_err()
            .to_string();
        assert!(error.contains("no field 14"), "{error}");
        assert!(error.contains("(short)"), "{error}");
    }
}

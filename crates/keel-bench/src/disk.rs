//! `keel-bench disk`: what one commit could cost on this disk if the log it syncs never grew.
//!
//! The baseline appends 200 bytes and syncs them with `fdatasync`; each of its syncs also
//! writes the file's new size (on ext4 without a journal, the inode, synchronously). sled's
//! log grows the same way. A log written into space written beforehand (a Keel log with
//! pre-zeroed segments, say) would sync the data and the device cache only. This measures
//! both on the same disk, alternating, so that the ceiling such a log could reach for one
//! sequential run (issue 28, item 4) is a measured ratio, not an argument.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::measure;

/// Each kind of write stops after this long or [`WRITES_MAX`] writes, as the baseline does.
const DURATION: Duration = Duration::from_secs(3);
const WRITES_MAX: u32 = 2_000;
const RECORD_BYTES: usize = 200;

/// One round: the baseline and the overwrite, one after the other.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DiskRound {
    /// 200-byte appends + `fdatasync`, per second (the benchmarks' baseline).
    pub append_per_s: f64,
    /// 200-byte writes into space written and synced beforehand + `fdatasync`, per second.
    pub overwrite_per_s: f64,
}

/// Every round.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct DiskReport {
    pub rounds: Vec<DiskRound>,
}

/// Measures `rounds` rounds in `dir`.
pub(crate) fn run(dir: &Path, rounds: u32) -> anyhow::Result<DiskReport> {
    let mut report = DiskReport { rounds: Vec::new() };
    for round in 0..rounds {
        let append_per_s = measure::baseline(dir, &format!("disk-append-{round}"))?;
        let overwrite_per_s = overwrite(dir, &format!("disk-overwrite-{round}"))?;
        eprintln!(
            "round {}: append {append_per_s:.0}/s, overwrite {overwrite_per_s:.0}/s",
            round + 1
        );
        report.rounds.push(DiskRound {
            append_per_s,
            overwrite_per_s,
        });
    }
    Ok(report)
}

/// Writes [`WRITES_MAX`] records' worth of zeros and syncs them (size and all), then
/// overwrites the records in order, each followed by `fdatasync`. Returns writes/s.
fn overwrite(dir: &Path, name: &str) -> anyhow::Result<f64> {
    let path = dir.join(name);
    let mut file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(&vec![0; RECORD_BYTES * WRITES_MAX as usize])?;
    file.sync_all()?;
    let record = [b'x'; RECORD_BYTES];
    let started = Instant::now();
    let mut writes = 0u32;
    while writes < WRITES_MAX && started.elapsed() < DURATION {
        file.write_all_at(&record, u64::from(writes) * RECORD_BYTES as u64)?;
        file.sync_data()?;
        writes += 1;
    }
    let rate = f64::from(writes) / started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

impl DiskReport {
    pub(crate) fn table(&self) -> String {
        let mut out = String::from(
            "200-byte writes, each followed by fdatasync, on the same disk\n\n\
             | round | append (baseline), per s | into written space, per s | ratio |\n\
             |---|---|---|---|\n",
        );
        for (i, round) in self.rounds.iter().enumerate() {
            out += &format!(
                "| {} | {:.0} | {:.0} | {:.2}x |\n",
                i + 1,
                round.append_per_s,
                round.overwrite_per_s,
                round.overwrite_per_s / round.append_per_s
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_measures_both_writes_and_leaves_no_file_behind() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let report = run(dir.path(), 1).expect("the round runs");
        assert_eq!(report.rounds.len(), 1);
        let round = &report.rounds[0];
        assert!(round.append_per_s > 0.0 && round.append_per_s.is_finite());
        assert!(round.overwrite_per_s > 0.0 && round.overwrite_per_s.is_finite());
        let left: Vec<_> = std::fs::read_dir(dir.path()).expect("readable").collect();
        assert!(left.is_empty(), "files left behind: {left:?}");
        assert!(report.table().contains("| 1 |"));
    }
}

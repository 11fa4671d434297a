//! The report: every figure with its unit, its ratio to the baseline measured in the same run,
//! and its target; printed as a table, or as one JSON object.

use serde::Serialize;

use crate::system::{CpuShares, Filesystem};

/// The baseline: 200-byte appends with one `fdatasync` each, per second (sled), or
/// single-row INSERTs with one COMMIT each (PostgreSQL).
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Baseline {
    /// What one baseline operation is.
    pub what: &'static str,
    /// The baseline operations' name, plural ("appends", "commits").
    pub unit: &'static str,
    /// Their rate's unit ("appends/s", "commits/s").
    pub unit_per_s: &'static str,
    /// Measured first.
    pub before_per_s: f64,
    /// Measured last.
    pub after_per_s: f64,
    /// The mean of both: what every ratio is relative to.
    pub mean_per_s: f64,
    /// |before - after| / mean: how far the disk's rate moved during the run, and so roughly
    /// how uncertain every ratio is.
    pub spread: f64,
}

impl Baseline {
    /// The baseline from its two measurements.
    pub(crate) fn new(before_per_s: f64, after_per_s: f64) -> Baseline {
        let mean_per_s = (before_per_s + after_per_s) / 2.0;
        Baseline {
            what: "200 bytes + fdatasync each",
            unit: "appends",
            unit_per_s: "appends/s",
            before_per_s,
            after_per_s,
            mean_per_s,
            spread: (before_per_s - after_per_s).abs() / mean_per_s,
        }
    }

    /// The database's baseline from its two measurements.
    pub(crate) fn database(before_per_s: f64, after_per_s: f64) -> Baseline {
        Baseline {
            what: DATABASE_BASELINE,
            unit: "commits",
            unit_per_s: "commits/s",
            ..Baseline::new(before_per_s, after_per_s)
        }
    }
}

/// What one operation of the database's baseline is.
pub(crate) const DATABASE_BASELINE: &str =
    "a 200-byte single-row INSERT + COMMIT each, one connection";

/// Above this spread between the two baselines the table warns that the ratios are uncertain.
const SPREAD_WARNING: f64 = 0.25;

/// Above this share of the machine's CPU stolen by the hypervisor during a phase, the table
/// warns that the phase's figure may be low.
const STOLEN_WARNING: f64 = 0.05;

/// How the machine's CPU was shared during one phase of the benchmark.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct PhaseCpu {
    /// The phase: `sequential`, `fan-out`, `concurrent`, `starts`, `events`.
    pub phase: &'static str,
    /// How the machine's CPU was shared while the phase was timed.
    #[serde(flatten)]
    pub shares: CpuShares,
}

/// One line of the report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Figure {
    /// What was measured.
    pub name: String,
    /// The measured value, in `unit`.
    pub value: f64,
    /// The unit of `value`.
    pub unit: &'static str,
    /// For a rate: value / baseline appends/s. For a duration: value x baseline appends/s,
    /// that is, how many baseline appends (each with its fdatasync) the disk did in that time.
    /// None where the disk does not matter (memory).
    pub ratio_to_baseline: Option<f64>,
    /// The target, in words, if there is one.
    pub target: Option<String>,
    /// Whether the target is met, if there is one.
    pub met: Option<bool>,
    #[serde(skip)]
    decimals: usize,
    #[serde(skip)]
    kind: Kind,
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Rate,
    /// A duration, with the baseline's unit it is expressed in.
    Duration(&'static str),
    Size,
}

impl Figure {
    /// A rate, compared with the baseline by division; `ratio_min` is its target, if any.
    pub(crate) fn rate(
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        baseline: &Baseline,
        ratio_min: Option<f64>,
    ) -> Figure {
        let ratio = value / baseline.mean_per_s;
        Figure {
            name: name.into(),
            value,
            unit,
            ratio_to_baseline: Some(ratio),
            target: ratio_min.map(|min| format!(">= {min}x baseline")),
            met: ratio_min.map(|min| ratio >= min),
            decimals: 0,
            kind: Kind::Rate,
        }
    }

    /// A duration in seconds, expressed in baseline appends; `seconds_max` is its target
    /// (strictly below), if any.
    pub(crate) fn duration(
        name: impl Into<String>,
        seconds: f64,
        baseline: &Baseline,
        seconds_max: Option<f64>,
    ) -> Figure {
        Figure {
            name: name.into(),
            value: seconds,
            unit: "s",
            ratio_to_baseline: Some(seconds * baseline.mean_per_s),
            target: seconds_max.map(|max| format!("< {max} s")),
            met: seconds_max.map(|max| seconds < max),
            decimals: 3,
            kind: Kind::Duration(baseline.unit),
        }
    }

    /// A size in `unit` (bytes or MiB), or a CPU cost (us), which the disk does not
    /// influence; `max` is its target (strictly below), if any.
    pub(crate) fn size(
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        max: Option<f64>,
    ) -> Figure {
        Figure {
            name: name.into(),
            value,
            unit,
            ratio_to_baseline: None,
            target: max.map(|max| format!("< {max} {unit}")),
            met: max.map(|max| value < max),
            decimals: if unit == "bytes" { 0 } else { 1 },
            kind: Kind::Size,
        }
    }

    /// A size or amount whose target `max` it may reach (`<=`).
    pub(crate) fn size_at_most(
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        max: f64,
    ) -> Figure {
        Figure {
            target: Some(format!("<= {max} {unit}")),
            met: Some(value <= max),
            ..Figure::size(name, value, unit, None)
        }
    }

    fn ratio_text(&self) -> String {
        match (self.kind, self.ratio_to_baseline) {
            (Kind::Rate, Some(ratio)) => format!("{ratio:.2}x"),
            (Kind::Duration(unit), Some(count)) => format!("{count:.0} {unit}"),
            (Kind::Rate | Kind::Duration(_) | Kind::Size, _) => String::new(),
        }
    }
}

/// Everything one run of the benchmark found.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    /// The directory the data lived in (removed at the end).
    pub dir: String,
    /// The filesystem holding it.
    pub filesystem: Filesystem,
    /// The store measured: sled, or PostgreSQL on a named server.
    pub store: String,
    /// The durability every engine ran at.
    pub durability: &'static str,
    /// Whether the reduced `--quick` sizes were used (the targets are set for the full ones).
    pub quick: bool,
    /// The baseline every ratio is relative to.
    pub baseline: Baseline,
    /// The figures, in the order measured or derived.
    pub figures: Vec<Figure>,
    /// How the machine's CPU was shared during each phase bound by CPU: the rates of a
    /// phase the hypervisor took much from are low in this run.
    pub machine_cpu: Vec<PhaseCpu>,
}

impl Report {
    /// The report as an aligned Markdown table, preceded by what it was measured on.
    pub(crate) fn table(&self) -> String {
        let mut out = self.preamble();
        out.push('\n');
        out.push_str(&self.figure_table());
        out.push_str(
            "\nratio to baseline: a rate divided by the baseline rate; a duration times the \
             baseline rate (how many baseline operations were done meanwhile).\n",
        );
        out
    }

    /// What the figures were measured on: the data's filesystem, the durability, the baseline
    /// (with a warning when it moved), and whether the sizes were the quick ones.
    fn preamble(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!("data: {} on {}\n", self.dir, self.filesystem));
        out.push_str(&format!("store: {}\n", self.store));
        out.push_str(&format!("durability: {}\n", self.durability));
        out.push_str(&format!(
            "baseline: {:.0} {}/s (before {:.0}, after {:.0}), {}\n",
            self.baseline.mean_per_s,
            self.baseline.unit,
            self.baseline.before_per_s,
            self.baseline.after_per_s,
            self.baseline.what
        ));
        if self.baseline.spread > SPREAD_WARNING {
            out.push_str(&format!(
                "warning: the two baselines differ by {:.0}%: the disk's rate moved during the \
                 run, so every ratio is uncertain by about as much; run again\n",
                self.baseline.spread * 100.0
            ));
        }
        out.push_str(&self.machine_cpu_lines());
        if self.quick {
            out.push_str("quick sizes: the targets are set for the full sizes\n");
        }
        out
    }

    /// The CPU stolen from the machine in each phase, with a warning for the phases where it
    /// was more than [`STOLEN_WARNING`] (of a phase too short to judge, none).
    fn machine_cpu_lines(&self) -> String {
        if self.machine_cpu.is_empty() {
            return String::new();
        }
        let percent = |share: f64| format!("{:.0}%", share * 100.0);
        let shares: Vec<String> = self
            .machine_cpu
            .iter()
            .map(|p| match p.shares.judged() {
                true => format!(
                    "{} {} ({} idle)",
                    p.phase,
                    percent(p.shares.stolen),
                    percent(p.shares.idle)
                ),
                false => format!("{} too short to tell", p.phase),
            })
            .collect();
        let mut out = format!(
            "CPU stolen by the hypervisor (of the time the machine had work): {}\n",
            shares.join(", ")
        );
        let stolen: Vec<String> = self
            .machine_cpu
            .iter()
            .filter(|p| p.shares.judged() && p.shares.stolen > STOLEN_WARNING)
            .map(|p| format!("{} ({})", p.phase, percent(p.shares.stolen)))
            .collect();
        if !stolen.is_empty() {
            out.push_str(&format!(
                "warning: the hypervisor gave much of this machine's CPU to others during {}: \
                 those figures may be low in this run; run again\n",
                stolen.join(", ")
            ));
        }
        out
    }

    /// The figures as a Markdown table.
    fn figure_table(&self) -> String {
        let header = [
            "figure",
            "value",
            "unit",
            "ratio to baseline",
            "target",
            "met",
        ];
        let rows: Vec<[String; 6]> = self.figures.iter().map(Figure::cells).collect();
        // Numbers right-aligned, words left-aligned.
        markdown_table(header, &rows, &[1, 3])
    }
}

/// A Markdown table, each column as wide as its widest cell; the columns numbered in
/// `right_aligned` (from 0) aligned right, the others left.
pub(crate) fn markdown_table<const N: usize>(
    header: [&str; N],
    rows: &[[String; N]],
    right_aligned: &[usize],
) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(column, (cell, width))| {
                if right_aligned.contains(&column) {
                    format!("{cell:>width$}")
                } else {
                    format!("{cell:<width$}")
                }
            })
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(&header.map(str::to_owned));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&format!("|-{}-|\n", rule.join("-|-")));
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

impl Figure {
    /// The figure's row of the table: name, value, unit, ratio, target and whether it is met.
    fn cells(&self) -> [String; 6] {
        [
            self.name.clone(),
            format!("{:.*}", self.decimals, self.value),
            self.unit.to_owned(),
            self.ratio_text(),
            self.target.clone().unwrap_or_default(),
            self.met
                .map(|met| if met { "yes" } else { "NO" })
                .unwrap_or_default()
                .to_owned(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(before_per_s: f64, after_per_s: f64) -> Report {
        let baseline = Baseline::new(before_per_s, after_per_s);
        Report {
            dir: "/data".into(),
            filesystem: Filesystem {
                source: "/dev/vda".into(),
                kind: "ext4".into(),
                mounted_on: "/".into(),
            },
            store: "sled (embedded)".into(),
            durability: "PowerLoss (default)",
            quick: false,
            baseline,
            figures: vec![
                Figure::rate("steps", 1500.0, "steps/s", &baseline, Some(0.6)),
                Figure::duration("open", 0.5, &baseline, Some(2.0)),
                Figure::size("memory", 20_000.0, "bytes", Some(10_240.0)),
            ],
            machine_cpu: vec![PhaseCpu {
                phase: "sequential",
                shares: CpuShares {
                    stolen: 0.01,
                    idle: 0.5,
                    ticks: 400,
                },
            }],
        }
    }

    /// Rates are divided by the baseline, durations multiplied by it, and targets judged.
    #[test]
    fn ratios_and_targets() {
        let report = report(2000.0, 2000.0);
        let [steps, open, memory] = &report.figures[..] else {
            panic!("three figures expected");
        };
        assert_eq!(steps.ratio_to_baseline, Some(0.75));
        assert_eq!(steps.met, Some(true));
        assert_eq!(open.ratio_to_baseline, Some(1000.0));
        assert_eq!(open.met, Some(true));
        assert_eq!(memory.ratio_to_baseline, None);
        assert_eq!(memory.met, Some(false));
        let table = report.table();
        assert!(table.contains("0.75x"), "{table}");
        assert!(table.contains("1000 appends"), "{table}");
        assert!(!table.contains("warning"), "{table}");
    }

    /// Baselines far apart make the table warn that the ratios are uncertain.
    #[test]
    fn spread_baselines_warn() {
        let table = report(1000.0, 2000.0).table();
        assert!(table.contains("differ by 67%"), "{table}");
    }

    /// Each phase's stolen CPU is listed; a phase with more than 5% stolen is named in a
    /// warning, one with less is not, nor one too short to judge.
    #[test]
    fn stolen_cpu_warns() {
        let mut report = report(2000.0, 2000.0);
        let table = report.table();
        assert!(table.contains("work): sequential 1% (50% idle)"), "{table}");
        assert!(!table.contains("warning"), "{table}");
        let phase = |phase, stolen, ticks| PhaseCpu {
            phase,
            shares: CpuShares {
                stolen,
                idle: 0.02,
                ticks,
            },
        };
        report.machine_cpu.push(phase("starts", 0.18, 40));
        report.machine_cpu.push(phase("events", 0.5, 10));
        let table = report.table();
        assert!(
            table.contains("during starts (18%): those figures may be low"),
            "{table}"
        );
        assert!(table.contains("events too short to tell"), "{table}");
        assert!(!table.contains("during sequential"), "{table}");
        assert!(!table.contains("events (50%)"), "{table}");
    }

    /// A target a size may reach is met at it, and printed as such.
    #[test]
    fn a_size_may_reach_its_most() {
        let at = Figure::size_at_most("memory", 1024.0, "bytes", 1024.0);
        assert_eq!(
            (at.met, at.target.as_deref()),
            (Some(true), Some("<= 1024 bytes"))
        );
        let over = Figure::size_at_most("memory", 1024.5, "bytes", 1024.0);
        assert_eq!(over.met, Some(false));
    }

    /// A database's baseline is counted in commits, in its line and in every duration.
    #[test]
    fn a_database_baseline_counts_commits() {
        let baseline = Baseline::database(400.0, 400.0);
        let mut report = report(400.0, 400.0);
        report.baseline = baseline;
        report.figures = vec![Figure::duration("open", 0.5, &baseline, None)];
        let table = report.table();
        assert!(table.contains("baseline: 400 commits/s"), "{table}");
        assert!(table.contains("INSERT + COMMIT"), "{table}");
        assert!(table.contains("200 commits"), "{table}");
    }
}

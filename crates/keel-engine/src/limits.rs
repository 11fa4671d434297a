//! Every hard limit of the engine, in one place, with the relations between them checked at
//! compile time. Going past a limit is an error that names the limit, never a truncation.

use std::time::Duration;

/// Longest run id, in bytes.
pub const RUN_ID_LEN_MAX: usize = 128;

/// Largest serialised workflow input, in bytes.
pub const INPUT_BYTES_MAX: usize = 48 * 1024;

/// Largest serialised workflow output or error, in bytes.
pub const OUTPUT_BYTES_MAX: usize = 48 * 1024;

/// Largest serialised step argument, in bytes.
pub const STEP_ARGUMENT_BYTES_MAX: usize = 48 * 1024;

/// Largest serialised step output, in bytes.
pub const STEP_OUTPUT_BYTES_MAX: usize = 48 * 1024;

/// Largest error message kept in the journal, in bytes (longer ones are cut at a char
/// boundary and marked, because an error text is diagnostic, not data).
pub const ERROR_MESSAGE_BYTES_MAX: usize = 4 * 1024;

/// Largest serialised event payload ([`crate::Engine::send`]) or published value
/// ([`crate::Ctx::publish`]), in bytes.
pub const EVENT_PAYLOAD_BYTES_MAX: usize = 48 * 1024;

/// Most events waiting in one run's mailbox (delivered, not yet received); a send past it
/// is refused, and nothing is stored.
pub const MAILBOX_EVENTS_MAX: u32 = 1000;

/// Longest event or published value name, in bytes (ASCII letters, digits, `.`, `_`, `-`).
pub const EVENT_NAME_LEN_MAX: usize = 64;

/// Longest event id, in bytes (printable ASCII, no spaces).
pub const EVENT_ID_LEN_MAX: usize = 128;

/// Most names one receive takes an event of.
pub const RECEIVE_NAMES_MAX: usize = 16;

/// Most operations (steps, timers) one run may perform.
pub const STEPS_PER_RUN_MAX: u32 = 100_000;

/// Most branches of one parallel fan-out (`Ctx::join`); each branch is one operation of the
/// run, so a run's fan-outs also count against [`STEPS_PER_RUN_MAX`].
pub const FAN_OUT_MAX: u32 = 10_000;

/// Most child runs one run may start (`Ctx::child`, `Ctx::children`); each is also one
/// operation of the parent, and a fan-out of children is bounded by [`FAN_OUT_MAX`].
pub const CHILDREN_PER_RUN_MAX: u32 = 10_000;

/// Most journal entries one run may hold (every attempt and compensation adds entries).
pub const JOURNAL_ENTRIES_PER_RUN_MAX: u32 = 1_000_000;

/// Most attempts any retry policy may allow for one step.
pub const ATTEMPTS_MAX: u32 = 10_000;

/// Most runs one engine drives at once (the configurable limit may be lower).
pub const CONCURRENT_RUNS_MAX: usize = 1_000_000;

/// The least memory `EngineBuilder::sled_cache_bytes` gives sled's cache (a smaller bound is
/// raised to it): below a few pages per run loaded at once, every step reads its pages
/// from the log again.
pub const SLED_CACHE_BYTES_MIN: u64 = 8 * 1024 * 1024;

/// The bound on sled's cache when `EngineBuilder::sled_cache_bytes` is not called. sled's own
/// default (1 GiB) kept every page a run read or wrote, so a parked run's memory was mostly
/// sled's copy of what it wrote: about 1,230 bytes of RSS per run asleep at 100,000 runs,
/// 970 - 1,000 with 32 MiB, at the same CPU per step (docs/benchmarks.md, "A parked run's
/// memory: sled's cache and the allocator"). The cache takes more memory than its bound:
/// sled counts a page by its size on disk (a decoded node is larger, and a page stored as a
/// blob counts a few bytes), and it counts accesses in batches.
pub const SLED_CACHE_BYTES_DEFAULT: u64 = 32 * 1024 * 1024;

/// Loads in a row, each ended by the process dying before the run showed it survives being
/// driven, after which a run is poisoned (suspended) instead of driven again (`poison.rs`).
pub const POISON_LOADS_DEFAULT: u32 = 5;

/// Longest time opening a store waits for a lock that a closing engine is still releasing,
/// before reporting the directory locked by another process.
pub const OPEN_LOCK_WAIT_MAX: Duration = Duration::from_secs(1);

/// Longest delay a retry policy may ask for between two attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(24 * 3600);

/// Largest encoded journal entry. An entry holds one argument or one output (never both) or
/// one error, plus a few fields.
pub const ENTRY_BYTES_MAX: usize = max(STEP_ARGUMENT_BYTES_MAX, STEP_OUTPUT_BYTES_MAX) + 8 * 1024;

/// Largest encoded journal entry of a status transition: the entry and the run record's new
/// state (output and error; see `store/sled/mod.rs`).
pub const TRANSITION_ENTRY_BYTES_MAX: usize =
    ENTRY_BYTES_MAX + OUTPUT_BYTES_MAX + ERROR_MESSAGE_BYTES_MAX + 1024;

/// Largest encoded run record: input, output and error, plus a few fields.
pub const RUN_RECORD_BYTES_MAX: usize =
    INPUT_BYTES_MAX + OUTPUT_BYTES_MAX + ERROR_MESSAGE_BYTES_MAX + 8 * 1024;

/// Significant figures of the latency histogram of each operation: its percentiles are within
/// 0.1% (a bucket is at most 1/1024 of its values wide).
pub const LATENCY_SIGNIFICANT_FIGURES: u8 = 3;

/// Longest duration the latency histogram tells apart, in microseconds (one day): a longer one
/// is counted as this long there (the exact max is kept beside it).
pub const LATENCY_TRACKED_US_MAX: u64 = 86_400 * 1_000_000;

/// Counters of the latency histogram, as `hdrhistogram` lays them out for 1 us ..=
/// [`LATENCY_TRACKED_US_MAX`] at [`LATENCY_SIGNIFICANT_FIGURES`]: half-buckets of 1,024
/// counters (2,048 values at unit resolution make 3 significant figures), one more than the
/// doublings of 2,048 it takes to pass the max (27). A unit test checks it against the crate.
pub const LATENCY_HISTOGRAM_COUNTERS: usize = {
    let sub_buckets: u64 = 2048;
    let mut buckets = 1;
    let mut smallest_untracked = sub_buckets;
    while smallest_untracked <= LATENCY_TRACKED_US_MAX {
        smallest_untracked <<= 1;
        buckets += 1;
    }
    (buckets + 1) * (sub_buckets as usize / 2)
};

/// Worst samples kept per operation, with their run.
pub const LATENCY_OUTLIERS_KEPT: usize = 10;

/// How often changed latency statistics are written (a crash loses at most this much).
pub const STATS_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Largest encoded statistics record of one operation: the histogram's V2 encoding (a 40-byte
/// header and at most 9 bytes per counter, a count's zigzag LEB128) in base64, the outliers (a
/// run id and two numbers each), and a few fields (two u128 sums of at most 39 digits among
/// them). That is 344,120 bytes for the histogram, past sled's blob threshold: a record gets
/// past it only when most of its 28,672 counters hold more than 2^20 executions each (four
/// bytes or more; a record of a few thousand distinct durations is a few kilobytes), and sled
/// keeps such a record in a blob file, which sled syncs as it writes it.
pub const STATS_RECORD_BYTES_MAX: usize = (40 + LATENCY_HISTOGRAM_COUNTERS * 9).div_ceil(3) * 4
    + LATENCY_OUTLIERS_KEPT * (RUN_ID_LEN_MAX + 64)
    + 1024;

/// The length in bytes of `value`'s JSON text (compact, as stored), which the limits above
/// bound: counted as it is written, without building the text.
pub(crate) fn json_bytes(value: &serde_json::Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    // A `Value` always serialises (its map keys are strings), and the counter never fails.
    serde_json::to_writer(&mut counter, value).expect("a JSON value serialises");
    counter.0
}

/// Most run records in one page of [`crate::Engine::list_page`].
pub const RUNS_PAGE_MAX: usize = 1000;

/// Most runs one batch call acts on (`Engine::batch`); a larger batch goes on with the
/// call's continuation.
pub const BATCH_RUNS_MAX: usize = 1000;

/// Slots in a row a rate limiter gives probes ([`crate::Priority::Probe`]) while calls
/// ([`crate::Priority::Call`]) wait.
pub const PROBES_IN_A_ROW_MAX: u32 = 2;

/// Past its deadline, a wait whose polls got this many errors in a row (no answer either way),
/// over at least [`UNANSWERED_SPAN_MIN`], ends as failed with the last error, so a probe that
/// always fails cannot wait forever.
pub const UNANSWERED_POLLS_MAX: u32 = 10;

/// The least time from the first to the last of [`UNANSWERED_POLLS_MAX`] unanswered polls
/// that fail a wait: a burst of throttling (under load, mostly the engine's own calls) or a
/// short outage of a service's reads is outlasted, not taken for a probe that never answers.
pub const UNANSWERED_SPAN_MIN: std::time::Duration = std::time::Duration::from_secs(60);

/// Largest keyed record a store keeps beside runs (a schedule with its input, a pending
/// notification).
pub const KEYED_RECORD_BYTES_MAX: usize = INPUT_BYTES_MAX + 16 * 1024;

/// Longest name of a target a notice was delivered to ([`crate::Engine::notice_delivered`]:
/// a URL, say), in bytes.
pub const NOTICE_TARGET_BYTES_MAX: usize = 2048;

/// Most targets one notice records as delivered to.
pub const NOTICE_TARGETS_MAX: usize = 16;

/// sled moves a page larger than a quarter of its 512 KiB segment into a separate blob
/// file. Records stay below it so that they normally live in sled's log (sled syncs blob
/// files as it writes them, for the pages that grow past it anyway).
const SLED_BLOB_THRESHOLD_BYTES: usize = 512 * 1024 / 4;

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}

const _: () = assert!(ENTRY_BYTES_MAX < SLED_BLOB_THRESHOLD_BYTES);
const _: () =
    assert!(EVENT_PAYLOAD_BYTES_MAX + EVENT_NAME_LEN_MAX + EVENT_ID_LEN_MAX < ENTRY_BYTES_MAX);
const _: () = assert!(TRANSITION_ENTRY_BYTES_MAX < SLED_BLOB_THRESHOLD_BYTES);
const _: () = assert!(RUN_RECORD_BYTES_MAX < SLED_BLOB_THRESHOLD_BYTES);
// The statistics record is the one record that may pass it (see STATS_RECORD_BYTES_MAX); it
// stays well below a megabyte.
const _: () = assert!(STATS_RECORD_BYTES_MAX < 1024 * 1024);
const _: () = assert!(LATENCY_HISTOGRAM_COUNTERS == 28 * 1024);
const _: () = assert!(KEYED_RECORD_BYTES_MAX < SLED_BLOB_THRESHOLD_BYTES);
const _: () = assert!(ERROR_MESSAGE_BYTES_MAX < STEP_OUTPUT_BYTES_MAX);
// A notice: its targets, its error (cut), run ids and a workflow name fit in a keyed record.
const _: () = assert!(
    NOTICE_TARGETS_MAX * (NOTICE_TARGET_BYTES_MAX + 8)
        + ERROR_MESSAGE_BYTES_MAX
        + 4 * RUN_ID_LEN_MAX
        + 4096
        < KEYED_RECORD_BYTES_MAX
);
const _: () = assert!(STEPS_PER_RUN_MAX < JOURNAL_ENTRIES_PER_RUN_MAX);
const _: () = assert!(RUN_ID_LEN_MAX < 256);

/// Longest schedule name (`schedule.rs`): a fire's run id is the name, `@` and the fire time
/// (16 bytes), which must fit [`RUN_ID_LEN_MAX`].
pub const SCHEDULE_NAME_LEN_MAX: usize = 64;

/// Most missed fires an `all` catch-up of a schedule starts after a downtime.
pub const SCHEDULE_CATCH_UP_MAX: u32 = 1000;

/// Longest interval of an interval schedule: ten years of seconds, so that fire times stay
/// far from overflowing milliseconds.
pub const SCHEDULE_INTERVAL_SECONDS_MAX: u64 = 10 * 366 * 24 * 3600;

/// Most fire times of a cron schedule enumerated to decide one catch-up: past it, the older
/// missed fires are neither enumerated nor counted (an interval schedule counts them exactly,
/// by arithmetic), so a per-minute schedule after a year's downtime costs a bounded pass.
pub const SCHEDULE_FIRES_ENUMERATED_MAX: usize = 10_000;

/// How late a fire may start and still count as on time under `catch_up: skip`.
pub const SCHEDULE_GRACE_MS: u64 = 60_000;

const _: () = assert!(SCHEDULE_NAME_LEN_MAX + 1 + 16 <= RUN_ID_LEN_MAX);
const _: () = assert!(SCHEDULE_CATCH_UP_MAX as usize <= SCHEDULE_FIRES_ENUMERATED_MAX);

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// `json_bytes` counts what `to_string` writes: escapes, multi-byte characters, nesting.
    #[test]
    fn json_bytes_is_the_length_of_the_text() {
        let values = [
            json!(null),
            json!(""),
            json!("quote \" backslash \\ tab \t nul \u{0} é 雪 🦀"),
            json!({"a": [1, 2.5, -3, true, false, null], "b": {"c": "d"}, "": {}}),
            json!([
                [],
                {},
                18446744073709551615u64,
                -9223372036854775808i64,
                1e300
            ]),
        ];
        for value in values {
            assert_eq!(
                super::json_bytes(&value),
                value.to_string().len(),
                "{value}"
            );
        }
    }
}

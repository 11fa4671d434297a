//! The pure decisions of `schedule.rs`: fire times, catch-up, overlap, pause and the bound
//! on enumeration.

use super::*;

/// 2026-01-01T00:00:00Z, a Thursday.
const T0: u64 = 1_767_225_600_000;
const MINUTE: u64 = 60_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 86_400_000;

fn ms(year: i32, month: u32, day: u32, hour: u32, minute: u32) -> u64 {
    let days = days_from_civil(year, month, day);
    (days * SECONDS_PER_DAY + i64::from(hour * 3600 + minute * 60)) as u64 * 1000
}

fn definition(every: Every, catch_up: CatchUp, overlap: Overlap) -> Definition {
    Definition {
        spec: ScheduleSpec {
            name: "s".into(),
            workflow: "w".into(),
            input: Value::Null,
            every,
            catch_up,
            overlap,
        },
        created_at_ms: T0,
        paused: false,
        not_before_ms: None,
    }
}

fn every_minute(catch_up: CatchUp) -> Definition {
    definition(Every::Interval { seconds: 60 }, catch_up, Overlap::Allow)
}

fn plan_at(definition: &Definition, fired: &Fired, now_ms: u64) -> Plan {
    let times = FireTimes::new(&definition.spec.every, definition.created_at_ms).unwrap();
    plan(&times, definition, fired, false, now_ms)
}

/// Fired state whose last decided fire is `at`.
fn decided(at: u64) -> Fired {
    Fired {
        decided_through_ms: Some(at),
        ..Fired::new(T0)
    }
}

#[test]
fn civil_conversion_round_trips_and_knows_its_calendar() {
    assert_eq!(ms(2026, 1, 1, 0, 0), T0);
    assert_eq!(ms(1970, 1, 1, 0, 0), 0);
    for days in (-800_000..800_000).step_by(997) {
        let (y, m, d) = civil_from_days(days);
        assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
    }
    assert_eq!(civil_from_days(days_from_civil(2024, 2, 29)), (2024, 2, 29));
    assert_eq!(
        civil_from_days(days_from_civil(2024, 2, 29) + 1),
        (2024, 3, 1)
    );
    assert_eq!(
        civil_from_days(days_from_civil(2100, 2, 28) + 1),
        (2100, 3, 1)
    );
}

#[test]
fn fire_run_ids_name_the_schedule_and_the_fire_time_in_utc() {
    let id = fire_run_id("nightly-sweep", ms(2026, 12, 2, 3, 0));
    assert_eq!(id, "nightly-sweep@20261202T030000Z");
    assert!(crate::RunId::new_top_level(&id).is_ok());
    assert_eq!(fire_run_id("a", T0 + 61_999), "a@20260101T000101Z");
}

#[test]
fn cron_fire_times_are_utc_matches_of_five_fields() {
    let times = FireTimes::new(&Every::Cron("0 3 * * *".into()), T0).unwrap();
    assert_eq!(times.next_after(T0), Some(ms(2026, 1, 1, 3, 0)));
    assert_eq!(
        times.next_after(ms(2026, 1, 1, 3, 0)),
        Some(ms(2026, 1, 2, 3, 0))
    );
    let yearly = FireTimes::new(&Every::Cron("0 4 1 3 *".into()), T0).unwrap();
    assert_eq!(yearly.next_after(T0), Some(ms(2026, 3, 1, 4, 0)));
    assert_eq!(
        yearly.next_after(ms(2026, 3, 1, 4, 0)),
        Some(ms(2027, 3, 1, 4, 0))
    );
    // Mondays at 09:00: 2026-01-01 is a Thursday, so the first is the 5th.
    let mondays = FireTimes::new(&Every::Cron("0 9 * * 1".into()), T0).unwrap();
    assert_eq!(mondays.next_after(T0), Some(ms(2026, 1, 5, 9, 0)));
    assert_eq!(
        mondays.previous_at_or_before(ms(2026, 1, 12, 9, 0)),
        Some(ms(2026, 1, 12, 9, 0))
    );
    assert_eq!(
        mondays.previous_at_or_before(ms(2026, 1, 12, 8, 59)),
        Some(ms(2026, 1, 5, 9, 0))
    );
}

#[test]
fn bad_definitions_are_refused_with_the_field_and_the_parser_s_words() {
    let error = FireTimes::new(&Every::Cron("0 3 * *".into()), T0).unwrap_err();
    assert!(error.starts_with("every.cron: \"0 3 * *\""), "{error}");
    let error = FireTimes::new(&Every::Cron("0 0 3 * * *".into()), T0).unwrap_err();
    assert!(error.contains("every.cron"), "{error}");
    let error = FireTimes::new(&Every::Cron("61 3 * * *".into()), T0).unwrap_err();
    assert!(error.contains("every.cron"), "{error}");
    let error = FireTimes::new(&Every::Cron("0 0 30 2 *".into()), T0).unwrap_err();
    assert!(error.contains("never matches"), "{error}");
    let error = FireTimes::new(&Every::Interval { seconds: 0 }, T0).unwrap_err();
    assert!(error.starts_with("every.interval.seconds: 0"), "{error}");
    assert!(check_catch_up(CatchUp::All { max: 0 }).is_err());
    assert!(check_catch_up(CatchUp::All { max: 1001 }).is_err());
    assert!(check_catch_up(CatchUp::All { max: 1000 }).is_ok());
    for bad in ["", "-a", ".a", "a/b", "a@b", "a b", &"x".repeat(65)] {
        assert!(check_name(bad).is_err(), "{bad:?} accepted");
    }
    for good in ["a", "nightly-sweep", "cert.rotate_2026", &"x".repeat(64)] {
        assert!(check_name(good).is_ok(), "{good:?} refused");
    }
}

#[test]
fn an_interval_fires_at_creation_plus_multiples_and_nothing_before() {
    let d = every_minute(CatchUp::Skip);
    let before = plan_at(&d, &Fired::new(T0), T0 + MINUTE - 1);
    assert_eq!(before.start, Vec::<u64>::new());
    assert_eq!(before.decided_through_ms, None);
    assert_eq!(before.next_fire_ms, Some(T0 + MINUTE));
    let on_time = plan_at(&d, &Fired::new(T0), T0 + MINUTE);
    assert_eq!(on_time.start, vec![T0 + MINUTE]);
    assert_eq!(on_time.skipped, 0);
    assert_eq!(on_time.decided_through_ms, Some(T0 + MINUTE));
    assert_eq!(on_time.next_fire_ms, Some(T0 + 2 * MINUTE));
    // Decided fires are not due again.
    let again = plan_at(&d, &decided(T0 + MINUTE), T0 + MINUTE + 5);
    assert!(again.start.is_empty() && again.skipped == 0);
}

#[test]
fn an_interval_anchors_at_the_second_of_creation() {
    let mut d = every_minute(CatchUp::Skip);
    d.created_at_ms = T0 + 1_234;
    let times = FireTimes::new(&d.spec.every, d.created_at_ms).unwrap();
    // Created at 00:00:01.234: the anchor is 00:00:01, the first fire 00:01:01.
    assert_eq!(times.next_after(d.created_at_ms), Some(T0 + 1_000 + MINUTE));
}

#[test]
fn skip_starts_only_the_fires_within_the_grace() {
    let d = every_minute(CatchUp::Skip);
    // Fires at +2..=+10 minutes were missed; now is 30 s after the last of them.
    let now = T0 + 10 * MINUTE + 30_000;
    let p = plan_at(&d, &decided(T0 + MINUTE), now);
    assert_eq!(p.start, vec![T0 + 10 * MINUTE]);
    assert_eq!(p.skipped, 8);
    assert_eq!(p.decided_through_ms, Some(T0 + 10 * MINUTE));
    assert_eq!(p.next_fire_ms, Some(T0 + 11 * MINUTE));
    // Every 5 minutes, down until 61 s after the fire at +20: nothing is on time, the
    // fires at +10, +15 and +20 are skipped.
    let d5 = definition(
        Every::Interval { seconds: 300 },
        CatchUp::Skip,
        Overlap::Allow,
    );
    let late = plan_at(&d5, &decided(T0 + 5 * MINUTE), T0 + 20 * MINUTE + 61_000);
    assert!(late.start.is_empty());
    assert_eq!(late.skipped, 3);
    assert_eq!(late.decided_through_ms, Some(T0 + 20 * MINUTE));
    assert_eq!(late.next_fire_ms, Some(T0 + 25 * MINUTE));
    // A loop a little late on a short interval starts every fire that is still on time.
    let d = definition(
        Every::Interval { seconds: 20 },
        CatchUp::Skip,
        Overlap::Allow,
    );
    let p = plan_at(&d, &Fired::new(T0), T0 + 100_000);
    assert_eq!(
        p.start,
        vec![T0 + 40_000, T0 + 60_000, T0 + 80_000, T0 + 100_000]
    );
    assert_eq!(p.skipped, 1);
}

#[test]
fn latest_starts_one_catch_up() {
    let d = every_minute(CatchUp::Latest);
    // Down from +1 to +15 minutes: the latest fire starts, the 13 before it are skipped.
    let p = plan_at(&d, &decided(T0 + MINUTE), T0 + 15 * MINUTE);
    assert_eq!(p.start, vec![T0 + 15 * MINUTE]);
    assert_eq!(p.skipped, 13);
    assert_eq!(p.decided_through_ms, Some(T0 + 15 * MINUTE));
    let p = plan_at(&d, &decided(T0 + MINUTE), T0 + DAY);
    assert_eq!(p.start, vec![T0 + DAY]);
    assert_eq!(p.skipped, 24 * 60 - 2);
}

#[test]
fn all_starts_the_newest_max_oldest_first() {
    let d = every_minute(CatchUp::All { max: 3 });
    let p = plan_at(&d, &decided(T0 + MINUTE), T0 + 10 * MINUTE);
    assert_eq!(
        p.start,
        vec![T0 + 8 * MINUTE, T0 + 9 * MINUTE, T0 + 10 * MINUTE]
    );
    assert_eq!(p.skipped, 6);
    let d = every_minute(CatchUp::All { max: 100 });
    let p = plan_at(&d, &decided(T0 + MINUTE), T0 + 10 * MINUTE);
    assert_eq!(p.start.len(), 9);
    assert_eq!(p.start[0], T0 + 2 * MINUTE);
    assert_eq!(p.skipped, 0);
}

#[test]
fn overlap_skip_starts_nothing_while_the_previous_run_is_unfinished() {
    let d = definition(
        Every::Interval { seconds: 60 },
        CatchUp::All { max: 5 },
        Overlap::Skip,
    );
    let times = FireTimes::new(&d.spec.every, d.created_at_ms).unwrap();
    let busy = plan(&times, &d, &decided(T0 + MINUTE), true, T0 + 4 * MINUTE);
    assert!(busy.start.is_empty());
    assert_eq!(busy.skipped, 3);
    assert_eq!(busy.decided_through_ms, Some(T0 + 4 * MINUTE));
    // Idle: one run only, the newest, since several would overlap each other.
    let idle = plan(&times, &d, &decided(T0 + MINUTE), false, T0 + 4 * MINUTE);
    assert_eq!(idle.start, vec![T0 + 4 * MINUTE]);
    assert_eq!(idle.skipped, 2);
}

#[test]
fn a_paused_schedule_plans_nothing_and_a_resumed_one_never_catches_up_the_pause() {
    let mut d = every_minute(CatchUp::All { max: 1000 });
    d.paused = true;
    let p = plan_at(&d, &decided(T0 + MINUTE), T0 + HOUR);
    assert_eq!(p.start, Vec::<u64>::new());
    assert_eq!(
        (p.skipped, p.decided_through_ms, p.next_fire_ms),
        (0, None, None)
    );
    assert_eq!(
        view(&d, &decided(T0 + MINUTE), T0 + HOUR).next_fire_ms,
        None
    );
    // Resumed at +1 h 30 s: fires from then on only.
    d.paused = false;
    d.not_before_ms = Some(T0 + HOUR + 30_000);
    let p = plan_at(&d, &decided(T0 + MINUTE), T0 + HOUR + 2 * MINUTE);
    assert_eq!(p.start, vec![T0 + HOUR + MINUTE, T0 + HOUR + 2 * MINUTE]);
    assert_eq!(p.skipped, 0);
    // A fire exactly at the resume time is due.
    d.not_before_ms = Some(T0 + HOUR);
    let p = plan_at(&d, &decided(T0 + MINUTE), T0 + HOUR);
    assert_eq!(p.start, vec![T0 + HOUR]);
}

#[test]
fn cron_catch_up_after_downtime_follows_the_policy() {
    let nightly = |catch_up| definition(Every::Cron("0 3 * * *".into()), catch_up, Overlap::Allow);
    // Down from before the first fire until day 5, 03:00:20.
    let now = ms(2026, 1, 5, 3, 0) + 20_000;
    let p = plan_at(&nightly(CatchUp::Skip), &Fired::new(T0), now);
    assert_eq!(p.start, vec![ms(2026, 1, 5, 3, 0)]);
    assert_eq!(p.skipped, 4);
    let p = plan_at(&nightly(CatchUp::Latest), &Fired::new(T0), now + HOUR);
    assert_eq!(p.start, vec![ms(2026, 1, 5, 3, 0)]);
    assert_eq!(p.skipped, 4);
    let p = plan_at(
        &nightly(CatchUp::All { max: 2 }),
        &Fired::new(T0),
        now + HOUR,
    );
    assert_eq!(p.start, vec![ms(2026, 1, 4, 3, 0), ms(2026, 1, 5, 3, 0)]);
    assert_eq!(p.skipped, 3);
    assert_eq!(p.next_fire_ms, Some(ms(2026, 1, 6, 3, 0)));
}

#[test]
fn a_long_downtime_enumerates_a_bounded_number_of_fire_times() {
    let year = 365 * DAY;
    // Every second for a year: counted by arithmetic, not enumerated.
    let d = definition(
        Every::Interval { seconds: 1 },
        CatchUp::All { max: 1000 },
        Overlap::Allow,
    );
    let started = std::time::Instant::now();
    let p = plan_at(&d, &Fired::new(T0), T0 + year);
    assert_eq!(p.start.len(), 1000);
    assert_eq!(p.start[999], T0 + year);
    assert_eq!(p.skipped, year / 1000 - 1000);
    // Every minute for a year: enumerated up to the bound, the older ones not counted.
    let d = definition(
        Every::Cron("* * * * *".into()),
        CatchUp::All { max: 1000 },
        Overlap::Allow,
    );
    let p = plan_at(&d, &Fired::new(T0), T0 + year);
    assert_eq!(p.start.len(), 1000);
    assert_eq!(p.start[999], T0 + year);
    assert_eq!(p.skipped, (SCHEDULE_FIRES_ENUMERATED_MAX - 1000) as u64);
    assert_eq!(p.decided_through_ms, Some(T0 + year));
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

#[test]
fn the_json_shape_is_plain() {
    let spec: ScheduleSpec = serde_json::from_value(serde_json::json!({
        "name": "nightly-sweep",
        "workflow": "sample.inbox",
        "input": {"a": 1},
        "every": {"cron": "0 3 * * *"},
        "catch_up": {"all": {"max": 3}},
        "overlap": "skip"
    }))
    .unwrap();
    assert_eq!(spec.catch_up, CatchUp::All { max: 3 });
    assert_eq!(spec.overlap, Overlap::Skip);
    let minimal: ScheduleSpec = serde_json::from_value(serde_json::json!({
        "name": "n", "workflow": "w", "every": {"interval": {"seconds": 3600}}
    }))
    .unwrap();
    assert_eq!(minimal.catch_up, CatchUp::Skip);
    assert_eq!(minimal.overlap, Overlap::Allow);
    assert_eq!(minimal.input, Value::Null);
    let text = serde_json::to_string(&ScheduleSpec {
        catch_up: CatchUp::Latest,
        ..minimal
    })
    .unwrap();
    assert!(
        text.contains(r#""every":{"interval":{"seconds":3600}}"#),
        "{text}"
    );
    assert!(text.contains(r#""catch_up":"latest""#), "{text}");
    let unknown = serde_json::from_value::<ScheduleSpec>(serde_json::json!({
        "name": "n", "workflow": "w", "every": {"cron": "* * * * *"}, "when": 1
    }));
    assert!(unknown.is_err());
}

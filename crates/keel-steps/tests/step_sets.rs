//! Every `impl Step` of this crate is in one of its step sets (`aws::STEPS`, `files::STEPS`,
//! `s3::STEPS`, `sftp::STEPS`), so an engine that registers the sets can undo every step this crate makes,
//! even after a restart in compensation: a step added without its set entry fails here.

use std::collections::BTreeSet;
use std::path::Path;

use keel_engine::StepType;

/// Every set this crate exports. A new module with steps adds its set here.
const SETS: &[&[StepType]] = &[
    keel_steps::aws::STEPS,
    keel_steps::files::STEPS,
    keel_steps::s3::STEPS,
    keel_steps::sftp::STEPS,
];

/// The type names after `impl Step for` (or `impl keel_engine::Step for`) in `dir`'s sources.
fn implemented_steps(dir: &Path, found: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            implemented_steps(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).unwrap();
            for line in text.lines() {
                let line = line.trim_start();
                let rest = line
                    .strip_prefix("impl Step for ")
                    .or_else(|| line.strip_prefix("impl keel_engine::Step for "));
                if let Some(rest) = rest {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    found.insert(name);
                }
            }
        }
    }
}

/// Every step type the crate implements is listed in one of its step sets, and no kind is
/// listed twice.
#[test]
fn every_step_of_the_crate_is_in_a_set() {
    let mut implemented = BTreeSet::new();
    implemented_steps(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut implemented,
    );
    assert!(
        implemented.len() >= 18,
        "the scan found too few steps: {implemented:?}"
    );
    let in_sets: BTreeSet<String> = SETS
        .iter()
        .flat_map(|set| set.iter())
        .map(|step| {
            let path = step.type_name();
            path.rsplit("::").next().unwrap().to_string()
        })
        .collect();
    let missing: Vec<&String> = implemented.difference(&in_sets).collect();
    assert!(
        missing.is_empty(),
        "steps missing from every set (add them to their module's STEPS): {missing:?}"
    );
    let kinds: BTreeSet<&str> = SETS
        .iter()
        .flat_map(|s| s.iter())
        .map(|s| s.kind())
        .collect();
    let count: usize = SETS.iter().map(|s| s.len()).sum();
    assert_eq!(kinds.len(), count, "a kind is listed twice");
}

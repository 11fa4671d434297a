//! Reading run records in id order: a visit from a start id within an id prefix, and a page
//! of them by status with its bound on records read (`RunsScan::examine_max`). Blocking: the
//! store calls them on the runtime's threads for short pages, off them for pages by status.

use super::{decode_record, run_key, Kv, RUN_PREFIX};
use crate::error::Result;
use crate::ids::RunId;
use crate::journal::RunRecord;
use crate::store::{RunsScan, ScannedRuns};
use std::ops::ControlFlow;

/// Visits the run records after `after` whose ids begin with `prefix`, in id order; blocking.
pub(super) fn visit_runs(
    kv: &Kv,
    after: Option<&RunId>,
    prefix: Option<&str>,
    visit: &mut dyn FnMut(Result<RunRecord>) -> ControlFlow<()>,
) -> Result<()> {
    use std::ops::Bound;
    let mut first = vec![RUN_PREFIX];
    first.extend_from_slice(prefix.unwrap_or("").as_bytes());
    let start = match after {
        Some(id) if run_key(id) >= first => Bound::Excluded(run_key(id)),
        _ => Bound::Included(first.clone()),
    };
    for item in kv.range(start, Bound::Unbounded) {
        let (key, bytes) = item?;
        if !key.starts_with(&first) {
            break;
        }
        if visit(decode_record(&key, &bytes)).is_break() {
            break;
        }
    }
    Ok(())
}

/// One page of run records (see [`JournalStore::runs_page`]); blocking.
pub(super) fn runs_page(kv: &Kv, scan: &RunsScan) -> Result<ScannedRuns> {
    let (mut page, mut held, mut examined) = (ScannedRuns::default(), 0, 0);
    let examine_max = scan.status.and(scan.examine_max).unwrap_or(usize::MAX);
    visit_runs(
        kv,
        scan.after.as_ref(),
        scan.prefix.as_deref(),
        &mut |record| {
            if let Ok(record) = &record {
                if examined == examine_max {
                    page.more = true;
                    return ControlFlow::Break(());
                }
                examined += 1;
                if scan.status.is_some_and(|s| s != record.status) {
                    if examined == examine_max {
                        page.resume_after = Some(record.id.clone());
                    }
                    return ControlFlow::Continue(());
                }
                if held == scan.limit {
                    page.more = true;
                    return ControlFlow::Break(());
                }
                held += 1;
            }
            page.records.push(record);
            ControlFlow::Continue(())
        },
    )?;
    Ok(page)
}

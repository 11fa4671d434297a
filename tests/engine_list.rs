//! Listing runs a page at a time: pages in id order that together hold every run once, a
//! status filter applied before the page is cut, a `next` cursor that is `None` exactly on the
//! last page, and counts by status that agree with the records.

use std::collections::BTreeMap;

use keel::{
    Ctx, Engine, EngineError, RunStatus, RunsQuery, Workflow, WorkflowError, RUNS_PAGE_MAX,
};

/// Completes with its input, or fails (with nothing to undo) when the input is odd.
struct EvenFlow;

impl Workflow for EvenFlow {
    const NAME: &'static str = "test.even";
    type Input = u32;
    type Output = u32;

    async fn run(_ctx: &mut Ctx, input: u32) -> Result<u32, WorkflowError> {
        if input % 2 == 1 {
            return Err(WorkflowError::Failed(format!("{input} is odd")));
        }
        Ok(input)
    }
}

async fn pages(engine: &Engine, status: Option<RunStatus>, limit: usize) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = engine
            .list_page(&RunsQuery {
                prefix: None,
                status,
                after: after.clone(),
                limit,
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.runs.len() <= limit);
        pages.push(page.runs.iter().map(|r| r.id.to_string()).collect());
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), page.runs.last().map(|r| &r.id));
                after = Some(next.to_string());
            }
            None => return pages,
        }
    }
}

/// Listing by pages returns every run once, in id order, for any page size; a status filter
/// applies before the page is cut, the counts by status match the listing, an out-of-range
/// page size is refused naming the limit, and a page after the last id is empty and last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_hold_every_run_once_in_id_order_and_filters_apply_before_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .workflow::<EvenFlow>()
        .open()
        .await
        .unwrap();
    for n in 0..11u32 {
        let id = format!("run-{n:02}");
        let _ = engine
            .start::<EvenFlow>(&id, n)
            .await
            .unwrap()
            .result()
            .await;
    }
    let all: Vec<String> = (0..11).map(|n| format!("run-{n:02}")).collect();
    for limit in [1, 3, 11, 12, RUNS_PAGE_MAX] {
        let pages = pages(&engine, None, limit).await;
        assert_eq!(pages.concat(), all, "limit {limit}");
        assert_eq!(pages.len(), 11usize.div_ceil(limit).max(1), "limit {limit}");
    }
    let records = engine.list().await.unwrap();
    let mut expected: BTreeMap<RunStatus, u64> = BTreeMap::new();
    for record in &records {
        *expected.entry(record.status).or_default() += 1;
    }
    assert_eq!(engine.run_counts().await.unwrap(), expected);
    assert_eq!(
        expected.len(),
        2,
        "some completed, some failed: {expected:?}"
    );
    for (status, count) in expected {
        let pages = pages(&engine, Some(status), 2).await;
        let ids = pages.concat();
        assert_eq!(ids.len() as u64, count, "{status}");
        let wanted: Vec<String> = records
            .iter()
            .filter(|r| r.status == status)
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(ids, wanted);
    }
    // An id prefix: the page holds only ids that begin with it, and goes on after `after`
    // within it; ids before and after the prefix's range are never returned.
    let prefixed = |prefix: &str, after: Option<&str>| {
        let engine = engine.clone();
        let query = RunsQuery {
            prefix: Some(prefix.to_string()),
            status: None,
            after: after.map(str::to_string),
            limit: 4,
            ..Default::default()
        };
        async move {
            let page = engine.list_page(&query).await.unwrap();
            let ids: Vec<String> = page.runs.iter().map(|r| r.id.to_string()).collect();
            (ids, page.next.map(|n| n.to_string()))
        }
    };
    assert_eq!(
        prefixed("run-0", None).await,
        (
            vec!["run-00", "run-01", "run-02", "run-03"]
                .into_iter()
                .map(String::from)
                .collect(),
            Some("run-03".to_string())
        )
    );
    assert_eq!(
        prefixed("run-0", Some("run-07")).await,
        (vec!["run-08".to_string(), "run-09".to_string()], None)
    );
    assert_eq!(
        prefixed("run-1", None).await,
        (vec!["run-10".to_string()], None)
    );
    assert_eq!(
        prefixed("run-1", Some("a")).await,
        (vec!["run-10".to_string()], None)
    );
    assert_eq!(prefixed("zzz", None).await, (vec![], None));
    // Out of range: refused, naming the limit.
    for limit in [0, RUNS_PAGE_MAX + 1] {
        let error = engine
            .list_page(&RunsQuery {
                prefix: None,
                status: None,
                after: None,
                limit,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(error, EngineError::InvalidRequest(_)), "{error}");
        assert!(error.to_string().contains(&limit.to_string()), "{error}");
    }
    // After the last id: an empty last page.
    let page = engine
        .list_page(&RunsQuery {
            prefix: None,
            status: None,
            after: Some("run-99".into()),
            limit: 5,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(page.runs.is_empty() && page.next.is_none());
}

/// Starts one `EvenFlow` child per input, then completes with their sum.
struct Parent;

impl Workflow for Parent {
    const NAME: &'static str = "test.parent";
    type Input = Vec<u32>;
    type Output = u32;

    async fn run(ctx: &mut Ctx, inputs: Vec<u32>) -> Result<u32, WorkflowError> {
        let mut sum = 0;
        for n in inputs {
            sum += ctx.child::<EvenFlow>(n).await?;
        }
        Ok(sum)
    }
}

/// Every page of `query`, concatenated.
async fn every(engine: &Engine, query: RunsQuery) -> Vec<String> {
    let (mut ids, mut query) = (Vec::new(), query);
    loop {
        let page = engine.list_page(&query).await.unwrap();
        assert!(page.runs.len() <= query.limit);
        ids.extend(page.runs.iter().map(|r| r.id.to_string()));
        match page.next {
            Some(next) => query.after = Some(next.to_string()),
            None => return ids,
        }
    }
}

/// The filters beyond status and prefix (workflow, parent, creation time) select exactly
/// the matching runs, across pages, and combine with the status filter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_parent_and_time_filters_select_exactly_their_runs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .workflow::<EvenFlow>()
        .workflow::<Parent>()
        .open()
        .await
        .unwrap();
    for n in 0..4u32 {
        let _ = engine
            .start::<EvenFlow>(&format!("a-{n}"), n)
            .await
            .unwrap()
            .result()
            .await;
    }
    for p in ["p-1", "p-2"] {
        engine
            .start::<Parent>(p, vec![2, 4, 6])
            .await
            .unwrap()
            .result()
            .await
            .unwrap();
    }
    let records = engine.list().await.unwrap();
    let ids = |keep: &dyn Fn(&keel::RunRecord) -> bool| -> Vec<String> {
        records
            .iter()
            .filter(|r| keep(r))
            .map(|r| r.id.to_string())
            .collect()
    };
    let query = |limit| RunsQuery {
        limit,
        ..Default::default()
    };
    for limit in [1, 2, 100] {
        let by_workflow = every(
            &engine,
            RunsQuery {
                workflow: Some("test.parent".into()),
                ..query(limit)
            },
        )
        .await;
        assert_eq!(by_workflow, vec!["p-1", "p-2"], "limit {limit}");
        let children = every(
            &engine,
            RunsQuery {
                parent: Some("p-1".into()),
                ..query(limit)
            },
        )
        .await;
        assert_eq!(children, vec!["p-1/0", "p-1/1", "p-1/2"], "limit {limit}");
        let failed_evens = every(
            &engine,
            RunsQuery {
                workflow: Some("test.even".into()),
                status: Some(RunStatus::Failed),
                ..query(limit)
            },
        )
        .await;
        assert_eq!(failed_evens, vec!["a-1", "a-3"], "limit {limit}");
    }
    // Creation time: a cut between the first runs and the parents.
    let parents_at = records
        .iter()
        .find(|r| r.id.as_str() == "p-1")
        .unwrap()
        .created_at_ms;
    let before = every(
        &engine,
        RunsQuery {
            created_before_ms: Some(parents_at),
            ..query(3)
        },
    )
    .await;
    assert_eq!(before, ids(&|r| r.created_at_ms < parents_at));
    assert!(before.iter().all(|id| id.starts_with("a-")), "{before:?}");
    let after = every(
        &engine,
        RunsQuery {
            created_after_ms: Some(parents_at),
            ..query(3)
        },
    )
    .await;
    assert_eq!(after, ids(&|r| r.created_at_ms >= parents_at));
    assert_eq!(before.len() + after.len(), records.len());
    // A parent with no children, and a workflow no run has: empty, and the last page.
    let none = engine
        .list_page(&RunsQuery {
            parent: Some("a-0".into()),
            ..query(5)
        })
        .await
        .unwrap();
    assert!(none.runs.is_empty() && none.next.is_none());
}

/// A parent whose id is too long for `<parent>/<index>` has children named `child-<uuid>`
/// (`keel::child_id`): listed as its children, and purged with it, like any others. Before,
/// both looked for them only under `<parent>/`: the listing was empty and a purge left
/// them (seen failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_parents_children_are_listed_and_purged_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = keel_testkit::store::builder(dir.path().join("data"))
        .workflow::<EvenFlow>()
        .workflow::<Parent>()
        .open()
        .await
        .unwrap();
    // Ids are at most 128 bytes: `<parent>/0` would be 129.
    let parent = "p".repeat(127);
    let short = "short";
    for id in [parent.as_str(), short] {
        engine
            .start::<Parent>(id, vec![2, 4])
            .await
            .unwrap()
            .result()
            .await
            .unwrap();
    }
    let children = every(
        &engine,
        RunsQuery {
            parent: Some(parent.clone()),
            limit: 1,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(children.len(), 2, "{children:?}");
    assert!(
        children.iter().all(|id| id.starts_with("child-")),
        "{children:?}"
    );

    let purge = keel::Batch {
        action: keel::BatchAction::Purge,
        filter: keel::RunFilter {
            statuses: vec![RunStatus::Completed],
            workflow: Some("test.parent".into()),
            finished_before_ms: Some(u64::MAX),
            ..Default::default()
        },
        dry_run: false,
        after: None,
        limit: 10,
    };
    // A run's waiters hear its end before its driver unloads it, and a purge skips a loaded
    // run: the purge comes once every run is out of the map.
    keel_testkit::poll::resident(&engine, keel::Resident::default()).await;
    let report = engine.batch(&purge).await.unwrap();
    assert_eq!(report.skipped, 0, "{report:?}");
    let left = engine.list().await.unwrap();
    assert!(left.is_empty(), "left after the purge: {left:?}");
    engine.shutdown().await;
}

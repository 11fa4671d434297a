//! Which store a test's engine opens: sled in the test's data directory, or, in test binaries
//! whose name starts with `pg_`, a PostgreSQL database of its own on the tests' server
//! (`postgres.rs`). A `pg_*` binary includes a sled suite's file as its module `suite`
//! (`#[path = "engine_start.rs"] mod suite;`), so the one suite runs on both stores.
//!
//! The database is named after the data directory, so every engine a test opens on one
//! directory, in the test's process or in its crash-test children, meets the same runs.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::OnceLock;

use keel_engine::{Engine, EngineBuilder};

/// The store the engines of this test binary open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestStore {
    /// sled, in the data directory.
    Sled,
    /// A PostgreSQL database per data directory.
    Postgres,
}

/// The store of this binary: PostgreSQL when its name starts with `pg_`.
pub fn test_store() -> TestStore {
    static STORE: OnceLock<TestStore> = OnceLock::new();
    *STORE.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("pg_") {
            TestStore::Postgres
        } else {
            TestStore::Sled
        }
    })
}

/// The name a suite's test has in this binary, for a crash-test child's `--exact` filter: a
/// `pg_*` binary holds the suite in its module `suite`.
pub fn test_path(name: &str) -> String {
    match test_store() {
        TestStore::Sled => name.to_string(),
        TestStore::Postgres => format!("suite::{name}"),
    }
}

/// [`Engine::builder`] for `data`, on this binary's store: for PostgreSQL, the database of
/// `data` is created when it does not exist yet.
///
/// # Panics
/// On PostgreSQL, when the tests' server is not set or cannot create the database.
pub fn builder(data: impl AsRef<Path>) -> EngineBuilder {
    let data = data.as_ref();
    let builder = Engine::builder(data);
    match test_store() {
        TestStore::Sled => builder,
        TestStore::Postgres => builder.postgres(database_of(data)),
    }
}

/// The URL of the PostgreSQL database [`builder`] opens for `data`, created if missing.
///
/// # Panics
/// When the tests' server is not set or cannot create the database.
pub fn database_url(data: impl AsRef<Path>) -> String {
    database_of(data.as_ref())
}

/// The URL of `data`'s database, created if missing (on a thread of its own: callers may be
/// inside a runtime or outside any).
fn database_of(data: &Path) -> String {
    let absolute = std::path::absolute(data).expect("an absolute data path");
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    absolute.hash(&mut hasher);
    let name = format!("keel_t_{:016x}", hasher.finish());
    on_own_thread(async move { crate::postgres::database_named(&name).await })
}

/// The engine's crash points this binary's store meets: [`keel_engine::crash::POINTS`]
/// without the other store's own.
pub fn crash_points() -> Vec<&'static str> {
    without_other_stores(keel_engine::crash::POINTS)
}

/// The parking crash points this binary's store meets: [`keel_engine::crash::PARK_POINTS`]
/// without the other store's own.
pub fn park_points() -> Vec<&'static str> {
    without_other_stores(keel_engine::crash::PARK_POINTS)
}

/// `points` without those only the other store meets.
fn without_other_stores(points: &[&'static str]) -> Vec<&'static str> {
    use keel_engine::crash::{POSTGRES_POINTS, SLED_POINTS};
    let other = match test_store() {
        TestStore::Sled => POSTGRES_POINTS,
        TestStore::Postgres => SLED_POINTS,
    };
    points
        .iter()
        .copied()
        .filter(|p| !other.contains(p))
        .collect()
}

/// Removes `data` and, on PostgreSQL, its database: the next engine on `data` starts on an
/// empty store.
///
/// # Panics
/// When either cannot be removed.
pub fn wipe(data: &Path) {
    if data.exists() {
        std::fs::remove_dir_all(data).expect("removing the data directory");
    }
    if test_store() == TestStore::Postgres {
        let url = database_of(data);
        let name = url.rsplit('/').next().unwrap_or_default().to_string();
        on_own_thread(async move {
            crate::postgres::drop_database(&name).await;
        });
    }
}

/// Renames every occurrence of `from` to `to` in the store of the closed engine on `data`
/// (keys and values): a run made to look as if it had another id. Returns how many records
/// changed their key.
pub fn rename(data: &Path, from: &str, to: &str) -> usize {
    match test_store() {
        TestStore::Sled => {
            let db = crate::raw::open(data);
            let renamed = crate::raw::rename(&db, from, to);
            drop(db);
            renamed
        }
        TestStore::Postgres => {
            let url = database_of(data);
            let (from, to) = (from.to_string(), to.to_string());
            on_own_thread(async move { crate::postgres::rename(&url, &from, &to).await })
        }
    }
}

/// Runs `work` to its end on a runtime of its own, on a thread of its own: callers may be
/// inside a runtime or outside any.
fn on_own_thread<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the test database")
            .block_on(work)
    })
    .join()
    .expect("the test database's thread")
}

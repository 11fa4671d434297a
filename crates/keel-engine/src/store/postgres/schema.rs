//! The schema's versions and the migrations between them, and the engine's lock on the
//! database.
//!
//! `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`; the version a database is at
//! is the one row of `keel_schema`. Opening applies what is missing in one transaction, under
//! a transaction advisory lock so that two engines opening at once migrate once; a database
//! at a newer version than this binary knows is refused and left unchanged.

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::{EngineError, Result};
use crate::limits::OPEN_LOCK_WAIT_MAX;

/// The advisory lock key every Keel engine on a database takes for its connection's life
/// ("keel" in ASCII, then 1): one engine per database until runs carry leases.
const ENGINE_LOCK: i64 = 0x6b65_656c_0000_0001;
/// The advisory lock key migrations take for their transaction.
const MIGRATION_LOCK: i64 = 0x6b65_656c_0000_0002;

/// Every migration, in order: `MIGRATIONS[i]` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: runs, journals, load counts and statistics.
    r#"
    CREATE TABLE keel_runs (
        id text PRIMARY KEY COLLATE "C",
        status text NOT NULL,
        parent text,
        record text NOT NULL
    );
    CREATE INDEX keel_runs_by_status ON keel_runs (status, id);
    CREATE TABLE keel_journal (
        run_id text NOT NULL COLLATE "C",
        position integer NOT NULL CHECK (position >= 0),
        entry text NOT NULL,
        PRIMARY KEY (run_id, position)
    );
    CREATE TABLE keel_load_counts (
        run_id text PRIMARY KEY COLLATE "C",
        loads integer NOT NULL CHECK (loads > 0)
    );
    CREATE TABLE keel_stats (
        operation text PRIMARY KEY,
        record bytea NOT NULL
    );
    "#,
];

/// The schema version this binary writes.
pub(super) const SCHEMA_VERSION: i32 = MIGRATIONS.len() as i32;

fn database_error(database: &str, source: tokio_postgres::Error) -> EngineError {
    EngineError::Database {
        database: database.to_string(),
        source: Box::new(source),
    }
}

/// Takes the engine's lock on the database for the connection's life, waiting up to
/// [`OPEN_LOCK_WAIT_MAX`] (as the sled store waits for its file lock: an engine this process
/// has just dropped may still be closing its connection); refused when another engine holds
/// it.
pub(super) async fn lock_engine(client: &Client, database: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + OPEN_LOCK_WAIT_MAX;
    loop {
        let row = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&ENGINE_LOCK])
            .await
            .map_err(|e| database_error(database, e))?;
        if row.get::<_, bool>(0) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(EngineError::Database {
                database: database.to_string(),
                source: "another Keel engine is using this database (one engine per database: stop the other worker first)".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Releases the engine's lock on the database.
pub(super) async fn unlock_engine(client: &Client, database: &str) -> Result<()> {
    client
        .execute("SELECT pg_advisory_unlock($1)", &[&ENGINE_LOCK])
        .await
        .map_err(|e| database_error(database, e))?;
    Ok(())
}

/// Creates the schema, or migrates it to [`SCHEMA_VERSION`]; refuses a newer one.
pub(super) async fn migrate(client: &Client, database: &str) -> Result<()> {
    let failed = |e| database_error(database, e);
    client.batch_execute("BEGIN").await.map_err(failed)?;
    let outcome = migrate_locked(client, database).await;
    let end = if outcome.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    client.batch_execute(end).await.map_err(failed)?;
    outcome
}

async fn migrate_locked(client: &Client, database: &str) -> Result<()> {
    let failed = |e| database_error(database, e);
    client
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(failed)?;
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS keel_schema (version integer NOT NULL)")
        .await
        .map_err(failed)?;
    let found: i32 = match client
        .query_opt("SELECT version FROM keel_schema", &[])
        .await
        .map_err(failed)?
    {
        Some(row) => row.get(0),
        None => {
            client
                .execute("INSERT INTO keel_schema (version) VALUES (0)", &[])
                .await
                .map_err(failed)?;
            0
        }
    };
    if found > SCHEMA_VERSION {
        return Err(EngineError::SchemaNewer {
            database: database.to_string(),
            found: found as u32,
            supported: SCHEMA_VERSION as u32,
        });
    }
    for (from, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        client.batch_execute(migration).await.map_err(failed)?;
        tracing::info!(database, version = from + 1, "database schema migrated");
    }
    client
        .execute("UPDATE keel_schema SET version = $1", &[&SCHEMA_VERSION])
        .await
        .map_err(failed)?;
    Ok(())
}

//! The schema's versions and the migrations between them.
//!
//! `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`; the version a database is at
//! is the one row of `keel_schema`. Opening applies what is missing in one transaction, under
//! a transaction advisory lock so that two engines opening at once migrate once; a database
//! at a newer version than this binary knows is refused and left unchanged.

use tokio_postgres::Client;

use crate::error::{EngineError, Result};

/// The advisory lock key migrations take for their transaction ("keel" in ASCII, then 2).
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
    // 2: leases. Each engine is a worker with a lease it renews; each run has the worker that
    // owns it and an epoch that every claim of it increments, the token its writes are
    // checked against. Journal rows say who wrote them under which epoch, and every claim is
    // kept, so that fencing can be audited from the database alone. Statistics are kept
    // per worker name and merged when read.
    r#"
    CREATE TABLE keel_workers (
        id text PRIMARY KEY COLLATE "C",
        name text NOT NULL,
        host text NOT NULL,
        pid integer NOT NULL,
        started_at timestamptz NOT NULL,
        lease_until timestamptz NOT NULL
    );
    ALTER TABLE keel_runs ADD COLUMN owner text COLLATE "C";
    ALTER TABLE keel_runs ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
    CREATE INDEX keel_runs_drivable ON keel_runs (id)
        WHERE status IN ('running', 'compensating');
    CREATE INDEX keel_runs_by_owner ON keel_runs (owner);
    ALTER TABLE keel_journal ADD COLUMN epoch bigint NOT NULL DEFAULT 0;
    ALTER TABLE keel_journal ADD COLUMN written_by text;
    ALTER TABLE keel_journal ADD COLUMN written_at timestamptz NOT NULL DEFAULT clock_timestamp();
    ALTER TABLE keel_stats ADD COLUMN worker text NOT NULL DEFAULT '';
    ALTER TABLE keel_stats DROP CONSTRAINT keel_stats_pkey;
    ALTER TABLE keel_stats ADD PRIMARY KEY (worker, operation);
    CREATE TABLE keel_claims (
        run_id text NOT NULL COLLATE "C",
        epoch bigint NOT NULL,
        worker text NOT NULL,
        claimed_at timestamptz NOT NULL,
        PRIMARY KEY (run_id, epoch)
    );
    CREATE INDEX keel_claims_by_time ON keel_claims (claimed_at);
    "#,
    // 3: keyed records beside the runs: schedules, how far they fired, notifications not yet
    // delivered.
    r#"
    CREATE TABLE keel_keyed (
        space text NOT NULL,
        key text NOT NULL COLLATE "C",
        value text NOT NULL,
        PRIMARY KEY (space, key)
    );
    "#,
    // 4: each run's wake time (ms by the engines' clocks; 0: due, loaded or never parked;
    // the largest bigint: only when something arrives for it), so that claims take only the
    // runs that are due, the most overdue first, and leave a sleeping run in the database
    // until its time. Existing rows are due, as every run was before. Every change of owner
    // (a claim, a takeover: the epoch moves) makes the run due, in the database itself, so
    // that a run taken by a worker of an earlier version, which writes no wake times, is
    // never left parked at a time its new owner did not set. The indexes, which claims and
    // the next wake time read per gone owner: each owner's unsettled runs by time, and those
    // of no owner. They replace the index of unsettled runs by id that claims read before,
    // so that an update of a wake time touches no more indexes than it must (the row has
    // indexed columns that change, so every index gets the new version).
    r#"
    ALTER TABLE keel_runs ADD COLUMN wake_at bigint NOT NULL DEFAULT 0;
    DROP INDEX keel_runs_drivable;
    CREATE INDEX keel_runs_parked ON keel_runs (owner, wake_at)
        WHERE status IN ('running', 'compensating');
    CREATE INDEX keel_runs_unowned ON keel_runs (wake_at)
        WHERE owner IS NULL AND status IN ('running', 'compensating');
    CREATE FUNCTION keel_runs_taken() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.wake_at := 0;
            RETURN NEW;
        END $$;
    CREATE TRIGGER keel_runs_taken BEFORE UPDATE OF epoch ON keel_runs
        FOR EACH ROW WHEN (NEW.epoch IS DISTINCT FROM OLD.epoch)
        EXECUTE FUNCTION keel_runs_taken();
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

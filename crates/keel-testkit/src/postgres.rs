//! A fresh PostgreSQL database per test, on the server `scripts/test.sh` starts (its URL in
//! `KEEL_TEST_POSTGRES_URL`), so that tests on the PostgreSQL store never share state.

use tokio_postgres::NoTls;

/// The variable that names the tests' PostgreSQL server.
pub const URL_VARIABLE: &str = "KEEL_TEST_POSTGRES_URL";

/// Creates an empty database on the tests' server and returns its URL.
///
/// # Panics
/// When `KEEL_TEST_POSTGRES_URL` is not set (run the tests through `scripts/test.sh`, which
/// starts a server, or point it at one), or the server cannot create the database: the
/// PostgreSQL store's tests never pass by skipping.
pub async fn fresh_database() -> String {
    database_named(&format!("keel_test_{}", uuid::Uuid::new_v4().simple())).await
}

/// The URL of the database `name` on the tests' server, created when it does not exist.
///
/// # Panics
/// As [`fresh_database`].
pub async fn database_named(name: &str) -> String {
    create_database(&server_url(), name).await
}

/// The URL of the database `name` on the server at `server` (any database's URL on it),
/// created when it does not exist: for the tests and the benchmark.
///
/// # Panics
/// When the server does not answer or cannot create the database.
pub async fn create_database(server: &str, name: &str) -> String {
    let (client, connection) = tokio_postgres::connect(server, NoTls)
        .await
        .unwrap_or_else(|e| panic!("the PostgreSQL server does not answer: {e}"));
    let connection = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .unwrap_or_else(|e| panic!("looking for database {name}: {e}"))
        .is_some();
    if !exists {
        if let Err(e) = client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            // Created meanwhile by another process of the test (a crash-test child): a create
            // that loses the race is refused as a duplicate name or, mid-way, as a duplicate
            // catalogue key.
            use tokio_postgres::error::SqlState;
            let duplicate = matches!(
                e.code(),
                Some(&SqlState::DUPLICATE_DATABASE | &SqlState::UNIQUE_VIOLATION)
            );
            assert!(duplicate, "creating database {name}: {e:?}");
        }
    }
    drop(client);
    let _ = connection.await;
    with_database(server, name)
}

/// Drops the database `name` on the tests' server, if it exists, closing its connections.
///
/// # Panics
/// When the server does not answer or refuses.
pub async fn drop_database(name: &str) {
    let server = server_url();
    execute(
        &server,
        &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
    )
    .await;
}

/// Renames `from` to `to` in every run id, record, journal entry and load count of the
/// database at `url`; returns how many rows changed their key.
///
/// # Panics
/// When the database does not answer or a statement fails.
pub async fn rename(url: &str, from: &str, to: &str) -> usize {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let connection = tokio::spawn(connection);
    let mut renamed = 0;
    for sql in [
        "UPDATE keel_runs SET id = replace(id, $1, $2), parent = replace(parent, $1, $2), \
         record = replace(record, $1, $2) WHERE id LIKE '%' || $1 || '%'",
        "UPDATE keel_journal SET run_id = replace(run_id, $1, $2), entry = replace(entry, $1, $2) \
         WHERE run_id LIKE '%' || $1 || '%'",
        "UPDATE keel_load_counts SET run_id = replace(run_id, $1, $2) \
         WHERE run_id LIKE '%' || $1 || '%'",
    ] {
        renamed += client
            .execute(sql, &[&from, &to])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}")) as usize;
    }
    drop(client);
    let _ = connection.await;
    renamed
}

/// The tests' server, from `KEEL_TEST_POSTGRES_URL`.
fn server_url() -> String {
    std::env::var(URL_VARIABLE).unwrap_or_else(|_| {
        panic!(
            "{URL_VARIABLE} is not set: run the tests with scripts/test.sh, which starts a \
             throwaway PostgreSQL, or set it to a server's URL (postgres://user@127.0.0.1:PORT/postgres)"
        )
    })
}

/// Runs `sql` (one or more statements) on the database at `url`: to look at or damage what a
/// store holds, from outside the engine.
///
/// # Panics
/// When the database does not answer or a statement fails.
pub async fn execute(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let connection = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = connection.await;
}

/// The first column of every row `sql` returns, as text (`sql` casts what it selects).
///
/// # Panics
/// When the database does not answer or the query fails.
pub async fn query_texts(url: &str, sql: &str) -> Vec<String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    let connection = tokio::spawn(connection);
    let rows = client
        .query(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = connection.await;
    rows.iter().map(|row| row.get::<_, String>(0)).collect()
}

/// `url` with its database replaced by `name`.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let server = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}

/// Every breach of the lease and fencing protocol the database shows (empty when none), each
/// as a sentence naming the run and the rows: a journal row of epoch 2 or more written by
/// another worker than the one that claimed that epoch; a run whose rows' epochs go back
/// down; a row written after its run was claimed away at the next epoch; a row written after
/// its writer's lease expired (for workers whose row is still there: killed or stopped ones,
/// not those that shut down and gave their runs up).
pub async fn fencing_breaches(url: &str) -> Vec<String> {
    const CHECKS: [&str; 4] = [
        "SELECT format('run %s row %s of epoch %s written by %s, but %s claimed that epoch', \
                j.run_id, j.position, j.epoch, j.written_by, c.worker) \
         FROM keel_journal j JOIN keel_claims c ON c.run_id = j.run_id AND c.epoch = j.epoch \
         WHERE j.epoch >= 2 AND j.written_by IS DISTINCT FROM c.worker",
        "SELECT format('run %s row %s has epoch %s after a row of epoch %s', \
                run_id, position, epoch, before) \
         FROM (SELECT run_id, position, epoch, \
                      max(epoch) OVER (PARTITION BY run_id ORDER BY position \
                                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before \
               FROM keel_journal) rows WHERE epoch < before",
        "SELECT format('run %s row %s of epoch %s written at %s, after epoch %s was claimed at %s', \
                j.run_id, j.position, j.epoch, j.written_at, c.epoch, c.claimed_at) \
         FROM keel_journal j JOIN keel_claims c ON c.run_id = j.run_id AND c.epoch = j.epoch + 1 \
         WHERE j.written_at >= c.claimed_at",
        "SELECT format('run %s row %s written by %s at %s, after its lease ended at %s', \
                j.run_id, j.position, j.written_by, j.written_at, w.lease_until) \
         FROM keel_journal j JOIN keel_workers w ON w.id = j.written_by \
         WHERE j.written_at >= w.lease_until",
    ];
    let mut breaches = Vec::new();
    for check in CHECKS {
        breaches.extend(query_texts(url, check).await);
    }
    breaches
}

#[cfg(test)]
mod tests {
    use super::with_database;

    /// The database of a URL is replaced, with or without one, keeping its parameters.
    #[test]
    fn a_url_gets_another_database() {
        assert_eq!(
            with_database("postgres://keel@127.0.0.1:5432/postgres", "t1"),
            "postgres://keel@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://keel@127.0.0.1:5432", "t1"),
            "postgres://keel@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_database("postgres://k@h/db?sslmode=disable", "t1"),
            "postgres://k@h/t1?sslmode=disable"
        );
    }
}

//! The statements the writer runs: one function per request, each on the writer's
//! connection and inside its open transaction when there is one (`writer.rs` decides that),
//! with the errors they name.

use std::collections::BTreeMap;

use super::{RecordRow, Writer};
use crate::error::{EngineError, Result};
use crate::ids::{JournalIndex, RunId};
use crate::journal::{Entry, RunRecord, RunStatus};
use crate::store::{RunsScan, ScannedRuns, Space, Token};

impl Writer {
    pub(super) fn error(&self, source: Box<dyn std::error::Error + Send + Sync>) -> EngineError {
        EngineError::Database {
            database: self.database.clone(),
            source,
        }
    }

    pub(super) fn db(&self, error: tokio_postgres::Error) -> EngineError {
        self.error(Box::new(error))
    }

    pub(super) fn corrupt(&self, what: String, detail: String) -> EngineError {
        EngineError::Corrupt {
            key: format!("{} in {}", what, self.database),
            detail,
        }
    }

    pub(super) fn decode_record(&self, id: &str, text: &str) -> Result<RunRecord> {
        serde_json::from_str(text)
            .map_err(|e| self.corrupt(format!("run record {id}"), format!("run record: {e}")))
    }

    /// Inserts the run owned by this worker at epoch 1 ([`Token::CREATED`]).
    pub(super) async fn create_run(&self, record: RecordRow) -> Result<Option<RunRecord>> {
        let inserted = self
            .client
            .execute(
                "INSERT INTO keel_runs (id, status, parent, record, owner, epoch) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                &[
                    &record.id,
                    &record.status,
                    &record.parent,
                    &record.text,
                    &self.worker,
                    &Token::CREATED.0,
                ],
            )
            .await
            .map_err(|e| self.db(e))?;
        if inserted == 1 {
            return Ok(None);
        }
        let row = self
            .client
            .query_one(&self.statements.run, &[&record.id])
            .await
            .map_err(|e| self.db(e))?;
        self.decode_record(&record.id, row.get(0)).map(Some)
    }

    /// Writes the entry and the record if the run is still this worker's at `token`; else
    /// writes nothing and notes the run fenced (not an error: the transaction holds other
    /// runs' writes, which still commit).
    pub(super) async fn append(
        &self,
        id: RunId,
        index: JournalIndex,
        entry: String,
        record: Option<RecordRow>,
        token: Token,
    ) -> Result<()> {
        let position = i32::try_from(index.0).map_err(|_| {
            self.corrupt(
                format!("journal of run {id}"),
                format!("index {} is past what the database holds", index.0),
            )
        })?;
        let written = self
            .client
            .execute(
                &self.statements.append,
                &[&id.as_str(), &position, &entry, &token.0, &self.worker],
            )
            .await
            .map_err(|e| self.db(e))?;
        if written == 0 {
            tracing::warn!(run_id = %id, epoch = token.0, worker = %self.worker, "write refused: the run was taken over, or this worker's lease expired");
            self.fenced.refused(id, token);
            return Ok(());
        }
        if let Some(record) = record {
            let updated = self
                .client
                .execute(
                    &self.statements.update_record,
                    &[
                        &record.id,
                        &record.status,
                        &record.parent,
                        &record.text,
                        &token.0,
                        &self.worker,
                    ],
                )
                .await
                .map_err(|e| self.db(e))?;
            if updated != 1 {
                return Err(self.corrupt(
                    format!("run record {id}"),
                    "a status transition found no run record to change".into(),
                ));
            }
        }
        Ok(())
    }

    pub(super) async fn delete_runs(&self, ids: Vec<RunId>) -> Result<()> {
        let ids: Vec<&str> = ids.iter().map(RunId::as_str).collect();
        for table in [
            "DELETE FROM keel_journal WHERE run_id = ANY($1)",
            "DELETE FROM keel_load_counts WHERE run_id = ANY($1)",
            "DELETE FROM keel_claims WHERE run_id = ANY($1)",
            "DELETE FROM keel_runs WHERE id = ANY($1)",
        ] {
            self.client
                .execute(table, &[&ids])
                .await
                .map_err(|e| self.db(e))?;
        }
        Ok(())
    }

    pub(super) async fn set_load_count(&self, id: RunId, loads: u32) -> Result<()> {
        if loads == 0 {
            self.client
                .execute(
                    "DELETE FROM keel_load_counts WHERE run_id = $1",
                    &[&id.as_str()],
                )
                .await
                .map_err(|e| self.db(e))?;
            return Ok(());
        }
        let loads = i32::try_from(loads).unwrap_or(i32::MAX);
        self.client
            .execute(
                "INSERT INTO keel_load_counts (run_id, loads) VALUES ($1, $2) \
                 ON CONFLICT (run_id) DO UPDATE SET loads = EXCLUDED.loads",
                &[&id.as_str(), &loads],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    /// Sets the run's wake time if this worker owns it: a cell left over from before another
    /// worker took the run over (it learns so at its next sync) must not move the new
    /// owner's wake time, which claims go by once that owner is gone.
    pub(super) async fn set_wake(&self, id: RunId, wake_ms: i64) -> Result<()> {
        self.client
            .execute(
                &self.statements.set_wake,
                &[&id.as_str(), &wake_ms, &self.worker],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    pub(super) async fn put_stats(&self, operation: String, record: Vec<u8>) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO keel_stats (worker, operation, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (worker, operation) DO UPDATE SET record = EXCLUDED.record",
                &[&self.name, &operation, &record],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    pub(super) async fn put_keyed(&self, space: Space, key: String, value: String) -> Result<()> {
        self.client
            .execute(
                "INSERT INTO keel_keyed (space, key, value) VALUES ($1, $2, $3) \
                 ON CONFLICT (space, key) DO UPDATE SET value = EXCLUDED.value",
                &[&space.as_str(), &key, &value],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    pub(super) async fn delete_keyed(&self, space: Space, key: String) -> Result<()> {
        self.client
            .execute(
                "DELETE FROM keel_keyed WHERE space = $1 AND key = $2",
                &[&space.as_str(), &key],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    pub(super) async fn keyed(&self, space: Space) -> Result<Vec<(String, String)>> {
        let rows = self
            .client
            .query(
                "SELECT key, value FROM keel_keyed WHERE space = $1 ORDER BY key",
                &[&space.as_str()],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }

    pub(super) async fn run(&self, id: RunId) -> Result<Option<RunRecord>> {
        let row = self
            .client
            .query_opt(&self.statements.run, &[&id.as_str()])
            .await
            .map_err(|e| self.db(e))?;
        match row {
            Some(row) => self.decode_record(id.as_str(), row.get(0)).map(Some),
            None => Ok(None),
        }
    }

    pub(super) async fn runs(&self) -> Result<Vec<Result<RunRecord>>> {
        let rows = self
            .client
            .query("SELECT id, record FROM keel_runs ORDER BY id", &[])
            .await
            .map_err(|e| self.db(e))?;
        Ok(rows
            .iter()
            .map(|row| self.decode_record(row.get(0), row.get(1)))
            .collect())
    }

    /// As sled's: records that do not decode are returned beside the page's records and do
    /// not count towards its limit, so a corrupt row can neither end a listing early nor
    /// hide the runs after it.
    pub(super) async fn runs_page(&self, scan: RunsScan) -> Result<ScannedRuns> {
        let status = scan.status.map(RunStatus::as_str);
        // Rows are read in chunks of one more than asked: whether another page follows.
        let chunk = i64::try_from(scan.limit).unwrap_or(i64::MAX - 1) + 1;
        let mut after = scan.after.as_ref().map(|id| id.as_str().to_string());
        let prefix = scan.prefix.clone();
        let prefix_end = scan.prefix.as_deref().and_then(crate::store::prefix_end);
        let (mut page, mut held) = (ScannedRuns::default(), 0);
        loop {
            let rows = self
                .client
                .query(
                    "SELECT id, record FROM keel_runs \
                     WHERE ($1::text IS NULL OR id > $1) AND ($2::text IS NULL OR status = $2) \
                     AND ($4::text IS NULL OR id >= $4) AND ($5::text IS NULL OR id < $5) \
                     ORDER BY id LIMIT $3",
                    &[&after, &status, &chunk, &prefix, &prefix_end],
                )
                .await
                .map_err(|e| self.db(e))?;
            for row in &rows {
                let record = self.decode_record(row.get(0), row.get(1));
                if record.is_ok() {
                    if held == scan.limit {
                        page.more = true;
                        return Ok(page);
                    }
                    held += 1;
                }
                page.records.push(record);
            }
            if (rows.len() as i64) < chunk {
                return Ok(page);
            }
            after = rows.last().map(|row| row.get::<_, String>(0));
        }
    }

    pub(super) async fn run_counts(&self) -> Result<BTreeMap<RunStatus, u64>> {
        let rows = self
            .client
            .query(
                "SELECT status, count(*) FROM keel_runs GROUP BY status",
                &[],
            )
            .await
            .map_err(|e| self.db(e))?;
        let mut counts = BTreeMap::new();
        for row in rows {
            let status: &str = row.get(0);
            let count: i64 = row.get(1);
            let status: RunStatus = serde_json::from_value(status.into()).map_err(|e| {
                self.corrupt("the runs' statuses".into(), format!("{status:?}: {e}"))
            })?;
            counts.insert(status, count as u64);
        }
        Ok(counts)
    }

    pub(super) async fn journal(&self, id: RunId) -> Result<Vec<Entry>> {
        let rows = self
            .client
            .query(&self.statements.journal, &[&id.as_str()])
            .await
            .map_err(|e| self.db(e))?;
        let mut entries = Vec::with_capacity(rows.len());
        for row in rows {
            let position: i32 = row.get(0);
            let corrupt = |detail: String| self.corrupt(format!("journal of run {id}"), detail);
            if position as usize != entries.len() {
                return Err(corrupt(format!(
                    "journal index {position} follows {} entries: gap",
                    entries.len()
                )));
            }
            let entry: Entry = serde_json::from_str(row.get(1))
                .map_err(|e| corrupt(format!("journal entry {position}: {e}")))?;
            entries.push(entry);
        }
        Ok(entries)
    }

    pub(super) async fn load_count(&self, id: RunId) -> Result<u32> {
        let row = self
            .client
            .query_opt(
                "SELECT loads FROM keel_load_counts WHERE run_id = $1",
                &[&id.as_str()],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(row.map_or(0, |row| row.get::<_, i32>(0).max(0) as u32))
    }

    pub(super) async fn stats(&self, mine: bool) -> Result<Vec<(String, Vec<u8>)>> {
        let rows = self
            .client
            .query(
                "SELECT operation, record FROM keel_stats \
                 WHERE (worker = $1) = $2 ORDER BY operation, worker",
                &[&self.name, &mine],
            )
            .await
            .map_err(|e| self.db(e))?;
        Ok(rows
            .into_iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect())
    }
}

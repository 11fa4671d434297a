//! Keeping the lease (steps 1 and 2 of the protocol in `lease.rs`), and learning, at every
//! renewal, which runs other workers claimed since the last one (`fences.rs`), so that a run
//! taken from this live worker stops here within a renewal.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_postgres::Client;

use super::lease::Leases;
use super::writer::Fenced;
use crate::ids::RunId;

/// How far back each look at other workers' claims reaches before the last one seen: a
/// claim's time is taken inside its statement and becomes visible at its commit, a little
/// later.
const CLAIMS_OVERLAP: Duration = Duration::from_secs(5);

/// See the module doc.
pub(super) struct Renewer {
    pub(super) client: Client,
    pub(super) worker: String,
    pub(super) database: String,
    pub(super) leases: Leases,
    /// When the lease ends by this worker's clock: the send time of the last renewal that
    /// succeeded, plus the lease (the database's clock started the lease later than that).
    pub(super) valid_until: Arc<Mutex<Instant>>,
    pub(super) fences: Fenced,
    /// Claims by other workers up to this time (the database's) have been seen.
    pub(super) since: SystemTime,
}

impl Renewer {
    /// Renews until `stopped` is set; on a lost lease, ends it by this worker's clock and
    /// calls `lost` with the reason.
    pub(super) async fn serve(
        mut self,
        mut stopped: watch::Receiver<bool>,
        lost: impl FnOnce(String),
    ) {
        let mut tick = tokio::time::interval(self.leases.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stopped.wait_for(|stop| *stop) => return,
            }
            if let Err(why) = self.renew().await {
                if *stopped.borrow() {
                    return;
                }
                // Known lost: nothing of this worker's runs goes on from now.
                *self.valid_until.lock().expect("lease lock") = Instant::now();
                tracing::error!(worker = %self.worker, database = %self.database, %why, "lease lost: this worker stops driving runs");
                lost(why);
                return;
            }
            if let Err(error) = self.learn_claims().await {
                tracing::warn!(worker = %self.worker, %error, "other workers' claims could not be read");
            }
        }
    }

    /// Extends the lease, or says why it is lost. A renewal that fails for want of the
    /// database is retried until the lease would have ended by this worker's clock.
    async fn renew(&mut self) -> std::result::Result<(), String> {
        let length_ms = self.leases.length.as_millis() as i64;
        loop {
            let sent = Instant::now();
            let valid_until = *self.valid_until.lock().expect("lease lock");
            if sent >= valid_until {
                return Err(format!(
                    "the lease of {:?} ended before it could be renewed",
                    self.leases.length
                ));
            }
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
                [&self.worker, &length_ms];
            let renewal = self.client.execute(
                "UPDATE keel_workers \
                 SET lease_until = clock_timestamp() + $2::bigint * interval '1 millisecond' \
                 WHERE id = $1 AND lease_until > clock_timestamp()",
                &params,
            );
            match tokio::time::timeout(valid_until - sent, renewal).await {
                // A renewal heard of only once the lease had ended by this worker's clock
                // counts as lost: the writer may already have refused a commit for it.
                Ok(Ok(1)) if Instant::now() >= valid_until => {
                    return Err(format!(
                        "the lease of {:?} ended before its renewal was answered",
                        self.leases.length
                    ));
                }
                Ok(Ok(1)) => {
                    *self.valid_until.lock().expect("lease lock") = sent + self.leases.length;
                    return Ok(());
                }
                Ok(Ok(_)) => {
                    return Err(
                        "the database says the lease expired (another worker may own its runs now)"
                            .into(),
                    );
                }
                Ok(Err(error)) if error.is_closed() => {
                    return Err(format!("the lease's connection is gone: {error}"));
                }
                Ok(Err(error)) => {
                    tracing::warn!(worker = %self.worker, %error, "lease renewal failed; retrying");
                    tokio::time::sleep(self.leases.renew_every / 4).await;
                }
                Err(_) => {
                    return Err(format!(
                        "the database did not answer a renewal before the lease of {:?} ended",
                        self.leases.length
                    ));
                }
            }
        }
    }

    /// Notes the runs other workers claimed since the last look (`fences.rs`).
    async fn learn_claims(&mut self) -> std::result::Result<(), tokio_postgres::Error> {
        let from = self.since - CLAIMS_OVERLAP;
        let rows = self
            .client
            .query(
                "SELECT run_id, epoch, claimed_at FROM keel_claims \
                 WHERE worker <> $1 AND claimed_at > $2",
                &[&self.worker, &from],
            )
            .await?;
        for row in rows {
            let claimed_at: SystemTime = row.get(2);
            self.since = self.since.max(claimed_at);
            if let Ok(id) = RunId::existing(row.get::<_, String>(0)) {
                self.fences.claimed(id, row.get(1));
            }
        }
        self.fences.prune();
        Ok(())
    }
}

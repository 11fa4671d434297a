//! Notices at the engine: the pending ones, each handed out only once its transition is
//! found in the journal and durable, and recording where they were delivered (`notice.rs`
//! explains the outbox).

use tokio::sync::watch;

use crate::engine::Engine;
use crate::error::{EngineError, Result};
use crate::notice::Notice;
use crate::store::Space;

/// What the journal says of a stored notice.
enum Standing {
    /// Its transition's entry is in the journal.
    Made,
    /// Its index is not written yet: the transition may be on its way (written under the
    /// cell lock right after the notice), or lost with a crash and not yet redone.
    NotYet,
    /// Its index holds another entry, or the run is gone: the transition never happened.
    Never,
}

impl Engine {
    /// The notices waiting for delivery, oldest transition first (then by event id). Each
    /// one's transition is durable when this returns. Notices are written by an engine built
    /// with [`crate::EngineBuilder::notify_on`]; on a store several engines share, each of
    /// them sees every notice.
    pub async fn notices(&self) -> Result<Vec<Notice>> {
        let store = &*self.inner.env.store;
        let mut notices = Vec::new();
        let mut confirming = Vec::new();
        for (key, text) in store.keyed(Space::Notice).await? {
            let notice: Notice = match serde_json::from_str(&text) {
                Ok(notice) => notice,
                Err(error) => {
                    // One bad record must not stop the others from being delivered.
                    tracing::error!(event_id = %key, %error, "a stored notice does not decode");
                    continue;
                }
            };
            let confirmed = (self.inner.outbox.confirmed.lock())
                .expect("confirmed lock")
                .contains(&key);
            if confirmed {
                notices.push(notice);
                continue;
            }
            match self.standing(&notice).await? {
                Standing::Made => {
                    confirming.push(key);
                    notices.push(notice);
                }
                Standing::NotYet => {}
                Standing::Never => {
                    tracing::info!(
                        event_id = %key,
                        "a notice whose transition never became durable is dropped"
                    );
                    store.delete_keyed(Space::Notice, &key)?;
                }
            }
        }
        // Every entry read above is durable once this sync resolves (reads return writes
        // that are not durable yet).
        store.sync().wait().await?;
        self.inner
            .outbox
            .confirmed
            .lock()
            .expect("confirmed lock")
            .extend(confirming);
        notices.sort_by(|a, b| (a.at_ms, &a.event_id).cmp(&(b.at_ms, &b.event_id)));
        Ok(notices)
    }

    /// Where `notice`'s transition stands in its run's journal.
    async fn standing(&self, notice: &Notice) -> Result<Standing> {
        let store = &*self.inner.env.store;
        let Some(index) = notice.index() else {
            return Ok(Standing::Never);
        };
        let journal = store.journal(&notice.run_id).await?;
        match journal.get(index.0 as usize) {
            Some(entry) if notice.made_by(entry) => Ok(Standing::Made),
            Some(_) => Ok(Standing::Never),
            // The run was deleted (purged, collected) before its notice went out: its journal
            // is gone, so the transition cannot be checked. It is sent: a notice is never lost
            // for a transition that was durable, and one undone by a crash as well as deleted
            // is the rarer error (at least once).
            None if store.run(&notice.run_id).await?.is_none() => Ok(Standing::Made),
            None => Ok(Standing::NotYet),
        }
    }

    /// Records that notice `event_id` reached `target` (a name of the caller's: a URL, say),
    /// durably before it returns. A notice that is not pending (done meanwhile) is left so.
    pub async fn notice_delivered(&self, event_id: &str, target: &str) -> Result<()> {
        let store = &*self.inner.env.store;
        let _updating = self.inner.outbox.updating.lock().await;
        let stored = store.keyed(Space::Notice).await?;
        let Some((_, text)) = stored.into_iter().find(|(key, _)| key == event_id) else {
            return Ok(());
        };
        let mut notice: Notice = serde_json::from_str(&text).map_err(|e| EngineError::Corrupt {
            key: format!("notice {event_id}"),
            detail: e.to_string(),
        })?;
        if notice.deliver(target)? {
            notice.put(store)?;
        }
        store.sync().wait().await?;
        Ok(())
    }

    /// Deletes notice `event_id` (every target has it), durably before it returns.
    pub async fn notice_done(&self, event_id: &str) -> Result<()> {
        let store = &*self.inner.env.store;
        let _updating = self.inner.outbox.updating.lock().await;
        store.delete_keyed(Space::Notice, event_id)?;
        store.sync().wait().await?;
        self.inner
            .outbox
            .confirmed
            .lock()
            .expect("confirmed lock")
            .remove(event_id);
        Ok(())
    }

    /// Changes whenever this engine wrote a notice: what a sender waits on between passes
    /// (it then asks [`Engine::notices`], which hands out only durable ones).
    pub fn notices_written(&self) -> watch::Receiver<u64> {
        self.inner.outbox.subscribe()
    }
}

//! An operator's requests that a loaded run's lanes act on between operations: a cancel, and
//! whether a pause stands. Two flags and one [`Notify`], not a watch channel each: a channel
//! costs about 400 bytes per loaded run, and making one and dropping it (which wakes each of
//! its eight waiter lists) cost about 1% of a durable start's instructions.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::futures::Notified;
use tokio::sync::Notify;

#[derive(Debug)]
pub(crate) struct Requests {
    /// Set once a cancel is durably journaled; never cleared.
    cancel: AtomicBool,
    /// Whether a pause request stands, as last told ([`Requests::tell_pause`]).
    pause: AtomicBool,
    /// Woken at every tell of either (a tell of the value it had too).
    changed: Notify,
}

impl Requests {
    /// The requests a run's journal holds when its cell is made.
    pub(crate) fn new(cancel: bool, pause: bool) -> Requests {
        Requests {
            cancel: AtomicBool::new(cancel),
            pause: AtomicBool::new(pause),
            changed: Notify::new(),
        }
    }

    /// Whether a cancel was requested.
    pub(crate) fn cancel_requested(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Whether a pause request stands, as last told.
    pub(crate) fn pause_told(&self) -> bool {
        self.pause.load(Ordering::SeqCst)
    }

    /// Tells the lanes that a cancel was requested (durably journaled).
    pub(crate) fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Tells the lanes whether a pause request stands.
    pub(crate) fn tell_pause(&self, stands: bool) {
        self.pause.store(stands, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    /// Resolves at the next change after this call (not after its first poll): take it
    /// before reading the flags, and a change between the read and the await is not missed.
    pub(crate) fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A change made after `changed()` was called, before its first poll, wakes it; one made
    /// before does not (the flags say it), and each setter wakes every waiter.
    #[tokio::test(start_paused = true)]
    async fn a_change_after_the_wait_was_taken_wakes_it() {
        let requests = Arc::new(Requests::new(false, false));
        let early = requests.changed();
        requests.tell_pause(true);
        tokio::time::timeout(Duration::from_secs(5), early)
            .await
            .expect("woken by the change after it was taken");
        assert!(requests.pause_told() && !requests.cancel_requested());

        let late = requests.changed();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let requests = Arc::clone(&requests);
                tokio::spawn(async move { requests.changed().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), late)
                .await
                .is_err(),
            "nothing changed since it was taken"
        );
        requests.cancel();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("every waiter woken")
                .unwrap();
        }
        assert!(requests.cancel_requested());
    }
}

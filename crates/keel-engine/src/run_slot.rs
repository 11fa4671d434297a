//! A driven run's slot among the runs the engine drives at once
//! (`EngineBuilder::runs_concurrent_max`). The driver takes it before it drives the run and
//! holds it until it stops, except while the run awaits a child run (or, compensating, a
//! child's own saga): then the slot is given up (by the first of the run's branches to await
//! one) and taken back (by the last to end its wait), so that parents filling every slot
//! cannot keep their children from running.

use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One run's slot, held in its cell.
#[derive(Default)]
pub(crate) struct RunSlot(Mutex<Held>);

#[derive(Default)]
struct Held {
    /// The slot, while the run holds it.
    permit: Option<OwnedSemaphorePermit>,
    /// The run's branches awaiting a child run now.
    awaiting: u32,
}

impl RunSlot {
    /// The driver took `permit` for the run.
    pub(crate) fn hold(&self, permit: OwnedSemaphorePermit) {
        self.0.lock().expect("slot lock").permit = Some(permit);
    }

    /// The driver stopped: the slot goes back to the engine.
    pub(crate) fn release(&self) {
        let permit = self.0.lock().expect("slot lock").permit.take();
        drop(permit);
    }

    /// A branch of the run starts awaiting a child run: the first gives the slot up.
    pub(crate) fn give_up(&self) {
        let mut held = self.0.lock().expect("slot lock");
        held.awaiting += 1;
        let permit = held.permit.take();
        drop(held);
        drop(permit);
    }

    /// A branch ended its wait for a child run: the last takes a slot again, waiting for one
    /// as a new run does. `false` if the engine shut down first (the run is not driven on).
    pub(crate) async fn take_back(
        &self,
        permits: &Arc<Semaphore>,
        shutdown: &tokio::sync::watch::Sender<bool>,
    ) -> bool {
        {
            let mut held = self.0.lock().expect("slot lock");
            held.awaiting = held.awaiting.saturating_sub(1);
            if held.awaiting > 0 || held.permit.is_some() {
                return true;
            }
        }
        let mut down = shutdown.subscribe();
        let permit = tokio::select! {
            permit = Arc::clone(permits).acquire_owned() => permit.ok(),
            _ = down.wait_for(|down| *down) => None,
        };
        let Some(permit) = permit else {
            return false;
        };
        let mut held = self.0.lock().expect("slot lock");
        // Another branch started awaiting meanwhile: the slot stays given up.
        if held.awaiting == 0 && held.permit.is_none() {
            held.permit = Some(permit);
        }
        true
    }
}

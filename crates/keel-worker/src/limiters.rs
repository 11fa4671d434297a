//! The rate limiters' recent history, for `GET /v1/limiters` and the console: every
//! [`SAMPLE_INTERVAL`] the worker samples each service's AIMD limiter (its admitted rate and
//! its throttles so far) into a ring of the last [`SAMPLES_KEPT`] samples per service (one
//! hour). The history is in memory only: it starts empty when the worker starts.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_engine::Engine;
use serde::{Deserialize, Serialize};

use crate::api::SERVICES;

/// How often each limiter is sampled.
pub(crate) const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);

/// Samples kept per service: one hour at [`SAMPLE_INTERVAL`].
pub(crate) const SAMPLES_KEPT: usize = 720;

const _: () = assert!(SAMPLES_KEPT as u64 * SAMPLE_INTERVAL.as_secs() == 3600);

/// One sample of a limiter.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LimiterSample {
    /// When it was taken (ms since the Unix epoch).
    pub at_ms: u64,
    /// The rate the limiter admitted then, in calls per second.
    pub rate: f64,
    /// Throttled answers the limiter had been told of by then, since the worker started.
    pub throttles: u64,
}

/// What `GET /v1/limiters` answers for one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct LimiterView {
    /// The service (`iam`, `sts`, `iot`, `greengrass`).
    pub service: String,
    /// The rate the limiter admits now, in calls per second.
    pub rate: f64,
    /// Throttled answers so far.
    pub throttles: u64,
    /// The samples of the last hour, oldest first.
    pub history: Vec<LimiterSample>,
}

/// The rings of samples, one per service of [`SERVICES`], in its order.
#[derive(Debug)]
pub(crate) struct LimiterHistory {
    rings: Mutex<Vec<VecDeque<LimiterSample>>>,
}

impl Default for LimiterHistory {
    fn default() -> Self {
        LimiterHistory {
            rings: Mutex::new(vec![VecDeque::with_capacity(SAMPLES_KEPT); SERVICES.len()]),
        }
    }
}

impl LimiterHistory {
    /// Samples every service's limiter of `engine` at `at_ms`, dropping the oldest samples
    /// past [`SAMPLES_KEPT`].
    pub(crate) fn sample(&self, engine: &Engine, at_ms: u64) {
        let mut rings = self.rings.lock().expect("limiter history lock");
        for (ring, service) in rings.iter_mut().zip(SERVICES) {
            let limiter = engine.rate_limiter(service);
            if ring.len() == SAMPLES_KEPT {
                ring.pop_front();
            }
            ring.push_back(LimiterSample {
                at_ms,
                rate: limiter.rate(),
                throttles: limiter.throttles(),
            });
        }
    }

    /// Each service's limiter now, with its history.
    pub(crate) fn views(&self, engine: &Engine) -> Vec<LimiterView> {
        let rings = self.rings.lock().expect("limiter history lock");
        rings
            .iter()
            .zip(SERVICES)
            .map(|(ring, service)| {
                let limiter = engine.rate_limiter(service);
                LimiterView {
                    service: service.to_string(),
                    rate: limiter.rate(),
                    throttles: limiter.throttles(),
                    history: ring.iter().copied().collect(),
                }
            })
            .collect()
    }

    /// Samples `engine`'s limiters now and every [`SAMPLE_INTERVAL`] until `stopping` turns
    /// true (or its sender is gone).
    pub(crate) async fn run(
        self: Arc<Self>,
        engine: Engine,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut ticks = tokio::time::interval(SAMPLE_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => self.sample(&engine, now_ms()),
                changed = stopping.changed() => {
                    if changed.is_err() || *stopping.borrow() {
                        return;
                    }
                }
            }
        }
    }
}

/// Wall-clock time in ms since the Unix epoch (0 before it).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The history keeps each service's last hour of samples, oldest first, each with the
    /// limiter's rate and throttles at the time; a throttled call shows in the next sample.
    #[tokio::test]
    async fn the_history_keeps_the_last_hour_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::builder(dir.path().join("journal"))
            .open()
            .await
            .unwrap();
        let history = LimiterHistory::default();
        let kept = SAMPLES_KEPT as u64;
        for i in 0..kept + 4 {
            history.sample(&engine, i * 5_000);
        }
        let iot = engine.rate_limiter("iot");
        let before = iot.rate();
        iot.throttled(iot.acquire().await);
        history.sample(&engine, (kept + 4) * 5_000);

        let views = history.views(&engine);
        let services: Vec<&str> = views.iter().map(|v| v.service.as_str()).collect();
        assert_eq!(services, SERVICES);
        for view in &views {
            let times: Vec<u64> = view.history.iter().map(|s| s.at_ms).collect();
            let expected: Vec<u64> = (5..kept + 5).map(|i| i * 5_000).collect();
            assert_eq!(times, expected, "{}", view.service);
            let limiter = engine.rate_limiter(&view.service);
            assert_eq!(
                (view.rate, view.throttles),
                (limiter.rate(), limiter.throttles())
            );
        }
        let iot = &views[2];
        let last = iot.history[SAMPLES_KEPT - 1];
        let previous = iot.history[SAMPLES_KEPT - 2];
        assert_eq!((previous.rate, previous.throttles), (before, 0));
        assert_eq!(last.throttles, 1);
        // The rate changes only when the limiter's window closes: as the limiter says now.
        assert_eq!(last.rate, engine.rate_limiter("iot").rate());
        engine.shutdown().await;
    }
}

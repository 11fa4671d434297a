//! The simulated cloud's state and rules, and the ground truth it keeps.
//!
//! Every call first meets throttling: a fraction is throttled at random, and the rest take a
//! token from a bucket refilled at the account's capacity (calls/s); a call that finds it
//! empty is throttled too. Throttled calls have no effect and take no token.
//!
//! A resource's readiness time is drawn when it is created, from a log-normal body with a
//! fraction of outliers 10-100x the median, seeded by the cloud's seed and the client token (so
//! the same resource gets the same draw in every run of a scenario, whatever the call order).
//! Reads lie around readiness, never about termination:
//!
//! | time of the read                 | answer                                         |
//! |----------------------------------|------------------------------------------------|
//! | within `visibility_lag` of create | missing with probability `missing_p`, else as below |
//! | before `ready - flap_window`     | pending                                        |
//! | in `[ready - flap_window, ready)` | ready with probability `flap_p`, else pending |
//! | in `[ready, ready + flap_window)` | missing or pending with probability `flap_p`, else ready |
//! | later                            | ready                                          |
//! | after termination                | gone                                           |
//!
//! Mutating calls (attach, delete) act on the truth: attach needs both resources really ready.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::wire::{Kind, Observed, Op, Reply, Request, Throttle};

/// How the simulated cloud behaves. Times in milliseconds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloudConfig {
    /// Seeds readiness draws (with each client token) and the per-call draws.
    pub seed: u64,
    /// Median readiness time of the log-normal body.
    pub ready_median_ms: f64,
    /// Standard deviation of the body's logarithm.
    pub ready_sigma: f64,
    /// Fraction of resources that are outliers.
    pub outlier_rate: f64,
    /// Outliers take between this many times the median...
    pub outlier_low: f64,
    /// ... and this many (log-uniform).
    pub outlier_high: f64,
    /// After a create, reads may answer "missing" for this long.
    pub visibility_lag_ms: u64,
    /// The probability of "missing" inside the visibility window.
    pub missing_p: f64,
    /// Reads lie this long before and after readiness.
    pub flap_window_ms: u64,
    /// The probability that a read inside the flap window lies.
    pub flap_p: f64,
    /// The fraction of every call throttled at random.
    pub throttle_p: f64,
    /// Calls per second the account may make (token bucket refill).
    pub capacity_per_s: f64,
    /// The bucket's size, in calls.
    pub burst: f64,
}

impl CloudConfig {
    /// An EC2-like cloud: readiness median 2 s (sigma 0.5) with 2% outliers at 10-100x, reads
    /// lying for 1 s around readiness and missing during 1 s after a create, 5% random
    /// throttling, 25 calls/s with a burst of 25.
    pub const EC2: CloudConfig = CloudConfig {
        seed: 1,
        ready_median_ms: 2_000.0,
        ready_sigma: 0.5,
        outlier_rate: 0.02,
        outlier_low: 10.0,
        outlier_high: 100.0,
        visibility_lag_ms: 1_000,
        missing_p: 0.5,
        flap_window_ms: 1_000,
        flap_p: 0.25,
        throttle_p: 0.05,
        capacity_per_s: 25.0,
        burst: 25.0,
    };

    /// Every time constant multiplied by `factor` (rates and probabilities unchanged).
    pub fn time_scaled(self, factor: f64) -> CloudConfig {
        let ms = |v: u64| ((v as f64) * factor).round() as u64;
        CloudConfig {
            ready_median_ms: self.ready_median_ms * factor,
            visibility_lag_ms: ms(self.visibility_lag_ms),
            flap_window_ms: ms(self.flap_window_ms),
            ..self
        }
    }

    /// The readiness delay of the resource created with `token`: a pure function of the seed
    /// and the token.
    pub fn readiness_ms(&self, token: &str) -> u64 {
        let mut hasher = DefaultHasher::new();
        (self.seed, token).hash(&mut hasher);
        let mut rng = StdRng::seed_from_u64(hasher.finish());
        let factor = if rng.gen::<f64>() < self.outlier_rate {
            let (low, high) = (self.outlier_low.ln(), self.outlier_high.ln());
            rng.gen_range(low..high.max(low + f64::EPSILON)).exp()
        } else {
            (self.ready_sigma * standard_normal(&mut rng)).exp()
        };
        (self.ready_median_ms * factor).round().max(1.0) as u64
    }
}

/// Box-Muller.
fn standard_normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// One resource, as the cloud knows it: the ground truth. Times in ms since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// Its id (`i-...`, `vol-...`).
    pub id: String,
    /// Instance or volume.
    pub kind: Kind,
    /// The client token it was created with.
    pub token: String,
    /// The run that created it (tag).
    pub run: String,
    /// Its generation within the run (tag).
    pub generation: u32,
    /// When it was created.
    pub created_at_ms: u64,
    /// When it became (or would have become) ready.
    pub ready_at_ms: u64,
    /// When the first delete naming it arrived (throttled or not): when the caller decided to
    /// get rid of it.
    pub delete_requested_at_ms: Option<u64>,
    /// When it was terminated or deleted.
    pub deleted_at_ms: Option<u64>,
    /// The instance a volume is attached to.
    pub attached_to: Option<String>,
    /// When a volume was first attached.
    pub attached_at_ms: Option<u64>,
    /// Reads naming it, throttled ones included.
    pub describes: u32,
    /// Reads naming it that were answered.
    pub describes_answered: u32,
}

impl Resource {
    /// Whether it had been ready for at least `grace_ms` when its delete was first asked for:
    /// a healthy resource destroyed.
    pub fn destroyed_healthy(&self, grace_ms: u64) -> bool {
        self.delete_requested_at_ms
            .is_some_and(|at| self.ready_at_ms.saturating_add(grace_ms) <= at)
    }

    fn ready_at(&self, now_ms: u64) -> bool {
        self.deleted_at_ms.is_none() && now_ms >= self.ready_at_ms
    }
}

/// One call, as the cloud saw it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// When it arrived (ms since the Unix epoch).
    pub at_ms: u64,
    /// What it asked.
    pub op: Op,
    /// The resource it named by id, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// How it ended.
    pub outcome: CallOutcome,
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// Served (whatever the answer).
    Accepted,
    /// Throttled, without effect.
    Throttled(Throttle),
}

/// Everything the cloud knows, copied out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroundTruth {
    /// Every resource ever created, in creation order.
    pub resources: Vec<Resource>,
    /// Every call, in arrival order.
    pub calls: Vec<Call>,
}

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

/// The simulated cloud.
#[derive(Debug)]
pub struct Cloud {
    config: CloudConfig,
    resources: Vec<Resource>,
    by_id: HashMap<String, usize>,
    by_token: HashMap<(Kind, String), usize>,
    bucket: Bucket,
    rng: StdRng,
    calls: Vec<Call>,
}

impl Cloud {
    /// An empty cloud whose bucket is full at `now_ms`.
    pub fn new(config: CloudConfig, now_ms: u64) -> Cloud {
        Cloud {
            bucket: Bucket {
                tokens: config.burst.max(1.0),
                at_ms: now_ms,
            },
            rng: StdRng::seed_from_u64(config.seed ^ 0x5eed_c10d),
            config,
            resources: Vec::new(),
            by_id: HashMap::new(),
            by_token: HashMap::new(),
            calls: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &CloudConfig {
        &self.config
    }

    /// A copy of the ground truth.
    pub fn truth(&self) -> GroundTruth {
        GroundTruth {
            resources: self.resources.clone(),
            calls: self.calls.clone(),
        }
    }

    /// Serves one call arriving at `now_ms`.
    pub fn handle(&mut self, now_ms: u64, request: &Request) -> Reply {
        let named = request
            .resource_id()
            .and_then(|id| self.by_id.get(id).copied());
        if let (Some(i), Request::Describe { .. }) = (named, request) {
            self.resources[i].describes += 1;
        }
        if let (Some(i), Request::Delete { .. }) = (named, request) {
            self.resources[i]
                .delete_requested_at_ms
                .get_or_insert(now_ms);
        }
        let outcome = match self.admit(now_ms) {
            Some(cause) => CallOutcome::Throttled(cause),
            None => CallOutcome::Accepted,
        };
        self.calls.push(Call {
            at_ms: now_ms,
            op: request.op(),
            resource: request.resource_id().map(str::to_owned),
            outcome,
        });
        if let CallOutcome::Throttled(cause) = outcome {
            return Reply::Throttled { cause };
        }
        self.serve(now_ms, request)
    }

    /// Throttles the call (and says why), or takes a token for it.
    fn admit(&mut self, now_ms: u64) -> Option<Throttle> {
        if self.rng.gen::<f64>() < self.config.throttle_p {
            return Some(Throttle::Random);
        }
        let elapsed_s = now_ms.saturating_sub(self.bucket.at_ms) as f64 / 1000.0;
        self.bucket.tokens = (self.bucket.tokens + elapsed_s * self.config.capacity_per_s)
            .min(self.config.burst.max(1.0));
        self.bucket.at_ms = self.bucket.at_ms.max(now_ms);
        if self.bucket.tokens < 1.0 {
            return Some(Throttle::Capacity);
        }
        self.bucket.tokens -= 1.0;
        None
    }

    fn serve(&mut self, now_ms: u64, request: &Request) -> Reply {
        match request {
            Request::Create {
                kind,
                token,
                run,
                generation,
            } => self.create(now_ms, *kind, token, run, *generation),
            Request::Describe { kind, id } => self.describe(now_ms, *kind, id),
            Request::FindByToken { kind, token } => Reply::Found {
                id: self
                    .by_token
                    .get(&(*kind, token.clone()))
                    .map(|&i| self.resources[i].id.clone()),
            },
            Request::Delete { kind, id } => self.delete(now_ms, *kind, id),
            Request::Attach { volume, instance } => self.attach(now_ms, volume, instance),
            Request::Detach { volume, instance } => {
                let Some(v) = self.find(Kind::Volume, volume) else {
                    return Reply::NotFound { id: volume.clone() };
                };
                if self.resources[v].attached_to.as_deref() == Some(instance.as_str()) {
                    self.resources[v].attached_to = None;
                }
                Reply::Done
            }
        }
    }

    fn find(&self, kind: Kind, id: &str) -> Option<usize> {
        self.by_id
            .get(id)
            .copied()
            .filter(|&i| self.resources[i].kind == kind)
    }

    fn create(
        &mut self,
        now_ms: u64,
        kind: Kind,
        token: &str,
        run: &str,
        generation: u32,
    ) -> Reply {
        if let Some(&i) = self.by_token.get(&(kind, token.to_string())) {
            return Reply::Created {
                id: self.resources[i].id.clone(),
            };
        }
        let id = format!("{}-{:08x}", kind.prefix(), self.resources.len() + 1);
        let ready_at_ms = now_ms + self.config.readiness_ms(token);
        self.by_id.insert(id.clone(), self.resources.len());
        self.by_token
            .insert((kind, token.to_string()), self.resources.len());
        self.resources.push(Resource {
            id: id.clone(),
            kind,
            token: token.to_string(),
            run: run.to_string(),
            generation,
            created_at_ms: now_ms,
            ready_at_ms,
            delete_requested_at_ms: None,
            deleted_at_ms: None,
            attached_to: None,
            attached_at_ms: None,
            describes: 0,
            describes_answered: 0,
        });
        Reply::Created { id }
    }

    fn describe(&mut self, now_ms: u64, kind: Kind, id: &str) -> Reply {
        let Some(i) = self.find(kind, id) else {
            return Reply::NotFound { id: id.to_string() };
        };
        self.resources[i].describes_answered += 1;
        let r = &self.resources[i];
        let (created, ready) = (r.created_at_ms, r.ready_at_ms);
        let flap = self.config.flap_window_ms;
        let state = if r.deleted_at_ms.is_some() {
            Observed::Gone
        } else if now_ms < created + self.config.visibility_lag_ms
            && self.rng.gen::<f64>() < self.config.missing_p
        {
            Observed::Missing
        } else if now_ms < ready {
            if now_ms + flap >= ready && self.rng.gen::<f64>() < self.config.flap_p {
                Observed::Ready
            } else {
                Observed::Pending
            }
        } else if now_ms < ready + flap && self.rng.gen::<f64>() < self.config.flap_p {
            if self.rng.gen::<bool>() {
                Observed::Missing
            } else {
                Observed::Pending
            }
        } else {
            Observed::Ready
        };
        Reply::State { state }
    }

    fn delete(&mut self, now_ms: u64, kind: Kind, id: &str) -> Reply {
        let Some(i) = self.find(kind, id) else {
            return Reply::NotFound { id: id.to_string() };
        };
        if self.resources[i].deleted_at_ms.is_some() {
            return Reply::Done;
        }
        match kind {
            Kind::Volume => {
                if let Some(instance) = &self.resources[i].attached_to {
                    return Reply::IncorrectState {
                        message: format!("volume {id} is in use by {instance}"),
                    };
                }
            }
            Kind::Instance => {
                for r in &mut self.resources {
                    if r.attached_to.as_deref() == Some(id) {
                        r.attached_to = None;
                    }
                }
            }
        }
        self.resources[i].deleted_at_ms = Some(now_ms);
        Reply::Done
    }

    fn attach(&mut self, now_ms: u64, volume: &str, instance: &str) -> Reply {
        let (Some(v), Some(i)) = (
            self.find(Kind::Volume, volume),
            self.find(Kind::Instance, instance),
        ) else {
            return Reply::NotFound {
                id: format!("{volume} or {instance}"),
            };
        };
        if self.resources[v].attached_to.as_deref() == Some(instance) {
            return Reply::Done;
        }
        for r in [v, i] {
            if self.resources[r].deleted_at_ms.is_some() {
                return Reply::Invalid {
                    message: format!(
                        "{} {} is gone",
                        self.resources[r].kind, self.resources[r].id
                    ),
                };
            }
        }
        if let Some(other) = &self.resources[v].attached_to {
            return Reply::IncorrectState {
                message: format!("volume {volume} is in use by {other}"),
            };
        }
        for r in [v, i] {
            if !self.resources[r].ready_at(now_ms) {
                return Reply::IncorrectState {
                    message: format!(
                        "{} {} is not ready",
                        self.resources[r].kind, self.resources[r].id
                    ),
                };
            }
        }
        self.resources[v].attached_to = Some(instance.to_string());
        self.resources[v].attached_at_ms.get_or_insert(now_ms);
        Reply::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calm() -> CloudConfig {
        CloudConfig {
            throttle_p: 0.0,
            missing_p: 0.0,
            flap_p: 0.0,
            ..CloudConfig::EC2
        }
    }

    fn create(cloud: &mut Cloud, now_ms: u64, token: &str) -> Reply {
        cloud.handle(
            now_ms,
            &Request::Create {
                kind: Kind::Instance,
                token: token.into(),
                run: "r".into(),
                generation: 0,
            },
        )
    }

    #[test]
    fn a_create_with_a_known_token_returns_the_same_resource() {
        let mut cloud = Cloud::new(calm(), 0);
        let a = create(&mut cloud, 0, "t1");
        assert_eq!(create(&mut cloud, 10, "t1"), a);
        assert_ne!(create(&mut cloud, 20, "t2"), a);
        assert_eq!(cloud.truth().resources.len(), 2);
    }

    #[test]
    fn the_bucket_throttles_past_its_capacity_and_refills() {
        let mut cloud = Cloud::new(
            CloudConfig {
                burst: 5.0,
                capacity_per_s: 10.0,
                ..calm()
            },
            0,
        );
        let outcomes: Vec<_> = (0..7)
            .map(|i| create(&mut cloud, 0, &i.to_string()))
            .collect();
        assert!(matches!(outcomes[4], Reply::Created { .. }));
        assert_eq!(
            outcomes[5],
            Reply::Throttled {
                cause: Throttle::Capacity
            }
        );
        // 100 ms later one token is back.
        assert!(matches!(
            create(&mut cloud, 100, "x"),
            Reply::Created { .. }
        ));
        assert!(matches!(
            create(&mut cloud, 100, "y"),
            Reply::Throttled { .. }
        ));
    }

    #[test]
    fn readiness_is_a_pure_function_of_seed_and_token_with_a_heavy_tail() {
        let config = CloudConfig::EC2;
        assert_eq!(config.readiness_ms("a"), config.readiness_ms("a"));
        let mut draws: Vec<u64> = (0..10_000)
            .map(|i| config.readiness_ms(&i.to_string()))
            .collect();
        draws.sort_unstable();
        let median = draws[5_000] as f64;
        assert!((1_800.0..2_200.0).contains(&median), "{median}");
        let over_10x = draws.iter().filter(|&&d| d as f64 > 10.0 * median).count();
        assert!((100..300).contains(&over_10x), "{over_10x}");
    }

    #[test]
    fn attach_needs_both_really_ready_and_delete_records_its_first_request() {
        let mut cloud = Cloud::new(calm(), 0);
        let Reply::Created { id: i } = create(&mut cloud, 0, "i") else {
            panic!()
        };
        let Reply::Created { id: v } = cloud.handle(
            0,
            &Request::Create {
                kind: Kind::Volume,
                token: "v".into(),
                run: "r".into(),
                generation: 0,
            },
        ) else {
            panic!()
        };
        let attach = Request::Attach {
            volume: v.clone(),
            instance: i.clone(),
        };
        assert!(matches!(
            cloud.handle(1, &attach),
            Reply::IncorrectState { .. }
        ));
        let later = 1_000_000;
        assert_eq!(cloud.handle(later, &attach), Reply::Done);
        assert_eq!(cloud.handle(later + 1, &attach), Reply::Done);
        let delete = Request::Delete {
            kind: Kind::Volume,
            id: v.clone(),
        };
        assert!(matches!(
            cloud.handle(later + 2, &delete),
            Reply::IncorrectState { .. }
        ));
        let truth = cloud.truth();
        let volume = truth.resources.iter().find(|r| r.id == v).unwrap();
        assert_eq!(volume.delete_requested_at_ms, Some(later + 2));
        assert!(volume.destroyed_healthy(0));
        assert_eq!(volume.attached_at_ms, Some(later));
    }
}

//! The fault proxy's rules: what to inject, where, how often; all decisions seeded.
//!
//! Every random decision is a pure function of the seed, a stream (which rule, which service)
//! and an ordinal (the n-th request that matched the rule, the n-th resource created), so the
//! same seed and the same sequence of requests give the same faults, whatever else runs.

use serde::{Deserialize, Serialize};

/// The services the proxy knows the error shapes of.
pub const SERVICES: &[&str] = &["iam", "sts", "iot", "greengrass", "ec2"];

/// All rules of one proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Rules {
    /// Seed of every random decision.
    pub seed: u64,
    /// Faults injected per service/operation; the first rule that fires answers the request
    /// (latency rules add up and let later rules fire too).
    pub faults: Vec<FaultRule>,
    /// Eventual-consistency lag per service.
    pub lag: Vec<LagRule>,
    /// STS AssumeRole as real AWS behaves (moto lets anyone assume any role).
    pub assume_role: AssumeRoleRule,
    /// The Greengrass deployment lifecycle (moto leaves deployments `InProgress` forever).
    pub deployments: DeploymentRule,
    /// EC2 instances as EC2 shows them (moto's are `running` at once, and never flap).
    pub ec2: Ec2Rule,
}

/// A rule that injects one kind of fault into matching requests.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// Service to match (`iam`, `sts`, `iot`, `greengrass`); none matches all.
    #[serde(default)]
    pub service: Option<String>,
    /// Operation to match (`CreateRole`); none matches all of the service's.
    #[serde(default)]
    pub operation: Option<String>,
    /// What to do.
    pub fault: Fault,
    /// Chance that a matching request gets the fault (0..=1).
    #[serde(default = "one")]
    pub probability: f64,
    /// Matching requests let through untouched before the rule starts to fire.
    #[serde(default)]
    pub skip: u32,
    /// Most times the rule fires; none is unlimited.
    #[serde(default)]
    pub limit: Option<u32>,
}

fn one() -> f64 {
    1.0
}

impl FaultRule {
    /// A rule that always fires on every request.
    pub fn new(fault: Fault) -> Self {
        Self {
            service: None,
            operation: None,
            fault,
            probability: 1.0,
            skip: 0,
            limit: None,
        }
    }

    /// Only requests to `service`.
    pub fn service(mut self, service: &str) -> Self {
        self.service = Some(service.into());
        self
    }

    /// Only requests for `operation`.
    pub fn operation(mut self, operation: &str) -> Self {
        self.operation = Some(operation.into());
        self
    }

    /// Fires with this probability.
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }

    /// Lets the first `n` matches through.
    pub fn skip(mut self, n: u32) -> Self {
        self.skip = n;
        self
    }

    /// Fires at most `n` times.
    pub fn limit(mut self, n: u32) -> Self {
        self.limit = Some(n);
        self
    }
}

/// A fault.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// The service's throttling error, in its real shape and status code.
    Throttle,
    /// A 5xx answer (500 or 503) in the service's error shape.
    ServerError {
        /// The status code.
        status: u16,
    },
    /// Added latency before the request is handled.
    Latency {
        /// How much.
        delay: Dist,
    },
    /// The connection is closed before the request reaches moto: nothing happened.
    ResetBeforeForward,
    /// The request reaches moto (so its effect happens), then the connection is closed
    /// without an answer.
    LostResponse,
}

/// A duration distribution, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "dist", rename_all = "snake_case", deny_unknown_fields)]
pub enum Dist {
    /// Always `ms`.
    Fixed {
        /// Milliseconds.
        ms: u64,
    },
    /// Uniform in `min_ms..=max_ms`.
    Uniform {
        /// Lower bound.
        min_ms: u64,
        /// Upper bound.
        max_ms: u64,
    },
    /// Log-normal with the given median and shape (a long right tail: most fast, a few 10x).
    LogNormal {
        /// The median.
        median_ms: u64,
        /// The shape; 1.0 puts about 1% of samples past 10x the median.
        sigma: f64,
    },
    /// One of `ms`, each as likely: an empirical distribution (draws from a fitted one, or
    /// measured durations).
    Choice {
        /// The durations, in milliseconds; at least one.
        ms: Vec<u64>,
    },
}

impl Dist {
    /// A fixed duration.
    pub fn fixed(ms: u64) -> Self {
        Dist::Fixed { ms }
    }

    /// A sample, from two uniform draws in [0, 1).
    pub fn sample(&self, u1: f64, u2: f64) -> u64 {
        match *self {
            Dist::Choice { ref ms } => {
                let i = ((ms.len() as f64 * u1) as usize).min(ms.len().saturating_sub(1));
                ms.get(i).copied().unwrap_or(0)
            }
            Dist::Fixed { ms } => ms,
            Dist::Uniform { min_ms, max_ms } => min_ms + ((max_ms - min_ms + 1) as f64 * u1) as u64,
            Dist::LogNormal { median_ms, sigma } => {
                // Box-Muller: a standard normal from two uniforms.
                let z = (-2.0 * (1.0 - u1).ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                ((median_ms as f64) * (sigma * z).exp()).round() as u64
            }
        }
    }

    fn validate(&self, what: &str) -> Result<(), RulesError> {
        match *self {
            Dist::Uniform { min_ms, max_ms } if min_ms > max_ms => Err(RulesError(format!(
                "{what}: min_ms {min_ms} is greater than max_ms {max_ms}"
            ))),
            Dist::LogNormal { sigma, .. } if !(0.0..=5.0).contains(&sigma) => Err(RulesError(
                format!("{what}: sigma {sigma} is outside 0..=5"),
            )),
            Dist::Choice { ref ms } if ms.is_empty() => Err(RulesError(format!(
                "{what}: a choice needs at least one duration"
            ))),
            _ => Ok(()),
        }
    }
}

/// Eventual-consistency lag of one service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LagRule {
    /// The service.
    pub service: String,
    /// After a create succeeds, reads and uses of the new resource (by name, id or ARN) answer
    /// not-found for this long (drawn once per resource). When the create's answer was lost,
    /// the first answered replay of its EC2 client token draws the window again from then:
    /// the caller sees the lag however long its retries took.
    #[serde(default)]
    pub after_create: Option<Dist>,
    /// After a delete succeeds, reads of the resource that were answered before the delete
    /// keep getting that answer for this long.
    #[serde(default)]
    pub after_delete: Option<Dist>,
    /// Flapping: during the create lag, each read is answered for real with this probability
    /// (so reads alternate between found and not found).
    #[serde(default)]
    pub flap_found_probability: f64,
    /// Whether deletes during the create lag answer not-found too (real AWS does this at
    /// times; it is what makes "already gone" a dangerous conclusion).
    #[serde(default)]
    pub include_deletes: bool,
}

impl LagRule {
    /// New resources of `service` read as missing for `ms` milliseconds.
    pub fn after_create(service: &str, ms: u64) -> Self {
        Self {
            service: service.into(),
            after_create: Some(Dist::fixed(ms)),
            after_delete: None,
            flap_found_probability: 0.0,
            include_deletes: false,
        }
    }
}

/// STS AssumeRole as real AWS answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssumeRoleRule {
    /// A role created through the proxy cannot be assumed for this long (IAM propagation).
    pub propagation: Dist,
    /// Deny roles that do not exist in moto.
    pub deny_unknown_roles: bool,
}

impl Default for AssumeRoleRule {
    fn default() -> Self {
        Self {
            propagation: Dist::fixed(0),
            deny_unknown_roles: true,
        }
    }
}

/// The Greengrass deployment lifecycle the proxy plays on GetDeploymentStatus.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentRule {
    /// Time in `Building`.
    pub building: Dist,
    /// Then time in `InProgress`, before `Success` or `Failure`.
    pub in_progress: Dist,
    /// Chance that a deployment ends in `Failure`.
    pub failure_probability: f64,
    /// Deployments of groups whose name starts with one of these always end in `Failure`
    /// (one workflow made to fail late among others that succeed).
    pub fail_groups_named: Vec<String>,
}

impl Default for DeploymentRule {
    fn default() -> Self {
        Self {
            building: Dist::fixed(100),
            in_progress: Dist::fixed(300),
            failure_probability: 0.0,
            fail_groups_named: Vec::new(),
        }
    }
}

/// EC2 instances launched through the proxy, as EC2 shows them to `DescribeInstances`: moto's
/// are `running` the moment they exist, and a read never misses them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Ec2Rule {
    /// How long a new instance reads `pending` before moto's state shows through.
    pub pending: Dist,
    /// Instances launched with a tag value that starts with one of these read `pending` for
    /// ever: instances that never start, for recreation.
    pub stuck_tagged: Vec<String>,
    /// Flapping: once an instance has read `running`, each `DescribeInstances` that names it
    /// by id answers `InvalidInstanceID.NotFound` with this probability, during `flap_for`
    /// (running, missing, running: the CPI's field report).
    pub flap_missing_probability: f64,
    /// How long after its first `running` read an instance may flap.
    pub flap_for: Dist,
}

impl Default for Ec2Rule {
    fn default() -> Self {
        Self {
            pending: Dist::fixed(0),
            stuck_tagged: Vec::new(),
            flap_missing_probability: 0.0,
            flap_for: Dist::fixed(0),
        }
    }
}

/// Rules that make no sense, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fault proxy rules: {0}")]
pub struct RulesError(pub String);

impl Rules {
    /// No faults, default AssumeRole and deployment behaviour, the given seed.
    pub fn seeded(seed: u64) -> Self {
        Self {
            seed,
            ..Self::default()
        }
    }

    /// Adds a fault rule.
    pub fn fault(mut self, rule: FaultRule) -> Self {
        self.faults.push(rule);
        self
    }

    /// Adds a lag rule.
    pub fn lag(mut self, rule: LagRule) -> Self {
        self.lag.push(rule);
        self
    }

    /// Sets how EC2 instances read.
    pub fn ec2(mut self, rule: Ec2Rule) -> Self {
        self.ec2 = rule;
        self
    }

    /// Checks every rule; the error names the first bad one.
    pub fn validate(&self) -> Result<(), RulesError> {
        let service_ok = |what: &str, s: &str| {
            if SERVICES.contains(&s) {
                Ok(())
            } else {
                Err(RulesError(format!(
                    "{what}: unknown service {s:?} (known: {SERVICES:?})"
                )))
            }
        };
        let probability_ok = |what: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(RulesError(format!(
                    "{what}: probability {p} is outside 0..=1"
                )))
            }
        };
        for (i, rule) in self.faults.iter().enumerate() {
            let what = format!("faults[{i}]");
            if let Some(s) = &rule.service {
                service_ok(&what, s)?;
            }
            probability_ok(&what, rule.probability)?;
            match &rule.fault {
                Fault::ServerError { status } if !(500..=599).contains(status) => {
                    return Err(RulesError(format!(
                        "{what}: server_error status {status} is not 5xx"
                    )))
                }
                Fault::Latency { delay } => delay.validate(&what)?,
                _ => {}
            }
        }
        for (i, rule) in self.lag.iter().enumerate() {
            let what = format!("lag[{i}]");
            service_ok(&what, &rule.service)?;
            probability_ok(&what, rule.flap_found_probability)?;
            for d in [&rule.after_create, &rule.after_delete]
                .into_iter()
                .flatten()
            {
                d.validate(&what)?;
            }
        }
        self.assume_role
            .propagation
            .validate("assume_role.propagation")?;
        self.deployments.building.validate("deployments.building")?;
        self.deployments
            .in_progress
            .validate("deployments.in_progress")?;
        probability_ok("deployments", self.deployments.failure_probability)?;
        self.ec2.pending.validate("ec2.pending")?;
        self.ec2.flap_for.validate("ec2.flap_for")?;
        probability_ok("ec2", self.ec2.flap_missing_probability)
    }
}

/// A uniform draw in [0, 1) from (seed, stream, ordinal): the same inputs, the same number.
pub(crate) fn draw(seed: u64, stream: u64, ordinal: u64) -> f64 {
    let x = splitmix(splitmix(splitmix(seed) ^ stream) ^ ordinal);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// A stream id for a name (FNV-1a), so streams do not depend on rule order for named things.
pub(crate) fn stream_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_repeat_for_the_same_inputs_and_spread_over_the_unit_interval() {
        assert_eq!(draw(7, 1, 2), draw(7, 1, 2));
        assert_ne!(draw(7, 1, 2), draw(8, 1, 2));
        let mean = (0..10_000).map(|n| draw(1, 2, n)).sum::<f64>() / 10_000.0;
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        assert!((0..10_000).all(|n| (0.0..1.0).contains(&draw(3, 4, n))));
    }

    #[test]
    fn bad_rules_are_named() {
        let bad = Rules::seeded(1).fault(FaultRule::new(Fault::ServerError { status: 404 }));
        assert!(bad
            .validate()
            .unwrap_err()
            .0
            .contains("faults[0]: server_error status 404"));
        let bad = Rules::seeded(1).fault(FaultRule::new(Fault::Throttle).service("s3"));
        assert!(bad
            .validate()
            .unwrap_err()
            .0
            .contains("unknown service \"s3\""));
        let bad = Rules::seeded(1).fault(FaultRule::new(Fault::Throttle).probability(1.5));
        assert!(bad.validate().unwrap_err().0.contains("probability 1.5"));
        let mut bad = Rules::seeded(1);
        bad.deployments.in_progress = Dist::Uniform {
            min_ms: 5,
            max_ms: 1,
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .0
            .contains("deployments.in_progress"));
        assert_eq!(Rules::seeded(1).validate(), Ok(()));
    }

    #[test]
    fn rules_read_from_json_with_defaults() {
        let rules: Rules = serde_json::from_str(
            r#"{"seed": 3, "faults": [{"service": "iam", "fault": {"kind": "server_error", "status": 503}, "limit": 2}],
                "lag": [{"service": "iot", "after_create": {"dist": "uniform", "min_ms": 10, "max_ms": 20}}]}"#,
        )
        .unwrap();
        assert_eq!(rules.faults[0].probability, 1.0);
        assert_eq!(rules.faults[0].limit, Some(2));
        assert!(rules.assume_role.deny_unknown_roles);
        rules.validate().unwrap();
    }

    #[test]
    fn a_choice_draws_each_of_its_durations_and_an_empty_one_is_refused() {
        let d = Dist::Choice {
            ms: vec![5, 50, 500],
        };
        let mut seen: Vec<u64> = (0..300).map(|n| d.sample(draw(3, 0, n), 0.0)).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen, vec![5, 50, 500]);
        assert_eq!(d.sample(0.999_999_999, 0.0), 500);
        let empty = Rules::seeded(1).ec2(Ec2Rule {
            pending: Dist::Choice { ms: vec![] },
            ..Ec2Rule::default()
        });
        assert_eq!(
            empty.validate().unwrap_err().0,
            "ec2.pending: a choice needs at least one duration"
        );
    }

    #[test]
    fn log_normal_has_its_median() {
        let d = Dist::LogNormal {
            median_ms: 100,
            sigma: 1.0,
        };
        let mut samples: Vec<u64> = (0..2_001)
            .map(|n| d.sample(draw(5, 0, n), draw(5, 1, n)))
            .collect();
        samples.sort();
        assert!(
            (80..125).contains(&samples[1_000]),
            "median {}",
            samples[1_000]
        );
        assert!(samples[2_000] > 500, "a long tail");
    }
}

//! `keel-bench fleet`: the `iot.onboard-fleet` workflow against moto's server, through the
//! fault proxy throttling a fraction of every call. Reports how long the fleet took, how many
//! API calls it made (by operation, with how many the proxy throttled), and checks the result
//! against moto: every device's thing exists once, with one active certificate.
//!
//! The duration is dominated by the network path (proxy, moto, throttling back-off), not by
//! the disk; the disk's baseline is still measured before and after, so the duration can be
//! read as "this many baseline appends".

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use keel_engine::Engine;
use keel_steps::aws::x509::KeyStore;
use keel_steps::aws::AwsClients;
use keel_testkit::aws::SdkOptions;
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Applied, Fault, FaultProxy, FaultRule, RequestRecord, Rules};
use keel_workflows::fleet::OnboardFleet;
use keel_workflows::sample;
use keel_workflows::KeelWorkflows;
use serde::Serialize;

use crate::measure;
use crate::report::Baseline;

/// What to run.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct FleetParams {
    /// Devices in the fleet.
    pub devices: usize,
    /// Devices onboarded at once.
    pub concurrency: u32,
    /// Fraction of calls the proxy answers with the service's throttling error.
    pub throttle: f64,
    /// Seed of the proxy's draws.
    pub seed: u64,
}

/// Calls of one operation.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct OperationCalls {
    /// `service:Operation`.
    pub operation: String,
    /// Requests that reached the proxy.
    pub calls: usize,
    /// Of them, answered with a throttling error.
    pub throttled: usize,
}

/// The measurement.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FleetReport {
    /// What ran.
    pub params: FleetParams,
    /// From `start` to the fleet's result.
    pub duration_s: f64,
    /// Devices onboarded.
    pub onboarded: usize,
    /// Devices whose onboarding failed (and was compensated).
    pub failed: usize,
    /// Every request the proxy saw.
    pub api_calls: usize,
    /// Of them, throttled.
    pub throttled: usize,
    /// By operation, most calls first.
    pub by_operation: Vec<OperationCalls>,
    /// The disk's raw append+fdatasync rate, before and after.
    pub baseline: Baseline,
    /// duration x baseline appends/s.
    pub duration_in_baseline_appends: f64,
}

/// Runs the fleet in a fresh data directory under `dir` and checks moto's state.
pub(crate) async fn run(dir: &Path, params: FleetParams) -> anyhow::Result<FleetReport> {
    let before = measure::baseline(dir, "fleet-baseline-before")?;
    let account = TestAccount::fresh().context("starting moto's server (see docs/testing.md)")?;
    let rules = Rules::seeded(params.seed)
        .fault(FaultRule::new(Fault::Throttle).probability(params.throttle));
    let proxy = FaultProxy::start(&account.endpoint, rules).context("starting the fault proxy")?;
    let via = account
        .sdk_config_via(&proxy.endpoint(), SdkOptions::default())
        .await;
    let data = tempfile::Builder::new()
        .prefix("fleet-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a data directory in {}", dir.display()))?;
    let engine = Engine::builder(data.path().join("data"))
        .provisioning_workflows()
        .resource(AwsClients::new(&via))
        .resource(KeyStore::new(data.path().join("keys")))
        .open()
        .await?;
    let input = sample::fleet("bench", params.devices, params.concurrency);
    let started = Instant::now();
    let fleet = engine
        .start::<OnboardFleet>("fleet", input)
        .await?
        .result()
        .await?;
    let duration = started.elapsed().as_secs_f64();
    engine.shutdown().await;

    check_moto(&account, fleet.onboarded.len()).await?;
    let requests = proxy.requests();
    let by_operation = calls_by_operation(&requests);
    let after = measure::baseline(dir, "fleet-baseline-after")?;
    let baseline = Baseline::new(before, after);
    Ok(FleetReport {
        params,
        duration_s: duration,
        onboarded: fleet.onboarded.len(),
        failed: fleet.failed.len(),
        api_calls: requests.len(),
        throttled: requests.iter().filter(|r| is_throttled(r)).count(),
        by_operation,
        duration_in_baseline_appends: duration * baseline.mean_per_s,
        baseline,
    })
}

/// Checks moto's ground truth: one thing and one active certificate per onboarded device.
async fn check_moto(account: &TestAccount, onboarded: usize) -> anyhow::Result<()> {
    let truth = Inventory::read(&account.sdk_config().await).await?;
    let active = truth
        .certificates
        .iter()
        .filter(|c| c.status == "ACTIVE")
        .count();
    if truth.things.len() != onboarded || active != onboarded {
        bail!(
            "moto holds {} things and {active} active certificates for {} onboarded devices",
            truth.things.len(),
            onboarded
        );
    }
    Ok(())
}

/// Whether the proxy answered the request with a throttling error.
fn is_throttled(r: &RequestRecord) -> bool {
    r.fault == Some(Applied::Throttled)
}

/// The requests' calls and throttles by operation, most calls first (ties by name).
fn calls_by_operation(requests: &[RequestRecord]) -> Vec<OperationCalls> {
    let mut by_operation: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for r in requests {
        let entry = by_operation
            .entry(format!("{}:{}", r.service, r.operation))
            .or_default();
        entry.0 += 1;
        entry.1 += usize::from(is_throttled(r));
    }
    let mut by_operation: Vec<OperationCalls> = by_operation
        .into_iter()
        .map(|(operation, (calls, throttled))| OperationCalls {
            operation,
            calls,
            throttled,
        })
        .collect();
    by_operation.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.operation.cmp(&b.operation)));
    by_operation
}

impl FleetReport {
    /// The report as a table.
    pub(crate) fn table(&self) -> String {
        let p = &self.params;
        let mut out = format!(
            "iot.onboard-fleet: {} devices, {} at a time, {:.0}% of calls throttled (seed {})\n\n",
            p.devices,
            p.concurrency,
            p.throttle * 100.0,
            p.seed
        );
        out += &format!(
            "duration            {:.1} s ({:.0} baseline appends; baseline {:.0}/s before, {:.0}/s after)\n",
            self.duration_s,
            self.duration_in_baseline_appends,
            self.baseline.before_per_s,
            self.baseline.after_per_s
        );
        out += &format!(
            "devices             {} onboarded, {} failed\n",
            self.onboarded, self.failed
        );
        out += &format!(
            "API calls           {} ({:.1} per device), {} throttled ({:.1}%)\n\n",
            self.api_calls,
            self.api_calls as f64 / p.devices.max(1) as f64,
            self.throttled,
            100.0 * self.throttled as f64 / self.api_calls.max(1) as f64
        );
        out += &format!("{:<36} {:>7} {:>10}\n", "operation", "calls", "throttled");
        for op in &self.by_operation {
            out += &format!(
                "{:<36} {:>7} {:>10}\n",
                op.operation, op.calls, op.throttled
            );
        }
        out
    }
}

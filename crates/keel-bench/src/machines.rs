//! `keel-bench machines`: `ec2.machine-with-disk` against moto's server, through the fault
//! proxy playing the BOSH AWS CPI's published latencies (scaled down): each instance reads
//! `pending` for a draw from the fitted "create instance" distribution, each volume reads
//! "not found" for a draw from the fitted "create volume" one. Machines start in waves, so the
//! later waves wait by the schedule learned from the earlier ones. Reports the engine's
//! statistics in the CPI's own table (count, min, mean, max, sigma, ten worst), the machines'
//! time to usable and their recreations, and checks moto: one live instance and one attached
//! disk per machine.

use std::time::Instant;

use anyhow::{bail, Context};
use keel_engine::{Engine, OperationStats};
use keel_steps::aws::x509::KeyStore;
use keel_steps::aws::{AwsClients, KEY_TAG};
use keel_testkit::aws::SdkOptions;
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Dist, Ec2Rule, Fault, FaultProxy, FaultRule, LagRule, Rules};
use keel_workflows::ec2::{Machine, MachineWithDisk};
use keel_workflows::{sample, KeelWorkflows};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::cpi::CPI;

/// Draws per fitted distribution handed to the proxy (it picks one per resource).
const POOL: usize = 4_096;

/// What to run.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct MachineParams {
    /// Machines in all.
    pub machines: usize,
    /// Waves they start in, one after the other.
    pub waves: usize,
    /// The CPI's durations times this (0.1: a 30 s instance start takes 3 s).
    pub scale: f64,
    /// Fraction of EC2 calls throttled.
    pub throttle: f64,
    /// Fraction of EC2 calls whose answer is lost after they took effect.
    pub lost: f64,
    /// Seed of the draws.
    pub seed: u64,
}

/// One operation's figures, in seconds.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Row {
    pub operation: String,
    pub count: u64,
    pub min_s: f64,
    pub mean_s: f64,
    pub max_s: f64,
    pub sigma_s: f64,
    pub p90_s: f64,
    pub worst_s: Vec<f64>,
}

/// The measurement.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct MachinesReport {
    pub params: MachineParams,
    /// The explicit deadlines the workflow was given (the CPI's lesson, scaled), seconds.
    pub instance_wait_s: u64,
    pub volume_wait_s: u64,
    /// The engine's statistics of the EC2 steps and waits.
    pub operations: Vec<Row>,
    /// Start to usable, per machine: p50, p99, max (seconds).
    pub usable_p50_s: f64,
    pub usable_p99_s: f64,
    pub usable_max_s: f64,
    /// Machines whose instance, or volume, was recreated at least once.
    pub instances_recreated: usize,
    pub volumes_recreated: usize,
    /// EC2 calls the proxy saw, and of them throttled or lost.
    pub api_calls: usize,
    pub faults: usize,
}

/// Runs the machines in a fresh data directory under `dir` and checks moto's state.
pub(crate) async fn run(
    dir: &std::path::Path,
    params: MachineParams,
) -> anyhow::Result<MachinesReport> {
    if params.scale < 0.1 {
        bail!("--scale must be at least 0.1 (the volume's 10 s deadline becomes 1 s, the least an input takes)");
    }
    if params.machines == 0 || params.waves == 0 || params.waves > params.machines {
        bail!("--machines must be at least 1 and --waves between 1 and --machines");
    }
    for (name, p) in [("--throttle", params.throttle), ("--lost", params.lost)] {
        if !(0.0..1.0).contains(&p) {
            bail!("{name} must be in [0, 1), not {p}");
        }
    }
    let mut rng = StdRng::seed_from_u64(params.seed);
    let mut pool = |fit: usize| -> Dist {
        let fitted = CPI[fit].fitted();
        let ms = (0..POOL)
            .map(|_| (fitted.draw(&mut rng) * params.scale).round() as u64)
            .collect();
        Dist::Choice { ms }
    };
    let (instance_pending, volume_lag) = (pool(0), pool(2));
    let rules = Rules::seeded(params.seed)
        .fault(
            FaultRule::new(Fault::Throttle)
                .service("ec2")
                .probability(params.throttle),
        )
        .fault(
            FaultRule::new(Fault::LostResponse)
                .service("ec2")
                .probability(params.lost),
        )
        .ec2(Ec2Rule {
            pending: instance_pending,
            ..Ec2Rule::default()
        })
        .lag(LagRule {
            after_create: Some(volume_lag),
            ..LagRule::after_create("ec2", 0)
        });
    let account = TestAccount::fresh().context("starting moto's server (see docs/testing.md)")?;
    let proxy = FaultProxy::start(&account.endpoint, rules).context("starting the fault proxy")?;
    let via = account
        .sdk_config_via(&proxy.endpoint(), SdkOptions::default())
        .await;
    let data = tempfile::Builder::new()
        .prefix("machines-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a data directory in {}", dir.display()))?;
    let engine = Engine::builder(data.path().join("data"))
        .provisioning_workflows()
        .resource(AwsClients::new(&via))
        .resource(KeyStore::new(data.path().join("keys")))
        .open()
        .await?;
    let instance_wait_s = (60.0 * params.scale).round().max(1.0) as u64;
    let volume_wait_s = (10.0 * params.scale).round().max(1.0) as u64;
    let mut usable = Vec::new();
    let mut machines: Vec<Machine> = Vec::new();
    let per_wave = params.machines.div_ceil(params.waves);
    for wave in 0..params.waves {
        let mut runs = Vec::new();
        for i in wave * per_wave..((wave + 1) * per_wave).min(params.machines) {
            let name = format!("m-{i}");
            let mut input = sample::machine(&name);
            input.instance_wait_s = Some(instance_wait_s);
            input.volume_wait_s = Some(volume_wait_s);
            runs.push((
                Instant::now(),
                engine.start::<MachineWithDisk>(&name, input).await?,
            ));
        }
        for (started, run) in runs {
            machines.push(run.result().await?);
            usable.push(started.elapsed().as_secs_f64());
        }
        eprintln!(
            "machines: wave {} of {} done ({} machines usable)",
            wave + 1,
            params.waves,
            machines.len()
        );
    }
    let operations = engine
        .stats()
        .iter()
        .filter(|s| s.operation.contains("aws.ec2."))
        .map(row)
        .collect();
    engine.shutdown().await;
    check_moto(&account, &machines).await?;
    usable.sort_by(f64::total_cmp);
    let at =
        |q: f64| usable[((usable.len() as f64 * q).ceil() as usize).clamp(1, usable.len()) - 1];
    let requests = proxy.requests();
    Ok(MachinesReport {
        params,
        instance_wait_s,
        volume_wait_s,
        operations,
        usable_p50_s: at(0.5),
        usable_p99_s: at(0.99),
        usable_max_s: at(1.0),
        instances_recreated: machines
            .iter()
            .filter(|m| m.instance_generation > 0)
            .count(),
        volumes_recreated: machines.iter().filter(|m| m.volume_generation > 0).count(),
        api_calls: requests.len(),
        faults: requests.iter().filter(|r| r.fault.is_some()).count(),
    })
}

fn row(s: &OperationStats) -> Row {
    let secs = |d: std::time::Duration| d.as_secs_f64();
    Row {
        operation: s.operation.clone(),
        count: s.count,
        min_s: secs(s.min),
        mean_s: secs(s.mean),
        max_s: secs(s.max),
        sigma_s: secs(s.std_dev),
        p90_s: secs(s.p90),
        worst_s: s.outliers.iter().map(|o| secs(o.duration)).collect(),
    }
}

/// moto's ground truth: one live instance and one disk, attached to it, per machine.
async fn check_moto(account: &TestAccount, machines: &[Machine]) -> anyhow::Result<()> {
    let truth = Inventory::read(&account.sdk_config().await).await?;
    if truth.instances.len() != machines.len() {
        bail!(
            "moto holds {} live instances for {} machines",
            truth.instances.len(),
            machines.len()
        );
    }
    let disks = truth
        .volumes
        .iter()
        .filter(|v| v.tags.contains_key(KEY_TAG))
        .count();
    if disks != machines.len() {
        bail!("moto holds {disks} disks for {} machines", machines.len());
    }
    for m in machines {
        let attached = truth.volumes.iter().any(|v| {
            v.id == m.volume_id && v.attached_to == [(m.instance_id.clone(), m.device.clone())]
        });
        if !attached {
            bail!("disk {} is not attached to {}", m.volume_id, m.instance_id);
        }
    }
    Ok(())
}

impl MachinesReport {
    /// The report as the CPI's table.
    pub(crate) fn table(&self) -> String {
        let p = &self.params;
        let mut out = format!(
            "ec2.machine-with-disk: {} machines in {} waves, the CPI's latencies x{} \
             (instances pending, volumes not found), {:.0}% of EC2 calls throttled, {:.0}% lost \
             (seed {}); deadlines until learned: instance {} s, volume {} s\n\n",
            p.machines,
            p.waves,
            p.scale,
            p.throttle * 100.0,
            p.lost * 100.0,
            p.seed,
            self.instance_wait_s,
            self.volume_wait_s
        );
        out += &format!(
            "{:<34} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7}  {}\n",
            "operation", "count", "min s", "mean s", "max s", "sigma s", "p90 s", "worst ten (s)"
        );
        for r in &self.operations {
            let worst: Vec<String> = r.worst_s.iter().map(|w| format!("{w:.2}")).collect();
            out += &format!(
                "{:<34} {:>6} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}  {}\n",
                r.operation,
                r.count,
                r.min_s,
                r.mean_s,
                r.max_s,
                r.sigma_s,
                r.p90_s,
                worst.join(", ")
            );
        }
        out += &format!(
            "\nusable machine (start to attached)  p50 {:.2} s, p99 {:.2} s, max {:.2} s\n",
            self.usable_p50_s, self.usable_p99_s, self.usable_max_s
        );
        out += &format!(
            "recreated                           {} instances, {} volumes\n",
            self.instances_recreated, self.volumes_recreated
        );
        out += &format!(
            "EC2 calls                           {} ({:.1} per machine), {} met a fault\n",
            self.api_calls,
            self.api_calls as f64 / p.machines as f64,
            self.faults
        );
        out += "moto                                one live instance and one attached disk per machine\n";
        out
    }
}

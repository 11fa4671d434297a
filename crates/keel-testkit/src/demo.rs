//! The demo (README's first command, `keel-demo`): moto's server and the fault proxy, a real
//! `keel worker` process driven by the real CLI, a SIGKILL midway, a core that waits for its
//! check-in until the demo sends it (`keel get`, `keel send`), and a check through the AWS
//! API that every resource exists exactly once and the compensated run left nothing.
//!
//! The narration (each command and its output) goes to the writer the caller gives; the
//! demo's own test passes a buffer, the `keel-demo` program its standard output.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::inventory::Inventory;
use crate::moto::{MotoOptions, MotoServer, TestAccount};
use crate::proxy::{Dist, Fault, FaultProxy, FaultRule, LagRule, Rules};

/// What to provision.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The `keel` binary.
    pub keel: PathBuf,
    /// Where the worker's data directory and the inputs go (must not exist or be empty).
    pub dir: PathBuf,
    /// Client devices of the Greengrass core.
    pub clients: usize,
    /// Devices of the fleet.
    pub fleet: usize,
    /// Seed of the proxy's faults.
    pub seed: u64,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A step of the demo went wrong.
    #[error("{0}")]
    Failed(String),
    /// Writing the narration failed.
    #[error("writing the narration: {0}")]
    Io(#[from] std::io::Error),
}

fn failed(what: impl Into<String>) -> DemoError {
    DemoError::Failed(what.into())
}

const PLANT: &str = "plant";
const FLEET: &str = "fleet";
const DOOMED: &str = "doomed";

/// How long the plant's core has to check in once deployed (seconds).
const CHECK_IN_WITHIN_S: u64 = 600;

/// The id the demo sends the plant's check-in under.
const CHECK_IN_ID: &str = "plant-core-boot-1";

/// How long the plant may take to get deployed and wait for its check-in.
const CHECK_IN_WAIT_TIMEOUT: Duration = Duration::from_secs(180);

/// A running `keel worker` process; killed when dropped.
#[derive(Debug)]
pub struct Worker {
    /// The process.
    pub child: Child,
    /// Its API's base URL.
    pub api: String,
    /// Its data directory (where the CLI finds the API token).
    pub data: PathBuf,
}

impl Worker {
    /// Spawns `command` (a [`worker_command`] on `data`, perhaps changed) and waits for its
    /// "listening" line.
    pub fn start(mut command: Command, data: &Path) -> Result<Worker, DemoError> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("starting the worker: {e}")))?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        let api = line
            .trim()
            .strip_prefix("keel worker listening on ")
            .ok_or_else(|| failed(format!("the worker did not start (said {line:?})")))?
            .to_string();
        Ok(Worker {
            child,
            api,
            data: data.to_path_buf(),
        })
    }

    /// `keel` (the binary `keel`) pointed at this worker: its API and its data directory, from
    /// which the CLI reads the API token.
    pub fn keel(&self, keel: &Path) -> Command {
        let mut command = Command::new(keel);
        command
            .arg("--api")
            .arg(&self.api)
            .arg("--data-dir")
            .arg(&self.data)
            .env_remove("KEEL_API_TOKEN")
            .env_remove("KEEL_API_TOKEN_FILE");
        command
    }

    /// The API token the worker made in its data directory.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.join("api-token"))
            .map(|t| t.trim().to_string())
            .unwrap_or_default()
    }
}

/// `keel worker` on `data`, listening on `listen`, reaching AWS at `endpoint` as `account`,
/// logging warnings only, with the API token it keeps in `data`.
pub fn worker_command(
    keel: &Path,
    data: &Path,
    account: &TestAccount,
    endpoint: &str,
    listen: &str,
) -> Command {
    let mut command = Command::new(keel);
    command
        .args(["worker", "--listen", listen, "--aws-endpoint", endpoint])
        .arg("--data-dir")
        .arg(data)
        .env("AWS_ACCESS_KEY_ID", &account.credentials.access_key_id)
        .env(
            "AWS_SECRET_ACCESS_KEY",
            &account.credentials.secret_access_key,
        )
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("KEEL_API_TOKEN")
        .env_remove("KEEL_API_TOKEN_FILE")
        .env_remove("KEEL_NO_AUTH")
        .env("RUST_LOG", "warn");
    command
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Demo<'a> {
    options: &'a DemoOptions,
    account: TestAccount,
    proxy_endpoint: String,
    out: &'a mut dyn Write,
}

/// Runs the demo; returns when everything is verified.
pub fn run(options: &DemoOptions, out: &mut dyn Write) -> Result<(), DemoError> {
    let started = Instant::now();
    std::fs::create_dir_all(&options.dir)?;
    writeln!(
        out,
        "== starting moto's server (the AWS emulator) and the fault proxy"
    )?;
    let moto = MotoServer::start(MotoOptions::default())
        .map_err(|e| failed(format!("moto's server: {e} (pip install 'moto[server]')")))?;
    let account = moto
        .new_account()
        .map_err(|e| failed(format!("moto account: {e}")))?;
    let proxy = FaultProxy::start(&account.endpoint, rules(options.seed))
        .map_err(|e| failed(format!("fault proxy: {e}")))?;
    writeln!(
        out,
        "moto {} | proxy {}: 5% throttled, 5% responses lost after the call took effect, \
         latency (median 10 ms), IoT create lag up to 500 ms, IAM propagation 1-3 s; \
         deployments of groups named {DOOMED}* fail",
        account.endpoint,
        proxy.endpoint()
    )?;
    let mut demo = Demo {
        options,
        account,
        proxy_endpoint: proxy.endpoint(),
        out,
    };
    demo.script()?;
    writeln!(
        demo.out,
        "\n== demo finished in {:.0} s",
        started.elapsed().as_secs_f64()
    )?;
    Ok(())
}

fn rules(seed: u64) -> Rules {
    let mut rules = Rules::seeded(seed)
        .fault(FaultRule::new(Fault::Throttle).probability(0.05))
        .fault(FaultRule::new(Fault::LostResponse).probability(0.05))
        .fault(FaultRule::new(Fault::Latency {
            delay: Dist::LogNormal {
                median_ms: 10,
                sigma: 0.8,
            },
        }))
        .lag(LagRule {
            after_create: Some(Dist::Uniform {
                min_ms: 50,
                max_ms: 500,
            }),
            ..LagRule::after_create("iot", 0)
        });
    rules.assume_role.propagation = Dist::Uniform {
        min_ms: 1_000,
        max_ms: 3_000,
    };
    rules.deployments.fail_groups_named = vec![DOOMED.into()];
    rules
}

/// The inputs of the demo's runs, written as JSON files; each field is a file's path.
struct Inputs {
    /// The Greengrass core that completes.
    plant: String,
    /// The fleet of devices.
    fleet: String,
    /// The Greengrass core whose deployment fails, so it is compensated.
    doomed: String,
    /// The payload of the plant's check-in event.
    check_in: String,
}

/// The input of `greengrass.provision-core` for a core `name` with `clients` client devices,
/// waiting `check_in_within_s` for its check-in once deployed, if given.
pub fn core_input(name: &str, clients: usize, check_in_within_s: Option<u64>) -> serde_json::Value {
    let mut input = serde_json::json!({
        "name": name,
        "role": {
            "name": format!("{name}-role"),
            "trust_policy": GREENGRASS_TRUST,
            "managed_policy_arns": ["arn:aws:iam::aws:policy/service-role/AWSGreengrassResourceAccessRolePolicy"],
            "assume_timeout_s": 120
        },
        "core": {"thing_name": format!("{name}-core"), "policy_document": CONNECT_ONLY},
        "client_devices": (0..clients).map(|i| format!("{name}-client-{i}")).collect::<Vec<_>>(),
        "client_policy_document": CONNECT_ONLY,
        "concurrency": 4,
        "deployment_timeout_s": 120
    });
    if let Some(within_s) = check_in_within_s {
        input["wait_for_check_in"] = serde_json::json!({ "within_s": within_s });
    }
    input
}

/// The input of `iot.onboard-fleet` for `devices` devices.
fn fleet_input(devices: usize) -> serde_json::Value {
    serde_json::json!({
        "policy_document": CONNECT_ONLY,
        "thing_names": (0..devices).map(|i| format!("fleet-{i}")).collect::<Vec<_>>(),
        "concurrency": 8
    })
}

impl Demo<'_> {
    /// The demo's phases in order: start the runs, kill the worker midway, restart it, send
    /// the plant's check-in once it waits for it, follow the runs to the end, compensate a
    /// doomed core, verify, and stop the worker.
    fn script(&mut self) -> Result<(), DemoError> {
        let inputs = self.write_inputs()?;
        let data = self.options.dir.join("keel-data");

        writeln!(self.out, "\n== starting the worker")?;
        let worker = self.worker(&data)?;
        self.start_runs(&worker, &inputs)?;
        self.wait_for_some_devices(&worker)?;
        self.kill_midway(worker)?;

        writeln!(
            self.out,
            "\n== restarting the worker: it resumes every unfinished run"
        )?;
        let worker = self.worker(&data)?;
        self.check_in(&worker, &inputs)?;
        self.follow_runs(&worker, &inputs)?;
        self.compensate_doomed(&worker, &inputs)?;
        writeln!(self.out, "\n== latency per operation")?;
        self.keel(&worker, &["stats"], 0)?;
        self.verify(&worker)?;
        self.stop(worker)
    }

    /// Writes the runs' inputs into the demo's directory.
    fn write_inputs(&self) -> Result<Inputs, DemoError> {
        let dir = &self.options.dir;
        Ok(Inputs {
            plant: write_json(
                &dir.join("plant.json"),
                &core_input(PLANT, self.options.clients, Some(CHECK_IN_WITHIN_S)),
            )?,
            fleet: write_json(&dir.join("fleet.json"), &fleet_input(self.options.fleet))?,
            doomed: write_json(&dir.join("doomed.json"), &core_input(DOOMED, 2, None))?,
            check_in: write_json(
                &dir.join("check-in.json"),
                &serde_json::json!({"greengrass_version": "1.11.6", "ip": "10.0.0.7"}),
            )?,
        })
    }

    /// Starts the core and the fleet without waiting for them.
    fn start_runs(&mut self, worker: &Worker, inputs: &Inputs) -> Result<(), DemoError> {
        self.keel(
            worker,
            &[
                "start",
                "greengrass.provision-core",
                "--id",
                PLANT,
                "--input",
                &inputs.plant,
            ],
            0,
        )?;
        self.keel(
            worker,
            &[
                "start",
                "iot.onboard-fleet",
                "--id",
                FLEET,
                "--input",
                &inputs.fleet,
            ],
            0,
        )?;
        Ok(())
    }

    /// Waits (at most 120 s) until some devices are onboarded, so the kill lands midway:
    /// after some of the work, before the runs are done.
    fn wait_for_some_devices(&mut self, worker: &Worker) -> Result<(), DemoError> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let runs = self.runs(worker)?;
            let done = runs
                .iter()
                .filter(|r| r["workflow"] == "iot.onboard-device" && r["status"] == "completed")
                .count();
            if done >= 3 || Instant::now() > deadline {
                writeln!(self.out, "\n{done} devices onboarded so far")?;
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Shows the running runs, then SIGKILLs the worker in the middle of them.
    fn kill_midway(&mut self, mut worker: Worker) -> Result<(), DemoError> {
        self.keel(&worker, &["list", "--status", "running"], 0)?;
        writeln!(
            self.out,
            "\n== SIGKILL the worker (pid {}) in the middle of it",
            worker.child.id()
        )?;
        worker.child.kill()?;
        worker.child.wait()?;
        Ok(())
    }

    /// Waits (at most [`CHECK_IN_WAIT_TIMEOUT`]) until the plant, deployed, publishes that it
    /// waits for its core's check-in, then sends the check-in as the core would.
    fn check_in(&mut self, worker: &Worker, inputs: &Inputs) -> Result<(), DemoError> {
        writeln!(
            self.out,
            "\n== the plant's core, once deployed, waits up to {CHECK_IN_WITHIN_S} s for its \
             check-in (else everything is undone)"
        )?;
        let deadline = Instant::now() + CHECK_IN_WAIT_TIMEOUT;
        loop {
            let output = worker
                .keel(&self.options.keel)
                .args(["get", PLANT, "progress"])
                .output()?;
            let said = String::from_utf8_lossy(&output.stdout);
            if said.contains("waiting for check-in") {
                break;
            }
            if Instant::now() > deadline {
                return Err(failed(format!(
                    "run {PLANT} did not wait for its check-in within {CHECK_IN_WAIT_TIMEOUT:?}: \
                     `keel get {PLANT} progress` said {said:?} ({})",
                    String::from_utf8_lossy(&output.stderr).trim()
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        self.keel(worker, &["get", PLANT, "progress"], 0)?;
        self.keel(
            worker,
            &[
                "send",
                PLANT,
                CHECK_IN_EVENT,
                "--data",
                &inputs.check_in,
                "--event-id",
                CHECK_IN_ID,
            ],
            0,
        )?;
        Ok(())
    }

    /// Starts the same ids again on the restarted worker, which returns the same runs, and
    /// follows them to the end.
    fn follow_runs(&mut self, worker: &Worker, inputs: &Inputs) -> Result<(), DemoError> {
        writeln!(
            self.out,
            "(starting the same ids again returns the same runs; --wait follows them)"
        )?;
        self.keel(
            worker,
            &[
                "start",
                "greengrass.provision-core",
                "--id",
                PLANT,
                "--input",
                &inputs.plant,
                "--wait",
            ],
            0,
        )?;
        self.keel(
            worker,
            &[
                "start",
                "iot.onboard-fleet",
                "--id",
                FLEET,
                "--input",
                &inputs.fleet,
                "--wait",
            ],
            0,
        )?;
        Ok(())
    }

    /// Runs the core whose deployment fails late (exit 1) and shows its compensation.
    fn compensate_doomed(&mut self, worker: &Worker, inputs: &Inputs) -> Result<(), DemoError> {
        writeln!(
            self.out,
            "\n== a core whose deployment fails late: everything it made is undone"
        )?;
        self.keel(
            worker,
            &[
                "start",
                "greengrass.provision-core",
                "--id",
                DOOMED,
                "--input",
                &inputs.doomed,
                "--wait",
            ],
            1,
        )?;
        self.keel(worker, &["history", DOOMED], 0)?;
        self.keel(worker, &["list"], 0)?;
        Ok(())
    }

    /// Stops the worker with SIGTERM and checks that it drained and exited cleanly.
    fn stop(&mut self, mut worker: Worker) -> Result<(), DemoError> {
        writeln!(
            self.out,
            "\n== stopping the worker (SIGTERM: drain, then exit)"
        )?;
        let status = Command::new("kill")
            .args(["-TERM", &worker.child.id().to_string()])
            .status()?;
        if !status.success() {
            return Err(failed("kill -TERM failed"));
        }
        let exit = worker.child.wait()?;
        if !exit.success() {
            return Err(failed(format!("the worker exited with {exit}")));
        }
        Ok(())
    }

    fn worker(&mut self, data: &Path) -> Result<Worker, DemoError> {
        let command = worker_command(
            &self.options.keel,
            data,
            &self.account,
            &self.proxy_endpoint,
            "127.0.0.1:0",
        );
        let worker = Worker::start(command, data)?;
        writeln!(
            self.out,
            "$ keel worker --data-dir {} --aws-endpoint {}   # {}\n\
             (the worker keeps its API token in {}/api-token; `keel --data-dir {}` reads it)\n\
             console: {}/ui/ (sign in with the token in {}/api-token)",
            data.display(),
            self.proxy_endpoint,
            worker.api,
            data.display(),
            data.display(),
            worker.api,
            data.display()
        )?;
        Ok(worker)
    }

    /// Runs `keel` with `args`, shows the command and its output, and checks its exit code.
    fn keel(&mut self, worker: &Worker, args: &[&str], expect: i32) -> Result<String, DemoError> {
        writeln!(self.out, "\n$ keel {}", args.join(" "))?;
        let output = worker.keel(&self.options.keel).args(args).output()?;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        self.out.write_all(stdout.as_bytes())?;
        // Progress lines (one per 5 s off a terminal) and the one-line error.
        for line in stderr.lines().rev().take(1) {
            writeln!(self.out, "{line}")?;
        }
        if output.status.code() != Some(expect) {
            return Err(failed(format!(
                "keel {} exited {:?}, expected {expect}: {stderr}",
                args.join(" "),
                output.status.code()
            )));
        }
        Ok(stdout)
    }

    fn runs(&mut self, worker: &Worker) -> Result<Vec<serde_json::Value>, DemoError> {
        let output = worker
            .keel(&self.options.keel)
            .args(["--json", "list", "--limit", "1000"])
            .output()?;
        let mut page: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| failed(format!("keel list --json: {e}")))?;
        match page["runs"].take() {
            serde_json::Value::Array(runs) => Ok(runs),
            other => Err(failed(format!("keel list --json: no runs in {other}"))),
        }
    }

    /// The ground truth, read straight from moto (not through the proxy).
    fn verify(&mut self, worker: &Worker) -> Result<(), DemoError> {
        writeln!(
            self.out,
            "\n== checking through the AWS API (moto, directly)"
        )?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let truth = runtime
            .block_on(async { Inventory::read(&self.account.sdk_config().await).await })
            .map_err(|e| failed(format!("reading moto: {e}")))?;
        let runs = self.runs(worker)?;
        let mut problems = status_problems(&runs);
        problems.extend(check_in_problems(&runs));
        problems.extend(device_problems(self.options, &truth));
        problems.extend(greengrass_problems(&truth));
        if !problems.is_empty() {
            return Err(failed(format!(
                "{}\n{}",
                problems.join("\n"),
                truth.summary()
            )));
        }
        let devices = device_count(self.options);
        writeln!(
            self.out,
            "ok: {devices} things, each with one active certificate and one policy; 1 role, \
             1 group, 1 core and 1 device definition; run {PLANT} recorded check-in \
             {CHECK_IN_ID}; nothing of run {DOOMED} is left"
        )?;
        Ok(())
    }
}

/// The devices the demo onboards: the plant's core, its client devices and the fleet.
fn device_count(options: &DemoOptions) -> usize {
    1 + options.clients + options.fleet
}

/// What is wrong with the ends of the demo's runs (from `keel list --json`).
fn status_problems(runs: &[serde_json::Value]) -> Vec<String> {
    let status = |id: &str| {
        runs.iter()
            .find(|r| r["id"] == id)
            .map(|r| r["status"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    let mut problems = Vec::new();
    for (id, want) in [
        (PLANT, "completed"),
        (FLEET, "completed"),
        (DOOMED, "compensated"),
    ] {
        if status(id) != want {
            problems.push(format!("run {id} is {:?}, not {want}", status(id)));
        }
    }
    problems
}

/// What is wrong with the check-in the plant's output records: it must be the one the demo
/// sent.
fn check_in_problems(runs: &[serde_json::Value]) -> Vec<String> {
    let recorded = runs
        .iter()
        .find(|r| r["id"] == PLANT)
        .map(|r| r["output"]["checked_in"]["event_id"].clone())
        .unwrap_or_default();
    if recorded == CHECK_IN_ID {
        Vec::new()
    } else {
        vec![format!(
            "run {PLANT} recorded check-in {recorded}, not {CHECK_IN_ID:?}"
        )]
    }
}

/// What is wrong with the IoT things, certificates and policies moto holds: one of each per
/// device of the plant and the fleet, and nothing of the doomed core.
fn device_problems(options: &DemoOptions, truth: &Inventory) -> Vec<String> {
    let devices = device_count(options);
    let mut problems = Vec::new();
    let mut expected: Vec<String> = (0..options.clients)
        .map(|i| format!("{PLANT}-client-{i}"))
        .chain((0..options.fleet).map(|i| format!("fleet-{i}")))
        .chain([format!("{PLANT}-core")])
        .collect();
    expected.sort();
    let mut things: Vec<String> = truth.things.iter().map(|t| t.name.clone()).collect();
    things.sort();
    if things != expected {
        problems.push(format!("things {things:?}, expected {expected:?}"));
    }
    let active = truth
        .certificates
        .iter()
        .filter(|c| c.status == "ACTIVE")
        .count();
    if truth.certificates.len() != devices || active != devices {
        problems.push(format!(
            "{} certificates ({active} active), expected {devices}",
            truth.certificates.len()
        ));
    }
    if truth.things.iter().any(|t| t.principals.len() != 1) {
        problems.push("a thing without exactly one certificate".into());
    }
    if truth.iot_policies.len() != devices {
        problems.push(format!(
            "{} IoT policies, expected {devices}",
            truth.iot_policies.len()
        ));
    }
    problems
}

/// What is wrong with the IAM role and the Greengrass group and definitions moto holds: the
/// plant's, once each, and nothing of the doomed core.
fn greengrass_problems(truth: &Inventory) -> Vec<String> {
    let mut problems = Vec::new();
    let roles: Vec<&str> = truth.roles.iter().map(|r| r.name.as_str()).collect();
    if roles != [format!("{PLANT}-role")] {
        problems.push(format!("roles {roles:?}, expected [\"{PLANT}-role\"]"));
    }
    if truth.groups.len() != 1
        || truth.core_definitions.len() != 1
        || truth.device_definitions.len() != 1
    {
        problems.push(format!(
            "{} groups, {} core and {} device definitions, expected 1 each",
            truth.groups.len(),
            truth.core_definitions.len(),
            truth.device_definitions.len()
        ));
    }
    problems
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<String, DemoError> {
    std::fs::write(path, serde_json::to_vec_pretty(value).expect("JSON"))?;
    Ok(path.to_string_lossy().into_owned())
}

/// The event a core's check-in is sent as (`keel_workflows::greengrass::CHECK_IN_EVENT`;
/// the testkit does not depend on the workflows).
const CHECK_IN_EVENT: &str = "core-checked-in";

const GREENGRASS_TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"greengrass.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;
const CONNECT_ONLY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"iot:Connect","Resource":"*"}]}"#;

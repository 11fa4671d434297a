//! What the AWS step tests share: an engine (sled on disk) whose AWS clients go through the
//! fault proxy to a fresh moto account, and a direct client for the ground truth.

#![allow(dead_code)]

use aws_config::SdkConfig;
use keel_engine::{
    Engine, EngineBuilder, IdempotencyKey, OperationIndex, RunId, RunStatus, Workflow,
};
use keel_steps::aws::x509::KeyStore;
use keel_steps::aws::{AwsClients, AwsSteps};
use keel_testkit::aws::SdkOptions;
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{Fault, FaultProxy, FaultRule, Rules};

pub(crate) struct Env {
    pub(crate) proxy: FaultProxy,
    /// The SDK's configuration through the proxy.
    pub(crate) via: SdkConfig,
    pub(crate) direct: SdkConfig,
    pub(crate) engine: Engine,
    pub(crate) keys: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Env {
    /// An engine with the workflows `register` adds, behind a proxy playing `rules`.
    pub(crate) async fn new(
        rules: Rules,
        register: impl FnOnce(EngineBuilder) -> EngineBuilder,
    ) -> Env {
        keel_testkit::init_tracing();
        let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
        let proxy = FaultProxy::start(&account.endpoint, rules).expect("proxy starts");
        let via = account
            .sdk_config_via(&proxy.endpoint(), SdkOptions::default())
            .await;
        let direct = account.sdk_config().await;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let engine = register(Engine::builder(dir.path().join("data")))
            .aws_steps()
            .resource(AwsClients::new(&via))
            .resource(KeyStore::new(&keys))
            .open()
            .await
            .unwrap();
        Env {
            proxy,
            via,
            direct,
            engine,
            keys,
            _dir: dir,
        }
    }

    /// Waits (at most 60 s, polling) until the proxy has seen `n` requests for `operation`:
    /// a bounded wait on a condition that the steps' retry backoff decides.
    pub(crate) async fn await_requests(&self, operation: &str, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.proxy.requests_for(operation).len() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{operation} was not requested {n} times within 60 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Another engine, with its own store in `dir`, calling AWS through the same proxy (and so
    /// the same moto account): a second installation that may reuse run ids.
    pub(crate) async fn another_engine(
        &self,
        dir: &std::path::Path,
        register: impl FnOnce(EngineBuilder) -> EngineBuilder,
    ) -> Engine {
        register(Engine::builder(dir.join("data")))
            .aws_steps()
            .resource(AwsClients::new(&self.via))
            .resource(KeyStore::new(dir.join("keys")))
            .open()
            .await
            .unwrap()
    }

    pub(crate) async fn truth(&self) -> Inventory {
        Inventory::read(&self.direct).await.expect("inventory")
    }

    /// Runs `W` to its end: its result and final status.
    pub(crate) async fn run<W: Workflow>(
        &self,
        id: &str,
        input: W::Input,
    ) -> (keel_engine::Result<W::Output>, RunStatus) {
        let result = self
            .engine
            .start::<W>(id, input)
            .await
            .unwrap()
            .result()
            .await;
        let status = self.engine.history(id).await.unwrap().run.status;
        (result, status)
    }
}

/// The idempotency key of step `step` of run `run`.
pub(crate) fn key(run: &str, step: u32) -> String {
    IdempotencyKey::for_step(&RunId::new(run).unwrap(), OperationIndex(step)).to_string()
}

/// 30% of responses lost after the request took effect, 20% throttled, on every call.
pub(crate) fn hostile(seed: u64) -> Rules {
    Rules::seeded(seed)
        .fault(FaultRule::new(Fault::LostResponse).probability(0.3))
        .fault(FaultRule::new(Fault::Throttle).probability(0.2))
}

/// `rules` with the first call of each of `operations` losing its response, so every create
/// step goes through adoption at least once.
pub(crate) fn first_response_lost(mut rules: Rules, operations: &[&str]) -> Rules {
    for op in operations {
        rules.faults.insert(
            0,
            FaultRule::new(Fault::LostResponse).operation(op).limit(1),
        );
    }
    rules
}

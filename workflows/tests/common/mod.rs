//! What the provisioning tests share: a fresh moto account, a fault proxy in front of it, and
//! an engine with the provisioning workflows whose AWS clients go through the proxy; moto is
//! read directly (`direct`) for the ground truth.

use keel_engine::Engine;
use keel_steps::aws::x509::KeyStore;
use keel_steps::aws::AwsClients;
use keel_testkit::aws::SdkOptions;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{FaultProxy, Rules};
use keel_workflows::KeelWorkflows;

pub(crate) struct Env {
    /// Read by the tests that look at what the proxy did; the others only keep it running.
    #[allow(dead_code)]
    pub(crate) proxy: FaultProxy,
    pub(crate) direct: aws_config::SdkConfig,
    pub(crate) engine: Engine,
    _dir: tempfile::TempDir,
}

/// An engine behind a proxy playing `rules`, on a fresh account.
pub(crate) async fn env(rules: Rules) -> Env {
    keel_testkit::init_tracing();
    let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
    let proxy = FaultProxy::start(&account.endpoint, rules).expect("proxy starts");
    let via = account
        .sdk_config_via(&proxy.endpoint(), SdkOptions::default())
        .await;
    let direct = account.sdk_config().await;
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::builder(dir.path().join("data"))
        .provisioning_workflows()
        .resource(AwsClients::new(&via))
        .resource(KeyStore::new(dir.path().join("keys")))
        .open()
        .await
        .unwrap();
    Env {
        proxy,
        direct,
        engine,
        _dir: dir,
    }
}

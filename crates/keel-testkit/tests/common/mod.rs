//! What the fault proxy tests share: a fresh moto account on the shared server, a proxy in
//! front of it, SDK configurations through the proxy (with no retries unless a test asks, so
//! every fault reaches the test) and straight to moto (the ground truth).

#![allow(dead_code)]

use aws_config::SdkConfig;
use aws_sdk_iam::config::http::HttpResponse;
use aws_sdk_iam::error::{ProvideErrorMetadata, SdkError};
use keel_testkit::aws::SdkOptions;
use keel_testkit::inventory::Inventory;
use keel_testkit::moto::TestAccount;
use keel_testkit::proxy::{FaultProxy, Rules};

pub(crate) struct Env {
    pub(crate) proxy: FaultProxy,
    /// Through the proxy.
    pub(crate) via: SdkConfig,
    /// Straight to moto: the ground truth.
    pub(crate) direct: SdkConfig,
}

impl Env {
    /// A proxy playing `rules` on a fresh account; the SDK does not retry.
    pub(crate) async fn new(rules: Rules) -> Env {
        Self::with_options(rules, SdkOptions::no_retries()).await
    }

    /// A proxy playing `rules` on a fresh account; the SDK is configured by `options`.
    pub(crate) async fn with_options(rules: Rules, options: SdkOptions) -> Env {
        keel_testkit::init_tracing();
        let account = TestAccount::fresh().expect("moto's server (see docs/testing.md)");
        let proxy = FaultProxy::start(&account.endpoint, rules).expect("proxy starts");
        let via = account.sdk_config_via(&proxy.endpoint(), options).await;
        let direct = account.sdk_config().await;
        Env { proxy, via, direct }
    }

    pub(crate) fn iam(&self) -> aws_sdk_iam::Client {
        aws_sdk_iam::Client::new(&self.via)
    }

    pub(crate) fn iot(&self) -> aws_sdk_iot::Client {
        aws_sdk_iot::Client::new(&self.via)
    }

    pub(crate) fn greengrass(&self) -> aws_sdk_greengrass::Client {
        aws_sdk_greengrass::Client::new(&self.via)
    }

    pub(crate) fn sts(&self) -> aws_sdk_sts::Client {
        aws_sdk_sts::Client::new(&self.via)
    }

    /// What moto holds, read around the proxy.
    pub(crate) async fn truth(&self) -> Inventory {
        Inventory::read(&self.direct).await.expect("inventory")
    }
}

/// A trust policy that lets Greengrass assume the role.
pub(crate) const TRUST: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"greengrass.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

/// Creates role `name` trusting Greengrass; returns its ARN, or the error in full.
pub(crate) async fn create_role(iam: &aws_sdk_iam::Client, name: &str) -> Result<String, String> {
    iam.create_role()
        .role_name(name)
        .assume_role_policy_document(TRUST)
        .send()
        .await
        .map(|r| r.role().map(|r| r.arn().to_string()).unwrap_or_default())
        .map_err(|e| format!("{}", aws_sdk_iam::error::DisplayErrorContext(e)))
}

/// The error code and HTTP status of a service error; panics on any other kind of error.
pub(crate) fn service_error<E: ProvideErrorMetadata + std::fmt::Debug>(
    error: &SdkError<E, HttpResponse>,
) -> (String, u16) {
    match error {
        SdkError::ServiceError(e) => (
            e.err().code().unwrap_or_default().to_string(),
            e.raw().status().as_u16(),
        ),
        other => panic!("expected a service error, got {other:?}"),
    }
}

/// One EC2 query call (`Action` and its parameters as a form, signed only as far as moto and
/// the proxy read: the access key and the service in the credential scope), as the SDK would
/// send it; the answer's status and body, or `None` when the connection closed unanswered.
pub(crate) fn ec2_call(
    endpoint: &str,
    access_key: &str,
    action: &str,
    params: &[(&str, &str)],
) -> Option<(u16, String)> {
    let authorization = format!(
        "AWS4-HMAC-SHA256 Credential={access_key}/20261202/us-east-1/ec2/aws4_request, \
         SignedHeaders=host, Signature=0"
    );
    let mut form = vec![("Action", action), ("Version", "2016-11-15")];
    form.extend_from_slice(params);
    let answer = ureq::post(endpoint)
        .set("Authorization", &authorization)
        .timeout(std::time::Duration::from_secs(30))
        .send_form(&form);
    match answer {
        Ok(response) => Some((response.status(), response.into_string().unwrap())),
        Err(ureq::Error::Status(status, response)) => {
            Some((status, response.into_string().unwrap()))
        }
        Err(ureq::Error::Transport(_)) => None,
    }
}

/// Every `<instanceId>` of an EC2 answer.
pub(crate) fn instance_ids(body: &str) -> Vec<String> {
    body.split("<instanceId>")
        .skip(1)
        .filter_map(|rest| rest.split("</instanceId>").next())
        .map(str::to_string)
        .collect()
}

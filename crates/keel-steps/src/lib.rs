//! Keel's step library: AWS IAM/STS and IoT steps, each idempotent by its step's key (a retry
//! after a lost response or a crash adopts what the lost attempt made, after checking that it
//! carries the key) and undoable (compensations remove only what the step made).
//!
//! Register the clients and the key store as engine resources:
//!
//! ```no_run
//! # async fn f(sdk_config: aws_config::SdkConfig) -> Result<(), keel_engine::EngineError> {
//! use keel_steps::aws::{x509::KeyStore, AwsClients};
//! let engine = keel_engine::Engine::builder("./keel-data")
//!     .resource(AwsClients::new(&sdk_config))
//!     .resource(KeyStore::new("./keel-data/keys"))
//!     .open()
//!     .await?;
//! # Ok(()) }
//! ```

pub mod aws;
pub mod files;
pub mod s3;
pub mod sftp;

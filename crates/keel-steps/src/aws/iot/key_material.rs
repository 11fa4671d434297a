//! `CreateKeyMaterial`: a device's key pair and self-signed certificate, made locally.

use keel_engine::{Compensation, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};

use super::super::x509::{KeyStore, Material};

/// Makes a key pair and a self-signed certificate for `subject` in the engine's key store
/// ([`KeyStore::create`]), with no AWS call. Its output, journaled before the run's next
/// step starts, is what names the device's key from then on (the key file's path and its
/// public key's fingerprint) and the certificate that [`super::RegisterCertificate`]
/// registers.
///
/// Every attempt makes new material and never adopts a file it finds: an attempt runs again
/// only when the one before it journaled no outcome, so nothing can have used what that one
/// wrote, and its files (named by the step's key) are removed first.
///
/// Compensation: removes every file named by the step's key (those of its output and any an
/// attempt in doubt left).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateKeyMaterial {
    /// The certificate's common name (the device).
    pub subject: String,
}

impl Step for CreateKeyMaterial {
    const KIND: &'static str = "aws.iot.create-key-material";
    type Output = Material;

    async fn execute(&self, ctx: &StepContext) -> Result<Material, StepError> {
        let store = KeyStore::of(ctx)?;
        let (key, subject) = (ctx.key(), self.subject.clone());
        crate::files::blocking(move || Ok(store.create(&key, &subject)?)).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Material>,
    ) -> Result<Compensation, StepError> {
        let store = KeyStore::of(ctx)?;
        if let Some(material) = &output {
            // The files are found by the step's key in the store's directory; a store moved
            // since the step ran leaves them where they are, and says so.
            if material.key_path.parent() != Some(store.dir()) {
                tracing::warn!(
                    key_path = %material.key_path.display(),
                    dir = %store.dir().display(),
                    "key files outside the key store's directory are not removed"
                );
            }
        }
        let key = ctx.key();
        crate::files::blocking(move || Ok(store.remove(&key)?)).await?;
        Ok(Compensation::Done)
    }
}

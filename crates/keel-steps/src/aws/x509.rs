//! Device key material made locally, so that a certificate's identity is known before AWS is
//! called: an ECDSA P-256 key pair and a self-signed certificate, written to files named by
//! the step's idempotency key. A retry finds the files and registers the same certificate,
//! whose IoT id is the SHA-256 of its DER, so a lost response can neither leave a second
//! certificate nor an orphan the step cannot find.
//!
//! The private key never enters the journal: it is written with mode 0600 in the key store's
//! directory (mode 0700), and the journal keeps its path and the public key's fingerprint.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::files::hex;
use keel_engine::{IdempotencyKey, StepContext, StepError};
use sha2::{Digest, Sha256};

/// Where device keys are written: an engine resource (`EngineBuilder::resource`).
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// Keys go to `dir`, created (mode 0700) when the first key is written.
    pub fn new(dir: impl Into<PathBuf>) -> KeyStore {
        KeyStore { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key store of `ctx`'s engine.
    pub(crate) fn of(ctx: &StepContext) -> Result<std::sync::Arc<KeyStore>, StepError> {
        ctx.resource::<KeyStore>().ok_or_else(|| {
            StepError::permanent(
                "no key store registered with the engine: add EngineBuilder::resource(KeyStore::new(dir))",
            )
        })
    }

    /// The private key's path for `key`.
    pub fn key_path(&self, key: &IdempotencyKey) -> PathBuf {
        self.dir.join(format!("{key}.key.pem"))
    }

    /// The certificate's path for `key`.
    pub fn cert_path(&self, key: &IdempotencyKey) -> PathBuf {
        self.dir.join(format!("{key}.cert.pem"))
    }

    /// The key material of `key`: read back if a previous attempt wrote it, made otherwise.
    pub fn material(&self, key: &IdempotencyKey, subject: &str) -> Result<Material, StepError> {
        let key_path = self.key_path(key);
        let cert_path = self.cert_path(key);
        let io = |what: &str, path: &Path, e: std::io::Error| {
            StepError::retryable(format!("{what} {}: {e}", path.display()))
        };
        let key_pem = match fs::read_to_string(&key_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pair = rcgen::KeyPair::generate()
                    .map_err(|e| StepError::permanent(format!("generating a key pair: {e}")))?;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&self.dir)
                    .map_err(|e| io("creating", &self.dir, e))?;
                write_atomically(&key_path, pair.serialize_pem().as_bytes(), 0o600)
                    .map_err(|e| io("writing", &key_path, e))?;
                pair.serialize_pem()
            }
            Err(e) => return Err(io("reading", &key_path, e)),
        };
        let pair = rcgen::KeyPair::from_pem(&key_pem).map_err(|e| {
            StepError::permanent(format!(
                "key file {} does not parse: {e}",
                key_path.display()
            ))
        })?;
        let cert_pem = match fs::read_to_string(&cert_path) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Only a certificate on disk is ever registered, so a new one can be made as
                // long as none was written.
                let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
                    .map_err(|e| StepError::permanent(format!("certificate parameters: {e}")))?;
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, subject);
                let cert = params
                    .self_signed(&pair)
                    .map_err(|e| StepError::permanent(format!("self-signing: {e}")))?;
                write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)
                    .map_err(|e| io("writing", &cert_path, e))?;
                cert.pem()
            }
            Err(e) => return Err(io("reading", &cert_path, e)),
        };
        let der = pem_der(&cert_pem).ok_or_else(|| {
            StepError::permanent(format!(
                "certificate file {} holds no PEM certificate",
                cert_path.display()
            ))
        })?;
        Ok(Material {
            certificate_id: hex(&Sha256::digest(&der)),
            certificate_pem: cert_pem,
            key_path,
            key_fingerprint: hex(&Sha256::digest(pair.public_key_der())),
        })
    }

    /// Removes `key`'s files (what a compensation does once the certificate is gone).
    pub fn remove(&self, key: &IdempotencyKey) -> Result<(), StepError> {
        for path in [self.cert_path(key), self.key_path(key)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(StepError::retryable(format!(
                        "removing {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        crate::files::sync_dir(&self.dir)
            .map_err(|e| StepError::retryable(format!("syncing {}: {e}", self.dir.display())))
    }
}

/// A device's key material.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Material {
    /// SHA-256 of the certificate's DER, lowercase hex: its id in IoT.
    pub certificate_id: String,
    /// The certificate (public).
    pub certificate_pem: String,
    /// The private key's file.
    pub key_path: PathBuf,
    /// SHA-256 of the public key (SubjectPublicKeyInfo DER), lowercase hex.
    pub key_fingerprint: String,
}

/// Writes `bytes` to `path` through a temporary file in the same directory: written, synced,
/// renamed, directory synced. A crash leaves either no file or the whole file.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    crate::files::sync_dir(dir)
}

/// The DER of the first PEM certificate in `pem`.
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE-----"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END CERTIFICATE-----"))
        .collect();
    base64_decode(body.trim())
}

pub(crate) fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        if c == b'=' {
            break;
        }
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn material_is_made_once_and_read_back_with_a_private_key_file_of_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("keys"));
        let run = keel_engine::RunId::new("r").unwrap();
        let key = IdempotencyKey::for_step(&run, keel_engine::StepIndex(3));
        let first = store.material(&key, "device-1").unwrap();
        let again = store.material(&key, "device-1").unwrap();
        assert_eq!(first, again, "a retry registers the same certificate");
        assert_eq!(first.certificate_id.len(), 64);
        let mode = fs::metadata(&first.key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dir_mode = fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        // The id is the SHA-256 of the DER, as IoT computes it.
        let der = pem_der(&first.certificate_pem).unwrap();
        assert_eq!(first.certificate_id, hex(&Sha256::digest(&der)));
        store.remove(&key).unwrap();
        assert!(!first.key_path.exists());
        let other = store.material(&key, "device-1").unwrap();
        assert_ne!(other.certificate_id, first.certificate_id);
    }
}

//! Device key material made locally, so that a certificate's identity is known before AWS is
//! called: an ECDSA P-256 key pair and a self-signed certificate, written to the key store's
//! directory under names nobody can know in advance (`<key>.<16 random hex>.key.pem` and
//! `.cert.pem`, `<key>` the step's idempotency key).
//!
//! The private key never enters the journal; the journal keeps the key file's path and the
//! SHA-256 of its public key (the [`Material`] that `CreateKeyMaterial` returns). The rules
//! that keep another local user from planting a key or reading one:
//!
//! - **The directory is the process's own.** It is opened without following a symbolic link
//!   and refused unless the process's effective user owns it and no group or other
//!   permission bit is set ([`KeyStore::check`]); a missing one is created with mode 0700.
//!   The checks are made on the opened directory, and every file is created, listed and
//!   removed relative to that descriptor, so a directory swapped after the check is never
//!   written.
//! - **Files are only created, never reused.** Each is made with `O_CREAT | O_EXCL |
//!   O_NOFOLLOW` (the key with mode 0600), so a planted file or link under its name fails
//!   the creation rather than being written through.
//! - **Nothing found on disk is adopted.** [`KeyStore::create`] always makes a new key, after
//!   removing every file named by the step's key: an attempt runs again only when the one
//!   before it recorded no outcome, so nothing can have used what it left. Once the outcome
//!   is journaled, the journal's path and fingerprint are what name the device's key.
//!
//! Crash safety: both files are written and synced, then the directory is synced, before
//! `create` returns, so the journaled output only ever names complete, durable files; a
//! crash before that leaves files under the step's key, which the next attempt or the
//! step's compensation removes.
//!
//! [`Material`]: crate::aws::x509::Material
//! [`KeyStore::check`]: crate::aws::x509::KeyStore::check
//! [`KeyStore::create`]: crate::aws::x509::KeyStore::create

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::files::hex;
use keel_engine::{IdempotencyKey, StepContext, StepError};
use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Why the key store refused its directory or could not make or remove key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    /// The directory is a symbolic link: whoever can change the link decides where keys go.
    #[error(
        "keys directory {} is a symbolic link: it must be a directory of its own (remove the link and mkdir -m 700 {})",
        path.display(),
        path.display()
    )]
    Symlink {
        /// The directory.
        path: PathBuf,
    },
    /// The path is not a directory.
    #[error("keys directory {} is not a directory", path.display())]
    NotDirectory {
        /// The path.
        path: PathBuf,
    },
    /// Another user owns the directory, so they can plant or read keys.
    #[error(
        "keys directory {} is owned by uid {owner}, not by uid {euid} that this process runs as: it must be the process's own (chown {euid} {}, or use another directory)",
        path.display(),
        path.display()
    )]
    Owner {
        /// The directory.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// The process's effective user.
        euid: u32,
    },
    /// Group or other users have some access to the directory.
    #[error(
        "keys directory {} has mode {mode:04o}: it must be owner-only (chmod 700 {})",
        path.display(),
        path.display()
    )]
    Mode {
        /// The directory.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file system call failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done (`creating`, `syncing`, ...).
        action: &'static str,
        /// On which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Making the key pair or the certificate failed.
    #[error("making key material: {0}")]
    Crypto(#[source] rcgen::Error),
    /// A certificate file holds no PEM certificate.
    #[error("certificate file {} holds no PEM certificate", path.display())]
    NotCertificate {
        /// The file.
        path: PathBuf,
    },
}

impl KeyStoreError {
    /// Whether trying again cannot help: a directory an operator must fix, or material that
    /// cannot be made or read.
    pub fn is_permanent(&self) -> bool {
        match self {
            KeyStoreError::Symlink { .. }
            | KeyStoreError::NotDirectory { .. }
            | KeyStoreError::Owner { .. }
            | KeyStoreError::Mode { .. }
            | KeyStoreError::Crypto(_)
            | KeyStoreError::NotCertificate { .. } => true,
            KeyStoreError::Io { .. } => false,
        }
    }
}

impl From<KeyStoreError> for StepError {
    fn from(e: KeyStoreError) -> StepError {
        if e.is_permanent() {
            StepError::permanent(e.to_string())
        } else {
            StepError::retryable(e.to_string())
        }
    }
}

/// Where device keys are written: an engine resource (`EngineBuilder::resource`).
#[derive(Clone, Debug)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// Keys go to `dir`, created (mode 0700) when first needed. Nothing is checked yet: call
    /// [`KeyStore::check`] to refuse a bad directory before any run starts.
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

    /// Creates the directory (mode 0700) if it is missing, and refuses it if it is a
    /// symbolic link, not a directory, owned by another user than the process's effective
    /// user, or open to group or others (any of mode 0077). Every use of the store makes the
    /// same checks; a worker calls this at start to refuse a bad directory before anything
    /// runs.
    pub fn check(&self) -> Result<(), KeyStoreError> {
        self.open().map(drop)
    }

    /// New key material for the step of `key`: first removes every file an earlier attempt of
    /// that step left, then writes a new key pair (mode 0600) and a self-signed certificate
    /// for `subject` under a new random name. Never reads a key from disk.
    pub fn create(&self, key: &IdempotencyKey, subject: &str) -> Result<Material, KeyStoreError> {
        let dir = self.open()?;
        let removed = dir.remove_prefixed(&prefix(key))?;
        if removed > 0 {
            tracing::info!(%key, removed, dir = %self.dir.display(), "removed key files an attempt without a journaled outcome left");
        }
        let pair = rcgen::KeyPair::generate().map_err(KeyStoreError::Crypto)?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(KeyStoreError::Crypto)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, subject);
        let cert = params.self_signed(&pair).map_err(KeyStoreError::Crypto)?;
        let stem = format!("{}{:016x}", prefix(key), rand::random::<u64>());
        let key_name = format!("{stem}.key.pem");
        let cert_name = format!("{stem}.cert.pem");
        dir.create_file(&key_name, pair.serialize_pem().as_bytes(), 0o600)?;
        dir.create_file(&cert_name, cert.pem().as_bytes(), 0o644)?;
        dir.sync()?;
        Ok(Material {
            certificate_id: hex(&Sha256::digest(cert.der())),
            certificate_pem: cert.pem(),
            key_path: self.dir.join(key_name),
            cert_path: self.dir.join(cert_name),
            key_fingerprint: hex(&Sha256::digest(pair.public_key_der())),
        })
    }

    /// Removes every file of the step of `key` (those [`KeyStore::create`] made, and any an
    /// interrupted attempt left); returns how many there were.
    pub fn remove(&self, key: &IdempotencyKey) -> Result<usize, KeyStoreError> {
        self.open()?.remove_prefixed(&prefix(key))
    }

    /// The certificate id in `<key>.cert.pem`, the file the `aws.iot.register-certificate`
    /// step wrote before key material became a step of its own; `None` without the file.
    /// Only for the compensation of runs journaled then.
    pub(crate) fn legacy_certificate_id(
        &self,
        key: &IdempotencyKey,
    ) -> Result<Option<String>, KeyStoreError> {
        let name = format!("{key}.cert.pem");
        let Some(pem) = self.open()?.read_file(&name)? else {
            return Ok(None);
        };
        certificate_id(&pem)
            .map(Some)
            .ok_or_else(|| KeyStoreError::NotCertificate {
                path: self.dir.join(name),
            })
    }

    /// Opens the directory (creating it if missing) and checks it.
    fn open(&self) -> Result<KeyDir<'_>, KeyStoreError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rustix::fs::open(&self.dir, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&self.dir)
                    .map_err(|source| KeyStoreError::Io {
                        action: "creating",
                        path: self.dir.clone(),
                        source,
                    })?;
                tracing::info!(dir = %self.dir.display(), "created the keys directory (mode 0700)");
                rustix::fs::open(&self.dir, flags, Mode::empty()).map_err(|e| self.refusal(e))?
            }
            Err(e) => return Err(self.refusal(e)),
        };
        let stat = rustix::fs::fstat(&fd).map_err(io("reading the status of", &self.dir))?;
        let euid = rustix::process::geteuid().as_raw();
        if stat.st_uid != euid {
            return Err(KeyStoreError::Owner {
                path: self.dir.clone(),
                owner: stat.st_uid,
                euid,
            });
        }
        let mode = Mode::from_raw_mode(stat.st_mode).bits() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyStoreError::Mode {
                path: self.dir.clone(),
                mode,
            });
        }
        Ok(KeyDir {
            fd,
            path: &self.dir,
        })
    }

    /// Why opening the directory failed with `e`: a symbolic link, not a directory, or I/O.
    fn refusal(&self, e: Errno) -> KeyStoreError {
        if e == Errno::LOOP || e == Errno::NOTDIR {
            if let Ok(meta) = fs::symlink_metadata(&self.dir) {
                if meta.file_type().is_symlink() {
                    return KeyStoreError::Symlink {
                        path: self.dir.clone(),
                    };
                }
                if !meta.is_dir() {
                    return KeyStoreError::NotDirectory {
                        path: self.dir.clone(),
                    };
                }
            }
        }
        io("opening", &self.dir)(e)
    }
}

/// What every file name of the step of `key` starts with.
fn prefix(key: &IdempotencyKey) -> String {
    format!("{key}.")
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(Errno) -> KeyStoreError {
    let path = path.to_path_buf();
    move |e| KeyStoreError::Io {
        action,
        path,
        source: e.into(),
    }
}

/// The checked keys directory, open: every file is reached relative to it.
struct KeyDir<'a> {
    fd: OwnedFd,
    path: &'a Path,
}

impl KeyDir<'_> {
    /// Creates `name` (never an existing file, never through a link), writes `bytes` and
    /// syncs it.
    fn create_file(&self, name: &str, bytes: &[u8], mode: u32) -> Result<(), KeyStoreError> {
        let path = self.path.join(name);
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))
            .map_err(io("creating", &path))?;
        let mut file = fs::File::from(fd);
        let written = file.write_all(bytes).and_then(|()| file.sync_all());
        written.map_err(|source| KeyStoreError::Io {
            action: "writing",
            path,
            source,
        })
    }

    /// The content of `name`, read without following a link; `None` if there is no such file.
    fn read_file(&self, name: &str) -> Result<Option<String>, KeyStoreError> {
        let path = self.path.join(name);
        // Non-blocking, so that a FIFO under the name cannot hang the read.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(io("opening", &path)(e)),
        };
        let mut text = String::new();
        std::io::Read::read_to_string(&mut fs::File::from(fd), &mut text).map_err(|source| {
            KeyStoreError::Io {
                action: "reading",
                path,
                source,
            }
        })?;
        Ok(Some(text))
    }

    /// Removes every entry whose name starts with `prefix`, then syncs the directory if
    /// there were any; returns how many.
    fn remove_prefixed(&self, prefix: &str) -> Result<usize, KeyStoreError> {
        let mut names: Vec<CString> = Vec::new();
        let listing = rustix::fs::Dir::read_from(&self.fd).map_err(io("listing", self.path))?;
        for entry in listing {
            let entry = entry.map_err(io("listing", self.path))?;
            if entry.file_name().to_bytes().starts_with(prefix.as_bytes()) {
                names.push(entry.file_name().to_owned());
            }
        }
        for name in &names {
            let path = self.path.join(name.to_string_lossy().as_ref());
            rustix::fs::unlinkat(&self.fd, name, AtFlags::empty())
                .map_err(io("removing", &path))?;
        }
        if !names.is_empty() {
            self.sync()?;
        }
        Ok(names.len())
    }

    /// Syncs the directory, so that its created and removed names are durable.
    fn sync(&self) -> Result<(), KeyStoreError> {
        rustix::fs::fsync(&self.fd).map_err(io("syncing", self.path))
    }
}

/// A device's key material: the output of `CreateKeyMaterial`, journaled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Material {
    /// SHA-256 of the certificate's DER, lowercase hex: its id in IoT.
    pub certificate_id: String,
    /// The certificate (public).
    pub certificate_pem: String,
    /// The private key's file (mode 0600).
    pub key_path: PathBuf,
    /// The certificate's file.
    pub cert_path: PathBuf,
    /// SHA-256 of the public key (SubjectPublicKeyInfo DER), lowercase hex: what proves that
    /// the file at `key_path` holds the key this material was made with.
    pub key_fingerprint: String,
}

/// The IoT id of the first certificate in `pem`: the SHA-256 of its DER, lowercase hex.
pub fn certificate_id(pem: &str) -> Option<String> {
    pem_der(pem).map(|der| hex(&Sha256::digest(der)))
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

    /// Material is made in a directory created with mode 0700, its key file has mode 0600 and
    /// holds the key of the journaled fingerprint, the certificate id is IoT's (SHA-256 of
    /// the DER), and removing by key leaves nothing.
    #[test]
    fn material_is_made_owner_only_and_removed_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = KeyStore::new(dir.path().join("keys"));
        let run = keel_engine::RunId::new("r").unwrap();
        let key = IdempotencyKey::for_step(&run, keel_engine::OperationIndex(3));
        store.check().unwrap();
        let dir_mode = fs::metadata(store.dir()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let material = store.create(&key, "device-1").unwrap();
        let mode = fs::metadata(&material.key_path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let name = material.key_path.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with(&format!("{key}.")), "{name}");
        assert_eq!(name.len(), format!("{key}.").len() + 16 + ".key.pem".len());
        let pem = fs::read_to_string(&material.key_path).unwrap();
        let pair = rcgen::KeyPair::from_pem(&pem).unwrap();
        assert_eq!(
            hex(&Sha256::digest(pair.public_key_der())),
            material.key_fingerprint
        );
        assert_eq!(
            fs::read_to_string(&material.cert_path).unwrap(),
            material.certificate_pem
        );
        let der = pem_der(&material.certificate_pem).unwrap();
        assert_eq!(material.certificate_id, hex(&Sha256::digest(&der)));
        assert_eq!(
            certificate_id(&material.certificate_pem).as_ref(),
            Some(&material.certificate_id)
        );
        assert_eq!(store.remove(&key).unwrap(), 2);
        assert_eq!(fs::read_dir(store.dir()).unwrap().count(), 0);
        assert_eq!(store.remove(&key).unwrap(), 0);
    }

    /// The key of step 3 of run `r`, and a key store in an owner-only `keys` directory of a
    /// fresh temporary directory, which also holds an empty `outside` directory.
    fn planted_store() -> (tempfile::TempDir, KeyStore, IdempotencyKey) {
        let dir = tempfile::tempdir().unwrap();
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path().join("keys"))
            .unwrap();
        fs::create_dir(dir.path().join("outside")).unwrap();
        let store = KeyStore::new(dir.path().join("keys"));
        let run = keel_engine::RunId::new("r").unwrap();
        let key = IdempotencyKey::for_step(&run, keel_engine::OperationIndex(3));
        (dir, store, key)
    }

    /// Symbolic links planted where a key or certificate file (or their temporary files)
    /// would go are never followed: their targets are neither created nor written.
    #[test]
    fn symlinks_planted_at_key_file_names_are_not_followed() {
        let (dir, store, key) = planted_store();
        let outside = dir.path().join("outside");
        for (i, name) in ["key.pem", "key.tmp", "cert.pem", "cert.tmp"]
            .iter()
            .enumerate()
        {
            std::os::unix::fs::symlink(
                outside.join(format!("target-{i}")),
                store.dir().join(format!("{key}.{name}")),
            )
            .unwrap();
        }
        let _ = store.create(&key, "device-1").unwrap();
        let written: Vec<_> = fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(written.is_empty(), "a link was followed: {written:?}");
    }

    /// A keys directory that others may read or write is refused, naming its path and mode.
    #[test]
    fn a_keys_directory_open_to_others_is_refused_naming_path_and_mode() {
        let (_dir, store, key) = planted_store();
        fs::set_permissions(store.dir(), fs::Permissions::from_mode(0o755)).unwrap();
        let path = store.dir().display().to_string();
        let refusal = store.check().unwrap_err();
        assert!(refusal.is_permanent());
        assert_eq!(
            refusal.to_string(),
            format!(
                "keys directory {path} has mode 0755: it must be owner-only (chmod 700 {path})"
            )
        );
        let error = store.create(&key, "device-1").unwrap_err().to_string();
        assert!(error.contains(&path), "{error}");
        assert!(error.contains("mode 0755"), "{error}");
        assert!(error.contains(&format!("chmod 700 {path}")), "{error}");
        assert_eq!(
            fs::read_dir(store.dir()).unwrap().count(),
            0,
            "a file was written"
        );
    }

    /// A keys directory owned by another user is refused, naming its owner and the
    /// process's user. (Only a process that may give a directory away, root, can set this
    /// up; for any other the refusal of `chown` is checked instead.)
    #[test]
    fn a_keys_directory_of_another_user_is_refused() {
        let (_dir, store, _) = planted_store();
        if let Err(e) = std::os::unix::fs::chown(store.dir(), Some(65534), None) {
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
            return;
        }
        let error = store.check().unwrap_err();
        assert!(error.is_permanent());
        let euid = rustix::process::geteuid().as_raw();
        let path = store.dir().display();
        assert_eq!(
            error.to_string(),
            format!(
                "keys directory {path} is owned by uid 65534, not by uid {euid} that this \
                 process runs as: it must be the process's own (chown {euid} {path}, or use \
                 another directory)"
            )
        );
    }

    /// Creating a key file never writes through a link or into a file already under its
    /// name: the creation fails and the link's target and the file are left as they were.
    #[test]
    fn a_key_file_is_never_created_through_a_link_or_over_a_file() {
        let (dir, store, _) = planted_store();
        let absent = dir.path().join("outside/absent");
        let readable = dir.path().join("outside/readable");
        fs::write(&readable, "public").unwrap();
        std::os::unix::fs::symlink(&absent, store.dir().join("a.key.pem")).unwrap();
        std::os::unix::fs::symlink(&readable, store.dir().join("r.key.pem")).unwrap();
        fs::write(store.dir().join("f.key.pem"), "planted").unwrap();
        let keys = store.open().unwrap();
        for name in ["a.key.pem", "r.key.pem", "f.key.pem"] {
            assert!(keys.create_file(name, b"secret", 0o600).is_err(), "{name}");
        }
        assert!(!absent.exists());
        assert_eq!(fs::read_to_string(&readable).unwrap(), "public");
        assert_eq!(
            fs::read_to_string(store.dir().join("f.key.pem")).unwrap(),
            "planted"
        );
    }

    /// The certificate file of a run journaled before key material was a step of its own is
    /// read for its id (no file: `None`), and a link under its name is not followed.
    #[test]
    fn a_legacy_certificate_file_is_read_without_following_a_link() {
        let (dir, store, key) = planted_store();
        assert_eq!(store.legacy_certificate_id(&key).unwrap(), None);
        let material = store.create(&key, "device-1").unwrap();
        let legacy = store.dir().join(format!("{key}.cert.pem"));
        fs::write(&legacy, &material.certificate_pem).unwrap();
        assert_eq!(
            store.legacy_certificate_id(&key).unwrap(),
            Some(material.certificate_id.clone())
        );
        fs::remove_file(&legacy).unwrap();
        let elsewhere = dir.path().join("outside/cert.pem");
        fs::write(&elsewhere, &material.certificate_pem).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &legacy).unwrap();
        assert!(store.legacy_certificate_id(&key).is_err());
    }

    /// A keys directory that is a symbolic link is refused, and nothing is written where it
    /// points.
    #[test]
    fn a_keys_directory_that_is_a_symlink_is_refused() {
        let (dir, _, key) = planted_store();
        let elsewhere = dir.path().join("elsewhere");
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&elsewhere)
            .unwrap();
        let link = dir.path().join("linked-keys");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        let store = KeyStore::new(&link);
        assert!(matches!(store.check(), Err(KeyStoreError::Symlink { .. })));
        let error = store.create(&key, "device-1").unwrap_err().to_string();
        assert!(error.contains(&link.display().to_string()), "{error}");
        assert!(error.contains("symbolic link"), "{error}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    /// A key file planted under the name a step's key would take is never adopted: the
    /// material holds a key made now.
    #[test]
    fn a_planted_key_file_is_never_adopted() {
        let (_dir, store, key) = planted_store();
        let planted = rcgen::KeyPair::generate().unwrap();
        let planted_fingerprint = hex(&Sha256::digest(planted.public_key_der()));
        fs::write(
            store.dir().join(format!("{key}.key.pem")),
            planted.serialize_pem(),
        )
        .unwrap();
        let material = store.create(&key, "device-1").unwrap();
        assert_ne!(
            material.key_fingerprint, planted_fingerprint,
            "the planted key was adopted"
        );
        let pem = fs::read_to_string(&material.key_path).unwrap();
        let pair = rcgen::KeyPair::from_pem(&pem).unwrap();
        assert_eq!(
            hex(&Sha256::digest(pair.public_key_der())),
            material.key_fingerprint
        );
    }

    /// A retry (an attempt after one whose outcome was never journaled) makes new material
    /// rather than adopting the files the earlier attempt left, and removes those files.
    #[test]
    fn a_retry_makes_new_material_and_removes_the_leftovers() {
        let (_dir, store, key) = planted_store();
        let first = store.create(&key, "device-1").unwrap();
        let retry = store.create(&key, "device-1").unwrap();
        assert_ne!(
            retry.key_fingerprint, first.key_fingerprint,
            "the leftover key was adopted"
        );
        assert_ne!(retry.certificate_id, first.certificate_id);
        let names: Vec<String> = fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(retry.key_path.exists());
    }
}

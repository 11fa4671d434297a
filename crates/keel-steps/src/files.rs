//! Safe file handoff: a file appears under its final name only complete and verified.
//!
//! [`Publish`] (`files.publish`) writes content into a destination directory through a
//! temporary name in the same directory (`.NAME.<key>.partial`: a dotfile, which consumers
//! ignore), syncs it, checks its size and SHA-256 against the expected values by reading back
//! what is on disk, renames it to the final name (atomic within one file system), and syncs
//! the directory so the rename survives a power loss. Then, if asked, it writes
//! `NAME.sha256` the same way: the marker appears only after the file. The consumer contract
//! is in docs/files.md.
//!
//! Idempotent by the step's key: a retry after a crash finds the finished file (same size and
//! digest) and adopts it, or removes the temporary file it left and starts over. A file of
//! another content under the final name is never overwritten: that is a permanent conflict.
//! Compensation removes the marker, then the file (only if it still holds the published
//! content), then any temporary file.
//!
//! [`Destination`] is the same protocol for other writers: the S3 download
//! ([`crate::s3::DownloadToFile`]) stages ranged parts into the temporary file and commits it.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use keel_engine::{crash, Compensation, IdempotencyKey, Step, StepContext, StepError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The marker's suffix: `NAME.sha256` holds `<hex digest>  NAME\n`.
pub const MARKER_SUFFIX: &str = ".sha256";

/// The suffix of temporary files (`.NAME.<key>.partial`).
pub const PARTIAL_SUFFIX: &str = ".partial";

const CHUNK: usize = 1 << 20;

/// Where content comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum Source {
    /// A local file, copied (it may be on another file system).
    File {
        /// The file.
        path: PathBuf,
    },
    /// Bytes carried in the step's argument: small content only (a step's argument is
    /// journaled, and bounded to 48 KiB).
    Bytes {
        /// The content.
        bytes: Vec<u8>,
    },
}

/// `files.publish`: publishes `source` as `dir/name`, verified against `size` and `sha256`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publish {
    /// The content.
    pub source: Source,
    /// The destination directory (must exist).
    pub dir: PathBuf,
    /// The final file name (no `/`, not starting with `.`).
    pub name: String,
    /// The expected size in bytes.
    pub size: u64,
    /// The expected SHA-256, lowercase hex.
    pub sha256: String,
    /// Also write `NAME.sha256` after the file.
    #[serde(default)]
    pub marker: bool,
}

/// What a publication made.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The final path.
    pub path: PathBuf,
    /// Its size.
    pub size: u64,
    /// Its SHA-256, lowercase hex.
    pub sha256: String,
    /// The marker's path, if one was written.
    pub marker: Option<PathBuf>,
}

/// The steps of this module, for `EngineBuilder::steps`.
pub const STEPS: &[keel_engine::StepType] = &[keel_engine::StepType::of::<Publish>()];

impl Step for Publish {
    const KIND: &'static str = "files.publish";
    type Output = Published;

    async fn execute(&self, ctx: &StepContext) -> Result<Published, StepError> {
        let this = self.clone();
        let key = ctx.key();
        blocking(move || {
            let destination = this.destination(key)?;
            if let Some(done) = destination.adopt()? {
                return Ok(done);
            }
            let mut file = destination.stage()?;
            match &this.source {
                Source::Bytes { bytes } => file.write_all(bytes).map_err(io("writing"))?,
                Source::File { path } => copy(path, &mut file)?,
            }
            destination.commit(file)
        })
        .await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        _: Option<Published>,
    ) -> Result<Compensation, StepError> {
        let this = self.clone();
        let key = ctx.key();
        blocking(move || this.destination(key)?.remove().map(|()| Compensation::Done)).await
    }
}

impl Publish {
    fn destination(&self, key: IdempotencyKey) -> Result<Destination, StepError> {
        Destination::new(
            &self.dir,
            &self.name,
            key,
            self.size,
            &self.sha256,
            self.marker,
        )
    }
}

/// Copies `path` into `file`, chunk by chunk.
fn copy(path: &Path, file: &mut File) -> Result<(), StepError> {
    let mut source = File::open(path).map_err(|e| {
        let message = format!("cannot open the source {}: {e}", path.display());
        if e.kind() == std::io::ErrorKind::NotFound {
            StepError::permanent(message)
        } else {
            StepError::retryable(message)
        }
    })?;
    let mut buffer = vec![0u8; CHUNK];
    let mut first = true;
    loop {
        let n = source.read(&mut buffer).map_err(io("reading the source"))?;
        if n == 0 {
            return Ok(());
        }
        file.write_all(&buffer[..n]).map_err(io("writing"))?;
        if first {
            first = false;
            crash::point("publish.after_partial_write");
        }
    }
}

/// Runs blocking file work off the async workers.
pub(crate) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StepError> + Send + 'static,
) -> Result<T, StepError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| StepError::retryable(format!("file task ended: {e}")))?
}

fn io(what: &'static str) -> impl Fn(std::io::Error) -> StepError {
    move |e| StepError::retryable(format!("{what}: {e}"))
}

/// One file's publication: its final, temporary and marker paths and what it must hold.
#[derive(Clone, Debug)]
pub struct Destination {
    dir: PathBuf,
    name: String,
    key: IdempotencyKey,
    size: u64,
    sha256: String,
    marker: bool,
}

impl Destination {
    /// Checks the name and digest; nothing is touched yet.
    pub fn new(
        dir: &Path,
        name: &str,
        key: IdempotencyKey,
        size: u64,
        sha256: &str,
        marker: bool,
    ) -> Result<Destination, StepError> {
        if name.is_empty()
            || name.starts_with('.')
            || name.contains('/')
            || name.contains('\0')
            || name.ends_with(MARKER_SUFFIX)
        {
            return Err(StepError::permanent(format!(
                "file name {name:?}: must be non-empty, without '/', not start with '.' and not \
                 end with {MARKER_SUFFIX}"
            )));
        }
        let hex = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex {
            return Err(StepError::permanent(format!(
                "sha256 {sha256:?} is not 64 hex digits"
            )));
        }
        Ok(Destination {
            dir: dir.to_path_buf(),
            name: name.into(),
            key,
            size,
            sha256: sha256.to_ascii_lowercase(),
            marker,
        })
    }

    /// The final path.
    pub fn final_path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    /// The temporary path of this key.
    pub fn partial_path(&self) -> PathBuf {
        self.dir
            .join(format!(".{}.{}{PARTIAL_SUFFIX}", self.name, self.key))
    }

    /// The marker's path.
    pub fn marker_path(&self) -> PathBuf {
        self.dir.join(format!("{}{MARKER_SUFFIX}", self.name))
    }

    /// The finished publication, if an earlier attempt got that far: the final file holds
    /// the expected content (the marker is completed if it is missing, and a stray temporary
    /// file removed). A final file of other content is a permanent conflict.
    pub fn adopt(&self) -> Result<Option<Published>, StepError> {
        let path = self.final_path();
        let (size, digest) = match digest_of(&path) {
            Ok(found) => found,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading the published file")(e)),
        };
        if size != self.size || digest != self.sha256 {
            return Err(StepError::permanent(format!(
                "{} exists with other content ({size} bytes, sha256 {digest}); expected {} bytes, \
                 sha256 {}: not overwritten",
                path.display(),
                self.size,
                self.sha256
            )));
        }
        remove_if_present(&self.partial_path())?;
        let marker = self.write_marker()?;
        tracing::debug!(path = %path.display(), "found published by an earlier attempt");
        Ok(Some(self.published(marker)))
    }

    /// A fresh temporary file (any left by an earlier attempt of this key is removed first).
    pub fn stage(&self) -> Result<File, StepError> {
        let partial = self.partial_path();
        remove_if_present(&partial)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&partial)
            .map_err(|e| StepError::retryable(format!("cannot create {}: {e}", partial.display())))
    }

    /// Syncs the temporary file, verifies what is on disk against the expected size and
    /// digest, renames it to the final name, syncs the directory, then writes the marker if
    /// asked. On a mismatch the temporary file is removed and the error is permanent.
    pub fn commit(&self, file: File) -> Result<Published, StepError> {
        file.sync_all().map_err(io("syncing"))?;
        drop(file);
        crash::point("publish.after_sync");
        let partial = self.partial_path();
        let (size, digest) = digest_of(&partial).map_err(io("reading back"))?;
        if size != self.size || digest != self.sha256 {
            remove_if_present(&partial)?;
            return Err(StepError::permanent(format!(
                "content of {} is {size} bytes with sha256 {digest}; expected {} bytes with \
                 sha256 {}: not published",
                self.name, self.size, self.sha256
            )));
        }
        fs::rename(&partial, self.final_path()).map_err(io("renaming"))?;
        crash::point("publish.after_rename");
        sync_dir(&self.dir).map_err(io("syncing the directory"))?;
        let marker = self.write_marker()?;
        tracing::info!(path = %self.final_path().display(), size, "published");
        Ok(self.published(marker))
    }

    /// Removes the marker and the file (each only if it holds what this publication wrote)
    /// and any temporary file; syncs the directory.
    pub fn remove(&self) -> Result<(), StepError> {
        let marker = self.marker_path();
        if fs::read_to_string(&marker).is_ok_and(|text| text == self.marker_text()) {
            remove_if_present(&marker)?;
        }
        let path = self.final_path();
        match digest_of(&path) {
            Ok((size, digest)) if size == self.size && digest == self.sha256 => {
                fs::remove_file(&path).map_err(io("removing the published file"))?;
            }
            Ok(_) => tracing::warn!(
                path = %path.display(),
                "left in place: it holds other content than this step published"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("reading the published file")(e)),
        }
        remove_if_present(&self.partial_path())?;
        sync_dir(&self.dir).map_err(io("syncing the directory"))
    }

    /// What the marker holds: `<sha256>  NAME` and a newline (the `sha256sum` format).
    fn marker_text(&self) -> String {
        format!("{}  {}\n", self.sha256, self.name)
    }

    fn published(&self, marker: Option<PathBuf>) -> Published {
        Published {
            path: self.final_path(),
            size: self.size,
            sha256: self.sha256.clone(),
            marker,
        }
    }

    /// Writes the marker (if asked) through its own temporary file.
    fn write_marker(&self) -> Result<Option<PathBuf>, StepError> {
        if !self.marker {
            return Ok(None);
        }
        let marker = self.marker_path();
        let text = self.marker_text();
        if fs::read_to_string(&marker).is_ok_and(|t| t == text) {
            return Ok(Some(marker));
        }
        let partial = self.dir.join(format!(
            ".{}{MARKER_SUFFIX}.{}{PARTIAL_SUFFIX}",
            self.name, self.key
        ));
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&partial)
            .map_err(io("creating the marker"))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io("writing the marker"))?;
        fs::rename(&partial, &marker).map_err(io("renaming the marker"))?;
        sync_dir(&self.dir).map_err(io("syncing the directory"))?;
        crash::point("publish.after_marker");
        Ok(Some(marker))
    }
}

/// Size and SHA-256 (lowercase hex) of the file at `path`, read from disk.
pub fn digest_of(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok((size, hex(&hasher.finalize())));
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn remove_if_present(path: &Path) -> Result<(), StepError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StepError::retryable(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
    }
}

/// Syncs a directory, so that renames and removals in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match File::open(dir) {
        Ok(d) => d.sync_all(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

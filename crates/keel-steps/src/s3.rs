//! `s3.download-to-file`: an S3 object downloaded in parallel ranges into a temporary file in
//! the destination directory, verified, and only then published under its final name
//! ([`crate::files::Destination`]: synced, renamed, directory synced, marker after the file).
//!
//! The reference the content is verified against, in order: the `sha256` the caller gives;
//! the object's own SHA-256 checksum (asked for with checksum mode); its ETag when that is a
//! plain MD5 (objects uploaded in one part). An object with none of these (a multipart upload
//! without checksums) is refused: the caller must give `sha256`. Every ranged GET carries
//! `If-Match: <ETag>`, so an object replaced during the download fails the attempt instead of
//! mixing two versions; the retry starts over.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_s3::types::ChecksumMode;
use keel_engine::{Compensation, IdempotencyKey, Step, StepContext, StepError};
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::aws::error::AwsFailure;
use crate::files::{blocking, hex, Destination, Published};

/// Most parallel ranges.
pub const PARTS_MAX: u32 = 16;

/// Smallest range: an object smaller than `parts` of these uses fewer ranges.
pub const PART_BYTES_MIN: u64 = 1 << 20;

/// The S3 client, an engine resource.
#[derive(Clone, Debug)]
pub struct S3Client(pub aws_sdk_s3::Client);

impl S3Client {
    /// A client from `config`, with path-style addressing (which custom endpoints such as
    /// moto need, and AWS accepts).
    pub fn new(config: &aws_config::SdkConfig) -> S3Client {
        let s3 = aws_sdk_s3::config::Builder::from(config)
            .force_path_style(true)
            .build();
        S3Client(aws_sdk_s3::Client::from_conf(s3))
    }

    fn of(ctx: &StepContext) -> Result<Arc<S3Client>, StepError> {
        ctx.resource::<S3Client>().ok_or_else(|| {
            StepError::permanent("no S3 client: register keel_steps::s3::S3Client as a resource")
        })
    }
}

/// `s3.download-to-file`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DownloadToFile {
    /// The bucket.
    pub bucket: String,
    /// The object key.
    pub key: String,
    /// The destination directory (must exist).
    pub dir: PathBuf,
    /// The final file name.
    pub name: String,
    /// Ranges downloaded at once (1 to [`PARTS_MAX`]).
    pub parts: u32,
    /// Also write `NAME.sha256` after the file.
    #[serde(default)]
    pub marker: bool,
    /// The expected SHA-256 (hex), when the caller knows it.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// What the content is checked against.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reference {
    Sha256(String),
    Md5(String),
}

/// The object as HEAD describes it.
struct Object {
    size: u64,
    etag: String,
    reference: Reference,
}

/// The steps of this module, for `EngineBuilder::steps`.
pub const STEPS: &[keel_engine::StepType] = &[keel_engine::StepType::of::<DownloadToFile>()];

impl Step for DownloadToFile {
    const KIND: &'static str = "s3.download-to-file";
    type Output = Published;
    const RATE_LIMIT: Option<&'static str> = Some("s3");

    async fn execute(&self, ctx: &StepContext) -> Result<Published, StepError> {
        if !(1..=PARTS_MAX).contains(&self.parts) {
            return Err(StepError::permanent(format!(
                "parts {} is outside 1..={PARTS_MAX}",
                self.parts
            )));
        }
        let client = S3Client::of(ctx)?;
        let object = self.head(&client).await?;
        if let Some(done) = self.adopt(ctx.key(), &object).await? {
            return Ok(done);
        }
        // Staged under the name and key only; the digest is known once the bytes are.
        let staging = self.destination(ctx.key(), object.size, &zero_digest())?;
        let file = Arc::new(staging.stage()?);
        file.set_len(object.size)
            .map_err(|e| StepError::retryable(format!("sizing the temporary file: {e}")))?;
        self.download(&client, &object, &file).await?;
        let file = Arc::try_unwrap(file).map_err(|_| StepError::retryable("file still shared"))?;
        let partial = staging.partial_path();
        let (sha256, md5) = digests(&partial).await?;
        let sha256 = match &object.reference {
            Reference::Sha256(want) if *want != sha256 => {
                let _ = std::fs::remove_file(&partial);
                let message = format!(
                    "s3://{}/{}: downloaded content has sha256 {sha256}, expected {want}",
                    self.bucket, self.key
                );
                // Against the caller's digest, the object is not the one expected: permanent.
                // Against the object's own checksum, the transfer went wrong: try again.
                return Err(if self.sha256.is_some() {
                    StepError::permanent(message)
                } else {
                    StepError::retryable(message)
                });
            }
            Reference::Md5(want) if *want != md5 => {
                let _ = std::fs::remove_file(&partial);
                return Err(StepError::retryable(format!(
                    "s3://{}/{}: downloaded content has MD5 {md5}, the ETag says {want}",
                    self.bucket, self.key
                )));
            }
            _ => sha256,
        };
        let destination = self.destination(ctx.key(), object.size, &sha256)?;
        blocking(move || destination.commit(file)).await
    }

    async fn compensate(
        &self,
        ctx: &StepContext,
        output: Option<Published>,
    ) -> Result<Compensation, StepError> {
        let sha256 = match output {
            Some(published) => published.sha256,
            // In doubt: what is under the final name is ours if it matches the object.
            None => {
                let final_path = self.dir.join(&self.name);
                match digests(&final_path).await {
                    Ok((sha256, md5)) => {
                        let object = self.head(&*S3Client::of(ctx)?).await?;
                        let ours = match &object.reference {
                            Reference::Sha256(want) => *want == sha256,
                            Reference::Md5(want) => *want == md5,
                        };
                        if ours {
                            sha256
                        } else {
                            zero_digest()
                        }
                    }
                    Err(_) => zero_digest(),
                }
            }
        };
        let size = std::fs::metadata(self.dir.join(&self.name)).map_or(0, |m| m.len());
        let destination = self.destination(ctx.key(), size, &sha256)?;
        blocking(move || destination.remove()).await?;
        Ok(Compensation::Done)
    }
}

impl DownloadToFile {
    fn destination(
        &self,
        key: IdempotencyKey,
        size: u64,
        sha256: &str,
    ) -> Result<Destination, StepError> {
        Destination::new(&self.dir, &self.name, key, size, sha256, self.marker)
    }

    fn failure<E>(
        &self,
        operation: &str,
        error: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StepError
    where
        E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        let mut failure = AwsFailure::new(operation, error);
        failure.message = format!("s3://{}/{}: {}", self.bucket, self.key, failure.message);
        if failure.is_any(&["NoSuchKey", "NoSuchBucket", "NotFound", "404"]) {
            failure = failure.as_permanent();
        }
        failure.into()
    }

    async fn head(&self, client: &S3Client) -> Result<Object, StepError> {
        let head = client
            .0
            .head_object()
            .bucket(&self.bucket)
            .key(&self.key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| self.failure("s3:HeadObject", &e))?;
        let size = u64::try_from(head.content_length().unwrap_or(0)).unwrap_or(0);
        let etag = head.e_tag().unwrap_or_default().to_string();
        let plain_etag = etag.trim_matches('"').to_ascii_lowercase();
        let object_sha = head
            .checksum_sha256()
            .filter(|c| !c.contains('-'))
            .and_then(crate::aws::x509::base64_decode)
            .filter(|b| b.len() == 32)
            .map(|b| hex(&b));
        let reference = if let Some(given) = &self.sha256 {
            Reference::Sha256(given.to_ascii_lowercase())
        } else if let Some(sha) = object_sha {
            Reference::Sha256(sha)
        } else if plain_etag.len() == 32 && plain_etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            Reference::Md5(plain_etag)
        } else {
            return Err(StepError::permanent(format!(
                "s3://{}/{}: the object has no SHA-256 checksum and a multipart ETag ({etag}): \
                 give sha256 to verify it against",
                self.bucket, self.key
            )));
        };
        Ok(Object {
            size,
            etag,
            reference,
        })
    }

    /// The finished download of an earlier attempt, if the final file matches the object.
    async fn adopt(
        &self,
        key: IdempotencyKey,
        object: &Object,
    ) -> Result<Option<Published>, StepError> {
        let final_path = self.dir.join(&self.name);
        if !final_path.exists() {
            return Ok(None);
        }
        let (sha256, md5) = digests(&final_path).await?;
        let matches = match &object.reference {
            Reference::Sha256(want) => *want == sha256,
            Reference::Md5(want) => *want == md5,
        };
        let size = std::fs::metadata(&final_path).map_or(u64::MAX, |m| m.len());
        if !matches || size != object.size {
            return Err(StepError::permanent(format!(
                "{} exists with other content than s3://{}/{}: not overwritten",
                final_path.display(),
                self.bucket,
                self.key
            )));
        }
        let destination = self.destination(key, object.size, &sha256)?;
        blocking(move || destination.adopt()).await
    }

    /// Every range, `parts` at a time, each written at its offset.
    async fn download(
        &self,
        client: &S3Client,
        object: &Object,
        file: &Arc<std::fs::File>,
    ) -> Result<(), StepError> {
        if object.size == 0 {
            return Ok(());
        }
        let parts = u64::from(self.parts)
            .min(object.size.div_ceil(PART_BYTES_MIN))
            .max(1);
        let part = object.size.div_ceil(parts);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..parts {
            let start = i * part;
            let end = ((i + 1) * part).min(object.size) - 1;
            let (client, file, this, etag) = (
                client.0.clone(),
                Arc::clone(file),
                self.clone(),
                object.etag.clone(),
            );
            tasks.spawn(async move {
                let answer = client
                    .get_object()
                    .bucket(&this.bucket)
                    .key(&this.key)
                    .range(format!("bytes={start}-{end}"))
                    .if_match(etag)
                    .send()
                    .await
                    .map_err(|e| this.failure("s3:GetObject", &e))?;
                let mut body = answer.body;
                let mut offset = start;
                while let Some(chunk) = body.try_next().await.map_err(|e| {
                    StepError::retryable(format!("reading s3://{}/{}: {e}", this.bucket, this.key))
                })? {
                    file.write_at(&chunk, offset).map_err(|e| {
                        StepError::retryable(format!("writing the temporary file: {e}"))
                    })?;
                    offset += chunk.len() as u64;
                }
                if offset != end + 1 {
                    return Err(StepError::retryable(format!(
                        "s3://{}/{}: range {start}-{end} ended at {offset}",
                        this.bucket, this.key
                    )));
                }
                Ok::<(), StepError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(|e| StepError::retryable(format!("download task ended: {e}")))??;
        }
        Ok(())
    }
}

/// SHA-256 and MD5 (lowercase hex) of the file at `path`, in one read, off the async
/// workers.
async fn digests(path: &Path) -> Result<(String, String), StepError> {
    let path = path.to_path_buf();
    blocking(move || {
        use std::io::Read;
        let failed =
            |e: std::io::Error| StepError::retryable(format!("reading {}: {e}", path.display()));
        let mut file = std::fs::File::open(&path).map_err(failed)?;
        let (mut sha256, mut md5) = (Sha256::new(), Md5::new());
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buffer).map_err(failed)?;
            if n == 0 {
                return Ok((hex(&sha256.finalize()), hex(&md5.finalize())));
            }
            sha256.update(&buffer[..n]);
            md5.update(&buffer[..n]);
        }
    })
    .await
}

/// A well-formed digest that matches no content: for staging and for "nothing of ours".
fn zero_digest() -> String {
    "0".repeat(64)
}

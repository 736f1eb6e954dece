//! The S3 driver: any S3-compatible object store through aws-sdk-s3.
//!
//! - Atomicity: a single PUT, or a multipart upload that only becomes visible
//!   when completed; an upload that fails is aborted.
//! - Create-if-absent: `If-None-Match: *` on the PUT / CompleteMultipartUpload,
//!   so two pushers of one segment cannot overwrite each other. A store that
//!   ignores the header would overwrite silently, so `conditional_writes`
//!   decides: "header" trusts it, "head" also sends a HEAD first (a race of
//!   one round trip remains), "auto" probes the store once and keeps the
//!   verdict in the repository (layout::CONDITIONAL_WRITES). The header is
//!   sent in every mode, so a wrong or forged verdict can only add HEADs.
//! - Compare-and-swap (`If-Match` on PUT and DELETE) for the lock lease.
//! - Integrity in transit: every PUT and part carries x-amz-checksum-sha256,
//!   which the server verifies before it stores anything.
//! - Retries: the SDK's standard strategy (exponential backoff with jitter on
//!   throttling, 5xx and timeouts) with per-attempt timeouts; a part is held
//!   in memory so it can be sent again.
//! - Memory: at most `UPLOADS_IN_FLIGHT` parts of `part_size` per upload.
//!
//! The trait is synchronous: the driver owns a small tokio runtime and
//! blocks on it from the calling thread.

use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier,
    StorageClass,
};
use aws_sdk_s3::Client;
use sha2::{Digest, Sha256};
use tokio::runtime::Runtime;

use super::{Durability, ObjectMeta, PutOutcome, Storage};
use crate::config::RepoConfig;
use crate::error::{Error, Result};

/// Parts uploading at once for one object (memory: this × part_size).
const UPLOADS_IN_FLIGHT: usize = 2;

pub struct S3Storage {
    rt: Arc<Runtime>,
    client: Client,
    bucket: String,
    /// "" or "some/prefix/" (always ending in '/').
    prefix: String,
    storage_class: Option<StorageClass>,
    part_size: usize,
    endpoint: String,
    cond: CondMode,
    /// Whether the store honours If-None-Match / If-Match, once known.
    honoured: std::sync::Mutex<Option<bool>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CondMode {
    Header,
    Head,
    Auto,
}

/// The verdict object is a few dozen bytes; anything bigger is not ours.
const VERDICT_MAX: usize = 4096;

#[derive(serde::Serialize, serde::Deserialize)]
struct Verdict {
    conditional_writes_honoured: bool,
    probed_at: String,
}

fn b64(bytes: &[u8]) -> String {
    aws_smithy_types::base64::encode(bytes)
}

/// The innermost cause of an error chain, e.g. "Connection refused (os error 111)".
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Turns an SDK error into a one-line io::Error that says what the store
/// answered and, where it is the user's to fix, what to do.
fn sdk_err<E>(e: SdkError<E, HttpResponse>) -> io::Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let (kind, text) = match &e {
        SdkError::TimeoutError(_) => (
            io::ErrorKind::TimedOut,
            "the object store did not answer in time".to_string(),
        ),
        SdkError::DispatchFailure(f) => (
            io::ErrorKind::ConnectionRefused,
            format!(
                "cannot reach the object store: {}",
                f.as_connector_error()
                    .map(|c| root_cause(c))
                    .unwrap_or_else(|| root_cause(&e))
            ),
        ),
        SdkError::ResponseError(_) => (
            io::ErrorKind::Other,
            format!(
                "unreadable answer from the object store: {}",
                root_cause(&e)
            ),
        ),
        SdkError::ServiceError(_) => {
            let status = http_status(&e).map_or(String::new(), |s| format!("HTTP {s}, "));
            let code = e.code().unwrap_or("no error code");
            let msg = e.message().unwrap_or("");
            let hint = match code {
                "SignatureDoesNotMatch" => {
                    " (the secret access key is wrong: check [repo] secret_access_key or AWS_SECRET_ACCESS_KEY)"
                }
                "InvalidAccessKeyId" => {
                    " (the access key id is unknown to the store: check [repo] access_key_id or AWS_ACCESS_KEY_ID)"
                }
                "AccessDenied" => " (these credentials may not use this bucket or prefix)",
                "NoSuchBucket" => " (create the bucket first, or fix [repo] bucket)",
                "BadDigest" | "XAmzContentSHA256Mismatch" | "InvalidDigest" => {
                    " (the data was altered in transit and the store refused it; nothing was stored)"
                }
                _ => "",
            };
            (io::ErrorKind::Other, format!("{status}{code}: {msg}{hint}"))
        }
        _ => (io::ErrorKind::Other, root_cause(&e)),
    };
    io::Error::new(kind, text)
}

fn http_status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

impl S3Storage {
    pub fn new(cfg: &RepoConfig) -> Result<S3Storage> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("walshipper-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::io("start the S3 client runtime", e))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if !cfg.region.is_empty() {
            loader = loader.region(Region::new(cfg.region.clone()));
        } else if !cfg.endpoint.is_empty() {
            // S3-compatible stores rarely care; do not probe EC2 metadata for it.
            loader = loader.region(Region::new("us-east-1"));
        }
        if !cfg.access_key_id.is_empty() || !cfg.secret_access_key.is_empty() {
            loader = loader.credentials_provider(Credentials::new(
                cfg.access_key_id.clone(),
                cfg.secret_access_key.clone(),
                None,
                None,
                "walshipper-config",
            ));
        }
        let shared = rt.block_on(loader.load());
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.force_path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(cfg.retries.max(1))
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(10)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(cfg.connect_timeout.max(1)))
                    .operation_attempt_timeout(Duration::from_secs(cfg.request_timeout.max(1)))
                    .build(),
            )
            // We send our own SHA-256 per request; no streaming trailers,
            // which some S3-compatible servers do not accept.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if shared.region().is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        if !cfg.endpoint.is_empty() {
            b = b.endpoint_url(cfg.endpoint.clone());
        }
        let client = Client::from_conf(b.build());
        let prefix = cfg.prefix.trim_matches('/');
        Ok(S3Storage {
            rt: Arc::new(rt),
            client,
            bucket: cfg.bucket.clone(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            storage_class: (!cfg.storage_class.is_empty())
                .then(|| StorageClass::from(cfg.storage_class.as_str())),
            part_size: (cfg.part_size_mib.max(5) as usize) << 20,
            endpoint: if cfg.endpoint.is_empty() {
                "aws".into()
            } else {
                cfg.endpoint.clone()
            },
            cond: match cfg.conditional_writes.as_str() {
                "header" => CondMode::Header,
                "head" => CondMode::Head,
                _ => CondMode::Auto,
            },
            honoured: std::sync::Mutex::new(None),
        })
    }

    fn full(&self, key: &str) -> Result<String> {
        if key.starts_with('/') || key.split('/').any(|c| c == "." || c == "..") {
            return Err(Error::Invalid(format!("invalid object key '{key}'")));
        }
        Ok(format!("{}{key}", self.prefix))
    }

    fn strip<'a>(&self, full: &'a str) -> Option<&'a str> {
        full.strip_prefix(self.prefix.as_str())
    }

    /// Reads up to `size` bytes of `body` into one buffer (a part).
    fn read_part(body: &mut dyn Read, size: usize, key: &str) -> Result<Vec<u8>> {
        let mut buf = Vec::with_capacity(size.min(1 << 20));
        body.take(size as u64)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Storage {
                op: "read body for",
                key: key.into(),
                source: e,
            })?;
        Ok(buf)
    }

    fn put_single(&self, full: &str, data: Vec<u8>, if_absent: bool) -> Result<PutOutcome> {
        let sum = b64(&Sha256::digest(&data));
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .checksum_sha256(sum)
            .set_storage_class(self.storage_class.clone())
            .body(ByteStream::from(data));
        if if_absent {
            req = req.if_none_match("*");
        }
        let sent = self.rt.block_on(req.send());
        self.outcome(sent, if_absent, "put", full)
    }

    /// The result of the request that makes an object visible (PUT or
    /// CompleteMultipartUpload).
    fn outcome<T, E>(
        &self,
        sent: std::result::Result<T, SdkError<E, HttpResponse>>,
        if_absent: bool,
        op: &'static str,
        full: &str,
    ) -> Result<PutOutcome>
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        match sent {
            Ok(_) => Ok(PutOutcome::Stored),
            // 412: it exists; 409: another conditional write of it is in progress.
            Err(e) if if_absent && matches!(http_status(&e), Some(412) | Some(409)) => {
                Ok(PutOutcome::AlreadyExists)
            }
            Err(e) => Err(self.err(op, full, sdk_err(e))),
        }
    }

    fn put_multipart(
        &self,
        full: &str,
        first: Vec<u8>,
        body: &mut dyn Read,
        if_absent: bool,
    ) -> Result<PutOutcome> {
        let created = self
            .rt
            .block_on(
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .checksum_algorithm(ChecksumAlgorithm::Sha256)
                    .set_storage_class(self.storage_class.clone())
                    .send(),
            )
            .map_err(|e| self.err("start multipart upload of", full, sdk_err(e)))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| {
                self.err(
                    "start multipart upload of",
                    full,
                    io::Error::other("no upload id"),
                )
            })?
            .to_string();
        let result = self.upload_parts(full, &upload_id, first, body, if_absent);
        if !matches!(result, Ok(PutOutcome::Stored)) {
            // Best effort: a lifecycle rule for incomplete uploads is the backstop.
            let _ = self.rt.block_on(
                self.client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(full)
                    .upload_id(&upload_id)
                    .send(),
            );
        }
        result
    }

    fn upload_parts(
        &self,
        full: &str,
        upload_id: &str,
        first: Vec<u8>,
        body: &mut dyn Read,
        if_absent: bool,
    ) -> Result<PutOutcome> {
        let mut in_flight = std::collections::VecDeque::new();
        let mut parts = Vec::new();
        let mut next = Some(first);
        let mut number = 1;
        while let Some(data) = next.take() {
            let sum = b64(&Sha256::digest(&data));
            let req = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .checksum_sha256(sum.clone())
                .body(ByteStream::from(data));
            in_flight.push_back((number, sum, self.rt.spawn(req.send())));
            number += 1;
            // Read the next part while earlier ones upload.
            let data = Self::read_part(body, self.part_size, full)?;
            if !data.is_empty() {
                next = Some(data);
            }
            while in_flight.len() >= UPLOADS_IN_FLIGHT || (next.is_none() && !in_flight.is_empty())
            {
                let Some((n, sum, task)) = in_flight.pop_front() else {
                    break;
                };
                let out = self
                    .rt
                    .block_on(task)
                    .map_err(|e| self.err("upload part of", full, io::Error::other(e)))?
                    .map_err(|e| self.err("upload part of", full, sdk_err(e)))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(n)
                        .set_e_tag(out.e_tag().map(str::to_string))
                        .checksum_sha256(sum)
                        .build(),
                );
            }
        }
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        if if_absent {
            req = req.if_none_match("*");
        }
        let sent = self.rt.block_on(req.send());
        self.outcome(sent, if_absent, "complete multipart upload of", full)
    }

    fn put(&self, key: &str, body: &mut dyn Read, if_absent: bool) -> Result<PutOutcome> {
        let full = self.full(key)?;
        // For a store that ignores If-None-Match: look first. Two writers
        // within one round trip of each other can still both write.
        if if_absent && !self.honours_conditions()? && self.head(key)?.is_some() {
            return Ok(PutOutcome::AlreadyExists);
        }
        let first = Self::read_part(body, self.part_size, &full)?;
        if first.len() < self.part_size {
            self.put_single(&full, first, if_absent)
        } else {
            self.put_multipart(&full, first, body, if_absent)
        }
    }

    /// Whether conditional headers can be relied on (see the module comment).
    fn honours_conditions(&self) -> Result<bool> {
        match self.cond {
            CondMode::Header => return Ok(true),
            CondMode::Head => return Ok(false),
            CondMode::Auto => {}
        }
        let mut known = self
            .honoured
            .lock()
            .map_err(|_| Error::Invalid("S3 driver state poisoned".into()))?;
        if let Some(v) = *known {
            return Ok(v);
        }
        let v = match self.load_verdict()? {
            Some(v) => v,
            None => self.probe()?,
        };
        *known = Some(v);
        Ok(v)
    }

    /// The verdict kept in the repository; None if absent or unreadable
    /// (then it is probed again).
    fn load_verdict(&self) -> Result<Option<bool>> {
        let Some((body, _)) = self.get_versioned(crate::layout::CONDITIONAL_WRITES, VERDICT_MAX)?
        else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<Verdict>(&body)
            .ok()
            .map(|v| v.conditional_writes_honoured))
    }

    /// Tests the store with a scratch object: a second If-None-Match: * PUT
    /// and an If-Match PUT with a wrong tag must both be refused (412).
    /// Keeps the verdict in the repository and warns if they were not.
    fn probe(&self) -> Result<bool> {
        let token = hex::encode(crate::keys::random::<8>()?);
        let key = crate::layout::write_probe(&token);
        let full = self.full(&key)?;
        let raw_put = |body: &'static [u8], none_match: bool, if_match: Option<&str>| {
            let mut req = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(&full)
                .checksum_sha256(b64(&Sha256::digest(body)))
                .body(ByteStream::from_static(body));
            if none_match {
                req = req.if_none_match("*");
            }
            if let Some(t) = if_match {
                req = req.if_match(t);
            }
            match self.rt.block_on(req.send()) {
                Ok(_) => Ok(true),
                Err(e) if matches!(http_status(&e), Some(412) | Some(409)) => Ok(false),
                Err(e) => Err(self.err("probe conditional writes with", &full, sdk_err(e))),
            }
        };
        let result = (|| {
            if !raw_put(b"probe 1", true, None)? {
                return Err(Error::Repository(format!(
                    "probing conditional writes: the fresh object {full} was reported as existing"
                )));
            }
            let second_refused = !raw_put(b"probe 2", true, None)?;
            let wrong_tag_refused = !raw_put(
                b"probe 3",
                false,
                Some("\"00000000000000000000000000000000\""),
            )?;
            Ok(second_refused && wrong_tag_refused)
        })();
        let _ = self.delete(&key);
        let honoured = result?;
        if !honoured {
            tracing::warn!(
                "the object store {} ignores conditional writes (If-None-Match / If-Match): \
                 walshipper falls back to a HEAD before each create-if-absent write, which two \
                 writers racing within one round trip can still defeat; use a store that \
                 supports conditional writes, or set conditional_writes = \"head\" to accept this \
                 (docs/operations.md)",
                self.endpoint
            );
        }
        let verdict = serde_json::to_vec(&Verdict {
            conditional_writes_honoured: honoured,
            probed_at: chrono::Utc::now().to_rfc3339(),
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        // A plain object: a forged verdict can only add HEADs (the header is
        // always sent), or say "honoured" of a store anyone may overwrite.
        self.put(crate::layout::CONDITIONAL_WRITES, &mut &verdict[..], false)?;
        Ok(honoured)
    }

    /// The current ETag of `key`, for emulating If-Match on stores without it.
    fn etag_of(&self, full: &str) -> Result<Option<String>> {
        match self.rt.block_on(
            self.client
                .head_object()
                .bucket(&self.bucket)
                .key(full)
                .send(),
        ) {
            Ok(out) => Ok(out.e_tag().map(str::to_string)),
            Err(e) if http_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.err("head", full, sdk_err(e))),
        }
    }

    fn err(&self, op: &'static str, key: &str, source: io::Error) -> Error {
        Error::Storage {
            op,
            key: format!("s3://{}/{key}", self.bucket),
            source,
        }
    }

    fn list_raw(&self, prefix: &str, delimiter: bool) -> Result<(Vec<ObjectMeta>, Vec<String>)> {
        let full = format!("{}{prefix}", self.prefix);
        let mut objects = Vec::new();
        let mut folders = Vec::new();
        let mut token = None;
        loop {
            let mut req = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_continuation_token(token.take());
            if delimiter {
                req = req.delimiter("/");
            }
            let out = self
                .rt
                .block_on(req.send())
                .map_err(|e| self.err("list", &full, sdk_err(e)))?;
            for o in out.contents() {
                let Some(key) = o.key().and_then(|k| self.strip(k)) else {
                    continue;
                };
                objects.push(ObjectMeta {
                    key: key.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified: o
                        .last_modified()
                        .and_then(|t| SystemTime::try_from(*t).ok()),
                });
            }
            for p in out.common_prefixes() {
                if let Some(k) = p.prefix().and_then(|k| self.strip(k)) {
                    folders.push(k.to_string());
                }
            }
            match out.next_continuation_token() {
                Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        Ok((objects, folders))
    }
}

/// A streaming GET body as a blocking reader.
struct BodyReader {
    rt: Arc<Runtime>,
    body: ByteStream,
    chunk: bytes::Bytes,
    key: String,
}

impl Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rt.block_on(self.body.next()) {
                Some(Ok(c)) => self.chunk = c,
                Some(Err(e)) => {
                    return Err(io::Error::other(format!(
                        "reading s3 object {}: {}",
                        self.key,
                        root_cause(&e)
                    )))
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

impl Storage for S3Storage {
    fn put_new(
        &self,
        key: &str,
        body: &mut dyn Read,
        _durability: Durability,
    ) -> Result<PutOutcome> {
        // A completed PUT is durable; nothing to flush later. The
        // create-if-absent guarantee is the server's (If-None-Match: *).
        self.put(key, body, true)
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn put_replace(&self, key: &str, body: &mut dyn Read) -> Result<()> {
        self.put(key, body, false).map(|_| ())
    }

    fn replace_checked(
        &self,
        key: &str,
        body: &mut dyn Read,
        spool: &std::path::Path,
        check: &mut dyn FnMut(&mut dyn Read, bool) -> Result<()>,
        pacing: super::Pacing,
    ) -> Result<()> {
        use std::io::{Seek, Write};
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let full = self.full(key)?;
        let local = |op: &'static str, e: io::Error| Error::Storage {
            op,
            key: format!(
                "{} (local copy of s3://{}/{full})",
                spool.display(),
                self.bucket
            ),
            source: e,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(spool)
            .map_err(|e| local("create", e))?;
        let path = spool.join(format!(
            ".{}.reseal",
            hex::encode(crate::keys::random::<8>()?)
        ));
        // Removed however this ends (a SIGKILL leaves it to the next run).
        struct Remove(std::path::PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| local("create", e))?;
        let _remove = Remove(path);
        let mut w = io::BufWriter::with_capacity(1 << 20, &mut f);
        io::copy(body, &mut w)
            .and_then(|_| w.flush())
            .map_err(|e| local("write", e))?;
        drop(w);
        f.rewind().map_err(|e| local("read", e))?;
        check(&mut io::BufReader::with_capacity(1 << 20, &mut f), false)?;
        const ATTEMPTS: u32 = 3;
        for attempt in 1..=ATTEMPTS {
            f.rewind().map_err(|e| local("read", e))?;
            self.put(
                key,
                &mut super::PacedRead {
                    inner: &mut io::BufReader::with_capacity(1 << 20, &mut f),
                    budget: pacing.up,
                },
                false,
            )?;
            let stored = match self.get(key)? {
                Some(mut r) => check(
                    &mut super::PacedRead {
                        inner: &mut r,
                        budget: pacing.down,
                    },
                    true,
                ),
                None => Err(self.err(
                    "read back",
                    &full,
                    io::Error::other("the object is missing right after it was stored"),
                )),
            };
            match stored {
                Ok(()) => return Ok(()),
                Err(e) if attempt < ATTEMPTS => tracing::warn!(
                    "s3://{}/{full} did not read back as written ({e}); storing it again from the verified local copy",
                    self.bucket
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Option<Box<dyn Read + Send>>> {
        let full = self.full(key)?;
        match self.rt.block_on(
            self.client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .send(),
        ) {
            Ok(out) => Ok(Some(Box::new(BodyReader {
                rt: self.rt.clone(),
                body: out.body,
                chunk: bytes::Bytes::new(),
                key: full,
            }))),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
            // A missing bucket is also a 404, but not "no such object".
            Err(e) if http_status(&e) == Some(404) && e.code() != Some("NoSuchBucket") => Ok(None),
            Err(e) => Err(self.err("get", &full, sdk_err(e))),
        }
    }

    fn head(&self, key: &str) -> Result<Option<ObjectMeta>> {
        let full = self.full(key)?;
        match self.rt.block_on(
            self.client
                .head_object()
                .bucket(&self.bucket)
                .key(&full)
                .send(),
        ) {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                modified: out
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok()),
            })),
            Err(e) if http_status(&e) == Some(404) => Ok(None),
            Err(e) => Err(self.err("head", &full, sdk_err(e))),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>> {
        let (mut objects, _) = self.list_raw(prefix, false)?;
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    fn list_children(&self, prefix: &str) -> Result<Vec<String>> {
        let (objects, folders) = self.list_raw(prefix, true)?;
        let mut names: Vec<String> = objects
            .into_iter()
            .filter_map(|o| o.key.strip_prefix(prefix).map(str::to_string))
            .chain(folders.into_iter().filter_map(|f| {
                f.strip_prefix(prefix)
                    .map(|n| n.trim_end_matches('/').to_string())
            }))
            .filter(|n| !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let full = self.full(key)?;
        self.rt
            .block_on(
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(&full)
                    .send(),
            )
            .map_err(|e| self.err("delete", &full, sdk_err(e)))?;
        Ok(())
    }

    fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let objects = self.list(prefix)?;
        let mut n = 0;
        for chunk in objects.chunks(1000) {
            let ids = chunk
                .iter()
                .map(|o| {
                    ObjectIdentifier::builder()
                        .key(format!("{}{}", self.prefix, o.key))
                        .build()
                        .map_err(|e| Error::Invalid(e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| Error::Invalid(e.to_string()))?;
            let out = self
                .rt
                .block_on(
                    self.client
                        .delete_objects()
                        .bucket(&self.bucket)
                        .delete(delete)
                        .send(),
                )
                .map_err(|e| self.err("delete under", prefix, sdk_err(e)))?;
            if let Some(e) = out.errors().first() {
                return Err(self.err(
                    "delete",
                    e.key().unwrap_or(prefix),
                    io::Error::other(e.message().unwrap_or("refused").to_string()),
                ));
            }
            n += chunk.len();
        }
        Ok(n)
    }

    fn describe(&self) -> String {
        format!("s3://{}/{} at {}", self.bucket, self.prefix, self.endpoint)
    }

    fn get_versioned(&self, key: &str, max: usize) -> Result<Option<(Vec<u8>, String)>> {
        let full = self.full(key)?;
        let out = match self.rt.block_on(
            self.client
                .get_object()
                .bucket(&self.bucket)
                .key(&full)
                .send(),
        ) {
            Ok(out) => out,
            Err(e) if http_status(&e) == Some(404) && e.code() != Some("NoSuchBucket") => {
                return Ok(None)
            }
            Err(e) => return Err(self.err("get", &full, sdk_err(e))),
        };
        let etag = out.e_tag().unwrap_or_default().to_string();
        let mut reader = BodyReader {
            rt: self.rt.clone(),
            body: out.body,
            chunk: bytes::Bytes::new(),
            key: full.clone(),
        };
        // Bounded: the object is untrusted.
        let mut body = Vec::new();
        (&mut reader)
            .take(max as u64 + 1)
            .read_to_end(&mut body)
            .map_err(|e| self.err("get", &full, e))?;
        if body.len() > max {
            return Err(Error::Repository(format!(
                "s3://{}/{full} is larger than {max} bytes; it was not written by walshipper",
                self.bucket
            )));
        }
        Ok(Some((body, etag)))
    }

    fn put_versioned(
        &self,
        key: &str,
        body: &[u8],
        expected: Option<&str>,
    ) -> Result<Option<String>> {
        let full = self.full(key)?;
        if !self.honours_conditions()? {
            // Emulated: look, then write. Racy by one round trip (documented).
            if self.etag_of(&full)?.as_deref() != expected {
                return Ok(None);
            }
        }
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .checksum_sha256(b64(&Sha256::digest(body)))
            .body(ByteStream::from(body.to_vec()));
        req = match expected {
            None => req.if_none_match("*"),
            Some(t) => req.if_match(t),
        };
        match self.rt.block_on(req.send()) {
            Ok(out) => match out.e_tag() {
                Some(t) => Ok(Some(t.to_string())),
                // No tag in the answer: ask for it.
                None => self.etag_of(&full),
            },
            // 412: the precondition failed; 409: a concurrent conditional
            // write; 404: If-Match on an object that is gone (AWS).
            Err(e) if matches!(http_status(&e), Some(412) | Some(409) | Some(404)) => Ok(None),
            Err(e) => Err(self.err("put", &full, sdk_err(e))),
        }
    }

    fn delete_versioned(&self, key: &str, expected: &str) -> Result<bool> {
        let full = self.full(key)?;
        let emulate = |this: &Self| -> Result<bool> {
            if this.etag_of(&full)?.as_deref() != Some(expected) {
                return Ok(false);
            }
            this.delete(key)?;
            Ok(true)
        };
        if !self.honours_conditions()? {
            return emulate(self);
        }
        match self.rt.block_on(
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&full)
                .if_match(expected)
                .send(),
        ) {
            Ok(_) => Ok(true),
            Err(e) if matches!(http_status(&e), Some(412) | Some(404)) => Ok(false),
            // Stores without conditional DELETE: look, then delete.
            Err(e) if http_status(&e) == Some(501) || e.code() == Some("NotImplemented") => {
                emulate(self)
            }
            Err(e) => Err(self.err("delete", &full, sdk_err(e))),
        }
    }

    fn conditional_writes(&self, probe: bool) -> Result<String> {
        let honoured = match self.cond {
            CondMode::Header => {
                return Ok("If-None-Match / If-Match trusted (conditional_writes = header)".into())
            }
            CondMode::Head => {
                return Ok(
                    "HEAD before each create-if-absent write (conditional_writes = head)".into(),
                )
            }
            CondMode::Auto if probe => {
                let v = self.probe()?;
                if let Ok(mut known) = self.honoured.lock() {
                    *known = Some(v);
                }
                v
            }
            CondMode::Auto => self.honours_conditions()?,
        };
        Ok(if honoured {
            "the store honours If-None-Match / If-Match (probed)".into()
        } else {
            "the store ignores If-None-Match / If-Match (probed): HEAD before each create-if-absent write".into()
        })
    }
}

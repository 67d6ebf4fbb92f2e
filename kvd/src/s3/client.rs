//! The bucket kvd talks to: the AWS SDK's S3 client behind typed errors, retries with jittered
//! backoff and the circuit breaker.
//!
//! Every request the S3 tier makes goes through [`Bucket::call`], so there is one place that
//! decides what is worth retrying (connection failures, timeouts, 5xx, throttling, truncated
//! bodies), what is not (denied, no such bucket, a malformed request), when S3 counts as down
//! (the breaker), and what is counted. The SDK's own retries are off so that policy is not
//! applied twice. Errors name the endpoint and bucket and never the credentials.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_s3::config::{
    retry::RetryConfig, timeout::TimeoutConfig, BehaviorVersion, Credentials, Region,
    RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;

use super::breaker::{Breaker, BreakerState};
use crate::config::S3Config;

/// Why an S3 request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum S3Error {
    /// The endpoint could not be reached, or a request timed out.
    #[error("S3 endpoint {endpoint} unreachable: {detail}")]
    Unreachable {
        /// Endpoint.
        endpoint: String,
        /// What happened (no credentials in it).
        detail: String,
    },
    /// The server failed the request (5xx, throttling) or sent a broken response.
    #[error("S3 {endpoint} bucket {bucket}: server error {status} {code}")]
    Server {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
        /// HTTP status (0: no status, a broken response).
        status: u16,
        /// S3 error code or a description.
        code: String,
    },
    /// The credentials were refused.
    #[error(
        "S3 {endpoint} bucket {bucket}: access denied ({code}); check s3.access_key_id and the \
         secret, or the AWS credential chain (AWS_ACCESS_KEY_ID, profile, IRSA)"
    )]
    Denied {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
        /// S3 error code.
        code: String,
    },
    /// The bucket does not exist.
    #[error("S3 {endpoint}: bucket {bucket} does not exist (create it, or fix s3.bucket)")]
    NoSuchBucket {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
    },
    /// The object does not exist (reclaimed by its writer, or never written).
    #[error("S3 object {0} not found")]
    NotFound(String),
    /// A body shorter or longer than asked for.
    #[error("S3 object {key}: body of {got} bytes, expected {want}")]
    Truncated {
        /// Object.
        key: String,
        /// Bytes expected.
        want: u64,
        /// Bytes received.
        got: u64,
    },
    /// Refused for another reason (a request this build should not have made, or a server
    /// that does not support it).
    #[error("S3 {endpoint} bucket {bucket}: request refused: {detail}")]
    Refused {
        /// Endpoint.
        endpoint: String,
        /// Bucket.
        bucket: String,
        /// Status and code, or the SDK's description.
        detail: String,
    },
    /// The circuit breaker is open: S3 was not asked.
    #[error("S3 tier degraded: circuit breaker open after repeated failures")]
    BreakerOpen,
}

impl S3Error {
    /// Worth trying again (the same request may succeed).
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            S3Error::Unreachable { .. } | S3Error::Server { .. } | S3Error::Truncated { .. }
        )
    }

    /// Says nothing about S3's health (the breaker is not moved by it).
    fn is_neutral(&self) -> bool {
        matches!(self, S3Error::NotFound(_) | S3Error::BreakerOpen)
    }
}

/// Counters of the requests made (the S3 tier reports them).
#[derive(Debug, Default)]
pub struct RequestCounters {
    /// Requests sent (each attempt).
    pub requests: AtomicU64,
    /// Attempts that failed and were retried.
    pub retries: AtomicU64,
    /// Calls that failed after their retries.
    pub failures: AtomicU64,
    /// Calls refused by the open breaker.
    pub short_circuited: AtomicU64,
}

/// One object in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Object key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
}

/// The bucket: client, retry policy, breaker.
#[derive(Debug)]
pub struct Bucket {
    client: aws_sdk_s3::Client,
    bucket: String,
    endpoint: String,
    retries: u32,
    base: Duration,
    max: Duration,
    breaker: Mutex<Breaker>,
    /// Request counters.
    pub counters: RequestCounters,
    last_error: Mutex<Option<(Instant, String)>>,
}

impl Bucket {
    /// A client for `cfg`'s bucket. Credentials: the static ones in `cfg` (secret read from
    /// `secret_access_key_file` if named) or the standard AWS chain. Makes no request.
    pub async fn new(cfg: &S3Config) -> Result<Bucket, String> {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(Duration::from_millis(u64::from(cfg.connect_timeout_ms)))
            .operation_attempt_timeout(Duration::from_millis(u64::from(cfg.request_timeout_ms)))
            .build();
        let region = Region::new(cfg.region.clone());
        let mut b = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .region(region.clone())
            .force_path_style(cfg.path_style)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts)
            // kvd checks every block with its own checksum; the SDK's default CRC trailers
            // (aws-chunked uploads) are not understood by every S3-compatible server.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            // Timeouts and the breaker bound slow transfers; a throttled server is not an error.
            .stalled_stream_protection(StalledStreamProtectionConfig::disabled());
        if !cfg.endpoint.is_empty() {
            b = b.endpoint_url(cfg.endpoint.clone());
        }
        if cfg.access_key_id.is_empty() {
            let chain =
                aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                    .region(region)
                    .build()
                    .await;
            b = b.credentials_provider(chain);
        } else {
            let secret = if cfg.secret_access_key_file.as_os_str().is_empty() {
                cfg.secret_access_key.expose().to_owned()
            } else {
                std::fs::read_to_string(&cfg.secret_access_key_file)
                    .map_err(|e| {
                        format!(
                            "cannot read s3.secret_access_key_file {}: {e}",
                            cfg.secret_access_key_file.display()
                        )
                    })?
                    .trim()
                    .to_owned()
            };
            b = b.credentials_provider(Credentials::new(
                cfg.access_key_id.clone(),
                secret,
                None,
                None,
                "kvd-config",
            ));
        }
        let endpoint = if cfg.endpoint.is_empty() {
            format!("aws:{}", cfg.region)
        } else {
            cfg.endpoint.clone()
        };
        Ok(Bucket {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: cfg.bucket.clone(),
            endpoint,
            retries: cfg.retries,
            base: Duration::from_millis(u64::from(cfg.retry_base_ms)),
            max: Duration::from_millis(u64::from(cfg.retry_max_ms)),
            breaker: Mutex::new(Breaker::new(
                cfg.breaker_failures,
                Duration::from_millis(u64::from(cfg.breaker_open_ms)),
            )),
            counters: RequestCounters::default(),
            last_error: Mutex::new(None),
        })
    }

    /// The endpoint, for messages.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The bucket name.
    pub fn name(&self) -> &str {
        &self.bucket
    }

    /// The breaker's state and how often it opened.
    pub fn breaker(&self) -> (BreakerState, u64) {
        let b = self.breaker.lock();
        (b.state(Instant::now()), b.opened)
    }

    /// Whether a request would be let through now (without taking the probe).
    pub fn available(&self) -> bool {
        self.breaker.lock().state(Instant::now()) != BreakerState::Open
    }

    /// The last failure and how long ago, if any.
    pub fn last_error(&self) -> Option<(Duration, String)> {
        self.last_error
            .lock()
            .as_ref()
            .map(|(t, e)| (t.elapsed(), e.clone()))
    }

    /// Runs `op` (one request) with the retry policy and the breaker.
    async fn call<T, F, Fut>(&self, mut op: F) -> Result<T, S3Error>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, S3Error>>,
    {
        let mut probe = self.admit()?;
        let mut attempt = 0u32;
        loop {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let r = op().await;
            if let Some(done) = self.settle(r, &mut attempt).await {
                probe.armed = false;
                return done;
            }
        }
    }

    /// Whether the breaker lets a request through.
    fn admit(&self) -> Result<Probe<'_>, S3Error> {
        match self.breaker.lock().allow(Instant::now()) {
            Some(probe) => Ok(Probe {
                bucket: self,
                armed: probe,
            }),
            None => {
                self.counters
                    .short_circuited
                    .fetch_add(1, Ordering::Relaxed);
                Err(S3Error::BreakerOpen)
            }
        }
    }

    /// Judges one attempt's outcome: `None` to try again (after the backoff, already slept),
    /// else the call's result (the breaker and counters told).
    async fn settle<T>(
        &self,
        r: Result<T, S3Error>,
        attempt: &mut u32,
    ) -> Option<Result<T, S3Error>> {
        match r {
            Ok(v) => {
                self.breaker.lock().success();
                Some(Ok(v))
            }
            Err(e) if e.is_neutral() => {
                self.breaker.lock().success();
                Some(Err(e))
            }
            Err(e) if e.is_retryable() && *attempt < self.retries => {
                self.counters.retries.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, attempt = *attempt, "S3 request failed; retrying");
                tokio::time::sleep(self.backoff(*attempt)).await;
                *attempt += 1;
                None
            }
            Err(e) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                self.breaker.lock().failure(Instant::now());
                *self.last_error.lock() = Some((Instant::now(), e.to_string()));
                Some(Err(e))
            }
        }
    }

    /// Full jitter: uniform in [0, min(max, base × 2^attempt)].
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        cap.mul_f64(rand::random::<f64>())
    }

    fn classify<E>(
        &self,
        e: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
        key: &str,
    ) -> S3Error
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let (endpoint, bucket) = (self.endpoint.clone(), self.bucket.clone());
        match &e {
            SdkError::TimeoutError(_) => S3Error::Unreachable {
                endpoint,
                detail: "timed out".into(),
            },
            SdkError::DispatchFailure(_) => S3Error::Unreachable {
                endpoint,
                detail: DisplayErrorContext(&e).to_string(),
            },
            SdkError::ResponseError(_) => S3Error::Server {
                endpoint,
                bucket,
                status: 0,
                code: "broken response".into(),
            },
            SdkError::ServiceError(se) => {
                let status = se.raw().status().as_u16();
                let code = se.err().code().unwrap_or_default().to_owned();
                match (status, code.as_str()) {
                    (_, "NoSuchBucket") => S3Error::NoSuchBucket { endpoint, bucket },
                    (404, _) | (_, "NoSuchKey") => S3Error::NotFound(key.to_owned()),
                    (401 | 403, _) => S3Error::Denied {
                        endpoint,
                        bucket,
                        code: if code.is_empty() {
                            status.to_string()
                        } else {
                            code
                        },
                    },
                    (429 | 500..=599, _) | (_, "SlowDown" | "RequestTimeout" | "InternalError") => {
                        S3Error::Server {
                            endpoint,
                            bucket,
                            status,
                            code,
                        }
                    }
                    _ => S3Error::Refused {
                        endpoint,
                        bucket,
                        detail: format!("{status} {code}"),
                    },
                }
            }
            _ => S3Error::Refused {
                endpoint,
                bucket,
                detail: DisplayErrorContext(&e).to_string(),
            },
        }
    }

    /// Checks that the bucket exists and the credentials are accepted.
    pub async fn check(&self) -> Result<(), S3Error> {
        self.call(|| async {
            self.client
                .head_bucket()
                .bucket(&self.bucket)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| match self.classify(e, "") {
                    // HEAD has no body, so no error code: a 404 is the bucket.
                    S3Error::NotFound(_) => S3Error::NoSuchBucket {
                        endpoint: self.endpoint.clone(),
                        bucket: self.bucket.clone(),
                    },
                    other => other,
                })
        })
        .await
    }

    /// Uploads one object in a single PUT.
    pub async fn put(&self, key: &str, body: &Bytes) -> Result<(), S3Error> {
        self.call(|| async {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_length(body.len() as i64)
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| self.classify(e, key))
        })
        .await
    }

    /// Uploads one object in parts of `part` bytes, up to `concurrency` at once; the upload
    /// is aborted (best effort) when a part fails for good.
    pub async fn put_multipart(
        &self,
        key: &str,
        body: &Bytes,
        part: usize,
        concurrency: usize,
    ) -> Result<(), S3Error> {
        let id = self
            .call(|| async {
                self.client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| self.classify(e, key))?
                    .upload_id()
                    .map(str::to_owned)
                    .ok_or_else(|| S3Error::Server {
                        endpoint: self.endpoint.clone(),
                        bucket: self.bucket.clone(),
                        status: 0,
                        code: "multipart upload without an id".into(),
                    })
            })
            .await?;
        let ranges: Vec<(i32, Bytes)> = (0..body.len())
            .step_by(part.max(1))
            .enumerate()
            .map(|(i, at)| (i as i32 + 1, body.slice(at..(at + part).min(body.len()))))
            .collect();
        let parts = futures_util::stream::iter(ranges.into_iter().map(|(n, bytes)| {
            let id = id.clone();
            async move {
                self.call(|| async {
                    self.client
                        .upload_part()
                        .bucket(&self.bucket)
                        .key(key)
                        .upload_id(&id)
                        .part_number(n)
                        .content_length(bytes.len() as i64)
                        .body(ByteStream::from(bytes.clone()))
                        .send()
                        .await
                        .map_err(|e| self.classify(e, key))
                        .map(|out| {
                            CompletedPart::builder()
                                .part_number(n)
                                .set_e_tag(out.e_tag().map(str::to_owned))
                                .build()
                        })
                })
                .await
            }
        }))
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
        let done: Result<Vec<CompletedPart>, S3Error> = parts.into_iter().collect();
        let completed = match done {
            Ok(p) => p,
            Err(e) => {
                self.abort(key, &id).await;
                return Err(e);
            }
        };
        let r = self
            .call(|| async {
                self.client
                    .complete_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&id)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(completed.clone()))
                            .build(),
                    )
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.classify(e, key))
            })
            .await;
        if r.is_err() {
            self.abort(key, &id).await;
        }
        r
    }

    async fn abort(&self, key: &str, id: &str) {
        let r = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(id)
            .send()
            .await;
        if let Err(e) = r {
            tracing::debug!(error = %DisplayErrorContext(&e), key, "S3 abort of a multipart upload failed");
        }
    }

    /// Reads `dst.len()` bytes of `key` from `offset` into `dst` (one ranged GET; the body
    /// must be exactly that long).
    pub async fn get_into(&self, key: &str, offset: u64, dst: &mut [u8]) -> Result<(), S3Error> {
        let want = dst.len() as u64;
        if want == 0 {
            return Ok(());
        }
        let range = format!("bytes={}-{}", offset, offset + want - 1);
        // Each attempt writes the whole of `dst` again from its start.
        let mut probe = self.admit()?;
        let mut attempt = 0u32;
        loop {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            let r = match self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(key)
                .range(range.clone())
                .send()
                .await
            {
                Ok(resp) => read_body(resp.body, dst, key).await,
                Err(e) => Err(self.classify(e, key)),
            };
            if let Some(done) = self.settle(r, &mut attempt).await {
                probe.armed = false;
                return done;
            }
        }
    }

    /// Reads bytes `[offset, offset + len)` of `key` (a segment's trailer and index).
    pub async fn get_range(&self, key: &str, offset: u64, len: u64) -> Result<Vec<u8>, S3Error> {
        let n = usize::try_from(len).map_err(|_| S3Error::Truncated {
            key: key.to_owned(),
            want: len,
            got: 0,
        })?;
        let mut v = vec![0u8; n];
        self.get_into(key, offset, &mut v).await?;
        Ok(v)
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>, S3Error> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call(|| async {
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| self.classify(e, prefix))
                })
                .await?;
            for o in page.contents() {
                if let (Some(k), Some(size)) = (o.key(), o.size()) {
                    out.push(Listed {
                        key: k.to_owned(),
                        size: u64::try_from(size).unwrap_or(0),
                    });
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    /// Deletes one object (absent already is success).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        match self
            .call(|| async {
                self.client
                    .delete_object()
                    .bucket(&self.bucket)
                    .key(key)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.classify(e, key))
            })
            .await
        {
            Err(S3Error::NotFound(_)) => Ok(()),
            r => r,
        }
    }
}

/// The breaker's half-open probe held by a call: if the call is dropped before its outcome
/// is known (a lookup's timeout cancels its reads), the probe is handed back, or the breaker
/// would wait for it forever.
struct Probe<'a> {
    bucket: &'a Bucket,
    armed: bool,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.bucket.breaker.lock().abandon();
        }
    }
}

/// Copies a response body into `dst`; exactly `dst.len()` bytes must arrive.
async fn read_body(mut body: ByteStream, dst: &mut [u8], key: &str) -> Result<(), S3Error> {
    let want = dst.len() as u64;
    let mut at = 0usize;
    loop {
        match body.next().await {
            None => break,
            Some(Ok(chunk)) => {
                let end = at + chunk.len();
                if end > dst.len() {
                    return Err(S3Error::Truncated {
                        key: key.to_owned(),
                        want,
                        got: end as u64,
                    });
                }
                dst[at..end].copy_from_slice(&chunk);
                at = end;
            }
            Some(Err(_)) => {
                return Err(S3Error::Truncated {
                    key: key.to_owned(),
                    want,
                    got: at as u64,
                })
            }
        }
    }
    if at as u64 != want {
        return Err(S3Error::Truncated {
            key: key.to_owned(),
            want,
            got: at as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_probe_does_not_leave_the_breaker_stuck() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Accepts connections (the kernel's backlog) and never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = S3Config {
            bucket: "b".into(),
            endpoint: format!("http://{}", silent.local_addr().unwrap()),
            access_key_id: "id".into(),
            secret_access_key: crate::config::Secret::new("secret"),
            retries: 0,
            request_timeout_ms: 100,
            breaker_failures: 1,
            breaker_open_ms: 100,
            ..S3Config::default()
        };
        rt.block_on(async {
            let b = Bucket::new(&cfg).await.unwrap();
            let e = b.get_range("k", 0, 10).await.unwrap_err();
            assert!(matches!(e, S3Error::Unreachable { .. }), "{e}");
            assert!(matches!(
                b.get_range("k", 0, 10).await,
                Err(S3Error::BreakerOpen)
            ));
            tokio::time::sleep(Duration::from_millis(120)).await;
            // The probe, cancelled before its answer.
            let cancelled =
                tokio::time::timeout(Duration::from_millis(20), b.get_range("k", 0, 10)).await;
            assert!(cancelled.is_err());
            // Another call may probe: it goes to the endpoint (and times out there).
            let e = b.get_range("k", 0, 10).await.unwrap_err();
            assert!(matches!(e, S3Error::Unreachable { .. }), "{e}");
        });
    }

    #[test]
    fn retry_classes() {
        let e = |s: S3Error| (s.is_retryable(), s.is_neutral());
        let (ep, b) = (String::from("http://x"), String::from("b"));
        assert_eq!(
            e(S3Error::Unreachable {
                endpoint: ep.clone(),
                detail: String::new()
            }),
            (true, false)
        );
        assert_eq!(
            e(S3Error::Denied {
                endpoint: ep.clone(),
                bucket: b.clone(),
                code: String::new()
            }),
            (false, false)
        );
        assert_eq!(e(S3Error::NotFound(String::new())), (false, true));
        let msg = S3Error::NoSuchBucket {
            endpoint: ep,
            bucket: b,
        }
        .to_string();
        assert!(
            msg.contains("http://x") && msg.contains("bucket b"),
            "{msg}"
        );
    }
}

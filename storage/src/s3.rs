//! The few S3 requests object_store does not make for us, signed with its own SigV4
//! signer and credentials: HEAD with `x-amz-checksum-mode: ENABLED` (the object's
//! `ChecksumSHA256`, so a stored object can be confirmed without downloading it),
//! CreateMultipartUpload returning its upload id (so it can be kept and resumed),
//! ListParts (what an interrupted upload really stored) and a create-only
//! CompleteMultipartUpload (`If-None-Match: *`, which object_store sends only for its
//! own copies).

use std::sync::Arc;

use object_store::aws::{AwsAuthorizer, AwsCredentialProvider};
use object_store::client::HttpRequestBody;
use object_store::path::Path as ObjectPath;

/// Characters kept as they are in a key on the wire (as object_store encodes keys).
pub(crate) const KEY_ENCODE: percent_encoding::AsciiSet = percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// A failed native request.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// Credentials could not be obtained.
    #[error("S3 credentials: {}", described(.0))]
    Credentials(#[from] object_store::Error),
    /// The request could not be built.
    #[error("S3 request: {0}")]
    Request(String),
    /// Connecting or reading the response failed.
    #[error("S3 {}: {}", .0, described(.1))]
    Http(&'static str, reqwest::Error),
    /// The store answered with an error status.
    #[error("S3 {0} answered {1}: {2}")]
    Status(&'static str, u16, String),
    /// The response was not what S3 sends.
    #[error("S3 {0}: unexpected response: {1}")]
    Response(&'static str, String),
    /// A create-only request found an object at the key (412).
    #[error("S3 {0}: an object already exists at the key")]
    Taken(&'static str),
}

/// What a HEAD says about a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreHead {
    /// Bytes.
    pub size: u64,
    /// ETag as sent (quotes included).
    pub etag: Option<String>,
    /// Version id on a versioned bucket.
    pub version: Option<String>,
    /// `ChecksumSHA256`: `<base64>` (single request) or `<base64>-<parts>` (multipart),
    /// computed by the store from the bytes it received; None where it keeps none.
    pub checksum_sha256: Option<String>,
}

/// One part of a multipart upload as the store lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedPart {
    /// 1-based part number.
    pub number: u64,
    /// ETag as sent.
    pub etag: String,
    /// Bytes.
    pub size: u64,
    /// The part's `ChecksumSHA256` where the store lists it.
    pub checksum_sha256: Option<String>,
}

/// Signs and sends the requests above to one bucket.
#[derive(Debug)]
pub struct S3Native {
    client: reqwest::Client,
    bucket_endpoint: String,
    region: String,
    credentials: AwsCredentialProvider,
    /// Whether requests ask for and send SHA-256 checksums (the store options' `checksums`).
    checksums: bool,
    /// Further tries of a request the store answered 5xx or 429 (`max_retries`).
    retries: u32,
}

impl S3Native {
    /// A client for `bucket` as object_store's builder addresses it, with the store
    /// options' addressing, request timeout (at least a second), tries and checksums.
    pub fn new(
        endpoint: Option<&str>,
        bucket: &str,
        region: &str,
        credentials: AwsCredentialProvider,
        opts: &crate::store::StoreOptions,
    ) -> Result<Self, S3Error> {
        let virtual_hosted = opts.virtual_hosted_style;
        let timeout = std::time::Duration::from_millis(opts.retry_timeout_ms.max(1000));
        // The same addressing object_store's builder derives (path-style or virtual-hosted).
        let bucket_endpoint = match (endpoint, virtual_hosted) {
            (Some(e), true) => e.to_string(),
            (Some(e), false) => format!("{}/{bucket}", e.trim_end_matches('/')),
            (None, true) => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            (None, false) => format!("https://s3.{region}.amazonaws.com/{bucket}"),
        };
        // As object_store's own client: a redirect is an error (one to another host would
        // carry the session token along), and plain HTTP only where allowed.
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!bucket_endpoint.starts_with("http://"))
            .build()
            .map_err(|e| S3Error::Request(e.to_string()))?;
        Ok(Self {
            client,
            bucket_endpoint,
            region: region.to_string(),
            credentials,
            checksums: opts.checksums,
            retries: u32::try_from(opts.max_retries).unwrap_or(u32::MAX),
        })
    }

    /// Whether uploads are created with, and parts carry, SHA-256 checksums.
    pub fn checksums(&self) -> bool {
        self.checksums
    }

    /// A part id object_store completes an upload with, for a part stored earlier (with
    /// its SHA-256 where uploads carry checksums).
    pub fn part_id(&self, etag: &str, checksum_sha256: &str) -> object_store::multipart::PartId {
        part_id(etag, self.checksums.then_some(checksum_sha256))
    }

    fn url(&self, key: &ObjectPath, query: &str) -> String {
        let k = percent_encoding::utf8_percent_encode(key.as_ref(), &KEY_ENCODE);
        if query.is_empty() {
            format!("{}/{k}", self.bucket_endpoint)
        } else {
            format!("{}/{k}?{query}", self.bucket_endpoint)
        }
    }

    /// [`S3Native::send`], tried again after a pause while the store answers 5xx or 429
    /// (SlowDown, asking for a pause: its `Retry-After` is kept to, up to a limit) and, for
    /// a request that changes nothing (`safe`), while the connection fails: a throttling
    /// store failed the message at once, and its retry read the whole object back from it.
    async fn send_retrying(
        &self,
        what: &'static str,
        method: http::Method,
        url: &str,
        headers: &[(String, String)],
        safe: bool,
    ) -> Result<reqwest::Response, S3Error> {
        let mut attempt = 0;
        loop {
            let r = self
                .send(
                    what,
                    method.clone(),
                    url,
                    headers,
                    bytes::Bytes::new(),
                    None,
                )
                .await;
            let again = match &r {
                Ok(resp)
                    if resp.status().is_server_error()
                        || resp.status() == reqwest::StatusCode::TOO_MANY_REQUESTS =>
                {
                    Some(retry_after(resp))
                }
                Err(S3Error::Http(..)) if safe => Some(None),
                _ => None,
            };
            match again {
                Some(asked) if attempt < self.retries => {
                    attempt += 1;
                    tokio::time::sleep(pause(attempt, asked)).await;
                }
                _ => return r,
            }
        }
    }

    /// Signs and sends one request; `timeout` replaces the client's own.
    async fn send(
        &self,
        what: &'static str,
        method: http::Method,
        url: &str,
        headers: &[(String, String)],
        body: bytes::Bytes,
        timeout: Option<std::time::Duration>,
    ) -> Result<reqwest::Response, S3Error> {
        let mut b = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let mut req = b
            .body(HttpRequestBody::from(body.clone()))
            .map_err(|e| S3Error::Request(e.to_string()))?;
        // Signs the body's SHA-256 (computed by the signer from the bytes).
        let cred = self.credentials.get_credential().await?;
        AwsAuthorizer::new(&cred, "s3", &self.region).authorize(&mut req, None);
        let mut req = reqwest::Request::try_from(req.map(|_| reqwest::Body::from(body)))
            .map_err(|e| S3Error::Request(e.to_string()))?;
        if timeout.is_some() {
            *req.timeout_mut() = timeout;
        }
        self.client
            .execute(req)
            .await
            .map_err(|e| S3Error::Http(what, e))
    }

    /// Whether the bucket is there (HeadBucket): a HEAD of a key answers 404 alike for a
    /// key and a bucket that are not there, and has no body to tell them apart.
    pub async fn bucket_exists(&self) -> Result<bool, S3Error> {
        const WHAT: &str = "HeadBucket";
        let r = self
            .send_retrying(WHAT, http::Method::HEAD, &self.bucket_endpoint, &[], true)
            .await?;
        match r.status() {
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            s if s.is_success() => Ok(true),
            s => Err(S3Error::Status(WHAT, s.as_u16(), String::new())),
        }
    }

    /// HEAD of `key` with its checksum; None if there is no such object.
    pub async fn head(&self, key: &ObjectPath) -> Result<Option<StoreHead>, S3Error> {
        const WHAT: &str = "HeadObject";
        let checksum = [("x-amz-checksum-mode".into(), "ENABLED".into())];
        let r = self
            .send_retrying(
                WHAT,
                http::Method::HEAD,
                &self.url(key, ""),
                if self.checksums { &checksum } else { &[] },
                true,
            )
            .await?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status().is_success() {
            // A HEAD's answer has no body to say why: what its status most likely means.
            let status = r.status().as_u16();
            let hint = match status {
                301 => format!(
                    "the bucket is in another region{}: set the store's `region`",
                    r.headers()
                        .get("x-amz-bucket-region")
                        .and_then(|v| v.to_str().ok())
                        .map(|v| format!(" ({})", framework::telemetry::LogText(v)))
                        .unwrap_or_default()
                ),
                400 if self.checksums => "a store that refuses `x-amz-checksum-mode` (as \
                    Backblaze B2 does)? set the store's `checksums = false`"
                    .to_string(),
                403 => "access denied, or the request's signature refused (the credentials, \
                    the clock)"
                    .to_string(),
                _ => String::new(),
            };
            return Err(S3Error::Status(WHAT, status, hint));
        }
        let h = r.headers();
        let text = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let size = text("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| S3Error::Response(WHAT, "no Content-Length".into()))?;
        Ok(Some(StoreHead {
            size,
            etag: text("etag"),
            version: text("x-amz-version-id"),
            checksum_sha256: text("x-amz-checksum-sha256"),
        }))
    }

    /// Starts a multipart upload with SHA-256 checksums and the given user metadata;
    /// returns its upload id.
    pub async fn create_multipart(
        &self,
        key: &ObjectPath,
        metadata: &[(String, String)],
    ) -> Result<String, S3Error> {
        const WHAT: &str = "CreateMultipartUpload";
        let mut headers = Vec::new();
        if self.checksums {
            headers.push(("x-amz-checksum-algorithm".to_string(), "SHA256".to_string()));
        }
        for (k, v) in metadata {
            headers.push((format!("x-amz-meta-{k}"), v.clone()));
        }
        // Not tried again on a failed connection: the first may have created an upload.
        let r = self
            .send_retrying(
                WHAT,
                http::Method::POST,
                &self.url(key, "uploads="),
                &headers,
                false,
            )
            .await?;
        let status = r.status();
        let body = body_text(WHAT, r).await?;
        if !status.is_success() {
            return Err(S3Error::Status(WHAT, status.as_u16(), snippet(&body)));
        }
        element(&body, "UploadId")
            .map(unescape)
            .ok_or_else(|| S3Error::Response(WHAT, snippet(&body)))
    }

    /// Completes an upload from its parts (object_store's part ids, in order) only if
    /// no object is at the key: [`S3Error::Taken`] otherwise, the upload left as it was.
    pub async fn complete_multipart_create(
        &self,
        key: &ObjectPath,
        upload_id: &str,
        parts: &[object_store::multipart::PartId],
    ) -> Result<(), S3Error> {
        const WHAT: &str = "CompleteMultipartUpload";
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, p) in parts.iter().enumerate() {
            let field = |n| element(&p.content_id, n);
            let etag = field("e_tag").unwrap_or(&p.content_id);
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag>",
                i + 1
            ));
            if let Some(sum) = field("checksum_sha256") {
                xml.push_str(&format!("<ChecksumSHA256>{sum}</ChecksumSHA256>"));
            }
            xml.push_str("</Part>");
        }
        xml.push_str("</CompleteMultipartUpload>");
        let id: String = url::form_urlencoded::byte_serialize(upload_id.as_bytes()).collect();
        let url = self.url(key, &format!("uploadId={id}"));
        let headers = [("if-none-match".to_string(), "*".to_string())];
        let body = bytes::Bytes::from(xml);
        // As many as another request gets (`max_retries`), paced as the store asks: a store
        // throttling (503 SlowDown, 429) was given three tries in a second, and the copy
        // then retried whole — the source read and hashed again to come back here.
        let attempts = COMPLETE_ATTEMPTS.max(self.retries.saturating_add(1));
        let mut asked = None;
        let mut attempt = 0;
        loop {
            if attempt > 0 {
                tokio::time::sleep(pause(attempt, asked.take())).await;
            }
            attempt += 1;
            let last = attempt >= attempts;
            let r = match self
                .send(
                    WHAT,
                    http::Method::POST,
                    &url,
                    &headers,
                    body.clone(),
                    Some(COMPLETE_TIMEOUT),
                )
                .await
            {
                Ok(r) => r,
                Err(S3Error::Http(..)) if !last => continue,
                Err(e) => return Err(e),
            };
            let status = r.status();
            asked = retry_after(&r);
            let text = match body_text(WHAT, r).await {
                Ok(t) => t,
                Err(S3Error::Http(..)) if !last => continue,
                Err(e) => return Err(e),
            };
            if status == reqwest::StatusCode::PRECONDITION_FAILED {
                return Err(S3Error::Taken(WHAT));
            }
            // An earlier attempt completed it and its answer was lost: the upload is gone
            // and the key holds the object, which the caller looks at like a taken key.
            if status == reqwest::StatusCode::NOT_FOUND && attempt > 1 && !no_such_bucket(&text) {
                return Err(S3Error::Taken(WHAT));
            }
            // S3 can answer 200 with an error in the body once the completion has started
            // (then, like a 5xx, it may be tried again).
            let failed = !status.is_success() || text.contains("<Error>");
            if !failed {
                return Ok(());
            }
            let again = status.is_server_error()
                || status.is_success()
                || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
            if last || !again {
                return Err(S3Error::Status(WHAT, status.as_u16(), snippet(&text)));
            }
        }
    }

    /// The parts stored for an upload, in order; None if the store no longer has the
    /// upload (completed, aborted, expired by a lifecycle rule, or a store that lost it).
    pub async fn list_parts(
        &self,
        key: &ObjectPath,
        upload_id: &str,
    ) -> Result<Option<Vec<ListedPart>>, S3Error> {
        const WHAT: &str = "ListParts";
        let mut parts = Vec::new();
        let mut marker = 0u64;
        loop {
            let id: String = url::form_urlencoded::byte_serialize(upload_id.as_bytes()).collect();
            let query = if marker == 0 {
                format!("uploadId={id}")
            } else {
                format!("part-number-marker={marker}&uploadId={id}")
            };
            let r = self
                .send_retrying(WHAT, http::Method::GET, &self.url(key, &query), &[], true)
                .await?;
            let status = r.status();
            let body = body_text(WHAT, r).await?;
            // A bucket not there (a store restarting before its buckets) is no upload
            // gone: its record and parts kept, retried as an outage.
            if status == reqwest::StatusCode::NOT_FOUND && !no_such_bucket(&body) {
                return Ok(None);
            }
            if !status.is_success() {
                return Err(S3Error::Status(WHAT, status.as_u16(), snippet(&body)));
            }
            for p in elements(&body, "Part") {
                let field = |n| element(p, n).map(unescape);
                let number = field("PartNumber").and_then(|v| v.parse().ok());
                let size = field("Size").and_then(|v| v.parse().ok());
                let (Some(number), Some(size), Some(etag)) = (number, size, field("ETag")) else {
                    return Err(S3Error::Response(WHAT, snippet(p)));
                };
                parts.push(ListedPart {
                    number,
                    etag,
                    size,
                    checksum_sha256: field("ChecksumSHA256"),
                });
            }
            // An upload holds at most 10,000 parts, numbered up to 10,000: a store listing
            // more, or pages without end, is not one to resume on (the caller starts over).
            if parts.len() as u64 > crate::copy::MAX_PARTS {
                return Err(S3Error::Response(
                    WHAT,
                    format!("more than {} parts listed", crate::copy::MAX_PARTS),
                ));
            }
            let truncated = element(&body, "IsTruncated").is_some_and(|v| v.trim() == "true");
            let next = element(&body, "NextPartNumberMarker").and_then(|v| v.trim().parse().ok());
            match next {
                Some(n) if truncated && n > marker && n < crate::copy::MAX_PARTS => marker = n,
                _ => break,
            }
        }
        parts.sort_by_key(|p| p.number);
        Ok(Some(parts))
    }
}

/// The most of an S3 answer read: a ListParts page of 1,000 parts with checksums is about
/// 400 KB; a larger one is no S3 answer (a proxy's or portal's page), not held whole.
const MAX_ANSWER: usize = 4 << 20;

/// Whether an S3 error document says the bucket is not there (`NoSuchBucket`): a 404 that
/// is the store's trouble, not the upload's or the object's absence.
pub(crate) fn no_such_bucket(body: &str) -> bool {
    body.contains("<Code>NoSuchBucket</Code>")
}

/// An answer's body as text, at most [`MAX_ANSWER`] bytes of it: [`S3Error::Response`]
/// beyond that, [`S3Error::Http`] if reading it fails.
async fn body_text(what: &'static str, mut r: reqwest::Response) -> Result<String, S3Error> {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = r.chunk().await.map_err(|e| S3Error::Http(what, e))? {
        if buf.len() + chunk.len() > MAX_ANSWER {
            return Err(S3Error::Response(
                what,
                format!("an answer over {} MiB", MAX_ANSWER >> 20),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The pause before try `attempt + 1`: what the store asked for (`Retry-After`), or 200 ms
/// doubling; at most 20 s.
/// The wait an answer asks for (`Retry-After` in seconds), if any.
fn retry_after(resp: &reqwest::Response) -> Option<std::time::Duration> {
    resp.headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(std::time::Duration::from_secs)
}

fn pause(attempt: u32, asked: Option<std::time::Duration>) -> std::time::Duration {
    let doubling = std::time::Duration::from_millis(200).saturating_mul(1 << attempt.min(10));
    asked
        .unwrap_or(doubling)
        .min(std::time::Duration::from_secs(20))
}

/// Tries of a create-only completion (a 5xx, an error in a 200's body or a lost answer
/// is tried again, as object_store tries its own completions).
const COMPLETE_ATTEMPTS: u32 = 3;

/// How long a completion may take to answer: S3 can take minutes over a large upload.
const COMPLETE_TIMEOUT: std::time::Duration = crate::request_time::COMPLETION;

/// Shared handle.
pub type SharedS3 = Arc<S3Native>;

/// The text of the first `<name>…</name>` in `xml` (S3's responses are flat enough).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    elements(xml, name).next()
}

/// The texts of every `<name>…</name>` in `xml`.
fn elements<'a>(xml: &'a str, name: &str) -> impl Iterator<Item = &'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut rest = xml;
    std::iter::from_fn(move || {
        let start = rest.find(&open)? + open.len();
        let len = rest[start..].find(&close)?;
        let found = &rest[start..start + len];
        rest = &rest[start + len + close.len()..];
        Some(found)
    })
}

/// XML text with its five predefined entities resolved.
/// XML text with its entities decoded: the five named ones and numeric references, which
/// MinIO's writer (Go's `encoding/xml`) uses for the quotes of every ETag (`&#34;abc&#34;`,
/// taken as written, a resumed upload's completion named parts the store did not know).
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let decoded = tail.find(';').and_then(|end| {
            let c = match &tail[1..end] {
                "quot" => Some('"'),
                "apos" => Some('\''),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "amp" => Some('&'),
                n => n
                    .strip_prefix("#x")
                    .or_else(|| n.strip_prefix("#X"))
                    .map(|h| u32::from_str_radix(h, 16))
                    .or_else(|| n.strip_prefix('#').map(str::parse::<u32>))
                    .and_then(Result::ok)
                    .and_then(char::from_u32),
            }?;
            Some((c, end + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &tail[len..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// XML text with `&`, `<`, `>` and `"` escaped.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The ETag inside a part id object_store returned (its own XML when checksums are on).
pub fn part_etag(content_id: &str) -> String {
    match element(content_id, "e_tag") {
        Some(e) => unescape(e),
        None => content_id.to_string(),
    }
}

/// A part id object_store completes an upload with, for a part stored earlier.
pub fn part_id(etag: &str, checksum_sha256: Option<&str>) -> object_store::multipart::PartId {
    object_store::multipart::PartId {
        content_id: match checksum_sha256 {
            Some(sum) => format!(
                "<PartMetadata><e_tag>{}</e_tag><checksum_sha256>{}</checksum_sha256></PartMetadata>",
                escape(etag),
                escape(sum)
            ),
            // As object_store's own id of a part uploaded without a checksum.
            None => etag.to_string(),
        },
    }
}

fn snippet(s: &str) -> String {
    quiet(s).chars().take(300).collect()
}

/// An error's text with the causes it does not show itself (object_store and reqwest
/// say "error sending request", the refused connection, the unknown host or the
/// certificate it could not verify is only in their sources), made [`quiet`].
pub fn described(e: &dyn std::error::Error) -> String {
    let mut texts = chain_texts(e);
    let mut text = texts.next().unwrap_or_default();
    for more in texts {
        if !more.is_empty() && !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
    }
    quiet(&text).into_owned()
}

/// The text of `e` and of each of its sources, outermost first.
pub fn chain_texts<'a>(e: &'a dyn std::error::Error) -> impl Iterator<Item = String> + 'a {
    std::iter::successors(Some(e), |err| err.source()).map(ToString::to_string)
}

/// An error text from or about S3 without the request S3 may echo back: its error
/// document for a refused signature (`SignatureDoesNotMatch`) holds the canonical request
/// and the string signed, which carry the access key id and, with temporary credentials,
/// the session token — text that went on into logs, the failures table and dead-letter
/// headers. The document is cut down to its `Code` and `Message`.
pub fn quiet(text: &str) -> std::borrow::Cow<'_, str> {
    let Some(start) = ["<?xml", "<Error>"]
        .iter()
        .filter_map(|m| text.find(m))
        .min()
    else {
        return std::borrow::Cow::Borrowed(text);
    };
    let doc = &text[start..];
    let mut out = text[..start].to_string();
    match (element(doc, "Code"), element(doc, "Message")) {
        (Some(code), Some(msg)) => out.push_str(&format!("{}: {}", unescape(code), unescape(msg))),
        (Some(code), None) => out.push_str(&unescape(code)),
        _ => out.push_str("(an XML error document, not shown)"),
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// S3's answer to a refused signature echoes the request it signed (with a session
    /// token where the credentials are temporary): never passed on, only its code.
    #[test]
    fn an_echoed_request_is_cut_from_error_texts() {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error>\
            <Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated \
            does not match</Message><AWSAccessKeyId>ASIAEXAMPLE</AWSAccessKeyId>\
            <CanonicalRequest>PUT /b/k x-amz-security-token:SESSIONTOKEN</CanonicalRequest>\
            </Error>";
        let text = format!("Client error with status 403 Forbidden: {body}");
        let q = quiet(&text);
        assert_eq!(
            q,
            "Client error with status 403 Forbidden: SignatureDoesNotMatch: \
             The request signature we calculated does not match"
        );
        assert!(!snippet(body).contains("SESSIONTOKEN"));
        let e = crate::copy::CopyError::Store(object_store::Error::Generic {
            store: "S3",
            source: text.into(),
        });
        assert!(
            !e.to_string().contains("SESSIONTOKEN") && !e.to_string().contains("ASIA"),
            "{e}"
        );
        assert_eq!(quiet("connection reset"), "connection reset");
    }

    /// A client of a bucket `b` at `server` with static credentials and the default
    /// options (one try: `max_retries` 0).
    fn client_of(server: &wiremock::MockServer) -> S3Native {
        let creds = Arc::new(object_store::StaticCredentialProvider::new(
            object_store::aws::AwsCredential {
                key_id: "AKIDEXAMPLE".into(),
                secret_key: "secret".into(),
                token: None,
            },
        ));
        let opts = crate::store::StoreOptions {
            max_retries: 0,
            ..Default::default()
        };
        S3Native::new(Some(&server.uri()), "b", "us-east-1", creds, &opts).expect("client")
    }

    /// A completion the store throttles (503 SlowDown, 429) is tried as often as any other
    /// request (`max_retries`), after the wait the store asks for: it was given three
    /// tries within a second, and the whole copy was retried, its source read again.
    #[tokio::test]
    async fn a_throttled_completion_is_tried_again_as_the_store_asks() {
        use wiremock::matchers::method;
        use wiremock::{Mock, ResponseTemplate};
        let server = wiremock::MockServer::start().await;
        let slow_down =
            "<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>";
        Mock::given(method("POST"))
            .respond_with(
                ResponseTemplate::new(503)
                    .insert_header("Retry-After", "1")
                    .set_body_string(slow_down),
            )
            .up_to_n_times(2)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "1"))
            .up_to_n_times(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(
                "<CompleteMultipartUploadResult><ETag>\"e-1\"</ETag></CompleteMultipartUploadResult>",
            ))
            .mount(&server)
            .await;
        let mut s3 = client_of(&server);
        s3.retries = 3;
        let parts = [object_store::multipart::PartId {
            content_id: "\"p1\"".into(),
        }];
        let began = std::time::Instant::now();
        s3.complete_multipart_create(&ObjectPath::from("k"), "u", &parts)
            .await
            .expect("completed at the fourth try");
        let tries = server.received_requests().await.unwrap_or_default().len();
        assert_eq!(tries, 4);
        assert!(
            began.elapsed() >= std::time::Duration::from_secs(3),
            "each wait as long as asked: {:?}",
            began.elapsed()
        );
    }

    /// An endpoint (a proxy's or portal's page) answering with more than any S3 answer
    /// is refused, not held whole in memory; one listing pages without end stops.
    #[tokio::test]
    async fn answers_no_s3_sends_are_refused_not_held() {
        use wiremock::matchers::method;
        use wiremock::{Mock, ResponseTemplate};
        let server = wiremock::MockServer::start().await;
        let huge = format!(
            "<InitiateMultipartUploadResult><UploadId>u</UploadId>{}</InitiateMultipartUploadResult>",
            " ".repeat(MAX_ANSWER)
        );
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200).set_body_string(huge))
            .mount(&server)
            .await;
        // Every page full and "truncated", its marker moving on by one: 1,000 parts a page.
        let page = |from: u64| {
            let mut xml = String::from("<ListPartsResult><IsTruncated>true</IsTruncated>");
            for n in from..from + 1000 {
                xml.push_str(&format!(
                    "<Part><PartNumber>{n}</PartNumber><ETag>\"e\"</ETag><Size>5</Size></Part>"
                ));
            }
            xml.push_str(&format!(
                "<NextPartNumberMarker>{from}</NextPartNumberMarker></ListPartsResult>"
            ));
            xml
        };
        Mock::given(method("GET"))
            .respond_with(move |r: &wiremock::Request| {
                let from = r
                    .url
                    .query_pairs()
                    .find(|(k, _)| k == "part-number-marker")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
                    .map_or(1, |m| m + 1);
                ResponseTemplate::new(200).set_body_string(page(from))
            })
            .mount(&server)
            .await;
        let s3 = client_of(&server);
        let key = ObjectPath::from("k");
        let e = s3.create_multipart(&key, &[]).await.expect_err("refused");
        assert!(
            matches!(e, S3Error::Response("CreateMultipartUpload", ref t) if t.contains("MiB")),
            "{e}"
        );
        let e = s3.list_parts(&key, "u").await.expect_err("refused");
        assert!(
            matches!(e, S3Error::Response("ListParts", ref t) if t.contains("10000 parts")),
            "{e}"
        );
        let pages = server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.method.as_str() == "GET")
            .count();
        assert!(pages <= 11, "{pages} pages read");
    }

    #[test]
    fn list_parts_xml_and_part_ids_round_trip() {
        let xml = "<ListPartsResult><IsTruncated>false</IsTruncated>\
            <Part><PartNumber>1</PartNumber><ETag>&quot;abc&quot;</ETag><Size>5</Size></Part>\
            <Part><PartNumber>2</PartNumber><ETag>\"def\"</ETag><Size>3</Size>\
            <ChecksumSHA256>x+y=</ChecksumSHA256></Part></ListPartsResult>";
        let parts: Vec<_> = elements(xml, "Part").collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            element(parts[0], "ETag").map(unescape),
            Some("\"abc\"".into())
        );
        assert_eq!(element(parts[1], "ChecksumSHA256"), Some("x+y="));
        let id = part_id("\"abc\"", Some("x+y="));
        assert_eq!(part_etag(&id.content_id), "\"abc\"");
        assert_eq!(part_etag("\"plain\""), "\"plain\"");
        // MinIO writes the quotes as numeric references.
        assert_eq!(unescape("&#34;abc&#34;"), "\"abc\"");
        assert_eq!(unescape("&#x22;a&amp;b&#X27;"), "\"a&b'");
        assert_eq!(unescape("&amp;quot; & &bogus; &#;"), "&quot; & &bogus; &#;");
    }
}

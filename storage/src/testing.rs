//! Test support for the storage services: a local S3-protocol server (moto, from PyPI)
//! a fault-injecting object store wrapper, and helpers to build asset-sweeper messages.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::stream::BoxStream;
use object_store::MultipartId;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, UploadPart,
};
use tokio::sync::Notify;

use framework::testing::process::{self, Guarded};
use std::time::Duration;

/// A moto S3 server on a free loopback port, killed on drop.
pub struct MotoServer {
    /// `http://127.0.0.1:PORT` (`https://` when started with TLS).
    pub endpoint: String,
    port: u16,
    child: Option<Guarded>,
    /// The directory of its certificate (`server.pem`, `server.key`, signed by `ca.pem`:
    /// [`framework::testing::tls::make_certificates`]), when it speaks TLS.
    tls: Option<std::path::PathBuf>,
}

impl MotoServer {
    /// Starts `moto_server` and creates `bucket`.
    pub async fn start(bucket: &str) -> MotoServer {
        Self::start_on(bucket, None).await
    }

    /// Starts `moto_server` speaking TLS with the certificate in `dir` (a private CA's:
    /// [`framework::testing::tls::make_certificates`]) and creates `bucket`.
    pub async fn start_tls(bucket: &str, dir: &std::path::Path) -> MotoServer {
        Self::start_on(bucket, Some(dir.to_path_buf())).await
    }

    async fn start_on(bucket: &str, tls: Option<std::path::PathBuf>) -> MotoServer {
        let port = framework::testing::broker::free_port();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut s = MotoServer {
            endpoint: format!("{scheme}://127.0.0.1:{port}"),
            port,
            child: None,
            tls,
        };
        s.restart(bucket).await;
        s
    }

    /// Stops the server (the store is then "down").
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill();
        }
    }

    /// Starts it again on the same port (moto keeps nothing: the bucket is re-created).
    pub async fn restart(&mut self, bucket: &str) {
        self.stop();
        let mut cmd = Command::new(python());
        cmd.args([
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
        ]);
        if let Some(dir) = &self.tls {
            cmd.arg("-c")
                .arg(dir.join("server.pem"))
                .arg("-k")
                .arg(dir.join("server.key"));
        }
        let child = process::spawn(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        )
        .expect("python3 -m moto.server runs (pip install 'moto[server]')");
        self.child = Some(child);
        let client = reqwest_client(self.tls.as_deref());
        let deadline = tokio::time::Instant::now() + framework::testing::WAIT;
        loop {
            if let Ok(r) = client
                .put(format!("{}/{bucket}", self.endpoint))
                .send()
                .await
                && r.status().is_success()
            {
                break;
            }
            // A server that could not start (its port taken meanwhile) is said at once.
            if let Some(c) = self.child.as_mut() {
                assert!(
                    c.is_running(),
                    "moto_server exited at start (port {})",
                    self.port
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "moto_server came up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl MotoServer {
    /// Store options reaching this server (moto accepts any credentials).
    pub fn store_options(&self) -> crate::StoreOptions {
        crate::StoreOptions {
            endpoint: Some(self.endpoint.clone()),
            access_key_id: Some("test".into()),
            secret_access_key: Some(framework::Secret::new("test")),
            allow_http: true,
            ..Default::default()
        }
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The Python that has moto installed (`MOTO_PYTHON`, default `python3`).
fn python() -> String {
    std::env::var("MOTO_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A client trusting the CA of `tls` (a certificate directory), if any.
fn reqwest_client(tls: Option<&std::path::Path>) -> reqwest::Client {
    // Bounded: a server that accepts and never answers must not hold the readiness wait.
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(dir) = tls {
        let pem = std::fs::read(dir.join("ca.pem")).expect("the test CA");
        b = b.add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("a PEM CA"));
    }
    b.build().expect("a client")
}

/// An asset-sweeper message for `parent_dir/filename`, in the shape the sweeper sends
/// (`parent_dir`, times as epoch seconds, some fractional).
pub fn sweeper_message(parent_dir: &str, filename: &str, ignore: bool) -> serde_json::Value {
    serde_json::json!({
        "imported_id": "VX-1234",
        "size": 0,
        "ignore": ignore,
        "mime_type": "video/quicktime",
        "mtime": 1704067200,
        "ctime": 1704067200.25,
        "atime": 1704067201.5,
        "owner": 1000,
        "group": 1000,
        "parent_dir": parent_dir,
        "filename": filename,
    })
}

/// The same message in the older shape (`filepath`, RFC 3339 times), still accepted.
pub fn sweeper_message_v1(filepath: &str, filename: &str, ignore: bool) -> serde_json::Value {
    serde_json::json!({
        "imported_id": "VX-1234",
        "size": 0,
        "ignore": ignore,
        "mime_type": "video/quicktime",
        "mtime": "2024-01-01T00:00:00Z",
        "ctime": "2024-01-01T00:00:00Z",
        "atime": "2024-01-01T00:00:00Z",
        "owner": 1000,
        "group": 1000,
        "filepath": filepath,
        "filename": filename,
    })
}

/// Every regular file under `dir`, relative to it, sorted (a store's objects, and in a
/// local store its staging files under [`crate::local::STAGING_DIR`]).
pub fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Writes `content` to `<data>/online/<rel>` (the default online root) and returns the
/// file's directory, as an asset-sweeper message's `parent_dir`.
pub fn put_online_file(data: &std::path::Path, rel: &str, content: &[u8]) -> String {
    let p = data.join("online").join(rel);
    let dir = p.parent().unwrap_or(data).to_path_buf();
    std::fs::create_dir_all(&dir).expect("create the online directory");
    std::fs::write(&p, content).expect("write the online file");
    dir.display().to_string()
}

/// Faults a [`FaultyStore`] injects; switch them on and off while a test runs.
#[derive(Default)]
pub struct Faults {
    /// Single-request uploads fail (where a file under one part is uploaded).
    pub fail_put: AtomicBool,
    /// Multipart completions fail.
    pub fail_complete: AtomicBool,
    /// This many uploads are stored with their first byte changed.
    pub corrupt: AtomicUsize,
    /// Multipart aborts seen.
    pub aborts: AtomicUsize,
    /// Aborts of a recorded multipart upload fail (a store blip, a role without
    /// `s3:AbortMultipartUpload`).
    pub fail_abort: AtomicBool,
    /// Aborts are refused as not permitted (403: a role without the permission).
    pub deny_abort: AtomicBool,
    /// Aborts are refused with a passing 403 (`SignatureDoesNotMatch`: keys rotating).
    pub refuse_abort_signature: AtomicBool,
    /// Aborts are refused as unauthenticated (401: a credential expired or rotating).
    pub unauthenticated_abort: AtomicBool,
    /// Runs once, after the first multipart part is stored (e.g. stop the S3 server).
    pub after_first_part: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Runs once, before the next single-request upload (e.g. stop the S3 server).
    pub before_put: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// Parts (0-based index) from this one on fail to upload (resumable S3 uploads).
    pub fail_parts_from: Mutex<Option<usize>>,
    /// Parts sent through the resumable S3 path.
    pub parts_sent: AtomicUsize,
    /// This many deletes fail (a store's blip while a bad object is taken away).
    pub fail_deletes: AtomicUsize,
    gate: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
    abort_gate: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
    get_gate: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
}

impl Faults {
    /// Holds the next upload (single request, multipart writer, or a resumable
    /// upload's next part) until the returned release is notified; the first returned notify fires when it is being held.
    pub fn hold_next_upload(&self) -> (Arc<Notify>, Arc<Notify>) {
        let pair = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        *lock(&self.gate) = Some(pair.clone());
        pair
    }

    /// Holds the next multipart abort as [`Faults::hold_next_upload`] holds an upload.
    pub fn hold_next_abort(&self) -> (Arc<Notify>, Arc<Notify>) {
        let pair = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        *lock(&self.abort_gate) = Some(pair.clone());
        pair
    }

    /// Holds the next read (GET, not a HEAD) once the store has answered it, as
    /// [`Faults::hold_next_upload`] holds an upload: the object can be replaced between a
    /// read and what follows it.
    pub fn hold_next_get(&self) -> (Arc<Notify>, Arc<Notify>) {
        let pair = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        *lock(&self.get_gate) = Some(pair.clone());
        pair
    }

    async fn gate(&self) {
        Self::pass(&self.gate).await
    }

    async fn pass(gate: &Mutex<Option<(Arc<Notify>, Arc<Notify>)>>) {
        let held = lock(gate).take();
        if let Some((entered, release)) = held {
            entered.notify_one();
            release.notified().await;
        }
    }

    fn corrupting(&self) -> bool {
        self.corrupt
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn injected(what: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected fault: {what}").into(),
    }
}

fn corrupted(p: PutPayload) -> PutPayload {
    let mut v: Vec<u8> = p.iter().flat_map(|b| b.iter().copied()).collect();
    if let Some(b) = v.first_mut() {
        *b ^= 0xff;
    }
    v.into()
}

/// An object store that passes everything to another one except the [`Faults`] it is
/// told to inject.
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    inner_mp: Option<Arc<dyn MultipartStore>>,
    faults: Arc<Faults>,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faults")
    }
}

impl std::fmt::Debug for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "faulty({})", self.inner)
    }
}

impl FaultyStore {
    /// `tier` with its store wrapped; the faults to switch.
    pub fn wrap(tier: &crate::Tier) -> (crate::Tier, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        let store = Arc::new(FaultyStore {
            inner: tier.store.clone(),
            inner_mp: tier.multipart.clone(),
            faults: faults.clone(),
        });
        let mut t = tier.clone();
        t.store = store.clone();
        // Through the store, where the faults are: a local tier's direct writes
        // (crate::local) and reads would bypass them.
        t.local_dir = None;
        if t.multipart.is_some() {
            t.multipart = Some(store);
        }
        (t, faults)
    }
}

#[async_trait::async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &ObjectPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.faults.gate().await;
        if let Some(f) = lock(&self.faults.before_put).take() {
            f();
        }
        if self.faults.fail_put.load(Ordering::SeqCst) {
            return Err(injected("put"));
        }
        let payload = if self.faults.corrupting() {
            corrupted(payload)
        } else {
            payload
        };
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.faults.gate().await;
        let inner = self.inner.put_multipart_opts(location, opts).await?;
        Ok(Box::new(FaultyUpload {
            inner,
            faults: self.faults.clone(),
            parts: 0,
            corrupt: self.faults.corrupting(),
        }))
    }

    async fn get_opts(
        &self,
        location: &ObjectPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let head = options.head;
        let got = self.inner.get_opts(location, options).await;
        if !head {
            Faults::pass(&self.faults.get_gate).await;
        }
        got
    }

    async fn delete(&self, location: &ObjectPath) -> object_store::Result<()> {
        if (self.faults.fail_deletes)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(injected("delete"));
        }
        self.inner.delete(location).await
    }

    fn list(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjectPath>,
    ) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(
        &self,
        from: &ObjectPath,
        to: &ObjectPath,
    ) -> object_store::Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[async_trait::async_trait]
impl MultipartStore for FaultyStore {
    async fn create_multipart(&self, path: &ObjectPath) -> object_store::Result<MultipartId> {
        self.mp()?.create_multipart(path).await
    }

    async fn put_part(
        &self,
        path: &ObjectPath,
        id: &MultipartId,
        part_idx: usize,
        data: PutPayload,
    ) -> object_store::Result<PartId> {
        self.faults.gate().await;
        if lock(&self.faults.fail_parts_from).is_some_and(|from| part_idx >= from) {
            return Err(injected("part"));
        }
        let data = if part_idx == 0 && self.faults.corrupting() {
            corrupted(data)
        } else {
            data
        };
        let r = self.mp()?.put_part(path, id, part_idx, data).await?;
        self.faults.parts_sent.fetch_add(1, Ordering::SeqCst);
        if part_idx == 0
            && let Some(f) = lock(&self.faults.after_first_part).take()
        {
            f();
        }
        Ok(r)
    }

    async fn complete_multipart(
        &self,
        path: &ObjectPath,
        id: &MultipartId,
        parts: Vec<PartId>,
    ) -> object_store::Result<PutResult> {
        if self.faults.fail_complete.load(Ordering::SeqCst) {
            return Err(injected("complete"));
        }
        self.mp()?.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(
        &self,
        path: &ObjectPath,
        id: &MultipartId,
    ) -> object_store::Result<()> {
        self.faults.aborts.fetch_add(1, Ordering::SeqCst);
        Faults::pass(&self.faults.abort_gate).await;
        if self.faults.fail_abort.load(Ordering::SeqCst) {
            return Err(injected("abort"));
        }
        if self.faults.refuse_abort_signature.load(Ordering::SeqCst) {
            return Err(object_store::Error::PermissionDenied {
                path: path.to_string(),
                source: "injected fault: <Error><Code>SignatureDoesNotMatch</Code></Error>".into(),
            });
        }
        if self.faults.unauthenticated_abort.load(Ordering::SeqCst) {
            return Err(object_store::Error::Unauthenticated {
                path: path.to_string(),
                source: "injected fault: 401 Unauthorized".into(),
            });
        }
        if self.faults.deny_abort.load(Ordering::SeqCst) {
            return Err(object_store::Error::PermissionDenied {
                path: path.to_string(),
                source: "injected fault: <Error><Code>AccessDenied</Code></Error>".into(),
            });
        }
        self.mp()?.abort_multipart(path, id).await
    }
}

impl FaultyStore {
    fn mp(&self) -> object_store::Result<&Arc<dyn MultipartStore>> {
        self.inner_mp
            .as_ref()
            .ok_or_else(|| injected("no multipart store"))
    }
}

#[derive(Debug)]
struct FaultyUpload {
    inner: Box<dyn MultipartUpload>,
    faults: Arc<Faults>,
    parts: usize,
    corrupt: bool,
}

#[async_trait::async_trait]
impl MultipartUpload for FaultyUpload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        self.parts += 1;
        let first = self.parts == 1;
        let data = if first && self.corrupt {
            corrupted(data)
        } else {
            data
        };
        let part = self.inner.put_part(data);
        let faults = self.faults.clone();
        Box::pin(async move {
            part.await?;
            if first && let Some(f) = lock(&faults.after_first_part).take() {
                f();
            }
            Ok(())
        })
    }

    async fn complete(&mut self) -> object_store::Result<PutResult> {
        if self.faults.fail_complete.load(Ordering::SeqCst) {
            return Err(injected("complete"));
        }
        self.inner.complete().await
    }

    async fn abort(&mut self) -> object_store::Result<()> {
        self.faults.aborts.fetch_add(1, Ordering::SeqCst);
        self.inner.abort().await
    }
}

/// A TCP proxy in front of an HTTP server (the S3 test server) that logs every request
/// line (`METHOD target`), so a test can count what a service asked the store: GETs of
/// an object, UploadPart requests. Stops with the test (dropped).
pub struct CountingProxy {
    /// `http://127.0.0.1:PORT`, to use in place of the server's endpoint.
    pub endpoint: String,
    log: Arc<Mutex<RequestLog>>,
    task: tokio::task::JoinHandle<()>,
}

/// The requests logged since the last reset.
#[derive(Default)]
struct RequestLog {
    /// Bumped by [`CountingProxy::reset_after_client_died`]: a connection accepted before
    /// it logs nothing more.
    generation: u64,
    requests: Vec<String>,
    hold: Option<Hold>,
    /// A header (lower case) whose requests are answered 400 by the proxy itself, as a
    /// store that does not support it answers (Backblaze B2 and `x-amz-checksum-`).
    refused_header: Option<String>,
    /// Requests answered so.
    refused: usize,
    /// Requests with this method answered 503 SlowDown by the proxy itself, and how many
    /// more.
    throttled: Option<(String, usize)>,
    /// The next request matching is answered with this status and body by the proxy
    /// itself (a store's answer the client must not trust).
    canned: Option<Canned>,
    /// The next request with this method whose target matches is forwarded, and the
    /// server's answer lost: the client is answered 500 once the server has answered.
    lose: Option<(String, TargetMatch)>,
}

/// Which request targets (path and query) a fault applies to.
type TargetMatch = Box<dyn Fn(&str) -> bool + Send + Sync>;

/// An answer the proxy gives itself, once, to a request matching.
struct Canned {
    method: String,
    pred: Box<dyn Fn(&str) -> bool + Send + Sync>,
    status: &'static str,
    body: String,
}

/// Requests held back (not forwarded) from the `from`-th one matching on.
struct Hold {
    method: String,
    pred: Box<dyn Fn(&str) -> bool + Send + Sync>,
    from: usize,
    seen: usize,
    reached: Arc<AtomicBool>,
    open: tokio::sync::watch::Receiver<bool>,
}

/// Requests a [`CountingProxy`] holds back: a fault can then cut a client at an exact
/// request, where watching it from outside would race the client's speed.
pub struct HeldRequests {
    reached: Arc<AtomicBool>,
    open: tokio::sync::watch::Sender<bool>,
}

impl HeldRequests {
    /// True once the first request held back has arrived (the ones before it went on).
    pub fn reached(&self) -> bool {
        self.reached.load(Ordering::SeqCst)
    }

    /// Lets the held requests (and later ones) through.
    pub fn release(&self) {
        let _ = self.open.send(true);
    }
}

impl CountingProxy {
    /// Proxies to `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> CountingProxy {
        let target = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("proxy address"));
        let log = Arc::new(Mutex::new(RequestLog::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let generation = lock(&l).generation;
                conns.spawn(proxy_connection(
                    client,
                    target.clone(),
                    l.clone(),
                    generation,
                ));
            }
        });
        CountingProxy {
            endpoint,
            log,
            task,
        }
    }

    /// Every request so far, as `METHOD target`.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.log).requests.clone()
    }

    /// Forgets the requests so far.
    pub fn reset(&self) {
        lock(&self.log).requests.clear();
    }

    /// Forgets the requests so far and any that the connections open now send later: for
    /// a client just killed, whose last request may be read after this (it is not a new
    /// request of the client that replaces it).
    pub fn reset_after_client_died(&self) {
        let mut l = lock(&self.log);
        l.generation += 1;
        l.requests.clear();
    }

    /// Holds back, unforwarded, the `from`-th request with this method whose target
    /// satisfies `pred` and every one after it, until [`HeldRequests::release`].
    pub fn hold_from(
        &self,
        method: &str,
        pred: impl Fn(&str) -> bool + Send + Sync + 'static,
        from: usize,
    ) -> HeldRequests {
        let (open, rx) = tokio::sync::watch::channel(false);
        let reached = Arc::new(AtomicBool::new(false));
        lock(&self.log).hold = Some(Hold {
            method: method.to_string(),
            pred: Box::new(pred),
            from,
            seen: 0,
            reached: reached.clone(),
            open: rx,
        });
        HeldRequests { reached, open }
    }

    /// Answers every request carrying a header that starts with `prefix` with 400
    /// `InvalidArgument` (as Backblaze B2 answers `x-amz-checksum-sha256`), not forwarding
    /// it; returns nothing, [`CountingProxy::refused`] counts them.
    pub fn refuse_header(&self, prefix: &str) {
        lock(&self.log).refused_header = Some(prefix.to_ascii_lowercase());
    }

    /// Answers the next `n` requests with `method` 503 SlowDown (`Retry-After: 0`), as a
    /// store throttling its clients does, not forwarding them.
    pub fn throttle_next(&self, method: &str, n: usize) {
        lock(&self.log).throttled = Some((method.to_string(), n));
    }

    /// Answers the next request with this method whose target satisfies `pred` with
    /// `status` (`"200 OK"`) and the XML `body` itself, not forwarding it: an answer of a
    /// store gone wrong (a truncated or malformed listing).
    pub fn answer_next(
        &self,
        method: &str,
        pred: impl Fn(&str) -> bool + Send + Sync + 'static,
        status: &'static str,
        body: &str,
    ) {
        lock(&self.log).canned = Some(Canned {
            method: method.to_string(),
            pred: Box::new(pred),
            status,
            body: body.to_string(),
        });
    }

    /// Forwards the next request with this method whose target satisfies `pred`, and
    /// loses the server's answer: once the server has answered, the client gets 500
    /// `InternalError` instead (a connection that dropped with the answer on its way).
    pub fn lose_next_answer(
        &self,
        method: &str,
        pred: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) {
        lock(&self.log).lose = Some((method.to_string(), Box::new(pred)));
    }

    /// Requests answered 400 for a refused header.
    pub fn refused(&self) -> usize {
        lock(&self.log).refused
    }

    /// Requests with this method whose target (path and query) satisfies `pred`.
    pub fn count(&self, method: &str, pred: impl Fn(&str) -> bool) -> usize {
        lock(&self.log)
            .requests
            .iter()
            .filter_map(|r| r.split_once(' '))
            .filter(|(m, t)| *m == method && pred(t))
            .count()
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one client connection, logging each request it sends (requests are framed
/// by Content-Length; the responses are passed through untouched).
async fn proxy_connection(
    client: tokio::net::TcpStream,
    upstream: String,
    log: Arc<Mutex<RequestLog>>,
    generation: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
        return;
    };
    let (mut sr, mut sw) = server.into_split();
    let (mut cr, cw) = client.into_split();
    // Shared with the requests the proxy answers itself (a client waits for each
    // response before its next request, so the two never interleave).
    let cw = tokio::sync::Mutex::new(cw);
    // The server's answers are lost from here on (`lose_next_answer`), each said.
    let lost = Lost::default();
    let back = async {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match sr.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) if lost.muted.load(Ordering::SeqCst) => lost.answered.notify_one(),
                Ok(n) => {
                    if cw.lock().await.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = cw.lock().await.shutdown().await;
    };
    let forth = async {
        forward_requests(&mut cr, &mut sw, &cw, &log, generation, &lost).await;
        // The client is gone (or answered by the proxy): the server sees its connection end,
        // as it would the client's own, instead of waiting for the rest of a request.
        let _ = sw.shutdown().await;
    };
    tokio::join!(back, forth);
}

/// Answers the client with `status` and `body` (XML) itself and ends the connection, its
/// server's side too (and with it the copy of its responses).
async fn answer_and_close(
    cw: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    sw: &mut tokio::net::tcp::OwnedWriteHalf,
    status: &str,
    body: &str,
) {
    use tokio::io::AsyncWriteExt;
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nRetry-After: 0\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut w = cw.lock().await;
    let _ = w.write_all(response.as_bytes()).await;
    let _ = w.shutdown().await;
    let _ = sw.shutdown().await;
}

/// A connection's server answers being lost ([`CountingProxy::lose_next_answer`]).
#[derive(Default)]
struct Lost {
    muted: AtomicBool,
    /// Notified as the server's (lost) answer arrives.
    answered: Notify,
}

/// Reads the client's requests one by one, logging (and, as set, holding back, refusing or
/// throttling) each, and forwards them to the server; returns when the client's side ends.
async fn forward_requests(
    cr: &mut tokio::net::tcp::OwnedReadHalf,
    sw: &mut tokio::net::tcp::OwnedWriteHalf,
    cw: &tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    log: &Mutex<RequestLog>,
    generation: u64,
    lost: &Lost,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    {
        let mut buf: Vec<u8> = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            // Read one request head.
            let end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                match cr.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let mut lines = head.split("\r\n");
            let first = lines.next().unwrap_or_default();
            let mut parts = first.split(' ');
            let method = parts.next().unwrap_or_default();
            let target = parts.next().unwrap_or_default();
            let answer = {
                let mut l = lock(log);
                let refuse = l.refused_header.as_ref().is_some_and(|prefix| {
                    head.split("\r\n")
                        .skip(1)
                        .any(|h| h.to_ascii_lowercase().starts_with(prefix.as_str()))
                });
                let throttle = match &mut l.throttled {
                    Some((m, left)) if m == method && *left > 0 => {
                        *left -= 1;
                        true
                    }
                    _ => false,
                };
                let error = |code: &str, message: &str| {
                    format!(
                        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
                         <Message>{message}</Message></Error>"
                    )
                };
                // One whose answer is to be lost goes to the server; a canned answer waits
                // for the next (the try again after the loss, say).
                let losing = l
                    .lose
                    .as_ref()
                    .is_some_and(|(m, pred)| m == method && pred(target));
                let canned = match losing || refuse || throttle {
                    true => None,
                    false => l.canned.take_if(|c| c.method == method && (c.pred)(target)),
                };
                if refuse {
                    l.refused += 1;
                    Some((
                        "400 Bad Request",
                        error(
                            "InvalidArgument",
                            "Unsupported header received for this API call.",
                        ),
                    ))
                } else if throttle {
                    Some((
                        "503 Slow Down",
                        error("SlowDown", "Please reduce your request rate."),
                    ))
                } else {
                    canned.map(|c| (c.status, c.body))
                }
            };
            if let Some((status, body)) = answer {
                // A HEAD's answer has no body.
                let why = if method == "HEAD" {
                    String::new()
                } else {
                    body
                };
                answer_and_close(cw, sw, status, &why).await;
                return;
            }
            let held = {
                let mut l = lock(log);
                if l.generation == generation {
                    l.requests.push(format!("{method} {target}"));
                }
                if l.lose
                    .take_if(|(m, pred)| m == method && pred(target))
                    .is_some()
                {
                    lost.muted.store(true, Ordering::SeqCst);
                }
                match l.hold.as_mut() {
                    Some(h) if h.method == method && (h.pred)(target) => {
                        h.seen += 1;
                        (h.seen >= h.from).then(|| {
                            h.reached.store(true, Ordering::SeqCst);
                            h.open.clone()
                        })
                    }
                    _ => None,
                }
            };
            if let Some(mut open) = held {
                let _ = open.wait_for(|o| *o).await;
            }
            let mut body: u64 = 0;
            let mut chunked = false;
            for l in lines {
                if let Some((k, v)) = l.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        body = v.trim().parse().unwrap_or(0);
                    } else if k.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = true;
                    }
                }
            }
            if sw.write_all(&buf[..end]).await.is_err() {
                return;
            }
            buf.drain(..end);
            if chunked {
                // Not framed here: pass the rest through unlogged.
                let _ = sw.write_all(&buf).await;
                let _ = tokio::io::copy(cr, sw).await;
                return;
            }
            // Forward the body.
            let from_buf = usize::try_from(body).unwrap_or(usize::MAX).min(buf.len());
            if sw.write_all(&buf[..from_buf]).await.is_err() {
                return;
            }
            buf.drain(..from_buf);
            let mut left = body - from_buf as u64;
            while left > 0 {
                let want = usize::try_from(left).unwrap_or(usize::MAX).min(chunk.len());
                match cr.read(&mut chunk[..want]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if sw.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                }
            }
            if lost.muted.load(Ordering::SeqCst) {
                // Carried out by the server (it has begun to answer), the answer lost.
                lost.answered.notified().await;
                let why = "<Error><Code>InternalError</Code><Message>lost</Message></Error>";
                answer_and_close(cw, sw, "500 Internal Server Error", why).await;
                return;
            }
        }
    }
}

/// Local copies to be held after their first block: (destination suffix, notified once
/// held, the release's receiver).
type HeldCopies = Vec<(
    std::path::PathBuf,
    Arc<Notify>,
    std::sync::mpsc::Receiver<()>,
)>;

static HELD_COPIES: Mutex<HeldCopies> = Mutex::new(Vec::new());

/// Holds the next local copy (of more than one block) whose destination ends with `key`
/// after its first block, until the returned sender sends or is dropped; the returned
/// notify fires when it is held. A copy mid-way, for faults that must land during it.
pub fn hold_local_copy(key: &str) -> (Arc<Notify>, std::sync::mpsc::Sender<()>) {
    let entered = Arc::new(Notify::new());
    let (release, released) = std::sync::mpsc::channel();
    HELD_COPIES.lock().unwrap_or_else(|p| p.into_inner()).push((
        key.into(),
        entered.clone(),
        released,
    ));
    (entered, release)
}

/// Called by a local copy after its first block (on its blocking thread): waits there if
/// a test holds copies to `dest` ([`hold_local_copy`]).
pub(crate) fn local_copy_gate(dest: &std::path::Path) {
    let held = {
        let mut all = HELD_COPIES.lock().unwrap_or_else(|p| p.into_inner());
        all.iter()
            .position(|(k, _, _)| dest.ends_with(k))
            .map(|i| all.remove(i))
    };
    if let Some((_, entered, released)) = held {
        entered.notify_one();
        let _ = released.recv();
    }
}

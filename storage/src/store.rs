//! Opening a configured object store: the local filesystem (default) or S3-compatible.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use framework::Secret;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, Checksum, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};

/// S3 settings (`[<service>.<store>_options]`); ignored for local stores.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreOptions {
    /// Endpoint of an S3-compatible store (e.g. `http://minio:9000`); unset = AWS. Shown
    /// without credentials (refused in it for an S3 store; a local store's unused options
    /// are printed by `check-config` too).
    #[serde(default, serialize_with = "framework::config::serialize_redacted_url")]
    pub endpoint: Option<String>,
    /// Region (default `us-east-1`).
    #[serde(default)]
    pub region: Option<String>,
    /// Access key id (or `AWS_ACCESS_KEY_ID`).
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// Secret key (or `AWS_SECRET_ACCESS_KEY`); never printed.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// File holding the secret key (a mounted secret).
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
    /// Allow `http://` endpoints (on-prem stores, tests).
    #[serde(default)]
    pub allow_http: bool,
    /// Virtual-hosted-style addressing; false = path-style, as on-prem stores expect.
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// Retries of one request inside the client before the message is retried via the bus.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// Budget for those retries.
    #[serde(default = "default_retry_timeout_ms")]
    pub retry_timeout_ms: u64,
    /// Smallest multipart part in MiB (S3's minimum is 5); larger files get larger parts
    /// so that any object S3 holds (5 TiB) fits in its 10,000 parts.
    #[serde(default = "default_part_size_mib")]
    pub part_size_mib: u64,
    /// Most MiB the part buffers of all uploads at once hold: a part is read when there
    /// is room for it (one larger than this takes all of it), so many copies of very
    /// large files at once wait for each other instead of exhausting memory.
    #[serde(default = "default_part_memory_mib")]
    pub part_memory_mib: u64,
    /// Uploads are create-only (`If-None-Match: *` on the PUT and on the multipart
    /// completion): a copy never replaces an object, even one written by a copy whose
    /// claim had lapsed. false only for a store that refuses the header.
    #[serde(default = "default_true")]
    pub conditional_writes: bool,
    /// Uploads carry their SHA-256 (`x-amz-checksum-sha256`) and checks read the store's
    /// (`ChecksumSHA256`). false for a store that refuses the headers (Backblaze B2): a
    /// copy is then verified by reading it back.
    #[serde(default = "default_true")]
    pub checksums: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            secret_access_key_file: None,
            allow_http: false,
            virtual_hosted_style: false,
            max_retries: default_max_retries(),
            retry_timeout_ms: default_retry_timeout_ms(),
            part_size_mib: default_part_size_mib(),
            part_memory_mib: default_part_memory_mib(),
            conditional_writes: true,
            checksums: true,
        }
    }
}

fn default_max_retries() -> usize {
    3
}
fn default_retry_timeout_ms() -> u64 {
    30_000
}
fn default_part_size_mib() -> u64 {
    8
}
fn default_part_memory_mib() -> u64 {
    256
}
fn default_true() -> bool {
    true
}

/// An opened store: where objects go and how to describe it.
#[derive(Clone)]
pub struct Tier {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix inside the store (from `s3://bucket/prefix`).
    pub prefix: String,
    /// Description for messages and logs (no secrets).
    pub display: String,
    /// Which store this is, whatever the endpoint that reaches it: `s3://bucket/prefix`,
    /// or `file://` and its directory's canonical path. A database's records are of one
    /// store ([`crate::Records::foreign_owner`]).
    pub identity: String,
    /// Whether the store keeps user metadata on objects.
    pub supports_metadata: bool,
    /// For a local store, its directory: verification then reads the stored file
    /// directly in large blocks instead of through the object-store stream.
    pub local_dir: Option<PathBuf>,
    /// Smallest multipart part in bytes ([`crate::copy::part_size`] grows it with the file).
    pub min_part: u64,
    /// For an S3 store: its multipart uploads by upload id (kept in the database and
    /// resumed after a crash instead of starting over).
    pub multipart: Option<Arc<dyn MultipartStore>>,
    /// For an S3 store: HEAD with the object's checksum, upload ids, ListParts, the
    /// create-only completion.
    pub s3: Option<crate::s3::SharedS3>,
    /// Room for the part buffers of all uploads to this store at once.
    pub part_budget: crate::part_budget::PartBudget,
    /// Objects are published create-only (the store options' `conditional_writes`): a publish that
    /// finds the key taken fails instead of replacing what is there. A local store's
    /// direct copies are always create-only (crate::local).
    pub create_only: bool,
    /// For a local store: whether its directory is on its share (see
    /// [`crate::mounts::StoreMount`]); checked before every copy is written.
    pub local_mount: Option<Arc<crate::mounts::StoreMount>>,
    /// For a local store: each copy is read back from its disk and its digest compared
    /// before it is published (see [`crate::tier::TierPolicy::read_back`]).
    pub read_back: bool,
}

impl std::fmt::Debug for Tier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

/// A store URL or option that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum StoreConfigError {
    /// Unusable URL.
    #[error("{0}")]
    Url(String),
    /// The local directory cannot be created.
    #[error("cannot create {0}: {1}")]
    Dir(String, std::io::Error),
    /// The secret file cannot be read.
    #[error("cannot read secret_access_key_file {0}: {1}")]
    SecretFile(String, std::io::Error),
    /// object_store refused the settings.
    #[error("{}", crate::s3::quiet(&.0.to_string()))]
    Store(#[from] object_store::Error),
    /// The native S3 client could not be built.
    #[error("{0}")]
    S3(#[from] crate::s3::S3Error),
}

impl Tier {
    /// The object key for a path relative to the store's prefix.
    pub fn key(&self, relative: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            object_path(relative)
        } else {
            object_path(&format!("{}/{relative}", self.prefix))
        }
    }
}

/// Longest name (one segment of a key), in bytes, the service derives: what a local
/// store's filesystem takes (`NAME_MAX`), kept on every store so one file has one key
/// wherever it is archived.
pub(crate) const MAX_NAME: usize = 255;

/// Hex digits of a digest a derived name carries.
const TAG_HEX: usize = 16;

/// `<base>.<tag>` in at most `max` bytes: `base` is cut as little as needed, at a
/// character boundary and never inside a `%XX` escape (a cut one would read as another
/// character). `None` where not one character of `base` fits. Deterministic, so a
/// redelivery derives the name its first copy was stored under.
pub(crate) fn fit_name(base: &str, tag: &str, max: usize) -> Option<String> {
    let room = max.checked_sub(tag.len() + 1)?;
    let mut cut = base.len().min(room);
    while !base.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut < base.len()
        && let Some(i) = base[..cut].rfind('%')
        && i + 3 > cut
    {
        cut = i;
    }
    (cut > 0).then(|| format!("{}.{tag}", &base[..cut]))
}

/// The key beside `natural` for content whose digest is `digest` (hex), where other
/// content holds `natural`: `<natural>.<first 16 hex>` (`whole`: `<natural>.<digest>`,
/// for where another file's own name took the short one), its last name shortened to fit
/// in [`MAX_NAME`] bytes and the whole key in `max_key`. Where no shortening fits, the
/// unshortened key: its store refuses it, as permanent as it is.
pub(crate) fn sibling_key(
    natural: &ObjectPath,
    digest: &str,
    whole: bool,
    max_key: usize,
) -> ObjectPath {
    let tag = match whole {
        true => digest,
        false => digest.get(..TAG_HEX).unwrap_or(digest),
    };
    let whole = natural.as_ref();
    let (dir, name) = match whole.rsplit_once('/') {
        Some((dir, name)) => (Some(dir), name),
        None => (None, whole),
    };
    let dir_bytes = dir.map_or(0, |d| d.len() + 1);
    let fitted = max_key
        .checked_sub(dir_bytes)
        .and_then(|room| fit_name(name, tag, room.min(MAX_NAME)));
    let name = fitted.unwrap_or_else(|| format!("{name}.{tag}"));
    object_path(&match dir {
        Some(dir) => format!("{dir}/{name}"),
        None => name,
    })
}

/// An object key kept as written (non-ASCII included); only a segment holding control
/// characters (a macOS folder's `Icon\r`) is encoded, and in it only those characters and
/// `%`. object_store's own fallback encodes every segment of such a key, `[`, `~`, `#`
/// and the store's prefix included: one such file put its siblings' directory, and the
/// prefix its bucket rules name, under another spelling. An encoded segment longer than
/// [`MAX_NAME`] whose name was not is shortened, tagged with the digest of the whole
/// encoded segment (see [`fit_name`]): the file would otherwise fit its source's
/// filesystem and no local store's.
pub fn object_path(key: &str) -> ObjectPath {
    if let Ok(p) = ObjectPath::parse(key) {
        return p;
    }
    let segments: Vec<String> = key
        .split('/')
        .filter(|seg| !seg.is_empty())
        .map(|seg| match seg {
            "." => "%2E".to_string(),
            ".." => "%2E%2E".to_string(),
            _ if object_store::path::PathPart::parse(seg).is_ok() => seg.to_string(),
            _ => {
                let mut enc = String::with_capacity(seg.len() + 8);
                for c in seg.chars() {
                    if c.is_ascii_control() || c == '%' {
                        enc.push_str(&format!("%{:02X}", u32::from(c)));
                    } else {
                        enc.push(c);
                    }
                }
                // A name already too long for a local store stays as it was: S3 stores
                // hold it under that key.
                if enc.len() <= MAX_NAME || seg.len() > MAX_NAME {
                    enc
                } else {
                    use sha2::Digest as _;
                    let digest = hex::encode(sha2::Sha256::digest(enc.as_bytes()));
                    let tag = digest.get(..TAG_HEX).unwrap_or(&digest);
                    fit_name(&enc, tag, MAX_NAME).unwrap_or(enc)
                }
            }
        })
        .collect();
    ObjectPath::parse(segments.join("/")).unwrap_or_else(|_| ObjectPath::from(key))
}

/// Whether an endpoint for virtual-hosted-style requests leads to `bucket`: its host is
/// the bucket's own (`archive.s3.example.com`, or the bucket named as a host), or its path
/// names it (`https://s3.example.com/archive`: path-style written out).
fn names_the_bucket(endpoint: &url::Url, bucket: &str) -> bool {
    let host = endpoint.host_str().unwrap_or_default().to_ascii_lowercase();
    let bucket_lower = bucket.to_ascii_lowercase();
    host == bucket_lower
        || host.starts_with(&format!("{bucket_lower}."))
        || endpoint
            .path_segments()
            .and_then(|mut s| s.next())
            .is_some_and(|first| first == bucket)
}

/// Checks a store's settings without opening it, for a service's config validation (exit
/// 2 naming the key, in `check-config` too): `url_key` is the URL's key, `options_key`
/// the options' (e.g. `online_archive.archive_url`, `online_archive.archive_options`).
pub fn check_settings(
    url_key: &str,
    url: Option<&str>,
    options_key: &str,
    opts: &StoreOptions,
) -> Result<(), framework::config::ConfigError> {
    use framework::config::ConfigError;
    // The S3 options mean nothing to a directory store (default.toml: "ignored for
    // directories"), so they are checked only for an S3 one.
    let s3 = url.is_some_and(|u| u.starts_with("s3://"));
    // But where to reach an S3 store and how to sign in to it are given only for one: with
    // the URL unset (a deployment's variable lost, misspelt) the files went to a directory
    // on the container's volume, reported copied, and a remover downstream acted on that.
    // Blank ones (a template's `…_SECRET_ACCESS_KEY=`) say nothing.
    let given = |v: Option<&str>| v.is_some_and(|v| !v.trim().is_empty());
    let s3_only = [
        ("endpoint", given(opts.endpoint.as_deref())),
        ("access_key_id", given(opts.access_key_id.as_deref())),
        (
            "secret_access_key",
            given(opts.secret_access_key.as_ref().map(Secret::expose)),
        ),
        (
            "secret_access_key_file",
            opts.secret_access_key_file
                .as_deref()
                .is_some_and(|f| !f.as_os_str().is_empty()),
        ),
    ];
    if !s3 && let Some((key, _)) = s3_only.iter().find(|(_, set)| *set) {
        return Err(ConfigError::new(
            url_key,
            format!(
                "is {}, but {options_key}.{key} is set, which only an S3 store uses: set \
                 {url_key} = \"s3://bucket/prefix\", or remove the S3 options to store in a \
                 directory",
                match url {
                    Some(u) => format!("a directory ({u})"),
                    None => "unset (a directory under data_dir)".into(),
                }
            ),
        ));
    }
    // The S3 client also reads these from the environment: a variable left in a shared
    // environment would switch off the store's certificate check, unseen; encryption
    // settings would reach only some requests (the uploads of large files and their checks
    // go through a client of our own), storing them with another key or failing them.
    const REFUSED: [(&str, &str); 8] = [
        (
            "AWS_ALLOW_INVALID_CERTIFICATES",
            "the store's certificate would not be checked; for a private CA, add the CA to \
             the system's trust store or point SSL_CERT_FILE at a PEM bundle holding it",
        ),
        (
            "AWS_SERVER_SIDE_ENCRYPTION",
            "set the encryption as the bucket's default instead",
        ),
        (
            "AWS_SSE_KMS_KEY_ID",
            "set the KMS key as the bucket's default encryption instead",
        ),
        (
            "AWS_SSE_CUSTOMER_KEY_BASE64",
            "customer-provided keys (SSE-C) are not supported; use the bucket's default \
             encryption",
        ),
        (
            "AWS_PROXY_URL",
            "only some requests would take that proxy; use HTTPS_PROXY (and NO_PROXY), \
             which every request follows",
        ),
        (
            "AWS_PROXY_CA_CERTIFICATE",
            "only some requests would trust it; add the CA to the system's trust store or \
             point SSL_CERT_FILE at a PEM bundle holding it",
        ),
        (
            "AWS_PROXY_EXCLUDES",
            "only some requests would read it; use NO_PROXY with HTTPS_PROXY",
        ),
        (
            "AWS_REQUEST_PAYER",
            "requester-pays buckets are not supported (only some requests would say so)",
        ),
    ];
    if s3 {
        for (var, why) in REFUSED {
            let value =
                std::env::var_os(var).map(|v| v.to_string_lossy().trim().to_ascii_lowercase());
            let set = match value.as_deref() {
                None | Some("") => false,
                // As object_store reads a flag.
                Some(v) if var == "AWS_ALLOW_INVALID_CERTIFICATES" => {
                    matches!(v, "1" | "true" | "yes" | "on")
                }
                Some(_) => true,
            };
            if set {
                return Err(ConfigError::new(
                    var,
                    format!("is set in the environment of {url_key}: {why}"),
                ));
            }
        }
    }
    // Not echoed: `check-config` and every error would print the secret.
    if let Some(u) = url.and_then(|u| u.strip_prefix("s3://"))
        && u.split('/')
            .next()
            .is_some_and(|bucket| bucket.contains('@'))
    {
        return Err(ConfigError::new(
            url_key,
            "credentials belong in access_key_id and secret_access_key (or \
             secret_access_key_file), not the URL",
        ));
    }
    if s3
        && !opts.checksums
        && std::env::var_os("AWS_CHECKSUM_ALGORITHM").is_some_and(|v| !v.is_empty())
    {
        return Err(ConfigError::new(
            format!("{options_key}.checksums"),
            "is false, but AWS_CHECKSUM_ALGORITHM in the environment would send checksums \
             anyway: unset it",
        ));
    }
    // Set but empty is not unset: the client took an empty secret (every request signed
    // with it, refused 403), an empty key id, or an empty region (requests sent to
    // `https://s3..amazonaws.com`). Unset, they come from the environment or the role.
    if s3 {
        let given = [
            ("access_key_id", opts.access_key_id.as_deref()),
            (
                "secret_access_key",
                opts.secret_access_key.as_ref().map(Secret::expose),
            ),
            ("region", opts.region.as_deref()),
        ];
        if let Some((key, _)) = given
            .iter()
            .find(|(_, v)| v.is_some_and(|v| v.trim().is_empty()))
        {
            return Err(ConfigError::new(
                format!("{options_key}.{key}"),
                "is empty: give a value, or leave the key unset (the environment's AWS_* \
                 settings or the role's credentials are then used)",
            ));
        }
    }
    if s3 && (opts.part_size_mib < 5 || opts.part_size_mib > 5 * 1024) {
        return Err(ConfigError::new(
            format!("{options_key}.part_size_mib"),
            format!(
                "{} is outside what S3 allows (5 to 5120)",
                opts.part_size_mib
            ),
        ));
    }
    if s3 && opts.part_memory_mib == 0 {
        return Err(ConfigError::new(
            format!("{options_key}.part_memory_mib"),
            "is 0: no part could ever be read; give at least one part's MiB (part_size_mib)",
        ));
    }
    // The endpoint as the client takes it: configured, else the environment's.
    let env_value = |var: &str| std::env::var(var).ok().filter(|v| !v.trim().is_empty());
    // (Both of the environment's, where both are set: the client takes one of them.)
    let endpoints: Vec<(String, String)> = match &opts.endpoint {
        Some(e) => vec![(format!("{options_key}.endpoint"), e.clone())],
        None => ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
            .into_iter()
            .filter_map(|var| Some((var.to_string(), env_value(var)?)))
            .collect(),
    };
    // As object_store reads the flag.
    let allow_http = opts.allow_http
        || std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| {
            ["1", "true", "on", "yes", "y"]
                .iter()
                .any(|t| v.eq_ignore_ascii_case(t))
        });
    let bucket = url
        .and_then(|u| u.strip_prefix("s3://"))
        .and_then(|r| r.split('/').next())
        .unwrap_or_default();
    for (key, e) in endpoints.iter().filter(|_| s3) {
        // Not echoed: an endpoint with credentials in it would print them.
        let why = match url::Url::parse(e) {
            Err(err) => Some(format!("not a URL ({err})")),
            Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                Some(format!("scheme `{}`: use http:// or https://", u.scheme()))
            }
            Ok(u) if !u.username().is_empty() || u.password().is_some() => Some(
                "credentials belong in access_key_id and secret_access_key, not the URL".into(),
            ),
            Ok(u) if u.scheme() == "http" && !allow_http => Some(format!(
                "an http:// endpoint needs {options_key}.allow_http = true (every request \
                 would be refused)"
            )),
            // With virtual-hosted-style requests the endpoint is the bucket's own host:
            // one without the bucket's name sent every request to whatever bucket the
            // key's first folder names.
            Ok(u)
                if opts.virtual_hosted_style
                    && !bucket.is_empty()
                    && !names_the_bucket(&u, bucket) =>
            {
                Some(format!(
                    "with {options_key}.virtual_hosted_style = true the endpoint leads to the \
                     bucket itself (https://{bucket}.<the store's host>, or \
                     https://<host>/{bucket}); `{}` names neither — name it so, or set \
                     virtual_hosted_style = false for path-style requests",
                    u.host_str().unwrap_or_default()
                ))
            }
            Ok(_) => None,
        };
        if let Some(why) = why {
            return Err(ConfigError::new(key.as_str(), why));
        }
    }
    // Both given, the file's silently won: the one written inline was not the one used.
    if s3 && opts.secret_access_key.is_some() && opts.secret_access_key_file.is_some() {
        return Err(ConfigError::new(
            format!("{options_key}.secret_access_key_file"),
            "set either secret_access_key or secret_access_key_file, not both",
        ));
    }
    if let Some(f) = &opts.secret_access_key_file
        && s3
    {
        let why = match std::fs::read_to_string(f) {
            Err(e) => Some(format!(
                "cannot read {}: {e}",
                framework::config::secret_path_shown(f)
            )),
            // Every request would be signed with an empty secret and refused (403).
            Ok(s) if s.trim().is_empty() => Some(format!("{} is empty", f.display())),
            Ok(_) => None,
        };
        if let Some(why) = why {
            return Err(ConfigError::new(
                format!("{options_key}.secret_access_key_file"),
                why,
            ));
        }
    }
    // A key id without its secret (or the reverse), counting the environment's: the
    // client refuses to build at start (exit 1, "Missing SecretAccessKey"), after
    // `check-config` said the configuration was fine.
    if s3 {
        let env_set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
        let has_id = opts.access_key_id.as_deref().is_some_and(|k| !k.is_empty())
            || env_set("AWS_ACCESS_KEY_ID");
        let has_secret = opts.secret_access_key.is_some()
            || opts.secret_access_key_file.is_some()
            || env_set("AWS_SECRET_ACCESS_KEY");
        let missing = match (has_id, has_secret) {
            (true, false) => Some(("secret_access_key", "access_key_id")),
            (false, true) => Some(("access_key_id", "secret_access_key")),
            _ => None,
        };
        if let Some((missing, given)) = missing {
            return Err(ConfigError::new(
                format!("{options_key}.{missing}"),
                format!(
                    "is not set while {given} is (here or as AWS_{}): set both, or neither \
                     for the environment's role or instance credentials",
                    given.to_ascii_uppercase()
                ),
            ));
        }
    }
    let Some(url) = url else {
        return Ok(());
    };
    let bad = |why: &str| Err(ConfigError::new(url_key, format!("`{url}`: {why}")));
    if let Some(rest) = url.strip_prefix("s3://") {
        if rest.split('/').next().is_none_or(str::is_empty) {
            return bad("no bucket name (s3://bucket/prefix)");
        }
        return Ok(());
    }
    let dir = url.strip_prefix("file://").unwrap_or(url);
    // `s3:/x` or `S3://x` is a mistyped URL, not a directory to create and fill (a
    // directory such as `vol1:archive` is fine).
    let scheme_like = dir.contains(":/");
    if dir.is_empty() || url.contains("://") && !url.starts_with("file://") || scheme_like {
        return bad("not a store URL (use s3://bucket/prefix, file:///dir or a directory path)");
    }
    // Only the default store directory is created: a configured one that is missing (an
    // unmounted share) would be filled on the root disk, then hidden by the mount.
    if !Path::new(dir).is_dir() {
        return bad(
            "no such directory (an unmounted share?): create it, or leave the key unset for \
             the default under data_dir",
        );
    }
    Ok(())
}

/// Opens `url`: `s3://bucket[/prefix]`, `file:///dir` or a plain directory path.
pub fn open(url: &str, opts: &StoreOptions) -> Result<Tier, StoreConfigError> {
    if let Some(rest) = url.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreConfigError::Url(format!("`{url}` has no bucket name")));
        }
        // The environment's AWS_REGION / AWS_DEFAULT_REGION and AWS_ALLOW_HTTP (read by
        // `from_env`) stand unless the configuration says otherwise: on EKS or ECS the
        // region comes from there, and overriding it with us-east-1 failed every copy to
        // a bucket elsewhere.
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(r) = &opts.region {
            b = b.with_region(r.clone());
        }
        if opts.allow_http {
            b = b.with_allow_http(true);
        }
        let mut b = b
            .with_virtual_hosted_style_request(opts.virtual_hosted_style)
            .with_retry(object_store::RetryConfig {
                max_retries: opts.max_retries,
                retry_timeout: Duration::from_millis(opts.retry_timeout_ms),
                ..Default::default()
            })
            // A request's time grows with what it sends (a large part, a completion):
            // object_store's one fixed bound failed every large part on a slower link.
            .with_http_connector(crate::request_time::SizedLimits {
                base: crate::request_time::BASE,
            });
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e);
        }
        // Trimmed as a key file's is: a secret made from a file (Kubernetes
        // `--from-file`) ends with a newline, and every request signed with it was refused
        // (403), retried as an outage for a day.
        if let Some(k) = &opts.access_key_id {
            b = b.with_access_key_id(k.trim());
        }
        if let Some(s) = &opts.secret_access_key {
            b = b.with_secret_access_key(s.expose().trim());
        }
        if let Some(f) = &opts.secret_access_key_file {
            let s = std::fs::read_to_string(f).map_err(|e| {
                StoreConfigError::SecretFile(framework::config::secret_path_shown(f), e)
            })?;
            b = b.with_secret_access_key(s.trim());
        }
        if opts.part_size_mib < 5 || opts.part_size_mib > 5 * 1024 {
            return Err(StoreConfigError::Url(format!(
                "part_size_mib {} is outside what S3 allows (5 to 5120)",
                opts.part_size_mib
            )));
        }
        // Every upload carries its SHA-256 (x-amz-checksum-sha256), which S3 checks on
        // receipt and keeps as the object's ChecksumSHA256: verification and redeliveries
        // then compare checksums instead of downloading the object again.
        if opts.checksums {
            b = b.with_checksum_algorithm(Checksum::SHA256);
        }
        b = b.with_conditional_put(if opts.conditional_writes {
            S3ConditionalPut::ETagMatch
        } else {
            S3ConditionalPut::Disabled
        });
        let cfg = |k| b.get_config_value(&k);
        let native_endpoint = cfg(object_store::aws::AmazonS3ConfigKey::Endpoint);
        let region =
            cfg(object_store::aws::AmazonS3ConfigKey::Region).unwrap_or_else(|| "us-east-1".into());
        let store = Arc::new(b.build()?);
        let s3 = crate::s3::S3Native::new(
            native_endpoint.as_deref(),
            bucket,
            &region,
            store.credentials().clone(),
            opts,
        )?;
        // Named by the endpoint the client sends to, configured or the environment's
        // (`AWS_ENDPOINT_URL`): the configured key alone named a MinIO set in the
        // environment "aws", and two such stores of one bucket name one store.
        let endpoint = native_endpoint
            .as_deref()
            .map_or("aws".into(), without_userinfo);
        Ok(Tier {
            store: store.clone(),
            prefix: prefix.trim_matches('/').to_string(),
            display: format!("{url} ({endpoint})"),
            identity: s3_identity(bucket, prefix, native_endpoint.as_deref()),
            supports_metadata: true,
            local_dir: None,
            min_part: opts.part_size_mib * 1024 * 1024,
            multipart: Some(store),
            s3: Some(Arc::new(s3)),
            part_budget: crate::part_budget::PartBudget::new(opts.part_memory_mib),
            create_only: opts.conditional_writes,
            local_mount: None,
            read_back: false,
        })
    } else {
        let dir = url.strip_prefix("file://").unwrap_or(url);
        if dir.is_empty() || url.contains("://") && !url.starts_with("file://") {
            return Err(StoreConfigError::Url(format!(
                "unsupported store URL `{url}` (use s3://bucket/prefix or a directory)"
            )));
        }
        local(Path::new(dir))
    }
}

/// Which S3 store `bucket`/`prefix` is: on AWS (no endpoint) a bucket's name is its
/// own; on another service the same name may be another bucket, so its endpoint (scheme,
/// host and port) is part of it.
fn s3_identity(bucket: &str, prefix: &str, endpoint: Option<&str>) -> String {
    let at = match prefix.trim_matches('/') {
        "" => format!("s3://{bucket}"),
        p => format!("s3://{bucket}/{p}"),
    };
    match endpoint.and_then(|e| url::Url::parse(e).ok()) {
        Some(u) => format!(
            "{at} at {}://{}{}",
            u.scheme(),
            u.host_str().unwrap_or_default().to_ascii_lowercase(),
            u.port().map(|p| format!(":{p}")).unwrap_or_default()
        ),
        None => at,
    }
}

/// `endpoint` without any user or password written in it: it names the store in every
/// success message.
fn without_userinfo(endpoint: &str) -> String {
    match url::Url::parse(endpoint) {
        Ok(mut u) if u.has_authority() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string().trim_end_matches('/').to_string()
        }
        _ => endpoint.to_string(),
    }
}

/// A store in a local directory (created if missing).
pub fn local(dir: &Path) -> Result<Tier, StoreConfigError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreConfigError::Dir(dir.display().to_string(), e))?;
    let store = LocalFileSystem::new_with_prefix(dir)?;
    let canonical = dir
        .canonicalize()
        .map_err(|e| StoreConfigError::Dir(dir.display().to_string(), e))?;
    // Made (or not) just now: the path to the store survives a power loss with its copies.
    crate::dir_sync::flush_all_ancestors(&canonical);
    Ok(Tier {
        store: Arc::new(store),
        prefix: String::new(),
        display: format!("file://{}", dir.display()),
        identity: format!("file://{}", canonical.display()),
        supports_metadata: false,
        local_mount: Some(Arc::new(crate::mounts::StoreMount::new(canonical.clone()))),
        local_dir: Some(canonical),
        min_part: default_part_size_mib() * 1024 * 1024,
        multipart: None,
        s3: None,
        part_budget: crate::part_budget::PartBudget::new(default_part_memory_mib()),
        create_only: false,
        read_back: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_uploads_are_create_only_unless_the_store_refuses_it() {
        let opts: StoreOptions =
            serde_json::from_str(r#"{"endpoint": "http://127.0.0.1:1"}"#).unwrap();
        assert!(opts.conditional_writes, "on by default");
        assert!(open("s3://b/p", &opts).unwrap().create_only);
        let off: StoreOptions = serde_json::from_str(r#"{"conditional_writes": false}"#).unwrap();
        assert!(!open("s3://b/p", &off).unwrap().create_only);
    }

    /// With virtual-hosted-style requests object_store takes the endpoint as the bucket's
    /// own host: one without the bucket in it sent every request to the bucket the key's
    /// first folder named. Refused at start, naming the key; the bucket's host passes.
    #[test]
    fn a_virtual_hosted_endpoint_must_name_the_bucket() {
        let check = |endpoint: &str, virtual_hosted: bool| {
            let opts: StoreOptions = serde_json::from_value(serde_json::json!({
                "endpoint": endpoint,
                "virtual_hosted_style": virtual_hosted,
            }))
            .unwrap();
            check_settings("archive_url", Some("s3://archive/online"), "store", &opts)
        };
        let e = check("https://s3.example.com", true).expect_err("no bucket in the host");
        assert!(e.to_string().contains("store.endpoint"), "{e}");
        assert!(e.to_string().contains("archive."), "{e}");
        check("https://archive.s3.example.com", true).expect("the bucket's host");
        check("https://archive", true).expect("the bucket as a host");
        check("https://s3.example.com/archive", true).expect("path-style written out");
        check("https://s3.example.com/other", true).expect_err("another bucket's path");
        check("https://s3.example.com", false).expect("path-style");
    }

    /// An S3 option set to nothing (`…_OPTIONS__SECRET_ACCESS_KEY=`) is refused naming it:
    /// taken as set, requests were signed with an empty secret, or sent to
    /// `https://s3..amazonaws.com` for an empty region.
    #[test]
    fn an_empty_s3_credential_or_region_is_refused() {
        for key in ["access_key_id", "secret_access_key", "region"] {
            for empty in ["", "  "] {
                let mut given = serde_json::json!({
                    "access_key_id": "AKIA",
                    "secret_access_key": "s3cret",
                    "region": "eu-west-1",
                });
                given[key] = serde_json::json!(empty);
                let opts: StoreOptions = serde_json::from_value(given).unwrap();
                let e = check_settings("archive_url", Some("s3://archive/p"), "store", &opts)
                    .expect_err(key);
                assert_eq!(e.key, format!("store.{key}"), "{e}");
                // A directory store's unused options are not checked.
                let region_only = StoreOptions {
                    region: Some(empty.into()),
                    ..StoreOptions::default()
                };
                check_settings("archive_url", None, "store", &region_only).expect("local");
            }
        }
    }

    /// A secret given inline and in a file is refused naming the file's key: the file's
    /// silently replaced the inline one.
    #[test]
    fn a_secret_given_inline_and_in_a_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, "from-file\n").unwrap();
        let opts: StoreOptions = serde_json::from_value(serde_json::json!({
            "access_key_id": "AKIA",
            "secret_access_key": "inline",
            "secret_access_key_file": file,
        }))
        .unwrap();
        let e = check_settings("archive_url", Some("s3://archive/p"), "store", &opts)
            .expect_err("both");
        assert_eq!(e.key, "store.secret_access_key_file", "{e}");
    }

    /// Where to reach an S3 store or how to sign in to one, given with the store's URL
    /// unset or a directory, is refused naming the URL: the files went to a directory on
    /// the container's volume and were reported copied.
    #[test]
    fn s3_options_for_a_directory_store_are_refused() {
        for (key, value) in [
            ("endpoint", serde_json::json!("https://s3:9000")),
            ("access_key_id", serde_json::json!("AKIA")),
            ("secret_access_key", serde_json::json!("s3cret")),
            (
                "secret_access_key_file",
                serde_json::json!("/run/secrets/s3"),
            ),
        ] {
            let opts: StoreOptions =
                serde_json::from_value(serde_json::json!({ key: value })).unwrap();
            for url in [None, Some("/srv/archive")] {
                let e = check_settings("archive_url", url, "store", &opts).expect_err(key);
                assert_eq!(e.key, "archive_url", "{e}");
                assert!(e.to_string().contains(&format!("store.{key}")), "{e}");
            }
        }
        let s3: StoreOptions = serde_json::from_value(serde_json::json!({
            "endpoint": "https://s3:9000", "access_key_id": "AKIA", "secret_access_key": "s3cret",
        }))
        .unwrap();
        check_settings("archive_url", Some("s3://archive/p"), "store", &s3).expect("S3");
        // Options that change nothing but an S3 store's behaviour are harmless beside a
        // directory (one shared file may set them for both kinds).
        let tuning: StoreOptions =
            serde_json::from_str(r#"{"region": "eu-west-1", "part_size_mib": 64}"#).unwrap();
        check_settings("archive_url", None, "store", &tuning).expect("tuning only");
    }

    /// `check-config` prints a local store's unused options too: an endpoint holding
    /// credentials is shown without them.
    #[test]
    fn an_endpoints_credentials_are_never_shown() {
        let opts: StoreOptions =
            serde_json::from_str(r#"{"endpoint": "https://AKIA:s3cret@minio:9000"}"#).unwrap();
        let shown = serde_json::to_string(&opts).unwrap();
        assert!(
            !shown.contains("s3cret") && shown.contains("minio"),
            "{shown}"
        );
    }

    /// Set in the child process of the test below, whose environment names the endpoint.
    const ENDPOINT_FROM_ENV: &str = "STORAGETIER_TEST_ENDPOINT_FROM_ENV";

    /// An endpoint given by the environment (`AWS_ENDPOINT_URL`) names the store as the
    /// same endpoint configured does: in the success message (`archive_store`, which said
    /// "aws") and in the identity that keeps two stores' records apart (two MinIOs of one
    /// bucket name were one store). Run in a child process: the environment is the
    /// process's.
    #[test]
    fn an_endpoint_from_the_environment_names_the_store() {
        let configured: StoreOptions =
            serde_json::from_str(r#"{"endpoint": "http://AKIA:s3cret@127.0.0.1:1"}"#).unwrap();
        let by_key = open("s3://b/p", &configured).expect("configured endpoint");
        assert_eq!(by_key.display, "s3://b/p (http://127.0.0.1:1)");
        assert_eq!(by_key.identity, "s3://b/p at http://127.0.0.1:1");
        if std::env::var_os(ENDPOINT_FROM_ENV).is_none() {
            use framework::testing::process::RunWithin;
            let exe = std::env::current_exe().expect("own test binary");
            let out = std::process::Command::new(exe)
                .args([
                    "--exact",
                    "store::tests::an_endpoint_from_the_environment_names_the_store",
                    "--test-threads=1",
                ])
                .env(ENDPOINT_FROM_ENV, "1")
                .env("AWS_ENDPOINT_URL", "http://AKIA:s3cret@127.0.0.1:1")
                .env_remove("AWS_ENDPOINT")
                .output_within(framework::testing::WAIT)
                .expect("the child test runs");
            assert!(
                out.status.success() && String::from_utf8_lossy(&out.stdout).contains("1 passed"),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        let by_env = open("s3://b/p", &StoreOptions::default()).expect("endpoint from env");
        assert_eq!(by_env.display, by_key.display);
        assert_eq!(by_env.identity, by_key.identity);
    }

    /// A file name with a control character (macOS's `Icon\r`) changes its own segment
    /// only: its siblings' directory and the store's prefix keep their spelling.
    #[test]
    fn only_the_segment_holding_a_control_character_is_encoded() {
        let icon = object_path("pre~x/Project [2024]/#1/Icon\r");
        assert_eq!(icon.as_ref(), "pre~x/Project [2024]/#1/Icon%0D");
        let sibling = object_path("pre~x/Project [2024]/#1/a.mov");
        assert_eq!(sibling.as_ref(), "pre~x/Project [2024]/#1/a.mov");
        // `%` in that segment is encoded too, so `a%b\t` and `a%25b\t` stay apart.
        assert_eq!(object_path("d/a%b\t").as_ref(), "d/a%25b%09");
        assert_eq!(object_path("d/a%25b\t").as_ref(), "d/a%2525b%09");
        // A recorded key read back is the same key.
        assert_eq!(object_path(icon.as_ref()), icon);
        // Nothing else changes: a clean key is kept as written.
        assert_eq!(object_path("take~1/a b%.mov").as_ref(), "take~1/a b%.mov");
    }

    const DIGEST: &str = "0123456789abcdef0123456789abcdef";

    /// A sibling's name fits a local store's filesystem and the whole key S3's limit,
    /// cut at a character boundary; one that fits already keeps its spelling.
    #[test]
    fn a_sibling_key_fits_every_store() {
        let short = sibling_key(&object_path("d/a.mov"), DIGEST, false, usize::MAX);
        assert_eq!(short.as_ref(), "d/a.mov.0123456789abcdef");
        let exact = format!("d/{}", "n".repeat(MAX_NAME - 17));
        let kept = sibling_key(&object_path(&exact), DIGEST, false, usize::MAX);
        assert_eq!(kept.as_ref(), format!("{exact}.0123456789abcdef"));

        let cjk = format!("long3/{}.mo", "映".repeat(83));
        let key = sibling_key(&object_path(&cjk), DIGEST, false, usize::MAX);
        let name = key.as_ref().rsplit('/').next().expect("a name");
        assert_eq!(name, format!("{}.0123456789abcdef", "映".repeat(79)));
        assert_eq!(
            key,
            sibling_key(&object_path(&cjk), DIGEST, false, usize::MAX)
        );

        let dirs = (0..4)
            .map(|_| "d".repeat(250))
            .collect::<Vec<_>>()
            .join("/");
        let near = object_path(&format!("{dirs}/take-one.mov"));
        let s3 = sibling_key(&near, DIGEST, false, 1024);
        assert_eq!(s3.as_ref(), format!("{dirs}/tak.0123456789abcdef"));
        // No room for a single character of the name: left for the store to refuse.
        let deep = (0..4)
            .map(|_| "d".repeat(253))
            .collect::<Vec<_>>()
            .join("/");
        let full = object_path(&format!("{deep}/x.mov"));
        let refused = sibling_key(&full, DIGEST, false, 1024);
        assert_eq!(refused.as_ref(), format!("{full}.0123456789abcdef"));
    }

    /// A cut never leaves half of a `%XX` escape, which would read as another name.
    #[test]
    fn a_shortened_name_keeps_its_escapes_whole() {
        for pad in 0..3 {
            let base = format!("{}{}", "a".repeat(236 + pad), "%0D".repeat(4));
            let name = fit_name(&base, "0123456789abcdef", MAX_NAME).expect("fits");
            assert!(name.len() <= MAX_NAME, "{name}");
            let kept = name.strip_suffix(".0123456789abcdef").expect("tagged");
            assert!(!kept.ends_with('%') && !kept.contains("%0."), "{kept}");
            assert!(
                kept.trim_end_matches("%0D").chars().all(|c| c == 'a'),
                "{kept}"
            );
        }
        assert_eq!(fit_name("abc", "0123456789abcdef", 17), None);
    }

    /// A name that fits its source's filesystem but not once encoded is shortened and
    /// tagged with the digest of its whole encoding: two such names stay apart, the key
    /// is the same every time and read back unchanged.
    #[test]
    fn an_encoding_too_long_for_a_name_is_shortened() {
        let seven = object_path(&format!("p/{}{}.mov", "c".repeat(240), "\r".repeat(7)));
        let eight = object_path(&format!("p/{}{}.mov", "c".repeat(240), "\r".repeat(8)));
        for key in [&seven, &eight] {
            let name = key.as_ref().strip_prefix("p/").expect("in p");
            assert!(name.len() <= MAX_NAME, "{name}");
            assert!(name.starts_with(&"c".repeat(238)), "{name}");
            assert_eq!(object_path(key.as_ref()), *key);
        }
        assert_ne!(seven, eight);
        assert_eq!(
            seven,
            object_path(&format!("p/{}{}.mov", "c".repeat(240), "\r".repeat(7)))
        );
        // A name no local store could hold anyway keeps the key S3 stores hold it under.
        let long = format!("p/{}\r", "c".repeat(300));
        assert_eq!(
            object_path(&long).as_ref(),
            format!("p/{}%0D", "c".repeat(300))
        );
        // An encoding that fits is not touched.
        let fits = format!("p/{}\r.mov", "c".repeat(240));
        assert_eq!(
            object_path(&fits).as_ref(),
            format!("p/{}%0D.mov", "c".repeat(240))
        );
    }
}

//! The processor both storage services run, parameterised by tier policy and the shape
//! of the success message.

use std::path::PathBuf;
use std::time::Duration;

use framework::{BoxError, MessageContext, MessageProcessor, Outcome, async_trait};

use crate::message::AssetSweeperFile;
use crate::overlap::TierKeys;
use crate::records::{ForeignOwner, Records};
use crate::store::{self, StoreOptions};
use crate::tier::{CopyReport, TierCopier, TierError, TierOutcome, TierPolicy};

/// Where a tier reads from and writes to, as configured.
#[derive(Debug, Clone)]
pub struct TierSetup {
    /// Online roots (empty = `<data_dir>/online`).
    pub online_roots: Vec<PathBuf>,
    /// Store URL (None = `<data_dir>/<default_dir>`).
    pub store_url: Option<String>,
    /// S3 options.
    pub store_options: StoreOptions,
    /// Database URL (None = SQLite under the data dir).
    pub database_url: Option<db::DatabaseUrl>,
    /// A file holding the PostgreSQL password (a mounted secret).
    pub database_password_file: Option<PathBuf>,
    /// A recorded multipart upload with no part stored for this long is aborted.
    pub abort_abandoned_uploads_after: std::time::Duration,
    /// Failure records older than this are deleted (None: kept).
    pub keep_failures: Option<Duration>,
}

impl TierSetup {
    /// The online roots in effect, and whether they are the default (the only one that
    /// may be created: a configured root that is missing is an unmounted share).
    fn roots(&self, data_dir: &std::path::Path) -> (Vec<PathBuf>, bool) {
        if self.online_roots.is_empty() {
            (vec![data_dir.join("online")], true)
        } else {
            (self.online_roots.clone(), false)
        }
    }

    /// Refuses a configured `data_dir` that does not exist where the store or the online
    /// root defaults under it (`section`'s keys named); the database's is checked with
    /// its keys ([`db::DatabaseKeys::check`]).
    fn check_data_dir(
        &self,
        section: &str,
        store_key: &str,
        data_dir: &std::path::Path,
    ) -> Result<(), framework::config::ConfigError> {
        if self.store_url.is_none() {
            framework::config::check_data_dir(
                data_dir,
                &format!("the store ({section}.{store_key})"),
            )?;
        }
        if self.online_roots.is_empty() {
            framework::config::check_data_dir(
                data_dir,
                &format!("the online root ({section}.online_roots)"),
            )?;
        }
        Ok(())
    }

    /// Checks this setup of `own`'s tier (the service `service`) as `cfg` configures it,
    /// beside `other`'s tier configured by the same files: the whole of a tier's `validate`.
    pub fn validate<S>(
        &self,
        service: &str,
        own: TierKeys,
        other: TierKeys,
        cfg: &framework::config::Config<S>,
    ) -> Result<(), framework::config::ConfigError> {
        let key = |name: &str| format!("{}.{name}", own.section);
        let data_dir = &cfg.storage.data_dir;
        store::check_settings(
            &key(own.store),
            self.store_url.as_deref(),
            &key(own.options),
            &self.store_options,
        )?;
        check_abandoned_age(
            &key("abort_abandoned_uploads_after_ms"),
            u64::try_from(self.abort_abandoned_uploads_after.as_millis()).unwrap_or(u64::MAX),
            self.store_url.as_deref(),
            &cfg.retry,
        )?;
        self.check_data_dir(own.section, own.store, data_dir)?;
        self.database_keys(service, data_dir).check(own.section)?;
        crate::paths::check_configured_roots(&key("online_roots"), &self.online_roots)?;
        // A local store that is an online root: refused by `check-config` too, not first
        // at start (a deployment gated on `check-config` crash-looped).
        if let Some(url) = self
            .store_url
            .as_deref()
            .filter(|u| !u.starts_with("s3://"))
            && let Ok(store) = std::fs::canonicalize(url.strip_prefix("file://").unwrap_or(url))
            && let Some(root) = self
                .online_roots
                .iter()
                .find(|r| std::fs::canonicalize(r).is_ok_and(|r| r == store))
        {
            return Err(framework::config::ConfigError::new(
                key(own.store),
                format!(
                    "the store {url} is the online root {}: its files would be taken for \
                     their own copies; give the store a directory of its own",
                    root.display()
                ),
            ));
        }
        crate::overlap::check_apart(
            own,
            self.store_url.as_deref(),
            self.store_options.endpoint.as_deref(),
            other,
            &cfg.others,
            data_dir,
        )
    }

    /// The database keys of this setup for `service` under `data_dir`.
    fn database_keys<'a>(
        &'a self,
        service: &'a str,
        data_dir: &'a std::path::Path,
    ) -> db::DatabaseKeys<'a> {
        db::DatabaseKeys {
            url: self.database_url.as_ref(),
            password_file: self.database_password_file.as_deref(),
            data_dir,
            service,
        }
    }

    /// Where this setup leads under `data_dir` for `service` (`check-config`'s
    /// `resolved`): roots, store and database (password redacted).
    pub fn resolved(
        &self,
        service: &str,
        data_dir: &std::path::Path,
        default_store_dir: &str,
    ) -> serde_json::Value {
        let store = match &self.store_url {
            Some(u) => u.clone(),
            None => data_dir.join(default_store_dir).display().to_string(),
        };
        let url = db::DatabaseUrl::resolve(self.database_url.as_ref(), data_dir, service);
        serde_json::json!({
            "online_roots": self.roots(data_dir).0,
            "store": store,
            "database_url": db::redact_url(&url),
        })
    }
}

/// Default of `[<service>] abort_abandoned_uploads_after_ms`: a day (a live upload stores
/// a part every few seconds; one untouched for a day belongs to a copy given up).
pub fn default_abort_abandoned_uploads_after_ms() -> u64 {
    24 * 60 * 60 * 1000
}

/// Refuses an `abort_abandoned_uploads_after_ms` (at `key`) that a copy waiting in a retry
/// tier could outlive: its upload would be aborted between two attempts, and a large file
/// would start over at every one. At least twice the longest of `[retry] delays_ms`.
pub fn check_abandoned_age(
    key: &str,
    ms: u64,
    store_url: Option<&str>,
    retry: &framework::config::RetryConfig,
) -> Result<(), framework::config::ConfigError> {
    // Only an S3 store makes multipart uploads.
    if !store_url.is_some_and(|u| u.starts_with("s3://")) {
        return Ok(());
    }
    let longest = retry.delays_ms.iter().copied().max().unwrap_or(0);
    let least = longest.saturating_mul(2).max(1);
    if ms < least {
        return Err(framework::config::ConfigError::new(
            key,
            format!(
                "{ms} ms would abort uploads whose copies wait in a retry tier (up to \
                 {longest} ms, `retry.delays_ms`); at least {least}"
            ),
        ));
    }
    Ok(())
}

/// Default of `[<service>] keep_failures_days`: a month of failed attempts to look back on.
pub fn default_keep_failures_days() -> u64 {
    30
}

/// `keep_failures_days` as an age (0: keep every record).
pub fn keep_failures(days: u64) -> Option<Duration> {
    (days > 0).then(|| {
        Duration::from_secs(86_400).saturating_mul(u32::try_from(days).unwrap_or(u32::MAX))
    })
}

/// The binding of both storage tiers: every file event of the asset sweeper's importer.
pub const SWEEPER_FILE_EVENTS: &str = "assetsweeper.asset_folder_importer.file.#";

/// The last segment of the routing keys whose files are copied (the asset sweeper's
/// `…file.new` and `…file.update`); its other file events are dropped.
pub const COPIED_EVENTS: [&str; 2] = ["new", "update"];

/// How often old failure records are looked for.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// What sets one storage tier service apart from the other (online-archive,
/// online-nearline): names, keys, policy and success message. [`TierService`] is the rest
/// of the service, written once for both.
pub trait TierKind: Send + Sync + 'static {
    /// The binary's name (`online-archive`), also its database's owner name.
    const NAME: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// Its own tier's keys: section, store key and options table, default directory.
    const OWN: TierKeys;
    /// The other tier's keys: the two stores must stay apart.
    const OTHER: TierKeys;
    /// The routing key of its success messages.
    const OUTPUT_ROUTING_KEY: &'static str;
    /// How it copies and verifies.
    const POLICY: TierPolicy;
    /// Its section's keys.
    type Settings: serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;
    /// Where it reads from and writes to, as `settings` configure.
    fn setup(settings: &Self::Settings) -> TierSetup;
    /// The body of its success message for a copy reported as `r`.
    fn success(r: &CopyReport) -> serde_json::Value;
}

/// The storage tier service of kind `K`: asset-sweeper file events in, one verified copy
/// per file out.
pub struct TierService<K>(std::marker::PhantomData<K>);

#[async_trait]
impl<K: TierKind> framework::Service for TierService<K> {
    const NAME: &'static str = K::NAME;
    const ABOUT: &'static str = K::ABOUT;
    const SECTION: &'static str = K::OWN.section;
    type Settings = K::Settings;
    type Processor = TierProcessor;

    fn binding(_cfg: &framework::config::Config<K::Settings>) -> framework::Binding {
        framework::Binding {
            exchange: "assetsweeper".into(),
            routing_keys: vec![SWEEPER_FILE_EVENTS.into()],
            output_routing_key: K::OUTPUT_ROUTING_KEY.into(),
            ..Default::default()
        }
    }

    fn validate(
        cfg: &framework::config::Config<K::Settings>,
    ) -> Result<(), framework::config::ConfigError> {
        K::setup(&cfg.settings).validate(K::NAME, K::OWN, K::OTHER, cfg)
    }

    fn resolved(cfg: &framework::config::Config<K::Settings>) -> Option<serde_json::Value> {
        Some(K::setup(&cfg.settings).resolved(K::NAME, &cfg.storage.data_dir, K::OWN.default_dir))
    }

    async fn processor(
        cfg: &framework::config::Config<K::Settings>,
    ) -> Result<TierProcessor, BoxError> {
        TierProcessor::open(
            K::NAME,
            &cfg.storage.data_dir,
            K::OWN.default_dir,
            &K::setup(&cfg.settings),
            K::POLICY,
            K::success,
        )
        .await
    }
}

/// Builds the success message body from a report.
pub type SuccessBody = fn(&CopyReport) -> serde_json::Value;

/// Processor copying asset-sweeper files into one tier.
pub struct TierProcessor {
    copier: std::sync::Arc<TierCopier>,
    /// Background upkeep (staging or upload sweeps, pruning old failure records), ended
    /// with the processor.
    upkeep: Vec<tokio::task::JoinHandle<()>>,
    success: SuccessBody,
}

impl TierProcessor {
    /// Opens store and database per `setup` (embedded defaults under `data_dir`).
    pub async fn open(
        service: &str,
        data_dir: &std::path::Path,
        default_store_dir: &str,
        setup: &TierSetup,
        policy: TierPolicy,
        success: SuccessBody,
    ) -> Result<Self, BoxError> {
        // Only the default root is created: a configured one that is missing (an
        // unmounted share) must stop the service, not be replaced by an empty directory.
        let (roots, default) = setup.roots(data_dir);
        let mut roots = crate::paths::open_roots(&roots, default)?;
        for r in roots.iter_mut() {
            r.share = !default;
        }
        let tier = match &setup.store_url {
            Some(u) => store::open(u, &setup.store_options)?,
            None => store::local(&data_dir.join(default_store_dir))?,
        };
        let url = setup.database_keys(service, data_dir).resolve()?;
        let section = service.replace('-', "_");
        let records = Records::open(&url)
            .await
            .map_err(|e| e.at_start(&section, setup.database_password_file.is_some(), &url))?;
        match records.foreign_owner(service, &tier.identity).await? {
            None => {}
            Some(ForeignOwner::Service(other)) => {
                return Err(Box::new(framework::config::ConfigError::new(
                    format!("{section}.database_url"),
                    format!(
                        "{} holds {other}'s records: each tier needs a database of its own \
                         (their multipart uploads and claims would mix); give this one a new, \
                         empty database: it finds the copies already in its store again as \
                         files come (same size and checksum: recorded, not uploaded again)",
                        db::redact_url(&url)
                    ),
                )));
            }
            // A local store's name is its path, which may change under the same files (a
            // link repointed, a volume mounted elsewhere by another replica): said, not
            // refused. Its records hold no multipart uploads another could abort.
            Some(ForeignOwner::Store(other)) if tier.s3.is_none() => {
                tracing::warn!(
                    database = %db::redact_url(&url),
                    recorded = %other,
                    store = %tier.identity,
                    "the database holds the records of another store than this one: if it is \
                     the same store under another path, nothing is wrong; if it is another \
                     store (staging beside production), give this one a database of its own \
                     — their records of one key would overwrite each other"
                );
            }
            Some(ForeignOwner::Store(other)) => {
                return Err(Box::new(framework::config::ConfigError::new(
                    format!("{section}.database_url"),
                    format!(
                        "{} holds the records of another store, {other}, not of this one, \
                         {}: each store needs a database of its own (two deployments on one \
                         database, staging and production, would abort each other's multipart \
                         uploads and overwrite each other's records); give this one a new, \
                         empty database — or, where {} is {other} moved (the same objects \
                         under a new name), record the move in the database: UPDATE \
                         records_owner SET store = '{}'",
                        db::redact_url(&url),
                        tier.identity,
                        tier.identity,
                        tier.identity.replace('\'', "''"),
                    ),
                )));
            }
        }
        if let Some(root) = tier
            .local_dir
            .as_deref()
            .and_then(|store| roots.iter().find(|r| r.canonical == store))
        {
            // Every file would be found "already in the store" (itself) and reported as
            // copied: a success for each, and no copy anywhere.
            let store_key = [crate::overlap::ARCHIVE, crate::overlap::NEARLINE]
                .iter()
                .find(|k| k.section == section)
                .map_or("store", |k| k.store);
            return Err(Box::new(framework::config::ConfigError::new(
                format!("{section}.{store_key}"),
                format!(
                    "the store {} is the online root {}: its files would be taken for their \
                     own copies; give the store a directory of its own",
                    tier.display,
                    root.configured.display()
                ),
            )));
        }
        if let Some(root) = tier
            .local_dir
            .as_deref()
            .and_then(|store| crate::overlap::root_holding_store(store, &roots))
        {
            tracing::warn!(
                store = %tier.display,
                root = %root.display(),
                "the store and an online root hold one another: where the root holds the \
                 store, its copies are swept as new media unless the asset sweeper leaves the \
                 store out, and each is dead-lettered (never copied into the store again); \
                 where the store holds the root, a copy whose key leads into the root is \
                 swept as new media"
            );
        }
        let shown: Vec<String> = roots
            .iter()
            .map(|r| r.configured.display().to_string())
            .collect();
        tracing::info!(store = %tier.display, database = %db::redact_url(&url), roots = %shown.join(", "), "storage tier ready");
        let copier = std::sync::Arc::new(TierCopier::new(roots, tier, records, policy));
        let sweeper = match copier.tier().local_dir.clone() {
            // Copies a crash cut short, swept before the first message and then a few
            // times per staleness period (another instance's may become stale any time).
            Some(root) => {
                sweep_staging(root.clone()).await;
                Some(tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(crate::local::STALE_STAGING / 3).await;
                        sweep_staging(root.clone()).await;
                    }
                }))
            }
            None if copier.tier().multipart.is_some() => {
                let c = copier.clone();
                let age = setup.abort_abandoned_uploads_after;
                Some(tokio::spawn(async move {
                    // A few sweeps per period: an upload is aborted at most a quarter late.
                    let every = (age / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
                    loop {
                        match c.abort_abandoned_uploads(age).await {
                            Ok(0) => {}
                            Ok(n) => {
                                tracing::info!(aborted = n, "abandoned multipart uploads aborted")
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "could not sweep abandoned multipart uploads")
                            }
                        }
                        tokio::time::sleep(every).await;
                    }
                }))
            }
            None => None,
        };
        // Every failed attempt is a row: without an end, months of retries during outages
        // fill the disk the database (and, by default, the archive) shares. So is every
        // upload claim its holder never released (killed, its lease lost).
        let pruner = {
            let records = copier.records().clone();
            let keep_failures = setup.keep_failures;
            tokio::spawn(async move {
                loop {
                    if let Some(age) = keep_failures {
                        match records.prune_failures(age).await {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(removed = n, "old failure records deleted"),
                            Err(e) => {
                                tracing::warn!(error = %e, "could not delete old failure records")
                            }
                        }
                    }
                    match records.prune_expired_claims().await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(removed = n, "expired upload claims forgotten"),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not forget expired upload claims")
                        }
                    }
                    tokio::time::sleep(PRUNE_EVERY).await;
                }
            })
        };
        Ok(Self {
            copier,
            upkeep: sweeper.into_iter().chain([pruner]).collect(),
            success,
        })
    }

    /// The copier (tests).
    pub fn copier(&self) -> &TierCopier {
        &self.copier
    }
}

/// Removes the stale staging files of the local store at `root` (logged, never fatal:
/// they only cost disk).
async fn sweep_staging(root: PathBuf) {
    let shown = root.display().to_string();
    // tokio panics where it cannot start a thread (a pid limit): the next sweep tries
    // again instead of the sweeper task ending for good.
    let spawned = std::panic::catch_unwind(move || {
        tokio::task::spawn_blocking(move || crate::local::sweep_stale_staging(&root))
    });
    let Ok(sweep) = spawned else {
        tracing::warn!(store = %shown, "could not start the staging sweep (out of threads?)");
        return;
    };
    match sweep.await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => {
            tracing::info!(removed = n, store = %shown, "partial copies of interrupted uploads removed")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, store = %shown, "could not sweep the staging directory")
        }
        Err(e) => tracing::warn!(error = %e, "the staging sweep failed"),
    }
}

impl Drop for TierProcessor {
    fn drop(&mut self) {
        for task in &self.upkeep {
            task.abort();
        }
    }
}

#[async_trait]
impl MessageProcessor for TierProcessor {
    type Input = AssetSweeperFile;

    // The asset sweeper publishes other file events under the same prefix (a permissions
    // problem, say) with bodies of another shape; as the original, only a new or an
    // updated file is copied.
    // A message that reached the queue another way (published to it directly, with the
    // queue's name as its key) is a file message as before.
    fn ignores(&self, ctx: &MessageContext) -> Option<String> {
        let events = SWEEPER_FILE_EVENTS.trim_end_matches('#');
        // `…file` itself matches `file.#` too: an event without a name.
        let event = match ctx.routing_key.strip_prefix(events) {
            Some(e) => e,
            None if ctx.routing_key == events.trim_end_matches('.') => "",
            None => return None,
        };
        (!COPIED_EVENTS.contains(&event)).then(|| {
            format!(
                "routing key `{}` is not a new or updated file (`.{}`): nothing to copy",
                ctx.routing_key,
                COPIED_EVENTS.join("`, `.")
            )
        })
    }

    async fn handle(&self, msg: AssetSweeperFile, ctx: &MessageContext) -> Outcome {
        match self.copier.handle(&msg, ctx.attempt).await {
            Ok(TierOutcome::Copied(r)) => Outcome::success((self.success)(&r)),
            Ok(TierOutcome::Ignored) => {
                Outcome::drop(format!("{} is marked ignore", msg.joined_path()))
            }
            Err(TierError::Permanent(e)) => Outcome::permanent(e),
            Err(TierError::Transient(e)) => Outcome::retry(e),
            Err(TierError::Unavailable(e)) => {
                ctx.retry_for_outage();
                Outcome::retry(e)
            }
        }
    }
}

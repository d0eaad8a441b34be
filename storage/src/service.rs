//! The processor both storage services run, parameterised by tier policy and the shape
//! of the success message.

use std::path::PathBuf;

use framework::{BoxError, MessageContext, MessageProcessor, Outcome, async_trait};

use crate::message::AssetSweeperFile;
use crate::records::Records;
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
}

/// Builds the success message body from a report and the input.
pub type SuccessBody = fn(&CopyReport, &AssetSweeperFile) -> serde_json::Value;

/// Processor copying asset-sweeper files into one tier.
pub struct TierProcessor {
    copier: TierCopier,
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
        let default = setup.online_roots.is_empty();
        let roots = if default {
            vec![data_dir.join("online")]
        } else {
            setup.online_roots.clone()
        };
        let roots = crate::paths::open_roots(&roots, default)?;
        let tier = match &setup.store_url {
            Some(u) => store::open(u, &setup.store_options)?,
            None => store::local(&data_dir.join(default_store_dir))?,
        };
        let url = db::DatabaseUrl::resolve(setup.database_url.as_ref(), data_dir, service);
        let records = Records::open(&url).await?;
        tracing::info!(store = %tier.display, database = %db::redact_url(&url), roots = ?roots, "storage tier ready");
        Ok(Self {
            copier: TierCopier::new(roots, tier, records, policy),
            success,
        })
    }

    /// The copier (tests).
    pub fn copier(&self) -> &TierCopier {
        &self.copier
    }
}

#[async_trait]
impl MessageProcessor for TierProcessor {
    type Input = AssetSweeperFile;

    async fn handle(&self, msg: AssetSweeperFile, ctx: &MessageContext) -> Outcome {
        match self.copier.handle(&msg, ctx.attempt).await {
            Ok(TierOutcome::Copied(r)) => Outcome::success((self.success)(&r, &msg)),
            Ok(TierOutcome::Ignored) => {
                Outcome::drop(format!("{} is marked ignore", msg.joined_path()))
            }
            Err(TierError::Permanent(e)) => Outcome::permanent(e),
            Err(TierError::Transient(e)) => Outcome::retry(e),
        }
    }
}

//! Shared storage-tier code: resolving online paths, opening object stores, streaming
//! copies with checksums (resumable S3 multipart uploads), verification (the store's own
//! checksum on S3; a local tier is written durably and hashed as written, see [`local`])
//! and the tier's database records.
//! `online-archive` and `online-nearline` are thin services over [`tier::TierCopier`].

pub mod checksum;
pub mod copy;
pub mod dir_sync;
pub mod hashed;
pub mod local;
pub mod message;
pub mod mounts;
pub mod overlap;
pub mod part_budget;
pub mod paths;
pub mod records;
pub mod request_time;
pub mod s3;
pub mod service;
pub mod store;
pub mod stuck;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tier;

pub use checksum::Algorithm;
pub use message::AssetSweeperFile;
pub use records::Records;
pub use store::{StoreOptions, Tier};
pub use tier::{CopyReport, TierCopier, TierError, TierOutcome, TierPolicy};

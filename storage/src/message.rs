//! The asset-sweeper file message both storage tiers consume (design §7).

use serde::{Deserialize, Serialize};

/// One file seen by the asset sweeper; the file is `filepath/filename`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct AssetSweeperFile {
    /// Pluto's id for the item, if imported.
    pub imported_id: Option<String>,
    /// Size the sweeper saw, in bytes.
    pub size: u64,
    /// Skip this file (record as ignored).
    pub ignore: bool,
    /// MIME type.
    pub mime_type: String,
    /// Modification time as the sweeper saw it.
    pub mtime: String,
    /// Change time.
    pub ctime: String,
    /// Access time.
    pub atime: String,
    /// Owner uid.
    pub owner: i64,
    /// Group gid.
    pub group: i64,
    /// Directory of the file.
    pub filepath: String,
    /// File name within `filepath`.
    pub filename: String,
}

impl AssetSweeperFile {
    /// `filepath/filename` as given (not yet resolved or checked).
    pub fn joined_path(&self) -> String {
        if self.filepath.is_empty() {
            self.filename.clone()
        } else {
            format!("{}/{}", self.filepath.trim_end_matches('/'), self.filename)
        }
    }
}

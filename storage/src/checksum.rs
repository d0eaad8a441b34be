//! Streaming checksums: SHA-256 for the archive, MD5 for the nearline vault (with a
//! SHA-256 beside it: MD5 alone proves no content, colliding files are made at will).

use md5::Digest as _;
use serde::{Deserialize, Serialize};

/// Which digest a tier records and verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// SHA-256 (archive).
    Sha256,
    /// MD5 (nearline; what the vault expects).
    Md5,
}

impl Algorithm {
    /// Lower-case name used in messages and records.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Md5 => "md5",
        }
    }
    /// A fresh hasher.
    pub fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Md5 => Hasher::Md5(md5::Md5::new(), Some(sha2::Sha256::new())),
        }
    }
}

/// An incremental digest.
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// MD5 state, and SHA-256's of the same bytes (what tells two contents apart) unless
    /// [`Hasher::split`] took it to another thread.
    Md5(md5::Md5, Option<sha2::Sha256>),
}

impl Hasher {
    /// Feeds bytes.
    pub fn update(&mut self, b: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(b),
            Hasher::Md5(h, s) => {
                h.update(b);
                if let Some(s) = s {
                    s.update(b);
                }
            }
        }
    }
    /// The hasher [`Hasher::split`] split, with the SHA-256 it split off given back
    /// (fed the same bytes meanwhile).
    pub fn rejoin(self, side: Hasher) -> Hasher {
        match (self, side) {
            (Hasher::Md5(h, None), Hasher::Sha256(s)) => Hasher::Md5(h, Some(s)),
            (h, _) => h,
        }
    }
    /// Splits off the SHA-256 computed beside an MD5, to be fed the same bytes on a thread
    /// of its own: one thread computing both is a large copy's bound. The split-off
    /// hasher's digest is the SHA-256 the other's `finish` then leaves out.
    pub fn split(self) -> (Hasher, Option<Hasher>) {
        match self {
            Hasher::Md5(h, Some(s)) => (Hasher::Md5(h, None), Some(Hasher::Sha256(s))),
            h => (h, None),
        }
    }
    /// The lower-case hex digest, and the SHA-256 computed beside another algorithm's.
    pub fn finish(self) -> (String, Option<String>) {
        match self {
            Hasher::Sha256(h) => (hex::encode(h.finalize()), None),
            Hasher::Md5(h, s) => (
                hex::encode(h.finalize()),
                s.map(|s| hex::encode(s.finalize())),
            ),
        }
    }
}

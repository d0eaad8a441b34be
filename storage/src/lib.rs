//! Shared storage-tier code (work in progress).

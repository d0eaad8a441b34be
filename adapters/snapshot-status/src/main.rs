//! `snapshot-status` binary: the framework CLI plus its `status <correlation-id>` command.

use std::process::ExitCode;

fn main() -> ExitCode {
    framework::cli::main::<snapshot_status::SnapshotStatus>()
}

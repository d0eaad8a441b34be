//! `snapshot-status` binary: the framework CLI plus a `status <correlation-id>` command.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if snapshot_status::cli::is_status_command(&args) {
        return snapshot_status::cli::status_main(&args);
    }
    framework::cli::main::<snapshot_status::SnapshotStatus>()
}

//! `project-ingest` binary: Pluto project events → project/commission records.

use std::process::ExitCode;

fn main() -> ExitCode {
    framework::cli::main::<project_ingest::ProjectIngest>()
}

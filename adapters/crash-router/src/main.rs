//! `crash-router` binary: S3 raw-crash notifications → Socorro crash queues.

fn main() -> std::process::ExitCode {
    framework::cli::main::<crash_router::CrashRouterService>()
}

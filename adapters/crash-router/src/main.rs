//! `crash-router` binary: S3 raw-crash notifications → Socorro crash queues.

framework::service_main!(crash_router::CrashRouterService);

//! storagetier's bus framework: everything about RabbitMQ, written once.
//!
//! A service implements [`MessageProcessor`] (typed input, an [`Outcome`]) and
//! [`cli::Service`] (names, settings, how to build the processor); its `main.rs` is
//! `framework::service_main!(MyService);`. The framework declares the topology, consumes
//! with bounded concurrency, publishes outcomes with publisher confirms before acking,
//! retries through TTL tiers, dead-letters with a replayable envelope, recovers from
//! broker failures, drains on SIGTERM and serves metrics and health.

pub mod alarm;
pub mod batch;
pub mod channel_pool;
pub mod cli;
pub mod config;
pub mod connection;
pub mod dlq;
pub mod fields;
pub mod headers;
pub mod http;
pub mod otlp;
mod outcome;
pub mod processor;
pub mod publisher;
pub mod runtime;
mod session;
mod settler;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
pub mod trace;

pub use async_trait::async_trait;
pub use cli::{Binding, BoxError, Service};
pub use config::{Config, ConfigError, LoadOptions, Secret};
pub use fields::MAX_JSON_VALUES;
pub use lapin;
pub use processor::{
    MessageContext, MessageProcessor, Outcome, ProcessorConfiguration, Publication,
};
pub use runtime::{Runtime, Status};
pub use tokio_util::sync::CancellationToken;

/// The service binaries' global allocator (see [`service_main!`]).
pub use tikv_jemallocator::Jemalloc as ServiceAllocator;

/// A service binary's `main`: the shared command line ([`cli::main`]) on the framework's
/// allocator, jemalloc — glibc's malloc cost a service about a tenth of its CPU per message
/// (docs/benchmarks.md). `framework::service_main!(MyService);` is a whole `main.rs`.
#[macro_export]
macro_rules! service_main {
    ($service:ty) => {
        #[global_allocator]
        static GLOBAL: $crate::ServiceAllocator = $crate::ServiceAllocator;

        fn main() -> ::std::process::ExitCode {
            // SAFETY: first thing in `main`: no other thread exists yet.
            unsafe { $crate::cli::reserve_stacks() };
            $crate::cli::main::<$service>()
        }
    };
}

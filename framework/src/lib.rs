//! storagetier's bus framework: everything about RabbitMQ, written once.
//!
//! A service implements [`MessageProcessor`] (typed input, an [`Outcome`]) and
//! [`cli::Service`] (names, settings, how to build the processor); its `main` is
//! `framework::cli::main::<MyService>()`. The framework declares the topology, consumes
//! with bounded concurrency, publishes outcomes with publisher confirms before acking,
//! retries through TTL tiers, dead-letters with a replayable envelope, recovers from
//! broker failures, drains on SIGTERM and serves metrics and health.

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
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod topology;
pub mod trace;

pub use async_trait::async_trait;
pub use cli::{Binding, BoxError, Service};
pub use config::{Config, ConfigError, LoadOptions, Secret};
pub use lapin;
pub use processor::{
    MessageContext, MessageProcessor, Outcome, ProcessorConfiguration, Publication,
};
pub use runtime::{Runtime, Status};
pub use tokio_util::sync::CancellationToken;

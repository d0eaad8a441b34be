//! crash-router: routes Socorro raw-crash S3 notifications to crash queues (design §7),
//! the long-running replacement of the "pigeon" Lambda.

pub mod router;
pub mod rules;
pub mod spec;

pub use router::{CrashRouter, CrashRouterService, CrashRouterSettings};

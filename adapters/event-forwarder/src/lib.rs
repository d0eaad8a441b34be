//! event-forwarder: POSTs bus events to an HTTP endpoint (design §7), the long-running
//! replacement of the Rabble Rouser Kinesis → HTTP Lambda.

pub mod envelope;
pub mod forward;
pub mod service;

pub use service::{
    DONE_HEADER, EventForwarder, EventForwarderService, ForwarderSettings, RESUME_HEADER,
};

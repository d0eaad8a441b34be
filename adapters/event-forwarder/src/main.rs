//! `event-forwarder` binary: bus events → HTTP POST.

framework::service_main!(event_forwarder::EventForwarderService);

//! `event-forwarder` binary: bus events → HTTP POST.

fn main() -> std::process::ExitCode {
    framework::cli::main::<event_forwarder::EventForwarderService>()
}

//! event-forwarder (not implemented yet).

fn main() -> std::process::ExitCode {
    eprintln!("event-forwarder: not implemented yet");
    std::process::ExitCode::from(1)
}

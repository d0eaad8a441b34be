//! crash-router (not implemented yet).

fn main() -> std::process::ExitCode {
    eprintln!("crash-router: not implemented yet");
    std::process::ExitCode::from(1)
}

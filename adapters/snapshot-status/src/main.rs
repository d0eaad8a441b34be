//! snapshot-status (not implemented yet).

fn main() -> std::process::ExitCode {
    eprintln!("snapshot-status: not implemented yet");
    std::process::ExitCode::from(1)
}

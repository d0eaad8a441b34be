//! online-nearline (not implemented yet).

fn main() -> std::process::ExitCode {
    eprintln!("online-nearline: not implemented yet");
    std::process::ExitCode::from(1)
}

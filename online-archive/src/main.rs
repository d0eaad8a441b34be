//! online-archive (not implemented yet).

fn main() -> std::process::ExitCode {
    eprintln!("online-archive: not implemented yet");
    std::process::ExitCode::from(1)
}

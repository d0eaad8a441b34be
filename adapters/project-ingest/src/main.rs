//! project-ingest (not implemented yet).

fn main() -> std::process::ExitCode {
    eprintln!("project-ingest: not implemented yet");
    std::process::ExitCode::from(1)
}

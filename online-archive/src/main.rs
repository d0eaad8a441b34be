//! `online-archive` binary: see the library.

fn main() -> std::process::ExitCode {
    framework::cli::main::<online_archive::OnlineArchive>()
}

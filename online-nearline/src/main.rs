//! `online-nearline` binary: see the library.

fn main() -> std::process::ExitCode {
    framework::cli::main::<online_nearline::OnlineNearline>()
}

//! `online-archive` binary: see the library.

framework::service_main!(online_archive::OnlineArchive);

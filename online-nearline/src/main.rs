//! `online-nearline` binary: see the library.

framework::service_main!(online_nearline::OnlineNearline);

//! `snapshot-status` binary: the framework CLI plus its `status <correlation-id>` command.

framework::service_main!(snapshot_status::SnapshotStatus);

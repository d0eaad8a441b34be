//! `project-ingest` binary: Pluto project events → project/commission records.

framework::service_main!(project_ingest::ProjectIngest);

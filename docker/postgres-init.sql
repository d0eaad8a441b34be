-- One database per stateful service (their tables are independent).
CREATE DATABASE online_archive;
CREATE DATABASE online_nearline;
CREATE DATABASE project_ingest;
CREATE DATABASE snapshot_status;

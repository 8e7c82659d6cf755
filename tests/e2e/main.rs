//! Black-box tests: every test starts the real `storage-agent` binary and talks to it over its
//! real ports with real clients. One test binary, so the 2-core CI links once.

mod common;

mod azure;
mod backendai_manager;
mod backends;
mod bgtasks;
mod config_check;
mod container;
mod coord;
mod crash;
mod ctl;
mod dashboard;
mod download;
mod dropin;
mod filebrowser;
mod hardening;
mod hardening2;
mod layers;
mod manager_api;
mod manager_bad_input;
mod manager_payloads;
mod memory;
mod object_sessions;
mod operations;
mod quota;
mod remote_volumes;
mod s3;
mod sessions;
mod sftp;
mod tls;
mod tus;
mod tus_clients;
mod tus_concat;
mod volume_health;
mod zero_copy;

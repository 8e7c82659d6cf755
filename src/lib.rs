//! storage-agent: a Backend.AI-compatible storage proxy and a storage agent (per-user SFTP and
//! web file browser sessions) in one daemon. The binary is `src/main.rs`; this library holds
//! everything so the integration tests and benchmarks can use the same types (the generated
//! gRPC client, token claims).

/// The storage-proxy API level we are wire-compatible with, reported as `storage-proxy` in
/// status responses (our own version is reported as `storage-agent`).
pub const COMPAT_VERSION: &str = "26.9.6";
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub mod allocator;
pub mod api;
pub mod app;
pub mod bgtask;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod docker;
pub mod events;
pub mod health;
pub mod ids;
pub mod metrics;
pub mod notify;
pub mod private_file;
pub mod rpc;
pub mod session;
pub mod state;
pub mod tls;
pub mod upload;
pub mod volume;

pub mod pb {
    tonic::include_proto!("storage_agent.v1");

    /// For server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("storage_agent_descriptor");
}

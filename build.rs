// Generates the gRPC server and client from proto/ (tonic 0.14 moved prost codegen into
// tonic-prost-build). The file descriptor set feeds server reflection. protoc comes from the
// protoc-bin-vendored crate unless $PROTOC names one, so a plain `cargo build` needs nothing
// installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("storage_agent_descriptor.bin"))
        .compile_protos(&["proto/storage_agent/v1/agent.proto"], &["proto"])?;
    Ok(())
}

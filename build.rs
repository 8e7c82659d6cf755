// Generates the gRPC server and client from proto/ (tonic 0.14 moved prost codegen into
// tonic-prost-build). The file descriptor set feeds server reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("storage_agent_descriptor.bin"))
        .compile_protos(&["proto/storage_agent/v1/agent.proto"], &["proto"])?;
    Ok(())
}

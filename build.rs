//! Compiles the project's .proto files with protox (pure Rust), so that no protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/common/v2/common.proto",
        "proto/servicemanager/v5/servicemanager.proto",
        "proto/servicemanager/v5/network.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

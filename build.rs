//! Compiles the project's .proto files with protox (pure Rust), so that no protoc is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/common/v2/common.proto",
        "proto/servicemanager/v5/servicemanager.proto",
        "proto/servicemanager/v5/network.proto",
        "proto/iamanager/v6/iamanager.proto",
        "proto/common/v1/common.proto",
        "proto/communicationmanager/v3/updatescheduler.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    embed_example()?;
    Ok(())
}

/// Embeds the bundled example unit into the binary, so that `aos-cm demo` needs no files.
fn embed_example() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR")?)
        .join("examples/desired-states/fresh-install");
    let mut files = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut out = String::from(
        "/// The bundled example unit: (path relative to the scenario folder, bytes).\n",
    );
    out.push_str("pub const FILES: &[(&str, &[u8])] = &[\n");
    for f in &files {
        let rel = f.strip_prefix(&root)?.to_string_lossy().replace('\\', "/");
        out.push_str(&format!(
            "    ({rel:?}, include_bytes!({:?})),\n",
            f.display().to_string()
        ));
    }
    out.push_str("];\n");
    std::fs::write(
        std::path::Path::new(&std::env::var("OUT_DIR")?).join("example_unit.rs"),
        out,
    )?;
    println!("cargo:rerun-if-changed=examples/desired-states/fresh-install");
    Ok(())
}

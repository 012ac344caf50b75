//! Compiles `proto/` with a vendored `protoc`, so building needs no system protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [
        root.join("flex/admin/v1/admin.proto"),
        root.join("flex/control/v1/control.proto"),
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("flex_descriptor.bin"))
        // Carries a provider secret: its Debug is written by hand in `proto.rs`.
        .skip_debug(["flex.admin.v1.SetProviderKeyRequest"])
        .compile_protos(&files, &[root])?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}

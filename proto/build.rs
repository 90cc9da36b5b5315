//! Compiles every `.proto` under this folder with protox (no system `protoc`)
//! and writes the descriptor set that servers register for gRPC reflection.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it is compiled: a target
    // directory shared by two checkouts may reuse the compiled script.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir);
    let mut files = Vec::new();
    collect_protos(root, &mut files)?;
    files.sort();
    // Watch the folders, not only the files, so a new .proto is picked up.
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path.is_dir() && !path.ends_with("src") {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }

    let fds = protox::compile(&files, [root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        // Undecodable requests are INVALID_ARGUMENT, not INTERNAL (src/codec.rs).
        .codec_path("crate::codec::Codec")
        // Image bytes stay `Bytes`: decoding slices the receive buffer
        // instead of copying every chunk of a multi-GiB stream.
        .bytes(".image.v1.UploadRequest.data")
        .bytes(".image.v1.DownloadResponse.data")
        .compile_fds(fds)?;
    Ok(())
}

fn collect_protos(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() && !path.ends_with("src") && !path.ends_with("target") {
            collect_protos(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
    Ok(())
}

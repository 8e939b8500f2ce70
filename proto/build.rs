//! Compiles `portfleet/v1/*.proto` with the pure-Rust `protox` compiler, so a
//! machine without `protoc` can build, and keeps the encoded descriptor set
//! for gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &["portfleet/v1/scan.proto", "portfleet/v1/agent.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("portfleet_descriptor.bin"), fds.encode_to_vec())?;
    // Our codec: an undecodable message is INVALID_ARGUMENT, not INTERNAL
    // (src/codec.rs). The generated code is included in this crate.
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::ProtoCodec")
        .compile_fds(fds)?;
    Ok(())
}

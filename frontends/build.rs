//! Generates the Rust types for ONNX protobuf messages from the vendored
//! official `proto/onnx.proto` (onnx 1.23.2, IR version 14).
//!
//! The schema is compiled by `protox`, a pure-Rust protobuf compiler, so no
//! `protoc` binary is needed on the build machine. `prost-build` then writes
//! `onnx.rs` into `OUT_DIR`, which `src/onnx/proto.rs` includes.

use std::path::PathBuf;

fn main() {
    let proto_dir = PathBuf::from("proto");
    let proto_file = proto_dir.join("onnx.proto");
    println!("cargo:rerun-if-changed={}", proto_file.display());
    println!("cargo:rerun-if-changed=build.rs");

    let fds = match protox::compile([&proto_file], [&proto_dir]) {
        Ok(fds) => fds,
        Err(e) => panic!("protox failed to compile {}: {e}", proto_file.display()),
    };

    let mut config = prost_build::Config::new();
    // Every `bytes` field becomes `bytes::Bytes`, so that decoding a model from a
    // memory-mapped `Bytes` buffer slices `raw_data` instead of copying it: the
    // weights of a large model are never copied at load time.
    config.bytes(["."]);
    if let Err(e) = config.compile_fds(fds) {
        panic!("prost-build failed to generate code for {}: {e}", proto_file.display());
    }
}

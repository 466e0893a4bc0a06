//! Makes the appliance's binaries and tests find libtorch without `LD_LIBRARY_PATH`.
//!
//! torch-sys links against the libtorch in the project's venv (`torch/lib`) and hands us that
//! directory as `DEP_TCH_LIBTORCH_LIB`. We record it as the run-time search path, and keep
//! `libtorch_cuda` as a needed library even though no symbol of it is referenced directly:
//! without it the CUDA backend is never registered and a GPU would go unused.
//!
//! It generates the OIP gRPC service from `proto/grpc_service.proto` (tonic, with protoc), and
//! compiles two C++ shims against that libtorch's headers: `cuda/memory.cpp`, the CUDA
//! caching allocator's statistics, which tch does not expose (see `src/cuda_memory.rs`), and
//! `aoti/package.cpp`, AOTInductor packages, which tch does not load (see `src/aoti.rs`).

use std::path::{Path, PathBuf};

fn main() {
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("appliance") {
        compile_grpc_service();
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // The bench shares this script for the search path; the appliance's library brings the shim.
    if std::env::var("CARGO_PKG_NAME").as_deref() == Ok("appliance") {
        compile_cuda_memory(&lib);
        compile_aoti(&lib);
    }
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// The OIP gRPC service (server side only) from `proto/grpc_service.proto`, with protoc.
fn compile_grpc_service() {
    println!("cargo:rerun-if-changed=proto/grpc_service.proto");
    if let Err(e) = tonic_prost_build::configure()
        .build_client(false)
        // Tensor bytes as `Bytes`, sliced from the message rather than copied.
        .bytes(".")
        .compile_protos(&["proto/grpc_service.proto"], &["proto"])
    {
        panic!(
            "proto/grpc_service.proto: {e} (protoc comes with Debian's protobuf-compiler; scripts/setup.sh installs it)"
        );
    }
}

/// A C++ build against the venv's libtorch headers, with the ABI its wheel was built with.
fn libtorch_cpp(lib: &Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(lib.join("../include"))
        .include(lib.join("../include/torch/csrc/api/include"))
        // The ABI every PyPI torch wheel since 2.7 is built with (we pin 2.11).
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch's own headers trip these.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations");
    build
}

/// `aoti/package.cpp`: AOTInductor packages, which tch does not load (see `src/aoti.rs`).
fn compile_aoti(lib: &Path) {
    println!("cargo:rerun-if-changed=aoti/package.cpp");
    libtorch_cpp(lib).file("aoti/package.cpp").compile("vla_aoti");
}

fn compile_cuda_memory(lib: &Path) {
    println!("cargo:rerun-if-changed=cuda/memory.cpp");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(lib.join("../include"))
        // The ABI every PyPI torch wheel since 2.7 is built with (we pin 2.11).
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        // libtorch's own headers trip it.
        .flag_if_supported("-Wno-unused-parameter")
        .file("cuda/memory.cpp")
        .compile("vla_cuda_memory");
}

//! Makes the appliance's binaries and tests find libtorch without `LD_LIBRARY_PATH`.
//!
//! torch-sys links against the libtorch in the project's venv (`torch/lib`) and hands us that
//! directory as `DEP_TCH_LIBTORCH_LIB`. We record it as the run-time search path, and keep
//! `libtorch_cuda` as a needed library even though no symbol of it is referenced directly:
//! without it the CUDA backend is never registered and a GPU would go unused.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB").map(PathBuf::from) else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

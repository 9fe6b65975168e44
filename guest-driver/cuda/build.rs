//! Gives the shared library the soname `libcuda.so.1`, the name the CUDA
//! runtime and every driver-API client ask the dynamic loader for.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
    println!("cargo:rerun-if-changed=build.rs");
}

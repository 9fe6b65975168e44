//! What the statically linked CUDA runtime does at start-up, against the
//! emulated backend: entry points through `cuGetProcAddress_v2`, the private
//! export tables, an nvcc fatbin loaded through a fatbin wrapper with
//! `cuLibraryLoadData`, and a `CUkernel` launched with `cuLaunchKernel`.
//! The emulated backend loads a fatbin by its PTX (`vgpu_spec::fatbin`).

use std::path::PathBuf;

use vgpu_tests::{build_c_program, BackendProcess, Client, CLIENT_TIMEOUT};

const GIB: u64 = 1 << 30;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../virtio-spec/tests/fixtures")
        .join(name)
}

fn run_with(section: &str) {
    let backend = BackendProcess::spawn_emulated(GIB);
    let program = build_c_program("cudart_bootstrap_client");
    let mut cmd = backend.client(&program);
    cmd.arg(fixture(section));
    let out = Client::spawn(cmd).wait(CLIENT_TIMEOUT);
    out.assert_passed();
    assert!(
        out.passes() >= 60,
        "expected the full set of checks\n{}",
        out.transcript()
    );
}

#[test]
fn cudart_bootstrap_runs_an_nvcc_fatbin_through_a_kernel_handle() {
    run_with("vectorAdd.nv_fatbin");
}

#[test]
fn cudart_bootstrap_runs_a_compressed_nvcc_fatbin() {
    run_with("vectorAdd_c.nv_fatbin");
}

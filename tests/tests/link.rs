//! The JIT linker and cooperative launches through the driver API against
//! the emulated backend: the CUDA 5.5 entry points cuDNN resolves exist,
//! one PTX input links (in one `MODULE_LINK` request) into an image that
//! loads and launches, a PTX file links, invalid PTX fails at the link with
//! its error log, a missing file is `FILE_NOT_FOUND`, and cooperative
//! launches are sent and refused when the grid cannot be resident at once.

use vgpu_tests::{build_c_program, BackendProcess, Client, CLIENT_TIMEOUT};

const GIB: u64 = 1 << 30;

#[test]
fn linked_ptx_loads_and_launches_and_cooperative_launches_are_checked() {
    let backend = BackendProcess::spawn_emulated(GIB);
    let program = build_c_program("link_client");
    let out = Client::spawn(backend.client(&program)).wait(CLIENT_TIMEOUT);
    out.assert_passed();
    assert!(
        out.passes() >= 70,
        "expected the full set of checks\n{}",
        out.transcript()
    );
    for line in [
        "PASS dlsym(cuLinkCreate)",
        "PASS dlsym(cuLinkAddData)",
        "PASS cuLinkComplete returns an image",
        "PASS the error log is empty after a good link",
        "PASS linked scale: launch",
        "PASS cuModuleGetFunction(scale) in the linked image",
        "PASS linked scale after cuLinkDestroy: launch",
        "PASS linked from a file: cuModuleGetFunction(scale)",
        "PASS invalid PTX fails the link with INVALID_PTX",
        "PASS the error log says why",
        "PASS cuLinkAddFile of a missing file is FILE_NOT_FOUND",
        "PASS cuLinkComplete with no inputs returns CUDA_ERROR_INVALID_VALUE",
        "PASS the device supports cooperative launches",
        "PASS cuLaunchCooperativeKernel: launch",
        "PASS a cooperative grid larger than the device is COOPERATIVE_LAUNCH_TOO_LARGE",
        "PASS cuLaunchKernelEx with the cooperative attribute",
    ] {
        assert!(
            out.stdout.contains(line),
            "missing \"{line}\"\n{}",
            out.transcript()
        );
    }
}

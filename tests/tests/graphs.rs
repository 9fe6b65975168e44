//! Stream capture and CUDA graphs in the guest library, against the
//! emulated backend: a captured chain of launches, memsets and copies is
//! replayed several times with the data each launch must produce, and
//! capture misuse returns the codes native CUDA returns.

use vgpu_tests::{build_c_program, BackendProcess, Client, CLIENT_TIMEOUT};

const GIB: u64 = 1 << 30;

#[test]
fn captured_graphs_replay_and_capture_misuse_is_refused() {
    let backend = BackendProcess::spawn_emulated(GIB);
    let program = build_c_program("graph_client");
    let out = Client::spawn(backend.client(&program)).wait(CLIENT_TIMEOUT);
    out.assert_passed();
    assert!(
        out.passes() >= 150,
        "expected the full set of checks\n{}",
        out.transcript()
    );
    for line in [
        "PASS the graph has every captured node",
        "PASS capture recorded the work instead of running it",
        "PASS launch 4: pinned DtoH holds this launch's data",
        "PASS launch 4: pageable DtoH holds this launch's data",
        "PASS ending with an unjoined fork",
        "PASS ending on a forked stream is UNMATCHED",
        "PASS cuMemAlloc during a global capture",
        "PASS cooperative cuLaunchKernelEx is launched",
    ] {
        assert!(
            out.stdout.contains(line),
            "missing \"{line}\"\n{}",
            out.transcript()
        );
    }
}

//! Stream-ordered memory pools through the driver API against the emulated
//! backend: the default pool's attributes, `cuMemAllocAsync` and
//! `cuMemAllocFromPoolAsync` accounted to their pools, used memory back to 0
//! after the frees and a synchronize, and the refusals.

use vgpu_tests::{build_c_program, BackendProcess, Client, CLIENT_TIMEOUT};

const GIB: u64 = 1 << 30;

#[test]
fn memory_pools_account_stream_ordered_allocations_and_return_them_to_the_slice() {
    let backend = BackendProcess::spawn_emulated(GIB);
    let program = build_c_program("mempool_client");
    let out = Client::spawn(backend.client(&program)).wait(CLIENT_TIMEOUT);
    out.assert_passed();
    assert!(
        out.passes() >= 40,
        "expected the full set of checks\n{}",
        out.transcript()
    );
    assert!(
        out.stdout
            .contains("PASS default pool uses nothing after the frees"),
        "used memory is reported after the frees\n{}",
        out.transcript()
    );
}

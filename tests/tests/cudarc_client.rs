//! An unmodified cudarc program, with our libcuda, against the emulated
//! backend.

use std::path::Path;
use std::time::Duration;

use vgpu_tests::{mem_info, poll_until, BackendProcess, Client, CLIENT_TIMEOUT};

#[test]
fn cudarc_client_passes_against_emulated_backend() {
    let backend = BackendProcess::spawn_emulated(1 << 30);
    let program = Path::new(env!("CARGO_BIN_EXE_cudarc_client"));
    let out = Client::spawn(backend.client(program)).wait(CLIENT_TIMEOUT);
    out.assert_passed();
    assert!(
        out.passes() >= 50,
        "expected the full set of checks\n{}",
        out.transcript()
    );
    let (free, total) = poll_until(Duration::from_secs(10), "the slice to be all free", || {
        let (free, total) = mem_info(&backend);
        (free == total).then_some((free, total))
    });
    assert_eq!((free, total), (1 << 30, 1 << 30));
}

//! The C driver-API client against the emulated backend, alone and with a
//! second client on the same slice at the same time.

use std::time::Duration;

use vgpu_tests::{build_c_program, mem_info, poll_until, BackendProcess, Client, CLIENT_TIMEOUT};

const GIB: u64 = 1 << 30;

/// After every client has gone, the whole slice is free again.
fn assert_slice_is_free(backend: &BackendProcess) {
    let limit = backend.memory_limit();
    let (free, total) = poll_until(Duration::from_secs(10), "the slice to be all free", || {
        let (free, total) = mem_info(backend);
        (free == total).then_some((free, total))
    });
    assert_eq!(total, limit, "total memory is the slice limit");
    assert_eq!(free, limit);
}

#[test]
fn c_client_passes_against_emulated_backend() {
    let backend = BackendProcess::spawn_emulated(GIB);
    let program = build_c_program("driver_api_client");
    let out = Client::spawn(backend.client(&program)).wait(CLIENT_TIMEOUT);
    out.assert_passed();
    assert!(
        out.passes() >= 120,
        "expected the full set of checks\n{}",
        out.transcript()
    );
    assert!(
        out.stdout
            .contains("INFO memory: 1073741824 free of 1073741824"),
        "a lone client sees the whole slice free\n{}",
        out.transcript()
    );
    assert_slice_is_free(&backend);
}

#[test]
fn two_clients_run_concurrently() {
    let backend = BackendProcess::spawn_emulated(GIB);
    let program = build_c_program("driver_api_client");
    let spawn = || {
        let mut cmd = backend.client(&program);
        cmd.args(["--shared", "--pause"]);
        Client::spawn(cmd)
    };
    let mut first = spawn();
    let mut second = spawn();
    // Both sessions are open and hold 8 MiB each before either goes on.
    first.wait_for_line("PAUSED", Duration::from_secs(60));
    second.wait_for_line("PAUSED", Duration::from_secs(60));
    let (free, total) = mem_info(&backend);
    assert_eq!(total, GIB);
    assert!(
        free <= GIB - (16 << 20),
        "a third session sees both clients' allocations (free {free})"
    );
    first.send_line("go");
    second.send_line("go");
    let a = first.wait(CLIENT_TIMEOUT);
    let b = second.wait(CLIENT_TIMEOUT);
    a.assert_passed();
    b.assert_passed();
    assert_eq!(a.passes(), b.passes(), "both clients ran every check");
    assert!(
        a.passes() >= 120,
        "expected the full set of checks\n{}",
        a.transcript()
    );
    assert_slice_is_free(&backend);
}

#[test]
fn sessions_cannot_touch_each_others_memory() {
    let backend = BackendProcess::spawn_emulated(GIB);
    let program = build_c_program("isolation_probe");
    let mut holder = Client::spawn({
        let mut cmd = backend.client(&program);
        cmd.arg("hold");
        cmd
    });
    let line = holder.wait_for_line("PTR ", Duration::from_secs(60));
    let addr = line.trim_start_matches("PTR ").trim().to_string();

    let probe = Client::spawn({
        let mut cmd = backend.client(&program);
        cmd.args(["probe", &addr]);
        cmd
    })
    .wait(CLIENT_TIMEOUT);
    probe.assert_passed();

    holder.send_line("go");
    let held = holder.wait(CLIENT_TIMEOUT);
    held.assert_passed();
    assert!(
        held.stdout.contains("PASS the held buffer is intact"),
        "{}",
        held.transcript()
    );
    assert_slice_is_free(&backend);
}

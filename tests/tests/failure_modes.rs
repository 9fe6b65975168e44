//! What a client sees when the backend is missing, dies, or when the client
//! itself dies mid-work: errors in bounded time, never hangs, and nothing
//! left allocated.

use std::os::unix::net::UnixListener;
use std::time::Duration;

use vgpu_tests::{
    build_c_program, client_command, mem_info, poll_until, BackendProcess, Client, TempDir,
};

/// Most milliseconds a failing call may take.
const MAX_CALL_MS: u64 = 5000;
/// Generous bound on a whole failing client run (includes process start).
const CLIENT_BOUND: Duration = Duration::from_secs(20);

fn init_with_socket(socket: &std::path::Path) -> vgpu_tests::ClientOutput {
    let program = build_c_program("init_status");
    let mut cmd = client_command(&program, socket);
    cmd.args(["100", &MAX_CALL_MS.to_string()]);
    Client::spawn(cmd).wait(CLIENT_BOUND)
}

#[test]
fn missing_backend_gives_no_device_error_quickly() {
    let dir = TempDir::new("nobackend");
    let socket = dir.path().join("does-not-exist.sock");
    let out = init_with_socket(&socket);
    println!("{}", out.transcript());
    out.assert_passed();
    assert!(
        out.stdout.contains("INIT rc=100 "),
        "cuInit returned CUDA_ERROR_NO_DEVICE\n{}",
        out.transcript()
    );
    assert!(out.elapsed < CLIENT_BOUND, "took {:?}", out.elapsed);
}

#[test]
fn stale_socket_gives_no_device_error_quickly() {
    // A socket file nobody listens on any more: connect() is refused.
    let dir = TempDir::new("stalesocket");
    let socket = dir.path().join("stale.sock");
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let out = init_with_socket(&socket);
    out.assert_passed();
    assert!(out.stdout.contains("INIT rc=100 "), "{}", out.transcript());
}

#[test]
fn killed_backend_gives_device_unavailable_not_hang() {
    let mut backend = BackendProcess::spawn_emulated(256 << 20);
    let program = build_c_program("backend_loss_client");
    let mut cmd = backend.client(&program);
    cmd.arg(MAX_CALL_MS.to_string());
    let mut client = Client::spawn(cmd);
    client.wait_for_line("READY", Duration::from_secs(30));

    backend.kill();
    client.send_line("go");
    let out = client.wait(CLIENT_BOUND);
    println!("{}", out.transcript());
    out.assert_passed();
    let lost = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("PASS") && l.contains("after the backend died"))
        .count();
    assert_eq!(
        lost,
        5,
        "every call after the kill returned 46\n{}",
        out.transcript()
    );
}

#[test]
fn disconnect_mid_work_frees_everything() {
    const LIMIT: u64 = 1 << 30;
    const HOG: u64 = 512 << 20;
    let mut backend = BackendProcess::spawn_emulated(LIMIT);
    let program = build_c_program("mem_hog");
    let mut hog = Client::spawn({
        let mut cmd = backend.client(&program);
        cmd.args([HOG.to_string(), (16u64 << 20).to_string()]);
        cmd
    });
    let line = hog.wait_for_line("ALLOCATED", Duration::from_secs(60));
    assert_eq!(line, format!("ALLOCATED {HOG}"));

    // Another session sees the hog's memory as used: accounting is per slice.
    let (free, total) = mem_info(&backend);
    assert_eq!(total, LIMIT);
    assert!(
        free <= LIMIT - HOG,
        "free {free} should exclude the hog's {HOG} bytes"
    );

    // SIGKILL while copies are in flight: no SESSION_CLOSE, no frees.
    let killed = hog.kill();
    assert!(
        killed.stdout.lines().all(|l| !l.starts_with("FAIL")),
        "the hog was working normally until killed\n{}",
        killed.transcript()
    );

    let freed = poll_until(
        Duration::from_secs(10),
        "the hog's memory to be freed",
        || {
            let (free, total) = mem_info(&backend);
            (free == total).then_some(free)
        },
    );
    assert_eq!(freed, LIMIT);
    assert!(
        backend.try_wait().is_none(),
        "the backend survived the disconnect"
    );
}

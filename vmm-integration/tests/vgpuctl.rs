//! The built `vgpuctl` binary against the fake cloud-hypervisor API.

// Test helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::json;
use vgpu_vmm::cloud_hypervisor::api::MEMORY_NOT_SHARED;
use vgpu_vmm::cloud_hypervisor::fake::FakeCloudHypervisor;

// Fields drop in order: the fake and the listener before their directory.
struct Setup {
    fake: FakeCloudHypervisor,
    backend: std::path::PathBuf,
    _backend_listener: UnixListener,
    dir: tempfile::TempDir,
}

/// A fake VM API and a socket standing in for a slice's backend (attach only checks it exists).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeCloudHypervisor::start(dir.path().join("api.sock")).unwrap();
    let backend = dir.path().join("tenant-a.sock");
    let listener = UnixListener::bind(&backend).unwrap();
    Setup {
        fake,
        backend,
        _backend_listener: listener,
        dir,
    }
}

fn vgpuctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vgpuctl"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn vm_arg(api: &Path) -> String {
    format!("cloud-hypervisor:{}", api.display())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn attach_prints_id_and_bdf_and_detach_removes_the_device() {
    let s = setup();
    let vm = vm_arg(s.fake.socket());
    let backend = s.backend.to_str().unwrap();

    let out = vgpuctl(&["attach", backend, "--vm", &vm, "--id", "vgpu0"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "id=vgpu0 bdf=0000:00:06.0\n");
    let devices = s.fake.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(
        devices[0].config,
        json!({"socket": backend, "device_type": 64, "queue_sizes": [1024, 1024, 64], "id": "vgpu0"})
    );

    let out = vgpuctl(&["detach", "vgpu0", "--vm", &vm]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "detached vgpu0\n");
    assert!(s.fake.devices().is_empty());
}

#[test]
fn attach_without_id_prints_the_id_the_vm_chose() {
    let s = setup();
    let out = vgpuctl(&[
        "attach",
        s.backend.to_str().unwrap(),
        "--vm",
        &vm_arg(s.fake.socket()),
    ]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "id=_generic_vhost_user0 bdf=0000:00:06.0\n"
    );
}

#[test]
fn attach_to_a_vm_with_private_memory_fails_before_adding() {
    let s = setup();
    s.fake.set_memory_shared(false);
    let out = vgpuctl(&[
        "attach",
        s.backend.to_str().unwrap(),
        "--vm",
        &vm_arg(s.fake.socket()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), format!("vgpuctl: {MEMORY_NOT_SHARED}\n"));
    assert!(out.stdout.is_empty());
    let requests = s.fake.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].path, "/api/v1/vm.info");
}

#[test]
fn attach_reports_the_vm_error_body() {
    let s = setup();
    s.fake.fail_adds(
        500,
        r#"["The generic vhost-user device could not be added to the VM","Failed to connect"]"#,
    );
    let out = vgpuctl(&[
        "attach",
        s.backend.to_str().unwrap(),
        "--vm",
        &vm_arg(s.fake.socket()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "vgpuctl: cloud-hypervisor answered vm.add-generic-vhost-user with HTTP 500: The generic \
         vhost-user device could not be added to the VM: Failed to connect\n"
    );
}

#[test]
fn attach_of_a_slice_without_a_backend_fails_without_calling_the_vm() {
    let s = setup();
    let missing = s.dir.path().join("nobody.sock");
    let out = vgpuctl(&[
        "attach",
        missing.to_str().unwrap(),
        "--vm",
        &vm_arg(s.fake.socket()),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("does not exist; is the slice's vgpu-backend running?"),
        "{}",
        text(&out.stderr)
    );
    assert!(s.fake.requests().is_empty());
}

#[test]
fn attach_to_a_dead_api_socket_says_it_cannot_connect() {
    let s = setup();
    let dead = s.dir.path().join("dead-api.sock");
    drop(UnixListener::bind(&dead).unwrap());
    let out = vgpuctl(&[
        "attach",
        s.backend.to_str().unwrap(),
        "--vm",
        &vm_arg(&dead),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "vgpuctl: Cannot connect to the cloud-hypervisor API socket {}:",
            dead.display()
        )),
        "{stderr}"
    );
}

#[test]
fn detach_of_an_unknown_device_fails_with_the_vm_message() {
    let s = setup();
    let out = vgpuctl(&["detach", "nope", "--vm", &vm_arg(s.fake.socket())]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("No device with id nope found"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn malformed_arguments_are_usage_errors() {
    let out = vgpuctl(&["attach", "tenant-a", "--vm", "/run/ch.sock"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is not of the form cloud-hypervisor:/path/to/api.sock"),
        "{}",
        text(&out.stderr)
    );
    let out = vgpuctl(&["attach", "rel/a.sock", "--vm", "cloud-hypervisor:/x.sock"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("neither an absolute socket path nor a slice name"),
        "{}",
        text(&out.stderr)
    );
}

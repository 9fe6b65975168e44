//! `vgpuctl attach/detach --vm` against the fake cloud-hypervisor API (and the fake scheduler).
//! Moved here from vmm-integration, whose `vgpuctl` this binary replaces.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{text, vgpuctl, FakeScheduler};
use serde_json::json;
use vgpu_vmm::cloud_hypervisor::api::MEMORY_NOT_SHARED;
use vgpu_vmm::cloud_hypervisor::fake::FakeCloudHypervisor;

// Fields drop in order: the fakes and the listener before their directory.
struct Setup {
    fake: FakeCloudHypervisor,
    scheduler: FakeScheduler,
    backend: PathBuf,
    _backend_listener: UnixListener,
    dir: tempfile::TempDir,
}

/// A fake VM API, a fake scheduler, and a socket standing in for a slice's backend (attach
/// only checks it exists).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeCloudHypervisor::start(dir.path().join("ch-api.sock")).unwrap();
    let scheduler = FakeScheduler::start(&dir.path().join("api.sock"));
    let backend = dir.path().join("tenant-a.sock");
    let listener = UnixListener::bind(&backend).unwrap();
    Setup {
        fake,
        scheduler,
        backend,
        _backend_listener: listener,
        dir,
    }
}

impl Setup {
    /// vgpuctl pointed at the fake scheduler.
    fn run(&self, args: &[&str]) -> Output {
        let socket = self.scheduler.socket().to_str().unwrap().to_owned();
        let mut all = vec!["--scheduler", &socket];
        all.extend_from_slice(args);
        vgpuctl(&all)
    }

    fn vm(&self) -> String {
        vm_arg(self.fake.socket())
    }

    /// The slice `tenant-a` as the scheduler reports it, served on the stand-in backend socket.
    fn slice_json(&self, attached: bool) -> String {
        json!({"name": "tenant-a", "tenant": "a", "gpu": 0, "class": "best-effort",
               "compute_guarantee_pct": 50, "compute_max_pct": 100, "memory_guarantee": 0,
               "memory_limit": 1073741824u64, "weight": 1, "attached": attached,
               "socket": attached.then(|| self.backend.to_str().unwrap()),
               "board_slot": 0, "backend_pid": attached.then_some(77), "restarts": 0})
        .to_string()
    }

    fn serve_detached_slice(&self) {
        let path = "/v1/slices/tenant-a";
        self.scheduler
            .route("GET", path, 200, &self.slice_json(false));
        let attach = format!("{path}/attach");
        self.scheduler
            .route("POST", &attach, 200, &self.slice_json(true));
        let detach = format!("{path}/detach");
        self.scheduler
            .route("POST", &detach, 200, &self.slice_json(false));
    }
}

fn vm_arg(api: &Path) -> String {
    format!("cloud-hypervisor:{}", api.display())
}

fn calls(s: &Setup) -> Vec<String> {
    s.scheduler
        .calls()
        .into_iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect()
}

#[test]
fn attach_starts_the_backend_then_hotplugs_it_as_the_slice_name() {
    let s = setup();
    s.serve_detached_slice();
    let out = s.run(&["attach", "tenant-a", "--vm", &s.vm()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "attached tenant-a: socket {}, backend pid 77\nid=tenant-a bdf=0000:00:06.0\n",
            s.backend.display()
        )
    );
    assert_eq!(
        calls(&s),
        ["GET /v1/slices/tenant-a", "POST /v1/slices/tenant-a/attach"]
    );
    let devices = s.fake.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(
        devices[0].config,
        json!({"socket": s.backend.to_str().unwrap(), "device_type": 64,
               "queue_sizes": [1024, 1024, 64], "id": "tenant-a"})
    );
}

#[test]
fn attach_of_a_running_slice_only_hotplugs() {
    let s = setup();
    s.scheduler
        .route("GET", "/v1/slices/tenant-a", 200, &s.slice_json(true));
    let out = s.run(&["attach", "tenant-a", "--vm", &s.vm(), "--id", "gpu7"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with("id=gpu7 bdf=0000:00:06.0\n"));
    assert_eq!(calls(&s), ["GET /v1/slices/tenant-a"]);
}

#[test]
fn a_failed_hotplug_stops_the_backend_it_started() {
    let s = setup();
    s.serve_detached_slice();
    s.fake.set_memory_shared(false);
    let out = s.run(&["attach", "tenant-a", "--vm", &s.vm()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), format!("vgpuctl: {MEMORY_NOT_SHARED}\n"));
    assert!(text(&out.stdout).ends_with("detached tenant-a again\n"));
    assert_eq!(
        calls(&s),
        [
            "GET /v1/slices/tenant-a",
            "POST /v1/slices/tenant-a/attach",
            "POST /v1/slices/tenant-a/detach"
        ]
    );
    assert!(s.fake.devices().is_empty());
}

#[test]
fn attach_of_an_unknown_slice_fails_before_calling_the_vm() {
    let s = setup();
    let out = s.run(&["attach", "nope", "--vm", &s.vm()]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(text(&out.stderr), "vgpuctl: Not found.\n");
    assert!(s.fake.requests().is_empty());
}

#[test]
fn detach_unplugs_from_the_vm_then_stops_the_backend() {
    let s = setup();
    s.serve_detached_slice();
    let out = s.run(&["attach", "tenant-a", "--vm", &s.vm()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let out = s.run(&["detach", "tenant-a", "--vm", &s.vm()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("unplugged tenant-a from {}\ndetached tenant-a\n", s.vm())
    );
    assert!(s.fake.devices().is_empty());
    assert_eq!(
        calls(&s).last().map(String::as_str),
        Some("POST /v1/slices/tenant-a/detach")
    );
}

#[test]
fn a_failed_unplug_leaves_the_backend_running() {
    let s = setup();
    s.serve_detached_slice();
    let out = s.run(&["detach", "tenant-a", "--vm", &s.vm()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("No device with id tenant-a found"),
        "{}",
        text(&out.stderr)
    );
    assert!(calls(&s).is_empty());
}

// The forms that take a backend socket path talk to the VM only: the scheduler (a socket that
// does not exist here) is never asked.

fn run_without_scheduler(s: &Setup, args: &[&str]) -> Output {
    let missing = s.dir.path().join("no-scheduler.sock");
    let mut all = vec!["--scheduler", missing.to_str().unwrap()];
    all.extend_from_slice(args);
    vgpuctl(&all)
}

#[test]
fn attach_of_a_socket_path_prints_id_and_bdf_and_detach_removes_the_device() {
    let s = setup();
    let backend = s.backend.to_str().unwrap();
    let out = run_without_scheduler(&s, &["attach", backend, "--vm", &s.vm(), "--id", "vgpu0"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "id=vgpu0 bdf=0000:00:06.0\n");
    let devices = s.fake.devices();
    assert_eq!(devices.len(), 1);
    assert_eq!(
        devices[0].config,
        json!({"socket": backend, "device_type": 64, "queue_sizes": [1024, 1024, 64], "id": "vgpu0"})
    );

    let out = run_without_scheduler(&s, &["detach", backend, "--vm", &s.vm(), "--id", "vgpu0"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("unplugged vgpu0 from {}\n", s.vm())
    );
    assert!(s.fake.devices().is_empty());
}

#[test]
fn attach_of_a_socket_path_without_id_prints_the_id_the_vm_chose() {
    let s = setup();
    let out = run_without_scheduler(
        &s,
        &["attach", s.backend.to_str().unwrap(), "--vm", &s.vm()],
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "id=_generic_vhost_user0 bdf=0000:00:06.0\n"
    );
}

#[test]
fn detach_of_a_socket_path_needs_the_device_id() {
    let s = setup();
    let out = run_without_scheduler(
        &s,
        &["detach", s.backend.to_str().unwrap(), "--vm", &s.vm()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("needs --id"),
        "{}",
        text(&out.stderr)
    );
    assert!(s.fake.requests().is_empty());
}

#[test]
fn attach_to_a_vm_with_private_memory_fails_before_adding() {
    let s = setup();
    s.fake.set_memory_shared(false);
    let out = run_without_scheduler(
        &s,
        &["attach", s.backend.to_str().unwrap(), "--vm", &s.vm()],
    );
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
    let out = run_without_scheduler(
        &s,
        &["attach", s.backend.to_str().unwrap(), "--vm", &s.vm()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "vgpuctl: cloud-hypervisor answered vm.add-generic-vhost-user with HTTP 500: The generic \
         vhost-user device could not be added to the VM: Failed to connect\n"
    );
}

#[test]
fn attach_of_a_socket_that_does_not_exist_fails_without_calling_the_vm() {
    let s = setup();
    let missing = s.dir.path().join("nobody.sock");
    let out = run_without_scheduler(&s, &["attach", missing.to_str().unwrap(), "--vm", &s.vm()]);
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
    let out = run_without_scheduler(
        &s,
        &[
            "attach",
            s.backend.to_str().unwrap(),
            "--vm",
            &vm_arg(&dead),
        ],
    );
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
fn malformed_vm_and_slice_arguments_are_refused() {
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

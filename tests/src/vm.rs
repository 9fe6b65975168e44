//! VM tests: a Debian guest kernel under QEMU TCG (no KVM here), with our
//! device attached to a live `vgpu-backend` through the generic vhost-user
//! PCI device.
//!
//! What the tests boot is built before `cargo test`, never by it (`.ci/run`
//! runs both scripts):
//!
//! - `images/build-qemu.sh`: QEMU 10.0 from Debian's source, patched so the
//!   generic device can be created; found at `$VGPU_QEMU`, else
//!   `$VGPU_CACHE/qemu-10.0.13/qemu-system-x86_64`;
//! - `images/build-guest.sh`: the kernel (`$VGPU_GUEST_KERNEL`, else
//!   `$VGPU_CACHE/guest/bzImage`), busybox and modules. The initramfs itself
//!   is packed per test ([`GuestFiles::build`]), with the programs it runs.
//!
//! `VGPU_CACHE` defaults to `~/.cache/vgpu`, as in the scripts. When they are
//! missing the VM tests are skipped with a message, unless `VGPU_VM_TESTS=1`
//! (CI), where that is a failure. `VGPU_VM_TESTS=0` skips them always.
//!
//! A guest runs one test script, `/tests/NAME.sh` (`vgpu.test=NAME`), under
//! `images/guest/init`, which prints `VGPU-TEST-BEGIN`, the script's output
//! and one `VGPU-TEST-RESULT: PASS|FAIL ...` line on the serial console, then
//! powers off. Scripts source `/lib/vgpu/test-lib.sh`: `step NAME` prints
//! `VGPU-TEST-STEP NAME` (see [`Vm::wait_for_step`]), and `host_wait TOKEN`
//! blocks until the host sends TOKEN on the control channel, a second serial
//! port (see [`Vm::release`]).
//!
//! With `VGPU_CLOUD_HYPERVISOR=/path` and a usable `/dev/kvm`, the same tests
//! boot under cloud-hypervisor instead (its console is `ttyS0` in a file, the
//! control channel its virtio console, `hvc0`). That path cannot run on the
//! project's machines (no KVM) and has not been exercised; a cloud-hypervisor
//! that cannot boot a bzImage needs `VGPU_GUEST_KERNEL` pointed at a PVH
//! `vmlinux` of the same kernel.

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::artifacts::{artifacts, build_c_program, profile_dir};
use crate::client::describe_status;
use crate::tempdir::TempDir;

/// `1`: the VM tests must run (missing images fail them); `0`: skip them.
pub const VM_TESTS_ENV: &str = "VGPU_VM_TESTS";
/// The QEMU version `images/build-qemu.sh` builds (its cache folder name).
pub const QEMU_CACHE_DIR: &str = "qemu-10.0.13";
/// The QEMU device model: the generic vhost-user PCI device, by its QEMU 10.0
/// name (QEMU 11.1 renames it `vhost-user-test-device-pci`).
pub const QEMU_DEVICE_MODEL: vgpu_vmm::qemu::DeviceModel =
    vgpu_vmm::qemu::DeviceModel::LegacyDevice;
/// Guest RAM.
pub const GUEST_MEMORY_MIB: u64 = 1024;
/// 2 MiB hugepages the guest reserves (`vgpu.hugepages=`): vgpu-guestd's DMA
/// memory and the memory of clients run with `VGPU_HUGEPAGES=1`.
pub const GUEST_HUGEPAGES: u32 = 192;
/// How long a whole guest run may take by default (TCG is slow); overridden
/// by `VGPU_VM_TIMEOUT_S`.
pub const DEFAULT_VM_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the console is read while waiting.
const CONSOLE_POLL: Duration = Duration::from_millis(50);

/// The prefix of the line a guest prints before its test.
pub const BEGIN_MARKER: &str = "VGPU-TEST-BEGIN";
/// The prefix of the one result line.
pub const RESULT_MARKER: &str = "VGPU-TEST-RESULT:";
/// The prefix of step lines (`step NAME` in a test script).
pub const STEP_MARKER: &str = "VGPU-TEST-STEP";
/// The prefix of the line `host_wait TOKEN` prints when it starts waiting.
pub const WAIT_MARKER: &str = "VGPU-TEST-WAIT";

/// The cache root the image scripts use: `$VGPU_CACHE`, else
/// `$XDG_CACHE_HOME/vgpu`, else `~/.cache/vgpu`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("VGPU_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("vgpu");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache").join("vgpu")
}

/// `images/` of this repository.
pub fn images_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| panic!("The tests crate has no parent folder"))
        .join("images")
}

/// Which VMM boots the guests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vmm {
    /// `qemu-system-x86_64` (TCG).
    Qemu {
        /// The binary.
        binary: PathBuf,
        /// Firmware folders, each passed with `-L`.
        firmware: Vec<PathBuf>,
    },
    /// `cloud-hypervisor` (KVM only).
    CloudHypervisor {
        /// The binary.
        binary: PathBuf,
    },
}

/// What a VM test boots.
#[derive(Debug, Clone)]
pub struct VmImages {
    /// The VMM.
    pub vmm: Vmm,
    /// The guest kernel (bzImage).
    pub kernel: PathBuf,
    /// `images/build-guest.sh`.
    pub build_guest: PathBuf,
}

impl VmImages {
    /// Finds the VMM and the guest kernel, or says what is missing.
    pub fn locate() -> Result<VmImages, String> {
        let cache = cache_root();
        let kernel = std::env::var_os("VGPU_GUEST_KERNEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| cache.join("guest").join("bzImage"));
        if !kernel.is_file() {
            return Err(format!(
                "no guest kernel at {} (run images/build-guest.sh)",
                kernel.display()
            ));
        }
        let build_guest = images_dir().join("build-guest.sh");
        let vmm = match std::env::var_os("VGPU_CLOUD_HYPERVISOR") {
            Some(binary) if Path::new("/dev/kvm").exists() => {
                let binary = PathBuf::from(binary);
                if !binary.is_file() {
                    return Err(format!(
                        "VGPU_CLOUD_HYPERVISOR={} is not a file",
                        binary.display()
                    ));
                }
                Vmm::CloudHypervisor { binary }
            }
            _ => locate_qemu(&cache)?,
        };
        Ok(VmImages {
            vmm,
            kernel,
            build_guest,
        })
    }
}

fn locate_qemu(cache: &Path) -> Result<Vmm, String> {
    let binary = std::env::var_os("VGPU_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache.join(QEMU_CACHE_DIR).join("qemu-system-x86_64"));
    if !binary.is_file() {
        return Err(format!(
            "no QEMU at {} (run images/build-qemu.sh, or set VGPU_QEMU)",
            binary.display()
        ));
    }
    // Debian's seabios holds bios-256k.bin, qemu-system-data the option ROMs.
    let firmware: Vec<PathBuf> = match std::env::var_os("VGPU_QEMU_FIRMWARE") {
        Some(dirs) => std::env::split_paths(&dirs).collect(),
        None => vec!["/usr/share/seabios".into(), "/usr/share/qemu".into()],
    };
    for file in ["bios-256k.bin", "linuxboot_dma.bin"] {
        if !firmware.iter().any(|d| d.join(file).exists()) {
            return Err(format!(
                "no {file} in {firmware:?} (install Debian's seabios and qemu-system-data)"
            ));
        }
    }
    Ok(Vmm::Qemu { binary, firmware })
}

/// The VM images, or `None` when the test `test` is to be skipped (it says
/// why on stderr). With `VGPU_VM_TESTS=1`, missing images panic instead.
pub fn vm_images_or_skip(test: &str) -> Option<VmImages> {
    let mode = std::env::var(VM_TESTS_ENV).unwrap_or_default();
    if mode.trim() == "0" {
        eprintln!("SKIPPED {test}: {VM_TESTS_ENV}=0");
        return None;
    }
    match VmImages::locate() {
        Ok(images) => Some(images),
        Err(why) if mode.trim() == "1" => panic!("{test}: {why}, and {VM_TESTS_ENV}=1"),
        Err(why) => {
            eprintln!(
                "SKIPPED {test}: {why}. The VM tests need images/build-qemu.sh and \
                 images/build-guest.sh to have run; set {VM_TESTS_ENV}=1 to make this a failure."
            );
            None
        }
    }
}

/// The `vgpu-guestd` binary of this build, if it has been built.
pub fn guestd_binary() -> Option<PathBuf> {
    let path = profile_dir().join("vgpu-guestd");
    path.is_file().then_some(path)
}

/// What goes into a test's initramfs, besides what every guest has (busybox,
/// `/init`, the modules, `/lib/vgpu/test-lib.sh`).
#[derive(Debug, Default, Clone)]
pub struct GuestFiles {
    bins: Vec<PathBuf>,
    libs: Vec<(PathBuf, String)>,
    tests: Vec<(String, String)>,
}

impl GuestFiles {
    /// Nothing yet.
    pub fn new() -> GuestFiles {
        GuestFiles::default()
    }

    /// A program, at `/usr/bin/<its name>`.
    pub fn bin(mut self, path: impl Into<PathBuf>) -> GuestFiles {
        self.bins.push(path.into());
        self
    }

    /// `tests/c/<name>.c`, compiled against our libcuda, at `/usr/bin/<name>`.
    pub fn c_program(self, name: &str) -> GuestFiles {
        self.bin(build_c_program(name))
    }

    /// The guest library as `/usr/lib/vgpu/libcuda.so.1` (and `libcuda.so`),
    /// on the guest's `LD_LIBRARY_PATH`.
    pub fn libcuda(mut self) -> GuestFiles {
        self.libs
            .push((artifacts().libcuda.clone(), "libcuda.so.1".to_owned()));
        self
    }

    /// `vgpu-guestd` at `/usr/bin/vgpu-guestd`. Panics if it is not built.
    pub fn guestd(self) -> GuestFiles {
        let path = guestd_binary().unwrap_or_else(|| {
            panic!(
                "{} is missing: run `cargo build --workspace` first",
                profile_dir().join("vgpu-guestd").display()
            )
        });
        self.bin(path)
    }

    /// The test script `/tests/<name>.sh`, run by `vgpu.test=<name>`.
    pub fn test(mut self, name: &str, script: &str) -> GuestFiles {
        self.tests.push((name.to_owned(), script.to_owned()));
        self
    }

    /// Packs the initramfs with `images/build-guest.sh --offline`.
    pub fn build(&self, images: &VmImages) -> Initramfs {
        let dir = TempDir::new("initramfs");
        let path = dir.path().join("initramfs.cpio.gz");
        let mut cmd = Command::new("bash");
        cmd.arg(&images.build_guest)
            .arg("--offline")
            .arg("--initramfs")
            .arg(&path);
        for bin in &self.bins {
            cmd.arg("--bin").arg(bin);
        }
        for (lib, name) in &self.libs {
            let mut arg = lib.clone().into_os_string();
            arg.push(":");
            arg.push(name);
            cmd.arg("--lib").arg(arg);
        }
        for (name, script) in &self.tests {
            let file = dir.path().join(format!("{name}.sh"));
            fs::write(&file, script)
                .unwrap_or_else(|e| panic!("Cannot write {}: {e}", file.display()));
            cmd.arg("--test").arg(file);
        }
        let output = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("Cannot run {}: {e}", images.build_guest.display()));
        assert!(
            output.status.success(),
            "{} failed ({}):\n{}{}",
            images.build_guest.display(),
            describe_status(output.status),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(path.is_file(), "{} was not written", path.display());
        Initramfs { path, _dir: dir }
    }
}

/// A packed initramfs, removed on drop.
#[derive(Debug)]
pub struct Initramfs {
    path: PathBuf,
    _dir: TempDir,
}

impl Initramfs {
    /// The archive.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// One VM at a time: two TCG guests on a 2-core machine would each run at
/// half speed, and their timeouts would be meaningless.
fn vm_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The overall limit for one guest run: `VGPU_VM_TIMEOUT_S` or
/// [`DEFAULT_VM_TIMEOUT`].
pub fn vm_timeout() -> Duration {
    std::env::var("VGPU_VM_TIMEOUT_S")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_VM_TIMEOUT)
}

/// How a guest's test ended.
#[derive(Debug)]
pub struct VmOutcome {
    /// The test's name.
    pub test: String,
    /// True if the result line said PASS.
    pub passed: bool,
    /// The result line, after the marker.
    pub result: String,
    /// The lines between the begin and result markers.
    pub lines: Vec<String>,
    /// The whole console.
    pub console: String,
    /// From QEMU's start to the begin marker: the boot.
    pub boot_time: Option<Duration>,
    /// From QEMU's start to the result marker.
    pub elapsed: Duration,
}

impl VmOutcome {
    /// Panics, with the console, unless the test passed.
    pub fn assert_passed(&self) {
        assert!(
            self.passed,
            "guest test {} ended with {:?}\n--- console ---\n{}--- end ---",
            self.test, self.result, self.console
        );
    }

    /// The lines of the test that start with `prefix`.
    pub fn lines_starting_with(&self, prefix: &str) -> Vec<&str> {
        self.lines
            .iter()
            .map(String::as_str)
            .filter(|l| l.starts_with(prefix))
            .collect()
    }
}

/// A running guest, killed on drop. Only one runs at a time in a test
/// process.
#[derive(Debug)]
pub struct Vm {
    test: String,
    child: Option<Child>,
    console: PathBuf,
    vmm_log: PathBuf,
    control_socket: PathBuf,
    control: Option<UnixStream>,
    started: Instant,
    boot_time: Option<Duration>,
    deadline: Instant,
    dir: TempDir,
    _initramfs: Initramfs,
    _lock: MutexGuard<'static, ()>,
}

impl Vm {
    /// Boots the guest with `initramfs` to run its test `test`, with our
    /// device on `backend_socket`. Waits first while another VM of this
    /// process runs.
    pub fn boot(images: &VmImages, initramfs: Initramfs, backend_socket: &Path, test: &str) -> Vm {
        let lock = vm_lock();
        let dir = TempDir::new("vm");
        let console = dir.path().join("console.log");
        let vmm_log = dir.path().join("vmm.log");
        let control_socket = dir.path().join("control.sock");
        let timeout = vm_timeout();
        // The guest gives up a little before the host does, so its own FAIL
        // line is what a slow test shows.
        let guest_timeout = timeout.as_secs().saturating_sub(30).max(30);
        let mut cmd = match &images.vmm {
            Vmm::Qemu { binary, firmware } => qemu_command(
                binary,
                firmware,
                images,
                &initramfs,
                backend_socket,
                &control_socket,
                &kernel_cmdline(test, guest_timeout, "ttyS0", "/dev/ttyS1"),
            ),
            Vmm::CloudHypervisor { binary } => cloud_hypervisor_command(
                binary,
                images,
                &initramfs,
                backend_socket,
                &control_socket,
                &console,
                &kernel_cmdline(test, guest_timeout, "ttyS0", "/dev/hvc0"),
            ),
        };
        let err = fs::File::create(&vmm_log)
            .unwrap_or_else(|e| panic!("Cannot create {}: {e}", vmm_log.display()));
        if matches!(images.vmm, Vmm::Qemu { .. }) {
            // QEMU's serial console is its stdout; cloud-hypervisor writes the
            // console file itself, and its stdout goes to the log.
            let out = fs::File::create(&console)
                .unwrap_or_else(|e| panic!("Cannot create {}: {e}", console.display()));
            cmd.stdout(out);
        } else {
            let out = err
                .try_clone()
                .unwrap_or_else(|e| panic!("Cannot duplicate the VMM log file: {e}"));
            cmd.stdout(out);
        }
        cmd.stdin(Stdio::null()).stderr(err);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("Cannot start {:?}: {e}", cmd.get_program()));
        Vm {
            test: test.to_owned(),
            child: Some(child),
            console,
            vmm_log,
            control_socket,
            control: None,
            started,
            boot_time: None,
            deadline: started + timeout,
            dir,
            _initramfs: initramfs,
            _lock: lock,
        }
    }

    /// The console so far, without carriage returns.
    pub fn console(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// What the VMM wrote to stderr.
    pub fn vmm_log(&self) -> String {
        fs::read_to_string(&self.vmm_log).unwrap_or_default()
    }

    /// The folder holding the console and logs (kept if the test panics).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The console and the VMM's log, for panic messages.
    pub fn transcript(&self) -> String {
        format!(
            "--- {} console ---\n{}--- VMM log ---\n{}--- end ---",
            self.test,
            self.console(),
            self.vmm_log()
        )
    }

    /// Waits until the console has a line for which `matches` returns true,
    /// and returns it. Panics if the VM ends, the result line comes first, or
    /// `timeout` (capped by the VM's overall limit) passes.
    pub fn wait_for_line(
        &mut self,
        what: &str,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now()
            .checked_add(timeout)
            .map_or(self.deadline, |d| d.min(self.deadline));
        loop {
            let console = self.console();
            self.note_boot(&console);
            if let Some(line) = console.lines().find(|l| matches(l)) {
                return line.to_owned();
            }
            if let Some(result) = console.lines().find(|l| l.starts_with(RESULT_MARKER)) {
                panic!(
                    "guest test {} ended ({result}) before {what}\n{}",
                    self.test,
                    self.transcript()
                );
            }
            if let Some(status) = self.try_wait() {
                panic!(
                    "the VM of {} exited ({}) before {what}\n{}",
                    self.test,
                    describe_status(status),
                    self.transcript()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {:?} waiting for {what} in guest test {}\n{}",
                    timeout,
                    self.test,
                    self.transcript()
                );
            }
            thread::sleep(CONSOLE_POLL);
        }
    }

    /// Waits for `VGPU-TEST-STEP <name>` from the guest.
    pub fn wait_for_step(&mut self, name: &str, timeout: Duration) {
        let want = format!("{STEP_MARKER} {name}");
        self.wait_for_line(&format!("step {name:?}"), timeout, |l| l.trim_end() == want);
    }

    /// Lets a guest blocked in `host_wait <token>` go on: waits for its
    /// `VGPU-TEST-WAIT <token>` line, then writes the token on the control
    /// channel.
    pub fn release(&mut self, token: &str, timeout: Duration) {
        let want = format!("{WAIT_MARKER} {token}");
        self.wait_for_line(&format!("host_wait {token:?}"), timeout, |l| {
            l.trim_end() == want
        });
        if self.control.is_none() {
            let stream = UnixStream::connect(&self.control_socket).unwrap_or_else(|e| {
                panic!(
                    "Cannot connect to the control channel {}: {e}",
                    self.control_socket.display()
                )
            });
            self.control = Some(stream);
        }
        if let Some(control) = self.control.as_mut() {
            control
                .write_all(format!("{token}\n").as_bytes())
                .and_then(|()| control.flush())
                .unwrap_or_else(|e| panic!("Cannot write to the control channel: {e}"));
        }
    }

    /// Waits for the result line and for the VM to power off, and returns the
    /// outcome. Panics if the VM ends without one or the overall limit passes.
    pub fn wait_for_result(mut self) -> VmOutcome {
        let result = self.wait_for_line("the result line", Duration::MAX, |l| {
            l.starts_with(RESULT_MARKER)
        });
        let elapsed = self.started.elapsed();
        // The guest powers off right after the result line.
        let off_deadline = Instant::now() + Duration::from_secs(30);
        while self.try_wait().is_none() && Instant::now() < off_deadline {
            thread::sleep(CONSOLE_POLL);
        }
        let console = self.console();
        self.note_boot(&console);
        let lines: Vec<String> = console
            .lines()
            .skip_while(|l| !l.starts_with(BEGIN_MARKER))
            .skip(1)
            .take_while(|l| !l.starts_with(RESULT_MARKER))
            .map(str::to_owned)
            .collect();
        let result = result.trim_start_matches(RESULT_MARKER).trim().to_owned();
        VmOutcome {
            test: self.test.clone(),
            passed: result == "PASS",
            result,
            lines,
            console,
            boot_time: self.boot_time,
            elapsed,
        }
    }

    fn note_boot(&mut self, console: &str) {
        if self.boot_time.is_none() && console.lines().any(|l| l.starts_with(BEGIN_MARKER)) {
            self.boot_time = Some(self.started.elapsed());
        }
    }

    fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the VMM and reaps it.
    pub fn kill(&mut self) {
        self.control = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!("{}", self.transcript());
        }
    }
}

/// The kernel command line of a test guest.
fn kernel_cmdline(test: &str, timeout_s: u64, console: &str, control: &str) -> String {
    format!(
        "console={console} quiet panic=-1 vgpu.test={test} vgpu.timeout={timeout_s} \
         vgpu.hugepages={GUEST_HUGEPAGES} vgpu.control={control}"
    )
}

/// A QEMU value with QemuOpts' comma escaping.
fn qemu_path(path: &Path) -> String {
    path.to_string_lossy().replace(',', ",,")
}

fn qemu_command(
    binary: &Path,
    firmware: &[PathBuf],
    images: &VmImages,
    initramfs: &Initramfs,
    backend_socket: &Path,
    control_socket: &Path,
    cmdline: &str,
) -> Command {
    let mut cmd = Command::new(binary);
    for dir in firmware {
        cmd.arg("-L").arg(dir);
    }
    let mem = vgpu_vmm::MemorySize::from_mib(GUEST_MEMORY_MIB).expect("guest memory size");
    cmd.args(["-machine", "q35", "-cpu", "max", "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        // ttyS0: the console, on stdout. ttyS1: the control channel.
        .args(["-serial", "stdio"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=control,path={},server=on,wait=off",
            qemu_path(control_socket)
        ))
        .args(["-serial", "chardev:control"])
        .arg("-kernel")
        .arg(&images.kernel)
        .arg("-initrd")
        .arg(initramfs.path())
        .args(["-append", cmdline])
        // Guest RAM the backend can map (a shared memfd) and the device, as
        // vgpu-vmm writes them for operators.
        .args(vgpu_vmm::qemu::memory_args(mem))
        .args(
            vgpu_vmm::qemu::device_args_for(QEMU_DEVICE_MODEL, backend_socket, "vgpu0")
                .expect("QEMU device arguments"),
        );
    cmd
}

fn cloud_hypervisor_command(
    binary: &Path,
    images: &VmImages,
    initramfs: &Initramfs,
    backend_socket: &Path,
    control_socket: &Path,
    console: &Path,
    cmdline: &str,
) -> Command {
    let mut cmd = Command::new(binary);
    cmd.arg("--kernel")
        .arg(&images.kernel)
        .arg("--initramfs")
        .arg(initramfs.path())
        .args(["--cmdline", cmdline])
        .args(["--cpus", "boot=2"])
        .args([
            "--memory",
            &format!("size={GUEST_MEMORY_MIB}M,shared=on,hugepages=off"),
        ])
        .arg("--serial")
        .arg(format!("file={}", console.display()))
        .arg("--console")
        .arg(format!("socket={}", control_socket.display()))
        .args(
            vgpu_vmm::cloud_hypervisor::device_args(backend_socket, None)
                .expect("cloud-hypervisor device arguments"),
        );
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_cmdline_names_the_test_and_the_control_channel() {
        let line = kernel_cmdline("device_visible", 90, "ttyS0", "/dev/ttyS1");
        assert!(line.starts_with("console=ttyS0 "));
        assert!(line.contains(" vgpu.test=device_visible "));
        assert!(line.contains(" vgpu.timeout=90 "));
        assert!(line.ends_with(" vgpu.control=/dev/ttyS1"));
        assert!(line.contains(" panic=-1 "), "a dead init must end the VM");
    }

    #[test]
    fn qemu_paths_escape_commas() {
        assert_eq!(qemu_path(Path::new("/tmp/a,b.sock")), "/tmp/a,,b.sock");
        assert_eq!(qemu_path(Path::new("/tmp/ab.sock")), "/tmp/ab.sock");
    }

    #[test]
    fn outcome_lines_filter_by_prefix() {
        let outcome = VmOutcome {
            test: "t".into(),
            passed: true,
            result: "PASS".into(),
            lines: vec!["PASS a".into(), "INFO b".into(), "PASS c".into()],
            console: String::new(),
            boot_time: None,
            elapsed: Duration::ZERO,
        };
        assert_eq!(
            outcome.lines_starting_with("PASS"),
            vec!["PASS a", "PASS c"]
        );
        outcome.assert_passed();
    }
}

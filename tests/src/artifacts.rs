//! Finding what the workspace built, and building the C test clients.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use crate::client::describe_status;
use crate::tempdir::unique_suffix;

const BUILD_FIRST: &str = "run `cargo build --workspace` first";

/// The built artifacts the tests run.
#[derive(Debug)]
pub struct Artifacts {
    /// `target/<profile>`.
    pub profile_dir: PathBuf,
    /// The `vgpu-backend` binary.
    pub backend: PathBuf,
    /// The guest library, `libcuda.so` as cargo names it.
    pub libcuda: PathBuf,
    /// A directory holding `libcuda.so.1` and `libcuda.so`, symlinks to
    /// [`Artifacts::libcuda`]: what clients link against and load.
    pub lib_dir: PathBuf,
}

/// The artifacts of this build, located once per process.
///
/// Panics, saying to run `cargo build --workspace`, if the backend or the
/// guest library has not been built.
pub fn artifacts() -> &'static Artifacts {
    static ARTIFACTS: OnceLock<Artifacts> = OnceLock::new();
    ARTIFACTS.get_or_init(locate_artifacts)
}

/// `target/<profile>` of the running executable: integration tests live in
/// `target/<profile>/deps/`, binaries in `target/<profile>/`.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|e| panic!("Cannot find the running executable: {e}"));
    let mut dir = exe
        .parent()
        .unwrap_or_else(|| panic!("Executable {} has no parent", exe.display()))
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

fn locate_artifacts() -> Artifacts {
    let profile_dir = profile_dir();
    let backend = profile_dir.join("vgpu-backend");
    let libcuda = profile_dir.join("libcuda.so");
    for path in [&backend, &libcuda] {
        assert!(
            path.is_file(),
            "{} is missing: {BUILD_FIRST}",
            path.display()
        );
    }
    let lib_dir = profile_dir.join("vgpu-tests").join("lib");
    fs::create_dir_all(&lib_dir)
        .unwrap_or_else(|e| panic!("Cannot create {}: {e}", lib_dir.display()));
    for name in ["libcuda.so.1", "libcuda.so"] {
        ensure_symlink(&libcuda, &lib_dir.join(name));
    }
    Artifacts {
        profile_dir,
        backend,
        libcuda,
        lib_dir,
    }
}

/// Makes `link` a symlink to `target`, atomically (safe against other test
/// processes doing the same).
fn ensure_symlink(target: &Path, link: &Path) {
    if fs::read_link(link).is_ok_and(|t| t == target) {
        return;
    }
    let tmp = link.with_extension(format!("tmp{}", unique_suffix()));
    symlink(target, &tmp).unwrap_or_else(|e| panic!("Cannot create {}: {e}", tmp.display()));
    fs::rename(&tmp, link).unwrap_or_else(|e| panic!("Cannot create {}: {e}", link.display()));
}

/// The C sources of the test clients.
pub fn c_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("c")
}

/// Compiles `tests/c/<name>.c` with `cc` (or `$CC`) against our `cuda.h`,
/// linked to our libcuda, once per process. Returns the executable.
pub fn build_c_program(name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = built.get(name) {
        return path.clone();
    }
    let art = artifacts();
    let src = c_dir().join(format!("{name}.c"));
    let out_dir = art.profile_dir.join("vgpu-tests").join("bin");
    fs::create_dir_all(&out_dir)
        .unwrap_or_else(|e| panic!("Cannot create {}: {e}", out_dir.display()));
    let out = out_dir.join(name);
    let tmp = out_dir.join(format!(".{name}.{}", unique_suffix()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let include = c_dir().join("include");
    let mut rpath = std::ffi::OsString::from("-Wl,-rpath,");
    rpath.push(&art.lib_dir);
    let output = Command::new(&cc)
        .args(["-std=gnu11", "-O1", "-g", "-Wall", "-Wextra"])
        .arg("-I")
        .arg(&include)
        .arg("-I")
        .arg(c_dir())
        .arg(&src)
        .arg("-o")
        .arg(&tmp)
        .arg("-L")
        .arg(&art.lib_dir)
        .arg("-lcuda")
        .arg(rpath)
        .output()
        .unwrap_or_else(|e| panic!("Cannot run {cc}: {e}"));
    assert!(
        output.status.success(),
        "Compiling {} failed ({}):\n{}{}",
        src.display(),
        describe_status(output.status),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    fs::rename(&tmp, &out).unwrap_or_else(|e| panic!("Cannot create {}: {e}", out.display()));
    built.insert(name.to_string(), out.clone());
    out
}

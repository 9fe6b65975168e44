//! Backend configuration: which device to serve, on which socket, with which
//! slice identity and limits.

use std::fmt;
use std::io::Read;
use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// The most sessions one frontend connection may hold open at once.
pub const DEFAULT_MAX_SESSIONS: u32 = 64;

/// Device memory the emulated device pretends to have when no memory limit
/// is given.
pub const DEFAULT_EMULATED_MEMORY: u64 = 16 << 30;

/// The slice name used when none is given.
pub const DEFAULT_SLICE_NAME: &str = "default";

/// Why a configuration value could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `--device` is neither `emulated` nor `cuda:N`.
    #[error("Invalid device {0:?}: expected \"emulated\" or \"cuda:N\" (for example cuda:0)")]
    BadDevice(String),
    /// A UUID that is not 32 hex digits (dashes allowed).
    #[error(
        "Invalid UUID {0:?}: expected 32 hex digits such as 123e4567-e89b-12d3-a456-426614174000"
    )]
    BadUuid(String),
    /// A size that is not a number of bytes (optionally with K, M, G or T).
    #[error(
        "Invalid size {0:?}: expected a number of bytes, optionally with a K, M, G or T suffix"
    )]
    BadSize(String),
}

/// Which executor serves the slice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A real NVIDIA GPU, by CUDA ordinal.
    Cuda(usize),
    /// The emulated device (host memory, no kernel execution).
    Emulated,
}

impl FromStr for DeviceSpec {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadDevice(s.to_owned());
        if s == "emulated" {
            return Ok(DeviceSpec::Emulated);
        }
        let ordinal = s.strip_prefix("cuda:").ok_or_else(bad)?;
        if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        ordinal.parse().map(DeviceSpec::Cuda).map_err(|_| bad())
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Emulated => f.write_str("emulated"),
        }
    }
}

/// A slice UUID (16 bytes, as `cuDeviceGetUuid` returns it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SliceUuid(pub [u8; 16]);

impl SliceUuid {
    /// A random version-4 UUID from `/dev/urandom`, or, if that cannot be
    /// read, one derived from the slice name, the process id and the time.
    pub fn generate(slice_name: &str) -> SliceUuid {
        let mut bytes = [0u8; 16];
        let random = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .is_ok();
        if !random {
            bytes = derived_bytes(slice_name);
        }
        // Version 4, RFC 4122 variant.
        bytes[6] = (bytes[6] & 0x0f) | 0x40;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        SliceUuid(bytes)
    }
}

fn derived_bytes(slice_name: &str) -> [u8; 16] {
    use std::hash::{Hash, Hasher};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut out = [0u8; 16];
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (slice_name, std::process::id(), now, i).hash(&mut h);
        chunk.copy_from_slice(&h.finish().to_le_bytes());
    }
    out
}

impl FromStr for SliceUuid {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::BadUuid(s.to_owned());
        let digits: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
        if digits.len() != 32 {
            return Err(bad());
        }
        let mut out = [0u8; 16];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad())?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        }
        Ok(SliceUuid(out))
    }
}

impl fmt::Display for SliceUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SliceUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SliceUuid({self})")
    }
}

/// Parses a byte count: a plain number, or one with a binary K, M, G or T
/// suffix (`8G` is 8 GiB).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_owned());
    let t = s.trim();
    let (number, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let value: u64 = number.parse().map_err(|_| bad())?;
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// Default busy-poll time after a batch (see [`BackendConfig::poll_after_work`]).
pub const DEFAULT_POLL_AFTER_WORK: std::time::Duration = std::time::Duration::from_micros(50);

/// Everything a backend needs to start.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// The vhost-user socket to listen on. A stale file there is removed.
    pub socket: PathBuf,
    /// The device to serve.
    pub device: DeviceSpec,
    /// The slice name reported in config space.
    pub slice_name: String,
    /// The slice's memory limit in bytes; `None` means the device's total
    /// memory. It may not exceed the device's total memory.
    pub memory_limit: Option<u64>,
    /// The slice UUID; `None` means a random one.
    pub uuid: Option<SliceUuid>,
    /// The largest virtqueue size accepted (at most
    /// [`vgpu_spec::MAX_QUEUE_SIZE`]).
    pub max_queue_size: u16,
    /// The most sessions one connection may hold open.
    pub max_sessions: u32,
    /// How long a queue is busy-polled after a batch before its worker
    /// sleeps: latency for back-to-back calls against CPU time.
    pub poll_after_work: std::time::Duration,
    /// Total memory of the emulated device; `None` means the emulated GPU's
    /// memory if one is given, else the memory limit if one is given, else
    /// [`DEFAULT_EMULATED_MEMORY`]. Ignored for CUDA.
    pub emulated_memory: Option<u64>,
    /// The grant board and this backend's slot in it; `None`: dispatch is
    /// never held back.
    pub board: Option<BoardSlotConfig>,
    /// The emulated device's GPU lock: a file that stands for one physical
    /// GPU, `flock`ed while a timed kernel runs. Ignored for CUDA.
    pub emulated_gpu_lock: Option<PathBuf>,
    /// The emulated GPU's memory, shared by every backend using the same lock (a budget file
    /// next to it). Ignored for CUDA.
    pub emulated_gpu_memory: Option<u64>,
    /// Pin host memory for swapping ahead of need (see `elastic::pinned`). Ignored for the
    /// emulated device, whose swap space is not pinned.
    pub swap_reserve: bool,
    /// The bound on queued GPU work (with a board).
    pub max_inflight: std::time::Duration,
    /// How long the backend keeps serving after a kernel faulted before it stops for a clean
    /// restart (its guests collect the sticky error meanwhile).
    pub fault_restart_after: std::time::Duration,
    /// Where usage is reported; `None`: sessions are metered but nothing is
    /// reported.
    pub metering: Option<crate::reporting::MeteringConfig>,
    /// How frontend connections are isolated from each other (the binary's default:
    /// [`Isolation::Process`]; in-process use serves them from threads).
    pub isolation: Isolation,
    /// Set in a worker process of a process-isolated backend: it serves one connection on the
    /// listening socket, slice counters and notification pipe its main process handed it.
    pub worker: Option<WorkerRole>,
}

/// How a backend isolates its frontend connections from each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Isolation {
    /// Every connection is served by threads of one process, sharing one CUDA process: a
    /// kernel fault in one connection's session ends the others' too.
    #[default]
    Thread,
    /// Every connection is served by its own worker process with its own CUDA state: a fault
    /// reaches only that connection.
    Process,
}

/// A worker process's place in its backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkerRole {
    /// The worker's index: its bit on the grant board and its row in the slice's counters.
    pub index: usize,
}

/// Where a backend finds its grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoardSlotConfig {
    /// The board file (`$STATE_DIR/board`).
    pub path: PathBuf,
    /// The slot index.
    pub slot: usize,
}

impl BackendConfig {
    /// A configuration with defaults for everything but socket and device.
    pub fn new(socket: impl Into<PathBuf>, device: DeviceSpec) -> Self {
        BackendConfig {
            socket: socket.into(),
            device,
            slice_name: DEFAULT_SLICE_NAME.to_owned(),
            memory_limit: None,
            uuid: None,
            max_queue_size: vgpu_spec::MAX_QUEUE_SIZE,
            max_sessions: DEFAULT_MAX_SESSIONS,
            poll_after_work: DEFAULT_POLL_AFTER_WORK,
            emulated_memory: None,
            board: None,
            emulated_gpu_lock: None,
            emulated_gpu_memory: None,
            swap_reserve: false,
            max_inflight: crate::throttle::DEFAULT_MAX_INFLIGHT,
            fault_restart_after: crate::server::POISON_GRACE,
            metering: None,
            isolation: Isolation::Thread,
            worker: None,
        }
    }

    /// Reports every session's usage to the scheduler listening on
    /// `socket` (its API socket, `$STATE_DIR/api.sock`), for `tenant`, once
    /// per [`crate::reporting::DEFAULT_INTERVAL`].
    pub fn scheduler(mut self, socket: impl Into<PathBuf>, tenant: impl Into<String>) -> Self {
        self.metering = Some(crate::reporting::MeteringConfig {
            scheduler_socket: socket.into(),
            tenant: tenant.into(),
            interval: crate::reporting::DEFAULT_INTERVAL,
        });
        self
    }

    /// Sets how often usage is reported (with [`BackendConfig::scheduler`]).
    pub fn metering_interval(mut self, interval: std::time::Duration) -> Self {
        if let Some(m) = &mut self.metering {
            m.interval = interval;
        }
        self
    }

    /// Governs dispatch by slot `slot` of the grant board at `path`.
    pub fn board(mut self, path: impl Into<PathBuf>, slot: usize) -> Self {
        self.board = Some(BoardSlotConfig {
            path: path.into(),
            slot,
        });
        self
    }

    /// Sets the emulated device's GPU lock file.
    pub fn emulated_gpu_lock(mut self, path: impl Into<PathBuf>) -> Self {
        self.emulated_gpu_lock = Some(path.into());
        self
    }

    /// Sets the bound on queued GPU work, in microseconds.
    pub fn max_inflight_us(mut self, us: u64) -> Self {
        self.max_inflight = std::time::Duration::from_micros(us);
        self
    }

    /// Sets the slice name.
    pub fn slice_name(mut self, name: impl Into<String>) -> Self {
        self.slice_name = name.into();
        self
    }

    /// Sets the memory limit in bytes.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Sets the slice UUID.
    pub fn uuid(mut self, uuid: SliceUuid) -> Self {
        self.uuid = Some(uuid);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_spec_parses_emulated_and_cuda_ordinals() {
        assert_eq!("emulated".parse(), Ok(DeviceSpec::Emulated));
        assert_eq!("cuda:0".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:13".parse(), Ok(DeviceSpec::Cuda(13)));
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn bad_device_values_are_rejected_with_a_clear_message() {
        for bad in [
            "", "cuda", "cuda:", "cuda:-1", "cuda:x", "gpu0", "Emulated", "cuda:1:2",
        ] {
            let err = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(err
                .to_string()
                .contains("expected \"emulated\" or \"cuda:N\""));
        }
    }

    #[test]
    fn uuid_parses_with_and_without_dashes_and_round_trips() {
        let text = "123e4567-e89b-12d3-a456-426614174000";
        let u: SliceUuid = text.parse().unwrap();
        assert_eq!(u.0[0], 0x12);
        assert_eq!(u.0[15], 0x00);
        assert_eq!(u.to_string(), text);
        let plain: SliceUuid = "123e4567e89b12d3a456426614174000".parse().unwrap();
        assert_eq!(plain, u);
        assert!("123".parse::<SliceUuid>().is_err());
        assert!("zz3e4567-e89b-12d3-a456-426614174000"
            .parse::<SliceUuid>()
            .is_err());
    }

    #[test]
    fn generated_uuids_are_version_4_and_differ() {
        let a = SliceUuid::generate("s");
        let b = SliceUuid::generate("s");
        assert_ne!(a, b);
        assert_eq!(a.0[6] >> 4, 4);
        assert_eq!(a.0[8] >> 6, 0b10);
    }

    #[test]
    fn scheduler_sets_metering_and_interval_follows() {
        let c = BackendConfig::new("/s", DeviceSpec::Emulated)
            .metering_interval(std::time::Duration::from_millis(5));
        assert!(c.metering.is_none());
        let c = c
            .scheduler("/var/lib/vgpu/api.sock", "acme")
            .metering_interval(std::time::Duration::from_millis(250));
        let m = c.metering.unwrap();
        assert_eq!(m.scheduler_socket, PathBuf::from("/var/lib/vgpu/api.sock"));
        assert_eq!(m.tenant, "acme");
        assert_eq!(m.interval, std::time::Duration::from_millis(250));
    }

    #[test]
    fn sizes_accept_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}

//! `vgpu.toml`: the scheduler's configuration, with defaults embedded so that it runs with no
//! file at all on a host with one GPU.
//!
//! ```toml
//! tick_us = 1000          # policy tick
//! window_ms = 100         # window over which guarantees and maxima hold
//! device = "cuda"         # or "emulated"
//!
//! [[gpu]]
//! index = 0
//! memory = "80GiB"        # integers (bytes) work too
//!
//! [[slice]]               # none given: one best-effort slice "default" owning GPU 0
//! name = "lc"
//! tenant = "acme"
//! class = "latency-critical"
//! compute_guarantee_pct = 30
//! memory_limit = "16GiB"
//! attach = true
//! ```
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::admission::{self, AdmissionError};
use crate::slice::{Size, SliceClass, SliceRequest, SliceSpec};

/// Memory of the default GPU.
pub const DEFAULT_GPU_MEMORY: u64 = 80 << 30;

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("Cannot read the configuration {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has wrong fields.
    #[error("The configuration {} is invalid: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        message: String,
    },
    /// A value is out of range.
    #[error("The configuration {} is invalid: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A declared slice is not admissible.
    #[error("The configuration {} declares a slice that cannot be admitted: {source}", path.display())]
    Slice {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: AdmissionError,
    },
}

/// Which executor the backends use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// The real GPU (`--device cuda:N`).
    #[default]
    Cuda,
    /// The emulated device (`--device emulated`), for machines without a GPU.
    Emulated,
}

impl std::str::FromStr for DeviceKind {
    type Err = String;
    fn from_str(s: &str) -> Result<DeviceKind, String> {
        match s {
            "cuda" => Ok(DeviceKind::Cuda),
            "emulated" => Ok(DeviceKind::Emulated),
            other => Err(format!("Unknown device {other:?}: use cuda or emulated")),
        }
    }
}

/// One physical GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuConfig {
    /// CUDA device index.
    pub index: u32,
    /// Memory, bytes.
    pub memory: u64,
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Policy tick, microseconds.
    pub tick_us: u64,
    /// Window over which guarantees and maxima hold, milliseconds.
    pub window_ms: u64,
    /// Executor for backends.
    pub device: DeviceKind,
    /// The GPUs.
    pub gpus: Vec<GpuConfig>,
    /// Slices declared in the file (or the default slice).
    pub slices: Vec<SliceSpec>,
}

impl Default for Config {
    fn default() -> Config {
        let gpu = GpuConfig {
            index: 0,
            memory: DEFAULT_GPU_MEMORY,
        };
        Config {
            tick_us: 1000,
            window_ms: 100,
            device: DeviceKind::Cuda,
            slices: vec![default_slice(&gpu)],
            gpus: vec![gpu],
        }
    }
}

/// The slice a host gets when the configuration declares none: best-effort, owning the GPU.
pub fn default_slice(gpu: &GpuConfig) -> SliceSpec {
    SliceSpec {
        name: "default".into(),
        tenant: "default".into(),
        gpu: gpu.index,
        class: SliceClass::BestEffort,
        compute_guarantee_pct: 100,
        compute_max_pct: 100,
        memory_guarantee: 0,
        memory_limit: gpu.memory,
        weight: 1,
        attach: true,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    index: u32,
    memory: Size,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    tick_us: Option<u64>,
    window_ms: Option<u64>,
    device: Option<DeviceKind>,
    gpu: Option<Vec<RawGpu>>,
    slice: Option<Vec<SliceRequest>>,
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks `text`; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let defaults = Config::default();
        let gpus: Vec<GpuConfig> = match raw.gpu {
            Some(list) => list
                .into_iter()
                .map(|g| GpuConfig {
                    index: g.index,
                    memory: g.memory.0,
                })
                .collect(),
            None => defaults.gpus.clone(),
        };
        if gpus.is_empty() {
            return Err(invalid("it lists no GPUs.".into()));
        }
        for (i, g) in gpus.iter().enumerate() {
            if gpus[..i].iter().any(|o| o.index == g.index) {
                return Err(invalid(format!("GPU {} is listed twice.", g.index)));
            }
            if usize::try_from(g.index).map_or(true, |i| i >= vgpu_board::MAX_GPUS) {
                return Err(invalid(format!(
                    "GPU index {} is beyond the {} GPUs the board supports.",
                    g.index,
                    vgpu_board::MAX_GPUS
                )));
            }
            if g.memory == 0 {
                return Err(invalid(format!("GPU {} has no memory.", g.index)));
            }
        }
        let tick_us = raw.tick_us.unwrap_or(defaults.tick_us);
        if !(50..=1_000_000).contains(&tick_us) {
            return Err(invalid(format!("tick_us is {tick_us}; use 50 to 1000000.")));
        }
        let window_ms = raw.window_ms.unwrap_or(defaults.window_ms);
        if window_ms == 0 || window_ms.saturating_mul(1000) < tick_us.saturating_mul(10) {
            return Err(invalid(format!(
                "window_ms is {window_ms}; it must span at least 10 ticks of {tick_us} µs."
            )));
        }
        let slices: Vec<SliceSpec> = match raw.slice {
            Some(list) => list
                .into_iter()
                .map(|r| {
                    let memory = gpus
                        .iter()
                        .find(|g| g.index == r.gpu)
                        .map_or(0, |g| g.memory);
                    r.resolve(memory)
                })
                .collect(),
            None => vec![default_slice(&gpus[0])],
        };
        for (i, s) in slices.iter().enumerate() {
            let slice_err = |source| ConfigError::Slice {
                path: path.to_path_buf(),
                source,
            };
            if slices[..i].iter().any(|o| o.name == s.name) {
                return Err(slice_err(AdmissionError::NameTaken(s.name.clone())));
            }
            admission::check(s, &gpus, &slices[..i]).map_err(slice_err)?;
        }
        Ok(Config {
            tick_us,
            window_ms,
            device: raw.device.unwrap_or(defaults.device),
            gpus,
            slices,
        })
    }

    /// The configured GPU with `index`.
    pub fn gpu(&self, index: u32) -> Option<&GpuConfig> {
        self.gpus.iter().find(|g| g.index == index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/vgpu.toml"))
    }

    #[test]
    fn empty_file_gives_the_embedded_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            (c.tick_us, c.window_ms, c.device),
            (1000, 100, DeviceKind::Cuda)
        );
        assert_eq!(
            c.gpus,
            vec![GpuConfig {
                index: 0,
                memory: 80 << 30
            }]
        );
        assert_eq!(c.slices.len(), 1);
        let s = &c.slices[0];
        assert_eq!((s.name.as_str(), s.tenant.as_str()), ("default", "default"));
        assert_eq!((s.compute_guarantee_pct, s.compute_max_pct), (100, 100));
        assert_eq!(s.memory_limit, 80 << 30);
        assert!(s.attach);
    }

    #[test]
    fn full_file_parses_sizes_classes_and_defaults() {
        let c = parse(
            r#"
tick_us = 500
window_ms = 50
device = "emulated"

[[gpu]]
index = 0
memory = "16GiB"

[[gpu]]
index = 1
memory = 1073741824

[[slice]]
name = "lc"
tenant = "acme"
class = "latency-critical"
compute_guarantee_pct = 30
memory_guarantee = "4GiB"
memory_limit = "8GiB"
attach = true

[[slice]]
name = "be"
tenant = "acme"
gpu = 1
compute_guarantee_pct = 70
"#,
        )
        .unwrap();
        assert_eq!(
            (c.tick_us, c.window_ms, c.device),
            (500, 50, DeviceKind::Emulated)
        );
        assert_eq!(c.gpus[0].memory, 16 << 30);
        assert_eq!(c.gpus[1].memory, 1 << 30);
        assert_eq!(c.slices[0].class, SliceClass::LatencyCritical);
        assert_eq!(c.slices[0].memory_limit, 8 << 30);
        assert_eq!(c.slices[1].class, SliceClass::BestEffort);
        assert_eq!(c.slices[1].memory_limit, 1 << 30);
        assert!(!c.slices[1].attach);
    }

    #[test]
    fn empty_slice_list_means_no_slices() {
        let c = parse("slice = []").unwrap();
        assert!(c.slices.is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let e = parse("tick_us = \"fast\"").unwrap_err().to_string();
        assert!(
            e.starts_with("The configuration /etc/vgpu.toml is invalid: "),
            "{e}"
        );
        let e = parse("bogus = 1").unwrap_err().to_string();
        assert!(e.contains("/etc/vgpu.toml") && e.contains("bogus"), "{e}");
        let e = parse("[[gpu]]\nindex = 0\nmemory = \"12 parsecs\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown size unit"), "{e}");
        let e = parse("tick_us = 10").unwrap_err().to_string();
        assert_eq!(
            e,
            "The configuration /etc/vgpu.toml is invalid: tick_us is 10; use 50 to 1000000."
        );
    }

    #[test]
    fn oversubscribed_slices_in_the_file_are_refused() {
        let e = parse(
            r#"
[[slice]]
name = "a"
tenant = "t"
compute_guarantee_pct = 80
[[slice]]
name = "b"
tenant = "t"
compute_guarantee_pct = 30
"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            e,
            "The configuration /etc/vgpu.toml declares a slice that cannot be admitted: \
             GPU 0 has 20% of compute left to guarantee; slice b asks 30%."
        );
    }

    #[test]
    fn duplicate_gpus_and_slice_names_are_refused() {
        let e = parse("[[gpu]]\nindex = 0\nmemory = 1\n[[gpu]]\nindex = 0\nmemory = 1")
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("GPU 0 is listed twice."), "{e}");
        let e = parse(
            "[[slice]]\nname = \"a\"\ntenant = \"t\"\n[[slice]]\nname = \"a\"\ntenant = \"t\"",
        )
        .unwrap_err()
        .to_string();
        assert!(e.ends_with("Slice a already exists."), "{e}");
    }

    #[test]
    fn device_kind_parses_from_cli_words() {
        assert_eq!("cuda".parse::<DeviceKind>(), Ok(DeviceKind::Cuda));
        assert_eq!("emulated".parse::<DeviceKind>(), Ok(DeviceKind::Emulated));
        assert!("tpu".parse::<DeviceKind>().is_err());
    }
}

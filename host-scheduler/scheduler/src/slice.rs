//! The slice data types shared by the configuration, the registry and the REST API.
//!
//! A slice is a share of one physical GPU: a guaranteed and a maximum compute percentage, a
//! memory guarantee and limit, a weight for sharing idle time, and a priority class.
use serde::{Deserialize, Deserializer, Serialize};

/// A slice's priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SliceClass {
    /// Dispatches at once; best-effort work yields to it.
    LatencyCritical,
    /// Shares what latency-critical work leaves, by guarantee and weight.
    #[default]
    BestEffort,
}

impl SliceClass {
    /// The board's encoding of this class.
    pub fn board(self) -> vgpu_board::Class {
        match self {
            SliceClass::LatencyCritical => vgpu_board::Class::LatencyCritical,
            SliceClass::BestEffort => vgpu_board::Class::BestEffort,
        }
    }

    /// The name used in JSON and TOML.
    pub fn as_str(self) -> &'static str {
        match self {
            SliceClass::LatencyCritical => "latency-critical",
            SliceClass::BestEffort => "best-effort",
        }
    }
}

/// A byte count that deserializes from an integer or a string such as `"16GiB"` or `"512 MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(deserializer) {
            Ok(Raw::Int(n)) => Ok(Size(n)),
            Ok(Raw::Text(s)) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a byte count: a non-negative integer or a string such as \"16GiB\"",
            )),
        }
    }
}

/// Parses `"16GiB"`, `"512 MiB"`, `"1.5GiB"`, `"8G"` (binary), `"2GB"` (decimal) or `"1024"`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(format!("{text:?} has an unknown size unit {unit:?}")),
    };
    if num.is_empty() {
        return Err(format!("{text:?} is not a size such as \"16GiB\""));
    }
    if let Ok(n) = num.parse::<u64>() {
        return n
            .checked_mul(multiplier)
            .ok_or_else(|| format!("{text:?} is too large"));
    }
    let f: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as \"16GiB\""))?;
    let bytes = f * multiplier as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{text:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

/// Formats a byte count for people: `16 GiB`, `1536 MiB`, `1000 bytes`.
pub fn format_bytes(bytes: u64) -> String {
    for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if bytes >= (1u64 << shift) && bytes.is_multiple_of(1u64 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    if bytes >= 1 << 30 {
        return format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64);
    }
    format!("{bytes} bytes")
}

fn default_max_pct() -> u32 {
    100
}

fn default_weight() -> u32 {
    1
}

/// A slice as asked for (REST `POST /v1/slices` body, or a `[[slice]]` table in the config);
/// optional fields not yet filled in.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceRequest {
    /// `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// Who the slice belongs to.
    pub tenant: String,
    /// GPU index (default 0).
    #[serde(default)]
    pub gpu: u32,
    /// Priority class (default best-effort).
    #[serde(default)]
    pub class: SliceClass,
    /// Guaranteed compute % (default 0).
    #[serde(default)]
    pub compute_guarantee_pct: u32,
    /// Maximum compute % (default 100).
    #[serde(default = "default_max_pct")]
    pub compute_max_pct: u32,
    /// Guaranteed memory (default 0).
    #[serde(default)]
    pub memory_guarantee: Option<Size>,
    /// Memory limit (default: the GPU's memory).
    #[serde(default)]
    pub memory_limit: Option<Size>,
    /// Weight when sharing time beyond guarantees (default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Start the backend at once (default false).
    #[serde(default)]
    pub attach: bool,
}

impl SliceRequest {
    /// Fills in the defaults; `gpu_memory` is the memory of the slice's GPU (0 if unknown).
    pub fn resolve(self, gpu_memory: u64) -> SliceSpec {
        SliceSpec {
            name: self.name,
            tenant: self.tenant,
            gpu: self.gpu,
            class: self.class,
            compute_guarantee_pct: self.compute_guarantee_pct,
            compute_max_pct: self.compute_max_pct,
            memory_guarantee: self.memory_guarantee.map_or(0, |s| s.0),
            memory_limit: self.memory_limit.map_or(gpu_memory, |s| s.0),
            weight: self.weight,
            attach: self.attach,
        }
    }
}

/// A slice's declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceSpec {
    /// `[a-z0-9][a-z0-9-]{0,62}`.
    pub name: String,
    /// Who the slice belongs to.
    pub tenant: String,
    /// GPU index.
    pub gpu: u32,
    /// Priority class.
    pub class: SliceClass,
    /// Guaranteed compute %.
    pub compute_guarantee_pct: u32,
    /// Maximum compute %.
    pub compute_max_pct: u32,
    /// Guaranteed memory, bytes.
    pub memory_guarantee: u64,
    /// Memory limit, bytes.
    pub memory_limit: u64,
    /// Weight when sharing time beyond guarantees.
    pub weight: u32,
    /// Whether the backend was asked to start at creation.
    pub attach: bool,
}

/// REST `PATCH /v1/slices/{name}` body: every field optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceUpdate {
    /// New guaranteed compute %.
    #[serde(default)]
    pub compute_guarantee_pct: Option<u32>,
    /// New maximum compute %.
    #[serde(default)]
    pub compute_max_pct: Option<u32>,
    /// New memory guarantee.
    #[serde(default)]
    pub memory_guarantee: Option<Size>,
    /// New memory limit.
    #[serde(default)]
    pub memory_limit: Option<Size>,
    /// New weight.
    #[serde(default)]
    pub weight: Option<u32>,
}

impl SliceUpdate {
    /// `spec` with this update applied.
    pub fn apply(&self, spec: &SliceSpec) -> SliceSpec {
        let mut s = spec.clone();
        if let Some(v) = self.compute_guarantee_pct {
            s.compute_guarantee_pct = v;
        }
        if let Some(v) = self.compute_max_pct {
            s.compute_max_pct = v;
        }
        if let Some(v) = self.memory_guarantee {
            s.memory_guarantee = v.0;
        }
        if let Some(v) = self.memory_limit {
            s.memory_limit = v.0;
        }
        if let Some(v) = self.weight {
            s.weight = v;
        }
        s
    }
}

/// A slice as the API shows it: its spec and its live state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slice {
    /// The declared shape.
    #[serde(flatten)]
    pub spec: SliceSpec,
    /// A backend is started for it.
    pub attached: bool,
    /// The backend's vhost-user socket, while attached.
    pub socket: Option<String>,
    /// Its slot on the grant board, while attached.
    pub board_slot: Option<usize>,
    /// The backend's process id, while one runs.
    pub backend_pid: Option<u32>,
    /// How many times its backend was restarted.
    pub restarts: u64,
}

/// Live utilization of one attached slice (REST `GET /v1/util`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Util {
    /// Slice name.
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Its GPU.
    pub gpu: u32,
    /// Its class.
    pub class: SliceClass,
    /// GPU time consumed over the last second, % of wall time.
    pub busy_pct: f64,
    /// Time held back by the board over the last second, % of wall time.
    pub throttled_pct: f64,
    /// It has GPU work queued, waiting or in flight.
    pub busy: bool,
    /// Its grant lets it dispatch now.
    pub running: bool,
    /// GPU time consumed since attach, seconds.
    pub gpu_seconds: f64,
    /// Kernels launched since attach.
    pub launches: u64,
    /// Bytes copied host to device since attach.
    pub htod_bytes: u64,
    /// Bytes copied device to host since attach.
    pub dtoh_bytes: u64,
    /// Backend restarts.
    pub restarts: u64,
    /// The latest preemption latency (grant withdrawn to in-flight work drained), µs; 0 if none.
    pub preempt_last_us: f64,
    /// The largest preemption latency since attach, µs; 0 if none.
    pub preempt_max_us: f64,
    /// Median preemption latency of the latest 1024 preemptions seen, µs; 0 if none.
    pub preempt_p50_us: f64,
    /// 99th percentile preemption latency of the latest 1024 preemptions seen, µs; 0 if none.
    pub preempt_p99_us: f64,
    /// Preemptions seen since attach. The scheduler samples the board every tick, so
    /// back-to-back preemptions within one tick count once.
    pub preemptions: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_binary_decimal_and_plain_forms() {
        assert_eq!(parse_size("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_size("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("GiB").is_err());
    }

    #[test]
    fn size_deserializes_from_integer_or_string() {
        let v: Vec<Size> = serde_json::from_str(r#"[1024, "1KiB"]"#).unwrap();
        assert_eq!(v, vec![Size(1024), Size(1024)]);
        assert!(serde_json::from_str::<Size>("-1").is_err());
    }

    #[test]
    fn bytes_format_in_the_largest_exact_unit() {
        assert_eq!(format_bytes(16 << 30), "16 GiB");
        assert_eq!(format_bytes(1536 << 20), "1536 MiB");
        assert_eq!(format_bytes(1000), "1000 bytes");
    }

    #[test]
    fn slice_request_fills_defaults() {
        let r: SliceRequest =
            serde_json::from_str(r#"{"name":"a","tenant":"t","compute_guarantee_pct":20}"#)
                .unwrap();
        let s = r.resolve(80 << 30);
        assert_eq!(s.class, SliceClass::BestEffort);
        assert_eq!((s.gpu, s.compute_max_pct, s.weight), (0, 100, 1));
        assert_eq!((s.memory_guarantee, s.memory_limit), (0, 80 << 30));
        assert!(!s.attach);
    }

    #[test]
    fn slice_request_rejects_unknown_fields() {
        let e = serde_json::from_str::<SliceRequest>(r#"{"name":"a","tenant":"t","bogus":1}"#);
        assert!(e.is_err());
    }

    #[test]
    fn slice_serializes_flat_with_kebab_case_class() {
        let s = Slice {
            spec: SliceRequest {
                name: "lc".into(),
                tenant: "acme".into(),
                gpu: 0,
                class: SliceClass::LatencyCritical,
                compute_guarantee_pct: 30,
                compute_max_pct: 100,
                memory_guarantee: None,
                memory_limit: None,
                weight: 1,
                attach: false,
            }
            .resolve(1 << 30),
            attached: false,
            socket: None,
            board_slot: None,
            backend_pid: None,
            restarts: 0,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["class"], "latency-critical");
        assert_eq!(v["name"], "lc");
        assert_eq!(v["memory_limit"], 1u64 << 30);
        assert_eq!(v["restarts"], 0);
    }

    #[test]
    fn util_serializes_every_documented_field() {
        let u = Util {
            name: "lc".into(),
            tenant: "acme".into(),
            gpu: 0,
            class: SliceClass::LatencyCritical,
            busy_pct: 41.2,
            throttled_pct: 0.0,
            busy: true,
            running: true,
            gpu_seconds: 12.5,
            launches: 100,
            htod_bytes: 1,
            dtoh_bytes: 2,
            restarts: 0,
            preempt_last_us: 12.5,
            preempt_max_us: 80.0,
            preempt_p50_us: 10.0,
            preempt_p99_us: 75.5,
            preemptions: 7,
        };
        let v = serde_json::to_value(&u).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "busy",
                "busy_pct",
                "class",
                "dtoh_bytes",
                "gpu",
                "gpu_seconds",
                "htod_bytes",
                "launches",
                "name",
                "preempt_last_us",
                "preempt_max_us",
                "preempt_p50_us",
                "preempt_p99_us",
                "preemptions",
                "restarts",
                "running",
                "tenant",
                "throttled_pct"
            ]
        );
        assert_eq!(v["preempt_max_us"], 80.0);
        assert_eq!(v["preempt_p99_us"], 75.5);
        assert_eq!(v["preemptions"], 7);
    }
}

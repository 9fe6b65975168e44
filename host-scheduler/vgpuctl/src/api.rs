//! The scheduler's REST API as vgpuctl sees it: request bodies it sends and the answers it reads.
//!
//! Request bodies leave out what the user did not give, so the scheduler's defaults apply.
//! Answers are read leniently (missing fields take defaults, unknown fields are ignored), so
//! vgpuctl keeps working when the scheduler adds fields.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `class` of a slice.
pub const LATENCY_CRITICAL: &str = "latency-critical";
/// `class` of a slice.
pub const BEST_EFFORT: &str = "best-effort";

/// One HTTP request to the scheduler.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRequest {
    /// `GET`, `POST`, `PATCH`, `DELETE`.
    pub method: &'static str,
    /// The path, such as `/v1/slices/lc`.
    pub path: String,
    /// The JSON body, if any.
    pub body: Option<Value>,
}

impl ApiRequest {
    /// A request without a body.
    pub fn new(method: &'static str, path: impl Into<String>) -> ApiRequest {
        ApiRequest {
            method,
            path: path.into(),
            body: None,
        }
    }

    /// A request with a JSON body.
    pub fn with_body(method: &'static str, path: impl Into<String>, body: Value) -> ApiRequest {
        ApiRequest {
            method,
            path: path.into(),
            body: Some(body),
        }
    }
}

/// `POST /v1/slices` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SliceSpec {
    /// Slice name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// GPU index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<u32>,
    /// `latency-critical` or `best-effort`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Guaranteed compute, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_guarantee_pct: Option<u32>,
    /// Maximum compute, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_max_pct: Option<u32>,
    /// Guaranteed memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_guarantee: Option<u64>,
    /// Memory limit, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// Share of idle time relative to other best-effort slices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Start the backend at once.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub attach: bool,
}

/// `PATCH /v1/slices/{name}` body: only the fields to change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SliceUpdate {
    /// Guaranteed compute, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_guarantee_pct: Option<u32>,
    /// Maximum compute, percent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_max_pct: Option<u32>,
    /// Guaranteed memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_guarantee: Option<u64>,
    /// Memory limit, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    /// Weight.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

/// A slice as the scheduler reports it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Slice {
    /// Slice name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// GPU index.
    pub gpu: u32,
    /// `latency-critical` or `best-effort`.
    pub class: String,
    /// Guaranteed compute, percent.
    pub compute_guarantee_pct: f64,
    /// Maximum compute, percent.
    pub compute_max_pct: f64,
    /// Guaranteed memory, bytes.
    pub memory_guarantee: u64,
    /// Memory limit, bytes.
    pub memory_limit: u64,
    /// Weight.
    pub weight: f64,
    /// Whether a backend runs for it.
    pub attached: bool,
    /// The backend's vhost-user socket, when attached.
    pub socket: Option<String>,
    /// Its grant board slot.
    pub board_slot: Option<u32>,
    /// The backend's pid, when running.
    pub backend_pid: Option<u32>,
    /// How often its backend was restarted.
    pub restarts: u64,
}

/// Live utilization of one slice.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct Util {
    /// Slice name.
    pub name: String,
    /// Tenant.
    pub tenant: String,
    /// GPU index.
    pub gpu: u32,
    /// `latency-critical` or `best-effort`.
    pub class: String,
    /// GPU busy time over the last second, percent.
    pub busy_pct: f64,
    /// Time held back by the scheduler over the last second, percent.
    pub throttled_pct: f64,
    /// Has work queued or in flight now.
    pub busy: bool,
    /// Its grant lets it dispatch now (false: held back by the scheduler).
    pub running: bool,
    /// GPU time consumed in total.
    pub gpu_seconds: f64,
    /// Kernels launched in total.
    pub launches: u64,
    /// Bytes copied host to device.
    pub htod_bytes: u64,
    /// Bytes copied device to host.
    pub dtoh_bytes: u64,
    /// Backend restarts.
    pub restarts: u64,
    /// The latest preemption latency (grant withdrawn to in-flight work drained), µs.
    pub preempt_last_us: f64,
    /// The largest preemption latency since attach, µs.
    pub preempt_max_us: f64,
    /// Median latency of the latest preemptions seen, µs.
    pub preempt_p50_us: f64,
    /// 99th percentile latency of the latest preemptions seen, µs.
    pub preempt_p99_us: f64,
    /// Preemptions seen since attach (sampled at the scheduler's tick).
    pub preemptions: u64,
}

/// An error answer's body: `{"error": "..."}`.
#[derive(Debug, Clone, Deserialize)]
pub struct ErrorBody {
    /// The message, in sentence case.
    pub error: String,
}

/// The path of slice `name` (names are `[a-z0-9-]`, so they need no escaping; anything else is
/// percent-encoded so it reaches the scheduler, which refuses it by name).
pub fn slice_path(name: &str) -> String {
    format!("/v1/slices/{}", percent_encode(name))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (for path segments and
/// query values).
pub fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn slice_spec_leaves_out_what_was_not_given() {
        let spec = SliceSpec {
            name: "be".to_owned(),
            tenant: "t".to_owned(),
            ..SliceSpec::default()
        };
        assert_eq!(
            serde_json::to_value(&spec).unwrap(),
            json!({"name": "be", "tenant": "t"})
        );
    }

    #[test]
    fn slices_parse_leniently() {
        let slice: Slice = serde_json::from_value(json!({
            "name": "lc", "tenant": "acme", "gpu": 1, "class": "latency-critical",
            "compute_guarantee_pct": 30, "compute_max_pct": 100, "memory_guarantee": 8,
            "memory_limit": 16, "weight": 1, "attached": true, "socket": "/s.sock",
            "board_slot": 3, "backend_pid": 1234, "restarts": 2, "something_new": [1]
        }))
        .unwrap();
        assert_eq!(slice.name, "lc");
        assert_eq!(slice.gpu, 1);
        assert_eq!(slice.compute_guarantee_pct, 30.0);
        assert_eq!(slice.socket.as_deref(), Some("/s.sock"));
        assert_eq!(slice.backend_pid, Some(1234));
        assert_eq!(slice.restarts, 2);

        let bare: Slice = serde_json::from_value(json!({"name": "x", "socket": null})).unwrap();
        assert_eq!(bare.socket, None);
        assert!(!bare.attached);
    }

    #[test]
    fn util_parses_the_preemption_fields_and_defaults_them() {
        let u: Util = serde_json::from_value(json!({
            "name": "lc", "busy_pct": 1.5, "preempt_last_us": 12.0, "preempt_max_us": 90.5,
            "preempt_p50_us": 10.0, "preempt_p99_us": 80.0, "preemptions": 3
        }))
        .unwrap();
        assert_eq!(u.preempt_max_us, 90.5);
        assert_eq!(u.preempt_p99_us, 80.0);
        assert_eq!(u.preemptions, 3);
        let old: Util = serde_json::from_value(json!({"name": "lc"})).unwrap();
        assert_eq!((old.preempt_max_us, old.preemptions), (0.0, 0));
    }

    #[test]
    fn slice_paths_escape_what_is_not_a_plain_name() {
        assert_eq!(slice_path("lc-1"), "/v1/slices/lc-1");
        assert_eq!(slice_path("a/b c"), "/v1/slices/a%2Fb%20c");
    }
}

//! `GET /metrics`: OpenMetrics text (the `prometheus-client` crate), one series per slice with
//! labels `tenant`, `slice`, `gpu`, `class`.
//!
//! | metric | type | source |
//! |---|---|---|
//! | `vgpu_gpu_seconds_total` | counter | GPU busy time |
//! | `vgpu_kernels_total` | counter | kernels launched |
//! | `vgpu_copied_bytes_total{direction="htod"\|"dtoh"}` | counter | bytes copied |
//! | `vgpu_throttled_seconds_total` | counter | time held back by the grant board (board) |
//! | `vgpu_backend_restarts_total` | counter | backend restarts (supervisor) |
//! | `vgpu_memory_reclaims_total` | counter | times the slice's memory was reclaimed (swapped out), since attach (board) |
//! | `vgpu_memory_resident_bytes`, `vgpu_memory_swapped_bytes` | gauge | device memory on the GPU and swapped out to host memory now (board; the ledger's interval average when the board has none) |
//! | `vgpu_busy_ratio` | gauge | GPU busy time over wall time, last second (board) |
//! | `vgpu_preemption_latency_max_seconds` | gauge | largest preemption latency since attach: grant withdrawn to in-flight work drained (board) |
//! | `vgpu_preemptions_total` | counter | preemptions since attach (board, sampled every tick: back-to-back ones within a tick count once) |
//!
//! GPU seconds, kernels and copies are the larger of the ledger's all-time total (durable, it
//! survives restarts, but lags by the interval in flight) and the board's live counter (since
//! the slice's backend was attached, reset when the scheduler restarts).
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use vgpu_ledger::SliceSummary;

use crate::api::ApiError;
use crate::service::{Core, SliceMeter};
use crate::usage::Metering;

/// The OpenMetrics content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const NS_PER_S: f64 = 1e9;

/// The labels of every per-slice series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SliceLabels {
    tenant: String,
    slice: String,
    gpu: u32,
    class: String,
}

/// The labels of the copy counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CopyLabels {
    tenant: String,
    slice: String,
    gpu: u32,
    class: String,
    direction: String,
}

type F64Counter = Family<SliceLabels, Counter<f64, std::sync::atomic::AtomicU64>>;
type F64Gauge = Family<SliceLabels, Gauge<f64, std::sync::atomic::AtomicU64>>;

/// The `/metrics` route.
pub fn router(core: Arc<Core>, metering: Arc<Metering>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state((core, metering))
}

async fn metrics(State((core, metering)): State<(Arc<Core>, Arc<Metering>)>) -> Response {
    let slices: Vec<(SliceMeter, Option<SliceSummary>)> = core
        .meters()
        .into_iter()
        .map(|m| {
            let summary = metering.summary(&m.tenant, &m.name);
            (m, summary)
        })
        .collect();
    match render(&slices) {
        Ok(text) => ([(header::CONTENT_TYPE, CONTENT_TYPE)], text).into_response(),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Cannot encode the metrics: {e}."),
        )
        .into_response(),
    }
}

/// The OpenMetrics text for `slices` (each with its ledger summary, if it has records).
pub fn render(slices: &[(SliceMeter, Option<SliceSummary>)]) -> Result<String, std::fmt::Error> {
    let gpu_seconds = F64Counter::default();
    let kernels = Family::<SliceLabels, Counter>::default();
    let copied = Family::<CopyLabels, Counter>::default();
    let throttled = F64Counter::default();
    let restarts = Family::<SliceLabels, Counter>::default();
    let reclaims = Family::<SliceLabels, Counter>::default();
    let resident = F64Gauge::default();
    let swapped = F64Gauge::default();
    let busy = F64Gauge::default();
    let preempt_max = F64Gauge::default();
    let preemptions = Family::<SliceLabels, Counter>::default();

    for (m, summary) in slices {
        let labels = SliceLabels {
            tenant: m.tenant.clone(),
            slice: m.name.clone(),
            gpu: m.gpu,
            class: m.class.as_str().to_owned(),
        };
        let board = m.board.unwrap_or_default();
        let totals = summary
            .as_ref()
            .map(|s| s.totals.clone())
            .unwrap_or_default();
        let ledger_u64 = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        let gpu_ns = ledger_u64(totals.gpu_ns).max(board.busy_ns);
        gpu_seconds
            .get_or_create(&labels)
            .inc_by(gpu_ns as f64 / NS_PER_S);
        kernels
            .get_or_create(&labels)
            .inc_by(ledger_u64(totals.kernels).max(board.launches));
        for (direction, ledger, live) in [
            ("htod", totals.htod_bytes, board.htod_bytes),
            ("dtoh", totals.dtoh_bytes, board.dtoh_bytes),
        ] {
            let copy = CopyLabels {
                tenant: labels.tenant.clone(),
                slice: labels.slice.clone(),
                gpu: labels.gpu,
                class: labels.class.clone(),
                direction: direction.to_owned(),
            };
            copied
                .get_or_create(&copy)
                .inc_by(ledger_u64(ledger).max(live));
        }
        throttled
            .get_or_create(&labels)
            .inc_by(board.throttled_ns as f64 / NS_PER_S);
        restarts.get_or_create(&labels).inc_by(m.restarts);
        reclaims.get_or_create(&labels).inc_by(board.reclaims);
        let (res, swp) = if board.mem_resident > 0 || board.mem_swapped > 0 {
            (board.mem_resident as f64, board.mem_swapped as f64)
        } else {
            summary
                .as_ref()
                .map_or((0.0, 0.0), |s| (s.resident_bytes, s.swapped_bytes))
        };
        resident.get_or_create(&labels).set(res);
        swapped.get_or_create(&labels).set(swp);
        busy.get_or_create(&labels).set(m.busy_ratio);
        preempt_max
            .get_or_create(&labels)
            .set(board.preempt_max_ns as f64 / NS_PER_S);
        preemptions.get_or_create(&labels).inc_by(m.preemptions);
    }

    let mut registry = Registry::default();
    registry.register_with_unit(
        "vgpu_gpu",
        "GPU busy time of the slice (overlapping work counted once)",
        Unit::Seconds,
        gpu_seconds,
    );
    registry.register("vgpu_kernels", "Kernels launched by the slice", kernels);
    registry.register_with_unit(
        "vgpu_copied",
        "Bytes the slice copied between host and device, by direction (htod, dtoh)",
        Unit::Bytes,
        copied,
    );
    registry.register_with_unit(
        "vgpu_throttled",
        "Time the slice's backend was held back by the scheduler's grants",
        Unit::Seconds,
        throttled,
    );
    registry.register(
        "vgpu_backend_restarts",
        "Times the slice's backend was restarted after it exited",
        restarts,
    );
    registry.register(
        "vgpu_memory_reclaims",
        "Memory reclaims from the slice; always 0 until elastic memory exists",
        reclaims,
    );
    registry.register_with_unit(
        "vgpu_memory_resident",
        "Device memory resident for the slice, average over the latest reported interval",
        Unit::Bytes,
        resident,
    );
    registry.register_with_unit(
        "vgpu_memory_swapped",
        "Slice memory swapped out to the host, average over the latest reported interval",
        Unit::Bytes,
        swapped,
    );
    registry.register(
        "vgpu_busy_ratio",
        "GPU busy time of the slice over wall time in the last second (0 to 1)",
        busy,
    );
    registry.register_with_unit(
        "vgpu_preemption_latency_max",
        "Largest preemption latency of the slice since attach: grant withdrawn to in-flight work drained",
        Unit::Seconds,
        preempt_max,
    );
    registry.register(
        "vgpu_preemptions",
        "Preemptions of the slice since attach, sampled every scheduler tick",
        preemptions,
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slice::SliceClass;
    use vgpu_board::SlotSnapshot;
    use vgpu_ledger::UsageReport;

    fn meter(board: Option<SlotSnapshot>) -> SliceMeter {
        SliceMeter {
            name: "lc".into(),
            tenant: "acme".into(),
            gpu: 0,
            class: SliceClass::LatencyCritical,
            board,
            busy_ratio: 0.25,
            restarts: 2,
            preemptions: 0,
        }
    }

    fn summary(gpu_ns: u64) -> SliceSummary {
        let mut s = SliceSummary::new("acme", "lc");
        s.add(&UsageReport {
            backend: "b".into(),
            seq: 1,
            tenant: "acme".into(),
            slice: "lc".into(),
            session: 1,
            start_unix_ns: 0,
            end_unix_ns: 1_000_000_000,
            gpu_ns,
            mem_resident_byte_ns: 3 * (1 << 30) * 1_000_000_000,
            mem_swapped_byte_ns: 0,
            htod_bytes: 10,
            dtoh_bytes: 20,
            kernels: 5,
        });
        s
    }

    const LABELS: &str = r#"tenant="acme",slice="lc",gpu="0",class="latency-critical""#;

    fn line<'a>(text: &'a str, series: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(series))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn every_metric_is_named_typed_and_labelled_per_slice() {
        let text = render(&[(meter(None), Some(summary(1_500_000_000)))]).unwrap();
        assert!(text.ends_with("# EOF\n"), "{text}");
        for (name, kind) in [
            ("vgpu_gpu_seconds", "counter"),
            ("vgpu_kernels", "counter"),
            ("vgpu_copied_bytes", "counter"),
            ("vgpu_throttled_seconds", "counter"),
            ("vgpu_backend_restarts", "counter"),
            ("vgpu_memory_reclaims", "counter"),
            ("vgpu_memory_resident_bytes", "gauge"),
            ("vgpu_memory_swapped_bytes", "gauge"),
            ("vgpu_busy_ratio", "gauge"),
            ("vgpu_preemption_latency_max_seconds", "gauge"),
            ("vgpu_preemptions", "counter"),
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} {kind} in\n{text}"
            );
        }
        assert!(text.contains("# HELP vgpu_memory_reclaims Memory reclaims from the slice; always 0 until elastic memory exists"));
        assert_eq!(
            line(&text, "vgpu_gpu_seconds_total{"),
            format!("vgpu_gpu_seconds_total{{{LABELS}}} 1.5")
        );
        assert_eq!(
            line(&text, "vgpu_kernels_total{"),
            format!("vgpu_kernels_total{{{LABELS}}} 5")
        );
        assert!(text.contains(&format!(
            "vgpu_copied_bytes_total{{{LABELS},direction=\"dtoh\"}} 20\n"
        )));
        assert_eq!(
            line(&text, "vgpu_backend_restarts_total{"),
            format!("vgpu_backend_restarts_total{{{LABELS}}} 2")
        );
        assert_eq!(
            line(&text, "vgpu_memory_reclaims_total{"),
            format!("vgpu_memory_reclaims_total{{{LABELS}}} 0")
        );
        assert_eq!(
            line(&text, "vgpu_memory_resident_bytes{"),
            format!("vgpu_memory_resident_bytes{{{LABELS}}} 3221225472.0")
        );
        assert_eq!(
            line(&text, "vgpu_busy_ratio{"),
            format!("vgpu_busy_ratio{{{LABELS}}} 0.25")
        );
    }

    #[test]
    fn live_board_counters_win_while_ahead_of_the_ledger() {
        let board = SlotSnapshot {
            generation: 1,
            busy_ns: 4_000_000_000,
            throttled_ns: 500_000_000,
            launches: 3,
            ..SlotSnapshot::default()
        };
        let text = render(&[(meter(Some(board)), Some(summary(1_000_000_000)))]).unwrap();
        assert!(
            text.contains(&format!("vgpu_gpu_seconds_total{{{LABELS}}} 4.0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("vgpu_kernels_total{{{LABELS}}} 5\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("vgpu_throttled_seconds_total{{{LABELS}}} 0.5\n")),
            "{text}"
        );
    }

    #[test]
    fn preemption_latency_and_count_are_reported_per_slice() {
        let board = SlotSnapshot {
            generation: 1,
            preempt_last_ns: 20_000,
            preempt_max_ns: 250_000,
            ..SlotSnapshot::default()
        };
        let mut m = meter(Some(board));
        m.preemptions = 42;
        let text = render(&[(m, None)]).unwrap();
        assert_eq!(
            line(&text, "vgpu_preemption_latency_max_seconds{"),
            format!("vgpu_preemption_latency_max_seconds{{{LABELS}}} 0.00025")
        );
        assert_eq!(
            line(&text, "vgpu_preemptions_total{"),
            format!("vgpu_preemptions_total{{{LABELS}}} 42")
        );
    }

    #[test]
    fn a_slice_without_records_or_slot_reports_zeros() {
        let text = render(&[(meter(None), None)]).unwrap();
        assert!(
            text.contains(&format!("vgpu_gpu_seconds_total{{{LABELS}}} 0.0\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("vgpu_memory_swapped_bytes{{{LABELS}}} 0.0\n")),
            "{text}"
        );
    }
}

#!/usr/bin/env python3
"""Builds the colocation benchmark's result from the logs run.sh left.

Usage: report.py LOGS_DIR OUT_DIR VGPU_LIB_DIR

Reads LOGS_DIR/phases.tsv, sessions.tsv, <phase>.<tag>.{json,rc,err,cmd} and
<phase>.util/ (vgpuctl util samples); writes OUT_DIR/colocation-<gpu>-<date>.json and prints
a table. Environment: GPU_INFO (nvidia-smi csv: name, driver, memory, bus id, compute mode),
VGPU_COMMIT, and the run's parameters (SECS, LC_*, GEMM_*, TRAIN_*, LC_GUARANTEE, ...).
Exit status: 0 when the result was written and every phase that ran produced its numbers.
"""
import datetime
import glob
import json
import os
import re
import sys

LC_P99_MAX = 1.15
BE_RATIO_MIN = 0.75
SHARE_TOLERANCE = 0.05
SHARE_TARGETS = {"be70": 0.70, "be30": 0.30}

# (mode label, best-effort program, phase name)
MODES = [
    ("time-slicing", "gemm", "ts-lc-gemm"),
    ("time-slicing", "train", "ts-lc-train"),
    ("mps", "gemm", "mps-lc-gemm"),
    ("mps", "train", "mps-lc-train"),
    ("mps-be30", "gemm", "mps30-lc-gemm"),
    ("mps-be30", "train", "mps30-lc-train"),
    ("mps-be50", "gemm", "mps50-lc-gemm"),
    ("mps-be50", "train", "mps50-lc-train"),
    ("vgpu", "gemm", "vgpu-lc-gemm"),
    ("vgpu", "train", "vgpu-lc-train"),
]
BE_METRIC = {"gemm": ("tflops", "TFLOP/s"), "train": ("steps_per_s", "steps/s")}

errors = []


def read_text(path, default=None):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return default


def read_tsv(path):
    rows = []
    for line in (read_text(path, "") or "").splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            rows.append({"name": parts[0], "status": parts[1], "detail": parts[2] if len(parts) > 2 else ""})
    return rows


def last_json_line(text):
    for line in reversed((text or "").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def load_program(logs, phase, tag, vgpu_lib_dir):
    base = os.path.join(logs, f"{phase}.{tag}")
    rc_text = read_text(base + ".rc")
    try:
        rc = int(rc_text.strip()) if rc_text is not None else None
    except ValueError:
        rc = None
    cmd = (read_text(base + ".cmd", "") or "").strip()
    err = read_text(base + ".err", "") or ""
    doc = last_json_line(read_text(base + ".json"))
    entry = {"rc": rc, "cmd": cmd, "result": doc, "stderr_tail": err.splitlines()[-8:]}
    if doc is not None:
        lib = os.path.realpath(doc.get("libcuda", ""))
        ours = os.path.dirname(lib) == vgpu_lib_dir
        through_vgpu = cmd.startswith("vgpu=")
        if through_vgpu != ours:
            errors.append(f"{phase} {tag}: ran against {lib}, the wrong libcuda")
            entry["result"] = None
            entry["wrong_libcuda"] = lib
        elif doc.get("bench") == "lc_decode" and not doc.get("graph"):
            errors.append(f"{phase} {tag}: lc_decode ran without a CUDA graph: {doc.get('graph_error')}")
    if rc not in (0, None) or (rc == 0 and entry["result"] is None and "wrong_libcuda" not in entry):
        why = err.strip().splitlines()[-1] if err.strip() else "no output"
        errors.append(f"{phase} {tag}: exit status {rc}: {why[:300]}")
    return entry


def num(doc, *keys):
    for k in keys:
        if not isinstance(doc, dict) or k not in doc:
            return None
        doc = doc[k]
    return doc if isinstance(doc, (int, float)) and not isinstance(doc, bool) else None


def ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def util_rows(sample):
    """The list of per-slice utilization objects in one sample, whatever the wrapping."""
    if isinstance(sample, list):
        return [r for r in sample if isinstance(r, dict)]
    if isinstance(sample, dict):
        for key in ("slices", "util", "items"):
            if isinstance(sample.get(key), list):
                return [r for r in sample[key] if isinstance(r, dict)]
    return []


def util_summary(logs, phase):
    files = sorted(glob.glob(os.path.join(logs, f"{phase}.util", "*.json")))
    samples = []
    for f in files:
        try:
            t = float(read_text(f[: -len(".json")] + ".t", "").strip())
            rows = util_rows(json.loads(read_text(f, "")))
        except (ValueError, TypeError):
            continue
        if rows:
            samples.append((t, rows))
    if not samples:
        return {"samples": 0}
    per = {}
    for t, rows in samples:
        for r in rows:
            name = r.get("name")
            if name is None:
                continue
            per.setdefault(name, []).append((t, r))
    out = {"samples": len(samples), "slices": {}}
    for name, series in per.items():
        # The first and last samples straddle the start and the end: averages leave them out.
        inner = series[1:-1] if len(series) > 2 else series
        busy = [num(r, "busy_pct") for _, r in inner if num(r, "busy_pct") is not None]
        thr = [num(r, "throttled_pct") for _, r in inner if num(r, "throttled_pct") is not None]
        s = {
            "class": series[0][1].get("class"),
            "busy_pct_mean": round(sum(busy) / len(busy), 2) if busy else None,
            "throttled_pct_mean": round(sum(thr) / len(thr), 2) if thr else None,
        }
        (t0, r0), (t1, r1) = series[0], series[-1]
        g0, g1 = num(r0, "gpu_seconds"), num(r1, "gpu_seconds")
        if g0 is not None and g1 is not None and t1 > t0:
            s["gpu_time_share"] = round((g1 - g0) / (t1 - t0), 4)
            s["gpu_seconds_delta"] = round(g1 - g0, 4)
            s["wall_seconds"] = round(t1 - t0, 3)
        l0, l1 = num(r0, "launches"), num(r1, "launches")
        if l0 is not None and l1 is not None:
            s["launches_delta"] = l1 - l0
        out["slices"][name] = s
    out["last_sample"] = samples[-1][1]
    return out


def main(argv):
    logs, out_dir, vgpu_lib_dir = argv[1], argv[2], os.path.realpath(argv[3])
    env = os.environ
    gpu = [f.strip() for f in env.get("GPU_INFO", "").split(",")]
    phases = read_tsv(os.path.join(logs, "phases.tsv"))
    sessions = read_tsv(os.path.join(logs, "sessions.tsv"))

    raw = {}
    for ph in phases:
        tags = sorted({os.path.basename(p).split(".")[1] for p in glob.glob(os.path.join(logs, f"{ph['name']}.*.cmd"))})
        if ph["status"] == "skipped" or not tags:
            continue
        raw[ph["name"]] = {tag: load_program(logs, ph["name"], tag, vgpu_lib_dir) for tag in tags}
    status = {ph["name"]: ph["status"] for ph in phases}

    def res(phase, tag):
        return ((raw.get(phase) or {}).get(tag) or {}).get("result")

    lc_ex = res("excl-lc", "lc")
    lc50, lc99 = num(lc_ex, "latency_us", "p50"), num(lc_ex, "latency_us", "p99")
    be_ex = {"gemm": num(res("excl-gemm", "be"), "tflops"), "train": num(res("excl-train", "be"), "steps_per_s")}

    baselines = {
        "lc_exclusive_native": {"phase": "excl-lc", "latency_us": (lc_ex or {}).get("latency_us"),
                                "achieved_rate": num(lc_ex, "achieved_rate"),
                                "step_gpu_us": num(lc_ex, "warmup_step_gpu_us"),
                                "weights_gbps": num(lc_ex, "warmup_gbps")},
        "gemm_exclusive_native": {"phase": "excl-gemm", "tflops": be_ex["gemm"],
                                  "gemms_per_s": num(res("excl-gemm", "be"), "gemms_per_s"),
                                  "gemm_ms": num(res("excl-gemm", "be"), "warmup_gemm_ms")},
        "train_exclusive_native": {"phase": "excl-train", "steps_per_s": be_ex["train"],
                                   "tflops": num(res("excl-train", "be"), "tflops"),
                                   "step_ms": num(res("excl-train", "be"), "warmup_step_ms")},
    }
    lc_v = res("vgpu-excl-lc", "lc")
    baselines["lc_exclusive_vgpu"] = {
        "phase": "vgpu-excl-lc", "latency_us": (lc_v or {}).get("latency_us"),
        "p50_ratio": ratio(num(lc_v, "latency_us", "p50"), lc50),
        "p99_ratio": ratio(num(lc_v, "latency_us", "p99"), lc99),
    }
    g_v = num(res("vgpu-excl-gemm", "be"), "tflops")
    baselines["gemm_exclusive_vgpu"] = {"phase": "vgpu-excl-gemm", "tflops": g_v, "ratio": ratio(g_v, be_ex["gemm"])}

    modes = []
    for label, be_kind, phase in MODES:
        key, unit = BE_METRIC[be_kind]
        lc, be = res(phase, "lc"), res(phase, "be")
        p50, p99 = num(lc, "latency_us", "p50"), num(lc, "latency_us", "p99")
        be_val = num(be, key)
        row = {
            "mode": label, "be": be_kind, "phase": phase, "status": status.get(phase, "not run"),
            "lc_p50_us": p50, "lc_p99_us": p99, "lc_max_us": num(lc, "latency_us", "max"),
            "lc_p50_ratio": ratio(p50, lc50), "lc_p99_ratio": ratio(p99, lc99),
            "lc_achieved_rate": num(lc, "achieved_rate"), "lc_late_steps": num(lc, "late_steps"),
            "be_value": be_val, "be_unit": unit, "be_ratio": ratio(be_val, be_ex[be_kind]),
        }
        row["lc_p99_goal_met"] = None if row["lc_p99_ratio"] is None else row["lc_p99_ratio"] <= LC_P99_MAX
        row["be_goal_met"] = None if row["be_ratio"] is None else row["be_ratio"] >= BE_RATIO_MIN
        row["goals_met"] = (None if None in (row["lc_p99_goal_met"], row["be_goal_met"])
                            else row["lc_p99_goal_met"] and row["be_goal_met"])
        modes.append(row)

    util = {}
    for phase in raw:
        if os.path.isdir(os.path.join(logs, f"{phase}.util")):
            util[phase] = util_summary(logs, phase)

    acc3 = {"phase": "vgpu-shares", "status": status.get("vgpu-shares", "not run"),
            "exclusive_gemm_tflops": be_ex["gemm"], "target_tolerance": SHARE_TOLERANCE, "slices": {}}
    shares_util = (util.get("vgpu-shares") or {}).get("slices", {})
    for name, target in SHARE_TARGETS.items():
        tf = num(res("vgpu-shares", name), "tflops")
        share = ratio(tf, be_ex["gemm"])
        acc3["slices"][name] = {
            "tflops": tf, "gemms": num(res("vgpu-shares", name), "gemms"), "share": share, "target": target,
            "met": None if share is None else abs(share - target) <= SHARE_TOLERANCE,
            "gpu_time_share_from_util": (shares_util.get(name) or {}).get("gpu_time_share"),
            "busy_pct_mean_from_util": (shares_util.get(name) or {}).get("busy_pct_mean"),
        }
    s70, s30 = acc3["slices"]["be70"]["share"], acc3["slices"]["be30"]["share"]
    acc3["split_of_combined"] = ({"be70": round(s70 / (s70 + s30), 4), "be30": round(s30 / (s70 + s30), 4)}
                                 if s70 and s30 else None)
    acc3["met"] = (None if None in (acc3["slices"]["be70"]["met"], acc3["slices"]["be30"]["met"])
                   else acc3["slices"]["be70"]["met"] and acc3["slices"]["be30"]["met"])

    slices_cfg = {}
    for session in ("vgpu", "shares"):
        try:
            slices_cfg[session] = json.loads(read_text(os.path.join(logs, f"{session}.slices.json"), ""))
        except ValueError:
            pass

    date = datetime.datetime.now(datetime.timezone.utc)
    m = re.search(r"\b([ABHLV]\d{2,3})\b", gpu[0] if gpu else "")
    tag = m.group(1).lower() if m else "gpu"
    path = os.path.join(out_dir, f"colocation-{tag}-{date:%Y-%m-%d}.json")
    if os.path.exists(path):
        path = os.path.join(out_dir, f"colocation-{tag}-{date:%Y-%m-%d-%H%M%S}.json")

    def env_num(name):
        try:
            v = float(env.get(name, ""))
            return int(v) if v.is_integer() else v
        except ValueError:
            return None

    doc = {
        "schema": "vgpu-colocation/1",
        "name": os.path.basename(path)[: -len(".json")],
        "date": date.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": env.get("VGPU_COMMIT", "unknown"),
        "machine": {
            "gpu": gpu[0] if gpu and gpu[0] else (lc_ex or {}).get("device"),
            "driver": gpu[1] if len(gpu) > 1 else None,
            "gpu_memory": gpu[2] if len(gpu) > 2 else None,
            "pci_bus_id": gpu[3] if len(gpu) > 3 else None,
            "compute_mode": gpu[4] if len(gpu) > 4 else None,
            "cuda_driver_api_version": (lc_ex or {}).get("driver_version"),
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "native_libcuda": env.get("NATIVE_LIB_DIR"),
        },
        "config": {
            "seconds_per_phase": env_num("SECS"),
            "run_seconds": env_num("RUN_SECONDS"),
            "lc_decode": {"rate": env_num("LC_RATE"), "weights_gib": env_num("LC_WEIGHTS_GIB"),
                          "rows": env_num("LC_ROWS"), "cols": env_num("LC_COLS"),
                          "layers": num(lc_ex, "layers"), "graph": (lc_ex or {}).get("graph")},
            "be_gemm": {"n": env_num("GEMM_N"), "depth": env_num("GEMM_DEPTH"), "chunks": env_num("GEMM_CHUNKS")},
            "be_train": {"hidden": env_num("TRAIN_HIDDEN"), "batch": env_num("TRAIN_BATCH"),
                         "layers": env_num("TRAIN_LAYERS")},
            "vgpu_slices": {"lc": {"class": "latency-critical", "compute_guarantee_pct": env_num("LC_GUARANTEE")},
                            "be": {"class": "best-effort", "compute_guarantee_pct": env_num("BE_GUARANTEE")},
                            "be70": {"class": "best-effort", "compute_guarantee_pct": 70},
                            "be30": {"class": "best-effort", "compute_guarantee_pct": 30}},
            "slices_reported_by_scheduler": slices_cfg,
        },
        "goals": {"lc_p99_ratio_max": LC_P99_MAX, "be_throughput_ratio_min": BE_RATIO_MIN,
                  "share_targets": SHARE_TARGETS, "share_tolerance": SHARE_TOLERANCE,
                  "text": "latency-critical p99 <= 1.15x exclusive (native) while best-effort keeps >= 75% "
                          "of its exclusive (native) throughput; best-effort slices of 70% and 30% get 70+-5% "
                          "and 30+-5% of be_gemm's exclusive throughput"},
        "reference_from_issue": {"time-slicing": {"lc_p99_ratio": 3.3, "be_ratio": 0.80},
                                 "mps-be30": {"lc_p99_ratio": 1.26, "be_ratio": 0.38}},
        "baselines": baselines,
        "modes": modes,
        "acceptance3": acc3,
        "util": util,
        "sessions": sessions,
        "phases": phases,
        "errors": errors,
        "raw": raw,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    def f(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    def x(v):
        return "-" if v is None else f"{v:.2f}x"

    print()
    print(f"colocation benchmark, {doc['machine']['gpu']} (driver {doc['machine']['driver']}), "
          f"commit {doc['commit']}, {doc['date']}")
    print(f"{'mode':14} {'BE':6} {'LC p50 us':>10} {'p50 x':>7} {'LC p99 us':>10} {'p99 x':>7} "
          f"{'BE thrpt':>16} {'BE x':>7}  goals (p99<=1.15x, BE>=0.75x)")
    print(f"{'exclusive':14} {'-':6} {f(lc50):>10} {x(1.0 if lc50 else None):>7} {f(lc99):>10} "
          f"{x(1.0 if lc99 else None):>7} {'gemm ' + f(be_ex['gemm'], '{:.1f}') + ' TF/s':>16} {'':>7}  "
          f"train {f(be_ex['train'], '{:.2f}')} steps/s")
    lv = baselines["lc_exclusive_vgpu"]
    print(f"{'vgpu alone':14} {'-':6} {f(num(lc_v, 'latency_us', 'p50')):>10} {x(lv['p50_ratio']):>7} "
          f"{f(num(lc_v, 'latency_us', 'p99')):>10} {x(lv['p99_ratio']):>7} "
          f"{'gemm ' + f(g_v, '{:.1f}') + ' TF/s':>16} {x(baselines['gemm_exclusive_vgpu']['ratio']):>7}  "
          f"(each through its slice, alone)")
    for r in modes:
        verdict = {True: "met", False: "MISSED", None: "no data"}[r["goals_met"]]
        if r["status"] not in ("ok",):
            verdict += f" [{r['status']}]"
        be_txt = f(r["be_value"], "{:.2f}") + (" TF/s" if r["be"] == "gemm" else " st/s")
        print(f"{r['mode']:14} {r['be']:6} {f(r['lc_p50_us']):>10} {x(r['lc_p50_ratio']):>7} "
              f"{f(r['lc_p99_us']):>10} {x(r['lc_p99_ratio']):>7} {be_txt:>16} {x(r['be_ratio']):>7}  {verdict}")
    print()
    print("acceptance 3 (be_gemm through best-effort slices be70 and be30, share of exclusive throughput):")
    for name, s in acc3["slices"].items():
        verdict = {True: "met", False: "MISSED", None: "no data"}[s["met"]]
        print(f"  {name}: {f(s['tflops'], '{:.1f}')} TF/s, share {f(s['share'], '{:.3f}')} "
              f"(target {s['target']:.2f}+-{SHARE_TOLERANCE:.2f}: {verdict}); GPU time from util "
              f"{f(s['gpu_time_share_from_util'], '{:.3f}')}")
    for ph in phases:
        if ph["status"] != "ok":
            print(f"phase {ph['name']}: {ph['status']} {ph['detail']}")
    for s in sessions:
        if s["status"] != "ok":
            print(f"session {s['name']}: {s['status']} {s['detail']}")
    for e in errors:
        print(f"error: {e}")
    print(f"result: {path}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

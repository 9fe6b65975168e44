#!/usr/bin/env python3
"""The fault-isolation benchmark's report, and a minimal scheduler API client (stdlib only).

Usage:
  report.py report LOGS_DIR OUT_DIR   reads run.sh's logs, writes OUT_DIR/faults-<gpu>-<date>.json
                                      and prints the table
  report.py api SOCKET METHOD PATH [JSON_BODY]   one request to vgpu-scheduler's REST API on its
                                      Unix socket; prints the body (exit 0 for 2xx, 1 other, 2 none)

The logs (see run.sh and faults_common.h): phases.tsv (name, status, detail, start, planned
end), PHASE.{a,b,c}.out (the tenants' lines, every process of a tenant appended, between
INCARNATION and EXIT lines), PHASE.events (KILL, BACKEND_KILL, BACKEND_UP, TENANT_BACK).
Tenants a and b are the survivors; c faults, is killed, or loses its backend.

Survivors' throughput: each TP line (n kernels completed over the dt seconds before t) is
spread evenly over its interval and binned into 100 ms windows from the moment both
survivors ran their first kernels to the phase's planned end. dip = min window / median
window of a + b together; total_vs_base = kernels/s of a + b over kernels/s of a + b in the
same mode's baseline phase (c a plain worker, nothing faulting).
Recovery: fault (FAULT_LAUNCH) or kill (KILL, BACKEND_KILL) -> the next FIRST_OK of tenant c
(a new process has completed a kernel).
"""
import datetime
import http.client
import json
import os
import re
import socket
import statistics
import sys

WINDOW_S = 0.1
SURVIVORS = ("a", "b")


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def api(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    path, method, url = argv[0], argv[1], argv[2]
    body = argv[3] if len(argv) > 3 else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    try:
        conn = UnixConnection(path, 10)
        conn.request(method, url, body=body, headers=headers)
        resp = conn.getresponse()
        text = resp.read().decode("utf-8", "replace")
    except OSError as e:
        print(f"{path}: {e}", file=sys.stderr)
        return 2
    print(text)
    print(f"{resp.status} {resp.reason}", file=sys.stderr)
    return 0 if 200 <= resp.status < 300 else 1


# ---------------------------------------------------------------------------- parsing

LINE = re.compile(r"^([A-Z_]+)\b(.*)$")
FIELD = re.compile(r"(\w+)=(\S+)")


def num(v):
    try:
        return float(v) if any(c in v for c in ".eE") else int(v)
    except ValueError:
        return v


def parse_lines(path):
    """[(KEYWORD, {field: value})] of a tenant's or the events' file."""
    out = []
    try:
        with open(path, errors="replace") as f:
            for line in f:
                m = LINE.match(line.strip())
                if not m:
                    continue
                fields = {k: num(v) for k, v in FIELD.findall(m.group(2))}
                out.append((m.group(1), fields))
    except OSError:
        pass
    return out


def read_phases(logs):
    phases = []
    try:
        with open(os.path.join(logs, "phases.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                while len(parts) < 5:
                    parts.append("")
                name, status, detail, start, end = parts[:5]
                phases.append(
                    {
                        "name": name,
                        "status": status,
                        "detail": detail,
                        "start": float(start) if start else None,
                        "end": float(end) if end else None,
                    }
                )
    except OSError:
        pass
    return phases


def split_name(name):
    for mode in ("vgpu", "mps", "native"):
        if name.startswith(mode + "-"):
            return mode, name[len(mode) + 1 :]
    return None, None


# ---------------------------------------------------------------------------- metrics


def summary(values):
    if not values:
        return None
    values = sorted(values)
    return {
        "n": len(values),
        "median": round(statistics.median(values), 4),
        "max": round(values[-1], 4),
        "min": round(values[0], 4),
        "all": [round(v, 4) for v in values],
    }


def windows(lines, w0, w1):
    """Kernels completed per WINDOW_S window of [w0, w1)."""
    count = max(int((w1 - w0) / WINDOW_S), 0)
    bins = [0.0] * count
    if count == 0:
        return bins
    for key, f in lines:
        if key != "TP" or "t" not in f or "n" not in f:
            continue
        t, n = float(f["t"]), float(f["n"])
        dt = max(float(f.get("dt", WINDOW_S)), 1e-6)
        a, b = t - dt, t
        if b <= w0 or a >= w1:
            continue
        rate = n / dt
        i = max(int((a - w0) / WINDOW_S), 0)
        while i < count:
            lo = w0 + i * WINDOW_S
            hi = lo + WINDOW_S
            if lo >= b:
                break
            overlap = min(hi, b) - max(lo, a)
            if overlap > 0:
                bins[i] += rate * overlap
            i += 1
    return bins


def survivor_stats(logs, phase):
    name = phase["name"]
    per = {}
    lines = {}
    for tag in SURVIVORS:
        ls = parse_lines(os.path.join(logs, f"{name}.{tag}.out"))
        lines[tag] = ls
        errs = [f for k, f in ls if k == "ERR"]
        exits = [f for k, f in ls if k == "EXIT"]
        per[tag] = {
            "errors": len(errs),
            "error_codes": sorted({int(e.get("rc", -1)) for e in errs}),
            "first_error_t": errs[0].get("t") if errs else None,
            "processes": len(exits),
            "abnormal_exits": sum(1 for e in exits if e.get("rc") not in (0,)),
            "kernels": int(sum(f.get("n", 0) for k, f in ls if k == "TP")),
        }
    firsts = []
    for tag in SURVIVORS:
        t = [f["t"] for k, f in lines[tag] if k == "FIRST_OK" and "t" in f]
        if t:
            firsts.append(min(t))
    result = {"errors": sum(p["errors"] for p in per.values()), "per_tenant": per}
    result["abnormal_exits"] = sum(p["abnormal_exits"] for p in per.values())
    if len(firsts) < len(SURVIVORS) or phase["end"] is None:
        result["note"] = "no throughput data"
        return result
    w0 = max(firsts) + 0.2
    w1 = phase["end"] - 0.2
    bins = {tag: windows(lines[tag], w0, w1) for tag in SURVIVORS}
    combined = [sum(v) for v in zip(*bins.values())]
    if not combined:
        result["note"] = "the measured interval is empty"
        return result
    med = statistics.median(combined)
    result.update(
        {
            "window_ms": int(WINDOW_S * 1000),
            "windows": len(combined),
            "measured_s": round(w1 - w0, 3),
            "median_window": round(med, 2),
            "min_window": round(min(combined), 2),
            "dip": round(min(combined) / med, 4) if med > 0 else None,
            "windows_below_half_median": sum(1 for v in combined if v < med / 2),
            "kernels_per_s": round(sum(combined) / (w1 - w0), 2),
            "per_tenant_dip": {
                tag: (round(min(v) / statistics.median(v), 4) if v and statistics.median(v) > 0 else None)
                for tag, v in bins.items()
            },
        }
    )
    return result


def next_first_ok(lines, t):
    for k, f in lines:
        if k == "FIRST_OK" and f.get("t", 0) > t:
            return f["t"]
    return None


def faulting_stats(logs, phase, scenario):
    name = phase["name"]
    lines = parse_lines(os.path.join(logs, f"{name}.c.out"))
    events = parse_lines(os.path.join(logs, f"{name}.events"))
    res = {"processes": sum(1 for k, _ in lines if k == "EXIT")}
    if scenario == "fault":
        launches = [f for k, f in lines if k == "FAULT_LAUNCH"]
        seen = [f for k, f in lines if k == "FAULT_SEEN"]
        sticky = [f for k, f in lines if k == "STICKY"]
        destroys = [f for k, f in lines if k == "DESTROY"]
        rec, unrecovered = [], 0
        for f in launches:
            ok = next_first_ok(lines, f["t"])
            if ok is None:
                unrecovered += 1
            else:
                rec.append(ok - f["t"])
        codes = {}
        for f in seen:
            key = f"kind{f.get('kind')}:{f.get('rc')}:{f.get('name')}"
            codes[key] = codes.get(key, 0) + 1
        res.update(
            {
                "faults": len(launches),
                "launch_rcs": sorted({int(f.get("rc", -1)) for f in launches}),
                "fault_codes": codes,
                "error_seen_after_s": summary([float(f["after"]) for f in seen if "after" in f]),
                "sticky_all": bool(sticky) and all(f.get("same") == 1 for f in sticky),
                "destroy_rcs": sorted({int(f.get("rc", -1)) for f in destroys}),
                "recovery_s": summary(rec),
                "unrecovered": unrecovered,
            }
        )
    else:
        key = "KILL" if scenario == "kill" else "BACKEND_KILL"
        kills = [f for k, f in events if k == key]
        rec, unrecovered, to_error, restart = [], 0, [], []
        ups = [f["t"] for k, f in events if k == "BACKEND_UP"]
        for f in kills:
            ok = next_first_ok(lines, f["t"])
            if ok is None:
                unrecovered += 1
            else:
                rec.append(ok - f["t"])
            errs = [g["t"] for k, g in lines if k == "ERR" and g.get("t", 0) > f["t"]]
            if errs and scenario == "backend-kill":
                to_error.append(errs[0] - f["t"])
            later = [u for u in ups if u > f["t"]]
            if later:
                restart.append(later[0] - f["t"])
        res.update(
            {
                "kills": len(kills),
                "recovery_s": summary(rec),
                "unrecovered": unrecovered,
            }
        )
        if scenario == "backend-kill":
            codes = {}
            for k, g in lines:
                if k == "ERR":
                    c = f"{g.get('call')}:{g.get('rc')}"
                    codes[c] = codes.get(c, 0) + 1
            res["error_codes"] = codes
            res["first_error_after_kill_s"] = summary(to_error)
            res["backend_restart_s"] = summary(restart)
    return res


def gpu_tag(name, device):
    if device == "emulated":
        return "emulated"
    m = re.search(r"\b([A-Z]\d{2,4}[A-Z]?)\b", name or "")
    return m.group(1).lower() if m else "gpu"


def report(logs, out):
    info = [s.strip() for s in os.environ.get("GPU_INFO", "").split(",")]
    device_kind = os.environ.get("FAULTS_DEVICE", "cuda")
    gpu_name = info[0] if info and info[0] else ("emulated" if device_kind == "emulated" else "unknown")
    driver = info[1] if len(info) > 1 else None
    commit = os.environ.get("VGPU_COMMIT", "unknown")
    now = datetime.datetime.now(datetime.timezone.utc)
    config = {
        k.lower(): num(os.environ[k])
        for k in (
            "SECS",
            "BASE_SECS",
            "FAULT_EVERY_MS",
            "KILL_EVERY_S",
            "BACKEND_KILL_EVERY_S",
            "KERNEL_US",
            "GRID",
            "BLOCK",
        )
        if k in os.environ
    }
    config["device"] = device_kind
    phases = read_phases(logs)
    base_rate = {}
    results = []
    for p in phases:
        mode, scenario = split_name(p["name"])
        entry = dict(p)
        entry["mode"], entry["scenario"] = mode, scenario
        if mode is None or p["status"] == "skipped":
            results.append(entry)
            continue
        entry["survivors"] = survivor_stats(logs, p)
        if scenario == "base":
            base_rate[mode] = entry["survivors"].get("kernels_per_s")
        elif scenario.removesuffix("-same-slice") in ("fault", "kill", "backend-kill"):
            entry["faulting"] = faulting_stats(logs, p, scenario.removesuffix("-same-slice"))
        results.append(entry)
    for e in results:
        s = e.get("survivors")
        if not s or e.get("scenario") == "base":
            continue
        base = base_rate.get(e["mode"])
        rate = s.get("kernels_per_s")
        s["base_kernels_per_s"] = base
        s["total_vs_base"] = round(rate / base, 4) if base and rate is not None else None
    slices = None
    try:
        with open(os.path.join(logs, "vgpu.slices.json")) as f:
            slices = json.load(f)
    except (OSError, ValueError):
        pass
    doc = {
        "benchmark": "faults",
        "device": gpu_name,
        "driver": driver,
        "gpu_info": os.environ.get("GPU_INFO", ""),
        "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit,
        "run_seconds": num(os.environ.get("RUN_SECONDS", "0")),
        "config": config,
        "phases": results,
        "vgpu_slices_at_end": slices,
    }
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"faults-{gpu_tag(gpu_name, device_kind)}-{now.strftime('%Y-%m-%d')}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    print_table(doc)
    print(f"\nwrote {path}")
    return 0


def fmt(v, spec="{:.3f}"):
    return "-" if v is None else spec.format(v)


def print_table(doc):
    print(f"\nfault isolation on {doc['device']} (driver {doc['driver']}), commit {doc['commit']}")
    head = ("phase", "status", "surv.err", "dip min/med", "total/base", "c events", "recovery med/max s", "c codes")
    rows = [head]
    for e in doc["phases"]:
        s = e.get("survivors") or {}
        c = e.get("faulting") or {}
        rec = c.get("recovery_s") or {}
        events = c.get("faults", c.get("kills"))
        if "fault_codes" in c:
            codes = " ".join(f"{k}x{v}" for k, v in sorted(c["fault_codes"].items()))
            if c.get("sticky_all"):
                codes += " sticky"
        elif "error_codes" in c:
            codes = " ".join(f"{k}x{v}" for k, v in sorted(c["error_codes"].items()))
        else:
            codes = ""
        rows.append(
            (
                e["name"],
                e["status"],
                "-" if not s else str(s.get("errors", "-")),
                fmt(s.get("dip")),
                fmt(s.get("total_vs_base")),
                "-" if events is None else str(events),
                "-" if not rec else f"{rec['median']:.3f}/{rec['max']:.3f}",
                codes[:60],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def main(argv):
    if len(argv) >= 2 and argv[1] == "api":
        return api(argv[2:])
    if len(argv) == 4 and argv[1] == "report":
        return report(argv[2], argv[3])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))

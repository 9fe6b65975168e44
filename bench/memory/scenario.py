#!/usr/bin/env python3
"""Elastic memory through the scheduler on a real GPU (run by bench/memory/run.sh).

Starts vgpu-scheduler --device cuda with two slices on GPU 0:
  be  best-effort, memory guarantee 0, limit BE_GIB
  lc  latency-critical, memory guarantee = limit = LC_GIB
then, with memory_client tenants (tests/c/memory_client.c):
  1. be fills BE_GIB of buffers (device-side memsets); its backend's swap reserve pins as much
     host memory in the background (be may be reclaimed); the scenario waits for it (at most
     RESERVE_WAIT_S) and records how long it took.
  2. claim, be's first reclaim: lc allocates until the GPU is full; its next allocation fails
     on the device, its backend claims memory within lc's guarantee, the scheduler reclaims be
     (all BE_GIB) and lc's allocation completes: the slowest lc allocation is the time to take
     be's memory.
  3. lc frees; the scheduler gives be its memory back once it fits; be's bytes are checked.
  4. reclaim be and restore it, REPEAT times: the backend's swap-out and swap-in times give
     the bandwidth each way; be's bytes are checked after each restore.
Writes one JSON document to stdout. Usage: scenario.py DIST CLIENT OUTDIR
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

GIB = 1 << 30
BE_GIB = int(os.environ.get("BE_GIB", "20"))
LC_GIB = int(os.environ.get("LC_GIB", "60"))
REPEAT = int(os.environ.get("REPEAT", "3"))
RESERVE_WAIT_S = float(os.environ.get("RESERVE_WAIT_S", "60"))
TIMEOUT = 120


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Api:
    def __init__(self, path):
        self.path = path

    def request(self, method, target, body=None):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(self.path)
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        s.sendall(head.encode() + b"\r\n" + data)
        raw = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
        s.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if b"chunked" in head.lower():
            out, rest = b"", body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                n = int(size, 16)
                if n == 0:
                    break
                out, rest = out + rest[:n], rest[n + 2:]
            body = out
        return status, json.loads(body) if body.strip() else None

    def memory(self, name):
        _, all_ = self.request("GET", "/v1/memory")
        return next(m for m in all_ if m["name"] == name)


class Tenant:
    def __init__(self, client, socket_path, dist, name, outdir):
        env = dict(os.environ, LD_LIBRARY_PATH=f"{dist}/lib", VGPU_SOCKET=socket_path,
                   VGPU_TEST_WATCHDOG_S="900")
        self.name = name
        self.err = open(os.path.join(outdir, f"{name}.err"), "w")
        self.p = subprocess.Popen([client], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, env=env, text=True, bufsize=1)
        self.transcript = []
        self.expect("READY")

    def expect(self, prefix):
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError(f"{self.name} ended: {self.transcript[-10:]}")
            line = line.rstrip("\n")
            self.transcript.append(line)
            if line.startswith("FAIL"):
                log(f"{self.name}: {line}")
            if line.startswith(prefix):
                return line

    def ask(self, cmd, prefix):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()
        return self.expect(prefix)

    def failures(self):
        return [l for l in self.transcript if l.startswith("FAIL")]

    def stop(self):
        try:
            self.p.stdin.write("stop\n")
            self.p.stdin.flush()
            self.p.wait(timeout=60)
        except Exception:
            self.p.kill()
        self.err.close()


def backend_times(logpath, what):
    """(bytes, ms) of each 'Device memory reclaimed/restored' line in the scheduler's log."""
    pat = re.compile(what + r".*bytes=(\d+) ms=([\d.]+)")
    out = []
    with open(logpath, errors="replace") as f:
        for line in f:
            clean = re.sub(r"\x1b\[[0-9;]*m", "", line)
            m = pat.search(clean)
            if m and int(m.group(1)) > 0:
                out.append((int(m.group(1)), float(m.group(2))))
    return out


def main():
    dist, client, outdir = sys.argv[1], sys.argv[2], sys.argv[3]
    total = int(os.environ.get("GPU_MEMORY", str(80 * GIB)))
    state = tempfile.mkdtemp(prefix="vgpu-mem-")
    cfg = os.path.join(state, "vgpu.toml")
    with open(cfg, "w") as f:
        f.write(f'device = "cuda"\n\n[[gpu]]\nindex = 0\nmemory = {total}\n\n')
        f.write('[[slice]]\nname = "be"\ntenant = "t-be"\nclass = "best-effort"\n'
                f'compute_guarantee_pct = 20\nmemory_guarantee = 0\nmemory_limit = {BE_GIB * GIB + GIB}\nattach = true\n\n')
        f.write('[[slice]]\nname = "lc"\ntenant = "t-lc"\nclass = "latency-critical"\n'
                f'compute_guarantee_pct = 30\nmemory_guarantee = {LC_GIB * GIB}\nmemory_limit = {LC_GIB * GIB}\nattach = true\n')
    slog = os.path.join(outdir, "scheduler.log")
    sched = subprocess.Popen(
        [f"{dist}/bin/vgpu-scheduler", "--config", cfg, "--state-dir", state, "--device", "cuda",
         "--backend", f"{dist}/bin/vgpu-backend"],
        stdout=open(slog, "w"), stderr=subprocess.STDOUT,
        env=dict(os.environ, RUST_LOG=os.environ.get("SCHED_LOG", "info"),
                 LD_LIBRARY_PATH=os.environ.get("NATIVE_LIB_DIR", "/usr/local/nvidia/lib64")))
    doc = {"benchmark": "memory-scenario", "be_gib": BE_GIB, "lc_gib": LC_GIB,
           "gpu_memory_declared": total}
    tenants = []
    try:
        api = Api(os.path.join(state, "api.sock"))
        for _ in range(600):
            if all(os.path.exists(os.path.join(state, "slices", f"{n}.sock")) for n in ("be", "lc")):
                break
            time.sleep(0.05)
        be = Tenant(client, os.path.join(state, "slices", "be.sock"), dist, "be", outdir)
        tenants.append(be)
        line = be.ask(f"allocm 1024 {BE_GIB}", "ALLOCATED")
        log(f"be: {line}")
        for _ in range(200):
            if api.memory("be")["resident"] >= BE_GIB * GIB:
                break
            time.sleep(0.05)
        # The swap reserve pins be's swap space while it runs (a slice above its guarantee);
        # the claim below is be's first reclaim, made once the reserve is ready.
        t0 = time.monotonic()
        ready = None
        while time.monotonic() - t0 < RESERVE_WAIT_S:
            with open(slog, errors="replace") as f:
                ready = next((l for l in f if "Swap reserve ready" in l
                              and int((re.search(r"pinned=(\d+)", l) or [0, 0])[1]) >= BE_GIB * GIB),
                             None)
            if ready:
                break
            time.sleep(0.1)
        doc["swap_reserve"] = {"ready_after_s": round(time.monotonic() - t0, 2) if ready else None,
                               "line": re.sub(r"\x1b\[[0-9;]*m", "", ready).strip() if ready else None}
        log(f"swap reserve: {doc['swap_reserve']}")

        # The claim: lc fills the GPU, then asks for more within its guarantee.
        lc = Tenant(client, os.path.join(state, "slices", "lc.sock"), dist, "lc", outdir)
        tenants.append(lc)
        steps = []
        got = 0
        while got < LC_GIB - 1:
            line = lc.ask("allocm 1024 1", "ALLOCATED")
            parts = line.split()
            if parts[1] == "0":
                break
            got += 1
            steps.append(float(parts[2]))
        m_be = api.memory("be")
        doc["claim"] = {"lc_gib_allocated": got, "slowest_alloc_ms": max(steps) if steps else None,
                        "alloc_ms": steps, "be_after": m_be,
                        "lc_failures": lc.failures()}
        log(f"claim: lc got {got} GiB, slowest allocation {doc['claim']['slowest_alloc_ms']} ms, be {m_be}")
        lc.ask("free", "FREED")
        for _ in range(600):
            m_be = api.memory("be")
            if m_be["swapped"] == 0 and not m_be["evicted"]:
                break
            time.sleep(0.05)
        sampled = be.ask("sample", "SAMPLED")
        doc["restored_after_claim"] = {"be": m_be, "check": sampled}
        cycles = []
        for i in range(REPEAT):
            st, out = api.request("POST", "/v1/slices/be/reclaim")
            assert st == 200, out
            m = api.memory("be")
            st, back = api.request("POST", "/v1/slices/be/restore")
            assert st == 200, back
            sampled = be.ask("sample", "SAMPLED")
            cycles.append({"reclaim_api": out, "swapped_seen": m["swapped"], "restore_api": back,
                           "intact": sampled.split()[1] != "0"})
            log(f"cycle {i}: reclaim {out['ms']:.1f} ms, restore {back['ms']:.1f} ms, {sampled}")
        outs = backend_times(slog, "swapped out")
        ins = backend_times(slog, "restored at the same")
        doc["cycles"] = cycles
        doc["swap_out"] = [{"bytes": b, "ms": ms, "gbps": b / ms / 1e6} for b, ms in outs]
        doc["swap_in"] = [{"bytes": b, "ms": ms, "gbps": b / ms / 1e6} for b, ms in ins]

        doc["be_failures"] = be.failures()
    finally:
        for t in tenants:
            t.stop()
        sched.terminate()
        try:
            sched.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sched.kill()
        shutil.rmtree(state, ignore_errors=True)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A PyTorch training run whose memory is reclaimed and restored mid-training (issue 6,
acceptance 2.4; run by bench/memory/run.sh on the GPU machine).

Runs tests/gpu/apps/torch_train.py (deterministic training, one `step N loss %.9e` line per
step, a BALLAST_GIB GiB patterned tensor held while it trains and checked at the end) three
times, the same way each time:
  1. natively (the real driver): the reference;
  2. through a best-effort slice `train` of vgpu-scheduler (memory guarantee 0), undisturbed;
  3. through the same slice, reclaimed at about 25%, 50% and 75% of its steps: POST
     /v1/slices/train/reclaim (freeze, swap out to host memory), check that /v1/memory shows
     it swapped out and nothing resident, hold it HOLD_S seconds while checking that the
     trainer makes no progress (its guest really is frozen), then POST restore and wait for
     the next step.
Then compares the loss curves as compare_loss.py does (largest relative difference of any
step's loss; the goal is identical: at most RTOL) and reports the ballast checks, the step
times and every cycle.

    torch_reclaim.py DIST OUTDIR    (JSON document on stdout, timestamped log on stderr)

Writes the trainers' output (torch_<run>.out/.err) and scheduler-torch.log to OUTDIR. Exit
status 0 when all three runs trained to the end (whether or not the goal was met: the
document's goal_met and failures say); 1 otherwise.

Environment (all optional): TRAIN_STEPS (200), BALLAST_GIB (8), HOLD_S (1.0), RECLAIM_AT
(fractions of the steps, "0.25,0.5,0.75"), RTOL (1e-5), GPU_MEMORY (bytes declared for GPU 0,
80 GiB), SLICE_LIMIT_GIB (the slice's memory limit, BALLAST_GIB + 8 but at most GPU_MEMORY),
NATIVE_LIB_DIR (/usr/local/nvidia/lib64), PYTHON (this interpreter), TRAINER (the training
script, tests/gpu/apps/torch_train.py), VGPU_DEVICE (cuda, or emulated for a dry run with a
stub TRAINER), TRAIN_TIMEOUT (seconds one run may take, 240), TORCH_RECLAIM_BUDGET (seconds
for everything, 480), SCHED_LOG (RUST_LOG of the scheduler, info), SLICE_LOG (VGPU_LOG of the
trainers through the slice, warn).
"""
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
APPDIR = os.path.join(ROOT, "tests", "gpu", "apps")
sys.path.insert(0, HERE)
from scenario import Api, backend_times, log  # noqa: E402

GIB = 1 << 30
SLICE = "train"
STEPS = int(os.environ.get("TRAIN_STEPS", "200"))
BALLAST_GIB = float(os.environ.get("BALLAST_GIB", "8"))
HOLD_S = float(os.environ.get("HOLD_S", "1.0"))
RECLAIM_AT = [float(x) for x in os.environ.get("RECLAIM_AT", "0.25,0.5,0.75").split(",") if x.strip()]
RTOL = float(os.environ.get("RTOL", "1e-5"))
TRAIN_TIMEOUT = float(os.environ.get("TRAIN_TIMEOUT", "240"))
BUDGET = float(os.environ.get("TORCH_RECLAIM_BUDGET", "480"))
STEP = re.compile(r"^step (\d+) loss (\S+)$")
# How long after a reclaim is confirmed the trainer may still print a step it had finished
# before the freeze (its line in flight through the pipe).
GRACE_S = min(0.25, HOLD_S / 4)


class Interrupted(Exception):
    """SIGTERM (run.sh's timeout): the run stops, cleans up and still reports."""


def on_sigterm(signum, _frame):
    raise Interrupted(f"interrupted by signal {signum}")


class Trainer:
    """One training process; a thread reads its stdout (to OUTDIR/torch_LABEL.out) and
    records each step line with the time it arrived."""

    def __init__(self, label, cmd, env, outdir, deadline):
        self.label = label
        self.deadline = deadline
        self.out = open(os.path.join(outdir, f"torch_{label}.out"), "w")
        self.err_path = os.path.join(outdir, f"torch_{label}.err")
        self.err = open(self.err_path, "w")
        self.cond = threading.Condition()
        self.lines = []
        self.steps = []  # (monotonic time, step, loss text)
        self.eof = False
        self.started = time.monotonic()
        self.p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=self.err, env=env, text=True, bufsize=1,
                                  start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.p.stdout:
            now = time.monotonic()
            self.out.write(line)
            self.out.flush()
            text = line.rstrip("\n")
            m = STEP.match(text.strip())
            with self.cond:
                self.lines.append(text)
                if m:
                    self.steps.append((now, int(m.group(1)), m.group(2)))
                self.cond.notify_all()
        with self.cond:
            self.eof = True
            self.cond.notify_all()

    def last_step(self):
        with self.cond:
            return self.steps[-1][1] if self.steps else -1

    def step_time(self, step):
        """When the line of `step` (or the first after it) arrived; None if none did."""
        with self.cond:
            return next((t for t, s, _ in self.steps if s >= step), None)

    def wait_step(self, step, deadline):
        """Waits until the trainer has printed `step` (True), ended or the deadline passed."""
        with self.cond:
            while True:
                if self.steps and self.steps[-1][1] >= step:
                    return True
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    return False
                self.cond.wait(min(left, 0.5))

    def ended(self):
        with self.cond:
            return self.eof

    def wait_end(self, until):
        """Waits until the time `until`, or less if the trainer's output ends first."""
        with self.cond:
            self.cond.wait_for(lambda: self.eof, timeout=max(0.0, until - time.monotonic()))

    def finish(self):
        """Waits for the process to end (killing it at its deadline); returns its status."""
        try:
            self.p.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"{self.label}: still running at its deadline, killing it")
            self.kill()
        self.reader.join(timeout=10)
        self.out.close()
        self.err.close()
        return self.p.returncode

    def kill(self):
        if self.p.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def summary(self, rc, seconds):
        """The run as the JSON document shows it."""
        with self.cond:
            steps, lines = list(self.steps), list(self.lines)
        deltas = [(b[0] - a[0]) * 1e3 for a, b in zip(steps, steps[1:])]
        ballast = next((l for l in lines if l.startswith("ballast ") and "filled" not in l), None)
        libcuda = None
        try:
            with open(self.err_path, errors="replace") as f:
                libcuda = next((l[len("libcuda: "):].strip() for l in f if l.startswith("libcuda: ")), None)
        except OSError:
            pass
        return {
            "rc": rc,
            "seconds": round(seconds, 2),
            "steps": len(steps),
            "completed": rc == 0 and len(steps) == STEPS and "PASS" in lines,
            "step_ms_median": round(statistics.median(deltas), 3) if deltas else None,
            "step_ms_max": round(max(deltas), 3) if deltas else None,
            "train_s": round(steps[-1][0] - steps[0][0], 3) if len(steps) > 1 else None,
            "loss_first": steps[0][2] if steps else None,
            "loss_last": steps[-1][2] if steps else None,
            "ballast": ballast,
            "libcuda": libcuda,
        }

    def losses(self):
        with self.cond:
            return {s: loss for _, s, loss in self.steps}


def compare(a, b):
    """compare_loss.py's verdict on two loss curves ({step: loss text}). `bitwise`: every
    printed loss is the same text; %.9e holds more digits than a float32 loss has, so that
    means the same float32 values."""
    if not a or set(a) != set(b):
        return {"same_steps": False, "steps": len(a), "steps_other": len(b), "max_rel_diff": None,
                "at_step": None, "bitwise": False}
    worst, at = 0.0, None
    for step in sorted(a):
        x, y = float(a[step]), float(b[step])
        if not (math.isfinite(x) and math.isfinite(y)):
            rel = 0.0 if x == y or (math.isnan(x) and math.isnan(y)) else math.inf
        else:
            rel = abs(x - y) / max(abs(x), abs(y), 1e-30)
        if at is None or rel > worst:
            worst, at = rel, step
    return {"same_steps": True, "steps": len(a), "steps_other": len(b), "max_rel_diff": worst,
            "at_step": at, "bitwise": all(a[s] == b[s] for s in a)}


def compare_loss_tool(outdir, first, second):
    """The verdict line of tests/gpu/apps/compare_loss.py itself (as apps_check.sh runs it)."""
    try:
        r = subprocess.run([sys.executable, os.path.join(APPDIR, "compare_loss.py"),
                            os.path.join(outdir, f"torch_{first}.out"),
                            os.path.join(outdir, f"torch_{second}.out"), f"{RTOL:g}"],
                           capture_output=True, text=True, timeout=60)
        return (r.stdout.strip() or r.stderr.strip()).splitlines()[-1] if (r.stdout or r.stderr) else f"exit {r.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{type(e).__name__}: {e}"


class Orchestrator:
    def __init__(self, dist, outdir):
        self.dist = dist
        self.outdir = outdir
        self.deadline = time.monotonic() + BUDGET
        self.failures = []
        self.python = os.environ.get("PYTHON", sys.executable)
        self.trainer = os.environ.get("TRAINER", os.path.join(APPDIR, "torch_train.py"))
        self.native_lib = os.environ.get("NATIVE_LIB_DIR", "/usr/local/nvidia/lib64")
        dev = os.environ.get("VGPU_DEVICE", "cuda")
        self.device = "emulated" if dev.startswith("emulated") else "cuda"
        self.gpu_memory = int(os.environ.get("GPU_MEMORY") or 0) or 80 * GIB
        limit = float(os.environ.get("SLICE_LIMIT_GIB", str(BALLAST_GIB + 8)))
        self.limit = min(int(limit * GIB), self.gpu_memory)
        self.ours = os.path.realpath(os.path.join(dist, "lib", "libcuda.so.1"))
        self.sched = None
        self.state = None
        self.api = None
        self.trainers = []

    def fail(self, msg):
        log(f"FAIL {msg}")
        self.failures.append(msg)

    # --- trainers -----------------------------------------------------------------------
    def env(self, slice_socket):
        base = os.environ.get("LD_LIBRARY_PATH", "")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
                   PYTHONPATH=APPDIR + (":" + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
        lib = self.native_lib if slice_socket is None else os.path.join(self.dist, "lib")
        env["LD_LIBRARY_PATH"] = lib + (":" + base if base else "")
        if slice_socket is None:
            env.pop("VGPU_SOCKET", None)
        else:
            env.update(VGPU_SOCKET=slice_socket, VGPU_LOG=os.environ.get("SLICE_LOG", "warn"),
                       TRITON_LIBCUDA_PATH=os.path.join(self.dist, "lib"))
        return env

    def start(self, label, slice_socket):
        cmd = [self.python, self.trainer, "--steps", str(STEPS)]
        if BALLAST_GIB > 0:
            cmd += ["--ballast-gib", f"{BALLAST_GIB:g}"]
        log(f"{label}: {' '.join(cmd)}" + (f" through {slice_socket}" if slice_socket else " natively"))
        deadline = min(time.monotonic() + TRAIN_TIMEOUT, self.deadline)
        t = Trainer(label, cmd, self.env(slice_socket), self.outdir, deadline)
        self.trainers.append(t)
        return t

    def end(self, t):
        rc = t.finish()
        s = t.summary(rc, time.monotonic() - t.started)
        log(f"{t.label}: exit {rc}, {s['steps']} steps in {s['seconds']} s, median step "
            f"{s['step_ms_median']} ms, {s['ballast']}, last loss {s['loss_last']}")
        if not s["completed"]:
            self.fail(f"the {t.label} run did not complete (exit {rc}, {s['steps']} of {STEPS} steps; "
                      f"see torch_{t.label}.err)")
        if BALLAST_GIB > 0 and s["ballast"] != "ballast ok":
            self.fail(f"the {t.label} run's ballast: {s['ballast']}")
        return s

    # --- the scheduler ------------------------------------------------------------------
    def start_scheduler(self):
        self.state = tempfile.mkdtemp(prefix="vgpu-torch-")
        cfg = os.path.join(self.state, "vgpu.toml")
        with open(cfg, "w") as f:
            f.write(f'device = "{self.device}"\n\n[[gpu]]\nindex = 0\nmemory = {self.gpu_memory}\n\n')
            f.write(f'[[slice]]\nname = "{SLICE}"\ntenant = "t-{SLICE}"\nclass = "best-effort"\n'
                    f'compute_guarantee_pct = 50\nmemory_guarantee = 0\nmemory_limit = {self.limit}\n'
                    'attach = true\n')
        self.slog = os.path.join(self.outdir, "scheduler-torch.log")
        env = dict(os.environ, RUST_LOG=os.environ.get("SCHED_LOG", "info"), NO_COLOR="1",
                   LD_LIBRARY_PATH=self.native_lib)
        if env.pop("VGPU_ELASTIC", None) is not None:
            log("VGPU_ELASTIC unset for the scheduler: reclaim needs elastic memory")
        log(f"starting vgpu-scheduler --device {self.device}, slice {SLICE} limit {self.limit} bytes")
        self.sched = subprocess.Popen(
            [os.path.join(self.dist, "bin", "vgpu-scheduler"), "--config", cfg, "--state-dir", self.state,
             "--device", self.device, "--backend", os.path.join(self.dist, "bin", "vgpu-backend")],
            stdin=subprocess.DEVNULL, stdout=open(self.slog, "w"), stderr=subprocess.STDOUT, env=env)
        self.api = Api(os.path.join(self.state, "api.sock"))
        sock = os.path.join(self.state, "slices", f"{SLICE}.sock")
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if self.sched.poll() is not None:
                raise RuntimeError(f"the scheduler exited with {self.sched.returncode} (see {self.slog})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no slice socket {sock} within 60 s (see {self.slog})")
            time.sleep(0.05)
        self.memory_until(lambda m: True, 30, "the scheduler's API")
        return sock

    def stop_scheduler(self):
        if self.sched is not None and self.sched.poll() is None:
            self.sched.terminate()
            try:
                self.sched.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.sched.kill()
                self.sched.wait(timeout=10)
        if self.state:
            shutil.rmtree(self.state, ignore_errors=True)

    def memory(self):
        return self.api.memory(SLICE)

    def memory_until(self, done, timeout, what):
        """Polls /v1/memory until done(slice) holds; returns the last sample (None if the
        API never answered)."""
        deadline = time.monotonic() + timeout
        m = None
        while True:
            try:
                m = self.memory()
                if done(m):
                    return m
            except (OSError, ValueError, StopIteration, IndexError):
                pass
            if time.monotonic() > deadline:
                self.fail(f"{what}: not within {timeout} s (last {m})")
                return m
            time.sleep(0.05)

    # --- one reclaim cycle --------------------------------------------------------------
    def post(self, what):
        """POSTs /v1/slices/SLICE/WHAT: (HTTP status or None, answer or error text)."""
        try:
            return self.api.request("POST", f"/v1/slices/{SLICE}/{what}")
        except (OSError, ValueError) as e:
            return None, f"{type(e).__name__}: {e}"

    def cycle(self, t, i, target):
        c = {"cycle": i, "target_step": target}
        if not t.wait_step(target, t.deadline):
            self.fail(f"cycle {i}: the trainer never reached step {target} (it is at {t.last_step()})")
            c["skipped"] = True
            return c
        c["resident_before"] = self.memory()["resident"]
        c["step_before"] = t.last_step()
        try:
            st, out = self.post("reclaim")
            reclaimed = time.monotonic()
            c["reclaim_status"], c["reclaim_api"] = st, out
            c["reclaim_ms"] = out.get("ms") if isinstance(out, dict) else None
            c["step_at_reclaim"] = t.last_step()
            m = self.memory()
            c["swapped"], c["resident"], c["evicted"] = m["swapped"], m["resident"], m["evicted"]
            if st != 200:
                self.fail(f"cycle {i}: reclaim answered {st}: {out}")
            elif m["swapped"] <= 0 or m["resident"] != 0:
                self.fail(f"cycle {i}: after the reclaim the slice shows swapped {m['swapped']}, "
                          f"resident {m['resident']}")
            elif BALLAST_GIB > 0 and m["swapped"] < int(BALLAST_GIB * GIB):
                self.fail(f"cycle {i}: only {m['swapped']} bytes swapped, less than the ballast")
            # Frozen: once the line in flight (if any) is in, no step may come until restore.
            t.wait_end(reclaimed + GRACE_S)
            c["step_at_settle"] = settled = t.last_step()
            t.wait_end(reclaimed + HOLD_S)
            c["step_at_hold_end"] = t.last_step()
            c["held_s"] = round(time.monotonic() - reclaimed, 3)
            m = self.memory()
            c["swapped_at_hold_end"], c["resident_at_hold_end"] = m["swapped"], m["resident"]
            c["stalled"] = c["step_at_hold_end"] == settled and not t.ended()
            if not c["stalled"]:
                self.fail(f"cycle {i}: the trainer went on while reclaimed (step {settled} -> "
                          f"{c['step_at_hold_end']}{', ended' if t.ended() else ''})")
            if m["resident"] != 0:
                self.fail(f"cycle {i}: {m['resident']} bytes resident during the hold")
        finally:
            st, back = self.post("restore")
        restored = time.monotonic()
        c["restore_status"], c["restore_api"] = st, back
        c["restore_ms"] = back.get("ms") if isinstance(back, dict) else None
        if st != 200:
            self.fail(f"cycle {i}: restore answered {st}: {back}")
        m = self.memory()
        c["swapped_after_restore"], c["resident_after_restore"] = m["swapped"], m["resident"]
        if m["swapped"] != 0 or m["evicted"]:
            self.fail(f"cycle {i}: after the restore the slice shows swapped {m['swapped']}, "
                      f"evicted {m['evicted']}")
        step = t.last_step()
        if t.wait_step(step + 1, min(restored + 60, t.deadline)):
            c["resume_ms"] = round((t.step_time(step + 1) - restored) * 1e3, 3)
        elif step + 1 < STEPS:
            self.fail(f"cycle {i}: no step after the restore within 60 s (at step {step})")
        c["step_after"] = t.last_step()
        log(f"cycle {i}: at step {c['step_at_reclaim']} reclaimed {c.get('swapped')} bytes in "
            f"{c['reclaim_ms']} ms, held {c.get('held_s')} s (stalled: {c.get('stalled')}), restored "
            f"in {c['restore_ms']} ms, next step after {c.get('resume_ms')} ms")
        return c

    # --- everything ---------------------------------------------------------------------
    def run(self):
        doc = {"benchmark": "torch-reclaim", "device": self.device, "steps": STEPS,
               "ballast_gib": BALLAST_GIB, "hold_s": HOLD_S, "reclaim_at": RECLAIM_AT,
               "rtol": RTOL, "slice_limit": self.limit, "trainer": os.path.basename(self.trainer)}
        runs, curves, cycles = {}, {}, []
        try:
            t = self.start("native", None)
            runs["native"] = self.end(t)
            curves["native"] = t.losses()

            sock = self.start_scheduler()
            t = self.start("undisturbed", sock)
            runs["undisturbed"] = self.end(t)
            curves["undisturbed"] = t.losses()
            # The trainer's connection is gone: its memory is freed before the next run.
            self.memory_until(lambda m: m["resident"] == 0 and m["swapped"] == 0, 30,
                              "the slice's memory freed after the undisturbed run")

            t = self.start("reclaimed", sock)
            try:
                for i, frac in enumerate(RECLAIM_AT):
                    c = self.cycle(t, i, max(1, min(STEPS - 2, int(STEPS * frac))))
                    cycles.append(c)
                    if c.get("skipped"):
                        break
            except BaseException:
                t.kill()
                raise
            finally:
                runs["reclaimed"] = self.end(t)
                curves["reclaimed"] = t.losses()
        except Exception as e:  # noqa: BLE001 - reported in the document
            self.fail(f"{type(e).__name__}: {e}")
        finally:
            # A second SIGTERM must not cut the cleanup short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            for t in self.trainers:
                t.kill()
            self.stop_scheduler()
        doc["runs"] = runs
        doc["cycles"] = cycles
        if self.sched is not None:
            doc["swap_out"] = [{"bytes": b, "ms": ms, "gbps": b / ms / 1e6 if ms else None}
                               for b, ms in backend_times(self.slog, "swapped out")]
            doc["swap_in"] = [{"bytes": b, "ms": ms, "gbps": b / ms / 1e6 if ms else None}
                              for b, ms in backend_times(self.slog, "restored at the same")]
        for r in ("undisturbed", "reclaimed"):
            lib = (runs.get(r) or {}).get("libcuda")
            if lib is not None and os.path.realpath(lib) != self.ours:
                self.fail(f"the {r} run loaded {lib}, not {self.ours}")
        lib = (runs.get("native") or {}).get("libcuda")
        if lib is not None and os.path.realpath(lib) == self.ours:
            self.fail("the native run loaded our library")
        vs_native = compare(curves.get("native", {}), curves.get("reclaimed", {}))
        vs_undisturbed = compare(curves.get("undisturbed", {}), curves.get("reclaimed", {}))
        undisturbed_vs_native = compare(curves.get("native", {}), curves.get("undisturbed", {}))
        vs_native["compare_loss"] = compare_loss_tool(self.outdir, "native", "reclaimed")
        vs_undisturbed["compare_loss"] = compare_loss_tool(self.outdir, "undisturbed", "reclaimed")
        doc["vs_native"], doc["vs_undisturbed"] = vs_native, vs_undisturbed
        doc["undisturbed_vs_native"] = undisturbed_vs_native
        doc["max_rel_diff_vs_native"] = vs_native["max_rel_diff"]
        doc["max_rel_diff_vs_undisturbed"] = vs_undisturbed["max_rel_diff"]

        def within(c):
            return c["same_steps"] and c["max_rel_diff"] is not None and c["max_rel_diff"] <= RTOL

        doc["identical_to_undisturbed"] = within(vs_undisturbed)
        doc["identical_to_native"] = within(vs_native)
        doc["bitwise_identical_to_undisturbed"] = vs_undisturbed["bitwise"]
        if not doc["identical_to_undisturbed"]:
            self.fail(f"the reclaimed run's losses differ from the undisturbed run's: {vs_undisturbed}")
        if not doc["identical_to_native"]:
            self.fail(f"the reclaimed run's losses differ from the native run's: {vs_native}")
        doc["ballast_intact"] = BALLAST_GIB <= 0 or all(
            (runs.get(r) or {}).get("ballast") == "ballast ok" for r in ("native", "undisturbed", "reclaimed"))
        doc["cycles_ok"] = len(cycles) == len(RECLAIM_AT) and all(
            c.get("stalled") and c.get("reclaim_status") == 200 and c.get("restore_status") == 200
            and (c.get("swapped") or 0) > 0 and c.get("resident") == 0 for c in cycles)
        doc["completed"] = len(runs) == 3 and all(r["completed"] for r in runs.values())
        doc["goal_met"] = (doc["completed"] and doc["identical_to_undisturbed"] and doc["identical_to_native"]
                           and doc["ballast_intact"] and doc["cycles_ok"] and not self.failures)
        doc["failures"] = self.failures
        return doc


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    dist, outdir = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
    os.makedirs(outdir, exist_ok=True)
    signal.signal(signal.SIGTERM, on_sigterm)
    doc = Orchestrator(dist, outdir).run()
    log(f"goal met: {doc['goal_met']}; identical to undisturbed: {doc['identical_to_undisturbed']} "
        f"(max rel diff {doc['max_rel_diff_vs_undisturbed']}), vs native {doc['max_rel_diff_vs_native']}, "
        f"{len(doc['cycles'])} cycles, {len(doc['failures'])} failures")
    print(json.dumps(doc, indent=2))
    return 0 if doc["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())

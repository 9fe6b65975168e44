"""Compares two outputs of torch_train.py: passes when both have the same steps (at least
one) and every step's loss agrees to a relative tolerance (default 1e-5).

    python3 compare_loss.py NATIVE_OUT SLICE_OUT [RTOL]

Prints the number of steps and the largest relative difference; exit 0 on a match."""
import math
import re
import sys

STEP = re.compile(r"^step (\d+) loss (\S+)$")


def losses(path):
    out = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = STEP.match(line.strip())
            if m:
                out[int(m.group(1))] = float(m.group(2))
    return out


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rtol = float(sys.argv[3]) if len(sys.argv) == 4 else 1e-5
    a, b = losses(sys.argv[1]), losses(sys.argv[2])
    if not a or set(a) != set(b):
        only_a = sorted(set(a) - set(b))[:5]
        only_b = sorted(set(b) - set(a))[:5]
        print(f"FAIL steps differ: {len(a)} vs {len(b)} (only in first {only_a}, "
              f"only in second {only_b})")
        return 1
    worst, worst_step = 0.0, None
    for step in sorted(a):
        x, y = a[step], b[step]
        if not (math.isfinite(x) and math.isfinite(y)):
            rel = 0.0 if x == y or (math.isnan(x) and math.isnan(y)) else math.inf
        else:
            rel = abs(x - y) / max(abs(x), abs(y), 1e-30)
        if worst_step is None or rel > worst:
            worst, worst_step = rel, step
    ok = worst <= rtol
    print(f"{'PASS' if ok else 'FAIL'} {len(a)} steps, max relative difference {worst:.3e} "
          f"at step {worst_step} (tolerance {rtol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Compares two outputs of torch_train.py: passes when both have the same steps (at least
one) and every step's loss agrees to a relative tolerance (default 1e-5).

    python3 compare_loss.py NATIVE_OUT SLICE_OUT [RTOL]
    python3 compare_loss.py --lines NATIVE_OUT SLICE_OUT [RTOL]

With --lines (torch_compile.py, whose compiled backward sums with float atomics), every line
must match word for word, except that numbers agree to RTOL.

Prints the number of steps (or lines) and the largest relative difference; exit 0 on a match."""
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


def relative(x, y):
    if not (math.isfinite(x) and math.isfinite(y)):
        return 0.0 if x == y or (math.isnan(x) and math.isnan(y)) else math.inf
    return abs(x - y) / max(abs(x), abs(y), 1e-30)


def number(word):
    try:
        return float(word)
    except ValueError:
        return None


def compare_lines(path_a, path_b, rtol):
    with open(path_a, encoding="utf-8", errors="replace") as f:
        a = f.read().splitlines()
    with open(path_b, encoding="utf-8", errors="replace") as f:
        b = f.read().splitlines()
    if not a or len(a) != len(b):
        print(f"FAIL lines differ: {len(a)} vs {len(b)}")
        return 1
    worst, worst_line = 0.0, None
    for i, (la, lb) in enumerate(zip(a, b), 1):
        wa, wb = la.split(), lb.split()
        if len(wa) != len(wb):
            print(f"FAIL line {i} differs: {la!r} vs {lb!r}")
            return 1
        for x, y in zip(wa, wb):
            nx, ny = number(x), number(y)
            if x == y:
                continue
            if nx is None or ny is None:
                print(f"FAIL line {i} differs: {la!r} vs {lb!r}")
                return 1
            rel = relative(nx, ny)
            if worst_line is None or rel > worst:
                worst, worst_line = rel, i
    ok = worst <= rtol
    print(f"{'PASS' if ok else 'FAIL'} {len(a)} lines, max relative difference {worst:.3e}"
          f"{f' at line {worst_line}' if worst_line else ''} (tolerance {rtol:g})")
    return 0 if ok else 1


def main():
    args = sys.argv[1:]
    by_lines = bool(args) and args[0] == "--lines"
    if by_lines:
        args = args[1:]
    if len(args) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rtol = float(args[2]) if len(args) == 3 else 1e-5
    if by_lines:
        return compare_lines(args[0], args[1], rtol)
    a, b = losses(args[0]), losses(args[1])
    if not a or set(a) != set(b):
        only_a = sorted(set(a) - set(b))[:5]
        only_b = sorted(set(b) - set(a))[:5]
        print(f"FAIL steps differ: {len(a)} vs {len(b)} (only in first {only_a}, "
              f"only in second {only_b})")
        return 1
    worst, worst_step = 0.0, None
    for step in sorted(a):
        rel = relative(a[step], b[step])
        if worst_step is None or rel > worst:
            worst, worst_step = rel, step
    ok = worst <= rtol
    print(f"{'PASS' if ok else 'FAIL'} {len(a)} steps, max relative difference {worst:.3e} "
          f"at step {worst_step} (tolerance {rtol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the PyTorch programs in tests/gpu/apps (not a test itself).

APPS_DEVICE (default "cuda") exists only to smoke-test the scripts on a machine without a
GPU; apps_check.sh never sets it.
"""
import os
import sys


def device():
    return os.environ.get("APPS_DEVICE", "cuda")


def report_libcuda():
    """Prints "libcuda: <path>" on stderr for the libcuda mapped into this process, so that
    apps_check.sh can tell a slice run that silently used the real driver."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                i = line.find("/")
                if i >= 0 and "/libcuda.so" in line[i:]:
                    print("libcuda: " + line[i:].strip(), file=sys.stderr, flush=True)
                    return
    except OSError:
        pass
    print("libcuda: none", file=sys.stderr, flush=True)


def fmt(x):
    """A float with all of its digits (repr of the Python float)."""
    return repr(float(x))

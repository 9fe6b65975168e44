"""Shared by gpt2_train.py and decode_loop.py: timing summaries and the libcuda report."""
import json
import math
import os
import statistics


def libcuda_path():
    """The real path of the libcuda mapped into this process ("none" if not loaded)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                i = line.find("/")
                if i >= 0 and "/libcuda.so" in line[i:]:
                    return os.path.realpath(line[i:].strip())
    except OSError:
        pass
    return "none"


def percentile(values, p):
    """Nearest-rank percentile of a non-empty list (p in 0..100); p = 50 is the median."""
    if p == 50:
        return statistics.median(values)
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100.0 * len(s)) - 1))]


def emit(prefix, samples_ms, **extra):
    """Prints one JSON line: {prefix}_median, {prefix}_p90, ... and the extra fields."""
    doc = {
        f"{prefix}_median": round(percentile(samples_ms, 50), 4),
        f"{prefix}_p90": round(percentile(samples_ms, 90), 4),
        f"{prefix}_min": round(min(samples_ms), 4),
        f"{prefix}_mean": round(sum(samples_ms) / len(samples_ms), 4),
    }
    doc.update(extra)
    doc["libcuda"] = libcuda_path()
    print(json.dumps(doc), flush=True)

"""Memory of the ensemble's scoring call, traced against frozen: `python -m bench.scoring_memory [--model NAME]`.

Each arm runs in its own fresh process: load the model, make one Grad-CAM call on one 224 x 224 input, then
`gc.collect()` + `malloc_trim(0)` and read the resident set from /proc/self/statm; then 20 more calls for the
p50 latency. Prints one JSON line per arm. This is what decided `Predictor(freeze=)` (the app keeps the
traced call; `predict` freezes from `predict.FREEZE_FROM_IMAGES` inputs), docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_PROBE = r"""
import ctypes, gc, json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
def rss_mb():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
from mammo_core.inference.predict import Predictor
frozen = sys.argv[2] == "frozen"
p = Predictor.load(sys.argv[1] or None, freeze=frozen)
loaded = rss_mb()
x = np.random.default_rng(0).integers(0, 256, (1, 224, 224), dtype=np.uint8)
t = time.perf_counter(); p.score_batch(x, with_cam=True); first = time.perf_counter() - t
after = rss_mb()
times = []
for _ in range(20):
    t = time.perf_counter(); p.score_batch(x, with_cam=True); times.append(time.perf_counter() - t)
print(json.dumps({"arm": sys.argv[2], "model": p.name, "rss_loaded_mb": round(loaded), "rss_after_call_mb": round(after),
                  "call_cost_mb": round(after - loaded), "first_call_s": round(first, 2),
                  "p50_ms": round(1e3 * float(np.median(times)), 1)}))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="model name (default: the active model)")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    for arm in ("traced", "frozen"):
        out = subprocess.run([sys.executable, "-c", _PROBE, args.model, arm], env=env, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"arm": arm, "error": out.stderr.strip()[-500:]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench.ray_engine [FOLDER] [--workers 2]`: predict's local engine beside its Ray engine.

On the same inputs (default: $MAMMO_DATA_DIR/test, 1,908 images) and the active model, without
Grad-CAM, it measures
- local: model load, then total and marginal images/s of `score_paths`;
- ray: local Ray start-up (`ray.init`); actor start, as the whole time of a run on 4 images (actors
  import TensorFlow and load the model: the rest is negligible); then the full run: time to the
  first result (actor start plus the first block, about 120 images, as order is preserved), marginal
  images/s once running, and the total.
Marginal images/s: local, from the moment a quarter of the results are in to the last one; Ray,
whose results arrive in bursts (blocks kept in order), the images over the full run's time less the
actor start (each run starts its own actor pool).
It also checks that both engines give the same probabilities (max absolute difference).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _timed(rows, n: int):
    """Consume n (row, ...) items; return rows, time to first, time at n // 4 items, time at end."""
    t0 = time.perf_counter()
    out, first, warm = [], None, None
    for item in rows:
        out.append(item)
        if first is None:
            first = time.perf_counter() - t0
        if len(out) == max(1, n // 4):
            warm = time.perf_counter() - t0
    return out, first, warm, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder", nargs="?", default=os.path.join(os.environ.get("MAMMO_DATA_DIR", ""), "test"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from mammo_core.data.datasets import expand_inputs
    from mammo_core.inference.predict import Predictor, score_paths
    from mammo_core.store.registry import resolve_model_dir

    paths = expand_inputs([args.folder])
    model_dir = resolve_model_dir(None)
    n = len(paths)
    result = {"images": n, "model": model_dir.name, "workers": args.workers, "batch_size": args.batch_size,
              "cpus": os.cpu_count(), "machine": platform.platform()}

    t0 = time.perf_counter()
    predictor = Predictor.load(model_dir)
    load = time.perf_counter() - t0
    rows, first, warm, total = _timed(score_paths(predictor, paths, with_cam=False, batch_size=args.batch_size,
                                                  keep_images=False), n)
    local = {p.name: p.probability for p in rows}
    result["local"] = {"model_load_s": round(load, 2), "first_result_s": round(first, 2), "total_s": round(total, 1),
                       "images_per_s": round(n / total, 1),
                       "marginal_images_per_s": round((n - n // 4) / (total - warm), 1)}

    import ray

    from mammo_core.inference.ray_engine import score_paths_ray, start_ray

    t0 = time.perf_counter()
    start_ray(None, workers=args.workers)
    startup = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        list(score_paths_ray(paths[:4], model_dir, workers=args.workers, batch_size=args.batch_size))
        actors = time.perf_counter() - t0
        rows, first, warm, total = _timed(score_paths_ray(paths, model_dir, workers=args.workers,
                                                          batch_size=args.batch_size), n)
    finally:
        ray.shutdown()
    diffs = [abs(row["probability"] - local[row["path"]]) for row, _ in rows if "probability" in row]
    result["ray"] = {"ray_start_s": round(startup, 2), "actor_start_s": round(actors, 1),
                     "first_result_s": round(first, 2), "total_s": round(total, 1),
                     "total_with_start_s": round(total + startup, 1),
                     "marginal_images_per_s": round(n / (total - actors), 1),
                     "max_abs_probability_difference_vs_local": max(diffs) if diffs else None}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

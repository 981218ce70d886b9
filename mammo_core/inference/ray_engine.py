"""Score an archive on Ray Data: decode and preprocess in Ray tasks, score on a pool of model actors.

The work is `Predictor`'s own, split in two: `Predictor.prepare_one` (decode + preprocess, the same
function the local engine and training use) runs in Ray Data tasks without loading the model, and
`Predictor.score_prepared` runs in `map_batches` on an actor pool
(`ray.data.ActorPoolStrategy(size=workers)`) where each actor loads the model once. So the scores
equal the local engine's, and an unreadable file becomes the same error row. Results stream back
in input order as blocks finish (Ray Data's streaming executor), so memory stays bounded.

Without an address a local Ray is started (and shut down afterwards); with `address` (or
`RAY_ADDRESS`) the run joins that cluster, whose nodes must see the image paths and the model
directory (a shared file system) and have mammo_core's requirements installed. A GPU is requested
per actor when the cluster has one per actor.

Example:
    >>> for row, sha256 in score_paths_ray(paths, model_dir, workers=2):   # doctest: +SKIP
    ...     print(row["path"], row.get("probability"), row.get("error"))
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from mammo_core.config import IMAGE_SIZE, REPO_ROOT

#: Inputs per decode task and per scoring call on an actor.
DECODE_BATCH = 16
DEFAULT_WORKERS = 2


def _prepare_batch(batch: Any, card: dict[str, Any]) -> Any:
    """Ray task: decode + preprocess a pandas batch of (index, path) with `Predictor.prepare_one`."""
    import pandas as pd

    from mammo_core.inference.predict import Predictor

    preparer = Predictor.preparer(card)
    rows = []
    for index, path in zip(batch["index"], batch["path"]):
        pred = preparer.prepare_one(path, path)
        rows.append({"index": int(index), "path": pred.name, "error": pred.error, "sha256": pred.sha256,
                     "warnings": json.dumps(pred.warnings),
                     "model_input": b"" if pred.model_input is None else pred.model_input.tobytes()})
    return pd.DataFrame(rows)


class _Scorer:
    """Ray actor: loads the model once, then scores prepared batches with `Predictor.score_prepared`."""

    def __init__(self, model_dir: str) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from mammo_core.inference.predict import Predictor

        self.predictor = Predictor.load(model_dir)

    def __call__(self, batch: Any) -> Any:
        import pandas as pd

        from mammo_core.inference.predict import Prediction

        preds = []
        for path, error, sha256, warnings, raw in zip(batch["path"], batch["error"], batch["sha256"],
                                                      batch["warnings"], batch["model_input"]):
            pred = Prediction(name=path, error=error if isinstance(error, str) else None,
                              sha256=sha256 if isinstance(sha256, str) else None, warnings=json.loads(warnings))
            if pred.error is None:
                pred.model_input = np.frombuffer(raw, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
            preds.append(pred)
        self.predictor.score_prepared(preds, with_cam=False)
        return pd.DataFrame({"index": batch["index"], "row": [json.dumps(p.to_json(self.predictor.name)) for p in preds],
                             "sha256": [p.sha256 or "" for p in preds]})


def start_ray(address: str | None = None, *, workers: int = DEFAULT_WORKERS) -> bool:
    """Join the cluster at `address` (or `RAY_ADDRESS`), else start a local Ray. True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": "WARNING"}
    if address:
        ray.init(address=address, runtime_env={"py_modules": [str(Path(__file__).parents[1])]}, **quiet)
        return False
    # address="local": always a new local Ray, never a cluster some `ray start` left behind on this machine.
    # Actors and decode tasks each take a CPU slot; on a small machine let them share the cores.
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, workers + 1), **quiet,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO_ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}})
    return True


def score_paths_ray(paths: Sequence[str | Path], model_dir: str | Path, *, workers: int = DEFAULT_WORKERS,
                    batch_size: int = 32, address: str | None = None) -> Iterator[tuple[dict[str, Any], str]]:
    """Score image paths on Ray; yields (`Prediction.to_json` row, input SHA-256 or "") in input order.

    Raises ValueError for fewer than one worker or an empty path list. The local Ray this starts is
    shut down when the generator finishes or is closed.
    """
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    if not paths:
        raise ValueError("no image files to score")
    import ray

    from mammo_core.store.card import read_card

    model_dir = str(Path(model_dir).resolve())
    card = read_card(Path(model_dir))
    started = start_ray(address, workers=workers)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the CLI draws one bar over files
        ctx.execution_options.preserve_order = True
        gpus = ray.cluster_resources().get("GPU", 0)
        per_actor = {"num_gpus": 1} if gpus >= workers else {"num_cpus": 1}
        items = [{"index": i, "path": str(p)} for i, p in enumerate(paths)]
        blocks = max(min(len(items), workers), min(-(-len(items) // DECODE_BATCH), 8 * workers))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        # Decoding runs in plain tasks; their lighter CPU request also keeps Ray from fusing them into the actors.
        ds = ds.map_batches(_prepare_batch, fn_kwargs={"card": card}, batch_size=DECODE_BATCH, batch_format="pandas",
                            compute=ray.data.TaskPoolStrategy(), num_cpus=0.5)
        ds = ds.map_batches(_Scorer, fn_constructor_kwargs={"model_dir": model_dir}, batch_size=batch_size,
                            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=workers), **per_actor)
        for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
            for row, sha256 in zip(batch["row"], batch["sha256"]):
                yield json.loads(row), sha256
    finally:
        if started:
            ray.shutdown()

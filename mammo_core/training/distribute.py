"""Training on several devices or machines with tf.distribute: which strategy, who writes, how to resume.

`--strategy` for `train` and `cv`:
- `none`: one device, as before; `auto`: `MirroredStrategy` over the local GPUs when there are
  two or more, else none;
- `mirrored`: `MirroredStrategy` over the local GPUs (or, without GPUs, over the logical CPU
  devices the process was given); `model.fit` works under it as usual;
- `multi-worker`: `MultiWorkerMirroredStrategy` over the machines `TF_CONFIG` lists. Keras 3's
  `model.fit` fails under it (keras-team/keras#20585), so `fit_custom` trains with `strategy.run`,
  a GradientTape and the model's own optimizer, and keeps a `tf.train.CheckpointManager` checkpoint
  per epoch so that a restarted worker set resumes. Only the chief (task `chief`, else worker 0)
  writes the model directory, card and logs; the other workers write into a scratch folder
  (`output_root`) that is removed when they finish.

The strategy must exist before any other TensorFlow operation (`make_strategy` first thing), and
the in-memory datasets are sharded by data (`AutoShardPolicy.DATA`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

STRATEGIES: tuple[str, ...] = ("auto", "none", "mirrored", "multi-worker")
CHECKPOINTS = ".checkpoints"  # under the weights folder: <name>/ per run being trained
_SCRATCH_PREFIX = ".worker-"
_made: dict[str, Any] = {}


def check_strategy(name: str) -> None:
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {name!r}")
    if name == "multi-worker" and not tf_config().get("cluster"):
        raise ValueError("--strategy multi-worker needs TF_CONFIG with a cluster and this worker's task "
                         "(see docs/SCALING.md)")


def tf_config() -> dict[str, Any]:
    """The parsed TF_CONFIG ({} when unset); ValueError when it is not JSON."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON ({exc.msg} at character {exc.pos})") from None


def is_chief(name: str) -> bool:
    """True when this process writes the outputs: always, except for non-chief multi-worker tasks."""
    if name != "multi-worker":
        return True
    config = tf_config()
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def task_name(name: str) -> str:
    task = tf_config().get("task", {}) if name == "multi-worker" else {}
    return f"{task.get('type', 'worker')} {task.get('index', 0)}" if task else "this process"


def make_strategy(name: str) -> Any:
    """The tf.distribute strategy for `name`, or None for one device. Made once per process (call it
    before any other TensorFlow operation; multi-worker needs that)."""
    check_strategy(name)
    if name in _made:
        return _made[name]
    import tensorflow as tf

    strategy = None
    if name == "auto":
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in gpus]) if len(gpus) > 1 else None
    elif name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        strategy = tf.distribute.MirroredStrategy([d.name for d in devices])
    elif name == "multi-worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    _made[name] = strategy
    return strategy


def scope(strategy: Any):
    """`strategy.scope()`, or a no-op for one device: build and compile models inside it."""
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def is_multi_worker(strategy: Any) -> bool:
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def output_root(root: Path, name: str) -> Path:
    """Where this process writes a model directory: `root` for the chief (or one machine), a scratch
    folder inside it for the other workers (removed by `scratch_removed`)."""
    if is_chief(name):
        return root
    task = tf_config().get("task", {})
    scratch = root / f"{_SCRATCH_PREFIX}{task.get('type', 'worker')}{task.get('index', 0)}-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    return scratch


@contextlib.contextmanager
def scratch_removed(root: Path) -> Iterator[None]:
    """Remove `root` on the way out when it is a worker's scratch folder (`output_root`)."""
    try:
        yield
    finally:
        if root.name.startswith(_SCRATCH_PREFIX):
            shutil.rmtree(root, ignore_errors=True)


def checkpoint_dir(run_dir: Path, name: str) -> Path:
    """The shared checkpoint folder of model `name` trained in `run_dir` (the chief's weights folder's
    `.checkpoints/<name>`, whichever worker asks), stable across restarts."""
    root = run_dir.parent
    if root.name.startswith(_SCRATCH_PREFIX):
        root = root.parent
    return root / CHECKPOINTS / name


def describe(strategy: Any, name: str) -> dict[str, Any]:
    """For the model card: the strategy asked for, the one used and over how many replicas."""
    used = "none" if strategy is None else type(strategy).__name__
    if strategy is not None and is_multi_worker(strategy):
        used = "MultiWorkerMirroredStrategy"  # its class is named CollectiveAllReduceStrategy
    return {"requested": name, "used": used, "replicas": int(strategy.num_replicas_in_sync) if strategy else 1}


def validation(model: Any, images: np.ndarray, labels: Any, channels: int) -> Callable[[], dict[str, float]]:
    """`fit_custom`'s `validate`: val_loss and val_auc of `model` on decoded images (each worker on its own)."""
    from mammo_core.evaluation.metrics import auc
    from mammo_core.inference.predict import predict_arrays

    y = np.asarray(labels, dtype=np.float64)

    def run() -> dict[str, float]:
        p = np.clip(predict_arrays(model, images, channels=channels, batch_size=128).astype(np.float64), 1e-7, 1 - 1e-7)
        loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        return {"val_loss": loss, "val_auc": float(auc(y, p))}

    return run


def weights_digest(model: Any) -> str:
    """SHA-256 of a model's weights, to check that every worker ended with the same model."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


def fit_custom(strategy: Any, trainer: Any, train_ds: Any, *, epochs: int, global_batch_size: int,
               class_weight: dict[int, float] | None = None, callbacks: Sequence[Any] = (),
               validate: Callable[[], dict[str, float]] | None = None, checkpoints: Path | None = None,
               chief: bool = True, log: Callable[[str], None] = print) -> int:
    """Train compiled `trainer` on batched `train_ds` with a custom loop under `strategy`; returns the
    epoch it started from (> 0 after a resume).

    Each replica's binary cross-entropy (class-weighted when asked) is summed and divided by the
    global batch size, so the update is the one-device update on the whole batch. After each epoch
    `validate()` adds its metrics to the logs given to `callbacks` (`on_epoch_begin`, `on_train_batch_end`,
    `on_epoch_end`), and with `checkpoints` the model, optimizer and epoch are saved: by the chief
    into `checkpoints`, by the other workers into a temporary folder they delete (every worker must
    save: the save is a collective operation). A run that finds a checkpoint there resumes after its
    epoch. The folder is removed when training completes.
    """
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    dataset = _distributed(strategy, train_ds)
    step = _train_step(strategy, trainer, class_weight, global_batch_size)
    epoch_done, manager = _checkpointing(strategy, trainer, checkpoints, chief, log)
    start = int(epoch_done.numpy())
    for epoch in range(start, epochs):
        for cb in callbacks:
            cb.on_epoch_begin(epoch)
        logs = {"loss": _train_epoch(step, dataset, callbacks), **(validate() if validate else {})}
        epoch_done.assign(epoch + 1)
        if manager is not None:
            _save_checkpoint(manager, chief)
        for cb in callbacks:
            cb.on_epoch_end(epoch, logs)
    if checkpoints is not None and chief:
        _remove_checkpoints(checkpoints)
    return start


def _distributed(strategy: Any, train_ds: Any) -> Any:
    """`train_ds` sharded by data across the strategy's replicas and workers."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(train_ds.with_options(options))


def _train_step(strategy: Any, trainer: Any, class_weight: dict[int, float] | None,
                global_batch_size: int) -> Callable[[Any, Any], Any]:
    """One distributed update on a global batch: each replica's (class-weighted) cross-entropy summed
    over the global batch size, gradients applied by `trainer`'s optimizer; returns the summed loss."""
    import keras
    import tensorflow as tf

    weights = None if class_weight is None else tf.constant([class_weight[0], class_weight[1]], tf.float32)
    optimizer = trainer.optimizer

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            p = trainer(x, training=True)
            per_example = keras.losses.binary_crossentropy(tf.reshape(y, (-1, 1)), p)
            if weights is not None:
                per_example = per_example * tf.gather(weights, tf.cast(y, tf.int32))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
        grads = tape.gradient(loss, trainer.trainable_variables)
        optimizer.apply_gradients(zip(grads, trainer.trainable_variables))
        return loss

    @tf.function
    def step(x, y):
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_step, args=(x, y)), axis=None)

    return step


def _checkpointing(strategy: Any, trainer: Any, checkpoints: Path | None, chief: bool,
                   log: Callable[[str], None]) -> tuple[Any, Any]:
    """The epochs-done counter (restored from the latest checkpoint in `checkpoints`, if any) and the
    checkpoint manager that saves model, optimizer and counter (None without `checkpoints`). Non-chief
    workers save into a temporary folder of their own."""
    import tensorflow as tf

    optimizer = trainer.optimizer
    with strategy.scope():
        optimizer.build(trainer.trainable_variables)
        epoch_done = tf.Variable(0, dtype=tf.int64, trainable=False, name="epochs_done")
    ckpt = tf.train.Checkpoint(model=trainer, optimizer=optimizer, epochs_done=epoch_done)
    if checkpoints is None:
        return epoch_done, None
    latest = tf.train.latest_checkpoint(str(checkpoints))
    if latest:
        ckpt.restore(latest)
        log(f"resuming after epoch {int(epoch_done.numpy())} from {checkpoints}")
    where = checkpoints if chief else Path(tempfile.mkdtemp(prefix="mammo-worker-checkpoint-"))
    return epoch_done, tf.train.CheckpointManager(ckpt, str(where), max_to_keep=1)


def _train_epoch(step: Callable[[Any, Any], Any], dataset: Any, callbacks: Sequence[Any]) -> float:
    """Run `step` over every batch of `dataset`, telling `callbacks` the running mean loss; returns
    the epoch's mean loss."""
    total, steps = 0.0, 0
    for x, y in dataset:
        total += float(step(x, y))
        steps += 1
        for cb in callbacks:
            cb.on_train_batch_end(steps - 1, {"loss": total / steps})
    return total / max(steps, 1)


def _save_checkpoint(manager: Any, chief: bool) -> None:
    """Save (a collective operation: every worker must); non-chief workers then drop their copy."""
    manager.save()
    if not chief:
        shutil.rmtree(manager.directory, ignore_errors=True)


def _remove_checkpoints(checkpoints: Path) -> None:
    shutil.rmtree(checkpoints, ignore_errors=True)
    with contextlib.suppress(OSError):
        checkpoints.parent.rmdir()  # `.checkpoints` itself, once no other run uses it

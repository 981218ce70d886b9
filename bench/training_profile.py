"""`python -m bench.training_profile`: where a paper-cnn training step spends its time, op by op.

Each forward and backward piece of one batch-64 training step is timed alone as a compiled
`tf.function`, on random data of the real shapes. The pieces are the three convolutions (forward,
filter gradient, input gradient), the bias + ReLU + max-pool passes with their gradients, and the
dense head. They are timed in both block orders, and the convolutions in float32 and bfloat16.
`mammo_core.models.fast_training` was designed from this table. The pieces overlap, and the whole
graph fuses some of them, so the sum is only a guide to a full step.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def _timer(repeats: int):
    import tensorflow as tf

    def time_ms(fn, *args) -> float:
        fn(*args)
        fn(*args)  # trace, then warm oneDNN's primitive cache
        t = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        tf.nest.flatten(out)[0].numpy()  # wait for the last call
        return (time.perf_counter() - t) / repeats * 1000

    return time_ms


def profile(batch: int = 64, repeats: int = 6) -> list[tuple[str, float]]:
    """[(piece, ms per batch)] for one paper-cnn training step on 1-channel 224x224 input."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    time_ms = _timer(repeats)
    rows: list[tuple[str, float]] = []
    shapes = [((batch, 224, 224, 1), 32), ((batch, 111, 111, 32), 32), ((batch, 54, 54, 32), 64)]
    for i, (in_shape, filters) in enumerate(shapes, start=1):
        for dtype in (tf.float32, tf.bfloat16):
            x = tf.cast(rng.random(in_shape), dtype)
            w = tf.cast(rng.standard_normal((3, 3, in_shape[-1], filters)) * 0.1, dtype)
            y = tf.nn.conv2d(x, w, 1, "VALID")
            dy = tf.ones_like(y)
            tag = f"conv{i} {dtype.name}"
            rows.append((f"{tag} forward {tuple(in_shape[1:])} -> {tuple(y.shape[1:])}",
                         time_ms(tf.function(lambda x, w=w: tf.nn.conv2d(x, w, 1, "VALID")), x)))
            rows.append((f"{tag} filter gradient", time_ms(tf.function(
                lambda x, d, w=w: tf.compat.v1.nn.conv2d_backprop_filter(x, w.shape, d, [1, 1, 1, 1], "VALID")), x, dy)))
            if i > 1:  # conv1's input gradient is never needed
                rows.append((f"{tag} input gradient", time_ms(tf.function(
                    lambda d, w=w, s=x.shape: tf.compat.v1.nn.conv2d_backprop_input(s, w, d, [1, 1, 1, 1], "VALID")), dy)))
        y = tf.constant(rng.standard_normal((batch, *[s - 2 for s in in_shape[1:3]], filters)).astype(np.float32))
        b = tf.constant(rng.standard_normal(filters).astype(np.float32))
        for name, pool_first in (("bias + ReLU then max-pool", False), ("max-pool then bias + ReLU", True)):
            def step(y, b=b, pool_first=pool_first):
                with tf.GradientTape() as tape:
                    tape.watch(y)
                    if pool_first:
                        z = tf.nn.relu(tf.nn.max_pool2d(y, 2, 2, "VALID") + b)
                    else:
                        z = tf.nn.max_pool2d(tf.nn.relu(y + b), 2, 2, "VALID")
                return tape.gradient(z, y)

            rows.append((f"block{i} {name}, forward + backward on {tuple(y.shape[1:])}", time_ms(tf.function(step), y)))
    flat = tf.constant(rng.random((batch, 26 * 26 * 64)).astype(np.float32))
    wd = tf.constant(rng.standard_normal((26 * 26 * 64, 64)).astype(np.float32) * 0.01)

    def dense(x):
        with tf.GradientTape() as tape:
            tape.watch([x, wd])
            z = tf.nn.relu(x @ wd)
        return tape.gradient(z, [x, wd])

    rows.append(("dense 43264 -> 64, forward + backward", time_ms(tf.function(dense), flat)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args(argv)
    print("| piece of one training step (batch %d) | ms |" % args.batch)
    print("|---|---|")
    for name, ms in profile(args.batch, args.repeats):
        print(f"| {name} | {ms:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m bench.finetune`: training speed of the fine-tuning options, in one run, interleaved.

Contenders, each a training step on a batch of 32 (random data: the arithmetic, not the data, is timed):
- full fine-tuning: every EfficientNet-Lite0 layer trainable (BatchNorm frozen, as in the recipe), 224x224x1 input;
- partial fine-tuning from cached trunk activations at each cut in `finetune.CUTS` (`finetune.build_member`);
- the frozen head: Dense(1) on pooled 1280-d features (`efficientnet-lite0`'s strategy).
Rounds alternate the contenders so that a slow phase of the machine hits all of them; the best round of
each is reported, with the speed-up over full fine-tuning. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

BATCH = 32
FULL = "full fine-tuning (224x224x1 input)"


def _contenders() -> dict:
    import keras

    from mammo_core.models.efficientnet_lite import build_efficientnet_lite0_classifier
    from mammo_core.training import finetune

    out = {}
    full = build_efficientnet_lite0_classifier(weights="imagenet", train_backbone=True, train_batchnorm=False,
                                               drop_connect_rate=0.0)
    out[FULL] = (full, (224, 224, 1), True)
    for cut in finetune.CUTS:
        if cut == "stem":  # full fine-tuning, the row above
            continue
        _, core = finetune.build_parts(cut)
        member = finetune.build_member(core, finetune.Recipe(cut=cut))
        out[f"partial from cache, from {cut} ({'x'.join(str(d) for d in core.input.shape[1:])})"] = (
            member, tuple(core.input.shape[1:]), False)
    head = keras.Sequential([keras.Input((1280,)), keras.layers.Dropout(0.5), keras.layers.Dense(1)])
    out["frozen backbone, Dense(1) head on pooled features"] = (head, (1280,), False)
    return out


def _step_fn(model, sigmoid_output: bool):
    import keras
    import tensorflow as tf

    loss = keras.losses.BinaryCrossentropy(from_logits=not sigmoid_output)
    opt = keras.optimizers.AdamW(1e-4)
    opt.build(model.trainable_variables)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            value = loss(y, model(x, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return value

    return step


def measure(steps: int = 8, rounds: int = 3) -> dict:
    """{contender: {"images_per_s": best of rounds, "trainable": parameters}} and "full" (the reference name)."""
    rng = np.random.default_rng(0)
    contenders = _contenders()
    fns, data = {}, {}
    for name, (model, shape, sigmoid_output) in contenders.items():
        fns[name] = _step_fn(model, sigmoid_output)
        data[name] = (rng.random((BATCH, *shape), dtype=np.float32), rng.integers(0, 2, (BATCH, 1)).astype(np.float32))
        fns[name](*data[name])  # trace
    best = {name: 0.0 for name in contenders}
    for _ in range(rounds):
        for name in contenders:
            x, y = data[name]
            t0 = time.perf_counter()
            for _ in range(steps):
                fns[name](x, y).numpy()
            best[name] = max(best[name], steps * BATCH / (time.perf_counter() - t0))
    rows = {name: {"images_per_s": best[name],
                   "trainable": int(sum(np.prod(w.shape) for w in model.trainable_weights))}
            for name, (model, _, _) in contenders.items()}
    return {"rows": rows, "full": FULL, "batch": BATCH, "steps": steps, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.finetune", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from bench.__main__ import machine

    result = measure(args.steps, args.rounds)
    full = result["rows"][FULL]["images_per_s"]
    print(f"Machine: {machine()}\n")
    print("| contender | trainable parameters | images/s (best of rounds) | x full fine-tuning |")
    print("|---|---|---|---|")
    for name, row in result["rows"].items():
        print(f"| {name} | {row['trainable']:,} | {row['images_per_s']:.1f} | {row['images_per_s'] / full:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

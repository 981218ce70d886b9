"""Rewrite an efficientnet-lite0-ft model.keras with compact upper parts, same weights, same outputs.

The first ensemble was trained while `finetune.build_parts` made each member's upper part as a view of the
whole EfficientNet graph, so model.keras stored every member with all of the backbone's layers (164 MB).
`build_parts` now builds the upper part from the cut only. This copies each member's weights by layer name
into the compact structure, checks the outputs are identical on random inputs, and replaces model.keras and
the card's sha256 and parameter count. Usage: python experiments/compact_ensemble.py weights/NAME
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from mammo_core.store.card import edit_card  # noqa: E402
from mammo_core.store.files import sha256_file  # noqa: E402
from mammo_core.store.registry import MODEL_FILE, load_model
from mammo_core.training import finetune  # noqa: E402


def main(model_dir: Path) -> int:
    old, card = load_model(model_dir)
    recipe = finetune.Recipe.from_card(card["training"]["recipe"])
    _, core = finetune.build_parts(recipe.cut)
    members_old = old.get_layer(finetune.MEMBERS_NAME)
    k = card["ensemble"]["members"]
    members = []
    for i in range(k):
        src = members_old.get_layer(f"member_{i}")
        new = finetune.build_member(core, recipe, i)
        for layer in new.layers:
            if not layer.weights:
                continue
            if layer.name == f"upper_{i}":
                source_upper = src.get_layer(f"upper_{i}")
                for inner in layer.layers:
                    if inner.weights:
                        inner.set_weights(source_upper.get_layer(inner.name).get_weights())
            else:
                layer.set_weights(src.get_layer(layer.name).get_weights())
        members.append(new)
    whiten = old.get_layer(finetune.OOD_LAYER).get_weights()
    model = finetune.build_ensemble(members, recipe.cut, (whiten[0], whiten[1]))
    model.get_layer(finetune.TRUNK_NAME).set_weights(old.get_layer(finetune.TRUNK_NAME).get_weights())
    x = np.random.default_rng(0).random((4, 224, 224, 1)).astype(np.float32)
    a, b = old.predict(x, verbose=0), model.predict(x, verbose=0)
    for u, v in zip(a, b):
        assert np.abs(u - v).max() < 1e-5, np.abs(u - v).max()
    tmp = model_dir / f".{MODEL_FILE}.compact.keras"
    model.save(tmp)
    os.replace(tmp, model_dir / MODEL_FILE)

    def update(c: dict) -> None:
        c["model_sha256"] = sha256_file(model_dir / MODEL_FILE)
        c["parameters"] = int(model.count_params())
        c.setdefault("training", {})["model_file"] = ("rewritten by experiments/compact_ensemble.py with compact upper "
                                                      "parts; same weights, outputs checked identical")

    edit_card(model_dir, update)
    print(f"{model_dir / MODEL_FILE}: {(model_dir / MODEL_FILE).stat().st_size / 1e6:.1f} MB, "
          f"{model.count_params():,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1])))

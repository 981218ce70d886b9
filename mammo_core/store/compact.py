"""Save a Keras model with its kernels stored in float16: half the file, the same float32 model once loaded.

A `.keras` file is a zip of `config.json`, `metadata.json` and `model.weights.h5`. Keras loads each stored
array into the layer's own float32 variable (`Variable.assign` casts), so an HDF5 file whose kernels are
float16 loads into exactly the float32 model it came from, rounded to float16 precision (relative error
<= 2**-11). Only arrays of two or more dimensions (convolution and dense kernels: all but ~0.6 % of the
fine-tuned ensemble's parameters) are stored in float16; vectors (BatchNormalization statistics, biases,
scales) keep float32, because a moving variance of a few hundred would lose more there.

Why: the fine-tuned ensemble is 14.2 M parameters (a trunk and five upper parts); in float32 its
model.keras is 58 MB, over the 40 MB a file in this repository may weigh. No Keras API stores weights in
another dtype than the variables', and a float16 dtype policy would also compute in float16.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS_ENTRY = "model.weights.h5"
#: What `save_compact` writes into the card (`storage`), so a reader knows the file is not float32.
STORAGE_NOTE = "kernels (arrays of 2+ dimensions) stored in float16, vectors in float32; loaded as float32"


def _halve_kernels(src: Path, dst: Path) -> dict[str, int]:
    """Copy the HDF5 weights file `src` to `dst` with every float32 array of 2+ dimensions in float16.
    Returns parameter counts by stored dtype."""
    import h5py

    counts: dict[str, int] = {"float16": 0, "float32": 0, "other": 0}
    with h5py.File(src, "r") as fin, h5py.File(dst, "w") as fout:
        for key, value in fin.attrs.items():
            fout.attrs[key] = value

        def copy(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group):
                group = fout.require_group(name)
                for key, value in obj.attrs.items():
                    group.attrs[key] = value
                return
            array = obj[()]
            if isinstance(array, np.ndarray) and array.dtype == np.float32 and array.ndim >= 2:
                array = array.astype(np.float16)
                counts["float16"] += array.size
            else:
                counts["float32" if getattr(array, "dtype", None) == np.float32 else "other"] += int(np.size(array))
            out = fout.create_dataset(name, data=array)
            for key, value in obj.attrs.items():
                out.attrs[key] = value

        fin.visititems(copy)
    return counts


def compact_keras_file(src: str | Path, dst: str | Path) -> dict[str, int]:
    """Rewrite the `.keras` file `src` as `dst` with float16 kernels (`dst` may be `src`); atomic: `dst` is
    either the old file or the complete new one. Returns parameter counts by stored dtype."""
    src, dst = Path(src), Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".compact.") as tmp:
        weights, halved = Path(tmp) / "in.h5", Path(tmp) / "out.h5"
        with zipfile.ZipFile(src) as zin:
            infos = zin.infolist()
            if WEIGHTS_ENTRY not in {i.filename for i in infos}:
                raise ValueError(f"{src.name} is not a Keras 3 model file (no {WEIGHTS_ENTRY})")
            weights.write_bytes(zin.read(WEIGHTS_ENTRY))
            counts = _halve_kernels(weights, halved)
            staged = Path(tmp) / "model.keras"
            with zipfile.ZipFile(staged, "w", zipfile.ZIP_STORED) as zout:
                for info in infos:  # same entries, order, dates and modes as Keras wrote them
                    zout.writestr(info, halved.read_bytes() if info.filename == WEIGHTS_ENTRY
                                  else zin.read(info.filename))
        os.replace(staged, dst)
    return counts


def save_compact(model: Any, path: str | Path) -> dict[str, int]:
    """`model.save(path)` with the kernels stored in float16 (see the module docstring)."""
    path = Path(path)
    model.save(path)
    return compact_keras_file(path, path)

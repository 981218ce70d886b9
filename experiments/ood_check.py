"""How often the out-of-distribution check flags dataset test images and clearly non-mammogram images.

python experiments/ood_check.py [MODEL]   (default: the active model; needs MAMMO_DATA_DIR)
Prints the fractions and every non-mammogram's verdict; the figures go into docs/EXPERIMENTS.md.
"""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mammo_core.inference.predict import Predictor


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def non_mammograms() -> dict[str, bytes]:
    import skimage.data as d

    out = {}
    for name in ("astronaut", "camera", "coins", "moon", "page", "text", "clock", "coffee", "chelsea", "horse",
                 "rocket", "hubble_deep_field", "immunohistochemistry", "grass", "gravel", "brick", "checkerboard",
                 "logo", "cell", "colorwheel", "retina", "microaneurysms", "motorcycle_left", "eagle", "cat"):
        try:
            img = getattr(d, name)()
        except Exception:  # noqa: BLE001 - images that need a download are skipped
            continue
        img = np.asarray(img)
        if img.dtype == bool:
            img = img.astype(np.uint8) * 255
        if img.ndim == 3:
            img = np.asarray(Image.fromarray(img[..., :3].astype(np.uint8)).convert("L"))
        out[f"skimage.{name}"] = png(img.astype(np.uint8))
    rng = np.random.default_rng(0)
    out["noise"] = png(rng.integers(0, 256, (512, 512), dtype=np.uint8))
    out["black"] = png(np.zeros((512, 512), np.uint8))
    out["white"] = png(np.full((512, 512), 255, np.uint8))
    # a chest-radiograph-like picture: bright mediastinum, dark lungs, ribs as bright arcs
    h, w = 1024, 900
    chest = np.full((h, w), 60, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for cx in (w * 0.3, w * 0.7):
        chest[((xx - cx) / (w * 0.2)) ** 2 + ((yy - h * 0.5) / (h * 0.35)) ** 2 < 1] = 30
    chest[:, int(w * 0.45):int(w * 0.55)] = 180
    for k in range(10):
        y0 = h * 0.2 + k * h * 0.06
        chest[np.abs(yy - (y0 + 0.0004 * (xx - w / 2) ** 2)) < 6] += 70
    chest = np.clip(chest + rng.normal(0, 5, chest.shape), 0, 255).astype(np.uint8)
    out["chest-radiograph-like"] = png(chest)
    # a screenshot of text
    shot = Image.new("L", (1200, 800), 245)
    draw = ImageDraw.Draw(shot)
    for i in range(30):
        draw.text((20, 10 + 25 * i), f"Line {i}: the quick brown fox jumps over the lazy dog 0123456789 " * 2, fill=20)
    out["text-screenshot"] = png(np.asarray(shot))
    return out


def main() -> int:
    predictor = Predictor.load(sys.argv[1] if len(sys.argv) > 1 else None)
    data = Path(os.environ["MAMMO_DATA_DIR"])
    files = sorted((data / "test").rglob("*.png"))
    flagged = [p for p in predictor.score_many([(f, str(f)) for f in files], with_cam=False, keep_images=False)
               if not p.in_distribution]
    print(f"dataset test images flagged: {len(flagged)}/{len(files)} = {len(flagged) / len(files):.3%}")
    others = non_mammograms()
    preds = list(predictor.score_many([(b, n) for n, b in others.items()], with_cam=False, keep_images=False))
    hits = 0
    for p in preds:
        hits += not p.in_distribution
        print(f"  {p.name:28} flagged={not p.in_distribution!s:5} ood={p.ood_score if p.ood_score is not None else float('nan'):9.1f} "
              f"p={p.probability:.3f} {'; '.join(w[:60] for w in p.warnings)}")
    print(f"non-mammograms flagged: {hits}/{len(preds)} = {hits / len(preds):.1%} (threshold {predictor.ood_threshold})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

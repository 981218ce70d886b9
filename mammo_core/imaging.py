"""Import shim: `mammo_core.imaging.load_image`, the documented way any image gets in, lives in
`mammo_core.io.images`; its result type `LoadedImage` in `mammo_core.io.pixels`."""

from mammo_core.io.images import load_image
from mammo_core.io.pixels import LoadedImage

__all__ = ["LoadedImage", "load_image"]

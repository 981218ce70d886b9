"""Read PyTorch legacy (pre-zip) ``torch.save`` files into numpy arrays, without torch and without
running arbitrary pickled code.

A legacy file is a sequence of pickles: a magic number, a protocol version, a ``sys_info`` dict,
the saved object (tensors refer to storages by *persistent id*), the list of storage keys, and then
each storage's raw bytes preceded by its element count as an int64. Every pickle is read with
`_SafeUnpickler`, whose ``find_class`` knows only the few globals a state dict needs and refuses
everything else with `UnsafePickleError`, so a malicious file cannot call ``os.system`` & co.

Example:
    >>> from mammo_core.models.pth_reader import read_legacy_pth
    >>> state = read_legacy_pth("efficientnet-lite0-57934424.pth")   # doctest: +SKIP
    >>> state["_conv_stem.weight"].shape                              # doctest: +SKIP
    (32, 3, 3, 3)
"""

from __future__ import annotations

import collections
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from mammo_core.errors import ModelDirError

__all__ = ["UnsafePickleError", "read_legacy_pth"]

#: First pickle of every legacy torch.save file (torch/serialization.py MAGIC_NUMBER).
_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_PROTOCOL_VERSION = 1001

#: Legacy storage classes and the numpy dtype of one element. BFloat16 has no numpy dtype: it is
#: read as uint16 and widened to float32 (exact, bfloat16 is the top half of a float32).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsafePickleError(ModelDirError):
    """A pickled weights file asks for a Python global outside the small allow-list (possible code execution)."""


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` & co. inside the pickle; never callable."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """A persistent-id storage reference: `key` names a root storage, `offset` (elements) a view into it."""

    key: str
    storage_type: _StorageType
    numel: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """A tensor whose storage bytes come after the pickle; materialised once the storages are read."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage: Any, storage_offset: Any, size: Any, stride: Any, *_ignored: Any) -> _TensorRef:
    """Safe stand-in for ``torch._utils._rebuild_tensor_v2`` (requires_grad, hooks and metadata are dropped)."""
    if not isinstance(storage, _StorageRef):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, expected a storage reference")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise UnsafePickleError(f"malformed tensor size {size!r} / stride {stride!r}")
    if not all(isinstance(v, int) and v >= 0 for v in (storage_offset, *size, *stride)):
        raise UnsafePickleError(f"malformed tensor offset/size/stride {storage_offset!r} {size!r} {stride!r}")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    """Safe stand-in for the older ``torch._utils._rebuild_tensor``."""
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data: Any, *_ignored: Any) -> Any:
    """Safe stand-in for ``torch._utils._rebuild_parameter``: a Parameter is read as its tensor."""
    if not isinstance(data, _TensorRef):
        raise UnsafePickleError(f"parameter rebuilt from a {type(data).__name__}, expected a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_ALLOWED_GLOBALS` and turns storage persistent ids into `_StorageRef`."""

    def __init__(self, file: BinaryIO, *, source: str, storages: dict[str, _StorageRef] | None = None) -> None:
        super().__init__(file)
        self._source = source
        # None: this pickle may not reference storages at all (header pickles, key list).
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global '{module}.{name}'; only a PyTorch state dict "
                "(OrderedDict of tensors) may be read. Do not load this file with torch.load either "
                "unless you trust where it came from."
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if self._storages is None:
            raise UnsafePickleError(f"{self._source}: unexpected persistent id {pid!r} outside the object pickle")
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafePickleError(f"{self._source}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str):
            raise UnsafePickleError(f"{self._source}: malformed storage reference {pid!r}")
        if not (isinstance(numel, int) and numel >= 0):
            raise UnsafePickleError(f"{self._source}: malformed storage size in {pid!r}")
        root = self._storages.setdefault(key, _StorageRef(key, storage_type, numel))
        if root.storage_type != storage_type or root.numel != numel:
            raise UnsafePickleError(f"{self._source}: storage {key!r} is declared twice with different types or sizes")
        if view is None:
            return root
        # Storage views (very old files): (view_key, offset, size) into the root storage.
        if not (isinstance(view, tuple) and len(view) == 3 and all(isinstance(v, int) for v in view[1:])):
            raise UnsafePickleError(f"{self._source}: malformed storage view {view!r}")
        _view_key, offset, view_numel = view
        if offset < 0 or view_numel < 0 or offset + view_numel > numel:
            raise UnsafePickleError(f"{self._source}: storage view {view!r} falls outside storage {key!r}")
        return _StorageRef(key, storage_type, view_numel, offset)


def _load_pickle(f: BinaryIO, source: str, storages: dict[str, _StorageRef] | None = None) -> Any:
    try:
        return _SafeUnpickler(f, source=source, storages=storages).load()
    except (UnsafePickleError, ModelDirError):
        raise
    except Exception as exc:  # pickle raises many types on garbage (UnpicklingError, EOFError, ValueError...)
        raise ModelDirError(f"{source}: not a readable PyTorch file ({type(exc).__name__}: {exc})") from exc


def _read_exact(f: BinaryIO, n: int, source: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise ModelDirError(f"{source}: file is truncated (wanted {n} bytes, got {len(data)}); download it again")
    return data


def _materialise(ref: _TensorRef, storages: dict[str, np.ndarray], source: str) -> np.ndarray:
    flat = storages[ref.storage.key]
    start = ref.storage.offset + ref.offset
    # Bounds check before as_strided: a crafted size/stride must not read outside the storage.
    if any(s == 0 for s in ref.size):
        array = np.zeros(ref.size, dtype=flat.dtype)
    else:
        last = start + sum((n - 1) * st for n, st in zip(ref.size, ref.stride))
        if start < 0 or last >= min(flat.size, ref.storage.offset + ref.storage.numel):
            raise ModelDirError(f"{source}: a tensor of size {ref.size} reaches outside its storage; file is corrupt")
        itemsize = flat.dtype.itemsize
        array = np.lib.stride_tricks.as_strided(
            flat[start:],
            shape=ref.size,
            strides=tuple(st * itemsize for st in ref.stride),
            writeable=False,
        ).copy()
    if ref.storage.storage_type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def read_legacy_pth(path: str | Path) -> dict[str, np.ndarray]:
    """Read a legacy-format PyTorch state dict (``torch.save(..., _use_new_zipfile_serialization=False)``).

    Args:
        path: the ``.pth``/``.pt`` file.

    Returns:
        Parameter name -> numpy array (native byte order, C-contiguous, owning its memory), in file order.

    Raises:
        UnsafePickleError: the file's pickle references a global other than ``collections.OrderedDict``,
            ``torch._utils._rebuild_tensor[_v2]``/``_rebuild_parameter`` or a ``torch.*Storage`` type.
        ModelDirError: the file is missing, truncated, in the zip format, or not a flat dict of tensors.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ModelDirError(f"{source}: no such weights file")
    if zipfile.is_zipfile(path):
        raise ModelDirError(
            f"{source}: this is a zip-format torch.save file (PyTorch >= 1.6 default); only the legacy format "
            "is supported. Re-save it with torch.save(state_dict, path, _use_new_zipfile_serialization=False)."
        )
    with path.open("rb") as f:
        if _load_pickle(f, source) != _MAGIC_NUMBER:
            raise ModelDirError(f"{source}: not a legacy PyTorch file (bad magic number)")
        if _load_pickle(f, source) != _PROTOCOL_VERSION:
            raise ModelDirError(f"{source}: unsupported PyTorch serialization protocol")
        sys_info = _load_pickle(f, source)
        byteorder = "<" if not isinstance(sys_info, dict) or sys_info.get("little_endian", True) else ">"

        storage_refs: dict[str, _StorageRef] = {}
        obj = _load_pickle(f, source, storage_refs)
        keys = _load_pickle(f, source)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise ModelDirError(f"{source}: malformed storage key list")

        storages: dict[str, np.ndarray] = {}
        for key in keys:
            ref = storage_refs.get(key)
            if ref is None:
                raise ModelDirError(f"{source}: storage {key!r} is listed but never referenced")
            (numel,) = np.frombuffer(_read_exact(f, 8, source), dtype=f"{byteorder}i8")
            if numel != ref.numel:
                raise ModelDirError(f"{source}: storage {key!r} holds {numel} elements, expected {ref.numel}")
            dtype = ref.storage_type.dtype.newbyteorder(byteorder)
            raw = _read_exact(f, int(numel) * dtype.itemsize, source)
            storages[key] = np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)
        missing = set(storage_refs) - set(storages)
        if missing:
            raise ModelDirError(f"{source}: storages {sorted(missing)[:3]} are referenced but absent; file is corrupt")

    if not isinstance(obj, dict):
        raise ModelDirError(f"{source}: holds a {type(obj).__name__}, expected a state dict")
    result: dict[str, np.ndarray] = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _TensorRef):
            raise ModelDirError(f"{source}: entry {name!r} is not a tensor; expected a flat state dict")
        result[name] = _materialise(value, storages, source)
    return result


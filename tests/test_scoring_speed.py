"""The fine-tuned ensemble's fast scoring (issue 18): frozen weights give the float32 reference's numbers,
no backward pass without Grad-CAM, the backward pass stops at the Grad-CAM layer (the trunk's output),
bfloat16 only on CPUs with native bfloat16, and the decoding threads do not change results."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mammo_core.inference import ensemble
from mammo_core.inference.ensemble import EnsembleScorer, resolve_precision
from mammo_core.training import finetune

GRADIENT_OPS = ("Grad", "Backprop")


@pytest.fixture(scope="module")
def ens():
    """An untrained 2-member ensemble: the real arithmetic (trunk + 2 upper parts), ImageNet weights."""
    _, core = finetune.build_parts("block6a")
    members = [finetune.build_member(core, finetune.Recipe(), i) for i in range(2)]
    rng = np.random.default_rng(0)
    for m in members:  # a non-trivial head so the members disagree
        kernel, bias = m.get_layer(f"logit_{m.name[-1]}").get_weights()
        m.get_layer(f"logit_{m.name[-1]}").set_weights([rng.normal(0, 0.3, kernel.shape).astype(np.float32), bias])
    whiten = (np.eye(112, dtype=np.float32) * 0.1, np.zeros(112, np.float32))
    model = finetune.build_ensemble(members, "block6a", whiten)
    return model, {"ensemble": {"temperatures": [1.0, 1.5]}}


@pytest.fixture(scope="module")
def images():
    from tests.factories import synthetic_mammogram

    return np.stack([synthetic_mammogram(s, malignant=bool(s % 2)) for s in range(4)])


def _ops_feeding(outputs) -> Counter:
    """Op types the given tensors depend on (what actually runs)."""
    seen, stack, kinds = set(), [t.op for t in outputs], Counter()
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        kinds[op.type] += 1
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return kinds


def _layer_count(model, kind) -> int:
    import keras

    return sum(_layer_count(layer, kind) if isinstance(layer, keras.Model) else isinstance(layer, kind)
               for layer in model.layers)


def test_frozen_scorer_matches_the_traced_float32_reference(ens, images):
    model, card = ens
    fast = EnsembleScorer(model, card, precision="float32")
    reference = EnsembleScorer(model, card, precision="float32", frozen=False)
    assert fast.frozen and not reference.frozen
    for with_cam in (False, True):
        probs, ood, cams = fast(images, with_cam=with_cam)
        ref_probs, ref_ood, ref_cams = reference(images, with_cam=with_cam)
        np.testing.assert_allclose(probs, ref_probs, atol=1e-5)
        np.testing.assert_allclose(ood, ref_ood, rtol=1e-4)
        if with_cam:
            assert cams.shape == (4, 224, 224)
            assert np.abs(cams - ref_cams).max() < 1e-3


@pytest.mark.parametrize("frozen", [False, True])
def test_scoring_without_gradcam_computes_no_backward_pass(ens, frozen):
    model, card = ens
    scorer = EnsembleScorer(model, card, precision="float32", frozen=frozen)
    fn = scorer.function(False)
    graph = fn.graph if frozen else fn.get_concrete_function().graph
    outputs = fn.outputs if frozen else fn.get_concrete_function().outputs
    kinds = _ops_feeding(outputs)
    assert kinds["Conv2D"] + kinds["_FusedConv2D"] > 0  # the forward pass is there
    assert not [k for k in kinds if any(g in k for g in GRADIENT_OPS)], kinds
    assert not [op for op in graph.get_operations() if any(g in op.type for g in GRADIENT_OPS)]


@pytest.mark.parametrize("frozen", [False, True])
def test_gradcam_backward_pass_stops_at_the_trunk_and_computes_no_weight_gradient(ens, frozen):
    import keras

    model, card = ens
    scorer = EnsembleScorer(model, card, precision="float32", frozen=frozen)
    fn = scorer.function(True)
    outputs = fn.outputs if frozen else fn.get_concrete_function().outputs
    kinds = _ops_feeding(outputs)
    members, trunk = model.get_layer(finetune.MEMBERS_NAME), model.get_layer(finetune.TRUNK_NAME)
    # one input-gradient op per convolution of the members, none for the trunk's
    assert kinds["Conv2DBackpropInput"] == _layer_count(members, keras.layers.Conv2D)
    assert kinds["DepthwiseConv2dNativeBackpropInput"] == _layer_count(members, keras.layers.DepthwiseConv2D)
    assert _layer_count(trunk, keras.layers.Conv2D) > 0
    # no gradient with respect to any weight
    assert kinds["Conv2DBackpropFilter"] == 0 and kinds["DepthwiseConv2dNativeBackpropFilter"] == 0


def test_gradcam_gradients_reach_no_trunk_variable(ens, images):
    """Gradients of the scorer's Grad-CAM output with respect to the trunk's weights are not computed."""
    import tensorflow as tf

    model, card = ens
    scorer = EnsembleScorer(model, card, precision="float32", frozen=False)
    x = tf.constant(images[:1].astype(np.float32)[..., None] / 255.0)
    trunk_vars = [v.value for v in model.get_layer(finetune.TRUNK_NAME).weights]  # the tf.Variables
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(trunk_vars)
        _, _, cams = scorer._forward_cam(x)
        features = model.get_layer(finetune.TRUNK_NAME)(x)
    assert all(g is None for g in tape.gradient(cams, trunk_vars))
    # the check can fail: the same tape does reach the trunk's weights from the trunk's own output
    assert any(g is not None for g in tape.gradient(features, trunk_vars))


def test_precision_is_float32_unless_bfloat16_is_asked_for_and_native(monkeypatch):
    from mammo_core.models import fast_training

    monkeypatch.delenv(ensemble.PRECISION_ENV, raising=False)
    assert resolve_precision() == "float32" and resolve_precision("auto") == "float32"
    monkeypatch.setattr(fast_training, "cpu_has_native_bfloat16", lambda: False)
    assert resolve_precision("bfloat16") == "float32"  # the fallback on CPUs without native bfloat16
    monkeypatch.setattr(fast_training, "cpu_has_native_bfloat16", lambda: True)
    monkeypatch.setattr(fast_training, "_gpu_visible", lambda: False)
    assert resolve_precision("bfloat16") == "bfloat16"
    monkeypatch.setenv(ensemble.PRECISION_ENV, "bfloat16")
    assert resolve_precision() == "bfloat16"
    with pytest.raises(ValueError, match="float16"):
        resolve_precision("float16")


def test_bfloat16_scorer_runs_bfloat16_convolutions_and_keeps_the_heatmap(ens, images):
    from mammo_core.models.fast_training import cpu_has_native_bfloat16

    if not cpu_has_native_bfloat16():
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16 / AMX)")
    import tensorflow as tf

    model, card = ens
    fast = EnsembleScorer(model, card, precision="bfloat16")
    reference = EnsembleScorer(model, card, precision="float32", frozen=False)
    assert fast.precision == "bfloat16"
    graph = fast.function(True).graph
    assert any(op.type in ("Conv2D", "_FusedConv2D") and op.get_attr("T") == tf.bfloat16
               for op in graph.get_operations())
    probs, _, cams = fast(images, with_cam=True)
    ref_probs, _, ref_cams = reference(images, with_cam=True)
    # bfloat16 is an option, not the default: it is allowed to move probabilities (docs/BENCHMARKS.md)
    assert np.abs(probs - ref_probs).max() < 0.1
    for cam, ref in zip(cams, ref_cams):
        assert np.corrcoef(cam.ravel(), ref.ravel())[0, 1] > 0.9


def test_decoding_threads_do_not_change_results(tmp_path, ens):
    from mammo_core.inference.predict import Predictor
    from tests.factories import png_bytes, synthetic_mammogram

    model, card = ens
    predictor = Predictor(model, {**card, "name": "tiny-ens", "input_pipeline": "breast-crop-v1",
                                  "ood": {"threshold": 1e9}})
    items = [(png_bytes(synthetic_mammogram(s, malignant=bool(s % 2))), f"{s}.png") for s in range(5)]
    items.append((b"not an image", "bad.png"))
    runs = [list(predictor.score_many(items, with_cam=False, batch_size=2, workers=w, keep_images=False))
            for w in (1, 3)]
    assert [p.name for p in runs[0]] == [p.name for p in runs[1]] == [name for _, name in items]
    assert runs[0][-1].error and runs[1][-1].error
    np.testing.assert_allclose([p.probability for p in runs[0][:-1]], [p.probability for p in runs[1][:-1]], atol=1e-6)


def test_decoding_overlapped_with_the_model_equals_the_sequential_path(ens):
    """score_many prepares the next batch in threads while the model runs; its rows must be exactly those of
    preparing every input first and scoring the same batches one after the other."""
    from mammo_core.inference.predict import Predictor
    from tests.factories import png_bytes, synthetic_mammogram

    model, card = ens
    predictor = Predictor(model, {**card, "name": "tiny-ens", "input_pipeline": "breast-crop-v1",
                                  "ood": {"threshold": 1e9}})
    items = [(png_bytes(synthetic_mammogram(s, malignant=bool(s % 2))), f"{s}.png") for s in range(9)]
    items[2] = (b"not an image", "bad-2.png")
    items.append((b"", "bad-tail.png"))
    done: list[int] = []
    overlapped = list(predictor.score_many(items, with_cam=True, batch_size=3, keep_images=False, progress=done.append))

    prepared = [predictor.prepare_one(source, name) for source, name in items]
    good = [p for p in prepared if p.error is None]
    for start in range(0, len(good), 3):  # batches of 3 readable inputs, as score_many forms them
        predictor.score_prepared(good[start:start + 3], with_cam=True)
    assert [p.name for p in overlapped] == [name for _, name in items]
    assert [p.error is not None for p in overlapped] == [p.error is not None for p in prepared]
    for ours, ref in zip(overlapped, prepared):
        assert ours.probability == ref.probability and ours.probability_interval == ref.probability_interval
        if ref.error is None:
            np.testing.assert_array_equal(ours.heatmap, ref.heatmap)
            np.testing.assert_array_equal(ours.model_input, ref.model_input)
    assert done == sorted(done) and done[-1] == len(items)


def test_decoding_runs_at_most_two_batches_ahead(ens, monkeypatch):
    """Memory stays bounded on a large folder: taking the first row has decoded at most the first batch and
    the two after it, not the whole input."""
    from mammo_core.inference.predict import Predictor
    from tests.factories import png_bytes, synthetic_mammogram

    model, card = ens
    predictor = Predictor(model, {**card, "name": "tiny-ens", "input_pipeline": "breast-crop-v1"})
    blob = png_bytes(synthetic_mammogram(0, malignant=False))
    loads = []
    original = Predictor._load

    def counting(self, source, name):
        loads.append(name)
        return original(self, source, name)

    monkeypatch.setattr(Predictor, "_load", counting)
    rows = predictor.score_many([(blob, str(i)) for i in range(40)], with_cam=False, batch_size=2)
    first = next(rows)
    assert first.name == "0" and first.error is None
    assert len(loads) <= 3 * 2 + 1  # the batch, two batches of look-ahead, one refill
    rows.close()


def test_inputs_decoded_before_the_model_loads_give_the_same_rows(ens, tmp_path):
    """The CLI starts preparing the first inputs (`decode_ahead`, from the card alone) while the model
    loads; scoring them through `score_many(started=...)` must give exactly the rows of a plain run."""
    from concurrent.futures import ThreadPoolExecutor

    from mammo_core.inference.predict import Predictor, decode_ahead, score_paths
    from tests.factories import png_bytes, synthetic_mammogram

    model, card = ens
    card = {**card, "name": "tiny-ens", "input_pipeline": "breast-crop-v1", "ood": {"threshold": 1e9}}
    paths = []
    for s in range(7):
        path = tmp_path / f"{s}.png"
        path.write_bytes(png_bytes(synthetic_mammogram(s, malignant=bool(s % 2))) if s != 3 else b"junk")
        paths.append(path)
    with ThreadPoolExecutor(max_workers=1) as pool:
        started = decode_ahead(card, paths, pool, limit=4)
        assert len(started) == 4
        predictor = Predictor(model, card)
        early = list(score_paths(predictor, paths, with_cam=False, keep_images=False, batch_size=2, started=started))
    assert all(f.result().image is None for f in started)  # decoded originals dropped at once
    plain = list(score_paths(predictor, paths, with_cam=False, keep_images=False, batch_size=2))
    assert [p.name for p in early] == [p.name for p in plain] == [str(p) for p in paths]
    assert [p.error is not None for p in early] == [p.error is not None for p in plain] == [s == 3 for s in range(7)]
    assert [p.probability for p in early] == [p.probability for p in plain]
    assert [p.sha256 for p in early] == [p.sha256 for p in plain]


def test_predictor_freezes_only_when_asked_and_both_agree(ens, images):
    """`Predictor(freeze=False)` (the app; short CLI runs) keeps the traced call, which holds ~0.75 GB less than
    the frozen graph per call kind; both give the same numbers."""
    from mammo_core.inference.predict import Predictor

    model, card = ens
    card = {**card, "name": "two-members", "input_pipeline": "breast-crop-v1"}
    frozen, traced = Predictor(model, card), Predictor(model, card, freeze=False)
    assert frozen.ensemble.frozen and not traced.ensemble.frozen
    a, b = frozen.score_batch(images, with_cam=True), traced.score_batch(images, with_cam=True)
    np.testing.assert_allclose(a["probability"], b["probability"], atol=1e-5)
    assert np.abs(a["heatmap"] - b["heatmap"]).max() < 1e-3
    assert not traced.ensemble._compiled  # nothing was frozen on the way

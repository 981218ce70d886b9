"""Class weights of the feature head (mammo_core.training.heads.class_weights)."""

from __future__ import annotations

import numpy as np
import pytest

from mammo_core.training.heads import class_weights


def test_balanced_weights_equal_each_class_total():
    labels = np.array([0, 0, 0, 1])
    weights = class_weights(labels)
    assert weights == pytest.approx({0: 4 / 6, 1: 4 / 2})
    assert weights[0] * 3 == pytest.approx(weights[1] * 1)  # each class weighs the same in total
    assert all(type(k) is int and type(v) is float for k, v in weights.items())


@pytest.mark.parametrize(("labels", "expected"), [
    ([0, 0, 0, 0], {0: 0.5, 1: 2.0}),  # the absent class counts as 1: n / 2
    ([1, 1], {0: 1.0, 1: 0.5}),
    ([], {0: 0.0, 1: 0.0}),
])
def test_one_class_missing_keeps_both_keys(labels, expected):
    assert class_weights(np.array(labels, dtype=int)) == expected

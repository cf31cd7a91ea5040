"""Classification metrics against small cases worked out by hand."""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlopt.train.metrics import classification_metrics

# Three classes, six examples:        predicted a  b  c
#   true a: a a b                      a        [2, 1, 0]
#   true b: b c                        b        [0, 1, 1]
#   true c: c                          c        [0, 0, 1]
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]
NAMES = ["a", "b", "c"]


def _plain(value: Any) -> None:
    """Assert ``value`` is built from dict, list, str, int and float only."""
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            _plain(item)
    elif isinstance(value, list):
        for item in value:
            _plain(item)
    else:
        assert type(value) in (str, int, float), (value, type(value))


def test_hand_computed_case() -> None:
    m = classification_metrics(Y_TRUE, Y_PRED, NAMES)
    assert m["count"] == 6
    assert m["class_names"] == NAMES
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision a 2/2, b 1/2, c 1/2; recall a 2/3, b 1/2, c 1/1; f1 a 0.8, b 0.5, c 2/3.
    assert m["per_class"] == {
        "a": {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
              "support": 3},
        "b": {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2},
        "c": {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 1},
    }  # fmt: skip
    assert m["precision_macro"] == pytest.approx(2 / 3)
    assert m["recall_macro"] == pytest.approx(13 / 18)
    assert m["f1_macro"] == pytest.approx(59 / 90)
    # Weighted by support 3, 2, 1.
    assert m["precision_weighted"] == pytest.approx(0.75)
    assert m["recall_weighted"] == pytest.approx(4 / 6)
    assert m["f1_weighted"] == pytest.approx(61 / 90)


def test_json_serialisable_with_plain_types() -> None:
    m = classification_metrics(np.array(Y_TRUE), np.array(Y_PRED, dtype=np.int32), NAMES)
    _plain(m)
    assert json.loads(json.dumps(m)) == m


def test_classes_absent_from_predictions_and_truth_count_as_zero() -> None:
    # "b" is never predicted, "c" appears nowhere.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero_division=0: no UndefinedMetricWarning
        m = classification_metrics([0, 1, 0, 1], [0, 0, 0, 0], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 0, 0], [2, 0, 0], [0, 0, 0]]
    assert m["accuracy"] == 0.5
    assert m["per_class"]["a"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["precision_macro"] == pytest.approx(0.5 / 3)
    assert m["f1_macro"] == pytest.approx(2 / 9)
    assert m["precision_weighted"] == pytest.approx(0.25)
    assert m["recall_weighted"] == pytest.approx(0.5)


def test_perfect_predictions() -> None:
    m = classification_metrics([2, 0, 1, 1], [2, 0, 1, 1], ["x", "y", "z"])
    for key in ("accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        assert m[key] == 1.0, key
    assert m["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 1]]


def test_single_example_single_class() -> None:
    m = classification_metrics([0], [0], ["only"])
    assert m["count"] == 1 and m["accuracy"] == 1.0
    assert m["confusion_matrix"] == [[1]]


def test_a_perfect_model_scores_exactly_one() -> None:
    """Found by test_invariants: per-class weights support/total summed to 1 + 2e-16."""
    y = [3, 0, 1, 4, 5, 0, 0, 2, 1, 1, 0, 5, 4, 1, 2, 5, 4, 3, 1, 5]
    y += [5, 2, 2, 4, 5, 4, 5, 1, 5, 1, 2, 1, 4, 0, 0, 5, 4, 2, 1]
    m = classification_metrics(y, y, [f"c{i}" for i in range(6)])
    for key in ("precision", "recall", "f1"):
        assert m[f"{key}_weighted"] == m[f"{key}_macro"] == m["accuracy"] == 1.0


@given(
    data=st.data(),
    num_classes=st.integers(min_value=1, max_value=6),
    count=st.integers(min_value=1, max_value=60),
)
def test_invariants(data: st.DataObject, num_classes: int, count: int) -> None:
    labels = st.lists(
        st.integers(min_value=0, max_value=num_classes - 1), min_size=count, max_size=count
    )
    y_true, y_pred = data.draw(labels), data.draw(labels)
    names = [f"class{i}" for i in range(num_classes)]
    m = classification_metrics(y_true, y_pred, names)
    matrix = np.array(m["confusion_matrix"])
    assert matrix.shape == (num_classes, num_classes)
    assert matrix.sum() == m["count"] == count
    assert list(matrix.sum(axis=1)) == [m["per_class"][n]["support"] for n in names]
    assert m["accuracy"] == pytest.approx(np.trace(matrix) / count)
    # Recall weighted by support is the accuracy, always.
    assert m["recall_weighted"] == pytest.approx(m["accuracy"])
    for key in ("precision_macro", "recall_macro", "f1_macro", "f1_weighted"):
        assert 0.0 <= m[key] <= 1.0


@pytest.mark.parametrize(
    ("y_true", "y_pred", "names", "match"),
    [
        ([0, 1], [0], ["a", "b"], "2 examples but y_pred has 1"),
        ([], [], ["a"], "no examples"),
        ([0, 2], [0, 1], ["a", "b"], r"y_true must hold class indices in 0..1 but holds 0..2"),
        ([0, 1], [0, -1], ["a", "b"], "y_pred must hold class indices"),
        ([0.0, 1.0], [0, 1], ["a", "b"], "integer class indices"),
        ([[0, 1]], [[0, 1]], ["a", "b"], "one class index per example"),
        ([0], [0], [], "at least one class"),
        ([0], [0], ["a", "a"], "unique"),
    ],
)
def test_bad_input(y_true: Any, y_pred: Any, names: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        classification_metrics(y_true, y_pred, names)

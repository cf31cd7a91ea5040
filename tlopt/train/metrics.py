"""Classification metrics as plain, JSON-ready dictionaries.

:func:`classification_metrics` takes the true and predicted class indices of a set of images
and returns everything the export report shows: accuracy, precision/recall/F1 (macro and
weighted), a per-class report and the confusion matrix. Values are plain Python ``float`` and
``int`` so ``json.dumps`` takes the result as it is.

Example:
    >>> m = classification_metrics([0, 0, 1, 1], [0, 1, 1, 1], ["ants", "bees"])
    >>> m["accuracy"], m["confusion_matrix"]
    (0.75, [[1, 1], [0, 2]])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import precision_recall_fscore_support

__all__ = ["classification_metrics"]


def _as_labels(values: ArrayLike, what: str, num_classes: int) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one class index per example but has shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{what} must hold integer class indices but has dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"{what} must hold class indices in 0..{num_classes - 1} "
            f"but holds {int(array.min())}..{int(array.max())}"
        )
    return array.astype(np.int64)


def classification_metrics(
    y_true: ArrayLike, y_pred: ArrayLike, class_names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 and the confusion matrix of a classification.

    Every class in ``class_names`` is reported, also those absent from ``y_true`` or
    ``y_pred``: a ratio with a zero denominator counts as 0 (scikit-learn's
    ``zero_division=0``), so a class never predicted has precision 0, and the macro averages
    run over all classes.

    Args:
        y_true: the true class index of each example.
        y_pred: the predicted class index of each example.
        class_names: the name of each class index, in index order.

    Returns:
        A dictionary with ``count`` (examples), ``accuracy``, ``precision_macro``,
        ``recall_macro``, ``f1_macro``, ``precision_weighted``, ``recall_weighted``,
        ``f1_weighted`` (weighted by support), ``per_class`` (class name to ``precision``,
        ``recall``, ``f1`` and ``support``), ``confusion_matrix`` (list of rows; row ``i`` counts
        the examples of true class ``i`` by predicted class) and ``class_names``.

    Raises:
        ValueError: no examples, lengths differ, or an index outside ``class_names``.
    """
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names must name at least one class")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique but got {names}")
    true = _as_labels(y_true, "y_true", len(names))
    pred = _as_labels(y_pred, "y_pred", len(names))
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} examples but y_pred has {pred.size}")
    if true.size == 0:
        raise ValueError("no examples: y_true and y_pred are empty")

    labels = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=labels, average=None, zero_division=0
    )
    total = int(true.size)
    # Row i, column j: examples of true class i predicted as j (sklearn's confusion_matrix,
    # without its warning when there is a single class).
    num_classes = len(names)
    confusion = np.bincount(true * num_classes + pred, minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    counts = np.asarray(support, dtype=np.float64)

    def macro(values: np.ndarray) -> float:
        return float(np.mean(values))

    def weighted(values: np.ndarray) -> float:
        # Weighted by the counts, divided once: sum(support / total) can round above 1, and a
        # perfect model then scored 1.0000000000000002.
        return float(np.sum(values * counts) / total)

    return {
        "count": total,
        "accuracy": float(np.mean(true == pred)),
        "precision_macro": macro(precision),
        "recall_macro": macro(recall),
        "f1_macro": macro(f1),
        "precision_weighted": weighted(precision),
        "recall_weighted": weighted(recall),
        "f1_weighted": weighted(f1),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion_matrix": confusion.tolist(),
        "class_names": names,
    }

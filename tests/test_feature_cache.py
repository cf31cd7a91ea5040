"""The frozen-feature cache: bounded in bytes, keyed by content, says when it drops an entry."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tlopt.models.backbones import create_backbone
from tlopt.models.split import SplitModel
from tlopt.models.stages import apply_stage, parse_stage
from tlopt.train.data import ImageSet
from tlopt.train.feature_cache import FeatureCache
from tlopt.train.inputs import cached_prefix


def test_least_recently_used_entries_go_first_and_the_log_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = FeatureCache(max_bytes=3 * 400)  # three entries of 100 float32
    for key in "abc":
        assert cache.put(key, torch.zeros(100))
    assert cache.get("a") is not None  # a is now the most recent: b goes first
    with caplog.at_level(logging.INFO, logger="tlopt.worker"):
        assert cache.put("d", torch.zeros(100))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.bytes <= cache.max_bytes
    assert "feature cache full" in caplog.text and "dropped b" in caplog.text
    assert not cache.put("huge", torch.zeros(1000))  # alone over the budget: not kept
    assert "huge" not in cache and len(cache) == 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tlopt.worker"):
        assert cache.put("e", torch.ones(200))  # room for two: c, then a, go
    assert [k for k in "acde" if k in cache] == ["d", "e"]
    kept = cache.get("e")  # the tensor put, not one of those dropped to make room
    assert kept is not None and kept.shape == (200,) and bool((kept == 1).all())
    (line,) = [r.getMessage() for r in caplog.records if "feature cache full" in r.getMessage()]
    assert "dropped c and 1 more (0 MiB) to keep e" in line  # one line for the put


def _images(name: str | None) -> ImageSet:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    return ImageSet.from_arrays(pixels, np.arange(6) % 2, (0.5,) * 3, (0.5,) * 3, name=name)


def test_features_are_keyed_by_content_not_by_object() -> None:
    model = create_backbone("test_efficientnet", "none", num_classes=2)
    apply_stage(model, parse_stage("head"))
    model.eval()
    split = SplitModel(model, 32)
    cache = FeatureCache()
    first = cached_prefix(split, _images("digits/val/32px"), False, cache)
    again = cached_prefix(split, _images("digits/val/32px"), False, cache)  # a new object
    assert first is not None and again is first and len(cache) == 1
    other = cached_prefix(split, _images("digits/test/32px"), False, cache)
    assert other is not first and len(cache) == 2
    # No content name: keyed by the object, which the cache keeps alive (Python would give a
    # freed object's id to the next one, and the next one would get the other's features).
    unnamed = [cached_prefix(split, _images(None), False, cache) for _ in range(2)]
    assert unnamed[0] is not unnamed[1] and len(cache) == 4


def test_features_over_the_budget_are_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    model = create_backbone("test_efficientnet", "none", num_classes=2)
    apply_stage(model, parse_stage("head"))
    model.eval()
    with caplog.at_level(logging.INFO, logger="tlopt.worker"):
        out = cached_prefix(SplitModel(model, 32), _images("x"), True, FeatureCache(max_bytes=8))
    assert out is None and "exceed the feature cache" in caplog.text


def test_mirror_views_add_to_cached_plain_views_and_equal_both_computed_at_once() -> None:
    """The size probe caches plain views at every size; the head stage's mirrored entry at the
    chosen size reuses them and runs the prefix on the mirror images only."""
    model = create_backbone("test_efficientnet", "none", num_classes=2)
    apply_stage(model, parse_stage("head"))
    model.eval()
    split = SplitModel(model, 32)
    calls: list[int] = []  # images through the prefix that fills the cache (BatchNorm folded)
    folded = split.folded_prefix

    def counted(sample: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        fn = folded(sample)
        return lambda x: (calls.append(len(x)), fn(x))[1]

    split.folded_prefix = counted  # type: ignore[method-assign]
    cache = FeatureCache()
    plain = cached_prefix(split, _images("d/train/32px"), False, cache)
    assert plain is not None and sum(calls) == 6
    calls.clear()
    both = cached_prefix(split, _images("d/train/32px"), True, cache)
    assert both is not None and both.shape[0] == 2 and sum(calls) == 6  # the mirrors only
    assert torch.equal(both[0], plain[0])
    alone = cached_prefix(split, _images("d/train/32px"), True, FeatureCache())  # no plain one
    assert alone is not None
    torch.testing.assert_close(both, alone, rtol=1e-5, atol=1e-6)

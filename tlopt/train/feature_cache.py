"""The frozen prefix's outputs, kept across trials: bounded in bytes, keyed by content.

A study's trials share the frozen prefix of their stage (the backbone up to the pooled
features for ``head``, the stem and first block groups for ``freezeN``), so its outputs for
every image and its mirror are computed once per process and reused. A key names what the
outputs depend on: the data (its content name, e.g. fingerprint, split and size), the prefix
(stage mode and cut) and whether mirrors are included. When a new entry would pass the byte
budget, the least recently used entries are dropped, and the log says so.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict

import torch

log = logging.getLogger("tlopt.worker")

# 4 GiB unless TLOPT_FEATURE_CACHE_GB says otherwise: the largest maps (freeze1 at 224 px,
# 4,000 images and their mirrors) fit, and a 16 GiB GPU keeps room to train.
DEFAULT_BYTES = int(float(os.environ.get("TLOPT_FEATURE_CACHE_GB", "4")) * 2**30)


class FeatureCache:
    """An LRU map from content keys to tensors, at most ``max_bytes`` in all.

    Example:
        >>> cache = FeatureCache(max_bytes=64)
        >>> cache.put("a", torch.zeros(8))  # 32 bytes
        True
        >>> cache.get("a").shape
        torch.Size([8])
    """

    def __init__(self, max_bytes: int = DEFAULT_BYTES) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        # Objects a key names by identity, kept alive with their entry so that Python cannot
        # give their id to another object while the entry lives.
        self._owners: dict[str, object] = {}

    @property
    def bytes(self) -> int:
        return sum(_size(t) for t in self._entries.values())

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` can be kept at all."""
        return nbytes <= self.max_bytes

    def get(self, key: str) -> torch.Tensor | None:
        tensor = self._entries.get(key)
        if tensor is not None:
            self._entries.move_to_end(key)
        return tensor

    def put(self, key: str, tensor: torch.Tensor, owner: object | None = None) -> bool:
        """Keep ``tensor`` under ``key``, dropping the oldest entries to make room.

        ``owner``: an object the key names by its ``id``, kept alive as long as the entry.
        Returns False (and keeps nothing) when the tensor alone is over the budget.
        """
        size = _size(tensor)
        if not self.fits(size):
            return False
        self._entries.pop(key, None)
        dropped: list[tuple[str, int]] = []
        while self._entries and self.bytes + size > self.max_bytes:
            old, evicted = self._entries.popitem(last=False)
            self._owners.pop(old, None)
            dropped.append((old, _size(evicted)))
        if dropped:  # one line a put (br35h's plan printed seven in a row, one per entry)
            more = f" and {len(dropped) - 1} more" if len(dropped) > 1 else ""
            log.info(
                "feature cache full (%.0f MiB): dropped %s%s (%.0f MiB) to keep %s (%.0f MiB); "
                "raise TLOPT_FEATURE_CACHE_GB to keep more",
                self.max_bytes / 2**20,
                dropped[0][0],
                more,
                sum(n for _, n in dropped) / 2**20,
                key,
                size / 2**20,
            )
        self._entries[key] = tensor
        if owner is not None:
            self._owners[key] = owner
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _size(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

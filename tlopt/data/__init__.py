"""Data sources, image decoding, the decoded-image cache and the ``data check`` report.

Example:
    >>> from tlopt.data import decode_source, open_source, split_indices
    >>> source = open_source("folder", "data/flowers", seed=0)  # doctest: +SKIP
    >>> pixels = decode_source(source, 224, Path(".tlopt-cache"))  # doctest: +SKIP
"""

from tlopt.data.cache import cache_path, decode_source, labels, split_indices
from tlopt.data.check import CheckReport, SizeStats, check_source, format_report
from tlopt.data.images import IMAGE_SUFFIXES, is_image_file, load_rgb, resize_square, to_rgb
from tlopt.data.sources import KINDS, SPLITS, DataWarning, Item, Source, open_source

__all__ = [
    "IMAGE_SUFFIXES",
    "KINDS",
    "SPLITS",
    "CheckReport",
    "DataWarning",
    "Item",
    "SizeStats",
    "Source",
    "cache_path",
    "check_source",
    "decode_source",
    "format_report",
    "is_image_file",
    "labels",
    "load_rgb",
    "open_source",
    "resize_square",
    "split_indices",
    "to_rgb",
]

"""Data sources, image decoding, the decoded-image cache and the ``data check`` report.

:func:`open_source` (:mod:`~tlopt.data.source`) reads a source through the reader of its kind
(:mod:`~tlopt.data.folder`, :mod:`~tlopt.data.digits`, :mod:`~tlopt.data.cifar`), which splits
it with :mod:`~tlopt.data.split`; :mod:`~tlopt.data.images` decodes one file;
:mod:`~tlopt.data.cache` decodes a whole source once; :mod:`~tlopt.data.check` reports on one.

Example:
    >>> from tlopt.data import decode_source, open_source, split_indices
    >>> source = open_source("folder", "data/flowers", seed=0)  # doctest: +SKIP
    >>> pixels = decode_source(source, 224, Path(".tlopt-cache"))  # doctest: +SKIP
"""

from tlopt.data.cache import cache_path, decode_source, labels, split_indices
from tlopt.data.check import CheckReport, SizeStats, check_source, format_report
from tlopt.data.images import IMAGE_SUFFIXES, is_image_file, load_rgb, resize_square, to_rgb
from tlopt.data.source import SPLITS, DataWarning, Item, Source, open_source

__all__ = [
    "IMAGE_SUFFIXES",
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

"""Progress bars on stderr: shown on a terminal, silent in logs, pipes and with ``--quiet``.

``tlopt --quiet`` sets ``TLOPT_QUIET=1``, which the worker processes it starts inherit.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from tqdm import tqdm

QUIET_ENV = "TLOPT_QUIET"
VERBOSE_ENV = "TLOPT_VERBOSE"  # tlopt --verbose: every epoch's log line, in workers too


def bar(total: float | None = None, desc: str = "", unit: str = "it", **kw: Any) -> tqdm:
    """A tqdm bar on stderr; ``disable=None`` is tqdm's "only on a terminal"."""
    disable = kw.pop("disable", None)
    if os.environ.get(QUIET_ENV) == "1":
        disable = True
    size = shutil.get_terminal_size((100, 24))
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=disable,
        # The terminal's size, or 100 x 24 where it reports none (a pty never sized, which
        # tqdm would fill with empty lines).
        ncols=size.columns,
        nrows=size.lines,
        **kw,
    )

"""Imports go down only (DESIGN.md, Layers): each checked in a fresh interpreter, where
``sys.modules`` shows everything an import pulled in."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _loaded(module: str, then: str = "") -> list[str]:
    """The modules loaded in a fresh interpreter by importing ``module`` and running ``then``."""
    code = f"import sys, {module}\n{then}\nprint('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


# A study file with a time budget, parsed and written back as the study's snapshot: the
# parser reads the duration, the snapshot formats it.
READ_AND_WRITE = """
from tlopt.config import StudyConfig
config = StudyConfig.from_dict(
    {"name": "x", "data": {"source": "digits"}, "budget": {"time": "1h30m"}}
)
assert config.time_budget == 5400, config.time_budget
assert config.to_dict()["budget"] == {"time": "90m"}, config.to_dict()
"""


@pytest.mark.parametrize("module", ["tlopt.config", "tlopt.config_parser"])
def test_the_configuration_imports_no_tuning_and_no_torch(module: str) -> None:
    """The pure layer reads and writes study files (durations too) without the tuning layer
    above it, and without torch or Optuna."""
    loaded = _loaded(module, READ_AND_WRITE)
    above = [m for m in loaded if m.startswith(("tlopt.tune", "torch", "optuna", "timm"))]
    assert above == [], f"{module} loaded {above}"


def test_the_size_probe_imports_no_export() -> None:
    """The tuning layer takes the probe's features from the training layer, not the export
    (which imports tuning)."""
    export = [m for m in _loaded("tlopt.tune.size_probe") if m.startswith("tlopt.export")]
    assert export == [], f"importing tlopt.tune.size_probe loaded {export}"

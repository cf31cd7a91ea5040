"""``tlopt tune``: the staged search of one run folder, from the study file (or an image folder)
to the exported best model, resumable; :func:`tune` is the entry point."""

from tlopt.run.options import DEFAULT_STAGES, RunConfig, build_config, parse_stages
from tlopt.run.placement import Placement, placement
from tlopt.run.study_file import write_study_file
from tlopt.run.tune import tune

__all__ = [
    "DEFAULT_STAGES",
    "Placement",
    "RunConfig",
    "build_config",
    "parse_stages",
    "placement",
    "tune",
    "write_study_file",
]

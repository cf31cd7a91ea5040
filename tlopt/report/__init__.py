"""Reading studies back: the HTML report and the curves each trial leaves for the dashboard."""

from __future__ import annotations

from tlopt.report.build import write_report
from tlopt.report.trial_artifacts import write_trial_artifacts

__all__ = ["write_report", "write_trial_artifacts"]

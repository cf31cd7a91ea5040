"""The end of a run: the best trial over every stage the run's studies hold (whether or not
this invocation ran it) exported, unless the export already holds a trial as good; every stage
reported; the summary that ``--json`` prints.

Every stage minimises the same objective, its best validation loss, on the same validation
split (one data config, one seed), so the stages' best values compare.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tlopt.config import StudyConfig, fine_tunes_from_head
from tlopt.names import FIRST_HEAD, HEAD

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

    from tlopt.run.held import Held
    from tlopt.run.placement import Placement
    from tlopt.run.record import Clock
    from tlopt.run.stage import Say
    from tlopt.tune.plan import Plan

SUMMARY = "summary.json"


@dataclass(frozen=True)
class Candidate:
    """A stage's best complete trial, known by its storage id and its kept weights."""

    stage: str
    study: str
    trial: FrozenTrial

    @property
    def identity(self) -> dict[str, Any]:
        """What names this trial and no other, also after its study is deleted and made again
        (trial numbers restart; SQLite may hand out a deleted row's id again; an artifact id
        is a uuid)."""
        from tlopt.export.bundle import trial_identity

        return trial_identity(self.trial)

    def row(self, held: Held, ran: int) -> dict[str, Any]:
        t, attrs = self.trial, held.study(self.stage).user_attrs
        row = {
            "stage": self.stage,
            "study": self.study,
            "finished": held.finished(self.stage),
            "ran": ran,
            "best_trial": t.number,
            "best_trial_id": t._trial_id,
            "best_value": t.value,
            "best_accuracy": t.user_attrs.get("val_accuracy"),
        }
        if fine_tunes_from_head(self.stage):  # the head trial its best trial started from
            head = t.user_attrs.get(HEAD) or attrs.get(FIRST_HEAD) or attrs.get(HEAD) or {}
            row["head_trial"] = head.get("trial")
        return row


def candidates(held: Held, stages: list[str]) -> list[Candidate]:
    """Each stage's best complete trial, for every stage of the run that holds one."""
    found = []
    for stage in stages:
        best = held.best(stage)
        if best is not None:
            found.append(Candidate(stage, held.study_name(stage), best))
    return found


def current_export(folder: Path, held: Held) -> dict[str, Any] | None:
    """The export's manifest when the export is whole and its trial is still the one the
    run's studies hold under that id (None: no export, or one of a trial no longer there)."""
    from tlopt.export.bundle import FILES, recover, trial_identity

    recover(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not all((folder / f).is_file() for f in FILES):
        return None
    study, number = manifest.get("study"), manifest.get("trial")
    if study not in held.names() or not isinstance(number, int):
        return None
    try:
        storage = held.storage
        trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study), number
        )
        trial = storage.get_trial(trial_id)
    except KeyError:
        return None
    same = manifest.get("identity") == trial_identity(trial)
    return manifest if same and trial.state.name == "COMPLETE" else None


def finish(
    config: StudyConfig,
    held: Held,
    out: Path,
    place: Placement,
    stages: list[str],
    ran: dict[str, int],
    plan: Plan | None,
    probe: dict[str, Any] | None,
    clock: Clock,
    say: Say,
) -> dict[str, Any]:
    """Export the best trial of the run and report every stage; the summary."""
    from tlopt.export.bundle import export_best
    from tlopt.report import write_report
    from tlopt.tune.storage import mask_url

    found = candidates(held, stages)
    if not found:
        from tlopt.errors import TloptError

        raise TloptError("no stage completed a trial: give a longer --time or more --trials")
    best = min(found, key=lambda c: float(c.trial.value or 0.0))  # the first stage on a tie
    say(
        "best stage by validation loss (every stage minimises it on the same validation split): "
        f"{best.stage} (trial {best.trial.number}, val_loss {best.trial.value:.4f})"
    )
    export, page = out / "export", out / "report" / "report.html"
    out.mkdir(parents=True, exist_ok=True)
    manifest = current_export(export, held)
    kept = manifest is not None and manifest.get("tuned_value", float("inf")) <= best.trial.value
    if manifest is not None and kept:
        what = "it" if manifest["identity"] == best.identity else "a trial as good or better"
        say(
            f"export {export} holds trial {manifest['trial']} of '{manifest['study']}' "
            f"(val_loss {manifest['tuned_value']:.4f}): kept, {what}"
        )
    else:
        began = time.monotonic()
        manifest = export_best(
            best.study, export, held.url, place.device, force=True, trial=best.trial
        )
        how = "retrained" if manifest["weights_from"] == "retrained" else "its own weights"
        say(f"exported trial {best.trial.number} of '{best.study}' ({how}) to {export}")
        clock.fixed += time.monotonic() - began
        clock.save(export_seconds=round(time.monotonic() - began, 1))
    studies = [c.study for c in found]
    try:  # the report shows the stages of the last run: the same ones?
        same = [r["study"] for r in json.loads((out / SUMMARY).read_text())["stages"]] == studies
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    done = not sum(ran.values()) and kept and same and page.is_file()
    if done:
        say("nothing to do: every stage holds its finished trials; export and report are current")
    else:
        began = time.monotonic()
        write_report(studies, page.parent, held.url, export, probe)
        say(f"wrote {page}")
        clock.fixed += time.monotonic() - began
        clock.save(report_seconds=round(time.monotonic() - began, 1))
    rows = [c.row(held, ran.get(c.stage, 0)) for c in found]
    keys = ("study", "stage", "trial", "evaluated_split", "accuracy", "identity")
    exported = {k: manifest.get(k) for k in keys} | {"kept": kept}
    exported |= {
        "value": manifest.get("tuned_value"),
        "selected_by": "lowest validation loss",
        "val_accuracy": manifest.get("tuned_val_accuracy"),
    }
    paths = {"study_file": out / "study.toml", "export": export, "report": page}
    summary: dict[str, Any] = {"name": config.name, "storage": mask_url(held.url), "stages": rows}
    summary |= {k: str(p.resolve()) for k, p in paths.items()}
    summary |= {
        "exported": exported,
        "ran": sum(ran.values()),
        "nothing_to_do": done,
        "plan": plan.as_dict() if plan else None,
    }
    if probe:
        summary["image_size"] = probe
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary

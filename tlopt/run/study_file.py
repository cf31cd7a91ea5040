"""``RUN/study.toml``: the run's study file, commented, written with tomlkit (it keeps
comments and writes TOML's quoting rules), so that the user can read, edit and rerun it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import Table

from tlopt.config import StudyConfig, load_config

HEADER = """\
The study file of a 'tlopt tune' run, written by it. Edit it, then resume or extend the run:
  tlopt tune --config {out}/study.toml --out {out}
create one stage's study by hand:  tlopt study create --config {out}/study.toml --stage head
join a running stage with more workers (here or on other machines):
  tlopt worker --study {name}/STAGE --storage URL
Every stage is the Optuna study {name}/STAGE in [storage] url. Fine-tuning stages start from
the best head and, unless a [stages.STAGE] table says otherwise, search 0.01, 0.03 and 0.1
of the [search] lr with one warm-up epoch and a rate scaled by 0.7 per block group.
[stages.STAGE] sets a stage's own values over [search] (a folder run's head, seconds a trial
on cached features, searches its rate and dropout there)."""
NO_EPOCHS = (
    "[search] epochs is not set: under [budget] time each stage's epoch choices fit its share "
    "(its study keeps them); set it to fix them"
)
COMMENTS = {  # one per top-level key or table
    "seed": "seeds the split and training: every stage has the same validation split",
    "n_trials": "finished (complete + pruned) trials per stage, shared by every worker",
    "data": "one folder per class, or train/ and val/ (and test/) of class folders",
    "model": "any timm backbone; weights: pretrained, bundled, none or file:PATH",
    "search": "a list is a choice; one element fixes the value",
    "rules": "the rules tlopt reads this file by (an older run keeps its own)",
}
DROPPED_WHEN_EMPTY = ("stages", "options", "decay_params")


def write_study_file(
    config: StudyConfig,
    path: Path,
    notes: list[str] | None = None,
    epochs_set: bool = True,
) -> None:
    """``path``: a commented study file that loads back to ``config`` (a password: url = "");
    ``notes``: comment lines after the header (the size probe's table); ``epochs_set``: False
    leaves ``[search] epochs`` out (it is the default), so that the file, reread, lets a time
    budget fit them as the folder run did."""
    from tlopt.tune.storage import has_secret, mask_url

    raw = config.to_dict()
    url = raw["storage"]["url"]
    doc = tomlkit.document()
    for line in HEADER.format(out=path.parent, name=config.name).splitlines():
        doc.add(tomlkit.comment(line))
    if has_secret(url):  # no secret in a file: the user sets TLOPT_STORAGE to resume
        raw["storage"]["url"] = ""
        doc.add(
            tomlkit.comment(
                f"The studies are in {mask_url(url)} (url is blank below: it holds a password)."
            )
        )
        doc.add(
            tomlkit.comment(
                "Set TLOPT_STORAGE to that URL, with its password, before you "
                "resume or join the run."
            )
        )
    if not epochs_set:
        del raw["search"]["epochs"]
        doc.add(tomlkit.comment(NO_EPOCHS))
    for line in notes or []:
        doc.add(tomlkit.comment(line))
    doc.add(tomlkit.nl())
    _fill(doc, raw, top=True)
    path.write_text(tomlkit.dumps(doc), encoding="utf-8")
    back = load_config(path).to_dict()
    back["storage"]["url"] = url
    if back != config.to_dict():  # a bug here, not the user's: never leave a file that lies
        raise RuntimeError(f"{path} does not load back to the config it was written from")


def _fill(into: Any, raw: dict[str, Any], top: bool = False) -> None:
    """Keys first, then tables (TOML puts a key after a table into that table)."""
    tables = []
    for key, value in raw.items():
        if value is None or (value == {} and key in DROPPED_WHEN_EMPTY):
            continue
        if isinstance(value, dict) and set(value) != {"low", "high", "log"}:
            tables.append((key, value))
            continue
        into.add(key, _inline(value))
        if top and key in COMMENTS:
            into[key].comment(COMMENTS[key])
    for key, value in tables:
        table: Table = tomlkit.table(is_super_table=not _has_keys(value))
        if top and key in COMMENTS:
            table.comment(COMMENTS[key])
        _fill(table, value)
        into.add(key, table)


def _has_keys(raw: dict[str, Any]) -> bool:
    """A table with keys of its own gets a header; one of tables only is named by them."""
    return not raw or any(
        not isinstance(v, dict) or set(v) == {"low", "high", "log"}
        for v in raw.values()
        if v is not None
    )


def _inline(value: Any) -> Any:
    if isinstance(value, dict):  # a range, {low, high, log}, stays on one line
        table = tomlkit.inline_table()
        table.update({k: _inline(v) for k, v in value.items()})
        return table
    return value

"""What the storage holds of a run's studies, from one storage opened once per run: which
stages have studies, their finished trials, the configs they were made with, their best
trials. A rerun decides from this, never from what one invocation ran."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from tlopt.config import StudyConfig, fine_tunes_from_head
from tlopt.errors import ConfigError
from tlopt.names import ATTR

if TYPE_CHECKING:
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial


class Held:
    """The studies ``NAME/STAGE`` of one run in the storage at ``url``."""

    def __init__(self, name: str, url: str) -> None:
        self.name, self.url = name, url
        self._storage: BaseStorage | None = None

    @property
    def storage(self) -> BaseStorage:
        from tlopt.tune.storage import open_storage

        if self._storage is None:
            self._storage = open_storage(self.url)
        return self._storage

    def study_name(self, stage: str) -> str:
        return f"{self.name}/{stage}"

    def names(self) -> list[str]:
        """The studies in the storage (a run's SQLite file that does not exist yet holds none:
        it is not made by asking)."""
        from tlopt.tune.storage import sqlite_path, study_names

        db = sqlite_path(self.url)
        return [] if db is not None and not db.exists() else study_names(self.storage)

    def has(self, stage: str) -> bool:
        return self.study_name(stage) in self.names()

    def study(self, stage: str) -> optuna.Study:
        import optuna

        return optuna.load_study(study_name=self.study_name(stage), storage=self.storage)

    def finished(self, stage: str) -> int:
        """Finished (complete + pruned) trials of the stage that count towards its budget
        (continuations do not: tlopt.tune.continuation); 0 without its study."""
        from tlopt.tune.continuation import is_continuation
        from tlopt.tune.study import FINISHED

        if not self.has(stage):
            return 0
        done = self.study(stage).get_trials(deepcopy=False, states=FINISHED)
        return sum(not is_continuation(t) for t in done)

    def remaining(self, config: StudyConfig, stage: str) -> int:
        """The stage's trials still to run: its budget less its finished trials."""
        from tlopt.tune.sampling import stage_budget

        budget = stage_budget(config.n_trials, config.space_for(stage))
        return max(0, budget - self.finished(stage))

    def stored_config(self, stage: str) -> dict[str, Any] | None:
        if not self.has(stage):
            return None
        stored = self.study(stage).user_attrs.get(ATTR + "config")
        return stored if isinstance(stored, dict) else None

    def best_losses(self, stages: list[str]) -> dict[str, float]:
        """The best validation loss of each of ``stages`` that holds a complete trial."""
        best = {st: self.best(st) for st in stages}
        return {
            st: float(b.value) for st, b in best.items() if b is not None and b.value is not None
        }

    def best(self, stage: str) -> FrozenTrial | None:
        """The stage's complete trial of the lowest validation loss (None: none yet)."""
        from optuna.trial import TrialState

        if not self.has(stage):
            return None
        done = self.study(stage).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        done = [t for t in done if t.value is not None]
        return min(done, key=lambda t: (t.value, t.number)) if done else None


def check_order(config: StudyConfig, names: list[str], held: Held) -> None:
    """A fine-tuning stage needs the head stage first (in --stages, or its study exists)."""
    if "head" in names or held.has("head"):
        return
    for stage in names:
        if fine_tunes_from_head(stage):
            raise ConfigError(f"stage '{stage}' starts from the best head: --stages head,{stage}")


def check_studies(config: StudyConfig, names: list[str], held: Held) -> None:
    """Before anything runs: a study of this name holds this config, and head comes first."""
    from tlopt.tune.study import create, read_now, snapshot

    check_order(config, names, held)
    for stage in names:
        stored = held.stored_config(stage)
        if stored is None:
            continue
        if _but_budget(read_now(stored), stage) != _but_budget(snapshot(config), stage):
            create(config, stage, held.url, dry_run=True)  # its error shows the difference


def _but_budget(config: Any, stage: str) -> Any:
    """A stored config as it decides the study of ``stage``: less its trial and time budgets
    (a rerun may change --trials and --time) and the other stages' tables."""
    if not isinstance(config, dict):
        return config
    rest = {k: v for k, v in config.items() if k not in ("n_trials", "budget")}
    if isinstance(rest.get("storage"), dict):  # older studies stored the URL, masked
        rest["storage"] = {**rest["storage"], "url": ""}
    if isinstance(rest.get("stages"), dict):
        rest["stages"] = {k: v for k, v in rest["stages"].items() if k == stage}
    return rest


def adopt_rules(config: StudyConfig, names: list[str], held: Held) -> StudyConfig:
    """A run whose studies were made by older rules resumes by them (config.RULES): the
    oldest rules its existing studies hold, for every stage of it."""
    from tlopt.config import rules_of

    rules = [rules_of(s) for s in map(held.stored_config, names) if s is not None]
    return replace(config, rules=min(rules)) if rules and min(rules) < config.rules else config


def adopt_epochs(
    config: StudyConfig, names: list[str], held: Held, keep: set[str]
) -> tuple[StudyConfig, set[str]]:
    """A stage whose study exists keeps the epoch choices it was made with, unless the user
    gives others (``keep``: the stages whose choices the user set). Returns the config and
    the stages whose epochs are now taken (the user's, and the studies')."""
    stages, made = {**config.stages}, set()
    for stage in names:
        stored = held.stored_config(stage)
        if stored is None:
            continue
        made.add(stage)
        if stage not in keep:
            epochs = StudyConfig.from_dict(stored).space_for(stage).epochs
            stages[stage] = {**stages.get(stage, {}), "epochs": epochs}
    return replace(config, stages=stages), made | keep

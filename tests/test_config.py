"""Study configuration: every shipped file validates; every problem is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlopt.config import FloatRange, StudyConfig, load_config
from tlopt.errors import ConfigError
from tlopt.tune.study import buildable_problems

STUDIES = sorted((Path(__file__).parent.parent / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_configs_validate_and_round_trip(path: Path) -> None:
    config = load_config(path)
    assert StudyConfig.from_dict(config.to_dict()) == config
    for stage in ("head", "freeze1", "freeze2"):
        assert config.space_for(stage).batch_size


def test_demo_stage_overrides() -> None:
    config = load_config(STUDIES[0].parent / "demo.toml")
    assert config.space_for("head").lr != config.space_for("freeze1").lr


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def test_every_problem_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[data]
source = "digits"
[model]
backbone = "resnet33"
weights = "none"
[search]
batch_size = [8, 12]
decay = ["constant", "cosine_warm"]
epochs = [-5]
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, check=buildable_problems)  # the backbone: checked against timm
    lines = str(info.value).splitlines()
    assert len(lines) == 4, lines
    assert all(line.startswith(f"{path}: ") for line in lines)
    text = str(info.value)
    assert "model.backbone: unknown backbone 'resnet33': did you mean" in text
    assert "search.batch_size: 12 is not one of" in text
    assert "search.decay: 'cosine_warm' is not one of" in text
    assert "search.epochs: -5 is not a whole number" in text


def test_unknown_key_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path, '[data]\nsource = "digits"\n[search]\nbatch_sizes = [8]\n')
    with pytest.raises(
        ConfigError, match="search.batch_sizes: unknown key: did you mean 'batch_size'"
    ):
        load_config(path)


def test_wrong_types_and_ranges(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
seed = "zero"
[data]
source = "folder"
image_size = 3
val_fraction = 1.5
[search]
lr = {low = 1e-2, high = 1e-4, log = true}
dropout = [1.5]
patience = -1
[search.decay_params.step]
gamma = [2.0]
[pruner]
type = "medain"
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    for key in (
        "seed",
        "data.path",
        "data.image_size",
        "data.val_fraction",
        "search.lr",
        "search.dropout",
        "search.patience",
        "search.decay_params.step.gamma",
        "pruner.type",
    ):
        assert f": {key}:" in text, key
    assert "did you mean 'median'" in text


def test_lr_range_and_missing_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[data]\nsource = "digits"\n[search]\nlr = {low = 1e-5, high = 1e-2, log = true}\n',
    )
    assert load_config(path).search.lr == FloatRange(1e-5, 1e-2, True)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    (tmp_path / "broken.toml").write_text("[data\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "broken.toml")


@pytest.mark.parametrize("written", [True, False], ids=["written", "left-out"])
def test_a_value_written_on_purpose_holds_for_every_stage(tmp_path: Path, written: bool) -> None:
    """Decided by presence, never by equality (issue 21): [search] warmup_epochs = [0] and
    layer_decay = [1.0], both the head's defaults, hold in the fine-tuning stages too, in the
    config and in the snapshot a study stores; left out, fine-tuning takes 1 and 0.7."""
    from tlopt.cli.study import space_summary

    search = "warmup_epochs = [0]\nlayer_decay = [1.0]\n" if written else ""
    path = tmp_path / "s.toml"
    path.write_text(f'[data]\nsource = "digits"\n[search]\nlr = [1e-3]\n{search}')
    config = load_config(path)
    stored = StudyConfig.from_dict(config.to_dict())
    assert stored == config
    expected = ((0.0,), (1.0,)) if written else ((1.0,), (0.7,))
    for stage in ("freeze1", "freeze2", "full"):
        for cfg in (config, stored):
            space = cfg.space_for(stage)
            assert (space.warmup_epochs, space.layer_decay) == expected, stage
        summary = space_summary(stored.space_for(stage), stage)
        assert f"warmup_epochs {expected[0][0]:g}, layer_decay {expected[1][0]:g}," in summary
    head = config.space_for("head")
    assert (head.warmup_epochs, head.layer_decay) == ((0.0,), (1.0,))

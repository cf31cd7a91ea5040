"""Fine-tuning that keeps the head: warm-up, layer-wise rates, epoch 0, resume.

Pure functions are checked over small grids; the loop on a tiny timm model (random weights) on
sklearn's digits, as tests/test_trainer.py does.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from optuna.trial import FixedTrial

from tests.test_trainer import SIZE, digits  # noqa: F401  (the module-scoped fixture)
from tlopt.config import load_config
from tlopt.errors import ConfigError
from tlopt.models.backbones import classifier_name, create_backbone
from tlopt.models.stages import apply_stage, parse_stage
from tlopt.schedules import layer_scales, warmup_factor
from tlopt.train.data import ImageSet
from tlopt.train.ledger import Ledger, TrainParams
from tlopt.train.trainer import fit, param_groups
from tlopt.tune.space import suggest
from tlopt.tune.study import head_lost

assert SIZE  # the digits fixture's image size


@pytest.mark.parametrize("warmup", [0.0, 0.5, 1.0, 1.5, 3.0])
def test_warmup_factor_climbs_linearly_then_holds(warmup: float) -> None:
    steps = 4  # steps per epoch; progress counts the step being taken
    values = [warmup_factor(e + (s + 1) / steps, warmup) for e in range(5) for s in range(steps)]
    for k, value in enumerate(values):
        progress = (k + 1) / steps
        expected = 1.0 if warmup == 0 or progress >= warmup else progress / warmup
        assert value == pytest.approx(expected)
        assert 0 < value <= 1
    assert values == sorted(values)  # never falls
    assert values[-1] == 1.0


def test_warmup_factor_rejects_negative_inputs() -> None:
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_factor(1.0, -1.0)
    with pytest.raises(ValueError, match="progress"):
        warmup_factor(-0.1, 1.0)


def test_layer_scales_small_cases() -> None:
    assert layer_scales(1, 0.5) == [1.0]
    assert layer_scales(2, 0.5) == [0.5, 1.0]
    assert layer_scales(4, 0.5) == [0.125, 0.25, 0.5, 1.0]
    assert layer_scales(3, 1.0) == [1.0, 1.0, 1.0]
    for n, decay in itertools.product(range(1, 9), [0.1, 0.46, 0.7, 0.9, 1.0]):
        scales = layer_scales(n, decay)
        assert len(scales) == n and scales[-1] == 1.0  # the head at the full rate
        for lower, upper in itertools.pairwise(scales):
            assert lower == pytest.approx(upper * decay)
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="layer_decay"):
            layer_scales(3, bad)
    with pytest.raises(ValueError, match="num_layers"):
        layer_scales(0, 0.5)


def test_param_groups_follow_timm_block_groups() -> None:
    model = create_backbone("test_efficientnet", "none", num_classes=10)
    apply_stage(model, parse_stage("freeze1"))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert param_groups(model, 1.0) == [
        {"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": 1.0}
    ]
    groups = param_groups(model, 0.5)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter once, no frozen one
    scales = [g["lr_scale"] for g in groups]
    assert scales == sorted(scales) and scales[-1] == 1.0 and len(set(scales)) == len(scales)
    classifier = model.get_submodule(classifier_name(model))
    head_group = next(g for g in groups if any(p is classifier.weight for p in g["params"]))
    assert head_group["lr_scale"] == 1.0
    # The earliest trained block group (blocks.1: freeze1 froze the stem and blocks.0).
    first = next(
        g for g in groups if any(p is next(model.blocks[1].parameters()) for p in g["params"])
    )
    assert first["lr_scale"] == scales[0] < 1.0


def _trained_head(data: tuple[ImageSet, ImageSet]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = create_backbone("test_efficientnet", "none", num_classes=10)
    apply_stage(model, parse_stage("head"))
    fit(model, data[0], data[1], TrainParams(batch_size=16, epochs=8, lr=3e-2), seed=1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _fine_tune(
    data: tuple[ImageSet, ImageSet], state: dict[str, torch.Tensor], **kw: object
) -> list[tuple[float, float]]:
    model = create_backbone("test_efficientnet", "none", num_classes=10)
    model.load_state_dict(state)
    apply_stage(model, parse_stage("freeze1"))
    params = TrainParams(**{"batch_size": 16, "epochs": 2, "flip": False, **kw})  # type: ignore[arg-type]
    result = fit(model, data[0], data[1], params, seed=2, record_start=True)
    return [(r.val_loss, r.val_accuracy) for r in result.history]


def test_first_fine_tuning_epoch_keeps_the_head(digits: tuple[ImageSet, ImageSet]) -> None:  # noqa: F811
    """From a trained head, the first fine-tuning epoch with warm-up and layer decay does not
    raise the validation loss; the same rate without them does (so the test can fail)."""
    state = _trained_head(digits)
    kept = _fine_tune(digits, state, lr=3e-2, warmup_epochs=1.0, layer_decay=0.3)
    wrecked = _fine_tune(digits, state, lr=3e-2)
    assert kept[0] == wrecked[0]  # epoch 0: the same head, before any step
    assert kept[1][0] <= kept[0][0]
    assert wrecked[1][0] > kept[0][0]


def test_epoch_zero_is_the_model_before_any_step(digits: tuple[ImageSet, ImageSet]) -> None:  # noqa: F811
    state = _trained_head(digits)
    model = create_backbone("test_efficientnet", "none", num_classes=10)
    model.load_state_dict(state)
    apply_stage(model, parse_stage("freeze1"))
    result = fit(
        model, digits[0], digits[1], TrainParams(batch_size=16, epochs=1), record_start=True
    )
    zero = result.history[0]
    assert zero.epoch == 0 and np.isnan(zero.train_loss) and zero.lr == 0.0
    assert [r.epoch for r in result.history] == [0, 1]
    assert result.best_epoch == 1  # epoch 0 is a record, never the best epoch
    lost = head_lost([r.as_dict() for r in result.history])
    assert lost == pytest.approx(100 * (zero.val_accuracy - result.history[1].val_accuracy))


def test_resumed_fit_equals_an_uninterrupted_one(
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
    tmp_path: Path,
) -> None:
    """Stopped after epoch 2 with its checkpoint saved and loaded as the worker does (onto the
    CPU, weights only), the resumed run has the same history and best weights."""
    params = TrainParams(batch_size=16, epochs=4, lr=3e-3, warmup_epochs=0.5, layer_decay=0.7)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = create_backbone("test_efficientnet", "none", num_classes=10, drop_rate=0.3)
        apply_stage(m, parse_stage("freeze1"))
        return m

    whole = fit(model(), digits[0], digits[1], params, seed=5, record_start=True)

    class Stop(Exception):
        pass

    def stop_after_two(record: object, checkpoint: object) -> None:
        if record.epoch == 2:  # type: ignore[attr-defined]
            torch.save(checkpoint(), tmp_path / "checkpoint.pt")  # type: ignore[operator]
            raise Stop

    with pytest.raises(Stop):
        fit(
            model(),
            digits[0],
            digits[1],
            params,
            seed=5,
            record_start=True,
            on_epoch=stop_after_two,
        )
    saved = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["rng"].dtype == torch.uint8 and saved["generator"].device.type == "cpu"
    resumed = fit(model(), digits[0], digits[1], params, seed=5, resume=saved, record_start=True)
    strip = [{k: v for k, v in r.as_dict().items() if k != "seconds"} for r in whole.history]
    again = [{k: v for k, v in r.as_dict().items() if k != "seconds"} for r in resumed.history]
    np.testing.assert_equal(again, strip)
    assert resumed.best_epoch == whole.best_epoch
    for key, value in whole.best_state.items():
        torch.testing.assert_close(resumed.best_state[key], value, rtol=0, atol=0)


def test_a_checkpoint_from_another_device_type_resumes_reseeded(
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A generator state of a CUDA generator's size (16 bytes) resumes on the CPU: the epochs
    are kept, the rest reseeded from the seed and the epoch, and one log line says so."""
    params = TrainParams(batch_size=16, epochs=3, lr=3e-3)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        m = create_backbone("test_efficientnet", "none", num_classes=10, drop_rate=0.3)
        apply_stage(m, parse_stage("freeze1"))
        return m

    saved: dict[str, object] = {}

    class Stop(Exception):
        pass

    def stop_after_one(record: object, checkpoint: object) -> None:
        if record.epoch == 1:  # type: ignore[attr-defined]
            saved.update(checkpoint())  # type: ignore[operator]
            raise Stop

    with pytest.raises(Stop):
        fit(model(), digits[0], digits[1], params, seed=5, on_epoch=stop_after_one)
    saved["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    saved.pop("cuda_rng", None)
    with caplog.at_level("INFO", logger="tlopt.worker"):
        resumed = fit(model(), digits[0], digits[1], params, seed=5, resume=saved)
    assert [r.epoch for r in resumed.history] == [1, 2, 3]
    assert resumed.history[0].as_dict() == saved["history"][0]  # type: ignore[index]
    assert all(np.isfinite(r.val_loss) for r in resumed.history)
    lines = [r.getMessage() for r in caplog.records if "another device type" in r.getMessage()]
    assert len(lines) == 1 and "reseeded from seed 5 and epoch 2" in lines[0], lines


def test_fine_tuning_stages_default_to_fine_tuning_rates(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[data]\nsource = "digits"\n[search]\nlr = [1e-3, 3e-3]\nlabel_smoothing = [0.1]\n'
        "[stages.freeze2]\nwarmup_epochs = [0]\nlr = [5e-5]\n"
    )
    config = load_config(path)
    head, freeze1, freeze2 = (config.space_for(s) for s in ("head", "freeze1", "freeze2"))
    assert (head.lr, head.warmup_epochs, head.layer_decay) == ((1e-3, 3e-3), (0.0,), (1.0,))
    assert (freeze1.lr, freeze1.warmup_epochs, freeze1.layer_decay) == (
        (1e-5, 3e-5, 9e-5, 1e-4, 3e-4, 9e-4, 1e-3, 3e-3),  # 0.01..1 of each [search] rate
        (1.0,),
        (0.7,),
    )
    assert freeze1.label_smoothing == (0.1,)  # what [search] sets holds for every stage
    assert (freeze2.lr, freeze2.warmup_epochs, freeze2.layer_decay) == ((5e-5,), (0,), (0.7,))
    scratch = config.space_for("scratch")
    assert scratch.lr == head.lr and scratch.warmup_epochs == (0.0,)


@pytest.mark.slow  # two studies trained in this process: the full tier
def test_the_start_of_a_fine_tuning_stage_is_validated_once_per_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every trial of a worker starts from the same head: epoch 0 is evaluated by the first
    trial and recorded from memory by the others (one validation pass less per trial)."""
    from tests.conftest import TINY_DATA_MODEL
    from tlopt.config import load_config
    from tlopt.train import trainer
    from tlopt.tune import study as studies
    from tlopt.tune.worker import work

    path = tmp_path / "s.toml"
    path.write_text('name = "s"\nseed = 0\nn_trials = 3\n' + TINY_DATA_MODEL
                    + '[search]\nepochs = [1]\nbatch_size = [16]\n')  # fmt: skip
    url, config = f"sqlite:///{tmp_path / 's.db'}", load_config(path)
    studies.create(config, "head", url)
    work("s/head", url, n_trials=1, device="cpu")
    studies.create(config, "freeze2", url)
    # Three rates: three points to train (one point twice would be taken, not trained again).
    rates = config.space_for("freeze2").lr
    assert isinstance(rates, tuple) and len(rates) >= 3
    for lr in rates[:3]:
        studies.load("s/freeze2", url).enqueue_trial({"lr": lr})
    calls = []
    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    work("s/freeze2", url, n_trials=3, device="cpu")
    trials = studies.load("s/freeze2", url).trials
    starts = [t.user_attrs["history"][0] for t in trials]
    figures = [(s["epoch"], s["val_loss"], s["val_accuracy"]) for s in starts]
    assert len(trials) == 3 and all(f == figures[0] for f in figures), figures
    assert starts[0]["epoch"] == 0 and starts[0]["val_loss"] > 0
    assert len(calls) == 3 + 1  # one epoch each, and the start once


def _epoch_movement(params: TrainParams, epoch: int, n: int = 256) -> float:
    """The rates of an epoch's steps summed: how far Adam (about the rate a step) moves a weight."""
    ledger = Ledger(params)
    steps = ledger.steps(n)
    ledger.begin_epoch(epoch)
    return sum(ledger.step_lr(epoch, s, steps) for s in range(steps))


def test_a_fine_tuning_epoch_moves_as_far_at_every_batch_size(tmp_path: Path) -> None:
    """Issue 21.6: at the written rate, an epoch at batch size 8 took four times the steps of
    one at 32 and moved the backbone 3.7 times as far in its warm-up epoch. A fine-tuning
    stage's rate is the rate at batch size 32; [search] lr_batch_size = 0 keeps it as written."""
    path = tmp_path / "s.toml"
    path.write_text(
        '[data]\nsource = "digits"\n[search]\nlr = [1e-3]\nepochs = [3]\ndecay = ["constant"]\n'
    )
    config = load_config(path)

    def point(bs: int) -> FixedTrial:  # one of the fine-tuning rates the stage searches
        return FixedTrial({"batch_size": bs, "lr": 1e-4})

    for stage in ("freeze1", "freeze2"):
        space = config.space_for(stage)
        assert space.lr_batch_size == 32
        moved = {
            bs: [
                _epoch_movement(
                    suggest(FixedTrial({"batch_size": bs, "lr": 1e-4}), space, stage).params, e
                )
                for e in (0, 1)
            ]
            for bs in (8, 16, 32)
        }
        for bs in (8, 16):
            warm, full = (moved[bs][e] / moved[32][e] for e in (0, 1))
            assert 0.85 < warm < 1.15, (stage, bs, warm)  # the warm-up epoch
            assert full == pytest.approx(1.0)  # the epochs after it
    assert config.space_for("head").lr_batch_size == 0  # a head's rate is as written
    path.write_text(path.read_text() + "lr_batch_size = 0\n")
    space = load_config(path).space_for("freeze2")
    as_written = [
        _epoch_movement(
            suggest(FixedTrial({"batch_size": bs, "lr": 1e-4}), space, "freeze2").params, 1
        )
        for bs in (8, 32)
    ]
    assert as_written[0] == pytest.approx(4 * as_written[1])


def test_lr_batch_size_must_be_a_whole_number(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[data]\nsource = "digits"\n[stages.freeze2]\nlr_batch_size = 0.5\n')
    with pytest.raises(ConfigError, match=r"stages\.freeze2\.lr_batch_size: 0\.5 is not a whole"):
        load_config(path)

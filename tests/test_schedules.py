"""Learning-rate schedules: hand-computed tables, shape, and the errors a user sees."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlopt import schedules
from tlopt.errors import ConfigError, TloptError
from tlopt.schedules import (
    DECAY_DEFAULTS,
    DECAY_PARAMS,
    DECAY_TYPES,
    lr_factor,
    validate_decay_params,
)

# (decay, params, total_epochs, {epoch: factor}), every factor worked out by hand.
TABLE = [
    ("constant", {}, 10, {0: 1.0, 1: 1.0, 9: 1.0, 50: 1.0}),
    # Defaults: halve every 10 epochs.
    ("step", {}, 50, {0: 1.0, 9: 1.0, 10: 0.5, 19: 0.5, 20: 0.25, 49: 0.0625}),
    ("step", {"step_size": 3, "gamma": 0.1}, 10, {0: 1.0, 2: 1.0, 3: 0.1, 5: 0.1, 6: 0.01}),
    ("step", {"step_size": 1, "gamma": 1.0}, 5, {0: 1.0, 4: 1.0}),
    # Linear from 1 to 0.01 over 10 epochs: 0.99 * (1 - e/10) + 0.01; clamped after.
    ("polynomial", {}, 10, {0: 1.0, 5: 0.505, 9: 0.109, 10: 0.01, 20: 0.01}),
    ("polynomial", {"power": 2.0, "end_factor": 0.0}, 4, {0: 1.0, 1: 0.5625, 2: 0.25, 3: 0.0625}),
    ("polynomial", {"power": 1.0, "end_factor": 1.0}, 4, {0: 1.0, 3: 1.0}),
    ("exponential", {}, 10, {0: 1.0, 1: 0.95, 2: 0.9025}),
    ("exponential", {"gamma": 0.5}, 10, {0: 1.0, 1: 0.5, 3: 0.125, 9: 0.001953125}),
    # Keras' classic time-based decay: 1 / (1 + decay * epoch).
    ("inverse_time", {}, 200, {0: 1.0, 100: 0.5, 199: 1 / 2.99}),
    ("inverse_time", {"decay": 0.5}, 5, {0: 1.0, 1: 1 / 1.5, 2: 0.5, 4: 1 / 3}),
    ("inverse_time", {"decay": 0.0}, 5, {0: 1.0, 4: 1.0}),
    # 0.5 * (1 + cos(pi * e / 4)).
    (
        "cosine",
        {},
        4,
        {0: 1.0, 1: 0.5 + 0.5 * math.sqrt(0.5), 2: 0.5, 3: 0.5 - 0.5 * math.sqrt(0.5), 4: 0.0},
    ),
    ("cosine", {"end_factor": 0.1}, 2, {0: 1.0, 1: 0.55, 2: 0.1, 7: 0.1}),
]


@pytest.mark.parametrize(
    ("decay", "params", "total", "expected"),
    TABLE,
    ids=[f"{row[0]}-{i}" for i, row in enumerate(TABLE)],
)
def test_table(decay: str, params: dict[str, float], total: int, expected: dict[int, float]):
    for epoch, factor in expected.items():
        assert lr_factor(decay, epoch, total, **params) == pytest.approx(factor, rel=1e-12), epoch


def test_every_decay_is_in_the_table() -> None:
    assert {row[0] for row in TABLE} == set(DECAY_TYPES)


def test_tables_agree() -> None:
    assert set(DECAY_PARAMS) == set(DECAY_DEFAULTS) == set(DECAY_TYPES)
    for decay in DECAY_TYPES:
        assert set(DECAY_DEFAULTS[decay]) == set(DECAY_PARAMS[decay]), decay
        for name, default in DECAY_DEFAULTS[decay].items():
            low, high = DECAY_PARAMS[decay][name]
            assert low <= default <= high, (decay, name)


@pytest.mark.parametrize("decay", DECAY_TYPES)
def test_functions_share_the_defaults(decay: str) -> None:
    """The plain functions' keyword defaults are the documented ones."""
    signature = inspect.signature(getattr(schedules, decay))
    defaults = {
        name: p.default
        for name, p in signature.parameters.items()
        if name not in ("epoch", "total_epochs")
    }
    assert defaults == DECAY_DEFAULTS[decay]


def _corner_params(decay: str) -> list[dict[str, float]]:
    """The defaults, and every parameter at each end of its range."""
    corners = [dict(DECAY_DEFAULTS[decay])]
    for name, (low, high) in DECAY_PARAMS[decay].items():
        corners += [{name: low}, {name: high}]
    return corners


@pytest.mark.parametrize("decay", DECAY_TYPES)
@pytest.mark.parametrize("total", [1, 2, 10, 150])
def test_epoch_zero_is_one_and_factors_never_rise(decay: str, total: int) -> None:
    for params in _corner_params(decay):
        factors = [lr_factor(decay, e, total, **params) for e in range(total + 5)]
        assert factors[0] == 1.0, params
        assert all(b <= a for a, b in zip(factors, factors[1:], strict=False)), params
        # Until the last trained epoch the factor stays positive (a 0 lr trains nothing).
        assert all(0.0 < f <= 1.0 for f in factors[:total]), params


@pytest.mark.parametrize(
    ("decay", "params"),
    [
        ("polynomial", {}),
        ("polynomial", {"power": 0.5, "end_factor": 0.0}),
        ("exponential", {}),
        ("inverse_time", {}),
        ("cosine", {}),
    ],
)
def test_smooth_decays_fall_every_epoch(decay: str, params: dict[str, float]) -> None:
    factors = [lr_factor(decay, e, 50, **params) for e in range(50)]
    assert all(b < a for a, b in zip(factors, factors[1:], strict=False))


@given(
    decay=st.sampled_from(DECAY_TYPES),
    data=st.data(),
    total=st.integers(min_value=1, max_value=300),
)
def test_any_valid_params_give_a_falling_factor_from_one(
    decay: str, data: st.DataObject, total: int
) -> None:
    params = {
        name: data.draw(st.floats(min_value=low, max_value=high), label=name)
        for name, (low, high) in DECAY_PARAMS[decay].items()
    }
    factors = [lr_factor(decay, e, total, **params) for e in range(total)]
    assert factors[0] == 1.0
    assert all(0.0 <= f <= 1.0 for f in factors)
    assert all(b <= a + 1e-15 for a, b in zip(factors, factors[1:], strict=False))


def test_validate_fills_defaults_and_takes_numpy_scalars() -> None:
    assert validate_decay_params("step", {"gamma": 0.1}) == {"step_size": 10.0, "gamma": 0.1}
    assert validate_decay_params("constant", {}) == {}
    resolved = validate_decay_params("step", {"step_size": np.int64(5), "gamma": np.float32(0.5)})
    assert resolved == {"step_size": 5.0, "gamma": 0.5}
    assert all(type(v) is float for v in resolved.values())


def test_unknown_decay_names_the_valid_ones() -> None:
    with pytest.raises(ConfigError) as info:
        lr_factor("linear", 0, 10)
    message = str(info.value)
    assert "'linear'" in message
    for decay in DECAY_TYPES:
        assert decay in message
    assert isinstance(info.value, TloptError)


def test_unknown_decay_suggests_a_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean 'exponential'"):
        lr_factor("exponentail", 0, 10)


def test_unknown_parameter_names_decay_and_parameters() -> None:
    with pytest.raises(ConfigError) as info:
        lr_factor("step", 0, 10, gama=0.5)
    message = str(info.value)
    assert "'step'" in message and "'gama'" in message
    assert "did you mean 'gamma'" in message
    assert "step_size" in message and "gamma" in message


def test_constant_takes_no_parameters() -> None:
    with pytest.raises(ConfigError, match="'constant' has no parameter 'gamma'.*none"):
        lr_factor("constant", 0, 10, gamma=0.5)


@pytest.mark.parametrize(
    ("decay", "name", "value", "valid"),
    [
        ("step", "gamma", 1.5, "[0.01, 1]"),
        ("step", "gamma", 0.0, "[0.01, 1]"),
        ("step", "step_size", 0, "[1, 1000]"),
        ("polynomial", "end_factor", -0.1, "[0, 1]"),
        ("polynomial", "power", 0.0, "[0.1, 10]"),
        ("exponential", "gamma", 2.0, "[0.01, 1]"),
        ("inverse_time", "decay", -1.0, "[0, 10]"),
        ("cosine", "end_factor", 1.01, "[0, 1]"),
        ("cosine", "end_factor", float("nan"), "[0, 1]"),
    ],
)
def test_out_of_range_names_decay_parameter_value_and_range(
    decay: str, name: str, value: float, valid: str
) -> None:
    with pytest.raises(ConfigError) as info:
        lr_factor(decay, 0, 10, **{name: value})
    message = str(info.value)
    assert f"'{decay}'" in message
    assert f"{name} = {value!r}" in message
    assert valid in message


@pytest.mark.parametrize("value", ["0.5", True, None, [0.5]])
def test_non_numbers_are_refused(value: object) -> None:
    with pytest.raises(ConfigError, match=r"gamma = .* is not a number; use a number in \[0.01"):
        lr_factor("exponential", 0, 10, gamma=value)


def test_range_ends_are_valid() -> None:
    for decay in DECAY_TYPES:
        for params in _corner_params(decay):
            lr_factor(decay, 3, 10, **params)


@pytest.mark.parametrize(("epoch", "total"), [(-1, 10), (0, 0), (3, -5)])
def test_bad_epochs_are_a_callers_bug(epoch: int, total: int) -> None:
    with pytest.raises(ValueError, match="epoch"):
        lr_factor("constant", epoch, total)

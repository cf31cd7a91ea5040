"""Property-based tests: whatever a user writes or a disk holds, tlopt raises only its own errors.

Two inputs reach tlopt straight from the user: study files and image files. Hypothesis writes
random TOML study files (random values and types for every known key, random unknown keys,
tables where values belong and the reverse) and random mutations of valid JPEG and PNG files
(byte flips, truncations, insertions, deletions). The config parser must return a valid
config or raise a :class:`~tlopt.errors.TloptError`; the image loader must return an RGB
image or raise :class:`~tlopt.errors.BadImage`. Anything else would reach the user as a
traceback.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from tlopt.config import StudyConfig, load_config
from tlopt.data.images import load_rgb
from tlopt.errors import BadImage, ConfigError, TloptError

FUZZ = settings(
    max_examples=int(os.environ.get("TLOPT_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# --- a small TOML writer (tomllib reads; the standard library has no writer) -----------------


def toml_key(key: str) -> str:
    return toml_string(key)


def toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: dict[str, Any]) -> str:
    """One line per top-level key; tables are written inline (valid TOML, any nesting)."""
    return "".join(f"{toml_key(k)} = {toml_value(v)}\n" for k, v in doc.items())


def test_toml_writer_round_trips() -> None:
    import tomllib

    doc = {"a": [1, 2.5, 'x\u0000"\\é\x7f'], "b": {"c": float("inf"), "d": dt.date(2020, 1, 2)}}
    assert tomllib.loads(toml_document(doc)) == doc


# --- strategies over study files --------------------------------------------------------------

SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, 3, 8, 16, 32, -1, 10**6, 2**40]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.1, 0.5, 0.95, 1.0, 1e-3, 1e-5, 10.0, -0.5]),
    st.text(max_size=12),
    st.booleans(),
    st.dates(),
)
VALUES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=4),
    st.dictionaries(st.text(max_size=6), SCALARS, max_size=3),
)

DECAYS = ["constant", "step", "polynomial", "exponential", "inverse_time", "cosine", "linear"]
# Per key: plausible values (so that the parser's deeper checks run), mixed with anything.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "source": st.sampled_from(["folder", "digits", "cifar10", "imagenet", ""]),
    "path": st.sampled_from(["data", "/nonexistent", "~/x", "a\u0000b", "", "."]),
    "backbone": st.sampled_from(["resnet18", "test_efficientnet", "resnet33", "", "a" * 300]),
    "weights": st.sampled_from(["none", "pretrained", "bundled", "file:", "file:x.pth", "pre"]),
    "batch_size": st.lists(st.sampled_from([8, 16, 32, 12, 0, -8, 2**40]), max_size=4),
    "epochs": st.lists(st.integers(-3, 20_000), max_size=3),
    "decay": st.lists(st.sampled_from(DECAYS), max_size=3),
    "optimizer": st.lists(st.sampled_from(["adam", "sgd", "adamw", "rmsprop", "lion"]), max_size=3),
    "lr": st.one_of(
        st.lists(st.floats(allow_nan=True), max_size=3),
        st.fixed_dictionaries(
            {"low": SCALARS, "high": SCALARS}, optional={"log": SCALARS, "step": SCALARS}
        ),
    ),
    "type": st.sampled_from(
        ["median", "percentile", "successive_halving", "hyperband", "threshold", "patient", "nop"]
    ),
}
KEYS: dict[str, list[str]] = {
    "data": ["source", "path", "image_size", "val_fraction", "test_fraction", "max_bad_fraction"],
    "model": ["backbone", "weights", "freeze_modules"],
    "search": [
        "batch_size",
        "epochs",
        "decay",
        "decay_params",
        "lr",
        "optimizer",
        "dropout",
        "weight_decay",
        "momentum",
        "patience",
        "flip",
        "bn_train",
        "cut",
    ],
    "pruner": [
        "type",
        "n_startup_trials",
        "n_warmup_steps",
        "options",
        "percentile",
        "lower",
        "upper",
        "patience",
        "min_resource",
        "reduction_factor",
    ],
    "storage": [
        "url",
        "artifacts",
        "heartbeat_interval",
        "grace_period",
        "max_retry",
        "checkpoint",
    ],
}
UNKNOWN = st.text(min_size=1, max_size=10)


def value_for(key: str) -> st.SearchStrategy[Any]:
    return st.one_of(PLAUSIBLE[key], VALUES) if key in PLAUSIBLE else VALUES


@st.composite
def tables(draw: st.DrawFn, keys: list[str]) -> dict[str, Any]:
    chosen = draw(st.lists(st.sampled_from(keys), unique=True, max_size=len(keys)))
    table = {key: draw(value_for(key)) for key in chosen}
    if "decay_params" in table and draw(st.booleans()):
        table["decay_params"] = draw(
            st.dictionaries(
                st.sampled_from(DECAYS),
                st.dictionaries(
                    st.sampled_from(["step_size", "gamma", "power", "end_factor", "rate", "x"]),
                    VALUES,
                    max_size=3,
                ),
                max_size=2,
            )
        )
    for key in draw(st.lists(UNKNOWN, max_size=2)):  # typos and keys from nowhere
        table.setdefault(key, draw(VALUES))
    return table


@st.composite
def study_documents(draw: st.DrawFn) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key in draw(
        st.lists(
            st.sampled_from(["name", "seed", "n_trials", "timeout", "description"]), unique=True
        )
    ):
        doc[key] = draw(
            st.one_of(st.sampled_from(["demo", "a/b", ""]), VALUES) if key == "name" else VALUES
        )
    for name, keys in KEYS.items():
        if draw(st.integers(0, 9)) == 0:
            doc[name] = draw(VALUES)  # a value where a table belongs
        elif draw(st.booleans()):
            doc[name] = draw(tables(keys))
    if draw(st.booleans()):
        stage = st.one_of(
            st.sampled_from(["head", "freeze1", "freeze2", "full", "scratch", "freez1"]), UNKNOWN
        )
        doc["stages"] = draw(
            st.dictionaries(stage, st.one_of(tables(KEYS["search"]), VALUES), max_size=2)
        )
    for key in draw(st.lists(UNKNOWN, max_size=2)):
        doc.setdefault(key, draw(VALUES))
    return doc


def check_config_file(path: Path) -> None:
    """load_config returns a storable config, or raises ConfigError with one line per problem."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        lines = str(exc).splitlines()
        assert lines and all(line.startswith(f"{path}: ") for line in lines), str(exc)
        return
    except TloptError:
        return
    # A config that loads must go into the study's attributes (JSON) and come back the same.
    snapshot = json.loads(json.dumps(config.to_dict(), allow_nan=False))
    assert StudyConfig.from_dict(snapshot) == config


@FUZZ
@given(doc=study_documents())
@example(doc={"stages": {"freeze" + "9" * 5000: {}}})
@example(doc={"data": {"source": "folder", "path": "a\u0000b"}})
@example(doc={"data": {"source": "folder", "path": "~no_such_user_tlopt/x"}})
@example(doc={"data": {"source": "digits", "\x1e": 1}, "\n": 0})
@example(doc={"pruner": {"type": "threshold", "lower": dt.date(2020, 1, 1)}})
@example(doc={"pruner": {"type": "median", "options": "x"}})
@example(doc={"search": {"lr": {"low": 1e-5, "high": 1e-2, "log": "yes"}}})
@example(doc={"data": {"source": "digits"}, "timeout": float("inf")})
def test_config_parser_raises_only_tlopt_errors(tmp_path: Path, doc: dict[str, Any]) -> None:
    path = tmp_path / "study.toml"
    path.write_text(toml_document(doc), encoding="utf-8")
    check_config_file(path)


@FUZZ
@given(text=st.text(max_size=200))
@example(text="[data\n")
@example(text="a = 1\na = 2\n")
def test_any_text_as_a_study_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "study.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_config_file(path)


def test_study_file_that_is_not_utf8_or_a_folder(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'name = "caf\xe9"\n')
    check_config_file(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path)  # a folder, not a file


# --- image bytes ------------------------------------------------------------------------------


def _encoded(fmt: str, mode: str = "RGB", **options: Any) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    img.save(buffer, fmt, **options)
    return buffer.getvalue()


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    return _encoded("JPEG", exif=exif.tobytes())


SEEDS = {
    "jpeg": _encoded("JPEG"),
    "progressive-jpeg": _encoded("JPEG", progressive=True),
    "exif-jpeg": _exif_jpeg(),
    "cmyk-jpeg": _encoded("JPEG", "CMYK"),
    "png": _encoded("PNG"),
    "rgba-png": _encoded("PNG", "RGBA"),
    "palette-png": _encoded("PNG", "P"),
    "grey-png": _encoded("PNG", "L"),
}


@st.composite
def mutated_images(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[kind])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 64))]
    return kind, bytes(data)


def check_image(path: Path) -> None:
    try:
        img = load_rgb(path)
    except BadImage as exc:
        assert exc.reason and "\n" not in exc.reason and str(path) in str(exc)
        return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    assert np.asarray(img).shape == (img.height, img.width, 3)


@FUZZ
@given(case=mutated_images())
def test_image_loader_raises_only_bad_image(tmp_path: Path, case: tuple[str, bytes]) -> None:
    kind, data = case
    path = tmp_path / ("x.png" if "png" in kind else "x.jpg")
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's own notes on damaged metadata are fine
        check_image(path)


@FUZZ
@given(
    data=st.binary(max_size=64), prefix=st.sampled_from([b"", *[s[:24] for s in SEEDS.values()]])
)
def test_random_bytes_with_an_image_header(tmp_path: Path, data: bytes, prefix: bytes) -> None:
    assume(prefix or data)
    path = tmp_path / "x.jpg"
    path.write_bytes(prefix + data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_image(path)


def test_unmutated_seeds_load(tmp_path: Path) -> None:
    for kind, data in SEEDS.items():
        path = tmp_path / f"{kind}.img"
        path.write_bytes(data)
        img = load_rgb(path)
        assert img.mode == "RGB"
        assert img.size == ((12, 16) if kind == "exif-jpeg" else (16, 12)), kind

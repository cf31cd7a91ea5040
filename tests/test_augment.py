"""Random-resized-crop augmentation (crop_scale): the crop itself, the config, the loop."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_trainer import digits, run  # noqa: F401  (the module-scoped fixture)
from tlopt.config import SearchSpace, load_config
from tlopt.errors import ConfigError
from tlopt.train.data import ImageSet, random_resized_crop


def _ramp(n: int, h: int, w: int) -> torch.Tensor:
    """Images whose value at each pixel is its column: a crop shows which columns it kept."""
    return torch.arange(w, dtype=torch.float32).expand(n, 3, h, w).contiguous()


def test_a_crop_is_a_resized_part_of_its_image() -> None:
    n, h, w, min_scale = 64, 24, 32, 0.3
    x = _ramp(n, h, w)
    out = random_resized_crop(x, min_scale, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    rows = out[:, 0, 0, :]
    assert bool((rows.diff(dim=1) >= -1e-5).all())  # columns stay in order: no flip, no wrap
    assert float(rows.min()) >= -1e-5 and float(rows.max()) <= w - 1 + 1e-5
    # The widest possible box spans every column; the narrowest keeps sqrt(0.3 * 3/4) of them.
    span = rows[:, -1] - rows[:, 0]
    assert float(span.min()) >= math.sqrt(min_scale * 3 / 4) * w - 2
    assert float(span.max()) <= w - 1 + 1e-5
    assert float(span.std()) > 0.5  # boxes differ from image to image
    constant = torch.full((4, 3, h, w), 0.25)
    assert torch.allclose(random_resized_crop(constant, 0.1, torch.Generator()), constant)


def test_crops_follow_the_generator() -> None:
    x = torch.randn(8, 3, 16, 16)
    a = random_resized_crop(x, 0.5, torch.Generator().manual_seed(1))
    b = random_resized_crop(x, 0.5, torch.Generator().manual_seed(1))
    c = random_resized_crop(x, 0.5, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_crop_scale_in_the_study_file(tmp_path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "s"\n[data]\nsource = "digits"\n[stages.freeze1]\ncrop_scale = [0.35, 1.0]\n'
    )
    config = load_config(path)
    assert config.space_for("freeze1").crop_scale == (0.35, 1.0)
    assert config.space_for("head").crop_scale == SearchSpace().crop_scale == (1.0,)
    path.write_text('name = "s"\n[data]\nsource = "digits"\n[search]\ncrop_scale = [0]\n')
    with pytest.raises(ConfigError, match="crop_scale"):
        load_config(path)


def test_crops_bypass_the_frozen_feature_cache(
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
) -> None:
    """A crop changes what the frozen prefix sees, so cropped inputs run it every step."""
    from tlopt.models.backbones import create_backbone
    from tlopt.models.split import SplitModel
    from tlopt.models.stages import apply_stage, parse_stage
    from tlopt.train.feature_cache import FeatureCache
    from tlopt.train.inputs import Inputs

    model = create_backbone("test_efficientnet", "none", num_classes=10)
    apply_stage(model, parse_stage("freeze1"))
    split = SplitModel(model.eval(), int(digits[0].images.shape[1]))
    assert split.has_prefix
    assert Inputs(split, digits[0], True, FeatureCache()).cached is not None
    cropped = Inputs(split, digits[0], True, FeatureCache(), crop_scale=0.5)
    assert cropped.cached is None
    index = torch.arange(8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        one, two = cropped.get(index, None, generator), cropped.get(index, None, generator)
    assert one.shape == two.shape and not torch.equal(one, two)  # new crops every step


def test_fit_with_crops_is_seeded(
    digits: tuple[ImageSet, ImageSet],  # noqa: F811
) -> None:
    a = run("freeze1", digits, crop_scale=0.5)
    b = run("freeze1", digits, crop_scale=0.5)
    plain = run("freeze1", digits)
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    assert [r.train_loss for r in a.history] != [r.train_loss for r in plain.history]
    assert all(math.isfinite(r.val_loss) for r in a.history)

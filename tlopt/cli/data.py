"""``tlopt data`` and ``tlopt model``: look at a data folder and at a backbone."""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from tlopt.cli.apps import data_app, model_app
from tlopt.cli.common import JsonOpt, print_json
from tlopt.errors import TloptError


@data_app.command("check")
def data_check(
    path: Annotated[
        str | None, typer.Argument(help="Image folder or CIFAR-10 batches folder.")
    ] = None,
    source: Annotated[str, typer.Option(help="folder, digits or cifar10.")] = "folder",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    as_json: JsonOpt = False,
) -> None:
    """Classes, counts per split, image sizes, and every unreadable file with its reason."""
    from tlopt.data.check import check_source, format_report

    if source == "folder" and path is None:
        raise TloptError("tlopt data check needs a PATH (or --source digits)")
    report = check_source(
        source, path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
    )
    if as_json:
        print_json(dataclasses.asdict(report))
        return
    typer.echo(format_report(report))


@model_app.command("list")
def model_list(
    pattern: Annotated[str, typer.Argument(help="Wildcard, e.g. 'resnet*'.")] = "*",
    pretrained: Annotated[bool, typer.Option(help="Only models with pretrained weights.")] = False,
) -> None:
    """List timm backbones."""
    import timm

    for name in timm.list_models(pattern, pretrained=pretrained):
        typer.echo(name)


@model_app.command("summary")
def model_summary(
    name: str,
    weights: Annotated[str, typer.Option(help="none, pretrained, bundled or file:PATH.")] = "none",
    classes: Annotated[int, typer.Option(help="Outputs of the new head.")] = 2,
    image_size: int = 224,
) -> None:
    """The model with and without its head, and per stage the frozen groups and trainable count."""
    from tlopt.models.backbones import create_backbone
    from tlopt.models.summary import summary_text

    if classes < 2:
        raise TloptError(f"--classes {classes}: a classifier needs at least 2 classes")
    model = create_backbone(name, weights, num_classes=classes)
    typer.echo(summary_text(model, name, image_size))

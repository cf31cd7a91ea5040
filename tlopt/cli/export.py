"""``tlopt export-best``, ``tlopt extract`` and ``tlopt predict``: the tuned model and its use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tlopt.cli.apps import app
from tlopt.cli.common import (
    BatchOpt,
    DeviceOpt,
    ImagesOpt,
    JsonOpt,
    ModelDirOpt,
    StorageOpt,
    print_json,
)


@app.command("export-best")
def export_best(
    study: Annotated[str, typer.Option(help="Study name.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    storage: StorageOpt = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda or auto.")] = None,
    force: Annotated[
        bool, typer.Option(help="Replace tlopt's files in a non-empty --out.")
    ] = False,
    retrain: Annotated[
        bool,
        typer.Option(help="Retrain the trial even when its study kept the weights it trained."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the best trial (its kept weights, or retrained): model, history, metrics, plots
    and descriptors."""
    from tlopt.export.bundle import export_best as run

    manifest = run(study, out, storage, device, force, retrain)
    if as_json:
        metrics = json.loads((out / "metrics.json").read_text())
        keep = (
            "study",
            "stage",
            "trial",
            "params",
            "tuned_value",
            "retrained_value",
            "weights_from",
        )
        print_json(
            {
                **{k: manifest[k] for k in keep},
                "out": str(out.resolve()),
                "files": {name: str((out / name).resolve()) for name in manifest["files"]},
                "metrics": metrics,
            }
        )
        return
    how = "retrained" if manifest["weights_from"] == "retrained" else "its own weights"
    typer.echo(f"exported trial {manifest['trial']} of '{study}' ({how}) to {out}")
    typer.echo(
        f"  tuned val_loss {manifest['tuned_value']:.4f}, retrained "
        f"{manifest['retrained_value']:.4f}; {manifest['evaluated_split']} accuracy "
        f"{manifest['accuracy']:.4f}"
    )


@app.command("extract")
def extract(
    model: ModelDirOpt,
    images: ImagesOpt,
    out: Annotated[Path, typer.Option(help="Output .npy; a .csv of paths goes beside it.")],
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 128,
) -> None:
    """Write descriptors (pooled vectors before the classifier) for every image in a folder."""
    from tlopt.export.extract import extract_folder

    count, skipped = extract_folder(model, images, out, device, batch_size)
    typer.echo(
        f"wrote {count} descriptors to {out}"
        + (f"; skipped {skipped} unreadable files" if skipped else "")
    )


@app.command("predict")
def predict(
    model: ModelDirOpt,
    images: ImagesOpt,
    out: Annotated[Path, typer.Option(help="Output CSV: path, class, one probability per class.")],
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 128,
    as_json: JsonOpt = False,
) -> None:
    """Predict the class of every image, prepared as the model was trained."""
    from tlopt.export.predict import predict_images

    summary = predict_images(model, images, out, device, batch_size)
    if as_json:
        print_json(summary)
        return
    typer.echo(f"wrote {summary['count']} predictions to {out} (on {summary['device']})")
    typer.echo("  " + ", ".join(f"{k}: {v}" for k, v in summary["class_counts"].items()))
    if summary["skipped"]:
        typer.echo(f"  skipped {summary['skipped']} unreadable files (warnings above)")

"""``export-best``: retrain the best trial and write everything a person needs to reuse it.

The folder holds::

    model/            config.json + model.safetensors (timm's format: load with
                      tlopt.load_model(DIR) or timm.create_model("local-dir:DIR/model"))
    history.csv/json  per-epoch train/val loss and accuracy, learning rate, seconds
    metrics.json      accuracy, macro/weighted precision/recall/F1, per-class report, confusion
    classification_report.txt
    loss.png accuracy.png lr.png confusion_matrix.png
    descriptors.npy   (N, D) float32, one row per image of every split
    descriptors.csv   row, path, label, class, split (path: relative to the data folder, or
                      "digits/0123" for a built-in set)
    manifest.json     params, seed, versions, data fingerprint, tuned vs retrained value
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import timm
import torch
from optuna.artifacts import download_artifact
from safetensors.torch import load_file, save_file
from timm.models import save_for_hf
from torch import nn

import tlopt
from tlopt.errors import TloptError
from tlopt.models.backbones import classifier_name, create_backbone, data_config
from tlopt.models.cut import CutModel
from tlopt.models.stages import set_train_mode
from tlopt.names import ATTR, FIRST_HEAD, HEAD
from tlopt.plots import confusion_plot, history_plots
from tlopt.progress import bar
from tlopt.train.data import ImageSet
from tlopt.train.descriptors import predict
from tlopt.train.ledger import EpochRecord, FitResult
from tlopt.train.metrics import classification_metrics
from tlopt.tune import continuation
from tlopt.tune.context import StudyContext
from tlopt.tune.continuation import WEIGHTS
from tlopt.tune.runner import TrialRun, log_epoch, train_setup
from tlopt.tune.space import TrialSetup, suggest
from tlopt.tune.study import best_trial, load

log = logging.getLogger("tlopt.export")

FILES = (
    "model/config.json",
    "model/model.safetensors",
    "history.csv",
    "history.json",
    "metrics.json",
    "classification_report.txt",
    "loss.png",
    "accuracy.png",
    "lr.png",
    "confusion_matrix.png",
    "descriptors.npy",
    "descriptors.csv",
    "manifest.json",
)


def _prepare_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TloptError(f"--out '{out}' is a file: pass a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise TloptError(
            f"output folder '{out}' is not empty: choose another --out, or pass --force to "
            "replace tlopt's files in it"
        )
    out.mkdir(parents=True, exist_ok=True)


def export_best(
    study_name: str,
    out: Path,
    storage_url: str | None = None,
    device: str | None = None,
    force: bool = False,
    retrain: bool = False,
    trial: optuna.trial.FrozenTrial | None = None,
) -> dict[str, Any]:
    """Export the best trial of ``study_name`` (or ``trial``, chosen by the caller once) to
    ``out``: the weights it trained, when its study kept them (``tlopt.weights``; a head
    trial's head), else (or with ``retrain``) retrained with the study's seed.

    The files are written beside ``out`` and moved into place whole, the manifest last: a kill
    at any moment leaves the old export or the new one, never a mix (:func:`recover`)."""
    study = load(study_name, storage_url)
    best = trial if trial is not None else best_trial(study)
    out = out.expanduser().resolve()  # its parent holds the new export until the swap
    recover(out)
    _prepare_out(out, force)
    # From the head the trial started from (trials before heads were recorded: the study's first).
    head = best.user_attrs.get(HEAD) or study.user_attrs.get(FIRST_HEAD)
    ctx = StudyContext.open(study, device, progress=True, head=head)
    replay = optuna.trial.FixedTrial(best.params, best.number)
    setup = suggest(replay, ctx.space, ctx.stage.name)
    grows = continuation.of(best)  # a continuation retrains from its parent's kept weights

    shown = bar(total=setup.params.epochs, desc=f"export-best trial {best.number}", unit="epoch")

    def on_epoch(record: EpochRecord, _checkpoint: object) -> None:
        log_epoch(replay, record, setup.params.epochs)
        if record.epoch > 0:
            shown.update(1)
            shown.set_postfix(loss=f"{record.val_loss:.4f}", acc=f"{record.val_accuracy:.4f}")

    run = None if retrain else _kept(best, ctx, setup)
    if run is None:
        start = None
        if grows is not None:
            setup, start = continuation.start(grows, ctx, setup)
            shown.total = setup.params.epochs
        with shown:
            run = train_setup(setup, ctx, on_epoch, start_state=start)
    else:
        shown.close()
    params, dropout, result, model = run.params, run.dropout, run.result, run.model
    history = [r.as_dict() for r in result.history]
    evaluated = "test" if ctx.has_split("test") else "val"
    # One pass over every image: the descriptors, and the evaluated split's logits from them.
    every = ImageSet.from_arrays(np.asarray(ctx.images), ctx.labels, ctx.mean, ctx.std, ctx.device)
    descriptors, all_logits = predict(model, every)
    logits = all_logits[np.asarray(ctx.index[evaluated])]
    y_true = ctx.split(evaluated).labels.cpu().numpy()
    metrics = classification_metrics(y_true, logits.argmax(1), ctx.classes)
    metrics["split"] = evaluated

    stage = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.new-"))
    try:
        _write_model(model, stage / "model", ctx)
        _write_history(history, stage)
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (stage / "classification_report.txt").write_text(_report_text(metrics))
        title = f"{study_name} (trial {best.number})"
        history_plots(history, stage, title)
        confusion_plot(
            metrics["confusion_matrix"],
            ctx.classes,
            stage / "confusion_matrix.png",
            f"{title}: {evaluated} confusion matrix",
        )
        _write_descriptors(descriptors, ctx, stage)
        manifest = {
            "study": study_name,
            "stage": ctx.stage.name,
            "trial": best.number,
            "identity": trial_identity(best),
            "params": best.params,
            "train_params": {**dataclasses.asdict(params), "dropout": dropout},
            "seed": ctx.config.seed,
            "backbone": ctx.config.model.backbone,
            "weights": ctx.config.model.weights,
            "image_size": ctx.config.data.image_size,
            "preprocessing": _data_config(ctx),
            "data_path": str(ctx.source.root) if ctx.source.root is not None else None,
            "classes": ctx.classes,
            "data_fingerprint": ctx.source.fingerprint,
            "tuned_value": best.value,
            "tuned_val_accuracy": best.user_attrs.get("val_accuracy"),
            "weights_from": "retrained" if run.retrained else "the trial",
            "retrained_value": result.best_val_loss,
            "retrained_val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch,
            "evaluated_split": evaluated,
            "accuracy": metrics["accuracy"],
            "versions": {
                "tlopt": tlopt.__version__,
                "torch": torch.__version__,
                "timm": timm.__version__,
                "optuna": optuna.__version__,
                "python": platform.python_version(),
            },
            "files": list(FILES),
        }
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
        _swap(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def trial_identity(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """What names this trial and no other, also after its study is deleted and made again
    (trial numbers restart; SQLite may hand out a deleted row's id again; an artifact id is a
    uuid): an export records it, and is current while the storage holds the same."""
    weights = trial.user_attrs.get(WEIGHTS) or trial.user_attrs.get(ATTR + "head_artifact")
    # FrozenTrial has no public id: ``_trial_id`` is the storage's key of the trial, the one
    # handle that survives renumbering (Optuna's own storages and callbacks use it).
    return {"trial_id": trial._trial_id, "weights": weights,
            "completed": str(trial.datetime_complete)}  # fmt: skip


def _swap(new: Path, out: Path) -> None:
    """Put the folder ``new`` in the place of ``out`` by two renames; what else ``out`` held
    (the user's own files) moves into the new folder first."""
    for item in out.iterdir():
        if not (new / item.name).exists():
            item.replace(new / item.name)
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    out.replace(old)
    new.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def recover(out: Path) -> None:
    """An export killed between its two renames: the old one back in its place."""
    old = out.parent / f".{out.name}.old"
    if old.is_dir() and not out.exists():
        old.replace(out)


def _kept(best: optuna.trial.FrozenTrial, ctx: StudyContext, setup: TrialSetup) -> TrialRun | None:
    """The trial's own trained weights and history, when its study kept them (None: lost or
    never kept, e.g. a trial finished before they were): no retrain, the measured model."""
    artifact = best.user_attrs.get(WEIGHTS) or best.user_attrs.get(ATTR + "head_artifact")
    history = best.user_attrs.get("history")
    if not artifact or not history or "best_epoch" not in best.user_attrs:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "weights.safetensors"
            download_artifact(
                artifact_store=ctx.artifacts, file_path=str(path), artifact_id=artifact
            )
            state = load_file(str(path))
    except Exception as exc:  # a lost artifact costs a retrain, not the export
        log.warning("the weights of trial %d are unreadable (%s): retraining it", best.number,
                    type(exc).__name__)  # fmt: skip
        return None
    model = ctx.build_model(setup.dropout, setup.cut)
    if WEIGHTS in best.user_attrs:
        model.load_state_dict(state, strict=False)
    else:  # a head trial kept its head
        model.get_submodule(classifier_name(model)).load_state_dict(state)
    set_train_mode(model, False)
    records = [EpochRecord(**r) for r in history]
    epoch = int(best.user_attrs["best_epoch"])
    accuracy = float(best.user_attrs.get("val_accuracy") or 0.0)
    result = FitResult(records, epoch, float(best.value or 0.0), accuracy, state)
    log.info("export-best: trial %d's own weights (no retrain)", best.number)
    return TrialRun(setup.params, setup.dropout, result, model, retrained=False)


def _data_config(ctx: StudyContext) -> dict[str, Any]:
    """The preprocessing the model trained with: its image size, crop, mean and std."""
    return data_config(ctx.config.data.image_size, ctx.mean, ctx.std)


def _write_model(model: nn.Module, folder: Path, ctx: StudyContext) -> None:
    """timm's format, with the trained preprocessing in ``pretrained_cfg``."""
    folder.mkdir()
    cpu = model.to("cpu").to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if isinstance(cpu, CutModel):
        # timm cannot describe a cut backbone; tlopt.load_model rebuilds it from this config.
        config = {
            "architecture": ctx.config.model.backbone,
            "tlopt_cut": cpu.cut,
            "num_classes": len(ctx.classes),
            "label_names": ctx.classes,
            "pretrained_cfg": {
                **{k: v for k, v in cpu.pretrained_cfg.items() if k != "state_dict"},
                **_data_config(ctx),
                "num_classes": len(ctx.classes),
                "label_names": ctx.classes,
            },
        }
        (folder / "config.json").write_text(json.dumps(config, indent=2, default=list))
        state = {k: v.contiguous() for k, v in cpu.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"))
        model.to(ctx.device)
        return
    save_for_hf(
        cpu,
        str(folder),
        model_config={"label_names": ctx.classes, "num_classes": len(ctx.classes)},
        safe_serialization=True,
        data_config=_data_config(ctx),
    )
    model.to(ctx.device)


def _write_history(history: list[dict[str, Any]], folder: Path) -> None:
    (folder / "history.json").write_text(json.dumps(history, indent=2))
    with open(folder / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]) if history else ["epoch"])
        writer.writeheader()
        writer.writerows(history)


def _report_text(metrics: dict[str, Any]) -> str:
    lines = [f"{'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for name, row in metrics["per_class"].items():
        lines.append(
            f"{name:<24}{row['precision']:>10.4f}{row['recall']:>10.4f}"
            f"{row['f1']:>10.4f}{row['support']:>10d}"
        )
    lines.append("")
    lines.append(
        f"accuracy {metrics['accuracy']:.4f} on {metrics['count']} images "
        f"({metrics['split']} split)"
    )
    for avg in ("macro", "weighted"):
        lines.append(
            f"{avg:<9} precision {metrics[f'precision_{avg}']:.4f}  "
            f"recall {metrics[f'recall_{avg}']:.4f}  f1 {metrics[f'f1_{avg}']:.4f}"
        )
    return "\n".join(lines) + "\n"


def _write_descriptors(descriptors: np.ndarray, ctx: StudyContext, folder: Path) -> None:
    """One row per image of the source, in the source's order."""
    np.save(folder / "descriptors.npy", descriptors.astype(np.float32))
    with open(folder / "descriptors.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", "path", "label", "class", "split"])
        for row, item in enumerate(ctx.source.items):
            writer.writerow([row, item.key, item.label, ctx.classes[item.label], item.split])


def model_folder(path: str | Path) -> Path:
    """The ``model/`` folder of an export (or ``path`` itself when it is that folder)."""
    folder = Path(path)
    if not folder.is_dir():
        raise TloptError(
            f"model folder '{path}' does not exist: pass the folder written by "
            "'tlopt export-best --out'"
        )
    folder = folder / "model" if (folder / "model" / "config.json").is_file() else folder
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise TloptError(
            f"'{path}' is not a tlopt export (no model/config.json and model.safetensors): pass "
            "the folder written by 'tlopt export-best --out'"
        )
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    """``config.json`` of a model folder; a tlopt export names its classes there."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TloptError(
            f"cannot read '{folder / 'config.json'}' ({type(exc).__name__}): export the model "
            "again with 'tlopt export-best'"
        ) from None
    if not isinstance(config, dict) or not config.get("label_names"):
        raise TloptError(
            f"'{folder / 'config.json'}' names no classes (label_names): it was not written by "
            "'tlopt export-best'; export the model with it"
        )
    return config


def load_model(path: str | Path) -> nn.Module:
    """A model exported by ``export-best``, in eval mode, with ``label_names`` in its config."""
    folder = model_folder(path)
    config = read_config(folder)
    try:
        if "tlopt_cut" in config:
            model = create_backbone(
                config["architecture"], "none", config["num_classes"], cut=config["tlopt_cut"]
            )
            model.load_state_dict(load_file(str(folder / "model.safetensors")))
            model.pretrained_cfg = config["pretrained_cfg"]
        else:
            model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    except TloptError:
        raise
    except Exception as exc:  # timm and safetensors raise many kinds on a damaged export
        raise TloptError(
            f"cannot load the model in '{folder}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): export it again with "
            "'tlopt export-best'"
        ) from None
    model.eval()
    return model

"""The report's figures: one function per figure, each returning a matplotlib Figure.

A figure that cannot be drawn from the study raises :class:`Unavailable` with a sentence that
says why; the page shows that sentence instead. Every figure is drawn inside :func:`style`, so
they look alike, and a decay type has the same colour in every figure.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from tlopt.report.collect import SETTINGS, StudyView, TrialView  # noqa: E402

# Fixed colours per decay type (one for each schedule tlopt knows), so that "exponential" is
# the same red in the curves, the overfitting and the wall-time figures of every study.
DECAY_COLOURS = {
    "constant": "#4d4d4d",
    "step": "#1f77b4",
    "polynomial": "#2ca02c",
    "exponential": "#d62728",
    "inverse_time": "#9467bd",
    "cosine": "#ff7f0e",
}
STAGE_COLOURS = {"head": "#8c564b", "freeze1": "#17becf", "freeze2": "#1f77b4", "full": "#2ca02c"}
PRUNED_STYLE: dict[str, Any] = {"linestyle": "--", "linewidth": 1.0, "alpha": 0.55}
WIDE = (10.0, 3.8)  # inches; at 100 dpi the page shows them at their natural size


class Unavailable(Exception):
    """A figure cannot be drawn; the message says why, in a sentence a reader understands."""


@contextlib.contextmanager
def style() -> Iterator[None]:
    """One look for every figure (Optuna's plots switch to ggplot globally; keep it local)."""
    with (
        plt.style.context("ggplot"),
        plt.rc_context({"figure.dpi": 100, "font.size": 10, "axes.formatter.useoffset": False}),
    ):
        yield


def setting_colours(key: str, values: Sequence[Any]) -> dict[Any, str]:
    """Colours of a setting's values: fixed per decay type; ordered (viridis) for numbers."""
    if key == "decay":
        spare = iter(plt.get_cmap("tab10").colors[5:])  # type: ignore[attr-defined]
        return {v: DECAY_COLOURS.get(v) or to_hex(next(spare)) for v in values}
    ordered = sorted(values)
    cmap = plt.get_cmap("viridis")
    steps = np.linspace(0.05, 0.85, len(ordered)) if len(ordered) != 1 else [0.35]
    return {v: to_hex(cmap(s)) for v, s in zip(ordered, steps, strict=True)}


def stage_colour(stage: str, index: int) -> str:
    if stage in STAGE_COLOURS:
        return STAGE_COLOURS[stage]
    return to_hex(plt.get_cmap("Set2")(index % 8))


def curves_by(view: StudyView, key: str) -> Figure:
    """Validation loss and accuracy per epoch of every trial, coloured by one setting."""
    trials = [t for t in view.trials if t.history and t.setting.get(key) is not None]
    if not trials:
        raise Unavailable("No finished trial has a recorded history yet.")
    values = sorted({t.setting[key] for t in trials}, key=str)
    colours = setting_colours(key, values)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    for t in trials:
        epochs = [h["epoch"] for h in t.history]
        extra: dict[str, Any] = PRUNED_STYLE if t.pruned else {"linewidth": 1.6, "alpha": 0.9}
        colour = colours[t.setting[key]]
        loss_ax.plot(epochs, [h["val_loss"] for h in t.history], color=colour, **extra)
        acc = [100 * h["val_accuracy"] for h in t.history]
        acc_ax.plot(epochs, acc, color=colour, **extra)
    _clip_top(loss_ax, [h["val_loss"] for t in trials for h in t.history])
    loss_ax.set(title="validation loss", xlabel="epoch", ylabel="cross-entropy (nats)")
    acc_ax.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    _integer_x(loss_ax, acc_ax)
    label = SETTINGS[key]
    handles = [
        Line2D([], [], color=colours[v], linewidth=2, label=f"{v} ({_count(trials, key, v)})")
        for v in values
    ]
    if any(t.pruned for t in trials):
        handles.append(Line2D([], [], color="black", label="pruned trial", **PRUNED_STYLE))
    fig.legend(handles=handles, title=f"{label} (trials)", loc="outside right upper")
    fixed = " (fixed by the study)" if len(values) == 1 else ""
    fig.suptitle(f"{view.name}: validation curves by {label}{fixed}")
    return fig


def importances(view: StudyView) -> Figure:
    """Optuna's fANOVA importance of each searched parameter for the validation loss."""
    _need_searched_params(view, "importance")
    try:
        # fANOVA named, not Optuna's default evaluator (PED-ANOVA since Optuna 5): the axis
        # label says what the bars are, and a seeded forest draws the same bars every time.
        ax = optuna.visualization.matplotlib.plot_param_importances(
            view.study,
            evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
            target_name="validation loss",
        )
    except (RuntimeError, ValueError) as exc:
        raise Unavailable(f"Optuna could not compute the importances ({exc}).") from None
    ax.set_title(f"{view.name}: parameter importance for the validation loss", loc="left")
    ax.set_xlabel("importance (fANOVA, share of the loss variance; sums to 1)")
    ax.set_ylabel("parameter")
    legend = ax.get_legend()
    if legend is not None:
        legend.remove()  # one bar per parameter: the legend would repeat the title
    fig = _figure(ax)
    fig.set_size_inches(WIDE[0], max(2.6, 1.2 + 0.45 * len(ax.get_yticks())))
    fig.tight_layout()
    return fig


def slices(view: StudyView) -> Figure:
    """Optuna's slice plot: the validation loss of every complete trial against each parameter."""
    _need_searched_params(view, "slice")
    axes = optuna.visualization.matplotlib.plot_slice(view.study, target_name="validation loss")
    axes_list: list[Axes] = list(np.ravel(axes))  # type: ignore[arg-type]
    fig = _figure(axes_list[0])
    for i, ax in enumerate(axes_list):
        ax.set_ylabel("validation loss (nats)" if i == 0 else "")
    fig.set_size_inches(min(16.0, 1.5 + 2.6 * len(axes_list)), WIDE[1])
    fig.suptitle(f"{view.name}: validation loss against each parameter (colour: trial number)")
    return fig


def history(view: StudyView) -> Figure:
    """Optuna's optimization history, with the pruned trials marked where they stopped."""
    if not view.complete:
        raise Unavailable("No complete trial yet: the history needs at least one.")
    ax = optuna.visualization.matplotlib.plot_optimization_history(
        view.study, target_name="complete trial (its best val loss)"
    )
    pruned = [(t.number, t.last_val_loss) for t in view.pruned if t.last_val_loss is not None]
    if pruned:
        x, y = zip(*pruned, strict=True)
        ax.scatter(x, y, marker="x", color="#7f7f7f", s=40, label="pruned (last val loss)")
    values = [t.value for t in view.complete if t.value is not None] + [v for _, v in pruned]
    _clip_top(ax, values)
    ax.set_title(f"{view.name}: optimization history ({len(view.pruned)} pruned)")
    ax.set_xlabel("trial number")
    _integer_x(ax)
    ax.set_ylabel("validation loss (nats)")
    fig = _figure(ax)
    fig.set_size_inches(*WIDE)
    handles, labels = ax.get_legend_handles_labels()
    words = {"Best Value": "best so far"}
    labels = [words.get(label, label) for label in labels]
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=9)
    fig.tight_layout()
    return fig


def overfitting(view: StudyView, top: int = 5) -> Figure:
    """Train/validation gap per epoch of the best complete trials (colour: decay type)."""
    best = sorted((t for t in view.complete if t.history), key=lambda t: t.value or math.inf)
    best = best[:top]
    if not best:
        raise Unavailable("No complete trial with a recorded history yet.")
    colours = setting_colours("decay", sorted({str(t.setting["decay"]) for t in best}))
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    markers = ("o", "s", "^", "D", "v")
    for rank, t in enumerate(best):
        epochs = [h["epoch"] for h in t.history]
        style_ = {
            "color": colours[str(t.setting["decay"])],
            "marker": markers[rank % len(markers)],
            "markersize": 4,
            "linestyle": ("-", "--", ":", "-.")[rank % 4],
            "label": f"#{t.number}: {t.setting['decay']}, bs {t.setting['batch_size']}, "
            f"val loss {t.value:.3f}",
        }
        loss_ax.plot(epochs, [h["val_loss"] - h["train_loss"] for h in t.history], **style_)
        acc_gap = [100 * (h["train_accuracy"] - h["val_accuracy"]) for h in t.history]
        acc_ax.plot(epochs, acc_gap, **style_)
    for ax in (loss_ax, acc_ax):
        ax.axhline(0, color="black", linewidth=0.8)
    loss_ax.set(title="loss gap", xlabel="epoch", ylabel="val − train loss (nats)")
    acc_ax.set(title="accuracy gap", xlabel="epoch", ylabel="train − val accuracy (% points)")
    _integer_x(loss_ax, acc_ax)
    handles, labels = loss_ax.get_legend_handles_labels()
    fig.set_size_inches(WIDE[0], WIDE[1] + 0.25 * len(best))
    fig.legend(
        handles,
        labels,
        title="best trials (trial number: setting, objective)",
        loc="outside lower center",
        ncols=2,
        fontsize=9,
    )
    fig.suptitle(f"{view.name}: overfitting of the {len(best)} best trials (above 0: overfit)")
    return fig


def wall_time(view: StudyView) -> Figure:
    """Wall time of every finished trial per batch size, epochs and decay type."""
    trials = [t for t in view.trials if t.seconds is not None]
    if not trials:
        raise Unavailable("No finished trial has a start and end time.")
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=WIDE, layout="constrained", sharey=True)
    rng = np.random.default_rng(0)  # jitter only, fixed so the figure is reproducible
    for ax, (key, label) in zip(axes, SETTINGS.items(), strict=True):
        values = sorted({t.setting[key] for t in trials if t.setting[key] is not None}, key=str)
        if key != "decay":
            values = sorted(values)
        colours = setting_colours(key, values)
        for i, value in enumerate(values):
            group = [t for t in trials if t.setting[key] == value]
            secs = np.array([t.seconds for t in group], dtype=float)
            x = i + rng.uniform(-0.15, 0.15, len(group))
            kept = np.array([not t.pruned for t in group])
            ax.scatter(x[kept], secs[kept], color=colours[value], s=22, zorder=3)
            ax.scatter(x[~kept], secs[~kept], color=colours[value], marker="x", s=22, zorder=3)
            ax.hlines(secs.mean(), i - 0.3, i + 0.3, color="black", linewidth=1.5, zorder=4)
        ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlim(-0.6, len(values) - 0.4)
        ax.set(title=f"by {label}", xlabel=label)
    axes[0].set_ylabel("wall time per trial (s)")
    handles = [
        Line2D([], [], marker="o", linestyle="", color="#555555", label="complete"),
        Line2D([], [], marker="x", linestyle="", color="#555555", label="pruned"),
        Line2D([], [], color="black", linewidth=1.5, label="mean"),
    ]
    fig.legend(handles=handles, loc="outside right upper")
    fig.suptitle(f"{view.name}: wall time per setting ({len(trials)} finished trials)")
    return fig


def stage_comparison(views: Sequence[StudyView]) -> Figure:
    """Best validation accuracy and total wall time of each stage's study, side by side."""
    rows = [(v, v.best) for v in views if v.best is not None]
    if len(rows) < 2:
        raise Unavailable("The comparison chart needs at least two studies with a complete trial.")
    fig, (acc_ax, time_ax) = plt.subplots(1, 2, figsize=WIDE, layout="constrained")
    names = [v.name for v, _ in rows]
    colours = [stage_colour(v.stage, i) for i, (v, _) in enumerate(rows)]
    accuracy = [100 * (b.val_accuracy or 0.0) for _, b in rows]
    seconds = [v.wall_seconds for v, _ in rows]
    unit, scale = ("min", 60.0) if max(seconds) >= 120 else ("s", 1.0)
    cost = [s / scale for s in seconds]
    for ax, data, fmt in ((acc_ax, accuracy, "{:.1f} %"), (time_ax, cost, "{:.1f} " + unit)):
        bars = ax.bar(range(len(rows)), data, color=colours)
        ax.bar_label(bars, [fmt.format(d) for d in data], padding=2, fontsize=9)
        ax.set_xticks(range(len(rows)), names, rotation=15, ha="right")
        ax.margins(y=0.15)
    acc_ax.set(title="best trial's validation accuracy", ylabel="accuracy (%)")
    time_ax.set(title="cost: wall time of all finished trials", ylabel=f"wall time ({unit})")
    fig.suptitle("stages compared: accuracy of the best trial (lowest val loss) and cost")
    return fig


def _need_searched_params(view: StudyView, what: str) -> None:
    complete = view.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        raise Unavailable(f"The {what} plot needs at least two complete trials.")
    if not any(t.params for t in complete):
        raise Unavailable(f"The study searches no parameter (every setting is fixed): no {what}.")
    if len({tuple(sorted(t.params.items())) for t in complete}) < 2:
        raise Unavailable(f"Every complete trial has the same parameters: no {what} to show.")


def _figure(ax: Axes) -> Figure:
    fig = ax.figure
    assert isinstance(fig, Figure)
    return fig


def _integer_x(*axes: Axes) -> None:
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _count(trials: Sequence[TrialView], key: str, value: Any) -> int:
    return sum(t.setting[key] == value for t in trials)


def _clip_top(ax: Axes, values: Sequence[float]) -> None:
    """Keep a diverged trial (loss in the thousands) from flattening everyone else's curve."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)])
    if finite.size < 3:
        return
    top = 1.5 * float(np.percentile(finite, 90))
    if finite.max() > top > 0:
        ax.set_ylim(top=top)
        ax.text(
            0.99,
            0.98,
            f"values above {top:.3g} not shown",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            color="#555555",
        )

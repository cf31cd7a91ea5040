"""Many head trials at once: one batched computation over the cached pooled features.

A head trial trains a linear layer on features the frozen backbone computed once, so a step
costs a few microseconds of arithmetic and far more of Python and kernel launches. Here K
trials step together: their weights are one ``[K, classes, features]`` tensor, each step is
one batched matmul, one backward and one vectorised optimizer update for all of them.

Every trial keeps its own semantics: its batch size (a trial with smaller batches takes more
steps per epoch; the others sit those steps out), epochs, learning rate and schedule,
optimizer settings, dropout, flips, early stopping, and its own random stream seeded with
``seed``, drawn in the order ``fit`` draws it. So a trial's history does not depend on which
trials share its batch, and without dropout it equals ``fit``'s on the cached features (dropout
in ``fit`` draws from the global generator, here from the trial's own). Pruning or a
non-finite loss ends one trial, not the batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tlopt.errors import TloptError
from tlopt.schedules import lr_factor, warmup_factor
from tlopt.train.trainer import (
    OPTIMIZERS,
    EpochRecord,
    FitResult,
    Interrupted,
    NonFiniteLoss,
    TrainParams,
)

# torch.optim's defaults, which ``fit`` uses through ``make_optimizer``.
BETAS, ADAM_EPS, RMS_ALPHA, RMS_EPS = (0.9, 0.999), 1e-8, 0.99, 1e-8


@dataclass(frozen=True)
class HeadTask:
    """One trial's head training: its trainer parameters and its dropout before the layer."""

    params: TrainParams
    dropout: float


class _Optimizer:
    """torch.optim's Adam, AdamW, SGD (momentum) and RMSprop, vectorised over trials.

    Each trial has its own learning rate, weight decay, momentum and step count; ``step``
    updates only the trials that took part in the step.
    """

    def __init__(self, kind: str, tasks: list[HeadTask], shapes: list[torch.Size], device) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {kind!r}; valid: {', '.join(OPTIMIZERS)}")
        self.kind = kind
        k = len(tasks)
        self.wd = torch.tensor([t.params.weight_decay for t in tasks], device=device)
        self.momentum = torch.tensor([t.params.momentum for t in tasks], device=device)
        self.steps = torch.zeros(k, device=device)
        self.state = [
            [torch.zeros((k, *s), device=device) for s in shapes] for _ in range(2)
        ]  # adam: exp_avg, exp_avg_sq; sgd: momentum buffer; rmsprop: square_avg

    @torch.no_grad()
    def step(self, params: list[torch.Tensor], rows: torch.Tensor, lr: torch.Tensor) -> None:
        self.steps[rows] += 1
        for i, p in enumerate(params):
            assert p.grad is not None
            shape = (-1,) + (1,) * (p.dim() - 1)
            g, w = p.grad[rows], p[rows]
            wd, mom = self.wd[rows].view(shape), self.momentum[rows].view(shape)
            rate = lr[rows].view(shape)
            if self.kind == "adamw":
                w = w * (1 - rate * wd)
            else:
                g = g + wd * w
            if self.kind in ("adam", "adamw"):
                m = self.state[0][i][rows].mul(BETAS[0]).add(g, alpha=1 - BETAS[0])
                v = self.state[1][i][rows].mul(BETAS[1]).addcmul(g, g, value=1 - BETAS[1])
                t = self.steps[rows].view(shape)
                bc1, bc2 = 1 - BETAS[0] ** t, 1 - BETAS[1] ** t
                w = w - (rate / bc1) * m / (v.sqrt() / bc2.sqrt() + ADAM_EPS)
                self.state[0][i][rows], self.state[1][i][rows] = m, v
            elif self.kind == "sgd":
                buf = self.state[0][i][rows] * mom + g
                w = w - rate * buf
                self.state[0][i][rows] = buf
            else:  # rmsprop
                sq = self.state[0][i][rows].mul(RMS_ALPHA).addcmul(g, g, value=1 - RMS_ALPHA)
                w = w - rate * g / (sq.sqrt() + RMS_EPS)
                self.state[0][i][rows] = sq
            p[rows] = w


def fit_heads(
    tasks: list[HeadTask],
    weight: torch.Tensor,
    bias: torch.Tensor,
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    seed: int = 0,
    on_epoch: Callable[[int, EpochRecord], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_done: Callable[[int, FitResult | BaseException], None] | None = None,
) -> list[FitResult | BaseException]:
    """Train one linear head per task, all at once, from the same initial ``weight``/``bias``.

    Args:
        tasks: one per trial; they must share the optimizer (group by it before calling).
        weight, bias: the initial classifier, ``[classes, features]`` and ``[classes]``.
        train_features: ``[views, N, features]``: view 0 the images, view 1 (needed when a
            task flips) their mirror images, as the trainer's prefix cache holds them.
        val_features: ``[N_val, features]``.
        on_epoch: called with (task index, record) after each epoch of each task; an
            exception it raises (a prune) ends that task only, and becomes its outcome;
            a ``TloptError`` (storage, disk) ends them all.
        should_stop: checked before every step; when it returns True, ``Interrupted``.
        on_done: called with (task index, outcome) as soon as a task ends, at the end of its
            last epoch, so a short trial is told while longer ones still train.

    Returns:
        Per task, a :class:`FitResult` (``best_state`` holds ``weight`` and ``bias``) or the
        exception that ended it (``NonFiniteLoss``, or what ``on_epoch`` raised).
    """
    kinds = {t.params.optimizer for t in tasks}
    if len(kinds) != 1:
        raise ValueError(f"fit_heads takes one optimizer at a time, got {sorted(kinds)}")
    device = train_features.device
    k, n = len(tasks), int(train_labels.shape[0])
    if any(t.params.flip for t in tasks) and train_features.shape[0] < 2:
        raise ValueError("a task flips but train_features holds no mirror-image view")
    w = weight.detach().to(device).float().expand(k, *weight.shape).clone().requires_grad_()
    b = bias.detach().to(device).float().expand(k, *bias.shape).clone().requires_grad_()
    optimizer = _Optimizer(kinds.pop(), tasks, [weight.shape, bias.shape], device)
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in tasks]
    lr = torch.zeros(k, device=device)
    epoch_lr, step_lr = [0.0] * k, [0.0] * k
    smoothing = torch.tensor([t.params.label_smoothing for t in tasks], device=device)
    histories: list[list[EpochRecord]] = [[] for _ in tasks]
    best: list[dict] = [
        {"loss": math.inf, "accuracy": 0.0, "epoch": -1, "state": {}} for _ in tasks
    ]
    outcome: list[FitResult | BaseException | None] = [None] * k
    stopped_early = [False] * k
    active = list(range(k))
    told = [False] * k

    def tell_ended() -> None:
        for i, ended in enumerate(outcome):
            if ended is not None and not told[i]:
                told[i] = True
                if on_done is not None:
                    on_done(i, ended)

    epoch = 0
    while active:
        began = time.perf_counter()
        for i in active:
            p = tasks[i].params
            epoch_lr[i] = p.lr * lr_factor(p.decay, epoch, p.epochs, **p.decay_params)
        orders = {i: torch.randperm(n, generator=generators[i], device=device) for i in active}
        sizes = {i: tasks[i].params.batch_size for i in active}
        steps = max(math.ceil(n / sizes[i]) for i in active)
        loss_sum = torch.zeros(k, device=device, dtype=torch.float64)
        correct = torch.zeros(k, device=device, dtype=torch.long)
        failed: dict[int, BaseException] = {}
        for s in range(steps):
            if should_stop is not None and should_stop():
                raise Interrupted(f"stopped in epoch {epoch + 1}")
            rows = [i for i in active if s * sizes[i] < n and i not in failed]
            if not rows:
                continue
            rates = list(step_lr)
            for i in rows:  # the trial's own steps: warm-up by its step count, as fit does
                progress = epoch + (s + 1) / math.ceil(n / sizes[i])
                rates[i] = epoch_lr[i] * warmup_factor(progress, tasks[i].params.warmup_epochs)
            if rates != step_lr:  # a copy to the device only while some rate changes
                step_lr = rates
                lr = torch.tensor(step_lr, device=device)
            xs, ys, counts = [], [], []
            for i in rows:
                index = orders[i][s * sizes[i] : (s + 1) * sizes[i]]
                view = torch.zeros_like(index)
                if tasks[i].params.flip:
                    flip = torch.rand(index.shape[0], generator=generators[i], device=device)
                    view = (flip < 0.5).long()
                x = train_features[view, index]
                p_drop = tasks[i].dropout
                if p_drop > 0:
                    keep = torch.rand(x.shape, generator=generators[i], device=device) >= p_drop
                    x = x * keep / (1 - p_drop)
                xs.append(x)
                ys.append(train_labels[index])
                counts.append(index.shape[0])
            x, y, valid = _pad(xs, ys, counts)
            r = torch.tensor(rows, device=device)
            logits = torch.baddbmm(b[r].unsqueeze(1), x, w[r].transpose(1, 2))
            per_item = _smoothed_cross_entropy(logits, y, smoothing[r]) * valid
            count = valid.sum(1)
            losses = per_item.sum(1) / count
            finite = torch.isfinite(losses)
            if not bool(finite.all()):
                for j in torch.nonzero(~finite).flatten().tolist():
                    failed[rows[j]] = NonFiniteLoss(
                        f"training loss became {losses[j].item()} in epoch {epoch + 1}"
                    )
                keep_rows = finite.nonzero().flatten()
                if keep_rows.numel() == 0:
                    continue
                losses, r = losses[keep_rows], r[keep_rows]
                per_item, logits, y, valid, count = (
                    t[keep_rows] for t in (per_item, logits, y, valid, count)
                )
            w.grad, b.grad = None, None
            losses.sum().backward()
            optimizer.step([w, b], r, lr)
            with torch.no_grad():
                loss_sum.index_add_(0, r, (losses.detach() * count).double())
                hits = ((logits.argmax(2) == y) & valid.bool()).sum(1)
                correct.index_add_(0, r, hits)
        for i, exc in failed.items():
            outcome[i] = exc
        active = [i for i in active if i not in failed]
        if not active:
            break
        with torch.no_grad():
            r = torch.tensor(active, device=device)
            logits = torch.matmul(val_features.float(), w[r].transpose(1, 2)) + b[r].unsqueeze(1)
            val_losses = F.cross_entropy(
                logits.transpose(1, 2),
                val_labels.expand(len(active), -1),
                reduction="none",
            ).mean(1)
            val_accs = (logits.argmax(2) == val_labels).float().mean(1)
        seconds = time.perf_counter() - began
        still = []
        for j, i in enumerate(active):
            val_loss, val_acc = float(val_losses[j]), float(val_accs[j])
            if not math.isfinite(val_loss):
                outcome[i] = NonFiniteLoss(
                    f"validation loss became {val_loss} in epoch {epoch + 1}"
                )
                continue
            record = EpochRecord(
                epoch + 1,
                float(loss_sum[i]) / n,
                int(correct[i]) / n,
                val_loss,
                val_acc,
                step_lr[i],
                seconds,
            )
            histories[i].append(record)
            if val_loss < best[i]["loss"]:
                best[i] = {
                    "loss": val_loss,
                    "accuracy": val_acc,
                    "epoch": epoch + 1,
                    "state": {"weight": w[i].detach().clone(), "bias": b[i].detach().clone()},
                }
            if on_epoch is not None:
                try:
                    on_epoch(i, record)
                except TloptError:  # the storage is gone, the disk is full: stop everything
                    raise
                except Exception as exc:  # a prune ends this trial only
                    outcome[i] = exc
                    continue
            p = tasks[i].params
            if p.patience and epoch + 1 - best[i]["epoch"] >= p.patience:
                stopped_early[i] = True
            elif epoch + 1 < p.epochs:
                still.append(i)
                continue
            outcome[i] = FitResult(
                histories[i],
                best[i]["epoch"],
                best[i]["loss"],
                best[i]["accuracy"],
                best[i]["state"],
                stopped_early[i],
            )
        active = still
        epoch += 1
        tell_ended()
    tell_ended()
    assert all(o is not None for o in outcome)
    return outcome  # type: ignore[return-value]


def _smoothed_cross_entropy(
    logits: torch.Tensor, y: torch.Tensor, smoothing: torch.Tensor
) -> torch.Tensor:
    """Per-item cross-entropy of ``[K, B, C]`` logits, each trial with its label smoothing.

    torch's formula (``F.cross_entropy(label_smoothing=e)``): ``(1 - e) * nll + e * mean(-log p)``.
    """
    logp = F.log_softmax(logits, dim=2)
    nll = -logp.gather(2, y.unsqueeze(2)).squeeze(2)
    e = smoothing.view(-1, 1)
    return (1 - e) * nll + e * -logp.mean(2)


def _pad(
    xs: list[torch.Tensor], ys: list[torch.Tensor], counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-trial batches of different sizes, zero-padded, with a mask of the real rows."""
    size = max(counts)
    if all(c == size for c in counts):
        x, y = torch.stack(xs), torch.stack(ys)
        return x, y, torch.ones(y.shape, device=x.device)
    x = xs[0].new_zeros((len(xs), size, xs[0].shape[1]))
    y = ys[0].new_zeros((len(ys), size))
    valid = torch.zeros((len(xs), size), device=x.device)
    for j, (xj, yj, c) in enumerate(zip(xs, ys, counts, strict=True)):
        x[j, :c], y[j, :c], valid[j, :c] = xj, yj, 1.0
    return x, y, valid

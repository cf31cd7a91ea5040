"""Many head trials at once: one batched computation over the cached pooled features.

A head trial trains a linear layer on features the frozen backbone computed once, so a step
costs a few microseconds of arithmetic and far more of Python and kernel launches. Here K
trials step together: each step is one batched matmul and one backward for all of them, then
each trial's own torch.optim optimizer (the one ``fit`` makes, ``make_optimizer``) updates its
weights. The epochs are kept by one :class:`~tlopt.train.ledger.Ledger` per trial, as ``fit``
keeps its own: schedule, warm-up, record, best epoch, patience, non-finite loss.

Every trial keeps its own semantics: its batch size (a trial with smaller batches takes more
steps per epoch; the others sit those steps out), epochs, learning rate and schedule,
optimizer, dropout, flips, early stopping, and its own random stream seeded with ``seed``,
drawn in the order ``fit`` draws it. So a trial's history does not depend on which trials
share its batch, and it equals ``fit``'s on the same data, dropout included (both draw the
head's dropout from the trial's own generator: :func:`~tlopt.models.split.head_dropout`).
Pruning or a non-finite loss ends one trial, not the batch. The step never reads from the
device: losses and hits are summed there and read once an epoch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tlopt.errors import TloptError
from tlopt.models.split import head_dropout
from tlopt.train.ledger import (
    EpochRecord,
    FitResult,
    Ledger,
    TrainParams,
    check_stop,
)
from tlopt.train.trainer import make_optimizer


@dataclass(frozen=True)
class HeadTask:
    """One trial's head training: its trainer parameters and its dropout before the layer."""

    params: TrainParams
    dropout: float


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
        tasks: one per trial (any mix of optimizers).
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
    device = train_features.device
    k, n = len(tasks), int(train_labels.shape[0])
    if any(t.params.flip for t in tasks) and train_features.shape[0] < 2:
        raise ValueError("a task flips but train_features holds no mirror-image view")
    ws = [weight.detach().to(device).float().clone().requires_grad_() for _ in tasks]
    bs = [bias.detach().to(device).float().clone().requires_grad_() for _ in tasks]
    optimizers = [make_optimizer(t.params, [w, b]) for t, w, b in zip(tasks, ws, bs, strict=True)]
    ledgers = [Ledger(t.params) for t in tasks]
    generators = [torch.Generator(device=device).manual_seed(seed) for _ in tasks]
    smoothing = torch.tensor([t.params.label_smoothing for t in tasks], device=device)
    on_device: dict[tuple[int, ...], torch.Tensor] = {}  # row lists, copied once each

    def rows_tensor(rows: list[int]) -> torch.Tensor:
        if tuple(rows) not in on_device:
            on_device[tuple(rows)] = torch.tensor(rows, device=device)
        return on_device[tuple(rows)]

    outcome: list[FitResult | BaseException | None] = [None] * k
    told = [False] * k
    active = list(range(k))
    epoch = 0
    while active:
        began = time.perf_counter()
        for i in active:
            ledgers[i].begin_epoch(epoch)
        orders = {i: torch.randperm(n, generator=generators[i], device=device) for i in active}
        steps_of = {i: ledgers[i].steps(n) for i in active}
        loss_sum = torch.zeros(k, device=device, dtype=torch.float64)
        correct = torch.zeros(k, device=device, dtype=torch.long)
        step_lr = [0.0] * k
        for s in range(max(steps_of.values())):
            check_stop(should_stop, epoch)
            rows = [i for i in active if s < steps_of[i]]
            xs, ys, counts = [], [], []
            for i in rows:
                step_lr[i] = ledgers[i].step_lr(epoch, s, steps_of[i])
                for group in optimizers[i].param_groups:
                    group["lr"] = step_lr[i]
                size = tasks[i].params.batch_size
                index = orders[i][s * size : (s + 1) * size]
                view = torch.zeros_like(index)
                if tasks[i].params.flip:
                    flip = torch.rand(index.shape[0], generator=generators[i], device=device)
                    view = (flip < 0.5).long()
                x = train_features[view, index]
                xs.append(head_dropout(x, tasks[i].dropout, generators[i]))
                ys.append(train_labels[index])
                counts.append(index.shape[0])
            x, y, valid = _pad(xs, ys, counts)
            r = rows_tensor(rows)
            w = torch.stack([ws[i] for i in rows])
            b = torch.stack([bs[i] for i in rows])
            logits = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            count = valid.sum(1)
            losses = (_smoothed_cross_entropy(logits, y, smoothing[r]) * valid).sum(1) / count
            for i in rows:
                optimizers[i].zero_grad(set_to_none=True)
            # A trial whose loss is not finite spoils only its own gradients; it ends at the
            # epoch's end, when its ledger sees the sum.
            losses.sum().backward()
            for i in rows:
                optimizers[i].step()
            with torch.no_grad():
                loss_sum.index_add_(0, r, (losses.detach() * count).double())
                hits = ((logits.argmax(2) == y) & valid.bool()).sum(1)
                correct.index_add_(0, r, hits)
        with torch.no_grad():
            r = rows_tensor(active)
            w = torch.stack([ws[i] for i in active])
            b = torch.stack([bs[i] for i in active])
            logits = torch.matmul(val_features.float(), w.transpose(1, 2)) + b.unsqueeze(1)
            val_losses = F.cross_entropy(
                logits.transpose(1, 2),
                val_labels.expand(len(active), -1),
                reduction="none",
            ).mean(1)
            val_accs = (logits.argmax(2) == val_labels).double().mean(1)
            figures = torch.stack(
                [loss_sum[r] / n, correct[r].double() / n, val_losses.double(), val_accs]
            ).tolist()  # the epoch's one read from the device
        seconds = time.perf_counter() - began
        still = []
        for j, i in enumerate(active):
            train_loss, train_acc, val_loss, val_acc = (column[j] for column in figures)

            def state(i: int = i) -> dict[str, torch.Tensor]:
                return {"weight": ws[i].detach().clone(), "bias": bs[i].detach().clone()}

            try:
                record = ledgers[i].end_epoch(
                    epoch, (train_loss, train_acc), (val_loss, val_acc), step_lr[i], seconds, state
                )
                if on_epoch is not None:
                    on_epoch(i, record)
            except TloptError:  # the storage is gone, the disk is full: stop everything
                raise
            except Exception as exc:  # a non-finite loss or a prune ends this trial only
                outcome[i] = exc
                continue
            if ledgers[i].goes_on():
                still.append(i)
            else:
                outcome[i] = ledgers[i].result()
        active = still
        epoch += 1
        for i, ended in enumerate(outcome):
            if ended is not None and not told[i]:
                told[i] = True
                if on_done is not None:
                    on_done(i, ended)
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

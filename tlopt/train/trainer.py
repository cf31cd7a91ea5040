"""The one training loop: every stage, tuning and export alike.

It knows nothing of Optuna. The caller passes ``on_epoch``, which sees each epoch's record (and
may raise to stop, as the tuning layer does to prune), and may pass a checkpoint to resume from.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlopt.models.split import SplitModel
from tlopt.models.stages import frozen_module_set, set_train_mode
from tlopt.names import OPTIMIZERS
from tlopt.schedules import layer_scales
from tlopt.train.data import ImageSet
from tlopt.train.feature_cache import DEFAULT_BYTES, FeatureCache
from tlopt.train.inputs import Inputs, autocast, compiled, inference_batch
from tlopt.train.ledger import EpochRecord, FitResult, Ledger, TrainParams, check_stop

log = logging.getLogger("tlopt.worker")
# The feature budget of a fit given no cache of its caller (bytes).
CACHE_LIMIT_BYTES = DEFAULT_BYTES


def param_groups(model: nn.Module, layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """The trainable parameters in groups with their ``lr_scale``, one group per timm layer.

    Layers are timm's block groups (``group_matcher(coarse=True)``: the stem, each block
    group, then the head), the head scaled 1 and each layer below it ``layer_decay`` times the
    one above (:func:`~tlopt.schedules.layer_scales`). Parameters no group matches (the
    new classifier) belong to the head. ``layer_decay = 1`` gives one group.
    """
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    matcher = getattr(model, "group_matcher", None)
    if layer_decay == 1.0 or matcher is None:
        return [{"params": [p for _, p in trainable], "lr_scale": 1.0}]
    from timm.models import group_parameters

    layer_of: dict[str, int] = group_parameters(model, matcher(coarse=True), reverse=True)
    num_layers = max(layer_of.values(), default=0) + 1
    scales = layer_scales(num_layers, layer_decay)
    groups: dict[int, list[nn.Parameter]] = {}
    for name, p in trainable:
        groups.setdefault(layer_of.get(name, num_layers - 1), []).append(p)
    return [{"params": ps, "lr_scale": scales[i]} for i, ps in sorted(groups.items())]


def make_optimizer(
    params: TrainParams, parameters: list[torch.Tensor] | list[dict[str, Any]]
) -> torch.optim.Optimizer:
    """The optimizer named in ``params`` over ``parameters`` (tensors or param groups).

    Adam, AdamW and SGD run fused (one kernel over every tensor) where torch has it for the
    parameters' device: on a 2-core CPU, Adam's step over Lite0 took 6.0 ms fused against 14.3
    ms per tensor (scripts/bench's freeze1 study spent 13% of its time in Adam's step).
    """
    fused = _can_fuse(parameters)
    if params.optimizer == "adam":
        return torch.optim.Adam(
            parameters, lr=params.lr, weight_decay=params.weight_decay, fused=fused
        )
    if params.optimizer == "adamw":
        return torch.optim.AdamW(
            parameters, lr=params.lr, weight_decay=params.weight_decay, fused=fused
        )
    if params.optimizer == "sgd":
        return torch.optim.SGD(
            parameters,
            lr=params.lr,
            momentum=params.momentum,
            weight_decay=params.weight_decay,
            fused=fused,
        )
    if params.optimizer == "rmsprop":
        return torch.optim.RMSprop(parameters, lr=params.lr, weight_decay=params.weight_decay)
    raise ValueError(f"unknown optimizer {params.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


def _can_fuse(parameters: list[torch.Tensor] | list[dict[str, Any]]) -> bool | None:
    """True when every parameter is a floating tensor on the CPU or a CUDA device (torch's
    fused optimizers' devices); None (torch's own choice) otherwise."""
    tensors: list[torch.Tensor] = []
    for item in parameters:
        tensors += item["params"] if isinstance(item, dict) else [item]
    ok = tensors and all(t.is_floating_point() and t.device.type in ("cpu", "cuda")
                         for t in tensors)  # fmt: skip
    return True if ok else None


def _mutable_keys(model: nn.Module) -> list[str]:
    """State-dict keys training can change: trainable params and non-frozen modules' buffers."""
    frozen = {id(m) for m in frozen_module_set(model)}
    keys = []
    for name, module in model.named_modules():
        if id(module) in frozen:
            continue
        prefix = f"{name}." if name else ""
        keys += [prefix + n for n, _ in module.named_parameters(recurse=False)]
        keys += [prefix + n for n, _ in module.named_buffers(recurse=False)]
    return keys


def evaluate(
    split: SplitModel, inputs: Inputs, labels: torch.Tensor, batch_size: int | None = None
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over a whole split (one read from the device)."""
    set_train_mode(split.model, False)
    n = int(labels.shape[0])
    batch_size = batch_size or inference_batch(labels.device)
    total = torch.zeros(2, device=labels.device, dtype=torch.float64)  # loss sum, correct
    with torch.no_grad():
        for start in range(0, n, batch_size):
            index = torch.arange(start, min(start + batch_size, n), device=labels.device)
            with autocast(labels.device):
                logits = split.rest(inputs.get(index, None)).float()
            total[0] += F.cross_entropy(logits, labels[index], reduction="sum")
            total[1] += (logits.argmax(1) == labels[index]).sum()
    loss_sum, correct = total.tolist()
    return loss_sum / max(n, 1), correct / max(n, 1)


def fit(
    model: nn.Module,
    train: ImageSet,
    val: ImageSet,
    params: TrainParams,
    *,
    seed: int = 0,
    on_epoch: Callable[[EpochRecord, Callable[[], dict[str, Any]]], None] | None = None,
    resume: dict[str, Any] | None = None,
    cache: FeatureCache | None = None,
    should_stop: Callable[[], bool] | None = None,
    compile: bool = False,
    record_start: bool | tuple[float, float] = False,
) -> FitResult:
    """Train the trainable part of ``model`` and keep the weights of the best validation epoch.

    Args:
        model: a timm model with a stage applied (``requires_grad`` set).
        train, val: the splits, on the training device.
        params: batch size, epochs, optimizer, schedule, warm-up, layer decay, early stopping.
        seed: seeds shuffling, flips, crops and the head's dropout (all drawn from one
            generator, in the order the batched head trainer draws them) and torch's global
            generator (other dropout); the same seed gives the same history on CPU.
        on_epoch: called after each epoch with its record and a function returning a
            checkpoint (for ``resume``); it may raise to stop training.
        resume: a checkpoint from ``on_epoch`` to continue from (tensors on any device).
        cache: kept by the caller to reuse frozen-prefix outputs across runs (of one study).
        should_stop: checked before every batch; when it returns True, ``Interrupted``.
        compile: run the trainable part through ``torch.compile``; on CUDA in mode
            "reduce-overhead", which captures the step as a CUDA graph per batch size (the
            small-batch cure). Whether a later trial reuses the compiled code is up to
            torch's guards (unmeasured without a GPU).
        record_start: evaluate the model before the first step and record it as epoch 0
            (train figures NaN, learning rate 0): where a fine-tuning stage starts, i.e. the
            head it inherited. Epoch 0 never counts as the best epoch. A (val loss, val
            accuracy) pair: that start, measured by an earlier trial from the same weights,
            recorded without a second validation pass.

    Raises:
        NonFiniteLoss: the loss became NaN or infinite (checked once an epoch: a check per
            step would make the host wait for the device at every step).
    """
    device = train.images.device
    # channels_last: the layout cuDNN and oneDNN convolve fastest (+10-15% measured on a
    # 2-core CPU for EfficientNet-Lite0 fine-tuning, as on CUDA); it does not change results.
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    split = SplitModel(model, int(train.images.shape[1]))
    set_train_mode(model, False)
    cache = FeatureCache(CACHE_LIMIT_BYTES) if cache is None else cache
    train_in = Inputs(split, train, params.flip, cache, params.crop_scale)
    val_in = Inputs(split, val, False, cache)
    rest = compiled(split.rest, device) if compile else split.rest
    optimizer = make_optimizer(params, param_groups(model, params.layer_decay))
    keys = _mutable_keys(model)
    ledger = Ledger(params)
    if resume is not None:
        model.load_state_dict(resume["model"], strict=False)
        optimizer.load_state_dict(resume["optimizer"])
        ledger = Ledger(params, [EpochRecord(**r) for r in resume["history"]], resume["best"])
        _set_rng_states(resume, generator, device, seed, ledger.next_epoch + 1)
    elif record_start:
        began = time.perf_counter()
        start = (
            record_start if isinstance(record_start, tuple) else evaluate(split, val_in, val.labels)
        )
        record = ledger.record_start(start[0], start[1], time.perf_counter() - began)
        if on_epoch is not None:
            on_epoch(record, lambda: {})

    def mutable_state() -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {k: state[k].detach().clone() for k in keys}

    def checkpoint() -> dict[str, Any]:
        return {
            "model": mutable_state(),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "history": [r.as_dict() for r in ledger.history],
            "best": ledger.best,
            **_rng_states(generator, device),
        }

    n = len(train)
    steps = ledger.steps(n)
    while ledger.goes_on():
        epoch = ledger.next_epoch
        began = time.perf_counter()
        ledger.begin_epoch(epoch)
        set_train_mode(model, True, params.bn_train)
        order = torch.randperm(n, generator=generator, device=device)
        # Running sums stay on the device, read once at the epoch's end (no per-step sync).
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for s in range(steps):
            check_stop(should_stop, epoch)
            step_lr = ledger.step_lr(epoch, s, steps)
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group["lr_scale"]
            index = order[s * params.batch_size : (s + 1) * params.batch_size]
            flip = None
            if params.flip:
                flip = torch.rand(index.shape[0], generator=generator, device=device) < 0.5
            with autocast(device):
                logits = rest(train_in.get(index, flip, generator), generator).float()
            labels = train.labels[index]
            loss = F.cross_entropy(logits, labels, label_smoothing=params.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * index.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
        record = ledger.end_epoch(
            epoch,
            (float(loss_sum) / n, int(correct) / n),
            evaluate(split, val_in, val.labels),
            step_lr,
            time.perf_counter() - began,
            mutable_state,
        )
        if on_epoch is not None:
            on_epoch(record, checkpoint)
    result = ledger.result()
    model.load_state_dict(result.best_state, strict=False)
    set_train_mode(model, False)
    return result


def _rng_states(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Every random stream a step draws from, as CPU byte tensors (resumable on any device).

    The shuffling and flips come from ``generator``; dropout from torch's global generator of
    the device (the CPU's, and on CUDA the current device's).
    """
    states = {"rng": torch.get_rng_state(), "generator": generator.get_state().cpu()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(
    checkpoint: dict[str, Any],
    generator: torch.Generator,
    device: torch.device,
    seed: int,
    epoch: int,
) -> None:
    """Restore :func:`_rng_states`; the states may have been loaded onto any device.

    A generator's state is the device type's own (a CPU one is 5,056 bytes, a CUDA one 16):
    a trial checkpointed on a GPU worker and retried on a CPU one (or back) cannot take it.
    It then keeps its epochs and draws the rest from ``seed`` and ``epoch`` (the one it
    resumes at, 1-based): the run differs from an uninterrupted one only in which images are
    shuffled, flipped and dropped.
    """
    torch.set_rng_state(checkpoint["rng"].cpu())
    state = checkpoint["generator"].cpu()
    device_state = checkpoint.get("cuda_rng") if device.type == "cuda" else None
    expected = generator.get_state().numel()
    if state.numel() == expected and (device.type != "cuda" or device_state is not None):
        generator.set_state(state)
        if device_state is not None:
            torch.cuda.set_rng_state(device_state.cpu(), device)
        return
    reseed = (seed + (epoch << 32)) % 2**64  # one stream per (seed, epoch)
    generator.manual_seed(reseed)
    if device.type == "cuda":
        torch.cuda.manual_seed(reseed)
    log.info(
        "resuming at epoch %d on %s from a checkpoint of another device type (generator state "
        "%d bytes, %s takes %d): shuffling, flips and dropout reseeded from seed %d and epoch %d",
        epoch,
        device.type,
        state.numel(),
        device.type,
        expected,
        seed,
        epoch,
    )

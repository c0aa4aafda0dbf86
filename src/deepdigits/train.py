"""The training loop: shuffled in-memory batches, optimizers and schedules by name, weight averaging."""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .augment import augment_batch
from .device import INFERENCE_BATCH, default_device, training_precision
from .errors import DeepDigitsError
from .losses import LossFunction, loss_function
from .progress import ProgressBar

OptimizerFactory = Callable[[Iterable[nn.Parameter], float, float], torch.optim.Optimizer]
ScheduleFactory = Callable[[torch.optim.Optimizer, float, int], "torch.optim.lr_scheduler.LRScheduler | None"]

# name -> factory(params, learning_rate, weight_decay), with Keras's defaults where they differ from
# PyTorch's (epsilon 1e-7; RMSprop's rho 0.9)
OPTIMIZERS: dict[str, OptimizerFactory] = {
    "sgd": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, weight_decay=wd),
    "adam": lambda params, lr, wd: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-7, weight_decay=wd),
    "rmsprop": lambda params, lr, wd: torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7, weight_decay=wd),
    "adamw": lambda params, lr, wd: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
    "nesterov": lambda params, lr, wd: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
}

# name -> factory(optimizer, learning_rate, total_steps); schedules step once per batch
SCHEDULES: dict[str, ScheduleFactory] = {
    "constant": lambda optimizer, lr, total_steps: None,
    "onecycle": lambda optimizer, lr, total_steps: torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.25),
}


def _lookup(table: dict, kind: str, name: str):
    try:
        return table[name]
    except KeyError:
        raise DeepDigitsError(f"unknown {kind} {name!r}; expected one of: {', '.join(table)}") from None


def make_optimizer(name: str, params, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer called ``name`` in ``OPTIMIZERS``."""
    return _lookup(OPTIMIZERS, "optimizer", name)(params, learning_rate, weight_decay)


def make_schedule(name: str, optimizer: torch.optim.Optimizer, learning_rate: float, total_steps: int):
    """The learning-rate schedule called ``name`` in ``SCHEDULES`` (None for a constant rate)."""
    return _lookup(SCHEDULES, "schedule", name)(optimizer, learning_rate, total_steps)


@dataclass
class History:
    """Per-epoch metrics, as Keras's ``History.history`` but one dict per epoch."""

    epochs: list[dict] = field(default_factory=list)
    interrupted: bool = False
    train_seconds: float = 0.0
    precision: str = "float32"  # or "bfloat16": what the forward pass ran in

    def column(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs if key in e]


@torch.no_grad()
def evaluate_batches(network: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFunction,
                     batch_size: int = INFERENCE_BATCH) -> dict:
    """Mean loss (the one training uses) and accuracy of ``network`` in eval mode."""
    was_training = network.training
    network.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = network(x[start : start + batch_size]).float()
        target = y[start : start + batch_size]
        loss_sum += loss_fn(logits, target).item() * len(target)
        correct += (logits.argmax(1) == target).sum().item()
    network.train(was_training)
    return {"loss": loss_sum / max(len(x), 1), "accuracy": correct / max(len(x), 1)}


@torch.no_grad()
def recompute_batch_norm(network: nn.Module, x: torch.Tensor, limit: int = 10_000, batch_size: int = 500) -> None:
    """Recompute batch-norm running statistics for the final weights (as SWA's ``update_bn`` does).

    The running averages trail weights that are still moving; after a short run they are stale enough
    that eval mode fails (measured: 14% test accuracy after 32 steps, 92% once recomputed), and an
    average of weights needs statistics of its own.
    """
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the pass
    network.train()
    for start in range(0, min(len(x), limit), batch_size):
        network(x[start : start + batch_size])
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    network.eval()


class WeightAverage:
    """An exponential moving average of a network's weights and batch-norm statistics.

    The decay warms up as min(decay, (1 + n) / (10 + n)) over the first updates; without the warm-up a
    short run's average would still be mostly the random initial weights (measured: 11% accuracy after
    one epoch with decay 0.999, against 99.2% for the raw weights).
    """

    def __init__(self, network: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(network)
        self.updates = 0

    @torch.no_grad()
    def update(self, network: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for average, current in zip(self.module.state_dict().values(), network.state_dict().values(), strict=True):
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(current, alpha=1.0 - decay)
            else:
                average.copy_(current)


@dataclass
class TrainingRun:
    """The state of one ``fit`` call and its steps: ``train_epoch``, ``validate``, ``end_epoch``, ``finish``."""

    network: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    optimizer: torch.optim.Optimizer
    scheduler: object | None
    loss_fn: LossFunction
    batch_size: int
    augment: bool
    averaged: WeightAverage | None
    autocast: torch.autocast
    progress: ProgressBar
    shuffle: torch.Generator
    augment_rng: torch.Generator
    history: History
    last_good: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def steps(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    @property
    def final_network(self) -> nn.Module:
        """What validation scores and training ends with: the weight average where there is one."""
        return self.averaged.module if self.averaged is not None else self.network

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the shuffled data; returns the epoch's mean training loss and accuracy."""
        network, device = self.network, self.x.device
        network.train()
        order = torch.randperm(len(self.x), generator=self.shuffle).to(device)
        self.progress.begin_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for step in range(1, self.steps + 1):
            idx = order[(step - 1) * self.batch_size : step * self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = augment_batch(xb, self.augment_rng)
            with self.autocast:
                logits = network(xb).float()
            batch_loss = self.loss_fn(logits, yb)
            self.optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            if self.averaged is not None:
                self.averaged.update(network)
            loss_sum += batch_loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += len(idx)
            if self.progress.wants_step(step):  # reading the sums waits for the device: only when shown
                self.progress.step(step, {"loss": loss_sum.item() / seen, "accuracy": correct.item() / seen})
        return {"epoch": epoch, "loss": loss_sum.item() / seen, "accuracy": correct.item() / seen}

    def validate(self, x_val: torch.Tensor | None, y_val: torch.Tensor | None) -> dict:
        """``val_loss`` (the training loss) and ``val_accuracy`` of the weights training would end with."""
        if x_val is None or y_val is None or not len(x_val):
            return {}
        scores = evaluate_batches(self.final_network, x_val, y_val, self.loss_fn)
        return {"val_loss": scores["loss"], "val_accuracy": scores["accuracy"]}

    def end_epoch(self, metrics: dict, learning_rate: float) -> None:
        """Keep the epoch's weights and metrics; a diverged run stops here with a one-line error."""
        if not math.isfinite(metrics["loss"]):
            raise DeepDigitsError(
                f"training diverged at epoch {metrics['epoch']} (loss is {metrics['loss']}); "
                f"try a smaller learning rate than {learning_rate}"
            )
        self.history.epochs.append(metrics)
        self.last_good = copy.deepcopy(self.final_network.state_dict())

    def finish(self) -> History:
        """The last finished epoch's weights (the averaged ones with ema_decay), in the plain layout, eval mode."""
        self.network.load_state_dict(self.last_good)
        if self.history.epochs:
            recompute_batch_norm(self.network, self.x)
        self.network.to(memory_format=torch.contiguous_format)
        self.history.train_seconds = time.perf_counter() - self.started
        self.network.eval()
        return self.history


def fit(
    network: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    optimizer: str = "adam",
    learning_rate: float = 0.001,
    batch_size: int = 32,
    epochs: int = 1,
    x_val: torch.Tensor | None = None,
    y_val: torch.Tensor | None = None,
    seed: int = 0,
    loss: str = "cross-entropy",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    augment: bool = False,
    label_smoothing: float = 0.0,
    ema_decay: float = 0.0,
    bf16: bool = False,
    channels_last: bool = False,
    verbose: int = 1,
    device: torch.device | None = None,
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> History:
    """Train ``network`` in place on in-memory tensors, shuffling every epoch as Keras's ``fit`` does.

    ``x`` is float (N, 1, 28, 28), ``y`` int64 labels. Ctrl-C stops training and restores the
    weights of the last finished epoch (``History.interrupted`` is then True). With ``ema_decay``,
    validation uses, and training ends with, the moving average of the weights. ``bf16`` asks for
    bfloat16 autocast, used only where the device computes bfloat16 natively (``device.native_bf16``).
    ``val_loss`` is the loss training minimises (label smoothing included), as Keras reports it.
    """
    run = prepare(network, x, y, optimizer=optimizer, learning_rate=learning_rate, batch_size=batch_size,
                  epochs=epochs, seed=seed, loss=loss, weight_decay=weight_decay, schedule=schedule, augment=augment,
                  label_smoothing=label_smoothing, ema_decay=ema_decay, bf16=bf16, channels_last=channels_last,
                  verbose=verbose, device=device)
    if x_val is not None and y_val is not None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        x_val, y_val = x_val.to(run.x.device).contiguous(memory_format=memory_format), y_val.to(run.x.device)
    try:
        for epoch in range(1, epochs + 1):
            epoch_start = time.perf_counter()
            metrics = run.train_epoch(epoch)
            metrics.update(run.validate(x_val, y_val))
            metrics["seconds"] = time.perf_counter() - epoch_start
            run.end_epoch(metrics, learning_rate)
            run.progress.end_epoch(epoch, metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    except KeyboardInterrupt:
        run.history.interrupted = True
        if verbose:
            print(f"Interrupted: keeping the weights of epoch {len(run.history.epochs)}.", file=sys.stderr)
    finally:
        run.progress.close()
    return run.finish()


def prepare(network: nn.Module, x: torch.Tensor, y: torch.Tensor, *, optimizer: str, learning_rate: float,
            batch_size: int, epochs: int, seed: int, loss: str, weight_decay: float, schedule: str, augment: bool,
            label_smoothing: float, ema_decay: float, bf16: bool, channels_last: bool, verbose: int,
            device: torch.device | None) -> TrainingRun:
    """Check the options, move network and data to the device, and build optimizer, schedule and generators."""
    if len(x) == 0:
        raise DeepDigitsError("training data is empty")
    loss_fn = loss_function(loss, label_smoothing)
    _lookup(SCHEDULES, "schedule", schedule)
    device = device or default_device()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network.to(device, memory_format=memory_format)
    x, y = x.to(device).contiguous(memory_format=memory_format), y.to(device)
    opt = make_optimizer(optimizer, network.parameters(), learning_rate, weight_decay)
    steps = math.ceil(len(x) / batch_size)
    scheduler = make_schedule(schedule, opt, learning_rate, epochs * steps)
    averaged = WeightAverage(network, ema_decay) if ema_decay else None
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    augment_rng = torch.Generator(device="cpu").manual_seed(seed + 1)
    torch.manual_seed(seed)  # dropout masks
    precision = training_precision(bf16, device)
    return TrainingRun(
        network=network, x=x, y=y, optimizer=opt, scheduler=scheduler, loss_fn=loss_fn, batch_size=batch_size,
        augment=augment, averaged=averaged,
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"),
        progress=ProgressBar(epochs, steps, verbose), shuffle=shuffle, augment_rng=augment_rng,
        history=History(precision=precision), last_good=copy.deepcopy(network.state_dict()),
    )

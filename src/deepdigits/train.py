"""Training recipes and the training loop: in-memory batches, Keras-faithful optimizers, live progress."""

from __future__ import annotations

import copy
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from torch.nn import functional as F

from .errors import DeepDigitsError


@dataclass(frozen=True)
class Recipe:
    """Everything needed to train a network the way a tutorial (or we) did."""

    name: str
    architecture: str
    optimizer: str  # "sgd", "adam" or "rmsprop", with Keras's defaults
    learning_rate: float
    batch_size: int
    epochs: int
    validation_split: float = 0.0  # Keras-style: the last fraction of the training set
    input_scale: float = 1.0 / 255.0
    loss: str = "cross-entropy"  # or "keras2-clipped-cross-entropy", see LOSSES
    dataset: str = "mnist"
    seed: int = 0
    description: str = ""
    # Beyond the tutorials (all off by default, so the tutorial recipes stay as they were):
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "onecycle": warm up to learning_rate, then anneal, stepped per batch
    augment: bool = False  # small random affine transforms of every training batch, see augment_batch
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # >0: evaluate and keep an exponential moving average of the weights
    bf16: bool = False  # bfloat16 autocast where the device computes it natively (see native_bf16)
    channels_last: bool = False
    members: int = 0  # >0: an ensemble of this many networks, each trained by member_recipe with its own seed
    member_recipe: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def fit_options(self) -> dict:
        """The keyword arguments of ``fit`` this recipe sets."""
        names = ("optimizer", "learning_rate", "batch_size", "epochs", "seed", "loss", "weight_decay", "schedule",
                 "augment", "label_smoothing", "ema_decay", "bf16", "channels_last")
        return {name: getattr(self, name) for name in names}

    def with_overrides(self, **overrides) -> Recipe:
        """A copy with the given fields changed; ``None`` values are ignored."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            # Tutorial 000 feeds raw 0-255 pixels (it shows no division by 255). Under plain
            # cross-entropy that diverges to NaN in the first epoch; Keras 2 clipped probabilities
            # into [1e-7, 1 - 1e-7] inside its loss, which is what let the tutorial train at all.
            "tutorial-000", "tutorial-000", "sgd", 0.01, 500, 20, validation_split=0.1,
            input_scale=1.0, loss="keras2-clipped-cross-entropy",
            description="Tutorial 000: 784-32 dense net on raw pixels, SGD, batch 500, 20 epochs, "
            "last 10% validation",
        ),
        Recipe(
            "tutorial-001", "tutorial-001", "adam", 0.001, 128, 5,
            description="Tutorial 001: 512-512 dense net with dropout 0.2, Adam, batch 128, 5 epochs",
        ),
        Recipe(
            "tutorial-002", "tutorial-002", "sgd", 0.01, 32, 10,
            description="Tutorial 002: one sigmoid layer of 10, SGD, Keras's default batch 32, 10 epochs",
        ),
        Recipe(
            "tutorial-003", "tutorial-003", "adam", 0.001, 128, 10, validation_split=0.1,
            description="Tutorial 003: small CNN (32, 64 filters), Adam, batch 128, 10 epochs, last 10% validation",
        ),
        Recipe(
            "tutorial-004", "tutorial-004", "rmsprop", 0.001, 128, 5,
            description="Tutorial 004: 512 dense net, RMSprop, batch 128, 5 epochs",
        ),
        Recipe(
            # benchmarks/time_to_accuracy.py on 2 CPU cores, 5 seeds: 99.05% mean, 1.6 s of training each.
            # The previous recipe (fast-cnn, batch 64, lr 0.01) measured 99.04% in 4.1 s.
            "fast", "strided-cnn", "adamw", 0.025, 192, 1, weight_decay=0.01, schedule="onecycle",
            label_smoothing=0.1, bf16=True, channels_last=True,
            description="Fastest to 99%: small strided CNN, one epoch, AdamW one-cycle, label smoothing, bfloat16 "
            "autocast, channels-last",
        ),
        Recipe(
            "best", "best-cnn", "adamw", 0.003, 128, 15, weight_decay=5e-4, schedule="onecycle", augment=True,
            label_smoothing=0.1, ema_decay=0.999, bf16=True, channels_last=True,
            description="Best single network: batch-norm CNN, random affine augmentation, AdamW one-cycle, "
            "label smoothing, weight averaging",
        ),
        Recipe(
            "ensemble", "ensemble", "adamw", 0.003, 128, 15, members=3, member_recipe="best",
            description="Three 'best' networks (seeds 0, 1, 2) with their probabilities averaged",
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise DeepDigitsError(f"unknown recipe {name!r}; expected one of: {', '.join(RECIPES)}") from None


def _keras2_clipped_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Keras 2's categorical cross-entropy on softmax outputs: probabilities clipped to [1e-7, 1 - 1e-7].

    Clipping zeroes the gradient of saturated outputs instead of letting it overflow.
    """
    probabilities = torch.softmax(logits, dim=1).clamp(1e-7, 1.0 - 1e-7)
    return -torch.log(probabilities.gather(1, target[:, None])).mean()


LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross-entropy": F.cross_entropy,
    "keras2-clipped-cross-entropy": _keras2_clipped_cross_entropy,
}


OPTIMIZERS = ("sgd", "adam", "rmsprop", "adamw", "nesterov")


def make_optimizer(name: str, params, learning_rate: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer with Keras's defaults (which differ from PyTorch's for epsilon and RMSprop's rho)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=learning_rate, betas=(0.9, 0.999), eps=1e-7, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=learning_rate, alpha=0.9, eps=1e-7, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    if name == "nesterov":
        return torch.optim.SGD(params, lr=learning_rate, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    raise DeepDigitsError(f"unknown optimizer {name!r}; expected one of: {', '.join(OPTIMIZERS)}")


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0, translate: float = 0.1,
    scale: tuple[float, float] = (0.9, 1.1),
) -> torch.Tensor:
    """Random affine transform of each image: rotation, shift (fraction of the width) and zoom.

    Done on the whole batch with one ``affine_grid``/``grid_sample``, so it costs little next to the network.
    """
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    angle = uniform(-degrees, degrees) * (math.pi / 180.0)
    zoom = uniform(*scale)
    shift_x, shift_y = uniform(-2 * translate, 2 * translate), uniform(-2 * translate, 2 * translate)
    return affine_warp(x, angle, zoom, shift_x, shift_y)


def affine_warp(x: torch.Tensor, angle: torch.Tensor, zoom: torch.Tensor, shift_x: torch.Tensor,
                shift_y: torch.Tensor) -> torch.Tensor:
    """Rotate (radians), zoom and shift (in [-1, 1] image coordinates) each image of (N, 1, H, W), bilinear.

    Each transform argument holds one value per image.
    """
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA GPUs from Ampere on, CPUs with AVX-512 BF16 or AMX.

    Elsewhere bfloat16 is emulated and slow: on an AVX2-only CPU (2 cores) a training step of ``best-cnn``
    at batch 128 took 2,354 ms under bfloat16 autocast against 226 ms in float32, and one of
    ``strided-cnn`` at batch 192 116 ms against 13 ms, so ``fit`` trains in float32 there.
    """
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.4 had no including_emulation
            return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        return any(getattr(torch.cpu, name, lambda: False)()
                   for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: BF16 dot-product instructions


def training_precision(bf16: bool, device: torch.device) -> str:
    """What ``fit`` trains in on ``device``: "bfloat16" where asked for and native, else "float32"."""
    return "bfloat16" if bf16 and native_bf16(device) else "float32"


def precision_text(bf16: bool, device: torch.device) -> str:
    """The arithmetic ``fit`` will train in, as the settings line reports it."""
    if training_precision(bf16, device) == "bfloat16":
        return "bfloat16 autocast"
    if bf16:
        return "float32 (this processor has no native bfloat16, where autocast runs about 10x slower)"
    return "float32"


def epochs_text(epochs: int) -> str:
    """'1 epoch', '15 epochs': for the lines that report a run."""
    return f"{epochs} epoch" + ("s" if epochs != 1 else "")


@dataclass
class History:
    """Per-epoch metrics, as Keras's ``History.history`` but one dict per epoch."""

    epochs: list[dict] = field(default_factory=list)
    interrupted: bool = False
    train_seconds: float = 0.0
    precision: str = "float32"  # or "bfloat16": what the forward pass ran in

    def column(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs if key in e]


# Inference runs in chunks of this many images with channels-last weights and inputs: on 2 CPU cores the
# `best` network scored the 10,000 test images 3.7x as fast that way as in chunks of 2,000 in the plain
# layout (2,279 against 607 images/s on an AVX2 machine; 3,936 against 1,126 on an AVX-512 one): large
# chunks fall out of cache, and oneDNN's convolutions prefer channels-last.
INFERENCE_BATCH = 128


def channels_last(network: nn.Module) -> nn.Module:
    """Switch ``network``'s convolution weights to channels-last in place, unless they already are."""
    # any kernel, not the first: a (C, 1, k, k) kernel of a one-channel input is contiguous in both layouts
    kernels = [p for p in network.parameters() if p.dim() == 4]
    if any(not k.is_contiguous(memory_format=torch.channels_last) for k in kernels):
        network.to(memory_format=torch.channels_last)
    return network


@torch.no_grad()
def evaluate_batches(network: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = INFERENCE_BATCH) -> dict:
    """Mean cross-entropy loss and accuracy of ``network`` in eval mode."""
    was_training = network.training
    network.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        logits = network(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
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


class _Progress:
    """A live bar within each epoch (step, loss, accuracy, time left) and a Keras-style line per epoch."""

    def __init__(self, epochs: int, steps: int, verbose: int):
        self.epochs, self.steps, self.verbose = epochs, steps, verbose
        self.progress = None
        if verbose >= 1:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = Console(stderr=True)
            if self.console.is_terminal:
                self.progress = Progress(
                    TextColumn("[bold]Epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}  accuracy {task.fields[acc]:.4f}"),
                    TimeRemainingColumn(), console=self.console, transient=True,
                )
                self.progress.start()
        self.task = None
        self.every = max(1, steps // 100)

    def start_epoch(self, epoch: int) -> None:
        if self.progress is not None:
            self.task = self.progress.add_task(
                "", total=self.steps, epoch=f"{epoch}/{self.epochs}", loss=0.0, acc=0.0
            )

    def step(self, step: int, loss: float, acc: float) -> None:
        if self.task is not None and (step % self.every == 0 or step == self.steps):
            self.progress.update(self.task, completed=step, loss=loss, acc=acc)

    def end_epoch(self, epoch: int, metrics: dict) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
        if self.verbose >= 1:
            parts = [f"{k}: {v:.4f}" for k, v in metrics.items() if k not in ("epoch", "seconds")]
            line = f"Epoch {epoch}/{self.epochs} - {metrics['seconds']:.1f}s - " + " - ".join(parts)
            self.console.print(line, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


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
    bfloat16 autocast, used only where the device computes bfloat16 natively (:func:`native_bf16`).
    """
    if len(x) == 0:
        raise DeepDigitsError("training data is empty")
    if loss not in LOSSES:
        raise DeepDigitsError(f"unknown loss {loss!r}; expected one of: {', '.join(LOSSES)}")
    if schedule not in ("constant", "onecycle"):
        raise DeepDigitsError(f"unknown schedule {schedule!r}; expected constant or onecycle")
    if label_smoothing and loss != "cross-entropy":
        raise DeepDigitsError("label smoothing needs loss 'cross-entropy'")
    loss_fn = LOSSES[loss]
    if label_smoothing:
        def loss_fn(logits, target):
            return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    device = device or default_device()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network.to(device, memory_format=memory_format)
    x, y = x.to(device).contiguous(memory_format=memory_format), y.to(device)
    if x_val is not None and y_val is not None:
        x_val, y_val = x_val.to(device).contiguous(memory_format=memory_format), y_val.to(device)
    opt = make_optimizer(optimizer, network.parameters(), learning_rate, weight_decay)
    steps = math.ceil(len(x) / batch_size)
    scheduler = None
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=learning_rate, total_steps=epochs * steps,
                                                        pct_start=0.25)
    averaged = WeightAverage(network, ema_decay) if ema_decay else None
    shuffle = torch.Generator(device="cpu").manual_seed(seed)
    augment_rng = torch.Generator(device="cpu").manual_seed(seed + 1)
    torch.manual_seed(seed)  # dropout masks
    precision = training_precision(bf16, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    history = History(precision=precision)
    progress = _Progress(epochs, steps, verbose)
    last_good = copy.deepcopy(network.state_dict())
    started = time.perf_counter()
    try:
        for epoch in range(1, epochs + 1):
            network.train()
            epoch_start = time.perf_counter()
            order = torch.randperm(len(x), generator=shuffle).to(device)
            progress.start_epoch(epoch)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for step in range(1, steps + 1):
                idx = order[(step - 1) * batch_size : step * batch_size]
                xb, yb = x[idx], y[idx]
                if augment:
                    xb = augment_batch(xb, augment_rng)
                with autocast:
                    logits = network(xb).float()
                batch_loss = loss_fn(logits, yb)
                opt.zero_grad(set_to_none=True)
                batch_loss.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
                if averaged is not None:
                    averaged.update(network)
                loss_sum += batch_loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == yb).sum()
                seen += len(idx)
                if progress.task is not None:
                    progress.step(step, loss_sum.item() / seen, correct.item() / seen)
            metrics = {"epoch": epoch, "loss": loss_sum.item() / seen, "accuracy": correct.item() / seen}
            if x_val is not None and y_val is not None and len(x_val):
                val = evaluate_batches(averaged.module if averaged is not None else network, x_val, y_val)
                metrics.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            metrics["seconds"] = time.perf_counter() - epoch_start
            if not math.isfinite(metrics["loss"]):
                raise DeepDigitsError(
                    f"training diverged at epoch {epoch} (loss is {metrics['loss']}); "
                    f"try a smaller learning rate than {learning_rate}"
                )
            history.epochs.append(metrics)
            final = averaged.module if averaged is not None else network
            last_good = copy.deepcopy(final.state_dict())
            progress.end_epoch(epoch, metrics)
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
    except KeyboardInterrupt:
        history.interrupted = True
        if verbose:
            print(f"Interrupted: keeping the weights of epoch {len(history.epochs)}.", file=sys.stderr)
    finally:
        progress.close()
    # the last finished epoch's weights (the averaged ones with ema_decay); plain layout for saving
    network.load_state_dict(last_good)
    if history.epochs:
        recompute_batch_norm(network, x)
    network.to(memory_format=torch.contiguous_format)
    history.train_seconds = time.perf_counter() - started
    network.eval()
    return history

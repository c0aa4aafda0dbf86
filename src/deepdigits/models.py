"""Named network architectures (the five tutorial networks and more) and a Keras-style summary."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import fused, liverows
from .errors import DeepDigitsError

INPUT_SHAPE = (1, 28, 28)  # every network takes (N, 1, 28, 28) floats; dense ones flatten first
N_CLASSES = 10


@dataclass(frozen=True)
class Architecture:
    name: str
    description: str
    build: Callable[[], nn.Sequential]
    aliases: tuple[str, ...] = ()
    keras_init: bool = True  # False: keep PyTorch's default initialisation


REGISTRY: dict[str, Architecture] = {}
_ALIASES: dict[str, str] = {}


def register(name: str, description: str, aliases: tuple[str, ...] = (), keras_init: bool = True):
    """Decorator: add a builder of an ``nn.Sequential`` to the registry under ``name``."""

    def decorator(build: Callable[[], nn.Sequential]) -> Callable[[], nn.Sequential]:
        REGISTRY[name] = Architecture(name, description, build, aliases, keras_init)
        for alias in aliases:
            _ALIASES[alias] = name
        return build

    return decorator


def resolve_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases."""
    if name in REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise DeepDigitsError(f"unknown architecture {name!r}; expected one of: {', '.join(REGISTRY)}")


def keras_init_(model: nn.Module) -> nn.Module:
    """Initialise as Keras does: Glorot-uniform weights and zero biases for Dense and Conv2D layers."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def build_model(name: str, seed: int | None = None) -> nn.Sequential:
    """A fresh network of a registered architecture, Keras-initialised unless the architecture opts out.

    The network outputs logits; ``torch.softmax`` of them is what Keras's softmax layer gives.
    """
    arch = REGISTRY[resolve_name(name)]
    if seed is not None:
        torch.manual_seed(seed)
    model = arch.build()
    model.architecture = arch.name  # type: ignore[attr-defined]
    return keras_init_(model) if arch.keras_init else model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- quicker layers, same functions


class Dropout(nn.Dropout):
    """``nn.Dropout`` whose mask on the CPU is made of 16-bit integers, four from each full-range 64-bit draw of
    torch's generator: a value is kept where its integer is at least round(p * 65536) - 32768, so with
    probability 1 - round(p * 65536) / 65536 (0.8000031 for p = 0.2, exactly 0.5 for p = 0.5), and scaled by
    1 / (1 - p). Drawn as ``uniform >= p`` in the activations' bfloat16 under autocast (as before), a mask kept
    79.84% for p = 0.2 and 49.91% for 0.5 (bfloat16 rounds the uniform numbers; 200 masks each), and took
    317 us for 128 x 512 values against 140 us now, 1,007 against 423 us for 128 x 1,600 (1 thread, 8 alternated
    rounds; torch's ``bernoulli_`` 410 and 1,300 us). Other devices keep torch's fused kernel. The
    masks differ from torch's for a seed, not in distribution.

    The mask is written as integers of the activations' width, 0 or the bit pattern of 1 / (1 - p) in their
    dtype, and read as that dtype: the same values as a boolean mask cast and scaled, bit for bit, without
    the cast from bool, which is slow on the CPU (128 x 512, 1 thread: comparison and cast from bool 78 us,
    comparison into int16 5 us; dropout forward and backward 202 -> 115 us)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.p == 1.0:
            return super().forward(x)
        bits = _SAME_WIDTH_INT.get(x.dtype)
        if bits is None:
            return super().forward(x)
        n = x.numel()
        keep = torch.empty(n, dtype=bits)
        torch.ge(dropout_draws(n), dropout_threshold(self.p), out=keep)  # 1 where kept, else 0
        keep = keep.mul_(_scale_bits(self.p, x.dtype)).view(x.dtype).view(x.shape)  # 0 or the scale's bit pattern
        return x.mul_(keep) if self.inplace else x * keep


def dropout_draws(n: int) -> torch.Tensor:
    """``n`` uniform 16-bit integers for a dropout mask: all 64 bits of each of torch's draws, four per draw."""
    draws = torch.empty(-(-n // 4) * 4, dtype=torch.int16)
    draws.view(torch.int64).random_(-(2**63), None)
    return draws[:n]


def dropout_threshold(p: float) -> int:
    """The least draw kept by dropout at rate ``p``: kept with probability 1 - round(p * 65536) / 65536."""
    return round(p * 65536) - 32768


# integers as wide as each floating dtype, for Dropout's mask
_SAME_WIDTH_INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
                   torch.float64: torch.int64}


@functools.cache
def _scale_bits(p: float, dtype: torch.dtype) -> int:
    """The bit pattern of 1 / (1 - p) rounded to ``dtype``, as an integer of its width."""
    return int(torch.tensor(1.0 / (1.0 - p), dtype=dtype).view(_SAME_WIDTH_INT[dtype]).item())


class PooledReLU(nn.ReLU):
    """The ReLU of a convolution that a ``MaxPoolReLU`` follows: an identity here, applied after the pooling.

    It keeps its place (and type) so the layer list, the parameter names and the Keras-style summary
    (``Conv2D, relu``) stay the tutorial's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class MaxPoolReLU(nn.MaxPool2d):
    """Max pooling, then the ReLU of the ``PooledReLU`` before it.

    The same function as ReLU then max pooling (both are monotone, so they commute), with ReLU forward and
    back on a quarter of the values: one epoch of tutorial 003 took 1.30x less time (1.04-1.57x), 1.88x
    with channels-last as well (2 runs each, alternated, 2 busy cores).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` that runs on the CPU, where the kernels of ``fused`` could be built: a leading one-channel
    3x3 convolution, ``PooledReLU`` and ``MaxPoolReLU(2)`` as one kernel; ReLU then ``Dropout`` in training as
    one, and ``MaxPoolReLU(2)``, ``Flatten`` and ``Dropout`` likewise; Linear layers through the bfloat16 copies
    a ``fused.Bf16Adam``, ``Bf16RMSprop`` or ``Bf16SGD`` keeps, inside its training steps. The same layers,
    parameter names and function. With ``live_rows`` set (tutorial 000, whose clipped loss zeroes most rows'
    gradients), a chain of Linear and ReLU layers (after any ``Flatten``) trains as one ``liverows.chain``, whose
    backward pass skips the batch rows without a gradient (through a ``fused.Bf16SGD``'s copies where one serves
    it)."""

    live_rows = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copies = fused.active_copies() if self.training and torch.is_grad_enabled() else None
        layers = list(self)
        i = 0
        while i < len(layers) and type(layers[i]) is nn.Flatten:
            x, i = layers[i](x), i + 1
        if self.live_rows and self.training:
            weights = None  # the layers' own, or the bfloat16 copies a Bf16SGD keeps (and steps from)
            if copies is not None and all(layer in copies for layer in layers[i::2]):
                weights = [w for layer in layers[i::2] for w in copies[layer].current()]
            if (copies is None or weights is not None) and liverows.can_run(layers[i:], x):
                return liverows.chain(layers[i:], x, weights)
        if (len(layers) >= 3 and type(layers[0]) is nn.Conv2d and type(layers[1]) is PooledReLU
                and type(layers[2]) is MaxPoolReLU and fused.can_fuse(layers[0], layers[2], x)):
            x, i = fused.conv_pool_relu(layers[0], x), 3
        while i < len(layers):
            layer, following = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if copies is not None and layer in copies:
                x = nn.functional.linear(x, *copies[layer].current())
            elif (type(layer) is nn.ReLU and isinstance(following, Dropout) and following.training
                  and fused.can_fuse_relu_dropout(following.p, x)):
                x = fused.relu_dropout(x, following.p)
                i += 1
            elif (type(layer) is MaxPoolReLU and type(following) is nn.Flatten and i + 2 < len(layers)
                  and isinstance(layers[i + 2], Dropout) and layers[i + 2].training
                  and fused.can_fuse_pool_relu_dropout(layer, following, layers[i + 2].p, x)):
                x = fused.pool_relu_dropout(x, layers[i + 2].p)
                i += 2
            else:
                x = layer(x)
            i += 1
        return x


# --------------------------------------------------------------------------- the tutorials' networks


@register("tutorial-000", "Dense 784 relu, Dense 32 relu, Dense 10 softmax", aliases=("mlp-784-32",))
def _tutorial_000() -> nn.Sequential:
    network = FusedSequential(
        nn.Flatten(),
        nn.Linear(784, 784), nn.ReLU(),
        nn.Linear(784, 32), nn.ReLU(),
        nn.Linear(32, N_CLASSES),
    )
    network.live_rows = True  # its recipe's clipped loss leaves most rows without a gradient (liverows)
    return network


@register(
    "tutorial-001",
    "Dense 512 relu, Dropout 0.2, Dense 512 relu, Dropout 0.2, Dense 10 softmax",
    aliases=("mlp-512-512-dropout",),
)
def _tutorial_001() -> nn.Sequential:
    return FusedSequential(
        nn.Flatten(),
        nn.Linear(784, 512), nn.ReLU(), Dropout(0.2),
        nn.Linear(512, 512), nn.ReLU(), Dropout(0.2),
        nn.Linear(512, N_CLASSES),
    )


@register("tutorial-002", "Dense 10 sigmoid, Dense 10 softmax", aliases=("sigmoid-10",))
def _tutorial_002() -> nn.Sequential:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 10), nn.Sigmoid(),
        nn.Linear(10, N_CLASSES),
    )


@register(
    "tutorial-003",
    "Conv 32 3x3 relu, MaxPool 2, Conv 64 3x3 relu, MaxPool 2, Flatten, Dropout 0.5, Dense 10 softmax",
    aliases=("cnn-32-64",),
)
def _tutorial_003() -> nn.Sequential:
    # Conv, relu, max-pool as the tutorial; the relu is applied after the pooling (the same function, see
    # MaxPoolReLU), so parameter names and the summary are those of the plain layers. The first three run as one
    # fused kernel on the CPU (FusedSequential).
    return FusedSequential(
        nn.Conv2d(1, 32, 3), PooledReLU(), MaxPoolReLU(2),
        nn.Conv2d(32, 64, 3), PooledReLU(), MaxPoolReLU(2),
        # Keras flattens channels-last (H, W, C); the order does not change what the network can learn.
        nn.Flatten(), Dropout(0.5),
        nn.Linear(5 * 5 * 64, N_CLASSES),
    )


@register("tutorial-004", "Dense 512 relu, Dense 10 softmax", aliases=("mlp-512",))
def _tutorial_004() -> nn.Sequential:
    return FusedSequential(
        nn.Flatten(),
        nn.Linear(784, 512), nn.ReLU(),
        nn.Linear(512, N_CLASSES),
    )


# --------------------------------------------------------------------------- beyond the tutorials


def _conv_bn(inputs: int, outputs: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(inputs, outputs, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(outputs), nn.ReLU()]


@register("fast-cnn", "Conv 16 5x5, MaxPool 2, relu, Conv 32 5x5, MaxPool 2, relu, Dense 10 softmax: small and quick")
def _fast_cnn() -> nn.Sequential:
    # Pooling before relu is the same function (max and relu commute) with relu on a quarter of the
    # values: measured 23% faster per epoch on 2 CPU cores (5.05 s against 6.53 s for two epochs).
    return nn.Sequential(
        nn.Conv2d(1, 16, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 32, 5), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 4 * 32, N_CLASSES),
    )


class Standardize(nn.Module):
    """Shift and scale inputs to zero mean and unit variance over the training set (Keras's Normalization)."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean), persistent=False)
        self.register_buffer("std", torch.tensor(std), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # of the 60,000 training images scaled to [0, 1]


@register(
    "strided-cnn",
    "Standardize, Conv 16 6x6 stride 2 relu, Conv 24 3x3, MaxPool 2, relu, Dense 128 relu, Dense 10 softmax: "
    "the quickest to 99%",
    # PyTorch's default initialisation: 99.05% mean after one epoch over 5 seeds against 99.00% with
    # Glorot-uniform, in the same sweep.
    keras_init=False,
)
def _strided_cnn() -> nn.Sequential:
    # A 6x6 stride-2 convolution is what a 5x5 convolution followed by 2x2 average pooling computes, at a
    # quarter of the positions and without a pooling layer (max pooling over the 24x24 maps took a quarter
    # of every step). One epoch at batch 192 on 2 CPU cores, side by side on 24x24 crops: 1.45 s against 2.19 s with
    # Conv 16 5x5 + MaxPool 2. The hidden Dense 128 costs little and added 0.2 points after one epoch
    # (98.95% -> 99.15%, 3 seeds).
    return nn.Sequential(
        Standardize(MNIST_MEAN, MNIST_STD),
        nn.Conv2d(1, 16, 6, stride=2), nn.ReLU(),
        nn.Conv2d(16, 24, 3), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 5 * 24, 128), nn.ReLU(), nn.Linear(128, N_CLASSES),
    )


@register(
    "best-cnn",
    "VGG-style: 2x Conv 32, pool, 2x Conv 64, pool, Conv 128, pool (3x3, batch norm, relu), Dense 10 softmax",
)
def _best_cnn() -> nn.Sequential:
    return nn.Sequential(
        *_conv_bn(1, 32), *_conv_bn(32, 32), nn.MaxPool2d(2),
        *_conv_bn(32, 64), *_conv_bn(64, 64), nn.MaxPool2d(2),
        *_conv_bn(64, 128), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(0.2), nn.Linear(3 * 3 * 128, N_CLASSES),
    )


@register(
    "strided-bn-cnn",
    "Conv 32 5x5 stride 2, [Conv 64, MaxPool 2, Conv 64], [Conv 128, MaxPool 2, Conv 128] (3x3, batch norm, "
    "relu), Dropout 0.2, Dense 10 softmax: best-cnn's depth at a quarter of its pixels",
)
def _strided_bn_cnn() -> nn.Sequential:
    # No 28x28 feature maps: a stride-2 stem, and each pooling straight after its convolution so batch norm
    # and relu run on the pooled quarter. Batch norm, pooling and relu, not the convolutions, took most of
    # best-cnn's step (torch.profiler). A training step at batch 128 (bfloat16, channels-last, augmented) took
    # 0.40x best-cnn's time (1 thread, 4 alternated rounds, machine busy, load 7); a three-convolution
    # version (Conv 32, 64, 128 at 28, 14, 7 pixels) took 0.57x but reached only 99.30% in 3 epochs.
    def conv(inputs: int, outputs: int, pool: bool) -> list[nn.Module]:
        return [nn.Conv2d(inputs, outputs, 3, padding=1, bias=False), *([nn.MaxPool2d(2)] if pool else []),
                nn.BatchNorm2d(outputs), nn.ReLU()]

    return nn.Sequential(
        nn.Conv2d(1, 32, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        *conv(32, 64, True), *conv(64, 64, False),
        *conv(64, 128, True), *conv(128, 128, False),
        nn.Flatten(), Dropout(0.2), nn.Linear(3 * 3 * 128, N_CLASSES),
    )


# --------------------------------------------------------------------------- ensembles


class Ensemble(nn.Module):
    """Several networks whose probabilities are averaged.

    ``forward`` returns the log of the mean probability, so ``softmax`` of it is exactly that mean and
    every consumer of logits (evaluation, prediction, ONNX export) works unchanged.
    """

    def __init__(self, members: list[nn.Module], architectures: list[str]):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.architectures = list(architectures)
        self.architecture = "ensemble"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([torch.softmax(member(x), dim=1) for member in self.members]).mean(dim=0)
        return torch.log(mean.clamp_min(1e-30))


def build_ensemble(architectures: list[str], seed: int | None = None) -> Ensemble:
    if len(architectures) < 2:
        raise DeepDigitsError(f"an ensemble needs at least 2 members, got {len(architectures)}")
    names = [resolve_name(a) for a in architectures]
    if seed is not None:
        torch.manual_seed(seed)
    return Ensemble([build_model(name) for name in names], names)


# --------------------------------------------------------------------------- summary

# torch module -> (Keras layer type, Keras's default layer name)
_KERAS_TYPES = {
    nn.Linear: ("Dense", "dense"),
    nn.Conv2d: ("Conv2D", "conv2d"),
    nn.MaxPool2d: ("MaxPooling2D", "max_pooling2d"),
    nn.Flatten: ("Flatten", "flatten"),
    nn.Dropout: ("Dropout", "dropout"),
    nn.BatchNorm2d: ("BatchNormalization", "batch_normalization"),
    nn.BatchNorm1d: ("BatchNormalization", "batch_normalization"),
    Standardize: ("Normalization", "normalization"),
}
_ACTIVATIONS = {nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Softmax: "softmax"}


def summary_rows(model: nn.Sequential) -> list[dict]:
    """One row per Keras-style layer: name, type, activation, output shape and parameter count.

    Activation modules are folded into the layer before them, as Keras's ``activation=`` does;
    the last Dense layer is shown with softmax because the loss applies it.
    """
    rows: list[dict] = []
    counters: dict[str, int] = {}
    x = torch.zeros(1, *INPUT_SHAPE)
    with torch.no_grad():
        for module in model:
            x = module(x)
            activation = next((a for t, a in _ACTIVATIONS.items() if isinstance(module, t)), None)
            if activation and rows:
                rows[-1]["activation"] = activation
                continue
            own = (type(module).__name__, type(module).__name__.lower())
            kind, base = next((k for t, k in _KERAS_TYPES.items() if isinstance(module, t)), own)
            index = counters.get(base, 0)
            counters[base] = index + 1
            rows.append({
                "name": base if index == 0 else f"{base}_{index}",
                "type": kind,
                "activation": None,
                "output_shape": [None, *x.shape[1:]],
                "params": sum(p.numel() for p in module.parameters()),
            })
    dense_rows = [r for r in rows if r["type"] == "Dense"]
    if dense_rows and dense_rows[-1] is rows[-1] and rows[-1]["activation"] is None:
        rows[-1]["activation"] = "softmax"
    return rows


def summary_dict(model: nn.Module, name: str | None = None) -> dict:
    if isinstance(model, Ensemble):
        rows = [
            {"name": f"member_{i}", "type": arch, "activation": "softmax", "output_shape": [None, N_CLASSES],
             "params": count_params(member)}
            for i, (arch, member) in enumerate(zip(model.architectures, model.members, strict=True))
        ]
    else:
        rows = summary_rows(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_params(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_size = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "name": name or getattr(model, "architecture", type(model).__name__),
        "input_shape": [None, *INPUT_SHAPE],
        "layers": rows,
        "total_params": total,
        "trainable_params": trainable,
        "non_trainable_params": total - trainable,
        "total_bytes": size,
        "trainable_bytes": trainable_size,
        "non_trainable_bytes": size - trainable_size,
    }


def readable_size(size: int) -> str:
    """Bytes as Keras 3's summary shows them: ``136.04 KB`` (powers of 1024)."""
    value = float(size)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} GB"


def summary(model: nn.Module, name: str | None = None) -> str:
    """The model as Keras's ``model.summary()`` prints it: layers, output shapes, parameters, totals.

    An ensemble lists its members (probabilities averaged), each with its architecture and size.
    """
    info = summary_dict(model, name)
    if isinstance(model, Ensemble):
        head = [f'Model: "{info["name"]}": {len(model.members)} members, probabilities averaged']
        head += [f"  member_{i}: {row['type']} ({row['params']:,} params)" for i, row in enumerate(info["layers"])]
        head.append(f"Total params: {info['total_params']:,} ({readable_size(info['total_bytes'])})")
        return "\n".join(head)

    def shape(s: list) -> str:
        return "(" + ", ".join("None" if d is None else str(d) for d in s) + ")"

    lines_data = []
    for row in info["layers"]:
        kind = row["type"] + (f", {row['activation']}" if row["activation"] else "")
        lines_data.append((f"{row['name']} ({kind})", shape(row["output_shape"]), f"{row['params']:,}"))
    w1 = max(len("Layer (type)"), *(len(r[0]) for r in lines_data)) + 2
    w2 = max(len("Output Shape"), *(len(r[1]) for r in lines_data)) + 2
    w3 = max(len("Param #"), *(len(r[2]) for r in lines_data))
    width = w1 + w2 + w3
    out = [f'Model: "{info["name"]}"', "━" * width]
    out.append(f"{'Layer (type)':<{w1}}{'Output Shape':<{w2}}{'Param #':>{w3}}")
    out.append("━" * width)
    for i, (a, b, c) in enumerate(lines_data):
        out.append(f"{a:<{w1}}{b:<{w2}}{c:>{w3}}")
        out.append("━" * width if i == len(lines_data) - 1 else "─" * width)
    for kind in ("total", "trainable", "non_trainable"):
        label = kind.replace("_", "-").capitalize()
        out.append(f"{label} params: {info[f'{kind}_params']:,} ({readable_size(info[f'{kind}_bytes'])})")
    return "\n".join(out)


def describe(name: str) -> tuple[str, dict]:
    """The summary text and JSON of an architecture, a recipe's network, or a saved bundle's network."""
    from pathlib import Path

    if Path(name).is_dir():
        from .classifier import Classifier

        clf = Classifier.load(name)
        return clf.summary(), summary_dict(clf.network, clf.architecture)
    from .recipes import RECIPES

    recipe = RECIPES.get(name)
    if recipe is not None and recipe.members:
        members = [RECIPES[recipe.member_recipe].architecture] * recipe.members
        model: nn.Module = build_ensemble(members, seed=0)
    else:
        architecture = recipe.architecture if recipe is not None else name
        if architecture not in REGISTRY and architecture not in _ALIASES:
            raise DeepDigitsError(f"{name!r} is not an architecture, a recipe or a bundle folder; architectures: "
                                  f"{', '.join(REGISTRY)}; recipes: {', '.join(RECIPES)}")
        architecture = resolve_name(architecture)
        model = build_model(architecture)
    shown = name if recipe is None else f"{name} ({getattr(model, 'architecture', 'ensemble')})"
    return summary(model, shown), summary_dict(model, shown)

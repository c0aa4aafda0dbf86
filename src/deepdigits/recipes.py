"""Named training recipes: plain data (network, optimizer, batch, epochs, ...), importable without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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
    # >0: this many training digits also photographed and read back by the recogniser (data.photo_crops),
    # added to the training set: the crops the network meets in photos, not MNIST's own
    photo_crops: int = 0
    members: int = 0  # >0: an ensemble of this many networks, each trained by member_recipe with its own seed
    member_recipe: str = ""
    # without a validation split: the last fraction held out for calibration alone (0: the last 2,000 images)
    calibration_split: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def fit_options(self) -> dict:
        """The keyword arguments of ``fit`` this recipe sets."""
        names = ("optimizer", "learning_rate", "batch_size", "epochs", "seed", "loss", "weight_decay", "schedule",
                 "augment", "label_smoothing", "ema_decay", "bf16", "channels_last")
        return {name: getattr(self, name) for name in names}

    def settings_text(self, base: Recipe | None = None) -> str:
        """Epochs, batch, optimizer and rate, seed and the options beyond the tutorials, in words; each setting
        that differs from ``base`` (the named recipe a run started from) shows the recipe's value too."""
        def value(name: str, text: str) -> str:
            if base is not None and getattr(base, name) != getattr(self, name):
                return f"{text} (recipe: {getattr(base, name):g})"
            return text

        parts = [
            value("epochs", f"{self.epochs} epoch" + ("s" if self.epochs != 1 else "")),
            value("batch_size", f"batch size {self.batch_size}"),
            value("learning_rate", f"{self.optimizer} learning rate {self.learning_rate:g}"),
            value("seed", f"seed {self.seed}"),
        ]
        if self.validation_split:
            parts.append(f"last {self.validation_split:.0%} held out for validation")
        if self.weight_decay:
            parts.append(f"weight decay {self.weight_decay:g}")
        if self.schedule != "constant":
            parts.append(f"{self.schedule} schedule")
        if self.augment:
            parts.append("random affine augmentation")
        if self.label_smoothing:
            parts.append(f"label smoothing {self.label_smoothing:g}")
        if self.ema_decay:
            parts.append(f"weight averaging {self.ema_decay:g}")
        if self.photo_crops:
            parts.append(value("photo_crops", f"{self.photo_crops:,} photographed training digits added"))
        if self.loss != "cross-entropy":
            parts.append(f"loss {self.loss}")
        if self.input_scale != 1 / 255:
            parts.append(f"pixels scaled by {self.input_scale:g}")
        return ", ".join(parts)

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
            # bfloat16 autocast where native, as tutorial 003 (0-255 pixels are exact in bfloat16): the whole
            # recipe 14.8/14.6 s -> 7.8/7.7 s, test accuracy 96.57/96.68% against 96.69/95.98% in float32,
            # seeds 0/1, AVX-512 BF16 + AMX, 2 quiet cores.
            "tutorial-000", "tutorial-000", "sgd", 0.01, 500, 20, validation_split=0.1,
            input_scale=1.0, loss="keras2-clipped-cross-entropy", bf16=True,
            description="Tutorial 000: 784-32 dense net on raw pixels, SGD, last 10% validation",
        ),
        Recipe(
            # bfloat16 autocast where native, as tutorial 003: a step 1.25x as fast (CPU time 1.30x), whole
            # recipe 1.34x/1.53x, test accuracy 98.00/97.64% against 97.76/97.61% in float32, seeds 0/1
            "tutorial-001", "tutorial-001", "adam", 0.001, 128, 5, bf16=True,
            description="Tutorial 001: 512-512 dense net with dropout 0.2, Adam",
        ),
        Recipe(
            # the last 10,000 training images held out for calibration: its top-label map fit on the last 2,000
            # (MNIST's easiest slice) missed ECE 1% on the test set, on 10,000 it met it (benchmarks/RESULTS.md,
            # "Calibration"); test accuracy 88.6-88.9% against 89.1-89.5% trained on 58,000, seeds 0-2
            "tutorial-002", "tutorial-002", "sgd", 0.01, 32, 10, calibration_split=1 / 6,
            description="Tutorial 002: one sigmoid layer of 10, SGD (Keras's default batch size)",
        ),
        Recipe(
            # bfloat16 autocast where the CPU computes it natively (float32 elsewhere; the Keras tutorial ran
            # float32): a training step 1.22x as fast (1.07-1.37x; CPU time 1.23x), 10 alternated blocks, AVX-512
            # BF16/AMX, 2 busy cores; test accuracy 99.11/99.13% against 99.05/99.14% in float32, seeds 0/1
            # (benchmarks/RESULTS.md, "Speed-ups tried").
            "tutorial-003", "tutorial-003", "adam", 0.001, 128, 10, validation_split=0.1, bf16=True,
            description="Tutorial 003: small CNN (32, 64 filters), Adam, last 10% validation",
        ),
        Recipe(
            # bfloat16 autocast where native, as tutorial 003: a step 1.25x as fast (CPU time 1.26x), whole
            # recipe 1.70x/2.76x, test accuracy 97.95/97.59% against 97.94/97.55% in float32, seeds 0/1
            "tutorial-004", "tutorial-004", "rmsprop", 0.001, 128, 5, bf16=True,
            description="Tutorial 004: 512 dense net, RMSprop",
        ),
        Recipe(
            # benchmarks/time_to_accuracy.py on 2 CPU cores, 5 seeds: 99.05% mean, 1.6 s of training each.
            # The previous recipe (fast-cnn, batch 64, lr 0.01) measured 99.04% in 4.1 s.
            "fast", "strided-cnn", "adamw", 0.025, 192, 1, weight_decay=0.01, schedule="onecycle",
            label_smoothing=0.1, bf16=True, channels_last=True,
            description="Fastest to 99%: small strided CNN, AdamW one-cycle, label smoothing, bfloat16 "
            "autocast, channels-last",
        ),
        Recipe(
            # 99.52/99.56/99.52/99.55/99.47% for seeds 0-4, mean 99.52%, in 26.7-29.3 s of training (frontier.py
            # --seeds 5, quiet AVX-512 BF16 Xeon; the same seeds 0-3 on a busy machine before). best-cnn took 4
            # epochs for 99.52% (seed 0), with steps 2.5x as long. Seed 0, 3 epochs each: weight averaging
            # 0.999 against none 99.30/99.32% and augmentation on/off 99.37/99.36% (smaller batch-norm nets),
            # so it is off here and augmentation on.
            "quick", "strided-bn-cnn", "adamw", 0.003, 128, 3, weight_decay=5e-4, schedule="onecycle", augment=True,
            label_smoothing=0.1, bf16=True, channels_last=True,
            description="About 99.5% in 3 epochs: best's depth at a quarter of the pixels (strided stem), "
            "augmentation, AdamW one-cycle, label smoothing",
        ),
        Recipe(
            # quick trained twice as long: 99.60/99.63/99.63/99.59/99.62% for seeds 0-4, mean 99.61%, in 53.8-57.6 s
            # of training (quick 99.52% in 28.4 s; benchmarks/frontier.py --seeds 5, quiet AVX-512 BF16 Xeon)
            "medium", "strided-bn-cnn", "adamw", 0.003, 128, 6, weight_decay=5e-4, schedule="onecycle",
            augment=True, label_smoothing=0.1, bf16=True, channels_last=True,
            description="About 99.6% in 6 epochs: quick's network and schedule, trained twice as long",
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

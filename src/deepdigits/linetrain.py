"""Train the line reader (:mod:`deepdigits.linereader`) on numbers written from MNIST training digits.

    deepdigits train --recipe best --out runs/best-held-out --seed 0      # never sees the last 2,000
    python -m deepdigits.linetrain --out runs/line-1 --seed 1               # 600,000 lines, 4 epochs
    python -m deepdigits.linetrain --out runs/line-1 --fine-tune 16000 --seed 7   # then photographed numbers
    python -m deepdigits.linetrain --out runs/line-2 --seed 2               # a second network, trained apart
    python -m deepdigits.linetrain --out runs/line-2 --fine-tune 16000 --seed 8
    python -m deepdigits.linetrain --out src/deepdigits/builtin/line-reader --join runs/line-1 runs/line-2 \
        --digit-model runs/best-held-out --numbers 600                    # read together; the combination fit

Lines of 1-8 digits are written by :func:`synthetic.number_line_ink` from the first 58,000 training images;
the temperature is fit on lines written from the last 2,000 (``calibrate.HOLDOUT``), which the reader never
trains on, and :func:`fit_combination` fits how it and the segmenter are combined on photographed numbers of
those 2,000 too. The test set is never looked at. Each shipped network: 600,000 lines, 15% of them with a
letter, symbol or scribble among the digits (read "?"), 4 epochs (25 minutes on 2 threads of an AMD EPYC,
bfloat16, after 516 s writing the lines in 2 processes), then fine-tuned (``--fine-tune``,
:func:`fine_tune_line_reader`) on 16,000 numbers photographed as the benchmark photographs them, beside 8,000 ink
lines, for 2 epochs. The two read together (:func:`join_readers`), their combination fit on 600 numbers per way
of writing. The one network before them, 200,000 lines for 6 epochs (the same fine-tuning), fit its training
lines to a CTC loss of 0.0012 and longer training made it worse (250,000 lines for 8 epochs); three times the
lines, each seen 4 times, end at 0.0090 and read 96.75% of 2,000 photographed held-out numbers alone against
95.5% (benchmarks/RESULTS.md, "A line reader trained on three times the lines", and "Two line readers read
together").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from .calibrate import HOLDOUT
from .errors import BundleError, DeepDigitsError
from .linereader import (
    BLANK,
    DOCUMENT_FILE,
    FORMAT,
    FORMAT_VERSION,
    LINE_HEIGHT,
    MARK,
    MAX_MEMBERS,
    NEVER_MARK,
    STRIDE,
    WEIGHTS_FILE,
    LineNet,
    LineReader,
    check_document,
    greedy_decode,
    line_image,
)
from .synthetic import number_line_ink

MAX_DIGITS = 8
MAX_SAMPLES = 4_000_000  # ink lines: 3.1 KB each, 12 GB in all, about an hour to write on 2 processes
MAX_FINE_TUNE = 1_000_000  # photographed numbers: about 15 hours on one core, 3.9 GB of line images (16,000: 62 MB)


@dataclass
class Lines:
    """Many line images packed side by side (one uint8 array, 32 rows), their widths and digits."""

    pixels: np.ndarray  # (LINE_HEIGHT, total width)
    widths: np.ndarray  # (n,)
    labels: np.ndarray  # (n, MAX_DIGITS) digits (MARK - 1 for a mark), -1 past each line's end
    starts: np.ndarray = field(init=False)  # (n,) first column of each line

    def __post_init__(self) -> None:
        self.starts = np.concatenate([[0], np.cumsum(self.widths)[:-1]]).astype(np.int64)

    @classmethod
    def of(cls, images: list[np.ndarray], labels: np.ndarray) -> Lines:
        """Line images (32 rows each) packed side by side, with their labels."""
        return cls(np.concatenate(images, axis=1), np.array([image.shape[1] for image in images], np.int64), labels)

    @classmethod
    def joined(cls, *parts: Lines) -> Lines:
        return cls(np.concatenate([part.pixels for part in parts], axis=1),
                   np.concatenate([part.widths for part in parts]), np.concatenate([part.labels for part in parts]))

    def number(self, k: int) -> str:
        """Line ``k``'s truth as :class:`LineReading` writes it: digits, "?" for a mark."""
        return "".join("?" if d == MARK - 1 else str(d) for d in self.labels[k][self.labels[k] >= 0])

    def __len__(self) -> int:
        return len(self.widths)

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images padded to the widest (a multiple of ``STRIDE``), CTC targets, input and target lengths."""
        width = int(math.ceil(self.widths[index].max() / STRIDE) * STRIDE)
        images = np.zeros((len(index), 1, LINE_HEIGHT, width), np.float32)
        for row, k in enumerate(index):
            images[row, 0, :, : self.widths[k]] = self.pixels[:, self.starts[k] : self.starts[k] + self.widths[k]]
        labels = self.labels[index]
        targets = torch.from_numpy(labels[labels >= 0].astype(np.int64) + 1)
        steps = torch.from_numpy(np.ceil(self.widths[index] / STRIDE).astype(np.int64))
        lengths = torch.from_numpy((labels >= 0).sum(axis=1).astype(np.int64))
        return torch.from_numpy(images / 255.0), targets, steps, lengths


def write_lines(x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator, marks: float = 0.0) -> Lines:
    """``count`` lines of 1-8 digits drawn from ``x``/``y`` (as many of each length), as the reader sees them;
    in a ``marks`` share of them one of the digits is a letter, symbol, scribble or smiley instead."""
    return Lines.of(*_write_numbers(x, y, count, rng, marks, number_line_ink))


LINES_PER_CHUNK = 10_000


def write_many_lines(x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator, marks: float = 0.0,
                     processes: int = 2) -> Lines:
    """:func:`write_lines` for a training set: chunks of ``LINES_PER_CHUNK`` lines, each drawn from its own
    generator seeded from ``rng``, written by ``processes`` worker processes (the lines do not depend on how many).

    :func:`synthetic.number_line_ink` takes about 2 ms a line on one core; 600,000 lines took 516 s on 2
    processes (AMD EPYC, 2 cores).
    """
    chunks = _seeded_chunks(count, LINES_PER_CHUNK, rng)
    processes = min(processes, len(chunks), os.cpu_count() or 1)  # the lines are the same for any count
    if processes <= 1:
        parts = [_write_chunk(chunk, x, y, marks) for chunk in chunks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # forked workers inherit the images; nothing but the chunk's numbers and its lines crosses between them
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_keep_for_workers, initargs=(x, y, marks)) as pool:
            parts = list(pool.map(_write_chunk_in_worker, chunks))
    return Lines.of([image for part in parts for image in part[0]], np.concatenate([part[1] for part in parts]))


def _seeded_chunks(count: int, size: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """``count`` lines in chunks of ``size``: (first line, lines, a seed drawn from ``rng``) for each."""
    seeds = rng.integers(2**63, size=-(-count // size))
    return [(start, min(size, count - start), int(seed))
            for start, seed in zip(range(0, count, size), seeds, strict=True)]


_WORKER_DATA: tuple[np.ndarray, np.ndarray, float] | None = None


def _keep_for_workers(x: np.ndarray, y: np.ndarray, marks: float) -> None:
    global _WORKER_DATA
    _WORKER_DATA = (x, y, marks)


def _write_chunk_in_worker(chunk: tuple[int, int, int]) -> tuple[list[np.ndarray], np.ndarray]:
    assert _WORKER_DATA is not None
    return _write_chunk(chunk, *_WORKER_DATA)


def _write_chunk(chunk: tuple[int, int, int], x: np.ndarray, y: np.ndarray,
                 marks: float) -> tuple[list[np.ndarray], np.ndarray]:
    start, count, seed = chunk
    return _write_numbers(x, y, count, np.random.default_rng(seed), marks, number_line_ink, first=start)


def _write_numbers(x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator, marks: float,
                   draw: Callable[[list[np.ndarray], np.random.Generator], np.ndarray], shortest: int = 1,
                   first: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """``count`` numbers of ``shortest``-8 digits (as many of each length, counting from line ``first``), a
    ``marks`` share with a mark, each drawn by ``draw`` into ink and made a line image; and their labels."""
    from .nondigits import MARK_KINDS, write_mark

    images, labels = [], np.full((count, MAX_DIGITS), -1, np.int8)
    for k in range(count):
        chosen = rng.choice(len(x), shortest + (first + k) % (MAX_DIGITS - shortest + 1), replace=False)
        written, truth = [x[i] for i in chosen], y[chosen]
        if marks and rng.random() < marks:
            truth = truth.copy()
            truth[write_mark(written, MARK_KINDS[int(rng.integers(len(MARK_KINDS)))], rng)] = MARK - 1
        images.append(line_image(draw(written, rng)))
        labels[k, : len(chosen)] = truth
    return images, labels


def write_photographed_lines(x: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator,
                             marks: float = 0.0, threads: int = 2) -> Lines:
    """``count`` numbers of 2-8 digits from ``x``/``y`` photographed as the recognition benchmark photographs
    them (:func:`synthetic.render_number`, a way of writing from ``synthetic.CONDITIONS`` at random), their ink
    found again (:func:`preprocess.ink_map`) and made line images; ``marks`` as in :func:`write_lines`.

    Lines drawn as ink (:func:`write_lines`) read 98.0% exactly and the same photographed 97.5%, but numbers
    photographed by ``render_number`` 93-94% (held-out training digits): the way it lays out and draws them is
    what the reader had not seen. About 55 ms a line on one core; ``threads`` share the work (each chunk of
    lines draws from its own generator, seeded from ``rng``, so the lines do not depend on ``threads``).
    """
    from concurrent.futures import ThreadPoolExecutor

    chunks = _seeded_chunks(count, 250, rng)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        parts = list(pool.map(lambda chunk: _write_numbers(x, y, chunk[1], np.random.default_rng(chunk[2]), marks,
                                                           _photographed_ink, shortest=2, first=chunk[0]), chunks))
    return Lines.of([image for part in parts for image in part[0]], np.concatenate([part[1] for part in parts]))


def _photographed_ink(written: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """The number photographed by ``render_number`` in a way of writing drawn at random, its ink found again."""
    from .preprocess import ink_map, load_image
    from .synthetic import CONDITIONS, condition_options, render_number

    condition = CONDITIONS[int(rng.integers(len(CONDITIONS)))]
    return ink_map(load_image(render_number(written, rng, **condition_options(condition, rng))))


def _batches(lines: Lines, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of lines of similar width (sorted within chunks of 50 batches): little padding."""
    order = rng.permutation(len(lines))
    batches = []
    for chunk in np.array_split(order, max(1, len(order) // (size * 50))):
        chunk = chunk[np.argsort(lines.widths[chunk], kind="stable")]
        batches += [chunk[i : i + size] for i in range(0, len(chunk) - size + 1, size)]
    rng.shuffle(batches)  # type: ignore[arg-type]
    return batches


def _logits(net: LineNet, lines: Lines, size: int = 256) -> list[torch.Tensor]:
    """Each line's logits (steps, 11), in batches, in evaluation mode."""
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(lines), size):
            index = np.arange(start, min(start + size, len(lines)))
            images, _, steps, _ = lines.batch(index)
            logits = net(images).transpose(1, 2)
            out += [logits[row, : int(steps[row])] for row in range(len(index))]
    return out


def _nll(logits: list[torch.Tensor], lines: Lines, temperature: float) -> float:
    """Mean CTC negative log-likelihood of the true numbers at ``temperature``."""
    total = 0.0
    for k, lo in enumerate(logits):
        total -= LineReader.score(F.log_softmax(lo.double() / temperature, dim=1), lines.number(k))
    return total / len(logits)


def _exact(logits: list[torch.Tensor], lines: Lines) -> int:
    right = 0
    for k, lo in enumerate(logits):
        digits, _ = greedy_decode(lo.numpy())
        right += digits == [int(d) for d in lines.labels[k][lines.labels[k] >= 0]]
    return right


def train_line_reader(out: str | os.PathLike, samples: int = 600_000, epochs: int = 4, seed: int = 1,
                      data_dir: str | None = None, batch_size: int = 64, learning_rate: float = 2e-3,
                      held_out: int = 4000, marks: float = 0.15, processes: int = 2, log=print) -> dict:
    """Write lines, train a :class:`LineNet` with CTC, fit its temperature on held-out lines, save to ``out``.

    With ``marks`` (a share of the lines), the reader also learns to read a letter, symbol or scribble written
    among the digits as "?" (``linereader.MARK``)."""
    from .data import load_dataset
    from .device import native_bf16

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    mnist = load_dataset("mnist", data_dir=data_dir)
    cut = len(mnist.x_train) - HOLDOUT
    started = time.perf_counter()
    train = write_many_lines(mnist.x_train[:cut], mnist.y_train[:cut], samples, rng, marks, processes)
    check = write_lines(mnist.x_train[cut:], mnist.y_train[cut:], held_out, rng, marks)
    log(f"wrote {samples:,} training lines and {held_out:,} held-out ones in {time.perf_counter() - started:.0f} s")

    net = LineNet(marks=marks > 0)
    seconds = _train_ctc(net, train, epochs, batch_size, learning_rate, 0.15, rng, log)
    temperature, held = _fit_temperature(net, check)
    document = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "weights": {"file": WEIGHTS_FILE, "sha256": ""},
        "channels": [32, 64, 128], "context": 192, "temperature": temperature, "marks": marks > 0,
        "training": {"samples": samples, "marks": marks, "epochs": epochs, "seed": seed, "batch_size": batch_size,
                     "learning_rate": learning_rate, "seconds": round(seconds, 1),
                     "digits": f"MNIST training images 0-{cut - 1}", "bf16": native_bf16(torch.device("cpu"))},
        "held_out": {"lines": held_out, "digits": f"MNIST training images {cut}-{len(mnist.x_train) - 1}", **held},
    }
    save_reader(net, document, out)
    log(f"held out: {document['held_out']['exact']:.2%} exact, temperature {temperature:.3f}, "
        f"NLL {document['held_out']['nll_before']:.4f} -> {document['held_out']['nll_after']:.4f}")
    return document


def fine_tune_line_reader(folder: str | os.PathLike, photographed: int = 16_000, ink: int = 8_000, epochs: int = 2,
                          seed: int = 7, data_dir: str | None = None, batch_size: int = 64,
                          learning_rate: float = 5e-4, held_out: int = 2_000, log=print) -> dict:
    """Train the reader in ``folder`` further on photographed numbers (:func:`write_photographed_lines`) beside
    ink lines like its own, refit its temperature on photographed numbers of the held-out digits, and save it
    in place (its combination is dropped: fit it again with :func:`fit_combination`).

    The reader shipped before, 16,000 photographed and 8,000 ink lines for 2 epochs (38 s of training after 451 s
    of photographing on 2 threads): held-out photographed lines 94.3% -> 95.5% exact; the recognition benchmark's
    1,500 numbers 1,419 -> 1,429 exact, marks shown 451 -> 470 of 500. The one shipped now, the same way: 96.75%
    of the same held-out lines (benchmarks/RESULTS.md).
    """
    from .data import load_dataset

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    reader = LineReader.load(folder)
    if reader.document["members"]:
        raise BundleError(f"{Path(folder) / DOCUMENT_FILE}: a reader of {len(reader.members)} networks; fine-tune "
                          "each before joining them (--join)")
    net, document = reader.net, dict(reader.document)
    marks = float(document["training"].get("marks", 0.15)) if document.get("marks") else 0.0
    mnist = load_dataset("mnist", data_dir=data_dir)
    cut = len(mnist.x_train) - HOLDOUT
    started = time.perf_counter()
    train = Lines.joined(write_photographed_lines(mnist.x_train[:cut], mnist.y_train[:cut], photographed, rng, marks),
                    write_lines(mnist.x_train[:cut], mnist.y_train[:cut], ink, rng, marks))
    check = write_photographed_lines(mnist.x_train[cut:], mnist.y_train[cut:], held_out, rng, marks)
    log(f"wrote {photographed:,} photographed and {ink:,} ink lines, {held_out:,} held-out photographed ones in "
        f"{time.perf_counter() - started:.0f} s")
    seconds = _train_ctc(net, train, epochs, batch_size, learning_rate, 0.1, rng, log)
    temperature, held = _fit_temperature(net, check)
    document.pop("combine", None)
    document["temperature"] = temperature
    document["training"] = {**document["training"], "fine_tuned": {
        "photographed": photographed, "ink": ink, "epochs": epochs, "seed": seed, "learning_rate": learning_rate,
        "seconds": round(seconds, 1)}}
    document["held_out"] = {"lines": held_out, "digits": f"MNIST training images {cut}-{len(mnist.x_train) - 1}",
                            "photographed": True, **held}
    save_reader(net, document, folder)
    log(f"held out (photographed): {held['exact']:.2%} exact, temperature {temperature:.3f}, "
        f"NLL {held['nll_before']:.4f} -> {held['nll_after']:.4f}")
    return document


def _train_ctc(net: LineNet, lines: Lines, epochs: int, batch_size: int, learning_rate: float, warm_up: float,
               rng: np.random.Generator, log=print) -> float:
    """Train ``net`` on ``lines`` with CTC (AdamW, one-cycle with ``warm_up`` of the steps rising); seconds."""
    from .device import native_bf16

    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = epochs * (len(lines) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps,
                                                   pct_start=warm_up)
    bf16 = native_bf16(torch.device("cpu"))
    started = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        total, count = 0.0, 0
        for index in _batches(lines, batch_size, rng):
            images, targets, input_lengths, target_lengths = lines.batch(index)
            # ink of another contrast or pen: a random gamma per line
            images = images.pow(torch.empty(len(index), 1, 1, 1).uniform_(0.7, 1.4))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(images)
            log_probs = F.log_softmax(logits.float(), dim=1).permute(2, 0, 1)
            loss = F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=BLANK, zero_infinity=True)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + float(loss.detach()), count + 1
        log(f"epoch {epoch + 1}/{epochs}: CTC loss {total / max(count, 1):.4f}, "
            f"{time.perf_counter() - started:.0f} s")
    net.eval()
    return time.perf_counter() - started


def _fit_temperature(net: LineNet, check: Lines) -> tuple[float, dict]:
    """The temperature that minimises the held-out lines' NLL, and what it gives there."""
    logits = _logits(net, check)
    fit = minimize_scalar(lambda log_t: _nll(logits, check, math.exp(log_t)), bounds=(-2.5, 2.5), method="bounded")
    return float(math.exp(fit.x)), {"exact": _exact(logits, check) / len(check),
                                    "nll_before": _nll(logits, check, 1.0), "nll_after": float(fit.fun)}


def save_reader(net: LineNet, document: dict, out: str | os.PathLike,
                members: list[tuple[LineNet, float, dict]] | None = None) -> Path:
    """Write ``reader.safetensors`` and ``reader.json`` into ``out`` whole (``bundle.write_folder``), and each of
    ``members`` (a network, its temperature, its ``training`` and ``held_out`` records) as ``reader-2.safetensors``
    and on; a reader that would not load is refused before anything is swapped in."""
    from safetensors.torch import save_file

    from .bundle import file_sha256, write_folder

    def weights(network: LineNet, path: Path) -> str:
        save_file({k: v.detach().float().contiguous() for k, v in network.state_dict().items()
                   if not k.endswith("num_batches_tracked")}, str(path))
        return file_sha256(path)

    def fill(staging: Path) -> None:
        written = {**document, "weights": {"file": WEIGHTS_FILE, "sha256": weights(net, staging / WEIGHTS_FILE)}}
        written["members"] = []
        for k, (other, temperature, records) in enumerate(members or [], start=2):
            name = f"reader-{k}.safetensors"
            written["members"].append({"file": name, "sha256": weights(other, staging / name),
                                       "temperature": temperature, **records})
        (staging / DOCUMENT_FILE).write_text(json.dumps(written, indent=2) + "\n")
        LineReader.load(staging)  # what is saved loads

    return write_folder(out, fill, what="line reader")


def join_readers(out: str | os.PathLike, folders: list[str | os.PathLike], log=print) -> dict:
    """One reader of the networks of several trained apart (``linereader``: the number likeliest under their
    mixture is read): the first's document, the others' networks beside its own, saved to ``out``. Their
    combination with the segmenter is dropped; fit it again (:func:`fit_combination`).

    Two readers trained alike from seeds 1 and 2 (600,000 lines each, fine-tuned on seeds 7 and 8): see
    benchmarks/RESULTS.md, "Two line readers read together".
    """
    readers = [LineReader.load(folder) for folder in folders]
    first = readers[0]

    def shape(reader: LineReader) -> tuple:
        return tuple(reader.document["channels"]), reader.document["context"], reader.document["marks"]

    for folder, reader in zip(folders[1:], readers[1:], strict=True):
        if shape(reader) != shape(first):
            raise BundleError(f"{Path(folder) / DOCUMENT_FILE}: a network of channels {shape(reader)[0]}, context "
                              f"{shape(reader)[1]}, marks {shape(reader)[2]}; the first reader's is {shape(first)}")
    members = []
    for reader in readers:
        records = [{key: reader.document.get(key, {}) for key in ("training", "held_out")},
                   *({key: m[key] for key in ("training", "held_out")} for m in reader.document["members"])]
        members += [(net, temperature, record)
                    for (net, temperature), record in zip(reader.members, records, strict=True)]
    if len(members) > MAX_MEMBERS:
        raise BundleError(f"{len(members)} networks in all: a reader holds at most {MAX_MEMBERS}")
    document = {k: v for k, v in first.document.items() if k not in ("combine", "members")}
    save_reader(first.net, document, out, members[1:])
    log(f"joined {len(members)} networks into {out} (their combination with the segmenter is to be fit again)")
    return json.loads((Path(out) / DOCUMENT_FILE).read_text())


def fit_combination(folder: str | os.PathLike, predictor=None, numbers: int = 100, seed: int = 1,
                    data_dir: str | None = None, log=print, predictor_name: str = "the built-in model") -> dict:
    """Fit how :func:`recognize.combine` weighs the segmenter and the line reader; written into reader.json.

    On photographed numbers (``numbers`` of 2-8 digits in each of ``synthetic.CONDITIONS``) of the held-out
    training digits: the pooling weights by the negative log-likelihood of the true digit where the two read
    the same count differently, the margin by the most numbers read exactly where they count differently.
    ``predictor`` is the digit model (the built-in by default); one that never trained on the held-out digits
    sees them as it sees a user's. For a reader trained on marks, a fifth of the numbers hold a letter, symbol
    or scribble (``nondigits.mnist_like``), to be read "?".
    """
    from scipy.optimize import minimize

    from .atomic import atomic_write_text
    from .data import load_dataset
    from .nondigits import MARK_KINDS, write_mark
    from .predictor import builtin_model
    from .recognize import DEFAULT_MIN_CONFIDENCE, _ink_box, keeps_its_count, read_digits
    from .segment import find_digits
    from .synthetic import CONDITIONS, condition_options, render_number

    folder = Path(folder)
    reader = LineReader.load(folder)
    model = predictor or builtin_model()
    mnist = load_dataset("mnist", data_dir=data_dir)
    x, y = mnist.x_train[-HOLDOUT:], mnist.y_train[-HOLDOUT:]
    marks = bool(reader.document.get("marks"))
    pooled, counted = [], []  # (truth digit, p_seg, p_line) per digit; (truth, seg, line, log-lik. margin)
    marked = []  # (a mark in truth, the reader's mark probability) where it reads "?" and the model a sure digit
    for way in CONDITIONS:
        rng = np.random.default_rng([seed, CONDITIONS.index(way)])
        for k in range(numbers):
            chosen = rng.choice(len(x), k % 7 + 2, replace=False)
            written, truth = [x[i] for i in chosen], "".join(str(y[i]) for i in chosen)
            if marks and k % 5 == 4:
                where = write_mark(written, MARK_KINDS[k // 5 % len(MARK_KINDS)], rng)
                truth = truth[:where] + "?" + truth[where + 1 :]
            found = find_digits(render_number(written, rng, **condition_options(way, rng)), predictor=model)
            mine = read_digits(found, model, line_reader=False)
            if not mine.digits or found.ink is None:
                continue
            box = _ink_box(mine, found)
            line = reader.read(found.ink, box)
            if line.number == mine.number or not line.number:
                continue
            if len(line.number) == len(mine.number) == len(truth):
                pooled += [(int(t), d.probabilities, p) for t, d, p, named in zip(truth, mine.digits,
                           line.probabilities, line.number, strict=True)
                           if not d.not_a_digit and "?" not in (t, named)]
                marked += [(t == "?", float(p)) for t, d, named, p in zip(truth, mine.digits, line.number,
                           line.mark_probabilities(), strict=True)
                           if named == "?" and not d.not_a_digit and d.confidence >= DEFAULT_MIN_CONFIDENCE]
            elif len(line.number) != len(mine.number) and (marks or not keeps_its_count(mine, found)):
                # as combine decides
                counted.append((truth, mine.number, line.number,
                                line.log_probability - line.log_likelihood(mine.number)))
    truths = np.array([t for t, _, _ in pooled], np.int64)
    seg = np.log(np.clip(np.array([p for _, p, _ in pooled], np.float64), 1e-12, 1.0))
    lin = np.log(np.clip(np.array([p for _, _, p in pooled], np.float64), 1e-12, 1.0))

    def nll(weights: np.ndarray) -> float:
        z = np.exp(weights[0]) * seg + np.exp(weights[1]) * lin
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), truths]))

    # bounded: where some weights read every pooled digit right, the likelihood grows without end as they
    # grow (seen: 562 and 766 on 476 digits, a reader trained on marks), and the pooled answer turns 0-or-1
    bounds = [(math.log(0.05), math.log(4.0))] * 2
    a, b = (np.exp(minimize(nll, np.zeros(2), method="L-BFGS-B", bounds=bounds).x) if len(pooled) >= 20
            else (1.0, 1.0))
    # the margin: each candidate between the observed ones, scored by the numbers then read exactly
    gaps = sorted(m for *_, m in counted)
    candidates = [math.inf] + [g - 1e-6 for g in gaps]
    exact = [sum((line if m > c else seg_) == t for t, seg_, line, m in counted) for c in candidates]
    margin = candidates[int(np.argmax(exact))] if counted else math.inf
    margin = float(min(margin, 100.0))
    # the mark threshold: each candidate at an observed probability, scored by the pieces then decided right
    levels = [NEVER_MARK, *sorted({p for _, p in marked})]
    right = [sum((p >= level) == is_mark for is_mark, p in marked) for level in levels]
    mark = float(levels[int(np.argmax(right))])
    combine = {"segmenter": round(float(a), 4), "line": round(float(b), 4), "margin": round(margin, 4),
               "mark": round(mark, 6),
               "fit": {"numbers": numbers * len(CONDITIONS), "digits pooled": len(pooled),
                       "counts differing": len(counted), "exact where counts differ": int(max(exact, default=0)),
                       "marks against sure digits": len(marked), "of them decided right": int(max(right)),
                       "digit model": predictor_name, "seed": seed}}
    document = {**json.loads((folder / DOCUMENT_FILE).read_text()), "combine": combine}
    check_document(document, folder / DOCUMENT_FILE)  # a document that would not load is never written
    atomic_write_text(folder / DOCUMENT_FILE, json.dumps(document, indent=2) + "\n")
    log(f"combine: segmenter weight {a:.3f}, line weight {b:.3f}, margin {margin:.2f}, mark {mark:.4f} "
        f"({len(pooled)} digits pooled, {len(counted)} numbers counted differently, {len(marked)} marks against "
        "sure digits)")
    return combine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deepdigits.linetrain", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to write reader.json and reader.safetensors into")
    parser.add_argument("--samples", type=int, default=600_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--marks", type=float, default=0.15, help="share of lines with a letter, symbol or "
                        "scribble among the digits, read as ? (0: digits only)")
    parser.add_argument("--seed", type=int, help="seed of the lines and the training (default 1; with --fine-tune, 7)")
    parser.add_argument("--processes", type=int, default=2, help="processes writing the training lines")
    parser.add_argument("--data-dir")
    parser.add_argument("--digit-model", help="the digit model bundle the combination is fit with (default: the "
                        "built-in; one trained without the last 2,000 training images sees them as a user's)")
    parser.add_argument("--numbers", type=int, default=100, help="photographed numbers per way of writing, to fit "
                        "the combination")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--fit-only", action="store_true", help="refit the combination of an existing reader")
    what.add_argument("--fine-tune", type=int, metavar="N", help="train the reader in --out further on N "
                      "photographed numbers (and N/2 ink lines), then refit its combination")
    what.add_argument("--join", nargs="+", metavar="DIR", help="make --out one reader of these readers' networks "
                      "(trained apart; read together), then fit its combination")
    args = parser.parse_args(argv)
    for name, least in (("samples", 64), ("epochs", 1), ("processes", 1), ("numbers", 1), ("fine_tune", 64)):
        if getattr(args, name) is not None and getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')}: expected at least {least}, got {getattr(args, name)}")
    if args.samples > MAX_SAMPLES:
        parser.error(f"--samples: expected at most {MAX_SAMPLES:,} lines (3.1 KB each in memory), got {args.samples:,}")
    if args.fine_tune is not None and args.fine_tune > MAX_FINE_TUNE:
        parser.error(f"--fine-tune: expected at most {MAX_FINE_TUNE:,} numbers (about 55 ms each to photograph "
                     f"on one core), got {args.fine_tune:,}")
    if not 0.0 <= args.marks < 1.0:
        parser.error(f"--marks: expected a share from 0 up to 1, got {args.marks}")
    try:
        if args.join:
            join_readers(args.out, args.join)
        elif args.fine_tune:
            fine_tune_line_reader(args.out, args.fine_tune, args.fine_tune // 2, data_dir=args.data_dir,
                                  seed=7 if args.seed is None else args.seed)
        elif not args.fit_only:
            train_line_reader(args.out, args.samples, args.epochs, 1 if args.seed is None else args.seed,
                              args.data_dir, marks=args.marks,
                              processes=args.processes)
        predictor = None
        if args.digit_model:
            from .predictor import load

            predictor = load(args.digit_model)
        fit_combination(args.out, predictor, args.numbers, data_dir=args.data_dir,
                        predictor_name=args.digit_model or "the built-in model")
    except DeepDigitsError as exc:
        parser.exit(1, f"{parser.prog}: error: {exc}\n")


if __name__ == "__main__":
    main()

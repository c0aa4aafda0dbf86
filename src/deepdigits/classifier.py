"""The Classifier: a network with its preprocessing, recipe and history — fit, evaluate, predict, save, load."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .bundle import load_bundle, save_bundle
from .calibrate import held_out_range
from .data import Dataset, load_dataset, photo_crops
from .data import validation_split as split_last_fraction
from .device import INFERENCE_BATCH, channels_last, default_device, precision_text, threads_for
from .errors import BundleError, DeepDigitsError
from .evaluate import metrics_from_probabilities
from .models import build_ensemble, build_model, count_params, resolve_name, summary, summary_dict
from .predictor import ModelCard
from .preprocess import DEFAULT_SCALE, to_tensor
from .recipes import Recipe, get_recipe
from .version import __version__

if TYPE_CHECKING:  # training is imported when fit is called: loading a model to serve it never imports it
    from .train import History


class Classifier:
    """A digit classifier, used the Keras way: ``fit``, ``evaluate``, ``predict``, ``summary``, ``save``.

    >>> clf = Classifier("tutorial-003")                      # doctest: +SKIP
    >>> clf.fit(ds.x_train, ds.y_train, epochs=1, batch_size=128)  # doctest: +SKIP
    >>> clf.predict(ds.x_test[:3])                            # doctest: +SKIP
    array([7, 2, 1])
    """

    def __init__(
        self,
        architecture: str = "tutorial-003",
        *,
        class_names: Sequence[str] | None = None,
        input_scale: float = DEFAULT_SCALE,
        seed: int | None = 0,
        members: Sequence[str] | None = None,
        network: torch.nn.Module | None = None,
    ):
        """``members`` names an ensemble's architectures; ``network`` wraps one already built instead."""
        if network is not None:
            self.architecture = architecture
            self.network = network
        elif architecture == "ensemble":
            self.architecture = "ensemble"
            self.network = build_ensemble(list(members or []), seed=seed)
        else:
            self.architecture = resolve_name(architecture)
            self.network = build_model(self.architecture, seed=seed)
        self.class_names = tuple(class_names) if class_names is not None else tuple(str(d) for d in range(10))
        self.input_scale = input_scale
        self.recipe: dict | None = None
        self.dataset: dict | None = None
        self.history: list[dict] = []
        self.interrupted = False
        self.train_seconds = 0.0
        self.precision: str | None = None  # what training ran in: "float32" or "bfloat16"
        self.metrics: dict | None = None
        self.extra: dict = {}
        self.provenance: dict = {}  # when, by which command and with which versions a loaded bundle was made
        # probabilities are softmax(logits / temperature); 1 until ``calibrate`` fits one on held-out images,
        # then, where it helps there, a top-label map (a, b) after it: see calibrate.calibrated_logits
        self.temperature = 1.0
        self.top_label: tuple[float, float] | None = None
        self.calibration: dict | None = None  # what calibrate recorded: temperature, images fit on, held-out scores

    @classmethod
    def from_recipe(cls, recipe: str | Recipe, *, class_names: Sequence[str] | None = None,
                    seed: int | None = None) -> Classifier:
        """A fresh, untrained classifier built as ``recipe`` says (network, input scaling), the recipe attached.

        ``seed`` initialises the network (default: the recipe's); train it with ``fit(x, y, **recipe.fit_options())``.
        """
        chosen = get_recipe(recipe) if isinstance(recipe, str) else recipe
        if chosen.members:
            raise DeepDigitsError(f"recipe {chosen.name!r} is an ensemble; train it with train_recipe")
        clf = cls(chosen.architecture, class_names=class_names, input_scale=chosen.input_scale,
                  seed=chosen.seed if seed is None else seed)
        clf.recipe = chosen.to_dict()
        return clf

    # ------------------------------------------------------------------ Keras-style verbs

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        optimizer: str = "adam",
        learning_rate: float = 0.001,
        validation_split: float = 0.0,
        validation_data: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
        verbose: int = 1,
        **options,
    ) -> History:
        """Train on uint8 images (N, 28, 28) and labels; returns the per-epoch history.

        Further ``options`` go to :func:`deepdigits.train.fit`: ``loss``, ``weight_decay``, ``schedule``,
        ``augment``, ``label_smoothing``, ``ema_decay``, ``bf16``, ``channels_last``.
        """
        from .train import fit

        x_train, y_train, x_val, y_val = split_last_fraction(np.asarray(x), np.asarray(y), validation_split)
        if validation_data is not None:
            x_val, y_val = validation_data
        history = fit(
            self.network,
            self._tensor(x_train),
            _labels(y_train),
            optimizer=optimizer,
            learning_rate=learning_rate,
            batch_size=batch_size,
            epochs=epochs,
            x_val=self._tensor(x_val) if len(x_val) else None,
            y_val=_labels(y_val) if len(y_val) else None,
            seed=seed,
            verbose=verbose,
            **options,
        )
        self.network.to("cpu")
        self.history.extend(history.epochs)
        self.interrupted = history.interrupted
        self.train_seconds += history.train_seconds
        self.precision = history.precision
        return history

    @torch.no_grad()
    def predict_proba(self, images: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """Calibrated class probabilities (N, 10) for images (N, 28, 28) or one image (28, 28).

        ``softmax(logits / temperature)``, then the top-label map where there is one: both fit on held-out
        images at the end of training (T = 1 for a bundle without them). An ensemble's logits are the log of
        its members' mean probability.
        """
        from .calibrate import calibrated_logits

        network = channels_last(self.network).eval()
        x = self._tensor(images).contiguous(memory_format=torch.channels_last)
        with threads_for(len(x)):
            parts = [torch.softmax(calibrated_logits(network(x[i : i + batch_size]), self.temperature,
                                                     self.top_label), dim=1)
                     for i in range(0, len(x), batch_size)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, len(self.class_names)), np.float32)

    @torch.no_grad()
    def logits(self, images: np.ndarray, batch_size: int = INFERENCE_BATCH) -> np.ndarray:
        """The network's outputs before the temperature and softmax (N, 10), float32."""
        network = channels_last(self.network).eval()
        x = self._tensor(images).contiguous(memory_format=torch.channels_last)
        with threads_for(len(x)):
            parts = [network(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]
        return torch.cat(parts).numpy() if parts else np.zeros((0, len(self.class_names)), np.float32)

    def calibrate(self, x: np.ndarray, y: np.ndarray, *, fit_on: dict | None = None) -> dict:
        """Fit the calibration on held-out images and labels — never the test set — and record it.

        A temperature, and a top-label map after it where that predicts the images better in cross-validation
        (``calibrate.fit_calibration``). ``fit_on`` says which images they are (dataset, split, index range,
        whether training saw them); the record (``self.calibration``, saved in the bundle) adds their count,
        each method's cross-validated NLL and, as ``fit_scores``, their ECE, NLL and Brier score before (T = 1)
        and after. Returns the record.
        """
        from .calibrate import calibrated_probabilities, fit_calibration, scores, softmax

        y = np.asarray(y)
        logits = self.logits(x)
        fitted = fit_calibration(logits, y)
        self.temperature, self.top_label = fitted["temperature"], fitted["top_label"]
        before, after = scores(softmax(logits), y), scores(calibrated_probabilities(logits, self.temperature,
                                                                                      self.top_label), y)
        self.calibration = {
            "method": fitted["method"],
            "temperature": self.temperature,
            **({"top_label": {"intercept": self.top_label[0], "slope": self.top_label[1]}} if self.top_label else {}),
            **({"cross_validated_nll": fitted["cross_validated_nll"]} if "cross_validated_nll" in fitted else {}),
            "fit_on": {**(fit_on or {}), "n": len(y)},
            "fit_scores": {**after, **{f"{k}_uncalibrated": v for k, v in before.items()}},
        }
        return self.calibration

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The most probable class of each image."""
        return self.predict_proba(images).argmax(axis=1)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict:
        """Loss (the one the recipe trained with), accuracy, per-class precision/recall/F1 and the confusion matrix."""
        return self.metrics_of(self.predict_proba(x), y)

    def metrics_of(self, probabilities: np.ndarray, y: np.ndarray) -> dict:
        """``evaluate`` on probabilities already predicted (the report reuses one pass for several figures)."""
        recipe = self.recipe or {}
        return metrics_from_probabilities(probabilities, np.asarray(y), self.class_names,
                                          loss=recipe.get("loss") or "cross-entropy",
                                          label_smoothing=float(recipe.get("label_smoothing") or 0.0),
                                          temperature=self.temperature, top_label=self.top_label)

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean accuracy on images ``x`` and labels ``y``, as scikit-learn's ``score``."""
        return float(np.mean(self.predict(x) == np.asarray(y))) if len(y) else 0.0

    def card(self) -> ModelCard:
        """Name, architecture, size and test metrics: what ``/api/model`` and the CLI show."""
        metrics = self.metrics or {}
        return ModelCard(
            name=self.architecture, architecture=self.architecture, runtime="torch", class_names=self.class_names,
            parameters=self.n_params, dataset=(self.dataset or {}).get("name"),
            recipe=(self.recipe or {}).get("name"),
            test_metrics={k: metrics[k] for k in ("accuracy", "loss", "n") if k in metrics},
        )

    def summary(self) -> str:
        return summary(self.network, self.architecture)

    @property
    def n_params(self) -> int:
        return count_params(self.network)

    # ------------------------------------------------------------------ persistence

    def metadata(self) -> dict:
        return {
            "architecture": self.architecture,
            "members": getattr(self.network, "architectures", None),
            "config": summary_dict(self.network, self.architecture),
            "class_names": list(self.class_names),
            "dataset": self.dataset,
            "preprocessing": {
                "input_shape": [1, 28, 28],
                "input_dtype": "uint8 grey levels 0-255, white digit on black as in MNIST",
                "input_scale": self.input_scale,
            },
            "recipe": self.recipe,
            "history": self.history,
            "interrupted": self.interrupted,
            "train_seconds": self.train_seconds,
            "precision": self.precision,
            "metrics": self.metrics,
            "calibration": self.calibration,
            "versions": {
                "deepdigits": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["deepdigits", *sys.argv[1:]]) if _from_cli() else None,
            **self.extra,
        }

    def save(self, path: str | os.PathLike, extra_files: dict[str, bytes] | None = None) -> Path:
        """Write this classifier as a bundle folder (safetensors weights + JSON), atomically.

        ``extra_files`` (name -> bytes) go in too: ``deepdigits train`` adds ``plots.bundle_figures(clf)``.
        """
        return save_bundle(path, self.network.state_dict(), self.metadata(), extra_files)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Classifier:
        """Rebuild a classifier from a bundle folder."""
        state_dict, meta = load_bundle(path)
        try:
            clf = cls(
                meta["architecture"],
                class_names=meta.get("class_names"),
                input_scale=float(meta.get("preprocessing", {}).get("input_scale", DEFAULT_SCALE)),
                seed=None,
                members=meta.get("members"),
            )
        except DeepDigitsError as exc:
            raise BundleError(f"{path}: {exc}") from None
        try:
            clf.network.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0]
            raise BundleError(
                f"{path}: weights do not match architecture {meta['architecture']!r} ({detail})"
            ) from None
        clf.network.eval()
        clf.recipe = meta.get("recipe")
        clf.dataset = meta.get("dataset")
        clf.history = list(meta.get("history") or [])
        clf.interrupted = bool(meta.get("interrupted", False))
        clf.train_seconds = float(meta.get("train_seconds") or 0.0)
        clf.precision = meta.get("precision")
        clf.metrics = meta.get("metrics")
        clf.calibration = meta.get("calibration")  # absent in bundles from before calibration: T = 1
        clf.temperature = float((clf.calibration or {}).get("temperature") or 1.0)
        top_label = (clf.calibration or {}).get("top_label")  # validated: present with its method only
        clf.top_label = (float(top_label["intercept"]), float(top_label["slope"])) if top_label else None
        clf.provenance = {k: meta.get(k) for k in ("created", "command", "versions")}
        if isinstance(meta.get("open_set"), dict):  # the "not a digit" thresholds and head, kept on re-save
            clf.extra["open_set"] = meta["open_set"]
        return clf

    def _tensor(self, images) -> torch.Tensor:
        return to_tensor(images, self.input_scale)


def _labels(y) -> torch.Tensor:
    return torch.as_tensor(np.asarray(y)).long()


def _from_cli() -> bool:
    return Path(sys.argv[0]).name in ("deepdigits", "__main__.py")


def train_recipe(
    recipe: str | Recipe | None = None,
    *,
    dataset: str | Dataset | None = None,
    data_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    seed: int | None = None,
    verbose: int = 1,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: str | os.PathLike | None = None,
    processes: int | None = None,
    work_dir: str | os.PathLike | None = None,
) -> Classifier:
    """Train a named recipe (default: tutorial-003) on its dataset, evaluate on the test set, return the classifier.

    The returned classifier carries the recipe, history and test metrics; ``.save(path)`` writes it.
    With ``checkpoint_dir`` a checkpoint is written there every ``checkpoint_every`` epochs (and after the
    last); ``resume`` (a run's output folder or checkpoint folder) continues that run with its recipe and
    overrides, writing on into the same folder, and ends with the weights the uninterrupted run would
    have had. Checkpoints are left for the caller to remove (``checkpoint.remove_checkpoints``); ensembles
    write none. Inside a torch.distributed process group (torchrun) every process trains its shard of each
    batch and only rank 0 prints, writes checkpoints and scores the test set (see ``deepdigits.distributed``).
    An ensemble recipe trains its members in ``processes`` worker processes at once (default: as many as
    ``member_processes`` finds cores for), each with a share of the cores; their bundles are handed back
    through a temporary folder inside ``work_dir`` (default: the system's temporary folder).
    """
    from . import checkpoint, distributed

    world = distributed.setup()
    if world is not None and world.rank != 0:
        verbose = 0
    resumed = checkpoint.resume_run(resume) if resume is not None else None
    if recipe is None and resumed is not None:  # the run's own recipe, overrides included
        base, start = resumed.base_recipe(), resumed.recipe()
    else:
        base = get_recipe(recipe or "tutorial-003") if isinstance(recipe, str | None) else recipe
        start = base
    dataset_name = dataset.name if isinstance(dataset, Dataset) else dataset
    chosen = start.with_overrides(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed, dataset=dataset_name
    )
    _check_positive(epochs=chosen.epochs, batch_size=chosen.batch_size, learning_rate=chosen.learning_rate)
    if resumed is not None:
        resumed.check_recipe(chosen)
        resumed.check_world(world.world_size if world else 1)
    ds = dataset if isinstance(dataset, Dataset) else distributed.first_on_each_machine(
        lambda: load_dataset(chosen.dataset, data_dir=data_dir))
    if chosen.members:  # an ensemble recipe: train each member with its own seed, then average them
        overrides = {"epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate}
        workers = 1 if world is not None else member_processes(chosen.members, processes)
        if workers > 1:
            trained = _train_members_in_processes(chosen, ds, overrides, workers, work_dir, verbose)
        else:
            trained = []
            for i in range(chosen.members):
                if verbose:
                    print(f"Ensemble member {i + 1}/{chosen.members}", file=sys.stderr)
                member = train_recipe(chosen.member_recipe, dataset=ds, seed=chosen.seed + i, verbose=verbose,
                                      **overrides)
                if member.interrupted:  # Ctrl-C: an ensemble of unfinished members is not saved
                    raise KeyboardInterrupt
                trained.append(member)
        clf = combine(trained)
        clf.recipe = {**chosen.to_dict(), "members": [m.recipe for m in trained]}
        _calibrate_held_out(clf, ds, _shared_held_out(trained, ds), verbose=verbose)
        clf.metrics = clf.evaluate(ds.x_test, ds.y_test)
        return clf
    if verbose:
        print(f"Data: {ds.name} from {ds.source}", file=sys.stderr)
        print(f"Recipe: {chosen.name} — {chosen.description}", file=sys.stderr)
        print(f"Settings: {settings_text(chosen, base)}", file=sys.stderr)
    clf = Classifier.from_recipe(chosen, class_names=ds.class_names)
    if verbose and default_device().type == "cpu":
        from . import fused
        from .models import FusedSequential

        if isinstance(clf.network, FusedSequential):
            print(f"Kernels: {fused.describe()}", file=sys.stderr)
    clf.dataset = {"name": ds.name, "source": ds.source, "sha256": ds.checksums}
    clf.extra["distributed"] = world.describe() if world else {"world_size": 1, "backend": None}
    data = {"name": ds.name, "sha256": dict(ds.checksums), "train_images": len(ds.x_train)}
    if resumed is not None:
        resumed.check_data(data)
    identity = checkpoint.run_identity(base, chosen, data, world.world_size if world else 1,
                                       world.backend if world else None, checkpoint_every)
    x_train, y_train, x_val, y_val = split_last_fraction(ds.x_train, ds.y_train, chosen.validation_split)
    # for calibration: never the test set
    held_out = held_out_range(len(ds.x_train), chosen.validation_split, chosen.calibration_split)
    x_train, y_train = x_train[: held_out.start], y_train[: held_out.start]  # no-op where it is the validation split
    if chosen.photo_crops:  # made from the training part only: the held-out images stay unseen
        crops, labels = photo_crops(x_train, y_train, chosen.photo_crops, verbose=verbose > 0)
        x_train, y_train = np.concatenate([x_train, crops]), np.concatenate([y_train, labels])
    clf.fit(x_train, y_train, validation_data=(x_val, y_val) if len(x_val) else None, verbose=verbose,
            **chosen.fit_options(), **checkpoint.checkpointing(checkpoint_dir, checkpoint_every, resumed, identity))
    if clf.history and (world is None or world.rank == 0):
        _calibrate_held_out(clf, ds, held_out, verbose=verbose)
        clf.metrics = clf.evaluate(ds.x_test, ds.y_test)
    return clf


# Training a member in a worker process: ``Classifier.fit`` spreads one network's batches over the cores it
# is given; members are independent runs, so each worker trains one with its share of the cores and the
# workers need not talk. A worker gets its data as safetensors and gives its member back as a bundle
# (safetensors + JSON), never pickled.
_DATA_FILE, _DATA_INFO = "data.safetensors", "data.json"
_WORKER = "import sys; from deepdigits.classifier import _member_worker; sys.exit(_member_worker(sys.argv[1]))"


def available_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# Members need not talk, so a worker per core (each with one thread) loses nothing to communication, and a
# network's own threads pay little here: one epoch of `best` on 2 cores shared with other work took 185 s
# as 2 data-parallel processes of 1 thread against 521 s as 1 process of 2 (benchmarks/RESULTS.md).
def member_processes(members: int, processes: int | None = None, cores: int | None = None) -> int:
    """How many worker processes train an ensemble's ``members`` at once: ``processes`` where given (at most
    one per member), else one per core up to one per member; 1 (in this process) on a single core."""
    if processes is not None:
        if processes < 1:
            raise DeepDigitsError(f"processes: expected 1 or more, got {processes}")
        return min(processes, members)
    return min(members, cores or available_cores())


def _save_dataset(ds: Dataset, folder: Path) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(getattr(ds, k)) for k in ("x_train", "y_train", "x_test", "y_test")},
              str(folder / _DATA_FILE))
    info = {"name": ds.name, "class_names": list(ds.class_names), "source": ds.source, "checksums": ds.checksums}
    (folder / _DATA_INFO).write_text(json.dumps(info), encoding="utf-8")


def _load_dataset(folder: Path) -> Dataset:
    from safetensors.numpy import load_file

    arrays = load_file(str(folder / _DATA_FILE))
    info = json.loads((folder / _DATA_INFO).read_text(encoding="utf-8"))
    return Dataset(name=info["name"], class_names=tuple(info["class_names"]), source=info["source"],
                   checksums=dict(info["checksums"]), **arrays)


def _member_worker(spec_path: str) -> int:
    """A worker process's life: train the member its JSON spec names, save it as a bundle; the exit status."""
    import threading

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.set_num_threads(int(spec["threads"]))

    def stop_when_orphaned() -> None:  # the parent was killed: its member is no longer wanted
        while os.getppid() == spec["parent"]:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    try:
        member = train_recipe(spec["recipe"], dataset=_load_dataset(Path(spec["data"])), seed=int(spec["seed"]),
                              verbose=0, **spec["overrides"])
        if member.interrupted:
            return 130
        member.save(spec["out"])
    except DeepDigitsError as exc:
        print(f"deepdigits: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _end_with_parent() -> None:
    """In a worker before it starts: Linux sends it SIGTERM when its parent dies (the watcher thread in
    ``_member_worker`` does it elsewhere, once the worker has imported torch)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _train_members_in_processes(chosen: Recipe, ds: Dataset, overrides: dict, workers: int,
                                work_dir: str | os.PathLike | None, verbose: int) -> list[Classifier]:
    """Train ``chosen``'s members in ``workers`` processes at once, each with its seed and a share of the
    cores (as ``train_recipe`` would one after another), and load them back from the bundles they saved."""
    import shutil
    import subprocess
    import tempfile

    threads = max(1, available_cores() // workers)
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=work_dir, prefix=".members-", suffix=".tmp"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          *filter(None, [os.environ.get("PYTHONPATH")])])}
    running: dict[int, tuple[subprocess.Popen, object, float]] = {}
    try:
        _save_dataset(ds, work)
        waiting = list(range(chosen.members))
        if verbose:
            print(f"Ensemble: {chosen.members} members in {workers} processes of {threads} thread"
                  f"{'s' * (threads != 1)} each", file=sys.stderr)
        while waiting or running:
            while waiting and len(running) < workers:
                i = waiting.pop(0)
                spec = {"recipe": chosen.member_recipe, "seed": chosen.seed + i, "overrides": overrides,
                        "threads": threads, "data": str(work), "out": str(work / f"member-{i + 1}"),
                        "parent": os.getpid()}
                spec_path = work / f"member-{i + 1}.json"
                spec_path.write_text(json.dumps(spec), encoding="utf-8")
                log = open(work / f"member-{i + 1}.log", "w+b")  # noqa: SIM115 - closed when the worker ends
                running[i] = (subprocess.Popen([sys.executable, "-c", _WORKER, str(spec_path)], env=env,
                                               stdout=log, stderr=log, preexec_fn=_end_with_parent),
                              log, time.monotonic())
            time.sleep(0.2)
            for i, (process, log, started) in list(running.items()):
                code = process.poll()
                if code is None:
                    continue
                del running[i]
                log.seek(0)
                lines = log.read().decode("utf-8", "replace").strip().splitlines()
                log.close()
                if code == 130:
                    raise KeyboardInterrupt
                if code != 0:
                    last = lines[-1] if lines else f"exit status {code}"
                    raise DeepDigitsError(f"ensemble member {i + 1} failed: {last.removeprefix('deepdigits: error: ')}")
                if verbose:
                    print(f"Ensemble member {i + 1}/{chosen.members} trained in {time.monotonic() - started:.1f} s",
                          file=sys.stderr)
        return [Classifier.load(work / f"member-{i + 1}") for i in range(chosen.members)]
    finally:
        for process, log, _ in running.values():  # an error or Ctrl-C: stop the others
            process.terminate()
            process.wait()
            log.close()
        shutil.rmtree(work, ignore_errors=True)


def _calibrate_held_out(clf: Classifier, ds: Dataset, held_out: range | None, verbose: int = 0) -> None:
    """Fit ``clf``'s temperature on the training images ``held_out`` (training never saw them).

    They are the recipe's validation split (tutorials 000 and 003: the last 10%), else its calibration split
    (tutorial 002: the last sixth), else the last 2,000 training images, which ``train_recipe`` keeps out of
    training. ``None``: no such images, T stays 1.
    """
    if held_out is None or not len(held_out):
        return
    role = "validation split" if (clf.recipe or {}).get("validation_split") else "held out"
    record = clf.calibrate(ds.x_train[held_out.start : held_out.stop], ds.y_train[held_out.start : held_out.stop],
                           fit_on={"dataset": ds.name, "split": "train", "start": held_out.start,
                                   "stop": held_out.stop, "seen_in_training": False, "role": role})
    if verbose:
        scores = record["fit_scores"]
        from .calibrate import calibration_name

        mapped = {f"top_label_{k}": v for k, v in (record.get("top_label") or {}).items()}
        method = calibration_name({**record, **mapped})
        print(f"Calibration: {method} fit on training images "
              f"{held_out.start:,}-{held_out.stop - 1:,} ({role}); there ECE {scores['ece_uncalibrated']:.2%} -> "
              f"{scores['ece']:.2%}, NLL {scores['nll_uncalibrated']:.4f} -> {scores['nll']:.4f}", file=sys.stderr)


def _shared_held_out(members: Sequence[Classifier], ds: Dataset) -> range | None:
    """The training images of ``ds`` that no member trained on, from their calibration records; else ``None``.

    Each member trained by ``train_recipe`` records the slice at the end of the training split it held out;
    the ensemble's is the shortest such tail. A member without a record may have seen every image.
    """
    slices = [(m.calibration or {}).get("fit_on") or {} for m in members]
    if not all(s.get("dataset") == ds.name and s.get("split") == "train" and s.get("seen_in_training") is False
               and isinstance(s.get("start"), int) and s.get("stop") == len(ds.x_train) for s in slices):
        return None
    start = max(s["start"] for s in slices)
    return range(start, len(ds.x_train)) if start < len(ds.x_train) else None


def settings_text(chosen: Recipe, base: Recipe | None = None) -> str:
    """The Settings line of a run: the recipe's settings (overrides marked), this device and precision."""
    return (f"{chosen.settings_text(base)}, device {default_device()}, "
            f"{precision_text(chosen.bf16, default_device())}")


def combine(classifiers: Sequence[Classifier]) -> Classifier:
    """An ensemble of trained classifiers (probabilities averaged); they must share classes and preprocessing."""
    import copy

    from .models import Ensemble

    if len(classifiers) < 2:
        raise DeepDigitsError(f"an ensemble needs at least 2 members, got {len(classifiers)}")
    first = classifiers[0]
    if any(isinstance(c.network, Ensemble) for c in classifiers):
        raise DeepDigitsError("ensemble members must be single networks, not ensembles")
    if any(c.class_names != first.class_names or c.input_scale != first.input_scale for c in classifiers):
        raise DeepDigitsError("ensemble members must share class names and input scaling")
    architectures = [c.architecture for c in classifiers]
    network = Ensemble([copy.deepcopy(c.network).eval() for c in classifiers], architectures)
    clf = Classifier("ensemble", class_names=first.class_names, input_scale=first.input_scale, network=network)
    clf.dataset = first.dataset
    clf.recipe = {"name": "ensemble", "members": [c.recipe for c in classifiers]}
    clf.train_seconds = sum(c.train_seconds for c in classifiers)
    precisions = {c.precision for c in classifiers}
    clf.precision = precisions.pop() if len(precisions) == 1 else "mixed"
    clf.extra = {"member_metrics": [(c.metrics or {}).get("accuracy") for c in classifiers]}
    return clf


def combine_and_evaluate(members: Sequence[Classifier], x: np.ndarray, y: np.ndarray, *,
                         dataset: Dataset | None = None) -> Classifier:
    """``combine`` the members and score all on ``(x, y)``: each member runs once, the ensemble averages them.

    The ensemble's ``metrics`` are its test metrics; ``extra["member_metrics"]`` the members' accuracies.
    With ``dataset`` (the members' own), the ensemble's temperature is fit on its training images that no
    member trained on, where the members' bundles record them (``train_recipe`` holds them out); else T = 1.
    """
    from .calibrate import calibrated_probabilities, softmax

    clf = combine(members)
    if dataset is not None:
        _calibrate_held_out(clf, dataset, _shared_held_out(members, dataset))
    # each network's own probabilities (T = 1): the ensemble averages those, then applies its own temperature
    probabilities = [softmax(member.logits(x)) for member in members]
    clf.extra = {"member_metrics": [float(np.mean(p.argmax(1) == y)) for p in probabilities]}
    mean = np.mean(probabilities, axis=0)
    clf.metrics = clf.metrics_of(calibrated_probabilities(np.log(np.clip(mean, 1e-30, None)), clf.temperature,
                                                          clf.top_label), y)
    return clf


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise DeepDigitsError(f"{name.replace('_', '-')}: expected a positive number, got {value}")

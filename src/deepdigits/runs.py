"""A training run in its output folder, as ``deepdigits train`` does it: checkpoints, resume, the bundle saved."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DeepDigitsError
from .recipes import Recipe, get_recipe

if TYPE_CHECKING:
    from .classifier import Classifier
    from .data import Dataset

DEFAULT_RECIPE = "tutorial-003"


def default_out(recipe: str | None) -> Path:
    """``runs/RECIPE``, numbered (``runs/RECIPE-2``, ...) where that folder exists already."""
    base = Path("runs") / (recipe or DEFAULT_RECIPE)
    candidate, n = base, 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


def run_folders(recipe: str | None = None, out: str | os.PathLike | None = None,
                resume: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """``(bundle folder, checkpoint folder)`` of a run: ``out``, else the resumed run's folder, else
    ``default_out(recipe)``; the checkpoint folder is the resumed one's, else ``OUT/checkpoint``."""
    from .checkpoint import CHECKPOINT_DIR, checkpoint_root

    if resume is not None:
        root = checkpoint_root(resume)
        folder = Path(out) if out is not None else (root.parent if root.name == CHECKPOINT_DIR else root)
    else:
        folder = Path(out) if out is not None else default_out(recipe)
        root = folder / CHECKPOINT_DIR
    return folder, root


def resume_hint(out: Path, root: Path) -> str:
    """The command that continues an interrupted run: ``deepdigits train --resume OUT``."""
    return f"deepdigits train --resume {out if root.parent == out else root}"


def is_ensemble(recipe: str | Recipe | None) -> bool:
    """Whether ``recipe`` trains several members (``--processes`` then means processes per member, not DDP)."""
    chosen = recipe if isinstance(recipe, Recipe) else get_recipe(recipe or DEFAULT_RECIPE)
    return chosen.members > 0


def train_argv(recipe: str | None = None, out: str | os.PathLike | None = None, *, epochs: int | None = None,
               batch_size: int | None = None, learning_rate: float | None = None, seed: int | None = None,
               dataset: str | None = None, data_dir: str | os.PathLike | None = None,
               checkpoint_every: int | None = None, resume: str | os.PathLike | None = None,
               keep_checkpoints: bool = False, quiet: bool = False) -> list[str]:
    """The ``deepdigits train`` command line of these options (for the processes ``launch`` starts)."""
    argv = ["train"]
    for option, value in (("--recipe", recipe), ("--epochs", epochs), ("--batch-size", batch_size),
                          ("--lr", learning_rate), ("--seed", seed), ("--dataset", dataset),
                          ("--data-dir", data_dir), ("--out", out), ("--checkpoint-every", checkpoint_every),
                          ("--resume", resume)):
        if value is not None:
            argv += [option, str(value)]
    return argv + ["--keep-checkpoints"] * keep_checkpoints + ["--quiet"] * quiet


def launch(processes: int, recipe: str | None = None, out: str | os.PathLike | None = None, **options) -> int:
    """Train data-parallel in ``processes`` processes on this machine, one thread each (torch's elastic
    agent, as ``torchrun --standalone`` starts them); all write one folder, named here. Returns the exit status.

    ``options`` are ``train_argv``'s; the processes run ``deepdigits train`` with them.
    """
    from . import distributed

    if out is None and options.get("resume") is None:
        out = default_out(recipe)
    _check_every(options.get("checkpoint_every"))
    return distributed.launch(processes, train_argv(recipe, out, **options))


def _check_every(checkpoint_every: int | None) -> None:
    if checkpoint_every is not None and not 1 <= checkpoint_every <= 1_000_000:
        raise DeepDigitsError(f"checkpoint_every: expected 1-1000000, got {checkpoint_every}")


def _remove_empty_run(root: Path, out: Path) -> None:
    """Take back the options a run recorded when it ends before its first checkpoint."""
    from .checkpoint import OPTIONS_FILE, has_checkpoint

    if root.is_dir() and not has_checkpoint(root):
        (root / OPTIONS_FILE).unlink(missing_ok=True)
        for folder in (root, out):
            try:
                folder.rmdir()  # only where nothing else is left
            except OSError:
                break


def train_run(
    recipe: str | Recipe | None = None,
    out: str | os.PathLike | None = None,
    *,
    resume: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: bool = False,
    processes: int | None = None,
    dataset: str | Dataset | None = None,
    data_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    seed: int | None = None,
    verbose: int = 1,
    figures: bool = True,
) -> Classifier:
    """Train ``recipe`` and save its bundle in ``out``, with checkpoints and resume as ``deepdigits train``.

    ``out`` defaults to the resumed run's folder, else ``runs/RECIPE`` (numbered if it exists). A checkpoint
    is written into ``OUT/checkpoint`` every ``checkpoint_every`` epochs (default 1); ``resume`` (a run's
    folder) continues that run with its recipe and options, ``checkpoint_every`` and ``keep_checkpoints``
    included, and ends with the weights the uninterrupted run would have had. When the bundle is saved the
    checkpoint is removed, unless ``keep_checkpoints`` or the run was interrupted (Ctrl-C: the bundle holds
    the last finished epoch, ``clf.interrupted`` is true, and ``resume=out`` continues it). A run stopped
    before its first epoch leaves no folder and returns a classifier with an empty ``history``, unsaved.
    ``figures``: add the training-curve and confusion PNGs. ``processes``: an ensemble trains its members
    in that many worker processes; any other recipe trains data-parallel in that many (``launch``), and
    the bundle they saved is returned. Inside a torchrun process group only rank 0 writes.
    """
    from . import checkpoint, distributed
    from .classifier import Classifier, train_recipe

    _check_every(checkpoint_every)
    name = recipe.name if isinstance(recipe, Recipe) else recipe
    if processes is not None and processes > 1 and not distributed.launched() and not is_ensemble(recipe):
        if isinstance(recipe, Recipe) or (dataset is not None and not isinstance(dataset, str)):
            raise DeepDigitsError("processes: data-parallel processes take a recipe and a data set by name")
        folder = Path(out) if out is not None else run_folders(name, None, resume)[0]
        code = launch(processes, name, folder, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                      seed=seed, dataset=dataset, data_dir=data_dir, checkpoint_every=checkpoint_every,
                      resume=resume, keep_checkpoints=keep_checkpoints, quiet=not verbose)
        if code == 130 and not (folder / "model.json").is_file():
            raise KeyboardInterrupt
        if code not in (0, 130):
            raise DeepDigitsError(f"data-parallel training ended with exit status {code}")
        return Classifier.load(folder)

    world = distributed.setup()  # None unless started by torchrun
    main_process = world is None or world.rank == 0
    out, root = run_folders(name, out, resume)
    recorded = checkpoint.read_options(root) if resume is not None else {}
    if out.exists() and not out.is_dir():
        raise DeepDigitsError(f"--out {out}: exists and is not a folder")
    every = checkpoint_every or int(recorded.get("checkpoint_every") or 1)
    keep = keep_checkpoints or bool(recorded.get("keep_checkpoints"))
    # Recorded for resume before the first epoch; a new run leaves another run's checkpoint alone (and is refused).
    if main_process and (resume is not None) == checkpoint.has_checkpoint(root):
        checkpoint.write_options(root, {"checkpoint_every": every, "keep_checkpoints": keep})
    try:
        clf = train_recipe(recipe, dataset=dataset, data_dir=data_dir, epochs=epochs, batch_size=batch_size,
                           learning_rate=learning_rate, seed=seed, verbose=verbose, checkpoint_dir=root,
                           checkpoint_every=every, resume=resume, processes=processes, work_dir=out)
    except BaseException:
        if main_process:
            _remove_empty_run(root, out)
        raise
    if not main_process:  # rank 0 writes the bundle
        return clf
    if not clf.history and clf.architecture != "ensemble":  # an ensemble's members hold the epochs
        _remove_empty_run(root, out)
        return clf
    extra = None
    if figures:
        from .plots import bundle_figures

        extra = bundle_figures(clf)
    if keep or clf.interrupted:
        with checkpoint.kept_through_save(out):
            clf.save(out, extra_files=extra)
    else:  # a bundle saved over OUT replaces the folder whole, its checkpoint with it
        clf.save(out, extra_files=extra)
        checkpoint.remove_checkpoints(root)
    return clf

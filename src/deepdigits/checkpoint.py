"""Training checkpoints: what a run needs to continue, as safetensors + JSON in a folder renamed into place."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write_text, private_dir_to_public
from .bundle import file_sha256
from .errors import DeepDigitsError
from .recipes import Recipe

CHECKPOINT_DIR = "checkpoint"  # inside a run's output folder
STATE_FILE = "checkpoint.json"
TENSORS_FILE = "checkpoint.safetensors"
OPTIONS_FILE = "options.json"  # the command line's options of the run, for ``deepdigits train --resume``
FORMAT = "deepdigits-checkpoint"
FORMAT_VERSION = 1
MAX_STATE_BYTES = 64 << 20  # a checkpoint's JSON holds scalars and RNG states: tens of KB per process
_EPOCH_FOLDER = re.compile(r"epoch-(\d{6,})")

# How a JSON tree marks what JSON has no type for; a tensor of one element or more dimensions goes to
# the safetensors file under its flattened key (``optimizer.state.3.exp_avg``), a 0-d one (Adam's ``step``)
# stays in the JSON as a number with its dtype.
_TENSOR, _SCALAR, _TUPLE, _INT_KEYS = "$tensor", "$scalar", "$tuple", "$int_keys"
_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in (
    torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.bool)}


class CheckpointError(DeepDigitsError):
    """A checkpoint is missing, damaged, or belongs to another run (recipe, data set or process count)."""


# ----------------------------------------------------------------------------- tree <-> JSON + tensors


def encode(value: object, key: str, tensors: dict[str, torch.Tensor]) -> object:
    """``value`` (dicts, lists, tuples, tensors, JSON scalars) as JSON; its tensors go into ``tensors`` by key."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return {_SCALAR: value.item(), "dtype": str(value.dtype).removeprefix("torch.")}
        tensors[key] = value.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: encode(v, f"{key}.{k}" if key else k, tensors) for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):  # optimizer state by parameter
            return {_INT_KEYS: {str(k): encode(v, f"{key}.{k}", tensors) for k, v in value.items()}}
        raise CheckpointError(f"cannot checkpoint {key or 'the state'}: keys must be all strings or all integers")
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise CheckpointError(f"cannot checkpoint {key or 'the state'}: {type(value).__name__} is not a tensor or "
                          "JSON value")


def decode(value: object, tensors: dict[str, torch.Tensor], where: str) -> object:
    """The inverse of ``encode``; a tensor the JSON names but the file lacks is a ``CheckpointError``."""
    if isinstance(value, list):
        return [decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if _TENSOR in value:
        key = value[_TENSOR]
        if not isinstance(key, str) or key not in tensors:
            raise CheckpointError(f"{where}: tensor {str(key)[:80]!r} is missing from {TENSORS_FILE}")
        return tensors[key]
    if _SCALAR in value:
        dtype = _DTYPES.get(value.get("dtype"))
        if dtype is None or isinstance(value[_SCALAR], str | list | dict | None):
            raise CheckpointError(f"{where}: damaged scalar {str(value)[:80]}")
        return torch.tensor(value[_SCALAR], dtype=dtype)
    if _TUPLE in value:
        return tuple(decode(v, tensors, where) for v in value[_TUPLE] or [])
    if _INT_KEYS in value:
        try:
            return {int(k): decode(v, tensors, where) for k, v in value[_INT_KEYS].items()}
        except (ValueError, AttributeError):
            raise CheckpointError(f"{where}: damaged integer-keyed table") from None
    return {k: decode(v, tensors, where) for k, v in value.items()}


# ----------------------------------------------------------------------------- writing


def _fsync(path: Path, folder: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if folder else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _epoch_folders(root: Path) -> list[Path]:
    """``root``'s ``epoch-NNNNNN`` folders, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _EPOCH_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def has_checkpoint(root: str | os.PathLike) -> bool:
    """Whether the checkpoint folder ``root`` holds a checkpoint (complete or not)."""
    return bool(_epoch_folders(Path(root)))


def save_checkpoint(root: str | os.PathLike, epoch: int, state: dict, info: dict) -> Path:
    """Write ``state`` (a tree of tensors and JSON values) and ``info`` (JSON) as ``root/epoch-NNNNNN``.

    The folder is built beside under a hidden name, written through to disk, then renamed into place in
    one step; only then are the older epochs' folders removed, so ``root`` always holds a complete
    checkpoint once it has held one. Nothing is pickled.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".epoch-*.tmp"):  # of a save that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    target = root / f"epoch-{epoch:06d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        tensors: dict[str, torch.Tensor] = {}
        document = {"format": FORMAT, "format_version": FORMAT_VERSION, "epoch": epoch, **info,
                    "state": encode(state, "", tensors)}
        save_file(tensors, str(staging / TENSORS_FILE), metadata={"format": FORMAT})
        document["tensors"] = {"file": TENSORS_FILE, "sha256": file_sha256(staging / TENSORS_FILE)}
        (staging / STATE_FILE).write_text(json.dumps(document) + "\n", encoding="utf-8")
        private_dir_to_public(staging)
        for file in staging.iterdir():
            _fsync(file)
        _fsync(staging, folder=True)
        if target.exists():  # the same epoch written again (a resumed run's last epoch): replace it
            shutil.rmtree(target)
        os.rename(staging, target)
        _fsync(root, folder=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for older in _epoch_folders(root):
        if older != target:
            shutil.rmtree(older, ignore_errors=True)
    return target


def write_options(root: str | os.PathLike, options: dict) -> Path:
    """Record the command line's options of a run beside its checkpoints (atomically)."""
    return atomic_write_text(Path(root) / OPTIONS_FILE, json.dumps(options, indent=2) + "\n")


def read_options(root: str | os.PathLike) -> dict:
    """The options ``write_options`` recorded ({} when there are none or they cannot be read)."""
    try:
        options = json.loads((Path(root) / OPTIONS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return options if isinstance(options, dict) else {}


def remove_checkpoints(root: str | os.PathLike) -> None:
    """Delete a checkpoint folder (a finished run's)."""
    shutil.rmtree(root, ignore_errors=True)


def set_aside_path(out: Path) -> Path:
    """Where a run's checkpoint folder waits while a bundle is swapped in at ``out``: ``.OUT.checkpoint``."""
    return out.parent / f".{out.name}.{CHECKPOINT_DIR}"


@contextmanager
def kept_through_save(out: str | os.PathLike) -> Iterator[None]:
    """Keep ``out/checkpoint`` while a bundle is saved at ``out`` (which replaces the folder whole).

    The checkpoint folder is renamed beside ``out`` and back afterwards; ``find_checkpoint`` also looks
    there, so a process killed in between loses nothing.
    """
    out = Path(out)
    inside, aside = out / CHECKPOINT_DIR, set_aside_path(out)
    moved = False
    if inside.is_dir():
        os.rename(inside, aside)
        moved = True
    try:
        yield
    finally:
        if moved:
            out.mkdir(parents=True, exist_ok=True)
            os.rename(aside, inside)


# ----------------------------------------------------------------------------- reading


def checkpoint_root(path: str | os.PathLike) -> Path:
    """The checkpoint folder of ``path``: a run's output folder, its ``checkpoint`` folder, or one epoch's.

    A checkpoint folder left beside the output folder by a save that was killed is moved back first.
    """
    path = Path(path)
    if (path / STATE_FILE).exists() and _EPOCH_FOLDER.fullmatch(path.name):
        return path.parent
    if _epoch_folders(path):
        return path
    aside = set_aside_path(path)
    if not (path / CHECKPOINT_DIR).exists() and aside.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        with suppress(FileNotFoundError):  # another process of the same run may have moved it first
            os.rename(aside, path / CHECKPOINT_DIR)
    return path / CHECKPOINT_DIR


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The newest epoch folder of the checkpoint at ``path`` (see ``checkpoint_root``)."""
    root = checkpoint_root(path)
    folders = _epoch_folders(root)
    if not folders:
        raise CheckpointError(f"{path}: no checkpoint found (expected {root}/epoch-NNNNNN/{STATE_FILE}); "
                              "training writes one at the end of every epoch")
    return folders[-1]


def _read_document(folder: Path) -> dict:
    state_path = folder / STATE_FILE
    try:
        if not state_path.is_file():
            raise CheckpointError(f"{state_path}: missing; the checkpoint is incomplete")
        with open(state_path, "rb") as f:
            content = f.read(MAX_STATE_BYTES + 1)
    except OSError as exc:
        raise CheckpointError(f"{state_path}: cannot be read ({exc.strerror or exc})") from None
    if len(content) > MAX_STATE_BYTES:
        raise CheckpointError(f"{state_path}: larger than {MAX_STATE_BYTES >> 20} MiB; not a checkpoint")
    try:
        document = json.loads(content)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{state_path}: damaged JSON ({str(exc)[:120]})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"{state_path}: not a deepdigits checkpoint (field 'format' should be {FORMAT!r})")
    if document.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{state_path}: checkpoint format version {str(document.get('format_version'))[:20]}; "
                              f"this deepdigits reads version {FORMAT_VERSION}")
    for name, kind in (("epoch", int), ("state", dict), ("tensors", dict)):
        if not isinstance(document.get(name), kind) or isinstance(document.get(name), bool):
            raise CheckpointError(f"{state_path}: field {name!r} missing or not {kind.__name__}; damaged checkpoint")
    return document


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state, document)`` of the newest checkpoint at ``path``, its tensors checked against their SHA-256.

    ``document`` is the JSON (recipe, data set, epoch, ...); ``state`` the tree ``save_checkpoint`` was given.
    """
    folder = find_checkpoint(path)
    document = _read_document(folder)
    tensors_path = folder / TENSORS_FILE
    if not tensors_path.is_file():
        raise CheckpointError(f"{tensors_path}: missing; the checkpoint is incomplete")
    if file_sha256(tensors_path) != document["tensors"].get("sha256"):
        raise CheckpointError(f"{tensors_path}: checksum mismatch; the checkpoint is damaged")
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{tensors_path}: not a readable safetensors file ({str(exc)[:120]})") from None
    state = decode(document["state"], tensors, str(folder / STATE_FILE))
    document["folder"] = str(folder)
    return state, document  # type: ignore[return-value]


# ----------------------------------------------------------------------------- a recipe's run


def _describe_recipe(recipe: dict) -> str:
    shown = ", ".join(f"{k} {recipe.get(k)}" for k in ("epochs", "batch_size", "learning_rate", "seed", "dataset"))
    return f"{recipe.get('name')!r} ({shown})"


@dataclass
class Resumed:
    """A checkpoint being continued: its training state, its JSON document, and its checkpoint folder."""

    state: dict
    document: dict
    root: Path

    @property
    def where(self) -> str:
        return self.document.get("folder", str(self.root))

    def _recipe(self, field: str) -> Recipe:
        try:
            return Recipe(**self.document[field])
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{self.where}: field {field!r} damaged or from another version ({exc})") from None

    def base_recipe(self) -> Recipe:
        """The named recipe the run started from (before its overrides)."""
        return self._recipe("base_recipe")

    def recipe(self) -> Recipe:
        """The recipe the run trains, its overrides included."""
        return self._recipe("recipe")

    def check_recipe(self, chosen: Recipe) -> None:
        """Refuse to continue the run with another recipe or other overrides."""
        saved = self.document.get("recipe")
        if saved != chosen.to_dict():
            raise CheckpointError(f"{self.where}: a checkpoint of recipe {_describe_recipe(saved or {})}, not of "
                                  f"{_describe_recipe(chosen.to_dict())}; resume it with its own recipe and options")

    def check_data(self, data: dict) -> None:
        """Refuse to continue the run on another data set (other files, or another number of images)."""
        saved = self.document.get("dataset")
        if saved != data:
            name = (saved or {}).get("name") if isinstance(saved, dict) else None
            raise CheckpointError(f"{self.where}: the run trained on another data set ({name!r}, "
                                  f"{(saved or {}).get('train_images')} training images); this one is "
                                  f"{data.get('name')!r} with {data.get('train_images')}, or its files differ")

    def check_world(self, world_size: int) -> None:
        saved = self.document.get("world_size", 1)
        if saved != world_size:
            raise CheckpointError(f"{self.where}: written by a run of {saved} processes; resume it with as many "
                                  f"(this one has {world_size})")


def resume_run(path: str | os.PathLike) -> Resumed:
    """Open the newest checkpoint at ``path`` (a run's output folder, its checkpoint folder or an epoch's)."""
    state, document = load_checkpoint(path)
    return Resumed(state=state, document=document, root=Path(document["folder"]).parent)


def run_identity(base: Recipe, chosen: Recipe, data: dict, world_size: int, backend: str | None,
                 checkpoint_every: int) -> dict:
    """What a checkpoint records of its run, to refuse continuing it with another recipe or data set."""
    return {"recipe": chosen.to_dict(), "base_recipe": base.to_dict(), "dataset": data, "world_size": world_size,
            "backend": backend, "checkpoint_every": checkpoint_every, "epochs": chosen.epochs}


def checkpointing(checkpoint_dir: str | os.PathLike | None, checkpoint_every: int, resumed: Resumed | None,
                  identity: dict) -> dict:
    """The keyword arguments of ``fit`` that continue ``resumed`` and write checkpoints into ``checkpoint_dir``.

    A resumed run goes on writing where its checkpoint is unless ``checkpoint_dir`` says otherwise. A new
    run refuses a folder that already holds a checkpoint: that run can be resumed, and is not overwritten.
    """
    options: dict = {}
    if resumed is not None:
        options["resume_from"] = resumed.state
        if checkpoint_dir is None:
            checkpoint_dir = resumed.root
    if checkpoint_dir is None:
        return options
    if checkpoint_every < 1:
        raise DeepDigitsError(f"checkpoint_every: expected 1 or more epochs, got {checkpoint_every}")
    root = Path(checkpoint_dir)
    if resumed is None and has_checkpoint(root):
        raise CheckpointError(f"{root}: holds the checkpoint of an unfinished run; resume it (deepdigits train "
                              f"--resume {root.parent if root.name == CHECKPOINT_DIR else root}) or delete it")

    def write(epoch: int, state: dict) -> None:
        save_checkpoint(root, epoch, state, identity)

    options["checkpoint_every"] = checkpoint_every
    options["on_checkpoint"] = write
    return options

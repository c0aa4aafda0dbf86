"""Save and load model bundles: a folder of safetensors weights plus JSON metadata, written atomically."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import private_dir_to_public
from .errors import BundleError

FORMAT = "deepdigits-bundle"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
HISTORY_FILE = "history.csv"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def history_csv(epochs: list[dict]) -> str:
    if not epochs:
        return ""
    columns = list(dict.fromkeys(k for e in epochs for k in e))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(epochs)
    return out.getvalue()


def save_bundle(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    metadata: dict,
    extra_files: dict[str, bytes] | None = None,
) -> Path:
    """Write a bundle folder at ``path`` atomically: build it beside, then swap it in.

    An existing bundle at ``path`` is replaced only once the new one is complete, so an
    interrupted save never leaves a half-written model behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BundleError(f"{path}: exists and is not a folder; expected a bundle folder path")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        weights = staging / WEIGHTS_FILE
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(weights), metadata={"format": FORMAT})
        document = dict(metadata)
        document["format"] = FORMAT
        document["format_version"] = FORMAT_VERSION
        document["weights"] = {"file": WEIGHTS_FILE, "sha256": _sha256(weights)}
        (staging / METADATA_FILE).write_text(json.dumps(document, indent=2) + "\n")
        (staging / HISTORY_FILE).write_text(history_csv(document.get("history", [])))
        for name, content in (extra_files or {}).items():
            (staging / name).write_bytes(content)
        private_dir_to_public(staging)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_metadata(path: str | os.PathLike) -> dict:
    """Read and check a bundle's JSON document (no weights)."""
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"{path}: not a model bundle folder (expected a folder with {METADATA_FILE})")
    meta_path = path / METADATA_FILE
    try:
        document = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{meta_path}: missing; expected the bundle's metadata file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{meta_path}: damaged JSON ({exc})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: not a deepdigits bundle (field 'format' should be {FORMAT!r})")
    version = document.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{meta_path}: bundle format version {version!r}; this deepdigits reads version {FORMAT_VERSION}"
        )
    for key in ("architecture", "weights"):
        if key not in document:
            raise BundleError(f"{meta_path}: missing field {key!r}")
    return document


def load_bundle(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(state_dict, metadata)`` after checking the weights' checksum. Nothing is unpickled."""
    path = Path(path)
    document = read_metadata(path)
    weights = path / document["weights"].get("file", WEIGHTS_FILE)
    if not weights.is_file():
        raise BundleError(f"{weights}: missing; expected the bundle's weights")
    expected = document["weights"].get("sha256")
    if expected and _sha256(weights) != expected:
        raise BundleError(f"{weights}: checksum mismatch; the weights file is damaged or was replaced")
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"{weights}: not a readable safetensors file ({exc})") from None
    return state_dict, document

"""Find, verify and load the MNIST-format datasets (IDX files) and split them."""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_bytes
from .errors import DataError

# IDX type codes (third byte of the magic number) and the big-endian dtypes they mean.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

PARTS = ("train-images", "train-labels", "test-images", "test-labels")
_PART_FILES = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}

ENV_VAR = "DEEPDIGITS_DATA"


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset is: its files, their checksums, its classes and where to download it."""

    name: str
    title: str
    class_names: tuple[str, ...]
    sha256: dict[str, str]  # IDX file name -> SHA-256 of the decompressed content
    mirrors: tuple[str, ...]
    system_dirs: tuple[str, ...] = ()


DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        name="mnist",
        title="MNIST handwritten digits",
        class_names=tuple(str(d) for d in range(10)),
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        title="Fashion-MNIST clothing images",
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        # Computed by deepdigits from the decompressed files of the official release.
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
    ),
}


@dataclass
class Dataset:
    """A loaded dataset: uint8 images (N, 28, 28), uint8 labels (N,), and where they came from."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]
    source: str
    checksums: dict[str, str] = field(default_factory=dict)

    def split(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(images, labels)`` of the ``"train"`` or ``"test"`` split."""
        if which == "train":
            return self.x_train, self.y_train
        if which == "test":
            return self.x_test, self.y_test
        raise ValueError(f"split must be 'train' or 'test', got {which!r}")

    def info(self) -> dict:
        """Shapes, class counts and source, as plain JSON-ready values."""
        return {
            "dataset": self.name,
            "source": self.source,
            "class_names": list(self.class_names),
            "train": {
                "images": list(self.x_train.shape),
                "labels": list(self.y_train.shape),
                "class_counts": np.bincount(self.y_train, minlength=len(self.class_names)).tolist(),
            },
            "test": {
                "images": list(self.x_test.shape),
                "labels": list(self.y_test.shape),
                "class_counts": np.bincount(self.y_test, minlength=len(self.class_names)).tolist(),
            },
            "sha256": dict(self.checksums),
        }


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}; expected one of: {', '.join(DATASETS)}") from None


# --------------------------------------------------------------------------- IDX files


def read_idx_bytes(path: str | os.PathLike) -> bytes:
    """Return the decompressed content of an IDX file, gzip-compressed or raw."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as gz:
                    return gz.read()
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{path}: damaged gzip stream ({exc}); expected a complete .gz file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def parse_idx(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX content (magic, dimensions, data) into an array of its native dtype."""
    if len(content) < 4:
        raise DataError(f"{name}: too short for an IDX header ({len(content)} bytes); expected at least 4")
    zero, type_code, ndim = content[0:2], content[2], content[3]
    if zero != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise DataError(
            f"{name}: bad magic number 0x{content[:4].hex()}; expected 0x0000TTDD "
            f"(TT a type code such as 08 for unsigned bytes, DD the number of dimensions)"
        )
    header_len = 4 + 4 * ndim
    if len(content) < header_len:
        raise DataError(f"{name}: truncated header: {len(content)} bytes, expected {header_len}")
    dims = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(content) - header_len
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise DataError(
            f"{name}: {what}: header says shape {dims} ({expected} data bytes), found {found} data bytes"
        )
    array = np.frombuffer(content, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return array.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


def read_idx(path: str | os.PathLike, sha256: str | None = None) -> np.ndarray:
    """Read one IDX file (gzip or raw); if ``sha256`` is given, verify the decompressed content first."""
    content = read_idx_bytes(path)
    if sha256 is not None:
        found = hashlib.sha256(content).hexdigest()
        if found != sha256:
            raise DataError(
                f"{path}: checksum mismatch: SHA-256 of the decompressed content is {found}, expected {sha256}"
            )
    return parse_idx(content, str(path))


# --------------------------------------------------------------------------- finding the files


def _find_part_file(folder: Path, idx_name: str) -> Path | None:
    for candidate in (idx_name + ".gz", idx_name, idx_name.replace("-idx", ".idx")):
        path = folder / candidate
        if path.is_file():
            return path
    return None


def _complete_folder(folder: Path, spec: DatasetSpec) -> dict[str, Path] | None:
    """The four files of ``spec`` in ``folder`` (or its ``<dataset>/`` subfolder), or None."""
    for candidate in (folder / spec.name, folder):
        found = {part: _find_part_file(candidate, _PART_FILES[part]) for part in PARTS}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def cache_dir() -> Path:
    """The user cache where downloads are kept (``$XDG_CACHE_HOME/deepdigits`` or ``~/.cache/deepdigits``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deepdigits"


def locate(
    name: str = "mnist", data_dir: str | os.PathLike | None = None, download: bool = True
) -> tuple[dict[str, Path], str]:
    """Find the dataset's four files; return them and a sentence saying where they came from.

    Order: ``data_dir`` (must hold the files if given); ``$DEEPDIGITS_DATA/<name>``; system
    folders (Debian's Fashion-MNIST); the user cache; a checksummed download into the cache.
    """
    spec = dataset_spec(name)
    looked: list[str] = []
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        found = _complete_folder(folder, spec)
        if found:
            return found, f"--data-dir {folder}"
        raise DataError(
            f"{folder}: no complete {spec.name} files there (looked in {folder / spec.name} and {folder} "
            f"for {', '.join(_PART_FILES[p] + '[.gz]' for p in PARTS)})"
        )
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env).expanduser()
        found = _complete_folder(folder, spec)
        if found:
            return found, f"${ENV_VAR} ({folder})"
        looked.append(f"${ENV_VAR}={folder}")
    for system in spec.system_dirs:
        found = _complete_folder(Path(system), spec)
        if found:
            return found, f"system copy ({system})"
        looked.append(system)
    cached = cache_dir() / spec.name
    found = _complete_folder(cached, spec)
    if found:
        return found, f"user cache ({cached})"
    looked.append(str(cached))
    if not download:
        raise DataError(_not_found_message(spec, looked, []))
    failures: list[str] = []
    found = _download(spec, cached, failures)
    if found:
        return found, f"downloaded into the user cache ({cached})"
    raise DataError(_not_found_message(spec, looked, failures))


def _not_found_message(spec: DatasetSpec, looked: list[str], failures: list[str]) -> str:
    tried = "; ".join(looked)
    failed = f"; download failed: {failures[-1]}" if failures else ""
    return (
        f"{spec.name} data not found (looked in: {tried}{failed}). Put the four IDX files "
        f"({', '.join(_PART_FILES[p] + '.gz' for p in PARTS)}) in a folder and pass --data-dir FOLDER "
        f"or set {ENV_VAR}=FOLDER (a folder holding {spec.name}/ also works)"
    )


def _download(spec: DatasetSpec, target: Path, failures: list[str]) -> dict[str, Path] | None:
    target.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for part in PARTS:
        idx_name = _PART_FILES[part]
        dest = target / (idx_name + ".gz")
        if dest.is_file():
            paths[part] = dest
            continue
        for mirror in spec.mirrors:
            url = mirror + idx_name + ".gz"
            try:
                _fetch_verified(url, dest, spec.sha256[idx_name])
                paths[part] = dest
                break
            except (OSError, urllib.error.URLError, DataError) as exc:
                failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
        else:
            return None
    return paths


def _fetch_verified(url: str, dest: Path, sha256: str) -> None:
    """Download ``url`` to ``dest`` with a progress bar; it lands only if its content checksum is right."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    def download_and_verify(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn(dest.name), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, transient=True) as progress:
                task = progress.add_task("download", total=total)
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    progress.advance(task, len(chunk))
        found = hashlib.sha256(read_idx_bytes(tmp)).hexdigest()
        if found != sha256:
            raise DataError(f"{url}: checksum mismatch: got {found}, expected {sha256}")

    atomic_write(dest, download_and_verify)


# --------------------------------------------------------------------------- loading


def load_dataset(
    name: str = "mnist", data_dir: str | os.PathLike | None = None, download: bool = True, verify: bool = True
) -> Dataset:
    """Load a dataset as uint8 arrays, verifying every file's SHA-256 and shape.

    >>> ds = load_dataset("mnist")          # doctest: +SKIP
    >>> ds.x_train.shape, ds.source         # doctest: +SKIP
    ((60000, 28, 28), '$DEEPDIGITS_DATA (../shared/data)')
    """
    spec = dataset_spec(name)
    files, source = locate(name, data_dir=data_dir, download=download)
    arrays: dict[str, np.ndarray] = {}
    checksums: dict[str, str] = {}
    for part in PARTS:
        idx_name = _PART_FILES[part]
        expected = spec.sha256[idx_name] if verify else None
        arrays[part] = read_idx(files[part], sha256=expected)
        checksums[idx_name] = spec.sha256[idx_name]
    for split in ("train", "test"):
        images, labels = arrays[f"{split}-images"], arrays[f"{split}-labels"]
        images_file, labels_file = files[f"{split}-images"], files[f"{split}-labels"]
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(
                f"{images_file}: expected images of shape (N, 28, 28) and labels (N,), "
                f"found {images.shape} and {labels.shape}"
            )
        if len(images) != len(labels):
            raise DataError(
                f"{labels_file}: {len(labels)} labels for {len(images)} images in {images_file}; "
                f"expected the same count"
            )
    return Dataset(
        name=name,
        x_train=arrays["train-images"].astype(np.uint8, copy=False),
        y_train=arrays["train-labels"].astype(np.uint8, copy=False),
        x_test=arrays["test-images"].astype(np.uint8, copy=False),
        y_test=arrays["test-labels"].astype(np.uint8, copy=False),
        class_names=spec.class_names,
        source=source,
        checksums=checksums,
    )


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip if the name ends in .gz), atomically."""
    path = Path(path)
    codes = {v.newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    dtype = array.dtype.newbyteorder("=")
    if dtype not in codes:
        raise ValueError(f"IDX cannot store dtype {array.dtype}")
    header = bytes([0, 0, codes[dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    content = header + array.astype(_IDX_DTYPES[codes[dtype]]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        content = gzip.compress(content, mtime=0)
    return atomic_write_bytes(path, content)


# --------------------------------------------------------------------------- splits


def validation_split(
    x: np.ndarray, y: np.ndarray, fraction: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Keras's ``validation_split``: the last ``fraction`` of the arrays, taken before any shuffling."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    split_at = math.ceil(len(x) * (1.0 - fraction))  # as Keras 3's train_validation_split
    return x[:split_at], y[:split_at], x[split_at:], y[split_at:]


def shuffled_split(
    x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0, stratify: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A seeded random split (optionally stratified by label) into train and validation parts."""
    from sklearn.model_selection import train_test_split

    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=fraction, random_state=seed, shuffle=True, stratify=y if stratify else None
    )
    return x_tr, y_tr, x_val, y_val


def parse_index_range(text: str, limit: int) -> list[int]:
    """Parse ``"0-19"``, ``"3"`` or ``"1,5,9-12"`` into indices checked against ``limit``."""
    indices: list[int] = []
    try:
        for piece in text.split(","):
            piece = piece.strip()
            if "-" in piece:
                lo, hi = (int(p) for p in piece.split("-", 1))
                indices.extend(range(lo, hi + 1))
            else:
                indices.append(int(piece))
    except ValueError:
        raise DataError(f"index range {text!r}: expected numbers like 0-19 or 1,5,9-12") from None
    bad = [i for i in indices if not 0 <= i < limit]
    if not indices or bad:
        raise DataError(f"index range {text!r}: indices must lie in 0-{limit - 1}")
    return indices

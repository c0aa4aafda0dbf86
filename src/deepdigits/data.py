"""Find, verify and load the MNIST-format datasets (IDX files) and split them."""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import stat
import sys
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
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
    split_sizes: dict[str, int] = field(default_factory=dict)  # "train"/"test" -> images, where fixed


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
        split_sizes={"train": 60000, "test": 10000},
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
        split_sizes={"train": 60000, "test": 10000},
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

# The largest decompressed IDX file read_idx accepts unless given max_bytes: room above MNIST's and
# Fashion-MNIST's biggest (train images, 47,040,016 bytes), and the most memory an accepted file may take,
# since its data is read into one buffer of the length its header states (a refused file costs its header).
# Peak RSS (/usr/bin/time -v) of read_idx on a 1 MB gzip of 1 GiB of zeros: 2.4 GB when the whole stream
# was decompressed before any check, 35 MB (the interpreter with numpy) now; on a 2 GiB sparse raw file
# 4.5 GB before, 35 MB now; a bomb behind MNIST's own header is read to 47 MB and no further (84 MB).
DEFAULT_MAX_BYTES = 64 << 20
_CHUNK = 1 << 20  # bytes read (decompressed) per step, bounding what a read holds beyond the buffer


@dataclass(frozen=True)
class IdxHeader:
    """An IDX file's header: the element type, the shape and the header's own bytes."""

    dtype: np.dtype
    shape: tuple[int, ...]
    raw: bytes

    @property
    def data_bytes(self) -> int:
        """Length of the data that follows the header, as the header states it."""
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def total_bytes(self) -> int:
        """Length of the whole decompressed file, header included."""
        return len(self.raw) + self.data_bytes


def _parse_header(content: bytes, name: str) -> IdxHeader:
    """Parse the IDX header at the start of ``content`` (the data may follow or not)."""
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
    return IdxHeader(_IDX_DTYPES[type_code], dims, bytes(content[:header_len]))


def _size_error(name: str, header: IdxHeader, found: int | None) -> DataError:
    """The error for data of the wrong length; ``found`` None means more than expected, by an unknown amount."""
    expected = header.data_bytes
    what = "truncated" if found is not None and found < expected else "has trailing bytes"
    found_text = f"more than {expected}" if found is None else str(found)
    return DataError(
        f"{name}: {what}: header says shape {header.shape} ({expected} data bytes), found {found_text} data bytes"
    )


def _describe(shape: tuple[int | None, ...], dtype: np.dtype | None) -> str:
    dims = ", ".join("N" if d is None else str(d) for d in shape)
    text = f"shape ({dims},)" if len(shape) == 1 else f"shape ({dims})"
    return text + (f" of {dtype.name}" if dtype is not None else "")


def _check_expected(
    header: IdxHeader, name: str, shape: tuple[int | None, ...] | None, dtype: np.dtype | None, note: str = ""
) -> None:
    """Refuse a header whose shape (``None`` matches any length) or element type is not the expected one."""
    shape_ok = shape is None or (
        len(shape) == len(header.shape) and all(e is None or e == d for e, d in zip(shape, header.shape, strict=True))
    )
    if shape_ok and (dtype is None or header.dtype == dtype):
        return
    raise DataError(
        f"{name}: header says {_describe(header.shape, header.dtype)}; expected "
        f"{_describe(shape if shape is not None else header.shape, dtype)}{f' ({note})' if note else ''}"
    )


@contextmanager
def _idx_stream(path: Path, name: str) -> Iterator[tuple[io.BufferedIOBase, int | None]]:
    """Open an IDX file as a stream of its decompressed bytes; also yield its size if it is a raw regular file."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if gzipped:
                with gzip.GzipFile(fileobj=f) as gz:
                    yield gz, None
            else:
                info = os.fstat(f.fileno())
                yield f, info.st_size if stat.S_ISREG(info.st_mode) else None
    except FileNotFoundError:
        raise DataError(f"{name}: file not found") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise DataError(f"{name}: damaged gzip stream ({exc}); expected a complete .gz file") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror or exc})") from None


def _read_up_to(stream: io.BufferedIOBase, n: int) -> bytes:
    """Read ``n`` bytes, fewer only at the end of the stream."""
    parts: list[bytes] = []
    while n > 0 and (part := stream.read(n)):
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_header(stream: io.BufferedIOBase, name: str) -> IdxHeader:
    head = _read_up_to(stream, 4)
    if len(head) == 4:
        head += _read_up_to(stream, 4 * head[3])
    return _parse_header(head, name)


def _read_idx(
    path: str | os.PathLike,
    name: str,
    max_bytes: int,
    shape: tuple[int | None, ...] | None = None,
    dtype: np.dtype | None = None,
    note: str = "",
) -> tuple[IdxHeader, np.ndarray, str]:
    """Header, data bytes (uint8) and SHA-256 of an IDX file: its header checked, then exactly its length read."""
    with _idx_stream(Path(path), name) as (stream, raw_size):
        header = _read_header(stream, name)
        _check_expected(header, name, shape, dtype, note)
        if header.total_bytes > max_bytes:
            raise DataError(
                f"{name}: too large: header says {_describe(header.shape, header.dtype)} "
                f"({header.total_bytes} bytes); expected at most {max_bytes} bytes"
            )
        if raw_size is not None and raw_size != header.total_bytes:
            raise _size_error(name, header, raw_size - len(header.raw))
        # np.empty's pages are mapped lazily: a gzip holding MNIST's header and 1 MiB of data took 4 MB.
        data = np.empty(header.data_bytes, dtype=np.uint8)
        view = memoryview(data)
        digest = hashlib.sha256(header.raw)
        filled = 0
        while filled < len(data) and (chunk := stream.read(min(_CHUNK, len(data) - filled))):
            view[filled : filled + len(chunk)] = chunk
            digest.update(chunk)
            filled += len(chunk)
        if filled < len(data):
            raise _size_error(name, header, filled)
        if stream.read(1):
            raise _size_error(name, header, None)
    return header, data, digest.hexdigest()


def _check_sha256(name: str, found: str, sha256: str | None) -> None:
    if sha256 is not None and found != sha256:
        raise DataError(f"{name}: checksum mismatch: SHA-256 of the decompressed content is {found}, expected {sha256}")


def _as_array(header: IdxHeader, data: np.ndarray) -> np.ndarray:
    array = data.view(header.dtype).reshape(header.shape)
    return array.astype(header.dtype.newbyteorder("="), copy=False)


def read_idx_header(path: str | os.PathLike) -> IdxHeader:
    """Read and validate only the header of an IDX file (gzip or raw)."""
    with _idx_stream(Path(path), str(path)) as (stream, _):
        return _read_header(stream, str(path))


def read_idx_bytes(path: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Return the decompressed content of a well-formed IDX file (gzip or raw) of at most ``max_bytes``."""
    header, data, _ = _read_idx(path, str(path), max_bytes)
    return header.raw + data.tobytes()


def parse_idx(content: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX content (magic, dimensions, data) into an array of its native dtype."""
    header = _parse_header(content, name)
    found = len(content) - len(header.raw)
    if found != header.data_bytes:
        raise _size_error(name, header, found)
    data = np.frombuffer(content, dtype=np.uint8, offset=len(header.raw)).copy()
    return _as_array(header, data)


def read_idx(path: str | os.PathLike, sha256: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Read one IDX file (gzip or raw) of at most ``max_bytes`` decompressed; checks ``sha256`` once it parses."""
    header, data, found = _read_idx(path, str(path), max_bytes)
    _check_sha256(str(path), found, sha256)
    return _as_array(header, data)


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
                _fetch_verified(url, dest, spec.sha256[idx_name], _part_limit(spec, part))
                paths[part] = dest
                break
            except (OSError, urllib.error.URLError, DataError) as exc:
                failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
        else:
            return None
    return paths


def _fetch_verified(url: str, dest: Path, sha256: str, max_bytes: int) -> None:
    """Download ``url`` to ``dest`` with a progress bar; it lands only if it parses and its checksum is right."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    def download_and_verify(tmp: str) -> None:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            columns = (TextColumn(dest.name), BarColumn(), DownloadColumn(), TransferSpeedColumn())
            with Progress(*columns, transient=True) as progress:
                task = progress.add_task("download", total=total)
                received = 0
                while chunk := response.read(1 << 16):
                    received += len(chunk)
                    if received > download_limit:
                        raise DataError(f"{url}: over {download_limit} bytes; expected a smaller .gz file")
                    out.write(chunk)
                    progress.advance(task, len(chunk))
        _check_sha256(url, _read_idx(tmp, url, max_bytes)[2], sha256)

    # gzip can make a file slightly larger than its content: deflate adds at most about 0.03% (zlib's
    # deflateBound), gzip a header holding at most a file name.
    download_limit = max_bytes + max_bytes // 1024 + 4096

    atomic_write(dest, download_and_verify)


# --------------------------------------------------------------------------- loading


_UINT8 = np.dtype(np.uint8)


def _part_expectation(
    spec: DatasetSpec, part: str, counts: bool
) -> tuple[tuple[int | None, ...], np.dtype, str]:
    """Shape (with the known count if ``counts``), element type and description of a dataset part's file."""
    split, kind = part.split("-")
    n = spec.split_sizes.get(split) if counts else None
    if kind == "images":
        return (n, 28, 28), _UINT8, f"{spec.name} {split} images of 28x28 pixels"
    return (n,), _UINT8, f"{spec.name} {split} labels"


def _part_limit(spec: DatasetSpec, part: str) -> int:
    """The decompressed size of a dataset part's file where its count is known, else the default cap."""
    n = spec.split_sizes.get(part.split("-")[0])
    if n is None:
        return DEFAULT_MAX_BYTES
    return 16 + n * 28 * 28 if part.endswith("images") else 8 + n


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
    # Every header is checked before any data is read or hashed, so that a wrong file is named for
    # what is wrong with it: "checksum mismatch" is left for files that parse but differ.
    headers = {part: read_idx_header(files[part]) for part in PARTS}
    for part in PARTS:
        _check_expected(headers[part], str(files[part]), *_part_expectation(spec, part, counts=False))
    for split in ("train", "test"):
        n_images, n_labels = headers[f"{split}-images"].shape[0], headers[f"{split}-labels"].shape[0]
        if n_images != n_labels:
            raise DataError(
                f"{files[f'{split}-labels']}: {n_labels} labels for {n_images} images in "
                f"{files[f'{split}-images']}; expected the same count"
            )
    for part in PARTS:
        _check_expected(headers[part], str(files[part]), *_part_expectation(spec, part, counts=True))
    arrays: dict[str, np.ndarray] = {}
    checksums: dict[str, str] = {}
    for part in PARTS:
        idx_name, path = _PART_FILES[part], files[part]
        changed = "the file changed since its header was read"
        header, data, found = _read_idx(path, str(path), _part_limit(spec, part), headers[part].shape, _UINT8, changed)
        if verify:
            _check_sha256(str(path), found, spec.sha256[idx_name])
        arrays[part] = _as_array(header, data)
        checksums[idx_name] = spec.sha256[idx_name]
    return Dataset(
        name=name,
        x_train=arrays["train-images"],
        y_train=arrays["train-labels"],
        x_test=arrays["test-images"],
        y_test=arrays["test-labels"],
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


# --------------------------------------------------------------------------- photographed training digits

PHOTO_SEED = 0  # one set of crops for every recipe seed: they take ~36 ms a digit to make


def photo_crops(x: np.ndarray, y: np.ndarray, count: int, seed: int = PHOTO_SEED,
                cache: str | os.PathLike | None = None, verbose: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``count`` of the digits ``x`` (labels ``y``), photographed and read back as the recogniser reads photos.

    Each digit chosen (seeded, without repeats while ``count`` allows) is drawn as a photo on paper by
    ``synthetic.render_digit`` (60-260 px tall, thin to thick strokes, rotated, lighting, noise, JPEG) and cut
    out again by ``preprocess.to_mnist``: the 28x28 crops the network meets in use, not MNIST's. Making one
    takes about 36 ms (8 ms drawing, 28 ms reading) on a quiet core, 86 ms at load 5-7 (24,000 in 34 minutes),
    so the crops are kept in ``cache`` (default: the user cache) under a name hashing the digits, labels,
    count, seed and the two modules' code.
    """
    from . import preprocess, synthetic

    if count < 0 or len(x) != len(y) or (count and not len(x)):
        raise ValueError(f"photo_crops: count must be 0 or more of {len(x)} digits with {len(y)} labels")
    key = hashlib.sha256()
    for part in (np.ascontiguousarray(x).tobytes(), np.ascontiguousarray(y).tobytes(), f"{count},{seed}".encode(),
                 Path(synthetic.__file__).read_bytes(), Path(preprocess.__file__).read_bytes()):
        key.update(part)
    path = Path(cache or cache_dir()) / f"photo-crops-{key.hexdigest()[:16]}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as saved:
            return saved["x"], saved["y"]
    rng = np.random.default_rng(seed)
    picks = np.resize(rng.permutation(len(x)), count) if count else np.zeros(0, np.int64)
    crops = np.zeros((count, *x.shape[1:]), np.uint8)
    for n, i in enumerate(picks):
        crops[n] = preprocess.to_mnist(synthetic.render_digit(x[i], rng))
        if verbose and (n + 1) % 1000 == 0:
            print(f"photo crops: {n + 1:,} of {count:,}", file=sys.stderr, flush=True)
    labels = np.asarray(y)[picks].astype(np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, x=crops, y=labels)

    atomic_write(path, write)
    return crops, labels

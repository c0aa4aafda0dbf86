import gzip
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from deepdigits.data import (
    DATASETS,
    DEFAULT_MAX_BYTES,
    _fetch_verified,
    _part_limit,
    load_dataset,
    locate,
    parse_idx,
    read_idx,
    read_idx_bytes,
    read_idx_header,
    shuffled_split,
    validation_split,
    write_idx,
)
from deepdigits.errors import DataError

# --------------------------------------------------------------------------- IDX parsing


def test_idx_round_trip_gzip_and_raw(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for name in ("a-idx3-ubyte.gz", "a-idx3-ubyte"):
        path = write_idx(tmp_path / name, images)
        np.testing.assert_array_equal(read_idx(path), images)
    assert (tmp_path / "a-idx3-ubyte.gz").read_bytes()[:2] == b"\x1f\x8b"
    assert (tmp_path / "a-idx3-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x03"


def test_idx_other_dtypes_are_big_endian(tmp_path):
    values = np.array([1, -2, 300000], dtype=np.int32)
    path = write_idx(tmp_path / "ints-idx1", values)
    assert path.read_bytes()[8:12] == (1).to_bytes(4, "big")
    np.testing.assert_array_equal(read_idx(path), values)


def test_truncated_file_names_file_and_sizes(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError) as err:
        read_idx(path)
    message = str(err.value)
    assert str(path) in message and "truncated" in message and "(3, 28, 28)" in message
    assert "(2352 data bytes), found 2252 data bytes" in message


def test_trailing_bytes_rejected():
    content = bytes([0, 0, 8, 1]) + (2).to_bytes(4, "big") + b"\x01\x02\x03"
    with pytest.raises(DataError, match="trailing bytes"):
        parse_idx(content, "x")


def test_truncated_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "t-idx3-ubyte.gz", np.zeros((50, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match=r"t-idx3-ubyte\.gz: damaged gzip stream"):
        read_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(DataError) as err:
        read_idx(path)
    assert "bad magic number 0x504b0304" in str(err.value) and str(path) in str(err.value)


def test_wrong_checksum_names_both_hashes(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    wrong = "0" * 64
    with pytest.raises(DataError) as err:
        read_idx(path, sha256=wrong)
    real = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
    assert f"is {real}, expected {wrong}" in str(err.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty-idx3-ubyte"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="too short for an IDX header"):
        read_idx(path)


# --------------------------------------------------------------------------- lookup order


def test_explicit_data_dir_wins_and_is_strict(tiny, tmp_path, monkeypatch):
    spec, src = tiny
    files, source = locate(spec.name, data_dir=src)
    assert source == f"--data-dir {src}" and files["train-images"].parent == src / "tiny"
    # the folder holding the files directly works too
    assert locate(spec.name, data_dir=src / "tiny")[0]["test-labels"].name == "t10k-labels-idx1-ubyte.gz"
    monkeypatch.setenv("DEEPDIGITS_DATA", str(src))
    with pytest.raises(DataError, match="no complete tiny files there"):
        locate(spec.name, data_dir=tmp_path / "nowhere")


def test_env_then_system_then_cache(tiny, tmp_path, monkeypatch):
    spec, src = tiny
    monkeypatch.setenv("DEEPDIGITS_DATA", str(src))
    assert locate(spec.name)[1] == f"$DEEPDIGITS_DATA ({src})"
    # env set but without this dataset: fall through to a system folder
    monkeypatch.setenv("DEEPDIGITS_DATA", str(tmp_path / "empty"))
    monkeypatch.setitem(DATASETS, spec.name, replace(spec, system_dirs=(str(src / "tiny"),)))
    assert locate(spec.name)[1] == f"system copy ({src / 'tiny'})"
    # then the user cache
    monkeypatch.setitem(DATASETS, spec.name, spec)
    cache = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    make_cache = cache / "deepdigits"
    from conftest import make_tiny_dataset

    make_tiny_dataset(make_cache)
    assert locate(spec.name)[1] == f"user cache ({make_cache / 'tiny'})"


def test_nothing_found_offline_lists_places(tiny, tmp_path, monkeypatch):
    spec, _ = tiny
    monkeypatch.setenv("DEEPDIGITS_DATA", str(tmp_path / "nothing"))
    monkeypatch.setitem(DATASETS, spec.name, replace(spec, mirrors=("http://127.0.0.1:9/",)))
    with pytest.raises(DataError) as err:
        load_dataset(spec.name)
    message = str(err.value)
    assert "tiny data not found" in message and "$DEEPDIGITS_DATA=" in message
    assert "download failed" in message and "--data-dir" in message
    assert "\n" not in message


def test_download_verifies_and_writes_atomically(tiny, tmp_path, monkeypatch):
    spec, src = tiny
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(src / "tiny"))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        monkeypatch.delenv("DEEPDIGITS_DATA", raising=False)
        # a mirror serving a file with the wrong content must not leave anything in the cache
        bad = replace(spec, mirrors=(url,), sha256={**spec.sha256, "t10k-labels-idx1-ubyte": "f" * 64})
        monkeypatch.setitem(DATASETS, spec.name, bad)
        with pytest.raises(DataError, match="checksum mismatch"):
            load_dataset(spec.name)
        cached = tmp_path / "xdg-dl"
        monkeypatch.setenv("XDG_CACHE_HOME", str(cached))
        monkeypatch.setitem(DATASETS, spec.name, replace(spec, mirrors=(url,)))
        ds = load_dataset(spec.name)
        assert ds.source.startswith("downloaded into the user cache")
        assert sorted(p.name for p in (cached / "deepdigits" / "tiny").iterdir()) == sorted(
            n + ".gz" for n in spec.sha256
        )
        assert load_dataset(spec.name).source.startswith("user cache")  # second time: no download
    finally:
        server.shutdown()


def test_count_mismatch_between_images_and_labels(tiny, tmp_path):
    spec, src = tiny
    write_idx(src / "tiny" / "train-labels-idx1-ubyte.gz", np.zeros(29, np.uint8))
    with pytest.raises(DataError) as err:
        load_dataset(spec.name, data_dir=src, verify=False)
    assert "29 labels for 30 images" in str(err.value)


# --------------------------------------------------------------------------- the real files


def test_real_mnist_is_verified_and_as_documented(mnist):
    assert mnist.x_train.shape == (60000, 28, 28) and mnist.x_train.dtype == np.uint8
    assert mnist.x_test.shape == (10000, 28, 28)
    assert np.bincount(mnist.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(mnist.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert mnist.y_test[:20].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9, 0, 6, 9, 0, 1, 5, 9, 7, 3, 4]


def test_fashion_mnist_has_class_names(data_root):
    ds = load_dataset("fashion-mnist", data_dir=data_root)
    assert ds.class_names[7] == "Sneaker" and ds.x_test.shape == (10000, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset 'emnist'; expected one of: mnist, fashion-mnist"):
        load_dataset("emnist")


# --------------------------------------------------------------------------- splits


def test_keras_validation_split_takes_the_last_fraction():
    x = np.arange(60000)
    x_tr, _y_tr, x_val, _y_val = validation_split(x, x, 0.1)
    assert len(x_tr) == 54000 and len(x_val) == 6000
    assert x_val[0] == 54000 and x_val[-1] == 59999
    assert len(validation_split(x, x, 0.0)[2]) == 0
    with pytest.raises(ValueError):
        validation_split(x, x, 1.0)


def test_stratified_split_is_seeded_and_balanced():
    y = np.repeat(np.arange(10), 100)
    x = np.arange(1000)
    a = shuffled_split(x, y, 0.2, seed=3, stratify=True)
    b = shuffled_split(x, y, 0.2, seed=3, stratify=True)
    np.testing.assert_array_equal(a[2], b[2])
    assert np.bincount(a[3]).tolist() == [20] * 10
    assert len(a[0]) == 800 and not set(a[0]) & set(a[2])


def test_downloaded_part_files_are_cleaned(tmp_path):
    # no .part files may be left behind by the atomic writer
    write_idx(tmp_path / "z-idx1-ubyte.gz", np.zeros(3, np.uint8))
    assert [p.name for p in Path(tmp_path).iterdir()] == ["z-idx1-ubyte.gz"]


# --------------------------------------------------------------------------- hostile input

_MiB = 1 << 20


def _header(*dims: int, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.fixture(scope="module")
def zeros_member() -> bytes:
    """A gzip member holding 200 MiB of zeros (about 200 KB), compressed a chunk at a time."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip container
    chunk = bytes(_MiB)
    parts = [packer.compress(chunk) for _ in range(200)]
    return b"".join([*parts, packer.flush()])


def _bomb(path: Path, head: bytes, zeros_member: bytes) -> Path:
    """``head`` then 200 MiB of zeros, as two gzip members (readers see one stream)."""
    path.write_bytes(gzip.compress(head, mtime=0) + zeros_member)
    return path


def _error(call: Callable[..., object], *args: object, **kwargs: object) -> str:
    """The message of the DataError that ``call`` raises, checked to be one line."""
    with pytest.raises(DataError) as err:
        call(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


# One fresh interpreter per file: ru_maxrss is a peak, so pytest's own (the real MNIST arrays) or an
# earlier file's would hide the growth.
_MEASURE = """
import json, resource, sys, time
from deepdigits.data import read_idx
from deepdigits.errors import DataError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    read_idx(sys.argv[1])
    message = None
except DataError as exc:
    message = str(exc)
seconds = time.perf_counter() - start
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({"message": message, "seconds": seconds, "grown": grown}))
"""


def _measure_reads(*paths: Path) -> list[dict]:
    """read_idx each file in a fresh process: its error, seconds and growth of the peak resident memory."""
    results = []
    for path in paths:
        done = subprocess.run([sys.executable, "-c", _MEASURE, str(path)],
                              capture_output=True, text=True, timeout=300, check=True)
        results.append(json.loads(done.stdout))
    return results


def test_gzip_bombs_are_refused_quickly_in_little_memory(tmp_path, zeros_member):
    bombs = [
        _bomb(tmp_path / "zeros-idx3-ubyte.gz", b"", zeros_member),  # the probe's: nothing but zeros
        _bomb(tmp_path / "huge-idx3-ubyte.gz", _header(1_000_000, 28, 28), zeros_member),
        _bomb(tmp_path / "small-idx3-ubyte.gz", _header(2, 28, 28), zeros_member),
        _bomb(tmp_path / "max-idx1-ubyte.gz", _header(DEFAULT_MAX_BYTES - 8), zeros_member),
    ]
    assert all(path.stat().st_size < _MiB for path in bombs)
    zeros, huge, small, at_cap = _measure_reads(*bombs)
    assert zeros["message"] == (
        f"{bombs[0]}: bad magic number 0x00000000; expected 0x0000TTDD "
        "(TT a type code such as 08 for unsigned bytes, DD the number of dimensions)"
    )
    assert huge["message"] == (
        f"{bombs[1]}: too large: header says shape (1000000, 28, 28) of uint8 (784000016 bytes); "
        f"expected at most {DEFAULT_MAX_BYTES} bytes"
    )
    assert small["message"] == (
        f"{bombs[2]}: has trailing bytes: header says shape (2, 28, 28) (1568 data bytes), "
        "found more than 1568 data bytes"
    )
    # a header asking for exactly the cap gets its buffer filled, and no more
    assert at_cap["message"] == (
        f"{bombs[3]}: has trailing bytes: header says shape ({DEFAULT_MAX_BYTES - 8},) "
        f"({DEFAULT_MAX_BYTES - 8} data bytes), found more than {DEFAULT_MAX_BYTES - 8} data bytes"
    )
    for result in (zeros, huge, small):
        assert result["grown"] < 16 * _MiB and result["seconds"] < 1.0, result
    assert at_cap["grown"] < DEFAULT_MAX_BYTES + 16 * _MiB, at_cap


def test_big_sparse_raw_files_are_judged_by_their_size(tmp_path):
    claims_huge = tmp_path / "huge-idx3-ubyte"  # 2 GiB, consistent with its header
    claims_huge.write_bytes(_header(2_739_000, 28, 28))
    with open(claims_huge, "r+b") as f:
        f.truncate(16 + 2_739_000 * 784)
    mismatch = tmp_path / "mnist-idx3-ubyte"  # MNIST's header, then 2 GiB
    mismatch.write_bytes(_header(60000, 28, 28))
    with open(mismatch, "r+b") as f:
        f.truncate(2 << 30)
    short = tmp_path / "short-idx3-ubyte"  # header asks for 47 MB, the file holds 1 KB
    short.write_bytes(_header(60000, 28, 28) + bytes(1024))
    huge, trailing, truncated = _measure_reads(claims_huge, mismatch, short)
    assert huge["message"] == (
        f"{claims_huge}: too large: header says shape (2739000, 28, 28) of uint8 (2147376016 bytes); "
        f"expected at most {DEFAULT_MAX_BYTES} bytes"
    )
    assert trailing["message"] == (
        f"{mismatch}: has trailing bytes: header says shape (60000, 28, 28) (47040000 data bytes), "
        "found 2147483632 data bytes"
    )
    assert truncated["message"] == (
        f"{short}: truncated: header says shape (60000, 28, 28) (47040000 data bytes), found 1024 data bytes"
    )
    for result in (huge, trailing, truncated):
        assert result["grown"] < 16 * _MiB and result["seconds"] < 1.0, result


def test_a_gzip_stream_shorter_than_its_header_costs_what_it_holds(tmp_path):
    path = tmp_path / "short-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_header(60000, 28, 28) + bytes(_MiB), mtime=0))
    (result,) = _measure_reads(path)
    assert result["message"] == (
        f"{path}: truncated: header says shape (60000, 28, 28) (47040000 data bytes), found 1048576 data bytes"
    )
    assert result["grown"] < 16 * _MiB, result


def test_bomb_in_a_dataset_is_cut_at_the_parts_known_size(tiny, zeros_member, monkeypatch):
    spec, src = tiny
    monkeypatch.setitem(DATASETS, spec.name, replace(spec, split_sizes={"train": 30, "test": 10}))
    path = _bomb(src / "tiny" / "train-images-idx3-ubyte.gz", _header(30, 28, 28), zeros_member)
    message = _error(load_dataset, spec.name, data_dir=src)
    assert message == (
        f"{path}: has trailing bytes: header says shape (30, 28, 28) (23520 data bytes), "
        "found more than 23520 data bytes"
    )
    path = _bomb(path, _header(1_000_000, 28, 28), zeros_member)
    labels = src / "tiny" / "train-labels-idx1-ubyte.gz"
    write_idx(labels, np.zeros(1_000_000, np.uint8))
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{path}: header says shape (1000000, 28, 28) of uint8; "
        "expected shape (30, 28, 28) of uint8 (tiny train images of 28x28 pixels)"
    )


def test_sparse_file_in_a_dataset_is_refused_from_its_size(tiny):
    spec, src = tiny
    (src / "tiny" / "t10k-images-idx3-ubyte.gz").unlink()
    path = src / "tiny" / "t10k-images-idx3-ubyte"
    path.write_bytes(_header(10, 28, 28))
    with open(path, "r+b") as f:
        f.truncate(2 << 30)
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{path}: has trailing bytes: header says shape (10, 28, 28) (7840 data bytes), "
        f"found {(2 << 30) - 16} data bytes"
    )


def test_wrong_magic_is_reported_before_the_checksum(tiny):
    spec, src = tiny
    path = src / "tiny" / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[2] = 0x07  # not a type code
    path.write_bytes(gzip.compress(bytes(content)))
    expected = (
        f"{path}: bad magic number 0x00000701; expected 0x0000TTDD "
        "(TT a type code such as 08 for unsigned bytes, DD the number of dimensions)"
    )
    assert _error(read_idx, path, sha256=spec.sha256["train-labels-idx1-ubyte"]) == expected
    assert _error(load_dataset, spec.name, data_dir=src) == expected


def test_label_count_mismatch_is_reported_before_the_checksum(tiny):
    spec, src = tiny
    labels = write_idx(src / "tiny" / "t10k-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    images = src / "tiny" / "t10k-images-idx3-ubyte.gz"
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{labels}: 11 labels for 10 images in {images}; expected the same count"
    )


def test_known_counts_are_checked_from_the_headers(tiny, monkeypatch):
    spec, src = tiny
    monkeypatch.setitem(DATASETS, spec.name, replace(spec, split_sizes={"train": 30, "test": 12}))
    images = src / "tiny" / "t10k-images-idx3-ubyte.gz"
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{images}: header says shape (10, 28, 28) of uint8; "
        "expected shape (12, 28, 28) of uint8 (tiny test images of 28x28 pixels)"
    )


def test_wrong_image_size_or_type_says_so(tiny):
    spec, src = tiny
    path = write_idx(src / "tiny" / "train-images-idx3-ubyte.gz", np.zeros((30, 32, 32), np.uint8))
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{path}: header says shape (30, 32, 32) of uint8; "
        "expected shape (N, 28, 28) of uint8 (tiny train images of 28x28 pixels)"
    )
    path = write_idx(path, np.zeros((30, 28, 28), np.float32))
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{path}: header says shape (30, 28, 28) of float32; "
        "expected shape (N, 28, 28) of uint8 (tiny train images of 28x28 pixels)"
    )
    labels = write_idx(src / "tiny" / "train-labels-idx1-ubyte.gz", np.zeros((30, 1), np.uint8))
    write_idx(path, np.zeros((30, 28, 28), np.uint8))
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{labels}: header says shape (30, 1) of uint8; expected shape (N,) of uint8 (tiny train labels)"
    )


def test_only_a_file_that_parses_gets_checksum_mismatch(tiny):
    spec, src = tiny
    path = src / "tiny" / "train-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[-1] ^= 0xFF
    path.write_bytes(gzip.compress(bytes(content)))
    real = hashlib.sha256(content).hexdigest()
    assert _error(load_dataset, spec.name, data_dir=src) == (
        f"{path}: checksum mismatch: SHA-256 of the decompressed content is {real}, "
        f"expected {spec.sha256['train-images-idx3-ubyte']}"
    )
    assert load_dataset(spec.name, data_dir=src, verify=False).x_train[-1, -1, -1] == content[-1]


def test_truncated_gzip_in_the_data_or_the_trailer(tiny):
    spec, src = tiny
    path = src / "tiny" / "train-images-idx3-ubyte.gz"
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])  # cut inside the compressed data
    message = _error(load_dataset, spec.name, data_dir=src)
    assert message.startswith(f"{path}: damaged gzip stream (Compressed file ended before the end-of-stream")
    assert message.endswith("; expected a complete .gz file")
    path.write_bytes(whole[:-4])  # all the data, a piece of the CRC-and-size trailer
    assert _error(read_idx, path).startswith(f"{path}: damaged gzip stream (")
    path.write_bytes(whole[:-1] + bytes([whole[-1] ^ 1]))  # the size in the trailer is wrong
    assert _error(read_idx, path) == f"{path}: damaged gzip stream (Incorrect length of data produced); " \
        "expected a complete .gz file"


def test_trailing_bytes_in_gzip_and_raw_files(tmp_path):
    packed = tmp_path / "labels-idx1-ubyte.gz"
    packed.write_bytes(gzip.compress(_header(3) + b"\x01\x02\x03\x04\x05"))
    assert _error(read_idx, packed) == (
        f"{packed}: has trailing bytes: header says shape (3,) (3 data bytes), found more than 3 data bytes"
    )
    raw = tmp_path / "labels-idx1-ubyte"
    raw.write_bytes(_header(3) + b"\x01\x02\x03\x04\x05")
    assert _error(read_idx, raw) == (
        f"{raw}: has trailing bytes: header says shape (3,) (3 data bytes), found 5 data bytes"
    )
    packed.write_bytes(gzip.compress(_header(3) + b"\x01\x02\x03") + b"junk")  # junk after the gzip stream
    assert _error(read_idx, packed).startswith(f"{packed}: damaged gzip stream (Not a gzipped file")


def test_max_bytes_caps_the_decompressed_size(tmp_path):
    path = write_idx(tmp_path / "x-idx1-ubyte.gz", np.arange(100, dtype=np.uint8))
    np.testing.assert_array_equal(read_idx(path, max_bytes=108), np.arange(100))  # exactly the cap
    assert read_idx_bytes(path, max_bytes=108) == gzip.decompress(path.read_bytes())
    assert _error(read_idx, path, max_bytes=107) == (
        f"{path}: too large: header says shape (100,) of uint8 (108 bytes); expected at most 107 bytes"
    )
    assert read_idx_header(path).shape == (100,) and read_idx_header(path).total_bytes == 108


def test_headers_that_overflow_int64_and_odd_paths(tmp_path):
    path = tmp_path / "wide-idx4-ubyte"
    path.write_bytes(_header(2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1, type_code=0x0E))
    size = (2**32 - 1) ** 4 * 8 + 20
    assert _error(read_idx, path) == (
        f"{path}: too large: header says shape (4294967295, 4294967295, 4294967295, 4294967295) of float64 "
        f"({size} bytes); expected at most {DEFAULT_MAX_BYTES} bytes"
    )
    short = tmp_path / "short-idx3-ubyte.gz"
    short.write_bytes(gzip.compress(_header(1, 2, 3)[:9]))
    assert _error(read_idx, short) == f"{short}: truncated header: 9 bytes, expected 16"
    assert _error(read_idx, tmp_path) == f"{tmp_path}: cannot read (Is a directory)"
    assert _error(read_idx, tmp_path / "missing") == f"{tmp_path / 'missing'}: file not found"


def test_known_sizes_are_the_real_files_sizes(data_root):
    spec = DATASETS["mnist"]
    files, _ = locate("mnist", data_dir=data_root)
    assert {part: _part_limit(spec, part) for part in files} == {
        "train-images": 16 + 60000 * 784, "train-labels": 8 + 60000,
        "test-images": 16 + 10000 * 784, "test-labels": 8 + 10000,
    }
    for part, path in files.items():
        assert read_idx_header(path).total_bytes == _part_limit(spec, part)
    assert _part_limit(spec, "train-images") < DEFAULT_MAX_BYTES  # read_idx reads the real files as they are


def test_download_is_capped_and_parsed_before_the_checksum(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    noise = np.random.default_rng(0).integers(0, 256, 10000, dtype=np.uint8)  # does not compress
    write_idx(served / "big-idx1-ubyte.gz", noise)
    (served / "bad-idx1-ubyte.gz").write_bytes(gzip.compress(b"PK\x03\x04" + bytes(100)))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        dest = tmp_path / "cache" / "x.gz"
        big = (served / "big-idx1-ubyte.gz").stat().st_size
        # a cap of 100 bytes allows 4196 downloaded; the file is bigger
        assert big > 4196
        message = _error(_fetch_verified, url + "big-idx1-ubyte.gz", dest, "0" * 64, 100)
        assert message == f"{url}big-idx1-ubyte.gz: over 4196 bytes; expected a smaller .gz file"
        message = _error(_fetch_verified, url + "bad-idx1-ubyte.gz", dest, "0" * 64, 1000)
        assert message.startswith(f"{url}bad-idx1-ubyte.gz: bad magic number 0x504b0304")
        assert not dest.exists() and list(dest.parent.iterdir()) == []
    finally:
        server.shutdown()


def _ring_and_bar() -> tuple[np.ndarray, np.ndarray]:
    """Two drawn digits: a 0 (a ring) and a 1 (an upright bar)."""
    x = np.zeros((2, 28, 28), np.uint8)
    yy, xx = np.mgrid[:28, :28]
    radius = np.hypot(yy - 14, xx - 14)
    x[0][(radius > 5) & (radius < 9)] = 255
    x[1, 5:23, 13:16] = 255
    return x, np.array([0, 1], np.uint8)


def test_photo_crops_are_the_digits_photographed_and_cut_out_again(tmp_path, monkeypatch):
    from scipy import ndimage

    from deepdigits import data, synthetic

    x, y = _ring_and_bar()
    crops, labels = data.photo_crops(x, y, 5, cache=tmp_path)
    assert crops.shape == (5, 28, 28) and crops.dtype == np.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1]  # each digit once before any repeats
    for crop, label in zip(crops, labels, strict=True):
        rows, cols = np.nonzero(crop > 30)
        assert crop.max() == 255 and rows.max() - rows.min() + 1 <= 21  # MNIST's 20-pixel box, as to_mnist
        assert np.allclose(ndimage.center_of_mass(crop), 14, atol=1)
        if label == 0:  # the ring keeps its hole; the bar stays tall and thin
            assert crop[14, 14] == 0 and cols.max() - cols.min() > 15
        else:
            assert crop[14, 14] > 128 and cols.max() - cols.min() < 8
    assert len(list(tmp_path.glob("photo-crops-*.npz"))) == 1

    def no_drawing(*_args, **_kwargs):
        raise AssertionError("drawn again")

    monkeypatch.setattr(synthetic, "render_digit", no_drawing)
    again, again_labels = data.photo_crops(x, y, 5, cache=tmp_path)  # from the cache, nothing drawn
    np.testing.assert_array_equal(again, crops)
    np.testing.assert_array_equal(again_labels, labels)
    with pytest.raises(AssertionError, match="drawn again"):
        data.photo_crops(x, y, 5, seed=1, cache=tmp_path)  # another seed is another set
    with pytest.raises(ValueError, match="count must be 0 or more of 2 digits with 2 labels"):
        data.photo_crops(x, y, -1, cache=tmp_path)
    empty, empty_labels = data.photo_crops(x, y, 0, cache=tmp_path)
    assert empty.shape == (0, 28, 28) and empty_labels.shape == (0,)

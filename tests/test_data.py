import gzip
import hashlib
import http.server
import threading
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from deepdigits.data import (
    DATASETS,
    load_dataset,
    locate,
    parse_idx,
    parse_index_range,
    read_idx,
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


def test_parse_index_range():
    assert parse_index_range("0-3", 10) == [0, 1, 2, 3]
    assert parse_index_range("1,5,7-8", 10) == [1, 5, 7, 8]
    with pytest.raises(DataError, match="indices must lie in 0-9"):
        parse_index_range("5-12", 10)
    with pytest.raises(DataError, match="expected numbers like 0-19"):
        parse_index_range("a-b", 10)


def test_downloaded_part_files_are_cleaned(tmp_path):
    # no .part files may be left behind by the atomic writer
    write_idx(tmp_path / "z-idx1-ubyte.gz", np.zeros(3, np.uint8))
    assert [p.name for p in Path(tmp_path).iterdir()] == ["z-idx1-ubyte.gz"]

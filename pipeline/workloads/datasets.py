"""The built-in datasets: images with class labels (a synthetic set that needs no download; MNIST and CIFAR-10
read from their on-disk formats in torchvision's layout, so data users already staged for torchvision works as
is) and token sequences for language models (a synthetic bigram language; nanoGPT's uint16 token files; the
bytes of Python source files already on every machine).

Every dataset is built once per split (`split="train"` or `"test"`) and is a map-style dataset: `len()` and
`dataset[i] -> (input, target)`, which is all torch's DataLoader needs, and all a user's own dataset must offer.
The built-in ones also offer what the pipeline uses when present:
- `arrays()`: the whole split as numpy arrays, for the in-memory fast path (loader.kind=auto|memory); they may
  hold fewer rows than len(dataset), sample i then being row i % rows (a pool cycled, for throughput studies);
- `input_shape` and `num_classes` (images), `vocab_size` and `seq_len` (tokens), which a model's constructor
  receives when it asks for them;
- `validate()`: checks that read the data, run once when the job starts.
Constructing one only checks that its files exist (cheap and torch-free, so `launch` can check before
submitting). Images are float32 (C, H, W) normalised, labels int64; token inputs and targets are int64 (seq_len,),
the targets the inputs shifted by one.

Each dataset's schema stands just above its class: its `_target_`, its arguments with their defaults and checks, and
what it `provides` (images with class labels, or token sequences), registered with `@builtin("dataset")`
(pipeline.workloads.registry). Adding a dataset: its schema and its class here, and a config file in conf/dataset/
that extends the schema (`defaults: [<name>_schema]`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import logging
import os
import pickle
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, List, Optional

from pipeline.checks import ConfigError, check_at_least, check_image_shape
from pipeline.rundir import special_kind, write_atomic
from pipeline.workloads.registry import builtin

# numpy is imported where the data is read, not where a dataset is made: making one only checks its files, which the
# launch does on the login node for every point of a sweep, and numpy would add a twentieth of a second to it
if TYPE_CHECKING:
    import numpy as np

SPLITS = ("train", "test")


def _check_split(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    return SPLITS.index(split)


def _missing_error(name: str, root: str, missing: list[str], layout: str = "torchvision's layout") -> ConfigError:
    listed = "\n  ".join(missing)
    return ConfigError(
        f"dataset.root={root!r}: {name} files not found. Expected ({layout}):\n  {listed}\n"
        f"Stage the dataset there or set dataset.root to the folder that holds it."
    )


CACHE_LIMIT_BYTES = 2 << 30


def cache_dir() -> Path:
    """Where generated splits are kept between runs: $PIPELINE_CACHE_DIR, else ~/.cache/pipeline (safe to delete)."""
    return Path(os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "pipeline")


class InMemory:
    """A split held as two numpy arrays, made on first use and kept: inputs (N, ...) and targets (N, ...); sample
    i is row i % N. A split that is generated (not read from files) names itself (`cache_name`), and is then
    kept in the cache folder: every rank of a run, and every later run, reads it instead of making it again."""

    _arrays: tuple[np.ndarray, np.ndarray] | None = None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def cache_name(self) -> str | None:
        return None

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = self._cached()
        return self._arrays

    def _cached(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        name = self.cache_name()
        if name is None:
            return self._load()
        path = cache_dir() / f"{type(self).__name__}-{hashlib.sha256(name.encode()).hexdigest()[:20]}.npz"
        try:
            with np.load(path) as f:
                return f["x"], f["y"]
        except (OSError, ValueError, KeyError):  # not made yet, or a broken file: made again
            pass
        x, y = self._load()
        if x.nbytes + y.nbytes <= CACHE_LIMIT_BYTES:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # whole or absent: ranks writing at once leave one whole file
                write_atomic(path, lambda f: np.savez(f, x=x, y=y), durable=False)
            except OSError:
                pass  # a read-only or full home: the split is made every time, as without a cache
        return x, y

    def __len__(self) -> int:
        return len(self.arrays()[1])

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.arrays()
        return x[i % len(x)], y[i % len(y)]


# ------------------------------------------------------------------------------------------------ images
@builtin("dataset")
@dataclass
class SyntheticConfig:
    """Smooth class prototypes plus Gaussian noise, generated from `seed`: learnable, no download."""

    provides: ClassVar[str] = "images"
    _target_: str = "pipeline.workloads.datasets.Synthetic"
    image_shape: List[int] = field(default_factory=lambda: [1, 28, 28])
    num_classes: int = 10
    train_size: int = 8192
    test_size: int = 2048
    separation: float = 6.0  # expected distance between class prototypes, in units of the pixel noise
    seed: int = 0
    distinct: int = 0  # > 0: generate only this many samples per split and cycle through them (throughput studies)

    def __post_init__(self) -> None:
        check_image_shape(self.image_shape)
        check_at_least("dataset.distinct", self.distinct, 0)
        check_at_least("dataset.num_classes", self.num_classes, 2)
        check_at_least("dataset.train_size", self.train_size, 1)
        check_at_least("dataset.test_size", self.test_size, 1)
        check_at_least("dataset.separation", self.separation, 0.0)
        check_at_least("dataset.seed", self.seed, 0)  # numpy's generators take no negative seed


class Synthetic(InMemory):
    """Each class is a smooth random prototype image; a sample is its prototype plus unit Gaussian pixel noise.

    Prototypes are drawn on a grid 4x coarser than the image and upsampled, so convolutions can learn them as
    well as dense layers. `separation` is the expected Euclidean distance between two class prototypes in units
    of the noise: 6 gives the seed MLP about 95% test accuracy after one epoch of 8,192 samples. Deterministic
    from `seed`; the test split draws fresh samples around the same prototypes. For throughput studies at
    ImageNet size ([3,224,224], 1000 classes: 602 KB a sample), `distinct` > 0 generates only that many samples
    and cycles through them, so a split of any size fits in memory.
    """

    def __init__(self, image_shape, num_classes: int, train_size: int, test_size: int, separation: float, seed: int,
                 distinct: int, split: str = "train"):
        self.input_shape = tuple(int(d) for d in image_shape)
        self.num_classes = num_classes
        self.size = (train_size, test_size)[_check_split(split)]
        self.rows = min(self.size, distinct) if distinct else self.size
        self.split, self.separation, self.seed = split, separation, seed

    def __len__(self) -> int:
        return self.size

    def cache_name(self) -> str:
        return repr((self.input_shape, self.num_classes, self.size, self.rows, self.split, self.separation, self.seed))

    def coarse_prototypes(self) -> np.ndarray:
        """(classes, C, H/4, W/4): each pixel ~ N(0, sep^2 / 2d), so two prototypes differ by `separation` in
        expectation over the image's d pixels once upsampled."""
        import numpy as np

        c, h, w = self.input_shape
        coarse = np.random.default_rng(self.seed).standard_normal((self.num_classes, c, -(-h // 4), -(-w // 4)))
        return (coarse * self.separation / np.sqrt(2 * c * h * w)).astype(np.float32)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        c, h, w = self.input_shape
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split) + 1])
        y = rng.integers(0, self.num_classes, size=self.rows, dtype=np.int64)
        x = rng.standard_normal((self.rows, c, h, w), dtype=np.float32)
        # upsampled per sample, never for all classes at once (1000 ImageNet-sized prototypes would take 600 MB)
        x += self.coarse_prototypes()[y].repeat(4, axis=2).repeat(4, axis=3)[:, :, :h, :w]
        return x, y


def _read_idx(path: Path) -> np.ndarray:
    """The IDX format: 2 zero bytes, a type code (0x08 = uint8), the rank, big-endian int32 dims, then data."""
    import numpy as np

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@builtin("dataset")
@dataclass
class MNISTConfig:
    """torchvision's layout: ROOT/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]."""

    provides: ClassVar[str] = "images"
    _target_: str = "pipeline.workloads.datasets.MNIST"
    root: str = "data"


class MNIST(InMemory):
    input_shape = (1, 28, 28)
    num_classes = 10
    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    # torchvision's normalisation constants for MNIST
    mean, std = 0.1307, 0.3081

    def __init__(self, root: str, split: str = "train"):
        _check_split(split)
        self.folder, self.split = Path(root) / "MNIST" / "raw", split
        missing = [str(self.folder / n) for names in self.FILES.values() for n in names if not self._find(n)]
        if missing:
            raise _missing_error("MNIST", root, missing)

    def _find(self, name: str) -> Path | None:
        for candidate in (self.folder / name, self.folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        images, labels = (_read_idx(self._find(n)) for n in self.FILES[self.split])
        x = (images.astype(np.float32)[:, None] / 255.0 - self.mean) / self.std
        return x, labels.astype(np.int64)


@builtin("dataset")
@dataclass
class CIFAR10Config:
    """torchvision's layout: ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}."""

    provides: ClassVar[str] = "images"
    _target_: str = "pipeline.workloads.datasets.CIFAR10"
    root: str = "data"


class CIFAR10(InMemory):
    input_shape = (3, 32, 32)
    num_classes = 10
    FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str, split: str = "train"):
        _check_split(split)
        self.folder, self.split = Path(root) / "cifar-10-batches-py", split
        missing = [str(self.folder / n) for names in self.FILES.values() for n in names
                   if not (self.folder / n).is_file()]
        if missing:
            raise _missing_error("CIFAR-10", root, missing)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        xs, ys = [], []
        for name in self.FILES[self.split]:
            with open(self.folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # the python-version pickles, as torchvision reads them
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        mean, std = (np.array(v, dtype=np.float32).reshape(1, 3, 1, 1) for v in (self.mean, self.std))
        x = (np.concatenate(xs).astype(np.float32) / 255.0 - mean) / std
        return x, np.concatenate(ys)


# ------------------------------------------------------------------------------------------------ tokens
def windows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive windows of seq_len + 1 tokens: (inputs, targets) = (window[:-1], window[1:]), int64."""
    import numpy as np

    n = (len(tokens) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens make no window of dataset.seq_len + 1 = {seq_len + 1}")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    w = tokens[idx].astype(np.int64)
    return w[:, :-1], w[:, 1:]


@builtin("dataset")
@dataclass
class SyntheticTokensConfig:
    """Token sequences from a random sparse bigram table (each token has `branching` equally likely successors),
    generated from `seed`: learnable down to a known loss of ln(branching), no download."""

    provides: ClassVar[str] = "tokens"
    _target_: str = "pipeline.workloads.datasets.SyntheticTokens"
    vocab_size: int = 256
    seq_len: int = 64
    train_size: int = 4096  # sequences
    test_size: int = 512
    branching: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        check_at_least("dataset.vocab_size", self.vocab_size, 2)
        check_at_least("dataset.seq_len", self.seq_len, 1)
        check_at_least("dataset.train_size", self.train_size, 1)
        check_at_least("dataset.test_size", self.test_size, 1)
        if not 1 <= self.branching <= self.vocab_size:
            raise ConfigError(f"dataset.branching={self.branching} is not allowed; it must be in [1, "
                              f"dataset.vocab_size={self.vocab_size}]")
        check_at_least("dataset.seed", self.seed, 0)


class SyntheticTokens(InMemory):
    """A random sparse bigram language: token t is followed by one of `branching` successors drawn for it from
    `seed`, each equally likely. A model that learns the table reaches a loss of ln(branching) nats per token (a
    little less where a token's successors repeat); a model that has learned nothing is at ln(vocab_size)."""

    def __init__(self, vocab_size: int, seq_len: int, train_size: int, test_size: int, branching: int, seed: int,
                 split: str = "train"):
        self.vocab_size, self.seq_len, self.branching, self.seed = vocab_size, seq_len, branching, seed
        self.split = split
        self.size = (train_size, test_size)[_check_split(split)]

    def __len__(self) -> int:
        return self.size

    def cache_name(self) -> str:
        return repr((self.vocab_size, self.seq_len, self.size, self.branching, self.split, self.seed))

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        successors = np.random.default_rng(self.seed).integers(0, self.vocab_size, (self.vocab_size, self.branching))
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split) + 1])
        seq = np.empty((self.size, self.seq_len + 1), dtype=np.int64)
        seq[:, 0] = rng.integers(0, self.vocab_size, self.size)
        choice = rng.integers(0, self.branching, (self.size, self.seq_len))
        for t in range(self.seq_len):
            seq[:, t + 1] = successors[seq[:, t], choice[:, t]]
        return seq[:, :-1], seq[:, 1:]


@builtin("dataset")
@dataclass
class TokenFileConfig:
    """nanoGPT's token files: ROOT/train.bin and ROOT/val.bin, flat uint16 arrays (np.memmap), read through a
    DataLoader; every value must be below `vocab_size` (checked when the job starts)."""

    provides: ClassVar[str] = "tokens"
    _target_: str = "pipeline.workloads.datasets.TokenFile"
    root: str = "data"
    vocab_size: int = 50257  # GPT-2's tokenizer
    seq_len: int = 1024

    def __post_init__(self) -> None:
        check_at_least("dataset.vocab_size", self.vocab_size, 2)
        if self.vocab_size > 65536:
            raise ConfigError(f"dataset.vocab_size={self.vocab_size} is not allowed: uint16 token files hold "
                              "values below 65536")
        check_at_least("dataset.seq_len", self.seq_len, 1)


class TokenFile:
    """nanoGPT's prepared data: ROOT/train.bin and ROOT/val.bin (the test split), flat uint16 token arrays read
    through np.memmap, cut into consecutive windows of seq_len + 1 tokens. Not held in memory: it trains through
    the DataLoader."""

    NAMES = {"train": "train.bin", "test": "val.bin"}

    def __init__(self, root: str, vocab_size: int, seq_len: int, split: str = "train"):
        _check_split(split)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.path = Path(root) / self.NAMES[split]
        missing = [str(Path(root) / n) for n in self.NAMES.values() if not (Path(root) / n).is_file()]
        if missing:
            raise _missing_error("token", root, missing, layout="nanoGPT's prepare.py output, uint16")
        size = self.path.stat().st_size
        if size % 2 or size // 2 < seq_len + 1:
            raise ConfigError(f"dataset.root={root!r}: {self.path} holds {size} bytes, not a uint16 token file of at "
                              f"least dataset.seq_len + 1 = {seq_len + 1} tokens")
        self._tokens: np.ndarray | None = None

    @property
    def tokens(self) -> np.ndarray:
        import numpy as np

        if self._tokens is None:  # opened on first use, in the process that uses it (DataLoader workers too)
            self._tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        return self._tokens

    def __len__(self) -> int:
        return (self.path.stat().st_size // 2 - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        w = self.tokens[i * self.seq_len:(i + 1) * self.seq_len + 1].astype(np.int64)
        return w[:-1], w[1:]

    def validate(self, chunk: int = 1 << 26) -> None:
        """Every token below vocab_size: read once, in chunks (about a second per GB), since an embedding indexed
        past its end fails far from the cause (on CUDA, as a device-side assert)."""
        top = max(int(self.tokens[i:i + chunk].max()) for i in range(0, len(self.tokens), chunk))
        if top >= self.vocab_size:
            raise ValueError(f"{self.path} holds token {top}, outside dataset.vocab_size={self.vocab_size} (tokens "
                             f"0..{self.vocab_size - 1}); set dataset.vocab_size to the tokenizer's vocabulary")
        if (top + 1) * SPARE_VOCAB < self.vocab_size:
            # the model's embedding and output layer are sized by the vocabulary: 50,257 for bytes below 256 killed
            # both ranks of a test for memory (11.3 GiB), with nothing said
            logging.getLogger(__name__).warning(
                "%s: every token is below %d, but dataset.vocab_size=%d: the model's embedding and output layers are "
                "%.0fx what the data needs; set dataset.vocab_size=%d unless the tokenizer's larger vocabulary is "
                "meant", self.path, top + 1, self.vocab_size, self.vocab_size / (top + 1), top + 1)


SPARE_VOCAB = 8  # a vocabulary more than this many times the data's largest token + 1 is warned about


@builtin("dataset")
@dataclass
class ByteTextConfig:
    """Byte-level text (vocabulary 256) from the `*.py` files under `root` (default: this Python's standard
    library, which every machine has), in sorted path order; the last `test_share` of the bytes is held out."""

    provides: ClassVar[str] = "tokens"
    _target_: str = "pipeline.workloads.datasets.ByteText"
    root: Optional[str] = None
    seq_len: int = 128
    max_bytes: int = 4_000_000
    test_share: float = 0.1

    def __post_init__(self) -> None:
        check_at_least("dataset.seq_len", self.seq_len, 1)
        check_at_least("dataset.max_bytes", self.max_bytes, 1)
        if not 0.0 < self.test_share < 1.0:
            raise ConfigError(f"dataset.test_share={self.test_share!r} is not allowed; it must be in (0, 1)")


@functools.lru_cache(maxsize=8)
def python_files(root: Path) -> list[Path]:
    """The `*.py` files under `root` (site-packages left out), in path order: walked once per process (half a second
    for the standard library), however many splits and points read them."""
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


class ByteText(InMemory):
    """Byte-level text (vocabulary 256): the `*.py` files under `root`, in sorted path order, concatenated up to
    `max_bytes`; the last `test_share` of those bytes is the test split. With `root` null it reads this Python's
    standard library (its own packages, not site-packages), which is on every machine: no download."""

    vocab_size = 256

    def __init__(self, root: str | None, seq_len: int, max_bytes: int, test_share: float, split: str = "train"):
        _check_split(split)
        self.root = Path(root) if root is not None else Path(sysconfig.get_paths()["stdlib"])
        if not self.root.is_dir():
            raise ConfigError(f"dataset.root={root!r} is not a folder; give a folder of *.py files, or null for "
                              "this Python's standard library")
        self.seq_len, self.max_bytes, self.test_share, self.split = seq_len, max_bytes, test_share, split
        for path in self.files():  # checked here, at launch: reading a FIFO would wait forever
            kind = special_kind(path)
            if kind is not None:
                raise ConfigError(f"dataset.root={str(self.root)!r}: {path} is {kind}, not a file; remove it, or "
                                  "choose a root of regular *.py files")

    def files(self) -> list[Path]:
        return python_files(self.root)

    def _load(self) -> tuple[np.ndarray, np.ndarray]:
        import numpy as np

        chunks, size = [], 0
        for path in self.files():
            if size >= self.max_bytes:
                break
            with open(path, "rb") as f:  # no more than is taken: a large file costs only its first bytes
                chunks.append(f.read(self.max_bytes - size))
            size += len(chunks[-1])
        data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
        cut = int(len(data) * (1 - self.test_share))
        return windows(data[:cut] if self.split == "train" else data[cut:], self.seq_len)

"""Datasets as in-memory arrays: a synthetic one that needs no download, and MNIST / CIFAR-10 read from their
on-disk formats in torchvision's directory layout, so datasets users already staged for torchvision work as is.

Constructing a dataset only checks that its files exist (cheap and torch-free, so `launch` can check before
submitting); `load(split)` reads it. Arrays are returned normalised: float32 images (N, C, H, W), int64 labels.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np

from pipeline.config import ConfigError

SPLITS = ("train", "test")


def _missing_error(name: str, root: str, missing: list[str]) -> ConfigError:
    listed = "\n  ".join(missing)
    return ConfigError(
        f"dataset.root={root!r}: {name} files not found. Expected (torchvision's layout):\n  {listed}\n"
        f"Stage the dataset there or set dataset.root to the folder that holds it."
    )


class Synthetic:
    """Each class is a smooth random prototype image; a sample is its prototype plus unit Gaussian pixel noise.

    Prototypes are drawn on a grid 4x coarser than the image and upsampled, so convolutions can learn them as
    well as dense layers. `separation` is the expected Euclidean distance between two class prototypes in units
    of the noise: 6 gives the seed MLP about 95% test accuracy after one epoch of 8,192 samples. Deterministic
    from `seed`; the test split draws fresh samples around the same prototypes.
    """

    def __init__(self, image_shape, num_classes: int, train_size: int, test_size: int, separation: float, seed: int):
        self.input_shape = tuple(int(d) for d in image_shape)
        self.num_classes = num_classes
        self.sizes = {"train": train_size, "test": test_size}
        self.separation = separation
        self.seed = seed

    def _prototypes(self) -> np.ndarray:
        c, h, w = self.input_shape
        coarse = np.random.default_rng(self.seed).standard_normal((self.num_classes, c, -(-h // 4), -(-w // 4)))
        smooth = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :h, :w]
        # each pixel ~ N(0, sep^2 / 2d): two prototypes differ by sep in expectation over d pixels
        return (smooth * self.separation / np.sqrt(2 * c * h * w)).astype(np.float32)

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, SPLITS.index(split) + 1])
        n = self.sizes[split]
        y = rng.integers(0, self.num_classes, size=n, dtype=np.int64)
        x = self._prototypes()[y] + rng.standard_normal((n, *self.input_shape), dtype=np.float32)
        return x, y


def _read_idx(path: Path) -> np.ndarray:
    """The IDX format: 2 zero bytes, a type code (0x08 = uint8), the rank, big-endian int32 dims, then data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class MNIST:
    input_shape = (1, 28, 28)
    num_classes = 10
    _files = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    # torchvision's normalisation constants for MNIST
    mean, std = 0.1307, 0.3081

    def __init__(self, root: str):
        self.folder = Path(root) / "MNIST" / "raw"
        missing = [str(self.folder / n) for names in self._files.values() for n in names if not self._find(n)]
        if missing:
            raise _missing_error("MNIST", root, missing)

    def _find(self, name: str) -> Path | None:
        for candidate in (self.folder / name, self.folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = (_read_idx(self._find(n)) for n in self._files[split])
        x = (images.astype(np.float32)[:, None] / 255.0 - self.mean) / self.std
        return x, labels.astype(np.int64)


class CIFAR10:
    input_shape = (3, 32, 32)
    num_classes = 10
    _files = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
    mean = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.array([0.2470, 0.2435, 0.2616], dtype=np.float32).reshape(1, 3, 1, 1)

    def __init__(self, root: str):
        self.folder = Path(root) / "cifar-10-batches-py"
        missing = [str(self.folder / n) for names in self._files.values() for n in names
                   if not (self.folder / n).is_file()]
        if missing:
            raise _missing_error("CIFAR-10", root, missing)

    def load(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in self._files[split]:
            with open(self.folder / name, "rb") as f:
                batch = pickle.load(f, encoding="bytes")  # the python-version pickles, as torchvision reads them
            xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
        x = (np.concatenate(xs).astype(np.float32) / 255.0 - self.mean) / self.std
        return x, np.concatenate(ys)

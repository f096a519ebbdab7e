"""Tiny dataset files in the real on-disk formats (MNIST's IDX, CIFAR-10's python pickles), in torchvision's
layout, for the readers' tests and the runs that read them."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np

from pipeline.workloads.datasets import CIFAR10, MNIST


def write_mnist(root: str | os.PathLike, split: str, images: np.ndarray, labels: np.ndarray, gz: bool = False) -> None:
    """Write uint8 images (N, 28, 28) and labels (N,) as IDX files in torchvision's layout (tests use this)."""
    folder = Path(root) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(MNIST.FILES[split], (images, labels)):
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, dtype=">i4").tobytes()
        opener, suffix = (gzip.open, ".gz") if gz else (open, "")
        with opener(folder / f"{name}{suffix}", "wb") as f:
            f.write(header + arr.tobytes())


def write_cifar10(root: str | os.PathLike, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Write uint8 images (N, 3, 32, 32) and labels as CIFAR-10 python pickles, split over the split's files."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = CIFAR10.FILES[split]
    for name, x, y in zip(names, np.array_split(images, len(names)), np.array_split(labels, len(names))):
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                 b"data": np.ascontiguousarray(x, dtype=np.uint8).reshape(len(x), -1), b"filenames": []}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)

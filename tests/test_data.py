"""The dataset readers against tiny files written in the real on-disk formats."""

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.workloads.datasets import CIFAR10, MNIST, Synthetic
from tests.dataset_files import write_cifar10, write_mnist


def _images(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, 10, size=n)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    train, test = _images(12, (28, 28)), _images(5, (28, 28), seed=1)
    write_mnist(tmp_path, "train", *train, gz=gz)
    write_mnist(tmp_path, "test", *test, gz=gz)
    x, y = MNIST(str(tmp_path)).load("train")
    assert x.shape == (12, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(y, train[1])
    np.testing.assert_allclose(x[:, 0], (train[0] / 255.0 - MNIST.mean) / MNIST.std, rtol=1e-6)
    assert MNIST(str(tmp_path)).load("test")[0].shape == (5, 1, 28, 28)


def test_mnist_rejects_a_file_that_is_not_idx(tmp_path):
    write_mnist(tmp_path, "train", *_images(3, (28, 28)))
    write_mnist(tmp_path, "test", *_images(3, (28, 28)))
    (tmp_path / "MNIST/raw/train-images-idx3-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not an IDX file"):
        MNIST(str(tmp_path)).load("train")


def test_cifar10_reads_python_pickles(tmp_path):
    train, test = _images(10, (3, 32, 32)), _images(4, (3, 32, 32), seed=2)
    write_cifar10(tmp_path, "train", *train)
    write_cifar10(tmp_path, "test", *test)
    x, y = CIFAR10(str(tmp_path)).load("train")
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(y, train[1])
    np.testing.assert_allclose(x, (train[0] / 255.0 - CIFAR10.mean) / CIFAR10.std, rtol=1e-5)


@pytest.mark.parametrize("cls, name", [(MNIST, "MNIST"), (CIFAR10, "CIFAR-10")])
def test_missing_files_are_listed(tmp_path, cls, name):
    with pytest.raises(ConfigError, match=f"{name} files not found") as e:
        cls(str(tmp_path))
    assert "dataset.root" in str(e.value)


def test_synthetic_is_deterministic_and_splits_differ():
    a = Synthetic([3, 32, 32], 10, 64, 32, 6.0, seed=7)
    b = Synthetic([3, 32, 32], 10, 64, 32, 6.0, seed=7)
    xa, ya = a.load("train")
    np.testing.assert_array_equal(xa, b.load("train")[0])
    assert xa.shape == (64, 3, 32, 32) and a.load("test")[0].shape == (32, 3, 32, 32)
    assert not np.array_equal(a.load("test")[0][:32], xa[:32])
    assert not np.array_equal(Synthetic([3, 32, 32], 10, 64, 32, 6.0, seed=8).load("train")[0], xa)


def test_synthetic_separation_is_the_distance_between_prototypes():
    ds = Synthetic([1, 28, 28], 10, 8, 8, 6.0, seed=0)
    p = ds._prototypes().reshape(10, -1)
    distances = [np.linalg.norm(p[i] - p[j]) for i in range(10) for j in range(i)]
    # 45 pairs of coarse 7x7 draws: the mean distance is within 15% of the stated separation
    assert abs(np.mean(distances) - 6.0) < 0.9

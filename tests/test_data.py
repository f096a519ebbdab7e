"""The dataset readers against tiny files written in the real on-disk formats."""

import os

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.workloads.datasets import CIFAR10, MNIST, ByteText, Synthetic, SyntheticTokens, TokenFile
from tests.dataset_files import write_cifar10, write_mnist


def _images(n, shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, 10, size=n)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    train, test = _images(12, (28, 28)), _images(5, (28, 28), seed=1)
    test_labels = test[1]
    write_mnist(tmp_path, "train", *train, gz=gz)
    write_mnist(tmp_path, "test", *test, gz=gz)
    x, y = MNIST(str(tmp_path)).arrays()
    assert x.shape == (12, 1, 28, 28) and x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(y, train[1])
    np.testing.assert_allclose(x[:, 0], (train[0] / 255.0 - MNIST.mean) / MNIST.std, rtol=1e-6)
    test = MNIST(str(tmp_path), split="test")
    assert test.arrays()[0].shape == (5, 1, 28, 28) and len(test) == 5 and test[4][1] == test_labels[4]


def test_mnist_rejects_a_file_that_is_not_idx(tmp_path):
    write_mnist(tmp_path, "train", *_images(3, (28, 28)))
    write_mnist(tmp_path, "test", *_images(3, (28, 28)))
    (tmp_path / "MNIST/raw/train-images-idx3-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(ValueError, match="not an IDX file"):
        MNIST(str(tmp_path)).arrays()


def test_cifar10_reads_python_pickles(tmp_path):
    train, test = _images(10, (3, 32, 32)), _images(4, (3, 32, 32), seed=2)
    write_cifar10(tmp_path, "train", *train)
    write_cifar10(tmp_path, "test", *test)
    x, y = CIFAR10(str(tmp_path)).arrays()
    assert x.shape == (10, 3, 32, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(y, train[1])
    mean, std = (np.asarray(v, dtype=np.float32).reshape(1, 3, 1, 1) for v in (CIFAR10.mean, CIFAR10.std))
    np.testing.assert_allclose(x, (train[0] / 255.0 - mean) / std, rtol=1e-5)


@pytest.mark.parametrize("cls, name", [(MNIST, "MNIST"), (CIFAR10, "CIFAR-10")])
def test_missing_files_are_listed(tmp_path, cls, name):
    with pytest.raises(ConfigError, match=f"{name} files not found") as e:
        cls(str(tmp_path))
    assert "dataset.root" in str(e.value)


def test_synthetic_is_deterministic_and_splits_differ():
    a = Synthetic([3, 32, 32], 10, 64, 32, 6.0, seed=7, distinct=0)
    xa, ya = a.arrays()
    np.testing.assert_array_equal(xa, Synthetic([3, 32, 32], 10, 64, 32, 6.0, seed=7, distinct=0).arrays()[0])
    test = Synthetic([3, 32, 32], 10, 64, 32, 6.0, seed=7, distinct=0, split="test")
    assert xa.shape == (64, 3, 32, 32) and test.arrays()[0].shape == (32, 3, 32, 32)
    assert not np.array_equal(test.arrays()[0][:32], xa[:32])
    assert not np.array_equal(Synthetic([3, 32, 32], 10, 64, 32, 6.0, seed=8, distinct=0).arrays()[0], xa)
    x0, y0 = a[5]
    np.testing.assert_array_equal(x0, xa[5])
    assert y0 == ya[5]


def test_synthetic_separation_is_the_distance_between_prototypes():
    ds = Synthetic([1, 28, 28], 10, 8, 8, 6.0, seed=0, distinct=0)
    # upsampled 4x4, so each coarse pixel counts 16 times in the image
    p = ds.coarse_prototypes().repeat(4, axis=2).repeat(4, axis=3).reshape(10, -1)
    distances = [np.linalg.norm(p[i] - p[j]) for i in range(10) for j in range(i)]
    # 45 pairs of coarse 7x7 draws: the mean distance is within 15% of the stated separation
    assert abs(np.mean(distances) - 6.0) < 0.9


def test_a_pool_of_distinct_samples_is_cycled():
    ds = Synthetic([3, 64, 64], 1000, 100_000, 10, 6.0, seed=0, distinct=16)
    x, y = ds.arrays()
    assert len(ds) == 100_000 and x.shape == (16, 3, 64, 64)
    np.testing.assert_array_equal(ds[16 * 7 + 3][0], x[3])


def test_synthetic_tokens_follow_their_bigram_table():
    ds = SyntheticTokens(vocab_size=50, seq_len=20, train_size=30, test_size=5, branching=3, seed=1)
    x, y = ds.arrays()
    assert x.shape == y.shape == (30, 20) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # the targets are the inputs shifted by one
    successors = np.random.default_rng(1).integers(0, 50, (50, 3))
    assert all(y[i, t] in successors[x[i, t]] for i in range(30) for t in range(20))
    test = SyntheticTokens(50, 20, 30, 5, 3, seed=1, split="test").arrays()[0]
    assert test.shape == (5, 20) and not np.array_equal(test, x[:5])


def test_token_files_are_read_in_windows_and_checked_against_the_vocabulary(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 300
    tokens.tofile(tmp_path / "train.bin")
    tokens[:100].tofile(tmp_path / "val.bin")
    ds = TokenFile(str(tmp_path), vocab_size=512, seq_len=10)
    assert len(ds) == 99 and len(TokenFile(str(tmp_path), 512, 10, split="test")) == 9
    x, y = ds[3]
    np.testing.assert_array_equal(x, np.arange(30, 40))
    np.testing.assert_array_equal(y, np.arange(31, 41))
    ds.validate()
    with pytest.raises(ValueError, match=r"holds token 299, outside dataset.vocab_size=256"):
        TokenFile(str(tmp_path), vocab_size=256, seq_len=10).validate()
    with pytest.raises(ConfigError, match="token files not found"):
        TokenFile(str(tmp_path / "nowhere"), 512, 10)


def test_a_vocabulary_far_above_the_datas_tokens_is_warned_about_with_the_figures(tmp_path, caplog):
    (np.arange(1000, dtype=np.uint16) % 256).tofile(tmp_path / "train.bin")
    (np.arange(100, dtype=np.uint16) % 256).tofile(tmp_path / "val.bin")
    TokenFile(str(tmp_path), vocab_size=2048, seq_len=10).validate()
    assert not caplog.records  # 8x the data's: the line
    TokenFile(str(tmp_path), vocab_size=50257, seq_len=10).validate()
    assert "every token is below 256, but dataset.vocab_size=50257: the model's embedding and output layers are " \
        "196x what the data needs; set dataset.vocab_size=256" in caplog.text


def test_byte_text_refuses_a_fifo_and_reads_no_more_than_max_bytes(tmp_path):
    for folder in ("big", "fifo"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "a.py").write_bytes(b"x" * 5_000_000)  # read up to max_bytes, not whole
        (tmp_path / folder / "b.py").write_bytes(b"y" * 10)
    text = ByteText(str(tmp_path / "big"), seq_len=9, max_bytes=1000, test_share=0.1)
    assert set(np.unique(text.arrays()[0])) == {ord("x")} and len(text) == 99  # 900 train bytes, windows of 10
    os.mkfifo(tmp_path / "fifo" / "c.py")  # a FIFO named like a source: reading it would wait for a writer forever
    with pytest.raises(ConfigError, match=r"c\.py is a FIFO, not a file; remove it"):
        ByteText(str(tmp_path / "fifo"), seq_len=9, max_bytes=1000, test_share=0.1)


def test_byte_text_reads_python_sources_with_a_held_out_tail(tmp_path):
    (tmp_path / "a.py").write_bytes(b"x" * 600)
    (tmp_path / "b.py").write_bytes(b"y" * 400)
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "c.py").write_bytes(b"z" * 100)
    train = ByteText(str(tmp_path), seq_len=9, max_bytes=10_000, test_share=0.1)
    test = ByteText(str(tmp_path), seq_len=9, max_bytes=10_000, test_share=0.1, split="test")
    # 1000 bytes (site-packages left out): 900 train bytes make 99 windows of 10, the last 100 make 11
    assert len(train) == 99 and len(test) == 11 and train.vocab_size == 256
    assert set(np.unique(test.arrays()[0])) == {ord("y")}
    stdlib = ByteText(None, seq_len=64, max_bytes=50_000, test_share=0.1)
    assert len(stdlib) == int(50_000 * 0.9 - 1) // 64 and stdlib.files()[0].suffix == ".py"


def test_a_batch_whose_logits_outgrow_a_ranks_memory_is_warned_about_at_launch(compose_cfg, caplog):
    """The issue's case: a 50,257-token vocabulary at 1,024 positions, 64 samples a rank (13.2 GB of fp32 logits),
    said with the figures and where the rank's memory comes from; a batch that fits says nothing."""
    from pipeline.point import prepare_run, rank_memory
    from pipeline.slurm import mem_bytes

    big = ["dataset=synthetic_tokens", "model=gpt_tiny", "dataset.vocab_size=50257", "dataset.seq_len=1024",
           "model.context_length=1024", "dataset.train_size=512", "dataset.test_size=8", "trainer.warmup_steps=0",
           "nodes=2"]
    run = prepare_run(compose_cfg(*big))
    assert "a micro-batch's logits take 12.3 GiB (64 samples x 1024 positions x 50257 tokens x 4 bytes), and as " \
        "much again their gradient: more than the" in caplog.text and "GiB over 2 rank(s)); lower" in caplog.text
    caplog.clear()
    prepare_run(compose_cfg(*big, "trainer.batch_size=1"))
    assert not caplog.records
    assert mem_bytes("16G") == 16 * 2**30 and mem_bytes("4000") == 4000 * 2**20 and mem_bytes("1TB") == 2**40
    slurm = prepare_run(compose_cfg(*big, "cluster=slurm", "cluster.mem=64G", "cluster.tasks_per_node=4"))
    assert rank_memory(slurm) == (16 * 2**30, "cluster.mem=64G over 4 rank(s) a node") and rank_memory(run)[0] > 0
    assert rank_memory(prepare_run(compose_cfg(*big, "cluster=slurm"))) is None  # no --mem: unknown

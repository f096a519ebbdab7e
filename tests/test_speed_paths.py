"""FLOPs counting, the peak table, and the fast-path options (exercised on CPU here; on a GPU by the gpu test)."""

import contextlib
import json

import pytest
import torch

from pipeline.job.data import gather_batch, holds_on_device
from pipeline.job.flops import flops_per_sample, peak_tflops, utilisation
from pipeline.workloads.losses import CrossEntropy
from pipeline.workloads.models import MLP
from tests.conftest import launch

FAST = ["trainer.log_every=1000", "dataset.train_size=2048", "dataset.test_size=256"]


def test_mlp_flops_are_counted_exactly():
    x, y = torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)
    got = flops_per_sample(MLP((1, 28, 28), 10), x, y, CrossEntropy(), contextlib.nullcontext())
    forward = 2 * 784 * 128 + 2 * 128 * 10
    # backward: weight gradients of both layers, and the hidden layer's input gradient (not the image's)
    backward = 2 * 784 * 128 + 2 * (2 * 128 * 10)
    assert got == forward + backward


@pytest.mark.parametrize("name, precision, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.0), ("NVIDIA H200", "fp32", 66.9),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312.0), ("NVIDIA L40S", "bf16", 362.1), ("NVIDIA L4", "fp32", 30.3),
    ("Tesla V100-SXM2-32GB", "bf16", None), ("x86_64 CPU", "fp32", None),
    # the whole model name: an L40 is not an L4, an A100 not an A10
    ("NVIDIA L40", "fp32", None), ("NVIDIA A10", "bf16", 125.0), ("NVIDIA A100 80GB PCIe", "fp32", 19.5),
])
def test_peak_table(name, precision, peak):
    assert peak_tflops(name, precision) == peak


def test_utilisation_arithmetic():
    u = utilisation(1e9, throughput=8e5, world_size=8, device_name="NVIDIA H100 80GB HBM3", precision="bf16")
    assert u["achieved_tflops_per_device"] == pytest.approx(1e9 * 8e5 / 8 / 1e12)
    assert u["mfu"] == pytest.approx(100 / 989.4)
    assert utilisation(1e9, 8e5, 8, "x86_64 CPU", "fp32")["mfu"] is None


def test_batches_from_host_memory_are_gathered_into_a_buffer_that_keeps_channels_last():
    images = torch.arange(40 * 3 * 4 * 4, dtype=torch.float32).reshape(40, 3, 4, 4)
    images = images.contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([7, 3, 30])
    assert torch.equal(gather_batch(images, idx, torch.device("cpu"), pinned=False), images[idx])  # same device
    # to another device ("meta" stands in for a GPU here; pinning needs CUDA): the copy keeps NHWC strides
    batch = gather_batch(images, idx, torch.device("meta"), pinned=False)
    assert batch.shape == (3, 3, 4, 4) and batch.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_fast_path_options_run_and_keep_replicas_identical(tmp_path):
    out = tmp_path / "run"
    r = launch("nodes=2", "model=cnn", "trainer.max_steps=8", "trainer.data_on_device=true",
               "trainer.channels_last=true", "trainer.precision=bf16", "ddp.gradient_as_bucket_view=true",
               "ddp.static_graph=true", "ddp.bucket_cap_mb=0.1", *FAST, f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "result.json").read_text())
    assert rec["fast_path"] == {"data_on_device": True, "channels_last": True, "compile": False,
                                "pinned_memory": False}
    assert rec["precision"] == "bf16" and len({x["parameters_sha256"] for x in rec["ranks"]}) == 1
    assert rec["flops_per_sample"] > 0 and rec["achieved_tflops_per_device"] > 0 and rec["mfu"] is None


@pytest.mark.slow
def test_compiled_model_trains_to_the_same_weights_as_eager(tmp_path):
    weights = {}
    for compiled in (False, True):
        out = tmp_path / f"compile-{compiled}"
        r = launch("nodes=2", "model=cnn", "trainer.max_steps=6", "trainer.precision=fp32",
                   f"trainer.compile={str(compiled).lower()}", "ddp.bucket_cap_mb=1", *FAST, f"hydra.run.dir={out}",
                   cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "result.json").read_text())["fast_path"]["compile"] is compiled
        weights[compiled] = torch.load(out / "model.pt", weights_only=True)
    for name, eager in weights[False].items():
        # inductor's kernels sum in another order: equal up to float rounding, not bit for bit
        torch.testing.assert_close(weights[True][name], eager, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_defaults_on_cpu_take_the_plain_path(tmp_path):
    r = launch("trainer.max_steps=5", "trainer.warmup_steps=1", *FAST, f"hydra.run.dir={tmp_path / 'run'}",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "run/result.json").read_text())
    assert rec["precision"] == "fp32" and not any(rec["fast_path"].values())


NEEDS_GPU = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="needs an NVIDIA GPU (CUDA); this machine has none")


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_fast_path_defaults(tmp_path):
    r = launch("model=cnn", "dataset.image_shape=[3,32,32]", "trainer.max_steps=30", *FAST,
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "run/result.json").read_text())
    assert (rec["backend"], rec["device"]["type"], rec["precision"]) == ("nccl", "cuda", "bf16")
    assert rec["fast_path"]["data_on_device"] and rec["fast_path"]["channels_last"]
    assert rec["device"]["nccl"] and rec["achieved_tflops_per_device"] > 0
    assert set(rec["device"]["tf32"]) == {"matmul", "cudnn"}
    assert rec["mfu"] is None or 0 < rec["mfu"] < 1


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_with_data_on_the_host_and_compile(tmp_path):
    r = launch("model=cnn", "dataset.image_shape=[3,32,32]", "trainer.max_steps=30", "trainer.data_on_device=false",
               "trainer.compile=true", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "run/result.json").read_text())
    assert rec["fast_path"] == {"data_on_device": False, "channels_last": True, "compile": True,
                                "pinned_memory": True}


@pytest.mark.gpu
@NEEDS_GPU
def test_local_ranks_each_get_a_gpu_or_all_take_the_cpu(tmp_path):
    r = launch("nodes=2", "trainer.max_steps=10", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "run/result.json").read_text())
    devices = [rank["device"] for rank in rec["ranks"]]
    if torch.cuda.device_count() >= 2:
        assert (devices, rec["backend"]) == (["cuda:0", "cuda:1"], "nccl")
    else:  # two ranks would share the one GPU, which NCCL refuses
        assert (devices, rec["backend"]) == (["cpu", "cpu"], "gloo")


@pytest.mark.parametrize("setting, split_bytes, free, expected", [
    (None, 720 * 2**20, 80 * 2**30, True),    # CIFAR-10 as float32 (both splits) on an empty H100
    (None, 200 * 2**20, 300 * 2**20, False),  # more than half of what is free
    (None, 200 * 2**20, 0, False),            # no GPU
    (True, 200 * 2**20, 0, True), (False, 1, 80 * 2**30, False),  # as set
])
def test_data_goes_to_the_gpu_when_it_fits(setting, split_bytes, free, expected):
    assert holds_on_device(setting, split_bytes, free) is expected

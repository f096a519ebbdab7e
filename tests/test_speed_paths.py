"""FLOPs counting, the peak table, and the fast-path options (exercised on CPU here; on a GPU by the gpu test)."""

import contextlib
import json
import os
import subprocess
import sys
import warnings

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
    model = MLP((1, 28, 28), 10, hidden=128, dropout=0.2)
    got = flops_per_sample(model, lambda: CrossEntropy()(model(x), y), 2, contextlib.nullcontext())
    forward = 2 * 784 * 128 + 2 * 128 * 10
    # backward: weight gradients of both layers, and the hidden layer's input gradient (not the image's)
    backward = 2 * 784 * 128 + 2 * (2 * 128 * 10)
    assert got == forward + backward


def test_attention_on_a_cpu_goes_uncounted_as_the_definition_says():
    """torch's flop counter has no formula for the CPU attention kernel (pipeline.definitions.RECORD["flops_per_sample"]
    says so); a torch that counts it fails here, and the definition is to be changed with it."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 4, 16, 8)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counter.get_total_flops() == 0


@pytest.mark.parametrize("name, bf16, fp32", [
    # the names torch.cuda.get_device_name gives
    ("NVIDIA H100 80GB HBM3", 989.5, 67.0),    # H100 SXM5
    ("NVIDIA H100 PCIe", 756.5, 51.0), ("NVIDIA H100 NVL", 835.5, 60.0),
    ("NVIDIA H200", 989.5, 67.0), ("NVIDIA H200 NVL", 835.5, 60.0),  # the NVL is not the SXM H200
    ("NVIDIA GH200 480GB", 989.5, 67.0), ("NVIDIA GH200 120GB", 989.5, 67.0),
    ("NVIDIA H800", 989.5, 67.0), ("NVIDIA H800 80GB HBM3", 989.5, 67.0), ("NVIDIA H800 PCIe", 756.5, 51.0),
    # A100 SXM and PCIe have the same dense peaks; so has the A800
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5), ("NVIDIA A100-SXM4-40GB", 312.0, 19.5),
    ("NVIDIA A100-PCIE-40GB", 312.0, 19.5), ("NVIDIA A100 80GB PCIe", 312.0, 19.5),
    ("NVIDIA A800-SXM4-80GB", 312.0, 19.5), ("NVIDIA A800 80GB PCIe", 312.0, 19.5),
    # the whole model name: an L40 is neither an L40S nor an L4, an A10 not an A100
    ("NVIDIA L40S", 362.05, 91.6), ("NVIDIA L40", 181.05, 90.5), ("NVIDIA L4", 121.0, 30.3),
    ("NVIDIA A10", 125.0, 31.2),
    ("Tesla V100-SXM2-32GB", None, 15.7), ("Tesla V100-PCIE-16GB", None, 14.0), ("x86_64 CPU", None, None),
])
def test_peak_table(name, bf16, fp32):
    assert (peak_tflops(name, "bf16"), peak_tflops(name, "fp32")) == (bf16, fp32)


def test_utilisation_arithmetic():
    u = utilisation(1e9, throughput=8e5, world_size=8, device_name="NVIDIA H100 80GB HBM3", precision="bf16")
    assert u.achieved_tflops_per_device == pytest.approx(1e9 * 8e5 / 8 / 1e12)
    assert u.mfu == pytest.approx(100 / 989.5)
    assert utilisation(1e9, 8e5, 8, "x86_64 CPU", "fp32").mfu is None


def test_batches_from_host_memory_are_gathered_into_a_buffer_that_keeps_channels_last():
    images = torch.arange(40 * 3 * 4 * 4, dtype=torch.float32).reshape(40, 3, 4, 4)
    images = images.contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([7, 3, 30])
    assert torch.equal(gather_batch(images, idx, torch.device("cpu"), pinned=False), images[idx])  # same device
    # to another device ("meta" stands in for a GPU here; pinning needs CUDA): the copy keeps NHWC strides
    batch = gather_batch(images, idx, torch.device("meta"), pinned=False)
    assert batch.shape == (3, 3, 4, 4) and batch.is_contiguous(memory_format=torch.channels_last)


def test_a_pool_smaller_than_the_batch_is_gathered_into_a_whole_batch_that_keeps_channels_last():
    # 4 distinct images cycled through a batch of 8 (datasets.InMemory's pool), the split in host memory
    pool = torch.rand(4, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # index_select resizing its output warns (and drops the layout)
        batch = gather_batch(pool, idx, torch.device("meta"), pinned=False)
    assert batch.shape == (8, 3, 4, 4) and batch.is_contiguous(memory_format=torch.channels_last)
    labels = gather_batch(torch.arange(4), idx, torch.device("meta"), pinned=False)
    assert labels.shape == (8,) and labels.dtype == torch.int64


@pytest.mark.e2e
def test_fast_path_options_run_and_keep_replicas_identical(tmp_path):
    out = tmp_path / "run"
    r = launch("nodes=2", "model=cnn", "trainer.max_steps=8", "trainer.data_on_device=true",
               "trainer.channels_last=true", "trainer.precision=bf16", "ddp.gradient_as_bucket_view=true",
               "ddp.static_graph=true", "ddp.bucket_cap_mb=0.1", *FAST, f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((out / "result.json").read_text())
    # cuDNN's benchmark and the side-stream prefetch are GPU options: off on a CPU whatever is asked
    assert rec["fast_path"] == {"data_on_device": True, "channels_last": True, "compile": False,
                                "pinned_memory": False, "cudnn_benchmark": False, "prefetch": False}
    assert rec["precision"] == "bf16" and len({x["parameters_sha256"] for x in rec["ranks"]}) == 1
    assert rec["flops_per_sample"] > 0 and rec["achieved_tflops_per_device"] > 0 and rec["mfu"] is None


@pytest.mark.e2e
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


@pytest.mark.e2e
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
def test_causal_attention_is_counted_in_full_on_cuda_as_the_definition_says():
    """QK^T and the weights times V, each 2 b h s^2 d, the masked half included (pipeline.definitions.RECORD)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    b, h, s, d = 2, 4, 128, 64
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counter.get_total_flops() == 2 * (2 * b * h * s * s * d)


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_fast_path_defaults(tmp_path):
    r = launch("model=cnn", "dataset.image_shape=[3,32,32]", "trainer.max_steps=30", *FAST,
               f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "run/result.json").read_text())
    assert (rec["backend"], rec["device"]["type"], rec["precision"]) == ("nccl", "cuda", "bf16")
    assert rec["fast_path"]["data_on_device"] and rec["fast_path"]["channels_last"]
    # a convolutional model's fixed shapes: cuDNN times its algorithms; the data on the GPU: nothing to prefetch
    assert rec["fast_path"]["cudnn_benchmark"] and not rec["fast_path"]["prefetch"]
    assert rec["device"]["nccl"] and rec["achieved_tflops_per_device"] > 0
    assert set(rec["device"]["tf32"]) == {"matmul", "cudnn"}
    assert rec["mfu"] is None or 0 < rec["mfu"] < 1
    # the weights load with a plain torch.load where there is no GPU (a login node, a laptop)
    r = subprocess.run([sys.executable, "-c", "import sys, torch; w = torch.load(sys.argv[1]); "
                        "print(sorted({t.device.type for t in w.values()}))", str(tmp_path / "run/model.pt")],
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "['cpu']", r.stderr


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_with_data_on_the_host_and_compile(tmp_path):
    r = launch("model=cnn", "dataset.image_shape=[3,32,32]", "trainer.max_steps=30", "trainer.data_on_device=false",
               "trainer.compile=true", *FAST, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rec = json.loads((tmp_path / "run/result.json").read_text())
    assert rec["fast_path"] == {"data_on_device": False, "channels_last": True, "compile": True,
                                "pinned_memory": True, "cudnn_benchmark": True, "prefetch": True}


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


@pytest.mark.gpu
@NEEDS_GPU
def test_gpu_batches_from_a_small_host_pool_come_through_pinned_memory_whole():
    pool = torch.rand(4, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    idx = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = gather_batch(pool, idx, torch.device("cuda"), pinned=True)
    assert batch.is_contiguous(memory_format=torch.channels_last) and torch.equal(batch.cpu(), pool[idx])


@pytest.mark.gpu
@NEEDS_GPU
def test_prefetched_batches_are_the_batches():
    from pipeline.job.data import Batch, prefetched

    host = [Batch(torch.randn(8, 3).pin_memory(), torch.arange(8).pin_memory(), {}) for _ in range(5)]
    device = torch.device("cuda")
    copies = (Batch(b.inputs.to(device, non_blocking=True), b.targets.to(device, non_blocking=True), {}) for b in host)
    got = [(b.inputs.sum().item(), b.targets.tolist()) for b in prefetched(copies, device)]
    assert got == [(b.inputs.sum().item(), b.targets.tolist()) for b in host]


@pytest.mark.gpu
@NEEDS_GPU
def test_the_timer_records_the_same_cuda_events_again():
    from pipeline.job.timing import StepTimer

    timer, made = StepTimer(torch.device("cuda")), []
    real = torch.cuda.Event
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "Event", lambda **kw: made.append(real(**kw)) or made[-1])
        timer.start()
        for _ in range(3 * StepTimer.READ_EVERY):
            timer.data_ready()
            timer.backward_done()
            timer.step_done()
        phases = timer.phases()
    assert phases.shape == (3 * StepTimer.READ_EVERY, 4) and (phases >= 0).all()
    # at most the marks of the steps waiting to be read are in hand: 2 x READ_EVERY steps of 3 new marks each
    assert len(made) <= 3 * 2 * StepTimer.READ_EVERY + 2


@pytest.mark.parametrize("setting, split_bytes, free, expected", [
    (None, 720 * 2**20, 80 * 2**30, True),    # CIFAR-10 as float32 (both splits) on an empty H100
    (None, 200 * 2**20, 300 * 2**20, False),  # more than half of what is free
    (None, 200 * 2**20, 0, False),            # no GPU
    (True, 200 * 2**20, 0, True), (False, 1, 80 * 2**30, False),  # as set
])
def test_data_goes_to_the_gpu_when_it_fits(setting, split_bytes, free, expected):
    assert holds_on_device(setting, split_bytes, free) is expected

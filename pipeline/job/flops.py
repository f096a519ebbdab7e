"""FLOPs per sample, counted, and the peak they are compared with for model FLOPs utilisation (MFU).

    achieved TFLOP/s per device = flops_per_sample x throughput (samples/s, all ranks) / world_size / 1e12
    MFU = achieved TFLOP/s per device / the device's dense peak for the run's precision

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode over one forward and backward pass (matmuls and
convolutions; elementwise work is not counted, as is usual for MFU). Attention through
scaled_dot_product_attention is counted on CUDA, in full: torch's formulas ignore is_causal, so the masked half of
causal attention is counted too (the usual convention for MFU); torch has no formula for the CPU attention kernel,
whose FLOPs go uncounted. Peaks are the vendors' datasheet figures for dense math, per device, looked up by the
name CUDA reports; fp32 means plain FP32 (no TF32).
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from pipeline.result import Utilisation

# (device model as CUDA names it, {precision: dense TFLOP/s}); the first whose words all appear, in order and
# whole (any case), in the device's name wins ("NVIDIA H100 80GB HBM3" is an H100 SXM5; "L4" is not "NVIDIA L40",
# "H200" not "NVIDIA GH200 480GB"), so the more specific names come first. Source: NVIDIA's datasheet of each
# (H200 and H200 NVL, H100 SXM / PCIe / NVL, GH200, H800, A100, A800, L40S, L40, L4, A10, V100): FP32 is the plain
# (non-tensor) figure; BF16 the tensor core figure, dense: where a datasheet gives it with sparsity (Hopper, Ada),
# half of that. The H800 and A800 compute as the H100 and A100 (their NVLink is slower).
PEAK_TFLOPS = (
    ("H200 NVL", {"bf16": 835.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "fp32": 67.0}),
    ("GH200", {"bf16": 989.5, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.5, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.5, "fp32": 67.0}),
    ("H800 PCIe", {"bf16": 756.5, "fp32": 51.0}),
    ("H800", {"bf16": 989.5, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("A800", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.05, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
    ("V100 PCIe", {"fp32": 14.0}),
    ("V100", {"fp32": 15.7}),
)


def _words(name: str) -> list[str]:
    return re.split(r"[\s\-_]+", name.strip().casefold())  # "NVIDIA A100-SXM4-80GB" -> nvidia, a100, sxm4, 80gb


def peak_tflops(device_name: str, precision: str) -> float | None:
    words = _words(device_name)
    for model, peaks in PEAK_TFLOPS:
        pattern = _words(model)
        if any(words[i:i + len(pattern)] == pattern for i in range(len(words))):
            return peaks.get(precision)
    return None


def flops_per_sample(model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], samples: int, autocast) -> float:
    """Forward + backward FLOPs of one training sample: `loss_of()` runs the model and its loss on a batch of
    `samples` (gradients left untouched; parameters the loss does not use are allowed)."""
    from torch.utils.flop_counter import FlopCounterMode  # rank 0 only, after training: not on the way to step 1

    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss = loss_of()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    del grads
    return counter.get_total_flops() / samples


def utilisation(flops_sample: float | None, throughput: float | None, world_size: int, device_name: str,
                precision: str) -> Utilisation:
    achieved = flops_sample * throughput / world_size / 1e12 if throughput and flops_sample else None
    peak = peak_tflops(device_name, precision)
    return Utilisation(flops_per_sample=flops_sample, achieved_tflops_per_device=achieved, peak_tflops_per_device=peak,
                       mfu=achieved / peak if achieved is not None and peak else None)

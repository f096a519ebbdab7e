"""What a rank holds in memory: its training state counted from the tensors themselves, and its peak.

    state   = parameters + gradients + optimizer state, each tensor once, from its local shard (FSDP's DTensors:
              `to_local()`, this rank's part; FSDP pads a parameter's first dimension to a multiple of the shard
              group, so a rank may hold a few rows fewer than another): exact
    sharded = the part of the state that is such a shard (split over the shard group); the rest is replicated
              (DDP: all of it; FSDP: buffers of the optimizer that are not DTensors, such as AdamW's step counts)
    peak    = CUDA: torch.cuda.max_memory_allocated (and _reserved, the caching allocator's); CPU: the process's
              peak resident set (getrusage's ru_maxrss), with the resident set before the model was built as the
              baseline. glibc's malloc keeps freed memory, so on a CPU the peak is an upper bound on what training
              needed, and depends on the allocator.
"""

from __future__ import annotations

import os
import resource

import torch

from pipeline.point import host_memory_bytes
from pipeline.result import Memory

# Linux counts ru_maxrss in KiB
RSS_UNIT = 1024


def resident_bytes() -> int | None:
    """This process's resident set now (Linux /proc), or None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def host_share(processes_on_host: int) -> int | None:
    """A CPU rank's share of its host's memory (MemTotal / the ranks on the host), or None."""
    total = host_memory_bytes()
    return total // max(1, processes_on_host) if total else None


def _local(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    from torch.distributed.tensor import DTensor

    return (t.to_local(), True) if isinstance(t, DTensor) else (t, False)


def _count(tensors) -> tuple[int, int]:
    """(bytes, of which sharded) of the tensors' local parts, each tensor once."""
    total = sharded = 0
    for t in {id(t): t for t in tensors if t is not None}.values():
        local, is_shard = _local(t)
        size = local.numel() * local.element_size()
        total += size
        sharded += size if is_shard else 0
    return total, sharded


def measure(model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
            baseline: int | None) -> Memory:
    """This rank's memory now (after training: the last step's gradients are still held). On a CPU the device's
    memory is the rank's share of its host's, which the record fills in (it knows the ranks on the host)."""
    params = list(model.parameters())
    param_bytes, param_sharded = _count(params)
    grad_bytes, grad_sharded = _count(p.grad for p in params)
    optim_bytes, optim_sharded = _count(v for state in optimizer.state.values() for v in state.values()
                                        if torch.is_tensor(v))
    if device.type == "cuda":
        peak, reserved, kind = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device), \
            "cuda_allocated"
        device_bytes, baseline = torch.cuda.get_device_properties(device).total_memory, None
    else:
        peak, reserved, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RSS_UNIT, None, "cpu_rss"
        device_bytes = None
    return Memory(parameter_bytes=param_bytes, gradient_bytes=grad_bytes, optimizer_bytes=optim_bytes,
                  state_bytes=param_bytes + grad_bytes + optim_bytes,
                  sharded_bytes=param_sharded + grad_sharded + optim_sharded, peak_bytes=peak,
                  peak_reserved_bytes=reserved, baseline_bytes=baseline, device_bytes=device_bytes, peak_kind=kind)

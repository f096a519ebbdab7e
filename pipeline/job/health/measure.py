"""The health check's figures, each measured on the device a rank trains on, with the threads it trains with: a
fixed GEMM (compute), a copy between two buffers larger than the cache (memory bandwidth), and between two nodes'
leading ranks a ping-pong (latency) and transfers each way (bandwidth)."""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.cgroup import throttled_periods

GEMM_S = 0.3  # per window: 3 CFS periods, the least that shows a CPU quota (a shorter one fits inside the quota)
MEMBW_S = 0.1
MEMBW_MAX_MIB = 512  # per buffer (two are copied between)
LINK_BYTES = {"cpu": 1 << 20, "cuda": 64 << 20}  # a transfer of >= 1 ms at the link's rate
LINK_REPS = 5  # best of: 2 let clean nodes fall to 0.36 x the median here, 5 never below 0.57
LATENCY_REPS = 20
PAIR_BUDGET_S = 0.5  # per pair and direction: a slow link stops repeating after 2 transfers


def gemm(device: torch.device, seconds: float) -> dict:
    """The fixed GEMM for `seconds`: FLOP/s, the checksum every node must reproduce, and on a CPU the CPU share
    and the cgroup's throttled periods over the window."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    c = torch.mm(a, b)  # warm-up, and the product to check
    checksum = float(c.double().abs().sum())
    throttled, cpu, t0 = throttled_periods(), time.process_time(), time.perf_counter()
    iterations = 0
    while True:
        torch.mm(a, b, out=c)
        iterations += 1
        if device.type == "cuda" and iterations % 8:
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if time.perf_counter() - t0 >= seconds:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu
    after = throttled_periods()
    flops = 2 * n**3 * iterations
    out = {"gflops": flops / wall / 1e9, "checksum": checksum, "finite": bool(torch.isfinite(c).all())}
    if device.type == "cpu":
        out.update(cpu_share=cpu / wall, gflops_per_cpu_s=flops / max(cpu, 1e-9) / 1e9,
                   throttled=after - throttled if None not in (after, throttled) else None)
    return out


def last_level_cache_bytes() -> int | None:
    try:
        caches = sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"))
        text = (caches[-1] / "size").read_text().strip()
    except (OSError, IndexError):
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def membw_buffer(device: torch.device) -> tuple[int | None, str]:
    """The bytes of each of the copy's two buffers, or None and why not: on a CPU 4x the last-level cache, at most
    MEMBW_MAX_MIB; where even that would not be twice the cache, the copy would measure the cache."""
    if device.type == "cuda":
        return 1 << 30, ""
    llc = last_level_cache_bytes()
    if llc is None:
        return 256 << 20, ""
    size = min(4 * llc, MEMBW_MAX_MIB << 20)
    if size < 2 * llc:
        return None, (f"memory bandwidth not measured: this CPU's last-level cache ({llc >> 20} MiB) is more than "
                      f"half the largest buffer the check copies ({MEMBW_MAX_MIB} MiB), so it would measure the cache")
    return size, ""


def membw(buffers: tuple[torch.Tensor, torch.Tensor] | None, seconds: float) -> float | None:
    """Bytes read and written per second by copying one buffer into the other, in GB/s."""
    if buffers is None:
        return None
    x, y = buffers
    y.copy_(x)
    iterations, t0 = 0, time.perf_counter()
    while True:
        y.copy_(x)
        iterations += 1
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        if time.perf_counter() - t0 >= seconds:
            break
    return 2 * x.numel() * x.element_size() * iterations / (time.perf_counter() - t0) / 1e9


def copy_buffers(device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str]:
    """The memory check's two buffers (membw_buffer's size), or None and why not."""
    size, why = membw_buffer(device)
    if size is None:
        return None, why
    x = torch.ones(size // 4, device=device)
    return (x, torch.empty_like(x)), why


def node_figures(device: torch.device, buffers) -> dict:
    """A rank's compute and memory figures, or the error that stopped them (the check names the node, whatever
    failed on it)."""
    try:
        out = gemm(device, GEMM_S)
        out["membw_gb_s"] = membw(buffers, MEMBW_S)
        if not out["finite"]:
            return {"error": "the GEMM's result is not finite (NaN or infinite)"}
        return out
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def pair_figures(me: int, a: int, b: int, peer_name: str, device: torch.device) -> dict:
    """One pair: latency by ping-pong (the leader's figure: half the best round trip), then each way a
    bandwidth that its sender measures (a transfer and its 4-byte acknowledgement, best of LINK_REPS within
    PAIR_BUDGET_S). The lower rank, `a`, leads; `peer_name` names the other end's node in errors."""
    peer = b if me == a else a
    who = f"{peer_name} (rank {peer})"
    lead = me == a
    timeout = timedelta(seconds=max(5.0, 10 * PAIR_BUDGET_S))
    tiny = torch.zeros(1, device=device)
    big = torch.ones(LINK_BYTES[device.type] // 4, device=device)

    def wait(work, what: str) -> None:
        try:
            work.wait(timeout)
        except RuntimeError as e:  # gloo's timeout names no peer
            raise TimeoutError(f"{what} {who} timed out ({str(e).splitlines()[0][-80:]})") from None
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def send(t):
        wait(dist.isend(t, peer), "send to")

    def recv(t):
        wait(dist.irecv(t, peer), "receive from")

    try:
        trips = []
        for i in range(LATENCY_REPS + 2):
            t0 = time.perf_counter()
            if lead:
                send(tiny)
                recv(tiny)
            else:
                recv(tiny)
                send(tiny)
            if i >= 2:
                trips.append(time.perf_counter() - t0)
        sent = [_direction(lead == forward, big, send, recv) for forward in (True, False)]
        return {"sent_gb_s": next(r for r in sent if r is not None),
                **({"latency_us": min(trips) / 2 * 1e6} if lead else {})}
    except Exception as e:  # named, and posted: the pair's other end may be the one at fault
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _direction(sending: bool, big: torch.Tensor, send, recv) -> float | None:
    """One direction's best transfer in GB/s (the sender's figure; None on the receiving side). The sender
    decides whether to go on (PAIR_BUDGET_S, after 2 transfers) and says so in a control message."""
    flag, best, started = torch.zeros(1, device=big.device), None, time.perf_counter()
    for i in range(LINK_REPS + 1):  # the first untimed
        if sending:
            flag.fill_(1.0 if i <= 2 or time.perf_counter() - started < PAIR_BUDGET_S else 0.0)
            send(flag)
            if flag.item() == 0:
                break
            t0 = time.perf_counter()
            send(big)
            recv(flag)
            if i:
                rate = big.numel() * big.element_size() / (time.perf_counter() - t0) / 1e9
                best = rate if best is None else max(best, rate)
        else:
            recv(flag)
            if flag.item() == 0:
                break
            recv(big)
            send(flag)
    return best

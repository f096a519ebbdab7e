"""How the model is spread over the ranks (`parallel=ddp|fsdp|hsdp`), applied in torchtitan's order (its
`parallelize`), once per rank, before the optimizer is built:

    1. find the model's repeated blocks           parallel.block_classes, else found (find_blocks)
    2. activation checkpointing of each block     trainer.activation_checkpointing, non-reentrant
    3. torch.compile                              trainer.compile: the whole model under DDP, each block under FSDP
    4. wrap                                       DDP; or fully_shard on every block, then on the root

The optimizer is made afterwards, over the sharded parameters: one made over the parameters before fully_shard
would step tensors FSDP no longer uses, and train nothing, silently. Embeddings, the head and tied weights stay in
the root's group (a tied weight in two groups is refused by FSDP). FSDP's mesh is every rank (`shard`); HSDP's is
2-D, (`replicate`, `shard`) = (replicas, ranks per replica), row-major over the global ranks, so a shard group is
the ranks of one node (ranks are node_rank x tasks_per_node + local_rank).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import RunConfig
from pipeline.result import CollectiveVolume, ParallelInfo

log = logging.getLogger(__name__)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
BYTES = {"fp32": 4, "bf16": 2}


def buffer_sync(every_forward: bool) -> dict:
    """DDP's argument for syncing buffers from rank 0 before each forward. torch 2.13 renamed
    `broadcast_buffers` to `forward_sync_buffers` (and warns on the old name); older releases know only the old."""
    if every_forward:
        return {}  # the default under either name
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


# ------------------------------------------------------------------------------------------------ blocks
def _named(cls: type, names: list[str]) -> bool:
    return cls.__name__ in names or f"{cls.__module__}.{cls.__qualname__}" in names


def _outermost(modules: list[nn.Module]) -> list[nn.Module]:
    """The modules not inside another of them, in the model's order."""
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    return [m for m in modules if id(m) not in inner]


def find_blocks(model: nn.Module, names: list[str] | None) -> list[nn.Module]:
    """The model's repeated blocks, outermost instances, in order: the classes `names` gives; else a Hugging Face
    model's `_no_split_modules` (the modules it says must not be split: GPT2Block), found on the model or any module
    inside it (a wrapper's); else the class that occurs at least twice, holds parameters and other modules (not a
    plain layer such as Linear, nor a container such as Sequential: a model's `blocks` or `layers` are items of
    one) and holds the most parameters in all. ResNet's blocks (in several Sequentials), a GPT's, nanoGPT's
    TransformerEncoderLayers and Hugging Face's are found so. [] when there are none (the seed MLP)."""
    if names is None:
        names = next((list(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)),
                     None)
    if names:
        return _outermost([m for m in model.modules() if m is not model and _named(type(m), names)])
    counts, sizes = Counter(), Counter()
    for m in model.modules():
        if m is model or isinstance(m, CONTAINERS) or not any(True for _ in m.children()):
            continue
        held = sum(p.numel() for p in m.parameters())
        if held:
            counts[type(m)] += 1
            sizes[type(m)] += held
    repeated = [cls for cls, n in counts.items() if n >= 2]
    if not repeated:
        return []
    best = max(repeated, key=sizes.__getitem__)
    return _outermost([m for m in model.modules() if type(m) is best])


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits in the model (its parent's attribute or container slot)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return


def checkpoint_blocks(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """Each block wrapped in torch's non-reentrant activation checkpointing (its activations recomputed in
    backward); returns the wrappers, which take the blocks' places. Non-reentrant: a re-entrant recompute of a Hugging
    Face model that builds a KV cache in training appends to it twice and gives wrong gradients, silently."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    wrapped = []
    for block in blocks:
        wrapper = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        _replace(model, block, wrapper)
        wrapped.append(wrapper)
    return wrapped


# ------------------------------------------------------------------------------- timing FSDP's collectives
class CommClock:
    """Seconds the training thread spends inside FSDP's collectives, and their calls and bytes (nccl-tests' sizes:
    an all-gather's output, a reduce-scatter's input, an all-reduce's buffer), since `reset`. On a CPU FSDP2 issues
    every collective synchronously (gloo, no communication streams), so the time inside them is exactly the time
    the step waits for them: the exposed communication."""

    def __init__(self):
        self.blocked, self.calls, self.bytes = 0.0, Counter(), Counter()

    def reset(self) -> None:
        self.blocked = 0.0

    def timed(self, op: str, nbytes: int, call):
        start = time.perf_counter()
        try:
            return call()
        finally:
            self.blocked += time.perf_counter() - start
            self.calls[op] += 1
            self.bytes[op] += nbytes


def _timed_collectives(clock: CommClock):
    """FSDP's own all-gather and reduce-scatter with the clock around each call, and FSDP's view of
    torch.distributed whose all_reduce (HSDP's across replicas; no hook takes it) is timed too."""
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    class TimedAllGather(DefaultAllGather):
        def __call__(self, output_tensor, input_tensor, group, async_op=False):
            return clock.timed("all_gather", output_tensor.numel() * output_tensor.element_size(),
                               lambda: super(TimedAllGather, self).__call__(output_tensor, input_tensor, group,
                                                                            async_op))

    class TimedReduceScatter(DefaultReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            return clock.timed("reduce_scatter", input_tensor.numel() * input_tensor.element_size(),
                               lambda: super(TimedReduceScatter, self).__call__(output_tensor, input_tensor, group, op,
                                                                                async_op))

    class TimedDist:
        def __getattr__(self, name):
            return getattr(dist, name)

        @staticmethod
        def all_reduce(tensor, *args, **kwargs):
            return clock.timed("all_reduce", tensor.numel() * tensor.element_size(),
                               lambda: dist.all_reduce(tensor, *args, **kwargs))

    return TimedAllGather, TimedReduceScatter, TimedDist()


def watch_collectives(model: nn.Module, clock: CommClock) -> None:
    """Time every FSDP module's collectives (FSDP's setters do not recurse: each module is given its own)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    all_gather, reduce_scatter, timed_dist = _timed_collectives(clock)
    for m in model.modules():
        if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_groups:
            m.set_custom_all_gather(all_gather())
            m.set_custom_reduce_scatter(reduce_scatter())
    _fsdp_collectives.dist = timed_dist


# ------------------------------------------------------------------------------------------------ wrapping
@dataclass
class Parallel:
    """The model as the ranks train it: `wrapped` is what a step calls (DDP, or FSDP's root), `raw` the model
    itself (under FSDP the same module, sharded in place); `autocast` whether the trainer's bf16 autocast is still
    needed (not where FSDP's policy casts); `info` what the record states."""

    kind: str
    wrapped: nn.Module
    raw: nn.Module
    autocast: bool
    info: ParallelInfo
    reduce_every_micro_batch: bool = False
    clock: CommClock | None = None  # FSDP on a CPU: the exposed communication, timed
    blocks: list[nn.Module] = field(default_factory=list)
    mesh: object = None  # FSDP's DeviceMesh
    warmup_counts: tuple[dict, dict] = ({}, {})  # the clock's calls and bytes when the warm-up ended

    def probe_groups(self) -> list[tuple[str, str, int, object]]:
        """The collectives FSDP issues and on which of this rank's groups: (op, group name, ranks, group)."""
        if not self.sharded:
            return []
        shard = self.mesh["shard"].get_group() if self.kind == "hsdp" else self.mesh.get_group()
        found = [(op, "shard", self.info.shard_ranks, shard) for op in ("all_gather", "reduce_scatter")]
        if self.kind == "hsdp":
            found.append(("all_reduce", "replicate", self.info.replicas, self.mesh["replicate"].get_group()))
        return found

    @property
    def sharded(self) -> bool:
        return self.kind != "ddp"

    def sync(self, last: bool):
        """The gradient reduction of a micro-batch: on for the last of a step, off for the others (DDP's no_sync;
        FSDP's gradient-sync switch, or with parallel.reduce_every_micro_batch only HSDP's all-reduce across
        replicas, the reduce-scatter then running every micro-batch so gradients stay sharded)."""
        if self.kind == "ddp":
            return contextlib.nullcontext() if last else self.wrapped.no_sync()
        if self.reduce_every_micro_batch:
            if self.kind == "hsdp":
                self.wrapped.set_requires_all_reduce(last)
        else:
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def end_warmup(self) -> None:
        """The collectives counted so far are the warm-up's: the per-step figures start after them."""
        if self.clock is not None:
            self.warmup_counts = (dict(self.clock.calls), dict(self.clock.bytes))

    def measured_info(self, timed_steps: int) -> ParallelInfo:
        """What the record states, with rank 0's collectives per timed step where they were counted."""
        info, clock = self.info, self.clock
        if clock is None or timed_steps <= 0:
            return info
        calls, sizes = per_step(clock.calls, self.warmup_counts[0], timed_steps), \
            per_step(clock.bytes, self.warmup_counts[1], timed_steps)
        planned = {c.op: c for c in info.collectives}
        return replace(info, measured=[CollectiveVolume(op=op, group=planned[op].group if op in planned else "shard",
                                                        ranks=planned[op].ranks if op in planned else 0,
                                                        calls=calls[op], bytes=sizes[op]) for op in sorted(calls)])

    def weights(self) -> dict:
        """The trained model's state_dict on the CPU: it loads with a plain torch.load into the model as built, on
        any machine (a login node, a laptop), not only where there is a GPU. A sharded model's is gathered whole on
        rank 0 (every rank takes part; the others get {})."""
        self.sync_buffers()
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.raw, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.raw.state_dict().items()}

    def reshard(self) -> None:
        """Every FSDP group back to its shards after a forward outside training (a check, the evaluation), whose
        root keeps its gathered parameters (it reshards only after backward), as a state dict or a step expects."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.raw.modules() if self.sharded else ():
            if isinstance(m, FSDPModule):
                m.reshard()

    def sync_buffers(self) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank, before evaluating or saving: DDP
        broadcasts them before every forward, FSDP never, so each rank's drift apart."""
        if self.sharded and dist.get_world_size() > 1:
            for b in self.raw.buffers():
                dist.broadcast(b, src=0)


def per_step(counts: dict, before: dict, steps: int) -> dict:
    return {k: (counts[k] - before.get(k, 0)) // steps for k in counts}


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: an FSDP DTensor's local shard, any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def parameters_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes on this rank: equal on all ranks when DDP kept them in sync (FSDP: of
    this rank's shards, which differ)."""
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(local(p.detach()).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gradient_bytes(model: nn.Module) -> int:
    """The whole model's gradient, one per parameter in the parameter's dtype: what DDP all-reduces every step."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def param_dtype(run: RunConfig, precision: str, model: nn.Module) -> str:
    """FSDP's compute dtype for the blocks: parallel.param_dtype, auto being the trainer's precision except for a
    model with BatchNorm, whose fp32 running statistics meet bf16 weights in one kernel (refused on a CPU): those
    keep fp32 parameters and train under autocast."""
    chosen = run.parallel.param_dtype
    if chosen != "auto":
        return chosen
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return "bf16" if precision == "bf16" and not has_batchnorm else "fp32"


def _mesh(run: RunConfig, device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    if run.parallel.kind == "hsdp":
        return init_device_mesh(device.type, (run.replicas, run.shard_ranks), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(device.type, (run.world_size,), mesh_dim_names=("shard",))


def _shard(run: RunConfig, model: nn.Module, blocks: list[nn.Module], device: torch.device, dtype: str):
    """fully_shard on every block, then on the root (whose output is cast back to fp32 for the loss); returns the
    mesh."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    p, mesh = run.parallel, _mesh(run, device)
    low = {"bf16": torch.bfloat16, "fp32": None}
    reduce = {"bf16": torch.bfloat16, "fp32": torch.float32 if dtype == "bf16" else None}[p.reduce_dtype]
    policy = functools.partial(MixedPrecisionPolicy, param_dtype=low[dtype], reduce_dtype=reduce)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=p.reshard_after_forward, mp_policy=policy())
    # the root's reshard_after_forward stays FSDP's (None: not resharded, its parameters are needed first in
    # backward), as torchtitan leaves it
    fully_shard(model, mesh=mesh, mp_policy=policy(output_dtype=torch.float32 if dtype == "bf16" else None))
    return mesh


def collectives(run: RunConfig, model: nn.Module, blocks: list[nn.Module], dtype: str,
                grad_bytes: int) -> list[CollectiveVolume]:
    """What a step communicates, per optimizer step, from the groups' sizes (nccl-tests' sizes). DDP: one
    all-reduce of the gradient. FSDP, per group (every block, the root): its parameters all-gathered in forward for
    every micro-batch, again in backward where resharded (blocks, not the root), its gradients reduce-scattered
    (every micro-batch, or only the last); HSDP adds the all-reduce of the reduced shard across replicas."""
    if run.parallel.kind == "ddp":
        return [CollectiveVolume(op="all_reduce", group="world", ranks=run.world_size, calls=1, bytes=grad_bytes)]
    p, accum = run.parallel, run.accum_steps
    reduces = accum if p.reduce_every_micro_batch else 1
    groups = [(b, p.reshard_after_forward) for b in blocks] + [(model, False)]
    held = {id(q) for b in blocks for q in b.parameters()}
    volume = Counter()
    for group, resharded in groups:
        params = [q for q in group.parameters() if group is not model or id(q) not in held]
        numel = sum(q.numel() for q in {id(q): q for q in params}.values())
        if not numel:
            continue
        gathers = accum * (2 if resharded else 1)
        volume["all_gather", "calls"] += gathers
        volume["all_gather", "bytes"] += gathers * numel * BYTES[dtype]
        volume["reduce_scatter", "calls"] += reduces
        volume["reduce_scatter", "bytes"] += reduces * numel * BYTES[p.reduce_dtype]
        volume["all_reduce", "calls"] += 1
        volume["all_reduce", "bytes"] += numel * BYTES[p.reduce_dtype] // run.shard_ranks
    out = [CollectiveVolume(op=op, group="shard", ranks=run.shard_ranks, calls=volume[op, "calls"],
                            bytes=volume[op, "bytes"]) for op in ("all_gather", "reduce_scatter")]
    if p.kind == "hsdp":
        out.append(CollectiveVolume(op="all_reduce", group="replicate", ranks=run.replicas,
                                    calls=volume["all_reduce", "calls"], bytes=volume["all_reduce", "bytes"]))
    return out


def parallelize(model: nn.Module, run: RunConfig, device: torch.device, precision: str,
                compile_model: bool) -> Parallel:
    """The model on its device, spread over the ranks as parallel.kind says (module docstring). `precision` is the
    trainer's (fp32 or bf16)."""
    p, t = run.parallel, run.trainer
    raw = model.to(device)
    blocks = find_blocks(raw, p.block_classes)
    if (p.kind != "ddp" or t.activation_checkpointing) and not blocks and dist.get_rank() == 0:
        log.warning("parallel=%s: no repeated blocks found in %s%s; set parallel.block_classes=[ClassName] to name "
                    "them", p.kind, type(raw).__name__, ": FSDP shards it as one group, gathering all of it at once"
                    if p.kind != "ddp" else "")
    if t.activation_checkpointing:
        if not blocks:
            raise ValueError(f"trainer.activation_checkpointing=true: no blocks to checkpoint in {type(raw).__name__};"
                             " set parallel.block_classes=[ClassName] to name the modules to checkpoint")
        blocks = checkpoint_blocks(raw, blocks)
    grads = gradient_bytes(raw)
    dtype = param_dtype(run, precision, raw) if p.kind != "ddp" else precision
    names = sorted({type(getattr(b, "_checkpoint_wrapped_module", b)).__name__ for b in blocks})
    info = dict(kind=p.kind, shard_ranks=run.shard_ranks, replicas=run.replicas, blocks=len(blocks),
                block_classes=names, param_dtype=dtype, reduce_dtype=getattr(p, "reduce_dtype", dtype),
                reshard_after_forward=getattr(p, "reshard_after_forward", None),
                activation_checkpointing=t.activation_checkpointing)
    if p.kind == "ddp":
        d = run.ddp
        wrapped = DistributedDataParallel(
            torch.compile(raw) if compile_model else raw,
            device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=d.bucket_cap_mb,
            gradient_as_bucket_view=d.gradient_as_bucket_view, static_graph=d.static_graph,
            find_unused_parameters=d.find_unused_parameters, **buffer_sync(d.broadcast_buffers))
        return Parallel(p.kind, wrapped, raw, autocast=precision == "bf16", blocks=blocks,
                        info=ParallelInfo(**info, collectives=collectives(run, raw, blocks, dtype, grads)))
    if compile_model:  # torchtitan's: each block compiled, then sharded (the root's hooks stay eager)
        for i, block in enumerate(blocks):
            blocks[i] = torch.compile(block)
            _replace(raw, block, blocks[i])
    volume = collectives(run, raw, blocks, dtype, grads)
    mesh = _shard(run, raw, blocks, device, dtype)
    clock = None
    if device.type == "cpu":
        clock = CommClock()
        watch_collectives(raw, clock)
    return Parallel(p.kind, raw, raw, autocast=precision == "bf16" and dtype != "bf16", blocks=blocks,
                    reduce_every_micro_batch=p.reduce_every_micro_batch, clock=clock, mesh=mesh,
                    info=ParallelInfo(**info, collectives=volume))

"""GPU memory plan of a job, counted on the `meta` device: what each role holds on its GPU, and
the GPU it gets (`stitchvm_rl.memory_roles` lists each job's roles).

    python jobs/plan.py --config jobs/configs/nft_sd35m_stitchvm.yaml

Every model a role loads is built on `meta` from its real config, so weights are exact parameter
counts x dtype sizes. Activations are traced through the real modules at the configured batch and
resolution:
    saved       bytes autograd keeps for the backward (`costs.count_flops_and_saved_bytes`, each
                storage once), with or without gradient checkpointing
    transient   the peak of live intermediate tensors of a no-grad pass (`peak_live_bytes`)
Attention is traced as fused SDPA (ATTENTION): no N x N scores are kept, as on CUDA.
A role holds its resident items (weights, adapters, optimizer state) all the time and one phase's
activations at a time (sampling, scoring, a training micro-step, the evaluation): its peak is the
resident bytes + the largest phase, + ALLOCATOR_RESERVE of that for the caching allocator, +
CUDA_CONTEXT_GIB for the CUDA context and library workspaces. What a role keeps in CPU memory
(prompt-embedding caches) is shown, not checked.

A role's GPU memory is `memory.gpu_gib`, else that of the node types of `memory.cluster_yaml` that
offer the role's custom resources and a GPU (the smallest such GPU: Ray may place it on any), else
that of this machine's GPUs (nvidia-smi).
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from stitchvm_rl.config import Range
from stitchvm_rl.costs import count_flops_and_saved_bytes

GIB = 2**30
CUDA_CONTEXT_GIB = 1.0  # CUDA context, cuBLAS / cuDNN workspaces and loaded kernels (~0.5-1 GiB on recent drivers)
ALLOCATOR_RESERVE = 0.10  # reserved above allocated by PyTorch's caching allocator (fragmentation)
ATTENTION = "fused SDPA (flash / memory-efficient attention; no N x N scores kept)"

# GPU memory (GiB, as nvidia-smi reports it) of the instance types of cluster/*.yaml and common others
INSTANCE_GPU_GIB = {
    "g5.2xlarge": 22.5, "g6.2xlarge": 22.5, "g6e.2xlarge": 45.0, "p4d.24xlarge": 40.0, "p4de.24xlarge": 80.0, "p5.48xlarge": 79.6,
    "g2-standard-8": 22.5, "a2-highgpu-1g": 40.0, "a2-highgpu-8g": 40.0, "a2-ultragpu-1g": 80.0, "a2-ultragpu-8g": 80.0, "a3-highgpu-8g": 79.6,
}


@dataclass
class MemoryConfig:
    """What the GPU memory plan checks every GPU role against before anything is placed (jobs/plan.py prints it)."""

    gpu_gib: Annotated[float, Range(0)] = 0.0
    """GPU memory (GiB, as nvidia-smi reports it) of every GPU the job uses (0: from cluster_yaml, else this machine's GPUs)."""
    cluster_yaml: str = ""
    """Ray cluster config whose node types give each GPU role its GPU memory, matched by the role's custom resources (e.g. cluster/aws.yaml)."""
    enforce: bool = True
    """Refuse to start when a role exceeds its GPU (false: print the plan's warning and start anyway)."""


@dataclass
class Item:
    """One thing a role holds and its bytes; a phase also keeps the calls it was traced from
    (`measure` runs them on a GPU; `backward`: the phase trains, forward + backward)."""

    what: str
    bytes: int
    calls: tuple = ()
    backward: bool = False


@dataclass
class RolePlan:
    """What one process of a role holds on its GPU, and the GPU it gets."""

    role: str
    processes: int
    gpus_each: float
    gpu_gib: float | None  # None: not on a GPU (not checked)
    resident: list[Item] = field(default_factory=list)
    phases: list[Item] = field(default_factory=list)  # activations, one phase at a time
    fixes: list[str] = field(default_factory=list)  # what would make it fit, for the refusal
    placement: str = ""  # where its GPU memory figure comes from (a cluster node type, memory.gpu_gib)
    host: list[Item] = field(default_factory=list)  # held in CPU memory (shown, not checked)
    models: list = field(default_factory=list)  # the resident modules on `meta` (`measure` materialises them)

    @property
    def peak_phase(self) -> Item:
        return max(self.phases, key=lambda i: i.bytes, default=Item("none", 0))

    @property
    def total_gib(self) -> float:
        tensors = sum(i.bytes for i in self.resident) + self.peak_phase.bytes
        return tensors * (1 + ALLOCATOR_RESERVE) / GIB + (CUDA_CONTEXT_GIB if self.gpu_gib is not None else 0.0)

    @property
    def budget_gib(self) -> float | None:
        """Its share of a GPU: a fraction of a GPU gets that fraction of the memory."""
        return None if self.gpu_gib is None else self.gpu_gib * min(self.gpus_each, 1.0)

    @property
    def fits(self) -> bool:
        return self.budget_gib is None or self.total_gib <= self.budget_gib


class MemoryPlanError(ValueError):
    """A role does not fit its GPU (the message names it and what would fit)."""


# ---------------------------------------------------------------- counting on meta
def weight_bytes(module: torch.nn.Module) -> dict[str, int]:
    """Bytes of a module's parameters and buffers, by dtype."""
    out: dict[str, int] = {}
    for t in [*module.parameters(), *module.buffers()]:
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.numel() * t.element_size()
    return out


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA as a fused kernel (`meta` has none: there it runs the math path and keeps the scores)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


@contextlib.contextmanager
def fused_attention():
    """Trace attention as CUDA's fused kernels keep it (see ATTENTION)."""
    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _fused_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


@dataclass(frozen=True)
class Call:
    """One call of a role's phase: `fn(device)` runs it with random inputs made on `device` (`meta`
    to trace it, a GPU to measure it: jobs/device_check.py); `key` names what it runs (`model_key`
    and the shapes), so that each is traced once per process however many plans ask for it."""

    key: tuple
    fn: Callable[[str], torch.Tensor]


_TRACED: dict[tuple, int] = {}


def model_key(module: torch.nn.Module) -> tuple:
    """What a traced call's activations depend on: the architecture (its repr, LoRA layers
    included), the dtype, what is trainable and whether gradient checkpointing is on."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in module.modules())
    dtype = next(module.parameters()).dtype
    return type(module).__name__, hashlib.sha1(repr(module).encode()).hexdigest(), str(dtype), trainable, checkpointing


def traced(kind: str, call: Call, trace: Callable[[Callable], int]) -> int:
    key = (kind, *call.key)
    if key not in _TRACED:
        _TRACED[key] = trace(lambda: call.fn("meta"))
    return _TRACED[key]


def saved_bytes(call: Call) -> int:
    """Bytes autograd keeps for the backward of the call's forward, each storage once."""

    def trace(fn):
        with fused_attention(), torch.enable_grad():
            return count_flops_and_saved_bytes(fn, unique=True)[1]

    return traced("saved", call, trace)


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of the tensors made inside the mode that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, int] = {}  # storage -> live tensors that use it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key in inputs and key not in self.refs:
                    continue  # a view of a weight or of an input made outside
                if key not in self.refs:
                    self.refs[key] = 0
                    self.live += t.untyped_storage().nbytes()
                self.refs[key] += 1
                weakref.finalize(t, self._release, key, t.untyped_storage().nbytes())
        self.peak = max(self.peak, self.live)
        return out

    def _release(self, key: int, nbytes: int) -> None:
        self.refs[key] -= 1
        if not self.refs[key]:
            del self.refs[key]
            self.live -= nbytes


def peak_live_bytes(call: Call) -> int:
    """Peak bytes of the intermediate tensors of the call run without autograd (its inputs and weights not counted)."""

    def trace(fn):
        tracker = _LiveBytes()
        with fused_attention(), torch.no_grad(), tracker:
            result = fn()
        del result
        return tracker.peak

    return traced("transient", call, trace)


# ---------------------------------------------------------------- GPUs per role
@dataclass(frozen=True)
class GPU:
    """The GPU memory a role gets (None: no GPU, nothing to check) and where the figure comes from."""

    gib: float | None
    where: str = ""


def cluster_gpu(cluster_yaml: str, resources: dict[str, float], gpus_each: float) -> GPU | None:
    """The node types of `cluster_yaml` that offer `resources` (a role's custom resources) and a
    GPU: the smallest GPU among them, as Ray may place the role on any; None when none does."""
    import yaml

    if not Path(cluster_yaml).is_file():
        raise MemoryPlanError(f"memory.cluster_yaml={cluster_yaml} does not exist; pass the cluster config the run uses, or memory.gpu_gib=<GiB>")
    nodes = yaml.safe_load(Path(cluster_yaml).read_text()).get("available_node_types", {})  # none: a local provider
    found = []
    for name, node in nodes.items():
        offered = node.get("resources", {})
        if offered.get("GPU") and all(offered.get(k, 0) >= v for k, v in resources.items()):
            config = node.get("node_config", {})
            instance = config.get("InstanceType") or config.get("machineType")
            if instance not in INSTANCE_GPU_GIB:
                raise MemoryPlanError(f"{cluster_yaml}: the node type offering {resources or 'a GPU'} is a '{instance}', whose GPU memory is not known; pass memory.gpu_gib=<GiB>")
            per_node = min([int(offered["GPU"] / gpus_each)] + [int(offered[k] / v) for k, v in resources.items() if v])
            found.append(GPU(INSTANCE_GPU_GIB[instance], f"node type '{name}' of {cluster_yaml}: {instance}, {offered['GPU']:g} GPU(s) of {INSTANCE_GPU_GIB[instance]} GiB, {per_node} per node"))
    return min(found, key=lambda gpu: gpu.gib, default=None)


def local_gpu() -> GPU | None:
    """The smallest GPU of this machine as nvidia-smi reports it (no CUDA context is made in the
    driver, whose GPU the actors may share); None without nvidia-smi."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    mib = [float(line) for line in out.split() if line.strip()]
    return GPU(round(min(mib) / 1024, 1), f"this machine's {len(mib)} GPU(s), the smallest {min(mib) / 1024:.1f} GiB (nvidia-smi)") if mib else None


def role_gpu(gpus: float, resources: dict[str, float], memory: MemoryConfig, role: str) -> GPU:
    """A role's GPU: memory.gpu_gib if given, else its node types in memory.cluster_yaml, else this
    machine's GPUs (one machine); GPU(None) without GPUs."""
    if not gpus:
        return GPU(None)
    if memory.gpu_gib:
        return GPU(memory.gpu_gib, f"memory.gpu_gib={memory.gpu_gib:g} for every GPU")
    found = cluster_gpu(memory.cluster_yaml, resources, gpus) if memory.cluster_yaml else local_gpu()
    if found is None:
        where = f"custom resources that a GPU node type of {memory.cluster_yaml} offers" if memory.cluster_yaml else "memory.cluster_yaml=<the cluster's config> (nvidia-smi finds no GPU here)"
        raise MemoryPlanError(f"the {role} asks for GPUs but their memory is not known: pass memory.gpu_gib=<GiB>, or {where}")
    return found


# ---------------------------------------------------------------- measured on a device
@torch.no_grad()
def fill_random(module: torch.nn.Module) -> None:
    """Values for a module materialised by `to_empty`: small random weights, and integer buffers
    (position ids) as the positions they index."""
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point():
            t.normal_(0, 0.02)
        else:
            t.copy_(torch.arange(t.shape[-1], device=t.device).expand(t.shape) if name.endswith("position_ids") else torch.zeros_like(t))


def measure(plan: RolePlan, device: str, repeats: int = 2) -> dict:
    """Run a role's planned phases for real: its modules materialised on `device` with uninitialised
    weights (`to_empty`: memory and time do not depend on the values), each phase's calls run with
    random inputs (`Call.fn`; a training phase forward + backward), one call at a time. Returns the
    planned and measured GiB -- resident, each phase's peak above it, the whole role's peak
    allocated and reserved (torch's allocator; CUDA only) -- and each phase's seconds (the median of
    `repeats` runs after a warm-up one). Only the modules are materialised: optimizer state and
    gradients stay planned. The modules go back to `meta` after."""
    import statistics
    import time

    cuda = device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def allocated() -> int:
        return torch.cuda.memory_allocated() if cuda else 0

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base = allocated()
    for module in plan.models:
        module.to_empty(device=device)
        fill_random(module)
    resident = allocated() - base
    phases, reserved = [], torch.cuda.memory_reserved() if cuda else 0
    for item in plan.phases:
        if not item.calls:
            continue
        seconds, peak = [], 0
        for _ in range(repeats + 1):
            for call in item.calls:
                sync()
                before = allocated()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                with torch.set_grad_enabled(item.backward):
                    out = call.fn(device)
                    if item.backward:
                        out.float().sum().backward()
                del out
                sync()
                seconds.append(time.perf_counter() - start)
                peak = max(peak, (torch.cuda.max_memory_allocated() if cuda else 0) - before)
                reserved = max(reserved, torch.cuda.max_memory_reserved() if cuda else 0)
            for module in plan.models:  # the training phase's .grad: the plan counts gradients as resident
                module.zero_grad(set_to_none=True)
        runs = [sum(seconds[r * len(item.calls) : (r + 1) * len(item.calls)]) for r in range(1, repeats + 1)]
        phases.append({"phase": item.what, "planned_gib": item.bytes / GIB, "measured_gib": peak / GIB, "seconds": statistics.median(runs)})
    for module in plan.models:
        module.to_empty(device="meta")
    if cuda:
        torch.cuda.empty_cache()
    planned_resident = sum(i.bytes for i in plan.resident)
    return {
        "role": plan.role,
        "planned_resident_gib": planned_resident / GIB,
        "measured_resident_gib": resident / GIB,
        "phases": phases,
        "planned_peak_tensors_gib": (planned_resident + plan.peak_phase.bytes) / GIB,
        "measured_peak_allocated_gib": resident / GIB + max((p["measured_gib"] for p in phases), default=0.0),
        "measured_max_reserved_gib": reserved / GIB,
        "planned_total_gib": plan.total_gib,
        "device": device,
    }


# ---------------------------------------------------------------- report and verdict
def describe(plans: list[RolePlan]) -> str:
    """The plan as text: one block per role, its items in GiB, its peak against its GPU."""
    lines = [f"attention traced as {ATTENTION}; allowance: CUDA context {CUDA_CONTEXT_GIB} GiB + allocator reserve {ALLOCATOR_RESERVE:.0%}"]
    for plan in plans:
        gpu = "no GPU (not checked)" if plan.budget_gib is None else f"{plan.budget_gib:.1f} GiB of GPU ({plan.gpus_each:g} GPU each)"
        lines.append(f"\n{plan.role} x{plan.processes}: {gpu}" + (f"; {plan.placement}" if plan.placement else ""))
        lines += [f"  {i.bytes / GIB:8.2f} GiB  {i.what}" for i in plan.resident]
        lines += [f"  {i.bytes / GIB:8.2f} GiB  {'*' if i is plan.peak_phase else ' '}{i.what}" for i in plan.phases]
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"  {plan.total_gib:8.2f} GiB  peak (resident + the * phase, + reserve and context): {verdict}")
        lines += [f"  {i.bytes / GIB:8.2f} GiB  in CPU memory: {i.what}" for i in plan.host]
    return "\n".join(lines)


def check(plans: list[RolePlan], enforce: bool = True) -> None:
    """MemoryPlanError naming every role that exceeds its GPU, and what would make it fit
    (`enforce=False`: the same message as a warning)."""
    over = [p for p in plans if not p.fits]
    if over:
        error = MemoryPlanError("; ".join(
            f"the {p.role} needs {p.total_gib:.1f} GiB but has {p.budget_gib:.1f} GiB of GPU (peak: {p.peak_phase.what}); "
            f"to fit try {', or '.join(p.fixes)}" for p in over
        ) + " (python jobs/plan.py --config <this config> shows the whole plan; memory.enforce=false starts anyway)")
        if enforce:
            raise error
        warnings.warn(f"memory plan: {error}", stacklevel=2)

"""Measuring side by side: interleaved repeats, median and spread, and the pieces `jobs/bench.py`
sends to Ray actors (they must live in the package to be pickled by reference)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

from stitchvm_rl.policy import AdapterState, tensor_checksum


def sync(device: str) -> None:
    """Wait for queued GPU work, so a wall-clock reading covers it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: str = "cpu", warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each callable, run round-robin (a, b, c, a, b, c, ...) so that drift of the machine
    (thermal, other load, caches) hits every method alike; `warmup` rounds are run and dropped."""
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def spread(values: list[float]) -> dict:
    """Median, min and max of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(seconds: dict[str, list[float]], per: float = 1.0) -> dict:
    """Spread of each method's seconds, divided by `per` (e.g. samples)."""
    return {name: spread([s / per for s in values]) for name, values in seconds.items()}


def ratio(a: list[float], b: list[float]) -> float:
    """median(a) / median(b)."""
    return statistics.median(a) / statistics.median(b)


def cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0))


def machine(device: str) -> str:
    """One line naming the hardware and torch version the numbers were taken on."""
    gpu = f", {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return f"{platform.processor() or platform.machine()}, {cores()} cores{gpu}, torch {torch.__version__}"


class TransformerCalls:
    """Counts the rows (samples) that pass through a module's forward: model evaluations per sample."""

    def __init__(self, module: torch.nn.Module):
        self.rows = 0
        self._handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        z = kwargs.get("hidden_states", args[0] if args else None)
        self.rows += len(z)

    def take(self) -> int:
        rows, self.rows = self.rows, 0
        return rows


def lora_shapes(transformer: torch.nn.Module, rank: int, targets: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of a LoRA adapter of `rank` on `targets` (suffixes of Linear module names), as peft
    stores it (`<module>.lora_A.weight` (r, in), `<module>.lora_B.weight` (out, r)); works on `meta`."""
    shapes = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            shapes[f"{name}.lora_A.weight"] = (rank, module.in_features)
            shapes[f"{name}.lora_B.weight"] = (module.out_features, rank)
    return shapes


class AdapterSink:
    """A Ray actor holding LoRA buffers of given shapes: `load_adapter` does what a rollout actor's
    does with an adapter -- take it from the object store, copy it into the model's LoRA weights --
    and answers (version, dtype, checksum of what arrived), so the sync path is measured without a
    model. `via`: a dtype the tensors pass through on the way (a lossy copy, as a broken sync makes)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: str = "float32", via: str | None = None):
        from stitchvm_rl.zoo import DTYPES

        self.dtype, self.via = dtype, DTYPES[via] if via else None
        self.buffers = {name: torch.zeros(shape, dtype=DTYPES[dtype]) for name, shape in shapes.items()}

    def load_adapter(self, state: AdapterState) -> tuple[int, str, str]:
        for name, tensor in state.tensors.items():
            self.buffers[name].copy_(tensor if self.via is None else tensor.to(self.via))
        return state.version, self.dtype, tensor_checksum(self.buffers)


def random_adapter(shapes: dict[str, tuple[int, ...]], dtype: str = "float32", version: int = 1) -> AdapterState:
    from stitchvm_rl.zoo import DTYPES

    tensors = {name: torch.randn(shape).to(DTYPES[dtype]) for name, shape in shapes.items()}
    return AdapterState(tensors, version, tensor_checksum(tensors))


class ExtraMemory:
    """Peak memory above what was in use on entry, in MiB (`extra.mib`): what a method needs beyond
    its resident models. CUDA: torch's allocated bytes. CPU: the resident set (VmHWM, reset through
    /proc/self/clear_refs), which also counts allocator slack, so it is coarser."""

    def __init__(self, device: str):
        self.device, self.mib = device, 0.0

    def __enter__(self):
        from stitchvm_rl.runtime import PeakMemory

        self._peak = PeakMemory(self.device).__enter__()
        self._entry = torch.cuda.memory_allocated() / 2**20 if self.device.startswith("cuda") else _status_mib("VmRSS")
        return self

    def __exit__(self, *exc):
        self._peak.__exit__(*exc)
        self.mib = max(0.0, self._peak.mib - self._entry)
        return False


def _status_mib(key: str) -> float:
    return int(open("/proc/self/status").read().split(f"{key}:")[1].split()[0]) / 1024


def model_mib(*objects) -> float:
    """MiB of the parameters and buffers of every torch module reachable from `objects` (through
    attributes, dicts, lists and tuples, two levels deep), each counted once."""
    seen, total = set(), 0

    def visit(obj, depth: int) -> None:
        nonlocal total
        if id(obj) in seen or depth > 3:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in {id(t): t for t in [*obj.parameters(), *obj.buffers()]}.values())
            return
        items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else vars(obj).values() if hasattr(obj, "__dict__") else []
        for item in items:
            visit(item, depth + 1)

    for obj in objects:
        visit(obj, 0)
    return total / 2**20

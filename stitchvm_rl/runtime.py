"""Process setup shared by every job: Ray (local or submitted), cluster resources, DeepSpeed.

A job started with `python jobs/x.py` starts a private local Ray cluster; under `ray job submit`
(RAY_ADDRESS is set) it joins that cluster. Never a bare `ray.init()`, which may join a stray one.
On an autoscaling cluster a job first asks the autoscaler for everything it will place
(`request_resources`), then waits for its actors and learner ranks while saying what it waits for
(`wait_for_placement`), and withdraws the request when it is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

# Single-machine defaults that Ray 2.60 needs on a laptop or CI box: no token
# auth, and loopback as the node address. Set before `ray` is imported; users can override them.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def init_ray(num_cpus: int = 8) -> None:
    """Join the cluster of a submitted job, or start a local one with `num_cpus` logical CPUs.

    More logical CPUs than cores lets rollout actors, learner workers and Ray Data share a 2-core
    machine; with too few, Ray Data can wait forever for a CPU (no error, no progress).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir=os.environ.get("STITCHVM_RAY_TMP", "/tmp")),
        # secrets (WANDB_API_KEY, HF_TOKEN) are never put in a runtime env: Ray logs runtime envs
        # (runtime_env_agent.log); the local raylet inherits this process's environment instead
        runtime_env={
            "env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "STITCHVM_CACHE", "WANDB_MODE") if k in os.environ},
            "worker_process_setup_hook": quiet_placement_group_cleaner,
        },
    )


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_placement_group_cleaner() -> None:
    """Worker setup hook of the local cluster. Ray Train's placement-group cleaner asks the State API
    every second whether its controller is alive; the State API is served by the dashboard, which a
    local cluster leaves off (it costs 0.9 GB), so each ask fails and warns -- 140-380 lines per job.
    (Its cleanup cannot work here either way, and the local cluster ends with the job.)"""
    import logging

    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)


def request_resources(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler for these bundles at once (it starts nodes before anything is placed);
    `request_resources([])` withdraws the request. Harmless on a fixed-size cluster."""
    from ray.autoscaler.sdk import request_resources as sdk_request_resources

    sdk_request_resources(bundles=[{k: v for k, v in b.items() if v} for b in bundles])


def _fmt(resources: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items()) if not k.startswith("node:") and "memory" not in k) + "}"


def wait_for_placement(refs: list, what: str, bundle: dict[str, float], timeout_s: float, report_every_s: float = 30.0) -> None:
    """Wait for `refs` (e.g. actors' `__ray_ready__`) and, every `report_every_s`, say what is still
    missing: how many of `what`, the bundle each needs, what the cluster has free and in total.
    After `timeout_s` (0: never) give up with that message as the error."""
    import ray

    start, pending = time.monotonic(), list(refs)
    report_every_s = min(report_every_s, timeout_s) if timeout_s else report_every_s
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=report_every_s)
        if not pending:
            return
        waited = time.monotonic() - start
        status = (
            f"waiting {waited:.0f} s for {len(pending)} of {len(refs)} {what}, each needing {_fmt(bundle)}; the cluster has "
            f"{_fmt(ray.available_resources())} free of {_fmt(ray.cluster_resources())}"
        )
        print(status, flush=True)
        if timeout_s and waited >= timeout_s:
            raise RuntimeError(
                f"gave up: {status}. No node offers this yet: start the cluster from cluster/*.yaml (its node types offer "
                f"these resources), lower the request in the job config, or raise resource_wait_s"
            )


def wait_for_bundles(bundles: list[dict[str, float]], what: str, timeout_s: float) -> None:
    """Block until `bundles` could be placed together (a placement group is reserved, then freed for
    the real users, e.g. Ray Train's workers), reporting what is missing while waiting."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{k: v for k, v in b.items() if v} for b in bundles], strategy="PACK")
    try:
        wait_for_placement([group.ready()], what, bundles[0], timeout_s)
    finally:
        remove_placement_group(group)


def setup_deepspeed() -> str:
    """Pick DeepSpeed's accelerator before it is imported; returns "cuda" or "cpu".

    Checkpoints are unpickled tensors-only. On CPU: DeepSpeed's CPU accelerator with gloo, and its shared-memory all-reduce op marked
    unavailable -- it is only for inference, yet its first use JIT-compiles for ~2 minutes.
    """
    import torch

    # DeepSpeed reads checkpoints with torch.load(weights_only=False): force torch's tensors-only
    # unpickler, so a checkpoint on shared storage can hold tensors and plain data, never code
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return device


def deepspeed_config(zero_stage: int, micro_batch: int, grad_accum: int, bf16: bool, grad_clip: float = 1.0) -> dict:
    """ZeRO config. `bf16`: DeepSpeed casts the module to bf16 and keeps float32 master weights in the
    optimizer; gradients are accumulated in float32 over the micro-steps."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def check_zero_stage(stage: int, key: str, rank0_work: str) -> None:
    """Refuse ZeRO-3 (ConfigError): it partitions the weights themselves across the ranks, and
    `rank0_work` reads them whole on rank 0 alone (it would read a partition, or wait forever for the others)."""
    from stitchvm_rl.config import ConfigError

    if stage == 3:
        raise ConfigError(f"{key}=3: ZeRO-3 partitions every weight across the learner ranks, but {rank0_work} on rank 0 alone; use {key}=2 (ZeRO-2 partitions the optimizer state and gradients)")


def check_learner_gpus(train, key: str, one_rank_use: str) -> None:
    """Refuse fractional GPUs for several GPU learner ranks (ConfigError): Ray packs them onto one
    device and NCCL refuses two ranks on one GPU. `train` has use_gpu, num_workers, gpus_per_worker."""
    from stitchvm_rl.config import ConfigError

    if train.use_gpu and train.num_workers > 1 and train.gpus_per_worker < 1:
        raise ConfigError(
            f"{key}.gpus_per_worker={train.gpus_per_worker:g} with {train.num_workers} GPU learner ranks: Ray packs fractional GPUs "
            f"onto the same device and NCCL refuses two ranks on one GPU; give each rank a whole GPU ({key}.gpus_per_worker=1), "
            f"or use one rank ({key}.num_workers=1) {one_rank_use}"
        )


def report_checkpoint(metrics: dict, engine, client_state: dict, exclude_frozen: bool = False, write_extra=None) -> None:
    """Inside a Ray Train loop: report `metrics` with this rank's part of a checkpoint -- the DeepSpeed
    engine state (tag "engine"; `exclude_frozen` leaves frozen weights out), whatever `write_extra(dir)`
    adds, and a sha256 manifest of every file this rank wrote (checksums-rank<r>.json). It is written to
    a temporary directory and Ray Train registers the checkpoint only once every rank has reported, so
    a crash mid-write leaves the previous checkpoint as the latest."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag="engine", client_state=client_state, exclude_frozen_parameters=exclude_frozen)
        if write_extra is not None:
            write_extra(Path(d))
        manifest = {str(p.relative_to(d)): _sha256(p) for p in sorted(Path(d).rglob("*")) if p.is_file()}
        (Path(d) / f"checksums-rank{rank}.json").write_text(json.dumps(manifest, indent=1))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def verify_checkpoint(directory: str | Path, name: str = "") -> None:
    """Refuse a checkpoint whose files do not match the manifests its ranks wrote (truncated by a
    full disk, damaged in storage): it is never loaded silently."""
    directory = Path(directory)
    manifests = sorted(directory.glob("checksums-rank*.json"))
    if not manifests:
        raise ValueError(f"checkpoint {name or directory} has no checksum manifest (checksums-rank*.json); it was not written by this version, or not completely")
    for manifest in manifests:
        for rel, digest in json.loads(manifest.read_text()).items():
            path = directory / rel
            if not path.is_file() or _sha256(path) != digest:
                raise ValueError(
                    f"checkpoint {name or directory}: file '{rel}' is missing, truncated or corrupted (sha256 mismatch); "
                    "delete that checkpoint directory to resume from the one before it"
                )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resume_state(engine, load_module_strict: bool = True) -> dict:
    """Inside a Ray Train loop: load the run's latest checkpoint (a DeepSpeed engine state saved with
    tag "engine" and a client state holding at least {"epoch": n}), after checking it against its
    checksum manifests; returns that client state, or {} for a fresh run."""
    import ray.train

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return {}
    # the plain-data DeepSpeed classes its checkpoints hold, for the tensors-only unpickler (setup_deepspeed)
    with checkpoint.as_directory() as d, torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        verify_checkpoint(d, checkpoint.path)
        _, client = engine.load_checkpoint(d, tag="engine", load_module_strict=load_module_strict)
    return client


def resume_epoch(engine) -> int:
    """The first epoch to run: 0, or the one after the latest checkpoint's (see `resume_state`)."""
    return resume_state(engine).get("epoch", -1) + 1


def learner_bundle(use_gpu: bool, gpus_per_worker: float = 1.0, resources: dict[str, float] | None = None) -> dict[str, float]:
    """What one learner rank asks for: 1 CPU, its GPU share, and custom resources (e.g. {learner: 1})."""
    return {"CPU": 1.0, **({"GPU": gpus_per_worker} if use_gpu else {}), **(resources or {})}


def torch_trainer(train_fn, loop_config: dict, num_workers: int, use_gpu: bool, max_failures: int, storage_path: str, run_name: str, gpus_per_worker: float = 1.0, resources: dict[str, float] | None = None):
    """A TorchTrainer as every job here uses it: `num_workers` ranks, each `learner_bundle(...)` (a
    fractional GPU colocates ranks with rollout actors), gloo on CPU / NCCL on GPU, restarts after
    worker failures, the last 2 checkpoints kept under storage_path/run_name (re-running the same
    name resumes from them)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=learner_bundle(use_gpu, gpus_per_worker, resources)),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def fit(trainer, what: str):
    """`trainer.fit()`, with a failure of the workers raised as one line naming `what` (Ray Train's
    TrainingFailedError carries the whole remote traceback; its last line is the workers' own error)."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        raise RuntimeError(f"{what} failed: {str(err).strip().splitlines()[-1]}") from err


class PeakMemory:
    """Peak memory of the code inside `with PeakMemory(device) as peak:` in MiB (`peak.mib`).

    CUDA: torch's peak allocated bytes, reset on entry. CPU: the process's peak resident set (VmHWM),
    reset on entry through /proc/self/clear_refs (Linux >= 4.0) -- so measure each method in its own
    process after its models are loaded, or the peak of loading hides the peak of running."""

    def __init__(self, device: str):
        self.device = device
        self.mib = 0.0

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            status = open("/proc/self/status").read()
            self.mib = int(status.split("VmHWM:")[1].split()[0]) / 1024
        return False


def check_every_node_sees(paths: dict[str, str]) -> None:
    """After Ray starts and before any actor loads a model: every alive node must see each of
    `paths` ({config key: path or storage URI}) -- a path only the driver has, or storage that a
    worker cannot reach (its credentials unset there), is refused with one message naming the key,
    the node and the fix. A one-node cluster is the driver's own machine: nothing to ask."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from stitchvm_rl.config import ConfigError

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1:
        return
    probe = ray.remote(num_cpus=0)(_unseen)
    refs = {n["NodeManagerAddress"] + " " + n["NodeID"][:8]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(paths) for n in nodes}
    for node, unseen in zip(refs, ray.get(list(refs.values()), timeout=300)):
        for key, why in unseen.items():
            raise ConfigError(
                f"{key}: '{paths[key]}' is not visible on node {node} ({why}); every node must see it: put it on a "
                "filesystem every node mounts, or in object storage (s3://, gs://) with credentials on every node, or "
                "pass a hub id (see docs/real-runs.md, 'Storage')"
            )


def _unseen(paths: dict[str, str]) -> dict[str, str]:
    """On one node: {key: why} for each of `paths` this node cannot see."""
    from stitchvm_rl.storage import source_exists

    unseen = {}
    for key, path in paths.items():
        try:
            if not source_exists(path):
                unseen[key] = "no such file or directory here"
        except OSError as err:
            unseen[key] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return unseen

"""Process setup shared by every job: Ray (local or submitted) and DeepSpeed (GPU or CPU).

A job started with `python jobs/x.py` starts a private local Ray cluster; under `ray job submit`
(RAY_ADDRESS is set) it joins that cluster. Never a bare `ray.init()`, which may join a stray one.
"""

from __future__ import annotations

import os
import tempfile

# Single-machine defaults that Ray 2.60 needs on a laptop or CI box (feasibility notes §5): no token
# auth, and loopback as the node address. Set before `ray` is imported; users can override them.
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def init_ray(num_cpus: int = 8) -> None:
    """Join the cluster of a submitted job, or start a local one with `num_cpus` logical CPUs.

    More logical CPUs than cores lets rollout actors, learner workers and Ray Data share a 2-core
    machine; with too few, Ray Data can wait forever for a CPU (feasibility notes §5.6).
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
        runtime_env={"env_vars": {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "STITCHVM_CACHE", "WANDB_MODE", "WANDB_API_KEY") if k in os.environ}},
    )


def setup_deepspeed() -> str:
    """Pick DeepSpeed's accelerator before it is imported; returns "cuda" or "cpu".

    On CPU: DeepSpeed's CPU accelerator with gloo, and its shared-memory all-reduce op marked
    unavailable -- it is only for inference, yet its first use JIT-compiles for ~2 minutes.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return device


def deepspeed_config(zero_stage: int, micro_batch: int, grad_accum: int, device: str, grad_clip: float = 1.0) -> dict:
    """ZeRO config: bf16 on GPU, fp32 on CPU (bf16 is ~20x slower on CPUs without AVX512-BF16)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": device == "cuda"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def resume_state(engine, load_module_strict: bool = True) -> dict:
    """Inside a Ray Train loop: load the run's latest checkpoint (a DeepSpeed engine state saved with
    tag "engine" and a client state holding at least {"epoch": n}) if there is one; returns that client
    state, or {} for a fresh run."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return {}
    with checkpoint.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag="engine", load_module_strict=load_module_strict)
    return client


def resume_epoch(engine) -> int:
    """The first epoch to run: 0, or the one after the latest checkpoint's (see `resume_state`)."""
    return resume_state(engine).get("epoch", -1) + 1


def torch_trainer(train_fn, loop_config: dict, num_workers: int, use_gpu: bool, max_failures: int, storage_path: str, run_name: str, datasets: dict | None = None):
    """A TorchTrainer as every job here uses it: `num_workers` ranks (1 CPU, and 1 GPU with use_gpu),
    gloo on CPU / NCCL on GPU, restarts after worker failures, the last 2 checkpoints kept under
    storage_path/run_name (re-running the same name resumes from them)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_fn,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets=datasets,
    )


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

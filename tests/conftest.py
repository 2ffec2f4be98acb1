"""Shared fixtures. Tests are CPU-only and offline: the hub is switched off and any socket
connection to a non-loopback address fails the test that made it."""

import os
import socket
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("STITCHVM_CACHE", tempfile.mkdtemp(prefix="stitchvm-test-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
        raise RuntimeError(f"test tried to reach the network ({address}); tests must stay offline")
    return _connect(self, address)


socket.socket.connect = _loopback_only
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_policy():
    from stitchvm_rl.policy import SD3Policy

    return SD3Policy.from_pretrained("tiny-sd3")


@pytest.fixture(scope="session")
def toy_policy():
    from stitchvm_rl.policy import SD3Policy

    return SD3Policy.from_pretrained("toyworld")


@pytest.fixture(scope="session")
def toy_value_dir():
    """The toy world's committed value model (what jobs fall back on; built by `python jobs/stitch.py`)."""
    from stitchvm_rl.value import default_value_model

    return default_value_model("toyworld")


# jobs/nft.py at tiny sizes: 2 prompt groups of 2 images, 4 DPM-2 steps, LoRA rank 4, terminal
NFT_TINY = [
    "rollout.estimator=terminal",
    "groups_per_epoch=2",
    "rollout.group_size=2",
    "rollout.num_steps=4",
    "rollout.stop_min=2",
    "rollout.stop_max=3",
    "rollout.lora_rank=4",
    "rollout.lora_alpha=8",
    "eval_prompts=4",
    "eval_every=2",
    "drift_every=0",
    "train.lr=1e-2",
]


@pytest.fixture(scope="session")
def nft_out(tmp_path_factory):
    """output_dir of the NFT runs the session shares (baselines and the runs compared with them)."""
    return tmp_path_factory.mktemp("nft")


@pytest.fixture(scope="session")
def bridge_args(toy_value_dir) -> list[str]:
    """The async, bridge-anchored mode: rollouts stop at z_tau and are scored by the value model."""
    return ["rollout.estimator=stitchvm", "rollout.async=true", f"value_models=[{toy_value_dir}]"]


@pytest.fixture(scope="session")
def straight(nft_out) -> dict:
    """The synchronous terminal baseline, 4 epochs uninterrupted (<nft_out>/straight); every sync
    resume and crash run is compared with it."""
    return load_job("nft").main([f"output_dir={nft_out}", "run_name=straight", "epochs=4", *NFT_TINY])


@pytest.fixture(scope="session")
def straight_bridge(nft_out, bridge_args) -> dict:
    """The async stitchvm baseline, 4 epochs uninterrupted (<nft_out>/straight_bridge)."""
    return load_job("nft").main([f"output_dir={nft_out}", "run_name=straight_bridge", "epochs=4", *NFT_TINY, *bridge_args])


@pytest.fixture(scope="session")
def real_scale_costs() -> dict:
    """jobs/bench.py's real_scale section in quick mode (SD3.5-M + CLIP-L on `meta`, 512^2): ~30 s of
    FLOP counting, shared by the cost-model and the bench tests."""
    from stitchvm_rl.bench_sections import bench_real_scale

    return bench_real_scale(load_job("bench").BenchConfig(quick=True))


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_exit():
    """Jobs run in-process start one local Ray cluster; it is shared and stopped once at the end."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


SHARED_RUNS = {"straight", "straight_bridge", "real_scale_costs"}


def pytest_collection_modifyitems(items):
    """A test that reads a shared end-to-end run is slow too: `pytest -m "not slow"` skips those runs."""
    for item in items:
        if SHARED_RUNS & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)


def pytest_ignore_collect(collection_path, config):
    """tests/multinode start a cluster of their own and run in a pytest process of their own:
    `pytest tests/multinode` (the suite's shared local Ray would block their drivers)."""
    if collection_path.name == "multinode" and not any("multinode" in str(arg) for arg in config.args):
        return True
    return None


def load_job(name: str):
    """A job script as a module (jobs/ is not a package): `load_job("nft").main([...])`."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_job", path)
    job = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = job  # dataclasses and pickling look a module's classes up by name
    spec.loader.exec_module(job)
    return job

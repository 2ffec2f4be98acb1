"""Shared fixtures. Tests are CPU-only and offline: the hub is switched off and any socket
connection to a non-loopback address fails the test that made it."""

import os
import socket
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


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_exit():
    """Jobs run in-process start one local Ray cluster; it is shared and stopped once at the end."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def load_job(name: str):
    """A job script as a module (jobs/ is not a package): `load_job("nft").main([...])`."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_job", path)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job

"""A Ray cluster of several nodes on one machine, as tests/multinode uses it: a head with no CPUs
(drivers and the dashboard only) and worker nodes joined with `ray start --address`, each worker in
its own mount namespace with a private tmpfs over the driver's output directory, so that a worker
cannot see what only the driver's machine has (as another machine's disk). Needs root (`unshare -m`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "stitchvm"  # the S3 bucket of the tests (moto server on loopback: conftest.py)
LOCAL_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_USAGE_STATS_ENABLED": "0"}
# node death is noticed within ~3 s (defaults: 5 missed checks of 3 s); cluster/*.yaml set these too
HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3", "RAY_health_check_timeout_ms": "1000"}


@dataclass
class Node:
    name: str
    process: subprocess.Popen
    log: Path

    def kill(self) -> None:
        """A machine lost: every process of the node dies at once, nothing is shut down cleanly."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@dataclass
class LocalCluster:
    base: Path  # everything lives under it: driver/, shared/, node temp dirs and caches
    gcs_port: int
    dashboard_port: int
    env: dict = field(default_factory=dict)  # what every node (and the drivers) have in their environment
    nodes: dict = field(default_factory=dict)

    @property
    def driver_dir(self) -> Path:
        return self.base / "driver"

    @property
    def shared_dir(self) -> Path:
        return self.base / "shared"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_env(self, name: str) -> dict:
        env = {**os.environ, **LOCAL_ENV, **HEALTH_CHECK, **self.env, "STITCHVM_CACHE": str(self.base / f"cache-{name}")}
        env.pop("RAY_ADDRESS", None)
        return env

    def start_head(self) -> None:
        for d in (self.driver_dir, self.shared_dir):
            d.mkdir(parents=True, exist_ok=True)
        ports = self.dashboard_port + 100
        self._start("head", [
            "--head", f"--port={self.gcs_port}", "--num-cpus=0", "--num-gpus=0", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}", *self._ports(ports), f"--temp-dir={self.base / 'tmp-head'}",
        ])

    def add_worker(self, name: str, cpus: int, offset: int) -> None:
        """A worker node that cannot see the driver's output directory (a private tmpfs over it);
        it offers a custom resource of its own name, so a test can tell where things run."""
        hide = f"mount -t tmpfs tmpfs {self.driver_dir} && exec \"$@\""
        args = [f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0", f"--resources={json.dumps({name: 1})}", "--object-store-memory=200000000", *self._ports(self.dashboard_port + 100 + 10 * offset)]
        self._start(name, args, wrap=["unshare", "-m", "--propagation", "private", "sh", "-c", hide, "sh"])

    def _ports(self, first: int) -> list[str]:
        # off Ray's defaults, which another cluster on this machine may hold
        return [f"--dashboard-agent-listen-port={first}", f"--dashboard-agent-grpc-port={first + 1}", f"--metrics-export-port={first + 2}",
                f"--runtime-env-agent-port={first + 3}", f"--node-manager-port={first + 4}", f"--object-manager-port={first + 5}",
                "--min-worker-port=0", "--max-worker-port=0"]  # workers on OS-chosen ports: several raylets share this machine

    def _start(self, name: str, args: list[str], wrap: list[str] = ()) -> None:
        log = self.base / f"{name}.log"
        process = subprocess.Popen(
            [*wrap, RAY, "start", "--block", "--node-ip-address=127.0.0.1", *args],
            env=self.node_env(name), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.nodes[name] = Node(name, process, log)

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = subprocess.run([RAY, "status", f"--address={self.address}"], env=self.node_env("head"), capture_output=True, text=True)
            if result.stdout.count("node_") >= count:
                return
            for node in self.nodes.values():
                assert node.process.poll() is None, f"node {node.name} exited: {node.log.read_text()[-2000:]}"
            time.sleep(1)
        raise TimeoutError(f"{count} nodes did not join in {timeout_s} s: {result.stdout}{result.stderr}")

    def driver(self, args: list[str], timeout_s: float = 900, **popen) -> subprocess.Popen:
        """`python <args>` as a driver on the head's machine (joins through RAY_ADDRESS)."""
        env = {**self.node_env("driver"), "RAY_ADDRESS": self.address}
        return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            if node.process.poll() is None:
                os.killpg(node.process.pid, signal.SIGTERM)
        for node in self.nodes.values():
            try:
                node.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)


def run_driver(cluster: LocalCluster, args: list[str], timeout_s: float = 900) -> str:
    """Run a driver to the end; returns its output, failing with its tail if it failed."""
    process = cluster.driver(args)
    out, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, out[-4000:]
    return out

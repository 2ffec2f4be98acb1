"""One Ray cluster of three nodes for every test here, and an S3 endpoint on loopback (moto's
server mode, as Ray's own storage tests use). Run in a pytest process of its own
(`pytest tests/multinode`): the main suite's shared local Ray would block this one's drivers."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cluster import BUCKET, LocalCluster


@pytest.fixture(scope="session")
def s3() -> dict:
    """An S3 endpoint on 127.0.0.1 with one bucket; returns the environment every node and driver gets."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)  # this process reads the bucket back too
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield env
    server.stop()


@pytest.fixture(scope="session")
def cluster(s3) -> LocalCluster:
    """Head: no CPUs (drivers, dashboard); w1 and w2: 4 CPUs each (room for a whole tiny run on
    either, so one can be lost), each unable to see the driver's directory. Submitted jobs resolve
    relative paths from STITCHVM_JOB_ROOT = that directory on the head."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a worker node's private view of the driver's directory needs root and unshare(1)")
    base = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))  # short: Ray's socket paths stay below 107 characters
    c = LocalCluster(base, gcs_port=6395, dashboard_port=8279, env={**s3, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"})
    c.env["STITCHVM_JOB_ROOT"] = str(c.driver_dir)
    try:
        c.start_head()
        c.wait_for_nodes(1)
        for n, name in enumerate(("w1", "w2"), start=1):
            c.add_worker(name, cpus=4, offset=n)
            c.wait_for_nodes(1 + n)
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)

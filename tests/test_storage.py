"""The storage rule (stitchvm_rl/storage.py): a run's files written from any node reach the driver
whole; sources in storage are downloaded once per node and checked; storage that cannot be reached,
or a value model in storage built for another backbone, is refused before Ray starts. S3 is a moto
server on loopback, as in Ray's own storage tests; the multi-node runs are in tests/multinode."""

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import load_job
from stitchvm_rl import storage
from stitchvm_rl.config import ConfigError

BUCKET = "runs"


@pytest.fixture(scope="module")
def s3():
    """An S3 endpoint on loopback with one bucket, for this module's tests."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _a_lora(tmp_path: Path) -> Path:
    lora = tmp_path / "made-on-a-worker" / "lora"
    lora.mkdir(parents=True)
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"\x01" * 1000)
    (lora / "adapter_config.json").write_text("{}")
    return lora


@pytest.mark.parametrize("where", ["shared filesystem", "s3"])
def test_what_a_worker_writes_reaches_the_driver_whole(tmp_path, s3, where):
    root = str(tmp_path / "storage") if where == "shared filesystem" else f"{s3}/{tmp_path.name}"
    files = storage.RunFiles(root, "run")
    files.append_jsonl("metrics.jsonl", {"epoch": 0})
    files.append_jsonl("metrics.jsonl", {"epoch": 1})
    files.upload_dir(_a_lora(tmp_path), "lora")
    files.upload_dir(_a_lora(tmp_path / "again"), "lora")  # replaced, not merged
    local = files.mirror(tmp_path / "driver" / "run")
    assert [json.loads(line)["epoch"] for line in (local / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert (local / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == b"\x01" * 1000
    manifest = json.loads((local / "lora" / storage.MANIFEST).read_text())
    assert sorted(manifest) == ["adapter_config.json", "pytorch_lora_weights.safetensors"]
    assert not [p for p in local.rglob("*") if ".tmp-" in p.name or p.name.endswith(".mirror")]


def test_a_storage_source_is_downloaded_once_per_node_and_checked_against_its_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("STITCHVM_CACHE", str(tmp_path / "node-cache"))
    files = storage.RunFiles(str(tmp_path / "storage"), "stitch")
    files.upload_dir(_a_lora(tmp_path), "value_model")
    source = "file://" + files.uri("value_model")
    downloads = []
    real = storage._download
    monkeypatch.setattr(storage, "_download", lambda s, t: (downloads.append(s), time.sleep(0.5), real(s, t)))  # slow: the others ask meanwhile
    copies = []
    workers = [threading.Thread(target=lambda: copies.append(storage.local_copy(source))) for _ in range(4)]  # four workers of one node at once
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(set(copies)) == 1 and downloads == [source]
    assert (Path(copies[0]) / "pytorch_lora_weights.safetensors").read_bytes() == b"\x01" * 1000
    # damaged in storage (same size, other bytes): a fresh copy is refused, the cached one kept
    stored = Path(files.uri("value_model")) / "pytorch_lora_weights.safetensors"
    stored.write_bytes(b"\x02" * 1000)
    with pytest.raises(OSError, match="truncated or corrupted"):
        storage.local_copy(source, fresh=True)
    assert (Path(copies[0]) / "pytorch_lora_weights.safetensors").read_bytes() == b"\x01" * 1000


def test_a_submitted_job_resolves_relative_paths_outside_rays_copy_of_the_working_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.job_path("outputs") == str(tmp_path / "outputs")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # what Ray's job supervisor sets for the driver
    monkeypatch.setenv("STITCHVM_JOB_ROOT", str(tmp_path / "home"))
    assert storage.job_path("outputs") == str(tmp_path / "home" / "outputs")
    assert storage.storage_root("", "outputs") == str(tmp_path / "home" / "outputs" / "ray")
    assert storage.job_path("s3://b/x") == "s3://b/x" and storage.job_path("/abs") == "/abs"


def test_storage_that_cannot_be_reached_is_refused_before_ray_starts(tmp_path, s3):
    out = tmp_path / "outputs"
    with pytest.raises(ConfigError, match="storage_path: cannot write to 's3://no-such-bucket/ray'"):
        load_job("nft").main([f"output_dir={out}", "storage_path=s3://no-such-bucket/ray"])
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="storage_path: cannot write under"):
        storage.check_reachable(str(tmp_path / "a-file" / "ray"), "storage_path")
    assert not out.exists()


def test_a_value_model_in_storage_is_checked_there_against_the_policy(tmp_path, s3):
    """Its recorded backbone is read from storage (nothing else is downloaded on the driver)."""
    vm = {"backbone": "tiny-sd3"}
    files = storage.RunFiles(f"{s3}/vm-check", "stitch")
    files.write_json("value_model/value_model.json", vm)
    out = tmp_path / "outputs"
    with pytest.raises(ConfigError, match="was stitched from backbone 'tiny-sd3' but the policy is 'toyworld'"):
        load_job("nft").main([f"output_dir={out}", f"value_models=[{files.uri('value_model')}]"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_job("nft").main([f"output_dir={out}", f"value_models=[{files.uri('nothing')}]"])
    assert not out.exists()

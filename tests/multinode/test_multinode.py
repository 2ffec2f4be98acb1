"""Runs whose learner ranks and rollout actors sit on other machines than the driver: a head with no
CPUs and two worker nodes that cannot see the driver's output directory (cluster.py). Every
artefact must reach the driver through storage -- a shared path or S3 -- and a run must survive
losing a whole worker node.

    pytest tests/multinode          # its own process; needs root (unshare -m) and ~3 minutes
"""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from safetensors.torch import load_file

from cluster import BUCKET, RAY, ROOT, run_driver

NFT = str(ROOT / "jobs" / "nft.py")
TOY_VALUE_MODEL = ROOT / "stitchvm_rl" / "assets" / "toyworld" / "value_model"
# tests/conftest.py's NFT_TINY with the async stitchvm estimator: one tiny run is ~1 minute
TINY = [
    "rollout.estimator=stitchvm", "rollout.async=true", "groups_per_epoch=2", "rollout.group_size=2", "rollout.num_steps=4",
    "rollout.stop_min=2", "rollout.stop_max=3", "rollout.lora_rank=4", "rollout.lora_alpha=8", "eval_prompts=4", "eval_every=2",
    "drift_every=0", "train.lr=1e-2",
]
COMPARED = ("loss", "loss_pos", "loss_neg", "kl", "reward_mean", "old_deviation")
RUN_FILES = ("config.yaml", "metrics.jsonl", "eval_rewards.jsonl", "summary.json", "reward_curve.png", "samples/step_00000.png", "lora/pytorch_lora_weights.safetensors")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _last_of_each_epoch(lines: list[dict]) -> dict[int, dict]:
    return {m["epoch"]: m for m in lines if m["epoch"] >= 0}  # a redone epoch's line replaces the first


def _s3_fs() -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(f"s3://{BUCKET}")[0]


def _upload_to_s3(local: Path, key: str) -> str:
    fs = _s3_fs()
    pafs.copy_files(str(local), f"{BUCKET}/{key}", destination_filesystem=fs)
    return f"s3://{BUCKET}/{key}"


def test_a_submitted_default_job_on_s3_learns_and_lands_in_the_users_directory_not_rays_copy(cluster):
    """`ray job submit --runtime-env cluster/runtime_env.yaml -- python jobs/nft.py` (the README's
    command) with a relative output_dir, storage_path on S3 and the value model read from S3: the
    run lands in $STITCHVM_JOB_ROOT/outputs/nft on the head, its last line says so, S3 holds its
    checkpoints and files, and the policy learned (the default job's learning check: 20 epochs,
    144 evaluation prompts at 0, 10 and 20)."""
    value_model = _upload_to_s3(TOY_VALUE_MODEL, "inputs/toy_value_model")
    args = [f"storage_path=s3://{BUCKET}/ray", f"value_models=[{value_model}]", "eval_prompts=144", "eval_every=10", "drift_every=10"]
    submit = [RAY, "job", "submit", f"--address={cluster.dashboard}", "--runtime-env", "cluster/runtime_env.yaml", "--", "python", "jobs/nft.py", *args]
    result = subprocess.run(submit, cwd=ROOT, env=cluster.node_env("submit"), capture_output=True, text=True, timeout=900)
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    _wait_until_finished(client)
    (job,) = client.list_jobs()
    logs = client.get_job_logs(job.submission_id)
    assert job.status == JobStatus.SUCCEEDED, logs[-3000:] + result.stderr[-2000:]
    run = cluster.driver_dir / "outputs" / "nft"
    last = [line for line in logs.splitlines() if line.startswith("wrote ")][-1]
    assert last == f"wrote {run} (and s3://{BUCKET}/ray/nft/files)", last
    fs = _s3_fs()
    stored = {i.path.removeprefix(f"{BUCKET}/ray/nft/") for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/ray/nft", recursive=True)) if i.type == pafs.FileType.File}
    assert any(p.startswith("checkpoint_") and p.endswith("checksums-rank1.json") for p in stored), sorted(stored)
    for name in RUN_FILES:
        assert f"files/{name}" in stored and (run / name).is_file(), name
    with fs.open_input_stream(f"{BUCKET}/ray/nft/files/metrics.jsonl") as f:
        assert f.read() == (run / "metrics.jsonl").read_bytes()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["estimator"] == "stitchvm" and summary["epochs"] == 20
    assert [e["global_step"] for e in summary["eval"]] == [0, 10, 20] and [d["global_step"] for d in summary["drift"]] == [10, 20]
    assert summary["eval_reward_gain"] > 2 * summary["eval_reward_gain_se"] > 0, (summary["eval_reward_gain"], summary["eval_reward_gain_se"])


def _wait_until_finished(client, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while any(not job.status.is_terminal() for job in client.list_jobs()):
        assert time.monotonic() < deadline, [(job.submission_id, job.status) for job in client.list_jobs()]
        time.sleep(2)


@pytest.fixture(scope="session")
def chained(cluster) -> dict:
    """jobs/stitch.py to the end (its stage-1 init read by the learner ranks from storage), then a
    tiny jobs/nft.py run on that value model, read from storage, for 6 epochs, then the same
    command with epochs=7 (a re-run of the run name resumes from storage): the reference of the
    node-loss run."""
    out, storage = cluster.driver_dir / "chain", cluster.shared_dir / "ray"
    small = ["search.probe_images=16", "data.num_images=64", "data.batch_size=32", "train.epochs=1", "train.batch_size=16", "eval.sigmas=[0.5]",
             "eval.prompts=2", "eval.group_size=2", "eval.mc_k=2", "eval.reference_k=2"]
    run_driver(cluster, [str(ROOT / "jobs" / "stitch.py"), f"output_dir={out}", f"storage_path={storage}", *small])
    nft = [NFT, f"output_dir={out}", f"storage_path={storage}", f"value_models=[{storage / 'stitch' / 'files' / 'value_model'}]", "run_name=chained", *TINY]
    run_driver(cluster, [*nft, "epochs=6"])
    first = _lines(out / "chained" / "metrics.jsonl")
    run_driver(cluster, [*nft, "epochs=7"])
    return {"out": out, "storage": storage, "nft": nft, "first": first, "run": out / "chained"}


def test_the_stitch_job_builds_a_value_model_in_storage_that_an_nft_run_reads_and_a_rerun_resumes(chained):
    for name in ("stitch_search.json", "summary.json", "accuracy.png", "value_model/value_model.json"):
        assert (chained["out"] / "stitch" / name).is_file(), name
    for name in ("value_model/value_model.safetensors", "init/value_model.json", "samples/index.jsonl"):  # written by tasks and workers on any node
        assert (chained["storage"] / "stitch" / "files" / name).is_file(), name
    for name in RUN_FILES:
        assert (chained["run"] / name).is_file(), name
    assert [m["epoch"] for m in chained["first"]] == [-1, 0, 1, 2, 3, 4, 5]
    lines = _lines(chained["run"] / "metrics.jsonl")
    assert [m["epoch"] for m in lines] == [-1, 0, 1, 2, 3, 4, 5, 6] and lines[-1]["resumed_from_epoch"] == 6


def test_losing_a_worker_node_mid_run_changes_nothing_in_what_the_run_learns(cluster, chained):
    """The node holding a learner rank is killed (every process at once) after epoch 0's checkpoint:
    its actors are restarted on the other node, their groups redone by live actors, and Ray Train
    restarts the learner group there from the checkpoint in storage. Metrics of every epoch and the
    final LoRA equal the uninterrupted run's."""
    out, storage = cluster.driver_dir / "lost", chained["storage"]
    earlier = _learner_ranks(cluster, alive=False)  # the chained runs' ranks may still read ALIVE for a moment after their driver ends
    driver = cluster.driver([*chained["nft"], f"output_dir={out}", "run_name=lostnode", "epochs=7"])
    victim = _wait(driver, lambda: _node_of_a_learner_rank(cluster, earlier), "learner ranks")
    # epoch 1's checkpoint being written means epoch 0's was reported; 5 epochs to go (~0.5 s each)
    _wait(driver, lambda: len(list((storage / "lostnode").glob("checkpoint_*"))) >= 2, "two checkpoints")
    cluster.nodes[victim].kill()
    output, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, output[-4000:]
    lost, reference = _last_of_each_epoch(_lines(out / "lostnode" / "metrics.jsonl")), _last_of_each_epoch(_lines(chained["run"] / "metrics.jsonl"))
    assert sorted(lost) == list(range(7)) and max(m["resumed_from_epoch"] for m in lost.values()) >= 1  # the learner group was restarted
    for epoch, m in lost.items():
        for key in COMPARED:
            assert m[key] == pytest.approx(reference[epoch][key], rel=1e-5, abs=1e-9), (epoch, key)
    mine, theirs = (load_file(run / "lora" / "pytorch_lora_weights.safetensors") for run in (out / "lostnode", chained["run"]))
    assert mine.keys() == theirs.keys() and all(torch.allclose(mine[k], theirs[k], atol=1e-6) for k in mine)


def _wait(driver, probe, what: str, timeout_s: float = 600):
    """Poll `probe()` until it returns something true, while the driver runs; returns that."""
    deadline = time.monotonic() + timeout_s
    while not (found := probe()):
        assert driver.poll() is None, f"the driver ended before {what}: " + driver.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
        time.sleep(0.05)
    return found


def _learner_ranks(cluster, alive: bool = True) -> list:
    """Ray Train's workers (RayTrainWorker actors) on the cluster: the alive ones, or every one."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive else [])
    return list_actors(address=cluster.dashboard, filters=filters, limit=1000)


def _node_of_a_learner_rank(cluster, earlier: list) -> str | None:
    """Which worker node (w1 / w2) runs a learner rank of this run (none of `earlier`), once they run."""
    from ray.util.state import list_nodes

    names = {n.node_id: next(r for r in ("w1", "w2") if r in n.resources_total) for n in list_nodes(address=cluster.dashboard) if any(r in n.resources_total for r in ("w1", "w2"))}
    old = {a.actor_id for a in earlier}
    workers = [a for a in _learner_ranks(cluster) if a.actor_id not in old]
    return names[sorted(workers, key=lambda a: a.actor_id)[0].node_id] if workers else None


def test_a_value_model_only_the_driver_has_is_refused_before_any_model_loads(cluster):
    """The driver sees the directory (and its recorded backbone matches), the worker nodes do not:
    one message names the key and the node, and no run folder is made."""
    mine = cluster.driver_dir / "inputs" / "toy_value_model"
    shutil.copytree(TOY_VALUE_MODEL, mine)
    out = cluster.driver_dir / "refused"
    process = cluster.driver([NFT, f"output_dir={out}", f"storage_path={cluster.shared_dir / 'ray'}", f"value_models=[{mine}]", "run_name=refused", *TINY])
    output, _ = process.communicate(timeout=300)
    assert process.returncode != 0
    assert f"error: value_models[0]: '{mine}' is not visible on node" in output and "every node must see it" in output, output[-2000:]
    assert "RolloutWorker" not in output and not (out / "refused").exists()


def test_an_evaluation_samples_and_scores_on_worker_nodes_into_s3(cluster):
    """jobs/evaluate.py with its actors on the worker nodes (the head has no CPUs): the images they
    write and the driver's records land in S3, and the driver's folder gets the table and grid."""
    out = cluster.driver_dir / "evaluations"
    args = [str(ROOT / "jobs" / "evaluate.py"), f"output_dir={out}", f"storage_path=s3://{BUCKET}/ray", "run_name=evaluate_mn",
            "max_prompts=2", "images_per_prompt=1", "num_steps=4", "grid_prompts=2"]
    run_driver(cluster, args)
    fs = _s3_fs()
    stored = {i.path.removeprefix(f"{BUCKET}/ray/evaluate_mn/files/") for i in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/ray/evaluate_mn/files", recursive=True))}
    assert {"images/base/0000_0.png", "images/nft/0001_0.png", "scores.jsonl", "table.json", "grid.png"} <= stored, sorted(stored)
    assert len((out / "evaluate_mn" / "scores.jsonl").read_text().splitlines()) == 4
    assert "nft - base" in (out / "evaluate_mn" / "table.md").read_text() and (out / "evaluate_mn" / "grid.png").is_file()

"""jobs/nft.py end to end on the toy world with tiny sizes: rollout actors + DeepSpeed learner in
Ray Train, adapter sync, evaluation, faults, and resume == no interruption.

Two uninterrupted baselines (conftest: session fixtures, shared with the report tests), one per mode; every resume and crash run
is compared with the baseline of its mode:
    straight          synchronous, terminal (clean anchors, tau = 0)
    straight_bridge   rollout.async, stitchvm (bridge-anchored at z_tau, trained only at t > tau)
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import NFT_TINY as TINY
from conftest import load_job
from stitchvm_rl import runtime
from stitchvm_rl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("loss", "loss_pos", "loss_neg", "kl", "reward_mean", "old_deviation")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _epochs(run: Path) -> list[dict]:
    return [m for m in _metrics(run) if m["epoch"] >= 0]


def _assert_same_training(lines: list[dict], baseline: list[dict]) -> None:
    """Every logged epoch of `lines` equals the baseline's epoch of the same number."""
    by_epoch = {m["epoch"]: m for m in baseline}
    for m in lines:
        for key in COMPARED:
            assert m[key] == pytest.approx(by_epoch[m["epoch"]][key], rel=1e-5, abs=1e-9), (m["epoch"], key)


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "lora" / "pytorch_lora_weights.safetensors")


def test_nft_job_trains_evaluates_and_exports_a_lora_diffusers_samples_from(nft_out, straight):
    lines = _metrics(nft_out / "straight")
    assert [m["epoch"] for m in lines] == [-1, 0, 1, 2, 3]  # base-policy evaluation first
    epochs = lines[1:]
    assert all(m["version_lag"] == 0 and m["world_size"] == 2 and m["rollouts_redone"] == 0 for m in epochs)
    assert all(abs(m["r_mean"] - 0.5) < 1e-6 for m in epochs)  # groups are centred
    assert epochs[0]["kl"] == 0.0 and epochs[-1]["kl"] > 0  # LoRA starts at zero, then moves away from the reference
    assert {"eval_reward_mean", "eval_caption_accuracy"} <= set(epochs[1]) and "eval_reward_mean" not in epochs[0]
    assert straight["epochs"] == 4 and straight["seconds_per_epoch"] > 0 and straight["device_hours"] > 0
    # an epoch's seconds are its own work; the evaluation every 2nd epoch is logged apart
    assert all(m["seconds_epoch"] == pytest.approx(m["seconds_wait_rollouts"] + m["seconds_train"] + m["seconds_sync"]) for m in epochs)
    assert (nft_out / "straight" / "samples" / "step_00004.png").is_file() and (nft_out / "straight" / "reward_curve.png").is_file()
    # per-image evaluation rewards (base, then every evaluation): the summary's gain and its paired standard error
    evals = [json.loads(line) for line in (nft_out / "straight" / "eval_rewards.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in evals] == [m["global_step"] for m in lines if "eval_reward_mean" in m]
    assert [sum(e["rewards"]) / len(e["rewards"]) for e in evals] == pytest.approx([m["eval_reward_mean"] for m in lines if "eval_reward_mean" in m])
    diff = torch.tensor(evals[-1]["rewards"]) - torch.tensor(evals[0]["rewards"])
    assert straight["eval_reward_gain"] == pytest.approx(diff.mean().item(), abs=1e-6)
    assert straight["eval_reward_gain_se"] == pytest.approx(diff.std().item() / len(diff) ** 0.5) and straight["eval_reward_gain_se"] > 0
    # the exported EMA adapter loads into diffusers and changes what it samples
    sample = load_job("sample")
    args = [f"output_dir={nft_out}", "prompts=[a red circle on the left, a blue square on the right]", "images_per_prompt=1", "num_steps=4", "cfg_scale=1"]
    base = sample.main([*args, "run_name=base"])
    tuned = sample.main([*args, "run_name=tuned", f"lora={nft_out / 'straight' / 'lora'}"])
    assert tuned["rewards"]["toy_clip"] != base["rewards"]["toy_clip"]


def test_a_killed_driver_is_resumed_by_running_the_same_command_again(nft_out, straight):
    """The whole driver (and the local Ray cluster it started) dies with SIGKILL after a checkpoint;
    the same command again resumes the run and ends as the uninterrupted one: same losses, same
    exported LoRA, the same wandb run, the step axis continuing."""
    args = [sys.executable, str(ROOT / "jobs" / "nft.py"), f"output_dir={nft_out}", "run_name=driver", "epochs=4", "wandb.mode=offline", "wandb.project=test", *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    in_storage, deadline = nft_out / "ray" / "driver" / "files", time.time() + 600  # the driver mirrors it only at the end
    try:
        # wait until epoch 1 is logged and its checkpoint registered (two checkpoints on storage)
        while time.time() < deadline and first.poll() is None:
            done = [m["epoch"] for m in _metrics(in_storage)] if (in_storage / "metrics.jsonl").is_file() else []
            if 1 in done and len(list((nft_out / "ray" / "driver").glob("checkpoint_*"))) >= 2:
                break
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
        first.wait()
    assert first.returncode == -signal.SIGKILL
    assert max(m["epoch"] for m in _metrics(in_storage)) < 3  # killed mid-run

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    lines = _epochs(nft_out / "driver")
    last = {m["epoch"]: m for m in lines}
    assert sorted(last) == [0, 1, 2, 3] and lines[-1]["resumed_from_epoch"] >= 1
    assert [last[e]["global_step"] for e in range(4)] == [1, 2, 3, 4]
    _assert_same_training(list(last.values()), _epochs(nft_out / "straight"))
    # the EMA adapter (what evaluation measured) is the same too
    lora, expected = _lora(nft_out / "driver"), _lora(nft_out / "straight")
    assert lora.keys() == expected.keys() and all(torch.allclose(lora[k], expected[k], atol=1e-6) for k in lora)
    ids = {m["wandb_run_id"] for m in lines}
    assert len(ids) == 1 and lines[0]["wandb_run_id"] and list((nft_out / "driver" / "wandb").glob(f"offline-run-*-{lines[0]['wandb_run_id']}"))


def test_async_bridge_run_survives_dead_rollout_actors_and_a_learner_killed_mid_checkpoint(nft_out, bridge_args, straight_bridge):
    """rollout.async + stitchvm: epoch n + 1 is sampled with v_n while epoch n trains, anchored at
    z_tau (tau > 0). Each rollout actor dies hard in its 5th call, an epoch sampled with v_1 or later
    (its lost call is redone at once by the next live actor, after this rank syncs that actor to the
    adapter the epoch was sampled with; Ray restarts the dead one, whose stale v_0 batches are redone
    too), and rank 1 dies while
    writing epoch 1's checkpoint (Ray Train restarts the group from epoch 0's; the half-written one
    was never registered): the group replays epoch 1 with the adapter it was sampled with (v_0, kept
    in the checkpoint), and every epoch equals the uninterrupted run. Then a truncated checkpoint
    file is found by its checksum."""
    straight = _epochs(nft_out / "straight_bridge")
    assert [m["version_lag"] for m in straight] == [0, 1, 1, 1]
    assert straight_bridge["estimator"] == "stitchvm" and all(m["rollouts_redone"] == 0 for m in straight)
    assert (nft_out / "straight_bridge" / "config.yaml").read_text().count("async: true") == 1
    args = ["testing.crash_on_call=5", "testing.crash_in_checkpoint=1", *TINY, *bridge_args]
    load_job("nft").main([f"output_dir={nft_out}", "run_name=bridge_crash", "epochs=4", *args])
    assert (nft_out / "bridge_crash" / ".crash-injected").is_file()
    lines = _epochs(nft_out / "bridge_crash")
    assert [m["epoch"] for m in lines] == [0, 1, 1, 2, 3] and lines[-1]["resumed_from_epoch"] == 1
    assert [m["version_lag"] for m in lines] == [0, 1, 1, 1, 1]
    assert sum(m["rollouts_redone"] for m in lines) >= 1 and all(m["samples"] == 4 for m in lines)
    _assert_same_training(lines, straight)

    checkpoints = sorted(p.parent for p in (nft_out / "ray" / "bridge_crash").rglob("checksums-rank0.json"))
    victim = max((p for p in checkpoints[-1].rglob("*") if p.is_file() and p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a torn write / a full disk
    with pytest.raises(ValueError, match="sha256 mismatch"):
        runtime.verify_checkpoint(checkpoints[-1])


def test_a_checkpoint_that_fails_its_checksum_is_never_loaded(tmp_path, monkeypatch):
    """resume_state checks the manifest before DeepSpeed reads a byte of the checkpoint."""
    import ray.train

    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"the whole file")
    (tmp_path / "checksums-rank0.json").write_text(json.dumps({"engine/mp_rank_00_model_states.pt": runtime._sha256(tmp_path / "engine" / "mp_rank_00_model_states.pt")}))
    loaded = []
    engine = type("Engine", (), {"load_checkpoint": lambda self, d, **kw: loaded.append(d) or (None, {"epoch": 3})})()
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: ray.train.Checkpoint.from_directory(str(tmp_path)))
    assert runtime.resume_epoch(engine) == 4 and len(loaded) == 1
    (tmp_path / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"the whole")  # truncated
    with pytest.raises(ValueError, match="sha256 mismatch"):
        runtime.resume_epoch(engine)
    assert len(loaded) == 1


@pytest.mark.slow
def test_a_job_asking_for_more_than_the_cluster_has_says_what_it_waits_for_and_gives_up(nft_out, capsys):
    """A GPU per rollout actor on a CPU-only cluster: within resource_wait_s the job says what it is
    waiting for, then fails with that message instead of hanging."""
    with pytest.raises(RuntimeError, match=r"gave up: waiting \d+ s for \d+ of \d+ rollout actors, each needing \{CPU: 1, GPU: 1\}"):
        load_job("nft").main([f"output_dir={nft_out}", "run_name=gpu", "rollout_gpus=1", "memory.gpu_gib=24", "resource_wait_s=2", *TINY])
    assert "waiting" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["groups_per_epoch=3"], "multiple of train.num_workers"),
        (["rollout.stop_max=10"], "stop_min <= stop_max < num_steps"),
        (["value_models=[/no/such/model]"], "does not exist"),
        (["compare=[terminal,stichvm]"], "unknown estimator"),
    ],
)
def test_inconsistent_settings_stop_before_any_work(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message):
        load_job("nft").main([f"output_dir={tmp_path}", *args])


@pytest.mark.parametrize("part", ["rollout", "train"])
def test_compile_without_a_cpp_compiler_stops_before_any_work(tmp_path, monkeypatch, part):
    from torch._inductor import exc

    def no_compiler():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match=f"{part}.compile=true on the CPU needs a C\\+\\+ compiler"):
        load_job("nft").main([f"output_dir={tmp_path}", f"{part}.compile=true"])

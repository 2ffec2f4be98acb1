"""jobs/nft.py end to end on the toy world with tiny sizes: rollout actors + DeepSpeed learner in
Ray Train, adapter sync, evaluation, and resume == no interruption."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stitchvm_rl.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = [
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
COMPARED = ("loss", "loss_pos", "loss_neg", "kl", "reward_mean", "old_deviation")


def load_job():
    return _load("nft")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_nft_job_trains_syncs_resumes_and_survives_a_dead_rollout_actor(tmp_path):
    job = load_job()
    straight = job.main([f"output_dir={tmp_path}", "run_name=straight", "epochs=4", *TINY])
    lines = _metrics(tmp_path / "straight")
    assert [m["epoch"] for m in lines] == [-1, 0, 1, 2, 3]  # base-policy evaluation first
    epochs = lines[1:]
    assert all(m["version_lag"] == 0 and m["world_size"] == 2 for m in epochs)
    assert all(abs(m["r_mean"] - 0.5) < 1e-6 for m in epochs)  # groups are centred
    assert epochs[0]["kl"] == 0.0 and epochs[-1]["kl"] > 0  # LoRA starts at zero, then moves away from the reference
    assert {"eval_reward_mean", "eval_caption_accuracy"} <= set(epochs[1]) and "eval_reward_mean" not in epochs[0]
    assert straight["epochs"] == 4 and straight["seconds_per_epoch"] > 0 and straight["device_hours"] > 0
    # an epoch's seconds are its own work; the evaluation every 2nd epoch is logged apart
    assert all(m["seconds_epoch"] == pytest.approx(m["seconds_wait_rollouts"] + m["seconds_train"] + m["seconds_sync"]) for m in epochs)
    assert (tmp_path / "straight" / "samples" / "step_00004.png").is_file() and (tmp_path / "straight" / "reward_curve.png").is_file()
    # per-image evaluation rewards (base, then every evaluation): the summary's gain and its paired standard error
    evals = [json.loads(line) for line in (tmp_path / "straight" / "eval_rewards.jsonl").read_text().splitlines()]
    assert [e["global_step"] for e in evals] == [m["global_step"] for m in lines if "eval_reward_mean" in m]
    assert [sum(e["rewards"]) / len(e["rewards"]) for e in evals] == pytest.approx([m["eval_reward_mean"] for m in lines if "eval_reward_mean" in m])
    diff = torch.tensor(evals[-1]["rewards"]) - torch.tensor(evals[0]["rewards"])
    assert straight["eval_reward_gain"] == pytest.approx(diff.mean().item(), abs=1e-6)
    assert straight["eval_reward_gain_se"] == pytest.approx(diff.std().item() / len(diff) ** 0.5) and straight["eval_reward_gain_se"] > 0

    # 2 epochs, stop, 2 more (wandb offline: the resumed run continues the same wandb run)
    offline = ["wandb.mode=offline", "wandb.project=test"]
    first = job.main([f"output_dir={tmp_path}", "run_name=resumed", "epochs=2", *offline, *TINY])
    second = job.main([f"output_dir={tmp_path}", "run_name=resumed", "epochs=4", *offline, *TINY])
    resumed = [m for m in _metrics(tmp_path / "resumed") if m["epoch"] >= 0]
    assert [m["epoch"] for m in resumed] == [0, 1, 2, 3] and resumed[-1]["resumed_from_epoch"] == 2
    for a, b in zip(epochs, resumed):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["epoch"], key)
    assert first["wandb_run_id"] and second["wandb_run_id"] == first["wandb_run_id"]
    assert list((tmp_path / "resumed" / "wandb").glob(f"offline-run-*-{first['wandb_run_id']}"))
    # the EMA adapter (what evaluation measured) is the same too, and diffusers loads it for sampling
    lora = [load_file(tmp_path / run / "lora" / "pytorch_lora_weights.safetensors") for run in ("straight", "resumed")]
    assert lora[0].keys() == lora[1].keys() and all(torch.allclose(lora[0][k], lora[1][k], atol=1e-6) for k in lora[0])
    sample = _load("sample")
    args = [f"output_dir={tmp_path}", "prompts=[a red circle on the left, a blue square on the right]", "images_per_prompt=1", "num_steps=4", "cfg_scale=1"]
    base = sample.main([*args, "run_name=base"])
    tuned = sample.main([*args, "run_name=tuned", f"lora={tmp_path / 'straight' / 'lora'}"])
    assert tuned["rewards"]["toy_clip"] != base["rewards"]["toy_clip"]

    # each rollout actor dies hard in its 2nd call; Ray restarts it and retries, the learner sees the
    # restarted actor's stale adapter and redoes those groups: same samples, same training
    job.main([f"output_dir={tmp_path}", "run_name=crashed", "epochs=2", "rollout.crash_on_call=2", *TINY])
    crashed = [m for m in _metrics(tmp_path / "crashed") if m["epoch"] >= 0]
    assert sum(m["rollouts_redone"] for m in crashed) >= 1 and all(m["samples"] == 4 for m in crashed)
    assert epochs[0]["rollouts_redone"] == 0
    for a, b in zip(epochs[:2], crashed):
        for key in ("loss", "kl", "reward_mean", "reward_std"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["epoch"], key)


def test_async_rollouts_lag_one_version_and_resume_exactly(tmp_path):
    """rollout.async: epoch n + 1 is sampled with v_n while epoch n trains; a run stopped after 2
    epochs replays epoch 2 with the adapter it would have used, so 2 + 2 == 4 straight."""
    job = load_job()
    job.main([f"output_dir={tmp_path}", "run_name=straight", "epochs=4", "rollout.async=true", *TINY])
    straight = [m for m in _metrics(tmp_path / "straight") if m["epoch"] >= 0]
    assert [m["version_lag"] for m in straight] == [0, 1, 1, 1]
    job.main([f"output_dir={tmp_path}", "run_name=resumed", "epochs=2", "rollout.async=true", *TINY])
    job.main([f"output_dir={tmp_path}", "run_name=resumed", "epochs=4", "rollout.async=true", *TINY])
    resumed = [m for m in _metrics(tmp_path / "resumed") if m["epoch"] >= 0]
    assert [m["version_lag"] for m in resumed] == [0, 1, 1, 1]
    for a, b in zip(straight, resumed):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (a["epoch"], key)
    assert (tmp_path / "straight" / "config.yaml").read_text().count("async: true") == 1


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
        load_job().main([f"output_dir={tmp_path}", *args])


def test_a_learner_killed_mid_checkpoint_resumes_from_the_previous_one_and_damage_is_refused(tmp_path):
    """Rank 1 dies hard while writing epoch 1's checkpoint: Ray Train restarts the learner group from
    epoch 0's checkpoint (the half-written one was never registered) and the run ends as an
    uninterrupted one. Then a truncated checkpoint file is found by its checksum, never loaded."""
    job = load_job()
    job.main([f"output_dir={tmp_path}", "run_name=straight", "epochs=3", *TINY])
    job.main([f"output_dir={tmp_path}", "run_name=killed", "epochs=3", "train.crash_in_checkpoint=1", *TINY])
    assert (tmp_path / "killed" / ".crash-injected").is_file()
    straight = {m["epoch"]: m for m in _metrics(tmp_path / "straight") if m["epoch"] >= 0}
    lines = [m for m in _metrics(tmp_path / "killed") if m["epoch"] >= 0]
    assert [m["epoch"] for m in lines] == [0, 1, 1, 2]  # epoch 1 ran again after the restart
    assert lines[-1]["resumed_from_epoch"] == 1
    for m in lines:
        for key in COMPARED:
            assert m[key] == pytest.approx(straight[m["epoch"]][key], rel=1e-5, abs=1e-9), (m["epoch"], key)

    checkpoints = sorted(p.parent for p in (tmp_path / "ray" / "killed").rglob("checksums-rank0.json"))
    victim = max((p for p in checkpoints[-1].rglob("*") if p.is_file() and p.suffix == ".pt"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # a torn write / a full disk
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        job.main([f"output_dir={tmp_path}", "run_name=killed", "epochs=4", "train.max_failures=0", *TINY])


def test_a_killed_driver_is_resumed_by_running_the_same_command_again(tmp_path):
    """The whole driver (and the local Ray cluster it started) dies with SIGKILL after a checkpoint;
    the same command again resumes the run: same wandb run id, the step axis continues, the run ends."""
    import os
    import signal
    import subprocess
    import time

    args = [sys.executable, str(ROOT / "jobs" / "nft.py"), f"output_dir={tmp_path}", "run_name=driver", "epochs=4", "wandb.mode=offline", "wandb.project=test", *TINY]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics, deadline = tmp_path / "driver" / "metrics.jsonl", time.time() + 600
    try:
        # wait until epoch 1 is logged and its checkpoint registered (two checkpoints on storage)
        while time.time() < deadline and first.poll() is None:
            done = [m["epoch"] for m in _metrics(tmp_path / "driver")] if metrics.is_file() else []
            if 1 in done and len(list((tmp_path / "ray" / "driver").glob("checkpoint_*"))) >= 2:
                break
            time.sleep(0.5)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and everything it started
        first.wait()
    assert first.returncode == -signal.SIGKILL
    before = _metrics(tmp_path / "driver")
    assert max(m["epoch"] for m in before) < 3  # killed mid-run

    second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    lines = [m for m in _metrics(tmp_path / "driver") if m["epoch"] >= 0]
    last = {m["epoch"]: m for m in lines}
    assert sorted(last) == [0, 1, 2, 3] and lines[-1]["resumed_from_epoch"] >= 1
    assert [last[e]["global_step"] for e in range(4)] == [1, 2, 3, 4]
    assert len({m["wandb_run_id"] for m in lines}) == 1 and lines[0]["wandb_run_id"]


@pytest.mark.parametrize("part", ["rollout", "train"])
def test_compile_without_a_cpp_compiler_stops_before_any_work(tmp_path, monkeypatch, part):
    from torch._inductor import exc

    def no_compiler():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr("torch._inductor.cpp_builder.get_cpp_compiler", no_compiler)
    with pytest.raises(ConfigError, match=f"{part}.compile=true on the CPU needs a C\\+\\+ compiler"):
        load_job().main([f"output_dir={tmp_path}", f"{part}.compile=true"])

"""The README's jobs run as users run them: a subprocess, no arguments, in a fresh directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import load_job

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args, cwd, job="sample.py", env=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_main_job_default_builds_its_value_model_and_trains(tmp_path):
    """`python jobs/nft.py` on a machine that has never built a value model (empty cache)."""
    result = run_job(cwd=tmp_path, job="nft.py", env={"STITCHVM_CACHE": str(tmp_path / "cache")}, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "outputs" / "nft"
    built = tmp_path / "cache" / "value_models" / load_job("nft").DEFAULT_VALUE_MODEL
    assert (built / "value_model" / "value_model.json").is_file()
    # fault injection is off by default: no learner of the build was killed, nothing was redone
    assert not (built / ".crash-injected").exists()
    assert json.loads((built / "summary.json").read_text())["train_metrics"]["resumed_from_epoch"] == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["estimator"] == "stitchvm" and summary["epochs"] == 20 and summary["is_toy"]
    assert [e["global_step"] for e in summary["eval"]] == [0, 5, 10, 15, 20]
    assert [d["global_step"] for d in summary["drift"]] == [5, 10, 15, 20]
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file() and (run / "reward_curve.png").is_file()
    # the default run learns: a paired gain on 288 held-out images well beyond its standard error
    # (measured: +0.115 +- 0.014), and the caption classifier agrees (no reward hacking)
    assert summary["eval_reward_gain"] > 4 * summary["eval_reward_gain_se"], (summary["eval_reward_gain"], summary["eval_reward_gain_se"])
    assert summary["eval"][-1]["eval_caption_accuracy"] > summary["eval"][0]["eval_caption_accuracy"]


def test_sample_job_default_writes_its_run_directory(tmp_path):
    result = run_job(cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / "sample"
    assert {"config.yaml", "summary.json", "samples.png"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == 36 * 4
    assert summary["caption_accuracy"]["colour"] >= 0.9 and summary["caption_accuracy"]["shape"] >= 0.6
    assert set(summary["reward_mean"]) == {"toy_clip", "colour_match"}


def test_sample_job_refuses_a_typo_before_loading_anything(tmp_path):
    result = run_job("num_stpes=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown config key 'num_stpes'; did you mean 'num_steps'?" in result.stderr
    assert not (tmp_path / "outputs").exists()

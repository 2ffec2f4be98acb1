"""The README's jobs run as users run them: a subprocess, no arguments, in a fresh directory (the main
job, jobs/nft.py, as a cluster user submits it: tests/multinode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_job(*args, cwd, job="sample.py", env=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / job), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_sample_job_default_writes_its_run_directory(tmp_path):
    result = run_job(cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "outputs" / "sample"
    assert {"config.yaml", "summary.json", "samples.png"} <= {p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["images"] == 36 * 4
    assert summary["caption_accuracy"]["colour"] >= 0.9 and summary["caption_accuracy"]["shape"] >= 0.6
    assert set(summary["reward_mean"]) == {"toy_clip", "colour_match"}


@pytest.mark.slow
def test_sample_job_refuses_a_typo_before_loading_anything(tmp_path):
    result = run_job("num_stpes=3", cwd=tmp_path)
    assert result.returncode != 0
    assert "unknown config key 'num_stpes'; did you mean 'num_steps'?" in result.stderr
    assert not (tmp_path / "outputs").exists()

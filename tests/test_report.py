"""jobs/report.py over two real (tiny, offline) toy-world runs: the numbers it reports are the runs'
own, and the speed-up follows from them."""

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stitchvm_rl import toyworld
from stitchvm_rl.report import build_wandb_report, by_estimator, load_run, speedups, time_to_reach
from stitchvm_rl.value.search import build_value_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ["groups_per_epoch=2", "rollout.group_size=2", "rollout.num_steps=4", "rollout.stop_min=2", "rollout.stop_max=3", "rollout.lora_rank=4",
        "rollout.lora_alpha=8", "eval_prompts=4", "eval_every=1", "drift_every=0", "train.lr=1e-2", "epochs=3", "wandb.mode=offline"]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    gen = torch.Generator().manual_seed(0)
    model, _ = build_value_model("toyworld", "toyworld-clip", toyworld.render(toyworld.random_captions(64, gen), gen))
    value_dir = model.save(out / "vm")
    # the comparison flag of jobs/nft.py: both estimators, everything else equal
    result = _load("nft").main([f"output_dir={out}", "run_name=cmp", "compare=[terminal,stitchvm]", f"value_models=[{value_dir}]", *TINY])
    assert [Path(d).name for d in result["run_dirs"]] == ["cmp-terminal-seed0", "cmp-stitchvm-seed0"]
    for name, estimator in (("cmp-terminal-seed0", "terminal"), ("cmp-stitchvm-seed0", "stitchvm")):
        (out / name).rename(out / estimator)  # shorter names below
    return out


def test_report_numbers_are_the_runs_own_and_the_speedup_follows(two_runs, tmp_path):
    report = _load("report").main([str(two_runs / "terminal"), str(two_runs / "stitchvm"), f"out={tmp_path / 'report'}", "wandb_project=test"])
    out = tmp_path / "report"
    assert {"report.html", "report.json", "reward_vs_seconds.png", "reward_vs_device_hours.png", "accuracy_vs_device_hours.png", "phases.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "report.json").read_text())
    for name in ("terminal", "stitchvm"):
        lines = [json.loads(line) for line in (two_runs / name / "metrics.jsonl").read_text().splitlines()]
        evals = [m for m in lines if "eval_reward_mean" in m]
        epochs = [m for m in lines if m["epoch"] >= 0]
        curve = saved["curves"][name]
        assert curve["steps"] == [m["global_step"] for m in evals] == [0, 1, 2, 3]
        assert curve["reward"] == [m["eval_reward_mean"] for m in evals]
        assert curve["caption_accuracy"] == [m["eval_caption_accuracy"] for m in evals]
        assert curve["seconds"] == pytest.approx([sum(m["seconds_epoch"] for m in epochs[:s]) for s in curve["steps"]])
        assert curve["device_hours"] == [0.0] + [m["device_hours"] for m in epochs]
        assert curve["phases"]["watch"] == pytest.approx(sum(m["seconds_watch"] for m in epochs) / len(epochs))  # evaluation, drift: apart
        assert curve["phases"]["train"] == pytest.approx(sum(m["seconds_train"] for m in epochs) / len(epochs))
    # the speed-up, recomputed by hand from the curves: first crossing of the baseline's final reward
    target = saved["curves"]["terminal"]["reward"][-1]
    assert saved["speedup"]["target_reward"] == target
    for name, row in saved["speedup"]["estimators"].items():
        c = saved["curves"][name]
        crossing = next((n for n, y in enumerate(c["reward"]) if y >= target), None)
        if crossing is None:
            assert row["seconds_to_target"] is None and row["speedup_seconds"] is None
            continue
        x = c["seconds"][crossing] if crossing == 0 else c["seconds"][crossing - 1] + (target - c["reward"][crossing - 1]) / (c["reward"][crossing] - c["reward"][crossing - 1]) * (c["seconds"][crossing] - c["seconds"][crossing - 1])
        assert row["seconds_to_target"] == pytest.approx(x)
    base = saved["speedup"]["estimators"]["terminal"]["seconds_to_target"]
    for row in saved["speedup"]["estimators"].values():  # these tiny runs need not learn: both cases
        if row["seconds_to_target"] and base:
            assert row["speedup_seconds"] == pytest.approx(base / row["seconds_to_target"])
        else:
            assert row["speedup_seconds"] is None
    assert report["baseline"] == "terminal"
    # the wandb Report of the same comparison, built offline (not saved): one run set per estimator
    assert saved["wandb_report"]["group"] == "cmp" and saved["wandb_report"]["runsets"] == ["terminal", "stitchvm"] and saved["wandb_report"]["url"] is None
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "Time to reach the baseline" in html
    # each run's paired gain over the base policy, recomputed from its per-image evaluation rewards
    for row in saved["runs"]:
        rows = {r["global_step"]: r["rewards"] for r in map(json.loads, (Path(row["dir"]) / "eval_rewards.jsonl").read_text().splitlines())}
        diff = torch.tensor(rows[max(rows)]) - torch.tensor(rows[0])
        assert row["gain"] == pytest.approx(diff.mean().item(), abs=1e-6) and row["gain_se"] == pytest.approx((diff.std() / len(diff) ** 0.5).item(), abs=1e-6)
        summary = json.loads((Path(row["dir"]) / "summary.json").read_text())
        assert (summary["eval_reward_gain"], summary["eval_reward_gain_se"]) == (row["gain"], row["gain_se"])  # the job's own figure
    assert "Gain over the base policy" in html


def test_time_to_reach_interpolates_and_seeds_average(two_runs):
    runs = [load_run(two_runs / "terminal"), load_run(two_runs / "terminal")]
    runs[1].seed, runs[1].reward = 1, [r + 0.02 for r in runs[1].reward]  # a second "seed", 0.02 better everywhere
    curve = by_estimator(runs)["terminal"]
    assert curve.seeds == [runs[0].seed, 1]
    assert curve.reward == pytest.approx([r + 0.01 for r in runs[0].reward]) and curve.reward_std == pytest.approx([0.01] * len(curve.steps))
    curve.reward, curve.seconds = [0.0, 1.0, 2.0, 3.0], [0.0, 10.0, 20.0, 30.0]
    assert time_to_reach(curve, 1.5, "seconds") == pytest.approx(15.0) and time_to_reach(curve, 9.0, "seconds") is None
    fast = dataclasses.replace(curve, reward=[0.0, 2.0, 3.0, 3.5], seconds=[0.0, 5.0, 10.0, 15.0])
    rows = speedups({"terminal": curve, "stitchvm": fast}, "terminal")["estimators"]
    assert rows["terminal"]["speedup_seconds"] == pytest.approx(1.0) and rows["stitchvm"]["speedup_seconds"] == pytest.approx(3.0)
    flat = dataclasses.replace(curve, reward=[3.0, 2.0, 1.0, 0.0])  # a baseline that never rose above its start: no speed-up to claim
    assert speedups({"terminal": flat, "stitchvm": fast}, "terminal")["estimators"]["stitchvm"]["speedup_seconds"] is None
    with pytest.raises(ValueError, match="no run of the baseline"):
        speedups({"terminal": curve}, "mc")


def test_a_folder_that_is_no_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jobs/nft.py run directory"):
        load_run(tmp_path)


def test_wandb_report_is_built_offline_with_a_run_set_per_estimator_and_its_panels():
    import wandb_workspaces.reports.v2 as wr

    report = build_wandb_report(["terminal", "stitchvm"], project="stitchvm-rl", entity="team", group="cmp")
    grid = report.blocks[-1]
    assert isinstance(grid, wr.PanelGrid) and report.project == "stitchvm-rl" and report.entity == "team"
    assert [rs.name for rs in grid.runsets] == ["terminal", "stitchvm"]
    assert all(rs.project == "stitchvm-rl" and rs.entity == "team" for rs in grid.runsets)
    assert [str(rs.filters) for rs in grid.runsets] == [f"Config(\"rollout.estimator\") == '{e}' and Metric(\"Group\") == 'cmp'" for e in ("terminal", "stitchvm")]
    lines = [p for p in grid.panels if isinstance(p, wr.LinePlot)]
    assert {(p.x, p.y[0]) for p in lines} >= {("device_hours", "eval_reward_mean"), ("Step", "eval_reward_mean"), ("device_hours", "eval_caption_accuracy")}
    assert all(p.groupby == "rollout.estimator" and p.groupby_aggfunc == "mean" for p in lines)
    assert any(isinstance(p, wr.BarPlot) for p in grid.panels) and any(isinstance(p, wr.MediaBrowser) and p.media_keys == ["eval_samples"] for p in grid.panels)


def test_the_report_page_renders_in_headless_chromium(two_runs, tmp_path):
    """Debian's chromium, as the README's test command installs it: the page loads from disk with
    no error and the screenshot shows the plots (many colours, not a blank or error page)."""
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is missing: apt-get install chromium (the README's test command does)"
    _load("report").main([str(two_runs / "terminal"), str(two_runs / "stitchvm"), f"out={tmp_path / 'report'}"])
    page, shot = tmp_path / "report" / "report.html", tmp_path / "shot.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1300,2400", f"--screenshot={shot}", "--enable-logging=stderr", "--v=0", page.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    problems = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "net::ERR" in line or "Uncaught" in line]
    assert not problems, problems
    image = Image.open(shot).convert("RGB")
    assert image.size == (1300, 2400) and len(image.getcolors(maxcolors=1 << 20) or []) > 500

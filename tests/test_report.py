"""jobs/report.py over two real (tiny, offline) toy-world runs: the numbers it reports are the runs'
own, and the speed-up follows from them."""

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from stitchvm_rl.report import build_wandb_report, by_estimator, load_run, speedups, time_to_reach

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"job_{name}", ROOT / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def two_runs(nft_out, straight, straight_bridge, tmp_path_factory):
    """The session's two NFT baselines (conftest), as <dir>/terminal and <dir>/stitchvm."""
    out = tmp_path_factory.mktemp("runs")
    for name, estimator in (("straight", "terminal"), ("straight_bridge", "stitchvm")):
        (out / estimator).symlink_to(nft_out / name, target_is_directory=True)
    return out


def test_compare_trains_every_estimator_and_seed_with_everything_else_equal(tmp_path, monkeypatch):
    """compare x seeds: one run each, named <run>-<estimator>-seed<seed>, one wandb group."""
    job = _load("nft")
    calls = []
    monkeypatch.setattr(job, "train_one", lambda cfg: calls.append(cfg) or {"estimator": cfg.rollout.estimator})
    result = job.main([f"output_dir={tmp_path}", "run_name=cmp", "compare=[terminal,tweedie]", "seeds=[0,3]", "epochs=2", "rollout.estimator=mc"])
    assert [(c.run_name, c.rollout.estimator, c.seed) for c in calls] == [
        ("cmp-terminal-seed0", "terminal", 0), ("cmp-terminal-seed3", "terminal", 3), ("cmp-tweedie-seed0", "tweedie", 0), ("cmp-tweedie-seed3", "tweedie", 3),
    ]
    assert all(c.wandb.group == "cmp" and c.epochs == 2 and not c.compare and not c.seeds for c in calls)
    assert [Path(d).name for d in result["run_dirs"]] == [c.run_name for c in calls]


def _evaluation_dir(tmp_path) -> tuple[Path, dict]:
    """A jobs/evaluate.py run's table files, made from records as the job makes them."""
    from stitchvm_rl.evaluation import results

    records = [{"policy": p, "index": i, "category": "", "scores": {"toy_clip": [v + i / 10, v + i / 5]}} for p, v in (("base", 0.5), ("nft", 0.7)) for i in range(3)]
    table = results.build_table(records, ["base", "nft"], ["toy_clip"])
    folder = tmp_path / "evaluate"
    folder.mkdir()
    (folder / "table.json").write_text(json.dumps(table))
    (folder / "table.md").write_text(results.to_markdown(table, ["toy_clip"], "toyworld"))
    return folder, table


def test_report_numbers_are_the_runs_own_and_the_speedup_follows(two_runs, tmp_path):
    evaluation, table = _evaluation_dir(tmp_path)
    report = _load("report").main([str(two_runs / "terminal"), str(two_runs / "stitchvm"), f"out={tmp_path / 'report'}", "wandb_project=test", f"evaluations=[{evaluation}]"])
    out = tmp_path / "report"
    assert {"report.html", "report.json", "reward_vs_seconds.png", "reward_vs_device_hours.png", "accuracy_vs_device_hours.png", "phases.png"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "report.json").read_text())
    for name in ("terminal", "stitchvm"):
        lines = [json.loads(line) for line in (two_runs / name / "metrics.jsonl").read_text().splitlines()]
        evals = [m for m in lines if "eval_reward_mean" in m]
        epochs = [m for m in lines if m["epoch"] >= 0]
        curve = saved["curves"][name]
        assert curve["steps"] == [m["global_step"] for m in evals] == [0, 2, 4]
        assert curve["reward"] == [m["eval_reward_mean"] for m in evals]
        assert curve["caption_accuracy"] == [m["eval_caption_accuracy"] for m in evals]
        assert curve["seconds"] == pytest.approx([sum(m["seconds_epoch"] for m in epochs[:s]) for s in curve["steps"]])
        assert curve["device_hours"] == [0.0] + [epochs[step - 1]["device_hours"] for step in curve["steps"][1:]]
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
    assert saved["wandb_report"]["group"] == "terminal" and saved["wandb_report"]["runsets"] == ["terminal", "stitchvm"] and saved["wandb_report"]["url"] is None
    html = (out / "report.html").read_text()
    # the evaluation's table beside the curves (and as a markdown block of the wandb report)
    assert saved["evaluations"]["evaluate"] == table and saved["wandb_report"]["tables"] == 1
    assert "<td>nft - base</td><td>+0.2000 ± 0.0000</td>" in html and "<td>base</td><td>0.6500 ± 0.0866</td>" in html
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
    with pytest.raises(FileNotFoundError, match="not a jobs/nft.py or jobs/draft.py run directory"):
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
    with_table = build_wandb_report(["terminal"], project="p", entity="e", group="g", tables=["| policy | toy_clip |"])
    assert isinstance(with_table.blocks[-1], wr.MarkdownBlock) and with_table.blocks[-1].text == "| policy | toy_clip |"


def test_the_report_page_is_self_contained_and_every_plot_decodes(two_runs, tmp_path):
    """report.html opens from disk anywhere: well-formed, no external reference, and every embedded
    plot is a real picture (many colours, not a blank one)."""
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.open, self.images, self.links = [], [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag not in ("meta", "img", "br", "hr"):
                self.open.append(tag)
            if tag == "img":
                self.images.append(attrs["src"])
            self.links += [attrs[k] for k in ("href", "src") if k in attrs and not attrs[k].startswith("data:")]

        def handle_endtag(self, tag):
            assert self.open and self.open.pop() == tag, (tag, self.open)

    _load("report").main([str(two_runs / "terminal"), str(two_runs / "stitchvm"), f"out={tmp_path / 'report'}"])
    page = Page()
    page.feed((tmp_path / "report" / "report.html").read_text())
    assert page.open == [] and page.links == []
    assert len(page.images) >= 4
    for src in page.images:
        image = Image.open(io.BytesIO(base64.b64decode(src.removeprefix("data:image/png;base64,")))).convert("RGB")
        assert image.width > 300 and len(image.getcolors(maxcolors=1 << 20) or []) > 100

"""The numbers of a StitchVM-vs-baseline report, read from jobs/nft.py or jobs/draft.py run directories.

    run dir (config.yaml + metrics.jsonl) --load_run--> Run (estimator, seed, evaluation curve)
    runs --by_estimator--> mean and spread over seeds at each evaluation step
    curves --time_to_reach--> seconds / device-hours until the baseline's final reward is reached

Time at step s is the sum of the first s epochs' `seconds_epoch` (the epochs' own work: sample,
score, train, sync; the evaluation and drift checks are apart in `seconds_watch`); device-hours come
from the run's own cumulative `device_hours` (the same work).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PHASES = ("sample", "score", "train", "sync", "watch")


@dataclass
class Run:
    """One jobs/nft.py or jobs/draft.py run: its evaluation curve and mean seconds per phase."""

    path: Path
    name: str
    estimator: str
    seed: int
    steps: list[int] = field(default_factory=list)  # optimizer steps of the evaluations (0 = base policy)
    seconds: list[float] = field(default_factory=list)  # seconds of epoch work (evaluation excluded) at those steps
    device_hours: list[float] = field(default_factory=list)
    reward: list[float] = field(default_factory=list)
    caption_accuracy: list[float | None] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # mean seconds per epoch
    gain: float | None = None  # last evaluation's reward minus the base policy's, paired per image
    gain_se: float | None = None  # its standard error


def load_run(path: str | Path) -> Run:
    """Read a run directory; refuse one that is not a finished jobs/nft.py or jobs/draft.py run."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file() or not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"'{path}' is not a jobs/nft.py or jobs/draft.py run directory (it needs config.yaml and metrics.jsonl)")
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = {m["epoch"]: m for m in lines if m["epoch"] >= 0}
    if not epochs:
        raise ValueError(f"run '{path}' has no finished epoch yet")
    method = cfg["rollout"] if "rollout" in cfg else cfg["draft"]  # the section naming the estimator: NFT's rollouts, DRaFT's own
    run = Run(path, path.name, method["estimator"], int(cfg["seed"]))
    elapsed, hours = {0: 0.0}, {0: 0.0}
    for epoch in sorted(epochs):
        elapsed[epoch + 1] = elapsed[epoch] + epochs[epoch]["seconds_epoch"]
        hours[epoch + 1] = epochs[epoch]["device_hours"]
    for m in lines:
        if "eval_reward_mean" in m:
            step = m["global_step"]
            run.steps.append(step)
            run.seconds.append(elapsed[step])
            run.device_hours.append(hours[step])
            run.reward.append(m["eval_reward_mean"])
            run.caption_accuracy.append(m.get("eval_caption_accuracy"))
    run.phases = _phases(list(epochs.values()))
    run.gain, run.gain_se = paired_gain(path / "eval_rewards.jsonl")
    return run


def paired_gain(path: Path) -> tuple[float | None, float | None]:
    """(mean, standard error) of the evaluation reward's gain over the base policy: the last and the
    first evaluation score the same prompts from the same noise, so their per-image differences are
    paired. The prompts are the evaluation's fixed set (for the toy world, every caption), so images
    count as independent given their prompt. (None, None) without two comparable evaluations."""
    if not path.is_file():
        return None, None
    by_step = {r["global_step"]: r["rewards"] for r in map(json.loads, path.read_text().splitlines())}  # a replayed step: the last
    if 0 not in by_step or len(by_step) < 2 or len(by_step[0]) < 2 or len(by_step[max(by_step)]) != len(by_step[0]):
        return None, None  # e.g. eval_prompts changed between a run and its resume
    diff = [a - b for a, b in zip(by_step[max(by_step)], by_step[0])]
    return statistics.fmean(diff), statistics.stdev(diff) / len(diff) ** 0.5


def _phases(epochs: list[dict]) -> dict[str, float]:
    """Mean seconds per epoch: the learner's wait for rollouts split into sampling and scoring in the
    proportion the actors report, then training, sync, and the watching (evaluation, drift checks).
    A DRaFT epoch samples inside its training step: all of it is training."""
    n = len(epochs)
    if "seconds_wait_rollouts" not in epochs[0]:
        return {"sample": 0.0, "score": 0.0, "train": sum(m["seconds_epoch"] for m in epochs) / n, "sync": 0.0, "watch": 0.0}
    wait = sum(m["seconds_wait_rollouts"] for m in epochs) / n
    sample = sum(m["actor_seconds_sample"] for m in epochs)
    score = sum(m["actor_seconds_score"] for m in epochs)
    share = sample / (sample + score) if sample + score > 0 else 1.0
    train = sum(m["seconds_train"] for m in epochs) / n
    sync = sum(m["seconds_sync"] for m in epochs) / n
    watch = sum(m.get("seconds_watch", 0.0) for m in epochs) / n  # runs from before it was logged: 0
    return {"sample": wait * share, "score": wait * (1 - share), "train": train, "sync": sync, "watch": watch}


@dataclass
class Curve:
    """One estimator's evaluation curve: mean and spread (population std) over its seeds."""

    estimator: str
    seeds: list[int]
    steps: list[int]
    seconds: list[float]
    device_hours: list[float]
    reward: list[float]
    reward_std: list[float]
    caption_accuracy: list[float | None]
    phases: dict[str, float]


def by_estimator(runs: list[Run]) -> dict[str, Curve]:
    """Average the runs of each estimator at the evaluation steps they all share."""
    curves = {}
    for estimator in dict.fromkeys(r.estimator for r in runs):
        group = [r for r in runs if r.estimator == estimator]
        steps = sorted(set.intersection(*(set(r.steps) for r in group)))
        at = [{s: i for i, s in enumerate(r.steps)} for r in group]

        def mean(attr, group=group, at=at):
            return [statistics.fmean(getattr(r, attr)[a[s]] for r, a in zip(group, at)) for s in steps]

        curves[estimator] = Curve(
            estimator,
            [r.seed for r in group],
            steps,
            mean("seconds"),
            mean("device_hours"),
            mean("reward"),
            [statistics.pstdev(r.reward[a[s]] for r, a in zip(group, at)) for s in steps],
            _mean_accuracy(group, at, steps),
            {p: statistics.fmean(r.phases[p] for r in group) for p in PHASES},
        )
    return curves


def _mean_accuracy(group: list[Run], at: list[dict], steps: list[int]) -> list[float | None]:
    """Caption accuracy averaged over seeds (None where a run has none: not toy-world prompts)."""
    out = []
    for s in steps:
        values = [r.caption_accuracy[a[s]] for r, a in zip(group, at)]
        out.append(None if any(v is None for v in values) else statistics.fmean(values))
    return out


def time_to_reach(curve: Curve, target: float, axis: str) -> float | None:
    """First time (`axis`: seconds or device_hours) the mean evaluation reward reaches `target`,
    interpolated linearly between evaluations; None if it never does."""
    xs = getattr(curve, axis)
    for n, (x, y) in enumerate(zip(xs, curve.reward)):
        if y >= target:
            if n == 0:
                return x
            x0, y0 = xs[n - 1], curve.reward[n - 1]
            return x0 + (target - y0) / (y - y0) * (x - x0)
    return None


def speedups(curves: dict[str, Curve], baseline: str) -> dict:
    """Time for each estimator to reach the baseline's final evaluation reward, and the baseline's
    time divided by it (> 1: faster than the baseline), in seconds and in device-hours."""
    if baseline not in curves:
        raise ValueError(f"no run of the baseline estimator '{baseline}' among {sorted(curves)}; pass its run directory too")
    target = curves[baseline].reward[-1]
    out = {"target_reward": target, "estimators": {}}
    for name, curve in curves.items():
        row = {}
        for axis in ("seconds", "device_hours"):
            mine, base = time_to_reach(curve, target, axis), time_to_reach(curves[baseline], target, axis)
            row[f"{axis}_to_target"] = mine
            # None when either never gets there, or the baseline never rose above its start (time 0)
            row[f"speedup_{axis}"] = base / mine if mine and base else None
        out["estimators"][name] = row
    return out


def build_wandb_report(estimators: list[str], project: str, entity: str, group: str, baseline: str = "terminal", tables: list[str] | None = None):
    """A wandb Report (wandb-workspaces) of one comparison group: a run set per estimator (filtered
    by the run config's `rollout.estimator` and the wandb group), evaluation reward and caption
    accuracy against device-hours and step (seeds averaged, spread shaded), seconds per phase, the
    evaluation sample grids, then `tables` (jobs/evaluate.py's table.md, one markdown block each).
    Built without network; `report.save()` publishes it (online only)."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces import expr

    runsets = [
        wr.Runset(entity=entity, project=project, name=estimator, filters=[expr.Config("rollout.estimator") == estimator, expr.Metric("Group") == group])
        for estimator in estimators
    ]

    def line(y: str, x: str, title: str):
        return wr.LinePlot(title=title, x=x, y=[y], groupby="rollout.estimator", groupby_aggfunc="mean", groupby_rangefunc="stddev")

    panels = [
        line("eval_reward_mean", "device_hours", "evaluation reward vs device-hours"),
        line("eval_reward_mean", "Step", "evaluation reward vs optimizer step"),
        line("eval_caption_accuracy", "device_hours", "held-out caption accuracy vs device-hours"),
        wr.BarPlot(title="seconds per phase", metrics=["seconds_wait_rollouts", "seconds_train", "seconds_sync"], groupby="rollout.estimator"),
        line("drift_spearman", "Step", "value drift: estimator vs terminal reward (Spearman)"),
        wr.MediaBrowser(title="evaluation samples", media_keys=["eval_samples"]),
    ]
    return wr.Report(
        project=project,
        entity=entity,
        title=f"StitchVM vs the Monte Carlo baseline ({group})",
        description=f"Estimators {', '.join(estimators)}; baseline '{baseline}'. Built by jobs/report.py.",
        blocks=[
            wr.H1("StitchVM vs the Monte Carlo baseline"),
            wr.P(f"Runs of wandb group '{group}', one run set per estimator."),
            wr.PanelGrid(runsets=runsets, panels=panels),
            *[wr.MarkdownBlock(text=table) for table in tables or []],
        ],
    )

"""What the training jobs' drivers share (jobs/nft.py, jobs/draft.py): the sources the workers load,
the paths every node must see, the runs of a comparison, and a finished run's reward curve and summary."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from stitchvm_rl import rewards, storage
from stitchvm_rl.report import paired_gain


def worker_sources(backbone: str, reward_weights: dict[str, float], reward_sources: dict[str, str]) -> dict:
    """The backbone and every used published reward's source as the workers get them (a toy backbone's
    tiny GenEval detector and ImageReward included): relative paths made absolute on the driver
    (`storage.local_source`), so that each node looks for the same path (and
    `runtime.check_every_node_sees` can check it is there)."""
    from stitchvm_rl.evaluation.scorers import default_sources

    used = rewards.weight_sources(reward_weights, default_sources(backbone, reward_sources))
    return {"backbone": storage.local_source(backbone), "reward_sources": {k: storage.local_source(v) for k, v in used.items()}}


def paths_every_node_needs(sources: dict, value_models: list[str], storage_marker: str) -> dict[str, str]:
    """{config key: path or URI} of everything a worker reads from a path: storage, and the backbone,
    value models and reward weights (`worker_sources`) that are paths or URIs."""
    named = {"backbone": sources["backbone"]} | {f"value_models[{n}]": d for n, d in enumerate(value_models)}
    named |= {f"reward_sources.{k}": v for k, v in sources["reward_sources"].items()}
    return {"storage_path": storage_marker} | {k: v for k, v in named.items() if storage.is_located(v)}


def comparison_runs(cfg, estimators: list[str], with_estimator) -> dict[str, object]:
    """{run name: config} of a comparison: every (estimator, seed) with everything else equal, named
    <run_name>-<estimator>-seed<seed>, one wandb group; `with_estimator(cfg, estimator)` sets it."""
    runs = {}
    for estimator in estimators:
        for seed in cfg.seeds or [cfg.seed]:
            name = f"{cfg.run_name}-{estimator}-seed{seed}"
            one = dataclasses.replace(cfg, run_name=name, seed=seed, compare=[], seeds=[], wandb=dataclasses.replace(cfg.wandb, group=cfg.wandb.group or cfg.run_name))
            runs[name] = with_estimator(one, estimator)
    return runs


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def run_summary(run: Path, metrics: list[dict]) -> dict:
    """What every training summary says: time, device-hours, the last epoch, every evaluation and
    the paired gain of the last one over the base policy (with its standard error)."""
    epochs = [m for m in metrics if m["epoch"] >= 0]
    evals = [m for m in metrics if "eval_reward_mean" in m]
    gain, gain_se = paired_gain(run / "eval_rewards.jsonl")
    return {
        "seconds_per_epoch": sum(m["seconds_epoch"] for m in epochs) / len(epochs),
        "device_hours": epochs[-1]["device_hours"],
        "final": epochs[-1],
        "eval": [{k: m[k] for k in m if k.startswith("eval_") or k in ("epoch", "global_step", "device_hours")} for m in evals],
        "eval_reward_gain": gain,
        "eval_reward_gain_se": gain_se,
        "lora": str(run / "lora"),
        "wandb_run_id": epochs[-1]["wandb_run_id"],
    }


def plot_rewards(metrics: list[dict], path: Path, title: str, train_key: str, train_label: str) -> None:
    """The training signal (per epoch) and the evaluation reward (clean, EMA) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [m for m in metrics if m["epoch"] >= 0]
    evals = [m for m in metrics if "eval_reward_mean" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([m["global_step"] for m in epochs], [m[train_key] for m in epochs], alpha=0.6, label=train_label)
    ax.plot([m["global_step"] for m in evals], [m["eval_reward_mean"] for m in evals], marker="o", label="evaluation reward (EMA, ODE)")
    ax.set(xlabel="optimizer step", ylabel="reward", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def finish_summary(run, files, summary: dict, metrics: list[dict], title: str, train_key: str, train_label: str) -> dict:
    """Write the reward curve and summary.json into the run directory and storage; print the summary."""
    plot_rewards(metrics, run.path / "reward_curve.png", title, train_key, train_label)
    run.write_json("summary.json", summary)
    for name in ("reward_curve.png", "summary.json"):  # storage holds the whole run too
        files.upload_file(run.path / name, name)
    print(json.dumps({k: v for k, v in summary.items() if k != "final"}, indent=1))
    print(f"wrote {run.path} (and {files.root})")
    return summary

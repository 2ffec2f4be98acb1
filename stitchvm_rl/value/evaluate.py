"""Value accuracy against noise level: StitchVM vs Tweedie vs Monte Carlo, on policy rollouts.

For each sigma: groups of `group_size` ODE rollouts per prompt are stopped at z_sigma; the three
early-stopped estimators of `stitchvm_rl.estimators` are compared with a reference, the mean
terminal reward of `reference_k` independent SDE completions. Within-group Spearman is what
advantage estimation needs (it ranks samples of one prompt).

Each noise level is one Ray task placed by `num_gpus`/`num_cpus` (independent seeds per level, so
the levels run side by side on as many GPUs); the value model is read from where every node sees it.
The budget: prompts x group_size rollouts per level, reference_k completions of each, mc_k more for
the mc estimator -- (reference_k + mc_k) x prompts x group_size decodes a level.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from stitchvm_rl import rewards, toyworld, zoo
from stitchvm_rl.config import Range
from stitchvm_rl.costs import count_flops
from stitchvm_rl.estimators import EARLY_STOPPED, Estimators
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.stats import pearson, spearman


@dataclass
class ValueEvalConfig:
    """How value accuracy is measured."""

    sigmas: list[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 0.9])
    """Noise levels at which rollouts are stopped."""
    prompts: Annotated[int, Range(1)] = 8
    """Prompts (toy captions unless `prompt_list` is set)."""
    prompt_list: list[str] = field(default_factory=list)
    """Explicit evaluation prompts."""
    group_size: Annotated[int, Range(2)] = 8
    """Rollouts per prompt and noise level (Spearman is computed within these groups)."""
    mc_k: Annotated[int, Range(1)] = 4
    """Stochastic completions per Monte Carlo estimate."""
    reference_k: Annotated[int, Range(1)] = 16
    """Independent completions behind the reference value."""
    steps: Annotated[int, Range(2)] = 20
    """Steps of the full sampling schedule (rollouts and completions follow it)."""
    cfg_scale: Annotated[float, Range(1)] = 1.0
    """CFG of rollouts and completions (1: CFG-free, as DiffusionNFT samples)."""
    noise_level: Annotated[float, Range(0)] = 0.7
    """Flow-SDE noise level of the completions."""
    batch_size: Annotated[int, Range(1)] = 256
    """Latents per transformer pass."""
    decode_batch_size: Annotated[int, Range(1)] = 16
    """Latents per VAE decode + reward (a decode at 1024^2 keeps ~1.5 GiB an image)."""
    num_gpus: Annotated[float, Range(0)] = 0.0
    """GPUs of each noise level's task (1 at real scale)."""
    num_cpus: Annotated[float, Range(0)] = 1.0
    """CPUs of each noise level's task."""


def agreement(estimate: torch.Tensor, reference: torch.Tensor, groups: int) -> dict:
    """Spearman within each prompt's group (averaged) and pooled, Pearson and MSE."""
    within = [spearman(e, r) for e, r in zip(estimate.view(groups, -1), reference.view(groups, -1))]
    return {
        "spearman_within": sum(within) / len(within),
        "spearman_pooled": spearman(estimate, reference),
        "pearson": pearson(estimate, reference),
        "mse": float(((estimate - reference) ** 2).mean()),
    }


def evaluate_value_accuracy(value_dir: str, cfg: ValueEvalConfig, analytic_reward: str = "", seed: int = 0) -> dict:
    """Run the comparison, one Ray task per noise level; returns {"table": [...per sigma and
    estimator...], "cost": {...}}. `value_dir`: a path every node sees or a storage URI."""
    import ray

    from stitchvm_rl import runtime

    task = ray.remote(num_gpus=cfg.num_gpus, num_cpus=cfg.num_cpus)(_accuracy_at)
    refs = [task.remote(value_dir, cfg, analytic_reward, seed, n) for n in range(len(cfg.sigmas))]
    runtime.wait_for_placement(refs, "value-accuracy tasks", {"CPU": cfg.num_cpus, "GPU": cfg.num_gpus}, timeout_s=0)
    levels = ray.get(refs)
    groups = len(cfg.prompt_list or toyworld.CAPTIONS[: cfg.prompts])
    estimates = groups * cfg.group_size * len(cfg.sigmas)
    cost = {
        name: {
            "seconds_per_estimate": sum(level["seconds"][name] for level in levels) / estimates,
            "flops_per_estimate_at_mid_sigma": levels[len(levels) // 2]["flops"][name],
        }
        for name in EARLY_STOPPED
    }
    return {"table": [row for level in levels for row in level["rows"]], "cost": cost,
            "config": {"prompts": groups, "group_size": cfg.group_size, "mc_k": cfg.mc_k, "reference_k": cfg.reference_k}}


def _accuracy_at(value_dir: str, cfg: ValueEvalConfig, analytic_reward: str, seed: int, n: int) -> dict:
    """One noise level (`cfg.sigmas[n]`), in a Ray task: rollouts stopped there, the reference value,
    each estimator's agreement with it, its seconds and the FLOPs of one estimate."""
    from stitchvm_rl.value.model import StitchedValueModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"  # as the rollout actors score
    value_model = StitchedValueModel.from_pretrained(value_dir, device=device, dtype=dtype)
    policy = SD3Policy.from_pretrained(value_model.config.backbone, dtype=dtype, device=device)
    if analytic_reward:
        reward = rewards.ANALYTIC[analytic_reward]
    else:
        reward = rewards.CLIPScore(zoo.load_clip(value_model.config.reward_model, device=device), scale=value_model.config.score_scale)
    est = Estimators(policy, value_model, reward, cfg.steps, cfg.cfg_scale, cfg.noise_level, cfg.batch_size, cfg.decode_batch_size)
    base = cfg.prompt_list or toyworld.CAPTIONS[: cfg.prompts]
    prompts = [p for p in base for _ in range(cfg.group_size)]
    sigma = cfg.sigmas[n]
    z = est.rollouts_to(sigma, prompts, seed + n)
    reference = est.completions(z, sigma, prompts, cfg.reference_k, seed=10_000 + n)
    rows, seconds = [], {}
    for name in EARLY_STOPPED:
        mark = time.perf_counter()
        value = est.score(name, z, sigma, prompts, cfg.mc_k, seed=20_000 + n)
        seconds[name] = time.perf_counter() - mark
        rows.append({"sigma": sigma, "estimator": name, **agreement(value, reference, len(base))})
    flops = {name: count_flops(lambda name=name: est.score(name, z[:1], sigma, prompts[:1], cfg.mc_k, seed=0)) for name in EARLY_STOPPED}
    return {"rows": rows, "seconds": seconds, "flops": flops}


def plot_accuracy(accuracy: dict, path: Path) -> None:
    """Within-group Spearman and MSE against sigma, one line per estimator, plus cost per estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in EARLY_STOPPED:
        rows = [r for r in accuracy["table"] if r["estimator"] == name]
        sig = [r["sigma"] for r in rows]
        axes[0].plot(sig, [r["spearman_within"] for r in rows], marker="o", label=name)
        axes[1].plot(sig, [r["mse"] for r in rows], marker="o", label=name)
    axes[0].set(xlabel="sigma (noise level)", ylabel="Spearman within prompt groups", title="ranking accuracy vs reference value")
    axes[1].set(xlabel="sigma (noise level)", ylabel="MSE", yscale="log", title="error vs reference value")
    cost = accuracy["cost"]
    axes[2].bar(list(cost), [cost[n]["flops_per_estimate_at_mid_sigma"] for n in cost], color=["C0", "C1", "C2"])
    axes[2].set(yscale="log", ylabel="FLOPs per estimate", title="cost of one estimate")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Value accuracy against noise level: StitchVM vs Tweedie vs Monte Carlo, on policy rollouts.

For each sigma: groups of `group_size` ODE rollouts per prompt are stopped at z_sigma; three
estimators of E[r(z0) | z_sigma] are compared with a reference, the mean terminal reward of
`reference_k` independent SDE completions:
    stitchvm  V(z_sigma)                             (head blocks + stitch + tail; no decode)
    tweedie   r(Dec(z_sigma - sigma v))              (one transformer pass, decode, reward)
    mc        mean of r over `mc_k` SDE completions  (mc_k x remaining steps, decodes, rewards)
Within-group Spearman is what advantage estimation needs (it ranks samples of one prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import torch

from stitchvm_rl import flow, rewards, toyworld, zoo
from stitchvm_rl.config import Range
from stitchvm_rl.costs import count_flops
from stitchvm_rl.policy import SD3Policy

ESTIMATORS = ("stitchvm", "tweedie", "mc")


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
    """Latents per forward batch."""


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = (a.norm() * b.norm()).item()
    return float((a * b).sum().item() / denom) if denom > 0 else 0.0


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(ranks(a), ranks(b))


def agreement(estimate: torch.Tensor, reference: torch.Tensor, groups: int) -> dict:
    """Spearman within each prompt's group (averaged) and pooled, Pearson and MSE."""
    within = [spearman(e, r) for e, r in zip(estimate.view(groups, -1), reference.view(groups, -1))]
    return {
        "spearman_within": sum(within) / len(within),
        "spearman_pooled": spearman(estimate, reference),
        "pearson": pearson(estimate, reference),
        "mse": float(((estimate - reference) ** 2).mean()),
    }


class Estimators:
    """The three value estimators over one policy, one value model and one clean reward."""

    def __init__(self, policy: SD3Policy, value_model, reward, cfg: ValueEvalConfig):
        self.policy, self.value_model, self.reward, self.cfg = policy, value_model, reward, cfg
        self.schedule = flow.sd3_sigmas(cfg.steps, scheduler_config=policy.pipe.scheduler.config)

    def _batched(self, fn, z: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        b = self.cfg.batch_size
        return torch.cat([fn(z[i : i + b], prompts[i : i + b]) for i in range(0, len(z), b)])

    @torch.no_grad()
    def stitchvm(self, z: torch.Tensor, sigma: float, prompts: list[str]) -> torch.Tensor:
        def one(zz, pp):
            return self.value_model(zz, torch.full((len(zz),), sigma), pp, cond=self.policy.encode_prompts(pp)).float().cpu()

        return self._batched(one, z, prompts)

    @torch.no_grad()
    def tweedie(self, z: torch.Tensor, sigma: float, prompts: list[str]) -> torch.Tensor:
        def one(zz, pp):
            t = torch.full((len(zz),), sigma)
            v = self.policy.velocity(zz, t, self.policy.encode_prompts(pp), self.cfg.cfg_scale)
            return self.reward(self.policy.decode(flow.tweedie_x0(zz, sigma, v)), pp).float().cpu()

        return self._batched(one, z, prompts)

    @torch.no_grad()
    def completions(self, z: torch.Tensor, sigma: float, prompts: list[str], k: int, seed: int) -> torch.Tensor:
        """Mean terminal reward of k SDE completions from each latent."""
        rest = torch.cat([torch.tensor([sigma]), self.schedule[self.schedule < sigma]])
        zk, pk = z.repeat_interleave(k, 0), [p for p in prompts for _ in range(k)]
        gen = torch.Generator().manual_seed(seed)

        def one(zz, pp):
            fn = self.policy.velocity_fn(self.policy.encode_prompts(pp), self.cfg.cfg_scale)
            z0 = flow.flow_sde(fn, zz, rest, noise_level=self.cfg.noise_level, generator=gen).final
            return self.reward(self.policy.decode(z0), pp).float().cpu()

        return self._batched(one, zk, pk).view(len(z), k).mean(1)

    @torch.no_grad()
    def rollouts_to(self, sigma: float, prompts: list[str], seed: int) -> torch.Tensor:
        """ODE (DPM-2) rollouts from pure noise that stop exactly at `sigma`."""
        path = torch.cat([self.schedule[self.schedule > sigma], torch.tensor([sigma])])
        noise = self.policy.initial_noise(len(prompts), torch.Generator().manual_seed(seed))
        fn = self.policy.velocity_fn(self.policy.encode_prompts(prompts), self.cfg.cfg_scale)
        return flow.dpm2(fn, noise, path).final


def evaluate_value_accuracy(value_dir: str | Path, cfg: ValueEvalConfig, analytic_reward: str = "", seed: int = 0) -> dict:
    """Run the comparison; returns {"table": [...per sigma and estimator...], "cost": {...}}."""
    from stitchvm_rl.value.model import StitchedValueModel

    value_model = StitchedValueModel.from_pretrained(value_dir)
    policy = SD3Policy.from_pretrained(value_model.config.backbone)
    if analytic_reward:
        reward = rewards.ANALYTIC[analytic_reward]
    else:
        reward = rewards.CLIPScore(zoo.load_clip(value_model.config.reward_model), scale=value_model.config.score_scale)
    est = Estimators(policy, value_model, reward, cfg)
    base = cfg.prompt_list or toyworld.CAPTIONS[: cfg.prompts]
    prompts = [p for p in base for _ in range(cfg.group_size)]
    table, seconds = [], {name: 0.0 for name in ESTIMATORS}
    for n, sigma in enumerate(cfg.sigmas):
        z = est.rollouts_to(sigma, prompts, seed + n)
        reference = est.completions(z, sigma, prompts, cfg.reference_k, seed=10_000 + n)
        values = {}
        for name in ESTIMATORS:
            mark = time.perf_counter()
            if name == "mc":
                values[name] = est.completions(z, sigma, prompts, cfg.mc_k, seed=20_000 + n)
            else:
                values[name] = getattr(est, name)(z, sigma, prompts)
            seconds[name] += time.perf_counter() - mark
        for name, value in values.items():
            table.append({"sigma": sigma, "estimator": name, **agreement(value, reference, len(base))})
    one_z, one_p, mid = z[:1], prompts[:1], cfg.sigmas[len(cfg.sigmas) // 2]
    cost = {
        name: {
            "seconds_per_estimate": seconds[name] / (len(prompts) * len(cfg.sigmas)),
            "flops_per_estimate_at_mid_sigma": count_flops(
                (lambda: est.completions(one_z, mid, one_p, cfg.mc_k, 0)) if name == "mc" else (lambda name=name: getattr(est, name)(one_z, mid, one_p))
            ),
        }
        for name in ESTIMATORS
    }
    return {"table": table, "cost": cost, "config": {"prompts": len(base), "group_size": cfg.group_size, "mc_k": cfg.mc_k, "reference_k": cfg.reference_k}}


def plot_accuracy(accuracy: dict, path: Path) -> None:
    """Within-group Spearman and MSE against sigma, one line per estimator, plus cost per estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for name in ESTIMATORS:
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

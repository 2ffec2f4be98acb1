"""DRaFT-K: direct reward finetuning through the last K denoising steps, plain or with StitchVM.

The learner samples with the policy it trains (no rollout actors) and backpropagates the objective
through the rollout's last K steps; the steps before them run without a graph:

    terminal  z_1 --(N - K steps, no grad)--> --(K steps, grad)--> z_0 -> VAE decode -> pixel reward r
    stitchvm  z_1 --(k - K steps, no grad)--> --(K steps, grad)--> z_tau -> sum of value models V(z_tau)
              (tau = sigma_k, k ~ U{stop_min..stop_max} per micro-batch: nothing is decoded, and no
              pixel reward is in the graph)

Loss (paper eqs. 63 / 64 with DRaFT+'s output regulariser, as NeMo-Aligner's DRaFT+ computes it):

    L = -mean r  +  reg_weight * mean over the K grad steps and all latent entries of (v_theta - v_theta0)^2

v_theta0 is the frozen base model (adapters off) at the same latent, without a graph. Each grad step
is gradient-checkpointed: the backward keeps only the K step inputs and recomputes one step's
transformer activations at a time. The sampler is the probability-flow ODE (CFG 1) on the model's
own shifted schedule: Euler (the rectified-flow sampler the paper trains with) or DPM-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Literal

import torch
from torch.utils.checkpoint import checkpoint

from stitchvm_rl import flow
from stitchvm_rl.config import Range
from stitchvm_rl.policy import PromptEmbeds, SD3Policy

# objective(z, sigma, prompts) -> (B,) with the graph: the reward of a clean latent, or the value of a noisy one
Objective = Callable[[torch.Tensor, float, list[str]], torch.Tensor]


@dataclass
class DraftRolloutConfig:
    """What DRaFT-K samples and backpropagates (paper: K in {1, 3}, 10 steps, shift 3, CFG 1, stop U{3..7})."""

    estimator: Literal["terminal", "stitchvm"] = "terminal"
    """terminal: backpropagate the pixel reward of the decoded clean image; stitchvm: the value models' V(z_tau) at an early stop."""
    backprop_steps: Annotated[int, Range(1)] = 1
    """K: the denoising steps before the end (terminal) or the stop (stitchvm) that the gradient runs through."""
    reg_weight: Annotated[float, Range(0)] = 0.01
    """lambda of DRaFT+'s output regulariser mean (v_theta - v_base)^2 over the K grad steps."""
    num_steps: Annotated[int, Range(1)] = 10
    """Steps of the training sampler's schedule (the model's own shift)."""
    sampler: Literal["euler", "dpm2"] = "euler"
    """ODE sampler of the training rollouts (euler: the rectified-flow sampler; the evaluation samples with dpm2)."""
    stop_min: Annotated[int, Range(1)] = 3
    """stitchvm: smallest stop index k (must leave K steps before it)."""
    stop_max: Annotated[int, Range(1)] = 7
    """stitchvm: largest stop index k (< num_steps)."""
    batch_size: Annotated[int, Range(1)] = 8
    """Prompts (one image each) per micro-step on each learner rank."""
    grad_accum: Annotated[int, Range(1)] = 16
    """Micro-steps per optimizer step on each rank (an epoch is one optimizer step)."""
    checkpoint_steps: bool = True
    """Gradient-checkpoint each of the K steps (keep only their inputs for the backward)."""
    resolution: Annotated[int, Range(0)] = 0
    """Image side in pixels (0: the model's native size; the paper's SD3.5-M runs use 512)."""
    lora_rank: Annotated[int, Range(1)] = 32
    """LoRA rank."""
    lora_alpha: Annotated[float, Range(0)] = 64.0
    """LoRA alpha."""
    max_sequence_length: Annotated[int, Range(1)] = 256
    """T5 tokens per prompt (a tokenizer's own maximum caps it)."""
    prompt_cache: Annotated[int, Range(1)] = 2048
    """Prompt embeddings a learner rank keeps in CPU memory, least recently used dropped (2.6 MiB a prompt at SD3.5-M)."""


def check_draft_config(cfg: DraftRolloutConfig) -> None:
    """Refuse a K the schedule cannot give (ValueError), before anything loads."""
    if cfg.backprop_steps > cfg.num_steps:
        raise ValueError(f"backprop_steps={cfg.backprop_steps} is more than the num_steps={cfg.num_steps} steps of the schedule; choose 1..{cfg.num_steps}")
    if cfg.estimator != "stitchvm":
        return
    if not cfg.stop_min <= cfg.stop_max < cfg.num_steps:
        raise ValueError(f"stitchvm stop indices need stop_min <= stop_max < num_steps; got {cfg.stop_min}..{cfg.stop_max} of {cfg.num_steps} steps")
    if cfg.stop_min < cfg.backprop_steps:
        raise ValueError(
            f"stop_min={cfg.stop_min} leaves fewer than backprop_steps={cfg.backprop_steps} steps before the earliest stop; "
            f"raise stop_min to {cfg.backprop_steps} or lower backprop_steps to {cfg.stop_min}"
        )


def stop_index(cfg: DraftRolloutConfig, generator: torch.Generator) -> int:
    """Where a micro-batch's rollout ends: the last step (terminal) or k ~ U{stop_min..stop_max} (stitchvm)."""
    if cfg.estimator == "terminal":
        return cfg.num_steps
    return int(torch.randint(cfg.stop_min, cfg.stop_max + 1, (1,), generator=generator))


class TruncatedVelocity:
    """The policy's velocity along one training rollout, called once per step by a `flow` sampler:
    steps before `grad_from` without a graph, the rest with it (each checkpointed), and at each of
    those the base model's velocity at the same latent for the regulariser (`deviations`)."""

    def __init__(self, policy: SD3Policy, cond: PromptEmbeds, grad_from: int, checkpoint_steps: bool = True):
        self.policy, self.cond, self.grad_from, self.checkpoint_steps = policy, cond, grad_from, checkpoint_steps
        self.step = 0
        self.deviations: list[torch.Tensor] = []  # (B,) mean (v_theta - v_base)^2 of each grad step

    def __call__(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, self.step = self.step, self.step + 1
        if n < self.grad_from:
            with torch.no_grad():
                return self.policy.velocity(z, t, self.cond)
        with torch.no_grad(), self.policy.adapter(None):
            v_base = self.policy.velocity(z, t, self.cond)
        if self.checkpoint_steps:
            v = checkpoint(self.policy.velocity, z, t, self.cond, use_reentrant=False)
        else:
            v = self.policy.velocity(z, t, self.cond)
        self.deviations.append((v.float() - v_base.float()).pow(2).flatten(1).mean(1))
        return v


def training_rollout(policy: SD3Policy, cfg: DraftRolloutConfig, prompts: list[str], noise: torch.Tensor, stop: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Sample `prompts` from `noise` to step `stop` with the trained adapter, the last K steps with
    the graph; returns (z at the stop, its noise level, the regulariser per sample (B,))."""
    sigmas = flow.sd3_sigmas(cfg.num_steps, scheduler_config=policy.pipe.scheduler.config)
    velocity = TruncatedVelocity(policy, policy.encode_prompts(prompts), stop - cfg.backprop_steps, cfg.checkpoint_steps)
    sampler = flow.euler_ode if cfg.sampler == "euler" else flow.dpm2
    trajectory = sampler(velocity, noise.to(policy.device, policy.dtype), sigmas, stop_after=stop)
    return trajectory.final, float(trajectory.sigmas[-1]), torch.stack(velocity.deviations).mean(0)


def draft_loss(policy: SD3Policy, cfg: DraftRolloutConfig, prompts: list[str], noise: torch.Tensor, stop: int, objective: Objective) -> tuple[torch.Tensor, dict[str, float]]:
    """-mean objective + reg_weight * regulariser of one micro-batch, and its parts for logging."""
    z, sigma, deviation = training_rollout(policy, cfg, prompts, noise, stop)
    score = objective(z, sigma, prompts).float()
    loss = -score.mean() + cfg.reg_weight * deviation.mean()
    return loss, {"loss": loss.item(), "objective": score.mean().item(), "deviation": deviation.mean().item(), "stop_sigma": sigma}


def terminal_objective(policy: SD3Policy, reward) -> Objective:
    """r(Dec(z_0)): the pixel reward of the decoded clean latent, with the graph through both."""
    return lambda z, sigma, prompts: reward(policy.decode(z), prompts, grad=True)


def value_objective(policy: SD3Policy, value_models: list) -> Objective:
    """sum_m V_m(z_tau, tau): the frozen value models at the stop, with the graph to z_tau only."""

    def value(z: torch.Tensor, sigma: float, prompts: list[str]) -> torch.Tensor:
        t, cond = torch.full((len(z),), sigma, device=z.device), policy.encode_prompts(prompts)
        return sum(model(z, t, prompts, cond).float() for model in value_models)

    return value

"""Evaluation of a run's policy: fixed prompts, held-out noise, ODE (DPM-2) sampling, clean reward.
Every evaluation's per-image rewards are kept (eval_rewards.jsonl), so the gain over the base policy
is a paired comparison of the same prompts and noise; its images go to samples/ and to wandb. Both are
written to the run's files in storage (`storage.RunFiles`), from whichever node rank 0 runs on."""

from __future__ import annotations

from pathlib import Path

import torch

from stitchvm_rl import toyworld
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.storage import RunFiles

# The evaluation's noise has its own seed stream, far above every rollout seed
# (`prompt_schedule.epoch_seed`, below 2**40 for any seed < 10**7): a policy is never scored on the
# starting noise it was trained on.
EVAL_NOISE_SEED = 2**40


@torch.no_grad()
def evaluate_on_fixed_prompts(policy: SD3Policy, reward, prompts: list[str], steps: int, seed: int, adapter: str | None = "ema", resolution: int = 0, batch_size: int = 64) -> tuple[dict, torch.Tensor, list[float]]:
    """Fixed prompts and held-out noise, ODE (DPM-2) sampling with `adapter`, clean reward, `batch_size`
    prompts at a time (the noise is drawn for all of them first, so it does not depend on it); returns
    (metrics, images on the CPU, per-image rewards -- for paired comparisons between evaluations)."""
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(EVAL_NOISE_SEED + seed), resolution=resolution or None)
    images, scores = [], []
    with policy.adapter(adapter):
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            x = policy.decode(policy.sample(batch, steps, 1.0, "dpm2", noise=noise[i : i + batch_size]).final)
            scores.append(reward(x, batch).float().cpu())
            images.append(x.cpu())
    images, scores = torch.cat(images), torch.cat(scores)
    out = {"eval_reward_mean": scores.mean().item(), "eval_reward_std": scores.std().item()}
    if all(toyworld.is_caption(p) for p in prompts):
        out["eval_caption_accuracy"] = toyworld.caption_accuracy(images, prompts)["all"]
    return out, images, scores.tolist()


class Evaluator:
    """One run's evaluations of the EMA adapter (learner rank 0): `evaluate(step)` returns the
    metrics and writes that step's per-image rewards and sample grid into the run's files (the grid
    is drawn in `scratch`, a directory of this node, first)."""

    def __init__(self, policy: SD3Policy, reward, prompts: list[str], steps: int, seed: int, resolution: int, batch_size: int, files: RunFiles, scratch: Path, tracker):
        self.policy, self.reward, self.prompts, self.steps, self.seed, self.resolution = policy, reward, prompts, steps, seed, resolution
        self.batch_size, self.files, self.scratch, self.tracker = batch_size, files, scratch, tracker

    def __call__(self, step: int) -> dict:
        evaluation, images, per_image = evaluate_on_fixed_prompts(self.policy, self.reward, self.prompts, self.steps, self.seed, resolution=self.resolution, batch_size=self.batch_size)
        self.files.append_jsonl("eval_rewards.jsonl", {"global_step": step, "rewards": per_image})
        self._save_samples(images, step)
        return evaluation

    def _save_samples(self, images: torch.Tensor, step: int) -> None:
        """The evaluation images as a grid (samples/step_XXXXX.png), also sent to wandb."""
        name = f"samples/step_{step:05d}.png"
        path = self.scratch / name
        path.parent.mkdir(parents=True, exist_ok=True)
        toyworld.save_grid(images, path, nrow=12)
        self.files.upload_file(path, name)
        self.tracker.log_image("eval_samples", path, step=step)

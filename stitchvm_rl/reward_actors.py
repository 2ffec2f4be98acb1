"""Rewards served by their own Ray actors: GenEval's detector and ImageReward, so that a heavy model
does not sit in every rollout actor (nor on learner rank 0).

    driver (jobs/nft.py): start_reward_actors -> named actors "<run>-reward-<name>-<n>", `count` per
                          served reward, `gpus` each on cuda (e.g. 0.25: four share a GPU)
    RolloutWorker, learner rank 0: rewards.build_rewards(..., served={name: actor names}) gives a
                          RemoteReward in place of the model: reward(images [0, 1], prompts) sends the
                          images through the object store to one of the actors (round robin) and
                          returns its (B,) scores

A served reward cannot be differentiated through (DPS guidance keeps its rewards in-process). GenEval
reads each prompt's metadata (tag, include, exclude): the actors get {prompt: metadata} of the
training prompts once, when they start.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import torch

SERVED = ("geneval", "image_reward")  # rewards that jobs/nft.py serves from reward actors


def actor_names(run_name: str, weights: dict[str, float], count: int) -> dict[str, list[str]]:
    """{served reward: its actors' names} of the served rewards among `weights`."""
    return {name: [f"{run_name}-reward-{name}-{n}" for n in range(count)] for name in weights if name in SERVED}


class RewardActor:
    """Ray actor holding one served reward: `score(images [0, 1] NCHW float or uint8, prompts) -> (B,)
    float32`, `batch_size` images per forward pass."""

    def __init__(self, name: str, sources: dict[str, str], metadata: dict[str, dict], device: str = "cpu", batch_size: int = 8):
        from stitchvm_rl import rewards
        from stitchvm_rl.evaluation import scorers

        self.name, self.metadata, self.batch_size = name, metadata, batch_size
        if name == "geneval":  # non-differentiable: the detector and GenEval's decisions on the uint8 image
            self.scorer = scorers.load_scorer(name, sources, device=device)
        else:
            self.reward = rewards.build_reward(name, sources, device=device)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        b = self.batch_size
        return torch.cat([self._score(images[i : i + b], prompts[i : i + b]) for i in range(0, len(images), b)])

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if self.name == "geneval":  # Flow-GRPO's and DiffusionNFT's partial-credit score, on the uint8 image
            uint8 = images.permute(0, 2, 3, 1).numpy()
            return torch.from_numpy(self.scorer.partial_scores(uint8, [self.metadata.get(p, {}) for p in prompts]).astype(np.float32))
        return self.reward(images, prompts).float().cpu()


class RemoteReward:
    """A reward function answered by RewardActors found by name (in any process of the Ray job)."""

    def __init__(self, name: str, names: list[str]):
        self.name, self.names, self._actors = name, names, None

    def __call__(self, images: torch.Tensor, prompts: list[str], grad: bool = False) -> torch.Tensor:
        import ray

        if grad:
            raise ValueError(f"reward '{self.name}' is served by reward actors and cannot be differentiated through; guide with an in-process reward")
        if self._actors is None:  # each caller starts at a random actor: callers in lockstep spread out
            actors = [ray.get_actor(n) for n in self.names]
            start = random.randrange(len(actors))
            self._actors = itertools.cycle(actors[start:] + actors[:start])
        images = images.detach().float().cpu()
        if self.name == "geneval":  # it reads the saved image: send uint8, a quarter of the bytes
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        scores = ray.get(next(self._actors).score.remote(images, list(prompts)))
        return scores.to(images.device if self.name != "geneval" else "cpu")


def start_reward_actors(names: dict[str, list[str]], sources: dict[str, str], metadata: dict[str, dict], gpus: float, cpus: float = 1.0,
                        batch_size: int = 8, wait_s: float = 0.0) -> list:
    """The named reward actors (owned by the caller; stop them with ray.kill); returns once all are
    placed and loaded, or kills them and raises (naming what is missing after `wait_s`, 0: never)."""
    import ray

    from stitchvm_rl.runtime import wait_for_placement

    device = "cuda" if gpus else "cpu"
    cls = ray.remote(RewardActor)
    actors = [cls.options(name=n, num_cpus=cpus, num_gpus=gpus, max_restarts=1).remote(reward, sources, metadata if reward == "geneval" else {}, device, batch_size)
              for reward, actor_list in names.items() for n in actor_list]
    try:
        wait_for_placement([a.__ray_ready__.remote() for a in actors], "reward actors", {"CPU": cpus, "GPU": gpus}, wait_s)
    except BaseException:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise
    return actors

"""`RolloutWorker`: the Ray actor that samples prompt groups from the data-collection policy and
scores them with one advantage estimator.

    learner rank 0 --rollout(prompts, seed)--> RolloutWorker (policy with adapter "old")
        terminal  DPM-2 to t = 0, decode, pixel reward            anchor z0,    tau = 0
        stitchvm  DPM-2 to step k, sum of value models V(z_tau)   anchor z_tau, tau = sigma_k
        tweedie   DPM-2 to step k, r(Dec(z_tau - tau v))          anchor z_tau
        mc        DPM-2 to step k, mean r of mc_k SDE completions anchor z_tau
    <-- RolloutBatch (through the object store), tagged with the adapter version that made it
    learner rank 0 --load_adapter(AdapterState)--> every worker answers (version, dtype, checksum)
    learner rank 0 --value_drift(prompts, seed)--> the estimator at the stop vs the terminal reward

Everything a batch contains follows from (prompts, seed, adapter version): a batch lost with its
actor is redone bit for bit by any other actor. `k ~ U{stop_min..stop_max}` is drawn per group (one
`k` for all K images of a prompt, so they are ranked at the same noise level).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from stitchvm_rl import flow, rewards, zoo
from stitchvm_rl.config import Range
from stitchvm_rl.estimators import Estimator, Estimators
from stitchvm_rl.policy import AdapterState, PromptEmbeds, SD3Policy
from stitchvm_rl.stats import spearman


@dataclass
class RolloutConfig:
    """How rollouts are sampled and scored."""

    estimator: Estimator = "stitchvm"
    """terminal: full rollout + pixel reward (the Monte Carlo baseline); stitchvm / tweedie / mc: early stop."""
    group_size: Annotated[int, Range(2)] = 8
    """K images per prompt (advantages are centred within a group)."""
    resolution: Annotated[int, Range(0)] = 0
    """Image side in pixels (0: the model's native size; SD3.5-M runs use 512)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Rollout actors' model dtype (bfloat16 on GPU)."""
    num_steps: Annotated[int, Range(2)] = 10
    """DPM-2 steps of the full schedule (CFG-free)."""
    stop_min: Annotated[int, Range(1)] = 4
    """Smallest stop index k of the early-stopped estimators."""
    stop_max: Annotated[int, Range(1)] = 7
    """Largest stop index k (paper, 25 steps: U{12..17})."""
    mc_k: Annotated[int, Range(1)] = 4
    """SDE completions per latent for estimator=mc."""
    noise_level: Annotated[float, Range(0)] = 0.7
    """Flow-SDE noise level of the mc completions."""
    batch_size: Annotated[int, Range(1)] = 64
    """Latents per forward batch when scoring, and images per VAE decode and reward pass."""
    max_sequence_length: Annotated[int, Range(1)] = 256
    """T5 tokens per prompt (SD3.5's default 256; DiffusionNFT's official runs 128; a tokenizer's own maximum caps it)."""
    prompt_cache: Annotated[int, Range(1)] = 2048
    """Prompt embeddings an actor keeps in CPU memory, least recently used dropped (2.6 MiB a prompt at SD3.5-M, 256 tokens)."""
    lora_rank: Annotated[int, Range(1)] = 32
    """LoRA rank (must match the learner's)."""
    lora_alpha: Annotated[float, Range(0)] = 64.0
    """LoRA alpha (must match the learner's)."""
    compile: bool = False
    """torch.compile each SD3 / CLIP block of the actor's models (GPU; its first rollout compiles them)."""
    async_: bool = False
    """`rollout.async`: sample epoch n + 1 while the learner trains on epoch n (staleness one version)."""


def check_rollout_config(cfg: RolloutConfig, value_models: list[str]) -> None:
    """Refuse settings that cannot work, before any actor starts."""
    if not cfg.stop_min <= cfg.stop_max < cfg.num_steps:
        raise ValueError(f"stop indices need stop_min <= stop_max < num_steps; got {cfg.stop_min}..{cfg.stop_max} of {cfg.num_steps} steps")
    if cfg.estimator == "stitchvm" and not value_models:
        raise ValueError("estimator=stitchvm needs at least one value model directory (build one with jobs/stitch.py)")


@dataclass
class RolloutBatch:
    """K samples of each of G prompts, ready for the NFT loss."""

    anchors: torch.Tensor  # (G*K, C, H, W): z0 for terminal, z_tau otherwise
    tau: torch.Tensor  # (G*K,) noise level of the anchor (0 for terminal)
    groups: torch.Tensor  # (G*K,) index into group_prompts
    group_prompts: list[str]  # (G,)
    group_embeds: PromptEmbeds  # (G, ...) the policy's text conditioning, computed once per prompt
    scores: torch.Tensor  # (G*K,) raw estimator scores
    version: int  # adapter version that sampled them
    estimator: str
    seconds_sample: float = 0.0  # actor-side time spent sampling
    seconds_score: float = 0.0  # actor-side time spent scoring


def actor_needs_rewards(estimator: str, drift_every: int) -> bool:
    """Whether rollout actors load the pixel rewards: every estimator but stitchvm scores with them,
    and the drift watch compares stitchvm with them (two CLIP-H rewards: 7.3 GiB of float32)."""
    return estimator != "stitchvm" or drift_every > 0


class RolloutWorker:
    """Ray actor (`ray.remote(RolloutWorker).options(num_gpus=...)`): one policy replica with the
    LoRA adapters, the reward (empty `reward_weights`: none, see `actor_needs_rewards`; the ones in
    `served_rewards` are answered by reward actors) and, for stitchvm, the value models (their scores are summed).
    `crash_on_call` is fault injection for tests (`testing.crash_on_call` of jobs/nft.py)."""

    def __init__(self, backbone: str, cfg: RolloutConfig, reward_weights: dict[str, float], value_models: list[str], device: str = "cpu", crash_on_call: int = -1,
                 reward_sources: dict[str, str] | None = None, served_rewards: dict[str, list[str]] | None = None):
        from stitchvm_rl.value.model import StitchedValueModel

        check_rollout_config(cfg, value_models)
        if not reward_weights and cfg.estimator != "stitchvm":
            raise ValueError(f"estimator={cfg.estimator} scores with the pixel reward; pass reward_weights")
        self.cfg, self.crash_on_call = cfg, crash_on_call
        self.policy = SD3Policy.from_pretrained(backbone, dtype=cfg.dtype, device=device, max_sequence_length=cfg.max_sequence_length, prompt_cache=cfg.prompt_cache)
        self.policy.add_lora(cfg.lora_rank, cfg.lora_alpha)
        self.version = 0  # a restarted actor is back at the base adapter: the learner sees it and re-syncs
        self.calls = 0
        self.schedule = flow.sd3_sigmas(cfg.num_steps, scheduler_config=self.policy.pipe.scheduler.config)
        self.value_models = [StitchedValueModel.from_pretrained(d, device=device, dtype=cfg.dtype) for d in value_models]
        reward = rewards.build_rewards(reward_weights, reward_sources, device=device, served=served_rewards) if reward_weights else None
        # CFG-free, as the rollouts themselves: completions (mc) follow the rollout's own schedule
        self.estimators = Estimators(self.policy, self._value, reward, cfg.num_steps, cfg_scale=1.0, noise_level=cfg.noise_level, batch_size=cfg.batch_size)
        if cfg.compile:  # after the LoRA layers are in: the compiled blocks include them
            zoo.compile_repeated_blocks(self.policy.transformer, *self.value_models, *(reward.models() if reward else []))

    def _value(self, z: torch.Tensor, t: torch.Tensor, prompts: list[str], cond=None) -> torch.Tensor:
        return sum(model(z, t.to(z.device), prompts, cond).float() for model in self.value_models)

    def load_adapter(self, state: AdapterState) -> tuple[int, str, str]:
        """Make `state` the data-collection adapter; answer with (version, dtype, checksum of the adapter
        this actor now holds, read back from its model) for the learner to compare with what it sent
        cast to that dtype (`weight_sync.check_answers`)."""
        self.policy.load_adapter(state, name="old")
        self.version = state.version
        held = self.policy.export_adapter("old")
        return state.version, self.cfg.dtype, held.checksum

    @torch.no_grad()
    def rollout(self, prompts: list[str], seed: int) -> RolloutBatch:
        """Sample `group_size` images for each prompt with adapter "old" and score them."""
        self.calls += 1
        if self.calls == self.crash_on_call and not _restarted():
            os._exit(1)  # fault injection: a hard death mid-epoch, as a preempted node
        cfg, gen = self.cfg, torch.Generator().manual_seed(seed)
        anchors, taus, scores = [], [], []
        seconds = {"sample": 0.0, "score": 0.0}
        with self.policy.adapter("old"):
            for prompt in prompts:
                start = time.perf_counter()
                z, k = self._sample_group(prompt, gen)
                tau = float(self.schedule[k])
                anchors.append(z.cpu())
                taus.append(torch.full((cfg.group_size,), tau))
                scored = time.perf_counter()
                scores.append(self._score(z, tau, [prompt] * cfg.group_size, seed=int(torch.randint(2**31, (1,), generator=gen))))
                seconds["sample"] += scored - start
                seconds["score"] += time.perf_counter() - scored
            embeds = self.policy.encode_prompts(list(prompts))
        return RolloutBatch(
            anchors=torch.cat(anchors),
            tau=torch.cat(taus),
            groups=torch.arange(len(prompts)).repeat_interleave(cfg.group_size),
            group_prompts=list(prompts),
            group_embeds=PromptEmbeds(embeds.embeds.cpu(), embeds.pooled.cpu()),
            scores=torch.cat(scores).float(),
            version=self.version,
            estimator=cfg.estimator,
            seconds_sample=seconds["sample"],
            seconds_score=seconds["score"],
        )

    def _sample_group(self, prompt: str, gen: torch.Generator, full: bool = False) -> tuple[torch.Tensor, int]:
        """K latents of one prompt at the group's stop index k ~ U{stop_min..stop_max} (terminal: the
        last step); `full` returns the whole trajectory (steps 0..num_steps) instead of z_k."""
        cfg = self.cfg
        noise = self.policy.initial_noise(cfg.group_size, gen, resolution=cfg.resolution or None)
        k = cfg.num_steps if cfg.estimator == "terminal" else int(torch.randint(cfg.stop_min, cfg.stop_max + 1, (1,), generator=gen))
        traj = self.policy.sample([prompt] * cfg.group_size, cfg.num_steps, 1.0, "dpm2", stop_after=None if full else k, noise=noise)
        return (traj.latents if full else traj.final), k

    @torch.no_grad()
    def value_drift(self, prompts: list[str], seed: int) -> dict:
        """Full rollouts of the current `old` policy: the estimator's score at each group's stop against
        the terminal reward of the same trajectories (the value model is trained off-policy; watch it).
        Returns the mean within-group Spearman and both means."""
        if self.estimators.reward is None:
            raise ValueError("this rollout actor was started without rewards (drift_every=0), so it cannot watch value drift")
        gen = torch.Generator().manual_seed(seed)
        rho, estimates, terminal = [], [], []
        with self.policy.adapter("old"):
            for prompt in prompts:
                latents, k = self._sample_group(prompt, gen, full=True)
                group = [prompt] * self.cfg.group_size
                estimate = self._score(latents[k], float(self.schedule[k]), group, seed=int(torch.randint(2**31, (1,), generator=gen)))
                reward = self.estimators.terminal(latents[-1], group)
                rho.append(spearman(estimate, reward))
                estimates.append(estimate.mean().item())
                terminal.append(reward.mean().item())
        n = len(prompts)
        return {"drift_spearman": sum(rho) / n, "drift_estimate_mean": sum(estimates) / n, "drift_terminal_mean": sum(terminal) / n}

    def _score(self, z: torch.Tensor, tau: float, prompts: list[str], seed: int) -> torch.Tensor:
        return self.estimators.score(self.cfg.estimator, z, tau, prompts, self.cfg.mc_k, seed)


def _restarted() -> bool:
    import ray

    return ray.get_runtime_context().was_current_actor_reconstructed

"""The four estimators of a latent's value E[r(z0) | z_tau], shared by the rollout actors (which
score their samples with one of them) and the value-accuracy evaluation (which compares them):

    terminal  r(Dec(z0))                             (a finished rollout: the Monte Carlo baseline)
    stitchvm  V(z_tau)                               (head blocks + stitch + tail; no decode)
    tweedie   r(Dec(z_tau - tau v))                  (one transformer pass, decode, reward)
    mc        mean of r over `mc_k` SDE completions  (mc_k x remaining steps, decodes, rewards)
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from stitchvm_rl import flow

Estimator = Literal["terminal", "stitchvm", "tweedie", "mc"]
ESTIMATORS: tuple[str, ...] = get_args(Estimator)
EARLY_STOPPED = ESTIMATORS[1:]  # those that score z_tau before the rollout ends (the value evaluation compares them)


class Estimators:
    """The four estimators over one policy, one value model (any callable V(z, t, prompts, cond))
    and one clean pixel reward; `steps` is the sampling schedule that completions follow.
    `batch_size` latents go through the transformer at once, `decode_batch_size` (default: the
    same) through the VAE decoder and the reward (a decode at 1024^2 keeps ~1.5 GiB an image)."""

    def __init__(self, policy, value_model, reward, steps: int, cfg_scale: float, noise_level: float, batch_size: int, decode_batch_size: int | None = None):
        self.policy, self.value_model, self.reward = policy, value_model, reward
        self.cfg_scale, self.noise_level, self.batch_size = cfg_scale, noise_level, batch_size
        self.decode_batch_size = decode_batch_size or batch_size
        self.schedule = flow.sd3_sigmas(steps, scheduler_config=policy.pipe.scheduler.config)

    def score(self, name: str, z: torch.Tensor, tau: float, prompts: list[str], mc_k: int, seed: int) -> torch.Tensor:
        """Estimator `name` for each latent at noise level `tau` (terminal: `z` is z0 itself)."""
        if name == "terminal":
            return self.terminal(z, prompts)
        if name == "mc":
            return self.completions(z, tau, prompts, mc_k, seed)
        return getattr(self, name)(z, tau, prompts)

    def _batched(self, fn, z: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        b = self.batch_size
        return torch.cat([fn(z[i : i + b], prompts[i : i + b]) for i in range(0, len(z), b)])

    def _decoded_reward(self, z0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The clean reward of latents, decoded `decode_batch_size` at a time."""
        b = self.decode_batch_size
        return torch.cat([self.reward(self.policy.decode(z0[i : i + b]), prompts[i : i + b]).float().cpu() for i in range(0, len(z0), b)])

    @torch.no_grad()
    def terminal(self, z0: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Decoded and rewarded `decode_batch_size` images at a time (a VAE decode at 512^2 keeps ~0.4 GiB an image)."""
        return self._decoded_reward(z0, prompts)

    @torch.no_grad()
    def stitchvm(self, z: torch.Tensor, sigma: float, prompts: list[str]) -> torch.Tensor:
        def one(zz, pp):
            return self.value_model(zz, torch.full((len(zz),), sigma), pp, cond=self.policy.encode_prompts(pp)).float().cpu()

        return self._batched(one, z, prompts)

    @torch.no_grad()
    def tweedie(self, z: torch.Tensor, sigma: float, prompts: list[str]) -> torch.Tensor:
        def one(zz, pp):
            t = torch.full((len(zz),), sigma)
            v = self.policy.velocity(zz, t, self.policy.encode_prompts(pp), self.cfg_scale)
            return self._decoded_reward(flow.tweedie_x0(zz, sigma, v), pp)

        return self._batched(one, z, prompts)

    @torch.no_grad()
    def completions(self, z: torch.Tensor, sigma: float, prompts: list[str], k: int, seed: int) -> torch.Tensor:
        """Mean terminal reward of k SDE completions from each latent (the mc estimator)."""
        rest = torch.cat([torch.tensor([sigma]), self.schedule[self.schedule < sigma]])
        zk, pk = z.repeat_interleave(k, 0), [p for p in prompts for _ in range(k)]
        gen = torch.Generator().manual_seed(seed)

        def one(zz, pp):
            fn = self.policy.velocity_fn(self.policy.encode_prompts(pp), self.cfg_scale)
            z0 = flow.flow_sde(fn, zz, rest, noise_level=self.noise_level, generator=gen).final
            return self._decoded_reward(z0, pp)

        return self._batched(one, zk, pk).view(len(z), k).mean(1)

    @torch.no_grad()
    def rollouts_to(self, sigma: float, prompts: list[str], seed: int) -> torch.Tensor:
        """ODE (DPM-2) rollouts from pure noise that stop exactly at `sigma`."""
        path = torch.cat([self.schedule[self.schedule > sigma], torch.tensor([sigma])])
        noise = self.policy.initial_noise(len(prompts), torch.Generator().manual_seed(seed))
        fn = self.policy.velocity_fn(self.policy.encode_prompts(prompts), self.cfg_scale)
        return flow.dpm2(fn, noise, path).final

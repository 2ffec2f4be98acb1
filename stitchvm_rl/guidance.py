"""Inference-time guidance with a value: DPS (value-gradient ascent on the flow SDE) and FK steering.

Values of a noisy latent z_t (`value.velocity_and_gradient` returns v, dV/dz_t and V):
    none      no value: the unguided flow SDE
    tweedie   V = r(Dec(z_t - t v_cfg)): the gradient runs back through the pixel reward, the VAE
              decoder and the whole transformer (both CFG branches)
    stitchvm  V = StitchedValueModel(z_t, t, prompt), with v_cfg computed under no_grad: the gradient
              runs back only through DiT blocks 1..i, the stitch and the reward tail; nothing is decoded.
              When the value model's head is the policy's own first i blocks (frozen, as the paper's),
              it is the start of one of CFG's passes -- the unconditional one for an empty-prompt head,
              the conditional one for a head that reads the prompt -- and that pass feeds the value
              model on the way (`shared_head_branch`; the paper's section 5.2): the head's blocks run
              once per step, not twice.

Sampler: Euler-Maruyama on the marginal-preserving flow SDE (`flow.flow_sde`'s family) with the
diffusion coefficient g(t) = a sqrt(t / (1 - t)) of Flow-GRPO (a = `noise_level`; the paper leaves g
open and names RBF's "LinearSDE"). DPS adds `scale * dV/dz_t` after every step inside the window
guide_until < t <= guide_from, never after the last (which lands on Tweedie's x0); with `normalise`
the gradient is first rescaled to unit RMS per sample, so the scale reads in latent units per step
whatever the value's magnitude.

FK steering (Feynman-Kac particle resampling): `particles` SDE samples per prompt; every
`resample_every` steps inside the window, particles are resampled within their prompt with weights
exp(lambda (V_now - V_at_last_resampling)); optionally (the paper's "M-proposal" variant) during the
first `proposal_fraction` of the steps each particle draws `proposals` SDE noises and keeps the one
whose next latent has the highest V. The particle with the highest final value is returned.

Best-of-N (the paper's Table 2 baseline): N unguided SDE samples per prompt, each decoded and scored
by the clean reward, the best kept. Every method counts its model evaluations per image -- rows
through the policy's transformer (`benchmark.TransformerCalls`; CFG's two passes count twice) and
rows scored by its value or reward (`CountedValue`) -- so Best-of-N can be given FK steering's
budget (`bon_samples=0`: N = FK's counted evaluations per image / (num_steps + 1), at least 1).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch

from stitchvm_rl import flow, zoo
from stitchvm_rl.config import Range
from stitchvm_rl.policy import SD3Policy
from stitchvm_rl.value.model import capture_head_features


@dataclass
class GuidanceConfig:
    """The guided sampler (shared by every method, so comparisons are like for like)."""

    num_steps: Annotated[int, Range(2)] = 20
    """SDE steps."""
    cfg_scale: Annotated[float, Range(1)] = 1.0
    """Classifier-free guidance scale (1 = off)."""
    noise_level: Annotated[float, Range(0)] = 0.7
    """a in g(t) = a sqrt(t / (1 - t)) (0: the Euler ODE)."""
    scale: Annotated[float, Range(0)] = 0.1
    """DPS step along dV/dz_t (per step; in latent RMS units when normalise)."""
    normalise: bool = True
    """Rescale the value gradient to unit RMS per sample before the step."""
    guide_from: Annotated[float, Range(0, 1)] = 1.0
    """Guide at noise levels t <= guide_from ..."""
    guide_until: Annotated[float, Range(0, 1)] = 0.0
    """... and t > guide_until (defaults: every step but the last)."""
    particles: Annotated[int, Range(1)] = 4
    """FK steering: particles per prompt."""
    resample_every: Annotated[int, Range(1)] = 4
    """FK steering: resample every this many steps inside the window."""
    resample_window: tuple[float, float] = (0.2, 0.8)
    """FK steering: resample only at steps whose index lies in this fraction of the trajectory."""
    potential_scale: Annotated[float, Range(0)] = 10.0
    """FK steering: lambda in the weights exp(lambda * value increment)."""
    proposals: Annotated[int, Range(1)] = 1
    """FK steering: SDE proposals per particle and step (the paper's M; 1 = plain FK)."""
    proposal_fraction: Annotated[float, Range(0, 1)] = 0.4
    """FK steering: share of the first steps that use `proposals`."""
    bon_samples: Annotated[int, Range(0)] = 0
    """Best-of-N: samples per prompt (0: as many as FK steering's counted evaluations per image pay for)."""


class NoValue:
    """The unguided baseline: velocity only."""

    def velocity_and_gradient(self, policy: SD3Policy, z, t, cond, prompts, cfg_scale):
        with torch.no_grad():
            return policy.velocity(z, t, cond, cfg_scale), None, None

    def value(self, z, t, prompts):
        raise ValueError("method 'none' has no value; FK steering needs tweedie or stitchvm")


class TweedieValue:
    """V = r(Dec(z_t - t v)), differentiated through the transformer, the decoder and the reward."""

    def __init__(self, policy: SD3Policy, reward, cfg_scale: float = 1.0):
        self.policy, self.reward, self.cfg_scale = policy, reward, cfg_scale

    def velocity_and_gradient(self, policy: SD3Policy, z, t, cond, prompts, cfg_scale):
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            v = policy.velocity(z, t, cond, cfg_scale)
            value = self.reward(policy.decode(flow.tweedie_x0(z, t, v)), prompts, grad=True).float()
            (grad,) = torch.autograd.grad(value.sum(), z)
        return v.detach(), grad, value.detach()

    @torch.no_grad()
    def value(self, z, t, prompts):
        cond = self.policy.encode_prompts(prompts)
        v = self.policy.velocity(z, t, cond, self.cfg_scale)
        return self.reward(self.policy.decode(flow.tweedie_x0(z, t, v)), prompts).float()


class CountedValue:
    """A value whose evaluations are counted: rows scored by `value` or differentiated by
    `velocity_and_gradient` (the transformer's own rows are `benchmark.TransformerCalls`')."""

    def __init__(self, inner):
        self.inner, self.rows = inner, 0

    def __getattr__(self, name):  # e.g. StitchValue.shared
        return getattr(self.inner, name)

    def value(self, z, t, prompts):
        self.rows += len(z)
        return self.inner.value(z, t, prompts)

    def velocity_and_gradient(self, policy: SD3Policy, z, t, cond, prompts, cfg_scale):
        v, grad, value = self.inner.velocity_and_gradient(policy, z, t, cond, prompts, cfg_scale)
        self.rows += len(z) if grad is not None else 0
        return v, grad, value


def shared_head_branch(policy: SD3Policy, value_model) -> str | None:
    """Which of CFG's passes the value model's DiT head is the start of: "cond" (a head that reads
    the prompt), "uncond" (an empty-prompt head, the paper's) or None (a trained head, a policy with
    adapters or other weights)."""
    if value_model.config.head_trained or not value_model.head.matches(policy.transformer):
        return None
    if value_model.config.head_conditioning == "prompt":
        return "cond"
    null = policy.encode_prompts([""])
    head = value_model.head
    same = torch.allclose(null.embeds.to(head.null_embeds), head.null_embeds) and torch.allclose(null.pooled.to(head.null_pooled), head.null_pooled)
    return "uncond" if same else None


class StitchValue:
    """V = the stitched value model; the policy's velocity is computed without autograd."""

    def __init__(self, policy: SD3Policy, value_model):
        self.policy, self.model = policy, value_model
        self.shared = shared_head_branch(policy, value_model)

    def velocity_and_gradient(self, policy: SD3Policy, z, t, cond, prompts, cfg_scale):
        if self.shared == "cond" or (self.shared == "uncond" and cfg_scale != 1.0):
            return self._shared_pass(policy, z, t, cond, prompts, cfg_scale)
        with torch.no_grad():
            v = policy.velocity(z, t, cond, cfg_scale)
        z = z.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.model(z, t, prompts, cond).float()
            (grad,) = torch.autograd.grad(value.sum(), z)
        return v, grad, value.detach()

    def _shared_pass(self, policy: SD3Policy, z, t, cond, prompts, cfg_scale):
        """The CFG pass the head belongs to runs once, its first i blocks under autograd (they feed
        the value model), the rest detached (it gives that branch's velocity); the other branch, if
        CFG is on, runs without autograd."""
        uncond = policy.encode_prompts([""] * len(z))  # cached per process: a concatenation, no encoder pass
        mine, other = (cond, uncond) if self.shared == "cond" else (uncond, cond)
        z = z.detach().requires_grad_(True)
        with capture_head_features(policy.transformer, self.model.config.dit_block) as tokens, torch.enable_grad():
            v_mine = policy.velocity(z, t, mine)
            grid = self.model.head.grid(tokens[0], z.shape[2], z.shape[3])
            value = self.model.score(self.model.embed_grid(grid)[0], prompts).float()
            (grad,) = torch.autograd.grad(value.sum(), z)
        with torch.no_grad():
            v = v_mine.detach()
            if cfg_scale != 1.0:
                v_other = policy.velocity(z.detach(), t, other)
                v_uncond, v_cond = (v_other, v) if self.shared == "cond" else (v, v_other)
                v = v_uncond + cfg_scale * (v_cond - v_uncond)
        return v, grad, value.detach()

    @torch.no_grad()
    def value(self, z, t, prompts):
        return self.model(z, t, prompts, self.policy.encode_prompts(prompts)).float()


def _rms_normalise(grad: torch.Tensor) -> torch.Tensor:
    dims = tuple(range(1, grad.dim()))
    return grad / grad.pow(2).mean(dims, keepdim=True).sqrt().clamp_min(1e-12)


def _sde_step(z, v, t: float, t_next: float, g_of, noise: torch.Tensor | None):
    """One Euler-Maruyama step of the flow SDE (the last step lands on Tweedie's x0)."""
    if t_next == 0.0:
        return flow.tweedie_x0(z, t, v)
    dt = t - t_next
    g = g_of(t, t_next)
    return z - dt * (v + (g * g / (2 * t)) * flow.noise_from_velocity(z, t, v)) + g * math.sqrt(dt) * noise


def _randn(z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z.device, z.dtype)


def dps_sample(policy: SD3Policy, prompts: list[str], value, cfg: GuidanceConfig, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """DPS on the flow SDE: returns the final latents (B, C, H, W)."""
    sigmas = flow.sd3_sigmas(cfg.num_steps, scheduler_config=policy.pipe.scheduler.config)
    g_of = flow.flow_grpo_diffusion(cfg.noise_level)
    cond = policy.encode_prompts(prompts)
    z = noise.to(policy.device, policy.dtype)
    for n in range(cfg.num_steps):
        t, t_next = float(sigmas[n]), float(sigmas[n + 1])
        t_vec = torch.full((len(z),), t, device=z.device)
        guide = t_next > 0.0 and cfg.guide_until < t <= cfg.guide_from
        if guide:
            v, grad, _ = value.velocity_and_gradient(policy, z, t_vec, cond, prompts, cfg.cfg_scale)
        else:
            with torch.no_grad():
                v, grad = policy.velocity(z, t_vec, cond, cfg.cfg_scale), None
        with torch.no_grad():
            z = _sde_step(z, v, t, t_next, g_of, _randn(z, generator))
            if grad is not None:
                z = z + cfg.scale * (_rms_normalise(grad) if cfg.normalise else grad).to(z.dtype)
    return z.detach()


@torch.no_grad()
def fk_steer(policy: SD3Policy, prompts: list[str], value, cfg: GuidanceConfig, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """FK steering with value potentials (and M proposals early on); `noise` holds `particles` latents
    per prompt, prompt-major. Returns the best particle of each prompt (B, C, H, W)."""
    sigmas = flow.sd3_sigmas(cfg.num_steps, scheduler_config=policy.pipe.scheduler.config)
    g_of = flow.flow_grpo_diffusion(cfg.noise_level)
    n_p = cfg.particles
    expanded = [p for p in prompts for _ in range(n_p)]
    cond = policy.encode_prompts(expanded)
    z = noise.to(policy.device, policy.dtype)
    last = value.value(z, torch.ones(len(z), device=z.device), expanded)
    for n in range(cfg.num_steps):
        t, t_next = float(sigmas[n]), float(sigmas[n + 1])
        v = policy.velocity(z, torch.full((len(z),), t, device=z.device), cond, cfg.cfg_scale)
        if t_next == 0.0:
            break  # the final Tweedie step is taken after choosing the best particle
        t_next_vec = torch.full((len(z),), t_next, device=z.device)
        if cfg.proposals > 1 and n < cfg.proposal_fraction * cfg.num_steps:
            candidates = torch.stack([_sde_step(z, v, t, t_next, g_of, _randn(z, generator)) for _ in range(cfg.proposals)])
            scores = torch.stack([value.value(c, t_next_vec, expanded) for c in candidates])  # (M, B*N)
            z = candidates[scores.argmax(0), torch.arange(len(z))]
        else:
            z = _sde_step(z, v, t, t_next, g_of, _randn(z, generator))
        lo, hi = cfg.resample_window
        if (n + 1) % cfg.resample_every == 0 and lo <= (n + 1) / cfg.num_steps <= hi:
            z, last = fk_resample(z, value.value(z, t_next_vec, expanded), last, n_p, cfg.potential_scale, generator)
    t_vec = torch.full((len(z),), t, device=z.device)
    best = value.value(z, t_vec, expanded).view(-1, n_p).argmax(1) + n_p * torch.arange(len(prompts), device=z.device)
    z, v = z[best], v[best]
    return flow.tweedie_x0(z, t, v)


@torch.no_grad()
def best_of_n(policy: SD3Policy, prompts: list[str], reward: CountedValue, cfg: GuidanceConfig, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Best-of-N: `noise` holds N latents per prompt (prompt-major); each runs the unguided SDE, is
    decoded and scored by the clean reward (`reward.value` at t = 0); each prompt's best (B, C, H, W)."""
    samples = len(noise) // len(prompts)
    expanded = [p for p in prompts for _ in range(samples)]
    z0 = dps_sample(policy, expanded, NoValue(), cfg, noise, generator)
    scores = reward.value(z0, torch.zeros(len(z0), device=z0.device), expanded)
    best = scores.view(-1, samples).argmax(1) + samples * torch.arange(len(prompts), device=z0.device)
    return z0[best]


class CleanReward:
    """The clean reward of final latents, decoded: Best-of-N's selection score."""

    def __init__(self, policy: SD3Policy, reward):
        self.policy, self.reward = policy, reward

    @torch.no_grad()
    def value(self, z, t, prompts):
        return self.reward(self.policy.decode(z), prompts).float()


def matched_samples(transformer_rows: float, value_rows: float, num_steps: int) -> int:
    """Best-of-N's N for another method's budget per image: each of its samples costs num_steps
    transformer rows (the SDE's steps; CFG doubles both sides alike only if both use it -- the
    caller counts rows as the transformer sees them) plus one reward evaluation."""
    return max(1, math.floor((transformer_rows + value_rows) / (num_steps + 1)))


def fk_resample(z: torch.Tensor, now: torch.Tensor, last: torch.Tensor, particles: int, potential_scale: float, generator: torch.Generator | None):
    """FK steering's resampling: each prompt's `particles` (prompt-major rows of `z`) are drawn again,
    with replacement, with weights exp(lambda (V_now - V_last)) normalised within the prompt -- the
    potential is the value's rise since the last resampling. Returns the particles and their values."""
    weights = torch.softmax(potential_scale * (now - last).view(-1, particles), dim=1)
    picks = torch.multinomial(weights.float().cpu(), particles, replacement=True, generator=generator).to(z.device)
    index = (picks + particles * torch.arange(len(weights), device=z.device).view(-1, 1)).view(-1)
    return z[index], now[index]


def build_value(method: str, policy: SD3Policy, reward=None, value_model=None, cfg_scale: float = 1.0):
    """The value object of a method name (none, tweedie, stitchvm, fk_tweedie, fk_stitchvm, best_of_n)."""
    kind = method.removeprefix("fk_")
    if kind == "none":
        return NoValue()
    if kind == "best_of_n":
        return CleanReward(policy, reward)
    if kind == "tweedie":
        if reward is None:
            raise ValueError(f"method '{method}' needs a pixel reward")
        return TweedieValue(policy, reward, cfg_scale)
    if kind == "stitchvm":
        if value_model is None:
            raise ValueError(f"method '{method}' needs a value model (build one with jobs/stitch.py)")
        return StitchValue(policy, value_model)
    raise ValueError(f"unknown guidance method '{method}'; choose none, tweedie, stitchvm, fk_tweedie or fk_stitchvm")


Method = Literal["none", "tweedie", "stitchvm", "fk_tweedie", "fk_stitchvm", "best_of_n"]


def with_particles(policy: SD3Policy, first: torch.Tensor, count: int, generator: torch.Generator, resolution: int | None) -> torch.Tensor:
    """Each prompt's own first noise and count - 1 more drawn from `generator`, prompt-major."""
    extra = policy.initial_noise(len(first) * (count - 1), generator, resolution=resolution)
    return torch.cat([first.unsqueeze(1).to(extra), extra.view(len(first), count - 1, *extra.shape[1:])], 1).flatten(0, 1)


def guided_sample(method: str, policy: SD3Policy, value, cfg: GuidanceConfig, prompts: list[str], first: torch.Tensor, generator: torch.Generator, resolution: int | None = None) -> torch.Tensor:
    """Final latents of `prompts` under a method (DPS with `value`, fk_*, best_of_n), each prompt
    starting from its row of `first` (FK steering and Best-of-N: its first particle)."""
    if method.startswith("fk_"):
        return fk_steer(policy, prompts, value, cfg, with_particles(policy, first, cfg.particles, generator, resolution), generator)
    if method == "best_of_n":
        return best_of_n(policy, prompts, value, cfg, with_particles(policy, first, cfg.bon_samples, generator, resolution), generator)
    return dps_sample(policy, prompts, value, cfg, first, generator)


def run_guided(method: str, backbone: str, reward_weights: dict[str, float], value_model: str, prompts: list[str], cfg: GuidanceConfig, scale: float, batch_size: int, resolution: int, seed: int, device: str, dtype: str, compile: bool = False, reward_sources: dict[str, str] | None = None) -> dict:
    """One method, meant for its own process (a Ray task with max_calls=1): load what it needs, then
    sample `prompts` while measuring seconds and peak memory (after loading). Initial noise comes from
    `seed` (FK steering and Best-of-N: the first particle of each prompt), so methods share it image
    by image. `compile`: torch.compile the SD3 and CLIP blocks; one untimed batch compiles them first.
    Also returns the model evaluations per image: transformer rows and value (or reward) rows."""
    import os
    import time

    from stitchvm_rl import rewards
    from stitchvm_rl.benchmark import TransformerCalls
    from stitchvm_rl.runtime import PeakMemory
    from stitchvm_rl.value.model import StitchedValueModel

    kind = method.removeprefix("fk_")
    torch.manual_seed(seed)
    policy = SD3Policy.from_pretrained(backbone, dtype=dtype, device=device)
    policy.transformer.requires_grad_(False)
    policy.vae.requires_grad_(False)
    reward = rewards.build_rewards(reward_weights, reward_sources, device=device) if kind in ("tweedie", "best_of_n") else None
    model = StitchedValueModel.from_pretrained(value_model, device=device, dtype=dtype) if kind == "stitchvm" else None
    value = CountedValue(build_value(method, policy, reward, model, cfg.cfg_scale))
    cfg = dataclasses.replace(cfg, scale=scale)
    noise = policy.initial_noise(len(prompts), torch.Generator().manual_seed(seed), resolution=resolution or None)

    def guided(batch: list[str], first: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return guided_sample(method, policy, value, cfg, batch, first, generator, resolution or None)

    if compile:
        zoo.compile_repeated_blocks(policy.transformer, *(reward.models() if reward else []), *([model] if model else []))
        guided(prompts[:batch_size], noise[:batch_size], torch.Generator().manual_seed(seed + 1))  # compiles, untimed
    generator = torch.Generator().manual_seed(seed + 1)
    images, calls, value.rows = [], TransformerCalls(policy.transformer), 0
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        for b in range(0, len(prompts), batch_size):
            z0 = guided(prompts[b : b + batch_size], noise[b : b + batch_size], generator)
            with torch.no_grad():
                images.append(policy.decode(z0).float().cpu())
        seconds = time.perf_counter() - start
    evaluations = {"transformer_rows_per_image": calls.take() / len(prompts), "value_rows_per_image": value.rows / len(prompts)}
    return {"method": method, "images": torch.cat(images), "seconds_per_sample": seconds / len(prompts), "peak_memory_mib": peak.mib, "process": os.getpid(), "head_shared_with": getattr(value, "shared", None), **evaluations}

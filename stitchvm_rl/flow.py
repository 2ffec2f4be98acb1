"""Flow-matching math and samplers, in the project's one convention.

Flow time `t` (= SD3's sigma): `t = 0` clean, `t = 1` noise; `z_t = (1 - t) z0 + t eps`; velocity
`v = eps - z0`. A velocity function is `v = f(z, t)` with `t` a (B,) tensor; the SD3 transformer is
fed `1000 t`. Every sampler returns the whole `Trajectory` (latent at every sigma it visited) and can
stop after step `k`, so early-stopped rollouts and Monte Carlo completions from `z_tau` share code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _col(t: torch.Tensor | float, z: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) time against a (B, ...) latent."""
    t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
    return t.reshape(-1, *([1] * (z.dim() - 1))) if t.dim() else t


# ---------------------------------------------------------------- schedule
def sd3_sigmas(num_steps: int, shift: float = 3.0, scheduler_config: dict | None = None) -> torch.Tensor:
    """The SD3 sampling schedule: diffusers' FlowMatchEuler sigmas (shifted), ending with 0.

    `scheduler_config` (a model's `scheduler.config`) wins over `shift` when given, so a policy
    samples on exactly the schedule it was published with.
    """
    if scheduler_config is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(num_steps, device="cpu")
    return scheduler.sigmas.to(torch.float32).clone()


# ---------------------------------------------------------------- conversions
def tweedie_x0(z: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
    """E[z0 | z_t] from the velocity: `z0_hat = z_t - t v`."""
    return z - _col(t, z) * v


def noise_from_velocity(z: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
    """E[eps | z_t] from the velocity: `eps_hat = z_t + (1 - t) v`."""
    return z + (1 - _col(t, z)) * v


# ---------------------------------------------------------------- bridge (anchor at z_tau)
@dataclass
class BridgeCoefficients:
    """`z_t = alpha z_tau + sigma eps` for t > tau, and the target `u = dalpha z_tau + dsigma eps`.

    At tau = 0 this is plain flow matching: alpha = 1 - t, sigma = t, u = eps - z0.
    """

    alpha: torch.Tensor
    sigma: torch.Tensor
    dalpha: torch.Tensor
    dsigma: torch.Tensor


def bridge_coefficients(t: torch.Tensor, tau: torch.Tensor) -> BridgeCoefficients:
    """Coefficients of the forward process conditioned on an intermediate latent z_tau (t > tau).

    alpha = (1-t)/(1-tau), sigma = sqrt(t^2 - alpha^2 tau^2), d/dt of both (the
    forward process z_t = (1-t) z0 + t eps conditioned on z_tau).
    sigma -> 0 as t -> tau, so training must use t strictly above tau.
    """
    t, tau = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(tau, dtype=torch.float64)
    if bool((t <= tau).any()):
        raise ValueError("bridge_coefficients needs t > tau: the bridge target grows like 1/sigma at t = tau")
    alpha = (1 - t) / (1 - tau)
    sigma = torch.sqrt(t**2 - alpha**2 * tau**2)
    dalpha = -1 / (1 - tau) * torch.ones_like(t)
    dsigma = (t + (1 - t) * tau**2 / (1 - tau) ** 2) / sigma
    return BridgeCoefficients(alpha.float(), sigma.float(), dalpha.float(), dsigma.float())


def bridge_sample(z_tau: torch.Tensor, tau, t, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise an anchor `z_tau` forward to time `t`; return `(z_t, target velocity u_{t|tau})`."""
    c = bridge_coefficients(torch.as_tensor(t), torch.as_tensor(tau))
    a, s, da, ds = (_col(x.to(z_tau.device), z_tau) for x in (c.alpha, c.sigma, c.dalpha, c.dsigma))
    return a * z_tau + s * eps, da * z_tau + ds * eps


# ---------------------------------------------------------------- samplers
@dataclass
class Trajectory:
    """`latents[n]` is the latent at `sigmas[n]`; `latents[-1]` is where the sampler stopped."""

    latents: torch.Tensor  # (n + 1, B, C, H, W)
    sigmas: torch.Tensor  # (n + 1,)

    @property
    def final(self) -> torch.Tensor:
        return self.latents[-1]


def _steps(sigmas: torch.Tensor, stop_after: int | None) -> int:
    total = len(sigmas) - 1
    if stop_after is None:
        return total
    if not 0 <= stop_after <= total:
        raise ValueError(f"stop_after={stop_after} is outside the schedule's {total} steps; choose 0..{total}")
    return stop_after


def _t(sigma: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return sigma.to(z.device, z.dtype).expand(z.shape[0])


def euler_ode(velocity: VelocityFn, z: torch.Tensor, sigmas: torch.Tensor, stop_after: int | None = None) -> Trajectory:
    """First-order Euler on the probability-flow ODE: z' = z + (t' - t) v(z, t)."""
    latents = [z]
    for n in range(_steps(sigmas, stop_after)):
        v = velocity(z, _t(sigmas[n], z))
        z = z + (sigmas[n + 1] - sigmas[n]).to(z.dtype) * v
        latents.append(z)
    return Trajectory(torch.stack(latents), sigmas[: len(latents)].clone())


def dpm2(velocity: VelocityFn, z: torch.Tensor, sigmas: torch.Tensor, stop_after: int | None = None) -> Trajectory:
    """DiffusionNFT's deterministic multistep DPM-Solver-2 in x0-prediction (alpha = 1 - t, sigma = t).

    A step from (a, s) to (a', s') with lambda = log(a/s), h = lambda' - lambda:
        first order (DDIM):  z' = (s'/s) z - a' (e^{-h} - 1) x0
        second order:        the same with x0 -> D0 + D1/2, D1 = (x0 - x0_prev) / (h_prev / h)
    The first step (from t = 1, where lambda = -inf) and the last (to t = 0, landing on x0_hat) are
    first order, as in the official solver.
    """
    latents = [z]
    x0_prev, h_prev = None, None
    for n in range(_steps(sigmas, stop_after)):
        t, t_next = float(sigmas[n]), float(sigmas[n + 1])
        x0 = tweedie_x0(z, _t(sigmas[n], z), velocity(z, _t(sigmas[n], z)))
        if t_next == 0.0:
            z, h = x0, None
        else:
            a, a_next = 1 - t, 1 - t_next
            if t >= 1.0:  # lambda = -inf: DDIM from pure noise, z' = s' z + a' x0
                z, h = t_next * z + a_next * x0, None
            else:
                h = math.log(a_next / t_next) - math.log(a / t)
                d = x0
                if x0_prev is not None and h_prev is not None:
                    d = x0 + 0.5 * (x0 - x0_prev) / (h_prev / h)
                z = (t_next / t) * z - a_next * math.expm1(-h) * d
        x0_prev, h_prev = x0, h
        latents.append(z)
    return Trajectory(torch.stack(latents), sigmas[: len(latents)].clone())


def flow_grpo_diffusion(noise_level: float = 0.7) -> Callable[[float, float], float]:
    """Flow-GRPO's diffusion coefficient g(t) = a sqrt(t / (1 - t)); at t = 1 the next sigma stands in."""

    def g(t: float, t_next: float) -> float:
        t_den = t_next if t >= 1.0 else t
        return noise_level * math.sqrt(t / (1 - t_den))

    return g


def flow_sde(
    velocity: VelocityFn,
    z: torch.Tensor,
    sigmas: torch.Tensor,
    stop_after: int | None = None,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """The marginal-preserving flow SDE (Flow-GRPO's family), Euler-Maruyama:

        z' = z - D [v + g^2/(2t) (z + (1 - t) v)] + g sqrt(D) xi,   D = t - t' > 0,

    i.e. the reverse SDE with drift v - g^2/2 * score and any g keeps the flow's marginals. We use
    Flow-GRPO's g(t) = a sqrt(t/(1-t)) (a = `noise_level`; a = 0 is the Euler ODE). The step that
    lands on t = 0 is the deterministic Tweedie step (adding noise at t = 0 would only blur).
    """
    g_of = flow_grpo_diffusion(noise_level)
    latents = [z]
    for n in range(_steps(sigmas, stop_after)):
        t, t_next = float(sigmas[n]), float(sigmas[n + 1])
        v = velocity(z, _t(sigmas[n], z))
        if t_next == 0.0:
            z = tweedie_x0(z, t, v)
        else:
            dt = t - t_next
            g = g_of(t, t_next)
            drift = v + (g * g / (2 * t)) * noise_from_velocity(z, t, v)
            # draw on the generator's device (CPU generators keep runs reproducible across devices)
            noise = torch.randn(z.shape, generator=generator, device=generator.device if generator else z.device, dtype=z.dtype).to(z.device)
            z = z - dt * drift + g * math.sqrt(dt) * noise
        latents.append(z)
    return Trajectory(torch.stack(latents), sigmas[: len(latents)].clone())
